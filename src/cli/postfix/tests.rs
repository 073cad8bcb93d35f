//! `mailgate postfix-config` output for the embedded defaults and example configs.

use super::*;

fn config(toml: &str) -> Config {
    Config::from_toml(toml, Path::new("test.toml")).unwrap()
}

/// The non-comment lines of a section (`# main.cf` or `# master.cf`).
fn section<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let start = text.lines().position(|l| l == format!("# {name}")).unwrap_or_else(|| panic!("no {name}"));
    text.lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with("# master.cf"))
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect()
}

#[test]
fn embedded_defaults_mode_a() {
    let out = generate(&Config::default(), Mode::Lmtp, None).unwrap();
    let t = &out.text;
    assert!(t.contains("transport_maps = inline:{ localhost=lmtp:inet:127.0.0.1:2424 }"), "{t}");
    assert!(
        t.contains(
            "smtpd_recipient_restrictions = reject_unauth_destination, check_policy_service inet:127.0.0.1:10040"
        ),
        "{t}"
    );
    assert!(t.contains("relay_domains = localhost\n"), "{t}");
    assert!(t.contains("relay_recipient_maps = inline:{ @localhost=OK }"), "{t}");
    assert!(t.contains("lmtp_send_xforward_command = yes"), "{t}");
    assert!(t.contains("smtpd_policy_service_timeout = 100s"), "{t}");
    assert!(t.contains("message_size_limit = 24576000"), "{t}");
    assert!(t.contains("embedded defaults"), "{t}");
    assert!(!t.contains("lmtp_destination_recipient_limit"), "{t}");
    // every setting is one `name = value` line, fit for postconf -e
    let main = section(t, "main.cf");
    assert!(main.len() >= 8, "{main:?}");
    assert!(main.iter().all(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))), "{main:?}");
    assert!(section(t, "master.cf").is_empty(), "{t}");
    assert!(out.warnings.iter().any(|w| w.contains("localhost")), "{:?}", out.warnings);
}

