//! The ceiling: a bare UDP echo with no protocol, between two processes shaped like the bench
//! and the daemon (each one single-threaded mio loop, non-blocking sockets, one datagram per
//! syscall), over the same loopback. Whatever the daemon does costs on top of this.
//!
//! `udpmsg-bench echo-server` (hidden) is the echo side; the bench spawns itself with it.

use crate::hist::{Histogram, Latency};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the echo server until stdin closes (so it never outlives the bench).
pub fn serve() -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal");
    let mut sock = UdpSocket::bind(addr).map_err(|e| e.to_string())?;
    poll.registry().register(&mut sock, Token(0), Interest::READABLE).map_err(|e| e.to_string())?;
    {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "listening on {}", sock.local_addr().map_err(|e| e.to_string())?);
        let _ = out.flush();
    }
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; 2048];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.to_string());
        }
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    // A full send buffer drops the echo, as it would drop a reply.
                    let _ = sock.send_to(&buf[..n], from);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {}
            }
        }
    }
}

/// The echo server child.
pub struct EchoServer {
    child: Child,
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl EchoServer {
    pub fn start() -> Result<EchoServer, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
        let mut child = Command::new(exe)
            .arg("echo-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the echo server: {e}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .map_err(|e| format!("echo server: {e}"))?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("echo server printed {line:?}"))?;
        Ok(EchoServer { child, addr })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // Closing its stdin ends it; kill (our own child, by handle) in case it hangs.
        drop(self.child.stdin.take());
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EchoResult {
    pub in_flight: usize,
    pub requested: u64,
    pub echoed: u64,
    pub lost: u64,
    pub seconds: f64,
    /// Round trips per second.
    pub throughput: f64,
    pub latency: Latency,
    /// CPU of the bench (the client side), the echo server (in `daemon_cores`) and the rest.
    pub cpu: crate::daemon::CpuUse,
}

/// `in_flight` sockets, each with one datagram of `size` bytes outstanding, until `count`
/// round trips or `limit` elapsed. A datagram not echoed within 200 ms counts as lost and is
/// sent again.
pub fn measure(
    server: SocketAddr,
    in_flight: usize,
    size: usize,
    count: u64,
    limit: Duration,
) -> Result<EchoResult, String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut socks = Vec::new();
    for i in 0..in_flight {
        let mut s = UdpSocket::bind("127.0.0.1:0".parse().expect("literal")).map_err(|e| e.to_string())?;
        poll.registry().register(&mut s, Token(i), Interest::READABLE).map_err(|e| e.to_string())?;
        socks.push(s);
    }
    let mut payload = vec![b'e'; size.max(8)];
    let mut sent_at = vec![Instant::now(); in_flight];
    let mut seq = vec![0u64; in_flight];
    let mut hist = Histogram::default();
    let (mut submitted, mut echoed, mut lost) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let stop_at = start + limit;
    let mut last = start;
    let send = |s: &UdpSocket, payload: &mut Vec<u8>, n: u64| {
        payload[..8].copy_from_slice(&n.to_le_bytes());
        let _ = s.send_to(payload, server);
    };
    for i in 0..in_flight {
        if submitted < count {
            submitted += 1;
            seq[i] = submitted;
            sent_at[i] = Instant::now();
            send(&socks[i], &mut payload, submitted);
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 2048];
    let timeout = Duration::from_millis(200);
    while echoed + lost < submitted {
        if crate::interrupted() {
            return Err("interrupted".into());
        }
        let now = Instant::now();
        if now >= stop_at + Duration::from_secs(1) {
            break;
        }
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(50))) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.to_string());
            }
        }
        for ev in events.iter() {
            let i = ev.token().0;
            loop {
                match socks[i].recv_from(&mut buf) {
                    Ok((n, _)) => {
                        if n < 8 || u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")) != seq[i] {
                            continue; // a late echo of a datagram counted as lost
                        }
                        let now = Instant::now();
                        hist.record(now - sent_at[i]);
                        echoed += 1;
                        last = now;
                        seq[i] = 0;
                        if submitted < count && now < stop_at {
                            submitted += 1;
                            seq[i] = submitted;
                            sent_at[i] = now;
                            send(&socks[i], &mut payload, submitted);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
        let now = Instant::now();
        for i in 0..in_flight {
            if seq[i] != 0 && now - sent_at[i] > timeout {
                lost += 1;
                seq[i] = 0;
                if submitted < count && now < stop_at {
                    submitted += 1;
                    seq[i] = submitted;
                    sent_at[i] = now;
                    send(&socks[i], &mut payload, submitted);
                }
            }
        }
    }
    let seconds = (last - start).as_secs_f64().max(1e-9);
    Ok(EchoResult {
        in_flight,
        requested: count,
        echoed,
        lost,
        seconds,
        throughput: echoed as f64 / seconds,
        latency: hist.summary(),
        cpu: Default::default(),
    })
}
