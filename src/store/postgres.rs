//! The shared store: one PostgreSQL database, any number of daemons (nodes) on it.
//!
//! Same guarantees as [`super::sqlite`]: one transaction per batch (group commit), nothing
//! visible of a batch that failed, the schema versioned (in `udpmsg_meta`) and created or
//! migrated at start under an advisory lock (so nodes starting together do it once), a newer
//! schema refused. A lost connection fails what was under way (the core answers "storage
//! unavailable, retry") and is reconnected with backoff; a batch whose COMMIT was cut off is
//! looked up by the marker it wrote (`node_batches`), so a batch that did commit is reported as
//! committed and nothing acknowledged is lost or run twice.
//!
//! # Several nodes
//!
//! Every node serves every user: accounts, subscriptions, inboxes and sessions are rows. A
//! session row names the node holding it and the epoch its pushes are numbered in; any node
//! can take a session over ([`Read::Claim`]: one `UPDATE ... RETURNING`), and the node that
//! held it is told so.
//!
//! What a node must hear of other nodes' commits travels as [`Remote`] events in the `events`
//! table, written in the same transaction as the change: the messages of a batch, to each node
//! holding a session of a recipient (one row, and one `NOTIFY`, per target node per batch, never
//! per post and never to nodes without recipients); sessions that moved or ended, to the node
//! that held them; account and subscription changes, to all (a broadcast row, `node` NULL). Each
//! node reads its events with a cursor that is a PostgreSQL snapshot ([`Listener`]): a read
//! returns the rows committed since the previous read's snapshot and not before, whatever the
//! order in which transactions got their ids or committed, so nothing is read twice or
//! skipped. `NOTIFY` only wakes the reader early: it is lost while the listener is disconnected,
//! so the listener also reads every second and right after reconnecting.
//!
//! A commit decides where a message goes from the sessions it sees. A session that moves (or
//! opens) on another node at that moment could miss it: the statement that routes runs after
//! the batch has its transaction id, and the node that took the session reads its catch-up (for
//! a login: the messages of such transactions) only once every transaction that was running
//! when its own committed has ended.
//!
//! Message ids are made by the nodes' cores, unique by their node number (see
//! [`crate::server`]); `messages` keeps one row per message with its recipients, `inbox` one
//! row per delivery.

use super::{
    AccountRecord, Claimed, CommitOutcome, Deliveries, Read, ReadResult, Remote, Startup, Store, StoreError,
    StoredSession, Write,
};
use crate::proto::{Message, Token};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls, Statement, Transaction};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

/// The schema this build writes. Version history:
/// 1: accounts, subscriptions, messages, inbox, sessions (with their node and epoch), nodes,
///    node_batches, events.
pub const SCHEMA_VERSION: i64 = 1;

/// Node numbers are 1..=MAX_NODE (they are part of every message id).
pub const MAX_NODE: i64 = 1023;

/// Advisory lock keys (first half: "udpm").
const LOCK_CLASS: i32 = 0x7564_706d;
const LOCK_SCHEMA: i32 = 1;
const LOCK_UPKEEP: i32 = 2;
/// Node names lock with this class and the name's hash.
const LOCK_NODE_CLASS: i32 = 0x7564_706e;

/// The channel every node listens on for broadcast events.
pub const BROADCAST_CHANNEL: &str = "udpmsg_all";

/// The channel of node `id`.
pub fn channel(id: i64) -> String {
    format!("udpmsg_node_{id}")
}

/// How long a commit or read may take before PostgreSQL cancels it.
const STATEMENT_TIMEOUT_MS: u64 = 10_000;
/// Reconnection backoff: first wait and cap.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a starting daemon asks for its name's lock before refusing (see
/// `PgStore::lock_name`).
const NAME_LOCK_WAIT: Duration = Duration::from_secs(5);
/// A name lock's holder whose node sent no heartbeat for this long is taken for dead.
const STALE_SECS: u64 = 3 * LIVE_SECS;
/// Longest wait for transactions that were running when a session moved or opened here.
const CONCURRENT_WAIT: Duration = Duration::from_secs(2);
/// Events older than this are deleted (a node that was away longer starts from a new cursor).
const EVENTS_KEEP_SECS: i64 = 600;
/// Messages the collection looks at per step.
const GC_STEP: i64 = 32;
/// Deliveries to an account before its inbox is trimmed by the upkeep.
const TRIM_AFTER: u32 = 64;

const SCHEMA: &str = "
CREATE TABLE udpmsg_meta (key text PRIMARY KEY, value bigint NOT NULL);
CREATE SEQUENCE udpmsg_epochs;
CREATE SEQUENCE udpmsg_account_ids;
CREATE TABLE accounts (
    id bigint PRIMARY KEY DEFAULT nextval('udpmsg_account_ids'),
    name text COLLATE \"C\" NOT NULL UNIQUE,
    password_hash text NOT NULL,
    last_delivered bigint NOT NULL DEFAULT 0,
    known bytea NOT NULL DEFAULT ''
);
CREATE TABLE subscriptions (
    follower text COLLATE \"C\" NOT NULL,
    followed text COLLATE \"C\" NOT NULL,
    PRIMARY KEY (follower, followed)
);
CREATE INDEX subscriptions_by_followed ON subscriptions (followed, follower);
CREATE TABLE messages (
    id bigint PRIMARY KEY,
    author text NOT NULL,
    recipient text,
    text text NOT NULL,
    time bigint NOT NULL,
    recipients bytea NOT NULL,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE TABLE inbox (
    account bigint NOT NULL,
    message bigint NOT NULL,
    PRIMARY KEY (account, message)
);
CREATE TABLE nodes (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    listen text NOT NULL DEFAULT '',
    pid bigint NOT NULL DEFAULT 0,
    epoch bigint NOT NULL DEFAULT 0,
    started timestamptz NOT NULL DEFAULT now(),
    heartbeat timestamptz NOT NULL DEFAULT now(),
    sessions bigint NOT NULL DEFAULT 0,
    stopped boolean NOT NULL DEFAULT false
);
CREATE TABLE node_batches (
    node bigint PRIMARY KEY,
    epoch bigint NOT NULL,
    batch bigint NOT NULL
);
CREATE TABLE sessions (
    token bytea PRIMARY KEY,
    user_name text COLLATE \"C\" NOT NULL,
    account bigint NOT NULL,
    node bigint,
    epoch bigint NOT NULL DEFAULT 0,
    last_request_id bigint,
    last_reply bytea,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_by_account ON sessions (account);
CREATE INDEX sessions_by_user ON sessions (user_name);
CREATE INDEX sessions_by_node ON sessions (node);
CREATE TABLE events (
    id bigserial PRIMARY KEY,
    node bigint,
    origin bigint,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created timestamptz NOT NULL DEFAULT now(),
    body bytea NOT NULL
);
CREATE INDEX events_by_node ON events (node, xid);
CREATE INDEX events_by_age ON events (created);
";

/// Connection settings: `url` (a `postgres://` URL or `key=value` string, possibly empty), then
/// the usual `PG*` variables for what it leaves out (`PGHOST`, `PGPORT`, `PGUSER`,
/// `PGDATABASE`, `PGPASSWORD`), with the password from `password_file` before `PGPASSWORD`.
pub fn connect_config(url: &str, password_file: Option<&Path>) -> Result<Config, StoreError> {
    connect_config_from(url, password_file, |k| std::env::var(k).ok())
}

fn connect_config_from(
    url: &str,
    password_file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, StoreError> {
    let mut c: Config = if url.trim().is_empty() {
        Config::new()
    } else {
        // The parser's message may quote the URL: say only that it is invalid.
        url.parse().map_err(|_| {
            StoreError("postgres_url is not a valid PostgreSQL URL or key=value connection string".into())
        })?
    };
    if c.get_hosts().is_empty() {
        for host in env("PGHOST").unwrap_or_else(|| "localhost".into()).split(',') {
            if host.starts_with('/') {
                c.host_path(host);
            } else {
                c.host(host);
            }
        }
    }
    if c.get_ports().is_empty() {
        if let Some(port) = env("PGPORT") {
            let port = port.parse().map_err(|_| StoreError(format!("PGPORT={port} is not a port number")))?;
            c.port(port);
        }
    }
    if c.get_user().is_none() {
        let user = env("PGUSER").or_else(|| env("USER")).unwrap_or_else(|| "postgres".into());
        c.user(&user);
    }
    if c.get_dbname().is_none() {
        if let Some(db) = env("PGDATABASE") {
            c.dbname(&db);
        }
    }
    if c.get_password().is_none() {
        if let Some(path) = password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                StoreError(format!("{}: cannot read the PostgreSQL password: {e}", path.display()))
            })?;
            c.password(text.trim_end_matches(['\r', '\n']));
        } else if let Some(p) = env("PGPASSWORD") {
            c.password(&p);
        }
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(5));
    }
    c.application_name("udpmsgd");
    c.keepalives(true);
    c.keepalives_idle(Duration::from_secs(10));
    c.options(&format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
    Ok(c)
}

/// Where a connection goes, for messages: user, hosts and database, never the password.
pub fn describe(c: &Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = c.get_ports().iter().map(|p| p.to_string()).collect();
    format!(
        "PostgreSQL {}@{}{}/{}",
        c.get_user().unwrap_or("?"),
        hosts.join(","),
        if ports.is_empty() { String::new() } else { format!(":{}", ports.join(",")) },
        c.get_dbname().unwrap_or(c.get_user().unwrap_or("?"))
    )
}

fn pg(what: &str, e: postgres::Error) -> StoreError {
    // A server error's message names the statement's problem; the connection string never
    // appears in it.
    match e.as_db_error() {
        Some(db) => StoreError(format!("PostgreSQL: {what}: {}", db.message())),
        None => StoreError(format!("PostgreSQL: {what}: {e}")),
    }
}

/// One connection with reconnection and backoff.
struct Conn {
    config: Config,
    client: Option<Client>,
    /// Statements of the hot path prepared on `client` (a new client starts with none).
    stmts: Stmts,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Whether the connection was lost since the owner last asked ([`Conn::take_lost`]).
    lost: bool,
}

/// Statements prepared once per connection. A statement given as text costs a round trip to
/// parse and plan it before the one that runs it; a commit runs four to six, so preparing them
/// once saves as many round trips per batch (one node, same sitting: workload 1 918 -> 1,700
/// posts/s, workload 2 23.5k -> 34.5k). Prepared statements belong to the connection, not to a
/// transaction: one prepared inside a transaction that rolls back stays usable.
#[derive(Default)]
struct Stmts(HashMap<&'static str, Statement>);

impl Stmts {
    fn execute(
        &mut self,
        tx: &mut Transaction<'_>,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let st = self.get(tx, sql)?;
        tx.execute(&st, params)
    }

    fn query(
        &mut self,
        tx: &mut Transaction<'_>,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let st = self.get(tx, sql)?;
        tx.query(&st, params)
    }

    fn get(&mut self, tx: &mut Transaction<'_>, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(st) = self.0.get(sql) {
            return Ok(st.clone());
        }
        let st = tx.prepare(sql)?;
        self.0.insert(sql, st.clone());
        Ok(st)
    }
}

