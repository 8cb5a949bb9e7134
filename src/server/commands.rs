//! The requests: validate, gather the data they need, apply, describe the durable writes, answer.
//!
//! Each handler first checks what it can without data, then asks for the data it needs (see
//! [`super::reads`]); while any is missing it returns [`Step::Need`] *before changing anything*,
//! and runs again from the start once the data is there. Only then does it charge throttles,
//! write and answer. [`Step::Later`] means a password job was submitted (the answer comes from
//! [`Server::finish_auth`]) or a cookie retry was sent.
//!
//! | request | needs session | reads | errors |
//! |---|---|---|---|
//! | Register{user,password,cookie} | no (always a cookie) | account | RegistrationClosed, InvalidName, InvalidPassword, NameTaken, TooManyAccounts, RateLimited, Busy |
//! | Login{user,password,cookie} | no (a cookie when asked) | account, then the catch-up | BadCredentials, TooManySessions, RateLimited, Busy |
//! | Logout | yes | | NotLoggedIn, SessionExpired |
//! | Subscribe{user} | yes | account, follows | NoSuchUser, CannotSubscribeToSelf, AlreadySubscribed, TooManySubscriptions |
//! | Unsubscribe{user} | yes | account, follows | NoSuchUser, NotSubscribed |
//! | Post{text} | yes | followers | EmptyText, TextTooLong, InvalidText, RateLimited |
//! | Send{to,text} | yes | account, follows | NoSuchUser, EmptyText, TextTooLong, InvalidText, RateLimited |
//! | Retrieve{count,before} | yes | inbox | CountOutOfRange |
//! | ListUsers{pattern,after} | yes | names | InvalidPattern |
//! | Ping, WhoAmI | yes | | |
//! | Subscriptions{after} | yes | relations | |
//! | DeleteAccount{password} | yes | account | BadCredentials, RateLimited, Busy |
//!
//! Any request that needs a read can also be answered StorageUnavailable (the read failed) or
//! Busy (too many requests wait for reads). A login or registration that needs a cookie is
//! answered with [`proto::ServerMsg::Retry`] instead (see [`super::cookie`] and
//! [`super::login_limits`]).

use super::login_limits::{self, Verdict};
use super::reads::{Job, Step, MAX_PARKED};
use super::throttle::Prefix;
use super::{Auth, Held, ReplyTo, Rerun, Server, Session, Slot};
use crate::password::{JobKind, PasswordOutcome};
use crate::proto::{
    self, Cookie, EncodedMessage, ErrorCode, Message, Relation, Request, RequestBody, Response, Token,
};
use crate::store::{AccountRecord, Read, Write};
use log::info;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names a users# page scans at most; the client asks again from the cursor.
const SCAN: u32 = 4096;
/// Relations read per subscriptions page (more than one datagram holds).
const RELATIONS_PAGE: u32 = 64;
/// Messages read for one retrieve page at most (more than one datagram holds).
const RETRIEVE_PAGE: u32 = 128;

