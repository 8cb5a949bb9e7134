//! Wire types and codec for protocol v3.
//!
//! History: v1 was the first; v2 added [`ClientMsg::PushAcks`] and [`ServerMsg::Pushes`]. v3
//! makes the daemon safe to expose: address validation ([`ServerMsg::PathChallenge`] /
//! [`ClientMsg::PathResponse`] before a session's pushes move, and [`ServerMsg::Retry`] cookies
//! before a login or registration costs a hash or creates anything), acks that name the epoch
//! they acknowledge, the epoch in login and ping answers, a version notice that echoes the
//! datagram it answers, and the posting time in every [`Message`]. A peer of another version
//! cannot read these, so each side says so instead of misunderstanding.
//!
//! # Framing
//!
//! One message per UDP datagram. Every datagram starts with a three byte header:
//!
//! ```text
//! +------+------+---------+------------------------------------------+
//! | 'U'  | 'M'  | version | postcard body: ClientMsg (client->daemon) |
//! | 'U'  | 'm'  | version | postcard body: ServerMsg (daemon->client) |
//! +------+------+---------+------------------------------------------+
//! ```
//!
//! The two directions have different magic, so no answer can ever be taken for a request. A
//! body is one value in its canonical encoding, with no trailing data.
//!
//! A datagram whose header carries another version is answered by the daemon with its own header,
//! a tag byte no message starts with, and an echo of up to [`NOTICE_ECHO`] bytes of what came
//! after the received header ([`version_notice`]): never more than what it received, decodable
//! by a client of any version (which reads the header only), and tied to the request it answers,
//! so that a client can tell a real notice from one forged by someone who never saw its request.
//! Anything else that does not decode gets no answer at all.
//!
//! Every datagram is at most [`MAX_DATAGRAM`] bytes so that IP never fragments it; the text limit
//! follows from that (see [`MAX_TEXT_BYTES`]).
//!
//! The wire types are deliberately non-recursive: postcard has no recursion limit, and a flat
//! schema bounds the work any datagram can cause.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The first two bytes of every datagram from a client.
pub const CLIENT_MAGIC: [u8; 2] = *b"UM";
/// The first two bytes of every datagram from the daemon. Distinct from [`CLIENT_MAGIC`], so
/// that no answer can ever be read as a request: a spoofed datagram cannot set two daemons (or
/// one daemon and itself) answering each other forever.
pub const SERVER_MAGIC: [u8; 2] = *b"Um";
/// The protocol version this build speaks.
pub const VERSION: u8 = 3;
/// Length of the magic + version header.
pub const HEADER_LEN: usize = 3;
/// No datagram, in either direction, is ever larger than this.
pub const MAX_DATAGRAM: usize = 1200;
/// Longest user name the protocol allows (a config key may lower it).
pub const MAX_NAME_LEN: usize = 32;
/// Longest password the protocol allows (a config key may lower it).
pub const MAX_PASSWORD_LEN: usize = 128;
/// Hard upper bound for message text in bytes. With the header, the frame, the push sequence, the
/// message id, a maximal author and recipient name, the largest frame stays under
/// [`MAX_DATAGRAM`] (checked by a unit test).
pub const MAX_TEXT_BYTES: usize = 1024;
/// Longest wildcard pattern accepted by `ListUsers`.
pub const MAX_PATTERN_LEN: usize = 64;
/// Datagrams that carry no session (register, login) must be at least this long. The client
/// pads them; the daemon drops shorter ones without an answer. Every answer to such a request is
/// smaller than this, so the daemon can never be used to amplify traffic towards a spoofed
/// address.
pub const MIN_UNAUTHENTICATED_REQUEST: usize = 128;

/// A session token: 128 bits from the OS CSPRNG. Its `Debug` never shows the value, so it cannot
/// leak into logs.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct Token(pub [u8; 16]);

/// Hashes the bytes, consistent with the constant-time `Eq` below.
impl std::hash::Hash for Token {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Equality is constant time. Map lookups hash with a per-process random key first, so bucket
/// probing leaks nothing useful either.
impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.ct_eq(other)
    }
}
impl Eq for Token {}

/// Ordering only breaks ties between equal deadlines in the daemon's timer heap.
impl PartialOrd for Token {
    fn partial_cmp(&self, other: &Token) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Token {
    fn cmp(&self, other: &Token) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Compares two tokens in constant time (no early exit on the first differing byte).
    pub fn ct_eq(&self, other: &Token) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }

