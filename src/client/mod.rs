//! The client's protocol logic as a sans-IO state machine.
//!
//! # Driving contract
//!
//! - [`Client::submit`] starts a command when [`Client::is_ready`]; one request is outstanding
//!   at a time, so the shell queues further commands until the client is ready again.
//! - [`Client::handle`] feeds each datagram received (with its source; anything not from the
//!   server is ignored), [`Client::handle_timeout`] fires retransmissions, give-ups and
//!   keepalive pings once [`Client::poll_timeout`] has passed (early calls are no-ops).
//! - [`Client::poll_transmit`] drains datagrams for the server; [`Client::poll_event`] drains
//!   what the user should see: finished commands, errors, pushed messages.
//!
//! `now` never goes backwards. Nothing here reads a clock or touches a socket.
//!
//! # States
//!
//! [`State::Ready`] → (submit or keepalive) → [`State::Awaiting`] → (matching reply, or give-up
//! after `request_max_tries`) → `Ready`. A reply whose id is not the outstanding one (late, or a
//! duplicate) is ignored. Every transition goes through `set_state`, which logs it at debug.
//!
//! # What the daemon may ask for (protocol v3)
//!
//! - A [`ServerMsg::Retry`] answers a login or registration that must first prove its address:
//!   the client sends it again at once with the cookie (and keeps the cookie for the next one).
//! - A [`ServerMsg::PathChallenge`] for our session (our address changed, or the daemon
//!   restarted) is echoed at once in a [`ClientMsg::PathResponse`]; pushes resume when it
//!   arrives.
//! - A version notice counts only if it echoes the start of the request it answers; one that
//!   does not (a v2 daemon's, or a forged one) is remembered and named only if no answer comes.
//!
//! # Several servers
//!
//! Given the addresses of several daemons sharing one database ([`Client::set_servers`]), a
//! request unanswered after `failover_after_tries` transmissions (or whose server's address
//! refuses, [`Client::fail_over`]) moves to the next server, the same request (same id, same
//! token) sent there at once, and [`Event::Moved`] says so. The session comes along: the new
//! daemon takes it over from the old one and numbers its pushes in a newer epoch, which the
//! client follows once an answer names it, as after a restart; it pushes what the session may
//! have missed, and the messages already shown are dropped by their ids. Each request tries
//! every server at most once before "no answer".
//!
//! Keepalives and probes are background requests: [`Client::is_ready`] is true while one is
//! outstanding, and a command submitted then takes its place. [`Client::abandon`] gives up the
//! command in flight (its late reply is ignored). Whether the server answers at all is tracked
//! apart (see `contact.rs`): [`Event::Contact`] reports it lost and back.

mod contact;
mod push;

use crate::command::Command;
use crate::config::ClientConfig;
use crate::proto::{
    self, ClientMsg, Cookie, ErrorCode, Message, Relation, Request, RequestBody, Response, ServerMsg, Token,
};
use crate::rtt::RttEstimator;
use contact::Contact;
pub use contact::ContactChange;
use log::{debug, trace};
use push::{PushOutcome, PushReceiver};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Registered {
        user: String,
    },
    LoggedIn {
        user: String,
        missed: u32,
        catching_up: u32,
    },
    LoggedOut,
    Subscribed {
        user: String,
    },
    Unsubscribed {
        user: String,
    },
    Posted {
        id: u64,
        recipients: u32,
    },
    Sent {
        id: u64,
        to: String,
    },
    /// Oldest first.
    Messages(Vec<Message>),
    Users(Vec<String>),
    Pong {
        rtt: Duration,
    },
    Me {
        user: String,
        sessions: u32,
    },
    Relations(Vec<Relation>),
    Deleted,
}

