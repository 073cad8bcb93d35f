//! An in-process HTTP receiver for push delivery: it plays GitLab's mail_room postback endpoint
//! (verifying the `Gitlab-Mailroom-Api-Request` JWT the way GitLab does) or a webhook consumer
//! (verifying `Mailgate-Signature`), records every request, and answers the way the test says,
//! which the test may change at any time. It runs axum on its own multi-threaded tokio runtime;
//! `stop()` drops that runtime (the listener and every open connection close: clients get
//! "connection refused"), `start()` serves again on the same port.
//!
//! Also here: [`http`], a small blocking HTTP/1.1 client for mailgate's own HTTP API.

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// GitLab accepts a JWT whose `iat` is at most this old (and a webhook timestamp this far off).
pub const MAX_SKEW_SECS: i64 = 300;
pub const MAILROOM_HEADER: &str = "gitlab-mailroom-api-request";
pub const MAILROOM_ISSUER: &str = "gitlab-mailroom";

/// How the receiver answers (after verification: a request that fails it always gets 401).
#[derive(Debug, Clone)]
pub enum Mode {
    /// 200 `{"success":true}`.
    Ok,
    /// Always this status.
    Status(u16),
    /// Sleep, then 200.
    Slow(Duration),
    /// The next `n` requests get `status`, then the mode becomes `Ok`.
    FailTimes(u32, u16),
    /// One status per request, in order, then the mode becomes `Ok`.
    Sequence(VecDeque<u16>),
}

/// What the receiver checks on every request.
#[derive(Debug, Clone)]
pub enum Check {
    /// Nothing (answers by mode only).
    None,
    /// mail_room postback: the JWT, signed with these 32 bytes.
    Mailroom(Vec<u8>),
    /// Webhook: `Mailgate-Signature` with this HMAC key, then the job JSON.
    Webhook(Vec<u8>),
}

/// What verification found in a request that passed it.
#[derive(Debug, Clone)]
pub enum Verified {
    Unchecked,
    /// The JWT's header and claims.
    Mailroom {
        alg: String,
        claims: serde_json::Value,
    },
    /// The signature's timestamp, the parsed body, and its `raw` decoded.
    Webhook {
        timestamp: i64,
        job: serde_json::Value,
        raw: Vec<u8>,
    },
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub verified: Result<Verified, String>,
    /// The status answered (for `Slow`: the one answered after the sleep).
    pub status: u16,
    pub at: SystemTime,
    /// The client's address (one per connection).
    pub peer: SocketAddr,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn ok(&self) -> bool {
        self.verified.is_ok()
    }

    /// The webhook's `Mailgate-Job-Id`.
    pub fn job_id(&self) -> Option<&str> {
        self.header("mailgate-job-id")
    }

    pub fn summary(&self) -> String {
        let verified = match &self.verified {
            Ok(Verified::Unchecked) => "unchecked".to_string(),
            Ok(Verified::Mailroom { .. }) => "jwt ok".to_string(),
            Ok(Verified::Webhook { job, .. }) => format!("signature ok, job {}", job["id"]),
            Err(e) => format!("REFUSED: {e}"),
        };
        format!(
            "{:?} {} {} from {} -> {} ({} bytes, job id {:?}, {verified})",
            self.at.duration_since(UNIX_EPOCH).unwrap_or_default(),
            self.method,
            self.path,
            self.peer,
            self.status,
            self.body.len(),
            self.job_id()
        )
    }
}

struct Shared {
    mode: Mutex<Mode>,
    check: Check,
    requests: Mutex<Vec<Recorded>>,
}

