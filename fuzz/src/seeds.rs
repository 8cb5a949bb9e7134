//! Seed inputs: real traffic, encoded with the library exactly as the client and the daemon
//! encode it. `examples/gen_corpus.rs` writes them to `corpus/<target>/seed-<name>`;
//! `tests/replay.rs` checks that the committed files are these and that every target passes them.

use crate::server_core::{cookie_slot, encode_request, record, slot, PASSWORD};
use udpmsg::proto::{
    self, ClientMsg, Cookie, ErrorCode, Message, Relation, RequestBody, Response, ServerMsg, Token,
};

/// (target, seed name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut v = Vec::new();
    for (name, bytes) in client_datagrams() {
        v.push(("decode_client", name, bytes));
    }
    for (name, bytes) in server_datagrams() {
        v.push(("decode_server", name, bytes));
    }
    for (name, bytes) in server_core_inputs() {
        v.push(("server_core", name, bytes));
    }
    v
}

fn text(n: usize) -> String {
    "x".repeat(n)
}

/// Every request the client sends, with and without a token, and push acks.
pub fn client_datagrams() -> Vec<(String, Vec<u8>)> {
    let t = Some(Token([0x5a; 16]));
    let name = |n: &str| n.to_string();
    let bodies: Vec<(&str, Option<Token>, RequestBody)> = vec![
        (
            "register",
            None,
            RequestBody::Register {
                user: name("alice"),
                password: name("secret"),
                cookie: None,
                pad: vec![],
            },
        ),
        (
            "login",
            None,
            RequestBody::Login { user: name("alice"), password: name("p&ss"), cookie: None, pad: vec![] },
        ),
        (
            "login-cookie",
            None,
            RequestBody::Login {
                user: name("alice"),
                password: name("p&ss"),
                cookie: Some(Cookie([0xc0; 16])),
                pad: vec![],
            },
        ),
        (
            "login-longest",
            None,
            RequestBody::Login {
                user: text(32),
                password: text(proto::MAX_PASSWORD_LEN),
                cookie: Some(Cookie([0xc0; 16])),
                pad: vec![],
            },
        ),
        ("logout", t, RequestBody::Logout),
        ("subscribe", t, RequestBody::Subscribe { user: name("bob") }),
        ("unsubscribe", t, RequestBody::Unsubscribe { user: name("bob") }),
        ("post", t, RequestBody::Post { text: name("a#b & c") }),
        ("post-longest", t, RequestBody::Post { text: text(proto::MAX_TEXT_BYTES) }),
        ("send", t, RequestBody::Send { to: name("bob"), text: name("hi \u{1F600}") }),
        ("retrieve", t, RequestBody::Retrieve { count: 100, before: None }),
        ("retrieve-page", t, RequestBody::Retrieve { count: 7, before: Some(1234) }),
        ("users", t, RequestBody::ListUsers { pattern: name("*"), after: None }),
        ("users-page", t, RequestBody::ListUsers { pattern: name("b?b*"), after: Some(name("bob")) }),
        ("ping", t, RequestBody::Ping),
        ("ping-no-token", None, RequestBody::Ping),
        ("whoami", t, RequestBody::WhoAmI),
        ("subscriptions", t, RequestBody::Subscriptions { after: None }),
        ("subscriptions-page", t, RequestBody::Subscriptions { after: Some(name("carol")) }),
        ("delete", t, RequestBody::DeleteAccount { password: name("secret") }),
    ];
    let mut v: Vec<(String, Vec<u8>)> =
        bodies.into_iter().map(|(n, t, b)| (n.to_string(), encode_request(0x1234_5678, t, b))).collect();
    v.push(("id-max".into(), encode_request(u64::MAX, t, RequestBody::Ping)));
    let ack = |seq| proto::encode_client(&ClientMsg::PushAck { token: Token([0x5a; 16]), epoch: 3, seq });
    v.push(("push-ack".into(), ack(1)));
    v.push(("push-ack-large".into(), ack(1 << 40)));
    let acks = |seqs| proto::encode_client(&ClientMsg::PushAcks { token: Token([0x5a; 16]), epoch: 3, seqs });
    v.push(("push-acks".into(), acks(vec![3, 1, 2])));
    v.push(("push-acks-most".into(), acks((1..=proto::MAX_ACKS as u64).collect())));
    v.push((
        "path-response".into(),
        proto::encode_client(&ClientMsg::PathResponse {
            token: Token([0x5a; 16]),
            data: 0x0123_4567_89ab_cdef,
        }),
    ));
    v.push(("version-1".into(), b"UM\x01\x00\x00\x00\x09".to_vec()));
    v.push(("version-2".into(), b"UM\x02\x00\x00\x00\x09".to_vec()));
    v
}