impl Conn {
    fn new(config: Config) -> Conn {
        Conn {
            config,
            client: None,
            stmts: Stmts::default(),
            retry_at: None,
            backoff: BACKOFF_MIN,
            lost: false,
        }
    }

    /// The client, connecting if needed (not before the backoff has passed). `fresh` is set
    /// when this call connected.
    fn get(&mut self, fresh: &mut bool) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.lost = true;
        }
        if self.client.is_none() {
            if let Some(at) = self.retry_at {
                let now = Instant::now();
                if now < at {
                    return Err(StoreError(format!(
                        "PostgreSQL unreachable; reconnecting in {} ms",
                        (at - now).as_millis()
                    )));
                }
            }
            match self.config.connect(NoTls) {
                Ok(c) => {
                    self.client = Some(c);
                    self.stmts = Stmts::default();
                    self.retry_at = None;
                    self.backoff = BACKOFF_MIN;
                    *fresh = true;
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    return Err(StoreError(format!("cannot connect to {}: {e}", describe(&self.config))));
                }
            }
        }
        Ok(self.client.as_mut().expect("connected"))
    }

    /// After an error: drops the client if its connection is gone. Returns whether it was.
    fn check(&mut self) -> bool {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.lost = true;
            self.retry_at = None;
            return true;
        }
        false
    }

    /// The client and its prepared statements, connecting if needed (see [`Conn::get`]).
    fn get_with_stmts(&mut self, fresh: &mut bool) -> Result<(&mut Client, &mut Stmts), StoreError> {
        self.get(fresh)?;
        Ok((self.client.as_mut().expect("connected"), &mut self.stmts))
    }

    fn take_lost(&mut self) -> bool {
        std::mem::take(&mut self.lost)
    }
}

/// Who opened the store.
#[derive(Debug, Clone)]
enum Role {
    /// `udpmsgd user ...` and `udpmsgd nodes`: writes and reads, holds no sessions.
    Admin,
    /// A daemon, once [`Store::begin_epoch`] registered it.
    Node { id: i64, name: String, listen: String, epoch: i64 },
}

/// See the module documentation.
pub struct PgStore {
    conn: Conn,
    role: Role,
    max_inbox: usize,
    /// Sessions idle this long belong to nobody once their node stopped sending heartbeats.
    idle_secs: u64,
    /// Batches attempted in this run; each writes its number as a marker.
    batch: i64,
    outcome: CommitOutcome,
    /// Deliveries to each account since its inbox was last trimmed.
    trim: HashMap<i64, u32>,
    gc_cursor: i64,
    next_sweep: Instant,
    /// Counters for metrics: reconnections and commits found committed after a lost connection.
    pub reconnects: u64,
    pub recovered_commits: u64,
}

/// A node as listed by `udpmsgd nodes`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub id: i64,
    pub name: String,
    pub listen: String,
    pub pid: i64,
    pub epoch: i64,
    /// Seconds since it started and since its last heartbeat.
    pub up_secs: f64,
    pub heartbeat_age_secs: f64,
    pub stopped: bool,
    /// Session rows that name it.
    pub sessions: i64,
}

impl PgStore {
    /// Opens the store for a daemon named `name` (unique among the daemons on this database;
    /// it must be the same across restarts for sessions to come back), listening on `listen`.
    pub fn open_node(
        config: Config,
        name: &str,
        listen: &str,
        max_inbox: usize,
        idle_secs: u64,
    ) -> Result<PgStore, StoreError> {
        if name.is_empty() || name.len() > 64 {
            return Err(StoreError("node_name must be 1 to 64 characters".into()));
        }
        let mut s = PgStore::new(config, max_inbox, idle_secs);
        s.role = Role::Node { id: 0, name: name.to_string(), listen: listen.to_string(), epoch: 0 };
        s.setup_with_retry()?;
        Ok(s)
    }

    /// Opens the store for an admin command.
    pub fn open_admin(config: Config, max_inbox: usize) -> Result<PgStore, StoreError> {
        let mut s = PgStore::new(config, max_inbox, 300);
        s.setup_with_retry()?;
        Ok(s)
    }

    fn new(config: Config, max_inbox: usize, idle_secs: u64) -> PgStore {
        PgStore {
            conn: Conn::new(config),
            role: Role::Admin,
            max_inbox: max_inbox.max(1),
            idle_secs,
            batch: 0,
            outcome: CommitOutcome::default(),
            trim: HashMap::new(),
            gc_cursor: 0,
            next_sweep: Instant::now(),
            reconnects: 0,
            recovered_commits: 0,
        }
    }

    /// Where the store is, for messages.
    pub fn describe(&self) -> String {
        describe(&self.conn.config)
    }

    /// This node's number (0 for an admin).
    pub fn node_id(&self) -> i64 {
        match self.role {
            Role::Node { id, .. } => id,
            Role::Admin => 0,
        }
    }

    /// The connection settings (for the listener's own connection).
    pub fn config(&self) -> Config {
        self.conn.config.clone()
    }

