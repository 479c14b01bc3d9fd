//! The stream transports' handshake (HELLO / HELLO_ACK, nonces) and the rule of what a
//! client may send.

use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::frame::{self, control, Kind, Limits, Meta, TensorRef};
use crate::transport::Message;

/// A client sends requests (and upper-layer control frames), nothing else.
pub(crate) fn check_client_kind(meta: &Meta) -> Result<()> {
    if meta.kind != Kind::Request && meta.kind != Kind::Control {
        return Err(Error::Role(format!(
            "a client can only send requests, not {} frames",
            meta.kind.name()
        )));
    }
    Ok(())
}

/// What a server takes from a client once its session is open, decided here for every
/// transport alike: requests, and control frames with the codes of upper layers
/// ([`control::USER_BASE`] and above). The transports' own control codes (HELLO_ACK, ...) are
/// theirs: a client frame carrying one, or a response or error frame, never reaches the
/// application. The server answers it with a `ROLE` error frame carrying the returned text
/// (the frame's request id, so it answers exactly that frame) and the session goes on.
/// A transport whose handshake runs inside the session (a named pipe's HELLO opening a new
/// one) handles that frame before it asks.
pub(crate) fn client_frame_refusal(meta: &Meta) -> Option<String> {
    match meta.kind {
        Kind::Request => None,
        Kind::Control if meta.app_tag >= control::USER_BASE => None,
        Kind::Control => Some(format!(
            "a client may not send control frames with code {} (codes below {:#x} belong to              the transports; upper layers use {:#x} and above)",
            meta.app_tag,
            control::USER_BASE,
            control::USER_BASE
        )),
        kind => Some(format!(
            "a client may only send requests; got a {} frame",
            kind.name()
        )),
    }
}

/// The shape of the one tensor of a HELLO_ACK.
const ACK_SHAPE: [u64; 1] = [5];

/// The tensor of limits a server sends in its HELLO_ACK, little-endian uint64:
/// `[num_slots, max_tensors, max_dims, max_payload_bytes, server_pid]`.
pub(crate) struct AckValues([u8; 40]);

impl AckValues {
    pub fn tensor(&self) -> TensorRef<'_> {
        TensorRef {
            dtype: frame::DType::UInt64,
            shape: &ACK_SHAPE,
            data: &self.0,
        }
    }
}

/// The HELLO_ACK that grants `slot` of `num_slots` to the HELLO `request_id`.
pub(crate) fn hello_ack(
    request_id: u64,
    slot: usize,
    num_slots: usize,
    limits: &Limits,
) -> (Meta, AckValues) {
    let values = [
        num_slots as u64,
        u64::from(limits.max_tensors),
        u64::from(limits.max_dims),
        limits.max_payload_bytes,
        u64::from(rustix::process::getpid().as_raw_nonzero().get() as u32),
    ];
    let mut bytes = [0u8; 40];
    for (dst, v) in bytes.chunks_exact_mut(8).zip(values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    let meta = Meta {
        kind: Kind::Control,
        flags: 0,
        request_id,
        slot: slot as u32,
        app_tag: control::HELLO_ACK,
        app_value: slot as u64,
    };
    (meta, AckValues(bytes))
}

/// The server's parameters a client learns from HELLO_ACK.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerParams {
    pub slot: usize,
    pub limits: Limits,
}

/// Read the server's answer to our `HELLO`, whose request id was `nonce` (never 0). The
/// answer must carry that nonce (§13.1), except an error frame with request id 0: a refusal
/// the server made before it read the `HELLO` (§11). A `ROLE` refusal of the `HELLO` itself
/// means the slot we named is out of range (§13.1): that is the caller's bad argument, as on
/// the transports that check the slot on the client side.
pub(crate) fn parse_hello_ack(msg: &Message, nonce: u64, path: &Path) -> Result<ServerParams> {
    let rid = msg.meta().request_id;
    let answers_hello = rid == nonce;
    let unattributed_refusal = msg.meta().kind == Kind::Error && rid == 0;
    if !(answers_hello || unattributed_refusal) {
        return Err(Error::Protocol(format!(
            "the server at {} answered the handshake with a {} frame for request id {rid}, not \
             for our HELLO: expected request id {nonce} (the HELLO's nonce), or 0 on an error \
             frame",
            path.display(),
            msg.meta().kind.name()
        )));
    }
    if let Some(e) = msg.as_remote_error() {
        return Err(match e {
            Error::Remote { code, message } if code == frame::error_code::UNAVAILABLE => {
                Error::Capacity(message)
            }
            Error::Remote { code, message } if code == frame::error_code::ROLE && answers_hello => {
                Error::InvalidArgument(message)
            }
            Error::Remote { code, message } if code == frame::error_code::ROLE => {
                Error::Role(message)
            }
            other => other,
        });
    }
    let m = msg.meta();
    let bad = |why: &str| {
        Error::Protocol(format!(
            "the server at {} answered the handshake with {why}",
            path.display()
        ))
    };
    if m.kind != Kind::Control || m.app_tag != frame::control::HELLO_ACK {
        return Err(bad("an unexpected frame"));
    }
    let t = &msg.decoded().tensors;
    if t.len() != 1 || t[0].dtype != frame::DType::UInt64 || t[0].shape != [5] {
        return Err(bad("a malformed acknowledgement"));
    }
    let b = msg.tensor_bytes(0).unwrap_or(&[]);
    let v: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let limits = Limits::new(
        u32::try_from(v[1]).map_err(|_| bad("an invalid max_tensors"))?,
        u32::try_from(v[2]).map_err(|_| bad("an invalid max_dims"))?,
        v[3],
    )
    .map_err(|_| bad("invalid limits"))?;
    if m.app_value >= v[0] {
        return Err(bad("a slot outside its slot count"));
    }
    Ok(ServerParams {
        slot: m.app_value as usize,
        limits,
    })
}

/// A random 64-bit value (handshake nonces, temporary names); not for cryptography.
pub(crate) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Limits wide enough to read any transport control frame (before the server's limits are known).
pub(crate) const HANDSHAKE_LIMITS: Limits = Limits {
    max_tensors: 1,
    max_dims: 1,
    max_payload_bytes: 1 << 17,
};
