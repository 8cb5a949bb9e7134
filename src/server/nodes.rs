//! Several daemons on one shared store: what the core does differently when it is one node of
//! many ([`crate::store::Startup::node`]).
//!
//! - **Message ids** come from a hybrid logical clock ([`IdClock`]): microseconds since 2020 by
//!   the wall clock, never less than one more than the last id made or seen, with the node's
//!   number in the low [`NODE_BITS`] bits. Ids are unique without asking the store, and ordered
//!   by posting time across nodes (to within their clocks' skew; a message seen from another
//!   node is always older than the next one made here).
//! - **Sessions move**: a request whose token this node does not hold asks the store to take
//!   the session over ([`crate::store::Read::Claim`], throttled per address). The session comes
//!   back with its de-duplication window (its last reply), in a new push epoch, with the newest
//!   messages of its inbox queued: the client drops those it has shown already, so nothing is
//!   skipped whatever order the nodes committed in. Then the request runs as in any session
//!   (its address is validated first, as after a restart).
//! - **Other nodes' commits** arrive as [`Remote`] inputs ([`Server::on_remote`]): messages for
//!   sessions here (pushed like local ones), sessions that moved away (forgotten without a
//!   write: the row is the other node's now) or ended (their holders hear "session expired"),
//!   and changes that make cached accounts and follower lists stale. Inbox heads are cached only
//!   for users with a session here, the only ones whose deliveries this node hears of.
//! - **Races**: a registration another node won ([`Server::on_names_taken`]) is answered "name
//!   taken" instead of "registered" when its batch commits.

use super::reads::Step;
use super::throttle::{Prefix, Throttle};
use super::{Held, ReplyTo, Server, Session, Slot};
use crate::proto::{self, EncodedMessage, ErrorCode, ServerMsg, Token};
use crate::store::{Claimed, Read, ReadResult, Remote, Startup, StoredSession};
use log::{debug, info};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Low bits of a message id that hold the node number.
pub const NODE_BITS: u32 = 10;
/// 2020-01-01T00:00:00Z in microseconds since the Unix epoch: where the clock's ticks start.
pub const TICKS_FROM_US: u64 = 1_577_836_800_000_000;

/// Claims (store look-ups of tokens this node does not hold) per address prefix: a burst, and
/// one more every [`CLAIM_REFILL`]. A client that moves needs one; when a node dies, all its
/// clients behind one NAT move at once, so the burst is generous; a stranger spraying forged
/// tokens gets 20 look-ups a second (each one indexed read, in the store's slow lane).
pub(super) const CLAIM_BURST: u32 = 200;
pub(super) const CLAIM_REFILL: Duration = Duration::from_millis(50);
/// Address prefixes whose claims are tracked at once.
const CLAIM_KEYS: usize = 65_536;

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct IdClock {
    node: u64,
    /// The last tick used or seen.
    last: u64,
}

impl IdClock {
    /// For node `node`, above every id up to `floor`.
    pub fn new(node: u16, floor: u64) -> IdClock {
        IdClock { node: u64::from(node) & ((1 << NODE_BITS) - 1), last: floor >> NODE_BITS }
    }

    /// A new id at wall-clock time `unix_us`.
    pub fn next(&mut self, unix_us: u64) -> u64 {
        let tick = (self.last + 1).max(unix_us.saturating_sub(TICKS_FROM_US));
        self.last = tick;
        tick << NODE_BITS | self.node
    }

    /// An id made elsewhere: later ids here are larger.
    pub fn observe(&mut self, id: u64) {
        self.last = self.last.max(id >> NODE_BITS);
    }
}

/// State of a node of many.
pub(crate) struct Nodes {
    pub clock: IdClock,
    pub claims: Throttle<Prefix>,
    /// Registrations waiting for their batch: (batch, name, request id, address).
    pub registering: Vec<(u64, String, u64, std::net::SocketAddr)>,
}

impl Nodes {
    pub fn new(start: &Startup) -> Option<Nodes> {
        let node = start.node?;
        Some(Nodes {
            clock: IdClock::new(node, start.next_message_id.saturating_sub(1)),
            claims: Throttle::new(CLAIM_BURST, CLAIM_REFILL, CLAIM_KEYS),
            registering: Vec::new(),
        })
    }
}

impl Server {
    /// Whether this daemon is one node of several on a shared store.
    pub fn is_node(&self) -> bool {
        self.nodes.is_some()
    }

    /// A new message id.
    pub(super) fn new_message_id(&mut self, now: Instant) -> u64 {
        let us = self.unix_us(now);
        match self.nodes.as_mut() {
            Some(n) => {
                let id = n.clock.next(us);
                self.next_message_id = self.next_message_id.max(id + 1);
                id
            }
            None => {
                let id = self.next_message_id;
                self.next_message_id += 1;
                id
            }
        }
    }

