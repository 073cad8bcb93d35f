//! The store journal: frames, replay after a crash, emptying after a sled flush.

use std::path::Path;

use super::journal::{Frame, TreeId, frames};
use super::tests::{new_job, options, reopen, stored_id};
use super::*;

/// Copies a spool directory as it is on disk now: what a kill -9 would leave.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Frames in the journal that a replay would read.
fn journal_frames(dir: &Path) -> usize {
    frames(&std::fs::read(dir.join("journal")).unwrap()).count()
}

#[test]
fn frames_round_trip_and_a_torn_frame_ends_the_replay() {
    let mut bytes = Vec::new();
    for seq in [7u64, 8] {
        let mut f = Frame::new(seq);
        f.put(TreeId::Jobs, b"key", format!("value {seq}").as_bytes());
        f.put(TreeId::Refs, b"", b"");
        bytes.extend(f.finish());
    }
    let whole = bytes.len();
    let mut third = Frame::new(9);
    third.put(TreeId::State, b"k", b"v");
    bytes.extend(&third.finish()[..10]);
    let read: Vec<_> = frames(&bytes).map(|f| f.unwrap()).collect();
    assert_eq!(read.len(), 2);
    assert_eq!(
        read[0],
        (7, vec![(TreeId::Jobs as u8, &b"key"[..], &b"value 7"[..]), (TreeId::Refs as u8, &b""[..], &b""[..])])
    );
    assert_eq!(read[1].0, 8);
    // What follows the newest frames after a restart at the beginning: older numbers.
    let mut stale = Frame::new(3);
    stale.put(TreeId::Jobs, b"old", b"old");
    let mut again = bytes[..whole].to_vec();
    again.extend(stale.finish());
    assert_eq!(frames(&again).count(), 2);
    // A flipped byte fails the CRC: nothing from that frame on.
    bytes[whole - 1] ^= 1;
    assert_eq!(frames(&bytes).count(), 1);
    assert_eq!(frames(&[0u8; 64]).count(), 0);
}

#[tokio::test]
async fn stores_that_sled_had_not_written_come_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let spool = Spool::open(&live, options()).unwrap();
    let key = dedup_key_ident("QX", "incoming+a@x", "incoming", "a", &[1; 32]);
    let mut ids = Vec::new();
    for (n, raw) in [&b"first message"[..], b"second", b"third"].into_iter().enumerate() {
        let keys = if n == 0 { vec![key.clone()] } else { vec![] };
        let out = spool.store(raw, vec![new_job("incoming", &format!("k{n}"), keys)]).await.unwrap();
        ids.push(stored_id(&out[0]));
    }
    // Stores alone do not flush sled: the journal holds them.
    assert_eq!(journal_frames(&live), 3);
    let (crashed, sled_only) = (dir.path().join("crashed"), dir.path().join("sled-only"));
    copy_dir(&live, &crashed);
    copy_dir(&live, &sled_only);
    spool.close().await.unwrap();
    drop(spool);
    // The frames stay until overwritten: they are not read again, sled has them.

    // What sled alone recovered from the copy: not the three jobs (else this test proves nothing).
    {
        let db = sled::Config::new().path(&sled_only).open().unwrap();
        assert!(db.open_tree("jobs").unwrap().len() < 3, "sled wrote the stores without a flush");
    }
    let spool = reopen(&crashed);
    for (id, raw) in ids.iter().zip([&b"first message"[..], b"second", b"third"]) {
        assert_eq!(spool.get(id).unwrap().unwrap().state, crate::job::JobState::Ready);
        assert_eq!(spool.raw(id).unwrap().unwrap(), raw);
    }
    assert_eq!(spool.stats().unwrap().ready, 3);
    let again = spool.store(b"first message", vec![new_job("incoming", "k0", vec![key])]).await.unwrap();
    assert_eq!(again, vec![StoreOutcome::Duplicate { id: ids[0].clone() }], "the dedup entry came back too");
    spool.close().await.unwrap();
    drop(spool);

    // Replayed once: a second open finds the same jobs, no more.
    let spool = reopen(&crashed);
    assert_eq!(spool.stats().unwrap().ready, 3);
    spool.close().await.unwrap();
}

