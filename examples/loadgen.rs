//! Load generator for `make bench`: N parallel SMTP sessions sending M messages of S bytes,
//! reporting messages/s and the latency from the end of DATA (the final ".") to the 250.
//!
//!   cargo run --release --example loadgen -- 127.0.0.1:2525 --sessions 20 --messages 20000 --size 4096
//!
//! Prints one JSON object: {"messages", "seconds", "per_second", "p50_ms", "p99_ms", "errors"}.
//!
//! `--from ADDR` sets the sender (envelope and From:), `--dkim ed25519|rsa2048` DKIM-signs every
//! message for the sender's domain (selector s1 / s2, keys from tests/fixtures/keys) before the
//! timed run starts, so signing costs nothing during it.
//!
//! `--times FILE` writes one line per message accepted with a 250 after DATA: its Message-ID
//! (without angle brackets), a tab, and the wall-clock time (unix seconds, microseconds) at which
//! the 250 arrived; the Postfix bench matches it against the jobs' `received_at`.

#[path = "../tests/common/fixtures.rs"]
mod fixtures;

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    sessions: usize,
    messages: usize,
    size: usize,
    rcpt: String,
    from: String,
    dkim: Option<fixtures::KeyKind>,
    times: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        addr: it.next().ok_or("usage: loadgen ADDR [--sessions N] [--messages M] [--size S] [--rcpt ADDR] [--from ADDR] [--dkim KIND] [--times FILE]")?,
        sessions: 20,
        messages: 20_000,
        size: 4096,
        rcpt: "incoming+0123456789abcdef0123456789abcdef@localhost".into(),
        from: "load@example.org".into(),
        dkim: None,
        times: None,
    };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sessions" => a.sessions = v.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--messages" => a.messages = v.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--size" => a.size = v.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--rcpt" => a.rcpt = v,
            "--from" => a.from = v,
            "--times" => a.times = Some(v),
            "--dkim" => {
                a.dkim = Some(match v.as_str() {
                    "ed25519" => fixtures::KeyKind::Ed25519,
                    "rsa2048" => fixtures::KeyKind::Rsa2048,
                    other => return Err(format!("--dkim {other}: ed25519 or rsa2048")),
                })
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

async fn reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<String> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line);
        }
    }
}

/// Every message of one session with its Message-ID, dot-terminated and ready to send.
fn messages(a: &Args, id: usize, count: usize) -> Vec<(String, Vec<u8>)> {
    let filler_line = "x".repeat(76);
    let domain = a.from.rsplit_once('@').map(|(_, d)| d).unwrap_or("example.org");
    (0..count)
        .map(|n| {
            let message_id = format!("load-{id}-{n}-{}@example.org", std::process::id());
            let mut body = format!(
                "From: {}\r\nTo: {}\r\nMessage-ID: <{message_id}>\r\nSubject: load {n}\r\nDate: Tue, 04 Mar 2025 10:15:00 +0000\r\n\r\n",
                a.from, a.rcpt
            );
            while body.len() + 80 <= a.size {
                body.push_str(&filler_line);
                body.push_str("\r\n");
            }
            let mut raw = match a.dkim {
                Some(kind @ fixtures::KeyKind::Rsa2048) => fixtures::sign(kind, domain, "s2", body.as_bytes(), None),
                Some(kind) => fixtures::sign(kind, domain, "s1", body.as_bytes(), None),
                None => body.into_bytes(),
            };
            raw.extend_from_slice(b".\r\n");
            (message_id, raw)
        })
        .collect()
}

/// One session's results: end-of-DATA latencies, errors, and (Message-ID, unix time of the 250)
/// per accepted message.
type SessionResult = (Vec<Duration>, usize, Vec<(String, f64)>);

async fn session(a: std::sync::Arc<Args>, bodies: Vec<(String, Vec<u8>)>) -> std::io::Result<SessionResult> {
    let count = bodies.len();
    let s = TcpStream::connect(&a.addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    reply(&mut r).await?;
    w.write_all(b"EHLO loadgen.example\r\n").await?;
    reply(&mut r).await?;
    let mut lat = Vec::with_capacity(count);
    let mut errors = 0;
    let mut times = Vec::with_capacity(if a.times.is_some() { count } else { 0 });
    for (message_id, body) in bodies {
        let head = format!("MAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n", a.from, a.rcpt);
        w.write_all(head.as_bytes()).await?;
        for _ in 0..3 {
            reply(&mut r).await?;
        }
        let t = Instant::now();
        w.write_all(&body).await?;
        let line = reply(&mut r).await?;
        lat.push(t.elapsed());
        if !line.starts_with("250") {
            errors += 1;
        } else if a.times.is_some() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            times.push((message_id, now.as_secs_f64()));
        }
    }
    w.write_all(b"QUIT\r\n").await?;
    Ok((lat, errors, times))
}

#[tokio::main]
async fn main() {
    let a = match parse_args() {
        Ok(a) => std::sync::Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let per = a.messages / a.sessions.max(1);
    // Every message is built (and signed) before the clock starts: the run measures the server.
    let bodies: Vec<_> = (0..a.sessions).map(|i| messages(&a, i, per)).collect();
    let start = Instant::now();
    let tasks: Vec<_> = bodies.into_iter().map(|b| tokio::spawn(session(a.clone(), b))).collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut times = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok((lat, e, ts))) => {
                all.extend(lat);
                errors += e;
                times.extend(ts);
            }
            Ok(Err(e)) => {
                eprintln!("session failed: {e}");
                errors += 1;
            }
            Err(e) => {
                eprintln!("task failed: {e}");
                errors += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(path) = &a.times {
        let text: String = times.iter().map(|(id, t)| format!("{id}\t{t:.6}\n")).collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("--times {path}: {e}");
            std::process::exit(1);
        }
    }
    all.sort();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
    println!(
        "{{\"messages\":{},\"seconds\":{:.3},\"per_second\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{}}}",
        all.len(),
        secs,
        all.len() as f64 / secs,
        ms(pct(0.50)),
        ms(pct(0.99)),
        errors
    );
}
