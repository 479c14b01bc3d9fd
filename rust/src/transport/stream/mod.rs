//! Machinery shared by the byte-stream transports (Unix sockets and named pipes, later
//! TCP): an incremental non-blocking frame reader, a queue of outgoing bytes, a writer that
//! sends a frame straight from the callers' tensor buffers, and the per-slot [`Session`]
//! of a server.

mod client;
mod session;
pub(crate) use client::{poll_readable, ClientStream};
pub(crate) use session::{no_client, went_away, Incoming, Session};

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use crate::error::{Error, Result};
use crate::frame::{self, AlignedBuf, Header, Layout, Limits, Meta, TensorRef, HEADER_LEN};
use crate::transport::{poll_fds, wait_fd, Deadline, Interrupt, Message};

/// What one non-blocking read pass produced.
#[derive(Debug)]
pub(crate) enum ReadStatus {
    Frame(Message),
    WouldBlock,
    /// The peer closed its end.
    Eof,
}

/// Receive buffers handed back by dropped messages and reused for the next frames of the
/// same connection: a steady stream of same-size responses then costs no allocation, no
/// zeroing and no page faults.
#[derive(Clone, Default, Debug)]
pub(crate) struct BufPool(Arc<Mutex<Vec<AlignedBuf>>>);

impl BufPool {
    /// Buffers kept for reuse.
    const KEEP: usize = 2;

    /// A buffer of `len` bytes: a kept one large enough, else a new zeroed one.
    pub fn take(&self, len: usize) -> AlignedBuf {
        if let Ok(mut kept) = self.0.lock() {
            if let Some(i) = kept.iter().position(|b| b.capacity() >= len) {
                let mut b = kept.swap_remove(i);
                b.resize(len);
                return b;
            }
        }
        AlignedBuf::zeroed(len)
    }

    pub fn give(&self, buf: AlignedBuf) {
        if buf.capacity() == 0 {
            return;
        }
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() < Self::KEEP {
                kept.push(buf);
            }
        }
    }
}

/// Reassembles frames from a non-blocking byte stream. The header is validated before the
/// body is allocated, so a hostile header cannot make us allocate past the limits.
#[derive(Debug)]
pub(crate) struct FrameReader {
    limits: Limits,
    header: [u8; HEADER_LEN],
    got: usize,
    body: Option<(AlignedBuf, Header)>,
    pool: BufPool,
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// One non-blocking read into `buf`: `Ok(n)` bytes read, or what ends the pass
/// (`Err(Some(status))`: the source would block or has ended), or `Err(None)` after a
/// signal (try again).
#[allow(clippy::type_complexity)]
fn read_some<R: Read>(src: &mut R, buf: &mut [u8]) -> Result<Result<usize, Option<ReadStatus>>> {
    match src.read(buf) {
        Ok(0) => Ok(Err(Some(ReadStatus::Eof))),
        Ok(n) => Ok(Ok(n)),
        Err(e) if is_would_block(&e) => Ok(Err(Some(ReadStatus::WouldBlock))),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Err(None)),
        Err(e) if is_peer_gone(&e) => Ok(Err(Some(ReadStatus::Eof))),
        Err(e) => Err(Error::io("read", e)),
    }
}

