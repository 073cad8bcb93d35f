//! `mailgate queue list|show|pop|ack|nack|retry|stats`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mailgate::job::{Job, JobState};
use time::format_description::well_known::Rfc3339;

use super::backend::Backend;
use super::{EXIT_EMPTY, clean, or_dash};

pub async fn list(backend: &Backend, state: Option<JobState>, limit: usize, json: bool) -> Result<ExitCode> {
    let jobs = backend.list(state, limit).await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&jobs)?)?;
    } else {
        writeln!(out, "ID\tSTATE\tRECEIVED_AT\tMAILBOX\tROUTE\tKEY\tFROM\tSUBJECT")?;
        for job in &jobs {
            writeln!(out, "{}", list_line(job))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list_line(job: &Job) -> String {
    let received = job.received_at.format(&Rfc3339).unwrap_or_else(|_| job.received_at.to_string());
    [
        clean(&job.id),
        job.state.as_str().to_string(),
        received,
        or_dash(&job.mailbox),
        job.route.as_str().to_string(),
        or_dash(&job.key),
        or_dash(&job.message.from),
        or_dash(&job.message.subject),
    ]
    .join("\t")
}

pub async fn show(backend: &Backend, id: &str, raw: bool) -> Result<ExitCode> {
    if raw {
        let Some(bytes) = backend.raw(id).await? else {
            bail!("no job {}", clean(id));
        };
        let mut out = std::io::stdout().lock();
        out.write_all(&bytes).context("writing the message to stdout")?;
        out.flush()?;
    } else {
        let Some(job) = backend.get(id).await? else {
            bail!("no job {}", clean(id));
        };
        print_job(&job)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn pop(backend: &Backend, mailbox: Option<&str>, lease_secs: u64) -> Result<ExitCode> {
    match backend.pop(mailbox, Duration::from_secs(lease_secs)).await? {
        Some(job) => {
            print_job(&job)?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("no ready job");
            Ok(ExitCode::from(EXIT_EMPTY))
        }
    }
}

/// `ack`, `nack` or `retry`.
pub async fn transition(backend: &Backend, id: &str, verb: &str) -> Result<ExitCode> {
    let job = backend.transition(id, verb).await?;
    print_job(&job)?;
    Ok(ExitCode::SUCCESS)
}

/// `retry --all`: every dead job (of `mailbox`) back to ready.
pub async fn retry_all(backend: &Backend, mailbox: Option<&str>) -> Result<ExitCode> {
    let retried = backend.retry_all(mailbox).await?;
    writeln!(std::io::stdout().lock(), "{}", serde_json::json!({ "retried": retried }))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn stats(backend: &Backend, json: bool) -> Result<ExitCode> {
    let stats = backend.stats().await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&stats)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for line in stats_lines(&stats) {
        writeln!(out, "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `name: value` lines, the job states first, then whatever else the spool reports.
fn stats_lines(stats: &serde_json::Value) -> Vec<String> {
    const FIRST: [&str; 7] = ["ready", "waiting", "leased", "done", "dead", "rejects", "oldest_ready"];
    let Some(map) = stats.as_object() else {
        return vec![stats.to_string()];
    };
    let value = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => clean(s),
        other => other.to_string(),
    };
    let mut lines: Vec<String> =
        FIRST.iter().filter_map(|k| map.get(*k).map(|v| format!("{k}: {}", value(v)))).collect();
    for (k, v) in map {
        if !FIRST.contains(&k.as_str()) {
            lines.push(format!("{}: {}", clean(k), value(v)));
        }
    }
    lines
}

fn print_job(job: &Job) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(job)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_lines_put_states_first() {
        let v = serde_json::json!({"dead": 1, "done": 2, "leased": 0, "ready": 3, "rejects": 4,
                                   "oldest_ready": null, "zz": "x\ny"});
        assert_eq!(
            stats_lines(&v),
            ["ready: 3", "leased: 0", "done: 2", "dead: 1", "rejects: 4", "oldest_ready: -", "zz: x\\ny"]
        );
    }
}
