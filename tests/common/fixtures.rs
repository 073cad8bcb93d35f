//! Test key material (tests/fixtures/keys: test-only keys, never used anywhere else) and DKIM / ARC
//! signing helpers built on mail-auth's `DkimSigner` and `ArcSealer`.
//!
//! mail-auth's own RSA signer (aws-lc-rs) only loads 2048..8192-bit keys and only signs rsa-sha256,
//! so the RSA-1024 and RSA-512 keys and the rsa-sha1 signatures use `PlainRsa` below: a textbook
//! RSASSA-PKCS1-v1_5 signer plugged into mail-auth through its public `SigningKey` trait.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{Algorithm, Ed25519Key, HashContext, HashImpl, RsaKey, Sha1, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::{AuthenticatedMessage, AuthenticationResults, MessageAuthenticator};
use std::marker::PhantomData;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa2048,
    Rsa1024,
    Rsa512,
    Ed25519,
}

/// Headers covered by the DKIM signatures made here (absent ones are skipped by mail-auth).
pub const SIGNED_HEADERS: [&str; 11] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
];

/// Headers covered by the ARC-Message-Signature of `arc_seal`.
pub const ARC_HEADERS: [&str; 7] = ["From", "To", "Subject", "Date", "Message-ID", "DKIM-Signature", "Content-Type"];

fn private_pem(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::Rsa2048 => include_str!("../fixtures/keys/rsa2048.pem"),
        KeyKind::Rsa1024 => include_str!("../fixtures/keys/rsa1024.pem"),
        KeyKind::Rsa512 => include_str!("../fixtures/keys/rsa512.pem"),
        KeyKind::Ed25519 => include_str!("../fixtures/keys/ed25519.pem"),
    }
}

fn public_pem(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::Rsa2048 => include_str!("../fixtures/keys/rsa2048.pub.pem"),
        KeyKind::Rsa1024 => include_str!("../fixtures/keys/rsa1024.pub.pem"),
        KeyKind::Rsa512 => include_str!("../fixtures/keys/rsa512.pub.pem"),
        KeyKind::Ed25519 => include_str!("../fixtures/keys/ed25519.pub.pem"),
    }
}

/// The base64 body of a PEM block (the DER, still encoded).
fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect()
}

fn pem_der(pem: &str) -> Vec<u8> {
    B64.decode(pem_body(pem)).expect("PEM base64")
}

/// The DKIM key record (TXT at `<selector>._domainkey.<domain>`) for the public key of `kind`.
pub fn dkim_txt(kind: KeyKind) -> String {
    match kind {
        // RFC 8463: p= is the raw 32-byte key, the tail of the SubjectPublicKeyInfo.
        KeyKind::Ed25519 => {
            let spki = pem_der(public_pem(kind));
            format!("v=DKIM1; k=ed25519; p={}", B64.encode(&spki[spki.len() - 32..]))
        }
        _ => format!("v=DKIM1; k=rsa; p={}", pem_body(public_pem(kind))),
    }
}

/// A signing key of any kind, usable by both `DkimSigner` and `ArcSealer` (rsa-sha256/ed25519-sha256).
pub enum TestKey {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
    Plain(PlainRsa<Sha256>),
}

pub fn key(kind: KeyKind) -> TestKey {
    match kind {
        #[allow(deprecated)] // from_key_der needs rustls-pki-types, not a dependency of ours
        KeyKind::Rsa2048 => TestKey::Rsa(RsaKey::<Sha256>::from_rsa_pem(private_pem(kind)).expect("rsa key")),
        KeyKind::Ed25519 => TestKey::Ed25519(
            Ed25519Key::from_pkcs8_maybe_unchecked_der(&pem_der(private_pem(kind))).expect("ed25519 key"),
        ),
        KeyKind::Rsa1024 | KeyKind::Rsa512 => TestKey::Plain(PlainRsa::new(private_pem(kind))),
    }
}

impl SigningKey for TestKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match self {
            TestKey::Rsa(k) => k.sign(input),
            TestKey::Ed25519(k) => k.sign(input),
            TestKey::Plain(k) => k.sign(input),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            TestKey::Rsa(k) => k.algorithm(),
            TestKey::Ed25519(k) => k.algorithm(),
            TestKey::Plain(k) => k.algorithm(),
        }
    }
}

fn prepend(header: String, message: &[u8]) -> Vec<u8> {
    let mut out = header.into_bytes();
    out.extend_from_slice(message);
    out
}

fn dkim_sign<K: SigningKey>(key: K, domain: &str, selector: &str, message: &[u8], expire: Option<u64>) -> Vec<u8> {
    let signer = DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(SIGNED_HEADERS)
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    let signer = match expire {
        Some(secs) => signer.expiration(secs),
        None => signer,
    };
    let signature = signer.sign(message).expect("DKIM sign");
    prepend(signature.to_header(), message)
}

