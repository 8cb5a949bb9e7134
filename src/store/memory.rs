//! An in-memory [`Store`]: state lives as long as the value does. Used by tests (a simulated
//! restart reloads the core from the same `MemoryStore`) and by `storage = "memory"`.

use super::{AccountRecord, Snapshot, Store, StoreError, StoredSession, Write};
use crate::proto::{Message, Token};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

#[derive(Debug, Default)]
struct Account {
    password_hash: String,
    last_delivered: u64,
    inbox: VecDeque<Arc<Message>>,
}

/// See the module docs.
#[derive(Debug)]
pub struct MemoryStore {
    max_inbox: usize,
    accounts: BTreeMap<String, Account>,
    subscriptions: BTreeSet<(String, String)>,
    sessions: HashMap<Token, String>,
    last_replies: HashMap<Token, (u64, Vec<u8>)>,
    next_message_id: u64,
    epoch: u32,
    commits: u64,
}

impl MemoryStore {
    /// `max_inbox`: messages kept per inbox, as the daemon's `max_inbox`.
    pub fn new(max_inbox: usize) -> Self {
        MemoryStore {
            max_inbox,
            accounts: BTreeMap::new(),
            subscriptions: BTreeSet::new(),
            sessions: HashMap::new(),
            last_replies: HashMap::new(),
            next_message_id: 1,
            epoch: 0,
            commits: 0,
        }
    }

    /// Number of successful commits (batches), for tests.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    fn apply(&mut self, w: &Write) {
        match w {
            Write::CreateAccount { user, password_hash } => {
                self.accounts.insert(
                    user.clone(),
                    Account { password_hash: password_hash.clone(), ..Default::default() },
                );
            }
            Write::DeleteAccount { user } => {
                self.accounts.remove(user);
                self.subscriptions.retain(|(a, b)| a != user && b != user);
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
            }
            Write::Unsubscribe { follower, followed } => {
                self.subscriptions.remove(&(follower.clone(), followed.clone()));
            }
            Write::StoreMessage { message, recipients } => {
                self.next_message_id = self.next_message_id.max(message.id + 1);
                let shared = Arc::new(message.clone());
                for r in recipients {
                    if let Some(acc) = self.accounts.get_mut(r) {
                        acc.inbox.push_back(shared.clone());
                        while acc.inbox.len() > self.max_inbox {
                            acc.inbox.pop_front();
                        }
                    }
                }
            }
            // Its inboxes trim themselves.
            Write::DropMessage { .. } => {}
            Write::Delivered { user, up_to } => {
                if let Some(acc) = self.accounts.get_mut(user) {
                    acc.last_delivered = acc.last_delivered.max(*up_to);
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

impl Store for MemoryStore {
    fn begin_epoch(&mut self) -> Result<u32, StoreError> {
        self.epoch += 1;
        Ok(self.epoch)
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            epoch: self.epoch,
            accounts: self
                .accounts
                .iter()
                .map(|(user, a)| AccountRecord {
                    user: user.clone(),
                    password_hash: a.password_hash.clone(),
                    last_delivered: a.last_delivered,
                    inbox: a.inbox.iter().map(|m| (**m).clone()).collect(),
                })
                .collect(),
            subscriptions: self.subscriptions.iter().cloned().collect(),
            // Memory storage does not outlive the process: no session is older than this run.
            sessions: self
                .sessions
                .iter()
                .map(|(t, u)| StoredSession { token: *t, user: u.clone(), age_secs: 0 })
                .collect(),
            // Only the daemon writes a memory store.
            recreated: Vec::new(),
            last_replies: self
                .last_replies
                .iter()
                .filter(|(t, _)| self.sessions.contains_key(t))
                .map(|(t, (id, r))| (*t, *id, r.clone()))
                .collect(),
            next_message_id: self.next_message_id,
        })
    }

    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        for w in batch {
            self.apply(w);
        }
        self.commits += 1;
        Ok(())
    }
}
