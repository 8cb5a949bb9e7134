//! Client state transitions and timer edges on simulated time.

use super::*;
use crate::proto::{decode_client, encode_server};

fn addr() -> SocketAddr {
    "127.0.0.1:7070".parse().unwrap()
}

fn client(now: Instant) -> Client {
    let cfg = ClientConfig {
        request_initial_timeout_ms: 1000,
        request_min_timeout_ms: 200,
        request_max_timeout_ms: 8000,
        request_max_tries: 4,
        ping_interval_secs: 30,
        ..ClientConfig::default()
    };
    Client::new(cfg, addr(), 100, now)
}

/// A message from bob, numbered `id`, with text "m{id}".
fn msg(id: u64) -> Message {
    Message { id, time: 1_764_000_000_000 + id, author: "bob".into(), to: None, text: format!("m{id}") }
}

fn sent(c: &mut Client) -> Vec<ClientMsg> {
    std::iter::from_fn(|| c.poll_transmit()).map(|b| decode_client(&b).unwrap()).collect()
}

fn reply(c: &mut Client, now: Instant, id: u64, result: Result<Response, ErrorCode>) {
    c.handle(now, addr(), &encode_server(&ServerMsg::Reply { id, result }));
}

fn login(c: &mut Client, now: Instant) -> Token {
    c.submit(now, Command::Login { user: "alice".into(), password: "pw".into() }).unwrap();
    let id = match &sent(c)[..] {
        [ClientMsg::Request(r)] => r.id,
        other => panic!("{other:?}"),
    };
    let token = Token([7; 16]);
    reply(c, now, id, Ok(Response::LoggedIn { token, missed: 0, catching_up: 0, epoch: 1 }));
    // The client confirms its address at once with a ping carrying the new token; the user
    // hears "logged in" when it is answered, and the client is ready.
    assert_eq!(c.poll_event(), None);
    assert!(!c.is_ready());
    let ping = match &sent(c)[..] {
        [ClientMsg::Request(r)] if r.body == RequestBody::Ping && r.token == Some(token) => r.id,
        other => panic!("{other:?}"),
    };
    reply(c, now, ping, Ok(Response::SessionPong { epoch: 1 }));
    assert_eq!(
        c.poll_event(),
        Some(Event::Done(Done::LoggedIn { user: "alice".into(), missed: 0, catching_up: 0 }))
    );
    assert!(c.is_ready());
    token
}

#[test]
fn login_is_padded_and_carries_no_token() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Login { user: "a".into(), password: "b".into() }).unwrap();
    let bytes = c.poll_transmit().unwrap();
    assert!(bytes.len() >= proto::MIN_UNAUTHENTICATED_REQUEST, "{} bytes", bytes.len());
    match decode_client(&bytes).unwrap() {
        ClientMsg::Request(r) => assert_eq!(r.token, None),
        other => panic!("{other:?}"),
    }
}

#[test]
fn retransmission_timer_edges() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Post { text: "hi".into() }).unwrap();
    let first = sent(&mut c);
    assert_eq!(first.len(), 1);
    assert_eq!(c.state(), State::Awaiting);
    assert_eq!(c.submit(t0, Command::Logout), Err(SubmitError::NotReady));

    // Nothing before the timeout, a retransmission at it, with the same request.
    let ms = Duration::from_millis;
    c.handle_timeout(t0 + ms(999));
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), Some(t0 + ms(1000)));
    c.handle_timeout(t0 + ms(1000));
    assert_eq!(sent(&mut c), first);
    // Doubled backoff: next at +2000, then +4000.
    assert_eq!(c.poll_timeout(), Some(t0 + ms(3000)));
    c.handle_timeout(t0 + ms(2999));
    assert!(sent(&mut c).is_empty());
    c.handle_timeout(t0 + ms(3000));
    assert_eq!(sent(&mut c), first);
    assert_eq!(c.poll_timeout(), Some(t0 + ms(7000)));
    c.handle_timeout(t0 + ms(7000));
    assert_eq!(sent(&mut c), first, "fourth and last try");
    assert_eq!(c.poll_timeout(), Some(t0 + ms(15000)));
    // Give-up after the last try: the user hears it and the client is ready again.
    c.handle_timeout(t0 + ms(14999));
    assert_eq!(c.poll_event(), None);
    c.handle_timeout(t0 + ms(15000));
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.poll_event(), Some(Event::NoAnswer { command: "post", server: addr(), tries: 4 }));
    assert!(c.is_ready());
}

