//! The durable store: one SQLite database file, `udpmsg.db`, in the data directory.
//!
//! - WAL journal with `synchronous=FULL`: a batch that `commit` returned `Ok` for survives a
//!   crash or power loss; one transaction per batch (group commit).
//! - One daemon per directory: an exclusive lock on `udpmsgd.lock`, held while the store lives.
//! - Schema versioned in `PRAGMA user_version` and migrated at open; a database from a newer
//!   version is refused, naming both versions. A damaged file is refused, naming it, never
//!   replaced by an empty one.
//! - A message is one row however many inboxes it lands in: its recipients are a list of account
//!   ids in the row (ids are never reused, so a name registered again after a deletion inherits
//!   nothing). Inboxes are rebuilt at load, the newest `max_inbox` per account; the server writes
//!   [`Write::DropMessage`] when no inbox holds a message any more, and whatever that missed
//!   (an account deleted by an admin command while the daemon was down) goes at the next start.
//!
//! The SQL is plain (no SQLite-only types) so it carries over to PostgreSQL.

use super::{AccountRecord, Snapshot, Store, StoreError, StoredSession, Write};
use crate::proto::{Message, Token};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// The schema this build writes. Version history:
/// 1: accounts, subscriptions, messages, inbox, sessions, meta.
/// 2: sessions remember their last reply (retransmissions across a restart run once).
/// 3: accounts get ids; a message row lists its recipients' ids; the inbox table goes (a post to
///    100 subscribers was 100 inbox rows, plus a trim of each inbox per batch). Sessions
///    remember when they were opened (Unix seconds), so their lifetime counts across restarts.
/// 4: messages remember when they were posted (Unix milliseconds; 0 for older ones).
///
/// A new database is created at this version directly ([`SCHEMA_CURRENT`]); the migrations
/// bring older ones here step by step.
pub const SCHEMA_VERSION: i64 = 4;

pub const DB_FILE: &str = "udpmsg.db";
pub const LOCK_FILE: &str = "udpmsgd.lock";

const MIGRATE_V2: &str = "
ALTER TABLE sessions ADD COLUMN last_request_id INTEGER;
ALTER TABLE sessions ADD COLUMN last_reply BLOB;
";

