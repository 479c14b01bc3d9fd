//! Lock files: the server's ownership of a path and clients' slot leases.
//!
//! Both use `flock(2)`, which the kernel releases when the holder dies, so a crashed
//! server or client never leaves a lock behind. A lock file outlives a server killed with
//! SIGKILL, and the next server reuses it (the free flock says that its writer is gone), so
//! a file that is already there is not refused as such. What makes reuse safe:
//!
//! * `O_NOFOLLOW`: a symlink planted at the path is refused, never followed;
//! * a new file is created with `O_EXCL`, mode 0600;
//! * an existing one is `fstat`ed after opening and before anything is done with it: one
//!   that is not a regular file (a FIFO, a directory, ...) or that belongs to another user is
//!   refused and left exactly as it was (not locked, not written, not removed). Another user
//!   could otherwise hold a flock on it to block the server, or rewrite the pid in it.
//! * a server that takes the lock on a file of its own with another mode than 0600 sets 0600
//!   (`fchmod`): the file is ours, reuse is what stale lock files are for, and only our own
//!   user can have widened it. A client (which never changes the server's files) refuses a
//!   lease file that others may write to instead.
//! * a lock is kept only if, once taken, the path still names the file that was opened (same
//!   device and inode): a closing server removes its lock file by name, so a taker that
//!   opened the file just before would otherwise lock a file nobody else can find, while a
//!   third takes a new one at the path. Such a taker starts over on the path's file.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, IoContext, Result};
use crate::transport::check_private;

/// The mode of every lock file.
const LOCK_MODE: u32 = 0o600;

/// An exclusively held lock file.
#[derive(Debug)]
pub(crate) struct LockFile {
    file: File,
    path: PathBuf,
}

/// What a file type is, for an error message.
fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, kind: &str) -> Error {
    Error::Io {
        context: format!(
            "lock file {} is {kind}, not a regular file; refusing to use it",
            path.display()
        ),
        source: std::io::Error::from(ErrorKind::AlreadyExists),
    }
}

/// A lock file as [`open_lock`] opened it: the file, its metadata, and whether that call
/// created it.
type Opened = (File, Metadata, bool);

/// Open the lock file at `path` for reading and writing, creating it (`O_EXCL`, 0600) when
/// `create` and there is none, and check what was opened (see the module docs).
fn open_lock(path: &Path, create: bool) -> Result<Opened> {
    // O_NONBLOCK | O_NOCTTY: opening whatever was planted there never blocks and never
    // acquires a terminal; the file type is checked right after.
    let flags = OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    let open = |new: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create_new(new).mode(LOCK_MODE);
        o.custom_flags(flags.bits() as i32).open(path)
    };
    let mut tries = 0;
    let (file, created) = loop {
        let opened = if create {
            match open(true) {
                Ok(f) => Ok((f, true)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => open(false).map(|f| (f, false)),
                Err(e) => Err(e),
            }
        } else {
            open(false).map(|f| (f, false))
        };
        match opened {
            Ok(f) => break f,
            // Removed between the two opens (a server closing): look again.
            Err(e) if create && e.kind() == ErrorKind::NotFound && tries < 3 => tries += 1,
            // Opening a directory for writing, or a socket, fails before fstat could tell.
            Err(e) if e.raw_os_error() == Some(Errno::ISDIR.raw_os_error()) => {
                return Err(not_regular(path, "a directory"))
            }
            Err(e) if e.raw_os_error() == Some(Errno::NXIO.raw_os_error()) => {
                return Err(not_regular(path, "a socket"))
            }
            Err(e) => return Err(Error::io_path("cannot open lock file", path, e)),
        }
    };
    let md = file.metadata().at("cannot inspect lock file", path)?;
    if !md.file_type().is_file() {
        return Err(not_regular(path, kind_name(md.file_type())));
    }
    // The server fixes a wrong mode of its own file once it holds the lock; a client only
    // reads (the server's pid) or locks (its lease) and refuses a file others may write to.
    let forbidden = if create { 0 } else { 0o022 };
    check_private("lock file", path, &md, forbidden, "0600", "use it")?;
    Ok((file, md, created))
}

impl LockFile {
    /// Take the lock at `path` (creating the file when `create`), or `None` if another
    /// process holds it. A file that is not a regular file of this user is refused.
    pub fn try_acquire(path: &Path, create: bool) -> Result<Option<LockFile>> {
        Self::lock_opened(path, create, open_lock(path, create)?)
    }

