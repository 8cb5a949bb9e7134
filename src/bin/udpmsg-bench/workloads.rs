//! The workloads: set-up, measured phase, figures.

use crate::behaviors::{Fanout, Idle, Posters, Storm, Subscribers};
use crate::daemon::{log, rss_kib, CpuMeter, CpuUse, DaemonStats};
use crate::hist::Latency;
use crate::script::Script;
use crate::sim::{NetStats, Sim};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use udpmsg::command::Command;
use udpmsg::config::ClientConfig;

pub const PASSWORD: &str = "bench-password";

/// Counts and times of one run (see the CLI for their meaning).
#[derive(Debug, Clone, Serialize)]
pub struct Opts {
    #[serde(skip)]
    pub duration: Duration,
    pub duration_secs: f64,
    pub seq_posts: u64,
    pub posts: u64,
    pub clients: usize,
    pub fanout_posts: u64,
    pub posters: usize,
    pub subscribers: usize,
    /// Workloads 3 and 4: posts per second in all, spread evenly over the posters (`None`: each
    /// poster posts again as soon as its previous post is acked).
    pub post_rate: Option<f64>,
    pub storm_rate: f64,
    pub storm_logins: u64,
    pub storm_users: usize,
    pub storm_pool: usize,
    pub sessions: usize,
    pub sessions_per_user: usize,
    pub ping_interval_secs: f64,
    pub idle_hold_secs: f64,
    pub text_bytes: usize,
    #[serde(skip)]
    pub drain: Duration,
    pub setup_window: usize,
    /// Workload 6: accounts logged in, each retrieving `read_count` messages per round.
    pub readers: usize,
    pub read_count: u32,
    /// Workload 6: retrieves in flight.
    pub read_window: usize,
}

pub struct Ctx {
    pub server: SocketAddr,
    /// Every daemon when several share one database (`--nodes`): `server` is the first. Posters
    /// talk to the first, subscribers to the others; workload 2's clients take turns.
    pub servers: Vec<SocketAddr>,
    pub daemon_pid: Option<u32>,
    pub salt: u64,
    pub opts: Opts,
    /// The bench's clock origin for timestamps in post texts.
    pub t0: Instant,
    /// Shell commands run when a measured phase starts and when it ends (e.g. to zero and dump
    /// a profiler's counters).
    pub hooks: (Option<String>, Option<String>),
}

impl Ctx {
    pub fn hook(&self, cmd: &Option<String>) {
        if let Some(cmd) = cmd {
            let mut c = std::process::Command::new("sh");
            c.arg("-c").arg(cmd).env("UDPMSG_BENCH_SERVER", self.server.to_string());
            if let Some(pid) = self.daemon_pid {
                c.env("UDPMSG_BENCH_DAEMON_PID", pid.to_string());
            }
            match c.status() {
                Ok(s) if s.success() => {}
                Ok(s) => log(&format!("hook `{cmd}` exited with {s}")),
                Err(e) => log(&format!("hook `{cmd}`: {e}")),
            }
        }
    }

    fn name(&self, role: &str, i: usize) -> String {
        format!("b{:04x}-{role}{i}", self.salt & 0xffff)
    }

    fn sim(&self) -> Result<Sim, String> {
        let cfg = ClientConfig { server: self.server.to_string(), ..ClientConfig::default() };
        Sim::new(self.server, cfg, self.salt).map_err(|e| format!("cannot set up the clients: {e}"))
    }

