//! The driver's policy on a virtual clock, with the daemon's answers written by hand.

use super::*;
use udpmsg::config::ClientConfig;
use udpmsg::proto::{
    decode_client, encode_server, ClientMsg, Request, RequestBody, Response, ServerMsg, Token,
};

fn addr() -> SocketAddr {
    "127.0.0.1:7070".parse().unwrap()
}

fn driver(interactive: bool, keep_session: bool) -> Driver {
    let client = Client::new(ClientConfig::default(), addr(), 1, Instant::now());
    Driver::new(client, interactive, keep_session, Arc::default())
}

/// The one request the driver sent since last asked.
fn sent(d: &mut Driver) -> Request {
    let msgs: Vec<ClientMsg> =
        std::iter::from_fn(|| d.poll_transmit()).map(|b| decode_client(&b).unwrap()).collect();
    match <[ClientMsg; 1]>::try_from(msgs) {
        Ok([ClientMsg::Request(r)]) => r,
        other => panic!("expected one request, got {other:?}"),
    }
}

fn nothing_sent(d: &mut Driver) {
    assert_eq!(d.poll_transmit(), None);
}

fn answer(d: &mut Driver, now: Instant, r: &Request, result: Result<Response, ErrorCode>) {
    d.handle(now, addr(), &encode_server(&ServerMsg::Reply { id: r.id, result }));
    d.step(now);
}

fn items(d: &mut Driver) -> Vec<Item> {
    std::iter::from_fn(|| d.poll_item()).collect()
}

/// Logs in as `user`, answering the login and its confirmation ping.
fn login(d: &mut Driver, now: Instant, user: &str) {
    d.line(format!("login#{user}&pw"));
    d.step(now);
    let r = sent(d);
    assert!(matches!(r.body, RequestBody::Login { .. }), "{r:?}");
    answer(
        d,
        now,
        &r,
        Ok(Response::LoggedIn { token: Token([user.len() as u8; 16]), missed: 0, catching_up: 0, epoch: 1 }),
    );
    let ping = sent(d);
    answer(d, now, &ping, Ok(Response::SessionPong { epoch: 1 }));
    let got = items(d);
    assert_eq!(
        got,
        vec![Item::Event(Event::Done(Done::LoggedIn { user: user.into(), missed: 0, catching_up: 0 }))]
    );
}

#[test]
fn the_end_of_a_script_logs_out_quietly() {
    let t0 = Instant::now();
    let mut d = driver(false, false);
    login(&mut d, t0, "carol");
    d.input_ended();
    d.step(t0);
    let r = sent(&mut d);
    assert_eq!(r.body, RequestBody::Logout);
    assert!(!d.finished());
    answer(&mut d, t0, &r, Ok(Response::LoggedOut));
    assert!(d.finished());
    assert_eq!(items(&mut d), vec![], "a script's output ends with its own commands");
    assert_eq!(d.failures(), 0);
}

#[test]
fn leaving_waits_for_the_logout_at_most_exit_wait() {
    let t0 = Instant::now();
    let mut d = driver(true, false);
    login(&mut d, t0, "carol");
    let names = sent(&mut d);
    answer(&mut d, t0, &names, Ok(Response::Relations { entries: vec![], next: None }));
    d.line("quit".into());
    d.line("post#typed after quit".into());
    d.step(t0);
    assert_eq!(sent(&mut d).body, RequestBody::Logout);
    // Retransmitted as usual until the deadline (the RTT measured so far sets the pace).
    let mut tries = 1;
    while let Some(at) = d.poll_timeout().filter(|at| *at < t0 + EXIT_WAIT) {
        d.handle_timeout(at);
        d.step(at);
        assert_eq!(sent(&mut d).body, RequestBody::Logout);
        assert!(!d.finished());
        tries += 1;
    }
    assert!(tries > 1, "retransmitted");
    assert_eq!(d.poll_timeout(), Some(t0 + EXIT_WAIT));
    d.handle_timeout(t0 + EXIT_WAIT);
    d.step(t0 + EXIT_WAIT);
    assert!(d.finished());
    assert_eq!(
        items(&mut d),
        vec![Item::Notice(Notice::NotLoggedOut {
            user: "carol".into(),
            why: "no answer from 127.0.0.1:7070 within 2 s".into()
        })]
    );
    nothing_sent(&mut d);
}

