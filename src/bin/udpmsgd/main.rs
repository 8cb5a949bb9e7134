//! `udpmsgd`: the daemon. Parses arguments and configuration, sets up logging and storage, and
//! runs the event loop around the library's sans-IO `Server`.

mod event_loop;
mod workers;

use clap::Parser;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use udpmsg::config::{self, ServerConfig};

#[derive(Parser, Debug)]
#[command(name = "udpmsgd", version, about = "udpmsg daemon: messaging over UDP")]
struct Args {
    /// Configuration file. Without this flag `server.toml` in the working directory is used if
    /// it exists, and the built-in defaults otherwise.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`), e.g. 127.0.0.1:7070 or [::]:7070; port 0
    /// picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    let cfg = match load_config(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("udpmsgd: {e}");
            return ExitCode::from(2);
        }
    };
    match event_loop::run(cfg, &mut |addr| {
        // The one line scripts and tests wait for.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("udpmsgd: {e}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> Result<ServerConfig, config::ConfigError> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("server.toml"), false),
    };
    let mut cfg: ServerConfig = config::load(&path, explicit)?;
    if let Some(listen) = args.listen {
        cfg.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        cfg.data_dir = dir.clone();
    }
    cfg.validate().map_err(|e| config::ConfigError(format!("{}: {e}", path.display())))?;
    Ok(cfg)
}
