//! The attacks of issue #12, each against the core: what an attacker sends, and what it may get
//! for it. Every test here failed on the protocol v2 daemon.

use super::*;

/// Bytes sent to `to` among `sent`.
fn bytes_to(sent: &[Transmit], to: SocketAddr) -> usize {
    sent.iter().filter(|t| t.to == to).map(|t| t.bytes.len()).sum()
}

/// Mallory has a free account and a session whose client went silent with pushes in flight.
/// She then sends one small ping with her token from a spoofed victim address: the daemon used
/// to move her session there and resend the whole in-flight window (measured 564x to 2,148x).
/// The victim address now gets a challenge and the pong, within three times what it "sent",
/// and no push; alternating source ports do not add up to more.
#[test]
fn reflection_through_a_moved_session_is_at_most_three_times_what_arrived() {
    let mut h = H::with(ServerConfig { push_window: 32, ..test_config() });
    let mallory = h.user("mallory", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(mallory), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    for i in 0..32 {
        h.req(a(2), Some(bob), RequestBody::Post { text: format!("{i}: {}", "x".repeat(900)) }).unwrap();
    }
    // Mallory's client is gone: her pushes are retransmitted until she is unresponsive.
    for _ in 0..12 {
        h.advance(Duration::from_secs(5));
    }
    assert!(h.server.stats().sessions_unresponsive >= 1);
    h.drain();
    h.other.clear();

    let mut sent_in = 0;
    let mut out = Vec::new();
    for port in 0..20u16 {
        let victim = ip(66, 5000 + port % 4);
        let (_, ping) = h.encode(Some(mallory), RequestBody::Ping);
        sent_in += ping.len();
        out.extend(h.raw(victim, &ping));
        h.advance(Duration::from_secs(3));
        out.extend(h.drain());
        out.append(&mut h.other);
    }
    let to_victim: usize = (0..4).map(|p| bytes_to(&out, ip(66, 5000 + p))).sum();
    assert!(to_victim <= 3 * sent_in, "the victim was sent {to_victim} bytes for {sent_in}");
    assert!(
        out.iter().all(|t| !matches!(
            proto::decode_server(&t.bytes),
            Ok(ServerMsg::Push { .. } | ServerMsg::Pushes { .. })
        ) || t.to == a(1)),
        "a push left for an unproven address"
    );
    // A replayed old request (not the newest id) from yet another address starts nothing.
    let (_, old) = h.encode(Some(mallory), RequestBody::Ping);
    h.raw(a(1), &old);
    let before = h.server.stats().path_challenges;
    let out = h.raw(ip(67, 1), &encode_with_id(h.next_id - 1, Some(mallory), RequestBody::Ping));
    assert_eq!(h.server.stats().path_challenges, before, "a replay started a validation");
    assert!(bytes_to(&out, ip(67, 1)) <= 3 * old.len());
}

fn encode_with_id(id: u64, token: Option<Token>, body: RequestBody) -> Vec<u8> {
    proto::encode_request(proto::Request { id, token, body })
}

/// The real client behind a NAT that rebinds is back at full speed once it echoed the challenge,
/// and an answer too large for the budget arrives then rather than never.
#[test]
fn a_rebinding_client_proves_its_new_address_and_gets_what_was_withheld() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    for i in 0..20 {
        let bob = h.user(&format!("bob{i}"), 100 + i);
        let _ = bob;
        h.req(a(1), Some(alice), RequestBody::Subscribe { user: format!("bob{i}") }).unwrap();
    }
    // From a new port: a 20-entry subscriptions page is larger than three times the request.
    let (id, bytes) = h.encode(Some(alice), RequestBody::Subscriptions { after: None });
    let out = h.raw(a(7), &bytes);
    assert!(bytes_to(&out, a(7)) <= 3 * bytes.len());
    let reply = |out: &[Transmit]| {
        out.iter().any(|t| {
            t.to == a(7)
                && matches!(proto::decode_server(&t.bytes), Ok(ServerMsg::Reply { id: rid, .. }) if rid == id)
        })
    };
    assert!(!reply(&out), "withheld until the address is proven");
    h.other = out;
    h.prove(a(7), alice);
    let mut out = std::mem::take(&mut h.other);
    out.extend(h.drain());
    assert!(reply(&out), "sent once the address echoed its challenge");
    // And the session's pushes go there now.
    let bob = h.login_from(a(100), "bob0", "password").unwrap();
    h.req(a(100), Some(bob), RequestBody::Post { text: "hi".into() }).unwrap();
    assert_eq!(h.pushes().iter().map(|p| p.0).collect::<Vec<_>>(), vec![a(7)]);
}

