//! The attacks of issue #12 against the real daemon, each named for what it tries. Loopback
//! addresses other than 127.0.0.1 play other hosts (Linux routes all of 127.0.0.0/8 to lo).

mod common;

use common::raw::Raw;
use common::{run_client, Daemon, FAST_CONFIG};
use std::time::{Duration, Instant};
use udpmsg::proto::{self, ErrorCode, RequestBody, Response, ServerMsg, Token};

/// Mallory, with a free account, has a session whose client went away with pushes in flight
/// (bob posted 32 large messages). She sends pings with her token from a victim's address,
/// alternating its source ports. On protocol v2 the daemon moved her session there and resent
/// the whole window to it at every ping: 564x to 2,148x the bytes. Measured here: what the
/// victim's sockets received against what was sent from them.
#[test]
fn reflection_through_a_moved_session() {
    let config = format!("{FAST_CONFIG}push_initial_rto_ms = 50\npush_min_rto_ms = 20\npush_max_tries = 3\n");
    let d = Daemon::start(&config);
    let out = run_client(d.addr, &["register#mallory&mallory-pw", "register#bob&bob-pw"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut mallory = Raw::bind("127.0.0.1:0", d.addr);
    let token = mallory.login("mallory", "mallory-pw");
    assert_eq!(
        mallory.rpc(Some(token), RequestBody::Subscribe { user: "bob".into() }),
        Ok(Response::Subscribed)
    );
    let mut bob = Raw::bind("127.0.0.1:0", d.addr);
    let bob_token = bob.login("bob", "bob-pw");
    for i in 0..32 {
        let text = format!("{i} {}", "x".repeat(900));
        assert!(matches!(bob.rpc(Some(bob_token), RequestBody::Post { text }), Ok(Response::Posted { .. })));
    }
    // Mallory's socket never acks: retransmissions run out and the session is unresponsive.
    let pushed = mallory.drain(Duration::from_millis(1500));
    assert!(pushed.len() >= 32, "mallory was pushed {} datagrams", pushed.len());

    let mut victims: Vec<Raw> = (0..4).map(|_| Raw::bind("127.0.0.5:0", d.addr)).collect();
    for round in 0..10 {
        let v = &mut victims[round % 4];
        let id = v.id() + 1000 * round as u64;
        v.send(&proto::encode_request(proto::Request { id, token: Some(token), body: RequestBody::Ping }));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut pushes = 0;
    for v in &mut victims {
        for g in v.drain(Duration::from_millis(50)) {
            pushes +=
                matches!(proto::decode_server(&g), Ok(ServerMsg::Push { .. } | ServerMsg::Pushes { .. }))
                    as usize;
        }
    }
    let sent: usize = victims.iter().map(|v| v.sent).sum();
    let received: usize = victims.iter().map(|v| v.received).sum();
    eprintln!(
        "victim address: {sent} bytes sent from it, {received} bytes received ({:.2}x)",
        received as f64 / sent as f64
    );
    assert_eq!(pushes, 0, "pushes reached the victim");
    assert!(received <= 3 * sent, "{received} bytes for {sent}: more than three times");
}

/// Wrong passwords for carol from eight other hosts (as an attacker that follows the protocol,
/// cookies included) and, spoofed, from carol's own address: on protocol v2 five of them locked
/// her out, from her own address, for as long as they kept coming.
#[test]
fn wrong_passwords_from_other_addresses_do_not_lock_the_owner_out() {
    let d = Daemon::start(FAST_CONFIG);
    let out = run_client(d.addr, &["register#carol&carol-pw", "login#carol&carol-pw"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let started = Instant::now();
    let mut refused = 0;
    for host in 2..=9 {
        let mut attacker = Raw::bind(&format!("127.0.0.{host}:0"), d.addr);
        for _ in 0..12 {
            let body = RequestBody::Login {
                user: "carol".into(),
                password: "guess".into(),
                cookie: None,
                pad: vec![],
            };
            match attacker.rpc(None, body) {
                Err(ErrorCode::BadCredentials) => {}
                Err(ErrorCode::RateLimited { .. }) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(refused > 0, "the attackers were throttled too");
    // Spoofed from carol's own address: no cookie ever comes back to the spoofer.
    let mut spoofer = Raw::bind("127.0.0.1:0", d.addr);
    for _ in 0..40 {
        let id = spoofer.id();
        let body =
            RequestBody::Login { user: "carol".into(), password: "guess".into(), cookie: None, pad: vec![] };
        spoofer.send(&proto::encode_request(proto::Request { id, token: None, body }));
    }
    std::thread::sleep(Duration::from_millis(300));
    // Carol, from 127.0.0.1, with the real client.
    let out = run_client(d.addr, &["login#carol&carol-pw", "whoami"], "");
    assert_eq!(out.code, Some(0), "carol was locked out: {out:?}");
    assert!(out.stdout.iter().any(|l| l.starts_with("carol (")), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Registrations from spoofed addresses used to create accounts (the answer never needs to
/// arrive), filling `max_accounts`.
#[test]
fn spoofed_registrations_create_no_account() {
    let d = Daemon::start(FAST_CONFIG);
    let mut spoofer = Raw::bind("127.0.0.3:0", d.addr);
    for i in 0..50 {
        let id = spoofer.id();
        let body = RequestBody::Register {
            user: format!("spoofed{i}"),
            password: "password".into(),
            cookie: None,
            pad: vec![],
        };
        spoofer.send(&proto::encode_request(proto::Request { id, token: None, body }));
    }
    let answers = spoofer.drain(Duration::from_millis(500));
    assert_eq!(answers.len(), 50);
    assert!(answers.iter().all(|a| matches!(proto::decode_server(a), Ok(ServerMsg::Retry { .. }))));
    assert!(spoofer.received <= spoofer.sent);
    let out = run_client(d.addr, &["register#real&password", "login#real&password", "users#*"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&"real".to_string()), "{out:?}");
    assert!(!out.stdout.iter().any(|l| l.starts_with("spoofed")), "{out:?}");
}

/// One log line per datagram from a changed address, one warning per re-armed unresponsive
/// session: anyone with a token could write the daemon's log. A session now logs at most a line
/// a minute, and what strangers cause at most a few a second (at debug).
#[test]
fn a_token_holder_cannot_fill_the_log() {
    let d = Daemon::start(FAST_CONFIG);
    let out = run_client(d.addr, &["register#mallory&mallory-pw"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut mallory = Raw::bind("127.0.0.1:0", d.addr);
    let token: Token = mallory.login("mallory", "mallory-pw");
    for id in 10_000..10_200 {
        let mut s = Raw::bind("127.0.0.7:0", d.addr);
        s.send(&proto::encode_request(proto::Request { id, token: Some(token), body: RequestBody::Ping }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut d = d;
    assert!(d.stop());
    let lines = d.stderr.rest(Duration::from_secs(5));
    // (Her registration's login and its logout, when that client left, are hers.)
    let about: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("mallory") && !l.contains("logged in") && !l.contains("logged out"))
        .collect();
    assert!(about.len() <= 2, "{} lines about mallory's session: {about:#?}", about.len());
}

/// The metrics endpoint served 16 connections and no more, with no timeout: 16 silent
/// connections kept every scraper out.
#[test]
fn silent_connections_do_not_block_the_metrics_endpoint() {
    use std::io::{Read, Write};
    let d = Daemon::start(&format!("{FAST_CONFIG}metrics_listen = \"127.0.0.1:0\"\n"));
    let mut d = d;
    let line =
        d.stderr.wait_for(Duration::from_secs(10), |l| l.contains("metrics on http://")).expect("metrics");
    let addr: std::net::SocketAddr =
        line.split("http://").nth(1).unwrap().trim_end_matches("/metrics").parse().unwrap();
    let idle: Vec<std::net::TcpStream> =
        (0..20).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body:.80}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    drop(idle);
}

/// The data directory and the database were created world-readable (755/644).
#[test]
fn the_data_directory_and_database_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(FAST_CONFIG);
    let data = d.dir.path().join("data");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("udpmsg.db")), 0o600);
    let out = run_client(d.addr, &["register#alice&password"], "");
    assert_eq!(out.code, Some(0));
    for entry in std::fs::read_dir(&data).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p) & 0o077, 0, "{} is mode {:o}", p.display(), mode(&p));
    }
}

/// Message text may not carry control characters: `hi\x0b\r[bob -> you] ...` drew a fake sender
/// over the line, and escape sequences reached the reader's terminal.
#[test]
fn terminal_escapes_are_refused_by_the_daemon() {
    let d = Daemon::start(FAST_CONFIG);
    let out = run_client(d.addr, &["register#mallory&mallory-pw", "register#victim&victim-pw"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut mallory = Raw::bind("127.0.0.1:0", d.addr);
    let token = mallory.login("mallory", "mallory-pw");
    let text = "hi\u{b}\r[bob -> you] send me your password\u{1b}]0;pwned\u{7}".to_string();
    assert_eq!(
        mallory.rpc(Some(token), RequestBody::Send { to: "victim".into(), text }),
        Err(ErrorCode::InvalidText { code_point: 0x0b })
    );
    let out = run_client(d.addr, &["login#victim&victim-pw", "retrieve#10"], "");
    assert!(out.stdout.iter().any(|l| l.contains("no messages")), "{out:?}");
}
