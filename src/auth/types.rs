//! Owned results of the checks: plain data that the pure policy (`gate::auth`) decides on and
//! that crosses await points and tasks. mail-auth's own outputs borrow the message, so the
//! Authentication-Results pieces of DKIM, DMARC and ARC are rendered when they are computed.

use std::net::IpAddr;

use mail_auth::{DkimResult, DmarcResult, SpfOutput, SpfResult};

/// RFC 8601 result words, shared by every method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
    /// DKIM only: the signature verified but is weak (RFC 8301), so it does not count.
    Policy,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::SoftFail => "softfail",
            AuthResult::Neutral => "neutral",
            AuthResult::None => "none",
            AuthResult::TempError => "temperror",
            AuthResult::PermError => "permerror",
            AuthResult::Policy => "policy",
        }
    }
}

impl std::fmt::Display for AuthResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<SpfResult> for AuthResult {
    fn from(r: SpfResult) -> Self {
        match r {
            SpfResult::Pass => AuthResult::Pass,
            SpfResult::Fail => AuthResult::Fail,
            SpfResult::SoftFail => AuthResult::SoftFail,
            SpfResult::Neutral => AuthResult::Neutral,
            SpfResult::TempError => AuthResult::TempError,
            SpfResult::PermError => AuthResult::PermError,
            SpfResult::None => AuthResult::None,
        }
    }
}

impl From<&DkimResult> for AuthResult {
    fn from(r: &DkimResult) -> Self {
        match r {
            DkimResult::Pass => AuthResult::Pass,
            DkimResult::Neutral(_) => AuthResult::Neutral,
            DkimResult::Fail(_) => AuthResult::Fail,
            DkimResult::PermError(_) => AuthResult::PermError,
            DkimResult::TempError(_) => AuthResult::TempError,
            DkimResult::None => AuthResult::None,
        }
    }
}

impl From<&DmarcResult> for AuthResult {
    fn from(r: &DmarcResult) -> Self {
        match r {
            DmarcResult::Pass => AuthResult::Pass,
            DmarcResult::Fail(_) => AuthResult::Fail,
            DmarcResult::TempError(_) => AuthResult::TempError,
            DmarcResult::PermError(_) => AuthResult::PermError,
            DmarcResult::None => AuthResult::None,
        }
    }
}

fn spf_result(r: AuthResult) -> SpfResult {
    match r {
        AuthResult::Pass => SpfResult::Pass,
        AuthResult::Fail => SpfResult::Fail,
        AuthResult::SoftFail => SpfResult::SoftFail,
        AuthResult::Neutral => SpfResult::Neutral,
        AuthResult::TempError => SpfResult::TempError,
        AuthResult::PermError | AuthResult::Policy => SpfResult::PermError,
        AuthResult::None => SpfResult::None,
    }
}

/// Which identity SPF checked: MAIL FROM, or HELO for the null sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    MailFrom,
    Helo,
}

/// The SPF result of a transaction (RCPT time), with the envelope it was computed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfCheck {
    pub result: AuthResult,
    pub identity: Identity,
    /// The domain checked (MAIL FROM's domain, or the HELO name).
    pub domain: String,
    /// False when SPF was not evaluated ([`SpfCheck::not_checked`]): no `spf=` in the header.
    pub checked: bool,
    pub ip: IpAddr,
    pub helo: String,
    /// The reverse path without `<>`; empty for the null sender.
    pub mail_from: String,
    /// The domain's `exp=` text, if it published one and the check failed.
    pub explanation: Option<String>,
}

