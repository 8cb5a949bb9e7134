//! Storage faults with the real daemon: a data directory it cannot write, a second daemon on the
//! same directory, a damaged database file, and a full disk while it runs.
//!
//! The full-disk test mounts a small tmpfs, so it needs root and a working `mount`; elsewhere it
//! prints `SKIPPED ...` and passes.

mod common;

use common::{run_client, wait_timeout, DaemonProcess, LiveClient, TempDir, FAST_CONFIG};
use serde_json::Value;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// A daemon that refuses to start must do so this quickly.
const PROMPT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(20);

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("server.toml");
    std::fs::write(&path, format!("{FAST_CONFIG}{extra}")).unwrap();
    path
}

/// Starts a daemon that must come up; returns it and its address.
fn start(config: &Path, listen: &str, data: &Path) -> (DaemonProcess, SocketAddr) {
    let mut d = DaemonProcess::spawn(config, listen, data);
    match d.wait_listening(WAIT) {
        Some(addr) => (d, addr),
        None => {
            let status = wait_timeout(&mut d.child, Duration::from_secs(1));
            panic!("udpmsgd did not start (status {status:?}): {:?}", d.stderr.rest(Duration::from_secs(1)))
        }
    }
}

/// What a daemon that must refuse to start did.
struct Refusal {
    status: ExitStatus,
    took: Duration,
    stdout: Vec<String>,
    stderr: String,
}

/// Starts a daemon on `data` that must exit by itself, before listening.
fn refused(config: &Path, data: &Path) -> Refusal {
    let started = Instant::now();
    let mut d = DaemonProcess::spawn(config, "127.0.0.1:0", data);
    let status = wait_timeout(&mut d.child, PROMPT);
    let took = started.elapsed();
    let stdout = d.stdout.rest(Duration::from_secs(2));
    let stderr = d.stderr.rest(Duration::from_secs(2)).join("\n");
    let status = status.unwrap_or_else(|| {
        panic!(
            "udpmsgd on {} did not exit within {PROMPT:?}; stdout {stdout:?}, stderr {stderr}",
            data.display()
        )
    });
    assert!(!status.success(), "udpmsgd on {} exited successfully: {stderr}", data.display());
    assert!(
        !stdout.iter().any(|l| l.starts_with("listening on")),
        "udpmsgd on {} printed `listening on` before failing: {stdout:?}",
        data.display()
    );
    Refusal { status, took, stdout, stderr }
}

fn parse(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

fn wait_json(c: &mut LiveClient, pred: impl Fn(&Value) -> bool) -> Value {
    match c.stdout.wait_for(WAIT, |l| parse(l).is_some_and(|v| pred(&v))) {
        Some(l) => parse(&l).unwrap(),
        None => panic!("no such answer within {WAIT:?}; saw {:#?}", c.stdout.seen),
    }
}

/// Sends one command and waits for its answer (ok or error) as JSON.
fn ask(c: &mut LiveClient, line: &str, command: &str) -> Value {
    let before = c.stdout.seen.len();
    c.send(line);
    // Answers come in command order and the client runs one command at a time: the first
    // answer to `command` printed after `before` is this one.
    let end = Instant::now() + WAIT;
    loop {
        if let Some(v) = c.stdout.seen[before..]
            .iter()
            .filter_map(|l| parse(l))
            .find(|v| v["command"] == command && (v["type"] == "ok" || v["type"] == "error"))
        {
            return v;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!("no answer to {line:?} within {WAIT:?}; saw {:#?}", c.stdout.seen);
        }
        c.stdout.wait_for(left.min(Duration::from_millis(50)), |_| false);
    }
}

fn login(addr: SocketAddr, user: &str) -> LiveClient {
    let mut c = LiveClient::start(addr, &["--json"]);
    let v = ask(&mut c, &format!("login#{user}&password"), "login");
    assert_eq!(v["type"], "ok", "login#{user}: {v}");
    c
}

fn post_ok(c: &mut LiveClient, text: &str) -> u64 {
    let v = ask(c, &format!("post#{text}"), "post");
    assert_eq!(v["type"], "ok", "post#{text}: {v}");
    v["id"].as_u64().unwrap()
}

/// `(id, text)` of the messages `retrieve#N` shows.
fn retrieve(c: &mut LiveClient) -> Vec<(u64, String)> {
    let v = ask(c, "retrieve#100", "retrieve");
    assert_eq!(v["type"], "ok", "retrieve: {v}");
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["text"].as_str().unwrap().to_string()))
        .collect()
}

