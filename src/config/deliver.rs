//! `[[deliver]]`: push delivery of jobs to the application (mail_room API, webhook, Sidekiq).
//! Parsed and checked here; the workers live in `crate::delivery`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The default retry schedule: 10 waits, about ten hours in all (like hosted inbound services),
/// so 11 attempts before a job is dead.
pub const DEFAULT_RETRY: [&str; 10] = ["1m", "5m", "10m", "10m", "10m", "15m", "30m", "1h", "2h", "6h"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverKind {
    Mailroom,
    Webhook,
    Sidekiq,
}

impl DeliverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliverKind::Mailroom => "mailroom",
            DeliverKind::Webhook => "webhook",
            DeliverKind::Sidekiq => "sidekiq",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverConfig {
    /// Label in logs and metrics (default: the kind, or `kind-N` for the N-th entry of a kind).
    #[serde(default)]
    pub name: Option<String>,
    pub kind: String,
    /// Mailboxes whose jobs this entry delivers (default: every mailbox).
    #[serde(default)]
    pub mailboxes: Vec<String>,
    #[serde(default)]
    pub url: Option<String>,
    /// mailroom: base64 of exactly 32 bytes; webhook: the HMAC key (the file's bytes).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Per attempt.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Waits between attempts; after the last one's attempt fails the job is dead.
    #[serde(default)]
    pub retry: Option<Vec<String>>,
    #[serde(default)]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub queue: Option<String>,
    /// Sidekiq worker class (default: per mailbox, see docs/delivery.md).
    #[serde(default)]
    pub worker: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

impl DeliverConfig {
    pub fn kind(&self) -> Result<DeliverKind, String> {
        match self.kind.as_str() {
            "mailroom" => Ok(DeliverKind::Mailroom),
            "webhook" => Ok(DeliverKind::Webhook),
            "sidekiq" => Ok(DeliverKind::Sidekiq),
            other => Err(format!("[[deliver]] kind = {other:?}: expected mailroom, webhook or sidekiq")),
        }
    }

    pub fn concurrency(&self) -> usize {
        // A worker waits for each answer, so an entry delivers at most workers / round trip. In
        // `make bench` on 2 cores under a full-speed intake, 8 fell behind at times; 16 kept up
        // at 20 and 50 sessions.
        self.concurrency.unwrap_or(16)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(30))
    }

    /// The retry schedule (the default when not set).
    pub fn retry_delays(&self) -> Result<Vec<Duration>, String> {
        let parse = |s: &str| humantime::parse_duration(s).map_err(|e| format!("[[deliver]] retry entry {s:?}: {e}"));
        match &self.retry {
            Some(list) => list.iter().map(|s| parse(s)).collect(),
            None => DEFAULT_RETRY.iter().map(|s| parse(s)).collect(),
        }
    }

    pub fn queue(&self) -> &str {
        self.queue.as_deref().filter(|q| !q.is_empty()).unwrap_or("default")
    }
}

/// Names for every entry: `name`, else the kind, else `kind-N` when a kind repeats.
pub fn names(entries: &[DeliverConfig]) -> Vec<String> {
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    let total = |k: &str| entries.iter().filter(|d| d.name.is_none() && d.kind == k).count();
    entries
        .iter()
        .map(|d| match &d.name {
            Some(n) => n.clone(),
            None if total(&d.kind) == 1 => d.kind.clone(),
            None => {
                let n = seen.entry(d.kind.as_str()).or_default();
                *n += 1;
                format!("{}-{n}", d.kind)
            }
        })
        .collect()
}

/// Every problem of the `[[deliver]]` entries, one sentence each.
pub(super) fn problems(entries: &[DeliverConfig], mailboxes: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let names = names(entries);
    let mut claimed: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for (d, name) in entries.iter().zip(&names) {
        let at = format!("[[deliver]] {name}");
        let kind = match d.kind() {
            Ok(k) => k,
            Err(e) => {
                out.push(e);
                continue;
            }
        };
        if names.iter().filter(|n| *n == name).count() > 1 {
            out.push(format!("{at}: the name is used twice"));
        }
        let covered: Vec<&str> =
            if d.mailboxes.is_empty() { mailboxes.to_vec() } else { d.mailboxes.iter().map(String::as_str).collect() };
        for m in &d.mailboxes {
            if !mailboxes.contains(&m.as_str()) {
                out.push(format!("{at}: mailbox {m:?} is not a [[mailbox]]"));
            }
        }
        for m in covered {
            if let Some(other) = claimed.insert(m, name) {
                out.push(format!(
                    "{at}: mailbox {m:?} is already delivered by [[deliver]] {other} (a job goes to one place)"
                ));
            }
        }
        if d.concurrency == Some(0) {
            out.push(format!("{at}: concurrency must be at least 1"));
        }
        if d.timeout.is_some_and(|t| t.is_zero()) {
            out.push(format!("{at}: timeout must be more than 0s"));
        }
        if let Err(e) = d.retry_delays() {
            out.push(format!("{at}: {e}"));
        }
        match kind {
            DeliverKind::Mailroom | DeliverKind::Webhook => {
                match d.url.as_deref().map(reqwest::Url::parse) {
                    None => out.push(format!("{at}: url is required")),
                    Some(Err(e)) => out.push(format!("{at}: url: {e}")),
                    Some(Ok(u)) if !["http", "https"].contains(&u.scheme()) => {
                        out.push(format!("{at}: url must be http or https"))
                    }
                    Some(Ok(_)) => {}
                }
                if d.secret_file.is_none() {
                    out.push(format!("{at}: secret_file is required"));
                }
                for (key, set) in [("redis_url", d.redis_url.is_some()), ("queue", d.queue.is_some())] {
                    if set {
                        out.push(format!("{at}: {key} applies to kind = \"sidekiq\" only"));
                    }
                }
                for (key, set) in [("worker", d.worker.is_some()), ("namespace", d.namespace.is_some())] {
                    if set {
                        out.push(format!("{at}: {key} applies to kind = \"sidekiq\" only"));
                    }
                }
            }
            DeliverKind::Sidekiq => {
                match d.redis_url.as_deref() {
                    None => out.push(format!("{at}: redis_url is required")),
                    Some(u)
                        if !(u.starts_with("redis://")
                            || u.starts_with("unix://")
                            || u.starts_with("redis+unix://")) =>
                    {
                        out.push(format!("{at}: redis_url must start with redis:// or unix://"))
                    }
                    Some(_) => {}
                }
                for (key, set) in [("url", d.url.is_some()), ("secret_file", d.secret_file.is_some())] {
                    if set {
                        out.push(format!("{at}: {key} does not apply to kind = \"sidekiq\""));
                    }
                }
            }
        }
    }
    out
}
