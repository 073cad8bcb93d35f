//! Config parsing tests.

use super::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[test]
fn embedded_defaults_match_design() {
    let c = Config::default();
    let addrs: Vec<_> = c.listen.iter().map(|l| (l.protocol, l.address.as_str(), l.reply_mode())).collect();
    assert_eq!(
        addrs,
        vec![
            (Protocol::Smtp, "127.0.0.1:2525", ReplyMode::InSession),
            (Protocol::Lmtp, "127.0.0.1:2424", ReplyMode::AfterQueue),
            (Protocol::Policy, "127.0.0.1:10040", ReplyMode::InSession),
        ]
    );
    assert_eq!(c.mailbox[0].address, "incoming+%{key}@localhost");
    assert_eq!(c.http.listen, "127.0.0.1:8025");
    assert_eq!(c.spool.dir, PathBuf::from("./mailgate-data"));
    assert!(c.validate().is_ok());
}

#[test]
fn design_example_parses() {
    let text = r#"
[server]
hostname = "mx.example.com"
[[listen]]
protocol = "smtp"
address = "127.0.0.1:2525"
mode = "in-session"
trusted_peers = ["127.0.0.1/32", "::1/128"]
[[listen]]
protocol = "lmtp"
address = "unix:/run/mailgate/lmtp.sock"
[[mailbox]]
name = "incoming"
address = "incoming+%{key}@incoming.example.com"
reply_host = "gitlab.example.com"
routes = "gitlab"
[limits]
max_message_size = 26214400
max_recipients = 100
max_connections = 1000
max_connections_per_ip = 50
command_timeout = "5m"
data_timeout = "10m"
[auth]
nameservers = []
spf = "reject-fail"
dkim = "record"
dmarc = "enforce"
[policy]
auto_submitted = "discard"
null_sender = "discard"
[spool]
dir = "./mailgate-data"
[http]
listen = "127.0.0.1:8025"
token_file = ""
[[deliver]]
kind = "mailroom"
mailboxes = ["incoming"]
url = "https://gitlab.example.com/api/v4/internal/mail_room/incoming_email"
secret_file = "/etc/mailgate/incoming_email_secret"
concurrency = 4
timeout = "30s"
retry = ["1m", "5m"]
"#;
    let c = Config::from_toml(text, Path::new("t.toml")).unwrap();
    assert_eq!(c.listen[1].reply_mode(), ReplyMode::AfterQueue);
    assert_eq!(c.listen[1].bind_address().unwrap(), BindAddress::Unix("/run/mailgate/lmtp.sock".into()));
    assert_eq!(c.limits.command_timeout, Duration::from_secs(300));
    assert_eq!(c.server.hostname, "mx.example.com");
}

#[test]
fn content_limits_and_the_error_delay() {
    let d = Config::default();
    assert_eq!(d.limits.content(), crate::gate::mime::ContentLimits::DEFAULT);
    assert_eq!(d.limits.error_delay, Duration::from_millis(250));
    let text = "[limits]\nmax_header_size = 65536\nmax_header_lines = 500\nmax_mime_depth = 20\n\
                max_mime_parts = 200\nerror_delay = \"0s\"\n";
    let c = Config::from_toml(text, Path::new("t.toml")).unwrap();
    let limits = c.limits.content();
    assert_eq!((limits.max_header_size, limits.max_header_lines), (65536, 500));
    assert_eq!((limits.max_mime_depth, limits.max_mime_parts), (20, 200));
    assert!(c.limits.error_delay.is_zero());
    for bad in ["max_mime_depth = 0", "max_mime_depth = 101", "max_mime_parts = 1", "max_header_size = 100"] {
        let e = Config::from_toml(&format!("[limits]\n{bad}\n"), Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains(bad.split(' ').next().unwrap()), "{bad}: {e}");
    }
}

#[test]
fn typos_are_errors() {
    let e = Config::from_toml("[limits]\nmax_mesage_size = 1\n", Path::new("t.toml")).unwrap_err();
    assert!(e.to_string().contains("max_mesage_size"), "{e}");
}

#[test]
fn tls_settings_are_validated() {
    let listener = |protocol: &str, keys: &str| {
        format!("[[listen]]\nprotocol = \"{protocol}\"\naddress = \"127.0.0.1:2525\"\n{keys}\n")
    };
    let tls = "tls = { cert = \"/etc/mailgate/cert.pem\", key = \"/etc/mailgate/key.pem\" }";
    // the files are read by serve and check, not when the config is parsed
    for keys in [
        tls.to_string(),
        format!("{tls}\nrequire_tls = true"),
        format!("{tls}\nimplicit_tls = true\nrequire_tls = true"),
    ] {
        let c = Config::from_toml(&listener("smtp", &keys), Path::new("t.toml")).unwrap();
        assert!(c.listen[0].tls.is_some());
    }
    for (protocol, keys, expect) in [
        ("smtp", "require_tls = true".to_string(), "require_tls needs tls"),
        ("smtp", "implicit_tls = true".to_string(), "implicit_tls needs tls"),
        ("lmtp", tls.to_string(), "tls is for smtp listeners only"),
        ("policy", tls.to_string(), "tls is for smtp listeners only"),
        ("smtp", "tls = { cert = \"\", key = \"k.pem\" }".to_string(), "tls cert is empty"),
    ] {
        let e = Config::from_toml(&listener(protocol, &keys), Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains(expect), "{protocol} {keys}: {e}");
    }
    let e = Config::from_toml(&listener("smtp", "tls = { cert = \"c.pem\" }"), Path::new("t.toml")).unwrap_err();
    assert!(e.to_string().contains("key"), "{e}");
}
