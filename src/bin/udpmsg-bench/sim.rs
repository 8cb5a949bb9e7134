//! Many simulated users in one single-threaded mio loop, each a real `udpmsg::client::Client`
//! core, so the daemon sees exactly the protocol the `udpmsg` client speaks (padding, ids,
//! retransmission with RFC 6298 timers, push acks, keepalives).
//!
//! # Sockets and routing
//!
//! A socket is either *owned* by one client (it gets everything that arrives there) or *shared*
//! by many. Pushes carry no request id, only the session's sequence number, so a client that
//! receives pushes needs an address of its own: the daemon pushes to the address the session's
//! last request came from. Replies do carry the request id, and every client here numbers its
//! requests in its own range (`salt << 48 | client << 24 | counter`), so on a shared socket a
//! reply is routed by the id in its first bytes, without decoding the rest.
//!
//! Workloads with pushes give each subscriber (and poster) its own socket; idle sessions and
//! login-storm clients, which never receive pushes, share a few sockets. This is what lets one
//! process hold 100,000 sessions under a 20,000 file descriptor limit and a 28,000 port
//! ephemeral range, and it costs the daemon exactly the same per session (it keys sessions by
//! token; the address is one field either way).

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;
use udpmsg::client::{Client, Event, SubmitError};
use udpmsg::command::Command;
use udpmsg::config::ClientConfig;
use udpmsg::proto;

/// Clients served together after a read of a shared socket (bounds the linear `contains`).
const DIRTY_MAX: usize = 64;

/// What a workload does with the clients' events.
pub trait Behavior {
    /// Client `i` produced `ev`. May submit commands through `sim`.
    fn on_event(&mut self, sim: &mut Sim, i: usize, ev: Event, now: Instant);
    /// Called when `next_tick` has passed (and at least once per loop turn if it is `Some`).
    fn tick(&mut self, _sim: &mut Sim, _now: Instant) {}
    fn next_tick(&self) -> Option<Instant> {
        None
    }
    /// The workload has finished; the loop returns.
    fn done(&self) -> bool;
}

struct Sock {
    sock: UdpSocket,
    owner: Option<usize>,
}

pub struct SimClient {
    pub core: Client,
    sock: usize,
    /// The deadline this client has in the timer heap, if any.
    scheduled: Option<Instant>,
}

/// Network-level counters of the bench side.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct NetStats {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// The socket refused a datagram (buffer full); the client core retransmits.
    pub send_drops: u64,
    /// Datagrams no client could be found for (a push on a shared socket, a foreign reply).
    pub unroutable: u64,
}

pub struct Sim {
    poll: Poll,
    events: Events,
    socks: Vec<Sock>,
    pub clients: Vec<SimClient>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    server: SocketAddr,
    bind: SocketAddr,
    cfg: ClientConfig,
    salt: u64,
    buf: Vec<u8>,
    pub net: NetStats,
}

/// Receive buffer asked for on the bench's sockets (the kernel caps it at `net.core.rmem_max`).
const RECV_BUFFER: i32 = 4 << 20;

/// `setsockopt(SO_RCVBUF)` without a new dependency: libc is linked by std anyway. (With the
/// `socket2` crate this would be `SockRef::from(sock).set_recv_buffer_size`.)
#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
fn set_recv_buffer(sock: &UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, value: *const std::ffi::c_void, len: u32) -> i32;
    }
    const SOL_SOCKET: i32 = 1;
    const SO_RCVBUF: i32 = 8;
    // SAFETY: a valid descriptor owned by `sock`, a pointer to a live i32 and its size.
    let _ = unsafe { setsockopt(sock.as_raw_fd(), SOL_SOCKET, SO_RCVBUF, (&bytes as *const i32).cast(), 4) };
}

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
fn set_recv_buffer(_sock: &UdpSocket, _bytes: i32) {}

/// Bits of the request id that count a client's requests.
const COUNTER_BITS: u32 = 24;
const CLIENT_BITS: u32 = 24;

impl Sim {
    pub fn new(server: SocketAddr, cfg: ClientConfig, salt: u64) -> io::Result<Sim> {
        let bind: SocketAddr = if server.ip().is_loopback() {
            SocketAddr::new(server.ip(), 0)
        } else if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        Ok(Sim {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            socks: Vec::new(),
            clients: Vec::new(),
            timers: BinaryHeap::new(),
            server,
            bind,
            cfg,
            salt: salt & 0xffff,
            buf: vec![0u8; 2048],
            net: NetStats::default(),
        })
    }

    /// A new socket, owned (`owner` set later by `add_client`) or shared.
    pub fn add_socket(&mut self) -> io::Result<usize> {
        let mut sock = UdpSocket::bind(self.bind)?;
        // One bench thread stands in for many client processes: give its sockets room, so that
        // what the kernel drops is the daemon's (the daemon's socket keeps its defaults).
        set_recv_buffer(&sock, RECV_BUFFER);
        let i = self.socks.len();
        self.poll.registry().register(&mut sock, Token(i), Interest::READABLE)?;
        self.socks.push(Sock { sock, owner: None });
        Ok(i)
    }

    /// A client on its own new socket.
    pub fn add_owned_client(&mut self, now: Instant) -> io::Result<usize> {
        let s = self.add_socket()?;
        let c = self.add_client(s, now);
        self.socks[s].owner = Some(c);
        Ok(c)
    }

    /// A client on socket `sock` (shared: it must never receive pushes).
    pub fn add_client(&mut self, sock: usize, now: Instant) -> usize {
        let i = self.clients.len();
        assert!(i < 1 << CLIENT_BITS, "too many clients");
        let first_id = (self.salt << (COUNTER_BITS + CLIENT_BITS)) | ((i as u64) << COUNTER_BITS) | 1;
        self.clients.push(SimClient {
            core: Client::new(self.cfg.clone(), self.server, first_id, now),
            sock,
            scheduled: None,
        });
        i
    }

