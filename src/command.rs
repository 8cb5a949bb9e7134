//! The REPL syntax: `command#arg&arg`.
//!
//! A command is recognised by its name in any case (`Login#...` is `login#...`), with spaces
//! around the name ignored (` post #x` is `post#x`). Arguments are separated by `&`, and the last
//! one takes the rest of the line verbatim, so `post#a#b & c` posts `a#b & c` and
//! `login#bob&p&ss` logs in with the password `p&ss`. User names, numbers and patterns are
//! trimmed (`subscribe#bob ` is `subscribe#bob`); texts and passwords are not.
//!
//! Nothing that the daemon could not decode is ever sent: names, passwords, patterns and texts
//! are checked against the protocol's limits here, and a line that breaks one is refused with
//! the daemon's own words for it. A line that is not a command gets a usage line, with a
//! suggestion when the intent is clear (`login alice secret` → `did you mean login#alice&...?`);
//! neither ever repeats a password.

use crate::proto::{self, ErrorCode};
use std::fmt;

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

impl Command {
    /// The command's name, as in the table.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Register { .. } => "register",
            Command::Login { .. } => "login",
            Command::Logout => "logout",
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Post { .. } => "post",
            Command::Send { .. } => "send",
            Command::Retrieve { .. } => "retrieve",
            Command::Users { .. } => "users",
            Command::WhoAmI => "whoami",
            Command::Subscriptions => "subscriptions",
            Command::Delete { .. } => "delete",
            Command::Ping => "ping",
            Command::Help => "help",
            Command::Quit => "quit",
        }
    }
}

/// One row of the command table: name, argument synopsis, what it does.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("register", "USER&PASSWORD", "create an account and log in to it"),
    ("login", "USER&PASSWORD", "log in (ends the session you are logged in to, if any)"),
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
    ("quit", "", "log out and leave (also exit, Ctrl-D)"),
    ("exit", "", "the same as quit"),
];

/// The commands whose arguments include a password.
const SECRET: &[&str] = &["login", "register", "delete"];

/// Why a line is not a command; nothing is sent for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The command, when its name was recognised.
    pub command: Option<&'static str>,
    /// Machine-readable: `UnknownCommand`, `Usage`, or the daemon's code for the same problem
    /// (`TextTooLong`, `InvalidText`, `InvalidName`, `InvalidPassword`, `InvalidPattern`).
    pub code: &'static str,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

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
    let mut s = String::from("commands (names in any case):\n");
    for (n, args, what) in COMMANDS {
        let syn = if args.is_empty() { n.to_string() } else { format!("{n}#{args}") };
        s.push_str(&format!("  {syn:<28} {what}\n"));
    }
    s
}

/// The first word of a line: up to the first `#`, `&` or space, lower-cased.
fn first_word(line: &str) -> String {
    let line = line.trim_start();
    let end = line.find(|c: char| c == '#' || c == '&' || c.is_whitespace()).unwrap_or(line.len());
    line[..end].to_lowercase()
}

/// Edit distance with adjacent transpositions (optimal string alignment), on characters; for
/// "did you mean" here and in the configuration's errors.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// Does `word` look like `name`: a typo of it (`loign`), a start of it (`reg`), or it with
/// something after (`logins`)?
fn resembles(word: &str, name: &str) -> bool {
    distance(word, name) <= 2 || (word.len() >= 3 && name.starts_with(word)) || word.starts_with(name)
}

/// Might this line carry a password, so that the REPL keeps it out of its history? True when
/// its first word resembles `login`, `register` or `delete` in any case (a typo must not leak
/// the password it was typed with), and for a line with no command name before an `&`.
pub fn is_sensitive(line: &str) -> bool {
    let word = first_word(line);
    if word.is_empty() {
        return line.contains('&');
    }
    SECRET.iter().any(|s| resembles(&word, s))
}

