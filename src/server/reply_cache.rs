//! Replies kept for requests that no live session can remember: register and login (keyed by
//! source address, since the client has no token yet) and logout and account deletion (keyed by
//! the token that just stopped existing). Bounded in time and count; the oldest entry goes first.

use crate::proto::Token;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Addr(SocketAddr, u64),
    Token(Token, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Being executed (a password job or a commit is under way): retransmissions are ignored.
    Pending,
    /// The reply, which may leave once batch `.1` has committed.
    Done(Vec<u8>, u64),
}

#[derive(Debug)]
pub(crate) struct ReplyCache {
    ttl: Duration,
    max: usize,
    map: HashMap<Key, (Entry, Instant)>,
    /// Insertion order with expiry; entries whose map value has a different stamp are stale.
    order: VecDeque<(Instant, Key)>,
}

impl ReplyCache {
    pub fn new(ttl: Duration, max: usize) -> Self {
        ReplyCache { ttl, max, map: HashMap::new(), order: VecDeque::new() }
    }

    pub fn get(&self, key: &Key) -> Option<&Entry> {
        self.map.get(key).map(|(e, _)| e)
    }

    /// Inserts or replaces. A replaced entry keeps its original expiry (Pending -> Done happens
    /// within milliseconds), so every key has exactly one entry in `order`.
    pub fn insert(&mut self, now: Instant, key: Key, entry: Entry) {
        if let Some(slot) = self.map.get_mut(&key) {
            slot.0 = entry;
            return;
        }
        let expires = now + self.ttl;
        self.map.insert(key, (entry, expires));
        self.order.push_back((expires, key));
        // Evict the oldest finished entries. Entries still being executed stay (there are at
        // most as many as password jobs may be queued): evicting one would let a retransmission
        // run the request a second time.
        let mut skipped = 0;
        while self.map.len() > self.max && skipped < self.order.len() {
            let Some((t, old)) = self.order.pop_front() else { break };
            if matches!(self.map.get(&old), Some((Entry::Pending, _))) {
                self.order.push_back((t, old));
                skipped += 1;
            } else {
                self.map.remove(&old);
            }
        }
    }

    pub fn remove(&mut self, key: &Key) {
        // The order entry stays and is skipped when it expires.
        self.map.remove(key);
    }

    pub fn expire(&mut self, now: Instant) {
        while let Some(&(t, key)) = self.order.front() {
            if t > now {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|(_, e)| *e <= now) {
                self.map.remove(&key);
            }
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.order.front().map(|(t, _)| *t)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_time_and_count() {
        let t0 = Instant::now();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut c = ReplyCache::new(Duration::from_secs(10), 2);
        c.insert(t0, Key::Addr(addr, 1), Entry::Done(vec![0], 0));
        c.insert(t0, Key::Addr(addr, 2), Entry::Pending);
        c.insert(t0, Key::Addr(addr, 2), Entry::Done(vec![1], 0));
        assert_eq!(c.get(&Key::Addr(addr, 2)), Some(&Entry::Done(vec![1], 0)));
        c.insert(t0, Key::Addr(addr, 3), Entry::Done(vec![3], 0));
        assert_eq!(c.len(), 2);
        assert!(c.get(&Key::Addr(addr, 1)).is_none(), "oldest evicted");
        c.expire(t0 + Duration::from_secs(9));
        assert_eq!(c.len(), 2);
        c.expire(t0 + Duration::from_secs(10));
        assert_eq!(c.len(), 0);
        assert!(c.next_expiry().is_none() || c.map.is_empty());
    }

    #[test]
    fn pending_entries_are_never_evicted() {
        let t0 = Instant::now();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut c = ReplyCache::new(Duration::from_secs(10), 2);
        c.insert(t0, Key::Addr(addr, 1), Entry::Pending);
        for id in 2..10 {
            c.insert(t0, Key::Addr(addr, id), Entry::Done(vec![], 0));
        }
        assert_eq!(c.get(&Key::Addr(addr, 1)), Some(&Entry::Pending));
        assert_eq!(c.len(), 2);
    }
}
