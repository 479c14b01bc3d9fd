//! Named-pipe (FIFO) transport.
//!
//! The server owns a directory (mode 0700) holding, for each slot `i`, a request FIFO
//! `slot<i>.req`, a response FIFO `slot<i>.resp` (both 0600) and a lease file
//! `slot<i>.lock`, plus `server.lock`, which the server holds locked for its lifetime and
//! which records its pid.
//!
//! A client leases a slot by taking `slot<i>.lock` with `flock` (released by the kernel
//! when the client dies), opens the response FIFO for reading and the request FIFO for
//! writing, and sends a HELLO; the server then opens the response FIFO for writing and
//! acknowledges. From then on the slot carries framed requests and responses.
//!
//! * A client that goes away closes its end: the server sees end-of-file, drops any
//!   half-received frame and readies the slot for the next client.
//! * A server that goes away closes the response FIFO: the client sees a hang-up. As a
//!   backstop, waiting clients also check the pid in `server.lock`.
//! * Bytes that are not a valid frame make the server recreate that slot's FIFOs, so a
//!   partial frame of a killed client can never be read as part of the next one.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{Mode, OFlags, CWD};

use crate::error::{Error, IoContext, Result};
use crate::frame::{control, Kind, Limits, Meta, TensorRef};
use crate::transport::access::Owner;
use crate::transport::lock::{pid_alive, read_pid, LockFile};
use crate::transport::stream::{
    self, poll_readable, ClientStream, Flush, Incoming, ReadStatus, Session,
};
use crate::transport::{
    check_private, check_slot, not_yet, parse_hello_ack, poll_fds, retry_until_up,
    slot_out_of_range, ClientEndpoint, Deadline, Interrupt, Message, ServerEndpoint,
    HANDSHAKE_LIMITS,
};
use crate::transport::{wait_fds, Retry};

/// Kernel buffer asked for each FIFO (the default is 64 KiB; Linux caps unprivileged
/// requests at /proc/sys/fs/pipe-max-size, 1 MiB by default).
const PIPE_SIZE: usize = 256 << 10;

fn req_path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("slot{slot}.req"))
}
fn resp_path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("slot{slot}.resp"))
}
fn lease_path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("slot{slot}.lock"))
}
fn server_lock_path(dir: &Path) -> PathBuf {
    dir.join("server.lock")
}

fn open_fifo(path: &Path, write: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    if write {
        o.write(true);
    } else {
        o.read(true);
    }
    o.custom_flags((OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC).bits() as i32)
        .open(path)
        .and_then(|f| {
            // Only ever talk through a real FIFO, never a file planted at the path.
            if f.metadata()?.file_type().is_fifo() {
                Ok(f)
            } else {
                Err(std::io::Error::new(ErrorKind::InvalidData, "not a FIFO"))
            }
        })
}

/// A client's check of the pipe directory `dir` (one `lstat`): a real directory (not a
/// symbolic link), owned by this user, and, with `forbidden = Some(0o077)`, closed to
/// everybody else. Returns its metadata. No directory yet is [`Retry::NotYet`] (a server
/// may still come).
fn check_pipe_dir(dir: &Path, forbidden: Option<u32>) -> Result<std::fs::Metadata, Retry> {
    let md = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return not_yet(format!("no server is running on {}", dir.display()))
        }
        Err(e) => return Err(Error::io_path("cannot inspect", dir, e).into()),
    };
    if !md.is_dir() {
        let kind = if md.file_type().is_symlink() {
            "a symbolic link"
        } else {
            "not a directory"
        };
        return Err(Error::Protocol(format!(
            "{} is not a SensAI pipe directory: it is {kind}; refusing to connect",
            dir.display()
        ))
        .into());
    }
    check_private(
        "pipe directory",
        dir,
        &md,
        forbidden.unwrap_or(0),
        "0700",
        "connect",
    )?;
    Ok(md)
}

/// A client's check of a FIFO it opened (one `fstat`): the server's own, which nobody else
/// may use (the server makes them 0600).
fn check_fifo(f: &File, path: &Path) -> Result<()> {
    let md = f.metadata().at("cannot inspect", path)?;
    check_private("FIFO", path, &md, 0o077, "0600", "connect")
}

