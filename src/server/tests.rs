//! Unit tests of the server core on simulated time: every command's success and error paths,
//! de-duplication, group-commit gating, push retransmission timer edges and expiry.

use super::*;
use crate::password::HashParams;
use crate::proto::{Message, Request, RequestBody};
use crate::store::memory::MemoryStore;
use crate::store::Store;
use rand::SeedableRng;
use std::time::Duration;

/// The unit tests' configuration. `UDPMSG_TEST_CACHE_BYTES=0` runs them all with nothing cached
/// (CI does both): every request must behave the same whether its data is cached or read.
pub(crate) fn test_config() -> ServerConfig {
    let cache_bytes =
        std::env::var("UDPMSG_TEST_CACHE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 20);
    ServerConfig {
        cache_bytes,
        argon2_memory_kib: 8,
        argon2_iterations: 1,
        push_initial_rto_ms: 1000,
        push_min_rto_ms: 200,
        push_max_rto_ms: 8000,
        push_max_tries: 4,
        registrations_per_address_burst: 100_000,
        ..ServerConfig::default()
    }
}

struct H {
    server: Server,
    store: Box<dyn Store>,
    now: Instant,
    next_id: u64,
    /// Everything sent that is not the reply a helper was waiting for.
    other: Vec<Transmit>,
    /// Commits fail while set (a full disk).
    disk_full: bool,
    /// Reads fail while set.
    reads_fail: bool,
    /// Every write committed, in order.
    committed: Vec<Write>,
}

fn a(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// 127.0.0.`last`:`port`: another host on loopback.
fn ip(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], port))
}

/// A login or registration body with `cookie` in it.
fn with_cookie(body: RequestBody, cookie: Option<proto::Cookie>) -> RequestBody {
    match body {
        RequestBody::Login { user, password, pad, .. } => RequestBody::Login { user, password, cookie, pad },
        RequestBody::Register { user, password, pad, .. } => {
            RequestBody::Register { user, password, cookie, pad }
        }
        other => other,
    }
}

impl H {
    fn new() -> H {
        Self::with(test_config())
    }

    fn with(cfg: ServerConfig) -> H {
        let store = Box::new(MemoryStore::new(cfg.max_inbox as usize));
        Self::with_store(cfg, store)
    }

    fn with_store(cfg: ServerConfig, mut store: Box<dyn Store>) -> H {
        let now = Instant::now();
        store.begin_epoch().unwrap();
        let snap = store.load().unwrap();
        let rng = rand::rngs::StdRng::seed_from_u64(7);
        H {
            server: Server::new(cfg, HashParams::TEST, snap, Box::new(rng), now),
            store,
            now,
            next_id: 1,
            other: Vec::new(),
            disk_full: false,
            reads_fail: false,
            committed: Vec::new(),
        }
    }

    /// Runs password jobs, commits and reads, as the daemon's loop and its store thread do,
    /// until nothing is left to do.
    fn turn(&mut self) {
        loop {
            let mut busy = false;
            while let Some(job) = self.server.poll_password_job() {
                let (id, outcome) = job.run();
                self.server.on_password_done(self.now, id, outcome);
                busy = true;
            }
            if let Some((n, writes)) = self.server.take_writes() {
                busy = true;
                if self.disk_full {
                    let durable = self.store.load().unwrap();
                    self.server.on_commit_failed(self.now, n, durable);
                } else {
                    self.store.commit(&writes).unwrap();
                    // As the daemon's loop does: races lost first, then the commit, then what
                    // the commit learned for later.
                    let outcome = self.store.commit_outcome();
                    self.server.on_names_taken(&outcome.names_taken);
                    self.server.on_committed(self.now, n, writes.len());
                    for r in outcome.remote {
                        self.server.on_remote(self.now, r);
                    }
                    self.committed.extend(writes);
                }
            }
            while let Some(job) = self.server.poll_read() {
                let (id, read) = (job.id, job.read);
                busy = true;
                let result = self.read(&read);
                self.server.on_read(self.now, id, result);
            }
            if !busy {
                return;
            }
        }
    }

    /// Answers the reads the core may issue now (without committing anything).
    fn reads(&mut self) {
        while let Some(job) = self.server.poll_read() {
            let (id, read) = (job.id, job.read);
            let result = self.read(&read);
            self.server.on_read(self.now, id, result);
        }
    }

    fn read(
        &mut self,
        read: &crate::store::Read,
    ) -> Result<crate::store::ReadResult, crate::store::StoreError> {
        if self.reads_fail {
            return Err(crate::store::StoreError("the disk is gone".into()));
        }
        self.store.read(read)
    }

    /// The message ids of `user`'s inbox in the store, oldest first.
    fn inbox(&mut self, user: &str) -> Vec<u64> {
        let Ok(crate::store::ReadResult::Account(Some(a))) =
            self.store.read(&crate::store::Read::Account { name: user.into() })
        else {
            return vec![];
        };
        match self.store.read(&crate::store::Read::Inbox {
            id: a.id,
            count: 100_000,
            before: None,
            above: None,
        }) {
            Ok(crate::store::ReadResult::Inbox { messages, .. }) => messages.iter().map(|m| m.id).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn drain(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.server.poll_transmit()).collect()
    }

    fn raw(&mut self, from: SocketAddr, bytes: &[u8]) -> Vec<Transmit> {
        self.server.handle(self.now, from, bytes);
        self.turn();
        self.drain()
    }

    fn encode(&mut self, token: Option<Token>, body: RequestBody) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        (id, proto::encode_request(Request { id, token, body }))
    }

    /// Sends a request and returns its reply; other datagrams are kept in `other`. A login or
    /// registration the daemon asks to repeat with a cookie is repeated, as the client does.
    fn req(
        &mut self,
        from: SocketAddr,
        token: Option<Token>,
        body: RequestBody,
    ) -> Result<Response, ErrorCode> {
        let (id, bytes) = self.encode(token, body.clone());
        let sent = self.raw(from, &bytes);
        let mut reply = None;
        let mut retry = None;
        for t in sent {
            match proto::decode_server(&t.bytes) {
                Ok(ServerMsg::Reply { id: rid, result }) if rid == id && t.to == from => reply = Some(result),
                Ok(ServerMsg::Retry { id: rid, cookie }) if rid == id && t.to == from => retry = Some(cookie),
                _ => self.other.push(t),
            }
        }
        if let Some(cookie) = retry {
            assert!(reply.is_none());
            return self.req(from, token, with_cookie(body, Some(cookie)));
        }
        reply.expect("a reply")
    }

    /// A valid cookie for `from`, as a `Retry` would give it.
    fn cookie(&mut self, from: SocketAddr) -> proto::Cookie {
        self.server.cookies.make(self.now, self.server.rng.as_mut(), from)
    }

    fn register(&mut self, user: &str, pw: &str) -> Result<Response, ErrorCode> {
        let body =
            RequestBody::Register { user: user.into(), password: pw.into(), cookie: None, pad: vec![] };
        self.req(a(1), None, body)
    }

    /// Logs in and, as the client does, confirms the address with a ping.
    fn login_from(&mut self, from: SocketAddr, user: &str, pw: &str) -> Result<Token, ErrorCode> {
        let login = RequestBody::Login { user: user.into(), password: pw.into(), cookie: None, pad: vec![] };
        match self.req(from, None, login)? {
            Response::LoggedIn { token, .. } => {
                let epoch = self.server.epoch;
                assert_eq!(
                    self.req(from, Some(token), RequestBody::Ping),
                    Ok(Response::SessionPong { epoch })
                );
                Ok(token)
            }
            other => panic!("{other:?}"),
        }
    }

    fn user(&mut self, user: &str, port: u16) -> Token {
        self.register(user, "password").unwrap();
        self.login_from(a(port), user, "password").unwrap()
    }

    /// Answers the path challenges `from` was sent for `token`'s session (as the client does).
    fn prove(&mut self, from: SocketAddr, token: Token) {
        let mut challenges = Vec::new();
        let sent: Vec<Transmit> =
            self.other.drain(..).chain(std::iter::from_fn(|| self.server.poll_transmit())).collect();
        for t in sent {
            match proto::decode_server(&t.bytes) {
                Ok(ServerMsg::PathChallenge { session, data })
                    if t.to == from && session == token.session_id() =>
                {
                    challenges.push(data)
                }
                _ => self.other.push(t),
            }
        }
        assert!(!challenges.is_empty(), "no challenge was sent to {from}");
        for data in challenges {
            let bytes = proto::encode_client(&ClientMsg::PathResponse { token, data });
            self.server.handle(self.now, from, &bytes);
            self.turn();
        }
    }

