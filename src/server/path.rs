//! Path validation: a session's pushes go only to an address that has proven it receives them
//! (RFC 9000 sections 8.2 and 9.3).
//!
//! A session has a push address. At login it is the login's source, proven when a datagram
//! carrying the new token (which only that address was sent) comes back from it. A request with
//! the session's token from any other address is served, but the address is only a
//! *candidate*: it is sent a [`crate::proto::ServerMsg::PathChallenge`] with 64 random bits, and
//! the pushes move there once the client echoes them from it. Until then the candidate gets no
//! pushes and at most [`AMPLIFICATION`] times the bytes it sent (answers included); what does
//! not fit waits and leaves once the path is proven. Only a request newer than every request
//! the session executed may start a validation (QUIC: only the highest packet number may
//! migrate), so replaying captured requests from a spoofed address moves nothing.
//!
//! The bytes a token holder can draw towards an address it does not own are therefore at most
//! three times what it sends there itself.

use std::net::SocketAddr;

/// An unproven address gets at most this many times the bytes it sent.
pub const AMPLIFICATION: u64 = 3;

/// An address a session was reached from and that has not proven itself yet.
#[derive(Debug)]
pub(crate) struct Candidate {
    pub addr: SocketAddr,
    /// The challenge it has to echo.
    pub data: u64,
    /// Bytes received from it and sent to it: `sent <= AMPLIFICATION * received`.
    pub received: u64,
    pub sent: u64,
    /// The request id of the newest answer that did not fit the budget: sent (from the
    /// session's window of replies) once the path is proven.
    pub withheld: Option<u64>,
}

impl Candidate {
    pub fn new(addr: SocketAddr, data: u64, received: usize) -> Candidate {
        Candidate { addr, data, received: received as u64, sent: 0, withheld: None }
    }

    /// Spends `len` bytes of the budget if they fit.
    pub fn spend(&mut self, len: usize) -> bool {
        let len = len as u64;
        if self.sent + len <= AMPLIFICATION * self.received {
            self.sent += len;
            true
        } else {
            false
        }
    }
}

/// Whether an answer of `len` bytes may go to an address that is neither proven nor the
/// candidate (a replayed request from somewhere else): never more than three times the datagram
/// that asked for it.
pub fn fits_datagram(len: usize, received: usize) -> bool {
    len as u64 <= AMPLIFICATION * received as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_three_times_what_arrived() {
        let mut c = Candidate::new("192.0.2.1:1".parse().unwrap(), 7, 23);
        assert!(c.spend(30));
        assert!(c.spend(39));
        assert!(!c.spend(1), "69 = 3 x 23 spent");
        c.received += 23;
        assert!(c.spend(69));
        assert!(!c.spend(1));
        assert!(fits_datagram(69, 23) && !fits_datagram(70, 23));
    }
}
