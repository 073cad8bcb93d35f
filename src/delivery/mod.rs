//! Push delivery: hands jobs to the application. One [`Deliverer`] per `[[deliver]]` entry,
//! each with `concurrency` workers (tasks, not threads; all deliverers share a runtime of two
//! threads of their own, see `worker.rs`) that lease due jobs of their mailboxes,
//! send them, and record the outcome: `done` on success, a wait from the retry schedule on a
//! temporary failure, `dead` on a final one or after the last attempt. At least once: a job
//! leaves the queue only after the receiver said yes.
//!
//! Files: `worker.rs` (the loop), `schedule.rs` (retry waits), `outcome.rs` (what an answer
//! means), `http.rs` (the HTTP client), `mailroom.rs`, `webhook.rs`, `sidekiq.rs` (receivers).

mod http;
pub mod mailroom;
pub mod outcome;
pub mod schedule;
pub mod sidekiq;
pub mod webhook;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, DeliverConfig, DeliverKind};
use crate::job::Job;
use outcome::Failure;
use schedule::Schedule;

pub use worker::{Workers, spawn};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("secret file {}: {why}", path.display())]
    Secret { path: PathBuf, why: String },
    #[error("[[deliver]] {name}: {why}")]
    Config { name: String, why: String },
}

/// Where a deliverer sends its jobs.
pub enum Receiver {
    Mailroom(mailroom::Mailroom),
    Webhook(webhook::Webhook),
    Sidekiq(Box<sidekiq::Sidekiq>),
}

impl Receiver {
    async fn send(&self, job: &Job, raw: Vec<u8>) -> Result<(), Failure> {
        match self {
            Receiver::Mailroom(m) => m.send(raw).await,
            Receiver::Webhook(w) => w.send(job, &raw).await,
            Receiver::Sidekiq(s) => s.send(job, &raw).await,
        }
    }
}

/// One `[[deliver]]` entry, ready to run.
pub struct Deliverer {
    pub name: String,
    pub kind: DeliverKind,
    /// Empty: every mailbox.
    pub mailboxes: Vec<String>,
    pub concurrency: usize,
    pub timeout: Duration,
    pub schedule: Schedule,
    receiver: Receiver,
}

/// Builds every deliverer of `config`: reads the secret files and checks the URLs. `node` is
/// this server's name (`[server] hostname`), sent to receivers so that ids from several
/// mailgate nodes can be told apart.
pub fn build(config: &Config) -> Result<Vec<Arc<Deliverer>>, DeliveryError> {
    let names = crate::config::deliver_names(&config.deliver);
    config
        .deliver
        .iter()
        .zip(names)
        .map(|(d, name)| build_one(d, name, &config.server.hostname).map(Arc::new))
        .collect()
}

fn build_one(d: &DeliverConfig, name: String, node: &str) -> Result<Deliverer, DeliveryError> {
    let err = |why: String| DeliveryError::Config { name: name.clone(), why };
    let kind = d.kind().map_err(err)?;
    let (concurrency, timeout) = (d.concurrency().max(1), d.timeout());
    let schedule = Schedule::new(d.retry_delays().map_err(err)?);
    let url = || -> Result<reqwest::Url, DeliveryError> {
        let text = d.url.as_deref().ok_or_else(|| err("url is required".into()))?;
        reqwest::Url::parse(text).map_err(|e| err(format!("url {text:?}: {e}")))
    };
    let secret_file = || d.secret_file.clone().ok_or_else(|| err("secret_file is required".into()));
    let client = || http::client(timeout, concurrency).map_err(|e| err(format!("HTTP client: {e}")));
    let receiver = match kind {
        DeliverKind::Mailroom => {
            let secret = mailroom::read_secret(&secret_file()?)?;
            Receiver::Mailroom(mailroom::Mailroom::new(client()?, url()?, &secret))
        }
        DeliverKind::Webhook => {
            let key = webhook::read_key(&secret_file()?)?;
            Receiver::Webhook(webhook::Webhook::new(client()?, url()?, key, node.to_string()))
        }
        DeliverKind::Sidekiq => {
            let text = d.redis_url.as_deref().ok_or_else(|| err("redis_url is required".into()))?;
            let client = redis::Client::open(text).map_err(|e| err(format!("redis_url: {e}")))?;
            let namespace = d.namespace.as_deref().unwrap_or("");
            Receiver::Sidekiq(Box::new(sidekiq::Sidekiq::new(
                client,
                d.queue(),
                namespace,
                d.worker.clone(),
                node.to_string(),
                timeout,
            )))
        }
    };
    Ok(Deliverer { name, kind, mailboxes: d.mailboxes.clone(), concurrency, timeout, schedule, receiver })
}
