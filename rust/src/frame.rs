//! The wire format: one frame layout shared by every transport.
//!
//! ```text
//! [ header: 64 bytes ][ tensor table: table_len bytes ][ pad to 64 ][ tensor 0 ][ pad ][ tensor 1 ] ...
//! ```
//!
//! All integers are little-endian. `docs/PROTOCOL.md` is the normative description;
//! this module is pure (no I/O) so that it can be fuzzed and property-tested alone.
//!
//! Decoding validates every field with checked arithmetic against [`Limits`]; no input
//! of any bytes panics or reads out of bounds.

use crate::error::{Error, FrameError, Result};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SNSA";
/// The protocol version this build writes and accepts.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Every tensor's data starts at a multiple of this many bytes from the frame start.
pub const ALIGN: u64 = 64;
/// Fixed part of one tensor-table entry; the shape (8 bytes per dimension) follows it.
pub const ENTRY_FIXED_LEN: u64 = 24;

/// Header flag: the sender passed a list of tensors (not a single one). Lets a
/// receiving API give a list back for a list, an array for an array.
pub const FLAG_LIST: u8 = 0x01;
const KNOWN_FLAGS: u8 = FLAG_LIST;

/// Error codes carried in an error frame's `app_tag`.
pub mod error_code {
    /// The request was malformed or invalid for the server (bad ids, shapes, ...).
    pub const BAD_REQUEST: u32 = 1;
    /// The request's frame violated the protocol.
    pub const PROTOCOL: u32 = 2;
    /// A request or its response did not fit the configured limits.
    pub const CAPACITY: u32 = 3;
    /// The server's handler failed.
    pub const INTERNAL: u32 = 4;
    /// The server cannot serve now (shutting down, no free slot, ...).
    pub const UNAVAILABLE: u32 = 5;
    /// A role or slot rule was violated.
    pub const ROLE: u32 = 6;
}

/// A human-readable name for an error code (for messages).
pub fn error_code_name(code: u32) -> &'static str {
    match code {
        error_code::BAD_REQUEST => "bad request",
        error_code::PROTOCOL => "protocol",
        error_code::CAPACITY => "capacity",
        error_code::INTERNAL => "internal",
        error_code::UNAVAILABLE => "unavailable",
        error_code::ROLE => "role",
        _ => "unknown code",
    }
}

/// Operations carried in a control frame's `app_tag`. Codes below 0x1000 belong to the
/// transports; upper layers use 0x1000 and above.
pub mod control {
    /// Client -> server on a stream transport: claim a slot (`app_value` = slot or `ANY_SLOT`).
    pub const HELLO: u32 = 1;
    /// Server -> client: the slot was granted; `app_value` = the slot; one uint64 tensor of limits.
    pub const HELLO_ACK: u32 = 2;
    /// `app_value` of HELLO meaning "lease any free slot".
    pub const ANY_SLOT: u64 = u64::MAX;
    /// First code available to upper layers.
    pub const USER_BASE: u32 = 0x1000;
}

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Response = 2,
    Error = 3,
    Control = 4,
}

impl Kind {
    pub fn from_code(code: u8) -> Result<Kind, FrameError> {
        Ok(match code {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::Error,
            4 => Kind::Control,
            other => return Err(FrameError::UnknownKind(other)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Response => "response",
            Kind::Error => "error",
            Kind::Control => "control",
        }
    }
}

/// Element types on the wire. `BFloat16` travels as raw 2-byte words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    Bool = 1,
    Int8 = 2,
    Int16 = 3,
    Int32 = 4,
    Int64 = 5,
    UInt8 = 6,
    UInt16 = 7,
    UInt32 = 8,
    UInt64 = 9,
    Float16 = 10,
    BFloat16 = 11,
    Float32 = 12,
    Float64 = 13,
}

impl DType {
    pub const ALL: [DType; 13] = [
        DType::Bool,
        DType::Int8,
        DType::Int16,
        DType::Int32,
        DType::Int64,
        DType::UInt8,
        DType::UInt16,
        DType::UInt32,
        DType::UInt64,
        DType::Float16,
        DType::BFloat16,
        DType::Float32,
        DType::Float64,
    ];

    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| *d as u8 == code)
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn itemsize(self) -> u64 {
        match self {
            DType::Bool | DType::Int8 | DType::UInt8 => 1,
            DType::Int16 | DType::UInt16 | DType::Float16 | DType::BFloat16 => 2,
            DType::Int32 | DType::UInt32 | DType::Float32 => 4,
            DType::Int64 | DType::UInt64 | DType::Float64 => 8,
        }
    }

