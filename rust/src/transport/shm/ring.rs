//! The ring words of a mapped file and the buffer states they hold.
//!
//! # Ordering protocol
//!
//! Each direction of a slot has one producer and one consumer (client and server, or the
//! reverse) sharing K buffers, a queue of K buffer indices, a `head` counter (written only by
//! the producer) and a `tail` counter (written only by the consumer), plus one state word per
//! buffer (`FREE`, `BUSY`, or `HELD | pid`):
//!
//! 1. The producer takes a buffer whose state it reads `FREE` with *acquire* (the consumer's
//!    release that freed it, and so its last reads of the bytes, happen before), marks it
//!    `BUSY` (relaxed: nobody else takes a busy buffer) and writes the frame.
//! 2. It stores the index in the queue at `head` (relaxed) and then `head + 1` with
//!    *release*: the frame bytes and the index are visible to whoever reads the new head
//!    with acquire ([`Region::publish_buf`]).
//! 3. The consumer reads `head` with acquire, the index (relaxed, ordered by that acquire),
//!    checks the buffer is `BUSY` (acquire), marks it `HELD | pid` and stores `tail + 1`
//!    with *release*, so the producer may reuse the queue position ([`Region::pop`]).
//! 4. When the message is dropped the consumer stores `FREE` with *release*
//!    ([`Region::release`]), closing the loop with step 1.
//!
//! The futex events ([`crate::sync`]) only wake sleepers; every decision is taken on these
//! words, so a lost or spurious wake-up costs time, never correctness. Every counter and
//! index read from the mapping is bounds-checked against K before use.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use memmap2::MmapRaw;

use crate::error::{Error, Result};
use crate::frame::{self, Limits};
use crate::sync::Event;
use crate::transport::access::Owner;

use super::layout::{off, Geometry};

/// Buffer states (the per-buffer words of a ring).
pub(super) const FREE: u64 = 0;
pub(super) const BUSY: u64 = 1;
pub(super) const HELD: u64 = 1 << 32;

pub(super) fn held_by(pid: u32) -> u64 {
    HELD | u64::from(pid)
}

/// The pid in a `HELD | pid` state, or `None` for any other state.
pub(super) fn holder_of(state: u64) -> Option<u32> {
    (state >> 32 == 1).then_some(state as u32)
}

/// The mapped file and its validated geometry.
pub(super) struct Region {
    pub(super) map: MmapRaw,
    pub(super) geo: Geometry,
    /// The process that mapped the file. A forked child inherits the mapping but none of its
    /// leases or held buffers: it never gives one back (see [`Region::release`]).
    pub(super) owner: Owner,
}

