//! The daemon's protocol logic as a sans-IO state machine.
//!
//! # Driving contract
//!
//! [`Server`] owns all state and never touches a socket, a clock or a thread. The shell drives it:
//!
//! 1. Feed input: [`Server::handle`] for each datagram received, with the current time and the
//!    source address; [`Server::on_password_done`] for each finished password job;
//!    [`Server::handle_timeout`] when [`Server::poll_timeout`]'s deadline has passed (calling it
//!    early is a harmless no-op).
//! 2. Run password work: [`Server::poll_password_job`] until `None`, off the event loop.
//! 3. Commit: [`Server::take_writes`] returns the turn's writes as one batch; store it durably,
//!    then report with [`Server::on_committed`]. Replies and pushes that depend on a batch are
//!    held until then (group commit: one transaction per turn, however many requests).
//! 4. Read: [`Server::poll_read`] until `None`, each read run by the store *after* the batches
//!    taken before it (one store thread serving jobs in order does that), answered with
//!    [`Server::on_read`]. A request that needs data the core does not hold waits for its reads
//!    ([`reads`]); the core holds only sessions and a bounded [`cache`].
//! 5. Drain output: [`Server::poll_transmit`] until `None`, then sleep until
//!    [`Server::poll_timeout`].
//!
//! `now` must never go backwards between calls. Randomness (tokens, challenges, cookie
//! secrets) comes from the injected RNG. Wall-clock time (the posting time of messages) is
//! derived from `now` and the anchor the shell sets with [`Server::set_wall_clock`].
//!
//! # Who may cost what
//!
//! A datagram from an address that has not proven it receives our answers gets at most as many
//! bytes back as it had (three times, for an address a session is being validated on:
//! [`path`]), no state is kept for it until it passed validation, and nothing that costs a
//! password hash or creates an account happens without a cookie when it matters
//! ([`cookie`], [`login_limits`]).

mod cache;
mod commands;
mod cookie;
mod login_limits;
mod nodes;
mod path;
mod reads;
mod reply_cache;
mod session;
mod throttle;

pub use cache::CacheStats;
pub use nodes::{NODE_BITS, TICKS_FROM_US};
pub use reads::ReadJob;

use crate::config::ServerConfig;
use crate::password::{HashParams, PasswordJob, PasswordOutcome};
use crate::proto::{self, ClientMsg, DecodeError, EncodedMessage, ErrorCode, Response, ServerMsg, Token};
use crate::store::{AccountRecord, Startup, StoredSession, Write};
use log::{debug, error, info, trace, warn};
use login_limits::{Charged, LoginLimits};
use reply_cache::{Entry, Key, ReplyCache};
use session::{Seen, Session};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use throttle::{Bucket, Prefix, Throttle};

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Counters, exposed for logs, tests and (later) metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub datagrams_in: u64,
    /// From a source address nothing is ever sent to (broadcast, multicast, unspecified, port 0).
    pub bad_source: u64,
    pub undecodable: u64,
    pub version_mismatch: u64,
    pub unauthenticated_too_short: u64,
    pub amplification_dropped: u64,
    pub requests: u64,
    pub errors: u64,
    pub duplicate_requests: u64,
    pub sessions_opened: u64,
    pub sessions_expired: u64,
    pub pushes_sent: u64,
    pub pushes_retransmitted: u64,
    pub pushes_acked: u64,
    pub pushes_dropped: u64,
    pub sessions_unresponsive: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub committed_writes: u64,
    pub largest_batch: u64,
    pub busy: u64,
    /// Of those, refused because password jobs were waiting longer than `password_max_wait_ms`.
    pub busy_slow: u64,
    pub logins_throttled: u64,
    pub registrations_throttled: u64,
    pub requests_throttled: u64,
    /// Logins and registrations answered with a cookie to retry with (no hash, no state).
    pub retries_sent: u64,
    /// Path challenges sent to new addresses of sessions, and paths they proved.
    pub path_challenges: u64,
    pub paths_validated: u64,
    /// Posts and direct messages refused for the author's delivery budget or the recipient's
    /// allowance of messages from users they do not follow.
    pub deliveries_throttled: u64,
    /// Reads issued to the store, by kind (`account`, `followers`, `inbox`, ...), and reads
    /// that failed.
    pub reads_by_kind: BTreeMap<&'static str, u64>,
    pub read_failures: u64,
    /// One node of several ([`nodes`]): messages committed by other nodes and pushed here,
    /// sessions taken over from other nodes, sessions other nodes took (or ended), claims
    /// refused by their throttle, registrations another node won.
    pub remote_messages: u64,
    pub sessions_claimed: u64,
    pub sessions_moved_away: u64,
    pub sessions_ended_elsewhere: u64,
    pub claims_throttled: u64,
    pub names_taken_elsewhere: u64,
    /// Requests by kind (`post`, `login`, ...).
    pub requests_by_kind: BTreeMap<&'static str, u64>,
    /// Error answers by code (`NoSuchUser`, ...).
    pub errors_by_code: BTreeMap<&'static str, u64>,
}

/// What a password job was for.
#[derive(Debug)]
enum Auth {
    Register {
        user: String,
        reply: ReplyTo,
    },
    /// `account`: `None` for a name no account has (checked against a dummy hash).
    Login {
        user: String,
        reply: ReplyTo,
        account: Option<Arc<AccountRecord>>,
        charged: Charged,
    },
    Delete {
        user: String,
        reply: ReplyTo,
        token: Token,
    },
}

/// Where and how a reply goes.
#[derive(Debug, Clone, Copy)]
struct ReplyTo {
    to: SocketAddr,
    id: u64,
    /// Cache slot: a global cache key, or the session's own window.
    slot: Slot,
    /// For requests without a valid session: the request's size, which the reply must not exceed.
    limit: Option<usize>,
    /// The session the request came with: an answer to an address that is not its proven one
    /// spends that path's budget ([`path`]).
    session: Option<Token>,
    /// The request's size.
    len: usize,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Global(Key),
    Session(Token),
    None,
}

/// A read-only request kept while its reply waits for a commit, to run it again if that fails.
#[derive(Debug)]
pub(crate) struct Rerun {
    from: SocketAddr,
    len: usize,
    request: proto::Request,
}