pub(crate) fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl FrameReader {
    pub fn new(limits: Limits) -> FrameReader {
        FrameReader {
            limits,
            header: [0; HEADER_LEN],
            got: 0,
            body: None,
            pool: BufPool::default(),
        }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether part of a frame has been read.
    pub fn in_progress(&self) -> bool {
        self.got > 0
    }

    /// Read without blocking until one frame completes, the source would block, or it ends.
    pub fn read_from<R: Read>(&mut self, src: &mut R) -> Result<ReadStatus> {
        loop {
            match &mut self.body {
                None => {
                    match read_some(src, &mut self.header[self.got..])? {
                        Ok(n) => self.got += n,
                        Err(Some(status)) => return Ok(status),
                        Err(None) => continue,
                    }
                    if self.got == HEADER_LEN {
                        let h = frame::decode_header(&self.header, &self.limits)?;
                        // decode_header bounded total_len by the limits' frame size.
                        let mut buf = self.pool.take(h.total_len as usize);
                        buf.as_mut_slice()[..HEADER_LEN].copy_from_slice(&self.header);
                        self.body = Some((buf, h));
                    }
                }
                Some((buf, h)) => {
                    let total = h.total_len as usize;
                    if self.got < total {
                        match read_some(src, &mut buf.as_mut_slice()[self.got..total])? {
                            Ok(n) => self.got += n,
                            Err(Some(status)) => return Ok(status),
                            Err(None) => continue,
                        }
                    }
                    if self.got == total {
                        self.got = 0;
                        if let Some((buf, _)) = self.body.take() {
                            let decoded = frame::decode(buf.as_slice(), &self.limits)?;
                            return Ok(ReadStatus::Frame(Message::pooled(
                                buf,
                                decoded,
                                self.pool.clone(),
                            )));
                        }
                    }
                }
            }
        }
    }
}

static ZEROS: [u8; 64] = [0; 64];

/// A frame laid out as a list of byte slices: the header and table, then each tensor's
/// own bytes with zero padding between them. Writing it sends the tensors straight from
/// the caller's buffers, with no intermediate copy.
pub(crate) struct Segments<'a> {
    parts: Vec<&'a [u8]>,
    idx: usize,
    off: usize,
}

/// Build the header/table prefix (everything before the first tensor) and the layout.
pub(crate) fn frame_prefix(
    meta: &Meta,
    tensors: &[TensorRef<'_>],
    limits: &Limits,
) -> Result<(Vec<u8>, Layout)> {
    frame::check_meta(meta)?;
    let (specs, lay) = frame::layout_data(tensors, limits)?;
    let prefix_len = lay.offsets.first().copied().unwrap_or(lay.total_len) as usize;
    // Zero-initialised, so the padding after the table is already written.
    let mut prefix = vec![0u8; prefix_len];
    frame::write_header_table(&mut prefix, meta, &specs, &lay);
    Ok((prefix, lay))
}

impl<'a> Segments<'a> {
    pub fn new(prefix: &'a [u8], lay: &Layout, tensors: &[TensorRef<'a>]) -> Segments<'a> {
        let mut parts = Vec::with_capacity(1 + 2 * tensors.len());
        parts.push(prefix);
        for (i, t) in tensors.iter().enumerate() {
            if i > 0 {
                let prev_end = lay.offsets[i - 1] + lay.nbytes[i - 1];
                let pad = (lay.offsets[i] - prev_end) as usize;
                if pad > 0 {
                    parts.push(&ZEROS[..pad]);
                }
            }
            if !t.data.is_empty() {
                parts.push(t.data);
            }
        }
        Segments {
            parts,
            idx: 0,
            off: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.idx >= self.parts.len()
    }

    /// Write as much as the destination takes now (one vectored write).
    pub fn write_some<W: Write>(&mut self, dst: &mut W) -> io::Result<usize> {
        let mut slices: Vec<IoSlice<'_>> =
            Vec::with_capacity((self.parts.len() - self.idx).min(64));
        for (k, p) in self.parts[self.idx..].iter().enumerate().take(64) {
            slices.push(IoSlice::new(if k == 0 { &p[self.off..] } else { p }));
        }
        let n = dst.write_vectored(&slices)?;
        self.advance(n);
        Ok(n)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.idx < self.parts.len() {
            let left = self.parts[self.idx].len() - self.off;
            if n >= left {
                n -= left;
                self.idx += 1;
                self.off = 0;
            } else {
                self.off += n;
                n = 0;
            }
        }
    }

    /// The bytes not yet written, copied into one buffer.
    pub fn rest(&self) -> Vec<u8> {
        let total: usize = self.parts[self.idx..]
            .iter()
            .map(|p| p.len())
            .sum::<usize>()
            - self.off;
        let mut v = Vec::with_capacity(total);
        for (k, p) in self.parts[self.idx..].iter().enumerate() {
            v.extend_from_slice(if k == 0 { &p[self.off..] } else { p });
        }
        v
    }
}

