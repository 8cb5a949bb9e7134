//! Reads: how a request that needs data the core does not hold waits for the store.
//!
//! A handler asks for what it needs through the accessors here ([`Server::account`],
//! [`Server::followers`], ...). Each answers from the request's own results (what the reads it
//! waited for returned), then from the [`super::cache`]; if the data is in neither, it notes the
//! [`Read`] and the handler returns [`Step::Need`] *before changing anything*. The request is
//! then parked (holding nothing but itself) and its reads are queued; reads of the same thing
//! are issued once for all who wait. When every read of a parked request is answered, it runs
//! again from the start, now with the data; a read that fails answers the request "storage
//! unavailable, retry" and leaves nothing behind.
//!
//! Order: the store serves jobs in order, so a read handed to the shell after a batch sees it.
//! A read that the open batch (the writes not yet taken) could change is held until that batch
//! has been taken ([`conflicts`]), so a retrieve after a post sees the post; other reads go at
//! once.

use super::cache::{InboxHead, Key, Value};
use super::{ReplyTo, Server};
use crate::proto::{EncodedMessage, ErrorCode, Relation, RequestBody, Response, Token};
use crate::store::{AccountRecord, Read, ReadResult, StoreError, Write};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// What running a handler came to.
pub(crate) enum Step {
    /// The answer, now.
    Answer(Result<Response, ErrorCode>),
    /// Answered later (a password job), or not at all (a cookie retry was sent).
    Later,
    /// Park until these are read.
    Need(Vec<Read>),
    /// The request's session was taken over from another node meanwhile: run it again from
    /// the top, as a request of that session.
    Rerun,
}

/// Work waiting for reads.
#[derive(Debug)]
pub(crate) enum Job {
    /// A request, to run again from the start.
    Request {
        from: SocketAddr,
        len: usize,
        reply: ReplyTo,
        session: Option<Token>,
        token: Option<Token>,
        body: RequestBody,
    },
    /// A login whose password was right: opens the session once its catch-up is read.
    /// `remember`: the account's known addresses changed (the new list is in `account`).
    Login { reply: ReplyTo, account: Arc<AccountRecord>, remember: bool },
    /// A session brought back from storage: its catch-up.
    Restore { token: Token, user_id: u64, last_delivered: u64 },
}

#[derive(Debug)]
struct Parked {
    job: Job,
    got: Vec<(Read, Arc<ReadResult>)>,
    waiting: usize,
}

#[derive(Debug)]
struct InFlight {
    read: Read,
    waiters: Vec<u64>,
    /// Whether the answer may be cached (nothing it covers changed since it was issued).
    cacheable: bool,
    /// Whether a logged-in session waits for it (see [`ReadJob::urgent`]).
    urgent: bool,
}

/// A read for the shell to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadJob {
    /// For [`Server::on_read`].
    pub id: u64,
    pub read: Read,
    /// A logged-in session waits for it. Reads for logins, registrations and sessions brought
    /// back at start are not urgent: a store may serve urgent reads first (never before the
    /// batches they follow), so that a login storm does not delay established users.
    pub urgent: bool,
}

/// Parked jobs and the reads they wait for.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    next_id: u64,
    /// Reads not yet handed to the shell: (batch that must be handed out first, read id).
    queue: VecDeque<(u64, u64)>,
    inflight: HashMap<u64, InFlight>,
    by_read: HashMap<Read, u64>,
    by_key: HashMap<Key, u64>,
    parked: HashMap<u64, Parked>,
    /// Results of the job being run again (set while it runs).
    pub(crate) scratch: Vec<(Read, Arc<ReadResult>)>,
}

/// Parked jobs at most; beyond it requests that need a read are answered "busy".
pub(crate) const MAX_PARKED: usize = 65_536;

/// The cache key a read's answer is stored under, if it is cached at all.
fn cache_key(read: &Read) -> Option<Key> {
    match read {
        Read::Account { name } => Some(Key::Account(name.clone())),
        Read::Followers { name } => Some(Key::Followers(name.clone())),
        Read::Inbox { id, before: None, above: None, .. } => Some(Key::Inbox(*id)),
        _ => None,
    }
}

impl Reads {
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Something the core changed: a read of it in flight must not cache its answer.
    pub fn changed(&mut self, key: &Key) {
        if let Some(id) = self.by_key.get(key) {
            if let Some(f) = self.inflight.get_mut(id) {
                f.cacheable = false;
            }
        }
    }

    /// Everything changed: no answer in flight may be cached.
    pub fn changed_all(&mut self) {
        for f in self.inflight.values_mut() {
            f.cacheable = false;
        }
    }

