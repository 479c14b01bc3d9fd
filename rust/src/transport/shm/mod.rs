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

mod attach;
mod client;
mod layout;
mod lease;
mod ring;
mod server;
#[cfg(test)]
mod tests;

pub use client::ShmClient;
pub use layout::{
    resolve_path, DEFAULT_DIR, DEFAULT_RING_DEPTH, LAYOUT_VERSION, MAX_RING_DEPTH, MAX_SLOTS,
    MIN_RING_DEPTH, SHM_MAGIC,
};
pub use ring::ShmLease;
pub use server::{Reservation, ShmServer};
