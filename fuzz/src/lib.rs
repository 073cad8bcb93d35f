//! The fuzz harnesses: one function per target, each taking the fuzzer's bytes, driving
//! mailgate's public API only, and panicking when an invariant breaks. The cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) call them; `tests/fuzz_regressions.rs` includes this file and runs
//! them on every input saved under `fuzz/regressions/<target>/`, so a crash stays a failing test
//! until it is fixed. Every target reads at most [`MAX_INPUT`] bytes.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use mail_parser::MessageParser;
use mailgate::auth::{ArcCheck, AuthResult, DkimSig, DmarcCheck, MessageCheck, Policy, ResultPieces, SpfCheck};
use mailgate::config::{
    AuthConfig, DkimMode, DmarcMode, MailboxAuthConfig, MailboxConfig, PolicyConfig, RefusalAction, RouteSet, SpfMode,
};
use mailgate::frontend::policy;
use mailgate::frontend::smtp::verify::Verify;
use mailgate::frontend::smtp::{Event, Peer, Session, SessionConfig, StoreRequest, TlsPolicy};
use mailgate::gate::address::{self, PLACEHOLDER, Template};
use mailgate::gate::message::{self, MessageContext, RcptOutcome, Recipient};
use mailgate::gate::verdict::Verdict;
use mailgate::gate::{Gate, Target, autoreply, headers, route};
use mailgate::job::{Envelope, Route, TlsInfo};
use mailgate::spool::{Spool, SpoolOptions, StoreOutcome};

/// Every target reads at most this much of its input.
pub const MAX_INPUT: usize = 64 * 1024;

/// The targets, by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: [&str; 5] = ["session", "address", "headers", "reply", "policy"];

/// The authserv-id and banner name of every harness.
const HOST: &str = "mx.test";

/// Runs the target named `target` on `data` (for the regression test).
pub fn run(target: &str, data: &[u8]) {
    match target {
        "session" => session(data),
        "address" => address(data),
        "headers" => headers(data),
        "reply" => reply(data),
        "policy" => policy(data),
        other => panic!("unknown fuzz target {other:?}"),
    }
}

fn cap(data: &[u8]) -> &[u8] {
    &data[..data.len().min(MAX_INPUT)]
}

/// A tiny deterministic generator for the choices the harnesses make (chunk sizes, check
/// results, store outcomes), seeded from the input so every run of an input is the same.
struct Rng(u64);

impl Rng {
    fn new(seed: u8) -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15 ^ ((u64::from(seed) << 17) | u64::from(seed)))
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bit(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// The size of the next read: often one byte, often everything, else something between.
    fn chunk(&mut self, left: usize) -> usize {
        match self.below(4) {
            0 => 1,
            1 => left,
            _ => 1 + self.below(left.min(600)),
        }
        .min(left)
    }

    fn result(&mut self) -> AuthResult {
        use AuthResult::*;
        [Pass, Fail, SoftFail, Neutral, None, TempError, PermError, Policy][self.below(8)]
    }
}

fn mailbox(name: &str, address: &str, routes: RouteSet, auth: Option<MailboxAuthConfig>) -> MailboxConfig {
    MailboxConfig { name: name.into(), address: address.into(), reply_host: None, routes, auth }
}

/// The gate every session, header and policy harness uses: a GitLab keyed mailbox, a service
/// desk with a stricter auth override, a dedicated address, an `any` mailbox with a reply host.
fn gate(policy: &PolicyConfig) -> Gate {
    let strict = MailboxAuthConfig {
        dkim: Some(DkimMode::RequirePass),
        dmarc: Some(DmarcMode::RequirePass),
        ..MailboxAuthConfig::default()
    };
    let mut any = mailbox("any", "any+%{key}@any.localhost", RouteSet::Any, None);
    any.reply_host = Some("gitlab.localhost".into());
    let mailboxes = [
        mailbox("incoming", "incoming+%{key}@localhost", RouteSet::Gitlab, None),
        mailbox("service_desk", "contact-%{key}@desk.localhost", RouteSet::Gitlab, Some(strict)),
        mailbox("bot", "bot@localhost", RouteSet::Gitlab, None),
        any,
    ];
    let auth = AuthConfig {
        spf: SpfMode::RejectFail,
        dkim: DkimMode::Record,
        dmarc: DmarcMode::Enforce,
        trusted_arc_sealers: vec!["arc.example".into()],
        ..AuthConfig::default()
    };
    Gate::new(&mailboxes, policy).expect("the harness gate is valid").with_auth(&auth)
}

