//! `udpmsg-proxy`: a UDP proxy that loses, duplicates, delays and reorders datagrams.
//!
//! It sits between clients and a server (any UDP service, not only `udpmsgd`) and applies the
//! fault model of [`udpmsg::netem`] independently to each direction: `--up` to datagrams from
//! clients to the server, `--down` to datagrams from the server back to clients. Both default
//! to no faults. The spec syntax is that of [`FaultConfig::parse`]:
//! `loss=P,dup=P,reorder=P,delay=D,jitter=D,window=D` with probabilities in `0..=1` (or `N%`)
//! and durations like `5ms`; omitted keys mean no such fault.
//!
//! Like a NAT, the proxy opens a separate upstream socket (ephemeral port, same address family
//! as the upstream) for each client address it hears from, so the server sees one distinct
//! source per client; replies arriving on that socket go back to that client from the listen
//! socket. At most `--max-clients` mappings exist at a time (datagrams from further clients are
//! dropped with a warning) and a mapping unused in both directions for `--idle-timeout` is
//! closed. Datagrams longer than 2048 bytes are dropped.
//!
//! Once bound, the proxy prints exactly one line `listening on ADDR` to stdout (the real
//! address, useful with port 0). Everything else goes to stderr: the seed (pass it back with
//! `--seed` to replay the same fault decisions for the same traffic), and logs controlled by
//! `RUST_LOG` (default `info`). Counters are logged every `--stats-interval` if given, and on
//! SIGINT/SIGTERM before exiting.
//!
//! # Examples
//!
//! ```text
//! # A quarter of the datagrams lost each way, some duplicated and reordered:
//! udpmsg-proxy --listen 127.0.0.1:7071 --upstream 127.0.0.1:7070 --seed 42 \
//!     --up "loss=0.25,dup=0.1,reorder=0.1,window=50ms" \
//!     --down "loss=0.25,dup=0.1,reorder=0.1,window=50ms"
//!
//! # A slow, jittery link (40 ms RTT) that drops 5% of the replies, with counters every 10 s:
//! udpmsg-proxy --upstream 127.0.0.1:7070 --up "delay=20ms,jitter=5ms" \
//!     --down "delay=20ms,jitter=5ms,loss=0.05" --stats-interval 10s
//!
//! # Ephemeral listen port, printed on stdout for a test harness to read:
//! udpmsg-proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:7070 --down loss=1
//! ```

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use log::{debug, error, info, warn};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use udpmsg::netem::{parse_duration, FaultConfig, Netem, NetemStats};

/// Longest datagram forwarded; longer ones are dropped (and counted).
const MAX_DATAGRAM: usize = 2048;
/// Datagrams waiting per socket for WRITABLE after a send would have blocked.
const SEND_QUEUE_LIMIT: usize = 1024;
/// Shortest interval between two "too many clients" warnings.
const REJECT_WARN_INTERVAL: Duration = Duration::from_secs(1);

const LISTEN: Token = Token(0);
const SIGNAL: Token = Token(1);
const FIRST_CLIENT_TOKEN: usize = 2;

/// A UDP proxy that injects loss, duplication, delay and reordering, per direction.
#[derive(Parser, Debug)]
#[command(name = "udpmsg-proxy", version)]
struct Args {
    /// Address to listen on for clients (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,

    /// Address of the server to forward to.
    #[arg(long)]
    upstream: String,

    /// Seed of the fault model (default: from the clock; printed on stderr either way).
    #[arg(long)]
    seed: Option<u64>,

    /// Faults on datagrams from clients to the server, as KEY=VALUE pairs separated by commas:
    /// loss, dup, reorder (probabilities) and delay, jitter, window (durations), e.g.
    /// "loss=0.25,dup=0.1,reorder=0.1,delay=5ms,jitter=2ms,window=50ms".
    #[arg(long, default_value = "none", value_name = "SPEC")]
    up: FaultConfig,

    /// Faults on datagrams from the server to clients (same syntax as --up).
    #[arg(long, default_value = "none", value_name = "SPEC")]
    down: FaultConfig,

