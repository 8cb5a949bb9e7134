//! One node of several on PostgreSQL: a thread with its own connection that `LISTEN`s for this
//! node's events, reads them with its cursor (on a notification, every second, and at once
//! after reconnecting), sends the node's heartbeat and hands the events to the loop through a
//! channel and the loop's `mio::Waker`. The synchronous client blocks; it never runs on the
//! event loop.

use mio::Waker;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use udpmsg::store::postgres::{Listener, POLL_EVERY};
use udpmsg::store::Remote;

/// What the listener did, for metrics.
#[derive(Default)]
pub struct ListenerStats {
    pub notifications: AtomicU64,
    pub reads: AtomicU64,
    pub events: AtomicU64,
    pub reconnects: AtomicU64,
    pub errors: AtomicU64,
    pub connected: AtomicBool,
    /// Nodes whose heartbeat is recent, and all nodes registered.
    pub nodes_live: AtomicU64,
    pub nodes_known: AtomicU64,
}

pub struct ListenerThread {
    events: Receiver<Vec<Remote>>,
    stop: Arc<AtomicBool>,
    sessions: Arc<AtomicU64>,
    pub stats: Arc<ListenerStats>,
}

/// Error lines at most this often (a database that is down would otherwise log every poll).
const LOG_EVERY: Duration = Duration::from_secs(10);

impl ListenerThread {
    pub fn spawn(mut listener: Listener, waker: Arc<Waker>) -> std::io::Result<ListenerThread> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(ListenerStats::default());
        let (stop2, sessions2, stats2) = (stop.clone(), sessions.clone(), stats.clone());
        thread::Builder::new().name("pg-listener".into()).spawn(move || {
            let mut logged: Option<Instant> = None;
            while !stop2.load(Ordering::Relaxed) {
                match listener.poll(POLL_EVERY, sessions2.load(Ordering::Relaxed)) {
                    Ok(events) => {
                        if !stats2.connected.swap(true, Ordering::Relaxed) && logged.is_some() {
                            log::info!("PostgreSQL listener connected again");
                        }
                        if !events.is_empty() {
                            if tx.send(events).is_err() {
                                return;
                            }
                            let _ = waker.wake();
                        }
                    }
                    Err(e) => {
                        stats2.connected.store(false, Ordering::Relaxed);
                        stats2.errors.fetch_add(1, Ordering::Relaxed);
                        if logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                            log::warn!("PostgreSQL listener: {e}; reconnecting");
                            logged = Some(Instant::now());
                        }
                    }
                }
                stats2.notifications.store(listener.notifications, Ordering::Relaxed);
                stats2.reads.store(listener.reads, Ordering::Relaxed);
                stats2.events.store(listener.events, Ordering::Relaxed);
                stats2.reconnects.store(listener.reconnects, Ordering::Relaxed);
                let (live, known) = listener.nodes;
                stats2.nodes_live.store(live, Ordering::Relaxed);
                stats2.nodes_known.store(known, Ordering::Relaxed);
            }
        })?;
        Ok(ListenerThread { events: rx, stop, sessions, stats })
    }

    /// Events that arrived, without blocking.
    pub fn take(&self) -> Vec<Remote> {
        let mut out = Vec::new();
        while let Ok(events) = self.events.try_recv() {
            out.extend(events);
        }
        out
    }

    /// The session count its heartbeat reports.
    pub fn set_sessions(&self, n: usize) {
        self.sessions.store(n as u64, Ordering::Relaxed);
    }
}

impl Drop for ListenerThread {
    fn drop(&mut self) {
        // The thread notices within a poll; nothing it holds needs flushing.
        self.stop.store(true, Ordering::Relaxed);
    }
}
