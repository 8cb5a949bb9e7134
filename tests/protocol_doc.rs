//! PROTOCOL.md cannot drift from the code: every test vector in it (a fenced block whose first
//! line is `vector: NAME`, then hex bytes, `#` starting a comment) is built here with the crate's
//! own encoders (or postcard itself, for the encoding rules) and compared byte for byte; every
//! vector built here must appear in the document, and every vector in the document must be built
//! here.
//!
//! `PROTOCOL_DOC_PRINT=1 cargo test --test protocol_doc -- --nocapture` prints every vector as
//! the code encodes it, for writing the document.

use serde::Serialize;
use std::collections::BTreeMap;
use udpmsg::proto::*;

const DOC: &str = include_str!("../PROTOCOL.md");

/// The session token of the examples.
const TOKEN: Token = Token([0x11; 16]);
/// The cookie of the examples.
const COOKIE: Cookie = Cookie([0xc0; 16]);

fn postcard<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("serializes")
}

fn request(id: u64, token: Option<Token>, body: RequestBody) -> Vec<u8> {
    encode_request(Request { id, token, body })
}

fn reply(id: u64, result: Result<Response, ErrorCode>) -> Vec<u8> {
    encode_server(&ServerMsg::Reply { id, result })
}

fn message(id: u64, text: &str) -> Message {
    Message { id, time: 1_764_000_000_000, author: "bob".into(), to: None, text: text.into() }
}

/// The v3 ping with token of the examples, sent as if by a client of version 4.
fn v4_ping() -> Vec<u8> {
    let mut bytes = request(7, Some(TOKEN), RequestBody::Ping);
    bytes[2] = 4;
    bytes
}

