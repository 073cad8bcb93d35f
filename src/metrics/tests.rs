use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::*;

fn empty_queue() -> QueueSnapshot {
    QueueSnapshot::default()
}

/// The sample lines of `text` (not comments), as `(series, value)` where series is `name{labels}` or `name`.
fn samples(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line has a value");
            (series.to_owned(), value.to_owned())
        })
        .collect()
}

fn value(text: &str, series: &str) -> Option<String> {
    samples(text).get(series).cloned()
}

/// Checks that `text` is a well-formed exposition, line by line, and returns the number of sample lines.
///
/// - `# HELP name text`, `# TYPE name type`, `# UNIT name unit` are well-formed, each family declared once, HELP
///   then TYPE;
/// - every other line is `name value` or `name{l="v",...} value`, with a valid metric name, valid label names,
///   label values using only the `\\`, `\"`, `\n` escapes, no repeated label, and a number as value;
/// - every sample belongs to the family declared just above it (its name, or name + a suffix of its type);
/// - `# EOF` appears exactly once, as the very last line, and the text ends with a newline.
fn check_exposition(text: &str) -> usize {
    assert!(text.ends_with("# EOF\n"), "exposition must end with a single # EOF line");
    let lines: Vec<&str> = text.lines().collect();
    let eofs = lines.iter().filter(|l| **l == "# EOF").count();
    assert_eq!(eofs, 1, "exactly one # EOF");

    let mut declared: HashSet<String> = HashSet::new();
    let mut family: Option<(String, String)> = None; // (name, type)
    let mut help_for: Option<String> = None;
    let mut seen_series: HashSet<String> = HashSet::new();
    let mut count = 0;
    for (i, line) in lines.iter().enumerate() {
        let ctx = format!("line {}: {line:?}", i + 1);
        assert!(!line.is_empty(), "{ctx}: empty line");
        if *line == "# EOF" {
            assert_eq!(i, lines.len() - 1, "{ctx}: # EOF not last");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let (keyword, rest) = rest.split_once(' ').unwrap_or_else(|| panic!("{ctx}: bad comment"));
            let (name, arg) = rest.split_once(' ').unwrap_or_else(|| panic!("{ctx}: missing argument"));
            assert!(is_metric_name(name), "{ctx}: bad metric name");
            assert!(!arg.is_empty(), "{ctx}: empty argument");
            match keyword {
                "HELP" => {
                    assert!(!arg.contains('\n'), "{ctx}");
                    assert!(declared.insert(name.to_owned()), "{ctx}: family declared twice");
                    help_for = Some(name.to_owned());
                }
                "TYPE" => {
                    assert_eq!(help_for.as_deref(), Some(name), "{ctx}: TYPE without its HELP just above");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"].contains(&arg),
                        "{ctx}: bad type"
                    );
                    family = Some((name.to_owned(), arg.to_owned()));
                }
                "UNIT" => {
                    let (fam, _) = family.as_ref().unwrap_or_else(|| panic!("{ctx}: UNIT before TYPE"));
                    assert_eq!(fam, name, "{ctx}: UNIT for another family");
                    assert!(name.ends_with(&format!("_{arg}")), "{ctx}: name must end with its unit");
                }
                other => panic!("{ctx}: unknown comment keyword {other}"),
            }
            continue;
        }

        // A sample.
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{ctx}: no value"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "{ctx}: bad value {value:?}");
        let (name, labels) = match series.find('{') {
            Some(open) => (&series[..open], Some(&series[open..])),
            None => (series, None),
        };
        assert!(is_metric_name(name), "{ctx}: bad metric name");
        let (fam, typ) = family.as_ref().unwrap_or_else(|| panic!("{ctx}: sample before any TYPE"));
        let suffixes: &[&str] = match typ.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[""],
        };
        assert!(
            suffixes.iter().any(|s| name == format!("{fam}{s}")),
            "{ctx}: sample does not belong to family {fam} ({typ})"
        );
        let mut names = Vec::new();
        if let Some(labels) = labels {
            names = parse_labels(labels).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        }
        let unique: HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{ctx}: repeated label");
        if typ == "histogram" && name.ends_with("_bucket") {
            assert!(names.iter().any(|n| n == "le"), "{ctx}: bucket without le");
        }
        assert!(seen_series.insert(series.to_owned()), "{ctx}: series repeated");
        count += 1;
    }
    count
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `{a="x",b="y"}` exactly (the whole string), returning the label names.
fn parse_labels(text: &str) -> Result<Vec<String>, String> {
    let mut rest = text.strip_prefix('{').ok_or("no {")?;
    let mut names = Vec::new();
    if let Some(r) = rest.strip_prefix('}') {
        return if r.is_empty() { Ok(names) } else { Err("text after }".into()) };
    }
    loop {
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        names.push(name.to_owned());
        rest = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((_, '\n')) => return Err("raw newline in label value".into()),
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\' | '"' | 'n')) => {}
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((i, '"')) => break i,
                Some(_) => {}
            }
        };
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if let Some(r) = rest.strip_prefix('}') {
            return if r.is_empty() { Ok(names) } else { Err("text after }".into()) };
        } else {
            return Err("expected , or } after a label".into());
        }
    }
}

