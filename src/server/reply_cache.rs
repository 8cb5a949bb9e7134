//! Replies kept for requests that no live session can remember: register and login (keyed by
//! source address, since the client has no token yet) and logout and account deletion (keyed by
//! the token that just stopped existing). Bounded in time and count; the oldest entry goes first.
//!
//! Only requests that earned it get an entry: a login or registration whose password job was
//! submitted (it passed validation, the throttles and, when asked for, the address cookie), a
//! logout or deletion of a live session. Nothing is inserted for a datagram that is then
//! refused, so junk cannot grow the cache or its bookkeeping.

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
    /// Being executed (waiting for a read or a commit): retransmissions are ignored.
    Pending,
    /// Its password job was submitted: retransmissions are ignored, and the answer is kept
    /// even when it is a refusal (a lost "wrong password" is not hashed and counted again).
    Hashing,
    /// The reply, which may leave once batch `.1` has committed.
    Done(Vec<u8>, u64),
}

#[derive(Debug)]
pub(crate) struct ReplyCache {
    ttl: Duration,
    max: usize,
    /// Entry, expiry and the stamp of its record in `order`.
    map: HashMap<Key, (Entry, Instant, u64)>,
    /// Insertion order with expiry. A record whose stamp is not its key's current one is stale
    /// (the entry was removed, or removed and inserted again): it never touches the map.
    order: VecDeque<(Instant, Key, u64)>,
    stamp: u64,
}

impl ReplyCache {
    pub fn new(ttl: Duration, max: usize) -> Self {
        ReplyCache { ttl, max, map: HashMap::new(), order: VecDeque::new(), stamp: 0 }
    }

    pub fn get(&self, key: &Key) -> Option<&Entry> {
        self.map.get(key).map(|(e, _, _)| e)
    }

    fn is_live(&self, key: &Key, stamp: u64) -> bool {
        self.map.get(key).is_some_and(|(_, _, s)| *s == stamp)
    }

    /// Inserts or replaces. A replaced entry keeps its original expiry (Pending -> Done happens
    /// within milliseconds), so every key has exactly one live record in `order`.
    pub fn insert(&mut self, now: Instant, key: Key, entry: Entry) {
        if let Some(slot) = self.map.get_mut(&key) {
            slot.0 = entry;
            return;
        }
        let expires = now + self.ttl;
        self.stamp += 1;
        self.map.insert(key, (entry, expires, self.stamp));
        self.order.push_back((expires, key, self.stamp));
        // Evict the oldest finished entries. Entries still being executed stay (there are at
        // most as many as password jobs may be queued): evicting one would let a retransmission
        // run the request a second time.
        let mut skipped = 0;
        while self.map.len() > self.max && skipped < self.order.len() {
            let Some((t, old, stamp)) = self.order.pop_front() else { break };
            if !self.is_live(&old, stamp) {
                continue;
            }
            if matches!(self.map.get(&old), Some((Entry::Pending | Entry::Hashing, _, _))) {
                self.order.push_back((t, old, stamp));
                skipped += 1;
            } else {
                self.map.remove(&old);
            }
        }
    }

    pub fn remove(&mut self, key: &Key) {
        self.map.remove(key);
        // Its record is stale now; drop such records once they outnumber the live ones.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|(_, k, s)| map.get(k).is_some_and(|(_, _, live)| live == s));
        }
    }

    pub fn expire(&mut self, now: Instant) {
        while let Some(&(t, key, stamp)) = self.order.front() {
            if t > now {
                break;
            }
            self.order.pop_front();
            if self.is_live(&key, stamp) {
                self.map.remove(&key);
            }
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.order.front().map(|(t, _, _)| *t)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Records kept, live and stale (for tests of the bookkeeping's bound).
    #[cfg(test)]
    pub fn records(&self) -> usize {
        self.order.len()
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

    /// Inserting and removing used to leave one record per key behind until its TTL.
    #[test]
    fn removed_entries_leave_no_records_behind() {
        let t0 = Instant::now();
        let mut c = ReplyCache::new(Duration::from_secs(60), 16);
        for id in 0..150_000u64 {
            let key = Key::Token(Token([id as u8; 16]), id);
            c.insert(t0, key, Entry::Pending);
            c.remove(&key);
        }
        assert_eq!(c.len(), 0);
        assert!(c.records() <= 64 + 1, "{} records kept", c.records());
    }

    /// A stale record of a key removed and inserted again must not expire (or evict) the new
    /// entry early.
    #[test]
    fn a_stale_record_does_not_touch_a_fresh_entry_under_the_same_key() {
        let t0 = Instant::now();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let key = Key::Addr(addr, 7);
        let mut c = ReplyCache::new(Duration::from_secs(10), 16);
        c.insert(t0, key, Entry::Done(vec![1], 0));
        c.remove(&key);
        c.insert(t0 + Duration::from_secs(5), key, Entry::Done(vec![2], 0));
        c.expire(t0 + Duration::from_secs(10));
        assert_eq!(c.get(&key), Some(&Entry::Done(vec![2], 0)), "the old record expired the new entry");
        c.expire(t0 + Duration::from_secs(15));
        assert_eq!(c.get(&key), None);

        // Eviction: the oldest record is the removed entry's; the fresh one under its key stays.
        let mut c = ReplyCache::new(Duration::from_secs(10), 2);
        let (b, d) = (Key::Addr(addr, 8), Key::Addr(addr, 9));
        c.insert(t0, key, Entry::Done(vec![1], 0));
        c.remove(&key);
        c.insert(t0, b, Entry::Done(vec![3], 0));
        c.insert(t0, key, Entry::Done(vec![2], 0));
        c.insert(t0, d, Entry::Done(vec![4], 0));
        assert_eq!(c.get(&key), Some(&Entry::Done(vec![2], 0)), "eviction removed the fresh entry");
        assert_eq!(c.get(&b), None, "the oldest live entry goes");
    }
}
