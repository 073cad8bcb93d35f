//! Where queue and reject-log commands go: the HTTP API of a running server, or (when none
//! answers) the spool opened directly. sled locks its database, so both cannot be used at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use mailgate::config::Config;
use mailgate::job::{Job, JobState};
use mailgate::spool::{RejectQuery, RejectRecord, Spool, SpoolError, SpoolOptions};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use time::format_description::well_known::Rfc3339;

/// How long the CLI waits for `/healthz` before it decides no server runs.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

pub enum Backend {
    Http(Api),
    Local(Spool),
}

impl Backend {
    /// The running server's API if it answers, else the spool itself.
    pub async fn connect(config: &Config) -> Result<Backend> {
        let listen = config.http.listen_addr()?;
        if let Some(addr) = listen {
            let api = Api::new(addr, config.http.token().ok().flatten())?;
            if api.healthy().await {
                return Ok(Backend::Http(api));
            }
        }
        let dir = &config.spool.dir;
        if !dir.exists() {
            let server = match listen {
                Some(addr) => format!("no mailgate server answers at http://{}", client_addr(addr)),
                None => "the HTTP API is disabled ([http] listen is empty)".to_string(),
            };
            bail!("{server} and the spool directory {} does not exist (wrong --config?)", dir.display());
        }
        match Spool::open(dir, SpoolOptions::from(&config.spool)) {
            Ok(spool) => Ok(Backend::Local(spool)),
            Err(SpoolError::Locked(path)) => match listen {
                Some(addr) => bail!(
                    "a running mailgate server holds the spool {}, but its HTTP API at http://{} did not answer \
                     (is [http] listen the same as the server's?)",
                    path.display(),
                    client_addr(addr)
                ),
                None => bail!(
                    "a running mailgate server holds the spool {}, and its HTTP API is disabled ([http] listen is \
                     empty): enable it to use the queue commands while the server runs",
                    path.display()
                ),
            },
            Err(e) => Err(anyhow!("cannot open the spool {}: {e}", dir.display())),
        }
    }

    /// Closes a directly opened spool (flushes it); nothing to do for the HTTP API.
    pub async fn close(self) -> Result<()> {
        if let Backend::Local(spool) = self {
            spool.close().await.map_err(|e| anyhow!("closing the spool: {e}"))?;
        }
        Ok(())
    }

    pub async fn list(&self, state: Option<JobState>, limit: usize) -> Result<Vec<Job>> {
        match self {
            Backend::Http(api) => {
                let mut query = vec![("limit", limit.to_string())];
                if let Some(s) = state {
                    query.push(("state", s.as_str().to_string()));
                }
                api.json(Method::GET, "/v1/jobs", &query).await
            }
            Backend::Local(spool) => spool.list(state, limit).map_err(spool_error),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>> {
        match self {
            Backend::Http(api) => api.optional(Method::GET, &job_path(id, ""), &[]).await?.map(parse).transpose(),
            Backend::Local(spool) => spool.get(id).map_err(spool_error),
        }
    }

    pub async fn raw(&self, id: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Backend::Http(api) => Ok(api.optional(Method::GET, &job_path(id, "/raw"), &[]).await?),
            Backend::Local(spool) => spool.raw(id).map_err(spool_error),
        }
    }

    pub async fn pop(&self, mailbox: Option<&str>, lease: Duration) -> Result<Option<Job>> {
        match self {
            Backend::Http(api) => {
                let mut query = vec![("lease", lease.as_secs().to_string())];
                if let Some(m) = mailbox {
                    query.push(("mailbox", m.to_string()));
                }
                let response = api.send(Method::POST, "/v1/jobs/next", &query).await?;
                if response.status() == StatusCode::NO_CONTENT {
                    return Ok(None);
                }
                let bytes = response.bytes().await.context("reading the HTTP API's answer")?;
                parse(bytes.to_vec()).map(Some)
            }
            Backend::Local(spool) => spool.lease_next(mailbox, lease).await.map_err(spool_error),
        }
    }

    /// `verb` is `ack`, `nack` or `retry`.
    pub async fn transition(&self, id: &str, verb: &str) -> Result<Job> {
        match self {
            Backend::Http(api) => api.json(Method::POST, &job_path(id, &format!("/{verb}")), &[]).await,
            Backend::Local(spool) => match verb {
                "ack" => spool.ack(id).await.map_err(spool_error),
                "nack" => spool.nack(id).await.map_err(spool_error),
                "retry" => spool.retry(id).await.map_err(spool_error),
                other => bail!("unknown job transition {other:?}"),
            },
        }
    }

    /// Every dead job (of `mailbox`) -> ready; how many.
    pub async fn retry_all(&self, mailbox: Option<&str>) -> Result<u64> {
        match self {
            Backend::Http(api) => {
                let query: Vec<(&str, String)> = mailbox.map(|m| ("mailbox", m.to_string())).into_iter().collect();
                let v: serde_json::Value = api.json(Method::POST, "/v1/jobs/retry", &query).await?;
                v.get("retried").and_then(serde_json::Value::as_u64).context("the HTTP API's answer has no count")
            }
            Backend::Local(spool) => Ok(spool.retry_all(mailbox).await.map_err(spool_error)? as u64),
        }
    }

    pub async fn stats(&self) -> Result<serde_json::Value> {
        match self {
            Backend::Http(api) => api.json(Method::GET, "/v1/stats", &[]).await,
            Backend::Local(spool) => Ok(serde_json::to_value(spool.stats().map_err(spool_error)?)?),
        }
    }

    pub async fn rejects(&self, query: &RejectQuery) -> Result<Vec<RejectRecord>> {
        match self {
            Backend::Http(api) => {
                let mut params = vec![("limit", query.limit.to_string())];
                if let Some(since) = query.since {
                    params.push(("since", since.format(&Rfc3339)?));
                }
                if let Some(reason) = query.reason {
                    params.push(("reason", reason.as_str().to_string()));
                }
                if let Some(after) = &query.after {
                    params.push(("after", after.clone()));
                }
                api.json(Method::GET, "/v1/rejects", &params).await
            }
            Backend::Local(spool) => spool.rejects(query).map_err(spool_error),
        }
    }
}

fn spool_error(e: SpoolError) -> anyhow::Error {
    anyhow!("{e}")
}

fn parse<T: DeserializeOwned>(bytes: Vec<u8>) -> Result<T> {
    serde_json::from_slice(&bytes).context("the HTTP API answered with unexpected JSON")
}

/// `/v1/jobs/<id><suffix>`, with the id percent-encoded so it stays one path segment.
fn job_path(id: &str, suffix: &str) -> String {
    let mut encoded = String::new();
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("/v1/jobs/{encoded}{suffix}")
}

/// Where to connect for a listen address: an unspecified IP (0.0.0.0, ::) means loopback.
pub fn client_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
        _ => listen,
    }
}

