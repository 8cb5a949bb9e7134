//! Prometheus text-format metrics over HTTP on a separate TCP port (`metrics_listen`, off by
//! default). Served from the event loop itself: the listener and its few connections are mio
//! sources, each request is answered from the core's counters at that moment, and the
//! connection is closed. Only `GET /metrics` is served; anything else gets 404 or 400. A
//! connection that has not finished within [`IDLE`] is closed, and when all
//! [`MAX_CONNECTIONS`] are taken a new one replaces the oldest, so slow or silent clients cannot
//! keep the endpoint from a scraper.

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use udpmsg::server::Server;

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 16;
/// A request larger than this is refused.
const MAX_REQUEST: usize = 8192;
/// A connection is closed this long after it was accepted, finished or not (a scrape takes
/// milliseconds).
pub const IDLE: Duration = Duration::from_secs(5);

struct Conn {
    stream: TcpStream,
    accepted: Instant,
    request: Vec<u8>,
    response: Option<Vec<u8>>,
    written: usize,
}

pub struct Metrics {
    listener: TcpListener,
    token: Token,
    first_conn_token: usize,
    conns: HashMap<Token, Conn>,
    next: usize,
}

/// Counters the shell keeps outside the core.
pub struct ShellCounters {
    pub datagrams_out: u64,
    pub send_drops: u64,
    /// One node of several on PostgreSQL: what its listener did.
    pub listener: Option<std::sync::Arc<crate::listener::ListenerStats>>,
}

impl Metrics {
    /// Binds `addr`; tokens `token` and `first_conn_token..` are this server's.
    pub fn bind(
        addr: SocketAddr,
        registry: &Registry,
        token: Token,
        first_conn_token: usize,
    ) -> io::Result<Metrics> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, token, Interest::READABLE)?;
        Ok(Metrics { listener, token, first_conn_token, conns: HashMap::new(), next: first_conn_token })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether `token` belongs to the metrics server.
    pub fn owns(&self, token: Token) -> bool {
        token == self.token || token.0 >= self.first_conn_token
    }

    pub fn ready(&mut self, registry: &Registry, token: Token, core: &Server, shell: &ShellCounters) {
        if token == self.token {
            self.accept(registry);
            return;
        }
        let done = match self.conns.get_mut(&token) {
            Some(conn) => serve(conn, core, shell),
            None => return,
        };
        if done {
            self.close(registry, token);
        }
    }

    /// Closes the connections accepted more than [`IDLE`] ago.
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        let old: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| now.duration_since(c.accepted) >= IDLE)
            .map(|(t, _)| *t)
            .collect();
        for token in old {
            self.close(registry, token);
        }
    }

    /// When [`Metrics::expire`] has something to close next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.accepted + IDLE).min()
    }

    fn close(&mut self, registry: &Registry, token: Token) {
        if let Some(mut conn) = self.conns.remove(&token) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        // The oldest gives way: silent connections cannot hold the endpoint.
                        if let Some(oldest) =
                            self.conns.iter().min_by_key(|(_, c)| c.accepted).map(|(t, _)| *t)
                        {
                            self.close(registry, oldest);
                        }
                    }
                    let token = Token(self.next);
                    self.next = if self.next == usize::MAX { self.first_conn_token } else { self.next + 1 };
                    if registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_ok()
                    {
                        let accepted = Instant::now();
                        let conn = Conn { stream, accepted, request: Vec::new(), response: None, written: 0 };
                        self.conns.insert(token, conn);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("metrics accept: {e}");
                    return;
                }
            }
        }
    }
}

