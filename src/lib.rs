//! udpmsg: a messaging daemon and client speaking a compact binary protocol over UDP.
//!
//! # Layout
//!
//! This library is the sans-IO core: it has no sockets, reads no clock and starts no threads.
//! Time, received datagrams and finished background work are inputs; datagrams to send, timer
//! deadlines, storage writes and password jobs are outputs. The binaries in `src/bin/` are thin
//! mio shells around it, and the tests drive it on a virtual clock over a simulated network.
//!
//! - [`proto`]: wire types, framing (magic + version), codec and the protocol's limits.
//! - [`server`]: the daemon's state machine: sessions, subscriptions, posts, reliable pushes,
//!   request de-duplication, group-commit gating.
//! - [`client`]: the client's state machine: one request at a time with adaptive retransmission,
//!   push acknowledgement, ordering and de-duplication, keepalive.
//! - [`command`]: the REPL syntax `command#arg&arg`, parsed into requests.
//! - [`rtt`]: RFC 6298 retransmission timeouts shared by both sides.
//! - [`password`]: argon2id hashing as jobs run off the event loop.
//! - [`store`]: the storage trait, its batch of writes, and its implementations: SQLite,
//!   PostgreSQL (several daemons on one database) and in memory.
//! - [`config`]: `server.toml` / `client.toml`, defaults and validation.
//! - [`netem`]: a seeded model of a lossy, duplicating, reordering, delaying network path,
//!   shared by the simulated-network tests and the `udpmsg-proxy` binary.

pub mod client;
pub mod command;
pub mod config;
pub mod netem;
pub mod password;
pub mod proto;
pub mod rtt;
pub mod server;
pub mod store;
