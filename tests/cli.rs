//! End-to-end tests of the real `udpmsgd` and `udpmsg` processes on 127.0.0.1: what the user sees
//! (exact lines, stdout versus stderr, exit status), pushes to running clients, `--json`,
//! `--script`, timeouts, protocol version handling and configuration errors.

mod common;

use common::*;
use serde_json::Value;
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound for any single wait on a line.
const WAIT: Duration = Duration::from_secs(15);

/// The line above what `retrieve` found (one message).
const HISTORY_1: &str = "history: your 1 most recent message(s), oldest first";
const NOT_LOGGED_IN: &str = "error: not logged in: use login#USER&PASSWORD first";
const BAD_CREDENTIALS: &str = "error: wrong user name or password";

// ------------------------------------------------------------------------------------ helpers

fn daemon() -> Daemon {
    Daemon::start(FAST_CONFIG)
}

fn daemon_with(extra: &str) -> Daemon {
    Daemon::start(&format!("{FAST_CONFIG}{extra}\n"))
}

/// Runs a script-mode client with `cmds` on its stdin, one per line (stdin then closes).
fn script(addr: SocketAddr, cmds: &[&str]) -> Output {
    let input: String = cmds.iter().map(|c| format!("{c}\n")).collect();
    run_client(addr, &[], &input)
}

/// Runs commands that must all succeed: exit 0 and nothing on stderr.
fn script_ok(addr: SocketAddr, cmds: &[&str]) -> Vec<String> {
    let out = script(addr, cmds);
    assert_eq!(out.code, Some(0), "commands {cmds:?} failed: {out:#?}");
    assert!(out.stderr.is_empty(), "commands {cmds:?} wrote to stderr: {out:#?}");
    out.stdout
}

/// Registers `user` (which logs in to it, and out again when the script ends).
fn register(addr: SocketAddr, user: &str, password: &str) {
    let out = script_ok(addr, &[&format!("register#{user}&{password}")]);
    assert_eq!(out, vec![format!("registered {user}; logging in"), format!("logged in as {user}")]);
}

/// Runs `setup` (commands that must succeed, printing `setup_out`) followed by one command that
/// must fail with exactly `error` on stderr; the client must exit with status 1.
fn expect_error(addr: SocketAddr, setup: &[&str], setup_out: &[&str], failing: &str, error: &str) {
    let mut cmds = setup.to_vec();
    cmds.push(failing);
    let out = script(addr, &cmds);
    assert_eq!(out.code, Some(1), "{failing:?} should fail with exit 1: {out:#?}");
    assert_eq!(out.stderr, vec![error.to_string()], "stderr of {failing:?}: {out:#?}");
    assert_eq!(out.stdout, setup_out.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{out:#?}");
}

/// Ends a live client with `quit` (its stdin still open) and returns its exit status.
fn quit(c: &mut LiveClient) -> Option<i32> {
    c.send("quit");
    c.finish()
}

/// Waits for an exact line; panics with everything seen so far if it does not come.
fn wait_line(lines: &mut Lines, what: &str, line: &str) {
    if lines.wait_for(WAIT, |l| l == line).is_none() {
        panic!("{what}: no line {line:?} within {WAIT:?}; saw {:#?}", lines.seen);
    }
}

/// Waits for a JSON object line satisfying `pred`; every line seen must be a JSON object.
fn wait_json(lines: &mut Lines, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let line = lines.wait_for(WAIT, |l| serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v)));
    for l in &lines.seen {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {l:?}"));
        assert!(v.is_object(), "{what}: not a JSON object: {l:?}");
    }
    match line {
        Some(l) => serde_json::from_str(&l).unwrap(),
        None => panic!("{what}: no matching JSON line within {WAIT:?}; saw {:#?}", lines.seen),
    }
}

/// Parses JSON lines; each must be an object whose first key is `type`, as the README shows.
fn parse_json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
            assert!(v.is_object(), "not a JSON object: {l:?}");
            assert!(l.starts_with("{\"type\":\""), "`type` is not the first key: {l:?}");
            v
        })
        .collect()
}

/// Result of running a binary directly.
#[derive(Debug)]
struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `bin` with `args` in `dir`, `input` on its stdin (closed after it; `None`: /dev/null),
/// and waits at most `timeout` for it to exit (killed otherwise).
fn run_bin(name: &str, args: &[&str], dir: &Path, input: Option<&str>, timeout: Duration) -> Exit {
    let start = Instant::now();
    let mut child = Command::new(bin(name))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    if let Some(input) = input {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let mut out = Lines::new(child.stdout.take().unwrap());
    let mut err = Lines::new(child.stderr.take().unwrap());
    let status = wait_timeout(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let took = start.elapsed();
    Exit {
        code: status.and_then(|s| s.code()),
        stdout: out.rest(Duration::from_secs(5)).join("\n"),
        stderr: err.rest(Duration::from_secs(5)).join("\n"),
        took,
    }
}

/// A UDP socket on 127.0.0.1 for talking to the daemon directly.
fn raw_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

/// A `Ping` request without a session.
fn ping_datagram(id: u64) -> Vec<u8> {
    use udpmsg::proto::{encode_client, ClientMsg, Request, RequestBody};
    encode_client(&ClientMsg::Request(Request { id, token: None, body: RequestBody::Ping }))
}

/// Sends a `Ping` and returns the decoded answer.
fn raw_ping(sock: &UdpSocket, daemon: SocketAddr, id: u64) -> udpmsg::proto::ServerMsg {
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    // A few tries: UDP, even on loopback, is allowed to lose a datagram.
    for _ in 0..10 {
        sock.send_to(&ping_datagram(id), daemon).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            assert_eq!(from, daemon);
            return udpmsg::proto::decode_server(&buf[..n]).expect("an answer in our version");
        }
    }
    panic!("the daemon did not answer a ping");
}

// ------------------------------------------------------------------------- 1. seed scenario

#[test]
fn subscribe_push_retrieve_logout_and_exit_codes() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");

    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&secret");
    wait_line(&mut alice.stdout, "alice", "logged in as alice");
    alice.send("subscribe#bob");
    wait_line(&mut alice.stdout, "alice", "subscribed to bob");

    // Bob's commands all succeed: exit status 0.
    let bob = script_ok(d.addr, &["login#bob&hunter22", "post#hi"]);
    assert_eq!(bob, vec!["logged in as bob", "posted to 1 subscriber(s)"]);

    // Alice's running client shows the message without being asked.
    wait_line(&mut alice.stdout, "alice push", "[bob] hi");

    alice.send("retrieve#5");
    wait_line(&mut alice.stdout, "alice retrieve", "  [bob] hi");

    alice.send("logout");
    wait_line(&mut alice.stdout, "alice", "logged out alice");
    alice.send("post#x");
    wait_line(&mut alice.stderr, "alice post after logout", NOT_LOGGED_IN);

    // One command failed: exit status 1 once stdin closes.
    assert_eq!(alice.finish(), Some(1), "stdout {:#?} stderr {:#?}", alice.stdout.seen, alice.stderr.seen);
    let out = alice.stdout.rest(Duration::from_secs(5));
    assert_eq!(
        out,
        vec![
            "logged in as alice",
            "subscribed to bob",
            "[bob] hi",
            HISTORY_1,
            "  [bob] hi",
            "logged out alice"
        ]
    );
    assert_eq!(alice.stderr.rest(Duration::from_secs(5)), vec![NOT_LOGGED_IN]);
}