/// Five wrong passwords for a name from anywhere (spoofed too) used to lock the owner out for as
/// long as the attacker kept sending one a minute.
#[test]
fn wrong_passwords_from_elsewhere_do_not_lock_the_owner_out() {
    let mut h = H::new();
    h.register("carol", "carol-pw").unwrap();
    h.login_from(a(1), "carol", "carol-pw").unwrap();
    for round in 0..3 {
        // From eight other hosts, as a determined attacker (with cookies).
        for host in 2..=9 {
            for _ in 0..10 {
                let r = h.login_from(ip(host, 1), "carol", "guess");
                assert!(matches!(r, Err(ErrorCode::BadCredentials | ErrorCode::RateLimited { .. })), "{r:?}");
            }
        }
        // And spoofed from the owner's own address (no cookie: a spoofer never sees one).
        for i in 0..50 {
            let body = RequestBody::Login {
                user: "carol".into(),
                password: "guess".into(),
                cookie: None,
                pad: vec![],
            };
            let (_, bytes) = h.encode(None, body);
            h.raw(a(1000 + i), &bytes);
        }
        assert!(h.login_from(a(2000 + round), "carol", "carol-pw").is_ok(), "round {round}");
        h.advance(Duration::from_secs(60));
    }
}

/// A known name used to be throttled after five tries and an unknown one never, which told
/// which names exist.
#[test]
fn unknown_names_are_answered_and_throttled_exactly_like_known_ones() {
    let mut h = H::new();
    h.register("carol", "carol-pw").unwrap();
    let mut answers = Vec::new();
    for (name, host) in [("carol", 2), ("no-such-carol", 3)] {
        let v: Vec<_> = (0..14).map(|_| h.login_from(ip(host, 1), name, "guess")).collect();
        answers.push(v);
    }
    assert_eq!(answers[0], answers[1]);
    assert!(answers[0].iter().any(|r| matches!(r, Err(ErrorCode::RateLimited { .. }))));
}

/// Random-token logouts and deletions and padded logins with invalid names each left a record in
/// the reply cache's bookkeeping until its TTL (150k datagrams: 8 MiB that never shrank).
#[test]
fn junk_from_strangers_leaves_no_state() {
    let mut h = H::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..150_000u64 {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&next().to_le_bytes());
        t[8..].copy_from_slice(&next().to_le_bytes());
        let body = match i % 3 {
            0 => RequestBody::Logout,
            1 => RequestBody::DeleteAccount { password: "x".into() },
            _ => RequestBody::Login {
                user: "not a name!".into(),
                password: "x".into(),
                cookie: None,
                pad: vec![],
            },
        };
        let token = (i % 3 != 2).then_some(Token(t));
        let bytes = encode_with_id(i, token, body);
        h.server.handle(h.now, ip(9, 1 + (i % 60_000) as u16), &bytes);
        if i % 1000 == 0 {
            h.drain();
        }
    }
    h.drain();
    assert_eq!(h.server.replies.len(), 0);
    assert!(h.server.replies.records() <= 64, "{} records kept", h.server.replies.records());
    assert_eq!(h.server.limits.len(), 0, "no throttle entry for attempts that cost nothing");
    assert_eq!(h.server.password_jobs(), 0);
}

