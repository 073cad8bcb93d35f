//! Tests of the loopback DNS server (tests/common/dns.rs) and of the signing fixtures
//! (tests/common/fixtures.rs), checked end to end with mail-auth 0.13 resolving through the server.

#[path = "common/dns.rs"]
mod dns;
#[path = "common/fixtures.rs"]
mod fixtures;

use dns::{DnsServer, Zone, authenticator, query};
use fixtures::{KeyKind, arc_seal, dkim_txt, sign, sign_rsa_sha1};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, DkimResult, DmarcResult, MessageAuthenticator, SpfResult};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(2);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn message(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: Alice <{from}>\r\nTo: incoming+abc@mx.test\r\nSubject: {subject}\r\n\
         Date: Tue, 04 Mar 2025 10:15:00 +0000\r\nMessage-ID: <m1@example>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello.\r\n\r\n-- \r\nAlice\r\n"
    )
    .into_bytes()
}

fn txt_of(response: &Message) -> Vec<String> {
    let mut out = Vec::new();
    for record in &response.answers {
        if let RData::TXT(txt) = &record.data {
            out.push(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect());
        }
    }
    out
}

async fn dkim(auth: &MessageAuthenticator, raw: &[u8]) -> Vec<DkimResult> {
    let msg = AuthenticatedMessage::parse(raw).expect("parse");
    auth.verify_dkim(&msg).await.iter().map(|o| o.result().clone()).collect()
}

fn zone_with_key(kind: KeyKind, domain: &str, selector: &str) -> Zone {
    let mut zone = Zone::default();
    zone.txt(&format!("{selector}._domainkey.{domain}"), &dkim_txt(kind));
    zone
}

#[test]
fn answers_txt_a_aaaa_mx_ptr_over_udp_and_tcp() {
    let long = "x".repeat(600);
    let mut zone = Zone::default();
    zone.txt("example.test", "v=spf1 -all")
        .txt("Long.Example.Test.", &long)
        .a("mail.example.test", Ipv4Addr::new(192, 0, 2, 10))
        .aaaa("mail.example.test", Ipv6Addr::LOCALHOST)
        .mx("example.test", 10, "mail.example.test")
        .ptr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), "mail.example.test")
        .ptr(IpAddr::V6(Ipv6Addr::LOCALHOST), "v6.example.test");
    let dns = DnsServer::start(zone);
    let addr = dns.addr();
    for tcp in [false, true] {
        let r = query(&addr, "EXAMPLE.test", RecordType::TXT, tcp, T).expect("TXT answer");
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(txt_of(&r), vec!["v=spf1 -all".to_string()]);
        assert_eq!(r.answers[0].ttl, 300);

        let r = query(&addr, "mail.example.test.", RecordType::A, tcp, T).expect("A answer");
        assert!(matches!(&r.answers[..], [rec] if rec.data == RData::A(Ipv4Addr::new(192, 0, 2, 10).into())));
        let r = query(&addr, "mail.example.test", RecordType::AAAA, tcp, T).expect("AAAA answer");
        assert!(matches!(&r.answers[..], [rec] if rec.data == RData::AAAA(Ipv6Addr::LOCALHOST.into())));

        let r = query(&addr, "example.test", RecordType::MX, tcp, T).expect("MX answer");
        let RData::MX(mx) = &r.answers[0].data else { panic!("not MX: {r:?}") };
        assert_eq!((mx.preference, mx.exchange.to_ascii().as_str()), (10, "mail.example.test."));

        let r = query(&addr, "10.2.0.192.in-addr.arpa", RecordType::PTR, tcp, T).expect("PTR answer");
        assert_eq!(r.answers.len(), 1, "{r:?}");
        let v6 = format!("1.{}ip6.arpa", "0.".repeat(31));
        let r = query(&addr, &v6, RecordType::PTR, tcp, T).expect("PTR v6 answer");
        assert_eq!(r.answers.len(), 1, "{r:?}");
    }
    // > 255 bytes: split into character-strings. Over plain UDP (no EDNS, 512 bytes) it is
    // truncated (TC, no answers); over TCP it comes whole.
    let r = query(&addr, "long.example.test", RecordType::TXT, false, T).expect("UDP answer");
    assert!(r.metadata.truncation && r.answers.is_empty(), "{r:?}");
    let r = query(&addr, "long.example.test", RecordType::TXT, true, T).expect("TCP answer");
    let RData::TXT(txt) = &r.answers[0].data else { panic!("not TXT") };
    assert_eq!(txt.txt_data.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![255, 255, 90]);
    assert_eq!(txt_of(&r), vec![long]);
    assert_eq!(dns.queries(), 14);
}

