//! The README walkthrough with a real, independent SMTP client: swaks. `make test` installs
//! swaks when it is missing; run directly, this test fails (never skips) without it.

mod common;

use std::process::Command;

use common::*;

fn swaks(port: u16, to: &str, extra: &[&str]) -> std::process::Output {
    let found = Command::new("swaks").arg("--version").output();
    assert!(found.is_ok(), "swaks is not installed: run `make test` (it installs it) or `apt-get install -y swaks`");
    Command::new("swaks")
        .args(["--server", "127.0.0.1", "--port", &port.to_string(), "--from", "alice@example.org", "--to", to])
        .args(["--helo", "client.example.org"])
        .args(extra)
        .output()
        .expect("run swaks")
}

#[test]
fn readme_walkthrough_with_swaks() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), &ports, "", "");
    let _server = Server::start(&config, ports.smtp, ports.http);

    let o = swaks(ports.smtp, &format!("incoming+{KEY}@localhost"), &["--header", "Subject: Re: my issue"]);
    let out = stdout(&o);
    assert!(o.status.success(), "swaks failed:\n{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");

    let o = cli(&config, &["queue", "list"]);
    let listing = stdout(&o);
    assert!(listing.contains("Re: my issue") && listing.contains("reply"), "{listing}");

    // an auto-reply is discarded: 250 for the client, nothing stored, logged
    let o = swaks(ports.smtp, &format!("incoming+{KEY}@localhost"), &["--add-header", "Auto-Submitted: auto-replied"]);
    assert!(stdout(&o).contains("discarded (auto_submitted"), "{}", stdout(&o));

    // a refusal: swaks exits non-zero and the reject log says why
    let o = swaks(ports.smtp, "incoming+nope@localhost", &[]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("550 5.1.1"), "{}", stdout(&o));
    let o = cli(&config, &["rejects"]);
    let text = stdout(&o);
    assert!(text.contains("unknown_key") && text.contains("incoming+nope@localhost"), "{text}");
    assert!(text.contains("auto_submitted"), "{text}");
    let o = cli(&config, &["rejects", "--reason", "unknown_key", "--since", "1h", "--json"]);
    let entries = json_values(&stdout(&o));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["reason"], "unknown_key");
    assert_eq!(cli(&config, &["queue", "list", "--json"]).status.code(), Some(0));
    assert_eq!(json_values(&stdout(&cli(&config, &["queue", "list", "--json"]))).len(), 1);
}

#[test]
fn python_smtplib_sends_a_reply() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), &ports, "", "");
    let _server = Server::start(&config, ports.smtp, ports.http);
    let script = format!(
        r#"
import smtplib
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "alice@example.org"
m["To"] = "incoming+{KEY}@localhost"
m["Subject"] = "smtplib reply"
m["Message-ID"] = "<py1@example.org>"
m.set_content("Thanks, this works.\n\nOn Mon, Bob wrote:\n> quoted\n")
with smtplib.SMTP("127.0.0.1", {port}) as s:
    s.ehlo("py.example.org")
    s.send_message(m)
print("sent")
"#,
        port = ports.smtp
    );
    let o = Command::new("python3").arg("-c").arg(&script).output().expect("python3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let jobs = json_values(&stdout(&cli(&config, &["queue", "list", "--json"])));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["message"]["subject"], "smtplib reply");
    assert_eq!(jobs[0]["envelope"]["helo"], "py.example.org");
}