/// Bytes queued for a peer that could not take them yet.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    q: VecDeque<(Vec<u8>, usize)>,
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    Done,
    Pending,
    PeerGone,
}

impl OutQueue {
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn clear(&mut self) {
        self.q.clear();
    }

    pub fn push(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.q.push_back((bytes, 0));
        }
    }

    /// Write queued bytes without blocking.
    pub fn flush<W: Write>(&mut self, dst: &mut W) -> Result<Flush> {
        while let Some((buf, off)) = self.q.front_mut() {
            match dst.write(&buf[*off..]) {
                Ok(n) => {
                    *off += n;
                    if *off == buf.len() {
                        self.q.pop_front();
                    }
                }
                Err(e) if is_would_block(&e) => return Ok(Flush::Pending),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_peer_gone(&e) => return Ok(Flush::PeerGone),
                Err(e) => return Err(Error::io("write", e)),
            }
        }
        Ok(Flush::Done)
    }
}

/// Whether the peer of a stream can no longer read what we write: poll reports a hang-up or
/// an error on a socket the client closed (a client that only shut down its sending side
/// reports neither), and an error on a FIFO's write end once nobody has it open for reading.
pub(crate) fn peer_cannot_read(fd: impl AsFd) -> bool {
    let mut fds = [PollFd::new(&fd, PollFlags::empty())];
    match poll_fds(&mut fds, Duration::ZERO) {
        Ok(_) => fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP),
        Err(_) => true,
    }
}

/// How long a waiting side keeps retrying without blocking before it sleeps in `poll`: a
/// round trip costs two wake-ups when both sides sleep, and waking a process takes tens of
/// microseconds on a busy or virtualised machine.
pub(crate) const SPIN: Duration = Duration::from_micros(100);

/// The `wait_any` of the stream servers: a few non-blocking rounds for `SPIN`, then rounds
/// that poll for one interruptible slice each, until `pump` (one round of I/O, waiting at most
/// the given time) reports slots with requests or the deadline passes. `timeout` zero polls
/// once and may return an empty list; any other expired timeout is an error.
pub(crate) fn wait_any(
    timeout: Option<Duration>,
    interrupt: Interrupt<'_>,
    what: &str,
    mut pump: impl FnMut(Duration) -> Result<Vec<usize>>,
) -> Result<Vec<usize>> {
    let deadline = Deadline::after(timeout);
    // Requests tend to follow each other closely: look again without blocking for a short
    // while before sleeping in poll.
    let spin_end = Instant::now() + SPIN;
    loop {
        let ready = pump(Duration::ZERO)?;
        if !ready.is_empty() || timeout == Some(Duration::ZERO) {
            return Ok(ready);
        }
        if Instant::now() >= spin_end {
            break;
        }
        std::hint::spin_loop();
    }
    loop {
        let ready = pump(deadline.slice())?;
        if !ready.is_empty() {
            return Ok(ready);
        }
        interrupt()?;
        if deadline.expired() {
            return Err(deadline.timeout_error(what));
        }
    }
}

/// How long a server keeps writing a response straight from the caller's buffers while the
/// client is draining it, before it copies the rest and moves on.
pub(crate) const DIRECT_WRITE_BUDGET: Duration = Duration::from_millis(25);
/// A client that takes nothing for this long is treated as not reading: the rest of its
/// response is copied and sent later, so it never holds up the other slots for longer.
pub(crate) const DIRECT_WRITE_STALL: Duration = Duration::from_millis(2);

