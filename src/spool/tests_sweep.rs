//! The sweep at open: blobs no job uses are removed with their segments; full-job blobs of
//! older spools get their reference.

use std::time::Duration;

use super::keys::ref_key;
use super::sweep::{Trees, sweep};
use super::tests::{new_job, options, reopen, stored_id};
use super::*;

fn seg_files(spool: &Spool) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(spool.dir().join("segments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn big_job() -> NewJob {
    let mut big = new_job("incoming", "big", vec![]);
    big.job.reply_text = Some("r".repeat(10_000));
    big
}

#[tokio::test]
async fn a_blob_no_job_uses_is_removed_at_open_with_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let kept = stored_id(&spool.store(b"kept", vec![new_job("incoming", "a", vec![])]).await.unwrap()[0]);
    spool.close().await.unwrap();
    drop(spool);
    let spool = reopen(dir.path());
    // What a kill -9 leaves when a checkpoint made a session's blob location durable before the
    // commit of its job: a location no job uses (here in a segment of its own).
    spool.write_message(spool.0.db.generate_id().unwrap(), b"never committed").unwrap();
    spool.close().await.unwrap();
    drop(spool);
    let spool = reopen(dir.path());
    assert_eq!(spool.0.rawloc.len(), 1, "only the kept job's message");
    assert_eq!(seg_files(&spool), ["00000001.seg", "00000003.seg"], "segment 2 held only the orphan");
    assert_eq!(spool.raw(&kept).unwrap().unwrap(), b"kept");
}

#[tokio::test]
async fn full_job_blobs_are_referenced_and_an_older_spools_get_their_reference() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let id = stored_id(&spool.store(b"the message", vec![big_job()]).await.unwrap()[0]);
    let n = parse_id(&id).unwrap();
    let full = spool.record(n).unwrap().unwrap().full.unwrap();
    assert_eq!(spool.0.refs.len(), 2, "the raw message and the full-job blob");
    // A spool from before full-job blobs had references.
    spool.0.refs.remove(ref_key(full, n)).unwrap();
    spool.close().await.unwrap();
    drop(spool);
    let spool = reopen(dir.path());
    assert_eq!(spool.get(&id).unwrap().unwrap().reply_text.unwrap().len(), 10_000, "the blob was kept");
    assert!(spool.0.refs.contains_key(ref_key(full, n)).unwrap(), "and got its reference");
    let again = sweep(&Trees { jobs: &spool.0.jobs, refs: &spool.0.refs, rawloc: &spool.0.rawloc }).unwrap();
    assert_eq!((again.removed, again.adopted), (0, 0), "nothing left to do, no job decoded");
}

#[tokio::test]
async fn a_purge_removes_both_references_and_both_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), SpoolOptions { retention: Duration::ZERO, ..options() }).unwrap();
    let id = stored_id(&spool.store(b"the message", vec![big_job()]).await.unwrap()[0]);
    spool.ack(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(spool.reap().await.unwrap().purged, 1);
    assert_eq!((spool.0.jobs.len(), spool.0.refs.len(), spool.0.rawloc.len()), (0, 0, 0));
}
