//! The shared-memory server: creating the file, reservations written in place, the
//! per-slot state and the [`ServerEndpoint`].

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapOptions;

use crate::error::{Error, IoContext, Result};
use crate::frame::{self, error_code, Limits, Meta, TensorRef, TensorSpec};
use crate::sync::{futex_wake_all, Wake};
use crate::transport::access::Owner;
use crate::transport::lock::{pid_alive, LockFile};
use crate::transport::{
    check_slot, client_frame_refusal, rand_u64, temp_context, Deadline, Interrupt, Message,
    ServerEndpoint, INTERRUPT_CHECK,
};

use super::layout::{
    lock_path, off, resolve_path, Geometry, CLOSED, LAYOUT_VERSION, READY, SHM_MAGIC,
};
use super::lease;
use super::ring::{decode_at, Region, ShmLease, BUSY};

/// A response buffer laid out by [`ShmServer::reserve`], waiting to be filled and published.
/// Dropping it without publishing cancels it (nothing is sent).
pub struct Reservation {
    /// Keeps the mapping alive while the tensors are written.
    pub(super) _region: Arc<Region>,
    pub(super) open: Arc<AtomicBool>,
    pub(super) slot: usize,
    /// The response buffer (marked busy) being filled.
    pub(super) buf: u32,
    /// Published: the buffer now belongs to the queue, not to this reservation.
    pub(super) sent: bool,
    pub(super) epoch: u64,
    pub(super) request_id: u64,
    pub(super) ptr: *mut u8,
    pub(super) offsets: Vec<u64>,
    pub(super) nbytes: Vec<u64>,
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
pub(super) struct ServerSlot {
    /// Next request queue position to pop (the server is the only writer of the request
    /// tail).
    pub(super) read: u64,
    /// Next response buffer to publish (the server is the only writer of the response head).
    pub(super) resp_head: u64,
    /// Last attach number acknowledged.
    pub(super) acked: u32,
    /// Pid of the client being served, 0 = none.
    pub(super) client: u32,
    /// Bumped whenever the slot changes hands.
    pub(super) epoch: u64,
    pub(super) unanswered: VecDeque<u64>,
    /// The open reservation, if any (false once it was dropped), and its response buffer.
    pub(super) reservation: Option<(Arc<AtomicBool>, u32)>,
    /// The client broke the ring protocol; ignored until the slot is attached again.
    pub(super) broken: bool,
}

/// The server endpoint of the shared-memory transport.
pub struct ShmServer {
    pub(super) path: PathBuf,
    pub(super) region: Option<Arc<Region>>,
    pub(super) lock: Option<LockFile>,
    pub(super) file_id: (u64, u64),
    pub(super) limits: Limits,
    pub(super) num_slots: usize,
    pub(super) slots: Vec<ServerSlot>,
    pub(super) last_liveness: Instant,
    /// This process's pid, marking the request buffers its messages hold.
    pub(super) pid: u32,
    pub(super) owner: Owner,
    /// Reports for the embedding program (corrupt slots found and reset), oldest first, at
    /// most `MAX_NOTICES`; `notices_lost` counts those that did not fit.
    pub(super) notices: Vec<String>,
    pub(super) notices_lost: usize,
}

/// Most reports a server keeps until [`ServerEndpoint::take_notices`] collects them.
pub(super) const MAX_NOTICES: usize = 64;

pub(super) fn check_parent(path: &Path) -> Result<PathBuf> {
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

pub(super) fn mib(n: u64) -> f64 {
    n as f64 / (1u64 << 20) as f64
}

pub(super) fn no_space(path: &Path, geo: &Geometry, free: Option<u64>) -> Error {
    let free = match free {
        Some(f) => format!("{f} bytes ({:.1} MiB) are free", mib(f)),
        None => "less is free".to_owned(),
    };
    let dir = path
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| ".".to_owned());
    Error::Capacity(format!(
        "cannot reserve {} bytes ({:.1} MiB) for the shared-memory file {}: {free} in {dir} \
         ({} slots x 2 rings x {} buffers of {} bytes, reserved up front); lower \
         --max-nbytes (max_nbytes, now {}), --num-clients (num_slots, now {}) or the ring \
         depth (ring_depth, now {}), or enlarge {dir} to at least {:.0} MiB (Docker: docker \
         run --shm-size={}m)",
        geo.file_len,
        mib(geo.file_len),
        path.display(),
        geo.num_slots,
        geo.depth,
        geo.capacity,
        geo.limits.max_payload_bytes,
        geo.num_slots,
        geo.depth,
        mib(geo.file_len).ceil(),
        // Headroom for the lock file and anything else in the filesystem.
        (mib(geo.file_len) * 1.1).ceil() as u64 + 16,
    ))
}

/// Remove the temporary files (`.<name>.<pid>.<rand>.tmp`) that servers of `name` killed
/// while creating their file left in `parent`; those of live pids are being built now.
pub(super) fn remove_stale_temps(parent: &Path, name: &str) {
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        // `<pid>.<hex>`: exactly our pattern, nothing a user might have named so.
        let Some((pid, rand)) = rest.split_once('.') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if rand.is_empty() || !rand.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        // Only our own regular files: never follow a link or touch another user's file.
        match entry.metadata() {
            Ok(m) if m.file_type().is_file() && m.uid() == rustix::process::geteuid().as_raw() => {
                let _ = std::fs::remove_file(entry.path());
            }
            _ => {}
        }
    }
}

