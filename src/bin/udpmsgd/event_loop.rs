//! The daemon's mio loop: it only moves bytes and time between the socket, the core, the store
//! and the password workers.
//!
//! One turn: wait for readiness or the core's deadline; take in what the store thread finished;
//! receive until `WouldBlock` (at most `RECV_BUDGET` datagrams, so output and commits are never
//! starved); feed password results and timers; hand out password jobs; when the store is idle,
//! hand it everything written since the last batch (group commit); send everything the core
//! released. Replies and pushes that depend on a batch leave only after it is durable.

#[path = "../common/udp.rs"]
mod udp;

use crate::listener::ListenerThread;
use crate::metrics::{Metrics, ShellCounters};
use crate::store_thread::{Done, Job, StoreThread};
use crate::workers::PasswordPool;
use log::{debug, info, warn};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::SeedableRng;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udp::{Inbox, Outbox};
use udpmsg::config::{ServerConfig, StorageKind};
use udpmsg::password::HashParams;
use udpmsg::server::Server;
use udpmsg::store::postgres::{self, Listener, PgStore};
use udpmsg::store::{memory::MemoryStore, sqlite::SqliteStore, Store};

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
const METRICS: Token = Token(2);
/// Metrics connections use tokens from here on.
const METRICS_CONNS: usize = 3;
/// Datagrams received per turn before the loop commits and sends.
const RECV_BUDGET: usize = 1024;
/// Datagrams queued while the socket is not writable.
const OUTBOX_MAX: usize = 65_536;
/// Largest datagram read; anything longer than the protocol's limit is dropped by the decoder.
const RECV_BUF: usize = 2048;

/// Re-reads the configuration (for SIGHUP).
pub type Reload = Box<dyn Fn() -> Result<ServerConfig, String>>;

/// How often the loop looks for account changes made by `udpmsgd user ...` beside it.
const EXTERNAL_CHECK: Duration = Duration::from_millis(250);

