//! Restarts in the middle of deliveries (kill -9 and SIGTERM) lose nothing, and the metrics a
//! delivery leaves behind.

mod common;

use common::delivery::*;

fn restart_mid_delivery(sigterm: bool) {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Slow(Duration::from_secs(5)));
    let url = rx.url(HOOK_PATH);
    let mut env = Env::start(|d| webhook_toml(d, &url, "10s", MANY_RETRIES), "");
    let ids: Vec<String> = (0..6).map(|i| env.send(&rcpt(), &format!("restart{i}@example.org"))).collect();
    let o = env.cli(&["queue", "list", "--json"]);
    let listed: HashSet<String> =
        json_values(&stdout(&o)).iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, ids.iter().cloned().collect::<HashSet<_>>());
    // requests are in flight (the receiver holds them for 5 s)
    rx.wait_requests(2, WAIT);
    if sigterm {
        let code = env.server.stop();
        assert_eq!(code, Some(0), "clean exit on SIGTERM during deliveries; log:\n{}", env.log_tail());
    } else {
        env.server.kill9();
    }
    rx.set_mode(Mode::Ok);
    env.restart();
    for id in &ids {
        env.wait_state(id, "done", Some(&rx));
    }
    let reqs = rx.requests();
    for id in &ids {
        assert!(
            requests_for(&reqs, id).iter().any(|r| r.ok() && r.status == 200),
            "the receiver never accepted {id}:\n{}",
            rx.summary()
        );
    }
    let o = env.cli(&["queue", "stats", "--json"]);
    let stats: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["done"], ids.len(), "{stats}");
    assert_eq!(
        (stats["ready"].as_u64(), stats["leased"].as_u64(), stats["dead"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
}

#[test]
fn kill_9_mid_delivery_loses_nothing() {
    restart_mid_delivery(false);
}

#[test]
fn sigterm_mid_delivery_loses_nothing() {
    restart_mid_delivery(true);
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// `(labels, value)` of every sample of `name` in Prometheus/OpenMetrics text.
fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let mut map = HashMap::new();
        let mut rest = labels;
        while let Some((k, after)) = rest.split_once("=\"") {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            map.insert(k.trim_start_matches(',').trim().to_string(), value);
            rest = &after[end..];
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            out.push((map, v));
        }
    }
    out
}

/// The sum of the samples of `name` whose labels include `want`; `None` when there is none.
fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = samples(text, name)
        .into_iter()
        .filter(|(l, _)| want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| v)
        .collect();
    if hits.is_empty() { None } else { Some(hits.iter().sum()) }
}

#[test]
fn metrics_show_delivery_counters_and_queue_gauges() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::FailTimes(1, 500));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "metrics@example.org");
    let mut c = Client::connect(env.ports.smtp);
    c.cmd("EHLO client.example.org");
    assert!(c.cmd("MAIL FROM:<alice@example.org>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<incoming+not-a-key@localhost>").starts_with("550"));
    c.cmd("QUIT");
    env.wait_state(&id, "done", Some(&rx));

    let r = http_get(env.ports.http, "/metrics");
    let ct = r.header("content-type").unwrap_or_default().to_string();
    assert!(ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"), "{ct}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let attempts = "mailgate_delivery_attempts_total";
    let hook = [("deliverer", "hook"), ("kind", "webhook")];
    let text = loop {
        let text = env.metrics();
        let delivered = metric(&text, attempts, &[hook[0], hook[1], ("outcome", "delivered")]);
        let done = metric(&text, "mailgate_queue_jobs", &[("mailbox", "incoming"), ("state", "done")]);
        if delivered == Some(1.0) && done == Some(1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "delivered {delivered:?}, done gauge {done:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(metric(&text, attempts, &hook), Some(2.0), "one failed and one delivered attempt:\n{text}");
    assert_eq!(
        metric(&text, "mailgate_queue_jobs", &[("mailbox", "incoming"), ("state", "ready")]).unwrap_or(0.0),
        0.0
    );
    assert!(metric(&text, "mailgate_accepted_total", &[]) >= Some(1.0), "{text}");
    assert!(metric(&text, "mailgate_sessions_total", &[]) >= Some(2.0), "{text}");
    assert!(metric(&text, "mailgate_refused_total", &[("reason", "unknown_key")]) >= Some(1.0), "{text}");
}
