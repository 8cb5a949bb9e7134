//! The Prometheus endpoint, scraped while traffic flows: the numbers move as they should.

mod common;

use common::{run_client, Daemon, LiveClient, FAST_CONFIG};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn scrape(addr: SocketAddr) -> BTreeMap<String, u64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn metrics_move_with_traffic() {
    let mut d = Daemon::start(&format!("{FAST_CONFIG}metrics_listen = \"127.0.0.1:0\"\n"));
    let line = d
        .stderr
        .wait_for(Duration::from_secs(10), |l| l.contains("metrics on http://"))
        .expect("metrics line");
    let addr: SocketAddr =
        line.split("http://").nth(1).unwrap().trim_end_matches("/metrics").parse().unwrap();

    let before = scrape(addr);
    assert_eq!(before["udpmsg_sessions"], 0);
    assert_eq!(before.get("udpmsg_requests_total{kind=\"post\"}"), None);

    let out = run_client(d.addr, &["register#alice&password", "register#bob&password"], "");
    assert_eq!(out.code, Some(0));
    let mut alice = LiveClient::start(d.addr, &[]);
    alice.send("login#alice&password");
    alice.send("subscribe#bob");
    assert!(alice.stdout.wait_for(Duration::from_secs(10), |l| l == "subscribed to bob").is_some());
    let out = run_client(
        d.addr,
        &["login#bob&password", "post#one", "post#two", "post#three", "subscribe#nobody"],
        "",
    );
    assert_eq!(out.code, Some(1));
    assert!(alice.stdout.wait_for(Duration::from_secs(10), |l| l == "[bob] three").is_some());
    // Acks are in flight right after the last push is shown; give them a moment.
    std::thread::sleep(Duration::from_millis(200));

    let after = scrape(addr);
    assert_eq!(after["udpmsg_requests_total{kind=\"post\"}"], 3);
    // The first registration was asked for a cookie first; the client kept it for the second.
    assert_eq!(after["udpmsg_requests_total{kind=\"register\"}"], 3);
    assert_eq!(after["udpmsg_cookie_retries_total"], 1);
    assert_eq!(after["udpmsg_errors_total{code=\"NoSuchUser\"}"], 1);
    assert_eq!(after["udpmsg_pushes_sent_total"], 3);
    assert_eq!(after["udpmsg_pushes_acked_total"], 3);
    // The scripts logged out when they ended: only alice's live session is left. (The first
    // script logged in to alice after registering her; bob it only registered, alice being
    // logged in.)
    assert_eq!(after["udpmsg_sessions"], 1, "alice's live session; the scripts' ended with them");
    assert_eq!(after["udpmsg_sessions_opened_total"], 3);
    assert!(after["udpmsg_storage_commits_total"] > before["udpmsg_storage_commits_total"]);
    assert!(after["udpmsg_storage_writes_total"] >= 2 + 1 + 3, "accounts, subscription, posts");
    assert!(after["udpmsg_datagrams_received_total"] > before["udpmsg_datagrams_received_total"]);
    assert!(after["udpmsg_datagrams_sent_total"] > 0);
    assert_eq!(after["udpmsg_password_queue_depth"], 0);

    // Undecodable datagrams are counted, not answered.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(b"garbage", d.addr).unwrap();
    sock.send_to(b"UM\x05xx", d.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let later = scrape(addr);
    assert_eq!(later["udpmsg_datagrams_dropped_total{reason=\"undecodable\"}"], 1);
    assert_eq!(later["udpmsg_datagrams_dropped_total{reason=\"version\"}"], 1);

    assert_eq!(get(addr, "/").0, "HTTP/1.1 404 Not Found");
    assert!(d.stop());
}
