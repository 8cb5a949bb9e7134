//! Token buckets: failed logins and registrations by account and source address, requests per
//! session, deliveries per author.
//!
//! A bucket holds up to `burst` tokens and regains one every `refill`. Keyed buckets live in a
//! bounded map ([`Throttle`]) that only an attempt which costs the daemon something (a password
//! hash) may add to. A bucket that has refilled completely is *idle*: it says nothing a missing
//! one would not, so idle buckets are the ones dropped, by [`Throttle::expire`] on a timer and
//! first whenever the map is full. Every bucket is idle `burst × refill` after its last use, so
//! filling the map with buckets that are not idle takes `max` paid attempts within that time
//! (65,536 argon2 hashes within 150 s with the defaults: more than the workers can do).
//!
//! Addresses are keyed by [`Prefix`]: an IPv4 address, or the /64 an IPv6 address is in (one
//! host usually holds a whole /64, so per-/128 keys would give it 2^64 fresh allowances).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn full(burst: u32, now: Instant) -> Bucket {
        Bucket { tokens: f64::from(burst), last: now }
    }

    fn refill(&mut self, now: Instant, burst: u32, refill: Duration) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        if refill.is_zero() {
            self.tokens = f64::from(burst);
        } else {
            self.tokens = (self.tokens + elapsed.as_secs_f64() / refill.as_secs_f64()).min(f64::from(burst));
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self, now: Instant, burst: u32, refill: Duration) -> Result<(), Duration> {
        self.charge(now, burst, refill, 1.0)
    }

    /// Takes `cost` tokens if at least one is there, going into debt for the rest (a post to
    /// many followers is allowed, and paid for by waiting longer before the next one); or says
    /// how long until one is available.
    pub fn charge(&mut self, now: Instant, burst: u32, refill: Duration, cost: f64) -> Result<(), Duration> {
        self.refill(now, burst, refill);
        if self.tokens >= 1.0 {
            self.tokens -= cost;
            Ok(())
        } else {
            Err(refill.mul_f64(1.0 - self.tokens))
        }
    }

    pub fn give_back(&mut self, burst: u32) {
        self.tokens = (self.tokens + 1.0).min(f64::from(burst));
    }

    /// How long until a token is available, if none is now. Takes nothing.
    pub fn blocked(&self, now: Instant, burst: u32, refill: Duration) -> Option<Duration> {
        let mut probe = *self;
        probe.take(now, burst, refill).err()
    }

    /// Whether it has refilled completely (it then says nothing a new bucket would not).
    pub fn idle(&self, now: Instant, burst: u32, refill: Duration) -> bool {
        let mut probe = *self;
        probe.refill(now, burst, refill);
        probe.tokens >= f64::from(burst)
    }
}

/// The part of a source address that throttles key on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Prefix {
    V4([u8; 4]),
    /// The first 64 bits.
    V6([u8; 8]),
}

impl Prefix {
    pub fn of(ip: IpAddr) -> Prefix {
        match ip {
            IpAddr::V4(v4) => Prefix::V4(v4.octets()),
            // A dual-stack socket sees IPv4 clients as ::ffff:a.b.c.d.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Prefix::V4(v4.octets()),
                None => Prefix::V6(v6.octets()[..8].try_into().expect("8 of 16 bytes")),
            },
        }
    }
}

/// Buckets by key, bounded in number.
#[derive(Debug)]
pub(crate) struct Throttle<K> {
    pub burst: u32,
    pub refill: Duration,
    max: usize,
    /// The bucket and the stamp of its newest entry in `order`.
    map: HashMap<K, (Bucket, u64)>,
    /// Keys by last use, oldest first; an entry whose stamp is not the map's is stale.
    order: VecDeque<(K, u64)>,
    stamp: u64,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    pub fn new(burst: u32, refill: Duration, max: usize) -> Self {
        Throttle { burst, refill, max, map: HashMap::new(), order: VecDeque::new(), stamp: 0 }
    }

    /// How long until `key` may try again, if it may not now. Takes nothing, adds nothing.
    pub fn blocked(&self, now: Instant, key: &K) -> Option<Duration> {
        self.map.get(key)?.0.blocked(now, self.burst, self.refill)
    }

