#!/usr/bin/env python3
"""A small udpmsg client (protocol v3), standard library only, written from PROTOCOL.md.

It is a second implementation of the client side, to keep the specification honest: the
postcard codec of the messages a client needs, padding, request ids, retransmission with RFC
6298 timeouts and backoff, Retry cookies, login with address confirmation, pushes (ordering,
duplicates, epochs, batched acks), path challenges and keepalive pings. Not implemented: moving
between several servers, and contact probing (a request that runs out of tries is an error).

Usage:

    udpmsg_client.py --server HOST:PORT run COMMAND...
    udpmsg_client.py --server HOST:PORT selftest
    udpmsg_client.py --protocol-md PROTOCOL.md check-vectors

Commands of `run`, executed in order (each prints one line, as the Rust client does):

    register USER PASSWORD   login USER PASSWORD   logout
    subscribe USER           unsubscribe USER      post TEXT
    send USER TEXT           retrieve COUNT        whoami        ping
    stats                    (the push epoch and the path challenges answered so far)
    wait N SECONDS           (print pushes until N have arrived; fail after SECONDS)

Errors go to stderr as `error: MESSAGE (Code)`; the exit status is 1 if a command failed.
`selftest` registers two users and runs a scripted conversation, checking every answer.
`check-vectors` encodes and decodes the test vectors of PROTOCOL.md that a client has a use for.
"""

import argparse
import random
import select
import socket
import sys
import time

# ---------------------------------------------------------------- protocol constants (section 2)

CLIENT_MAGIC = b"UM"
SERVER_MAGIC = b"Um"
VERSION = 3
HEADER_LEN = 3
MAX_DATAGRAM = 1200
MIN_UNAUTHENTICATED_REQUEST = 128
MAX_ACKS = 64
MAX_PUSH_BATCH = 32
NOTICE_TAG = 0xFF
NOTICE_ECHO = 15
U64_MAX = (1 << 64) - 1


class DecodeError(Exception):
    pass


# ---------------------------------------------------------------- postcard (section 3)


class Writer:
    def __init__(self):
        self.b = bytearray()

    def u8(self, v):
        self.b.append(v)

    def varint(self, v):
        while True:
            byte = v & 0x7F
            v >>= 7
            if v == 0:
                self.b.append(byte)
                return
            self.b.append(byte | 0x80)

    def bool(self, v):
        self.b.append(1 if v else 0)

    def string(self, s):
        data = s.encode("utf-8")
        self.varint(len(data))
        self.b += data

    def bytes_vec(self, data):
        self.varint(len(data))
        self.b += data

    def fixed(self, data, n):
        assert len(data) == n
        self.b += data

    def option(self, v, write):
        if v is None:
            self.u8(0)
        else:
            self.u8(1)
            write(v)


class Reader:
    """Strict: canonical varints only, bool and option tags 0/1, UTF-8, nothing left over."""

    def __init__(self, data):
        self.d = data
        self.i = 0

    def u8(self):
        if self.i >= len(self.d):
            raise DecodeError("truncated")
        v = self.d[self.i]
        self.i += 1
        return v

    def varint(self, bits):
        max_bytes = (bits + 6) // 7
        v, shift = 0, 0
        for n in range(max_bytes):
            byte = self.u8()
            v |= (byte & 0x7F) << shift
            shift += 7
            if byte & 0x80 == 0:
                if byte == 0 and n > 0:
                    raise DecodeError("over-long varint")
                if v >= 1 << bits:
                    raise DecodeError("varint overflows u%d" % bits)
                return v
        raise DecodeError("varint too long")

    def u32(self):
        return self.varint(32)

    def u64(self):
        return self.varint(64)

    def bool(self):
        b = self.u8()
        if b > 1:
            raise DecodeError("bad bool")
        return b == 1

    def string(self):
        n = self.varint(64)
        if self.i + n > len(self.d):
            raise DecodeError("truncated string")
        raw = self.d[self.i : self.i + n]
        self.i += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("invalid UTF-8")

    def fixed(self, n):
        if self.i + n > len(self.d):
            raise DecodeError("truncated array")
        raw = bytes(self.d[self.i : self.i + n])
        self.i += n
        return raw

    def option(self, read):
        tag = self.u8()
        if tag == 0:
            return None
        if tag == 1:
            return read()
        raise DecodeError("bad option tag")

    def vec(self, read):
        return [read() for _ in range(self.varint(64))]

    def end(self):
        if self.i != len(self.d):
            raise DecodeError("trailing bytes")