#[test]
fn metrics_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Metrics>();
    assert_send_sync::<QueueSnapshot>();
}

#[test]
fn global_is_one_instance_and_new_is_independent() {
    assert!(std::ptr::eq(global(), global()));
    let m = Metrics::new();
    m.session("smtp", "metrics-test-independence");
    let series = r#"mailgate_sessions_total{listener="smtp",outcome="metrics-test-independence"}"#;
    assert_eq!(value(&m.render(&empty_queue()), series).as_deref(), Some("1"));
    assert_eq!(value(&global().render(&empty_queue()), series), None);
    assert_eq!(value(&Metrics::new().render(&empty_queue()), series), None);
}

#[test]
fn empty_metrics_render_only_the_plain_gauges() {
    // prometheus-client leaves out a labelled family with no series yet (HELP and TYPE included);
    // the unlabelled stress gauge and counter are always there.
    let text = Metrics::new().render(&empty_queue());
    check_exposition(&text);
    assert_eq!(
        text,
        "# HELP mailgate_listeners_under_stress Listeners in stress mode now (80% of max_connections in use, until under 70%).\n\
         # TYPE mailgate_listeners_under_stress gauge\n\
         mailgate_listeners_under_stress 0\n\
         # HELP mailgate_stress_episodes Times a listener went into stress mode.\n\
         # TYPE mailgate_stress_episodes counter\n\
         mailgate_stress_episodes_total 0\n\
         # HELP mailgate_queue_oldest_ready_age_seconds Age of the oldest ready job in the spool, 0 when there is none.\n\
         # TYPE mailgate_queue_oldest_ready_age_seconds gauge\n\
         # UNIT mailgate_queue_oldest_ready_age_seconds seconds\n\
         mailgate_queue_oldest_ready_age_seconds 0.0\n\
         # HELP mailgate_rejects_stored Reject-log entries currently stored.\n\
         # TYPE mailgate_rejects_stored gauge\n\
         mailgate_rejects_stored 0\n\
         # EOF\n"
    );
}

#[test]
fn every_family_renders_once_used() {
    let m = Metrics::new();
    m.session("smtp", "quit");
    m.accepted("smtp", "support");
    m.refused("unknown_key", "reject", "rcpt");
    m.duplicate("support");
    m.delivery_attempt("app", "webhook", "delivered", Duration::from_millis(5));
    m.delivered("app", "webhook", Duration::from_millis(5));
    let queue = QueueSnapshot { depth: vec![("support".into(), "ready".into(), 1)], ..QueueSnapshot::default() };
    let text = m.render(&queue);
    check_exposition(&text);
    for (name, typ) in [
        ("mailgate_sessions", "counter"),
        ("mailgate_accepted", "counter"),
        ("mailgate_refused", "counter"),
        ("mailgate_duplicates", "counter"),
        ("mailgate_delivery_attempts", "counter"),
        ("mailgate_delivery_attempt_duration_seconds", "histogram"),
        ("mailgate_delivery_latency_seconds", "histogram"),
        ("mailgate_queue_jobs", "gauge"),
        ("mailgate_queue_oldest_ready_age_seconds", "gauge"),
        ("mailgate_rejects_stored", "gauge"),
    ] {
        assert!(text.contains(&format!("\n# TYPE {name} {typ}\n")), "{name} missing:\n{text}");
        assert!(text.contains(&format!("# HELP {name} ")), "{name} HELP missing:\n{text}");
    }
    assert!(!text.contains("_total_total"));
}