impl Server {
    /// Runs `job` (again): a request, a login to complete, a restored session's catch-up.
    pub(super) fn run(&mut self, now: Instant, job: Job) {
        match job {
            Job::Request { from, len, reply, session, token, body } => {
                let writes_before = self.writes.len();
                // If a session's reply will wait for a commit, keep the request: should the
                // commit fail and the request turn out to have only read, it runs again on the
                // restored state. (Requests without a session never wait unless they wrote:
                // they cannot have seen anything uncommitted, and a stranger's datagram must not
                // cost a copy.)
                let keep = session.is_some() && self.gate().is_some();
                match self.execute(now, reply, session, token, &body) {
                    Step::Answer(result) => {
                        self.forget_error(reply, &result);
                        let wrote = self.writes.len() > writes_before;
                        let rerun = (keep && !wrote).then(|| {
                            Box::new(Rerun { from, len, request: Request { id: reply.id, token, body } })
                        });
                        self.reply_and_persist(now, reply, result, wrote, rerun);
                    }
                    Step::Later => {}
                    Step::Need(needs) => {
                        let job = Job::Request { from, len, reply, session, token, body };
                        self.wait(now, job, needs);
                    }
                    Step::Rerun => {
                        self.forget(reply);
                        self.dispatch(now, from, len, Request { id: reply.id, token, body });
                    }
                }
            }
            Job::Login { reply, account, remember } => {
                let before = self.writes.len();
                match self.open_session(now, reply, &account, remember) {
                    Step::Answer(result) => {
                        self.forget_error(reply, &result);
                        let wrote = self.writes.len() > before;
                        self.reply_and_persist(now, reply, result, wrote, None);
                    }
                    Step::Later | Step::Rerun => {}
                    Step::Need(needs) => self.wait(now, Job::Login { reply, account, remember }, needs),
                }
            }
            Job::Restore { token, user_id, last_delivered } => {
                let mut needs = Vec::new();
                let max = self.cfg.catch_up_max;
                // One node of several: ids are not in commit order across nodes, so a message
                // below the delivered mark may not have been pushed; the newest are queued and
                // the client drops what it has shown.
                let floor = if self.nodes.is_some() { 0 } else { last_delivered };
                match self.inbox(user_id, max, None, Some(last_delivered), &mut needs) {
                    Some((messages, _)) => {
                        if let Some(s) = self.sessions.get_mut(&token) {
                            s.queue.extend(messages.into_iter().filter(|m| m.message.id > floor));
                            self.pump(now, token);
                            self.schedule(token, now);
                        }
                    }
                    None => self.wait(now, Job::Restore { token, user_id, last_delivered }, needs),
                }
            }
        }
    }

    /// Parks `job` for `needs`, or answers "busy" when too many wait already.
    fn wait(&mut self, now: Instant, job: Job, needs: Vec<Read>) {
        let got = std::mem::take(&mut self.reads.scratch);
        if self.reads.parked() >= MAX_PARKED {
            self.stats.busy += 1;
            if let Job::Request { reply, .. } | Job::Login { reply, .. } = job {
                self.forget(reply);
                self.reply(now, reply, Err(ErrorCode::Busy));
            }
            return;
        }
        if let Job::Request { reply, .. } = &job {
            // Retransmissions while it waits are ignored rather than run again.
            self.pending(now, *reply);
        }
        self.park(job, needs, got);
    }

    pub(super) fn execute(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        session: Option<Token>,
        token: Option<Token>,
        body: &RequestBody,
    ) -> Step {
        match (body, session) {
            (RequestBody::Register { user, password, cookie, .. }, _) => {
                self.register(now, reply, user, password, cookie.as_ref())
            }
            (RequestBody::Login { user, password, cookie, .. }, _) => {
                self.login(now, reply, user, password, cookie.as_ref())
            }
            // Health checks: a ping without a token is answered (with as many bytes as it had).
            (RequestBody::Ping, None) if token.is_none() => Step::Answer(Ok(Response::Pong)),
            (_, None) => self.unknown_session(now, reply, token),
            (body, Some(token)) => self.execute_in_session(now, reply, token, body),
        }
    }

