//! Helpers for tests that run the real binaries on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

#[path = "../../src/bin/common/pg_temp.rs"]
pub mod pg_temp;
pub mod raw;
pub mod scenario;

pub fn bin(name: &str) -> PathBuf {
    match name {
        "udpmsgd" => PathBuf::from(env!("CARGO_BIN_EXE_udpmsgd")),
        "udpmsg" => PathBuf::from(env!("CARGO_BIN_EXE_udpmsg")),
        "udpmsg-proxy" => PathBuf::from(env!("CARGO_BIN_EXE_udpmsg-proxy")),
        other => panic!("unknown binary {other}"),
    }
}

/// A command for `program` (the daemon, or a wrapper around it) without any `UDPMSG_*`
/// environment variables: the daemon reads settings from them, and tests set theirs in files.
pub fn daemon_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let program = program.as_ref();
    let mut cmd = if program == "udpmsgd" { Command::new(bin("udpmsgd")) } else { Command::new(program) };
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("UDPMSG_")) {
        cmd.env_remove(k);
    }
    // `UDPMSG_TEST_CACHE_BYTES=0 cargo test` runs every daemon with nothing cached.
    if let Ok(bytes) = std::env::var("UDPMSG_TEST_CACHE_BYTES") {
        cmd.env("UDPMSG_CACHE_BYTES", bytes);
    }
    cmd
}

/// The storage the crash and fault suites run their daemons on: SQLite (the default) or, with
/// `UDPMSG_TEST_STORAGE=postgres`, a throwaway PostgreSQL of their own (see [`pg_temp`]). Keep
/// the value alive while the daemons run; `config` goes into their server.toml.
pub struct TestStorage {
    pub config: String,
    pub pg: Option<pg_temp::TempPg>,
}

impl TestStorage {
    pub fn from_env(tag: &str) -> TestStorage {
        match std::env::var("UDPMSG_TEST_STORAGE").as_deref() {
            Ok("postgres") => {
                let pg = pg_temp::TempPg::start(tag, false)
                    .unwrap_or_else(|e| panic!("UDPMSG_TEST_STORAGE=postgres, but: {e}"));
                pg.create_db("udpmsg").unwrap();
                let config = format!(
                    "storage = \"postgres\"\npostgres_url = \"{}\"\nnode_name = \"{tag}\"\n",
                    pg.url("udpmsg")
                );
                println!("storage: PostgreSQL ({})", pg.dir.display());
                TestStorage { config, pg: Some(pg) }
            }
            Ok("sqlite") | Err(_) => TestStorage { config: String::new(), pg: None },
            Ok(other) => panic!("UDPMSG_TEST_STORAGE={other}: sqlite or postgres"),
        }
    }
}

/// A fresh temporary directory (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("udpmsg-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines a child printed, collected by a thread so reads never block the test.
pub struct Lines {
    rx: Receiver<String>,
    pub seen: Vec<String>,
}

/// A client's line without the local time it puts before a message (`14:03 [bob] hi` and
/// `  2026-11-24 14:03 [bob] hi` become `[bob] hi` and `  [bob] hi`), so that tests about
/// messages do not depend on the clock; tests about times read the lines as printed.
pub fn untimed(line: &str) -> String {
    let rest = line.trim_start_matches(' ');
    let indent = &line[..line.len() - rest.len()];
    let shape = |s: &str, pattern: &str| {
        s.len() >= pattern.len()
            && s.bytes()
                .zip(pattern.bytes())
                .all(|(c, p)| if p == b'9' { c.is_ascii_digit() } else { c == p })
    };
    for pattern in ["99:99 [", "9999-99-99 99:99 ["] {
        if shape(rest, pattern) {
            return format!("{indent}{}", &rest[pattern.len() - 1..]);
        }
    }
    line.to_string()
}

impl Lines {
    pub fn new(r: impl Read + Send + 'static) -> Lines {
        Self::mapped(r, |l| l)
    }

    /// As [`Lines::new`], with message times taken out (see [`untimed`]).
    pub fn untimed(r: impl Read + Send + 'static) -> Lines {
        Self::mapped(r, |l| untimed(&l))
    }

    fn mapped(r: impl Read + Send + 'static, map: fn(String) -> String) -> Lines {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(map(line)).is_err() {
                    break;
                }
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    /// Waits up to `timeout` for a line satisfying `pred`; returns it.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Everything printed until the child closed the stream (or `timeout`).
    pub fn rest(&mut self, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        while let Ok(line) = self.rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

/// A running `udpmsgd`, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub stdout: Lines,
    pub stderr: Lines,
    pub dir: TempDir,
}

/// Settings for test daemons: cheap argon2, quick timers.
pub const FAST_CONFIG: &str =
    "argon2_memory_kib = 64\nargon2_iterations = 1\nregistrations_per_address_burst = 100000\n";

impl Daemon {
    /// Starts `udpmsgd --listen 127.0.0.1:0` with `config` as its server.toml, in a fresh
    /// directory, and waits for its `listening on` line.
    pub fn start(config: &str) -> Daemon {
        let dir = TempDir::new("daemon");
        Self::start_in(dir, config, &[])
    }