    /// The pushes sent so far (other datagrams stay in `other`).
    fn pushes(&mut self) -> Vec<(SocketAddr, u64, Message)> {
        let mut v = Vec::new();
        let sent: Vec<Transmit> =
            self.other.drain(..).chain(std::iter::from_fn(|| self.server.poll_transmit())).collect();
        for t in sent {
            match proto::decode_server(&t.bytes) {
                Ok(ServerMsg::Push { seq, message, .. }) => v.push((t.to, seq, message)),
                Ok(ServerMsg::Pushes { first_seq, messages, .. }) => {
                    v.extend((first_seq..).zip(messages).map(|(seq, m)| (t.to, seq, m)))
                }
                _ => self.other.push(t),
            }
        }
        v
    }

    fn ack(&mut self, token: Token, seq: u64) {
        let bytes = proto::encode_client(&ClientMsg::PushAck { token, epoch: self.server.epoch, seq });
        self.server.handle(self.now, a(9999), &bytes);
        self.turn();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.server.handle_timeout(self.now);
        self.turn();
    }

    /// The daemon restarts on the same store: a new epoch, the committed state reloaded.
    fn restart(&mut self, cfg: ServerConfig) {
        self.restart_with(cfg, |_| {});
    }

    /// A restart whose loaded snapshot `edit` changes first (what a store would report).
    fn restart_with(&mut self, cfg: ServerConfig, edit: impl FnOnce(&mut Startup)) {
        self.store.begin_epoch().unwrap();
        let mut snap = self.store.load().unwrap();
        edit(&mut snap);
        let rng = rand::rngs::StdRng::seed_from_u64(self.next_id);
        self.server = Server::new(cfg, HashParams::TEST, snap, Box::new(rng), self.now);
        self.turn();
    }
}

#[test]
fn register_and_login_paths() {
    let mut h = H::new();
    assert_eq!(h.register("alice", "secret"), Ok(Response::Registered));
    assert_eq!(h.register("alice", "secret"), Err(ErrorCode::NameTaken { user: "alice".into() }));
    assert_eq!(h.register("a b", "secret"), Err(ErrorCode::InvalidName { max_len: 32 }));
    assert_eq!(h.register(&"x".repeat(33), "secret"), Err(ErrorCode::InvalidName { max_len: 32 }));
    assert_eq!(h.register("bob", "abc"), Err(ErrorCode::InvalidPassword { min_len: 4, max_len: 128 }));
    assert!(h.login_from(a(1), "alice", "secret").is_ok());
    // Wrong password and unknown user: one indistinguishable answer.
    assert_eq!(h.login_from(a(1), "alice", "wrong"), Err(ErrorCode::BadCredentials));
    assert_eq!(h.login_from(a(1), "nobody", "secret"), Err(ErrorCode::BadCredentials));

    let mut closed = H::with(ServerConfig { allow_registration: false, ..test_config() });
    assert_eq!(closed.register("alice", "secret"), Err(ErrorCode::RegistrationClosed));
}

#[test]
fn requests_need_a_session() {
    let mut h = H::new();
    assert_eq!(h.req(a(1), None, RequestBody::Post { text: "x".into() }), Err(ErrorCode::NotLoggedIn));
    assert_eq!(
        h.req(a(1), Some(Token([3; 16])), RequestBody::Retrieve { count: 1, before: None }),
        Err(ErrorCode::NotLoggedIn)
    );
    let t = h.user("alice", 1);
    assert_eq!(h.req(a(1), Some(t), RequestBody::Logout), Ok(Response::LoggedOut));
    assert_eq!(h.req(a(1), Some(t), RequestBody::Post { text: "x".into() }), Err(ErrorCode::NotLoggedIn));
    // Ping answers without a session (health checks), never with more bytes than it got.
    assert_eq!(h.req(a(1), None, RequestBody::Ping), Ok(Response::Pong));
}

#[test]
fn subscribe_paths() {
    let mut h = H::new();
    let t = h.user("alice", 1);
    h.register("bob", "password").unwrap();
    let sub = |h: &mut H, u: &str| h.req(a(1), Some(t), RequestBody::Subscribe { user: u.into() });
    let unsub = |h: &mut H, u: &str| h.req(a(1), Some(t), RequestBody::Unsubscribe { user: u.into() });
    assert_eq!(sub(&mut h, "bob"), Ok(Response::Subscribed));
    assert_eq!(sub(&mut h, "bob"), Err(ErrorCode::AlreadySubscribed { user: "bob".into() }));
    assert_eq!(sub(&mut h, "alice"), Err(ErrorCode::CannotSubscribeToSelf));
    assert_eq!(sub(&mut h, "carol"), Err(ErrorCode::NoSuchUser { user: "carol".into() }));
    assert_eq!(unsub(&mut h, "bob"), Ok(Response::Unsubscribed));
    assert_eq!(unsub(&mut h, "bob"), Err(ErrorCode::NotSubscribed { user: "bob".into() }));
    assert_eq!(unsub(&mut h, "carol"), Err(ErrorCode::NoSuchUser { user: "carol".into() }));

    let mut small = H::with(ServerConfig { max_subscriptions: 1, ..test_config() });
    let t = small.user("alice", 1);
    small.register("bob", "password").unwrap();
    small.register("carol", "password").unwrap();
    assert_eq!(
        small.req(a(1), Some(t), RequestBody::Subscribe { user: "bob".into() }),
        Ok(Response::Subscribed)
    );
    assert_eq!(
        small.req(a(1), Some(t), RequestBody::Subscribe { user: "carol".into() }),
        Err(ErrorCode::TooManySubscriptions { max: 1 })
    );
}

#[test]
fn post_is_pushed_to_every_session_of_every_subscriber() {
    let mut h = H::new();
    let alice1 = h.user("alice", 1);
    let alice2 = h.login_from(a(2), "alice", "password").unwrap();
    let carol = h.user("carol", 3);
    let bob = h.user("bob", 4);
    h.req(a(1), Some(alice1), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    let _ = h.pushes();
    assert_eq!(
        h.req(a(4), Some(bob), RequestBody::Post { text: "hi".into() }),
        Ok(Response::Posted { id: 1, recipients: 1 })
    );
    let pushes = h.pushes();
    let mut to: Vec<_> =
        pushes.iter().map(|(addr, seq, m)| (*addr, *seq, m.text.as_str(), m.author.as_str())).collect();
    to.sort();
    assert_eq!(to, vec![(a(1), 1, "hi", "bob"), (a(2), 1, "hi", "bob")], "carol is not subscribed");
    let _ = (alice2, carol);
    assert_eq!(h.inbox("alice"), vec![1]);
    assert!(h.inbox("carol").is_empty());
    assert!(h.inbox("bob").is_empty(), "one's own posts are not in one's inbox");
}

#[test]
fn post_text_limits() {
    let mut h = H::with(ServerConfig { max_text_bytes: 10, ..test_config() });
    let t = h.user("bob", 1);
    assert_eq!(h.req(a(1), Some(t), RequestBody::Post { text: "".into() }), Err(ErrorCode::EmptyText));
    assert_eq!(
        h.req(a(1), Some(t), RequestBody::Post { text: "x".repeat(11) }),
        Err(ErrorCode::TextTooLong { max: 10 })
    );
    assert!(h.req(a(1), Some(t), RequestBody::Post { text: "x".repeat(10) }).is_ok());
}

#[test]
fn retrieve_newest_oldest_first_in_pages_that_fit() {
    let mut h = H::with(ServerConfig { max_retrieve: 50, ..test_config() });
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    for i in 0..30 {
        h.req(a(2), Some(bob), RequestBody::Post { text: format!("{i:03}{}", "x".repeat(200)) }).unwrap();
    }
    let get = |h: &mut H, count, before| h.req(a(1), Some(alice), RequestBody::Retrieve { count, before });
    assert_eq!(get(&mut h, 0, None), Err(ErrorCode::CountOutOfRange { min: 1, max: 50 }));
    assert_eq!(get(&mut h, 51, None), Err(ErrorCode::CountOutOfRange { min: 1, max: 50 }));
    // 10 messages of ~210 bytes need several datagrams: page through like the client does.
    let mut got: Vec<Message> = Vec::new();
    let mut before = None;
    loop {
        let (id, bytes) =
            h.encode(Some(alice), RequestBody::Retrieve { count: 10 - got.len() as u32, before });
        let sent = h.raw(a(1), &bytes);
        assert!(sent.iter().all(|t| t.bytes.len() <= proto::MAX_DATAGRAM));
        let Ok(ServerMsg::Reply { id: rid, result: Ok(Response::Messages { messages, more }) }) =
            proto::decode_server(&sent[0].bytes)
        else {
            panic!()
        };
        assert_eq!(rid, id);
        assert!(!messages.is_empty());
        before = messages.first().map(|m| m.id);
        let mut page = messages;
        page.append(&mut got);
        got = page;
        if !more {
            break;
        }
    }
    let texts: Vec<String> = got.iter().map(|m| m.text[..3].to_string()).collect();
    assert_eq!(texts, (20..30).map(|i| format!("{i:03}")).collect::<Vec<_>>());
}

#[test]
fn retransmitted_requests_are_not_executed_twice() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    let _ = h.pushes();
    let (_, post) = h.encode(Some(bob), RequestBody::Post { text: "once".into() });
    let first = h.raw(a(2), &post);
    let second = h.raw(a(2), &post);
    let replies = |v: &[Transmit]| -> Vec<Vec<u8>> {
        v.iter().filter(|t| t.to == a(2)).map(|t| t.bytes.clone()).collect()
    };
    assert_eq!(replies(&first), replies(&second), "same reply");
    assert_eq!(h.inbox("alice"), vec![1], "stored once");
    let pushes: Vec<_> = first.iter().chain(second.iter()).filter(|t| t.to == a(1)).collect();
    assert_eq!(pushes.len(), 1, "forwarded once");

    // A retransmitted login returns the same session.
    let (_, login) = h.encode(
        None,
        RequestBody::Login { user: "alice".into(), password: "password".into(), cookie: None, pad: vec![] },
    );
    let is_reply = |t: &Transmit| matches!(proto::decode_server(&t.bytes), Ok(ServerMsg::Reply { .. }));
    let r1: Vec<Transmit> = h.raw(a(5), &login).into_iter().filter(is_reply).collect();
    let r2: Vec<Transmit> = h.raw(a(5), &login).into_iter().filter(is_reply).collect();
    assert_eq!(r1.len(), 1);
    assert_eq!(r1, r2);
    assert_eq!(h.server.session_count(), 3);
    assert_eq!(h.server.stats().duplicate_requests, 2);
}

