//! Setup: run a queue of commands per client (register, login, subscribe...), at most `window`
//! clients at a time, retrying what the daemon answered "busy"/"rate limited" or did not answer.

use crate::hist::Histogram;
use crate::sim::{Behavior, Sim};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};
use udpmsg::client::{Done, Event};
use udpmsg::command::Command;
use udpmsg::proto::ErrorCode;

const RETRY_AFTER: Duration = Duration::from_millis(50);
const MAX_NO_ANSWER: u32 = 3;

pub struct Script {
    queues: Vec<VecDeque<Command>>,
    current: Vec<Option<Command>>,
    started: Vec<Option<Instant>>,
    no_answer: Vec<u32>,
    waiting: VecDeque<usize>,
    retries: BinaryHeap<Reverse<(Instant, usize)>>,
    window: usize,
    active: usize,
    total: usize,
    finished: usize,
    pub ok: u64,
    pub retried: u64,
    pub failures: Vec<String>,
    pub failed: u64,
    /// Latency of every command that succeeded (first submit to answer, retries included).
    pub hist: Histogram,
    /// Per client, the answer to its last command that succeeded.
    pub answers: Vec<Option<Done>>,
}

impl Script {
    /// `work`: (client, its commands in order).
    pub fn new(n_clients: usize, work: Vec<(usize, Vec<Command>)>, window: usize) -> Script {
        let mut queues = vec![VecDeque::new(); n_clients];
        let mut waiting = VecDeque::new();
        for (i, cmds) in work {
            if !cmds.is_empty() {
                queues[i].extend(cmds);
                waiting.push_back(i);
            }
        }
        Script {
            total: waiting.len(),
            queues,
            current: vec![None; n_clients],
            started: vec![None; n_clients],
            no_answer: vec![0; n_clients],
            waiting,
            retries: BinaryHeap::new(),
            window: window.max(1),
            active: 0,
            finished: 0,
            ok: 0,
            retried: 0,
            failures: Vec::new(),
            failed: 0,
            hist: Histogram::default(),
            answers: vec![None; n_clients],
        }
    }

    pub fn unfinished(&self) -> usize {
        self.total - self.finished
    }

    fn fail(&mut self, msg: String) {
        self.failed += 1;
        if self.failures.len() < 10 {
            self.failures.push(msg);
        }
    }

    fn next(&mut self, sim: &mut Sim, i: usize, now: Instant) {
        match self.queues[i].pop_front() {
            Some(cmd) => {
                self.current[i] = Some(cmd.clone());
                self.started[i] = Some(now);
                self.no_answer[i] = 0;
                self.submit(sim, i, cmd, now);
            }
            None => {
                self.current[i] = None;
                self.active -= 1;
                self.finished += 1;
                self.launch(sim, now);
            }
        }
    }

    fn submit(&mut self, sim: &mut Sim, i: usize, cmd: Command, now: Instant) {
        if sim.submit(i, cmd, now).is_err() {
            // Not ready (a keepalive is outstanding): try again shortly.
            self.retries.push(Reverse((now + RETRY_AFTER, i)));
        }
    }

    fn launch(&mut self, sim: &mut Sim, now: Instant) {
        while self.active < self.window {
            let Some(i) = self.waiting.pop_front() else { break };
            self.active += 1;
            self.next(sim, i, now);
        }
    }
}

impl Behavior for Script {
    fn on_event(&mut self, sim: &mut Sim, i: usize, ev: Event, now: Instant) {
        if self.current[i].is_none() {
            return; // not ours (e.g. a push to a subscriber that is already set up)
        }
        match ev {
            Event::Done(done) => {
                self.ok += 1;
                self.answers[i] = Some(done);
                if let Some(t) = self.started[i] {
                    self.hist.record(now - t);
                }
                self.next(sim, i, now);
            }
            Event::Failed { error: ErrorCode::Busy | ErrorCode::RateLimited { .. }, .. } => {
                self.retried += 1;
                self.retries.push(Reverse((now + RETRY_AFTER, i)));
            }
            Event::NoAnswer { command, .. } => {
                self.no_answer[i] += 1;
                if self.no_answer[i] < MAX_NO_ANSWER {
                    self.retried += 1;
                    self.retries.push(Reverse((now, i)));
                } else {
                    self.fail(format!("{command}: no answer after {MAX_NO_ANSWER} attempts"));
                    self.queues[i].clear();
                    self.next(sim, i, now);
                }
            }
            Event::Failed { command, error } => {
                self.fail(format!("{command}: {error}"));
                self.next(sim, i, now);
            }
            Event::VersionMismatch { server_version, .. } => {
                self.fail(format!("the daemon speaks protocol v{server_version}"));
                self.queues[i].clear();
                self.next(sim, i, now);
            }
            Event::SessionLost { error } => {
                self.fail(format!("session lost during setup: {error}"));
                self.queues[i].clear();
                self.next(sim, i, now);
            }
            Event::Refused { command, server } => {
                self.fail(format!("{command}: nothing listens at {server}"));
                self.queues[i].clear();
                self.next(sim, i, now);
            }
            // Pushes, contact changes that the retries above already deal with, and moves
            // (the bench's clients are given one server each).
            Event::Push(_) | Event::Contact { .. } | Event::Moved { .. } => {}
        }
    }

    fn tick(&mut self, sim: &mut Sim, now: Instant) {
        self.launch(sim, now);
        while self.retries.peek().is_some_and(|Reverse((t, _))| *t <= now) {
            let Reverse((_, i)) = self.retries.pop().expect("peeked");
            if let Some(cmd) = self.current[i].clone() {
                self.submit(sim, i, cmd, now);
            }
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        self.retries.peek().map(|Reverse((t, _))| *t)
    }

    fn done(&self) -> bool {
        self.finished == self.total
    }
}
