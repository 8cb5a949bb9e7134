//! A hostile network against the real daemon: over 10,000 datagrams from six sockets on other
//! loopback addresses (127.0.0.2-4, so that the per-address login throttle they trip does not
//! touch the legitimate clients on 127.0.0.1) -- random bytes, truncations and bit flips of real
//! traffic captured through a recording proxy (both directions), oversized datagrams (up to
//! 65,000 bytes), valid frames with absurd field values, random and dead tokens, a live token
//! with one bit flipped -- while legitimate clients go on posting and receiving pushes.
//!
//! Asserted: the daemon stays up and stops cleanly; the legitimate clients get every answer and
//! every push; nothing stored changes beyond their own posts (accounts, alice's messages and
//! subscriptions, a live session); no hostile datagram is ever answered with success (only a
//! token-less ping's `Pong`, and the cached `LoggedOut` of a replayed logout), never with a
//! push, and never with more bytes than it had (per datagram, paired by request id, and per
//! socket in total); the daemon received at least 95 % of it (its own counter; loopback drops
//! only when its receive buffer overflows). About 4 s.

mod common;

use common::{run_client, Daemon, LiveClient, Output, FAST_CONFIG};
use std::cell::Cell;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use udpmsg::proto::{
    self, ClientMsg, DecodeError, ErrorCode, Request, RequestBody, Response, ServerMsg, Token,
};

const WAIT: Duration = Duration::from_secs(15);
/// Real accounts and their passwords: no hostile datagram may carry one of these logins.
const CREDENTIALS: &[(&str, &str)] =
    &[("alice", "alice-pw"), ("bob", "bob-pw"), ("carol", "carol-pw"), ("dave", "dave-pw")];

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// A request as the client encodes it (register and login padded).
fn encode(id: u64, token: Option<Token>, body: RequestBody) -> Vec<u8> {
    proto::encode_request(Request { id, token, body })
}

/// One request from the test's own socket, retransmitted until answered (and sent again with
/// a cookie, under id + 1000, if the daemon asks for one).
fn rpc(
    sock: &UdpSocket,
    to: SocketAddr,
    id: u64,
    token: Option<Token>,
    body: RequestBody,
) -> Result<Response, ErrorCode> {
    let bytes = encode(id, token, body.clone());
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..20 {
        sock.send_to(&bytes, to).unwrap();
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            let Ok((n, _)) = sock.recv_from(&mut buf) else { break };
            match proto::decode_server(&buf[..n]) {
                Ok(ServerMsg::Reply { id: rid, result }) if rid == id => return result,
                Ok(ServerMsg::Retry { id: rid, cookie }) if rid == id => {
                    let body = match body {
                        RequestBody::Login { user, password, pad, .. } => {
                            RequestBody::Login { user, password, cookie: Some(cookie), pad }
                        }
                        other => other,
                    };
                    return rpc(sock, to, id + 1000, token, body);
                }
                _ => {}
            }
        }
    }
    panic!("no answer to request #{id}");
}

/// What the capture saw: (from the client?, bytes), in order.
type Captured = Vec<(bool, Vec<u8>)>;

