//! Durability under power cuts: the spool lives on examples/powercutfs.rs, a FUSE file system
//! that holds every write in memory until its file is synced. Each cycle ends with a power
//! cut (the file system's process killed: every write no sync covered is gone) and then
//! kill -9 of the server; the next cycle mounts the backing directory again and restarts the
//! server on what survived. A kill -9 alone keeps the page cache, so it cannot show a missing
//! sync; this test can. Needs FUSE (/dev/fuse, and root or fusermount3). The load and the
//! checks are crash.rs's (common/crashload.rs).

mod common;

use common::crashload::{Stop, delivery_under, intake_under};

#[test]
fn power_cut_under_load_loses_no_acknowledged_message() {
    intake_under(Stop::PowerCut);
}

#[test]
fn power_cut_during_delivery_and_the_reaper_loses_nothing_and_redelivers_only_after_a_cut() {
    delivery_under(Stop::PowerCut);
}
