//! Segment files: appends, reads, rotation, deletion of empty segments, checks at open, and
//! the recovery of jobs whose message a machine crash took.

use std::path::Path;
use std::time::Duration;

use super::segments::{Loc, Segments};
use super::tests::{new_job, options, reopen, stored_id};
use super::*;

fn seg_files(spool_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(spool_dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn rawloc(dir: &Path) -> (sled::Db, Tree) {
    let db = sled::Config::new().path(dir.join("db-test")).flush_every_ms(None).open().unwrap();
    let t = db.open_tree("rawloc").unwrap();
    (db, t)
}

#[test]
fn locations_round_trip_and_bad_ones_are_corrupt() {
    let loc = Loc { seg: 7, off: 1 << 40, len: 123_456, crc: 0xdead_beef };
    assert_eq!(Loc::decode(&loc.encode()).unwrap(), loc);
    assert!(matches!(Loc::decode(&[0; 23]), Err(SpoolError::Corrupt(_))));
}

#[test]
fn segments_rotate_and_empty_ones_go_after_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = rawloc(dir.path());
    let (segs, bad) = Segments::open(dir.path(), &t, 1000).unwrap();
    assert!(bad.is_empty());
    assert_eq!(seg_files(dir.path()), ["00000001.seg"]);
    let a = segs.append(&[b'a'; 600]).unwrap();
    let b = segs.append(&[b'b'; 600]).unwrap(); // would pass 1000: a new segment
    let c = segs.append(&[b'c'; 5000]).unwrap(); // bigger than a segment: one of its own
    assert_eq!((a.seg, b.seg, c.seg), (1, 2, 3));
    assert_eq!((a.off, b.off, c.off), (0, 0, 0));
    assert_eq!(segs.read(&b).unwrap(), vec![b'b'; 600]);
    assert_eq!(segs.read(&c).unwrap().len(), 5000);
    segs.release(&a);
    assert_eq!(seg_files(dir.path()).len(), 3, "not before the commit");
    let synced = segs.sync().unwrap();
    segs.after_commit(synced);
    assert_eq!(seg_files(dir.path()), ["00000002.seg", "00000003.seg"]);
    segs.release(&c); // the segment being written stays
    segs.after_commit(segs.sync().unwrap());
    assert_eq!(seg_files(dir.path()), ["00000002.seg", "00000003.seg"]);
    assert_eq!(segs.count(), 2);
}

#[test]
fn open_deletes_unused_segments_and_reports_damaged_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = rawloc(dir.path());
    let (segs, _) = Segments::open(dir.path(), &t, 1 << 20).unwrap();
    let kept = segs.append(b"kept message").unwrap();
    let torn = segs.append(b"a message whose bytes never reached the disk").unwrap();
    let _unreferenced = segs.append(b"stored, pointer never written").unwrap();
    segs.after_commit(segs.sync().unwrap());
    t.insert(1u64.to_be_bytes(), &kept.encode()[..]).unwrap();
    t.insert(2u64.to_be_bytes(), &torn.encode()[..]).unwrap();
    drop(segs);
    // What a machine crash leaves: the pointer is on disk, the bytes are not (zeros).
    let f = std::fs::OpenOptions::new().write(true).open(dir.path().join("segments/00000001.seg")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; torn.len as usize], torn.off).unwrap();
    // and a segment nothing points to
    std::fs::write(dir.path().join("segments/00000002.seg"), b"junk").unwrap();
    let (segs, bad) = Segments::open(dir.path(), &t, 1 << 20).unwrap();
    assert_eq!(bad, vec![2]);
    assert_eq!(segs.read(&kept).unwrap(), b"kept message");
    assert_eq!(seg_files(dir.path()), ["00000001.seg", "00000003.seg"], "unused segment 2 deleted, 3 started");
    // A pointer past the end of its segment is damaged too.
    let past = Loc { seg: 1, off: 1 << 30, len: 10, crc: 0 };
    t.insert(3u64.to_be_bytes(), &past.encode()[..]).unwrap();
    drop(segs);
    let (_segs, bad) = Segments::open(dir.path(), &t, 1 << 20).unwrap();
    assert_eq!(bad, vec![2, 3]);
}

