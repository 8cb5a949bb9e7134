//! Accounts and direct messages through the real binaries: users#, send#, catch-up on login,
//! delete#, whoami, subscriptions, and the version mismatch as the user sees it.

mod common;

use common::{run_client, Daemon, LiveClient, FAST_CONFIG};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn register(d: &Daemon, users: &[&str]) {
    let cmds: Vec<String> = users.iter().map(|u| format!("register#{u}&password")).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = run_client(d.addr, &refs, "");
    assert_eq!(out.code, Some(0), "{out:?}");
}

fn login(d: &Daemon, user: &str) -> LiveClient {
    let mut c = LiveClient::start(d.addr, &[]);
    c.send(&format!("login#{user}&password"));
    assert!(c.stdout.wait_for(WAIT, |l| l.starts_with(&format!("logged in as {user}"))).is_some());
    c
}

#[test]
fn users_lists_by_wildcard_across_pages() {
    let d = Daemon::start(FAST_CONFIG);
    // Enough names that the list needs several datagrams.
    let names: Vec<String> = (0..120).map(|i| format!("user{i:03}_{}", "x".repeat(20))).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    register(&d, &refs);
    register(&d, &["bob", "bobby", "carol"]);
    let out = run_client(d.addr, &["login#bob&password", "users#*"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let listed: Vec<&String> = out.stdout.iter().skip(1).collect();
    assert_eq!(listed.len(), 123, "all names, once: {listed:?}");
    let out = run_client(d.addr, &["login#bob&password", "users#bob*", "users#?arol", "users#nobody*"], "");
    assert_eq!(out.stdout[1..], ["bob", "bobby", "carol", "no users match"]);
    let out = run_client(d.addr, &["login#bob&password", "users#a b"], "");
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.iter().any(|l| l.contains("invalid pattern")), "{out:?}");
}

#[test]
fn direct_messages_reach_online_users_at_once_and_wait_for_offline_ones() {
    let d = Daemon::start(FAST_CONFIG);
    register(&d, &["alice", "bob"]);
    let mut bob = login(&d, "bob");
    let out = run_client(d.addr, &["login#alice&password", "send#bob&hi & more", "send#nobody&x"], "");
    assert_eq!(out.code, Some(1));
    assert!(out.stdout.contains(&"sent to bob".to_string()), "{out:?}");
    assert!(out.stderr.contains(&"error: no such user nobody".to_string()), "{out:?}");
    assert!(
        bob.stdout.wait_for(WAIT, |l| l == "[alice -> you] hi & more").is_some(),
        "{:?}",
        bob.stdout.seen
    );
    bob.send("logout");
    assert!(bob.stdout.wait_for(WAIT, |l| l == "logged out bob").is_some());
    assert_eq!(bob.finish(), Some(0));
    // Offline: it waits in the inbox and is caught up on login.
    let out = run_client(d.addr, &["login#alice&password", "send#bob&while you were out"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut bob = login(&d, "bob");
    assert!(
        bob.stdout.wait_for(WAIT, |l| l == "[alice -> you] while you were out").is_some(),
        "{:?}",
        bob.stdout.seen
    );
    assert!(bob.stdout.seen.iter().any(|l| l.contains("1 new message")), "{:?}", bob.stdout.seen);
}

/// Catch-up: an offline user misses nothing, an online user sees nothing twice, across a logout
/// and across a client killed without logging out.
#[test]
fn catch_up_on_login() {
    let d = Daemon::start(FAST_CONFIG);
    register(&d, &["alice", "bob"]);
    let mut alice = login(&d, "alice");
    alice.send("subscribe#bob");
    assert!(alice.stdout.wait_for(WAIT, |l| l == "subscribed to bob").is_some());
    let post = |texts: &[&str]| {
        let mut cmds = vec!["login#bob&password".to_string()];
        cmds.extend(texts.iter().map(|t| format!("post#{t}")));
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        assert_eq!(run_client(d.addr, &refs, "").code, Some(0));
    };
    post(&["one"]);
    assert!(alice.stdout.wait_for(WAIT, |l| l == "[bob] one").is_some());
    alice.send("logout");
    assert!(alice.stdout.wait_for(WAIT, |l| l == "logged out alice").is_some());
    alice.finish();
    post(&["two", "three"]);

    // Back after a logout: exactly the two missed, in order, and not "one" again.
    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&password");
    assert!(alice.stdout.wait_for(WAIT, |l| l == "[bob] three").is_some(), "{:?}", alice.stdout.seen);
    let lines = alice.stdout.seen.clone();
    assert!(lines[0].contains("2 new message"), "{lines:?}");
    assert_eq!(lines[1..], ["[bob] two", "[bob] three"]);

    // Killed without logging out, while a post arrives: the next login catches it up.
    let _ = alice.child.kill();
    let _ = alice.child.wait();
    post(&["four"]);
    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&password");
    assert!(alice.stdout.wait_for(WAIT, |l| l == "[bob] four").is_some(), "{:?}", alice.stdout.seen);
    // A second client logging in while the first is online and up to date sees nothing old.
    let mut second = login(&d, "alice");
    assert_eq!(second.stdout.seen, vec!["logged in as alice"]);
    post(&["five"]);
    assert!(alice.stdout.wait_for(WAIT, |l| l == "[bob] five").is_some());
    assert!(second.stdout.wait_for(WAIT, |l| l == "[bob] five").is_some());
    std::thread::sleep(Duration::from_millis(300));
    let fours = alice.stdout.rest(Duration::from_millis(200)).iter().filter(|l| *l == "[bob] four").count();
    assert_eq!(fours, 1);
}

#[test]
fn catch_up_is_capped_and_the_rest_is_in_retrieve() {
    let d = Daemon::start(&format!("{FAST_CONFIG}catch_up_max = 3\n"));
    register(&d, &["alice", "bob"]);
    let out = run_client(d.addr, &["login#alice&password", "subscribe#bob", "logout"], "");
    assert_eq!(out.code, Some(0));
    let posts: Vec<String> = (1..=5).map(|i| format!("post#m{i}")).collect();
    let mut cmds = vec!["login#bob&password".to_string()];
    cmds.extend(posts);
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    assert_eq!(run_client(d.addr, &refs, "").code, Some(0));
    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&password");
    assert!(alice.stdout.wait_for(WAIT, |l| l == "[bob] m5").is_some());
    assert!(
        alice.stdout.seen[0].contains("5 new message(s)") && alice.stdout.seen[0].contains("latest 3"),
        "{:?}",
        alice.stdout.seen
    );
    assert_eq!(alice.stdout.seen[1..], ["[bob] m3", "[bob] m4", "[bob] m5"]);
    alice.send("retrieve#5");
    // Shown as history, under a line that says so.
    assert!(alice.stdout.wait_for(WAIT, |l| l == "  [bob] m1").is_some());
}

#[test]
fn delete_account_semantics() {
    let d = Daemon::start(FAST_CONFIG);
    register(&d, &["alice", "bob", "carol"]);
    // carol follows alice and has a post of hers; alice follows bob and has a DM.
    let out = run_client(d.addr, &["login#carol&password", "subscribe#alice"], "");
    assert_eq!(out.code, Some(0));
    let out = run_client(d.addr, &["login#alice&password", "subscribe#bob", "post#from alice"], "");
    assert_eq!(out.code, Some(0));
    let out = run_client(d.addr, &["login#bob&password", "send#alice&secret dm"], "");
    assert_eq!(out.code, Some(0));
    let mut other_session = login(&d, "alice");

    let out = run_client(d.addr, &["login#alice&password", "delete#wrong"], "");
    assert_eq!(out.code, Some(1));
    // No name was given: the error is about the password.
    assert!(
        out.stderr.contains(&"error: wrong password: the account was not deleted".to_string()),
        "{out:?}"
    );
    let out = run_client(d.addr, &["login#alice&password", "delete#password", "whoami"], "");
    assert!(out.stdout.contains(&"account deleted".to_string()), "{out:?}");
    assert!(out.stderr.iter().any(|l| l.contains("not logged in")), "the deleting session ended: {out:?}");
    // Every other session ended too.
    other_session.send("whoami");
    assert!(other_session.stderr.wait_for(WAIT, |l| l.contains("not logged in")).is_some());

    // Her post stays in carol's inbox under her name; messages to her are refused.
    let out =
        run_client(d.addr, &["login#carol&password", "retrieve#5", "subscriptions", "send#alice&x"], "");
    assert!(out.stdout.contains(&"  [alice] from alice".to_string()), "{out:?}");
    assert!(out.stdout.contains(&"following: nobody".to_string()), "subscription removed: {out:?}");
    assert!(out.stderr.contains(&"error: no such user alice".to_string()), "{out:?}");
    let out = run_client(d.addr, &["login#bob&password", "subscriptions"], "");
    assert!(out.stdout.contains(&"followers: nobody".to_string()), "{out:?}");

    // The name can be registered again; the new owner sees none of the old data.
    let out = run_client(
        d.addr,
        &[
            "register#alice&another",
            "login#alice&another",
            "retrieve#10",
            "subscriptions",
            "login#alice&password",
        ],
        "",
    );
    assert!(out.stdout.contains(&"no messages".to_string()), "{out:?}");
    assert!(out.stdout.contains(&"following: nobody".to_string()), "{out:?}");
    assert!(
        out.stderr.contains(&"error: wrong user name or password".to_string()),
        "old password is gone: {out:?}"
    );
}

#[test]
fn whoami_and_subscriptions() {
    let d = Daemon::start(FAST_CONFIG);
    register(&d, &["alice", "bob", "carol"]);
    let out = run_client(d.addr, &["login#carol&password", "subscribe#alice"], "");
    assert_eq!(out.code, Some(0));
    let out = run_client(d.addr, &["whoami"], "");
    assert!(out.stderr.iter().any(|l| l.contains("not logged in")), "{out:?}");
    let out = run_client(d.addr, &["login#alice&password", "subscribe#bob", "whoami", "subscriptions"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout[2..], ["alice (1 session(s))", "following: bob", "followers: carol"]);
}

#[test]
fn version_mismatch_as_the_user_sees_it() {
    // A fake daemon that speaks protocol v9: it answers anything with its version notice (its
    // header and an echo of the request, as every daemon since v3 does).
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut notice = udpmsg::proto::version_notice(&buf[..n]);
            notice[2] = 9;
            let _ = sock.send_to(&notice, from);
        }
    });
    let out = run_client(addr, &["ping", "whoami"], "");
    assert_ne!(out.code, Some(0));
    assert_eq!(out.stderr, vec!["error: ping: server speaks protocol v9, this client speaks v3"]);
}
