//! The `server_core` target: a [`Server`] driven as the daemon drives it, fed with datagrams the
//! fuzzer chooses, from a few source addresses, on a virtual clock.
//!
//! # Setup
//!
//! Through the public API only: a `MemoryStore`, a `Server` with [`HashParams::TEST`] and a
//! seeded RNG, then `alice` (the legitimate user, at [`ALICE`]) and `mallory` (a session the
//! fuzzer may use, at [`MALLORY`]) register and log in with padded requests. Alice subscribes
//! to mallory, so that mallory's posts are pushed to her.
//!
//! # Input format
//!
//! A sequence of records, each `[src, mode, len_lo, len_hi, bytes...]` (at most [`MAX_RECORDS`]):
//!
//! - `src & 7`: the source address, from [`SOURCES`] (alice's and mallory's addresses spoofed,
//!   other ports, another IPv4 address, IPv6);
//! - `(src >> 3) & 7`: how far the clock moves before this record when it starts a turn
//!   ([`ADVANCE_MS`]; alice pings every 20 s of virtual time, as her client would);
//! - `mode & 1`: the turn goes on (the next record is received in the same event-loop turn);
//! - `mode & 2`: password jobs stay queued at the end of this turn (the workers are slow);
//! - `mode & 4`: the first commit at the end of this turn fails (a full disk);
//! - `mode & 8`: the store's reads fail in this turn;
//! - `len` (little endian, at most 2048, the daemon's receive buffer): the datagram's length.
//!
//! In a datagram, each 16 bytes made of [`TOKEN_SLOT`] followed by a byte `k` are replaced by a
//! real session token: mallory's for `k = 0`, then the tokens the fuzzer's own logins were given
//! (`k` modulo their number). Alice's token is never handed out: what happens to her is the
//! test. Each 16 bytes made of [`COOKIE_SLOT`] and any byte are replaced by the newest cookie
//! a `Retry` gave the datagram's source address (a client echoing it), so that logins and
//! registrations get past the cookie check. The addresses in [`RESPONSIVE`] answer every path
//! challenge sent to them, as a real client there would (in the next turn); the others never do.
//!
//! # Invariants, checked after every turn
//!
//! - no panic (debug assertions are on in fuzz builds);
//! - every datagram sent is at most [`proto::MAX_DATAGRAM`] bytes and decodes as a `ServerMsg`
//!   (or is a version notice, sent only to an address heard from in that turn, never longer than
//!   what it sent);
//! - a push goes only to a *proven* address: one that was sent a token and sent it back, or that
//!   answered a path challenge;
//! - a reply or a cookie retry goes only to an address that sent a request with that id; when
//!   that request had no valid session (or the reply says "not logged in" / "session expired"),
//!   the answer is at most as large as the request;
//! - an address that never sent a valid token receives in total at most as many bytes as it
//!   sent; any address that is not proven (one that held a session, or had its token sent from
//!   it, included) at most three times as many;
//! - `session_count() <= max_sessions`, and after each commit the core and the store agree on
//!   the number of sessions;
//! - alice's pings, during the run and at the end, are answered `Pong`;
//! - no datagram the daemon sends can start a reflection loop: sent back to a daemon (as a
//!   spoofed source address would make another daemon, or the daemon itself, do), the answers
//!   die out within [`MAX_BOUNCES`]. Tolerated with `UDPMSG_FUZZ_ALLOW=ping-reflection` (see
//!   [`crate::allowed`]) while the known one is open: a `Pong` reply is byte for byte a token-less
//!   `Ping` request.

use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use udpmsg::config::{ServerConfig, StorageKind};
use udpmsg::password::{HashParams, PasswordJob};
use udpmsg::proto::{self, ClientMsg, ErrorCode, Request, RequestBody, Response, ServerMsg, Token};
use udpmsg::server::Server;
use udpmsg::store::memory::MemoryStore;
use udpmsg::store::Store;