static GATE_DISCARD: LazyLock<Arc<Gate>> = LazyLock::new(|| Arc::new(gate(&PolicyConfig::default())));
static GATE_REJECT: LazyLock<Arc<Gate>> = LazyLock::new(|| {
    Arc::new(gate(&PolicyConfig { auto_submitted: RefusalAction::Reject, null_sender: RefusalAction::Reject }))
});

/// Every reply is one or more lines `DDD text\r\n` or `DDD-text\r\n`, at most 512 octets
/// (RFC 5321 4.5.3.1.5), with no other CR or LF.
fn check_replies(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(out.ends_with(b"\r\n"), "reply does not end in CRLF: {:?}", String::from_utf8_lossy(out));
    for line in out.split_inclusive(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r\n").unwrap_or_else(|| panic!("bare LF in reply: {out:?}"));
        assert!(!line.contains(&b'\r'), "bare CR in reply line {line:?}");
        assert!(line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit), "no reply code: {line:?}");
        assert!(matches!(line.get(3), None | Some(b' ' | b'-')), "bad reply separator: {line:?}");
        let start = String::from_utf8_lossy(&line[..line.len().min(100)]);
        assert!(line.len() + 2 <= 512, "reply line over 512 octets: {} octets: {start:?}...", line.len() + 2);
    }
}

/// The stored message has CRLF line endings only, and every job carries a valid key and at least
/// one recipient.
fn check_store(req: &StoreRequest) {
    for (i, b) in req.raw.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && req.raw[i - 1] == b'\r', "bare LF at {i} in the stored message"),
            b'\r' => assert!(req.raw.get(i + 1) == Some(&b'\n'), "bare CR at {i} in the stored message"),
            _ => {}
        }
    }
    assert!(!req.jobs.is_empty(), "a store request without jobs");
    for j in &req.jobs {
        assert!(address::valid_key(&j.job.key), "job with an invalid key {:?}", j.job.key);
        assert!(!j.job.envelope.rcpt_to.is_empty(), "job without recipients");
    }
}

fn message_check(rng: &mut Rng) -> MessageCheck {
    let dkim = (0..rng.below(3))
        .map(|_| DkimSig {
            result: rng.result(),
            domain: if rng.bit() { "example.org".into() } else { String::new() },
            selector: "s".into(),
            algorithm: "rsa-sha256",
            weak: rng.bit(),
            detail: String::new(),
        })
        .collect();
    let policy = [Policy::None, Policy::Quarantine, Policy::Reject][rng.below(3)];
    MessageCheck {
        dkim,
        dmarc: DmarcCheck {
            result: rng.result(),
            policy,
            from_domain: "example.org".into(),
            record: rng.bit(),
            testing: rng.bit(),
        },
        arc: ArcCheck {
            result: rng.result(),
            sealers: if rng.bit() { vec!["arc.example".into()] } else { Vec::new() },
            last_hop_vouches: rng.bit(),
        },
        from_count: rng.below(3),
        pieces: ResultPieces::default(),
    }
}

/// The store's answer: an id per job, sometimes duplicates, sometimes a failure.
fn store_answer(rng: &mut Rng, req: &StoreRequest, count: &mut usize) -> Result<Vec<StoreOutcome>, String> {
    if rng.below(8) == 0 {
        return Err("disk full".into());
    }
    let outcomes = req
        .jobs
        .iter()
        .map(|_| {
            *count += 1;
            let id = format!("{:016x}", *count);
            if rng.below(4) == 0 { StoreOutcome::Duplicate { id } } else { StoreOutcome::Stored { id } }
        })
        .collect();
    Ok(outcomes)
}

