//! `udpmsgd user add|passwd|del|list`: account administration on the data directory.
//!
//! These open the SQLite store directly. With the daemon stopped they are the only writer; with
//! it running they write beside it (SQLite serializes the two) and the daemon picks the change
//! up within a second: a new account can log in, a deleted one is gone with its sessions, and a
//! new password ends every session of that user.

use std::io::{BufRead, IsTerminal};
use udpmsg::config::{ServerConfig, StorageKind};
use udpmsg::password::{self, HashParams};
use udpmsg::proto;
use udpmsg::store::sqlite::{Access, SqliteStore};
use udpmsg::store::{Store, Write};

/// Opens the daemon's database, which must exist: an admin command never creates one (a
/// mistyped or forgotten --data-dir would otherwise leave a stray database behind, silently).
fn open(cfg: &ServerConfig) -> Result<SqliteStore, String> {
    if cfg.storage != StorageKind::Sqlite {
        return Err("storage is \"memory\": there are no stored accounts to manage".into());
    }
    let db = cfg.data_dir.join(udpmsg::store::sqlite::DB_FILE);
    if !db.exists() {
        return Err(format!(
            "no database at {} (use --data-dir, or start udpmsgd once to create it there)",
            db.display()
        ));
    }
    SqliteStore::open_as(&cfg.data_dir, cfg.max_inbox as usize, Access::Admin).map_err(|e| e.to_string())
}

/// Every account name, in name order (read a page at a time).
fn accounts(store: &mut SqliteStore) -> Result<Vec<String>, String> {
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

fn exists(store: &mut SqliteStore, name: &str) -> Result<bool, String> {
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

fn done(store: &SqliteStore, what: &str) {
    if store.exclusive() {
        println!("{what}");
    } else {
        println!("{what} (the running daemon picks this up within a second)");
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
