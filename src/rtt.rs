//! Retransmission timeout estimation after RFC 6298, shared by the daemon (pushes) and the
//! client (requests).
//!
//! SRTT and RTTVAR are updated from samples of exchanges that were transmitted exactly once
//! (Karn's rule: the caller does not sample an exchange that was retransmitted, since the ack
//! could belong to any of its copies). RTO = SRTT + max(G, 4·RTTVAR), clamped to
//! `[min, max]`; each retransmission of the same exchange doubles it, again up to `max`.

use std::time::Duration;

/// Bounds and starting point of the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtoConfig {
    /// Timeout before the first sample.
    pub initial: Duration,
    /// Floor: never retransmit sooner than this.
    pub min: Duration,
    /// Cap, also for the backed-off timeout.
    pub max: Duration,
}

/// Clock granularity term of RFC 6298 (G).
const GRANULARITY: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub struct RttEstimator {
    cfg: RtoConfig,
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimator {
    pub fn new(cfg: RtoConfig) -> Self {
        RttEstimator { cfg, srtt: None, rttvar: Duration::ZERO }
    }

    /// Feed one round-trip sample (only from exchanges sent once).
    pub fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                // RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|; SRTT = 7/8 SRTT + 1/8 R
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The current timeout for a first transmission.
    pub fn rto(&self) -> Duration {
        let raw = match self.srtt {
            None => self.cfg.initial,
            Some(srtt) => srtt + (self.rttvar * 4).max(GRANULARITY),
        };
        raw.clamp(self.cfg.min, self.cfg.max)
    }

    /// Timeout after the `tries`-th transmission (1 = first): RTO doubled per retransmission.
    pub fn backoff(&self, tries: u32) -> Duration {
        let shift = tries.saturating_sub(1).min(20);
        self.rto().saturating_mul(1 << shift).min(self.cfg.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RtoConfig {
        RtoConfig {
            initial: Duration::from_millis(1000),
            min: Duration::from_millis(200),
            max: Duration::from_millis(8000),
        }
    }

    #[test]
    fn initial_and_backoff() {
        let e = RttEstimator::new(cfg());
        assert_eq!(e.rto(), Duration::from_millis(1000));
        assert_eq!(e.backoff(1), Duration::from_millis(1000));
        assert_eq!(e.backoff(2), Duration::from_millis(2000));
        assert_eq!(e.backoff(3), Duration::from_millis(4000));
        assert_eq!(e.backoff(4), Duration::from_millis(8000));
        assert_eq!(e.backoff(10), Duration::from_millis(8000), "capped");
        assert_eq!(e.backoff(u32::MAX), Duration::from_millis(8000));
    }

    #[test]
    fn samples_follow_rfc6298() {
        let mut e = RttEstimator::new(cfg());
        e.sample(Duration::from_millis(100));
        // SRTT = 100, RTTVAR = 50 -> RTO = 100 + 200 = 300
        assert_eq!(e.rto(), Duration::from_millis(300));
        e.sample(Duration::from_millis(100));
        // RTTVAR = 37.5, SRTT = 100 -> 250
        assert_eq!(e.rto(), Duration::from_micros(250_000));
        for _ in 0..50 {
            e.sample(Duration::from_micros(50));
        }
        assert_eq!(e.rto(), Duration::from_millis(200), "clamped to the floor");
        for _ in 0..50 {
            e.sample(Duration::from_secs(30));
        }
        assert_eq!(e.rto(), Duration::from_millis(8000), "clamped to the cap");
    }
}