/// Command names close to `word`, closest first.
fn similar(word: &str) -> Vec<&'static str> {
    let mut found: Vec<(usize, &'static str)> = COMMANDS
        .iter()
        .map(|(n, _, _)| (distance(word, n), *n))
        .filter(|(d, n)| {
            *d <= (word.chars().count() / 3).clamp(1, 2)
                || (word.len() >= 2 && n.starts_with(word))
                || word.starts_with(n)
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, n)| n).take(3).collect()
}

/// A name as it may be shown back: no control characters, bounded.
fn shown(word: &str) -> String {
    let mut s: String = word.chars().take(24).flat_map(char::escape_debug).collect();
    if word.chars().count() > 24 {
        s.push_str("...");
    }
    s
}

fn unknown(word: &str, line: &str) -> ParseError {
    let hint = match similar(word).as_slice() {
        [] if line.split_whitespace().count() > 1 => {
            " (type help for the list of commands; post#TEXT posts a line)".to_string()
        }
        [] => ": type help for the list of commands".to_string(),
        [one] => format!(": did you mean {one}?"),
        [first @ .., last] => format!(": did you mean {} or {last}?", first.join(", ")),
    };
    ParseError {
        command: None,
        code: "UnknownCommand",
        message: format!("unknown command '{}'{hint}", shown(word)),
    }
}

fn usage_error(name: &'static str) -> ParseError {
    ParseError { command: Some(name), code: "Usage", message: usage(name) }
}

/// `login alice secret` and the like: the words after a known command's name, as they would be
/// written, with the password left out.
fn suggestion(name: &'static str, args: &str, rest: &str) -> Option<String> {
    let rest = rest.trim();
    if rest.is_empty() {
        return None;
    }
    let secret = SECRET.contains(&name);
    Some(match args.matches('&').count() {
        0 if secret => format!("{name}#..."),
        0 => format!("{name}#{rest}"),
        _ => {
            let sep = |c: char| c.is_whitespace() || c == '#' || c == '&';
            let (first, second) = match rest.split_once(sep) {
                Some((a, b)) => (a, b.trim_start_matches(sep)),
                None => (rest, ""),
            };
            let second = if secret {
                "..."
            } else if second.is_empty() {
                args.split('&').nth(1).unwrap_or("...")
            } else {
                second
            };
            format!("{name}#{}&{second}", shown(first))
        }
    })
}

