//! Sender authentication end to end: the real binary resolving through a real DNS server on
//! loopback, messages signed with real keys (and one by dkimpy), in-session and after-queue;
//! results read back from the queue, the stored message and the reject log.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::dns::{DnsServer, Zone};
use common::fixtures::{KeyKind, arc_seal, dkim_txt, sign, sign_rsa_sha1};
use common::*;

static SEQ: AtomicUsize = AtomicUsize::new(0);

struct Env {
    _dir: tempfile::TempDir,
    _dns: DnsServer,
    _server: Server,
    config: PathBuf,
    ports: Ports,
}

/// The zone every test shares. Domains under .test; the client is 127.0.0.1 unless XFORWARD
/// says otherwise.
fn zone() -> Zone {
    let mut z = Zone::default();
    z.txt("good.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("s1._domainkey.good.test", &dkim_txt(KeyKind::Ed25519))
        .txt("s2._domainkey.good.test", &dkim_txt(KeyKind::Rsa2048))
        .txt("weak._domainkey.good.test", &dkim_txt(KeyKind::Rsa512))
        .txt("_dmarc.good.test", "v=DMARC1; p=reject")
        .txt("fail.test", "v=spf1 -all")
        .txt("soft.test", "v=spf1 ~all")
        .txt("neutral.test", "v=spf1 ?all")
        .txt("perm.test", "v=spf1 ip4:not-an-ip -all")
        .silent("slow.test")
        .txt("inc.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("include.test", "v=spf1 include:inc.test -all")
        .txt("redirect.test", "v=spf1 redirect=inc.test")
        .txt("nodmarc.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("s1._domainkey.nodmarc.test", &dkim_txt(KeyKind::Ed25519))
        .txt("revoked._domainkey.nodmarc.test", "v=DKIM1; k=ed25519; p=")
        .txt("s1._domainkey.strict.test", &dkim_txt(KeyKind::Ed25519))
        .txt("_dmarc.strict.test", "v=DMARC1; p=reject; adkim=s; aspf=s")
        .txt("_dmarc.sp.test", "v=DMARC1; p=none; sp=reject")
        .txt("_dmarc.quar.test", "v=DMARC1; p=quarantine")
        .silent("_dmarc.slowdmarc.test")
        .txt("lists.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("arc._domainkey.lists.test", &dkim_txt(KeyKind::Rsa2048))
        .txt("other-list.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("arc._domainkey.other-list.test", &dkim_txt(KeyKind::Rsa2048));
    let py = std::fs::read_to_string("tests/fixtures/dkimpy/dkim_txt.txt").expect("dkimpy record");
    z.txt("py._domainkey.dkimpy.example", py.trim());
    z
}

fn start(extra_auth: &str, mailboxes: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(zone());
    let ports = Ports::new();
    let listeners = format!(
        "[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\n[[listen]]\nprotocol = \"lmtp\"\naddress = \"127.0.0.1:{}\"\n[[listen]]\nprotocol = \"policy\"\naddress = \"127.0.0.1:{}\"\n",
        ports.smtp, ports.lmtp, ports.policy
    );
    let mailboxes = if mailboxes.is_empty() {
        "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{key}@mx.test\"\n"
    } else {
        mailboxes
    };
    let extra = format!("{mailboxes}\n[auth]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n{extra_auth}\n", dns.addr());
    let config = write_config(dir.path(), &ports, &listeners, &extra);
    let server = Server::start(&config, ports.smtp, ports.http);
    Env { _dir: dir, _dns: dns, _server: server, config, ports }
}

fn rcpt() -> String {
    format!("incoming+{KEY}@mx.test")
}

/// A message from `from` with a unique Message-ID.
fn msg(from: &str, extra_headers: &str) -> Vec<u8> {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    format!(
        "{extra_headers}From: Alice <{from}>\r\nTo: {}\r\nSubject: auth test {n}\r\nDate: Tue, 04 Mar 2025 10:15:00 +0000\r\nMessage-ID: <auth-{n}-{}@test>\r\n\r\nHello.\r\n",
        rcpt(),
        std::process::id()
    )
    .into_bytes()
}

/// One SMTP transaction on `port` (LMTP when `lmtp`), optionally from the client XFORWARD names.
/// Returns the RCPT reply and, if RCPT was accepted, the end-of-DATA reply.
fn send(port: u16, lmtp: bool, client: Option<&str>, mail_from: &str, message: &[u8]) -> (String, String) {
    let mut c = Client::connect(port);
    c.cmd(if lmtp { "LHLO relay.test" } else { "EHLO relay.test" });
    if let Some(ip) = client {
        assert!(c.cmd(&format!("XFORWARD ADDR={ip} HELO=mx.sender.test")).starts_with("250"));
    }
    let r = c.cmd(&format!("MAIL FROM:<{mail_from}>"));
    assert!(r.starts_with("250"), "MAIL: {r}");
    let r = c.cmd(&format!("RCPT TO:<{}>", rcpt()));
    if !r.starts_with("250") {
        return (r, String::new());
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send_raw(message);
    c.send_raw(b".\r\n");
    (r, c.reply())
}

fn last_job(env: &Env) -> serde_json::Value {
    let jobs = json_values(&stdout(&cli(&env.config, &["queue", "list", "--json"])));
    jobs.last().cloned().expect("a job")
}

fn raw(env: &Env, id: &str) -> String {
    stdout(&cli(&env.config, &["queue", "show", id, "--raw"]))
}

fn last_reject(env: &Env) -> serde_json::Value {
    let all = json_values(&stdout(&cli(&env.config, &["rejects", "--json"])));
    all.last().cloned().expect("a reject-log entry")
}

fn accepted(r: &(String, String)) -> bool {
    r.0.starts_with("250") && r.1.starts_with("250 2.0.0 Ok: queued")
}

#[test]
fn passing_mail_carries_results_in_the_job_and_the_stored_header() {
    let env = start("", "");
    for (kind, selector) in [(KeyKind::Ed25519, "s1"), (KeyKind::Rsa2048, "s2")] {
        let m = sign(kind, "good.test", selector, &msg("alice@good.test", ""), None);
        let r = send(env.ports.smtp, false, None, "alice@good.test", &m);
        assert!(accepted(&r), "{kind:?}: {r:?}");
        let job = last_job(&env);
        let a = &job["auth"];
        assert_eq!(
            (a["spf"].as_str(), a["dkim"].as_str(), a["dmarc"].as_str()),
            (Some("pass"), Some("pass"), Some("pass")),
            "{a}"
        );
        assert_eq!(a["dmarc_policy"], "reject");
        assert!(a.get("arc_sealer").is_none(), "no ARC exception: {a}");
        let stored = raw(&env, job["id"].as_str().unwrap());
        let ar = stored.find("Authentication-Results: mx.test;").expect("our header");
        assert!(stored.find("Received: from").unwrap() < ar, "after the trace headers");
        assert!(stored[ar..].contains("dkim=pass") && stored[ar..].contains("spf=pass"), "{stored}");
    }
    // a message signed by an independent implementation (Python dkimpy)
    let py = std::fs::read("tests/fixtures/dkimpy/signed.eml").unwrap();
    let r = send(env.ports.smtp, false, None, "alice@dkimpy.example", &py);
    assert!(accepted(&r), "{r:?}");
    assert_eq!(last_job(&env)["auth"]["dkim"], "pass");
}

#[test]
fn spf_results_in_session() {
    let env = start("", "");
    let cases = [
        ("a@fail.test", None, "550 5.7.23"),
        ("a@good.test", Some("192.0.2.7"), "550 5.7.23"),
        ("a@slow.test", None, "451 4.7.24"),
    ];
    for (from, client, want) in cases {
        let r = send(env.ports.smtp, false, client, from, &msg("x@nodmarc.test", ""));
        assert!(r.0.starts_with(want), "{from} {client:?}: {r:?}");
    }
    let e = last_reject(&env);
    assert_eq!((e["reason"].as_str(), e["stage"].as_str()), (Some("auth_temperror"), Some("rcpt")));
    for (from, want) in [
        ("a@soft.test", "softfail"),
        ("a@neutral.test", "neutral"),
        ("a@perm.test", "permerror"),
        ("a@include.test", "pass"),
        ("a@redirect.test", "pass"),
        ("a@nodmarc.test", "pass"),
    ] {
        let r = send(env.ports.smtp, false, None, from, &msg("x@nodmarc.test", ""));
        assert!(accepted(&r), "{from}: {r:?}");
        assert_eq!(last_job(&env)["auth"]["spf"], want, "{from}");
    }
}

#[test]
fn dkim_failures_are_recorded_and_dmarc_reject_refuses() {
    let env = start("", "");
    let signed = sign(KeyKind::Ed25519, "nodmarc.test", "s1", &msg("a@nodmarc.test", ""), None);
    let tampered_body = String::from_utf8(signed.clone()).unwrap().replace("Hello.", "Hellp.");
    let tampered_header = String::from_utf8(signed).unwrap().replacen("Subject: auth test", "Subject: auth tesT", 1);
    let revoked = sign(KeyKind::Ed25519, "nodmarc.test", "revoked", &msg("a@nodmarc.test", ""), None);
    let missing = sign(KeyKind::Ed25519, "nodmarc.test", "nokey", &msg("a@nodmarc.test", ""), None);
    let weak = sign(KeyKind::Rsa512, "good.test", "weak", &msg("a@nodmarc.test", ""), None);
    let sha1 = sign_rsa_sha1("good.test", "s2", &msg("a@nodmarc.test", ""));
    for (name, m) in [
        ("body", tampered_body.into_bytes()),
        ("header", tampered_header.into_bytes()),
        ("revoked", revoked),
        ("missing", missing),
        ("rsa-512", weak),
        ("rsa-sha1", sha1),
    ] {
        let r = send(env.ports.smtp, false, None, "a@nodmarc.test", &m);
        assert!(accepted(&r), "{name}: {r:?}");
        let dkim = last_job(&env)["auth"]["dkim"].as_str().unwrap_or_default().to_string();
        assert_ne!(dkim, "pass", "{name} must not pass");
    }
    // expired signature (x= one second ahead, then wait)
    let expiring = sign(KeyKind::Ed25519, "nodmarc.test", "s1", &msg("a@nodmarc.test", ""), Some(1));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = send(env.ports.smtp, false, None, "a@nodmarc.test", &expiring);
    assert!(accepted(&r), "{r:?}");
    assert_ne!(last_job(&env)["auth"]["dkim"], "pass");
    // From good.test (p=reject) with a broken signature and an unaligned envelope: refused
    let m = sign(KeyKind::Ed25519, "good.test", "s1", &msg("alice@good.test", ""), None);
    let broken = String::from_utf8(m).unwrap().replace("Hello.", "Spoofed.");
    let r = send(env.ports.smtp, false, None, "bounce@nodmarc.test", broken.as_bytes());
    assert!(r.1.starts_with("550 5.7.1"), "{r:?}");
    let e = last_reject(&env);
    assert_eq!((e["reason"].as_str(), e["stage"].as_str()), (Some("dmarc_fail"), Some("data")));
    assert!(cli(&env.config, &["queue", "list", "--json"]).status.success());
}

#[test]
fn dmarc_alignment_subdomain_policy_quarantine_and_from_count() {
    let env = start("", "");
    // relaxed (default): a subdomain From aligns with d=good.test
    let m = sign(KeyKind::Ed25519, "good.test", "s1", &msg("alice@sub.good.test", ""), None);
    let r = send(env.ports.smtp, false, None, "bounce@nodmarc.test", &m);
    assert!(accepted(&r), "relaxed: {r:?}");
    assert_eq!(last_job(&env)["auth"]["dmarc"], "pass");
    // strict: the same shape fails
    let m = sign(KeyKind::Ed25519, "strict.test", "s1", &msg("alice@sub.strict.test", ""), None);
    let r = send(env.ports.smtp, false, None, "bounce@nodmarc.test", &m);
    assert!(r.1.starts_with("550 5.7.1"), "strict: {r:?}");
    // sp=reject applies to subdomains, p=none to the domain itself
    let r = send(env.ports.smtp, false, None, "bounce@nodmarc.test", &msg("a@x.sp.test", ""));
    assert!(r.1.starts_with("550 5.7.1"), "sp=: {r:?}");
    let r = send(env.ports.smtp, false, None, "bounce@nodmarc.test", &msg("a@sp.test", ""));
    assert!(accepted(&r), "p=none: {r:?}");
    // p=quarantine: accepted and marked
    let r = send(env.ports.smtp, false, None, "bounce@nodmarc.test", &msg("a@quar.test", ""));
    assert!(accepted(&r), "{r:?}");
    let job = last_job(&env);
    assert_eq!(
        (job["auth"]["dmarc"].as_str(), job["auth"]["dmarc_policy"].as_str()),
        (Some("fail"), Some("quarantine"))
    );
    // no record at all
    let r = send(env.ports.smtp, false, None, "a@nodmarc.test", &msg("a@nodmarc.test", ""));
    assert!(accepted(&r));
    assert_eq!(last_job(&env)["auth"]["dmarc"], "none");
    // no From, or two From addresses: refused in the session
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let none = format!("To: {}\r\nSubject: s\r\nMessage-ID: <nofrom-{n}@t>\r\n\r\nx\r\n", rcpt());
    let r = send(env.ports.smtp, false, None, "a@nodmarc.test", none.as_bytes());
    assert!(r.1.starts_with("550 5.7.1"), "{r:?}");
    let two = String::from_utf8(msg("a@nodmarc.test", ""))
        .unwrap()
        .replace("From: Alice <a@nodmarc.test>", "From: a@nodmarc.test, b@good.test");
    let r = send(env.ports.smtp, false, None, "a@nodmarc.test", two.as_bytes());
    assert!(r.1.starts_with("550 5.7.1"), "{r:?}");
}

#[test]
fn arc_from_a_trusted_sealer_stands_in_for_a_broken_forward() {
    let env = start("trusted_arc_sealers = [\"lists.test\"]", "");
    let dns_auth = common::dns::authenticator(&env._dns);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (sealer, want_ok) in [("lists.test", true), ("other-list.test", false)] {
        let original = sign(KeyKind::Ed25519, "good.test", "s1", &msg("alice@good.test", ""), None);
        // the list changes the subject (DKIM breaks) and re-sends from its own server (SPF of
        // the envelope is the list's, not good.test's): only ARC can vouch for it
        let text =
            String::from_utf8(original.clone()).unwrap().replace("Subject: auth test", "Subject: [list] auth test");
        let ip = "127.0.0.1".parse().unwrap();
        let sealed = rt.block_on(arc_seal(&dns_auth, KeyKind::Rsa2048, sealer, "arc", &original, text.as_bytes(), ip));
        let sealed = String::from_utf8(sealed).unwrap();
        let r = send(env.ports.smtp, false, None, &format!("bounces@{sealer}"), sealed.as_bytes());
        if want_ok {
            assert!(accepted(&r), "trusted sealer: {r:?}");
            let job = last_job(&env);
            assert_eq!(job["auth"]["arc"], "pass");
            assert!(
                job["auth"]["header"].as_str().unwrap().contains("lists.test"),
                "the exception is recorded: {}",
                job["auth"]
            );
            assert_eq!(job["auth"]["arc_sealer"], "lists.test");
        } else {
            assert!(r.1.starts_with("550 5.7.1"), "untrusted sealer: {r:?}");
        }
    }
}

#[test]
fn forged_authentication_results_are_removed() {
    let env = start("", "");
    let forged = "Authentication-Results: mx.test; spf=pass smtp.mailfrom=ceo@good.test; dkim=pass\r\nAuthentication-Results: other.example; spf=none\r\n";
    let r = send(env.ports.smtp, false, None, "a@nodmarc.test", &msg("a@nodmarc.test", forged));
    assert!(accepted(&r), "{r:?}");
    let job = last_job(&env);
    let stored = raw(&env, job["id"].as_str().unwrap());
    assert_eq!(stored.matches("Authentication-Results: mx.test;").count(), 1, "{stored}");
    assert!(!stored.contains("ceo@good.test"), "{stored}");
    assert!(stored.contains("Authentication-Results: other.example; spf=none"), "others' headers stay");
}

#[test]
fn after_queue_discards_instead_of_refusing() {
    let env = start("", "");
    // SPF fail for the original client: accepted at RCPT, discarded after DATA, logged
    let r = send(env.ports.lmtp, true, Some("192.0.2.7"), "a@good.test", &msg("a@good.test", ""));
    assert!(r.0.starts_with("250"), "{r:?}");
    assert!(r.1.starts_with("250 2.0.0 Ok: discarded (spf_fail"), "{r:?}");
    let e = last_reject(&env);
    assert_eq!(
        (e["reason"].as_str(), e["action"].as_str(), e["listener"].as_str()),
        (Some("spf_fail"), Some("discard"), Some("lmtp"))
    );
    assert_eq!(e["client_ip"], "192.0.2.7");
    // a DNS failure is transient: 4xx, so Postfix keeps the message and retries
    let r = send(env.ports.lmtp, true, None, "a@slow.test", &msg("a@nodmarc.test", ""));
    assert!(r.0.starts_with("451 4.7.24"), "answered at RCPT: {r:?}");
    // passing mail through the same listener is stored with the XFORWARD client's results
    let m = sign(KeyKind::Ed25519, "good.test", "s1", &msg("alice@good.test", ""), None);
    let r = send(env.ports.lmtp, true, Some("127.0.0.1"), "alice@good.test", &m);
    assert!(r.1.starts_with("250 2.0.0 Ok: queued"), "{r:?}");
    let stats = json_values(&stdout(&cli(&env.config, &["queue", "stats", "--json"])));
    assert_eq!(stats[0]["ready"], 1);
}

#[test]
fn mailbox_and_route_overrides() {
    let mailboxes = "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{key}@mx.test\"\n[mailbox.auth.routes.new_issue]\ndmarc = \"require-pass\"\n[[mailbox]]\nname = \"service_desk\"\naddress = \"desk+%{key}@mx.test\"\nauth = { dmarc = \"require-pass\", dkim = \"require-pass\" }\n";
    let env = start("", mailboxes);
    // replies only obey published policy: no DMARC record is fine
    let r = send(env.ports.smtp, false, None, "a@nodmarc.test", &msg("a@nodmarc.test", ""));
    assert!(accepted(&r), "reply: {r:?}");
    // new issues by email need a DMARC pass
    let mut c = Client::connect(env.ports.smtp);
    c.cmd("EHLO relay.test");
    let r = c.send_mail(
        "a@nodmarc.test",
        &["incoming+gitlab-org-gitlab-20-tok-issue@mx.test"],
        &String::from_utf8(msg("a@nodmarc.test", "")).unwrap(),
    );
    assert!(r.starts_with("550 5.7.1"), "new_issue: {r}");
    // the service desk mailbox needs DMARC and DKIM passes
    let unsigned = String::from_utf8(msg("alice@good.test", "")).unwrap();
    let r = c.send_mail("alice@good.test", &["desk+gitlab-org-gitlab-20-issue-@mx.test"], &unsigned);
    assert!(r.starts_with("550 5.7.20"), "service desk without DKIM: {r}");
    let signed =
        String::from_utf8(sign(KeyKind::Ed25519, "good.test", "s1", &msg("alice@good.test", ""), None)).unwrap();
    let r = c.send_mail("alice@good.test", &["desk+gitlab-org-gitlab-20-issue-@mx.test"], &signed);
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "service desk signed: {r}");
}

/// Mode A's refusal point: Postfix asks the policy service at RCPT, which now checks SPF for
/// the client Postfix saw, so an SPF failure is refused in Postfix's session (no bounce).
#[test]
fn policy_service_refuses_spf_failures_at_rcpt() {
    use std::io::{BufRead, BufReader, Write};
    let env = start("", "");
    let s = std::net::TcpStream::connect(("127.0.0.1", env.ports.policy)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |client: &str, sender: &str| -> String {
        write!(
            w,
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nhelo_name=mx.sender.test\nsender={sender}\nrecipient={}\n\n",
            rcpt()
        )
        .unwrap();
        let mut action = String::new();
        r.read_line(&mut action).unwrap();
        let mut blank = String::new();
        r.read_line(&mut blank).unwrap();
        action.trim_end().to_string()
    };
    assert_eq!(ask("127.0.0.1", "a@good.test"), "action=DUNNO");
    let a = ask("192.0.2.7", "a@good.test");
    assert!(a.starts_with("action=550 5.7.23 "), "{a}");
    let a = ask("127.0.0.1", "a@slow.test");
    assert!(a.starts_with("action=DEFER_IF_PERMIT 4.7.24 "), "{a}");
    let e = last_reject(&env);
    assert_eq!(
        (e["reason"].as_str(), e["listener"].as_str(), e["action"].as_str()),
        (Some("auth_temperror"), Some("policy"), Some("tempfail"))
    );
}

/// SMTP has one reply after DATA. When one recipient's policy hits a DNS failure while another's
/// would store the message, the whole message is deferred (451), never 250 with a recipient
/// silently dropped; the client's retry decides every recipient again.
#[test]
fn a_transient_failure_for_one_recipient_defers_the_whole_smtp_message() {
    let mailboxes = "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{key}@mx.test\"\nauth = { dmarc = \"record\" }\n[[mailbox]]\nname = \"service_desk\"\naddress = \"desk+%{key}@mx.test\"\n";
    let env = start("", mailboxes);
    let mut c = Client::connect(env.ports.smtp);
    c.cmd("EHLO relay.test");
    let body = String::from_utf8(msg("a@slowdmarc.test", "")).unwrap();
    let r = c.send_mail("a@nodmarc.test", &[&rcpt(), "desk+gitlab-org-gitlab-20-issue-@mx.test"], &body);
    assert!(r.starts_with("451 "), "{r}");
    let jobs = json_values(&stdout(&cli(&env.config, &["queue", "list", "--json"])));
    assert!(jobs.is_empty(), "nothing stored: {jobs:?}");
    let e = last_reject(&env);
    assert_eq!((e["reason"].as_str(), e["action"].as_str()), (Some("auth_temperror"), Some("tempfail")));
}