pub struct Receiver {
    pub port: u16,
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Receiver {
    /// A receiver that checks nothing.
    pub fn plain() -> Receiver {
        Receiver::start_with(Check::None)
    }

    /// GitLab's mail_room postback endpoint with this 32-byte secret.
    pub fn mailroom(secret: &[u8]) -> Receiver {
        assert_eq!(secret.len(), 32, "GitLab's mail_room secret is 32 bytes");
        Receiver::start_with(Check::Mailroom(secret.to_vec()))
    }

    /// A webhook consumer with this HMAC key.
    pub fn webhook(key: &[u8]) -> Receiver {
        Receiver::start_with(Check::Webhook(key.to_vec()))
    }

    pub fn start_with(check: Check) -> Receiver {
        let shared = Arc::new(Shared { mode: Mutex::new(Mode::Ok), check, requests: Mutex::new(Vec::new()) });
        let (runtime, port) = serve(shared.clone(), quiet_port());
        Receiver { port, shared, runtime: Mutex::new(Some(runtime)) }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode.lock().unwrap().clone()
    }

    /// The receiver goes away: its listener and every connection close.
    pub fn stop(&self) {
        if let Some(rt) = self.runtime.lock().unwrap().take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        // the port answers "connection refused" from now on
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Serves again on the same port.
    pub fn start(&self) {
        let mut slot = self.runtime.lock().unwrap();
        if slot.is_none() {
            let (rt, _) = serve(self.shared.clone(), self.port);
            *slot = Some(rt);
        }
    }

    pub fn is_running(&self) -> bool {
        self.runtime.lock().unwrap().is_some()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    pub fn clear(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// Waits until at least `n` requests were recorded; panics after `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            if Instant::now() > deadline {
                panic!("receiver: wanted {n} requests within {timeout:?}, got:\n{}", self.summary());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One line per request, for failure messages.
    pub fn summary(&self) -> String {
        let lines: Vec<String> = self.requests().iter().map(Recorded::summary).collect();
        if lines.is_empty() { "(no requests)".to_string() } else { lines.join("\n") }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.get_mut().ok().and_then(|r| r.take()) {
            rt.shutdown_background();
        }
    }
}

/// Binds `127.0.0.1:port` (0: any free port) and serves on a fresh runtime.
fn serve(shared: Arc<Shared>, port: u16) -> (tokio::runtime::Runtime, u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("test-receiver")
        .build()
        .expect("receiver runtime");
    let listener = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let bound = (|| {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
                socket.listen(1024)
            })();
            match bound {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("receiver cannot bind 127.0.0.1:{port}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let port = listener.local_addr().expect("receiver address").port();
    let app = Router::new().fallback(handle).with_state(shared);
    rt.spawn(async move {
        let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await;
    });
    (rt, port)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_list: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let verified = match &shared.check {
        Check::None => Ok(Verified::Unchecked),
        Check::Mailroom(secret) => verify_mailroom(&headers, secret, unix_now()),
        Check::Webhook(key) => verify_webhook(&headers, &body, key, unix_now()),
    };
    let (status, delay) = if let Err(e) = &verified {
        // GitLab answers a bad token with 401; a body that does not hold the job is a 400.
        (if e.starts_with("body:") { 400 } else { 401 }, None)
    } else {
        let mut mode = shared.mode.lock().unwrap();
        match &mut *mode {
            Mode::Ok => (200, None),
            Mode::Status(s) => (*s, None),
            Mode::Slow(d) => (200, Some(*d)),
            Mode::FailTimes(n, s) => {
                let s = *s;
                *n = n.saturating_sub(1);
                if *n == 0 {
                    *mode = Mode::Ok;
                }
                (s, None)
            }
            Mode::Sequence(q) => {
                let s = q.pop_front().unwrap_or(200);
                if q.is_empty() {
                    *mode = Mode::Ok;
                }
                (s, None)
            }
        }
    };
    shared.requests.lock().unwrap().push(Recorded {
        method: method.to_string(),
        path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| uri.path().to_string()),
        headers: header_list,
        body: body.to_vec(),
        verified,
        status,
        at: SystemTime::now(),
        peer,
    });
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match status {
        200..=299 => r#"{"success":true}"#.to_string(),
        401 => r#"{"message":"401 Unauthorized"}"#.to_string(),
        s => format!(r#"{{"message":"{s}"}}"#),
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A free loopback port below the kernel's ephemeral range: no outgoing connection (of
/// mailgate, the CLI, redis clients) takes it as its source port, so a server can be stopped
/// and started again on it, and parallel tests never pick the same one.
pub fn quiet_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: AtomicU64 = AtomicU64::new(0);
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|n| n.parse::<u16>().ok()))
        .unwrap_or(32768);
    const FIRST: u16 = 20000;
    if low <= FIRST + 1000 {
        return super::free_port();
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let _ =
        SEED.compare_exchange(0, nanos ^ (u64::from(std::process::id()) << 32) | 1, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..10_000 {
        // xorshift64*
        let mut x = SEED.load(Ordering::SeqCst);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        SEED.store(x, Ordering::SeqCst);
        let port = FIRST + (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as u16 % (low - FIRST);
        // the embedded defaults (another test runs `serve` on them) and redis' default port
        if [2424, 2525, 6379, 8025, 10040].contains(&port) {
            continue;
        }
        let mut taken = TAKEN.lock().unwrap();
        let taken = taken.get_or_insert_with(HashSet::new);
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    super::free_port()
}

/// Ports for a mailgate (see [`quiet_port`]).
pub fn quiet_ports() -> super::Ports {
    super::Ports { smtp: quiet_port(), lmtp: quiet_port(), policy: quiet_port(), http: quiet_port() }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64
}

/// GitLab's `Gitlab::MailRoom::Authenticator.verify_api_request`: HS256 only, issuer
/// `gitlab-mailroom`, no `exp` required; `iat` must be there and at most 5 minutes off.
pub fn verify_mailroom(headers: &HeaderMap, secret: &[u8], now: i64) -> Result<Verified, String> {
    let token = headers
        .get(MAILROOM_HEADER)
        .ok_or("no Gitlab-Mailroom-Api-Request header")?
        .to_str()
        .map_err(|_| "the JWT header is not ASCII")?;
    verify_mailroom_token(token, secret, now)
}

pub fn verify_mailroom_token(token: &str, secret: &[u8], now: i64) -> Result<Verified, String> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("JWT header: {e}"))?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256];
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["iss"]);
    validation.set_issuer(&[MAILROOM_ISSUER]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &DecodingKey::from_secret(secret), &validation)
        .map_err(|e| format!("JWT: {e}"))?;
    let claims = data.claims;
    let iat = claims.get("iat").and_then(|v| v.as_i64()).ok_or("JWT: no numeric iat claim")?;
    if (now - iat).abs() > MAX_SKEW_SECS {
        return Err(format!("JWT: iat {iat} is more than 5 minutes from now ({now})"));
    }
    Ok(Verified::Mailroom { alg: format!("{:?}", header.alg), claims })
}

/// `Mailgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`, then the body:
/// the job JSON whose `id` is `Mailgate-Job-Id`, with the message base64 in `raw`.
pub fn verify_webhook(headers: &HeaderMap, body: &[u8], key: &[u8], now: i64) -> Result<Verified, String> {
    let signature = headers
        .get("mailgate-signature")
        .ok_or("no Mailgate-Signature header")?
        .to_str()
        .map_err(|_| "Mailgate-Signature is not ASCII")?;
    let mut timestamp: Option<i64> = None;
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    for part in signature.split(',') {
        let (name, value) = part.trim().split_once('=').ok_or_else(|| format!("signature part {part:?}"))?;
        match name {
            "t" => timestamp = Some(value.parse().map_err(|_| format!("signature t={value:?}"))?),
            "v1" => candidates.push(hex::decode(value).map_err(|_| format!("signature v1={value:?} is not hex"))?),
            _ => {}
        }
    }
    let t = timestamp.ok_or("signature without t=")?;
    if candidates.is_empty() {
        return Err("signature without v1=".into());
    }
    let matched = candidates.iter().any(|sig| {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        mac.verify_slice(sig).is_ok()
    });
    if !matched {
        return Err("signature mismatch".into());
    }
    if (now - t).abs() > MAX_SKEW_SECS {
        return Err(format!("signature timestamp {t} is more than 5 minutes from now ({now})"));
    }
    let job_id =
        headers.get("mailgate-job-id").and_then(|v| v.to_str().ok()).ok_or("no Mailgate-Job-Id header")?.to_string();
    let job: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("body: not JSON: {e}"))?;
    if job.get("id").and_then(|v| v.as_str()) != Some(job_id.as_str()) {
        return Err(format!("body: id {} is not the Mailgate-Job-Id {job_id}", job["id"]));
    }
    let raw = job.get("raw").and_then(|v| v.as_str()).ok_or("body: no string \"raw\"")?;
    let raw =
        base64::engine::general_purpose::STANDARD.decode(raw).map_err(|e| format!("body: raw is not base64: {e}"))?;
    Ok(Verified::Webhook { timestamp: t, job, raw })
}

/// Builds a mail_room JWT the way mail_room does (for testing the receiver itself).
pub fn mailroom_token(secret: &[u8], iss: &str, iat: i64) -> String {
    let claims = serde_json::json!({"nonce": "0123456789abcdef01234567", "iat": iat, "iss": iss});
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).expect("encode JWT")
}

/// A webhook signature header value (for testing the receiver itself).
pub fn webhook_signature(key: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("HTTP {}: not JSON ({e}): {}", self.status, self.text()))
    }
}

/// A blocking HTTP/1.1 request to 127.0.0.1:port (one connection per request). `Err` when the
/// connection fails.
pub fn http(
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header end in {:?}", String::from_utf8_lossy(&all))))?;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let mut rest = all[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        rest = dechunk(&rest)?;
    }
    Ok(HttpResponse { status, headers, body: rest })
}

fn dechunk(mut data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| std::io::Error::other("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size_text:?}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(std::io::Error::other("short chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Shorthand: GET, panicking when the connection fails.
pub fn http_get(port: u16, path: &str) -> HttpResponse {
    http("GET", port, path, &[], b"").unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// Shorthand: POST with an empty body, panicking when the connection fails.
pub fn http_post(port: u16, path: &str) -> HttpResponse {
    http("POST", port, path, &[], b"").unwrap_or_else(|e| panic!("POST {path} on port {port}: {e}"))
}

/// Distinct values, for "every job was seen" checks.
pub fn distinct<'a>(items: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
    items.into_iter().map(str::to_string).collect()
}
