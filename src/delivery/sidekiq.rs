//! Sidekiq through Redis (notes/gitlab.md): one `LPUSH queue:<queue>` of Sidekiq's job format
//! per job (with the queue added to the `queues` set, as Sidekiq's own client does), worker
//! class per mailbox, optional namespace, and a `jid` derived from the node and the job id so
//! that a retry carries the same jid.

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::outcome::Failure;
use crate::job::Job;

/// GitLab's worker for a mailbox: service desk mail has its own.
pub fn default_worker(mailbox: &str) -> &'static str {
    if mailbox == "service_desk" { "ServiceDeskEmailReceiverWorker" } else { "EmailReceiverWorker" }
}

/// 24 hex digits: 8 from the node's name, then the 16 of the job id.
pub fn jid(node: &str, job_id: &str) -> String {
    let h = Sha256::digest(node.as_bytes());
    format!("{}{job_id}", hex::encode(&h[..4]))
}

#[derive(Serialize)]
struct Payload<'a> {
    class: &'a str,
    args: [&'a str; 1],
    queue: &'a str,
    jid: String,
    retry: bool,
    enqueued_at: f64,
}

pub struct Sidekiq {
    client: redis::Client,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    queue: String,
    list_key: String,
    queues_key: String,
    worker: Option<String>,
    node: String,
    timeout: std::time::Duration,
}

impl Sidekiq {
    pub fn new(
        client: redis::Client,
        queue: &str,
        namespace: &str,
        worker: Option<String>,
        node: String,
        timeout: std::time::Duration,
    ) -> Sidekiq {
        let prefix = if namespace.is_empty() { String::new() } else { format!("{namespace}:") };
        Sidekiq {
            client,
            conn: Mutex::new(None),
            queue: queue.to_string(),
            list_key: format!("{prefix}queue:{queue}"),
            queues_key: format!("{prefix}queues"),
            worker: worker.filter(|w| !w.is_empty()),
            node,
            timeout,
        }
    }

    /// The shared connection, connecting (again) when there is none.
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, Failure> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // redis-rs answers "timed out" after 500 ms by default: the deliverer's own timeout
        // bounds the whole attempt instead.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.timeout));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Failure::Retry(format!("cannot connect to Redis: {e}")))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The job as Sidekiq expects it. A message that is not UTF-8 cannot travel in a JSON
    /// string unchanged: invalid bytes become U+FFFD (logged by the caller).
    pub fn payload(&self, job: &Job, raw: &str) -> Result<String, Failure> {
        let enqueued_at = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9;
        let p = Payload {
            class: self.worker.as_deref().unwrap_or_else(|| default_worker(&job.mailbox)),
            args: [raw],
            queue: &self.queue,
            jid: jid(&self.node, &job.id),
            retry: false,
            enqueued_at,
        };
        serde_json::to_string(&p).map_err(|e| Failure::Retry(format!("cannot serialise the Sidekiq job: {e}")))
    }

    pub async fn send(&self, job: &Job, raw: &[u8]) -> Result<(), Failure> {
        let text = String::from_utf8_lossy(raw);
        if matches!(text, std::borrow::Cow::Owned(_)) {
            tracing::warn!(
                target: "mailgate::delivery",
                job = %job.id,
                "the message is not UTF-8: Sidekiq's JSON carries it with invalid bytes replaced (mailroom and webhook keep every byte)"
            );
        }
        let payload = self.payload(job, &text)?;
        let mut conn = self.connection().await?;
        let result: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .cmd("SADD")
            .arg(&self.queues_key)
            .arg(&self.queue)
            .ignore()
            .cmd("LPUSH")
            .arg(&self.list_key)
            .arg(payload)
            .ignore()
            .query_async(&mut conn)
            .await;
        if let Err(e) = result {
            // Reconnect on the next attempt.
            *self.conn.lock().await = None;
            return Err(Failure::Retry(format!("Redis: {e}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn jid_is_24_hex_and_ends_with_the_job_id() {
        let j = jid("mx.example.com", "00000000000000ff");
        assert_eq!(j.len(), 24);
        assert!(j.ends_with("00000000000000ff"));
        assert!(j.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(j, jid("mx2.example.com", "00000000000000ff"), "two nodes never share a jid");
    }

    #[test]
    fn worker_per_mailbox() {
        assert_eq!(default_worker("incoming"), "EmailReceiverWorker");
        assert_eq!(default_worker("service_desk"), "ServiceDeskEmailReceiverWorker");
    }

    #[test]
    fn keys_with_and_without_namespace() {
        let client = redis::Client::open("redis://127.0.0.1:1/0").unwrap();
        let s = Sidekiq::new(client.clone(), "default", "", None, "n".into(), Duration::from_secs(1));
        assert_eq!((s.list_key.as_str(), s.queues_key.as_str()), ("queue:default", "queues"));
        let s = Sidekiq::new(
            client,
            "email_receiver",
            "resque:gitlab",
            Some(String::new()),
            "n".into(),
            Duration::from_secs(1),
        );
        assert_eq!(s.list_key, "resque:gitlab:queue:email_receiver");
        assert_eq!(s.worker, None);
    }
}
