//! Storage behind a small trait: the store is the truth, the core a bounded cache of it.
//!
//! The server core keeps in memory only what live traffic needs (sessions, and bounded caches
//! of accounts, follower lists and inbox heads). Everything else it asks for with a [`Read`],
//! which the I/O shell runs off the event loop and hands back as a [`ReadResult`]. Every change
//! is a [`Write`]; the shell hands each turn's writes to [`Store::commit`] as one batch (group
//! commit) and only then releases the replies and pushes that depend on them (see
//! [`crate::server::Server::take_writes`]). Reads and commits are served in the order the core
//! issued them (one store thread, first in first out), so a read issued after a write sees it.
//!
//! At startup [`Store::load`] returns only what the core needs to begin ([`Startup`]): the
//! sessions and a few counters, nothing that grows with accounts or messages.
//!
//! Implementations: [`sqlite::SqliteStore`] (durable, the default), [`postgres::PgStore`] (several
//! daemons on one database) and [`memory::MemoryStore`] (tests, experiments).
//!
//! # Shared stores
//!
//! A store that several daemons (nodes) share says so in [`Startup::node`]. Then the core's
//! sessions are only those this node holds, and what other nodes commit reaches it as
//! [`Remote`] inputs: messages for its sessions, sessions that ended or moved elsewhere, and
//! changes that make what it cached stale. A request whose token this node does not hold asks
//! the store to take the session over ([`Read::Claim`]).

pub mod memory;
pub mod postgres;
pub mod sqlite;

use crate::proto::{Message, Relation, Token};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by account or message ids: numbers the daemon hands out in sequence, never chosen
/// by a peer, so SipHash's resistance to chosen keys buys nothing and costs a third of a batch's
/// bookkeeping (every recipient of every message is hashed several times per commit).
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Multiply-fold hashing of one `u64`: the product mixes every bit into the high half, which the
/// fold brings down to the low bits the table indexes by.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let h = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One durable change. A batch is applied atomically, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// A new account; the store gives it an id never used before.
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
    /// A new message and the inboxes (account ids) it lands in. A message nobody receives is not
    /// stored (its id is used up all the same).
    StoreMessage {
        message: Message,
        recipients: Vec<u64>,
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
    /// Address prefixes that logged in to the account, newest first, encoded by the core (the
    /// per-account brake on password guessing does not apply to them).
    KnownAddresses {
        user: String,
        known: Vec<u8>,
    },
    OpenSession {
        token: Token,
        user: String,
    },
    CloseSession {
        token: Token,
    },
}

/// What the core asks the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Read {
    /// The account with this name, if any.
    Account { name: String },
    /// Who follows `name`, with their account ids (a post's recipients).
    Followers { name: String },
    /// Whether `follower` follows `followed`, and how many accounts `follower` follows.
    Follows { follower: String, followed: String },
    /// The inbox of account `id`, as it is limited to its newest `max_inbox` messages: the
    /// newest `count` with an id below `before` (all if `None`), oldest first; and how many of
    /// the inbox's messages have an id above `above` (0 if `None`).
    Inbox { id: u64, count: u32, before: Option<u64>, above: Option<u64> },
    /// Up to `limit` account names after `after`, in name order.
    Names { after: String, limit: u32 },
    /// Up to `limit` relations of `name` after the name `after`, in name order: whom it follows
    /// and who follows it, merged.
    Relations { name: String, after: String, limit: u32 },
    /// Shared stores only: take over the session `token`, wherever it is held, and read the
    /// newest `catch_up` messages of its inbox once every commit that could have missed the
    /// move has ended. Other stores hold no session the core does not, and answer `None`.
    Claim { token: Token, catch_up: u32 },
}

impl Read {
    /// Short name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Read::Account { .. } => "account",
            Read::Followers { .. } => "followers",
            Read::Follows { .. } => "follows",
            Read::Inbox { .. } => "inbox",
            Read::Names { .. } => "names",
            Read::Relations { .. } => "relations",
            Read::Claim { .. } => "claim",
        }
    }
}

/// The answer to a [`Read`] of the same kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadResult {
    Account(Option<AccountRecord>),
    Followers(Vec<(String, u64)>),
    Follows { follows: bool, following: u32 },
    Inbox { messages: Vec<Message>, above: u32 },
    Names(Vec<String>),
    Relations(Vec<Relation>),
    Claimed(Option<Claimed>),
}

/// A session taken over from another node (or from a node that stopped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub session: StoredSession,
    /// The epoch its pushes are numbered in from now on: larger than any its client has seen.
    pub epoch: u32,
    /// The newest messages of its inbox, oldest first (the client drops those it has shown).
    pub catch_up: Vec<Message>,
}

