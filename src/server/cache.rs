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
use std::collections::{HashMap, VecDeque};
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

impl Key {
    pub fn kind(&self) -> &'static str {
        match self {
            Key::Account(_) => "account",
            Key::Followers(_) => "followers",
            Key::Inbox(_) => "inbox",
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

/// Bytes an entry costs beyond its contents (map slot, order record, allocation headers).
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

pub(crate) struct Cache {
    budget: usize,
    used: usize,
    map: HashMap<Key, (Value, usize, u64)>,
    /// Keys by last use, oldest first; a record whose stamp is not the entry's is stale.
    order: VecDeque<(Key, u64)>,
    stamp: u64,
    pub stats: CacheStats,
}

impl Cache {
    pub fn new(budget: usize) -> Cache {
        Cache {
            budget,
            used: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.shrink();
    }

    /// The entry for `key`, counted as a hit or a miss, and made the most recently used.
    pub fn get(&mut self, key: &Key) -> Option<&mut Value> {
        let kind = key.kind();
        if !self.map.contains_key(key) {
            *self.stats.misses.entry(kind).or_insert(0) += 1;
            return None;
        }
        *self.stats.hits.entry(kind).or_insert(0) += 1;
        self.stamp += 1;
        let stamp = self.stamp;
        self.order.push_back((key.clone(), stamp));
        self.compact();
        let entry = self.map.get_mut(key).expect("checked");
        entry.2 = stamp;
        Some(&mut entry.0)
    }

    /// The entry for `key` without counting or reordering (for write-through).
    pub fn peek_mut(&mut self, key: &Key) -> Option<&mut Value> {
        self.map.get_mut(key).map(|e| &mut e.0)
    }

    /// Stores `value` under `key`, evicting the least recently used entries beyond the budget.
    pub fn put(&mut self, key: Key, value: Value) {
        let size = value.size(&key);
        if size > self.budget {
            self.remove(&key);
            return;
        }
        self.stamp += 1;
        let stamp = self.stamp;
        if let Some((_, old, _)) = self.map.insert(key.clone(), (value, size, stamp)) {
            self.used -= old;
        }
        self.used += size;
        self.order.push_back((key, stamp));
        self.shrink();
        self.compact();
    }

    /// Re-measures an entry changed in place (write-through).
    pub fn resize(&mut self, key: &Key) {
        if let Some((value, size, _)) = self.map.get_mut(key) {
            let new = value.size(key);
            self.used = self.used - *size + new;
            *size = new;
        }
        self.shrink();
    }

    pub fn remove(&mut self, key: &Key) {
        if let Some((_, size, _)) = self.map.remove(key) {
            self.used -= size;
        }
    }

    /// Drops every entry of a kind (e.g. all follower lists, when an account that may be in any
    /// of them is deleted).
    pub fn remove_kind(&mut self, kind: &'static str) {
        let gone: Vec<Key> = self.map.keys().filter(|k| k.kind() == kind).cloned().collect();
        for k in gone {
            self.remove(&k);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.used = 0;
    }

    fn shrink(&mut self) {
        while self.used > self.budget {
            let Some((key, stamp)) = self.order.pop_front() else { break };
            if self.map.get(&key).is_some_and(|e| e.2 == stamp) {
                self.remove(&key);
                self.stats.evictions += 1;
            }
        }
    }

    /// Drops stale order records once they outnumber the entries.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|(k, s)| map.get(k).is_some_and(|e| e.2 == *s));
        }
    }

    pub fn snapshot_stats(&self) -> CacheStats {
        CacheStats { bytes: self.used, entries: self.map.len(), ..self.stats.clone() }
    }
}