/// The whole schema at [`SCHEMA_VERSION`], for a new database.
const SCHEMA_CURRENT: &str = "
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    last_delivered INTEGER NOT NULL DEFAULT 0,
    id INTEGER
);
CREATE UNIQUE INDEX accounts_id ON accounts (id);
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
    text TEXT NOT NULL,
    recipients BLOB NOT NULL DEFAULT x'',
    time INTEGER NOT NULL DEFAULT 0
);
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
INSERT INTO meta (key, value) VALUES ('next_account_id', 1);
";

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
    /// Account ids by name, as of the last load (looked up in the database when missing).
    ids: HashMap<String, i64>,
    /// The state read (and cleaned) by `begin_epoch`, handed out by the next `load`.
    loaded: Option<Snapshot>,
}

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
        let lock = match lock.try_lock() {
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
            ids: HashMap::new(),
            loaded: None,
        };
        store.setup()?;
        store.data_version = store.read_data_version()?;
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
        // The first statement reads the header: a file that is not a database fails here.
        let check: String =
            self.conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(|e| self.open_error(e))?;
        if check != "ok" {
            return Err(self.corrupt(check));
        }
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

    fn meta(&self, key: &str) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(|e| err(&self.path, "cannot read", e))
    }

    /// The committed state, the account ids by name, and the messages no inbox holds.
    fn read_all(&self) -> rusqlite::Result<(Snapshot, HashMap<String, i64>, Vec<i64>)> {
        let mut snap = Snapshot::default();
        let mut ids = HashMap::new();
        // Account id -> index in `snap.accounts`.
        let mut by_id: HashMap<i64, usize> = HashMap::new();
        let mut accounts = self
            .conn
            .prepare("SELECT name, password_hash, last_delivered, id FROM accounts ORDER BY name")?;
        let mut rows = accounts.query([])?;
        while let Some(r) = rows.next()? {
            let user: String = r.get(0)?;
            let id: i64 = r.get(3)?;
            by_id.insert(id, snap.accounts.len());
            ids.insert(user.clone(), id);
            snap.accounts.push(AccountRecord {
                user,
                password_hash: r.get(1)?,
                last_delivered: r.get::<_, i64>(2)? as u64,
                inbox: Vec::new(),
            });
        }
        // Newest first: each account takes messages until its inbox is full.
        let mut unreferenced = Vec::new();
        let mut messages = self
            .conn
            .prepare("SELECT id, author, recipient, text, recipients, time FROM messages ORDER BY id DESC")?;
        let mut rows = messages.query([])?;
        let mut max_id = 0;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            max_id = max_id.max(id);
            let mut msg: Option<Message> = None;
            for rid in decode_ids(r.get_ref(4)?.as_blob()?) {
                let Some(&idx) = by_id.get(&(rid as i64)) else { continue };
                if snap.accounts[idx].inbox.len() >= self.max_inbox {
                    continue;
                }
                if msg.is_none() {
                    msg = Some(Message {
                        id: id as u64,
                        time: r.get::<_, i64>(5)? as u64,
                        author: r.get(1)?,
                        to: r.get(2)?,
                        text: r.get(3)?,
                    });
                }
                snap.accounts[idx].inbox.push(msg.clone().expect("just set"));
            }
            if msg.is_none() {
                unreferenced.push(id);
            }
        }
        for a in &mut snap.accounts {
            a.inbox.reverse();
        }
        let mut subs = self.conn.prepare("SELECT follower, followed FROM subscriptions")?;
        for s in subs.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
            snap.subscriptions.push(s?);
        }
        let mut sessions = self.conn.prepare(
            "SELECT token, user_name, last_request_id, last_reply, \
                 MAX(0, CAST(strftime('%s', 'now') AS INTEGER) - created) FROM sessions",
        )?;
        let rows = sessions.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for s in rows {
            let (t, user, last_id, last_reply, age) = s?;
            if let Ok(bytes) = <[u8; 16]>::try_from(t.as_slice()) {
                snap.sessions.push(StoredSession { token: Token(bytes), user, age_secs: age as u64 });
                if let (Some(id), Some(reply)) = (last_id, last_reply) {
                    snap.last_replies.push((Token(bytes), id as u64, reply));
                }
            }
        }
        snap.next_message_id =
            (max_id as u64 + 1).max(self.meta("next_message_id").unwrap_or(0) as u64).max(1);
        snap.epoch = self.meta("epoch").unwrap_or(0) as u32;
        Ok((snap, ids, unreferenced))
    }

    /// Removes messages no inbox holds any more (run at startup).
    fn delete_messages(&mut self, ids: &[i64]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?;
            for id in ids {
                del.execute([id])?;
            }
        }
        tx.commit()
    }
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

/// A recipient list as stored: the account ids, postcard-encoded (varints).
fn encode_ids(ids: &[u64]) -> Vec<u8> {
    postcard::to_stdvec(ids).expect("integers serialize")
}

/// The ids of a stored recipient list; a damaged list reads as empty (the message is then
/// collected, not a reason to refuse the whole database).
fn decode_ids(bytes: &[u8]) -> Vec<u64> {
    postcard::from_bytes(bytes).unwrap_or_default()
}

/// A name's account id, from the cache or the database (an account an admin command added).
fn account_id(
    tx: &rusqlite::Transaction<'_>,
    ids: &HashMap<String, i64>,
    name: &str,
) -> rusqlite::Result<Option<i64>> {
    if let Some(id) = ids.get(name) {
        return Ok(Some(*id));
    }
    tx.prepare_cached("SELECT id FROM accounts WHERE name = ?1")?.query_row([name], |r| r.get(0)).optional()
}

