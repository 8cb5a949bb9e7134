//! `udpmsg-bench populate`: fills a daemon's database through the protocol, so that the dataset
//! follows every schema change and every storage (and so that anyone can size a deployment).
//!
//! Accounts `PREFIX000000`, `PREFIX000001`, ... all with the bench's password. Account `i` is
//! followed by the `R` accounts after it (`i+1 ... i+R`, modulo the count), so each of its posts
//! lands in `R` inboxes; the messages are spread evenly over the authors. Three phases, each
//! with `window` clients working through the accounts: register; log in, subscribe, log out;
//! log in, post, log out. Answers that say the work is already done (name taken, already
//! subscribed) count as done, so a stopped run can be started again. The daemon should run with
//! cheap argon2, the abuse limits lifted and `catch_up_max = 0` (the bench's own daemons do):
//! `udpmsg-bench populate --data-dir DIR` starts one so configured.

use crate::daemon::log;
use crate::sim::{Behavior, Sim};
use crate::workloads::PASSWORD;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use udpmsg::client::Event;
use udpmsg::command::Command;
use udpmsg::config::ClientConfig;
use udpmsg::proto::ErrorCode;

/// What a populated data directory holds (written as `populate.json` beside the data).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dataset {
    pub prefix: String,
    pub accounts: u64,
    pub messages: u64,
    pub recipients: u64,
    pub text_bytes: usize,
}

impl Dataset {
    pub fn name(&self, i: u64) -> String {
        format!("{}{i:06}", self.prefix)
    }

    /// Messages posted by account `i`.
    pub fn posts_of(&self, i: u64) -> u64 {
        self.messages / self.accounts + u64::from(i < self.messages % self.accounts)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Register,
    Follow,
    Post,
}

/// One phase: each client works through accounts `c, c + window, ...` one command at a time.
struct Filler<'a> {
    d: &'a Dataset,
    phase: Phase,
    window: usize,
    /// Per client: (account, step within it).
    at: Vec<(u64, u64)>,
    current: Vec<Option<Command>>,
    retries: BinaryHeap<Reverse<(Instant, usize)>>,
    no_answer: Vec<u32>,
    busy: usize,
    pub done: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    text: String,
}

const RETRY_AFTER: Duration = Duration::from_millis(50);

