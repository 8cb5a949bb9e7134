//! `udpmsg-bench`: a load generator for the real `udpmsgd` over loopback.
//!
//! Many simulated users run in one single-threaded mio loop, each a real
//! `udpmsg::client::Client` core (see `sim.rs` for how datagrams are routed to them). Before the
//! workloads it measures the ceiling of the machine: a bare UDP echo between this process and a
//! copy of itself, sequential and with 32 datagrams in flight. Every workload reports its ratio to
//! that ceiling.
//!
//! Workloads (each bounded by a count and by `--duration`):
//!
//! 1. sequential: one client, post, wait for the ack, repeat;
//! 2. concurrent: 64 clients, one post in flight each;
//! 3. fan-out: 10 posters, 100 subscribers each following every poster; pushes/s and
//!    post-to-push latency (the post text carries its send time);
//! 4. workload 3 plus a login storm (100 logins/s, each followed by a logout) at argon2's
//!    default cost;
//! 5. idle sessions: N sessions sending keepalives; the daemon's RSS per session;
//! 6. inbox reads: a daemon started on a large populated store (`--dataset`, or one the bench
//!    fills itself), its start-up time and RSS; random accounts retrieve their newest messages,
//!    a cold round from disk and a warm round (see `reads.rs`).
//!
//! Unless `--server` is given, each workload gets a fresh daemon (a fresh data directory), whose
//! commit statistics are read from its `stopped:` line after SIGTERM.

mod behaviors;
mod daemon;
mod echo;
mod hist;
mod populate;
mod reads;
mod script;
mod sim;
mod workloads;

#[path = "../common/pg_temp.rs"]
mod pg_temp;

use clap::{Parser, ValueEnum};
use daemon::{log, Daemon, DaemonSpec, WorkDir};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use workloads::{Ctx, Opts, WorkloadResult};

