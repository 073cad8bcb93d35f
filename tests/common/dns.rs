//! A small authoritative DNS server for tests: 127.0.0.1, UDP and TCP on the same port, records
//! from a [`Zone`] built in the test. Encoding and decoding use `hickory-proto`; the threads are
//! plain std threads that stop when the [`DnsServer`] is dropped.
#![allow(dead_code)]

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

const TTL: u32 = 300;
const POLL: Duration = Duration::from_millis(50);

/// The records served. Names are case-insensitive, with or without the trailing dot.
#[derive(Default, Clone)]
pub struct Zone {
    records: HashMap<String, Vec<RData>>,
    silent: HashSet<String>,
    servfail: HashSet<String>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(text: &str) -> Name {
    Name::from_ascii(format!("{}.", text.trim_end_matches('.'))).expect("valid DNS name")
}

impl Zone {
    fn add(&mut self, owner: &str, data: RData) -> &mut Self {
        self.records.entry(key(owner)).or_default().push(data);
        self
    }

    /// A TXT record; texts longer than 255 bytes are split into 255-byte character-strings.
    pub fn txt(&mut self, name: &str, text: &str) -> &mut Self {
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(255).collect();
        let chunks = if chunks.is_empty() { vec![&b""[..]] } else { chunks };
        self.add(name, RData::TXT(TXT::from_bytes(chunks)))
    }

    pub fn a(&mut self, name: &str, ip: Ipv4Addr) -> &mut Self {
        self.add(name, RData::A(A(ip)))
    }

    pub fn aaaa(&mut self, name: &str, ip: Ipv6Addr) -> &mut Self {
        self.add(name, RData::AAAA(AAAA(ip)))
    }

    pub fn mx(&mut self, owner: &str, pref: u16, exchange: &str) -> &mut Self {
        self.add(owner, RData::MX(MX::new(pref, name(exchange))))
    }

    /// A PTR record under in-addr.arpa / ip6.arpa for `ip`.
    pub fn ptr(&mut self, ip: IpAddr, target: &str) -> &mut Self {
        self.add(&reverse_name(ip), RData::PTR(PTR(name(target))))
    }

    /// Queries for this name (any type) are never answered: the resolver times out.
    pub fn silent(&mut self, name: &str) -> &mut Self {
        self.silent.insert(key(name));
        self
    }

    /// Queries for this name (any type) are answered with SERVFAIL.
    pub fn servfail(&mut self, name: &str) -> &mut Self {
        self.servfail.insert(key(name));
        self
    }

    /// A name exists if it owns records or is an ancestor of one (an empty non-terminal).
    fn exists(&self, k: &str) -> bool {
        let suffix = format!(".{k}");
        self.records.keys().any(|owner| owner == k || owner.ends_with(&suffix))
    }
}

/// The reverse-lookup name of an address, without the trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut labels: Vec<String> = Vec::with_capacity(34);
            for byte in v6.octets().iter().rev() {
                labels.push(format!("{:x}", byte & 0x0f));
                labels.push(format!("{:x}", byte >> 4));
            }
            format!("{}.ip6.arpa", labels.join("."))
        }
    }
}

/// What to do with one received packet: `None` means no reply (garbage, or a `silent` name).
fn answer(zone: &Zone, packet: &[u8], queries: &AtomicUsize) -> Option<Message> {
    let request = Message::from_vec(packet).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    queries.fetch_add(1, Ordering::SeqCst);
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        response.set_edns(ours);
    }
    let query = match (request.metadata.op_code, request.queries.as_slice()) {
        (OpCode::Query, [query]) => query.clone(),
        (OpCode::Query, _) => {
            response.metadata.response_code = ResponseCode::FormErr;
            return Some(response);
        }
        _ => {
            response.metadata.response_code = ResponseCode::NotImp;
            return Some(response);
        }
    };
    response.add_query(query.clone());
    let k = key(&query.name.to_ascii());
    if zone.silent.contains(&k) {
        return None;
    }
    if zone.servfail.contains(&k) {
        response.metadata.response_code = ResponseCode::ServFail;
        return Some(response);
    }
    response.metadata.authoritative = true;
    let wanted = query.query_type;
    for data in zone.records.get(&k).into_iter().flatten() {
        if wanted == RecordType::ANY || data.record_type() == wanted {
            response.add_answer(Record::from_rdata(query.name.clone(), TTL, data.clone()));
        }
    }
    if !zone.exists(&k) {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    if response.answers.is_empty() {
        // NXDOMAIN and "no data": the zone's SOA in the authority section, as RFC 2308 requires
        // of authoritative servers; resolvers take the negative-caching time from it.
        response.add_authority(soa_for(&query.name));
    }
    Some(response)
}

