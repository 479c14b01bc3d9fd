//! SensAI's core: the wire format and the local IPC transports that carry a teacher
//! model's logits to distillation students.
//!
//! * [`frame`]: the frame format (pure; no I/O).
//! * [`transport`]: Unix-socket, named-pipe and shared-memory endpoints with explicit
//!   server and client roles.
//! * `py` (cargo feature `python`): the PyO3 bindings, the only code that knows Python.

pub mod error;
pub mod frame;
pub mod sync;
pub mod transport;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, FrameError, Result};