/// Every vector the document must contain: name and the bytes the code produces.
fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    #[derive(Serialize)]
    struct Pair {
        a: u8,
        b: Option<u16>,
    }
    #[derive(Serialize)]
    enum Shape {
        Unit,
        Newtype(u32),
        Struct { x: bool, y: String },
    }
    let m42 = message(42, "hello");
    let m43 = message(43, "again");
    vec![
        // The encoding rules (section 3), checked against postcard itself.
        ("postcard-u8-200", postcard(&200u8)),
        ("postcard-u16-300", postcard(&300u16)),
        ("postcard-u32-0", postcard(&0u32)),
        ("postcard-u32-127", postcard(&127u32)),
        ("postcard-u32-128", postcard(&128u32)),
        ("postcard-u32-max", postcard(&u32::MAX)),
        ("postcard-u64-max", postcard(&u64::MAX)),
        ("postcard-usize-300", postcard(&300usize)),
        ("postcard-i8-minus-2", postcard(&-2i8)),
        ("postcard-i32-0", postcard(&0i32)),
        ("postcard-i32-minus-1", postcard(&-1i32)),
        ("postcard-i32-1", postcard(&1i32)),
        ("postcard-i32-minus-65", postcard(&-65i32)),
        ("postcard-bool-false", postcard(&false)),
        ("postcard-bool-true", postcard(&true)),
        ("postcard-option-none", postcard(&None::<u32>)),
        ("postcard-option-some-300", postcard(&Some(300u32))),
        ("postcard-string-hi", postcard(&"hi")),
        ("postcard-string-empty", postcard(&"")),
        ("postcard-string-utf8", postcard(&"é")),
        ("postcard-vec-u64", postcard(&vec![1u64, 300])),
        ("postcard-vec-u8", postcard(&vec![0u8, 255])),
        ("postcard-array-u8-4", postcard(&[1u8, 2, 3, 4])),
        ("postcard-struct", postcard(&Pair { a: 1, b: Some(2) })),
        ("postcard-enum-unit", postcard(&Shape::Unit)),
        ("postcard-enum-newtype", postcard(&Shape::Newtype(5))),
        ("postcard-enum-struct", postcard(&Shape::Struct { x: true, y: "z".into() })),
        ("postcard-result-ok", postcard(&Ok::<u32, bool>(5))),
        ("postcard-result-err", postcard(&Err::<u32, bool>(true))),
        // Client to daemon.
        (
            "register",
            request(
                1,
                None,
                RequestBody::Register {
                    user: "alice".into(),
                    password: "secret".into(),
                    cookie: None,
                    pad: vec![],
                },
            ),
        ),
        (
            "register-with-cookie",
            request(
                2,
                None,
                RequestBody::Register {
                    user: "alice".into(),
                    password: "secret".into(),
                    cookie: Some(COOKIE),
                    pad: vec![],
                },
            ),
        ),
        (
            "login",
            request(
                3,
                None,
                RequestBody::Login {
                    user: "alice".into(),
                    password: "secret".into(),
                    cookie: Some(COOKIE),
                    pad: vec![],
                },
            ),
        ),
        ("logout", request(9, Some(TOKEN), RequestBody::Logout)),
        ("subscribe", request(4, Some(TOKEN), RequestBody::Subscribe { user: "bob".into() })),
        ("unsubscribe", request(5, Some(TOKEN), RequestBody::Unsubscribe { user: "bob".into() })),
        ("post", request(6, Some(TOKEN), RequestBody::Post { text: "hello".into() })),
        ("send", request(6, Some(TOKEN), RequestBody::Send { to: "bob".into(), text: "hi".into() })),
        ("retrieve", request(8, Some(TOKEN), RequestBody::Retrieve { count: 10, before: None })),
        ("retrieve-before", request(8, Some(TOKEN), RequestBody::Retrieve { count: 10, before: Some(300) })),
        (
            "list-users",
            request(
                8,
                Some(TOKEN),
                RequestBody::ListUsers { pattern: "a*".into(), after: Some("al".into()) },
            ),
        ),
        ("ping", request(7, Some(TOKEN), RequestBody::Ping)),
        ("ping-health-check", request(7, None, RequestBody::Ping)),
        ("whoami", request(7, Some(TOKEN), RequestBody::WhoAmI)),
        ("subscriptions", request(7, Some(TOKEN), RequestBody::Subscriptions { after: None })),
        ("delete-account", request(7, Some(TOKEN), RequestBody::DeleteAccount { password: "secret".into() })),
        ("push-ack", encode_client(&ClientMsg::PushAck { token: TOKEN, epoch: 1, seq: 1 })),
        ("push-acks", encode_client(&ClientMsg::PushAcks { token: TOKEN, epoch: 1, seqs: vec![2, 3] })),
        (
            "path-response",
            encode_client(&ClientMsg::PathResponse { token: TOKEN, data: 0x0123_4567_89ab_cdef }),
        ),
        // Daemon to client.
        ("reply-registered", reply(2, Ok(Response::Registered))),
        (
            "reply-logged-in",
            reply(3, Ok(Response::LoggedIn { token: TOKEN, missed: 2, catching_up: 2, epoch: 1 })),
        ),
        ("reply-logged-out", reply(9, Ok(Response::LoggedOut))),
        ("reply-subscribed", reply(4, Ok(Response::Subscribed))),
        ("reply-posted", reply(6, Ok(Response::Posted { id: 42, recipients: 1 }))),
        ("reply-sent", reply(6, Ok(Response::Sent { id: 42 }))),
        ("reply-messages", reply(8, Ok(Response::Messages { messages: vec![m42.clone()], more: false }))),
        (
            "reply-users",
            reply(8, Ok(Response::Users { names: vec!["alice".into(), "amy".into()], next: None })),
        ),
        ("reply-pong", reply(7, Ok(Response::Pong))),
        ("reply-session-pong", reply(7, Ok(Response::SessionPong { epoch: 1 }))),
        ("reply-me", reply(7, Ok(Response::Me { user: "alice".into(), sessions: 1 }))),
        (
            "reply-relations",
            reply(
                7,
                Ok(Response::Relations {
                    entries: vec![Relation { user: "bob".into(), following: true, follower: false }],
                    next: None,
                }),
            ),
        ),
        ("reply-deleted", reply(7, Ok(Response::Deleted))),
        ("reply-error-bad-credentials", reply(3, Err(ErrorCode::BadCredentials))),
        ("reply-error-no-such-user", reply(4, Err(ErrorCode::NoSuchUser { user: "carol".into() }))),
        ("reply-error-rate-limited", reply(3, Err(ErrorCode::RateLimited { retry_after_secs: 30 }))),
        ("reply-error-invalid-text", reply(6, Err(ErrorCode::InvalidText { code_point: 0x1b }))),
        ("retry", encode_server(&ServerMsg::Retry { id: 1, cookie: COOKIE })),
        (
            "path-challenge",
            encode_server(&ServerMsg::PathChallenge {
                session: TOKEN.session_id(),
                data: 0x0123_4567_89ab_cdef,
            }),
        ),
        ("push", {
            let mut out = Vec::new();
            encode_push(TOKEN.session_id(), 1, 1, &EncodedMessage::new(m42.clone()), &mut out);
            assert_eq!(
                out,
                encode_server(&ServerMsg::Push {
                    session: TOKEN.session_id(),
                    epoch: 1,
                    seq: 1,
                    message: m42.clone()
                })
            );
            out
        }),
        ("pushes", {
            let msgs = [EncodedMessage::new(m42.clone()), EncodedMessage::new(m43.clone())];
            let mut out = Vec::new();
            encode_pushes(TOKEN.session_id(), 1, 2, msgs.iter(), &mut out);
            assert_eq!(
                out,
                encode_server(&ServerMsg::Pushes {
                    session: TOKEN.session_id(),
                    epoch: 1,
                    first_seq: 2,
                    messages: vec![m42, m43]
                })
            );
            out
        }),
        ("session-id", TOKEN.session_id().to_le_bytes().to_vec()),
        ("v4-ping", v4_ping()),
        ("version-notice", version_notice(&v4_ping())),
        ("version-notice-bare", version_notice(b"UM\x04")),
    ]
}

