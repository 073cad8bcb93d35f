//! One ESMTP/LMTP session state machine (LMTP is a flag) and its connection driver.

pub mod conn;
pub mod data;
mod offload;
pub mod outcome;
pub mod session;
pub mod trace;
pub mod verify;
pub mod xforward;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_tls;

pub use conn::{ConnContext, run};
pub use outcome::StoreRequest;
pub use session::{Event, Peer, Session, SessionConfig, TlsPolicy};