/// Whether this process can write into `dir` despite its permissions (root, CAP_DAC_OVERRIDE).
fn permissions_ignored(dir: &Path) -> bool {
    let probe = dir.join("probe");
    let ignored = std::fs::write(&probe, b"x").is_ok();
    let _ = std::fs::remove_file(&probe);
    ignored
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").ok().is_some_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .is_some_and(|euid| euid == "0")
    })
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs -o {options}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

// ------------------------------------------------------------------------------------ tests

#[test]
fn an_unwritable_data_directory_is_refused_at_start() {
    let tmp = TempDir::new("unwritable");
    let config = write_config(tmp.path(), "");
    let mut cases: Vec<(String, PathBuf)> = Vec::new();

    // Under a regular file: no one, not even root, can create a directory there.
    let afile = tmp.path().join("afile");
    std::fs::write(&afile, b"not a directory").unwrap();
    cases.push(("under a regular file".into(), afile.join("data")));

    // Permissions: a read-only parent (the data directory cannot be created), and a read-only
    // data directory (the lock file cannot be created). Root writes through both.
    let ro_parent = tmp.path().join("ro-parent");
    std::fs::create_dir(&ro_parent).unwrap();
    set_mode(&ro_parent, 0o500);
    let ro_data = tmp.path().join("ro-data");
    std::fs::create_dir(&ro_data).unwrap();
    set_mode(&ro_data, 0o500);
    if permissions_ignored(&ro_parent) {
        println!("SKIPPED mode 0o500 cases: this process writes through permissions (root)");
    } else {
        cases.push(("under a mode 0o500 directory".into(), ro_parent.join("data")));
        cases.push(("a mode 0o500 directory".into(), ro_data.clone()));
    }

    // A read-only file system stops root too.
    let ro_mount = tmp.path().join("ro-mount");
    let _ro_fs = if is_root() {
        match Tmpfs::mount(&ro_mount, "ro,size=1m") {
            Ok(m) => {
                cases.push(("under a read-only file system".into(), ro_mount.join("data")));
                cases.push(("a read-only file system's root".into(), ro_mount.clone()));
                Some(m)
            }
            Err(e) => {
                println!("SKIPPED read-only tmpfs cases: {e}");
                None
            }
        }
    } else {
        println!("SKIPPED read-only tmpfs cases: not root");
        None
    };

    for (what, data) in &cases {
        let r = refused(&config, data);
        println!("{what}: exit {:?} after {:?}: {}", r.status.code(), r.took, r.stderr.trim());
        assert!(
            r.stderr.contains(&data.display().to_string()),
            "{what}: stderr should name {}: {}",
            data.display(),
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{what}: stdout {:?}", r.stdout);
    }
    // So that TempDir can clean up.
    set_mode(&ro_parent, 0o700);
    set_mode(&ro_data, 0o700);
}

#[test]
fn a_second_daemon_on_the_same_directory_is_refused() {
    let tmp = TempDir::new("twice");
    let config = write_config(tmp.path(), "");
    let data = tmp.path().join("data");
    let (mut first, addr) = start(&config, "127.0.0.1:0", &data);
    let out = run_client(addr, &["--json"], "register#alice&password\nregister#bob&password\n");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut bob = login(addr, "bob");
    assert_eq!(ask(&mut bob, "subscribe#alice", "subscribe")["type"], "ok");
    let mut alice = login(addr, "alice");
    let one = post_ok(&mut alice, "before the second daemon");

    let r = refused(&config, &data);
    println!("second daemon: exit {:?} after {:?}: {}", r.status.code(), r.took, r.stderr.trim());
    assert!(r.stderr.contains("another udpmsgd"), "{}", r.stderr);
    assert!(r.stderr.contains(&data.display().to_string()), "stderr should name the directory: {}", r.stderr);

    // The first one is unaffected: same sessions, writes and reads.
    assert!(first.child.try_wait().unwrap().is_none(), "the first daemon is still running");
    let two = post_ok(&mut alice, "after the second daemon");
    assert_eq!(
        retrieve(&mut bob),
        vec![(one, "before the second daemon".into()), (two, "after the second daemon".into())]
    );

    // Once the first one has stopped, the directory is free again, with everything in it.
    assert!(first.terminate(WAIT).is_some_and(|s| s.success()), "clean stop");
    let (mut again, addr) = start(&config, "127.0.0.1:0", &data);
    let out = run_client(addr, &["--json"], "login#bob&password\nretrieve#10\n");
    assert_eq!(out.code, Some(0), "{out:?}");
    let v = out.stdout.iter().filter_map(|l| parse(l)).find(|v| v["command"] == "retrieve").unwrap();
    let ids: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![one, two]);
    assert!(again.terminate(WAIT).is_some_and(|s| s.success()));
}

