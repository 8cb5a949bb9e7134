//! Deterministic simulated network: one server core and many client cores exchange datagrams
//! through a seeded [`Netem`] (loss, duplication, reordering, delay) on a virtual clock that jumps
//! to the next deadline. No sockets, no threads, no real time: a failing seed replays exactly.
//!
//! Property: every post its author saw acknowledged is shown exactly once to each subscriber
//! (all stay logged in), in posting order per author, and appears exactly once in the
//! subscriber's retrieve; a post the author was told failed is stored nowhere.

use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use udpmsg::client::{Client, Done, Event};
use udpmsg::command::Command;
use udpmsg::config::{ClientConfig, ServerConfig};
use udpmsg::netem::{FaultConfig, Netem};
use udpmsg::password::HashParams;
use udpmsg::proto::Message;
use udpmsg::server::Server;
use udpmsg::store::memory::MemoryStore;
use udpmsg::store::Store;

const SERVER: u16 = 7000;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

struct SimClient {
    name: String,
    addr: SocketAddr,
    core: Client,
    script: VecDeque<Command>,
    current: Option<Command>,
    shown: Vec<Message>,
    /// Message ids of posts acknowledged to this client as author.
    acked: Vec<u64>,
    /// Texts of posts this client was told failed.
    failed: Vec<String>,
    /// Posts whose outcome is unknown (gave up waiting).
    unknown: usize,
    retrieved: Option<Vec<Message>>,
    other_failures: Vec<String>,
    /// A vanished client: it neither receives nor sends.
    offline: bool,
}

struct Sim {
    now: Instant,
    server: Server,
    store: MemoryStore,
    net: Netem<(SocketAddr, SocketAddr, Vec<u8>)>,
    clients: Vec<SimClient>,
    by_addr: HashMap<SocketAddr, usize>,
}

impl Sim {
    fn new(seed: u64, faults: FaultConfig, names: &[&str]) -> Sim {
        let now = Instant::now();
        let cfg = ServerConfig {
            max_text_bytes: 64,
            max_retrieve: 1000,
            push_max_tries: 8,
            session_idle_timeout_secs: 300,
            // Replies must outlive the clients' retransmissions (30 tries here, several minutes;
            // the default client's 5 tries take 23 s, well within the default 60 s).
            reply_cache_ttl_secs: 3600,
            ..ServerConfig::default()
        };
        let mut store = MemoryStore::new(cfg.max_inbox as usize);
        store.begin_epoch().unwrap();
        let snapshot = store.load().unwrap();
        let rng = rand::rngs::StdRng::seed_from_u64(seed);
        let server = Server::new(cfg, HashParams::TEST, snapshot, Box::new(rng), now);
        let ccfg = ClientConfig { request_max_tries: 30, ping_interval_secs: 20, ..ClientConfig::default() };
        let clients: Vec<SimClient> = names
            .iter()
            .enumerate()
            .map(|(i, n)| SimClient {
                name: n.to_string(),
                addr: addr(8000 + i as u16),
                core: Client::new(ccfg.clone(), addr(SERVER), 1000 * (i as u64 + 1), now),
                script: VecDeque::new(),
                current: None,
                shown: Vec::new(),
                acked: Vec::new(),
                failed: Vec::new(),
                unknown: 0,
                retrieved: None,
                other_failures: Vec::new(),
                offline: false,
            })
            .collect();
        let by_addr = clients.iter().enumerate().map(|(i, c)| (c.addr, i)).collect();
        Sim { now, server, store, net: Netem::new(faults, seed ^ 0x5eed), clients, by_addr }
    }

    fn idle(&self) -> bool {
        self.clients.iter().all(|c| c.script.is_empty() && c.core.is_ready())
    }

