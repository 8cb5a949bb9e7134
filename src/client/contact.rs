//! Whether the daemon answers, as far as the client can tell, and probing it while it does not.
//!
//! Every datagram from the server is an answer; a request that runs out of tries, or that the
//! kernel reports refused (ICMP port unreachable on a connected socket), is silence. Contact
//! starts [`Reach::Unknown`]; the first answer makes it `Up`, silence makes it `Lost`. Changes
//! are reported from `Up` (lost, then reconnected) and, once the shell asked to
//! [`Contact::watch`] (the REPL does, to replace a banner that claimed contact it never had),
//! from `Unknown` too (connected, or lost before ever connecting).
//!
//! While contact is lost and there is a session to keep (or the shell watches), a ping probes
//! the server: the first a second after the loss, each waiting as long as it was delayed, the
//! delay doubling up to the keepalive interval.

use std::time::{Duration, Instant};

/// A change in whether the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactChange {
    /// The first answer since the shell started watching, or since contact was lost before any
    /// answer had come.
    Connected,
    /// Requests went unanswered (`refused`: nothing listens at the address); `ever_answered`
    /// tells a loss from a failure to make contact in the first place.
    Lost { refused: bool, ever_answered: bool },
    /// An answer after contact had been lost.
    Reconnected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    Unknown,
    Up,
    Lost { ever_up: bool },
}

#[derive(Debug)]
pub(crate) struct Contact {
    reach: Reach,
    watching: bool,
    first_wait: Duration,
    max_wait: Duration,
    /// How long the next probe waits for its answer, and the pause before it.
    wait: Duration,
    /// When the next probe goes out (while lost, or when watching starts).
    probe_at: Option<Instant>,
}

impl Contact {
    /// `max_wait` caps the backoff between probes (the keepalive interval).
    pub fn new(max_wait: Duration) -> Self {
        let first_wait = Duration::from_secs(1).min(max_wait);
        Contact {
            reach: Reach::Unknown,
            watching: false,
            first_wait,
            max_wait,
            wait: first_wait,
            probe_at: None,
        }
    }

    /// Report changes from now on, including the first contact, and probe at once.
    pub fn watch(&mut self, now: Instant) {
        self.watching = true;
        if self.reach == Reach::Unknown {
            self.probe_at = Some(now);
        }
    }

    pub fn ever_answered(&self) -> bool {
        matches!(self.reach, Reach::Up | Reach::Lost { ever_up: true })
    }

    pub fn is_up(&self) -> bool {
        self.reach == Reach::Up
    }

    pub fn is_lost(&self) -> bool {
        matches!(self.reach, Reach::Lost { .. })
    }

    /// Something came from the server.
    pub fn answered(&mut self) -> Option<ContactChange> {
        let change = match self.reach {
            Reach::Up => None,
            Reach::Unknown => self.watching.then_some(ContactChange::Connected),
            Reach::Lost { ever_up: false } => Some(ContactChange::Connected),
            Reach::Lost { ever_up: true } => Some(ContactChange::Reconnected),
        };
        self.reach = Reach::Up;
        self.wait = self.first_wait;
        self.probe_at = None;
        change
    }

    /// A request got no answer after all its tries, or was refused.
    pub fn silent(&mut self, now: Instant, refused: bool) -> Option<ContactChange> {
        let change = match self.reach {
            Reach::Up => Some(ContactChange::Lost { refused, ever_answered: true }),
            Reach::Unknown if self.watching => Some(ContactChange::Lost { refused, ever_answered: false }),
            Reach::Unknown | Reach::Lost { .. } => None,
        };
        match self.reach {
            Reach::Lost { .. } => self.wait = (self.wait * 2).min(self.max_wait),
            Reach::Up => self.reach = Reach::Lost { ever_up: true },
            Reach::Unknown => self.reach = Reach::Lost { ever_up: false },
        }
        self.probe_at = Some(now + self.wait);
        change
    }

    /// When a probe is due, if one is: while lost with a session to keep (or watching), or at
    /// the start of watching.
    pub fn probe_due(&self, logged_in: bool) -> Option<Instant> {
        match self.reach {
            Reach::Lost { .. } if logged_in || self.watching => self.probe_at,
            Reach::Unknown if self.watching => self.probe_at,
            _ => None,
        }
    }

    /// A probe went out now: how long it waits for its answer.
    pub fn probe_sent(&mut self) -> Duration {
        self.probe_at = None;
        self.wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn lost_and_reconnected_once_each() {
        let t0 = Instant::now();
        let mut c = Contact::new(30 * S);
        assert_eq!(c.answered(), None, "a first answer is no news unless watching");
        assert_eq!(c.silent(t0, false), Some(ContactChange::Lost { refused: false, ever_answered: true }));
        assert_eq!(c.silent(t0, false), None, "reported once");
        assert_eq!(c.answered(), Some(ContactChange::Reconnected));
        assert_eq!(c.answered(), None);
        assert_eq!(c.probe_due(true), None);
    }

    #[test]
    fn silence_before_any_answer_is_quiet_unless_watching() {
        let t0 = Instant::now();
        let mut c = Contact::new(30 * S);
        assert_eq!(c.silent(t0, true), None);
        assert_eq!(c.probe_due(false), None, "nothing to keep: no probing");
        assert_eq!(c.probe_due(true), Some(t0 + S), "a session to keep: probe");
        assert_eq!(c.answered(), Some(ContactChange::Connected));

        let mut w = Contact::new(30 * S);
        w.watch(t0);
        assert_eq!(w.probe_due(false), Some(t0), "watching probes at once");
        assert_eq!(w.probe_sent(), S);
        assert_eq!(w.silent(t0 + S, true), Some(ContactChange::Lost { refused: true, ever_answered: false }));
        assert_eq!(w.answered(), Some(ContactChange::Connected), "never answered before: connected");
    }

    #[test]
    fn probes_back_off_to_the_cap() {
        let t0 = Instant::now();
        let mut c = Contact::new(5 * S);
        c.answered();
        c.silent(t0, false);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..5 {
            let at = c.probe_due(true).expect("probing while lost");
            pauses.push(at - now);
            let wait = c.probe_sent();
            assert_eq!(c.probe_due(true), None, "one probe at a time");
            now = at + wait;
            assert_eq!(c.silent(now, false), None);
        }
        assert_eq!(pauses, vec![S, 2 * S, 4 * S, 5 * S, 5 * S]);
        c.answered();
        c.silent(now, false);
        assert_eq!(c.probe_due(true), Some(now + S), "an answer resets the backoff");
    }
}