    fn execute_in_session(&mut self, now: Instant, reply: ReplyTo, token: Token, body: &RequestBody) -> Step {
        let Some((user, user_id)) = self.sessions.get(&token).map(|s| (s.user.clone(), s.user_id)) else {
            return Step::Answer(Err(ErrorCode::NotLoggedIn));
        };
        let answer = |r| Step::Answer(r);
        match body {
            RequestBody::Register { .. } | RequestBody::Login { .. } => unreachable!("handled before"),
            RequestBody::Logout => {
                self.close_session(token, false);
                if self.event(now) {
                    info!("{user} logged out");
                }
                // A retransmitted logout finds its reply under the token.
                answer(Ok(Response::LoggedOut))
            }
            RequestBody::Subscribe { user: target } => self.subscribe(&user, user_id, target),
            RequestBody::Unsubscribe { user: target } => self.unsubscribe(&user, user_id, target),
            RequestBody::Post { text } => self.post(now, &user, user_id, None, text),
            RequestBody::Send { to, text } => self.post(now, &user, user_id, Some(to), text),
            RequestBody::Retrieve { count, before } => self.retrieve(user_id, *count, *before),
            RequestBody::ListUsers { pattern, after } => self.list_users(pattern, after.as_deref()),
            RequestBody::Ping => {
                let epoch = self.sessions.get(&token).map_or(self.epoch, |s| s.epoch);
                answer(Ok(Response::SessionPong { epoch }))
            }
            RequestBody::WhoAmI => {
                let sessions = self.live.get(&user).map_or(0, |t| t.len() as u32);
                answer(Ok(Response::Me { user, sessions }))
            }
            RequestBody::Subscriptions { after } => self.relations(&user, after.as_deref()),
            RequestBody::DeleteAccount { password } => self.delete(now, reply, token, user, password),
        }
    }

    fn register(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        user: &str,
        password: &str,
        cookie: Option<&Cookie>,
    ) -> Step {
        if !self.cfg.allow_registration {
            return Step::Answer(Err(ErrorCode::RegistrationClosed));
        }
        if !proto::valid_name(user, self.cfg.max_name_len as usize) {
            return Step::Answer(Err(ErrorCode::InvalidName { max_len: self.cfg.max_name_len }));
        }
        let (min, max) = (self.cfg.min_password_len, self.cfg.max_password_len);
        if password.len() < min as usize || password.len() > max as usize {
            return Step::Answer(Err(ErrorCode::InvalidPassword { min_len: min, max_len: max }));
        }
        // An account is only ever made for an address that receives our answers: a registration
        // always needs a cookie (one round trip more, once per account), so spoofed ones cost
        // nothing, create nothing and learn nothing (not even whether the name is taken).
        if !self.proven(now, reply.to, cookie) {
            self.retry(now, reply);
            return Step::Later;
        }
        let mut needs = Vec::new();
        let Some(existing) = self.account(user, &mut needs) else { return Step::Need(needs) };
        if existing.is_some() || self.reserved.contains(user) {
            return Step::Answer(Err(ErrorCode::NameTaken { user: user.to_string() }));
        }
        if self.accounts + self.reserved.len() as u64 >= u64::from(self.cfg.max_accounts) {
            return Step::Answer(Err(ErrorCode::TooManyAccounts { max: self.cfg.max_accounts }));
        }
        // Each attempt that would cost a hash takes a token from the address's bucket.
        if let Err(wait) = self.register_by_addr.take(now, &Prefix::of(reply.to.ip())) {
            self.stats.registrations_throttled += 1;
            return Step::Answer(Err(rate_limited(wait)));
        }
        self.next_sweep.get_or_insert(now + super::SWEEP);
        let job = JobKind::Hash { password: password.to_string(), params: self.hash_params };
        match self.submit_job(now, job, Auth::Register { user: user.to_string(), reply }) {
            Ok(()) => {
                self.hashing(now, reply);
                self.reserved.insert(user.to_string());
                Step::Later
            }
            Err(e) => Step::Answer(Err(e)),
        }
    }

    /// Whether `cookie` proves that `from` receives what we send it.
    fn proven(&mut self, now: Instant, from: std::net::SocketAddr, cookie: Option<&Cookie>) -> bool {
        cookie.is_some_and(|c| self.cookies.check(now, self.rng.as_mut(), from, c))
    }

    /// Whether the password workers, or the store's reads, have more than they can start at
    /// once: from then on, only logins from proven addresses are taken on.
    fn under_load(&self) -> bool {
        self.auth.len() >= self.cfg.password_workers as usize || self.reads.in_flight() >= READS_UNDER_LOAD
    }