/// Marks a token slot in a datagram: these 15 bytes and an index byte.
pub const TOKEN_SLOT: [u8; 15] = *b"@@TOKEN-SLOT@@:";
/// Marks a cookie slot in a datagram: these 15 bytes and any byte.
pub const COOKIE_SLOT: [u8; 15] = *b"@@COOKIE-SLOT@:";
/// Records read from one input; the rest is ignored.
pub const MAX_RECORDS: usize = 64;
/// The daemon reads at most this much of a datagram.
pub const MAX_LEN: usize = 2048;
/// Clock steps before a record that starts a turn.
pub const ADVANCE_MS: [u64; 8] = [0, 0, 1, 20, 250, 1_000, 7_000, 61_000];
/// Bounces after which a reflected datagram counts as a loop.
pub const MAX_BOUNCES: usize = 64;
/// Where the reflecting daemon is.
const PEER: SocketAddr = addr([192, 0, 2, 1], 7070);
/// Alice pings at least this often (her session expires after 60 s of silence).
const ALICE_PING_EVERY: Duration = Duration::from_secs(20);

pub const ALICE: SocketAddr = addr([127, 0, 0, 1], 1000);
pub const MALLORY: SocketAddr = addr([127, 0, 0, 1], 1001);
/// Mallory's password (in the seeds: the fuzzer may log in as mallory again, or delete her).
pub const PASSWORD: &str = "password";
/// Alice's password appears in no seed, so that the fuzzer cannot end her account.
const ALICE_PASSWORD: &str = "alice: not in any seed 7c1e";
/// Alice's request ids, far from the small ids of the seeds.
const ALICE_FIRST_ID: u64 = 0x00a1_1ce0_0000_0000;

const fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), port))
}

/// Source addresses (indexes into [`sources`]) at which a client answers path challenges.
pub const RESPONSIVE: [usize; 3] = [2, 3, 6];

/// The fuzzer's source addresses, by `src & 7`.
pub fn sources() -> [SocketAddr; 8] {
    [
        ALICE,
        MALLORY,
        addr([127, 0, 0, 1], 2000),
        addr([127, 0, 0, 1], 2001),
        addr([10, 9, 8, 7], 3000),
        addr([10, 9, 8, 7], 3001),
        "[::1]:4000".parse().unwrap(),
        "[2001:db8::1]:5000".parse().unwrap(),
    ]
}

/// Small limits, so that the fuzzer reaches them: sessions, password queue, caches, windows.
pub fn config() -> ServerConfig {
    let cfg = ServerConfig {
        storage: StorageKind::Memory,
        argon2_memory_kib: 8,
        argon2_iterations: 1,
        max_retrieve: 50,
        max_inbox: 20,
        max_subscriptions: 4,
        max_sessions_per_user: 3,
        max_sessions: 6,
        catch_up_max: 5,
        session_idle_timeout_secs: 60,
        reply_cache_ttl_secs: 30,
        reply_cache_max_unauthenticated: 16,
        push_initial_rto_ms: 1000,
        push_min_rto_ms: 200,
        push_max_rto_ms: 8000,
        push_max_tries: 4,
        push_window: 4,
        push_queue: 8,
        password_queue: 3,
        login_failures_per_user_burst: 3,
        login_failures_per_user_refill_secs: 10,
        login_failures_per_address_burst: 5,
        login_failures_per_address_refill_secs: 2,
        session_requests_per_sec: 10,
        registrations_per_address_burst: 4,
        registrations_per_address_refill_secs: 5,
        max_accounts: 8,
        ..ServerConfig::default()
    };
    cfg.validate().expect("the fuzzing configuration is valid");
    cfg
}

/// A request as the client encodes it: register and login padded to
/// [`proto::MIN_UNAUTHENTICATED_REQUEST`].
pub fn encode_request(id: u64, token: Option<Token>, body: RequestBody) -> Vec<u8> {
    proto::encode_request(Request { id, token, body })
}

/// The cookie that the harness replaces with the newest one the source address was given.
pub fn cookie_slot() -> proto::Cookie {
    let mut c = [0u8; 16];
    c[..15].copy_from_slice(&COOKIE_SLOT);
    proto::Cookie(c)
}

