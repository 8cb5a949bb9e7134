//! A throwaway PostgreSQL server for tests and benchmarks: Debian's binaries, `initdb` into a
//! temporary directory, run as an unprivileged user (PostgreSQL refuses to run as root), reached
//! over a unix socket in that directory only (no TCP port to collide with), stopped and removed
//! on drop.
//!
//! The binaries are looked for in `UDPMSG_PG_BIN`, then the newest
//! `/usr/lib/postgresql/*/bin`, then `PATH`. When running as root, the server runs as `nobody`
//! (through `setpriv`), its directory given to that user.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TempPg {
    pub dir: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
    /// The socket's directory and port (the socket is `DIR/.s.PGSQL.PORT`).
    pub socket_dir: PathBuf,
    pub port: u16,
}

/// Where PostgreSQL's server binaries are, if anywhere.
pub fn find_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("UDPMSG_PG_BIN") {
        let p = PathBuf::from(p);
        return p.join("initdb").exists().then_some(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).find(|p| p.join("initdb").exists() && p.join("postgres").exists())
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` as the unprivileged user when we are root.
fn unprivileged(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl TempPg {
    /// Creates and starts a server. `durable`: fsync as in production (benchmarks); otherwise
    /// fsync is off (tests: the server itself is never killed, only its connections).
    pub fn start(tag: &str, durable: bool) -> Result<TempPg, String> {
        let bin = find_bin().ok_or("PostgreSQL's server binaries (initdb, postgres) are not installed")?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("udpmsg-pg-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if is_root() {
            let ok = Command::new("chown")
                .arg("nobody:nogroup")
                .arg(&dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?
                .success();
            if !ok {
                return Err(format!("cannot give {} to nobody", dir.display()));
            }
        }
        let data = dir.join("data");
        let out = unprivileged(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let port = 5432;
        let mut cmd = unprivileged(&bin.join("postgres"));
        cmd.arg("-D").arg(&data).arg("-k").arg(&dir).args(["-p", &port.to_string()]);
        cmd.args(["-c", "listen_addresses=", "-c", "max_connections=200", "-c", "shared_buffers=128MB"]);
        if !durable {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("server.log")).map_err(|e| format!("server.log: {e}"))?,
            ))
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        let pg = TempPg { dir: dir.clone(), child: Some(child), bin, socket_dir: dir, port };
        pg.wait_ready(Duration::from_secs(30))?;
        Ok(pg)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let end = Instant::now() + timeout;
        loop {
            if self.config("postgres").connect(postgres::NoTls).is_ok() {
                return Ok(());
            }
            if Instant::now() > end {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                return Err(format!("PostgreSQL did not start within {timeout:?}: {log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Settings for database `db`.
    pub fn config(&self, db: &str) -> postgres::Config {
        let mut c = postgres::Config::new();
        c.host_path(&self.socket_dir).port(self.port).user("postgres").dbname(db);
        c
    }

    /// A `key=value` connection string for database `db` (what `postgres_url` takes).
    pub fn url(&self, db: &str) -> String {
        format!("host={} port={} user=postgres dbname={db}", self.socket_dir.display(), self.port)
    }

    pub fn client(&self, db: &str) -> Result<postgres::Client, String> {
        self.config(db).connect(postgres::NoTls).map_err(|e| e.to_string())
    }

    /// Creates an empty database.
    pub fn create_db(&self, name: &str) -> Result<(), String> {
        let mut c = self.client("postgres")?;
        c.batch_execute(&format!("CREATE DATABASE \"{name}\"")).map_err(|e| e.to_string())
    }

    /// Ends every connection with `application_name` (udpmsgd's are "udpmsgd") to `db`, as if
    /// PostgreSQL had killed them; returns how many.
    pub fn terminate_connections(&self, db: &str) -> Result<i64, String> {
        let mut c = self.client("postgres")?;
        let r = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'udpmsgd'",
                &[&db],
            )
            .map_err(|e| e.to_string())?;
        Ok(r.get(0))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: fast shutdown (ends the connections, writes nothing more).
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server for a test, or `None` (the test then skips, saying so) when PostgreSQL is not
/// installed. Under `CI=true` a missing PostgreSQL fails the test instead.
pub fn for_test(tag: &str) -> Option<TempPg> {
    match TempPg::start(tag, false) {
        Ok(pg) => Some(pg),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("PostgreSQL is needed under CI=true: {e}")
        }
        Err(e) => {
            println!("SKIPPED: {e}");
            None
        }
    }
}