    /// A request came with a token this node does not hold. On a shared store the session may
    /// be another node's (or a stopped node's): take it over, then run the request again as
    /// one of its own ([`Step::Rerun`]).
    pub(super) fn unknown_session(&mut self, now: Instant, reply: ReplyTo, token: Option<Token>) -> Step {
        let Some(t) = token else { return Step::Answer(Err(self.no_session_error(token))) };
        if self.sessions.contains_key(&t) {
            // Taken over while this request waited.
            return Step::Rerun;
        }
        if self.nodes.is_none() || self.expired.contains(&t) {
            return Step::Answer(Err(self.no_session_error(token)));
        }
        let read = Read::Claim { token: t, catch_up: self.cfg.catch_up_max };
        if let Some(r) = self.reads.got(&read) {
            return match &*r {
                ReadResult::Claimed(Some(c)) => {
                    self.adopt(now, c.clone());
                    Step::Rerun
                }
                _ => {
                    // Gone (expired, logged out, account deleted) or never was.
                    self.remember_expired(t);
                    Step::Answer(Err(ErrorCode::SessionExpired))
                }
            };
        }
        let n = self.nodes.as_mut().expect("checked");
        if n.claims.take(now, &Prefix::of(reply.to.ip())).is_err() {
            // Not "not logged in": the session may well be real (every client behind one NAT
            // moves at once when a node dies), and a client forgets a token it is told is
            // unknown. "Busy" keeps it, and its next request asks again.
            self.stats.claims_throttled += 1;
            return Step::Answer(Err(ErrorCode::Busy));
        }
        self.next_sweep.get_or_insert(now + super::SWEEP);
        Step::Need(vec![read])
    }

    /// Makes a session taken over from another node this node's.
    fn adopt(&mut self, now: Instant, c: Claimed) {
        let token = c.session.token;
        if self.sessions.contains_key(&token) {
            return;
        }
        self.expired.remove(&token);
        let user_id = c.session.user_id;
        // What was cached of its inbox may predate its stay elsewhere.
        self.inbox_changed(user_id);
        let s = self.session_from_store(now, c.session, c.epoch);
        let user = s.user.clone();
        self.sessions.insert(token, Box::new(s));
        self.live.entry(user.clone()).or_default().push(token);
        let s = self.sessions.get_mut(&token).expect("inserted");
        for m in c.catch_up {
            s.queue.push_back(Arc::new(EncodedMessage::new(m)));
        }
        self.stats.sessions_claimed += 1;
        if self.event(now) {
            info!("took over a session of {user} from another node");
        }
        self.schedule(token, now);
    }

    /// A session as the store had it; its address is learned (and validated) from its next
    /// datagram.
    pub(super) fn session_from_store(&self, now: Instant, stored: StoredSession, epoch: u32) -> Session {
        let mut s = Session::new(
            stored.user,
            stored.user_id,
            stored.token.session_id(),
            epoch,
            None,
            now,
            self.cfg.push_rto(),
        );
        s.live = true;
        s.age_at_start = Duration::from_secs(stored.age_secs);
        if let Some((id, reply)) = stored.last_reply {
            s.dedup.restore(id, reply);
        }
        s
    }

    fn remember_expired(&mut self, token: Token) {
        if self.expired_order.len() == super::EXPIRED_MEMORY {
            if let Some(old) = self.expired_order.pop_front() {
                self.expired.remove(&old);
            }
        }
        if self.expired.insert(token) {
            self.expired_order.push_back(token);
        }
    }

    /// Forgets a session without writing anything (the store already says it is not ours).
    fn forget_session(&mut self, token: Token, expired: bool) -> bool {
        let Some(s) = self.sessions.remove(&token) else { return false };
        self.unlink(&s.user, s.user_id, token);
        if expired {
            self.remember_expired(token);
        }
        true
    }

    /// Takes `token` out of its user's live sessions; on a shared store, the user's cached
    /// inbox head goes with the last one (this node no longer hears of its deliveries).
    pub(super) fn unlink(&mut self, user: &str, user_id: u64, token: Token) {
        let mut last = false;
        if let Some(tokens) = self.live.get_mut(user) {
            tokens.retain(|t| *t != token);
            if tokens.is_empty() {
                self.live.remove(user);
                last = true;
            }
        }
        if last && self.nodes.is_some() {
            self.inbox_changed(user_id);
        }
    }