/// The token that the harness replaces with session token `k`.
pub fn slot(k: u8) -> Token {
    let mut t = [0u8; 16];
    t[..15].copy_from_slice(&TOKEN_SLOT);
    t[15] = k;
    Token(t)
}

/// One record of the input format.
pub fn record(src: u8, advance: u8, mode: u8, datagram: &[u8]) -> Vec<u8> {
    assert!(src < 8 && advance < 8 && datagram.len() <= MAX_LEN);
    let mut r = vec![src | (advance << 3), mode];
    r.extend_from_slice(&(datagram.len() as u16).to_le_bytes());
    r.extend_from_slice(datagram);
    r
}

/// What the harness knows about the requests `(address, id)` it sent.
#[derive(Default, Clone, Copy)]
struct Sent {
    /// Largest datagram with this id from this address, any kind.
    max_len: usize,
    /// Largest one that carried no valid session token (0: none).
    max_unauth_len: usize,
    /// Whether one of them carried a valid session token.
    authed: bool,
}

struct Harness {
    server: Server,
    store: MemoryStore,
    cfg: ServerConfig,
    now: Instant,
    /// Password jobs handed out and not yet run (the worker pool).
    jobs: Vec<PasswordJob>,
    /// Tokens for the slots: mallory's, then those given to the fuzzer's logins.
    tokens: Vec<Token>,
    /// Every token ever handed out by a `LoggedIn` reply (alice's too).
    issued: HashSet<[u8; 16]>,
    /// Which address each token was sent to (in a `LoggedIn` reply).
    issued_to: HashMap<[u8; 16], SocketAddr>,
    /// Addresses that proved they receive: sent back a token sent to them, or answered a path
    /// challenge (pushes may go there; no limit on the bytes they get).
    proven: HashSet<SocketAddr>,
    /// Addresses that sent a datagram with a valid token (at most 3x what they sent).
    token_addrs: HashSet<SocketAddr>,
    /// The newest cookie each address was given.
    cookies: HashMap<SocketAddr, proto::Cookie>,
    /// Path responses the responsive addresses send at the start of the next turn.
    responses: Vec<(SocketAddr, Vec<u8>)>,
    requests: HashMap<(SocketAddr, u64), Sent>,
    /// Addresses heard from in the current turn, with the longest datagram each sent.
    heard: HashMap<SocketAddr, usize>,
    bytes_in: HashMap<SocketAddr, u64>,
    bytes_out: HashMap<SocketAddr, u64>,
    alice: Token,
    /// The epoch alice's pushes are numbered in (her login's answer named it).
    alice_epoch: u32,
    alice_next_id: u64,
    alice_last_ping: Instant,
    /// Pushes alice received and has not acked yet.
    alice_acks: Vec<u64>,
    /// Set up: from now on, every new token goes to the slots.
    ready: bool,
    /// What happened, for [`trace`].
    log: Option<Vec<String>>,
    /// Another daemon, fed with what this one sends, to look for reflection loops.
    reflector: Option<Server>,
}