#[test]
fn replies_wait_for_the_commit() {
    let mut h = H::new();
    let bob = h.user("bob", 2);
    // Bob's followers are read once; from then on a post needs nothing from the store.
    h.req(a(2), Some(bob), RequestBody::Post { text: "first".into() }).unwrap();
    let (_, post) = h.encode(Some(bob), RequestBody::Post { text: "durable".into() });
    h.server.handle(h.now, a(2), &post);
    h.reads();
    assert_eq!(h.server.poll_transmit(), None, "nothing leaves before the batch is durable");
    // A read arriving in the same turn waits too: it may have seen the uncommitted write.
    let (_, ping) = h.encode(Some(bob), RequestBody::Ping);
    h.server.handle(h.now, a(2), &ping);
    assert_eq!(h.server.poll_transmit(), None);
    let (n, writes) = h.server.take_writes().unwrap();
    assert!(matches!(writes[0], Write::StoreMessage { .. }));
    assert_eq!(h.server.take_writes(), None, "one batch in flight at a time");
    h.store.commit(&writes).unwrap();
    h.server.on_committed(h.now, n, writes.len());
    assert_eq!(h.drain().len(), 2);
}

#[test]
fn version_mismatch_and_garbage() {
    let mut h = H::new();
    let out = h.raw(a(1), b"UM\x07whatever");
    assert_eq!(out, vec![Transmit { to: a(1), bytes: b"Um\x03\xffwhateve".to_vec() }]);
    assert!(h.raw(a(1), b"hello").is_empty());
    assert!(h.raw(a(1), b"UM\x03\xff\xff\xff").is_empty());
    assert_eq!(h.server.stats().undecodable, 2);
    assert_eq!(h.server.stats().version_mismatch, 1);
}

#[test]
fn unpadded_login_gets_no_answer_and_no_reply_exceeds_an_unauthenticated_request() {
    let mut h = H::new();
    h.register("alice", "password").unwrap();
    let short = proto::encode_client(&ClientMsg::Request(Request {
        id: 1,
        token: None,
        body: RequestBody::Login {
            user: "alice".into(),
            password: "password".into(),
            cookie: None,
            pad: vec![],
        },
    }));
    assert!(short.len() < proto::MIN_UNAUTHENTICATED_REQUEST);
    assert!(h.raw(a(1), &short).is_empty());
    assert_eq!(h.server.session_count(), 0, "and nothing was executed");
    for body in [
        RequestBody::Ping,
        RequestBody::Retrieve { count: 100, before: None },
        RequestBody::ListUsers { pattern: "*".into(), after: None },
        RequestBody::Login { user: "alice".into(), password: "password".into(), cookie: None, pad: vec![] },
        RequestBody::Register { user: "zed".into(), password: "password".into(), cookie: None, pad: vec![] },
    ] {
        for token in [None, Some(Token([1; 16]))] {
            let (_, bytes) = h.encode(token, body.clone());
            for t in h.raw(a(1), &bytes) {
                assert!(t.bytes.len() <= bytes.len(), "{body:?}: {} > {}", t.bytes.len(), bytes.len());
            }
        }
    }
}

#[test]
fn push_retransmission_timer_edges() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    h.req(a(2), Some(bob), RequestBody::Post { text: "hi".into() }).unwrap();
    assert_eq!(h.pushes().len(), 1);
    let ms = Duration::from_millis;
    // Nothing before the timeout, a retransmission at it, then doubled backoff.
    h.advance(ms(999));
    assert!(h.pushes().is_empty());
    h.advance(ms(1));
    assert_eq!(h.pushes().len(), 1, "retransmitted at 1 s");
    h.advance(ms(1999));
    assert!(h.pushes().is_empty());
    h.advance(ms(1));
    assert_eq!(h.pushes().len(), 1, "then after 2 s");
    h.advance(ms(3999));
    assert!(h.pushes().is_empty());
    h.advance(ms(1));
    assert_eq!(h.pushes().len(), 1, "then after 4 s: fourth and last try");
    // Give up after the last try: unresponsive, no more retransmissions.
    h.advance(ms(8000));
    assert!(h.pushes().is_empty());
    assert_eq!(h.server.stats().sessions_unresponsive, 1);
    h.advance(Duration::from_secs(60));
    assert!(h.pushes().is_empty());
    assert_eq!(h.inbox("alice"), vec![1], "the message stays in the inbox");
    // Heard from again: pushing resumes.
    h.req(a(1), Some(alice), RequestBody::Ping).unwrap();
    let p = h.pushes();
    assert_eq!(p.len(), 1);
    h.ack(alice, p[0].1);
    h.advance(Duration::from_secs(30));
    assert!(h.pushes().is_empty(), "acked: no more retransmissions");
}

#[test]
fn acks_open_the_window_and_sample_rtt() {
    let mut h = H::with(ServerConfig { push_window: 2, ..test_config() });
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    for i in 0..5 {
        h.req(a(2), Some(bob), RequestBody::Post { text: format!("m{i}") }).unwrap();
    }
    let p = h.pushes();
    assert_eq!(p.iter().map(|p| p.1).collect::<Vec<_>>(), vec![1, 2], "window of 2");
    h.now += Duration::from_millis(50);
    h.ack(alice, 1);
    let p = h.pushes();
    assert_eq!(p.iter().map(|p| p.1).collect::<Vec<_>>(), vec![3]);
    assert_eq!(p[0].2.text, "m2", "in posting order");
    // RTT 50 ms: SRTT 50, RTTVAR 25 -> RTO 150, floored at 200 ms.
    // Push 3 went out after the sample, with the adapted timeout; push 2 keeps its 1 s timer.
    h.advance(Duration::from_millis(199));
    assert!(h.pushes().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.pushes().iter().map(|p| p.1).collect::<Vec<_>>(), vec![3]);
    // Push 3 again after the doubled 400 ms (at 650 ms), push 2 at its own 1 s.
    h.advance(Duration::from_millis(400));
    assert_eq!(h.pushes().iter().map(|p| p.1).collect::<Vec<_>>(), vec![3]);
    h.advance(Duration::from_millis(349));
    assert!(h.pushes().is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.pushes().iter().map(|p| p.1).collect::<Vec<_>>(), vec![2]);
}