pub fn run(
    cfg: ServerConfig,
    reload: Reload,
    on_listening: &mut dyn FnMut(SocketAddr),
) -> Result<(), String> {
    // Signals first: as PID 1 in a container, nothing else would stop us while we start.
    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?);

    // A thread turns signals into flags and a wake-up of the loop.
    let stop = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let (waker, stop, hup) = (waker.clone(), stop.clone(), hup.clone());
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGHUP {
                        hup.store(true, Ordering::SeqCst);
                    } else {
                        stop.store(true, Ordering::SeqCst);
                    }
                    let _ = waker.wake();
                }
            })
            .map_err(|e| e.to_string())?;
    }

    // The socket before the store: a daemon that cannot bind must not create a database first.
    let mut socket = bind(cfg.listen).map_err(|e| format!("cannot bind {}: {e}", cfg.listen))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;

    let (mut store, pg_listener): (Box<dyn Store + Send>, Option<Listener>) = match cfg.storage {
        StorageKind::Sqlite => {
            let mut s =
                SqliteStore::open(&cfg.data_dir, cfg.max_inbox as usize).map_err(|e| e.to_string())?;
            s.begin_epoch().map_err(|e| format!("cannot start storage: {e}"))?;
            (Box::new(s), None)
        }
        StorageKind::Memory => {
            let mut s = MemoryStore::new(cfg.max_inbox as usize);
            s.begin_epoch().map_err(|e| format!("cannot start storage: {e}"))?;
            (Box::new(s), None)
        }
        StorageKind::Postgres => {
            let password_file = (!cfg.postgres_password_file.is_empty())
                .then(|| std::path::Path::new(&cfg.postgres_password_file));
            let config =
                postgres::connect_config(&cfg.postgres_url, password_file).map_err(|e| e.to_string())?;
            let mut s = PgStore::open_node(
                config,
                &cfg.node_name(local.port()),
                &local.to_string(),
                cfg.max_inbox as usize,
                cfg.session_idle_timeout_secs,
            )
            .map_err(|e| format!("cannot open storage: {e}"))?;
            s.begin_epoch().map_err(|e| format!("cannot start storage: {e}"))?;
            // Its cursor starts before the sessions are loaded: what commits after is read by
            // it, what came before by the sessions' catch-up.
            let l = Listener::start(s.config(), s.node_id())
                .map_err(|e| format!("cannot listen for other nodes: {e}"))?;
            (Box::new(s), Some(l))
        }
    };
    let start = store.load().map_err(|e| format!("cannot load storage: {e}"))?;

    if stop.load(Ordering::SeqCst) {
        info!("signal received while starting, not serving");
        return Ok(());
    }
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)
        .map_err(|e| e.to_string())?;

    let mut metrics = match cfg.metrics_addr() {
        Some(addr) => {
            let m = Metrics::bind(addr, poll.registry(), METRICS, METRICS_CONNS)
                .map_err(|e| format!("cannot bind metrics on {addr}: {e}"))?;
            info!("metrics on http://{}/metrics", m.local_addr().map_err(|e| e.to_string())?);
            Some(m)
        }
        None => None,
    };

    let pool = PasswordPool::new(cfg.password_workers as usize, waker.clone()).map_err(|e| e.to_string())?;
    let params = HashParams {
        memory_kib: cfg.argon2_memory_kib,
        iterations: cfg.argon2_iterations,
        parallelism: cfg.argon2_parallelism,
    };
    // Tokens come from a CSPRNG seeded by the OS (ChaCha12, reseeded from the OS generator).
    let rng = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| format!("cannot seed the random generator: {e}"))?;
    let storage = cfg.storage;
    let stats_interval = cfg.stats_log_interval_secs;
    let mut core = Server::new(cfg, params, start, Box::new(rng), Instant::now());
    let store = StoreThread::spawn(store, waker.clone())
        .map_err(|e| format!("cannot start the store thread: {e}"))?;
    let listener = match pg_listener {
        Some(l) => Some(
            ListenerThread::spawn(l, waker.clone())
                .map_err(|e| format!("cannot start the listener thread: {e}"))?,
        ),
        None => None,
    };
    // What the store thread is doing, if anything: one job at a time.
    let mut store_busy = false;

    // The address goes to stdout (on_listening), once; the log says the rest.
    info!("ready (storage: {storage:?}, protocol v{})", udpmsg::proto::VERSION);
    on_listening(local);

    let mut events = Events::with_capacity(256);
    let mut outbox = Outbox::new(OUTBOX_MAX);
    let mut inbox = Inbox::new(RECV_BUF);
    let mut readable = true;
    let mut stats_every = (stats_interval > 0).then(|| Duration::from_secs(stats_interval));
    let mut next_stats = stats_every.map(|d| Instant::now() + d);
    let mut next_external = Instant::now() + EXTERNAL_CHECK;
    loop {
        let timeout = if readable {
            Some(Duration::ZERO)
        } else {
            let metrics_due = metrics.as_ref().and_then(Metrics::next_deadline);
            let wake = [core.poll_timeout(), next_stats, Some(next_external), metrics_due]
                .into_iter()
                .flatten()
                .min();
            wake.map(|t| t.saturating_duration_since(Instant::now()))
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed: {e}"));
        }
        for event in events.iter() {
            if event.token() == SOCKET {
                if event.is_readable() {
                    readable = true;
                }
                if event.is_writable() {
                    outbox.flush(&socket);
                }
            } else if let Some(m) = metrics.as_mut().filter(|m| m.owns(event.token())) {
                let shell = ShellCounters {
                    datagrams_out: outbox.sent,
                    send_drops: outbox.dropped,
                    listener: listener.as_ref().map(|l| l.stats.clone()),
                };
                m.ready(poll.registry(), event.token(), &core, &shell);
            }
        }
        if stop.load(Ordering::SeqCst) {
            info!("signal received, shutting down");
            break;
        }
        if hup.swap(false, Ordering::SeqCst) {
            match reload() {
                Ok(new) => {
                    stats_every = (new.stats_log_interval_secs > 0)
                        .then(|| Duration::from_secs(new.stats_log_interval_secs));
                    next_stats = stats_every.map(|d| Instant::now() + d);
                    apply_reload(&mut core, new);
                }
                Err(e) => warn!("SIGHUP: configuration not reloaded, keeping the current one: {e}"),
            }
        }
        let now = Instant::now();
        core.set_wall_clock(now, unix_ms());
        if let Some(m) = metrics.as_mut() {
            m.expire(poll.registry(), now);
        }
        while let Some(done) = store.try_done()? {
            if apply_done(&mut core, now, done)? {
                store_busy = false;
            }
        }
        if let Some(l) = &listener {
            for remote in l.take() {
                core.on_remote(now, remote);
            }
            l.set_sessions(core.session_count());
        }
        if readable {
            let mut received = 0;
            while received < RECV_BUDGET {
                match inbox.recv(&socket) {
                    Ok(0) => break,
                    Ok(n) => {
                        received += n;
                        for (from, bytes) in inbox.datagrams() {
                            core.handle(now, from, bytes);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // e.g. an ICMP error reported on the socket: not fatal for a server.
                        debug!("recv failed: {e}");
                        received += 1;
                    }
                }
            }
            // Budget used up before the socket ran dry: come back without sleeping.
            readable = received >= RECV_BUDGET;
        }
        for (id, outcome) in pool.results() {
            core.on_password_done(now, id, outcome);
        }
        if core.poll_timeout().is_some_and(|t| t <= now) {
            core.handle_timeout(now);
        }
        while let Some(job) = core.poll_password_job() {
            pool.submit(job);
        }
        if !store_busy && now >= next_external {
            // Asked between batches, so the answer cannot miss one of ours (see
            // `Server::sync_sessions`); batches wait for it.
            next_external = now + EXTERNAL_CHECK;
            store.submit(Job::CheckExternal);
            store_busy = true;
        }
        if !store_busy {
            if let Some((n, writes)) = core.take_writes() {
                store.submit(Job::Commit(n, writes));
                store_busy = true;
            }
        }
        // Reads go after the batches they must see (the store serves jobs in order).
        while let Some(read) = core.poll_read() {
            store.submit(Job::Read(read));
        }
        while let Some(t) = core.poll_transmit() {
            outbox.push(t.to, t.bytes);
        }
        outbox.flush(&socket);
        if let (Some(at), Some(every)) = (next_stats, stats_every) {
            if now >= at {
                info!("stats: {}", summary(&core, &outbox));
                next_stats = Some(now + every);
            }
        }
    }
    // Finish what the store is doing, then store the rest (delivered marks too) and send what
    // that releases.
    core.flush_delivered();
    loop {
        if !store_busy {
            let Some((n, writes)) = core.take_writes() else { break };
            store.submit(Job::Commit(n, writes));
            store_busy = true;
        }
        let done = store.wait().ok_or("the store thread stopped")?;
        if apply_done(&mut core, Instant::now(), done)? {
            store_busy = false;
        }
    }
    store.submit(Job::Flush);
    loop {
        match store.wait().ok_or("the store thread stopped")? {
            Done::Flushed(r) => {
                if let Err(e) = r {
                    warn!("storage: {e}");
                }
                break;
            }
            other => {
                apply_done(&mut core, Instant::now(), other)?;
            }
        }
    }
    while let Some(t) = core.poll_transmit() {
        outbox.push(t.to, t.bytes);
    }
    outbox.flush(&socket);
    info!("stopped: {}", summary(&core, &outbox));
    Ok(())
}

