//! Durability under kill -9: parallel sessions with numbered recipients and unique Message-IDs,
//! the server killed at random points and restarted on the same spool, many times. Every
//! message that got 250 must be in the queue afterwards, exactly once. With delivery on (and a
//! receiver that fails every other cycle, so the reaper is busy with retry waits), every job is
//! delivered, and a job is delivered twice only when a kill fell between two deliveries.
//! The same under power cuts: powercut.rs. The load and the checks: common/crashload.rs.

mod common;

use common::crashload::{Stop, delivery_under, intake_under};

#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    intake_under(Stop::Kill9);
}

#[test]
fn kill_9_during_delivery_and_the_reaper_loses_nothing_and_redelivers_only_after_a_kill() {
    delivery_under(Stop::Kill9);
}
