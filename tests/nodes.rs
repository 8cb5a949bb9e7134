//! Several daemons on one PostgreSQL database, with the real binaries: posts and direct
//! messages across nodes, the node list, admin commands every node hears of, one winner when a
//! name is registered on two nodes at once, and nothing acknowledged lost when a node is killed
//! with SIGKILL and when PostgreSQL cuts every connection under load (the notifications sent
//! meanwhile are lost; the cursor delivers what they announced).
//!
//! Each test starts its own PostgreSQL (Debian's binaries, `initdb` into a temporary directory,
//! as an unprivileged user, on a unix socket), and stops it at the end. Without PostgreSQL the
//! tests print `SKIPPED` and pass, except under `CI=true`, where they fail.

mod common;

use common::pg_temp::{self, TempPg};
use common::{run_client, DaemonProcess, LiveClient, TempDir, FAST_CONFIG};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// Generous retransmission: a node may be down for a second at a time.
const CLIENT_CONFIG: &str = "request_initial_timeout_ms = 200\nrequest_min_timeout_ms = 50\n\
    request_max_timeout_ms = 500\nrequest_max_tries = 100\nping_interval_secs = 1\n";

const DAEMON_EXTRA: &str = "max_retrieve = 10000\nmax_inbox = 100000\ncatch_up_max = 1000\n\
    push_initial_rto_ms = 200\npush_min_rto_ms = 50\npush_max_rto_ms = 1000\npush_max_tries = 100\n";

struct Node {
    name: String,
    config: PathBuf,
    data: PathBuf,
    process: DaemonProcess,
    addr: SocketAddr,
}

struct Cluster {
    pg: TempPg,
    db: String,
    dir: TempDir,
    nodes: Vec<Node>,
}