    /// Takes a token for `key` (a failed attempt, or one that may fail): the only way a bucket
    /// is added.
    pub fn take(&mut self, now: Instant, key: &K) -> Result<(), Duration> {
        self.charge(now, key, 1.0)
    }

    /// Takes `cost` tokens for `key` (see [`Bucket::charge`]).
    pub fn charge(&mut self, now: Instant, key: &K, cost: f64) -> Result<(), Duration> {
        self.stamp += 1;
        let (burst, refill, stamp) = (self.burst, self.refill, self.stamp);
        let result = match self.map.get_mut(key) {
            Some(entry) => {
                entry.1 = stamp;
                entry.0.charge(now, burst, refill, cost)
            }
            None => {
                while self.map.len() >= self.max && self.evict_one(now) {}
                let mut bucket = Bucket::full(burst, now);
                let result = bucket.charge(now, burst, refill, cost);
                self.map.insert(key.clone(), (bucket, stamp));
                result
            }
        };
        self.order.push_back((key.clone(), stamp));
        if self.order.len() > 2 * self.map.len() + 16 {
            // Repeated use of the same keys, or buckets given back full, left stale entries
            // behind: keep the live ones. At least `map.len() + 16` pushes come between two
            // compactions, so each push pays O(1) for them.
            let map = &self.map;
            self.order.retain(|(k, s)| map.get(k).is_some_and(|(_, live)| live == s));
        }
        result
    }

    /// Returns a token taken for an attempt that succeeded.
    pub fn give_back(&mut self, key: &K) {
        let burst = self.burst;
        if let Some((b, _)) = self.map.get_mut(key) {
            b.give_back(burst);
            if b.tokens >= f64::from(burst) {
                // Full again: it says nothing a missing bucket would not, so a successful login
                // leaves no state behind. Its entry in `order` is stale from now on.
                self.map.remove(key);
            }
        }
    }

    /// Drops the least recently used bucket, preferring an idle one among the oldest few; false
    /// if there was none.
    fn evict_one(&mut self, now: Instant) -> bool {
        /// Live buckets looked at for an idle one, and entries scanned at most.
        const LOOK: usize = 8;
        const SCAN: usize = 64;
        let live =
            |map: &HashMap<K, (Bucket, u64)>, (k, s): &(K, u64)| map.get(k).is_some_and(|(_, l)| l == s);
        while self.order.front().is_some_and(|e| !live(&self.map, e)) {
            self.order.pop_front();
        }
        let mut oldest_live = None;
        let mut looked = 0;
        for i in 0..self.order.len().min(SCAN) {
            if looked == LOOK {
                break;
            }
            let e = &self.order[i];
            if !live(&self.map, e) {
                continue;
            }
            looked += 1;
            oldest_live.get_or_insert(i);
            if self.map[&e.0].0.idle(now, self.burst, self.refill) {
                oldest_live = Some(i);
                break;
            }
        }
        let Some(i) = oldest_live else {
            // Only stale entries near the front: compact, then the front is live (if any is).
            let map = &self.map;
            self.order.retain(|e| live(map, e));
            let Some((k, _)) = self.order.pop_front() else { return false };
            self.map.remove(&k);
            return true;
        };
        let (k, _) = self.order.remove(i).expect("in range");
        self.map.remove(&k);
        true
    }

