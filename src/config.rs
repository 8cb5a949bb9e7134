//! `server.toml` and `client.toml`: serde structs, built-in defaults and validation.
//!
//! Every key has a default, so an empty (or missing) file is a valid configuration. An unknown
//! key is an error that names the key and the file; a value out of range is an error that names
//! the key and the allowed range. The checked-in `server.toml` and `client.toml` list every key
//! with its default, and a unit test keeps them in step with the defaults here.

use crate::proto;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The port of `server` and `listen` when the address names none.
pub const DEFAULT_PORT: u16 = 7070;

/// Splits an address as users write it into host and port: `host`, `host:port`, an IPv4
/// address with or without a port, an IPv6 address bare (`::1`) or in brackets (`[::1]`,
/// `[::1]:7070`). Without a port, [`DEFAULT_PORT`]. The host is not resolved here.
pub fn split_host_port(spec: &str) -> Result<(String, u16), String> {
    let spec = spec.trim();
    let bad = |why: &str| Err(format!("invalid address \"{spec}\": {why}"));
    if spec.is_empty() {
        return bad("empty");
    }
    if let Ok(sa) = spec.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    if let Ok(ip) = spec.parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), DEFAULT_PORT));
    }
    let (host, port) = if let Some(inner) = spec.strip_prefix('[') {
        let Some((host, after)) = inner.split_once(']') else { return bad("no closing ]") };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("not an IPv6 address in [ ]");
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return bad("expected :PORT after ]"),
            },
        }
    } else {
        match spec.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (spec, None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == ':' && !spec.starts_with('[')) {
        return bad("expected HOST or HOST:PORT");
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) => p,
            Err(_) => return bad("the port must be a number from 0 to 65535"),
        },
    };
    Ok((host.to_string(), port))
}

/// A configuration problem, reported before anything is bound or opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// SQLite database `udpmsg.db` in `data_dir`: durable, the default.
    Sqlite,
    /// A PostgreSQL database (`postgres_url`), which several daemons may share.
    Postgres,
    /// Everything lives in the daemon's memory and is gone when it stops (tests, experiments).
    Memory,
}