impl Harness {
    fn new() -> Harness {
        let cfg = config();
        let now = Instant::now();
        let mut store = MemoryStore::new(cfg.max_inbox as usize);
        store.begin_epoch().unwrap();
        let snapshot = store.load().unwrap();
        let rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let server = Server::new(cfg.clone(), HashParams::TEST, snapshot, Box::new(rng), now);
        let mut h = Harness {
            server,
            store,
            cfg,
            now,
            jobs: Vec::new(),
            tokens: Vec::new(),
            issued: HashSet::new(),
            issued_to: HashMap::new(),
            proven: HashSet::new(),
            token_addrs: HashSet::new(),
            cookies: HashMap::new(),
            responses: Vec::new(),
            requests: HashMap::new(),
            heard: HashMap::new(),
            bytes_in: HashMap::new(),
            bytes_out: HashMap::new(),
            alice: Token([0; 16]),
            alice_epoch: 0,
            alice_next_id: ALICE_FIRST_ID,
            alice_last_ping: now,
            alice_acks: Vec::new(),
            ready: false,
            log: None,
            reflector: (!crate::allowed("ping-reflection")).then(|| {
                let mut store = MemoryStore::new(1);
                store.begin_epoch().unwrap();
                let rng = rand::rngs::StdRng::seed_from_u64(1);
                Server::new(config(), HashParams::TEST, store.load().unwrap(), Box::new(rng), now)
            }),
        };
        for (user, password, from) in [("alice", ALICE_PASSWORD, ALICE), ("mallory", PASSWORD, MALLORY)] {
            let reg = RequestBody::Register {
                user: user.into(),
                password: password.into(),
                cookie: None,
                pad: vec![],
            };
            assert_eq!(h.legit(from, None, reg), vec![Ok(Response::Registered)], "setup: register {user}");
            let login = RequestBody::Login {
                user: user.into(),
                password: password.into(),
                cookie: None,
                pad: vec![],
            };
            let [Ok(Response::LoggedIn { token, epoch, .. })] = h.legit(from, None, login)[..] else {
                panic!("setup: {user} logs in")
            };
            match user {
                "alice" => (h.alice, h.alice_epoch) = (token, epoch),
                _ => h.tokens.push(token),
            }
            // The token comes back from the login's address at once (an ack, which uses no
            // request id: the seeds' small ids must stay new for mallory's session).
            let ack = proto::encode_client(&ClientMsg::PushAck { token, epoch, seq: 0 });
            h.receive(from, &ack);
            h.end_turn(0);
        }
        let sub = RequestBody::Subscribe { user: "mallory".into() };
        assert_eq!(h.legit(ALICE, Some(h.alice), sub), vec![Ok(Response::Subscribed)], "setup: subscribe");
        h.ready = true;
        h
    }

    /// A request from a well-behaved client, in a turn of its own; returns the replies to its
    /// address with its id (exactly one, unless the fuzzer sent the same id from that address
    /// and its reply was released in this turn). A login or registration asked for a cookie
    /// is sent again with it, as the client does.
    fn legit(
        &mut self,
        from: SocketAddr,
        token: Option<Token>,
        body: RequestBody,
    ) -> Vec<Result<Response, ErrorCode>> {
        let id = self.alice_next_id;
        self.alice_next_id += 1;
        let what = format!("{body:?}");
        let bytes = encode_request(id, token, body.clone());
        self.receive(from, &bytes);
        let (replies, retries) = self.end_turn(0);
        let mine: Vec<_> =
            replies.into_iter().filter(|(to, rid, _)| *to == from && *rid == id).map(|r| r.2).collect();
        if mine.is_empty() && retries.contains(&(from, id)) {
            let cookie = Some(self.cookies[&from]);
            let body = match body {
                RequestBody::Login { user, password, pad, .. } => {
                    RequestBody::Login { user, password, cookie, pad }
                }
                RequestBody::Register { user, password, pad, .. } => {
                    RequestBody::Register { user, password, cookie, pad }
                }
                other => other,
            };
            return self.legit(from, token, body);
        }
        assert!(!mine.is_empty(), "a well-behaved client's {what} from {from} is answered");
        mine
    }

    /// Alice acks what was pushed to her, in a turn of its own.
    fn alice_ack(&mut self) {
        if self.alice_acks.is_empty() {
            return;
        }
        for seq in std::mem::take(&mut self.alice_acks) {
            let ack =
                proto::encode_client(&ClientMsg::PushAck { token: self.alice, epoch: self.alice_epoch, seq });
            self.receive(ALICE, &ack);
        }
        self.end_turn(0);
    }

    /// Alice pings as her client does: her session is still there and answers.
    fn alice_ping(&mut self) {
        self.alice_ack();
        let r = self.legit(ALICE, Some(self.alice), RequestBody::Ping);
        let pong = Ok(Response::SessionPong { epoch: self.alice_epoch });
        assert!(r.contains(&pong), "alice's ping is answered {pong:?}, not {r:?}");
        self.alice_last_ping = self.now;
    }