/// Refuses to start on `data`, naming the database file, and leaves every file as it was.
fn refuses_damaged(config: &Path, data: &Path, what: &str) {
    let db = data.join("udpmsg.db");
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "udpmsgd.lock")
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let before = snapshot(data);
    let r = refused(config, data);
    println!("{what}: exit {:?} after {:?}: {}", r.status.code(), r.took, r.stderr.trim());
    assert!(
        r.stderr.contains(&db.display().to_string()),
        "{what}: stderr should name {}: {}",
        db.display(),
        r.stderr
    );
    assert!(r.stderr.contains("damaged"), "{what}: {}", r.stderr);
    let after = snapshot(data);
    assert_eq!(
        before.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>(),
        after.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>(),
        "{what}: the files in the data directory changed"
    );
    assert!(before == after, "{what}: the contents of the data directory changed");
}

#[test]
fn a_damaged_database_is_refused_and_left_untouched() {
    let tmp = TempDir::new("damaged");
    let config = write_config(tmp.path(), "");

    // Not a database at all.
    let data = tmp.path().join("garbage");
    std::fs::create_dir(&data).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let garbage: Vec<u8> = (0..16384)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(data.join("udpmsg.db"), &garbage).unwrap();
    refuses_damaged(&config, &data, "garbage");

    // A real database whose tables were overwritten (its header intact).
    let data = tmp.path().join("overwritten");
    let (mut d, addr) = start(&config, "127.0.0.1:0", &data);
    let mut setup: String = (0..30).map(|i| format!("register#user{i}&password\n")).collect();
    setup.push_str("login#user0&password\n");
    setup.extend((1..30).map(|i| format!("subscribe#user{i}\n")));
    let out = run_client(addr, &[], &setup);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(d.terminate(WAIT).is_some_and(|s| s.success()));
    let db = data.join("udpmsg.db");
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() >= 3 * 4096, "the database has a few pages: {}", bytes.len());
    for (i, b) in bytes[4096..].iter_mut().enumerate() {
        *b = garbage[i % garbage.len()];
    }
    std::fs::OpenOptions::new().write(true).open(&db).unwrap().write_all(&bytes).unwrap();
    refuses_damaged(&config, &data, "overwritten pages");
}

/// Fills the file system holding `path` with the file `path` until it is full.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for size in [65536usize, 4096, 512, 1] {
        let chunk = vec![0xa5u8; size];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = f.sync_all();
    written
}

/// A daemon whose data directory is on a small tmpfs, with alice posting to her subscriber bob;
/// both are logged in (logging in writes a session, so it must happen before the disk fills).
/// Fields drop in order: the processes go before the file system is unmounted.
struct FullDiskRig {
    daemon: DaemonProcess,
    alice: LiveClient,
    bob: LiveClient,
    addr: SocketAddr,
    config: PathBuf,
    data: PathBuf,
    filler: PathBuf,
    _fs: Tmpfs,
    _tmp: TempDir,
}