/// Output waiting for a batch to commit.
#[derive(Debug)]
enum Held {
    /// A reply. If the batch fails, a request that wrote nothing (it only waited because it may
    /// have seen the batch's writes) runs again on the restored state; the others are answered
    /// "storage unavailable".
    Reply(ReplyTo, Transmit, Option<Box<Rerun>>),
    /// Start pushing to a session whose creation was in the batch.
    Activate(Token),
    /// Forward a stored message to the recipients' sessions: (name, account id) of each.
    Fanout(Arc<EncodedMessage>, Arc<Vec<(String, u64)>>),
}

/// The daemon core. See the module documentation for the driving contract.
pub struct Server {
    cfg: ServerConfig,
    hash_params: HashParams,
    rng: Box<dyn rand::Rng + Send>,
    /// Accounts the store holds (with this core's writes not yet committed).
    accounts: u64,
    /// Names with a registration in progress (hashing).
    reserved: HashSet<String>,
    /// Boxed: the table then holds 24 bytes per slot, not a whole session, and a third of its
    /// slots are empty after each doubling.
    sessions: HashMap<Token, Box<Session>>,
    /// The live sessions of each user.
    live: HashMap<String, Vec<Token>>,
    /// What the core keeps of the store's data.
    cache: cache::Cache,
    /// Requests waiting for reads.
    reads: reads::Reads,
    /// Recently expired or revoked tokens, to tell their holders to log in again.
    expired: HashSet<Token>,
    expired_order: VecDeque<Token>,
    next_message_id: u64,
    /// This run's number, sent with every push.
    epoch: u32,
    replies: ReplyCache,
    timers: BinaryHeap<Reverse<(Instant, Token)>>,
    jobs: VecDeque<PasswordJob>,
    /// Password jobs queued or running, with when they were submitted; ids grow with time, so
    /// the first entry is the one waiting longest.
    auth: BTreeMap<u64, (Instant, Auth)>,
    next_job_id: u64,
    out: VecDeque<Transmit>,
    held: VecDeque<(u64, Held)>,
    writes: Vec<Write>,
    /// Delivered marks not yet written, coalesced per user.
    delivered: HashMap<String, u64>,
    /// When they go into a batch.
    delivered_due: Option<Instant>,
    /// Number of the batch being filled; batches are committed in order.
    open_batch: u64,
    /// Highest batch committed (0: none yet).
    committed_batch: u64,
    /// A batch handed out by `take_writes` and not yet reported.
    in_flight_batch: Option<u64>,
    /// The highest batch handed out (0: none): reads issued after it may go to the store.
    taken_batch: u64,
    /// Sessions closed by a batch not yet committed, kept whole to put back if it fails.
    closing: Vec<(u64, Token, Box<Session>)>,
    stats: Stats,
    /// A hash to verify against for unknown users, so timing does not reveal who exists.
    dummy_hash: String,
    limits: LoginLimits,
    register_by_addr: Throttle<Prefix>,
    /// Deliveries each author may still cause (config `deliveries_per_user_per_sec`).
    deliveries: Throttle<u64>,
    /// Direct messages each user still accepts from users they do not follow (config
    /// `dms_from_strangers_*`).
    stranger_dms: Throttle<u64>,
    cookies: cookie::Cookies,
    /// Wall-clock anchor: `now` at `wall_ms` milliseconds since the Unix epoch.
    wall: (Instant, u64),
    /// When idle throttle buckets are next dropped.
    next_sweep: Option<Instant>,
    /// Debug lines about datagrams from anyone (drops, refusals): at most a few per second.
    stranger_log: LogBudget,
    /// Info lines about accounts and sessions (logins, logouts, registrations, expiries): an
    /// account holder can cause them at the password workers' pace, so they are bounded too.
    event_log: LogBudget,
    /// Set when this daemon is one node of several on a shared store ([`nodes`]).
    nodes: Option<nodes::Nodes>,
}

/// A token bucket for log lines, which says how many it held back.
struct LogBudget {
    bucket: Bucket,
    per_sec: u32,
    suppressed: u64,
}

impl LogBudget {
    fn new(per_sec: u32, now: Instant) -> LogBudget {
        LogBudget { bucket: Bucket::full(per_sec * 10, now), per_sec, suppressed: 0 }
    }

