//! Unix-domain-socket transport.
//!
//! The server listens on a socket file (mode 0600) and accepts connections only from its
//! own user (SO_PEERCRED); a client, in turn, talks only to a server of its own user (the
//! listener's SO_PEERCRED, checked once per connection). Each connection claims one slot with
//! a HELLO control frame (a given slot, or any free one) and keeps it until it closes, so a
//! client process that dies frees its slot at once. A lock file `<path>.lock` marks the path as owned by a
//! live server: a second server refuses to start, a stale socket of a dead one is replaced.
//!
//! The server never blocks on one client: sockets are non-blocking, and a response the
//! client cannot take yet is queued and finished by later `wait_any` calls.

use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

use crate::error::{Error, IoContext, Result};
use crate::frame::{self, control, error_code, Kind, Limits, Meta, TensorRef};
use crate::transport::access::Owner;
use crate::transport::lock::LockFile;
use crate::transport::stream::{
    self, poll_readable, ClientStream, Flush, Incoming, ReadStatus, Session,
};
use crate::transport::{
    check_peer_uid, check_slot, not_yet, parse_hello_ack, poll_fds, rand_u64, retry_until_up,
    slot_range_text, temp_context, ClientEndpoint, Deadline, Interrupt, Message, ServerEndpoint,
    HANDSHAKE_LIMITS,
};

/// Kernel send buffer asked for each connection: large enough to keep a big response
/// streaming, small enough that the bytes are still in cache when the client copies them.
const SNDBUF: usize = 1 << 20;

/// The longest path a Unix socket can be bound or connected at, in bytes: the kernel's
/// `sun_path` holds 108, the last of them the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// `Err` naming the limit and the length when `path` (as the kernel sees it) is too long.
fn check_socket_path_len(what: &str, path: &Path, shown: &Path) -> Result<()> {
    let n = path.as_os_str().len();
    if n <= MAX_SOCKET_PATH {
        return Ok(());
    }
    let form = if path == shown {
        String::new()
    } else {
        format!(" (as an absolute path, {})", path.display())
    };
    Err(Error::InvalidArgument(format!(
        "{what} {}: a Unix socket path may have at most {MAX_SOCKET_PATH} bytes (the kernel's \
         sun_path holds 108 with the terminating NUL), and this one{form} has {n}; choose a \
         shorter directory or name",
        shown.display()
    )))
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

struct Conn {
    stream: UnixStream,
    session: Session,
    slot: Option<usize>,
    /// Close once the queued bytes are sent (a refused handshake).
    closing: bool,
    dead: bool,
}

impl Conn {
    /// The client sent its last byte (end of file). Requests it sent in full are still owed
    /// their answers, and queued answers their last bytes, while it can read them; otherwise
    /// the session ends now. A partly received frame is dropped.
    fn end_of_requests(&mut self) {
        let reads = !stream::peer_cannot_read(&self.stream);
        if !self.session.end_of_requests(false, reads) {
            self.dead = true;
        }
    }

    /// End the session of a half-closed client once its last answer is sent.
    fn close_if_answered(&mut self) {
        if self.session.finished().is_some() {
            self.dead = true;
        }
    }
}

/// The server endpoint of the Unix-socket transport.
pub struct UdsServer {
    path: PathBuf,
    limits: Limits,
    num_slots: usize,
    listener: Option<UnixListener>,
    lock: Option<LockFile>,
    conns: Vec<Conn>,
    /// For each slot, the index in `conns` of the connection holding it.
    slots: Vec<Option<usize>>,
    uid: u32,
    refused_peers: u64,
    owner: Owner,
}

fn check_parent(path: &Path) -> Result<&Path> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(parent),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "cannot create {}: {} is not a directory",
            path.display(),
            parent.display()
        ))),
        Err(e) => Err(Error::io_path(
            "cannot create socket: no directory",
            parent,
            e,
        )),
    }
}