    /// At start the database may still be starting (containers): connection refusals are
    /// retried for a while; anything else is reported at once.
    fn setup_with_retry(&mut self) -> Result<(), StoreError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut fresh = false;
            match self.conn.get(&mut fresh) {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    log::warn!("{e}; retrying");
                    std::thread::sleep(self.conn.retry_at.map_or(BACKOFF_MIN, |t| {
                        t.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))
                    }));
                }
                Err(e) => return Err(e),
            }
        }
        self.setup()
    }

    /// Creates or checks the schema, under an advisory lock so that nodes starting together
    /// create it once.
    fn setup(&mut self) -> Result<(), StoreError> {
        let mut fresh = false;
        let c = self.conn.get(&mut fresh)?;
        c.execute("SELECT pg_advisory_lock($1, $2)", &[&LOCK_CLASS, &LOCK_SCHEMA])
            .map_err(|e| pg("lock", e))?;
        let result = setup_schema(c);
        let _ = c.execute("SELECT pg_advisory_unlock($1, $2)", &[&LOCK_CLASS, &LOCK_SCHEMA]);
        result
    }

    /// Runs `f` on the connection; a lost connection is dropped, to be made again.
    fn with<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut fresh = false;
        let c = self.conn.get(&mut fresh)?;
        let result = f(c);
        if fresh {
            self.reconnects += 1;
        }
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn.check();
                Err(pg(what, e))
            }
        }
    }

    /// [`PgStore::with`], with the connection's prepared statements.
    fn with_stmts<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Client, &mut Stmts) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut fresh = false;
        let (c, st) = self.conn.get_with_stmts(&mut fresh)?;
        let result = f(c, st);
        if fresh {
            self.reconnects += 1;
        }
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                // The server forgot the statements while the connection stayed (a pooler in
                // transaction mode), or a schema change during a rolling upgrade made a plan
                // stale: prepare them again next time rather than fail every commit.
                let stale = [SqlState::INVALID_SQL_STATEMENT_NAME, SqlState::FEATURE_NOT_SUPPORTED];
                if e.code().is_some_and(|c| stale.contains(c)) {
                    self.conn.stmts = Stmts::default();
                }
                self.conn.check();
                Err(pg(what, e))
            }
        }
    }

    /// Takes the lock on this node's name, held by its connection while it lives. A daemon that
    /// was just killed may still hold it for a moment (until PostgreSQL sees its connection
    /// close), and one whose host died for as long as TCP takes to notice: so the lock is asked
    /// for again for up to [`NAME_LOCK_WAIT`], and a holder whose node has sent no heartbeat for
    /// [`STALE_SECS`] is ended. A live holder means two daemons share a name: refused.
    fn lock_name(&mut self, name: &str) -> Result<(), StoreError> {
        let end = Instant::now() + NAME_LOCK_WAIT;
        loop {
            let got = self.with("lock the node name", |c| {
                c.query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LOCK_NODE_CLASS, &name])
                    .map(|r| r.get::<_, bool>(0))
            })?;
            if got {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(StoreError(format!(
                    "another udpmsgd named {name:?} is running on this database (node_name); give each \
                     daemon its own name"
                )));
            }
            let stale = STALE_SECS as f64;
            let ended: i64 = self.with("end a dead node's connection", |c| {
                c.query_one(
                    "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
                     WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int8 = $1::int8 \
                       AND l.objid::int8 = (hashtext($2)::int8 & 4294967295) AND l.objsubid = 2 \
                       AND EXISTS (SELECT 1 FROM nodes n WHERE n.name = $2 \
                           AND n.heartbeat < now() - make_interval(secs => $3))",
                    &[&i64::from(LOCK_NODE_CLASS), &name, &stale],
                )
                .map(|r| r.get(0))
            })?;
            if ended > 0 {
                log::warn!("ended the database connection of node {name:?}: no heartbeat for {STALE_SECS} s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// After a reconnection the node must still own its name.
    fn relock(&mut self) -> Result<(), StoreError> {
        let Role::Node { name, .. } = self.role.clone() else { return Ok(()) };
        let got = self.with("lock the node name", |c| {
            c.query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LOCK_NODE_CLASS, &name])
                .map(|r| r.get::<_, bool>(0))
        })?;
        if !got {
            self.conn.client = None;
            return Err(StoreError(format!(
                "another udpmsgd named {name:?} is running on this database; give each daemon its own node_name"
            )));
        }
        Ok(())
    }

    /// Connects if needed; a new connection of a node takes its name lock again first.
    fn ready(&mut self) -> Result<(), StoreError> {
        let mut fresh = false;
        self.conn.get(&mut fresh)?;
        if fresh || self.conn.take_lost() {
            self.reconnects += u64::from(fresh);
            if matches!(self.role, Role::Node { id, .. } if id > 0) {
                self.relock()?;
            }
        }
        Ok(())
    }

    /// The nodes on this database, for `udpmsgd nodes`.
    pub fn nodes(&mut self) -> Result<Vec<NodeRow>, StoreError> {
        self.with("list the nodes", |c| {
            let rows = c.query(
                "SELECT n.id, n.name, n.listen, n.pid, n.epoch, \
                     extract(epoch FROM now() - n.started)::float8, \
                     extract(epoch FROM now() - n.heartbeat)::float8, n.stopped, \
                     (SELECT count(*) FROM sessions s WHERE s.node = n.id) \
                 FROM nodes n ORDER BY n.id",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| NodeRow {
                    id: r.get(0),
                    name: r.get(1),
                    listen: r.get(2),
                    pid: r.get(3),
                    epoch: r.get(4),
                    up_secs: r.get(5),
                    heartbeat_age_secs: r.get(6),
                    stopped: r.get(7),
                    sessions: r.get(8),
                })
                .collect())
        })
    }

    /// Account names in name order (for `udpmsgd user list`), a page at a time.
    pub fn names(&mut self, after: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        match self.read(&Read::Names { after: after.to_string(), limit })? {
            ReadResult::Names(n) => Ok(n),
            _ => Err(StoreError("a names read answered something else".into())),
        }
    }

    /// Whether batch `marker` of this run is stored (after its COMMIT was cut off).
    fn batch_stored(&mut self, marker: i64) -> Result<bool, StoreError> {
        let Role::Node { id, epoch, .. } = self.role else { return Ok(false) };
        self.ready()?;
        self.with("look up the last batch", |c| {
            let row = c.query_opt("SELECT epoch, batch FROM node_batches WHERE node = $1", &[&id])?;
            Ok(row.is_some_and(|r| r.get::<_, i64>(0) == epoch && r.get::<_, i64>(1) >= marker))
        })
    }

    /// The messages of transactions `xids` (recent ones: ids above `floor`) that deliver to
    /// `opened` (account id → (name, token)).
    fn late_deliveries(
        &mut self,
        xids: &[String],
        opened: &HashMap<i64, String>,
    ) -> Result<Deliveries, StoreError> {
        if xids.is_empty() || opened.is_empty() {
            return Ok(Vec::new());
        }
        // Only recent ids can be theirs (ids are microseconds since 2020 by the posting node's
        // clock, and no transaction runs longer than the statement timeout): the primary key
        // finds them, however large the table.
        let floor = recent_id_floor(std::time::SystemTime::now());
        let rows = self.with("read late deliveries", |c| {
            c.query(
                "SELECT id, author, recipient, text, time, recipients FROM messages \
                 WHERE id >= $2 AND xid IN (SELECT x::xid8 FROM unnest($1::text[]) x)",
                &[&xids, &floor],
            )
        })?;
        let mut out = Vec::new();
        for r in rows {
            let recipients = decode_ids(r.get::<_, &[u8]>(5));
            let here: Vec<(String, u64)> =
                recipients.iter().filter_map(|a| opened.get(&(*a as i64)).map(|n| (n.clone(), *a))).collect();
            if !here.is_empty() {
                out.push((message_of(&r), here));
            }
        }
        Ok(out)
    }

    /// Waits until every transaction running now has ended (at most [`CONCURRENT_WAIT`]);
    /// returns their ids.
    fn wait_for_concurrent(&mut self) -> Result<Vec<String>, StoreError> {
        let xids: Vec<String> = self.with("read the running transactions", |c| {
            let rows = c.query("SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x", &[])?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })?;
        if xids.is_empty() {
            return Ok(xids);
        }
        let end = Instant::now() + CONCURRENT_WAIT;
        loop {
            let running: i64 = self.with("wait for running transactions", |c| {
                c.query_one(
                    "SELECT count(*) FROM unnest($1::text[]) x WHERE pg_xact_status(x::xid8) = 'in progress'",
                    &[&xids],
                )
                .map(|r| r.get(0))
            })?;
            if running == 0 {
                return Ok(xids);
            }
            if Instant::now() >= end {
                log::warn!("{running} transaction(s) still running after {CONCURRENT_WAIT:?}; going on");
                return Ok(xids);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn claim(&mut self, token: &Token, catch_up: u32) -> Result<Option<Claimed>, StoreError> {
        let Role::Node { id: me, .. } = self.role else { return Ok(None) };
        let t = &token.0[..];
        let found = self.with("take a session over", |c| {
            let mut tx = c.transaction()?;
            let row = tx.query_opt(
                "WITH old AS (SELECT node FROM sessions WHERE token = $1 FOR UPDATE) \
                 UPDATE sessions s SET node = $2, epoch = nextval('udpmsg_epochs') FROM old \
                 WHERE s.token = $1 \
                 RETURNING old.node, s.epoch, s.user_name, s.account, s.last_request_id, s.last_reply, \
                     GREATEST(0, extract(epoch FROM now() - s.created))::int8",
                &[&t, &me],
            )?;
            let Some(row) = row else { return Ok(None) };
            let user: String = row.get(2);
            let account: Option<(i64, i64)> = tx
                .query_opt("SELECT id, last_delivered FROM accounts WHERE name = $1", &[&user])?
                .map(|r| (r.get(0), r.get(1)));
            let Some((user_id, last_delivered)) = account.filter(|(id, _)| *id == row.get::<_, i64>(3))
            else {
                // The account went: so does the session.
                tx.execute("DELETE FROM sessions WHERE token = $1", &[&t])?;
                tx.commit()?;
                return Ok(None);
            };
            let old: Option<i64> = row.get(0);
            if let Some(old) = old.filter(|o| *o != me) {
                let body = encode_events(&[Remote::Moved(vec![*token])]);
                tx.execute(
                    "INSERT INTO events (node, origin, body) VALUES ($1, $2, $3)",
                    &[&old, &me, &body],
                )?;
                tx.execute("SELECT pg_notify($1, '')", &[&channel(old)])?;
            }
            tx.commit()?;
            let last_reply = row.get::<_, Option<i64>>(4).zip(row.get::<_, Option<Vec<u8>>>(5));
            Ok(Some((
                StoredSession {
                    token: *token,
                    user,
                    user_id: user_id as u64,
                    last_delivered: last_delivered as u64,
                    age_secs: row.get::<_, i64>(6).max(0) as u64,
                    last_reply: last_reply.map(|(id, r)| (id as u64, r)),
                },
                row.get::<_, i64>(1),
                old,
            )))
        })?;
        let Some((session, epoch, old)) = found else { return Ok(None) };
        log::debug!("took over a session of {} from node {old:?}", session.user);
        // Commits that routed its messages to the old node before the move are read below.
        self.wait_for_concurrent()?;
        let catch_up = match self.answer(&Read::Inbox {
            id: session.user_id,
            count: catch_up,
            before: None,
            above: None,
        })? {
            ReadResult::Inbox { messages, .. } => messages,
            _ => Vec::new(),
        };
        Ok(Some(Claimed { session, epoch: epoch as u32, catch_up }))
    }

    fn answer(&mut self, read: &Read) -> Result<ReadResult, StoreError> {
        let max_inbox = self.max_inbox as i64;
        let kind = read.kind();
        match read {
            Read::Claim { token, catch_up } => Ok(ReadResult::Claimed(self.claim(token, *catch_up)?)),
            Read::Account { name } => self.with(kind, |c| {
                let row = c.query_opt(
                    "SELECT id, password_hash, last_delivered, known FROM accounts WHERE name = $1",
                    &[name],
                )?;
                Ok(ReadResult::Account(row.map(|r| AccountRecord {
                    id: r.get::<_, i64>(0) as u64,
                    user: name.clone(),
                    password_hash: r.get(1),
                    last_delivered: r.get::<_, i64>(2) as u64,
                    known: r.get(3),
                })))
            }),
            Read::Followers { name } => self.with(kind, |c| {
                let rows = c.query(
                    "SELECT s.follower, a.id FROM subscriptions s JOIN accounts a ON a.name = s.follower \
                     WHERE s.followed = $1",
                    &[name],
                )?;
                Ok(ReadResult::Followers(
                    rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64)).collect(),
                ))
            }),
            Read::Follows { follower, followed } => self.with(kind, |c| {
                let r = c.query_one(
                    "SELECT EXISTS (SELECT 1 FROM subscriptions WHERE follower = $1 AND followed = $2), \
                         (SELECT count(*) FROM subscriptions WHERE follower = $1)",
                    &[follower, followed],
                )?;
                Ok(ReadResult::Follows { follows: r.get(0), following: r.get::<_, i64>(1) as u32 })
            }),
            Read::Inbox { id, count, before, above } => {
                let (id, count) = (*id as i64, i64::from(*count));
                let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
                let above = *above;
                self.with(kind, |c| {
                    let rows = c.query(
                        "SELECT m.id, m.author, m.recipient, m.text, m.time FROM \
                             (SELECT message FROM inbox WHERE account = $1 ORDER BY message DESC LIMIT $2) i \
                         JOIN messages m ON m.id = i.message WHERE i.message < $3 \
                         ORDER BY i.message DESC LIMIT $4",
                        &[&id, &max_inbox, &before, &count],
                    )?;
                    let mut messages: Vec<Message> = rows.iter().map(message_of).collect();
                    messages.reverse();
                    let newer = match above {
                        None => 0,
                        Some(a) => {
                            let a = a.min(i64::MAX as u64) as i64;
                            c.query_one(
                                "SELECT count(*) FROM (SELECT message FROM inbox WHERE account = $1 \
                                 ORDER BY message DESC LIMIT $2) i WHERE i.message > $3",
                                &[&id, &max_inbox, &a],
                            )?
                            .get::<_, i64>(0) as u32
                        }
                    };
                    Ok(ReadResult::Inbox { messages, above: newer })
                })
            }
            Read::Names { after, limit } => self.with(kind, |c| {
                let rows = c.query(
                    "SELECT name FROM accounts WHERE name > $1 ORDER BY name LIMIT $2",
                    &[after, &i64::from(*limit)],
                )?;
                Ok(ReadResult::Names(rows.iter().map(|r| r.get(0)).collect()))
            }),
            Read::Relations { name, after, limit } => self.with(kind, |c| {
                let lim = i64::from(*limit);
                let following: Vec<String> = c
                    .query(
                        "SELECT followed FROM subscriptions WHERE follower = $1 AND followed > $2 \
                         ORDER BY followed LIMIT $3",
                        &[name, after, &lim],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let followers: Vec<String> = c
                    .query(
                        "SELECT follower FROM subscriptions WHERE followed = $1 AND follower > $2 \
                         ORDER BY follower LIMIT $3",
                        &[name, after, &lim],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                Ok(ReadResult::Relations(super::merge_relations(following, followers, *limit as usize)))
            }),
        }
    }

    /// One slice of upkeep; whether more is left.
    fn upkeep(&mut self) -> Result<bool, StoreError> {
        let idle = self.idle_secs as i64;
        let me = self.node_id();
        let now = Instant::now();
        if now >= self.next_sweep {
            self.next_sweep = now + Duration::from_secs(10);
            // One node at a time (the others find the lock taken and skip).
            self.with("upkeep", |c| {
                let mut tx = c.transaction()?;
                let got: bool = tx
                    .query_one("SELECT pg_try_advisory_xact_lock($1, $2)", &[&LOCK_CLASS, &LOCK_UPKEEP])?
                    .get(0);
                if got {
                    tx.execute(
                        "DELETE FROM events WHERE created < now() - make_interval(secs => $1)",
                        &[&(EVENTS_KEEP_SECS as f64)],
                    )?;
                    // Sessions of nodes silent for longer than a session may be idle: nobody
                    // can be using them.
                    tx.execute(
                        "DELETE FROM sessions WHERE node IN (SELECT id FROM nodes \
                         WHERE heartbeat < now() - make_interval(secs => $1) AND id <> $2)",
                        &[&(idle as f64), &me],
                    )?;
                }
                tx.commit()
            })?;
            return Ok(true);
        }
        let due = self.trim.iter().find(|(_, n)| **n >= TRIM_AFTER).map(|(a, _)| *a);
        if let Some(account) = due {
            self.trim.remove(&account);
            let max = self.max_inbox as i64;
            self.with("trim an inbox", |c| {
                c.execute(
                    "DELETE FROM inbox WHERE account = $1 AND message < (SELECT message FROM inbox \
                     WHERE account = $1 ORDER BY message DESC OFFSET $2 LIMIT 1)",
                    &[&account, &(max - 1)],
                )
            })?;
            return Ok(true);
        }
        // Collect messages no inbox holds.
        let cursor = self.gc_cursor;
        let (last, more) = self.with("collect messages", |c| {
            let mut tx = c.transaction()?;
            let got: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1, $2)", &[&LOCK_CLASS, &LOCK_UPKEEP])?
                .get(0);
            if !got {
                return Ok((cursor, false));
            }
            let rows = tx.query(
                "SELECT id, recipients FROM messages WHERE id > $1 ORDER BY id LIMIT $2",
                &[&cursor, &GC_STEP],
            )?;
            let mut last = cursor;
            for r in &rows {
                let id: i64 = r.get(0);
                last = id;
                let recipients: Vec<i64> =
                    decode_ids(r.get::<_, &[u8]>(1)).into_iter().map(|a| a as i64).collect();
                let held: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM inbox WHERE account = ANY($1) AND message = $2)",
                        &[&recipients, &id],
                    )?
                    .get(0);
                if !held {
                    tx.execute("DELETE FROM messages WHERE id = $1", &[&id])?;
                }
            }
            tx.commit()?;
            Ok((last, rows.len() as i64 == GC_STEP))
        })?;
        self.gc_cursor = if more { last } else { 0 };
        Ok(more || self.trim.values().any(|n| *n >= TRIM_AFTER))
    }
}