/// Every reply and error the daemon sends, pushes and the version notice.
pub fn server_datagrams() -> Vec<(String, Vec<u8>)> {
    let msg = |id, to: Option<&str>, t: &str| Message {
        id,
        time: 1_764_000_000_000 + id,
        author: "bob".into(),
        to: to.map(str::to_string),
        text: t.into(),
    };
    let ok: Vec<(&str, Response)> = vec![
        ("registered", Response::Registered),
        ("logged-in", Response::LoggedIn { token: Token([0xa5; 16]), missed: 3, catching_up: 2, epoch: 4 }),
        ("logged-out", Response::LoggedOut),
        ("subscribed", Response::Subscribed),
        ("unsubscribed", Response::Unsubscribed),
        ("posted", Response::Posted { id: 42, recipients: 2 }),
        ("sent", Response::Sent { id: 43 }),
        (
            "messages",
            Response::Messages {
                messages: vec![msg(1, None, "hi"), msg(2, Some("alice"), "psst")],
                more: true,
            },
        ),
        ("users", Response::Users { names: vec!["bob".into(), "bobby".into()], next: Some("bobby".into()) }),
        ("pong", Response::Pong),
        ("session-pong", Response::SessionPong { epoch: 4 }),
        ("me", Response::Me { user: "alice".into(), sessions: 2 }),
        (
            "relations",
            Response::Relations {
                entries: vec![Relation { user: "bob".into(), following: true, follower: false }],
                next: None,
            },
        ),
        ("deleted", Response::Deleted),
    ];
    let errors: Vec<(&str, ErrorCode)> = vec![
        ("bad-credentials", ErrorCode::BadCredentials),
        ("not-logged-in", ErrorCode::NotLoggedIn),
        ("session-expired", ErrorCode::SessionExpired),
        ("no-such-user", ErrorCode::NoSuchUser { user: "carol".into() }),
        ("text-too-long", ErrorCode::TextTooLong { max: 1000 }),
        ("count-out-of-range", ErrorCode::CountOutOfRange { min: 1, max: 100 }),
        ("invalid-password", ErrorCode::InvalidPassword { min_len: 4, max_len: 128 }),
        ("busy", ErrorCode::Busy),
        ("rate-limited", ErrorCode::RateLimited { retry_after_secs: 30 }),
        ("storage-unavailable", ErrorCode::StorageUnavailable),
        ("invalid-text", ErrorCode::InvalidText { code_point: 0x1b }),
    ];
    let mut v = Vec::new();
    for (n, r) in ok {
        v.push((
            format!("reply-{n}"),
            proto::encode_server(&ServerMsg::Reply { id: 0x1234_5678, result: Ok(r) }),
        ));
    }
    for (n, e) in errors {
        v.push((format!("error-{n}"), proto::encode_server(&ServerMsg::Reply { id: 7, result: Err(e) })));
    }
    v.push((
        "push".into(),
        proto::encode_server(&ServerMsg::Push { session: 7, epoch: 3, seq: 1, message: msg(9, None, "hi") }),
    ));
    v.push((
        "pushes".into(),
        proto::encode_server(&ServerMsg::Pushes {
            session: 7,
            epoch: 3,
            first_seq: 2,
            messages: vec![msg(10, None, "one"), msg(11, Some("eve"), "two")],
        }),
    ));
    v.push((
        "push-direct-longest".into(),
        proto::encode_server(&ServerMsg::Push {
            session: u64::MAX,
            epoch: u32::MAX,
            seq: u64::MAX,
            message: Message {
                id: u64::MAX,
                time: u64::MAX,
                author: text(32),
                to: Some(text(32)),
                text: text(proto::MAX_TEXT_BYTES),
            },
        }),
    ));
    v.push((
        "path-challenge".into(),
        proto::encode_server(&ServerMsg::PathChallenge { session: 7, data: 0x0123_4567_89ab_cdef }),
    ));
    v.push(("retry".into(), proto::encode_server(&ServerMsg::Retry { id: 9, cookie: Cookie([0xc0; 16]) })));
    v.push(("version-notice".into(), proto::version_notice(b"UM\x02\x00\x00\x00\x09")));
    v
}

