//! mailgate: the incoming-mail gate for applications that talk to their users by email.
//!
//! Data flows one way: frontends (protocols) -> gate (decisions) -> spool (sled) -> delivery.

pub mod auth;
pub mod config;
pub mod delivery;
pub mod frontend;
pub mod gate;
pub mod http;
pub mod job;
pub mod metrics;
pub mod reject;
pub mod reply;
pub mod server;
pub mod spool;