#[test]
fn the_repl_says_who_it_logged_out_on_leaving() {
    let t0 = Instant::now();
    let mut d = driver(true, false);
    login(&mut d, t0, "carol");
    // (The REPL fetches whom carol follows, for completion, without showing it.)
    let names = sent(&mut d);
    assert_eq!(names.body, RequestBody::Subscriptions { after: None });
    answer(&mut d, t0, &names, Ok(Response::Relations { entries: vec![], next: None }));
    assert_eq!(items(&mut d), vec![]);
    d.input_ended();
    d.step(t0);
    let r = sent(&mut d);
    answer(&mut d, t0, &r, Ok(Response::LoggedOut));
    assert!(d.finished());
    assert_eq!(items(&mut d), vec![Item::LoggedOut { user: Some("carol".into()) }]);
}

#[test]
fn keep_session_leaves_without_logging_out() {
    let t0 = Instant::now();
    let mut d = driver(false, true);
    login(&mut d, t0, "carol");
    d.input_ended();
    d.step(t0);
    assert!(d.finished());
    nothing_sent(&mut d);
}

#[test]
fn a_login_as_someone_else_logs_out_first() {
    let t0 = Instant::now();
    let mut d = driver(false, false);
    login(&mut d, t0, "erin");
    d.line("login#bob&pw".into());
    d.step(t0);
    let r = sent(&mut d);
    assert_eq!(r.body, RequestBody::Logout);
    answer(&mut d, t0, &r, Ok(Response::LoggedOut));
    assert_eq!(items(&mut d), vec![Item::LoggedOut { user: Some("erin".into()) }]);
    let r = sent(&mut d);
    assert!(matches!(&r.body, RequestBody::Login { user, .. } if user == "bob"), "{r:?}");

    // Logging in again as the same user too: the password is checked again.
    let mut d = driver(false, false);
    login(&mut d, t0, "erin");
    d.line("login#erin&pw".into());
    d.step(t0);
    assert_eq!(sent(&mut d).body, RequestBody::Logout);
}

#[test]
fn a_session_already_gone_does_not_stop_the_switch() {
    let t0 = Instant::now();
    let mut d = driver(false, false);
    login(&mut d, t0, "erin");
    d.line("login#bob&pw".into());
    d.step(t0);
    let r = sent(&mut d);
    answer(&mut d, t0, &r, Err(ErrorCode::SessionExpired));
    assert_eq!(items(&mut d), vec![Item::LoggedOut { user: Some("erin".into()) }]);
    assert!(matches!(sent(&mut d).body, RequestBody::Login { .. }));
    assert_eq!(d.failures(), 0);
}

#[test]
fn a_registration_logs_in_with_the_same_password() {
    let t0 = Instant::now();
    let mut d = driver(false, false);
    d.line("register#alice&s3cret".into());
    d.step(t0);
    let r = sent(&mut d);
    answer(&mut d, t0, &r, Ok(Response::Registered));
    assert_eq!(items(&mut d), vec![Item::Registered { user: "alice".into(), still_as: None }]);
    let r = sent(&mut d);
    assert!(
        matches!(&r.body, RequestBody::Login { user, password, .. } if user == "alice" && password == "s3cret"),
        "{r:?}"
    );

    // Someone else logged in: no switch behind the user's back.
    let mut d = driver(false, false);
    login(&mut d, t0, "erin");
    d.line("register#alice&s3cret".into());
    d.step(t0);
    let r = sent(&mut d);
    answer(&mut d, t0, &r, Ok(Response::Registered));
    assert_eq!(items(&mut d), vec![Item::Registered { user: "alice".into(), still_as: Some("erin".into()) }]);
    nothing_sent(&mut d);
}

#[test]
fn delete_asks_in_the_repl_only() {
    let t0 = Instant::now();
    let mut d = driver(true, false);
    login(&mut d, t0, "carol");
    let names = sent(&mut d);
    answer(&mut d, t0, &names, Ok(Response::Relations { entries: vec![], next: None }));
    d.line("delete#pw".into());
    d.step(t0);
    nothing_sent(&mut d);
    assert_eq!(items(&mut d), vec![Item::Notice(Notice::ConfirmDelete { user: "carol".into() })]);
    d.line("no".into());
    d.step(t0);
    nothing_sent(&mut d);
    assert_eq!(items(&mut d), vec![Item::Notice(Notice::NotDeleted)]);
    d.line("delete#pw".into());
    d.line("YES".into());
    d.step(t0);
    let r = sent(&mut d);
    assert_eq!(r.body, RequestBody::DeleteAccount { password: "pw".into() });
    // A wrong password names no user name.
    answer(&mut d, t0, &r, Err(ErrorCode::BadCredentials));
    let got = items(&mut d);
    assert_eq!(got[1], Item::Failed { command: "delete", error: ErrorCode::BadCredentials, text_len: None });

    let mut d = driver(false, false);
    login(&mut d, t0, "carol");
    d.line("delete#pw".into());
    d.step(t0);
    assert_eq!(
        sent(&mut d).body,
        RequestBody::DeleteAccount { password: "pw".into() },
        "a script is not asked"
    );
}