/// Milliseconds since the Unix epoch by the system clock (0 if it is set before 1970).
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Kernel buffer asked for on the daemon's socket, each way. The default (~208 KiB) overflows
/// under fan-out, when the acks of a burst of pushes arrive together: every lost ack costs a
/// retransmission timeout. The kernel caps it at net.core.rmem_max / wmem_max.
const SOCKET_BUFFER: usize = 4 << 20;

/// Binds the UDP socket with large kernel buffers, non-blocking, for mio.
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, result) in [
        ("receive", socket.set_recv_buffer_size(SOCKET_BUFFER)),
        ("send", socket.set_send_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = result {
            warn!("cannot enlarge the socket's {what} buffer: {e}");
        }
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    debug!(
        "socket buffers: receive {:?}, send {:?} bytes",
        socket.recv_buffer_size().ok(),
        socket.send_buffer_size().ok()
    );
    Ok(UdpSocket::from_std(socket.into()))
}

/// Applies a reloaded configuration: limits, timers, argon2 cost and the log level change now;
/// the rest needs a restart, and the log says so.
fn apply_reload(core: &mut Server, new: ServerConfig) {
    let old = core.config().clone();
    let old_t = toml::Table::try_from(&old).expect("config serializes");
    let new_t = toml::Table::try_from(&new).expect("config serializes");
    let mut kept = new.clone();
    let mut changed = Vec::new();
    for (key, value) in &new_t {
        if old_t.get(key) == Some(value) {
            continue;
        }
        if RESTART_KEYS.contains(&key.as_str()) {
            warn!("SIGHUP: `{key}` changed to {value}; it takes effect after a restart");
        } else {
            changed.push(format!("{key}: {} -> {value}", old_t[key]));
        }
    }
    // Keep what cannot change at runtime.
    kept.listen = old.listen;
    kept.data_dir = old.data_dir;
    kept.storage = old.storage;
    kept.postgres_url = old.postgres_url;
    kept.postgres_password_file = old.postgres_password_file;
    kept.node_name = old.node_name;
    kept.password_workers = old.password_workers;
    kept.metrics_listen = old.metrics_listen;
    kept.max_inbox = old.max_inbox;
    kept.reply_cache_ttl_secs = old.reply_cache_ttl_secs;
    kept.reply_cache_max_unauthenticated = old.reply_cache_max_unauthenticated;
    core.set_config(kept);
    if changed.is_empty() {
        info!("SIGHUP: configuration reloaded, nothing changed");
    } else {
        info!("SIGHUP: configuration reloaded: {}", changed.join(", "));
    }
}

/// Settings that only a restart applies.
const RESTART_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "storage",
    "postgres_url",
    "postgres_password_file",
    "node_name",
    "password_workers",
    "metrics_listen",
    "max_inbox",
    "reply_cache_ttl_secs",
    "reply_cache_max_unauthenticated",
];