/// `None` (after printing why) where a tmpfs cannot be mounted.
fn full_disk_rig(test: &str) -> Option<FullDiskRig> {
    if !is_root() {
        println!("SKIPPED {test}: not root (needs mount -t tmpfs)");
        return None;
    }
    let tmp = TempDir::new("fulldisk");
    let mnt = tmp.path().join("mnt");
    // 4 MiB: the database, its WAL (a few pages per commit) and its shared memory fit easily.
    let fs = match Tmpfs::mount(&mnt, "size=4m") {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED {test}: {e}");
            return None;
        }
    };
    let config = write_config(tmp.path(), "");
    let data = mnt.join("data");
    let (daemon, addr) = start(&config, "127.0.0.1:0", &data);
    let out = run_client(addr, &["--json"], "register#alice&password\nregister#bob&password\n");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut bob = login(addr, "bob");
    assert_eq!(ask(&mut bob, "subscribe#alice", "subscribe")["type"], "ok");
    let alice = login(addr, "alice");
    Some(FullDiskRig {
        daemon,
        alice,
        bob,
        addr,
        config,
        data,
        filler: mnt.join("filler"),
        _fs: fs,
        _tmp: tmp,
    })
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_loses_nothing() {
    let Some(mut rig) = full_disk_rig("a_full_disk_refuses_writes_keeps_reads_and_loses_nothing") else {
        return;
    };
    let r = &mut rig;
    let mut acked: Vec<(u64, String)> = Vec::new();
    for t in ["before 1", "before 2"] {
        acked.push((post_ok(&mut r.alice, t), t.into()));
    }
    // Bob is shown both (and acks them) before the disk fills.
    for (id, _) in &acked {
        wait_json(&mut r.bob, |v| v["type"] == "push" && v["id"] == *id);
    }
    std::thread::sleep(Duration::from_millis(300));

    let filled = fill(&r.filler);
    println!("filled the tmpfs with {filled} bytes");

    // Every write is refused, and refused cleanly: the client is told to retry.
    let mut refused_texts = Vec::new();
    for i in 1..=5 {
        let text = format!("while full {i}");
        let v = ask(&mut r.alice, &format!("post#{text}"), "post");
        assert_eq!(v["type"], "error", "post#{text} on a full disk: {v}");
        assert_eq!(v["code"], "StorageUnavailable", "post#{text} on a full disk: {v}");
        assert_eq!(v["message"], "storage unavailable, retry", "{v}");
        refused_texts.push(text);
    }
    let v = ask(&mut r.bob, "unsubscribe#alice", "unsubscribe");
    assert_eq!(v["code"], "StorageUnavailable", "unsubscribe on a full disk: {v}");
    // Reads go on, and show exactly what was acknowledged.
    assert_eq!(retrieve(&mut r.bob), acked, "bob's inbox while the disk is full");
    let v = ask(&mut r.alice, "whoami", "whoami");
    assert_eq!(v["type"], "ok", "whoami on a full disk: {v}");
    let v = ask(&mut r.bob, "subscriptions", "subscriptions");
    assert_eq!(v["following"], serde_json::json!(["alice"]), "the refused unsubscribe left no trace: {v}");

    // Room again: writes resume on the same sessions.
    std::fs::remove_file(&r.filler).unwrap();
    for t in ["after 1", "after 2"] {
        acked.push((post_ok(&mut r.alice, t), t.into()));
    }
    assert_eq!(retrieve(&mut r.bob), acked, "bob's inbox once there is room again");

    // A restart on the same directory and port: everything acknowledged, once; nothing refused.
    let status = r.daemon.terminate(WAIT);
    let log = r.daemon.stderr.rest(Duration::from_secs(2));
    assert!(status.is_some_and(|s| s.success()), "clean stop: {status:?}");
    let failures: Vec<&String> = log.iter().filter(|l| l.contains("storage commit of")).collect();
    println!("daemon log: {} commit failure(s), e.g. {:?}", failures.len(), failures.first());
    assert!(!failures.is_empty(), "the daemon logged its commit failures: {log:#?}");
    let (daemon, again) = start(&r.config, &r.addr.to_string(), &r.data);
    r.daemon = daemon;
    assert_eq!(again, r.addr);
    assert_eq!(retrieve(&mut r.bob), acked, "bob's inbox after the restart (same session)");
    let last = post_ok(&mut r.alice, "after the restart");
    assert!(last > acked.last().unwrap().0);
    let pushes: Vec<String> = r
        .bob
        .stdout
        .seen
        .iter()
        .filter_map(|l| parse(l))
        .filter(|v| v["type"] == "push")
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect();
    for t in &refused_texts {
        assert!(!pushes.contains(t), "a refused post was pushed: {t}");
    }
    assert_eq!(r.alice.finish(), Some(1), "alice's refused posts make her exit status 1");
    assert_eq!(r.bob.finish(), Some(1), "bob's refused unsubscribe makes his exit status 1");
    assert!(r.daemon.terminate(WAIT).is_some_and(|s| s.success()));
}

