//! The client side of a byte-stream session, shared by the Unix-socket and named-pipe
//! clients: the leased slot and its limits, the frame reader, request ids and the queue of
//! requests still waiting for their answers.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

use crate::error::{Error, Result};
use crate::frame::{Limits, Meta, TensorRef};
use crate::transport::handshake::ServerParams;
use crate::transport::stream::{self, FrameReader};
use crate::transport::{
    check_client_kind, poll_fds, request_context, take_answer, Deadline, Interrupt, Message,
    HANDSHAKE_LIMITS,
};

/// One client's session over a byte stream (the descriptors stay with the transport).
pub(crate) struct ClientStream {
    pub slot: usize,
    pub limits: Limits,
    pub reader: FrameReader,
    next_id: u64,
    outstanding: VecDeque<u64>,
}

impl ClientStream {
    /// A session before the handshake: slot 0, the handshake's limits.
    pub fn new() -> ClientStream {
        ClientStream {
            slot: 0,
            limits: HANDSHAKE_LIMITS,
            reader: FrameReader::new(HANDSHAKE_LIMITS),
            next_id: 1,
            outstanding: VecDeque::new(),
        }
    }

    /// Take the slot and the limits the server's acknowledgement granted.
    pub fn accept(&mut self, params: ServerParams) {
        self.slot = params.slot;
        self.set_limits(params.limits);
    }

    /// Take the limits the server's acknowledgement granted.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.reader.set_limits(limits);
    }

    /// Send one request on `dst` (`None` once closed) and return its id.
    #[allow(clippy::too_many_arguments)]
    pub fn send<W: Write + AsFd>(
        &mut self,
        dst: Option<&mut W>,
        mut meta: Meta,
        tensors: &[TensorRef<'_>],
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
        what: &str,
        liveness: &mut dyn FnMut() -> Result<()>,
    ) -> Result<u64> {
        check_client_kind(&meta)?;
        let dst = dst.ok_or(Error::Closed)?;
        let id = self.next_id;
        meta.request_id = id;
        meta.slot = self.slot as u32;
        let deadline = Deadline::after(timeout);
        stream::send_blocking(
            dst,
            &meta,
            tensors,
            &self.limits,
            &deadline,
            interrupt,
            &|| format!("sending on {what}"),
            liveness,
        )
        .map_err(|e| request_context(e, what))?;
        self.next_id += 1;
        self.outstanding.push_back(id);
        Ok(id)
    }

    /// Receive the frame answering the oldest outstanding request from `src` (`None` once
    /// closed), error frames included.
    pub fn recv<R: Read + AsFd>(
        &mut self,
        src: Option<&mut R>,
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
        what: &str,
        liveness: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Message> {
        let src = src.ok_or(Error::Closed)?;
        let deadline = Deadline::after(timeout);
        let msg = stream::recv_blocking(
            src,
            &mut self.reader,
            &deadline,
            interrupt,
            &|| format!("waiting for a response on {what}"),
            liveness,
        )?;
        let m = *msg.meta();
        take_answer(&mut self.outstanding, &m, what)?;
        Ok(msg)
    }
}

/// Whether `src` (`None` once closed) has something to read, without blocking.
pub(crate) fn poll_readable<F: AsFd>(src: Option<&F>) -> Result<bool> {
    let src = src.ok_or(Error::Closed)?;
    let mut fds = [PollFd::new(src, PollFlags::IN)];
    poll_fds(&mut fds, Duration::ZERO)?;
    Ok(!fds[0].revents().is_empty())
}