    /// One pass over everything that is due at `now`.
    fn step(&mut self) {
        let now = self.now;
        while let Some((from, to, bytes)) = self.net.poll_deliver(now) {
            if to == addr(SERVER) {
                self.server.handle(now, from, &bytes);
            } else if let Some(&i) = self.by_addr.get(&to) {
                if !self.clients[i].offline {
                    self.clients[i].core.handle(now, from, &bytes);
                }
            }
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        while let Some(job) = self.server.poll_password_job() {
            let (id, outcome) = job.run();
            self.server.on_password_done(now, id, outcome);
        }
        // The store serves commits and reads in order, as the daemon's store thread does.
        loop {
            let mut busy = false;
            if let Some((n, writes)) = self.server.take_writes() {
                self.store.commit(&writes).unwrap();
                self.server.on_committed(now, n, writes.len());
                busy = true;
            }
            while let Some(job) = self.server.poll_read() {
                let (id, read) = (job.id, job.read);
                let r = self.store.read(&read);
                self.server.on_read(now, id, r);
                busy = true;
            }
            while let Some(job) = self.server.poll_password_job() {
                let (id, outcome) = job.run();
                self.server.on_password_done(now, id, outcome);
                busy = true;
            }
            if !busy {
                break;
            }
        }
        while let Some(t) = self.server.poll_transmit() {
            self.net.send(now, (addr(SERVER), t.to, t.bytes));
        }
        for c in self.clients.iter_mut().filter(|c| !c.offline) {
            if c.core.poll_timeout().is_some_and(|t| t <= now) {
                c.core.handle_timeout(now);
            }
            while let Some(e) = c.core.poll_event() {
                let cmd = c.current.take();
                match (e, cmd) {
                    (Event::Push(m), cmd) => {
                        c.shown.push(m);
                        c.current = cmd;
                    }
                    (Event::Done(Done::Posted { id, .. }), _) => c.acked.push(id),
                    (Event::Done(Done::Messages(ms)), _) => c.retrieved = Some(ms),
                    (Event::Done(_), _) => {}
                    (Event::Failed { .. }, Some(Command::Post { text })) => c.failed.push(text),
                    (Event::NoAnswer { .. }, Some(Command::Post { .. })) => c.unknown += 1,
                    (e, cmd) => c.other_failures.push(format!("{}: {e:?} for {cmd:?}", c.name)),
                }
            }
            if c.core.is_ready() {
                if let Some(cmd) = c.script.pop_front() {
                    c.current = Some(cmd.clone());
                    c.core.submit(now, cmd).expect("ready");
                }
            }
            while let Some(b) = c.core.poll_transmit() {
                self.net.send(now, (c.addr, addr(SERVER), b));
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut t = self.net.poll_timeout();
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        };
        consider(self.server.poll_timeout());
        for c in self.clients.iter().filter(|c| !c.offline) {
            consider(c.core.poll_timeout());
        }
        t
    }

    /// Runs until `done` holds (checked after each step) or `limit` of virtual time passes.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        for _ in 0..5_000_000 {
            self.step();
            // Commands just submitted have datagrams to hand to the network at this instant.
            self.step();
            if done(self) {
                return true;
            }
            match self.next_deadline() {
                Some(t) if t <= end => self.now = self.now.max(t),
                _ => {
                    self.now = end;
                    return done(self);
                }
            }
        }
        panic!("simulation did not settle");
    }

    fn client(&mut self, name: &str) -> &mut SimClient {
        self.clients.iter_mut().find(|c| c.name == name).expect("client")
    }
}

fn check_property(seed: u64, faults: FaultConfig, posters: usize, subscribers: usize, posts: usize) {
    let mut names: Vec<String> = (0..posters).map(|i| format!("poster{i}")).collect();
    names.extend((0..subscribers).map(|i| format!("sub{i}")));
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut sim = Sim::new(seed, faults, &name_refs);

    // Phase 1: everyone registers and logs in; subscribers follow every poster.
    for n in &names {
        let c = sim.client(n);
        c.script.push_back(Command::Register { user: n.clone(), password: "password".into() });
        c.script.push_back(Command::Login { user: n.clone(), password: "password".into() });
    }
    assert!(sim.run_until(Duration::from_secs(600), Sim::idle), "seed {seed}: setup did not finish");
    for i in 0..subscribers {
        let c = sim.client(&format!("sub{i}"));
        for p in 0..posters {
            c.script.push_back(Command::Subscribe { user: format!("poster{p}") });
        }
    }
    assert!(sim.run_until(Duration::from_secs(600), Sim::idle), "seed {seed}: subscribing did not finish");
    for c in &sim.clients {
        assert!(c.other_failures.is_empty(), "seed {seed}: setup failed: {:?}", c.other_failures);
        assert_eq!(c.core.user(), Some(c.name.as_str()), "seed {seed}: {} not logged in", c.name);
    }

    // Phase 2: posters post; some posts are refused (too long) and must be stored nowhere.
    for p in 0..posters {
        let c = sim.client(&format!("poster{p}"));
        for k in 0..posts {
            c.script.push_back(Command::Post { text: format!("p{p}-m{k}") });
            if k % 7 == 3 {
                c.script.push_back(Command::Post { text: format!("REFUSED-p{p}-m{k}-{}", "x".repeat(64)) });
            }
        }
    }
    assert!(sim.run_until(Duration::from_secs(3600), Sim::idle), "seed {seed}: posting did not finish");

    // Phase 3: let retransmissions and keepalives settle every push.
    let expected: usize = sim.clients.iter().map(|c| c.acked.len()).sum();
    sim.run_until(Duration::from_secs(600), |s| {
        s.clients.iter().filter(|c| c.name.starts_with("sub")).all(|c| c.shown.len() >= expected)
    });

    // Phase 4: every subscriber retrieves everything.
    for i in 0..subscribers {
        sim.client(&format!("sub{i}")).script.push_back(Command::Retrieve { count: 1000 });
    }
    assert!(sim.run_until(Duration::from_secs(600), Sim::idle), "seed {seed}: retrieve did not finish");

    let mut acked_by_author: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut unknown = 0;
    let mut refused = Vec::new();
    for c in &sim.clients {
        if !c.acked.is_empty() {
            acked_by_author.insert(c.name.clone(), c.acked.clone());
        }
        unknown += c.unknown;
        refused.extend(c.failed.iter().cloned());
        assert!(c.other_failures.is_empty(), "seed {seed}: {:?}", c.other_failures);
    }
    assert!(!refused.is_empty());
    for i in 0..subscribers {
        let c = sim.client(&format!("sub{i}"));
        for (author, acked) in &acked_by_author {
            let shown: Vec<u64> = c.shown.iter().filter(|m| &m.author == author).map(|m| m.id).collect();
            let in_order = shown.windows(2).all(|w| w[0] < w[1]);
            assert!(
                in_order,
                "seed {seed}: {} saw {author}'s posts out of order or twice: {shown:?}",
                c.name
            );
            for id in acked {
                let n = shown.iter().filter(|x| *x == id).count();
                assert_eq!(n, 1, "seed {seed}: {} saw acked post {id} of {author} {n} times", c.name);
            }
            let retrieved = c.retrieved.as_ref().expect("retrieved");
            for id in acked {
                let n = retrieved.iter().filter(|m| m.id == *id).count();
                assert_eq!(n, 1, "seed {seed}: acked post {id} is {n} times in {}'s retrieve", c.name);
            }
        }
        let retrieved = c.retrieved.as_ref().expect("retrieved");
        for m in retrieved.iter().chain(c.shown.iter()) {
            assert!(!m.text.starts_with("REFUSED"), "seed {seed}: a refused post was stored: {}", m.text);
        }
        let mut ids: Vec<u64> = retrieved.iter().map(|m| m.id).collect();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before, "seed {seed}: duplicate in retrieve");
    }
    let stats = sim.net.stats();
    eprintln!(
        "seed {seed}: {expected} acked posts ({unknown} unknown), net sent {} dropped {} duplicated {} reordered {}; server retransmitted {} pushes",
        stats.sent, stats.dropped, stats.duplicated, stats.reordered, sim.server.stats().pushes_retransmitted
    );
}