    /// Whether a line at `level` may be logged now (false, and nothing counted, when the level
    /// is off anyway).
    fn allow(&mut self, now: Instant, level: log::Level) -> bool {
        if !log::log_enabled!(level) {
            return false;
        }
        let refill = Duration::from_secs(1) / self.per_sec;
        if self.bucket.take(now, self.per_sec * 10, refill).is_ok() {
            if self.suppressed > 0 {
                log::log!(level, "({} similar lines suppressed)", std::mem::take(&mut self.suppressed));
            }
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// How long a delivered mark may wait before it is written. Writing one per acknowledged push
/// would cost a row update per subscriber per batch; after a crash, catch-up repeats at most this
/// much of what was already delivered (it never skips anything).
pub const DELIVERED_FLUSH: Duration = Duration::from_secs(1);

/// Addresses whose registrations are tracked at once.
const THROTTLE_KEYS: usize = 65_536;
/// How often idle throttle buckets are dropped.
const SWEEP: Duration = Duration::from_secs(10);
/// Debug lines about strangers' datagrams per second, at most (bursts of ten times that).
const LOG_PER_SEC: u32 = 20;
/// Info lines about accounts and sessions per second, at most (bursts of ten times that).
const EVENT_LOG_PER_SEC: u32 = 50;
/// Most recently expired tokens remembered.
const EXPIRED_MEMORY: usize = 65_536;
/// Room a page leaves for the frame: header, reply tag, request id, result and response tags,
/// list length and the largest cursor (a 32-byte name).
const PAGE_OVERHEAD: usize = 64;

impl Server {
    /// Creates the core from committed state. `hash_params` are for new password hashes.
    pub fn new(
        cfg: ServerConfig,
        hash_params: HashParams,
        start: Startup,
        rng: Box<dyn rand::Rng + Send>,
        now: Instant,
    ) -> Self {
        let register_by_addr = Throttle::new(
            cfg.registrations_per_address_burst,
            Duration::from_secs(cfg.registrations_per_address_refill_secs),
            THROTTLE_KEYS,
        );
        let (deliveries, stranger_dms) = user_throttles(&cfg);
        let mut server = Server {
            replies: ReplyCache::new(cfg.reply_cache_ttl(), cfg.reply_cache_max_unauthenticated as usize),
            limits: LoginLimits::new(&cfg),
            cache: cache::Cache::new(cfg.cache_bytes as usize),
            cfg,
            hash_params,
            rng,
            accounts: start.accounts,
            reserved: HashSet::new(),
            sessions: HashMap::new(),
            live: HashMap::new(),
            reads: reads::Reads::default(),
            expired: HashSet::new(),
            expired_order: VecDeque::new(),
            next_message_id: start.next_message_id.max(1),
            epoch: start.epoch,
            timers: BinaryHeap::new(),
            jobs: VecDeque::new(),
            auth: BTreeMap::new(),
            next_job_id: 1,
            out: VecDeque::new(),
            held: VecDeque::new(),
            writes: Vec::new(),
            delivered: HashMap::new(),
            delivered_due: None,
            open_batch: 1,
            committed_batch: 0,
            in_flight_batch: None,
            taken_batch: 0,
            closing: Vec::new(),
            stats: Stats::default(),
            // Computed once here (a few ms at startup) rather than on the event loop later.
            dummy_hash: crate::password::hash("no such user", hash_params).unwrap_or_default(),
            register_by_addr,
            deliveries,
            stranger_dms,
            cookies: cookie::Cookies::new(),
            wall: (now, 0),
            next_sweep: None,
            stranger_log: LogBudget::new(LOG_PER_SEC, now),
            event_log: LogBudget::new(EVENT_LOG_PER_SEC, now),
            nodes: nodes::Nodes::new(&start),
        };
        for s in start.sessions {
            server.restore_session(now, s);
        }
        server
    }

    /// Brings back a stored session. Its push address is learned (and validated) from the
    /// client's next datagram; what it may not have received is read and queued for it, as on
    /// login.
    fn restore_session(&mut self, now: Instant, stored: StoredSession) {
        let token = stored.token;
        let (user, user_id, last_delivered) = (stored.user.clone(), stored.user_id, stored.last_delivered);
        let s = self.session_from_store(now, stored, self.epoch);
        self.live.entry(user).or_default().push(token);
        self.sessions.insert(token, Box::new(s));
        self.schedule(token, now);
        let job = reads::Job::Restore { token, user_id, last_delivered };
        self.run(now, job);
    }

    /// The cache's figures (hits, misses, size), for metrics.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.snapshot_stats()
    }

    /// Requests waiting for reads, and reads issued and not yet answered.
    pub fn reads_waiting(&self) -> (usize, usize) {
        (self.reads.parked(), self.reads.in_flight())
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Password jobs queued or running.
    pub fn password_jobs(&self) -> usize {
        self.auth.len()
    }

    /// Anchors wall-clock time: at `now` it is `unix_ms` milliseconds since the Unix epoch. The
    /// shell calls it every turn (so a stepped clock is followed); until then messages are
    /// stamped with the time since the core started.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.wall = (now, unix_ms);
    }

    /// Microseconds since the Unix epoch at `now` (to the anchor's millisecond).
    fn unix_us(&self, now: Instant) -> u64 {
        let (at, ms) = self.wall;
        let base = ms.saturating_mul(1000);
        match now.checked_duration_since(at) {
            Some(d) => base.saturating_add(d.as_micros() as u64),
            None => base.saturating_sub(at.duration_since(now).as_micros() as u64),
        }
    }

    /// Milliseconds since the Unix epoch at `now`.
    fn unix_ms(&self, now: Instant) -> u64 {
        let (at, ms) = self.wall;
        match now.checked_duration_since(at) {
            Some(d) => ms.saturating_add(d.as_millis() as u64),
            None => ms.saturating_sub(at.duration_since(now).as_millis() as u64),
        }
    }

    /// Whether a debug line about a stranger's datagram may be logged now: at most
    /// [`LOG_PER_SEC`] a second, so that nobody can fill the log by sending junk.
    fn noisy(&mut self, now: Instant) -> bool {
        self.stranger_log.allow(now, log::Level::Debug)
    }

    /// Whether an info line about an account or session event may be logged now.
    fn event(&mut self, now: Instant) -> bool {
        self.event_log.allow(now, log::Level::Info)
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Replaces the settings that can change at runtime (limits and timers). Settings that
    /// need a restart (`listen`, `data_dir`, `storage`) are the shell's to keep.
    pub fn set_config(&mut self, cfg: ServerConfig) {
        self.limits.set_config(&cfg);
        self.cache.set_budget(cfg.cache_bytes as usize);
        let (deliveries, stranger_dms) = user_throttles(&cfg);
        (self.deliveries.burst, self.deliveries.refill) = (deliveries.burst, deliveries.refill);
        (self.stranger_dms.burst, self.stranger_dms.refill) = (stranger_dms.burst, stranger_dms.refill);
        self.register_by_addr.burst = cfg.registrations_per_address_burst;
        self.register_by_addr.refill = Duration::from_secs(cfg.registrations_per_address_refill_secs);
        self.hash_params = HashParams {
            memory_kib: cfg.argon2_memory_kib,
            iterations: cfg.argon2_iterations,
            parallelism: cfg.argon2_parallelism,
        };
        self.cfg = cfg;
    }

    // ---------------------------------------------------------------- input

    /// Feeds one received datagram.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_in += 1;
        if !replyable(from) {
            // A spoofed broadcast, multicast or unspecified source: any answer would go to many
            // hosts at once, or nowhere.
            self.stats.bad_source += 1;
            if self.noisy(now) {
                debug!("{from}: datagram from an address nothing is answered to, dropped");
            }
            return;
        }
        let msg = match proto::decode_client(bytes) {
            Ok(msg) => msg,
            Err(DecodeError::Version(v)) => {
                self.stats.version_mismatch += 1;
                if self.noisy(now) {
                    debug!("{from}: speaks protocol v{v}, answering with ours (v{})", proto::VERSION);
                }
                // Our header and an echo of the request's start: never more than we received.
                self.out.push_back(Transmit { to: from, bytes: proto::version_notice(bytes) });
                return;
            }
            Err(e) => {
                self.stats.undecodable += 1;
                if self.noisy(now) {
                    debug!("{from}: dropped {} byte datagram: {e}", bytes.len());
                }
                return;
            }
        };
        match msg {
            ClientMsg::PushAck { token, epoch, seq } => self.on_push_acks(now, from, token, epoch, &[seq]),
            ClientMsg::PushAcks { token, epoch, seqs } => self.on_push_acks(now, from, token, epoch, &seqs),
            ClientMsg::PathResponse { token, data } => {
                self.on_path_response(now, from, bytes.len(), token, data)
            }
            ClientMsg::Request(req) => self.on_request(now, from, bytes.len(), req),
        }
    }

    fn on_push_acks(&mut self, now: Instant, from: SocketAddr, token: Token, epoch: u32, seqs: &[u64]) {
        let Some(s) = self.sessions.get_mut(&token) else {
            trace!("ack for unknown session");
            return;
        };
        if epoch != s.epoch {
            // Late, from before a restart (or from another node): its sequence numbers name
            // other pushes now.
            trace!("ack for epoch {epoch} in epoch {}", s.epoch);
            return;
        }
        s.last_seen = now;
        if s.addr == Some(from) && !s.verified {
            // The token came back from the push address: it is real.
            s.verified = true;
            self.pump(now, token);
            return;
        }
        let mut through = None;
        for &seq in seqs {
            if let Some(t) = s.ack(now, seq) {
                self.stats.pushes_acked += 1;
                through = through.max(Some(t));
            }
        }
        let Some(through) = through else { return };
        // Coalesced per user, written at most once per DELIVERED_FLUSH.
        if through > s.delivered {
            s.delivered = through;
            match self.delivered.get_mut(&s.user) {
                Some(e) => *e = (*e).max(through),
                None => {
                    self.delivered.insert(s.user.clone(), through);
                }
            }
            self.delivered_due.get_or_insert(now + DELIVERED_FLUSH);
        }
        self.pump(now, token);
    }

    /// A candidate address echoed its path challenge: the session's pushes move there.
    fn on_path_response(&mut self, now: Instant, from: SocketAddr, len: usize, token: Token, data: u64) {
        let Some(s) = self.sessions.get_mut(&token) else { return };
        match s.candidate.as_mut() {
            Some(c) if c.addr == from && c.data == data => {}
            Some(c) if c.addr == from => {
                c.received += len as u64;
                trace!("wrong path response from {from}");
                return;
            }
            _ => return,
        }
        let c = s.candidate.take().expect("matched");
        let old = s.addr.replace(from);
        s.verified = true;
        s.last_seen = now;
        self.stats.paths_validated += 1;
        if s.may_log(now) {
            info!("session of {} moved from {} to {from} (address proven)", s.user, show_addr(old));
        }
        self.wake(now, token);
        // What is in flight went to the old address: resend it to the new one now.
        let s = self.sessions.get_mut(&token).expect("checked");
        for p in &mut s.inflight {
            p.deadline = now;
        }
        if let Some(id) = c.withheld {
            // The answer that did not fit the budget: it is in the session's window.
            let s = self.sessions.get_mut(&token).expect("checked");
            if let Seen::Replay(bytes) = s.dedup.check(id, self.committed_batch) {
                self.out.push_back(Transmit { to: from, bytes });
            }
        }
        self.retransmit_due(now, token);
        self.pump(now, token);
        self.schedule(token, now);
    }

    /// A session heard from at its proven address: if it had stopped acknowledging, it gets its
    /// in-flight pushes again at once, with fresh tries.
    fn wake(&mut self, now: Instant, token: Token) {
        let Some(s) = self.sessions.get_mut(&token) else { return };
        if s.unresponsive {
            debug!("session of {} is responsive again", s.user);
            s.unresponsive = false;
            for p in &mut s.inflight {
                p.tries = 0;
                p.deadline = now;
            }
        }
    }

    /// Sends an answer to a request that came with session `token`'s token, within what its
    /// destination may be sent: anything to the session's proven push address; to the
    /// candidate address, what its budget allows (an answer `id` that does not fit is sent from
    /// the session's window once the address is proven); elsewhere, at most three times the
    /// datagram that asked (`len`).
    fn send_in_session(&mut self, token: Token, t: Transmit, len: usize, id: Option<u64>) {
        if let Some(s) = self.sessions.get_mut(&token).filter(|s| s.addr != Some(t.to)) {
            let fits = match s.candidate.as_mut().filter(|c| c.addr == t.to) {
                Some(c) => {
                    let fits = c.spend(t.bytes.len());
                    if !fits && id.is_some() {
                        c.withheld = id;
                    }
                    fits
                }
                None => path::fits_datagram(t.bytes.len(), len),
            };
            if !fits {
                self.stats.amplification_dropped += 1;
                return;
            }
        }
        self.out.push_back(t);
    }

    /// Lets a reply go (its batch, if any, has committed).
    fn release(&mut self, r: &ReplyTo, t: Transmit) {
        match r.session {
            Some(token) => {
                let cached = matches!(r.slot, Slot::Session(_)).then_some(r.id);
                self.send_in_session(token, t, r.len, cached);
            }
            None => self.out.push_back(t),
        }
    }

    /// Sends session `token`'s candidate address its challenge (again), if its budget allows.
    fn challenge(&mut self, token: Token) {
        let Some(s) = self.sessions.get_mut(&token) else { return };
        let Some(c) = s.candidate.as_mut() else { return };
        let bytes = proto::encode_server(&ServerMsg::PathChallenge { session: s.id, data: c.data });
        if c.spend(bytes.len()) {
            self.stats.path_challenges += 1;
            self.out.push_back(Transmit { to: c.addr, bytes });
        }
    }

    /// Checks a request that came with a live session's token: de-duplication, the session's
    /// request rate, and where it came from. Returns where its answer goes, or `None` when it
    /// has been dealt with (a retransmission answered from the cache, or dropped).
    fn admit_in_session(
        &mut self,
        now: Instant,
        from: SocketAddr,
        len: usize,
        token: Token,
        req: &proto::Request,
    ) -> Option<ReplyTo> {
        let kind = req.body.kind();
        let committed = self.committed_batch;
        let per_sec = self.cfg.session_requests_per_sec;
        let s = self.sessions.get_mut(&token).expect("checked");
        let from_candidate = s.candidate.as_ref().is_some_and(|c| c.addr == from);
        if let Some(c) = s.candidate.as_mut().filter(|_| from_candidate) {
            c.received += len as u64;
        }
        let replay = match s.dedup.check(req.id, committed) {
            Seen::New => None,
            Seen::Replay(bytes) => Some(Some(bytes)),
            Seen::Drop => {
                // Requests answered through the token-keyed cache (delete) live there.
                match self.replies.get(&Key::Token(token, req.id)) {
                    Some(Entry::Done(bytes, batch)) if *batch <= committed => Some(Some(bytes.clone())),
                    _ => Some(None),
                }
            }
        };
        if let Some(cached) = replay {
            self.stats.duplicate_requests += 1;
            let s = self.sessions.get_mut(&token).expect("checked");
            // A retransmission costs the session's request rate like a request (and, below,
            // the path's budget), so replaying captured requests draws nothing unbounded.
            if s.rate.take(now, per_sec * 2, Duration::from_secs(1) / per_sec).is_err() {
                self.stats.requests_throttled += 1;
                return None;
            }
            if from_candidate {
                // Its challenge may have been lost.
                self.challenge(token);
            }
            if let Some(bytes) = cached {
                debug!("{from}: retransmitted {kind} #{}, replaying the reply", req.id);
                self.send_in_session(token, Transmit { to: from, bytes }, len, Some(req.id));
            }
            return None;
        }
        s.last_seen = now;
        if let Err(wait) = s.rate.take(now, per_sec * 2, Duration::from_secs(1) / per_sec) {
            // Not marked as executed: the same request may come again later.
            self.stats.requests_throttled += 1;
            let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u32;
            let r =
                ReplyTo { to: from, id: req.id, slot: Slot::None, limit: None, session: Some(token), len };
            self.reply(now, r, Err(ErrorCode::RateLimited { retry_after_secs }));
            return None;
        }
        let newest = s.dedup.is_newest(req.id);
        s.dedup.mark(req.id);
        if s.addr == Some(from) {
            // From the push address: the token came back from it (a new session is verified
            // by this), and a session that stopped acknowledging is back.
            s.verified = true;
            self.wake(now, token);
        } else if newest {
            // A new address (or one still being validated): challenge it. It gets answers
            // within its budget, and pushes only once it has echoed the challenge. Only the
            // newest request may do this, so replayed captures move nothing.
            if !from_candidate {
                let data = self.rng.next_u64();
                let s = self.sessions.get_mut(&token).expect("checked");
                s.candidate = Some(Box::new(path::Candidate::new(from, data, len)));
                if s.may_log(now) {
                    info!("session of {} heard from {from}; validating that address", s.user);
                }
            }
            self.challenge(token);
        }
        // Resend at once what a silent client missed, then fill the window.
        self.retransmit_due(now, token);
        self.pump(now, token);
        self.schedule(token, now);
        Some(ReplyTo {
            to: from,
            id: req.id,
            slot: Slot::Session(token),
            limit: None,
            session: Some(token),
            len,
        })
    }

    fn on_request(&mut self, now: Instant, from: SocketAddr, len: usize, req: proto::Request) {
        self.stats.requests += 1;
        *self.stats.requests_by_kind.entry(req.body.kind()).or_insert(0) += 1;
        self.dispatch(now, from, len, req);
    }

    /// Admits a request and runs it (again, once its session was taken over from another node).
    fn dispatch(&mut self, now: Instant, from: SocketAddr, len: usize, req: proto::Request) {
        let kind = req.body.kind();
        // A valid token makes this an authenticated request; anything else is treated as coming
        // from an unverified (possibly spoofed) address.
        let session = req.token.filter(|t| self.sessions.contains_key(t));
        let reply = match session {
            Some(token) => match self.admit_in_session(now, from, len, token, &req) {
                Some(r) => r,
                None => return,
            },
            None => {
                let slot = match (&req.body, req.token) {
                    (proto::RequestBody::Register { .. } | proto::RequestBody::Login { .. }, _) => {
                        if len < proto::MIN_UNAUTHENTICATED_REQUEST {
                            self.stats.unauthenticated_too_short += 1;
                            if self.noisy(now) {
                                debug!("{from}: unpadded {kind} ({len} bytes) dropped");
                            }
                            return;
                        }
                        Slot::Global(Key::Addr(from, req.id))
                    }
                    // A retransmitted logout or delete whose session is already gone. Only those:
                    // another request with that token and id is not their retransmission (and must
                    // not occupy the bounded cache either).
                    (proto::RequestBody::Logout | proto::RequestBody::DeleteAccount { .. }, Some(t)) => {
                        Slot::Global(Key::Token(t, req.id))
                    }
                    _ => Slot::None,
                };
                if let Slot::Global(key) = slot {
                    // Only looked up: an entry exists only for a request that earned it.
                    match self.replies.get(&key) {
                        Some(Entry::Done(bytes, batch)) if *batch <= self.committed_batch => {
                            self.stats.duplicate_requests += 1;
                            if bytes.len() <= len {
                                self.out.push_back(Transmit { to: from, bytes: bytes.clone() });
                            } else {
                                self.stats.amplification_dropped += 1;
                            }
                            return;
                        }
                        Some(_) => {
                            self.stats.duplicate_requests += 1;
                            return;
                        }
                        None => {}
                    }
                }
                ReplyTo { to: from, id: req.id, slot, limit: Some(len), session: None, len }
            }
        };
        if session.is_some() || self.noisy(now) {
            debug!("{from}: {kind} #{}", req.id);
        }
        // A logout's session is gone once it has run: its retransmission finds the reply under
        // the token instead.
        let reply = match (reply.slot, &req.body) {
            (Slot::Session(token), proto::RequestBody::Logout) => {
                ReplyTo { slot: Slot::Global(Key::Token(token, req.id)), ..reply }
            }
            _ => reply,
        };
        self.run(now, reads::Job::Request { from, len, reply, session, token: req.token, body: req.body });
    }

    /// Reports a finished password job.
    pub fn on_password_done(&mut self, now: Instant, id: u64, outcome: PasswordOutcome) {
        let Some((_, auth)) = self.auth.remove(&id) else {
            warn!("result for unknown password job {id}");
            return;
        };
        let before = self.writes.len();
        if let Some((reply, result)) = self.finish_auth(now, auth, outcome) {
            let wrote = self.writes.len() > before;
            self.reply_and_persist(now, reply, result, wrote, None);
        }
    }

    /// Handles timers: push retransmission, session expiry, cache expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.replies.expire(now);
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.limits.expire(now);
            self.register_by_addr.expire(now);
            self.next_sweep = None;
        }
        if self.next_sweep.is_none() && self.limits.len() + self.register_by_addr.len() > 0 {
            self.next_sweep = Some(now + SWEEP);
        }
        if self.delivered_due.is_some_and(|t| t <= now) {
            self.flush_delivered();
        }
        while let Some(Reverse((t, token))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.sessions.get_mut(&token) else { continue };
            if s.scheduled != Some(t) {
                continue; // superseded entry
            }
            s.scheduled = None;
            let idle_end = s.last_seen + self.cfg.session_idle_timeout();
            let life_end = s.lifetime_end(self.cfg.session_max_lifetime());
            if now >= idle_end || now >= life_end {
                self.stats.sessions_expired += 1;
                let why = if now >= life_end { "lifetime" } else { "idle" };
                if self.event_log.allow(now, log::Level::Info) {
                    info!("session of {} expired ({why})", s.user);
                }
                self.close_session(token, true);
                continue;
            }
            self.retransmit_due(now, token);
            self.schedule(token, now);
        }
    }