/// Feeds `pending` to the session until it needs more input, answering every store and check
/// request at once, as the connection driver would.
/// Returns false when the connection ends (a failed TLS handshake).
fn drive(s: &mut Session, pending: &mut Vec<u8>, out: &mut Vec<u8>, rng: &mut Rng, stored: &mut usize) -> bool {
    for _ in 0..100_000 {
        let (consumed, event) = s.process(pending, out);
        assert!(consumed <= pending.len(), "consumed {consumed} of {} bytes", pending.len());
        pending.drain(..consumed);
        match event {
            Event::NeedInput | Event::Close => return true,
            Event::StartTls { discarded } => {
                // nothing pipelined after STARTTLS was answered: the 220 is the last reply
                assert!(pending.is_empty(), "{} bytes after STARTTLS left to run", pending.len());
                let last = out[..out.len().saturating_sub(2)].rsplit(|b| *b == b'\n').next().unwrap_or_default();
                assert!(last.starts_with(b"220 "), "STARTTLS answered {last:?}, {discarded} bytes discarded");
                check_replies(out);
                out.clear();
                if rng.below(8) == 0 {
                    return false;
                }
                s.tls_started(TlsInfo { version: "TLSv1.3".into(), cipher: "TLS13_AES_128_GCM_SHA256".into() });
            }
            Event::Store(req) => {
                check_store(&req);
                let answer = store_answer(rng, &req, stored);
                s.stored(answer, out);
            }
            Event::Verify(Verify::Spf { ip, helo, mail_from }) => {
                let check = SpfCheck::new(rng.result(), ip, &helo, &mail_from);
                s.spf_checked(check, out);
            }
            Event::Verify(Verify::Message { raw, .. }) => {
                let check = message_check(rng);
                if let Some(req) = s.message_checked(raw, check, out) {
                    check_store(&req);
                    let answer = store_answer(rng, &req, stored);
                    s.stored(answer, out);
                }
            }
        }
    }
    panic!("the session made no progress in 100,000 rounds");
}

/// `session`: byte 0 picks the listener (bits: LMTP, after-queue, trusted peer, checks on, SPF
/// on, reject policy, unix-socket peer, small limits), byte 1 its TLS (bit 0: STARTTLS offered,
/// bit 1: required, bit 2: implicit TLS), byte 2 seeds the read sizes and the answers of the fake
/// spool, checks and TLS handshakes; the rest is what the client sends.
pub fn session(data: &[u8]) {
    let [flags, tls, seed, stream @ ..] = cap(data) else {
        return;
    };
    let bit = |n: u8| flags & (1 << n) != 0;
    let (lmtp, small) = (bit(0), bit(7));
    let cfg = Arc::new(SessionConfig {
        hostname: HOST.into(),
        lmtp,
        after_queue: bit(1),
        listener: if lmtp { "lmtp" } else { "smtp" },
        max_message_size: if small { 2_000 } else { 100_000 },
        max_recipients: if small { 3 } else { 100 },
        max_errors: if small { 4 } else { 20 },
        max_line_length: 1000,
        verify: bit(3),
        verify_spf: bit(4),
    });
    let gate = if bit(5) { &GATE_REJECT } else { &GATE_DISCARD };
    let ip: Option<IpAddr> = if bit(6) { None } else { Some(IpAddr::from([192, 0, 2, 1])) };
    let mut s = Session::new(cfg, Arc::clone(gate), Peer { ip, trusted: bit(2) });
    s.set_tls_policy(TlsPolicy { starttls: tls & 1 != 0, require: tls & 2 != 0 });
    if tls & 4 != 0 {
        s.tls_started(TlsInfo { version: "TLSv1.2".into(), cipher: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into() });
    }
    let mut rng = Rng::new(*seed);
    let mut out = Vec::new();
    s.greeting(&mut out);
    check_replies(&out);
    out.clear();
    let (mut pending, mut rest, mut stored) = (Vec::new(), stream, 0);
    while !rest.is_empty() && !s.is_closed() {
        let n = rng.chunk(rest.len());
        pending.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let open = drive(&mut s, &mut pending, &mut out, &mut rng, &mut stored);
        check_replies(&out);
        out.clear();
        if !open {
            break;
        }
    }
    if !s.is_closed() {
        if rng.bit() {
            s.timeout(&mut out)
        } else {
            s.shutdown(&mut out)
        }
        check_replies(&out);
    }
    assert!(s.is_closed());
    for entry in s.take_rejects() {
        let line = entry.to_json_line();
        assert!(!line.contains(['\r', '\n']), "reject log line broken: {line:?}");
    }
}

