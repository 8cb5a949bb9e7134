//! `udpmsg-bench --quick` against the real daemon: it must run every workload and report
//! counts that add up. Timings are never asserted.

use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn u(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_u64().unwrap_or_else(|| panic!("{path} is not a count: {cur}"))
}

#[test]
fn quick_bench_runs_every_workload_and_its_counts_add_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_udpmsg-bench"))
        .args(["--quick", "--json", "--daemon", env!("CARGO_BIN_EXE_udpmsgd")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start udpmsg-bench");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    // A guard against a hang, not a timing assertion.
    let end = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("udpmsg-bench --quick did not finish: {}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "udpmsg-bench failed ({status}):\n{err}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));

    for which in ["sequential", "concurrent"] {
        let c = &report["ceiling"][which];
        assert_eq!(u(c, "echoed"), u(c, "requested"), "ceiling {which}: {c}");
        assert_eq!(u(c, "lost"), 0, "ceiling {which}: {c}");
    }

    let ws = report["workloads"].as_array().expect("workloads");
    let ids: Vec<u64> = ws.iter().map(|w| u(w, "id")).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    for w in ws {
        let id = u(w, "id");
        assert_eq!(w["ok"], true, "workload {id}: {w}");
        assert_eq!(w["bound"], "count", "workload {id} must end on its count in --quick: {w}");
        assert_eq!(u(w, "completed"), u(w, "requested"), "workload {id}: {w}");
        assert_eq!(u(w, "failed"), 0, "workload {id}: {w}");
        assert!(u(w, "requested") > 0, "workload {id}: {w}");
        // The daemon's summary line was found and parsed.
        assert!(u(w, "daemon.commits") > 0, "workload {id}: {w}");
        assert!(w["daemon"]["mean_batch"].is_number() && w["daemon"]["max_batch"].is_number(), "{w}");
        assert!(w["latency"]["count"].as_u64().unwrap() > 0, "workload {id}: {w}");
        let d = &w["details"];
        match id {
            1 | 2 => {
                assert_eq!(u(d, "submitted"), u(w, "requested"), "{w}");
                assert_eq!(u(d, "unanswered"), 0, "{w}");
                assert_eq!(u(w, "latency.count"), u(w, "completed"), "{w}");
                // Every post is stored: at least one commit per group of posts in flight.
                assert!(u(w, "daemon.commits") * u(d, "clients") >= u(w, "completed"), "{w}");
            }
            3 | 4 => {
                let acked = u(d, "posts_acked");
                assert_eq!(acked, u(d, "posts_requested"), "{w}");
                assert_eq!(u(d, "posts_failed"), 0, "{w}");
                // Every subscriber follows every poster: each post is pushed to each of them.
                assert_eq!(u(d, "pushes_expected"), acked * u(d, "subscribers"), "{w}");
                assert_eq!(u(d, "pushes_delivered"), u(d, "pushes_expected"), "{w}");
                assert_eq!(u(d, "pushes_per_subscriber_min"), acked, "{w}");
                assert_eq!(u(d, "pushes_per_subscriber_max"), acked, "{w}");
                assert_eq!(u(d, "pushes_bad_text"), 0, "{w}");
                assert_eq!(u(w, "latency.count"), u(d, "pushes_delivered"), "{w}");
                if id == 4 {
                    let s = &d["storm"];
                    let attempted = u(s, "attempted");
                    assert_eq!(attempted + u(s, "skipped_pool_busy"), u(s, "requested"), "{s}");
                    let refused: u64 =
                        s["refused"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
                    assert_eq!(u(s, "logged_in") + refused, attempted, "{s}");
                    assert!(u(s, "logged_out") <= u(s, "logged_in"), "{s}");
                    assert!(u(s, "logged_in") > 0, "{s}");
                }
            }
            5 => {
                assert_eq!(u(d, "sessions"), u(w, "requested"), "{w}");
                assert_eq!(u(d, "users") * u(d, "sessions_per_user"), u(d, "sessions"), "{w}");
                assert!(u(d, "pongs") <= u(d, "pings") && u(d, "pongs") > 0, "{w}");
                assert!(d["rss_bytes_per_session"].is_number(), "{w}");
                // The daemon counted every session we opened.
                assert!(u(w, "daemon.commits") > 0, "{w}");
                let opened: u64 = w["daemon"]["summary"]["opened"].as_str().unwrap().parse().unwrap();
                assert_eq!(opened, u(d, "sessions"), "{w}");
            }
            6 => {
                let readers = u(d, "readers");
                assert_eq!(readers, u(w, "requested"), "{w}");
                for round in ["cold", "warm"] {
                    let r = &d[round];
                    assert_eq!(u(r, "reads"), readers, "{round}: {w}");
                    assert_eq!(u(r, "wrong") + u(r, "failed"), 0, "{round}: {w}");
                    // Every inbox of the quick dataset holds more than one retrieve asks for.
                    assert_eq!(u(r, "messages"), readers * u(d, "read_count"), "{round}: {w}");
                    assert_eq!(u(r, "latency.count"), readers, "{round}: {w}");
                }
                assert!(d["start_seconds"].is_number() && d["rss_kib_at_end"].is_number(), "{w}");
                let opened: u64 = w["daemon"]["summary"]["opened"].as_str().unwrap().parse().unwrap();
                assert_eq!(opened, readers, "{w}");
            }
            _ => unreachable!(),
        }
    }
}