    /// Maximum number of client mappings at a time; datagrams from further clients are dropped.
    #[arg(long, default_value_t = 1024)]
    max_clients: usize,

    /// Close a client's mapping after this long without traffic either way (e.g. 120s, 500ms;
    /// a bare number is seconds).
    #[arg(long, default_value = "120s", value_parser = parse_cli_duration, value_name = "DURATION")]
    idle_timeout: Duration,

    /// Log counters at this interval (e.g. 10s; a bare number is seconds).
    #[arg(long, value_parser = parse_cli_duration, value_name = "DURATION")]
    stats_interval: Option<Duration>,

    /// Maximum number of datagrams held (delayed) in each direction; further ones are dropped.
    #[arg(long, default_value_t = 65536)]
    max_queue: usize,
}

/// A duration for the command line: as in the fault spec, or a bare number of seconds.
fn parse_cli_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map(Duration::from_secs).map_err(|_| format!("`{s}` is out of range"));
    }
    parse_duration(s)
}

/// The first address `s` resolves to.
fn resolve(what: &str, s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("--{what} {s}: {e}"))?
        .next()
        .ok_or_else(|| format!("--{what} {s}: resolves to no address"))
}

/// SplitMix64 finalizer: derives independent per-direction seeds from the user's seed.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sends what `queue` holds until it is empty or the socket would block. Datagrams the kernel
/// refuses for another reason are dropped (and counted): UDP is lossy anyway.
fn flush<A>(
    queue: &mut VecDeque<(A, Vec<u8>)>,
    sent: &mut u64,
    dropped: &mut u64,
    mut send: impl FnMut(&A, &[u8]) -> io::Result<usize>,
) {
    while let Some((dest, bytes)) = queue.front() {
        match send(dest, bytes) {
            Ok(_) => *sent += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!("send failed, dropping datagram: {e}");
                *dropped += 1;
            }
        }
        queue.pop_front();
    }
}

/// Queues a datagram behind those already waiting (bounded), then sends what it can.
fn push_and_flush<A>(
    queue: &mut VecDeque<(A, Vec<u8>)>,
    item: (A, Vec<u8>),
    sent: &mut u64,
    dropped: &mut u64,
    send: impl FnMut(&A, &[u8]) -> io::Result<usize>,
) {
    if queue.len() >= SEND_QUEUE_LIMIT {
        debug!("send queue full, dropping datagram");
        *dropped += 1;
        return;
    }
    queue.push_back(item);
    flush(queue, sent, dropped, send);
}