    /// Marks a login, registration or request waiting for a read as under way in the reply
    /// cache: its retransmissions are ignored rather than run again. Only a request that got
    /// this far has an entry.
    fn pending(&mut self, now: Instant, reply: ReplyTo) {
        if let Slot::Global(key) = reply.slot {
            self.replies.insert(now, key, super::Entry::Pending);
        }
    }

    /// As [`Server::pending`], for a request whose password job was submitted: it has earned
    /// its answer a place in the cache, refusals included.
    fn hashing(&mut self, now: Instant, reply: ReplyTo) {
        if let Slot::Global(key) = reply.slot {
            self.replies.insert(now, key, super::Entry::Hashing);
        }
    }

    fn login(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        user: &str,
        password: &str,
        cookie: Option<&Cookie>,
    ) -> Step {
        if password.len() > self.cfg.max_password_len as usize
            || !proto::valid_name(user, proto::MAX_NAME_LEN)
        {
            // No such account can exist; say so the same way, without hashing.
            return Step::Answer(Err(ErrorCode::BadCredentials));
        }
        if self.sessions.len() >= self.cfg.max_sessions as usize {
            // Full whoever logs in: say so before any hashing.
            self.stats.busy += 1;
            return Step::Answer(Err(ErrorCode::Busy));
        }
        let proven = self.proven(now, reply.to, cookie);
        let prefix = Prefix::of(reply.to.ip());
        // Throttled or cookie-less-under-load attempts cost nothing, not even a read.
        match self.limits.check(now, user, reply.to.ip(), proven, self.under_load()) {
            None | Some(Verdict::Go(_)) => {}
            Some(Verdict::Retry) => {
                self.retry(now, reply);
                return Step::Later;
            }
            Some(Verdict::Wait(wait)) => {
                self.stats.logins_throttled += 1;
                return Step::Answer(Err(rate_limited(wait)));
            }
        }
        let mut needs = Vec::new();
        if self.nodes.is_some() && self.reads.got(&Read::Account { name: user.to_string() }).is_none() {
            // Other nodes change accounts too (passwords, delivered marks): a login reads it.
            self.account_changed(user);
        }
        let Some(account) = self.account(user, &mut needs) else { return Step::Need(needs) };
        let known = account.as_ref().is_some_and(|a| login_limits::known(&a.known, prefix));
        let charged = match self.limits.admit(now, user, reply.to.ip(), proven, known, self.under_load()) {
            Verdict::Go(charged) => charged,
            Verdict::Retry => {
                self.retry(now, reply);
                return Step::Later;
            }
            Verdict::Wait(wait) => {
                self.stats.logins_throttled += 1;
                return Step::Answer(Err(rate_limited(wait)));
            }
        };
        self.next_sweep.get_or_insert(now + super::SWEEP);
        // An unknown user is verified against a dummy hash, so that it costs the same time as a
        // wrong password; the outcome is ignored.
        let hash = account.as_ref().map_or_else(|| self.dummy_hash.clone(), |a| a.password_hash.clone());
        let job = JobKind::Verify { password: password.to_string(), hash };
        let auth = Auth::Login { user: user.to_string(), reply, account, charged: charged.clone() };
        match self.submit_job(now, job, auth) {
            Ok(()) => {
                self.hashing(now, reply);
                Step::Later
            }
            Err(e) => {
                self.limits.refund(&charged);
                Step::Answer(Err(e))
            }
        }
    }