/// `address`: byte 0 picks the routes (`gitlab`/`any`) of the mailbox; the rest is
/// `template\naddress\nreply_host\nsecond template` (missing parts are empty).
pub fn address(data: &[u8]) {
    let [flags, rest @ ..] = cap(data) else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(4, '\n');
    let (template, addr) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (reply_host, second) = (parts.next(), parts.next());
    let routes = if flags & 1 == 0 { RouteSet::Gitlab } else { RouteSet::Any };
    let mut mb = mailbox("m", template, routes, None);
    mb.reply_host = reply_host.map(str::to_string);

    let _ = address::bare(addr);
    if let Ok(t) = Template::parse(&mb) {
        // the template as shown parses back to the same addresses
        let again = Template::parse(&MailboxConfig { address: t.address(), ..mb.clone() });
        assert!(again.is_ok_and(|a| a.same_addresses(&t)), "{:?} does not parse back", t.address());
        let base = t.base_address();
        assert!(base.starts_with('@') || t.is_base(&base), "base address {base:?} is not its base");
        if let Some(key) = t.key_of(addr) {
            check_key(&t, &key, routes);
        }
        if let Some(key) = t.key_of_reference(addr) {
            assert!(address::valid_key(&key), "invalid reference key {key:?}");
        }
        // any valid key put into the template comes back out of it
        let key = address::bare(addr);
        if t.keyed && address::valid_key(key) && !key.contains('@') {
            let built = t.address().replacen(PLACEHOLDER, key, 1);
            assert_eq!(t.key_of(&built).as_deref(), Some(key), "key {key:?} lost in {built:?}");
        }
    }
    let mut mailboxes = vec![mb];
    if let Some(second) = second {
        mailboxes.push(mailbox("n", second, RouteSet::Gitlab, None));
    }
    if let Ok(gate) = Gate::new(&mailboxes, &PolicyConfig::default()) {
        check_rcpt(&gate, addr);
    }
    check_rcpt(&GATE_DISCARD, addr);
    let _ = GATE_REJECT.check_mail(addr);
}

fn check_key(t: &Template, key: &str, routes: RouteSet) {
    assert!(address::valid_key(key), "invalid key {key:?}");
    let _ = route::classify(key, routes, &t.mailbox);
    let _ = route::classify(key, routes, "service_desk");
}

fn check_rcpt(gate: &Gate, addr: &str) {
    match gate.check_rcpt(addr) {
        Ok(Target { key: Some(key), route, .. }) => {
            assert!(address::valid_key(&key), "invalid key {key:?}");
            assert!(route.is_some_and(|r| r != Route::Unknown), "accepted with route {route:?}");
        }
        Ok(Target { key: None, route, .. }) => assert!(route.is_none()),
        Err(v) => assert!(
            matches!(&v, Verdict::Reject { reply, .. } | Verdict::Tempfail { reply, .. } if reply.code >= 400),
            "refusal without a 4xx/5xx: {v:?}"
        ),
    }
}