    /// The result of a read the running job already got.
    pub(super) fn got(&self, read: &Read) -> Option<Arc<ReadResult>> {
        self.scratch.iter().find(|(r, _)| r == read).map(|(_, v)| v.clone())
    }
}

impl Server {
    /// Parks `job` until `needs` are read.
    pub(super) fn park(&mut self, job: Job, needs: Vec<Read>, got: Vec<(Read, Arc<ReadResult>)>) {
        let open = self.open_batch;
        let urgent = matches!(job, Job::Request { session: Some(_), .. });
        let r = &mut self.reads;
        let pid = r.next_id;
        r.next_id += 1;
        let mut waiting = 0;
        for read in needs {
            if got.iter().any(|(g, _)| *g == read) {
                continue;
            }
            waiting += 1;
            *self.stats.reads_by_kind.entry(read.kind()).or_insert(0) += 1;
            match r.by_read.get(&read) {
                Some(id) => {
                    let f = r.inflight.get_mut(id).expect("indexed");
                    f.waiters.push(pid);
                    f.urgent |= urgent;
                }
                None => {
                    let id = r.next_id;
                    r.next_id += 1;
                    if let Some(k) = cache_key(&read) {
                        r.by_key.insert(k, id);
                    }
                    r.by_read.insert(read.clone(), id);
                    // Only a read the open batch could change waits for it to be taken.
                    let after = if self.writes.iter().any(|w| conflicts(&read, w)) { open } else { 0 };
                    r.inflight.insert(id, InFlight { read, waiters: vec![pid], cacheable: true, urgent });
                    r.queue.push_back((after, id));
                }
            }
        }
        r.parked.insert(pid, Parked { job, got, waiting });
    }

    /// The next read to run off the loop. Reads come out only once the batches they must
    /// follow have been taken (see [`Server::take_writes`]); the store must run each after
    /// those batches.
    pub fn poll_read(&mut self) -> Option<ReadJob> {
        loop {
            let pos = self.reads.queue.iter().position(|(after, _)| *after <= self.taken_batch)?;
            let (_, id) = self.reads.queue.remove(pos).expect("found");
            if let Some(f) = self.reads.inflight.get(&id) {
                return Some(ReadJob { id, read: f.read.clone(), urgent: f.urgent });
            }
        }
    }

    /// Reports a finished read: the jobs that waited for it run again (or, if it failed, are
    /// told to retry).
    pub fn on_read(&mut self, now: Instant, id: u64, result: Result<ReadResult, StoreError>) {
        let Some(f) = self.reads.inflight.remove(&id) else { return };
        self.reads.by_read.remove(&f.read);
        let key = cache_key(&f.read);
        if let Some(k) = &key {
            if self.reads.by_key.get(k) == Some(&id) {
                self.reads.by_key.remove(k);
            }
        }
        let result = match result {
            Ok(r) => Arc::new(r),
            Err(e) => {
                self.stats.read_failures += 1;
                log::warn!("a {} read failed: {e}", f.read.kind());
                for pid in f.waiters {
                    if let Some(p) = self.reads.parked.remove(&pid) {
                        self.abandon(now, p.job);
                    }
                }
                return;
            }
        };
        if let (Some(k), true) = (key, f.cacheable) {
            if let Some(v) = to_value(&f.read, &result) {
                self.cache.put(k, v);
            }
        }
        for pid in f.waiters {
            let Some(p) = self.reads.parked.get_mut(&pid) else { continue };
            p.got.push((f.read.clone(), result.clone()));
            p.waiting -= 1;
            if p.waiting == 0 {
                let p = self.reads.parked.remove(&pid).expect("present");
                self.resume(now, p.job, p.got);
            }
        }
    }

    /// A parked job whose read failed: its request is told to retry, and nothing of it stays.
    fn abandon(&mut self, now: Instant, job: Job) {
        match job {
            Job::Request { reply, .. } | Job::Login { reply, .. } => {
                self.forget(reply);
                self.reply(now, reply, Err(ErrorCode::StorageUnavailable));
            }
            // The session lives on; what it missed is in its inbox for `retrieve`.
            Job::Restore { .. } => {}
        }
    }

    /// Runs a parked job again with what it got.
    fn resume(&mut self, now: Instant, job: Job, got: Vec<(Read, Arc<ReadResult>)>) {
        self.reads.scratch = got;
        self.run(now, job);
        self.reads.scratch.clear();
    }

    // ---------------------------------------------------------------- accessors