# ---------------------------------------------------------------- messages (sections 4 to 7)


class Message:
    def __init__(self, id, time, author, to, text):
        self.id, self.time, self.author, self.to, self.text = id, time, author, to, text

    def show(self):
        who = self.author if self.to is None else "%s -> %s" % (self.author, self.to)
        return "[%s] %s" % (who, self.text)

    def __repr__(self):
        return "Message(%r)" % self.__dict__


def read_message(r):
    return Message(r.u64(), r.u64(), r.string(), r.option(r.string), r.string())


def read_relation(r):
    return (r.string(), r.bool(), r.bool())


# RequestBody variants, in declaration order (section 5).
REQUESTS = [
    "Register", "Login", "Logout", "Subscribe", "Unsubscribe", "Post", "Send", "Retrieve",
    "ListUsers", "Ping", "WhoAmI", "Subscriptions", "DeleteAccount",
]  # fmt: skip

# Response variants: name and a reader of its fields (section 6).
RESPONSES = [
    ("Registered", lambda r: {}),
    ("LoggedIn", lambda r: {"token": r.fixed(16), "missed": r.u32(), "catching_up": r.u32(), "epoch": r.u32()}),
    ("LoggedOut", lambda r: {}),
    ("Subscribed", lambda r: {}),
    ("Unsubscribed", lambda r: {}),
    ("Posted", lambda r: {"id": r.u64(), "recipients": r.u32()}),
    ("Sent", lambda r: {"id": r.u64()}),
    ("Messages", lambda r: {"messages": r.vec(lambda: read_message(r)), "more": r.bool()}),
    ("Users", lambda r: {"names": r.vec(r.string), "next": r.option(r.string)}),
    ("Pong", lambda r: {}),
    ("SessionPong", lambda r: {"epoch": r.u32()}),
    ("Me", lambda r: {"user": r.string(), "sessions": r.u32()}),
    ("Relations", lambda r: {"entries": r.vec(lambda: read_relation(r)), "next": r.option(r.string)}),
    ("Deleted", lambda r: {}),
]

# ErrorCode variants: name, field names (all strings for "user", u32 otherwise), and what the user
# is told (section 7).
ERRORS = [
    ("BadCredentials", [], "wrong user name or password"),
    ("NotLoggedIn", [], "not logged in"),
    ("SessionExpired", [], "session expired: log in again"),
    ("NoSuchUser", ["user"], "no such user {user}"),
    ("CannotSubscribeToSelf", [], "you cannot subscribe to yourself"),
    ("AlreadySubscribed", ["user"], "already subscribed to {user}"),
    ("NotSubscribed", ["user"], "not subscribed to {user}"),
    ("EmptyText", [], "text is empty"),
    ("TextTooLong", ["max"], "text too long: at most {max} bytes"),
    ("CountOutOfRange", ["min", "max"], "count out of range: must be between {min} and {max}"),
    ("RegistrationClosed", [], "registration is closed on this server"),
    ("NameTaken", ["user"], "name {user} is taken"),
    ("InvalidName", ["max_len"], "invalid name: 1 to {max_len} characters from A-Z a-z 0-9 _ . -"),
    ("InvalidPassword", ["min_len", "max_len"], "invalid password: {min_len} to {max_len} bytes"),
    ("InvalidPattern", ["max_len"], "invalid pattern: up to {max_len} characters of names, * and ?"),
    ("TooManySubscriptions", ["max"], "too many subscriptions: at most {max}"),
    ("TooManySessions", ["max"], "too many sessions: at most {max}"),
    ("Busy", [], "server busy, retry"),
    ("RateLimited", ["retry_after_secs"], "too many attempts, retry in {retry_after_secs} s"),
    ("StorageUnavailable", [], "storage unavailable, retry"),
    ("TooManyAccounts", ["max"], "registration refused: the server holds its maximum of {max} accounts"),
    ("InvalidText", ["code_point"], "text contains the control character U+{code_point:04X}"),
]


class ServerError(Exception):
    """The daemon refused a request (or the client gave up on it)."""

    def __init__(self, code, fields=None, text=None):
        self.code, self.fields = code, fields or {}
        if text is None:
            text = next((t for n, _, t in ERRORS if n == code), code).format(**self.fields)
        super().__init__("%s (%s)" % (text, code))


