//! The `mailgate` command line (DESIGN.md, "CLI").

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mailgate::config::Config;
use mailgate::gate::verdict::Reason;
use mailgate::job::JobState;
use tracing_subscriber::EnvFilter;

use cli::backend::Backend;

#[derive(Debug, Parser)]
#[command(name = "mailgate", version, about = "Incoming-mail gate: SMTP/LMTP in, jobs out")]
struct Args {
    /// Config file (TOML). Without it: the embedded defaults.
    #[arg(long, global = true, env = "MAILGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: listeners, spool and HTTP API.
    Serve,
    /// Check the config, the spool directory and the listen addresses; exit 1 on errors.
    Check,
    /// Show which mailbox, key and route an address maps to (JSON); exit 1 when refused.
    Route {
        /// The recipient address, e.g. incoming+KEY@incoming.example.com.
        address: String,
    },
    /// Inspect and drive the job queue (through the running server's HTTP API, or the spool).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Show the reject log.
    Rejects {
        /// Only entries since then: a duration (1h, 30m, 2d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN", value_parser = cli::rejects::parse_since)]
        since: Option<String>,
        /// Only entries with this reason id (e.g. unknown_key, spf_fail).
        #[arg(long, value_name = "ID", value_parser = cli::rejects::parse_reason)]
        reason: Option<Reason>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Keep polling for new entries (every second) until killed; without --since, only
        /// new entries are shown.
        #[arg(long)]
        follow: bool,
    },
    /// Print the Postfix main.cf/master.cf settings for this config: mode A (lmtp: LMTP
    /// transport + RCPT policy service) or mode B (proxy: before-queue smtpd_proxy_filter).
    PostfixConfig {
        /// lmtp (mode A) or proxy (mode B).
        #[arg(long, value_enum)]
        mode: cli::postfix::Mode,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// List jobs, oldest first.
    List {
        #[arg(long, value_name = "STATE", value_parser = parse_state)]
        state: Option<JobState>,
        /// At most this many jobs (0, the default: all of them).
        #[arg(long, value_name = "N", default_value_t = 0,
              value_parser = clap::value_parser!(u64).range(0..=mailgate::http::MAX_LIMIT as u64))]
        limit: u64,
        /// A JSON array of jobs.
        #[arg(long)]
        json: bool,
    },
    /// Show a job (JSON), or with --raw the message itself.
    Show {
        id: String,
        #[arg(long)]
        raw: bool,
    },
    /// Lease the oldest ready job and print it; exit 3 when none is ready.
    Pop {
        /// Lease length: the job goes back to ready unless acked in time.
        #[arg(long, value_name = "SECONDS", default_value_t = mailgate::http::DEFAULT_LEASE_SECS,
              value_parser = clap::value_parser!(u64).range(1..=mailgate::http::MAX_LEASE_SECS))]
        lease: u64,
        /// Only jobs of this mailbox.
        #[arg(long, value_name = "NAME")]
        mailbox: Option<String>,
    },
    /// Mark a leased job done.
    Ack { id: String },
    /// Put a leased job back to ready.
    Nack { id: String },
    /// Put a dead job back to ready (its attempts start again); `--all`: every dead job.
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead job (of `--mailbox`); prints {"retried": N}.
        #[arg(long)]
        all: bool,
        /// With --all: only dead jobs of this mailbox.
        #[arg(long, value_name = "NAME", requires = "all")]
        mailbox: Option<String>,
    },
    /// Job counts per state.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

fn parse_state(s: &str) -> Result<JobState, String> {
    s.parse()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) if cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let path = args.config.as_deref();
    match args.command {
        Command::Serve => serve(path).await,
        Command::Check => cli::check::run(path).await,
        Command::Route { address } => cli::route::run(&cli::load_config(path)?, &address),
        Command::Queue { command } => queue(&cli::load_config(path)?, command).await,
        Command::Rejects { since, reason, json, follow } => {
            let options = cli::rejects::Options { since, reason, json, follow };
            cli::rejects::run(&cli::load_config(path)?, &options).await
        }
        Command::PostfixConfig { mode } => cli::postfix::run(&cli::load_config(path)?, mode, path),
    }
}

async fn serve(path: Option<&Path>) -> Result<ExitCode> {
    let config = cli::load_config(path)?;
    init_tracing(&config)?;
    mailgate::server::serve(config).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Tracing to stderr; filter from `MAILGATE_LOG` (RUST_LOG syntax, default `info`); JSON lines
/// when `[server] log_format = "json"`.
fn init_tracing(config: &Config) -> Result<()> {
    let filter = match std::env::var("MAILGATE_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(&spec).with_context(|| format!("MAILGATE_LOG={spec:?} is not a valid filter"))?
        }
        _ => EnvFilter::new("info"),
    };
    // Colours only on a terminal: in a log file escape codes would break the reject log's
    // one-JSON-object-per-line output.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = if config.server.log_format == "json" { builder.json().try_init() } else { builder.try_init() };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

async fn queue(config: &Config, command: QueueCommand) -> Result<ExitCode> {
    let backend = Backend::connect(config).await?;
    let result = match command {
        QueueCommand::List { state, limit, json } => {
            cli::queue::list(&backend, state, usize::try_from(limit).unwrap_or(usize::MAX), json).await
        }
        QueueCommand::Show { id, raw } => cli::queue::show(&backend, &id, raw).await,
        QueueCommand::Pop { lease, mailbox } => cli::queue::pop(&backend, mailbox.as_deref(), lease).await,
        QueueCommand::Ack { id } => cli::queue::transition(&backend, &id, "ack").await,
        QueueCommand::Nack { id } => cli::queue::transition(&backend, &id, "nack").await,
        QueueCommand::Retry { id: Some(id), .. } => cli::queue::transition(&backend, &id, "retry").await,
        QueueCommand::Retry { id: None, mailbox, .. } => cli::queue::retry_all(&backend, mailbox.as_deref()).await,
        QueueCommand::Stats { json } => cli::queue::stats(&backend, json).await,
    };
    let closed = backend.close().await;
    let code = result?;
    closed?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn config_is_global() {
        let a = Args::try_parse_from(["mailgate", "queue", "list", "--config", "x.toml", "--state", "dead"]).unwrap();
        assert_eq!(a.config.as_deref(), Some(Path::new("x.toml")));
        let a = Args::try_parse_from(["mailgate", "--config", "y.toml", "route", "a@b"]).unwrap();
        assert_eq!(a.config.as_deref(), Some(Path::new("y.toml")));
        assert!(Args::try_parse_from(["mailgate", "queue", "list", "--state", "lost"]).is_err());
        assert!(Args::try_parse_from(["mailgate", "rejects", "--reason", "nope"]).is_err());
        assert!(Args::try_parse_from(["mailgate", "rejects", "--since", "soon"]).is_err());
        assert!(Args::try_parse_from(["mailgate", "queue", "pop", "--lease", "0"]).is_err());
        let a = Args::try_parse_from(["mailgate", "rejects", "--since", "2h", "--reason", "spf_fail", "--follow"]);
        assert!(a.is_ok());
        let a = Args::try_parse_from(["mailgate", "postfix-config", "--mode", "proxy", "--config", "z.toml"]).unwrap();
        assert!(matches!(a.command, Command::PostfixConfig { mode: cli::postfix::Mode::Proxy }));
        assert!(Args::try_parse_from(["mailgate", "postfix-config"]).is_err());
        assert!(Args::try_parse_from(["mailgate", "postfix-config", "--mode", "milter"]).is_err());
    }
}