    pub fn sim_with(&self, cfg: ClientConfig) -> Result<Sim, String> {
        Sim::new(self.server, ClientConfig { server: self.server.to_string(), ..cfg }, self.salt)
            .map_err(|e| format!("cannot set up the clients: {e}"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub id: u32,
    pub name: &'static str,
    pub ok: bool,
    pub error: Option<String>,
    /// Whether the measured phase ended on its count or on `--duration`.
    pub bound: &'static str,
    pub requested: u64,
    pub completed: u64,
    pub failed: u64,
    pub unit: &'static str,
    pub seconds: f64,
    pub throughput: f64,
    pub latency_of: &'static str,
    pub latency: Latency,
    /// Which ceiling the ratios compare with: "sequential" or "concurrent".
    pub ceiling: &'static str,
    pub ratio_throughput: Option<f64>,
    pub ratio_p99: Option<f64>,
    pub setup_seconds: f64,
    pub daemon: Option<DaemonStats>,
    pub net: NetStats,
    pub details: Map<String, Value>,
}

impl WorkloadResult {
    pub fn failed(id: u32, error: String) -> WorkloadResult {
        WorkloadResult {
            id,
            name: name_of(id),
            ok: false,
            error: Some(error),
            bound: "-",
            requested: 0,
            completed: 0,
            failed: 0,
            unit: "",
            seconds: 0.0,
            throughput: 0.0,
            latency_of: "",
            latency: Latency::default(),
            ceiling: "",
            ratio_throughput: None,
            ratio_p99: None,
            setup_seconds: 0.0,
            daemon: None,
            net: NetStats::default(),
            details: Map::new(),
        }
    }
}

pub fn name_of(id: u32) -> &'static str {
    match id {
        1 => "sequential",
        2 => "concurrent",
        3 => "fanout",
        4 => "fanout+login-storm",
        5 => "idle-sessions",
        6 => "inbox-reads",
        _ => "?",
    }
}

/// Runs a set-up script to completion (bounded by `limit`); any failure is an error.
pub fn setup(
    sim: &mut Sim,
    what: &str,
    work: Vec<(usize, Vec<Command>)>,
    window: usize,
    limit: Duration,
) -> Result<Script, String> {
    let mut script = Script::new(sim.clients.len(), work, window);
    let finished = sim.run(&mut script, Instant::now() + limit).map_err(|e| format!("{what}: {e}"))?;
    if !script.failures.is_empty() {
        return Err(format!(
            "{what}: {} command(s) failed, e.g. {}",
            script.failed,
            script.failures.join("; ")
        ));
    }
    if !finished {
        return Err(format!("{what}: {} client(s) unfinished after {limit:?}", script.unfinished()));
    }
    Ok(script)
}

fn register(user: &str) -> Command {
    Command::Register { user: user.to_string(), password: PASSWORD.to_string() }
}

pub fn login(user: &str) -> Command {
    Command::Login { user: user.to_string(), password: PASSWORD.to_string() }
}

pub fn base(id: u32, sim: &Sim, setup_seconds: f64) -> WorkloadResult {
    WorkloadResult {
        setup_seconds,
        net: sim.net.clone(),
        ok: true,
        error: None,
        ..WorkloadResult::failed(id, String::new())
    }
}

/// CPU used during the measured phase, in cores (2.0 = both cores of a 2-core machine busy).
pub fn cpu_details(r: &mut WorkloadResult, cpu: CpuUse) {
    r.details.insert("cpu_bench_cores".into(), json!(cpu.bench_cores));
    r.details.insert("cpu_daemon_cores".into(), json!(cpu.daemon_cores));
    r.details.insert("cpu_other_cores".into(), json!(cpu.other_cores));
    r.details.insert("cpu_irq_cores".into(), json!(cpu.irq_cores));
    r.details.insert("cpu_steal_cores".into(), json!(cpu.steal_cores));
}

/// Workloads 1 and 2: `n` clients, each its own user and socket, one post in flight each.
pub fn posting(ctx: &Ctx, id: u32, n: usize, target: u64) -> Result<WorkloadResult, String> {
    let mut sim = ctx.sim()?;
    let now = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..n {
        let c = sim.add_owned_client(now).map_err(|e| e.to_string())?;
        sim.set_server(c, ctx.servers[c % ctx.servers.len()], now);
        clients.push(c);
    }
    let t = Instant::now();
    let work = clients
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let u = ctx.name(&format!("w{id}p"), k);
            (c, vec![register(&u), login(&u)])
        })
        .collect();
    setup(&mut sim, "register and log in", work, ctx.opts.setup_window, Duration::from_secs(120))?;
    let setup_seconds = t.elapsed().as_secs_f64();
    ctx.hook(&ctx.hooks.0);
    let stop_at = Instant::now() + ctx.opts.duration;
    let mut p = Posters::new(ctx.t0, sim.clients.len(), clients, target, stop_at, ctx.opts.text_bytes);
    let cpu = CpuMeter::start(ctx.daemon_pid);
    sim.run(&mut p, stop_at + ctx.opts.drain).map_err(|e| e.to_string())?;
    let cpu = cpu.stop();
    ctx.hook(&ctx.hooks.1);
    let seconds = (p.last_ack - p.start).as_secs_f64().max(1e-9);
    let mut r = base(id, &sim, setup_seconds);
    r.bound = if p.time_bound() { "time" } else { "count" };
    r.requested = target;
    r.completed = p.acked;
    r.failed = p.failed + p.outstanding();
    r.unit = "posts/s";
    r.seconds = seconds;
    r.throughput = p.acked as f64 / seconds;
    r.latency_of = "post to ack";
    r.latency = p.hist.summary();
    r.ceiling = if n == 1 { "sequential" } else { "concurrent" };
    cpu_details(&mut r, cpu);
    r.details.insert("clients".into(), json!(n));
    r.details.insert("submitted".into(), json!(p.submitted));
    r.details.insert("unanswered".into(), json!(p.outstanding()));
    r.details.insert("errors".into(), json!(p.errors));
    r.details.insert("text_bytes".into(), json!(ctx.opts.text_bytes));
    Ok(r)
}

