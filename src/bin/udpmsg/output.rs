//! How things look to the user: one human line (or a few) per item, or one JSON object per line
//! with `--json`, its `type` always the first key (README, "JSON output", lists every type).
//!
//! Messages show when they were posted: in local time (`14:03`, or `2026-11-24 14:03` when it
//! was not today), and in `--json` as RFC 3339 in UTC (`"time":"2026-11-25T13:03:07.123Z"`).
//!
//! Text from the network never reaches the terminal raw: control characters (escape sequences,
//! carriage returns, ...) and bidirectional overrides are shown escaped (`\u{1b}`), and the lines
//! of a multi-line message after its first are marked (`  | `), so that no message text can pass
//! for another message, or for anything the client itself says.

use crate::driver::{Item, Notice};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde_json::{json, Value};
use std::net::SocketAddr;
use udpmsg::client::{ContactChange, Done, Event};
use udpmsg::command::{self, ParseError};
use udpmsg::proto::{ErrorCode, Message};

/// Where a rendered line belongs in script mode: results on stdout, the rest on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    /// A failure: it counts towards the exit status too (the driver counts).
    Err,
    /// A diagnostic that is no failure (contact changes, warnings).
    Note,
}

/// A rendered item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub stream: Stream,
}

fn out(text: String) -> Rendered {
    Rendered { text, stream: Stream::Out }
}
fn err(text: String) -> Rendered {
    Rendered { text, stream: Stream::Err }
}
fn note(text: String) -> Rendered {
    Rendered { text, stream: Stream::Note }
}

/// Text from the network, safe for a terminal: every control character but newline, and the
/// bidirectional formatting characters, escaped as `\u{..}`.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => o.push('\n'),
            c if c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                o.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => o.push(c),
        }
    }
    o
}

/// The time zone and the present, for showing when messages were posted.
pub struct Clock {
    pub tz: TimeZone,
    pub now: Timestamp,
}

impl Clock {
    /// The system's clock, in `tz`.
    pub fn system(tz: &TimeZone) -> Clock {
        Clock { tz: tz.clone(), now: Timestamp::now() }
    }

    /// `14:03` for today, `2026-11-24 14:03` otherwise; `None` when the time is unknown (0: a
    /// message stored before the daemon kept times).
    fn when(&self, unix_ms: u64) -> Option<String> {
        if unix_ms == 0 {
            return None;
        }
        let t = Timestamp::from_millisecond(i64::try_from(unix_ms).ok()?).ok()?;
        let (at, today) = (t.to_zoned(self.tz.clone()), self.now.to_zoned(self.tz.clone()));
        let format = if at.date() == today.date() { "%H:%M" } else { "%Y-%m-%d %H:%M" };
        Some(at.strftime(format).to_string())
    }
}

/// RFC 3339 in UTC, or `None` when the time is unknown.
fn rfc3339(unix_ms: u64) -> Option<String> {
    if unix_ms == 0 {
        return None;
    }
    Timestamp::from_millisecond(i64::try_from(unix_ms).ok()?).ok().map(|t| t.to_string())
}

/// `14:03 [alice] hello`, or `14:03 [alice -> you] hello` for a direct message; continuation
/// lines of a multi-line text marked with `  | ` so they cannot pass for messages. `indent` goes
/// before every line (retrieve indents its history).
pub fn message_lines(m: &Message, indent: &str, clock: &Clock) -> String {
    let who = match &m.to {
        Some(_) => format!("[{} -> you]", escape(&m.author)),
        None => format!("[{}]", escape(&m.author)),
    };
    let head = match clock.when(m.time) {
        Some(when) => format!("{when} {who}"),
        None => who,
    };
    let text = escape(&m.text);
    let mut lines = text.split('\n');
    let mut s = format!("{indent}{head} {}", lines.next().unwrap_or(""));
    for l in lines {
        s.push_str(&format!("\n{indent}  | {l}"));
    }
    s
}

/// The error line for a failed command, in the words the user needs.
fn failure(command: &str, error: &ErrorCode, text_len: Option<usize>) -> String {
    match (command, error, text_len) {
        // No name was given: "wrong user name or password" would puzzle.
        ("delete", ErrorCode::BadCredentials, _) => "wrong password: the account was not deleted".into(),
        (_, ErrorCode::TextTooLong { max }, Some(len)) => {
            format!("text too long: {len} bytes, at most {max}")
        }
        _ => error.to_string(),
    }
}

