//! What the core keeps of the store's data: accounts, follower lists and inbox heads, in one
//! least-recently-used cache under one memory budget (config `cache_bytes`).
//!
//! The core is the only writer (admin commands beside it make it drop everything), so it keeps
//! the cache right by writing through: every change it makes is applied to what is cached. A read
//! answered by the store reflects the state when the read was issued; if the core changed that
//! key meanwhile, the answer is used by the requests that waited for it but not cached (see
//! [`super::reads::Reads::changed`]).
//!
//! Sizes are estimates of the heap each entry holds (strings, vectors, the messages' encoded
//! bytes), so the budget bounds the cache's share of the daemon's memory, not its entry count. A
//! budget of zero caches nothing: every request then reads what it needs.

use crate::proto::EncodedMessage;
use crate::store::AccountRecord;
use lru::LruCache;
use std::collections::VecDeque;
use std::sync::Arc;

/// What an entry is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// An account by name (a cached `None` says there is none).
    Account(String),
    /// Who follows this user, with their account ids.
    Followers(String),
    /// The newest messages of this account's inbox.
    Inbox(u64),
}

/// The kinds of [`Key`], in the order of [`Key::index`].
const KINDS: [&str; 3] = ["account", "followers", "inbox"];

impl Key {
    pub fn kind(&self) -> &'static str {
        KINDS[self.index()]
    }

    fn index(&self) -> usize {
        match self {
            Key::Account(_) => 0,
            Key::Followers(_) => 1,
            Key::Inbox(_) => 2,
        }
    }
}

/// The newest messages of an inbox, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct InboxHead {
    pub messages: VecDeque<Arc<EncodedMessage>>,
    /// The inbox holds nothing older than these.
    pub complete: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum Value {
    Account(Option<Arc<AccountRecord>>),
    Followers(Arc<Vec<(String, u64)>>),
    Inbox(InboxHead),
}

/// Bytes an entry costs beyond its contents (map slot, list links, allocation headers).
const ENTRY_OVERHEAD: usize = 96;

impl Value {
    fn size(&self, key: &Key) -> usize {
        let key_size = match key {
            Key::Account(n) | Key::Followers(n) => n.len(),
            Key::Inbox(_) => 8,
        };
        ENTRY_OVERHEAD
            + key_size
            + match self {
                Value::Account(None) => 0,
                Value::Account(Some(a)) => 64 + a.user.len() + a.password_hash.len() + a.known.len(),
                Value::Followers(f) => 32 + f.iter().map(|(n, _)| n.len() + 40).sum::<usize>(),
                Value::Inbox(h) => {
                    32 + h.messages.iter().map(|m| m.wire_len() + m.message.text.len() + 128).sum::<usize>()
                }
            }
    }
}

/// Hits and misses by kind, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: std::collections::BTreeMap<&'static str, u64>,
    pub misses: std::collections::BTreeMap<&'static str, u64>,
    pub evictions: u64,
    pub bytes: usize,
    pub entries: usize,
}

/// The entries in least-recently-used order (the `lru` crate: a hash map threaded on a
/// doubly linked list, so a lookup is one hash and no allocation), under a byte budget.
pub(crate) struct Cache {
    budget: usize,
    used: usize,
    /// Each value with its size as counted in `used`.
    lru: LruCache<Key, (Value, usize)>,
    /// Hits and misses by [`Key::index`] (counted at every lookup, so not in maps).
    hits: [u64; 3],
    misses: [u64; 3],
    evictions: u64,
}