#[derive(Parser, Debug)]
#[command(
    name = "udpmsg-bench",
    version,
    about = "Load generator for udpmsgd: many simulated clients over loopback, against a bare UDP echo ceiling",
    after_help = AFTER_HELP
)]
struct Args {
    /// Workloads to run, e.g. 1,2,3 (1 sequential, 2 concurrent, 3 fan-out, 4 fan-out with a
    /// login storm, 5 idle sessions, 6 inbox reads). Default: all that the storage allows (6
    /// only on SQLite: it restarts a daemon on a populated SQLite dataset).
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<u32>>,
    /// Seconds of each measured phase (the count limits below apply too).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Tiny counts, for smoke tests (also implies --storm-argon2 cheap unless given).
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// Storage of the daemons the bench starts.
    #[arg(long, value_enum, default_value_t = Storage::Sqlite)]
    storage: Storage,
    /// With --storage postgres: daemons on the one database. Workload 3's posters talk to the
    /// first and its subscribers to the others (every push crosses nodes); workload 2's clients
    /// take turns. The CPU columns are the first daemon's; PostgreSQL is in "other".
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Use a running daemon at ADDR instead of starting one per workload. Its own settings
    /// apply (argon2 cost, limits); commit statistics are then not available.
    #[arg(long, value_name = "ADDR")]
    server: Option<SocketAddr>,
    /// With --server: the daemon's pid, to read its RSS for workload 5.
    #[arg(long, value_name = "PID")]
    daemon_pid: Option<u32>,
    /// The udpmsgd executable to start (default: udpmsgd next to this executable).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// `RUST_LOG` for the daemons started (the summary line needs `udpmsgd=info`).
    #[arg(long, value_name = "FILTER", default_value = "warn,udpmsgd=info")]
    daemon_log: String,
    /// Where the daemons' data directories go (default: the system temporary directory).
    /// Durable figures depend on this file system's fsync.
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Keep the data directories.
    #[arg(long)]
    keep_data: bool,
    /// Skip the echo ceiling (ratios are then not reported).
    #[arg(long, conflicts_with = "ceiling_only")]
    no_ceiling: bool,
    /// Only measure the echo ceiling.
    #[arg(long)]
    ceiling_only: bool,
    /// Workload 1: most posts.
    #[arg(long, value_name = "N")]
    seq_posts: Option<u64>,
    /// Workload 2: most posts, in total.
    #[arg(long, value_name = "N")]
    posts: Option<u64>,
    /// Workload 2: clients.
    #[arg(long, value_name = "N")]
    clients: Option<usize>,
    /// Workloads 3 and 4: most posts, in total.
    #[arg(long, value_name = "N")]
    fanout_posts: Option<u64>,
    /// Workloads 3 and 4: posters.
    #[arg(long, value_name = "N")]
    posters: Option<usize>,
    /// Workloads 3 and 4: subscribers (each follows every poster).
    #[arg(long, value_name = "N")]
    subscribers: Option<usize>,
    /// Workloads 3 and 4: posts per second in all, spread evenly over the posters (default: as
    /// fast as the acks come back). For latency at a given load rather than at saturation.
    #[arg(long, value_name = "N")]
    post_rate: Option<f64>,
    /// Workload 4: logins per second.
    #[arg(long, value_name = "N")]
    storm_rate: Option<f64>,
    /// Workload 4: argon2 cost of the daemon (default: its built-in defaults).
    #[arg(long, value_enum)]
    storm_argon2: Option<Argon2>,
    /// Workload 5: sessions.
    #[arg(long, value_name = "N")]
    sessions: Option<usize>,
    /// Workload 5: sessions per account.
    #[arg(long, value_name = "N")]
    sessions_per_user: Option<usize>,
    /// Workload 5: seconds between keepalives of one session.
    #[arg(long, value_name = "SECS")]
    ping_interval: Option<f64>,
    /// Workload 5: seconds the sessions are held (default: --duration).
    #[arg(long, value_name = "SECS")]
    hold: Option<f64>,
    /// Workload 6: a data directory made by `udpmsg-bench populate --data-dir` (copied, not
    /// changed). Without it the bench populates a smaller one itself (10,000 accounts, 100,000
    /// messages; --quick: 300 and 3,000).
    #[arg(long, value_name = "DIR")]
    dataset: Option<PathBuf>,
    /// Workload 6: accounts that log in and read.
    #[arg(long, value_name = "N")]
    readers: Option<usize>,
    /// Workload 6: messages each retrieve asks for.
    #[arg(long, value_name = "N", default_value_t = 20)]
    read_count: u32,
    /// Workload 6: retrieves in flight.
    #[arg(long, value_name = "N", default_value_t = 512)]
    read_window: usize,
    /// Bytes of post text (and of the echo payload).
    #[arg(long, value_name = "N", default_value_t = 64)]
    text_bytes: usize,
    /// Shell command run when each measured phase starts (after the set-up), e.g.
    /// `callgrind_control --zero PID` to profile the daemon under load only. It sees
    /// UDPMSG_BENCH_SERVER (the daemon's address) and UDPMSG_BENCH_DAEMON_PID (when known).
    #[arg(long, value_name = "CMD")]
    hook_start: Option<String>,
    /// Shell command run when each measured phase ends, e.g. `callgrind_control --dump PID`.
    #[arg(long, value_name = "CMD")]
    hook_end: Option<String>,
    /// Clients set up (register, log in) at once.
    #[arg(long, value_name = "N", default_value_t = 128)]
    setup_window: usize,
    #[command(subcommand)]
    cmd: Option<Sub>,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// The ceiling's echo server (the bench starts it itself).
    #[command(hide = true)]
    EchoServer,
    /// Fill a daemon's database through the protocol: accounts, subscriptions, messages.
    Populate(PopulateArgs),
}