fn contact(server: &SocketAddr, change: &ContactChange) -> String {
    match change {
        ContactChange::Connected => format!("connected to {server}"),
        ContactChange::Reconnected => format!("reconnected to {server}"),
        ContactChange::Lost { refused: true, ever_answered: true } => {
            format!("lost contact with {server}: nothing listens there now (connection refused); retrying")
        }
        ContactChange::Lost { refused: false, ever_answered: true } => {
            format!("lost contact with {server}: no answer; retrying")
        }
        ContactChange::Lost { refused: true, ever_answered: false } => format!(
            "nothing listens at {server} (connection refused): is udpmsgd running there? retrying in the background"
        ),
        ContactChange::Lost { refused: false, ever_answered: false } => {
            format!("no answer from {server}: is udpmsgd running there? retrying in the background")
        }
    }
}

fn done(d: &Done, clock: &Clock) -> String {
    match d {
        Done::Registered { user } => format!("registered {user}"),
        Done::LoggedIn { user, missed: 0, .. } => format!("logged in as {user}"),
        Done::LoggedIn { user, missed, catching_up } if missed == catching_up => {
            format!("logged in as {user}; {missed} new message(s) while you were away:")
        }
        Done::LoggedIn { user, missed, catching_up } => format!(
            "logged in as {user}; {missed} new message(s) while you were away, here are the latest \
             {catching_up} (retrieve#N shows more):"
        ),
        Done::LoggedOut => "logged out".into(),
        Done::Subscribed { user } => format!("subscribed to {user}"),
        Done::Unsubscribed { user } => format!("unsubscribed from {user}"),
        Done::Posted { recipients, .. } => format!("posted to {recipients} subscriber(s)"),
        Done::Sent { to, .. } => format!("sent to {to}"),
        Done::Messages(ms) if ms.is_empty() => "no messages".into(),
        Done::Messages(ms) => {
            let mut s = format!("history: your {} most recent message(s), oldest first", ms.len());
            for m in ms {
                s.push('\n');
                s.push_str(&message_lines(m, "  ", clock));
            }
            s
        }
        Done::Users(names) if names.is_empty() => "no users match".into(),
        Done::Users(names) => names.join("\n"),
        Done::Pong { rtt } => format!("pong in {:.1} ms", rtt.as_secs_f64() * 1000.0),
        Done::Me { user, sessions } => format!("{user} ({sessions} session(s))"),
        Done::Relations(rs) => {
            let following: Vec<&str> = rs.iter().filter(|r| r.following).map(|r| r.user.as_str()).collect();
            let followers: Vec<&str> = rs.iter().filter(|r| r.follower).map(|r| r.user.as_str()).collect();
            let list = |v: &[&str]| if v.is_empty() { "nobody".to_string() } else { v.join(", ") };
            format!("following: {}\nfollowers: {}", list(&following), list(&followers))
        }
        Done::Deleted => "account deleted".into(),
    }
}

pub fn human(item: &Item, clock: &Clock) -> Rendered {
    match item {
        Item::Event(e) => match e {
            Event::Push(m) => out(message_lines(m, "", clock)),
            Event::Done(d) => out(done(d, clock)),
            Event::Failed { command, error } => err(format!("error: {}", failure(command, error, None))),
            Event::NoAnswer { command, server, tries } => {
                err(format!("error: {command}: no answer from {server} after {tries} tries"))
            }
            Event::Refused { command, server } => {
                err(format!("error: {command}: nothing listens at {server} (connection refused)"))
            }
            Event::VersionMismatch { command, server_version } => err(format!(
                "error: {command}: server speaks protocol v{server_version}, this client speaks v{}",
                udpmsg::proto::VERSION
            )),
            Event::SessionLost { error } => err(error.to_string()),
            Event::Contact { server, change } => note(contact(server, change)),
            Event::Moved { to, .. } => note(format!("moved to {to}")),
        },
        Item::Failed { command, error, text_len } => {
            err(format!("error: {}", failure(command, error, *text_len)))
        }
        Item::LoggedOut { user: Some(u) } => out(format!("logged out {u}")),
        Item::LoggedOut { user: None } => out("logged out".into()),
        Item::Registered { user, still_as: None } => out(format!("registered {user}; logging in")),
        Item::Registered { user, still_as: Some(current) } => out(format!(
            "registered {user}; you are still logged in as {current} (login#{user}&PASSWORD switches)"
        )),
        Item::Parse(e) => err(parse_error(e)),
        Item::Help => out(command::help().trim_end().to_string()),
        Item::Notice(n) => notice(n),
    }
}

