//! The line editor thread of the interactive client (rustyline): it reads lines while the main
//! loop talks to the daemon, so typing never waits for the network, and hands them over one
//! command per line.
//!
//! - A bracketed paste of several lines arrives as one buffer with newlines in it: each line is
//!   a command of its own, as if typed.
//! - Ctrl-C never leaves: it clears what is typed, and the main loop abandons the command in
//!   flight (it learns whether the prompt was empty, to say how to leave).
//! - Tab completes command names, and the user names a command takes from those seen so far.
//! - History persists in `$XDG_DATA_HOME/udpmsg/history` (else `~/.local/share/udpmsg/history`),
//!   mode 0600 in a 0700 directory; a line that may hold a password never enters it.

use crate::Input;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::FileHistory;
use rustyline::validate::Validator;
use rustyline::{
    Cmd, ConditionalEventHandler, Context, Editor, EventContext, EventHandler, KeyEvent, RepeatCount,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use udpmsg::command::{self, Command};

/// Completion and nothing else (no hints, no colours, every line complete).
pub struct Helper {
    names: Arc<Mutex<BTreeSet<String>>>,
}

impl Completer for Helper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        Ok(complete(line, pos, &self.names.lock().expect("names lock")))
    }
}

impl Hinter for Helper {
    type Hint = String;
}
impl Highlighter for Helper {}
impl Validator for Helper {}
impl rustyline::Helper for Helper {}

/// What Tab offers at `pos` in `line`: command names before the `#`, then user names where the
/// command takes one.
pub fn complete(line: &str, pos: usize, names: &BTreeSet<String>) -> (usize, Vec<Pair>) {
    let before = &line[..pos];
    let pair = |s: String| Pair { display: s.clone(), replacement: s };
    match before.find('#') {
        None => {
            let start = before.len() - before.trim_start().len();
            let word = &before[start..];
            if word.contains(char::is_whitespace) {
                return (pos, Vec::new());
            }
            let found = command::complete_name(word)
                .into_iter()
                .map(|n| {
                    let takes_args = command::COMMANDS.iter().any(|(c, a, _)| *c == n && !a.is_empty());
                    Pair {
                        display: n.to_string(),
                        replacement: format!("{n}{}", if takes_args { "#" } else { "" }),
                    }
                })
                .collect();
            (start, found)
        }
        Some(hash) => {
            let Some(more) = command::takes_user(before[..hash].trim()) else { return (pos, Vec::new()) };
            let arg = &before[hash + 1..];
            if arg.contains('&') {
                return (pos, Vec::new());
            }
            let prefix = arg.trim_start();
            let start = pos - prefix.len();
            let found = names
                .iter()
                .filter(|n| n.starts_with(prefix))
                .map(|n| pair(format!("{n}{}", if more { "&" } else { "" })))
                .collect();
            (start, found)
        }
    }
}

/// Remembers whether the prompt was empty when Ctrl-C was pressed, then lets rustyline do what
/// it does (clear the line, return `Interrupted`).
struct CtrlC(Arc<AtomicBool>);

impl ConditionalEventHandler for CtrlC {
    fn handle(&self, _: &rustyline::Event, _: RepeatCount, _: bool, ctx: &EventContext<'_>) -> Option<Cmd> {
        self.0.store(ctx.line().is_empty(), Ordering::SeqCst);
        None
    }
}

/// `$XDG_DATA_HOME/udpmsg/history`, else `$HOME/.local/share/udpmsg/history`.
pub fn history_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".local").join("share"),
    };
    Some(base.join("udpmsg").join("history"))
}

/// Creates the history file (and its directory) private to the user, and makes an existing one
/// so; `None` (after saying why) if that cannot be done: then there is no history file.
fn prepare_history(path: &Path) -> Option<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = path.parent()?;
    let result = (|| -> std::io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    })();
    match result {
        Ok(()) => Some(()),
        Err(e) => {
            eprintln!("udpmsg: no history file: {}: {e}", path.display());
            None
        }
    }
}

/// The REPL thread's body. `send` hands input to the main loop (false once it is gone).
pub fn run(send: impl Fn(Input) -> bool, names: Arc<Mutex<BTreeSet<String>>>) {
    let config = rustyline::Config::builder()
        .auto_add_history(false)
        .completion_type(rustyline::CompletionType::List)
        .bracketed_paste(true)
        .build();
    let mut rl: Editor<Helper, FileHistory> = match Editor::with_config(config) {
        Ok(rl) => rl,
        Err(e) => {
            eprintln!("udpmsg: cannot start the line editor: {e}");
            send(Input::End);
            return;
        }
    };
    rl.set_helper(Some(Helper { names }));
    let empty_at_ctrl_c = Arc::new(AtomicBool::new(true));
    rl.bind_sequence(
        KeyEvent::ctrl('C'),
        EventHandler::Conditional(Box::new(CtrlC(empty_at_ctrl_c.clone()))),
    );
    let history = history_path().filter(|p| prepare_history(p).is_some());
    if let Some(p) = &history {
        if let Err(e) = rl.load_history(p) {
            eprintln!("udpmsg: cannot read the history {}: {e}", p.display());
        }
    }
    if let Ok(p) = rl.create_external_printer() {
        send(Input::Printer(Box::new(p)));
    }
    loop {
        match rl.readline("> ") {
            Ok(text) => {
                let mut quit = false;
                for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
                    if line.trim().is_empty() {
                        continue;
                    }
                    // A line that may hold a password never enters the history.
                    if !command::is_sensitive(line) && rl.add_history_entry(line).unwrap_or(false) {
                        if let Some(p) = &history {
                            let _ = rl.append_history(p);
                        }
                    }
                    quit |= matches!(command::parse(line), Ok(Some(Command::Quit)));
                    if !send(Input::Line(line.to_string())) {
                        return;
                    }
                }
                if quit {
                    return;
                }
            }
            Err(ReadlineError::Interrupted) => {
                let empty = empty_at_ctrl_c.swap(true, Ordering::SeqCst);
                if !send(Input::Interrupt { line_was_empty: empty }) {
                    return;
                }
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("udpmsg: {e}");
                break;
            }
        }
    }
    send(Input::End);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered(line: &str, names: &[&str]) -> (usize, Vec<String>) {
        let names: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        let (start, pairs) = complete(line, line.len(), &names);
        (start, pairs.into_iter().map(|p| p.replacement).collect())
    }

    #[test]
    fn tab_offers_commands_then_names() {
        assert_eq!(offered("sub", &[]), (0, vec!["subscribe#".into(), "subscriptions".into()]));
        assert_eq!(offered("  Who", &[]), (2, vec!["whoami".into()]));
        assert_eq!(offered("subscribe#b", &["alice", "bob", "bea"]), (10, vec!["bea".into(), "bob".into()]));
        assert_eq!(offered("send#a", &["alice", "bob"]), (5, vec!["alice&".into()]));
        assert_eq!(offered("send#alice&he", &["alice", "hella"]), (13, vec![]), "no names in the text");
        assert_eq!(offered("post#b", &["bob"]), (6, vec![]), "post takes no name");
    }
}
