//! A sans-IO, seeded model of a faulty network path, after Linux `netem`.
//!
//! [`Netem`] stands for one direction of a path. It owns no socket and reads no clock: the
//! caller hands it datagrams with [`Netem::send`] together with the current time, asks
//! [`Netem::poll_timeout`] when the next one is due, and collects due datagrams with
//! [`Netem::poll_deliver`]. The same type therefore drives both the simulated network of the
//! deterministic test harness (on a virtual clock) and the `udpmsg-proxy` binary (on
//! `Instant::now()`).
//!
//! # The model
//!
//! Each datagram passed to [`Netem::send`] goes through these steps, configured by a
//! [`FaultConfig`]:
//!
//! 1. **Loss**: with probability `loss` it is dropped and nothing else happens.
//! 2. **Duplication**: with probability `duplicate` a second copy is made. The two copies are
//!    delayed independently (steps 3 and 4), so the duplicate may arrive first.
//! 3. **Delay and jitter**: each copy is due `delay + U(0, jitter)` after it was sent. As in
//!    `netem`, jitter alone already reorders datagrams sent closer together than `jitter`.
//! 4. **Reordering**: with probability `reorder` a copy is held back by a further
//!    `U(0, reorder_window)`, so datagrams sent after it within that window overtake it.
//!
//! Due copies come out of [`Netem::poll_deliver`] in order of due time; copies due at the same
//! instant come out in the order they were enqueued (FIFO), so a fault-free path with a constant
//! delay preserves order exactly. Nothing is ever delivered before its due time.
//!
//! # Determinism
//!
//! All randomness comes from a [`StdRng`] seeded by the caller, and every call to `send` draws
//! the same fixed number of values whatever the configuration and whatever happens to the
//! datagram. The same seed, configuration and sequence of calls thus give exactly the same
//! deliveries, and changing, say, the delay does not change *which* datagrams are lost (the
//! sequences are reproducible for a given version of `rand`, not across versions).
//!
//! # Spec strings
//!
//! [`FaultConfig::parse`] (also [`FromStr`]) reads a compact comma-separated spec shared by the
//! proxy's command line and the tests, e.g. `loss=0.25,dup=0.1,reorder=0.1,delay=5ms,jitter=2ms,
//! window=50ms`. Keys may appear in any order and at most once; missing keys keep their
//! [`Default`] values (no faults, 50 ms reorder window). `none` or an empty string means no
//! faults. Probabilities are numbers in `0..=1` or percentages (`25%`); durations are whole
//! numbers with a unit `ns`, `us`, `ms` or `s` (a bare `0` is allowed), at most one hour.
//! [`FaultConfig`]'s [`Display`](fmt::Display) prints a spec that parses back to the same value.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use udpmsg::netem::{FaultConfig, Netem};
//!
//! let cfg: FaultConfig = "loss=0.1,delay=5ms,jitter=1ms".parse().unwrap();
//! let mut net = Netem::new(cfg, 42);
//! let t0 = Instant::now();
//! net.send(t0, "hello");
//! assert_eq!(net.poll_deliver(t0), None); // not before 5 ms have passed
//! if let Some(due) = net.poll_timeout() {
//!     assert!(due >= t0 + Duration::from_millis(5));
//!     assert_eq!(net.poll_deliver(due), Some("hello"));
//! }
//! ```

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Longest duration a spec string may give for `delay`, `jitter` or `window`.
pub const MAX_SPEC_DURATION: Duration = Duration::from_secs(3600);

/// Reorder window used when a spec does not give one.
pub const DEFAULT_REORDER_WINDOW: Duration = Duration::from_millis(50);

/// Faults applied to one direction of a path. See the [module documentation](self).
///
/// The fields are public so tests can build a configuration directly; [`Netem`] never panics on
/// out-of-range values (a probability above 1 acts as 1, below 0 or NaN as 0), but only
/// [`FaultConfig::parse`] and [`FaultConfig::validate`] report them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram that was not dropped is delivered twice.
    pub duplicate: f64,
    /// Probability that a copy is held back by up to `reorder_window`.
    pub reorder: f64,
    /// Base one-way delay of every copy.
    pub delay: Duration,
    /// Upper bound of the uniform extra delay added to every copy.
    pub jitter: Duration,
    /// Upper bound of the uniform extra delay added to a reordered copy.
    pub reorder_window: Duration,
}

