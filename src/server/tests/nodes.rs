//! Several cores on one shared store, as several daemons on PostgreSQL: messages crossing
//! nodes, sessions taken over, races and changes made elsewhere. The store here is a model of
//! [`crate::store::postgres`]'s rules (routing to the nodes holding recipients' sessions, a claim
//! that moves a session and tells its old node) over a [`MemoryStore`], so each rule of the core
//! is checked deterministically; the real thing is tested against PostgreSQL in
//! `tests/nodes.rs`.

use super::*;
use crate::store::{Claimed, Read, ReadResult, Remote, StoreError};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Default)]
struct Shared {
    mem: Option<MemoryStore>,
    /// Which node holds each session.
    holder: HashMap<Token, u16>,
    epochs: u32,
    /// Events waiting for each node's listener.
    events: HashMap<u16, Vec<Remote>>,
    /// Names registered so far (to lose a race on).
    names: Vec<String>,
}

struct NodeStore {
    shared: Rc<RefCell<Shared>>,
    me: u16,
    outcome: crate::store::CommitOutcome,
}

impl Shared {
    fn mem(&mut self) -> &mut MemoryStore {
        self.mem.as_mut().expect("set")
    }

    fn account(&mut self, name: &str) -> Option<crate::store::AccountRecord> {
        match self.mem().read(&Read::Account { name: name.into() }) {
            Ok(ReadResult::Account(a)) => a,
            _ => None,
        }
    }

    fn user_of(&mut self, token: &Token) -> Option<String> {
        self.mem().load().ok()?.sessions.into_iter().find(|s| s.token == *token).map(|s| s.user)
    }
}

impl Store for NodeStore {
    fn begin_epoch(&mut self) -> Result<u32, StoreError> {
        let mut s = self.shared.borrow_mut();
        s.epochs += 1;
        Ok(s.epochs)
    }

    fn load(&mut self) -> Result<Startup, StoreError> {
        let mut s = self.shared.borrow_mut();
        let mut start = s.mem().load()?;
        let me = self.me;
        let holder = s.holder.clone();
        start.sessions.retain(|st| holder.get(&st.token) == Some(&me));
        start.epoch = s.epochs;
        start.node = Some(me);
        Ok(start)
    }

    fn commit(&mut self, batch: &[Write]) -> Result<(), StoreError> {
        let mut s = self.shared.borrow_mut();
        let mut applied = Vec::new();
        self.outcome = Default::default();
        for w in batch {
            match w {
                Write::CreateAccount { user, .. } if s.names.contains(user) => {
                    self.outcome.names_taken.push(user.clone());
                    continue;
                }
                Write::CreateAccount { user, .. } => s.names.push(user.clone()),
                Write::OpenSession { token, .. } => {
                    s.holder.insert(*token, self.me);
                }
                Write::CloseSession { token } | Write::LastReply { token, .. }
                    if s.holder.get(token).is_some_and(|h| *h != self.me) =>
                {
                    continue; // another node's now
                }
                Write::StoreMessage { message, recipients } => {
                    // Routed to the nodes that hold a recipient's session.
                    let holders: Vec<(Token, u16)> = s.holder.iter().map(|(t, n)| (*t, *n)).collect();
                    let mut to: HashMap<u16, Vec<(String, u64)>> = HashMap::new();
                    for (t, node) in holders {
                        if node == self.me {
                            continue;
                        }
                        let Some(user) = s.user_of(&t) else { continue };
                        let Some(acc) = s.account(&user) else { continue };
                        if recipients.contains(&acc.id)
                            && !to.entry(node).or_default().contains(&(user.clone(), acc.id))
                        {
                            to.entry(node).or_default().push((user, acc.id));
                        }
                    }
                    for (node, here) in to {
                        s.events
                            .entry(node)
                            .or_default()
                            .push(Remote::Messages(vec![(message.clone(), here)]));
                    }
                }
                Write::Subscribe { followed, .. } | Write::Unsubscribe { followed, .. } => {
                    let others: Vec<u16> = (1..=3).filter(|n| *n != self.me).collect();
                    for n in others {
                        s.events.entry(n).or_default().push(Remote::Changed {
                            created: vec![],
                            deleted: vec![],
                            changed: vec![],
                            followers_of: vec![followed.clone()],
                            all_followers: false,
                        });
                    }
                }
                _ => {}
            }
            applied.push(w.clone());
        }
        s.mem().commit(&applied)
    }

