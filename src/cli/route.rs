//! `mailgate route ADDRESS`: what the gate would do with this recipient.

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use mailgate::config::Config;
use mailgate::gate::Gate;
use mailgate::gate::verdict::{Reason, Verdict};
use serde_json::{Value, json};

pub fn run(config: &Config, address: &str) -> Result<ExitCode> {
    let gate = Gate::new(&config.mailbox, &config.policy).map_err(|e| anyhow!("{e}"))?;
    let (answer, accepted) = decide(&gate, address);
    println!("{answer}");
    Ok(if accepted { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The JSON answer and whether the address is accepted.
pub fn decide(gate: &Gate, address: &str) -> (Value, bool) {
    match gate.check_rcpt(address) {
        Ok(target) => {
            let answer = match target.key {
                Some(key) => json!({
                    "mailbox": target.mailbox,
                    "key": key,
                    "route": target.route.map(|r| r.as_str()),
                }),
                // A base or dedicated address: the key comes from the message's headers.
                None => json!({
                    "mailbox": target.mailbox,
                    "key": null,
                    "route": null,
                    "key_from": "headers",
                }),
            };
            (answer, true)
        }
        Err(verdict) => (refusal(gate, address, &verdict), false),
    }
}

fn refusal(gate: &Gate, address: &str, verdict: &Verdict) -> Value {
    let text = match verdict {
        Verdict::Reject { reply, .. } | Verdict::Tempfail { reply, .. } => reply.text.clone(),
        Verdict::Discard { text, .. } => text.clone(),
        Verdict::Accept => String::new(),
    };
    let reason = verdict.reason();
    let mut answer = json!({
        "error": reason.map(Reason::as_str),
        "text": text,
        "address": address,
    });
    if reason == Some(Reason::UnknownKey) {
        // The address matched a mailbox but its key fits no route: say which.
        if let Some((mailbox, key)) = gate.mailboxes().find_map(|t| Some((t.mailbox.clone(), t.key_of(address)?))) {
            answer["mailbox"] = json!(mailbox);
            answer["key"] = json!(key);
            answer["route"] = json!("unknown");
        }
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        let config = Config::default();
        Gate::new(&config.mailbox, &config.policy).unwrap()
    }

    #[test]
    fn keyed_base_and_refused_addresses() {
        let g = gate();
        let (v, ok) = decide(&g, "incoming+0123456789abcdef0123456789abcdef@localhost");
        assert!(ok);
        assert_eq!(v, json!({"mailbox": "incoming", "key": "0123456789abcdef0123456789abcdef", "route": "reply"}));
        let (v, ok) = decide(&g, "incoming@localhost");
        assert!(ok);
        assert_eq!(v, json!({"mailbox": "incoming", "key": null, "route": null, "key_from": "headers"}));
        let (v, ok) = decide(&g, "incoming+zzz@localhost");
        assert!(!ok);
        assert_eq!(v["error"], "unknown_key");
        assert_eq!((&v["mailbox"], &v["key"], &v["route"]), (&json!("incoming"), &json!("zzz"), &json!("unknown")));
        assert_eq!(v["address"], "incoming+zzz@localhost");
        let (v, ok) = decide(&g, "someone@example.org");
        assert!(!ok);
        assert_eq!(v["error"], "unknown_address");
        assert!(v["text"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(v.get("mailbox").is_none());
    }
}