    /// Client `i` talks to `server` (one of several daemons on one database).
    pub fn set_server(&mut self, i: usize, server: SocketAddr, now: Instant) {
        self.clients[i].core.set_server(now, server);
    }

    pub fn is_ready(&self, i: usize) -> bool {
        self.clients[i].core.is_ready()
    }

    /// Submits a command on client `i` and sends its datagram at once.
    pub fn submit(&mut self, i: usize, cmd: Command, now: Instant) -> Result<(), SubmitError> {
        self.clients[i].core.submit(now, cmd)?;
        self.flush(i);
        self.rearm(i);
        Ok(())
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let sock = &self.socks[c.sock].sock;
        let to = c.core.server();
        while let Some(bytes) = c.core.poll_transmit() {
            match sock.send_to(&bytes, to) {
                Ok(_) => self.net.datagrams_sent += 1,
                Err(_) => self.net.send_drops += 1,
            }
        }
    }

    fn rearm(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if let Some(t) = c.core.poll_timeout() {
            if c.scheduled.is_none_or(|s| t < s) {
                c.scheduled = Some(t);
                self.timers.push(Reverse((t, i)));
            }
        }
    }

    /// Sends what client `i` has to send, hands its events to `b`, and keeps its timer.
    fn service(&mut self, i: usize, b: &mut dyn Behavior, now: Instant) {
        self.flush(i);
        while let Some(ev) = self.clients[i].core.poll_event() {
            b.on_event(self, i, ev, now);
            self.flush(i);
        }
        self.rearm(i);
    }

    /// Which client a datagram on socket `s` is for.
    fn route(&self, s: usize, bytes: &[u8]) -> Option<usize> {
        if let Some(o) = self.socks[s].owner {
            return Some(o);
        }
        // "Um", version, then postcard: variant 0 (Reply) or 4 (Retry, a cookie for a login or
        // registration), each starting with the request id as a varint.
        if bytes.len() < 5
            || bytes[..2] != udpmsg::proto::SERVER_MAGIC
            || ![proto::SERVER_MSG_REPLY_TAG, proto::SERVER_MSG_RETRY_TAG].contains(&bytes[3])
        {
            return None;
        }
        let mut id = 0u64;
        for (k, &b) in bytes[4..].iter().take(10).enumerate() {
            id |= u64::from(b & 0x7f) << (7 * k);
            if b & 0x80 == 0 {
                if id >> (COUNTER_BITS + CLIENT_BITS) != self.salt {
                    return None;
                }
                let c = ((id >> COUNTER_BITS) & ((1 << CLIENT_BITS) - 1)) as usize;
                return (c < self.clients.len() && self.clients[c].sock == s).then_some(c);
            }
        }
        None
    }

    /// Runs the loop until `b.done()` or `until`. Returns whether `b` finished.
    pub fn run(&mut self, b: &mut dyn Behavior, until: Instant) -> io::Result<bool> {
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        let result = self.run_inner(b, until, &mut events);
        self.events = events;
        result
    }

    fn run_inner(&mut self, b: &mut dyn Behavior, until: Instant, events: &mut Events) -> io::Result<bool> {
        let mut now = Instant::now();
        b.tick(self, now);
        loop {
            if crate::interrupted() {
                return Err(io::Error::other("interrupted"));
            }
            if b.done() {
                return Ok(true);
            }
            if now >= until {
                return Ok(false);
            }
            let mut wake = until;
            if let Some(Reverse((t, _))) = self.timers.peek() {
                wake = wake.min(*t);
            }
            if let Some(t) = b.next_tick() {
                wake = wake.min(t);
            }
            let timeout = wake.saturating_duration_since(now);
            // Sub-millisecond sleeps round up in epoll; that is fine for timers measured in ms.
            match self.poll.poll(events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let s = ev.token().0;
                // Clients that got datagrams in this read of the socket: served once it is
                // drained, as the real client does (its acks then go out in one datagram).
                let mut dirty: Vec<usize> = Vec::new();
                loop {
                    let (n, from) = match self.socks[s].sock.recv_from(&mut self.buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        // ICMP errors (e.g. port unreachable when the daemon is gone).
                        Err(_) => break,
                    };
                    self.net.datagrams_received += 1;
                    let now = Instant::now();
                    let bytes = std::mem::take(&mut self.buf);
                    match self.route(s, &bytes[..n]) {
                        Some(i) => {
                            self.clients[i].core.handle(now, from, &bytes[..n]);
                            self.buf = bytes;
                            if !dirty.contains(&i) {
                                dirty.push(i);
                            }
                            if dirty.len() >= DIRTY_MAX {
                                for i in dirty.drain(..) {
                                    self.service(i, b, now);
                                }
                            }
                        }
                        None => {
                            self.buf = bytes;
                            self.net.unroutable += 1;
                        }
                    }
                }
                let now = Instant::now();
                for i in dirty {
                    self.service(i, b, now);
                }
            }
            now = Instant::now();
            while let Some(Reverse((t, i))) = self.timers.peek().copied() {
                if t > now {
                    break;
                }
                self.timers.pop();
                if self.clients[i].scheduled != Some(t) {
                    continue; // superseded
                }
                self.clients[i].scheduled = None;
                self.clients[i].core.handle_timeout(now);
                self.service(i, b, now);
            }
            if b.next_tick().is_some_and(|t| t <= now) {
                b.tick(self, now);
            }
            now = Instant::now();
        }
    }
}