#[test]
fn messages_missed_while_away_are_pushed_on_login() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");
    script_ok(d.addr, &["login#alice&secret", "subscribe#bob", "logout"]);
    let bob = script_ok(d.addr, &["login#bob&hunter22", "post#while you were out"]);
    // Bob's post is stored for alice even though nobody could take it at once.
    assert_eq!(bob, vec!["logged in as bob", "posted to 1 subscriber(s)"]);

    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&secret");
    wait_line(&mut alice.stdout, "alice", "logged in as alice; 1 new message(s) while you were away:");
    wait_line(&mut alice.stdout, "alice catch-up", "[bob] while you were out");
    alice.send("logout");
    wait_line(&mut alice.stdout, "alice", "logged out alice");
    assert_eq!(alice.finish(), Some(0));
}

// -------------------------------------------------------------------- 2. two sessions, one user

#[test]
fn user_logged_in_twice_gets_the_push_on_both_clients() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");

    let mut a1 = LiveClient::start(d.addr, &[]);
    let mut a2 = LiveClient::start(d.addr, &[]);
    a1.send("login#alice&secret");
    a2.send("login#alice&secret");
    wait_line(&mut a1.stdout, "alice 1", "logged in as alice");
    wait_line(&mut a2.stdout, "alice 2", "logged in as alice");
    a1.send("subscribe#bob");
    wait_line(&mut a1.stdout, "alice 1", "subscribed to bob");
    a2.send("whoami");
    wait_line(&mut a2.stdout, "alice 2", "alice (2 session(s))");

    let bob = script_ok(d.addr, &["login#bob&hunter22", "post#hi both"]);
    assert_eq!(bob, vec!["logged in as bob", "posted to 1 subscriber(s)"]);

    wait_line(&mut a1.stdout, "alice 1 push", "[bob] hi both");
    wait_line(&mut a2.stdout, "alice 2 push", "[bob] hi both");
    assert_eq!(a1.finish(), Some(0));
    assert_eq!(a2.finish(), Some(0));
    // Each shows the push exactly once.
    for (c, name) in [(&mut a1, "alice 1"), (&mut a2, "alice 2")] {
        let seen = c.stdout.rest(Duration::from_secs(5));
        assert_eq!(seen.iter().filter(|l| *l == "[bob] hi both").count(), 1, "{name}: {seen:#?}");
    }
}

// ------------------------------------------------------------------ 3. verbatim last argument

#[test]
fn last_argument_is_taken_verbatim() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    // The password contains the argument separator.
    register(d.addr, "bob", "p&ss");

    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&secret");
    alice.send("subscribe#bob");
    wait_line(&mut alice.stdout, "alice", "subscribed to bob");

    let bob = script_ok(d.addr, &["login#bob&p&ss", "post#a#b & c", "send#alice&x & y#z"]);
    assert_eq!(bob, vec!["logged in as bob", "posted to 1 subscriber(s)", "sent to alice"]);

    wait_line(&mut alice.stdout, "alice push", "[bob] a#b & c");
    wait_line(&mut alice.stdout, "alice direct", "[bob -> you] x & y#z");
    assert_eq!(alice.finish(), Some(0));

    // The password really is `p&ss`: `p` alone is wrong.
    expect_error(d.addr, &[], &[], "login#bob&p", BAD_CREDENTIALS);
}

// ------------------------------------------------------------------------ 4. errors as seen

#[test]
fn server_errors_as_the_user_sees_them() {
    let d = daemon_with("max_text_bytes = 10");
    let a = d.addr;
    register(a, "alice", "secret");
    register(a, "bob", "hunter22");
    let login_a = "login#alice&secret";
    let in_a = "logged in as alice";

    // Wrong password and unknown user: one and the same answer.
    expect_error(a, &[], &[], "login#alice&wrong-password", BAD_CREDENTIALS);
    expect_error(a, &[], &[], "login#nobody&secret", BAD_CREDENTIALS);

    expect_error(a, &[login_a], &[in_a], "subscribe#carol", "error: no such user carol");
    expect_error(a, &[login_a], &[in_a], "subscribe#alice", "error: you cannot subscribe to yourself");
    expect_error(
        a,
        &[login_a, "subscribe#bob"],
        &[in_a, "subscribed to bob"],
        "subscribe#bob",
        "error: already subscribed to bob",
    );
    expect_error(
        a,
        &[login_a, "unsubscribe#bob"],
        &[in_a, "unsubscribed from bob"],
        "unsubscribe#bob",
        "error: not subscribed to bob",
    );
    expect_error(a, &[login_a], &[in_a], "unsubscribe#carol", "error: no such user carol");
    expect_error(a, &[login_a], &[in_a], "send#carol&hi", "error: no such user carol");

    // Text limits: exactly 10 bytes is fine, 11 names the limit.
    expect_error(
        a,
        &[login_a, "post#0123456789"],
        &[in_a, "posted to 0 subscriber(s)"],
        "post#0123456789a",
        "error: text too long: 11 bytes, at most 10",
    );
    // The limit is in bytes, not characters: five two-byte characters fit, six do not.
    expect_error(
        a,
        &[login_a, "post#ééééé"],
        &[in_a, "posted to 0 subscriber(s)"],
        "post#éééééé",
        "error: text too long: 12 bytes, at most 10",
    );
    expect_error(
        a,
        &[login_a],
        &[in_a],
        "send#bob&0123456789a",
        "error: text too long: 11 bytes, at most 10",
    );

    let range = "error: count out of range: must be between 1 and 100";
    expect_error(a, &[login_a], &[in_a], "retrieve#0", range);
    expect_error(a, &[login_a], &[in_a], "retrieve#1000", range);

    // Not logged in at all.
    expect_error(a, &[], &[], "post#x", NOT_LOGGED_IN);
    expect_error(a, &[], &[], "retrieve#5", NOT_LOGGED_IN);
    expect_error(a, &[], &[], "logout", NOT_LOGGED_IN);

    // Registration errors.
    expect_error(a, &[], &[], "register#alice&another1", "error: name alice is taken");
    let bad_name = "error: invalid name: 1 to 32 characters from A-Z a-z 0-9 _ . -";
    expect_error(a, &[], &[], "register#al ice&secret", bad_name);
    expect_error(a, &[], &[], "register#al*ce&secret", bad_name);
    expect_error(a, &[], &[], &format!("register#{}&secret", "x".repeat(33)), bad_name);
    let bad_password = "error: invalid password: 4 to 128 bytes";
    expect_error(a, &[], &[], "register#dave&abc", bad_password);
    // Over the protocol's limit, the client refuses it itself.
    expect_error(
        a,
        &[],
        &[],
        &format!("register#dave&{}", "p".repeat(129)),
        "error: password too long: 129 bytes, at most 128",
    );
    // Names and passwords at the limits are fine.
    register(a, &"n".repeat(32), "abcd");
    register(a, "a.b-c_9", &"p".repeat(128));

    // Repeated failed logins for one account from one address are throttled (5 allowed in a
    // burst by default, and as many again once the address proved itself with a cookie).
    register(a, "eve", "correct horse");
    for _ in 0..10 {
        expect_error(a, &[], &[], "login#eve&guess", BAD_CREDENTIALS);
    }
    let out = script(a, &["login#eve&correct horse"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stderr.len(), 1, "{out:#?}");
    let e = &out.stderr[0];
    assert!(e.starts_with("error: too many attempts, retry in ") && e.ends_with(" s"), "{out:#?}");
}

#[test]
fn empty_text_is_a_usage_error_and_nothing_is_sent() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");
    script_ok(d.addr, &["login#alice&secret", "subscribe#bob"]);

    let login_b = "login#bob&hunter22";
    let in_b = "logged in as bob";
    expect_error(d.addr, &[login_b], &[in_b], "post#", "usage: post#TEXT");
    expect_error(d.addr, &[login_b], &[in_b], "post", "usage: post#TEXT");
    expect_error(d.addr, &[login_b], &[in_b], "send#alice&", "usage: send#USER&TEXT");

    // Nothing reached alice's inbox.
    let alice = script_ok(d.addr, &["login#alice&secret", "retrieve#5"]);
    assert_eq!(alice, vec!["logged in as alice", "no messages"]);
}

