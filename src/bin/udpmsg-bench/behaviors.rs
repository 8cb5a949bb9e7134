//! The measured phases: posting, fan-out, login storm, idle keepalives.

use crate::hist::Histogram;
use crate::sim::{Behavior, Sim};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use udpmsg::client::{Done, Event};
use udpmsg::command::Command;
use udpmsg::proto::ErrorCode;

/// Post text of `len` bytes starting with the send time (ns since `t0`, 20 digits), so that a
/// subscriber can compute post-to-push latency from the message alone.
pub fn stamped_text(t0: Instant, now: Instant, len: usize) -> String {
    let mut s = format!("{:020} ", now.duration_since(t0).as_nanos());
    while s.len() < len {
        s.push('x');
    }
    s
}

pub fn parse_stamp(t0: Instant, text: &str) -> Option<Instant> {
    let ns: u64 = text.get(..20)?.parse().ok()?;
    Some(t0 + Duration::from_nanos(ns))
}

fn error_key(ev: &Event) -> String {
    match ev {
        Event::Failed { error, .. } => match error {
            ErrorCode::RateLimited { .. } => "RateLimited".into(),
            e => format!("{e:?}").split([' ', '{', '(']).next().unwrap_or("?").to_string(),
        },
        Event::NoAnswer { .. } => "NoAnswer".into(),
        Event::SessionLost { .. } => "SessionLost".into(),
        Event::VersionMismatch { .. } => "VersionMismatch".into(),
        _ => "other".into(),
    }
}

/// Clients that each keep one post in flight until `target` posts were submitted or `stop_at`.
pub struct Posters {
    t0: Instant,
    is_poster: Vec<bool>,
    posters: Vec<usize>,
    sent_at: Vec<Instant>,
    text_len: usize,
    pub target: u64,
    stop_at: Instant,
    stopped: bool,
    pub submitted: u64,
    pub acked: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    /// Sum of `recipients` over acknowledged posts: the pushes the daemon owes.
    pub recipients: u64,
    pub hist: Histogram,
    pub start: Instant,
    pub last_ack: Instant,
    /// With pacing: each poster's time between posts, when each may post next, and those whose
    /// previous post is acked and who wait for that time.
    interval: Option<Duration>,
    next_at: Vec<Instant>,
    waiting: Vec<usize>,
}

impl Posters {
    pub fn new(
        t0: Instant,
        n_clients: usize,
        posters: Vec<usize>,
        target: u64,
        stop_at: Instant,
        text_len: usize,
    ) -> Self {
        let mut is_poster = vec![false; n_clients];
        for &p in &posters {
            is_poster[p] = true;
        }
        let now = Instant::now();
        Posters {
            t0,
            is_poster,
            posters,
            sent_at: vec![now; n_clients],
            text_len,
            target,
            stop_at,
            stopped: false,
            submitted: 0,
            acked: 0,
            failed: 0,
            errors: BTreeMap::new(),
            recipients: 0,
            hist: Histogram::default(),
            start: now,
            last_ack: now,
            interval: None,
            next_at: vec![now; n_clients],
            waiting: Vec::new(),
        }
    }

    /// Each poster posts at most once per `interval`, on a fixed schedule (a post that comes
    /// back late is followed at once, not twice), instead of as soon as it is acked.
    pub fn pace(&mut self, interval: Duration) {
        self.interval = Some(interval);
    }

    pub fn owns(&self, i: usize) -> bool {
        self.is_poster.get(i).copied().unwrap_or(false)
    }

    pub fn outstanding(&self) -> u64 {
        self.submitted - self.acked - self.failed
    }

    pub fn time_bound(&self) -> bool {
        self.submitted < self.target
    }

