//! `udpmsg`: the client. An interactive REPL on a terminal, or a script runner when stdin is not
//! a terminal, with `--script FILE`, or with commands given as arguments.
//!
//! - `driver.rs`: what to do with the lines (sans-IO, unit-tested): one command at a time, the
//!   logout on leaving, logins and registrations, confirmations, Ctrl-C.
//! - `repl.rs`: the line editor thread (rustyline): paste, completion, history, Ctrl-C.
//! - `net.rs`: the UDP socket, connected so that "connection refused" is seen at once.
//! - `output.rs`: how everything looks, as text or as JSON lines.
//!
//! Threads: the main thread runs the mio loop around the driver; one input thread reads lines
//! (the REPL, or plain lines of a script) and another turns signals into input, both handing
//! over through a channel and the loop's `Waker`. On a terminal, output goes through rustyline's
//! external printer so that a pushed message appears above the prompt without disturbing what
//! is being typed.

mod driver;
mod net;
mod output;
mod repl;

use clap::Parser;
use driver::{Driver, Item};
use mio::{Events, Poll, Token, Waker};
use output::Stream;
use rand::RngExt;
use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use udpmsg::client::Client;
use udpmsg::config::{self, ClientConfig};

#[derive(Parser, Debug)]
#[command(name = "udpmsg", version, about = "udpmsg client", after_help = AFTER_HELP)]
struct Args {
    /// Configuration file. Without this flag `client.toml` in the working directory is used if
    /// it exists, and the built-in defaults otherwise.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The daemon's address (overrides `server` and `servers` in the config): HOST[:PORT], a
    /// name or an IP address; the port defaults to 7070. Repeat it for several daemons sharing
    /// one database: when one stops answering, the client moves to the next with its session.
    #[arg(long, value_name = "ADDR")]
    server: Vec<String>,
    /// Run the commands in FILE, one per line, instead of reading stdin.
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,
    /// Print one JSON object per line for every reply, error and message.
    #[arg(long)]
    json: bool,
    /// Leave the session open on the daemon when leaving (it ends when it idles out); by
    /// default the client logs out first.
    #[arg(long)]
    keep_session: bool,
    /// Commands to run, e.g. `udpmsg ping` or `udpmsg 'login#alice&secret' 'retrieve#5'`.
    #[arg(value_name = "COMMAND")]
    commands: Vec<String>,
}

const AFTER_HELP: &str = "Commands use the syntax command#arg&arg; type `help` in the REPL for the list.\n\
Exit status in script mode: 0 if every command succeeded, 1 otherwise, 2 for a bad configuration, \
130 when interrupted. The REPL exits 0 when left with quit, exit or Ctrl-D.";

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

/// What the input and signal threads hand to the loop.
pub enum Input {
    Line(String),
    /// Input ended (EOF, Ctrl-D) or `quit`.
    End,
    /// Ctrl-C in the REPL, or SIGINT.
    Interrupt {
        line_was_empty: bool,
    },
    /// SIGTERM or SIGHUP.
    Terminate,
    /// The REPL's printer, for output above the prompt.
    Printer(Box<dyn rustyline::ExternalPrinter + Send>),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let cfg = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("udpmsg: {e}");
            return ExitCode::from(2);
        }
    };
    let interactive = args.script.is_none() && args.commands.is_empty() && std::io::stdin().is_terminal();
    let _terminal = interactive.then(TerminalGuard::new);
    match run(cfg, &args, interactive) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("udpmsg: {e}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> Result<ClientConfig, config::ConfigError> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("client.toml"), false),
    };
    let mut cfg: ClientConfig = config::load(&path, explicit)?;
    cfg.validate().map_err(|e| config::ConfigError(format!("{}: {e}", path.display())))?;
    for server in &args.server {
        config::split_host_port(server).map_err(|e| config::ConfigError(format!("--server: {e}")))?;
    }
    if !args.server.is_empty() {
        cfg.server = args.server[0].clone();
        cfg.servers = if args.server.len() > 1 { args.server.clone() } else { Vec::new() };
    }
    Ok(cfg)
}

/// Every address of every server, in order, each once.
fn resolve_all(cfg: &ClientConfig) -> Result<Vec<SocketAddr>, String> {
    let mut all = Vec::new();
    for server in cfg.server_list() {
        for a in resolve(&server)? {
            if !all.contains(&a) {
                all.push(a);
            }
        }
    }
    Ok(all)
}