    // ---------------------------------------------------------------- output

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// Next password job to run off the loop.
    pub fn poll_password_job(&mut self) -> Option<PasswordJob> {
        self.jobs.pop_front()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.timers.peek().map(|Reverse((t, _))| *t);
        [t, self.replies.next_expiry(), self.delivered_due, self.next_sweep].into_iter().flatten().min()
    }

    /// Moves the pending delivered marks into the next batch (at shutdown, so that a clean stop
    /// repeats nothing at the next login's catch-up).
    pub fn flush_delivered(&mut self) {
        self.delivered_due = None;
        for (user, up_to) in std::mem::take(&mut self.delivered) {
            // What the next login's catch-up starts from, cached or not.
            self.update_account(&user, |a| a.last_delivered = a.last_delivered.max(up_to));
            self.writes.push(Write::Delivered { user, up_to });
        }
    }

    /// Takes this turn's writes as one batch `(batch number, writes)`, or `None` when there are
    /// none. At most one batch is in flight: call [`Server::on_committed`] before the next.
    pub fn take_writes(&mut self) -> Option<(u64, Vec<Write>)> {
        if self.in_flight_batch.is_some() {
            return None;
        }
        if self.writes.is_empty() {
            return None;
        }
        let n = self.open_batch;
        self.open_batch += 1;
        self.in_flight_batch = Some(n);
        self.taken_batch = n;
        Some((n, std::mem::take(&mut self.writes)))
    }