#[test]
fn late_and_duplicate_replies_are_ignored() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let _ = login(&mut c, t0);
    c.submit(t0, Command::Post { text: "one".into() }).unwrap();
    let id = match &sent(&mut c)[..] {
        [ClientMsg::Request(r)] => r.id,
        other => panic!("{other:?}"),
    };
    reply(&mut c, t0, id - 1, Ok(Response::LoggedOut));
    assert_eq!(c.poll_event(), None, "reply to an older request");
    assert_eq!(c.state(), State::Awaiting);
    reply(&mut c, t0, id, Ok(Response::Posted { id: 9, recipients: 1 }));
    reply(&mut c, t0, id, Ok(Response::Posted { id: 9, recipients: 1 }));
    assert_eq!(c.poll_event(), Some(Event::Done(Done::Posted { id: 9, recipients: 1 })));
    assert_eq!(c.poll_event(), None, "duplicate reply");
}

#[test]
fn rtt_adapts_and_karn_skips_retransmitted() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Ping).unwrap();
    let ClientMsg::Request(r) = sent(&mut c).remove(0) else { panic!() };
    reply(&mut c, t0 + Duration::from_millis(40), r.id, Ok(Response::Pong));
    // SRTT 40, RTTVAR 20: 40 + 80 = 120, floored to 200.
    assert_eq!(c.rto(), Duration::from_millis(200));
    c.poll_event();
    c.submit(t0, Command::Ping).unwrap();
    let ClientMsg::Request(r) = sent(&mut c).remove(0) else { panic!() };
    c.handle_timeout(t0 + Duration::from_millis(200));
    assert_eq!(sent(&mut c).len(), 1);
    reply(&mut c, t0 + Duration::from_secs(5), r.id, Ok(Response::Pong));
    assert_eq!(c.rto(), Duration::from_millis(200), "no sample from a retransmitted exchange");
}

#[test]
fn pushes_are_acked_shown_once_and_in_order() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let token = login(&mut c, t0);
    let push = |c: &mut Client, seq: u64, msg: Message| {
        c.handle(
            t0,
            addr(),
            &encode_server(&ServerMsg::Push { session: token.session_id(), epoch: 1, seq, message: msg }),
        );
    };
    push(&mut c, 2, msg(12));
    assert_eq!(sent(&mut c), vec![ClientMsg::PushAck { token, epoch: 1, seq: 2 }]);
    assert_eq!(c.poll_event(), None, "held until 1 arrives");
    push(&mut c, 1, msg(11));
    assert_eq!(sent(&mut c), vec![ClientMsg::PushAck { token, epoch: 1, seq: 1 }]);
    push(&mut c, 1, msg(11));
    assert_eq!(
        sent(&mut c),
        vec![ClientMsg::PushAck { token, epoch: 1, seq: 1 }],
        "duplicates are acked again"
    );
    assert_eq!(c.poll_event(), Some(Event::Push(msg(11))));
    assert_eq!(c.poll_event(), Some(Event::Push(msg(12))));
    assert_eq!(c.poll_event(), None);
    // Another session's push (an earlier login, or a forgery) is neither shown nor acked.
    c.handle(t0, addr(), &encode_server(&ServerMsg::Push { session: 1, epoch: 9, seq: 3, message: msg(99) }));
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.poll_event(), None);
    // From anyone but the server: ignored.
    c.handle(
        t0,
        "127.0.0.1:9".parse().unwrap(),
        &encode_server(&ServerMsg::Push { session: token.session_id(), epoch: 1, seq: 3, message: msg(13) }),
    );
    assert!(sent(&mut c).is_empty());
}