#[test]
fn sessions_expire_when_idle() {
    let mut h = H::with(ServerConfig { session_idle_timeout_secs: 60, ..test_config() });
    let t = h.user("alice", 1);
    h.advance(Duration::from_secs(59));
    assert_eq!(h.req(a(1), Some(t), RequestBody::Ping), Ok(Response::SessionPong { epoch: h.server.epoch }));
    h.advance(Duration::from_secs(59));
    assert_eq!(h.server.session_count(), 1, "the ping kept it alive");
    h.advance(Duration::from_secs(1));
    assert_eq!(h.server.session_count(), 0);
    assert_eq!(h.req(a(1), Some(t), RequestBody::Ping), Err(ErrorCode::SessionExpired));
    assert_eq!(h.store.load().unwrap().sessions.len(), 0, "the expiry was stored");
}

#[test]
fn only_authenticated_requests_move_the_push_address() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    // An ack from elsewhere, even with the right token, does not move it.
    h.ack(alice, 99);
    h.req(a(2), Some(bob), RequestBody::Post { text: "one".into() }).unwrap();
    assert_eq!(h.pushes()[0].0, a(1));
    h.ack(alice, 1);
    // A request with a forged token from a new address moves nothing.
    let _ = h.req(a(7), Some(Token([9; 16])), RequestBody::Ping);
    // A request with alice's token from a new address moves it once that address has echoed
    // the challenge it is sent (NAT rebinding; see `path_validation` for the rest).
    h.req(a(8), Some(alice), RequestBody::Ping).unwrap();
    h.req(a(2), Some(bob), RequestBody::Post { text: "two".into() }).unwrap();
    assert_eq!(h.pushes()[0].0, a(1), "not before the proof");
    h.prove(a(8), alice);
    assert_eq!(h.pushes()[0].0, a(8), "the unacked push follows at once");
}

#[test]
fn every_page_fits_one_datagram() {
    let mut h = H::new();
    let t = h.user("alice", 1);
    let long = |i: usize| format!("{i:03}{}", "n".repeat(29));
    for i in 0..100 {
        h.register(&long(i), "password").unwrap();
        h.req(a(1), Some(t), RequestBody::Subscribe { user: long(i) }).unwrap();
    }
    // Clients start their request ids at random: the largest ids take ten bytes.
    h.next_id = u64::MAX - 1000;
    let mut after = None;
    let mut seen = 0;
    loop {
        let (_, bytes) =
            h.encode(Some(t), RequestBody::ListUsers { pattern: "*".into(), after: after.clone() });
        let out = h.raw(a(1), &bytes);
        assert!(out[0].bytes.len() <= proto::MAX_DATAGRAM, "{} bytes", out[0].bytes.len());
        let Ok(ServerMsg::Reply { result: Ok(Response::Users { names, next }), .. }) =
            proto::decode_server(&out[0].bytes)
        else {
            panic!()
        };
        seen += names.len();
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, 101);
    let (_, bytes) = h.encode(Some(t), RequestBody::Subscriptions { after: None });
    let out = h.raw(a(1), &bytes);
    assert!(out[0].bytes.len() <= proto::MAX_DATAGRAM, "{} bytes", out[0].bytes.len());
}

#[test]
fn users_whoami_and_relations() {
    let mut h = H::new();
    let t = h.user("alice", 1);
    for u in ["bob", "bobby", "carol"] {
        h.register(u, "password").unwrap();
    }
    assert_eq!(
        h.req(a(1), Some(t), RequestBody::ListUsers { pattern: "bob*".into(), after: None }),
        Ok(Response::Users { names: vec!["bob".into(), "bobby".into()], next: None })
    );
    assert_eq!(
        h.req(a(1), Some(t), RequestBody::ListUsers { pattern: "a b".into(), after: None }),
        Err(ErrorCode::InvalidPattern { max_len: 64 })
    );
    assert_eq!(
        h.req(a(1), Some(t), RequestBody::WhoAmI),
        Ok(Response::Me { user: "alice".into(), sessions: 1 })
    );
    h.req(a(1), Some(t), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    let Ok(Response::Relations { entries, next: None }) =
        h.req(a(1), Some(t), RequestBody::Subscriptions { after: None })
    else {
        panic!()
    };
    assert_eq!(entries, vec![proto::Relation { user: "bob".into(), following: true, follower: false }]);
}

#[test]
fn state_survives_a_reload_from_the_store() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    h.req(a(2), Some(bob), RequestBody::Post { text: "kept".into() }).unwrap();
    h.restart(test_config());
    // The session token still works, the inbox and subscription are there.
    let Ok(Response::Messages { messages, .. }) =
        h.req(a(1), Some(alice), RequestBody::Retrieve { count: 5, before: None })
    else {
        panic!()
    };
    assert_eq!(messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), vec!["kept"]);
    assert_eq!(
        h.req(a(2), Some(bob), RequestBody::Post { text: "new".into() }),
        Ok(Response::Posted { id: 2, recipients: 1 })
    );
}

#[test]
fn a_failed_commit_changes_nothing_and_the_retry_runs() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    let _ = h.pushes();
    h.disk_full = true;
    let (_, post) = h.encode(Some(bob), RequestBody::Post { text: "lost?".into() });
    let replies = h.raw(a(2), &post);
    assert_eq!(replies.len(), 1, "only the reply, no push");
    assert!(matches!(
        proto::decode_server(&replies[0].bytes),
        Ok(ServerMsg::Reply { result: Err(ErrorCode::StorageUnavailable), .. })
    ));
    assert!(h.inbox("alice").is_empty(), "undone in memory");
    assert_eq!(h.login_from(a(3), "alice", "password"), Err(ErrorCode::StorageUnavailable));
    assert_eq!(h.server.session_count(), 2, "the failed login left no session");
    // Reads go on.
    assert!(matches!(
        h.req(a(1), Some(alice), RequestBody::Retrieve { count: 5, before: None }),
        Ok(Response::Messages { .. })
    ));
    // The disk has room again: the client's retransmission of the same request now runs.
    h.disk_full = false;
    let replies = h.raw(a(2), &post);
    let reply = replies.iter().find(|t| t.to == a(2)).unwrap();
    assert!(matches!(
        proto::decode_server(&reply.bytes),
        Ok(ServerMsg::Reply { result: Ok(Response::Posted { .. }), .. })
    ));
    assert_eq!(h.inbox("alice").len(), 1, "stored once");
    assert_eq!(replies.iter().filter(|t| t.to == a(1)).count(), 1, "pushed once");
}

#[test]
fn failed_logins_are_throttled_per_account_and_address_without_hashing() {
    let mut h = H::with(ServerConfig {
        login_failures_per_user_burst: 3,
        login_failures_per_user_refill_secs: 10,
        login_failures_per_address_burst: 100,
        ..test_config()
    });
    h.register("alice", "password").unwrap();
    // From 127.0.0.1: three wrong passwords without a cookie, then (asked for one) three with.
    for _ in 0..6 {
        assert_eq!(h.login_from(a(1), "alice", "wrong"), Err(ErrorCode::BadCredentials));
    }
    // The next one from there costs no hash and names the wait, even with the right password.
    let cookie = Some(h.cookie(a(1)));
    let body = RequestBody::Login { user: "alice".into(), password: "password".into(), cookie, pad: vec![] };
    let (_, bytes) = h.encode(None, body);
    h.server.handle(h.now, a(1), &bytes);
    assert!(h.server.poll_password_job().is_none(), "a throttled login costs no hash");
    h.turn();
    let out = h.drain();
    assert!(matches!(
        proto::decode_server(&out[0].bytes),
        Ok(ServerMsg::Reply { result: Err(ErrorCode::RateLimited { retry_after_secs: 10 }), .. })
    ));
    // Those failures were 127.0.0.1's: alice logs in from elsewhere at once.
    assert!(h.login_from(ip(2, 1), "alice", "password").is_ok());
    h.now += Duration::from_secs(10);
    assert!(h.login_from(a(2), "alice", "password").is_ok(), "one attempt regained");
    assert_eq!(h.server.stats().logins_throttled, 1);
}

/// A lost "wrong password" is answered again from the reply cache: no second hash, no second
/// failure counted against the owner's limits.
#[test]
fn a_retransmitted_failed_login_is_answered_not_hashed_again() {
    let mut h = H::new();
    h.register("alice", "password").unwrap();
    let cookie = Some(h.cookie(a(1)));
    let body = RequestBody::Login { user: "alice".into(), password: "wrong".into(), cookie, pad: vec![] };
    let (id, bytes) = h.encode(None, body);
    let refused = |out: &[Transmit]| {
        out.iter().any(|t| {
            matches!(proto::decode_server(&t.bytes),
                Ok(ServerMsg::Reply { id: rid, result: Err(ErrorCode::BadCredentials) }) if rid == id)
        })
    };
    assert!(refused(&h.raw(a(1), &bytes)));
    let failures = h.server.stats().errors;
    // The answer was lost; the client sends the same datagram again.
    h.server.handle(h.now, a(1), &bytes);
    assert!(h.server.poll_password_job().is_none(), "no second hash");
    h.turn();
    assert!(refused(&h.drain()), "the same answer");
    assert_eq!(h.server.stats().errors, failures, "not counted again");
}