/// A forwarding proxy for one client that records everything.
struct Capture {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Captured>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Capture {
    fn start(daemon: SocketAddr) -> Capture {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let up = {
            let (front, back, stop, log, client) = (
                front.try_clone().unwrap(),
                back.try_clone().unwrap(),
                stop.clone(),
                log.clone(),
                client.clone(),
            );
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        *client.lock().unwrap() = Some(from);
                        log.lock().unwrap().push((true, buf[..n].to_vec()));
                        let _ = back.send_to(&buf[..n], daemon);
                    }
                }
            })
        };
        let down = {
            let (stop, log) = (stop.clone(), log.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, _)) = back.recv_from(&mut buf) {
                        log.lock().unwrap().push((false, buf[..n].to_vec()));
                        if let Some(c) = *client.lock().unwrap() {
                            let _ = front.send_to(&buf[..n], c);
                        }
                    }
                }
            })
        };
        Capture { addr, stop, log, threads: vec![up, down] }
    }

    fn finish(mut self) -> Captured {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

fn wait_line(c: &mut LiveClient, who: &str, line: &str) {
    if c.stdout.wait_for(WAIT, |l| l == line).is_none() {
        panic!(
            "{who}: no line {line:?} within {WAIT:?}; stdout {:#?}\nstderr {:#?}",
            c.stdout.seen, c.stderr.seen
        );
    }
}

/// Waits until `line` has been printed `n` times.
fn wait_nth(c: &mut LiveClient, who: &str, n: usize, line: &str) {
    let count = Cell::new(0);
    let found = c.stdout.wait_for(WAIT, |l| {
        if l == line {
            count.set(count.get() + 1);
        }
        count.get() >= n
    });
    if found.is_none() {
        panic!(
            "{who}: {line:?} #{n} not within {WAIT:?}; stdout {:#?}\nstderr {:#?}",
            c.stdout.seen, c.stderr.seen
        );
    }
}

fn login(d: &Daemon, user: &str, password: &str) -> LiveClient {
    let mut c = LiveClient::start(d.addr, &[]);
    c.send(&format!("login#{user}&{password}"));
    wait_line(&mut c, user, &format!("logged in as {user}"));
    c
}

/// `udpmsgd user list` on the daemon's data directory (beside the running daemon).
fn user_list(d: &Daemon) -> Vec<String> {
    let out = Command::new(common::bin("udpmsgd"))
        .arg("--config")
        .arg(d.dir.path().join("server.toml"))
        .arg("--data-dir")
        .arg(d.dir.path().join("data"))
        .args(["user", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "udpmsgd user list: {out:?}");
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

/// alice's 100 newest messages and her subscriptions, through a login of her own.
fn alice_state(d: &Daemon) -> (Vec<String>, Vec<String>) {
    let out: Output =
        run_client(d.addr, &["login#alice&alice-pw", "retrieve#100", "subscriptions", "logout"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let messages = out
        .stdout
        .iter()
        .filter_map(|l| l.strip_prefix("  ").filter(|m| m.starts_with('[')))
        .map(str::to_string)
        .collect();
    let relations = out.stdout.iter().filter(|l| l.starts_with("follow")).cloned().collect();
    (messages, relations)
}

/// Makes sure a hostile datagram is not a real login or a registration that would succeed:
/// those are legitimate requests, not attacks, and would change what is stored.
fn defuse(bytes: Vec<u8>, users: &[&str]) -> Vec<u8> {
    let Ok(ClientMsg::Request(req)) = proto::decode_client(&bytes) else { return bytes };
    match req.body {
        RequestBody::Login { user, password, .. }
            if CREDENTIALS.contains(&(user.as_str(), password.as_str())) =>
        {
            let password = format!("{password}-wrong");
            encode(req.id, req.token, RequestBody::Login { user, password, cookie: None, pad: vec![] })
        }
        RequestBody::Register { user, password, .. }
            if proto::valid_name(&user, proto::MAX_NAME_LEN)
                && !users.contains(&user.as_str())
                && (4..=proto::MAX_PASSWORD_LEN).contains(&password.len()) =>
        {
            encode(
                req.id,
                req.token,
                RequestBody::Register { user: "alice".into(), password, cookie: None, pad: vec![] },
            )
        }
        _ => bytes,
    }
}

/// Everything absurd that still decodes: huge counts and ids, strings at and over the limits,
/// empty names, patterns of only `*`, each with no token, a random one and a dead one.
fn absurd_frames(rng: &mut Rng, dead: Token) -> Vec<Vec<u8>> {
    let long = |n| "x".repeat(n);
    let stars = |n| "*".repeat(n);
    let bodies = vec![
        RequestBody::Retrieve { count: u32::MAX, before: Some(u64::MAX) },
        RequestBody::Retrieve { count: 0, before: Some(0) },
        RequestBody::Retrieve { count: 100, before: None },
        RequestBody::ListUsers { pattern: stars(proto::MAX_PATTERN_LEN), after: None },
        RequestBody::ListUsers { pattern: stars(proto::MAX_PATTERN_LEN + 1), after: Some(String::new()) },
        RequestBody::ListUsers { pattern: String::new(), after: Some(long(1000)) },
        RequestBody::ListUsers { pattern: "?".repeat(64), after: None },
        RequestBody::Subscribe { user: String::new() },
        RequestBody::Subscribe { user: long(32) },
        RequestBody::Unsubscribe { user: "bob".into() },
        RequestBody::Post { text: long(proto::MAX_TEXT_BYTES) },
        RequestBody::Post { text: String::new() },
        RequestBody::Send { to: "alice".into(), text: long(1000) },
        RequestBody::Send { to: String::new(), text: String::new() },
        RequestBody::Subscriptions { after: Some(long(1100)) },
        RequestBody::WhoAmI,
        RequestBody::Logout,
        RequestBody::DeleteAccount { password: "alice-pw".into() },
        RequestBody::DeleteAccount { password: long(1100) },
        RequestBody::Ping,
        RequestBody::Login { user: String::new(), password: String::new(), cookie: None, pad: vec![] },
        RequestBody::Login {
            user: long(32),
            password: long(proto::MAX_PASSWORD_LEN),
            cookie: None,
            pad: vec![0xff; 900],
        },
        RequestBody::Login { user: "alice".into(), password: long(1000), cookie: None, pad: vec![] },
        RequestBody::Login {
            user: "bob".into(),
            password: long(proto::MAX_PASSWORD_LEN + 1),
            cookie: None,
            pad: vec![],
        },
        RequestBody::Register { user: String::new(), password: String::new(), cookie: None, pad: vec![] },
        RequestBody::Register { user: "a b".into(), password: "password".into(), cookie: None, pad: vec![] },
        RequestBody::Register { user: long(33), password: "password".into(), cookie: None, pad: vec![] },
        RequestBody::Register { user: "bob".into(), password: long(128), cookie: None, pad: vec![] },
        RequestBody::Register { user: "newbie".into(), password: "abc".into(), cookie: None, pad: vec![] },
        RequestBody::Register { user: "newbie".into(), password: long(129), cookie: None, pad: vec![] },
        RequestBody::Register { user: "*".into(), password: "password".into(), cookie: None, pad: vec![] },
    ];
    let mut v = Vec::new();
    for body in bodies {
        for token in [None, Some(Token(rng.bytes(16).try_into().unwrap())), Some(dead)] {
            for id in [0, 1, u64::MAX, rng.next()] {
                let bytes = encode(id, token, body.clone());
                if bytes.len() <= proto::MAX_DATAGRAM {
                    v.push(bytes);
                }
            }
        }
    }
    // Unknown variants of every enum level, and out-of-range option and bool tags.
    for tail in [
        &[0u8, 0, 0, 13][..],
        &[0, 0, 0, 0x80, 0x01],
        &[2],
        &[0, 0, 2, 9],
        &[1, 0x80],
        &[0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f],
    ] {
        let mut d = b"UM\x03".to_vec();
        d.extend_from_slice(tail);
        v.push(d);
    }
    // Logins that are not padded: dropped without an answer.
    for i in 0..100u64 {
        v.push(proto::encode_client(&ClientMsg::Request(Request {
            id: i,
            token: None,
            body: RequestBody::Login {
                user: format!("u{i}"),
                password: "pw".into(),
                cookie: None,
                pad: vec![],
            },
        })));
    }
    v
}

/// Bit flips, truncations and byte mutations of captured datagrams.
fn mutate(rng: &mut Rng, d: &[u8]) -> Vec<u8> {
    let mut d = d.to_vec();
    match rng.below(4) {
        0 | 1 => {
            for _ in 0..rng.range(1, 3) {
                let bit = rng.below(d.len() * 8);
                d[bit / 8] ^= 1 << (bit % 8);
            }
        }
        2 => {
            let i = rng.below(d.len());
            d[i] = rng.next() as u8;
        }
        _ => {
            let i = rng.below(d.len() + 1);
            let n = rng.range(1, 8);
            let extra = rng.bytes(n);
            d.splice(i..i, extra);
        }
    }
    d
}

#[derive(Default)]
struct Sock {
    sent: u64,
    /// Request id -> the largest datagram with that id, and the requests (for messages).
    ids: HashMap<u64, usize>,
    requests: HashMap<u64, Vec<Request>>,
    version_mismatches: u64,
}

#[test]
fn a_hostile_network_changes_nothing_and_gets_nothing() {
    let started = Instant::now();
    let mut d = Daemon::start(FAST_CONFIG);
    let reg =
        run_client(d.addr, &["register#alice&alice-pw", "register#bob&bob-pw", "register#dave&dave-pw"], "");
    assert_eq!(reg.code, Some(0), "{reg:?}");

    let mut alice = login(&d, "alice", "alice-pw");
    alice.send("subscribe#bob");
    wait_line(&mut alice, "alice", "subscribed to bob");
    alice.send("subscribe#dave");
    wait_line(&mut alice, "alice", "subscribed to dave");
    let mut bob = login(&d, "bob", "bob-pw");

    // ---- capture a real client's traffic through a recording proxy: carol's whole session ----
    let cap = Capture::start(d.addr);
    let out = run_client(cap.addr, &["register#carol&carol-pw"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut carol = LiveClient::start(cap.addr, &[]);
    carol.send("login#carol&carol-pw");
    wait_line(&mut carol, "carol", "logged in as carol");
    carol.send("subscribe#bob");
    wait_line(&mut carol, "carol", "subscribed to bob");
    bob.send("post#for carol and alice");
    wait_line(&mut carol, "carol", "[bob] for carol and alice");
    wait_line(&mut alice, "alice", "[bob] for carol and alice");
    for cmd in [
        "retrieve#100",
        "users#*",
        "subscriptions",
        "whoami",
        "ping",
        "send#alice&captured dm",
        "post#captured",
    ] {
        carol.send(cmd);
    }
    carol.send("logout");
    wait_line(&mut carol, "carol", "logged out carol");
    assert_eq!(carol.finish(), Some(0), "{:?}", carol.stderr.seen);
    wait_line(&mut alice, "alice", "[carol -> you] captured dm");
    let captured = cap.finish();
    let from_client: Vec<Vec<u8>> = captured.iter().filter(|c| c.0).map(|c| c.1.clone()).collect();
    let from_daemon: Vec<Vec<u8>> = captured.iter().filter(|c| !c.0).map(|c| c.1.clone()).collect();
    assert!(
        from_client.len() >= 12 && from_daemon.len() >= 12,
        "captured {} / {}",
        from_client.len(),
        from_daemon.len()
    );
    // carol logged out: the token in her captured requests is dead.
    let dead = from_client
        .iter()
        .find_map(|b| match proto::decode_client(b) {
            Ok(ClientMsg::Request(Request { token: Some(t), .. })) => Some(t),
            _ => None,
        })
        .expect("a captured request with a token");
    // Every session in the capture has ended: the registration's (a client logs in after
    // registering, and out when it leaves) and the one that logged out above.
    let dead_tokens: Vec<Token> = from_client
        .iter()
        .filter_map(|b| match proto::decode_client(b) {
            Ok(ClientMsg::Request(Request { token: Some(t), .. })) => Some(t),
            _ => None,
        })
        .collect();

    // ---- dave: a live session held by the test, whose token is flipped bit by bit ----
    let dave_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dave_login =
        RequestBody::Login { user: "dave".into(), password: "dave-pw".into(), cookie: None, pad: vec![] };
    let Ok(Response::LoggedIn { token: dave, .. }) = rpc(&dave_sock, d.addr, 1, None, dave_login) else {
        panic!("dave logs in")
    };
    assert!(matches!(
        rpc(&dave_sock, d.addr, 2, Some(dave), RequestBody::Ping),
        Ok(Response::SessionPong { .. })
    ));

    let users_before = user_list(&d);
    assert_eq!(users_before, ["alice", "bob", "carol", "dave"]);
    let (messages_before, relations_before) = alice_state(&d);
    assert_eq!(relations_before, ["following: bob, dave", "followers: nobody"]);
    assert!(messages_before.contains(&"[carol -> you] captured dm".to_string()), "{messages_before:?}");

    // ---- the hostile datagrams ----
    // HOSTILE_SEED=N replays another mix (the datagrams also depend on the captured traffic).
    let seed =
        std::env::var("HOSTILE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x9e37_79b9_7f4a_7c15);
    eprintln!("hostile mix seed {seed} (HOSTILE_SEED to change)");
    let mut rng = Rng(seed);
    let users: Vec<&str> = users_before.iter().map(String::as_str).collect();
    let captured_all: Vec<Vec<u8>> = from_client.iter().chain(from_daemon.iter()).cloned().collect();
    let mut hostile: Vec<Vec<u8>> = Vec::new();
    for _ in 0..1500 {
        let n = rng.range(0, 1300);
        hostile.push(rng.bytes(n));
    }
    for _ in 0..1500 {
        let n = rng.range(0, 1197);
        let mut d = b"UM\x03".to_vec();
        d.extend(rng.bytes(n));
        hostile.push(d);
    }
    for c in &captured_all {
        hostile.push(c.clone()); // replayed as is: client requests with a dead token, and reflections
        for len in 0..c.len() {
            if len < 40 || rng.below(4) == 0 {
                hostile.push(c[..len].to_vec());
            }
        }
    }
    for _ in 0..4000 {
        let c = rng.pick(&captured_all).clone();
        hostile.push(mutate(&mut rng, &c));
    }
    hostile.extend(absurd_frames(&mut rng, dead));
    // Random tokens on every kind of request, and push acks for them.
    for i in 0..600u64 {
        let token = Token(rng.bytes(16).try_into().unwrap());
        let body = match i % 6 {
            0 => RequestBody::Post { text: "HOSTILE random token".into() },
            1 => RequestBody::Send { to: "alice".into(), text: "HOSTILE random token".into() },
            2 => RequestBody::Retrieve { count: 100, before: None },
            3 => RequestBody::Subscribe { user: "bob".into() },
            4 => RequestBody::Logout,
            _ => RequestBody::Ping,
        };
        hostile.push(encode(rng.next(), Some(token), body));
        hostile.push(proto::encode_client(&ClientMsg::PushAck {
            token,
            epoch: rng.next() as u32 % 3,
            seq: rng.next() % 100,
        }));
    }
    // dave's live token with each one of its 128 bits flipped.
    for bit in 0..128 {
        let mut t = dave;
        t.0[bit / 8] ^= 1 << (bit % 8);
        for body in [
            RequestBody::Post { text: "HOSTILE flipped token".into() },
            RequestBody::Send { to: "alice".into(), text: "HOSTILE flipped token".into() },
            RequestBody::Logout,
            RequestBody::Unsubscribe { user: "nobody".into() },
            RequestBody::DeleteAccount { password: "dave-pw".into() },
        ] {
            hostile.push(encode(1000 + bit as u64, Some(t), body));
        }
        hostile.push(proto::encode_client(&ClientMsg::PushAck { token: t, epoch: 1, seq: 1 }));
    }
    // Other protocol versions: answered with the header and an echo, never longer.
    for v in [0u8, 1, 2, 0xff] {
        for _ in 0..50 {
            let mut d = vec![b'U', b'M', v];
            let n = rng.range(0, 200);
            d.extend(rng.bytes(n));
            hostile.push(d);
        }
    }
    let hostile: Vec<Vec<u8>> = hostile.into_iter().map(|b| defuse(b, &users)).collect();
    // Oversized: the daemon reads at most 2048 bytes and drops anything over 1200.
    let mut oversized = Vec::new();
    for i in 0..150 {
        let n = if i % 3 == 0 { rng.range(1201, 2100) } else { rng.range(1201, 65_000) };
        let mut d = if i % 2 == 0 { rng.pick(&from_client).clone() } else { b"UM\x03".to_vec() };
        let more = n.saturating_sub(d.len());
        d.extend(rng.bytes(more));
        oversized.push(d);
    }
    let total = hostile.len() + oversized.len();
    assert!(total >= 10_000, "only {total} hostile datagrams");

    // ---- send them from six sockets on three other loopback addresses, collecting answers ----
    let socks: Vec<UdpSocket> = (0..6)
        .map(|i| {
            let s = UdpSocket::bind(format!("127.0.0.{}:0", 2 + i / 2)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let receivers: Vec<thread::JoinHandle<Vec<Vec<u8>>>> = socks
        .iter()
        .map(|s| {
            let (s, stop) = (s.try_clone().unwrap(), stop.clone());
            thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, _)) = s.recv_from(&mut buf) {
                        got.push(buf[..n].to_vec());
                    }
                }
                got
            })
        })
        .collect();
    let daemon = d.addr;
    let sender = {
        let socks: Vec<UdpSocket> = socks.iter().map(|s| s.try_clone().unwrap()).collect();
        thread::spawn(move || {
            let mut stats: Vec<Sock> = socks.iter().map(|_| Sock::default()).collect();
            let mut k = 0;
            let mut send = |d: &[u8], stats: &mut Vec<Sock>| {
                let i = k % socks.len();
                k += 1;
                let s = &mut stats[i];
                match socks[i].send_to(d, daemon) {
                    Ok(n) => assert_eq!(n, d.len()),
                    Err(e) => panic!("send of {} bytes: {e}", d.len()),
                }
                s.sent += d.len() as u64;
                // What the daemon decodes is the first 2048 bytes, as it reads them.
                match proto::decode_client(&d[..d.len().min(2048)]) {
                    Ok(ClientMsg::Request(r)) => {
                        let e = s.ids.entry(r.id).or_default();
                        *e = (*e).max(d.len());
                        s.requests.entry(r.id).or_default().push(r);
                    }
                    Err(DecodeError::Version(_)) => s.version_mismatches += 1,
                    _ => {}
                }
            };
            for (n, d) in hostile.iter().enumerate() {
                send(d, &mut stats);
                if n % 100 == 99 {
                    thread::sleep(Duration::from_millis(25));
                }
                if n % 80 == 0 {
                    if let Some(big) = oversized.get(n / 80) {
                        send(big, &mut stats);
                    }
                }
            }
            for big in oversized.iter().skip(hostile.len() / 80 + 1) {
                send(big, &mut stats);
                thread::sleep(Duration::from_millis(1));
            }
            stats
        })
    };

    // ---- meanwhile the legitimate clients carry on: bob posts, alice gets it and asks ----
    let mut ticks = 0;
    let mut worst = Duration::ZERO;
    while !sender.is_finished() || ticks < 5 {
        ticks += 1;
        let t = Instant::now();
        bob.send(&format!("post#tick {ticks}"));
        wait_line(&mut alice, "alice", &format!("[bob] tick {ticks}"));
        worst = worst.max(t.elapsed());
        alice.send("whoami");
        wait_nth(&mut alice, "alice", ticks, "alice (1 session(s))");
        // alice and carol (logged out: it waits in her inbox).
        wait_nth(&mut bob, "bob", ticks + 1, "posted to 2 subscriber(s)");
        thread::sleep(Duration::from_millis(100));
    }
    let stats = sender.join().expect("sender");
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let answers: Vec<Vec<Vec<u8>>> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    eprintln!("{total} hostile datagrams; {ticks} legitimate rounds meanwhile, slowest push {worst:?}");

    // ---- the daemon is up, and the legitimate sessions work ----
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon is still running");
    assert!(
        matches!(rpc(&dave_sock, d.addr, 3, Some(dave), RequestBody::Ping), Ok(Response::SessionPong { .. })),
        "dave's session"
    );
    alice.send("ping");
    assert!(alice.stdout.wait_for(WAIT, |l| l.starts_with("pong in")).is_some(), "{:?}", alice.stderr.seen);
    for c in [&alice, &bob] {
        assert!(c.stderr.seen.is_empty(), "a legitimate client saw an error: {:?}", c.stderr.seen);
    }
    assert!(!alice.stdout.seen.iter().any(|l| l.contains("HOSTILE")), "{:?}", alice.stdout.seen);

    // ---- what hostile sockets got: small failures only, never more than they sent ----
    for (i, (s, got)) in stats.iter().zip(&answers).enumerate() {
        let received: u64 = got.iter().map(|g| g.len() as u64).sum();
        assert!(received <= s.sent, "socket {i}: sent {} bytes, got {received}", s.sent);
        let mut notices = 0;
        for g in got {
            match proto::decode_server(g) {
                Ok(ServerMsg::Reply { id, result }) => {
                    let Some(&len) = s.ids.get(&id) else {
                        panic!("socket {i}: reply #{id} to no request: {result:?}")
                    };
                    assert!(
                        g.len() <= len,
                        "socket {i}: {} byte reply to a {len} byte request: {result:?}",
                        g.len()
                    );
                    // A replay of carol's captured logout is answered from the reply cache, as
                    // its retransmission would be: no more bytes, and nothing executes.
                    let replayed_logout = s.requests[&id].iter().any(|r| {
                        r.body == RequestBody::Logout && r.token.is_some_and(|t| dead_tokens.contains(&t))
                    });
                    assert!(
                        matches!(result, Err(_) | Ok(Response::Pong))
                            || (result == Ok(Response::LoggedOut) && replayed_logout),
                        "socket {i}: a hostile request #{id} succeeded: {result:?}; requests {:?}",
                        s.requests[&id]
                    );
                }
                Ok(ServerMsg::Retry { id, .. }) => {
                    // A login or registration asked to prove its address: never larger.
                    let Some(&len) = s.ids.get(&id) else { panic!("socket {i}: retry #{id} for no request") };
                    assert!(g.len() <= len, "socket {i}: {} byte retry for a {len} byte request", g.len());
                }
                Ok(ServerMsg::PathChallenge { .. }) => {
                    panic!("socket {i}: a path challenge without a session")
                }
                Ok(ServerMsg::Push { message, .. }) => {
                    panic!("socket {i}: a push to a hostile socket: {message:?}")
                }
                Ok(ServerMsg::Pushes { messages, .. }) => {
                    panic!("socket {i}: pushes to a hostile socket: {messages:?}")
                }
                Err(_) if g.starts_with(b"Um\x03") && (g.len() == 3 || g[3] == proto::NOTICE_TAG) => {
                    notices += 1
                }
                Err(e) => panic!("socket {i}: undecodable answer ({e}): {g:02x?}"),
            }
        }
        assert!(notices <= s.version_mismatches, "socket {i}: {notices} version notices");
    }

    // ---- nothing stored changed but the legitimate posts ----
    assert_eq!(user_list(&d), users_before, "accounts");
    let (messages_after, relations_after) = alice_state(&d);
    let mut expected = messages_before.clone();
    expected.extend((1..=ticks).map(|i| format!("[bob] tick {i}")));
    assert_eq!(messages_after, expected, "alice's messages");
    assert_eq!(relations_after, relations_before, "alice's subscriptions");

    // ---- it stops cleanly, having received everything ----
    drop(alice);
    drop(bob);
    assert!(d.stop(), "clean exit");
    let line = d.stderr.wait_for(WAIT, |l| l.contains("stopped:")).expect("the stopped: line");
    let received: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("datagrams_in="))
        .and_then(|n| n.parse().ok())
        .expect("datagrams_in");
    // Loopback drops nothing unless the daemon's receive buffer overflows; allow a little of that.
    assert!(
        received >= 10_000 && received >= total as u64 * 95 / 100,
        "the daemon received {received} datagrams, we sent {total} hostile ones"
    );
    eprintln!("daemon: {line}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

/// A datagram the daemon sends, sent back to it as another daemon (or, with a spoofed source
/// address, the daemon itself) would, must not make it answer forever. Today a `Pong` reply,
/// `UM 01 | 00 id 00 09`, is byte for byte a token-less `Ping` request, which is answered with
/// the same bytes: one spoofed ping between two daemons loops until a datagram is lost.
/// Here the test plays the other daemon and bounces the answer back up to 200 times.
#[test]
fn a_reflected_pong_dies_out() {
    let d = Daemon::start(FAST_CONFIG);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut datagram = encode(42, None, RequestBody::Ping);
    let mut buf = [0u8; 2048];
    for bounce in 0..200 {
        sock.send_to(&datagram, d.addr).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => datagram = buf[..n].to_vec(),
            Err(_) => {
                // The ping is answered once; its answer (server magic) is never answered.
                assert_eq!(bounce, 1, "the daemon stopped answering after {bounce} bounce(s)");
                return;
            }
        }
    }
    panic!(
        "the daemon answered its own answer 200 times: {datagram:02x?} is both a Pong reply ({:?}) and a \
         request ({:?})",
        proto::decode_server(&datagram),
        proto::decode_client(&datagram)
    );
}
