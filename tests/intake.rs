//! End to end over real TCP against a real `mailgate serve`: SMTP and LMTP intake, the CLI
//! through the HTTP API and directly on the spool, the reject log, duplicates, shutdown.

mod common;

use common::*;

fn jobs(config: &std::path::Path) -> Vec<serde_json::Value> {
    let o = cli(config, &["queue", "list", "--json"]);
    assert!(o.status.success(), "queue list: {}", String::from_utf8_lossy(&o.stderr));
    json_values(&stdout(&o))
}

fn rejects(config: &std::path::Path) -> Vec<serde_json::Value> {
    let o = cli(config, &["rejects", "--json"]);
    assert!(o.status.success(), "rejects: {}", String::from_utf8_lossy(&o.stderr));
    json_values(&stdout(&o))
}

#[test]
fn smtp_reply_becomes_a_job_and_refusals_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), &ports, "", "");
    let mut server = Server::start(&config, ports.smtp, ports.http);

    let mut c = Client::connect(ports.smtp);
    assert!(c.cmd("EHLO client.example.org").contains("250 "));
    let rcpt = format!("incoming+{KEY}@localhost");
    let r = c.send_mail("alice@example.org", &[&rcpt], &message("m1@example.org", "Re: issue", ""));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let id = r.rsplit(' ').next().unwrap().to_string();

    // unknown key and unknown address at RCPT, in the session
    assert!(c.cmd("MAIL FROM:<alice@example.org>").starts_with("250"));
    let r = c.cmd("RCPT TO:<incoming+not-a-key@localhost>");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = c.cmd("RCPT TO:<someone@localhost>");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(c.cmd("QUIT").starts_with("221"));

    let list = jobs(&config);
    assert_eq!(list.len(), 1);
    let job = &list[0];
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["state"], "ready");
    assert_eq!(job["key"], KEY);
    assert_eq!(job["key_source"], "rcpt");
    assert_eq!(job["route"], "reply");
    assert_eq!(job["mailbox"], "incoming");
    assert_eq!(job["envelope"]["mail_from"], "alice@example.org");
    assert_eq!(job["envelope"]["client_ip"], "127.0.0.1");
    assert_eq!(job["envelope"]["helo"], "client.example.org");
    assert_eq!(job["message"]["message_id"], "m1@example.org");
    assert_eq!(job["message"]["subject"], "Re: issue");

    let raw = cli(&config, &["queue", "show", &id, "--raw"]);
    let raw = stdout(&raw);
    assert!(raw.starts_with("Return-Path: <alice@example.org>\r\nReceived: from client.example.org"), "{raw}");
    assert!(raw.ends_with("Hello from the test.\r\n"));

    let rj = rejects(&config);
    let reasons: Vec<&str> = rj.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, vec!["unknown_key", "unknown_address"]);
    assert_eq!(rj[0]["stage"], "rcpt");
    assert_eq!(rj[0]["action"], "reject");
    assert_eq!(rj[0]["code"], 550);
    assert_eq!(rj[0]["enhanced"], "5.1.1");
    assert_eq!(rj[0]["listener"], "smtp");
    assert_eq!(rj[0]["rcpt_to"][0], "incoming+not-a-key@localhost");
    assert_eq!(rj[0]["mail_from"], "alice@example.org");
    // the reject log also goes to the tracing output, one JSON line per entry
    assert_eq!(server.stop(), Some(0), "clean exit on SIGTERM");
    let log = server.log_text();
    let line = log.lines().find(|l| l.contains("\"reason\":\"unknown_key\"")).unwrap_or_else(|| panic!("{log}"));
    assert!(!line.contains('\x1b'), "no colour codes in a log file: {line:?}");
    let json = &line[line.find('{').unwrap()..];
    let entry: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(entry["stage"], "rcpt");

    // with the server stopped the CLI opens the spool directly
    let list = jobs(&config);
    assert_eq!(list.len(), 1);
    let r = rejects(&config);
    assert_eq!(r.len(), 2);
}

