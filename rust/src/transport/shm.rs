//! Shared-memory transport: per-slot rings of frame buffers in one file, with futex wake-up.
//!
//! The server creates one file (a bare name goes under `/dev/shm`), exclusively, mode 0600,
//! with all its space reserved up front (`fallocate`), so a full `/dev/shm` is an error at
//! start that names the size asked and the space free, never a `SIGBUS` later. The file is
//! built under a temporary name and renamed into place once its header is complete, and the
//! header's `ready` word is written last with release ordering; a second server on a live
//! server's path is refused through the lock file `<path>.lock` (as for the socket
//! transport), and a stale file of a dead server is replaced.
//!
//! # Layout (native-endian; every offset a multiple of 64 unless noted)
//!
//! ```text
//! 0      header: magic "SNSAshm\0" | layout version u32 | num_slots u32 | ring depth K u32
//!        | max_tensors u32 | max_dims u32 | server pid u32 | capacity per buffer u64
//!        | max_payload_bytes u64 | slot stride u64 | file length u64
//! 64     ready u32 (0 = being built, READY, or CLOSED once the server closed)
//! 128    doorbell event (seq u32, sleepers u32)
//! 4096   slot 0, then slot 1 at 4096 + stride, ...
//!
//! slot:  +0 lease u32 (client pid, 0 = free) | attach_seq u32 | ack_seq u32
//!        +64 request head u64   +128 request tail u64
//!        +192 response head u64 +256 response tail u64
//!        +320 response event    +384 request-space event
//!        +512  request ring:  queue of 64 buffer indices u32 | +768  64 buffer states u64
//!        +1280 response ring: queue of 64 buffer indices u32 | +1536 64 buffer states u64
//!        +2048 K request buffers, then K response buffers, `capacity` bytes each
//! ```
//!
//! Each direction of a slot is a *pool* of K buffers plus a queue of K buffer indices
//! (head/tail counters as in [`crate::sync`]). A buffer's state word says who has it: free,
//! busy (the producer writes it, or it waits in the queue), or held by a received message of
//! process `pid` (`HELD | pid`). The producer fills any free buffer and queues its index; the
//! consumer pops the index at once and marks the buffer held until the message is dropped.
//! So messages may be dropped in any order, and one message kept alive costs one buffer
//! (never the whole ring).
//!
//! `capacity` is `limits.max_frame_len()` rounded up to 64, so every frame the limits admit
//! fits one buffer, and every buffer starts 64-byte aligned. A buffer holds one complete
//! frame in the format of [`crate::frame`]; the reader decodes and validates it against the
//! limits exactly as the stream transports do. The atomics protocol (rings, events, attach)
//! is documented in [`crate::sync`].
//!
//! # Zero copy and buffer ownership
//!
//! A received [`Message`] is a view of its buffer ([`ShmLease`]); the buffer goes back to
//! the producer's pool when the message is dropped, in any order. On the client, a send is
//! refused with [`Error::Capacity`] when the requests awaiting responses plus the response
//! buffers held by messages still alive would exceed the K response buffers, so the server
//! always has room for the answer of every request it receives from a well-behaved client.
//! Answers to requests the client gave up on (a timed-out `recv_for`) are discarded by the
//! next send that needs their buffers, waiting for them within its own timeout.
//!
//! A client that is closed gives its slot up at once, even while some of its messages are
//! alive: the buffers they hold stay marked held by its pid, untouched, and the slot's next
//! client simply has fewer free response buffers until they are dropped (leasing without a
//! slot id offers such a slot after the slots nothing pins: see `shm/lease.rs`). Before it
//! acknowledges an attach, the server resets the slot's rings: queued responses nobody
//! read, requests left half-written, buffers held by a process that has exited, and any
//! ring word nobody honest could have written.
//!
//! The server writes responses in place: [`ShmServer::reserve`] lays out the frame in the
//! next response buffer and hands out the tensors' bytes to fill, [`ShmServer::publish`]
//! makes it visible; [`ServerEndpoint::send`] is reserve + one copy + publish. The server
//! never blocks on a client: when a slot's response ring is full (a client that sends
//! without reading, against the rule above), `send`, `send_error` and `reserve` return
//! [`Error::Capacity`] at once and the request stays unanswered, to be answered later.
//!
//! # Liveness
//!
//! A client's lease records its pid: a lease whose pid has exited (gone, or a zombie not yet
//! reaped) is reclaimed by the next client that attaches, and the server then drops that
//! slot's unread requests and the request buffers the dead client left half-written. A waiting
//! client checks every [`INTERRUPT_CHECK`] that the server's pid is alive and that it did not
//! close the file, and ends with [`Error::PeerGone`]. (Pids are compared in the caller's pid
//! namespace: server and clients must share one.)
//!
//! # Trust
//!
//! Peers are processes of the same user: the file is 0600, and a client refuses a file of
//! another user, or one that group or others may write to, before it maps it. Every counter
//! read from the mapping is checked against the ring depth and every frame is validated
//! before use, so a corrupt or malicious peer causes errors, not out-of-bounds access; like
//! any shared-memory transport, a peer that writes into buffers it does not own can still
//! change their contents under a reader.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, IoContext, Result};
use crate::frame::{self, error_code, Limits, Meta, TensorRef, TensorSpec};
use crate::sync::{futex_wait, futex_wake_all, Event, Wake};
use crate::transport::access::Owner;
use crate::transport::lock::{pid_alive, LockFile};
mod lease;

use crate::transport::{
    check_client_kind, check_private, check_slot, client_frame_refusal, rand_u64, request_context,
    slot_out_of_range, take_answer, temp_context, ClientEndpoint, Deadline, DirWatch, Interrupt,
    Message, ServerEndpoint, INTERRUPT_CHECK,
};

/// Magic at offset 0 of a shared-memory file (distinct from the frame magic).
pub const SHM_MAGIC: [u8; 8] = *b"SNSAshm\0";
/// Version of the file layout described in the module docs.
pub const LAYOUT_VERSION: u32 = 2;
/// Where a bare file name (no directory) is created.
pub const DEFAULT_DIR: &str = "/dev/shm";
/// Bounds on the ring depth K.
pub const MIN_RING_DEPTH: usize = 2;
pub const MAX_RING_DEPTH: usize = 64;
/// Default ring depth.
pub const DEFAULT_RING_DEPTH: usize = 2;
/// Most slots one server may have.
pub const MAX_SLOTS: usize = 4096;

const READY: u32 = 0x5944_4552; // "REDY"
const CLOSED: u32 = 0x4553_4c43; // "CLSE"
const HEADER_REGION: u64 = 4096;
const CTRL_LEN: u64 = 2048;

/// Buffer states (the per-buffer words of a ring).
const FREE: u64 = 0;
const BUSY: u64 = 1;
const HELD: u64 = 1 << 32;

fn held_by(pid: u32) -> u64 {
    HELD | u64::from(pid)
}

/// The pid in a `HELD | pid` state, or `None` for any other state.
fn holder_of(state: u64) -> Option<u32> {
    (state >> 32 == 1).then_some(state as u32)
}
const PAGE: u64 = 4096;

/// Byte offsets of the words in the header and in a slot's control block.
mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const NUM_SLOTS: usize = 12;
    pub const RING_DEPTH: usize = 16;
    pub const MAX_TENSORS: usize = 20;
    pub const MAX_DIMS: usize = 24;
    pub const SERVER_PID: usize = 28;
    pub const CAPACITY: usize = 32;
    pub const MAX_PAYLOAD: usize = 40;
    pub const SLOT_STRIDE: usize = 48;
    pub const FILE_LEN: usize = 56;
    pub const READY: usize = 64;
    pub const DOORBELL: usize = 128;

    pub const LEASE: usize = 0;
    pub const ATTACH_SEQ: usize = 4;
    pub const ACK_SEQ: usize = 8;
    pub const REQ_HEAD: usize = 64;
    pub const REQ_TAIL: usize = 128;
    pub const RESP_HEAD: usize = 192;
    pub const RESP_TAIL: usize = 256;
    pub const RESP_EVENT: usize = 320;
    pub const REQ_SPACE_EVENT: usize = 384;
    /// Queue of buffer indices (u32 each) of the request ring; the response ring's is
    /// `RING_STRIDE` further.
    pub const QUEUE: usize = 512;
    /// Buffer states (u64 each) of the request ring.
    pub const STATES: usize = 768;
    pub const RING_STRIDE: usize = 768;
}

/// A bare file name goes under [`DEFAULT_DIR`]; anything with a directory stays as given.
pub fn resolve_path(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => path.to_path_buf(),
        _ => Path::new(DEFAULT_DIR).join(path),
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The sizes of a file, derived from its parameters with checked arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    num_slots: usize,
    depth: usize,
    capacity: u64,
    limits: Limits,
    slot_stride: u64,
    file_len: u64,
}

impl Geometry {
    fn new(num_slots: usize, depth: usize, limits: Limits) -> Result<Geometry> {
        if num_slots == 0 || num_slots > MAX_SLOTS {
            return Err(Error::InvalidArgument(format!(
                "num_slots must be in 1..={MAX_SLOTS}, got {num_slots}"
            )));
        }
        if !(MIN_RING_DEPTH..=MAX_RING_DEPTH).contains(&depth) {
            return Err(Error::InvalidArgument(format!(
                "ring_depth must be in {MIN_RING_DEPTH}..={MAX_RING_DEPTH}, got {depth}"
            )));
        }
        let too_big = || {
            Error::InvalidArgument(format!(
                "a shared-memory file for {num_slots} slots x 2 rings x {depth} buffers of \
                 max_nbytes={} does not fit in memory",
                limits.max_payload_bytes
            ))
        };
        let capacity = frame::align_up(limits.max_frame_len());
        let slot = (2 * depth as u64)
            .checked_mul(capacity)
            .and_then(|b| b.checked_add(CTRL_LEN + PAGE - 1))
            .ok_or_else(too_big)?;
        let slot_stride = slot & !(PAGE - 1);
        let file_len = slot_stride
            .checked_mul(num_slots as u64)
            .and_then(|v| v.checked_add(HEADER_REGION))
            .filter(|&v| v <= isize::MAX as u64)
            .ok_or_else(too_big)?;
        Ok(Geometry {
            num_slots,
            depth,
            capacity,
            limits,
            slot_stride,
            file_len,
        })
    }

    fn slot_base(&self, slot: usize) -> usize {
        (HEADER_REGION + slot as u64 * self.slot_stride) as usize
    }

    /// Offset of buffer `buf` (< depth) of a ring.
    fn buf_off(&self, slot: usize, response: bool, buf: u32) -> usize {
        let idx = u64::from(buf) + if response { self.depth as u64 } else { 0 };
        self.slot_base(slot) + (CTRL_LEN + idx * self.capacity) as usize
    }
}

/// The mapped file and its validated geometry.
struct Region {
    map: MmapRaw,
    geo: Geometry,
    /// The process that mapped the file. A forked child inherits the mapping but none of its
    /// leases or held buffers: it never gives one back (see [`Region::release`]).
    owner: Owner,
}

