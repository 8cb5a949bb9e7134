//! The client's UDP socket, connected to the daemon's address. Connecting filters out datagrams
//! from anyone else in the kernel, and makes the kernel report an ICMP port unreachable as
//! `ECONNREFUSED` on the next send or receive: "nothing listens there" at once instead of
//! retransmissions into the void.

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::SocketAddr;

/// Datagrams held while the socket's send buffer is full (the protocol retransmits the rest).
const QUEUE_MAX: usize = 1024;

/// What a receive brought.
pub enum Recv {
    Datagram(usize),
    /// Nothing more for now.
    Empty,
    /// The daemon's address refused an earlier datagram.
    Refused,
}

pub struct Link {
    socket: UdpSocket,
    pub addr: SocketAddr,
    queue: VecDeque<Vec<u8>>,
}

impl Link {
    pub fn open(addr: SocketAddr, registry: &Registry, token: Token) -> Result<Link, String> {
        let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let mut socket = UdpSocket::bind(bind).map_err(|e| format!("cannot bind a UDP socket: {e}"))?;
        socket.connect(addr).map_err(|e| format!("cannot reach {addr}: {e}"))?;
        registry
            .register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| e.to_string())?;
        Ok(Link { socket, addr, queue: VecDeque::new() })
    }

    pub fn close(mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.socket);
    }

    pub fn recv(&mut self, buf: &mut [u8]) -> Recv {
        loop {
            match self.socket.recv(buf) {
                Ok(n) => return Recv::Datagram(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Recv::Empty,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Recv::Refused,
                Err(e) => {
                    log::debug!("recv: {e}");
                    return Recv::Empty;
                }
            }
        }
    }

    /// Sends now, or queues while the socket is full. `false`: the address refused (this or an
    /// earlier datagram).
    pub fn send(&mut self, bytes: Vec<u8>) -> bool {
        if self.queue.len() >= QUEUE_MAX {
            log::debug!("send queue full: dropping a datagram");
            return true;
        }
        self.queue.push_back(bytes);
        self.flush()
    }

    /// Sends what is queued until the socket would block. `false`: refused.
    pub fn flush(&mut self) -> bool {
        while let Some(bytes) = self.queue.front() {
            match self.socket.send(bytes) {
                Ok(_) => {
                    self.queue.pop_front();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    // The refusal was for an earlier datagram; this one may still go.
                    return false;
                }
                Err(e) => {
                    log::debug!("send: {e}");
                    self.queue.pop_front();
                }
            }
        }
        true
    }
}
