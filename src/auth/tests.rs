//! I/O side without a network: a nameserver that never answers (a closed loopback port, or a
//! silent UDP socket) must give temperror, never a pass. Full DNS tests run against a loopback
//! DNS server in tests/.

use std::net::{IpAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::*;

const SIGNED: &str = "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.example; s=sel;\r\n\
    \th=from:subject; bh=zS7KNTV0HyeorkDDGwxB1AV6enuRKzO5rthkhdHIRnY=; b=AAAA\r\n\
    From: Alice <alice@sender.example>\r\nSubject: hi\r\n\r\nhello\r\n";

/// A resolver whose only nameserver is `addr`, with a short timeout.
fn authenticator(addr: String) -> Authenticator {
    let cfg = AuthConfig { nameservers: vec![addr], timeout: Duration::from_millis(300), ..AuthConfig::default() };
    Authenticator::new(&cfg).unwrap()
}

/// A UDP socket that receives queries and never answers.
fn silent_server() -> (UdpSocket, String) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    (sock, addr)
}

fn closed_port() -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    drop(sock);
    addr
}

fn ip() -> IpAddr {
    "192.0.2.7".parse().unwrap()
}

#[test]
fn bad_nameservers_are_errors() {
    let cfg = AuthConfig { nameservers: vec!["dns.example:53".into()], ..AuthConfig::default() };
    assert!(matches!(Authenticator::new(&cfg), Err(AuthError::Config(_))));
}

#[tokio::test]
async fn spf_dns_failure_is_temperror() {
    for addr in [closed_port(), silent_server().1] {
        let a = authenticator(addr.clone());
        let started = Instant::now();
        let spf = a.spf(ip(), "mx.sender.example", "<alice@sender.example>", "mx.example.com").await;
        assert_eq!(spf.result, AuthResult::TempError, "{addr}");
        assert_eq!((spf.identity, spf.domain.as_str()), (Identity::MailFrom, "sender.example"));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let helo = a.spf(ip(), "mx.sender.example", "<>", "mx.example.com").await;
        assert_eq!((helo.result, helo.identity), (AuthResult::TempError, Identity::Helo));
        assert_eq!((helo.domain.as_str(), helo.mail_from.as_str()), ("mx.sender.example", ""));
    }
}

#[tokio::test]
async fn message_dns_failure_is_never_a_pass() {
    let (_sock, addr) = silent_server();
    let a = authenticator(addr);
    let spf = a.spf(ip(), "mx.sender.example", "alice@sender.example", "mx.example.com").await;
    let m = a.message(SIGNED.as_bytes(), &spf, ip(), "mx.sender.example", "alice@sender.example").await;
    assert_eq!(m.from_count, 1);
    assert_eq!(m.dkim.len(), 1);
    let s = &m.dkim[0];
    assert_eq!((s.domain.as_str(), s.selector.as_str(), s.algorithm), ("sender.example", "sel", "rsa-sha256"));
    assert!(!s.passes());
    assert_eq!(m.dkim_result(), AuthResult::TempError, "{s:?}");
    assert_eq!(m.dmarc.result, AuthResult::TempError);
    assert_eq!(m.dmarc.from_domain, "sender.example");
    assert_eq!(m.arc.result, AuthResult::None);
    assert!(m.pieces.dkim.starts_with(";\r\n\tdkim=temperror"), "{:?}", m.pieces.dkim);
    assert!(m.pieces.dmarc.starts_with(";\r\n\tdmarc=temperror"), "{:?}", m.pieces.dmarc);
    assert_eq!(m.pieces.arc, ";\r\n\tarc=none smtp.remote-ip=192.0.2.7");
}