    /// Drops the buckets that are idle by now, oldest use first (call it on a timer).
    pub fn expire(&mut self, now: Instant) {
        while let Some((k, s)) = self.order.front() {
            match self.map.get(k) {
                Some((b, live)) if live == s => {
                    if !b.idle(now, self.burst, self.refill) {
                        return;
                    }
                    let (k, _) = self.order.pop_front().expect("peeked");
                    self.map.remove(&k);
                }
                _ => {
                    self.order.pop_front();
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut t: Throttle<&str> = Throttle::new(3, Duration::from_secs(10), 100);
        for _ in 0..3 {
            assert!(t.take(t0, &"alice").is_ok());
        }
        assert_eq!(t.blocked(t0, &"alice"), Some(Duration::from_secs(10)));
        assert_eq!(t.take(t0, &"alice"), Err(Duration::from_secs(10)));
        assert_eq!(t.blocked(t0 + Duration::from_secs(4), &"alice"), Some(Duration::from_secs(6)));
        assert_eq!(t.blocked(t0 + Duration::from_secs(10), &"alice"), None);
        assert!(t.blocked(t0, &"bob").is_none(), "keys are independent");
        assert_eq!(t.len(), 1, "asking adds nothing");
        t.give_back(&"alice");
        assert_eq!(t.blocked(t0, &"alice"), None);
    }

    #[test]
    fn bounded() {
        let t0 = Instant::now();
        let mut t: Throttle<u32> = Throttle::new(1, Duration::from_secs(10), 10);
        for k in 0..1000 {
            let _ = t.take(t0, &k);
        }
        assert_eq!(t.len(), 10);
        assert!(t.order.len() <= 2 * 10 + 16);
    }

    /// Churning keys used to push out (first in, first out) the bucket of an address that was
    /// being throttled, giving it a fresh allowance. Idle buckets go first now.
    #[test]
    fn churn_evicts_idle_buckets_not_busy_ones() {
        let t0 = Instant::now();
        let mut t: Throttle<u32> = Throttle::new(2, Duration::from_secs(100), 4);
        // Key 0 is used up (an address guessing passwords).
        let _ = t.take(t0, &0);
        let _ = t.take(t0, &0);
        // Many others come and go: each attempt succeeds and gives its token back.
        let now = t0 + Duration::from_secs(1);
        for k in 1..1000u32 {
            let _ = t.take(now, &k);
            t.give_back(&k);
        }
        assert_eq!(t.len(), 1, "buckets given back full are dropped");
        assert!(t.blocked(now, &0).is_some(), "the busy bucket survived the churn");
        // Three others fail once (their buckets stay); by the time they have refilled (idle),
        // key 0 has not, and newcomers replace the idle ones.
        for k in 1..4u32 {
            let _ = t.take(now, &k);
        }
        assert_eq!(t.len(), 4);
        let later = now + Duration::from_secs(100);
        for k in 1000..1003u32 {
            let _ = t.take(later, &k);
        }
        assert_eq!(t.len(), 4);
        assert!(t.map.contains_key(&0), "the busy bucket survived the idle ones");
    }

    /// An attempt that succeeded gives its token back; a bucket full again is dropped, so
    /// successful logins leave no state behind, however many accounts and addresses log in.
    #[test]
    fn a_bucket_given_back_full_is_dropped() {
        let t0 = Instant::now();
        let mut t: Throttle<u32> = Throttle::new(3, Duration::from_secs(10), 1000);
        for k in 0..10_000u32 {
            t.take(t0, &k).unwrap();
            t.give_back(&k);
        }
        assert_eq!(t.len(), 0);
        assert!(t.order.len() <= 16, "stale entries are compacted: {}", t.order.len());
        // A bucket that is not full again stays.
        t.take(t0, &7).unwrap();
        t.take(t0, &7).unwrap();
        t.give_back(&7);
        assert_eq!(t.len(), 1);
        assert_eq!(t.map[&7].0.tokens, 2.0);
    }

    #[test]
    fn expire_drops_only_idle_buckets() {
        let t0 = Instant::now();
        let mut t: Throttle<u32> = Throttle::new(2, Duration::from_secs(10), 100);
        let _ = t.take(t0, &1);
        let _ = t.take(t0 + Duration::from_secs(5), &2);
        t.expire(t0 + Duration::from_secs(9));
        assert_eq!(t.len(), 2);
        t.expire(t0 + Duration::from_secs(10));
        assert_eq!(t.len(), 1, "1 refilled at 10 s");
        t.expire(t0 + Duration::from_secs(15));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn charge_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::full(10, t0);
        assert!(b.charge(t0, 10, Duration::from_secs(1), 25.0).is_ok());
        assert_eq!(b.blocked(t0, 10, Duration::from_secs(1)), Some(Duration::from_secs(16)));
        assert!(b.blocked(t0 + Duration::from_secs(16), 10, Duration::from_secs(1)).is_none());
    }

    #[test]
    fn ipv6_by_slash_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Prefix::of(a), Prefix::of(b));
        assert_ne!(Prefix::of(a), Prefix::of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(Prefix::of(mapped), Prefix::of("192.0.2.7".parse().unwrap()));
    }
}