fn setup_schema(c: &mut Client) -> Result<(), StoreError> {
    let exists: bool = c
        .query_one("SELECT to_regclass('udpmsg_meta') IS NOT NULL", &[])
        .map_err(|e| pg("read the schema", e))?
        .get(0);
    if !exists {
        let other: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() \
                 AND tablename IN ('accounts', 'messages', 'sessions')",
                &[],
            )
            .map_err(|e| pg("read the schema", e))?
            .get(0);
        if other > 0 {
            return Err(StoreError(
                "the database has tables named like udpmsg's but no udpmsg_meta: not a udpmsg database; \
                 refusing to touch it (use an empty database)"
                    .into(),
            ));
        }
        let mut tx = c.transaction().map_err(|e| pg("create the schema", e))?;
        tx.batch_execute(SCHEMA).map_err(|e| pg("create the schema", e))?;
        tx.execute("INSERT INTO udpmsg_meta (key, value) VALUES ('schema_version', $1)", &[&SCHEMA_VERSION])
            .map_err(|e| pg("create the schema", e))?;
        tx.commit().map_err(|e| pg("create the schema", e))?;
        log::info!("created the udpmsg schema (version {SCHEMA_VERSION})");
        return Ok(());
    }
    let version: Option<i64> = c
        .query_opt("SELECT value FROM udpmsg_meta WHERE key = 'schema_version'", &[])
        .map_err(|e| pg("read the schema version", e))?
        .map(|r| r.get(0));
    let version = version.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "the database has schema version {version}, this udpmsgd understands up to version {SCHEMA_VERSION}; \
             refusing to start (use a newer udpmsgd)"
        )));
    }
    if version < 1 {
        return Err(StoreError(format!("the database has an unknown udpmsg schema version {version}")));
    }
    // Later migrations go here, each in its own transaction, from `version` up.
    Ok(())
}

/// The smallest id a message posted in the last [`RECENT`] can have (by a node whose clock is
/// at most that far behind).
fn recent_id_floor(now: std::time::SystemTime) -> i64 {
    let us = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let ticks = us.saturating_sub(RECENT.as_micros() as u64).saturating_sub(crate::server::TICKS_FROM_US);
    (ticks << crate::server::NODE_BITS).min(i64::MAX as u64) as i64
}

/// How far back a commit's messages are looked for after a login (see
/// [`PgStore::late_deliveries`]): well beyond the statement timeout, and clock skew.
const RECENT: Duration = Duration::from_secs(120);

fn message_of(r: &postgres::Row) -> Message {
    Message {
        id: r.get::<_, i64>(0) as u64,
        author: r.get(1),
        to: r.get(2),
        text: r.get(3),
        time: r.get::<_, i64>(4).max(0) as u64,
    }
}

fn encode_ids(ids: &[u64]) -> Vec<u8> {
    postcard::to_stdvec(ids).expect("integers serialize")
}

/// A damaged list reads as empty.
fn decode_ids(bytes: &[u8]) -> Vec<u64> {
    postcard::from_bytes(bytes).unwrap_or_default()
}

fn encode_events(events: &[Remote]) -> Vec<u8> {
    postcard::to_stdvec(events).expect("events serialize")
}

/// The events of a row; a row this build cannot read is skipped (and said).
fn decode_events(bytes: &[u8]) -> Vec<Remote> {
    match postcard::from_bytes(bytes) {
        Ok(v) => v,
        Err(e) => {
            log::warn!("an event row this udpmsgd cannot read ({e}); skipped");
            Vec::new()
        }
    }
}

/// Writes that commute with each other, applied together by one statement per kind.
#[derive(Default)]
struct Bulk {
    ids: Vec<i64>,
    authors: Vec<String>,
    tos: Vec<Option<String>>,
    texts: Vec<String>,
    times: Vec<i64>,
    recipients: Vec<Vec<u8>>,
    inbox_accounts: Vec<i64>,
    inbox_messages: Vec<i64>,
    replies: BTreeMap<Vec<u8>, (i64, Vec<u8>)>,
    delivered: BTreeMap<String, i64>,
    known: BTreeMap<String, Vec<u8>>,
}

impl Bulk {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.replies.is_empty() && self.delivered.is_empty() && self.known.is_empty()
    }

    /// Applies what is gathered. Keys are sorted, so that two nodes updating the same rows lock
    /// them in the same order (no deadlock).
    fn flush(&mut self, tx: &mut Transaction<'_>, st: &mut Stmts, me: i64) -> Result<(), postgres::Error> {
        if !self.ids.is_empty() {
            st.execute(
                tx, "INSERT INTO messages (id, author, recipient, text, time, recipients) \
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::bytea[])",
                &[&self.ids, &self.authors, &self.tos, &self.texts, &self.times, &self.recipients],
            )?;
            if !self.inbox_accounts.is_empty() {
                st.execute(
                    tx,
                    "INSERT INTO inbox (account, message) SELECT * FROM unnest($1::int8[], $2::int8[]) \
                     ON CONFLICT DO NOTHING",
                    &[&self.inbox_accounts, &self.inbox_messages],
                )?;
            }
        }
        if !self.replies.is_empty() {
            let (mut tokens, mut ids, mut replies) = (Vec::new(), Vec::new(), Vec::new());
            for (t, (id, r)) in std::mem::take(&mut self.replies) {
                tokens.push(t);
                ids.push(id);
                replies.push(r);
            }
            st.execute(
                tx,
                "UPDATE sessions s SET last_request_id = v.r, last_reply = v.b \
                 FROM unnest($1::bytea[], $2::int8[], $3::bytea[]) AS v(t, r, b) \
                 WHERE s.token = v.t AND s.node = $4",
                &[&tokens, &ids, &replies, &me],
            )?;
        }
        if !self.delivered.is_empty() {
            let (names, marks): (Vec<String>, Vec<i64>) =
                std::mem::take(&mut self.delivered).into_iter().unzip();
            st.execute(
                tx,
                "UPDATE accounts a SET last_delivered = GREATEST(a.last_delivered, v.u) \
                 FROM unnest($1::text[], $2::int8[]) AS v(n, u) WHERE a.name = v.n",
                &[&names, &marks],
            )?;
        }
        if !self.known.is_empty() {
            let (names, known): (Vec<String>, Vec<Vec<u8>>) =
                std::mem::take(&mut self.known).into_iter().unzip();
            st.execute(
                tx,
                "UPDATE accounts a SET known = v.k FROM unnest($1::text[], $2::bytea[]) AS v(n, k) \
                 WHERE a.name = v.n",
                &[&names, &known],
            )?;
        }
        self.ids.clear();
        self.authors.clear();
        self.tos.clear();
        self.texts.clear();
        self.times.clear();
        self.recipients.clear();
        self.inbox_accounts.clear();
        self.inbox_messages.clear();
        Ok(())
    }
}

/// What applying a batch found out.
#[derive(Default)]
struct Applied {
    outcome: CommitOutcome,
    /// Deliveries per account (for trimming).
    delivered: HashMap<i64, u32>,
    /// Sessions the batch opened: account id → user name.
    opened: HashMap<i64, String>,
}

/// Events for other nodes, gathered while a batch is applied.
#[derive(Default)]
struct Outgoing {
    to: BTreeMap<i64, Vec<Remote>>,
    changed: Option<Remote>,
}

impl Outgoing {
    fn ended(&mut self, node: i64, token: Token) {
        let events = self.to.entry(node).or_default();
        match events.iter_mut().find_map(|e| if let Remote::Ended(t) = e { Some(t) } else { None }) {
            Some(t) => t.push(token),
            None => events.push(Remote::Ended(vec![token])),
        }
    }

    fn change(
        &mut self,
        f: impl FnOnce(&mut Vec<String>, &mut Vec<String>, &mut Vec<String>, &mut Vec<String>, &mut bool),
    ) {
        let c = self.changed.get_or_insert_with(|| Remote::Changed {
            created: Vec::new(),
            deleted: Vec::new(),
            changed: Vec::new(),
            followers_of: Vec::new(),
            all_followers: false,
        });
        if let Remote::Changed { created, deleted, changed, followers_of, all_followers } = c {
            f(created, deleted, changed, followers_of, all_followers);
        }
    }
}

