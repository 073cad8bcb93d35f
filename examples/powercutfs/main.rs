//! A FUSE file system for power-cut tests: it shows `BACKING` at `MOUNTPOINT`, but file data
//! written through it reaches `BACKING` only when that file is `fsync`ed or `fdatasync`ed.
//! Until then it lives in this process's memory, like dirty pages in a page cache. Killing
//! this process (SIGKILL) is a power cut: what no sync covered is gone, what a sync covered is
//! on disk.
//!
//! ```text
//! powercutfs BACKING MOUNTPOINT      # mounts, prints "mounted" when ready, serves until killed
//! ```
//!
//! With `POWERCUTFS_TRACE` set it prints each sync to stderr: the file, and how many pages and
//! what size it held.
//!
//! What it models, and what it does not:
//! - data writes and truncations are held until the file's next sync, page by page (4 KiB);
//!   a sync writes the file's held pages and size to `BACKING` and syncs them there;
//! - `sync_file_range` does not reach a FUSE file system, so it makes nothing durable (true of
//!   a real power cut too: it starts writeback, it flushes no disk cache and no metadata);
//! - names (create, mkdir, unlink, rename) change `BACKING` at once, as if every directory
//!   were synced after each change: a lost create or rename is not simulated;
//! - nothing is torn within a page, and the pages a sync covers all land (a real disk may
//!   tear a write that was in flight when the power went; no sync answered for it).
//!
//! Every open file bypasses the kernel's page cache (`FOPEN_DIRECT_IO`) and attributes are not
//! cached, so every read and write comes here. Needs root (it mounts with mount(2)) or
//! fusermount3. Test infrastructure only: used by tests/powercut.rs.