    /// Deleting one's account checks the password again: through the same limits as a login,
    /// and one check at a time per session, so a session (or a stolen token) is no faster a
    /// password oracle than the login.
    fn delete(&mut self, now: Instant, reply: ReplyTo, token: Token, user: String, password: &str) -> Step {
        let Some(s) = self.sessions.get(&token) else { return Step::Answer(Err(ErrorCode::NotLoggedIn)) };
        if s.password_job {
            return Step::Answer(Err(ErrorCode::Busy));
        }
        // From the session's proven address it counts as proven; from anywhere else it cannot
        // be (there is no cookie to show), and when the unproven allowance is gone it waits.
        let proven = s.verified && s.addr == Some(reply.to);
        let mut needs = Vec::new();
        let Some(account) = self.account(&user, &mut needs) else { return Step::Need(needs) };
        let Some(account) = account else { return Step::Answer(Err(ErrorCode::NotLoggedIn)) };
        let known = login_limits::known(&account.known, Prefix::of(reply.to.ip()));
        match self.limits.admit(now, &user, reply.to.ip(), proven, known, false) {
            Verdict::Go(_) => {}
            Verdict::Retry => {
                self.stats.logins_throttled += 1;
                let refill = Duration::from_secs(self.cfg.login_failures_per_user_refill_secs);
                return Step::Answer(Err(rate_limited(refill)));
            }
            Verdict::Wait(wait) => {
                self.stats.logins_throttled += 1;
                return Step::Answer(Err(rate_limited(wait)));
            }
        }
        self.next_sweep.get_or_insert(now + super::SWEEP);
        let slot = super::reply_cache::Key::Token(token, reply.id);
        let reply = ReplyTo { slot: Slot::Global(slot), ..reply };
        let job = JobKind::Verify { password: password.to_string(), hash: account.password_hash.clone() };
        match self.submit_job(now, job, Auth::Delete { user, reply, token }) {
            Ok(()) => {
                self.hashing(now, reply);
                if let Some(s) = self.sessions.get_mut(&token) {
                    s.password_job = true;
                }
                Step::Later
            }
            Err(e) => Step::Answer(Err(e)),
        }
    }

    /// Completes a register, login or delete once its password job has run. A login whose
    /// password was right goes on to read its catch-up ([`Job::Login`]).
    pub(super) fn finish_auth(
        &mut self,
        now: Instant,
        auth: Auth,
        outcome: PasswordOutcome,
    ) -> Option<(ReplyTo, Result<Response, ErrorCode>)> {
        match auth {
            Auth::Register { user, reply } => {
                self.reserved.remove(&user);
                let result = match outcome {
                    PasswordOutcome::Hashed(Some(password_hash)) => {
                        if self.event(now) {
                            info!("registered {user}");
                        }
                        self.account_changed(&user);
                        self.accounts += 1;
                        self.registering(&user, &reply);
                        self.write(Write::CreateAccount { user, password_hash });
                        Ok(Response::Registered)
                    }
                    _ => Err(ErrorCode::StorageUnavailable),
                };
                self.forget_error(reply, &result);
                Some((reply, result))
            }
            Auth::Login { user, reply, account, charged } => {
                let Some(account) = account.filter(|_| outcome == PasswordOutcome::Verified(true)) else {
                    let result = Err(ErrorCode::BadCredentials);
                    self.forget_error(reply, &result);
                    return Some((reply, result));
                };
                self.limits.refund(&charged);
                // This address now knows the password: the per-account brake is not for it
                // (written when the session opens, after its catch-up is read).
                let known = login_limits::remember(&account.known, charged.prefix());
                let remember = known != account.known;
                let account = Arc::new(AccountRecord { known, ..(*account).clone() });
                debug_assert_eq!(account.user, user);
                self.run(now, Job::Login { reply, account, remember });
                None
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
                Some((reply, result))
            }
        }
    }

    /// Drops the cache entry of a request answered with an error that says "try again" (the
    /// retransmission must run again). A refusal that cost a password hash stays: a lost
    /// "wrong password" retransmitted is answered, not hashed and counted a second time.
    pub(super) fn forget_error(&mut self, reply: ReplyTo, result: &Result<Response, ErrorCode>) {
        if let (Slot::Global(key), Err(e)) = (reply.slot, result) {
            if retry_runs_again(e) || self.replies.get(&key) != Some(&super::Entry::Hashing) {
                self.replies.remove(&key);
            }
        }
    }