/// Per address (whatever the port), guessing many names is limited too; unknown names count
/// exactly as known ones.
#[test]
fn failed_logins_are_throttled_per_address() {
    let mut h = H::with(ServerConfig {
        login_failures_per_address_burst: 5,
        login_failures_per_address_refill_secs: 2,
        ..test_config()
    });
    h.register("carol", "password").unwrap();
    for i in 0..10 {
        assert_eq!(h.login_from(a(3 + i), &format!("nobody{i}"), "x"), Err(ErrorCode::BadCredentials));
    }
    assert!(matches!(h.login_from(a(20), "carol", "x"), Err(ErrorCode::RateLimited { retry_after_secs: 2 })));
    assert!(matches!(
        h.login_from(a(21), "nobody99", "x"),
        Err(ErrorCode::RateLimited { retry_after_secs: 2 })
    ));
    assert!(h.login_from(ip(5, 1), "carol", "password").is_ok(), "another address is not limited");
}

#[test]
fn registrations_are_limited_per_address_and_in_total() {
    let mut h = H::with(ServerConfig {
        registrations_per_address_burst: 2,
        registrations_per_address_refill_secs: 60,
        max_accounts: 3,
        ..test_config()
    });
    assert_eq!(h.register("a1", "password"), Ok(Response::Registered));
    assert_eq!(h.register("a2", "password"), Ok(Response::Registered));
    assert_eq!(h.register("a3", "password"), Err(ErrorCode::RateLimited { retry_after_secs: 60 }));
    h.now += Duration::from_secs(60);
    assert_eq!(h.register("a3", "password"), Ok(Response::Registered));
    h.now += Duration::from_secs(600);
    assert_eq!(h.register("a4", "password"), Err(ErrorCode::TooManyAccounts { max: 3 }));
}

#[test]
fn requests_per_session_are_limited() {
    let mut h = H::with(ServerConfig { session_requests_per_sec: 5, ..test_config() });
    let t = h.user("alice", 1);
    let mut limited = 0;
    for _ in 0..20 {
        if let Err(ErrorCode::RateLimited { retry_after_secs: 1 }) = h.req(a(1), Some(t), RequestBody::Ping) {
            limited += 1;
        }
    }
    // A burst of 2 x 5 (the login's confirming ping took one), then refused.
    assert_eq!(limited, 11);
    h.now += Duration::from_secs(1);
    assert_eq!(h.req(a(1), Some(t), RequestBody::Ping), Ok(Response::SessionPong { epoch: h.server.epoch }));
}

#[test]
fn a_retransmission_after_a_restart_is_answered_not_executed() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    let (_, post) = h.encode(Some(bob), RequestBody::Post { text: "once".into() });
    let first: Vec<Transmit> = h.raw(a(2), &post).into_iter().filter(|t| t.to == a(2)).collect();
    // The daemon restarts; the reply was lost, so the client sends the same request again.
    h.restart(test_config());
    let again: Vec<Transmit> = h.raw(a(2), &post).into_iter().filter(|t| t.to == a(2)).collect();
    assert_eq!(first, again, "the same reply");
    assert_eq!(h.inbox("alice"), vec![1], "stored once");
}

#[test]
fn a_retransmitted_logout_is_answered_again() {
    let mut h = H::new();
    let t = h.user("alice", 1);
    let (_, logout) = h.encode(Some(t), RequestBody::Logout);
    let r1 = h.raw(a(1), &logout);
    let r2 = h.raw(a(1), &logout);
    assert!(matches!(
        proto::decode_server(&r1[0].bytes),
        Ok(ServerMsg::Reply { result: Ok(Response::LoggedOut), .. })
    ));
    assert_eq!(r1, r2);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// No datagram can panic the core, and nothing sent to an unverified address is larger
        /// than what came from it.
        #[test]
        fn arbitrary_bytes_never_panic(datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1300), 1..20)) {
            let mut h = H::new();
            let t = h.user("alice", 1);
            for mut d in datagrams {
                // Half of them get a valid header so the body decoder is exercised.
                if d.len() > 3 && d[0] % 2 == 0 {
                    d[..3].copy_from_slice(b"UM\x02");
                }
                let len = d.len();
                for out in h.raw(a(5), &d) {
                    prop_assert!(out.bytes.len() <= len);
                    prop_assert!(out.bytes.len() <= proto::MAX_DATAGRAM);
                }
            }
            prop_assert_eq!(h.req(a(1), Some(t), RequestBody::Ping), Ok(Response::SessionPong { epoch: h.server.epoch }));
        }

        /// Every well-formed request round-trips through the codec.
        #[test]
        fn structured_requests_never_panic(id in any::<u64>(), count in any::<u32>(), text in ".{0,1100}", name in "[a-z*?]{0,40}") {
            let mut h = H::new();
            let t = h.user("alice", 1);
            for body in [
                RequestBody::Post { text: text.clone() },
                RequestBody::Send { to: name.clone(), text: text.clone() },
                RequestBody::Retrieve { count, before: Some(id) },
                RequestBody::ListUsers { pattern: name.clone(), after: Some(text.clone()) },
                RequestBody::Subscribe { user: name.clone() },
                RequestBody::Unsubscribe { user: name.clone() },
            ] {
                let msg = ClientMsg::Request(Request { id, token: Some(t), body });
                let bytes = proto::encode_client(&msg);
                if bytes.len() <= proto::MAX_DATAGRAM {
                    prop_assert_eq!(proto::decode_client(&bytes), Ok(msg.clone()));
                }
                h.raw(a(1), &bytes);
            }
        }
    }
}

/// Review findings, each a scenario that once failed.
mod review {
    use super::*;

    fn subscribed_pair(h: &mut H) -> (Token, Token) {
        let alice = h.user("alice", 1);
        let bob = h.user("bob", 2);
        h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
        (alice, bob)
    }

    #[test]
    fn a_spoofed_login_gets_no_pushes_until_its_address_answers() {
        let mut h = H::new();
        let (alice, bob) = subscribed_pair(&mut h);
        h.req(a(1), Some(alice), RequestBody::Logout).unwrap();
        for i in 0..10 {
            h.req(a(2), Some(bob), RequestBody::Post { text: format!("{i}{}", "x".repeat(900)) }).unwrap();
        }
        let _ = h.pushes();
        // A login "from" the victim's address: the reply is no larger than the request...
        let (_, login) = h.encode(
            None,
            RequestBody::Login {
                user: "alice".into(),
                password: "password".into(),
                cookie: None,
                pad: vec![],
            },
        );
        let out = h.raw(a(66), &login);
        let to_victim: usize = out.iter().filter(|t| t.to == a(66)).map(|t| t.bytes.len()).sum();
        assert!(to_victim <= login.len(), "{to_victim} bytes to the victim for {}", login.len());
        // ...and no catch-up or later push goes there, however long we wait.
        h.req(a(2), Some(bob), RequestBody::Post { text: "more".into() }).unwrap();
        for _ in 0..10 {
            h.advance(Duration::from_secs(5));
        }
        assert!(h.pushes().iter().all(|(to, _, _)| *to != a(66)));
    }

    #[test]
    fn an_ack_after_a_gap_does_not_count_the_gap_as_delivered() {
        let mut h = H::new();
        let (alice, bob) = subscribed_pair(&mut h);
        h.req(a(2), Some(bob), RequestBody::Post { text: "m1".into() }).unwrap();
        h.req(a(2), Some(bob), RequestBody::Post { text: "m2".into() }).unwrap();
        let p = h.pushes();
        assert_eq!(p.len(), 2);
        // Push 1 is lost; push 2 arrives and is acked; then the client goes away.
        h.ack(alice, 2);
        h.req(a(1), Some(alice), RequestBody::Logout).unwrap();
        let login = RequestBody::Login {
            user: "alice".into(),
            password: "password".into(),
            cookie: None,
            pad: vec![],
        };
        let Ok(Response::LoggedIn { missed, .. }) = h.req(a(3), None, login) else { panic!() };
        assert_eq!(missed, 2, "both are caught up: the first was never delivered");
    }

    #[test]
    fn a_late_duplicate_after_a_restart_is_not_run() {
        let mut h = H::new();
        let (_alice, bob) = subscribed_pair(&mut h);
        let (_, first) = h.encode(Some(bob), RequestBody::Post { text: "one".into() });
        h.raw(a(2), &first);
        h.req(a(2), Some(bob), RequestBody::Post { text: "two".into() }).unwrap();
        h.restart(test_config());
        // The network delivers an old copy of the first post.
        assert!(h.raw(a(2), &first).is_empty());
        assert_eq!(h.inbox("alice"), vec![1, 2]);
    }