    fn read(&mut self, read: &Read) -> Result<ReadResult, StoreError> {
        let mut s = self.shared.borrow_mut();
        let Read::Claim { token, catch_up } = read else { return s.mem().read(read) };
        let Some(session) = s.mem().load()?.sessions.into_iter().find(|st| st.token == *token) else {
            return Ok(ReadResult::Claimed(None));
        };
        let old = s.holder.insert(*token, self.me);
        if let Some(old) = old.filter(|o| *o != self.me) {
            s.events.entry(old).or_default().push(Remote::Moved(vec![*token]));
        }
        s.epochs += 1;
        let epoch = s.epochs;
        let catch_up = match s.mem().read(&Read::Inbox {
            id: session.user_id,
            count: *catch_up,
            before: None,
            above: None,
        })? {
            ReadResult::Inbox { messages, .. } => messages,
            _ => vec![],
        };
        Ok(ReadResult::Claimed(Some(Claimed { session, epoch, catch_up })))
    }

    fn commit_outcome(&mut self) -> crate::store::CommitOutcome {
        std::mem::take(&mut self.outcome)
    }
}

/// Three nodes on one shared store.
struct Cluster {
    shared: Rc<RefCell<Shared>>,
    nodes: Vec<H>,
}

impl Cluster {
    fn new() -> Cluster {
        let shared =
            Rc::new(RefCell::new(Shared { mem: Some(MemoryStore::new(1000)), ..Default::default() }));
        let nodes = (1..=3u16)
            .map(|me| {
                let store = Box::new(NodeStore { shared: shared.clone(), me, outcome: Default::default() });
                let mut h = H::with_store(test_config(), store);
                // Each node its own random tokens (and its clients their own request ids).
                h.next_id = u64::from(me) * 1000;
                h.restart(test_config());
                h
            })
            .collect();
        Cluster { shared, nodes }
    }

    /// Node `i` (0-based) takes in its events, as its listener would hand them over.
    fn listen(&mut self, i: usize) {
        let events = self.shared.borrow_mut().events.remove(&(i as u16 + 1)).unwrap_or_default();
        let h = &mut self.nodes[i];
        for e in events {
            h.server.on_remote(h.now, e);
        }
        h.turn();
    }
}

fn post(text: &str) -> RequestBody {
    RequestBody::Post { text: text.into() }
}

#[test]
fn a_post_on_one_node_is_pushed_by_the_node_holding_the_subscriber() {
    let mut c = Cluster::new();
    let alice = c.nodes[0].user("alice", 1);
    let bob = c.nodes[1].user("bob", 2);
    let _carol = c.nodes[2].user("carol", 3);
    assert_eq!(
        c.nodes[1].req(a(2), Some(bob), RequestBody::Subscribe { user: "alice".into() }),
        Ok(Response::Subscribed)
    );
    let posted = c.nodes[0].req(a(1), Some(alice), post("hello from A"));
    let Ok(Response::Posted { id, recipients: 1 }) = posted else { panic!("{posted:?}") };
    assert_eq!(id & 1023, 1, "node 1 made the id");
    c.listen(2);
    assert!(c.nodes[2].pushes().is_empty(), "nothing for a node without recipients");
    c.listen(1);
    let pushes = c.nodes[1].pushes();
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    assert_eq!((pushes[0].0, pushes[0].2.id, pushes[0].2.text.as_str()), (a(2), id, "hello from A"));
    assert_eq!(c.nodes[1].server.stats().remote_messages, 1);
    // B's next post has a larger id than what it saw from A, whatever the clocks say.
    c.nodes[1].req(a(2), Some(bob), post("from B")).unwrap();
    let Ok(Response::Messages { messages, .. }) =
        c.nodes[1].req(a(2), Some(bob), RequestBody::Retrieve { count: 10, before: None })
    else {
        panic!()
    };
    assert_eq!(messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), vec!["hello from A"]);
}