    /// A public name for the session this token opens: pushes carry it so that a client takes
    /// only its own session's pushes. FNV-1a over the token: stable across builds, and it
    /// reveals nothing usable about the 128 secret bits.
    pub fn session_id(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0 {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// A stateless proof that the holder receives datagrams at a source address: a MAC of the
/// address under a secret the daemon rotates every two minutes (see [`ServerMsg::Retry`]). Its
/// `Debug` never shows the value.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie(pub [u8; 16]);

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cookie(..)")
    }
}

/// Everything a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// A request; the daemon answers with a [`ServerMsg::Reply`] carrying the same `id`.
    Request(Request),
    /// Acknowledges the push with this sequence number of this epoch. Never answered.
    PushAck { token: Token, epoch: u32, seq: u64 },
    /// Acknowledges several pushes of one session and epoch at once (2 to [`MAX_ACKS`] sequence
    /// numbers, each once): a client acks everything one read of its socket brought in a single
    /// datagram. Never answered.
    PushAcks { token: Token, epoch: u32, seqs: Vec<u64> },
    /// Echoes a [`ServerMsg::PathChallenge`] from the address it reached: the session's pushes
    /// may move there. Never answered.
    PathResponse { token: Token, data: u64 },
}

/// Most sequence numbers in one [`ClientMsg::PushAcks`].
pub const MAX_ACKS: usize = 64;

/// A request: the id is chosen by the client and echoed by the reply; a retransmission reuses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub token: Option<Token>,
    pub body: RequestBody,
}

/// The requests of protocol v3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Create an account. `cookie`: the one a [`ServerMsg::Retry`] gave this address (a
    /// registration always needs one). `pad` brings the datagram to
    /// [`MIN_UNAUTHENTICATED_REQUEST`].
    Register {
        user: String,
        password: String,
        cookie: Option<Cookie>,
        pad: Vec<u8>,
    },
    /// Open a session. `cookie` and `pad` as for `Register` (a login needs a cookie when the
    /// daemon is busy hashing, or when this address has used up its unproven attempts).
    Login {
        user: String,
        password: String,
        cookie: Option<Cookie>,
        pad: Vec<u8>,
    },
    /// End the session named by the token.
    Logout,
    Subscribe {
        user: String,
    },
    Unsubscribe {
        user: String,
    },
    /// Store `text` and forward it to every logged-in subscriber.
    Post {
        text: String,
    },
    /// A direct message to one user.
    Send {
        to: String,
        text: String,
    },
    /// Up to `count` of the newest inbox messages with an id below `before` (all when `None`).
    Retrieve {
        count: u32,
        before: Option<u64>,
    },
    /// Account names matching a `*`/`?` wildcard, in name order, after `after`.
    ListUsers {
        pattern: String,
        after: Option<String>,
    },
    /// Keepalive; also tells the daemon the client's current address.
    Ping,
    WhoAmI,
    /// Whom I follow and who follows me, paged by name like `ListUsers`.
    Subscriptions {
        after: Option<String>,
    },
    /// Delete one's own account (password re-checked).
    DeleteAccount {
        password: String,
    },
}

impl RequestBody {
    /// Short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestBody::Register { .. } => "register",
            RequestBody::Login { .. } => "login",
            RequestBody::Logout => "logout",
            RequestBody::Subscribe { .. } => "subscribe",
            RequestBody::Unsubscribe { .. } => "unsubscribe",
            RequestBody::Post { .. } => "post",
            RequestBody::Send { .. } => "send",
            RequestBody::Retrieve { .. } => "retrieve",
            RequestBody::ListUsers { .. } => "users",
            RequestBody::Ping => "ping",
            RequestBody::WhoAmI => "whoami",
            RequestBody::Subscriptions { .. } => "subscriptions",
            RequestBody::DeleteAccount { .. } => "delete",
        }
    }
}

/// Everything the daemon sends (apart from the bare [`version_notice`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    Reply {
        id: u64,
        result: Result<Response, ErrorCode>,
    },
    /// A forwarded message. `session` is [`Token::session_id`] of the session it is for, so a
    /// client takes only its own session's pushes; `epoch` numbers the daemon's runs (it grows
    /// at every start); within one epoch, `seq` counts the pushes of one session from 1 without
    /// gaps, so the client can show them in order and drop duplicates. Acked with
    /// [`ClientMsg::PushAck`].
    Push {
        session: u64,
        epoch: u32,
        seq: u64,
        message: Message,
    },
    /// Several pushes of one session in one datagram (2 to [`MAX_PUSH_BATCH`]): `messages[i]`
    /// has sequence number `first_seq + i`. The daemon packs what it releases to a session at
    /// once (a burst of posts, a catch-up) as long as it fits a datagram; each push is still
    /// acked, and retransmitted alone, by its own sequence number.
    Pushes {
        session: u64,
        epoch: u32,
        first_seq: u64,
        messages: Vec<Message>,
    },
    /// Sent to a new source address of a session (a NAT rebinding, a roaming client, or a
    /// spoofed one): the session's pushes move there once the client echoes `data` from it in a
    /// [`ClientMsg::PathResponse`]. Until then the address gets nothing but answers, and at most
    /// three times the bytes it sent.
    PathChallenge {
        session: u64,
        data: u64,
    },
    /// Request `id` (a login or registration) needs a proof that its source address is real:
    /// send it again (under a new id) with this cookie. Stateless on the daemon's side, and
    /// never larger than the request.
    Retry {
        id: u64,
        cookie: Cookie,
    },
}