#[test]
fn nxdomain_nodata_servfail_silent_and_garbage() {
    let mut zone = Zone::default();
    zone.txt("_dmarc.org.test", "v=DMARC1; p=reject").a("host.org.test", Ipv4Addr::LOCALHOST);
    zone.servfail("broken.test").silent("slow.test");
    let dns = DnsServer::start(zone);
    let addr = dns.addr();
    for tcp in [false, true] {
        let r = query(&addr, "nowhere.test", RecordType::TXT, tcp, T).expect("answer");
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.authoritative && r.answers.is_empty());
        // RFC 2308: the zone's SOA comes with every negative answer (resolvers cache them by it).
        let soa = |r: &Message| match &r.authorities[..] {
            [rec] => match &rec.data {
                RData::SOA(soa) => (rec.name.to_ascii(), soa.minimum),
                other => panic!("not SOA: {other:?}"),
            },
            other => panic!("authority section: {other:?}"),
        };
        assert_eq!(soa(&r), ("test.".to_string(), 300));
        // _dmarc.sub.org.test does not exist, its parent's record does (DMARC tree walk).
        let r = query(&addr, "_dmarc.sub.org.test", RecordType::TXT, tcp, T).expect("answer");
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        // NODATA: the name exists with another type, or is an empty non-terminal.
        for name in ["host.org.test", "org.test"] {
            let r = query(&addr, name, RecordType::TXT, tcp, T).expect("answer");
            assert_eq!((r.metadata.response_code, r.answers.len()), (ResponseCode::NoError, 0), "{name}");
            assert_eq!(soa(&r), ("test.".to_string(), 300), "{name}");
        }
        let r = query(&addr, "broken.test", RecordType::TXT, tcp, T).expect("answer");
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        let start = Instant::now();
        assert!(query(&addr, "Slow.Test", RecordType::TXT, tcp, Duration::from_millis(300)).is_none());
        assert!(start.elapsed() >= Duration::from_millis(250));
    }
    // Garbage over UDP and TCP is ignored; the server keeps answering.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for junk in [&b""[..], b"\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", &[0u8; 600]] {
        udp.send_to(junk, &addr).unwrap();
    }
    let mut tcp = TcpStream::connect(&addr).unwrap();
    tcp.write_all(b"\x00\x05hello\x00\x02\xff\xff").unwrap();
    drop(tcp);
    let r = query(&addr, "host.org.test", RecordType::A, false, T).expect("still answering");
    assert_eq!(r.answers.len(), 1);
}

#[tokio::test]
async fn resolver_falls_back_to_tcp_for_big_answers() {
    let big = "y".repeat(3000); // beyond the resolver's 1232-byte EDNS UDP size
    let mut zone = Zone::default();
    zone.txt("big.test", &big);
    let dns = DnsServer::start(zone);
    let auth = authenticator(&dns);
    let got = auth.txt_raw_lookup("big.test").await.expect("lookup");
    assert_eq!(got, big.as_bytes());
    assert_eq!(dns.queries(), 2, "one truncated UDP answer, then the TCP retry");
}

