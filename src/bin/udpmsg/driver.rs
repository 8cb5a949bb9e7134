//! What the client does with the lines it is given: the policy between the user and the
//! protocol core, sans-IO like the core (time and datagrams are arguments) so that its unit
//! tests run on a virtual clock.
//!
//! # Driving contract
//!
//! Feed lines with [`Driver::line`], the end of input with [`Driver::input_ended`], Ctrl-C with
//! [`Driver::interrupt`], datagrams with [`Driver::handle`], ICMP refusals with
//! [`Driver::refused`]; call [`Driver::handle_timeout`] once [`Driver::poll_timeout`] has passed,
//! then [`Driver::step`]; drain [`Driver::poll_transmit`] to the socket and [`Driver::poll_item`]
//! to the screen. Stop when [`Driver::finished`].
//!
//! # Policy
//!
//! - One command at a time, in input order; what the user typed ahead waits in a queue.
//! - Leaving (`quit`, `exit`, Ctrl-D, the end of a script) logs out first, waiting at most
//!   [`EXIT_WAIT`], unless the session is to be kept (`--keep-session`): sessions no longer pile
//!   up on the daemon until they idle out. SIGTERM (and SIGINT in a script) leaves the same way,
//!   after the command in flight, if any, within the same bound (a login in flight would
//!   otherwise leave a session behind); a second signal leaves at once.
//! - A login while logged in ends the current session first (`logged out erin`), whoever it is
//!   for: the password is checked again, and no session is left behind.
//! - A registration while logged out logs in to the new account with the same password.
//! - `delete#PASSWORD` in the REPL asks for a `yes` first (scripts are not asked).
//! - Ctrl-C abandons the command in flight and what was typed after it; on an empty prompt it
//!   says how to leave.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use udpmsg::client::{Client, Done, Event};
use udpmsg::command::{self, Command, ParseError};
use udpmsg::proto::ErrorCode;

/// The longest the client waits for its logout when leaving; then it leaves anyway.
pub const EXIT_WAIT: Duration = Duration::from_secs(2);
/// After this long without an answer, the REPL says it is still trying.
pub const SLOW: Duration = Duration::from_secs(3);

/// Something to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An event from the core, shown as it is.
    Event(Event),
    /// A command the daemon refused, with what the shell knows about it.
    Failed {
        command: &'static str,
        error: ErrorCode,
        text_len: Option<usize>,
    },
    /// A logout (asked for, or before a login as someone else), naming who was logged out.
    LoggedOut {
        user: Option<String>,
    },
    /// A registration: a login to it follows, unless someone else is logged in (`still_as`).
    Registered {
        user: String,
        still_as: Option<String>,
    },
    /// A line that is not a command; nothing was sent.
    Parse(ParseError),
    Help,
    Notice(Notice),
}

/// The shell's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    ConfirmDelete {
        user: String,
    },
    NotDeleted,
    /// Ctrl-C gave up `command` (and `dropped` lines typed after it).
    Abandoned {
        command: &'static str,
        dropped: usize,
    },
    /// Ctrl-C dropped lines that were waiting.
    Dropped {
        dropped: usize,
    },
    StillWaiting {
        command: &'static str,
        server: SocketAddr,
        secs: u64,
    },
    /// Ctrl-C on an empty prompt with nothing going on.
    LeaveHint,
    /// The logout on leaving did not get through.
    NotLoggedOut {
        user: String,
        why: String,
    },
}

impl Item {
    /// Whether the item reports a failed command (exit status 1 in script mode).
    fn is_failure(&self) -> bool {
        matches!(
            self,
            Item::Failed { .. }
                | Item::Parse(_)
                | Item::Notice(Notice::Abandoned { .. })
                | Item::Event(Event::NoAnswer { .. } | Event::Refused { .. } | Event::VersionMismatch { .. })
        )
    }
}

/// Why a command was submitted.
#[derive(Debug, Clone, PartialEq)]
enum Purpose {
    /// Typed by the user.
    User,
    /// The logout before a login as someone else.
    SwitchLogout { from: String, then: Command },
    /// The login after a registration.
    AutoLogin,
    /// The logout on leaving.
    ExitLogout { user: String },
    /// Whom the user follows, fetched quietly after a login for completion (REPL).
    Names,
}

