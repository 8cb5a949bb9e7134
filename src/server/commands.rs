//! The requests: validate, apply to the in-memory state, describe the durable writes, answer.
//!
//! Each handler returns `Some(result)` for an immediate answer or `None` when a password job was
//! submitted and the answer comes from [`Server::finish_auth`].
//!
//! | request | needs session | errors |
//! |---|---|---|
//! | Register{user,password,cookie} | no (always a cookie) | RegistrationClosed, InvalidName, InvalidPassword, NameTaken, TooManyAccounts, RateLimited, Busy |
//! | Login{user,password,cookie} | no (a cookie when asked) | BadCredentials, TooManySessions, RateLimited, Busy |
//! | Logout | yes | NotLoggedIn, SessionExpired |
//! | Subscribe{user} | yes | NoSuchUser, CannotSubscribeToSelf, AlreadySubscribed, TooManySubscriptions |
//! | Unsubscribe{user} | yes | NoSuchUser, NotSubscribed |
//! | Post{text} | yes | EmptyText, TextTooLong, InvalidText, RateLimited |
//! | Send{to,text} | yes | NoSuchUser, EmptyText, TextTooLong, InvalidText, RateLimited |
//! | Retrieve{count,before} | yes | CountOutOfRange |
//! | ListUsers{pattern,after} | yes | InvalidPattern |
//! | Ping, WhoAmI, Subscriptions | yes | |
//! | DeleteAccount{password} | yes | BadCredentials, RateLimited, Busy |
//!
//! A login or registration that needs a cookie is answered with [`proto::ServerMsg::Retry`]
//! instead (see [`super::cookie`] and [`super::login_limits`]).