impl FaultConfig {
    /// A fault-free path: no loss, duplication or reordering and no delay.
    pub const NONE: FaultConfig = FaultConfig {
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        reorder_window: DEFAULT_REORDER_WINDOW,
    };

    /// Whether this configuration passes every datagram through unchanged and at once.
    pub fn is_noop(&self) -> bool {
        let active = |p: f64| p > 0.0; // NaN counts as 0, as in `Netem`
        let reorders = active(self.reorder) && !self.reorder_window.is_zero();
        let faulty = active(self.loss) || active(self.duplicate) || reorders;
        !faulty && self.delay.is_zero() && self.jitter.is_zero()
    }

    /// Checks that the probabilities lie in `0..=1` and the durations are at most
    /// [`MAX_SPEC_DURATION`].
    pub fn validate(&self) -> Result<(), String> {
        for (key, p) in [("loss", self.loss), ("dup", self.duplicate), ("reorder", self.reorder)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{key}: {p} is not a probability in 0..=1"));
            }
        }
        for (key, d) in [("delay", self.delay), ("jitter", self.jitter), ("window", self.reorder_window)] {
            if d > MAX_SPEC_DURATION {
                return Err(format!(
                    "{key}: {} is longer than the maximum of {}",
                    DisplayDuration(d),
                    DisplayDuration(MAX_SPEC_DURATION)
                ));
            }
        }
        Ok(())
    }

    /// Parses a spec such as `loss=0.25,dup=0.1,reorder=0.1,delay=5ms,jitter=2ms,window=50ms`.
    ///
    /// Keys: `loss`, `dup` (or `duplicate`), `reorder`, `delay`, `jitter`, `window` (or
    /// `reorder_window`). `none` or an empty string is [`FaultConfig::NONE`]. The error names
    /// the offending key or item.
    pub fn parse(spec: &str) -> Result<FaultConfig, String> {
        let mut cfg = FaultConfig::NONE;
        let spec = spec.trim();
        if spec.is_empty() || spec.eq_ignore_ascii_case("none") {
            return Ok(cfg);
        }
        let mut seen: Vec<&'static str> = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!("`{item}`: expected key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            let canonical = match key.to_ascii_lowercase().as_str() {
                "loss" => "loss",
                "dup" | "duplicate" => "dup",
                "reorder" => "reorder",
                "delay" => "delay",
                "jitter" => "jitter",
                "window" | "reorder_window" => "window",
                _ => {
                    return Err(format!(
                        "unknown key `{key}` (expected one of loss, dup, reorder, delay, jitter, \
                         window)"
                    ))
                }
            };
            if seen.contains(&canonical) {
                return Err(format!("{canonical}: given more than once"));
            }
            seen.push(canonical);
            match canonical {
                "loss" => cfg.loss = parse_probability(value).map_err(|e| format!("loss: {e}"))?,
                "dup" => cfg.duplicate = parse_probability(value).map_err(|e| format!("dup: {e}"))?,
                "reorder" => cfg.reorder = parse_probability(value).map_err(|e| format!("reorder: {e}"))?,
                "delay" => cfg.delay = parse_duration(value).map_err(|e| format!("delay: {e}"))?,
                "jitter" => cfg.jitter = parse_duration(value).map_err(|e| format!("jitter: {e}"))?,
                _ => cfg.reorder_window = parse_duration(value).map_err(|e| format!("window: {e}"))?,
            }
        }
        Ok(cfg)
    }
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig::NONE
    }
}

impl FromStr for FaultConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultConfig::parse(s)
    }
}

impl fmt::Display for FaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loss={},dup={},reorder={},delay={},jitter={},window={}",
            self.loss,
            self.duplicate,
            self.reorder,
            DisplayDuration(self.delay),
            DisplayDuration(self.jitter),
            DisplayDuration(self.reorder_window)
        )
    }
}

/// Parses a probability: a number in `0..=1` or a percentage in `0%..=100%`.
fn parse_probability(value: &str) -> Result<f64, String> {
    let (number, scale) = match value.strip_suffix('%') {
        Some(n) => (n.trim(), 100.0),
        None => (value, 1.0),
    };
    let p = number.parse::<f64>().map_err(|_| format!("`{value}` is not a number"))? / scale;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("`{value}` is not a probability in 0..=1"));
    }
    Ok(p)
}