def read_error(r):
    idx = r.u32()
    if idx >= len(ERRORS):
        raise DecodeError("unknown error code %d" % idx)
    name, fields, _ = ERRORS[idx]
    return ServerError(name, {f: r.string() if f == "user" else r.u32() for f in fields})


def header(magic):
    return magic + bytes([VERSION])


def encode_request(id, token, kind, **f):
    """A Request datagram; Register and Login are padded to MIN_UNAUTHENTICATED_REQUEST."""

    def build(pad):
        w = Writer()
        w.b += header(CLIENT_MAGIC)
        w.varint(0)  # ClientMsg::Request
        w.varint(id)
        w.option(token, lambda t: w.fixed(t, 16))
        w.varint(REQUESTS.index(kind))
        if kind in ("Register", "Login"):
            w.string(f["user"])
            w.string(f["password"])
            w.option(f.get("cookie"), lambda c: w.fixed(c, 16))
            w.bytes_vec(bytes(pad))
        elif kind in ("Subscribe", "Unsubscribe"):
            w.string(f["user"])
        elif kind == "Post":
            w.string(f["text"])
        elif kind == "Send":
            w.string(f["to"])
            w.string(f["text"])
        elif kind == "Retrieve":
            w.varint(f["count"])
            w.option(f.get("before"), w.varint)
        elif kind in ("ListUsers",):
            w.string(f["pattern"])
            w.option(f.get("after"), w.string)
        elif kind == "Subscriptions":
            w.option(f.get("after"), w.string)
        elif kind == "DeleteAccount":
            w.string(f["password"])
        return bytes(w.b)

    data = build(0)
    if kind in ("Register", "Login") and len(data) < MIN_UNAUTHENTICATED_REQUEST:
        data = build(MIN_UNAUTHENTICATED_REQUEST - len(data))
        assert len(data) == MIN_UNAUTHENTICATED_REQUEST
    return data


def encode_acks(token, epoch, seqs):
    w = Writer()
    w.b += header(CLIENT_MAGIC)
    if len(seqs) == 1:
        w.varint(1)  # PushAck
        w.fixed(token, 16)
        w.varint(epoch)
        w.varint(seqs[0])
    else:
        w.varint(2)  # PushAcks
        w.fixed(token, 16)
        w.varint(epoch)
        w.varint(len(seqs))
        for s in seqs:
            w.varint(s)
    return bytes(w.b)


def encode_path_response(token, data):
    w = Writer()
    w.b += header(CLIENT_MAGIC)
    w.varint(3)
    w.fixed(token, 16)
    w.varint(data)
    return bytes(w.b)


def decode_server(data):
    """Returns ("version", v), or a tuple for a ServerMsg; raises DecodeError if not a message."""
    if len(data) < HEADER_LEN or len(data) > MAX_DATAGRAM:
        raise DecodeError("bad length")
    if data[:2] != SERVER_MAGIC:
        raise DecodeError("bad magic")
    if data[2] != VERSION:
        return ("version", data[2])
    r = Reader(data[HEADER_LEN:])
    tag = r.u32()
    if tag == 0:
        id = r.u64()
        ok = r.u8()
        if ok == 0:
            idx = r.u32()
            if idx >= len(RESPONSES):
                raise DecodeError("unknown response")
            name, read = RESPONSES[idx]
            msg = ("reply", id, (name, read(r)))
        elif ok == 1:
            msg = ("reply", id, read_error(r))
        else:
            raise DecodeError("bad result tag")
    elif tag == 1:
        msg = ("pushes", r.u64(), r.u32(), r.u64(), [read_message(r)])
    elif tag == 2:
        session, epoch, first = r.u64(), r.u32(), r.u64()
        messages = r.vec(lambda: read_message(r))
        if not 2 <= len(messages) <= MAX_PUSH_BATCH or first + len(messages) > U64_MAX:
            raise DecodeError("bad batch")
        msg = ("pushes", session, epoch, first, messages)
    elif tag == 3:
        msg = ("challenge", r.u64(), r.u64())
    elif tag == 4:
        msg = ("retry", r.u64(), r.fixed(16))
    else:
        raise DecodeError("unknown message")
    r.end()
    return msg


def session_id(token):
    """FNV-1a 64 of the token (section 4)."""
    h = 0xCBF29CE484222325
    for b in token:
        h ^= b
        h = (h * 0x00000100000001B3) & U64_MAX
    return h


