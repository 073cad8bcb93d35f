//! A power cut under the spool: examples/powercutfs.rs serves a backing directory through
//! FUSE and holds every write in memory until the file is synced. Killing it loses what no
//! sync covered, as a power cut would; the backing directory keeps the rest.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/examples/powercutfs`, beside the mailgate binary under test. `cargo test`
/// builds examples only as test harnesses, so it is built here when missing (`make test`
/// builds it first).
fn powercutfs() -> PathBuf {
    let bin = Path::new(super::bin());
    let exe = bin.parent().map(|d| d.join("examples").join("powercutfs")).unwrap_or_default();
    if !exe.exists() {
        let release = bin.parent().and_then(|d| d.file_name()).is_some_and(|n| n == "release");
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--example", "powercutfs"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            build.arg("--release");
        }
        let built = build.status().is_ok_and(|s| s.success());
        assert!(
            built && exe.exists(),
            "{} is missing and `cargo build --example powercutfs` did not make it",
            exe.display()
        );
    }
    exe
}

/// A mounted powercutfs. Dropping it cuts the power too.
pub struct PowerCutFs {
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl PowerCutFs {
    /// Mounts `backing` at `mountpoint` (both must exist) and waits until it serves.
    pub fn mount(backing: &Path, mountpoint: &Path) -> PowerCutFs {
        let mut child = Command::new(powercutfs())
            .arg(backing)
            .arg(mountpoint)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start powercutfs");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "mounted" {
            let _ = child.kill();
            let out = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            panic!(
                "powercutfs did not mount {}: {}\nThe power-cut test needs FUSE: /dev/fuse, and root or \
                 fusermount3 (apt-get install fuse3).",
                mountpoint.display(),
                out.unwrap_or_default()
            );
        }
        let fs = PowerCutFs { child: Some(child), mountpoint: mountpoint.to_path_buf() };
        // the kernel answers for the mount only once the daemon reads requests
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(mountpoint).is_err() {
            assert!(Instant::now() < deadline, "{} does not answer", mountpoint.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        fs
    }

    /// The power cut: the file system's process is killed (what it held is gone) and the
    /// mount is detached. Processes using it get errors from then on.
    pub fn cut(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = child.kill();
        let _ = child.wait();
        let detached = Command::new("umount").arg("-l").arg(&self.mountpoint).stderr(Stdio::null()).status();
        if !detached.is_ok_and(|s| s.success()) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.mountpoint).stderr(Stdio::null()).status();
        }
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        self.cut();
    }
}
