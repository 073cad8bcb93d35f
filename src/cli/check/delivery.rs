//! `mailgate check` for `[[deliver]]`: secrets readable and well-formed, URLs that GitLab
//! serves, mailboxes nobody delivers, and whether each receiver answers at all.

use std::time::Duration;

use mailgate::config::{Config, DeliverKind, deliver_names};

use super::Findings;

/// How long a reachability probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The two paths of GitLab's mail_room API.
const MAILROOM_PATHS: [&str; 2] =
    ["/api/v4/internal/mail_room/incoming_email", "/api/v4/internal/mail_room/service_desk_email"];

/// Checks without network I/O (the secret files are read).
pub fn config_checks(config: &Config, f: &mut Findings) {
    if config.deliver.is_empty() {
        f.ok("no [[deliver]] entries: jobs wait for the pull API (POST /v1/jobs/next) or `mailgate queue pop`");
        return;
    }
    let names = deliver_names(&config.deliver);
    match mailgate::delivery::build(config) {
        Ok(deliverers) => {
            for d in &deliverers {
                let mailboxes =
                    if d.mailboxes.is_empty() { "every mailbox".to_string() } else { d.mailboxes.join(", ") };
                f.ok(format!(
                    "[[deliver]] {}: {} for {mailboxes}, {} worker(s), timeout {}, {} attempt(s) before a job is dead",
                    d.name,
                    d.kind.as_str(),
                    d.concurrency,
                    humantime::format_duration(d.timeout),
                    d.schedule.attempts()
                ));
            }
        }
        Err(e) => f.error(format!("delivery cannot start: {e}")),
    }
    for (d, name) in config.deliver.iter().zip(&names) {
        if d.kind() != Ok(DeliverKind::Mailroom) {
            continue;
        }
        let path = d.url.as_deref().and_then(|u| reqwest::Url::parse(u).ok()).map(|u| u.path().to_string());
        let Some(path) = path else { continue };
        if !MAILROOM_PATHS.iter().any(|p| path.ends_with(p)) {
            f.warning(format!(
                "[[deliver]] {name}: GitLab serves the mail_room API at {} (incoming_email) or {} \
                 (service_desk_email), not {path}",
                MAILROOM_PATHS[0], MAILROOM_PATHS[1]
            ));
            continue;
        }
        let url_type = if path.ends_with(MAILROOM_PATHS[1]) { "service_desk_email" } else { "incoming_email" };
        if d.mailboxes.is_empty() && config.mailbox.len() > 1 {
            // GitLab handles the two types with different workers and secrets: one URL for all
            // mailboxes sends some to the wrong one.
            f.warning(format!(
                "[[deliver]] {name}: every mailbox goes to GitLab's {url_type} endpoint; GitLab's \
                 incoming_email and service_desk_email need an entry each (set `mailboxes`)"
            ));
        }
        let other = |m: &str| match url_type {
            "incoming_email" => m == "service_desk",
            _ => m == "incoming",
        };
        if let Some(m) = d.mailboxes.iter().find(|m| other(m)) {
            f.warning(format!(
                "[[deliver]] {name}: mailbox {m} goes to GitLab's {url_type} endpoint; is that the right one?"
            ));
        }
    }
    for m in &config.mailbox {
        let delivered = config.deliver.iter().any(|d| d.mailboxes.is_empty() || d.mailboxes.contains(&m.name));
        if !delivered {
            f.ok(format!("mailbox {}: no [[deliver]] entry; its jobs wait for the pull API", m.name));
        }
    }
}

/// Whether each receiver can be reached: a TCP connection for HTTP receivers (a request
/// would deliver something), a PING for Redis. Failures are warnings: mailgate keeps jobs and
/// retries until the receiver is back.
pub async fn reachability(config: &Config, f: &mut Findings) {
    let names = deliver_names(&config.deliver);
    for (d, name) in config.deliver.iter().zip(&names) {
        match d.kind() {
            Ok(DeliverKind::Mailroom | DeliverKind::Webhook) => {
                let Some(url) = d.url.as_deref().and_then(|u| reqwest::Url::parse(u).ok()) else { continue };
                let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else { continue };
                let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
                match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port))).await {
                    Ok(Ok(_)) => f.ok(format!("[[deliver]] {name}: {host}:{port} accepts connections")),
                    Ok(Err(e)) => f.warning(format!(
                        "[[deliver]] {name}: cannot connect to {host}:{port} ({e}); jobs will wait and be retried"
                    )),
                    Err(_) => f.warning(format!("[[deliver]] {name}: {host}:{port} does not answer within 3s")),
                }
            }
            Ok(DeliverKind::Sidekiq) => {
                let Some(url) = d.redis_url.as_deref() else { continue };
                match redis_ping(url).await {
                    Ok(()) => f.ok(format!("[[deliver]] {name}: Redis answers PING")),
                    Err(e) => f.warning(format!("[[deliver]] {name}: Redis does not answer ({e}); jobs will wait")),
                }
            }
            Err(_) => {}
        }
    }
}

async fn redis_ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 3s".into()),
    }
}
