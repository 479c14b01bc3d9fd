//! The crate's one error type.
//!
//! Every fallible operation returns [`Error`]. Frame decoding has its own
//! [`FrameError`] so that each malformed field is a distinct, typed case; it is
//! wrapped as [`Error::Frame`] when it crosses into the transports. The Python
//! bindings map each variant to one exception class of `sensai.errors`.

use std::io;
use std::path::Path;
use std::time::Duration;

/// A malformed or out-of-limit frame. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated frame: {field} needs {needed} bytes, only {available} available")]
    Truncated {
        field: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("bad magic {found:02x?}: not a SensAI frame (expected {expected:02x?})")]
    BadMagic { found: [u8; 4], expected: [u8; 4] },
    #[error("unsupported protocol version {found} (this build speaks version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("unknown message kind {0} (expected 1=request, 2=response, 3=error, 4=control)")]
    UnknownKind(u8),
    #[error("unknown flag bits {0:#04x} in header field 'flags'")]
    UnknownFlags(u8),
    #[error("header field '{field}' must be zero, found {value}")]
    NonZeroReserved { field: &'static str, value: u64 },
    #[error("tensor {index}: unknown dtype code {code}")]
    UnknownDtype { index: u32, code: u8 },
    #[error("{field} is {value}, over the limit of {limit}")]
    LimitExceeded {
        field: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("arithmetic overflow computing {field}")]
    Overflow { field: &'static str },
    #[error("header field 'total_len' says {declared} bytes but the frame has {actual}")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("header field 'table_len' says {declared} bytes but the {count} table entries take {actual}")]
    TableLengthMismatch {
        declared: u64,
        actual: u64,
        count: u32,
    },
    #[error("tensor {index}: nbytes is {nbytes} but shape {shape:?} of {dtype} needs {expected}")]
    ShapeMismatch {
        index: u32,
        dtype: &'static str,
        shape: Vec<u64>,
        nbytes: u64,
        expected: u64,
    },
    #[error("tensor {index}: offset {offset} is not a multiple of 64")]
    Misaligned { index: u32, offset: u64 },
    #[error(
        "tensor {index}: bytes {start}..{end} lie outside the payload {payload_start}..{total_len}"
    )]
    OutOfRange {
        index: u32,
        start: u64,
        end: u64,
        payload_start: u64,
        total_len: u64,
    },
    #[error("tensor {index}: offset {offset} overlaps the previous tensor, which ends at {previous_end}")]
    Overlap {
        index: u32,
        offset: u64,
        previous_end: u64,
    },
    #[error("error frame: {0}")]
    BadErrorFrame(&'static str),
}

/// Everything that can go wrong in the crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer sent bytes that are not a valid frame, or a file is not a valid transport file.
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    /// A protocol violation that is not about one frame's bytes (handshake, file header, ...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A deadline passed.
    #[error("timed out after {:.3}s {what}", waited.as_secs_f64())]
    Timeout { what: String, waited: Duration },
    /// The other side closed, crashed or never came.
    #[error("peer gone: {0}")]
    PeerGone(String),
    /// A message or a resource does not fit a configured limit.
    #[error("capacity exceeded: {0}")]
    Capacity(String),
    /// Another live server owns the path.
    #[error("{0}")]
    AddressInUse(String),
    /// An endpoint was asked to do what its role does not allow.
    #[error("role error: {0}")]
    Role(String),
    /// The server answered with an error frame.
    #[error("server error {code} ({}): {message}", crate::frame::error_code_name(*code))]
    Remote { code: u32, message: String },
    /// A caller passed a value outside what the API accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A system call failed; `context` says what was being done and on which path.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The interrupt callback asked to stop (e.g. Python has a pending KeyboardInterrupt).
    #[error("interrupted")]
    Interrupted,
    /// The endpoint was already closed.
    #[error("endpoint is closed")]
    Closed,
    /// An endpoint was used by a process other than the one that opened it (a forked child).
    #[error(
        "{what} was opened by process {owner} and cannot be used in process {here}: a process \
         forked from the one that opened an endpoint shares its connection and slot, so their \
         answers would be swapped. Open a new endpoint in this process after the fork \
         (sensai.Client and SensAIClient do so by themselves)"
    )]
    Forked { what: String, owner: u32, here: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    pub fn io_path(what: &str, path: &Path, source: impl Into<io::Error>) -> Self {
        Error::io(format!("{what} {}", path.display()), source)
    }

    pub fn timeout(what: impl Into<String>, waited: Duration) -> Self {
        Error::Timeout {
            what: what.into(),
            waited,
        }
    }
}

/// Attach a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, what: &str, path: &Path) -> Result<T>;
}

impl<T, E: Into<io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn at(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io_path(what, path, e))
    }
}