#[tokio::test]
async fn dkimpy_signed_message_verifies() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dkimpy");
    let signed = std::fs::read(format!("{dir}/signed.eml")).unwrap();
    let record = std::fs::read_to_string(format!("{dir}/dkim_txt.txt")).unwrap();
    assert!(!signed.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "signed.eml must be CRLF");
    let mut zone = Zone::default();
    zone.txt("py._domainkey.dkimpy.example", record.trim());
    let dns = DnsServer::start(zone);
    let auth = authenticator(&dns);
    assert_eq!(dkim(&auth, &signed).await, vec![DkimResult::Pass]);

    let mut tampered = signed.clone();
    let at = tampered.windows(6).position(|w| w == b"solved").unwrap();
    tampered[at] = b'S';
    let results = dkim(&auth, &tampered).await;
    assert_eq!(results.len(), 1);
    assert_ne!(results[0], DkimResult::Pass, "one-byte body change must not pass");
}

#[tokio::test]
async fn spf_pass_and_fail_through_the_server() {
    let mut zone = Zone::default();
    zone.txt("spf.test", "v=spf1 ip4:127.0.0.1 -all");
    let dns = DnsServer::start(zone);
    let auth = authenticator(&dns);
    let spf = |ip: IpAddr| SpfParameters::verify_mail_from(ip, "helo.spf.test", "mx.test", "bob@spf.test");
    assert_eq!(auth.verify_spf(spf(LOCAL)).await.result(), SpfResult::Pass);
    assert_eq!(auth.verify_spf(spf("192.0.2.7".parse().unwrap())).await.result(), SpfResult::Fail);
    let none = SpfParameters::verify_mail_from(LOCAL, "h.test", "mx.test", "bob@nospf.test");
    assert_eq!(auth.verify_spf(none).await.result(), SpfResult::None);
}

#[tokio::test]
async fn signing_helpers_verify() {
    for (kind, pass) in
        [(KeyKind::Ed25519, true), (KeyKind::Rsa2048, true), (KeyKind::Rsa1024, true), (KeyKind::Rsa512, false)]
    {
        let dns = DnsServer::start(zone_with_key(kind, "origin.test", "s1"));
        let auth = authenticator(&dns);
        let signed = sign(kind, "origin.test", "s1", &message("alice@origin.test", "Hi"), None);
        let results = dkim(&auth, &signed).await;
        assert_eq!(results.len(), 1, "{kind:?}");
        // RFC 8301: 1024-bit keys must verify, keys under 1024 bits must not pass.
        assert_eq!(results[0] == DkimResult::Pass, pass, "{kind:?}: {:?}", results[0]);
    }
}

#[tokio::test]
async fn rsa_sha1_still_passes_in_mail_auth() {
    // Trap: RFC 8301 says rsa-sha1 must not be verified as valid, yet mail-auth 0.13 returns Pass.
    let dns = DnsServer::start(zone_with_key(KeyKind::Rsa2048, "origin.test", "s1"));
    let auth = authenticator(&dns);
    let signed = sign_rsa_sha1("origin.test", "s1", &message("alice@origin.test", "Hi"));
    assert!(String::from_utf8_lossy(&signed).contains("a=rsa-sha1"));
    let msg = AuthenticatedMessage::parse(&signed).unwrap();
    let out = auth.verify_dkim(&msg).await;
    assert_eq!(out[0].result(), &DkimResult::Pass);
    assert_eq!(out[0].signature().map(|s| s.a), Some(mail_auth::common::crypto::Algorithm::RsaSha1));
}

#[tokio::test]
async fn expired_tampered_and_unreachable_keys() {
    let mut zone = zone_with_key(KeyKind::Ed25519, "origin.test", "s1");
    zone.silent("slow._domainkey.origin.test").servfail("bad._domainkey.origin.test");
    let dns = DnsServer::start(zone);
    let auth = authenticator(&dns);
    let msg = message("alice@origin.test", "Hi");
    let expiring = sign(KeyKind::Ed25519, "origin.test", "s1", &msg, Some(1));
    assert_eq!(dkim(&auth, &expiring).await, vec![DkimResult::Pass]);
    std::thread::sleep(Duration::from_millis(2100));
    assert!(matches!(dkim(&auth, &expiring).await[..], [DkimResult::Neutral(_)]));
    // A changed signed header: Fail (bad signature), not Pass.
    let signed = sign(KeyKind::Ed25519, "origin.test", "s1", &msg, None);
    let changed = String::from_utf8(signed).unwrap().replace("Subject: Hi", "Subject: Ho");
    assert!(matches!(dkim(&auth, changed.as_bytes()).await[..], [DkimResult::Fail(_)]));
    for selector in ["slow", "bad"] {
        let start = Instant::now();
        let signed = sign(KeyKind::Ed25519, "origin.test", selector, &msg, None);
        let results = dkim(&auth, &signed).await;
        assert!(matches!(results[..], [DkimResult::TempError(_)]), "{selector}: {results:?}");
        assert!(start.elapsed() < Duration::from_secs(5), "{selector}: {:?}", start.elapsed());
    }
    let unknown = sign(KeyKind::Ed25519, "origin.test", "nokey", &msg, None);
    assert!(matches!(dkim(&auth, &unknown).await[..], [DkimResult::PermError(_)]));
}

