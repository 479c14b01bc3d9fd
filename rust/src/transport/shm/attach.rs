//! Attaching a client: checking the file (owner, mode, header, geometry) before trusting any
//! word of it, leasing a slot and waiting for the server's acknowledgement.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, IoContext, Result};
use crate::frame::{self, Limits};
use crate::sync::futex_wait;
use crate::transport::access::Owner;
use crate::transport::lock::pid_alive;
use crate::transport::{check_private, slot_out_of_range, Deadline, DirWatch, Interrupt};

use super::client::{server_alive, wait_event, ShmClient};
use super::layout::{
    off, resolve_path, Geometry, CLOSED, HEADER_REGION, LAYOUT_VERSION, MIN_RING_DEPTH, READY,
    SHM_MAGIC,
};
use super::lease;
use super::ring::{holder_of, Region, FREE};

/// What a look at the file found.
pub(super) enum Inspect {
    Ready(Region),
    /// Not (yet) initialised; the mapping, if any, to wait on its `ready` word.
    NotReady(Option<MmapRaw>),
    /// Left by a server that closed or died: waited on like a missing file (a new server
    /// replaces it by a rename), and this error reported at the deadline.
    Stale(Error),
}

pub(super) fn bad_file(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Protocol(format!(
        "{} is not a usable SensAI shared-memory file: {why}",
        path.display()
    ))
}

pub(super) fn inspect(path: &Path, file: &File) -> Result<Inspect> {
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
            return Ok(Inspect::Stale(Error::PeerGone(format!(
                "the server at {} has closed",
                path.display()
            ))))
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
        return Ok(Inspect::Stale(Error::PeerGone(format!(
            "the server (pid {pid}) that created {} is gone",
            path.display()
        ))));
    }
    Ok(Inspect::Ready(Region {
        map: probe.map,
        geo,
        owner: probe.owner,
    }))
}

impl ShmClient {
    /// Attach to the server's file at `path` (a bare name is looked up under `/dev/shm`) and
    /// lease `slot` (or any free one), waiting up to `connect_timeout` for a server that is
    /// still starting and for its acknowledgement. A missing file and a stale one (its
    /// server closed or died) are waited on alike, for a server to (re)create it.
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
            // Missing or stale (not a file being created): reported as such at the deadline.
            let mut absent = true;
            let waiting = match file {
                Ok(f) => match inspect(&path, &f)? {
                    Inspect::Ready(r) => break r,
                    Inspect::NotReady(map) => {
                        absent = false;
                        map
                    }
                    Inspect::Stale(e) => {
                        if deadline.expired() {
                            return Err(match e {
                                Error::PeerGone(why) => Error::PeerGone(format!(
                                    "{why} (waited {:.1}s for a new server to replace it)",
                                    deadline.elapsed().as_secs_f64()
                                )),
                                other => other,
                            });
                        }
                        // Its replacement appears by an atomic rename, which the watch reports.
                        None
                    }
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
                if absent {
                    // Expired since the look above: look once more, to report what is there
                    // (missing or stale) rather than a file being created.
                    continue;
                }
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
                // No file yet (or a stale one): a new one appears by an atomic rename, which
                // the watch reports.
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
    pub(super) fn attach_slot(
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
}