#[test]
fn registration_closed() {
    let d = daemon_with("allow_registration = false");
    expect_error(d.addr, &[], &[], "register#alice&secret", "error: registration is closed on this server");
    // Nobody exists: logging in fails the usual way.
    expect_error(d.addr, &[], &[], "login#alice&secret", BAD_CREDENTIALS);
}

#[test]
fn usage_errors_as_the_user_sees_them() {
    let d = daemon();
    let a = d.addr;
    let unknown = |name: &str| format!("unknown command '{name}': type help for the list of commands");
    expect_error(a, &[], &[], "frobnicate#x", &unknown("frobnicate"));
    // No prefixes, no extensions; a near miss gets the likely name.
    expect_error(a, &[], &[], "posting#x", "unknown command 'posting': did you mean post?");
    expect_error(a, &[], &[], "logoutx", "unknown command 'logoutx': did you mean logout?");
    expect_error(a, &[], &[], "loign#alice&secret", "unknown command 'loign': did you mean login?");
    // Missing or extra arguments give the usage line.
    expect_error(a, &[], &[], "login#alice", "usage: login#USER&PASSWORD");
    expect_error(a, &[], &[], "login#alice&", "usage: login#USER&PASSWORD");
    expect_error(a, &[], &[], "login", "usage: login#USER&PASSWORD");
    expect_error(a, &[], &[], "register#bob", "usage: register#USER&PASSWORD");
    expect_error(a, &[], &[], "subscribe", "usage: subscribe#USER");
    expect_error(a, &[], &[], "retrieve#ten", "usage: retrieve#N");
    expect_error(a, &[], &[], "retrieve#-1", "usage: retrieve#N");
    expect_error(a, &[], &[], "logout#now", "usage: logout");
    // Words instead of # and &: the right syntax, never the password.
    expect_error(
        a,
        &[],
        &[],
        "login alice secret",
        "usage: login#USER&PASSWORD (did you mean login#alice&...?)",
    );
    expect_error(a, &[], &[], "post hi", "usage: post#TEXT (did you mean post#hi?)");

    // A usage error does not stop the script: later commands still run.
    let out = script(a, &["frobnicate", "ping"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stderr, vec![unknown("frobnicate")]);
    assert_eq!(out.stdout.len(), 1, "{out:#?}");
    assert!(out.stdout[0].starts_with("pong in "), "{out:#?}");

    // Blank commands are ignored; help goes to stdout and is not a failure.
    let out = script(a, &["", "   ", "help"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout.first().map(String::as_str), Some("commands (names in any case):"), "{out:#?}");
    assert!(out.stdout.iter().any(|l| l.contains("login#USER&PASSWORD")), "{out:#?}");
    assert!(out.stderr.is_empty(), "{out:#?}");
}

/// Names in any case, spaces around them, and stray spaces after user names, numbers and
/// patterns: the command runs as meant.
#[test]
fn commands_in_any_case_and_with_stray_spaces() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");
    let out = script_ok(
        d.addr,
        &["Login#alice&secret", "SUBSCRIBE#bob ", " whoami", "users #b* ", "Retrieve# 3 ", "Ping"],
    );
    assert_eq!(out.len(), 6, "{out:#?}");
    assert_eq!(out[1], "subscribed to bob");
    assert_eq!(out[2], "alice (1 session(s))");
    assert_eq!(out[3], "bob");
    assert_eq!(out[4], "no messages");
    assert!(out[5].starts_with("pong in "), "{out:#?}");
}

/// A text the daemon could not decode (over the protocol's 1024 bytes, so over one datagram) is
/// refused before anything is sent, with its size, instead of "no answer" six seconds later.
#[test]
fn oversize_text_is_refused_by_the_client() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    for (line, error) in [
        (format!("post#{}", "x".repeat(1190)), "error: text too long: 1190 bytes, at most 1024"),
        (format!("post#{}", "x".repeat(1200)), "error: text too long: 1200 bytes, at most 1024"),
        (format!("post#{}", "😀".repeat(300)), "error: text too long: 1200 bytes, at most 1024"),
        (format!("send#bob&{}", "x".repeat(1100)), "error: text too long: 1100 bytes, at most 1024"),
        (
            format!("subscribe#{}", "b".repeat(40)),
            "error: invalid name: 1 to 32 characters from A-Z a-z 0-9 _ . -",
        ),
        // A control character would be refused by the daemon: said here, in its words.
        (
            "post#tab\there".to_string(),
            "error: text contains the control character U+0009; only newline is allowed",
        ),
    ] {
        let start = Instant::now();
        let out = run_client(addr, &[&line], "");
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert_eq!(out.stderr, vec![error.to_string()]);
        assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    }
    silent.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 2048];
    assert!(silent.recv_from(&mut buf).is_err(), "nothing may be sent for a refused line");
}

// -------------------------------------------------------------------------------- 5. --json