/// Most pushes in one [`ServerMsg::Pushes`].
pub const MAX_PUSH_BATCH: usize = 32;

/// Wire index of [`ServerMsg::Reply`] and of [`ServerMsg::Retry`]: the two messages that start
/// with a request id (a load generator routes them by it without decoding).
pub const SERVER_MSG_REPLY_TAG: u8 = 0;
pub const SERVER_MSG_RETRY_TAG: u8 = 4;

/// Wire index of [`ServerMsg::Push`]; the push encoder writes it by hand (see [`encode_push`]).
const SERVER_MSG_PUSH_TAG: u8 = 1;
/// Wire index of [`ServerMsg::Pushes`] (see [`encode_pushes`]).
const SERVER_MSG_PUSHES_TAG: u8 = 2;

/// A stored message as the users see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique, increasing in posting order across the whole daemon.
    pub id: u64,
    /// When the daemon accepted it: milliseconds since the Unix epoch, by the daemon's clock.
    pub time: u64,
    pub author: String,
    /// `Some(recipient)` for a direct message, `None` for a post to subscribers.
    pub to: Option<String>,
    pub text: String,
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Registered,
    /// `missed`: messages that arrived while none of the user's sessions was there to receive
    /// them; the first `catching_up` of them follow as pushes, numbered in `epoch`.
    LoggedIn {
        token: Token,
        missed: u32,
        catching_up: u32,
        epoch: u32,
    },
    LoggedOut,
    Subscribed,
    Unsubscribed,
    Posted {
        id: u64,
        recipients: u32,
    },
    Sent {
        id: u64,
    },
    /// One page of a retrieve, oldest first; `more` when older messages remain within the count.
    Messages {
        messages: Vec<Message>,
        more: bool,
    },
    /// One page of names; `next` is the cursor for the following page (`after`), if any.
    Users {
        names: Vec<String>,
        next: Option<String>,
    },
    /// The answer to a ping without a token (a health check).
    Pong,
    /// The answer to a ping with a session: the epoch its pushes are numbered in now (a client
    /// follows a new epoch, after a daemon restart, only once an answer to its own request has
    /// named it).
    SessionPong {
        epoch: u32,
    },
    Me {
        user: String,
        sessions: u32,
    },
    /// One page of relations: (name, I follow them, they follow me).
    Relations {
        entries: Vec<Relation>,
        next: Option<String>,
    },
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub user: String,
    pub following: bool,
    pub follower: bool,
}

/// Every error the daemon can answer with. Each carries what the user needs to fix the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Unknown user or wrong password: deliberately one answer for both.
    BadCredentials,
    /// The request needs a session and carried none, or an unknown token.
    NotLoggedIn,
    /// The token was valid once but the session has expired.
    SessionExpired,
    NoSuchUser {
        user: String,
    },
    CannotSubscribeToSelf,
    AlreadySubscribed {
        user: String,
    },
    NotSubscribed {
        user: String,
    },
    EmptyText,
    TextTooLong {
        max: u32,
    },
    CountOutOfRange {
        min: u32,
        max: u32,
    },
    RegistrationClosed,
    NameTaken {
        user: String,
    },
    InvalidName {
        max_len: u32,
    },
    InvalidPassword {
        min_len: u32,
        max_len: u32,
    },
    InvalidPattern {
        max_len: u32,
    },
    TooManySubscriptions {
        max: u32,
    },
    TooManySessions {
        max: u32,
    },
    /// The daemon is at capacity for now (e.g. the password queue is full); retry soon.
    Busy,
    RateLimited {
        retry_after_secs: u32,
    },
    /// A write could not be made durable; nothing was changed; retry.
    StorageUnavailable,
    /// The server holds as many accounts as it is configured for.
    TooManyAccounts {
        max: u32,
    },
    /// The text contains a control character (only newline is allowed): `code_point` is the
    /// first one.
    InvalidText {
        code_point: u32,
    },
}