    #[test]
    fn a_session_put_back_after_a_failed_commit_keeps_its_push_numbering() {
        let mut h = H::new();
        let (alice, bob) = subscribed_pair(&mut h);
        h.req(a(2), Some(bob), RequestBody::Post { text: "m1".into() }).unwrap();
        let p = h.pushes();
        h.ack(alice, p[0].1);
        h.disk_full = true;
        assert_eq!(h.req(a(1), Some(alice), RequestBody::Logout), Err(ErrorCode::StorageUnavailable));
        h.disk_full = false;
        assert_eq!(
            h.req(a(1), Some(alice), RequestBody::Ping),
            Ok(Response::SessionPong { epoch: h.server.epoch }),
            "the session is back"
        );
        h.req(a(2), Some(bob), RequestBody::Post { text: "m2".into() }).unwrap();
        let p = h.pushes();
        assert_eq!(p.iter().map(|p| (p.1, p.2.text.as_str())).collect::<Vec<_>>(), vec![(2, "m2")]);
    }

    #[test]
    fn junk_names_cannot_reset_an_accounts_login_throttle() {
        let mut h = H::with(ServerConfig {
            login_failures_per_user_burst: 2,
            login_failures_per_address_burst: 1_000_000,
            ..test_config()
        });
        h.register("alice", "password").unwrap();
        // Two without a cookie, two with.
        for _ in 0..4 {
            assert_eq!(h.login_from(a(1), "alice", "wrong"), Err(ErrorCode::BadCredentials));
        }
        for i in 0..200 {
            let _ = h.login_from(a(2), &format!("junk{i}"), "x");
        }
        assert!(matches!(h.login_from(a(1), "alice", "password"), Err(ErrorCode::RateLimited { .. })));
    }

    #[test]
    fn a_refused_delete_is_answered_again() {
        let mut h = H::new();
        let t = h.user("alice", 1);
        let (_, delete) = h.encode(Some(t), RequestBody::DeleteAccount { password: "wrong".into() });
        let first = h.raw(a(1), &delete);
        let again = h.raw(a(1), &delete);
        assert!(matches!(
            proto::decode_server(&first[0].bytes),
            Ok(ServerMsg::Reply { result: Err(ErrorCode::BadCredentials), .. })
        ));
        assert_eq!(again.len(), 1, "the retransmission gets an answer");
    }
}

/// What reaches the store, and when.
mod writes {
    use super::*;

