//! `udpmsgd`: the daemon. Parses arguments and configuration, sets up logging and storage, and
//! runs the event loop around the library's sans-IO `Server`; also the admin commands
//! (`udpmsgd user ...`, `udpmsgd config ...`).

mod admin;
mod event_loop;
mod listener;
mod metrics;
mod store_thread;
mod workers;

use clap::{Parser, Subcommand};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use udpmsg::config::{self, Layered};

#[derive(Parser, Debug)]
#[command(name = "udpmsgd", version, about = "udpmsg daemon: messaging over UDP", after_help = AFTER_HELP)]
struct Args {
    /// Configuration file (or UDPMSG_CONFIG). Without either, `server.toml` in the working
    /// directory is used if it exists, and the built-in defaults otherwise.
    #[arg(long, value_name = "PATH", global = true, env = "UDPMSG_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`): HOST[:PORT], e.g. 127.0.0.1:7070, [::]:7070 or
    /// localhost (a name is resolved, IPv4 first; the port defaults to 7070; 0 picks a free one).
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<String>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

const AFTER_HELP: &str = "Settings come from the command line, then UDPMSG_* environment variables \
(UDPMSG_LISTEN, UDPMSG_MAX_TEXT_BYTES, ...: the key in upper case), then the file, then the \
built-in defaults. `udpmsgd config print` shows the result. SIGHUP reloads limits, timers and the \
log level.";

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Manage accounts in the data directory, whether the daemon runs or not.
    User {
        #[command(subcommand)]
        action: UserCmd,
    },
    /// List the daemons sharing the PostgreSQL database: their sessions, last heartbeat and
    /// whether they are live.
    Nodes,
    /// Show or check the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Create an account; the password is read without echo (or from stdin when it is not a
    /// terminal).
    Add { name: String },
    /// Set a new password; every session of the user ends.
    Passwd { name: String },
    /// Delete an account, as `delete#PASSWORD` does.
    Del { name: String },
    /// List the accounts.
    List,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the effective configuration, each key with where its value came from.
    Print,
    /// Validate the configuration (file, environment, flags); exit 0 if it is valid.
    Check,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let layered = match load_config(&args) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("udpmsgd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&layered.config.log_level);
    for var in &layered.ignored_env {
        match config::env_meant(var) {
            Some(meant) => {
                log::warn!("ignoring environment variable {var}: no such setting (did you mean {meant}?)")
            }
            None => log::warn!("ignoring environment variable {var}: udpmsgd has no such setting"),
        }
    }
    match &args.command {
        Some(Cmd::Config { action: ConfigCmd::Print }) => {
            print!("{}", layered.render());
            ExitCode::SUCCESS
        }
        Some(Cmd::Config { action: ConfigCmd::Check }) => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Some(Cmd::Nodes) => match admin::nodes(&layered.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("udpmsgd: {e}");
                ExitCode::from(1)
            }
        },
        Some(Cmd::User { action }) => {
            let result = match action {
                UserCmd::Add { name } => admin::add(&layered.config, name),
                UserCmd::Passwd { name } => admin::passwd(&layered.config, name),
                UserCmd::Del { name } => admin::del(&layered.config, name),
                UserCmd::List => admin::list(&layered.config),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("udpmsgd: {e}");
                    ExitCode::from(1)
                }
            }
        }
        None => serve(args, layered),
    }
}

fn serve(args: Args, layered: Layered) -> ExitCode {
    let reload: event_loop::Reload = Box::new(move || {
        let l = load_config(&args).map_err(|e| e.to_string())?;
        set_log_level(&l.config.log_level);
        Ok(l.config)
    });
    match event_loop::run(layered.config, reload, &mut |addr| {
        // The one line scripts and tests wait for.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: the log goes to stderr too.
            eprintln!("udpmsgd: {e}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> Result<Layered, config::ConfigError> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("server.toml"), false),
    };
    let mut cli = toml::Table::new();
    if let Some(listen) = &args.listen {
        cli.insert("listen".into(), toml::Value::String(listen.clone()));
    }
    if let Some(dir) = &args.data_dir {
        cli.insert("data_dir".into(), toml::Value::String(dir.to_string_lossy().into_owned()));
    }
    config::layered_server(&path, explicit, std::env::vars(), cli, &resolve)
}

/// The address to listen on for a name: its first IPv4 address if it has one (the clients'
/// default, 127.0.0.1, is one), else its first.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(|e| e.to_string())?.collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| "no address".to_string())
}

/// `RUST_LOG`, when set, decides; otherwise the `log_level` setting does (and SIGHUP can
/// change it).
fn init_logging(level: &str) {
    let mut b = env_logger::Builder::new();
    b.format_timestamp_millis();
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => {
            b.parse_filters(&spec);
            b.init();
        }
        _ => {
            b.filter_level(log::LevelFilter::Trace);
            b.init();
            set_log_level(level);
        }
    }
}

fn set_log_level(level: &str) {
    if std::env::var("RUST_LOG").is_ok_and(|s| !s.is_empty()) {
        return;
    }
    if let Ok(l) = level.parse::<log::LevelFilter>() {
        log::set_max_level(l);
    }
}
