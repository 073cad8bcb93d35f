//! Receiver for the delivery benchmark (scripts/bench-delivery.sh): records, per delivered
//! message, its Message-ID and the wall-clock time at which it arrived.
//!
//!   deliverysink http 127.0.0.1:8080 [--expect N] [--out FILE] [--idle-exit SECONDS]
//!   deliverysink redis redis://127.0.0.1:6379/0 queue:default [--expect N] [--out FILE] [--idle-exit SECONDS]
//!
//! `http`: answers every POST (any path) whose body is JSON with `message.message_id` (mailgate's
//! webhook and mail_room-style job JSON) with 200 `{"success":true}`, anything else with 400.
//! `redis`: pops Sidekiq jobs off the list (BRPOP, then RPOP in batches of what is waiting) and
//! takes the Message-ID header from `args[0]`, the raw message.
//!
//! `--expect N` exits after N records, `--idle-exit S` when nothing arrived for S seconds (also
//! before the first one), SIGTERM/SIGINT at once. `--out FILE` then gets one line per record,
//! `message_id<TAB>unix seconds` (angle brackets removed, like `loadgen --times`), and stdout one
//! JSON object: {"received", "unique", "first", "last", "per_second"} (per_second over first..last).
//! Requests the sink cannot use are counted on stderr, not recorded.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::Notify;

const USAGE: &str =
    "usage: deliverysink http ADDR | redis URL QUEUE_KEY  [--expect N] [--out FILE] [--idle-exit SECONDS]";

enum Mode {
    Http(String),
    Redis(String, String),
}

