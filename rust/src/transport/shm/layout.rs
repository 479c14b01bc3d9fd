//! The file layout: its constants, the offsets of every word, and the geometry derived from
//! a server's parameters (see the layout table in the module docs of `shm`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::frame::{self, Limits};

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

pub(super) const READY: u32 = 0x5944_4552; // "REDY"
pub(super) const CLOSED: u32 = 0x4553_4c43; // "CLSE"
pub(super) const HEADER_REGION: u64 = 4096;
pub(super) const CTRL_LEN: u64 = 2048;

pub(super) const PAGE: u64 = 4096;

/// Byte offsets of the words in the header and in a slot's control block.
pub(super) mod off {
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

pub(super) fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The sizes of a file, derived from its parameters with checked arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) num_slots: usize,
    pub(super) depth: usize,
    pub(super) capacity: u64,
    pub(super) limits: Limits,
    pub(super) slot_stride: u64,
    pub(super) file_len: u64,
}

impl Geometry {
    pub(super) fn new(num_slots: usize, depth: usize, limits: Limits) -> Result<Geometry> {
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

    pub(super) fn slot_base(&self, slot: usize) -> usize {
        (HEADER_REGION + slot as u64 * self.slot_stride) as usize
    }

    /// Offset of buffer `buf` (< depth) of a ring.
    pub(super) fn buf_off(&self, slot: usize, response: bool, buf: u32) -> usize {
        let idx = u64::from(buf) + if response { self.depth as u64 } else { 0 };
        self.slot_base(slot) + (CTRL_LEN + idx * self.capacity) as usize
    }
}
