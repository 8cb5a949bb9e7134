//! The exactly-once scenario run by the fault tests: posters post while subscribers listen, over
//! a path that loses, duplicates and reorders; then every acknowledged post must have been shown
//! exactly once to every subscriber, in order per author, and be in their retrieve exactly once;
//! a refused post must be stored nowhere.

use super::LiveClient;
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Push timers for a lossy path: quick first retransmission, many tries.
pub const LOSSY_DAEMON_CONFIG: &str =
    "push_initial_rto_ms = 200\npush_min_rto_ms = 50\npush_max_rto_ms = 2000\npush_max_tries = 30\n";

/// A client config for a lossy path: quick first timeout, many tries, frequent keepalives.
pub fn lossy_client_config(dir: &std::path::Path) -> String {
    let path = dir.join("client.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(
        f,
        "request_initial_timeout_ms = 200\nrequest_min_timeout_ms = 50\nrequest_max_timeout_ms = 2000\n\
         request_max_tries = 20\nping_interval_secs = 3"
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

fn json_lines(c: &mut LiveClient, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    c.stdout
        .wait_for(timeout, |l| serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v)))
        .map(|l| serde_json::from_str(&l).unwrap())
}

fn values(c: &LiveClient) -> Vec<Value> {
    c.stdout.seen.iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// `direct`: the daemon's address for account setup; `path`: the address clients use (a proxy,
/// or the daemon across a lossy link). `wrapper` runs each client (e.g. in a namespace).
pub fn exactly_once(
    wrapper: &[&str],
    direct: SocketAddr,
    path: SocketAddr,
    cfg: &str,
    n_posters: usize,
    n_subscribers: usize,
    posts: usize,
) {
    let posters: Vec<String> = (0..n_posters).map(|i| format!("p{i}")).collect();
    let subscribers: Vec<String> = (0..n_subscribers).map(|i| format!("s{i}")).collect();
    let setup: Vec<String> =
        posters.iter().chain(subscribers.iter()).map(|u| format!("register#{u}&password")).collect();
    let mut input = setup.join("\n");
    input.push('\n');
    let out = super::run_client_wrapped(wrapper, direct, &["--config", cfg], &input);
    assert_eq!(out.code, Some(0), "{out:?}");

    let start = |user: &str| {
        let mut c = LiveClient::start_wrapped(wrapper, path, &["--json", "--config", cfg]);
        c.send(&format!("login#{user}&password"));
        c
    };
    let mut subs: Vec<LiveClient> = subscribers.iter().map(|u| start(u)).collect();
    for c in &mut subs {
        for p in &posters {
            c.send(&format!("subscribe#{p}"));
        }
    }
    for c in &mut subs {
        for p in &posters {
            let ok =
                json_lines(c, Duration::from_secs(60), |v| v["command"] == "subscribe" && v["user"] == *p);
            assert!(ok.is_some(), "subscribe to {p} did not complete: {:?}", c.stdout.seen);
        }
    }

    let mut posting: Vec<LiveClient> = posters.iter().map(|u| start(u)).collect();
    for (i, c) in posting.iter_mut().enumerate() {
        for k in 0..posts {
            c.send(&format!("post#m{k} from p{i}"));
            if k == 5 {
                c.send(&format!("post#{}", "x".repeat(1001))); // refused: too long
            }
        }
        c.send("whoami");
    }
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    for c in &mut posting {
        assert!(
            json_lines(c, Duration::from_secs(120), |v| v["command"] == "whoami").is_some(),
            "posting stalled"
        );
        let vs = values(c);
        for v in &vs {
            if v["type"] == "ok" && v["command"] == "post" {
                acked.insert(v["id"].as_u64().unwrap());
            }
        }
        let refused = vs.iter().filter(|v| v["type"] == "error" && v["command"] == "post").count();
        assert_eq!(refused, 1, "{vs:?}");
    }
    assert!(acked.len() >= posts, "most posts should be acknowledged: {}", acked.len());

    // Every subscriber is shown every acked post exactly once, in order per author.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, c) in subs.iter_mut().enumerate() {
        loop {
            let shown: HashSet<u64> =
                values(c).iter().filter(|v| v["type"] == "push").map(|v| v["id"].as_u64().unwrap()).collect();
            if acked.iter().all(|id| shown.contains(id)) || Instant::now() > deadline {
                break;
            }
            c.stdout.wait_for(Duration::from_millis(500), |_| false);
        }
        let pushes: Vec<Value> = values(c).into_iter().filter(|v| v["type"] == "push").collect();
        for id in acked.iter() {
            let n = pushes.iter().filter(|v| v["id"] == *id).count();
            assert_eq!(n, 1, "s{i} was shown acked post {id} {n} times");
        }
        for author in &posters {
            let ids: Vec<u64> =
                pushes.iter().filter(|v| v["author"] == *author).map(|v| v["id"].as_u64().unwrap()).collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "s{i}: {author}'s posts out of order: {ids:?}");
        }
        assert!(
            pushes.iter().all(|v| !v["text"].as_str().unwrap().starts_with("xxx")),
            "a refused post was pushed"
        );
        c.send("retrieve#100");
    }
    for (i, c) in subs.iter_mut().enumerate() {
        let r = json_lines(c, Duration::from_secs(60), |v| v["command"] == "retrieve").expect("retrieve");
        let msgs = r["messages"].as_array().unwrap();
        for id in acked.iter() {
            let n = msgs.iter().filter(|m| m["id"] == *id).count();
            assert_eq!(n, 1, "acked post {id} is {n} times in s{i}'s retrieve");
        }
        assert!(
            msgs.iter().all(|m| !m["text"].as_str().unwrap().starts_with("xxx")),
            "a refused post was stored"
        );
    }
    for c in &mut subs {
        assert_eq!(c.finish(), Some(0), "every subscriber command succeeded");
    }
    for c in &mut posting {
        assert_eq!(c.finish(), Some(1), "each poster had one refused post");
    }
}