/// One client's upstream socket.
struct Mapping {
    socket: UdpSocket,
    token: Token,
    last_active: Instant,
    /// Datagrams for the server waiting for WRITABLE.
    pending: VecDeque<((), Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Counters {
    from_clients: u64,
    from_upstream: u64,
    to_upstream: u64,
    to_clients: u64,
    oversize: u64,
    rejected: u64,
    overflow: u64,
    send_dropped: u64,
    unmapped: u64,
    opened: u64,
    expired: u64,
}

struct Proxy {
    poll: Poll,
    listen: UdpSocket,
    /// Datagrams for clients waiting for WRITABLE on the listen socket.
    listen_pending: VecDeque<(SocketAddr, Vec<u8>)>,
    upstream: SocketAddr,
    /// Local address the upstream sockets bind to (port 0).
    bind_addr: SocketAddr,
    clients: HashMap<SocketAddr, Mapping>,
    tokens: HashMap<Token, SocketAddr>,
    next_token: usize,
    up: Netem<(SocketAddr, Vec<u8>)>,
    down: Netem<(SocketAddr, Vec<u8>)>,
    max_clients: usize,
    max_queue: usize,
    idle_timeout: Duration,
    c: Counters,
    rejected_since_warn: u64,
    last_reject_warn: Option<Instant>,
    buf: Box<[u8]>,
}

impl Proxy {
    /// Reads every datagram waiting on the listen socket.
    fn read_listen(&mut self, now: Instant) {
        loop {
            match self.listen.recv_from(&mut self.buf) {
                Ok((n, src)) => self.on_client_datagram(now, src, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    warn!("receive on listen socket: {e}");
                    return;
                }
            }
        }
    }

    fn on_client_datagram(&mut self, now: Instant, src: SocketAddr, n: usize) {
        self.c.from_clients += 1;
        if n > MAX_DATAGRAM {
            debug!("dropping datagram of more than {MAX_DATAGRAM} bytes from {src}");
            self.c.oversize += 1;
            return;
        }
        if !self.clients.contains_key(&src) && !self.open_mapping(now, src) {
            return;
        }
        if let Some(m) = self.clients.get_mut(&src) {
            m.last_active = now;
        }
        if self.up.len() >= self.max_queue {
            debug!("upstream fault queue full, dropping datagram from {src}");
            self.c.overflow += 1;
            return;
        }
        self.up.send(now, (src, self.buf[..n].to_vec()));
    }

    /// Drops a datagram from a client that could not get a mapping, warning at most once per
    /// [`REJECT_WARN_INTERVAL`] so a flood of new sources cannot flood the log.
    fn reject(&mut self, now: Instant, client: SocketAddr, reason: &str) {
        self.c.rejected += 1;
        self.rejected_since_warn += 1;
        let due =
            self.last_reject_warn.is_none_or(|t| now.saturating_duration_since(t) >= REJECT_WARN_INTERVAL);
        if due {
            warn!(
                "dropped {} datagram(s) from new clients (latest {client}): {reason}",
                self.rejected_since_warn
            );
            self.rejected_since_warn = 0;
            self.last_reject_warn = Some(now);
        } else {
            debug!("dropped datagram from new client {client}: {reason}");
        }
    }

    /// Opens an upstream socket for a new client; false if the datagram must be dropped.
    fn open_mapping(&mut self, now: Instant, client: SocketAddr) -> bool {
        if self.clients.len() >= self.max_clients {
            let reason = format!("{} client mappings in use (--max-clients)", self.clients.len());
            self.reject(now, client, &reason);
            return false;
        }
        let mut socket = match UdpSocket::bind(self.bind_addr) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("cannot open upstream socket on {}: {e}", self.bind_addr);
                self.reject(now, client, &reason);
                return false;
            }
        };
        // Connected: the kernel then accepts only the server's replies on this socket.
        if let Err(e) = socket.connect(self.upstream) {
            let reason = format!("cannot connect upstream socket to {}: {e}", self.upstream);
            self.reject(now, client, &reason);
            return false;
        }
        let token = loop {
            let t = Token(self.next_token);
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CLIENT_TOKEN);
            if t.0 >= FIRST_CLIENT_TOKEN && !self.tokens.contains_key(&t) {
                break t;
            }
        };
        if let Err(e) =
            self.poll.registry().register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)
        {
            self.reject(now, client, &format!("cannot register upstream socket: {e}"));
            return false;
        }
        match socket.local_addr() {
            Ok(local) => debug!("new client {client}, upstream via {local}"),
            Err(_) => debug!("new client {client}"),
        }
        self.c.opened += 1;
        self.tokens.insert(token, client);
        self.clients.insert(client, Mapping { socket, token, last_active: now, pending: VecDeque::new() });
        true
    }

    /// Reads every datagram waiting on a client's upstream socket.
    fn read_upstream(&mut self, now: Instant, token: Token) {
        let Some(&client) = self.tokens.get(&token) else {
            return;
        };
        let Some(m) = self.clients.get_mut(&client) else {
            return;
        };
        loop {
            match m.socket.recv(&mut self.buf) {
                Ok(n) => {
                    self.c.from_upstream += 1;
                    if n > MAX_DATAGRAM {
                        debug!("dropping datagram of more than {MAX_DATAGRAM} bytes for {client}");
                        self.c.oversize += 1;
                        continue;
                    }
                    m.last_active = now;
                    if self.down.len() >= self.max_queue {
                        debug!("downstream fault queue full, dropping datagram for {client}");
                        self.c.overflow += 1;
                        continue;
                    }
                    self.down.send(now, (client, self.buf[..n].to_vec()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // E.g. ICMP port unreachable while the server is down: keep going.
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    warn!("receive on upstream socket of {client}: {e}");
                    return;
                }
            }
        }
    }

    fn flush_listen(&mut self) {
        let listen = &self.listen;
        flush(&mut self.listen_pending, &mut self.c.to_clients, &mut self.c.send_dropped, |to, bytes| {
            listen.send_to(bytes, *to)
        });
    }

    fn flush_upstream(&mut self, token: Token) {
        let Some(m) = self.tokens.get(&token).and_then(|a| self.clients.get_mut(a)) else {
            return;
        };
        let socket = &m.socket;
        flush(&mut m.pending, &mut self.c.to_upstream, &mut self.c.send_dropped, |_, bytes| {
            socket.send(bytes)
        });
    }

    /// Sends everything the fault models have due by `now`.
    fn deliver(&mut self, now: Instant) {
        while let Some((client, bytes)) = self.up.poll_deliver(now) {
            let Some(m) = self.clients.get_mut(&client) else {
                // The mapping expired while the datagram was delayed.
                self.c.unmapped += 1;
                continue;
            };
            let socket = &m.socket;
            push_and_flush(
                &mut m.pending,
                ((), bytes),
                &mut self.c.to_upstream,
                &mut self.c.send_dropped,
                |_, b| socket.send(b),
            );
        }
        while let Some(item) = self.down.poll_deliver(now) {
            let listen = &self.listen;
            push_and_flush(
                &mut self.listen_pending,
                item,
                &mut self.c.to_clients,
                &mut self.c.send_dropped,
                |to, b| listen.send_to(b, *to),
            );
        }
    }

    /// Closes the mappings idle for at least `--idle-timeout`.
    fn expire(&mut self, now: Instant) {
        let idle = self.idle_timeout;
        let stale: Vec<SocketAddr> = self
            .clients
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_active) >= idle)
            .map(|(a, _)| *a)
            .collect();
        for client in stale {
            if let Some(mut m) = self.clients.remove(&client) {
                if let Err(e) = self.poll.registry().deregister(&mut m.socket) {
                    debug!("deregister upstream socket of {client}: {e}");
                }
                self.tokens.remove(&m.token);
                self.c.expired += 1;
                debug!("client {client} idle for {idle:?}, mapping closed");
            }
        }
    }

    fn log_stats(&self) {
        let c = &self.c;
        info!(
            "clients: {} active, {} opened, {} expired, {} datagrams rejected",
            self.clients.len(),
            c.opened,
            c.expired,
            c.rejected
        );
        info!(
            "up:   received {} from clients, {}, sent {} to upstream",
            c.from_clients,
            fmt_netem(&self.up.stats()),
            c.to_upstream
        );
        info!(
            "down: received {} from upstream, {}, sent {} to clients",
            c.from_upstream,
            fmt_netem(&self.down.stats()),
            c.to_clients
        );
        info!(
            "other drops: {} oversize, {} fault queue full, {} send failed/queue full, {} for \
             expired mappings",
            c.oversize, c.overflow, c.send_dropped, c.unmapped
        );
    }
}