impl<'a> Filler<'a> {
    fn new(d: &'a Dataset, phase: Phase, window: usize) -> Filler<'a> {
        let window = window.min(d.accounts as usize).max(1);
        let text = "p".repeat(d.text_bytes.max(1));
        Filler {
            d,
            phase,
            window,
            at: (0..window as u64).map(|a| (a, 0)).collect(),
            current: vec![None; window],
            retries: BinaryHeap::new(),
            no_answer: vec![0; window],
            busy: window,
            done: 0,
            failed: 0,
            failures: Vec::new(),
            text,
        }
    }

    /// Command number `step` of account `a` in this phase, or `None` when the account is done.
    fn command(&self, a: u64, step: u64) -> Option<Command> {
        let me = self.d.name(a);
        let password = || PASSWORD.to_string();
        match self.phase {
            Phase::Register => (step == 0).then(|| Command::Register { user: me, password: password() }),
            Phase::Follow => {
                let r = self.d.recipients.min(self.d.accounts - 1);
                match step {
                    0 => Some(Command::Login { user: me, password: password() }),
                    s if s <= r => {
                        let followed = (a + self.d.accounts - s) % self.d.accounts;
                        Some(Command::Subscribe { user: self.d.name(followed) })
                    }
                    s if s == r + 1 => Some(Command::Logout),
                    _ => None,
                }
            }
            Phase::Post => {
                let n = self.d.posts_of(a);
                match step {
                    _ if n == 0 => None,
                    0 => Some(Command::Login { user: me, password: password() }),
                    s if s <= n => Some(Command::Post { text: self.text.clone() }),
                    s if s == n + 1 => Some(Command::Logout),
                    _ => None,
                }
            }
        }
    }

    /// Client `c` moves on to its next command (or account, or stops).
    fn advance(&mut self, sim: &mut Sim, c: usize, now: Instant) {
        loop {
            let (a, step) = self.at[c];
            if a >= self.d.accounts {
                self.current[c] = None;
                self.busy -= 1;
                return;
            }
            match self.command(a, step) {
                Some(cmd) => {
                    self.at[c] = (a, step + 1);
                    self.current[c] = Some(cmd.clone());
                    self.no_answer[c] = 0;
                    if sim.submit(c, cmd, now).is_err() {
                        self.retries.push(Reverse((now + RETRY_AFTER, c)));
                    }
                    return;
                }
                None => self.at[c] = (a + self.window as u64, 0),
            }
        }
    }

    fn fail(&mut self, msg: String) {
        self.failed += 1;
        if self.failures.len() < 10 {
            self.failures.push(msg);
        }
    }
}

impl Behavior for Filler<'_> {
    fn on_event(&mut self, sim: &mut Sim, c: usize, ev: Event, now: Instant) {
        if c >= self.window || self.current[c].is_none() {
            return;
        }
        match ev {
            Event::Push(_) => {}
            Event::Done(_)
            | Event::Failed {
                error: ErrorCode::NameTaken { .. } | ErrorCode::AlreadySubscribed { .. },
                ..
            } => {
                self.done += 1;
                self.advance(sim, c, now);
            }
            Event::Failed { error: ErrorCode::Busy | ErrorCode::RateLimited { .. }, .. } => {
                self.retries.push(Reverse((now + RETRY_AFTER, c)));
            }
            Event::NoAnswer { command, .. } if self.no_answer[c] < 3 => {
                self.no_answer[c] += 1;
                let _ = command;
                self.retries.push(Reverse((now, c)));
            }
            other => {
                self.fail(format!("{other:?}"));
                // A failed login or post: on to the next account (its session, if any, idles out).
                let (a, _) = self.at[c];
                self.at[c] = (a + self.window as u64, 0);
                self.advance(sim, c, now);
            }
        }
    }

    fn tick(&mut self, sim: &mut Sim, now: Instant) {
        while self.retries.peek().is_some_and(|Reverse((t, _))| *t <= now) {
            let Reverse((_, c)) = self.retries.pop().expect("peeked");
            if let Some(cmd) = self.current[c].clone() {
                if sim.submit(c, cmd, now).is_err() {
                    self.retries.push(Reverse((now + RETRY_AFTER, c)));
                }
            }
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        self.retries.peek().map(|Reverse((t, _))| *t)
    }

    fn done(&self) -> bool {
        self.busy == 0
    }
}

/// Fills the daemon at `server` with dataset `d`, `window` clients at a time.
pub fn populate(server: SocketAddr, d: &Dataset, window: usize, salt: u64) -> Result<(), String> {
    if d.accounts == 0 {
        return Err("--accounts must be at least 1".into());
    }
    let cfg =
        ClientConfig { server: server.to_string(), ping_interval_secs: 86_400, ..ClientConfig::default() };
    for phase in [Phase::Register, Phase::Follow, Phase::Post] {
        let mut sim = Sim::new(server, cfg.clone(), salt).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let w = window.min(d.accounts as usize).max(1);
        for _ in 0..w {
            sim.add_owned_client(now).map_err(|e| e.to_string())?;
        }
        let mut f = Filler::new(d, phase, window);
        let t = Instant::now();
        for c in 0..w {
            f.advance(&mut sim, c, t);
        }
        let limit = Duration::from_secs(24 * 3600);
        sim.run(&mut f, t + limit).map_err(|e| format!("{phase:?}: {e}"))?;
        let secs = t.elapsed().as_secs_f64();
        log(&format!(
            "populate: {phase:?}: {} requests in {secs:.1} s ({:.0}/s), {} failed",
            f.done,
            f.done as f64 / secs.max(1e-9),
            f.failed
        ));
        if f.failed > 0 {
            return Err(format!("{phase:?}: {} failed, e.g. {}", f.failed, f.failures.join("; ")));
        }
    }
    Ok(())
}