/// `message` with a DKIM-Signature (relaxed/relaxed; rsa-sha256 or ed25519-sha256) prepended.
/// `expire_secs` sets x= to now + secs (Some(1) and a 2 s sleep gives an expired signature).
pub fn sign(kind: KeyKind, domain: &str, selector: &str, message: &[u8], expire_secs: Option<u64>) -> Vec<u8> {
    dkim_sign(key(kind), domain, selector, message, expire_secs)
}

/// `message` signed rsa-sha1 with the RSA-2048 key (mail-auth cannot sign rsa-sha1 itself; RFC 8301
/// forbids rsa-sha1, yet mail-auth 0.13 still verifies it as Pass: the gate has to refuse it).
pub fn sign_rsa_sha1(domain: &str, selector: &str, message: &[u8]) -> Vec<u8> {
    dkim_sign(PlainRsa::<Sha1>::new(private_pem(KeyKind::Rsa2048)), domain, selector, message, None)
}

/// Forwarder side of ARC: authenticates `received` (DKIM and any ARC chain already on it) like a
/// mailing list would on receipt, then seals `forwarded` (the message as it leaves the forwarder,
/// e.g. `received` with a changed Subject) with `sealer_domain`/`selector`. Returns `forwarded`
/// with ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results prepended.
pub async fn arc_seal(
    auth: &MessageAuthenticator,
    kind: KeyKind,
    sealer_domain: &str,
    selector: &str,
    received: &[u8],
    forwarded: &[u8],
    remote_ip: IpAddr,
) -> Vec<u8> {
    let incoming = AuthenticatedMessage::parse(received).expect("parse received message");
    let dkim = auth.verify_dkim(&incoming).await;
    let arc = auth.verify_arc(&incoming).await;
    let header_from = incoming.from.first().cloned().unwrap_or_default();
    let results = AuthenticationResults::new(sealer_domain)
        .with_dkim_results(&dkim, &header_from)
        .with_arc_result(&arc, remote_ip);
    let outgoing = AuthenticatedMessage::parse(forwarded).expect("parse forwarded message");
    let set = ArcSealer::from_key(key(kind))
        .domain(sealer_domain)
        .selector(selector)
        .headers(ARC_HEADERS)
        .seal(&outgoing, &results, &arc)
        .expect("ARC seal (a chain with cv=fail cannot be sealed)");
    prepend(set.to_header(), forwarded)
}

/// RSASSA-PKCS1-v1_5 with any modulus size, for keys and hashes mail-auth's backend refuses to sign
/// with. Slow, not constant-time: test use only.
pub struct PlainRsa<H> {
    n: Vec<u64>,
    d: Vec<u8>,
    size: usize,
    hash: PhantomData<H>,
}

impl<H> PlainRsa<H> {
    /// From a PKCS#1 ("BEGIN RSA PRIVATE KEY") PEM.
    pub fn new(pem: &str) -> Self {
        let der = pem_der(pem);
        let (tag, mut seq, _) = der_item(&der);
        assert_eq!(tag, 0x30, "PKCS#1 RSAPrivateKey expected");
        let mut ints = Vec::new();
        for _ in 0..4 {
            let (tag, value, rest) = der_item(seq);
            assert_eq!(tag, 0x02, "INTEGER expected");
            ints.push(strip_zeros(value));
            seq = rest;
        }
        let (n, d) = (ints[1], ints[3]);
        PlainRsa { n: to_limbs(n, n.len().div_ceil(8)), d: d.to_vec(), size: n.len(), hash: PhantomData }
    }

    fn rsa_sign(&self, digest_info: &[u8], data: impl Writable, mut hasher: impl HashContext) -> Vec<u8> {
        let mut bytes = Vec::new();
        data.write(&mut bytes);
        hasher.write(&bytes);
        let digest = hasher.complete();
        // EM = 00 01 FF..FF 00 DigestInfo || H
        let t_len = digest_info.len() + digest.as_ref().len();
        let mut em = vec![0x00, 0x01];
        em.resize(self.size - t_len - 1, 0xff);
        em.push(0x00);
        em.extend_from_slice(digest_info);
        em.extend_from_slice(digest.as_ref());
        let s = modpow(&to_limbs(&em, self.n.len()), &self.d, &self.n);
        let mut out: Vec<u8> = s.iter().rev().flat_map(|l| l.to_be_bytes()).collect();
        out.drain(..out.len() - self.size);
        out
    }
}

const SHA256_INFO: [u8; 19] =
    [0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20];
const SHA1_INFO: [u8; 15] = [0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14];