/// The addresses of `server`, in the resolver's order.
fn resolve(server: &str) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let (host, port) = config::split_host_port(server)?;
    let addrs: Vec<SocketAddr> =
        (host.as_str(), port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    if addrs.is_empty() {
        return Err(format!("cannot resolve {host}: no address"));
    }
    Ok(addrs)
}

/// Puts the terminal back as it was, should the client leave while the line editor has it in raw
/// mode (a signal, a fatal error): the shell must not inherit a terminal without echo.
struct TerminalGuard(Option<nix::sys::termios::Termios>);

impl TerminalGuard {
    fn new() -> Self {
        TerminalGuard(nix::sys::termios::tcgetattr(std::io::stdin()).ok())
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSADRAIN, t);
            // Bracketed paste off, as rustyline leaves it.
            let mut out = std::io::stdout();
            let _ = out.write_all(b"\x1b[?2004l");
            let _ = out.flush();
        }
    }
}

/// Where output goes.
struct Out {
    json: bool,
    interactive: bool,
    printer: Option<Box<dyn rustyline::ExternalPrinter + Send>>,
    /// For local message times (TZ, else /etc/localtime; UTC if neither can be read).
    tz: jiff::tz::TimeZone,
}

impl Out {
    fn line(&mut self, text: &str, stream: Stream) {
        if let Some(p) = &mut self.printer {
            let _ = p.print(format!("{text}\n"));
        } else if stream != Stream::Out && !self.json && !self.interactive {
            eprintln!("{text}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }

    fn item(&mut self, item: &Item) {
        if self.json {
            self.line(&output::json(item).to_string(), Stream::Out);
        } else {
            let r = output::human(item, &output::Clock::system(&self.tz));
            self.line(&r.text, r.stream);
        }
    }
}

fn run(cfg: ClientConfig, args: &Args, interactive: bool) -> Result<ExitCode, String> {
    let addrs = resolve_all(&cfg)?;
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut link = net::Link::open(addrs[0], poll.registry(), SOCKET)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?);
    let names: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let tz = jiff::tz::TimeZone::try_system().unwrap_or_else(|e| {
        log::warn!("cannot tell the local time zone ({e}): message times are shown in UTC");
        jiff::tz::TimeZone::UTC
    });
    let mut out = Out { json: args.json, interactive, printer: None, tz };
    if interactive && !args.json {
        out.line(
            &format!(
                "udpmsg {}: type help for the commands; quit or Ctrl-D leaves",
                env!("CARGO_PKG_VERSION")
            ),
            Stream::Out,
        );
    }

    let (tx, rx) = mpsc::channel();
    // The loop keeps its own reference: if the input thread's were the last one, the thread
    // would close the eventfd right after its final wake-up, and epoll would drop that event.
    spawn_signals(tx.clone(), waker.clone(), interactive)?;
    spawn_input(args, interactive, tx, waker.clone(), names.clone())?;

    let now = Instant::now();
    let first_id = rand::rng().random_range(1..u64::from(u32::MAX));
    // Several daemons (several servers given, or a name with several addresses of one family):
    // the client moves between them when one stops answering. Otherwise a name's other
    // addresses (localhost: ::1 and 127.0.0.1) are tried only until one does not refuse.
    let several = cfg.server_list().len() > 1
        || addrs.iter().filter(|a| a.is_ipv4()).count() > 1
        || addrs.iter().filter(|a| a.is_ipv6()).count() > 1;
    let mut client = Client::new(cfg, link.addr, first_id, now);
    if several {
        client.set_servers(addrs.clone());
    }
    let mut next_addr = 1;
    let mut driver = Driver::new(client, interactive, args.keep_session, names);
    if interactive {
        // Say whether the daemon answers, rather than assume it.
        driver.client_mut().watch_contact(now);
    }
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; 2048];
    let mut again = false;
    while !driver.finished() {
        let timeout = if again {
            Some(Duration::ZERO)
        } else {
            driver.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()))
        };
        again = false;
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed: {e}"));
        }
        let now = Instant::now();
        let mut refused = false;
        if events.iter().any(|e| e.token() == SOCKET && e.is_writable()) {
            refused |= !link.flush();
        }
        loop {
            match link.recv(&mut buf) {
                net::Recv::Datagram(n) => driver.handle(now, link.addr, &buf[..n]),
                net::Recv::Empty => break,
                net::Recv::Refused => refused = true,
            }
        }
        take_input(&rx, &mut driver, &mut out, now);
        driver.handle_timeout(now);
        driver.step(now);
        // The client moved to another server (it stopped answering): talk to that one.
        if driver.client().server() != link.addr {
            let next = net::Link::open(driver.client().server(), poll.registry(), SOCKET)?;
            std::mem::replace(&mut link, next).close(poll.registry());
        }
        while let Some(bytes) = driver.poll_transmit() {
            refused |= !link.send(bytes);
        }
        if refused {
            if several && driver.client_mut().fail_over(now) {
                // Nothing listens there: the next daemon, if the request in flight has one
                // left to try.
                log::debug!("{} refused; trying {}", link.addr, driver.client().server());
                let next = net::Link::open(driver.client().server(), poll.registry(), SOCKET)?;
                std::mem::replace(&mut link, next).close(poll.registry());
            } else if !several && !driver.client().has_had_contact() && next_addr < addrs.len() {
                // Another address of the same name may be the one the daemon listens on
                // (localhost: ::1 and 127.0.0.1).
                log::debug!("{} refused; trying {}", link.addr, addrs[next_addr]);
                let next = net::Link::open(addrs[next_addr], poll.registry(), SOCKET)?;
                std::mem::replace(&mut link, next).close(poll.registry());
                next_addr += 1;
                driver.client_mut().set_server(now, link.addr);
            } else {
                driver.refused(now);
            }
            again = true;
        }
        while let Some(item) = driver.poll_item() {
            out.item(&item);
        }
    }
    link.flush();
    // The exit status reports on a script's commands; a REPL left normally exits 0.
    Ok(if driver.interrupted() {
        ExitCode::from(130)
    } else if driver.failures() == 0 || interactive {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Hands what the threads sent to the driver.
fn take_input(rx: &Receiver<Input>, driver: &mut Driver, out: &mut Out, now: Instant) {
    loop {
        match rx.try_recv() {
            Ok(Input::Line(l)) => driver.line(l),
            Ok(Input::End) => driver.input_ended(),
            Ok(Input::Interrupt { line_was_empty }) => driver.interrupt(now, line_was_empty),
            Ok(Input::Terminate) => driver.terminate(now),
            Ok(Input::Printer(p)) => out.printer = Some(p),
            Err(mpsc::TryRecvError::Empty) => return,
            Err(mpsc::TryRecvError::Disconnected) => {
                driver.input_ended();
                return;
            }
        }
    }
}

/// SIGINT is Ctrl-C: a script gets the signal; the REPL sees the key itself while it edits a
/// line, and gets the signal when Ctrl-C comes between two lines (the terminal is not in raw
/// mode then), when nothing is being edited. SIGTERM and SIGHUP (the terminal went away) make
/// the client log out and leave.
fn spawn_signals(tx: Sender<Input>, waker: Arc<Waker>, interactive: bool) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let input = if sig == SIGINT {
                    Input::Interrupt { line_was_empty: interactive }
                } else {
                    Input::Terminate
                };
                if tx.send(input).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn spawn_input(
    args: &Args,
    interactive: bool,
    tx: Sender<Input>,
    waker: Arc<Waker>,
    names: Arc<Mutex<BTreeSet<String>>>,
) -> Result<(), String> {
    let send = move |i: Input| {
        let ok = tx.send(i).is_ok();
        let _ = waker.wake();
        ok
    };
    if !args.commands.is_empty() {
        for c in &args.commands {
            send(Input::Line(c.clone()));
        }
        send(Input::End);
        return Ok(());
    }
    if interactive {
        return std::thread::Builder::new()
            .name("repl".into())
            .spawn(move || repl::run(send, names))
            .map(|_| ())
            .map_err(|e| e.to_string());
    }
    let reader: Box<dyn BufRead + Send> = match &args.script {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    std::thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            let mut reader = reader;
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        // A line that is not UTF-8 becomes an unknown command, reported as such.
                        let text = String::from_utf8_lossy(&line).into_owned();
                        if !send(Input::Line(text)) {
                            return;
                        }
                    }
                }
            }
            send(Input::End);
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}
