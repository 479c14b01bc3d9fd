//! Lock files: the server's ownership of a path and clients' slot leases.
//!
//! Both use `flock(2)`, which the kernel releases when the holder dies, so a crashed
//! server or client never leaves a lock behind. Files are created 0600 with `O_NOFOLLOW`
//! so a planted symlink cannot redirect them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

use crate::error::{Error, IoContext, Result};

/// An exclusively held lock file.
#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
    path: PathBuf,
}

fn open_lock(path: &Path, create: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    if create {
        o.create(true);
    }
    o.custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32)
        .open(path)
        .at("cannot open lock file", path)
}

impl LockFile {
    /// Take the lock at `path` (creating the file), or `None` if another process holds it.
    pub fn try_acquire(path: &Path, create: bool) -> Result<Option<LockFile>> {
        let file = open_lock(path, create)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(LockFile {
                file,
                path: path.to_path_buf(),
            })),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io_path("cannot lock", path, e)),
        }
    }

    /// Record our pid in the file (read by clients to check the server is alive).
    pub fn write_pid(&mut self) -> Result<()> {
        let pid = std::process::id();
        self.file.set_len(0).at("cannot write", &self.path)?;
        self.file
            .seek(SeekFrom::Start(0))
            .at("cannot write", &self.path)?;
        self.file
            .write_all(format!("{pid}\n").as_bytes())
            .at("cannot write", &self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid recorded in a server lock file, if readable.
pub(crate) fn read_pid(path: &Path) -> Option<u32> {
    let mut s = String::new();
    open_lock(path, false).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Whether process `pid` exists. `pid` may come from a shared file: a value that is no
/// process id (0, or above `i32::MAX`, which `kill(2)` would take for a process group) is
/// not alive.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(p) {
        Ok(()) => true,
        Err(Errno::PERM) => true,
        Err(_) => false,
    }
}