/// Parses a duration given as a whole number with a unit (`ns`, `us`, `ms`, `s`), or a bare
/// `0`, of at most [`MAX_SPEC_DURATION`]. Errors do not name a key; callers prefix it.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = (&value[..split], value[split..].trim());
    if digits.is_empty() {
        return Err(format!("`{value}` is not a duration (expected a whole number and a unit, e.g. 5ms)"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("`{value}` is out of range"))?;
    let d = match unit {
        "" if n == 0 => Duration::ZERO,
        "" => return Err(format!("`{value}` needs a unit (ns, us, ms or s)")),
        "ns" => Duration::from_nanos(n),
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ if unit.starts_with('.') => {
            return Err(format!("`{value}`: use a whole number of a smaller unit (e.g. 1500us, not 1.5ms)"))
        }
        _ => return Err(format!("`{value}`: unknown unit `{unit}` (expected ns, us, ms or s)")),
    };
    if d > MAX_SPEC_DURATION {
        return Err(format!(
            "`{value}` is longer than the maximum of {}",
            DisplayDuration(MAX_SPEC_DURATION)
        ));
    }
    Ok(d)
}

/// Formats a duration in the largest of `s`, `ms`, `us`, `ns` that represents it exactly, so
/// [`parse_duration`] reads it back unchanged.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        if ns == 0 {
            f.write_str("0ms")
        } else if ns.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", ns / 1_000_000_000)
        } else if ns.is_multiple_of(1_000_000) {
            write!(f, "{}ms", ns / 1_000_000)
        } else if ns.is_multiple_of(1_000) {
            write!(f, "{}us", ns / 1_000)
        } else {
            write!(f, "{ns}ns")
        }
    }
}

/// Counters of what a [`Netem`] did since it was created.
///
/// Invariant: `sent - dropped + duplicated == delivered + queued`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetemStats {
    /// Datagrams passed to [`Netem::send`].
    pub sent: u64,
    /// Datagrams lost (including the rare one whose due time would overflow `Instant`).
    pub dropped: u64,
    /// Extra copies made by duplication.
    pub duplicated: u64,
    /// Copies held back by the reorder window.
    pub reordered: u64,
    /// Copies returned by [`Netem::poll_deliver`].
    pub delivered: u64,
    /// Copies still waiting to be delivered.
    pub queued: u64,
}

