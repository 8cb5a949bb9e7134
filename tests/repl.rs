//! The interactive client as a person at a terminal uses it: each test starts the real `udpmsg`
//! in its own tmux server (a private socket in a temporary directory; the server is killed and
//! the directory removed when the test ends), types into it with
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
use std::time::{Duration, Instant};

/// Upper bound for anything to appear on the screen.
const WAIT: Duration = Duration::from_secs(15);

/// A tmux server of our own with one pane running a command.
struct Tmux {
    socket: PathBuf,
    /// Holds the socket; removed after the server is killed.
    _dir: TempDir,
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Tmux {
    /// Runs `argv` with `env` in a fresh 160x50 pane. `None` (after saying why) when tmux is not
    /// installed and this is not CI.
    fn start(argv: &[String], env: &[(&str, &str)]) -> Option<Tmux> {
        if !tool_available("tmux", "-V", "the REPL tests") {
            return None;
        }
        let dir = TempDir::new("tmux");
        let socket = dir.path().join("socket");
        // The pane outlives the program so that its last words and exit status stay readable.
        let mut line = String::from("env");
        for (k, v) in env {
            line.push_str(&format!(" {}", sh_quote(&format!("{k}={v}"))));
        }
        for a in argv {
            line.push_str(&format!(" {}", sh_quote(a)));
        }
        line.push_str("; echo \"[exit status $?]\"; exec sleep 600");
        let t = Tmux { socket, _dir: dir };
        let out =
            t.tmux(&["-f", "/dev/null", "new-session", "-d", "-s", "main", "-x", "160", "-y", "50", &line]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        Some(t)
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
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

    fn type_text(&self, text: &str) {
        assert!(self.tmux(&["send-keys", "-t", "main", "-l", text]).status.success());
    }

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

    /// Waits for a line equal to `line`.
    fn wait_line(&self, line: &str) -> Vec<String> {
        self.wait(&format!("line {line:?}"), |s| s.iter().any(|l| l == line))
    }

    /// Waits for `n` lines equal to `line`.
    fn wait_count(&self, line: &str, n: usize) -> Vec<String> {
        self.wait(&format!("{n} x {line:?}"), |s| s.iter().filter(|l| *l == line).count() >= n)
    }

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

fn register(addr: SocketAddr, user: &str, password: &str) {
    let out = run_client(addr, &[], &format!("register#{user}&{password}\n"));
    assert_eq!(out.code, Some(0), "{out:#?}");
}

/// How many sessions `user` has, asked by a script of its own (which counts itself).
fn sessions(addr: SocketAddr, user: &str, password: &str) -> usize {
    let out = run_client(addr, &[&format!("login#{user}&{password}"), "whoami"], "");
    let line = out.stdout.iter().find(|l| l.starts_with(&format!("{user} ("))).expect("whoami answered");
    line[user.len() + 2..].split(' ').next().unwrap().parse::<usize>().unwrap() - 1
}

/// Logs in at the REPL and waits for it.
fn login(t: &Tmux, user: &str, password: &str) {
    t.type_text(&format!("login#{user}&{password}"));
    t.keys(&["Enter"]);
    t.wait_line(&format!("logged in as {user}"));
}

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

// ------------------------------------------------------------------------------- paste

/// A bracketed paste of three lines runs three commands; it used to be one direct message
/// whose text was the rest of the paste.
#[test]
fn pasted_lines_run_one_command_each() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");
    let home = TempDir::new("repl-paste");
    let Some(t) = repl(d.addr, home.path(), &[]) else { return };
    login(&t, "alice", "secret");
    t.paste("send#bob&first line\npost#second line\nwhoami");
    t.keys(&["Enter"]);
    t.wait_line("sent to bob");
    t.wait_line("posted to 0 subscriber(s)");
    t.wait_line("alice (1 session(s))");
    let bob = run_client(d.addr, &["login#bob&hunter22", "retrieve#5"], "");
    assert!(bob.stdout.contains(&"  [alice -> you] first line".to_string()), "{bob:#?}");
    assert_eq!(
        bob.stdout.iter().filter(|l| l.contains("[alice")).count(),
        2,
        "the catch-up and the history: {bob:#?}"
    );
}

// ------------------------------------------------------------------------------ Ctrl-C

/// Ctrl-C clears a half-typed line and never leaves; on an empty prompt it says how to leave.
#[test]
fn ctrl_c_clears_the_line_and_does_not_leave() {
    let d = daemon();
    let home = TempDir::new("repl-ctrlc");
    let Some(t) = repl(d.addr, home.path(), &[]) else { return };
    t.wait_line(&format!("connected to {}", d.addr));
    t.type_text("post#half typ");
    t.keys(&["C-c"]);
    // A fresh prompt under the cleared line. (Wait for it: what is typed with or right after a
    // Ctrl-C is discarded with it, as a terminal's own Ctrl-C flushes its input.)
    t.wait("a fresh prompt", |s| {
        s.len() >= 2 && s[s.len() - 2] == "> post#half typ" && s[s.len() - 1] == ">"
    });
    t.keys(&["C-c"]);
    t.wait_line("(to leave, type quit or press Ctrl-D)");
    t.keys(&["ping", "Enter"]);
    let s = t.wait("a pong", |s| s.iter().any(|l| l.starts_with("pong in ")));
    assert!(!s.iter().any(|l| l.starts_with("[exit status")), "{}", s.join("\n"));
    assert!(!s.iter().any(|l| l.contains("posted")), "the cleared line did not run: {}", s.join("\n"));
    assert_eq!(s.iter().filter(|l| l.starts_with("> post#half typ")).count(), 1, "{}", s.join("\n"));
}

/// Ctrl-C while a command waits for an answer gives the prompt back at once, not when the
/// retries run out (22 s with the defaults).
#[test]
fn ctrl_c_abandons_a_command_waiting_for_an_answer() {
    // A daemon that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let home = TempDir::new("repl-abandon");
    let Some(t) = repl(silent.local_addr().unwrap(), home.path(), &[]) else { return };
    t.keys(&["ping", "Enter", "whoami", "Enter"]);
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    t.keys(&["C-c"]);
    t.wait_line("ping abandoned; 1 command(s) typed after it dropped");
    assert!(asked.elapsed() < Duration::from_secs(2), "took {:?}", asked.elapsed());
    // The prompt is back and works.
    t.keys(&["help", "Enter"]);
    t.wait_line("commands (names in any case):");
    drop(silent);
}

// -------------------------------------------------------------------------- completion

/// Tab completes command names, then the user names a command takes, from those seen.
#[test]
fn tab_completes_commands_and_names() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");
    let home = TempDir::new("repl-tab");
    let Some(t) = repl(d.addr, home.path(), &[]) else { return };
    login(&t, "alice", "secret");
    t.keys(&["users#*", "Enter"]);
    t.wait_line("bob");
    t.type_text("whoa");
    t.keys(&["Tab"]);
    t.wait("whoami completed", |s| s.last().is_some_and(|l| l == "> whoami"));
    t.keys(&["C-u"]);
    t.type_text("subscribe#b");
    t.keys(&["Tab"]);
    t.wait("bob completed", |s| s.last().is_some_and(|l| l == "> subscribe#bob"));
    t.keys(&["Enter"]);
    t.wait_line("subscribed to bob");
    t.type_text("sen");
    t.keys(&["Tab"]);
    t.type_text("bo");
    t.keys(&["Tab"]);
    t.wait("send#bob& completed", |s| s.last().is_some_and(|l| l == "> send#bob&"));
}

// ----------------------------------------------------------------------------- history

/// History persists across runs in a file of mode 0600 under XDG_DATA_HOME, and no line that
/// may hold a password enters it (typos of the command names included).
#[test]
fn history_persists_privately_without_passwords() {
    use std::os::unix::fs::PermissionsExt;
    let d = daemon();
    register(d.addr, "alice", "secret");
    let home = TempDir::new("repl-history");
    {
        let Some(t) = repl(d.addr, home.path(), &[]) else { return };
        for line in ["Login#alice&secret", "login alice secret", "loign#alice&secret", "ping", "post#hello"] {
            t.type_text(line);
            t.keys(&["Enter"]);
        }
        t.wait_line("posted to 0 subscriber(s)");
        t.keys(&["quit", "Enter"]);
        assert_eq!(t.wait_exit(), 0);
    }
    let file = history_file(home.path());
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
    let dir_mode = std::fs::metadata(file.parent().unwrap()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("secret"), "a password in the history: {text:?}");
    let entries: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(entries, ["ping", "post#hello", "quit"]);

    // The next run has it: Up shows the last line.
    let Some(t) = repl(d.addr, home.path(), &[]) else { return };
    t.keys(&["Up", "Up"]);
    t.wait("the history", |s| s.last().is_some_and(|l| l == "> post#hello"));
}

// ----------------------------------------------------------------------------- leaving

/// quit logs out (and says so) before leaving: the session does not linger on the daemon.
#[test]
fn quit_logs_out() {
    let d = daemon();
    register(d.addr, "carol", "secret");
    let home = TempDir::new("repl-quit");
    for leave in [&["quit", "Enter"][..], &["exit", "Enter"], &["C-d"]] {
        let Some(t) = repl(d.addr, home.path(), &[]) else { return };
        login(&t, "carol", "secret");
        assert_eq!(sessions(d.addr, "carol", "secret"), 1);
        t.keys(leave);
        t.wait_line("logged out carol");
        assert_eq!(t.wait_exit(), 0, "{leave:?}");
        assert_eq!(sessions(d.addr, "carol", "secret"), 0, "{leave:?}");
    }
}

/// delete# asks first, and only `yes` deletes.
#[test]
fn delete_asks_for_confirmation() {
    let d = daemon();
    register(d.addr, "dora", "secret");
    let home = TempDir::new("repl-delete");
    let Some(t) = repl(d.addr, home.path(), &[]) else { return };
    login(&t, "dora", "secret");
    t.keys(&["delete#secret", "Enter"]);
    t.wait_line(
        "delete the account dora, with its messages and subscriptions, for good? type yes to confirm",
    );
    t.keys(&["no", "Enter"]);
    t.wait_line("not deleted");
    t.keys(&["delete#wrong", "Enter", "yes", "Enter"]);
    t.wait_line("error: wrong password: the account was not deleted");
    t.keys(&["delete#secret", "Enter", "yes", "Enter"]);
    t.wait_line("account deleted");
}

// --------------------------------------------------------------------------- connecting

/// The banner does not claim contact: against a port where nothing listens the REPL says so at
/// once, and so does every command.
#[test]
fn nothing_listening_is_said_at_once() {
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let home = TempDir::new("repl-refused");
    let Some(t) = repl(addr, home.path(), &[]) else { return };
    let s = t.wait_line(&format!(
        "nothing listens at {addr} (connection refused): is udpmsgd running there? retrying in the background"
    ));
    assert!(!s.iter().any(|l| l.contains("connected to") || l.contains("talking to")), "{}", s.join("\n"));
    let asked = Instant::now();
    t.keys(&["ping", "Enter"]);
    t.wait_line(&format!("error: ping: nothing listens at {addr} (connection refused)"));
    assert!(asked.elapsed() < Duration::from_secs(2), "took {:?}", asked.elapsed());
}

/// When the daemon stops, an idle REPL says so (within a keepalive interval), and says so again
/// when it is back.
#[test]
fn lost_contact_and_reconnected() {
    let dir = TempDir::new("repl-lost");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, FAST_CONFIG).unwrap();
    let data = dir.path().join("data");
    let mut d = DaemonProcess::spawn(&config, "127.0.0.1:0", &data);
    let addr = d.wait_listening(Duration::from_secs(20)).expect("listening");
    register(addr, "erin", "secret");
    let client_toml = dir.path().join("client.toml");
    std::fs::write(&client_toml, "ping_interval_secs = 1\n").unwrap();
    let Some(t) = repl(addr, dir.path(), &["--config", client_toml.to_str().unwrap()]) else { return };
    login(&t, "erin", "secret");

    d.terminate(Duration::from_secs(10)).expect("the daemon stops");
    t.wait_line(&format!(
        "lost contact with {addr}: nothing listens there now (connection refused); retrying"
    ));
    let mut d = DaemonProcess::spawn(&config, &addr.to_string(), &data);
    d.wait_listening(Duration::from_secs(20)).expect("back on the same port");
    t.wait_line(&format!("reconnected to {addr}"));
    // The session survived the restart.
    t.keys(&["whoami", "Enter"]);
    t.wait_line("erin (1 session(s))");
    let s = t.screen();
    assert_eq!(s.iter().filter(|l| l.starts_with("lost contact")).count(), 1, "said once: {}", s.join("\n"));
}

// ------------------------------------------------------------------------------- README

/// The README's quick start, replayed as written: the daemon's lines (less their timestamps),
/// and what terminals 2 and 3 show as their lines are typed (less message times; the address is
/// the test daemon's). If this fails, the README or the client changed: make them agree.
#[test]
fn readme_quick_start_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Quick start").expect("a quick start");
    let end = start + readme[start..].find("\n## ").expect("a section after it");
    let mut steps: Vec<(u32, Vec<String>)> = Vec::new();
    let (mut terminal, mut block) = (0, None::<Vec<String>>);
    for line in readme[start..end].lines() {
        if let Some(rest) = line.strip_prefix("**Terminal ") {
            terminal = rest[..1].parse().expect("a terminal number");
        } else if line == "```console" {
            block = Some(Vec::new());
        } else if line == "```" && block.is_some() {
            steps.push((terminal, block.take().unwrap()));
        } else if let Some(b) = &mut block {
            b.push(line.to_string());
        }
    }
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 2, 3], "the walk-through's shape");

    // Terminal 1, in a fresh directory: the daemon on its defaults, but for the port.
    let daemon_lines = &steps[0].1;
    assert_eq!(daemon_lines[0], "$ target/release/udpmsgd");
    let dir = TempDir::new("readme");
    let mut child = common::daemon_command("udpmsgd")
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    let _daemon = Reap(child);
    let listening = stdout.wait_for(WAIT, |l| l.starts_with("listening on ")).expect("terminal 1: listening");
    let addr: SocketAddr = listening["listening on ".len()..].parse().unwrap();
    let ours = |l: &str| l.replace("127.0.0.1:7070", &addr.to_string());
    assert_eq!(ours(daemon_lines.last().unwrap()), listening);
    for line in &daemon_lines[1..daemon_lines.len() - 1] {
        // `[TIMESTAMP LEVEL target] message`: all but the timestamp must match.
        let what = line.split_once(' ').expect("a log line").1;
        stderr
            .wait_for(WAIT, |l| l.split_once(' ').is_some_and(|(_, w)| w == what))
            .unwrap_or_else(|| panic!("the daemon did not log {what:?}; it logged {:#?}", stderr.seen));
    }

    // Terminals 2 and 3: each block's lines in order, typing the `> ` ones.
    let home = TempDir::new("readme-home");
    let mut terms: std::collections::HashMap<u32, (Tmux, usize)> = std::collections::HashMap::new();
    for (n, lines) in &steps[1..] {
        for line in lines {
            if line == "$ target/release/udpmsg" {
                let argv = [bin("udpmsg").display().to_string(), "--server".into(), addr.to_string()];
                let home_s = home.path().display().to_string();
                let data = home.path().join(format!("data{n}")).display().to_string();
                let env = [("HOME", home_s.as_str()), ("XDG_DATA_HOME", data.as_str()), ("RUST_LOG", "warn")];
                let Some(t) = Tmux::start(&argv, &env) else { return };
                terms.insert(*n, (t, 0));
                continue;
            }
            let (t, seen) = terms.get_mut(n).expect("the terminal was started");
            if let Some(input) = line.strip_prefix("> ") {
                t.type_text(input);
                t.keys(&["Enter"]);
            }
            let want = untimed(&ours(line));
            let from = *seen;
            let s = t.wait(&format!("terminal {n}: {line:?}"), |s| {
                s.iter().skip(from).any(|l| untimed(l) == want)
            });
            *seen = from + s.iter().skip(from).position(|l| untimed(l) == want).unwrap() + 1;
        }
    }
    assert_eq!(terms[&3].0.wait_exit(), 0, "bob left");
}

/// Kills and reaps a child process when dropped.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
