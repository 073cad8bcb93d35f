//! The pure sender-authentication policy: every mode against every result.

use std::net::IpAddr;

use super::*;
use crate::auth::{ArcCheck, DkimSig, DmarcCheck, ResultPieces};
use AuthResult::{Fail, Neutral, Pass, PermError, SoftFail, TempError};

fn ip() -> IpAddr {
    "192.0.2.1".parse().unwrap()
}

fn spf(r: AuthResult) -> SpfCheck {
    SpfCheck::new(r, ip(), "mx.sender.example", "<alice@sender.example>")
}

fn sig(result: AuthResult, algorithm: &'static str, weak: bool) -> DkimSig {
    let (domain, selector, detail) = ("sender.example".into(), "sel".into(), String::new());
    DkimSig { result, domain, selector, algorithm, weak, detail }
}

fn msg(dkim: Vec<DkimSig>, dmarc: AuthResult, policy: Policy) -> MessageCheck {
    let from_domain = "sender.example".to_string();
    MessageCheck {
        dkim,
        dmarc: DmarcCheck { result: dmarc, policy, from_domain, record: dmarc != AuthResult::None, testing: false },
        arc: ArcCheck { result: AuthResult::None, sealers: Vec::new(), last_hop_vouches: false },
        from_count: 1,
        pieces: ResultPieces::default(),
    }
}

fn clean() -> MessageCheck {
    msg(vec![sig(Pass, "rsa-sha256", false)], Pass, Policy::Reject)
}

fn with_arc(mut m: MessageCheck, result: AuthResult, sealers: &[&str]) -> MessageCheck {
    m.arc = ArcCheck { result, sealers: sealers.iter().map(|s| s.to_string()).collect(), last_hop_vouches: true };
    m
}

fn pol(spf: SpfMode, dkim: DkimMode, dmarc: DmarcMode, sealers: &[&str]) -> AuthPolicy {
    let trusted_arc_sealers = sealers.iter().map(|s| s.to_string()).collect();
    AuthPolicy { spf, dkim, dmarc, trusted_arc_sealers }
}

fn spf_only(mode: SpfMode) -> AuthPolicy {
    pol(mode, DkimMode::Record, DmarcMode::Record, &[])
}

/// (reason, code, enhanced) of a refusal; None for Accept.
fn outcome(v: &Verdict) -> Option<(Reason, u16, &'static str)> {
    match v {
        Verdict::Reject { reason, reply } | Verdict::Tempfail { reason, reply } => {
            Some((*reason, reply.code, reply.enhanced))
        }
        Verdict::Discard { reason, .. } => Some((*reason, 250, "")),
        Verdict::Accept => None,
    }
}

const SPF_FAIL: Option<(Reason, u16, &str)> = Some((Reason::SpfFail, 550, "5.7.23"));
const SPF_TEMP: Option<(Reason, u16, &str)> = Some((Reason::AuthTemperror, 451, "4.7.24"));
const DMARC_FAIL: Option<(Reason, u16, &str)> = Some((Reason::DmarcFail, 550, "5.7.1"));
const DKIM_FAIL: Option<(Reason, u16, &str)> = Some((Reason::DkimFail, 550, "5.7.20"));

#[test]
fn spf_at_rcpt_every_mode_and_result() {
    let results = [Pass, Fail, SoftFail, Neutral, AuthResult::None, TempError, PermError];
    for mode in [SpfMode::Off, SpfMode::Record, SpfMode::RejectFail, SpfMode::RejectSoftfail] {
        for r in results {
            let expected = match (mode, r) {
                (SpfMode::Off | SpfMode::Record, _) => None,
                (_, Fail) | (SpfMode::RejectSoftfail, SoftFail) => SPF_FAIL,
                (_, TempError) => SPF_TEMP,
                _ => None,
            };
            let v = spf_verdict_at_rcpt(&spf_only(mode), &spf(r));
            assert_eq!(outcome(&v), expected, "{mode} {r}");
            // the end of DATA agrees when nothing else is wrong
            assert_eq!(outcome(&message_verdict(&spf_only(mode), &spf(r), &clean()).verdict), expected, "{mode} {r}");
        }
    }
    let v = spf_verdict_at_rcpt(&spf_only(SpfMode::RejectFail), &spf(Fail));
    let Verdict::Reject { reply, .. } = v else { panic!("{v:?}") };
    assert_eq!(reply.text, "SPF check failed: sender.example does not designate 192.0.2.1 as permitted sender");
}

