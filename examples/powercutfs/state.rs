//! The power-cut file system's state: which inode is which path, open handles, and the data
//! each file holds until its next sync (main.rs has the file system operations).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, ReplyEntry};

pub(crate) const PAGE: u64 = 4096;
pub(crate) const TTL: Duration = Duration::ZERO;

/// A file's data not yet synced: whole pages, and the size the file has now.
pub(crate) struct Held {
    pub(crate) pages: BTreeMap<u64, Vec<u8>>,
    pub(crate) size: u64,
    /// A handle on the backing file, to write the pages to at the sync.
    pub(crate) file: File,
}

pub(crate) struct PowerCutFs {
    pub(crate) backing: PathBuf,
    /// Inode numbers and the paths (relative to `backing`) they name now. 1 is the root.
    pub(crate) paths: HashMap<u64, PathBuf>,
    pub(crate) inos: HashMap<PathBuf, u64>,
    pub(crate) next_ino: u64,
    pub(crate) handles: HashMap<u64, File>,
    pub(crate) next_fh: u64,
    pub(crate) held: HashMap<u64, Held>,
}

pub(crate) fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl PowerCutFs {
    pub(crate) fn new(backing: PathBuf) -> Self {
        let mut fs = PowerCutFs {
            backing,
            paths: HashMap::new(),
            inos: HashMap::new(),
            next_ino: 2,
            handles: HashMap::new(),
            next_fh: 1,
            held: HashMap::new(),
        };
        fs.paths.insert(1, PathBuf::new());
        fs.inos.insert(PathBuf::new(), 1);
        fs
    }

    pub(crate) fn real(&self, ino: u64) -> Option<PathBuf> {
        self.paths.get(&ino).map(|p| self.backing.join(p))
    }

    pub(crate) fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.paths.get(&parent).map(|p| p.join(name))
    }

    pub(crate) fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(ino) = self.inos.get(rel) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, rel.to_path_buf());
        self.inos.insert(rel.to_path_buf(), ino);
        ino
    }

    pub(crate) fn attr(&self, ino: u64) -> std::io::Result<FileAttr> {
        let path = self.real(ino).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
        let m = fs::symlink_metadata(path)?;
        let kind = if m.is_dir() { FileType::Directory } else { FileType::RegularFile };
        let size = self.held.get(&ino).map(|h| h.size).unwrap_or(m.len());
        let time = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.clamp(0, 999_999_999) as u32);
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm: (m.permissions().mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    pub(crate) fn entry(&mut self, rel: PathBuf, reply: ReplyEntry) {
        let ino = self.ino_of(&rel);
        match self.attr(ino) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => {
                self.forget_path(&rel);
                reply.error(errno(&e))
            }
        }
    }

    pub(crate) fn forget_path(&mut self, rel: &Path) {
        if let Some(ino) = self.inos.remove(rel) {
            self.paths.remove(&ino);
        }
    }

    pub(crate) fn open_file(&mut self, ino: u64) -> std::io::Result<u64> {
        let path = self.real(ino).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
        let file = OpenOptions::new().read(true).write(true).open(&path).or_else(|_| File::open(&path))?;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, file);
        Ok(fh)
    }

    /// The held state of `ino`, made from its backing file on the first write.
    pub(crate) fn held_for(&mut self, ino: u64, fh: u64) -> std::io::Result<&mut Held> {
        if !self.held.contains_key(&ino) {
            let file = self.handles.get(&fh).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))?;
            let size = file.metadata()?.len();
            self.held.insert(ino, Held { pages: BTreeMap::new(), size, file: file.try_clone()? });
        }
        self.held.get_mut(&ino).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EIO))
    }

    /// Writes `ino`'s held pages and size to its backing file and syncs it: the only way data
    /// gets there.
    pub(crate) fn sync(&mut self, ino: u64) -> std::io::Result<()> {
        let Some(held) = self.held.remove(&ino) else { return Ok(()) };
        for (n, page) in &held.pages {
            let at = n * PAGE;
            if at >= held.size {
                break;
            }
            let len = (held.size - at).min(PAGE) as usize;
            held.file.write_all_at(&page[..len], at)?;
        }
        held.file.set_len(held.size)?;
        held.file.sync_all()
    }
}

/// One page of the backing file, zeros past its end.
pub(crate) fn backing_page(file: &File, n: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut page = vec![0u8; PAGE as usize];
    let at = n * PAGE;
    if at < limit {
        let want = (limit - at).min(PAGE) as usize;
        let mut got = 0;
        while got < want {
            let k = file.read_at(&mut page[got..want], at + got as u64)?;
            if k == 0 {
                break;
            }
            got += k;
        }
    }
    Ok(page)
}

/// blocks, free, available, files, free files, block size of the backing file system.
pub(crate) fn statfs_of(path: &Path) -> Option<(u64, u64, u64, u64, u64, u32)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some((s.blocks(), s.blocks_free(), s.blocks_available(), s.files(), s.files_free(), s.fragment_size() as u32))
}