fn token_of(bytes: &[u8]) -> Option<Token> {
    <[u8; 16]>::try_from(bytes).ok().map(Token)
}

/// Applies `batch` in `tx` for node `me` (0: an admin command), in order.
/// `marker`: the batch's number, written with it (nodes only).
fn apply(
    tx: &mut Transaction<'_>,
    st: &mut Stmts,
    batch: &[Write],
    me: i64,
    epoch: i64,
    marker: i64,
) -> Result<Applied, postgres::Error> {
    let mut applied = Applied::default();
    let mut bulk = Bulk::default();
    let mut out = Outgoing::default();
    // Messages of this batch that have recipients: (message, recipient ids).
    let mut posted: Vec<(Message, Vec<u64>)> = Vec::new();
    for w in batch {
        match w {
            Write::StoreMessage { message, recipients } => {
                if recipients.is_empty() {
                    continue; // a message nobody receives only uses up its id
                }
                bulk.ids.push(message.id as i64);
                bulk.authors.push(message.author.clone());
                bulk.tos.push(message.to.clone());
                bulk.texts.push(message.text.clone());
                bulk.times.push(message.time as i64);
                bulk.recipients.push(encode_ids(recipients));
                for r in recipients {
                    bulk.inbox_accounts.push(*r as i64);
                    bulk.inbox_messages.push(message.id as i64);
                    *applied.delivered.entry(*r as i64).or_default() += 1;
                }
                posted.push((message.clone(), recipients.clone()));
                continue;
            }
            Write::LastReply { token, request_id, reply } => {
                bulk.replies.insert(token.0.to_vec(), (*request_id as i64, reply.clone()));
                continue;
            }
            Write::Delivered { user, up_to } => {
                let e = bulk.delivered.entry(user.clone()).or_insert(0);
                *e = (*e).max(*up_to as i64);
                continue;
            }
            Write::KnownAddresses { user, known } => {
                bulk.known.insert(user.clone(), known.clone());
                continue;
            }
            _ => {}
        }
        // Anything else may depend on what came before it: apply what is gathered first.
        if !bulk.is_empty() {
            bulk.flush(tx, st, me)?;
        }
        match w {
            Write::CreateAccount { user, password_hash } => {
                // One winner when two nodes register a name at once: the unique index makes the
                // second wait for the first, then insert nothing.
                let row = tx.query_opt(
                    "INSERT INTO accounts (name, password_hash) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING \
                     RETURNING id",
                    &[user, password_hash],
                )?;
                if row.is_none() {
                    applied.outcome.names_taken.push(user.clone());
                    continue;
                }
                // Nothing of an earlier owner of the name (rows a race may have left) carries over.
                tx.execute("DELETE FROM subscriptions WHERE follower = $1 OR followed = $1", &[user])?;
                for r in
                    tx.query("DELETE FROM sessions WHERE user_name = $1 RETURNING node, token", &[user])?
                {
                    if let (Some(node), Some(t)) = (r.get::<_, Option<i64>>(0), token_of(r.get(1))) {
                        out.ended(node, t);
                    }
                }
                out.change(|created, _, _, _, _| created.push(user.clone()));
            }
            Write::DeleteAccount { user } => {
                if let Some(r) = tx.query_opt("DELETE FROM accounts WHERE name = $1 RETURNING id", &[user])? {
                    tx.execute("DELETE FROM inbox WHERE account = $1", &[&r.get::<_, i64>(0)])?;
                }
                tx.execute("DELETE FROM subscriptions WHERE follower = $1 OR followed = $1", &[user])?;
                for r in
                    tx.query("DELETE FROM sessions WHERE user_name = $1 RETURNING node, token", &[user])?
                {
                    if let (Some(node), Some(t)) = (r.get::<_, Option<i64>>(0), token_of(r.get(1))) {
                        out.ended(node, t);
                    }
                }
                out.change(|_, deleted, _, _, all| {
                    deleted.push(user.clone());
                    *all = true;
                });
            }
            Write::SetPassword { user, password_hash } => {
                tx.execute("UPDATE accounts SET password_hash = $2 WHERE name = $1", &[user, password_hash])?;
                for r in
                    tx.query("DELETE FROM sessions WHERE user_name = $1 RETURNING node, token", &[user])?
                {
                    if let (Some(node), Some(t)) = (r.get::<_, Option<i64>>(0), token_of(r.get(1))) {
                        out.ended(node, t);
                    }
                }
                out.change(|_, _, changed, _, _| changed.push(user.clone()));
            }
            Write::Subscribe { follower, followed } => {
                tx.execute(
                    "INSERT INTO subscriptions (follower, followed) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[follower, followed],
                )?;
                out.change(|_, _, _, of, _| of.push(followed.clone()));
            }
            Write::Unsubscribe { follower, followed } => {
                tx.execute(
                    "DELETE FROM subscriptions WHERE follower = $1 AND followed = $2",
                    &[follower, followed],
                )?;
                out.change(|_, _, _, of, _| of.push(followed.clone()));
            }
            Write::OpenSession { token, user } => {
                let node = (me > 0).then_some(me);
                let row = tx.query_opt(
                    "INSERT INTO sessions (token, user_name, account, node, epoch) \
                     SELECT $1, $2, a.id, $3, $4 FROM accounts a WHERE a.name = $2 \
                     ON CONFLICT (token) DO NOTHING RETURNING account",
                    &[&&token.0[..], user, &node, &epoch],
                )?;
                match row {
                    Some(r) => {
                        applied.opened.insert(r.get(0), user.clone());
                    }
                    // The account went meanwhile (deleted on another node): so does the session.
                    None => applied.outcome.remote.push(Remote::Ended(vec![*token])),
                }
            }
            Write::CloseSession { token } => {
                // Only if it is still ours: another node may have taken it over.
                tx.execute(
                    "DELETE FROM sessions WHERE token = $1 AND node IS NOT DISTINCT FROM $2",
                    &[&&token.0[..], &(me > 0).then_some(me)],
                )?;
            }
            Write::StoreMessage { .. }
            | Write::LastReply { .. }
            | Write::Delivered { .. }
            | Write::KnownAddresses { .. } => {
                unreachable!("gathered above")
            }
        }
    }
    if !bulk.is_empty() {
        bulk.flush(tx, st, me)?;
    }
    // Where the batch's messages go: the nodes holding sessions of their recipients. This runs
    // after the inserts above, so the transaction has its id by now (see the module docs).
    if !posted.is_empty() {
        let mut all: Vec<i64> = posted.iter().flat_map(|(_, r)| r.iter().map(|a| *a as i64)).collect();
        all.sort_unstable();
        all.dedup();
        let rows = st.query(
            tx,
            "SELECT DISTINCT node, user_name, account FROM sessions \
             WHERE account = ANY($1) AND node IS NOT NULL AND node <> $2",
            &[&all, &me],
        )?;
        // node → account → name
        let mut held: BTreeMap<i64, HashMap<u64, String>> = BTreeMap::new();
        for r in rows {
            held.entry(r.get(0)).or_default().insert(r.get::<_, i64>(2) as u64, r.get(1));
        }
        for (node, accounts) in held {
            let mut messages = Vec::new();
            for (m, recipients) in &posted {
                let here: Vec<(String, u64)> =
                    recipients.iter().filter_map(|a| accounts.get(a).map(|n| (n.clone(), *a))).collect();
                if !here.is_empty() {
                    messages.push((m.clone(), here));
                }
            }
            if !messages.is_empty() {
                out.to.entry(node).or_default().push(Remote::Messages(messages));
            }
        }
    }
    // One event row and one notification per target node (and one broadcast) per batch.
    let mut nodes: Vec<Option<i64>> = Vec::new();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    let mut channels: Vec<String> = Vec::new();
    for (node, events) in std::mem::take(&mut out.to) {
        if node == me {
            continue;
        }
        nodes.push(Some(node));
        bodies.push(encode_events(&events));
        channels.push(channel(node));
    }
    if let Some(c) = out.changed.take() {
        nodes.push(None);
        bodies.push(encode_events(&[c]));
        channels.push(BROADCAST_CHANNEL.to_string());
    }
    // The batch's marker (see `PgStore::commit`), its events and their notifications in one
    // statement: a round trip costs more than any of them on a busy machine.
    if me > 0 {
        st.execute(
            tx,
            "WITH marker AS (INSERT INTO node_batches (node, epoch, batch) VALUES ($4, $5, $6) \
                 ON CONFLICT (node) DO UPDATE SET epoch = EXCLUDED.epoch, batch = EXCLUDED.batch), \
             ev AS (INSERT INTO events (node, origin, body) \
                 SELECT n, $4, b FROM unnest($1::int8[], $2::bytea[]) AS v(n, b)) \
             SELECT pg_notify(c, '') FROM unnest($3::text[]) c",
            &[&nodes, &bodies, &channels, &me, &epoch, &marker],
        )?;
    } else if !nodes.is_empty() {
        st.execute(
            tx,
            "WITH ev AS (INSERT INTO events (node, origin, body) \
                 SELECT n, NULL::int8, b FROM unnest($1::int8[], $2::bytea[]) AS v(n, b)) \
             SELECT pg_notify(c, '') FROM unnest($3::text[]) c",
            &[&nodes, &bodies, &channels],
        )?;
    }
    Ok(applied)
}

impl Store for PgStore {
    fn begin_epoch(&mut self) -> Result<u32, StoreError> {
        let Role::Node { name, listen, .. } = self.role.clone() else {
            return Err(StoreError("an admin connection does not start a daemon".into()));
        };
        self.lock_name(&name)?;
        let pid = i64::from(std::process::id());
        let (id, epoch) = self.with("register the node", |c| {
            let r = c.query_one(
                "INSERT INTO nodes (name, listen, pid, epoch) VALUES ($1, $2, $3, nextval('udpmsg_epochs')) \
                 ON CONFLICT (name) DO UPDATE SET listen = EXCLUDED.listen, pid = EXCLUDED.pid, \
                     epoch = EXCLUDED.epoch, started = now(), heartbeat = now(), stopped = false \
                 RETURNING id, epoch",
                &[&name, &listen, &pid],
            )?;
            Ok((r.get::<_, i64>(0), r.get::<_, i64>(1)))
        })?;
        if id > MAX_NODE {
            return Err(StoreError(format!(
                "node {name:?} would be number {id}, above the {MAX_NODE} a database can hold; reuse the name of a \
                 node that is gone"
            )));
        }
        if epoch > i64::from(u32::MAX) {
            return Err(StoreError("the epoch sequence is exhausted".into()));
        }
        self.role = Role::Node { id, name: name.clone(), listen, epoch };
        log::info!("node {name:?} is number {id} on {}, epoch {epoch}", self.describe());
        Ok(epoch as u32)
    }

