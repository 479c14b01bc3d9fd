//! Transports: server and client endpoints with distinct roles.
//!
//! A server owns `num_slots` slots; each client holds exactly one slot (chosen by the
//! caller or leased from the free ones) and can only send requests and receive
//! responses on it. The server only receives requests and sends responses. Roles are
//! separate types ([`ServerEndpoint`], [`ClientEndpoint`]), so a role violation is a
//! compile error in Rust and a `RoleError` in the Python facade.
//!
//! Every blocking call takes a deadline (`None` = no deadline) and an interrupt callback
//! that it calls at least every [`INTERRUPT_CHECK`] so that the embedding program (Python's
//! Ctrl-C) can stop it; a vanished peer ends the wait with [`Error::PeerGone`].

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::error::{Error, Result};
use crate::frame::{self, AlignedBuf, Decoded, Kind, Limits, Meta, TensorRef};

pub(crate) mod access;
pub mod fifo;
pub(crate) mod lock;
pub mod shm;
pub(crate) mod stream;
pub mod uds;

/// How often a blocking call returns to check the interrupt callback and peer liveness.
pub const INTERRUPT_CHECK: Duration = Duration::from_millis(50);

/// Called periodically during blocking waits; an `Err` aborts the wait with that error.
pub type Interrupt<'a> = &'a mut dyn FnMut() -> Result<()>;

/// An interrupt callback that never interrupts.
pub fn no_interrupt() -> impl FnMut() -> Result<()> {
    || Ok(())
}

/// A received, validated message. Its tensors are slices of [`Message::bytes`].
///
/// The bytes are either a heap buffer from its connection's pool (stream transports) or, for shared memory, a
/// view of the ring buffer in the mapping that the message holds leased until it is dropped
/// (zero copy; see [`shm::ShmLease`]).
#[derive(Debug)]
pub struct Message {
    storage: Storage,
    decoded: Decoded,
}

#[derive(Debug)]
enum Storage {
    /// Returned to its connection's pool of receive buffers when the message is dropped.
    Pooled(AlignedBuf, stream::BufPool),
    Shared(shm::ShmLease),
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Storage::Pooled(buf, pool) = &mut self.storage {
            pool.give(std::mem::replace(buf, AlignedBuf::zeroed(0)));
        }
    }
}

impl Message {
    /// A message whose buffer goes back to `pool` when it is dropped.
    pub(crate) fn pooled(buf: AlignedBuf, decoded: Decoded, pool: stream::BufPool) -> Message {
        Message {
            storage: Storage::Pooled(buf, pool),
            decoded,
        }
    }

    /// A message whose bytes stay in a shared-memory ring buffer until it is dropped.
    pub(crate) fn shared(lease: shm::ShmLease, decoded: Decoded) -> Message {
        Message {
            storage: Storage::Shared(lease),
            decoded,
        }
    }

    /// Whether the bytes are a view of a shared-memory buffer (not a private copy).
    pub fn is_shared(&self) -> bool {
        matches!(self.storage, Storage::Shared(_))
    }

    /// Start of the frame bytes, for handing the buffer to a foreign owner (numpy views).
    /// Take it once, before any shared borrow of the bytes.
    pub fn bytes_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.storage {
            Storage::Pooled(b, _) => b.as_mut_slice().as_mut_ptr(),
            Storage::Shared(l) => l.as_mut_ptr(),
        }
    }

    /// The whole frame.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Pooled(b, _) => b.as_slice(),
            Storage::Shared(l) => l.as_slice(),
        }
    }

    pub fn meta(&self) -> &Meta {
        &self.decoded.header.meta
    }

    pub fn decoded(&self) -> &Decoded {
        &self.decoded
    }

    /// The bytes of tensor `i`.
    pub fn tensor_bytes(&self, i: usize) -> Option<&[u8]> {
        self.decoded
            .tensors
            .get(i)
            .map(|t| &self.bytes()[t.range()])
    }

    /// If this is an error frame, the error it carries.
    pub fn as_remote_error(&self) -> Option<Error> {
        if self.meta().kind != Kind::Error {
            return None;
        }
        let (code, message) = frame::error_parts(self.bytes(), &self.decoded);
        Some(Error::Remote {
            code,
            message: message.to_owned(),
        })
    }
}