impl ErrorCode {
    /// The variant's name: a stable, machine-readable code (metrics, `--json`).
    pub fn code(&self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadCredentials => "BadCredentials",
            NotLoggedIn => "NotLoggedIn",
            SessionExpired => "SessionExpired",
            NoSuchUser { .. } => "NoSuchUser",
            CannotSubscribeToSelf => "CannotSubscribeToSelf",
            AlreadySubscribed { .. } => "AlreadySubscribed",
            NotSubscribed { .. } => "NotSubscribed",
            EmptyText => "EmptyText",
            TextTooLong { .. } => "TextTooLong",
            CountOutOfRange { .. } => "CountOutOfRange",
            RegistrationClosed => "RegistrationClosed",
            NameTaken { .. } => "NameTaken",
            InvalidName { .. } => "InvalidName",
            InvalidPassword { .. } => "InvalidPassword",
            InvalidPattern { .. } => "InvalidPattern",
            TooManySubscriptions { .. } => "TooManySubscriptions",
            TooManySessions { .. } => "TooManySessions",
            Busy => "Busy",
            RateLimited { .. } => "RateLimited",
            StorageUnavailable => "StorageUnavailable",
            TooManyAccounts { .. } => "TooManyAccounts",
            InvalidText { .. } => "InvalidText",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ErrorCode::*;
        match self {
            BadCredentials => write!(f, "wrong user name or password"),
            NotLoggedIn => write!(f, "not logged in: use login#USER&PASSWORD first"),
            SessionExpired => write!(f, "session expired: log in again"),
            NoSuchUser { user } => write!(f, "no such user {user}"),
            CannotSubscribeToSelf => write!(f, "you cannot subscribe to yourself"),
            AlreadySubscribed { user } => write!(f, "already subscribed to {user}"),
            NotSubscribed { user } => write!(f, "not subscribed to {user}"),
            EmptyText => write!(f, "text is empty"),
            TextTooLong { max } => write!(f, "text too long: at most {max} bytes"),
            CountOutOfRange { min, max } => {
                write!(f, "count out of range: must be between {min} and {max}")
            }
            RegistrationClosed => write!(f, "registration is closed on this server"),
            NameTaken { user } => write!(f, "name {user} is taken"),
            InvalidName { max_len } => {
                write!(f, "invalid name: 1 to {max_len} characters from A-Z a-z 0-9 _ . -")
            }
            InvalidPassword { min_len, max_len } => {
                write!(f, "invalid password: {min_len} to {max_len} bytes")
            }
            InvalidPattern { max_len } => {
                write!(f, "invalid pattern: up to {max_len} characters of names, * and ?")
            }
            TooManySubscriptions { max } => {
                write!(f, "too many subscriptions: at most {max}")
            }
            TooManySessions { max } => write!(f, "too many sessions: at most {max}"),
            Busy => write!(f, "server busy, retry"),
            RateLimited { retry_after_secs } => {
                write!(f, "too many attempts, retry in {retry_after_secs} s")
            }
            StorageUnavailable => write!(f, "storage unavailable, retry"),
            TooManyAccounts { max } => {
                write!(f, "registration refused: the server holds its maximum of {max} accounts")
            }
            InvalidText { code_point } => {
                write!(f, "text contains the control character U+{code_point:04X}; only newline is allowed")
            }
        }
    }
}

/// Why a datagram could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header, or longer than [`MAX_DATAGRAM`].
    BadLength,
    BadMagic,
    /// Well-formed header of another protocol version.
    Version(u8),
    /// The body is not a valid message of this version (or has trailing bytes).
    Body,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadLength => write!(f, "bad datagram length"),
            DecodeError::BadMagic => write!(f, "bad magic"),
            DecodeError::Version(v) => write!(f, "protocol version {v}"),
            DecodeError::Body => write!(f, "undecodable body"),
        }
    }
}

fn check_header(bytes: &[u8], magic: [u8; 2]) -> Result<&[u8], DecodeError> {
    if bytes.len() < HEADER_LEN || bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::BadLength);
    }
    if bytes[..2] != magic {
        return Err(DecodeError::BadMagic);
    }
    if bytes[2] != VERSION {
        return Err(DecodeError::Version(bytes[2]));
    }
    Ok(&bytes[HEADER_LEN..])
}

/// Decodes a body that is exactly one value in its canonical encoding: no trailing bytes, no
/// over-long varints. So `encode(decode(x)) == x` for every accepted `x`, and a datagram has
/// one meaning only.
fn decode_body<'a, T: Deserialize<'a> + Serialize>(body: &'a [u8]) -> Result<T, DecodeError> {
    let value = match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => value,
        _ => return Err(DecodeError::Body),
    };
    let mut canonical = [0u8; MAX_DATAGRAM];
    match postcard::to_slice(&value, &mut canonical) {
        Ok(encoded) if *encoded == *body => Ok(value),
        _ => Err(DecodeError::Body),
    }
}

/// Appends header + body to `out` (cleared first).
fn encode_into<T: Serialize>(value: &T, magic: [u8; 2], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&magic);
    out.push(VERSION);
    // Serializing our own wire types into a Vec cannot fail: they contain no maps with
    // non-string keys and no unsupported types.
    let body = postcard::to_extend(value, std::mem::take(out)).expect("wire types serialize");
    *out = body;
}

pub fn encode_client(msg: &ClientMsg) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, CLIENT_MAGIC, &mut out);
    out
}

