//! The session's reject-log entries and the original client's identity they carry.

use super::Session;
use crate::gate::verdict::{Reason, Reply};
use crate::reject::{Action, RejectEntry, Stage};

impl Session {
    /// Queues a reject-log entry with the session's context.
    pub(in crate::frontend::smtp) fn log(
        &mut self,
        action: Action,
        reply: &Reply,
        reason: Reason,
        rcpt_to: Vec<String>,
    ) {
        self.log_entry(self.stage(), action, reply, reason, rcpt_to, String::new(), String::new());
    }

    #[allow(clippy::too_many_arguments)]
    pub(in crate::frontend::smtp) fn log_entry(
        &mut self,
        stage: Stage,
        action: Action,
        reply: &Reply,
        reason: Reason,
        rcpt_to: Vec<String>,
        message_id: String,
        subject: String,
    ) {
        self.stats.refusals += 1;
        let rcpt_to = if rcpt_to.is_empty() {
            self.txn.as_ref().map(|t| t.rcpts.iter().map(|r| r.address.clone()).collect()).unwrap_or_default()
        } else {
            rcpt_to
        };
        self.rejects.push(RejectEntry {
            at: time::OffsetDateTime::now_utc(),
            stage,
            action,
            code: reply.code,
            enhanced: reply.enhanced.to_string(),
            reason,
            text: reply.text.clone(),
            client_ip: self.client_ip(),
            helo: self.client_helo(),
            mail_from: self.txn.as_ref().map(|t| t.mail_from.clone()).unwrap_or_default(),
            rcpt_to,
            message_id,
            subject,
            listener: self.cfg.listener.to_string(),
            suppressed: 0,
        });
    }

    /// The original client's HELO. After XFORWARD the relay's own LHLO/EHLO name is not the
    /// client's: forwarded and local session data are never mixed (XFORWARD_README).
    pub fn client_helo(&self) -> String {
        if self.fwd.seen { self.fwd.helo.clone().unwrap_or_default() } else { self.helo.clone().unwrap_or_default() }
    }

    /// The original client's address: XFORWARD's from a trusted peer, else the socket peer.
    pub fn client_ip(&self) -> String {
        match (&self.fwd.addr, self.fwd.seen) {
            (Some(addr), _) => addr.clone(),
            // XFORWARD without ADDR: the client is unknown; the peer is only the relay
            (None, true) => String::new(),
            (None, false) => self.peer.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        }
    }
}