    fn post(&mut self, sim: &mut Sim, i: usize, now: Instant) {
        if self.submitted >= self.target || now >= self.stop_at {
            self.stopped = true;
            return;
        }
        if let Some(interval) = self.interval {
            if now < self.next_at[i] {
                self.waiting.push(i);
                return;
            }
            // The schedule, unless this poster fell behind it by more than one interval.
            self.next_at[i] = (self.next_at[i] + interval).max(now);
        }
        let text = stamped_text(self.t0, now, self.text_len);
        if sim.submit(i, Command::Post { text }, now).is_ok() {
            self.submitted += 1;
            self.sent_at[i] = now;
        }
    }

    pub fn start(&mut self, sim: &mut Sim, now: Instant) {
        self.start = now;
        self.last_ack = now;
        let n = self.posters.len();
        for k in 0..n {
            let i = self.posters[k];
            // Paced posters start spread over one interval.
            if let Some(interval) = self.interval {
                self.next_at[i] = now + interval.mul_f64(k as f64 / n as f64);
            }
            self.post(sim, i, now);
        }
    }

    pub fn finished(&self) -> bool {
        self.stopped && self.outstanding() == 0
    }

    /// Paced posters whose time has come post now.
    pub fn release_due(&mut self, sim: &mut Sim, now: Instant) {
        let next_at = &self.next_at;
        let (due, wait): (Vec<usize>, Vec<usize>) = self.waiting.iter().partition(|&&i| next_at[i] <= now);
        self.waiting = wait;
        for i in due {
            self.post(sim, i, now);
        }
    }

    /// When the next paced poster may post.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.iter().map(|&i| self.next_at[i]).min()
    }
}

impl Behavior for Posters {
    fn on_event(&mut self, sim: &mut Sim, i: usize, ev: Event, now: Instant) {
        if !self.owns(i) {
            return;
        }
        match ev {
            Event::Done(Done::Posted { recipients, .. }) => {
                self.acked += 1;
                self.recipients += u64::from(recipients);
                self.hist.record(now - self.sent_at[i]);
                self.last_ack = now;
            }
            Event::Push(_) | Event::Done(_) => return,
            other => {
                self.failed += 1;
                *self.errors.entry(error_key(&other)).or_default() += 1;
            }
        }
        self.post(sim, i, now);
    }

    fn tick(&mut self, sim: &mut Sim, now: Instant) {
        if self.submitted == 0 && !self.stopped && self.waiting.is_empty() {
            self.start(sim, now);
        }
        if now >= self.stop_at {
            self.stopped = true;
        }
        self.release_due(sim, now);
    }

    fn next_tick(&self) -> Option<Instant> {
        (!self.stopped).then(|| self.next_due().map_or(self.stop_at, |t| t.min(self.stop_at)))
    }

    fn done(&self) -> bool {
        self.finished()
    }
}

/// Subscribers counting pushes and their post-to-push latency.
pub struct Subscribers {
    t0: Instant,
    is_sub: Vec<bool>,
    pub delivered: u64,
    pub per_sub: Vec<u64>,
    pub hist: Histogram,
    pub last_push: Option<Instant>,
    pub bad_text: u64,
}

impl Subscribers {
    pub fn new(t0: Instant, n_clients: usize, subs: &[usize]) -> Self {
        let mut is_sub = vec![false; n_clients];
        for &s in subs {
            is_sub[s] = true;
        }
        Subscribers {
            t0,
            is_sub,
            delivered: 0,
            per_sub: vec![0; n_clients],
            hist: Histogram::default(),
            last_push: None,
            bad_text: 0,
        }
    }

    fn on_event(&mut self, i: usize, ev: &Event, now: Instant) {
        if !self.is_sub.get(i).copied().unwrap_or(false) {
            return;
        }
        if let Event::Push(m) = ev {
            self.delivered += 1;
            self.per_sub[i] += 1;
            self.last_push = Some(now);
            match parse_stamp(self.t0, &m.text) {
                Some(sent) => self.hist.record(now.saturating_duration_since(sent)),
                None => self.bad_text += 1,
            }
        }
    }
}