    /// The second half of [`LockFile::try_acquire`]: lock the file `open_lock` opened, then
    /// make sure `path` still names it. A server's close removes its lock file by name, and a
    /// new one may have been created (and locked) at the path since we opened the old one: a
    /// lock on the old one would be a second owner nobody can see. Then start over on the
    /// path's new file.
    fn lock_opened(path: &Path, create: bool, mut opened: Opened) -> Result<Option<LockFile>> {
        let mut tries = 0;
        let (file, md) = loop {
            let (file, md, created) = opened;
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(Errno::WOULDBLOCK) => return Ok(None),
                Err(e) => {
                    if created {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(Error::io_path("cannot lock", path, e));
                }
            }
            match std::fs::symlink_metadata(path) {
                Ok(now) if now.dev() == md.dev() && now.ino() == md.ino() => break (file, md),
                // Removed (and maybe replaced) after we opened it: ours is not the lock file.
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io_path("cannot inspect lock file", path, e)),
            }
            drop(file);
            tries += 1;
            if tries > 16 {
                return Err(Error::Io {
                    context: format!(
                        "cannot lock {}: the file was removed or replaced each of the {tries} \
                         times we locked it; expected it to stay while we take it",
                        path.display()
                    ),
                    source: std::io::Error::from_raw_os_error(Errno::BUSY.raw_os_error()),
                });
            }
            opened = open_lock(path, create)?;
        };
        if create && md.mode() & 0o7777 != LOCK_MODE {
            // Ours (checked above) and now held by us: a stale lock file someone widened, or
            // one created under a umask that narrowed 0600.
            rustix::fs::fchmod(&file, Mode::from_raw_mode(LOCK_MODE))
                .at("cannot set mode of", path)?;
        }
        Ok(Some(LockFile {
            file,
            path: path.to_path_buf(),
        }))
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
    open_lock(path, false).ok()?.0.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Whether process `pid` is running. `pid` may come from a shared file: a value that is no
/// process id (0, or above `i32::MAX`, which `kill(2)` would take for a process group) is
/// not alive. A process that has exited but is not reaped yet (a zombie: SIGKILLed, its
/// parent not yet in `waitpid`) is not alive either: it holds no mapping, lease or lock any
/// more, and its parent may never reap it. `kill(pid, 0)` alone succeeds on a zombie, so a
/// pidfd tells: it is readable once the whole thread group has exited (a group leader that
/// called `pthread_exit` while other threads run shows state `Z` in `/proc` but is alive,
/// and its pidfd is not readable). Kernels without pidfds (before 5.3) fall back to `kill`.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => {
            let mut fds = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            let now = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            match rustix::event::poll(&mut fds, Some(&now)) {
                // Readable: the thread group has exited (a zombie at most).
                Ok(n) => n == 0,
                Err(_) => kill_alive(p),
            }
        }
        Err(Errno::SRCH) => false,
        // ENOSYS (an old kernel), EINVAL (a thread id, not a process), EMFILE, ...
        Err(_) => kill_alive(p),
    }
}

fn kill_alive(p: rustix::process::Pid) -> bool {
    match rustix::process::test_kill_process(p) {
        Ok(()) => true,
        Err(Errno::PERM) => true,
        Err(_) => false,
    }
}

