//! Receiving pushes: exactly once, in the order the server numbered them.
//!
//! Within one daemon run (an epoch) the server numbers the pushes of a session 1, 2, 3, ...
//! without gaps. Whatever the network does, we show `next` and anything buffered after it, drop
//! what we have shown already, and hold what arrives early until a retransmission fills the gap.
//!
//! When the daemon restarts, the session survives but numbering starts again at 1 in a higher
//! epoch: we follow it, and ignore stragglers from the old epoch. Messages the old run pushed
//! without learning of our ack may come again in the new epoch; a bounded memory of recently
//! shown message ids keeps them from being shown twice.
//!
//! A new epoch is followed only once the daemon named it in an answer to one of our own
//! requests ([`PushReceiver::confirm`]: the login, or a ping the client sends when a push of an
//! unknown epoch arrives). Until then such pushes wait, unacknowledged, so that one forged push
//! with a huge epoch cannot make us ignore every real one.

use crate::proto::Message;
use std::collections::{BTreeMap, HashSet, VecDeque};

/// Pushes held while an earlier one is missing. Larger than any server window.
const MAX_BUFFERED: usize = 4096;
/// Message ids remembered as shown.
const SHOWN_MEMORY: usize = 4096;

#[derive(Debug)]
pub(crate) struct PushReceiver {
    epoch: u32,
    next: u64,
    early: BTreeMap<u64, Message>,
    /// Pushes of epochs newer than `epoch` that no answer has confirmed yet.
    unconfirmed: BTreeMap<(u32, u64), Message>,
    shown: HashSet<u64>,
    shown_order: VecDeque<u64>,
}

impl Default for PushReceiver {
    fn default() -> Self {
        PushReceiver {
            epoch: 0,
            next: 1,
            early: BTreeMap::new(),
            unconfirmed: BTreeMap::new(),
            shown: HashSet::new(),
            shown_order: VecDeque::new(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushOutcome {
    /// These are now in order and should be shown.
    Ready(Vec<Message>),
    /// Arrived early; held.
    Buffered,
    /// Seen before (ack it again).
    Duplicate,
    /// No room to hold it: do not ack, the server will send it again.
    Full,
    /// From an earlier daemon run: ignore.
    Stale,
    /// From an epoch no answer has named yet: held, not acked; ask the daemon for its epoch.
    Unconfirmed,
}

impl PushReceiver {
    /// Starts over for a new session (after login), in the epoch the login's answer named.
    pub fn reset(&mut self, epoch: u32) {
        self.epoch = epoch;
        self.next = 1;
        self.early.clear();
        self.unconfirmed.clear();
    }

    /// The daemon said, in an answer to our request, that it numbers pushes in `epoch`: follow
    /// it if it is new. Returns what that releases: messages to show, and the (seq) of every
    /// held push of that epoch to ack.
    pub fn confirm(&mut self, epoch: u32) -> (Vec<Message>, Vec<u64>) {
        let (mut shown, mut acks) = (Vec::new(), Vec::new());
        if epoch <= self.epoch {
            return (shown, acks);
        }
        self.epoch = epoch;
        self.next = 1;
        self.early.clear();
        let held = std::mem::take(&mut self.unconfirmed);
        for ((e, seq), msg) in held {
            if e != epoch {
                continue; // an older run's, or forged
            }
            match self.receive(e, seq, msg) {
                PushOutcome::Ready(ms) => {
                    shown.extend(ms);
                    acks.push(seq);
                }
                PushOutcome::Buffered | PushOutcome::Duplicate => acks.push(seq),
                _ => {}
            }
        }
        (shown, acks)
    }

    pub fn receive(&mut self, epoch: u32, seq: u64, msg: Message) -> PushOutcome {
        if epoch < self.epoch {
            return PushOutcome::Stale;
        }
        if epoch > self.epoch {
            if self.unconfirmed.len() >= MAX_BUFFERED {
                return PushOutcome::Full;
            }
            self.unconfirmed.insert((epoch, seq), msg);
            return PushOutcome::Unconfirmed;
        }
        if seq < self.next || self.early.contains_key(&seq) {
            return PushOutcome::Duplicate;
        }
        if seq > self.next {
            if self.early.len() >= MAX_BUFFERED {
                return PushOutcome::Full;
            }
            self.early.insert(seq, msg);
            return PushOutcome::Buffered;
        }
        let mut ready = Vec::new();
        self.show(msg, &mut ready);
        self.next += 1;
        while let Some(m) = self.early.remove(&self.next) {
            self.show(m, &mut ready);
            self.next += 1;
        }
        if ready.is_empty() {
            return PushOutcome::Duplicate;
        }
        PushOutcome::Ready(ready)
    }

    fn show(&mut self, m: Message, ready: &mut Vec<Message>) {
        if !self.shown.insert(m.id) {
            return;
        }
        self.shown_order.push_back(m.id);
        if self.shown_order.len() > SHOWN_MEMORY {
            if let Some(old) = self.shown_order.pop_front() {
                self.shown.remove(&old);
            }
        }
        ready.push(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64) -> Message {
        Message { id, time: 0, author: "a".into(), to: None, text: id.to_string() }
    }

    #[test]
    fn in_order_once() {
        let mut r = PushReceiver::default();
        r.reset(1);
        assert_eq!(r.receive(1, 2, m(20)), PushOutcome::Buffered);
        assert_eq!(r.receive(1, 2, m(20)), PushOutcome::Duplicate);
        assert_eq!(r.receive(1, 1, m(10)), PushOutcome::Ready(vec![m(10), m(20)]));
        assert_eq!(r.receive(1, 1, m(10)), PushOutcome::Duplicate);
        assert_eq!(r.receive(1, 3, m(30)), PushOutcome::Ready(vec![m(30)]));
    }

    #[test]
    fn a_daemon_restart_starts_a_new_epoch() {
        let mut r = PushReceiver::default();
        r.reset(1);
        assert_eq!(r.receive(1, 1, m(10)), PushOutcome::Ready(vec![m(10)]));
        assert_eq!(r.receive(1, 2, m(11)), PushOutcome::Ready(vec![m(11)]));
        // The new run re-sends 11 (it never learned of the ack), then 12: held until an answer
        // names epoch 2.
        assert_eq!(r.receive(2, 1, m(11)), PushOutcome::Unconfirmed);
        assert_eq!(r.receive(2, 2, m(12)), PushOutcome::Unconfirmed);
        assert_eq!(r.confirm(2), (vec![m(12)], vec![1, 2]), "11 was shown already; both acked");
        assert_eq!(r.receive(2, 3, m(13)), PushOutcome::Ready(vec![m(13)]));
        assert_eq!(r.receive(1, 3, m(13)), PushOutcome::Stale);
    }

    /// One forged push with epoch u32::MAX used to make the client follow that epoch and drop
    /// every real push as stale.
    #[test]
    fn a_forged_epoch_is_not_followed_without_an_answer() {
        let mut r = PushReceiver::default();
        r.reset(3);
        assert_eq!(r.receive(u32::MAX, 1, m(666)), PushOutcome::Unconfirmed);
        assert_eq!(r.receive(3, 1, m(10)), PushOutcome::Ready(vec![m(10)]), "real pushes go on");
        // The daemon's answer names epoch 3 again: nothing of the forged epoch is released.
        assert_eq!(r.confirm(3), (vec![], vec![]));
        assert_eq!(r.receive(3, 2, m(11)), PushOutcome::Ready(vec![m(11)]));
    }
}