    pub fn start_in(dir: TempDir, config: &str, extra: &[&str]) -> Daemon {
        let cfg = dir.path().join("server.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut child = daemon_command("udpmsgd")
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn udpmsgd");
        let mut stdout = Lines::new(child.stdout.take().unwrap());
        let stderr = Lines::new(child.stderr.take().unwrap());
        let line = stdout
            .wait_for(Duration::from_secs(20), |l| l.starts_with("listening on "))
            .expect("udpmsgd printed its address");
        let addr = line["listening on ".len()..].parse().expect("an address");
        Daemon { child, addr, stdout, stderr, dir }
    }

    /// SIGTERM, then wait; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        unsafe_kill(self.child.id(), "TERM");
        wait_timeout(&mut self.child, Duration::from_secs(10)).is_some_and(|s| s.success())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > end {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Result of a one-shot client run.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// Runs `udpmsg --server ADDR` with `input` on stdin until it exits.
pub fn run_client(server: SocketAddr, args: &[&str], input: &str) -> Output {
    run_client_wrapped(&[], server, args, input)
}

/// As [`run_client`], under `wrapper` (e.g. `ip netns exec NS`).
pub fn run_client_wrapped(wrapper: &[&str], server: SocketAddr, args: &[&str], input: &str) -> Output {
    let mut c = LiveClient::start_wrapped(wrapper, server, args);
    c.stdin.as_mut().expect("stdin open").write_all(input.as_bytes()).unwrap();
    let code = c.finish();
    Output {
        code,
        stdout: c.stdout.rest(Duration::from_secs(5)),
        stderr: c.stderr.rest(Duration::from_secs(5)),
    }
}

/// A long-running client whose stdin stays open: feed it lines, read what it prints.
pub struct LiveClient {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl LiveClient {
    pub fn start(server: SocketAddr, args: &[&str]) -> LiveClient {
        Self::start_wrapped(&[], server, args)
    }

    /// Runs the client under `wrapper` (e.g. `ip netns exec NS`); its stdout without message
    /// times (see [`untimed`]).
    pub fn start_wrapped(wrapper: &[&str], server: SocketAddr, args: &[&str]) -> LiveClient {
        Self::spawn(wrapper, server, args, false)
    }

    /// As [`LiveClient::start_wrapped`], with its stdout exactly as printed.
    pub fn start_timed(wrapper: &[&str], server: SocketAddr, args: &[&str]) -> LiveClient {
        Self::spawn(wrapper, server, args, true)
    }

    fn spawn(wrapper: &[&str], server: SocketAddr, args: &[&str], timed: bool) -> LiveClient {
        let (program, pre) = match wrapper.split_first() {
            Some((p, rest)) => (PathBuf::from(p), rest.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            None => (bin("udpmsg"), Vec::new()),
        };
        let mut cmd = Command::new(program);
        cmd.args(&pre);
        if !wrapper.is_empty() {
            cmd.arg(bin("udpmsg"));
        }
        let mut child = cmd
            .arg("--server")
            .arg(server.to_string())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn udpmsg");
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let stdout = if timed { Lines::new(out) } else { Lines::untimed(out) };
        let stderr = Lines::new(child.stderr.take().unwrap());
        LiveClient { child, stdin, stdout, stderr }
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin and waits for the exit status.
    pub fn finish(&mut self) -> Option<i32> {
        self.stdin = None;
        let s = wait_timeout(&mut self.child, Duration::from_secs(120));
        s.and_then(|s| s.code())
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `udpmsgd` on a data directory the caller owns, so that it can be killed and started again
/// on the same directory (and port): `udpmsgd --config CONFIG --listen LISTEN --data-dir DATA`.
/// Killed (SIGKILL) on drop.
pub struct DaemonProcess {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl DaemonProcess {
    /// Starts it without waiting for anything.
    pub fn spawn(config: &Path, listen: &str, data_dir: &Path) -> DaemonProcess {
        let mut child = daemon_command("udpmsgd")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn udpmsgd");
        let stdout = Lines::new(child.stdout.take().unwrap());
        let stderr = Lines::new(child.stderr.take().unwrap());
        DaemonProcess { child, stdout, stderr }
    }

    /// Waits for its `listening on ADDR` line; `None` if it did not come within `timeout`.
    pub fn wait_listening(&mut self, timeout: Duration) -> Option<SocketAddr> {
        let line = self.stdout.wait_for(timeout, |l| l.starts_with("listening on "))?;
        line["listening on ".len()..].parse().ok()
    }

    /// SIGKILL, then reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        unsafe_kill(self.child.id(), "TERM");
        wait_timeout(&mut self.child, timeout)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `program` runs (`program arg` succeeds). Under `CI=true` a missing one fails the test,
/// since .ci/run installs it; elsewhere the test says it is skipped and why.
#[allow(dead_code)] // not every test binary needs an external tool
pub fn tool_available(program: &str, arg: &str, needed_by: &str) -> bool {
    if Command::new(program).arg(arg).output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{program} is not installed, and CI=true: .ci/run installs it for {needed_by}");
    }
    eprintln!("SKIPPED: {program} is not installed; {needed_by} need it");
    false
}