#[test]
fn keepalive_and_session_lost() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let _ = login(&mut c, t0);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    c.handle_timeout(t0 + Duration::from_secs(29));
    assert!(sent(&mut c).is_empty());
    c.handle_timeout(t0 + Duration::from_secs(30));
    let ClientMsg::Request(r) = sent(&mut c).remove(0) else { panic!() };
    assert_eq!(r.body, RequestBody::Ping);
    reply(&mut c, t0 + Duration::from_secs(30), r.id, Err(ErrorCode::SessionExpired));
    assert_eq!(c.poll_event(), Some(Event::SessionLost { error: ErrorCode::SessionExpired }));
    assert_eq!(c.user(), None);
    assert_eq!(c.poll_timeout(), None, "no keepalive without a session");
}

/// The notice of a daemon of another version, answering `request`.
fn notice(version: u8, request: &[u8]) -> Vec<u8> {
    let mut theirs = request.to_vec();
    theirs[2] = version;
    let mut n = proto::version_notice(&theirs);
    n[2] = version;
    n
}

#[test]
fn version_mismatch_fails_the_command() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Ping).unwrap();
    let request = c.poll_transmit().unwrap();
    c.handle(t0, addr(), &notice(4, &request));
    assert_eq!(c.poll_event(), Some(Event::VersionMismatch { command: "ping", server_version: 4 }));
    assert!(c.is_ready());
}

/// Three bytes from the server's address used to abort whatever was pending. A notice that does
/// not echo the request (forged, or from a v2 daemon) is only named if no answer ever comes.
#[test]
fn a_notice_that_does_not_echo_the_request_aborts_nothing() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Ping).unwrap();
    let request = c.poll_transmit().unwrap();
    c.handle(t0, addr(), b"Um\x01");
    let mut other = request.clone();
    other[4] ^= 1; // another request id
    c.handle(t0, addr(), &notice(4, &other));
    assert_eq!(c.poll_event(), None);
    assert!(!c.is_ready(), "still waiting for the answer");
    let ClientMsg::Request(r) = decode_client(&request).unwrap() else { panic!() };
    reply(&mut c, t0, r.id, Ok(Response::Pong));
    assert!(matches!(c.poll_event(), Some(Event::Done(Done::Pong { .. }))));
    // Nothing but unverifiable notices until the client gives up: it names the version then.
    c.submit(t0, Command::Ping).unwrap();
    let _ = c.poll_transmit();
    c.handle(t0, addr(), b"Um\x02");
    for s in [1, 3, 7, 15] {
        c.handle_timeout(t0 + Duration::from_secs(s));
    }
    assert_eq!(c.poll_event(), Some(Event::VersionMismatch { command: "ping", server_version: 2 }));
}

#[test]
fn retrieve_pages_are_joined_oldest_first() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let _ = login(&mut c, t0);
    c.submit(t0, Command::Retrieve { count: 4 }).unwrap();
    let ClientMsg::Request(r) = sent(&mut c).remove(0) else { panic!() };
    assert_eq!(r.body, RequestBody::Retrieve { count: 4, before: None });
    reply(&mut c, t0, r.id, Ok(Response::Messages { messages: vec![msg(7), msg(8)], more: true }));
    let ClientMsg::Request(r) = sent(&mut c).remove(0) else { panic!() };
    assert_eq!(r.body, RequestBody::Retrieve { count: 2, before: Some(7) });
    reply(&mut c, t0, r.id, Ok(Response::Messages { messages: vec![msg(3), msg(5)], more: false }));
    assert_eq!(c.poll_event(), Some(Event::Done(Done::Messages(vec![msg(3), msg(5), msg(7), msg(8)]))));
}