#[test]
fn arc_rescue_waits_for_data() {
    let cfg = AuthConfig { trusted_arc_sealers: vec!["Lists.Example.org.".into()], ..AuthConfig::default() };
    let p = policy_for(&cfg, None, None);
    assert!(p.arc_rescue());
    assert_eq!(p.trusted_arc_sealers, ["lists.example.org"]);
    // no final refusal at RCPT: ARC may still rescue it
    assert_eq!(spf_verdict_at_rcpt(&p, &spf(Fail)), Verdict::Accept);
    assert_eq!(spf_verdict_at_rcpt(&p, &spf(TempError)), Verdict::Accept);
    let failed = msg(vec![sig(Fail, "rsa-sha256", false)], Fail, Policy::Reject);
    // trusted last sealer, chain passes: SPF and DMARC failures are waived, and that is recorded
    let trusted = with_arc(failed.clone(), Pass, &["origin.example", "LISTS.example.org"]);
    let d = message_verdict(&p, &spf(Fail), &trusted);
    assert_eq!((d.verdict, d.arc_override, d.quarantine), (Verdict::Accept, true, false));
    let d = message_verdict(&p, &spf(TempError), &trusted);
    assert_eq!((d.verdict, d.arc_override), (Verdict::Accept, true));
    // untrusted last hop (even if a trusted sealer is earlier in the chain), or a broken chain
    for m in [
        with_arc(failed.clone(), Pass, &["lists.example.org", "evil.example"]),
        with_arc(failed.clone(), Fail, &["lists.example.org"]),
        with_arc(failed.clone(), Neutral, &["lists.example.org"]),
        with_arc(failed.clone(), AuthResult::None, &[]),
    ] {
        let d = message_verdict(&p, &spf(Fail), &m);
        assert_eq!((outcome(&d.verdict), d.arc_override), (SPF_FAIL, false), "{:?}", m.arc);
        let d = message_verdict(&p, &spf(Pass), &m);
        assert_eq!(outcome(&d.verdict), DMARC_FAIL, "{:?}", m.arc);
    }
    // without trusted sealers an ARC pass changes nothing
    let none = pol(SpfMode::RejectFail, DkimMode::Record, DmarcMode::Enforce, &[]);
    assert_eq!(outcome(&message_verdict(&none, &spf(Fail), &trusted).verdict), SPF_FAIL);
    // ARC never rescues DKIM require-pass nor the From rule
    let strict = pol(SpfMode::RejectFail, DkimMode::RequirePass, DmarcMode::Enforce, &["lists.example.org"]);
    let d = message_verdict(&strict, &spf(Fail), &trusted);
    assert_eq!((outcome(&d.verdict), d.arc_override), (DKIM_FAIL, false));
    let mut no_from = with_arc(clean(), Pass, &["lists.example.org"]);
    no_from.from_count = 0;
    assert_eq!(outcome(&message_verdict(&p, &spf(Pass), &no_from).verdict), DMARC_FAIL);
    // nothing waived: no override recorded
    let d = message_verdict(&p, &spf(Pass), &with_arc(clean(), Pass, &["lists.example.org"]));
    assert_eq!((d.verdict, d.arc_override), (Verdict::Accept, false));
}

