//! Starting, measuring and stopping the real `udpmsgd`.
//!
//! The bench writes a `server.toml` into a fresh directory, starts
//! `udpmsgd --config DIR/server.toml --listen 127.0.0.1:0 --data-dir DIR/data`, reads the
//! `listening on ADDR` line from its stdout, and at the end sends SIGTERM and parses the
//! `stopped: ... commits=N ... mean_batch=X max_batch=M ...` summary from its stderr.
//!
//! Some tuning keys only exist in some daemon versions (the abuse limits, for instance). They
//! are written as "optional": when the daemon refuses the file naming one of them as an unknown
//! field, the key is dropped and the daemon started again, so the bench works against older and
//! newer daemons alike.

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What the daemon is started with.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub storage: String,
    /// Cheap argon2 (64 KiB, 1 iteration) instead of the daemon's defaults.
    pub cheap_argon2: bool,
    pub max_sessions: u64,
    /// `RUST_LOG` for the daemon. The summary line is logged by the `udpmsgd` target at info.
    pub log_filter: String,
    /// More settings (key, TOML value), e.g. `catch_up_max = 0` for filling a database.
    pub extra: Vec<(String, String)>,
}

/// Keys every daemon version knows.
fn required_keys(spec: &DaemonSpec) -> Vec<(String, String)> {
    let mut keys = vec![
        ("storage".to_string(), format!("\"{}\"", spec.storage)),
        ("max_sessions".to_string(), spec.max_sessions.max(250_000).to_string()),
        ("max_sessions_per_user".to_string(), "1024".to_string()),
        // Summary only at exit: the bench reads that one.
        ("stats_log_interval_secs".to_string(), "0".to_string()),
        // Setup and storms keep many password jobs queued.
        ("password_queue".to_string(), "4096".to_string()),
    ];
    if spec.cheap_argon2 {
        keys.push(("argon2_memory_kib".to_string(), "64".to_string()));
        keys.push(("argon2_iterations".to_string(), "1".to_string()));
    }
    keys.extend(spec.extra.iter().cloned());
    keys
}