#[test]
fn pushes_read_together_are_acked_in_one_datagram() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let token = login(&mut c, t0);
    let push = |c: &mut Client, seq: u64| {
        let push = ServerMsg::Push { session: token.session_id(), epoch: 1, seq, message: msg(10 + seq) };
        c.handle(t0, addr(), &encode_server(&push));
    };
    for seq in [2, 1, 3, 3] {
        push(&mut c, seq);
    }
    assert_eq!(
        sent(&mut c),
        vec![ClientMsg::PushAcks { token, epoch: 1, seqs: vec![2, 1, 3] }],
        "each seq once"
    );
    // More than fit one datagram: full ones go as they fill.
    let n = proto::MAX_ACKS as u64 + 5;
    for seq in 4..4 + n {
        push(&mut c, seq);
    }
    let acks = sent(&mut c);
    assert_eq!(acks.len(), 2);
    let all: Vec<u64> = acks
        .iter()
        .flat_map(|a| match a {
            ClientMsg::PushAcks { seqs, .. } => seqs.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(all, (4..4 + n).collect::<Vec<_>>());
    for a in acks {
        let bytes = proto::encode_client(&a);
        assert!(bytes.len() <= proto::MAX_DATAGRAM && proto::decode_client(&bytes) == Ok(a));
    }
}

#[test]
fn a_batch_of_pushes_is_shown_in_order_and_acked_in_one_datagram() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let token = login(&mut c, t0);
    let batch = ServerMsg::Pushes {
        session: token.session_id(),
        epoch: 1,
        first_seq: 2,
        messages: vec![msg(12), msg(13)],
    };
    c.handle(t0, addr(), &encode_server(&batch));
    assert_eq!(c.poll_event(), None, "held until 1 arrives");
    let one = ServerMsg::Push { session: token.session_id(), epoch: 1, seq: 1, message: msg(11) };
    c.handle(t0, addr(), &encode_server(&one));
    assert_eq!(sent(&mut c), vec![ClientMsg::PushAcks { token, epoch: 1, seqs: vec![2, 3, 1] }]);
    for id in [11, 12, 13] {
        assert_eq!(c.poll_event(), Some(Event::Push(msg(id))));
    }
    // Another session's batch is neither shown nor acked.
    let other = ServerMsg::Pushes { session: 1, epoch: 1, first_seq: 4, messages: vec![msg(14), msg(15)] };
    c.handle(t0, addr(), &encode_server(&other));
    assert!(sent(&mut c).is_empty() && c.poll_event().is_none());
}

fn request(msgs: Vec<ClientMsg>) -> Request {
    match <[ClientMsg; 1]>::try_from(msgs) {
        Ok([ClientMsg::Request(r)]) => r,
        Ok(other) => panic!("{other:?}"),
        Err(v) => panic!("expected one request, got {v:?}"),
    }
}

#[test]
fn refused_fails_the_command_at_once() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Ping).unwrap();
    sent(&mut c);
    c.connection_refused(t0);
    assert_eq!(c.poll_event(), Some(Event::Refused { command: "ping", server: addr() }));
    assert_eq!(c.poll_event(), None, "never answered: no contact to lose");
    assert!(c.is_ready());
    assert_eq!(c.poll_timeout(), None, "no retransmission, nothing to keep alive");
}

#[test]
fn a_command_begun_while_the_daemon_answered_outlives_a_restart() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut c = client(t0);
    let _ = login(&mut c, t0);
    c.submit(t0, Command::Post { text: "hi".into() }).unwrap();
    let post = request(sent(&mut c));
    c.connection_refused(t0);
    assert_eq!(
        c.poll_event(),
        Some(Event::Contact {
            server: addr(),
            change: ContactChange::Lost { refused: true, ever_answered: true }
        })
    );
    assert_eq!(c.poll_event(), None, "the post goes on");
    c.handle_timeout(t0 + s(1));
    assert_eq!(request(sent(&mut c)).id, post.id, "retransmitted as usual");
    c.connection_refused(t0 + s(1));
    assert_eq!(c.poll_event(), None, "said once");
    reply(&mut c, t0 + s(2), post.id, Ok(Response::Posted { id: 5, recipients: 0 }));
    assert_eq!(c.poll_event(), Some(Event::Contact { server: addr(), change: ContactChange::Reconnected }));
    assert_eq!(c.poll_event(), Some(Event::Done(Done::Posted { id: 5, recipients: 0 })));

    // Begun once contact was known lost: refused at once.
    c.connection_refused(t0 + s(2));
    c.handle_timeout(t0 + s(40));
    sent(&mut c);
    c.connection_refused(t0 + s(40));
    while c.poll_event().is_some() {}
    c.submit(t0 + s(41), Command::WhoAmI).unwrap();
    sent(&mut c);
    c.connection_refused(t0 + s(41));
    assert_eq!(c.poll_event(), Some(Event::Refused { command: "whoami", server: addr() }));
}

