//! Load generator for `make bench`: N parallel SMTP sessions sending M messages of S bytes,
//! reporting messages/s and the latency from the end of DATA (the final ".") to the 250.
//!
//!   cargo run --release --example loadgen -- 127.0.0.1:2525 --sessions 20 --messages 20000 --size 4096
//!
//! Prints one JSON object: {"messages", "seconds", "per_second", "p50_ms", "p99_ms", "errors"}.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Args {
    addr: String,
    sessions: usize,
    messages: usize,
    size: usize,
    rcpt: String,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        addr: it.next().ok_or("usage: loadgen ADDR [--sessions N] [--messages M] [--size S] [--rcpt ADDR]")?,
        sessions: 20,
        messages: 20_000,
        size: 4096,
        rcpt: "incoming+0123456789abcdef0123456789abcdef@localhost".into(),
    };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sessions" => a.sessions = v.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--messages" => a.messages = v.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--size" => a.size = v.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--rcpt" => a.rcpt = v,
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

async fn session(a: std::sync::Arc<Args>, id: usize, count: usize) -> std::io::Result<(Vec<Duration>, usize)> {
    let s = TcpStream::connect(&a.addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    reply(&mut r).await?;
    w.write_all(b"EHLO loadgen.example\r\n").await?;
    reply(&mut r).await?;
    let filler_line = "x".repeat(76);
    let mut lat = Vec::with_capacity(count);
    let mut errors = 0;
    for n in 0..count {
        let mut body = format!(
            "From: load@example.org\r\nTo: {}\r\nMessage-ID: <load-{id}-{n}-{}@example.org>\r\nSubject: load {n}\r\n\r\n",
            a.rcpt,
            std::process::id()
        );
        while body.len() + 80 <= a.size {
            body.push_str(&filler_line);
            body.push_str("\r\n");
        }
        body.push_str(".\r\n");
        let head = format!("MAIL FROM:<load@example.org>\r\nRCPT TO:<{}>\r\nDATA\r\n", a.rcpt);
        w.write_all(head.as_bytes()).await?;
        for _ in 0..3 {
            reply(&mut r).await?;
        }
        let t = Instant::now();
        w.write_all(body.as_bytes()).await?;
        let line = reply(&mut r).await?;
        lat.push(t.elapsed());
        if !line.starts_with("250") {
            errors += 1;
        }
    }
    w.write_all(b"QUIT\r\n").await?;
    Ok((lat, errors))
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
    let start = Instant::now();
    let tasks: Vec<_> = (0..a.sessions).map(|i| tokio::spawn(session(a.clone(), i, per))).collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Ok((lat, e))) => {
                all.extend(lat);
                errors += e;
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
