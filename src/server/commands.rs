//! The requests: validate, apply to the in-memory state, describe the durable writes, answer.
//!
//! Each handler returns `Some(result)` for an immediate answer or `None` when a password job was
//! submitted and the answer comes from [`Server::finish_auth`].
//!
//! | request | needs session | errors |
//! |---|---|---|
//! | Register{user,password} | no | RegistrationClosed, InvalidName, InvalidPassword, NameTaken, Busy |
//! | Login{user,password} | no | BadCredentials, TooManySessions, Busy |
//! | Logout | yes | NotLoggedIn, SessionExpired |
//! | Subscribe{user} | yes | NoSuchUser, CannotSubscribeToSelf, AlreadySubscribed, TooManySubscriptions |
//! | Unsubscribe{user} | yes | NoSuchUser, NotSubscribed |
//! | Post{text} | yes | EmptyText, TextTooLong |
//! | Send{to,text} | yes | NoSuchUser, EmptyText, TextTooLong |
//! | Retrieve{count,before} | yes | CountOutOfRange |
//! | ListUsers{pattern,after} | yes | InvalidPattern |
//! | Ping, WhoAmI, Subscriptions | yes | |
//! | DeleteAccount{password} | yes | BadCredentials, Busy |

use super::{Account, Auth, Held, ReplyTo, Server, Session, Slot};
use crate::password::{JobKind, PasswordOutcome};
use crate::proto::{self, EncodedMessage, ErrorCode, Message, Relation, RequestBody, Response, Token};
use crate::store::Write;
use log::info;
use std::sync::Arc;
use std::time::Instant;

type Answer = Option<Result<Response, ErrorCode>>;

impl Server {
    pub(super) fn execute(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        session: Option<Token>,
        token: Option<Token>,
        body: RequestBody,
    ) -> Answer {
        if let Slot::Global(key) = reply.slot {
            // Retransmissions while this runs are ignored rather than executed again.
            self.replies.insert(now, key, super::Entry::Pending);
        }
        let answer = match (body, session) {
            (RequestBody::Register { user, password, .. }, _) => self.register(now, reply, user, password),
            (RequestBody::Login { user, password, .. }, _) => self.login(now, reply, user, password),
            // Health checks: a ping without a token is answered (with as many bytes as it had).
            (RequestBody::Ping, None) if token.is_none() => Some(Ok(Response::Pong)),
            (_, None) => Some(Err(self.no_session_error(token))),
            (body, Some(token)) => self.execute_in_session(now, reply, token, body),
        };
        if let Some(result) = &answer {
            // Errors are cheap to recompute; do not let them occupy the bounded cache.
            self.forget_error(reply, result);
        }
        answer
    }

    fn execute_in_session(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        token: Token,
        body: RequestBody,
    ) -> Answer {
        let user = self.sessions.get(&token).map(|s| s.user.clone())?;
        Some(match body {
            RequestBody::Register { .. } | RequestBody::Login { .. } => unreachable!("handled before"),
            RequestBody::Logout => {
                self.close_session(token, false);
                info!("{user} logged out");
                // A retransmitted logout finds its reply under the token.
                Ok(Response::LoggedOut)
            }
            RequestBody::Subscribe { user: target } => self.subscribe(&user, target),
            RequestBody::Unsubscribe { user: target } => self.unsubscribe(&user, target),
            RequestBody::Post { text } => self.post(&user, None, text),
            RequestBody::Send { to, text } => self.post(&user, Some(to), text),
            RequestBody::Retrieve { count, before } => self.retrieve(&user, count, before),
            RequestBody::ListUsers { pattern, after } => self.list_users(pattern, after),
            RequestBody::Ping => Ok(Response::Pong),
            RequestBody::WhoAmI => Ok(Response::Me {
                sessions: self.users.get(&user).map_or(0, |a| a.sessions.len() as u32),
                user,
            }),
            RequestBody::Subscriptions { after } => self.relations(&user, after),
            RequestBody::DeleteAccount { password } => {
                let hash = self.users.get(&user)?.password_hash.clone();
                let slot = super::reply_cache::Key::Token(token, reply.id);
                let reply = ReplyTo { slot: Slot::Global(slot), ..reply };
                self.replies.insert(now, slot, super::Entry::Pending);
                return match self.submit_job(
                    now,
                    JobKind::Verify { password, hash },
                    Auth::Delete { user, reply, token },
                ) {
                    Ok(()) => None,
                    Err(e) => {
                        self.replies.remove(&slot);
                        Some(Err(e))
                    }
                };
            }
        })
    }

