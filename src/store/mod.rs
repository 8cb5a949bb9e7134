//! Storage behind a small trait.
//!
//! The server core keeps the working state in memory and describes every change as a [`Write`].
//! The I/O shell hands each turn's writes to [`Store::commit`] as one batch (group commit) and
//! only then releases the replies and pushes that depend on them (see
//! [`crate::server::Server::take_writes`]). At startup [`Store::load`] returns the committed state
//! as a [`Snapshot`].
//!
//! Implementations: [`memory::MemoryStore`] (tests, experiments). A durable one plugs in here.

pub mod memory;
pub mod sqlite;

use crate::proto::{Message, Token};
use std::fmt;

/// One durable change. A batch is applied atomically, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    CreateAccount {
        user: String,
        password_hash: String,
    },
    /// Removes the account, its inbox, its sessions and its subscriptions in both directions.
    DeleteAccount {
        user: String,
    },
    /// A new password hash; every session of the user is revoked.
    SetPassword {
        user: String,
        password_hash: String,
    },
    Subscribe {
        follower: String,
        followed: String,
    },
    Unsubscribe {
        follower: String,
        followed: String,
    },
    /// A new message and the inboxes it lands in.
    StoreMessage {
        message: Message,
        recipients: Vec<String>,
    },
    /// A message no inbox holds any more (the last one trimmed it or was deleted).
    DropMessage {
        id: u64,
    },
    /// The reply to the newest request of a session that changed anything, so that its
    /// retransmission after a daemon restart is answered, not executed again.
    LastReply {
        token: Token,
        request_id: u64,
        reply: Vec<u8>,
    },
    /// The newest message id delivered to (acked by) any of the user's sessions. Written lazily
    /// (see [`crate::server::DELIVERED_FLUSH`]): after a crash, catch-up may repeat up to that
    /// much of what was already delivered, never skip anything.
    Delivered {
        user: String,
        up_to: u64,
    },
    OpenSession {
        token: Token,
        user: String,
    },
    CloseSession {
        token: Token,
    },
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub user: String,
    pub password_hash: String,
    pub last_delivered: u64,
    /// Oldest first.
    pub inbox: Vec<Message>,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub token: Token,
    pub user: String,
    /// Seconds since it was opened, by the store's clock (0 if the store cannot tell), so that
    /// `session_max_lifetime_secs` counts across restarts.
    pub age_secs: u64,
}

/// The whole committed state, as loaded at startup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub accounts: Vec<AccountRecord>,
    /// (follower, followed)
    pub subscriptions: Vec<(String, String)>,
    pub sessions: Vec<StoredSession>,
    /// Names that belong to another account than at the store's previous load: deleted and
    /// added again (by an admin command) in between. The new owner inherits nothing.
    pub recreated: Vec<String>,
    /// (session, request id, encoded reply) from [`Write::LastReply`].
    pub last_replies: Vec<(Token, u64, Vec<u8>)>,
    /// One more than the highest message id ever stored (ids are never reused).
    pub next_message_id: u64,
    /// This run's number (see [`Store::begin_epoch`] and [`crate::proto::ServerMsg::Push`]).
    pub epoch: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

pub trait Store {
    /// Starts a daemon run: returns a number larger than any earlier run's, durably.
    fn begin_epoch(&mut self) -> Result<u32, StoreError>;
    /// The committed state (with `epoch` as of the last `begin_epoch`). Only reads.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Applies a batch atomically: after `Ok` all of it survives a crash, after `Err` none of it
    /// is visible.
    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError>;
    /// Whether another process (an admin command) changed the store since the last call.
    fn changed_externally(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }
}