/// Logins at a fixed rate from a pool of clients, each followed by a logout.
pub struct Storm {
    pub rate: f64,
    users: Vec<String>,
    password: String,
    pool: Vec<usize>,
    is_storm: Vec<bool>,
    idle: VecDeque<usize>,
    login_at: Vec<Instant>,
    next_at: Instant,
    stop_at: Instant,
    pub target: u64,
    pub attempted: u64,
    pub logged_in: u64,
    pub refused: BTreeMap<String, u64>,
    /// A login was due and every pool client was still busy.
    pub skipped: u64,
    pub logged_out: u64,
    pub hist: Histogram,
    pub started: Instant,
    pub last_event: Instant,
    k: usize,
}

impl Storm {
    pub fn new(
        n_clients: usize,
        pool: Vec<usize>,
        users: Vec<String>,
        password: String,
        rate: f64,
        target: u64,
        stop_at: Instant,
    ) -> Self {
        let mut is_storm = vec![false; n_clients];
        for &p in &pool {
            is_storm[p] = true;
        }
        let now = Instant::now();
        Storm {
            rate,
            users,
            password,
            idle: pool.iter().copied().collect(),
            pool,
            is_storm,
            login_at: vec![now; n_clients],
            next_at: now,
            stop_at,
            target,
            attempted: 0,
            logged_in: 0,
            refused: BTreeMap::new(),
            skipped: 0,
            logged_out: 0,
            hist: Histogram::default(),
            started: now,
            last_event: now,
            k: 0,
        }
    }

    pub fn owns(&self, i: usize) -> bool {
        self.is_storm.get(i).copied().unwrap_or(false)
    }

    pub fn start(&mut self, now: Instant) {
        self.next_at = now;
        self.started = now;
        self.last_event = now;
    }

    /// Seconds from the first login to the last answer.
    pub fn seconds(&self) -> f64 {
        (self.last_event - self.started).as_secs_f64().max(1e-9)
    }

    fn stopped(&self, now: Instant) -> bool {
        self.attempted + self.skipped >= self.target || now >= self.stop_at
    }

    pub fn busy(&self) -> usize {
        self.pool.len() - self.idle.len()
    }

    pub fn finished(&self, now: Instant) -> bool {
        self.stopped(now) && self.busy() == 0
    }

    pub fn on_event(&mut self, sim: &mut Sim, i: usize, ev: Event, now: Instant) {
        if !self.owns(i) {
            return;
        }
        self.last_event = now;
        match ev {
            Event::Done(Done::LoggedIn { .. }) => {
                self.logged_in += 1;
                self.hist.record(now - self.login_at[i]);
                if sim.submit(i, Command::Logout, now).is_err() {
                    self.idle.push_back(i);
                }
                return;
            }
            Event::Done(Done::LoggedOut) => self.logged_out += 1,
            Event::Push(_) | Event::Done(_) => return,
            other => *self.refused.entry(error_key(&other)).or_default() += 1,
        }
        self.idle.push_back(i);
    }

    pub fn tick(&mut self, sim: &mut Sim, now: Instant) {
        let gap = Duration::from_secs_f64(1.0 / self.rate.max(0.001));
        while self.next_at <= now && !self.stopped(now) {
            self.next_at += gap;
            let Some(i) = self.idle.pop_front() else {
                self.skipped += 1;
                continue;
            };
            let user = self.users[self.k % self.users.len()].clone();
            self.k += 1;
            let cmd = Command::Login { user, password: self.password.clone() };
            if sim.submit(i, cmd, now).is_ok() {
                self.attempted += 1;
                self.login_at[i] = now;
            } else {
                self.idle.push_back(i);
                self.skipped += 1;
            }
        }
    }

    pub fn next_tick(&self, now: Instant) -> Option<Instant> {
        (!self.stopped(now)).then_some(self.next_at)
    }
}

/// Workloads 3 and 4: posters, subscribers, and optionally a login storm.
pub struct Fanout {
    pub posters: Posters,
    pub subs: Subscribers,
    pub storm: Option<Storm>,
    /// Stop waiting for pushes at this point (after posting stopped).
    started: bool,
}