#[derive(clap::Args, Debug)]
struct PopulateArgs {
    /// A running daemon to fill (it should have cheap argon2, the abuse limits lifted and
    /// catch_up_max = 0).
    #[arg(long, value_name = "ADDR", conflicts_with = "data_dir", required_unless_present = "data_dir")]
    server: Option<SocketAddr>,
    /// Start a daemon so configured on DIR (config in DIR/server.toml, data in DIR/data), fill
    /// it and stop it; DIR/populate.json says what it holds (workload 6 reads it).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    accounts: u64,
    /// Messages in all.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    messages: u64,
    /// Inboxes each message lands in (each account has this many followers).
    #[arg(long, value_name = "N", default_value_t = 10)]
    recipients: u64,
    #[arg(long, value_name = "N", default_value_t = 200)]
    text_bytes: usize,
    /// Account names are PREFIX000000, PREFIX000001, ...
    #[arg(long, value_name = "PREFIX", default_value = "pop")]
    prefix: String,
    /// Clients at work at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    window: usize,
    /// The udpmsgd executable (with --data-dir; default: udpmsgd next to this executable).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Storage {
    Sqlite,
    Memory,
    /// A PostgreSQL the bench starts (Debian's binaries, fsync on), a fresh database per
    /// workload; `--nodes` daemons share it.
    Postgres,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Argon2 {
    /// argon2's (and udpmsgd's) defaults: 19 MiB, 2 iterations.
    Default,
    /// 64 KiB, 1 iteration (as for the set-up of the other workloads).
    Cheap,
}

const AFTER_HELP: &str = "Examples:\n  \
udpmsg-bench                              # everything, 10 s per workload, SQLite\n  \
udpmsg-bench --workloads 1,2 --storage memory --duration 5\n  \
udpmsg-bench --workloads 5 --sessions 10000 --json\n  \
udpmsg-bench --quick --json               # smoke test\n\
Exit status: 0 when every workload ran (targets are reported, not enforced), 1 otherwise.";

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    kernel: String,
    date_utc: String,
    build_profile: &'static str,
}

#[derive(Serialize)]
struct Ceiling {
    sequential: Option<echo::EchoResult>,
    concurrent: Option<echo::EchoResult>,
    error: Option<String>,
}

#[derive(Serialize)]
struct Report {
    bench_version: &'static str,
    machine: Machine,
    command: String,
    storage: String,
    external_server: Option<String>,
    workload4_argon2: String,
    quick: bool,
    options: Opts,
    ceiling: Ceiling,
    workloads: Vec<WorkloadResult>,
}

/// Set by SIGINT/SIGTERM: the loops stop, and the daemons started are stopped on the way out.
static INTERRUPTED: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let flag = INTERRUPTED.get_or_init(Default::default);
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    match &args.cmd {
        Some(Sub::EchoServer) => {
            return match echo::serve() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("udpmsg-bench echo-server: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Some(Sub::Populate(p)) => {
            return match run_populate(p) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log(&format!("populate: {e}"));
                    ExitCode::from(1)
                }
            };
        }
        None => {}
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            log(&e);
            ExitCode::from(1)
        }
    }
}

/// Settings of a daemon that is being filled, or read back at speed: nothing caught up at login
/// (the clients are shared sockets that receive no pushes).
pub fn filling_keys() -> Vec<(String, String)> {
    vec![("catch_up_max".into(), "0".into())]
}

/// The udpmsgd next to this executable, or the one given.
fn daemon_exe(given: &Option<PathBuf>) -> Result<PathBuf, String> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()
            .map_err(|e| format!("cannot find myself: {e}"))?
            .with_file_name(format!("udpmsgd{}", std::env::consts::EXE_SUFFIX))),
    }
}