#[test]
fn a_silent_keepalive_loses_contact_and_probes_find_it_again() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut c = client(t0);
    let token = login(&mut c, t0);
    // The keepalive goes unanswered through all its tries (1 + 2 + 4 + 8 s).
    c.handle_timeout(t0 + s(30));
    let r = request(sent(&mut c));
    assert_eq!(r.body, RequestBody::Ping);
    assert!(c.is_ready(), "a keepalive does not hold up commands");
    for at in [31, 33, 37] {
        c.handle_timeout(t0 + s(at));
        assert_eq!(request(sent(&mut c)).id, r.id, "retransmission at {at}");
    }
    assert_eq!(c.poll_event(), None);
    c.handle_timeout(t0 + s(45));
    assert_eq!(
        c.poll_event(),
        Some(Event::Contact {
            server: addr(),
            change: ContactChange::Lost { refused: false, ever_answered: true }
        })
    );
    assert_eq!(c.poll_event(), None, "no error for a command nobody typed");
    // Probes: one second later, then waits that double (1, 2, 4 ...).
    assert_eq!(c.poll_timeout(), Some(t0 + s(46)));
    c.handle_timeout(t0 + s(46));
    let p1 = request(sent(&mut c));
    assert_eq!((p1.body, p1.token), (RequestBody::Ping, Some(token)));
    assert_eq!(c.poll_timeout(), Some(t0 + s(47)), "a probe waits one second, with one try");
    c.handle_timeout(t0 + s(47));
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.poll_event(), None, "lost is said once");
    assert_eq!(c.poll_timeout(), Some(t0 + s(49)));
    c.handle_timeout(t0 + s(49));
    let p2 = request(sent(&mut c));
    assert_ne!(p2.id, p1.id);
    // The daemon is back: the probe's answer restores contact.
    reply(&mut c, t0 + s(49), p2.id, Ok(Response::SessionPong { epoch: 1 }));
    assert_eq!(c.poll_event(), Some(Event::Contact { server: addr(), change: ContactChange::Reconnected }));
    assert_eq!(c.poll_event(), None);
    assert_eq!(c.poll_timeout(), Some(t0 + s(79)), "back to keepalives");
}

#[test]
fn a_refused_keepalive_loses_contact_at_once() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut c = client(t0);
    let _ = login(&mut c, t0);
    c.handle_timeout(t0 + s(30));
    sent(&mut c);
    c.connection_refused(t0 + s(30));
    assert_eq!(
        c.poll_event(),
        Some(Event::Contact {
            server: addr(),
            change: ContactChange::Lost { refused: true, ever_answered: true }
        })
    );
    assert_eq!(c.poll_event(), None);
    assert_eq!(c.poll_timeout(), Some(t0 + s(31)));
    // A command typed meanwhile is answered: that is contact too.
    c.submit(t0 + s(30), Command::WhoAmI).unwrap();
    let r = request(sent(&mut c));
    reply(&mut c, t0 + s(30), r.id, Ok(Response::Me { user: "alice".into(), sessions: 1 }));
    assert_eq!(c.poll_event(), Some(Event::Contact { server: addr(), change: ContactChange::Reconnected }));
    assert_eq!(c.poll_event(), Some(Event::Done(Done::Me { user: "alice".into(), sessions: 1 })));
}

#[test]
fn a_command_takes_the_place_of_a_keepalive() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut c = client(t0);
    let _ = login(&mut c, t0);
    c.handle_timeout(t0 + s(30));
    let keepalive = request(sent(&mut c));
    assert!(c.is_ready());
    c.submit(t0 + s(30), Command::Post { text: "hi".into() }).unwrap();
    let post = request(sent(&mut c));
    assert_eq!(post.body, RequestBody::Post { text: "hi".into() });
    // The keepalive's late answer is ignored; the post's is not.
    reply(&mut c, t0 + s(30), keepalive.id, Ok(Response::SessionPong { epoch: 1 }));
    assert_eq!(c.poll_event(), None);
    assert!(!c.is_ready());
    reply(&mut c, t0 + s(30), post.id, Ok(Response::Posted { id: 1, recipients: 0 }));
    assert_eq!(c.poll_event(), Some(Event::Done(Done::Posted { id: 1, recipients: 0 })));
}