#[tokio::test]
async fn a_job_whose_message_a_crash_took_is_removed_with_its_dedup_entries() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let keep = spool.store(b"first message", vec![new_job("incoming", "a", vec![b"k-first".to_vec()])]).await.unwrap();
    let lost =
        spool.store(b"second message", vec![new_job("incoming", "b", vec![b"k-second".to_vec()])]).await.unwrap();
    let (keep, lost) = (stored_id(&keep[0]), stored_id(&lost[0]));
    let loc = Loc::decode(
        &spool
            .0
            .rawloc
            .get(segments::loc_key(spool.record(parse_id(&lost).unwrap()).unwrap().unwrap().raw_id))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    spool.close().await.unwrap();
    drop(spool);
    let f = std::fs::OpenOptions::new().write(true).open(dir.path().join("segments/00000001.seg")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; loc.len as usize], loc.off).unwrap();

    let spool = reopen(dir.path());
    assert!(spool.get(&lost).unwrap().is_none(), "the job without its message is gone");
    assert_eq!(spool.raw(&keep).unwrap().unwrap(), b"first message");
    assert_eq!(spool.stats().unwrap().ready, 1);
    assert_eq!(spool.0.refs.len(), 1);
    // The sender's retry is a new job, not a duplicate of the removed one.
    let again =
        spool.store(b"second message", vec![new_job("incoming", "b", vec![b"k-second".to_vec()])]).await.unwrap();
    assert!(matches!(again[0], StoreOutcome::Stored { .. }), "{again:?}");
    let dup = spool.store(b"first message", vec![new_job("incoming", "a", vec![b"k-first".to_vec()])]).await.unwrap();
    assert!(matches!(dup[0], StoreOutcome::Duplicate { .. }), "the kept job's dedup entry stays");
}

#[tokio::test]
async fn a_job_whose_full_record_a_crash_took_is_removed_and_its_message_freed() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let mut big = new_job("incoming", "a", vec![b"k-big".to_vec()]);
    big.job.reply_text = Some("r".repeat(10_000));
    let id = stored_id(&spool.store(b"the message", vec![big]).await.unwrap()[0]);
    let full = spool.record(parse_id(&id).unwrap()).unwrap().unwrap().full.unwrap();
    let loc = Loc::decode(&spool.0.rawloc.get(segments::loc_key(full)).unwrap().unwrap()).unwrap();
    spool.close().await.unwrap();
    drop(spool);
    let f = std::fs::OpenOptions::new().write(true).open(dir.path().join("segments/00000001.seg")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage", loc.off + 10).unwrap();
    let spool = reopen(dir.path());
    assert!(spool.get(&id).unwrap().is_none());
    assert_eq!((spool.0.jobs.len(), spool.0.rawloc.len(), spool.0.refs.len(), spool.0.dedup.len()), (0, 0, 0, 0));
    spool.close().await.unwrap();
    drop(spool);
    let _spool = reopen(dir.path());
    assert_eq!(seg_files(dir.path()), ["00000003.seg"], "segments 1 and 2 held nothing live");
}

#[tokio::test]
async fn purged_messages_free_their_segment_and_old_spools_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), SpoolOptions { retention: Duration::ZERO, ..options() }).unwrap();
    let id = stored_id(&spool.store(b"gone soon", vec![new_job("incoming", "a", vec![])]).await.unwrap()[0]);
    spool.ack(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(spool.reap().await.unwrap().purged, 1);
    // A raw message from before segment files: chunks in the raw tree, no pointer.
    raw::write(&spool.0.raw, 4242, b"an old spool's message").unwrap();
    assert_eq!(spool.read_message(4242).unwrap().unwrap(), b"an old spool's message");
    spool.remove_blob(4242).unwrap();
    assert_eq!(spool.read_message(4242).unwrap(), None);
    spool.close().await.unwrap();
    drop(spool);
    assert_eq!(seg_files(dir.path()), ["00000001.seg"]);
    let spool = reopen(dir.path());
    assert_eq!(seg_files(dir.path()), ["00000002.seg"], "the emptied segment is deleted at the next open");
    assert_eq!(spool.segment_count(), 1);
}

#[test]
fn writeback_starts_once_a_step_has_piled_up_and_each_byte_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_db, t) = rawloc(dir.path());
    let (segs, _) = Segments::open(dir.path(), &t, 64 << 20).unwrap();
    let chunk = vec![b'w'; 300 << 10];
    for _ in 0..3 {
        segs.append(&chunk).unwrap();
    }
    assert_eq!(segs.start_writeback(), 0, "900 KiB: under the step");
    segs.append(&chunk).unwrap();
    assert_eq!(segs.start_writeback(), 1200 << 10, "everything not started before");
    assert_eq!(segs.start_writeback(), 0, "nothing new");
    let loc = segs.append(&chunk).unwrap();
    assert_eq!(segs.read(&loc).unwrap(), chunk, "the hint changes no bytes");
}
