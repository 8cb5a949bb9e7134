//! The durable store: one SQLite database file, `udpmsg.db`, in the data directory.
//!
//! - WAL journal with `synchronous=FULL`: a batch that `commit` returned `Ok` for survives a
//!   crash or power loss; one transaction per batch (group commit).
//! - One daemon per directory: an exclusive lock on `udpmsgd.lock`, held while the store lives.
//! - Schema versioned in `PRAGMA user_version` and migrated at open; a database from a newer
//!   version is refused, naming both versions. A damaged file is refused, naming it, never
//!   replaced by an empty one. A new database is created at the current schema directly.
//! - Reads touch indexes only: accounts by name, subscriptions by follower and by followed, and
//!   each inbox by account.
//!
//! # Messages and inboxes
//!
//! A message is one row however many inboxes it lands in; the row lists its recipients' account
//! ids (ids are never reused, so a name registered again after a deletion inherits nothing).
//! That row is the truth, written with the batch that posted it. Each inbox is also indexed by
//! account, in *chunks*: rows `(account, last, total, ids)` holding up to [`CHUNK`] message ids
//! delivered to one account. Writing one index row per recipient per post would dirty one page
//! per recipient per commit (a post to 100 followers, 100 pages); instead the store gathers the
//! ids delivered to each account in memory and writes them as one chunk once there are
//! [`CHUNK`] of them or the oldest has waited [`FLUSH_AFTER`]: in a transaction of their own
//! right after the batch that filled them, once its result is reported ([`Store::after_commit`],
//! at `synchronous=NORMAL`: the index reaches the disk with the next batch's sync), a few inboxes
//! at a time ([`FULL_PER_COMMIT`]). Reads merge the chunks with what is still gathered. The
//! highest message id all of whose deliveries are in chunks is kept in `meta` (`indexed`);
//! after a crash, the deliveries of the messages above it are gathered again from their rows at
//! start (about a second's worth of messages).
//!
//! An inbox holds its newest `max_inbox` messages: reads never look further, and the oldest
//! chunks beyond that are deleted, all at once, when a new chunk takes the inbox past twice
//! that. A message leaves the database when
//! no inbox holds it any more: [`Store::maintain`] walks the messages in the background (when
//! the store has nothing else to do) and deletes those every recipient's inbox has moved past.
//!
//! The SQL is plain (no SQLite-only types but `WITHOUT ROWID`) so it carries over to PostgreSQL.

use super::{AccountRecord, IdMap, Read, ReadResult, Startup, Store, StoreError, StoredSession, Write};
use crate::proto::{Message, Token};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The schema this build writes. Version history:
/// 1: accounts, subscriptions, messages, inbox, sessions, meta.
/// 2: sessions remember their last reply (retransmissions across a restart run once).
/// 3: accounts get ids; a message row lists its recipients' ids; the inbox table goes (a post to
///    100 subscribers was 100 inbox rows, plus a trim of each inbox per batch). Sessions
///    remember when they were opened (Unix seconds), so their lifetime counts across restarts.
/// 4: messages remember when they were posted (Unix milliseconds; 0 for older ones).
/// 5: the store is the truth: inboxes are indexed by account in chunks (the daemon no longer
///    loads every inbox at start), accounts remember the address prefixes that logged in to
///    them, and `meta` counts the accounts.
pub const SCHEMA_VERSION: i64 = 5;

/// How long a daemon waits for the data directory's lock before saying another one holds it.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

pub const DB_FILE: &str = "udpmsg.db";
pub const LOCK_FILE: &str = "udpmsgd.lock";

/// Message ids per inbox chunk.
pub const CHUNK: usize = 64;
/// Accounts whose full chunk a commit writes, at most (more when some hold two chunks' worth).
const FULL_PER_COMMIT: usize = 16;
/// Delivered ids wait in memory at most this long before their chunk is written.
pub const FLUSH_AFTER: Duration = Duration::from_secs(1);

/// The whole schema at [`SCHEMA_VERSION`], for a new database.
const SCHEMA_CURRENT: &str = "
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    last_delivered INTEGER NOT NULL DEFAULT 0,
    id INTEGER,
    known BLOB NOT NULL DEFAULT x''
);
CREATE UNIQUE INDEX accounts_id ON accounts (id);
CREATE TABLE subscriptions (
    follower TEXT NOT NULL,
    followed TEXT NOT NULL,
    PRIMARY KEY (follower, followed)
);
CREATE INDEX subscriptions_by_followed ON subscriptions (followed, follower);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    author TEXT NOT NULL,
    recipient TEXT,
    text TEXT NOT NULL,
    recipients BLOB NOT NULL DEFAULT x'',
    time INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE inbox (
    account INTEGER NOT NULL,
    last INTEGER NOT NULL,
    total INTEGER NOT NULL,
    ids BLOB NOT NULL,
    PRIMARY KEY (account, last)
) WITHOUT ROWID;
CREATE TABLE sessions (
    token BLOB PRIMARY KEY,
    user_name TEXT NOT NULL,
    last_request_id INTEGER,
    last_reply BLOB,
    created INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('next_account_id', 1), ('accounts', 0), ('indexed', 0);
";

const MIGRATE_V2: &str = "
ALTER TABLE sessions ADD COLUMN last_request_id INTEGER;
ALTER TABLE sessions ADD COLUMN last_reply BLOB;
";

/// The whole schema at [`SCHEMA_VERSION`], for a new database.
const MIGRATE_V4: &str = "ALTER TABLE messages ADD COLUMN time INTEGER NOT NULL DEFAULT 0;";

/// Schema 1, as the first versions created it (what the migrations start from; the tests make
/// old databases with it).
#[cfg_attr(not(test), allow(dead_code))]
const SCHEMA_V1: &str = "
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    last_delivered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE subscriptions (
    follower TEXT NOT NULL,
    followed TEXT NOT NULL,
    PRIMARY KEY (follower, followed)
);
CREATE INDEX subscriptions_followed ON subscriptions (followed);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    author TEXT NOT NULL,
    recipient TEXT,
    text TEXT NOT NULL
);
CREATE TABLE inbox (
    user_name TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (user_name, message_id)
);
CREATE TABLE sessions (
    token BLOB PRIMARY KEY,
    user_name TEXT NOT NULL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    max_inbox: usize,
    /// Held for the store's lifetime by the daemon (the OS releases it when the process dies);
    /// `None` for an admin command working beside a running daemon.
    _lock: Option<File>,
    /// `PRAGMA data_version` as last seen: it changes when another connection commits.
    data_version: i64,
    /// Ids delivered to each account and not yet written as a chunk, oldest first.
    gathered: IdMap<Vec<u64>>,
    /// Accounts in the order their gathered ids began: (first id, account, when). An entry
    /// whose account's first gathered id is another is stale.
    gather_order: VecDeque<(u64, u64, Instant)>,
    /// The highest message id stored.
    max_message_id: u64,
    /// The highest message id all of whose deliveries are in chunks.
    indexed: u64,
    /// Accounts whose chunks the last commit left for [`Store::after_commit`].
    to_flush: Vec<u64>,
    /// Whether the connection is at `synchronous=FULL`, as every batch must be
    /// ([`Store::after_commit`] lowers it for the index only).
    sync_full: bool,
    gc: Gc,
}

/// The background collection's position: messages up to `cursor` were looked at in this pass;
/// `floors` caches, per account, the oldest message id its inbox holds (`None`: none).
#[derive(Default)]
struct Gc {
    cursor: u64,
    floors: IdMap<Option<u64>>,
}

/// Accounts whose floors the collection remembers within one pass, at most.
const GC_FLOORS: usize = 1 << 20;
/// Messages the collection looks at per query (a step should take well under a millisecond).
const GC_STEP: u32 = 32;