impl Region {
    pub(super) fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= self.map.len());
        // SAFETY: every offset passed here is a field of the header or of a slot whose index
        // was checked against `num_slots`, and the geometry was validated against the
        // mapping's length, so the word lies inside the mapping; it is 4-aligned because the
        // mapping is page-aligned and every field offset is a multiple of 4. The reference
        // cannot outlive `self`, which owns the mapping, and every process accesses these
        // words only atomically.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    pub(super) fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.map.len());
        // SAFETY: as in `u32_at`; the offset is a multiple of 8.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    pub(super) fn ready(&self) -> &AtomicU32 {
        self.u32_at(off::READY)
    }

    pub(super) fn doorbell(&self) -> Event<'_> {
        Event::new(self.u32_at(off::DOORBELL), self.u32_at(off::DOORBELL + 4))
    }

    pub(super) fn slot_u32(&self, slot: usize, field: usize) -> &AtomicU32 {
        self.u32_at(self.geo.slot_base(slot) + field)
    }

    pub(super) fn slot_u64(&self, slot: usize, field: usize) -> &AtomicU64 {
        self.u64_at(self.geo.slot_base(slot) + field)
    }

    pub(super) fn slot_event(&self, slot: usize, field: usize) -> Event<'_> {
        Event::new(self.slot_u32(slot, field), self.slot_u32(slot, field + 4))
    }

    /// Start of buffer `buf` (< depth) of a ring (`capacity` bytes, inside the mapping).
    pub(super) fn buf_ptr(&self, slot: usize, response: bool, buf: u32) -> *mut u8 {
        let off = self.geo.buf_off(slot, response, buf);
        debug_assert!(slot < self.geo.num_slots && (buf as usize) < self.geo.depth);
        debug_assert!(off as u64 + self.geo.capacity <= self.map.len() as u64);
        self.map.as_mut_ptr().wrapping_add(off)
    }

    pub(super) fn ring_base(response: bool) -> usize {
        if response {
            off::RING_STRIDE
        } else {
            0
        }
    }

    /// The head (published) counter of a ring.
    pub(super) fn head(&self, slot: usize, response: bool) -> &AtomicU64 {
        let field = if response {
            off::RESP_HEAD
        } else {
            off::REQ_HEAD
        };
        self.slot_u64(slot, field)
    }

    /// The tail (popped) counter of a ring.
    pub(super) fn tail(&self, slot: usize, response: bool) -> &AtomicU64 {
        let field = if response {
            off::RESP_TAIL
        } else {
            off::REQ_TAIL
        };
        self.slot_u64(slot, field)
    }

    /// Queue entry for position `pos` of a ring: the index of the buffer published there.
    pub(super) fn queue(&self, slot: usize, response: bool, pos: u64) -> &AtomicU32 {
        let i = (pos % self.geo.depth as u64) as usize;
        self.slot_u32(slot, off::QUEUE + Self::ring_base(response) + 4 * i)
    }

    /// State word of buffer `buf` (< depth) of a ring.
    pub(super) fn state(&self, slot: usize, response: bool, buf: u32) -> &AtomicU64 {
        debug_assert!((buf as usize) < self.geo.depth);
        self.slot_u64(
            slot,
            off::STATES + Self::ring_base(response) + 8 * buf as usize,
        )
    }

    /// A free buffer of a ring, marked busy; only the ring's producer calls this. `None` if
    /// every buffer is busy or held.
    pub(super) fn take_free(&self, slot: usize, response: bool) -> Option<u32> {
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
    pub(super) fn publish_buf(&self, slot: usize, response: bool, head: u64, buf: u32) {
        self.queue(slot, response, head)
            .store(buf, Ordering::Relaxed);
        // Release: the frame bytes and the queue entry before the new head (the consumer
        // loads it with acquire).
        self.head(slot, response).store(head + 1, Ordering::Release);
    }

    /// Pop the entry at position `tail` (the consumer's own counter; the caller checked that
    /// `tail < head`) and mark its buffer held by `pid`. Returns the buffer index.
    pub(super) fn pop(&self, slot: usize, response: bool, tail: u64, pid: u32) -> Result<u32> {
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
    pub(super) fn release(&self, slot: usize, response: bool, buf: u32) {
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
    pub(super) fn free_queued(&self, slot: usize, response: bool, from: u64, to: u64) {
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
    pub(super) fn held_count(&self, slot: usize, response: bool) -> usize {
        (0..self.geo.depth as u32)
            .filter(|&b| holder_of(self.state(slot, response, b).load(Ordering::Acquire)).is_some())
            .count()
    }
}

/// A received frame's buffer, held until dropped (the storage of a shared-memory
/// [`Message`]).
pub struct ShmLease {
    /// Keeps the mapping alive while the message lives (also after its endpoint closed).
    pub(super) region: Arc<Region>,
    pub(super) slot: usize,
    pub(super) response: bool,
    pub(super) buf: u32,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    /// The receiving client's count of its live messages, decremented on drop.
    pub(super) live: Option<Arc<AtomicUsize>>,
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
pub(super) fn decode_at(
    ptr: *mut u8,
    cap: u64,
    limits: &Limits,
) -> Result<(usize, frame::Decoded)> {
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