#[tokio::test]
async fn messages_without_signatures_or_from() {
    let (_sock, addr) = silent_server();
    let a = authenticator(addr);
    let spf = SpfCheck::not_checked(ip(), "mx.sender.example", "");
    let m = a.message(b"Subject: none\r\nFrom: a@x.example, b@y.example\r\n\r\nbody\r\n", &spf, ip(), "h", "").await;
    assert_eq!((m.from_count, m.dkim.len(), m.dkim_result()), (2, 0, AuthResult::None));
    // several From domains: DMARC does not apply (the From rule refuses it instead)
    assert_eq!((m.dmarc.result, m.pieces.dmarc.as_str()), (AuthResult::None, ";\r\n\tdmarc=none"));
    assert_eq!(m.pieces.dkim, ";\r\n\tdkim=none");
    let empty = a.message(b"", &spf, ip(), "h", "").await;
    assert_eq!((empty.from_count, empty.dmarc.result), (0, AuthResult::None));
}

#[test]
fn futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let a = authenticator(closed_port());
    let spf = SpfCheck::not_checked(ip(), "h", "");
    send(&a.spf(ip(), "h", "a@b", "mx"));
    send(&a.message(b"", &spf, ip(), "h", ""));
}

mod offline {
    //! Real signatures, DNS answers placed in the shared cache (the nameserver never answers).
    use base64::Engine;
    use mail_auth::arc::ArcSealer;
    use mail_auth::common::crypto::Ed25519Key;
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::dkim::DkimSigner;
    use mail_auth::dmarc::Dmarc;
    use mail_auth::hickory_resolver::proto::op::ResponseCode;
    use mail_auth::spf::Spf;
    use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults, DnsError, Error, ResolverCache, Txt};

    use super::*;
    use crate::gate::auth::{AuthPolicy, message_verdict};
    use crate::gate::verdict::Verdict;

    const MESSAGE: &str =
        "From: Alice <alice@sender.example>\r\nTo: incoming@in.example\r\nSubject: hi\r\n\r\nhello\r\n";

    fn put(a: &Authenticator, name: &str, txt: Txt) {
        a.0.txt.insert(name.into(), txt, Instant::now() + Duration::from_secs(600));
    }

    /// A fresh Ed25519 key and its DNS record, published as `name`.
    fn key(a: &Authenticator, name: &str) -> Ed25519Key {
        let key = Ed25519Key::from_pkcs8_der(&Ed25519Key::generate_pkcs8().unwrap()).unwrap();
        let p = base64::engine::general_purpose::STANDARD.encode(key.public_key());
        let record = format!("v=DKIM1; k=ed25519; p={p}");
        put(a, name, DomainKey::parse(record.as_bytes()).unwrap().into());
        key
    }

    fn setup() -> (Authenticator, Ed25519Key, Ed25519Key, UdpSocket) {
        let (sock, addr) = silent_server();
        let a = authenticator(addr);
        let spf = |r: &str| Txt::from(Spf::parse(r.as_bytes()).unwrap());
        put(&a, "sender.example.", spf("v=spf1 ip4:192.0.2.0/24 -all"));
        put(&a, "lists.example.org.", spf("v=spf1 ip4:198.51.100.0/24 -all"));
        put(&a, "_dmarc.sender.example.", Dmarc::parse(b"v=DMARC1; p=reject").unwrap().into());
        let nx = || Txt::Error(Error::Dns(DnsError::RecordNotFound(ResponseCode::NXDomain)));
        put(&a, "_dmarc.example.", nx());
        let sender = key(&a, "sel._domainkey.sender.example.");
        let list = key(&a, "arc._domainkey.lists.example.org.");
        (a, sender, list, sock)
    }

    fn sign(key: Ed25519Key, raw: &str) -> String {
        let sig = DkimSigner::from_key(key).domain("sender.example").selector("sel").headers(["From", "To", "Subject"]);
        format!("{}{raw}", sig.sign(raw.as_bytes()).unwrap().to_header())
    }

    #[tokio::test]
    async fn signed_mail_passes_and_tampering_fails() {
        let (a, sender, _list, _sock) = setup();
        let spf = a.spf(ip(), "mx.sender.example", "alice@sender.example", "mx.example.com").await;
        assert_eq!(spf.result, AuthResult::Pass);
        let signed = sign(sender, MESSAGE);
        let m = a.message(signed.as_bytes(), &spf, ip(), "mx.sender.example", "alice@sender.example").await;
        assert_eq!(
            (m.dkim_result(), m.dmarc.result, m.dmarc.policy),
            (AuthResult::Pass, AuthResult::Pass, Policy::Reject)
        );
        assert_eq!((m.dkim[0].algorithm, m.dkim[0].weak, m.from_count), ("ed25519-sha256", false, 1));
        assert!(
            m.pieces.dkim.starts_with(";\r\n\tdkim=pass header.d=sender.example header.s=sel"),
            "{}",
            m.pieces.dkim
        );
        let tampered = signed.replace("hello", "hellO");
        let spf_fail = a.spf("203.0.113.9".parse().unwrap(), "h.example", "alice@sender.example", "mx").await;
        assert_eq!(spf_fail.result, AuthResult::Fail);
        let m = a.message(tampered.as_bytes(), &spf_fail, spf_fail.ip, "h.example", "alice@sender.example").await;
        assert_eq!((m.dkim_result(), m.dmarc.result), (AuthResult::Neutral, AuthResult::Fail));
        let p = AuthPolicy {
            spf: crate::config::SpfMode::Record,
            ..crate::gate::auth::policy_for(&AuthConfig::default(), None, None)
        };
        assert!(matches!(message_verdict(&p, &spf_fail, &m).verdict, Verdict::Reject { .. }));
    }

    #[tokio::test]
    async fn a_trusted_arc_sealer_rescues_a_forwarded_message() {
        let (a, sender, list, _sock) = setup();
        // the list adds a footer (breaking DKIM), then seals; it sends from its own IP and domain
        let forwarded = format!("{}-- \r\nthe list\r\n", sign(sender, MESSAGE));
        let msg = AuthenticatedMessage::parse(forwarded.as_bytes()).unwrap();
        let results = AuthenticationResults::new("lists.example.org");
        let sealer = ArcSealer::from_key(list).domain("lists.example.org").selector("arc");
        let set =
            sealer.headers(["From", "To", "Subject", "DKIM-Signature"]).seal(&msg, &results, &ArcOutput::default());
        let sealed = format!("{}{forwarded}", set.unwrap().to_header());
        let list_ip: IpAddr = "198.51.100.5".parse().unwrap();
        let spf = a.spf(list_ip, "mail.lists.example.org", "bounce@lists.example.org", "mx").await;
        assert_eq!(spf.result, AuthResult::Pass);
        let m = a.message(sealed.as_bytes(), &spf, list_ip, "mail.lists.example.org", "bounce@lists.example.org").await;
        assert_eq!((m.dkim_result(), m.dmarc.result), (AuthResult::Neutral, AuthResult::Fail));
        assert_eq!(
            (m.arc.result, m.arc.sealers.as_slice()),
            (AuthResult::Pass, &["lists.example.org".to_string()][..])
        );
        let mut cfg = AuthConfig::default();
        let untrusted = crate::gate::auth::policy_for(&cfg, None, None);
        assert!(matches!(message_verdict(&untrusted, &spf, &m).verdict, Verdict::Reject { .. }));
        // This seal's ARC-Authentication-Results are empty: the list vouches for nothing, so even
        // a trusted sealer rescues nothing (tests/auth.rs has a list that recorded a DKIM pass).
        assert!(!m.arc.last_hop_vouches);
        cfg.trusted_arc_sealers = vec!["lists.example.org".into()];
        let d = message_verdict(&crate::gate::auth::policy_for(&cfg, None, None), &spf, &m);
        assert!(matches!(d.verdict, Verdict::Reject { .. }) && !d.arc_override, "{:?}", d.verdict);
    }
}