/// Bind a listening socket at `sock`, a file of the private directory `dir`. The temporary
/// path may be longer than the final one (its directory name is longer than many a socket's
/// name) and so over [`MAX_SOCKET_PATH`] although the final path is not; then it is bound
/// through `/proc/self/fd/<dir>`, a path of a few bytes that names the same directory.
fn bind_in(dir: &Path, sock: &Path) -> std::io::Result<UnixListener> {
    if sock.as_os_str().len() <= MAX_SOCKET_PATH {
        return UnixListener::bind(sock);
    }
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let name = sock.file_name().unwrap_or_default();
    let short = Path::new("/proc/self/fd")
        .join(std::os::fd::AsRawFd::as_raw_fd(&fd).to_string())
        .join(name);
    UnixListener::bind(&short).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "its temporary path has {} bytes, over the kernel's limit of {MAX_SOCKET_PATH}, \
                 and binding it as {} failed: {e}",
                sock.as_os_str().len(),
                short.display()
            ),
        )
    })
}

impl UdsServer {
    /// Listen on `path` with `num_slots` client slots.
    pub fn bind(path: impl AsRef<Path>, num_slots: usize, limits: Limits) -> Result<UdsServer> {
        let path = path.as_ref().to_path_buf();
        if num_slots == 0 || num_slots > 4096 {
            return Err(Error::InvalidArgument(format!(
                "num_slots must be in 1..=4096, got {num_slots}"
            )));
        }
        // Clients reach the server by its absolute path (what an address names: the working
        // directory joined to a relative path, nothing collapsed), so that is the one that
        // must fit; refused before anything is created.
        let absolute = if path.is_absolute() {
            path.clone()
        } else {
            std::env::current_dir()
                .at("cannot resolve", &path)?
                .join(&path)
        };
        check_socket_path_len("cannot serve on", &absolute, &path)?;
        let parent = check_parent(&path)?.to_path_buf();
        let lock_p = lock_path(&path);
        let mut lock = LockFile::try_acquire(&lock_p, true)?.ok_or_else(|| {
            Error::AddressInUse(format!(
                "cannot serve on {}: another server is running there (it holds {})",
                path.display(),
                lock_p.display()
            ))
        })?;
        // From here on, a failure removes the lock file: nothing is left half-created.
        let listener = match Self::listen(&path, &parent, &mut lock) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&lock_p);
                return Err(e);
            }
        };
        listener
            .set_nonblocking(true)
            .at("cannot configure", &path)?;
        Ok(UdsServer {
            path,
            limits,
            num_slots,
            listener: Some(listener),
            lock: Some(lock),
            conns: Vec::new(),
            slots: vec![None; num_slots],
            uid: rustix::process::geteuid().as_raw(),
            refused_peers: 0,
            owner: Owner::here(),
        })
    }

    /// Record our pid in the lock, replace a stale socket, and bind the listening socket
    /// at `path` (mode 0600).
    fn listen(path: &Path, parent: &Path, lock: &mut LockFile) -> Result<UnixListener> {
        lock.write_pid()?;
        // A stale socket of a dead server is replaced; anything else is not ours to remove.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(path).at("cannot remove stale socket", path)?;
            }
            Ok(_) => {
                return Err(Error::Io {
                    context: format!("cannot serve on {}: the path exists and is not a socket; refusing to replace it", path.display()),
                    source: std::io::Error::from(ErrorKind::AlreadyExists),
                });
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io_path("cannot inspect", path, e)),
        }
        // Bind inside a private directory, restrict the mode, then rename into place, so the
        // socket is never reachable with a wider mode.
        let tmpdir = parent.join(format!(".sensai-{}-{:x}", std::process::id(), rand_u64()));
        let tmp_sock = tmpdir.join("s");
        let at_tmp = |what: &str| temp_context(what, path, &tmp_sock);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmpdir)
            .map_err(|e| Error::io(at_tmp("cannot create socket"), e))?;
        let result = (|| {
            let listener = bind_in(&tmpdir, &tmp_sock)
                .map_err(|e| Error::io(at_tmp("cannot create socket"), e))?;
            std::fs::set_permissions(&tmp_sock, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(at_tmp("cannot set mode of socket"), e))?;
            std::fs::rename(&tmp_sock, path).at("cannot move socket to", path)?;
            Ok(listener)
        })();
        let _ = std::fs::remove_file(&tmp_sock);
        let _ = std::fs::remove_dir(&tmpdir);
        result
    }

    fn what_server(&self) -> String {
        format!("the server at {}", self.path.display())
    }

    /// Connections refused because the peer ran as another user.
    pub fn refused_peers(&self) -> u64 {
        self.refused_peers
    }

    fn accept_all(&mut self) -> Result<()> {
        let Some(listener) = &self.listener else {
            return Err(Error::Closed);
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let cred = rustix::net::sockopt::socket_peercred(&stream);
                    match cred {
                        Ok(c) if c.uid.as_raw() == self.uid => {}
                        other => {
                            self.refused_peers += 1;
                            // Say why (one small non-blocking write), then close.
                            let who = other
                                .map(|c| c.uid.as_raw().to_string())
                                .unwrap_or_else(|_| "unknown".into());
                            let text = format!(
                                "connection refused: the server at {} serves only uid {}, the peer runs as uid {who}",
                                self.path.display(),
                                self.uid
                            );
                            let _ = stream.set_nonblocking(true);
                            let _ = (&stream).write(
                                frame::encode_error(0, 0, error_code::ROLE, &text).as_slice(),
                            );
                            continue;
                        }
                    }
                    stream
                        .set_nonblocking(true)
                        .at("cannot configure connection on", &self.path)?;
                    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, SNDBUF);
                    self.conns.push(Conn {
                        stream,
                        session: Session::new(),
                        slot: None,
                        closing: false,
                        dead: false,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Per-connection failures (ECONNABORTED, EMFILE...) must not stop the server.
                Err(_) => return Ok(()),
            }
        }
    }

    fn handshake(&mut self, ci: usize, msg: Message) {
        let m = *msg.meta();
        let conn_ok = m.kind == Kind::Control && m.app_tag == control::HELLO;
        let reply_err = |conn: &mut Conn, code: u32, text: String| {
            conn.session.refuse_handshake(m.request_id, code, &text);
            conn.closing = true;
        };
        if !conn_ok {
            let conn = &mut self.conns[ci];
            reply_err(
                conn,
                error_code::PROTOCOL,
                "expected a HELLO control frame first".into(),
            );
            return;
        }
        let slot = if m.app_value == control::ANY_SLOT {
            match (0..self.num_slots).find(|&s| self.slot_free(s)) {
                Some(s) => s,
                None => {
                    let n = self.num_slots;
                    let p = self.path.display().to_string();
                    reply_err(
                        &mut self.conns[ci],
                        error_code::UNAVAILABLE,
                        format!("all {n} slots of the server at {p} are in use"),
                    );
                    return;
                }
            }
        } else if m.app_value >= self.num_slots as u64 {
            let text = slot_range_text(m.app_value, Some(self.num_slots), &self.path);
            reply_err(&mut self.conns[ci], error_code::ROLE, text);
            return;
        } else if !self.slot_free(m.app_value as usize) {
            let p = self.path.display().to_string();
            reply_err(
                &mut self.conns[ci],
                error_code::UNAVAILABLE,
                format!(
                    "slot {} of the server at {p} is in use by another client",
                    m.app_value
                ),
            );
            return;
        } else {
            m.app_value as usize
        };
        self.slots[slot] = Some(ci);
        let (limits, num_slots) = (self.limits, self.num_slots);
        let conn = &mut self.conns[ci];
        conn.slot = Some(slot);
        match conn
            .session
            .ack_hello(&mut conn.stream, m.request_id, slot, num_slots, limits)
        {
            Ok(Flush::PeerGone) | Err(_) => conn.dead = true,
            Ok(_) => {}
        }
    }

    /// Whether `slot` can be granted: nobody holds it, or its holder has hung up (a client
    /// that closed and reconnects at once is often faster than the server's next read of
    /// the old connection, so peek at it now).
    fn slot_free(&mut self, slot: usize) -> bool {
        let Some(ci) = self.slots[slot] else {
            return true;
        };
        let conn = &mut self.conns[ci];
        if conn.dead {
            return true;
        }
        let mut probe = [0u8; 1];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        match rustix::net::recv(&conn.stream, &mut probe[..], flags) {
            // A client that only shut down its sending side keeps the slot while it waits
            // for its answers.
            Ok((0, _)) => {
                conn.end_of_requests();
                conn.dead
            }
            Ok(_) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => false,
            Err(_) => {
                conn.dead = true;
                true
            }
        }
    }

    /// Non-blocking I/O on every connection; `readable`/`writable` come from poll, or all
    /// true when called without polling.
    fn service(&mut self, ci: usize, readable: bool, writable: bool) {
        let conn = &mut self.conns[ci];
        if writable && conn.session.wants_write() {
            match conn.session.flush(&mut conn.stream) {
                Ok(Flush::Done) if conn.closing => conn.dead = true,
                Ok(Flush::Done) => conn.close_if_answered(),
                Ok(Flush::PeerGone) | Err(_) => conn.dead = true,
                _ => {}
            }
        }
        if !readable {
            return;
        }
        let conn = &mut self.conns[ci];
        if conn.session.is_read_closed() {
            // Nothing is left to read: poll woke us for a hang-up, so the answers still owed
            // have nobody to go to.
            if stream::peer_cannot_read(&conn.stream) {
                conn.dead = true;
            }
            return;
        }
        loop {
            let conn = &mut self.conns[ci];
            if conn.dead || conn.closing {
                return;
            }
            let open = conn.slot.is_some();
            let slot = conn.slot.unwrap_or(0) as u32;
            match conn.session.read(&mut conn.stream, slot, |_| !open) {
                Ok(Incoming::Handshake(msg)) => self.handshake(ci, msg),
                Ok(Incoming::Idle) => return,
                Ok(Incoming::Eof { .. }) => {
                    conn.end_of_requests();
                    return;
                }
                Ok(Incoming::Malformed(e)) | Err(e) => {
                    // Tell the client why, then drop the connection.
                    conn.session
                        .refuse_malformed(Some(&mut conn.stream), slot, &e);
                    conn.dead = true;
                    return;
                }
            }
        }
    }

    /// Drop dead connections and free their slots.
    fn reap(&mut self) {
        if !self.conns.iter().any(|c| c.dead) {
            return;
        }
        let old = std::mem::take(&mut self.conns);
        for s in self.slots.iter_mut() {
            *s = None;
        }
        for c in old.into_iter().filter(|c| !c.dead) {
            if let Some(s) = c.slot {
                self.slots[s] = Some(self.conns.len());
            }
            self.conns.push(c);
        }
    }

    /// One round of non-blocking I/O on everything, polling for at most `wait`.
    fn pump(&mut self, wait: Duration) -> Result<()> {
        let listener = self.listener.as_ref().ok_or(Error::Closed)?;
        let mut fds = Vec::with_capacity(1 + self.conns.len());
        fds.push(PollFd::new(listener, PollFlags::IN));
        for c in &self.conns {
            let mut ev = PollFlags::empty();
            if c.session.wants_read() && !c.closing {
                ev |= PollFlags::IN;
            }
            if c.session.wants_write() {
                ev |= PollFlags::OUT;
            }
            fds.push(PollFd::new(&c.stream, ev));
        }
        poll_fds(&mut fds, wait)?;
        let revents: Vec<PollFlags> = fds.iter().map(|f| f.revents()).collect();
        drop(fds);
        let err = PollFlags::ERR | PollFlags::HUP;
        for (ci, ev) in revents[1..].iter().enumerate() {
            if ev.is_empty() {
                continue;
            }
            self.service(
                ci,
                ev.intersects(PollFlags::IN | err),
                ev.intersects(PollFlags::OUT | err),
            );
        }
        if revents[0].contains(PollFlags::IN) {
            let before = self.conns.len();
            self.accept_all()?;
            // Read the HELLO that usually arrives with the connection.
            for ci in before..self.conns.len() {
                self.service(ci, true, false);
            }
        }
        self.reap();
        Ok(())
    }

    fn ready_slots(&self) -> Vec<usize> {
        (0..self.num_slots)
            .filter(|&s| matches!(self.slots[s], Some(ci) if self.conns[ci].session.has_pending()))
            .collect()
    }

    fn conn_of(&mut self, slot: usize) -> Result<Option<&mut Conn>> {
        check_slot(slot, self.num_slots, &self.path)?;
        Ok(match self.slots[slot] {
            Some(ci) => Some(&mut self.conns[ci]),
            None => None,
        })
    }
}