struct Args {
    mode: Mode,
    expect: Option<usize>,
    out: Option<String>,
    idle_exit: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = match it.next().as_deref() {
        Some("http") => Mode::Http(it.next().ok_or(USAGE)?),
        Some("redis") => {
            let url = it.next().ok_or(USAGE)?;
            Mode::Redis(url, it.next().ok_or(USAGE)?)
        }
        _ => return Err(USAGE.into()),
    };
    let mut a = Args { mode, expect: None, out: None, idle_exit: None };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--expect" => a.expect = Some(v.parse().map_err(|e| format!("{flag}: {e}"))?),
            "--out" => a.out = Some(v),
            "--idle-exit" => {
                let s: f64 = v.parse().map_err(|e| format!("{flag}: {e}"))?;
                a.idle_exit = Some(Duration::try_from_secs_f64(s).map_err(|e| format!("{flag}: {e}"))?);
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// Every arrival, and a wake-up for the main task on each one.
struct Recorder {
    records: Mutex<Vec<(String, f64)>>,
    last_arrival: Mutex<Instant>,
    expect: Option<usize>,
    changed: Notify,
}

impl Recorder {
    fn record(&self, message_id: &str) {
        let t = unix_now();
        let n = {
            let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            records.push((message_id.trim().trim_start_matches('<').trim_end_matches('>').to_string(), t));
            records.len()
        };
        *self.last_arrival.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if self.expect.is_some_and(|e| n >= e) {
            self.changed.notify_one();
        }
    }

    fn count(&self) -> usize {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn idle_for(&self) -> Duration {
        self.last_arrival.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

// --- http ----------------------------------------------------------------------------------

#[derive(Deserialize)]
struct JobBody {
    message: MessageInfo,
}

#[derive(Deserialize)]
struct MessageInfo {
    message_id: String,
}

async fn http_handler(State(rec): State<Arc<Recorder>>, method: Method, body: Bytes) -> Response {
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST only\n").into_response();
    }
    match serde_json::from_slice::<JobBody>(&body) {
        Ok(job) => {
            rec.record(&job.message.message_id);
            (StatusCode::OK, axum::Json(serde_json::json!({"success": true}))).into_response()
        }
        Err(e) => {
            eprintln!("deliverysink: unusable request body: {e}");
            (StatusCode::BAD_REQUEST, format!("not job JSON: {e}\n")).into_response()
        }
    }
}

async fn serve_http(addr: String, rec: Arc<Recorder>) {
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind the http address");
    let app = Router::new().fallback(http_handler).layer(DefaultBodyLimit::max(256 << 20)).with_state(rec);
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("deliverysink: http server: {e}");
    }
}

// --- redis ---------------------------------------------------------------------------------

#[derive(Deserialize)]
struct SidekiqJob {
    args: Vec<serde_json::Value>,
}

/// The Message-ID header's value in the header block of `raw` (unfolded headers only).
fn message_id(raw: &str) -> Option<&str> {
    for line in raw.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("message-id")
        {
            return Some(value.trim());
        }
    }
    None
}

fn record_sidekiq(rec: &Recorder, payload: &[u8]) {
    let raw = match serde_json::from_slice::<SidekiqJob>(payload) {
        Ok(job) => job.args.into_iter().next(),
        Err(e) => {
            eprintln!("deliverysink: unusable Sidekiq job: {e}");
            return;
        }
    };
    match raw.as_ref().and_then(|v| v.as_str()).and_then(message_id) {
        Some(id) => rec.record(id),
        None => eprintln!("deliverysink: a Sidekiq job without a raw message with a Message-ID"),
    }
}

async fn consume_redis(url: String, key: String, rec: Arc<Recorder>) {
    let client = redis::Client::open(url.as_str()).expect("redis URL");
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.expect("connect to Redis");
    loop {
        // BRPOP with a short timeout, so that the idle check in main keeps running.
        let popped: redis::RedisResult<Option<(String, Vec<u8>)>> =
            redis::cmd("BRPOP").arg(&key).arg(0.5).query_async(&mut conn).await;
        match popped {
            Ok(Some((_, payload))) => record_sidekiq(&rec, &payload),
            Ok(None) => continue,
            Err(e) => {
                eprintln!("deliverysink: BRPOP: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        // Then whatever else is waiting, in batches (one round trip each).
        loop {
            let batch: redis::RedisResult<Option<Vec<Vec<u8>>>> =
                redis::cmd("RPOP").arg(&key).arg(256).query_async(&mut conn).await;
            match batch {
                Ok(Some(items)) if !items.is_empty() => items.iter().for_each(|p| record_sidekiq(&rec, p)),
                Ok(_) => break,
                Err(e) => {
                    eprintln!("deliverysink: RPOP: {e}");
                    break;
                }
            }
        }
    }
}

// --- main ----------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rec = Arc::new(Recorder {
        records: Mutex::new(Vec::new()),
        last_arrival: Mutex::new(Instant::now()),
        expect: a.expect,
        changed: Notify::new(),
    });
    let task = match a.mode {
        Mode::Http(addr) => tokio::spawn(serve_http(addr, rec.clone())),
        Mode::Redis(url, key) => tokio::spawn(consume_redis(url, key, rec.clone())),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    loop {
        if a.expect.is_some_and(|e| rec.count() >= e) {
            break;
        }
        if a.idle_exit.is_some_and(|idle| rec.idle_for() >= idle) {
            eprintln!(
                "deliverysink: nothing arrived for {:?}; exiting with {} records",
                a.idle_exit.unwrap_or_default(),
                rec.count()
            );
            break;
        }
        tokio::select! {
            _ = rec.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    task.abort();

    let records = std::mem::take(&mut *rec.records.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(path) = &a.out {
        let text: String = records.iter().map(|(id, t)| format!("{id}\t{t:.6}\n")).collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("--out {path}: {e}");
            std::process::exit(1);
        }
    }
    let unique = records.iter().map(|(id, _)| id.as_str()).collect::<std::collections::HashSet<_>>().len();
    let first = records.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    let last = records.iter().map(|r| r.1).fold(f64::NEG_INFINITY, f64::max);
    let (first, last) = if records.is_empty() { (0.0, 0.0) } else { (first, last) };
    let per_second = if last > first { records.len() as f64 / (last - first) } else { 0.0 };
    println!(
        "{{\"received\":{},\"unique\":{unique},\"first\":{first:.6},\"last\":{last:.6},\"per_second\":{per_second:.0}}}",
        records.len()
    );
}