fn canonical(word: &str) -> Option<(&'static str, &'static str)> {
    COMMANDS.iter().find(|(n, _, _)| *n == word).map(|(n, a, _)| (*n, *a))
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

fn check_name(command: &'static str, name: String) -> Result<String, ParseError> {
    let name = name.trim().to_string();
    if name.is_empty() {
        return Err(usage_error(command));
    }
    if !proto::valid_name(&name, proto::MAX_NAME_LEN) {
        let message = ErrorCode::InvalidName { max_len: proto::MAX_NAME_LEN as u32 }.to_string();
        return Err(ParseError { command: Some(command), code: "InvalidName", message });
    }
    Ok(name)
}

fn check_password(command: &'static str, password: String) -> Result<String, ParseError> {
    if password.len() > proto::MAX_PASSWORD_LEN {
        let message =
            format!("password too long: {} bytes, at most {}", password.len(), proto::MAX_PASSWORD_LEN);
        return Err(ParseError { command: Some(command), code: "InvalidPassword", message });
    }
    Ok(password)
}

fn check_text(command: &'static str, text: String) -> Result<String, ParseError> {
    if text.len() > proto::MAX_TEXT_BYTES {
        let message = format!("text too long: {} bytes, at most {}", text.len(), proto::MAX_TEXT_BYTES);
        return Err(ParseError { command: Some(command), code: "TextTooLong", message });
    }
    if let Some(c) = proto::forbidden_char(&text) {
        let message = ErrorCode::InvalidText { code_point: c as u32 }.to_string();
        return Err(ParseError { command: Some(command), code: "InvalidText", message });
    }
    Ok(text)
}

/// Parses one line. `Ok(None)` for a blank line; `Err` for anything that is not a command the
/// daemon could take, in which case nothing is to be sent.
pub fn parse(line: &str) -> Result<Option<Command>, ParseError> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let (head, rest) = match line.split_once('#') {
        Some((n, r)) => (n.trim(), Some(r)),
        None => (line.trim(), None),
    };
    if head.contains(char::is_whitespace) || (rest.is_none() && head.contains('&')) {
        // Words instead of `#` and `&`: say how it is written.
        let word = first_word(line);
        let Some((name, syntax)) = canonical(&word) else { return Err(unknown(&word, line)) };
        let after = line.trim_start()[word.len()..].to_string();
        let mut e = usage_error(name);
        if !syntax.is_empty() {
            if let Some(s) = suggestion(name, syntax, after.trim_start_matches(['#', '&'])) {
                e.message = format!("{} (did you mean {s}?)", e.message);
            }
        }
        return Err(e);
    }
    let word = head.to_lowercase();
    let Some((name, _)) = canonical(&word) else { return Err(unknown(&word, line)) };
    let bad = || usage_error(name);
    let no_args = |c: Command| match rest {
        None | Some("") => Ok(Some(c)),
        Some(_) => Err(usage_error(name)),
    };
    let one = || args(rest, 1).ok_or_else(bad).map(|mut a| a.remove(0));
    let two = || args(rest, 2).ok_or_else(bad).map(|a| (a[0].clone(), a[1].clone()));
    match name {
        "register" | "login" => {
            let (user, password) = two()?;
            let (user, password) = (check_name(name, user)?, check_password(name, password)?);
            Ok(Some(if name == "login" {
                Command::Login { user, password }
            } else {
                Command::Register { user, password }
            }))
        }
        "logout" => no_args(Command::Logout),
        "subscribe" => Ok(Some(Command::Subscribe { user: check_name(name, one()?)? })),
        "unsubscribe" => Ok(Some(Command::Unsubscribe { user: check_name(name, one()?)? })),
        "post" => Ok(Some(Command::Post { text: check_text(name, one()?)? })),
        "send" => {
            let (to, text) = two()?;
            Ok(Some(Command::Send { to: check_name(name, to)?, text: check_text(name, text)? }))
        }
        "retrieve" => {
            let count = one()?.trim().parse::<u32>().map_err(|_| bad())?;
            Ok(Some(Command::Retrieve { count }))
        }
        "users" => {
            let pattern = one()?.trim().to_string();
            if pattern.is_empty() {
                return Err(bad());
            }
            if !proto::valid_pattern(&pattern) {
                let message =
                    ErrorCode::InvalidPattern { max_len: proto::MAX_PATTERN_LEN as u32 }.to_string();
                return Err(ParseError { command: Some(name), code: "InvalidPattern", message });
            }
            Ok(Some(Command::Users { pattern }))
        }
        "whoami" => no_args(Command::WhoAmI),
        "subscriptions" => no_args(Command::Subscriptions),
        "delete" => Ok(Some(Command::Delete { password: check_password(name, one()?)? })),
        "ping" => no_args(Command::Ping),
        "help" => no_args(Command::Help),
        "quit" | "exit" => no_args(Command::Quit),
        _ => unreachable!("every name in COMMANDS is handled"),
    }
}

/// The commands a line typed so far could become: for completing the command name.
pub fn complete_name(prefix: &str) -> Vec<&'static str> {
    let prefix = prefix.to_lowercase();
    COMMANDS.iter().map(|(n, _, _)| *n).filter(|n| n.starts_with(&prefix)).collect()
}