#[test]
fn dkim_modes_and_weak_signatures() {
    let require = pol(SpfMode::Off, DkimMode::RequirePass, DmarcMode::Off, &[]);
    let record = pol(SpfMode::Off, DkimMode::Record, DmarcMode::Off, &[]);
    let check = |p: &AuthPolicy, sigs: Vec<DkimSig>| {
        outcome(&message_verdict(p, &spf(Pass), &msg(sigs, AuthResult::None, Policy::None)).verdict)
    };
    let good = || sig(Pass, "ed25519-sha256", false);
    let weak = || sig(Pass, "rsa-sha1", true);
    assert_eq!(check(&require, vec![good()]), None);
    assert_eq!(check(&require, vec![sig(Fail, "rsa-sha256", false), good()]), None);
    for sigs in [
        vec![],
        vec![weak()],
        vec![sig(Neutral, "rsa-sha256", false)],
        vec![sig(Fail, "rsa-sha256", false), weak()],
        vec![sig(PermError, "rsa-sha256", false)],
    ] {
        assert_eq!(check(&require, sigs.clone()), DKIM_FAIL, "{sigs:?}");
        assert_eq!(check(&record, sigs), None);
    }
    let temp = vec![sig(TempError, "rsa-sha256", false), weak()];
    assert_eq!(check(&require, temp.clone()), Some((Reason::AuthTemperror, 451, "4.7.20")));
    assert_eq!(check(&record, temp), None);
    // the job's word: weak alone is `policy`, never `pass`
    let word = |sigs: Vec<DkimSig>| msg(sigs, AuthResult::None, Policy::None).dkim_result();
    assert_eq!(word(vec![weak()]), AuthResult::Policy);
    assert_eq!(word(vec![weak(), good()]), Pass);
    assert_eq!(word(vec![]), AuthResult::None);
    assert_eq!(word(vec![sig(Neutral, "", false)]), Neutral);
    assert_eq!(word(vec![sig(Neutral, "", false), sig(Fail, "rsa-sha256", false)]), Fail);
    assert_eq!(word(vec![sig(PermError, "", false), weak()]), AuthResult::Policy);
    assert_eq!(word(vec![sig(TempError, "", false), sig(Fail, "rsa-sha256", false)]), TempError);
}

#[test]
fn dmarc_every_mode_result_and_policy() {
    let dkim = || vec![sig(Pass, "rsa-sha256", false)];
    for mode in [DmarcMode::Off, DmarcMode::Record, DmarcMode::Enforce, DmarcMode::RequirePass] {
        for r in [Pass, Fail, AuthResult::None, TempError, PermError] {
            for policy in [Policy::None, Policy::Quarantine, Policy::Reject] {
                let p = pol(SpfMode::Record, DkimMode::Record, mode, &[]);
                let d = message_verdict(&p, &spf(Pass), &msg(dkim(), r, policy));
                let temp = Some((Reason::AuthTemperror, 451, "4.7.1"));
                let expected = match (mode, r) {
                    (DmarcMode::Off | DmarcMode::Record, _) | (_, Pass) => None,
                    (_, TempError) => temp,
                    (DmarcMode::Enforce, Fail) if policy == Policy::Reject => DMARC_FAIL,
                    (DmarcMode::Enforce, _) => None,
                    (DmarcMode::RequirePass, _) => DMARC_FAIL,
                };
                assert_eq!(outcome(&d.verdict), expected, "{mode} {r} {policy:?}");
                let marked = mode == DmarcMode::Enforce && r == Fail && policy == Policy::Quarantine;
                assert_eq!(d.quarantine, marked, "{mode} {r} {policy:?}");
                assert!(!d.arc_override);
            }
        }
    }
}

#[test]
fn from_count_rule() {
    for (mode, refused) in
        [(DmarcMode::Off, false), (DmarcMode::Record, true), (DmarcMode::Enforce, true), (DmarcMode::RequirePass, true)]
    {
        let p = pol(SpfMode::Record, DkimMode::Record, mode, &[]);
        for n in [0, 2, 3] {
            let mut m = clean();
            m.from_count = n;
            let v = message_verdict(&p, &spf(Pass), &m).verdict;
            assert_eq!(outcome(&v), if refused { DMARC_FAIL } else { None }, "{mode} {n}");
        }
    }
}

#[test]
fn a_rejection_wins_over_a_tempfail() {
    let p = pol(SpfMode::RejectFail, DkimMode::RequirePass, DmarcMode::Enforce, &[]);
    let temp_dkim = msg(vec![sig(TempError, "rsa-sha256", false)], TempError, Policy::None);
    assert_eq!(outcome(&message_verdict(&p, &spf(Fail), &temp_dkim).verdict), SPF_FAIL);
    assert_eq!(outcome(&message_verdict(&p, &spf(TempError), &clean()).verdict), SPF_TEMP);
    let dmarc_reject = msg(vec![sig(TempError, "rsa-sha256", false)], Fail, Policy::Reject);
    assert_eq!(outcome(&message_verdict(&p, &spf(TempError), &dmarc_reject).verdict), DMARC_FAIL);
}

