//! The second implementation of the client, `contrib/python/udpmsg_client.py` (written from
//! PROTOCOL.md, standard library only), against the real daemon: its scripted self-test, and
//! conversations with the Rust client in both directions.
//!
//! Without python3 these tests skip themselves, saying so, unless `CI=true`: there a missing
//! python3 is a failure.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Upper bound for anything to be printed.
const WAIT: Duration = Duration::from_secs(20);

/// The interpreter, or `None` (after saying why) when python3 is missing and this is not CI.
fn python() -> Option<&'static str> {
    tool_available("python3", "--version", "the Python client tests").then_some("python3")
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contrib/python/udpmsg_client.py")
}

/// A running Python client: `udpmsg_client.py --server ADDR ARGS...`, killed on drop.
struct Py {
    child: std::process::Child,
    stdout: Lines,
    stderr: Lines,
}

impl Py {
    fn start(python: &str, server: SocketAddr, args: &[&str]) -> Py {
        let mut child = Command::new(python)
            .arg(script())
            .arg("--server")
            .arg(server.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdout = Lines::new(child.stdout.take().unwrap());
        let stderr = Lines::new(child.stderr.take().unwrap());
        Py { child, stdout, stderr }
    }

    /// Waits for the exit status, then everything printed.
    fn finish(&mut self) -> (Option<i32>, Vec<String>, Vec<String>) {
        let status = wait_timeout(&mut self.child, WAIT * 3);
        let code = status.and_then(|s| s.code());
        (code, self.stdout.rest(Duration::from_secs(5)), self.stderr.rest(Duration::from_secs(5)))
    }

    fn wait_line(&mut self, line: &str) {
        if self.stdout.wait_for(WAIT, |l| l == line).is_none() {
            let _ = self.child.kill();
            let err = self.stderr.rest(Duration::from_secs(1));
            panic!("python client: no line {line:?}; stdout {:#?}, stderr {err:#?}", self.stdout.seen);
        }
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn python_client_selftest_against_the_daemon() {
    let Some(python) = python() else { return };
    let d = Daemon::start(FAST_CONFIG);
    let mut py = Py::start(python, d.addr, &["selftest"]);
    let (code, stdout, stderr) = py.finish();
    assert_eq!(code, Some(0), "stdout {stdout:#?}\nstderr {stderr:#?}");
    assert!(stderr.is_empty(), "{stderr:#?}");
    assert_eq!(
        stdout,
        vec![
            // A registration always needs an address cookie: one Retry, then the real answer.
            "registered alice (after 1 cookie retry)",
            "registered bob",
            "error: name bob is taken (NameTaken)",
            "error: wrong user name or password (BadCredentials)",
            "logged in as alice",
            "logged in as bob",
            "subscribed to bob",
            "error: no such user nobody (NoSuchUser)",
            "bob posted to 1 subscriber(s)",
            "alice got a push: [bob] hello from python",
            "alice got the burst in order",
            "alice got a push: [bob -> alice] psst",
            "error: text contains the control character U+0007 (InvalidText)",
            "alice moved to a new port, answered its path challenge, got: [bob] after the move",
            "alice retrieved: [bob -> alice] psst | [bob] after the move",
            "logged out alice",
            "error: not logged in (NotLoggedIn)",
            "alice logged in again and caught up on 2 missed message(s)",
            "logged out bob",
            "selftest ok",
        ]
    );
}

/// The Rust client posts, the Python client (whose account it registered itself) gets the push;
/// then the other way round, into a running Rust client.
#[test]
fn python_and_rust_clients_talk_to_each_other() {
    let Some(python) = python() else { return };
    let d = Daemon::start(FAST_CONFIG);
    let out = run_client(d.addr, &["register#carol&secret"], "");
    assert_eq!(out.code, Some(0), "{out:#?}");

    let mut dave = Py::start(
        python,
        d.addr,
        &["run", "register", "dave", "hunter22", "login", "dave", "hunter22", "subscribe", "carol"],
    );
    let (code, stdout, stderr) = dave.finish();
    assert_eq!(code, Some(0), "{stderr:#?}");
    assert_eq!(stdout, vec!["registered dave", "logged in as dave", "subscribed to carol"]);

    // Rust posts; Python receives.
    let mut dave = Py::start(
        python,
        d.addr,
        &["run", "login", "dave", "hunter22", "wait", "1", "20", "retrieve", "1", "logout"],
    );
    dave.wait_line("waiting for 1 push(es)");
    let text = "hi from rust: ü & #1";
    let out = run_client(d.addr, &["login#carol&secret", &format!("post#{text}")], "");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout, vec!["logged in as carol", "posted to 1 subscriber(s)"], "{out:#?}");
    let (code, stdout, stderr) = dave.finish();
    assert_eq!(code, Some(0), "stdout {stdout:#?}\nstderr {stderr:#?}");
    assert_eq!(
        stdout,
        vec![
            "logged in as dave".to_string(),
            "waiting for 1 push(es)".into(),
            format!("[carol] {text}"),
            "history: 1 message(s), oldest first".into(),
            format!("  [carol] {text}"),
            "logged out dave".into(),
        ]
    );

    // Python posts and sends; a running Rust client shows both.
    let mut carol = LiveClient::start(d.addr, &[]);
    carol.send("login#carol&secret");
    wait_for(&mut carol.stdout, "logged in as carol");
    carol.send("subscribe#dave");
    wait_for(&mut carol.stdout, "subscribed to dave");
    let mut dave = Py::start(
        python,
        d.addr,
        &[
            "run",
            "login",
            "dave",
            "hunter22",
            "post",
            "hello from python",
            "send",
            "carol",
            "just you",
            "logout",
        ],
    );
    let (code, stdout, stderr) = dave.finish();
    assert_eq!(code, Some(0), "stdout {stdout:#?}\nstderr {stderr:#?}");
    assert_eq!(
        stdout,
        vec!["logged in as dave", "posted to 1 subscriber(s)", "sent to carol", "logged out dave"]
    );
    wait_for(&mut carol.stdout, "[dave] hello from python");
    wait_for(&mut carol.stdout, "[dave -> you] just you");
    assert_eq!(carol.finish(), Some(0));
}

/// What a user of the Python client sees when a command fails: the error on stderr, exit 1.
#[test]
fn python_client_reports_errors_and_exits_1() {
    let Some(python) = python() else { return };
    let d = Daemon::start(FAST_CONFIG);
    let mut py = Py::start(python, d.addr, &["run", "login", "nobody", "secret", "post", "hi"]);
    let (code, stdout, stderr) = py.finish();
    assert_eq!(code, Some(1));
    assert!(stdout.is_empty(), "{stdout:#?}");
    assert_eq!(
        stderr,
        vec!["error: wrong user name or password (BadCredentials)", "error: not logged in (NotLoggedIn)"]
    );
}

fn wait_for(lines: &mut Lines, line: &str) {
    if lines.wait_for(WAIT, |l| l == line).is_none() {
        panic!("no line {line:?} within {WAIT:?}; saw {:#?}", lines.seen);
    }
}

/// The Python client encodes and decodes the test vectors of PROTOCOL.md that it has a use for
/// exactly as the document (and so, through tests/protocol_doc.rs, the Rust code) does.
#[test]
fn python_client_agrees_with_the_test_vectors() {
    let Some(python) = python() else { return };
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("PROTOCOL.md");
    let out = Command::new(python)
        .arg(script())
        .arg("--protocol-md")
        .arg(&doc)
        .arg("check-vectors")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout {stdout}\nstderr {stderr}");
    for name in ["register", "login", "post", "retrieve", "push-acks", "reply-logged-in", "pushes", "retry"] {
        assert!(stdout.lines().any(|l| l == format!("checked {name}")), "{name} not checked: {stdout}");
    }
    assert!(stdout.trim_end().ends_with("vectors checked"), "{stdout}");
}

/// Sections 11 and 12 in practice: the daemon is killed and started again on its port and data.
/// The session survives without an address and numbers its pushes in a new epoch: the Python
/// client's keepalive is challenged, it echoes the challenge, follows the epoch its ping's answer
/// names, and gets the next push (and not again one it showed before the kill).
#[test]
fn python_client_follows_a_daemon_restart() {
    let Some(python) = python() else { return };
    let dir = TempDir::new("py-restart");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, FAST_CONFIG).unwrap();
    let data = dir.path().join("data");
    let mut daemon = DaemonProcess::spawn(&config, "127.0.0.1:0", &data);
    let addr = daemon.wait_listening(WAIT).expect("udpmsgd started");
    for user in ["erin", "finn"] {
        let out = run_client(addr, &[&format!("register#{user}&secret")], "");
        assert_eq!(out.code, Some(0), "{out:#?}");
    }
    let mut erin = Py::start(
        python,
        addr,
        &[
            "--ping-interval",
            "0.5",
            "run",
            "login",
            "erin",
            "secret",
            "subscribe",
            "finn",
            "wait",
            "2",
            "60",
            "stats",
            "logout",
        ],
    );
    erin.wait_line("waiting for 2 push(es)");
    let out = run_client(addr, &["login#finn&secret", "post#before"], "");
    assert_eq!(out.code, Some(0), "{out:#?}");
    erin.wait_line("[finn] before");

    daemon.kill();
    let listen = addr.to_string();
    let mut daemon = None;
    for _ in 0..50 {
        let mut d = DaemonProcess::spawn(&config, &listen, &data);
        if d.wait_listening(WAIT).is_some() {
            daemon = Some(d);
            break;
        }
        // The port may not be free yet.
        d.kill();
        std::thread::sleep(Duration::from_millis(100));
    }
    let _daemon = daemon.expect("udpmsgd started again on its port");
    let out = run_client(addr, &["login#finn&secret", "post#after"], "");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let (code, stdout, stderr) = erin.finish();
    assert_eq!(code, Some(0), "stdout {stdout:#?}\nstderr {stderr:#?}");
    assert_eq!(
        stdout,
        vec![
            "logged in as erin",
            "subscribed to finn",
            "waiting for 2 push(es)",
            "[finn] before",
            "[finn] after",
            // The restarted daemon's epoch, followed; its challenge to the session's (lost)
            // address, answered (more than once, should a retransmission have crossed it).
            "epoch 2, path challenges answered: yes",
            "logged out erin"
        ]
    );
}

/// Section 8: a daemon of another version answers with a notice that echoes the request; the
/// Python client gives up at once and says which version it met.
#[test]
fn python_client_reports_a_daemon_of_another_version() {
    let Some(python) = python() else { return };
    let fake = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        fake.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = fake.recv_from(&mut buf).expect("a datagram");
        let mut notice = udpmsg::proto::version_notice(&buf[..n]);
        notice[2] = 7;
        fake.send_to(&notice, from).unwrap();
    });
    let mut py = Py::start(python, addr, &["run", "whoami"]);
    let (code, stdout, stderr) = py.finish();
    server.join().unwrap();
    assert_eq!(code, Some(1), "{stdout:#?} {stderr:#?}");
    assert!(stdout.is_empty(), "{stdout:#?}");
    assert_eq!(stderr, vec!["error: server speaks protocol v7 (VersionMismatch)"]);
}