/// Who opens the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The daemon: exclusive, one per directory.
    Daemon,
    /// An admin command: works beside a running daemon (which notices the change within a
    /// second) or alone.
    Admin,
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{}: {what}: {e}", path.display()))
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir` for the daemon.
    pub fn open(dir: &Path, max_inbox: usize) -> Result<SqliteStore, StoreError> {
        Self::open_as(dir, max_inbox, Access::Daemon)
    }

    /// Opens the store; `Access::Admin` does not insist on the directory lock.
    pub fn open_as(dir: &Path, max_inbox: usize, access: Access) -> Result<SqliteStore, StoreError> {
        // Private to the daemon's user: it holds password hashes and every message.
        private_dir(dir).map_err(|e| err(dir, "cannot create the data directory", e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = private_file(&lock_path).map_err(|e| err(dir, "the data directory is not writable", e))?;
        // The holder may be on its way out (a restart overlapping the old daemon's exit), or a
        // program another thread of this process is starting may hold a copy of the lock's
        // descriptor until it execs: a daemon waits a moment before calling the directory taken.
        let patience = if access == Access::Daemon { LOCK_PATIENCE } else { Duration::ZERO };
        let give_up = Instant::now() + patience;
        let mut attempt = lock.try_lock();
        while matches!(attempt, Err(std::fs::TryLockError::WouldBlock)) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(20));
            attempt = lock.try_lock();
        }
        let lock = match attempt {
            Ok(()) => Some(lock),
            Err(std::fs::TryLockError::WouldBlock) if access == Access::Admin => None,
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError(format!(
                    "{}: another udpmsgd is already using this data directory (it holds {}); \
                     run one daemon per directory",
                    dir.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(&lock_path, "cannot lock", e)),
        };
        let path = dir.join(DB_FILE);
        // SQLite gives its -wal and -shm files the database file's mode: create it 0600.
        drop(private_file(&path).map_err(|e| err(&path, "cannot open the database", e))?);
        warn_if_readable(&path);
        let conn = Connection::open(&path).map_err(|e| err(&path, "cannot open the database", e))?;
        let mut store = SqliteStore {
            conn,
            path,
            max_inbox,
            _lock: lock,
            data_version: 0,
            gathered: IdMap::default(),
            gather_order: VecDeque::new(),
            max_message_id: 0,
            indexed: 0,
            to_flush: Vec::new(),
            sync_full: true,
            gc: Gc::default(),
        };
        store.setup()?;
        store.data_version = store.read_data_version()?;
        store.max_message_id = store.max_stored_id().map_err(|e| err(&store.path, "cannot read", e))?;
        store.indexed = store.meta("indexed")? as u64;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this store holds the directory lock, i.e. no daemon is running on it.
    pub fn exclusive(&self) -> bool {
        self._lock.is_some()
    }

    fn read_data_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| err(&self.path, "cannot read", e))
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError(format!(
            "{}: the database is damaged or not a udpmsg database ({e}); refusing to start. Restore it \
             from a backup, or move it away to start with an empty one",
            self.path.display()
        ))
    }

    /// Says "damaged" only when SQLite says so; anything else (a full disk, no permission) is
    /// reported as it is, so nobody moves a good database away.
    fn open_error(&self, e: rusqlite::Error) -> StoreError {
        use rusqlite::ffi::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match e.sqlite_error_code() {
            Some(NotADatabase | DatabaseCorrupt) => self.corrupt(e),
            _ => err(&self.path, "cannot open the database", e),
        }
    }

    fn setup(&mut self) -> Result<(), StoreError> {
        // The first statement reads the header and the schema page: a file that is not a
        // database fails here. No scan of the whole file (`PRAGMA quick_check` takes seconds per
        // gigabyte): start-up must not grow with what is stored. Damage deeper in the file is met
        // when a page is read, and answered like any failed read.
        let _: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(|e| self.open_error(e))?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| err(&self.path, "cannot enable WAL", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(err(&self.path, "cannot enable WAL", format!("journal mode is {mode}")));
        }
        // Admin commands and the daemon may write at the same moment: wait for each other.
        self.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| err(&self.path, "cannot configure", e))?;
        // Plans must not depend on the values bound (we never ANALYZE, so nothing is lost):
        // otherwise every reuse of a cached statement on an indexed column re-prepares it.
        self.conn
            .set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(|e| err(&self.path, "cannot configure", e))?;
        self.conn
            .execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")
            .map_err(|e| err(&self.path, "cannot configure", e))?;
        let version: i64 =
            self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| self.open_error(e))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError(format!(
                "{}: the database has schema version {version}, this udpmsgd understands up to version \
                 {SCHEMA_VERSION}; refusing to start (use a newer udpmsgd)",
                self.path.display()
            )));
        }
        if version < SCHEMA_VERSION && self._lock.is_none() {
            // An admin command beside a running daemon of an older version: migrating under it
            // would break it (schema 3 drops a table it writes to).
            return Err(StoreError(format!(
                "{}: the database has schema version {version} and a daemon is running on it; stop it \
                 (or start this version's udpmsgd, which migrates it) before using this command",
                self.path.display()
            )));
        }
        if version == 0 {
            let tx = self.conn.transaction().map_err(|e| err(&self.path, "cannot create the schema", e))?;
            tx.execute_batch(SCHEMA_CURRENT).map_err(|e| err(&self.path, "cannot create the schema", e))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(|e| err(&self.path, "cannot create the schema", e))?;
            tx.commit().map_err(|e| err(&self.path, "cannot create the schema", e))?;
            log::info!("{}: created a new database (schema version {SCHEMA_VERSION})", self.path.display());
            return Ok(());
        }
        if version < 2 {
            self.migrate(2, MIGRATE_V2)?;
        }
        if version < 3 {
            self.migrate_v3()?;
        }
        if version < 4 {
            self.migrate(4, MIGRATE_V4)?;
        }
        if version < 5 {
            self.migrate_v5()?;
        }
        // Later migrations go here, each in its own transaction; SCHEMA_CURRENT follows them.
        Ok(())
    }

    fn migrate(&mut self, to: i64, sql: &str) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| err(&path, "cannot migrate", e))?;
        tx.execute_batch(sql)
            .map_err(|e| err(&path, &format!("cannot migrate to schema version {to}"), e))?;
        tx.pragma_update(None, "user_version", to).map_err(|e| err(&path, "cannot migrate", e))?;
        tx.commit().map_err(|e| err(&path, "cannot migrate", e))?;
        log::info!("{}: migrated to schema version {to}", path.display());
        Ok(())
    }

    /// Schema 3: inbox rows become a recipient list in each message row.
    fn migrate_v3(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let e = |e: rusqlite::Error| err(&path, "cannot migrate to schema version 3", e);
        let tx = self.conn.transaction().map_err(e)?;
        tx.execute_batch(
            "ALTER TABLE accounts ADD COLUMN id INTEGER;
             UPDATE accounts SET id = rowid;
             CREATE UNIQUE INDEX accounts_id ON accounts (id);
             ALTER TABLE messages ADD COLUMN recipients BLOB NOT NULL DEFAULT x'';
             ALTER TABLE sessions ADD COLUMN created INTEGER NOT NULL DEFAULT 0;
             UPDATE sessions SET created = CAST(strftime('%s', 'now') AS INTEGER);
             INSERT INTO meta (key, value) SELECT 'next_account_id', COALESCE(MAX(id), 0) + 1 FROM accounts
                 WHERE true ON CONFLICT (key) DO UPDATE SET value = excluded.value;",
        )
        .map_err(e)?;
        // Each message's recipients, from its inbox rows (rows of deleted accounts drop out).
        let mut recipients: std::collections::BTreeMap<i64, Vec<u64>> = Default::default();
        {
            let mut rows = tx
                .prepare("SELECT i.message_id, a.id FROM inbox i JOIN accounts a ON a.name = i.user_name")
                .map_err(e)?;
            let mut rows = rows.query([]).map_err(e)?;
            while let Some(r) = rows.next().map_err(e)? {
                let (message, account) = (r.get::<_, i64>(0).map_err(e)?, r.get::<_, i64>(1).map_err(e)?);
                recipients.entry(message).or_default().push(account as u64);
            }
            let mut set = tx.prepare("UPDATE messages SET recipients = ?2 WHERE id = ?1").map_err(e)?;
            for (message, mut ids) in recipients {
                ids.sort_unstable();
                set.execute(params![message, encode_ids(&ids)]).map_err(e)?;
            }
        }
        tx.execute_batch("DELETE FROM messages WHERE recipients = x''; DROP TABLE inbox;").map_err(e)?;
        tx.pragma_update(None, "user_version", 3).map_err(e)?;
        tx.commit().map_err(e)?;
        log::info!("{}: migrated to schema version 3", path.display());
        Ok(())
    }

    /// Schema 5: inboxes indexed by account in chunks, built from the messages' recipient lists;
    /// known address prefixes; the account count in `meta`.
    fn migrate_v5(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let max_inbox = self.max_inbox;
        let e = |e: rusqlite::Error| err(&path, "cannot migrate to schema version 5", e);
        let tx = self.conn.transaction().map_err(e)?;
        tx.execute_batch(
            "ALTER TABLE accounts ADD COLUMN known BLOB NOT NULL DEFAULT x'';
             DROP INDEX IF EXISTS subscriptions_followed;
             CREATE INDEX subscriptions_by_followed ON subscriptions (followed, follower);
             CREATE TABLE inbox (
                 account INTEGER NOT NULL,
                 last INTEGER NOT NULL,
                 total INTEGER NOT NULL,
                 ids BLOB NOT NULL,
                 PRIMARY KEY (account, last)
             ) WITHOUT ROWID;
             INSERT INTO meta (key, value) SELECT 'accounts', COUNT(*) FROM accounts WHERE true
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value;",
        )
        .map_err(e)?;
        // Each account's inbox: the newest max_inbox of the messages that list it.
        let mut inboxes: HashMap<u64, VecDeque<u64>> = HashMap::new();
        let mut max_id = 0;
        {
            let mut rows = tx.prepare("SELECT id, recipients FROM messages ORDER BY id").map_err(e)?;
            let mut rows = rows.query([]).map_err(e)?;
            while let Some(r) = rows.next().map_err(e)? {
                let id = r.get::<_, i64>(0).map_err(e)? as u64;
                max_id = id;
                for account in decode_ids(r.get_ref(1).map_err(e)?.as_blob().map_err(|x| e(x.into()))?) {
                    let inbox = inboxes.entry(account).or_default();
                    inbox.push_back(id);
                    if inbox.len() > max_inbox {
                        inbox.pop_front();
                    }
                }
            }
        }
        for (account, ids) in inboxes {
            let ids: Vec<u64> = ids.into();
            write_chunks(&tx, account, &ids, max_inbox).map_err(e)?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('indexed', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [max_id as i64],
        )
        .map_err(e)?;
        tx.pragma_update(None, "user_version", 5).map_err(e)?;
        tx.commit().map_err(e)?;
        log::info!("{}: migrated to schema version 5", path.display());
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(|e| err(&self.path, "cannot read", e))
    }

    fn max_stored_id(&self) -> rusqlite::Result<u64> {
        let max: Option<i64> = self.conn.query_row("SELECT MAX(id) FROM messages", [], |r| r.get(0))?;
        Ok(max.unwrap_or(0) as u64)
    }

    /// After a start: the deliveries of the messages above the `indexed` mark that are not in a
    /// chunk yet (the daemon stopped before writing them) are gathered again.
    fn regather(&mut self) -> rusqlite::Result<usize> {
        let mut newest: HashMap<u64, u64> = HashMap::new();
        let mut gathered = 0;
        let mut rows = self.conn.prepare("SELECT id, recipients FROM messages WHERE id > ?1 ORDER BY id")?;
        let mut last_chunk = self.conn.prepare("SELECT MAX(last) FROM inbox WHERE account = ?1")?;
        let mut rows = rows.query([self.indexed as i64])?;
        let now = Instant::now();
        while let Some(r) = rows.next()? {
            let id = r.get::<_, i64>(0)? as u64;
            for account in decode_ids(r.get_ref(1)?.as_blob()?) {
                let last = match newest.get(&account) {
                    Some(l) => *l,
                    None => {
                        let l: Option<i64> = last_chunk.query_row([account as i64], |r| r.get(0))?;
                        *newest.entry(account).or_insert(l.unwrap_or(0) as u64)
                    }
                };
                if id > last {
                    let ids = self.gathered.entry(account).or_default();
                    if ids.is_empty() {
                        self.gather_order.push_back((id, account, now));
                    }
                    ids.push(id);
                    gathered += 1;
                }
            }
        }
        Ok(gathered)
    }

    /// The highest message id all of whose deliveries are in chunks, given the accounts whose
    /// gathered ids are about to be written (`flushing`) and the messages up to `max_id`.
    fn watermark(&self, flushing: &[u64], also: &Delivered, max_id: u64) -> u64 {
        let mut low = u64::MAX;
        for (first, account, _) in &self.gather_order {
            if self.gathered.get(account).and_then(|ids| ids.first()) == Some(first)
                && !flushing.contains(account)
            {
                low = low.min(*first);
                break;
            }
        }
        for (account, mut ids) in also.groups() {
            if !flushing.contains(&account) && !self.gathered.contains_key(&account) {
                if let Some(first) = ids.next() {
                    low = low.min(first);
                }
            }
        }
        if low == u64::MAX {
            max_id
        } else {
            low - 1
        }
    }

    /// Writes as chunks what is gathered for `accounts` (plus `also`, delivered in the batch
    /// being committed), inside `tx`. Memory is changed by [`SqliteStore::gathered_written`]
    /// once `tx` committed.
    fn write_gathered(
        &self,
        tx: &Transaction<'_>,
        accounts: &[u64],
        also: &Delivered,
    ) -> rusqlite::Result<()> {
        let mut exists = tx.prepare_cached("SELECT 1 FROM accounts WHERE id = ?1")?;
        for account in accounts {
            if exists.query_row([*account as i64], |_| Ok(())).optional()?.is_none() {
                continue; // deleted meanwhile: its inbox went with it
            }
            let mut ids = self.gathered.get(account).cloned().unwrap_or_default();
            ids.extend(also.get(*account).into_iter().flatten().map(|&(_, id)| id));
            write_chunks(tx, *account, &ids, self.max_inbox)?;
        }
        Ok(())
    }

    /// `tx` with chunks for `flushed` committed: forget what they held; gather `delivered`.
    fn gathered_written(&mut self, flushed: &[u64], delivered: &Delivered, now: Instant) {
        for account in flushed {
            self.gathered.remove(account);
        }
        let mut started = Vec::new();
        for (account, mut ids) in delivered.groups() {
            if flushed.contains(&account) {
                continue;
            }
            let Some(first) = ids.next() else { continue };
            // Room for a chunk's worth at once: a list grows to CHUNK and is then written.
            let g = self.gathered.entry(account).or_insert_with(|| Vec::with_capacity(CHUNK));
            if g.is_empty() {
                started.push((first, account));
            }
            g.push(first);
            g.extend(ids);
        }
        // `gather_order` stays sorted by first id (ids only grow from batch to batch; within
        // one, the groups come in account order): `watermark` takes its first live entry as the
        // lowest id not in a chunk, and a mark above an id only gathered would lose that
        // delivery in a crash.
        started.sort_unstable();
        self.gather_order.extend(started.into_iter().map(|(first, account)| (first, account, now)));
        while let Some((first, account, _)) = self.gather_order.front() {
            if self.gathered.get(account).and_then(|ids| ids.first()) == Some(first) {
                break;
            }
            self.gather_order.pop_front();
        }
    }

    /// Accounts whose gathered ids have waited [`FLUSH_AFTER`] by `now`.
    fn due(&self, now: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        for (first, account, since) in &self.gather_order {
            if now.saturating_duration_since(*since) < FLUSH_AFTER {
                break;
            }
            if self.gathered.get(account).and_then(|ids| ids.first()) == Some(first) {
                due.push(*account);
            }
        }
        due
    }

    fn set_synchronous(&self, level: &str) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, "synchronous", level)
            .map_err(|e| err(&self.path, "cannot set synchronous", e))
    }

    /// Writes the chunks of `accounts` in a transaction of its own.
    fn flush_accounts(&mut self, accounts: Vec<u64>) -> Result<(), StoreError> {
        if accounts.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let e = |e: rusqlite::Error| err(&path, "cannot write the inbox index", e);
        let none = Delivered::default();
        let mark = self.watermark(&accounts, &none, self.max_message_id);
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        self.write_gathered(&tx, &accounts, &none).map_err(e)?;
        set_meta(&tx, "indexed", mark).map_err(e)?;
        tx.commit().map_err(e)?;
        self.indexed = mark;
        self.gathered_written(&accounts, &none, Instant::now());
        Ok(())
    }

    /// The newest ids of account `id`'s inbox, newest first: what is gathered, then the chunks,
    /// until `enough` says stop or `max_inbox` ids are collected.
    fn inbox_ids(&self, id: u64, enough: impl Fn(&[u64]) -> bool) -> rusqlite::Result<Vec<u64>> {
        let mut ids: Vec<u64> =
            self.gathered.get(&id).map(|g| g.iter().rev().copied().collect()).unwrap_or_default();
        let mut chunks =
            self.conn.prepare_cached("SELECT ids FROM inbox WHERE account = ?1 ORDER BY last DESC")?;
        let mut rows = chunks.query([id as i64])?;
        while ids.len() < self.max_inbox && !enough(&ids) {
            let Some(r) = rows.next()? else { break };
            ids.extend(decode_ids(r.get_ref(0)?.as_blob()?).into_iter().rev());
        }
        ids.truncate(self.max_inbox);
        Ok(ids)
    }

    fn message(&self, id: u64) -> rusqlite::Result<Option<Message>> {
        self.conn
            .prepare_cached("SELECT author, recipient, text, time FROM messages WHERE id = ?1")?
            .query_row([id as i64], |r| {
                Ok(Message {
                    id,
                    time: r.get::<_, i64>(3)? as u64,
                    author: r.get(0)?,
                    to: r.get(1)?,
                    text: r.get(2)?,
                })
            })
            .optional()
    }

    fn answer(&self, read: &Read) -> rusqlite::Result<ReadResult> {
        Ok(match read {
            Read::Account { name } => ReadResult::Account(
                self.conn
                    .prepare_cached(
                        "SELECT id, password_hash, last_delivered, known FROM accounts WHERE name = ?1",
                    )?
                    .query_row([name], |r| {
                        Ok(AccountRecord {
                            id: r.get::<_, i64>(0)? as u64,
                            user: name.clone(),
                            password_hash: r.get(1)?,
                            last_delivered: r.get::<_, i64>(2)? as u64,
                            known: r.get(3)?,
                        })
                    })
                    .optional()?,
            ),
            Read::Followers { name } => {
                let mut q = self.conn.prepare_cached(
                    "SELECT s.follower, a.id FROM subscriptions s JOIN accounts a ON a.name = s.follower \
                     WHERE s.followed = ?1",
                )?;
                let rows =
                    q.query_map([name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
                ReadResult::Followers(rows.collect::<rusqlite::Result<_>>()?)
            }
            Read::Follows { follower, followed } => {
                let follows = self
                    .conn
                    .prepare_cached("SELECT 1 FROM subscriptions WHERE follower = ?1 AND followed = ?2")?
                    .query_row([follower, followed], |_| Ok(()))
                    .optional()?
                    .is_some();
                let following: i64 = self
                    .conn
                    .prepare_cached("SELECT COUNT(*) FROM subscriptions WHERE follower = ?1")?
                    .query_row([follower], |r| r.get(0))?;
                ReadResult::Follows { follows, following: following as u32 }
            }
            Read::Inbox { id, count, before, above } => {
                let (count, before) = (*count as usize, before.unwrap_or(u64::MAX));
                let ids = self.inbox_ids(*id, |ids| {
                    above.is_none() && ids.iter().filter(|i| **i < before).count() >= count
                })?;
                let newer = above.map_or(0, |a| ids.iter().filter(|i| **i > a).count() as u32);
                let mut messages = Vec::new();
                for i in ids.into_iter().filter(|i| *i < before).take(count) {
                    if let Some(m) = self.message(i)? {
                        messages.push(m);
                    }
                }
                messages.reverse();
                ReadResult::Inbox { messages, above: newer }
            }
            Read::Names { after, limit } => {
                let mut q = self
                    .conn
                    .prepare_cached("SELECT name FROM accounts WHERE name > ?1 ORDER BY name LIMIT ?2")?;
                let rows = q.query_map(params![after, *limit as i64], |r| r.get::<_, String>(0))?;
                ReadResult::Names(rows.collect::<rusqlite::Result<_>>()?)
            }
            // The daemon holds every session of its directory: none to take over.
            Read::Claim { .. } => ReadResult::Claimed(None),
            Read::Relations { name, after, limit } => {
                let column = |sql: &str| -> rusqlite::Result<Vec<String>> {
                    let mut q = self.conn.prepare_cached(sql)?;
                    let rows = q.query_map(params![name, after, *limit as i64], |r| r.get::<_, String>(0))?;
                    rows.collect()
                };
                let following = column(
                    "SELECT followed FROM subscriptions WHERE follower = ?1 AND followed > ?2 \
                     ORDER BY followed LIMIT ?3",
                )?;
                let followers = column(
                    "SELECT follower FROM subscriptions WHERE followed = ?1 AND follower > ?2 \
                     ORDER BY follower LIMIT ?3",
                )?;
                ReadResult::Relations(super::merge_relations(following, followers, *limit as usize))
            }
        })
    }

    /// The oldest message id `account`'s inbox holds, if any: its chunks and what is gathered
    /// for it, as limited to the newest `max_inbox` (the chunks may hold a little more until
    /// the next is written).
    fn floor(&mut self, account: u64) -> rusqlite::Result<Option<u64>> {
        if let Some(f) = self.gc.floors.get(&account) {
            return Ok(*f);
        }
        let gathered = self.gathered.get(&account).cloned().unwrap_or_default();
        let in_chunks: Option<i64> = self
            .conn
            .prepare_cached("SELECT total FROM inbox WHERE account = ?1 ORDER BY last DESC LIMIT 1")?
            .query_row([account as i64], |r| r.get(0))
            .optional()?;
        let total = in_chunks.unwrap_or(0) as usize + gathered.len();
        let mut skip = total.saturating_sub(self.max_inbox);
        let mut floor = None;
        if in_chunks.is_some() {
            let mut q = self.conn.prepare_cached("SELECT ids FROM inbox WHERE account = ?1 ORDER BY last")?;
            let mut rows = q.query([account as i64])?;
            while let Some(r) = rows.next()? {
                let ids = decode_ids(r.get_ref(0)?.as_blob()?);
                if skip < ids.len() {
                    floor = Some(ids[skip]);
                    break;
                }
                skip -= ids.len();
            }
        }
        let floor = floor.or_else(|| gathered.get(skip).copied());
        if self.gc.floors.len() >= GC_FLOORS {
            self.gc.floors.clear();
        }
        self.gc.floors.insert(account, floor);
        Ok(floor)
    }

    /// One step of the collection: looks at up to [`GC_STEP`] messages after the cursor and
    /// deletes those no inbox holds. Returns whether the pass has more to look at.
    fn collect_step(&mut self) -> rusqlite::Result<bool> {
        let rows: Vec<(u64, Vec<u64>)> = {
            let mut q = self.conn.prepare_cached(
                "SELECT id, recipients FROM messages WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = q.query_map(params![self.gc.cursor as i64, self.indexed as i64, GC_STEP], |r| {
                Ok((r.get::<_, i64>(0)? as u64, decode_ids(r.get_ref(1)?.as_blob()?)))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(last) = rows.last().map(|r| r.0) else {
            // A pass ends: the next one starts from the beginning, with fresh floors.
            self.gc = Gc::default();
            return Ok(false);
        };
        let mut garbage = Vec::new();
        for (id, recipients) in rows {
            let mut held = false;
            for r in recipients {
                if self.floor(r)?.is_some_and(|f| f <= id) {
                    held = true;
                    break;
                }
            }
            if !held {
                garbage.push(id);
            }
        }
        if !garbage.is_empty() {
            let tx = self.conn.unchecked_transaction()?;
            {
                let mut del = tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?;
                for id in &garbage {
                    del.execute([*id as i64])?;
                }
            }
            tx.commit()?;
        }
        self.gc.cursor = last;
        Ok(true)
    }

    /// Account names in name order (for `udpmsgd user list`), a page at a time.
    pub fn names(&mut self, after: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        match self.read(&Read::Names { after: after.to_string(), limit })? {
            ReadResult::Names(n) => Ok(n),
            _ => unreachable!("a names read answers names"),
        }
    }
}

/// Writes `ids` (ascending, after what the account's chunks hold) as chunks of account
/// `account`, then deletes its oldest chunks beyond `max_inbox` ids.
fn write_chunks(tx: &Transaction<'_>, account: u64, ids: &[u64], max_inbox: usize) -> rusqlite::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let prev: Option<i64> = tx
        .prepare_cached("SELECT total FROM inbox WHERE account = ?1 ORDER BY last DESC LIMIT 1")?
        .query_row([account as i64], |r| r.get(0))
        .optional()?;
    let mut total = prev.unwrap_or(0) as usize;
    let mut newest = 0;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO inbox (account, last, total, ids) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for piece in ids.chunks(CHUNK) {
            total += piece.len();
            newest = *piece.last().expect("not empty");
            insert.execute(params![account as i64, newest as i64, total as i64, encode_ids(piece)])?;
        }
    }
    // Reads stop at `max_inbox` anyway, so the chunks beyond it may wait: an inbox is trimmed
    // once it holds [`trim_slack`] more, in one statement, rather than by a chunk or two at every
    // chunk written (which cost a full inbox five statements per chunk).
    if total > max_inbox + trim_slack(max_inbox) {
        // The oldest chunks that can go, read only as far as needed and counted from the
        // length prefix of their lists.
        let mut cut = None;
        {
            let mut q = tx.prepare_cached("SELECT last, ids FROM inbox WHERE account = ?1 ORDER BY last")?;
            let mut rows = q.query([account as i64])?;
            while let Some(r) = rows.next()? {
                let n = count_ids(r.get_ref(1)?.as_blob()?);
                if total - n < max_inbox {
                    break;
                }
                cut = Some(r.get::<_, i64>(0)?);
                total -= n;
            }
        }
        if let Some(cut) = cut {
            tx.prepare_cached("DELETE FROM inbox WHERE account = ?1 AND last <= ?2")?
                .execute(params![account as i64, cut])?;
        }
        tx.prepare_cached("UPDATE inbox SET total = ?3 WHERE account = ?1 AND last = ?2")?
            .execute(params![account as i64, newest as i64, total as i64])?;
    }
    Ok(())
}

fn set_meta(tx: &Transaction<'_>, key: &str, value: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value as i64])?;
    Ok(())
}

fn add_meta(tx: &Transaction<'_>, key: &str, delta: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, MAX(0, ?2)) \
         ON CONFLICT (key) DO UPDATE SET value = MAX(0, value + ?2)",
    )?
    .execute(params![key, delta])?;
    Ok(())
}

/// Creates `dir` (and its parents) if missing; the directory itself mode 0700.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    match b.create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

/// Opens `path` for reading and writing, creating it with mode 0600 if missing.
fn private_file(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

/// An existing database readable by other users is left as it is (its owner chose), but said.
fn warn_if_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "{}: readable by other users (mode {:o}); it holds password hashes and messages: \
                     chmod 600 it",
                    path.display(),
                    m.permissions().mode() & 0o777
                );
            }
        }
    }
}

/// A list of ids as stored: postcard-encoded (varints).
fn encode_ids(ids: &[u64]) -> Vec<u8> {
    postcard::to_stdvec(ids).expect("integers serialize")
}

/// How many ids beyond `max_inbox` an inbox's chunks may hold before the oldest are deleted:
/// as many again (at least a chunk), so trimming costs one statement per `max_inbox` ids
/// delivered.
fn trim_slack(max_inbox: usize) -> usize {
    max_inbox.max(CHUNK)
}

/// How many ids a stored list holds, read from its length prefix alone (postcard writes a
/// sequence's length first, as a varint); a damaged prefix counts as empty.
fn count_ids(bytes: &[u8]) -> usize {
    let mut n: u64 = 0;
    for (i, b) in bytes.iter().take(10).enumerate() {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return usize::try_from(n).unwrap_or(0);
        }
    }
    0
}

/// The ids of a stored list; a damaged list reads as empty (not a reason to refuse the whole
/// database).
fn decode_ids(bytes: &[u8]) -> Vec<u64> {
    postcard::from_bytes(bytes).unwrap_or_default()
}

/// Message ids delivered by one batch, grouped by account id: one list of `(account, id)`
/// pairs per batch, sorted by account, rather than a map of small vectors (one allocation per
/// recipient per batch, a third of a commit's CPU with 100 recipients per message).
#[derive(Default)]
struct Delivered {
    /// Sorted by account; each account's ids in the order delivered (ascending).
    pairs: Vec<(u64, u64)>,
}

impl Delivered {
    fn push(&mut self, account: u64, id: u64) {
        self.pairs.push((account, id));
    }

    /// Groups the pairs by account. Ids only grow, so sorting the pairs whole keeps each
    /// account's ids in delivery order (and ids are unique, so an unstable sort does).
    fn seal(&mut self) {
        if !self.pairs.is_sorted() {
            self.pairs.sort_unstable();
        }
    }

    /// Each account with the ids delivered to it, in account order.
    fn groups(&self) -> impl Iterator<Item = (u64, impl Iterator<Item = u64> + '_)> + '_ {
        self.pairs.chunk_by(|a, b| a.0 == b.0).map(|g| (g[0].0, g.iter().map(|&(_, id)| id)))
    }

    /// The ids delivered to `account`, if any.
    fn get(&self, account: u64) -> Option<&[(u64, u64)]> {
        let start = self.pairs.partition_point(|&(a, _)| a < account);
        let end = start + self.pairs[start..].partition_point(|&(a, _)| a == account);
        (end > start).then(|| &self.pairs[start..end])
    }

    fn contains(&self, account: u64) -> bool {
        self.get(account).is_some()
    }

    fn max_id(&self) -> Option<u64> {
        self.pairs.iter().map(|&(_, id)| id).max()
    }

    fn retain_accounts(&mut self, keep: impl Fn(u64) -> bool) {
        self.pairs.retain(|&(a, _)| keep(a));
    }
}

/// Applies one batch inside `tx`; returns what it delivered and the ids of the accounts deleted.
fn apply(tx: &Transaction<'_>, batch: &[Write]) -> rusqlite::Result<(Delivered, Vec<u64>)> {
    let deliveries = batch
        .iter()
        .map(|w| match w {
            Write::StoreMessage { recipients, .. } => recipients.len(),
            _ => 0,
        })
        .sum();
    let mut delivered = Delivered { pairs: Vec::with_capacity(deliveries) };
    let mut deleted = Vec::new();
    let mut next_message_id = None;
    let id_of = |name: &str| -> rusqlite::Result<Option<i64>> {
        tx.prepare_cached("SELECT id FROM accounts WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()
    };
    for w in batch {
        match w {
            Write::CreateAccount { user, password_hash } => {
                // A name can be registered again after a deletion; nothing of a previous owner
                // (rows an earlier race may have left) may carry over, and the new account gets
                // an id never used before.
                for sql in [
                    "DELETE FROM subscriptions WHERE follower = ?1 OR followed = ?1",
                    "DELETE FROM sessions WHERE user_name = ?1",
                ] {
                    tx.prepare_cached(sql)?.execute([user])?;
                }
                let id: i64 = tx
                    .prepare_cached("SELECT value FROM meta WHERE key = 'next_account_id'")?
                    .query_row([], |r| r.get(0))?;
                tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_account_id'")?
                    .execute([id + 1])?;
                tx.prepare_cached(
                    "INSERT INTO accounts (name, password_hash, last_delivered, id) VALUES (?1, ?2, 0, ?3)",
                )?
                .execute(params![user, password_hash, id])?;
                add_meta(tx, "accounts", 1)?;
            }
            Write::DeleteAccount { user } => {
                if let Some(id) = id_of(user)? {
                    tx.prepare_cached("DELETE FROM inbox WHERE account = ?1")?.execute([id])?;
                    deleted.push(id as u64);
                    add_meta(tx, "accounts", -1)?;
                }
                for sql in [
                    "DELETE FROM accounts WHERE name = ?1",
                    "DELETE FROM subscriptions WHERE follower = ?1 OR followed = ?1",
                    "DELETE FROM sessions WHERE user_name = ?1",
                ] {
                    tx.prepare_cached(sql)?.execute([user])?;
                }
            }
            Write::SetPassword { user, password_hash } => {
                tx.prepare_cached("UPDATE accounts SET password_hash = ?2 WHERE name = ?1")?
                    .execute(params![user, password_hash])?;
                tx.prepare_cached("DELETE FROM sessions WHERE user_name = ?1")?.execute([user])?;
            }
            Write::Subscribe { follower, followed } => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO subscriptions (follower, followed) VALUES (?1, ?2)",
                )?
                .execute([follower, followed])?;
            }
            Write::Unsubscribe { follower, followed } => {
                tx.prepare_cached("DELETE FROM subscriptions WHERE follower = ?1 AND followed = ?2")?
                    .execute([follower, followed])?;
            }
            Write::StoreMessage { message, recipients } => {
                next_message_id = Some(message.id + 1);
                // A message nobody receives only uses up its id.
                if recipients.is_empty() {
                    continue;
                }
                tx.prepare_cached(
                    "INSERT INTO messages (id, author, recipient, text, recipients, time) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    message.id as i64,
                    message.author,
                    message.to,
                    message.text,
                    encode_ids(recipients),
                    message.time as i64
                ])?;
                for r in recipients {
                    delivered.push(*r, message.id);
                }
            }
            Write::Delivered { user, up_to } => {
                tx.prepare_cached(
                    "UPDATE accounts SET last_delivered = MAX(last_delivered, ?2) WHERE name = ?1",
                )?
                .execute(params![user, *up_to as i64])?;
            }
            Write::KnownAddresses { user, known } => {
                tx.prepare_cached("UPDATE accounts SET known = ?2 WHERE name = ?1")?
                    .execute(params![user, known])?;
            }
            Write::OpenSession { token, user } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO sessions (token, user_name, created) \
                     VALUES (?1, ?2, CAST(strftime('%s', 'now') AS INTEGER))",
                )?
                .execute(params![&token.0[..], user])?;
            }
            Write::LastReply { token, request_id, reply } => {
                tx.prepare_cached(
                    "UPDATE sessions SET last_request_id = ?2, last_reply = ?3 WHERE token = ?1",
                )?
                .execute(params![&token.0[..], *request_id as i64, reply])?;
            }
            Write::CloseSession { token } => {
                tx.prepare_cached("DELETE FROM sessions WHERE token = ?1")?.execute([&token.0[..]])?;
            }
        }
    }
    // Ids are never reused, even those of messages nobody received or that were collected.
    if let Some(next) = next_message_id {
        tx.prepare_cached(
            "INSERT INTO meta (key, value) VALUES ('next_message_id', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        )?
        .execute([next as i64])?;
    }
    delivered.seal();
    Ok((delivered, deleted))
}

impl Store for SqliteStore {
    fn begin_epoch(&mut self) -> Result<u32, StoreError> {
        let epoch = self.meta("epoch")? + 1;
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [epoch],
            )
            .map_err(|e| err(&self.path, "cannot write", e))?;
        let n = self.regather().map_err(|e| err(&self.path, "cannot read the messages to index", e))?;
        if n > 0 {
            log::info!("gathered {n} deliveries the last run did not index");
        }
        Ok(epoch as u32)
    }

    fn load(&mut self) -> Result<Startup, StoreError> {
        let e = |e: rusqlite::Error| err(&self.path, "cannot read", e);
        let mut sessions = Vec::new();
        {
            let mut q = self
                .conn
                .prepare(
                    "SELECT s.token, s.user_name, s.last_request_id, s.last_reply, \
                         MAX(0, CAST(strftime('%s', 'now') AS INTEGER) - s.created), a.id, a.last_delivered \
                     FROM sessions s JOIN accounts a ON a.name = s.user_name",
                )
                .map_err(e)?;
            let rows = q
                .query_map([], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<Vec<u8>>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                })
                .map_err(e)?;
            for row in rows {
                let (t, user, last_id, last_reply, age, user_id, last_delivered) = row.map_err(e)?;
                let Ok(bytes) = <[u8; 16]>::try_from(t.as_slice()) else { continue };
                sessions.push(StoredSession {
                    token: Token(bytes),
                    user,
                    user_id: user_id as u64,
                    last_delivered: last_delivered as u64,
                    age_secs: age as u64,
                    last_reply: last_id.zip(last_reply).map(|(id, r)| (id as u64, r)),
                });
            }
        }
        let next_message_id =
            (self.max_stored_id().map_err(e)? + 1).max(self.meta("next_message_id")? as u64).max(1);
        Ok(Startup {
            sessions,
            next_message_id,
            accounts: self.meta("accounts")? as u64,
            epoch: self.meta("epoch")? as u32,
            node: None,
        })
    }

    fn changed_externally(&mut self) -> Result<bool, StoreError> {
        let v = self.read_data_version()?;
        let changed = v != self.data_version;
        self.data_version = v;
        Ok(changed)
    }

    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        if !self.sync_full {
            // `after_commit` could not put it back: no batch is committed without it.
            self.set_synchronous("FULL")?;
            self.sync_full = true;
        }
        let path = self.path.clone();
        let now = Instant::now();
        let tx =
            self.conn.unchecked_transaction().map_err(|e| err(&path, "cannot begin a transaction", e))?;
        let result = (|| {
            let (delivered, deleted) = apply(&tx, batch)?;
            // Chunks are written for accounts with a chunk's worth gathered, and for those whose
            // oldest gathered id has waited long enough.
            let mut full: Vec<(usize, u64)> = delivered
                .groups()
                .filter_map(|(a, ids)| {
                    let n = self.gathered.get(&a).map_or(0, Vec::len) + ids.count();
                    (n >= CHUNK).then_some((n, a))
                })
                .collect();
            // The subscribers of one author fill their chunks in step: written all in one
            // commit, they would make every CHUNK-th commit a long one (a latency spike for
            // everything waiting on it). A few of the fullest per commit spreads them out; none
            // holds more than two chunks' worth in memory.
            if full.len() > FULL_PER_COMMIT {
                full.sort_unstable_by(|x, y| y.cmp(x));
                let forced = full.iter().filter(|(n, _)| *n >= 2 * CHUNK).count();
                full.truncate(forced.max(FULL_PER_COMMIT));
            }
            let mut flush: Vec<u64> = full.into_iter().map(|(_, a)| a).collect();
            flush.extend(self.due(now).into_iter().filter(|a| !delivered.contains(*a)));
            flush.retain(|a| !deleted.contains(a));
            let max_id = delivered.max_id().unwrap_or(0).max(self.max_message_id);
            let mut pending = delivered;
            if !deleted.is_empty() {
                pending.retain_accounts(|a| !deleted.contains(&a));
            }
            // The chunks are written after the commit is reported (`after_commit`): the batch
            // is durable without them (its messages list their recipients, and whatever is
            // above the `indexed` mark is gathered again from them at start).
            let mark = self.watermark(&[], &pending, max_id);
            if mark != self.indexed {
                set_meta(&tx, "indexed", mark)?;
            }
            Ok::<_, rusqlite::Error>((pending, deleted, flush, max_id, mark))
        })();
        match result {
            Ok((pending, deleted, flush, max_id, mark)) => {
                tx.commit().map_err(|e| err(&path, "commit failed", e))?;
                for a in &deleted {
                    self.gathered.remove(a);
                }
                self.gathered_written(&[], &pending, now);
                self.max_message_id = max_id;
                self.indexed = mark;
                self.to_flush.retain(|a| !deleted.contains(a));
                if self.to_flush.is_empty() {
                    self.to_flush = flush; // unique already
                } else {
                    for a in flush {
                        if !self.to_flush.contains(&a) {
                            self.to_flush.push(a);
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                let _ = tx.rollback();
                Err(err(&path, "write failed", e))
            }
        }
    }

    fn read(&mut self, read: &Read) -> Result<ReadResult, StoreError> {
        self.answer(read).map_err(|e| err(&self.path, "cannot read", e))
    }

    fn maintain(&mut self, budget: Duration) -> Result<bool, StoreError> {
        let start = Instant::now();
        let due = self.due(start);
        self.flush_accounts(due)?;
        let path = self.path.clone();
        while start.elapsed() < budget {
            if !self.collect_step().map_err(|e| err(&path, "cannot collect messages", e))? {
                return Ok(!self.gathered.is_empty());
            }
        }
        Ok(true)
    }

    /// The chunks the last commit filled, in a transaction of their own that does not wait for
    /// the disk: its pages reach the disk with the next commit's (the WAL is written in order),
    /// and a crash before that loses only index rows, gathered again from the messages at start.
    fn after_commit(&mut self) -> Result<(), StoreError> {
        let accounts = std::mem::take(&mut self.to_flush);
        if accounts.is_empty() {
            return Ok(());
        }
        self.sync_full = false;
        self.set_synchronous("NORMAL")?;
        let result = self.flush_accounts(accounts);
        self.set_synchronous("FULL")?;
        self.sync_full = true;
        result
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let all: Vec<u64> = self.gathered.keys().copied().collect();
        self.flush_accounts(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            Dir(std::env::temp_dir().join(format!("udpmsg-sqlite-{tag}-{}-{nanos}", std::process::id())))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn msg(id: u64, author: &str) -> Message {
        Message {
            id,
            time: 1_700_000_000_000 + id,
            author: author.into(),
            to: None,
            text: format!("text {id}"),
        }
    }

    fn create(user: &str) -> Write {
        Write::CreateAccount { user: user.into(), password_hash: format!("hash of {user}") }
    }

    fn account(s: &mut SqliteStore, name: &str) -> Option<AccountRecord> {
        match s.read(&Read::Account { name: name.into() }).unwrap() {
            ReadResult::Account(a) => a,
            other => panic!("{other:?}"),
        }
    }

    /// The ids of `name`'s inbox, oldest first, as reads see it.
    fn inbox(s: &mut SqliteStore, name: &str) -> Vec<u64> {
        let Some(a) = account(s, name) else { return vec![] };
        match s.read(&Read::Inbox { id: a.id, count: 10_000, before: None, above: None }).unwrap() {
            ReadResult::Inbox { messages, .. } => messages.iter().map(|m| m.id).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// The first column of every row of `sql`.
    fn column(conn: &Connection, sql: &str) -> Vec<i64> {
        conn.prepare(sql).unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    }

    fn collect(s: &mut SqliteStore) {
        s.flush().unwrap();
        while s.maintain(Duration::from_secs(1)).unwrap() {}
    }

    #[test]
    fn batches_survive_reopening_and_start_up_reads_only_sessions_and_counters() {
        let dir = Dir::new("reopen");
        let t = Token([5; 16]);
        {
            let mut s = SqliteStore::open(&dir.0, 3).unwrap();
            assert_eq!(s.begin_epoch().unwrap(), 1);
            s.commit(&[
                create("alice"),
                create("bob"),
                Write::Subscribe { follower: "alice".into(), followed: "bob".into() },
                Write::OpenSession { token: t, user: "alice".into() },
            ])
            .unwrap();
            let alice = account(&mut s, "alice").unwrap().id;
            for id in 1..=5 {
                s.commit(&[Write::StoreMessage { message: msg(id, "bob"), recipients: vec![alice] }])
                    .unwrap();
            }
            s.commit(&[Write::Delivered { user: "alice".into(), up_to: 4 }]).unwrap();
            assert_eq!(
                inbox(&mut s, "alice"),
                vec![3, 4, 5],
                "inbox capped at 3, before any chunk is written"
            );
        }
        let mut s = SqliteStore::open(&dir.0, 3).unwrap();
        assert_eq!(s.begin_epoch().unwrap(), 2, "epochs grow across runs");
        let start = s.load().unwrap();
        assert_eq!(start.sessions.len(), 1);
        let session = &start.sessions[0];
        assert_eq!((session.token, session.user.as_str(), session.last_delivered), (t, "alice", 4));
        assert_eq!((start.next_message_id, start.accounts, start.epoch), (6, 2, 2));
        assert_eq!(inbox(&mut s, "alice"), vec![3, 4, 5], "gathered again after a stop without a flush");
        match s.read(&Read::Followers { name: "bob".into() }).unwrap() {
            ReadResult::Followers(f) => assert_eq!(f, vec![("alice".to_string(), session.user_id)]),
            other => panic!("{other:?}"),
        }
        let alice = account(&mut s, "alice").unwrap();
        match s.read(&Read::Inbox { id: alice.id, count: 2, before: Some(5), above: Some(3) }).unwrap() {
            ReadResult::Inbox { messages, above } => {
                assert_eq!(messages.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3, 4]);
                assert_eq!(messages[1], msg(4, "bob"));
                assert_eq!(above, 2, "4 and 5 are above 3");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunks_are_written_when_full_or_old_and_inboxes_trimmed() {
        let dir = Dir::new("chunks");
        let mut s = SqliteStore::open(&dir.0, 100).unwrap();
        s.commit(&[create("alice"), create("bob")]).unwrap();
        let (alice, bob) = (account(&mut s, "alice").unwrap().id, account(&mut s, "bob").unwrap().id);
        let mut id = 0;
        for _ in 0..10 {
            let batch: Vec<Write> = (0..30)
                .map(|_| {
                    id += 1;
                    Write::StoreMessage { message: msg(id, "carol"), recipients: vec![alice, bob] }
                })
                .collect();
            s.commit(&batch).unwrap();
            // Chunks are written once the commit is reported, before the next one.
            s.after_commit().unwrap();
        }
        let rows = column(&s.conn, "SELECT COUNT(*) FROM inbox");
        assert!(rows[0] >= 2 * 3, "chunks written as they filled: {rows:?}");
        let kept = column(
            &s.conn,
            &format!("SELECT total FROM inbox WHERE account = {alice} ORDER BY last DESC LIMIT 1"),
        );
        assert!(kept[0] <= (100 + trim_slack(100) + CHUNK) as i64, "trimmed: {kept:?}");
        assert!((100..300 - CHUNK as i64).contains(&kept[0]), "trimmed, to no fewer than 100: {kept:?}");
        let chunks = column(&s.conn, &format!("SELECT COUNT(*) FROM inbox WHERE account = {alice}"));
        assert!(chunks[0] <= ((100 + trim_slack(100)) / CHUNK + 2) as i64, "trimmed: {chunks:?}");
        assert_eq!(inbox(&mut s, "alice"), (201..=300).collect::<Vec<_>>(), "the newest 100");
        // What waits longer than FLUSH_AFTER is written by the upkeep.
        s.commit(&[Write::StoreMessage { message: msg(301, "carol"), recipients: vec![alice] }]).unwrap();
        std::thread::sleep(FLUSH_AFTER);
        s.maintain(Duration::from_millis(1)).unwrap();
        assert!(s.gathered.is_empty() || !s.gathered.contains_key(&alice));
        assert_eq!(*inbox(&mut s, "alice").last().unwrap(), 301);
        let indexed = column(&s.conn, "SELECT value FROM meta WHERE key = 'indexed'");
        assert!(indexed[0] >= 301 || s.gathered.contains_key(&bob), "{indexed:?}");
    }

    #[test]
    fn inboxes_filling_in_step_are_written_a_few_per_commit() {
        let dir = Dir::new("in-step");
        let mut s = SqliteStore::open(&dir.0, 1000).unwrap();
        let n = 3 * FULL_PER_COMMIT;
        let names: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
        s.commit(&names.iter().map(|u| create(u)).collect::<Vec<_>>()).unwrap();
        let ids: Vec<u64> = names.iter().map(|u| account(&mut s, u).unwrap().id).collect();
        let chunks =
            |s: &SqliteStore| column(&s.conn, "SELECT COUNT(DISTINCT account) FROM inbox")[0] as usize;
        // One author, n subscribers: every inbox reaches a chunk's worth in the same commit.
        let mut id = 0;
        let mut post = |s: &mut SqliteStore| {
            id += 1;
            s.commit(&[Write::StoreMessage { message: msg(id, "author"), recipients: ids.clone() }]).unwrap();
            s.after_commit().unwrap();
        };
        for _ in 0..CHUNK {
            post(&mut s);
        }
        assert_eq!(
            chunks(&s),
            FULL_PER_COMMIT,
            "only a few inboxes written after the commit that filled them all"
        );
        let mut written = vec![chunks(&s)];
        for _ in 0..3 {
            post(&mut s);
            written.push(chunks(&s));
        }
        assert_eq!(written, [16, 32, 48, 48], "the rest in the next commits, a few at a time");
        // Every read sees every id, written or still gathered.
        for u in &names {
            assert_eq!(inbox(&mut s, u), (1..=CHUNK as u64 + 3).collect::<Vec<_>>(), "{u}");
        }
        // Nobody holds more than two chunks' worth in memory, whatever the order.
        for _ in 0..3 * CHUNK {
            post(&mut s);
            assert!(s.gathered.values().all(|g| g.len() <= 2 * CHUNK));
        }
    }

    /// The index a commit leaves for `after_commit` is not what makes it durable: a daemon
    /// killed before writing it gathers the deliveries again from the messages.
    #[test]
    fn chunks_not_yet_written_are_gathered_again_after_a_crash() {
        let dir = Dir::new("after-commit");
        let mut s = SqliteStore::open(&dir.0, 1000).unwrap();
        s.commit(&[create("alice")]).unwrap();
        let alice = account(&mut s, "alice").unwrap().id;
        for id in 1..=2 * CHUNK as u64 {
            s.commit(&[Write::StoreMessage { message: msg(id, "carol"), recipients: vec![alice] }]).unwrap();
        }
        assert_eq!(column(&s.conn, "SELECT COUNT(*) FROM inbox"), [0], "no chunk written by a commit");
        drop(s); // killed before any after_commit
        let mut s = SqliteStore::open(&dir.0, 1000).unwrap();
        s.begin_epoch().unwrap();
        assert_eq!(inbox(&mut s, "alice"), (1..=2 * CHUNK as u64).collect::<Vec<_>>());
        s.commit(&[Write::StoreMessage { message: msg(200, "carol"), recipients: vec![alice] }]).unwrap();
        s.after_commit().unwrap();
        s.flush().unwrap();
        assert_eq!(inbox(&mut s, "alice").len(), 2 * CHUNK + 1);
        assert!(column(&s.conn, "SELECT COUNT(*) FROM inbox")[0] >= 2);
    }

    /// One batch delivering a low id to a high account id and a higher id to a lower one: the
    /// `indexed` mark must stay below both until their chunks are written, or a crash loses
    /// the first delivery (found in review: the gathering order followed account ids).
    #[test]
    fn the_indexed_mark_never_passes_an_id_only_gathered() {
        let dir = Dir::new("mark");
        let mut s = SqliteStore::open(&dir.0, 1000).unwrap();
        s.commit(&[create("a"), create("b")]).unwrap();
        let (a, b) = (account(&mut s, "a").unwrap().id, account(&mut s, "b").unwrap().id);
        assert!(a < b);
        s.commit(&[
            Write::StoreMessage { message: msg(1, "carol"), recipients: vec![b] },
            Write::StoreMessage { message: msg(2, "carol"), recipients: vec![a] },
        ])
        .unwrap();
        s.commit(&[create("c")]).unwrap(); // any later commit writes the mark
        s.after_commit().unwrap();
        drop(s); // killed
        let mut s = SqliteStore::open(&dir.0, 1000).unwrap();
        s.begin_epoch().unwrap();
        assert_eq!(inbox(&mut s, "b"), [1]);
        assert_eq!(inbox(&mut s, "a"), [2]);
    }

    #[test]
    fn messages_no_inbox_holds_are_collected_and_ids_never_reused() {
        let dir = Dir::new("collect");
        let mut s = SqliteStore::open(&dir.0, 2).unwrap();
        s.commit(&[create("alice"), create("bob")]).unwrap();
        let (a, b) = (account(&mut s, "alice").unwrap().id, account(&mut s, "bob").unwrap().id);
        s.commit(&[
            Write::StoreMessage { message: msg(1, "carol"), recipients: vec![a, b] },
            Write::StoreMessage { message: msg(2, "carol"), recipients: vec![a] },
            Write::StoreMessage { message: msg(3, "carol"), recipients: vec![] },
            Write::StoreMessage { message: msg(4, "carol"), recipients: vec![a, b] },
            Write::StoreMessage { message: msg(5, "carol"), recipients: vec![b] },
        ])
        .unwrap();
        let rows = column(&s.conn, "SELECT id FROM messages ORDER BY id");
        assert_eq!(rows, vec![1, 2, 4, 5], "one row per message, none for a message nobody receives");
        assert_eq!(inbox(&mut s, "alice"), vec![2, 4]);
        assert_eq!(inbox(&mut s, "bob"), vec![4, 5]);
        // Message 1 is in no inbox of 2 any more, once chunks are trimmed: collected. (Trimming
        // keeps up to a chunk more than max_inbox, so push the inboxes along.)
        let mut id = 5;
        for _ in 0..3 * CHUNK {
            id += 1;
            s.commit(&[Write::StoreMessage { message: msg(id, "carol"), recipients: vec![a, b] }]).unwrap();
        }
        collect(&mut s);
        let rows = column(&s.conn, "SELECT id FROM messages ORDER BY id LIMIT 3");
        assert!(rows[0] > 5, "old messages collected: {rows:?}");
        assert_eq!(inbox(&mut s, "alice"), vec![id - 1, id]);
        s.commit(&[
            Write::DeleteAccount { user: "alice".into() },
            Write::DeleteAccount { user: "bob".into() },
        ])
        .unwrap();
        collect(&mut s);
        assert!(column(&s.conn, "SELECT id FROM messages").is_empty(), "no inbox holds anything");
        drop(s);
        let mut s = SqliteStore::open(&dir.0, 2).unwrap();
        s.begin_epoch().unwrap();
        assert_eq!(s.load().unwrap().next_message_id, id + 1, "ids are not reused");
    }

    #[test]
    fn a_name_registered_again_inherits_nothing() {
        let dir = Dir::new("rename");
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.commit(&[create("alice"), create("bob")]).unwrap();
        let (old, bob) = (account(&mut s, "alice").unwrap().id, account(&mut s, "bob").unwrap().id);
        s.commit(&[Write::StoreMessage { message: msg(1, "carol"), recipients: vec![old, bob] }]).unwrap();
        s.commit(&[Write::DeleteAccount { user: "alice".into() }]).unwrap();
        s.commit(&[create("alice")]).unwrap();
        let new = account(&mut s, "alice").unwrap().id;
        assert_ne!(new, old);
        s.commit(&[Write::StoreMessage { message: msg(2, "carol"), recipients: vec![new, old] }]).unwrap();
        assert_eq!(inbox(&mut s, "alice"), vec![2], "the old alice's message stays hers");
        assert_eq!(inbox(&mut s, "bob"), vec![1]);
        s.flush().unwrap();
        assert!(column(&s.conn, &format!("SELECT last FROM inbox WHERE account = {old}")).is_empty());
        assert_eq!(s.load().unwrap().accounts, 2);
    }

    #[test]
    fn relations_names_and_follows_are_paged_reads() {
        let dir = Dir::new("relations");
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        let names = ["amy", "bea", "cal", "dan", "eve"];
        s.commit(&names.iter().map(|n| create(n)).collect::<Vec<_>>()).unwrap();
        let sub = |a: &str, b: &str| Write::Subscribe { follower: a.into(), followed: b.into() };
        s.commit(&[sub("cal", "amy"), sub("cal", "dan"), sub("bea", "cal"), sub("dan", "cal")]).unwrap();
        let rel = |s: &mut SqliteStore, after: &str, limit| match s
            .read(&Read::Relations { name: "cal".into(), after: after.into(), limit })
            .unwrap()
        {
            ReadResult::Relations(r) => {
                r.into_iter().map(|r| (r.user, r.following, r.follower)).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        let s_ = |x: &str| x.to_string();
        assert_eq!(
            rel(&mut s, "", 10),
            vec![(s_("amy"), true, false), (s_("bea"), false, true), (s_("dan"), true, true)]
        );
        assert_eq!(rel(&mut s, "amy", 1), vec![(s_("bea"), false, true)]);
        assert_eq!(s.names("bea", 2).unwrap(), vec!["cal", "dan"]);
        match s.read(&Read::Follows { follower: "cal".into(), followed: "dan".into() }).unwrap() {
            ReadResult::Follows { follows, following } => assert_eq!((follows, following), (true, 2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deleting_an_account_removes_its_data_but_ids_are_never_reused() {
        let dir = Dir::new("delete");
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.commit(&[
            create("alice"),
            create("bob"),
            Write::Subscribe { follower: "alice".into(), followed: "bob".into() },
            Write::OpenSession { token: Token([1; 16]), user: "alice".into() },
        ])
        .unwrap();
        let alice = account(&mut s, "alice").unwrap().id;
        s.commit(&[Write::StoreMessage { message: msg(7, "bob"), recipients: vec![alice] }]).unwrap();
        s.commit(&[Write::DeleteAccount { user: "alice".into() }]).unwrap();
        drop(s);
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.begin_epoch().unwrap();
        let start = s.load().unwrap();
        assert!(start.sessions.is_empty());
        assert_eq!(start.accounts, 1);
        assert_eq!(s.names("", 10).unwrap(), vec!["bob"]);
        assert_eq!(start.next_message_id, 8, "the id of a collected message is not reused");
        match s.read(&Read::Followers { name: "bob".into() }).unwrap() {
            ReadResult::Followers(f) => assert!(f.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_batch_leaves_nothing() {
        let dir = Dir::new("atomic");
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.commit(&[create("alice")]).unwrap();
        let alice = account(&mut s, "alice").unwrap().id;
        // The second insert of the same account violates the primary key: the whole batch fails,
        // message and deliveries included.
        let r = s.commit(&[
            create("bob"),
            Write::StoreMessage { message: msg(1, "x"), recipients: vec![alice] },
            create("alice"),
        ]);
        assert!(r.is_err());
        assert_eq!(s.names("", 10).unwrap(), vec!["alice"]);
        assert!(inbox(&mut s, "alice").is_empty());
        assert!(s.gathered.is_empty());
    }

    #[test]
    fn one_daemon_per_directory() {
        let dir = Dir::new("lock");
        let first = SqliteStore::open(&dir.0, 10).unwrap();
        let t = Instant::now();
        let err = SqliteStore::open(&dir.0, 10).err().unwrap();
        assert!(err.0.contains("another udpmsgd"), "{err}");
        assert!(t.elapsed() >= LOCK_PATIENCE, "it waited for the holder to go first");
        // A holder that goes within that time is waited for.
        let dir2 = dir.0.clone();
        let second = std::thread::spawn(move || SqliteStore::open(&dir2, 10).map(|_| ()));
        std::thread::sleep(Duration::from_millis(300));
        drop(first);
        second.join().unwrap().expect("opened once the first one closed");
    }

    #[test]
    fn newer_schema_and_corrupt_files_are_refused() {
        let dir = Dir::new("newer");
        {
            let s = SqliteStore::open(&dir.0, 10).unwrap();
            s.conn.pragma_update(None, "user_version", 9).unwrap();
        }
        let err = SqliteStore::open(&dir.0, 10).err().unwrap();
        assert!(
            err.0.contains("schema version 9") && err.0.contains(&format!("up to version {SCHEMA_VERSION}")),
            "{err}"
        );

        let dir = Dir::new("corrupt");
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join(DB_FILE), vec![0x42u8; 8192]).unwrap();
        let err = SqliteStore::open(&dir.0, 10).err().unwrap();
        assert!(err.0.contains("udpmsg.db") && err.0.contains("damaged"), "{err}");
        assert_eq!(std::fs::read(dir.0.join(DB_FILE)).unwrap(), vec![0x42u8; 8192], "left untouched");
    }

    #[test]
    fn a_version_2_database_is_migrated_with_its_inboxes() {
        let dir = Dir::new("v2");
        std::fs::create_dir_all(&dir.0).unwrap();
        {
            let conn = Connection::open(dir.0.join(DB_FILE)).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(MIGRATE_V2).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 2;
                 INSERT INTO accounts VALUES ('alice', 'h', 1), ('bob', 'h', 0);
                 INSERT INTO messages VALUES (1, 'carol', NULL, 'one'), (2, 'carol', 'bob', 'dm'),
                     (3, 'carol', NULL, 'three'), (4, 'carol', NULL, 'orphan');
                 INSERT INTO inbox VALUES ('alice', 1), ('bob', 1), ('bob', 2), ('alice', 3);
                 INSERT INTO meta VALUES ('next_message_id', 9), ('epoch', 4);",
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        assert_eq!(s.begin_epoch().unwrap(), 5);
        assert_eq!(inbox(&mut s, "alice"), vec![1, 3]);
        assert_eq!(inbox(&mut s, "bob"), vec![1, 2]);
        let bob = account(&mut s, "bob").unwrap();
        match s.read(&Read::Inbox { id: bob.id, count: 1, before: None, above: None }).unwrap() {
            ReadResult::Inbox { messages, .. } => assert_eq!(
                messages,
                vec![Message {
                    id: 2,
                    time: 0,
                    author: "carol".into(),
                    to: Some("bob".into()),
                    text: "dm".into()
                }]
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(account(&mut s, "alice").unwrap().last_delivered, 1);
        let start = s.load().unwrap();
        assert_eq!((start.next_message_id, start.epoch, start.accounts), (9, 5, 2));
        // New accounts get ids no old account had.
        s.commit(&[create("carol")]).unwrap();
        let ids = column(&s.conn, "SELECT id FROM accounts ORDER BY name");
        assert_eq!(ids, vec![1, 2, 3]);
        let version: i64 = s.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        collect(&mut s);
        assert_eq!(column(&s.conn, "SELECT id FROM messages ORDER BY id"), vec![1, 2, 3], "the orphan went");
    }

    #[test]
    fn sessions_come_back_with_their_age() {
        let dir = Dir::new("ages");
        let t = Token([9; 16]);
        {
            let mut s = SqliteStore::open(&dir.0, 10).unwrap();
            s.commit(&[create("alice"), Write::OpenSession { token: t, user: "alice".into() }]).unwrap();
            s.commit(&[Write::LastReply { token: t, request_id: 7, reply: vec![1, 2] }]).unwrap();
            s.conn.execute("UPDATE sessions SET created = created - 3600", []).unwrap();
        }
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.begin_epoch().unwrap();
        let start = s.load().unwrap();
        let session = start.sessions.iter().find(|s| s.token == t).unwrap();
        assert!((3600..3660).contains(&session.age_secs), "{}", session.age_secs);
        assert_eq!(session.last_reply, Some((7, vec![1, 2])));
    }

    #[test]
    fn an_admin_command_does_not_migrate_under_a_running_daemon() {
        let dir = Dir::new("admin-migrate");
        std::fs::create_dir_all(&dir.0).unwrap();
        {
            let conn = Connection::open(dir.0.join(DB_FILE)).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(MIGRATE_V2).unwrap();
            conn.execute_batch("PRAGMA user_version = 2;").unwrap();
        }
        // An older daemon holds the directory.
        let held = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.0.join(LOCK_FILE))
            .unwrap();
        held.try_lock().unwrap();
        let err = SqliteStore::open_as(&dir.0, 10, Access::Admin).err().unwrap();
        assert!(err.0.contains("schema version 2") && err.0.contains("daemon is running"), "{err}");
        drop(held);
        let s = SqliteStore::open_as(&dir.0, 10, Access::Admin).unwrap();
        let version: i64 = s.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION, "alone, it migrates");
    }

    #[test]
    fn the_data_directory_and_database_are_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = Dir::new("private");
        let _s = SqliteStore::open(&dir.0, 10).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.0), 0o700);
        assert_eq!(mode(&dir.0.join(DB_FILE)), 0o600);
        assert_eq!(mode(&dir.0.join(LOCK_FILE)), 0o600);
    }

    #[test]
    fn count_ids_reads_the_length_prefix() {
        for n in [0usize, 1, 5, 64, 127, 128, 300, 20_000] {
            let ids: Vec<u64> = (0..n as u64).map(|i| i * 1_000_003).collect();
            assert_eq!(count_ids(&encode_ids(&ids)), n);
        }
        assert_eq!(count_ids(&[]), 0);
        assert_eq!(count_ids(&[0xff; 12]), 0, "an endless varint is damage");
    }

    /// Statements are prepared once. With STAT4 compiled in (the bundled SQLite has it) a query
    /// comparing an indexed column with a parameter was marked to re-prepare whenever its
    /// bindings were cleared, which rusqlite's statement cache does at every use: ~34,000
    /// instructions per inbox chunk written or follower list read, a quarter of workload 3's
    /// store thread. The query planner stability guarantee turns that off.
    #[test]
    fn cached_statements_are_not_prepared_again() {
        let dir = Dir::new("reprepare");
        let mut s = SqliteStore::open(&dir.0, 100).unwrap();
        let names: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
        s.commit(&names.iter().map(|n| create(n)).collect::<Vec<_>>()).unwrap();
        let follow = |n: &String| Write::Subscribe { follower: n.clone(), followed: "u0".into() };
        s.commit(&names[1..].iter().map(follow).collect::<Vec<_>>()).unwrap();
        let ids: Vec<u64> = names.iter().map(|n| account(&mut s, n).unwrap().id).collect();
        let mut id = 0;
        for _ in 0..10 {
            let batch: Vec<Write> = (0..2 * CHUNK)
                .map(|_| {
                    id += 1;
                    Write::StoreMessage { message: msg(id, "u0"), recipients: ids.clone() }
                })
                .collect();
            s.commit(&batch).unwrap();
            s.after_commit().unwrap();
            for n in &names {
                s.read(&Read::Followers { name: n.clone() }).unwrap();
            }
        }
        for sql in [
            "SELECT total FROM inbox WHERE account = ?1 ORDER BY last DESC LIMIT 1",
            "SELECT s.follower, a.id FROM subscriptions s JOIN accounts a ON a.name = s.follower \
             WHERE s.followed = ?1",
        ] {
            let st = s.conn.prepare_cached(sql).unwrap();
            assert!(st.get_status(rusqlite::StatementStatus::Run) >= 10, "{sql} ran");
            assert_eq!(st.get_status(rusqlite::StatementStatus::RePrepare), 0, "{sql}");
        }
    }
}