    /// Opens a session for a login whose password was right, with what arrived while none of
    /// the user's sessions was there to receive it.
    fn open_session(
        &mut self,
        now: Instant,
        reply: ReplyTo,
        account: &AccountRecord,
        remember: bool,
    ) -> Step {
        let per_user = self.cfg.max_sessions_per_user;
        let user = account.user.clone();
        if self.live.get(&user).map_or(0, Vec::len) >= per_user as usize {
            return Step::Answer(Err(ErrorCode::TooManySessions { max: per_user }));
        }
        if self.sessions.len() >= self.cfg.max_sessions as usize {
            self.stats.busy += 1;
            return Step::Answer(Err(ErrorCode::Busy));
        }
        // Catch-up: the newest catch_up_max of what arrived since the last delivery.
        let last = self.delivered.get(&user).copied().unwrap_or(0).max(account.last_delivered);
        let mut needs = Vec::new();
        let Some((newest, missed)) =
            self.inbox(account.id, self.cfg.catch_up_max, None, Some(last), &mut needs)
        else {
            return Step::Need(needs);
        };
        let token = self.new_token();
        let mut s = Session::new(
            user.clone(),
            account.id,
            token.session_id(),
            self.epoch,
            Some(reply.to),
            now,
            self.cfg.push_rto(),
        );
        s.queue.extend(newest.into_iter().filter(|m| m.message.id > last));
        let catching_up = s.queue.len() as u32;
        if remember {
            self.update_account(&user, |a| a.known = account.known.clone());
            self.write(Write::KnownAddresses { user: user.clone(), known: account.known.clone() });
        }
        self.live.entry(user.clone()).or_default().push(token);
        self.sessions.insert(token, Box::new(s));
        self.stats.sessions_opened += 1;
        self.write(Write::OpenSession { token, user: user.clone() });
        self.hold(Held::Activate(token));
        self.schedule(token, now);
        if self.event(now) {
            info!("{user} logged in from {} ({missed} missed)", reply.to);
        }
        Step::Answer(Ok(Response::LoggedIn { token, missed, catching_up, epoch: self.epoch }))
    }

    /// Ends an account in memory; `store_it` unless the store already has (an admin command
    /// deleted it).
    pub(super) fn delete_account(&mut self, user: &str, store_it: bool) {
        for t in self.live.get(user).cloned().unwrap_or_default() {
            self.close_session(t, false);
        }
        self.delivered.remove(user);
        // It may be in any follower list.
        self.cache.remove_kind("followers");
        self.reads.changed_all();
        self.account_changed(user);
        if store_it {
            self.accounts = self.accounts.saturating_sub(1);
            self.write(Write::DeleteAccount { user: user.to_string() });
        }
        info!("deleted account {user}");
    }

    fn subscribe(&mut self, user: &str, user_id: u64, target: &str) -> Step {
        if target == user {
            return Step::Answer(Err(ErrorCode::CannotSubscribeToSelf));
        }
        if !proto::valid_name(target, proto::MAX_NAME_LEN) {
            return Step::Answer(Err(ErrorCode::NoSuchUser { user: target.to_string() }));
        }
        let mut needs = Vec::new();
        let exists = self.account(target, &mut needs);
        let follows = self.follows(user, target, &mut needs);
        let (Some(exists), Some((follows, following))) = (exists, follows) else { return Step::Need(needs) };
        if exists.is_none() {
            return Step::Answer(Err(ErrorCode::NoSuchUser { user: target.to_string() }));
        }
        if follows {
            return Step::Answer(Err(ErrorCode::AlreadySubscribed { user: target.to_string() }));
        }
        let max = self.cfg.max_subscriptions;
        if following >= max {
            return Step::Answer(Err(ErrorCode::TooManySubscriptions { max }));
        }
        self.relation_changed(user, user_id, target, true);
        self.write(Write::Subscribe { follower: user.to_string(), followed: target.to_string() });
        Step::Answer(Ok(Response::Subscribed))
    }