/// A copy waiting in the queue; ordered by `(due, seq)` only.
struct Entry<T> {
    due: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    /// Reversed, so that the max-heap `BinaryHeap` pops the earliest `(due, seq)` first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One direction of a faulty path carrying items of type `T` (e.g. `(SocketAddr, Vec<u8>)`).
/// See the [module documentation](self).
pub struct Netem<T> {
    cfg: FaultConfig,
    rng: StdRng,
    queue: BinaryHeap<Entry<T>>,
    next_seq: u64,
    stats: NetemStats,
}

impl<T> fmt::Debug for Netem<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netem")
            .field("cfg", &self.cfg)
            .field("queued", &self.queue.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Whether a draw `u` from `U[0, 1)` falls under probability `p` (NaN and `p <= 0` never do,
/// `p >= 1` always does).
fn hit(u: f64, p: f64) -> bool {
    u < p
}

/// `max * u` for `u` in `[0, 1)`, without panicking.
fn scaled(max: Duration, u: f64) -> Duration {
    if max.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_nanos((max.as_nanos() as f64 * u) as u64)
    }
}

impl<T> Netem<T> {
    /// A path with the given faults whose randomness is seeded by `seed`.
    pub fn new(cfg: FaultConfig, seed: u64) -> Self {
        Netem {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            next_seq: 0,
            stats: NetemStats::default(),
        }
    }

    /// The current configuration.
    pub fn config(&self) -> &FaultConfig {
        &self.cfg
    }

    /// Replaces the configuration for datagrams sent from now on (e.g. to partition the network
    /// with `loss = 1` in a test); datagrams already queued keep their due times.
    pub fn set_config(&mut self, cfg: FaultConfig) {
        self.cfg = cfg;
    }

    /// When the next queued copy is due, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|e| e.due)
    }

    /// The next copy due at or before `now`, in order of due time (FIFO among equal ones).
    pub fn poll_deliver(&mut self, now: Instant) -> Option<T> {
        if self.queue.peek()?.due > now {
            return None;
        }
        let entry = self.queue.pop()?;
        self.stats.delivered += 1;
        Some(entry.item)
    }

    /// Counters so far.
    pub fn stats(&self) -> NetemStats {
        NetemStats { queued: self.queue.len() as u64, ..self.stats }
    }

    /// Number of copies waiting to be delivered.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no copy is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Computes the due time of one copy from its three draws and enqueues it.
    fn enqueue(&mut self, now: Instant, draws: [f64; 3], item: T) -> bool {
        let [jitter_u, reorder_u, window_u] = draws;
        let mut delay = self.cfg.delay.saturating_add(scaled(self.cfg.jitter, jitter_u));
        if hit(reorder_u, self.cfg.reorder) {
            self.stats.reordered += 1;
            delay = delay.saturating_add(scaled(self.cfg.reorder_window, window_u));
        }
        let Some(due) = now.checked_add(delay) else {
            return false;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Entry { due, seq, item });
        true
    }
}

impl<T: Clone> Netem<T> {
    /// Sends `item` at time `now`: drops it, or enqueues one or two copies with their due times.
    pub fn send(&mut self, now: Instant, item: T) {
        // Always draw the same values, so which datagrams suffer which fault depends only on the
        // seed and the datagram's position in the sequence.
        let u: [f64; 8] = std::array::from_fn(|_| self.rng.random::<f64>());
        self.stats.sent += 1;
        if hit(u[0], self.cfg.loss) {
            self.stats.dropped += 1;
            return;
        }
        if hit(u[1], self.cfg.duplicate) {
            self.stats.duplicated += 1;
            if !self.enqueue(now, [u[5], u[6], u[7]], item.clone()) {
                self.stats.duplicated -= 1;
            }
        }
        if !self.enqueue(now, [u[2], u[3], u[4]], item) {
            self.stats.dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends `0..n` one per `gap`, then runs the clock to the end; returns (time, item) pairs.
    fn run(net: &mut Netem<u32>, t0: Instant, n: u32, gap: Duration) -> Vec<(Instant, u32)> {
        let mut out = Vec::new();
        let mut now = t0;
        for i in 0..n {
            while let Some(x) = net.poll_deliver(now) {
                out.push((now, x));
            }
            net.send(now, i);
            now += gap;
        }
        while let Some(due) = net.poll_timeout() {
            assert_eq!(net.poll_deliver(due - Duration::from_nanos(1)), None, "delivered early");
            now = now.max(due);
            while let Some(x) = net.poll_deliver(now) {
                out.push((now, x));
            }
        }
        out
    }

    fn faulty() -> FaultConfig {
        FaultConfig::parse("loss=0.2,dup=0.2,reorder=0.2,delay=5ms,jitter=3ms,window=50ms").unwrap()
    }

    #[test]
    fn same_seed_same_deliveries() {
        let t0 = Instant::now();
        let a = run(&mut Netem::new(faulty(), 7), t0, 500, ms(1));
        let b = run(&mut Netem::new(faulty(), 7), t0, 500, ms(1));
        assert_eq!(a, b);
        let c = run(&mut Netem::new(faulty(), 8), t0, 500, ms(1));
        assert_ne!(a, c, "different seeds should differ");
    }

    #[test]
    fn loss_one_delivers_nothing() {
        let cfg = FaultConfig { loss: 1.0, duplicate: 1.0, ..FaultConfig::NONE };
        let mut net = Netem::new(cfg, 1);
        assert!(run(&mut net, Instant::now(), 1000, ms(1)).is_empty());
        let s = net.stats();
        assert_eq!((s.sent, s.dropped, s.delivered, s.queued), (1000, 1000, 0, 0));
    }

    #[test]
    fn clean_path_delivers_everything_in_order_at_once() {
        let mut net = Netem::new(FaultConfig::NONE, 3);
        assert!(FaultConfig::NONE.is_noop());
        let now = Instant::now();
        for i in 0..1000u32 {
            net.send(now, i);
        }
        assert_eq!(net.len(), 1000);
        assert_eq!(net.poll_timeout(), Some(now));
        let got: Vec<u32> = std::iter::from_fn(|| net.poll_deliver(now)).collect();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
        assert!(net.is_empty());
        assert_eq!(net.poll_timeout(), None);
    }

    #[test]
    fn constant_delay_preserves_order() {
        let cfg = FaultConfig { delay: ms(20), ..FaultConfig::NONE };
        let mut net = Netem::new(cfg, 3);
        let t0 = Instant::now();
        let out = run(&mut net, t0, 300, Duration::ZERO);
        assert_eq!(out.iter().map(|&(_, x)| x).collect::<Vec<_>>(), (0..300).collect::<Vec<_>>());
        assert!(out.iter().all(|&(t, _)| t == t0 + ms(20)));
    }

    #[test]
    fn observed_loss_is_near_configured() {
        let cfg = FaultConfig { loss: 0.3, ..FaultConfig::NONE };
        let mut net = Netem::new(cfg, 12345);
        let n = 10_000;
        let delivered = run(&mut net, Instant::now(), n, ms(1)).len() as f64;
        let loss = 1.0 - delivered / n as f64;
        assert!((0.27..0.33).contains(&loss), "observed loss {loss}");
        assert_eq!(net.stats().dropped as f64, n as f64 - delivered);
    }

    #[test]
    fn duplicates_appear() {
        let cfg = FaultConfig { duplicate: 0.2, ..FaultConfig::NONE };
        let mut net = Netem::new(cfg, 5);
        let n = 2000;
        let out = run(&mut net, Instant::now(), n, ms(1));
        let mut counts = vec![0u32; n as usize];
        for &(_, x) in &out {
            counts[x as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 1 || c == 2));
        let dups = counts.iter().filter(|&&c| c == 2).count();
        assert!((300..500).contains(&dups), "{dups} duplicates");
        assert_eq!(net.stats().duplicated, dups as u64);
    }

    #[test]
    fn reordering_reorders() {
        let cfg = FaultConfig { reorder: 0.1, delay: ms(1), reorder_window: ms(50), ..FaultConfig::NONE };
        let mut net = Netem::new(cfg, 9);
        let out = run(&mut net, Instant::now(), 1000, ms(1));
        assert_eq!(out.len(), 1000);
        let inversions = out.windows(2).filter(|w| w[0].1 > w[1].1).count();
        assert!(inversions > 10, "only {inversions} inversions");
        assert!(net.stats().reordered > 50);
        // Delivery times never go backwards.
        assert!(out.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn no_reordering_without_reorder_or_jitter() {
        let cfg = FaultConfig { loss: 0.3, duplicate: 0.3, delay: ms(7), ..FaultConfig::NONE };
        let out = run(&mut Netem::new(cfg, 11), Instant::now(), 1000, ms(1));
        assert!(out.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn nothing_is_delivered_early() {
        let cfg = FaultConfig { delay: ms(10), jitter: ms(5), reorder: 0.5, ..FaultConfig::NONE };
        let mut net = Netem::new(cfg, 2);
        let t0 = Instant::now();
        net.send(t0, 1u32);
        let due = net.poll_timeout().unwrap();
        assert!(due >= t0 + ms(10) && due <= t0 + ms(65));
        assert_eq!(net.poll_deliver(t0), None);
        assert_eq!(net.poll_deliver(due - Duration::from_nanos(1)), None);
        assert_eq!(net.poll_deliver(due), Some(1));
        assert_eq!(net.poll_deliver(due + ms(1000)), None);
    }

    #[test]
    fn delays_stay_within_bounds() {
        let cfg = FaultConfig { delay: ms(10), jitter: ms(5), ..FaultConfig::NONE };
        let mut net = Netem::new(cfg, 4);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            net.send(t0, i);
        }
        let mut now = t0;
        let mut seen = 0;
        while let Some(due) = net.poll_timeout() {
            assert!(due >= t0 + ms(10) && due <= t0 + ms(15));
            assert!(due >= now);
            now = due;
            while net.poll_deliver(now).is_some() {
                seen += 1;
            }
        }
        assert_eq!(seen, 1000);
    }

    #[test]
    fn stats_add_up() {
        let mut net = Netem::new(faulty(), 77);
        let t0 = Instant::now();
        for i in 0..5000u32 {
            net.send(t0 + ms(i as u64), i);
            let _ = net.poll_deliver(t0 + ms(i as u64));
        }
        let s = net.stats();
        assert_eq!(s.sent, 5000);
        assert_eq!(s.sent - s.dropped + s.duplicated, s.delivered + s.queued);
        assert!(s.queued > 0 && s.queued == net.len() as u64);
        assert!(s.dropped > 0 && s.duplicated > 0 && s.reordered > 0);
    }

    #[test]
    fn loss_pattern_does_not_depend_on_delay() {
        let t0 = Instant::now();
        let items = |cfg: FaultConfig| {
            let mut v: Vec<u32> =
                run(&mut Netem::new(cfg, 21), t0, 1000, ms(1)).into_iter().map(|(_, x)| x).collect();
            v.sort();
            v
        };
        let base = FaultConfig { loss: 0.3, duplicate: 0.1, ..FaultConfig::NONE };
        let slow = FaultConfig { delay: ms(30), jitter: ms(20), reorder: 0.5, ..base };
        assert_eq!(items(base), items(slow));
    }

    #[test]
    fn out_of_range_fields_do_not_panic() {
        let cfg = FaultConfig {
            loss: f64::NAN,
            duplicate: 7.0,
            reorder: -1.0,
            delay: Duration::MAX,
            jitter: Duration::MAX,
            reorder_window: Duration::MAX,
        };
        assert!(cfg.validate().is_err());
        let mut net = Netem::new(cfg, 0);
        net.send(Instant::now(), 1u8);
        let s = net.stats();
        assert_eq!(s.sent, 1);
        assert_eq!(s.sent - s.dropped + s.duplicated, s.delivered + s.queued);
    }

    #[test]
    fn parse_full_spec() {
        let cfg =
            FaultConfig::parse("loss=0.25,dup=0.1,reorder=0.1,delay=5ms,jitter=2ms,window=50ms").unwrap();
        assert_eq!(
            cfg,
            FaultConfig {
                loss: 0.25,
                duplicate: 0.1,
                reorder: 0.1,
                delay: ms(5),
                jitter: ms(2),
                reorder_window: ms(50),
            }
        );
        assert!(cfg.validate().is_ok());
        assert!(!cfg.is_noop());
    }

    #[test]
    fn parse_partial_and_empty_specs() {
        assert_eq!(FaultConfig::parse("").unwrap(), FaultConfig::NONE);
        assert_eq!(FaultConfig::parse(" none ").unwrap(), FaultConfig::NONE);
        let cfg: FaultConfig = " Loss = 50% , duplicate=0 , reorder_window=1s, ".parse().unwrap();
        assert_eq!(
            cfg,
            FaultConfig { loss: 0.5, reorder_window: Duration::from_secs(1), ..FaultConfig::NONE }
        );
        assert_eq!(
            FaultConfig::parse("delay=0,jitter=250us,window=7ns").unwrap().jitter,
            Duration::from_micros(250)
        );
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let err = |s: &str| FaultConfig::parse(s).unwrap_err();
        assert!(err("los=0.1").contains("unknown key `los`"));
        assert!(err("loss=1.5").starts_with("loss:"));
        assert!(err("loss=1.5").contains("1.5"));
        assert!(err("dup=-0.1").starts_with("dup:"));
        assert!(err("reorder=abc").starts_with("reorder:"));
        assert!(err("loss=NaN").starts_with("loss:"));
        assert!(err("loss=200%").starts_with("loss:"));
        assert!(err("delay=5").contains("needs a unit"));
        assert!(err("jitter=5min").contains("unknown unit"));
        assert!(err("window=1.5ms").contains("smaller unit"));
        assert!(err("delay=2h").starts_with("delay:"));
        assert!(err("delay=3601s").contains("maximum"));
        assert!(err("delay=-5ms").starts_with("delay:"));
        assert!(err("delay=99999999999999999999999ms").starts_with("delay:"));
        assert!(err("loss=0.1,loss=0.2").contains("more than once"));
        assert!(err("dup=0.1,duplicate=0.2").contains("more than once"));
        assert!(err("loss").contains("key=value"));
    }

    #[test]
    fn display_round_trips() {
        for spec in [
            "none",
            "loss=0.25,dup=0.1,reorder=0.1,delay=5ms,jitter=2ms,window=50ms",
            "loss=0.3333333333333333,delay=1500us,jitter=7ns,window=2s",
        ] {
            let cfg = FaultConfig::parse(spec).unwrap();
            assert_eq!(FaultConfig::parse(&cfg.to_string()).unwrap(), cfg, "{spec}");
        }
        assert_eq!(FaultConfig::NONE.to_string(), "loss=0,dup=0,reorder=0,delay=0ms,jitter=0ms,window=50ms");
    }
}