def notice_answers(notice, sent):
    """Whether a version notice echoes the request `sent` (section 8)."""
    body = sent[HEADER_LEN:]
    rest = notice[HEADER_LEN:]
    if len(rest) < 2 or rest[0] != NOTICE_TAG:
        return False
    echo = rest[1:]
    return body.startswith(echo) and len(echo) == min(len(body) - 1, NOTICE_ECHO)


# ---------------------------------------------------------------- the client (sections 9 to 13)


class Rto:
    """RFC 6298 timeouts (section 9)."""

    def __init__(self, initial=1.0, lo=0.2, hi=8.0):
        self.initial, self.lo, self.hi = initial, lo, hi
        self.srtt = None
        self.rttvar = 0.0

    def sample(self, r):
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r

    def rto(self):
        raw = self.initial if self.srtt is None else self.srtt + max(0.001, 4 * self.rttvar)
        return min(max(raw, self.lo), self.hi)

    def backoff(self, tries):
        return min(self.rto() * (1 << min(tries - 1, 20)), self.hi)


class Client:
    def __init__(self, server, max_tries=5, ping_interval=30.0, on_push=None):
        host, _, port = server.rpartition(":")
        info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
        self.server = info[4][:2]
        self.family = info[0]
        self.sock = None
        self.rebind()
        self.max_tries = max_tries
        self.ping_interval = ping_interval
        self.on_push = on_push or (lambda m: None)
        self.rtt = Rto()
        self.next_id = random.randrange(1, 1 << 32)
        self.cookie = None
        self.retries_seen = 0
        self.user = self.token = self.sid = None
        self.last_sent = time.monotonic()
        self._reset_pushes(0)
        self.shown = set()
        self.answers = []  # ("reply" | "retry" | "version", id or None, payload, raw)
        self.challenges = self.batches = 0

    def rebind(self):
        """A new socket (a new source port), as after a NAT rebinding: section 12."""
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", 0))

    # ---- sockets

    def _send(self, data):
        self.sock.sendto(data, self.server)
        self.last_sent = time.monotonic()

    def _pump(self, timeout):
        """Waits up to `timeout` for datagrams; handles all that are ready, then sends the acks."""
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        while ready:
            data, src = self.sock.recvfrom(65536)
            if src[:2] == self.server:
                self._handle(data)
            ready, _, _ = select.select([self.sock], [], [], 0)
        self._flush_acks()

    def _handle(self, data):
        try:
            msg = decode_server(data)
        except DecodeError:
            return
        kind = msg[0]
        if kind == "version":
            self.answers.append(("version", None, msg[1], data))
        elif kind in ("reply", "retry"):
            self.answers.append((kind, msg[1], msg[2], data))
        elif kind == "challenge":
            if self.token is not None and msg[1] == self.sid:
                self.challenges += 1
                self._send(encode_path_response(self.token, msg[2]))
        elif kind == "pushes":
            _, session, epoch, first, messages = msg
            self.batches += len(messages) > 1
            for i, m in enumerate(messages):
                self._on_push(session, epoch, first + i, m)

    # ---- requests (section 9)

    def request(self, kind, **fields):
        """Sends one request until answered; returns (name, fields) or raises ServerError."""
        id = self.next_id
        self.next_id += 1
        token = None if kind in ("Register", "Login") else self.token
        data = encode_request(id, token, kind, **fields)
        self._send(data)
        first_sent = time.monotonic()
        tries, retries, notice = 1, 0, None
        deadline = first_sent + self.rtt.backoff(1)
        self.answers.clear()
        while True:
            self._pump(deadline - time.monotonic())
            for what, aid, payload, raw in self.answers:
                if what == "version":
                    if notice_answers(raw, data):
                        raise ServerError("VersionMismatch", text="server speaks protocol v%d" % payload)
                    notice = payload
                elif aid != id:
                    continue  # late or duplicate
                elif what == "reply":
                    if tries == 1:
                        self.rtt.sample(time.monotonic() - first_sent)
                    self.answers.clear()
                    if isinstance(payload, ServerError):
                        if payload.code in ("NotLoggedIn", "SessionExpired") and self.token:
                            self._forget_session()
                        raise payload
                    return payload
                elif what == "retry" and kind in ("Register", "Login"):
                    # Section 10: again at once, under a new id, with the cookie.
                    self.retries_seen += 1
                    self.cookie = payload
                    retries += 1
                    if retries > 3:
                        raise ServerError("Busy")
                    fields["cookie"] = payload
                    id = self.next_id
                    self.next_id += 1
                    data = encode_request(id, None, kind, **fields)
                    self._send(data)
                    first_sent = time.monotonic()
                    tries = 1
                    deadline = first_sent + self.rtt.backoff(1)
            self.answers.clear()
            if time.monotonic() >= deadline:
                if tries >= self.max_tries:
                    if notice is not None:
                        raise ServerError("VersionMismatch", text="server speaks protocol v%d" % notice)
                    raise ServerError("NoAnswer", text="no answer after %d tries" % tries)
                tries += 1
                self._send(data)
                deadline = time.monotonic() + self.rtt.backoff(tries)

    # ---- sessions (section 10)

    def register(self, user, password):
        self.request("Register", user=user, password=password, cookie=self.cookie)

    def login(self, user, password):
        _, f = self.request("Login", user=user, password=password, cookie=self.cookie)
        self.user, self.token = user, f["token"]
        self.sid = session_id(self.token)
        self._reset_pushes(f["epoch"])
        # Pushes start once a datagram with the token came back from this address.
        self.ping()
        return f

    def ping(self):
        _, f = self.request("Ping")
        if "epoch" in f:
            self._confirm_epoch(f["epoch"])

    def logout(self):
        self.request("Logout")
        self._forget_session()

    def _forget_session(self):
        self.user = self.token = self.sid = None

    def retrieve(self, count):
        """Up to `count` newest inbox messages, oldest first, over as many pages as needed."""
        got, before = [], None
        while True:
            _, f = self.request("Retrieve", count=count - len(got), before=before)
            got = f["messages"] + got
            if not (f["more"] and f["messages"] and len(got) < count):
                return got
            before = f["messages"][0].id

    # ---- pushes (section 11)

    def _reset_pushes(self, epoch):
        self.epoch, self.next = epoch, 1
        self.early, self.unconfirmed, self.acks = {}, {}, {}
        self.want_epoch = False

    def _on_push(self, session, epoch, seq, m):
        if self.token is None or session != self.sid or epoch < self.epoch:
            return
        if epoch > self.epoch:
            self.unconfirmed[(epoch, seq)] = m
            self.want_epoch = True
            return
        self._receive(seq, m)

    def _receive(self, seq, m):
        if seq > self.next and seq not in self.early:
            if len(self.early) >= 4096:
                return  # no ack: it comes again
            self.early[seq] = m
        elif seq == self.next:
            self._show(m)
            self.next += 1
            while self.next in self.early:
                self._show(self.early.pop(self.next))
                self.next += 1
        self.acks.setdefault(self.epoch, []).append(seq)

    def _show(self, m):
        if m.id not in self.shown:
            self.shown.add(m.id)
            self.on_push(m)

    def _confirm_epoch(self, epoch):
        self.want_epoch = False
        if epoch <= self.epoch:
            return
        held = sorted(self.unconfirmed.items())
        self._reset_pushes(epoch)
        for (e, seq), m in held:
            if e == epoch:
                self._receive(seq, m)
        self._flush_acks()

    def _flush_acks(self):
        acks, self.acks = self.acks, {}
        for epoch, seqs in acks.items():
            seqs = list(dict.fromkeys(seqs))
            for i in range(0, len(seqs), MAX_ACKS):
                if self.token is not None:
                    self._send(encode_acks(self.token, epoch, seqs[i : i + MAX_ACKS]))

    def wait(self, seconds, until=lambda: False):
        """Receives pushes for up to `seconds` (or until `until()`), with keepalive pings."""
        end = time.monotonic() + seconds
        while not until():
            now = time.monotonic()
            if now >= end:
                return False
            if self.token is not None and (self.want_epoch or now - self.last_sent >= self.ping_interval):
                self.ping()
                continue
            due = end if self.token is None else min(end, self.last_sent + self.ping_interval)
            self._pump(due - now)
        return True