    fn register(&mut self, now: Instant, reply: ReplyTo, user: String, password: String) -> Answer {
        if !self.cfg.allow_registration {
            return Some(Err(ErrorCode::RegistrationClosed));
        }
        if !proto::valid_name(&user, self.cfg.max_name_len as usize) {
            return Some(Err(ErrorCode::InvalidName { max_len: self.cfg.max_name_len }));
        }
        let (min, max) = (self.cfg.min_password_len, self.cfg.max_password_len);
        if password.len() < min as usize || password.len() > max as usize {
            return Some(Err(ErrorCode::InvalidPassword { min_len: min, max_len: max }));
        }
        if self.users.contains_key(&user) || self.reserved.contains(&user) {
            return Some(Err(ErrorCode::NameTaken { user }));
        }
        if self.users.len() + self.reserved.len() >= self.cfg.max_accounts as usize {
            return Some(Err(ErrorCode::TooManyAccounts { max: self.cfg.max_accounts }));
        }
        // Each attempt that would cost a hash takes a token from the address's bucket.
        if let Err(wait) = self.register_by_addr.take(now, &reply.to.ip()) {
            self.stats.registrations_throttled += 1;
            let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u32;
            return Some(Err(ErrorCode::RateLimited { retry_after_secs }));
        }
        let job = JobKind::Hash { password, params: self.hash_params };
        match self.submit_job(now, job, Auth::Register { user: user.clone(), reply }) {
            Ok(()) => {
                self.reserved.insert(user);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    fn login(&mut self, now: Instant, reply: ReplyTo, user: String, password: String) -> Answer {
        if password.len() > self.cfg.max_password_len as usize {
            return Some(Err(ErrorCode::BadCredentials));
        }
        if !proto::valid_name(&user, proto::MAX_NAME_LEN) {
            // No such account can exist; say so the same way, without hashing.
            return Some(Err(ErrorCode::BadCredentials));
        }
        // Throttled attempts are refused before any hashing: they cost us nothing. The account's
        // bucket lives in the account (nobody can evict it by flooding other names); unknown
        // names are limited by the address's bucket alone.
        let ip = reply.to.ip();
        let (burst, refill) = (self.cfg.login_failures_per_user_burst, self.login_refill());
        let account_wait = self.users.get(&user).and_then(|a| a.login_bucket.blocked(now, burst, refill));
        let wait = account_wait.max(self.login_by_addr.blocked(now, &ip));
        if let Some(wait) = wait {
            self.stats.logins_throttled += 1;
            let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u32;
            return Some(Err(ErrorCode::RateLimited { retry_after_secs }));
        }
        // Every attempt takes a token; a successful one gives it back.
        if let Some(acc) = self.users.get_mut(&user) {
            let _ = acc.login_bucket.take(now, burst, refill);
        }
        let _ = self.login_by_addr.take(now, &ip);
        // An unknown user is verified against a dummy hash, so that it costs the same time as a
        // wrong password; the outcome is ignored.
        let hash = match self.users.get(&user) {
            Some(acc) => acc.password_hash.clone(),
            None => self.dummy_hash.clone(),
        };
        let job = JobKind::Verify { password, hash: hash.clone() };
        match self.submit_job(now, job, Auth::Login { user: user.clone(), reply, hash }) {
            Ok(()) => None,
            Err(e) => {
                if let Some(acc) = self.users.get_mut(&user) {
                    acc.login_bucket.give_back(burst);
                }
                self.login_by_addr.give_back(&ip);
                Some(Err(e))
            }
        }
    }

    /// Completes a register, login or delete once its password job has run.
    pub(super) fn finish_auth(
        &mut self,
        now: Instant,
        auth: Auth,
        outcome: PasswordOutcome,
    ) -> (ReplyTo, Result<Response, ErrorCode>) {
        match auth {
            Auth::Register { user, reply } => {
                self.reserved.remove(&user);
                let result = match outcome {
                    PasswordOutcome::Hashed(Some(password_hash)) if !self.users.contains_key(&user) => {
                        info!("registered {user}");
                        self.write(Write::CreateAccount {
                            user: user.clone(),
                            password_hash: password_hash.clone(),
                        });
                        self.users.insert(user, Account::new(password_hash, now));
                        Ok(Response::Registered)
                    }
                    PasswordOutcome::Hashed(Some(_)) => Err(ErrorCode::NameTaken { user }),
                    _ => Err(ErrorCode::StorageUnavailable),
                };
                self.forget_error(reply, &result);
                (reply, result)
            }
            Auth::Login { user, reply, hash } => {
                let ok = outcome == PasswordOutcome::Verified(true)
                    && self.users.get(&user).is_some_and(|a| a.password_hash == hash);
                if ok {
                    let burst = self.cfg.login_failures_per_user_burst;
                    if let Some(acc) = self.users.get_mut(&user) {
                        acc.login_bucket.give_back(burst);
                    }
                    self.login_by_addr.give_back(&reply.to.ip());
                }
                let result =
                    if ok { self.open_session(now, reply, user) } else { Err(ErrorCode::BadCredentials) };
                self.forget_error(reply, &result);
                (reply, result)
            }
            Auth::Delete { user, reply, token } => {
                let ok = outcome == PasswordOutcome::Verified(true) && self.sessions.contains_key(&token);
                let result = if ok {
                    self.delete_account(&user, true);
                    Ok(Response::Deleted)
                } else {
                    // The session lives on: let its retransmission run (and be checked) again.
                    if let Some(s) = self.sessions.get_mut(&token) {
                        s.dedup.forget(reply.id);
                    }
                    Err(ErrorCode::BadCredentials)
                };
                self.forget_error(reply, &result);
                (reply, result)
            }
        }
    }

    fn forget_error(&mut self, reply: ReplyTo, result: &Result<Response, ErrorCode>) {
        if let (Slot::Global(key), Err(_)) = (reply.slot, result) {
            self.replies.remove(&key);
        }
    }

    fn open_session(&mut self, now: Instant, reply: ReplyTo, user: String) -> Result<Response, ErrorCode> {
        let per_user = self.cfg.max_sessions_per_user;
        let acc = self.users.get(&user).ok_or(ErrorCode::BadCredentials)?;
        if acc.sessions.len() >= per_user as usize {
            return Err(ErrorCode::TooManySessions { max: per_user });
        }
        if self.sessions.len() >= self.cfg.max_sessions as usize {
            self.stats.busy += 1;
            return Err(ErrorCode::Busy);
        }
        let token = self.new_token();
        let mut s = Session::new(user.clone(), token.session_id(), Some(reply.to), now, self.cfg.push_rto());
        // Catch-up: what arrived while no session of this user acknowledged it.
        let acc = self.users.get_mut(&user).expect("checked");
        let missed: Vec<_> =
            acc.inbox.iter().filter(|m| m.message.id > acc.last_delivered).cloned().collect();
        let catching_up = missed.len().min(self.cfg.catch_up_max as usize);
        for m in &missed[missed.len() - catching_up..] {
            s.queue.push_back(m.clone());
        }
        acc.sessions.push(token);
        self.sessions.insert(token, s);
        self.stats.sessions_opened += 1;
        self.write(Write::OpenSession { token, user: user.clone() });
        self.hold(Held::Activate(token));
        self.schedule(token, now);
        info!("{user} logged in from {} ({} missed)", reply.to, missed.len());
        Ok(Response::LoggedIn { token, missed: missed.len() as u32, catching_up: catching_up as u32 })
    }

    /// Removes an account from memory; `store_it` unless the store already has (an admin
    /// command deleted it).
    pub(super) fn delete_account(&mut self, user: &str, store_it: bool) {
        let Some(acc) = self.users.remove(user) else { return };
        for m in &acc.inbox {
            if m.leave_inbox() {
                self.write(Write::DropMessage { id: m.message.id });
            }
        }
        for t in &acc.sessions {
            self.close_session(*t, false);
        }
        for f in &acc.following {
            if let Some(other) = self.users.get_mut(f) {
                other.followers.remove(user);
            }
        }
        for f in &acc.followers {
            if let Some(other) = self.users.get_mut(f) {
                other.following.remove(user);
            }
        }
        if store_it {
            self.write(Write::DeleteAccount { user: user.to_string() });
        }
        info!("deleted account {user}");
    }

    fn subscribe(&mut self, user: &str, target: String) -> Result<Response, ErrorCode> {
        if target == user {
            return Err(ErrorCode::CannotSubscribeToSelf);
        }
        if !self.users.contains_key(&target) {
            return Err(ErrorCode::NoSuchUser { user: target });
        }
        let max = self.cfg.max_subscriptions;
        let acc = self.users.get_mut(user).ok_or(ErrorCode::NotLoggedIn)?;
        if acc.following.contains(&target) {
            return Err(ErrorCode::AlreadySubscribed { user: target });
        }
        if acc.following.len() >= max as usize {
            return Err(ErrorCode::TooManySubscriptions { max });
        }
        acc.following.insert(target.clone());
        self.users.get_mut(&target).expect("checked").followers.insert(user.to_string());
        self.write(Write::Subscribe { follower: user.to_string(), followed: target });
        Ok(Response::Subscribed)
    }

    fn unsubscribe(&mut self, user: &str, target: String) -> Result<Response, ErrorCode> {
        if !self.users.contains_key(&target) {
            return Err(ErrorCode::NoSuchUser { user: target });
        }
        let acc = self.users.get_mut(user).ok_or(ErrorCode::NotLoggedIn)?;
        if !acc.following.remove(&target) {
            return Err(ErrorCode::NotSubscribed { user: target });
        }
        self.users.get_mut(&target).expect("checked").followers.remove(user);
        self.write(Write::Unsubscribe { follower: user.to_string(), followed: target });
        Ok(Response::Unsubscribed)
    }

    /// A post (to the author's subscribers) or, with `to`, a direct message.
    fn post(&mut self, user: &str, to: Option<String>, text: String) -> Result<Response, ErrorCode> {
        if text.is_empty() {
            return Err(ErrorCode::EmptyText);
        }
        if text.len() > self.cfg.max_text_bytes as usize {
            return Err(ErrorCode::TextTooLong { max: self.cfg.max_text_bytes });
        }
        let recipients: Vec<String> = match &to {
            Some(r) if self.users.contains_key(r) => vec![r.clone()],
            Some(r) => return Err(ErrorCode::NoSuchUser { user: r.clone() }),
            None => self.users.get(user).map(|a| a.followers.iter().cloned().collect()).unwrap_or_default(),
        };
        let id = self.next_message_id;
        self.next_message_id += 1;
        let message = Message { id, author: user.to_string(), to: to.clone(), text };
        let msg = Arc::new(EncodedMessage::new(message.clone()));
        for r in &recipients {
            self.deliver_to_inbox(r, &msg);
        }
        self.write(Write::StoreMessage { message, recipients: recipients.clone() });
        let n = recipients.len() as u32;
        self.hold(Held::Fanout(msg, recipients));
        Ok(match to {
            Some(_) => Response::Sent { id },
            None => Response::Posted { id, recipients: n },
        })
    }

    /// One page of the `count` newest inbox messages below `before`, oldest first.
    fn retrieve(&mut self, user: &str, count: u32, before: Option<u64>) -> Result<Response, ErrorCode> {
        let max = self.cfg.max_retrieve;
        if count == 0 || count > max {
            return Err(ErrorCode::CountOutOfRange { min: 1, max });
        }
        let acc = self.users.get(user).ok_or(ErrorCode::NotLoggedIn)?;
        let mut page: Vec<&Arc<EncodedMessage>> = Vec::new();
        let mut used = 0;
        // Set when the datagram is full before the count is reached: the client asks again
        // with `before` = the oldest id of this page.
        let mut more = false;
        for m in acc.inbox.iter().rev().filter(|m| before.is_none_or(|b| m.message.id < b)) {
            if page.len() == count as usize {
                break;
            }
            if !Self::page_fits(used, m.wire_len()) {
                more = true;
                break;
            }
            used += m.wire_len();
            page.push(m);
        }
        let messages = page.into_iter().rev().map(|m| m.message.clone()).collect();
        Ok(Response::Messages { messages, more })
    }

    fn list_users(&mut self, pattern: String, after: Option<String>) -> Result<Response, ErrorCode> {
        if !proto::valid_pattern(&pattern) {
            return Err(ErrorCode::InvalidPattern { max_len: proto::MAX_PATTERN_LEN as u32 });
        }
        // Bound the work per request: scan at most this many names, then hand out a cursor.
        const SCAN: usize = 4096;
        let start = after.as_deref().unwrap_or("");
        let mut names = Vec::new();
        let mut used = 0;
        let mut next = None;
        let mut last: Option<&String> = None;
        for (i, name) in self
            .users
            .range::<str, _>((std::ops::Bound::Excluded(start), std::ops::Bound::Unbounded))
            .map(|(n, _)| n)
            .enumerate()
        {
            if i == SCAN || !Self::page_fits(used, name.len() + 1) {
                next = last.cloned();
                break;
            }
            last = Some(name);
            if proto::wildcard_match(&pattern, name) {
                used += name.len() + 1;
                names.push(name.clone());
            }
        }
        Ok(Response::Users { names, next })
    }

    fn relations(&mut self, user: &str, after: Option<String>) -> Result<Response, ErrorCode> {
        let acc = self.users.get(user).ok_or(ErrorCode::NotLoggedIn)?;
        let start = after.unwrap_or_default();
        let mut all: Vec<&String> = acc
            .following
            .iter()
            .chain(acc.followers.iter())
            .filter(|n| n.as_str() > start.as_str())
            .collect();
        all.sort();
        all.dedup();
        let mut entries = Vec::new();
        let mut used = 0;
        let mut next = None;
        for name in all {
            if !Self::page_fits(used, name.len() + 3) {
                next = entries.last().map(|r: &Relation| r.user.clone());
                break;
            }
            used += name.len() + 3;
            entries.push(Relation {
                user: name.clone(),
                following: acc.following.contains(name),
                follower: acc.followers.contains(name),
            });
        }
        Ok(Response::Relations { entries, next })
    }
}
