//! Stateless proofs of return routability (WireGuard's cookie reply, QUIC's Retry token, DTLS's
//! HelloVerifyRequest): before a login or registration may cost a password hash, or create an
//! account, the daemon may ask the client to repeat it with a [`Cookie`] it sent to the request's
//! source address. Only a sender that receives datagrams at that address can echo it, so a
//! spoofed source address never gets past this point.
//!
//! The cookie is a MAC (keyed BLAKE2s, truncated to 128 bits) of the source address and port
//! under a random secret. The secret is replaced every [`ROTATE`]; a cookie made under the
//! current or the previous secret is accepted, so a cookie lives between two and four minutes.
//! The daemon keeps nothing per cookie: two secrets in all.

use crate::proto::Cookie;
use blake2::digest::{consts::U16, KeyInit, Mac};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How often the secret changes.
pub const ROTATE: Duration = Duration::from_secs(120);

type CookieMac = blake2::Blake2sMac<U16>;

pub(crate) struct Cookies {
    current: [u8; 32],
    previous: Option<[u8; 32]>,
    /// When `current` was made (None: not yet; made at first use).
    since: Option<Instant>,
}

impl Cookies {
    pub fn new() -> Cookies {
        Cookies { current: [0; 32], previous: None, since: None }
    }

    /// Rotates the secrets as time requires.
    fn rotate(&mut self, now: Instant, rng: &mut dyn rand::Rng) {
        match self.since {
            Some(t) if now.saturating_duration_since(t) < ROTATE => {}
            Some(t) if now.saturating_duration_since(t) < 2 * ROTATE => {
                self.previous = Some(self.current);
                rng.fill_bytes(&mut self.current);
                self.since = Some(t + ROTATE);
            }
            _ => {
                self.previous = None;
                rng.fill_bytes(&mut self.current);
                self.since = Some(now);
            }
        }
    }

    /// The cookie for `addr` now.
    pub fn make(&mut self, now: Instant, rng: &mut dyn rand::Rng, addr: SocketAddr) -> Cookie {
        self.rotate(now, rng);
        mac(&self.current, addr)
    }

    /// Whether `cookie` was made for `addr` within the last two rotations.
    pub fn check(
        &mut self,
        now: Instant,
        rng: &mut dyn rand::Rng,
        addr: SocketAddr,
        cookie: &Cookie,
    ) -> bool {
        self.rotate(now, rng);
        let ok = |secret: &[u8; 32]| ct_eq(&mac(secret, addr).0, &cookie.0);
        ok(&self.current) | self.previous.as_ref().is_some_and(ok)
    }
}

fn mac(secret: &[u8; 32], addr: SocketAddr) -> Cookie {
    let mut m = <CookieMac as KeyInit>::new_from_slice(secret).expect("32-byte key");
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    m.update(&ip);
    m.update(&addr.port().to_be_bytes());
    Cookie(m.finalize().into_bytes().into())
}

fn ct_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn bound_to_the_address_and_to_four_minutes_at_most() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut c = Cookies::new();
        let t0 = Instant::now();
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        let cookie = c.make(t0, &mut rng, a);
        assert!(c.check(t0, &mut rng, a, &cookie));
        assert!(!c.check(t0, &mut rng, b, &cookie), "another port");
        assert!(!c.check(t0, &mut rng, "192.0.2.2:4000".parse().unwrap(), &cookie), "another host");
        let mut flipped = cookie;
        flipped.0[3] ^= 1;
        assert!(!c.check(t0, &mut rng, a, &flipped));
        // Accepted through the next rotation, refused after the one after.
        assert!(c.check(t0 + ROTATE + Duration::from_secs(1), &mut rng, a, &cookie));
        assert!(c.check(t0 + 2 * ROTATE - Duration::from_millis(1), &mut rng, a, &cookie));
        assert!(!c.check(t0 + 2 * ROTATE + Duration::from_secs(1), &mut rng, a, &cookie));
        // A daemon idle for a long time starts afresh.
        let fresh = c.make(t0 + 100 * ROTATE, &mut rng, a);
        assert!(c.check(t0 + 100 * ROTATE, &mut rng, a, &fresh));
        assert!(!c.check(t0 + 100 * ROTATE, &mut rng, a, &cookie));
    }
}