/// Registrations from spoofed addresses (whose answers never need to arrive) used to create
/// accounts and fill `max_accounts`.
#[test]
fn spoofed_registrations_create_nothing() {
    let mut h = H::with(ServerConfig { max_accounts: 3, ..test_config() });
    for i in 0..100 {
        let body = RequestBody::Register {
            user: format!("spoof{i}"),
            password: "password".into(),
            cookie: None,
            pad: vec![],
        };
        let (id, bytes) = h.encode(None, body);
        let out = h.raw(ip(10, 1 + i), &bytes);
        assert!(matches!(proto::decode_server(&out[0].bytes), Ok(ServerMsg::Retry { id: r, .. }) if r == id));
        assert!(out[0].bytes.len() <= bytes.len());
    }
    assert_eq!(h.server.accounts, 0);
    assert_eq!(h.server.stats().retries_sent, 100);
    // A cookie for another address proves nothing.
    let cookie = Some(h.cookie(ip(10, 1)));
    let body =
        RequestBody::Register { user: "spoof".into(), password: "password".into(), cookie, pad: vec![] };
    let (_, bytes) = h.encode(None, body);
    let out = h.raw(ip(10, 2), &bytes);
    assert!(matches!(proto::decode_server(&out[0].bytes), Ok(ServerMsg::Retry { .. })));
    // The real client, which echoes the cookie, registers.
    assert_eq!(h.register("real", "password"), Ok(Response::Registered));
}

/// Spoofed logins used to occupy the argon2 workers, so real ones got "busy".
#[test]
fn spoofed_logins_do_not_reach_the_password_workers_under_load() {
    let mut h = H::new();
    h.register("alice", "password").unwrap();
    // Both workers busy (two jobs submitted, not finished).
    for i in 0..2 {
        let body = RequestBody::Login {
            user: "alice".into(),
            password: "password".into(),
            cookie: None,
            pad: vec![],
        };
        let (_, bytes) = h.encode(None, body);
        h.server.handle(h.now, ip(20, 1 + i), &bytes);
        h.reads();
    }
    assert_eq!(h.server.password_jobs(), 2);
    for i in 0..500 {
        let body =
            RequestBody::Login { user: format!("u{i}"), password: "guess".into(), cookie: None, pad: vec![] };
        let (_, bytes) = h.encode(None, body);
        h.server.handle(h.now, ip(21, 1 + i), &bytes);
    }
    assert_eq!(h.server.password_jobs(), 2, "no job without a cookie under load");
    assert_eq!(h.server.limits.len(), 3, "only the two real attempts' buckets");
    h.turn();
    assert!(h.login_from(a(5), "alice", "password").is_ok());
}

/// `DeleteAccount` with wrong passwords queued an argon2 job per request at the session's 200/s:
/// a session (or a stolen token) was an unthrottled password oracle that starved every login.
#[test]
fn a_session_is_no_faster_a_password_oracle_than_the_login() {
    let mut h = H::with(ServerConfig { login_failures_per_user_burst: 3, ..test_config() });
    let t = h.user("alice", 1);
    // One check at a time per session.
    let (_, first) = h.encode(Some(t), RequestBody::DeleteAccount { password: "guess1".into() });
    let (id2, second) = h.encode(Some(t), RequestBody::DeleteAccount { password: "guess2".into() });
    h.server.handle(h.now, a(1), &first);
    let out = h.raw(a(1), &second);
    assert!(out.iter().any(|t| matches!(
        proto::decode_server(&t.bytes),
        Ok(ServerMsg::Reply { id, result: Err(ErrorCode::Busy) }) if id == id2
    )));
    // Then the account-and-address allowance, as for logins.
    let mut answers = Vec::new();
    for i in 0..6 {
        answers.push(h.req(a(1), Some(t), RequestBody::DeleteAccount { password: format!("guess{i}") }));
    }
    assert!(answers.iter().filter(|r| **r == Err(ErrorCode::BadCredentials)).count() <= 3, "{answers:?}");
    assert!(matches!(answers.last(), Some(Err(ErrorCode::RateLimited { .. }))), "{answers:?}");
}

/// Any account could fill any inbox with direct messages.
#[test]
fn direct_messages_cannot_fill_a_strangers_inbox() {
    let mut h = H::with(ServerConfig { dms_from_strangers_burst: 5, ..test_config() });
    let alice = h.user("alice", 1);
    let mallory = h.user("mallory", 2);
    let results: Vec<_> = (0..8)
        .map(|i| {
            h.req(a(2), Some(mallory), RequestBody::Send { to: "alice".into(), text: format!("spam {i}") })
        })
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
    assert!(matches!(results[7], Err(ErrorCode::RateLimited { retry_after_secs: 30 })));
    assert_eq!(h.inbox("alice").len(), 5);
    // Someone alice follows is not limited that way.
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "mallory".into() }).unwrap();
    assert!(h.req(a(2), Some(mallory), RequestBody::Send { to: "alice".into(), text: "hi".into() }).is_ok());
}