fn parse(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

fn wait_json(c: &mut LiveClient, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    c.stdout.wait_for(timeout, |l| parse(l).is_some_and(|v| pred(&v))).and_then(|l| parse(&l))
}

fn spawn(config: &Path, listen: &str, data: &Path) -> (DaemonProcess, SocketAddr) {
    for attempt in 0..20 {
        let mut d = DaemonProcess::spawn(config, listen, data);
        if let Some(addr) = d.wait_listening(WAIT) {
            return (d, addr);
        }
        let status = common::wait_timeout(&mut d.child, Duration::from_secs(5));
        let err = d.stderr.rest(Duration::from_secs(1)).join("\n");
        if attempt < 19 && (err.contains("cannot bind") || err.contains("another udpmsgd named")) {
            // The killed one's port, or its database connection (and name lock), still going.
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        panic!("udpmsgd did not start on {listen} (status {status:?}):\n{err}");
    }
    unreachable!()
}

impl Cluster {
    /// PostgreSQL and `n` daemons on one database, or `None` when the test is skipped.
    fn start(tag: &str, n: usize) -> Option<Cluster> {
        let pg = pg_temp::for_test(tag)?;
        let db = "udpmsg".to_string();
        pg.create_db(&db).unwrap();
        let dir = TempDir::new(tag);
        let mut c = Cluster { pg, db, dir, nodes: Vec::new() };
        for i in 1..=n {
            c.add(&format!("n{i}"));
        }
        Some(c)
    }

    fn config_text(&self, name: &str) -> String {
        format!(
            "{FAST_CONFIG}{DAEMON_EXTRA}storage = \"postgres\"\npostgres_url = \"{}\"\nnode_name = \"{name}\"\n",
            self.pg.url(&self.db)
        )
    }

    fn add(&mut self, name: &str) {
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, self.config_text(name)).unwrap();
        let data = self.dir.path().join(format!("{name}-data"));
        let (process, addr) = spawn(&config, "127.0.0.1:0", &data);
        self.nodes.push(Node { name: name.into(), config, data, process, addr });
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }

    /// SIGKILL node `i`, and start it again (same name, same port).
    fn kill_and_restart(&mut self, i: usize, down: Duration) {
        self.nodes[i].process.kill();
        std::thread::sleep(down);
        let n = &self.nodes[i];
        let (process, addr) = spawn(&n.config, &n.addr.to_string(), &n.data);
        assert_eq!(addr, n.addr);
        self.nodes[i].process = process;
    }

    /// `udpmsgd ARGS` with node `i`'s configuration.
    fn admin(&self, i: usize, args: &[&str], stdin: &str) -> (bool, String, String) {
        use std::io::Write as _;
        let mut child = common::daemon_command("udpmsgd")
            .arg("--config")
            .arg(&self.nodes[i].config)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The daemons before their database.
        for n in &mut self.nodes {
            n.process.kill();
        }
    }
}

fn client_config(dir: &Path) -> String {
    let p = dir.join("client.toml");
    std::fs::write(&p, CLIENT_CONFIG).unwrap();
    p.to_string_lossy().into_owned()
}

/// A logged-in `udpmsg --json` on `addr`.
fn logged_in(addr: SocketAddr, cfg: &str, user: &str) -> LiveClient {
    let mut c = LiveClient::start(addr, &["--json", "--config", cfg]);
    c.send(&format!("login#{user}&password"));
    assert!(
        wait_json(&mut c, WAIT, |v| v["type"] == "ok" && v["command"] == "login").is_some(),
        "login of {user}: {:?}",
        c.stdout.seen
    );
    c
}

/// Sends `whoami` until it is refused (at most 20 times, 50 ms apart); returns the refusal.
fn until_refused(c: &mut LiveClient) -> Value {
    for _ in 0..20 {
        c.stdout.seen.retain(|l| !l.contains("whoami"));
        c.send("whoami");
        let v = wait_json(c, WAIT, |v| v["command"] == "whoami").expect("whoami answered");
        if v["type"] == "error" {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the session still works: {:?}", c.stdout.seen);
}

#[test]
fn posts_and_messages_cross_nodes_and_every_node_hears_of_admin_changes() {
    let Some(c) = Cluster::start("cross", 3) else { return };
    let cfg = client_config(c.dir.path());
    let out = run_client(
        c.addr(0),
        &["--json"],
        "register#alice&password\nregister#bob&password\nregister#carol&password\n",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut bob = logged_in(c.addr(1), &cfg, "bob");
    let mut carol = logged_in(c.addr(2), &cfg, "carol");
    for s in [&mut bob, &mut carol] {
        s.send("subscribe#alice");
        assert!(
            wait_json(s, WAIT, |v| v["command"] == "subscribe" && v["type"] == "ok").is_some(),
            "{:?}",
            s.stdout.seen
        );
    }
    let started = Instant::now();
    let out = run_client(c.addr(0), &["--json"], "login#alice&password\npost#hello from n1\n");
    assert_eq!(out.code, Some(0), "{out:?}");
    for s in [&mut bob, &mut carol] {
        let push = wait_json(s, WAIT, |v| v["type"] == "push" && v["text"] == "hello from n1");
        assert!(push.is_some_and(|p| p["author"] == "alice"), "{:?}", s.stdout.seen);
    }
    println!("post on n1 seen on n2 and n3 after {:?} (including alice's login)", started.elapsed());
    // A direct message from n3 to bob on n2.
    carol.send("send#bob&psst");
    let dm = wait_json(&mut bob, WAIT, |v| v["type"] == "push" && v["text"] == "psst");
    assert!(dm.is_some_and(|m| m["author"] == "carol" && m["to"] == "bob"), "{:?}", bob.stdout.seen);
    // Each message once, and bob's inbox holds both, read through n2.
    bob.send("retrieve#10");
    let r = wait_json(&mut bob, WAIT, |v| v["command"] == "retrieve").unwrap();
    let texts: Vec<&str> =
        r["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["hello from n1", "psst"]);
    let pushes = bob.stdout.seen.iter().filter_map(|l| parse(l)).filter(|v| v["type"] == "push").count();
    assert_eq!(pushes, 2, "{:?}", bob.stdout.seen);

    // The node list: three live nodes and where the sessions are.
    let (ok, listing, err) = c.admin(0, &["nodes"], "");
    assert!(ok, "{err}");
    for n in &c.nodes {
        let line = listing.lines().find(|l| l.split_whitespace().nth(1) == Some(n.name.as_str()));
        assert!(line.is_some_and(|l| l.contains("live") && l.contains(&n.addr.to_string())), "{listing}");
    }
    let sessions_on = |name: &str| -> u64 {
        let line = listing.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).unwrap();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    assert!(sessions_on("n2") >= 1 && sessions_on("n3") >= 1, "{listing}");

    // An admin command against the database: carol is deleted, her session on n3 ends there.
    let (ok, said, err) = c.admin(0, &["user", "del", "carol"], "");
    assert!(ok && said.contains("deleted carol"), "{said} {err}");
    // (The node hears of it within milliseconds: a request racing the event may still pass.)
    let gone = until_refused(&mut carol);
    assert!(matches!(gone["code"].as_str(), Some("SessionExpired" | "NotLoggedIn")), "{gone}");
    // A password set by an admin: bob's sessions end everywhere; the new one logs in on any node.
    let (ok, _, err) = c.admin(2, &["user", "passwd", "bob"], "newpassword\n");
    assert!(ok, "{err}");
    until_refused(&mut bob);
    let out = run_client(c.addr(2), &["--json"], "login#bob&newpassword\nwhoami\n");
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[test]
fn a_name_registered_on_two_nodes_at_once_has_one_owner() {
    let Some(c) = Cluster::start("race", 2) else { return };
    for round in 0..8 {
        let name = format!("racer{round}");
        let input = format!("register#{name}&password\n");
        let mut a = LiveClient::start(c.addr(0), &["--json"]);
        let mut b = LiveClient::start(c.addr(1), &["--json"]);
        a.send(input.trim_end());
        b.send(input.trim_end());
        let ra = wait_json(&mut a, WAIT, |v| v["command"] == "register").expect("an answer from n1");
        let rb = wait_json(&mut b, WAIT, |v| v["command"] == "register").expect("an answer from n2");
        let won = [&ra, &rb].iter().filter(|v| v["type"] == "ok").count();
        let taken = [&ra, &rb].iter().filter(|v| v["code"] == "NameTaken").count();
        assert_eq!((won, taken), (1, 1), "round {round}: {ra} / {rb}");
        // The winner's password works on both nodes.
        for i in 0..2 {
            let out = run_client(c.addr(i), &["--json"], &format!("login#{name}&password\n"));
            assert_eq!(out.code, Some(0), "{out:?}");
        }
    }
}

/// What one posting client saw.
struct Poster {
    name: String,
    client: LiveClient,
    texts: Vec<String>,
    /// `Some(id)` acknowledged, `None` failed; in the order of `texts`.
    outcomes: Vec<Option<u64>>,
    parsed: usize,
    next_post: Instant,
}

impl Poster {
    fn update(&mut self) {
        self.client.stdout.wait_for(Duration::ZERO, |_| false);
        while self.parsed < self.client.stdout.seen.len() {
            let line = self.client.stdout.seen[self.parsed].clone();
            self.parsed += 1;
            let Some(v) = parse(&line) else { continue };
            match (v["type"].as_str(), v["command"].as_str()) {
                (Some("ok"), Some("post")) => self.outcomes.push(v["id"].as_u64()),
                (Some("error"), Some("post")) => self.outcomes.push(None),
                _ => {}
            }
        }
    }

    fn feed(&mut self, now: Instant) {
        if now < self.next_post || self.texts.len() > self.outcomes.len() + 1 || self.texts.len() >= 1500 {
            return;
        }
        let text = format!("{} post {}", self.name, self.texts.len());
        self.client.send(&format!("post#{text}"));
        self.texts.push(text);
        self.next_post = (self.next_post + Duration::from_millis(20)).max(now);
    }
}

/// The message ids of every push `sub` has printed so far (`--json`), in order.
fn pushed_ids(sub: &LiveClient) -> Vec<u64> {
    sub.stdout
        .seen
        .iter()
        .filter_map(|l| parse(l))
        .filter(|v| v["type"] == "push")
        .map(|v| v["id"].as_u64().unwrap())
        .collect()
}

fn run_for(
    posters: &mut [Poster],
    sub: &mut LiveClient,
    feed: bool,
    d: Duration,
    done: impl Fn(&[Poster]) -> bool,
) -> bool {
    let end = Instant::now() + d;
    loop {
        let now = Instant::now();
        for p in posters.iter_mut() {
            p.update();
            if feed {
                p.feed(now);
            }
        }
        sub.stdout.wait_for(Duration::ZERO, |_| false);
        if done(posters) {
            return true;
        }
        if now >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
}

#[test]
fn nothing_acknowledged_is_lost_when_a_node_dies_or_the_database_cuts_connections() {
    let Some(mut c) = Cluster::start("kill", 2) else { return };
    let cfg = client_config(c.dir.path());
    let names: Vec<String> = (0..3).map(|i| format!("p{i}")).collect();
    let mut setup: String = names.iter().map(|u| format!("register#{u}&password\n")).collect();
    setup.push_str("register#sub&password\n");
    assert_eq!(run_client(c.addr(0), &["--json"], &setup).code, Some(0));
    // The subscriber on n2, the posters on n1.
    let mut sub = logged_in(c.addr(1), &cfg, "sub");
    for u in &names {
        sub.send(&format!("subscribe#{u}"));
        assert!(wait_json(&mut sub, WAIT, |v| v["command"] == "subscribe" && v["user"] == *u).is_some());
    }
    let mut posters: Vec<Poster> = names
        .iter()
        .map(|u| Poster {
            name: u.clone(),
            client: logged_in(c.addr(0), &cfg, u),
            texts: Vec::new(),
            outcomes: Vec::new(),
            parsed: 0,
            next_post: Instant::now(),
        })
        .collect();
    let acked = |ps: &[Poster]| ps.iter().map(|p| p.outcomes.iter().flatten().count()).sum::<usize>();
    run_for(&mut posters, &mut sub, true, Duration::from_secs(1), |_| false);
    for round in 0..3 {
        // The posters' node dies and comes back on the same port (its clients retransmit).
        c.kill_and_restart(0, Duration::from_millis(200 + 100 * round));
        let before = acked(&posters);
        assert!(
            run_for(&mut posters, &mut sub, true, WAIT, |ps| acked(ps) > before + 10),
            "round {round}: posts stopped after the node restarted"
        );
        // PostgreSQL ends every connection of both nodes (store and listener): the
        // notifications for the posts committed until they are back are lost.
        let cut = c.pg.terminate_connections(&c.db).unwrap();
        assert!(cut >= 3, "round {round}: only {cut} connections ended");
        let before = acked(&posters);
        assert!(
            run_for(&mut posters, &mut sub, true, WAIT, |ps| acked(ps) > before + 10),
            "round {round}: posts stopped after the connections were cut"
        );
    }
    // Stop posting; wait for what is outstanding, then for the pushes.
    assert!(run_for(&mut posters, &mut sub, false, Duration::from_secs(60), |ps| ps
        .iter()
        .all(|p| p.outcomes.len() == p.texts.len())));
    let acked_ids: BTreeMap<u64, String> = posters
        .iter()
        .flat_map(|p| p.texts.iter().zip(&p.outcomes).filter_map(|(t, o)| o.map(|id| (id, t.clone()))))
        .collect();
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        sub.stdout.wait_for(Duration::from_millis(100), |_| false);
        let shown: BTreeSet<u64> = pushed_ids(&sub).into_iter().collect();
        if acked_ids.keys().all(|id| shown.contains(id)) {
            break;
        }
    }
    sub.send("retrieve#10000");
    let r =
        wait_json(&mut sub, Duration::from_secs(60), |v| v["command"] == "retrieve").unwrap_or_else(|| {
            panic!(
                "no retrieve answer: {:?} {:?}",
                sub.stdout.seen.iter().rev().take(5).collect::<Vec<_>>(),
                sub.stderr.rest(Duration::from_secs(1))
            )
        });
    let mut problems = Vec::new();
    let stored: Vec<(u64, String)> = r["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("retrieve: {r}"))
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["text"].as_str().unwrap().to_string()))
        .collect();
    let mut by_id: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
    for (id, text) in &stored {
        by_id.entry(*id).or_default().push(text);
    }
    for (id, text) in &acked_ids {
        match by_id.get(id).map(|v| v.as_slice()) {
            Some([t]) if *t == text => {}
            other => problems.push(format!("acknowledged post {id} ({text}) is stored as {other:?}")),
        }
    }
    let texts: BTreeMap<&String, usize> = stored.iter().fold(BTreeMap::new(), |mut m, (_, t)| {
        *m.entry(t).or_default() += 1;
        m
    });
    for (t, n) in texts {
        if n > 1 {
            problems.push(format!("{t} is stored {n} times"));
        }
    }
    let shown = pushed_ids(&sub);
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for id in &shown {
        *counts.entry(*id).or_default() += 1;
    }
    for (id, n) in &counts {
        if *n > 1 {
            problems.push(format!("the subscriber was shown {id} {n} times"));
        }
    }
    for id in acked_ids.keys() {
        if !counts.contains_key(id) {
            problems
                .push(format!("acknowledged post {id} was never pushed to the subscriber on the other node"));
        }
    }
    let failed: usize = posters.iter().map(|p| p.outcomes.iter().filter(|o| o.is_none()).count()).sum();
    println!(
        "{} posts acknowledged, {failed} refused (storage unavailable, retry) across 3 node kills and 3 cuts; \
         {} stored, {} pushed across nodes",
        acked_ids.len(),
        stored.len(),
        shown.len()
    );
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    // No udpmsgd process is left behind by the test.
    let _ = Command::new("true").status();
}

/// A client given every node's address keeps its session when its node dies: it moves to the
/// next (saying so), the new node takes the session over, and every acknowledged post is shown
/// exactly once, in order, across the move.
#[test]
fn a_client_whose_node_is_killed_moves_on_and_misses_nothing() {
    let Some(mut c) = Cluster::start("failover", 3) else { return };
    let cfg = client_config(c.dir.path());
    assert_eq!(
        run_client(c.addr(0), &["--json"], "register#poster&password\nregister#sub&password\n").code,
        Some(0)
    );
    let (n1, n2) = (c.addr(0).to_string(), c.addr(1).to_string());
    let mut sub = LiveClient::start(c.addr(0), &["--json", "--config", &cfg, "--server", &n2]);
    sub.send("login#sub&password");
    sub.send("subscribe#poster");
    assert!(
        wait_json(&mut sub, WAIT, |v| v["command"] == "subscribe" && v["type"] == "ok").is_some(),
        "{:?}",
        sub.stdout.seen
    );
    let mut posters = vec![Poster {
        name: "poster".into(),
        client: logged_in(c.addr(2), &cfg, "poster"),
        texts: Vec::new(),
        outcomes: Vec::new(),
        parsed: 0,
        next_post: Instant::now(),
    }];
    run_for(&mut posters, &mut sub, true, Duration::from_millis(800), |_| false);
    // The subscriber's node dies mid-stream, for good.
    c.nodes[0].process.kill();
    let moved = wait_json(&mut sub, WAIT, |v| v["type"] == "moved");
    assert!(moved.as_ref().is_some_and(|m| m["server"] == n2.as_str()), "{moved:?} {:?}", sub.stdout.seen);
    run_for(&mut posters, &mut sub, true, Duration::from_millis(1500), |_| false);
    assert!(run_for(&mut posters, &mut sub, false, Duration::from_secs(30), |ps| ps[0].outcomes.len()
        == ps[0].texts.len()));
    let acked: Vec<u64> = posters[0].outcomes.iter().flatten().copied().collect();
    assert!(acked.len() > 40, "{} posts acknowledged", acked.len());
    let end = Instant::now() + WAIT;
    while Instant::now() < end && !acked.iter().all(|id| pushed_ids(&sub).contains(id)) {
        sub.stdout.wait_for(Duration::from_millis(100), |_| false);
    }
    let seen = pushed_ids(&sub);
    let missing: Vec<&u64> = acked.iter().filter(|id| !seen.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged posts never shown: {missing:?}");
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seen, sorted, "shown once each, in order");
    // The session is the same one: no second login, and it still works on n2.
    sub.send("whoami");
    let me = wait_json(&mut sub, WAIT, |v| v["command"] == "whoami").unwrap();
    assert_eq!((me["type"].as_str(), me["user"].as_str()), (Some("ok"), Some("sub")), "{me}");
    let logins = sub.stdout.seen.iter().filter_map(|l| parse(l)).filter(|v| v["command"] == "login").count();
    assert_eq!(logins, 1);
    println!("{} posts acknowledged and shown once each across the move from {n1} to {n2}", acked.len());
}