    /// The numpy-style name (`"bfloat16"` for bf16, which numpy lacks).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::UInt8 => "uint8",
            DType::UInt16 => "uint16",
            DType::UInt32 => "uint32",
            DType::UInt64 => "uint64",
            DType::Float16 => "float16",
            DType::BFloat16 => "bfloat16",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.name() == name)
    }
}

/// Limits an endpoint enforces on every frame it sends or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tensors in one message.
    pub max_tensors: u32,
    /// Most dimensions of one tensor.
    pub max_dims: u32,
    /// Most bytes of tensor data in one message (the sum over its tensors).
    pub max_payload_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tensors: 64,
            max_dims: 8,
            max_payload_bytes: 256 << 20,
        }
    }
}

/// Hard ceilings no configuration may exceed (keeps every size computation far from overflow).
pub const MAX_TENSORS_CEILING: u32 = 4096;
pub const MAX_DIMS_CEILING: u32 = 64;
pub const MAX_PAYLOAD_CEILING: u64 = 1 << 44;

impl Limits {
    pub fn new(max_tensors: u32, max_dims: u32, max_payload_bytes: u64) -> Result<Limits> {
        if max_tensors == 0 || max_tensors > MAX_TENSORS_CEILING {
            return Err(Error::InvalidArgument(format!(
                "max_tensors must be in 1..={MAX_TENSORS_CEILING}, got {max_tensors}"
            )));
        }
        if max_dims > MAX_DIMS_CEILING {
            return Err(Error::InvalidArgument(format!(
                "max_dims must be in 0..={MAX_DIMS_CEILING}, got {max_dims}"
            )));
        }
        if max_payload_bytes == 0 || max_payload_bytes > MAX_PAYLOAD_CEILING {
            return Err(Error::InvalidArgument(format!(
                "max_nbytes (payload bytes per message) must be in 1..={MAX_PAYLOAD_CEILING}, got {max_payload_bytes}"
            )));
        }
        Ok(Limits {
            max_tensors,
            max_dims,
            max_payload_bytes,
        })
    }

    /// The largest frame these limits admit: header, a full table, and the payload with
    /// the worst-case alignment padding before every tensor.
    pub fn max_frame_len(&self) -> u64 {
        let table = u64::from(self.max_tensors) * (ENTRY_FIXED_LEN + 8 * u64::from(self.max_dims));
        align_up(HEADER_LEN as u64 + table)
            + self.max_payload_bytes
            + u64::from(self.max_tensors) * ALIGN
    }
}

/// Round up to a multiple of [`ALIGN`]. Callers keep values far below `u64::MAX`.
pub const fn align_up(x: u64) -> u64 {
    (x + (ALIGN - 1)) & !(ALIGN - 1)
}

fn checked_align_up(x: u64, field: &'static str) -> Result<u64, FrameError> {
    x.checked_add(ALIGN - 1)
        .map(|v| v & !(ALIGN - 1))
        .ok_or(FrameError::Overflow { field })
}

/// The fields of a frame's header that a sender chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub flags: u8,
    pub request_id: u64,
    pub slot: u32,
    pub app_tag: u32,
    pub app_value: u64,
}

impl Meta {
    pub fn new(kind: Kind) -> Meta {
        Meta {
            kind,
            flags: 0,
            request_id: 0,
            slot: 0,
            app_tag: 0,
            app_value: 0,
        }
    }
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub meta: Meta,
    pub tensor_count: u32,
    pub total_len: u64,
    pub table_len: u64,
}

impl Header {
    /// Where tensor data may start.
    pub fn payload_start(&self) -> u64 {
        align_up(HEADER_LEN as u64 + self.table_len)
    }
}

/// One tensor's description in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Byte offset of the data from the start of the frame.
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorDesc {
    pub fn range(&self) -> std::ops::Range<usize> {
        // Decoding checked offset + nbytes <= total_len == buffer length, so this fits usize.
        self.offset as usize..(self.offset + self.nbytes) as usize
    }
}

/// A fully validated frame: its header and tensor table. The data stays in the buffer it
/// was decoded from; `TensorDesc::range` slices it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub header: Header,
    pub tensors: Vec<TensorDesc>,
}

fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The limits a frame of `kind` is checked against: the endpoint's own, except that every
/// receiver can read an error frame (one 1-D message of up to [`ERROR_MESSAGE_MAX`] bytes)
/// whatever its limits, so a server's explanation always reaches the client.
pub fn effective_limits(kind: Kind, limits: &Limits) -> Limits {
    if kind == Kind::Error {
        Limits {
            max_tensors: limits.max_tensors.max(1),
            max_dims: limits.max_dims.max(1),
            max_payload_bytes: limits.max_payload_bytes.max(ERROR_MESSAGE_MAX + 1),
        }
    } else {
        *limits
    }
}

/// Validate the fixed header (the first 64 bytes) against `limits`. Stream transports call
/// this before allocating a receive buffer of `total_len` bytes.
pub fn decode_header(buf: &[u8], limits: &Limits) -> Result<Header, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            field: "header",
            needed: HEADER_LEN as u64,
            available: buf.len() as u64,
        });
    }
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&buf[0..4]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let version = rd_u16(buf, 4);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let kind = Kind::from_code(buf[6])?;
    let limits = &effective_limits(kind, limits);
    let flags = buf[7];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::UnknownFlags(flags & !KNOWN_FLAGS));
    }
    let request_id = rd_u64(buf, 8);
    let slot = rd_u32(buf, 16);
    let tensor_count = rd_u32(buf, 20);
    let total_len = rd_u64(buf, 24);
    let app_tag = rd_u32(buf, 32);
    let reserved0 = rd_u32(buf, 36);
    let app_value = rd_u64(buf, 40);
    let table_len = rd_u64(buf, 48);
    let reserved1 = rd_u64(buf, 56);
    if reserved0 != 0 {
        return Err(FrameError::NonZeroReserved {
            field: "reserved0",
            value: reserved0.into(),
        });
    }
    if reserved1 != 0 {
        return Err(FrameError::NonZeroReserved {
            field: "reserved1",
            value: reserved1,
        });
    }
    if tensor_count > limits.max_tensors {
        return Err(FrameError::LimitExceeded {
            field: "tensor_count",
            value: tensor_count.into(),
            limit: limits.max_tensors.into(),
        });
    }
    let max_len = limits.max_frame_len();
    if total_len > max_len {
        return Err(FrameError::LimitExceeded {
            field: "total_len",
            value: total_len,
            limit: max_len,
        });
    }
    let max_table = u64::from(tensor_count) * (ENTRY_FIXED_LEN + 8 * u64::from(limits.max_dims));
    if table_len > max_table {
        return Err(FrameError::LimitExceeded {
            field: "table_len",
            value: table_len,
            limit: max_table,
        });
    }
    let header_and_table = HEADER_LEN as u64 + table_len;
    if header_and_table > total_len {
        return Err(FrameError::Truncated {
            field: "tensor table",
            needed: header_and_table,
            available: total_len,
        });
    }
    Ok(Header {
        meta: Meta {
            kind,
            flags,
            request_id,
            slot,
            app_tag,
            app_value,
        },
        tensor_count,
        total_len,
        table_len,
    })
}

