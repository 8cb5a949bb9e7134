//! Slowing password guessing without handing anyone a way to lock a user out (OWASP's
//! authentication cheat sheet: throttling must not become a denial of service).
//!
//! Every attempt that would cost a hash (a login, an account deletion) is admitted or not by
//! three token buckets, each a failure allowance that an attempt holds while it is checked and
//! gives back if the password was right:
//!
//! | bucket | key | stops |
//! |---|---|---|
//! | per address | source [`Prefix`] | one address guessing many names |
//! | per account and address | name, source prefix | one address guessing one name |
//! | per account | name; not applied to prefixes that logged in to the account before | many addresses guessing one name |
//!
//! Attempts on other addresses never use up the owner's allowance, and the per-account brake
//! does not apply to an address the owner has logged in from. Known and unknown names are
//! treated exactly alike: the buckets are keyed by the name as typed, whether or not an account
//! has it, so neither the answers nor the throttling tell which names exist.
//!
//! A source address can be spoofed, so each bucket exists twice: for attempts that carried a
//! valid [`crate::proto::Cookie`] (*proven*: the sender receives at that address) and for
//! those that did not. Spoofed attempts can only use up the unproven allowance; once it is gone
//! (or whenever the password workers are all busy) the answer is a cookie to retry with, which
//! costs a real client one round trip and a spoofer everything. Proven attempts that run out get
//! "too many attempts, retry in N s". A bucket is only created by an attempt that is about to
//! cost a hash.

use super::throttle::{Prefix, Throttle};
use crate::config::ServerConfig;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Keys tracked per bucket kind.
const KEYS: usize = 65_536;

/// Prefixes an account remembers as having logged in to it.
pub const KNOWN_ADDRESSES: usize = 8;

pub(crate) struct LoginLimits {
    by_addr: Throttle<(Prefix, bool)>,
    by_account_addr: Throttle<(String, Prefix, bool)>,
    by_account: Throttle<(String, bool)>,
}

/// What to do with an attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go ahead: the allowance it took, to give back if it succeeds.
    Go(Charged),
    /// Ask for a cookie first (nothing was taken).
    Retry,
    /// Refuse for this long (nothing was taken).
    Wait(Duration),
}

/// The tokens one admitted attempt holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Charged {
    name: String,
    prefix: Prefix,
    proven: bool,
    /// Whether the per-account brake was charged (the address was not a known one).
    account: bool,
}

impl Charged {
    pub fn prefix(&self) -> Prefix {
        self.prefix
    }
}

impl LoginLimits {
    pub fn new(cfg: &ServerConfig) -> LoginLimits {
        let mut l = LoginLimits {
            by_addr: Throttle::new(1, Duration::ZERO, KEYS),
            by_account_addr: Throttle::new(1, Duration::ZERO, KEYS),
            by_account: Throttle::new(1, Duration::ZERO, KEYS),
        };
        l.set_config(cfg);
        l
    }

    pub fn set_config(&mut self, cfg: &ServerConfig) {
        let secs = Duration::from_secs;
        self.by_addr.burst = cfg.login_failures_per_address_burst;
        self.by_addr.refill = secs(cfg.login_failures_per_address_refill_secs);
        self.by_account_addr.burst = cfg.login_failures_per_user_burst;
        self.by_account_addr.refill = secs(cfg.login_failures_per_user_refill_secs);
        self.by_account.burst = cfg.login_failures_per_account_burst;
        self.by_account.refill = secs(cfg.login_failures_per_account_refill_secs);
    }

    /// Whether an attempt on `name` from `ip` is stopped before anything is read for it: by the
    /// address's and the account-and-address allowances, or by load (the per-account brake
    /// needs the account's known addresses, so [`LoginLimits::admit`] decides that). Takes
    /// nothing.
    pub fn check(
        &self,
        now: Instant,
        name: &str,
        ip: IpAddr,
        proven: bool,
        under_load: bool,
    ) -> Option<Verdict> {
        if under_load && !proven {
            return Some(Verdict::Retry);
        }
        let prefix = Prefix::of(ip);
        let wait = [
            self.by_addr.blocked(now, &(prefix, proven)),
            self.by_account_addr.blocked(now, &(name.to_string(), prefix, proven)),
        ]
        .into_iter()
        .flatten()
        .max()?;
        Some(if proven { Verdict::Wait(wait) } else { Verdict::Retry })
    }