/// The daemon's settings. Field docs are the user documentation; `server.toml` repeats them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and UDP port to listen on, IPv4 (`0.0.0.0:7070`) or IPv6 (`[::]:7070`).
    pub listen: SocketAddr,
    /// Directory for the daemon's data files.
    pub data_dir: PathBuf,
    /// Storage backend.
    pub storage: StorageKind,
    /// `storage = "postgres"`: the database (URL or key=value string; `PG*` variables fill in
    /// what it leaves out). The password belongs in `postgres_password_file` or `PGPASSWORD`.
    pub postgres_url: String,
    /// A file whose first line is the PostgreSQL password.
    pub postgres_password_file: String,
    /// This daemon's name among the daemons sharing a PostgreSQL database; empty:
    /// `HOSTNAME:PORT`.
    pub node_name: String,
    /// Whether anyone may create an account with `register`.
    pub allow_registration: bool,
    /// Longest message text in bytes (at most the protocol's 1024).
    pub max_text_bytes: u32,
    /// Longest user name (at most 32).
    pub max_name_len: u32,
    /// Shortest and longest password in bytes.
    pub min_password_len: u32,
    pub max_password_len: u32,
    /// Largest N for `retrieve#N`.
    pub max_retrieve: u32,
    /// Messages kept per inbox; beyond it the oldest go.
    pub max_inbox: u32,
    /// Memory for what the daemon keeps of the store (accounts, follower lists, the newest
    /// messages of inboxes), in bytes; 0 keeps nothing (every request reads what it needs).
    pub cache_bytes: u64,
    /// Users one user may follow.
    pub max_subscriptions: u32,
    /// Concurrent sessions per user and in total.
    pub max_sessions_per_user: u32,
    pub max_sessions: u32,
    /// Messages pushed to a user on login that arrived while they were away (the rest via
    /// retrieve).
    pub catch_up_max: u32,
    /// A session that sends nothing (not even a ping) for this long expires.
    pub session_idle_timeout_secs: u64,
    /// A session expires this long after login, however active.
    pub session_max_lifetime_secs: u64,
    /// How long replies are kept to answer retransmitted requests without executing them again.
    pub reply_cache_ttl_secs: u64,
    /// Most replies kept for requests that carry no session (login, register).
    pub reply_cache_max_unauthenticated: u32,
    /// Push retransmission: first timeout before any RTT sample, its floor and cap (RFC 6298).
    pub push_initial_rto_ms: u64,
    pub push_min_rto_ms: u64,
    pub push_max_rto_ms: u64,
    /// Transmissions of one push before the session is marked unresponsive.
    pub push_max_tries: u32,
    /// Unacknowledged pushes in flight per session, and pushes queued behind them.
    pub push_window: u32,
    pub push_queue: u32,
    /// argon2id cost for new password hashes (OWASP defaults).
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// Threads that hash and verify passwords off the event loop, and their bounded queue.
    pub password_workers: u32,
    pub password_queue: u32,
    /// Once the oldest queued password job has waited longer than this, new ones are answered
    /// "busy" until the queue has caught up, rather than queued past the point where the
    /// client stops retransmitting.
    pub password_max_wait_ms: u64,
    /// Login attempts allowed in a burst per account name and source address, per source
    /// address, and per account name from addresses that never logged in to it; and the seconds
    /// after which one more is allowed. An attempt holds a token while it is checked and gives
    /// it back on success, so failures (and attempts in progress) count. A throttled login costs
    /// no hash. (See `server::login_limits`.)
    pub login_failures_per_user_burst: u32,
    pub login_failures_per_user_refill_secs: u64,
    pub login_failures_per_address_burst: u32,
    pub login_failures_per_address_refill_secs: u64,
    pub login_failures_per_account_burst: u32,
    pub login_failures_per_account_refill_secs: u64,
    /// Registrations (attempts that reach hashing) per source address: burst and refill.
    pub registrations_per_address_burst: u32,
    pub registrations_per_address_refill_secs: u64,
    /// Accounts the server holds at most.
    pub max_accounts: u32,
    /// Requests per second one session may make (bursts of twice that).
    pub session_requests_per_sec: u32,
    /// Deliveries (one per recipient) per second a user's posts and messages may cause, with
    /// bursts of ten seconds' worth.
    pub deliveries_per_user_per_sec: u32,
    /// Direct messages a user accepts from users they do not follow: burst and refill.
    pub dms_from_strangers_burst: u32,
    pub dms_from_strangers_refill_secs: u64,
    /// Log a one-line summary of the counters this often (0: only at exit).
    pub stats_log_interval_secs: u64,
    /// error, warn, info, debug or trace; the `RUST_LOG` environment variable overrides it.
    pub log_level: String,
    /// Address for Prometheus metrics over HTTP (`GET /metrics`), e.g. "127.0.0.1:9187";
    /// empty: off.
    pub metrics_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7070".parse().expect("valid literal"),
            data_dir: PathBuf::from("./data"),
            storage: StorageKind::Sqlite,
            postgres_url: String::new(),
            postgres_password_file: String::new(),
            node_name: String::new(),
            allow_registration: true,
            max_text_bytes: 1000,
            max_name_len: 32,
            min_password_len: 4,
            max_password_len: 128,
            max_retrieve: 100,
            max_inbox: 1000,
            cache_bytes: 128 << 20,
            max_subscriptions: 1000,
            max_sessions_per_user: 16,
            max_sessions: 250_000,
            catch_up_max: 100,
            session_idle_timeout_secs: 300,
            session_max_lifetime_secs: 7 * 24 * 3600,
            reply_cache_ttl_secs: 60,
            reply_cache_max_unauthenticated: 16_384,
            push_initial_rto_ms: 1000,
            push_min_rto_ms: 200,
            push_max_rto_ms: 10_000,
            push_max_tries: 8,
            push_window: 32,
            push_queue: 1024,
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            password_workers: 2,
            password_queue: 256,
            password_max_wait_ms: 3000,
            login_failures_per_user_burst: 5,
            login_failures_per_user_refill_secs: 30,
            login_failures_per_address_burst: 20,
            login_failures_per_address_refill_secs: 3,
            login_failures_per_account_burst: 100,
            login_failures_per_account_refill_secs: 36,
            registrations_per_address_burst: 20,
            registrations_per_address_refill_secs: 30,
            max_accounts: 1_000_000,
            session_requests_per_sec: 200,
            deliveries_per_user_per_sec: 2000,
            dms_from_strangers_burst: 20,
            dms_from_strangers_refill_secs: 30,
            stats_log_interval_secs: 300,
            log_level: "info".into(),
            metrics_listen: String::new(),
        }
    }
}

fn range<T: PartialOrd + fmt::Display + Copy>(key: &str, value: T, lo: T, hi: T) -> Result<(), ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError(format!("invalid value {value} for `{key}`: allowed range is {lo}..={hi}")));
    }
    Ok(())
}