    fn unsubscribe(&mut self, user: &str, user_id: u64, target: &str) -> Step {
        if !proto::valid_name(target, proto::MAX_NAME_LEN) {
            return Step::Answer(Err(ErrorCode::NoSuchUser { user: target.to_string() }));
        }
        let mut needs = Vec::new();
        let exists = self.account(target, &mut needs);
        let follows = self.follows(user, target, &mut needs);
        let (Some(exists), Some((follows, _))) = (exists, follows) else { return Step::Need(needs) };
        if exists.is_none() {
            return Step::Answer(Err(ErrorCode::NoSuchUser { user: target.to_string() }));
        }
        if !follows {
            return Step::Answer(Err(ErrorCode::NotSubscribed { user: target.to_string() }));
        }
        self.relation_changed(user, user_id, target, false);
        self.write(Write::Unsubscribe { follower: user.to_string(), followed: target.to_string() });
        Step::Answer(Ok(Response::Unsubscribed))
    }

    /// A post (to the author's subscribers) or, with `to`, a direct message. The author pays
    /// for the work: each delivery takes a token from their budget (a post to many followers
    /// goes through and makes the next one wait), and a direct message to someone who does not
    /// follow the author takes one from the recipient's allowance of such messages, so nobody
    /// can fill a stranger's inbox.
    fn post(&mut self, now: Instant, user: &str, user_id: u64, to: Option<&String>, text: &str) -> Step {
        if text.is_empty() {
            return Step::Answer(Err(ErrorCode::EmptyText));
        }
        if text.len() > self.cfg.max_text_bytes as usize {
            return Step::Answer(Err(ErrorCode::TextTooLong { max: self.cfg.max_text_bytes }));
        }
        if let Some(c) = proto::forbidden_char(text) {
            return Step::Answer(Err(ErrorCode::InvalidText { code_point: c as u32 }));
        }
        let mut needs = Vec::new();
        // (name, account id) of each recipient, and whether a DM goes to a stranger.
        let (recipients, stranger): (Arc<Vec<(String, u64)>>, bool) = match to {
            Some(r) if !proto::valid_name(r, proto::MAX_NAME_LEN) => {
                return Step::Answer(Err(ErrorCode::NoSuchUser { user: r.clone() }))
            }
            Some(r) => {
                let account = self.account(r, &mut needs);
                let follows = self.follows(r, user, &mut needs);
                let (Some(account), Some((follows, _))) = (account, follows) else {
                    return Step::Need(needs);
                };
                let Some(account) = account else {
                    return Step::Answer(Err(ErrorCode::NoSuchUser { user: r.clone() }));
                };
                (Arc::new(vec![(r.clone(), account.id)]), !follows)
            }
            None => match self.followers(user, &mut needs) {
                Some(f) => (f, false),
                None => return Step::Need(needs),
            },
        };
        if stranger {
            if let Some(wait) = self.stranger_dms.blocked(now, &recipients[0].1) {
                self.stats.deliveries_throttled += 1;
                return Step::Answer(Err(rate_limited(wait)));
            }
        }
        if let Err(wait) = self.deliveries.charge(now, &user_id, recipients.len().max(1) as f64) {
            self.stats.deliveries_throttled += 1;
            return Step::Answer(Err(rate_limited(wait)));
        }
        if stranger {
            let _ = self.stranger_dms.take(now, &recipients[0].1);
        }
        self.next_sweep.get_or_insert(now + super::SWEEP);
        let id = self.new_message_id(now);
        let message = Message {
            id,
            time: self.unix_ms(now),
            author: user.to_string(),
            to: to.cloned(),
            text: text.to_string(),
        };
        let msg = Arc::new(EncodedMessage::new(message.clone()));
        let ids: Vec<u64> = recipients.iter().map(|(_, id)| *id).collect();
        self.delivered_to(&msg, &ids);
        self.write(Write::StoreMessage { message, recipients: ids });
        let n = recipients.len() as u32;
        self.hold(Held::Fanout(msg, recipients));
        Step::Answer(Ok(match to {
            Some(_) => Response::Sent { id },
            None => Response::Posted { id, recipients: n },
        }))
    }

