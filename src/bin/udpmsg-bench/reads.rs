//! Workload 6: inbox reads from a store larger than the daemon's cache.
//!
//! The daemon starts on a populated data directory (`--dataset DIR`, made by `udpmsg-bench
//! populate`, copied so the original stays as it was; without one the bench populates a
//! smaller one itself). The time from spawn to `listening on` is the start-up figure: the
//! daemon must not load the store into memory to serve it. Then `readers` randomly chosen
//! accounts log in (on shared sockets, as many users behind few addresses), and each retrieves
//! its `read_count` newest messages twice: the cold round reads every inbox from disk, the warm
//! round from the cache, as far as it holds them. Every answer is checked against what the
//! dataset put in that inbox. RSS is read after each step.

use crate::daemon::{log, rss_kib, CpuMeter, Daemon, DaemonSpec, DaemonStats};
use crate::hist::Latency;
use crate::populate::{self, Dataset};
use crate::script::Script;
use crate::sim::Sim;
use crate::workloads::{base, cpu_details, login, Ctx, WorkloadResult};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use udpmsg::client::Done;
use udpmsg::command::Command;
use udpmsg::config::ClientConfig;

/// Where the dataset comes from.
pub enum Source<'a> {
    /// A directory made by `udpmsg-bench populate --data-dir`.
    Copy(&'a Path),
    /// Populate this one first.
    Make(Dataset),
}

/// One round of reads: its figures.
struct Round {
    seconds: f64,
    ok: u64,
    wrong: u64,
    failed: u64,
    messages: u64,
    latency: Latency,
    rss_kib: Option<u64>,
    failures: Vec<String>,
}

/// Runs workload 6 with its own daemon (started from `spec`, whose `dir` must not exist yet).
pub fn inbox_reads(
    ctx_of: impl Fn(&Daemon) -> Ctx,
    id: u32,
    spec: &DaemonSpec,
    source: Source,
    window: usize,
) -> Result<(WorkloadResult, DaemonStats), String> {
    let data = spec.dir.join("data");
    let (dataset, made_in) = match source {
        Source::Copy(dir) => {
            let manifest = dir.join("populate.json");
            let text = std::fs::read_to_string(&manifest).map_err(|e| {
                format!("{}: {e} (make it with `udpmsg-bench populate --data-dir`)", manifest.display())
            })?;
            let d: Dataset =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", manifest.display()))?;
            let t = Instant::now();
            let bytes = copy_dir(&dir.join("data"), &data)?;
            log(&format!(
                "workload {id}: copied {:.0} MB of data from {} in {:.1} s",
                bytes as f64 / 1e6,
                dir.display(),
                t.elapsed().as_secs_f64()
            ));
            (d, None)
        }
        Source::Make(d) => {
            let t = Instant::now();
            let filling = DaemonSpec { extra: crate::filling_keys(), ..spec.clone() };
            let daemon = Daemon::start(&filling)?;
            let result = populate::populate(daemon.addr, &d, window.min(128), 0);
            daemon.stop();
            result?;
            (d, Some(t.elapsed().as_secs_f64()))
        }
    };

    // Catch-up would read every inbox at login, warming the cache before the cold round.
    let spec = DaemonSpec { extra: crate::filling_keys(), ..spec.clone() };
    let t_start = Instant::now();
    let daemon = Daemon::start(&spec)?;
    let start_seconds = t_start.elapsed().as_secs_f64();
    let rss_started = daemon.rss_kib();
    log(&format!(
        "workload {id}: daemon on {} accounts, {} messages listening after {start_seconds:.2} s, RSS {} MB",
        dataset.accounts,
        dataset.messages,
        rss_started.map_or("?".into(), |k| format!("{:.0}", k as f64 / 1024.0))
    ));
    let ctx = ctx_of(&daemon);
    let result = measure(&ctx, id, &dataset, window);
    let rss_end = daemon.rss_kib();
    let stats = daemon.stop();
    let mut r = result?;
    let d = &mut r.details;
    d.insert("dataset_accounts".into(), json!(dataset.accounts));
    d.insert("dataset_messages".into(), json!(dataset.messages));
    d.insert("dataset_recipients".into(), json!(dataset.recipients));
    d.insert("dataset_text_bytes".into(), json!(dataset.text_bytes));
    d.insert("dataset_populate_seconds".into(), json!(made_in));
    d.insert("database_bytes".into(), json!(dir_bytes(&data)));
    d.insert("start_seconds".into(), json!(start_seconds));
    d.insert("rss_kib_after_start".into(), json!(rss_started));
    d.insert("rss_kib_at_end".into(), json!(rss_end));
    Ok((r, stats))
}