/// Whether `name`'s first argument is a user name (for completion), and whether more follow.
pub fn takes_user(name: &str) -> Option<bool> {
    match name.to_lowercase().as_str() {
        "subscribe" | "unsubscribe" => Some(false),
        "send" | "login" | "register" => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Command {
        parse(s).unwrap().unwrap()
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().message
    }

    #[test]
    fn last_argument_takes_the_rest() {
        assert_eq!(p("post#a#b & c"), Command::Post { text: "a#b & c".into() });
        assert_eq!(p("login#bob&p&ss"), Command::Login { user: "bob".into(), password: "p&ss".into() });
        assert_eq!(p("send#bob&hi & bye"), Command::Send { to: "bob".into(), text: "hi & bye".into() });
        assert_eq!(p("post#  spaced  "), Command::Post { text: "  spaced  ".into() });
        assert_eq!(
            p("login#bob&pass word "),
            Command::Login { user: "bob".into(), password: "pass word ".into() }
        );
    }

    #[test]
    fn names_in_any_case_with_spaces_around() {
        assert_eq!(p("Login#alice&pw"), Command::Login { user: "alice".into(), password: "pw".into() });
        assert_eq!(p("PING"), Command::Ping);
        assert_eq!(p(" post#x"), Command::Post { text: "x".into() });
        assert_eq!(p("post #x"), Command::Post { text: "x".into() });
        assert_eq!(p("Exit"), Command::Quit);
        assert_eq!(err("posting#x"), "unknown command 'posting': did you mean post?");
        assert!(parse("xlogin#a&b").is_err());
    }

    #[test]
    fn names_numbers_and_patterns_are_trimmed() {
        assert_eq!(p("subscribe#bob "), Command::Subscribe { user: "bob".into() });
        assert_eq!(p("unsubscribe# bob"), Command::Unsubscribe { user: "bob".into() });
        assert_eq!(p("send#bob &hi "), Command::Send { to: "bob".into(), text: "hi ".into() });
        assert_eq!(p("login# alice &pw"), Command::Login { user: "alice".into(), password: "pw".into() });
        assert_eq!(p("retrieve# 5 "), Command::Retrieve { count: 5 });
        assert_eq!(p("users#a* "), Command::Users { pattern: "a*".into() });
        assert_eq!(err("subscribe#  "), "usage: subscribe#USER");
    }

    #[test]
    fn unknown_commands_suggest_close_names() {
        assert_eq!(err("logoutx"), "unknown command 'logoutx': did you mean logout?");
        assert_eq!(err("loign#alice&pw"), "unknown command 'loign': did you mean login?");
        assert_eq!(err("sub#bob"), "unknown command 'sub': did you mean subscribe or subscriptions?");
        assert_eq!(err("frobnicate"), "unknown command 'frobnicate': type help for the list of commands");
        let e = parse("frobnicate#x").unwrap_err();
        assert_eq!((e.command, e.code), (None, "UnknownCommand"));
        assert_eq!(
            err("hello there"),
            "unknown command 'hello' (type help for the list of commands; post#TEXT posts a line)"
        );
        // A password typed where a name goes is not repeated.
        assert_eq!(err("alice&secret"), "unknown command 'alice': type help for the list of commands");
    }

    #[test]
    fn words_instead_of_separators_get_the_syntax_without_the_password() {
        let e = parse("login alice secret").unwrap_err();
        assert_eq!(e.message, "usage: login#USER&PASSWORD (did you mean login#alice&...?)");
        assert_eq!((e.command, e.code), (Some("login"), "Usage"));
        assert!(!e.message.contains("secret"));
        assert_eq!(
            err("Register alice s3cret"),
            "usage: register#USER&PASSWORD (did you mean register#alice&...?)"
        );
        assert_eq!(err("delete hunter2"), "usage: delete#PASSWORD (did you mean delete#...?)");
        assert_eq!(err("post hi there"), "usage: post#TEXT (did you mean post#hi there?)");
        assert_eq!(err("send bob hi there"), "usage: send#USER&TEXT (did you mean send#bob&hi there?)");
        assert_eq!(err("send bob"), "usage: send#USER&TEXT (did you mean send#bob&TEXT?)");
        assert_eq!(err("subscribe bob"), "usage: subscribe#USER (did you mean subscribe#bob?)");
        assert_eq!(err("login alice&secret"), "usage: login#USER&PASSWORD (did you mean login#alice&...?)");
        assert_eq!(err("whoami please"), "usage: whoami");
        for line in ["login alice secret", "login alice&secret", "LOGIN alice secret", "delete secret"] {
            assert!(!err(line).contains("secret"), "{line}");
        }
    }

    #[test]
    fn usage_on_missing_arguments() {
        assert_eq!(err("login#alice"), "usage: login#USER&PASSWORD");
        assert_eq!(err("login#alice&"), "usage: login#USER&PASSWORD");
        assert_eq!(err("post"), "usage: post#TEXT");
        assert_eq!(err("post#"), "usage: post#TEXT");
        assert_eq!(err("retrieve#ten"), "usage: retrieve#N");
        assert_eq!(err("retrieve#-1"), "usage: retrieve#N");
        assert_eq!(err("logout#now"), "usage: logout");
        let e = parse("post#").unwrap_err();
        assert_eq!((e.command, e.code), (Some("post"), "Usage"));
    }

    #[test]
    fn what_the_daemon_could_not_decode_is_refused_here() {
        let e = parse(&format!("post#{}", "x".repeat(1190))).unwrap_err();
        assert_eq!(e.message, "text too long: 1190 bytes, at most 1024");
        assert_eq!((e.command, e.code), (Some("post"), "TextTooLong"));
        assert_eq!(err(&format!("post#{}", "😀".repeat(300))), "text too long: 1200 bytes, at most 1024");
        assert_eq!(err(&format!("send#bob&{}", "é".repeat(513))), "text too long: 1026 bytes, at most 1024");
        assert_eq!(p(&format!("post#{}", "x".repeat(1024))), Command::Post { text: "x".repeat(1024) });
        let bad_name = "invalid name: 1 to 32 characters from A-Z a-z 0-9 _ . -";
        assert_eq!(err(&format!("subscribe#{}", "b".repeat(33))), bad_name);
        assert_eq!(err("register#al ice&secret"), bad_name);
        assert_eq!(err("send#al*ce&hi"), bad_name);
        assert_eq!(
            err(&format!("login#alice&{}", "p".repeat(129))),
            "password too long: 129 bytes, at most 128"
        );
        let e = parse("post#tab\there").unwrap_err();
        assert_eq!((e.command, e.code), (Some("post"), "InvalidText"));
        assert_eq!(e.message, "text contains the control character U+0009; only newline is allowed");
        assert_eq!(
            err("send#bob&\x1b[31mred"),
            "text contains the control character U+001B; only newline is allowed"
        );
        assert_eq!(err("users#a b"), "invalid pattern: up to 64 characters of names, * and ?");
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
        assert_eq!(p("exit"), Command::Quit);
        assert_eq!(p("help"), Command::Help);
    }

    #[test]
    fn lines_that_may_hold_a_password() {
        for line in [
            "login#a&b",
            "register#a&b",
            "delete#pw",
            " login #alice&pw",
            "Login#alice&pw",
            "LOGIN alice secret",
            "login alice secret",
            "loign#alice&pw",
            "lgoin#alice&pw",
            "logni alice pw",
            "regsiter#a&b",
            "reg#a&b",
            "delet#pw",
            "deleet pw",
            "logins#a&b",
            "&secret",
            "#alice&secret",
        ] {
            assert!(is_sensitive(line), "{line:?} should stay out of the history");
        }
        for line in ["post#login#x", "logout", "send#bob&login#a&b", "users#*", "ping", "post#delete me"] {
            assert!(!is_sensitive(line), "{line:?}");
        }
        // No other command resembles a secret one.
        for (n, _, _) in COMMANDS {
            assert_eq!(is_sensitive(n), SECRET.contains(n), "{n}");
        }
    }

    #[test]
    fn help_lists_every_command() {
        let h = help();
        for (n, _, _) in COMMANDS {
            assert!(h.contains(n));
        }
    }

    #[test]
    fn completion_helpers() {
        assert_eq!(complete_name("sub"), vec!["subscribe", "subscriptions"]);
        assert_eq!(complete_name("Lo"), vec!["login", "logout"]);
        assert_eq!(takes_user("send"), Some(true));
        assert_eq!(takes_user("Subscribe"), Some(false));
        assert_eq!(takes_user("post"), None);
    }
}