/// Fan-out cost used to be free for the poster.
#[test]
fn fanout_is_charged_to_the_poster() {
    let mut h = H::with(ServerConfig { deliveries_per_user_per_sec: 10, ..test_config() });
    let star = h.user("star", 1);
    for i in 0..150 {
        let t = h.user(&format!("fan{i}"), 1000 + i);
        h.req(a(1000 + i), Some(t), RequestBody::Subscribe { user: "star".into() }).unwrap();
    }
    // 100 tokens in the bucket: a post to 150 followers goes (into debt)...
    assert!(h.req(a(1), Some(star), RequestBody::Post { text: "one".into() }).is_ok());
    // ...and the next waits until the debt is paid: 51 deliveries at 10 a second.
    assert_eq!(
        h.req(a(1), Some(star), RequestBody::Post { text: "two".into() }),
        Err(ErrorCode::RateLimited { retry_after_secs: 6 })
    );
    h.advance(Duration::from_secs(6));
    assert!(h.req(a(1), Some(star), RequestBody::Post { text: "two".into() }).is_ok());
}

/// `Subscriptions` collected and sorted every follower on every page.
#[test]
fn subscriptions_pages_start_at_the_cursor_and_cover_everything_once() {
    let mut h = H::new();
    let me = h.user("me", 1);
    let mut expected = Vec::new();
    for i in 0..300u16 {
        let name = format!("u{i:03}-{}", "n".repeat(20));
        let t = h.user(&name, 2000 + i);
        if i % 3 != 0 {
            h.req(a(2000 + i), Some(t), RequestBody::Subscribe { user: "me".into() }).unwrap();
        }
        if i % 2 == 0 {
            h.req(a(1), Some(me), RequestBody::Subscribe { user: name.clone() }).unwrap();
        }
        if i % 3 != 0 || i % 2 == 0 {
            expected.push((name, i % 2 == 0, i % 3 != 0));
        }
    }
    let mut got = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        pages += 1;
        match h.req(a(1), Some(me), RequestBody::Subscriptions { after: after.clone() }) {
            Ok(Response::Relations { entries, next }) => {
                got.extend(entries.into_iter().map(|r| (r.user, r.following, r.follower)));
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(pages > 3);
    assert_eq!(got, expected);
}

/// `max_sessions` was checked after the hash: a full daemon still hashed every login.
#[test]
fn a_full_daemon_refuses_logins_before_hashing() {
    let mut h = H::with(ServerConfig { max_sessions: 1, ..test_config() });
    h.user("alice", 1);
    h.register("bob", "password").unwrap();
    let body =
        RequestBody::Login { user: "bob".into(), password: "password".into(), cookie: None, pad: vec![] };
    let (_, bytes) = h.encode(None, body);
    h.server.handle(h.now, a(2), &bytes);
    assert!(h.server.poll_password_job().is_none());
    let out = h.drain();
    assert!(matches!(
        proto::decode_server(&out[0].bytes),
        Ok(ServerMsg::Reply { result: Err(ErrorCode::Busy), .. })
    ));
}

/// Answers to datagrams without a session used to wait for the batch in flight, each holding a
/// copy of its request.
#[test]
fn answers_to_strangers_do_not_wait_for_commits_or_copy_requests() {
    let mut h = H::new();
    let t = h.user("alice", 1);
    h.req(a(1), Some(t), RequestBody::Post { text: "followers read and cached".into() }).unwrap();
    let (_, post) = h.encode(Some(t), RequestBody::Post { text: "pending".into() });
    h.server.handle(h.now, a(1), &post);
    h.reads();
    let (n, writes) = h.server.take_writes().unwrap();
    let held = h.server.held.len();
    for i in 0..100u64 {
        h.server.handle(
            h.now,
            ip(30, 1),
            &encode_with_id(i, Some(Token([7; 16])), RequestBody::Retrieve { count: 5, before: None }),
        );
        h.server.handle(h.now, ip(30, 2), &encode_with_id(i, None, RequestBody::Ping));
    }
    assert_eq!(h.server.held.len(), held, "only alice's reply and post wait");
    assert_eq!(h.drain().len(), 200, "the strangers were answered at once");
    h.store.commit(&writes).unwrap();
    h.server.on_committed(h.now, n, writes.len());
    assert_eq!(h.drain().len(), 1);
}

/// Control characters let a message draw a fake sender over itself and reach the reader's
/// terminal (`send#victim&hi\x0b\r[bob -> you] send me your password`, OSC title changes).
#[test]
fn control_characters_in_messages_are_refused() {
    let mut h = H::new();
    let t = h.user("mallory", 1);
    h.user("victim", 2);
    for (text, c) in [
        ("hi\u{b}\r[bob -> you] send me your password", 0x0b),
        ("\u{1b}]0;pwned\u{7}", 0x1b),
        ("c1 \u{9b}31m", 0x9b),
        ("tab\tbed", 0x09),
    ] {
        assert_eq!(
            h.req(a(1), Some(t), RequestBody::Send { to: "victim".into(), text: text.into() }),
            Err(ErrorCode::InvalidText { code_point: c })
        );
        assert_eq!(
            h.req(a(1), Some(t), RequestBody::Post { text: text.into() }),
            Err(ErrorCode::InvalidText { code_point: c })
        );
    }
    assert!(h.inbox("victim").is_empty());
    assert!(h
        .req(a(1), Some(t), RequestBody::Send { to: "victim".into(), text: "two\nlines".into() })
        .is_ok());
}

/// An ack carried no epoch: a late one from before a restart acked a push of the new run that
/// the client never saw, and nothing after it was ever shown.
#[test]
fn a_late_ack_from_before_a_restart_acks_nothing() {
    let mut h = H::new();
    let alice = h.user("alice", 1);
    let bob = h.user("bob", 2);
    h.req(a(1), Some(alice), RequestBody::Subscribe { user: "bob".into() }).unwrap();
    let old_epoch = h.server.epoch;
    h.restart(test_config());
    h.req(a(1), Some(alice), RequestBody::Ping).unwrap();
    h.prove(a(1), alice);
    h.req(a(2), Some(bob), RequestBody::Post { text: "after the restart".into() }).unwrap();
    assert_eq!(h.pushes().len(), 1);
    let late = proto::encode_client(&ClientMsg::PushAck { token: alice, epoch: old_epoch, seq: 1 });
    h.server.handle(h.now, a(1), &late);
    h.turn();
    assert_eq!(h.server.stats().pushes_acked, 0);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.pushes().iter().map(|p| p.2.text.as_str()).collect::<Vec<_>>(), ["after the restart"]);
}

/// Every request from a changing address logged a line, every re-armed unresponsive session a
/// warning.
#[test]
fn a_session_logs_at_most_a_line_a_minute() {
    let mut s = Session::new("x".into(), 1, 1, 1, None, Instant::now(), test_config().push_rto());
    let t0 = Instant::now();
    assert!(s.may_log(t0));
    assert!(!s.may_log(t0 + Duration::from_secs(59)));
    assert!(s.may_log(t0 + Duration::from_secs(60)));
}

/// Found in review: a spoofed broadcast or multicast source address made every host on the
/// segment receive the answer (one datagram, many receivers); an unspecified or port-0 source
/// cannot be answered at all.
#[test]
fn datagrams_from_broadcast_or_multicast_sources_are_not_answered() {
    let mut h = H::new();
    let ping = encode_with_id(1, None, RequestBody::Ping);
    for from in [
        "255.255.255.255:7070",
        "224.0.0.1:7070",
        "239.1.2.3:5353",
        "0.0.0.0:7070",
        "127.0.0.1:0",
        "[ff02::1]:7070",
        "[::]:7070",
        "[::ffff:255.255.255.255]:7070",
        "[::ffff:224.0.0.251]:5353",
    ] {
        let from: SocketAddr = from.parse().unwrap();
        assert!(h.raw(from, &ping).is_empty(), "{from} was answered");
        let mut v2 = ping.clone();
        v2[2] = 2;
        assert!(h.raw(from, &v2).is_empty(), "{from} got a version notice");
    }
    assert_eq!(h.server.stats().bad_source, 18);
    assert_eq!(h.raw(a(1), &ping).len(), 1, "a unicast source is answered");
}
