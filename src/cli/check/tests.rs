use super::*;

fn config(text: &str) -> Config {
    toml::from_str(text).unwrap()
}

fn messages(f: &Findings, level: Level) -> Vec<String> {
    f.0.iter().filter(|(l, _)| *l == level).map(|(_, m)| m.clone()).collect()
}

#[test]
fn defaults_have_no_errors() {
    let mut f = Findings::default();
    config_checks(&Config::default(), &mut f);
    assert_eq!(messages(&f, Level::Error), Vec::<String>::new());
    // localhost is not a main domain; sender authentication is reported as active.
    let warnings = messages(&f, Level::Warning);
    assert!(!warnings.iter().any(|w| w.contains("subdomain")), "{warnings:?}");
    let oks = messages(&f, Level::Ok);
    assert!(oks.iter().any(|m| m.contains("sender authentication: spf = reject-fail")), "{oks:?}");
}

#[test]
fn local_part_lengths() {
    // 16 + 16 fixed characters: 32 + 32 = 64 fits the legacy key, 32 + 44 does not.
    let c = config(
        r#"
[[mailbox]]
name = "a"
address = "incoming-abcdef+%{key}+abcdefghijklmno@incoming.example.com"
[[mailbox]]
name = "b"
address = "incoming-abcdefghijklmnopqrstuvwxyz+%{key}@incoming.example.com"
[[mailbox]]
name = "c"
address = "incoming+%{key}@incoming.example.com"
"#,
    );
    let mut f = Findings::default();
    config_checks(&c, &mut f);
    let errors = messages(&f, Level::Error);
    let warnings = messages(&f, Level::Warning);
    assert!(warnings.iter().any(|w| w.starts_with("mailbox a ") && w.contains("76 characters")), "{warnings:?}");
    assert!(errors.iter().any(|e| e.starts_with("mailbox b ") && e.contains("68 characters")), "{errors:?}");
    assert!(!errors.iter().chain(&warnings).any(|m| m.starts_with("mailbox c ")));
}

#[test]
fn main_domain_gets_the_seed_advice() {
    let c = config("[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{key}@example.com\"\n");
    let mut f = Findings::default();
    config_checks(&c, &mut f);
    let warnings = messages(&f, Level::Warning);
    assert!(
        warnings.iter().any(|w| w.contains("incoming.example.com") && w.contains("prove ownership")),
        "{warnings:?}"
    );
    assert!(dedicated_domain("localhost") && dedicated_domain("in.example.com"));
    assert!(!dedicated_domain("example.com") && !dedicated_domain("example.com."));
}

#[test]
fn problems_and_gate_errors_are_errors() {
    let c = config(
        r#"
[[mailbox]]
name = "x"
address = "no-domain"
[[mailbox]]
name = "x"
address = "x+%{key}@in.example.com"
"#,
    );
    let mut f = Findings::default();
    config_checks(&c, &mut f);
    let errors = messages(&f, Level::Error);
    assert!(errors.iter().any(|e| e.contains("used twice")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("no @domain")), "{errors:?}");
}