/// Turn a received frame into the caller's result: an error frame becomes
/// [`Error::Remote`], anything but a response or control frame is a protocol error.
pub(crate) fn finish_response(msg: Message) -> Result<Message> {
    if let Some(e) = msg.as_remote_error() {
        return Err(e);
    }
    let kind = msg.meta().kind;
    if kind != Kind::Response && kind != Kind::Control {
        return Err(Error::Protocol(format!(
            "expected a response from the server, got a {} frame",
            kind.name()
        )));
    }
    Ok(msg)
}

/// The server side of a transport.
pub trait ServerEndpoint: Send + Sync {
    /// Number of client slots.
    fn num_slots(&self) -> usize;
    /// The limits enforced on every message in both directions.
    fn limits(&self) -> &Limits;
    /// The filesystem path clients use to reach this server.
    fn path(&self) -> &Path;
    /// Block until at least one slot has a pending request and return those slots (in
    /// increasing order). `Some(Duration::ZERO)` polls without blocking and may return an
    /// empty list; any other expired timeout is an [`Error::Timeout`].
    fn wait_any(
        &mut self,
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<Vec<usize>>;
    /// Whether `slot` has a pending request (does non-blocking I/O first).
    fn is_ready_slot(&mut self, slot: usize) -> Result<bool>;
    /// The next pending request of `slot`, or `None`. Control frames of the transport
    /// (handshakes) are handled inside and never returned.
    fn recv(&mut self, slot: usize) -> Result<Option<Message>>;
    /// Answer the oldest unanswered request of `slot` with a response (or `meta.kind`
    /// Error/Control frame). `meta.request_id` and `meta.slot` are filled in. Never blocks:
    /// what the client cannot take yet is sent later by `wait_any`/`is_ready_slot`.
    fn send(&mut self, slot: usize, meta: Meta, tensors: &[TensorRef<'_>]) -> Result<()>;
    /// Answer the oldest unanswered request of `slot` with an error frame.
    fn send_error(&mut self, slot: usize, code: u32, message: &str) -> Result<()>;
    /// Whether a client currently holds `slot`.
    fn is_connected(&self, slot: usize) -> bool;
    /// Reports of faults the server found and repaired on its own (a corrupt shared-memory
    /// slot reset), oldest first, since the last call; for the embedding program to log.
    fn take_notices(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Stop serving and remove every file this server created. Idempotent.
    fn close(&mut self);
}

/// The client side of a transport, bound to one slot.
pub trait ClientEndpoint: Send + Sync {
    /// The slot this client holds.
    fn slot(&self) -> usize;
    /// The server's limits (learned in the handshake).
    fn limits(&self) -> &Limits;
    /// Send a request; returns its request id. Blocks only while the server's buffer is full.
    fn send(
        &mut self,
        meta: Meta,
        tensors: &[TensorRef<'_>],
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<u64>;
    /// Whether a response is ready to be received without blocking.
    fn is_ready(&mut self) -> Result<bool>;
    /// Receive the frame answering the oldest outstanding request, error frames included.
    fn recv_raw(&mut self, timeout: Option<Duration>, interrupt: Interrupt<'_>) -> Result<Message>;

    /// Receive the response to the oldest outstanding request. An error frame from the
    /// server becomes [`Error::Remote`].
    fn recv(&mut self, timeout: Option<Duration>, interrupt: Interrupt<'_>) -> Result<Message> {
        finish_response(self.recv_raw(timeout, interrupt)?)
    }

    /// Receive the response to request `id`, discarding the answers to older requests that
    /// their callers gave up on (a timed-out request's late answer is never taken for the
    /// answer to a later one).
    fn recv_for(
        &mut self,
        id: u64,
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<Message> {
        let deadline = Deadline::after(timeout);
        loop {
            let msg = self.recv_raw(deadline.remaining(), interrupt)?;
            let rid = msg.meta().request_id;
            // Request id 0 marks an error the server could not attribute to one request.
            if rid >= id || rid == 0 {
                return finish_response(msg);
            }
        }
    }
    /// Whether the server this client is connected to is still there, as far as can be
    /// told without blocking (a closed connection, a hang-up, an exited server process).
    /// `false` once closed. A client whose server is gone cannot be used again; a caller
    /// reconnects (the path may already be served by a new server).
    fn server_alive(&mut self) -> bool;
    /// Release the slot and the connection. Idempotent.
    fn close(&mut self);
}

/// A point in time after which a blocking call gives up.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    end: Option<Instant>,
}

impl Deadline {
    pub fn after(timeout: Option<Duration>) -> Deadline {
        let start = Instant::now();
        Deadline {
            start,
            end: timeout.map(|t| {
                start
                    .checked_add(t)
                    .unwrap_or(start + Duration::from_secs(1 << 40))
            }),
        }
    }

    pub fn is_none(&self) -> bool {
        self.end.is_none()
    }

    /// Time left, `None` if unbounded.
    pub fn remaining(&self) -> Option<Duration> {
        self.end
            .map(|e| e.saturating_duration_since(Instant::now()))
    }

    pub fn expired(&self) -> bool {
        matches!(self.end, Some(e) if Instant::now() >= e)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// How long the next wait may last: the time left, at most `INTERRUPT_CHECK`.
    pub fn slice(&self) -> Duration {
        match self.remaining() {
            Some(r) => r.min(INTERRUPT_CHECK),
            None => INTERRUPT_CHECK,
        }
    }

    pub fn timeout_error(&self, what: impl Into<String>) -> Error {
        Error::timeout(what, self.elapsed())
    }
}

/// `poll(2)` on a set of descriptors for at most `wait`. EINTR counts as a wake-up with
/// nothing ready (the caller re-checks its interrupt callback).
pub(crate) fn poll_fds(fds: &mut [PollFd<'_>], wait: Duration) -> Result<usize> {
    let ts = Timespec {
        tv_sec: wait.as_secs() as i64,
        tv_nsec: i64::from(wait.subsec_nanos()),
    };
    match rustix::event::poll(fds, Some(&ts)) {
        Ok(n) => Ok(n),
        Err(rustix::io::Errno::INTR) => Ok(0),
        Err(e) => Err(Error::io("poll", e)),
    }
}

/// Wait until `fd` is ready for `events` (or reports an error/hang-up), the deadline
/// passes, or the interrupt callback fails. `liveness` is called between slices to detect a
/// dead peer that the descriptor alone cannot show.
pub(crate) fn wait_fd(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    what: &dyn Fn() -> String,
    liveness: &mut dyn FnMut() -> Result<()>,
) -> Result<PollFlags> {
    let mut fds = [PollFd::from_borrowed_fd(fd, events)];
    wait_fds(&mut fds, deadline, interrupt, what, liveness)?;
    Ok(fds[0].revents())
}

/// [`wait_fd`] on several descriptors: returns once any of `fds` reports an event (read
/// each one's `revents`).
pub(crate) fn wait_fds(
    fds: &mut [PollFd<'_>],
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    what: &dyn Fn() -> String,
    liveness: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    loop {
        if poll_fds(fds, deadline.slice())? > 0 {
            return Ok(());
        }
        interrupt()?;
        liveness()?;
        if deadline.expired() {
            return Err(deadline.timeout_error(what()));
        }
    }
}

/// This process's effective uid: the only user whose servers, clients and files it trusts.
pub(crate) fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Refuse a server whose process runs as another user (a Unix socket's `SO_PEERCRED`).
pub(crate) fn check_peer_uid(uid: u32, path: &Path) -> Result<()> {
    let me = my_uid();
    if uid != me {
        return Err(Error::Role(format!(
            "the server at {} runs as uid {uid}, not as this process's uid {me}; \
             refusing to connect",
            path.display()
        )));
    }
    Ok(())
}

/// Refuse a file or directory (`what`, e.g. "shared-memory file") that another user could
/// have made or could use: it must belong to this process's effective uid, and none of the
/// permission bits in `forbidden` may be set (`0o022`: nobody else may write to it, `0o077`:
/// nobody else may use it at all). `expected` names the mode the server gives it; `action` is
/// what is refused ("attach", "connect", "use it"). One `fstat`/`lstat` result, no syscall.
pub(crate) fn check_private(
    what: &str,
    path: &Path,
    md: &std::fs::Metadata,
    forbidden: u32,
    expected: &str,
    action: &str,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = my_uid();
    if md.uid() != me {
        return Err(Error::Role(format!(
            "{what} {} is owned by uid {}, not by this process's uid {me}; refusing to {action}",
            path.display(),
            md.uid()
        )));
    }
    let mode = md.mode() & 0o7777;
    if mode & forbidden != 0 {
        let access = if forbidden & 0o044 != 0 {
            "use"
        } else {
            "write to"
        };
        return Err(Error::Role(format!(
            "{what} {} has mode {mode:04o}: other users may {access} it (expected {expected}); \
             refusing to {action}",
            path.display()
        )));
    }
    Ok(())
}

/// A client sends requests (and upper-layer control frames), nothing else.
pub(crate) fn check_client_kind(meta: &Meta) -> Result<()> {
    if meta.kind != Kind::Request && meta.kind != Kind::Control {
        return Err(Error::Role(format!(
            "a client can only send requests, not {} frames",
            meta.kind.name()
        )));
    }
    Ok(())
}

/// Match a received frame to the oldest outstanding request id and retire that id. An error
/// frame with request id 0 (one the server could not attribute) retires it too.
pub(crate) fn take_answer(
    outstanding: &mut std::collections::VecDeque<u64>,
    m: &Meta,
    what: &str,
) -> Result<()> {
    if let Some(expected) = outstanding.front().copied() {
        if m.request_id != expected && !(m.kind == Kind::Error && m.request_id == 0) {
            return Err(Error::Protocol(format!(
                "response for request {} arrived while request {expected} was expected on {what}",
                m.request_id
            )));
        }
        outstanding.pop_front();
    }
    Ok(())
}

/// Name the slot and path in a capacity error about a client's request.
pub(crate) fn request_context(e: Error, what: &str) -> Error {
    match e {
        Error::Capacity(m) => Error::Capacity(format!("request on {what}: {m}")),
        other => other,
    }
}

/// What is wrong with a slot id outside a server's slots: the slot asked for and the valid
/// ids (`num_slots` is `None` where the caller cannot know them yet). One text for every
/// transport, client and server side alike; the socket server sends it in its refusal.
pub(crate) fn slot_range_text(
    slot: impl std::fmt::Display,
    num_slots: Option<usize>,
    path: &Path,
) -> String {
    let valid = match num_slots {
        None => "slot ids start at 0".to_string(),
        Some(0) => "it has no slots".to_string(),
        Some(1) => "it has 1 slot, id 0".to_string(),
        Some(n) => format!("it has {n} slots, ids 0 to {}", n - 1),
    };
    format!(
        "slot {slot} is out of range for the server at {}: {valid}",
        path.display()
    )
}

/// The error for a slot id outside a server's slots (`ValueError` in Python).
pub(crate) fn slot_out_of_range(
    slot: impl std::fmt::Display,
    num_slots: Option<usize>,
    path: &Path,
) -> Error {
    Error::InvalidArgument(slot_range_text(slot, num_slots, path))
}

/// Check a slot index against the server's slot count.
pub(crate) fn check_slot(slot: usize, num_slots: usize, path: &Path) -> Result<()> {
    if slot >= num_slots {
        return Err(slot_out_of_range(slot, Some(num_slots), path));
    }
    Ok(())
}

/// The tensor of limits a server sends in its HELLO_ACK:
/// `[num_slots, max_tensors, max_dims, max_payload_bytes, server_pid]`.
pub(crate) fn hello_ack_values(num_slots: usize, limits: &Limits) -> [u64; 5] {
    [
        num_slots as u64,
        u64::from(limits.max_tensors),
        u64::from(limits.max_dims),
        limits.max_payload_bytes,
        u64::from(rustix::process::getpid().as_raw_nonzero().get() as u32),
    ]
}

/// The server's parameters a client learns from HELLO_ACK.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerParams {
    pub slot: usize,
    pub limits: Limits,
}

/// Read the server's answer to our `HELLO`, whose request id was `nonce` (never 0). The
/// answer must carry that nonce (§13.1), except an error frame with request id 0: a refusal
/// the server made before it read the `HELLO` (§11). A `ROLE` refusal of the `HELLO` itself
/// means the slot we named is out of range (§13.1): that is the caller's bad argument, as on
/// the transports that check the slot on the client side.
pub(crate) fn parse_hello_ack(msg: &Message, nonce: u64, path: &Path) -> Result<ServerParams> {
    let rid = msg.meta().request_id;
    let answers_hello = rid == nonce;
    let unattributed_refusal = msg.meta().kind == Kind::Error && rid == 0;
    if !(answers_hello || unattributed_refusal) {
        return Err(Error::Protocol(format!(
            "the server at {} answered the handshake with a {} frame for request id {rid}, not \
             for our HELLO: expected request id {nonce} (the HELLO's nonce), or 0 on an error \
             frame",
            path.display(),
            msg.meta().kind.name()
        )));
    }
    if let Some(e) = msg.as_remote_error() {
        return Err(match e {
            Error::Remote { code, message } if code == frame::error_code::UNAVAILABLE => {
                Error::Capacity(message)
            }
            Error::Remote { code, message } if code == frame::error_code::ROLE && answers_hello => {
                Error::InvalidArgument(message)
            }
            Error::Remote { code, message } if code == frame::error_code::ROLE => {
                Error::Role(message)
            }
            other => other,
        });
    }
    let m = msg.meta();
    let bad = |why: &str| {
        Error::Protocol(format!(
            "the server at {} answered the handshake with {why}",
            path.display()
        ))
    };
    if m.kind != Kind::Control || m.app_tag != frame::control::HELLO_ACK {
        return Err(bad("an unexpected frame"));
    }
    let t = &msg.decoded().tensors;
    if t.len() != 1 || t[0].dtype != frame::DType::UInt64 || t[0].shape != [5] {
        return Err(bad("a malformed acknowledgement"));
    }
    let b = msg.tensor_bytes(0).unwrap_or(&[]);
    let v: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let limits = Limits::new(
        u32::try_from(v[1]).map_err(|_| bad("an invalid max_tensors"))?,
        u32::try_from(v[2]).map_err(|_| bad("an invalid max_dims"))?,
        v[3],
    )
    .map_err(|_| bad("invalid limits"))?;
    if m.app_value >= v[0] {
        return Err(bad("a slot outside its slot count"));
    }
    Ok(ServerParams {
        slot: m.app_value as usize,
        limits,
    })
}

/// Wakes a client that waits for a server to appear: an inotify watch on the directories
/// that hold (or will hold) the server's files, so that it blocks on the event instead of
/// sleeping. Made only once a first attempt found no server: closing an inotify descriptor
/// that had a watch waits for an RCU grace period in the kernel (milliseconds, 14 ms
/// measured), which a connection to a server that is already up must not pay.
pub(crate) struct DirWatch {
    fd: Option<std::os::fd::OwnedFd>,
    dirs: Vec<std::path::PathBuf>,
}

#[cfg(test)]
thread_local! {
    /// The watches this thread made and its waits on them (see [`testing`]).
    static DIR_WATCH_USE: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

impl DirWatch {
    pub fn new(dirs: &[&Path]) -> DirWatch {
        use rustix::fs::inotify;
        #[cfg(test)]
        DIR_WATCH_USE.with(|n| n.set((n.get().0 + 1, n.get().1)));
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).ok();
        let w = DirWatch {
            fd,
            dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
        };
        w.arm();
        w
    }

    /// (Re)add the watches: one on a directory that did not exist when the last was added,
    /// or that was removed and made again since (a watch dies with its directory), now
    /// covers the directory the path names. Cheap (one path lookup per directory); call it
    /// before each attempt that a later [`DirWatch::wait`] relies on.
    pub fn arm(&self) {
        use rustix::fs::inotify;
        if let Some(fd) = &self.fd {
            let mask = inotify::WatchFlags::CREATE
                | inotify::WatchFlags::MOVED_TO
                | inotify::WatchFlags::OPEN
                | inotify::WatchFlags::CLOSE_WRITE
                | inotify::WatchFlags::ATTRIB
                | inotify::WatchFlags::DELETE;
            for d in &self.dirs {
                // A directory that does not exist yet is covered by the watch on its parent.
                let _ = inotify::add_watch(fd, d, mask);
            }
        }
    }

    /// Block until something changes in the watched directories or one slice of the
    /// deadline passes (the caller then re-checks its interrupt callback and deadline).
    pub fn wait(&self, deadline: &Deadline) -> Result<()> {
        #[cfg(test)]
        DIR_WATCH_USE.with(|n| n.set((n.get().0, n.get().1 + 1)));
        match &self.fd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd, PollFlags::IN)];
                if poll_fds(&mut fds, deadline.slice())? > 0 {
                    let mut buf = [0u8; 4096];
                    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
                }
            }
            // inotify unavailable (e.g. out of watches): fall back to waiting out the slice.
            None => std::thread::sleep(deadline.slice()),
        }
        Ok(())
    }
}

/// What one attempt to reach a server found.
pub(crate) enum Attempt<T> {
    /// Connected.
    Done(T),
    /// No server (yet): the error to report if the deadline has passed.
    NotYet(Error),
}

/// Run `attempt` until it connects, fails for good, or the deadline passes, blocking between
/// attempts until something changes in `dirs`. The first attempt runs without a watch (the
/// common case: the server is up). After a failed one the watch is made and the server tried
/// once more before the first wait, so one that came up between the failed attempt and the
/// watch is found by that attempt, not missed until the deadline; later attempts re-arm the
/// watch first, for the same reason.
pub(crate) fn retry_until_up<T>(
    dirs: &[&Path],
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    mut attempt: impl FnMut(Interrupt<'_>) -> Result<Attempt<T>>,
) -> Result<T> {
    let mut watch: Option<DirWatch> = None;
    loop {
        let why = match attempt(&mut *interrupt)? {
            Attempt::Done(v) => return Ok(v),
            Attempt::NotYet(e) => e,
        };
        if deadline.expired() {
            return Err(why);
        }
        interrupt()?;
        match &watch {
            None => watch = Some(DirWatch::new(dirs)),
            Some(w) => {
                w.wait(deadline)?;
                w.arm();
            }
        }
    }
}

/// The context of a failure on `tmp`, the temporary name under which a file is made before
/// it is renamed to `path`: the error names `path`, which is what the user asked for.
pub(crate) fn temp_context(what: &str, path: &Path, tmp: &Path) -> String {
    format!(
        "{what} {} (made at {} first, then renamed into place)",
        path.display(),
        tmp.display()
    )
}

/// A random 64-bit value (handshake nonces, temporary names); not for cryptography.
pub(crate) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Limits wide enough to read any transport control frame (before the server's limits are known).
pub(crate) const HANDSHAKE_LIMITS: Limits = Limits {
    max_tensors: 1,
    max_dims: 1,
    max_payload_bytes: 1 << 17,
};

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::mpsc;

    /// What a client thread did while connecting.
    #[derive(Debug)]
    pub struct Connected<C> {
        pub result: Result<C>,
        /// Inotify watches it made (closing one costs milliseconds: none for a running server).
        pub watches: usize,
        /// Times it blocked on a watch.
        pub waits: usize,
        /// From the end of `bind` to the end of the connect.
        pub after_bind: Duration,
    }

    /// Connect from a new thread while this one binds and pumps a server. With `at_call = 0`
    /// the server is bound first; otherwise the client's interrupt callback, on its
    /// `at_call`-th call (a connect calls it each time it found no server, before it makes
    /// its watch or waits on it), has this thread bind the server and blocks until it is
    /// bound: the server appears at exactly that point of the client's loop.
    pub fn connect_as_server_starts<S, C: Send + 'static>(
        at_call: usize,
        bind: impl FnOnce() -> S,
        mut pump: impl FnMut(&mut S),
        connect: impl FnOnce(Interrupt<'_>) -> Result<C> + Send + 'static,
    ) -> Connected<C> {
        let (to_main, from_client) = mpsc::channel::<()>();
        let (to_client, from_main) = mpsc::channel::<()>();
        let mut bind = Some(bind);
        let mut srv = None;
        let mut bound_at = Instant::now();
        if at_call == 0 {
            srv = bind.take().map(|b| b());
            bound_at = Instant::now();
        }
        let client = std::thread::spawn(move || {
            let mut calls = 0;
            let mut interrupt = || {
                calls += 1;
                if calls == at_call {
                    to_main.send(()).expect("the test thread is gone");
                    from_main.recv().expect("the test thread is gone");
                }
                Ok(())
            };
            DIR_WATCH_USE.with(|n| n.set((0, 0)));
            let result = connect(&mut interrupt);
            let done = Instant::now();
            let (watches, waits) = DIR_WATCH_USE.with(|n| n.get());
            (result, watches, waits, done)
        });
        if let Some(b) = bind.take() {
            from_client
                .recv_timeout(Duration::from_secs(30))
                .expect("the client never found the server missing");
            srv = Some(b());
            bound_at = Instant::now();
            to_client.send(()).expect("the client thread is gone");
        }
        let mut srv = srv.expect("bound above");
        while !client.is_finished() {
            pump(&mut srv);
        }
        let (result, watches, waits, done) = client.join().expect("client thread panicked");
        Connected {
            result,
            watches,
            waits,
            after_bind: done.saturating_duration_since(bound_at),
        }
    }

    /// Connect to a server that is up (`at_call = 0`) or comes up at the client's `at_call`-th
    /// interrupt call, for each `(at_call, watches, waits)` case, and check the client
    /// connected, soon after the server was bound, having made `watches` watches and waited
    /// `waits` times on them.
    pub fn assert_watches_only_while_waiting<S, C, F>(
        bind: impl Fn() -> S,
        pump: impl FnMut(&mut S) + Clone,
        connect: impl Fn() -> F,
        cases: &[(usize, usize, usize)],
    ) where
        C: Send + 'static,
        F: FnOnce(Interrupt<'_>) -> Result<C> + Send + 'static,
    {
        for &(at_call, watches, waits) in cases {
            let c = connect_as_server_starts(at_call, &bind, pump.clone(), connect());
            if let Err(e) = &c.result {
                panic!("server up at interrupt call {at_call}: connect failed: {e}");
            }
            assert_eq!(
                (c.watches, c.waits),
                (watches, waits),
                "server up at interrupt call {at_call}: (watches made, waits) differ"
            );
            // Far below the connect timeout (10 s): the appearance was not missed.
            assert!(
                c.after_bind < Duration::from_secs(2),
                "server up at interrupt call {at_call}: connected {:?} after it was bound",
                c.after_bind
            );
        }
    }
}