    /// Reports that batch `n` is durable: releases everything that waited for it.
    pub fn on_committed(&mut self, now: Instant, n: u64, writes: usize) {
        debug_assert_eq!(self.in_flight_batch, Some(n));
        self.in_flight_batch = None;
        self.committed_batch = n;
        self.settled(n);
        self.stats.commits += 1;
        self.stats.committed_writes += writes as u64;
        self.stats.largest_batch = self.stats.largest_batch.max(writes as u64);
        self.closing.retain(|(b, _, _)| *b > n);
        // Replies first, then the pushes: a client learns its token before its first push.
        let mut later = Vec::new();
        while let Some((b, _)) = self.held.front() {
            if *b > n {
                break;
            }
            match self.held.pop_front().expect("peeked").1 {
                Held::Reply(r, t, _) => self.release(&r, t),
                other => later.push(other),
            }
        }
        // Every message of the batch is queued before any session is pumped, so that what a
        // session gets from one commit leaves in as few datagrams as fit.
        let mut touched = Vec::new();
        for h in later {
            match h {
                Held::Reply(r, t, _) => self.release(&r, t),
                Held::Activate(token) => {
                    if let Some(s) = self.sessions.get_mut(&token) {
                        s.live = true;
                        touched.push(token);
                    }
                }
                Held::Fanout(msg, recipients) => self.fanout(&msg, &recipients, &mut touched),
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for token in touched {
            self.pump(now, token);
        }
    }

    /// Reports that batch `n` could not be made durable (e.g. the disk is full). `durable` is the
    /// store's committed state, reloaded by the shell. Everything the failed batch (and anything
    /// after it) changed is undone; the requests that waited for it are answered "storage
    /// unavailable, retry" and forgotten by the de-duplication, so the client's retry runs them
    /// again. Sessions keep their push windows; reads go on.
    pub fn on_commit_failed(&mut self, now: Instant, n: u64, durable: Startup) {
        debug_assert_eq!(self.in_flight_batch, Some(n));
        self.in_flight_batch = None;
        self.settled(u64::MAX);
        self.stats.commit_failures += 1;
        self.writes.clear();
        self.delivered.clear();
        self.delivered_due = None;
        let mut refused = 0;
        let mut reruns = Vec::new();
        for (_, h) in std::mem::take(&mut self.held) {
            if let Held::Reply(r, _, rerun) = h {
                self.forget(r);
                if let Some(rerun) = rerun {
                    reruns.push(rerun);
                    continue;
                }
                refused += 1;
                let bytes = proto::encode_server(&ServerMsg::Reply {
                    id: r.id,
                    result: Err(ErrorCode::StorageUnavailable),
                });
                if r.limit.is_none_or(|l| bytes.len() <= l) {
                    let r = ReplyTo { slot: Slot::None, ..r };
                    self.release(&r, Transmit { to: r.to, bytes });
                }
            }
            // Activations and fan-outs of the failed batch never happen.
        }
        // What the core had written through to its cache did not happen either.
        self.cache.clear();
        self.reads.changed_all();
        self.accounts = durable.accounts;
        self.next_message_id = self.next_message_id.max(durable.next_message_id);
        let stored: HashMap<Token, StoredSession> =
            durable.sessions.into_iter().map(|s| (s.token, s)).collect();
        // Sessions the failed batch closed come back exactly as they were (push numbering,
        // windows, de-duplication); those it opened go.
        for (_, token, s) in std::mem::take(&mut self.closing) {
            if stored.get(&token).is_some_and(|st| st.user == s.user) {
                self.expired.remove(&token);
                self.sessions.insert(token, s);
                self.schedule(token, now);
            }
        }
        self.sessions.retain(|t, s| stored.get(t).is_some_and(|st| st.user == s.user));
        self.live.clear();
        for (token, s) in &self.sessions {
            self.live.entry(s.user.clone()).or_default().push(*token);
        }
        for (token, st) in stored {
            if !self.sessions.contains_key(&token) {
                self.restore_session(now, st);
            }
        }
        warn!(
            "batch {n} was not stored; {refused} request(s) were told to retry, {} read(s) run again",
            reruns.len()
        );
        for r in reruns {
            self.on_request(now, r.from, r.len, r.request);
        }
    }

    /// Takes in changes made by an admin command (`udpmsgd user ...`) while the daemon runs: a
    /// deleted account or a changed password ends the sessions it had (the store deleted them),
    /// and nothing cached is trusted any more. `durable` is the store's state, read by the shell
    /// while no batch was in flight; sessions that writes not yet taken by
    /// [`Server::take_writes`] open are left alone (the store has not seen them yet).
    pub fn sync_sessions(&mut self, now: Instant, durable: Startup) {
        debug_assert!(self.in_flight_batch.is_none(), "the state may miss the batch in flight");
        let mut opening = HashSet::new();
        let mut delta: i64 = 0;
        for w in &self.writes {
            match w {
                Write::OpenSession { token, .. } => {
                    opening.insert(*token);
                }
                Write::CreateAccount { .. } => delta += 1,
                Write::DeleteAccount { .. } => delta -= 1,
                _ => {}
            }
        }
        let stored: HashSet<Token> = durable.sessions.iter().map(|s| s.token).collect();
        let gone: Vec<Token> =
            self.sessions.keys().filter(|t| !stored.contains(*t) && !opening.contains(*t)).copied().collect();
        for token in gone {
            if let Some(user) = self.sessions.get(&token).map(|s| s.user.clone()) {
                if self.event(now) {
                    info!("session of {user} was ended by an admin (account deleted or password changed)");
                }
            }
            self.close_session(token, true);
        }
        self.accounts = (durable.accounts as i64 + delta).max(0) as u64;
        self.cache.clear();
        self.reads.changed_all();
    }

    /// Makes a request's id new again, so that its retransmission executes.
    fn forget(&mut self, r: ReplyTo) {
        match r.slot {
            Slot::Session(token) => {
                if let Some(s) = self.sessions.get_mut(&token) {
                    s.dedup.forget(r.id);
                }
            }
            Slot::Global(key) => self.replies.remove(&key),
            Slot::None => {}
        }
    }

    // ---------------------------------------------------------------- internals

    /// The batch that output produced now must wait for, if any.
    fn gate(&self) -> Option<u64> {
        if !self.writes.is_empty() {
            Some(self.open_batch)
        } else {
            self.in_flight_batch
        }
    }

    fn hold(&mut self, h: Held) {
        match self.gate() {
            Some(b) => self.held.push_back((b, h)),
            None => self.held.push_back((self.committed_batch, h)),
        }
    }

    fn write(&mut self, w: Write) {
        self.writes.push(w);
    }

    fn reply(&mut self, now: Instant, r: ReplyTo, result: Result<Response, ErrorCode>) {
        self.reply_and_persist(now, r, result, false, None);
    }

    /// Answers a login or registration with a cookie to repeat it with: stateless, never larger
    /// than the request.
    fn retry(&mut self, now: Instant, r: ReplyTo) {
        // Stateless: nothing stays of a request told to come back with a cookie, not even the
        // entry a read it waited for made.
        if let Slot::Global(key) = r.slot {
            self.replies.remove(&key);
        }
        let cookie = self.cookies.make(now, self.rng.as_mut(), r.to);
        let bytes = proto::encode_server(&ServerMsg::Retry { id: r.id, cookie });
        self.stats.retries_sent += 1;
        if bytes.len() <= r.len {
            self.out.push_back(Transmit { to: r.to, bytes });
        }
    }

    /// Sends (or holds) a reply and caches it for retransmissions. `wrote`: the request changed
    /// something, so its reply waits for that to be durable, and (in a session) is stored with
    /// the session, so that a retransmission after a daemon restart is answered instead of
    /// executed again.
    fn reply_and_persist(
        &mut self,
        now: Instant,
        r: ReplyTo,
        result: Result<Response, ErrorCode>,
        wrote: bool,
        rerun: Option<Box<Rerun>>,
    ) {
        let is_err = result.is_err();
        let retry = result.as_ref().is_err_and(commands::retry_runs_again);
        if let Err(e) = &result {
            self.stats.errors += 1;
            *self.stats.errors_by_code.entry(e.code()).or_insert(0) += 1;
            if r.session.is_some() || self.noisy(now) {
                // The error may echo what the request said: quoted, and cut short.
                debug!("{}: #{} -> {}", r.to, r.id, proto::quoted(&format!("{e:?}"), 120));
            }
        }
        let bytes = proto::encode_server(&ServerMsg::Reply { id: r.id, result });
        if bytes.len() > proto::MAX_DATAGRAM {
            // A bug in a page size computation: no client would accept it.
            error!(
                "reply #{} to {} is {} bytes, over the {} byte limit",
                r.id,
                r.to,
                bytes.len(),
                proto::MAX_DATAGRAM
            );
        }
        if let (true, Slot::Session(token)) = (wrote, r.slot) {
            if self.sessions.contains_key(&token) {
                self.write(Write::LastReply { token, request_id: r.id, reply: bytes.clone() });
            }
        }
        // What a session asks may have seen writes not yet durable, so its answer waits for
        // them; an answer without a session waits only for what it wrote itself.
        let batch = if r.session.is_some() || wrote {
            self.gate().unwrap_or(self.committed_batch)
        } else {
            self.committed_batch
        };
        match r.slot {
            Slot::Session(token) => {
                if let Some(s) = self.sessions.get_mut(&token) {
                    s.dedup.remember(r.id, bytes.clone(), batch);
                }
            }
            // "Try again" is computed again. Another refusal is kept only for a request whose
            // password job was submitted (a lost "wrong password" must not be hashed and
            // counted again); a stranger's refusal leaves nothing behind, even one that waited
            // for a read.
            Slot::Global(key) if retry || (is_err && self.replies.get(&key) != Some(&Entry::Hashing)) => {
                self.replies.remove(&key)
            }
            Slot::Global(key) => self.replies.insert(now, key, Entry::Done(bytes.clone(), batch)),
            Slot::None => {}
        }
        if let Some(limit) = r.limit {
            if bytes.len() > limit {
                // Never answer an unverified address with more than it sent us.
                self.stats.amplification_dropped += 1;
                debug!("{}: reply of {} bytes to a {limit} byte request withheld", r.to, bytes.len());
                return;
            }
        }
        let t = Transmit { to: r.to, bytes };
        if batch > self.committed_batch {
            self.held.push_back((batch, Held::Reply(r, t, rerun)));
        } else {
            self.release(&r, t);
        }
    }

    fn new_token(&mut self) -> Token {
        let mut t = [0u8; 16];
        self.rng.fill_bytes(&mut t);
        Token(t)
    }

    /// Queues a password job, or answers "busy": when the queue is full, or when the job waiting
    /// longest has waited more than `password_max_wait_ms` (a new one would wait longer and
    /// outlast its client's retransmissions; this also catches stalled workers). A client told
    /// "busy" can retry; one that gave up waiting learns nothing, and its hash would be wasted.
    fn submit_job(
        &mut self,
        now: Instant,
        kind: crate::password::JobKind,
        auth: Auth,
    ) -> Result<(), ErrorCode> {
        if self.auth.len() >= self.cfg.password_queue as usize {
            self.stats.busy += 1;
            return Err(ErrorCode::Busy);
        }
        let oldest = self.auth.first_key_value().map(|(_, (submitted, _))| *submitted);
        if oldest.is_some_and(|t| now.saturating_duration_since(t) > self.cfg.password_max_wait()) {
            self.stats.busy += 1;
            self.stats.busy_slow += 1;
            return Err(ErrorCode::Busy);
        }
        let id = self.next_job_id;
        self.next_job_id += 1;
        self.jobs.push_back(PasswordJob { id, kind });
        self.auth.insert(id, (now, auth));
        Ok(())
    }

    /// Puts the session's earliest deadline into the timer heap.
    fn schedule(&mut self, token: Token, _now: Instant) {
        let Some(s) = self.sessions.get_mut(&token) else { return };
        let expiry = (s.last_seen + self.cfg.session_idle_timeout())
            .min(s.lifetime_end(self.cfg.session_max_lifetime()));
        let next = s.next_deadline(expiry);
        if s.scheduled.is_none_or(|t| next < t) {
            s.scheduled = Some(next);
            self.timers.push(Reverse((next, token)));
        }
    }

    fn pump(&mut self, now: Instant, token: Token) {
        let Some(s) = self.sessions.get_mut(&token) else { return };
        let out = &mut self.out;
        let sent = s
            .pump(now, self.cfg.push_window as usize, &mut |to, bytes| out.push_back(Transmit { to, bytes }));
        self.stats.pushes_sent += sent;
        if sent > 0 {
            self.schedule(token, now);
        }
    }

    fn retransmit_due(&mut self, now: Instant, token: Token) {
        let max_tries = self.cfg.push_max_tries;
        let Some(s) = self.sessions.get_mut(&token) else { return };
        let Some(addr) = s.addr else { return };
        if !s.live || s.unresponsive || !s.verified {
            return;
        }
        for i in 0..s.inflight.len() {
            if s.inflight[i].deadline > now {
                continue;
            }
            if s.inflight[i].tries >= max_tries {
                if s.may_log(now) {
                    warn!(
                        "session of {} at {addr} stopped acknowledging pushes after {max_tries} tries; \
                         its messages stay in the inbox",
                        s.user
                    );
                }
                s.unresponsive = true;
                self.stats.sessions_unresponsive += 1;
                return;
            }
            let p = &mut s.inflight[i];
            p.tries += 1;
            p.retransmitted = true;
            p.deadline = now + s.rtt.backoff(p.tries);
            let mut bytes = Vec::new();
            proto::encode_push(s.id, s.epoch, p.seq, &p.msg, &mut bytes);
            self.out.push_back(Transmit { to: addr, bytes });
            self.stats.pushes_retransmitted += 1;
        }
    }

    /// Queues a committed message for every live session of every recipient; the sessions are
    /// added to `touched` for the caller to pump.
    fn fanout(&mut self, msg: &Arc<EncodedMessage>, recipients: &[(String, u64)], touched: &mut Vec<Token>) {
        let max_queue = self.cfg.push_queue as usize;
        for (user, _) in recipients {
            let Some(tokens) = self.live.get(user) else { continue };
            for token in tokens {
                if let Some(s) = self.sessions.get_mut(token) {
                    if s.enqueue(msg.clone(), max_queue) {
                        self.stats.pushes_dropped += 1;
                    }
                    touched.push(*token);
                }
            }
        }
    }

    /// Ends a session. `expired` says whether its holder should hear "session expired".
    fn close_session(&mut self, token: Token, expired: bool) {
        let Some(s) = self.sessions.remove(&token) else { return };
        self.unlink(&s.user, s.user_id, token);
        self.write(Write::CloseSession { token });
        // Kept until the close is durable: a failed commit puts it back as it was.
        let batch = self.gate().unwrap_or(self.open_batch);
        self.closing.push((batch, token, s));
        if expired {
            if self.expired_order.len() == EXPIRED_MEMORY {
                if let Some(old) = self.expired_order.pop_front() {
                    self.expired.remove(&old);
                }
            }
            self.expired.insert(token);
            self.expired_order.push_back(token);
        }
    }

    /// Why a request without a usable session is refused.
    fn no_session_error(&self, token: Option<Token>) -> ErrorCode {
        match token {
            Some(t) if self.expired.contains(&t) => ErrorCode::SessionExpired,
            _ => ErrorCode::NotLoggedIn,
        }
    }

    fn page_fits(used: usize, next: usize) -> bool {
        used + next + PAGE_OVERHEAD <= proto::MAX_DATAGRAM
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// Whether `addr` is one a datagram may be sent to in answer: not a broadcast, multicast or
/// unspecified address, not port 0 (such a source is forged; an answer would reach many hosts, or
/// none).
fn replyable(addr: SocketAddr) -> bool {
    use std::net::IpAddr;
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// An optional address for a log line.
fn show_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "nowhere (restarted)".into(), |a| a.to_string())
}

/// The per-user throttles of posting: deliveries per author, and direct messages a user accepts
/// from users they do not follow; both keyed by account id (never reused, and cheap to hash on
/// every post).
fn user_throttles(cfg: &ServerConfig) -> (Throttle<u64>, Throttle<u64>) {
    let per_sec = cfg.deliveries_per_user_per_sec.max(1);
    (
        Throttle::new(per_sec.saturating_mul(10), Duration::from_secs(1) / per_sec, THROTTLE_KEYS),
        Throttle::new(
            cfg.dms_from_strangers_burst,
            Duration::from_secs(cfg.dms_from_strangers_refill_secs),
            THROTTLE_KEYS,
        ),
    )
}