#[test]
fn ctrl_c_abandons_the_command_and_what_was_typed_after_it() {
    let t0 = Instant::now();
    let mut d = driver(true, false);
    d.line("ping".into());
    d.line("whoami".into());
    d.line("help".into());
    d.step(t0);
    let r = sent(&mut d);
    d.interrupt(t0, true);
    d.step(t0);
    assert_eq!(items(&mut d), vec![Item::Notice(Notice::Abandoned { command: "ping", dropped: 2 })]);
    nothing_sent(&mut d);
    assert_eq!(d.poll_timeout(), None, "nothing left to retransmit");
    // The late answer shows nothing; the REPL goes on.
    answer(&mut d, t0, &r, Ok(Response::Pong));
    assert_eq!(items(&mut d), vec![]);
    assert!(!d.finished());
    // On an empty prompt with nothing going on: how to leave.
    d.interrupt(t0, true);
    assert_eq!(items(&mut d), vec![Item::Notice(Notice::LeaveHint)]);
    d.interrupt(t0, false);
    assert_eq!(items(&mut d), vec![], "Ctrl-C that cleared a line is no news");
}

#[test]
fn sigint_ends_a_script_after_the_command_in_flight_with_a_logout() {
    let t0 = Instant::now();
    let mut d = driver(false, false);
    login(&mut d, t0, "carol");
    d.line("post#x".into());
    d.line("post#never".into());
    d.step(t0);
    let post = sent(&mut d);
    d.interrupt(t0, false);
    d.step(t0);
    assert!(d.interrupted());
    nothing_sent(&mut d);
    answer(&mut d, t0, &post, Ok(Response::Posted { id: 1, recipients: 0 }));
    assert_eq!(sent(&mut d).body, RequestBody::Logout, "then the logout; the rest of the script is dropped");
    // A second one leaves at once.
    d.interrupt(t0, false);
    assert!(d.finished());
}

#[test]
fn sigterm_during_a_login_waits_for_it_and_logs_out() {
    let t0 = Instant::now();
    let mut d = driver(true, false);
    d.line("login#carol&pw".into());
    d.step(t0);
    let r = sent(&mut d);
    d.terminate(t0);
    d.step(t0);
    // The daemon accepted the login: leaving now would leave that session behind.
    answer(
        &mut d,
        t0,
        &r,
        Ok(Response::LoggedIn { token: Token([5; 16]), missed: 0, catching_up: 0, epoch: 1 }),
    );
    let ping = sent(&mut d);
    answer(&mut d, t0, &ping, Ok(Response::SessionPong { epoch: 1 }));
    assert_eq!(sent(&mut d).body, RequestBody::Logout);
    assert!(!d.finished());
    // All of it within EXIT_WAIT of the signal.
    assert_eq!(d.poll_timeout().map(|t| t <= t0 + EXIT_WAIT), Some(true));
    d.handle_timeout(t0 + EXIT_WAIT);
    d.step(t0 + EXIT_WAIT);
    assert!(d.finished());
}

#[test]
fn text_too_long_says_how_long_it_was() {
    let t0 = Instant::now();
    let mut d = driver(false, false);
    login(&mut d, t0, "carol");
    d.line(format!("post#{}", "x".repeat(1010)));
    d.step(t0);
    let r = sent(&mut d);
    answer(&mut d, t0, &r, Err(ErrorCode::TextTooLong { max: 1000 }));
    assert_eq!(
        items(&mut d),
        vec![Item::Failed {
            command: "post",
            error: ErrorCode::TextTooLong { max: 1000 },
            text_len: Some(1010)
        }]
    );
    assert_eq!(d.failures(), 1);
}

#[test]
fn the_repl_says_when_an_answer_is_slow() {
    let t0 = Instant::now();
    let mut d = driver(true, false);
    d.line("ping".into());
    d.step(t0);
    sent(&mut d);
    assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(1)), "the retransmission comes first");
    d.handle_timeout(t0 + Duration::from_secs(1));
    d.step(t0 + Duration::from_secs(1));
    sent(&mut d);
    assert_eq!(d.poll_timeout(), Some(t0 + SLOW));
    d.handle_timeout(t0 + SLOW);
    d.step(t0 + SLOW);
    assert_eq!(
        items(&mut d),
        vec![Item::Notice(Notice::StillWaiting { command: "ping", server: addr(), secs: 3 })]
    );
    d.step(t0 + SLOW);
    assert_eq!(items(&mut d), vec![], "said once");
}
