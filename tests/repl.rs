//! The interactive client as a person at a terminal uses it: each test starts the real `udpmsg`
//! in its own tmux server (a private `-L` socket, killed when the test ends), types into it with
//! `send-keys`, pastes with `paste-buffer -p` (bracketed paste), and asserts on what the pane
//! shows (`capture-pane`).
//!
//! Without tmux these tests skip themselves, saying so, unless `CI=true`: CI installs tmux
//! (`.ci/run`), so there a missing tmux is a failure.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Upper bound for anything to appear on the screen.
const WAIT: Duration = Duration::from_secs(15);

/// A tmux server of our own with one pane running a command.
struct Tmux {
    socket: String,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Tmux {
    /// Runs `argv` with `env` in a fresh 160x50 pane. `None` (after saying why) when tmux is not
    /// installed and this is not CI.
    fn start(argv: &[String], env: &[(&str, &str)]) -> Option<Tmux> {
        let available = Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success());
        if !available {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("tmux is not installed, and CI=true: .ci/run installs it");
            }
            eprintln!("SKIPPED: tmux is not installed (apt-get install tmux); the REPL tests need it");
            return None;
        }
        let socket = format!("udpmsg-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        // The pane outlives the program so that its last words and exit status stay readable.
        let mut line = String::from("env");
        for (k, v) in env {
            line.push_str(&format!(" {}", sh_quote(&format!("{k}={v}"))));
        }
        for a in argv {
            line.push_str(&format!(" {}", sh_quote(a)));
        }
        line.push_str("; echo \"[exit status $?]\"; exec sleep 600");
        let t = Tmux { socket };
        let out =
            t.tmux(&["-f", "/dev/null", "new-session", "-d", "-s", "main", "-x", "160", "-y", "50", &line]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        Some(t)
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux")
    }

    /// Key names as `send-keys` takes them (`Enter`, `C-c`, `Tab`), or literal text with `-l`.
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "main"];
        args.extend_from_slice(keys);
        assert!(self.tmux(&args).status.success());
    }

    #[allow(dead_code)] // used by the tests that follow in later commits
    fn type_text(&self, text: &str) {
        assert!(self.tmux(&["send-keys", "-t", "main", "-l", text]).status.success());
    }

    #[allow(dead_code)] // used by the tests that follow in later commits
    /// Pastes `text` as a terminal would: in bracketed-paste markers when the program asked.
    fn paste(&self, text: &str) {
        assert!(self.tmux(&["set-buffer", "-b", "clip", "--", text]).status.success());
        assert!(self.tmux(&["paste-buffer", "-p", "-d", "-b", "clip", "-t", "main"]).status.success());
    }

    /// The whole pane, scrollback included, without trailing blank lines.
    fn screen(&self) -> Vec<String> {
        let out = self.tmux(&["capture-pane", "-p", "-J", "-t", "main", "-S", "-"]);
        let mut lines: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim_end().to_string()).collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }

    /// Waits until the screen satisfies `pred`; panics with the screen if it does not.
    fn wait(&self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let end = Instant::now() + WAIT;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if Instant::now() > end {
                panic!("{what}: not on the screen within {WAIT:?}:\n{}", s.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[allow(dead_code)] // used by the tests that follow in later commits
    /// Waits for a line equal to `line`.
    fn wait_line(&self, line: &str) -> Vec<String> {
        self.wait(&format!("line {line:?}"), |s| s.iter().any(|l| l == line))
    }

    /// Waits for `n` lines equal to `line`.
    fn wait_count(&self, line: &str, n: usize) -> Vec<String> {
        self.wait(&format!("{n} x {line:?}"), |s| s.iter().filter(|l| *l == line).count() >= n)
    }

    #[allow(dead_code)] // used by the tests that follow in later commits
    /// Waits for the program to exit; returns its status.
    fn wait_exit(&self) -> i32 {
        let s = self.wait("exit", |s| s.iter().any(|l| l.starts_with("[exit status ")));
        let l = s.iter().find(|l| l.starts_with("[exit status ")).unwrap();
        l["[exit status ".len()..l.len() - 1].parse().unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

/// The interactive client against `server`, with its data (history) under `home`.
fn repl(server: SocketAddr, home: &Path, extra: &[&str]) -> Option<Tmux> {
    let mut argv = vec![bin("udpmsg").display().to_string(), "--server".into(), server.to_string()];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let data = home.join("data");
    let home_s = home.display().to_string();
    let data_s = data.display().to_string();
    let t = Tmux::start(
        &argv,
        &[("HOME", &home_s), ("XDG_DATA_HOME", &data_s), ("RUST_LOG", "warn"), ("TZ", "UTC")],
    )?;
    t.wait("the prompt", |s| s.last().is_some_and(|l| l.starts_with('>')));
    Some(t)
}

fn daemon() -> Daemon {
    Daemon::start(FAST_CONFIG)
}

#[allow(dead_code)] // used by the tests that follow in later commits
fn register(addr: SocketAddr, user: &str, password: &str) {
    let out = run_client(addr, &[], &format!("register#{user}&{password}\n"));
    assert_eq!(out.code, Some(0), "{out:#?}");
}

#[allow(dead_code)]
fn history_file(home: &Path) -> PathBuf {
    home.join("data").join("udpmsg").join("history")
}

// ------------------------------------------------------------------------------ type-ahead

/// Lines typed while the previous one is still being handled all run, in order. (rustyline read
/// the whole burst into a buffer it dropped at the end of each line: built without its
/// `buffer-redux` feature, it kept nothing between lines.)
#[test]
fn type_ahead_is_not_lost() {
    let d = daemon();
    let home = TempDir::new("repl-typeahead");
    let Some(t) = repl(d.addr, home.path(), &[]) else { return };
    for round in 1..=3 {
        // One burst: both lines reach the terminal before the client has read the first.
        t.keys(&["ping", "Enter", "help", "Enter"]);
        t.wait_count("commands (names in any case):", round);
        let s = t.wait(&format!("round {round}: a pong"), |s| {
            s.iter().filter(|l| l.starts_with("pong in ")).count() >= round
        });
        assert_eq!(s.iter().filter(|l| *l == "> help").count(), round, "{}", s.join("\n"));
    }
}