/// Whether `path` still names the file `f` was opened from (same device and inode). The
/// server replaces a slot's FIFOs by unlinking them and making new ones at the same paths.
fn still_names(path: &Path, f: &File) -> bool {
    match (std::fs::symlink_metadata(path), f.metadata()) {
        (Ok(p), Ok(o)) => p.dev() == o.dev() && p.ino() == o.ino(),
        _ => false,
    }
}

fn make_fifo(path: &Path) -> Result<()> {
    rustix::fs::mkfifoat(CWD, path, Mode::from_raw_mode(0o600)).at("cannot create FIFO", path)?;
    // mkfifo applies the umask; make the mode exactly 0600 regardless.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .at("cannot set mode of", path)
}

struct Slot {
    req: File,
    resp: Option<File>,
    /// The client closed its request FIFO but may still read its response FIFO: the session
    /// answers what it sent in full, then ends (replacing the FIFOs if the end of file cut a
    /// frame short).
    session: Session,
    connected: bool,
    /// Bumped whenever the slot's session (or its file descriptors) changes, so that a poll
    /// event of the previous session is not applied to the next one.
    generation: u64,
}

/// The server endpoint of the named-pipe transport.
pub struct FifoServer {
    dir: PathBuf,
    limits: Limits,
    slots: Vec<Slot>,
    lock: Option<LockFile>,
    created_dir: bool,
    closed: bool,
    owner: Owner,
}

