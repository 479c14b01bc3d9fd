//! The two roles of every transport: [`ServerEndpoint`] and [`ClientEndpoint`], the
//! [`Message`] they hand out, interrupts, and the slot-id checks shared by all of them.

use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::frame::{self, AlignedBuf, Decoded, Kind, Limits, Meta, TensorRef};
use crate::transport::{shm, stream, Deadline};

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
        recv_answer_for(id, timeout, |left| self.recv_raw(left, &mut *interrupt))
    }
    /// Whether the server this client is connected to is still there, as far as can be
    /// told without blocking (a closed connection, a hang-up, an exited server process).
    /// `false` once closed. A client whose server is gone cannot be used again; a caller
    /// reconnects (the path may already be served by a new server).
    fn server_alive(&mut self) -> bool;
    /// Release the slot and the connection. Idempotent.
    fn close(&mut self);
}

/// Receive frames with `recv_raw` (given the time left of `timeout`) until the answer to
/// request `id`, discarding the answers to older requests; as [`ClientEndpoint::recv_for`].
pub(crate) fn recv_answer_for(
    id: u64,
    timeout: Option<Duration>,
    mut recv_raw: impl FnMut(Option<Duration>) -> Result<Message>,
) -> Result<Message> {
    let deadline = Deadline::after(timeout);
    loop {
        let msg = recv_raw(deadline.remaining())?;
        let rid = msg.meta().request_id;
        // Request id 0 marks an error the server could not attribute to one request.
        if rid >= id || rid == 0 {
            return finish_response(msg);
        }
    }
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