/// Advances one connection; true when it is finished.
fn serve(conn: &mut Conn, core: &Server, shell: &ShellCounters) -> bool {
    if conn.response.is_none() {
        let mut buf = [0u8; 1024];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    conn.request.extend_from_slice(&buf[..n]);
                    if conn.request.len() > MAX_REQUEST {
                        conn.response = Some(http(400, "Bad Request", "text/plain", "request too large\n"));
                        break;
                    }
                    if conn.request.windows(4).any(|w| w == b"\r\n\r\n") {
                        conn.response = Some(respond(&conn.request, core, shell));
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }
    let Some(resp) = &conn.response else { return false };
    while conn.written < resp.len() {
        match conn.stream.write(&resp[conn.written..]) {
            Ok(0) => return true,
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    true
}

fn respond(request: &[u8], core: &Server, shell: &ShellCounters) -> Vec<u8> {
    let head = String::from_utf8_lossy(request);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {
            http(200, "OK", "text/plain; version=0.0.4; charset=utf-8", &render(core, shell))
        }
        (Some(_), Some(_)) => http(404, "Not Found", "text/plain", "try /metrics\n"),
        _ => http(400, "Bad Request", "text/plain", "bad request\n"),
    }
}

fn http(code: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn as_refs(v: &[(String, u64)]) -> Vec<(&str, u64)> {
    v.iter().map(|(l, n)| (l.as_str(), *n)).collect()
}

/// The counters in Prometheus text format.
pub fn render(core: &Server, shell: &ShellCounters) -> String {
    let s = core.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP udpmsg_{name} {help}");
        let _ = writeln!(out, "# TYPE udpmsg_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "udpmsg_{name}{labels} {v}");
        }
    };
    metric("sessions", "gauge", "Sessions currently open.", &[("", core.session_count() as u64)]);
    metric("sessions_opened_total", "counter", "Sessions opened by login.", &[("", s.sessions_opened)]);
    metric(
        "sessions_expired_total",
        "counter",
        "Sessions expired (idle or lifetime).",
        &[("", s.sessions_expired)],
    );
    metric(
        "sessions_unresponsive_total",
        "counter",
        "Times a session stopped acknowledging pushes.",
        &[("", s.sessions_unresponsive)],
    );
    let by_kind: Vec<(String, u64)> =
        s.requests_by_kind.iter().map(|(k, v)| (format!("{{kind=\"{k}\"}}"), *v)).collect();
    let by_kind: Vec<(&str, u64)> = by_kind.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric("requests_total", "counter", "Requests received, by kind.", &by_kind);
    let by_code: Vec<(String, u64)> =
        s.errors_by_code.iter().map(|(k, v)| (format!("{{code=\"{k}\"}}"), *v)).collect();
    let by_code: Vec<(&str, u64)> = by_code.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric("errors_total", "counter", "Error answers, by code.", &by_code);
    metric(
        "duplicate_requests_total",
        "counter",
        "Retransmitted requests answered from the reply cache or dropped.",
        &[("", s.duplicate_requests)],
    );
    metric("pushes_sent_total", "counter", "Pushes sent for the first time.", &[("", s.pushes_sent)]);
    metric("pushes_acked_total", "counter", "Pushes acknowledged.", &[("", s.pushes_acked)]);
    metric("pushes_retransmitted_total", "counter", "Push retransmissions.", &[("", s.pushes_retransmitted)]);
    metric(
        "pushes_dropped_total",
        "counter",
        "Pushes dropped from a full per-session queue (still in the inbox).",
        &[("", s.pushes_dropped)],
    );
    metric("datagrams_received_total", "counter", "Datagrams received.", &[("", s.datagrams_in)]);
    metric(
        "datagrams_dropped_total",
        "counter",
        "Datagrams dropped without executing them, by reason.",
        &[
            ("{reason=\"undecodable\"}", s.undecodable),
            ("{reason=\"bad_source\"}", s.bad_source),
            ("{reason=\"version\"}", s.version_mismatch),
            ("{reason=\"unpadded\"}", s.unauthenticated_too_short),
            (
                "{reason=\"rate_limited\"}",
                s.requests_throttled
                    + s.logins_throttled
                    + s.registrations_throttled
                    + s.deliveries_throttled,
            ),
        ],
    );
    metric(
        "cookie_retries_total",
        "counter",
        "Logins and registrations asked to prove their address with a cookie first (no hash, no state).",
        &[("", s.retries_sent)],
    );
    metric(
        "path_challenges_total",
        "counter",
        "Challenges sent to a new address of a session before its pushes may move there.",
        &[("", s.path_challenges)],
    );
    metric(
        "paths_validated_total",
        "counter",
        "New session addresses that echoed their challenge (the pushes moved).",
        &[("", s.paths_validated)],
    );
    metric(
        "replies_withheld_total",
        "counter",
        "Replies not sent because they would have amplified traffic to an unverified address.",
        &[("", s.amplification_dropped)],
    );
    metric("datagrams_sent_total", "counter", "Datagrams sent.", &[("", shell.datagrams_out)]);
    if let Some(l) = &shell.listener {
        use std::sync::atomic::Ordering::Relaxed;
        let live = l.nodes_live.load(Relaxed);
        let known = l.nodes_known.load(Relaxed);
        metric(
            "nodes",
            "gauge",
            "Daemons registered on the shared database: live (a heartbeat in the last 5 s) and down.",
            &[("{state=\"live\"}", live), ("{state=\"down\"}", known.saturating_sub(live))],
        );
        metric(
            "node_listener_connected",
            "gauge",
            "Whether the listener's PostgreSQL connection is up.",
            &[("", u64::from(l.connected.load(Relaxed)))],
        );
        metric(
            "node_notifications_total",
            "counter",
            "NOTIFY wake-ups received.",
            &[("", l.notifications.load(Relaxed))],
        );
        metric(
            "node_event_reads_total",
            "counter",
            "Reads of the event cursor.",
            &[("", l.reads.load(Relaxed))],
        );
        metric("node_events_total", "counter", "Event rows read.", &[("", l.events.load(Relaxed))]);
        metric(
            "node_listener_reconnects_total",
            "counter",
            "Times the listener connected again after losing its connection.",
            &[("", l.reconnects.load(Relaxed))],
        );
        metric(
            "node_listener_errors_total",
            "counter",
            "Listener polls that failed.",
            &[("", l.errors.load(Relaxed))],
        );
    }
    if core.is_node() {
        metric(
            "node_remote_messages_total",
            "counter",
            "Messages committed by other nodes and pushed to sessions here.",
            &[("", s.remote_messages)],
        );
        metric(
            "node_sessions_claimed_total",
            "counter",
            "Sessions taken over from other nodes.",
            &[("", s.sessions_claimed)],
        );
        metric(
            "node_sessions_moved_away_total",
            "counter",
            "Sessions other nodes took over.",
            &[("", s.sessions_moved_away)],
        );
        metric(
            "node_sessions_ended_elsewhere_total",
            "counter",
            "Sessions ended by another node or an admin command (account deleted, password changed).",
            &[("", s.sessions_ended_elsewhere)],
        );
        metric(
            "node_claims_throttled_total",
            "counter",
            "Unknown tokens not looked up because their address's allowance was used up.",
            &[("", s.claims_throttled)],
        );
        metric(
            "node_registrations_lost_total",
            "counter",
            "Registrations answered \"name taken\" because another node registered the name first.",
            &[("", s.names_taken_elsewhere)],
        );
    }
    metric("send_drops_total", "counter", "Datagrams the socket could not take.", &[("", shell.send_drops)]);
    metric("storage_commits_total", "counter", "Batches committed.", &[("", s.commits)]);
    metric(
        "storage_commit_failures_total",
        "counter",
        "Batches that failed to commit.",
        &[("", s.commit_failures)],
    );
    metric(
        "storage_writes_total",
        "counter",
        "Writes committed (sum of batch sizes).",
        &[("", s.committed_writes)],
    );
    metric("storage_batch_max", "gauge", "Largest batch committed.", &[("", s.largest_batch)]);
    metric(
        "password_queue_depth",
        "gauge",
        "Password jobs queued or running.",
        &[("", core.password_jobs() as u64)],
    );
    let cache = core.cache_stats();
    let labelled = |m: &std::collections::BTreeMap<&'static str, u64>| -> Vec<(String, u64)> {
        m.iter().map(|(k, v)| (format!("{{kind=\"{k}\"}}"), *v)).collect()
    };
    let hits = labelled(&cache.hits);
    let misses = labelled(&cache.misses);
    let reads = labelled(&s.reads_by_kind);
    metric("cache_hits_total", "counter", "Lookups the cache answered, by kind.", &as_refs(&hits));
    metric(
        "cache_misses_total",
        "counter",
        "Lookups the cache could not answer, by kind.",
        &as_refs(&misses),
    );
    metric("cache_bytes", "gauge", "Estimated memory the cache holds.", &[("", cache.bytes as u64)]);
    metric("cache_entries", "gauge", "Entries in the cache.", &[("", cache.entries as u64)]);
    metric(
        "cache_evictions_total",
        "counter",
        "Entries evicted to stay within cache_bytes.",
        &[("", cache.evictions)],
    );
    metric("storage_reads_total", "counter", "Reads issued to the store, by kind.", &as_refs(&reads));
    metric("storage_read_failures_total", "counter", "Reads that failed.", &[("", s.read_failures)]);
    let (parked, in_flight) = core.reads_waiting();
    metric(
        "requests_waiting_for_reads",
        "gauge",
        "Requests parked until their reads are answered.",
        &[("", parked as u64)],
    );
    metric(
        "storage_reads_in_flight",
        "gauge",
        "Reads issued and not yet answered.",
        &[("", in_flight as u64)],
    );
    metric(
        "busy_total",
        "counter",
        "Requests refused as busy (password queue full or too slow, or session table full).",
        &[("", s.busy)],
    );
    metric(
        "busy_password_slow_total",
        "counter",
        "Of those, refused because password jobs waited longer than password_max_wait_ms.",
        &[("", s.busy_slow)],
    );
    out
}