impl SpfCheck {
    /// A result for this envelope (also what tests and the policy service build).
    pub fn new(result: AuthResult, ip: IpAddr, helo: &str, mail_from: &str) -> SpfCheck {
        let mail_from = reverse_path(mail_from);
        let helo = helo.trim().to_string();
        let (identity, domain) = match mail_from.rsplit_once('@') {
            _ if mail_from.is_empty() => (Identity::Helo, helo.clone()),
            Some((_, d)) => (Identity::MailFrom, d.to_string()),
            None => (Identity::MailFrom, helo.clone()),
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        SpfCheck { result, identity, domain, checked: true, ip, helo, mail_from, explanation: None }
    }

    /// SPF was not evaluated (spf = off and dmarc = off): result `none`, left out of the header.
    pub fn not_checked(ip: IpAddr, helo: &str, mail_from: &str) -> SpfCheck {
        SpfCheck { checked: false, ..SpfCheck::new(AuthResult::None, ip, helo, mail_from) }
    }

    /// mail-auth's form, for DMARC and the Authentication-Results builder.
    pub fn output(&self) -> SpfOutput {
        SpfOutput::new(self.domain.clone()).with_result(spf_result(self.result))
    }
}

/// `<a@b>` -> `a@b`; `<>` -> ``.
pub(crate) fn reverse_path(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix('<').and_then(|s| s.strip_suffix('>')).unwrap_or(s);
    s.trim().to_string()
}

/// One DKIM-Signature and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSig {
    /// What verification said (a weak signature that verified is `Pass` with `weak`).
    pub result: AuthResult,
    /// `d=`, lower case; empty for a signature too malformed to parse.
    pub domain: String,
    pub selector: String,
    /// `rsa-sha256`, `rsa-sha1`, `ed25519-sha256`, or empty.
    pub algorithm: &'static str,
    /// rsa-sha1, or an RSA key under 1024 bits (RFC 8301): never counts as a pass.
    pub weak: bool,
    /// mail-auth's reason for a result other than pass.
    pub detail: String,
}

impl DkimSig {
    /// Passed and is not weak.
    pub fn passes(&self) -> bool {
        self.result == AuthResult::Pass && !self.weak
    }
}

/// The DMARC policy in force for the From domain (after `sp=`/`np=` and `t=y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    None,
    Quarantine,
    Reject,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcCheck {
    pub result: AuthResult,
    pub policy: Policy,
    /// The RFC 5322.From domain (empty when there is none or several).
    pub from_domain: String,
    /// A DMARC record applied (at the From domain or, walking up, its organisational domain).
    pub record: bool,
    /// The record says `t=y` (RFC 9989 test mode): `policy` is already one level lower.
    pub testing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcCheck {
    pub result: AuthResult,
    /// `d=` of every ARC-Seal, in instance order (i=1 first): the last is the last hop.
    pub sealers: Vec<String>,
    /// The last hop's ARC-Authentication-Results show the original passed: `dmarc=pass`, or
    /// `dkim=pass` / `spf=pass` for a domain aligned with the From domain.
    pub last_hop_vouches: bool,
}

impl ArcCheck {
    /// The sealer of the last hop (the one that delivered the message to us).
    pub fn last_sealer(&self) -> Option<&str> {
        self.sealers.last().map(String::as_str)
    }
}

/// Rendered Authentication-Results pieces (each starts with `;\r\n\t`), empty when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultPieces {
    pub dkim: String,
    pub dmarc: String,
    pub arc: String,
}

/// Everything checked at the end of DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageCheck {
    /// Every DKIM-Signature, in header order (malformed ones included).
    pub dkim: Vec<DkimSig>,
    pub dmarc: DmarcCheck,
    pub arc: ArcCheck,
    /// Addresses in the From header(s): anything but 1 is refused (unless dmarc = off).
    pub from_count: usize,
    pub pieces: ResultPieces,
}

impl MessageCheck {
    /// The one DKIM word for the job: `pass` if any signature passes (not weak), else
    /// `temperror`, `fail`, `policy` (weak only), `permerror`, `neutral`, in that order; `none`
    /// without signatures.
    pub fn dkim_result(&self) -> AuthResult {
        if self.dkim.iter().any(DkimSig::passes) {
            return AuthResult::Pass;
        }
        let has = |r: AuthResult| self.dkim.iter().any(|s| s.result == r);
        if has(AuthResult::TempError) {
            AuthResult::TempError
        } else if has(AuthResult::Fail) {
            AuthResult::Fail
        } else if has(AuthResult::Pass) {
            AuthResult::Policy
        } else if has(AuthResult::PermError) {
            AuthResult::PermError
        } else if self.dkim.is_empty() {
            AuthResult::None
        } else {
            AuthResult::Neutral
        }
    }
}