/// The vectors of the document: name and bytes, in order.
fn doc_vectors() -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with("```") {
            continue;
        }
        // A fenced block: is it a vector?
        let mut block: Vec<&str> = Vec::new();
        for l in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            block.push(l);
        }
        let Some(name) = block.first().and_then(|l| l.trim().strip_prefix("vector:")) else { continue };
        let name = name.trim().to_string();
        let mut bytes = Vec::new();
        for l in &block[1..] {
            let data = l.split('#').next().unwrap_or_default();
            for tok in data.split_whitespace() {
                let b = u8::from_str_radix(tok, 16)
                    .unwrap_or_else(|_| panic!("vector {name}: {tok:?} is not a hex byte (line {l:?})"));
                assert_eq!(tok.len(), 2, "vector {name}: {tok:?} is not two hex digits");
                bytes.push(b);
            }
        }
        found.push((name, bytes));
    }
    found
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_vector_in_the_document_is_what_the_code_encodes() {
    let code = vectors();
    if std::env::var_os("PROTOCOL_DOC_PRINT").is_some() {
        for (name, bytes) in &code {
            println!("```text\nvector: {name}\n{}\n```\n", hex(bytes));
        }
    }
    let mut by_name: BTreeMap<&str, &Vec<u8>> = BTreeMap::new();
    for (name, bytes) in &code {
        assert!(by_name.insert(name, bytes).is_none(), "vector {name} built twice");
    }
    let doc = doc_vectors();
    let mut seen = BTreeMap::new();
    let mut failures = Vec::new();
    for (name, bytes) in &doc {
        assert!(seen.insert(name.clone(), ()).is_none(), "PROTOCOL.md has vector {name} twice");
        match by_name.get(name.as_str()) {
            None => failures.push(format!("PROTOCOL.md has vector {name}, which the test does not build")),
            Some(expected) if *expected != bytes => failures.push(format!(
                "vector {name} differs.\nPROTOCOL.md:\n{}\ncode:\n{}",
                hex(bytes),
                hex(expected)
            )),
            Some(_) => {}
        }
    }
    for (name, _) in &code {
        if !seen.contains_key(*name) {
            failures.push(format!("vector {name} is missing from PROTOCOL.md"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The datagrams among the vectors decode as what they claim to be, every datagram fits
/// MAX_DATAGRAM, and what is padded is padded to exactly MIN_UNAUTHENTICATED_REQUEST.
#[test]
fn vectors_are_valid_datagrams() {
    for (name, bytes) in vectors() {
        if name.starts_with("postcard-") || name == "session-id" {
            continue;
        }
        assert!(bytes.len() <= MAX_DATAGRAM, "{name}");
        match &bytes[..2] {
            b"UM" if name != "v4-ping" => {
                decode_client(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            b"Um" if name.starts_with("version-notice") => {
                assert!(decode_server(&bytes).is_err(), "{name}");
            }
            b"Um" => {
                decode_server(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            _ => assert_eq!(name, "v4-ping"),
        }
        if name.starts_with("register") || name == "login" {
            assert_eq!(bytes.len(), MIN_UNAUTHENTICATED_REQUEST, "{name}");
        }
    }
    assert!(notice_answers(&version_notice(&v4_ping()), &request(7, Some(TOKEN), RequestBody::Ping)));
}

/// Rules the document states about decoding, held to the code: no trailing bytes, no over-long
/// varints, booleans and option tags other than 0 and 1 refused, strings must be UTF-8.
#[test]
fn decoding_rules_stated_in_the_document() {
    let ping = request(7, Some(TOKEN), RequestBody::Ping);
    let mut trailing = ping.clone();
    trailing.push(0);
    assert_eq!(decode_client(&trailing), Err(DecodeError::Body));
    // id 7 written as two bytes (87 00) instead of one.
    let mut long = ping[..4].to_vec();
    long.extend_from_slice(&[0x87, 0x00]);
    long.extend_from_slice(&ping[5..]);
    assert_eq!(decode_client(&long), Err(DecodeError::Body));
    // The token option tag 2.
    let mut tag = ping.clone();
    tag[5] = 2;
    assert_eq!(decode_client(&tag), Err(DecodeError::Body));
    // A Relation's bool as 2.
    let rel = reply(
        7,
        Ok(Response::Relations {
            entries: vec![Relation { user: "bob".into(), following: true, follower: false }],
            next: None,
        }),
    );
    let mut bad = rel.clone();
    let at = rel.len() - 3; // following, follower, next
    assert_eq!(bad[at], 1);
    bad[at] = 2;
    assert_eq!(decode_server(&bad), Err(DecodeError::Body));
    // Invalid UTF-8 in a post's text.
    let post = request(6, Some(TOKEN), RequestBody::Post { text: "hi".into() });
    let mut bad = post.clone();
    let n = bad.len();
    bad[n - 1] = 0xff;
    assert_eq!(decode_client(&bad), Err(DecodeError::Body));
    // Varints that overflow their type: a u32 of more than 32 bits, a u64 of more than 64.
    assert!(postcard::from_bytes::<u32>(&[0xff, 0xff, 0xff, 0xff, 0x1f]).is_err());
    assert!(postcard::from_bytes::<u32>(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]).is_err());
    assert!(
        postcard::from_bytes::<u64>(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x03]).is_err()
    );
    // An unknown variant index.
    let mut bad = ping.clone();
    bad[3] = 4;
    assert_eq!(decode_client(&bad), Err(DecodeError::Body));
    // A single ack in PushAcks, or one seq twice, is refused; a single push in Pushes too.
    let acks = |seqs: Vec<u64>| encode_client(&ClientMsg::PushAcks { token: TOKEN, epoch: 1, seqs });
    assert_eq!(decode_client(&acks(vec![1])), Err(DecodeError::Body));
    assert_eq!(decode_client(&acks(vec![1, 1])), Err(DecodeError::Body));
}

/// The text of the section of PROTOCOL.md whose heading line starts with `heading`, up to the next
/// heading of any level.
fn section(heading: &str) -> &'static str {
    let start = DOC.find(&format!("\n{heading}")).unwrap_or_else(|| panic!("PROTOCOL.md has no {heading:?}"));
    let body = &DOC[start + 1..];
    let body = &body[body.find('\n').map_or(body.len(), |i| i + 1)..];
    let end = body.find("\n#").map_or(body.len(), |i| i + 1);
    &body[..end]
}

/// The variant name of a value, from its `Debug` (`LoggedIn { .. }` is `LoggedIn`).
fn variant<T: std::fmt::Debug>(value: &T) -> String {
    format!("{value:?}").chars().take_while(|c| c.is_ascii_alphanumeric()).collect()
}

/// Checks that the table of `heading` lists exactly `samples`' variants, each with the index
/// postcard gives it, in declaration order.
fn check_table<T: Serialize + serde::de::DeserializeOwned + std::fmt::Debug>(heading: &str, samples: &[T]) {
    let rows: Vec<(u64, String)> = section(heading)
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let idx = cells.get(1)?.parse().ok()?;
            Some((idx, cells.get(2)?.trim_matches('`').to_string()))
        })
        .collect();
    let code: Vec<(u64, String)> = samples
        .iter()
        .map(|s| {
            let bytes = postcard(s);
            assert!(bytes[0] < 0x80, "one-byte variant index");
            (u64::from(bytes[0]), variant(s))
        })
        .collect();
    for (i, (idx, _)) in code.iter().enumerate() {
        assert_eq!(*idx, i as u64, "{heading}: samples in declaration order");
    }
    // Zero bytes are a valid value of every field type here (0, "", None, false, [], [0; N]), so
    // the index after the last sample decodes if, and only if, the enum has another variant.
    let mut probe = vec![samples.len() as u8];
    probe.extend([0u8; 64]);
    assert!(
        postcard::take_from_bytes::<T>(&probe).is_err(),
        "{heading}: the code has a variant with index {}; add a sample (and a row)",
        samples.len()
    );
    let mut last = vec![samples.len() as u8 - 1];
    last.extend([0u8; 64]);
    assert!(postcard::take_from_bytes::<T>(&last).is_ok(), "{heading}: the probe itself works");
    assert_eq!(rows, code, "the table under {heading:?} in PROTOCOL.md");
}

/// The tables of variants and their indices in PROTOCOL.md are the code's: one sample of every
/// variant, in declaration order (`check_table` finds out if the code has more).
#[test]
fn variant_tables_match_the_code() {
    let t = TOKEN;
    let s = String::new;
    let client = [
        ClientMsg::Request(Request { id: 0, token: None, body: RequestBody::Ping }),
        ClientMsg::PushAck { token: t, epoch: 0, seq: 0 },
        ClientMsg::PushAcks { token: t, epoch: 0, seqs: vec![] },
        ClientMsg::PathResponse { token: t, data: 0 },
    ];
    check_table("## 5. Client to daemon", &client);
    let bodies = [
        RequestBody::Register { user: s(), password: s(), cookie: None, pad: vec![] },
        RequestBody::Login { user: s(), password: s(), cookie: None, pad: vec![] },
        RequestBody::Logout,
        RequestBody::Subscribe { user: s() },
        RequestBody::Unsubscribe { user: s() },
        RequestBody::Post { text: s() },
        RequestBody::Send { to: s(), text: s() },
        RequestBody::Retrieve { count: 0, before: None },
        RequestBody::ListUsers { pattern: s(), after: None },
        RequestBody::Ping,
        RequestBody::WhoAmI,
        RequestBody::Subscriptions { after: None },
        RequestBody::DeleteAccount { password: s() },
    ];
    check_table("### `RequestBody`", &bodies);
    let server = [
        ServerMsg::Reply { id: 0, result: Ok(Response::Pong) },
        ServerMsg::Push { session: 0, epoch: 0, seq: 0, message: message(0, "") },
        ServerMsg::Pushes { session: 0, epoch: 0, first_seq: 0, messages: vec![] },
        ServerMsg::PathChallenge { session: 0, data: 0 },
        ServerMsg::Retry { id: 0, cookie: COOKIE },
    ];
    check_table("## 6. Daemon to client", &server);
    let responses = [
        Response::Registered,
        Response::LoggedIn { token: t, missed: 0, catching_up: 0, epoch: 0 },
        Response::LoggedOut,
        Response::Subscribed,
        Response::Unsubscribed,
        Response::Posted { id: 0, recipients: 0 },
        Response::Sent { id: 0 },
        Response::Messages { messages: vec![], more: false },
        Response::Users { names: vec![], next: None },
        Response::Pong,
        Response::SessionPong { epoch: 0 },
        Response::Me { user: s(), sessions: 0 },
        Response::Relations { entries: vec![], next: None },
        Response::Deleted,
    ];
    check_table("### `Response`", &responses);
    let errors = [
        ErrorCode::BadCredentials,
        ErrorCode::NotLoggedIn,
        ErrorCode::SessionExpired,
        ErrorCode::NoSuchUser { user: s() },
        ErrorCode::CannotSubscribeToSelf,
        ErrorCode::AlreadySubscribed { user: s() },
        ErrorCode::NotSubscribed { user: s() },
        ErrorCode::EmptyText,
        ErrorCode::TextTooLong { max: 0 },
        ErrorCode::CountOutOfRange { min: 0, max: 0 },
        ErrorCode::RegistrationClosed,
        ErrorCode::NameTaken { user: s() },
        ErrorCode::InvalidName { max_len: 0 },
        ErrorCode::InvalidPassword { min_len: 0, max_len: 0 },
        ErrorCode::InvalidPattern { max_len: 0 },
        ErrorCode::TooManySubscriptions { max: 0 },
        ErrorCode::TooManySessions { max: 0 },
        ErrorCode::Busy,
        ErrorCode::RateLimited { retry_after_secs: 0 },
        ErrorCode::StorageUnavailable,
        ErrorCode::TooManyAccounts { max: 0 },
        ErrorCode::InvalidText { code_point: 0 },
    ];
    for e in &errors {
        assert_eq!(e.code(), variant(e));
    }
    check_table("## 7. Error codes", &errors);
}