#[test]
fn precedence_of_overrides() {
    let mut global = AuthConfig { trusted_arc_sealers: vec!["a.example".into()], ..AuthConfig::default() };
    global.routes.new_issue = Some(AuthOverride { dmarc: Some(DmarcMode::RequirePass), ..AuthOverride::default() });
    global.routes.reply = Some(AuthOverride { spf: Some(SpfMode::Record), ..AuthOverride::default() });
    let base = policy_for(&global, None, None);
    assert_eq!(base, pol(SpfMode::RejectFail, DkimMode::Record, DmarcMode::Enforce, &["a.example"]));
    assert_eq!(policy_for(&global, None, Some(Route::NewIssue)).dmarc, DmarcMode::RequirePass);
    assert_eq!(policy_for(&global, None, Some(Route::Reply)).spf, SpfMode::Record);
    assert_eq!(policy_for(&global, None, Some(Route::Key)), base);
    let mut mb = MailboxAuthConfig {
        dmarc: Some(DmarcMode::Record),
        dkim: Some(DkimMode::RequirePass),
        trusted_arc_sealers: Some(vec![]),
        ..MailboxAuthConfig::default()
    };
    let p = policy_for(&global, Some(&mb), Some(Route::ServiceDesk));
    // partial: unset fields keep [auth]'s values
    assert_eq!(p, pol(SpfMode::RejectFail, DkimMode::RequirePass, DmarcMode::Record, &[]));
    // a global route entry overrides the mailbox
    assert_eq!(policy_for(&global, Some(&mb), Some(Route::NewIssue)).dmarc, DmarcMode::RequirePass);
    // the mailbox's own route entry overrides everything
    mb.routes.new_issue = Some(AuthOverride { dmarc: Some(DmarcMode::Off), ..AuthOverride::default() });
    let p = policy_for(&global, Some(&mb), Some(Route::NewIssue));
    assert_eq!((p.dmarc, p.dkim, p.spf), (DmarcMode::Off, DkimMode::RequirePass, SpfMode::RejectFail));
    assert!(p.needs_spf());
    let off = AuthPolicy { spf: SpfMode::Off, ..p };
    assert!(!off.needs_spf() && !off.arc_rescue());
}

#[test]
fn header_and_job_object() {
    let mut m = with_arc(clean(), Pass, &["lists.example.org"]);
    m.pieces = ResultPieces {
        dkim: ";\r\n\tdkim=pass header.d=sender.example header.s=sel header.b=AAAA".into(),
        dmarc: ";\r\n\tdmarc=pass header.from=sender.example policy.dmarc=reject".into(),
        arc: ";\r\n\tarc=pass smtp.remote-ip=192.0.2.1".into(),
    };
    let h = results_header("mx.example.com", &spf(Pass), &m, ip());
    assert_eq!(
        h,
        "Authentication-Results: mx.example.com;\r\n\tspf=pass (mx.example.com: domain of alice@sender.example \
         designates 192.0.2.1 as permitted sender) smtp.mailfrom=alice@sender.example;\r\n\tdkim=pass \
         header.d=sender.example header.s=sel header.b=AAAA;\r\n\tdmarc=pass header.from=sender.example \
         policy.dmarc=reject;\r\n\tarc=pass smtp.remote-ip=192.0.2.1\r\n"
    );
    let j = job_results("mx.example.com", &spf(Pass), &m, true);
    let words = [&j.spf, &j.dkim, &j.dmarc, &j.dmarc_policy, &j.arc].map(String::as_str);
    assert_eq!(words, ["pass", "pass", "pass", "reject", "pass"]);
    assert!(j.header.starts_with("mx.example.com; spf=pass (mx.example.com: domain of"), "{}", j.header);
    assert!(j.header.ends_with(
        "arc=pass smtp.remote-ip=192.0.2.1 (trusted ARC sealer lists.example.org stood in for failed SPF/DMARC)"
    ));
    assert!(!j.header.contains('\r') && !j.header.contains('\n'));
    // null sender: the HELO identity; SPF not checked: no spf= at all; nothing at all: none
    let helo = SpfCheck::new(SoftFail, ip(), "mx.sender.example", "<>");
    let h = results_header("mx.example.com", &helo, &m, ip());
    assert!(h.contains("spf=softfail (mx.example.com: domain of postmaster@mx.sender.example reports soft fail for 192.0.2.1) smtp.helo=mx.sender.example;"), "{h}");
    let skipped = SpfCheck::not_checked(ip(), "h", "a@b");
    assert_eq!(job_results("mx", &skipped, &msg(vec![], AuthResult::None, Policy::None), false).header, "mx; none");
    assert!(results_header("mx", &skipped, &m, ip()).starts_with("Authentication-Results: mx;\r\n\tdkim=pass"));
    let j = job_results("mx", &spf(TempError), &msg(vec![], TempError, Policy::None), false);
    let words = [&j.spf, &j.dkim, &j.dmarc, &j.dmarc_policy, &j.arc].map(String::as_str);
    assert_eq!(words, ["temperror", "none", "temperror", "none", "none"]);
    let j = job_results("mx", &spf(Fail), &msg(vec![], Fail, Policy::Quarantine), false);
    assert_eq!((j.dmarc.as_str(), j.dmarc_policy.as_str()), ("fail", "quarantine"));
}