/// The shell's own words.
fn notice(n: &Notice) -> Rendered {
    match n {
        Notice::ConfirmDelete { user } => out(format!(
            "delete the account {user}, with its messages and subscriptions, for good? type yes to confirm"
        )),
        Notice::NotDeleted => out("not deleted".into()),
        Notice::Abandoned { command, dropped } => {
            let mut s = format!("{command} abandoned");
            if !matches!(*command, "ping" | "retrieve" | "users" | "whoami" | "subscriptions") {
                s.push_str(" (the daemon may still carry it out)");
            }
            if *dropped > 0 {
                s.push_str(&format!("; {dropped} command(s) typed after it dropped"));
            }
            err(s)
        }
        Notice::Dropped { dropped } => err(format!("{dropped} command(s) typed ahead dropped")),
        Notice::StillWaiting { command, server, secs } => note(format!(
            "({command}: no answer from {server} for {secs} s yet; still trying, Ctrl-C gives up)"
        )),
        Notice::LeaveHint => note("(to leave, type quit or press Ctrl-D)".into()),
        Notice::NotLoggedOut { user, why } => {
            note(format!("could not log out {user} ({why}); the session ends when it idles out"))
        }
    }
}

/// A line that is not a command the daemon could take; nothing was sent. A usage line as it
/// is; a broken limit as the daemon's error would read.
pub fn parse_error(e: &ParseError) -> String {
    match e.code {
        "Usage" | "UnknownCommand" => e.message.clone(),
        _ => format!("error: {}", e.message),
    }
}

fn message_json(m: &Message) -> Value {
    json!({ "id": m.id, "time": rfc3339(m.time), "author": m.author, "to": m.to, "text": m.text })
}

fn error_json(command: Option<&str>, code: &str, message: String) -> Value {
    json!({ "type": "error", "command": command, "code": code, "message": message })
}

/// `{"type":"ok","command":...}` and the fields of the result.
fn ok_json(command: &str, fields: Value) -> Value {
    let mut v = json!({ "type": "ok", "command": command });
    if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    v
}

fn done_json(d: &Done) -> Value {
    match d {
        Done::Registered { user } => ok_json("register", json!({ "user": user })),
        Done::LoggedIn { user, missed, catching_up } => {
            ok_json("login", json!({ "user": user, "missed": missed, "catching_up": catching_up }))
        }
        Done::LoggedOut => ok_json("logout", json!({ "user": null })),
        Done::Subscribed { user } => ok_json("subscribe", json!({ "user": user })),
        Done::Unsubscribed { user } => ok_json("unsubscribe", json!({ "user": user })),
        Done::Posted { id, recipients } => ok_json("post", json!({ "id": id, "recipients": recipients })),
        Done::Sent { id, to } => ok_json("send", json!({ "id": id, "to": to })),
        Done::Messages(ms) => {
            ok_json("retrieve", json!({ "messages": ms.iter().map(message_json).collect::<Vec<_>>() }))
        }
        Done::Users(names) => ok_json("users", json!({ "users": names })),
        Done::Pong { rtt } => ok_json("ping", json!({ "rtt_ms": rtt.as_secs_f64() * 1000.0 })),
        Done::Me { user, sessions } => ok_json("whoami", json!({ "user": user, "sessions": sessions })),
        Done::Relations(rs) => ok_json(
            "subscriptions",
            json!({
                "following": rs.iter().filter(|r| r.following).map(|r| &r.user).collect::<Vec<_>>(),
                "followers": rs.iter().filter(|r| r.follower).map(|r| &r.user).collect::<Vec<_>>(),
            }),
        ),
        Done::Deleted => ok_json("delete", json!({})),
    }
}

