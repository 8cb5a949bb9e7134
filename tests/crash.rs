//! "Nothing acknowledged is ever lost", with the real binaries and SIGKILL.
//!
//! Four posters (separate `udpmsg --json` processes, each logged in once) post unique texts while
//! a subscriber follows all of them. The daemon is killed with SIGKILL at random moments, over
//! `CYCLES` cycles, and started again on the same data directory and the same port, so the
//! running clients keep talking to it (they retransmit while it is down). Sometimes it is also
//! killed while it is still starting. At the end:
//!
//! - every post a client saw acknowledged is in the subscriber's inbox exactly once, with its
//!   text and author; a post without an answer is stored at most once; nothing else is stored;
//! - accounts and subscriptions are intact (every account logs in with its password);
//! - the sessions survived every restart: posts after a restart succeed without a new login;
//! - the subscriber was never shown a message twice, and only stored messages.
//!
//! The kill schedule comes from a seed, printed at the start; `CRASH_SEED=N` replays it.
//! `UDPMSG_TEST_STORAGE=postgres` runs the same on a throwaway PostgreSQL (the daemon comes back
//! under the same node name, so its sessions do).

mod common;

use common::{run_client, DaemonProcess, LiveClient, TempDir, FAST_CONFIG};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use udpmsg::proto::{self, ClientMsg, ErrorCode, Request, RequestBody, Response, ServerMsg, Token};

const POSTERS: usize = 4;
/// Kill-and-restart cycles.
const CYCLES: usize = 20;
/// Posts per poster at most (keeps the inbox under `max_retrieve`).
const MAX_POSTS: usize = 1500;
/// One post per poster this often at most (well under the per-session request rate limit).
const POST_EVERY: Duration = Duration::from_millis(20);
/// Posts sent but not answered yet, per poster (the client runs one at a time).
const MAX_OUTSTANDING: usize = 2;

const DAEMON_EXTRA: &str = "max_retrieve = 10000\nmax_inbox = 100000\ncatch_up_max = 100\n\
    push_initial_rto_ms = 200\npush_min_rto_ms = 50\npush_max_rto_ms = 1000\npush_max_tries = 100\n";

/// Generous retransmission: the daemon may be down for a second or more at a time.
const CLIENT_CONFIG: &str = "request_initial_timeout_ms = 200\nrequest_min_timeout_ms = 50\n\
    request_max_timeout_ms = 500\nrequest_max_tries = 100\nping_interval_secs = 1\n";

/// splitmix64: a seeded, dependency-free generator for the kill schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn seed() -> u64 {
    match std::env::var("CRASH_SEED") {
        Ok(s) => s.trim().parse().expect("CRASH_SEED is a number"),
        Err(_) => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        }
    }
}

