//! Shared by the binaries: sending on a non-blocking UDP socket without ever treating a full
//! send buffer as fatal, and moving datagrams in batches (`recvmmsg`/`sendmmsg` on Linux, one
//! system call per batch; one call per datagram elsewhere). The one `unsafe` block is the
//! `sendmmsg` call.

use log::debug;
use mio::net::UdpSocket;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

/// Datagrams per `sendmmsg`/`recvmmsg` call.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const BATCH: usize = 32;

/// Datagrams waiting for the socket to become writable again.
pub struct Outbox {
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    max: usize,
    /// Dropped because the queue was full or the kernel refused them.
    pub dropped: u64,
    pub sent: u64,
    pub bytes_sent: u64,
}

#[allow(dead_code)] // each binary uses its part
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
        self.push(to, bytes)
    }

    /// Queues a datagram for the next [`Outbox::flush`]; false if the queue is full and it was
    /// dropped.
    pub fn push(&mut self, to: SocketAddr, bytes: Vec<u8>) -> bool {
        if self.queue.len() >= self.max {
            self.dropped += 1;
            return false;
        }
        self.queue.push_back((to, bytes));
        true
    }

    /// Sends what was queued, until the socket would block again: `sendmmsg`, up to `BATCH`
    /// datagrams per call. (Straight through libc: nix's wrapper walks address storage that a
    /// send never fills when it counts the results.)
    #[cfg(target_os = "linux")]
    pub fn flush(&mut self, sock: &UdpSocket) {
        use std::os::fd::AsRawFd;
        while !self.queue.is_empty() {
            let n = self.queue.len().min(BATCH);
            let addrs: Vec<socket2::SockAddr> =
                self.queue.iter().take(n).map(|(to, _)| socket2::SockAddr::from(*to)).collect();
            let mut iovs: Vec<libc::iovec> = self
                .queue
                .iter()
                .take(n)
                .map(|(_, b)| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = (0..n)
                .map(|i| {
                    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
                    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                    hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
                    hdr.msg_namelen = addrs[i].len();
                    hdr.msg_iov = &mut iovs[i];
                    hdr.msg_iovlen = 1;
                    libc::mmsghdr { msg_hdr: hdr, msg_len: 0 }
                })
                .collect();
            // SAFETY: `msgs` holds `n` headers whose name and iovec pointers point into `addrs`,
            // `iovs` and the queued buffers, all alive and unmoved until the call returns; the
            // kernel only reads them (and writes each `msg_len`).
            let sent = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) };
            if sent > 0 {
                for (_, bytes) in self.queue.drain(..sent as usize) {
                    self.sent += 1;
                    self.bytes_sent += bytes.len() as u64;
                }
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return,
                io::ErrorKind::Interrupted => {}
                _ if sent == 0 => return,
                _ => {
                    // The first datagram was refused (e.g. by a firewall): drop it, go on.
                    let (to, _) = self.queue.pop_front().expect("not empty");
                    debug!("send to {to} failed: {e}");
                    self.dropped += 1;
                }
            }
        }
    }

    /// Sends what was queued, until the socket would block again.
    #[cfg(not(target_os = "linux"))]
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

/// Receives datagrams in batches into buffers it owns.
#[allow(dead_code)] // not every binary receives in batches
pub struct Inbox {
    bufs: Vec<Vec<u8>>,
    /// (buffer, source, length) of each datagram of the last batch.
    got: Vec<(usize, SocketAddr, usize)>,
    #[cfg(target_os = "linux")]
    headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
}

#[allow(dead_code)]
impl Inbox {
    /// Buffers of `buf_len` bytes: a longer datagram is cut to that length (and then refused by
    /// the decoder, whose limit is lower).
    pub fn new(buf_len: usize) -> Self {
        Inbox {
            bufs: (0..BATCH).map(|_| vec![0u8; buf_len]).collect(),
            got: Vec::with_capacity(BATCH),
            #[cfg(target_os = "linux")]
            headers: nix::sys::socket::MultiHeaders::preallocate(BATCH, None),
        }
    }

    /// Receives up to a batch; `Ok(0)` when nothing is waiting. Then [`Inbox::datagrams`].
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        use nix::sys::socket::{recvmmsg, MsgFlags};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        self.got.clear();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            self.bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
        match recvmmsg(sock.as_raw_fd(), &mut self.headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None) {
            Ok(results) => {
                for (i, r) in results.enumerate() {
                    let from = r.address.and_then(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| SocketAddr::V4((*v4).into()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
                    });
                    match from {
                        Some(from) => self.got.push((i, from, r.bytes)),
                        None => debug!("datagram without a usable source address dropped"),
                    }
                }
                Ok(self.got.len())
            }
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Receives up to a batch; `Ok(0)` when nothing is waiting. Then [`Inbox::datagrams`].
    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        for i in 0..self.bufs.len() {
            match sock.recv_from(&mut self.bufs[i]) {
                Ok((n, from)) => self.got.push((i, from, n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if self.got.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(self.got.len())
    }

    /// The datagrams of the last [`Inbox::recv`].
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.got.iter().map(|&(i, from, n)| (from, &self.bufs[i][..n.min(self.bufs[i].len())]))
    }
}