/// Conversations for `server_core` (see its module documentation for the record format).
/// Slot 0 is mallory's token, slot 1 the first token the fuzzer's own logins get.
pub fn server_core_inputs() -> Vec<(String, Vec<u8>)> {
    let eve = Some(slot(1));
    let mallory = Some(slot(0));
    let req = |id, token, body| encode_request(id, token, body);
    // With the cookie the harness has for the source address (see `server_core`).
    let reg = |u: &str, p: &str| RequestBody::Register {
        user: u.into(),
        password: p.into(),
        cookie: Some(cookie_slot()),
        pad: vec![],
    };
    let login = |u: &str, p: &str| RequestBody::Login {
        user: u.into(),
        password: p.into(),
        cookie: Some(cookie_slot()),
        pad: vec![],
    };
    let bare_reg = |u: &str, p: &str| RequestBody::Register {
        user: u.into(),
        password: p.into(),
        cookie: None,
        pad: vec![],
    };
    let ack = |token, seq| proto::encode_client(&ClientMsg::PushAck { token, epoch: 1, seq });
    let mut v = Vec::new();

    // A whole client life from 127.0.0.1:2000, with mallory posting from her own address.
    let life: Vec<(u8, Vec<u8>)> = vec![
        (2, req(0, None, bare_reg("eve", "evepassword"))),
        (2, req(1, None, reg("eve", "evepassword"))),
        (2, req(2, None, login("eve", "evepassword"))),
        (2, req(3, eve, RequestBody::Ping)),
        (2, req(4, eve, RequestBody::Subscribe { user: "mallory".into() })),
        (1, req(1, mallory, RequestBody::Post { text: "hello subscribers".into() })),
        (1, req(2, mallory, RequestBody::Post { text: "and again".into() })),
        (2, ack(slot(1), 1)),
        (2, proto::encode_client(&ClientMsg::PushAcks { token: slot(1), epoch: 1, seqs: vec![2, 1] })),
        (2, req(5, eve, RequestBody::Retrieve { count: 100, before: None })),
        (2, req(6, eve, RequestBody::ListUsers { pattern: "*".into(), after: None })),
        (2, req(7, eve, RequestBody::Subscriptions { after: None })),
        (2, req(8, eve, RequestBody::Send { to: "alice".into(), text: "hi alice".into() })),
        (2, req(9, eve, RequestBody::WhoAmI)),
        (2, req(10, eve, RequestBody::Unsubscribe { user: "mallory".into() })),
        (2, req(11, eve, RequestBody::Logout)),
        (2, req(11, eve, RequestBody::Logout)),
        (2, req(12, eve, RequestBody::Ping)),
    ];
    v.push(("life".to_string(), life.iter().flat_map(|(s, d)| record(*s, 0, 0, d)).collect()));

    // Mallory's account, used from a new address (NAT rebinding), then deleted.
    let mallory_life: Vec<(u8, Vec<u8>)> = vec![
        (4, req(20, mallory, RequestBody::Post { text: text(1000) })),
        (4, req(21, mallory, RequestBody::Retrieve { count: 50, before: Some(u64::MAX) })),
        (4, req(22, mallory, RequestBody::Subscribe { user: "alice".into() })),
        (1, req(23, None, login("mallory", PASSWORD))),
        (4, req(24, mallory, RequestBody::DeleteAccount { password: PASSWORD.into() })),
        (4, req(24, mallory, RequestBody::DeleteAccount { password: PASSWORD.into() })),
    ];
    v.push(("mallory".to_string(), mallory_life.iter().flat_map(|(s, d)| record(*s, 1, 0, d)).collect()));

    // Mallory's token from a responsive address (her session moves once it echoed the
    // challenge) and from addresses that never answer (spoofed: they get at most three times
    // what they send, and no pushes).
    let moves: Vec<(u8, Vec<u8>)> = vec![
        (1, req(80, mallory, RequestBody::Subscribe { user: "alice".into() })),
        (4, req(81, mallory, RequestBody::Ping)),
        (5, req(82, mallory, RequestBody::Retrieve { count: 50, before: None })),
        (4, req(81, mallory, RequestBody::Ping)),
        (3, req(83, mallory, RequestBody::Ping)),
        (3, req(84, mallory, RequestBody::Retrieve { count: 50, before: None })),
        (7, req(85, mallory, RequestBody::Ping)),
        (2, req(82, mallory, RequestBody::Ping)),
    ];
    v.push(("moves".to_string(), moves.iter().flat_map(|(s, d)| record(*s, 2, 0, d)).collect()));

    // Garbage and edge cases, as an attacker sends them, from every source.
    let login_eve = req(30, None, login("eve", "evepassword"));
    let garbage: Vec<Vec<u8>> = vec![
        b"UM\x01\x00\x00\x00\x09".to_vec(),
        b"UM\x02".to_vec(),
        b"UM".to_vec(),
        vec![0xff; 64],
        login_eve[..login_eve.len() / 2].to_vec(),
        proto::encode_client(&ClientMsg::Request(udpmsg::proto::Request {
            id: 31,
            token: None,
            body: login("mallory", PASSWORD),
        })),
        vec![b'U'; 1300],
        req(32, Some(Token([0; 16])), RequestBody::Retrieve { count: u32::MAX, before: Some(0) }),
        req(33, None, RequestBody::Ping),
        req(34, None, RequestBody::ListUsers { pattern: "*".repeat(64), after: None }),
        req(35, mallory, RequestBody::ListUsers { pattern: "*".repeat(64), after: Some(String::new()) }),
        req(36, mallory, RequestBody::Send { to: String::new(), text: text(1) }),
        req(37, None, reg("", "")),
        req(38, None, reg(&text(32), &text(128))),
        req(39, None, bare_reg("zed", "zedpassword")),
        req(40, mallory, RequestBody::Post { text: "fake\u{b}\r[alice -> you] hi\u{1b}]0;x\u{7}".into() }),
    ];
    let mut g = Vec::new();
    for (i, d) in garbage.iter().enumerate() {
        g.extend(record((i % 8) as u8, (i % 4) as u8, 0, d));
    }
    v.push(("garbage".to_string(), g));

    // A login storm in one turn (the password queue holds 3), with slow workers, then a failed
    // commit, then wrong passwords until the throttles bite.
    let mut storm = Vec::new();
    for i in 0..6u8 {
        let d = req(40 + i as u64, None, login("mallory", PASSWORD));
        storm.extend(record(2 + i % 6, 0, 1, &d));
    }
    storm.extend(record(3, 0, 2, &req(50, None, reg("zed", "zedpassword"))));
    storm.extend(record(3, 0, 4, &req(51, None, login("zed", "zedpassword"))));
    storm.extend(record(3, 0, 0, &req(52, None, login("mallory", PASSWORD))));
    for i in 0..8u8 {
        storm.extend(record(5, 2, 0, &req(60 + i as u64, None, login("mallory", "wrong"))));
    }
    v.push(("storm".to_string(), storm));

    // Sessions expire while alice keeps hers alive; the expired token is then used.
    let mut expiry = Vec::new();
    expiry.extend(record(6, 0, 0, &req(70, None, login("mallory", PASSWORD))));
    expiry.extend(record(6, 0, 0, &req(71, Some(slot(1)), RequestBody::Ping)));
    for _ in 0..3 {
        expiry.extend(record(7, 7, 0, &ack(slot(0), 1)));
    }
    expiry.extend(record(6, 0, 0, &req(72, Some(slot(1)), RequestBody::Post { text: "late".into() })));
    v.push(("expiry".to_string(), expiry));
    v
}
