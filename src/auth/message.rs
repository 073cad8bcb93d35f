//! End of DATA: DKIM, ARC and DMARC through mail-auth, turned into owned results and rendered
//! Authentication-Results pieces (mail-auth's outputs borrow the message).

use std::net::IpAddr;

use mail_auth::common::crypto::Algorithm;
use mail_auth::dkim::{DkimError, Signature};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::{
    ArcOutput, AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput, DmarcResult, DnsError,
    Error, ResolverCache, Txt,
};
use tokio::time::timeout;

use super::{ArcCheck, AuthResult, Authenticator, DkimSig, DmarcCheck, MessageCheck, Policy, ResultPieces, SpfCheck};

/// What a check that ran past its deadline reports (a DNS error: temperror).
fn deadline_error() -> Error {
    Error::Dns(DnsError::Resolver("deadline exceeded".into()))
}

pub(super) async fn check(a: &Authenticator, raw: &[u8], spf: &SpfCheck, ip: IpAddr) -> MessageCheck {
    let deadline = a.0.deadline;
    let Some(msg) = AuthenticatedMessage::parse(raw) else {
        return unparsable(ip);
    };
    let header_from = msg.from.first().map(String::as_str).unwrap_or_default();
    let header_domain = header_from.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();

    // DKIM and ARC are independent: run them at once, so the worst case at the end of DATA is
    // two deadlines (these and DMARC), not three, well inside Postfix's smtpd_proxy_timeout.
    // A message without ARC headers has no chain to verify.
    let has_arc = !msg.as_headers.is_empty() || !msg.ams_headers.is_empty() || !msg.aar_headers.is_empty();
    let (dkim_res, arc_res) = tokio::join!(timeout(deadline, a.0.auth.verify_dkim(a.params(&msg))), async {
        if has_arc { Some(timeout(deadline, a.0.auth.verify_arc(a.params(&msg))).await) } else { None }
    });
    let dkim_out = match dkim_res {
        Ok(out) => out,
        Err(_) => {
            msg.dkim_headers.iter().map(|h| DkimOutput::temp_err(deadline_error()).with_signature(&h.header)).collect()
        }
    };
    let sigs: Vec<DkimSig> = dkim_out.iter().map(|o| dkim_sig(a, o)).collect();
    // RFC 8301: a weak signature is not valid, for DMARC either
    let dmarc_dkim: Vec<DkimOutput> = dkim_out
        .iter()
        .zip(&sigs)
        .map(|(o, s)| match o.signature() {
            Some(sig) if s.weak => {
                DkimOutput::perm_err(Error::Dkim(DkimError::UnsupportedAlgorithm)).with_signature(sig)
            }
            _ => o.clone(),
        })
        .collect();

    let arc_out = match arc_res {
        None => ArcOutput::default(),
        Some(Ok(out)) => out,
        Some(Err(_)) => ArcOutput::default().with_result(DkimResult::TempError(deadline_error())),
    };

    let spf_out = spf.output();
    let params = DmarcParameters {
        message: &msg,
        dkim_output: &dmarc_dkim,
        dkim2_output: None,
        rfc5321_mail_from_domain: &spf.domain,
        spf_output: &spf_out,
    };
    // Priming does lookups the walk would otherwise do itself; when the DNS is slow it gives up
    // after one lookup's time, and the walk meets (and reports) the failure as before.
    let walk = async {
        if let Some(domain) = single_from_domain(&msg.from) {
            let _ = timeout(a.0.lookup_timeout, super::negative::prime(a, domain)).await;
        }
        a.0.auth.verify_dmarc(a.params(params)).await
    };
    let dmarc_out = timeout(deadline, walk).await.unwrap_or_else(|_| {
        DmarcOutput::new(header_domain.to_string())
            .with_spf_result(DmarcResult::TempError(deadline_error()))
            .with_dkim_result(DmarcResult::TempError(deadline_error()))
    });

    let mut dkim_piece = String::new();
    for (o, s) in dkim_out.iter().zip(&sigs) {
        let piece = AuthenticationResults::new("").with_dkim_result(o, header_from).to_string();
        if s.weak && s.result == AuthResult::Pass {
            dkim_piece.push_str(&piece.replacen("dkim=pass", "dkim=policy reason=\"weak signature (RFC 8301)\"", 1));
        } else {
            dkim_piece.push_str(&piece);
        }
    }
    if sigs.is_empty() {
        dkim_piece.push_str(";\r\n\tdkim=none");
    }
    let dmarc_piece = if dmarc_out.domain().is_empty() {
        ";\r\n\tdmarc=none".to_string()
    } else {
        AuthenticationResults::new("").with_dmarc_result(&dmarc_out).to_string()
    };
    let record = dmarc_out.dmarc_record();
    MessageCheck {
        dkim: sigs,
        dmarc: DmarcCheck {
            result: (&dmarc_out.result()).into(),
            policy: policy(dmarc_out.policy()),
            from_domain: dmarc_out.domain().to_string(),
            record: record.is_some(),
            testing: record.is_some_and(|r| r.t),
        },
        arc: ArcCheck {
            result: arc_out.result().into(),
            sealers: arc_out.sets().iter().map(|s| s.seal.header.d.to_ascii_lowercase()).collect(),
            last_hop_vouches: arc_out
                .sets()
                .iter()
                .max_by_key(|s| s.results.header.i)
                .is_some_and(|s| super::arc::vouches(&String::from_utf8_lossy(s.results.value), header_domain)),
        },
        from_count: msg.from.len(),
        pieces: ResultPieces {
            dkim: dkim_piece,
            dmarc: dmarc_piece,
            arc: AuthenticationResults::new("").with_arc_result(&arc_out, ip).to_string(),
        },
    }
}

