//! One logged-in session: its push address, the reliable push window and the request
//! de-duplication window.

use crate::proto::{self, EncodedMessage};
use crate::rtt::{RtoConfig, RttEstimator};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A push sent and not yet acknowledged.
#[derive(Debug)]
pub(crate) struct Inflight {
    pub seq: u64,
    pub msg: Arc<EncodedMessage>,
    pub first_sent: Instant,
    /// Transmissions since the last reset (a reset happens when a silent client is heard from).
    pub tries: u32,
    /// Karn's rule: only a push never retransmitted gives an RTT sample.
    pub retransmitted: bool,
    pub deadline: Instant,
}

/// What the de-duplication window says about a request id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Never executed: run it.
    New,
    /// Executed; the reply is cached (and released, if it waited for a commit).
    Replay(Vec<u8>),
    /// Executed (or too old to tell): drop silently. The client either already has the answer
    /// or will get it when the pending commit returns.
    Drop,
}

/// Number of request ids below the highest one that the window remembers.
const DEDUP_WINDOW: u64 = 64;
/// Replies kept per session for retransmitted requests.
const REPLY_SLOTS: usize = 4;
/// A session logs at most one line (at info or above) this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Which request ids a session has executed, and the last few replies.
///
/// Clients number their requests upwards. Like the IPsec anti-replay window, we keep the
/// highest id seen and a bitmap of the 64 below it; anything older is dropped, so a duplicate
/// that the network delivers late can never execute twice.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    highest: Option<u64>,
    bits: u64,
    /// (request id, encoded reply, batch that must commit before the reply may leave)
    replies: VecDeque<(u64, Vec<u8>, u64)>,
}

impl Dedup {
    /// Whether `id` is newer than every request executed so far (only such a request may start
    /// the validation of a new address).
    pub fn is_newest(&self, id: u64) -> bool {
        self.highest.is_none_or(|high| id > high)
    }

    pub fn check(&self, id: u64, committed_batch: u64) -> Seen {
        let Some(high) = self.highest else { return Seen::New };
        if id > high {
            return Seen::New;
        }
        let age = high - id;
        if age >= DEDUP_WINDOW {
            return Seen::Drop;
        }
        if self.bits & (1 << age) == 0 {
            return Seen::New;
        }
        match self.replies.iter().find(|(rid, _, _)| *rid == id) {
            Some((_, bytes, batch)) if *batch <= committed_batch => Seen::Replay(bytes.clone()),
            _ => Seen::Drop,
        }
    }

    /// Marks `id` as executed.
    pub fn mark(&mut self, id: u64) {
        match self.highest {
            None => {
                self.highest = Some(id);
                self.bits = 1;
            }
            Some(high) if id > high => {
                let shift = id - high;
                self.bits = if shift >= DEDUP_WINDOW { 0 } else { self.bits << shift };
                self.bits |= 1;
                self.highest = Some(id);
            }
            Some(high) => {
                let age = high - id;
                if age < DEDUP_WINDOW {
                    self.bits |= 1 << age;
                }
            }
        }
    }

    /// Forgets that `id` ran (its batch failed), so a retransmission executes it.
    pub fn forget(&mut self, id: u64) {
        if let Some(high) = self.highest {
            if id <= high && high - id < DEDUP_WINDOW {
                self.bits &= !(1 << (high - id));
            }
        }
        self.replies.retain(|(rid, _, _)| *rid != id);
    }

    /// After a restart: every id up to `id` counts as done (clients send one request at a
    /// time), and `id`'s reply is known.
    pub fn restore(&mut self, id: u64, reply: Vec<u8>) {
        self.highest = Some(id);
        self.bits = u64::MAX;
        self.replies.clear();
        self.replies.push_back((id, reply, 0));
    }

    pub fn remember(&mut self, id: u64, reply: Vec<u8>, batch: u64) {
        if self.replies.len() == REPLY_SLOTS {
            self.replies.pop_front();
        }
        self.replies.push_back((id, reply, batch));
    }
}