impl ServerEndpoint for UdsServer {
    fn num_slots(&self) -> usize {
        self.num_slots
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn wait_any(
        &mut self,
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<Vec<usize>> {
        self.owner.check(|| self.what_server())?;
        let what = format!("waiting for requests on {}", self.path.display());
        stream::wait_any(timeout, interrupt, &what, |wait| {
            self.pump(wait)?;
            Ok(self.ready_slots())
        })
    }

    fn is_ready_slot(&mut self, slot: usize) -> Result<bool> {
        self.owner.check(|| self.what_server())?;
        if matches!(self.conn_of(slot)?, Some(c) if c.session.has_pending()) {
            return Ok(true);
        }
        self.pump(Duration::ZERO)?;
        Ok(matches!(self.conn_of(slot)?, Some(c) if c.session.has_pending()))
    }

    fn recv(&mut self, slot: usize) -> Result<Option<Message>> {
        self.owner.check(|| self.what_server())?;
        check_slot(slot, self.num_slots, &self.path)?;
        if !matches!(self.conn_of(slot)?, Some(c) if c.session.has_pending()) {
            self.pump(Duration::ZERO)?;
        }
        Ok(self.conn_of(slot)?.and_then(|c| c.session.take()))
    }

    fn send(&mut self, slot: usize, meta: Meta, tensors: &[TensorRef<'_>]) -> Result<()> {
        self.owner.check(|| self.what_server())?;
        let limits = self.limits;
        let path = self.path.clone();
        let conn = self
            .conn_of(slot)?
            .ok_or_else(|| stream::no_client(slot, &path))?;
        let sent = conn
            .session
            .send(&mut conn.stream, slot, meta, tensors, &limits, &path)?;
        if sent == Flush::PeerGone {
            conn.dead = true;
        } else {
            conn.close_if_answered();
        }
        self.reap();
        match sent {
            Flush::PeerGone => Err(stream::went_away(slot, &path)),
            _ => Ok(()),
        }
    }

    fn send_error(&mut self, slot: usize, code: u32, message: &str) -> Result<()> {
        self.owner.check(|| self.what_server())?;
        let path = self.path.clone();
        let conn = self
            .conn_of(slot)?
            .ok_or_else(|| stream::no_client(slot, &path))?;
        if conn
            .session
            .send_error(&mut conn.stream, slot, code, message)?
            == Flush::PeerGone
        {
            conn.dead = true;
        }
        conn.close_if_answered();
        self.reap();
        Ok(())
    }

    fn is_connected(&self, slot: usize) -> bool {
        slot < self.num_slots && self.slots[slot].is_some()
    }

    fn close(&mut self) {
        self.conns.clear();
        for s in self.slots.iter_mut() {
            *s = None;
        }
        if !self.owner.is_here() {
            // A forked child's copy: the socket and lock file are the parent's.
            self.listener = None;
            self.lock = None;
            return;
        }
        if self.listener.take().is_some() {
            // Remove the socket only if it is still ours (not replaced by another server).
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(lock) = self.lock.take() {
            let _ = std::fs::remove_file(lock.path());
        }
    }
}

impl Drop for UdsServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// The client endpoint of the Unix-socket transport.
pub struct UdsClient {
    path: PathBuf,
    stream: Option<UnixStream>,
    conn: ClientStream,
    owner: Owner,
}

impl UdsClient {
    /// Connect to the server at `path` and claim `slot` (or any free slot), waiting up to
    /// `connect_timeout` for a server that is still starting.
    pub fn connect(
        path: impl AsRef<Path>,
        slot: Option<usize>,
        connect_timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<UdsClient> {
        let path = path.as_ref().to_path_buf();
        check_socket_path_len("cannot connect to", &path, &path)?;
        let deadline = Deadline::after(connect_timeout);
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // The server's socket appears by an atomic rename into `parent`.
        let stream = retry_until_up(
            &[&parent],
            &deadline,
            interrupt,
            |_| match UnixStream::connect(&path) {
                Ok(s) => Ok(s),
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) =>
                {
                    not_yet(format!(
                        "no server is listening on {} (waited {:.1}s): {e}",
                        path.display(),
                        deadline.elapsed().as_secs_f64()
                    ))
                }
                Err(e) => Err(Error::io_path("cannot connect to", &path, e).into()),
            },
        )?;
        // Who listens there: a socket another user bound (at a path we were given, or put
        // in place of our server's) must not get our requests or give us answers. The
        // kernel recorded the server's credentials when it called listen(2).
        let cred = rustix::net::sockopt::socket_peercred(&stream)
            .at("cannot read the credentials of the server at", &path)?;
        check_peer_uid(cred.uid.as_raw(), &path)?;
        stream.set_nonblocking(true).at("cannot configure", &path)?;

        // Never 0: a refusal with request id 0 is not an answer to our HELLO.
        let nonce = rand_u64().max(1);
        let mut c = UdsClient {
            path,
            stream: Some(stream),
            conn: ClientStream::new(),
            owner: Owner::here(),
        };
        let meta = Meta {
            kind: Kind::Control,
            flags: 0,
            request_id: nonce,
            slot: 0,
            app_tag: control::HELLO,
            app_value: slot.map(|s| s as u64).unwrap_or(control::ANY_SLOT),
        };
        let what = || format!("connecting to {}", c.path.display());
        let what_s = what();
        let stream = c.stream.as_mut().ok_or(Error::Closed)?;
        let sent = stream::send_blocking(
            stream,
            &meta,
            &[],
            &HANDSHAKE_LIMITS,
            &deadline,
            interrupt,
            &|| what_s.clone(),
            &mut || Ok(()),
        );
        if let Err(e) = sent {
            // A server that refused us may have said why before closing.
            if let Ok(ReadStatus::Frame(m)) = c.conn.reader.read_from(stream) {
                parse_hello_ack(&m, nonce, &c.path)?;
            }
            return Err(e);
        }
        let msg = stream::recv_blocking(
            stream,
            &mut c.conn.reader,
            &deadline,
            interrupt,
            &|| what_s.clone(),
            &mut || Ok(()),
        )?;
        let params = parse_hello_ack(&msg, nonce, &c.path)?;
        c.conn.accept(params);
        Ok(c)
    }

    fn what(&self) -> String {
        format!("slot {} of {}", self.conn.slot, self.path.display())
    }
}

impl ClientEndpoint for UdsClient {
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
        let stream = self.stream.as_mut();
        let live = &mut || Ok(());
        self.conn
            .send(stream, meta, tensors, timeout, interrupt, &what, live)
    }

    fn is_ready(&mut self) -> Result<bool> {
        self.owner
            .check(|| format!("the client on {}", self.what()))?;
        poll_readable(self.stream.as_ref())
    }

    fn recv_raw(&mut self, timeout: Option<Duration>, interrupt: Interrupt<'_>) -> Result<Message> {
        let what = self.what();
        self.owner.check(|| format!("the client on {what}"))?;
        let stream = self.stream.as_mut();
        self.conn
            .recv(stream, timeout, interrupt, &what, &mut || Ok(()))
    }

    fn server_alive(&mut self) -> bool {
        let Some(stream) = self.stream.as_ref() else {
            return false;
        };
        let mut fds = [PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
        if poll_fds(&mut fds, Duration::ZERO).is_err() {
            return false;
        }
        let ev = fds[0].revents();
        if ev.intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR) {
            return false;
        }
        if !ev.contains(PollFlags::IN) {
            return true;
        }
        // Readable: a late answer still to be read, or the end of the stream.
        let mut probe = [0u8; 1];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        !matches!(
            rustix::net::recv(stream, &mut probe[..], flags),
            Ok((0, _)) | Err(rustix::io::Errno::CONNRESET | rustix::io::Errno::PIPE)
        )
    }

    fn close(&mut self) {
        self.stream = None;
    }
}

impl Drop for UdsClient {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DType;
    use crate::transport::no_interrupt;

    #[test]
    fn round_trip_and_slots() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let mut srv = UdsServer::bind(&p, 2, Limits::default()).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            UdsServer::bind(&p, 2, Limits::default()).is_err(),
            "second server must refuse"
        );
        let p2 = p.clone();
        let h = std::thread::spawn(move || {
            let mut c =
                UdsClient::connect(&p2, None, Some(Duration::from_secs(5)), &mut no_interrupt())
                    .unwrap();
            let data: Vec<u8> = (0..40u8).collect();
            let t = [TensorRef {
                dtype: DType::Int32,
                shape: &[10],
                data: &data,
            }];
            c.send(Meta::new(Kind::Request), &t, None, &mut no_interrupt())
                .unwrap();
            let m = c
                .recv(Some(Duration::from_secs(5)), &mut no_interrupt())
                .unwrap();
            assert_eq!(m.tensor_bytes(0).unwrap(), &data[..]);
            c.slot()
        });
        let slots = srv
            .wait_any(Some(Duration::from_secs(5)), &mut no_interrupt())
            .unwrap();
        let s = slots[0];
        let msg = srv.recv(s).unwrap().unwrap();
        let data = msg.tensor_bytes(0).unwrap().to_vec();
        srv.send(
            s,
            Meta::new(Kind::Response),
            &[TensorRef {
                dtype: DType::Int32,
                shape: &[10],
                data: &data,
            }],
        )
        .unwrap();
        // Flush whatever is queued while the client reads.
        while srv.conns.iter().any(|c| c.session.wants_write()) {
            srv.pump(Duration::from_millis(10)).unwrap();
        }
        assert_eq!(h.join().unwrap(), s);
        srv.close();
        assert!(!p.exists());
    }

    /// A connection to a running server makes no inotify watch (closing one costs
    /// milliseconds in the kernel). A client that found no server connects as soon as one
    /// comes up: between its failed attempt and its watch (the attempt after the watch finds
    /// it, no wait), or while it waits on the watch.
    #[test]
    fn connect_watches_only_while_no_server_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        crate::transport::testing::assert_watches_only_while_waiting(
            || UdsServer::bind(&p, 1, Limits::default()).unwrap(),
            |s: &mut UdsServer| s.pump(Duration::from_millis(5)).unwrap(),
            || {
                let p = p.clone();
                move |i: Interrupt<'_>| {
                    UdsClient::connect(&p, None, Some(Duration::from_secs(10)), i)
                }
            },
            &[(0, 0, 0), (1, 1, 0), (2, 1, 1)],
        );
    }

    /// A directory under `base` whose path has `len` bytes.
    fn dir_of_len(base: &Path, len: usize) -> PathBuf {
        let n = len - base.as_os_str().len() - 1;
        let d = base.join("d".repeat(n));
        std::fs::create_dir(&d).unwrap();
        assert_eq!(d.as_os_str().len(), len);
        d
    }

    /// A path no client could connect to is refused before anything is created; one of
    /// exactly the limit serves, although its temporary socket's path is longer.
    #[test]
    fn socket_path_length_limit() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let long = dir.path().join("s".repeat(MAX_SOCKET_PATH));
        let e = UdsServer::bind(&long, 1, Limits::default()).err().unwrap();
        let text = e.to_string();
        assert!(text.contains("at most 107 bytes"), "{text}");
        assert!(
            text.contains(&format!("has {}", long.as_os_str().len())),
            "{text}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let e = UdsClient::connect(&long, None, Some(Duration::ZERO), &mut no_interrupt())
            .err()
            .unwrap();
        assert!(e.to_string().contains("at most 107 bytes"), "{e}");

        let d = dir_of_len(dir.path(), MAX_SOCKET_PATH - 2);
        let p = d.join("s");
        let mut srv = UdsServer::bind(&p, 1, Limits::default()).unwrap();
        let p2 = p.clone();
        let h = std::thread::spawn(move || {
            UdsClient::connect(&p2, None, Some(Duration::from_secs(5)), &mut no_interrupt())
                .map(|c| c.conn.slot)
        });
        while !h.is_finished() {
            srv.pump(Duration::from_millis(10)).unwrap();
        }
        assert_eq!(h.join().unwrap().unwrap(), 0);
        srv.close();
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }
}
