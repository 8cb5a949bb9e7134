//! `udpmsg`: the client. An interactive REPL on a terminal, or a script runner when stdin is not
//! a terminal, with `--script FILE`, or with commands given as arguments.
//!
//! Threads: the main thread runs the mio loop around the library's sans-IO `Client`; one input
//! thread reads lines (rustyline on a terminal, plain lines otherwise) and hands them over through
//! a channel and the loop's `Waker`. On a terminal, output goes through rustyline's external
//! printer so a pushed message appears above the prompt without disturbing what is being typed.

#[path = "../common/udp.rs"]
mod udp;

mod output;

use clap::Parser;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::RngExt;
use std::collections::VecDeque;
use std::io::{BufRead, IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;
use udpmsg::client::{Client, Event};
use udpmsg::command::{self, Command};
use udpmsg::config::{self, ClientConfig};

#[derive(Parser, Debug)]
#[command(name = "udpmsg", version, about = "udpmsg client", after_help = AFTER_HELP)]
struct Args {
    /// Configuration file. Without this flag `client.toml` in the working directory is used if
    /// it exists, and the built-in defaults otherwise.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The daemon's address (overrides `server` in the config): HOST[:PORT], a name or an IP
    /// address; the port defaults to 7070.
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
    /// Run the commands in FILE, one per line, instead of reading stdin.
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,
    /// Print one JSON object per line for every reply, error and message.
    #[arg(long)]
    json: bool,
    /// Commands to run, e.g. `udpmsg ping` or `udpmsg 'login#alice&secret' 'retrieve#5'`.
    #[arg(value_name = "COMMAND")]
    commands: Vec<String>,
}

const AFTER_HELP: &str = "Commands use the syntax command#arg&arg; type `help` in the REPL for the list.\n\
Exit status in script mode: 0 if every command succeeded, 1 otherwise, 2 for a bad configuration.";

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

/// What the input thread hands to the loop.
enum Input {
    Line(String),
    /// Input ended (EOF, Ctrl-D) or `quit`.
    End,
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
    if let Some(server) = &args.server {
        config::split_host_port(server).map_err(|e| config::ConfigError(format!("--server: {e}")))?;
        cfg.server = server.clone();
    }
    Ok(cfg)
}

/// Where output goes.
struct Out {
    json: bool,
    interactive: bool,
    printer: Option<Box<dyn rustyline::ExternalPrinter + Send>>,
}

impl Out {
    fn line(&mut self, text: &str, failure: bool) {
        if let Some(p) = &mut self.printer {
            let _ = p.print(format!("{text}\n"));
        } else if failure && !self.json && !self.interactive {
            eprintln!("{text}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }

    fn event(&mut self, e: &Event) {
        if self.json {
            self.line(&output::json(e).to_string(), false);
        } else {
            let r = output::human(e);
            self.line(&r.text, r.failure);
        }
    }

    fn usage(&mut self, e: &command::ParseError) {
        if self.json {
            self.line(&output::parse_error_json(e).to_string(), true);
        } else {
            self.line(&output::parse_error(e), true);
        }
    }
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

fn run(cfg: ClientConfig, args: &Args, interactive: bool) -> Result<ExitCode, String> {
    let server = resolve(&cfg.server)?[0];
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut socket = UdpSocket::bind(bind).map_err(|e| format!("cannot bind a UDP socket: {e}"))?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)
        .map_err(|e| e.to_string())?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| e.to_string())?);

    let (tx, rx) = mpsc::channel();
    // The loop keeps its own reference: if the input thread's were the last one, the thread
    // would close the eventfd right after its final wake-up, and epoll would drop that event.
    spawn_input(args, interactive, tx, waker.clone())?;

    let first_id = rand::rng().random_range(1..u64::from(u32::MAX));
    let mut client = Client::new(cfg, server, first_id, Instant::now());
    let mut out = Out { json: args.json, interactive, printer: None };
    let mut outbox = udp::Outbox::new(1024);
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; 2048];
    let mut queue: VecDeque<String> = VecDeque::new();
    let mut input_done = false;
    let mut failures = 0u32;
    if interactive {
        out.line(&format!("udpmsg: talking to {server}; type help for commands"), false);
    }

    loop {
        // Leave once the input is done and nothing is outstanding.
        if input_done && queue.is_empty() && client.is_ready() {
            break;
        }
        let timeout = client.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed: {e}"));
        }
        let now = Instant::now();
        for event in events.iter() {
            if event.token() == SOCKET && event.is_writable() {
                outbox.flush(&socket);
            }
        }
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => client.handle(now, from, &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("recv: {e}");
                    break;
                }
            }
        }
        input_done |= take_input(&rx, &mut queue, &mut out);
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        // Show what happened before starting the next command, so output keeps input order.
        while let Some(e) = client.poll_event() {
            if matches!(e, Event::Failed { .. } | Event::NoAnswer { .. } | Event::VersionMismatch { .. }) {
                failures += 1;
            }
            out.event(&e);
            if matches!(e, Event::VersionMismatch { .. }) && !interactive {
                return Ok(ExitCode::from(1));
            }
        }
        // Start queued commands while the client is ready for them.
        while client.is_ready() {
            let Some(line) = queue.pop_front() else { break };
            match command::parse(&line) {
                Ok(None) => {}
                Ok(Some(Command::Help)) => out.line(command::help().trim_end(), false),
                Ok(Some(Command::Quit)) => {
                    queue.clear();
                    input_done = true;
                }
                Ok(Some(cmd)) => {
                    if client.submit(now, cmd).is_err() {
                        unreachable!("submitted only when ready");
                    }
                }
                Err(usage) => {
                    failures += 1;
                    out.usage(&usage);
                }
            }
        }
        while let Some(bytes) = client.poll_transmit() {
            outbox.send(&socket, server, bytes);
        }
    }
    outbox.flush(&socket);
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Moves what the input thread sent into the queue; true once input has ended.
fn take_input(rx: &Receiver<Input>, queue: &mut VecDeque<String>, out: &mut Out) -> bool {
    let mut ended = false;
    loop {
        match rx.try_recv() {
            Ok(Input::Line(l)) => queue.push_back(l),
            Ok(Input::End) => ended = true,
            Ok(Input::Printer(p)) => out.printer = Some(p),
            Err(mpsc::TryRecvError::Empty) => return ended,
            Err(mpsc::TryRecvError::Disconnected) => return true,
        }
    }
}

fn spawn_input(args: &Args, interactive: bool, tx: Sender<Input>, waker: Arc<Waker>) -> Result<(), String> {
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
            .spawn(move || repl(send))
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

fn repl(send: impl Fn(Input) -> bool) {
    let mut rl = match rustyline::DefaultEditor::new() {
        Ok(rl) => rl,
        Err(e) => {
            eprintln!("udpmsg: cannot start line editor: {e}");
            send(Input::End);
            return;
        }
    };
    if let Ok(p) = rl.create_external_printer() {
        send(Input::Printer(Box::new(p)));
    }
    // Ctrl-D or Ctrl-C (an error from readline) leaves.
    while let Ok(line) = rl.readline("> ") {
        // Lines with passwords never enter the history.
        if !command::is_sensitive(&line) && !line.trim().is_empty() {
            let _ = rl.add_history_entry(line.as_str());
        }
        let quit = matches!(command::parse(&line), Ok(Some(Command::Quit)));
        if !send(Input::Line(line)) || quit {
            break;
        }
    }
    send(Input::End);
}