#[derive(Debug)]
pub(crate) struct Session {
    pub user: String,
    /// The account's id (its inbox in the store).
    pub user_id: u64,
    /// The newest message id delivered to this session without a gap (see [`Session::ack`]).
    pub delivered: u64,
    /// [`proto::Token::session_id`], carried by every push.
    pub id: u64,
    /// The epoch its pushes are numbered in: the daemon's run for a session opened or brought
    /// back here, a newer one for a session taken over from another node (see
    /// [`crate::store::Claimed`]).
    pub epoch: u32,
    /// Where pushes go; `None` after a restart until the client is heard from.
    pub addr: Option<SocketAddr>,
    pub created: Instant,
    /// How old the session already was when this run took it over from storage: its absolute
    /// lifetime counts across daemon restarts.
    pub age_at_start: Duration,
    pub last_seen: Instant,
    /// Pushes wait until the session's creation has been committed.
    pub live: bool,
    /// Pushes wait until a datagram carrying the token came from `addr`: a login from a spoofed
    /// address must not turn into a stream of pushes towards it.
    pub verified: bool,
    /// Acked pushes above the lowest unacked one: (seq, message id). Delivery is recorded only
    /// up to the first gap, so a lost push is never counted as delivered.
    pub acked_early: BTreeMap<u64, u64>,
    /// Set when a push exhausted its tries; cleared when the client is heard from again.
    pub unresponsive: bool,
    pub rtt: RttEstimator,
    pub next_seq: u64,
    pub inflight: VecDeque<Inflight>,
    pub queue: VecDeque<Arc<EncodedMessage>>,
    pub dedup: Dedup,
    /// Requests per second (config `session_requests_per_sec`, burst twice that).
    pub rate: super::throttle::Bucket,
    /// The earliest deadline this session has in the timer heap.
    pub scheduled: Option<Instant>,
    /// A new address the session was heard from, being validated ([`super::path`]).
    pub candidate: Option<Box<super::path::Candidate>>,
    /// An account deletion's password check is under way: one at a time per session.
    pub password_job: bool,
    /// When this session last wrote a log line at info or above (see [`Session::may_log`]).
    pub logged: Option<Instant>,
}

impl Session {
    pub fn new(
        user: String,
        user_id: u64,
        id: u64,
        epoch: u32,
        addr: Option<SocketAddr>,
        now: Instant,
        rto: RtoConfig,
    ) -> Self {
        Session {
            user,
            user_id,
            delivered: 0,
            id,
            epoch,
            verified: false,
            acked_early: BTreeMap::new(),
            addr,
            created: now,
            age_at_start: Duration::ZERO,
            last_seen: now,
            live: false,
            unresponsive: false,
            rtt: RttEstimator::new(rto),
            next_seq: 1,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            dedup: Dedup::default(),
            rate: super::throttle::Bucket::full(u32::MAX, now),
            scheduled: None,
            candidate: None,
            password_job: false,
            logged: None,
        }
    }