/// The SOA of the zone `name` is in: every name is served as part of its top-level domain's
/// zone, whose negative answers may be cached for [`TTL`] seconds.
fn soa_for(name: &Name) -> Record {
    let apex = Name::from_ascii(name.to_ascii().trim_end_matches('.').rsplit('.').next().unwrap_or(""))
        .map(|n| n.append_domain(&Name::root()).unwrap_or_else(|_| Name::root()))
        .unwrap_or_else(|_| Name::root());
    let host = |label: &str| Name::from_ascii(label).unwrap_or_else(|_| Name::root()).append_domain(&apex);
    let soa = SOA::new(
        host("ns").unwrap_or_else(|_| apex.clone()),
        host("hostmaster").unwrap_or_else(|_| apex.clone()),
        1,
        3600,
        600,
        86400,
        TTL,
    );
    Record::from_rdata(apex, TTL, RData::SOA(soa))
}

struct Shared {
    zone: Zone,
    stop: AtomicBool,
    queries: AtomicUsize,
}

/// A running server; dropping it stops and joins its threads.
pub struct DnsServer {
    pub port: u16,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    pub fn start(zone: Zone) -> DnsServer {
        let (udp, tcp) = bind_pair();
        let port = udp.local_addr().expect("udp addr").port();
        udp.set_read_timeout(Some(POLL)).expect("udp timeout");
        tcp.set_nonblocking(true).expect("tcp nonblocking");
        let shared = Arc::new(Shared { zone, stop: AtomicBool::new(false), queries: AtomicUsize::new(0) });
        let (s1, s2) = (shared.clone(), shared.clone());
        let threads = vec![
            std::thread::spawn(move || udp_loop(&udp, &s1)),
            std::thread::spawn(move || tcp_accept_loop(&tcp, &s2)),
        ];
        DnsServer { port, shared, threads }
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Queries received so far (parsed DNS queries, UDP and TCP, answered or not).
    pub fn queries(&self) -> usize {
        self.shared.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same free loopback port.
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

fn udp_loop(socket: &UdpSocket, shared: &Shared) {
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else { continue };
        let Some(response) = answer(&shared.zone, &buf[..len], &shared.queries) else { continue };
        let limit = response.edns.as_ref().map_or(512, |e| usize::from(e.max_payload()));
        let Ok(mut bytes) = response.to_vec() else { continue };
        if bytes.len() > limit {
            // Too big for UDP: header and question only, TC set; the client retries over TCP.
            let Ok(truncated) = response.truncate().to_vec() else { continue };
            bytes = truncated;
        }
        let _ = socket.send_to(&bytes, peer);
    }
}

fn tcp_accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                connections.push(std::thread::spawn(move || tcp_connection(stream, &shared)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
        connections.retain(|c| !c.is_finished());
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// One TCP connection: 2-byte length framing, several queries per connection.
fn tcp_connection(mut stream: TcpStream, shared: &Shared) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue;
            }
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let packet: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            let Some(response) = answer(&shared.zone, &packet, &shared.queries) else { continue };
            let Ok(bytes) = response.to_vec() else { return };
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            if stream.write_all(&framed).is_err() {
                return;
            }
        }
    }
}

/// Sends one raw query (UDP or TCP) and returns the decoded response, or `None` on timeout.
pub fn query(addr: &str, qname: &str, rtype: RecordType, tcp: bool, timeout: Duration) -> Option<Message> {
    let mut request = Message::query();
    request.metadata.recursion_desired = true;
    request.add_query(Query::query(name(qname), rtype));
    let bytes = request.to_vec().expect("encode query");
    let response = if tcp {
        let mut stream = TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(timeout)).ok()?;
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).ok()?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut body).ok()?;
        body
    } else {
        let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
        socket.set_read_timeout(Some(timeout)).ok()?;
        socket.send_to(&bytes, addr).ok()?;
        let mut buf = vec![0u8; 65535];
        loop {
            let (len, _) = socket.recv_from(&mut buf).ok()?;
            if len >= 2 && buf[..2] == request.metadata.id.to_be_bytes() {
                break buf[..len].to_vec();
            }
        }
    };
    let message = Message::from_vec(&response).ok()?;
    assert_eq!(message.metadata.id, request.metadata.id, "response id");
    Some(message)
}

/// A `MessageAuthenticator` whose only nameserver is `dns` (UDP, then TCP on truncation), with a
/// 1 s timeout and a single attempt, so `silent` names fail fast.
pub fn authenticator(dns: &DnsServer) -> mail_auth::MessageAuthenticator {
    use mail_auth::hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.port;
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.port;
    let server = NameServerConfig::new(IpAddr::V4(Ipv4Addr::LOCALHOST), true, vec![udp, tcp]);
    let config = ResolverConfig::from_name_servers(vec![server]);
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(1);
    opts.attempts = 1;
    mail_auth::MessageAuthenticator::new(config, opts).expect("resolver")
}