#[test]
fn mailbox_domains_are_deduplicated() {
    let c = config(
        r#"
        [[listen]]
        protocol = "lmtp"
        address = "0.0.0.0:24"
        [[listen]]
        protocol = "policy"
        address = "[::1]:10040"
        [[mailbox]]
        name = "incoming"
        address = "incoming+%{key}@Incoming.Example.com"
        [[mailbox]]
        name = "service_desk"
        address = "contact+%{key}@incoming.example.com"
        [[mailbox]]
        name = "other"
        address = "gl-%{key}@mail.example.org"
        [limits]
        max_recipients = 10
        [auth]
        timeout = "30s"
        "#,
    );
    let out = generate(&c, Mode::Lmtp, Some(Path::new("/etc/mailgate/mailgate.toml"))).unwrap();
    let t = &out.text;
    assert!(t.contains("relay_domains = incoming.example.com, mail.example.org\n"), "{t}");
    assert!(
        t.contains(
            "transport_maps = inline:{ incoming.example.com=lmtp:inet:127.0.0.1:24, \
             mail.example.org=lmtp:inet:127.0.0.1:24 }"
        ),
        "{t}"
    );
    assert!(t.contains("relay_recipient_maps = inline:{ @incoming.example.com=OK, @mail.example.org=OK }"), "{t}");
    assert!(t.contains("check_policy_service inet:[::1]:10040\n"), "{t}");
    assert!(t.contains("lmtp_destination_recipient_limit = 10"), "{t}");
    // 4 x 30s SPF deadline + margin is longer than Postfix's 100s default
    assert!(t.contains("smtpd_policy_service_timeout = 130s"), "{t}");
    assert!(t.contains("from /etc/mailgate/mailgate.toml"), "{t}");
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn unix_sockets() {
    let c = config(
        r#"
        [[listen]]
        protocol = "lmtp"
        address = "unix:/run/mailgate/lmtp.sock"
        [[listen]]
        protocol = "policy"
        address = "unix:/run/mailgate/policy.sock"
        [[mailbox]]
        name = "incoming"
        address = "incoming+%{key}@incoming.example.com"
        "#,
    );
    let t = generate(&c, Mode::Lmtp, None).unwrap().text;
    assert!(t.contains("transport_maps = inline:{ incoming.example.com=lmtp:unix:/run/mailgate/lmtp.sock }"), "{t}");
    assert!(t.contains("check_policy_service unix:/run/mailgate/policy.sock\n"), "{t}");
    let master = section(&t, "master.cf");
    assert_eq!(master.len(), 2, "{master:?}");
    assert!(master[0].starts_with("lmtp ") && master[0].split_whitespace().nth(4) == Some("n"), "{master:?}");
    assert!(master[1].starts_with("smtp ") && master[1].split_whitespace().nth(4) == Some("n"), "{master:?}");
    assert!(t.contains("postconf -F 'lmtp/unix/chroot = n'"), "{t}");

    // Inside the queue directory: relative paths, chroot or not.
    let c = config(
        r#"
        [[listen]]
        protocol = "lmtp"
        address = "unix:/var/spool/postfix/mailgate/lmtp.sock"
        [[listen]]
        protocol = "policy"
        address = "unix:/var/spool/postfix/mailgate/policy.sock"
        [[mailbox]]
        name = "incoming"
        address = "incoming+%{key}@incoming.example.com"
        "#,
    );
    let t = generate(&c, Mode::Lmtp, None).unwrap().text;
    assert!(t.contains("incoming.example.com=lmtp:unix:mailgate/lmtp.sock }"), "{t}");
    assert!(t.contains("check_policy_service unix:mailgate/policy.sock\n"), "{t}");
    assert!(section(&t, "master.cf").is_empty(), "{t}");
}

#[test]
fn proxy_mode() {
    let out = generate(&Config::default(), Mode::Proxy, None).unwrap();
    let t = &out.text;
    assert!(t.contains("relay_domains = localhost\n"), "{t}");
    assert!(t.contains("smtpd_proxy_timeout = 100s"), "{t}");
    assert!(!t.contains("transport_maps"), "{t}");
    assert!(!t.contains("check_policy_service"), "{t}");
    let master = section(t, "master.cf");
    assert_eq!(
        master,
        [
            "smtp      inet  n       -       n       -       20      smtpd",
            "  -o smtpd_proxy_filter=127.0.0.1:2525",
            "  -o smtpd_proxy_options=speed_adjust",
        ]
    );
    assert!(t.contains("postconf -M smtp/inet='smtp inet n - n - 20 smtpd -o smtpd_proxy_filter=127.0.0.1:2525"));

    let c = config(
        r#"
        [[listen]]
        protocol = "smtp"
        address = "unix:/var/spool/postfix/mailgate/smtp.sock"
        trusted_peers = []
        [[mailbox]]
        name = "incoming"
        address = "incoming+%{key}@incoming.example.com"
        "#,
    );
    let out = generate(&c, Mode::Proxy, None).unwrap();
    assert!(out.text.contains("  -o smtpd_proxy_filter=unix:mailgate/smtp.sock\n"), "{}", out.text);
    assert!(out.warnings.is_empty(), "unix peers are trusted: {:?}", out.warnings);

    let c = config(
        r#"
        [[listen]]
        protocol = "smtp"
        address = "[::1]:2525"
        trusted_peers = ["127.0.0.1/32"]
        [[mailbox]]
        name = "incoming"
        address = "incoming+%{key}@incoming.example.com"
        "#,
    );
    let out = generate(&c, Mode::Proxy, None).unwrap();
    assert!(out.text.contains("  -o smtpd_proxy_filter=inet:[::1]:2525\n"), "{}", out.text);
    assert!(out.warnings.iter().any(|w| w.contains("trusted_peers")), "{:?}", out.warnings);
}

#[test]
fn missing_or_unsuitable_listeners_are_errors() {
    let only_smtp = config(
        r#"
        [[listen]]
        protocol = "smtp"
        address = "127.0.0.1:2525"
        [[listen]]
        protocol = "policy"
        address = "127.0.0.1:10040"
        "#,
    );
    let e = generate(&only_smtp, Mode::Lmtp, None).unwrap_err().to_string();
    assert!(e.contains("needs an LMTP listener"), "{e}");
    assert!(generate(&only_smtp, Mode::Proxy, None).is_ok());

    let in_session = config(
        r#"
        [[listen]]
        protocol = "lmtp"
        address = "127.0.0.1:2424"
        mode = "in-session"
        [[listen]]
        protocol = "policy"
        address = "127.0.0.1:10040"
        "#,
    );
    let e = generate(&in_session, Mode::Lmtp, None).unwrap_err().to_string();
    assert!(e.contains("in-session") && e.contains("after-queue") && e.contains("bounce"), "{e}");

    let no_policy = config(
        r#"
        [[listen]]
        protocol = "lmtp"
        address = "127.0.0.1:2424"
        "#,
    );
    let e = generate(&no_policy, Mode::Lmtp, None).unwrap_err().to_string();
    assert!(e.contains("needs a policy listener"), "{e}");
    let e = generate(&no_policy, Mode::Proxy, None).unwrap_err().to_string();
    assert!(e.contains("needs an SMTP listener"), "{e}");

    let after_queue_smtp = config(
        r#"
        [[listen]]
        protocol = "smtp"
        address = "127.0.0.1:2525"
        mode = "after-queue"
        "#,
    );
    let e = generate(&after_queue_smtp, Mode::Proxy, None).unwrap_err().to_string();
    assert!(e.contains("after-queue") && e.contains("in-session"), "{e}");

    let relative = config(
        r#"
        [[listen]]
        protocol = "smtp"
        address = "unix:run/smtp.sock"
        "#,
    );
    let e = generate(&relative, Mode::Proxy, None).unwrap_err().to_string();
    assert!(e.contains("absolute"), "{e}");
}

/// The example mailgate configs in postfix/ parse and produce what the example Postfix
/// snippets next to them say.
#[test]
fn examples_in_postfix_dir_agree() {
    let a = Config::from_toml(include_str!("../../../postfix/mailgate-mode-a.toml"), Path::new("a")).unwrap();
    let t = generate(&a, Mode::Lmtp, None).unwrap().text;
    let snippet = include_str!("../../../postfix/mode-a-main.cf");
    for line in section(&t, "main.cf") {
        assert!(snippet.lines().any(|l| l == line), "mode-a-main.cf lacks {line:?}");
    }
    let mut unix = a.clone();
    for l in &mut unix.listen {
        match l.protocol {
            Protocol::Lmtp => l.address = "unix:/var/spool/postfix/mailgate/lmtp.sock".into(),
            Protocol::Policy => l.address = "unix:/var/spool/postfix/mailgate/policy.sock".into(),
            Protocol::Smtp => {}
        }
    }
    let t = generate(&unix, Mode::Lmtp, None).unwrap().text;
    let snippet = include_str!("../../../postfix/mode-a-unix-main.cf");
    for line in section(&t, "main.cf") {
        assert!(snippet.lines().any(|l| l == line), "mode-a-unix-main.cf lacks {line:?}");
    }
    let b = Config::from_toml(include_str!("../../../postfix/mailgate-mode-b.toml"), Path::new("b")).unwrap();
    let t = generate(&b, Mode::Proxy, None).unwrap().text;
    let snippet = include_str!("../../../postfix/mode-b-master.cf");
    for line in section(&t, "master.cf") {
        assert!(snippet.lines().any(|l| l == line), "mode-b-master.cf lacks {line:?}");
    }
    let snippet = include_str!("../../../postfix/mode-b-main.cf");
    for line in section(&t, "main.cf") {
        assert!(snippet.lines().any(|l| l == line), "mode-b-main.cf lacks {line:?}");
    }
}
