//! `udpmsgd user add|passwd|del|list`: account administration on the data directory, and
//! `udpmsgd nodes` for the daemons sharing a PostgreSQL database.
//!
//! These open the store directly. SQLite: with the daemon stopped they are the only writer; with
//! it running they write beside it (SQLite serializes the two) and the daemon picks the change
//! up within a second. PostgreSQL: they write like any node, and every node hears of it at once
//! (the same events a node's own commits send). Either way a new account can log in, a deleted
//! one is gone with its sessions, and a new password ends every session of that user.

use std::io::{BufRead, IsTerminal};
use udpmsg::config::{ServerConfig, StorageKind};
use udpmsg::password::{self, HashParams};
use udpmsg::proto;
use udpmsg::store::postgres::{self, PgStore};
use udpmsg::store::sqlite::{Access, SqliteStore};
use udpmsg::store::{Read, ReadResult, Store, StoreError, Write};

/// The store an admin command works on.
enum AdminStore {
    Sqlite(Box<SqliteStore>),
    Postgres(Box<PgStore>),
}

impl AdminStore {
    fn store(&mut self) -> &mut dyn Store {
        match self {
            AdminStore::Sqlite(s) => s.as_mut(),
            AdminStore::Postgres(s) => s.as_mut(),
        }
    }

    fn names(&mut self, after: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        match self {
            AdminStore::Sqlite(s) => s.names(after, limit),
            AdminStore::Postgres(s) => s.names(after, limit),
        }
    }

    fn read(&mut self, read: &Read) -> Result<ReadResult, StoreError> {
        self.store().read(read)
    }

    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        self.store().commit(batch)
    }
}

fn open_pg(cfg: &ServerConfig) -> Result<PgStore, String> {
    let password_file =
        (!cfg.postgres_password_file.is_empty()).then(|| std::path::Path::new(&cfg.postgres_password_file));
    let config = postgres::connect_config(&cfg.postgres_url, password_file).map_err(|e| e.to_string())?;
    PgStore::open_admin(config, cfg.max_inbox as usize).map_err(|e| e.to_string())
}

fn open(cfg: &ServerConfig) -> Result<AdminStore, String> {
    match cfg.storage {
        StorageKind::Memory => Err("storage is \"memory\": there are no stored accounts to manage".into()),
        StorageKind::Sqlite => {
            // The daemon's database must exist: an admin command never creates one (a mistyped
            // or forgotten --data-dir would otherwise leave a stray database behind, silently).
            let db = cfg.data_dir.join(udpmsg::store::sqlite::DB_FILE);
            if !db.exists() {
                return Err(format!(
                    "no database at {} (use --data-dir, or start udpmsgd once to create it there)",
                    db.display()
                ));
            }
            SqliteStore::open_as(&cfg.data_dir, cfg.max_inbox as usize, Access::Admin)
                .map(|s| AdminStore::Sqlite(Box::new(s)))
                .map_err(|e| e.to_string())
        }
        StorageKind::Postgres => open_pg(cfg).map(|s| AdminStore::Postgres(Box::new(s))),
    }
}

/// `udpmsgd nodes`: the daemons on the PostgreSQL database, their sessions and last heartbeat.
pub fn nodes(cfg: &ServerConfig) -> Result<(), String> {
    if cfg.storage != StorageKind::Postgres {
        return Err(format!(
            "storage is {:?}: nodes are the daemons sharing a PostgreSQL database (storage = \"postgres\")",
            cfg.storage
        ));
    }
    let mut store = open_pg(cfg)?;
    let nodes = store.nodes().map_err(|e| e.to_string())?;
    println!(
        "{:>4}  {:<24} {:<22} {:>8} {:>9}  {:<8} {:>8}",
        "id", "name", "listen", "sessions", "heartbeat", "state", "up"
    );
    for n in nodes {
        let state = if n.stopped {
            "stopped"
        } else if n.heartbeat_age_secs <= postgres::LIVE_SECS as f64 {
            "live"
        } else {
            "down"
        };
        println!(
            "{:>4}  {:<24} {:<22} {:>8} {:>8.1}s  {:<8} {:>7.0}s",
            n.id, n.name, n.listen, n.sessions, n.heartbeat_age_secs, state, n.up_secs
        );
    }
    Ok(())
}