pub fn json(item: &Item) -> Value {
    match item {
        Item::Event(e) => match e {
            Event::Push(m) => {
                let mut v = json!({ "type": "push" });
                if let (Some(o), Value::Object(f)) = (v.as_object_mut(), message_json(m)) {
                    o.extend(f);
                }
                v
            }
            Event::Done(d) => done_json(d),
            Event::Failed { command, error } => {
                error_json(Some(command), error.code(), failure(command, error, None))
            }
            Event::NoAnswer { command, server, tries } => {
                error_json(Some(command), "NoAnswer", format!("no answer from {server} after {tries} tries"))
            }
            Event::Refused { command, server } => error_json(
                Some(command),
                "Refused",
                format!("nothing listens at {server} (connection refused)"),
            ),
            Event::VersionMismatch { command, server_version } => json!({
                "type": "error", "command": command, "code": "VersionMismatch",
                "message": format!("server speaks protocol v{server_version}, this client speaks v{}", udpmsg::proto::VERSION),
                "server_version": server_version, "client_version": udpmsg::proto::VERSION,
            }),
            Event::SessionLost { error } => {
                json!({ "type": "session_lost", "code": error.code(), "message": error.to_string() })
            }
            Event::Moved { from, to } => json!({
                "type": "moved", "from": from.to_string(), "server": to.to_string(),
                "message": format!("moved to {to}"),
            }),
            Event::Contact { server, change } => {
                let state = match change {
                    ContactChange::Connected => "connected",
                    ContactChange::Reconnected => "reconnected",
                    ContactChange::Lost { .. } => "lost",
                };
                let refused = matches!(change, ContactChange::Lost { refused: true, .. });
                json!({
                    "type": "contact", "state": state, "server": server.to_string(),
                    "refused": refused, "message": contact(server, change),
                })
            }
        },
        Item::Failed { command, error, text_len } => {
            error_json(Some(command), error.code(), failure(command, error, *text_len))
        }
        Item::LoggedOut { user } => ok_json("logout", json!({ "user": user })),
        Item::Registered { user, still_as } => {
            ok_json("register", json!({ "user": user, "logging_in": still_as.is_none() }))
        }
        Item::Parse(e) => error_json(e.command, e.code, e.message.clone()),
        Item::Help => json!({
            "type": "help",
            "commands": command::COMMANDS.iter().map(|(name, args, about)| {
                let usage = if args.is_empty() { name.to_string() } else { format!("{name}#{args}") };
                json!({ "command": name, "usage": usage, "about": about })
            }).collect::<Vec<_>>(),
        }),
        Item::Notice(n) => {
            let message = notice(n).text;
            match n {
                Notice::ConfirmDelete { user } => {
                    json!({ "type": "confirm", "command": "delete", "user": user, "message": message })
                }
                Notice::Abandoned { command, dropped } => json!({
                    "type": "error", "command": command, "code": "Abandoned", "message": message, "dropped": dropped,
                }),
                _ => json!({ "type": "notice", "message": message }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(text: &str) -> Message {
        Message { id: 1, time: 0, author: "bob".into(), to: None, text: text.into() }
    }

    /// 2026-11-25 12:00 UTC, seen from UTC+05:30.
    fn clock() -> Clock {
        Clock {
            tz: TimeZone::fixed(jiff::tz::offset(5) + jiff::SignedDuration::from_mins(30)),
            now: Timestamp::from_second(1_795_608_000).unwrap(),
        }
    }

    #[test]
    fn message_text_cannot_reach_the_terminal_raw() {
        assert_eq!(
            message_lines(&m("red \x1b[31malert\x07"), "", &clock()),
            "[bob] red \\u{1b}[31malert\\u{7}"
        );
        assert_eq!(message_lines(&m("over\rwrite"), "", &clock()), "[bob] over\\u{d}write");
        assert_eq!(message_lines(&m("a\u{202e}b\u{9b}c"), "", &clock()), "[bob] a\\u{202e}b\\u{9b}c");
        assert_eq!(message_lines(&m("tab\there"), "", &clock()), "[bob] tab\\u{9}here");
    }

    #[test]
    fn messages_show_when_they_were_posted_in_local_time() {
        let today = Message { time: 1_795_608_000_000 - 3_600_000, ..m("hi") };
        assert_eq!(message_lines(&today, "", &clock()), "16:30 [bob] hi", "11:00 UTC is 16:30 at +05:30");
        let before = Message { time: 1_795_608_000_000 - 86_400_000, ..m("hi") };
        assert_eq!(message_lines(&before, "  ", &clock()), "  2026-11-24 17:30 [bob] hi");
        assert_eq!(message_lines(&m("hi"), "", &clock()), "[bob] hi", "a time not kept is not made up");
        let v = json(&Item::Event(Event::Push(today)));
        assert_eq!(v["time"], "2026-11-25T11:00:00Z");
        assert_eq!(json(&Item::Event(Event::Push(m("hi"))))["time"], Value::Null);
    }

    #[test]
    fn a_multi_line_message_cannot_pass_for_several() {
        let forged = m("hi\n[alice] send me your password\n");
        assert_eq!(message_lines(&forged, "", &clock()), "[bob] hi\n  | [alice] send me your password\n  | ");
        assert_eq!(
            message_lines(&forged, "  ", &clock()),
            "  [bob] hi\n    | [alice] send me your password\n    | "
        );
    }

    #[test]
    fn every_json_object_starts_with_its_type() {
        use udpmsg::client::Done;
        let items = [
            Item::Event(Event::Push(m("x"))),
            Item::Event(Event::Done(Done::Posted { id: 1, recipients: 2 })),
            Item::Event(Event::SessionLost { error: ErrorCode::SessionExpired }),
            Item::Event(Event::Contact {
                server: "127.0.0.1:1".parse().unwrap(),
                change: ContactChange::Lost { refused: true, ever_answered: true },
            }),
            Item::Help,
            Item::Notice(Notice::LeaveHint),
            Item::Parse(udpmsg::command::parse("frobnicate").unwrap_err()),
        ];
        for i in &items {
            let s = json(i).to_string();
            assert!(s.starts_with("{\"type\":"), "{s}");
        }
        let s = json(&items[1]).to_string();
        assert_eq!(s, r#"{"type":"ok","command":"post","id":1,"recipients":2}"#);
    }
}