#[test]
fn json_output_is_one_object_per_line() {
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");

    let mut alice = LiveClient::start(d.addr, &["--json"]);
    alice.send("login#alice&secret");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["command"] == "login");
    assert_eq!(v["type"], "ok", "{v}");
    assert_eq!(v["user"], "alice", "{v}");
    alice.send("subscribe#bob");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["command"] == "subscribe");
    assert_eq!(v["type"], "ok", "{v}");
    assert_eq!(v["user"], "bob", "{v}");

    // The text travels as a plain JSON string, quotes, backslashes and all.
    let text = r#"hi "there" \ ü & #1"#;
    let post = format!("post#{text}");
    let bob = run_client(d.addr, &["--json", "login#bob&hunter22", &post], "");
    assert_eq!(bob.code, Some(0), "{bob:#?}");
    assert!(bob.stderr.is_empty(), "{bob:#?}");
    let bob = parse_json_lines(&bob.stdout);
    assert_eq!(bob.len(), 2, "{bob:#?}");
    assert_eq!(bob[0]["type"], "ok");
    assert_eq!(bob[0]["command"], "login");
    assert_eq!(bob[0]["missed"], 0);
    assert_eq!(bob[1]["type"], "ok");
    assert_eq!(bob[1]["command"], "post");
    assert_eq!(bob[1]["recipients"], 1);
    assert!(bob[1]["id"].is_u64(), "{:?}", bob[1]);

    let push = wait_json(&mut alice.stdout, "alice push", |v| v["type"] == "push");
    assert_eq!(push["author"], "bob", "{push}");
    assert_eq!(push["text"], text, "{push}");
    assert_eq!(push["to"], Value::Null, "{push}");
    assert_eq!(push["id"], bob[1]["id"], "{push}");

    alice.send("retrieve#5");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["command"] == "retrieve");
    assert_eq!(v["type"], "ok", "{v}");
    let msgs = v["messages"].as_array().expect("messages array");
    assert_eq!(msgs.len(), 1, "{v}");
    assert_eq!(msgs[0]["author"], "bob");
    assert_eq!(msgs[0]["text"], text);

    // Errors from the server and usage errors are JSON objects too, on stdout.
    alice.send("subscribe#carol");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["command"] == "subscribe" && v["type"] == "error");
    assert_eq!(v["code"], "NoSuchUser", "{v}");
    assert_eq!(v["message"], "no such user carol", "{v}");
    alice.send("post#");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["code"] == "Usage");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["command"], "post", "{v}");
    assert_eq!(v["message"], "usage: post#TEXT", "{v}");
    alice.send("frobnicate");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["code"] == "UnknownCommand");
    assert_eq!(v["command"], Value::Null, "{v}");
    assert_eq!(v["message"], "unknown command 'frobnicate': type help for the list of commands");
    alice.send("logout");
    wait_json(&mut alice.stdout, "alice", |v| v["command"] == "logout" && v["type"] == "ok");
    alice.send("post#x");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["command"] == "post" && v["code"] == "NotLoggedIn");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["message"], "not logged in: use login#USER&PASSWORD first", "{v}");

    // help is an object too, listing every command.
    alice.send("help");
    let v = wait_json(&mut alice.stdout, "alice", |v| v["type"] == "help");
    let commands = v["commands"].as_array().expect("commands");
    assert_eq!(commands.len(), udpmsg::command::COMMANDS.len(), "{v}");
    assert_eq!(commands[0]["usage"], "register#USER&PASSWORD", "{v}");

    assert_eq!(quit(&mut alice), Some(1));
    let all = alice.stdout.rest(Duration::from_secs(5));
    // login, subscribe, push, retrieve, 3 errors, logout, 1 error, help: nothing else.
    assert_eq!(parse_json_lines(&all).len(), 10, "{all:#?}");
    assert!(alice.stderr.rest(Duration::from_secs(5)).is_empty(), "{:#?}", alice.stderr.seen);
}

// ---------------------------------------------------------------- 6. --script and arguments

#[test]
fn commands_as_arguments() {
    let d = daemon();

    let ok = run_client(d.addr, &["ping"], "");
    assert_eq!(ok.code, Some(0), "{ok:#?}");
    assert_eq!(ok.stdout.len(), 1, "{ok:#?}");
    assert!(ok.stdout[0].starts_with("pong in ") && ok.stdout[0].ends_with(" ms"), "{ok:#?}");
    assert!(ok.stderr.is_empty(), "{ok:#?}");

    // Several commands, run in order; one failure makes the exit status 1 but does not stop
    // the rest.
    register(d.addr, "carol", "secret");
    let out = run_client(d.addr, &["login#carol&secret", "subscribe#nobody", "whoami"], "");
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stdout, vec!["logged in as carol", "carol (1 session(s))"]);
    assert_eq!(out.stderr, vec!["error: no such user nobody"]);
}

/// `--script FILE` reads the commands from FILE, not from stdin.
#[test]
fn commands_from_a_script_file() {
    let d = daemon();
    let dir = TempDir::new("script");
    let file = dir.path().join("commands.txt");
    std::fs::write(&file, "register#carol&secret\nlogin#carol&secret\n\nwhoami\n").unwrap();
    let out = run_client(d.addr, &["--script", file.to_str().unwrap()], "frobnicate\n");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(
        out.stdout,
        vec![
            "registered carol; logging in",
            "logged in as carol",
            "logged out carol",
            "logged in as carol",
            "carol (1 session(s))"
        ]
    );
    assert!(out.stderr.is_empty(), "{out:#?}");

    // A failing command in the file makes the exit status 1.
    std::fs::write(&file, "login#carol&secret\nsubscribe#carol\nwhoami\n").unwrap();
    let out = run_client(d.addr, &["--script", file.to_str().unwrap()], "");
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stdout, vec!["logged in as carol", "carol (1 session(s))"]);
    assert_eq!(out.stderr, vec!["error: you cannot subscribe to yourself"]);

    // A script file that does not exist.
    let missing = dir.path().join("missing.txt");
    let out = run_client(d.addr, &["--script", missing.to_str().unwrap()], "");
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.iter().any(|l| l.contains("missing.txt")), "{out:#?}");
}

/// A script-mode client leaves as soon as its input ends (stdin closed, or the end of a
/// `--script` file) and nothing is outstanding. Regression test for a lost wake-up: the input
/// thread used to hold the only reference to the loop's waker, closed its eventfd right after the
/// final wake-up, and the client then slept forever in epoll (about half the runs).
#[test]
fn script_mode_exits_promptly_when_its_input_ends() {
    let d = daemon();
    let dir = TempDir::new("eof");
    let file = dir.path().join("commands.txt");
    std::fs::write(&file, "ping\n").unwrap();
    let server = d.addr.to_string();
    let t = Duration::from_secs(5);
    for i in 0..10 {
        let e = run_bin("udpmsg", &["--server", &server], dir.path(), Some("ping\n"), t);
        assert_eq!(e.code, Some(0), "run {i}, commands on stdin: {e:#?}");
        assert!(e.stdout.starts_with("pong in "), "{e:#?}");
        let e = run_bin(
            "udpmsg",
            &["--server", &server, "--script", file.to_str().unwrap()],
            dir.path(),
            None,
            t,
        );
        assert_eq!(e.code, Some(0), "run {i}, commands from --script: {e:#?}");
        assert!(e.stdout.starts_with("pong in "), "{e:#?}");
    }

    // A live client that is logged out (so no timer would wake it) and had a command fail
    // leaves with status 1 right after its stdin closes.
    register(d.addr, "alice", "secret");
    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&secret");
    alice.send("logout");
    wait_line(&mut alice.stdout, "alice", "logged out alice");
    alice.send("post#x");
    wait_line(&mut alice.stderr, "alice", NOT_LOGGED_IN);
    let start = Instant::now();
    assert_eq!(alice.finish(), Some(1), "took {:?}", start.elapsed());
    assert!(start.elapsed() < t, "took {:?}", start.elapsed());

    // Logged in, it does not wait for its next keepalive either.
    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&secret");
    wait_line(&mut alice.stdout, "alice", "logged in as alice");
    let start = Instant::now();
    assert_eq!(alice.finish(), Some(0), "took {:?}", start.elapsed());
    assert!(start.elapsed() < t, "took {:?}", start.elapsed());
}