impl Fanout {
    pub fn new(posters: Posters, subs: Subscribers, storm: Option<Storm>) -> Self {
        Fanout { posters, subs, storm, started: false }
    }

    pub fn expected_pushes(&self) -> u64 {
        self.posters.recipients
    }
}

impl Behavior for Fanout {
    fn on_event(&mut self, sim: &mut Sim, i: usize, ev: Event, now: Instant) {
        self.subs.on_event(i, &ev, now);
        if let Some(s) = &mut self.storm {
            if s.owns(i) {
                s.on_event(sim, i, ev, now);
                return;
            }
        }
        if self.posters.owns(i) {
            Behavior::on_event(&mut self.posters, sim, i, ev, now);
        }
    }

    fn tick(&mut self, sim: &mut Sim, now: Instant) {
        if !self.started {
            self.started = true;
            if let Some(s) = &mut self.storm {
                s.start(now);
            }
            self.posters.start(sim, now);
        }
        if now >= self.posters.stop_at {
            self.posters.stopped = true;
        }
        self.posters.release_due(sim, now);
        if let Some(s) = &mut self.storm {
            s.tick(sim, now);
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        let now = Instant::now();
        let a = (!self.posters.stopped)
            .then(|| self.posters.next_due().map_or(self.posters.stop_at, |t| t.min(self.posters.stop_at)));
        let b = self.storm.as_ref().and_then(|s| s.next_tick(now));
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn done(&self) -> bool {
        let storm_done = self.storm.as_ref().is_none_or(|s| s.finished(Instant::now()));
        self.posters.finished() && storm_done && self.subs.delivered >= self.expected_pushes()
    }
}

/// Workload 5's hold phase: every session pings every `interval` (the keepalive's datagram,
/// submitted explicitly so that its round trip is measured).
pub struct Idle {
    queue: VecDeque<(Instant, usize)>,
    interval: Duration,
    sent_at: Vec<Instant>,
    pub stop_at: Instant,
    pub pings: u64,
    pub pongs: u64,
    pub failed: BTreeMap<String, u64>,
    pub not_ready: u64,
    pub hist: Histogram,
}

impl Idle {
    /// `sessions` are spread evenly over the first `interval`.
    pub fn new(
        n_clients: usize,
        sessions: &[usize],
        interval: Duration,
        start: Instant,
        stop_at: Instant,
    ) -> Self {
        let n = sessions.len().max(1) as u32;
        let queue = sessions.iter().enumerate().map(|(k, &i)| (start + interval * k as u32 / n, i)).collect();
        Idle {
            queue,
            interval,
            sent_at: vec![start; n_clients],
            stop_at,
            pings: 0,
            pongs: 0,
            failed: BTreeMap::new(),
            not_ready: 0,
            hist: Histogram::default(),
        }
    }
}

impl Behavior for Idle {
    fn on_event(&mut self, _sim: &mut Sim, i: usize, ev: Event, now: Instant) {
        match ev {
            Event::Done(Done::Pong { .. }) => {
                self.pongs += 1;
                self.hist.record(now - self.sent_at[i]);
            }
            Event::Push(_) | Event::Done(_) => {}
            other => *self.failed.entry(error_key(&other)).or_default() += 1,
        }
    }

    fn tick(&mut self, sim: &mut Sim, now: Instant) {
        while self.queue.front().is_some_and(|(t, _)| *t <= now) && now < self.stop_at {
            let (_, i) = self.queue.pop_front().expect("peeked");
            if sim.is_ready(i) && sim.submit(i, Command::Ping, now).is_ok() {
                self.pings += 1;
                self.sent_at[i] = now;
            } else {
                self.not_ready += 1;
            }
            self.queue.push_back((now + self.interval, i));
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t).filter(|t| *t < self.stop_at)
    }

    fn done(&self) -> bool {
        false
    }
}