/// Workloads 3 and 4.
pub fn fanout(ctx: &Ctx, id: u32, with_storm: bool) -> Result<WorkloadResult, String> {
    let o = &ctx.opts;
    let mut sim = ctx.sim()?;
    let now = Instant::now();
    let mut posters = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..o.posters {
        posters.push(sim.add_owned_client(now).map_err(|e| e.to_string())?);
    }
    for k in 0..o.subscribers {
        let c = sim.add_owned_client(now).map_err(|e| e.to_string())?;
        if ctx.servers.len() > 1 {
            // Subscribers on the other nodes than the posters': every push crosses nodes.
            sim.set_server(c, ctx.servers[1 + k % (ctx.servers.len() - 1)], now);
        }
        subs.push(c);
    }
    // Storm clients never receive pushes: they share sockets, 64 clients to a socket.
    let mut pool = Vec::new();
    let mut storm_users = Vec::new();
    if with_storm {
        let mut sock = 0;
        for k in 0..o.storm_pool.max(o.storm_users) {
            if k % 64 == 0 {
                sock = sim.add_socket().map_err(|e| e.to_string())?;
            }
            pool.push(sim.add_client(sock, now));
        }
        storm_users = (0..o.storm_users).map(|k| ctx.name(&format!("w{id}l"), k)).collect();
    }
    let pname = |k: usize| ctx.name(&format!("w{id}p"), k);
    let sname = |k: usize| ctx.name(&format!("w{id}s"), k);
    let t = Instant::now();
    let mut work: Vec<(usize, Vec<Command>)> = Vec::new();
    work.extend(posters.iter().enumerate().map(|(k, &c)| (c, vec![register(&pname(k))])));
    work.extend(subs.iter().enumerate().map(|(k, &c)| (c, vec![register(&sname(k))])));
    work.extend(storm_users.iter().zip(&pool).map(|(u, &c)| (c, vec![register(u)])));
    // Registration hashes passwords (workload 4: at argon2's default cost); allow for it.
    setup(&mut sim, "register", work, o.setup_window, Duration::from_secs(300))?;
    let mut work: Vec<(usize, Vec<Command>)> = Vec::new();
    work.extend(posters.iter().enumerate().map(|(k, &c)| (c, vec![login(&pname(k))])));
    work.extend(subs.iter().enumerate().map(|(k, &c)| {
        let mut cmds = vec![login(&sname(k))];
        cmds.extend((0..o.posters).map(|p| Command::Subscribe { user: pname(p) }));
        (c, cmds)
    }));
    setup(&mut sim, "log in and subscribe", work, o.setup_window, Duration::from_secs(300))?;
    let setup_seconds = t.elapsed().as_secs_f64();

    ctx.hook(&ctx.hooks.0);
    let stop_at = Instant::now() + o.duration;
    let n = sim.clients.len();
    let mut p = Posters::new(ctx.t0, n, posters.clone(), o.fanout_posts, stop_at, o.text_bytes);
    if let Some(rate) = o.post_rate {
        p.pace(Duration::from_secs_f64(o.posters as f64 / rate));
    }
    let s = Subscribers::new(ctx.t0, n, &subs);
    let storm = with_storm.then(|| {
        Storm::new(
            n,
            pool.clone(),
            storm_users.clone(),
            PASSWORD.into(),
            o.storm_rate,
            o.storm_logins,
            stop_at,
        )
    });
    let mut f = Fanout::new(p, s, storm);
    let cpu = CpuMeter::start(ctx.daemon_pid);
    let finished = sim.run(&mut f, stop_at + o.drain).map_err(|e| e.to_string())?;
    let cpu = cpu.stop();
    ctx.hook(&ctx.hooks.1);
    let end = f.subs.last_push.unwrap_or(f.posters.last_ack);
    let seconds = (end - f.posters.start).as_secs_f64().max(1e-9);
    let expected = f.expected_pushes();
    let mut r = base(id, &sim, setup_seconds);
    r.bound = if f.posters.time_bound() { "time" } else { "count" };
    r.requested = expected;
    r.completed = f.subs.delivered;
    r.failed = expected.saturating_sub(f.subs.delivered);
    r.unit = "pushes/s";
    r.seconds = seconds;
    r.throughput = f.subs.delivered as f64 / seconds;
    r.latency_of = "post to push";
    r.latency = f.subs.hist.summary();
    r.ceiling = "concurrent";
    cpu_details(&mut r, cpu);
    let d = &mut r.details;
    d.insert("posters".into(), json!(o.posters));
    d.insert("post_rate".into(), json!(o.post_rate));
    d.insert("subscribers".into(), json!(o.subscribers));
    d.insert("posts_requested".into(), json!(f.posters.target));
    d.insert("posts_submitted".into(), json!(f.posters.submitted));
    d.insert("posts_acked".into(), json!(f.posters.acked));
    d.insert("posts_failed".into(), json!(f.posters.failed));
    d.insert("post_errors".into(), json!(f.posters.errors));
    d.insert("posts_per_sec".into(), json!(f.posters.acked as f64 / seconds));
    d.insert("post_ack_latency".into(), json!(f.posters.hist.summary()));
    d.insert("pushes_expected".into(), json!(expected));
    d.insert("pushes_delivered".into(), json!(f.subs.delivered));
    d.insert("pushes_bad_text".into(), json!(f.subs.bad_text));
    d.insert("all_delivered_in_time".into(), json!(finished));
    let per: Vec<u64> = subs.iter().map(|&c| f.subs.per_sub[c]).collect();
    d.insert("pushes_per_subscriber_min".into(), json!(per.iter().min().copied().unwrap_or(0)));
    d.insert("pushes_per_subscriber_max".into(), json!(per.iter().max().copied().unwrap_or(0)));
    if let Some(s) = &f.storm {
        d.insert(
            "storm".into(),
            json!({
                "rate_per_sec": s.rate,
                "requested": s.target,
                "attempted": s.attempted,
                "logged_in": s.logged_in,
                "logged_out": s.logged_out,
                "refused": s.refused,
                "skipped_pool_busy": s.skipped,
                "seconds": s.seconds(),
                "logins_per_sec": s.logged_in as f64 / s.seconds(),
                "login_latency": s.hist.summary(),
                "users": storm_users.len(),
            }),
        );
    }
    Ok(r)
}