/// Encodes a request as a client sends it. A register or login (what a daemon answers before it
/// knows the source address is real) is padded to [`MIN_UNAUTHENTICATED_REQUEST`] bytes, so that
/// no answer is larger than the request (anti-amplification).
pub fn encode_request(req: Request) -> Vec<u8> {
    let mut msg = ClientMsg::Request(req);
    let bytes = encode_client(&msg);
    let short = MIN_UNAUTHENTICATED_REQUEST.saturating_sub(bytes.len());
    if let ClientMsg::Request(Request {
        body: RequestBody::Login { pad, .. } | RequestBody::Register { pad, .. },
        ..
    }) = &mut msg
    {
        if short > 0 {
            *pad = vec![0; short];
            return encode_client(&msg);
        }
    }
    bytes
}

pub fn encode_server(msg: &ServerMsg) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, SERVER_MAGIC, &mut out);
    out
}

pub fn decode_client(bytes: &[u8]) -> Result<ClientMsg, DecodeError> {
    let msg: ClientMsg = decode_body(check_header(bytes, CLIENT_MAGIC)?)?;
    if let ClientMsg::PushAcks { seqs, .. } = &msg {
        // One way to say each thing: a single ack is a PushAck, and no seq twice.
        let unique = seqs.iter().collect::<std::collections::BTreeSet<_>>().len() == seqs.len();
        if !(2..=MAX_ACKS).contains(&seqs.len()) || !unique {
            return Err(DecodeError::Body);
        }
    }
    Ok(msg)
}

pub fn decode_server(bytes: &[u8]) -> Result<ServerMsg, DecodeError> {
    let msg: ServerMsg = decode_body(check_header(bytes, SERVER_MAGIC)?)?;
    if let ServerMsg::Pushes { messages, first_seq, .. } = &msg {
        // One way to say each thing: a single push is a Push; and the numbers must not wrap.
        // The seq after the last must exist too: a receiver counts past the last one.
        let fits = first_seq.checked_add(messages.len() as u64).is_some();
        if !(2..=MAX_PUSH_BATCH).contains(&messages.len()) || !fits {
            return Err(DecodeError::Body);
        }
    }
    Ok(msg)
}

/// Bytes of a datagram that a version notice echoes, at most.
pub const NOTICE_ECHO: usize = 15;
/// The byte between a version notice's header and its echo: no message of any version starts
/// with it (it is not a valid enum tag), so a notice can never be read as a message.
pub const NOTICE_TAG: u8 = 0xff;

/// The answer to a datagram of another protocol version: our header, [`NOTICE_TAG`], then up to
/// [`NOTICE_ECHO`] bytes of what followed the received datagram's header, one byte fewer than
/// that was (so the notice is never longer than the datagram it answers). A datagram with
/// nothing after its header gets the bare header.
pub fn version_notice(received: &[u8]) -> Vec<u8> {
    let mut v = SERVER_MAGIC.to_vec();
    v.push(VERSION);
    let body = received.get(HEADER_LEN..).unwrap_or_default();
    if !body.is_empty() {
        v.push(NOTICE_TAG);
        v.extend_from_slice(&body[..(body.len() - 1).min(NOTICE_ECHO)]);
    }
    v
}

/// Whether a version notice answers the datagram `sent`: it echoes the start of what followed
/// that datagram's header. A notice without an echo (from a v2 daemon) proves nothing.
pub fn notice_answers(notice: &[u8], sent: &[u8]) -> bool {
    let body = sent.get(HEADER_LEN..).unwrap_or_default();
    match notice.get(HEADER_LEN..) {
        Some([NOTICE_TAG, echo @ ..]) => {
            !echo.is_empty() && body.starts_with(echo) && echo.len() == (body.len() - 1).min(NOTICE_ECHO)
        }
        _ => false,
    }
}

/// The first character of `text` that message text may not contain: a C0 or C1 control other
/// than newline (a carriage return or a vertical tab would let a message draw over the line
/// before it, an escape sequence would reach the reader's terminal).
pub fn forbidden_char(text: &str) -> Option<char> {
    text.chars().find(|&c| c != '\n' && c.is_control())
}

/// A string that came from the network, made safe for a log line: escaped (no control
/// characters reach the log) and cut to `max` characters.
pub fn quoted(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).flat_map(char::escape_debug).collect();
    if s.chars().nth(max).is_some() {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

/// A message encoded once, so that forwarding it to many sessions only copies bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedMessage {
    pub message: Message,
    wire: Vec<u8>,
}

impl EncodedMessage {
    pub fn new(message: Message) -> Self {
        let wire = postcard::to_stdvec(&message).expect("wire types serialize");
        EncodedMessage { message, wire }
    }

    /// Bytes of the message inside a push or a page.
    pub fn wire_len(&self) -> usize {
        self.wire.len()
    }
}

/// Encodes `ServerMsg::Push { session, epoch, seq, message }` into `out` without serializing the
/// message again.
/// Produces exactly the bytes `encode_server` would (a unit test holds it to that).
pub fn encode_push(session: u64, epoch: u32, seq: u64, msg: &EncodedMessage, out: &mut Vec<u8>) {
    push_header(SERVER_MSG_PUSH_TAG, session, epoch, seq, out);
    out.extend_from_slice(&msg.wire);
}