fn ordered(key_lo: &str, lo: u64, key_hi: &str, hi: u64) -> Result<(), ConfigError> {
    if lo > hi {
        return Err(ConfigError(format!("`{key_lo}` ({lo}) must not be larger than `{key_hi}` ({hi})")));
    }
    Ok(())
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        range("max_text_bytes", self.max_text_bytes, 1, proto::MAX_TEXT_BYTES as u32)?;
        range("max_name_len", self.max_name_len, 1, proto::MAX_NAME_LEN as u32)?;
        range("min_password_len", self.min_password_len, 1, proto::MAX_PASSWORD_LEN as u32)?;
        range("max_password_len", self.max_password_len, 1, proto::MAX_PASSWORD_LEN as u32)?;
        ordered(
            "min_password_len",
            self.min_password_len.into(),
            "max_password_len",
            self.max_password_len.into(),
        )?;
        range("max_retrieve", self.max_retrieve, 1, 10_000)?;
        range("max_inbox", self.max_inbox, 1, 1_000_000)?;
        range("cache_bytes", self.cache_bytes, 0, 1 << 40)?;
        range("max_subscriptions", self.max_subscriptions, 1, 100_000)?;
        range("max_sessions_per_user", self.max_sessions_per_user, 1, 1024)?;
        range("max_sessions", self.max_sessions, 1, 10_000_000)?;
        range("catch_up_max", self.catch_up_max, 0, 10_000)?;
        range("session_idle_timeout_secs", self.session_idle_timeout_secs, 5, 30 * 86_400)?;
        range("session_max_lifetime_secs", self.session_max_lifetime_secs, 60, 365 * 86_400)?;
        range("reply_cache_ttl_secs", self.reply_cache_ttl_secs, 1, 3600)?;
        range("reply_cache_max_unauthenticated", self.reply_cache_max_unauthenticated, 16, 10_000_000)?;
        range("push_initial_rto_ms", self.push_initial_rto_ms, 10, 60_000)?;
        range("push_min_rto_ms", self.push_min_rto_ms, 1, 60_000)?;
        range("push_max_rto_ms", self.push_max_rto_ms, 10, 600_000)?;
        ordered("push_min_rto_ms", self.push_min_rto_ms, "push_max_rto_ms", self.push_max_rto_ms)?;
        range("push_max_tries", self.push_max_tries, 1, 100)?;
        range("push_window", self.push_window, 1, 1024)?;
        range("push_queue", self.push_queue, 0, 1_000_000)?;
        range("argon2_memory_kib", self.argon2_memory_kib, 8, 4 * 1024 * 1024)?;
        range("argon2_iterations", self.argon2_iterations, 1, 100)?;
        range("argon2_parallelism", self.argon2_parallelism, 1, 64)?;
        range("password_workers", self.password_workers, 1, 256)?;
        range("password_queue", self.password_queue, 1, 1_000_000)?;
        range("password_max_wait_ms", self.password_max_wait_ms, 10, 600_000)?;
        range("login_failures_per_user_burst", self.login_failures_per_user_burst, 1, 10_000)?;
        range("login_failures_per_user_refill_secs", self.login_failures_per_user_refill_secs, 0, 86_400)?;
        range("login_failures_per_address_burst", self.login_failures_per_address_burst, 1, 1_000_000)?;
        range(
            "login_failures_per_address_refill_secs",
            self.login_failures_per_address_refill_secs,
            0,
            86_400,
        )?;
        range("registrations_per_address_burst", self.registrations_per_address_burst, 1, 10_000_000)?;
        range(
            "registrations_per_address_refill_secs",
            self.registrations_per_address_refill_secs,
            0,
            86_400,
        )?;
        range("login_failures_per_account_burst", self.login_failures_per_account_burst, 1, 1_000_000)?;
        range(
            "login_failures_per_account_refill_secs",
            self.login_failures_per_account_refill_secs,
            0,
            86_400,
        )?;
        range("deliveries_per_user_per_sec", self.deliveries_per_user_per_sec, 1, 100_000_000)?;
        range("dms_from_strangers_burst", self.dms_from_strangers_burst, 1, 1_000_000)?;
        range("dms_from_strangers_refill_secs", self.dms_from_strangers_refill_secs, 0, 86_400)?;
        range("max_accounts", self.max_accounts, 1, 100_000_000)?;
        range("session_requests_per_sec", self.session_requests_per_sec, 1, 1_000_000)?;
        range("stats_log_interval_secs", self.stats_log_interval_secs, 0, 86_400)?;
        if !self.metrics_listen.is_empty() && self.metrics_listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError(format!(
                "invalid value \"{}\" for `metrics_listen`: an address like 127.0.0.1:9187, or empty for off",
                self.metrics_listen
            )));
        }
        if self.node_name.len() > 64 {
            return Err(ConfigError(format!(
                "invalid value \"{}\" for `node_name`: at most 64 characters",
                self.node_name
            )));
        }
        if !["off", "error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return Err(ConfigError(format!(
                "invalid value \"{}\" for `log_level`: allowed are off, error, warn, info, debug, trace",
                self.log_level
            )));
        }
        Ok(())
    }

    /// The node name: `node_name`, or `HOSTNAME:PORT` with the port the daemon is bound to.
    pub fn node_name(&self, port: u16) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "udpmsgd".into());
        format!("{host}:{port}")
    }

    /// The metrics address, if metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listen.parse().ok()
    }

    pub fn password_max_wait(&self) -> Duration {
        Duration::from_millis(self.password_max_wait_ms)
    }
    pub fn session_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session_idle_timeout_secs)
    }
    pub fn session_max_lifetime(&self) -> Duration {
        Duration::from_secs(self.session_max_lifetime_secs)
    }
    pub fn reply_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.reply_cache_ttl_secs)
    }
    pub fn push_rto(&self) -> crate::rtt::RtoConfig {
        crate::rtt::RtoConfig {
            initial: Duration::from_millis(self.push_initial_rto_ms),
            min: Duration::from_millis(self.push_min_rto_ms),
            max: Duration::from_millis(self.push_max_rto_ms),
        }
    }
}