/// Workload 5: `sessions` logged-in sessions sending keepalives; the daemon's RSS per session.
pub fn idle(ctx: &Ctx, id: u32) -> Result<WorkloadResult, String> {
    let o = &ctx.opts;
    let n = o.sessions.max(1);
    let per_user = o.sessions_per_user.max(1);
    let users = n.div_ceil(per_user);
    // Our own keepalives are explicit pings (to time them); the core's own would only double
    // them, so its interval is set beyond the run.
    let mut sim = ctx.sim_with(ClientConfig { ping_interval_secs: 86_400, ..ClientConfig::default() })?;
    let now = Instant::now();
    let socks = n.div_ceil(1024).clamp(1, 128);
    let mut sock_ids = Vec::new();
    for _ in 0..socks {
        sock_ids.push(sim.add_socket().map_err(|e| e.to_string())?);
    }
    let clients: Vec<usize> = (0..n).map(|k| sim.add_client(sock_ids[k % socks], now)).collect();
    let uname = |u: usize| ctx.name(&format!("w{id}u"), u);
    let t = Instant::now();
    let limit = Duration::from_secs(60) + Duration::from_millis(2 * n as u64);
    let work = (0..users).map(|u| (clients[u * per_user], vec![register(&uname(u))])).collect();
    setup(&mut sim, "register", work, o.setup_window, limit)?;
    let rss_before = ctx.daemon_pid.and_then(rss_kib);
    let t_login = Instant::now();
    let work = clients.iter().enumerate().map(|(k, &c)| (c, vec![login(&uname(k / per_user))])).collect();
    let logins = setup(&mut sim, "log in", work, o.setup_window, limit)?;
    let login_secs = t_login.elapsed().as_secs_f64();
    let rss_after = ctx.daemon_pid.and_then(rss_kib);
    let setup_seconds = t.elapsed().as_secs_f64();
    log(&format!("workload {id}: {n} sessions logged in in {login_secs:.1} s; holding them"));

    let interval = Duration::from_secs_f64(o.ping_interval_secs.max(0.001));
    ctx.hook(&ctx.hooks.0);
    let start = Instant::now();
    let stop_at = start + Duration::from_secs_f64(o.idle_hold_secs);
    let mut idle = Idle::new(sim.clients.len(), &clients, interval, start, stop_at);
    let cpu = CpuMeter::start(ctx.daemon_pid);
    sim.run(&mut idle, stop_at).map_err(|e| e.to_string())?;
    let cpu = cpu.stop();
    ctx.hook(&ctx.hooks.1);
    // Let the last pings come back (not counted in the rate).
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    sim.run(&mut idle, Instant::now() + Duration::from_millis(500)).map_err(|e| e.to_string())?;
    let rss_hold = ctx.daemon_pid.and_then(rss_kib);

    let mut r = base(id, &sim, setup_seconds);
    r.bound = "count";
    r.requested = n as u64;
    r.completed = logins.ok;
    r.failed = (n as u64).saturating_sub(logins.ok);
    r.unit = "pings/s";
    r.seconds = seconds;
    r.throughput = idle.pongs as f64 / seconds;
    r.latency_of = "keepalive ping to pong";
    r.latency = idle.hist.summary();
    r.ceiling = "sequential";
    cpu_details(&mut r, cpu);
    let d = &mut r.details;
    d.insert("sessions".into(), json!(n));
    d.insert("users".into(), json!(users));
    d.insert("sessions_per_user".into(), json!(per_user));
    d.insert("sockets".into(), json!(socks));
    d.insert("login_seconds".into(), json!(login_secs));
    d.insert("logins_per_sec".into(), json!(n as f64 / login_secs.max(1e-9)));
    d.insert("login_latency".into(), json!(logins.hist.summary()));
    d.insert("ping_interval_secs".into(), json!(o.ping_interval_secs));
    d.insert("pings".into(), json!(idle.pings));
    d.insert("pongs".into(), json!(idle.pongs));
    d.insert("ping_failures".into(), json!(idle.failed));
    d.insert("ping_skipped_not_ready".into(), json!(idle.not_ready));
    d.insert("rss_kib_before_logins".into(), json!(rss_before));
    d.insert("rss_kib_after_logins".into(), json!(rss_after));
    d.insert("rss_kib_after_hold".into(), json!(rss_hold));
    let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) * 1024.0 / n as f64),
        _ => None,
    };
    d.insert("rss_bytes_per_session".into(), json!(per(rss_before, rss_after)));
    d.insert("rss_bytes_per_session_after_hold".into(), json!(per(rss_before, rss_hold)));
    Ok(r)
}
