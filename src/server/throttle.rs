//! Token buckets: failed logins per account and per source address, and requests per session.
//!
//! A bucket holds up to `burst` tokens and regains one every `refill`. Keyed buckets live in a
//! bounded map: when it is full, the least recently created bucket goes first (an attacker who
//! churns keys can only make us forget old limits, never grow memory).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
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
        self.refill(now, burst, refill);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
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
}

/// Buckets by key, bounded in number.
#[derive(Debug)]
pub(crate) struct Throttle<K> {
    pub burst: u32,
    pub refill: Duration,
    max: usize,
    map: HashMap<K, Bucket>,
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    pub fn new(burst: u32, refill: Duration, max: usize) -> Self {
        Throttle { burst, refill, max, map: HashMap::new(), order: VecDeque::new() }
    }

    /// How long until `key` may try again, if it may not now. Takes nothing.
    pub fn blocked(&mut self, now: Instant, key: &K) -> Option<Duration> {
        let b = self.map.get_mut(key)?;
        let mut probe = *b;
        probe.take(now, self.burst, self.refill).err()
    }

    /// Takes a token for `key` (a failed attempt, or one that may fail).
    pub fn take(&mut self, now: Instant, key: &K) -> Result<(), Duration> {
        if !self.map.contains_key(key) {
            while self.map.len() >= self.max {
                let Some(old) = self.order.pop_front() else { break };
                self.map.remove(&old);
            }
            self.map.insert(key.clone(), Bucket::full(self.burst, now));
            self.order.push_back(key.clone());
        }
        let (burst, refill) = (self.burst, self.refill);
        self.map.get_mut(key).expect("inserted").take(now, burst, refill)
    }

    /// Returns a token taken for an attempt that succeeded.
    pub fn give_back(&mut self, key: &K) {
        let burst = self.burst;
        if let Some(b) = self.map.get_mut(key) {
            b.give_back(burst);
        }
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
    }
}