impl FifoServer {
    /// Create the pipe directory `dir` with `num_slots` slots.
    pub fn bind(dir: impl AsRef<Path>, num_slots: usize, limits: Limits) -> Result<FifoServer> {
        let dir = dir.as_ref().to_path_buf();
        if num_slots == 0 || num_slots > 4096 {
            return Err(Error::InvalidArgument(format!(
                "num_slots must be in 1..=4096, got {num_slots}"
            )));
        }
        let created_dir = match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let m = std::fs::symlink_metadata(&dir).at("cannot inspect", &dir)?;
                if !m.is_dir() {
                    return Err(Error::Io {
                        context: format!(
                            "cannot serve on {}: the path exists and is not a directory",
                            dir.display()
                        ),
                        source: std::io::Error::from(ErrorKind::AlreadyExists),
                    });
                }
                if m.uid() != rustix::process::geteuid().as_raw() {
                    return Err(Error::Io {
                        context: format!(
                            "cannot serve on {}: the directory belongs to another user",
                            dir.display()
                        ),
                        source: std::io::Error::from(ErrorKind::PermissionDenied),
                    });
                }
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .at("cannot set mode of", &dir)?;
                false
            }
            Err(e) => return Err(Error::io_path("cannot create pipe directory", &dir, e)),
        };
        let lock_p = server_lock_path(&dir);
        let lock = match LockFile::try_acquire(&lock_p, true) {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Err(Error::AddressInUse(format!(
                    "cannot serve on {}: another server is running there (it holds {})",
                    dir.display(),
                    lock_p.display()
                )))
            }
            Err(e) => {
                if created_dir {
                    let _ = std::fs::remove_dir(&dir);
                }
                return Err(e);
            }
        };
        let mut srv = FifoServer {
            dir,
            limits,
            slots: Vec::with_capacity(num_slots),
            lock: Some(lock),
            created_dir,
            closed: false,
            owner: Owner::here(),
        };
        match srv.setup(num_slots) {
            Ok(()) => Ok(srv),
            Err(e) => {
                srv.close();
                Err(e)
            }
        }
    }

    fn setup(&mut self, num_slots: usize) -> Result<()> {
        if let Some(l) = self.lock.as_mut() {
            l.write_pid()?;
        }
        // Files of a dead server on this directory are replaced.
        self.remove_slot_files(4096.max(num_slots));
        for i in 0..num_slots {
            self.slots.push(self.create_slot(i)?);
        }
        Ok(())
    }

    fn create_slot(&self, i: usize) -> Result<Slot> {
        let (rq, rs) = (req_path(&self.dir, i), resp_path(&self.dir, i));
        make_fifo(&rq)?;
        make_fifo(&rs)?;
        let lease = lease_path(&self.dir, i);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(&lease)
            .at("cannot create", &lease)?;
        let req = open_fifo(&rq, false).at("cannot open", &rq)?;
        let _ = rustix::pipe::fcntl_setpipe_size(&req, PIPE_SIZE);
        Ok(Slot {
            req,
            resp: None,
            session: Session::new(),
            connected: false,
            generation: 0,
        })
    }

    fn what_server(&self) -> String {
        format!("the server at {}", self.dir.display())
    }

    fn remove_slot_files(&self, upto: usize) {
        for i in 0..upto {
            let a = std::fs::remove_file(req_path(&self.dir, i)).is_ok();
            let b = std::fs::remove_file(resp_path(&self.dir, i)).is_ok();
            let c = std::fs::remove_file(lease_path(&self.dir, i)).is_ok();
            if !(a || b || c) && i >= self.slots.len() {
                break;
            }
        }
    }

    /// Forget the slot's session. With `recreate`, replace its FIFOs by new ones so that no
    /// stray bytes of the old session can be read as part of the next.
    fn reset_slot(&mut self, i: usize, recreate: bool) -> Result<()> {
        let dir = self.dir.clone();
        let s = &mut self.slots[i];
        s.resp = None;
        s.session = Session::new();
        s.connected = false;
        s.generation += 1;
        let (rq, rs) = (req_path(&dir, i), resp_path(&dir, i));
        if recreate {
            let _ = std::fs::remove_file(&rq);
            let _ = std::fs::remove_file(&rs);
            make_fifo(&rq)?;
            make_fifo(&rs)?;
        }
        // A fresh read end: the old one keeps reporting hang-up once its writer is gone.
        let req = open_fifo(&rq, false).at("cannot open", &rq)?;
        let _ = rustix::pipe::fcntl_setpipe_size(&req, PIPE_SIZE);
        s.req = req;
        Ok(())
    }

    fn handshake(&mut self, i: usize, msg: Message) -> Result<()> {
        let m = *msg.meta();
        if m.kind != Kind::Control || m.app_tag != control::HELLO || m.app_value != i as u64 {
            return self.reset_slot(i, true);
        }
        // A new session on this slot (its previous client may have died unnoticed).
        let rs = resp_path(&self.dir, i);
        let resp = match open_fifo(&rs, true) {
            Ok(f) => f,
            // ENXIO: the client already closed its read end; wait for the next one.
            Err(_) => return self.reset_slot(i, false),
        };
        let _ = rustix::pipe::fcntl_setpipe_size(&resp, PIPE_SIZE);
        let (limits, num_slots) = (self.limits, self.slots.len());
        let s = &mut self.slots[i];
        let resp = s.resp.insert(resp);
        s.connected = true;
        s.generation += 1;
        if let Flush::PeerGone = s
            .session
            .ack_hello(resp, m.request_id, i, num_slots, limits)?
        {
            return self.reset_slot(i, false);
        }
        Ok(())
    }

    fn service(&mut self, i: usize, readable: bool, writable: bool) -> Result<()> {
        if writable {
            let s = &mut self.slots[i];
            if let Some(resp) = s.resp.as_mut() {
                if s.session.flush(resp)? == Flush::PeerGone {
                    return self.reset_slot(i, false);
                }
            }
            self.close_if_answered(i)?;
        }
        if !readable || self.slots[i].session.is_read_closed() {
            return Ok(());
        }
        loop {
            let s = &mut self.slots[i];
            let connected = s.connected;
            // A HELLO on a connected slot opens a new session: its previous client may have
            // died unnoticed.
            let is_handshake =
                |m: &Meta| !connected || (m.kind == Kind::Control && m.app_tag == control::HELLO);
            match s.session.read(&mut s.req, i as u32, is_handshake)? {
                Incoming::Handshake(msg) => self.handshake(i, msg)?,
                Incoming::Idle => return Ok(()),
                Incoming::Eof { partial } => {
                    // The client closed its end (or died): end the session, unless it still
                    // reads the answers owed to requests it sent in full (or the rest of
                    // answers already queued).
                    let reading = s
                        .resp
                        .as_ref()
                        .is_some_and(|r| !stream::peer_cannot_read(r));
                    if s.connected && s.session.end_of_requests(partial, reading) {
                        return Ok(());
                    }
                    return self.reset_slot(i, partial);
                }
                Incoming::Malformed(e) => {
                    // Tell the client if we can, then start the slot over on new FIFOs.
                    s.session.refuse_malformed(s.resp.as_mut(), i as u32, &e);
                    return self.reset_slot(i, true);
                }
            }
        }
    }

    fn pump(&mut self, wait: Duration) -> Result<()> {
        let events = self.poll_events(wait)?;
        self.apply_events(&events)
    }

    /// Poll every slot's FIFOs: `(slot, is_request_fifo, session generation, events)`.
    fn poll_events(&mut self, wait: Duration) -> Result<Vec<(usize, bool, u64, PollFlags)>> {
        if self.closed {
            return Err(Error::Closed);
        }
        let mut fds = Vec::with_capacity(2 * self.slots.len());
        let mut owners = Vec::with_capacity(2 * self.slots.len());
        for (i, s) in self.slots.iter().enumerate() {
            // A request FIFO without a writer reports a hang-up to every poll: leave it out
            // once the client closed it.
            if s.session.wants_read() {
                fds.push(PollFd::new(&s.req, PollFlags::IN));
                owners.push((i, true, s.generation));
            }
            if let Some(resp) = &s.resp {
                let ev = if s.session.wants_write() {
                    PollFlags::OUT
                } else {
                    PollFlags::empty()
                };
                fds.push(PollFd::new(resp, ev));
                owners.push((i, false, s.generation));
            }
        }
        poll_fds(&mut fds, wait)?;
        Ok(owners
            .into_iter()
            .zip(fds.iter().map(|f| f.revents()))
            .filter(|(_, ev)| !ev.is_empty())
            .map(|((i, is_req, generation), ev)| (i, is_req, generation, ev))
            .collect())
    }

    /// Act on polled events, in order. Handling one event can end a session and start the
    /// next (a hello read from the request FIFO), so each event is checked against the
    /// session it was polled in.
    fn apply_events(&mut self, events: &[(usize, bool, u64, PollFlags)]) -> Result<()> {
        for &(i, is_req, generation, ev) in events {
            if self.slots[i].generation != generation {
                // Polled in a session that has since ended: a hang-up of the previous client's
                // response FIFO must not end the session a new client just opened.
                continue;
            }
            if is_req {
                self.service(i, true, false)?;
            } else if ev.intersects(PollFlags::ERR | PollFlags::HUP) && !ev.contains(PollFlags::OUT)
            {
                // The client closed its read end: its session is over.
                self.reset_slot(i, false)?;
            } else {
                self.service(i, false, true)?;
            }
        }
        Ok(())
    }

    /// End the session of a client that closed its request FIFO once its last answer is sent.
    fn close_if_answered(&mut self, i: usize) -> Result<()> {
        match self.slots[i].session.finished() {
            Some(recreate) => self.reset_slot(i, recreate),
            None => Ok(()),
        }
    }

    fn ready_slots(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].session.has_pending())
            .collect()
    }
}

