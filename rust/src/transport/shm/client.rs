//! The shared-memory client: sending requests into its slot's ring and taking the answers
//! as views of the response buffers.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::frame::{self, Limits, Meta, TensorRef};
use crate::sync::{Event, Wake};
use crate::transport::access::Owner;
use crate::transport::lock::pid_alive;
use crate::transport::{
    check_client_kind, request_context, take_answer, ClientEndpoint, Deadline, Interrupt, Message,
    INTERRUPT_CHECK,
};

use super::layout::{off, READY};
use super::ring::{decode_at, holder_of, Region, ShmLease};

/// The client endpoint of the shared-memory transport.
pub struct ShmClient {
    pub(super) path: PathBuf,
    pub(super) region: Option<Arc<Region>>,
    pub(super) slot: usize,
    pub(super) limits: Limits,
    /// This process's pid: the slot lease and the held-buffer marks.
    pub(super) me: u32,
    pub(super) server_pid: u32,
    /// Next request queue position to publish (the client is the only writer of the
    /// request head).
    pub(super) req_head: u64,
    /// Next response queue position to pop (the client is the only writer of the response
    /// tail).
    pub(super) resp_read: u64,
    pub(super) next_id: u64,
    /// Ids of the requests sent and not yet answered, oldest first.
    pub(super) outstanding: VecDeque<u64>,
    /// Requests with ids up to this one were given up on (see `recv_for`): their answers
    /// are discarded when they arrive.
    pub(super) abandoned_upto: u64,
    pub(super) owner: Owner,
    /// This client's received messages still alive (each holds a response buffer).
    pub(super) live: Arc<AtomicUsize>,
}

/// Wait for `ready()` on `event`, spinning briefly, then sleeping in slices; checks the
/// interrupt callback and `alive()` between slices.
pub(super) fn wait_event(
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
    /// The ring depth K of the server's file.
    pub fn ring_depth(&self) -> usize {
        self.region.as_ref().map(|r| r.geo.depth).unwrap_or(0)
    }

    pub(super) fn what(&self) -> String {
        format!("slot {} of {}", self.slot, self.path.display())
    }

    pub(super) fn region_ref(&self) -> Result<Arc<Region>> {
        self.region.clone().ok_or(Error::Closed)
    }

    /// Published responses not yet received, after checking the server kept to the ring.
    pub(super) fn available(&self, region: &Region) -> Result<u64> {
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
    pub(super) fn take_response(&mut self, region: &Arc<Region>) -> Result<Message> {
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
    pub(super) fn no_room(&self, region: &Region, held: usize) -> Error {
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
    pub(super) fn room_for_answer(
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

pub(super) fn server_alive(region: &Region, pid: u32, path: &Path) -> Result<()> {
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
        let got = crate::transport::recv_answer_for(id, timeout, |left| {
            self.recv_raw(left, &mut *interrupt)
        });
        // (An answer that arrived ends as Ok or as Error::Remote, never as these.)
        if matches!(got, Err(Error::Timeout { .. } | Error::Interrupted)) {
            self.abandoned_upto = self.abandoned_upto.max(id);
        }
        got
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