#[test]
fn a_session_moves_to_the_node_its_client_reaches_with_what_it_missed() {
    let mut c = Cluster::new();
    let alice = c.nodes[0].user("alice", 1);
    let bob = c.nodes[1].user("bob", 2);
    c.nodes[1].req(a(2), Some(bob), RequestBody::Subscribe { user: "alice".into() }).unwrap();
    c.nodes[0].req(a(1), Some(alice), post("one")).unwrap();
    // Node B dies before pushing it (its event never read). bob's client moves to C with the
    // same session: C takes it over, no new login.
    let epoch_b = c.nodes[1].server.epoch;
    // The same client goes on numbering its requests.
    c.nodes[2].next_id = c.nodes[1].next_id;
    let pong = c.nodes[2].req(a(2), Some(bob), RequestBody::Ping);
    let Ok(Response::SessionPong { epoch }) = pong else { panic!("{pong:?}") };
    assert!(epoch > epoch_b, "a new epoch for the moved session: {epoch} > {epoch_b}");
    assert_eq!(c.nodes[2].server.stats().sessions_claimed, 1);
    // Its address is proven first, then what it missed is pushed.
    c.nodes[2].prove(a(2), bob);
    let pushes = c.nodes[2].pushes();
    assert_eq!(pushes.iter().map(|p| p.2.text.as_str()).collect::<Vec<_>>(), vec!["one"]);
    // Later posts go to C, and B (were it alive) forgets the session without writing.
    c.nodes[0].req(a(1), Some(alice), post("two")).unwrap();
    c.listen(2);
    assert_eq!(c.nodes[2].pushes().iter().map(|p| p.2.text.as_str()).collect::<Vec<_>>(), vec!["two"]);
    c.listen(1);
    assert_eq!(c.nodes[1].server.session_count(), 0);
    assert_eq!(c.nodes[1].server.stats().sessions_moved_away, 1);
    assert!(c.shared.borrow().holder.get(&bob) == Some(&3), "still C's: B wrote nothing");
    // The session's requests go on at C, de-duplicated as before.
    assert_eq!(
        c.nodes[2].req(a(2), Some(bob), RequestBody::WhoAmI),
        Ok(Response::Me { user: "bob".into(), sessions: 1 })
    );
}

#[test]
fn a_token_nobody_holds_is_looked_up_once_and_lookups_are_throttled() {
    let mut c = Cluster::new();
    let h = &mut c.nodes[0];
    let forged = Token([0x42; 16]);
    assert_eq!(h.req(a(5), Some(forged), RequestBody::Ping), Err(ErrorCode::SessionExpired));
    let reads = h.server.stats().reads_by_kind.get("claim").copied();
    assert_eq!(reads, Some(1));
    assert_eq!(h.req(a(5), Some(forged), RequestBody::WhoAmI), Err(ErrorCode::SessionExpired));
    assert_eq!(h.server.stats().reads_by_kind.get("claim").copied(), Some(1), "remembered, not read again");
    // Random tokens from one address: a burst of look-ups, then none.
    for i in 0..(super::super::nodes::CLAIM_BURST + 10) {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&i.to_be_bytes());
        let _ = h.req(a(6), Some(Token(t)), RequestBody::Ping);
    }
    // One address (the forged token's came from the same prefix): a burst in all.
    let claims = h.server.stats().reads_by_kind["claim"];
    assert_eq!(claims, u64::from(super::super::nodes::CLAIM_BURST));
    assert_eq!(h.server.stats().claims_throttled, 11);
    // Over the allowance the answer is "busy": the holder of a real token keeps it and asks again.
    assert_eq!(h.req(a(6), Some(Token([0x43; 16])), RequestBody::Ping), Err(ErrorCode::Busy));
    // The answer to a stranger is never larger than the request.
    let (_, bytes) = h.encode(Some(Token([7; 16])), RequestBody::Ping);
    for t in h.raw(a(7), &bytes) {
        assert!(t.bytes.len() <= bytes.len());
    }
}

/// A logout with a token nobody holds waits for a claim read on a node; its refusal must leave
/// nothing in the reply cache (security issue, item 3), however many strangers send one.
#[test]
fn a_strangers_logout_that_waited_for_a_read_leaves_no_cached_reply() {
    let mut c = Cluster::new();
    let h = &mut c.nodes[0];
    for i in 0..50u8 {
        let forged = Token([i; 16]);
        let from: SocketAddr = format!("10.{i}.0.1:4000").parse().unwrap();
        assert_eq!(h.req(from, Some(forged), RequestBody::Logout), Err(ErrorCode::SessionExpired));
    }
    assert!(h.server.stats().reads_by_kind["claim"] >= 50, "each one was looked up");
    assert_eq!(h.server.replies.len(), 0, "no reply kept for a stranger");
}