    /// What the running job got for `read`; otherwise `None`, and `read` is noted in `needs`.
    fn fetch(&mut self, read: Read, needs: &mut Vec<Read>) -> Option<Arc<ReadResult>> {
        if let Some(r) = self.reads.got(&read) {
            return Some(r);
        }
        needs.push(read);
        None
    }

    /// The account named `name` (`Some(None)`: there is none).
    pub(super) fn account(
        &mut self,
        name: &str,
        needs: &mut Vec<Read>,
    ) -> Option<Option<Arc<AccountRecord>>> {
        let read = Read::Account { name: name.to_string() };
        if let Some(r) = self.reads.got(&read) {
            return match &*r {
                ReadResult::Account(a) => Some(a.clone().map(Arc::new)),
                _ => None,
            };
        }
        if let Some(Value::Account(a)) = self.cache.get(&Key::Account(name.to_string())) {
            return Some(a.clone());
        }
        needs.push(read);
        None
    }

    /// Who follows `name`, with their account ids.
    pub(super) fn followers(&mut self, name: &str, needs: &mut Vec<Read>) -> Option<Arc<Vec<(String, u64)>>> {
        let read = Read::Followers { name: name.to_string() };
        if let Some(r) = self.reads.got(&read) {
            return match &*r {
                ReadResult::Followers(f) => Some(Arc::new(f.clone())),
                _ => None,
            };
        }
        if let Some(Value::Followers(f)) = self.cache.get(&Key::Followers(name.to_string())) {
            return Some(f.clone());
        }
        needs.push(read);
        None
    }

    /// Whether `follower` follows `followed`, and how many `follower` follows.
    pub(super) fn follows(
        &mut self,
        follower: &str,
        followed: &str,
        needs: &mut Vec<Read>,
    ) -> Option<(bool, u32)> {
        let read = Read::Follows { follower: follower.to_string(), followed: followed.to_string() };
        match &*self.fetch(read, needs)? {
            ReadResult::Follows { follows, following } => Some((*follows, *following)),
            _ => None,
        }
    }

    /// The newest `count` messages of inbox `id` below `before`, oldest first, and (with
    /// `above`) how many of its messages are newer than that.
    pub(super) fn inbox(
        &mut self,
        id: u64,
        count: u32,
        before: Option<u64>,
        above: Option<u64>,
        needs: &mut Vec<Read>,
    ) -> Option<(Vec<Arc<EncodedMessage>>, u32)> {
        let read = Read::Inbox { id, count, before, above };
        if let Some(r) = self.reads.got(&read) {
            return match &*r {
                ReadResult::Inbox { messages, above } => Some((
                    messages.iter().map(|m| Arc::new(EncodedMessage::new(m.clone()))).collect(),
                    *above,
                )),
                _ => None,
            };
        }
        if above.is_none() {
            if let Some(Value::Inbox(head)) = self.cache.get(&Key::Inbox(id)) {
                // The head answers a page (the first, or one after `before`, as a retrieve
                // pages back) when it holds enough below `before`, or all there is.
                let below: Vec<&Arc<EncodedMessage>> =
                    head.messages.iter().filter(|m| before.is_none_or(|b| m.message.id < b)).collect();
                if head.complete || below.len() >= count as usize {
                    let skip = below.len().saturating_sub(count as usize);
                    return Some((below.into_iter().skip(skip).cloned().collect(), 0));
                }
            }
        }
        needs.push(read);
        None
    }

    /// Up to `limit` account names after `after`.
    pub(super) fn names(&mut self, after: &str, limit: u32, needs: &mut Vec<Read>) -> Option<Vec<String>> {
        match &*self.fetch(Read::Names { after: after.to_string(), limit }, needs)? {
            ReadResult::Names(n) => Some(n.clone()),
            _ => None,
        }
    }

    /// Up to `limit` relations of `name` after `after`.
    pub(super) fn relations_page(
        &mut self,
        name: &str,
        after: &str,
        limit: u32,
        needs: &mut Vec<Read>,
    ) -> Option<Vec<Relation>> {
        let read = Read::Relations { name: name.to_string(), after: after.to_string(), limit };
        match &*self.fetch(read, needs)? {
            ReadResult::Relations(r) => Some(r.clone()),
            _ => None,
        }
    }

    // ---------------------------------------------------------------- write-through