/// Validate a whole frame. `buf` must be exactly the frame (`total_len` bytes).
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Decoded, FrameError> {
    let header = decode_header(buf, limits)?;
    let limits = &effective_limits(header.meta.kind, limits);
    let actual = buf.len() as u64;
    if header.total_len != actual {
        return Err(FrameError::LengthMismatch {
            declared: header.total_len,
            actual,
        });
    }
    let payload_start = checked_align_up(HEADER_LEN as u64 + header.table_len, "payload start")?;
    // Each entry takes at least ENTRY_FIXED_LEN bytes of the (validated) table.
    let mut tensors = Vec::with_capacity(
        (header.tensor_count as u64).min(header.table_len / ENTRY_FIXED_LEN) as usize,
    );
    let mut pos = HEADER_LEN as u64;
    let table_end = HEADER_LEN as u64 + header.table_len;
    let mut previous_end = payload_start;
    let mut payload_sum: u64 = 0;
    for index in 0..header.tensor_count {
        let entry_end = pos + ENTRY_FIXED_LEN;
        if entry_end > table_end {
            return Err(FrameError::TableLengthMismatch {
                declared: header.table_len,
                actual: entry_end - HEADER_LEN as u64,
                count: index + 1,
            });
        }
        let p = pos as usize;
        let code = buf[p];
        let dtype = DType::from_code(code).ok_or(FrameError::UnknownDtype { index, code })?;
        let ndim = buf[p + 1];
        if u32::from(ndim) > limits.max_dims {
            return Err(FrameError::LimitExceeded {
                field: "ndim",
                value: ndim.into(),
                limit: limits.max_dims.into(),
            });
        }
        let reserved = u64::from(rd_u16(buf, p + 2)) | (u64::from(rd_u32(buf, p + 4)) << 16);
        if reserved != 0 {
            return Err(FrameError::NonZeroReserved {
                field: "tensor entry reserved",
                value: reserved,
            });
        }
        let offset = rd_u64(buf, p + 8);
        let nbytes = rd_u64(buf, p + 16);
        let shape_end = entry_end + 8 * u64::from(ndim);
        if shape_end > table_end {
            return Err(FrameError::TableLengthMismatch {
                declared: header.table_len,
                actual: shape_end - HEADER_LEN as u64,
                count: index + 1,
            });
        }
        let mut shape = Vec::with_capacity(ndim as usize);
        let mut elems: u64 = 1;
        for d in 0..ndim as usize {
            let dim = rd_u64(buf, p + ENTRY_FIXED_LEN as usize + 8 * d);
            shape.push(dim);
            elems = elems
                .checked_mul(dim)
                .ok_or(FrameError::Overflow { field: "shape" })?;
        }
        let expected = elems
            .checked_mul(dtype.itemsize())
            .ok_or(FrameError::Overflow { field: "shape" })?;
        if expected != nbytes {
            return Err(FrameError::ShapeMismatch {
                index,
                dtype: dtype.name(),
                shape,
                nbytes,
                expected,
            });
        }
        if offset % ALIGN != 0 {
            return Err(FrameError::Misaligned { index, offset });
        }
        let end = offset.checked_add(nbytes).ok_or(FrameError::Overflow {
            field: "offset + nbytes",
        })?;
        if offset < payload_start || end > header.total_len {
            return Err(FrameError::OutOfRange {
                index,
                start: offset,
                end,
                payload_start,
                total_len: header.total_len,
            });
        }
        if offset < previous_end {
            return Err(FrameError::Overlap {
                index,
                offset,
                previous_end,
            });
        }
        payload_sum += nbytes; // bounded by total_len, no overflow
        if payload_sum > limits.max_payload_bytes {
            return Err(FrameError::LimitExceeded {
                field: "payload bytes",
                value: payload_sum,
                limit: limits.max_payload_bytes,
            });
        }
        previous_end = end;
        pos = shape_end;
        tensors.push(TensorDesc {
            dtype,
            shape,
            offset,
            nbytes,
        });
    }
    if pos != table_end {
        return Err(FrameError::TableLengthMismatch {
            declared: header.table_len,
            actual: pos - HEADER_LEN as u64,
            count: header.tensor_count,
        });
    }
    if header.meta.kind == Kind::Error {
        check_error_frame(buf, &tensors)?;
    }
    Ok(Decoded { header, tensors })
}

fn check_error_frame(buf: &[u8], tensors: &[TensorDesc]) -> Result<(), FrameError> {
    match tensors {
        [t] if t.dtype == DType::UInt8 && t.shape.len() == 1 => {
            std::str::from_utf8(&buf[t.range()])
                .map(|_| ())
                .map_err(|_| FrameError::BadErrorFrame("message is not valid UTF-8"))
        }
        _ => Err(FrameError::BadErrorFrame(
            "expected exactly one 1-D uint8 tensor holding the UTF-8 message",
        )),
    }
}

/// For an error frame decoded by [`decode`]: its code and message.
pub fn error_parts<'a>(buf: &'a [u8], decoded: &Decoded) -> (u32, &'a str) {
    let code = decoded.header.meta.app_tag;
    let msg = decoded
        .tensors
        .first()
        .and_then(|t| std::str::from_utf8(&buf[t.range()]).ok())
        .unwrap_or("");
    (code, msg)
}

/// What a sender declares about one tensor before its bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSpec<'a> {
    pub dtype: DType,
    pub shape: &'a [u64],
}

/// Where each tensor goes in a frame being built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub total_len: u64,
    pub table_len: u64,
    pub offsets: Vec<u64>,
    pub nbytes: Vec<u64>,
}