/// A message without a header section: nothing to verify, no From.
fn unparsable(ip: IpAddr) -> MessageCheck {
    MessageCheck {
        dkim: Vec::new(),
        dmarc: DmarcCheck {
            result: AuthResult::None,
            policy: Policy::None,
            from_domain: String::new(),
            record: false,
            testing: false,
        },
        arc: ArcCheck { result: AuthResult::None, sealers: Vec::new(), last_hop_vouches: false },
        from_count: 0,
        pieces: ResultPieces {
            dkim: ";\r\n\tdkim=none".into(),
            dmarc: ";\r\n\tdmarc=none".into(),
            arc: AuthenticationResults::new("").with_arc_result(&ArcOutput::default(), ip).to_string(),
        },
    }
}

fn policy(p: mail_auth::dmarc::Policy) -> Policy {
    use mail_auth::dmarc::Policy as P;
    match p {
        P::Reject => Policy::Reject,
        P::Quarantine => Policy::Quarantine,
        P::None | P::Unspecified => Policy::None,
    }
}

fn dkim_sig(a: &Authenticator, o: &DkimOutput<'_>) -> DkimSig {
    let detail = match o.result() {
        DkimResult::Pass | DkimResult::None => String::new(),
        DkimResult::Neutral(e) | DkimResult::Fail(e) | DkimResult::PermError(e) | DkimResult::TempError(e) => {
            e.to_string()
        }
    };
    let result = o.result().into();
    let Some(sig) = o.signature() else {
        return DkimSig { result, domain: String::new(), selector: String::new(), algorithm: "", weak: false, detail };
    };
    let (algorithm, weak) = match sig.a {
        Algorithm::RsaSha1 => ("rsa-sha1", true),
        Algorithm::RsaSha256 => ("rsa-sha256", rsa_key_bits(a, sig).is_some_and(|bits| bits < 1024)),
        Algorithm::Ed25519Sha256 => ("ed25519-sha256", false),
    };
    DkimSig {
        result,
        domain: sig.d.to_ascii_lowercase(),
        selector: sig.s.to_ascii_lowercase(),
        algorithm,
        weak,
        detail,
    }
}

/// The key size of the signature's DNS key, if it is (still) in the cache. The verifier itself
/// already refuses RSA keys under 1024 bits; this keeps the rule if that ever changes.
fn rsa_key_bits(a: &Authenticator, sig: &Signature) -> Option<usize> {
    let mut name = format!("{}._domainkey.{}", sig.s, sig.d).to_lowercase();
    if !name.ends_with('.') {
        name.push('.');
    }
    match a.0.txt.get(name.as_str())? {
        Txt::DomainKey(key) => Some(key.p.public_key_bits()),
        _ => None,
    }
}

/// The domain of the From addresses when they all have the same one (with several, DMARC does
/// not apply and mail-auth walks nothing).
fn single_from_domain(from: &[String]) -> Option<&str> {
    let mut domains = from.iter().filter_map(|f| f.rsplit_once('@').map(|(_, d)| d));
    let first = domains.next()?;
    domains.all(|d| d.eq_ignore_ascii_case(first)).then_some(first)
}
