//! GitLab's internal mail_room API (notes/gitlab.md): the raw message as `text/plain`, with a
//! `Gitlab-Mailroom-Api-Request` JWT (HS256, issuer `gitlab-mailroom`, a nonce and `iat`)
//! signed with the mailbox type's 32-byte secret. GitLab needs no change.

use std::path::Path;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::DeliveryError;
use super::outcome::Failure;
use crate::config::DeliverKind;

const HEADER: &str = "Gitlab-Mailroom-Api-Request";
const ISSUER: &str = "gitlab-mailroom";

#[derive(Serialize)]
struct Claims {
    nonce: String,
    iat: i64,
    iss: &'static str,
}

pub struct Mailroom {
    client: reqwest::Client,
    url: reqwest::Url,
    key: EncodingKey,
}

/// Reads a GitLab mail_room secret file: base64 of exactly 32 bytes, one trailing newline
/// allowed (GitLab's own rule).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, DeliveryError> {
    let bad = |why: String| DeliveryError::Secret { path: path.to_path_buf(), why };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    let secret = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| bad(format!("not base64 ({e}); GitLab's secret file holds base64 of 32 bytes")))?;
    if secret.len() != 32 {
        return Err(bad(format!("decodes to {} bytes; GitLab needs exactly 32", secret.len())));
    }
    Ok(secret)
}

impl Mailroom {
    pub fn new(client: reqwest::Client, url: reqwest::Url, secret: &[u8]) -> Mailroom {
        Mailroom { client, url, key: EncodingKey::from_secret(secret) }
    }

    /// A fresh token for one request.
    fn token(&self) -> Result<String, Failure> {
        let nonce: [u8; 12] = rand::random();
        let claims =
            Claims { nonce: hex::encode(nonce), iat: time::OffsetDateTime::now_utc().unix_timestamp(), iss: ISSUER };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| Failure::Retry(format!("cannot sign the request: {e}")))
    }

    pub async fn send(&self, raw: Vec<u8>) -> Result<(), Failure> {
        let request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "text/plain")
            .header(HEADER, self.token()?)
            .body(raw);
        super::http::send(DeliverKind::Mailroom, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_follow_gitlabs_rules() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(read_secret(&write("a", &good)).unwrap(), vec![7u8; 32]);
        assert_eq!(read_secret(&write("b", &format!("{good}\n"))).unwrap(), vec![7u8; 32]);
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert!(read_secret(&write("c", &short)).unwrap_err().to_string().contains("16 bytes"));
        assert!(read_secret(&write("d", "not base64!")).is_err());
        assert!(read_secret(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_token_is_what_gitlab_verifies() {
        let secret = [9u8; 32];
        let url = reqwest::Url::parse("http://127.0.0.1:1/api/v4/internal/mail_room/incoming_email").unwrap();
        let m = Mailroom::new(reqwest::Client::new(), url, &secret);
        let token = m.token().unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["iss", "iat"]);
        v.validate_exp = false;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(&token, &jsonwebtoken::DecodingKey::from_secret(&secret), &v)
                .unwrap();
        let nonce = data.claims["nonce"].as_str().unwrap();
        assert_eq!(nonce.len(), 24);
        assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()));
        let iat = data.claims["iat"].as_i64().unwrap();
        assert!((time::OffsetDateTime::now_utc().unix_timestamp() - iat).abs() < 5);
        assert_ne!(m.token().unwrap(), token, "a new nonce each time");
    }
}