use super::login_limits::{self, Verdict};
use super::throttle::Prefix;
use super::{Account, Auth, Held, ReplyTo, Server, Session, Slot};
use crate::password::{JobKind, PasswordOutcome};
use crate::proto::{
    self, Cookie, EncodedMessage, ErrorCode, Message, Relation, RequestBody, Response, Token,
};
use crate::store::Write;
use log::info;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        let answer = match (body, session) {
            (RequestBody::Register { user, password, cookie, .. }, _) => {
                self.register(now, reply, user, password, cookie)
            }
            (RequestBody::Login { user, password, cookie, .. }, _) => {
                self.login(now, reply, user, password, cookie)
            }
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
                if self.event(now) {
                    info!("{user} logged out");
                }
                // A retransmitted logout finds its reply under the token.
                Ok(Response::LoggedOut)
            }
            RequestBody::Subscribe { user: target } => self.subscribe(&user, target),
            RequestBody::Unsubscribe { user: target } => self.unsubscribe(&user, target),
            RequestBody::Post { text } => self.post(now, &user, None, text),
            RequestBody::Send { to, text } => self.post(now, &user, Some(to), text),
            RequestBody::Retrieve { count, before } => self.retrieve(&user, count, before),
            RequestBody::ListUsers { pattern, after } => self.list_users(pattern, after),
            RequestBody::Ping => Ok(Response::SessionPong { epoch: self.epoch }),
            RequestBody::WhoAmI => Ok(Response::Me {
                sessions: self.users.get(&user).map_or(0, |a| a.sessions.len() as u32),
                user,
            }),
            RequestBody::Subscriptions { after } => self.relations(&user, after),
            RequestBody::DeleteAccount { password } => return self.delete(now, reply, token, user, password),
        })
    }

    fn register(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        user: String,
        password: String,
        cookie: Option<Cookie>,
    ) -> Answer {
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
        // An account is only ever made for an address that receives our answers: a registration
        // always needs a cookie (one round trip more, once per account), so spoofed ones cost
        // nothing, create nothing and learn nothing (not even whether the name is taken).
        if !self.proven(now, reply.to, cookie.as_ref()) {
            self.retry(now, reply);
            return None;
        }
        if self.users.contains_key(&user) || self.reserved.contains(&user) {
            return Some(Err(ErrorCode::NameTaken { user }));
        }
        if self.users.len() + self.reserved.len() >= self.cfg.max_accounts as usize {
            return Some(Err(ErrorCode::TooManyAccounts { max: self.cfg.max_accounts }));
        }
        // Each attempt that would cost a hash takes a token from the address's bucket.
        if let Err(wait) = self.register_by_addr.take(now, &Prefix::of(reply.to.ip())) {
            self.stats.registrations_throttled += 1;
            return Some(Err(rate_limited(wait)));
        }
        self.next_sweep.get_or_insert(now + super::SWEEP);
        let job = JobKind::Hash { password, params: self.hash_params };
        match self.submit_job(now, job, Auth::Register { user: user.clone(), reply }) {
            Ok(()) => {
                self.pending(now, reply);
                self.reserved.insert(user);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Whether `cookie` proves that `from` receives what we send it.
    fn proven(&mut self, now: Instant, from: std::net::SocketAddr, cookie: Option<&Cookie>) -> bool {
        cookie.is_some_and(|c| self.cookies.check(now, self.rng.as_mut(), from, c))
    }

    /// Whether the password workers have more than they can start at once: from then on,
    /// only logins from proven addresses are hashed.
    fn under_load(&self) -> bool {
        self.auth.len() >= self.cfg.password_workers as usize
    }

    /// Marks a login or registration as under way in the reply cache: its retransmissions are
    /// ignored rather than run again. Only a request that got this far has an entry.
    fn pending(&mut self, now: Instant, reply: ReplyTo) {
        if let Slot::Global(key) = reply.slot {
            self.replies.insert(now, key, super::Entry::Pending);
        }
    }

    fn login(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        user: String,
        password: String,
        cookie: Option<Cookie>,
    ) -> Answer {
        if password.len() > self.cfg.max_password_len as usize
            || !proto::valid_name(&user, proto::MAX_NAME_LEN)
        {
            // No such account can exist; say so the same way, without hashing.
            return Some(Err(ErrorCode::BadCredentials));
        }
        if self.sessions.len() >= self.cfg.max_sessions as usize {
            // Full whoever logs in: say so before any hashing.
            self.stats.busy += 1;
            return Some(Err(ErrorCode::Busy));
        }
        let proven = self.proven(now, reply.to, cookie.as_ref());
        let prefix = Prefix::of(reply.to.ip());
        let known = self.users.get(&user).is_some_and(|a| a.known.contains(&prefix));
        let under_load = self.under_load();
        let charged = match self.limits.admit(now, &user, reply.to.ip(), proven, known, under_load) {
            Verdict::Go(charged) => charged,
            Verdict::Retry => {
                self.retry(now, reply);
                return None;
            }
            Verdict::Wait(wait) => {
                self.stats.logins_throttled += 1;
                return Some(Err(rate_limited(wait)));
            }
        };
        self.next_sweep.get_or_insert(now + super::SWEEP);
        // An unknown user is verified against a dummy hash, so that it costs the same time as a
        // wrong password; the outcome is ignored.
        let hash = match self.users.get(&user) {
            Some(acc) => acc.password_hash.clone(),
            None => self.dummy_hash.clone(),
        };
        let job = JobKind::Verify { password, hash: hash.clone() };
        match self.submit_job(now, job, Auth::Login { user, reply, hash, charged: charged.clone() }) {
            Ok(()) => {
                self.pending(now, reply);
                None
            }
            Err(e) => {
                self.limits.refund(&charged);
                Some(Err(e))
            }
        }
    }

    /// Deleting one's account checks the password again: through the same limits as a login,
    /// and one check at a time per session, so a session (or a stolen token) is no faster a
    /// password oracle than the login.
    fn delete(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        token: Token,
        user: String,
        password: String,
    ) -> Answer {
        let hash = self.users.get(&user)?.password_hash.clone();
        let s = self.sessions.get_mut(&token)?;
        if s.password_job {
            return Some(Err(ErrorCode::Busy));
        }
        // From the session's proven address it counts as proven; from anywhere else it cannot
        // be (there is no cookie to show), and when the unproven allowance is gone it waits.
        let proven = s.verified && s.addr == Some(reply.to);
        let prefix = Prefix::of(reply.to.ip());
        let known = self.users.get(&user).is_some_and(|a| a.known.contains(&prefix));
        match self.limits.admit(now, &user, reply.to.ip(), proven, known, false) {
            Verdict::Go(_) => {}
            Verdict::Retry => {
                self.stats.logins_throttled += 1;
                let refill = Duration::from_secs(self.cfg.login_failures_per_user_refill_secs);
                return Some(Err(rate_limited(refill)));
            }
            Verdict::Wait(wait) => {
                self.stats.logins_throttled += 1;
                return Some(Err(rate_limited(wait)));
            }
        }
        self.next_sweep.get_or_insert(now + super::SWEEP);
        let slot = super::reply_cache::Key::Token(token, reply.id);
        let reply = ReplyTo { slot: Slot::Global(slot), ..reply };
        match self.submit_job(now, JobKind::Verify { password, hash }, Auth::Delete { user, reply, token }) {
            Ok(()) => {
                self.pending(now, reply);
                if let Some(s) = self.sessions.get_mut(&token) {
                    s.password_job = true;
                }
                None
            }
            Err(e) => Some(Err(e)),
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
                        if self.event(now) {
                            info!("registered {user}");
                        }
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
            Auth::Login { user, reply, hash, charged } => {
                let ok = outcome == PasswordOutcome::Verified(true)
                    && self.users.get(&user).is_some_and(|a| a.password_hash == hash);
                if ok {
                    self.limits.refund(&charged);
                    if let Some(acc) = self.users.get_mut(&user) {
                        // This address now knows the password: the per-account brake is not
                        // for it.
                        acc.known.retain(|p| *p != charged.prefix());
                        acc.known.insert(0, charged.prefix());
                        acc.known.truncate(login_limits::KNOWN_ADDRESSES);
                    }
                }
                let result =
                    if ok { self.open_session(now, reply, user) } else { Err(ErrorCode::BadCredentials) };
                self.forget_error(reply, &result);
                (reply, result)
            }
            Auth::Delete { user, reply, token } => {
                if let Some(s) = self.sessions.get_mut(&token) {
                    s.password_job = false;
                }
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
        let epoch = self.epoch;
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
        if self.event(now) {
            info!("{user} logged in from {} ({} missed)", reply.to, missed.len());
        }
        Ok(Response::LoggedIn { token, missed: missed.len() as u32, catching_up: catching_up as u32, epoch })
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
        if !proto::valid_name(&target, proto::MAX_NAME_LEN) || !self.users.contains_key(&target) {
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

    /// A post (to the author's subscribers) or, with `to`, a direct message. The author pays
    /// for the work: each delivery takes a token from their budget (a post to many followers
    /// goes through and makes the next one wait), and a direct message to someone who does not
    /// follow the author takes one from the recipient's allowance of such messages, so nobody
    /// can fill a stranger's inbox.
    fn post(
        &mut self,
        now: Instant,
        user: &str,
        to: Option<String>,
        text: String,
    ) -> Result<Response, ErrorCode> {
        if text.is_empty() {
            return Err(ErrorCode::EmptyText);
        }
        if text.len() > self.cfg.max_text_bytes as usize {
            return Err(ErrorCode::TextTooLong { max: self.cfg.max_text_bytes });
        }
        if let Some(c) = proto::forbidden_char(&text) {
            return Err(ErrorCode::InvalidText { code_point: c as u32 });
        }
        let recipients: Vec<String> = match &to {
            Some(r) if proto::valid_name(r, proto::MAX_NAME_LEN) && self.users.contains_key(r) => {
                vec![r.clone()]
            }
            Some(r) => return Err(ErrorCode::NoSuchUser { user: r.clone() }),
            None => self.users.get(user).map(|a| a.followers.iter().cloned().collect()).unwrap_or_default(),
        };
        let (dm_burst, dm_refill) =
            (self.cfg.dms_from_strangers_burst, Duration::from_secs(self.cfg.dms_from_strangers_refill_secs));
        let stranger = to.as_ref().filter(|r| !self.users[*r].following.contains(user));
        if let Some(r) = stranger {
            if let Some(wait) = self.users[r].stranger_dms.blocked(now, dm_burst, dm_refill) {
                self.stats.deliveries_throttled += 1;
                return Err(rate_limited(wait));
            }
        }
        let per_sec = self.cfg.deliveries_per_user_per_sec;
        let (burst, refill) = (per_sec.saturating_mul(10), Duration::from_secs(1) / per_sec);
        let acc = self.users.get_mut(user).ok_or(ErrorCode::NotLoggedIn)?;
        if let Err(wait) = acc.deliveries.charge(now, burst, refill, recipients.len().max(1) as f64) {
            self.stats.deliveries_throttled += 1;
            return Err(rate_limited(wait));
        }
        if let Some(r) = stranger {
            let _ = self.users.get_mut(r).expect("checked").stranger_dms.take(now, dm_burst, dm_refill);
        }
        let id = self.next_message_id;
        self.next_message_id += 1;
        let message = Message { id, time: self.unix_ms(now), author: user.to_string(), to: to.clone(), text };
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

    /// One page of whom `user` follows and who follows them, in name order after `after`: a
    /// merge of the two sorted sets from the cursor on, so a page costs what it holds, however
    /// many followers there are.
    fn relations(&mut self, user: &str, after: Option<String>) -> Result<Response, ErrorCode> {
        let acc = self.users.get(user).ok_or(ErrorCode::NotLoggedIn)?;
        let start = after.unwrap_or_default();
        let from = (Bound::Excluded(start.as_str()), Bound::Unbounded);
        let mut following = acc.following.range::<str, _>(from).peekable();
        let mut followers = acc.followers.range::<str, _>(from).peekable();
        let mut entries = Vec::new();
        let mut used = 0;
        let mut next = None;
        loop {
            let name = match (following.peek(), followers.peek()) {
                (None, None) => break,
                (Some(a), None) => *a,
                (None, Some(b)) => *b,
                (Some(a), Some(b)) => (*a).min(*b),
            };
            if !Self::page_fits(used, name.len() + 3) {
                next = entries.last().map(|r: &Relation| r.user.clone());
                break;
            }
            used += name.len() + 3;
            let following = following.next_if(|n| *n == name).is_some();
            let follower = followers.next_if(|n| *n == name).is_some();
            entries.push(Relation { user: name.clone(), following, follower });
        }
        Ok(Response::Relations { entries, next })
    }
}

/// "Too many attempts, retry in N s", N rounded up.
fn rate_limited(wait: Duration) -> ErrorCode {
    ErrorCode::RateLimited { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u32 }
}