/// Every account name, in name order (read a page at a time).
fn accounts(store: &mut AdminStore) -> Result<Vec<String>, String> {
    let mut all: Vec<String> = Vec::new();
    loop {
        let after = all.last().cloned().unwrap_or_default();
        let page = store.names(&after, 4096).map_err(|e| e.to_string())?;
        let done = page.len() < 4096;
        all.extend(page);
        if done {
            return Ok(all);
        }
    }
}

fn exists(store: &mut AdminStore, name: &str) -> Result<bool, String> {
    match store.read(&udpmsg::store::Read::Account { name: name.to_string() }).map_err(|e| e.to_string())? {
        udpmsg::store::ReadResult::Account(a) => Ok(a.is_some()),
        _ => Ok(false),
    }
}

/// A password from a no-echo prompt (asked twice), or one line of stdin when it is not a terminal.
fn read_password(cfg: &ServerConfig, name: &str) -> Result<String, String> {
    let password = if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(format!("password for {name}: ")).map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("again: ").map_err(|e| e.to_string())?;
        if p != again {
            return Err("the passwords differ".into());
        }
        p
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map_err(|e| e.to_string())?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    let (min, max) = (cfg.min_password_len as usize, cfg.max_password_len as usize);
    if password.len() < min || password.len() > max {
        return Err(format!("invalid password: {min} to {max} bytes"));
    }
    Ok(password)
}

fn hash(cfg: &ServerConfig, password: &str) -> Result<String, String> {
    let params = HashParams {
        memory_kib: cfg.argon2_memory_kib,
        iterations: cfg.argon2_iterations,
        parallelism: cfg.argon2_parallelism,
    };
    password::hash(password, params).ok_or_else(|| "cannot hash the password".to_string())
}

fn done(store: &AdminStore, what: &str) {
    match store {
        AdminStore::Sqlite(s) if s.exclusive() => println!("{what}"),
        AdminStore::Sqlite(_) => println!("{what} (the running daemon picks this up within a second)"),
        AdminStore::Postgres(_) => println!("{what} (every running node hears of it at once)"),
    }
}

pub fn add(cfg: &ServerConfig, name: &str) -> Result<(), String> {
    if !proto::valid_name(name, cfg.max_name_len as usize) {
        return Err(proto::ErrorCode::InvalidName { max_len: cfg.max_name_len }.to_string());
    }
    let mut store = open(cfg)?;
    if exists(&mut store, name)? {
        return Err(format!("name {name} is taken"));
    }
    let password_hash = hash(cfg, &read_password(cfg, name)?)?;
    store.commit(&[Write::CreateAccount { user: name.into(), password_hash }]).map_err(|e| e.to_string())?;
    done(&store, &format!("added {name}"));
    Ok(())
}

pub fn passwd(cfg: &ServerConfig, name: &str) -> Result<(), String> {
    let mut store = open(cfg)?;
    if !exists(&mut store, name)? {
        return Err(format!("no such user {name}"));
    }
    let password_hash = hash(cfg, &read_password(cfg, name)?)?;
    store.commit(&[Write::SetPassword { user: name.into(), password_hash }]).map_err(|e| e.to_string())?;
    done(&store, &format!("password of {name} changed; its sessions are ended"));
    Ok(())
}

pub fn del(cfg: &ServerConfig, name: &str) -> Result<(), String> {
    let mut store = open(cfg)?;
    if !exists(&mut store, name)? {
        return Err(format!("no such user {name}"));
    }
    store.commit(&[Write::DeleteAccount { user: name.into() }]).map_err(|e| e.to_string())?;
    done(&store, &format!("deleted {name}"));
    Ok(())
}

pub fn list(cfg: &ServerConfig) -> Result<(), String> {
    let mut store = open(cfg)?;
    for name in accounts(&mut store)? {
        println!("{name}");
    }
    Ok(())
}