#[tokio::test]
async fn a_commit_flushes_sled_and_the_journal_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    spool.store(b"m", vec![new_job("incoming", "k", vec![])]).await.unwrap();
    spool.store(b"m2", vec![new_job("incoming", "k2", vec![])]).await.unwrap();
    assert_eq!(journal_frames(dir.path()), 2);
    spool.commit().await.unwrap();
    // The next frame goes to the start of the file; the two before it are not read again.
    spool.store(b"m3", vec![new_job("incoming", "k3", vec![])]).await.unwrap();
    assert_eq!(journal_frames(dir.path()), 1);
    spool.close().await.unwrap();
    drop(spool);
    let spool = reopen(dir.path());
    assert_eq!(spool.stats().unwrap().ready, 3);
    // After the open's checkpoint the next frame again goes to the start; the old one after it
    // has a lower number and ends the reading.
    spool.store(b"m4", vec![new_job("incoming", "k4", vec![])]).await.unwrap();
    assert_eq!(journal_frames(dir.path()), 1);
    spool.close().await.unwrap();
}

/// Message bytes (kind 6) in the journal's readable frames.
fn journal_messages(dir: &Path) -> usize {
    let bytes = std::fs::read(dir.join("journal")).unwrap();
    frames(&bytes).map(|f| f.unwrap().1.iter().filter(|(kind, _, _)| *kind == 6).count()).sum()
}

#[tokio::test]
async fn small_messages_come_back_from_the_journal_when_a_machine_crash_took_their_segment() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let spool = Spool::open(&live, options()).unwrap();
    let raws: Vec<Vec<u8>> = (0..3).map(|n| format!("Subject: {n}\r\n\r\nbody {n}\r\n").into_bytes()).collect();
    let mut ids = Vec::new();
    for (n, raw) in raws.iter().enumerate() {
        let out = spool.store(raw, vec![new_job("incoming", &format!("k{n}"), vec![])]).await.unwrap();
        ids.push(stored_id(&out[0]));
    }
    assert_eq!(journal_messages(&live), 3, "small messages travel in the frame");
    // A machine crash before the next checkpoint: the segments were never synced, so their
    // bytes may be gone; the journal was.
    let crashed = dir.path().join("crashed");
    copy_dir(&live, &crashed);
    spool.close().await.unwrap();
    drop(spool);
    for entry in std::fs::read_dir(crashed.join("segments")).unwrap() {
        std::fs::OpenOptions::new().write(true).open(entry.unwrap().path()).unwrap().set_len(0).unwrap();
    }
    let spool = reopen(&crashed);
    for (id, raw) in ids.iter().zip(&raws) {
        assert_eq!(spool.raw(id).unwrap().as_deref(), Some(raw.as_slice()), "job {id}");
    }
    assert_eq!(spool.stats().unwrap().ready, 3);
    spool.close().await.unwrap();
}

#[tokio::test]
async fn a_message_too_big_for_the_frame_is_synced_in_its_segment_instead() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let big = vec![b'x'; super::journal::INLINE_MAX + 1];
    let id = stored_id(&spool.store(&big, vec![new_job("incoming", "k", vec![])]).await.unwrap()[0]);
    assert_eq!(journal_messages(dir.path()), 0);
    assert_eq!(journal_frames(dir.path()), 1, "its records are journaled all the same");
    spool.store(b"small", vec![new_job("incoming", "k2", vec![])]).await.unwrap();
    assert_eq!(journal_messages(dir.path()), 1);
    assert_eq!(spool.raw(&id).unwrap().unwrap(), big);
    spool.close().await.unwrap();
}