impl Region {
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= self.map.len());
        // SAFETY: every offset passed here is a field of the header or of a slot whose index
        // was checked against `num_slots`, and the geometry was validated against the
        // mapping's length, so the word lies inside the mapping; it is 4-aligned because the
        // mapping is page-aligned and every field offset is a multiple of 4. The reference
        // cannot outlive `self`, which owns the mapping, and every process accesses these
        // words only atomically.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.map.len());
        // SAFETY: as in `u32_at`; the offset is a multiple of 8.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    fn ready(&self) -> &AtomicU32 {
        self.u32_at(off::READY)
    }

    fn doorbell(&self) -> Event<'_> {
        Event::new(self.u32_at(off::DOORBELL), self.u32_at(off::DOORBELL + 4))
    }

    fn slot_u32(&self, slot: usize, field: usize) -> &AtomicU32 {
        self.u32_at(self.geo.slot_base(slot) + field)
    }

    fn slot_u64(&self, slot: usize, field: usize) -> &AtomicU64 {
        self.u64_at(self.geo.slot_base(slot) + field)
    }

    fn slot_event(&self, slot: usize, field: usize) -> Event<'_> {
        Event::new(self.slot_u32(slot, field), self.slot_u32(slot, field + 4))
    }

    /// Start of buffer `buf` (< depth) of a ring (`capacity` bytes, inside the mapping).
    fn buf_ptr(&self, slot: usize, response: bool, buf: u32) -> *mut u8 {
        let off = self.geo.buf_off(slot, response, buf);
        debug_assert!(slot < self.geo.num_slots && (buf as usize) < self.geo.depth);
        debug_assert!(off as u64 + self.geo.capacity <= self.map.len() as u64);
        self.map.as_mut_ptr().wrapping_add(off)
    }

    fn ring_base(response: bool) -> usize {
        if response {
            off::RING_STRIDE
        } else {
            0
        }
    }

    /// The head (published) counter of a ring.
    fn head(&self, slot: usize, response: bool) -> &AtomicU64 {
        let field = if response {
            off::RESP_HEAD
        } else {
            off::REQ_HEAD
        };
        self.slot_u64(slot, field)
    }

    /// The tail (popped) counter of a ring.
    fn tail(&self, slot: usize, response: bool) -> &AtomicU64 {
        let field = if response {
            off::RESP_TAIL
        } else {
            off::REQ_TAIL
        };
        self.slot_u64(slot, field)
    }

    /// Queue entry for position `pos` of a ring: the index of the buffer published there.
    fn queue(&self, slot: usize, response: bool, pos: u64) -> &AtomicU32 {
        let i = (pos % self.geo.depth as u64) as usize;
        self.slot_u32(slot, off::QUEUE + Self::ring_base(response) + 4 * i)
    }

    /// State word of buffer `buf` (< depth) of a ring.
    fn state(&self, slot: usize, response: bool, buf: u32) -> &AtomicU64 {
        debug_assert!((buf as usize) < self.geo.depth);
        self.slot_u64(
            slot,
            off::STATES + Self::ring_base(response) + 8 * buf as usize,
        )
    }

    /// A free buffer of a ring, marked busy; only the ring's producer calls this. `None` if
    /// every buffer is busy or held.
    fn take_free(&self, slot: usize, response: bool) -> Option<u32> {
        (0..self.geo.depth as u32).find(|&b| {
            let st = self.state(slot, response, b);
            // Acquire: pairs with the consumer's release of the buffer, so its last reads
            // happen before we overwrite the buffer. Only the producer leaves the free state.
            if st.load(Ordering::Acquire) == FREE {
                st.store(BUSY, Ordering::Relaxed);
                true
            } else {
                false
            }
        })
    }

    /// Queue buffer `buf` at position `head` and publish it (the producer's `head + 1`).
    fn publish_buf(&self, slot: usize, response: bool, head: u64, buf: u32) {
        self.queue(slot, response, head)
            .store(buf, Ordering::Relaxed);
        // Release: the frame bytes and the queue entry before the new head (the consumer
        // loads it with acquire).
        self.head(slot, response).store(head + 1, Ordering::Release);
    }

    /// Pop the entry at position `tail` (the consumer's own counter; the caller checked that
    /// `tail < head`) and mark its buffer held by `pid`. Returns the buffer index.
    fn pop(&self, slot: usize, response: bool, tail: u64, pid: u32) -> Result<u32> {
        let b = self.queue(slot, response, tail).load(Ordering::Relaxed);
        let ok = (b as usize) < self.geo.depth
            && self.state(slot, response, b).load(Ordering::Acquire) == BUSY;
        if ok {
            self.state(slot, response, b)
                .store(held_by(pid), Ordering::Relaxed);
        }
        // Release: our read of the queue entry before the producer may reuse the position.
        self.tail(slot, response).store(tail + 1, Ordering::Release);
        if ok {
            Ok(b)
        } else {
            Err(Error::Protocol(format!(
                "the {} queue of slot {slot} names buffer {b}, which is not a published buffer",
                if response { "response" } else { "request" }
            )))
        }
    }

    /// Give buffer `buf` back to the producer. A no-op in a forked child, whose copy of a
    /// message or reservation must not free the buffer its parent still reads or fills.
    fn release(&self, slot: usize, response: bool, buf: u32) {
        if !self.owner.is_here() {
            return;
        }
        // Release: our reads of the buffer before the producer's acquire in `take_free`.
        self.state(slot, response, buf)
            .store(FREE, Ordering::Release);
    }

    /// Free every buffer queued at positions `from..to` (entries nobody will read). Only a
    /// busy buffer is freed: a queue entry rewritten to name a buffer that a live message
    /// holds must not hand that buffer to the producer.
    fn free_queued(&self, slot: usize, response: bool, from: u64, to: u64) {
        for pos in from..to {
            let b = self.queue(slot, response, pos).load(Ordering::Relaxed);
            if (b as usize) < self.geo.depth {
                // AcqRel: as `release` (our reads of the buffer before the producer's
                // acquire), and the state we compare is the one published with the entry.
                let _ = self.state(slot, response, b).compare_exchange(
                    BUSY,
                    FREE,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// Buffers of a ring held by received messages (of any process).
    fn held_count(&self, slot: usize, response: bool) -> usize {
        (0..self.geo.depth as u32)
            .filter(|&b| holder_of(self.state(slot, response, b).load(Ordering::Acquire)).is_some())
            .count()
    }
}

/// A received frame's buffer, held until dropped (the storage of a shared-memory
/// [`Message`]).
pub struct ShmLease {
    /// Keeps the mapping alive while the message lives (also after its endpoint closed).
    region: Arc<Region>,
    slot: usize,
    response: bool,
    buf: u32,
    ptr: *mut u8,
    len: usize,
    /// The receiving client's count of its live messages, decremented on drop.
    live: Option<Arc<AtomicUsize>>,
}

// SAFETY: the pointer targets a buffer of the shared mapping, which `region` keeps mapped
// for the lease's lifetime; the buffer's state word marks it held, so no producer writes it
// before `Drop` releases it, and the lease may move between threads.
unsafe impl Send for ShmLease {}
// SAFETY: shared access only reads the bytes (`as_slice`).
unsafe impl Sync for ShmLease {}

impl ShmLease {
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` lies inside one ring buffer of the mapping (len <= the
        // buffer capacity, checked when the frame was decoded), the mapping outlives `self`
        // through `region`, and the producer does not write the buffer while it is held.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for ShmLease {
    fn drop(&mut self) {
        if let Some(live) = &self.live {
            // Relaxed: a count for error messages only.
            live.fetch_sub(1, Ordering::Relaxed);
        }
        self.region.release(self.slot, self.response, self.buf);
        if !self.response {
            // A client may wait for a free request buffer.
            self.region
                .slot_event(self.slot, off::REQ_SPACE_EVENT)
                .notify();
        }
    }
}

impl std::fmt::Debug for ShmLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ShmLease(slot {}, {} buffer {}, {} bytes)",
            self.slot,
            if self.response { "response" } else { "request" },
            self.buf,
            self.len
        )
    }
}

/// Decode the frame in a ring buffer; `cap` bytes are available at `ptr`.
fn decode_at(ptr: *mut u8, cap: u64, limits: &Limits) -> Result<(usize, frame::Decoded)> {
    // SAFETY: `ptr` starts a ring buffer of `cap >= 64` bytes inside the mapping, owned by
    // the caller (the consumer) under the ring protocol.
    let hdr = unsafe { std::slice::from_raw_parts(ptr, frame::HEADER_LEN) };
    let h = frame::decode_header(hdr, limits)?;
    if h.total_len > cap {
        return Err(Error::Protocol(format!(
            "a frame of {} bytes does not fit the {cap}-byte ring buffer it claims to be in",
            h.total_len
        )));
    }
    let len = h.total_len as usize;
    // SAFETY: as above; `len <= cap`.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    Ok((len, frame::decode(bytes, limits)?))
}

/// A response buffer laid out by [`ShmServer::reserve`], waiting to be filled and published.
/// Dropping it without publishing cancels it (nothing is sent).
pub struct Reservation {
    /// Keeps the mapping alive while the tensors are written.
    _region: Arc<Region>,
    open: Arc<AtomicBool>,
    slot: usize,
    /// The response buffer (marked busy) being filled.
    buf: u32,
    /// Published: the buffer now belongs to the queue, not to this reservation.
    sent: bool,
    epoch: u64,
    request_id: u64,
    ptr: *mut u8,
    offsets: Vec<u64>,
    nbytes: Vec<u64>,
}

// SAFETY: the pointer targets the response buffer `buf` of the mapping kept alive by
// `region`; the client does not read it before it is published, and the server hands out
// one open reservation per slot, so this object is its only writer on any thread.
unsafe impl Send for Reservation {}
// SAFETY: shared references give only raw pointers and lengths, no access to the bytes.
unsafe impl Sync for Reservation {}

impl Reservation {
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The request id the response will answer.
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    pub fn num_tensors(&self) -> usize {
        self.offsets.len()
    }

    /// Start of tensor `i`'s bytes in the shared buffer (64-byte aligned), and their length;
    /// for handing to a foreign writer (numpy). `None` if `i` is out of range.
    pub fn tensor_raw(&self, i: usize) -> Option<(*mut u8, usize)> {
        let o = *self.offsets.get(i)?;
        Some((self.ptr.wrapping_add(o as usize), self.nbytes[i] as usize))
    }

    /// A handle that keeps the shared mapping alive, for views of the tensors that may
    /// outlive the reservation (numpy arrays handed to Python).
    pub fn mapping_guard(&self) -> Arc<dyn std::any::Any + Send + Sync> {
        self._region.clone()
    }

    /// Tensor `i`'s bytes, to fill in place. `None` if `i` is out of range.
    pub fn tensor_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let (p, n) = self.tensor_raw(i)?;
        // SAFETY: the layout placed tensor `i` at `offsets[i]..+nbytes[i]`, inside the
        // frame, which fits the response buffer; the buffer belongs to this reservation until
        // it is published, and `&mut self` makes this the only access from Rust.
        Some(unsafe { std::slice::from_raw_parts_mut(p, n) })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.sent {
            // Cancelled: the buffer goes back to the pool unsent.
            self._region.release(self.slot, true, self.buf);
        }
        self.open.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reservation(slot {}, request {}, {} tensors)",
            self.slot,
            self.request_id,
            self.offsets.len()
        )
    }
}

/// The server's view of one slot.
struct ServerSlot {
    /// Next request queue position to pop (the server is the only writer of the request
    /// tail).
    read: u64,
    /// Next response buffer to publish (the server is the only writer of the response head).
    resp_head: u64,
    /// Last attach number acknowledged.
    acked: u32,
    /// Pid of the client being served, 0 = none.
    client: u32,
    /// Bumped whenever the slot changes hands.
    epoch: u64,
    unanswered: VecDeque<u64>,
    /// The open reservation, if any (false once it was dropped), and its response buffer.
    reservation: Option<(Arc<AtomicBool>, u32)>,
    /// The client broke the ring protocol; ignored until the slot is attached again.
    broken: bool,
}

/// The server endpoint of the shared-memory transport.
pub struct ShmServer {
    path: PathBuf,
    region: Option<Arc<Region>>,
    lock: Option<LockFile>,
    file_id: (u64, u64),
    limits: Limits,
    num_slots: usize,
    slots: Vec<ServerSlot>,
    last_liveness: Instant,
    /// This process's pid, marking the request buffers its messages hold.
    pid: u32,
    owner: Owner,
    /// Reports for the embedding program (corrupt slots found and reset), oldest first, at
    /// most `MAX_NOTICES`; `notices_lost` counts those that did not fit.
    notices: Vec<String>,
    notices_lost: usize,
}

/// Most reports a server keeps until [`ServerEndpoint::take_notices`] collects them.
const MAX_NOTICES: usize = 64;

fn check_parent(path: &Path) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(parent.to_path_buf()),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "cannot create {}: {} is not a directory",
            path.display(),
            parent.display()
        ))),
        Err(e) => Err(Error::io_path(
            "cannot create shared-memory file: no directory",
            parent,
            e,
        )),
    }
}

fn mib(n: u64) -> f64 {
    n as f64 / (1u64 << 20) as f64
}

fn no_space(path: &Path, geo: &Geometry, free: Option<u64>) -> Error {
    let free = match free {
        Some(f) => format!("{f} bytes ({:.1} MiB)", mib(f)),
        None => "less".to_owned(),
    };
    Error::Capacity(format!(
        "cannot reserve {} bytes ({:.1} MiB) for the shared-memory file {}: {free} free there \
         ({} slots x 2 rings x {} buffers of {} bytes); lower max_nbytes, num_slots or \
         ring_depth, or enlarge the filesystem",
        geo.file_len,
        mib(geo.file_len),
        path.display(),
        geo.num_slots,
        geo.depth,
        geo.capacity
    ))
}

fn free_space(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

impl ShmServer {
    fn what_server(&self) -> String {
        format!("the server at {}", self.path.display())
    }

    /// Create the shared-memory file at `path` (a bare name goes under `/dev/shm`) with
    /// `num_slots` slots and `ring_depth` buffers per ring and direction.
    pub fn create(
        path: impl AsRef<Path>,
        num_slots: usize,
        limits: Limits,
        ring_depth: usize,
    ) -> Result<ShmServer> {
        let geo = Geometry::new(num_slots, ring_depth, limits)?;
        let path = resolve_path(path.as_ref());
        let parent = check_parent(&path)?;
        let lock_p = lock_path(&path);
        let mut lock = LockFile::try_acquire(&lock_p, true)?.ok_or_else(|| {
            Error::AddressInUse(format!(
                "cannot serve on {}: another server is running there (it holds {})",
                path.display(),
                lock_p.display()
            ))
        })?;
        let result = (|| {
            lock.write_pid()?;
            Self::build(&path, &parent, geo)
        })();
        let (region, file_id) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&lock_p);
                return Err(e);
            }
        };
        let region = Arc::new(region);
        let slots = (0..num_slots)
            .map(|_| ServerSlot {
                read: 0,
                resp_head: 0,
                acked: 0,
                client: 0,
                epoch: 0,
                unanswered: VecDeque::new(),
                reservation: None,
                broken: false,
            })
            .collect();
        Ok(ShmServer {
            path,
            region: Some(region),
            lock: Some(lock),
            file_id,
            limits,
            num_slots,
            slots,
            last_liveness: Instant::now(),
            pid: std::process::id(),
            owner: Owner::here(),
            notices: Vec::new(),
            notices_lost: 0,
        })
    }

    /// Build the file under a temporary name, then rename it over `path`.
    fn build(path: &Path, parent: &Path, geo: Geometry) -> Result<(Region, (u64, u64))> {
        // A stale file of a dead server is replaced; anything else is not ours to replace.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => {
                return Err(Error::Io {
                    context: format!(
                        "cannot serve on {}: the path exists and is not a regular file; \
                         refusing to replace it",
                        path.display()
                    ),
                    source: std::io::Error::from(ErrorKind::AlreadyExists),
                })
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io_path("cannot inspect", path, e)),
        }
        let free = free_space(parent);
        if matches!(free, Some(f) if f < geo.file_len) {
            return Err(no_space(path, &geo, free));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(
            ".{name}.{}.{:x}.tmp",
            std::process::id(),
            rand_u64()
        ));
        let at_tmp = |what: &str| temp_context(what, path, &tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(
                (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32,
            )
            .open(&tmp)
            .map_err(|e| Error::io(at_tmp("cannot create shared-memory file"), e))?;
        let result = (|| {
            match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, geo.file_len)
            {
                Ok(()) => {}
                Err(rustix::io::Errno::NOSPC) => {
                    return Err(no_space(path, &geo, free_space(parent)));
                }
                // A filesystem without fallocate: size the file; pages come on first touch.
                Err(rustix::io::Errno::OPNOTSUPP) => file
                    .set_len(geo.file_len)
                    .map_err(|e| Error::io(at_tmp("cannot size shared-memory file"), e))?,
                Err(e) => return Err(Error::io(at_tmp("cannot reserve space for"), e)),
            }
            let map = MmapOptions::new()
                .len(geo.file_len as usize)
                .map_raw(&file)
                .map_err(|e| Error::io(at_tmp("cannot map shared-memory file"), e))?;
            let region = Region {
                map,
                geo,
                owner: Owner::here(),
            };
            let w32 = |o: usize, v: u32| region.u32_at(o).store(v, Ordering::Relaxed);
            let w64 = |o: usize, v: u64| region.u64_at(o).store(v, Ordering::Relaxed);
            w64(off::MAGIC, u64::from_ne_bytes(SHM_MAGIC));
            w32(off::VERSION, LAYOUT_VERSION);
            w32(off::NUM_SLOTS, geo.num_slots as u32);
            w32(off::RING_DEPTH, geo.depth as u32);
            w32(off::MAX_TENSORS, geo.limits.max_tensors);
            w32(off::MAX_DIMS, geo.limits.max_dims);
            w32(off::SERVER_PID, std::process::id());
            w64(off::CAPACITY, geo.capacity);
            w64(off::MAX_PAYLOAD, geo.limits.max_payload_bytes);
            w64(off::SLOT_STRIDE, geo.slot_stride);
            w64(off::FILE_LEN, geo.file_len);
            // Release: every header field (and the zeroed slots) before `ready`.
            region.ready().store(READY, Ordering::Release);
            std::fs::rename(&tmp, path).at("cannot move shared-memory file to", path)?;
            let md = file.metadata().at("cannot inspect", path)?;
            Ok((region, (md.dev(), md.ino())))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn region(&self) -> Result<Arc<Region>> {
        self.region.clone().ok_or(Error::Closed)
    }

    /// Give up every request of `slot` not yet handed out. `producer_gone`: the client that
    /// wrote them closed or died, so a request buffer still marked busy outside the queue
    /// was left half-written and goes back to the pool too.
    fn drop_unread(region: &Region, slot: usize, st: &mut ServerSlot, producer_gone: bool) {
        let head = region.head(slot, false).load(Ordering::Acquire);
        let depth = region.geo.depth as u64;
        // A head outside read..=read+K is garbage; nothing in between is a frame.
        let end = if head >= st.read && head - st.read <= depth {
            head
        } else {
            st.read
        };
        region.free_queued(slot, false, st.read, end);
        st.read = end;
        // Release: our reads of the queue entries before the client may reuse the positions.
        region.tail(slot, false).store(end, Ordering::Release);
        if producer_gone {
            for b in 0..depth as u32 {
                let state = region.state(slot, false, b);
                if state.load(Ordering::Acquire) == BUSY {
                    region.release(slot, false, b);
                }
            }
        }
        st.unanswered.clear();
        region.slot_event(slot, off::REQ_SPACE_EVENT).notify();
    }

    /// Keep a report for [`ServerEndpoint::take_notices`].
    fn notice(&mut self, text: String) {
        if self.notices.len() < MAX_NOTICES {
            self.notices.push(text);
        } else {
            self.notices_lost += 1;
        }
    }

    /// Acknowledge new attaches (first resetting every ring word of the slot, whatever the
    /// previous holder or anyone else left) and, at most every `INTERRUPT_CHECK` (or when
    /// `force`), forget clients that closed or died and reset idle slots found corrupt.
    fn sync_slots(&mut self, region: &Region, force: bool) {
        let mut notes = Vec::new();
        let path = self.path.display();
        for (s, st) in self.slots.iter_mut().enumerate() {
            let a = region.slot_u32(s, off::ATTACH_SEQ).load(Ordering::Acquire);
            if a != st.acked {
                if let Some(fault) = lease::server_fault(region, s, st) {
                    notes.push(format!(
                        "slot {s} of {path} was corrupt ({fault}); reset it for the client \
                         attaching to it"
                    ));
                }
                lease::reset(region, s, st, self.pid);
                st.client = region.slot_u32(s, off::LEASE).load(Ordering::Acquire);
                st.epoch += 1;
                st.broken = false;
                st.acked = a;
                // Release: the reset and every response published so far come before the
                // acknowledgement, which the client reads with acquire.
                region.slot_u32(s, off::ACK_SEQ).store(a, Ordering::Release);
                region.slot_event(s, off::RESP_EVENT).notify();
            }
        }
        if force || self.last_liveness.elapsed() >= INTERRUPT_CHECK {
            self.last_liveness = Instant::now();
            for (s, st) in self.slots.iter_mut().enumerate() {
                if st.client != 0 {
                    let lease = region.slot_u32(s, off::LEASE).load(Ordering::Acquire);
                    if lease == st.client && pid_alive(lease) {
                        continue;
                    }
                    Self::drop_unread(region, s, st, true);
                    st.client = 0;
                    st.epoch += 1;
                }
                // No client holds the slot: one found corrupt is reset now, so that leasing
                // finds it whole (a client that leases it meanwhile waits for the
                // acknowledgement, which resets it again).
                if let Some(fault) = lease::server_fault(region, s, st) {
                    lease::reset(region, s, st, self.pid);
                    st.broken = false;
                    notes.push(format!(
                        "slot {s} of {path} was corrupt ({fault}) while no client held it; \
                         reset it, it can be leased again"
                    ));
                }
            }
        }
        for n in notes {
            self.notice(n);
        }
    }

    /// Requests published and not yet handed out on `slot`.
    fn pending(&mut self, region: &Region, slot: usize) -> u64 {
        let st = &mut self.slots[slot];
        if st.client == 0 || st.broken {
            return 0;
        }
        let head = region.head(slot, false).load(Ordering::Acquire);
        if head < st.read || head - st.read > region.geo.depth as u64 {
            let (read, client) = (st.read, st.client);
            st.broken = true;
            Self::drop_unread(region, slot, st, false);
            self.broke(
                slot,
                client,
                format_args!("request head {head}, tail {read}"),
            );
            return 0;
        }
        head - st.read
    }

    /// Report that the client on `slot` broke the ring protocol (the caller marked the slot
    /// broken: its requests are ignored until it leaves, and the slot is reset then).
    fn broke(&mut self, slot: usize, client: u32, what: std::fmt::Arguments<'_>) {
        let text = format!(
            "the client (pid {client}) on slot {slot} of {} broke the ring protocol ({what}); \
             its requests are ignored, and the slot is reset once it leaves",
            self.path.display()
        );
        self.notice(text);
    }

    fn ready_slots(&mut self, region: &Region) -> Vec<usize> {
        (0..self.num_slots)
            .filter(|&s| self.pending(region, s) > 0)
            .collect()
    }

    fn no_client(&self, slot: usize) -> Error {
        Error::PeerGone(format!(
            "no client holds slot {slot} of the server at {}",
            self.path.display()
        ))
    }

    /// Take a free response buffer of `slot` (marked busy: publish it or release it),
    /// after checking that no reservation is open.
    fn claim_response(&mut self, region: &Region, slot: usize) -> Result<u32> {
        check_slot(slot, self.num_slots, &self.path)?;
        // A client that closed gave its lease up at once; the server forgets it only at its
        // next liveness round, so look at the lease word too (as the stream transports see
        // a closed connection at once).
        let client = self.slots[slot].client;
        if client == 0 || region.slot_u32(slot, off::LEASE).load(Ordering::Acquire) != client {
            return Err(self.no_client(slot));
        }
        let path = self.path.display().to_string();
        let st = &mut self.slots[slot];
        if let Some((open, _)) = &st.reservation {
            if open.load(Ordering::Acquire) {
                return Err(Error::InvalidArgument(format!(
                    "slot {slot} of {path} has an unpublished reservation; publish or drop it first"
                )));
            }
            st.reservation = None;
        }
        let depth = region.geo.depth as u64;
        let tail = region.tail(slot, true).load(Ordering::Acquire);
        if tail > st.resp_head || st.resp_head - tail > depth {
            return Err(Error::Protocol(format!(
                "the client on slot {slot} of {path} corrupted its response ring (tail {tail}, head {})",
                st.resp_head
            )));
        }
        let full = || {
            Error::Capacity(format!(
                "the response ring of slot {slot} of {path} is full: all {depth} buffers are \
                 queued or held by live messages (the client stopped reading or keeps them \
                 alive); nothing was sent"
            ))
        };
        if st.resp_head - tail == depth {
            return Err(full());
        }
        region.take_free(slot, true).ok_or_else(full)
    }

    /// Make response buffer `buf` of `slot` visible to the client; `answers` says whether it
    /// answers the oldest unanswered request.
    fn publish_buf(&mut self, region: &Region, slot: usize, buf: u32, answers: bool) {
        let st = &mut self.slots[slot];
        region.publish_buf(slot, true, st.resp_head, buf);
        st.resp_head += 1;
        if answers {
            st.unanswered.pop_front();
        }
        region.slot_event(slot, off::RESP_EVENT).notify();
    }

    /// Publish an error frame for request `rid` on `slot` (`answers`: it answers the oldest
    /// unanswered request; otherwise it answers a request that was never handed out).
    fn write_error(
        &mut self,
        slot: usize,
        rid: u64,
        code: u32,
        message: &str,
        answers: bool,
    ) -> Result<()> {
        let region = self.region()?;
        // An error frame takes 128 bytes before its message; cut the message to fit a buffer.
        let mut end = message
            .len()
            .min((region.geo.capacity as usize).saturating_sub(2 * frame::ALIGN as usize));
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let buf = frame::encode_error(rid, slot as u32, code, &message[..end]);
        let bytes = buf.as_slice();
        if bytes.len() as u64 > region.geo.capacity {
            return Err(Error::Capacity(format!(
                "an error frame of {} bytes does not fit the {}-byte buffers of {}",
                bytes.len(),
                region.geo.capacity,
                self.path.display()
            )));
        }
        let b = self.claim_response(&region, slot)?;
        let ptr = region.buf_ptr(slot, true, b);
        // SAFETY: response buffer `b` was free and is now marked busy by us (claim_response),
        // so only the server writes it until it is published; `bytes` fits its capacity
        // (checked above).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
        self.publish_buf(&region, slot, b, answers);
        Ok(())
    }

    /// Lay out a response frame for `specs` in the next response buffer of `slot` and hand
    /// out its tensors to fill in place; [`ShmServer::publish`] sends it. `meta.request_id`
    /// and `meta.slot` are filled in. Never blocks: a full ring is [`Error::Capacity`]. One
    /// reservation may be open per slot; until it is published or dropped, `send`,
    /// `send_error` and `reserve` on that slot are refused.
    pub fn reserve(
        &mut self,
        slot: usize,
        mut meta: Meta,
        specs: &[TensorSpec<'_>],
    ) -> Result<Reservation> {
        self.owner.check(|| self.what_server())?;
        let region = self.region()?;
        check_slot(slot, self.num_slots, &self.path)?;
        let lay = frame::layout(specs, &self.limits).map_err(|e| match e {
            Error::Capacity(m) => Error::Capacity(format!(
                "response on slot {slot} of {}: {m}",
                self.path.display()
            )),
            other => other,
        })?;
        let b = self.claim_response(&region, slot)?;
        let st = &mut self.slots[slot];
        meta.slot = slot as u32;
        meta.request_id = st.unanswered.front().copied().unwrap_or(0);
        let ptr = region.buf_ptr(slot, true, b);
        // SAFETY: response buffer `b` was free and is now marked busy by us (claim_response),
        // so only the server writes it until it is published or released; `total_len <=
        // max_frame_len <= capacity`, the buffer's size inside the mapping.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr, lay.total_len as usize) };
        frame::write_prefix(out, &meta, specs, &lay);
        let open = Arc::new(AtomicBool::new(true));
        st.reservation = Some((Arc::clone(&open), b));
        Ok(Reservation {
            _region: region,
            open,
            slot,
            buf: b,
            sent: false,
            epoch: st.epoch,
            request_id: meta.request_id,
            ptr,
            offsets: lay.offsets,
            nbytes: lay.nbytes,
        })
    }

    /// Publish a filled reservation: the client can now receive it.
    pub fn publish(&mut self, mut r: Reservation) -> Result<()> {
        self.owner.check(|| self.what_server())?;
        let region = self.region()?;
        let st = &mut self.slots[r.slot];
        let current = matches!(&st.reservation, Some((o, _)) if Arc::ptr_eq(o, &r.open));
        if !current {
            return Err(Error::InvalidArgument(format!(
                "this reservation on slot {} of {} is not the slot's open one; nothing was sent",
                r.slot,
                self.path.display()
            )));
        }
        st.reservation = None;
        if st.epoch != r.epoch || st.client == 0 {
            return Err(Error::PeerGone(format!(
                "the client on slot {} of {} went away since reserve(); nothing was sent",
                r.slot,
                self.path.display()
            )));
        }
        r.sent = true;
        self.publish_buf(&region, r.slot, r.buf, true);
        Ok(())
    }
}

impl ServerEndpoint for ShmServer {
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
        let region = self.region()?;
        let deadline = Deadline::after(timeout);
        let bell = region.doorbell();
        let mut checked = Instant::now();
        let mut force = false;
        loop {
            // Read the doorbell before scanning: a request published after the scan bumps it,
            // so the sleep below returns at once (see crate::sync).
            let seen = bell.current();
            self.sync_slots(&region, force);
            force = false;
            let ready = self.ready_slots(&region);
            if !ready.is_empty() {
                return Ok(ready);
            }
            if timeout == Some(Duration::ZERO) {
                return Ok(Vec::new());
            }
            let slice = deadline.slice();
            let woke =
                bell.spin(seen, slice, &mut || false) || bell.sleep(seen, slice) == Wake::Woken;
            if !woke || checked.elapsed() >= INTERRUPT_CHECK {
                checked = Instant::now();
                force = true;
                interrupt()?;
            }
            if deadline.expired() {
                return Err(deadline
                    .timeout_error(format!("waiting for requests on {}", self.path.display())));
            }
        }
    }

    fn is_ready_slot(&mut self, slot: usize) -> Result<bool> {
        self.owner.check(|| self.what_server())?;
        let region = self.region()?;
        check_slot(slot, self.num_slots, &self.path)?;
        self.sync_slots(&region, false);
        Ok(self.pending(&region, slot) > 0)
    }

    fn recv(&mut self, slot: usize) -> Result<Option<Message>> {
        self.owner.check(|| self.what_server())?;
        let region = self.region()?;
        check_slot(slot, self.num_slots, &self.path)?;
        self.sync_slots(&region, false);
        while self.pending(&region, slot) > 0 {
            let st = &mut self.slots[slot];
            let pos = st.read;
            st.read += 1;
            let b = match region.pop(slot, false, pos, self.pid) {
                Ok(b) => b,
                Err(e) => {
                    // The client broke the ring protocol: ignore it until it attaches again.
                    let client = st.client;
                    st.broken = true;
                    Self::drop_unread(&region, slot, st, false);
                    self.broke(slot, client, format_args!("{e}"));
                    return Ok(None);
                }
            };
            let ptr = region.buf_ptr(slot, false, b);
            let decoded = decode_at(ptr, region.geo.capacity, &self.limits);
            let (len, decoded) = match decoded {
                Ok(d) => d,
                Err(e) => {
                    region.release(slot, false, b);
                    region.slot_event(slot, off::REQ_SPACE_EVENT).notify();
                    // Tell the client why; this error answers the bad request. (Best effort:
                    // a full ring means the client broke the protocol anyway.)
                    let _ = self.write_error(slot, 0, error_code::PROTOCOL, &e.to_string(), false);
                    continue;
                }
            };
            let lease = ShmLease {
                region: Arc::clone(&region),
                slot,
                response: false,
                buf: b,
                ptr,
                len,
                live: None,
            };
            let m = decoded.header.meta;
            if let Some(text) = client_frame_refusal(&m) {
                drop(lease);
                let _ = self.write_error(slot, m.request_id, error_code::ROLE, &text, false);
                continue;
            }
            st.unanswered.push_back(m.request_id);
            return Ok(Some(Message::shared(lease, decoded)));
        }
        Ok(None)
    }

    fn send(&mut self, slot: usize, meta: Meta, tensors: &[TensorRef<'_>]) -> Result<()> {
        self.owner.check(|| self.what_server())?;
        let mut r = self.reserve(slot, meta, &frame::specs_of(tensors))?;
        for (i, t) in tensors.iter().enumerate() {
            let dst = r.tensor_mut(i).unwrap_or(&mut []);
            frame::check_data_len(i, t, dst.len() as u64)?;
            dst.copy_from_slice(t.data);
        }
        self.publish(r)
    }

    fn send_error(&mut self, slot: usize, code: u32, message: &str) -> Result<()> {
        self.owner.check(|| self.what_server())?;
        let rid = match self.slots.get(slot) {
            Some(st) => st.unanswered.front().copied().unwrap_or(0),
            None => 0,
        };
        self.write_error(slot, rid, code, message, true)
    }

    /// Reports of what the server found and repaired in its file (a slot whose ring words
    /// were corrupt, by a peer or another process of the user; a client that broke the ring
    /// protocol), oldest first, since the last call. The embedding program logs them.
    fn take_notices(&mut self) -> Vec<String> {
        let mut out = std::mem::take(&mut self.notices);
        if self.notices_lost > 0 {
            out.push(format!(
                "{} more reports about {} were dropped",
                std::mem::take(&mut self.notices_lost),
                self.path.display()
            ));
        }
        out
    }

    fn is_connected(&self, slot: usize) -> bool {
        let Some(region) = &self.region else {
            return false;
        };
        if slot >= self.num_slots || self.slots[slot].client == 0 {
            return false;
        }
        let c = self.slots[slot].client;
        region.slot_u32(slot, off::LEASE).load(Ordering::Acquire) == c && pid_alive(c)
    }

    fn close(&mut self) {
        if !self.owner.is_here() {
            // A forked child's copy: the file, its clients and the lock are the parent's.
            self.region = None;
            self.slots.clear();
            self.lock = None;
            return;
        }
        if let Some(region) = self.region.take() {
            // Tell waiting clients: they see CLOSED and end with PeerGone.
            region.ready().store(CLOSED, Ordering::Release);
            futex_wake_all(region.ready());
            for s in 0..self.num_slots {
                region.slot_event(s, off::RESP_EVENT).wake_all();
                region.slot_event(s, off::REQ_SPACE_EVENT).wake_all();
            }
            // Remove the file only if it is still ours.
            if let Ok(m) = std::fs::symlink_metadata(&self.path) {
                if (m.dev(), m.ino()) == self.file_id {
                    let _ = std::fs::remove_file(&self.path);
                }
            }
        }
        self.slots.clear();
        if let Some(lock) = self.lock.take() {
            let _ = std::fs::remove_file(lock.path());
        }
    }
}

impl Drop for ShmServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// What a look at the file found.
enum Inspect {
    Ready(Region),
    /// Not (yet) initialised; the mapping, if any, to wait on its `ready` word.
    NotReady(Option<MmapRaw>),
}

fn bad_file(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Protocol(format!(
        "{} is not a usable SensAI shared-memory file: {why}",
        path.display()
    ))
}

fn inspect(path: &Path, file: &File) -> Result<Inspect> {
    let md = file.metadata().at("cannot inspect", path)?;
    if !md.file_type().is_file() {
        return Err(bad_file(path, "it is not a regular file"));
    }
    // Only a file of our own user that nobody else may write to: another user's file could
    // be a server of theirs, which would read our requests and answer them.
    check_private("shared-memory file", path, &md, 0o022, "0600", "attach")?;
    let len = md.len();
    if len == 0 {
        return Ok(Inspect::NotReady(None));
    }
    if len < HEADER_REGION {
        let mut magic = [0u8; 8];
        let n = file.read_at(&mut magic, 0).at("cannot read", path)?;
        if n < 8 || magic != SHM_MAGIC {
            return Err(bad_file(path, format_args!("bad magic {magic:02x?}")));
        }
        return Err(bad_file(
            path,
            format_args!("truncated to {len} bytes (the header alone takes {HEADER_REGION})"),
        ));
    }
    let map = MmapOptions::new()
        .len(len as usize)
        .map_raw(file)
        .at("cannot map", path)?;
    // Read the header through a region whose geometry is not validated yet: only header
    // offsets (< HEADER_REGION <= len) are touched below until it is.
    let probe = Region {
        map,
        geo: Geometry {
            num_slots: 0,
            depth: MIN_RING_DEPTH,
            capacity: 0,
            limits: Limits::default(),
            slot_stride: 0,
            file_len: len,
        },
        owner: Owner::here(),
    };
    let r32 = |o: usize| probe.u32_at(o).load(Ordering::Relaxed);
    let r64 = |o: usize| probe.u64_at(o).load(Ordering::Relaxed);
    // Acquire: pairs with the server's release store, making every header field visible.
    let ready = probe.ready().load(Ordering::Acquire);
    let magic = r64(off::MAGIC).to_ne_bytes();
    if magic == [0; 8] && ready == 0 {
        return Ok(Inspect::NotReady(Some(probe.map)));
    }
    if magic != SHM_MAGIC {
        let hint = if magic[..4] == frame::MAGIC[..] {
            " (a frame, not a transport file)"
        } else {
            ""
        };
        return Err(bad_file(path, format_args!("bad magic {magic:02x?}{hint}")));
    }
    let version = r32(off::VERSION);
    if version != LAYOUT_VERSION {
        return Err(bad_file(
            path,
            format_args!("layout version {version}, this build speaks version {LAYOUT_VERSION}"),
        ));
    }
    match ready {
        READY => {}
        CLOSED => {
            return Err(Error::PeerGone(format!(
                "the server at {} has closed",
                path.display()
            )))
        }
        0 => return Ok(Inspect::NotReady(Some(probe.map))),
        other => return Err(bad_file(path, format_args!("bad ready word {other:#x}"))),
    }
    let limits = Limits::new(
        r32(off::MAX_TENSORS),
        r32(off::MAX_DIMS),
        r64(off::MAX_PAYLOAD),
    )
    .map_err(|e| bad_file(path, format_args!("invalid limits in the header: {e}")))?;
    let geo = Geometry::new(
        r32(off::NUM_SLOTS) as usize,
        r32(off::RING_DEPTH) as usize,
        limits,
    )
    .map_err(|e| bad_file(path, format_args!("invalid layout in the header: {e}")))?;
    for (field, found, want) in [
        ("capacity", r64(off::CAPACITY), geo.capacity),
        ("slot stride", r64(off::SLOT_STRIDE), geo.slot_stride),
        ("file length", r64(off::FILE_LEN), geo.file_len),
    ] {
        if found != want {
            return Err(bad_file(
                path,
                format_args!("header field '{field}' is {found}, its parameters imply {want}"),
            ));
        }
    }
    if len != geo.file_len {
        return Err(bad_file(
            path,
            format_args!(
                "the file has {len} bytes, its header describes {} (truncated or extended)",
                geo.file_len
            ),
        ));
    }
    let pid = r32(off::SERVER_PID);
    if pid == 0 || !pid_alive(pid) {
        return Err(Error::PeerGone(format!(
            "the server (pid {pid}) that created {} is gone",
            path.display()
        )));
    }
    Ok(Inspect::Ready(Region {
        map: probe.map,
        geo,
        owner: probe.owner,
    }))
}

/// The client endpoint of the shared-memory transport.
pub struct ShmClient {
    path: PathBuf,
    region: Option<Arc<Region>>,
    slot: usize,
    limits: Limits,
    /// This process's pid: the slot lease and the held-buffer marks.
    me: u32,
    server_pid: u32,
    /// Next request queue position to publish (the client is the only writer of the
    /// request head).
    req_head: u64,
    /// Next response queue position to pop (the client is the only writer of the response
    /// tail).
    resp_read: u64,
    next_id: u64,
    /// Ids of the requests sent and not yet answered, oldest first.
    outstanding: VecDeque<u64>,
    /// Requests with ids up to this one were given up on (see `recv_for`): their answers
    /// are discarded when they arrive.
    abandoned_upto: u64,
    owner: Owner,
    /// This client's received messages still alive (each holds a response buffer).
    live: Arc<AtomicUsize>,
}

/// Wait for `ready()` on `event`, spinning briefly, then sleeping in slices; checks the
/// interrupt callback and `alive()` between slices.
fn wait_event(
    event: Event<'_>,
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    alive: &mut dyn FnMut() -> Result<()>,
    what: &dyn Fn() -> String,
    ready: &mut dyn FnMut() -> Result<bool>,
) -> Result<()> {
    let mut checked = Instant::now();
    loop {
        let seen = event.current();
        if ready()? {
            return Ok(());
        }
        let slice = deadline.slice();
        let woke = event.spin(seen, slice, &mut || matches!(ready(), Ok(true)))
            || event.sleep(seen, slice) == Wake::Woken;
        if !woke || checked.elapsed() >= INTERRUPT_CHECK {
            checked = Instant::now();
            interrupt()?;
            alive()?;
        }
        if deadline.expired() {
            if ready()? {
                return Ok(());
            }
            return Err(deadline.timeout_error(what()));
        }
    }
}

impl ShmClient {
    /// Attach to the server's file at `path` (a bare name is looked up under `/dev/shm`) and
    /// lease `slot` (or any free one), waiting up to `connect_timeout` for a server that is
    /// still starting and for its acknowledgement.
    pub fn attach(
        path: impl AsRef<Path>,
        slot: Option<usize>,
        connect_timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<ShmClient> {
        let path = resolve_path(path.as_ref());
        let deadline = Deadline::after(connect_timeout);
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Set up only when there is something to wait for: closing an inotify descriptor
        // waits for an RCU grace period (milliseconds), too slow for every attach.
        let mut watch: Option<DirWatch> = None;
        let region = loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(
                    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32,
                )
                .open(&path);
            let waiting = match file {
                Ok(f) => match inspect(&path, &f)? {
                    Inspect::Ready(r) => break r,
                    Inspect::NotReady(map) => map,
                },
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    if deadline.expired() {
                        return Err(Error::PeerGone(format!(
                            "no server has created {} (waited {:.1}s)",
                            path.display(),
                            deadline.elapsed().as_secs_f64()
                        )));
                    }
                    None
                }
                Err(e) => return Err(Error::io_path("cannot open", &path, e)),
            };
            if waiting.is_none() && watch.is_none() {
                // Watch, then look again, so a file that appears in between still wakes us.
                watch = Some(DirWatch::new(&[&dir]));
                continue;
            }
            if deadline.expired() {
                return Err(deadline.timeout_error(format!(
                    "waiting for the server to finish creating {}",
                    path.display()
                )));
            }
            interrupt()?;
            match waiting {
                Some(map) => {
                    // SAFETY: the mapping is at least HEADER_REGION bytes (checked by
                    // `inspect`) and page-aligned, so the ready word at offset 64 is in
                    // bounds and aligned; it is only accessed atomically and `map` outlives
                    // the reference.
                    let word =
                        unsafe { AtomicU32::from_ptr(map.as_mut_ptr().add(off::READY).cast()) };
                    futex_wait(word, 0, deadline.slice());
                }
                // No file yet: it appears by an atomic rename, which the watch reports.
                None => {
                    if let Some(w) = &watch {
                        w.wait(&deadline)?;
                    }
                }
            }
        };
        let region = Arc::new(region);
        let num_slots = region.geo.num_slots;
        let server_pid = region.u32_at(off::SERVER_PID).load(Ordering::Relaxed);
        let me = std::process::id();
        let candidates: Vec<usize> = match slot {
            Some(s) if s >= num_slots => return Err(slot_out_of_range(s, Some(num_slots), &path)),
            Some(s) => vec![s],
            None => lease::lease_order(&region, me),
        };
        let mut holder = 0;
        let mut corrupt = None;
        for s in candidates {
            let lease = region.slot_u32(s, off::LEASE);
            let cur = lease.load(Ordering::Acquire);
            if !lease::lease_free(cur, me) {
                holder = cur;
                continue;
            }
            // AcqRel: the lease is taken before anything of the slot is touched, and the
            // previous holder's last accesses happen before ours.
            if lease
                .compare_exchange(cur, me, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            match Self::attach_slot(&region, s, &path, server_pid, &deadline, interrupt) {
                // Without a slot id, a slot found corrupt after the server's reset (written
                // again meanwhile) is left for the next free one.
                Err(e @ Error::Protocol(_)) if slot.is_none() => corrupt = Some(e),
                other => return other,
            }
        }
        if let Some(e) = corrupt {
            return Err(e);
        }
        Err(Error::Capacity(match slot {
            Some(s) => format!(
                "slot {s} of the server at {} is in use by another client (pid {holder})",
                path.display()
            ),
            None => format!(
                "all {num_slots} slots of the server at {} are in use",
                path.display()
            ),
        }))
    }

    /// Finish attaching to `slot`, whose lease this process has just taken: announce the
    /// attach, wait for the server to reset the slot and acknowledge, and take over the
    /// rings. The lease is given back on any error.
    fn attach_slot(
        region: &Arc<Region>,
        slot: usize,
        path: &Path,
        server_pid: u32,
        deadline: &Deadline,
        interrupt: Interrupt<'_>,
    ) -> Result<ShmClient> {
        let me = std::process::id();
        let release_lease = || {
            let _ = region.slot_u32(slot, off::LEASE).compare_exchange(
                me,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        };
        // Announce the attach and wait for the server to reset the slot for us.
        let a = region
            .slot_u32(slot, off::ATTACH_SEQ)
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        region.doorbell().notify();
        let what = || {
            format!(
                "waiting for the server at {} to acknowledge slot {slot} (is it serving?)",
                path.display()
            )
        };
        let acked = wait_event(
            region.slot_event(slot, off::RESP_EVENT),
            deadline,
            interrupt,
            &mut || server_alive(region, server_pid, path),
            &what,
            &mut || Ok(region.slot_u32(slot, off::ACK_SEQ).load(Ordering::Acquire) == a),
        );
        if let Err(e) = acked {
            release_lease();
            return Err(e);
        }
        // The server reset the slot before acknowledging. Free what a previous holder may
        // still have left (a server of an older build does not reset): responses queued and
        // never read, and buffers held by processes that are gone. Buffers held by live
        // messages (of a client that closed while keeping them, possibly in this process)
        // stay as they are.
        let resp_tail = region.tail(slot, true).load(Ordering::Acquire);
        let resp_head = region.head(slot, true).load(Ordering::Acquire);
        if resp_head < resp_tail || resp_head - resp_tail > region.geo.depth as u64 {
            release_lease();
            return Err(Error::Protocol(format!(
                "the response ring of slot {slot} of {} is corrupt (tail {resp_tail}, head \
                 {resp_head}), written by another process since the server reset it; the \
                 server resets it again once no client holds it",
                path.display()
            )));
        }
        region.free_queued(slot, true, resp_tail, resp_head);
        region.tail(slot, true).store(resp_head, Ordering::Release);
        for b in 0..region.geo.depth as u32 {
            let state = region.state(slot, true, b);
            let s = state.load(Ordering::Acquire);
            if let Some(pid) = holder_of(s) {
                if pid != me && !pid_alive(pid) {
                    // Only this client changes a dead holder's mark; a live one may free its
                    // own buffer concurrently, which the exchange then leaves alone.
                    let _ = state.compare_exchange(s, FREE, Ordering::AcqRel, Ordering::Relaxed);
                }
            }
        }
        let req_head = region.head(slot, false).load(Ordering::Acquire);
        let limits = region.geo.limits;
        Ok(ShmClient {
            path: path.to_path_buf(),
            region: Some(Arc::clone(region)),
            slot,
            limits,
            me,
            server_pid,
            req_head,
            resp_read: resp_head,
            next_id: 1,
            outstanding: VecDeque::new(),
            abandoned_upto: 0,
            owner: Owner::here(),
            live: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The ring depth K of the server's file.
    pub fn ring_depth(&self) -> usize {
        self.region.as_ref().map(|r| r.geo.depth).unwrap_or(0)
    }

    fn what(&self) -> String {
        format!("slot {} of {}", self.slot, self.path.display())
    }

    fn region_ref(&self) -> Result<Arc<Region>> {
        self.region.clone().ok_or(Error::Closed)
    }

    /// Published responses not yet received, after checking the server kept to the ring.
    fn available(&self, region: &Region) -> Result<u64> {
        let head = region.head(self.slot, true).load(Ordering::Acquire);
        if head < self.resp_read || head - self.resp_read > region.geo.depth as u64 {
            return Err(Error::Protocol(format!(
                "the server corrupted the response ring of {} (head {head}, read {})",
                self.what(),
                self.resp_read
            )));
        }
        Ok(head - self.resp_read)
    }

    /// Pop the next published response (the caller checked one is available) as a message
    /// that holds its buffer, and match it to the oldest outstanding request.
    fn take_response(&mut self, region: &Arc<Region>) -> Result<Message> {
        let pos = self.resp_read;
        self.resp_read += 1;
        let b = region.pop(self.slot, true, pos, self.me)?;
        let ptr = region.buf_ptr(self.slot, true, b);
        let decoded = decode_at(ptr, region.geo.capacity, &self.limits);
        // Relaxed: a count for error messages only; the lease's drop takes it back.
        self.live.fetch_add(1, Ordering::Relaxed);
        let lease = ShmLease {
            region: Arc::clone(region),
            slot: self.slot,
            response: true,
            buf: b,
            ptr,
            len: decoded.as_ref().map(|d| d.0).unwrap_or(0),
            live: Some(Arc::clone(&self.live)),
        };
        let (_, decoded) = decoded?;
        let msg = Message::shared(lease, decoded);
        let m = *msg.meta();
        let what = self.what();
        // The server writes each slot's frames into that slot's ring; anything else was
        // written by someone else (found by the shm_attach fuzz target).
        if m.slot as usize != self.slot {
            return Err(Error::Protocol(format!(
                "the response ring of {what} holds a frame addressed to slot {}",
                m.slot
            )));
        }
        take_answer(&mut self.outstanding, &m, &what)?;
        Ok(msg)
    }

    /// The error for a send with no response buffer left for its answer, true for this
    /// client: which buffers its own requests and messages take, and which ones messages
    /// of a previous client of the slot still pin (kept answers, of this process or
    /// another), with what to do.
    fn no_room(&self, region: &Region, held: usize) -> Error {
        let depth = region.geo.depth;
        let what = self.what();
        let awaited = self.outstanding.len();
        // Relaxed: a count for this message only.
        let mine = self.live.load(Ordering::Relaxed).min(held);
        let pinned = held - mine;
        if pinned == 0 {
            return Error::Capacity(format!(
                "all {depth} response buffers of {what} are in use ({awaited} requests await \
                 responses, {mine} buffers are held by this client's received messages still \
                 alive); receive or drop messages first"
            ));
        }
        let holders: Vec<u32> = (0..depth as u32)
            .filter_map(|b| holder_of(region.state(self.slot, true, b).load(Ordering::Relaxed)))
            .collect();
        let mut by: Vec<String> = Vec::new();
        if holders.iter().filter(|&&p| p == self.me).count() > mine {
            by.push("this process".to_owned());
        }
        let mut others: Vec<u32> = holders.into_iter().filter(|&p| p != self.me).collect();
        others.sort_unstable();
        others.dedup();
        by.extend(others.iter().map(|p| format!("process {p}")));
        let by = if by.is_empty() {
            "another process".to_owned()
        } else {
            by.join(" and ")
        };
        Error::Capacity(format!(
            "all {depth} response buffers of {what} are in use: this client awaits {awaited} \
             responses and this client's received messages hold {mine}; {pinned} are pinned \
             by messages a previous client of this slot received and {by} still keeps alive \
             (arrays or tensors viewing them); drop those, or close this client and connect \
             without a slot id, which prefers a slot nothing pins"
        ))
    }

    /// Make room for the answer to one more request: discard the answers to abandoned
    /// requests that already arrived, and wait (within `deadline`) for those still owed
    /// while they alone fill the response buffers. Requests the caller still waits for, or
    /// messages it keeps alive, filling them is [`Error::Capacity`] at once.
    fn room_for_answer(
        &mut self,
        region: &Arc<Region>,
        deadline: &Deadline,
        interrupt: Interrupt<'_>,
    ) -> Result<()> {
        let depth = region.geo.depth;
        loop {
            while self
                .outstanding
                .front()
                .is_some_and(|&id| id <= self.abandoned_upto)
                && self.available(region)? > 0
            {
                drop(self.take_response(region)?);
            }
            let held = region.held_count(self.slot, true);
            if self.outstanding.len() + held < depth {
                return Ok(());
            }
            let abandoned = self
                .outstanding
                .iter()
                .filter(|&&id| id <= self.abandoned_upto)
                .count();
            if abandoned == 0 {
                return Err(self.no_room(region, held));
            }
            // Wait for the late answers to arrive, then discard them.
            let what = self.what();
            let (path, pid, slot) = (self.path.clone(), self.server_pid, self.slot);
            let this = &*self;
            wait_event(
                region.slot_event(slot, off::RESP_EVENT),
                deadline,
                interrupt,
                &mut || server_alive(region, pid, &path),
                &|| {
                    format!(
                        "waiting for the late answers to {abandoned} abandoned request(s) to \
                         free the response buffers of {what}"
                    )
                },
                &mut || Ok(this.available(region)? > 0),
            )?;
        }
    }
}

fn server_alive(region: &Region, pid: u32, path: &Path) -> Result<()> {
    if region.ready().load(Ordering::Acquire) != READY {
        return Err(Error::PeerGone(format!(
            "the server at {} has closed",
            path.display()
        )));
    }
    if !pid_alive(pid) {
        return Err(Error::PeerGone(format!(
            "the server (pid {pid}) at {} is gone",
            path.display()
        )));
    }
    Ok(())
}

impl ClientEndpoint for ShmClient {
    fn slot(&self) -> usize {
        self.slot
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn send(
        &mut self,
        mut meta: Meta,
        tensors: &[TensorRef<'_>],
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<u64> {
        self.owner
            .check(|| format!("the client on {}", self.what()))?;
        check_client_kind(&meta)?;
        let region = self.region_ref()?;
        if region.ready().load(Ordering::Acquire) != READY {
            return Err(Error::PeerGone(format!(
                "the server at {} has closed",
                self.path.display()
            )));
        }
        let what = self.what();
        let (specs, lay) =
            frame::layout_data(tensors, &self.limits).map_err(|e| request_context(e, &what))?;
        let deadline = Deadline::after(timeout);
        // Room for the answer: responses owed plus buffers held by live messages.
        self.room_for_answer(&region, &deadline, interrupt)?;
        // Room for the request: wait for the server to free a request buffer.
        let depth = region.geo.depth as u64;
        let h = self.req_head;
        let (slot, path, pid) = (self.slot, self.path.clone(), self.server_pid);
        let mut buf = None;
        wait_event(
            region.slot_event(slot, off::REQ_SPACE_EVENT),
            &deadline,
            interrupt,
            &mut || server_alive(&region, pid, &path),
            &|| format!("waiting for room to send on {what}"),
            &mut || {
                let tail = region.tail(slot, false).load(Ordering::Acquire);
                if tail > h || h - tail > depth {
                    return Err(Error::Protocol(format!(
                        "the server corrupted the request ring of {what}"
                    )));
                }
                if buf.is_none() && h - tail < depth {
                    buf = region.take_free(slot, false);
                }
                Ok(buf.is_some())
            },
        )?;
        let Some(b) = buf else {
            return Err(deadline.timeout_error(format!("waiting for room to send on {what}")));
        };
        let id = self.next_id;
        meta.request_id = id;
        meta.slot = slot as u32;
        let ptr = region.buf_ptr(slot, false, b);
        // SAFETY: request buffer `b` was free and is now marked busy by us (take_free), so
        // only this client writes it until it publishes; the frame (`total_len <= capacity`)
        // fits it.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr, lay.total_len as usize) };
        frame::write_prefix(out, &meta, &specs, &lay);
        for (i, t) in tensors.iter().enumerate() {
            let o = lay.offsets[i] as usize;
            out[o..o + t.data.len()].copy_from_slice(t.data);
        }
        // Publish (release: the frame before the new head), then ring the server's doorbell.
        region.publish_buf(slot, false, h, b);
        region.doorbell().notify();
        self.req_head = h + 1;
        self.next_id += 1;
        self.outstanding.push_back(id);
        Ok(id)
    }

    fn is_ready(&mut self) -> Result<bool> {
        self.owner
            .check(|| format!("the client on {}", self.what()))?;
        let region = self.region_ref()?;
        Ok(self.available(&region)? > 0)
    }

    fn recv_raw(&mut self, timeout: Option<Duration>, interrupt: Interrupt<'_>) -> Result<Message> {
        self.owner
            .check(|| format!("the client on {}", self.what()))?;
        let region = self.region_ref()?;
        let what = self.what();
        let deadline = Deadline::after(timeout);
        let (path, pid) = (self.path.clone(), self.server_pid);
        {
            let this = &*self;
            wait_event(
                region.slot_event(this.slot, off::RESP_EVENT),
                &deadline,
                interrupt,
                &mut || server_alive(&region, pid, &path),
                &|| format!("waiting for a response on {what}"),
                &mut || Ok(this.available(&region)? > 0),
            )?;
        }
        self.take_response(&region)
    }

    /// As the trait's `recv_for`; in addition, a call that ends without the answer (a
    /// timeout, an interrupt) gives up on request `id` too, so that a later send may discard
    /// its late answer to make room (see `room_for_answer`).
    fn recv_for(
        &mut self,
        id: u64,
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<Message> {
        self.abandoned_upto = self.abandoned_upto.max(id.saturating_sub(1));
        let deadline = Deadline::after(timeout);
        loop {
            let msg = match self.recv_raw(deadline.remaining(), interrupt) {
                Ok(m) => m,
                Err(e) => {
                    if matches!(e, Error::Timeout { .. } | Error::Interrupted) {
                        self.abandoned_upto = self.abandoned_upto.max(id);
                    }
                    return Err(e);
                }
            };
            let rid = msg.meta().request_id;
            // Request id 0 marks an error the server could not attribute to one request.
            if rid >= id || rid == 0 {
                return crate::transport::finish_response(msg);
            }
        }
    }

    fn server_alive(&mut self) -> bool {
        match self.region.as_deref() {
            Some(region) => server_alive(region, self.server_pid, &self.path).is_ok(),
            None => false,
        }
    }

    fn close(&mut self) {
        self.outstanding.clear();
        if !self.owner.is_here() {
            // A forked child's copy: the lease is the parent's, which still uses the slot.
            self.region = None;
            return;
        }
        if let Some(region) = self.region.take() {
            // Give the slot back at once; buffers our live messages hold stay marked held
            // (by pid) until they are dropped. Unless a new client already reclaimed it.
            let _ = region.slot_u32(self.slot, off::LEASE).compare_exchange(
                self.me,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            // Wake a server that waits for work so it sees the slot free promptly.
            region.doorbell().notify();
        }
    }
}

impl Drop for ShmClient {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DType;
    use crate::frame::Kind;
    use crate::transport::no_interrupt;
    use std::os::unix::fs::PermissionsExt;

    pub(super) const T: Option<Duration> = Some(Duration::from_secs(5));

    pub(super) fn lim() -> Limits {
        Limits::new(4, 4, 1 << 16).unwrap()
    }

    /// Attach from another thread while this one serves the acknowledgement.
    pub(super) fn attach(
        srv: &mut ShmServer,
        path: &Path,
        slot: Option<usize>,
    ) -> Result<ShmClient> {
        let p = path.to_path_buf();
        let h = std::thread::spawn(move || ShmClient::attach(&p, slot, T, &mut no_interrupt()));
        while !h.is_finished() {
            match srv.wait_any(Some(Duration::from_millis(5)), &mut no_interrupt()) {
                Ok(_) | Err(Error::Timeout { .. }) => {}
                Err(e) => panic!("wait_any: {e}"),
            }
        }
        h.join().unwrap()
    }

    pub(super) fn req(c: &mut ShmClient, tag: u32, data: &[u8]) -> u64 {
        let shape = [data.len() as u64];
        let meta = Meta {
            app_tag: tag,
            ..Meta::new(Kind::Request)
        };
        let t = [TensorRef {
            dtype: DType::UInt8,
            shape: &shape,
            data,
        }];
        c.send(meta, &t, T, &mut no_interrupt()).unwrap()
    }

    /// Answer every pending request of `slot` with its bytes incremented and its tag.
    pub(super) fn answer_all(srv: &mut ShmServer, slot: usize) -> usize {
        let mut n = 0;
        while let Some(m) = srv.recv(slot).unwrap() {
            assert!(m.is_shared());
            let out: Vec<u8> = m
                .tensor_bytes(0)
                .unwrap()
                .iter()
                .map(|b| b.wrapping_add(1))
                .collect();
            let shape = [out.len() as u64];
            let meta = Meta {
                app_tag: m.meta().app_tag,
                ..Meta::new(Kind::Response)
            };
            drop(m);
            let t = [TensorRef {
                dtype: DType::UInt8,
                shape: &shape,
                data: &out,
            }];
            srv.send(slot, meta, &t).unwrap();
            n += 1;
        }
        n
    }

    #[test]
    fn round_trips_wrap_the_ring_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 2, lim(), 2).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut c = attach(&mut srv, &p, None).unwrap();
        assert!(srv.is_connected(c.slot()));
        assert_eq!(c.ring_depth(), 2);
        for i in 0..50u32 {
            let data: Vec<u8> = (0..(i * 37 % 3000) as usize)
                .map(|k| (k as u32 + i) as u8)
                .collect();
            let id = req(&mut c, i, &data);
            let ready = srv.wait_any(T, &mut no_interrupt()).unwrap();
            assert_eq!(ready, vec![c.slot()]);
            assert_eq!(answer_all(&mut srv, c.slot()), 1);
            assert!(c.is_ready().unwrap());
            let m = c.recv(T, &mut no_interrupt()).unwrap();
            assert!(m.is_shared());
            assert_eq!(m.meta().request_id, id);
            assert_eq!(m.meta().app_tag, i);
            let want: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
            assert_eq!(m.tensor_bytes(0).unwrap(), &want[..]);
            assert_eq!(m.tensor_bytes(0).unwrap().as_ptr() as usize % 64, 0);
        }
        // Polling with a zero timeout returns an empty list; a short one times out.
        assert!(srv
            .wait_any(Some(Duration::ZERO), &mut no_interrupt())
            .unwrap()
            .is_empty());
        let t0 = Instant::now();
        assert!(matches!(
            srv.wait_any(Some(Duration::from_millis(30)), &mut no_interrupt()),
            Err(Error::Timeout { .. })
        ));
        assert!(t0.elapsed() >= Duration::from_millis(25));
        srv.close();
        assert!(!p.exists(), "the server removes its file");
        assert!(!lock_path(&p).exists(), "and its lock file");
        // The client notices.
        assert!(matches!(
            c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
            Err(Error::PeerGone(_))
        ));
    }

    #[test]
    fn pipelined_requests_answered_in_order_and_held_buffers_stay_intact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 3).unwrap();
        let mut c = attach(&mut srv, &p, Some(0)).unwrap();
        let ids: Vec<u64> = (0..3u8).map(|i| req(&mut c, i.into(), &[i; 100])).collect();
        // Three in flight fill the three response buffers: a fourth is refused.
        assert!(matches!(
            c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
            Err(Error::Capacity(_))
        ));
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 3);
        let held: Vec<Message> = (0..3)
            .map(|_| c.recv(T, &mut no_interrupt()).unwrap())
            .collect();
        for (i, m) in held.iter().enumerate() {
            assert_eq!(m.meta().request_id, ids[i]);
            assert_eq!(m.tensor_bytes(0).unwrap(), &[i as u8 + 1; 100][..]);
        }
        // All three buffers are held by live messages: no room for an answer.
        assert!(matches!(
            c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
            Err(Error::Capacity(_))
        ));
        // Messages may be dropped in any order: dropping the middle one frees its buffer
        // for exactly one more request.
        let mut held = held;
        let last = held.pop().unwrap();
        drop(held.remove(1));
        req(&mut c, 7, &[7; 10]);
        assert!(matches!(
            c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
            Err(Error::Capacity(_))
        ));
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 1);
        let m = c.recv(T, &mut no_interrupt()).unwrap();
        assert_eq!(m.tensor_bytes(0).unwrap(), &[8; 10][..]);
        drop(m);
        // Dropping the first too leaves two buffers to the pipeline, while `last` is kept.
        let first = held.remove(0);
        assert_eq!(first.tensor_bytes(0).unwrap(), &[1; 100][..]);
        drop(first);
        for round in 0..5u8 {
            req(&mut c, 8, &[round; 10]);
            req(&mut c, 9, &[round + 100; 10]);
            srv.wait_any(T, &mut no_interrupt()).unwrap();
            assert_eq!(answer_all(&mut srv, 0), 2);
            for v in [round + 1, round + 101] {
                let m = c.recv(T, &mut no_interrupt()).unwrap();
                assert_eq!(m.tensor_bytes(0).unwrap(), &[v; 10][..]);
            }
        }
        // The view kept across all those requests is intact.
        assert_eq!(last.tensor_bytes(0).unwrap(), &[3; 100][..]);
    }

    #[test]
    fn a_full_response_ring_never_blocks_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 2, lim(), 2).unwrap();
        let mut c = attach(&mut srv, &p, Some(1)).unwrap();
        req(&mut c, 1, b"a");
        req(&mut c, 2, b"b");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 1), 2);
        // The client reads nothing; an extra response finds the ring full at once.
        let t0 = Instant::now();
        let e = srv.send(1, Meta::new(Kind::Response), &[]).unwrap_err();
        assert!(
            matches!(e, Error::Capacity(ref m) if m.contains("full")),
            "{e}"
        );
        let e = srv.send_error(1, 1, "x").unwrap_err();
        assert!(matches!(e, Error::Capacity(_)));
        assert!(t0.elapsed() < Duration::from_millis(100));
        // Slot 0 has no client.
        assert!(matches!(
            srv.send(0, Meta::new(Kind::Response), &[]),
            Err(Error::PeerGone(_))
        ));
        assert_eq!(c.recv(T, &mut no_interrupt()).unwrap().meta().app_tag, 1);
    }

    #[test]
    fn reserve_fill_publish_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let mut c = attach(&mut srv, &p, None).unwrap();
        let id = req(&mut c, 0, b"q");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        let _m = srv.recv(0).unwrap().unwrap();
        let specs = [
            TensorSpec {
                dtype: DType::Int64,
                shape: &[3, 4],
            },
            TensorSpec {
                dtype: DType::Float32,
                shape: &[5],
            },
        ];
        let mut r = srv.reserve(0, Meta::new(Kind::Response), &specs).unwrap();
        assert_eq!(r.request_id(), id);
        assert_eq!(r.num_tensors(), 2);
        assert!(r.tensor_mut(2).is_none());
        // A second reservation (or a send) while one is open is refused.
        assert!(matches!(
            srv.reserve(0, Meta::new(Kind::Response), &specs),
            Err(Error::InvalidArgument(_))
        ));
        let a = r.tensor_mut(0).unwrap();
        assert_eq!(a.len(), 96);
        for (i, ch) in a.chunks_exact_mut(8).enumerate() {
            ch.copy_from_slice(&(i as i64 * 11).to_le_bytes());
        }
        let (ptr, n) = r.tensor_raw(1).unwrap();
        assert_eq!((ptr as usize % 64, n), (0, 20));
        r.tensor_mut(1).unwrap().copy_from_slice(&[7u8; 20]);
        srv.publish(r).unwrap();
        let m = c.recv(T, &mut no_interrupt()).unwrap();
        assert_eq!(m.decoded().tensors[0].shape, vec![3, 4]);
        let got: Vec<i64> = m
            .tensor_bytes(0)
            .unwrap()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got, (0..12).map(|i| i * 11).collect::<Vec<_>>());
        assert_eq!(m.tensor_bytes(1).unwrap(), &[7u8; 20][..]);
        // A dropped reservation sends nothing and unblocks the slot.
        req(&mut c, 1, b"q");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        drop(srv.recv(0).unwrap().unwrap());
        drop(srv.reserve(0, Meta::new(Kind::Response), &specs).unwrap());
        assert!(!c.is_ready().unwrap());
        srv.send_error(0, frame::error_code::INTERNAL, "boom")
            .unwrap();
        let e = c.recv(T, &mut no_interrupt()).unwrap_err();
        assert!(
            matches!(e, Error::Remote { ref message, .. } if message == "boom"),
            "{e}"
        );
    }

    #[test]
    fn closed_client_frees_its_slot_at_once_and_its_live_messages_stay_intact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let mut c = attach(&mut srv, &p, None).unwrap();
        req(&mut c, 0, b"x");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        answer_all(&mut srv, 0);
        let m = c.recv(T, &mut no_interrupt()).unwrap();
        c.close();
        // The slot is free at once (same process, explicit slot)...
        let mut c2 = attach(&mut srv, &p, Some(0)).unwrap();
        assert_eq!(c2.slot(), 0);
        // ...with one response buffer fewer while `m` lives: one request in flight at a time.
        for i in 0..5u32 {
            req(&mut c2, i, b"a");
            assert!(matches!(
                c2.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
                Err(Error::Capacity(_))
            ));
            srv.wait_any(T, &mut no_interrupt()).unwrap();
            answer_all(&mut srv, 0);
            let r = c2.recv(T, &mut no_interrupt()).unwrap();
            assert_eq!(
                (r.meta().app_tag, r.tensor_bytes(0).unwrap()),
                (i, &b"b"[..])
            );
        }
        assert_eq!(m.tensor_bytes(0).unwrap(), b"y");
        drop(m);
        // Both buffers are back.
        req(&mut c2, 10, b"c");
        req(&mut c2, 11, b"d");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 2);
        for (tag, want) in [(10, b"d"), (11, b"e")] {
            let r = c2.recv(T, &mut no_interrupt()).unwrap();
            assert_eq!(
                (r.meta().app_tag, r.tensor_bytes(0).unwrap()),
                (tag, &want[..])
            );
        }
        c2.close();
        srv.wait_any(Some(Duration::ZERO), &mut no_interrupt())
            .unwrap();
        assert!(!srv.is_connected(0));
    }

    #[test]
    fn attach_frees_what_a_dead_or_closed_predecessor_left() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let mut c = attach(&mut srv, &p, None).unwrap();
        req(&mut c, 0, b"x");
        req(&mut c, 1, b"y");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 2);
        // One answer received and "held" by a process that died, one never read.
        let m = c.recv(T, &mut no_interrupt()).unwrap();
        let region = srv.region().unwrap();
        let held: Vec<u32> = (0..2)
            .filter(|&b| holder_of(region.state(0, true, b).load(Ordering::Acquire)).is_some())
            .collect();
        assert_eq!(held.len(), 1);
        let dead = dead_pid();
        region
            .state(0, true, held[0])
            .store(held_by(dead), Ordering::Release);
        std::mem::forget(m); // its Drop would free the buffer
        c.close();
        // The next client gets both response buffers.
        let mut c2 = attach(&mut srv, &p, None).unwrap();
        req(&mut c2, 2, b"a");
        req(&mut c2, 3, b"b");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 2);
        assert_eq!(c2.recv(T, &mut no_interrupt()).unwrap().meta().app_tag, 2);
        assert_eq!(c2.recv(T, &mut no_interrupt()).unwrap().meta().app_tag, 3);
    }

    #[test]
    fn answers_to_abandoned_requests_do_not_wedge_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let mut c = attach(&mut srv, &p, None).unwrap();
        let short = Some(Duration::from_millis(20));
        for tag in [1, 2] {
            let id = req(&mut c, tag, b"late");
            let e = c.recv_for(id, short, &mut no_interrupt()).unwrap_err();
            assert!(matches!(e, Error::Timeout { .. }), "{e}");
        }
        // Both response buffers are owed to abandoned requests whose answers have not come:
        // a send waits for them (and times out), it does not fail at once.
        let t0 = Instant::now();
        let e = c
            .send(Meta::new(Kind::Request), &[], short, &mut no_interrupt())
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(t0.elapsed() >= Duration::from_millis(15));
        // The late answers arrive: the next send discards them and goes through.
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 2);
        let id = req(&mut c, 3, b"now");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 1);
        let m = c.recv_for(id, T, &mut no_interrupt()).unwrap();
        assert_eq!(
            (m.meta().app_tag, m.tensor_bytes(0).unwrap()),
            (3, &b"opx"[..])
        );
        // Requests the caller still waits for are a capacity error at once, as before.
        drop(m);
        req(&mut c, 4, b"a");
        req(&mut c, 5, b"b");
        assert!(matches!(
            c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
            Err(Error::Capacity(_))
        ));
    }

    fn dead_pid() -> u32 {
        let mut ch = std::process::Command::new("true").spawn().unwrap();
        let pid = ch.id();
        ch.wait().unwrap();
        pid
    }

    #[test]
    fn a_dead_clients_lease_is_reclaimed_and_its_requests_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let mut c = attach(&mut srv, &p, None).unwrap();
        req(&mut c, 1, b"stale");
        // Pretend the client died: its pid in the lease is a dead one.
        let region = srv.region().unwrap();
        let lease = region.slot_u32(0, off::LEASE);
        let dead = dead_pid();
        lease.store(dead, Ordering::Release);
        std::mem::forget(c); // its Drop would try to give the lease back
        let mut c2 = attach(&mut srv, &p, Some(0)).unwrap();
        assert_eq!(lease.load(Ordering::Acquire), std::process::id());
        assert!(
            !srv.is_ready_slot(0).unwrap(),
            "the dead client's request is dropped"
        );
        req(&mut c2, 2, b"fresh");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        let m = srv.recv(0).unwrap().unwrap();
        assert_eq!(m.tensor_bytes(0).unwrap(), b"fresh");
    }

    #[test]
    fn a_lease_word_that_is_no_pid_is_reclaimed() {
        // Found by the shm_attach fuzz target: a lease above i32::MAX reached kill(2) as a
        // process group (and tripped a debug assertion in rustix).
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let region = srv.region().unwrap();
        let lease = region.slot_u32(0, off::LEASE);
        for bogus in [u32::MAX, 1 << 31] {
            lease.store(bogus, Ordering::Release);
            let c = attach(&mut srv, &p, Some(0)).unwrap();
            assert_eq!(lease.load(Ordering::Acquire), std::process::id());
            drop(c);
        }
    }

    #[test]
    fn a_response_addressed_to_another_slot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 2, lim(), 2).unwrap();
        let mut c = attach(&mut srv, &p, Some(0)).unwrap();
        req(&mut c, 1, b"x");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 1);
        // A stray writer rewrites the slot field (bytes 16..20) of the published frame.
        let region = srv.region().unwrap();
        let b = region.queue(0, true, 0).load(Ordering::Relaxed);
        let ptr = region.buf_ptr(0, true, b);
        // SAFETY: the published response buffer lies inside the mapping and holds a frame of
        // at least 64 bytes; nothing else accesses it during this single-threaded test.
        unsafe { std::ptr::copy_nonoverlapping(1u32.to_le_bytes().as_ptr(), ptr.add(16), 4) };
        let got = c.recv(T, &mut no_interrupt());
        assert!(
            matches!(&got, Err(Error::Protocol(m)) if m.contains("addressed to slot 1")),
            "{got:?}"
        );
    }

    #[test]
    fn second_server_refused_stale_file_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let e = ShmServer::create(&p, 1, lim(), 2).err().unwrap();
        assert!(matches!(e, Error::AddressInUse(_)), "{e}");
        assert!(
            p.exists(),
            "the refused server leaves the live one's file alone"
        );
        drop(srv);
        // A stale file of a dead server (no lock holder) is replaced.
        std::fs::write(&p, b"stale").unwrap();
        let srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() > 5);
        drop(srv);
        // A directory is not replaced.
        std::fs::create_dir(&p).unwrap();
        assert!(ShmServer::create(&p, 1, lim(), 2).is_err());
        assert!(!lock_path(&p).exists());
    }

    #[test]
    fn bad_arguments_and_too_little_space() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        for (slots, depth) in [(0, 2), (1, 1), (1, MAX_RING_DEPTH + 1), (MAX_SLOTS + 1, 2)] {
            assert!(matches!(
                ShmServer::create(&p, slots, lim(), depth),
                Err(Error::InvalidArgument(_))
            ));
        }
        let huge = Limits::new(1, 1, 1 << 40).unwrap();
        let e = ShmServer::create(&p, 4, huge, 2).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, Error::Capacity(_)), "{msg}");
        assert!(
            msg.contains("cannot reserve") && msg.contains("free"),
            "{msg}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "nothing left behind: {left:?}");
        assert_eq!(resolve_path(Path::new("x")), Path::new("/dev/shm/x"));
        assert_eq!(resolve_path(Path::new("./x")), Path::new("./x"));
    }

    fn attach_err(p: &Path, timeout: Duration) -> Error {
        ShmClient::attach(p, None, Some(timeout), &mut no_interrupt())
            .err()
            .unwrap()
    }

    /// A client attaches only to a regular file of its own user that nobody else may write
    /// to; the refusal names the file, the mode found and the mode expected, and changes
    /// nothing (the server keeps serving once the mode is back).
    #[test]
    fn attach_refuses_a_file_others_may_write_to() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let t = Duration::from_millis(200);
        for mode in [0o620, 0o602, 0o666] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = attach_err(&p, t);
            let text = e.to_string();
            assert!(matches!(e, Error::Role(_)), "{mode:o}: {e}");
            assert!(
                text.contains(&format!(
                    "shared-memory file {} has mode {mode:04o}",
                    p.display()
                )) && text.contains("expected 0600")
                    && text.contains("refusing to attach"),
                "{text}"
            );
        }
        // Readable by others is not a way in (only writes are): attach works.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        attach(&mut srv, &p, None).expect("attach to a 0644 file");
        // A FIFO at the path is not mapped (opened without blocking, then refused).
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let e = attach_err(&fifo, t);
        assert!(
            matches!(e, Error::Protocol(_)) && e.to_string().contains("not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn attach_to_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let good = std::fs::read(&p).unwrap();
        let q = dir.path().join("copy");
        let t = Duration::from_millis(200);
        let proto = |bytes: &[u8], what: &str| {
            std::fs::write(&q, bytes).unwrap();
            let e = attach_err(&q, t);
            assert!(matches!(e, Error::Protocol(_)), "{what}: {e}");
            e.to_string()
        };
        // Garbage.
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        assert!(proto(&garbage, "garbage").contains("magic"));
        proto(b"short", "short garbage");
        // A frame is not a transport file.
        let f = frame::encode(&Meta::new(Kind::Request), &[], &lim()).unwrap();
        let mut fb = f.as_slice().to_vec();
        fb.resize(8192, 0);
        assert!(proto(&fb, "frame").contains("frame"));
        // Truncated: the header survives, the slots do not; or the header is cut.
        assert!(proto(&good[..good.len() / 2], "truncated").contains("truncated"));
        assert!(proto(&good[..100], "header cut").contains("truncated"));
        // Another layout version.
        let mut v = good.clone();
        v[off::VERSION..off::VERSION + 4].copy_from_slice(&99u32.to_ne_bytes());
        assert!(proto(&v, "version").contains("version 99"));
        // Inconsistent header fields.
        let mut v = good.clone();
        v[off::CAPACITY] ^= 0x40;
        assert!(proto(&v, "capacity").contains("capacity"));
        let mut v = good.clone();
        v[off::RING_DEPTH..off::RING_DEPTH + 4].copy_from_slice(&1u32.to_ne_bytes());
        proto(&v, "depth");
        // The copy of a live file whose server is dead: peer gone.
        let mut v = good.clone();
        v[off::SERVER_PID..off::SERVER_PID + 4].copy_from_slice(&dead_pid().to_ne_bytes());
        std::fs::write(&q, &v).unwrap();
        assert!(matches!(attach_err(&q, t), Error::PeerGone(_)));
        // A half-written file (zeros, not ready) is waited on, then times out.
        std::fs::write(&q, vec![0u8; 8192]).unwrap();
        let t0 = Instant::now();
        assert!(matches!(attach_err(&q, t), Error::Timeout { .. }));
        assert!(t0.elapsed() >= t);
        std::fs::write(&q, b"").unwrap();
        assert!(matches!(attach_err(&q, t), Error::Timeout { .. }));
        // No file at all.
        assert!(matches!(
            attach_err(&dir.path().join("none"), t),
            Error::PeerGone(_)
        ));
        drop(srv);
    }

    /// Attaching to a running server makes no inotify watch (closing one costs milliseconds
    /// in the kernel); a server that comes up while the client waits on its watch is found
    /// at once.
    #[test]
    fn attach_watches_only_while_no_server_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        crate::transport::testing::assert_watches_only_while_waiting(
            || ShmServer::create(&p, 1, lim(), 2).unwrap(),
            |s: &mut ShmServer| match s
                .wait_any(Some(Duration::from_millis(5)), &mut no_interrupt())
            {
                Ok(_) | Err(Error::Timeout { .. }) => {}
                Err(e) => panic!("wait_any: {e}"),
            },
            || {
                let p = p.clone();
                move |i: Interrupt<'_>| {
                    ShmClient::attach(&p, None, Some(Duration::from_secs(10)), i)
                }
            },
            &[(0, 0, 0), (1, 1, 1)],
        );
    }
}