    /// Moves the clock as the event loop would see it, alice keeping her session alive.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while self.now < end {
            let next_ping = self.alice_last_ping + ALICE_PING_EVERY;
            self.now = end.min(next_ping);
            if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
                self.server.handle_timeout(self.now);
                self.end_turn(0);
            }
            if self.now >= next_ping {
                self.alice_ping();
            }
        }
    }

    /// One received datagram.
    fn receive(&mut self, from: SocketAddr, bytes: &[u8]) {
        *self.bytes_in.entry(from).or_default() += bytes.len() as u64;
        let heard = self.heard.entry(from).or_default();
        *heard = (*heard).max(bytes.len());
        let token = match proto::decode_client(bytes) {
            Ok(ClientMsg::Request(r)) => r.token,
            Ok(ClientMsg::PushAck { token, .. } | ClientMsg::PushAcks { token, .. }) => Some(token),
            Ok(ClientMsg::PathResponse { token, .. }) => Some(token),
            Err(_) => None,
        };
        if let Some(t) = token.filter(|t| self.issued.contains(&t.0)) {
            self.token_addrs.insert(from);
            if self.issued_to.get(&t.0) == Some(&from) {
                // The token came back from where it was sent: that address receives.
                self.proven.insert(from);
            }
        }
        if let Ok(ClientMsg::Request(req)) = proto::decode_client(bytes) {
            let authed = req.token.is_some_and(|t| self.issued.contains(&t.0));
            let e = self.requests.entry((from, req.id)).or_default();
            e.max_len = e.max_len.max(bytes.len());
            if authed {
                e.authed = true;
            } else {
                e.max_unauth_len = e.max_unauth_len.max(bytes.len());
            }
        }
        if let Some(log) = &mut self.log {
            let t = self.now.duration_since(self.alice_last_ping);
            log.push(format!(
                "{from} -> {} bytes: {:?} (alice pinged {t:?} ago)",
                bytes.len(),
                proto::decode_client(bytes)
            ));
        }
        self.server.handle(self.now, from, bytes);
    }

    /// Ends an event-loop turn as the daemon does (password results, commit, send) and checks
    /// what was sent. `mode`: bit 1 keeps the password jobs queued, bit 2 fails the commit.
    /// Returns the replies sent, (to, id, result), and the cookie retries, (to, id).
    #[allow(clippy::type_complexity)]
    fn end_turn(
        &mut self,
        mode: u8,
    ) -> (Vec<(SocketAddr, u64, Result<Response, ErrorCode>)>, Vec<(SocketAddr, u64)>) {
        // Password jobs, commits and reads until nothing is left (the store serves commits and
        // reads in order), as the daemon's loop and store thread do over a few turns.
        let mut fail_commit = mode & 4 != 0;
        self.store.fail_reads = mode & 8 != 0;
        loop {
            let mut busy = false;
            while let Some(job) = self.server.poll_password_job() {
                self.jobs.push(job);
            }
            if mode & 2 == 0 {
                for job in std::mem::take(&mut self.jobs) {
                    let (id, outcome) = job.run();
                    self.server.on_password_done(self.now, id, outcome);
                    busy = true;
                }
            }
            if let Some((n, writes)) = self.server.take_writes() {
                busy = true;
                if fail_commit {
                    fail_commit = false;
                    let durable = self.store.load().unwrap();
                    self.server.on_commit_failed(self.now, n, durable);
                } else {
                    self.store.commit(&writes).unwrap();
                    self.server.on_committed(self.now, n, writes.len());
                }
            }
            while let Some(r) = self.server.poll_read() {
                busy = true;
                let result = self.store.read(&r.read);
                self.server.on_read(self.now, r.id, result);
            }
            if !busy {
                break;
            }
        }
        self.store.fail_reads = false;
        if self.jobs.is_empty() {
            let stored = self.store.load().unwrap().sessions.len();
            assert_eq!(
                self.server.session_count(),
                stored,
                "once all is committed the core has as many sessions as the store"
            );
        }
        assert!(
            self.server.session_count() <= self.cfg.max_sessions as usize,
            "max_sessions is a hard limit"
        );
        let mut replies = Vec::new();
        let mut retries = Vec::new();
        let sources = sources();
        while let Some(t) = self.server.poll_transmit() {
            let (to, len) = (t.to, t.bytes.len());
            assert!(len <= proto::MAX_DATAGRAM, "a {len} byte datagram to {to}");
            self.reflect(&t.bytes);
            *self.bytes_out.entry(to).or_default() += len as u64;
            if let Some(log) = &mut self.log {
                log.push(format!("  <- {to} {len} bytes: {:?}", proto::decode_server(&t.bytes)));
            }
            match proto::decode_server(&t.bytes) {
                Ok(ServerMsg::Push { seq, .. }) => {
                    assert!(self.proven.contains(&to), "a push to {to}, which never proved it receives");
                    if to == ALICE {
                        self.alice_acks.push(seq);
                    }
                }
                Ok(ServerMsg::Pushes { first_seq, messages, .. }) => {
                    assert!(self.proven.contains(&to), "pushes to {to}, which never proved it receives");
                    if to == ALICE {
                        self.alice_acks.extend((first_seq..).take(messages.len()));
                    }
                }
                Ok(ServerMsg::PathChallenge { session, data }) => {
                    let token = self.issued.iter().find(|t| Token(**t).session_id() == session).copied();
                    let token = token.expect("a challenge for a session that was never opened");
                    if RESPONSIVE.iter().any(|i| sources[*i] == to) {
                        let answer = ClientMsg::PathResponse { token: Token(token), data };
                        self.responses.push((to, proto::encode_client(&answer)));
                    }
                }
                Ok(ServerMsg::Retry { id, cookie }) => {
                    let Some(sent) = self.requests.get(&(to, id)).copied() else {
                        panic!("a retry #{id} to {to}, which never sent request #{id}")
                    };
                    assert!(len <= sent.max_unauth_len, "a {len} byte retry for a smaller request");
                    self.cookies.insert(to, cookie);
                    retries.push((to, id));
                }
                Ok(ServerMsg::Reply { id, result }) => {
                    let Some(sent) = self.requests.get(&(to, id)).copied() else {
                        panic!("a reply #{id} to {to}, which never sent request #{id}: {result:?}")
                    };
                    let limit = match &result {
                        // The core took it as coming without a valid session.
                        Err(ErrorCode::NotLoggedIn | ErrorCode::SessionExpired) => Some(sent.max_len),
                        _ if !sent.authed => Some(sent.max_unauth_len),
                        _ => None,
                    };
                    if let Some(limit) = limit {
                        assert!(
                            len <= limit,
                            "amplification: a {len} byte reply #{id} to {to}, whose request had {limit} bytes \
                             and no valid session: {result:?}"
                        );
                    }
                    if let Ok(Response::LoggedIn { token, .. }) = &result {
                        if self.issued.insert(token.0) && self.ready {
                            self.tokens.push(*token);
                        }
                        self.issued_to.insert(token.0, to);
                    }
                    replies.push((to, id, result));
                }
                Err(_) => {
                    assert!(
                        t.bytes.starts_with(&proto::version_notice(b"UM\x00")[..3])
                            && (len == 3 || t.bytes[3] == proto::NOTICE_TAG),
                        "undecodable datagram to {to}"
                    );
                    let Some(&heard) = self.heard.get(&to) else {
                        panic!("a version notice to {to}, not heard from in this turn")
                    };
                    assert!(len <= heard, "a {len} byte version notice for at most {heard} bytes");
                }
            }
        }
        self.heard.clear();
        for (to, out) in &self.bytes_out {
            let got = self.bytes_in.get(to).copied().unwrap_or(0);
            if !self.token_addrs.contains(to) {
                assert!(*out <= got, "amplification: {to} sent {got} bytes in all and was sent {out}");
            } else if !self.proven.contains(to) {
                assert!(
                    *out <= 3 * got,
                    "amplification: {to}, which sent a token but never proved it receives, sent {got} bytes \
                     in all and was sent {out}"
                );
            }
        }
        (replies, retries)
    }

    /// Plays `bytes` to the reflecting daemon as if it came from a peer daemon that answers the
    /// same way (the reflector itself): the exchange must stop.
    fn reflect(&mut self, bytes: &[u8]) {
        let Some(r) = &mut self.reflector else { return };
        let mut pending = vec![bytes.to_vec()];
        for _ in 0..MAX_BOUNCES {
            for d in std::mem::take(&mut pending) {
                r.handle(self.now, PEER, &d);
            }
            while let Some(job) = r.poll_password_job() {
                let (id, outcome) = job.run();
                r.on_password_done(self.now, id, outcome);
            }
            if let Some((n, writes)) = r.take_writes() {
                r.on_committed(self.now, n, writes.len());
            }
            // The reflector's reads find nothing: it has no data.
            while let Some(read) = r.poll_read() {
                r.on_read(self.now, read.id, Err(udpmsg::store::StoreError("no data".into())));
            }
            while let Some(t) = r.poll_transmit() {
                if t.to == PEER {
                    pending.push(t.bytes);
                }
            }
            if pending.is_empty() {
                return;
            }
        }
        panic!(
            "reflection loop: the daemon's datagram {bytes:02x?} ({:?}), sent to another daemon from a \
             spoofed address, is still answered after {MAX_BOUNCES} bounces: {pending:02x?}",
            proto::decode_server(bytes)
        );
    }

    /// Replaces each token slot in `d` by a real token, and each cookie slot by the newest
    /// cookie `from` was given.
    fn fill_slots(&self, from: SocketAddr, d: &mut [u8]) {
        let mut i = 0;
        while i + 16 <= d.len() {
            if d[i..i + 15] == TOKEN_SLOT {
                let k = d[i + 15] as usize;
                let t = self.tokens[k % self.tokens.len()];
                d[i..i + 16].copy_from_slice(&t.0);
                i += 16;
            } else if d[i..i + 15] == COOKIE_SLOT {
                if let Some(c) = self.cookies.get(&from) {
                    d[i..i + 16].copy_from_slice(&c.0);
                }
                i += 16;
            } else {
                i += 1;
            }
        }
    }

    /// The responsive addresses answer the challenges they were sent, in a turn of their own.
    fn answer_challenges(&mut self) {
        let responses = std::mem::take(&mut self.responses);
        if responses.is_empty() {
            return;
        }
        for (from, bytes) in responses {
            self.proven.insert(from);
            self.receive(from, &bytes);
        }
        self.end_turn(0);
    }
}