/// Something the user should see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A command succeeded.
    Done(Done),
    /// The server refused a command.
    Failed { command: &'static str, error: ErrorCode },
    /// No reply after all tries.
    NoAnswer { command: &'static str, server: SocketAddr, tries: u32 },
    /// The server speaks another protocol version.
    VersionMismatch { command: &'static str, server_version: u8 },
    /// A message pushed by the server, in order, once.
    Push(Message),
    /// A keepalive found the session gone (expired or revoked); the user must log in again.
    SessionLost { error: ErrorCode },
    /// The kernel reported the command's datagram refused (ICMP port unreachable): nothing
    /// listens at the server's address. Reported at once, without retrying.
    Refused { command: &'static str, server: SocketAddr },
    /// Whether the server answers changed (see `contact.rs`).
    Contact { server: SocketAddr, change: ContactChange },
    /// The server stopped answering; the client moved to the next one (see the module docs).
    Moved { from: SocketAddr, to: SocketAddr },
}

/// The client's states; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ready,
    /// A request is outstanding.
    Awaiting,
}

/// A command in progress (multi-page commands accumulate here).
#[derive(Debug)]
enum Op {
    Register {
        user: String,
    },
    Login {
        user: String,
    },
    Logout,
    Subscribe {
        user: String,
    },
    Unsubscribe {
        user: String,
    },
    Post,
    Send {
        to: String,
    },
    Retrieve {
        count: u32,
        got: Vec<Message>,
    },
    Users {
        pattern: String,
        got: Vec<String>,
    },
    WhoAmI,
    Subscriptions {
        got: Vec<Relation>,
    },
    Delete,
    Ping {
        user_asked: bool,
    },
    /// A ping while contact is lost (or to find out whether it can be made): one try.
    Probe,
    /// The ping that follows a successful login: the daemon pushes only to an address the
    /// token has come back from. The user hears "logged in" when it is answered.
    ConfirmLogin {
        user: String,
        missed: u32,
        catching_up: u32,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Register { .. } => "register",
            Op::Login { .. } => "login",
            Op::Logout => "logout",
            Op::Subscribe { .. } => "subscribe",
            Op::Unsubscribe { .. } => "unsubscribe",
            Op::Post => "post",
            Op::Send { .. } => "send",
            Op::Retrieve { .. } => "retrieve",
            Op::Users { .. } => "users",
            Op::WhoAmI => "whoami",
            Op::Subscriptions { .. } => "subscriptions",
            Op::Delete => "delete",
            Op::Ping { .. } | Op::Probe => "ping",
            Op::ConfirmLogin { .. } => "login",
        }
    }

    /// Keepalives and probes: nobody waits for them, and a command may take their place.
    fn is_background(&self) -> bool {
        matches!(self, Op::Ping { user_asked: false } | Op::Probe)
    }
}

#[derive(Debug)]
struct Pending {
    op: Op,
    id: u64,
    bytes: Vec<u8>,
    /// A login's or registration's request, to send again with a cookie if asked to.
    body: Option<RequestBody>,
    /// Cookie retries so far (a daemon asking again and again is refused after a few).
    retries: u8,
    /// A version notice that did not echo this request: named if no answer comes.
    notice: Option<u8>,
    /// When the current request (page) was first sent; for the RTT sample.
    first_sent: Instant,
    /// When the command started; for the user-visible ping time.
    started: Instant,
    tries: u32,
    deadline: Instant,
    /// Whether the server was answering when it began: then a refusal may be a restart, and
    /// the request keeps retrying.
    while_up: bool,
    /// Servers it moved to so far.
    moves: usize,
}

/// Why `submit` refused a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// A request is outstanding; submit again when `is_ready`.
    NotReady,
    /// `help` and `quit` are the shell's business.
    Local,
}