/// Plan a frame for `specs`, checking them against `limits`. A message over the limits
/// is a [`Error::Capacity`] (the caller's message is too big), other problems are
/// [`Error::InvalidArgument`].
pub fn layout(specs: &[TensorSpec<'_>], limits: &Limits) -> Result<Layout> {
    if specs.len() as u64 > u64::from(limits.max_tensors) {
        return Err(Error::Capacity(format!(
            "message has {} tensors, the limit is {}",
            specs.len(),
            limits.max_tensors
        )));
    }
    let mut table_len = 0u64;
    let mut nbytes = Vec::with_capacity(specs.len());
    let mut payload = 0u64;
    for (i, s) in specs.iter().enumerate() {
        if s.shape.len() as u64 > u64::from(limits.max_dims) {
            return Err(Error::Capacity(format!(
                "tensor {i} has {} dimensions, the limit is {}",
                s.shape.len(),
                limits.max_dims
            )));
        }
        table_len += ENTRY_FIXED_LEN + 8 * s.shape.len() as u64;
        let n = s
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|elems| elems.checked_mul(s.dtype.itemsize()))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("tensor {i}: shape {:?} overflows", s.shape))
            })?;
        payload = payload.saturating_add(n);
        nbytes.push(n);
    }
    if payload > limits.max_payload_bytes {
        return Err(Error::Capacity(format!(
            "message carries {payload} bytes of tensor data, the limit (max_nbytes) is {}",
            limits.max_payload_bytes
        )));
    }
    let mut pos = align_up(HEADER_LEN as u64 + table_len);
    let mut offsets = Vec::with_capacity(specs.len());
    for (i, n) in nbytes.iter().enumerate() {
        if i > 0 {
            pos = align_up(pos);
        }
        offsets.push(pos);
        pos += n;
    }
    Ok(Layout {
        total_len: pos,
        table_len,
        offsets,
        nbytes,
    })
}

/// Write the header and the tensor table into `out[..HEADER_LEN + layout.table_len]`.
pub fn write_header_table(out: &mut [u8], meta: &Meta, specs: &[TensorSpec<'_>], layout: &Layout) {
    out[0..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out[6] = meta.kind as u8;
    out[7] = meta.flags;
    out[8..16].copy_from_slice(&meta.request_id.to_le_bytes());
    out[16..20].copy_from_slice(&meta.slot.to_le_bytes());
    out[20..24].copy_from_slice(&(specs.len() as u32).to_le_bytes());
    out[24..32].copy_from_slice(&layout.total_len.to_le_bytes());
    out[32..36].copy_from_slice(&meta.app_tag.to_le_bytes());
    out[36..40].fill(0);
    out[40..48].copy_from_slice(&meta.app_value.to_le_bytes());
    out[48..56].copy_from_slice(&layout.table_len.to_le_bytes());
    out[56..64].fill(0);
    let mut p = HEADER_LEN;
    for (i, s) in specs.iter().enumerate() {
        out[p] = s.dtype.code();
        out[p + 1] = s.shape.len() as u8;
        out[p + 2..p + 8].fill(0);
        out[p + 8..p + 16].copy_from_slice(&layout.offsets[i].to_le_bytes());
        out[p + 16..p + 24].copy_from_slice(&layout.nbytes[i].to_le_bytes());
        p += ENTRY_FIXED_LEN as usize;
        for d in s.shape {
            out[p..p + 8].copy_from_slice(&d.to_le_bytes());
            p += 8;
        }
    }
}

/// Write the header, the tensor table and zeroed padding into `out`, which must be at
/// least `layout.total_len` long, zeroing every gap between tensors. The caller then
/// copies each tensor's bytes to `layout.offsets[i]` (shared memory writes in place so).
pub fn write_prefix(out: &mut [u8], meta: &Meta, specs: &[TensorSpec<'_>], layout: &Layout) {
    let total = layout.total_len as usize;
    let out = &mut out[..total];
    write_header_table(out, meta, specs, layout);
    let mut gap_start = HEADER_LEN + layout.table_len as usize;
    for (i, off) in layout.offsets.iter().enumerate() {
        out[gap_start..*off as usize].fill(0);
        gap_start = (*off + layout.nbytes[i]) as usize;
    }
    out[gap_start..total].fill(0);
}

/// Reject header fields a decoder would refuse.
pub fn check_meta(meta: &Meta) -> Result<()> {
    if meta.flags & !KNOWN_FLAGS != 0 {
        return Err(Error::InvalidArgument(format!(
            "unknown flag bits {:#04x}",
            meta.flags & !KNOWN_FLAGS
        )));
    }
    Ok(())
}

/// A tensor to encode: its description and its bytes (C-contiguous, little-endian).
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// The descriptions of `tensors`, for [`layout`].
pub fn specs_of<'a>(tensors: &[TensorRef<'a>]) -> Vec<TensorSpec<'a>> {
    tensors
        .iter()
        .map(|t| TensorSpec {
            dtype: t.dtype,
            shape: t.shape,
        })
        .collect()
}

