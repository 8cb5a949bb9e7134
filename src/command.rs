//! The REPL syntax: `command#arg&arg`.
//!
//! A command is recognised by its exact name. Arguments are separated by `&`, and the last one
//! takes the rest of the line verbatim, so `post#a#b & c` posts `a#b & c` and
//! `login#bob&p&ss` logs in with the password `p&ss`.

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Register { user: String, password: String },
    Login { user: String, password: String },
    Logout,
    Subscribe { user: String },
    Unsubscribe { user: String },
    Post { text: String },
    Send { to: String, text: String },
    Retrieve { count: u32 },
    Users { pattern: String },
    WhoAmI,
    Subscriptions,
    Delete { password: String },
    Ping,
    Help,
    Quit,
}

/// One row of the command table: name, argument synopsis, what it does.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("register", "USER&PASSWORD", "create an account"),
    ("login", "USER&PASSWORD", "log in (you stay logged in until logout or expiry)"),
    ("logout", "", "end this session"),
    ("subscribe", "USER", "receive USER's posts from now on"),
    ("unsubscribe", "USER", "stop receiving USER's posts"),
    ("post", "TEXT", "post TEXT to your subscribers"),
    ("send", "USER&TEXT", "send a direct message to USER"),
    ("retrieve", "N", "show your N most recent messages, oldest first"),
    ("users", "PATTERN", "list accounts matching PATTERN (* and ?; users#* lists all)"),
    ("whoami", "", "show who you are logged in as"),
    ("subscriptions", "", "show whom you follow and who follows you"),
    ("delete", "PASSWORD", "delete your account (cannot be undone)"),
    ("ping", "", "check that the server answers"),
    ("help", "", "show this table"),
    ("quit", "", "leave"),
];

/// The usage line for a command name, e.g. `usage: login#USER&PASSWORD`.
pub fn usage(name: &str) -> String {
    match COMMANDS.iter().find(|(n, _, _)| *n == name) {
        Some((n, "", _)) => format!("usage: {n}"),
        Some((n, args, _)) => format!("usage: {n}#{args}"),
        None => format!("unknown command '{name}': type help for the list of commands"),
    }
}

/// The help table.
pub fn help() -> String {
    let mut s = String::from("commands:\n");
    for (n, args, what) in COMMANDS {
        let syn = if args.is_empty() { n.to_string() } else { format!("{n}#{args}") };
        s.push_str(&format!("  {syn:<28} {what}\n"));
    }
    s
}

/// Does this command carry a password (so the REPL keeps it out of its history)?
pub fn is_sensitive(line: &str) -> bool {
    let name = line.split('#').next().unwrap_or("").trim();
    matches!(name, "login" | "register" | "delete")
}

/// Splits `rest` into exactly `n` arguments, the last taking the remainder verbatim.
fn args(rest: Option<&str>, n: usize) -> Option<Vec<String>> {
    let rest = rest?;
    let parts: Vec<String> = rest.splitn(n, '&').map(str::to_string).collect();
    if parts.len() != n || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(parts)
}

