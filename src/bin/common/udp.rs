//! Shared by the binaries: sending on a non-blocking UDP socket without ever treating a full
//! send buffer as fatal.

use log::debug;
use mio::net::UdpSocket;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

/// Datagrams waiting for the socket to become writable again.
pub struct Outbox {
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    max: usize,
    /// Dropped because the queue was full or the kernel refused them.
    pub dropped: u64,
    pub sent: u64,
    pub bytes_sent: u64,
}

impl Outbox {
    pub fn new(max: usize) -> Self {
        Outbox { queue: VecDeque::new(), max, dropped: 0, sent: 0, bytes_sent: 0 }
    }

    /// Sends now if possible, otherwise queues. Returns false if the datagram was dropped
    /// because the queue is full (UDP is lossy; the protocol retransmits).
    pub fn send(&mut self, sock: &UdpSocket, to: SocketAddr, bytes: Vec<u8>) -> bool {
        if self.queue.is_empty() {
            match sock.send_to(&bytes, to) {
                Ok(_) => {
                    self.sent += 1;
                    self.bytes_sent += bytes.len() as u64;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!("send to {to} failed: {e}");
                    self.dropped += 1;
                    return true;
                }
            }
        }
        if self.queue.len() >= self.max {
            self.dropped += 1;
            return false;
        }
        self.queue.push_back((to, bytes));
        true
    }

    /// Sends what was queued, until the socket would block again.
    pub fn flush(&mut self, sock: &UdpSocket) {
        while let Some((to, bytes)) = self.queue.front() {
            match sock.send_to(bytes, *to) {
                Ok(_) => {
                    self.sent += 1;
                    self.bytes_sent += bytes.len() as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("send to {to} failed: {e}");
                    self.dropped += 1;
                }
            }
            self.queue.pop_front();
        }
    }
}