/// The client core. See the module documentation for the driving contract.
pub struct Client {
    cfg: ClientConfig,
    server: SocketAddr,
    state: State,
    session: Option<(Token, String)>,
    next_id: u64,
    rtt: RttEstimator,
    pending: Option<Pending>,
    out: VecDeque<Vec<u8>>,
    /// Pushes to ack, with the session and epoch they came for: sent together by the next
    /// `poll_transmit`, so one read of the socket costs one ack datagram, not one per push.
    acks: Option<(Token, u32, Vec<u64>)>,
    /// The last cookie the daemon gave us, sent with the next login or registration.
    cookie: Option<Cookie>,
    /// A push of an epoch no answer has named arrived: ask (with a ping) when ready.
    want_epoch: bool,
    events: VecDeque<Event>,
    pushes: PushReceiver,
    /// Pushes that arrived while the login was being confirmed: shown right after "logged in".
    early_pushes: Vec<Message>,
    /// Last time we sent anything; a keepalive goes out after `ping_interval` of silence.
    last_sent: Instant,
    contact: Contact,
    /// Every server's address, the one in use among them (empty: only `server`).
    servers: Vec<SocketAddr>,
}

impl Client {
    /// `first_request_id` should be random so that a restarted client reusing its address is
    /// never mistaken for a retransmission of the previous one's requests.
    pub fn new(cfg: ClientConfig, server: SocketAddr, first_request_id: u64, now: Instant) -> Self {
        let contact = Contact::new(Duration::from_secs(cfg.ping_interval_secs));
        Client {
            rtt: RttEstimator::new(cfg.request_rto()),
            cfg,
            server,
            state: State::Ready,
            session: None,
            acks: None,
            cookie: None,
            want_epoch: false,
            next_id: first_request_id,
            pending: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            pushes: PushReceiver::default(),
            early_pushes: Vec::new(),
            last_sent: now,
            contact,
            servers: Vec::new(),
        }
    }

    /// The daemons to move between, in order (see the module docs); the one in use is added
    /// if missing.
    pub fn set_servers(&mut self, mut servers: Vec<SocketAddr>) {
        servers.dedup();
        if !servers.contains(&self.server) {
            servers.insert(0, self.server);
        }
        self.servers = servers;
    }

    /// The server in use refuses (nothing listens at its address): move to the next one now,
    /// if there is one the request in flight has not tried. Returns whether it moved.
    pub fn fail_over(&mut self, now: Instant) -> bool {
        let can = match &self.pending {
            Some(p) => !matches!(p.op, Op::Probe) && p.moves + 1 < self.servers.len(),
            None => self.servers.len() > 1,
        };
        if can {
            self.move_on(now);
        }
        can
    }

    /// To the next server, with the request in flight.
    fn move_on(&mut self, now: Instant) {
        let Some(at) = self.servers.iter().position(|s| *s == self.server) else { return };
        let from = self.server;
        self.server = self.servers[(at + 1) % self.servers.len()];
        // Another path: what was learnt of the old one's round trip says nothing of it.
        self.rtt = RttEstimator::new(self.cfg.request_rto());
        debug!("moving from {from} to {}", self.server);
        if let Some(p) = &mut self.pending {
            p.moves += 1;
            p.tries = 1;
            p.first_sent = now;
            p.deadline = now + self.rtt.backoff(1);
            self.out.push_back(p.bytes.clone());
            self.last_sent = now;
        }
        self.events.push_back(Event::Moved { from, to: self.server });
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a command may be submitted: nothing is outstanding but, perhaps, a keepalive or
    /// probe (which the command replaces).
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready || self.pending.as_ref().is_some_and(|p| p.op.is_background())
    }

    /// Whether the server has ever answered this client.
    pub fn has_had_contact(&self) -> bool {
        self.contact.ever_answered()
    }

    /// Report [`Event::Contact`] changes from the start, including the first contact, and probe
    /// the server now (the REPL does this instead of claiming contact it does not have).
    pub fn watch_contact(&mut self, now: Instant) {
        self.contact.watch(now);
    }