    /// One page of the `count` newest inbox messages below `before`, oldest first.
    fn retrieve(&mut self, user_id: u64, count: u32, before: Option<u64>) -> Step {
        let max = self.cfg.max_retrieve;
        if count == 0 || count > max {
            return Step::Answer(Err(ErrorCode::CountOutOfRange { min: 1, max }));
        }
        let mut needs = Vec::new();
        let Some((inbox, _)) = self.inbox(user_id, count.min(RETRIEVE_PAGE), before, None, &mut needs) else {
            return Step::Need(needs);
        };
        let mut page: Vec<&Arc<EncodedMessage>> = Vec::new();
        let mut used = 0;
        // Set when the datagram is full before the count is reached: the client asks again
        // with `before` = the oldest id of this page.
        let mut more = false;
        for m in inbox.iter().rev() {
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
        Step::Answer(Ok(Response::Messages { messages, more }))
    }

    fn list_users(&mut self, pattern: &str, after: Option<&str>) -> Step {
        if !proto::valid_pattern(pattern) {
            return Step::Answer(Err(ErrorCode::InvalidPattern { max_len: proto::MAX_PATTERN_LEN as u32 }));
        }
        // Bound the work per request: scan at most SCAN names, then hand out a cursor.
        let mut needs = Vec::new();
        let Some(scanned) = self.names(after.unwrap_or(""), SCAN, &mut needs) else {
            return Step::Need(needs);
        };
        let mut names = Vec::new();
        let mut used = 0;
        let mut next = None;
        let mut last: Option<&String> = None;
        for name in &scanned {
            if !Self::page_fits(used, name.len() + 1) {
                next = last.cloned();
                break;
            }
            last = Some(name);
            if proto::wildcard_match(pattern, name) {
                used += name.len() + 1;
                names.push(name.clone());
            }
        }
        if next.is_none() && scanned.len() == SCAN as usize {
            next = scanned.last().cloned();
        }
        Step::Answer(Ok(Response::Users { names, next }))
    }

    /// One page of whom `user` follows and who follows them, in name order after `after`: a
    /// merge of two indexed reads from the cursor on, so a page costs what it holds, however
    /// many followers there are.
    fn relations(&mut self, user: &str, after: Option<&str>) -> Step {
        let mut needs = Vec::new();
        let Some(page) = self.relations_page(user, after.unwrap_or(""), RELATIONS_PAGE, &mut needs) else {
            return Step::Need(needs);
        };
        let mut entries: Vec<Relation> = Vec::new();
        let mut used = 0;
        let mut next = None;
        for r in &page {
            if !Self::page_fits(used, r.user.len() + 3) {
                next = entries.last().map(|r| r.user.clone());
                break;
            }
            used += r.user.len() + 3;
            entries.push(r.clone());
        }
        if next.is_none() && page.len() == RELATIONS_PAGE as usize {
            next = entries.last().map(|r| r.user.clone());
        }
        Step::Answer(Ok(Response::Relations { entries, next }))
    }
}

/// Reads in flight beyond which logins need a cookie (strangers may not make the store read at
/// will).
const READS_UNDER_LOAD: usize = 256;

/// "Too many attempts, retry in N s", N rounded up.
fn rate_limited(wait: Duration) -> ErrorCode {
    ErrorCode::RateLimited { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u32 }
}

/// Errors that tell the client to try again: its retransmission of the same request is run
/// again rather than answered from the reply cache.
pub(super) fn retry_runs_again(e: &ErrorCode) -> bool {
    matches!(e, ErrorCode::Busy | ErrorCode::StorageUnavailable | ErrorCode::RateLimited { .. })
}