mod state;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fuser::consts::FOPEN_DIRECT_IO;
use fuser::{
    FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use state::{PAGE, PowerCutFs, TTL, backing_page, errno, statfs_of};

impl Filesystem for PowerCutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Some(rel) => self.entry(rel, reply),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if let (Some(mode), Some(path)) = (mode, self.real(ino))
            && let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(mode))
        {
            return reply.error(errno(&e));
        }
        if let Some(size) = size {
            // A truncation is held like a write: a handle is needed to apply it at the sync.
            let fh = match fh {
                Some(fh) if self.handles.contains_key(&fh) => fh,
                _ => match self.open_file(ino) {
                    Ok(fh) => fh,
                    Err(e) => return reply.error(errno(&e)),
                },
            };
            match self.held_for(ino, fh) {
                Ok(held) => {
                    held.size = size;
                    held.pages.retain(|n, _| n * PAGE < size);
                    // the tail of a cut page reads as zeros if the file grows again
                    if let Some(page) = held.pages.get_mut(&(size / PAGE)) {
                        page[(size % PAGE) as usize..].fill(0);
                    }
                }
                Err(e) => return reply.error(errno(&e)),
            }
        }
        match self.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let Some(rel) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        match fs::create_dir(self.backing.join(&rel)) {
            Ok(()) => {
                let _ = fs::set_permissions(self.backing.join(&rel), fs::Permissions::from_mode(mode));
                self.entry(rel, reply)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        match fs::remove_file(self.backing.join(&rel)) {
            Ok(()) => {
                if let Some(ino) = self.inos.get(&rel).copied() {
                    self.held.remove(&ino);
                }
                self.forget_path(&rel);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        match fs::remove_dir(self.backing.join(&rel)) {
            Ok(()) => {
                self.forget_path(&rel);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname)) else {
            return reply.error(libc::ENOENT);
        };
        if let Err(e) = fs::rename(self.backing.join(&from), self.backing.join(&to)) {
            return reply.error(errno(&e));
        }
        // The replaced file's inode is gone; every path under `from` moves under `to`.
        if let Some(old) = self.inos.get(&to).copied() {
            self.held.remove(&old);
        }
        self.forget_path(&to);
        let moved: Vec<(PathBuf, u64)> =
            self.inos.iter().filter(|(p, _)| p.starts_with(&from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (p, ino) in moved {
            let new = match p.strip_prefix(&from) {
                Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                _ => to.clone(),
            };
            self.inos.remove(&p);
            self.inos.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
        reply.ok()
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.open_file(ino) {
            Ok(fh) => reply.opened(fh, FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(rel) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        let made = OpenOptions::new().read(true).write(true).create(true).mode(mode).open(self.backing.join(&rel));
        let file = match made {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        let ino = self.ino_of(&rel);
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, file);
        match self.attr(ino) {
            Ok(a) => reply.created(&TTL, &a, 0, fh, FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(file) = self.handles.get(&fh) else { return reply.error(libc::EBADF) };
        let offset = offset.max(0) as u64;
        let (limit, on_disk) = match (self.held.get(&ino), file.metadata()) {
            (Some(h), Ok(m)) => (h.size, m.len().min(h.size)),
            (None, Ok(m)) => (m.len(), m.len()),
            (_, Err(e)) => return reply.error(errno(&e)),
        };
        let end = (offset + size as u64).min(limit);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let n = at / PAGE;
            let page = match self.held.get(&ino).and_then(|h| h.pages.get(&n)) {
                Some(p) => p.clone(),
                None => match backing_page(file, n, on_disk) {
                    Ok(p) => p,
                    Err(e) => return reply.error(errno(&e)),
                },
            };
            let from = (at - n * PAGE) as usize;
            let to = ((end - n * PAGE).min(PAGE)) as usize;
            out.extend_from_slice(&page[from..to]);
            at = n * PAGE + to as u64;
        }
        reply.data(&out)
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let offset = offset.max(0) as u64;
        let held = match self.held_for(ino, fh) {
            Ok(h) => h,
            Err(e) => return reply.error(errno(&e)),
        };
        // pages not held yet start as what the backing file has (as far as the held size)
        let limit = held.size;
        let mut at = offset;
        let end = offset + data.len() as u64;
        while at < end {
            let n = at / PAGE;
            if !held.pages.contains_key(&n) {
                let on_disk = held.file.metadata().map(|m| m.len().min(limit)).unwrap_or(0);
                match backing_page(&held.file, n, on_disk) {
                    Ok(p) => held.pages.insert(n, p),
                    Err(e) => return reply.error(errno(&e)),
                };
            }
            let from = (at - n * PAGE) as usize;
            let take = ((PAGE as usize) - from).min((end - at) as usize);
            let src = (at - offset) as usize;
            if let Some(page) = held.pages.get_mut(&n) {
                page[from..from + take].copy_from_slice(&data[src..src + take]);
            }
            at += take as u64;
        }
        held.size = held.size.max(end);
        reply.written(data.len() as u32)
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        // close() syncs nothing
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(&fh);
        reply.ok()
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        if std::env::var_os("POWERCUTFS_TRACE").is_some() {
            eprintln!(
                "fsync {ino} {:?} held {:?}",
                self.paths.get(&ino),
                self.held.get(&ino).map(|h| (h.pages.len(), h.size))
            );
        }
        match self.sync(ino) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let (Some(rel), Some(path)) = (self.paths.get(&ino).cloned(), self.real(ino)) else {
            return reply.error(libc::ENOENT);
        };
        let listing = match fs::read_dir(path) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut entries = vec![(ino, FileType::Directory, ".".into()), (1, FileType::Directory, "..".into())];
        for item in listing.flatten() {
            let kind = match item.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                _ => FileType::RegularFile,
            };
            let child = self.ino_of(&rel.join(item.file_name()));
            entries.push((child, kind, item.file_name()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        // names are durable at once (see the module documentation)
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        match statfs_of(&self.backing) {
            Some(s) => reply.statfs(s.0, s.1, s.2, s.3, s.4, s.5, 255, s.5),
            None => reply.error(libc::EIO),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(backing), Some(mountpoint)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: powercutfs BACKING MOUNTPOINT");
        std::process::exit(2);
    };
    let fs = PowerCutFs::new(PathBuf::from(backing));
    let options = [MountOption::FSName("powercutfs".into())];
    let session = match fuser::Session::new(fs, Path::new(mountpoint), &options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("powercutfs: cannot mount {mountpoint}: {e} (needs root, or fusermount3 from the fuse3 package)");
            std::process::exit(1);
        }
    };
    println!("mounted");
    let _ = std::io::stdout().flush();
    let mut session = session;
    if let Err(e) = session.run() {
        eprintln!("powercutfs: {e}");
        std::process::exit(1);
    }
}
