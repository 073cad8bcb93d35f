//! A loopback DNS server for `make bench`: serves SPF, DKIM and DMARC records for `bench.test`
//! (the test suite's server, tests/common/dns.rs) and prints its address; runs until killed.
//!
//!   cargo run --release --example benchdns

#[path = "../tests/common/dns.rs"]
mod dns;
#[path = "../tests/common/fixtures.rs"]
mod fixtures;

fn main() {
    let mut zone = dns::Zone::default();
    zone.txt("bench.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("s1._domainkey.bench.test", &fixtures::dkim_txt(fixtures::KeyKind::Ed25519))
        .txt("s2._domainkey.bench.test", &fixtures::dkim_txt(fixtures::KeyKind::Rsa2048))
        .txt("_dmarc.bench.test", "v=DMARC1; p=reject");
    let server = dns::DnsServer::start(zone);
    println!("{}", server.addr());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