    /// Talk to `server` from now on (another address of the same name, when the first refused):
    /// the request in flight, if any, goes there at once.
    pub fn set_server(&mut self, now: Instant, server: SocketAddr) {
        self.server = server;
        if let Some(p) = &mut self.pending {
            self.out.push_back(p.bytes.clone());
            p.deadline = now + self.rtt.backoff(p.tries);
            self.last_sent = now;
        }
    }

    /// The kernel reported our datagrams refused: nothing listens at the server's address now.
    /// The command in flight fails at once with [`Event::Refused`], unless the server was
    /// answering when it began: then the daemon may be restarting, so the command keeps its
    /// retransmissions (and [`Event::Contact`] says at once that contact is lost).
    pub fn connection_refused(&mut self, now: Instant) {
        if self.pending.as_ref().is_some_and(|p| p.while_up && !p.op.is_background()) {
            self.silence(now, true);
            return;
        }
        if let Some(p) = self.pending.take() {
            debug!("{} #{}: refused", p.op.name(), p.id);
            if !p.op.is_background() {
                if let Op::ConfirmLogin { .. } = p.op {
                    // The user is told the login failed: so it did.
                    self.session = None;
                }
                self.events.push_back(Event::Refused { command: p.op.name(), server: self.server });
            }
            self.set_state(State::Ready);
        }
        self.silence(now, true);
    }