    fn load(&mut self) -> Result<Startup, StoreError> {
        self.ready()?;
        let (me, epoch) = match self.role {
            Role::Node { id, epoch, .. } => (id, epoch),
            Role::Admin => (0, 0),
        };
        let (sessions, max_id, accounts) = self.with("load", |c| {
            let rows = c.query(
                "SELECT s.token, s.user_name, a.id, a.last_delivered, \
                     GREATEST(0, extract(epoch FROM now() - s.created))::int8, s.last_request_id, s.last_reply \
                 FROM sessions s JOIN accounts a ON a.id = s.account WHERE s.node = $1",
                &[&me],
            )?;
            let sessions: Vec<StoredSession> = rows
                .iter()
                .filter_map(|r| {
                    Some(StoredSession {
                        token: token_of(r.get(0))?,
                        user: r.get(1),
                        user_id: r.get::<_, i64>(2) as u64,
                        last_delivered: r.get::<_, i64>(3) as u64,
                        age_secs: r.get::<_, i64>(4).max(0) as u64,
                        last_reply: r
                            .get::<_, Option<i64>>(5)
                            .zip(r.get::<_, Option<Vec<u8>>>(6))
                            .map(|(id, b)| (id as u64, b)),
                    })
                })
                .collect();
            let max_id: i64 = c.query_one("SELECT COALESCE(max(id), 0) FROM messages", &[])?.get(0);
            let accounts: i64 = c.query_one("SELECT count(*) FROM accounts", &[])?.get(0);
            Ok((sessions, max_id, accounts))
        })?;
        Ok(Startup {
            sessions,
            next_message_id: max_id as u64 + 1,
            accounts: accounts as u64,
            epoch: epoch as u32,
            node: (me > 0).then_some(me as u16),
        })
    }

    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        self.outcome = CommitOutcome::default();
        self.ready()?;
        self.batch += 1;
        let marker = self.batch;
        let (me, epoch) = match self.role {
            Role::Node { id, epoch, .. } => (id, epoch),
            Role::Admin => (0, 0),
        };
        let mut tries = 0;
        let applied = loop {
            tries += 1;
            let result = self.with_stmts("commit", |c, st| {
                let mut tx = c.transaction()?;
                let applied = apply(&mut tx, st, batch, me, epoch, marker)?;
                tx.commit()?;
                Ok(applied)
            });
            match result {
                Ok(a) => break a,
                // The connection went during the transaction (PostgreSQL restarted, or ended
                // it). If its COMMIT got through, the marker says so and the batch is stored
                // (what it would have told the core is lost; the events it wrote tell the
                // other nodes all the same). If not, nothing of it is, and it is tried once
                // more on a new connection: the core need not hear of a connection that was
                // already gone when the batch came (admin batches only hold writes that are
                // the same done twice).
                Err(e) if self.conn.client.is_none() => {
                    if me > 0 {
                        match self.batch_stored(marker) {
                            Ok(true) => {
                                self.recovered_commits += 1;
                                log::warn!("the connection was lost at COMMIT; batch {marker} is stored");
                                break Applied::default();
                            }
                            Ok(false) if tries < 2 => continue,
                            _ => return Err(e),
                        }
                    }
                    if tries < 2 && self.ready().is_ok() {
                        continue;
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        };
        for (account, n) in applied.delivered {
            *self.trim.entry(account).or_default() += n;
        }
        self.outcome = applied.outcome;
        if !applied.opened.is_empty() {
            // A commit elsewhere may have routed messages for these users before our sessions
            // were visible: read them once those transactions are done.
            let late =
                self.wait_for_concurrent().and_then(|xids| self.late_deliveries(&xids, &applied.opened));
            match late {
                Ok(late) if !late.is_empty() => self.outcome.remote.push(Remote::Messages(late)),
                Ok(_) => {}
                Err(e) => log::warn!("cannot look for messages routed during a login: {e}"),
            }
        }
        Ok(())
    }

    fn read(&mut self, read: &Read) -> Result<ReadResult, StoreError> {
        self.ready()?;
        match self.answer(read) {
            // A connection found gone: once more on a new one (reads change nothing, and a
            // claim done twice is the same claim).
            Err(_) if self.conn.client.is_none() => {
                self.ready()?;
                self.answer(read)
            }
            other => other,
        }
    }

    fn maintain(&mut self, _budget: Duration) -> Result<bool, StoreError> {
        if self.node_id() == 0 {
            return Ok(false);
        }
        self.ready()?;
        self.upkeep()
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let me = self.node_id();
        if me == 0 {
            return Ok(());
        }
        self.ready()?;
        self.with("mark the node stopped", |c| {
            c.execute("UPDATE nodes SET stopped = true, heartbeat = now() WHERE id = $1", &[&me])
        })?;
        Ok(())
    }

    fn commit_outcome(&mut self) -> CommitOutcome {
        std::mem::take(&mut self.outcome)
    }

    fn survives_outages(&self) -> bool {
        true
    }
}

/// A node's second connection: it `LISTEN`s for its events, reads them with its snapshot
/// cursor, and sends the node's heartbeat. Runs on a thread of its own.
pub struct Listener {
    conn: Conn,
    node: i64,
    /// The snapshot of the last read (text form): rows visible in it were read.
    cursor: Option<String>,
    listening: bool,
    next_heartbeat: Instant,
    next_census: Instant,
    /// Nodes with a recent heartbeat (live), and all registered nodes, as last counted.
    pub nodes: (u64, u64),
    /// Counters for metrics.
    pub reconnects: u64,
    pub notifications: u64,
    pub reads: u64,
    pub events: u64,
}

/// How often the listener reads without a notification, and sends a heartbeat.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// A node whose last heartbeat is older than this is listed as down.
pub const LIVE_SECS: u64 = 5;
/// How often the listener counts the live nodes (for metrics).
const CENSUS_EVERY: Duration = Duration::from_secs(5);

impl Listener {
    /// Connects and takes the starting cursor: events committed from now on are this node's
    /// to read (what came before is read as catch-up by the sessions themselves). Call before
    /// [`Store::load`].
    pub fn start(config: Config, node: i64) -> Result<Listener, StoreError> {
        let mut l = Listener {
            conn: Conn::new(config),
            node,
            cursor: None,
            listening: false,
            next_heartbeat: Instant::now(),
            next_census: Instant::now(),
            nodes: (0, 0),
            reconnects: 0,
            notifications: 0,
            reads: 0,
            events: 0,
        };
        l.connect()?;
        Ok(l)
    }

    fn connect(&mut self) -> Result<(), StoreError> {
        let mut fresh = false;
        let node = self.node;
        let c = self.conn.get(&mut fresh)?;
        if fresh || !self.listening {
            let r = c.batch_execute(&format!("LISTEN {}; LISTEN {BROADCAST_CHANNEL};", channel(node)));
            if let Err(e) = r {
                self.conn.check();
                return Err(pg("listen", e));
            }
            if fresh && self.cursor.is_some() {
                self.reconnects += 1;
            }
            self.listening = true;
        }
        if self.cursor.is_none() {
            let c = self.conn.get(&mut fresh)?;
            match c.query_one("SELECT pg_current_snapshot()::text", &[]) {
                Ok(r) => self.cursor = Some(r.get(0)),
                Err(e) => {
                    self.conn.check();
                    return Err(pg("read the snapshot", e));
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for a notification (returning early when one comes), sends the
    /// heartbeat when due, and reads the events committed since the last read. On a lost
    /// connection it reconnects (with backoff) and reads at once: what a notification would
    /// have said while it was away is in the rows.
    pub fn poll(&mut self, timeout: Duration, sessions: u64) -> Result<Vec<Remote>, StoreError> {
        if self.conn.client.is_none() || self.conn.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.listening = false;
            if let Err(e) = self.connect() {
                std::thread::sleep(timeout.min(Duration::from_millis(100)));
                return Err(e);
            }
        } else {
            let failed = {
                let c = self.conn.client.as_mut().expect("connected");
                let mut n = c.notifications();
                let mut count = 0;
                let first = n.timeout_iter(timeout).next().map(|x| x.is_some());
                let failed = match first {
                    Ok(true) => {
                        count += 1;
                        // Several at once are one read.
                        while let Ok(Some(_)) = n.iter().next() {
                            count += 1;
                        }
                        None
                    }
                    Ok(false) => None,
                    Err(e) => Some(e),
                };
                self.notifications += count;
                failed
            };
            if let Some(e) = failed {
                self.conn.check();
                self.listening = false;
                return Err(pg("wait for notifications", e));
            }
        }
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + POLL_EVERY;
            let node = self.node;
            let sessions = sessions as i64;
            let mut fresh = false;
            let c = self.conn.get(&mut fresh)?;
            if let Err(e) = c.execute(
                "UPDATE nodes SET heartbeat = now(), sessions = $2 WHERE id = $1",
                &[&node, &sessions],
            ) {
                self.conn.check();
                return Err(pg("heartbeat", e));
            }
        }
        if now >= self.next_census {
            self.next_census = now + CENSUS_EVERY;
            let mut fresh = false;
            let c = self.conn.get(&mut fresh)?;
            let live = format!("{}", LIVE_SECS);
            match c.query_one(
                "SELECT count(*) FILTER (WHERE NOT stopped AND heartbeat > now() - ($1 || ' seconds')::interval), \
                     count(*) FROM nodes",
                &[&live],
            ) {
                Ok(r) => self.nodes = (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64),
                Err(e) => {
                    self.conn.check();
                    return Err(pg("count the nodes", e));
                }
            }
        }
        self.read_events()
    }

    /// The events committed since the cursor's snapshot, and the new cursor: one statement, so
    /// the rows and the snapshot they are read with are the same.
    fn read_events(&mut self) -> Result<Vec<Remote>, StoreError> {
        let Some(cursor) = self.cursor.clone() else { return Ok(Vec::new()) };
        let node = self.node;
        let mut fresh = false;
        let c = self.conn.get(&mut fresh)?;
        let rows = c.query(
            "WITH s AS (SELECT pg_current_snapshot() AS snap, $2::text::pg_snapshot AS prev) \
             SELECT s.snap::text, e.body FROM s LEFT JOIN events e \
                 ON (e.node = $1 OR (e.node IS NULL AND e.origin IS DISTINCT FROM $1)) \
                 AND e.xid >= pg_snapshot_xmin(s.prev) AND NOT pg_visible_in_snapshot(e.xid, s.prev) \
             ORDER BY e.id",
            &[&node, &cursor],
        );
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                self.conn.check();
                return Err(pg("read events", e));
            }
        };
        self.reads += 1;
        let mut out = Vec::new();
        for r in &rows {
            if let Some(body) = r.get::<_, Option<&[u8]>>(1) {
                self.events += 1;
                out.extend(decode_events(body));
            }
        }
        if let Some(r) = rows.first() {
            self.cursor = Some(r.get(0));
        }
        Ok(out)
    }

    /// Cuts the connection (tests: a notification lost on purpose).
    pub fn disconnect(&mut self) {
        self.conn.client = None;
        self.listening = false;
    }
}

/// The tokens of a set, for tests and logs.
pub fn tokens(events: &[Remote]) -> BTreeSet<[u8; 16]> {
    let mut out = BTreeSet::new();
    for e in events {
        if let Remote::Moved(t) | Remote::Ended(t) = e {
            out.extend(t.iter().map(|t| t.0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_settings_come_from_the_url_then_the_environment() {
        let env = |k: &str| match k {
            "PGHOST" => Some("/run/pg".to_string()),
            "PGUSER" => Some("alice".to_string()),
            "PGPASSWORD" => Some("from-env".to_string()),
            "PGDATABASE" => Some("db".to_string()),
            "PGPORT" => Some("5433".to_string()),
            _ => None,
        };
        let c = connect_config_from("", None, env).unwrap();
        assert_eq!(c.get_user(), Some("alice"));
        assert_eq!(c.get_dbname(), Some("db"));
        assert_eq!(c.get_ports(), &[5433]);
        assert_eq!(c.get_password(), Some(&b"from-env"[..]));
        let d = describe(&c);
        assert!(d.contains("alice@/run/pg:5433/db") && !d.contains("from-env"), "{d}");

        let c = connect_config_from("postgres://bob@127.0.0.1:6000/x", None, env).unwrap();
        assert_eq!((c.get_user(), c.get_dbname(), c.get_ports()), (Some("bob"), Some("x"), &[6000][..]));
        assert_eq!(c.get_password(), Some(&b"from-env"[..]), "a password missing from the URL");

        let dir = std::env::temp_dir().join(format!("udpmsg-pgpass-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let c = connect_config_from("host=h user=u", Some(&dir), env).unwrap();
        assert_eq!(c.get_password(), Some(&b"from-file"[..]), "the file wins over PGPASSWORD");
        let _ = std::fs::remove_file(&dir);

        let e = connect_config_from("postgres://u:secret@h:notaport/x", None, env).err().unwrap();
        assert!(!e.0.contains("secret"), "the URL is never repeated: {e}");
        let e = connect_config_from("", Some(Path::new("/nonexistent/pw")), env).err().unwrap();
        assert!(e.0.contains("/nonexistent/pw"), "{e}");
    }

    #[test]
    fn events_round_trip_and_damaged_rows_are_skipped() {
        let events = vec![
            Remote::Moved(vec![Token([1; 16])]),
            Remote::Messages(vec![(
                Message { id: 5, time: 6, author: "a".into(), to: None, text: "hi".into() },
                vec![("b".into(), 2)],
            )]),
        ];
        assert_eq!(decode_events(&encode_events(&events)), events);
        assert!(decode_events(&[0xff, 0xff, 0xff]).is_empty());
        assert_eq!(tokens(&events).len(), 1);
    }

    #[test]
    fn relations_merge_in_name_order() {
        let r = crate::store::merge_relations(vec!["a".into(), "c".into()], vec!["b".into(), "c".into()], 10);
        let got: Vec<(String, bool, bool)> =
            r.into_iter().map(|r| (r.user, r.following, r.follower)).collect();
        assert_eq!(got, vec![("a".into(), true, false), ("b".into(), false, true), ("c".into(), true, true)]);
    }
}

#[cfg(test)]
#[path = "../bin/common/pg_temp.rs"]
mod pg_temp;

/// Against a real PostgreSQL (a temporary server; skipped, saying so, where none is installed,
/// and failed under `CI=true`).
#[cfg(test)]
mod db_tests {
    use super::pg_temp;
    use super::*;

    fn msg(id: u64, author: &str) -> Message {
        Message { id, time: 7, author: author.into(), to: None, text: format!("m{id}") }
    }

    fn create(name: &str) -> Write {
        Write::CreateAccount { user: name.into(), password_hash: format!("hash-{name}") }
    }

    fn node(pg: &pg_temp::TempPg, db: &str, name: &str) -> PgStore {
        let mut s = PgStore::open_node(pg.config(db), name, "127.0.0.1:1", 100, 300).unwrap();
        s.begin_epoch().unwrap();
        s
    }

    fn account(s: &mut PgStore, name: &str) -> Option<AccountRecord> {
        match s.read(&Read::Account { name: name.into() }).unwrap() {
            ReadResult::Account(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn inbox(s: &mut PgStore, id: u64) -> Vec<u64> {
        match s.read(&Read::Inbox { id, count: 1000, before: None, above: None }).unwrap() {
            ReadResult::Inbox { messages, .. } => messages.iter().map(|m| m.id).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// Polls `l` until `pred` holds for what it returned (at most 5 s).
    fn wait_events(l: &mut Listener, pred: impl Fn(&[Remote]) -> bool) -> Vec<Remote> {
        let end = Instant::now() + Duration::from_secs(5);
        let mut all = Vec::new();
        while Instant::now() < end {
            all.extend(l.poll(Duration::from_millis(200), 0).unwrap());
            if pred(&all) {
                return all;
            }
        }
        panic!("events never satisfied the test: {all:?}");
    }

    #[test]
    fn one_node_stores_reads_and_refuses_a_newer_schema() {
        let Some(pg) = pg_temp::for_test("store") else { return };
        pg.create_db("one").unwrap();
        let mut s = node(&pg, "one", "a");
        let start = s.load().unwrap();
        assert_eq!((start.accounts, start.sessions.len(), start.node), (0, 0, Some(1)));
        s.commit(&[create("alice"), create("bob"), create("carol")]).unwrap();
        s.commit(&[
            Write::Subscribe { follower: "bob".into(), followed: "alice".into() },
            Write::Subscribe { follower: "carol".into(), followed: "alice".into() },
            Write::Subscribe { follower: "bob".into(), followed: "carol".into() },
        ])
        .unwrap();
        let (a, b) = (account(&mut s, "alice").unwrap(), account(&mut s, "bob").unwrap());
        assert_eq!(a.password_hash, "hash-alice");
        assert_ne!(a.id, b.id);
        match s.read(&Read::Followers { name: "alice".into() }).unwrap() {
            ReadResult::Followers(mut f) => {
                f.sort();
                assert_eq!(f.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["bob", "carol"]);
            }
            other => panic!("{other:?}"),
        }
        match s.read(&Read::Follows { follower: "bob".into(), followed: "carol".into() }).unwrap() {
            ReadResult::Follows { follows, following } => assert_eq!((follows, following), (true, 2)),
            other => panic!("{other:?}"),
        }
        // Posts, interleaved with session writes in one batch.
        let token = Token([3; 16]);
        s.commit(&[Write::OpenSession { token, user: "bob".into() }]).unwrap();
        let mut batch = Vec::new();
        for id in 1..=5u64 {
            batch.push(Write::StoreMessage { message: msg(id, "alice"), recipients: vec![b.id] });
            batch.push(Write::LastReply { token, request_id: id, reply: vec![id as u8] });
        }
        batch.push(Write::StoreMessage { message: msg(6, "alice"), recipients: vec![] });
        batch.push(Write::Delivered { user: "bob".into(), up_to: 3 });
        s.commit(&batch).unwrap();
        assert_eq!(inbox(&mut s, b.id), vec![1, 2, 3, 4, 5]);
        match s.read(&Read::Inbox { id: b.id, count: 2, before: Some(5), above: Some(2) }).unwrap() {
            ReadResult::Inbox { messages, above } => {
                assert_eq!(messages.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3, 4]);
                assert_eq!(messages[0], msg(3, "alice"));
                assert_eq!(above, 3);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(account(&mut s, "bob").unwrap().last_delivered, 3);
        let start = s.load().unwrap();
        assert_eq!(start.sessions.len(), 1);
        assert_eq!(start.sessions[0].last_reply, Some((5, vec![5])));
        assert_eq!(start.next_message_id, 6, "one more than the highest stored");
        assert_eq!(s.names("", 10).unwrap(), vec!["alice", "bob", "carol"]);
        assert_eq!(s.names("alice", 1).unwrap(), vec!["bob"]);
        match s.read(&Read::Relations { name: "carol".into(), after: String::new(), limit: 10 }).unwrap() {
            ReadResult::Relations(r) => {
                let got: Vec<_> = r.into_iter().map(|r| (r.user, r.following, r.follower)).collect();
                assert_eq!(got, vec![("alice".to_string(), true, false), ("bob".to_string(), false, true)]);
            }
            other => panic!("{other:?}"),
        }

        // A failed batch leaves nothing: the second message 1 breaks the primary key.
        let r =
            s.commit(&[create("dave"), Write::StoreMessage { message: msg(1, "x"), recipients: vec![b.id] }]);
        assert!(r.is_err());
        assert!(account(&mut s, "dave").is_none());
        s.commit(&[create("erin")]).unwrap();
        assert!(account(&mut s, "erin").is_some(), "writes go on after a failed batch");

        // Deletion: inbox, sessions and subscriptions go; ids are not reused.
        s.commit(&[Write::DeleteAccount { user: "bob".into() }]).unwrap();
        assert!(inbox(&mut s, b.id).is_empty());
        assert!(s.load().unwrap().sessions.is_empty());
        s.commit(&[create("bob")]).unwrap();
        let b2 = account(&mut s, "bob").unwrap();
        assert_ne!(b2.id, b.id);
        assert!(inbox(&mut s, b2.id).is_empty(), "the new bob inherits nothing");
        match s.read(&Read::Relations { name: "bob".into(), after: String::new(), limit: 10 }).unwrap() {
            ReadResult::Relations(r) => assert!(r.is_empty(), "{r:?}"),
            other => panic!("{other:?}"),
        }
        // Messages no inbox holds any more are collected by the upkeep.
        let mut more = true;
        for _ in 0..100 {
            s.next_sweep = Instant::now() + Duration::from_secs(60);
            more = s.maintain(Duration::from_millis(1)).unwrap();
            if !more {
                break;
            }
        }
        assert!(!more);
        let left: i64 = s.with("t", |c| c.query_one("SELECT count(*) FROM messages", &[])).unwrap().get(0);
        assert_eq!(left, 0, "every message went with bob's inbox");
        s.flush().unwrap();
        drop(s);

        // Reopened: the same node number, a later epoch.
        let mut again = PgStore::open_node(pg.config("one"), "a", "x", 100, 300).unwrap();
        let e1 = again.begin_epoch().unwrap();
        assert_eq!(again.node_id(), 1);
        assert!(e1 > 1);
        // A newer schema is refused, naming both versions.
        again
            .with("t", |c| c.execute("UPDATE udpmsg_meta SET value = 99 WHERE key = 'schema_version'", &[]))
            .unwrap();
        let e = PgStore::open_node(pg.config("one"), "b", "x", 100, 300).err().unwrap();
        assert!(e.0.contains("schema version 99") && e.0.contains("up to version 1"), "{e}");
    }

    /// A post routed while a login on another node commits: the routing statement saw no
    /// session, the new session's catch-up was read before the post committed. The login's
    /// commit waits for the post's transaction and hands its message over all the same.
    #[test]
    fn a_post_routed_during_a_login_elsewhere_still_reaches_the_new_session() {
        let Some(pg) = pg_temp::for_test("late") else { return };
        pg.create_db("late").unwrap();
        let mut a = node(&pg, "late", "a");
        let mut b = node(&pg, "late", "b");
        a.commit(&[create("alice"), create("bob")]).unwrap();
        let bob = account(&mut a, "bob").unwrap().id;
        // a's batch, applied and routed (no session of bob anywhere yet), not committed.
        let mut raw = pg.client("late").unwrap();
        let mut tx = raw.transaction().unwrap();
        let id = (recent_id_floor(std::time::SystemTime::now()) as u64 | 1) + (200 << 30);
        let routed = apply(
            &mut tx,
            &mut Stmts::default(),
            &[Write::StoreMessage { message: msg(id, "alice"), recipients: vec![bob] }],
            1,
            1,
            99,
        )
        .unwrap();
        assert!(routed.outcome.remote.is_empty());
        // bob logs in on b meanwhile; b's commit waits for a's transaction to end.
        let login = std::thread::spawn(move || {
            b.commit(&[Write::OpenSession { token: Token([5; 16]), user: "bob".into() }]).unwrap();
            b.commit_outcome()
        });
        std::thread::sleep(Duration::from_millis(200));
        tx.commit().unwrap();
        let outcome = login.join().unwrap();
        assert_eq!(
            outcome.remote,
            vec![Remote::Messages(vec![(msg(id, "alice"), vec![("bob".to_string(), bob)])])],
            "the message routed past the new session is handed to it"
        );
    }

    #[test]
    fn nodes_race_move_sessions_and_hear_each_other() {
        let Some(pg) = pg_temp::for_test("nodes") else { return };
        pg.create_db("many").unwrap();
        let mut a = node(&pg, "many", "a");
        let mut b = node(&pg, "many", "b");
        assert_eq!((a.node_id(), b.node_id()), (1, 2));
        let e = PgStore::open_node(pg.config("many"), "a", "x", 100, 300).and_then(|mut s| s.begin_epoch());
        assert!(e.err().unwrap().0.contains("another udpmsgd named \"a\""), "one daemon per name");
        // A holder of a name whose heartbeats stopped long ago (its host died; PostgreSQL has
        // not noticed its connection is gone) is ended, and the name taken over.
        let mut ghost = node(&pg, "many", "ghost");
        ghost
            .with("t", |c| {
                c.execute(
                    "UPDATE nodes SET heartbeat = now() - interval '1 minute' WHERE name = 'ghost'",
                    &[],
                )
            })
            .unwrap();
        let mut heir = PgStore::open_node(pg.config("many"), "ghost", "x", 100, 300).unwrap();
        heir.begin_epoch().unwrap();
        assert_eq!(heir.node_id(), ghost.node_id());
        assert!(
            ghost.commit(&[create("zed")]).is_err(),
            "the ghost's connection was ended and its name is gone"
        );
        let mut la = Listener::start(a.config(), a.node_id()).unwrap();
        let mut lb = Listener::start(b.config(), b.node_id()).unwrap();

        // One name registered on two nodes: one winner.
        a.commit(&[create("carol")]).unwrap();
        assert!(a.commit_outcome().names_taken.is_empty());
        b.commit(&[create("carol"), create("dan")]).unwrap();
        assert_eq!(b.commit_outcome().names_taken, vec!["carol".to_string()]);
        assert_eq!(account(&mut b, "carol").unwrap().password_hash, "hash-carol");
        // Each hears of the other's accounts (a broadcast), not of its own.
        let got = wait_events(&mut la, |e| {
            e.iter()
                .any(|e| matches!(e, Remote::Changed { created, .. } if created.contains(&"dan".to_string())))
        });
        assert!(
            !got.iter().any(
                |e| matches!(e, Remote::Changed { created, .. } if created.contains(&"carol".to_string()))
            ),
            "{got:?}"
        );

        // dan's session on b; carol posts on a: b hears of it, with dan as its recipient.
        let dan = account(&mut a, "dan").unwrap();
        let t = Token([9; 16]);
        b.commit(&[Write::OpenSession { token: t, user: "dan".into() }]).unwrap();
        a.commit(&[Write::StoreMessage { message: msg(1 << 10 | 1, "carol"), recipients: vec![dan.id] }])
            .unwrap();
        let got = wait_events(&mut lb, |e| e.iter().any(|e| matches!(e, Remote::Messages(_))));
        let delivered: Vec<_> = got
            .iter()
            .filter_map(|e| if let Remote::Messages(m) = e { Some(m.clone()) } else { None })
            .flatten()
            .collect();
        assert_eq!(delivered, vec![(msg(1 << 10 | 1, "carol"), vec![("dan".to_string(), dan.id)])]);
        // Nothing for a: no recipient of its own.
        let quiet = la.poll(Duration::from_millis(100), 0).unwrap();
        assert!(!quiet.iter().any(|e| matches!(e, Remote::Messages(_))), "{quiet:?}");

        // A notification lost on purpose: the listener's connection is cut before the commit;
        // the message arrives all the same, through the cursor, once it is back.
        lb.disconnect();
        a.commit(&[Write::StoreMessage { message: msg(2 << 10 | 1, "carol"), recipients: vec![dan.id] }])
            .unwrap();
        let got = wait_events(&mut lb, |e| e.iter().any(|e| matches!(e, Remote::Messages(_))));
        assert!(got.iter().any(|e| matches!(e, Remote::Messages(m) if m[0].0.id == 2 << 10 | 1)), "{got:?}");

        // a takes dan's session over: b is told, a gets a higher epoch and the catch-up.
        let epoch_b = b.load().unwrap().epoch;
        let claimed = match a.read(&Read::Claim { token: t, catch_up: 10 }).unwrap() {
            ReadResult::Claimed(Some(c)) => c,
            other => panic!("{other:?}"),
        };
        assert_eq!(claimed.session.user, "dan");
        assert!(claimed.epoch > epoch_b, "{} > {epoch_b}", claimed.epoch);
        assert_eq!(claimed.catch_up.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1 << 10 | 1, 2 << 10 | 1]);
        let got = wait_events(&mut lb, |e| e.iter().any(|e| matches!(e, Remote::Moved(_))));
        assert_eq!(tokens(&got), [t.0].into_iter().collect());
        // b's late writes for it change nothing: it is a's.
        b.commit(&[
            Write::LastReply { token: t, request_id: 99, reply: vec![1] },
            Write::CloseSession { token: t },
        ])
        .unwrap();
        let held = a.load().unwrap().sessions;
        assert_eq!(held.len(), 1, "still a's");
        assert_ne!(held[0].last_reply.as_ref().map(|r| r.0), Some(99));
        assert!(b.load().unwrap().sessions.is_empty());
        // An unknown token claims nothing.
        assert_eq!(
            b.read(&Read::Claim { token: Token([1; 16]), catch_up: 10 }).unwrap(),
            ReadResult::Claimed(None)
        );

        // Deleting dan on b (an admin command works the same) ends the session on a.
        let mut admin = PgStore::open_admin(pg.config("many"), 100).unwrap();
        admin.commit(&[Write::DeleteAccount { user: "dan".into() }]).unwrap();
        let got = wait_events(&mut la, |e| e.iter().any(|e| matches!(e, Remote::Ended(_))));
        assert_eq!(tokens(&got), [t.0].into_iter().collect());
        let nodes = admin.nodes().unwrap();
        assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), vec!["a", "b", "ghost"]);
        assert!(nodes.iter().all(|n| n.heartbeat_age_secs < 30.0 && !n.stopped), "{nodes:?}");
    }
}

/// How long a message committed on one node takes to reach another node's listener (commit,
/// NOTIFY, cursor read), measured on a throwaway PostgreSQL:
/// `cargo test --release --lib notify_latency -- --ignored --nocapture`.
#[cfg(test)]
mod latency {
    use super::pg_temp;
    use super::*;

    #[test]
    #[ignore = "a measurement, not a check: run it by name"]
    fn notify_latency() {
        let Some(pg) = pg_temp::for_test("latency") else { return };
        pg.create_db("lat").unwrap();
        let open = |name: &str| {
            let mut s = PgStore::open_node(pg.config("lat"), name, "x", 1000, 300).unwrap();
            s.begin_epoch().unwrap();
            s
        };
        let (mut a, mut b) = (open("a"), open("b"));
        a.commit(&[Write::CreateAccount { user: "u".into(), password_hash: "h".into() }]).unwrap();
        let id = match a.read(&Read::Account { name: "u".into() }).unwrap() {
            ReadResult::Account(Some(acc)) => acc.id,
            other => panic!("{other:?}"),
        };
        b.commit(&[Write::OpenSession { token: Token([1; 16]), user: "u".into() }]).unwrap();
        let mut l = Listener::start(b.config(), b.node_id()).unwrap();
        let mut samples = Vec::new();
        for n in 1..=500u64 {
            let message =
                Message { id: n << 10 | 1, time: 0, author: "u".into(), to: None, text: "x".into() };
            let t = Instant::now();
            a.commit(&[Write::StoreMessage { message, recipients: vec![id] }]).unwrap();
            let committed = t.elapsed();
            loop {
                let got = l.poll(Duration::from_secs(2), 1).unwrap();
                if got.iter().any(|e| matches!(e, Remote::Messages(_))) {
                    break;
                }
            }
            samples.push((committed, t.elapsed()));
        }
        let pct = |v: &mut Vec<Duration>, p: f64| {
            v.sort();
            v[((v.len() - 1) as f64 * p) as usize]
        };
        let mut commit: Vec<Duration> = samples.iter().map(|s| s.0).collect();
        let mut total: Vec<Duration> = samples.iter().map(|s| s.1).collect();
        println!(
            "commit p50 {:?} p99 {:?}; commit to the other node's listener p50 {:?} p99 {:?} max {:?} ({} notifications, {} reads)",
            pct(&mut commit, 0.5),
            pct(&mut commit, 0.99),
            pct(&mut total, 0.5),
            pct(&mut total, 0.99),
            pct(&mut total, 1.0),
            l.notifications,
            l.reads
        );
    }
}