// ------------------------------------------------------------------------------ 7. no answer

#[test]
fn no_answer_gives_up_after_the_configured_tries() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let dir = TempDir::new("noanswer");
    let cfg = dir.path().join("client.toml");
    std::fs::write(
        &cfg,
        "request_initial_timeout_ms = 50\nrequest_min_timeout_ms = 10\nrequest_max_tries = 3\n",
    )
    .unwrap();

    let start = Instant::now();
    let out = run_client(addr, &["--config", cfg.to_str().unwrap(), "ping"], "");
    let took = start.elapsed();
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr,
        vec![format!("error: ping: no answer from 127.0.0.1:{} after 3 tries", addr.port())]
    );
    assert!(out.stdout.is_empty(), "{out:#?}");
    // 50 + 100 + 200 ms of backoff, plus process start-up.
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The client really sent three times.
    silent.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while silent.recv_from(&mut buf).is_ok() {
        assert_eq!(&buf[..3], b"UM\x03");
        got += 1;
    }
    assert_eq!(got, 3);
}

// ------------------------------------------------------------------------ 8. protocol versions

#[test]
fn daemon_answers_another_version_with_its_header_and_an_echo() {
    let d = daemon();
    let sock = raw_socket();
    for (datagram, expected) in [
        (&b"UM\x01"[..], &b"Um\x03"[..]),
        (b"UM\x01\x00\x01\x02\x03 anything at all", b"Um\x03\xff\x00\x01\x02\x03 anything a"),
        (b"UM\xff\x00", b"Um\x03\xff"),
    ] {
        let mut answer = None;
        for _ in 0..10 {
            sock.send_to(datagram, d.addr).unwrap();
            let mut buf = [0u8; 2048];
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                assert_eq!(from, d.addr);
                answer = Some(buf[..n].to_vec());
                break;
            }
        }
        assert_eq!(answer.as_deref(), Some(expected), "answer to {datagram:?}");
        assert!(expected.len() <= datagram.len());
    }
}

/// A fake server on 127.0.0.1 that answers every datagram with a v7 version notice (echoing it,
/// as daemons since v3 do); returns its address, its stop flag and the thread (which returns how
/// many datagrams it got).
fn fake_v7_server() -> (SocketAddr, Arc<AtomicBool>, thread::JoinHandle<usize>) {
    let fake = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    fake.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = fake.recv_from(&mut buf) {
                    seen += 1;
                    let mut notice = udpmsg::proto::version_notice(&buf[..n]);
                    notice[2] = 7;
                    let _ = fake.send_to(&notice, from);
                }
            }
            seen
        })
    };
    (addr, stop, handle)
}

#[test]
fn client_reports_a_server_of_another_version() {
    let (addr, stop, server) = fake_v7_server();
    let start = Instant::now();
    let out = run_client(addr, &["ping", "ping"], "");
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = server.join().unwrap();
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(out.stderr, vec!["error: ping: server speaks protocol v7, this client speaks v3"], "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");
    // It gives up at once instead of retrying, and runs nothing after it.
    assert_eq!(seen, 1, "datagrams the fake server received");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // --json reports it as an error object with both versions.
    let (addr, stop, server) = fake_v7_server();
    let out = run_client(addr, &["--json", "ping"], "");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert_eq!(out.code, Some(1), "{out:#?}");
    let v = parse_json_lines(&out.stdout);
    assert_eq!(v.len(), 1, "{out:#?}");
    assert_eq!(v[0]["type"], "error");
    assert_eq!(v[0]["code"], "VersionMismatch");
    assert_eq!(v[0]["server_version"], 7);
    assert_eq!(v[0]["client_version"], udpmsg::proto::VERSION);
    assert_eq!(v[0]["message"], "server speaks protocol v7, this client speaks v3");
}

#[test]
fn garbage_gets_no_answer_and_the_daemon_keeps_serving() {
    use udpmsg::proto::{encode_client, ClientMsg, Request, RequestBody};
    let d = daemon();
    let sock = raw_socket();
    // An unpadded login is well-formed but too short to be answered (anti-amplification).
    let short_login = encode_client(&ClientMsg::Request(Request {
        id: 9,
        token: None,
        body: RequestBody::Login {
            user: "alice".into(),
            password: "secret".into(),
            cookie: None,
            pad: vec![],
        },
    }));
    assert!(short_login.len() < udpmsg::proto::MIN_UNAUTHENTICATED_REQUEST);
    let mut trailing = ping_datagram(10);
    trailing.push(0);
    let garbage: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"U".to_vec(),
        b"UM".to_vec(),
        b"hello, daemon".to_vec(),
        b"XX\x01\x00".to_vec(),
        b"UM\x03".to_vec(),
        b"UM\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        vec![0u8; 1500],
        [&b"UM\x03"[..], &[7u8; 1300][..]].concat(),
        trailing,
        short_login,
    ];
    for g in &garbage {
        sock.send_to(g, d.addr).unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Err(e) => {
            assert!(matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}")
        }
        Ok((n, _)) => panic!("garbage was answered with {:?}", &buf[..n]),
    }

    // Still serving: a raw request is answered, and so is a real client.
    match raw_ping(&sock, d.addr, 11) {
        udpmsg::proto::ServerMsg::Reply { id, result } => {
            assert_eq!(id, 11);
            assert_eq!(result, Ok(udpmsg::proto::Response::Pong));
        }
        other => panic!("unexpected {other:?}"),
    }
    let out = run_client(d.addr, &["ping"], "");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout[0].starts_with("pong in "), "{out:#?}");
}

// ---------------------------------------------------------------------- 9. config errors

fn udpmsgd_with(dir: &Path, config: &Path) -> Exit {
    let args = ["--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir", "data"];
    run_bin("udpmsgd", &args, dir, None, Duration::from_secs(10))
}

