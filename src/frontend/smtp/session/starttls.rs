//! STARTTLS in the session core (RFC 3207): the policy, the command, and starting over once
//! the driver has done the handshake.

use super::{Session, State, TlsPolicy};
use crate::gate::verdict::{Reason, Reply};
use crate::job::TlsInfo;

impl Session {
    /// Sets the listener's TLS policy (default: no TLS).
    pub fn set_tls_policy(&mut self, policy: TlsPolicy) {
        self.tls_policy = policy;
    }

    /// The TLS handshake succeeded (after STARTTLS, or before the greeting with implicit TLS).
    /// The session starts over (RFC 3207 4.2): HELO/EHLO, the transaction and XFORWARD
    /// attributes are forgotten; the client must send EHLO again.
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.proto = "SMTP";
        self.reset();
        self.discarding_line = false;
        if matches!(self.state, State::WaitTls) {
            self.state = State::Command;
        }
    }

    /// The connection's TLS, once established.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The TLS of the original client's connection: ours, unless XFORWARD says the client is
    /// someone behind the peer (whose TLS we do not know).
    pub(in crate::frontend::smtp) fn client_tls(&self) -> Option<&TlsInfo> {
        if self.fwd.seen { None } else { self.tls.as_ref() }
    }

    /// STARTTLS is offered until TLS is up, on SMTP listeners with a certificate.
    pub(super) fn offers_starttls(&self) -> bool {
        self.tls_policy.starttls && self.tls.is_none() && !self.cfg.lmtp
    }

    pub(super) fn starttls(&mut self, out: &mut Vec<u8>) {
        if self.txn.is_some() {
            self.bad(out, Reason::BadCommand, Reply::new(503, "5.5.1", "Error: MAIL transaction in progress"));
            return;
        }
        Reply::new(220, "2.0.0", "Ready to start TLS").write_to(out);
        self.state = State::WaitTls;
    }
}