#[test]
fn the_same_name_registered_on_two_nodes_has_one_winner() {
    let mut c = Cluster::new();
    // B's registration has found the name free and is hashing the password when A's commits.
    let cookie = c.nodes[1].cookie(a(1));
    let body = RequestBody::Register {
        user: "carol".into(),
        password: "password".into(),
        cookie: Some(cookie),
        pad: vec![],
    };
    let (id, bytes) = c.nodes[1].encode(None, body);
    let now = c.nodes[1].now;
    c.nodes[1].server.handle(now, a(1), &bytes);
    c.nodes[1].reads();
    assert_eq!(c.nodes[1].server.password_jobs(), 1);
    assert_eq!(c.nodes[0].register("carol", "password"), Ok(Response::Registered));
    c.nodes[1].turn();
    let answers: Vec<_> =
        c.nodes[1].drain().into_iter().filter_map(|t| proto::decode_server(&t.bytes).ok()).collect();
    assert_eq!(
        answers,
        vec![ServerMsg::Reply { id, result: Err(ErrorCode::NameTaken { user: "carol".into() }) }]
    );
    assert_eq!(c.nodes[1].server.stats().names_taken_elsewhere, 1);
    // Its retransmission is not answered "registered" from the cache either.
    assert_eq!(c.nodes[1].register("carol", "password"), Err(ErrorCode::NameTaken { user: "carol".into() }));
}

#[test]
fn sessions_ended_elsewhere_and_stale_follower_lists() {
    let mut c = Cluster::new();
    let alice = c.nodes[0].user("alice", 1);
    let bob = c.nodes[1].user("bob", 2);
    // A caches who follows alice (nobody), then bob follows her through B.
    c.nodes[0].req(a(1), Some(alice), post("nobody hears this")).unwrap();
    c.nodes[1].req(a(2), Some(bob), RequestBody::Subscribe { user: "alice".into() }).unwrap();
    c.listen(0);
    c.nodes[0].req(a(1), Some(alice), post("bob hears this")).unwrap();
    c.listen(1);
    assert_eq!(
        c.nodes[1].pushes().iter().map(|p| p.2.text.as_str()).collect::<Vec<_>>(),
        vec!["bob hears this"]
    );
    c.nodes[1].next_id += 100;
    // bob's account ends elsewhere: B's session ends, its holder hears so.
    let h = &mut c.nodes[1];
    h.server.on_remote(h.now, Remote::Ended(vec![bob]));
    assert_eq!(h.server.session_count(), 0);
    assert_eq!(h.req(a(2), Some(bob), RequestBody::Ping), Err(ErrorCode::SessionExpired));
    assert_eq!(h.server.stats().sessions_ended_elsewhere, 1);
}

#[test]
fn a_failed_commit_on_an_unreachable_store_keeps_the_committed_sessions() {
    let mut c = Cluster::new();
    let alice = c.nodes[0].user("alice", 1);
    let h = &mut c.nodes[0];
    // A login whose batch is in flight when the store goes away.
    let login =
        RequestBody::Login { user: "alice".into(), password: "password".into(), cookie: None, pad: vec![] };
    let (_, bytes) = h.encode(None, login);
    h.server.handle(h.now, a(3), &bytes);
    let mut taken = None;
    for _ in 0..10 {
        h.reads();
        while let Some(job) = h.server.poll_password_job() {
            let (id, outcome) = job.run();
            h.server.on_password_done(h.now, id, outcome);
        }
        taken = h.server.take_writes();
        if taken.is_some() {
            break;
        }
    }
    let (n, _) = taken.expect("the new session's batch");
    let durable = h.server.assumed_durable();
    assert_eq!(durable.sessions.iter().map(|s| s.token).collect::<Vec<_>>(), vec![alice]);
    h.server.on_commit_failed(h.now, n, durable);
    assert_eq!(h.server.session_count(), 1, "the old session stays, the new one goes");
    let sent = h.drain();
    let refused = sent.iter().any(|t| {
        matches!(
            proto::decode_server(&t.bytes),
            Ok(ServerMsg::Reply { result: Err(ErrorCode::StorageUnavailable), .. })
        )
    });
    assert!(refused, "the login was told to retry: {sent:?}");
    assert_eq!(
        h.req(a(1), Some(alice), RequestBody::WhoAmI),
        Ok(Response::Me { user: "alice".into(), sessions: 1 })
    );
}