impl ServerEndpoint for FifoServer {
    fn num_slots(&self) -> usize {
        self.slots.len()
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn wait_any(
        &mut self,
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<Vec<usize>> {
        self.owner.check(|| self.what_server())?;
        let what = format!("waiting for requests on {}", self.dir.display());
        stream::wait_any(timeout, interrupt, &what, |wait| {
            self.pump(wait)?;
            Ok(self.ready_slots())
        })
    }

    fn is_ready_slot(&mut self, slot: usize) -> Result<bool> {
        self.owner.check(|| self.what_server())?;
        check_slot(slot, self.slots.len(), &self.dir)?;
        if !self.slots[slot].session.has_pending() {
            self.pump(Duration::ZERO)?;
        }
        Ok(self.slots[slot].session.has_pending())
    }

    fn recv(&mut self, slot: usize) -> Result<Option<Message>> {
        self.owner.check(|| self.what_server())?;
        check_slot(slot, self.slots.len(), &self.dir)?;
        if !self.slots[slot].session.has_pending() {
            self.pump(Duration::ZERO)?;
        }
        Ok(self.slots[slot].session.take())
    }

    fn send(&mut self, slot: usize, meta: Meta, tensors: &[TensorRef<'_>]) -> Result<()> {
        self.owner.check(|| self.what_server())?;
        check_slot(slot, self.slots.len(), &self.dir)?;
        let limits = self.limits;
        let s = &mut self.slots[slot];
        let resp = match (&mut s.resp, s.connected) {
            (Some(r), true) => r,
            _ => return Err(stream::no_client(slot, &self.dir)),
        };
        match s
            .session
            .send(resp, slot, meta, tensors, &limits, &self.dir)?
        {
            Flush::PeerGone => {
                self.reset_slot(slot, false)?;
                Err(stream::went_away(slot, &self.dir))
            }
            _ => self.close_if_answered(slot),
        }
    }

    fn send_error(&mut self, slot: usize, code: u32, message: &str) -> Result<()> {
        self.owner.check(|| self.what_server())?;
        check_slot(slot, self.slots.len(), &self.dir)?;
        let s = &mut self.slots[slot];
        let Some(resp) = s.resp.as_mut() else {
            return Err(stream::no_client(slot, &self.dir));
        };
        if s.session.send_error(resp, slot, code, message)? == Flush::PeerGone {
            return self.reset_slot(slot, false);
        }
        self.close_if_answered(slot)
    }

    fn is_connected(&self, slot: usize) -> bool {
        slot < self.slots.len() && self.slots[slot].connected
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if !self.owner.is_here() {
            // A forked child's copy: the directory, FIFOs and lock files are the parent's.
            self.slots.clear();
            self.lock = None;
            return;
        }
        // Slot n is the one a failed start may have left half-made (some of its files).
        let n = self.slots.len();
        self.slots.clear();
        self.remove_slot_files(n + 1);
        if let Some(lock) = self.lock.take() {
            let _ = std::fs::remove_file(lock.path());
        }
        if self.created_dir
            || std::fs::read_dir(&self.dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
        {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

impl Drop for FifoServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// The liveness check of a waiting client: the server process `pid` still runs. (A FIFO
/// shows a hang-up only once a writer has come and gone, so a wait also asks this.)
fn server_liveness(pid: u32) -> impl FnMut() -> Result<()> {
    move || {
        if pid_alive(pid) {
            Ok(())
        } else {
            Err(Error::PeerGone(format!(
                "the server (pid {pid}) has exited"
            )))
        }
    }
}

/// The client endpoint of the named-pipe transport.
pub struct FifoClient {
    dir: PathBuf,
    req: Option<File>,
    resp: Option<File>,
    _lease: Option<LockFile>,
    conn: ClientStream,
    server_pid: u32,
    owner: Owner,
}

impl FifoClient {
    /// Lease `slot` (or any free slot) of the server whose pipe directory is `dir`, waiting
    /// up to `connect_timeout` for a server that is still starting.
    pub fn connect(
        dir: impl AsRef<Path>,
        slot: Option<usize>,
        connect_timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<FifoClient> {
        let dir = dir.as_ref().to_path_buf();
        let deadline = Deadline::after(connect_timeout);
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        retry_until_up(&[&parent, &dir], &deadline, interrupt, |interrupt| {
            Self::try_connect(&dir, slot, &deadline, interrupt)
        })
    }

    fn try_connect(
        dir: &Path,
        slot: Option<usize>,
        deadline: &Deadline,
        interrupt: Interrupt<'_>,
    ) -> Result<FifoClient, Retry> {
        // The pipe directory is the gate to every file of the server: it must be a real
        // directory of ours (another user's is refused now, not after the connect timeout).
        let md = check_pipe_dir(dir, None)?;
        // A directory we may not enter belongs to another user: say so now, not after the
        // connect timeout.
        if let Err(e) = std::fs::metadata(server_lock_path(dir)) {
            if e.kind() == ErrorKind::PermissionDenied {
                return Err(Error::io_path("cannot reach the server at", dir, e).into());
            }
        }
        let Some(server_pid) = read_pid(&server_lock_path(dir)).filter(|p| pid_alive(*p)) else {
            return not_yet(format!("no server is running on {}", dir.display()));
        };
        // ... and nobody else may use it. Checked once a server runs there: a server that
        // reuses an existing directory narrows its mode to 0700 before it writes its pid, so a
        // client that came first keeps waiting rather than refusing that directory.
        if md.mode() & 0o077 != 0 {
            check_pipe_dir(dir, Some(0o077))?;
        }
        let (slot, lease) = match slot {
            Some(s) => {
                let p = lease_path(dir, s);
                if !p.exists() {
                    // The server made one lease file per slot, numbered from 0.
                    let n = (0..s).find(|&i| !lease_path(dir, i).exists()).unwrap_or(s);
                    return Err(slot_out_of_range(s, Some(n), dir).into());
                }
                match LockFile::try_acquire(&p, false)? {
                    Some(l) => (s, l),
                    None => {
                        return Err(Error::Capacity(format!(
                            "slot {s} of the server at {} is in use by another client",
                            dir.display()
                        ))
                        .into())
                    }
                }
            }
            None => {
                let mut i = 0;
                loop {
                    let p = lease_path(dir, i);
                    if !p.exists() {
                        return Err(Error::Capacity(format!(
                            "all {i} slots of the server at {} are in use",
                            dir.display()
                        ))
                        .into());
                    }
                    if let Some(l) = LockFile::try_acquire(&p, false)? {
                        break (i, l);
                    }
                    i += 1;
                }
            }
        };
        let (rq, rs) = (req_path(dir, slot), resp_path(dir, slot));
        let gone = |e: std::io::Error, p: &Path| {
            Retry::NotYet(Error::PeerGone(format!("cannot open {}: {e}", p.display())))
        };
        let resp = open_fifo(&rs, false).map_err(|e| gone(e, &rs))?;
        check_fifo(&resp, &rs)?;
        // ENXIO here means no server holds the read end.
        let req = open_fifo(&rq, true).map_err(|e| gone(e, &rq))?;
        check_fifo(&req, &rq)?;
        // The server replaces a slot's FIFOs after a bad frame (unlink both, make both, open
        // the new request FIFO). A replacement between our two opens leaves us holding the old
        // response FIFO, which nobody will ever write to: start over. One after both opens
        // closes the server's read end of the request FIFO we hold, which the wait for the
        // acknowledgement below notices.
        if !still_names(&rs, &resp) || !still_names(&rq, &req) {
            return not_yet(format!(
                "the server replaced the FIFOs of slot {slot} of {} while we opened them",
                dir.display()
            ));
        }
        let mut conn = ClientStream::new();
        conn.slot = slot;
        let mut c = FifoClient {
            dir: dir.to_path_buf(),
            req: Some(req),
            resp: Some(resp),
            _lease: Some(lease),
            conn,
            server_pid,
            owner: Owner::here(),
        };
        // Never 0: a refusal with request id 0 is not an answer to our HELLO.
        let nonce = crate::transport::rand_u64().max(1);
        let meta = Meta {
            kind: Kind::Control,
            flags: 0,
            request_id: nonce,
            slot: slot as u32,
            app_tag: control::HELLO,
            app_value: slot as u64,
        };
        let what = format!("connecting to slot {slot} of {}", dir.display());
        // The handshake gets its own short deadline, a last resort: a server that replaces
        // the slot's FIFOs after we opened them closes the read end of our request FIFO, and
        // we start over as soon as that shows (below).
        let hs = Deadline::after(Some(
            deadline
                .remaining()
                .unwrap_or(Duration::from_secs(2))
                .min(Duration::from_secs(2)),
        ));
        // A server that left or restarted the slot before it acknowledged: try again (a new
        // server may come up at the same directory before the deadline).
        let params = c
            .handshake(nonce, &meta, &what, &hs, interrupt)
            .map_err(|e| match e {
                e @ Error::PeerGone(_) => Retry::NotYet(e),
                e => Retry::Fail(e),
            })?;
        c.conn.set_limits(params.limits);
        Ok(c)
    }

    /// Send our HELLO (`meta`, request id `nonce`) and read the server's answer.
    fn handshake(
        &mut self,
        nonce: u64,
        meta: &Meta,
        what: &str,
        hs: &Deadline,
        interrupt: Interrupt<'_>,
    ) -> Result<crate::transport::handshake::ServerParams> {
        let c = self;
        let mut live = server_liveness(c.server_pid);
        let req = c.req.as_mut().ok_or(Error::Closed)?;
        stream::send_blocking(
            req,
            meta,
            &[],
            &HANDSHAKE_LIMITS,
            hs,
            interrupt,
            &|| what.to_string(),
            &mut live,
        )?;
        let resp = c.resp.as_mut().ok_or(Error::Closed)?;
        let req = c.req.as_ref().ok_or(Error::Closed)?;
        // Until the server opens its end of the response FIFO, reads see end-of-file and
        // poll reports nothing; a hang-up is reported only once a writer has come and gone.
        // So end-of-file here means "not yet", and only a hang-up means the server left.
        // The request FIFO's write end reports an error once no reader is left: the server
        // replaced the slot's FIFOs before it read our HELLO (or exited).
        let msg = loop {
            match c.conn.reader.read_from(resp)? {
                ReadStatus::Frame(m) => break m,
                ReadStatus::WouldBlock | ReadStatus::Eof => {}
            }
            let mut fds = [
                PollFd::new(&*resp, PollFlags::IN),
                PollFd::new(req, PollFlags::empty()),
            ];
            match wait_fds(&mut fds, hs, interrupt, &|| what.to_string(), &mut live) {
                Ok(()) => {}
                Err(Error::Timeout { .. }) => {
                    return Err(Error::PeerGone(format!(
                        "{what}: the server did not acknowledge"
                    )))
                }
                Err(e) => return Err(e),
            }
            let (ev, req_ev) = (fds[0].revents(), fds[1].revents());
            if ev.contains(PollFlags::IN) {
                continue;
            }
            if ev.intersects(PollFlags::HUP | PollFlags::ERR) {
                return Err(Error::PeerGone(format!(
                    "{what}: the server closed the slot"
                )));
            }
            if req_ev.intersects(PollFlags::HUP | PollFlags::ERR) {
                return Err(Error::PeerGone(format!(
                    "{what}: the server stopped reading the request FIFO before it answered \
                     our hello (it replaced the slot's FIFOs)"
                )));
            }
        };
        // An acknowledgement of another HELLO (a previous client's, left in the FIFO) is
        // stale: start over. A refusal with request id 0 answers ours (parse_hello_ack raises it).
        let m = msg.meta();
        if m.request_id != nonce && !(m.kind == Kind::Error && m.request_id == 0) {
            return Err(Error::PeerGone(format!("{what}: stale acknowledgement")));
        }
        parse_hello_ack(&msg, nonce, &c.dir)
    }

    fn what(&self) -> String {
        format!("slot {} of {}", self.conn.slot, self.dir.display())
    }
}

impl ClientEndpoint for FifoClient {
    fn slot(&self) -> usize {
        self.conn.slot
    }

    fn limits(&self) -> &Limits {
        &self.conn.limits
    }

    fn send(
        &mut self,
        meta: Meta,
        tensors: &[TensorRef<'_>],
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<u64> {
        let what = self.what();
        self.owner.check(|| format!("the client on {what}"))?;
        let live = &mut server_liveness(self.server_pid);
        let req = self.req.as_mut();
        self.conn
            .send(req, meta, tensors, timeout, interrupt, &what, live)
    }

    fn is_ready(&mut self) -> Result<bool> {
        self.owner
            .check(|| format!("the client on {}", self.what()))?;
        poll_readable(self.resp.as_ref())
    }

    fn recv_raw(&mut self, timeout: Option<Duration>, interrupt: Interrupt<'_>) -> Result<Message> {
        let what = self.what();
        self.owner.check(|| format!("the client on {what}"))?;
        let live = &mut server_liveness(self.server_pid);
        let resp = self.resp.as_mut();
        self.conn.recv(resp, timeout, interrupt, &what, live)
    }

    fn server_alive(&mut self) -> bool {
        let (Some(resp), Some(_)) = (self.resp.as_ref(), self.req.as_ref()) else {
            return false;
        };
        if !pid_alive(self.server_pid) {
            return false;
        }
        // The server closed its end of our response FIFO: it exited, or it replaced the
        // slot's FIFOs after a protocol error; either way this session is over.
        let mut fds = [PollFd::new(resp, PollFlags::IN)];
        if poll_fds(&mut fds, Duration::ZERO).is_err() {
            return false;
        }
        !fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
    }

    fn close(&mut self) {
        // Close the request end first so the server sees end-of-file, then release the lease.
        self.req = None;
        self.resp = None;
        self._lease = None;
    }
}

impl Drop for FifoClient {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