    fn delivered(h: &H) -> Vec<(String, u64)> {
        h.committed
            .iter()
            .filter_map(|w| match w {
                Write::Delivered { user, up_to } => Some((user.clone(), *up_to)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn delivered_marks_are_written_once_per_flush_interval_and_at_shutdown() {
        let mut h = H::new();
        let alice = h.user("alice", 1);
        let bob = h.user("bob", 2);
        h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
        for i in 0..3 {
            h.req(a(2), Some(bob), RequestBody::Post { text: format!("m{i}") }).unwrap();
            let p = h.pushes();
            h.ack(alice, p[0].1);
        }
        assert!(delivered(&h).is_empty(), "not one write per ack");
        assert!(h.server.poll_timeout().is_some_and(|t| t <= h.now + DELIVERED_FLUSH));
        h.advance(DELIVERED_FLUSH);
        assert_eq!(delivered(&h), vec![("alice".to_string(), 3)], "coalesced into one");

        h.req(a(2), Some(bob), RequestBody::Post { text: "m3".into() }).unwrap();
        let p = h.pushes();
        h.ack(alice, p[0].1);
        h.server.flush_delivered();
        h.turn();
        assert_eq!(delivered(&h).last(), Some(&("alice".to_string(), 4)), "a clean stop writes them");
        // The durable mark is what the next run's catch-up starts from.
        h.store.begin_epoch().unwrap();
        let Ok(crate::store::ReadResult::Account(Some(alice))) =
            h.store.read(&crate::store::Read::Account { name: "alice".into() })
        else {
            panic!()
        };
        assert_eq!(alice.last_delivered, 4);
    }
}

#[test]
fn an_admin_sync_does_not_undo_changes_not_yet_committed() {
    let mut h = H::new();
    h.user("alice", 1);
    h.register("carol", "password").unwrap();
    // Carol logs in: the session exists, its OpenSession write is not committed yet when the
    // loop hands in the store's state (read while no batch was in flight).
    let login =
        RequestBody::Login { user: "carol".into(), password: "password".into(), cookie: None, pad: vec![] };
    let (_, login) = h.encode(None, login);
    h.server.handle(h.now, a(3), &login);
    loop {
        h.reads();
        let mut busy = false;
        while let Some(job) = h.server.poll_password_job() {
            let (id, outcome) = job.run();
            h.server.on_password_done(h.now, id, outcome);
            busy = true;
        }
        if !busy {
            break;
        }
    }
    assert_eq!(h.server.session_count(), 2, "carol's session, opening");
    assert!(h.server.writes.iter().any(|w| matches!(w, Write::OpenSession { .. })));
    // Meanwhile an admin deleted alice (her session row is gone).
    h.store.commit(&[Write::DeleteAccount { user: "alice".into() }]).unwrap();
    let durable = h.store.load().unwrap();
    h.server.sync_sessions(h.now, durable);
    assert_eq!(h.server.session_count(), 1, "alice's session ended, carol's was not taken for revoked");
    assert_eq!(h.server.accounts, 1);
    h.turn();
    let carol = h.drain();
    assert!(carol.iter().any(|t| t.to == a(3)), "carol was answered");
    assert_eq!(
        h.login_from(a(1), "alice", "password"),
        Err(ErrorCode::BadCredentials),
        "alice stays deleted"
    );
}

#[test]
fn one_datagram_acks_several_pushes() {
    let mut h = H::with(ServerConfig { push_window: 4, ..test_config() });
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    for i in 0..6 {
        h.req(a(2), Some(bob), RequestBody::Post { text: format!("m{i}") }).unwrap();
    }
    assert_eq!(h.pushes().iter().map(|p| p.1).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    // 2 and 4 acked (and an unknown 9): two window slots open, nothing counts as delivered
    // past the gap at 1.
    let bytes = proto::encode_client(&ClientMsg::PushAcks {
        token: alice,
        epoch: h.server.epoch,
        seqs: vec![4, 9, 2],
    });
    h.server.handle(h.now, a(1), &bytes);
    h.turn();
    assert_eq!(h.pushes().iter().map(|p| p.1).collect::<Vec<_>>(), vec![5, 6]);
    assert_eq!(h.server.stats().pushes_acked, 2);
    let bytes = proto::encode_client(&ClientMsg::PushAcks {
        token: alice,
        epoch: h.server.epoch,
        seqs: vec![1, 3, 5, 6],
    });
    h.server.handle(h.now, a(1), &bytes);
    h.server.flush_delivered();
    h.turn();
    assert!(h.committed.contains(&Write::Delivered { user: "alice".into(), up_to: 6 }), "all delivered");
}

#[test]
fn only_a_logout_gets_the_cached_logout_reply() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let (id, logout) = h.encode(Some(alice), RequestBody::Logout);
    h.raw(a(1), &logout);
    // Its retransmission is answered from the cache...
    let again = h.raw(a(1), &logout);
    assert!(matches!(
        proto::decode_server(&again[0].bytes),
        Ok(ServerMsg::Reply { result: Ok(Response::LoggedOut), .. })
    ));
    // ...but another request that reuses the dead token and the id (a bit flip in the body tag
    // of a captured logout) is not that retransmission.
    for body in [RequestBody::WhoAmI, RequestBody::Post { text: "x".into() }] {
        let bytes = proto::encode_client(&ClientMsg::Request(Request { id, token: Some(alice), body }));
        let out = h.raw(a(1), &bytes);
        assert!(
            matches!(
                proto::decode_server(&out[0].bytes),
                Ok(ServerMsg::Reply { result: Err(ErrorCode::SessionExpired | ErrorCode::NotLoggedIn), .. })
            ),
            "{:?}",
            proto::decode_server(&out[0].bytes)
        );
    }
}

#[test]
fn logins_are_refused_busy_while_password_jobs_wait_too_long() {
    let mut h = H::with(ServerConfig { password_max_wait_ms: 3000, ..test_config() });
    h.register("alice", "password").unwrap();
    let login = |h: &mut H, port: u16| {
        let (id, bytes) = h.encode(
            None,
            RequestBody::Login {
                user: "alice".into(),
                password: "password".into(),
                cookie: None,
                pad: vec![],
            },
        );
        h.server.handle(h.now, a(port), &bytes);
        h.reads();
        id
    };
    // Two logins queue; the first takes 4 s to come back (a storm ahead of it).
    login(&mut h, 11);
    login(&mut h, 12);
    let jobs: Vec<_> = std::iter::from_fn(|| h.server.poll_password_job()).collect();
    assert_eq!(jobs.len(), 2);
    h.now += Duration::from_secs(4);
    let mut jobs = jobs.into_iter();
    let (id, outcome) = jobs.next().unwrap().run();
    h.server.on_password_done(h.now, id, outcome);
    // A third is told "busy" at once instead of waiting past its client's retransmissions.
    let third = login(&mut h, 13);
    h.turn(); // the first login's session commits; replies leave
    let out = h.drain();
    let busy = out.iter().any(|t| {
        t.to == a(13)
            && matches!(proto::decode_server(&t.bytes),
                Ok(ServerMsg::Reply { id, result: Err(ErrorCode::Busy) }) if id == third)
    });
    assert!(busy, "{out:?}");
    assert_eq!(h.server.stats().busy_slow, 1);
    // Once the queue is empty, logins are taken again.
    let (id, outcome) = jobs.next().unwrap().run();
    h.server.on_password_done(h.now, id, outcome);
    assert!(h.login_from(a(14), "alice", "password").is_ok());
}

#[test]
fn a_session_brought_back_from_storage_keeps_its_age() {
    let cfg =
        ServerConfig { session_max_lifetime_secs: 3600, session_idle_timeout_secs: 86_400, ..test_config() };
    let mut h = H::with(cfg.clone());
    let old = h.user("alice", 1);
    let young = h.login_from(a(2), "alice", "password").unwrap();
    // A restart: the store says the first session is 59 minutes old, the second 1 minute.
    h.restart_with(cfg, |snap| {
        for s in &mut snap.sessions {
            s.age_secs = if s.token == old { 59 * 60 } else { 60 };
        }
    });
    assert_eq!(
        h.req(a(1), Some(old), RequestBody::Ping),
        Ok(Response::SessionPong { epoch: h.server.epoch })
    );
    h.advance(Duration::from_secs(61));
    assert_eq!(h.req(a(1), Some(old), RequestBody::Ping), Err(ErrorCode::SessionExpired), "an hour in all");
    assert_eq!(
        h.req(a(2), Some(young), RequestBody::Ping),
        Ok(Response::SessionPong { epoch: h.server.epoch })
    );
}

#[test]
fn what_one_commit_releases_to_a_session_leaves_in_one_datagram() {
    let mut h = H::with(ServerConfig { push_window: 3, ..test_config() });
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    // Five posts in one turn: one batch, one commit.
    for i in 0..5 {
        let (_, bytes) = h.encode(Some(bob), RequestBody::Post { text: format!("m{i}") });
        h.server.handle(h.now, a(2), &bytes);
    }
    h.turn();
    let to_alice = |out: &[Transmit]| -> Vec<ServerMsg> {
        out.iter()
            .filter(|t| t.to == a(1))
            .map(|t| proto::decode_server(&t.bytes).unwrap())
            .filter(|m| !matches!(m, ServerMsg::Reply { .. }))
            .collect()
    };
    let first = to_alice(&h.drain());
    let texts = |ms: &[Message]| ms.iter().map(|m| m.text.clone()).collect::<Vec<_>>();
    let [ServerMsg::Pushes { first_seq: 1, messages, .. }] = &first[..] else { panic!("{first:?}") };
    assert_eq!(texts(messages), ["m0", "m1", "m2"], "the window (3) bounds the datagram");
    let bytes = proto::encode_client(&ClientMsg::PushAcks {
        token: alice,
        epoch: h.server.epoch,
        seqs: vec![1, 2, 3],
    });
    h.server.handle(h.now, a(1), &bytes);
    h.turn();
    let second = to_alice(&h.drain());
    let [ServerMsg::Pushes { first_seq: 4, messages, .. }] = &second[..] else { panic!("{second:?}") };
    assert_eq!(texts(messages), ["m3", "m4"]);
    // Unacked, each is retransmitted on its own, as a plain Push.
    h.advance(Duration::from_secs(1));
    let again = to_alice(&h.drain());
    let seqs: Vec<u64> = again
        .iter()
        .map(|m| match m {
            ServerMsg::Push { seq, .. } => *seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, [4, 5]);
}

#[test]
fn an_account_an_admin_deleted_and_added_again_inherits_nothing() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    h.req(a(2), Some(bob), RequestBody::Send { to: "alice".into(), text: "private".into() }).unwrap();
    // The core has alice's account and bob's followers cached.
    h.req(a(2), Some(bob), RequestBody::Post { text: "to followers".into() }).unwrap();
    assert_eq!(h.inbox("alice").len(), 2);
    // Between two checks an admin deleted alice and created her again: same name, new account.
    let hash = crate::password::hash("new-password", HashParams::TEST).unwrap();
    h.store.commit(&[Write::DeleteAccount { user: "alice".into() }]).unwrap();
    h.store.commit(&[Write::CreateAccount { user: "alice".into(), password_hash: hash }]).unwrap();
    let durable = h.store.load().unwrap();
    h.server.sync_sessions(h.now, durable);
    h.turn();
    assert!(h.inbox("alice").is_empty(), "the old alice's messages are not the new one's");
    assert_eq!(h.req(a(1), Some(alice), RequestBody::Ping), Err(ErrorCode::SessionExpired));
    let new = h.login_from(a(3), "alice", "new-password").unwrap();
    let Ok(Response::Relations { entries, .. }) =
        h.req(a(3), Some(new), RequestBody::Subscriptions { after: None })
    else {
        panic!()
    };
    assert!(entries.is_empty(), "{entries:?}");
    // bob's posts do not reach the new alice (the old one followed him).
    h.req(a(2), Some(bob), RequestBody::Post { text: "after".into() }).unwrap();
    assert!(h.inbox("alice").is_empty());
}

/// The invariant of the store, driven through the real SQLite store: whatever the mix of posts,
/// DMs, (un)subscriptions, account deletions and failed commits, once the background collection
/// has run the database holds exactly the messages some inbox holds, and the inboxes read after
/// the next start are the same.
#[test]
fn sqlite_holds_exactly_what_the_inboxes_hold() {
    use crate::store::sqlite::{SqliteStore, DB_FILE};
    for seed in 1..=6u64 {
        let dir = std::env::temp_dir().join(format!("udpmsg-inbox-invariant-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = ServerConfig { max_inbox: 3, ..test_config() };
        let store = Box::new(SqliteStore::open(&dir, cfg.max_inbox as usize).unwrap());
        let mut h = H::with_store(cfg, store);
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let names: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
        let mut tokens: Vec<Option<Token>> = Vec::new();
        for (i, n) in names.iter().enumerate() {
            tokens.push(Some(h.user(n, 10 + i as u16)));
        }
        for _ in 0..400 {
            let (i, j) = (next(6) as usize, next(6) as usize);
            let from = a(10 + i as u16);
            h.disk_full = next(12) == 0;
            let Some(t) = tokens[i] else {
                // A deleted account comes back, when the disk lets it.
                if !h.disk_full && h.register(&names[i], "password").is_ok() {
                    tokens[i] = h.login_from(from, &names[i], "password").ok();
                }
                continue;
            };
            let body = match next(10) {
                0 => RequestBody::Subscribe { user: names[j].clone() },
                1 => RequestBody::Unsubscribe { user: names[j].clone() },
                2..=5 => RequestBody::Post { text: format!("post {}", next(1000)) },
                6 | 7 => RequestBody::Send { to: names[j].clone(), text: format!("dm {}", next(1000)) },
                8 if next(4) == 0 => RequestBody::DeleteAccount { password: "password".into() },
                _ => RequestBody::Ping,
            };
            let deleting = matches!(body, RequestBody::DeleteAccount { .. });
            if h.req(from, Some(t), body) == Ok(Response::Deleted) && deleting {
                tokens[i] = None;
            }
            let _ = h.pushes();
        }
        h.disk_full = false;
        h.server.flush_delivered();
        h.turn();
        h.store.flush().unwrap();
        while h.store.maintain(Duration::from_secs(1)).unwrap() {}
        // The mix really trimmed, deleted and failed.
        assert!(h.server.stats().commit_failures > 0, "seed {seed}: no failed commit");
        assert!(
            h.committed.iter().any(|w| matches!(w, Write::DeleteAccount { .. })),
            "seed {seed}: no deletion"
        );
        let inboxes: Vec<(String, Vec<u64>)> = names.iter().map(|n| (n.clone(), h.inbox(n))).collect();
        let mut held: Vec<u64> = inboxes.iter().flat_map(|(_, ids)| ids.clone()).collect();
        held.sort_unstable();
        held.dedup();
        let db = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
        let mut stored: Vec<u64> = db
            .prepare("SELECT id FROM messages ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get::<_, i64>(0))
            .unwrap()
            .map(|id| id.unwrap() as u64)
            .collect();
        stored.sort_unstable();
        assert_eq!(stored, held, "seed {seed}: rows in the database vs messages some inbox holds");
        drop(db);
        drop(h);
        let mut reopened = SqliteStore::open(&dir, 3).unwrap();
        reopened.begin_epoch().unwrap();
        for (name, ids) in &inboxes {
            let rebuilt: Vec<u64> = match reopened.read(&crate::store::Read::Account { name: name.clone() }) {
                Ok(crate::store::ReadResult::Account(Some(acc))) => {
                    match reopened.read(&crate::store::Read::Inbox {
                        id: acc.id,
                        count: 100,
                        before: None,
                        above: None,
                    }) {
                        Ok(crate::store::ReadResult::Inbox { messages, .. }) => {
                            messages.iter().map(|m| m.id).collect()
                        }
                        other => panic!("{other:?}"),
                    }
                }
                _ => vec![],
            };
            assert_eq!(&rebuilt, ids, "seed {seed}: {name}'s inbox after a restart");
        }
        drop(reopened);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

mod attacks;
mod nodes;

/// What a session acknowledged is not caught up again at the next login, whether the delivered
/// mark was still waiting to be written, written, or read back by a fresh core.
#[test]
fn catch_up_skips_what_was_acknowledged() {
    for cache_bytes in [0, 1 << 20] {
        let mut h = H::with(ServerConfig { cache_bytes, ..test_config() });
        let alice = h.user("alice", 1);
        let bob = h.user("bob", 2);
        h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
        for i in 0..3 {
            h.req(a(2), Some(bob), RequestBody::Post { text: format!("m{i}") }).unwrap();
            let p = h.pushes();
            h.ack(alice, p[0].1);
        }
        let missed = |h: &mut H| {
            let login = RequestBody::Login {
                user: "alice".into(),
                password: "password".into(),
                cookie: None,
                pad: vec![],
            };
            match h.req(a(3), None, login) {
                Ok(Response::LoggedIn { missed, .. }) => missed,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(missed(&mut h), 0, "mark not written yet (cache {cache_bytes})");
        h.advance(DELIVERED_FLUSH);
        assert_eq!(missed(&mut h), 0, "mark written (cache {cache_bytes})");
        h.req(a(2), Some(bob), RequestBody::Post { text: "while away".into() }).unwrap();
        h.restart(ServerConfig { cache_bytes, ..test_config() });
        // The sessions came back; one more login sees exactly the one message nobody acked
        // (the restored sessions have no address to be pushed to yet).
        assert_eq!(missed(&mut h), 1, "after a restart (cache {cache_bytes})");
    }
}

/// The store is the truth: a retrieve sees every post acknowledged before it was sent, with or
/// without a cache, on a fresh core that has nothing cached, and while the next post is being
/// stored in the same turn.
#[test]
fn a_retrieve_after_a_post_sees_it() {
    for cache_bytes in [0, 1 << 20] {
        let mut h = H::with(ServerConfig { cache_bytes, ..test_config() });
        let mut alice = h.user("alice", 1);
        let bob = h.user("bob", 2);
        h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
        h.req(a(2), Some(bob), RequestBody::Post { text: "post 0".into() }).unwrap();
        for round in 1..4 {
            // Post `round` and alice's retrieve arrive together: she sees every acknowledged
            // post, and this one or not (it is not acknowledged yet).
            let (_, post) = h.encode(Some(bob), RequestBody::Post { text: format!("post {round}") });
            let (rid, retrieve) = h.encode(Some(alice), RequestBody::Retrieve { count: 10, before: None });
            h.server.handle(h.now, a(2), &post);
            h.server.handle(h.now, a(1), &retrieve);
            h.turn();
            let got = h.drain().into_iter().find_map(|t| match proto::decode_server(&t.bytes) {
                Ok(ServerMsg::Reply { id, result: Ok(Response::Messages { messages, .. }) }) if id == rid => {
                    Some(messages.into_iter().map(|m| m.text).collect::<Vec<_>>())
                }
                _ => None,
            });
            let acked: Vec<String> = (0..round).map(|i| format!("post {i}")).collect();
            let got = got.expect("an answer");
            assert!(got.starts_with(&acked), "cache {cache_bytes}, round {round}: {got:?}");
            // Then, after the post's acknowledgement, it is there.
            let Ok(Response::Messages { messages, .. }) =
                h.req(a(1), Some(alice), RequestBody::Retrieve { count: 10, before: None })
            else {
                panic!()
            };
            assert_eq!(messages.len(), round as usize + 1, "cache {cache_bytes}, round {round}");
            if round == 2 {
                h.restart(ServerConfig { cache_bytes, ..test_config() });
                alice = h.login_from(a(1), "alice", "password").unwrap();
            }
        }
    }
}

/// A read that fails answers "storage unavailable, retry", leaves no state behind, and the
/// retransmission runs once the store reads again.
#[test]
fn a_failed_read_is_answered_retry_and_leaves_nothing() {
    let mut h = H::with(ServerConfig { cache_bytes: 0, ..test_config() });
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    h.reads_fail = true;
    let (_, post) = h.encode(Some(bob), RequestBody::Post { text: "once".into() });
    let out = h.raw(a(2), &post);
    assert!(out.iter().any(|t| matches!(
        proto::decode_server(&t.bytes),
        Ok(ServerMsg::Reply { result: Err(ErrorCode::StorageUnavailable), .. })
    )));
    assert_eq!(h.server.reads_waiting(), (0, 0), "nothing parked, nothing in flight");
    assert!(h.inbox("alice").is_empty(), "nothing written");
    assert_eq!(
        h.req(a(1), Some(alice), RequestBody::Retrieve { count: 5, before: None }),
        Err(ErrorCode::StorageUnavailable)
    );
    let login =
        RequestBody::Login { user: "bob".into(), password: "password".into(), cookie: None, pad: vec![] };
    let entries = h.server.replies.len();
    assert_eq!(h.req(a(3), None, login), Err(ErrorCode::StorageUnavailable));
    assert_eq!(h.server.replies.len(), entries, "the login left no cache entry");
    assert_eq!(h.server.password_jobs(), 0);
    // The store reads again: the same request (a retransmission) runs, once.
    h.reads_fail = false;
    let out = h.raw(a(2), &post);
    assert!(out.iter().any(|t| matches!(
        proto::decode_server(&t.bytes),
        Ok(ServerMsg::Reply { result: Ok(Response::Posted { recipients: 1, .. }), .. })
    )));
    assert_eq!(h.inbox("alice").len(), 1);
}

/// What a read of the store answers is what the cache answers: the same requests, the same
/// replies, with a cache and without (the cache-size-zero suite runs everything else).
#[test]
fn the_cache_changes_nothing_a_client_sees() {
    let run = |cache_bytes: u64| -> Vec<Result<Response, ErrorCode>> {
        let mut h = H::with(ServerConfig { cache_bytes, ..test_config() });
        let users = ["amy", "bea", "cal", "dan"];
        let tokens: Vec<Token> = users.iter().enumerate().map(|(i, u)| h.user(u, 10 + i as u16)).collect();
        let mut answers = Vec::new();
        let mut seed = 7u64;
        for _ in 0..300 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let (i, j) = ((seed % 4) as usize, ((seed >> 8) % 4) as usize);
            let body = match (seed >> 16) % 8 {
                0 => RequestBody::Subscribe { user: users[j].into() },
                1 => RequestBody::Unsubscribe { user: users[j].into() },
                2 | 3 => RequestBody::Post { text: format!("p{}", seed % 1000) },
                4 => RequestBody::Send { to: users[j].into(), text: format!("d{}", seed % 1000) },
                5 => RequestBody::Retrieve { count: 1 + (seed % 20) as u32, before: None },
                6 => RequestBody::Subscriptions { after: None },
                _ => RequestBody::ListUsers { pattern: "*a*".into(), after: None },
            };
            answers.push(h.req(a(10 + i as u16), Some(tokens[i]), body));
        }
        answers
    };
    assert_eq!(run(0), run(64 << 20));
}
