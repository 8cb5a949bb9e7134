//! An in-memory [`Store`]: state lives as long as the value does. Used by tests (a simulated
//! restart reloads the core from the same `MemoryStore`) and by `storage = "memory"`.

use super::{AccountRecord, Read, ReadResult, Startup, Store, StoreError, StoredSession, Write};
use crate::proto::{Message, Relation, Token};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

#[derive(Debug, Default)]
struct Account {
    id: u64,
    password_hash: String,
    last_delivered: u64,
    known: Vec<u8>,
    /// Oldest first, at most `max_inbox`.
    inbox: VecDeque<Arc<Message>>,
}

/// See the module docs.
#[derive(Debug)]
pub struct MemoryStore {
    max_inbox: usize,
    accounts: BTreeMap<String, Account>,
    names: HashMap<u64, String>,
    /// (follower, followed), and the same pairs the other way round.
    subscriptions: BTreeSet<(String, String)>,
    followers: BTreeSet<(String, String)>,
    sessions: HashMap<Token, String>,
    last_replies: HashMap<Token, (u64, Vec<u8>)>,
    next_message_id: u64,
    next_account_id: u64,
    epoch: u32,
    commits: u64,
    reads: u64,
    /// Reads fail while set (tests of a store that cannot be read).
    pub fail_reads: bool,
}

impl MemoryStore {
    /// `max_inbox`: messages kept per inbox, as the daemon's `max_inbox`.
    pub fn new(max_inbox: usize) -> Self {
        MemoryStore {
            max_inbox,
            accounts: BTreeMap::new(),
            names: HashMap::new(),
            subscriptions: BTreeSet::new(),
            followers: BTreeSet::new(),
            sessions: HashMap::new(),
            last_replies: HashMap::new(),
            next_message_id: 1,
            next_account_id: 1,
            epoch: 0,
            commits: 0,
            reads: 0,
            fail_reads: false,
        }
    }

    /// Number of successful commits (batches), for tests.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Number of reads answered, for tests.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// The ids of the messages in `user`'s inbox, oldest first (for tests).
    pub fn inbox_ids(&self, user: &str) -> Vec<u64> {
        self.accounts.get(user).map(|a| a.inbox.iter().map(|m| m.id).collect()).unwrap_or_default()
    }

    fn apply(&mut self, w: &Write) {
        match w {
            Write::CreateAccount { user, password_hash } => {
                let id = self.next_account_id;
                self.next_account_id += 1;
                self.names.insert(id, user.clone());
                let acc = Account { id, password_hash: password_hash.clone(), ..Default::default() };
                if let Some(old) = self.accounts.insert(user.clone(), acc) {
                    self.names.remove(&old.id);
                }
            }
            Write::DeleteAccount { user } => {
                if let Some(acc) = self.accounts.remove(user) {
                    self.names.remove(&acc.id);
                }
                self.subscriptions.retain(|(a, b)| a != user && b != user);
                self.followers.retain(|(a, b)| a != user && b != user);
                self.sessions.retain(|_, u| u != user);
            }
            Write::SetPassword { user, password_hash } => {
                if let Some(acc) = self.accounts.get_mut(user) {
                    acc.password_hash = password_hash.clone();
                }
                self.sessions.retain(|_, u| u != user);
                let sessions = &self.sessions;
                self.last_replies.retain(|t, _| sessions.contains_key(t));
            }
            Write::Subscribe { follower, followed } => {
                self.subscriptions.insert((follower.clone(), followed.clone()));
                self.followers.insert((followed.clone(), follower.clone()));
            }
            Write::Unsubscribe { follower, followed } => {
                self.subscriptions.remove(&(follower.clone(), followed.clone()));
                self.followers.remove(&(followed.clone(), follower.clone()));
            }
            Write::StoreMessage { message, recipients } => {
                self.next_message_id = self.next_message_id.max(message.id + 1);
                let shared = Arc::new(message.clone());
                for id in recipients {
                    let Some(acc) = self.names.get(id).and_then(|n| self.accounts.get_mut(n)) else {
                        continue;
                    };
                    acc.inbox.push_back(shared.clone());
                    while acc.inbox.len() > self.max_inbox {
                        acc.inbox.pop_front();
                    }
                }
            }
            Write::Delivered { user, up_to } => {
                if let Some(acc) = self.accounts.get_mut(user) {
                    acc.last_delivered = acc.last_delivered.max(*up_to);
                }
            }
            Write::KnownAddresses { user, known } => {
                if let Some(acc) = self.accounts.get_mut(user) {
                    acc.known = known.clone();
                }
            }
            Write::OpenSession { token, user } => {
                self.sessions.insert(*token, user.clone());
            }
            Write::CloseSession { token } => {
                self.sessions.remove(token);
                self.last_replies.remove(token);
            }
            Write::LastReply { token, request_id, reply } => {
                if self.sessions.contains_key(token) {
                    self.last_replies.insert(*token, (*request_id, reply.clone()));
                }
            }
        }
    }
}