fn measure(ctx: &Ctx, id: u32, d: &Dataset, window: usize) -> Result<WorkloadResult, String> {
    let o = &ctx.opts;
    let n = o.readers.min(d.accounts as usize).max(1);
    // Distinct random accounts: a partial Fisher-Yates shuffle, seeded by the run.
    let mut rng = ctx.salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut pick: Vec<u64> = (0..d.accounts).collect();
    for i in 0..n {
        let j = i + (next() % (d.accounts - i as u64)) as usize;
        pick.swap(i, j);
    }
    pick.truncate(n);

    let mut sim = ctx.sim_with(ClientConfig { ping_interval_secs: 86_400, ..ClientConfig::default() })?;
    let now = Instant::now();
    let socks = n.div_ceil(1024).clamp(1, 64);
    let mut sock_ids = Vec::new();
    for _ in 0..socks {
        sock_ids.push(sim.add_socket().map_err(|e| e.to_string())?);
    }
    let clients: Vec<usize> = (0..n).map(|k| sim.add_client(sock_ids[k % socks], now)).collect();
    let t = Instant::now();
    let limit = Duration::from_secs(120) + Duration::from_millis(10 * n as u64);
    let work = clients.iter().zip(&pick).map(|(&c, &a)| (c, vec![login(&d.name(a))])).collect();
    let logins = crate::workloads::setup(&mut sim, "log in", work, o.setup_window, limit)?;
    let login_secs = t.elapsed().as_secs_f64();
    let rss_logged_in = ctx.daemon_pid.and_then(rss_kib);
    log(&format!("workload {id}: {n} accounts logged in in {login_secs:.1} s"));

    let expected: Vec<u64> =
        pick.iter().map(|&a| expected_inbox(d, a).min(u64::from(o.read_count))).collect();
    ctx.hook(&ctx.hooks.0);
    let cpu = CpuMeter::start(ctx.daemon_pid);
    let cold = round(ctx, &mut sim, &clients, &expected, window, limit)?;
    let cpu_cold = cpu.stop();
    log(&format!(
        "workload {id}: cold round: {:.0} reads/s, p50 {:.2} ms, p99 {:.2} ms",
        cold.ok as f64 / cold.seconds,
        cold.latency.p50_us / 1000.0,
        cold.latency.p99_us / 1000.0
    ));
    let cpu = CpuMeter::start(ctx.daemon_pid);
    let warm = round(ctx, &mut sim, &clients, &expected, window, limit)?;
    let cpu_warm = cpu.stop();
    ctx.hook(&ctx.hooks.1);
    log(&format!(
        "workload {id}: warm round: {:.0} reads/s, p50 {:.2} ms, p99 {:.2} ms",
        warm.ok as f64 / warm.seconds,
        warm.latency.p50_us / 1000.0,
        warm.latency.p99_us / 1000.0
    ));

    let mut r = base(id, &sim, t.elapsed().as_secs_f64() - cold.seconds - warm.seconds);
    r.bound = "count";
    r.requested = n as u64;
    r.completed = cold.ok;
    r.failed = cold.failed + cold.wrong;
    r.unit = "reads/s";
    r.seconds = cold.seconds;
    r.throughput = cold.ok as f64 / cold.seconds;
    r.latency_of = "retrieve to answer, cold";
    r.latency = cold.latency;
    r.ceiling = "concurrent";
    cpu_details(&mut r, cpu_cold);
    if cold.wrong + warm.wrong + cold.failed + warm.failed > 0 {
        r.ok = false;
        let mut f = cold.failures.clone();
        f.extend(warm.failures.iter().cloned());
        r.error = Some(format!(
            "{} wrong and {} failed reads, e.g. {}",
            cold.wrong + warm.wrong,
            cold.failed + warm.failed,
            f.join("; ")
        ));
    }
    let dt = &mut r.details;
    dt.insert("readers".into(), json!(n));
    dt.insert("sockets".into(), json!(socks));
    dt.insert("read_count".into(), json!(o.read_count));
    dt.insert("window".into(), json!(window));
    dt.insert("login_seconds".into(), json!(login_secs));
    dt.insert("logins_per_sec".into(), json!(n as f64 / login_secs.max(1e-9)));
    dt.insert("login_latency".into(), json!(logins.hist.summary()));
    dt.insert("rss_kib_after_logins".into(), json!(rss_logged_in));
    for (name, rd, cpu) in [("cold", &cold, cpu_cold), ("warm", &warm, cpu_warm)] {
        dt.insert(
            name.into(),
            json!({
                "seconds": rd.seconds,
                "reads": rd.ok,
                "reads_per_sec": rd.ok as f64 / rd.seconds,
                "messages": rd.messages,
                "wrong": rd.wrong,
                "failed": rd.failed,
                "latency": rd.latency,
                "rss_kib_after": rd.rss_kib,
                "cpu_daemon_cores": cpu.daemon_cores,
            }),
        );
    }
    Ok(r)
}