enum Step {
    Line(String),
    Run(Command, Purpose),
}

struct Flight {
    command: &'static str,
    purpose: Purpose,
    /// Bytes of the text posted or sent, for "text too long: N bytes".
    text_len: Option<usize>,
    /// Who was logged in when it started (for "logged out NAME").
    user_before: Option<String>,
    /// A registration's credentials, for the login that follows it.
    register: Option<(String, String)>,
    started: Instant,
    slow_said: bool,
}

/// See the module documentation.
pub struct Driver {
    client: Client,
    interactive: bool,
    keep_session: bool,
    queue: VecDeque<Step>,
    flight: Option<Flight>,
    /// A `delete` waiting for its `yes`.
    confirm: Option<Command>,
    input_done: bool,
    /// When the client leaves whatever happens, once leaving has begun.
    leaving: Option<Instant>,
    /// Whether the logout on leaving has gone out.
    logout_sent: bool,
    finished: bool,
    interrupted: bool,
    failures: u32,
    items: VecDeque<Item>,
    /// User names seen or followed, for completion.
    names: Arc<Mutex<BTreeSet<String>>>,
}

impl Driver {
    pub fn new(
        client: Client,
        interactive: bool,
        keep_session: bool,
        names: Arc<Mutex<BTreeSet<String>>>,
    ) -> Self {
        Driver {
            client,
            interactive,
            keep_session,
            queue: VecDeque::new(),
            flight: None,
            confirm: None,
            input_done: false,
            leaving: None,
            logout_sent: false,
            finished: false,
            interrupted: false,
            failures: 0,
            items: VecDeque::new(),
            names,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a signal or Ctrl-C ended a script.
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    pub fn line(&mut self, line: String) {
        if !self.input_done {
            self.queue.push_back(Step::Line(line));
        }
    }

    pub fn input_ended(&mut self) {
        self.input_done = true;
        if self.confirm.take().is_some() {
            self.items.push_back(Item::Notice(Notice::NotDeleted));
        }
    }

    /// Ctrl-C in the REPL (`line_was_empty`: nothing was typed at the prompt), or SIGINT.
    pub fn interrupt(&mut self, now: Instant, line_was_empty: bool) {
        if !self.interactive {
            // SIGINT ends a script, as SIGTERM does.
            self.interrupted = true;
            self.terminate(now);
            return;
        }
        if self.leaving.is_some() {
            // Asked twice: leave without waiting for the logout.
            self.finished = true;
            return;
        }
        if self.confirm.take().is_some() {
            self.items.push_back(Item::Notice(Notice::NotDeleted));
            return;
        }
        let dropped = self.queue.iter().filter(|s| matches!(s, Step::Line(_))).count();
        self.queue.clear();
        let abandoned = match &self.flight {
            Some(f) if !matches!(f.purpose, Purpose::ExitLogout { .. }) => {
                let quiet = f.purpose == Purpose::Names;
                match self.client.abandon(now) {
                    Some(command) => {
                        self.flight = None;
                        if !quiet {
                            self.show(Item::Notice(Notice::Abandoned { command, dropped }));
                        }
                        true
                    }
                    // A login already accepted: its success is on its way.
                    None => false,
                }
            }
            _ => false,
        };
        if !abandoned && dropped > 0 {
            self.show(Item::Notice(Notice::Dropped { dropped }));
        } else if !abandoned && line_was_empty && self.interactive {
            self.items.push_back(Item::Notice(Notice::LeaveHint));
        }
    }

    /// SIGTERM or SIGHUP: leave, after the command in flight and a logout, within
    /// [`EXIT_WAIT`]; a second one leaves at once.
    pub fn terminate(&mut self, now: Instant) {
        if self.leaving.is_some() {
            self.finished = true;
            return;
        }
        self.queue.clear();
        self.confirm = None;
        self.input_done = true;
        self.leaving = Some(now + EXIT_WAIT);
    }

    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.client.handle(now, from, bytes);
    }

    pub fn refused(&mut self, now: Instant) {
        self.client.connection_refused(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let slow = match &self.flight {
            Some(f) if self.interactive && !f.slow_said && f.purpose != Purpose::Names => {
                Some(f.started + SLOW)
            }
            _ => None,
        };
        [self.client.poll_timeout(), self.leaving, slow].into_iter().flatten().min()
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.client.poll_transmit()
    }

    pub fn poll_item(&mut self) -> Option<Item> {
        self.items.pop_front()
    }

    /// Takes the core's events, starts what is due, and decides when to leave.
    pub fn step(&mut self, now: Instant) {
        loop {
            while let Some(e) = self.client.poll_event() {
                self.on_event(e);
            }
            if self.finished {
                return;
            }
            if let Some(deadline) = self.leaving {
                if now >= deadline {
                    if let Some(Flight { purpose: Purpose::ExitLogout { user }, .. }) = &self.flight {
                        let why = format!(
                            "no answer from {} within {} s",
                            self.client.server(),
                            EXIT_WAIT.as_secs()
                        );
                        self.items.push_back(Item::Notice(Notice::NotLoggedOut { user: user.clone(), why }));
                    }
                    self.finished = true;
                    return;
                }
            }
            if let Some(f) = &mut self.flight {
                if self.interactive && !f.slow_said && f.purpose != Purpose::Names && now >= f.started + SLOW
                {
                    f.slow_said = true;
                    let secs = now.saturating_duration_since(f.started).as_secs();
                    let n = Notice::StillWaiting { command: f.command, server: self.client.server(), secs };
                    self.items.push_back(Item::Notice(n));
                }
                return;
            }
            if !self.client.is_ready() {
                return;
            }
            match self.queue.pop_front() {
                Some(Step::Line(line)) => self.on_line(now, &line),
                Some(Step::Run(cmd, purpose)) => self.submit(now, cmd, purpose),
                None if self.input_done && self.confirm.is_none() => {
                    self.leave(now);
                    if self.flight.is_none() {
                        return;
                    }
                }
                None => return,
            }
        }
    }

    fn leave(&mut self, now: Instant) {
        match self.client.user() {
            Some(user) if !self.keep_session && !self.logout_sent => {
                let user = user.to_string();
                self.logout_sent = true;
                self.leaving.get_or_insert(now + EXIT_WAIT);
                self.submit(now, Command::Logout, Purpose::ExitLogout { user });
            }
            _ => self.finished = true,
        }
    }

    fn on_line(&mut self, now: Instant, line: &str) {
        let parsed = command::parse(line);
        if let Some(cmd) = self.confirm.take() {
            let answer = line.trim();
            if answer.eq_ignore_ascii_case("yes") || answer.eq_ignore_ascii_case("y") {
                self.submit(now, cmd, Purpose::User);
                return;
            }
            self.items.push_back(Item::Notice(Notice::NotDeleted));
            if !matches!(parsed, Ok(Some(Command::Quit))) {
                return;
            }
        }
        match parsed {
            Ok(None) => {}
            Ok(Some(Command::Help)) => self.items.push_back(Item::Help),
            Ok(Some(Command::Quit)) => {
                // What was typed after `quit` is not run.
                self.queue.clear();
                self.input_done = true;
            }
            Ok(Some(cmd)) => self.command(now, cmd),
            Err(e) => self.show(Item::Parse(e)),
        }
    }

    fn command(&mut self, now: Instant, cmd: Command) {
        let current = self.client.user().map(str::to_string);
        match (&cmd, current) {
            (Command::Login { .. }, Some(cur)) => {
                self.submit(now, Command::Logout, Purpose::SwitchLogout { from: cur, then: cmd });
            }
            (Command::Delete { .. }, Some(cur)) if self.interactive => {
                self.confirm = Some(cmd);
                self.items.push_back(Item::Notice(Notice::ConfirmDelete { user: cur }));
            }
            _ => self.submit(now, cmd, Purpose::User),
        }
    }

    fn submit(&mut self, now: Instant, cmd: Command, purpose: Purpose) {
        let text_len = match &cmd {
            Command::Post { text } | Command::Send { text, .. } => Some(text.len()),
            _ => None,
        };
        let register = match &cmd {
            Command::Register { user, password } => Some((user.clone(), password.clone())),
            _ => None,
        };
        let command = cmd.name();
        let user_before = self.client.user().map(str::to_string);
        if self.client.submit(now, cmd).is_err() {
            unreachable!("submitted only when ready, and never help or quit");
        }
        self.flight = Some(Flight {
            command,
            purpose,
            text_len,
            user_before,
            register,
            started: now,
            slow_said: false,
        });
    }

    fn show(&mut self, item: Item) {
        if item.is_failure() {
            self.failures += 1;
        }
        self.items.push_back(item);
    }

    fn learn_names(&mut self, e: &Event) {
        let mut names = self.names.lock().expect("names lock");
        match e {
            Event::Push(m) => {
                names.insert(m.author.clone());
            }
            Event::Done(d) => match d {
                Done::Subscribed { user } | Done::Unsubscribed { user } | Done::Sent { to: user, .. } => {
                    names.insert(user.clone());
                }
                Done::Messages(ms) => names.extend(ms.iter().map(|m| m.author.clone())),
                Done::Users(us) => names.extend(us.iter().cloned()),
                Done::Relations(rs) => names.extend(rs.iter().map(|r| r.user.clone())),
                Done::LoggedIn { user, .. } | Done::Me { user, .. } => {
                    names.insert(user.clone());
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn on_event(&mut self, e: Event) {
        self.learn_names(&e);
        let completes = matches!(
            e,
            Event::Done(_) | Event::Failed { .. } | Event::NoAnswer { .. } | Event::Refused { .. }
        ) || matches!(e, Event::VersionMismatch { .. });
        let flight = if completes { self.flight.take() } else { None };
        let Some(f) = flight else {
            self.show(Item::Event(e));
            return;
        };
        let gone = |e: &Event| {
            matches!(e, Event::Failed { error: ErrorCode::NotLoggedIn | ErrorCode::SessionExpired, .. })
        };
        match (f.purpose, e) {
            (Purpose::ExitLogout { user }, e) => {
                if matches!(e, Event::Done(Done::LoggedOut)) {
                    if self.interactive {
                        self.items.push_back(Item::LoggedOut { user: Some(user) });
                    }
                } else if !gone(&e) {
                    let why = match &e {
                        Event::Failed { error, .. } => error.to_string(),
                        Event::NoAnswer { server, .. } => format!("no answer from {server}"),
                        Event::Refused { server, .. } => format!("nothing listens at {server}"),
                        Event::VersionMismatch { server_version, .. } => {
                            format!("the server speaks protocol v{server_version}")
                        }
                        _ => "unexpected answer".into(),
                    };
                    self.items.push_back(Item::Notice(Notice::NotLoggedOut { user, why }));
                }
                self.finished = true;
            }
            (Purpose::SwitchLogout { from, then }, e) => {
                if matches!(e, Event::Done(Done::LoggedOut)) || gone(&e) {
                    self.items.push_back(Item::LoggedOut { user: Some(from) });
                    self.queue.push_front(Step::Run(then, Purpose::User));
                } else {
                    // The login waits for a logout that did not happen: neither is done.
                    self.fail(e, None);
                }
            }
            (Purpose::Names, _) => {}
            (_, Event::Done(Done::Registered { user })) => match (self.client.user(), f.register) {
                (None, Some((u, password))) if u == user => {
                    self.items.push_back(Item::Registered { user: user.clone(), still_as: None });
                    self.queue.push_front(Step::Run(Command::Login { user, password }, Purpose::AutoLogin));
                }
                (current, _) => {
                    let still_as = current.map(str::to_string);
                    self.items.push_back(Item::Registered { user, still_as });
                }
            },
            (_, e @ Event::Done(Done::LoggedIn { .. })) => {
                self.items.push_back(Item::Event(e));
                if self.interactive && !self.input_done {
                    self.queue.push_front(Step::Run(Command::Subscriptions, Purpose::Names));
                }
            }
            (_, Event::Done(Done::LoggedOut)) => {
                self.items.push_back(Item::LoggedOut { user: f.user_before })
            }
            (_, e @ Event::Done(_)) => self.items.push_back(Item::Event(e)),
            (_, e) => self.fail(e, f.text_len),
        }
    }

    fn fail(&mut self, e: Event, text_len: Option<usize>) {
        let fatal = matches!(e, Event::VersionMismatch { .. }) && !self.interactive;
        match e {
            Event::Failed { command, error } => self.show(Item::Failed { command, error, text_len }),
            e => self.show(Item::Event(e)),
        }
        if fatal {
            // A script cannot do anything useful with a daemon it cannot understand.
            self.queue.clear();
            self.finished = true;
        }
    }
}

#[cfg(test)]
mod tests;