#[test]
fn queue_lifecycle_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), &ports, "", "");
    let _server = Server::start(&config, ports.smtp, ports.http);
    let mut c = Client::connect(ports.smtp);
    c.cmd("EHLO c.example");
    let rcpt = format!("incoming+{KEY}@localhost");
    for i in 0..2 {
        let r = c.send_mail("a@example.org", &[&rcpt], &message(&format!("q{i}@x"), "q", ""));
        assert!(r.starts_with("250"), "{r}");
    }
    let o = cli(&config, &["queue", "pop", "--lease", "60"]);
    assert!(o.status.success());
    let job: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(job["state"], "leased");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["message"]["message_id"], "q0@x", "oldest first");
    let id = job["id"].as_str().unwrap().to_string();
    assert!(cli(&config, &["queue", "nack", &id]).status.success());
    let o = cli(&config, &["queue", "pop"]);
    let again: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(again["id"], id.as_str());
    assert!(cli(&config, &["queue", "ack", &id]).status.success());
    let o = cli(&config, &["queue", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((stats["ready"].as_u64(), stats["done"].as_u64()), (Some(1), Some(1)));
    let o = cli(&config, &["queue", "pop"]);
    assert!(o.status.success());
    let o = cli(&config, &["queue", "pop"]);
    assert_eq!(o.status.code(), Some(3), "empty queue exits 3");
    let o = cli(&config, &["queue", "retry", &id]);
    assert!(!o.status.success(), "a done job cannot be retried");
}

#[test]
fn lmtp_multi_recipient_in_both_modes_with_xforward_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let lmtp_in_session = free_port();
    let listeners = format!(
        r#"
[[listen]]
protocol = "smtp"
address = "127.0.0.1:{}"
[[listen]]
protocol = "lmtp"
address = "127.0.0.1:{}"
mode = "after-queue"
[[listen]]
protocol = "lmtp"
address = "127.0.0.1:{lmtp_in_session}"
mode = "in-session"
"#,
        ports.smtp, ports.lmtp
    );
    let config = write_config(dir.path(), &ports, &listeners, "");
    let _server = Server::start(&config, ports.lmtp, ports.http);
    let good = format!("incoming+{KEY}@localhost");
    let other = "incoming+gitlab-org-gitlab-20-abc-issue@localhost";

    // after-queue: the bad key is accepted at RCPT and discarded; one reply per recipient
    let mut c = Client::connect(ports.lmtp);
    let r = c.cmd("LHLO postfix.local");
    assert!(r.contains("XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"), "{r}");
    assert!(c.cmd("XFORWARD NAME=mail.example.org ADDR=203.0.113.9 PORT=4000").starts_with("250"));
    assert!(c.cmd("XFORWARD PROTO=ESMTP HELO=mail.example.org IDENT=4AbCdE SOURCE=REMOTE").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<alice@example.org>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{good}>")).starts_with("250"));
    assert!(c.cmd("RCPT TO:<incoming+bogus@localhost>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{other}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send_raw(message("lm1@example.org", "lmtp", "").as_bytes());
    c.send_raw(b".\r\n");
    let replies: Vec<String> = (0..3).map(|_| c.reply()).collect();
    assert!(replies[0].starts_with("250 2.0.0 Ok: queued as"), "{replies:?}");
    assert!(replies[1].starts_with("250 2.0.0 Ok: discarded (unknown_key"), "{replies:?}");
    assert!(replies[2].starts_with("250 2.0.0 Ok: queued as"), "{replies:?}");

    // Postfix redelivers the same queue id: 250, no second job, logged as duplicate
    assert!(c.cmd("RSET").starts_with("250"));
    assert!(c.cmd("XFORWARD ADDR=203.0.113.9 IDENT=4AbCdE").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<alice@example.org>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{good}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send_raw(message("lm1-resent@example.org", "lmtp again", "").as_bytes());
    c.send_raw(b".\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0 Ok: duplicate of"), "{r}");

    // in-session LMTP refuses at RCPT
    let mut c2 = Client::connect(lmtp_in_session);
    c2.cmd("LHLO x");
    c2.cmd("MAIL FROM:<alice@example.org>");
    let r = c2.cmd("RCPT TO:<incoming+bogus@localhost>");
    assert!(r.starts_with("550 5.1.1"), "{r}");

    let list = jobs(&config);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["envelope"]["client_ip"], "203.0.113.9");
    assert_eq!(list[0]["envelope"]["queue_id"], "4AbCdE");
    assert_eq!(list[0]["envelope"]["protocol"], "ESMTP");
    assert_eq!(list[1]["route"], "new_issue");
    let reasons: Vec<String> = rejects(&config).iter().map(|e| e["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(reasons, vec!["unknown_key", "duplicate", "unknown_key"]);
}

#[test]
fn base_address_key_from_headers_and_content_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let extra = r#"
[[mailbox]]
name = "incoming"
address = "incoming+%{key}@in.example.com"
reply_host = "gitlab.example.com"
"#;
    let config = write_config(dir.path(), &ports, "", extra);
    let _server = Server::start(&config, ports.smtp, ports.http);
    let mut c = Client::connect(ports.smtp);
    c.cmd("EHLO c.example");
    let refs = format!("References: <a@b>, <reply-{KEY}@gitlab.example.com>\r\n");
    let msg = message("hdr1@example.org", "Re: via references", &refs);
    let r = c.send_mail("a@example.org", &["incoming@in.example.com"], &msg);
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
    // the same message again (e.g. the client retried after a timeout): no second job
    let r = c.send_mail("a@example.org", &["incoming@IN.EXAMPLE.COM"], &msg);
    assert!(r.starts_with("250 2.0.0 Ok: duplicate of"), "{r}");
    // no key anywhere: refused at end of DATA
    let r = c.send_mail("a@example.org", &["incoming@in.example.com"], &message("nokey@x", "no key", ""));
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let list = jobs(&config);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["key"], KEY);
    assert_eq!(list[0]["key_source"], "references");
}

#[test]
fn limits_and_smuggling_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let listeners =
        format!("[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\ntrusted_peers = []\n", ports.smtp);
    let extra = "[limits]\nmax_message_size = 2000\nmax_connections_per_ip = 2\ncommand_timeout = \"2s\"\n";
    let config = write_config(dir.path(), &ports, &listeners, extra);
    let _server = Server::start(&config, ports.smtp, ports.http);
    let rcpt = format!("incoming+{KEY}@localhost");

    let mut c = Client::connect(ports.smtp);
    let ehlo = c.cmd("EHLO c.example");
    assert!(ehlo.contains("SIZE 2000") && !ehlo.contains("XFORWARD"), "{ehlo}");
    assert!(c.cmd("XFORWARD ADDR=1.2.3.4").starts_with("550 5.7.0"));
    assert!(c.cmd("MAIL FROM:<a@example.org> SIZE=5000").starts_with("552 5.3.4"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send_raw(
        b"Subject: smuggle\r\n\r\nhi\n.\nMAIL FROM:<admin@victim.example>\r\nRCPT TO:<x@y>\r\nDATA\r\nevil\r\n.\r\n",
    );
    let r = c.reply();
    assert!(r.starts_with("550 5.5.2 Error: bare <LF> received"), "{r}");
    assert!(c.cmd("NOOP").starts_with("250"), "session stays usable");

    // per-IP connection limit (loopback is not trusted here)
    let _c2 = Client::connect(ports.smtp);
    let mut c3 = std::net::TcpStream::connect(("127.0.0.1", ports.smtp)).unwrap();
    let mut s = String::new();
    use std::io::Read;
    c3.read_to_string(&mut s).unwrap();
    assert!(s.starts_with("421 4.7.0"), "{s}");

    // command timeout: 421 and close
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut idle = Client::connect(ports.smtp);
    let rest = idle.read_to_end();
    assert!(rest.starts_with("421 4.4.2"), "{rest}");

    let reasons: Vec<String> = rejects(&config).iter().map(|e| e["reason"].as_str().unwrap().to_string()).collect();
    for want in ["untrusted_xforward", "too_large", "bare_lf", "too_many_connections", "timeout"] {
        assert!(reasons.iter().any(|r| r == want), "{want} missing in {reasons:?}");
    }
    let o = cli(&config, &["queue", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["ready"], 0, "nothing stored");
}

#[test]
fn unix_socket_lmtp_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let sock = dir.path().join("lmtp.sock");
    let listeners = format!(
        "[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\n[[listen]]\nprotocol = \"lmtp\"\naddress = \"unix:{}\"\n",
        ports.smtp,
        sock.display()
    );
    let config = write_config(dir.path(), &ports, &listeners, "");
    let mut server = Server::start(&config, ports.smtp, ports.http);
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    use std::io::{BufRead, Write};
    let rcpt = format!("incoming+{KEY}@localhost");
    let msg = message("unix@x", "over unix", "");
    write!(w, "LHLO local\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n{msg}.\r\nQUIT\r\n").unwrap();
    let mut lines = Vec::new();
    let mut line = String::new();
    while r.read_line(&mut line).unwrap_or(0) > 0 {
        lines.push(line.trim_end().to_string());
        line.clear();
    }
    assert!(lines.iter().any(|l| l.starts_with("250 2.0.0 Ok: queued as")), "{lines:?}");
    assert_eq!(server.stop(), Some(0));
    assert!(!sock.exists(), "socket removed on shutdown");
    assert_eq!(jobs(&config).len(), 1);
}

/// Postfix policy delegation over real TCP: persistent connection, one answer per request,
/// refusals in the reject log; untrusted peers get no answer at all.
#[test]
fn policy_service_answers_postfix_and_nobody_else() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let untrusted = free_port();
    let listeners = format!(
        "[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\n[[listen]]\nprotocol = \"policy\"\naddress = \"127.0.0.1:{}\"\n[[listen]]\nprotocol = \"policy\"\naddress = \"127.0.0.1:{untrusted}\"\ntrusted_peers = []\n",
        ports.smtp, ports.policy
    );
    let config = write_config(dir.path(), &ports, &listeners, "");
    let _server = Server::start(&config, ports.policy, ports.http);
    let s = std::net::TcpStream::connect(("127.0.0.1", ports.policy)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |rcpt: &str| -> String {
        write!(
            w,
            "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=198.51.100.7\nhelo_name=mx.example.net\nsender=bob@example.net\nrecipient={rcpt}\nqueue_id=\nsize=0\nfuture_attribute=ignored\n\n"
        )
        .unwrap();
        let mut action = String::new();
        r.read_line(&mut action).unwrap();
        let mut blank = String::new();
        r.read_line(&mut blank).unwrap();
        assert_eq!(blank, "\n");
        action.trim_end().to_string()
    };
    assert_eq!(ask(&format!("incoming+{KEY}@localhost")), "action=DUNNO");
    let a = ask("incoming+nokey@localhost");
    assert!(a.starts_with("action=550 5.1.1 "), "{a}");
    assert_eq!(ask("someone@elsewhere.example"), "action=DUNNO", "not our domain");
    let entries = json_values(&stdout(&cli(&config, &["rejects", "--json"])));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["listener"], "policy");
    assert_eq!(entries[0]["stage"], "rcpt");
    assert_eq!(entries[0]["client_ip"], "198.51.100.7");
    assert_eq!(entries[0]["reason"], "unknown_key");
    // A request Postfix would never send ends the connection, counted as a policy session
    // ended by `error` (Server::start's readiness probe counts as `quit`).
    writeln!(w, "no equals sign").unwrap();
    let mut rest = String::new();
    let _ = r.read_line(&mut rest);
    assert_eq!(rest, "", "closed without an answer");
    let series = "mailgate_sessions_total{listener=\"policy\",outcome=\"error\"} 1";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = String::from_utf8_lossy(&common::receiver::http_get(ports.http, "/metrics").body).to_string();
        if metrics.lines().any(|l| l == series) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no {series} in\n{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let mut other = std::net::TcpStream::connect(("127.0.0.1", untrusted)).unwrap();
    other.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let _ = other.write_all(b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=incoming+x@localhost\n\n");
    let mut buf = String::new();
    use std::io::Read;
    let _ = other.read_to_string(&mut buf);
    assert_eq!(buf, "", "an untrusted peer gets no answer");
}

/// SIGTERM: stop accepting; a session in the middle of DATA finishes and hears 250; an idle
/// session is told 421; the spool is committed and the job is there after the exit.
#[test]
fn sigterm_lets_sessions_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), &ports, "", "");
    let mut server = Server::start(&config, ports.smtp, ports.http);
    let mut busy = Client::connect(ports.smtp);
    let mut idle = Client::connect(ports.smtp);
    busy.cmd("EHLO busy.example");
    idle.cmd("EHLO idle.example");
    assert!(busy.cmd("MAIL FROM:<a@example.org>").starts_with("250"));
    assert!(busy.cmd(&format!("RCPT TO:<incoming+{KEY}@localhost>")).starts_with("250"));
    assert!(busy.cmd("DATA").starts_with("354"));
    busy.send_raw(b"Subject: in flight\r\nMessage-ID: <flight@x>\r\n\r\nfirst half\r\n");
    signal(server.pid(), "TERM");
    let r = idle.read_to_end();
    assert!(r.starts_with("421 4.3.2"), "{r}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(std::net::TcpStream::connect(("127.0.0.1", ports.smtp)).is_err(), "no new connections");
    busy.send_raw(b"second half\r\n.\r\n");
    let r = busy.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    assert_eq!(server.stop(), Some(0));
    let list = json_values(&stdout(&cli(&config, &["queue", "list", "--json"])));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["message"]["subject"], "in flight");
}