#[test]
fn strip_only_our_authserv_id() {
    let raw = "Received: from a\r\n\tby b\r\n\
               Authentication-Results: mx.example.com; spf=pass\r\n\tsmtp.mailfrom=x@y\r\n\
               Authentication-Results: other.example; dkim=pass\r\n \theader.d=y\r\n\
               authentication-results :  (forged (nested) comment)\r\n MX.Example.COM. 1; dmarc=pass\r\n\
               Authentication-Results: \"mx.example.com\"; arc=pass\r\n\
               Authentication-Results: mx.example.com.evil; spf=pass\r\n\
               Authentication-Results: mx.example.comx;spf=pass\r\n\
               X-Note: Authentication-Results: mx.example.com; spf=pass\r\n\
               Subject: hi\r\n\
               \r\n\
               Authentication-Results: mx.example.com; in the body\r\n";
    let out = strip_forged_results(raw.as_bytes(), "mx.example.com").unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "Received: from a\r\n\tby b\r\n\
         Authentication-Results: other.example; dkim=pass\r\n \theader.d=y\r\n\
         Authentication-Results: mx.example.com.evil; spf=pass\r\n\
         Authentication-Results: mx.example.comx;spf=pass\r\n\
         X-Note: Authentication-Results: mx.example.com; spf=pass\r\n\
         Subject: hi\r\n\
         \r\n\
         Authentication-Results: mx.example.com; in the body\r\n"
    );
    assert_eq!(strip_forged_results(raw.as_bytes(), "nobody.example"), None);
    assert_eq!(strip_forged_results(b"", "mx"), None);
    // the last header, without a body or a final CRLF
    let out = strip_forged_results(b"Subject: s\r\nAuthentication-Results: mx; none", "mx").unwrap();
    assert_eq!(out, b"Subject: s\r\n");
    let out = strip_forged_results(b"Authentication-Results: mx; none\r\n\r\nbody", "MX").unwrap();
    assert_eq!(out, b"\r\nbody");
    // an unterminated comment or a header without a value is not ours
    assert_eq!(strip_forged_results(b"Authentication-Results: (mx; none\r\n\r\n", "mx"), None);
    assert_eq!(strip_forged_results(b"Authentication-Results:\r\n\r\n", "mx"), None);
}

#[test]
fn a_trusted_sealer_that_does_not_vouch_rescues_nothing() {
    let p = pol(SpfMode::RejectFail, DkimMode::Record, DmarcMode::Enforce, &["lists.example.org"]);
    let mut m = with_arc(msg(vec![], Fail, Policy::Reject), Pass, &["lists.example.org"]);
    m.arc.last_hop_vouches = false;
    let d = message_verdict(&p, &spf(Fail), &m);
    assert!(matches!(d.verdict, Verdict::Reject { .. }), "{:?}", d.verdict);
    assert!(!d.arc_override);
}
