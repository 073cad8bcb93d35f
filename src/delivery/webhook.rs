//! The signed webhook (DESIGN.md): a POST of the job JSON with the raw message in `"raw"`
//! (base64), `Mailgate-Job-Id` and `Mailgate-Signature: t=<unix seconds>,v1=<hex
//! HMAC-SHA256(key, "<t>.<body>")>`. docs/delivery.md tells receivers how to verify it.

use std::path::Path;

use base64::display::Base64Display;
use hmac::{Hmac, Mac};
use serde::{Serialize, Serializer};
use sha2::Sha256;

use super::DeliveryError;
use super::outcome::Failure;
use crate::config::DeliverKind;
use crate::job::Job;

pub const JOB_ID_HEADER: &str = "Mailgate-Job-Id";
pub const SIGNATURE_HEADER: &str = "Mailgate-Signature";
pub const ATTEMPT_HEADER: &str = "Mailgate-Attempt";
pub const NODE_HEADER: &str = "Mailgate-Node";

pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    key: Vec<u8>,
    node: String,
}

/// Reads a webhook key: the file's bytes without one trailing newline; at least 16 bytes.
pub fn read_key(path: &Path) -> Result<Vec<u8>, DeliveryError> {
    let bad = |why: String| DeliveryError::Secret { path: path.to_path_buf(), why };
    let mut key = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    if key.len() < 16 {
        return Err(bad(format!("the key is {} bytes; use at least 16 (e.g. `openssl rand -hex 32`)", key.len())));
    }
    Ok(key)
}

/// The body: the job's JSON fields and `raw`, written straight into one buffer.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(flatten)]
    job: &'a Job,
    #[serde(serialize_with = "base64_str")]
    raw: &'a [u8],
}

fn base64_str<S: Serializer>(raw: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Base64Display::new(raw, &base64::engine::general_purpose::STANDARD))
}

/// `t=<t>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`.
pub fn signature(key: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length: this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhook {
    pub fn new(client: reqwest::Client, url: reqwest::Url, key: Vec<u8>, node: String) -> Webhook {
        Webhook { client, url, key, node }
    }

    pub async fn send(&self, job: &Job, raw: &[u8]) -> Result<(), Failure> {
        let mut job = std::borrow::Cow::Borrowed(job);
        if job.reply_text.is_none() {
            crate::spool::fill_reply_text(job.to_mut(), raw);
        }
        let body = serde_json::to_vec(&Body { job: &job, raw })
            .map_err(|e| Failure::Retry(format!("cannot serialise the job: {e}")))?;
        let t = time::OffsetDateTime::now_utc().unix_timestamp();
        let request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(JOB_ID_HEADER, &job.id)
            .header(SIGNATURE_HEADER, signature(&self.key, t, &body))
            .header(ATTEMPT_HEADER, job.attempts.to_string())
            .header(NODE_HEADER, &self.node)
            .body(body);
        super::http::send(DeliverKind::Webhook, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn signature_is_hmac_sha256_over_t_dot_body() {
        // RFC 4231 test case 2 gives the HMAC primitive; here the message is "<t>.<body>".
        let sig = signature(b"Jefe", 0, b"what do ya want for nothing?");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        assert_eq!(sig, format!("t=0,v1={}", hex::encode(mac.finalize().into_bytes())));
        assert_ne!(signature(b"Jefe", 1, b"x"), signature(b"Jefe", 2, b"x"));
    }

    #[test]
    fn the_body_is_the_job_json_plus_raw() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "id": "0000000000000001", "state": "leased", "received_at": "2026-01-01T00:00:00Z", "attempts": 1,
            "mailbox": "incoming", "key": "k", "key_source": "rcpt", "route": "reply",
            "envelope": {"mail_from": "", "rcpt_to": [], "client_ip": "", "client_name": "", "helo": "",
                         "protocol": "", "queue_id": ""},
            "message": {"message_id": "", "subject": "", "from": "", "size": 3, "sha256": ""},
            "auth": {"spf": "none", "dkim": "none", "dmarc": "none", "dmarc_policy": "none", "arc": "none",
                     "header": "x; none"},
            "reply_text": null
        }))
        .unwrap();
        let body = serde_json::to_vec(&Body { job: &job, raw: b"a\r\nb" }).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "0000000000000001");
        assert_eq!(v["mailbox"], "incoming");
        assert_eq!(v["raw"], base64::engine::general_purpose::STANDARD.encode(b"a\r\nb"));
    }

    #[test]
    fn keys_lose_one_newline_and_must_not_be_short() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        assert_eq!(read_key(&p).unwrap(), b"0123456789abcdef0123");
        std::fs::write(&p, "short\n").unwrap();
        assert!(read_key(&p).is_err());
    }
}