fn hostile() -> FaultConfig {
    FaultConfig::parse("loss=0.3,dup=0.1,reorder=0.3,window=50ms,delay=2ms,jitter=3ms").unwrap()
}

#[test]
fn exactly_once_under_loss_duplication_and_reordering() {
    let seeds: u64 = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
    let first: u64 = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    for seed in first..first + seeds {
        check_property(seed, hostile(), 3, 4, 12);
    }
}

#[test]
fn perfect_network_is_exact_too() {
    check_property(99, FaultConfig::parse("loss=0").unwrap(), 2, 3, 20);
}

#[test]
fn a_vanished_client_keeps_its_messages_in_the_inbox() {
    let mut sim = Sim::new(5, FaultConfig::parse("loss=0").unwrap(), &["alice", "bob"]);
    for n in ["alice", "bob"] {
        let c = sim.client(n);
        c.script.push_back(Command::Register { user: n.into(), password: "password".into() });
        c.script.push_back(Command::Login { user: n.into(), password: "password".into() });
    }
    sim.client("alice").script.push_back(Command::Subscribe { user: "bob".into() });
    assert!(sim.run_until(Duration::from_secs(60), Sim::idle));
    // Alice's client disappears without a word: take it off the network.
    sim.client("alice").offline = true;
    let alice = sim.clients.iter().position(|c| c.name == "alice").unwrap();
    sim.client("bob").script.push_back(Command::Post { text: "are you there".into() });
    assert!(sim.run_until(Duration::from_secs(60), Sim::idle));
    assert_eq!(sim.client("bob").acked.len(), 1);
    sim.run_until(Duration::from_secs(1000), |_| false);
    assert_eq!(sim.server.stats().sessions_unresponsive, 1, "{:?}", sim.server.stats());
    assert_eq!(sim.server.session_count(), 1, "alice's session expired, bob's is kept alive by pings");
    assert!(sim.clients[alice].shown.is_empty());
    // Alice comes back on a new client: her session is gone; the message waits for her.
    let c = &mut sim.clients[alice];
    c.offline = false;
    c.core = Client::new(ClientConfig::default(), addr(SERVER), 99_999, sim.now);
    c.script.push_back(Command::Login { user: "alice".into(), password: "password".into() });
    c.script.push_back(Command::Retrieve { count: 10 });
    assert!(sim.run_until(Duration::from_secs(60), Sim::idle));
    let texts: Vec<&str> =
        sim.clients[alice].retrieved.as_ref().unwrap().iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["are you there"]);
    // It was never acknowledged, so the login caught her up with a push as well.
    assert_eq!(sim.clients[alice].shown.len(), 1);
}