/// The names after `after` in a set of pairs whose first element is `name`.
fn range_after<'a>(
    set: &'a BTreeSet<(String, String)>,
    name: &str,
    after: &str,
) -> impl Iterator<Item = &'a String> + 'a {
    let start = (Bound::Excluded((name.to_string(), after.to_string())), Bound::Unbounded);
    let name = name.to_string();
    set.range(start).take_while(move |(a, _)| *a == name).map(|(_, b)| b)
}

impl Store for MemoryStore {
    fn begin_epoch(&mut self) -> Result<u32, StoreError> {
        self.epoch += 1;
        Ok(self.epoch)
    }

    fn load(&mut self) -> Result<Startup, StoreError> {
        let sessions = self
            .sessions
            .iter()
            .filter_map(|(t, u)| {
                let acc = self.accounts.get(u)?;
                Some(StoredSession {
                    token: *t,
                    user: u.clone(),
                    user_id: acc.id,
                    last_delivered: acc.last_delivered,
                    // Memory storage does not outlive the process: no session is older than this run.
                    age_secs: 0,
                    last_reply: self.last_replies.get(t).cloned(),
                })
            })
            .collect();
        Ok(Startup {
            sessions,
            next_message_id: self.next_message_id,
            accounts: self.accounts.len() as u64,
            epoch: self.epoch,
            node: None,
        })
    }

    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        for w in batch {
            self.apply(w);
        }
        self.commits += 1;
        Ok(())
    }

    fn read(&mut self, read: &Read) -> Result<ReadResult, StoreError> {
        if self.fail_reads {
            return Err(StoreError("reads fail (test)".into()));
        }
        self.reads += 1;
        Ok(match read {
            Read::Account { name } => ReadResult::Account(self.accounts.get(name).map(|a| AccountRecord {
                id: a.id,
                user: name.clone(),
                password_hash: a.password_hash.clone(),
                last_delivered: a.last_delivered,
                known: a.known.clone(),
            })),
            Read::Followers { name } => ReadResult::Followers(
                range_after(&self.followers, name, "")
                    .filter_map(|f| self.accounts.get(f).map(|a| (f.clone(), a.id)))
                    .collect(),
            ),
            Read::Follows { follower, followed } => ReadResult::Follows {
                follows: self.subscriptions.contains(&(follower.clone(), followed.clone())),
                following: range_after(&self.subscriptions, follower, "").count() as u32,
            },
            Read::Inbox { id, count, before, above } => {
                let inbox = self.names.get(id).and_then(|n| self.accounts.get(n)).map(|a| &a.inbox);
                let Some(inbox) = inbox else { return Ok(ReadResult::Inbox { messages: vec![], above: 0 }) };
                let mut messages: Vec<Message> = inbox
                    .iter()
                    .rev()
                    .filter(|m| before.is_none_or(|b| m.id < b))
                    .take(*count as usize)
                    .map(|m| (**m).clone())
                    .collect();
                messages.reverse();
                let above = above.map_or(0, |a| inbox.iter().filter(|m| m.id > a).count() as u32);
                ReadResult::Inbox { messages, above }
            }
            Read::Names { after, limit } => ReadResult::Names(
                self.accounts
                    .range::<str, _>((Bound::Excluded(after.as_str()), Bound::Unbounded))
                    .take(*limit as usize)
                    .map(|(n, _)| n.clone())
                    .collect(),
            ),
            // Every session is the core's: none to take over.
            Read::Claim { .. } => ReadResult::Claimed(None),
            Read::Relations { name, after, limit } => {
                let mut following = range_after(&self.subscriptions, name, after).peekable();
                let mut followers = range_after(&self.followers, name, after).peekable();
                let mut out = Vec::new();
                while out.len() < *limit as usize {
                    let next = match (following.peek(), followers.peek()) {
                        (None, None) => break,
                        (Some(a), None) => (*a).clone(),
                        (None, Some(b)) => (*b).clone(),
                        (Some(a), Some(b)) => (*a).min(*b).clone(),
                    };
                    let following = following.next_if(|n| **n == next).is_some();
                    let follower = followers.next_if(|n| **n == next).is_some();
                    out.push(Relation { user: next, following, follower });
                }
                ReadResult::Relations(out)
            }
        })
    }
}
