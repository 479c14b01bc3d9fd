//! The per-slot session of every byte-stream transport.
//!
//! A transport (Unix sockets, named pipes, later TCP) only obtains descriptors: a source it
//! reads the client's frames from and a sink it writes the answers to (one socket for both,
//! or two FIFOs). Everything between is here, once: reading requests ahead up to
//! [`MAX_PENDING`] (the backpressure: a full session stops reading its client), the client
//! frame policy of [`crate::transport::handshake`], the ids still owed an answer, the queue
//! of answer bytes the client could not take yet, error frames, and the half-close of a
//! client that ended its sending side but still reads its answers.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::frame::{self, error_code, Limits, Meta, TensorRef};
use crate::transport::handshake::{client_frame_refusal, hello_ack};
use crate::transport::stream::{send_nonblocking, Flush, FrameReader, OutQueue, ReadStatus};
use crate::transport::{Message, HANDSHAKE_LIMITS};

/// Most requests a server reads ahead on one slot before it stops reading that client.
pub(crate) const MAX_PENDING: usize = 8;

/// What one round of reading a client produced, besides the requests it queued.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Nothing more to read now (the source would block, or the session holds
    /// [`MAX_PENDING`] requests).
    Idle,
    /// A frame the transport handles itself (its handshake): the session did not look at it.
    Handshake(Message),
    /// The client ended its sending side; `partial`: in the middle of a frame.
    Eof { partial: bool },
    /// Bytes that are not a valid frame. The session is over; [`Session::refuse_malformed`]
    /// tells the client why.
    Malformed(Error),
}

/// One client's session on one slot of a stream server.
#[derive(Debug)]
pub(crate) struct Session {
    reader: FrameReader,
    out: OutQueue,
    pending: VecDeque<Message>,
    unanswered: VecDeque<u64>,
    /// The client ended its sending side but can still read: the requests it sent in full are
    /// answered, then the session ends. The value says whether the end cut a frame short.
    read_closed: Option<bool>,
}

impl Session {
    /// A session that reads with the handshake's small limits until [`Session::open`].
    pub fn new() -> Session {
        Session {
            reader: FrameReader::new(HANDSHAKE_LIMITS),
            out: OutQueue::default(),
            pending: VecDeque::new(),
            unanswered: VecDeque::new(),
            read_closed: None,
        }
    }

    /// The handshake is done: read with the server's limits, forget anything before it.
    pub fn open(&mut self, limits: Limits) {
        self.out.clear();
        self.pending.clear();
        self.unanswered.clear();
        self.read_closed = None;
        self.reader.set_limits(limits);
    }

    /// Whether the transport should poll the source for reading.
    pub fn wants_read(&self) -> bool {
        self.pending.len() < MAX_PENDING && self.read_closed.is_none()
    }

