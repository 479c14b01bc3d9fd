//! Transports: server and client endpoints with distinct roles.
//!
//! A server owns `num_slots` slots; each client holds exactly one slot (chosen by the
//! caller or leased from the free ones) and can only send requests and receive
//! responses on it. The server only receives requests and sends responses. Roles are
//! separate types ([`ServerEndpoint`], [`ClientEndpoint`]), so a role violation is a
//! compile error in Rust and a `RoleError` in the Python facade.
//!
//! Every blocking call takes a deadline (`None` = no deadline) and an interrupt callback
//! that it calls at least every [`INTERRUPT_CHECK`] so that the embedding program (Python's
//! Ctrl-C) can stop it; a vanished peer ends the wait with [`crate::Error::PeerGone`].

pub(crate) mod access;
mod deadline;
pub(crate) mod discover;
mod endpoint;
pub mod fifo;
pub(crate) mod handshake;
pub(crate) mod lock;
pub mod shm;
pub(crate) mod stream;
pub mod uds;

pub(crate) use access::{check_peer_uid, check_private, temp_context};
pub use deadline::Deadline;
pub(crate) use deadline::{poll_fds, wait_fd, wait_fds};
#[cfg(test)]
pub(crate) use discover::testing;
pub(crate) use discover::{not_yet, retry_until_up, DirWatch, Retry};
pub(crate) use endpoint::{
    check_slot, recv_answer_for, request_context, slot_out_of_range, slot_range_text, take_answer,
};
pub use endpoint::{
    no_interrupt, ClientEndpoint, Interrupt, Message, ServerEndpoint, INTERRUPT_CHECK,
};
pub(crate) use handshake::{
    check_client_kind, client_frame_refusal, parse_hello_ack, rand_u64, HANDSHAKE_LIMITS,
};