fn parse(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

/// Everything the client printed so far, drained without blocking.
fn drain(c: &mut LiveClient) {
    c.stdout.wait_for(Duration::ZERO, |_| false);
}

/// Waits up to `timeout` for a JSON line satisfying `pred` (seen before or arriving now).
fn wait_json(c: &mut LiveClient, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    c.stdout.wait_for(timeout, |l| parse(l).is_some_and(|v| pred(&v))).and_then(|l| parse(&l))
}

#[derive(Debug, Clone)]
enum Outcome {
    Acked(u64),
    Failed(String),
}

/// One posting client and what it saw.
struct Poster {
    name: String,
    client: LiveClient,
    /// Texts in the order they were posted; `outcomes[k]` answers `texts[k]`.
    texts: Vec<String>,
    outcomes: Vec<Outcome>,
    /// Lines of `client.stdout.seen` already looked at.
    parsed: usize,
    next_post: Instant,
    /// Anything that was neither a post's answer nor the one login.
    other: Vec<String>,
}

impl Poster {
    fn update(&mut self) {
        drain(&mut self.client);
        while self.parsed < self.client.stdout.seen.len() {
            let line = self.client.stdout.seen[self.parsed].clone();
            self.parsed += 1;
            let Some(v) = parse(&line) else {
                self.other.push(line);
                continue;
            };
            match (v["type"].as_str(), v["command"].as_str()) {
                (Some("ok"), Some("post")) => self.outcomes.push(Outcome::Acked(v["id"].as_u64().unwrap())),
                (Some("error"), Some("post")) => {
                    self.outcomes.push(Outcome::Failed(v["code"].as_str().unwrap_or("?").to_string()))
                }
                (Some("ok"), Some("login" | "whoami")) => {}
                // The client saying the daemon is gone, and back.
                (Some("contact"), _) => {}
                _ => self.other.push(line),
            }
        }
    }

    fn acked(&self) -> usize {
        self.outcomes.iter().filter(|o| matches!(o, Outcome::Acked(_))).count()
    }

    fn outstanding(&self) -> usize {
        self.texts.len() - self.outcomes.len()
    }

    /// Posts the next text if it is time to and not too much is outstanding.
    fn feed(&mut self, now: Instant) {
        if now < self.next_post || self.outstanding() >= MAX_OUTSTANDING || self.texts.len() >= MAX_POSTS {
            return;
        }
        let text = format!("{} post {}", self.name, self.texts.len());
        self.client.send(&format!("post#{text}"));
        self.texts.push(text);
        self.next_post = (self.next_post + POST_EVERY).max(now);
    }
}

/// Runs the posters (and drains the subscriber) until `done` says so or `timeout` passes;
/// returns whether `done` was reached.
fn run_until(
    posters: &mut [Poster],
    sub: &mut LiveClient,
    feed: bool,
    timeout: Duration,
    done: impl Fn(&[Poster]) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        for p in posters.iter_mut() {
            p.update();
            if feed {
                p.feed(now);
            }
        }
        drain(sub);
        if done(posters) {
            return true;
        }
        if now >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
}

fn start_daemon(config: &Path, listen: &str, data: &Path) -> (DaemonProcess, SocketAddr) {
    // The port was just released by the killed daemon; allow a retry in case it is slow to go.
    for attempt in 0..20 {
        let mut d = DaemonProcess::spawn(config, listen, data);
        if let Some(addr) = d.wait_listening(Duration::from_secs(20)) {
            return (d, addr);
        }
        let status = common::wait_timeout(&mut d.child, Duration::from_secs(5));
        let err = d.stderr.rest(Duration::from_secs(1)).join("\n");
        if attempt < 19 && err.contains("cannot bind") {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        panic!("udpmsgd did not start on {listen} (status {status:?}):\n{err}");
    }
    unreachable!()
}

#[test]
fn nothing_acknowledged_is_lost_when_the_daemon_is_killed() {
    let started = Instant::now();
    let seed = seed();
    println!("crash test seed: {seed} (replay the kill schedule with CRASH_SEED={seed})");
    let mut rng = Rng(seed);

    let dir = TempDir::new("crash");
    let config = dir.path().join("server.toml");
    let storage = common::TestStorage::from_env("crash");
    std::fs::write(&config, format!("{FAST_CONFIG}{DAEMON_EXTRA}{}", storage.config)).unwrap();
    let client_cfg = dir.path().join("client.toml");
    std::fs::write(&client_cfg, CLIENT_CONFIG).unwrap();
    let client_cfg = client_cfg.to_string_lossy().into_owned();
    let data = dir.path().join("data");

    let (mut daemon, addr) = start_daemon(&config, "127.0.0.1:0", &data);
    let listen = addr.to_string();

    // Accounts, then the subscriber follows every poster, before any crash.
    let names: Vec<String> = (0..POSTERS).map(|i| format!("p{i}")).collect();
    let mut setup: String = names.iter().map(|u| format!("register#{u}&password\n")).collect();
    setup.push_str("register#sub&password\n");
    let out = run_client(addr, &["--json"], &setup);
    assert_eq!(out.code, Some(0), "{out:?}");

    let mut sub = LiveClient::start(addr, &["--json", "--config", &client_cfg]);
    sub.send("login#sub&password");
    for u in &names {
        sub.send(&format!("subscribe#{u}"));
    }
    for u in &names {
        assert!(
            wait_json(&mut sub, Duration::from_secs(20), |v| v["type"] == "ok"
                && v["command"] == "subscribe"
                && v["user"] == *u)
            .is_some(),
            "subscribe#{u} failed: {:?}",
            sub.stdout.seen
        );
    }

    let mut posters: Vec<Poster> = names
        .iter()
        .map(|u| {
            let mut client = LiveClient::start(addr, &["--json", "--config", &client_cfg]);
            client.send(&format!("login#{u}&password"));
            Poster {
                name: u.clone(),
                client,
                texts: Vec::new(),
                outcomes: Vec::new(),
                parsed: 0,
                next_post: Instant::now(),
                other: Vec::new(),
            }
        })
        .collect();
    for p in &mut posters {
        assert!(
            wait_json(&mut p.client, Duration::from_secs(20), |v| v["type"] == "ok"
                && v["command"] == "login")
            .is_some(),
            "login of {} failed: {:?}",
            p.name,
            p.client.stdout.seen
        );
    }

    // Let them get going.
    run_until(&mut posters, &mut sub, true, Duration::from_millis(300), |_| false);

    let mut schedule = Vec::new();
    let mut startup_kills = 0;
    for cycle in 0..CYCLES {
        // Acknowledged posts so far: after a restart each poster must get more, without logging in.
        let before: Vec<usize> = posters.iter().map(|p| p.acked()).collect();
        let immediate = rng.below(3) == 0;
        let up = if immediate {
            // Kill while the clients are still retransmitting into the fresh daemon.
            rng.millis(0, 300)
        } else {
            let ok = run_until(&mut posters, &mut sub, true, Duration::from_secs(20), |ps| {
                ps.iter().zip(&before).all(|(p, b)| p.acked() > *b)
            });
            assert!(
                ok,
                "cycle {cycle} (seed {seed}): not every poster got a post through after the restart: {:?}",
                posters.iter().map(|p| (&p.name, p.outcomes.last(), &p.other)).collect::<Vec<_>>()
            );
            rng.millis(0, 1000)
        };
        run_until(&mut posters, &mut sub, true, up, |_| false);
        daemon.kill();
        let down = rng.millis(0, 500);
        schedule.push(format!(
            "cycle {cycle}: up {up:?}{}, down {down:?}",
            if immediate { " (early)" } else { "" }
        ));
        run_until(&mut posters, &mut sub, true, down, |_| false);
        if rng.below(4) == 0 {
            // Killed again while opening the database and starting a new epoch.
            let mut d = DaemonProcess::spawn(&config, &listen, &data);
            std::thread::sleep(rng.millis(0, 40));
            d.kill();
            startup_kills += 1;
        }
        let (d, a) = start_daemon(&config, &listen, &data);
        assert_eq!(a, addr);
        daemon = d;
    }
    println!("kill schedule:\n  {}", schedule.join("\n  "));

    // After the last restart: every poster gets posts through on its old session.
    let before: Vec<usize> = posters.iter().map(|p| p.acked()).collect();
    let ok = run_until(&mut posters, &mut sub, true, Duration::from_secs(20), |ps| {
        ps.iter().zip(&before).all(|(p, b)| p.acked() > *b)
    });
    assert!(ok, "not every poster got a post through after the last restart (seed {seed})");
    // Stop posting; wait for the answers still outstanding.
    let ok = run_until(&mut posters, &mut sub, false, Duration::from_secs(60), |ps| {
        ps.iter().all(|p| p.outstanding() == 0)
    });
    assert!(ok, "posts still unanswered a minute after the last restart (seed {seed})");
    for p in &mut posters {
        p.client.send("whoami");
        let me = wait_json(&mut p.client, Duration::from_secs(20), |v| v["command"] == "whoami");
        assert!(
            me.as_ref().is_some_and(|v| v["type"] == "ok" && v["user"] == *p.name),
            "{}: whoami after the restarts: {me:?}",
            p.name
        );
        p.update();
    }

    // Give the subscriber a moment for pushes still in flight, then read its inbox.
    std::thread::sleep(Duration::from_millis(500));
    sub.send("retrieve#10000");
    sub.send("subscriptions");
    let retrieved = wait_json(&mut sub, Duration::from_secs(60), |v| v["command"] == "retrieve")
        .expect("the subscriber's retrieve answered");
    assert_eq!(retrieved["type"], "ok", "{retrieved}");
    let subs = wait_json(&mut sub, Duration::from_secs(20), |v| v["command"] == "subscriptions")
        .expect("the subscriber's subscriptions answered");
    assert_eq!(subs["type"], "ok", "{subs}");

    // Every account still logs in with its password, and is listed.
    let mut check: String = names.iter().map(|u| format!("login#{u}&password\n")).collect();
    check.push_str("login#sub&password\nusers#*\n");
    let out = run_client(addr, &["--json"], &check);
    assert_eq!(out.code, Some(0), "accounts after the crashes: {out:?}");
    let users = out.stdout.iter().filter_map(|l| parse(l)).find(|v| v["command"] == "users").unwrap();
    let listed: BTreeSet<&str> =
        users["users"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    let expected: BTreeSet<&str> = names.iter().map(|s| s.as_str()).chain(["sub"]).collect();
    assert_eq!(listed, expected, "accounts after the crashes");
    let following: BTreeSet<&str> =
        subs["following"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(following, names.iter().map(|s| s.as_str()).collect(), "subscriptions after the crashes");

    // ---- the exactly-once checks; all violations are collected before failing.
    let mut problems: Vec<String> = Vec::new();
    let messages = retrieved["messages"].as_array().unwrap();
    let mut by_id: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    let mut by_text: HashMap<&str, Vec<u64>> = HashMap::new();
    for m in messages {
        let id = m["id"].as_u64().unwrap();
        by_id.entry(id).or_default().push(m);
        by_text.entry(m["text"].as_str().unwrap()).or_default().push(id);
    }
    for (id, ms) in &by_id {
        if ms.len() > 1 {
            problems.push(format!("message id {id} is {} times in the inbox", ms.len()));
        }
    }

    let mut acked_ids: BTreeMap<u64, (&str, &str)> = BTreeMap::new();
    let (mut n_acked, mut n_unanswered, mut n_unanswered_stored) = (0, 0, 0);
    for p in &posters {
        if !p.other.is_empty() {
            problems.push(format!("{} printed unexpected lines: {:?}", p.name, p.other));
        }
        for (k, text) in p.texts.iter().enumerate() {
            let stored = by_text.get(text.as_str()).cloned().unwrap_or_default();
            match &p.outcomes[k] {
                Outcome::Acked(id) => {
                    n_acked += 1;
                    if let Some((other, _)) = acked_ids.insert(*id, (&p.name, text)) {
                        problems.push(format!("id {id} was acknowledged to {} and to {other}", p.name));
                    }
                    match by_id.get(id).map(|v| v.as_slice()) {
                        None => problems.push(format!("acknowledged post {id} ({text:?}) is lost")),
                        Some([m]) => {
                            if m["text"] != text.as_str() || m["author"] != p.name.as_str() {
                                problems.push(format!("acknowledged post {id} ({text:?}) is stored as {m}"));
                            }
                        }
                        Some(_) => {}
                    }
                    if stored.len() > 1 {
                        problems.push(format!(
                            "acknowledged post {text:?} (id {id}) is stored {} times, as ids {stored:?}",
                            stored.len()
                        ));
                    }
                }
                Outcome::Failed(code) => {
                    n_unanswered += 1;
                    // Refused: the daemon was gone when the post began (an earlier copy may still
                    // have been carried out), which is unanswered too.
                    if code != "NoAnswer" && code != "Refused" {
                        problems.push(format!("{}: post {text:?} was refused with {code}", p.name));
                    }
                    if !stored.is_empty() {
                        n_unanswered_stored += 1;
                    }
                    if stored.len() > 1 {
                        problems.push(format!(
                            "unanswered post {text:?} is stored {} times, as ids {stored:?}",
                            stored.len()
                        ));
                    }
                }
            }
        }
        // The session survived: one login, however many restarts.
        let logins =
            p.client.stdout.seen.iter().filter_map(|l| parse(l)).filter(|v| v["command"] == "login").count();
        if logins != 1 {
            problems.push(format!("{} logged in {logins} times", p.name));
        }
    }
    let sent: BTreeSet<&str> = posters.iter().flat_map(|p| p.texts.iter().map(|t| t.as_str())).collect();
    for m in messages {
        if !sent.contains(m["text"].as_str().unwrap()) {
            problems.push(format!("the inbox holds a message nobody posted: {m}"));
        }
    }

    // The subscriber's pushes: each message shown once, and only stored ones.
    let pushes: Vec<u64> = sub
        .stdout
        .seen
        .iter()
        .filter_map(|l| parse(l))
        .filter(|v| v["type"] == "push")
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    let mut shown: BTreeMap<u64, usize> = BTreeMap::new();
    for id in &pushes {
        *shown.entry(*id).or_default() += 1;
    }
    for (id, n) in &shown {
        if *n > 1 {
            problems.push(format!("the subscriber was shown message {id} {n} times"));
        }
        if !by_id.contains_key(id) {
            problems.push(format!("the subscriber was shown message {id}, which is not stored"));
        }
    }
    let sub_errors: Vec<&String> = sub
        .stdout
        .seen
        .iter()
        .filter(|l| parse(l).is_none_or(|v| !matches!(v["type"].as_str(), Some("ok" | "push" | "contact"))))
        .collect();
    if !sub_errors.is_empty() {
        problems.push(format!("the subscriber printed errors: {sub_errors:?}"));
    }
    let acked_pushed = acked_ids.keys().filter(|id| shown.contains_key(id)).count();

    println!(
        "{CYCLES} SIGKILL cycles (+{startup_kills} during startup) in {:?}: {} posts, {n_acked} acknowledged \
         ({acked_pushed} of them pushed to the subscriber), {n_unanswered} unanswered ({n_unanswered_stored} of \
         those stored), {} messages in the inbox, {} pushes shown",
        started.elapsed(),
        sent.len(),
        messages.len(),
        pushes.len()
    );
    if !problems.is_empty() {
        let daemon_log = daemon.stderr.rest(Duration::from_millis(200));
        panic!(
            "seed {seed}: {} problem(s):\n  {}\n(last daemon's log tail: {:?})",
            problems.len(),
            problems.iter().take(50).cloned().collect::<Vec<_>>().join("\n  "),
            daemon_log.iter().rev().take(10).collect::<Vec<_>>()
        );
    }

    for p in &mut posters {
        assert_eq!(p.client.finish(), Some(0), "{}: every command succeeded", p.name);
    }
    assert_eq!(sub.finish(), Some(0), "subscriber: every command succeeded");
    assert!(daemon.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()), "clean stop");
}

/// A bare protocol client on a UDP socket: sends a request until its reply comes (loopback does
/// not lose, but the daemon may still be starting).
struct RawClient {
    sock: std::net::UdpSocket,
    server: SocketAddr,
}

impl RawClient {
    fn new(server: SocketAddr) -> RawClient {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        RawClient { sock, server }
    }

    /// Sends `bytes` (one encoded request with id `id`) until the reply with that id comes.
    fn exchange(&self, id: u64, bytes: &[u8]) -> Result<Response, ErrorCode> {
        let mut buf = [0u8; 2048];
        for _ in 0..50 {
            self.sock.send_to(bytes, self.server).unwrap();
            while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                if let Ok(ServerMsg::Reply { id: rid, result }) = proto::decode_server(&buf[..n]) {
                    if rid == id {
                        return result;
                    }
                }
            }
        }
        panic!("no reply to request #{id}");
    }
}

fn encode(id: u64, token: Option<Token>, body: RequestBody) -> Vec<u8> {
    proto::encode_client(&ClientMsg::Request(Request { id, token, body }))
}

/// The deterministic core of the crash hazard above: the daemon committed a post and died before
/// its reply left, so the client, which never saw the reply, retransmits the very same request
/// (same id, same token) to the restarted daemon. It must not run a second time: the post is
/// stored once (and the reply, if any, is the original one).
#[test]
fn a_request_retransmitted_across_a_restart_is_not_executed_again() {
    let dir = TempDir::new("crash-replay");
    let config = dir.path().join("server.toml");
    let storage = common::TestStorage::from_env("replay");
    std::fs::write(&config, format!("{FAST_CONFIG}{}", storage.config)).unwrap();
    let data = dir.path().join("data");
    let (mut daemon, addr) = start_daemon(&config, "127.0.0.1:0", &data);
    let out = run_client(addr, &["--json"], "register#alice&password\nregister#bob&password\n");
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = run_client(addr, &["--json"], "login#bob&password\nsubscribe#alice\n");
    assert_eq!(out.code, Some(0), "{out:?}");

    let raw = RawClient::new(addr);
    let login = RequestBody::Login {
        user: "alice".into(),
        password: "password".into(),
        cookie: None,
        pad: vec![0; proto::MIN_UNAUTHENTICATED_REQUEST],
    };
    let token = match raw.exchange(7000, &encode(7000, None, login)) {
        Ok(Response::LoggedIn { token, .. }) => token,
        other => panic!("login: {other:?}"),
    };
    let post = encode(7001, Some(token), RequestBody::Post { text: "only once".into() });
    let first = raw.exchange(7001, &post);
    let Ok(Response::Posted { id, .. }) = first else { panic!("post: {first:?}") };

    // The reply could as well have been lost with the daemon: nothing tells the two apart.
    daemon.kill();
    let (mut daemon, again) = start_daemon(&config, &addr.to_string(), &data);
    assert_eq!(again, addr);
    let second = raw.exchange(7001, &post);

    let out = run_client(addr, &["--json"], "login#bob&password\nretrieve#100\n");
    assert_eq!(out.code, Some(0), "{out:?}");
    let r = out.stdout.iter().filter_map(|l| parse(l)).find(|v| v["command"] == "retrieve").unwrap();
    let stored: Vec<u64> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["text"] == "only once")
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        stored,
        vec![id],
        "post #7001 was answered {first:?} before the restart and {second:?} after it; bob's inbox \
         holds it as ids {stored:?}"
    );
    assert!(
        matches!(second, Ok(Response::Posted { id: again, .. }) if again == id),
        "the retransmission after the restart was answered {second:?}"
    );
    assert!(daemon.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()));
}
