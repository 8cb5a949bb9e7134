//! The exactly-once property with the real binaries, through the fault-injecting proxy:
//! real `udpmsg` processes talk to a real `udpmsgd` through `udpmsg-proxy`, which loses 25% of
//! the datagrams each way, duplicates 10% and reorders 10%.

mod common;

use common::{scenario, Daemon, FAST_CONFIG};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Proxy {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr, seed: u64, spec: &str) -> Proxy {
        let mut child = Command::new(common::bin("udpmsg-proxy"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &upstream.to_string(),
                "--seed",
                &seed.to_string(),
            ])
            .args(["--up", spec, "--down", spec])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn udpmsg-proxy");
        let mut out = common::Lines::new(child.stdout.take().unwrap());
        let line =
            out.wait_for(Duration::from_secs(10), |l| l.starts_with("listening on ")).expect("proxy address");
        Proxy { child, addr: line["listening on ".len()..].parse().unwrap() }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn exactly_once_through_a_lossy_proxy() {
    let daemon = Daemon::start(&format!("{FAST_CONFIG}{}", scenario::LOSSY_DAEMON_CONFIG));
    let proxy = Proxy::start(daemon.addr, 20261122, "loss=0.25,dup=0.1,reorder=0.1,window=30ms,delay=1ms");
    let cfg = scenario::lossy_client_config(daemon.dir.path());
    // Accounts are made directly, without the proxy, to keep the test short.
    scenario::exactly_once(&[], daemon.addr, proxy.addr, &cfg, 2, 3, 15);
}