#[test]
fn abandon_gives_the_client_back_and_ignores_the_late_reply() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Ping).unwrap();
    let r = request(sent(&mut c));
    assert!(!c.is_ready());
    assert_eq!(c.abandon(t0), Some("ping"));
    assert!(c.is_ready());
    assert_eq!(c.poll_timeout(), None, "no retransmission of an abandoned request");
    assert_eq!(c.abandon(t0), None, "nothing left to abandon");
    reply(&mut c, t0, r.id, Ok(Response::Pong));
    assert_eq!(c.poll_event(), None);
}

#[test]
fn abandoning_a_confirmed_login_reports_the_login() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Login { user: "alice".into(), password: "pw".into() }).unwrap();
    let r = request(sent(&mut c));
    reply(
        &mut c,
        t0,
        r.id,
        Ok(Response::LoggedIn { token: Token([7; 16]), missed: 0, catching_up: 0, epoch: 1 }),
    );
    sent(&mut c);
    assert_eq!(c.abandon(t0), None, "the daemon accepted the login: it stands");
    assert_eq!(
        c.poll_event(),
        Some(Event::Done(Done::LoggedIn { user: "alice".into(), missed: 0, catching_up: 0 }))
    );
    assert_eq!(c.user(), Some("alice"));
}

#[test]
fn watching_reports_the_first_contact_or_its_absence() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut c = client(t0);
    c.watch_contact(t0);
    assert_eq!(c.poll_timeout(), Some(t0));
    c.handle_timeout(t0);
    let probe = request(sent(&mut c));
    assert_eq!((probe.body, probe.token), (RequestBody::Ping, None));
    c.handle_timeout(t0 + s(1));
    assert_eq!(
        c.poll_event(),
        Some(Event::Contact {
            server: addr(),
            change: ContactChange::Lost { refused: false, ever_answered: false }
        })
    );
    assert!(!c.has_had_contact());
    c.handle_timeout(t0 + s(3));
    let probe = request(sent(&mut c));
    reply(&mut c, t0 + s(3), probe.id, Ok(Response::Pong));
    assert_eq!(c.poll_event(), Some(Event::Contact { server: addr(), change: ContactChange::Connected }));
    assert!(c.has_had_contact());
    assert_eq!(c.poll_timeout(), None, "not logged in: nothing to keep alive");
}

#[test]
fn a_new_server_address_gets_the_request_in_flight_at_once() {
    let t0 = Instant::now();
    let mut c = client(t0);
    c.submit(t0, Command::Ping).unwrap();
    let first = request(sent(&mut c));
    let other: SocketAddr = "127.0.0.2:7070".parse().unwrap();
    c.set_server(t0, other);
    assert_eq!(request(sent(&mut c)).id, first.id);
    assert_eq!(c.server(), other);
    // Answers now come from there (and only from there).
    c.handle(t0, addr(), &encode_server(&ServerMsg::Reply { id: first.id, result: Ok(Response::Pong) }));
    assert_eq!(c.poll_event(), None);
    c.handle(t0, other, &encode_server(&ServerMsg::Reply { id: first.id, result: Ok(Response::Pong) }));
    assert!(matches!(c.poll_event(), Some(Event::Done(Done::Pong { .. }))));
}