/// Encodes `ServerMsg::Pushes { session, epoch, first_seq, messages }` into `out` from messages
/// encoded once. Produces exactly the bytes `encode_server` would (a unit test holds it to that).
pub fn encode_pushes<'a, I>(session: u64, epoch: u32, first_seq: u64, msgs: I, out: &mut Vec<u8>)
where
    I: IntoIterator<Item = &'a EncodedMessage>,
    I::IntoIter: ExactSizeIterator,
{
    let msgs = msgs.into_iter();
    push_header(SERVER_MSG_PUSHES_TAG, session, epoch, first_seq, out);
    push_varint(msgs.len() as u64, out);
    for m in msgs {
        out.extend_from_slice(&m.wire);
    }
}

/// The frame and the fields both push messages start with (`out` is cleared first).
fn push_header(tag: u8, session: u64, epoch: u32, seq: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&SERVER_MAGIC);
    out.push(VERSION);
    out.push(tag);
    push_varint(session, out);
    push_varint(u64::from(epoch), out);
    push_varint(seq, out);
}

/// The most bytes a `Pushes` datagram adds around its messages' own bytes (header, tag, the
/// three numbers and the count, at their longest).
pub const PUSHES_OVERHEAD: usize = HEADER_LEN + 1 + 10 + 5 + 10 + 1;

/// postcard's unsigned LEB128 varint.
fn push_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Is `name` a valid account name (charset and the protocol's length limit)?
pub fn valid_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len.min(MAX_NAME_LEN)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Is `pattern` a valid wildcard: name characters plus `*` and `?`.
pub fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= MAX_PATTERN_LEN
        && pattern.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*' | b'?'))
}