/// One line of counters, logged every `stats_log_interval_secs` and at exit.
fn summary(core: &Server, outbox: &Outbox) -> String {
    let s = core.stats();
    let mean_batch = if s.commits > 0 { s.committed_writes as f64 / s.commits as f64 } else { 0.0 };
    format!(
        "sessions={} opened={} expired={} datagrams_in={} requests={} errors={} duplicates={} undecodable={} \
         pushes_sent={} acked={} retransmitted={} dropped={} commits={} commit_failures={} writes={} \
         mean_batch={mean_batch:.1} max_batch={} password_queue={} datagrams_out={} send_drops={}",
        core.session_count(),
        s.sessions_opened,
        s.sessions_expired,
        s.datagrams_in,
        s.requests,
        s.errors,
        s.duplicate_requests,
        s.undecodable,
        s.pushes_sent,
        s.pushes_acked,
        s.pushes_retransmitted,
        s.pushes_dropped,
        s.commits,
        s.commit_failures,
        s.committed_writes,
        s.largest_batch,
        core.password_jobs(),
        outbox.sent,
        outbox.dropped,
    )
}

/// Hands a finished store job to the core; true if it was a commit or a check (the jobs one of
/// which may be under way at a time).
fn apply_done(core: &mut Server, now: Instant, done: Done) -> Result<bool, String> {
    match done {
        Done::Read { id, result } => {
            core.on_read(now, id, result);
            return Ok(false);
        }
        Done::Flushed(_) => return Ok(false),
        Done::Committed { n, writes, outcome } => {
            // Registrations another node won are answered "name taken" when the batch's
            // replies go; what the commit found for later comes after them.
            core.on_names_taken(&outcome.names_taken);
            core.on_committed(now, n, writes);
            for remote in outcome.remote {
                core.on_remote(now, remote);
            }
        }
        Done::Failed { n, writes, error, durable, survivable } => {
            // Nothing of the batch is stored and none of its replies has left: undo it in memory
            // and tell those clients to retry. If even reading fails, stop (that loses nothing
            // acknowledged either), unless the store reconnects by itself: then the core's own
            // idea of what is stored serves.
            log::error!("storage commit of {writes} write(s) failed: {error}");
            let durable = match durable {
                Ok(d) => d,
                Err(e) if survivable => {
                    warn!("storage unreadable after a failed commit ({e}); going on, reconnecting");
                    core.assumed_durable()
                }
                Err(e) => return Err(format!("storage unreadable after a failed commit, stopping: {e}")),
            };
            core.on_commit_failed(now, n, durable);
        }
        // Accounts added, deleted or given a new password by `udpmsgd user ...`.
        Done::External(Ok(Some(durable))) => core.sync_sessions(now, durable),
        Done::External(Ok(None)) => {}
        Done::External(Err(e)) => debug!("cannot check the store for outside changes: {e}"),
    }
    Ok(true)
}
