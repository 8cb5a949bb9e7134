//! A client that speaks the protocol by hand from a socket of the test's choosing (any loopback
//! address), for tests that play an attacker or need to see every datagram.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use udpmsg::proto::{self, ErrorCode, Request, RequestBody, Response, ServerMsg, Token};

pub struct Raw {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    next_id: u64,
    /// Bytes this socket sent and received.
    pub sent: usize,
    pub received: usize,
}

impl Raw {
    /// A socket on `local` (e.g. "127.0.0.5:0") talking to `server`.
    pub fn bind(local: &str, server: SocketAddr) -> Raw {
        let sock = UdpSocket::bind(local).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Raw { sock, server, next_id: 1, sent: 0, received: 0 }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends one datagram.
    pub fn send(&mut self, bytes: &[u8]) {
        self.sent += bytes.len();
        self.sock.send_to(bytes, self.server).unwrap();
    }

    /// What arrives within `wait`.
    pub fn drain(&mut self, wait: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                self.received += n;
                got.push(buf[..n].to_vec());
            }
        }
        got
    }

    /// A request, retransmitted until its answer comes; a login or registration the daemon asks
    /// to prove its address is sent again with the cookie, as the client does.
    pub fn rpc(&mut self, token: Option<Token>, body: RequestBody) -> Result<Response, ErrorCode> {
        let id = self.id();
        let bytes = proto::encode_request(Request { id, token, body: body.clone() });
        let mut buf = [0u8; 2048];
        for _ in 0..30 {
            self.send(&bytes);
            let end = Instant::now() + Duration::from_millis(200);
            while Instant::now() < end {
                let Ok((n, _)) = self.sock.recv_from(&mut buf) else { break };
                self.received += n;
                match proto::decode_server(&buf[..n]) {
                    Ok(ServerMsg::Reply { id: rid, result }) if rid == id => return result,
                    Ok(ServerMsg::Retry { id: rid, cookie }) if rid == id => {
                        let body = match body {
                            RequestBody::Login { user, password, pad, .. } => {
                                RequestBody::Login { user, password, cookie: Some(cookie), pad }
                            }
                            RequestBody::Register { user, password, pad, .. } => {
                                RequestBody::Register { user, password, cookie: Some(cookie), pad }
                            }
                            other => other,
                        };
                        return self.rpc(token, body);
                    }
                    _ => {}
                }
            }
        }
        panic!("no answer to request #{id}");
    }

    /// Logs in and confirms the address (a ping with the new token), as the client does.
    pub fn login(&mut self, user: &str, password: &str) -> Token {
        let body =
            RequestBody::Login { user: user.into(), password: password.into(), cookie: None, pad: vec![] };
        let Ok(Response::LoggedIn { token, .. }) = self.rpc(None, body) else { panic!("{user} logs in") };
        assert!(matches!(self.rpc(Some(token), RequestBody::Ping), Ok(Response::SessionPong { .. })));
        token
    }
}