/// The client's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// The daemon's address: `HOST` or `HOST:PORT` (a name or an IP address; the port defaults
    /// to 7070). The client resolves it and tries each address the name has until one does not
    /// refuse.
    pub server: String,
    /// Several daemons sharing one database (`storage = "postgres"`): their addresses, in the
    /// order to try them; when set, `server` is not used. When the one in use stops answering
    /// (`failover_after_tries` unanswered transmissions, or its address refuses), the client
    /// moves to the next, with its session.
    pub servers: Vec<String>,
    /// Unanswered transmissions of one request before moving to the next server (1..=100).
    pub failover_after_tries: u32,
    /// First request timeout before any RTT sample; its floor and cap (RFC 6298 style).
    pub request_initial_timeout_ms: u64,
    pub request_min_timeout_ms: u64,
    pub request_max_timeout_ms: u64,
    /// Transmissions of one request before giving up.
    pub request_max_tries: u32,
    /// Ping the daemon after this much silence while logged in (keeps the session and any NAT
    /// mapping alive). Must stay well below the daemon's `session_idle_timeout_secs`.
    pub ping_interval_secs: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            server: "127.0.0.1:7070".into(),
            servers: Vec::new(),
            failover_after_tries: 3,
            request_initial_timeout_ms: 1000,
            request_min_timeout_ms: 200,
            request_max_timeout_ms: 8000,
            request_max_tries: 5,
            ping_interval_secs: 30,
        }
    }
}

impl ClientConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        split_host_port(&self.server).map_err(|e| ConfigError(format!("{e} for `server`")))?;
        for s in &self.servers {
            split_host_port(s).map_err(|e| ConfigError(format!("{e} in `servers`")))?;
        }
        range("failover_after_tries", self.failover_after_tries, 1, 100)?;
        range("request_initial_timeout_ms", self.request_initial_timeout_ms, 10, 60_000)?;
        range("request_min_timeout_ms", self.request_min_timeout_ms, 1, 60_000)?;
        range("request_max_timeout_ms", self.request_max_timeout_ms, 10, 600_000)?;
        ordered(
            "request_min_timeout_ms",
            self.request_min_timeout_ms,
            "request_max_timeout_ms",
            self.request_max_timeout_ms,
        )?;
        range("request_max_tries", self.request_max_tries, 1, 100)?;
        range("ping_interval_secs", self.ping_interval_secs, 1, 86_400)?;
        Ok(())
    }

    /// The servers to use, in order: `servers`, or `server` alone.
    pub fn server_list(&self) -> Vec<String> {
        if self.servers.is_empty() {
            vec![self.server.clone()]
        } else {
            self.servers.clone()
        }
    }

    pub fn request_rto(&self) -> crate::rtt::RtoConfig {
        crate::rtt::RtoConfig {
            initial: Duration::from_millis(self.request_initial_timeout_ms),
            min: Duration::from_millis(self.request_min_timeout_ms),
            max: Duration::from_millis(self.request_max_timeout_ms),
        }
    }
}

/// The line (1-based) of `text` that sets `key` at the top level, if it can be found.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix(['"', '\'']).unwrap_or(l);
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start_matches(['"', '\'']).trim_start().starts_with('='))
                || l.strip_prefix('[').is_some_and(|t| t.trim_start().starts_with(key))
        })
        .map(|i| i + 1)
}