    /// `user` (account `id`) now follows (or no longer follows) `target`.
    pub(super) fn relation_changed(&mut self, user: &str, id: u64, target: &str, follows: bool) {
        let key = Key::Followers(target.to_string());
        self.reads.changed(&key);
        if let Some(Value::Followers(f)) = self.cache.peek_mut(&key) {
            let f = Arc::make_mut(f);
            f.retain(|(n, _)| n != user);
            if follows {
                f.push((user.to_string(), id));
            }
            self.cache.resize(&key);
        }
    }

    /// What is cached of inbox `id` is stale (it received something this core did not see).
    pub(super) fn inbox_changed(&mut self, id: u64) {
        let key = Key::Inbox(id);
        self.reads.changed(&key);
        self.cache.remove(&key);
    }

    /// Who follows `name` changed elsewhere.
    pub(super) fn followers_changed(&mut self, name: &str) {
        let key = Key::Followers(name.to_string());
        self.reads.changed(&key);
        self.cache.remove(&key);
    }

    /// `msg` was delivered to the inboxes of these account ids.
    pub(super) fn delivered_to(&mut self, msg: &Arc<EncodedMessage>, recipients: &[u64]) {
        let cap = self.head_len();
        for id in recipients {
            let key = Key::Inbox(*id);
            self.reads.changed(&key);
            if let Some(Value::Inbox(head)) = self.cache.peek_mut(&key) {
                if head.messages.back().is_some_and(|m| m.message.id > msg.message.id) {
                    // Ids made on several nodes: a head is kept in id order or not at all.
                    self.cache.remove(&key);
                    continue;
                }
                head.messages.push_back(msg.clone());
                while head.messages.len() > cap {
                    head.messages.pop_front();
                    head.complete = false;
                }
                self.cache.resize(&key);
            }
        }
    }

    /// Messages an inbox head keeps: enough for the largest retrieve.
    pub(super) fn head_len(&self) -> usize {
        (self.cfg.max_retrieve as usize).clamp(1, HEAD_MAX)
    }

    /// The account `name` changed (or went): what is cached of it goes.
    pub(super) fn account_changed(&mut self, name: &str) {
        let key = Key::Account(name.to_string());
        self.reads.changed(&key);
        self.cache.remove(&key);
    }

    /// Updates a cached account in place.
    pub(super) fn update_account(&mut self, name: &str, f: impl FnOnce(&mut AccountRecord)) {
        let key = Key::Account(name.to_string());
        self.reads.changed(&key);
        if let Some(Value::Account(Some(a))) = self.cache.peek_mut(&key) {
            f(Arc::make_mut(a));
            self.cache.resize(&key);
        }
    }
}

/// Whether write `w` can change what `read` answers.
fn conflicts(read: &Read, w: &Write) -> bool {
    match (read, w) {
        // Rare, and touching much: everything waits for it.
        (_, Write::DeleteAccount { .. }) => true,
        (Read::Account { name }, Write::CreateAccount { user, .. })
        | (Read::Account { name }, Write::SetPassword { user, .. })
        | (Read::Account { name }, Write::Delivered { user, .. })
        | (Read::Account { name }, Write::KnownAddresses { user, .. }) => name == user,
        (Read::Names { .. }, Write::CreateAccount { .. }) => true,
        (Read::Followers { name }, Write::Subscribe { followed, .. })
        | (Read::Followers { name }, Write::Unsubscribe { followed, .. }) => name == followed,
        (Read::Follows { follower: f, .. }, Write::Subscribe { follower, .. })
        | (Read::Follows { follower: f, .. }, Write::Unsubscribe { follower, .. }) => f == follower,
        (Read::Relations { name, .. }, Write::Subscribe { follower, followed })
        | (Read::Relations { name, .. }, Write::Unsubscribe { follower, followed }) => {
            name == follower || name == followed
        }
        (Read::Inbox { id, .. }, Write::StoreMessage { recipients, .. }) => recipients.contains(id),
        _ => false,
    }
}

/// Messages an inbox head caches at most.
const HEAD_MAX: usize = 128;

/// What a read's answer is cached as.
fn to_value(read: &Read, result: &ReadResult) -> Option<Value> {
    match (read, result) {
        (Read::Account { .. }, ReadResult::Account(a)) => Some(Value::Account(a.clone().map(Arc::new))),
        (Read::Followers { .. }, ReadResult::Followers(f)) => Some(Value::Followers(Arc::new(f.clone()))),
        (Read::Inbox { count, before: None, above: None, .. }, ReadResult::Inbox { messages, .. }) => {
            Some(Value::Inbox(InboxHead {
                complete: messages.len() < *count as usize,
                messages: messages.iter().map(|m| Arc::new(EncodedMessage::new(m.clone()))).collect(),
            }))
        }
        _ => None,
    }
}