#[test]
fn daemon_config_errors_exit_2_before_binding() {
    let dir = TempDir::new("badcfg");

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "lisen = \"x\"\n").unwrap();
    let e = udpmsgd_with(dir.path(), &unknown);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("lisen"), "{e:#?}");
    assert!(e.stderr.contains(unknown.to_str().unwrap()), "{e:#?}");
    assert!(!e.stdout.contains("listening on"), "{e:#?}");

    let range = dir.path().join("range.toml");
    std::fs::write(&range, "max_text_bytes = 5000\n").unwrap();
    let e = udpmsgd_with(dir.path(), &range);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("max_text_bytes"), "{e:#?}");
    assert!(e.stderr.contains("1..=1024"), "{e:#?}");
    assert!(e.stderr.contains(range.to_str().unwrap()), "{e:#?}");
    assert!(!e.stdout.contains("listening on"), "{e:#?}");

    // A wrongly typed value names the key too.
    let typed = dir.path().join("typed.toml");
    std::fs::write(&typed, "max_text_bytes = \"lots\"\n").unwrap();
    let e = udpmsgd_with(dir.path(), &typed);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("max_text_bytes"), "{e:#?}");

    // A config file named on the command line must exist.
    let e = udpmsgd_with(dir.path(), &dir.path().join("missing.toml"));
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("missing.toml"), "{e:#?}");

    // server.toml in the working directory is read when no --config is given.
    std::fs::write(dir.path().join("server.toml"), "max_name_len = 0\n").unwrap();
    let e = run_bin("udpmsgd", &["--listen", "127.0.0.1:0"], dir.path(), None, Duration::from_secs(10));
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("max_name_len") && e.stderr.contains("1..=32"), "{e:#?}");
    assert!(e.stderr.contains("server.toml"), "{e:#?}");
    assert!(e.took < Duration::from_secs(5), "{e:#?}");
}

#[test]
fn client_config_errors_exit_2() {
    let dir = TempDir::new("badclientcfg");
    let t = Duration::from_secs(10);
    // Port 9 (discard): nothing should ever be sent there; the client must stop before.
    let run = |args: &[&str]| run_bin("udpmsg", args, dir.path(), None, t);

    let tries = dir.path().join("tries.toml");
    std::fs::write(&tries, "request_max_tries = 0\n").unwrap();
    let e = run(&["--config", tries.to_str().unwrap(), "--server", "127.0.0.1:9", "ping"]);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("request_max_tries"), "{e:#?}");
    assert!(e.stderr.contains("1..=100"), "{e:#?}");
    assert!(e.stderr.contains(tries.to_str().unwrap()), "{e:#?}");

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "sever = \"127.0.0.1:1\"\n").unwrap();
    let e = run(&["--config", unknown.to_str().unwrap(), "ping"]);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("sever"), "{e:#?}");
    assert!(e.stderr.contains(unknown.to_str().unwrap()), "{e:#?}");

    let missing = dir.path().join("missing.toml");
    let e = run(&["--config", missing.to_str().unwrap(), "ping"]);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("missing.toml"), "{e:#?}");

    // client.toml in the working directory is read when no --config is given.
    std::fs::write(dir.path().join("client.toml"), "ping_interval_secs = 0\n").unwrap();
    let e = run(&["--server", "127.0.0.1:9", "ping"]);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("ping_interval_secs") && e.stderr.contains("client.toml"), "{e:#?}");
    assert!(e.took < Duration::from_secs(5), "{e:#?}");
}

// ------------------------------------------------------------------- 10. and 11. the daemon