    /// Whether a line about this session may be logged now: one a minute at most, so that
    /// nobody can fill the log through one session.
    pub fn may_log(&mut self, now: Instant) -> bool {
        if self.logged.is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY) {
            return false;
        }
        self.logged = Some(now);
        true
    }

    /// Queues a message for pushing. When the queue is full the oldest queued message is
    /// dropped from the push path (it stays in the inbox for retrieve); returns whether one was.
    pub fn enqueue(&mut self, msg: Arc<EncodedMessage>, max_queue: usize) -> bool {
        self.queue.push_back(msg);
        if self.queue.len() > max_queue {
            self.queue.pop_front();
            return true;
        }
        false
    }

    /// Moves queued messages into the window and encodes them into `out` as (addr, datagram).
    pub fn pump(&mut self, now: Instant, window: usize, out: &mut impl FnMut(SocketAddr, Vec<u8>)) -> u64 {
        let Some(addr) = self.addr else { return 0 };
        if !self.live || self.unresponsive || !self.verified {
            return 0;
        }
        let (epoch, mut sent) = (self.epoch, 0);
        while self.inflight.len() < window && !self.queue.is_empty() {
            // As many queued messages as the window, the batch limit and one datagram allow.
            let room = (window - self.inflight.len()).min(proto::MAX_PUSH_BATCH);
            let (mut n, mut size) = (0, proto::PUSHES_OVERHEAD);
            for next in self.queue.iter().take(room) {
                if n > 0 && size + next.wire_len() > proto::MAX_DATAGRAM {
                    break;
                }
                size += next.wire_len();
                n += 1;
            }
            let first_seq = self.next_seq;
            self.next_seq += n as u64;
            let mut bytes = Vec::with_capacity(size);
            if n == 1 {
                proto::encode_push(self.id, epoch, first_seq, &self.queue[0], &mut bytes);
            } else {
                let msgs = self.queue.iter().take(n).map(|m| &**m);
                proto::encode_pushes(self.id, epoch, first_seq, msgs, &mut bytes);
            }
            out(addr, bytes);
            let deadline = now + self.rtt.backoff(1);
            for (seq, msg) in (first_seq..).zip(self.queue.drain(..n)) {
                self.inflight.push_back(Inflight {
                    seq,
                    msg,
                    first_sent: now,
                    tries: 1,
                    retransmitted: false,
                    deadline,
                });
                sent += 1;
            }
        }
        sent
    }

    /// Removes the acked push. `None` if it was not in flight; otherwise the newest message id
    /// now delivered without a gap before it (0 if the ack is ahead of a missing one).
    pub fn ack(&mut self, now: Instant, seq: u64) -> Option<u64> {
        let pos = self.inflight.iter().position(|p| p.seq == seq)?;
        let p = self.inflight.remove(pos)?;
        if !p.retransmitted {
            // Karn's rule: only exchanges sent once give an unambiguous sample.
            self.rtt.sample(now.saturating_duration_since(p.first_sent));
        }
        self.acked_early.insert(p.seq, p.msg.message.id);
        let floor = self.inflight.front().map_or(self.next_seq, |p| p.seq);
        let mut through = 0;
        while let Some((&s, &id)) = self.acked_early.first_key_value() {
            if s >= floor {
                break;
            }
            through = through.max(id);
            self.acked_early.pop_first();
        }
        Some(through)
    }

    /// When the session's absolute lifetime ends, counting the time it lived in earlier runs.
    pub fn lifetime_end(&self, max_lifetime: Duration) -> Instant {
        self.created + max_lifetime.saturating_sub(self.age_at_start)
    }

    /// Earliest moment something has to happen for this session, given its expiry.
    pub fn next_deadline(&self, expiry: Instant) -> Instant {
        let mut next = expiry;
        if self.live && !self.unresponsive && self.verified && self.addr.is_some() {
            for p in &self.inflight {
                next = next.min(p.deadline);
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_window() {
        let mut d = Dedup::default();
        assert_eq!(d.check(10, 0), Seen::New);
        d.mark(10);
        d.remember(10, vec![1], 0);
        assert_eq!(d.check(10, 0), Seen::Replay(vec![1]));
        assert_eq!(d.check(9, 0), Seen::New, "an older id not yet seen still runs");
        d.mark(9);
        assert_eq!(d.check(9, 0), Seen::Drop, "executed, reply not cached");
        assert_eq!(d.check(11, 0), Seen::New);
        d.mark(11);
        d.remember(11, vec![2], 5);
        assert_eq!(d.check(11, 4), Seen::Drop, "reply waits for batch 5");
        assert_eq!(d.check(11, 5), Seen::Replay(vec![2]));
        d.mark(11 + 200);
        assert_eq!(d.check(11, 5), Seen::Drop, "too old");
        assert_eq!(d.check(11 + 199, 5), Seen::New);
    }
}