/// A child that was SIGKILLed and has exited but is not reaped (a zombie), and its pid;
/// `wait()` on it reaps it.
#[cfg(test)]
pub(crate) fn spawn_zombie() -> (std::process::Child, u32) {
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    child.kill().expect("kill");
    // Wait for the exit without reaping it (WNOWAIT).
    let p = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::waitid(
        rustix::process::WaitId::Pid(p),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
    )
    .expect("waitid");
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_ok(),
        "still a zombie"
    );
    (child, pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("lstat").mode() & 0o7777
    }

    /// A stale lock file of our own (a server killed with SIGKILL leaves one) is reused: the
    /// same file, its mode set back to 0600, our pid written over the dead one.
    /// Issue 14: a SIGKILLed child that its parent has not reaped yet (a zombie) is gone for
    /// every liveness check; `kill(pid, 0)` alone called it alive until `waitpid`.
    #[test]
    fn a_zombie_is_not_alive() {
        assert!(pid_alive(std::process::id()));
        let (mut child, pid) = spawn_zombie();
        assert!(!pid_alive(pid), "a zombie counted as alive");
        child.wait().expect("reap");
        assert!(!pid_alive(pid));
    }

    #[test]
    fn a_stale_lock_file_of_our_own_is_reused_and_narrowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ep.lock");
        std::fs::write(&p, "999999999\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let ino = std::fs::metadata(&p).expect("stat").ino();
        let mut lock = LockFile::try_acquire(&p, true)
            .expect("reuse")
            .expect("not held");
        lock.write_pid().expect("write pid");
        assert_eq!(std::fs::metadata(&p).expect("stat").ino(), ino);
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(read_pid(&p), Some(std::process::id()));
        // Held: a second taker gets None, and a client reads the pid.
        assert!(LockFile::try_acquire(&p, true).expect("open").is_none());
    }

    /// A new lock file is created 0600, whatever the umask.
    #[test]
    fn a_new_lock_file_is_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("new.lock");
        let lock = LockFile::try_acquire(&p, true).expect("create");
        assert!(lock.is_some());
        assert_eq!(mode_of(&p), 0o600);
    }

    /// What is not a regular file is refused, whoever wants it, and left as it was.
    #[test]
    fn a_lock_file_that_is_no_regular_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo.lock");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_raw_mode(0o600)).expect("fifo");
        let sub = dir.path().join("dir.lock");
        std::fs::create_dir(&sub).expect("mkdir");
        let target = dir.path().join("victim");
        std::fs::write(&target, "precious").expect("write");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let link = dir.path().join("link.lock");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let sock = dir.path().join("sock.lock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        for (p, text) in [
            (&fifo, "is a FIFO, not a regular file"),
            (&sub, "is a directory, not a regular file"),
            (&sock, "is a socket, not a regular file"),
            (&link, "symbolic links"),
        ] {
            for create in [true, false] {
                let e = LockFile::try_acquire(p, create).expect_err("refused");
                assert!(e.to_string().contains(text), "{}: {e}", p.display());
            }
            assert_eq!(read_pid(p), None);
        }
        assert!(std::fs::symlink_metadata(&fifo)
            .expect("fifo stays")
            .file_type()
            .is_fifo());
        assert!(sub.is_dir());
        assert_eq!(std::fs::read_link(&link).expect("link stays"), target);
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "precious");
        assert_eq!(mode_of(&target), 0o644);
    }

    /// A server's close removes its lock file by name. A taker that opened the file just
    /// before (A), and locks it just after, while a third (C) has created and locked a new file
    /// at the path, must not hold a lock too: A's would be on a file nobody else can find.
    #[test]
    fn a_lock_on_a_file_removed_after_it_was_opened_is_not_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ep.lock");
        let b = LockFile::try_acquire(&p, true)
            .expect("B")
            .expect("B locks");
        let opened = open_lock(&p, true).expect("A opens");
        std::fs::remove_file(&p).expect("B's close removes the file");
        drop(b);
        let c = LockFile::try_acquire(&p, true)
            .expect("C")
            .expect("C locks");
        let a = LockFile::lock_opened(&p, true, opened).expect("A");
        assert!(a.is_none(), "A and C both hold a lock on {}", p.display());
        drop(c);
        // With C gone, the path's file is free: A's second try takes it.
        let opened = open_lock(&p, true).expect("A opens");
        std::fs::remove_file(&p).expect("removed");
        let a = LockFile::lock_opened(&p, true, opened)
            .expect("A")
            .expect("A locks");
        assert_eq!(
            std::fs::metadata(a.path()).expect("stat").ino(),
            a.file.metadata().expect("fstat").ino(),
            "A holds a lock on a file the path no longer names"
        );
    }

    /// A client (which never changes the server's files) refuses a lease file that others
    /// may write to, and leaves its mode alone.
    #[test]
    fn a_client_refuses_a_lock_file_others_may_write_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("slot0.lock");
        std::fs::write(&p, "").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o622)).expect("chmod");
        let e = LockFile::try_acquire(&p, false).expect_err("refused");
        assert!(matches!(e, Error::Role(_)), "{e}");
        assert!(
            e.to_string().contains(&format!(
                "lock file {} has mode 0622: other users may write to it (expected 0600)",
                p.display()
            )),
            "{e}"
        );
        assert_eq!(mode_of(&p), 0o622);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(LockFile::try_acquire(&p, false).expect("lease").is_some());
    }
}