#[test]
fn mailroom_entries_must_match_gitlabs_two_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
    let warnings = |entries: &str| {
        let c = config(&format!(
            "[auth]\nspf = \"off\"\ndmarc = \"off\"\n\
             [[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@example.com\"\n\
             [[mailbox]]\nname = \"service_desk\"\naddress = \"contact+%{{key}}@example.com\"\n{}",
            entries.replace("SECRET", &secret.display().to_string())
        ));
        let mut f = Findings::default();
        config_checks(&c, &mut f);
        assert!(messages(&f, Level::Error).is_empty(), "{:?}", messages(&f, Level::Error));
        messages(&f, Level::Warning)
    };
    let entry = |name: &str, mailboxes: &str, path: &str| {
        format!(
            "[[deliver]]\nname = \"{name}\"\nkind = \"mailroom\"\n{mailboxes}\n\
             url = \"https://gitlab.example.com/api/v4/internal/mail_room/{path}\"\nsecret_file = \"SECRET\"\n"
        )
    };
    let w = warnings(&entry("all", "", "incoming_email"));
    assert!(w.iter().any(|w| w.contains("all: every mailbox goes to GitLab's incoming_email")), "{w:?}");
    let w = warnings(
        &[
            entry("crossed", "mailboxes = [\"service_desk\"]", "incoming_email"),
            entry("right", "mailboxes = [\"incoming\"]", "incoming_email"),
        ]
        .concat(),
    );
    assert!(w.iter().any(|w| w.contains("crossed: mailbox service_desk goes to GitLab's incoming_email")), "{w:?}");
    assert!(!w.iter().any(|w| w.contains("[[deliver]] right")), "{w:?}");
    let w = warnings(
        &[
            entry("desk", "mailboxes = [\"service_desk\"]", "service_desk_email"),
            entry("in", "mailboxes = [\"incoming\"]", "incoming_email"),
        ]
        .concat(),
    );
    assert!(!w.iter().any(|w| w.contains("GitLab's")), "the documented layout: {w:?}");
}

#[test]
fn delivery_problems_are_reported() {
    let c = config(
        r#"
[auth]
spf = "off"
dmarc = "off"
[[deliver]]
kind = "webhook"
url = "http://app.example/hook"
secret_file = "/nonexistent/mailgate-hook-key"
"#,
    );
    let mut f = Findings::default();
    config_checks(&c, &mut f);
    let warnings = messages(&f, Level::Warning);
    assert!(!warnings.iter().any(|w| w.contains("sender authentication")), "{warnings:?}");
    let errors = messages(&f, Level::Error);
    assert!(
        errors.iter().any(|e| e.contains("delivery cannot start") && e.contains("mailgate-hook-key")),
        "{errors:?}"
    );
}

#[test]
fn remote_http_without_token_is_a_warning_and_bad_token_file_an_error() {
    let c = config("[http]\nlisten = \"0.0.0.0:8025\"\n");
    let mut f = Findings::default();
    config_checks(&c, &mut f);
    assert!(messages(&f, Level::Warning).iter().any(|w| w.contains("401")));
    let c = config("[http]\ntoken_file = \"/nonexistent/mailgate-token\"\n");
    let mut f = Findings::default();
    config_checks(&c, &mut f);
    assert!(messages(&f, Level::Error).iter().any(|e| e.contains("mailgate-token")));
}

#[test]
fn binds_spool_and_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let c = config(&format!(
        r#"
[[listen]]
protocol = "smtp"
address = "127.0.0.1:{port}"
[[listen]]
protocol = "lmtp"
address = "unix:{sock}"
[[listen]]
protocol = "policy"
address = "unix:/nonexistent-dir/policy.sock"
[spool]
dir = "{spool}"
[http]
listen = "127.0.0.1:0"
"#,
        sock = dir.path().join("lmtp.sock").display(),
        spool = dir.path().join("spool/sub").display(),
    ));
    let mut f = Findings::default();
    spool_check(&c.spool.dir, &mut f);
    bind_checks(&c, false, &mut f);
    let errors = messages(&f, Level::Error);
    assert!(errors.iter().any(|e| e.contains("already in use")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("/nonexistent-dir")), "{errors:?}");
    assert_eq!(errors.len(), 2, "{errors:?}");
    let oks = messages(&f, Level::Ok);
    assert!(oks.iter().any(|m| m.contains("spool directory") && m.contains("can be created")), "{oks:?}");
    assert!(!dir.path().join("spool").exists(), "the check leaves no directories behind");
    assert!(oks.iter().any(|m| m.contains("lmtp.sock")), "{oks:?}");
    let mut f = Findings::default();
    bind_checks(&c, true, &mut f);
    assert_eq!(messages(&f, Level::Error).len(), 1, "in use by the running server is fine");
    drop(taken);
}