/// Messages, each with the recipients (name, account id) a node holds sessions of.
pub type Deliveries = Vec<(Message, Vec<(String, u64)>)>;

/// What other nodes of a shared store committed that this node must act on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Remote {
    /// Messages committed elsewhere, each with the recipients (name, account id) that have
    /// sessions on this node.
    Messages(Deliveries),
    /// Sessions of this node that another node took over: forget them, silently.
    Moved(Vec<Token>),
    /// Sessions of this node that ended elsewhere (account deleted, password changed): their
    /// holders are told their session expired.
    Ended(Vec<Token>),
    /// Accounts created, deleted or changed, and users whose followers changed: what is cached
    /// of them is stale. `all_followers`: every cached follower list is.
    Changed {
        created: Vec<String>,
        deleted: Vec<String>,
        changed: Vec<String>,
        followers_of: Vec<String>,
        all_followers: bool,
    },
}

/// What a commit learned beyond success, for the core (shared stores only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Registrations another node won the race for: the name is taken, the account not created.
    pub names_taken: Vec<String>,
    /// To hand the core after the commit is reported (see [`Remote`]).
    pub remote: Vec<Remote>,
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Never reused: a name registered again after a deletion gets a new id.
    pub id: u64,
    pub user: String,
    pub password_hash: String,
    pub last_delivered: u64,
    /// See [`Write::KnownAddresses`].
    pub known: Vec<u8>,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub token: Token,
    pub user: String,
    /// The account's id and delivered mark, for the catch-up of a session brought back.
    pub user_id: u64,
    pub last_delivered: u64,
    /// Seconds since it was opened, by the store's clock (0 if the store cannot tell), so that
    /// `session_max_lifetime_secs` counts across restarts.
    pub age_secs: u64,
    /// (request id, encoded reply) from [`Write::LastReply`].
    pub last_reply: Option<(u64, Vec<u8>)>,
}

/// What the core starts from: nothing that grows with accounts or messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Startup {
    pub sessions: Vec<StoredSession>,
    /// One more than the highest message id ever stored (ids are never reused).
    pub next_message_id: u64,
    /// Accounts held (for `max_accounts`).
    pub accounts: u64,
    /// This run's number (see [`Store::begin_epoch`] and [`crate::proto::ServerMsg::Push`]).
    pub epoch: u32,
    /// Set by a store that several daemons share: this daemon's node number (1-1023), which
    /// also makes its message ids unique (see [`crate::server`]'s id clock).
    pub node: Option<u16>,
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
    /// What the core starts from (with `epoch` as of the last `begin_epoch`). Only reads.
    fn load(&mut self) -> Result<Startup, StoreError>;
    /// Applies a batch atomically: after `Ok` all of it survives a crash, after `Err` none of it
    /// is visible.
    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError>;
    /// Answers a read from the committed state (and what earlier commits of this store left).
    fn read(&mut self, read: &Read) -> Result<ReadResult, StoreError>;
    /// Whether another process (an admin command) changed the store since the last call.
    fn changed_externally(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Background upkeep for at most about `budget` (collecting messages no inbox holds,
    /// trimming inboxes); returns whether work is left. Called when the store is otherwise idle.
    fn maintain(&mut self, _budget: std::time::Duration) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Work a successful [`Store::commit`] left for after its result is reported (writing an
    /// index that is not needed for the batch to be durable), so that it does not delay the
    /// answers waiting on the commit. Called once per commit, before the next job.
    fn after_commit(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Writes what the store keeps in memory only for speed (at a clean stop).
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// What the last successful [`Store::commit`] learned for the core (shared stores).
    fn commit_outcome(&mut self) -> CommitOutcome {
        CommitOutcome::default()
    }
    /// Whether a failed commit or load may be survived on the core's own idea of the state (the
    /// store is unreachable for now and reconnects by itself), rather than by stopping.
    fn survives_outages(&self) -> bool {
        false
    }
}

/// Merges two sorted name lists (whom a user follows, who follows them) into one page of
/// relations, at most `limit`, each name once.
pub(crate) fn merge_relations(following: Vec<String>, followers: Vec<String>, limit: usize) -> Vec<Relation> {
    let (mut a, mut b) = (following.into_iter().peekable(), followers.into_iter().peekable());
    let mut out = Vec::new();
    while out.len() < limit {
        let next = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(x), None) => x.clone(),
            (None, Some(y)) => y.clone(),
            (Some(x), Some(y)) => x.min(y).clone(),
        };
        let following = a.next_if(|n| *n == next).is_some();
        let follower = b.next_if(|n| *n == next).is_some();
        out.push(Relation { user: next, following, follower });
    }
    out
}