/// `headers`: byte 0 picks the envelope (null sender, after-queue, reject policy); the rest is a
/// raw message (headers, maybe a body). Key search, auto-reply detection, message facts, the
/// forged Authentication-Results strip, and the whole end-of-DATA decision.
pub fn headers(data: &[u8]) {
    let [flags, raw @ ..] = cap(data) else {
        return;
    };
    let gate = if flags & 4 != 0 { &**GATE_REJECT } else { &**GATE_DISCARD };
    let parsed = MessageParser::default().parse_headers(raw);
    let empty = mail_parser::Message::default();
    let msg = parsed.as_ref().unwrap_or(&empty);
    for t in gate.mailboxes() {
        if let Some((key, _source)) = headers::find_key(t, msg) {
            assert!(address::valid_key(&key), "invalid header key {key:?}");
        }
        let base = Target { mailbox: t.mailbox.clone(), key: None, route: None };
        if let Ok((key, _, route)) = gate.resolve_from_headers(&base, msg) {
            assert!(address::valid_key(&key) && route != Route::Unknown, "resolved {key:?} as {route:?}");
        }
    }
    for h in headers::top(msg) {
        if h.name.as_str().eq_ignore_ascii_case("References") {
            let _ = headers::reference_ids(&h.value);
        }
    }
    let _ = autoreply::is_auto_submitted(msg);
    let _ = Gate::message_info(msg, raw);
    if let Some(full) = MessageParser::default().parse(raw) {
        let _ = gate.check_message("a@example.org", &full);
        let _ = Gate::message_info(&full, raw);
    }
    if let Some(clean) = mailgate::gate::auth::strip_forged_results(raw, HOST) {
        assert!(clean.len() < raw.len(), "strip made the message longer");
        assert!(
            mailgate::gate::auth::strip_forged_results(&clean, HOST).is_none(),
            "a forged Authentication-Results header survives stripping"
        );
    }

    let envelope = Envelope {
        mail_from: if flags & 1 != 0 { String::new() } else { "a@example.org".into() },
        client_ip: "192.0.2.1".into(),
        queue_id: if flags & 8 != 0 { "ABC123".into() } else { String::new() },
        ..Envelope::default()
    };
    let rcpt = |address: &str| Recipient { address: address.into(), target: gate.check_rcpt(address) };
    let rcpts = [
        rcpt("incoming@localhost"),
        rcpt("bot@localhost"),
        rcpt("contact@desk.localhost"),
        rcpt("any@any.localhost"),
        rcpt("incoming+0123456789abcdef0123456789abcdef@localhost"),
        rcpt("nobody@localhost"),
    ];
    let ctx = MessageContext { envelope: &envelope, raw, authserv_id: HOST, after_queue: flags & 2 != 0, auth: None };
    let d = message::decide(gate, &ctx, &rcpts);
    assert_eq!(d.per_rcpt.len(), rcpts.len(), "one outcome per recipient");
    for o in &d.per_rcpt {
        if let RcptOutcome::Job(i) = o {
            assert!(*i < d.jobs.len(), "outcome points at job {i} of {}", d.jobs.len());
        }
    }
    for j in &d.jobs {
        assert!(address::valid_key(&j.job.key), "job with an invalid key {:?}", j.job.key);
    }
}

/// `reply`: byte 0 picks a wrapper (none: the bytes are the whole message; else a text/plain,
/// quoted-printable, base64, HTML, multipart or Latin-1 message around the bytes).
pub fn reply(data: &[u8]) {
    let [choice, body @ ..] = cap(data) else {
        return;
    };
    let raw = wrap(*choice, body);
    absorb_library_panics();
    IN_REPLY_TEXT.set(true);
    let reply = mailgate::reply::reply_text(&raw);
    IN_REPLY_TEXT.set(false);
    if let Some(text) = reply {
        assert!(!text.is_empty(), "Some(\"\") from reply_text");
        assert!(text.len() <= 64 * 1024, "reply text of {} bytes", text.len());
    }
}

thread_local! {
    static IN_REPLY_TEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `reply_text` catches panics of the MIME and HTML libraries by design ("a panic in the MIME or
/// HTML libraries counts as no text", src/reply/mod.rs), but libFuzzer's panic hook aborts on
/// every panic, caught or not. This hook, put in front of the current one (libFuzzer's, or the
/// regression test's), lets through a panic raised inside mail-parser or html2text while
/// `reply_text` runs; every other panic (mailgate's own code included) still goes to the hook
/// before it. Library panics found so far are listed in fuzz/README.md.
fn absorb_library_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or_default();
            let library = ["/mail-parser-", "/html2text-"].iter().any(|lib| file.contains(lib));
            if !(library && IN_REPLY_TEXT.get()) {
                previous(info);
            }
        }));
    });
}