/// Keys of newer daemons: all bench traffic comes from 127.0.0.1 and one session posts far
/// more than a human would, so the abuse limits are lifted (a limited run would measure the
/// limiter, not the daemon).
fn optional_keys() -> Vec<(String, String)> {
    [
        ("login_failures_per_address_burst", "1000000"),
        ("login_failures_per_address_refill_secs", "0"),
        ("login_failures_per_user_burst", "10000"),
        ("login_failures_per_user_refill_secs", "0"),
        ("registrations_per_address_burst", "10000000"),
        ("registrations_per_address_refill_secs", "0"),
        ("session_requests_per_sec", "1000000"),
        ("login_failures_per_account_burst", "1000000"),
        ("login_failures_per_account_refill_secs", "0"),
        ("deliveries_per_user_per_sec", "100000000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Optional keys a daemon of this run refused: not offered again.
static REFUSED: OnceLock<Mutex<Vec<String>>> = OnceLock::new();

/// Counters from the daemon's `stopped:` line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonStats {
    pub commits: Option<u64>,
    pub mean_batch: Option<f64>,
    pub max_batch: Option<u64>,
    /// Every `key=value` of the summary line, as logged.
    pub summary: BTreeMap<String, String>,
    pub warnings: u64,
    pub errors: u64,
    /// A few of the warning and error lines, for the report.
    pub sample_warnings: Vec<String>,
    /// The `server.toml` the bench wrote.
    pub config: String,
    /// Datagrams the kernel dropped at the daemon's socket (its receive buffer was full).
    pub socket_drops: Option<u64>,
}

pub fn parse_summary(line: &str) -> Option<BTreeMap<String, String>> {
    let at = line.find("stopped:").or_else(|| line.find("stats:"))?;
    let rest = &line[at..];
    let rest = &rest[rest.find(':')? + 1..];
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[derive(Default)]
struct StderrState {
    /// Lines before `listening on` (start-up errors), bounded.
    early: Vec<String>,
    summary: Option<String>,
    warnings: u64,
    errors: u64,
    samples: Vec<String>,
}

pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    stderr: Arc<Mutex<StderrState>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    /// The config actually used.
    pub config_text: String,
}

impl Daemon {
    /// Writes the config and starts the daemon; drops optional keys the daemon does not know.
    pub fn start(spec: &DaemonSpec) -> Result<Daemon, String> {
        std::fs::create_dir_all(&spec.dir).map_err(|e| format!("{}: {e}", spec.dir.display()))?;
        let mut optional = optional_keys();
        let refused = REFUSED.get_or_init(Default::default);
        optional.retain(|(k, _)| !refused.lock().expect("not poisoned").contains(k));
        // Each retry removes one key, so this ends.
        loop {
            let mut text = String::from("# written by udpmsg-bench\n");
            for (k, v) in required_keys(spec).iter().chain(optional.iter()) {
                text.push_str(&format!("{k} = {v}\n"));
            }
            match Self::try_start(spec, &text) {
                Ok(d) => return Ok(d),
                Err((_, Some(unknown))) if optional.iter().any(|(k, _)| *k == unknown) => {
                    log(&format!("this udpmsgd refuses the setting `{unknown}`; starting it without"));
                    optional.retain(|(k, _)| *k != unknown);
                    refused.lock().expect("not poisoned").push(unknown);
                }
                Err((msg, _)) => return Err(msg),
            }
        }
    }

    fn try_start(spec: &DaemonSpec, config: &str) -> Result<Daemon, (String, Option<String>)> {
        let cfg_path = spec.dir.join("server.toml");
        std::fs::write(&cfg_path, config).map_err(|e| (format!("{}: {e}", cfg_path.display()), None))?;
        let mut child = Command::new(&spec.exe)
            .arg("--config")
            .arg(&cfg_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(spec.dir.join("data"))
            .current_dir(&spec.dir)
            .env("RUST_LOG", &spec.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| (format!("cannot start {}: {e}", spec.exe.display()), None))?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let state = Arc::new(Mutex::new(StderrState::default()));
        let stderr = child.stderr.take().expect("piped");
        let st = state.clone();
        let stderr_thread = std::thread::spawn(move || {
            let mut listening = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut s = st.lock().expect("not poisoned");
                if line.contains(" ready (storage") {
                    listening = true;
                }
                if !listening && s.early.len() < 50 {
                    s.early.push(line.clone());
                }
                if line.contains("stopped:") {
                    s.summary = Some(line);
                } else if line.contains(" ERROR ") || line.starts_with("udpmsgd:") {
                    s.errors += 1;
                    if s.samples.len() < 10 {
                        s.samples.push(line);
                    }
                } else if line.contains(" WARN ") {
                    s.warnings += 1;
                    if s.samples.len() < 10 {
                        s.samples.push(line);
                    }
                }
            }
        });
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(a) => {
                    let addr: SocketAddr =
                        a.parse().map_err(|e| (format!("daemon printed a bad address {a:?}: {e}"), None))?;
                    return Ok(Daemon {
                        child,
                        addr,
                        pid,
                        stderr: state,
                        stderr_thread: Some(stderr_thread),
                        config_text: config.to_string(),
                    });
                }
                Err(e) if Instant::now() < end => {
                    // Disconnected: stdout closed, the daemon is exiting.
                    let status = if e == mpsc::RecvTimeoutError::Disconnected {
                        child.wait().ok()
                    } else {
                        child.try_wait().ok().flatten()
                    };
                    if let Some(status) = status {
                        let _ = stderr_thread.join();
                        let early = state.lock().expect("not poisoned").early.join("\n");
                        let unknown = unknown_field(&early);
                        return Err((format!("udpmsgd exited at start ({status}):\n{early}"), unknown));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(("udpmsgd did not print `listening on` within 30 s".into(), None));
                }
            }
        }
    }

    /// The daemon's resident set size in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid)
    }

    /// SIGTERM, wait (bounded), and collect the summary.
    pub fn stop(mut self) -> DaemonStats {
        terminate(self.pid);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    log("udpmsgd did not stop within 20 s of SIGTERM; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let s = self.stderr.lock().expect("not poisoned");
        let summary = s.summary.as_deref().and_then(parse_summary).unwrap_or_default();
        if s.summary.is_none() {
            log("udpmsgd printed no `stopped:` summary (is its log level below info?)");
        }
        DaemonStats {
            commits: summary.get("commits").and_then(|v| v.parse().ok()),
            mean_batch: summary.get("mean_batch").and_then(|v| v.parse().ok()),
            max_batch: summary.get("max_batch").and_then(|v| v.parse().ok()),
            summary,
            warnings: s.warnings,
            errors: s.errors,
            sample_warnings: s.samples.clone(),
            config: self.config_text.clone(),
            socket_drops: None,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only reached without `stop` (an error path): do not leave the daemon behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The key a config error is about: "unknown field `x`" (an older daemon) or
/// "invalid value 0 for `x`" (a daemon with another range).
fn unknown_field(text: &str) -> Option<String> {
    let at = ["unknown field `", "for `"].iter().find_map(|p| Some(text.find(p)? + p.len()))?;
    let rest = &text[at..];
    Some(rest[..rest.find('`')?].to_string())
}

/// Sends SIGTERM to our own child, by its pid.
pub fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The kernel's drop counter of the UDP socket bound to `addr` (from /proc/net/udp): datagrams
/// that arrived while its receive buffer was full.
pub fn socket_drops(addr: SocketAddr) -> Option<u64> {
    let (file, local) = match addr {
        SocketAddr::V4(a) => {
            ("/proc/net/udp", format!("{:08X}:{:04X}", u32::from_le_bytes(a.ip().octets()), a.port()))
        }
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let words: String = o
                .chunks(4)
                .map(|c| format!("{:08X}", u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            ("/proc/net/udp6", format!("{words}:{:04X}", a.port()))
        }
    };
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))?;
    line.split_whitespace().last()?.parse().ok()
}

/// CPU seconds (user + system, all threads) a process has used, from /proc/PID/stat.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // USER_HZ is 100 on every Linux ABI in use.
    Some((utime + stime) as f64 / 100.0)
}

/// Task (user + system), interrupt (irq + softirq: the network stack's receive path runs
/// there) and steal CPU seconds of the whole machine, from /proc/stat.
fn machine_cpu() -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let tasks = f.first()? + f.get(1)? + f.get(2)?;
    let irq = f.get(5)? + f.get(6)?;
    let steal = *f.get(7)?;
    Some((tasks as f64 / 100.0, irq as f64 / 100.0, steal as f64 / 100.0))
}

/// CPU used over a phase, in cores (CPU seconds per second): by the bench, by the daemon, and
/// by everything else on the machine (which should be close to 0 for a fair figure).
pub struct CpuMeter {
    start: std::time::Instant,
    bench: Option<f64>,
    daemon: Option<(u32, f64)>,
    machine: Option<(f64, f64, f64)>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    pub bench_cores: Option<f64>,
    pub daemon_cores: Option<f64>,
    /// CPU of every other process, in cores: should be about 0 for a fair figure.
    pub other_cores: Option<f64>,
    /// Interrupt and softirq time (mostly the loopback's packet delivery), in cores.
    pub irq_cores: Option<f64>,
    /// Time the hypervisor ran something else while we wanted the CPU.
    pub steal_cores: Option<f64>,
}

impl CpuMeter {
    pub fn start(daemon: Option<u32>) -> CpuMeter {
        CpuMeter {
            start: std::time::Instant::now(),
            bench: cpu_secs(std::process::id()),
            daemon: daemon.and_then(|p| Some((p, cpu_secs(p)?))),
            machine: machine_cpu(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let bench = self.bench.and_then(|b| Some((cpu_secs(std::process::id())? - b) / wall));
        let daemon = self.daemon.and_then(|(p, d)| Some((cpu_secs(p)? - d) / wall));
        let m = self.machine.and_then(|(t0, i0, s0)| {
            let (t1, i1, s1) = machine_cpu()?;
            Some(((t1 - t0) / wall, (i1 - i0) / wall, (s1 - s0) / wall))
        });
        let other = m.map(|(tasks, _, _)| (tasks - bench.unwrap_or(0.0) - daemon.unwrap_or(0.0)).max(0.0));
        CpuUse {
            bench_cores: bench,
            daemon_cores: daemon,
            other_cores: other,
            irq_cores: m.map(|(_, i, _)| i),
            steal_cores: m.map(|(_, _, s)| s),
        }
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn log(msg: &str) {
    eprintln!("udpmsg-bench: {msg}");
}

/// A fresh directory under `base`, removed on drop unless `keep`.
pub struct WorkDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl WorkDir {
    pub fn new(base: &Path, keep: bool) -> Result<WorkDir, String> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = base.join(format!("udpmsg-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            log(&format!("kept {}", self.path.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line() {
        let l = "[2025-01-01T00:00:00.000Z INFO  udpmsgd::event_loop] stopped: sessions=3 commits=12 \
                 mean_batch=4.5 max_batch=9 send_drops=0";
        let m = parse_summary(l).unwrap();
        assert_eq!(m["commits"], "12");
        assert_eq!(m["mean_batch"], "4.5");
        assert_eq!(m["sessions"], "3");
        assert_eq!(
            unknown_field("x.toml: unknown field `session_requests_per_sec`, expected `a`"),
            Some("session_requests_per_sec".into())
        );
        assert_eq!(
            unknown_field("x.toml: invalid value 0 for `y_secs`: allowed range is 1..=5"),
            Some("y_secs".into())
        );
    }
}
