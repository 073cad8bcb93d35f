//! Protocol adapters. No policy inside.

pub mod listener;
pub mod policy;
pub mod refusals;
pub mod smtp;
pub mod tls;

use crate::reject::RejectEntry;
use crate::spool::Spool;

/// Writes a refusal to the reject log and counts it in the metrics.
pub fn log_reject(spool: &Spool, entry: &RejectEntry) {
    crate::metrics::global().refused(entry.reason.as_str(), entry.action.as_str(), entry.stage.as_str());
    if let Err(e) = spool.log_reject(entry) {
        tracing::error!(error = %e, reject = %entry.to_json_line(), "could not write the reject log");
    }
}