#[test]
fn counters_increment_and_render_with_exact_names_and_labels() {
    let m = Metrics::new();
    m.session("smtp", "quit");
    m.session("smtp", "quit");
    m.session("lmtp", "timeout");
    m.session("policy", "some-new-word");
    m.accepted("smtp", "support");
    m.accepted("smtp", "support");
    m.accepted("lmtp", "billing");
    m.refused("unknown_key", "reject", "rcpt");
    m.refused("spf_fail", "tempfail", "mail");
    m.refused("spf_fail", "tempfail", "mail");
    m.duplicate("support");
    m.delivery_attempt("app", "webhook", "retry", Duration::from_millis(30));
    m.delivery_attempt("app", "webhook", "delivered", Duration::from_millis(40));
    m.delivery_attempt("rails", "sidekiq", "dead", Duration::from_millis(2));
    m.delivered("app", "webhook", Duration::from_secs(90));

    let text = m.render(&empty_queue());
    let n = check_exposition(&text);
    assert!(n > 10);
    let expect = [
        (r#"mailgate_sessions_total{listener="smtp",outcome="quit"}"#, "2"),
        (r#"mailgate_sessions_total{listener="lmtp",outcome="timeout"}"#, "1"),
        (r#"mailgate_sessions_total{listener="policy",outcome="some-new-word"}"#, "1"),
        (r#"mailgate_accepted_total{listener="smtp",mailbox="support"}"#, "2"),
        (r#"mailgate_accepted_total{listener="lmtp",mailbox="billing"}"#, "1"),
        (r#"mailgate_refused_total{reason="unknown_key",action="reject",stage="rcpt"}"#, "1"),
        (r#"mailgate_refused_total{reason="spf_fail",action="tempfail",stage="mail"}"#, "2"),
        (r#"mailgate_duplicates_total{mailbox="support"}"#, "1"),
        (r#"mailgate_delivery_attempts_total{deliverer="app",kind="webhook",outcome="retry"}"#, "1"),
        (r#"mailgate_delivery_attempts_total{deliverer="app",kind="webhook",outcome="delivered"}"#, "1"),
        (r#"mailgate_delivery_attempts_total{deliverer="rails",kind="sidekiq",outcome="dead"}"#, "1"),
        (r#"mailgate_delivery_attempt_duration_seconds_count{deliverer="app",kind="webhook"}"#, "2"),
        (r#"mailgate_delivery_attempt_duration_seconds_count{deliverer="rails",kind="sidekiq"}"#, "1"),
        (r#"mailgate_delivery_latency_seconds_count{deliverer="app",kind="webhook"}"#, "1"),
        (r#"mailgate_delivery_latency_seconds_sum{deliverer="app",kind="webhook"}"#, "90.0"),
    ];
    for (series, want) in expect {
        assert_eq!(value(&text, series).as_deref(), Some(want), "{series} in:\n{text}");
    }
    // Counter families are declared without `_total` (OpenMetrics), their samples carry it exactly once.
    assert!(text.contains("\n# TYPE mailgate_sessions counter\n"));
    assert!(!text.contains("_total_total"));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("mailgate_"), "{line}");
    }
}

#[test]
fn histogram_buckets_are_present_and_cumulative() {
    let m = Metrics::new();
    m.delivery_attempt("app", "webhook", "delivered", Duration::from_millis(200));
    m.delivered("app", "webhook", Duration::from_secs(2 * 3600));
    let text = m.render(&empty_queue());
    check_exposition(&text);

    let attempt = |le: &str| {
        value(
            &text,
            &format!(
                r#"mailgate_delivery_attempt_duration_seconds_bucket{{le="{le}",deliverer="app",kind="webhook"}}"#
            ),
        )
    };
    assert_eq!(attempt("0.001").as_deref(), Some("0"));
    assert_eq!(attempt("0.1").as_deref(), Some("0"));
    assert_eq!(attempt("0.25").as_deref(), Some("1"));
    assert_eq!(attempt("60.0").as_deref(), Some("1"));
    assert_eq!(attempt("+Inf").as_deref(), Some("1"));

    let latency = |le: &str| {
        value(
            &text,
            &format!(r#"mailgate_delivery_latency_seconds_bucket{{le="{le}",deliverer="app",kind="webhook"}}"#),
        )
    };
    assert_eq!(latency("0.005").as_deref(), Some("0"));
    assert_eq!(latency("3600.0").as_deref(), Some("0"));
    assert_eq!(latency("7200.0").as_deref(), Some("1"));
    assert_eq!(latency("43200.0").as_deref(), Some("1"));
    assert_eq!(latency("+Inf").as_deref(), Some("1"));

    // Every configured bound shows up, plus +Inf, and nothing else.
    let buckets = |prefix: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default().to_owned())
            .collect()
    };
    let attempt_les = buckets("mailgate_delivery_attempt_duration_seconds_bucket{");
    assert_eq!(attempt_les.len(), ATTEMPT_DURATION_BUCKETS.len() + 1);
    let latency_les = buckets("mailgate_delivery_latency_seconds_bucket{");
    assert_eq!(latency_les.len(), LATENCY_BUCKETS.len() + 1);
    assert_eq!(attempt_les.last().map(String::as_str), Some("+Inf"));
    assert_eq!(latency_les.last().map(String::as_str), Some("+Inf"));
}

#[test]
fn bucket_bounds_are_increasing_and_cover_the_ranges() {
    for (bounds, low, high) in [(&ATTEMPT_DURATION_BUCKETS[..], 0.001, 60.0), (&LATENCY_BUCKETS[..], 0.005, 43200.0)] {
        assert_eq!(bounds.first(), Some(&low));
        assert_eq!(bounds.last(), Some(&high));
        for pair in bounds.windows(2) {
            let ratio = pair[1] / pair[0];
            assert!((1.5..=5.0).contains(&ratio), "{pair:?}: not roughly exponential");
        }
    }
}

#[test]
fn queue_gauges_follow_the_snapshot() {
    let m = Metrics::new();
    let first = QueueSnapshot {
        depth: vec![
            ("support".into(), "ready".into(), 3),
            ("support".into(), "dead".into(), 1),
            ("billing".into(), "leased".into(), 2),
            ("billing".into(), "waiting".into(), 5),
            // A repeated pair is summed.
            ("billing".into(), "leased".into(), 1),
        ],
        oldest_ready_age_seconds: Some(12.5),
        rejects_stored: 42,
    };
    let text = m.render(&first);
    check_exposition(&text);
    assert_eq!(value(&text, r#"mailgate_queue_jobs{mailbox="support",state="ready"}"#).as_deref(), Some("3"));
    assert_eq!(value(&text, r#"mailgate_queue_jobs{mailbox="support",state="dead"}"#).as_deref(), Some("1"));
    assert_eq!(value(&text, r#"mailgate_queue_jobs{mailbox="billing",state="leased"}"#).as_deref(), Some("3"));
    assert_eq!(value(&text, r#"mailgate_queue_jobs{mailbox="billing",state="waiting"}"#).as_deref(), Some("5"));
    assert_eq!(value(&text, "mailgate_queue_oldest_ready_age_seconds").as_deref(), Some("12.5"));
    assert_eq!(value(&text, "mailgate_rejects_stored").as_deref(), Some("42"));

    // billing disappeared, support has no dead jobs any more, no ready job at all.
    let second = QueueSnapshot {
        depth: vec![("support".into(), "leased".into(), 1)],
        oldest_ready_age_seconds: None,
        rejects_stored: 7,
    };
    let text = m.render(&second);
    check_exposition(&text);
    let jobs: Vec<&str> = text.lines().filter(|l| l.starts_with("mailgate_queue_jobs")).collect();
    assert_eq!(jobs, [r#"mailgate_queue_jobs{mailbox="support",state="leased"} 1"#]);
    assert!(!text.contains("billing"));
    assert_eq!(value(&text, "mailgate_queue_oldest_ready_age_seconds").as_deref(), Some("0.0"));
    assert_eq!(value(&text, "mailgate_rejects_stored").as_deref(), Some("7"));

    // Nonsense ages render as 0 rather than as something the text format cannot carry.
    for age in [f64::NAN, f64::INFINITY, -3.0] {
        let text = m.render(&QueueSnapshot { oldest_ready_age_seconds: Some(age), ..QueueSnapshot::default() });
        check_exposition(&text);
        assert_eq!(value(&text, "mailgate_queue_oldest_ready_age_seconds").as_deref(), Some("0.0"));
    }
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::new();
    let evil = "evil\"} 1\nmailgate_fake_total 99\n# EOF\n\\";
    m.accepted("smtp", evil);
    m.refused(evil, "reject", "rcpt");
    m.duplicate(evil);
    m.delivered(evil, "webhook", Duration::from_secs(1));
    m.delivery_attempt(evil, evil, evil, Duration::from_secs(1));
    m.session(evil, evil);
    let queue = QueueSnapshot { depth: vec![(evil.into(), evil.into(), 1)], ..QueueSnapshot::default() };
    let text = m.render(&queue);
    let n = check_exposition(&text);
    assert!(n > 40);
    let escaped = r#"evil\"} 1\nmailgate_fake_total 99\n# EOF\n\\"#;
    assert_eq!(
        value(&text, &format!(r#"mailgate_accepted_total{{listener="smtp",mailbox="{escaped}"}}"#)).as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, &format!(r#"mailgate_queue_jobs{{mailbox="{escaped}",state="{escaped}"}}"#)).as_deref(),
        Some("1")
    );
    assert!(!text.lines().any(|l| l.starts_with("mailgate_fake")));
}

#[test]
fn unicode_and_empty_label_values_render() {
    let m = Metrics::new();
    m.accepted("smtp", "");
    m.duplicate("böse ✉ mailbox");
    let text = m.render(&empty_queue());
    check_exposition(&text);
    assert_eq!(value(&text, r#"mailgate_accepted_total{listener="smtp",mailbox=""}"#).as_deref(), Some("1"));
    assert_eq!(value(&text, r#"mailgate_duplicates_total{mailbox="böse ✉ mailbox"}"#).as_deref(), Some("1"));
}

#[test]
fn known_words_are_borrowed_and_others_owned() {
    assert!(matches!(word("smtp", LISTENERS), Cow::Borrowed("smtp")));
    assert!(matches!(word("SMTP", LISTENERS), Cow::Owned(ref s) if s == "SMTP"));
    // Borrowed and owned label values are the same series.
    let m = Metrics::new();
    m.session("smtp", "quit");
    m.sessions.get_or_create(&SessionLabels { listener: owned("smtp"), outcome: owned("quit") }).inc();
    let text = m.render(&empty_queue());
    assert_eq!(value(&text, r#"mailgate_sessions_total{listener="smtp",outcome="quit"}"#).as_deref(), Some("2"));
}

#[test]
fn concurrent_recording_is_counted_exactly() {
    let m = Metrics::new();
    std::thread::scope(|s| {
        for t in 0..8 {
            let m = &m;
            s.spawn(move || {
                for i in 0..1000 {
                    m.session("smtp", "quit");
                    m.accepted("smtp", if (i + t) % 2 == 0 { "a" } else { "b" });
                    m.delivery_attempt("app", "webhook", "delivered", Duration::from_micros(i));
                }
            });
        }
    });
    let text = m.render(&empty_queue());
    check_exposition(&text);
    assert_eq!(value(&text, r#"mailgate_sessions_total{listener="smtp",outcome="quit"}"#).as_deref(), Some("8000"));
    assert_eq!(value(&text, r#"mailgate_accepted_total{listener="smtp",mailbox="a"}"#).as_deref(), Some("4000"));
    assert_eq!(
        value(&text, r#"mailgate_delivery_attempt_duration_seconds_count{deliverer="app",kind="webhook"}"#).as_deref(),
        Some("8000")
    );
}

#[test]
fn the_checker_rejects_broken_text() {
    for bad in [
        "# HELP x_total y\n# TYPE x counter\nx_total 1\n# EOF\n", // TYPE without its HELP
        "# HELP x y\n# TYPE x counter\nx_total{a=\"b\nc\"} 1\n# EOF\n", // raw newline in a value
        "# HELP x y\n# TYPE x counter\nx_total{a=\"b\"\"} 1\n# EOF\n", // stray quote
        "# HELP x y\n# TYPE x counter\nx_total 1\n# EOF\n# EOF\n", // two EOFs
        "# HELP x y\n# TYPE x counter\nother_total 1\n# EOF\n",   // foreign sample
        "# HELP x y\n# TYPE x gauge\nx 1\nx 2\n# EOF\n",          // repeated series
        "# HELP x y\n# TYPE x gauge\nx one\n# EOF\n",             // not a number
    ] {
        assert!(std::panic::catch_unwind(|| check_exposition(bad)).is_err(), "accepted: {bad:?}");
    }
}

#[test]
fn stress_mode_is_a_gauge_and_a_count_of_episodes() {
    let m = Metrics::new();
    m.stress_changed(true);
    m.stress_changed(true);
    m.stress_changed(false);
    let text = m.render(&empty_queue());
    check_exposition(&text);
    assert_eq!(value(&text, "mailgate_listeners_under_stress").as_deref(), Some("1"));
    assert_eq!(value(&text, "mailgate_stress_episodes_total").as_deref(), Some("2"));
}