/// Lay out `tensors` (as [`layout`]) and check that each one's data has the length its
/// shape and dtype call for.
pub fn layout_data<'a>(
    tensors: &[TensorRef<'a>],
    limits: &Limits,
) -> Result<(Vec<TensorSpec<'a>>, Layout)> {
    let specs = specs_of(tensors);
    let lay = layout(&specs, limits)?;
    for (i, t) in tensors.iter().enumerate() {
        check_data_len(i, t, lay.nbytes[i])?;
    }
    Ok((specs, lay))
}

/// `Err` unless tensor `i` has `expected` data bytes.
pub fn check_data_len(i: usize, t: &TensorRef<'_>, expected: u64) -> Result<()> {
    if t.data.len() as u64 == expected {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "tensor {i}: {} data bytes given for shape {:?} of {} ({} expected)",
        t.data.len(),
        t.shape,
        t.dtype.name(),
        expected
    )))
}

/// Encode a whole frame into a new buffer (one copy of each tensor's bytes).
pub fn encode(meta: &Meta, tensors: &[TensorRef<'_>], limits: &Limits) -> Result<AlignedBuf> {
    check_meta(meta)?;
    let limits = &effective_limits(meta.kind, limits);
    let (specs, lay) = layout_data(tensors, limits)?;
    let mut buf = AlignedBuf::zeroed(lay.total_len as usize);
    write_prefix(buf.as_mut_slice(), meta, &specs, &lay);
    for (i, t) in tensors.iter().enumerate() {
        let off = lay.offsets[i] as usize;
        buf.as_mut_slice()[off..off + t.data.len()].copy_from_slice(t.data);
    }
    Ok(buf)
}

/// Longest error message carried (longer ones are cut on a character boundary).
pub const ERROR_MESSAGE_MAX: u64 = 64 << 10;

/// Build an error frame carrying `code` and a UTF-8 `message` (cut at 64 KiB on a char boundary).
pub fn encode_error(request_id: u64, slot: u32, code: u32, message: &str) -> AlignedBuf {
    let mut end = message.len().min(64 << 10);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let shape = [msg.len() as u64];
    let meta = Meta {
        kind: Kind::Error,
        flags: 0,
        request_id,
        slot,
        app_tag: code,
        app_value: 0,
    };
    let limits = Limits {
        max_tensors: 1,
        max_dims: 1,
        max_payload_bytes: (64 << 10) + 1,
    };
    let t = [TensorRef {
        dtype: DType::UInt8,
        shape: &shape,
        data: msg,
    }];
    match encode(&meta, &t, &limits) {
        Ok(b) => b,
        // Unreachable: the message was cut to fit the limits above.
        Err(_) => AlignedBuf::zeroed(0),
    }
}

/// One 64-byte, 64-aligned block; an [`AlignedBuf`] is a run of them.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// A heap buffer whose start is 64-byte aligned, so that every tensor in a frame stored in
/// it is aligned for its element type (numpy views need that).
#[derive(Clone)]
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf {
            // zeroed_vec allocates with calloc: large buffers come as fresh zero pages, no memset.
            blocks: bytemuck::zeroed_vec(len.div_ceil(64)),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<Block, u8>(&self.blocks)[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Block, u8>(&mut self.blocks)[..self.len]
    }

    /// Bytes this buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.blocks.capacity() * 64
    }

    /// Change the length, keeping the first bytes; new bytes are zero.
    pub fn resize(&mut self, len: usize) {
        self.blocks.resize(len.div_ceil(64), Block([0; 64]));
        self.len = len;
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    fn sample() -> AlignedBuf {
        let a: Vec<u8> = (0..24u8).collect();
        let b = [1u8, 0, 1];
        let meta = Meta {
            kind: Kind::Request,
            flags: FLAG_LIST,
            request_id: 7,
            slot: 3,
            app_tag: 9,
            app_value: 11,
        };
        encode(
            &meta,
            &[
                TensorRef {
                    dtype: DType::Float32,
                    shape: &[2, 3],
                    data: &a,
                },
                TensorRef {
                    dtype: DType::Bool,
                    shape: &[3],
                    data: &b,
                },
            ],
            &lim(),
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let buf = sample();
        let d = decode(buf.as_slice(), &lim()).unwrap();
        assert_eq!(d.header.meta.request_id, 7);
        assert_eq!(d.header.meta.slot, 3);
        assert_eq!(d.header.meta.flags, FLAG_LIST);
        assert_eq!(d.tensors.len(), 2);
        assert_eq!(d.tensors[0].shape, vec![2, 3]);
        assert_eq!(d.tensors[0].offset % 64, 0);
        assert_eq!(d.tensors[1].offset % 64, 0);
        assert_eq!(&buf.as_slice()[d.tensors[1].range()], &[1, 0, 1]);
    }

    #[test]
    fn rejects_bad_magic_version_kind() {
        let mut b = sample().as_slice().to_vec();
        b[0] = b'X';
        assert!(matches!(
            decode(&b, &lim()),
            Err(FrameError::BadMagic { .. })
        ));
        let mut b = sample().as_slice().to_vec();
        b[4] = 2;
        assert!(matches!(
            decode(&b, &lim()),
            Err(FrameError::UnsupportedVersion { found: 2, .. })
        ));
        let mut b = sample().as_slice().to_vec();
        b[6] = 9;
        assert_eq!(decode(&b, &lim()), Err(FrameError::UnknownKind(9)));
    }

    #[test]
    fn rejects_unknown_dtype_and_shape_mismatch() {
        let mut b = sample().as_slice().to_vec();
        b[64] = 200;
        assert_eq!(
            decode(&b, &lim()),
            Err(FrameError::UnknownDtype {
                index: 0,
                code: 200
            })
        );
        let mut b = sample().as_slice().to_vec();
        b[64 + 24] = 5; // first dim 2 -> 5
        assert!(matches!(
            decode(&b, &lim()),
            Err(FrameError::ShapeMismatch { index: 0, .. })
        ));
    }

    #[test]
    fn rejects_truncation_and_limits() {
        let b = sample();
        let s = b.as_slice();
        for cut in [0, 10, 63, 64, s.len() - 1] {
            assert!(decode(&s[..cut], &lim()).is_err(), "cut at {cut}");
        }
        let tight = Limits {
            max_tensors: 1,
            ..lim()
        };
        assert!(matches!(
            decode(s, &tight),
            Err(FrameError::LimitExceeded {
                field: "tensor_count",
                ..
            })
        ));
    }

    #[test]
    fn error_frame_round_trip() {
        let b = encode_error(5, 1, error_code::BAD_REQUEST, "ids must be < 100");
        let d = decode(b.as_slice(), &lim()).unwrap();
        assert_eq!(d.header.meta.kind, Kind::Error);
        assert_eq!(error_parts(b.as_slice(), &d), (1, "ids must be < 100"));
    }

    #[test]
    fn empty_and_scalar_tensors() {
        let meta = Meta::new(Kind::Response);
        let buf = encode(
            &meta,
            &[
                TensorRef {
                    dtype: DType::Int64,
                    shape: &[],
                    data: &[1, 0, 0, 0, 0, 0, 0, 0],
                },
                TensorRef {
                    dtype: DType::Float64,
                    shape: &[0, 5],
                    data: &[],
                },
            ],
            &lim(),
        )
        .unwrap();
        let d = decode(buf.as_slice(), &lim()).unwrap();
        assert_eq!(d.tensors[0].shape, Vec::<u64>::new());
        assert_eq!(d.tensors[1].nbytes, 0);
    }

    #[test]
    fn layout_capacity_errors() {
        let l = Limits::new(1, 2, 100).unwrap();
        assert!(matches!(
            layout(
                &[TensorSpec {
                    dtype: DType::UInt8,
                    shape: &[101]
                }],
                &l
            ),
            Err(Error::Capacity(_))
        ));
        assert!(matches!(
            layout(
                &[TensorSpec {
                    dtype: DType::UInt8,
                    shape: &[1, 1, 1]
                }],
                &l
            ),
            Err(Error::Capacity(_))
        ));
    }
}