/// Parses one line. `Ok(None)` for a blank line; `Err(usage)` for an unknown command or wrong
/// arguments, in which case nothing is to be sent.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let (name, rest) = match line.split_once('#') {
        Some((n, r)) => (n.trim(), Some(r)),
        None => (line.trim(), None),
    };
    let bad = || usage(name);
    let no_args = |c: Command| match rest {
        None | Some("") => Ok(Some(c)),
        Some(_) => Err(usage(name)),
    };
    match name {
        "register" | "login" => {
            let a = args(rest, 2).ok_or_else(bad)?;
            let (user, password) = (a[0].clone(), a[1].clone());
            Ok(Some(if name == "login" {
                Command::Login { user, password }
            } else {
                Command::Register { user, password }
            }))
        }
        "logout" => no_args(Command::Logout),
        "subscribe" => Ok(Some(Command::Subscribe { user: args(rest, 1).ok_or_else(bad)?.remove(0) })),
        "unsubscribe" => Ok(Some(Command::Unsubscribe { user: args(rest, 1).ok_or_else(bad)?.remove(0) })),
        "post" => Ok(Some(Command::Post { text: args(rest, 1).ok_or_else(bad)?.remove(0) })),
        "send" => {
            let a = args(rest, 2).ok_or_else(bad)?;
            Ok(Some(Command::Send { to: a[0].clone(), text: a[1].clone() }))
        }
        "retrieve" => {
            let a = args(rest, 1).ok_or_else(bad)?;
            let count = a[0].trim().parse::<u32>().map_err(|_| bad())?;
            Ok(Some(Command::Retrieve { count }))
        }
        "users" => Ok(Some(Command::Users { pattern: args(rest, 1).ok_or_else(bad)?.remove(0) })),
        "whoami" => no_args(Command::WhoAmI),
        "subscriptions" => no_args(Command::Subscriptions),
        "delete" => Ok(Some(Command::Delete { password: args(rest, 1).ok_or_else(bad)?.remove(0) })),
        "ping" => no_args(Command::Ping),
        "help" => no_args(Command::Help),
        "quit" | "exit" => no_args(Command::Quit),
        _ => Err(usage(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Command {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn last_argument_takes_the_rest() {
        assert_eq!(p("post#a#b & c"), Command::Post { text: "a#b & c".into() });
        assert_eq!(p("login#bob&p&ss"), Command::Login { user: "bob".into(), password: "p&ss".into() });
        assert_eq!(p("send#bob&hi & bye"), Command::Send { to: "bob".into(), text: "hi & bye".into() });
        assert_eq!(p("post#  spaced  "), Command::Post { text: "  spaced  ".into() });
    }

    #[test]
    fn exact_names_only() {
        assert!(parse("posting#x").is_err());
        assert!(parse("pos#x").is_err());
        assert!(parse("xlogin#a&b").is_err());
        assert_eq!(
            parse("logoutx").unwrap_err(),
            "unknown command 'logoutx': type help for the list of commands"
        );
    }

    #[test]
    fn usage_on_missing_arguments() {
        assert_eq!(parse("login#alice").unwrap_err(), "usage: login#USER&PASSWORD");
        assert_eq!(parse("login#alice&").unwrap_err(), "usage: login#USER&PASSWORD");
        assert_eq!(parse("post").unwrap_err(), "usage: post#TEXT");
        assert_eq!(parse("post#").unwrap_err(), "usage: post#TEXT");
        assert_eq!(parse("retrieve#ten").unwrap_err(), "usage: retrieve#N");
        assert_eq!(parse("retrieve#-1").unwrap_err(), "usage: retrieve#N");
        assert_eq!(parse("logout#now").unwrap_err(), "usage: logout");
    }

    #[test]
    fn simple_commands() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("   \n").unwrap(), None);
        assert_eq!(p("logout"), Command::Logout);
        assert_eq!(p("logout\r\n"), Command::Logout);
        assert_eq!(p("retrieve#10"), Command::Retrieve { count: 10 });
        assert_eq!(p("retrieve#0"), Command::Retrieve { count: 0 }, "the server names the range");
        assert_eq!(p("users#*"), Command::Users { pattern: "*".into() });
        assert_eq!(p("quit"), Command::Quit);
        assert_eq!(p("help"), Command::Help);
    }

    #[test]
    fn sensitive_lines() {
        assert!(is_sensitive("login#a&b"));
        assert!(is_sensitive("register#a&b"));
        assert!(is_sensitive("delete#pw"));
        assert!(!is_sensitive("post#login#x"));
        assert!(is_sensitive(" login #alice&pw"), "spaces around the name parse as login too");
    }

    #[test]
    fn help_lists_every_command() {
        let h = help();
        for (n, _, _) in COMMANDS {
            assert!(h.contains(n));
        }
    }
}