/// Messages in account `a`'s inbox: the posts of the accounts it follows.
fn expected_inbox(d: &Dataset, a: u64) -> u64 {
    let r = d.recipients.min(d.accounts.saturating_sub(1));
    (1..=r).map(|s| d.posts_of((a + s) % d.accounts)).sum()
}

/// Every client retrieves once, `window` at a time; answers are checked against `expected`.
fn round(
    ctx: &Ctx,
    sim: &mut Sim,
    clients: &[usize],
    expected: &[u64],
    window: usize,
    limit: Duration,
) -> Result<Round, String> {
    let count = ctx.opts.read_count;
    let work = clients.iter().map(|&c| (c, vec![Command::Retrieve { count }])).collect();
    let mut script = Script::new(sim.clients.len(), work, window);
    let t = Instant::now();
    let finished = sim.run(&mut script, t + limit).map_err(|e| e.to_string())?;
    let seconds = t.elapsed().as_secs_f64().max(1e-9);
    if !finished {
        return Err(format!("{} reads unanswered after {limit:?}", script.unfinished()));
    }
    let mut wrong = 0;
    let mut messages = 0;
    let mut failures = script.failures.clone();
    for (k, &c) in clients.iter().enumerate() {
        match &script.answers[c] {
            Some(Done::Messages(m)) => {
                messages += m.len() as u64;
                let ordered = m.windows(2).all(|w| w[0].id < w[1].id);
                if m.len() as u64 != expected[k] || !ordered {
                    wrong += 1;
                    if failures.len() < 10 {
                        failures.push(format!(
                            "client {c}: {} messages (ordered: {ordered}), expected {}",
                            m.len(),
                            expected[k]
                        ));
                    }
                }
            }
            Some(other) => {
                wrong += 1;
                failures.push(format!("client {c}: answered {other:?}"));
            }
            None => {}
        }
    }
    Ok(Round {
        seconds,
        ok: script.ok - wrong,
        wrong,
        failed: script.failed,
        messages,
        latency: script.hist.summary(),
        rss_kib: ctx.daemon_pid.and_then(rss_kib),
        failures,
    })
}

/// Copies the files of `from` (not its lock) into `to`, which must not exist; returns bytes.
fn copy_dir(from: &Path, to: &Path) -> Result<u64, String> {
    if to.exists() {
        return Err(format!("{} exists already", to.display()));
    }
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        if !entry.file_type().map_err(|e| e.to_string())?.is_file()
            || name.to_string_lossy().ends_with(".lock")
        {
            continue;
        }
        bytes += std::fs::copy(entry.path(), to.join(&name))
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
    }
    Ok(bytes)
}

fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).ok()? {
        total += e.ok()?.metadata().ok()?.len();
    }
    Some(total)
}