impl Cache {
    pub fn new(budget: usize) -> Cache {
        Cache { budget, used: 0, lru: LruCache::unbounded(), hits: [0; 3], misses: [0; 3], evictions: 0 }
    }

    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.shrink();
    }

    /// The entry for `key`, counted as a hit or a miss, and made the most recently used.
    pub fn get(&mut self, key: &Key) -> Option<&mut Value> {
        match self.lru.get_mut(key) {
            Some((value, _)) => {
                self.hits[key.index()] += 1;
                Some(value)
            }
            None => {
                self.misses[key.index()] += 1;
                None
            }
        }
    }

    /// The entry for `key` without counting or reordering (for write-through).
    pub fn peek_mut(&mut self, key: &Key) -> Option<&mut Value> {
        self.lru.peek_mut(key).map(|(value, _)| value)
    }

    /// Stores `value` under `key`, evicting the least recently used entries beyond the budget.
    pub fn put(&mut self, key: Key, value: Value) {
        let size = value.size(&key);
        if size > self.budget {
            self.remove(&key);
            return;
        }
        if let Some((_, old)) = self.lru.put(key, (value, size)) {
            self.used -= old;
        }
        self.used += size;
        self.shrink();
    }

    /// Re-measures an entry changed in place (write-through).
    pub fn resize(&mut self, key: &Key) {
        if let Some((value, size)) = self.lru.peek_mut(key) {
            let new = value.size(key);
            self.used = self.used - *size + new;
            *size = new;
        }
        self.shrink();
    }

    pub fn remove(&mut self, key: &Key) {
        if let Some((_, size)) = self.lru.pop(key) {
            self.used -= size;
        }
    }

    /// Drops every entry of a kind (e.g. all follower lists, when an account that may be in any
    /// of them is deleted).
    pub fn remove_kind(&mut self, kind: &'static str) {
        let gone: Vec<Key> =
            self.lru.iter().filter(|(k, _)| k.kind() == kind).map(|(k, _)| k.clone()).collect();
        for k in gone {
            self.remove(&k);
        }
    }

    pub fn clear(&mut self) {
        self.lru.clear();
        self.used = 0;
    }

    fn shrink(&mut self) {
        while self.used > self.budget {
            let Some((_, (_, size))) = self.lru.pop_lru() else { break };
            self.used -= size;
            self.evictions += 1;
        }
    }

    pub fn snapshot_stats(&self) -> CacheStats {
        let by_kind = |counts: &[u64; 3]| {
            KINDS.iter().zip(counts).filter(|(_, n)| **n > 0).map(|(k, n)| (*k, *n)).collect()
        };
        CacheStats {
            hits: by_kind(&self.hits),
            misses: by_kind(&self.misses),
            evictions: self.evictions,
            bytes: self.used,
            entries: self.lru.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> (Key, Value) {
        let record = AccountRecord {
            id: 1,
            user: name.into(),
            password_hash: "h".repeat(90),
            last_delivered: 0,
            known: Vec::new(),
        };
        (Key::Account(name.into()), Value::Account(Some(Arc::new(record))))
    }

    #[test]
    fn least_recently_used_goes_first_within_the_budget() {
        let one = account("a").1.size(&account("a").0);
        let mut c = Cache::new(3 * one);
        for n in ["a", "b", "c"] {
            let (k, v) = account(n);
            c.put(k, v);
        }
        assert!(c.get(&Key::Account("a".into())).is_some(), "a is used again");
        let (k, v) = account("d");
        c.put(k, v);
        assert!(c.peek_mut(&Key::Account("b".into())).is_none(), "b was the least recently used");
        for n in ["a", "c", "d"] {
            assert!(c.peek_mut(&Key::Account(n.into())).is_some(), "{n}");
        }
        let s = c.snapshot_stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (3, 3 * one, 1));
        assert_eq!(s.hits.get("account"), Some(&1));
        assert!(c.get(&Key::Inbox(9)).is_none());
        assert_eq!(c.snapshot_stats().misses.get("inbox"), Some(&1));
    }

    #[test]
    fn a_zero_budget_caches_nothing_and_kinds_go_together() {
        let mut c = Cache::new(0);
        let (k, v) = account("a");
        c.put(k.clone(), v);
        assert!(c.get(&k).is_none());
        let mut c = Cache::new(1 << 20);
        for n in ["a", "b"] {
            let (k, v) = account(n);
            c.put(k, v);
        }
        c.put(Key::Followers("a".into()), Value::Followers(Arc::new(vec![("b".into(), 2)])));
        c.remove_kind("account");
        let s = c.snapshot_stats();
        assert_eq!(s.entries, 1);
        assert_eq!(
            s.bytes,
            Value::Followers(Arc::new(vec![("b".into(), 2)])).size(&Key::Followers("a".into()))
        );
        c.clear();
        assert_eq!(c.snapshot_stats().bytes, 0);
    }
}