fn fmt_netem(s: &NetemStats) -> String {
    format!(
        "netem[sent {} lost {} duplicated {} reordered {} delivered {} queued {}]",
        s.sent, s.dropped, s.duplicated, s.reordered, s.delivered, s.queued
    )
}

/// Receive errors after which the socket may still hold datagrams (ICMP errors reported on a
/// connected socket, or a signal).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// Makes SIGINT and SIGTERM readable on a pipe registered with `poll` under [`SIGNAL`], so the
/// loop can log its counters before exiting. Returns the write end, which must stay alive.
#[cfg(unix)]
fn register_signals(poll: &Poll) -> io::Result<(mio::unix::pipe::Sender, mio::unix::pipe::Receiver)> {
    use std::os::fd::AsRawFd;
    let (sender, mut receiver) = mio::unix::pipe::new()?;
    poll.registry().register(&mut receiver, SIGNAL, Interest::READABLE)?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register_raw(sig, sender.as_raw_fd())?;
    }
    Ok((sender, receiver))
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    for (dir, cfg) in [("up", &args.up), ("down", &args.down)] {
        cfg.validate().map_err(|e| format!("--{dir}: {e}"))?;
    }
    if args.max_clients == 0 {
        return Err("--max-clients must be at least 1".into());
    }
    if args.idle_timeout.is_zero() {
        return Err("--idle-timeout must be positive".into());
    }
    if args.stats_interval.is_some_and(|d| d.is_zero()) {
        return Err("--stats-interval must be positive".into());
    }
    let listen_addr = resolve("listen", &args.listen)?;
    let upstream = resolve("upstream", &args.upstream)?;
    let bind_ip = match upstream.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    });
    let _ = writeln!(io::stderr(), "udpmsg-proxy: seed {seed}");

    let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut listen = UdpSocket::bind(listen_addr).map_err(|e| format!("cannot bind {listen_addr}: {e}"))?;
    let local = listen.local_addr().map_err(|e| format!("local address of listen socket: {e}"))?;
    poll.registry()
        .register(&mut listen, LISTEN, Interest::READABLE | Interest::WRITABLE)
        .map_err(|e| format!("cannot register listen socket: {e}"))?;

    #[cfg(unix)]
    let _signal_pipe = match register_signals(&poll) {
        Ok(pipe) => Some(pipe),
        Err(e) => {
            warn!("cannot catch SIGINT/SIGTERM, counters will not be logged on exit: {e}");
            None
        }
    };

    {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "listening on {local}");
        let _ = out.flush();
    }
    info!("forwarding {local} -> {upstream}; up: {}; down: {}", args.up, args.down);

    let mut proxy = Proxy {
        poll,
        listen,
        listen_pending: VecDeque::new(),
        upstream,
        bind_addr: SocketAddr::new(bind_ip, 0),
        clients: HashMap::new(),
        tokens: HashMap::new(),
        next_token: FIRST_CLIENT_TOKEN,
        up: Netem::new(args.up, mix(seed, 1)),
        down: Netem::new(args.down, mix(seed, 2)),
        max_clients: args.max_clients,
        max_queue: args.max_queue,
        idle_timeout: args.idle_timeout,
        c: Counters::default(),
        rejected_since_warn: 0,
        last_reject_warn: None,
        buf: vec![0u8; MAX_DATAGRAM + 1].into_boxed_slice(),
    };

    let sweep_interval = (args.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
    let start = Instant::now();
    let mut next_sweep = start + sweep_interval;
    let mut next_stats = args.stats_interval.map(|iv| start + iv);
    let mut events = Events::with_capacity(1024);

    loop {
        let now = Instant::now();
        let deadline = [proxy.up.poll_timeout(), proxy.down.poll_timeout(), next_stats]
            .into_iter()
            .flatten()
            .fold(next_sweep, Instant::min);
        let timeout = deadline.saturating_duration_since(now);
        if let Err(e) = proxy.poll.poll(&mut events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            proxy.log_stats();
            return Err(format!("poll: {e}"));
        }
        let now = Instant::now();
        for event in events.iter() {
            let readable = event.is_readable() || event.is_error();
            match event.token() {
                SIGNAL => {
                    info!("signal received, exiting");
                    proxy.log_stats();
                    return Ok(());
                }
                LISTEN => {
                    if readable {
                        proxy.read_listen(now);
                    }
                    if event.is_writable() {
                        proxy.flush_listen();
                    }
                }
                token => {
                    if readable {
                        proxy.read_upstream(now, token);
                    }
                    if event.is_writable() {
                        proxy.flush_upstream(token);
                    }
                }
            }
        }
        proxy.deliver(now);
        if now >= next_sweep {
            proxy.expire(now);
            next_sweep = now + sweep_interval;
        }
        if let (Some(at), Some(iv)) = (next_stats, args.stats_interval) {
            if now >= at {
                proxy.log_stats();
                next_stats = Some(now + iv);
            }
        }
    }
}