/// Send a frame without blocking on a client that does not read: write straight from the
/// tensors while the peer takes the bytes (a client waiting for its answer drains the
/// socket as fast as it is filled), and once it stalls for `DIRECT_WRITE_STALL`, or
/// `DIRECT_WRITE_BUDGET` has passed, queue a copy of the rest for `wait_any` to finish.
/// Returns `PeerGone` if the peer closed.
pub(crate) fn send_nonblocking<W: Write + AsFd>(
    dst: &mut W,
    queue: &mut OutQueue,
    meta: &Meta,
    tensors: &[TensorRef<'_>],
    limits: &Limits,
) -> Result<Flush> {
    let (prefix, lay) = frame_prefix(meta, tensors, limits)?;
    if !queue.is_empty() {
        match queue.flush(dst)? {
            Flush::Done => {}
            Flush::PeerGone => return Ok(Flush::PeerGone),
            Flush::Pending => {
                let segs = Segments::new(&prefix, &lay, tensors);
                queue.push(segs.rest());
                return Ok(Flush::Pending);
            }
        }
    }
    let start = Instant::now();
    let mut segs = Segments::new(&prefix, &lay, tensors);
    while !segs.is_done() {
        match segs.write_some(dst) {
            Ok(_) => {}
            Err(e) if is_would_block(&e) => {
                let left = DIRECT_WRITE_BUDGET.saturating_sub(start.elapsed());
                let mut fds = [PollFd::new(&*dst, PollFlags::OUT)];
                let ready =
                    !left.is_zero() && poll_fds(&mut fds, left.min(DIRECT_WRITE_STALL))? > 0;
                if !ready {
                    queue.push(segs.rest());
                    return Ok(Flush::Pending);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_peer_gone(&e) => return Ok(Flush::PeerGone),
            Err(e) => return Err(Error::io("write", e)),
        }
    }
    Ok(Flush::Done)
}

/// Send a whole frame, blocking (in interruptible slices) while the peer's buffer is full.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_blocking<W: Write + AsFd>(
    dst: &mut W,
    meta: &Meta,
    tensors: &[TensorRef<'_>],
    limits: &Limits,
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    what: &dyn Fn() -> String,
    liveness: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let (prefix, lay) = frame_prefix(meta, tensors, limits)?;
    let mut segs = Segments::new(&prefix, &lay, tensors);
    while !segs.is_done() {
        match segs.write_some(dst) {
            Ok(_) => {}
            Err(e) if is_would_block(&e) => {
                wait_fd(
                    dst.as_fd(),
                    PollFlags::OUT,
                    deadline,
                    interrupt,
                    what,
                    liveness,
                )?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_peer_gone(&e) => {
                return Err(Error::PeerGone(format!(
                    "{}: the server closed the connection",
                    what()
                )))
            }
            Err(e) => return Err(Error::io(what(), e)),
        }
    }
    Ok(())
}

/// Receive one frame, blocking (in interruptible slices) until it is complete.
pub(crate) fn recv_blocking<R: Read + AsFd>(
    src: &mut R,
    reader: &mut FrameReader,
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    what: &dyn Fn() -> String,
    liveness: &mut dyn FnMut() -> Result<()>,
) -> Result<Message> {
    let spin_end = Instant::now() + SPIN;
    loop {
        match reader.read_from(src)? {
            ReadStatus::Frame(m) => return Ok(m),
            ReadStatus::Eof => {
                return Err(Error::PeerGone(format!(
                    "{}: the server closed the connection",
                    what()
                )))
            }
            // A server usually answers within microseconds: retry for a short while before
            // paying for a sleep and a wake-up.
            ReadStatus::WouldBlock if Instant::now() < spin_end => std::hint::spin_loop(),
            ReadStatus::WouldBlock => {
                wait_fd(
                    src.as_fd(),
                    PollFlags::IN,
                    deadline,
                    interrupt,
                    what,
                    liveness,
                )?;
            }
        }
    }
}