    /// Decides on an attempt on `name` from `ip`. `proven`: it carried a valid cookie;
    /// `known`: that address logged in to this account before; `under_load`: the password
    /// workers have more than they can start at once.
    pub fn admit(
        &mut self,
        now: Instant,
        name: &str,
        ip: IpAddr,
        proven: bool,
        known: bool,
        under_load: bool,
    ) -> Verdict {
        if under_load && !proven {
            return Verdict::Retry;
        }
        let prefix = Prefix::of(ip);
        let (addr_key, pair_key, account_key) =
            ((prefix, proven), (name.to_string(), prefix, proven), (name.to_string(), proven));
        let wait = [
            self.by_addr.blocked(now, &addr_key),
            self.by_account_addr.blocked(now, &pair_key),
            if known { None } else { self.by_account.blocked(now, &account_key) },
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = wait {
            return if proven { Verdict::Wait(wait) } else { Verdict::Retry };
        }
        let _ = self.by_addr.take(now, &addr_key);
        let _ = self.by_account_addr.take(now, &pair_key);
        if !known {
            let _ = self.by_account.take(now, &account_key);
        }
        Verdict::Go(Charged { name: name.to_string(), prefix, proven, account: !known })
    }

    /// The attempt succeeded (or was never checked): its tokens come back.
    pub fn refund(&mut self, c: &Charged) {
        self.by_addr.give_back(&(c.prefix, c.proven));
        self.by_account_addr.give_back(&(c.name.clone(), c.prefix, c.proven));
        if c.account {
            self.by_account.give_back(&(c.name.clone(), c.proven));
        }
    }

    /// Drops buckets that have refilled (on a timer).
    pub fn expire(&mut self, now: Instant) {
        self.by_addr.expire(now);
        self.by_account_addr.expire(now);
        self.by_account.expire(now);
    }

    /// Buckets held, all kinds.
    pub fn len(&self) -> usize {
        self.by_addr.len() + self.by_account_addr.len() + self.by_account.len()
    }
}

/// Whether `prefix` is among the known addresses encoded in `known` (see [`remember`]).
pub fn known(known: &[u8], prefix: Prefix) -> bool {
    decode(known).contains(&prefix)
}

/// `known` with `prefix` first (the newest), at most [`KNOWN_ADDRESSES`] kept, encoded for the
/// account's record: each a tag (4 or 6) and the prefix's 4 or 8 bytes.
pub fn remember(known: &[u8], prefix: Prefix) -> Vec<u8> {
    let mut list = decode(known);
    list.retain(|p| *p != prefix);
    list.insert(0, prefix);
    list.truncate(KNOWN_ADDRESSES);
    let mut out = Vec::new();
    for p in list {
        match p {
            Prefix::V4(b) => {
                out.push(4);
                out.extend_from_slice(&b);
            }
            Prefix::V6(b) => {
                out.push(6);
                out.extend_from_slice(&b);
            }
        }
    }
    out
}

fn decode(mut bytes: &[u8]) -> Vec<Prefix> {
    let mut out = Vec::new();
    loop {
        match bytes {
            [4, a, b, c, d, rest @ ..] => {
                out.push(Prefix::V4([*a, *b, *c, *d]));
                bytes = rest;
            }
            [6, rest @ ..] if rest.len() >= 8 => {
                out.push(Prefix::V6(rest[..8].try_into().expect("8 bytes")));
                bytes = &rest[8..];
            }
            _ => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ServerConfig {
        ServerConfig {
            login_failures_per_user_burst: 5,
            login_failures_per_user_refill_secs: 30,
            login_failures_per_address_burst: 20,
            login_failures_per_address_refill_secs: 3,
            login_failures_per_account_burst: 10,
            login_failures_per_account_refill_secs: 360,
            ..ServerConfig::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fail(l: &mut LoginLimits, now: Instant, name: &str, from: &str, proven: bool) -> Verdict {
        l.admit(now, name, ip(from), proven, false, false)
    }

    #[test]
    fn other_addresses_do_not_use_up_the_owners_allowance() {
        let t0 = Instant::now();
        let mut l = LoginLimits::new(&cfg());
        let mut admitted = 0;
        for i in 2..=9 {
            for _ in 0..5 {
                admitted += matches!(fail(&mut l, t0, "carol", &format!("127.0.0.{i}"), true), Verdict::Go(_))
                    as usize;
            }
        }
        assert_eq!(admitted, 10, "the per-account brake stops the spread-out guessing");
        // The owner's own address logged in to carol before: neither the brake nor the other
        // addresses' failures apply to it.
        for _ in 0..5 {
            assert!(matches!(l.admit(t0, "carol", ip("127.0.0.1"), true, true, false), Verdict::Go(_)));
        }
        assert!(matches!(l.admit(t0, "carol", ip("127.0.0.1"), true, true, false), Verdict::Wait(_)));
    }

    #[test]
    fn spoofed_attempts_only_cost_the_owner_a_cookie() {
        let t0 = Instant::now();
        let mut l = LoginLimits::new(&cfg());
        // A spoofer sends wrong passwords "from" the owner's address: no cookie, so unproven.
        for _ in 0..5 {
            assert!(matches!(fail(&mut l, t0, "carol", "127.0.0.1", false), Verdict::Go(_)));
        }
        assert_eq!(fail(&mut l, t0, "carol", "127.0.0.1", false), Verdict::Retry);
        // The owner, with the cookie the retry gives, is judged by the proven allowance.
        assert!(matches!(l.admit(t0, "carol", ip("127.0.0.1"), true, true, false), Verdict::Go(_)));
    }

    #[test]
    fn unknown_names_are_throttled_exactly_like_known_ones() {
        let t0 = Instant::now();
        let mut l = LoginLimits::new(&cfg());
        let mut seen = Vec::new();
        for name in ["carol", "nobody-has-this-name"] {
            let v: Vec<bool> =
                (0..7).map(|_| matches!(fail(&mut l, t0, name, "192.0.2.9", true), Verdict::Go(_))).collect();
            seen.push(v);
        }
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[0].iter().filter(|ok| **ok).count(), 5);
    }

    #[test]
    fn known_addresses_are_kept_newest_first_and_bounded() {
        let mut k = Vec::new();
        for i in 0..10u8 {
            k = remember(&k, Prefix::of(ip(&format!("192.0.2.{i}"))));
        }
        k = remember(&k, Prefix::of(ip("2001:db8::1")));
        assert!(known(&k, Prefix::of(ip("2001:db8::ffff"))), "the same /64");
        assert!(known(&k, Prefix::of(ip("192.0.2.9"))));
        assert!(!known(&k, Prefix::of(ip("192.0.2.0"))), "the oldest went");
        assert_eq!(decode(&k).len(), KNOWN_ADDRESSES);
        assert!(decode(&[4, 1, 2]).is_empty(), "a damaged list reads as empty");
    }

    #[test]
    fn a_success_gives_its_tokens_back_and_load_asks_for_cookies() {
        let t0 = Instant::now();
        let mut l = LoginLimits::new(&cfg());
        for _ in 0..20 {
            match fail(&mut l, t0, "dave", "192.0.2.1", true) {
                Verdict::Go(c) => l.refund(&c),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(l.admit(t0, "dave", ip("192.0.2.1"), false, false, true), Verdict::Retry);
        assert!(matches!(l.admit(t0, "dave", ip("192.0.2.1"), true, false, true), Verdict::Go(_)));
        l.expire(t0 + Duration::from_secs(3600));
        assert_eq!(l.len(), 0);
    }
}