impl SigningKey for PlainRsa<Sha256> {
    type Hasher = Sha256;
    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        Ok(self.rsa_sign(&SHA256_INFO, input, Sha256::hasher()))
    }
    fn algorithm(&self) -> Algorithm {
        Algorithm::RsaSha256
    }
}

impl SigningKey for PlainRsa<Sha1> {
    type Hasher = Sha1;
    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        Ok(self.rsa_sign(&SHA1_INFO, input, Sha1::hasher()))
    }
    fn algorithm(&self) -> Algorithm {
        Algorithm::RsaSha1
    }
}

/// One DER TLV: (tag, value, rest).
fn der_item(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let (tag, first) = (input[0], input[1]);
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        (input[2..2 + n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), 2 + n)
    };
    (tag, &input[header..header + len], &input[header + len..])
}

fn strip_zeros(mut bytes: &[u8]) -> &[u8] {
    while bytes.len() > 1 && bytes[0] == 0 {
        bytes = &bytes[1..];
    }
    bytes
}

/// Big-endian bytes to `count` little-endian 64-bit limbs.
fn to_limbs(be: &[u8], count: usize) -> Vec<u64> {
    let mut limbs = vec![0u64; count];
    for (i, byte) in be.iter().rev().enumerate() {
        limbs[i / 8] |= u64::from(*byte) << (8 * (i % 8));
    }
    limbs
}

/// a >= b, both `b.len()` limbs long plus an optional extra top limb in `a`.
fn geq(a: &[u64], b: &[u64]) -> bool {
    if a.len() > b.len() && a[b.len()..].iter().any(|&l| l != 0) {
        return true;
    }
    for i in (0..b.len()).rev() {
        if a[i] != b[i] {
            return a[i] > b[i];
        }
    }
    true
}

fn sub_in_place(a: &mut [u64], b: &[u64]) {
    let mut borrow = false;
    for (i, limb) in a.iter_mut().enumerate() {
        let (d, b1) = limb.overflowing_sub(b.get(i).copied().unwrap_or(0));
        let (d, b2) = d.overflowing_sub(u64::from(borrow));
        *limb = d;
        borrow = b1 || b2;
    }
}

/// Montgomery product a*b/R mod n (CIOS), R = 2^(64*len).
fn mont_mul(a: &[u64], b: &[u64], n: &[u64], n0: u64) -> Vec<u64> {
    let k = n.len();
    let mut t = vec![0u64; k + 2];
    for &bi in b {
        let mut carry = 0u128;
        for j in 0..k {
            let s = u128::from(t[j]) + u128::from(a[j]) * u128::from(bi) + carry;
            t[j] = s as u64;
            carry = s >> 64;
        }
        let s = u128::from(t[k]) + carry;
        t[k] = s as u64;
        t[k + 1] = (s >> 64) as u64;
        let m = t[0].wrapping_mul(n0);
        let mut carry = (u128::from(t[0]) + u128::from(m) * u128::from(n[0])) >> 64;
        for j in 1..k {
            let s = u128::from(t[j]) + u128::from(m) * u128::from(n[j]) + carry;
            t[j - 1] = s as u64;
            carry = s >> 64;
        }
        let s = u128::from(t[k]) + carry;
        t[k - 1] = s as u64;
        t[k] = t[k + 1] + (s >> 64) as u64;
        t[k + 1] = 0;
    }
    let mut r = t[..=k].to_vec();
    if geq(&r, n) {
        sub_in_place(&mut r, n);
    }
    r.truncate(k);
    r
}

/// base^exp mod n, n odd.
fn modpow(base: &[u64], exp_be: &[u8], n: &[u64]) -> Vec<u64> {
    let k = n.len();
    let mut inv = 1u64; // n[0]^-1 mod 2^64 by Newton's iteration
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(n[0].wrapping_mul(inv)));
    }
    let n0 = inv.wrapping_neg();
    let mut r2 = vec![0u64; k + 1]; // R^2 mod n by doubling 1, 2*64*k times
    r2[0] = 1;
    for _ in 0..128 * k {
        let mut carry = 0;
        for limb in r2.iter_mut() {
            let next = *limb >> 63;
            *limb = (*limb << 1) | carry;
            carry = next;
        }
        if geq(&r2, n) {
            sub_in_place(&mut r2, n);
        }
    }
    r2.truncate(k);
    let mut one = vec![0u64; k];
    one[0] = 1;
    let base_m = mont_mul(base, &r2, n, n0);
    let mut x = mont_mul(&one, &r2, n, n0);
    for byte in exp_be {
        for bit in (0..8).rev() {
            x = mont_mul(&x, &x, n, n0);
            if (byte >> bit) & 1 == 1 {
                x = mont_mul(&x, &base_m, n, n0);
            }
        }
    }
    mont_mul(&x, &one, n, n0)
}