# ---------------------------------------------------------------- the command line


def run(server, words, ping_interval=30.0):
    pushes = []

    def on_push(m):
        pushes.append(m)
        print(m.show(), flush=True)

    c = Client(server, ping_interval=ping_interval, on_push=on_push)
    failed = False
    i = 0

    def take(n):
        nonlocal i
        args = words[i : i + n]
        if len(args) < n:
            sys.exit("usage: %s needs %d argument(s)" % (words[i - 1], n))
        i += n
        return args

    while i < len(words):
        cmd = words[i]
        i += 1
        try:
            if cmd == "register":
                user, password = take(2)
                c.register(user, password)
                print("registered %s" % user, flush=True)
            elif cmd == "login":
                user, password = take(2)
                f = c.login(user, password)
                extra = "; %d new message(s) while you were away" % f["missed"] if f["missed"] else ""
                print("logged in as %s%s" % (user, extra), flush=True)
            elif cmd == "logout":
                user = c.user
                c.logout()
                print("logged out %s" % user, flush=True)
            elif cmd in ("subscribe", "unsubscribe"):
                (user,) = take(1)
                c.request(cmd.capitalize(), user=user)
                print("%s to %s" % ("subscribed" if cmd == "subscribe" else "unsubscribed from", user))
            elif cmd == "post":
                (text,) = take(1)
                _, f = c.request("Post", text=text)
                print("posted to %d subscriber(s)" % f["recipients"], flush=True)
            elif cmd == "send":
                to, text = take(2)
                c.request("Send", to=to, text=text)
                print("sent to %s" % to, flush=True)
            elif cmd == "retrieve":
                (count,) = take(1)
                got = c.retrieve(int(count))
                print("history: %d message(s), oldest first" % len(got))
                for m in got:
                    print("  " + m.show())
            elif cmd == "whoami":
                _, f = c.request("WhoAmI")
                print("%s (%d session(s))" % (f["user"], f["sessions"]))
            elif cmd == "ping":
                c.ping()
                print("pong")
            elif cmd == "stats":
                print("epoch %d, path challenges answered: %s" % (c.epoch, "yes" if c.challenges else "no"))
            elif cmd == "wait":
                n, seconds = take(2)
                want = len(pushes) + int(n)
                print("waiting for %s push(es)" % n, flush=True)
                if not c.wait(float(seconds), lambda: len(pushes) >= want):
                    raise ServerError("Timeout", text="only %d push(es) within %s s" % (len(pushes), seconds))
            else:
                sys.exit("unknown command %r" % cmd)
        except ServerError as e:
            print("error: %s" % e, file=sys.stderr, flush=True)
            failed = True
        sys.stdout.flush()
    return 1 if failed else 0