/// Glob match with `*` (any run, possibly empty) and `?` (one character), linear time with
/// single-star backtracking, so no pattern can make it blow up.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(n: usize) -> String {
        "x".repeat(n)
    }

    #[test]
    fn client_round_trip() {
        let msgs = vec![
            ClientMsg::Request(Request {
                id: 7,
                token: None,
                body: RequestBody::Login {
                    user: "alice".into(),
                    password: "p&ss".into(),
                    cookie: None,
                    pad: vec![0; 40],
                },
            }),
            ClientMsg::Request(Request {
                id: u64::MAX,
                token: Some(Token([9; 16])),
                body: RequestBody::Post { text: "a#b & c".into() },
            }),
            ClientMsg::PushAck { token: Token([1; 16]), epoch: 7, seq: 300 },
            ClientMsg::PathResponse { token: Token([2; 16]), data: u64::MAX },
        ];
        for m in msgs {
            let bytes = encode_client(&m);
            assert_eq!(&bytes[..3], b"UM\x03");
            assert_eq!(decode_client(&bytes), Ok(m));
        }
    }

    #[test]
    fn server_round_trip_and_push_encoding_matches() {
        let message =
            Message { id: 42, time: 1_764_000_000_000, author: "bob".into(), to: None, text: "hi".into() };
        let enc = EncodedMessage::new(message.clone());
        for (session, epoch, seq) in
            [(0, 1u32, 1u64), (u64::MAX, 200, 127), (77, u32::MAX, 128), (1, 7, 1 << 40)]
        {
            let mut manual = Vec::new();
            encode_push(session, epoch, seq, &enc, &mut manual);
            let generic = encode_server(&ServerMsg::Push { session, epoch, seq, message: message.clone() });
            assert_eq!(manual, generic);
            assert_eq!(
                decode_server(&manual),
                Ok(ServerMsg::Push { session, epoch, seq, message: message.clone() })
            );
        }
        let reply = ServerMsg::Reply { id: 3, result: Err(ErrorCode::TextTooLong { max: 5 }) };
        assert_eq!(decode_server(&encode_server(&reply)), Ok(reply));
    }

    #[test]
    fn batched_pushes_encode_once_and_have_one_meaning() {
        let msgs: Vec<Message> = (0..MAX_PUSH_BATCH as u64)
            .map(|i| Message { id: 100 + i, time: i, author: "bob".into(), to: None, text: format!("m{i}") })
            .collect();
        let enc: Vec<std::sync::Arc<EncodedMessage>> =
            msgs.iter().map(|m| std::sync::Arc::new(EncodedMessage::new(m.clone()))).collect();
        for (n, session, epoch, first_seq) in
            [(2, 0, 1u32, 1u64), (MAX_PUSH_BATCH, u64::MAX, u32::MAX, 1 << 40)]
        {
            let mut manual = Vec::new();
            encode_pushes(session, epoch, first_seq, enc[..n].iter().map(|m| &**m), &mut manual);
            let generic = ServerMsg::Pushes { session, epoch, first_seq, messages: msgs[..n].to_vec() };
            assert_eq!(manual, encode_server(&generic));
            assert_eq!(decode_server(&manual), Ok(generic));
            let wires: usize = enc[..n].iter().map(|m| m.wire_len()).sum();
            assert!(manual.len() <= PUSHES_OVERHEAD + wires);
        }
        // One push is a Push; none, too many, or numbers that wrap are refused.
        let pushes = |first_seq, n: usize| {
            encode_server(&ServerMsg::Pushes {
                session: 1,
                epoch: 1,
                first_seq,
                messages: msgs.iter().cycle().take(n).cloned().collect(),
            })
        };
        for bytes in [pushes(1, 0), pushes(1, 1), pushes(1, MAX_PUSH_BATCH + 1), pushes(u64::MAX - 1, 2)] {
            assert_eq!(decode_server(&bytes), Err(DecodeError::Body));
        }
    }

    #[test]
    fn header_checks() {
        assert_eq!(decode_client(b"UM"), Err(DecodeError::BadLength));
        assert_eq!(decode_client(b"XX\x02\x00"), Err(DecodeError::BadMagic));
        assert_eq!(decode_client(b"UM\x01\x00"), Err(DecodeError::Version(1)));
        assert_eq!(decode_client(b"UM\x02\x00"), Err(DecodeError::Version(2)));
        assert_eq!(decode_client(b"UM\x03"), Err(DecodeError::Body));
        assert_eq!(decode_client(&[0u8; MAX_DATAGRAM + 1]), Err(DecodeError::BadLength));
        // Trailing bytes after a valid body are rejected, so decode/encode round-trips exactly.
        let mut ok = encode_client(&ClientMsg::PushAck { token: Token([0; 16]), epoch: 1, seq: 1 });
        ok.push(0);
        assert_eq!(decode_client(&ok), Err(DecodeError::Body));
        // Over-long varints (a non-canonical id 0) are not accepted.
        assert_eq!(decode_client(b"UM\x03\x00\x80\x00\x00\x09"), Err(DecodeError::Body));
        // No answer is ever a request: a Pong is not a Ping, whatever the bytes after the magic.
        let pong = encode_server(&ServerMsg::Reply { id: 42, result: Ok(Response::Pong) });
        assert_eq!(decode_client(&pong), Err(DecodeError::BadMagic));
        assert_eq!(decode_client(&version_notice(b"UM\x02\x00\x07")), Err(DecodeError::BadMagic));
    }

    /// A bare three-byte notice could be forged by anyone who knows the daemon's address, and
    /// aborted whatever the client was waiting for. It now echoes the request it answers.
    #[test]
    fn version_notices_echo_what_they_answer_and_never_grow() {
        let request = encode_client(&ClientMsg::Request(Request {
            id: 0x1234_5678,
            token: Some(Token([9; 16])),
            body: RequestBody::Ping,
        }));
        let mut v2 = request.clone();
        v2[2] = 2;
        let notice = version_notice(&v2);
        assert_eq!(&notice[..4], b"Um\x03\xff");
        assert_eq!(notice.len(), HEADER_LEN + 1 + NOTICE_ECHO);
        assert_eq!(decode_server(&notice), Err(DecodeError::Body), "never a message, even of our version");
        assert!(notice.len() <= v2.len());
        assert!(notice_answers(&notice, &request));
        let mut future = notice.clone();
        future[2] = 4;
        assert_eq!(decode_server(&future), Err(DecodeError::Version(4)), "any version reads the header");
        let other = encode_client(&ClientMsg::Request(Request {
            id: 0x1234_5679,
            token: Some(Token([9; 16])),
            body: RequestBody::Ping,
        }));
        assert!(!notice_answers(&notice, &other), "another request id");
        assert!(!notice_answers(b"Um\x02", &request), "a bare header proves nothing");
        // Short datagrams get a short echo: never more than they had.
        for n in 0..20 {
            let short = &v2[..n.min(v2.len())];
            assert!(version_notice(short).len() <= short.len().max(HEADER_LEN));
        }
    }

    #[test]
    fn messages_that_start_with_a_request_id_have_the_documented_tags() {
        let reply = encode_server(&ServerMsg::Reply { id: 5, result: Ok(Response::Pong) });
        let retry = encode_server(&ServerMsg::Retry { id: 5, cookie: Cookie([1; 16]) });
        assert_eq!(reply[3..5], [SERVER_MSG_REPLY_TAG, 5]);
        assert_eq!(retry[3..5], [SERVER_MSG_RETRY_TAG, 5]);
    }

    #[test]
    fn control_characters_other_than_newline_are_named() {
        assert_eq!(forbidden_char("hello\nworld"), None);
        assert_eq!(forbidden_char("hi\u{b}\r[bob -> you] send me your password"), Some('\u{b}'));
        assert_eq!(forbidden_char("\u{1b}]0;pwned\u{7}"), Some('\u{1b}'));
        assert_eq!(forbidden_char("tab\there"), Some('\t'));
        assert_eq!(forbidden_char("c1\u{9b}31m"), Some('\u{9b}'));
        assert_eq!(forbidden_char("del\u{7f}"), Some('\u{7f}'));
        assert_eq!(forbidden_char("émoji 🎉 and RTL שלום"), None);
        assert_eq!(quoted("a\u{1b}[2Jb", 64), "\"a\\u{1b}[2Jb\"");
        assert_eq!(quoted(&"x".repeat(100), 4), "\"xxxx...\"");
    }

    #[test]
    fn largest_frames_fit_one_datagram() {
        let name = long(MAX_NAME_LEN);
        let text = long(MAX_TEXT_BYTES);
        let message = Message {
            id: u64::MAX,
            time: u64::MAX,
            author: name.clone(),
            to: Some(name.clone()),
            text: text.clone(),
        };
        let push =
            encode_server(&ServerMsg::Push { session: u64::MAX, epoch: u32::MAX, seq: u64::MAX, message });
        assert!(push.len() <= MAX_DATAGRAM, "push is {} bytes", push.len());
        let send = encode_client(&ClientMsg::Request(Request {
            id: u64::MAX,
            token: Some(Token([0xff; 16])),
            body: RequestBody::Send { to: name.clone(), text },
        }));
        assert!(send.len() <= MAX_DATAGRAM, "send is {} bytes", send.len());
        let login = encode_client(&ClientMsg::Request(Request {
            id: u64::MAX,
            token: None,
            body: RequestBody::Login {
                user: name,
                password: long(MAX_PASSWORD_LEN),
                cookie: Some(Cookie([0xff; 16])),
                pad: vec![],
            },
        }));
        assert!(login.len() <= MAX_DATAGRAM);
    }

    #[test]
    fn names_and_patterns() {
        assert!(valid_name("alice", 32));
        assert!(valid_name("a.b-c_9", 32));
        assert!(!valid_name("", 32));
        assert!(!valid_name("al ice", 32));
        assert!(!valid_name("al*", 32));
        assert!(!valid_name(&long(33), 40));
        assert!(!valid_name("abcdef", 5));
        assert!(valid_pattern("a*"));
        assert!(!valid_pattern("a b"));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("*", "alice"));
        assert!(wildcard_match("a*", "alice"));
        assert!(wildcard_match("*e", "alice"));
        assert!(wildcard_match("a?ice", "alice"));
        assert!(wildcard_match("a*i*e", "alice"));
        assert!(!wildcard_match("a?", "alice"));
        assert!(!wildcard_match("bob", "bobby"));
        assert!(wildcard_match("b*b*", "bobby"));
        assert!(!wildcard_match("*x*", "alice"));
        let p = "*a".repeat(30);
        assert!(!wildcard_match(&p, &"a".repeat(29)));
    }

    #[test]
    fn token_debug_hides_value() {
        assert_eq!(format!("{:?}", Token([0xab; 16])), "Token(..)");
        assert!(Token([1; 16]).ct_eq(&Token([1; 16])));
        assert!(!Token([1; 16]).ct_eq(&Token([2; 16])));
    }
    #[test]
    fn register_and_login_are_padded_and_nothing_else() {
        let login = RequestBody::Login { user: "a".into(), password: "pw".into(), cookie: None, pad: vec![] };
        let bytes = encode_request(Request { id: 1, token: None, body: login });
        assert_eq!(bytes.len(), MIN_UNAUTHENTICATED_REQUEST);
        assert!(matches!(
            decode_client(&bytes),
            Ok(ClientMsg::Request(Request { body: RequestBody::Login { pad, .. }, .. })) if pad.iter().all(|b| *b == 0)
        ));
        let ping = encode_request(Request { id: 1, token: None, body: RequestBody::Ping });
        assert_eq!(
            ping,
            encode_client(&ClientMsg::Request(Request { id: 1, token: None, body: RequestBody::Ping }))
        );
    }

    #[test]
    fn batched_acks_have_one_encoding() {
        let token = Token([7; 16]);
        let acks = |seqs: Vec<u64>| encode_client(&ClientMsg::PushAcks { token, epoch: u32::MAX, seqs });
        let ok = ClientMsg::PushAcks { token, epoch: 2, seqs: vec![3, 1, 2] };
        assert_eq!(decode_client(&encode_client(&ok)), Ok(ok));
        let most = acks((1..=MAX_ACKS as u64).map(|s| s * 1_000_000).collect());
        assert!(most.len() <= MAX_DATAGRAM && decode_client(&most).is_ok());
        // A single ack is a PushAck; none, a repeated seq or too many are refused.
        for seqs in [vec![], vec![5], vec![1, 2, 1], (1..=MAX_ACKS as u64 + 1).collect()] {
            assert_eq!(decode_client(&acks(seqs.clone())), Err(DecodeError::Body), "{seqs:?}");
        }
    }
}