    /// Feeds what other nodes committed (see the module documentation).
    pub fn on_remote(&mut self, now: Instant, remote: Remote) {
        match remote {
            Remote::Messages(list) => {
                let mut touched = Vec::new();
                for (m, recipients) in list {
                    if let Some(n) = self.nodes.as_mut() {
                        n.clock.observe(m.id);
                    }
                    for (_, id) in &recipients {
                        self.inbox_changed(*id);
                    }
                    self.stats.remote_messages += 1;
                    let msg = Arc::new(EncodedMessage::new(m));
                    self.fanout(&msg, &recipients, &mut touched);
                }
                touched.sort_unstable();
                touched.dedup();
                for token in touched {
                    self.pump(now, token);
                }
            }
            Remote::Moved(tokens) => {
                for t in tokens {
                    if self.forget_session(t, false) {
                        self.stats.sessions_moved_away += 1;
                        debug!("a session moved to another node");
                    }
                }
            }
            Remote::Ended(tokens) => {
                for t in tokens {
                    if self.forget_session(t, true) {
                        self.stats.sessions_ended_elsewhere += 1;
                    }
                }
            }
            Remote::Changed { created, deleted, changed, followers_of, all_followers } => {
                for name in &created {
                    self.account_changed(name);
                }
                for name in deleted.iter().chain(&changed) {
                    self.account_changed(name);
                }
                for name in &deleted {
                    self.delivered.remove(name);
                }
                self.accounts = (self.accounts + created.len() as u64).saturating_sub(deleted.len() as u64);
                for name in &followers_of {
                    self.followers_changed(name);
                }
                if all_followers {
                    self.cache.remove_kind("followers");
                    self.reads.changed_all();
                }
            }
        }
    }

    /// Registrations of the batch about to be reported committed that another node won: they
    /// are answered "name taken". Call before [`Server::on_committed`] for that batch.
    pub fn on_names_taken(&mut self, names: &[String]) {
        let Some(n) = self.nodes.as_mut() else { return };
        let lost: Vec<(String, u64, std::net::SocketAddr)> = n
            .registering
            .iter()
            .filter(|(_, name, _, _)| names.contains(name))
            .map(|(_, name, id, to)| (name.clone(), *id, *to))
            .collect();
        for (name, id, to) in lost {
            self.stats.names_taken_elsewhere += 1;
            self.accounts = self.accounts.saturating_sub(1);
            self.account_changed(&name);
            let bytes = proto::encode_server(&ServerMsg::Reply {
                id,
                result: Err(ErrorCode::NameTaken { user: name.clone() }),
            });
            for (_, h) in self.held.iter_mut() {
                if let Held::Reply(r, t, _) = h {
                    if r.id == id && r.to == to {
                        if let Slot::Global(key) = r.slot {
                            // Errors are not cached: a retransmission runs again (and finds
                            // the name taken).
                            self.replies.remove(&key);
                            r.slot = Slot::None;
                        }
                        t.bytes = bytes.clone();
                    }
                }
            }
            info!("registration of {name} lost the race to another node");
        }
    }

    /// Notes a registration of this turn, in case another node wins its name.
    pub(super) fn registering(&mut self, name: &str, reply: &ReplyTo) {
        let batch = self.gate().unwrap_or(self.open_batch);
        if let Some(n) = self.nodes.as_mut() {
            n.registering.push((batch, name.to_string(), reply.id, reply.to));
        }
    }

    /// Batch `n` is reported: its registrations are settled.
    pub(super) fn settled(&mut self, n: u64) {
        if let Some(nodes) = self.nodes.as_mut() {
            nodes.registering.retain(|(b, ..)| *b > n);
        }
    }

    /// The state as this core believes the store holds it, for when a commit failed and the
    /// store cannot be read (it is reconnecting): the sessions whose opening was committed, and
    /// those the failed batch closed.
    pub fn assumed_durable(&self) -> Startup {
        let activating: std::collections::HashSet<Token> = self
            .held
            .iter()
            .filter_map(|(_, h)| if let Held::Activate(t) = h { Some(*t) } else { None })
            .collect();
        let stored = |token: Token, s: &Session| StoredSession {
            token,
            user: s.user.clone(),
            user_id: s.user_id,
            last_delivered: s.delivered,
            age_secs: s.age_at_start.as_secs(),
            last_reply: None,
        };
        let mut sessions: Vec<StoredSession> = self
            .sessions
            .iter()
            .filter(|(t, s)| s.live && !activating.contains(*t))
            .map(|(t, s)| stored(*t, s))
            .collect();
        sessions.extend(self.closing.iter().map(|(_, t, s)| stored(*t, s)));
        Startup {
            sessions,
            next_message_id: self.next_message_id,
            accounts: self.accounts,
            epoch: self.epoch,
            node: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_per_node_and_follow_what_they_see() {
        let t0 = TICKS_FROM_US + 1_000_000;
        let mut a = IdClock::new(1, 0);
        let mut b = IdClock::new(2, 0);
        let (a1, a2) = (a.next(t0), a.next(t0));
        assert!(a2 > a1, "the same microsecond twice: the next tick");
        assert_eq!(a1 & 1023, 1);
        let b1 = b.next(t0);
        assert_ne!(b1, a1);
        // b's clock is a second behind; once it sees a's id its next is larger anyway.
        let ahead = a.next(t0 + 1_000_000);
        b.observe(ahead);
        let b2 = b.next(t0 - 1);
        assert!(b2 > ahead && b2 & 1023 == 2, "{b2} > {ahead}");
        // Never below what the store holds.
        let mut c = IdClock::new(3, ahead);
        assert!(c.next(0) > ahead);
        assert_eq!(IdClock::new(1024 + 5, 0).node, 5, "the node number is cut to its bits");
    }
}