pub(super) fn free_space(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

impl ShmServer {
    pub(super) fn what_server(&self) -> String {
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
    pub(super) fn build(path: &Path, parent: &Path, geo: Geometry) -> Result<(Region, (u64, u64))> {
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
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Before the space check: what they hold counts against it.
        remove_stale_temps(parent, &name);
        let free = free_space(parent);
        if matches!(free, Some(f) if f < geo.file_len) {
            return Err(no_space(path, &geo, free));
        }
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

    pub(super) fn region(&self) -> Result<Arc<Region>> {
        self.region.clone().ok_or(Error::Closed)
    }

    /// Give up every request of `slot` not yet handed out. `producer_gone`: the client that
    /// wrote them closed or died, so a request buffer still marked busy outside the queue
    /// was left half-written and goes back to the pool too.
    pub(super) fn drop_unread(
        region: &Region,
        slot: usize,
        st: &mut ServerSlot,
        producer_gone: bool,
    ) {
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
    pub(super) fn notice(&mut self, text: String) {
        if self.notices.len() < MAX_NOTICES {
            self.notices.push(text);
        } else {
            self.notices_lost += 1;
        }
    }

    /// Acknowledge new attaches (first resetting every ring word of the slot, whatever the
    /// previous holder or anyone else left) and, at most every `INTERRUPT_CHECK` (or when
    /// `force`), forget clients that closed or died and reset idle slots found corrupt.
    pub(super) fn sync_slots(&mut self, region: &Region, force: bool) {
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
    pub(super) fn pending(&mut self, region: &Region, slot: usize) -> u64 {
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
    pub(super) fn broke(&mut self, slot: usize, client: u32, what: std::fmt::Arguments<'_>) {
        let text = format!(
            "the client (pid {client}) on slot {slot} of {} broke the ring protocol ({what}); \
             its requests are ignored, and the slot is reset once it leaves",
            self.path.display()
        );
        self.notice(text);
    }

    pub(super) fn ready_slots(&mut self, region: &Region) -> Vec<usize> {
        (0..self.num_slots)
            .filter(|&s| self.pending(region, s) > 0)
            .collect()
    }

    pub(super) fn no_client(&self, slot: usize) -> Error {
        Error::PeerGone(format!(
            "no client holds slot {slot} of the server at {}",
            self.path.display()
        ))
    }

    /// Take a free response buffer of `slot` (marked busy: publish it or release it),
    /// after checking that no reservation is open.
    pub(super) fn claim_response(&mut self, region: &Region, slot: usize) -> Result<u32> {
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
    pub(super) fn publish_buf(&mut self, region: &Region, slot: usize, buf: u32, answers: bool) {
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
    pub(super) fn write_error(
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