def selftest(server):
    """A scripted conversation between two users; prints what they see, checks every answer."""
    seen_a, seen_b = [], []
    a = Client(server, on_push=seen_a.append)
    b = Client(server, on_push=seen_b.append)

    def say(line):
        print(line, flush=True)

    def expect_error(code, f, *args, **kw):
        try:
            f(*args, **kw)
        except ServerError as e:
            assert e.code == code, "expected %s, got %s" % (code, e)
            say("error: %s" % e)
            return
        raise AssertionError("expected %s" % code)

    a.register("alice", "secret")
    say("registered alice (after %d cookie retry)" % a.retries_seen)
    b.register("bob", "hunter22")
    say("registered bob")
    expect_error("NameTaken", b.register, "bob", "other")
    expect_error("BadCredentials", a.login, "alice", "wrong")
    assert a.token is None
    a.login("alice", "secret")
    say("logged in as alice")
    b.login("bob", "hunter22")
    say("logged in as bob")
    a.request("Subscribe", user="bob")
    say("subscribed to bob")
    expect_error("NoSuchUser", a.request, "Subscribe", user="nobody")
    _, f = b.request("Post", text="hello from python")
    say("bob posted to %d subscriber(s)" % f["recipients"])
    assert f["recipients"] == 1
    assert a.wait(10, lambda: len(seen_a) >= 1), "no push"
    m = seen_a[0]
    assert (m.author, m.to, m.text, m.id) == ("bob", None, "hello from python", f["id"]), m
    say("alice got a push: " + m.show())
    # A batch: three posts in a row arrive in order, once each.
    for i in range(3):
        b.request("Post", text="burst %d" % i)
    assert a.wait(10, lambda: len(seen_a) >= 4), "no burst"
    assert [m.text for m in seen_a[1:]] == ["burst 0", "burst 1", "burst 2"], seen_a
    say("alice got the burst in order")
    b.request("Send", to="alice", text="psst")
    assert a.wait(10, lambda: len(seen_a) >= 5), "no direct message"
    say("alice got a push: " + seen_a[4].show())
    expect_error("InvalidText", b.request, "Post", text="bell\x07")
    # A new source port: the daemon challenges it, and the pushes follow once it is proven.
    a.rebind()
    a.ping()
    b.request("Post", text="after the move")
    assert a.wait(10, lambda: len(seen_a) >= 6), "no push after the move"
    assert a.challenges >= 1, a.challenges  # more if a retransmission crossed the first
    say("alice moved to a new port, answered its path challenge, got: " + seen_a[5].show())
    got = a.retrieve(2)
    say("alice retrieved: " + " | ".join(m.show() for m in got))
    assert [m.text for m in got] == ["psst", "after the move"]
    _, f = a.request("WhoAmI")
    assert f == {"user": "alice", "sessions": 1}, f
    a.logout()
    say("logged out alice")
    expect_error("NotLoggedIn", a.request, "Post", text="after logout")
    # Missed while away: counted in the login's answer, then pushed in one batch.
    b.request("Post", text="while you were out 1")
    b.request("Post", text="while you were out 2")
    f = a.login("alice", "secret")
    assert (f["missed"], f["catching_up"]) == (2, 2), f
    assert a.wait(10, lambda: len(seen_a) >= 8), "no catch-up"
    assert [m.text for m in seen_a[6:]] == ["while you were out 1", "while you were out 2"], seen_a
    assert a.batches >= 1, "the catch-up came as a Pushes batch"
    say("alice logged in again and caught up on %d missed message(s)" % f["missed"])
    a.logout()
    b.logout()
    say("logged out bob")
    assert not seen_b
    say("selftest ok")
    return 0