/// A client of the running server's HTTP API.
pub struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Api {
    pub fn new(listen: SocketAddr, token: Option<String>) -> Result<Api> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(120))
            .no_proxy()
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Api { base: format!("http://{}", client_addr(listen)), client, token })
    }

    /// Whether a mailgate server answers `/healthz` within [`PROBE_TIMEOUT`].
    pub async fn healthy(&self) -> bool {
        let request = self.client.get(format!("{}/healthz", self.base)).timeout(PROBE_TIMEOUT);
        matches!(request.send().await, Ok(r) if r.status() == StatusCode::OK)
    }

    async fn request(&self, method: Method, path: &str, query: &[(&str, String)]) -> Result<reqwest::Response> {
        let mut request = self.client.request(method, format!("{}{path}", self.base)).query(query);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request.send().await.with_context(|| format!("the HTTP API at {} did not answer", self.base))
    }

    /// The error for an unsuccessful answer, with the server's `{"error"}` message.
    async fn failure(&self, response: reqwest::Response) -> anyhow::Error {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        if status == StatusCode::UNAUTHORIZED {
            return anyhow!(
                "the HTTP API at {} refused the request: {message} (set [http] token_file to a readable file \
                 holding the server's token)",
                self.base
            );
        }
        anyhow!("{message} (HTTP {})", status.as_u16())
    }

    async fn send(&self, method: Method, path: &str, query: &[(&str, String)]) -> Result<reqwest::Response> {
        let response = self.request(method, path, query).await?;
        if response.status().is_success() { Ok(response) } else { Err(self.failure(response).await) }
    }

    /// The body of a successful answer, `None` on 404.
    async fn optional(&self, method: Method, path: &str, query: &[(&str, String)]) -> Result<Option<Vec<u8>>> {
        let response = self.request(method, path, query).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(self.failure(response).await);
        }
        let bytes = response.bytes().await.context("reading the HTTP API's answer")?;
        Ok(Some(bytes.to_vec()))
    }

    async fn json<T: DeserializeOwned>(&self, method: Method, path: &str, query: &[(&str, String)]) -> Result<T> {
        let response = self.send(method, path, query).await?;
        let bytes = response.bytes().await.context("reading the HTTP API's answer")?;
        parse(bytes.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_means_loopback() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(client_addr(a("0.0.0.0:8025")), a("127.0.0.1:8025"));
        assert_eq!(client_addr(a("[::]:8025")), a("[::1]:8025"));
        assert_eq!(client_addr(a("10.0.0.5:8025")), a("10.0.0.5:8025"));
    }

    #[test]
    fn job_ids_stay_one_segment() {
        assert_eq!(job_path("00000000000000ff", "/raw"), "/v1/jobs/00000000000000ff/raw");
        assert_eq!(job_path("a/../b", ""), "/v1/jobs/a%2F..%2Fb");
    }
}