#[test]
fn a_checkpointing_batch_leaves_its_messages_out_of_the_frame() {
    let loc = super::segments::Loc { seg: 1, off: 0, len: 5, crc: crc32fast::hash(b"hello") };
    let mut small = Frame::new(1);
    small.message(&loc, Some(b"hello"));
    assert!(!small.segments_unsynced());
    let mut checkpoint = Frame::new(2).without_messages();
    checkpoint.message(&loc, Some(b"hello"));
    assert!(checkpoint.segments_unsynced(), "the commit syncs the segments instead");
    let kinds = |f: Frame| -> Vec<u8> {
        let bytes = f.finish();
        frames(&bytes).flat_map(|f| f.unwrap().1.into_iter().map(|(kind, _, _)| kind).collect::<Vec<_>>()).collect()
    };
    assert_eq!(kinds(small), [6]);
    assert!(kinds(checkpoint).is_empty());
}

/// Opens the sled database of a spool copy directly, as sled recovers it.
fn sled_of(dir: &Path) -> sled::Db {
    sled::Config::new().path(dir).flush_every_ms(None).open().unwrap()
}

#[tokio::test]
async fn a_job_sled_lost_behind_a_later_insert_comes_back_from_the_journal() {
    // sled 0.34 can recover its log with a hole (a torn buffer in its last segments is
    // skipped): here a frame's applied mark survived, one of its jobs did not.
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let spool = Spool::open(&live, options()).unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        let raw = format!("m{n}");
        let out = spool.store(raw.as_bytes(), vec![new_job("incoming", &format!("k{n}"), vec![])]).await.unwrap();
        ids.push(stored_id(&out[0]));
    }
    spool.0.db.flush().unwrap();
    let crashed = dir.path().join("crashed");
    copy_dir(&live, &crashed);
    spool.close().await.unwrap();
    drop(spool);
    {
        let db = sled_of(&crashed);
        let n = parse_id(&ids[1]).unwrap();
        let record = db.open_tree("jobs").unwrap().remove(keys::id_key(n)).unwrap().unwrap();
        let raw_id = super::records::StoredJob::decode(&record).unwrap().raw_id;
        assert!(db.open_tree("state").unwrap().remove(keys::state_key(JobState::Ready, n)).unwrap().is_some());
        assert!(db.open_tree("refs").unwrap().remove(keys::ref_key(raw_id, n)).unwrap().is_some());
        assert!(db.get(super::journal::APPLIED_KEY).unwrap().is_some(), "the frames' marks survived");
        db.flush().unwrap();
    }
    let spool = reopen(&crashed);
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(spool.get(id).unwrap().unwrap().state, JobState::Ready, "job {id}");
        assert_eq!(spool.raw(id).unwrap().unwrap(), format!("m{n}").as_bytes(), "its message was kept");
    }
    assert_eq!(spool.stats().unwrap().ready, 3);
    spool.close().await.unwrap();
}

#[tokio::test]
async fn a_replayed_frame_does_not_set_back_a_job_that_moved_on() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let spool = Spool::open(&live, options()).unwrap();
    let id = stored_id(&spool.store(b"m", vec![new_job("incoming", "k", vec![])]).await.unwrap()[0]);
    let held = spool.lease_for_push(&[], std::time::Duration::from_secs(60)).unwrap().unwrap();
    spool.push_delivered(held).await.unwrap();
    // sled has the delivery (not checkpointed: the journal still holds the store's frame).
    spool.0.db.flush().unwrap();
    assert_eq!(journal_frames(&live), 1);
    let crashed = dir.path().join("crashed");
    copy_dir(&live, &crashed);
    spool.close().await.unwrap();
    drop(spool);
    let n = parse_id(&id).unwrap();
    {
        // Lost in sled's recovery: the frame's applied mark and the job's done index entry.
        let db = sled_of(&crashed);
        db.remove(super::journal::APPLIED_KEY).unwrap();
        assert!(db.open_tree("state").unwrap().remove(keys::state_key(JobState::Done, n)).unwrap().is_some());
        db.flush().unwrap();
    }
    let spool = reopen(&crashed);
    let job = spool.get(&id).unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Done, 1), "the delivered job stays delivered");
    let stats = spool.stats().unwrap();
    assert_eq!((stats.ready, stats.done), (0, 1), "one index entry, the right one: {stats:?}");
    assert!(spool.lease_for_push(&[], std::time::Duration::from_secs(60)).unwrap().is_none());
    spool.close().await.unwrap();
}