def read_vectors(path):
    """The test vectors of PROTOCOL.md: {name: bytes} (section 15)."""
    vectors, block = {}, None
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for line in lines:
        if line.lstrip().startswith("```"):
            if block and block[0].strip().startswith("vector:"):
                name = block[0].strip()[len("vector:") :].strip()
                hexes = " ".join(l.split("#")[0] for l in block[1:]).split()
                vectors[name] = bytes(int(h, 16) for h in hexes)
            block = [] if block is None else None
        elif block is not None:
            block.append(line)
    return vectors


def check_vectors(path):
    """Encodes and decodes the vectors of PROTOCOL.md this client has a use for."""
    v = read_vectors(path)
    token, cookie = b"\x11" * 16, b"\xc0" * 16
    checked = []

    def same(name, got):
        assert got == v[name], "%s: %s != %s" % (name, got.hex(" "), v[name].hex(" "))
        checked.append(name)

    # Encoding (section 3, the unsigned integers, strings and options a client writes).
    for name, write in [
        ("postcard-u32-0", lambda w: w.varint(0)),
        ("postcard-u32-127", lambda w: w.varint(127)),
        ("postcard-u32-128", lambda w: w.varint(128)),
        ("postcard-u32-max", lambda w: w.varint((1 << 32) - 1)),
        ("postcard-u64-max", lambda w: w.varint(U64_MAX)),
        ("postcard-bool-true", lambda w: w.bool(True)),
        ("postcard-option-none", lambda w: w.option(None, w.varint)),
        ("postcard-option-some-300", lambda w: w.option(300, w.varint)),
        ("postcard-string-utf8", lambda w: w.string("\u00e9")),
        ("postcard-vec-u8", lambda w: w.bytes_vec(b"\x00\xff")),
    ]:
        w = Writer()
        write(w)
        same(name, bytes(w.b))
    # Strict decoding.
    assert Reader(v["postcard-u64-max"]).u64() == U64_MAX
    for bad in (b"\x87\x00", b"\xff\xff\xff\xff\x1f"):
        try:
            Reader(bad).u32()
            raise AssertionError("accepted %s" % bad.hex())
        except DecodeError:
            pass
    req = encode_request
    same("register", req(1, None, "Register", user="alice", password="secret"))
    same("register-with-cookie", req(2, None, "Register", user="alice", password="secret", cookie=cookie))
    same("login", req(3, None, "Login", user="alice", password="secret", cookie=cookie))
    same("logout", req(9, token, "Logout"))
    same("subscribe", req(4, token, "Subscribe", user="bob"))
    same("unsubscribe", req(5, token, "Unsubscribe", user="bob"))
    same("post", req(6, token, "Post", text="hello"))
    same("send", req(6, token, "Send", to="bob", text="hi"))
    same("retrieve", req(8, token, "Retrieve", count=10))
    same("retrieve-before", req(8, token, "Retrieve", count=10, before=300))
    same("list-users", req(8, token, "ListUsers", pattern="a*", after="al"))
    same("ping", req(7, token, "Ping"))
    same("ping-health-check", req(7, None, "Ping"))
    same("whoami", req(7, token, "WhoAmI"))
    same("subscriptions", req(7, token, "Subscriptions"))
    same("delete-account", req(7, token, "DeleteAccount", password="secret"))
    same("push-ack", encode_acks(token, 1, [1]))
    same("push-acks", encode_acks(token, 1, [2, 3]))
    same("path-response", encode_path_response(token, 0x0123456789ABCDEF))
    same("session-id", session_id(token).to_bytes(8, "little"))

    # Decoding what the daemon sends.
    def decoded(name):
        checked.append(name)
        return decode_server(v[name])

    def reply(name, id, response):
        msg = decoded(name)
        assert msg[:2] == ("reply", id) and msg[2] == response, (name, msg)

    def error(name, id, code, fields):
        msg = decoded(name)
        assert msg[:2] == ("reply", id) and (msg[2].code, msg[2].fields) == (code, fields), (name, msg)

    def message(m, id, text):
        assert (m.id, m.time, m.author, m.to, m.text) == (id, 1764000000000, "bob", None, text), m

    reply("reply-registered", 2, ("Registered", {}))
    reply("reply-logged-in", 3, ("LoggedIn", {"token": token, "missed": 2, "catching_up": 2, "epoch": 1}))
    reply("reply-logged-out", 9, ("LoggedOut", {}))
    reply("reply-subscribed", 4, ("Subscribed", {}))
    reply("reply-posted", 6, ("Posted", {"id": 42, "recipients": 1}))
    reply("reply-sent", 6, ("Sent", {"id": 42}))
    reply("reply-users", 8, ("Users", {"names": ["alice", "amy"], "next": None}))
    reply("reply-pong", 7, ("Pong", {}))
    reply("reply-session-pong", 7, ("SessionPong", {"epoch": 1}))
    reply("reply-me", 7, ("Me", {"user": "alice", "sessions": 1}))
    reply("reply-relations", 7, ("Relations", {"entries": [("bob", True, False)], "next": None}))
    reply("reply-deleted", 7, ("Deleted", {}))
    msg = decoded("reply-messages")
    assert msg[2][0] == "Messages" and msg[2][1]["more"] is False, msg
    [m] = msg[2][1]["messages"]
    message(m, 42, "hello")
    error("reply-error-bad-credentials", 3, "BadCredentials", {})
    error("reply-error-no-such-user", 4, "NoSuchUser", {"user": "carol"})
    error("reply-error-rate-limited", 3, "RateLimited", {"retry_after_secs": 30})
    error("reply-error-invalid-text", 6, "InvalidText", {"code_point": 0x1B})
    assert decoded("retry") == ("retry", 1, cookie)
    assert decoded("path-challenge") == ("challenge", session_id(token), 0x0123456789ABCDEF)
    _, session, epoch, seq, [m] = decoded("push")
    assert (session, epoch, seq) == (session_id(token), 1, 1)
    message(m, 42, "hello")
    _, session, epoch, first, [m1, m2] = decoded("pushes")
    assert (session, epoch, first) == (session_id(token), 1, 2)
    message(m1, 42, "hello")
    message(m2, 43, "again")
    # A version notice is no message, even with our version byte; it answers the request it echoes.
    for name in ("version-notice", "version-notice-bare"):
        try:
            decode_server(v[name])
            raise AssertionError(name + " decoded")
        except DecodeError:
            checked.append(name)
    assert notice_answers(v["version-notice"], v["ping"])
    assert not notice_answers(v["version-notice"], v["post"])  # another request id
    assert not notice_answers(v["version-notice-bare"], v["ping"])
    for name in checked:
        print("checked " + name)
    print("%d of the %d vectors checked" % (len(set(checked)), len(v)))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="HOST:PORT of udpmsgd (run, selftest)")
    p.add_argument("--protocol-md", help="PROTOCOL.md (check-vectors)")
    p.add_argument("--ping-interval", type=float, default=30.0, help="keepalive after this many seconds")
    p.add_argument("mode", choices=["run", "selftest", "check-vectors"])
    p.add_argument("words", nargs="*")
    args = p.parse_args()
    if args.mode == "check-vectors":
        return check_vectors(args.protocol_md or "PROTOCOL.md")
    if not args.server:
        p.error("--server is required")
    if args.mode == "selftest":
        return selftest(args.server)
    return run(args.server, args.words, args.ping_interval)


if __name__ == "__main__":
    sys.exit(main())
