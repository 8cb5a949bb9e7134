//! The daemon's mio loop: it only moves bytes and time between the socket, the core, the store
//! and the password workers.
//!
//! One turn: wait for readiness or the core's deadline; receive until `WouldBlock` (at most
//! `RECV_BUDGET` datagrams, so output and commits are never starved); feed password results and
//! timers; hand out password jobs; commit the turn's writes as one batch; send everything the
//! core released.

#[path = "../common/udp.rs"]
mod udp;

use crate::workers::PasswordPool;
use log::{debug, info};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::SeedableRng;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udp::Outbox;
use udpmsg::config::{ServerConfig, StorageKind};
use udpmsg::password::HashParams;
use udpmsg::server::Server;
use udpmsg::store::{memory::MemoryStore, sqlite::SqliteStore, Store};

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
/// Datagrams received per turn before the loop commits and sends.
const RECV_BUDGET: usize = 1024;
/// Datagrams queued while the socket is not writable.
const OUTBOX_MAX: usize = 65_536;
/// Largest datagram read; anything longer than the protocol's limit is dropped by the decoder.
const RECV_BUF: usize = 2048;

pub fn run(cfg: ServerConfig, on_listening: &mut dyn FnMut(SocketAddr)) -> Result<(), String> {
    let mut store: Box<dyn Store> = match cfg.storage {
        StorageKind::Sqlite => {
            Box::new(SqliteStore::open(&cfg.data_dir, cfg.max_inbox as usize).map_err(|e| e.to_string())?)
        }
        StorageKind::Memory => Box::new(MemoryStore::new(cfg.max_inbox as usize)),
    };
    store.begin_epoch().map_err(|e| format!("cannot start storage: {e}"))?;
    let snapshot = store.load().map_err(|e| format!("cannot load storage: {e}"))?;

    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut socket = UdpSocket::bind(cfg.listen).map_err(|e| format!("cannot bind {}: {e}", cfg.listen))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)
        .map_err(|e| e.to_string())?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?);

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    // signal_hook's flag does not wake poll; a small thread turns the signal into a wake-up.
    {
        let waker = waker.clone();
        let mut signals =
            signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
                .map_err(|e| format!("cannot install signal handler: {e}"))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = waker.wake();
                }
            })
            .map_err(|e| e.to_string())?;
    }

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
    let mut core = Server::new(cfg, params, snapshot, Box::new(rng), Instant::now());

    info!("listening on {local} (storage: {storage:?}, protocol v{})", udpmsg::proto::VERSION);
    on_listening(local);

    let mut events = Events::with_capacity(256);
    let mut outbox = Outbox::new(OUTBOX_MAX);
    let mut buf = vec![0u8; RECV_BUF];
    let mut readable = true;
    let stats_every = (stats_interval > 0).then(|| Duration::from_secs(stats_interval));
    let mut next_stats = stats_every.map(|d| Instant::now() + d);
    loop {
        let timeout = if readable {
            Some(Duration::ZERO)
        } else {
            let wake = match (core.poll_timeout(), next_stats) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
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
            }
        }
        if stop.load(Ordering::Relaxed) {
            info!("signal received, shutting down");
            break;
        }
        let now = Instant::now();
        if readable {
            readable = false;
            for _ in 0..RECV_BUDGET {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => core.handle(now, from, &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // e.g. an ICMP error reported on the socket: not fatal for a server.
                        debug!("recv failed: {e}");
                    }
                }
                // Budget used up without WouldBlock: come back without sleeping.
                readable = true;
            }
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
        commit(&mut core, store.as_mut(), now)?;
        while let Some(t) = core.poll_transmit() {
            outbox.send(&socket, t.to, t.bytes);
        }
        if let (Some(at), Some(every)) = (next_stats, stats_every) {
            if now >= at {
                info!("stats: {}", summary(&core, &outbox));
                next_stats = Some(now + every);
            }
        }
    }
    commit(&mut core, store.as_mut(), Instant::now())?;
    while let Some(t) = core.poll_transmit() {
        outbox.send(&socket, t.to, t.bytes);
    }
    info!("stopped: {}", summary(&core, &outbox));
    Ok(())
}

/// One line of counters, logged every `stats_log_interval_secs` and at exit.
fn summary(core: &Server, outbox: &Outbox) -> String {
    let s = core.stats();
    let mean_batch = if s.commits > 0 { s.committed_writes as f64 / s.commits as f64 } else { 0.0 };
    format!(
        "sessions={} opened={} expired={} datagrams_in={} requests={} errors={} duplicates={} undecodable={} \
         pushes_sent={} acked={} retransmitted={} dropped={} commits={} commit_failures={} writes={} \
         mean_batch={mean_batch:.1} max_batch={} datagrams_out={} send_drops={}",
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
        outbox.sent,
        outbox.dropped,
    )
}

/// Group commit: everything this turn wrote, in one batch; the replies that depend on it are
/// released only after the store has returned.
fn commit(core: &mut Server, store: &mut dyn Store, now: Instant) -> Result<(), String> {
    let Some((n, writes)) = core.take_writes() else { return Ok(()) };
    match store.commit(&writes) {
        Ok(()) => core.on_committed(now, n, writes.len()),
        Err(e) => {
            // Nothing of the batch is stored and none of its replies has left: undo it in memory
            // and tell those clients to retry. If even reading fails, stop: that loses nothing
            // acknowledged either.
            log::error!("storage commit of {} write(s) failed: {e}", writes.len());
            let durable = store
                .load()
                .map_err(|e| format!("storage unreadable after a failed commit, stopping: {e}"))?;
            core.on_commit_failed(now, n, durable);
        }
    }
    Ok(())
}
