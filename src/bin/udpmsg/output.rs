//! How events look to the user: one human line (or a few) per event, or one JSON object per line
//! with `--json`.

use serde_json::{json, Value};
use udpmsg::client::{Done, Event};
use udpmsg::proto::{ErrorCode, Message};

/// A rendered event: its text and whether it reports a failure (stderr in script mode).
pub struct Rendered {
    pub text: String,
    pub failure: bool,
}

/// `[alice] hello`, or `[alice -> you] hello` for a direct message.
pub fn message_line(m: &Message) -> String {
    match &m.to {
        Some(_) => format!("[{} -> you] {}", m.author, m.text),
        None => format!("[{}] {}", m.author, m.text),
    }
}

pub fn human(e: &Event) -> Rendered {
    let ok = |text: String| Rendered { text, failure: false };
    let fail = |text: String| Rendered { text, failure: true };
    match e {
        Event::Push(m) => ok(message_line(m)),
        Event::Done(d) => ok(match d {
            Done::Registered { user } => format!("registered {user}; now log in with login#{user}&PASSWORD"),
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
            Done::Messages(ms) => ms.iter().map(message_line).collect::<Vec<_>>().join("\n"),
            Done::Users(names) if names.is_empty() => "no users match".into(),
            Done::Users(names) => names.join("\n"),
            Done::Pong { rtt } => format!("pong in {:.1} ms", rtt.as_secs_f64() * 1000.0),
            Done::Me { user, sessions } => format!("{user} ({sessions} session(s))"),
            Done::Relations(rs) => {
                let following: Vec<&str> =
                    rs.iter().filter(|r| r.following).map(|r| r.user.as_str()).collect();
                let followers: Vec<&str> =
                    rs.iter().filter(|r| r.follower).map(|r| r.user.as_str()).collect();
                let list = |v: &[&str]| if v.is_empty() { "nobody".to_string() } else { v.join(", ") };
                format!("following: {}\nfollowers: {}", list(&following), list(&followers))
            }
            Done::Deleted => "account deleted".into(),
        }),
        Event::Failed { error, .. } => fail(format!("error: {error}")),
        Event::NoAnswer { server, tries, .. } => {
            fail(format!("error: no answer from {server} after {tries} tries"))
        }
        Event::VersionMismatch { server_version, .. } => fail(format!(
            "error: server speaks protocol v{server_version}, this client speaks v{}",
            udpmsg::proto::VERSION
        )),
        Event::SessionLost { error } => fail(format!("{error}")),
        Event::Refused { command, server } => {
            fail(format!("error: {command}: nothing listens at {server} (connection refused)"))
        }
        Event::Contact { server, change } => match change {
            udpmsg::client::ContactChange::Lost { .. } => fail(format!("lost contact with {server}")),
            udpmsg::client::ContactChange::Connected => ok(format!("connected to {server}")),
            udpmsg::client::ContactChange::Reconnected => ok(format!("reconnected to {server}")),
        },
    }
}

fn message_json(m: &Message) -> Value {
    json!({ "id": m.id, "author": m.author, "to": m.to, "text": m.text })
}

fn error_json(command: &str, e: &ErrorCode) -> Value {
    let code = e.code();
    json!({ "type": "error", "command": command, "code": code, "message": e.to_string() })
}

pub fn json(e: &Event) -> Value {
    match e {
        Event::Push(m) => {
            let mut v = message_json(m);
            v["type"] = "push".into();
            v
        }
        Event::Done(d) => {
            let (command, mut v) = match d {
                Done::Registered { user } => ("register", json!({ "user": user })),
                Done::LoggedIn { user, missed, catching_up } => {
                    ("login", json!({ "user": user, "missed": missed, "catching_up": catching_up }))
                }
                Done::LoggedOut => ("logout", json!({})),
                Done::Subscribed { user } => ("subscribe", json!({ "user": user })),
                Done::Unsubscribed { user } => ("unsubscribe", json!({ "user": user })),
                Done::Posted { id, recipients } => ("post", json!({ "id": id, "recipients": recipients })),
                Done::Sent { id, to } => ("send", json!({ "id": id, "to": to })),
                Done::Messages(ms) => {
                    ("retrieve", json!({ "messages": ms.iter().map(message_json).collect::<Vec<_>>() }))
                }
                Done::Users(names) => ("users", json!({ "users": names })),
                Done::Pong { rtt } => ("ping", json!({ "rtt_ms": rtt.as_secs_f64() * 1000.0 })),
                Done::Me { user, sessions } => ("whoami", json!({ "user": user, "sessions": sessions })),
                Done::Relations(rs) => (
                    "subscriptions",
                    json!({
                        "following": rs.iter().filter(|r| r.following).map(|r| &r.user).collect::<Vec<_>>(),
                        "followers": rs.iter().filter(|r| r.follower).map(|r| &r.user).collect::<Vec<_>>(),
                    }),
                ),
                Done::Deleted => ("delete", json!({})),
            };
            v["type"] = "ok".into();
            v["command"] = command.into();
            v
        }
        Event::Failed { command, error } => error_json(command, error),
        Event::NoAnswer { command, server, tries } => json!({
            "type": "error", "command": command, "code": "NoAnswer",
            "message": format!("no answer from {server} after {tries} tries"),
        }),
        Event::VersionMismatch { command, server_version } => json!({
            "type": "error", "command": command, "code": "VersionMismatch",
            "server_version": server_version, "client_version": udpmsg::proto::VERSION,
            "message": format!("server speaks protocol v{server_version}, this client speaks v{}", udpmsg::proto::VERSION),
        }),
        Event::SessionLost { error } => {
            let mut v = error_json("keepalive", error);
            v["type"] = "session_lost".into();
            v
        }
        Event::Refused { command, server } => json!({
            "type": "error", "command": command, "code": "Refused",
            "message": format!("nothing listens at {server} (connection refused)"),
        }),
        Event::Contact { server, change } => json!({
            "type": "contact", "server": server.to_string(), "change": format!("{change:?}"),
        }),
    }
}

/// A line that is not a command the daemon could take; nothing was sent. A usage line as it
/// is; a broken limit as the daemon's error would read.
pub fn parse_error(e: &udpmsg::command::ParseError) -> String {
    match e.code {
        "Usage" | "UnknownCommand" => e.message.clone(),
        _ => format!("error: {}", e.message),
    }
}

/// A line that is not a command the daemon could take; nothing was sent.
pub fn parse_error_json(e: &udpmsg::command::ParseError) -> Value {
    json!({ "type": "error", "command": e.command, "code": e.code, "message": e.message })
}
