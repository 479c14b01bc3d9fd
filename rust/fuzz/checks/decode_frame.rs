//! Fuzz `sensai::frame::decode` with arbitrary bytes under several limit settings.
//!
//! For every input and every setting: `decode` and `decode_header` must not panic; when the
//! header check fails the whole decode fails with the same error; whatever `decode` accepts
//! must satisfy every rule of docs/PROTOCOL.md (tensor ranges in bounds, aligned, in order,
//! non-overlapping, within the limits); a frame accepted under some limits is accepted,
//! identically, under every larger setting; and re-encoding an accepted frame gives a frame
//! that decodes to the same content.

use sensai::frame::{
    self, align_up, DType, Decoded, Kind, Limits, TensorRef, ALIGN, ENTRY_FIXED_LEN, HEADER_LEN,
    MAX_DIMS_CEILING, MAX_PAYLOAD_CEILING, MAX_TENSORS_CEILING,
};
use sensai::Error;

/// Limit settings, each at least as large as the one before in all three values.
fn settings() -> [Limits; 5] {
    let new = |t, d, p| Limits::new(t, d, p).expect("valid fuzz limits");
    [
        new(1, 0, 1),
        new(1, 1, 64),
        new(4, 4, 4096),
        Limits::default(),
        new(MAX_TENSORS_CEILING, MAX_DIMS_CEILING, MAX_PAYLOAD_CEILING),
    ]
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn check_invariants(buf: &[u8], d: &Decoded, limits: &Limits) {
    let limits = &frame::effective_limits(d.header.meta.kind, limits);
    let h = &d.header;
    assert_eq!(h.total_len, buf.len() as u64);
    assert_eq!(le_u64(buf, 24), h.total_len);
    assert_eq!(le_u64(buf, 48), h.table_len);
    assert!(h.total_len <= limits.max_frame_len());
    assert_eq!(h.tensor_count as usize, d.tensors.len());
    assert!(h.tensor_count <= limits.max_tensors);
    let table: u64 = d
        .tensors
        .iter()
        .map(|t| ENTRY_FIXED_LEN + 8 * t.shape.len() as u64)
        .sum();
    assert_eq!(table, h.table_len);
    let payload_start = align_up(HEADER_LEN as u64 + h.table_len);
    let mut previous_end = payload_start;
    let mut sum = 0u64;
    for t in &d.tensors {
        assert!(t.shape.len() as u64 <= u64::from(limits.max_dims));
        let elems = t
            .shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .expect("accepted shapes do not overflow");
        assert_eq!(elems.checked_mul(t.dtype.itemsize()), Some(t.nbytes));
        assert_eq!(t.offset % ALIGN, 0);
        assert!(t.offset >= previous_end);
        let end = t.offset.checked_add(t.nbytes).expect("no overflow");
        assert!(end <= buf.len() as u64);
        assert!(buf.get(t.range()).is_some());
        previous_end = end;
        sum += t.nbytes;
    }
    assert!(sum <= limits.max_payload_bytes);
    if h.meta.kind == Kind::Error {
        assert_eq!(d.tensors.len(), 1);
        assert_eq!(d.tensors[0].dtype, DType::UInt8);
        assert_eq!(d.tensors[0].shape.len(), 1);
        let (_, msg) = frame::error_parts(buf, d);
        assert_eq!(msg.len() as u64, d.tensors[0].nbytes);
    }
}

/// Re-encode an accepted frame canonically and check it decodes to the same content.
fn check_reencode(buf: &[u8], d: &Decoded, limits: &Limits) {
    let refs: Vec<TensorRef<'_>> = d
        .tensors
        .iter()
        .map(|t| TensorRef {
            dtype: t.dtype,
            shape: &t.shape,
            data: &buf[t.range()],
        })
        .collect();
    match frame::encode(&d.header.meta, &refs, limits) {
        Ok(out) => {
            let out = out.as_slice();
            assert!(out.len() <= buf.len(), "canonical frames are the shortest");
            let e = frame::decode(out, limits).expect("a re-encoded frame decodes");
            assert_eq!(e.header.meta, d.header.meta);
            assert_eq!(e.tensors.len(), d.tensors.len());
            for (a, b) in e.tensors.iter().zip(&d.tensors) {
                assert_eq!((a.dtype, &a.shape, a.nbytes), (b.dtype, &b.shape, b.nbytes));
                assert_eq!(&out[a.range()], &buf[b.range()]);
            }
        }
        // Known difference (docs/PROTOCOL.md section 14, step 19): the encoder multiplies
        // itemsize x d0 x d1 ..., the decoder d0 x d1 ... x itemsize, so an empty tensor with
        // a huge dimension before its 0 decodes but does not encode.
        Err(Error::InvalidArgument(_))
            if d.tensors
                .iter()
                .any(|t| t.nbytes == 0 && t.shape.contains(&0)) => {}
        Err(e) => panic!("an accepted frame does not re-encode: {e}"),
    }
}

/// One input, the whole check: panics on any failure.
pub fn run(data: &[u8]) {
    let mut accepted: Option<Decoded> = None;
    for limits in settings() {
        let header = frame::decode_header(data, &limits);
        let result = frame::decode(data, &limits);
        match (&header, &result) {
            (Ok(h), Ok(d)) => assert_eq!(h, &d.header),
            (Err(he), Err(e)) => assert_eq!(he, e),
            (Err(he), Ok(_)) => panic!("header refused ({he}) but the frame accepted"),
            (Ok(_), Err(_)) => {}
        }
        match result {
            Ok(d) => {
                check_invariants(data, &d, &limits);
                if let Some(prev) = &accepted {
                    assert_eq!(prev, &d, "larger limits decode the same frame the same way");
                }
                check_reencode(data, &d, &limits);
                accepted = Some(d);
            }
            Err(e) => assert!(
                accepted.is_none(),
                "accepted under smaller limits, refused under {limits:?}: {e}"
            ),
        }
    }
}
