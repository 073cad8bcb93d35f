//! TLS on SMTP listeners, against the real binary: STARTTLS and implicit TLS with a rustls client
//! and with swaks, `require_tls`, the STARTTLS injection defence, certificate reload on SIGHUP,
//! and `mailgate check` / `serve` on bad certificate files. Certificates are made by rcgen when
//! the test runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A self-signed certificate for `mx.test`, written as `<name>.crt` / `<name>.key`.
struct Pair {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn make_pair(dir: &Path, name: &str) -> Pair {
    let ck = rcgen::generate_simple_self_signed(vec!["mx.test".to_string(), "localhost".to_string()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    Pair { cert, key, der: ck.cert.der().clone() }
}

/// Replaces a file the way an ACME client should: write aside, then rename over it.
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// One SMTP listener with TLS (plus the extra keys), and the usual HTTP API.
fn tls_config(dir: &Path, ports: &Ports, pair: &Pair, keys: &str) -> PathBuf {
    let listeners = format!(
        "[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n{keys}\n",
        ports.smtp,
        pair.cert.display(),
        pair.key.display()
    );
    write_config(dir, ports, &listeners, "")
}

fn connector(trusted: &[&CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add((*c).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A minimal async SMTP client over any stream.
struct Smtp<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    fn new(s: S) -> Self {
        Smtp { io: BufReader::new(s) }
    }

    /// One whole reply, lines joined with '\n'; empty at end of stream.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.io.read_line(&mut line))
                .await
                .expect("reply within 20s")
                .unwrap_or(0);
            if n == 0 {
                return all;
            }
            all.push_str(line.trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
            all.push('\n');
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    async fn mail(&mut self, from: &str, subject: &str) -> String {
        assert!(self.cmd(&format!("MAIL FROM:<{from}>")).await.starts_with("250"));
        assert!(self.cmd(&format!("RCPT TO:<incoming+{KEY}@localhost>")).await.starts_with("250"));
        assert!(self.cmd("DATA").await.starts_with("354"));
        let id = format!("{subject}@example.org");
        self.send(message(&id, subject, "").as_bytes()).await;
        self.cmd(".").await
    }

    fn into_inner(self) -> S {
        self.io.into_inner()
    }
}

/// Connects, reads the greeting, EHLO, STARTTLS and the handshake.
async fn starttls(port: u16, trusted: &[&CertificateDer<'static>]) -> Smtp<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut plain = Smtp::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    assert!(plain.reply().await.starts_with("220 mx.test ESMTP"));
    let ehlo = plain.cmd("EHLO client.example.org").await;
    assert!(ehlo.lines().any(|l| &l[4..] == "STARTTLS"), "{ehlo}");
    assert_eq!(plain.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS");
    let tls = connector(trusted).connect(ServerName::try_from("mx.test").unwrap(), plain.into_inner()).await.unwrap();
    Smtp::new(tls)
}

fn peer_cert(tls: &Smtp<tokio_rustls::client::TlsStream<TcpStream>>) -> CertificateDer<'static> {
    tls.io.get_ref().get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

fn jobs(config: &Path) -> Vec<serde_json::Value> {
    json_values(&stdout(&cli(config, &["queue", "list", "--json"])))
}

fn swaks(port: u16, extra: &[&str]) -> std::process::Output {
    assert!(
        Command::new("swaks").arg("--version").output().is_ok(),
        "swaks is not installed: run `make test` (it installs it) or `apt-get install -y swaks`"
    );
    Command::new("swaks")
        .args(["--server", "127.0.0.1", "--port", &port.to_string(), "--from", "alice@example.org"])
        .args(["--to", &format!("incoming+{KEY}@localhost"), "--helo", "client.example.org"])
        .args(extra)
        .output()
        .expect("run swaks")
}

fn wait_for_log(server: &Server, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if server.log_text().matches(needle).count() >= count {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{needle:?} not in the log ({count}x):\n{}", server.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_with_a_rustls_client_records_version_and_cipher() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let pair = make_pair(dir.path(), "mx");
    let config = tls_config(dir.path(), &ports, &pair, "");
    let server = Server::start(&config, ports.smtp, ports.http);

    let mut s = starttls(ports.smtp, &[&pair.der]).await;
    assert_eq!(peer_cert(&s), pair.der);
    // the session started over: EHLO again, no STARTTLS offered any more
    assert_eq!(s.cmd("MAIL FROM:<a@example.org>").await, "503 5.5.1 Error: send HELO/EHLO first");
    let ehlo = s.cmd("EHLO client.example.org").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(s.cmd("STARTTLS").await, "503 5.5.1 Error: TLS already active");
    let r = s.mail("alice@example.org", "over tls").await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    assert_eq!(s.cmd("QUIT").await, "221 2.0.0 Bye");

    let jobs = jobs(&config);
    assert_eq!(jobs.len(), 1);
    let tls = &jobs[0]["envelope"]["tls"];
    assert_eq!(tls["version"], "TLSv1.3", "{}", jobs[0]);
    assert!(tls["cipher"].as_str().unwrap().starts_with("TLS13_"), "{tls}");
    assert_eq!(jobs[0]["envelope"]["protocol"], "ESMTP");
    let id = jobs[0]["id"].as_str().unwrap();
    let raw = stdout(&cli(&config, &["queue", "show", id, "--raw"]));
    let cipher = tls["cipher"].as_str().unwrap();
    assert!(raw.contains(&format!("with ESMTPS\r\n\t(version=TLSv1.3 cipher={cipher})")), "{raw}");
    wait_for_log(&server, "session closed", 1);
    let log = server.log_text();
    assert!(log.contains("tls_version=TLSv1.3"), "{log}");
}

#[test]
fn swaks_starttls_and_implicit_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let pair = make_pair(dir.path(), "mx");
    let implicit_port = free_port();
    let listeners = format!(
        "[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\ntls = {{ cert = \"{c}\", key = \"{k}\" }}\n\
         [[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{implicit_port}\"\n\
         tls = {{ cert = \"{c}\", key = \"{k}\" }}\nimplicit_tls = true\nrequire_tls = true\n",
        ports.smtp,
        c = pair.cert.display(),
        k = pair.key.display()
    );
    let config = write_config(dir.path(), &ports, &listeners, "");
    let _server = Server::start(&config, ports.smtp, ports.http);

    let o = swaks(ports.smtp, &["--tls", "--header", "Subject: starttls"]);
    let out = stdout(&o);
    assert!(o.status.success(), "swaks --tls failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("220 2.0.0 Ready to start TLS") && out.contains("TLS started"), "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");

    // implicit TLS (port 465 style): the handshake comes before the greeting
    let o = swaks(implicit_port, &["--tls-on-connect", "--header", "Subject: implicit"]);
    let out = stdout(&o);
    assert!(o.status.success(), "swaks --tlsc failed:\n{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("TLS started") && out.contains("250 2.0.0 Ok: queued as"), "{out}");
    assert!(!out.contains("STARTTLS"), "implicit TLS does not advertise STARTTLS:\n{out}");

    // plaintext swaks against the implicit-TLS port gets no greeting
    let o = swaks(implicit_port, &["--timeout", "5"]);
    assert!(!o.status.success());
    assert!(!stdout(&o).contains("220 mx.test"), "{}", stdout(&o));

    let jobs = jobs(&config);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    for j in &jobs {
        assert!(j["envelope"]["tls"]["version"].as_str().unwrap().starts_with("TLSv1."), "{j}");
        assert!(!j["envelope"]["tls"]["cipher"].as_str().unwrap().is_empty(), "{j}");
    }
}

#[test]
fn require_tls_refuses_mail_before_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let pair = make_pair(dir.path(), "mx");
    let config = tls_config(dir.path(), &ports, &pair, "require_tls = true");
    let _server = Server::start(&config, ports.smtp, ports.http);

    let mut c = Client::connect(ports.smtp);
    let ehlo = c.cmd("EHLO client.example.org");
    assert!(ehlo.contains("250 STARTTLS") || ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert_eq!(c.cmd("MAIL FROM:<alice@example.org>"), "530 5.7.0 Must issue a STARTTLS command first");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");

    // swaks without --tls is refused; with it, the mail goes through
    let o = swaks(ports.smtp, &[]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("530 5.7.0"), "{}", stdout(&o));
    let o = swaks(ports.smtp, &["--tls"]);
    assert!(o.status.success(), "{}", stdout(&o));

    let entries = json_values(&stdout(&cli(&config, &["rejects", "--reason", "tls_required", "--json"])));
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0]["code"], 530);
    assert_eq!(entries[0]["enhanced"], "5.7.0");
    assert_eq!(entries[0]["client_ip"], "127.0.0.1");
    assert_eq!(jobs(&config).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_pipelined_after_starttls_are_not_executed() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let pair = make_pair(dir.path(), "mx");
    let config = tls_config(dir.path(), &ports, &pair, "");
    let server = Server::start(&config, ports.smtp, ports.http);

    for (i, injected) in ["RSET\r\n", "MAIL FROM:<evil@example.org>\r\n"].into_iter().enumerate() {
        let mut plain = Smtp::new(TcpStream::connect(("127.0.0.1", ports.smtp)).await.unwrap());
        plain.reply().await;
        plain.cmd("EHLO client.example.org").await;
        // one write: STARTTLS and the injected command arrive together
        plain.send(format!("STARTTLS\r\n{injected}").as_bytes()).await;
        assert_eq!(plain.reply().await, "220 2.0.0 Ready to start TLS");
        let tls = connector(&[&pair.der])
            .connect(ServerName::try_from("mx.test").unwrap(), plain.into_inner())
            .await
            .expect("handshake: nothing but TLS may follow the 220");
        let mut s = Smtp::new(tls);
        // the client hears only answers to what it sends over TLS
        assert!(s.cmd("HELP").await.starts_with("214 2.0.0"), "{injected:?} was answered after TLS");
        assert!(s.cmd("EHLO client.example.org").await.starts_with("250-mx.test"));
        let r = s.mail("alice@example.org", &format!("after injection {i}")).await;
        assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
        assert_eq!(s.cmd("QUIT").await, "221 2.0.0 Bye");
        assert_eq!(s.reply().await, "", "nothing more after 221");
    }
    let jobs = jobs(&config);
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j["envelope"]["mail_from"] == "alice@example.org"), "{jobs:?}");
    wait_for_log(&server, "input pipelined after STARTTLS thrown away", 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_certificate_and_keeps_the_old_one_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let a = make_pair(dir.path(), "a");
    let b = make_pair(dir.path(), "b");
    let live = Pair { cert: dir.path().join("live.crt"), key: dir.path().join("live.key"), der: a.der.clone() };
    std::fs::copy(&a.cert, &live.cert).unwrap();
    std::fs::copy(&a.key, &live.key).unwrap();
    let config = tls_config(dir.path(), &ports, &live, "");
    let server = Server::start(&config, ports.smtp, ports.http);
    let trusted = [&a.der, &b.der];

    let mut old = starttls(ports.smtp, &trusted).await;
    assert_eq!(peer_cert(&old), a.der);

    replace_file(&b.key, &live.key);
    replace_file(&b.cert, &live.cert);
    signal(server.pid(), "HUP");
    wait_for_log(&server, "TLS certificate reloaded", 1);
    let mut s = starttls(ports.smtp, &trusted).await;
    assert_eq!(peer_cert(&s), b.der, "a new connection sees the new certificate");
    assert_eq!(s.cmd("QUIT").await, "221 2.0.0 Bye");
    // the connection opened before the reload goes on with its own
    assert!(old.cmd("EHLO client.example.org").await.starts_with("250-mx.test"));
    assert!(old.mail("alice@example.org", "before reload").await.starts_with("250 2.0.0 Ok"));

    // a broken certificate file: an error in the log, the previous certificate stays
    std::fs::write(&live.cert, "not a certificate\n").unwrap();
    signal(server.pid(), "HUP");
    wait_for_log(&server, "TLS certificate reload failed", 1);
    // a key that is not the certificate's: refused as well
    replace_file(&a.cert, &live.cert);
    signal(server.pid(), "HUP");
    wait_for_log(&server, "TLS certificate reload failed", 2);
    let mut s = starttls(ports.smtp, &trusted).await;
    assert_eq!(peer_cert(&s), b.der);
    s.cmd("EHLO client.example.org").await;
    assert!(s.mail("alice@example.org", "after a failed reload").await.starts_with("250 2.0.0 Ok"));
    assert_eq!(jobs(&config).len(), 2);
}

#[test]
fn check_and_serve_report_bad_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let good = make_pair(dir.path(), "good");
    let config = tls_config(dir.path(), &ports, &good, "");
    let o = cli(&config, &["check"]);
    let out = stdout(&o);
    assert!(out.contains(&format!("ok: listener 127.0.0.1:{}: TLS certificate", ports.smtp)), "{out}");
    assert!(!out.contains("TLS:"), "{out}");

    let other = make_pair(dir.path(), "other");
    for (name, pair, expect) in [
        ("missing", Pair { cert: dir.path().join("missing.crt"), ..make_pair(dir.path(), "m") }, "cannot read"),
        ("mismatched", Pair { key: other.key.clone(), ..make_pair(dir.path(), "x") }, "certificate"),
    ] {
        let config = tls_config(dir.path(), &ports, &pair, "");
        let o = cli(&config, &["check"]);
        let out = stdout(&o);
        assert!(!o.status.success(), "{name}: check must fail:\n{out}");
        let line = out.lines().find(|l| l.starts_with("error: listener") && l.contains("TLS:"));
        assert!(line.is_some_and(|l| l.contains(expect)), "{name}:\n{out}");

        // serve refuses to start, naming the listener and the problem
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name}: serve started with a bad certificate");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success());
        assert!(err.contains("TLS") && err.contains(expect), "{name}: {err}");
    }

    // require_tls without tls, tls on an lmtp listener: configuration errors
    let listeners = format!(
        "[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\nrequire_tls = true\n\
         [[listen]]\nprotocol = \"lmtp\"\naddress = \"127.0.0.1:{}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        ports.smtp,
        ports.lmtp,
        good.cert.display(),
        good.key.display()
    );
    let config = write_config(dir.path(), &ports, &listeners, "");
    let out = stdout(&cli(&config, &["check"]));
    assert!(out.contains("require_tls needs tls"), "{out}");
    assert!(out.contains("tls is for smtp listeners only"), "{out}");
}