/// "Reads go on" also for a read that arrives while another client's write is failing: the
/// daemon holds every reply of an event-loop turn until the turn's batch commits, so a read in
/// the same turn as a failed write must still get its answer, not "storage unavailable".
#[test]
fn reads_beside_failing_writes_still_succeed() {
    let Some(mut rig) = full_disk_rig("reads_beside_failing_writes_still_succeed") else { return };
    let r = &mut rig;
    let id = post_ok(&mut r.alice, "the only post");
    wait_json(&mut r.bob, |v| v["type"] == "push" && v["id"] == id);
    std::thread::sleep(Duration::from_millis(300));
    fill(&r.filler);

    // Both clients run their commands back to back, at the same time.
    const N: usize = 200;
    let (a0, b0) = (r.alice.stdout.seen.len(), r.bob.stdout.seen.len());
    for i in 0..N {
        r.alice.send(&format!("post#while full {i}"));
    }
    for _ in 0..N {
        r.bob.send("retrieve#5");
    }
    let answers = |c: &mut LiveClient, from: usize, command: &str| -> Vec<Value> {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let got: Vec<Value> = c.stdout.seen[from..]
                .iter()
                .filter_map(|l| parse(l))
                .filter(|v| v["command"] == command && (v["type"] == "ok" || v["type"] == "error"))
                .collect();
            if got.len() >= N || Instant::now() > end {
                return got;
            }
            c.stdout.wait_for(Duration::from_millis(50), |_| false);
        }
    };
    let posts = answers(&mut r.alice, a0, "post");
    let reads = answers(&mut r.bob, b0, "retrieve");
    assert_eq!(posts.len(), N, "alice's posts all answered");
    assert_eq!(reads.len(), N, "bob's retrieves all answered");
    assert!(posts.iter().all(|v| v["code"] == "StorageUnavailable"), "every post refused: {posts:?}");
    let failed: Vec<&Value> = reads.iter().filter(|v| v["type"] != "ok").collect();
    assert!(
        failed.is_empty(),
        "{} of {N} retrieves (reads) beside failing posts were refused, e.g. {}",
        failed.len(),
        failed[0]
    );
    for v in &reads {
        let ids: Vec<u64> =
            v["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, vec![id], "bob's inbox while the disk is full: {v}");
    }
    std::fs::remove_file(&r.filler).unwrap();
}

/// A daemon started on a full disk cannot open its database (SQLite must create the WAL and
/// shared-memory files): it must refuse to start, but not call a sound database damaged and
/// advise moving it away. Once there is room, it starts with everything in place.
#[test]
fn a_full_disk_at_startup_is_not_called_a_damaged_database() {
    let Some(mut rig) = full_disk_rig("a_full_disk_at_startup_is_not_called_a_damaged_database") else {
        return;
    };
    let r = &mut rig;
    let id = post_ok(&mut r.alice, "stored before the restart");
    assert!(r.daemon.terminate(WAIT).is_some_and(|s| s.success()), "clean stop");
    let db = r.data.join("udpmsg.db");
    let before = std::fs::read(&db).unwrap();
    fill(&r.filler);

    let refusal = refused(&r.config, &r.data);
    println!(
        "start on a full disk: exit {:?} after {:?}: {}",
        refusal.status.code(),
        refusal.took,
        refusal.stderr.lines().last().unwrap_or("")
    );
    assert!(refusal.stderr.contains(&db.display().to_string()), "names the file: {}", refusal.stderr);
    assert_eq!(std::fs::read(&db).unwrap(), before, "the database file is left untouched");
    let misdiagnosed = refusal.stderr.contains("damaged");

    std::fs::remove_file(&r.filler).unwrap();
    let (daemon, addr) = start(&r.config, "127.0.0.1:0", &r.data);
    r.daemon = daemon;
    let out = run_client(addr, &["--json"], "login#bob&password\nretrieve#10\n");
    assert_eq!(out.code, Some(0), "{out:?}");
    let v = out.stdout.iter().filter_map(|l| parse(l)).find(|v| v["command"] == "retrieve").unwrap();
    let ids: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![id], "once there is room the database opens with everything in it");
    assert!(
        !misdiagnosed,
        "a full disk at startup is reported as a damaged database (which it is not: it opened fine once \
         there was room): {}",
        refusal.stderr
    );
}
