//! Kernel-level loss: the daemon and the clients run in two network namespaces made by this test,
//! joined by a veth pair; an nftables rule in each namespace drops 20% of the UDP datagrams on
//! the input hook (on output, sendto would fail with EPERM instead of losing the datagram). The
//! exactly-once scenario must hold.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); elsewhere it prints why and skips. The
//! namespaces and their addresses exist only inside this test; nothing leaves them.

mod common;

use common::{scenario, Lines, TempDir, FAST_CONFIG};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn nft(ns: &str, rules: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child.stdin.take().unwrap().write_all(rules.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two namespaces and a veth pair, removed on drop.
struct Link {
    server_ns: String,
    client_ns: String,
}

const SERVER_IP: &str = "10.231.0.1";
const CLIENT_IP: &str = "10.231.0.2";
const DROP_RULES: &str = "table inet udpmsg_test {
    chain input {
        type filter hook input priority 0; policy accept;
        meta l4proto udp numgen random mod 100 < 20 counter drop
    }
}
";

impl Link {
    fn create() -> Result<Link, String> {
        let id = std::process::id();
        let link = Link { server_ns: format!("umsrv{id}"), client_ns: format!("umcli{id}") };
        let (a, b) = (format!("umv{id}a"), format!("umv{id}b"));
        sh(&["ip", "netns", "add", &link.server_ns])?;
        sh(&["ip", "netns", "add", &link.client_ns])?;
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
        sh(&["ip", "link", "set", &a, "netns", &link.server_ns])?;
        sh(&["ip", "link", "set", &b, "netns", &link.client_ns])?;
        for (ns, dev, ip) in [(&link.server_ns, &a, SERVER_IP), (&link.client_ns, &b, CLIENT_IP)] {
            sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            nft(ns, DROP_RULES)?;
        }
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and so the pair.
        let _ = sh(&["ip", "netns", "del", &self.server_ns]);
        let _ = sh(&["ip", "netns", "del", &self.client_ns]);
    }
}

fn skip_reason() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("not running as root".into());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err()
            && Command::new(tool).arg("--version").output().is_err()
        {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn exactly_once_with_kernel_level_loss() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED exactly_once_with_kernel_level_loss: {why}");
        return;
    }
    let link = match Link::create() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED exactly_once_with_kernel_level_loss: cannot set up namespaces: {e}");
            return;
        }
    };
    let dir = TempDir::new("netns");
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, format!("{FAST_CONFIG}{}storage = \"memory\"\n", scenario::LOSSY_DAEMON_CONFIG))
        .unwrap();
    let mut child = common::daemon_command("ip")
        .args(["netns", "exec", &link.server_ns])
        .arg(common::bin("udpmsgd"))
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", &format!("{SERVER_IP}:0")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn udpmsgd in the namespace");
    let mut out = Lines::new(child.stdout.take().unwrap());
    let daemon = Killed(child);
    let line =
        out.wait_for(Duration::from_secs(20), |l| l.starts_with("listening on ")).expect("daemon address");
    let addr: SocketAddr = line["listening on ".len()..].parse().unwrap();
    let client_cfg = scenario::lossy_client_config(dir.path());
    let wrapper = ["ip", "netns", "exec", link.client_ns.as_str()];
    scenario::exactly_once(&wrapper, addr, addr, &client_cfg, 1, 2, 10);
    drop(daemon);
    // The kernel really dropped datagrams on both sides.
    for ns in [&link.server_ns, &link.client_ns] {
        let dropped = dropped_packets(ns);
        eprintln!("{ns}: nftables dropped {dropped} datagrams");
        assert!(dropped > 0, "no loss was injected in {ns}");
    }
}

fn dropped_packets(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "table", "inet", "udpmsg_test"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}