#[tokio::test]
async fn arc_sealed_forward_and_dmarc_tree_walk() {
    let mut zone = zone_with_key(KeyKind::Ed25519, "origin.test", "s1");
    zone.txt("arc._domainkey.lists.test", &dkim_txt(KeyKind::Rsa2048));
    zone.txt("_dmarc.origin.test", "v=DMARC1; p=reject");
    let dns = DnsServer::start(zone);
    let auth = authenticator(&dns);
    // The author's domain signs; the list verifies, tags the subject and seals.
    let original = sign(KeyKind::Ed25519, "origin.test", "s1", &message("alice@sub.origin.test", "Hi"), None);
    let forwarded = String::from_utf8(original.clone()).unwrap().replace("Subject: Hi", "Subject: [list] Hi");
    let sealed = arc_seal(&auth, KeyKind::Rsa2048, "lists.test", "arc", &original, forwarded.as_bytes(), LOCAL).await;
    let text = String::from_utf8_lossy(&sealed);
    assert!(text.starts_with("ARC-Seal: i=1;") && text.contains("cv=none"), "{text}");
    assert!(text.contains("ARC-Authentication-Results: i=1; lists.test;") && text.contains("dkim=pass"), "{text}");

    let msg = AuthenticatedMessage::parse(&sealed).unwrap();
    let dkim_out = auth.verify_dkim(&msg).await;
    assert!(matches!(dkim_out[0].result(), DkimResult::Fail(_)), "{:?}", dkim_out[0].result());
    assert_eq!(auth.verify_arc(&msg).await.result(), &DkimResult::Pass);

    // A second hop seals over the first: i=2, cv=pass, still verifies.
    let twice = arc_seal(&auth, KeyKind::Rsa2048, "lists.test", "arc", &sealed, &sealed, LOCAL).await;
    assert!(String::from_utf8_lossy(&twice).contains("cv=pass"));
    let msg2 = AuthenticatedMessage::parse(&twice).unwrap();
    assert_eq!(auth.verify_arc(&msg2).await.result(), &DkimResult::Pass);

    // DMARC for From: @sub.origin.test walks up to _dmarc.origin.test through NXDOMAINs.
    let msg = AuthenticatedMessage::parse(&original).unwrap();
    let dkim_out = auth.verify_dkim(&msg).await;
    let spf = auth.verify_spf(SpfParameters::verify_mail_from(LOCAL, "h.test", "mx.test", "a@sub.origin.test")).await;
    let dmarc = auth.verify_dmarc(DmarcParameters::new(&msg, &dkim_out, "sub.origin.test", &spf)).await;
    assert_eq!(dmarc.dkim_result(), &DmarcResult::Pass);
    assert_eq!(dmarc.result(), DmarcResult::Pass);
    // The walk again: its NXDOMAINs are cached by the resolver (from their SOA), as with a
    // real authoritative server; without the SOA every message would query them again.
    let before = dns.queries();
    let dmarc = auth.verify_dmarc(DmarcParameters::new(&msg, &dkim_out, "sub.origin.test", &spf)).await;
    assert_eq!(dmarc.result(), DmarcResult::Pass);
    assert_eq!(dns.queries(), before, "the second walk asked the server again");
}