/// `origin: unknown key `k` (did you mean `key`?); the keys are: ...`
fn unknown_key(origin: &str, key: &str, valid: &toml::Table) -> ConfigError {
    let close = valid
        .keys()
        .map(|k| (crate::command::distance(key, k), k))
        .filter(|(d, k)| *d <= (key.len() / 3).max(2) || k.contains(key) || key.contains(k.as_str()))
        .min();
    let hint = close.map(|(_, k)| format!(" (did you mean `{k}`?)")).unwrap_or_default();
    let keys: Vec<&str> = valid.keys().map(String::as_str).collect();
    ConfigError(format!("{origin}: unknown key `{key}`{hint}; the keys are: {}", keys.join(", ")))
}

/// Whether `value` fits `key` (its type; ranges are checked later, by `validate`): the error
/// names `origin`, the key and the value.
fn check_value<T: for<'de> Deserialize<'de>>(
    defaults: &toml::Table,
    key: &str,
    value: &toml::Value,
    origin: &str,
) -> Result<(), ConfigError> {
    if key == "listen" && value.is_str() {
        // A host name is fine here: resolved once the layers are merged.
        return Ok(());
    }
    let mut t = defaults.clone();
    t.insert(key.to_string(), value.clone());
    match t.try_into::<T>() {
        Ok(_) => Ok(()),
        Err(e) => {
            let why = e.to_string();
            let why = why.lines().next().unwrap_or("invalid").trim_end();
            Err(ConfigError(format!("{origin}: invalid value {value} for `{key}`: {why}")))
        }
    }
}

/// Parses a TOML document into a config, naming `origin` (the file) and the line in any error;
/// an unknown key gets the closest valid one and the list of all.
pub fn parse<T: for<'de> Deserialize<'de> + Serialize + Default>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    // toml's message points at the line; say which file it is about.
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError(format!("{origin}: {}", e.to_string().trim_end())))?;
    let defaults = toml::Table::try_from(T::default()).expect("config serializes");
    let at = |k: &str| match key_line(text, k) {
        Some(line) => format!("{origin}:{line}"),
        None => origin.to_string(),
    };
    for (k, v) in &table {
        if !defaults.contains_key(k) {
            return Err(unknown_key(&at(k), k, &defaults));
        }
        check_value::<T>(&defaults, k, v, &at(k))?;
    }
    table
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError(format!("{origin}: {}", e.to_string().trim_end())))
}

/// Loads a config file. `explicit` says whether the user named the file: a missing default
/// file means "use the built-in defaults", a missing named file is an error.
pub fn load<T: for<'de> Deserialize<'de> + Serialize + Default>(
    path: &Path,
    explicit: bool,
) -> Result<T, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(T::default()),
        Err(e) => Err(ConfigError(format!("{}: cannot read: {e}", path.display()))),
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    CommandLine,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "environment {v}"),
            Source::CommandLine => write!(f, "command line"),
        }
    }
}

/// Prefix of the environment variables that set daemon settings: `UDPMSG_LISTEN`,
/// `UDPMSG_MAX_TEXT_BYTES`, ... (the key in upper case).
pub const ENV_PREFIX: &str = "UDPMSG_";

/// A server config assembled from layers, with the origin of every key.
#[derive(Debug, Clone)]
pub struct Layered {
    pub config: ServerConfig,
    pub sources: std::collections::BTreeMap<String, Source>,
    /// `UDPMSG_*` variables that name no setting. They are ignored, not fatal: orchestrators
    /// add variables like `UDPMSG_PORT` for a service named `udpmsg` on their own (see
    /// [`env_meant`] for the warning).
    pub ignored_env: Vec<String>,
}

