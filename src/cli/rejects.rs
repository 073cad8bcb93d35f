//! `mailgate rejects [--since 1h] [--reason ID] [--json] [--follow]`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow};
use mailgate::config::Config;
use mailgate::gate::verdict::Reason;
use mailgate::reject::{Action, RejectEntry, Stage};
use mailgate::spool::RejectQuery;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::backend::Backend;
use super::{clean, or_dash};

/// Entries fetched per request.
const PAGE: usize = 1000;
/// How often `--follow` asks for new entries.
const POLL: Duration = Duration::from_secs(1);

pub struct Options {
    /// `1h`, `30m`, `2d` or RFC 3339 (already validated).
    pub since: Option<String>,
    pub reason: Option<Reason>,
    pub json: bool,
    pub follow: bool,
}

/// For clap: `--reason` must be a known reason id.
pub fn parse_reason(s: &str) -> Result<Reason, String> {
    s.parse::<Reason>().map_err(|e| format!("{e}; known: {}", Reason::ALL.map(Reason::as_str).join(", ")))
}

/// For clap: `--since` is a duration or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<String, String> {
    mailgate::http::parse_since(s, OffsetDateTime::now_utc()).map(|_| s.to_string())
}

pub async fn run(config: &Config, opts: &Options) -> Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    let since = match &opts.since {
        Some(s) => Some(mailgate::http::parse_since(s, now).map_err(|e| anyhow!(e))?),
        // Following without --since: only what arrives from now on (like `tail -f` of an empty
        // file) instead of the whole history.
        None if opts.follow => Some(now),
        None => None,
    };
    let mut query = RejectQuery { since, reason: opts.reason, after: None, limit: PAGE };
    if !opts.follow {
        let backend = Backend::connect(config).await?;
        let result = drain(&backend, &mut query, opts.json).await;
        let closed = backend.close().await;
        result?;
        closed?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut last_problem = String::new();
    loop {
        // Connect afresh for every poll: a spool opened directly must not stay locked, or a
        // server started meanwhile could not open it (and then we find it through HTTP).
        // Problems (a server restarting) are reported once and retried.
        let result = match Backend::connect(config).await {
            Ok(backend) => {
                let result = drain(&backend, &mut query, opts.json).await;
                let closed = backend.close().await;
                result.and(closed)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => last_problem.clear(),
            Err(e) if super::is_broken_pipe(&e) => return Err(e),
            Err(e) => {
                let problem = format!("{e:#}");
                if problem != last_problem {
                    eprintln!("mailgate: {problem} (retrying)");
                    last_problem = problem;
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Prints every entry after the query's cursor, page by page, and moves the cursor on.
async fn drain(backend: &Backend, query: &mut RejectQuery, json: bool) -> Result<()> {
    loop {
        let page = backend.rejects(query).await?;
        {
            let mut out = std::io::stdout().lock();
            for record in &page {
                let line = if json { record.entry.to_json_line() } else { human_line(&record.entry) };
                writeln!(out, "{line}")?;
            }
            out.flush()?;
        }
        let Some(last) = page.last() else {
            return Ok(());
        };
        query.after = Some(last.cursor.clone());
        if page.len() < query.limit {
            return Ok(());
        }
    }
}

/// at, stage, action, code enhanced, reason, client_ip, mail_from, rcpt_to, text.
fn human_line(e: &RejectEntry) -> String {
    let at = e.at.format(&Rfc3339).unwrap_or_else(|_| e.at.to_string());
    let code = if e.enhanced.is_empty() { e.code.to_string() } else { format!("{} {}", e.code, clean(&e.enhanced)) };
    let mail_from = if e.mail_from.is_empty() { "<>".to_string() } else { clean(&e.mail_from) };
    let rcpt = if e.rcpt_to.is_empty() { "-".to_string() } else { clean(&e.rcpt_to.join(",")) };
    [
        at,
        stage_str(e.stage).to_string(),
        action_str(e.action).to_string(),
        code,
        e.reason.as_str().to_string(),
        or_dash(&e.client_ip),
        mail_from,
        rcpt,
        if e.suppressed > 0 {
            format!("{} (and {} more not logged)", clean(&e.text), e.suppressed)
        } else {
            clean(&e.text)
        },
    ]
    .join("  ")
}

fn stage_str(s: Stage) -> &'static str {
    match s {
        Stage::Connect => "connect",
        Stage::Helo => "helo",
        Stage::Mail => "mail",
        Stage::Rcpt => "rcpt",
        Stage::Data => "data",
    }
}

fn action_str(a: Action) -> &'static str {
    match a {
        Action::Reject => "reject",
        Action::Tempfail => "tempfail",
        Action::Discard => "discard",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_line_is_one_line() {
        let e = RejectEntry {
            at: OffsetDateTime::UNIX_EPOCH,
            stage: Stage::Rcpt,
            action: Action::Reject,
            code: 550,
            enhanced: "5.1.1".into(),
            reason: Reason::UnknownKey,
            text: "unknown key\r\nforged".into(),
            client_ip: "192.0.2.1".into(),
            helo: "h".into(),
            mail_from: String::new(),
            rcpt_to: vec!["a@x".into(), "b@x".into()],
            message_id: String::new(),
            subject: String::new(),
            listener: "smtp".into(),
            suppressed: 0,
        };
        assert_eq!(
            human_line(&e),
            "1970-01-01T00:00:00Z  rcpt  reject  550 5.1.1  unknown_key  192.0.2.1  <>  a@x,b@x  unknown key\\r\\nforged"
        );
        let e = RejectEntry { suppressed: 41, ..e };
        assert!(human_line(&e).ends_with("forged (and 41 more not logged)"), "{}", human_line(&e));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["suppressed"], 41);
        let e = RejectEntry { suppressed: 0, ..e };
        assert!(serde_json::to_value(&e).unwrap().get("suppressed").is_none(), "left out when 0");
    }

    #[test]
    fn reason_and_since_are_validated() {
        assert_eq!(parse_reason("spf_fail"), Ok(Reason::SpfFail));
        assert!(parse_reason("spf").unwrap_err().contains("unknown_key"));
        assert!(parse_since("1h").is_ok());
        assert!(parse_since("2024-01-01T00:00:00Z").is_ok());
        assert!(parse_since("soon").is_err());
    }
}