fn wrap(choice: u8, body: &[u8]) -> Vec<u8> {
    const HEAD: &str = "From: a@example.org\r\nTo: incoming@localhost\r\nSubject: Re: x\r\nMIME-Version: 1.0\r\n";
    let single = |ctype: &str, cte: &str, body: &[u8]| {
        let mut m = format!("{HEAD}Content-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n").into_bytes();
        m.extend_from_slice(body);
        m
    };
    match choice % 8 {
        0 => body.to_vec(),
        1 => single("text/plain; charset=utf-8", "8bit", body),
        2 => single("text/plain; charset=utf-8", "quoted-printable", body),
        3 => single("text/plain; charset=utf-8", "base64", base64(body).as_bytes()),
        4 => single("text/html; charset=utf-8", "8bit", body),
        5 | 6 => {
            let (inner, cte) = if choice % 8 == 5 { ("text/html", "8bit") } else { ("text/plain", "quoted-printable") };
            let mut m = format!(
                "{HEAD}Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n--b1\r\n\
                 Content-Type: {inner}; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
            )
            .into_bytes();
            m.extend_from_slice(body);
            m.extend_from_slice(b"\r\n--b1--\r\n");
            m
        }
        _ => single("text/plain; charset=iso-8859-1", "8bit", body),
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len() * 4 / 3 + 4);
    for (i, chunk) in data.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.push_str("\r\n");
        }
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime"));

/// A closed spool: the policy service logs refusals to it, and a closed one refuses the write at
/// once (the harness checks the protocol, not sled).
static SPOOL: LazyLock<Spool> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("mailgate-fuzz-policy-{}", std::process::id()));
    let spool = RUNTIME.block_on(async {
        let spool = Spool::open(&dir, SpoolOptions::default()).expect("a spool in the temporary directory");
        spool.close().await.expect("closing the spool");
        spool
    });
    let _ = std::fs::remove_dir_all(&dir);
    spool
});

/// An in-memory connection: reads come in generator-chosen sizes, writes are collected.
struct Conn<'a> {
    input: &'a [u8],
    rng: Rng,
    out: Vec<u8>,
}

impl tokio::io::AsyncRead for Conn<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let left = self.input.len();
        let n = self.rng.chunk(left).min(buf.remaining());
        let (now, later) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = later;
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Conn<'_> {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `policy`: byte 0 seeds the read sizes and SPF results; the rest is what Postfix sends to the
/// policy service (`name=value` lines, an empty line ends a request). The service runs on an
/// in-memory connection; each request is also decided directly, with an SPF result.
pub fn policy(data: &[u8]) {
    let [seed, input @ ..] = cap(data) else {
        return;
    };
    let gate = Arc::clone(&GATE_DISCARD);
    let conn = Conn { input, rng: Rng::new(*seed), out: Vec::new() };
    let mut conn = conn;
    RUNTIME.block_on(policy::run(&mut conn, gate, SPOOL.clone(), None, HOST.into(), Duration::from_secs(3600)));
    let out = String::from_utf8(conn.out).expect("policy replies are UTF-8");
    let replies = out.split_terminator("\n\n").collect::<Vec<_>>();
    assert!(out.is_empty() || out.ends_with("\n\n"), "unterminated policy reply {out:?}");
    // the service ignores trailing CRs: a line of CRs ends a request too
    let blank_lines = input.split(|b| *b == b'\n').filter(|l| l.iter().all(|b| *b == b'\r')).count();
    assert!(replies.len() <= blank_lines, "{} replies to {blank_lines} requests", replies.len());
    for r in &replies {
        let action = r.strip_prefix("action=").unwrap_or_else(|| panic!("policy reply {r:?}"));
        assert!(!action.is_empty() && !action.contains(['\r', '\n']), "policy action {action:?}");
    }

    // the same requests, decided directly with an SPF result
    let mut rng = Rng::new(seed.wrapping_add(1));
    let text = String::from_utf8_lossy(input);
    let mut attrs = HashMap::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if let Some((k, v)) = line.split_once('=') {
            attrs.insert(k.to_string(), v.to_string());
            continue;
        }
        if !line.is_empty() {
            return;
        }
        for gate in [&**GATE_DISCARD, &**GATE_REJECT] {
            let spf = policy::spf_needed(gate, &attrs)
                .map(|(ip, helo, sender)| SpfCheck::new(rng.result(), ip, &helo, &sender));
            let (action, entry) = policy::decide(gate, &attrs, spf.as_ref());
            assert!(!action.is_empty() && !action.contains(['\r', '\n']), "policy action {action:?}");
            if let Some(entry) = entry {
                assert!(!entry.to_json_line().contains(['\r', '\n']));
            }
        }
        attrs.clear();
    }
}