/// The variable that `var` (a `UDPMSG_*` variable naming no setting) may have been meant to be:
/// `UDPMSG_MAX_TXT_BYTES` → `UDPMSG_MAX_TEXT_BYTES`.
pub fn env_meant(var: &str) -> Option<String> {
    let key = var.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
    let defaults = toml::Table::try_from(ServerConfig::default()).expect("config serializes");
    defaults
        .keys()
        .map(|k| (crate::command::distance(&key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!("{ENV_PREFIX}{}", k.to_ascii_uppercase()))
}

/// A connection string with any password in it replaced by `***` (URL `user:PASSWORD@` or
/// `password=...`), for printing.
pub fn redact_password(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme) = out.find("://") {
        let rest = scheme + 3;
        if let Some(at) = out[rest..].find('@').map(|i| rest + i) {
            if let Some(colon) = out[rest..at].find(':').map(|i| rest + i) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    let mut result = String::new();
    let mut words = out.split(' ').peekable();
    while let Some(w) = words.next() {
        if let Some(eq) = w.find('=').filter(|_| w.to_ascii_lowercase().starts_with("password")) {
            result.push_str(&w[..=eq]);
            result.push_str("***");
        } else {
            result.push_str(w);
        }
        if words.peek().is_some() {
            result.push(' ');
        }
    }
    // `?password=...` in a URL's query.
    if let Some(p) = result.find("password=").filter(|p| *p > 0 && matches!(&result[p - 1..*p], "?" | "&")) {
        let end = result[p..].find('&').map_or(result.len(), |e| p + e);
        result.replace_range(p + "password=".len()..end, "***");
    }
    result
}

/// Variables with the prefix that are not settings.
const ENV_NOT_SETTINGS: &[&str] = &["UDPMSG_CONFIG"];

impl Layered {
    /// The effective configuration as TOML, each key annotated with where it came from.
    pub fn render(&self) -> String {
        let table = toml::Table::try_from(&self.config).expect("config serializes");
        let mut out = String::new();
        for (key, value) in &table {
            let source = self.sources.get(key).cloned().unwrap_or(Source::Default);
            let value = match (key.as_str(), value) {
                ("postgres_url", toml::Value::String(url)) => toml::Value::String(redact_password(url)),
                _ => value.clone(),
            };
            out.push_str(&format!("{key} = {value}  # {source}\n"));
        }
        out
    }
}

/// Turns a host and port into a socket address: the binary's name resolution (the library does
/// no I/O). `Err` says why, e.g. the resolver's message.
pub type Resolve<'a> = &'a dyn Fn(&str, u16) -> Result<SocketAddr, String>;

/// Builds the daemon's configuration: command line > environment > file > defaults. `env` is the
/// process environment (only `UDPMSG_*` variables are looked at; one that names no setting is
/// ignored and listed in `ignored_env`); `cli` holds the command-line overrides as TOML values.
/// A `listen` that is not a socket address (`localhost:7070`, `chat.example.org`) goes through
/// `resolve`. The result is validated.
pub fn layered_server(
    path: &Path,
    explicit: bool,
    env: impl IntoIterator<Item = (String, String)>,
    cli: toml::Table,
    resolve: Resolve<'_>,
) -> Result<Layered, ConfigError> {
    let defaults = toml::Table::try_from(ServerConfig::default()).expect("config serializes");
    let mut merged = defaults.clone();
    let mut sources: std::collections::BTreeMap<String, Source> =
        defaults.keys().map(|k| (k.clone(), Source::Default)).collect();
    let file_name = path.display().to_string();
    let mut text = String::new();
    match std::fs::read_to_string(path) {
        Ok(t) => text = t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
        Err(e) => return Err(ConfigError(format!("{file_name}: cannot read: {e}"))),
    }
    // Where a key's value came from, as an error should say it: `server.toml:3`,
    // `environment UDPMSG_LISTEN`, `--listen`.
    let origin = |key: &str, source: &Source| match source {
        Source::File(_) => match key_line(&text, key) {
            Some(line) => format!("{file_name}:{line}"),
            None => file_name.clone(),
        },
        Source::Env(var) => format!("environment {var}"),
        Source::CommandLine => format!("--{}", key.replace('_', "-")),
        Source::Default => "default".into(),
    };
    let file: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError(format!("{file_name}: {}", e.to_string().trim_end())))?;
    for (k, v) in file {
        let source = Source::File(path.to_path_buf());
        if !defaults.contains_key(&k) {
            return Err(unknown_key(&origin(&k, &source), &k, &defaults));
        }
        check_value::<ServerConfig>(&defaults, &k, &v, &origin(&k, &source))?;
        sources.insert(k.clone(), source);
        merged.insert(k, v);
    }
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !ENV_NOT_SETTINGS.contains(&k.as_str()))
        .collect();
    env.sort();
    let mut ignored_env = Vec::new();
    for (var, raw) in env {
        let key = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        if !defaults.contains_key(&key) {
            ignored_env.push(var);
            continue;
        }
        // A TOML value (number, boolean, quoted string) as written, else a bare string.
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let source = Source::Env(var);
        check_value::<ServerConfig>(&defaults, &key, &value, &origin(&key, &source))?;
        sources.insert(key.clone(), source);
        merged.insert(key, value);
    }
    for (k, v) in cli {
        check_value::<ServerConfig>(&defaults, &k, &v, &origin(&k, &Source::CommandLine))?;
        sources.insert(k.clone(), Source::CommandLine);
        merged.insert(k, v);
    }
    let from = |key: &str| origin(key, sources.get(key).unwrap_or(&Source::Default));
    if let Some(toml::Value::String(listen)) = merged.get("listen") {
        if listen.parse::<SocketAddr>().is_err() {
            let (host, port) = split_host_port(listen)
                .map_err(|e| ConfigError(format!("{}: {e} for `listen`", from("listen"))))?;
            let addr = resolve(&host, port).map_err(|e| {
                ConfigError(format!("{}: cannot resolve `listen` \"{listen}\": {e}", from("listen")))
            })?;
            merged.insert("listen".into(), toml::Value::String(addr.to_string()));
        }
    }
    let config: ServerConfig = merged
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError(format!("{file_name}: {}", e.to_string().trim_end())))?;
    config.validate().map_err(|e| {
        // Said where the offending value came from (the first key the message names).
        let culprit = defaults.keys().find(|k| e.0.contains(&format!("`{k}`")));
        ConfigError(format!("{}: {e}", culprit.map_or(file_name.clone(), |k| from(k))))
    })?;
    Ok(Layered { config, sources, ignored_env })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ServerConfig::default().validate().unwrap();
        ClientConfig::default().validate().unwrap();
    }

    #[test]
    fn checked_in_files_match_defaults() {
        let root = env!("CARGO_MANIFEST_DIR");
        let server: ServerConfig =
            parse(&std::fs::read_to_string(format!("{root}/server.toml")).unwrap(), "server.toml").unwrap();
        assert_eq!(server, ServerConfig::default());
        let client: ClientConfig =
            parse(&std::fs::read_to_string(format!("{root}/client.toml")).unwrap(), "client.toml").unwrap();
        assert_eq!(client, ClientConfig::default());
        // Every key appears in the file (uncommented), so the sample documents all of them.
        let table: toml::Table =
            std::fs::read_to_string(format!("{root}/server.toml")).unwrap().parse().unwrap();
        let defaults = toml::Table::try_from(ServerConfig::default()).unwrap();
        assert_eq!(
            table.keys().collect::<Vec<_>>(),
            defaults.keys().collect::<Vec<_>>(),
            "server.toml must list every key"
        );
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = parse::<ServerConfig>("lisen = \"1.2.3.4:5\"", "/etc/x.toml").unwrap_err();
        assert!(err.0.contains("/etc/x.toml"), "{err}");
        assert!(err.0.contains("lisen"), "{err}");
    }

    #[test]
    fn out_of_range_names_key_and_range() {
        let cfg: ServerConfig = parse("max_text_bytes = 5000", "s.toml").unwrap();
        let err = cfg.validate().unwrap_err();
        assert!(err.0.contains("max_text_bytes") && err.0.contains("1..=1024"), "{err}");
        let cfg: ClientConfig = parse("request_max_tries = 0", "c.toml").unwrap();
        assert!(cfg.validate().unwrap_err().0.contains("request_max_tries"));
    }

    #[test]
    fn layers_command_line_over_environment_over_file() {
        let dir = std::env::temp_dir().join(format!("udpmsg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.toml");
        std::fs::write(&path, "max_text_bytes = 500\nmax_retrieve = 50\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let env = vec![
            ("UDPMSG_MAX_RETRIEVE".to_string(), "60".to_string()),
            ("UDPMSG_LISTEN".to_string(), "127.0.0.1:2".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let mut cli = toml::Table::new();
        cli.insert("listen".into(), toml::Value::String("127.0.0.1:3".into()));
        let l = layered_server(&path, true, env, cli, &no_dns).unwrap();
        assert_eq!(l.config.max_text_bytes, 500);
        assert_eq!(l.config.max_retrieve, 60);
        assert_eq!(l.config.listen, "127.0.0.1:3".parse().unwrap());
        assert_eq!(l.sources["max_text_bytes"], Source::File(path.clone()));
        assert_eq!(l.sources["max_retrieve"], Source::Env("UDPMSG_MAX_RETRIEVE".into()));
        assert_eq!(l.sources["listen"], Source::CommandLine);
        assert_eq!(l.sources["max_inbox"], Source::Default);
        let printed = l.render();
        assert!(printed.contains("max_retrieve = 60  # environment UDPMSG_MAX_RETRIEVE"), "{printed}");

        let bad = layered_server(
            &path,
            true,
            vec![("UDPMSG_MAX_RETRIEVE".into(), "0".into())],
            toml::Table::new(),
            &no_dns,
        );
        let e = bad.unwrap_err().0;
        assert!(e.contains("max_retrieve") && e.contains("UDPMSG_MAX_RETRIEVE"), "{e}");
        let unknown = layered_server(
            &path,
            true,
            vec![("UDPMSG_PORT".into(), "udp://x".into())],
            toml::Table::new(),
            &no_dns,
        );
        assert_eq!(unknown.unwrap().ignored_env, vec!["UDPMSG_PORT"], "ignored with a warning, not fatal");
        std::fs::write(&path, "lisen = 1\n").unwrap();
        let e = layered_server(&path, true, Vec::new(), toml::Table::new(), &no_dns).unwrap_err().0;
        assert!(e.contains("lisen") && e.contains("server.toml"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn no_dns(host: &str, _port: u16) -> Result<SocketAddr, String> {
        panic!("nothing to resolve, yet asked for {host}")
    }

    #[test]
    fn host_and_port_as_users_write_them() {
        let ok = |s: &str| split_host_port(s).unwrap();
        assert_eq!(ok("localhost:7070"), ("localhost".into(), 7070));
        assert_eq!(ok("chat.example.org"), ("chat.example.org".into(), DEFAULT_PORT));
        assert_eq!(ok("127.0.0.1"), ("127.0.0.1".into(), DEFAULT_PORT));
        assert_eq!(ok("127.0.0.1:9"), ("127.0.0.1".into(), 9));
        assert_eq!(ok("::1"), ("::1".into(), DEFAULT_PORT));
        assert_eq!(ok("[::1]"), ("::1".into(), DEFAULT_PORT));
        assert_eq!(ok("[::1]:9"), ("::1".into(), 9));
        assert_eq!(ok(" localhost "), ("localhost".into(), DEFAULT_PORT));
        for bad in ["", "host:port", "host:70000", "a b", "[::1", "[x]:1", "[::1]x", "a:b:c"] {
            assert!(split_host_port(bad).is_err(), "{bad:?}");
        }
        let cfg: ClientConfig = parse("server = \"localhost\"", "c.toml").unwrap();
        cfg.validate().unwrap();
        let cfg: ClientConfig = parse("server = \"localhost:x\"", "c.toml").unwrap();
        let e = cfg.validate().unwrap_err().0;
        assert!(e.contains("`server`") && e.contains("port"), "{e}");
    }

    #[test]
    fn listen_names_are_resolved_by_the_caller() {
        let mut cli = toml::Table::new();
        cli.insert("listen".into(), toml::Value::String("localhost".into()));
        let resolve = |host: &str, port: u16| -> Result<SocketAddr, String> {
            assert_eq!((host, port), ("localhost", DEFAULT_PORT));
            Ok("127.0.0.1:7070".parse().unwrap())
        };
        let l = layered_server(Path::new("/nonexistent/s.toml"), false, Vec::new(), cli, &resolve).unwrap();
        assert_eq!(l.config.listen, "127.0.0.1:7070".parse().unwrap());
        let env = vec![("UDPMSG_LISTEN".to_string(), "nowhere.invalid:1".to_string())];
        let fail = |_: &str, _: u16| -> Result<SocketAddr, String> { Err("no such host".into()) };
        let e = layered_server(Path::new("/nonexistent/s.toml"), false, env, toml::Table::new(), &fail)
            .unwrap_err()
            .0;
        assert!(
            e.contains("nowhere.invalid") && e.contains("UDPMSG_LISTEN") && e.contains("no such host"),
            "{e}"
        );
    }

    #[test]
    fn passwords_in_connection_strings_are_never_printed() {
        assert_eq!(redact_password("postgres://u:s3cret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_password("host=h password=s3cret user=u"), "host=h password=*** user=u");
        assert_eq!(
            redact_password("postgres://h/db?user=u&password=s3cret&x=1"),
            "postgres://h/db?user=u&password=***&x=1"
        );
        let env = vec![("UDPMSG_POSTGRES_URL".to_string(), "postgres://u:s3cret@h/db".to_string())];
        let l =
            layered_server(Path::new("/nonexistent.toml"), false, env, toml::Table::new(), &no_dns).unwrap();
        let printed = l.render();
        assert!(
            printed.contains("postgres_url = \"postgres://u:***@h/db\"") && !printed.contains("s3cret"),
            "{printed}"
        );
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let cfg: ServerConfig = load(Path::new("/nonexistent/server.toml"), false).unwrap();
        assert_eq!(cfg, ServerConfig::default());
        assert!(load::<ServerConfig>(Path::new("/nonexistent/server.toml"), true).is_err());
    }
}