/// Applies one batch inside `tx`; `ids` follows the accounts created and deleted (the caller
/// reloads it if the batch fails).
fn apply(
    tx: &rusqlite::Transaction<'_>,
    ids: &mut HashMap<String, i64>,
    batch: &[Write],
) -> rusqlite::Result<()> {
    let mut next_message_id = None;
    let mut recipient_ids: Vec<u64> = Vec::new();
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
                ids.insert(user.clone(), id);
            }
            Write::DeleteAccount { user } => {
                for sql in [
                    "DELETE FROM accounts WHERE name = ?1",
                    "DELETE FROM subscriptions WHERE follower = ?1 OR followed = ?1",
                    "DELETE FROM sessions WHERE user_name = ?1",
                ] {
                    tx.prepare_cached(sql)?.execute([user])?;
                }
                ids.remove(user);
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
                recipient_ids.clear();
                for r in recipients {
                    if let Some(id) = account_id(tx, ids, r)? {
                        recipient_ids.push(id as u64);
                    }
                }
                // A message nobody receives only uses up its id.
                if recipient_ids.is_empty() {
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
                    encode_ids(&recipient_ids),
                    message.time as i64
                ])?;
            }
            Write::DropMessage { id } => {
                tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?.execute([*id as i64])?;
            }
            Write::Delivered { user, up_to } => {
                tx.prepare_cached(
                    "UPDATE accounts SET last_delivered = MAX(last_delivered, ?2) WHERE name = ?1",
                )?
                .execute(params![user, *up_to as i64])?;
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
    Ok(())
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
        // Read everything once at the start: the messages no inbox holds go now, and the next
        // `load` gets what was read.
        let (mut snap, ids, unreferenced) = self.read_all().map_err(|e| err(&self.path, "cannot read", e))?;
        snap.epoch = epoch as u32;
        self.ids = ids;
        self.loaded = Some(snap);
        if !unreferenced.is_empty() {
            match self.delete_messages(&unreferenced) {
                Ok(()) => log::info!("removed {} messages no inbox holds", unreferenced.len()),
                Err(e) => log::warn!("{}: cannot remove unreferenced messages: {e}", self.path.display()),
            }
        }
        Ok(epoch as u32)
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        if let Some(snap) = self.loaded.take() {
            return Ok(snap);
        }
        let (mut snap, ids, _) = self.read_all().map_err(|e| err(&self.path, "cannot read", e))?;
        snap.recreated = ids
            .iter()
            .filter(|(name, id)| self.ids.get(*name).is_some_and(|old| old != *id))
            .map(|(name, _)| name.clone())
            .collect();
        self.ids = ids;
        Ok(snap)
    }

    fn changed_externally(&mut self) -> Result<bool, StoreError> {
        let v = self.read_data_version()?;
        let changed = v != self.data_version;
        self.data_version = v;
        Ok(changed)
    }

    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        self.loaded = None;
        let tx = self.conn.transaction().map_err(|e| err(&self.path, "cannot begin a transaction", e))?;
        let result = match apply(&tx, &mut self.ids, batch) {
            Ok(()) => tx.commit().map_err(|e| err(&self.path, "commit failed", e)),
            Err(e) => {
                let _ = tx.rollback();
                Err(err(&self.path, "write failed", e))
            }
        };
        if result.is_err() {
            // The id cache may hold accounts the batch created: read it again.
            if let Ok((_, ids, _)) = self.read_all() {
                self.ids = ids;
            }
        }
        result
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

    #[test]
    fn batches_survive_reopening() {
        let dir = Dir::new("reopen");
        let t = Token([5; 16]);
        {
            let mut s = SqliteStore::open(&dir.0, 3).unwrap();
            assert_eq!(s.begin_epoch().unwrap(), 1);
            s.commit(&[
                Write::CreateAccount { user: "alice".into(), password_hash: "h1".into() },
                Write::CreateAccount { user: "bob".into(), password_hash: "h2".into() },
                Write::Subscribe { follower: "alice".into(), followed: "bob".into() },
                Write::OpenSession { token: t, user: "alice".into() },
            ])
            .unwrap();
            for id in 1..=5 {
                s.commit(&[Write::StoreMessage {
                    message: msg(id, "bob"),
                    recipients: vec!["alice".into()],
                }])
                .unwrap();
            }
            s.commit(&[Write::Delivered { user: "alice".into(), up_to: 4 }]).unwrap();
        }
        let mut s = SqliteStore::open(&dir.0, 3).unwrap();
        assert_eq!(s.begin_epoch().unwrap(), 2, "epochs grow across runs");
        let snap = s.load().unwrap();
        let alice = snap.accounts.iter().find(|a| a.user == "alice").unwrap();
        assert_eq!(alice.inbox.iter().map(|m| m.id).collect::<Vec<_>>(), vec![3, 4, 5], "inbox capped at 3");
        assert_eq!(alice.last_delivered, 4);
        assert_eq!(snap.subscriptions, vec![("alice".to_string(), "bob".to_string())]);
        assert_eq!(
            snap.sessions.iter().map(|s| (s.token, s.user.as_str())).collect::<Vec<_>>(),
            [(t, "alice")]
        );
        assert_eq!(snap.next_message_id, 6);
        assert_eq!(snap.epoch, 2);
    }

    #[test]
    fn deleting_an_account_removes_its_data_but_ids_are_never_reused() {
        let dir = Dir::new("delete");
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.commit(&[
            Write::CreateAccount { user: "alice".into(), password_hash: "h".into() },
            Write::CreateAccount { user: "bob".into(), password_hash: "h".into() },
            Write::Subscribe { follower: "alice".into(), followed: "bob".into() },
            Write::StoreMessage { message: msg(7, "bob"), recipients: vec!["alice".into()] },
            Write::OpenSession { token: Token([1; 16]), user: "alice".into() },
        ])
        .unwrap();
        s.commit(&[Write::DeleteAccount { user: "alice".into() }]).unwrap();
        drop(s);
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.begin_epoch().unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.accounts.iter().map(|a| a.user.as_str()).collect::<Vec<_>>(), vec!["bob"]);
        assert!(snap.subscriptions.is_empty() && snap.sessions.is_empty());
        assert_eq!(snap.next_message_id, 8, "the id of a collected message is not reused");
    }

    #[test]
    fn a_failed_batch_leaves_nothing() {
        let dir = Dir::new("atomic");
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.commit(&[Write::CreateAccount { user: "alice".into(), password_hash: "h".into() }]).unwrap();
        // The second insert of the same account violates the primary key: the whole batch fails.
        let r = s.commit(&[
            Write::CreateAccount { user: "bob".into(), password_hash: "h".into() },
            Write::CreateAccount { user: "alice".into(), password_hash: "h".into() },
        ]);
        assert!(r.is_err());
        let names: Vec<String> = s.load().unwrap().accounts.into_iter().map(|a| a.user).collect();
        assert_eq!(names, vec!["alice"]);
    }

    #[test]
    fn one_daemon_per_directory() {
        let dir = Dir::new("lock");
        let _first = SqliteStore::open(&dir.0, 10).unwrap();
        let err = SqliteStore::open(&dir.0, 10).err().unwrap();
        assert!(err.0.contains("another udpmsgd"), "{err}");
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
    /// The first column of every row of `sql`.
    fn column(conn: &Connection, sql: &str) -> Vec<i64> {
        conn.prepare(sql).unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    }

    fn inbox(snap: &Snapshot, user: &str) -> Vec<u64> {
        snap.accounts.iter().find(|a| a.user == user).unwrap().inbox.iter().map(|m| m.id).collect()
    }

    fn reopen(dir: &Dir, max_inbox: usize) -> Snapshot {
        let mut s = SqliteStore::open(&dir.0, max_inbox).unwrap();
        s.begin_epoch().unwrap();
        s.load().unwrap()
    }

    #[test]
    fn one_row_per_message_inboxes_rebuilt_and_collected() {
        let dir = Dir::new("rows");
        {
            let mut s = SqliteStore::open(&dir.0, 2).unwrap();
            s.commit(&[
                Write::CreateAccount { user: "alice".into(), password_hash: "h".into() },
                Write::CreateAccount { user: "bob".into(), password_hash: "h".into() },
            ])
            .unwrap();
            let both = vec!["alice".to_string(), "bob".to_string()];
            s.commit(&[
                Write::StoreMessage { message: msg(1, "carol"), recipients: both.clone() },
                Write::StoreMessage { message: msg(2, "carol"), recipients: vec!["alice".into()] },
                Write::StoreMessage { message: msg(3, "carol"), recipients: vec![] },
                Write::StoreMessage { message: msg(4, "carol"), recipients: both },
                Write::StoreMessage { message: msg(5, "carol"), recipients: vec!["bob".into()] },
            ])
            .unwrap();
            let rows: i64 = s.conn.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0)).unwrap();
            assert_eq!(rows, 4, "one row per message, none for a message nobody receives");
        }
        let snap = reopen(&dir, 2);
        assert_eq!(inbox(&snap, "alice"), vec![2, 4]);
        assert_eq!(inbox(&snap, "bob"), vec![4, 5]);
        assert_eq!(snap.next_message_id, 6, "the id of an unstored message is not reused");
        // Message 1 is in no inbox of 2 any more: it went at that start.
        let s = SqliteStore::open_as(&dir.0, 2, Access::Admin).unwrap();
        let ids = column(&s.conn, "SELECT id FROM messages ORDER BY id");
        assert_eq!(ids, vec![2, 4, 5]);
    }

    #[test]
    fn a_name_registered_again_inherits_nothing() {
        let dir = Dir::new("rename");
        {
            let mut s = SqliteStore::open(&dir.0, 10).unwrap();
            s.commit(&[
                Write::CreateAccount { user: "alice".into(), password_hash: "old".into() },
                Write::CreateAccount { user: "bob".into(), password_hash: "h".into() },
                Write::StoreMessage {
                    message: msg(1, "carol"),
                    recipients: vec!["alice".into(), "bob".into()],
                },
            ])
            .unwrap();
            s.commit(&[Write::DeleteAccount { user: "alice".into() }]).unwrap();
            s.commit(&[Write::CreateAccount { user: "alice".into(), password_hash: "new".into() }]).unwrap();
            s.commit(&[Write::StoreMessage { message: msg(2, "carol"), recipients: vec!["alice".into()] }])
                .unwrap();
        }
        let snap = reopen(&dir, 10);
        assert_eq!(inbox(&snap, "alice"), vec![2], "the old alice's message stays hers");
        assert_eq!(inbox(&snap, "bob"), vec![1]);
    }

    #[test]
    fn dropped_messages_leave_storage() {
        let dir = Dir::new("drop");
        let mut s = SqliteStore::open(&dir.0, 10).unwrap();
        s.commit(&[
            Write::CreateAccount { user: "alice".into(), password_hash: "h".into() },
            Write::StoreMessage { message: msg(1, "bob"), recipients: vec!["alice".into()] },
            Write::StoreMessage { message: msg(2, "bob"), recipients: vec!["alice".into()] },
        ])
        .unwrap();
        s.commit(&[Write::DropMessage { id: 1 }]).unwrap();
        assert_eq!(inbox(&s.load().unwrap(), "alice"), vec![2]);
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
        let snap = reopen(&dir, 10);
        assert_eq!(inbox(&snap, "alice"), vec![1, 3]);
        assert_eq!(inbox(&snap, "bob"), vec![1, 2]);
        let bob = snap.accounts.iter().find(|a| a.user == "bob").unwrap();
        assert_eq!(
            bob.inbox[1],
            Message { id: 2, time: 0, author: "carol".into(), to: Some("bob".into()), text: "dm".into() }
        );
        assert_eq!(snap.accounts[0].last_delivered, 1);
        assert_eq!((snap.next_message_id, snap.epoch), (9, 5));
        // New accounts get ids no old account had.
        let mut s = SqliteStore::open_as(&dir.0, 10, Access::Admin).unwrap();
        s.commit(&[Write::CreateAccount { user: "carol".into(), password_hash: "h".into() }]).unwrap();
        let ids = column(&s.conn, "SELECT id FROM accounts ORDER BY name");
        assert_eq!(ids, vec![1, 2, 3]);
        let version: i64 = s.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn sessions_come_back_with_their_age() {
        let dir = Dir::new("ages");
        let t = Token([9; 16]);
        {
            let mut s = SqliteStore::open(&dir.0, 10).unwrap();
            s.commit(&[
                Write::CreateAccount { user: "alice".into(), password_hash: "h".into() },
                Write::OpenSession { token: t, user: "alice".into() },
            ])
            .unwrap();
            s.conn.execute("UPDATE sessions SET created = created - 3600", []).unwrap();
        }
        let snap = reopen(&dir, 10);
        let age = snap.sessions.iter().find(|s| s.token == t).unwrap().age_secs;
        assert!((3600..3660).contains(&age), "{age}");
    }

    #[test]
    fn a_name_deleted_and_added_again_beside_the_daemon_is_reported() {
        let dir = Dir::new("recreated");
        let mut daemon = SqliteStore::open(&dir.0, 10).unwrap();
        daemon.begin_epoch().unwrap();
        daemon
            .commit(&[
                Write::CreateAccount { user: "alice".into(), password_hash: "h1".into() },
                Write::CreateAccount { user: "bob".into(), password_hash: "h1".into() },
            ])
            .unwrap();
        assert!(daemon.load().unwrap().recreated.is_empty());
        let mut admin = SqliteStore::open_as(&dir.0, 10, Access::Admin).unwrap();
        admin.commit(&[Write::DeleteAccount { user: "alice".into() }]).unwrap();
        admin.commit(&[Write::CreateAccount { user: "alice".into(), password_hash: "h2".into() }]).unwrap();
        admin.commit(&[Write::SetPassword { user: "bob".into(), password_hash: "h2".into() }]).unwrap();
        assert!(daemon.changed_externally().unwrap());
        let snap = daemon.load().unwrap();
        assert_eq!(snap.recreated, vec!["alice".to_string()], "bob only changed his password");
        assert!(daemon.load().unwrap().recreated.is_empty(), "reported once");
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
}