/// Several daemons on one database: a request unanswered `failover_after_tries` times moves,
/// with the session, to the next; pushes in the new daemon's epoch are followed once it names
/// it, and what was shown already is not shown again.
#[test]
fn a_silent_server_is_left_for_the_next_with_the_session() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let other: SocketAddr = "127.0.0.2:7070".parse().unwrap();
    c.set_servers(vec![addr(), other]);
    let token = login(&mut c, t0);
    c.handle(
        t0,
        addr(),
        &encode_server(&ServerMsg::Push { session: token.session_id(), epoch: 1, seq: 1, message: msg(10) }),
    );
    assert_eq!(c.poll_event(), Some(Event::Push(msg(10))));
    sent(&mut c);
    c.submit(t0, Command::Post { text: "hi".into() }).unwrap();
    let id = match &sent(&mut c)[..] {
        [ClientMsg::Request(r)] => r.id,
        other => panic!("{other:?}"),
    };
    // Three transmissions to the first server (the default failover_after_tries), then the
    // same request goes to the second at once.
    let mut now;
    for _ in 0..2 {
        now = c.poll_timeout().unwrap();
        c.handle_timeout(now);
        assert_eq!(sent(&mut c).len(), 1);
        assert_eq!(c.server(), addr());
    }
    now = c.poll_timeout().unwrap();
    c.handle_timeout(now);
    assert_eq!(c.server(), other);
    assert_eq!(c.poll_event(), Some(Event::Moved { from: addr(), to: other }));
    match &sent(&mut c)[..] {
        [ClientMsg::Request(r)] => {
            assert_eq!((r.id, r.token), (id, Some(token)), "the same request, same session")
        }
        other => panic!("{other:?}"),
    }
    // The old server is no longer listened to.
    c.handle(
        now,
        addr(),
        &encode_server(&ServerMsg::Reply { id, result: Ok(Response::Posted { id: 1, recipients: 0 }) }),
    );
    assert_eq!(c.poll_event(), None);
    // The new daemon took the session over: it pushes in a newer epoch what may have been
    // missed (10 again, and 11), held until an answer names that epoch.
    let push = |seq, message| ServerMsg::Push { session: token.session_id(), epoch: 5, seq, message };
    c.handle(now, other, &encode_server(&push(1, msg(10))));
    c.handle(now, other, &encode_server(&push(2, msg(11))));
    assert_eq!(c.poll_event(), None);
    c.handle(
        now,
        other,
        &encode_server(&ServerMsg::Reply { id, result: Ok(Response::Posted { id: 12, recipients: 0 }) }),
    );
    assert_eq!(c.poll_event(), Some(Event::Done(Done::Posted { id: 12, recipients: 0 })));
    // The client asks for the epoch (a ping); the answer releases 11 only.
    let ping = sent(&mut c).into_iter().find_map(|m| match m {
        ClientMsg::Request(r) if r.body == RequestBody::Ping => Some(r.id),
        _ => None,
    });
    let ping = ping.unwrap_or_else(|| {
        let at = c.poll_timeout().expect("a ping is due");
        c.handle_timeout(at.max(now));
        match &sent(&mut c)[..] {
            [.., ClientMsg::Request(r)] if r.body == RequestBody::Ping => r.id,
            other => panic!("no ping: {other:?}"),
        }
    });
    c.handle(
        now,
        other,
        &encode_server(&ServerMsg::Reply { id: ping, result: Ok(Response::SessionPong { epoch: 5 }) }),
    );
    assert_eq!(c.poll_event(), Some(Event::Push(msg(11))));
    assert_eq!(c.poll_event(), None);
}

/// Each request tries every server once, then reports no answer; a refused address moves at
/// once; a probe never moves.
#[test]
fn every_server_once_per_request() {
    let t0 = Instant::now();
    let mut c = client(t0);
    let (b, d): (SocketAddr, SocketAddr) =
        ("127.0.0.2:7070".parse().unwrap(), "127.0.0.3:7070".parse().unwrap());
    c.set_servers(vec![addr(), b, d]);
    c.submit(t0, Command::Ping).unwrap();
    sent(&mut c);
    assert!(c.fail_over(t0), "refused: the next one at once");
    assert_eq!(c.server(), b);
    assert_eq!(c.poll_event(), Some(Event::Moved { from: addr(), to: b }));
    let mut moved = vec![];
    let mut now = t0;
    for _ in 0..20 {
        let Some(t) = c.poll_timeout() else { break };
        now = t;
        c.handle_timeout(now);
        while let Some(e) = c.poll_event() {
            moved.push(e);
        }
        if c.is_ready() {
            break;
        }
    }
    assert_eq!(moved[0], Event::Moved { from: b, to: d });
    assert!(
        matches!(moved.last(), Some(Event::NoAnswer { server, tries: 4, .. }) if *server == d),
        "{moved:?}"
    );
    assert!(!c.fail_over(now) || c.server() == addr(), "without a request the next server is just next");
}