#[test]
fn daemon_stops_cleanly_on_sigterm() {
    let mut d = daemon();
    register(d.addr, "alice", "secret");
    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&secret");
    wait_line(&mut alice.stdout, "alice", "logged in as alice");
    let start = Instant::now();
    let stopped = d.stop();
    assert!(stopped, "udpmsgd did not exit with status 0 on SIGTERM: {:?}", d.child.try_wait());
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn daemon_starts_on_defaults_without_a_config_file() {
    let dir = TempDir::new("defaults");
    let mut child = common::daemon_command("udpmsgd")
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udpmsgd");
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    let Some(line) = stdout.wait_for(Duration::from_secs(20), |l| l.starts_with("listening on ")) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no listening line; stderr {:#?}", stderr.rest(Duration::from_secs(1)));
    };
    let addr: SocketAddr = line["listening on ".len()..].parse().expect("an address");
    assert_ne!(addr.port(), 0, "{line}");
    assert_eq!(line, format!("listening on 127.0.0.1:{}", addr.port()));

    // It serves.
    let out = run_client(addr, &["ping"], "");
    assert_eq!(out.code, Some(0), "{out:#?}");

    // And stops cleanly.
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(status.is_some_and(|s| s.success()), "status {status:?}");
}

// ------------------------------------------------------------------------ 12. addresses

/// `--server`, `server` in client.toml and `--listen` take names and default the port to 7070,
/// instead of being refused as invalid socket addresses.
#[test]
fn addresses_take_names_and_a_default_port() {
    let dir = TempDir::new("names");
    let mut child = common::daemon_command("udpmsgd")
        .args(["--listen", "localhost:0", "--data-dir", "data"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn udpmsgd");
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let line = stdout.wait_for(Duration::from_secs(20), |l| l.starts_with("listening on "));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("udpmsgd --listen localhost:0 listens");
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line}");

    let d = daemon();
    let port = d.addr.port();
    let t = Duration::from_secs(10);
    let e = run_bin("udpmsg", &["--server", &format!("localhost:{port}"), "ping"], dir.path(), None, t);
    assert_eq!(e.code, Some(0), "{e:#?}");
    assert!(e.stdout.starts_with("pong in "), "{e:#?}");
    std::fs::write(dir.path().join("client.toml"), format!("server = \"localhost:{port}\"\n")).unwrap();
    let e = run_bin("udpmsg", &["ping"], dir.path(), None, t);
    assert_eq!(e.code, Some(0), "client.toml server = localhost:PORT: {e:#?}");

    // Without a port: 7070. Shown with a stand-in daemon there, when the port is free here.
    std::fs::write(dir.path().join("client.toml"), "server = \"localhost\"\nrequest_max_tries = 1\n")
        .unwrap();
    match UdpSocket::bind("127.0.0.1:7070") {
        Ok(fake) => {
            fake.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let client = thread::spawn({
                let dir = dir.path().to_path_buf();
                move || run_bin("udpmsg", &["ping"], &dir, None, Duration::from_secs(10))
            });
            let mut buf = [0u8; 2048];
            let got = fake.recv_from(&mut buf);
            assert!(got.is_ok_and(|(n, _)| buf[..n].starts_with(b"UM")), "nothing came to 127.0.0.1:7070");
            let _ = client.join();
        }
        Err(e) => eprintln!(
            "note: 127.0.0.1:7070 is taken here ({e}); the default port is shown by unit tests only"
        ),
    }

    // What is not an address is a configuration error naming the flag.
    let e = run_bin("udpmsg", &["--server", "localhost:port", "ping"], dir.path(), None, t);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.contains("--server") && e.stderr.contains("localhost:port"), "{e:#?}");
    let e = run_bin("udpmsg", &["--server", "no-such-host.invalid", "ping"], dir.path(), None, t);
    assert_eq!(e.code, Some(1), "{e:#?}");
    assert!(e.stderr.contains("cannot resolve no-such-host.invalid"), "{e:#?}");
}

// ----------------------------------------------------------------------------- 13. times

/// Every message says when it was posted: local time for people (here TZ=IST-5:30, a POSIX
/// zone, so no time zone database is needed), RFC 3339 in UTC with --json; pushes and retrieve
/// alike, retrieve's marked as history.
#[test]
fn messages_carry_their_posting_time() {
    use jiff::{tz::TimeZone, Timestamp};
    let d = daemon();
    register(d.addr, "alice", "secret");
    register(d.addr, "bob", "hunter22");
    script_ok(d.addr, &["login#alice&secret", "subscribe#bob"]);
    let before = Timestamp::now();
    script_ok(d.addr, &["login#bob&hunter22", "post#what time is it?"]);

    let json = run_client(d.addr, &["--json", "login#alice&secret", "retrieve#1"], "");
    assert_eq!(json.code, Some(0), "{json:#?}");
    let v = parse_json_lines(&json.stdout);
    // The catch-up push (alice was away when bob posted), then retrieve's copy.
    assert_eq!(v[1]["type"], "push", "{v:#?}");
    let m = &v[2]["messages"][0];
    assert_eq!(v[1]["time"], m["time"], "{v:#?}");
    let time: Timestamp = m["time"].as_str().expect("an RFC 3339 string").parse().expect("RFC 3339");
    assert!(m["time"].as_str().unwrap().ends_with('Z'), "UTC: {m}");
    assert!(time >= before - jiff::SignedDuration::from_secs(1) && time <= Timestamp::now(), "{m}");

    let out = Command::new(bin("udpmsg"))
        .args(["--server", &d.addr.to_string(), "login#alice&secret", "retrieve#1"])
        .env("TZ", "IST-5:30")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let zone = TimeZone::posix("IST-5:30").unwrap();
    let at = time.to_zoned(zone.clone());
    let today = at.date() == Timestamp::now().to_zoned(zone).date();
    let when =
        if today { at.strftime("%H:%M").to_string() } else { at.strftime("%Y-%m-%d %H:%M").to_string() };
    // (The --json run above caught alice up: no push this time.)
    assert_eq!(lines[1..], [HISTORY_1.to_string(), format!("  {when} [bob] what time is it?")], "{stdout}");
}

// ------------------------------------------------------------------ 14. the daemon's command line

/// `udpmsgd ARGS` in `dir` with `env` set (and no other UDPMSG_* variable), stdin closed.
fn udpmsgd_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Exit {
    let start = Instant::now();
    let mut cmd = common::daemon_command("udpmsgd");
    cmd.args(args).current_dir(dir).env("RUST_LOG", "info").stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run udpmsgd");
    Exit {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        took: start.elapsed(),
    }
}

/// Admin commands never create a database: without --data-dir (or with a wrong one) they say
/// where they looked, instead of creating ./data/udpmsg.db and listing nobody.
#[test]
fn admin_commands_never_create_a_database() {
    let dir = TempDir::new("admin-nodb");
    for args in [&["user", "list"][..], &["user", "del", "alice"], &["user", "passwd", "alice"]] {
        let e = udpmsgd_env(args, dir.path(), &[]);
        assert_eq!(e.code, Some(1), "{args:?}: {e:#?}");
        assert_eq!(
            e.stderr,
            "udpmsgd: no database at ./data/udpmsg.db (use --data-dir, or start udpmsgd once to create it there)",
            "{args:?}"
        );
        assert!(!dir.path().join("data").exists(), "{args:?} created ./data");
    }
    // With the daemon's data directory, they work.
    let d = daemon();
    let data = d.dir.path().join("data");
    let e = udpmsgd_env(&["--data-dir", data.to_str().unwrap(), "user", "list"], dir.path(), &[]);
    assert_eq!(e.code, Some(0), "{e:#?}");
}

/// The address is printed once (stdout, for scripts), not also in the log; a daemon that cannot
/// bind says so once, before creating any database; a new database is created at the current
/// schema, without a migration per old version.
#[test]
fn the_daemon_says_things_once_and_in_order() {
    let dir = TempDir::new("once");
    let mut child = common::daemon_command("udpmsgd")
        .args(["--listen", "127.0.0.1:0", "--data-dir", "first"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    let line =
        stdout.wait_for(Duration::from_secs(20), |l| l.starts_with("listening on ")).expect("listening");
    let addr = line["listening on ".len()..].to_string();

    let e = udpmsgd_env(&["--listen", &addr, "--data-dir", "second"], dir.path(), &[]);
    assert_eq!(e.code, Some(1), "{e:#?}");
    assert_eq!(e.stderr.matches("cannot bind").count(), 1, "{e:#?}");
    assert!(e.stderr.starts_with(&format!("udpmsgd: cannot bind {addr}: ")), "{e:#?}");
    assert!(!dir.path().join("second").exists(), "a database was created before the bind failed");

    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    assert!(wait_timeout(&mut child, Duration::from_secs(10)).is_some_and(|s| s.success()));
    let out = stdout.rest(Duration::from_secs(5));
    let err = stderr.rest(Duration::from_secs(5));
    assert_eq!(out, vec![format!("listening on {addr}")]);
    assert!(!err.iter().any(|l| l.contains(&addr)), "the address again in the log: {err:#?}");
    assert!(err.iter().any(|l| l.contains("created a new database (schema version")), "{err:#?}");
    assert!(!err.iter().any(|l| l.contains("migrat")), "a new database needs no migration: {err:#?}");
}

/// Each configuration error names where the value came from: the environment, a flag, or the
/// file with its line; an unknown key gets the likely one and the list of all.
#[test]
fn configuration_errors_name_their_origin() {
    let dir = TempDir::new("cfg-origin");
    let check = |env: &[(&str, &str)], args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["config", "check"]);
        udpmsgd_env(&all, dir.path(), env)
    };
    // From the environment, with no server.toml anywhere.
    let e = check(&[("UDPMSG_MAX_TEXT_BYTES", "abc")], &[]);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert_eq!(
        e.stderr,
        "udpmsgd: environment UDPMSG_MAX_TEXT_BYTES: invalid value \"abc\" for `max_text_bytes`: \
         invalid type: string \"abc\", expected u32"
    );
    let e = check(&[("UDPMSG_MAX_RETRIEVE", "0")], &[]);
    assert!(e.stderr.starts_with("udpmsgd: environment UDPMSG_MAX_RETRIEVE: invalid value 0"), "{e:#?}");
    let e = check(&[("UDPMSG_MAX_TXT_BYTES", "5")], &[]);
    assert_eq!(e.code, Some(0), "an unknown variable is ignored: {e:#?}");
    assert!(
        e.stderr.contains("UDPMSG_MAX_TXT_BYTES: no such setting (did you mean UDPMSG_MAX_TEXT_BYTES?)"),
        "{e:#?}"
    );
    // From a flag.
    let e = check(&[], &["--listen", "localhost:x"]);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(e.stderr.starts_with("udpmsgd: --listen: invalid address \"localhost:x\""), "{e:#?}");
    // From the file, with the line.
    std::fs::write(dir.path().join("server.toml"), "# limits\nmax_inbox = 10\nmax_txt_bytes = 5\n").unwrap();
    let e = check(&[], &[]);
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(
        e.stderr.starts_with("udpmsgd: server.toml:3: unknown key `max_txt_bytes` (did you mean `max_text_bytes`?); the keys are: "),
        "{e:#?}"
    );
    assert!(e.stderr.contains("listen, log_level"), "every key listed: {e:#?}");
    std::fs::write(dir.path().join("server.toml"), "max_inbox = 10\nmax_text_bytes = \"lots\"\n").unwrap();
    let e = check(&[], &[]);
    assert!(
        e.stderr.starts_with("udpmsgd: server.toml:2: invalid value \"lots\" for `max_text_bytes`"),
        "{e:#?}"
    );
    std::fs::remove_file(dir.path().join("server.toml")).unwrap();

    // The client's file, the same way.
    std::fs::write(dir.path().join("client.toml"), "\nsever = \"localhost\"\n").unwrap();
    let e = run_bin("udpmsg", &["ping"], dir.path(), None, Duration::from_secs(10));
    assert_eq!(e.code, Some(2), "{e:#?}");
    assert!(
        e.stderr.starts_with(
            "udpmsg: client.toml:2: unknown key `sever` (did you mean `server`?); the keys are: "
        ),
        "{e:#?}"
    );
}

// ------------------------------------------------------------------- 15. leaving and sessions

/// `whoami` as a script that counts its own session: how many `user` has besides.
fn other_sessions(addr: SocketAddr, user: &str, password: &str) -> usize {
    let out = script_ok(addr, &[&format!("login#{user}&{password}"), "whoami"]);
    let n: usize = out[1][user.len() + 2..].split(' ').next().unwrap().parse().unwrap();
    n - 1
}

/// A script logs out when it ends: sixteen runs no longer use up the sixteen sessions a user may
/// have (they used to lock carol out for five minutes), and none lingers.
#[test]
fn scripts_log_out_when_they_end() {
    let d = daemon();
    register(d.addr, "carol", "secret");
    for i in 0..20 {
        let out = script_ok(d.addr, &["login#carol&secret", "whoami"]);
        assert_eq!(out, vec!["logged in as carol", "carol (1 session(s))"], "run {i}");
    }
    // --keep-session keeps it, for whoever wants that.
    let out = run_client(d.addr, &["--keep-session", "login#carol&secret"], "");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(other_sessions(d.addr, "carol", "secret"), 1);
}

/// A login while logged in ends that session first, and says so.
#[test]
fn a_login_while_logged_in_ends_that_session_first() {
    let d = daemon();
    register(d.addr, "erin", "secret");
    register(d.addr, "bob", "hunter22");
    let mut c = LiveClient::start(d.addr, &[]);
    c.send("login#erin&secret");
    wait_line(&mut c.stdout, "client", "logged in as erin");
    c.send("login#bob&hunter22");
    wait_line(&mut c.stdout, "client", "logged out erin");
    wait_line(&mut c.stdout, "client", "logged in as bob");
    assert_eq!(other_sessions(d.addr, "erin", "secret"), 0, "erin's session is gone");
    // A wrong password while logged in: the old session ended, the new one did not start.
    c.send("login#erin&wrong");
    wait_line(&mut c.stdout, "client", "logged out bob");
    wait_line(&mut c.stderr, "client", BAD_CREDENTIALS);
    c.send("whoami");
    wait_line(&mut c.stderr, "client", NOT_LOGGED_IN);
    assert_eq!(other_sessions(d.addr, "bob", "hunter22"), 0);
}

/// A registration logs in to the new account, unless someone else is logged in.
#[test]
fn registration_logs_in_unless_someone_else_is() {
    let d = daemon();
    let out = script_ok(d.addr, &["register#alice&secret", "whoami", "register#bob&hunter22", "whoami"]);
    assert_eq!(
        out,
        vec![
            "registered alice; logging in",
            "logged in as alice",
            "alice (1 session(s))",
            "registered bob; you are still logged in as alice (login#bob&PASSWORD switches)",
            "alice (1 session(s))",
        ]
    );
}

/// SIGINT ends a script: it abandons what is in flight, logs out, and exits 130.
#[test]
fn sigint_ends_a_script_logging_out() {
    let silent_for_a_while = daemon();
    register(silent_for_a_while.addr, "carol", "secret");
    let mut c = LiveClient::start(silent_for_a_while.addr, &[]);
    c.send("login#carol&secret");
    wait_line(&mut c.stdout, "client", "logged in as carol");
    assert_eq!(other_sessions(silent_for_a_while.addr, "carol", "secret"), 1);
    let _ = Command::new("kill").arg("-INT").arg(c.child.id().to_string()).status();
    let status = wait_timeout(&mut c.child, Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(130));
    assert_eq!(other_sessions(silent_for_a_while.addr, "carol", "secret"), 0, "logged out on the way out");
}

/// A logout that gets no answer delays the exit by 2 s at most, and the user hears why.
#[test]
fn leaving_waits_for_the_logout_two_seconds_at_most() {
    let d = daemon();
    register(d.addr, "carol", "secret");
    // Through a proxy that the test closes after the login: the logout goes nowhere.
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let forwarder = {
        let (stop, release) = (stop.clone(), release.clone());
        let daemon = d.addr;
        thread::spawn(move || {
            relay.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
            upstream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut client = None;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = relay.recv_from(&mut buf) {
                    client = Some(from);
                    let _ = upstream.send_to(&buf[..n], daemon);
                }
                if let (Ok((n, _)), Some(c)) = (upstream.recv_from(&mut buf), client) {
                    let _ = relay.send_to(&buf[..n], c);
                }
            }
            // Keep the port, silently (no refusals), until the client is gone.
            while !release.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut c = LiveClient::start(relay_addr, &[]);
    c.send("login#carol&secret");
    wait_line(&mut c.stdout, "client", "logged in as carol");
    stop.store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let code = c.finish();
    let took = start.elapsed();
    release.store(true, Ordering::Relaxed);
    assert_eq!(code, Some(0), "the commands succeeded");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(4), "took {took:?}");
    wait_line(
        &mut c.stderr,
        "client",
        &format!("could not log out carol (no answer from {relay_addr} within 2 s); the session ends when it idles out"),
    );
    forwarder.join().unwrap();
}

// --------------------------------------------------------------------------- 16. connecting

/// Against a port where nothing listens, a command fails at once, naming itself (it waited 23 s
/// in silence); a timeout names its command too.
#[test]
fn nothing_listening_fails_at_once() {
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let start = Instant::now();
    let out = run_client(addr, &["ping", "login#alice&secret"], "");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        out.stderr,
        vec![
            format!("error: ping: nothing listens at {addr} (connection refused)"),
            format!("error: login: nothing listens at {addr} (connection refused)"),
        ]
    );
    let out = run_client(addr, &["--json", "ping"], "");
    let v = parse_json_lines(&out.stdout);
    assert_eq!(
        (v[0]["type"].as_str(), v[0]["command"].as_str(), v[0]["code"].as_str()),
        (Some("error"), Some("ping"), Some("Refused"))
    );
}