    /// Gives up the command in flight; returns its name. Its reply, should it still come, is
    /// ignored; the daemon may have carried it out. A login whose address confirmation is in
    /// flight has succeeded: it is reported as such instead.
    pub fn abandon(&mut self, _now: Instant) -> Option<&'static str> {
        let p = self.pending.take_if(|p| !p.op.is_background())?;
        debug!("{} #{}: abandoned", p.op.name(), p.id);
        let name = p.op.name();
        let abandoned = match p.op {
            Op::ConfirmLogin { user, missed, catching_up } => {
                self.events.push_back(Event::Done(Done::LoggedIn { user, missed, catching_up }));
                None
            }
            _ => Some(name),
        };
        self.set_state(State::Ready);
        abandoned
    }

    /// Something that only the server could have sent came from it.
    fn answered(&mut self) {
        if let Some(change) = self.contact.answered() {
            self.events.push_back(Event::Contact { server: self.server, change });
        }
    }

    fn silence(&mut self, now: Instant, refused: bool) {
        if let Some(change) = self.contact.silent(now, refused) {
            self.events.push_back(Event::Contact { server: self.server, change });
        }
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&str> {
        self.session.as_ref().map(|(_, u)| u.as_str())
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The current request timeout (before backoff).
    pub fn rto(&self) -> Duration {
        self.rtt.rto()
    }

    fn set_state(&mut self, next: State) {
        if next == State::Ready {
            // Whatever ended the login's confirmation has been reported: now the pushes.
            self.release_early_pushes();
        }
        if self.state != next {
            debug!("client state={:?}=>{:?}", self.state, next);
            self.state = next;
        }
    }

    /// Starts a command.
    pub fn submit(&mut self, now: Instant, cmd: Command) -> Result<(), SubmitError> {
        if self.pending.as_ref().is_some_and(|p| p.op.is_background())
            && !matches!(cmd, Command::Help | Command::Quit)
        {
            // The command does what the keepalive or probe was for.
            self.pending = None;
            self.set_state(State::Ready);
        }
        if self.state != State::Ready {
            return Err(SubmitError::NotReady);
        }
        let (op, body) = match cmd {
            Command::Help | Command::Quit => return Err(SubmitError::Local),
            Command::Register { user, password } => (
                Op::Register { user: user.clone() },
                RequestBody::Register { user, password, cookie: self.cookie, pad: vec![] },
            ),
            Command::Login { user, password } => (
                Op::Login { user: user.clone() },
                RequestBody::Login { user, password, cookie: self.cookie, pad: vec![] },
            ),
            Command::Logout => (Op::Logout, RequestBody::Logout),
            Command::Subscribe { user } => {
                (Op::Subscribe { user: user.clone() }, RequestBody::Subscribe { user })
            }
            Command::Unsubscribe { user } => {
                (Op::Unsubscribe { user: user.clone() }, RequestBody::Unsubscribe { user })
            }
            Command::Post { text } => (Op::Post, RequestBody::Post { text }),
            Command::Send { to, text } => (Op::Send { to: to.clone() }, RequestBody::Send { to, text }),
            Command::Retrieve { count } => {
                (Op::Retrieve { count, got: Vec::new() }, RequestBody::Retrieve { count, before: None })
            }
            Command::Users { pattern } => (
                Op::Users { pattern: pattern.clone(), got: Vec::new() },
                RequestBody::ListUsers { pattern, after: None },
            ),
            Command::WhoAmI => (Op::WhoAmI, RequestBody::WhoAmI),
            Command::Subscriptions => {
                (Op::Subscriptions { got: Vec::new() }, RequestBody::Subscriptions { after: None })
            }
            Command::Delete { password } => (Op::Delete, RequestBody::DeleteAccount { password }),
            Command::Ping => (Op::Ping { user_asked: true }, RequestBody::Ping),
        };
        self.start(now, op, body, now);
        Ok(())
    }

    /// Sends the (first or next page's) request for `op`.
    fn start(&mut self, now: Instant, op: Op, body: RequestBody, started: Instant) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let (token, keep) = match body {
            // Login and register never carry an old token; they are kept in case the daemon
            // asks for them again with a cookie.
            RequestBody::Login { .. } | RequestBody::Register { .. } => (None, Some(body.clone())),
            _ => (self.session.as_ref().map(|(t, _)| *t), None),
        };
        // Register and login are padded so the daemon may answer them (anti-amplification).
        let bytes = proto::encode_request(Request { id, token, body });
        let deadline = now + self.rtt.backoff(1);
        trace!("sending {} #{id} ({} bytes)", op.name(), bytes.len());
        self.out.push_back(bytes.clone());
        self.last_sent = now;
        let while_up = self.contact.is_up();
        self.pending = Some(Pending {
            op,
            id,
            bytes,
            body: keep,
            retries: 0,
            notice: None,
            first_sent: now,
            started,
            tries: 1,
            deadline,
            while_up,
            moves: 0,
        });
        self.set_state(State::Awaiting);
    }

    /// Feeds one received datagram.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if from != self.server {
            trace!("ignoring datagram from {from}");
            return;
        }
        let msg = match proto::decode_server(bytes) {
            Ok(m) => {
                self.answered();
                m
            }
            Err(proto::DecodeError::Version(v)) => {
                let Some(p) = &mut self.pending else { return };
                if proto::notice_answers(bytes, &p.bytes) {
                    self.answered();
                    let p = self.pending.take().expect("checked");
                    self.events.push_back(Event::VersionMismatch { command: p.op.name(), server_version: v });
                    self.set_state(State::Ready);
                } else {
                    // Proves nothing (anyone can send three bytes): said only if no answer comes.
                    debug!("a version notice (v{v}) that does not echo our request");
                    p.notice = Some(v);
                }
                return;
            }
            Err(e) => {
                debug!("undecodable datagram from server: {e}");
                return;
            }
        };
        match msg {
            ServerMsg::Push { session, epoch, seq, message } => {
                self.on_push(now, session, epoch, seq, message)
            }
            ServerMsg::Pushes { session, epoch, first_seq, messages } => {
                for (i, message) in messages.into_iter().enumerate() {
                    self.on_push(now, session, epoch, first_seq.saturating_add(i as u64), message);
                }
            }
            ServerMsg::Reply { id, result } => self.on_reply(now, id, result),
            ServerMsg::Retry { id, cookie } => self.on_retry(now, id, cookie),
            ServerMsg::PathChallenge { session, data } => {
                if let Some(&(token, _)) = self.session.as_ref().filter(|(t, _)| t.session_id() == session) {
                    self.out.push_back(proto::encode_client(&ClientMsg::PathResponse { token, data }));
                }
            }
        }
    }

    /// The daemon wants the outstanding login or registration again, with a cookie that proves
    /// our address.
    fn on_retry(&mut self, now: Instant, id: u64, cookie: Cookie) {
        const MAX_RETRIES: u8 = 3;
        let Some(p) = self.pending.take_if(|p| p.id == id && p.body.is_some()) else {
            trace!("ignoring a retry for #{id}");
            return;
        };
        self.cookie = Some(cookie);
        let name = p.op.name();
        let mut body = p.body.expect("checked");
        if p.retries >= MAX_RETRIES {
            self.events.push_back(Event::Failed { command: name, error: ErrorCode::Busy });
            self.set_state(State::Ready);
            return;
        }
        match &mut body {
            RequestBody::Login { cookie: c, .. } | RequestBody::Register { cookie: c, .. } => {
                *c = Some(cookie)
            }
            _ => {}
        }
        let retries = p.retries + 1;
        self.start(now, p.op, body, p.started);
        if let Some(p) = &mut self.pending {
            p.retries = retries;
        }
    }

    fn on_push(&mut self, now: Instant, session: u64, epoch: u32, seq: u64, message: Message) {
        let Some((token, _)) = self.session else {
            // Not logged in (or the login reply is still on its way): without a token we cannot
            // ack; the server retransmits.
            return;
        };
        if session != token.session_id() {
            // Another session's (an earlier login of this client), or forged: not ours to show.
            trace!("ignoring a push for another session");
            return;
        }
        match self.pushes.receive(epoch, seq, message) {
            PushOutcome::Stale => return, // from a previous run of the daemon: nobody to ack
            PushOutcome::Buffered | PushOutcome::Duplicate => {}
            PushOutcome::Full => return, // no ack: the server will retransmit
            PushOutcome::Unconfirmed => {
                // The daemon restarted (or someone forges pushes): ask it which epoch it is in.
                self.want_epoch = true;
                if self.state == State::Ready {
                    self.start(now, Op::Ping { user_asked: false }, RequestBody::Ping, now);
                }
                return;
            }
            PushOutcome::Ready(msgs) => self.show(msgs),
        }
        self.ack(token, epoch, seq);
    }

    /// Shows pushed messages, or holds them while the login is being confirmed.
    fn show(&mut self, msgs: Vec<Message>) {
        if self.confirming_login() {
            self.early_pushes.extend(msgs);
        } else {
            self.events.extend(msgs.into_iter().map(Event::Push));
        }
    }

    /// Queues an ack; every push we keep is acked, duplicates too (the first ack may have been
    /// lost).
    fn ack(&mut self, token: Token, epoch: u32, seq: u64) {
        if self.acks.as_ref().is_some_and(|(t, e, _)| *t != token || *e != epoch) {
            self.flush_acks();
        }
        let seqs = &mut self.acks.get_or_insert_with(|| (token, epoch, Vec::new())).2;
        if !seqs.contains(&seq) {
            seqs.push(seq);
        }
        if seqs.len() == proto::MAX_ACKS {
            self.flush_acks();
        }
    }

    /// An answer to our own request named the epoch the daemon numbers pushes in.
    fn confirm_epoch(&mut self, epoch: u32) {
        self.want_epoch = false;
        let Some(&(token, _)) = self.session.as_ref() else { return };
        let (msgs, acks) = self.pushes.confirm(epoch);
        self.show(msgs);
        for seq in acks {
            self.ack(token, epoch, seq);
        }
    }

    /// Turns the pending acks into one datagram.
    fn flush_acks(&mut self) {
        let msg = match self.acks.take() {
            Some((token, epoch, seqs)) if seqs.len() == 1 => {
                ClientMsg::PushAck { token, epoch, seq: seqs[0] }
            }
            Some((token, epoch, seqs)) if !seqs.is_empty() => ClientMsg::PushAcks { token, epoch, seqs },
            _ => return,
        };
        self.out.push_back(proto::encode_client(&msg));
    }

    fn on_reply(&mut self, now: Instant, id: u64, result: Result<Response, ErrorCode>) {
        let Some(p) = self.pending.take_if(|p| p.id == id) else {
            trace!("ignoring late or duplicate reply #{id}");
            return;
        };
        if p.tries == 1 {
            self.rtt.sample(now.saturating_duration_since(p.first_sent));
        }
        let name = p.op.name();
        let response = match result {
            Ok(r) => r,
            Err(error) => {
                if matches!(error, ErrorCode::SessionExpired | ErrorCode::NotLoggedIn)
                    && self.session.is_some()
                {
                    self.session = None;
                    if p.op.is_background() {
                        self.events.push_back(Event::SessionLost { error });
                        self.set_state(State::Ready);
                        return;
                    }
                }
                self.events.push_back(Event::Failed { command: name, error });
                self.set_state(State::Ready);
                return;
            }
        };
        let done = match (p.op, response) {
            (Op::Register { user }, Response::Registered) => Done::Registered { user },
            (Op::Login { user }, Response::LoggedIn { token, missed, catching_up, epoch }) => {
                self.session = Some((token, user.clone()));
                self.pushes.reset(epoch);
                // The daemon pushes only to an address the token has come back from: confirm
                // ours at once (a request, so it is retransmitted until answered).
                self.start(now, Op::ConfirmLogin { user, missed, catching_up }, RequestBody::Ping, p.started);
                return;
            }
            (Op::Logout, Response::LoggedOut) => {
                self.session = None;
                Done::LoggedOut
            }
            (Op::Subscribe { user }, Response::Subscribed) => Done::Subscribed { user },
            (Op::Unsubscribe { user }, Response::Unsubscribed) => Done::Unsubscribed { user },
            (Op::Post, Response::Posted { id, recipients }) => Done::Posted { id, recipients },
            (Op::Send { to }, Response::Sent { id }) => Done::Sent { id, to },
            (Op::Retrieve { count, mut got }, Response::Messages { messages, more }) => {
                // Pages come newest first; each page is oldest first.
                let oldest = messages.first().map(|m| m.id);
                let mut page = messages;
                page.append(&mut got);
                let got = page;
                let left = count.saturating_sub(got.len() as u32);
                match oldest {
                    Some(before) if more && left > 0 => {
                        let body = RequestBody::Retrieve { count: left, before: Some(before) };
                        self.start(now, Op::Retrieve { count, got }, body, p.started);
                        return;
                    }
                    _ => Done::Messages(got),
                }
            }
            (Op::Users { pattern, mut got }, Response::Users { mut names, next }) => {
                got.append(&mut names);
                match next {
                    Some(after) => {
                        let body = RequestBody::ListUsers { pattern: pattern.clone(), after: Some(after) };
                        self.start(now, Op::Users { pattern, got }, body, p.started);
                        return;
                    }
                    None => Done::Users(got),
                }
            }
            (Op::WhoAmI, Response::Me { user, sessions }) => Done::Me { user, sessions },
            (Op::Subscriptions { mut got }, Response::Relations { mut entries, next }) => {
                got.append(&mut entries);
                match next {
                    Some(after) => {
                        let body = RequestBody::Subscriptions { after: Some(after) };
                        self.start(now, Op::Subscriptions { got }, body, p.started);
                        return;
                    }
                    None => Done::Relations(got),
                }
            }
            (Op::Delete, Response::Deleted) => {
                self.session = None;
                Done::Deleted
            }
            (Op::ConfirmLogin { user, missed, catching_up }, Response::SessionPong { epoch }) => {
                self.confirm_epoch(epoch);
                Done::LoggedIn { user, missed, catching_up }
            }
            (Op::Probe, pong @ (Response::Pong | Response::SessionPong { .. })) => {
                if let Response::SessionPong { epoch } = pong {
                    self.confirm_epoch(epoch);
                }
                self.set_state(State::Ready);
                return;
            }
            (Op::Ping { user_asked }, pong @ (Response::Pong | Response::SessionPong { .. })) => {
                if let Response::SessionPong { epoch } = pong {
                    self.confirm_epoch(epoch);
                }
                if !user_asked {
                    self.set_state(State::Ready);
                    return;
                }
                Done::Pong { rtt: now.saturating_duration_since(p.started) }
            }
            (op, other) => {
                debug!("reply {other:?} does not fit {}", op.name());
                self.events.push_back(Event::Failed { command: name, error: ErrorCode::Busy });
                self.set_state(State::Ready);
                return;
            }
        };
        self.events.push_back(Event::Done(done));
        self.set_state(State::Ready);
    }

    /// Retransmits, gives up, or sends a keepalive, as due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = &mut self.pending {
            if now < p.deadline {
                return;
            }
            let max_tries = if let Op::Probe = p.op { 1 } else { self.cfg.request_max_tries };
            let move_after = self.cfg.failover_after_tries.min(max_tries);
            if p.tries >= move_after && !matches!(p.op, Op::Probe) && p.moves + 1 < self.servers.len() {
                self.move_on(now);
                return;
            }
            if p.tries >= max_tries {
                let p = self.pending.take().expect("checked");
                debug!("{} #{}: no answer after {} tries", p.op.name(), p.id, p.tries);
                if let Some(v) = p.notice {
                    // Only notices came back: most likely a daemon of another version that
                    // does not echo (v2).
                    self.events.push_back(Event::VersionMismatch { command: p.op.name(), server_version: v });
                    self.set_state(State::Ready);
                    return;
                }
                if !p.op.is_background() {
                    if let Op::ConfirmLogin { .. } = p.op {
                        // The user is told the login failed: so it did.
                        self.session = None;
                    }
                    self.events.push_back(Event::NoAnswer {
                        command: p.op.name(),
                        server: self.server,
                        tries: p.tries,
                    });
                }
                self.set_state(State::Ready);
                self.silence(now, false);
                return;
            }
            p.tries += 1;
            p.deadline = now + self.rtt.backoff(p.tries);
            debug!(
                "{} #{}: retransmission {} (next timeout {:?})",
                p.op.name(),
                p.id,
                p.tries,
                p.deadline - now
            );
            self.out.push_back(p.bytes.clone());
            self.last_sent = now;
            return;
        }
        if let Some(at) = self.contact.probe_due(self.session.is_some()) {
            if now >= at {
                let wait = self.contact.probe_sent();
                self.start(now, Op::Probe, RequestBody::Ping, now);
                if let Some(p) = &mut self.pending {
                    p.deadline = now + wait;
                }
            }
            return;
        }
        if self.session.is_some() && (self.want_epoch || now >= self.last_sent + self.ping_interval()) {
            self.start(now, Op::Ping { user_asked: false }, RequestBody::Ping, now);
        }
    }

    fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.cfg.ping_interval_secs)
    }

    fn confirming_login(&self) -> bool {
        matches!(self.pending, Some(Pending { op: Op::ConfirmLogin { .. }, .. }))
    }

    /// Shows the pushes held back while the login was confirmed.
    fn release_early_pushes(&mut self) {
        let held = std::mem::take(&mut self.early_pushes);
        self.events.extend(held.into_iter().map(Event::Push));
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.flush_acks();
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.pending {
            Some(p) => Some(p.deadline),
            None => match self.contact.probe_due(self.session.is_some()) {
                Some(at) => Some(at),
                None if self.session.is_some() && self.want_epoch => Some(self.last_sent),
                None if self.session.is_some() && !self.contact.is_lost() => {
                    Some(self.last_sent + self.ping_interval())
                }
                None => None,
            },
        }
    }
}

#[cfg(test)]
mod tests;
