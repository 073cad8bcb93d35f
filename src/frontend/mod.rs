//! Protocol adapters. No policy inside.

pub mod listener;
pub mod policy;
pub mod smtp;