/// The fuzz target.
pub fn run(data: &[u8]) {
    run_with(data, None);
}

/// Runs an input and returns a log of every datagram in and out (after the setup), for
/// looking at what a seed or a crash reproducer does.
pub fn trace(data: &[u8]) -> Vec<String> {
    let mut log = Vec::new();
    run_with(data, Some(&mut log));
    log
}

fn run_with(data: &[u8], log: Option<&mut Vec<String>>) {
    let mut h = Harness::new();
    if log.is_some() {
        h.log = Some(Vec::new());
    }
    let sources = sources();
    let mut rest = data;
    let mut turn_open = false;
    let mut mode = 0;
    for _ in 0..MAX_RECORDS {
        let [src, m, lo, hi, tail @ ..] = rest else { break };
        let len = (u16::from_le_bytes([*lo, *hi]) as usize).min(MAX_LEN).min(tail.len());
        let mut datagram = tail[..len].to_vec();
        rest = &tail[len..];
        mode = *m;
        if !turn_open {
            h.answer_challenges();
            h.alice_ack();
            h.advance(Duration::from_millis(ADVANCE_MS[((src >> 3) & 7) as usize]));
        }
        let from = sources[(src & 7) as usize];
        h.fill_slots(from, &mut datagram);
        h.receive(from, &datagram);
        turn_open = mode & 1 != 0;
        if !turn_open {
            h.end_turn(mode);
        }
    }
    if turn_open {
        h.end_turn(mode & !1);
    }
    // The workers finish whatever is queued; then alice is still served.
    h.end_turn(0);
    h.answer_challenges();
    h.alice_ping();
    if let (Some(out), Some(log)) = (log, h.log.take()) {
        *out = log;
    }
}