    /// Whether bytes wait for the client (poll the sink for writing).
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// The client ended its sending side and the session waits to answer it.
    pub fn is_read_closed(&self) -> bool {
        self.read_closed.is_some()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The oldest request not yet handed to the application.
    pub fn take(&mut self) -> Option<Message> {
        self.pending.pop_front()
    }

    /// Whether the session still owes its client something: an answer to a request it sent
    /// in full, or bytes of an answer already given that are still queued. A client that
    /// ended its sending side keeps its session while this holds and it can still read;
    /// ending it earlier would cut a queued answer short.
    pub fn owes_client(&self) -> bool {
        !self.unanswered.is_empty() || !self.out.is_empty()
    }

    /// Read frames from `src` without blocking. Requests (and the upper layers' control
    /// frames) are queued for the application; a frame the client may not send is answered
    /// with a `ROLE` error frame on `slot`; one for which `is_handshake` holds is returned
    /// untouched for the transport.
    pub fn read<R: Read>(
        &mut self,
        src: &mut R,
        slot: u32,
        is_handshake: impl Fn(&Meta) -> bool,
    ) -> Result<Incoming> {
        while self.wants_read() {
            let msg = match self.reader.read_from(src) {
                Ok(ReadStatus::Frame(msg)) => msg,
                Ok(ReadStatus::WouldBlock) => break,
                Ok(ReadStatus::Eof) => {
                    return Ok(Incoming::Eof {
                        partial: self.reader.in_progress(),
                    })
                }
                Err(e @ Error::Frame(_)) => return Ok(Incoming::Malformed(e)),
                Err(e) => return Err(e),
            };
            let m = *msg.meta();
            if is_handshake(&m) {
                return Ok(Incoming::Handshake(msg));
            }
            if let Some(text) = client_frame_refusal(&m) {
                self.queue_error(m.request_id, slot, error_code::ROLE, &text);
                continue;
            }
            self.unanswered.push_back(m.request_id);
            self.pending.push_back(msg);
        }
        Ok(Incoming::Idle)
    }

    /// The client sent its last byte. Returns whether the session goes on: it does while it
    /// owes the client answers and the client can still read them (`client_reads`).
    pub fn end_of_requests(&mut self, partial: bool, client_reads: bool) -> bool {
        if self.owes_client() && client_reads {
            self.read_closed = Some(partial);
            true
        } else {
            false
        }
    }

    /// `Some(partial)` once a half-closed session has sent its last answer: end it now.
    pub fn finished(&self) -> Option<bool> {
        match self.read_closed {
            Some(partial) if !self.owes_client() => Some(partial),
            _ => None,
        }
    }

    /// Send queued bytes without blocking.
    pub fn flush<W: Write>(&mut self, dst: &mut W) -> Result<Flush> {
        self.out.flush(dst)
    }

    fn queue_error(&mut self, request_id: u64, slot: u32, code: u32, text: &str) {
        self.out.push(
            frame::encode_error(request_id, slot, code, text)
                .as_slice()
                .to_vec(),
        );
    }

    /// Queue an error frame that answers the handshake `request_id` (a refused HELLO).
    pub fn refuse_handshake(&mut self, request_id: u64, code: u32, text: &str) {
        self.queue_error(request_id, 0, code, text);
    }

    /// Tell the client why its bytes were refused (best effort, one non-blocking write);
    /// the session is over.
    pub fn refuse_malformed<W: Write>(&mut self, dst: Option<&mut W>, slot: u32, e: &Error) {
        if let Some(dst) = dst {
            self.queue_error(0, slot, error_code::PROTOCOL, &e.to_string());
            let _ = self.out.flush(dst);
        }
    }

    /// Acknowledge the HELLO `request_id`: `slot` of `num_slots` is this client's, with
    /// the server's `limits`, which the session reads with from now on.
    pub fn ack_hello<W: Write + AsFd>(
        &mut self,
        dst: &mut W,
        request_id: u64,
        slot: usize,
        num_slots: usize,
        limits: Limits,
    ) -> Result<Flush> {
        self.open(limits);
        let (meta, values) = hello_ack(request_id, slot, num_slots, &limits);
        let t = [values.tensor()];
        send_nonblocking(dst, &mut self.out, &meta, &t, &HANDSHAKE_LIMITS)
    }

    /// Answer the oldest unanswered request with `meta` and `tensors` without blocking
    /// (what the client cannot take yet is queued). A response over the limits is refused
    /// before the request id is used, so it can still be answered with an error frame.
    /// `Flush::PeerGone`: the client left; end the session.
    pub fn send<W: Write + AsFd>(
        &mut self,
        dst: &mut W,
        slot: usize,
        mut meta: Meta,
        tensors: &[TensorRef<'_>],
        limits: &Limits,
        path: &Path,
    ) -> Result<Flush> {
        frame::layout(&frame::specs_of(tensors), limits).map_err(|e| match e {
            Error::Capacity(m) => Error::Capacity(format!(
                "response on slot {slot} of {}: {m}",
                path.display()
            )),
            other => other,
        })?;
        meta.slot = slot as u32;
        meta.request_id = self.unanswered.pop_front().unwrap_or(0);
        send_nonblocking(dst, &mut self.out, &meta, tensors, limits)
    }

    /// Answer the oldest unanswered request (or, with none, the session: request id 0)
    /// with an error frame.
    pub fn send_error<W: Write>(
        &mut self,
        dst: &mut W,
        slot: usize,
        code: u32,
        message: &str,
    ) -> Result<Flush> {
        let rid = self.unanswered.pop_front().unwrap_or(0);
        self.queue_error(rid, slot as u32, code, message);
        self.out.flush(dst)
    }
}

/// The error for an answer to a slot nobody holds.
pub(crate) fn no_client(slot: usize, path: &Path) -> Error {
    Error::PeerGone(format!(
        "no client holds slot {slot} of the server at {}",
        path.display()
    ))
}

/// The error for an answer whose client left while it was sent.
pub(crate) fn went_away(slot: usize, path: &Path) -> Error {
    Error::PeerGone(format!(
        "the client on slot {slot} of {} went away",
        path.display()
    ))
}
