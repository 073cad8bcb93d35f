//! The CLI contract of DESIGN.md: `route`, `check`, and `serve` on the embedded defaults.

mod common;

use std::process::Command;

use common::*;

fn route(config: Option<&std::path::Path>, address: &str) -> (Option<i32>, serde_json::Value) {
    let mut cmd = Command::new(bin());
    cmd.arg("route").arg(address);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let o = cmd.env_remove("MAILGATE_CONFIG").output().expect("run");
    let v = serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    (o.status.code(), v)
}

#[test]
fn route_classifies_addresses_on_the_embedded_defaults() {
    let (code, v) = route(None, &format!("incoming+{KEY}@localhost"));
    assert_eq!(code, Some(0));
    assert_eq!(
        (v["mailbox"].as_str(), v["key"].as_str(), v["route"].as_str()),
        (Some("incoming"), Some(KEY), Some("reply"))
    );
    let cases = [
        ("incoming+gitlab-org-gitlab-20-glimt-abc-issue@localhost", "new_issue"),
        ("incoming+gitlab-org-gitlab-20-glimt-abc-issue-34@localhost", "note_on_issuable"),
        ("incoming+gitlab-org-gitlab-20-glimt-abc-merge-request@localhost", "new_merge_request"),
        ("incoming+gitlab-org-gitlab-20-issue-@localhost", "service_desk"),
        ("incoming+0123456789abcdef0123456789abcdef-unsubscribe@localhost", "unsubscribe"),
        ("incoming+gitlab-org/gitlab+abc@localhost", "new_issue"),
        ("incoming+gitlab-org/gitlab@localhost", "service_desk"),
    ];
    for (addr, want) in cases {
        let (code, v) = route(None, addr);
        assert_eq!(code, Some(0), "{addr}: {v}");
        assert_eq!(v["route"], want, "{addr}: {v}");
    }
    let (code, v) = route(None, "incoming@localhost");
    assert_eq!(code, Some(0));
    assert!(v["key"].is_null() && v["key_from"] == "headers", "{v}");
    let (code, v) = route(None, "incoming+what@localhost");
    assert_eq!(code, Some(1));
    assert_eq!(v["error"], "unknown_key");
    let (code, v) = route(None, "bob@example.org");
    assert_eq!(code, Some(1));
    assert_eq!(v["error"], "unknown_address");
}

#[test]
fn check_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let good = write_config(
        dir.path(),
        &ports,
        "",
        "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{key}@incoming.example.com\"\n[auth]\nspf = \"off\"\ndmarc = \"off\"\n",
    );
    let o = cli(&good, &["check"]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).contains("0 errors"), "{}", stdout(&o));

    let bad_dir = tempfile::tempdir().unwrap();
    let long = "a".repeat(40);
    let bad = write_config(
        bad_dir.path(),
        &ports,
        "",
        &format!(
            "[[mailbox]]\nname = \"incoming\"\naddress = \"{long}+%{{key}}@example.com\"\n[[mailbox]]\nname = \"two\"\naddress = \"x+%{{key}}+%{{key}}@in.example.com\"\n"
        ),
    );
    let o = cli(&bad, &["check"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.lines().any(|l| l.starts_with("error:") && l.contains("%{key}")), "{out}");

    // a keyed address on the company's main domain: a warning, as the seed advises
    let warn_dir = tempfile::tempdir().unwrap();
    let warn = write_config(
        warn_dir.path(),
        &ports,
        "",
        &format!("[[mailbox]]\nname = \"incoming\"\naddress = \"{long}+%{{key}}@example.com\"\n"),
    );
    let out = stdout(&cli(&warn, &["check"]));
    assert!(out.lines().any(|l| l.starts_with("warning:") && l.contains("example.com")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("error:") && l.contains("64")), "local part too long: {out}");

    // a port already taken is an error
    let taken = std::net::TcpListener::bind(("127.0.0.1", ports.smtp)).unwrap();
    let out = stdout(&cli(&good, &["check"]));
    assert!(out.lines().any(|l| l.starts_with("error:") && l.contains(&ports.smtp.to_string())), "{out}");
    drop(taken);
}

/// `mailgate serve` with no config: the embedded defaults of DESIGN.md. Needs the default ports
/// 2525, 2424, 10040 and 8025 free on 127.0.0.1.
#[test]
fn serve_runs_on_the_embedded_defaults() {
    for port in [2525, 2424, 10040, 8025] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is in use: stop whatever listens there (another mailgate?) to run this test"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let child = Command::new(bin())
        .arg("serve")
        .env_remove("MAILGATE_CONFIG")
        .current_dir(dir.path())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server =
        Server { child: Some(child), config: dir.path().join("none"), log: dir.path().join("log"), ports_http: 8025 };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", 10040)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", 8025)).is_err()
    {
        assert!(std::time::Instant::now() < deadline, "serve did not start: {}", server.log_text());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut c = Client::connect(2525);
    c.cmd("EHLO t.example");
    // a sender domain under the reserved .test TLD: no SPF record anywhere, so the embedded
    // defaults' checks (SPF reject-fail, DMARC enforce, system resolver) give "none"
    let r = c.send_mail("a@example.test", &[&format!("incoming+{KEY}@localhost")], &message("d1@x", "defaults", ""));
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
    let mut l = Client::connect(2424);
    assert!(l.cmd("LHLO t").contains("250 "));
    assert!(dir.path().join("mailgate-data").is_dir(), "spool in ./mailgate-data");
    // the CLI with no config finds the running server through the HTTP API
    let o = Command::new(bin())
        .args(["queue", "stats", "--json"])
        .env_remove("MAILGATE_CONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["ready"], 1);
    assert_eq!(server.stop(), Some(0));
}