fn run_populate(p: &PopulateArgs) -> Result<(), String> {
    let d = populate::Dataset {
        prefix: p.prefix.clone(),
        accounts: p.accounts,
        messages: p.messages,
        recipients: p.recipients,
        text_bytes: p.text_bytes,
    };
    let t = Instant::now();
    let salt = u64::from(rand_u16());
    match (&p.data_dir, p.server) {
        (Some(dir), _) => {
            let spec = DaemonSpec {
                exe: daemon_exe(&p.daemon)?,
                dir: dir.clone(),
                storage: "sqlite".into(),
                cheap_argon2: true,
                max_sessions: 250_000,
                log_filter: "warn,udpmsgd=info".into(),
                extra: filling_keys(),
            };
            let daemon = Daemon::start(&spec)?;
            let result = populate::populate(daemon.addr, &d, p.window, salt);
            let stats = daemon.stop();
            result?;
            let summary: Vec<String> = stats.summary.iter().map(|(k, v)| format!("{k}={v}")).collect();
            log(&format!("populate: daemon: {}", summary.join(" ")));
            let manifest = serde_json::to_string_pretty(&d).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("populate.json"), manifest).map_err(|e| e.to_string())?;
        }
        (None, Some(server)) => populate::populate(server, &d, p.window, salt)?,
        (None, None) => unreachable!("clap requires one"),
    }
    log(&format!(
        "populate: {} accounts, {} messages to {} recipients each, in {:.1} s",
        d.accounts,
        d.messages,
        d.recipients,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn opts(args: &Args) -> Opts {
    let q = args.quick;
    let duration = args.duration.unwrap_or(if q { 20.0 } else { 10.0 });
    let pick = |v: Option<u64>, quick: u64, full: u64| v.unwrap_or(if q { quick } else { full });
    let picku = |v: Option<usize>, quick: usize, full: usize| v.unwrap_or(if q { quick } else { full });
    let storm_rate = args.storm_rate.unwrap_or(if q { 20.0 } else { 100.0 });
    let storm_logins = if q { 10 } else { (storm_rate * duration).ceil() as u64 };
    Opts {
        duration: Duration::from_secs_f64(duration),
        duration_secs: duration,
        seq_posts: pick(args.seq_posts, 50, 1_000_000),
        posts: pick(args.posts, 640, 10_000_000),
        clients: picku(args.clients, 64, 64),
        fanout_posts: pick(args.fanout_posts, 60, 1_000_000),
        posters: picku(args.posters, 3, 10),
        subscribers: picku(args.subscribers, 10, 100),
        post_rate: args.post_rate.filter(|r| *r > 0.0),
        storm_rate,
        storm_logins,
        storm_users: if q { 2 } else { 10 },
        // Enough clients for two seconds of logins in flight.
        storm_pool: ((storm_rate * 2.0).ceil() as usize).clamp(8, 1024),
        sessions: picku(args.sessions, 200, 100_000),
        sessions_per_user: picku(args.sessions_per_user, 10, 10),
        ping_interval_secs: args.ping_interval.unwrap_or(if q { 0.5 } else { 5.0 }),
        idle_hold_secs: args.hold.unwrap_or(if q { 1.0 } else { duration }),
        text_bytes: args.text_bytes.clamp(21, 1000),
        drain: Duration::from_secs(if q { 10 } else { 5 }),
        setup_window: args.setup_window,
        readers: picku(args.readers, 200, 10_000),
        read_count: args.read_count.max(1),
        read_window: args.read_window.max(1),
    }
}

fn run(args: &Args) -> Result<bool, String> {
    let o = opts(args);
    let workloads = match &args.workloads {
        Some(w) => w.clone(),
        None if args.storage == Storage::Sqlite && args.server.is_none() => vec![1, 2, 3, 4, 5, 6],
        None => vec![1, 2, 3, 4, 5],
    };
    for w in &workloads {
        if !(1..=6).contains(w) {
            return Err(format!("no workload {w}: choose among 1,2,3,4,5,6"));
        }
        if *w == 6 && args.server.is_some() {
            return Err(
                "workload 6 starts its own daemon on a dataset: leave out --server or workload 6".into()
            );
        }
    }
    let daemon_exe = match &args.daemon {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find myself: {e}"))?
            .with_file_name(format!("udpmsgd{}", std::env::consts::EXE_SUFFIX)),
    };
    if args.server.is_none() && !daemon_exe.exists() {
        return Err(format!("{} not found: give --daemon PATH or --server ADDR", daemon_exe.display()));
    }
    let storm_argon2 = args.storm_argon2.unwrap_or(if args.quick { Argon2::Cheap } else { Argon2::Default });
    let storage = match args.storage {
        Storage::Sqlite => "sqlite",
        Storage::Memory => "memory",
        Storage::Postgres => "postgres",
    };
    if args.nodes == 0 || (args.nodes > 1 && args.storage != Storage::Postgres) {
        return Err("--nodes N needs N >= 1, and more than one only with --storage postgres".into());
    }
    if args.storage != Storage::Sqlite && workloads.contains(&6) {
        return Err(format!(
            "workload 6 restarts a daemon on a populated SQLite dataset to read it cold: leave it out with --storage {storage}"
        ));
    }
    // One PostgreSQL for the run, durable as in production; a database per workload.
    let pg = match (args.storage, args.server) {
        (Storage::Postgres, None) => {
            log("starting PostgreSQL ...");
            Some(pg_temp::TempPg::start("bench", true)?)
        }
        _ => None,
    };
    let base = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = WorkDir::new(&base, args.keep_data)?;
    let salt = u64::from(rand_u16());
    let t0 = Instant::now();

    let ceiling = if args.no_ceiling {
        Ceiling { sequential: None, concurrent: None, error: None }
    } else {
        measure_ceiling(&o, args.quick)
    };

    let mut results = Vec::new();
    let ids: &[u32] = if args.ceiling_only { &[] } else { &workloads };
    for &id in ids {
        if interrupted() {
            return Err("interrupted".into());
        }
        log(&format!("workload {id} ({}) ...", workloads::name_of(id)));
        let mut extra = Vec::new();
        if let Some(pg) = &pg {
            let db = format!("w{id}");
            pg.create_db(&db)?;
            extra.push(("postgres_url".to_string(), format!("\"{}\"", pg.url(&db))));
        }
        let spec = DaemonSpec {
            exe: daemon_exe.clone(),
            dir: work.path.join(format!("w{id}")),
            storage: storage.to_string(),
            cheap_argon2: !(id == 4 && storm_argon2 == Argon2::Default),
            max_sessions: o.sessions as u64 + 10_000,
            log_filter: args.daemon_log.clone(),
            extra,
        };
        let r = run_one(id, args, &spec, &o, salt.wrapping_add(u64::from(id)), t0);
        let mut r = r.unwrap_or_else(|e| WorkloadResult::failed(id, e));
        add_ratios(&mut r, &ceiling);
        if let Some(e) = &r.error {
            log(&format!("workload {id} failed: {e}"));
        } else {
            log(&format!("workload {id}: {} {} over {:.2} s", fmt_rate(r.throughput), r.unit, r.seconds));
        }
        results.push(r);
    }
    let ok = results.iter().all(|r| r.ok);
    let report = Report {
        bench_version: env!("CARGO_PKG_VERSION"),
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        storage: storage.into(),
        external_server: args.server.map(|s| s.to_string()),
        workload4_argon2: match (args.server, storm_argon2) {
            (Some(_), _) => "the running daemon's".into(),
            (None, Argon2::Default) => "default (19456 KiB, 2 iterations)".into(),
            (None, Argon2::Cheap) => "cheap (64 KiB, 1 iteration)".into(),
        },
        quick: args.quick,
        options: o,
        ceiling,
        workloads: results,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        print_table(&report);
    }
    Ok(ok)
}

fn run_one(
    id: u32,
    args: &Args,
    spec: &DaemonSpec,
    o: &Opts,
    salt: u64,
    t0: Instant,
) -> Result<WorkloadResult, String> {
    if id == 6 {
        return run_reads(args, spec, o, salt, t0);
    }
    // Several nodes: the first is measured (its stats, CPU, RSS); the others are stopped after.
    let mut others = Vec::new();
    let daemon = match args.server {
        Some(_) => None,
        None if args.nodes > 1 => {
            let node = |k: usize| {
                let mut s = spec.clone();
                s.dir = spec.dir.join(format!("node{k}"));
                s.extra.push(("node_name".to_string(), format!("\"bench-{k}\"")));
                s
            };
            let first = Daemon::start(&node(1))?;
            for k in 2..=args.nodes {
                others.push(Daemon::start(&node(k))?);
            }
            Some(first)
        }
        None => Some(Daemon::start(spec)?),
    };
    let server = match (&daemon, args.server) {
        (Some(d), _) => d.addr,
        (None, Some(s)) => s,
        (None, None) => unreachable!("one of them"),
    };
    let servers: Vec<SocketAddr> = std::iter::once(server).chain(others.iter().map(|d| d.addr)).collect();
    let ctx = Ctx {
        server,
        servers,
        daemon_pid: daemon.as_ref().map(|d| d.pid).or(args.daemon_pid),
        salt,
        opts: o.clone(),
        t0,
        hooks: (args.hook_start.clone(), args.hook_end.clone()),
    };
    let snmp_before = udp_snmp();
    let result = match id {
        1 => workloads::posting(&ctx, 1, 1, o.seq_posts),
        2 => workloads::posting(&ctx, 2, o.clients, o.posts),
        3 => workloads::fanout(&ctx, 3, false),
        4 => workloads::fanout(&ctx, 4, true),
        5 => workloads::idle(&ctx, 5),
        _ => unreachable!("checked"),
    };
    for d in others {
        d.stop();
    }
    let stats = daemon.map(|d| {
        let rss = d.rss_kib();
        let drops = daemon::socket_drops(d.addr);
        let mut s = d.stop();
        s.summary.insert("rss_kib_at_end".into(), rss.map_or("?".into(), |r| r.to_string()));
        s.socket_drops = drops;
        s
    });
    let mut r = result?;
    r.daemon = stats;
    if let (Some(a), Some(b)) = (snmp_before, udp_snmp()) {
        // System-wide counters: on a quiet machine, this run's.
        r.details.insert("kernel_udp_rcvbuf_errors".into(), serde_json::json!(b.0.saturating_sub(a.0)));
        r.details.insert("kernel_udp_sndbuf_errors".into(), serde_json::json!(b.1.saturating_sub(a.1)));
    }
    Ok(r)
}

fn run_reads(
    args: &Args,
    spec: &DaemonSpec,
    o: &Opts,
    salt: u64,
    t0: Instant,
) -> Result<WorkloadResult, String> {
    let source = match &args.dataset {
        Some(dir) => reads::Source::Copy(dir),
        None => reads::Source::Make(populate::Dataset {
            prefix: "pop".into(),
            accounts: if args.quick { 300 } else { 10_000 },
            messages: if args.quick { 3_000 } else { 100_000 },
            recipients: 10,
            text_bytes: 200,
        }),
    };
    let ctx_of = |d: &Daemon| Ctx {
        server: d.addr,
        servers: vec![d.addr],
        daemon_pid: Some(d.pid),
        salt,
        opts: o.clone(),
        t0,
        hooks: (args.hook_start.clone(), args.hook_end.clone()),
    };
    let snmp_before = udp_snmp();
    let (mut r, stats) = reads::inbox_reads(ctx_of, 6, spec, source, o.read_window)?;
    r.daemon = Some(stats);
    if let (Some(a), Some(b)) = (snmp_before, udp_snmp()) {
        r.details.insert("kernel_udp_rcvbuf_errors".into(), serde_json::json!(b.0.saturating_sub(a.0)));
        r.details.insert("kernel_udp_sndbuf_errors".into(), serde_json::json!(b.1.saturating_sub(a.1)));
    }
    Ok(r)
}

/// `RcvbufErrors` and `SndbufErrors` of /proc/net/snmp: datagrams the kernel dropped because a
/// socket's buffer was full.
fn udp_snmp() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |k: &str| names.iter().position(|n| *n == k).and_then(|i| values.get(i)?.parse().ok());
    Some((get("RcvbufErrors")?, get("SndbufErrors")?))
}

fn measure_ceiling(o: &Opts, quick: bool) -> Ceiling {
    log("ceiling: bare UDP echo between two processes ...");
    let limit = Duration::from_secs_f64(o.duration_secs.min(5.0));
    let go = || -> Result<(echo::EchoResult, echo::EchoResult), String> {
        let server = echo::EchoServer::start()?;
        let cpu = daemon::CpuMeter::start(Some(server.pid()));
        let mut seq =
            echo::measure(server.addr, 1, o.text_bytes, if quick { 300 } else { 1_000_000 }, limit)?;
        seq.cpu = cpu.stop();
        let cpu = daemon::CpuMeter::start(Some(server.pid()));
        let mut conc =
            echo::measure(server.addr, 32, o.text_bytes, if quick { 3_000 } else { 10_000_000 }, limit)?;
        conc.cpu = cpu.stop();
        Ok((seq, conc))
    };
    match go() {
        Ok((s, c)) => {
            log(&format!(
                "ceiling: sequential {} round trips/s (p99 {}), 32 in flight {} round trips/s (p99 {})",
                fmt_rate(s.throughput),
                fmt_us(s.latency.p99_us),
                fmt_rate(c.throughput),
                fmt_us(c.latency.p99_us)
            ));
            Ceiling { sequential: Some(s), concurrent: Some(c), error: None }
        }
        Err(e) => {
            log(&format!("ceiling failed: {e}"));
            Ceiling { sequential: None, concurrent: None, error: Some(e) }
        }
    }
}

fn add_ratios(r: &mut WorkloadResult, c: &Ceiling) {
    if !r.ok {
        return;
    }
    let base = match r.ceiling {
        "sequential" => c.sequential.as_ref(),
        _ => c.concurrent.as_ref(),
    };
    if let Some(b) = base {
        if b.throughput > 0.0 {
            r.ratio_throughput = Some(r.throughput / b.throughput);
        }
        if b.latency.p99_us > 0.0 && r.latency.count > 0 {
            r.ratio_p99 = Some(r.latency.p99_us / b.latency.p99_us);
        }
    }
}

fn rand_u16() -> u16 {
    use rand::RngExt;
    rand::rng().random_range(0..=u16::MAX)
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        kernel,
        date_utc: utc_now(),
        build_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` without a date library (civil-from-days, H. Hinnant).
fn utc_now() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

fn print_table(rep: &Report) {
    let m = &rep.machine;
    println!(
        "udpmsg-bench {} | {} build | {} x {} | kernel {} | {} | storage {}{}",
        rep.bench_version,
        m.build_profile,
        m.nproc,
        m.cpu,
        m.kernel,
        m.date_utc,
        rep.storage,
        rep.external_server.as_ref().map_or(String::new(), |s| format!(" (running daemon at {s})"))
    );
    println!();
    println!(
        "{:<28} {:>6} {:>17} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "workload",
        "bound",
        "done/requested",
        "rate",
        "p50",
        "p99",
        "p99.9",
        "rate/ceil",
        "p99/ceil",
        "commits",
        "mean_b",
        "max_b"
    );
    let echo_row = |name: &str, e: &echo::EchoResult| {
        println!(
            "{:<28} {:>6} {:>17} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
            name,
            "",
            format!("{}/{}", e.echoed, e.requested.min(e.echoed + e.lost)),
            fmt_rate(e.throughput),
            fmt_us(e.latency.p50_us),
            fmt_us(e.latency.p99_us),
            fmt_us(e.latency.p999_us),
            "1.00x",
            "1.00x",
            "",
            "",
            ""
        );
    };
    if let Some(e) = &rep.ceiling.sequential {
        echo_row("ceiling: echo, sequential", e);
    }
    if let Some(e) = &rep.ceiling.concurrent {
        echo_row("ceiling: echo, 32 in flight", e);
    }
    let other: Vec<f64> = [&rep.ceiling.sequential, &rep.ceiling.concurrent]
        .iter()
        .filter_map(|e| e.as_ref()?.cpu.other_cores)
        .chain(rep.workloads.iter().filter_map(|w| w.details.get("cpu_other_cores")?.as_f64()))
        .collect();
    let busiest = other.iter().copied().fold(0.0, f64::max);
    for r in &rep.workloads {
        let label = format!("{} {}", r.id, r.name);
        if !r.ok {
            println!("{label:<28} FAILED: {}", r.error.as_deref().unwrap_or("?"));
            continue;
        }
        let d = r.daemon.as_ref();
        println!(
            "{:<28} {:>6} {:>17} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>6}",
            label,
            r.bound,
            format!("{}/{}", r.completed, r.requested),
            fmt_rate(r.throughput),
            fmt_us(r.latency.p50_us),
            fmt_us(r.latency.p99_us),
            fmt_us(r.latency.p999_us),
            fmt_ratio(r.ratio_throughput),
            fmt_ratio(r.ratio_p99),
            d.and_then(|d| d.commits).map_or("-".into(), |v| v.to_string()),
            d.and_then(|d| d.mean_batch).map_or("-".into(), |v| format!("{v:.1}")),
            d.and_then(|d| d.max_batch).map_or("-".into(), |v| v.to_string()),
        );
    }
    println!();
    if busiest > 0.2 {
        println!(
            "NOTE: other processes used up to {busiest:.2} cores during a measurement: these figures are not from a quiet machine."
        );
    }
    for r in rep.workloads.iter().filter(|r| r.ok) {
        let d = &r.details;
        let lat = |k: &str| -> String {
            d.get(k)
                .and_then(|v| {
                    Some((
                        v.get("p50_us")?.as_f64()?,
                        v.get("p99_us")?.as_f64()?,
                        v.get("p999_us")?.as_f64()?,
                    ))
                })
                .map_or("-".into(), |(a, b, c)| {
                    format!("p50 {} p99 {} p99.9 {}", fmt_us(a), fmt_us(b), fmt_us(c))
                })
        };
        let num = |k: &str| d.get(k).map_or("-".into(), |v| v.to_string());
        match r.id {
            1 | 2 => println!(
                "{}: {} client(s), latency = {}, {} unanswered, errors {}",
                r.id,
                num("clients"),
                r.latency_of,
                num("unanswered"),
                num("errors")
            ),
            3 | 4 => {
                println!(
                    "{}: {} posts acked ({:.0}/s), post to ack {}; pushes delivered {} of {} expected",
                    r.id,
                    num("posts_acked"),
                    d.get("posts_per_sec").and_then(|v| v.as_f64()).unwrap_or(0.0),
                    lat("post_ack_latency"),
                    num("pushes_delivered"),
                    num("pushes_expected")
                );
                if let Some(s) = d.get("storm") {
                    let l = s.get("login_latency");
                    let q = |k: &str| l.and_then(|l| l.get(k)).and_then(|v| v.as_f64()).map_or("-".into(), fmt_us);
                    println!(
                        "   login storm: {} attempted, {} logged in ({:.1}/s), refused {}, skipped (pool busy) {}; login p50 {} p99 {}",
                        s["attempted"],
                        s["logged_in"],
                        s["logins_per_sec"].as_f64().unwrap_or(0.0),
                        s["refused"],
                        s["skipped_pool_busy"],
                        q("p50_us"),
                        q("p99_us")
                    );
                }
            }
            5 => println!(
                "5: {} sessions ({} users) logged in in {:.1} s, login {}; daemon RSS {} -> {} KiB = {} bytes/session (after the hold: {} KiB, {} bytes/session)",
                num("sessions"),
                num("users"),
                d.get("login_seconds").and_then(|v| v.as_f64()).unwrap_or(0.0),
                lat("login_latency"),
                num("rss_kib_before_logins"),
                num("rss_kib_after_logins"),
                d.get("rss_bytes_per_session").and_then(|v| v.as_f64()).map_or("-".into(), |v| format!("{v:.0}")),
                num("rss_kib_after_hold"),
                d.get("rss_bytes_per_session_after_hold").and_then(|v| v.as_f64()).map_or("-".into(), |v| format!("{v:.0}")),
            ),
            _ => {}
        }
        if let Some(ds) = &r.daemon {
            if ds.warnings + ds.errors > 0 {
                println!(
                    "   daemon logged {} warning(s), {} error(s), e.g. {:?}",
                    ds.warnings,
                    ds.errors,
                    ds.sample_warnings.first()
                );
            }
        }
        let cores = |k: &str| d.get(k).and_then(|v| v.as_f64()).map_or("?".into(), |v| format!("{v:.2}"));
        println!(
            "   CPU during the measured phase: bench {} cores, daemon {}, softirq {}, other processes {}, steal {} (of {})",
            cores("cpu_bench_cores"),
            cores("cpu_daemon_cores"),
            cores("cpu_irq_cores"),
            cores("cpu_other_cores"),
            cores("cpu_steal_cores"),
            rep.machine.nproc
        );
        let drops = d.get("kernel_udp_rcvbuf_errors").and_then(|v| v.as_u64()).unwrap_or(0);
        if drops > 0 {
            let at_daemon = r.daemon.as_ref().and_then(|d| d.socket_drops);
            println!(
                "   kernel: {drops} UDP datagrams dropped on full receive buffers during this workload, {} of them at the daemon's socket",
                at_daemon.map_or("?".into(), |v| v.to_string())
            );
        }
        if let Some(ds) = &r.daemon {
            let get = |k: &str| ds.summary.get(k).map_or("?", |v| v.as_str());
            if get("retransmitted") != "0" || get("send_drops") != "0" {
                println!(
                    "   daemon: {} datagrams in, {} pushes sent, {} retransmitted, {} send drops",
                    get("datagrams_in"),
                    get("pushes_sent"),
                    get("retransmitted"),
                    get("send_drops")
                );
            }
        }
        if r.net.send_drops + r.net.unroutable > 0 {
            println!(
                "   bench side: {} send drops, {} unroutable datagrams",
                r.net.send_drops, r.net.unroutable
            );
        }
    }
}
