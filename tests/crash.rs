//! Durability under kill -9: parallel sessions with unique Message-IDs, the server killed at
//! random points and restarted on the same spool, several times. Every message that got 250
//! must be in the queue afterwards, exactly once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const SENDERS: usize = 8;
const CYCLES: usize = 4;

/// One sender: sends messages until told to stop or the connection dies; records the
/// Message-IDs that got 250.
fn sender(port: u16, n: usize, next: Arc<AtomicUsize>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<String>>>) {
    let rcpt = format!("incoming+{KEY}@localhost");
    while !stop.load(Ordering::SeqCst) {
        let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut conn = RawConn::new(s);
        if !conn.expect("220") || !conn.send_expect("EHLO crash.test\r\n", "250 ") {
            continue;
        }
        while !stop.load(Ordering::SeqCst) {
            let seq = next.fetch_add(1, Ordering::SeqCst);
            let mid = format!("crash-{n}-{seq}@test");
            let body = message(&mid, "crash", "");
            let cmds = format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
            if !conn.send_expect(&cmds, "250") || !conn.expect("250") || !conn.expect("354") {
                break;
            }
            if !conn.send_expect(&format!("{body}.\r\n"), "250 2.0.0 Ok: queued") {
                break;
            }
            if let Ok(mut a) = acked.lock() {
                a.push(mid);
            }
        }
    }
}

struct RawConn {
    r: std::io::BufReader<std::net::TcpStream>,
    w: std::net::TcpStream,
}

impl RawConn {
    fn new(s: std::net::TcpStream) -> RawConn {
        let w = s.try_clone().expect("clone");
        RawConn { r: std::io::BufReader::new(s), w }
    }
    /// Reads one reply; true if its last line starts with `prefix`.
    fn expect(&mut self, prefix: &str) -> bool {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) => {
                    if line.as_bytes().get(3) == Some(&b'-') {
                        continue;
                    }
                    return line.starts_with(prefix);
                }
            }
        }
    }
    fn send_expect(&mut self, data: &str, prefix: &str) -> bool {
        use std::io::Write;
        self.w.write_all(data.as_bytes()).is_ok() && self.expect(prefix)
    }
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), &ports, "", "");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut seed: u64 = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for cycle in 0..CYCLES {
        let mut server = Server::start(&config, ports.smtp, ports.http);
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..SENDERS)
            .map(|n| {
                let (next, stop, acked) = (next.clone(), stop.clone(), acked.clone());
                std::thread::spawn(move || sender(ports.smtp, n, next, stop, acked))
            })
            .collect();
        // xorshift: a random kill point between 200 and 1200 ms
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(200 + seed % 1000));
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            let _ = t.join();
        }
        eprintln!("cycle {cycle}: {} acknowledged so far", acked.lock().map(|a| a.len()).unwrap_or(0));
    }
    // reconcile with the server stopped: the CLI opens the spool directly
    let o = cli(&config, &["queue", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for job in json_values(&stdout(&o)) {
        let mid = job["message"]["message_id"].as_str().unwrap_or_default().to_string();
        *counts.entry(mid).or_default() += 1;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the load should have delivered something: {}", acked.len());
    let lost: Vec<&String> = acked.iter().filter(|m| !counts.contains_key(*m)).collect();
    let doubled: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "{} acknowledged messages lost, e.g. {:?}", lost.len(), lost.first());
    assert!(doubled.is_empty(), "messages stored twice: {doubled:?}");
    eprintln!("{} acknowledged, {} stored, none lost", acked.len(), counts.len());
}
