//! Property tests of the wire format (`sensai::frame`).
//!
//! * encode/decode round trip for random dtypes, shapes (0-d and empty included), data, meta
//!   and limits, up to the limits exactly, and `Capacity` just past them;
//! * `decode` of arbitrary bytes, of structured near-frames, and of mutated valid frames never
//!   panics, and whatever it accepts satisfies every rule of docs/PROTOCOL.md (tensor ranges in
//!   bounds, aligned, in order, non-overlapping, within the limits);
//! * `decode` accepts a frame under given limits exactly when the frame fits them.

use proptest::prelude::*;
use proptest::sample::Index;
use sensai::frame::{
    self, align_up, control, DType, Decoded, Kind, Limits, Meta, TensorRef, ALIGN, ENTRY_FIXED_LEN,
    FLAG_LIST, HEADER_LEN, MAGIC, MAX_DIMS_CEILING, MAX_PAYLOAD_CEILING, MAX_TENSORS_CEILING,
    PROTOCOL_VERSION,
};
use sensai::{Error, FrameError};

// ---------------------------------------------------------------------------------------
// Invariants of an accepted frame.

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Everything docs/PROTOCOL.md promises about a frame `decode` accepted under `limits`.
fn check_invariants(buf: &[u8], d: &Decoded, limits: &Limits) {
    let limits = &sensai::frame::effective_limits(d.header.meta.kind, limits);
    let h = &d.header;
    let m = &h.meta;
    // The header fields are what the bytes say.
    assert_eq!(&buf[0..4], &MAGIC);
    assert_eq!(u16::from_le_bytes([buf[4], buf[5]]), PROTOCOL_VERSION);
    assert_eq!(buf[6], m.kind as u8);
    assert_eq!(buf[7], m.flags);
    assert_eq!(m.flags & !FLAG_LIST, 0);
    assert_eq!(le_u64(buf, 8), m.request_id);
    assert_eq!(le_u32(buf, 16), m.slot);
    assert_eq!(le_u32(buf, 20), h.tensor_count);
    assert_eq!(le_u64(buf, 24), h.total_len);
    assert_eq!(le_u32(buf, 32), m.app_tag);
    assert_eq!(le_u32(buf, 36), 0);
    assert_eq!(le_u64(buf, 40), m.app_value);
    assert_eq!(le_u64(buf, 48), h.table_len);
    assert_eq!(le_u64(buf, 56), 0);
    // Lengths and limits.
    assert_eq!(h.total_len, buf.len() as u64);
    assert!(h.total_len <= limits.max_frame_len());
    assert_eq!(h.tensor_count as usize, d.tensors.len());
    assert!(h.tensor_count <= limits.max_tensors);
    let table: u64 = d
        .tensors
        .iter()
        .map(|t| ENTRY_FIXED_LEN + 8 * t.shape.len() as u64)
        .sum();
    assert_eq!(table, h.table_len);
    assert!(HEADER_LEN as u64 + h.table_len <= h.total_len);
    let payload_start = align_up(HEADER_LEN as u64 + h.table_len);
    assert_eq!(payload_start, h.payload_start());
    let mut previous_end = payload_start;
    let mut sum = 0u64;
    let mut pos = HEADER_LEN;
    for t in &d.tensors {
        // The table entry is what the bytes say.
        assert_eq!(buf[pos], t.dtype.code());
        assert_eq!(usize::from(buf[pos + 1]), t.shape.len());
        assert!(buf[pos + 2..pos + 8].iter().all(|b| *b == 0));
        assert_eq!(le_u64(buf, pos + 8), t.offset);
        assert_eq!(le_u64(buf, pos + 16), t.nbytes);
        for (k, dim) in t.shape.iter().enumerate() {
            assert_eq!(le_u64(buf, pos + 24 + 8 * k), *dim);
        }
        pos += 24 + 8 * t.shape.len();
        assert!(t.shape.len() as u64 <= u64::from(limits.max_dims));
        let elems = t
            .shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .expect("accepted shapes do not overflow");
        assert_eq!(elems.checked_mul(t.dtype.itemsize()), Some(t.nbytes));
        assert_eq!(t.offset % ALIGN, 0, "aligned");
        assert!(t.offset >= previous_end, "in order, not overlapping");
        let end = t.offset.checked_add(t.nbytes).expect("no overflow");
        assert!(end <= buf.len() as u64, "in bounds");
        assert!(buf.get(t.range()).is_some());
        previous_end = end;
        sum += t.nbytes;
    }
    assert!(sum <= limits.max_payload_bytes);
    if m.kind == Kind::Error {
        assert_eq!(d.tensors.len(), 1);
        let t = &d.tensors[0];
        assert_eq!(t.dtype, DType::UInt8);
        assert_eq!(t.shape.len(), 1);
        assert!(std::str::from_utf8(&buf[t.range()]).is_ok());
    }
}

/// Decode under `limits`; anything accepted must satisfy the invariants. Never panics
/// (a panic in `decode` fails the property).
fn decode_checked(buf: &[u8], limits: &Limits) -> Result<Decoded, FrameError> {
    let header = frame::decode_header(buf, limits);
    let r = frame::decode(buf, limits);
    match &r {
        Ok(d) => {
            check_invariants(buf, d, limits);
            assert_eq!(header.as_ref().ok(), Some(&d.header));
        }
        // A frame whose header fails fails whole, with the same error.
        Err(e) => {
            if let Err(he) = &header {
                assert_eq!(he, e);
            }
        }
    }
    r
}

fn some_limits() -> Vec<Limits> {
    vec![
        Limits::new(1, 0, 1).unwrap(),
        Limits::new(1, 1, 64).unwrap(),
        Limits::new(4, 4, 4096).unwrap(),
        Limits::default(),
        Limits::new(MAX_TENSORS_CEILING, MAX_DIMS_CEILING, MAX_PAYLOAD_CEILING).unwrap(),
    ]
}

// ---------------------------------------------------------------------------------------
// Strategies.

#[derive(Debug, Clone)]
struct T {
    dtype: DType,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn dtype() -> impl Strategy<Value = DType> {
    proptest::sample::select(DType::ALL.to_vec())
}

/// A tensor with up to `max_ndim` dimensions, each 0..=max_dim (so 0-d and empty ones occur).
fn tensor(max_ndim: usize, max_dim: u64) -> impl Strategy<Value = T> {
    (dtype(), prop::collection::vec(0..=max_dim, 0..=max_ndim)).prop_flat_map(|(dtype, shape)| {
        let n = shape.iter().product::<u64>() * dtype.itemsize();
        prop::collection::vec(any::<u8>(), n as usize).prop_map(move |data| T {
            dtype,
            shape: shape.clone(),
            data,
        })
    })
}

fn meta() -> impl Strategy<Value = Meta> {
    (
        prop::sample::select(vec![Kind::Request, Kind::Response, Kind::Control]),
        prop::sample::select(vec![0u8, FLAG_LIST]),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(|(kind, flags, request_id, slot, app_tag, app_value)| Meta {
            kind,
            flags,
            request_id,
            slot,
            app_tag,
            app_value,
        })
}

fn limits() -> impl Strategy<Value = Limits> {
    (1u32..=12, 0u32..=6, 1u64..=2048).prop_map(|(t, d, p)| Limits::new(t, d, p).unwrap())
}

fn refs(ts: &[T]) -> Vec<TensorRef<'_>> {
    ts.iter()
        .map(|t| TensorRef {
            dtype: t.dtype,
            shape: &t.shape,
            data: &t.data,
        })
        .collect()
}

fn fits(ts: &[T], l: &Limits) -> bool {
    ts.len() as u64 <= u64::from(l.max_tensors)
        && ts
            .iter()
            .all(|t| t.shape.len() as u64 <= u64::from(l.max_dims))
        && ts.iter().map(|t| t.data.len() as u64).sum::<u64>() <= l.max_payload_bytes
}

fn loose() -> Limits {
    Limits::new(64, 16, 1 << 20).unwrap()
}

/// A valid frame (encoded under `loose()` limits) and the tensors it holds.
fn valid_frame() -> impl Strategy<Value = (Vec<u8>, Meta, Vec<T>)> {
    (meta(), prop::collection::vec(tensor(4, 5), 0..=6)).prop_map(|(m, ts)| {
        let buf = frame::encode(&m, &refs(&ts), &loose())
            .expect("fits the loose limits")
            .as_slice()
            .to_vec();
        (buf, m, ts)
    })
}

fn assert_same_content(buf: &[u8], d: &Decoded, m: &Meta, ts: &[T]) {
    assert_eq!(&d.header.meta, m);
    assert_eq!(d.tensors.len(), ts.len());
    for (got, want) in d.tensors.iter().zip(ts) {
        assert_eq!(got.dtype, want.dtype);
        assert_eq!(got.shape, want.shape);
        assert_eq!(got.nbytes, want.data.len() as u64);
        assert_eq!(&buf[got.range()], &want.data[..]);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    /// Set a byte in the header or the table (where the interesting fields are).
    SetPrefix(Index, u8),
    /// Write a u64 at an 8-aligned position of the header or table.
    SetWord(Index, u64),
    Truncate(Index),
    Extend(Vec<u8>),
    FixTotalLen,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, x)| Mutation::SetPrefix(i, x)),
        2 => (any::<Index>(), prop_oneof![
            any::<u64>(),
            0u64..=1024,
            (0u64..=64).prop_map(|k| k * 64),
            Just(u64::MAX),
            Just(u64::MAX - 63),
        ]).prop_map(|(i, v)| Mutation::SetWord(i, v)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..=130).prop_map(Mutation::Extend),
        1 => Just(Mutation::FixTotalLen),
    ]
}

fn apply(buf: &mut Vec<u8>, m: &Mutation) {
    let prefix_len = |b: &Vec<u8>| {
        let table = if b.len() >= 56 { le_u64(b, 48) } else { 0 };
        (HEADER_LEN as u64 + table.min(4096)).min(b.len() as u64) as usize
    };
    match m {
        Mutation::Flip(i, x) if !buf.is_empty() => {
            let k = i.index(buf.len());
            buf[k] ^= x;
        }
        Mutation::SetPrefix(i, x) if !buf.is_empty() => {
            let k = i.index(prefix_len(buf).max(1));
            buf[k] = *x;
        }
        Mutation::SetWord(i, v) if buf.len() >= 8 => {
            let words = prefix_len(buf) / 8;
            if words > 0 {
                let k = 8 * i.index(words);
                buf[k..k + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        Mutation::Truncate(i) => {
            let k = i.index(buf.len() + 1);
            buf.truncate(k);
        }
        Mutation::Extend(extra) => buf.extend_from_slice(extra),
        Mutation::FixTotalLen if buf.len() >= 32 => {
            let n = buf.len() as u64;
            buf[24..32].copy_from_slice(&n.to_le_bytes());
        }
        _ => {}
    }
}

/// A "near frame": a valid-looking header and a table of random but plausible entries,
/// so that random inputs get past the header checks into the table and range checks.
#[derive(Debug, Clone)]
struct Entry {
    code: u8,
    shape: Vec<u64>,
    offset_blocks: u64,
    nbytes_delta: i8,
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        prop_oneof![10 => 1u8..=13, 1 => any::<u8>()],
        prop::collection::vec(prop_oneof![8 => 0u64..=4, 1 => any::<u64>()], 0..=4),
        0u64..=10,
        prop_oneof![6 => Just(0i8), 1 => any::<i8>()],
    )
        .prop_map(|(code, shape, offset_blocks, nbytes_delta)| Entry {
            code,
            shape,
            offset_blocks,
            nbytes_delta,
        })
}

fn near_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![8 => 1u8..=4, 1 => any::<u8>()],
        prop_oneof![8 => Just(0u8), 4 => Just(FLAG_LIST), 1 => any::<u8>()],
        any::<[u8; 16]>(),
        prop::collection::vec(entry(), 0..=5),
        prop_oneof![8 => Just(0i64), 1 => -16i64..=16],
        prop_oneof![4 => Just(0u64), 2 => 0u64..=200],
        any::<u8>(),
    )
        .prop_map(|(kind, flags, ids, entries, table_delta, extra, fill)| {
            let table_len: u64 = entries
                .iter()
                .map(|e| ENTRY_FIXED_LEN + 8 * e.shape.len() as u64)
                .sum();
            let table_len = table_len.saturating_add_signed(table_delta);
            let payload_start = align_up(HEADER_LEN as u64 + table_len);
            let mut table = Vec::new();
            let mut end = payload_start;
            for e in &entries {
                let elems = e.shape.iter().fold(1u64, |a, d| a.wrapping_mul(*d));
                let size = DType::from_code(e.code).map_or(1, |d| d.itemsize());
                let nbytes = elems
                    .wrapping_mul(size)
                    .wrapping_add_signed(i64::from(e.nbytes_delta));
                let offset = payload_start + 64 * e.offset_blocks;
                end = end.max(offset.saturating_add(nbytes.min(1 << 16)));
                table.push(e.code);
                table.push(e.shape.len() as u8);
                table.extend_from_slice(&[0; 6]);
                table.extend_from_slice(&offset.to_le_bytes());
                table.extend_from_slice(&nbytes.to_le_bytes());
                for d in &e.shape {
                    table.extend_from_slice(&d.to_le_bytes());
                }
            }
            let total_len = (end + extra).max(HEADER_LEN as u64 + table.len() as u64);
            let mut buf = vec![fill; total_len as usize];
            buf[0..4].copy_from_slice(&MAGIC);
            buf[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            buf[6] = kind;
            buf[7] = flags;
            buf[8..16].copy_from_slice(&ids[..8]);
            buf[16..20].copy_from_slice(&ids[8..12]);
            buf[20..24].copy_from_slice(&(entries.len() as u32).to_le_bytes());
            buf[24..32].copy_from_slice(&total_len.to_le_bytes());
            buf[32..36].copy_from_slice(&ids[12..16]);
            buf[36..40].fill(0);
            buf[40..48].copy_from_slice(&ids[0..8]);
            buf[48..56].copy_from_slice(&table_len.to_le_bytes());
            buf[56..64].fill(0);
            buf[64..64 + table.len()].copy_from_slice(&table);
            buf
        })
}

// ---------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Encoding succeeds exactly when the message fits the limits (else `Capacity`), and
    /// decoding gives back the same meta, dtypes, shapes and bytes.
    #[test]
    fn round_trip(m in meta(), ts in prop::collection::vec(tensor(7, 5), 0..=14), l in limits()) {
        match frame::encode(&m, &refs(&ts), &l) {
            Ok(buf) => {
                prop_assert!(fits(&ts, &l));
                let buf = buf.as_slice();
                let d = decode_checked(buf, &l).expect("an encoded frame decodes");
                assert_same_content(buf, &d, &m, &ts);
                // Canonical layout: first tensor at payload_start, each next at align64 of the
                // previous end, no padding after the last.
                let mut pos = d.header.payload_start();
                for t in &d.tensors {
                    prop_assert_eq!(t.offset, align_up(pos));
                    pos = t.offset + t.nbytes;
                }
                prop_assert_eq!(d.header.total_len, pos);
                // Padding is zero.
                let mut covered = vec![false; buf.len()];
                covered[..HEADER_LEN + d.header.table_len as usize].fill(true);
                for t in &d.tensors {
                    covered[t.range()].fill(true);
                }
                prop_assert!(buf.iter().zip(&covered).all(|(b, c)| *c || *b == 0));
            }
            Err(Error::Capacity(_)) => prop_assert!(!fits(&ts, &l)),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    /// Messages exactly at the limits round-trip; one tensor, dimension or byte more is refused
    /// by the encoder (`Capacity`) and, built under looser limits, by the decoder.
    #[test]
    fn at_the_limits(
        m in meta(),
        dt in dtype(),
        max_tensors in 1u32..=10,
        max_dims in 1u32..=8,
        counts in prop::collection::vec(0u64..=9, 10),
    ) {
        let n = max_tensors as usize;
        let mut counts = counts[..n].to_vec();
        counts[0] += 1;
        let payload: u64 = counts.iter().sum::<u64>() * dt.itemsize();
        let shapes: Vec<Vec<u64>> = counts
            .iter()
            .map(|c| {
                let mut s = vec![1u64; max_dims as usize - 1];
                s.push(*c);
                s
            })
            .collect();
        let datas: Vec<Vec<u8>> = counts
            .iter()
            .map(|c| (0..c * dt.itemsize()).map(|i| i as u8).collect())
            .collect();
        let ts: Vec<T> = shapes
            .iter()
            .zip(&datas)
            .map(|(s, d)| T { dtype: dt, shape: s.clone(), data: d.clone() })
            .collect();
        let exact = Limits::new(max_tensors, max_dims, payload).unwrap();
        let buf = frame::encode(&m, &refs(&ts), &exact).expect("fits exactly").as_slice().to_vec();
        let d = decode_checked(&buf, &exact).expect("decodes at the limits");
        assert_same_content(&buf, &d, &m, &ts);
        prop_assert!(d.header.total_len <= exact.max_frame_len());

        let fewer_tensors = Limits { max_tensors: max_tensors - 1, ..exact };
        let fewer_dims = Limits { max_dims: max_dims - 1, ..exact };
        let fewer_bytes = Limits { max_payload_bytes: payload - 1, ..exact };
        for tight in [fewer_tensors, fewer_dims, fewer_bytes] {
            if tight.max_tensors == 0 || tight.max_payload_bytes == 0 {
                continue;
            }
            let enc = frame::encode(&m, &refs(&ts), &tight);
            prop_assert!(matches!(enc, Err(Error::Capacity(_))), "encode under {:?}", tight);
            let dec = decode_checked(&buf, &tight);
            let refused = matches!(dec, Err(FrameError::LimitExceeded { .. }));
            prop_assert!(refused, "decode under {:?}: {:?}", tight, dec);
        }
    }

    /// A frame decodes under any limits exactly when its content fits them.
    #[test]
    fn decode_accepts_exactly_what_fits((buf, m, ts) in valid_frame(), l in limits()) {
        match decode_checked(&buf, &l) {
            Ok(d) => {
                prop_assert!(fits(&ts, &l));
                assert_same_content(&buf, &d, &m, &ts);
            }
            Err(e) => {
                prop_assert!(!fits(&ts, &l), "refused a fitting frame: {e}");
                prop_assert!(matches!(e, FrameError::LimitExceeded { .. }), "{e}");
            }
        }
    }

    /// Error frames: any message round-trips (cut to 64 KiB on a char boundary).
    #[test]
    fn error_frames(id in any::<u64>(), slot in any::<u32>(), code in any::<u32>(), msg in ".{0,300}") {
        let buf = frame::encode_error(id, slot, code, &msg);
        let d = decode_checked(buf.as_slice(), &Limits::default()).expect("error frame decodes");
        prop_assert_eq!(d.header.meta.kind, Kind::Error);
        prop_assert_eq!(d.header.meta.request_id, id);
        prop_assert_eq!(d.header.meta.slot, slot);
        prop_assert_eq!(frame::error_parts(buf.as_slice(), &d), (code, msg.as_str()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Arbitrary bytes: decode never panics, and what it accepts is sound.
    #[test]
    fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..=600)) {
        for l in some_limits() {
            let _ = decode_checked(&buf, &l);
        }
    }

    /// Arbitrary bytes behind a valid magic and version (so the header checks run).
    #[test]
    fn arbitrary_after_magic_never_panic(mut buf in prop::collection::vec(any::<u8>(), 6..=600)) {
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        for l in some_limits() {
            let _ = decode_checked(&buf, &l);
        }
    }

    /// Near-frames with plausible tables: decode never panics, and what it accepts is sound.
    #[test]
    fn near_frames_never_panic(buf in near_frame()) {
        for l in some_limits() {
            let _ = decode_checked(&buf, &l);
        }
    }

    /// Valid frames after random flips, truncations and extensions: decode never panics, and
    /// either refuses the frame or returns one whose tensors are in bounds, aligned and
    /// non-overlapping.
    #[test]
    fn mutated_frames_are_refused_or_sound(
        (buf, _m, _ts) in valid_frame(),
        muts in prop::collection::vec(mutation(), 1..=4),
    ) {
        let mut buf = buf;
        for mu in &muts {
            apply(&mut buf, mu);
        }
        for l in some_limits() {
            let _ = decode_checked(&buf, &l);
        }
        let _ = decode_checked(&buf, &loose());
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic edge cases.

/// The hard ceilings: the largest table and tensor count there can be round-trips.
#[test]
fn ceiling_limits_round_trip() {
    let l = Limits::new(MAX_TENSORS_CEILING, MAX_DIMS_CEILING, MAX_PAYLOAD_CEILING).unwrap();
    let shape = vec![1u64; MAX_DIMS_CEILING as usize];
    let data = [0xabu8];
    let ts: Vec<TensorRef<'_>> = (0..MAX_TENSORS_CEILING)
        .map(|_| TensorRef {
            dtype: DType::UInt8,
            shape: &shape,
            data: &data,
        })
        .collect();
    let m = Meta::new(Kind::Response);
    let buf = frame::encode(&m, &ts, &l).unwrap();
    let d = decode_checked(buf.as_slice(), &l).unwrap();
    assert_eq!(d.tensors.len(), MAX_TENSORS_CEILING as usize);
    assert!(d.header.total_len <= l.max_frame_len());
    // One tensor more is refused by both sides.
    let mut more = ts.clone();
    more.push(ts[0]);
    assert!(matches!(
        frame::encode(&m, &more, &l),
        Err(Error::Capacity(_))
    ));
    let mut b = buf.as_slice().to_vec();
    b[20..24].copy_from_slice(&(MAX_TENSORS_CEILING + 1).to_le_bytes());
    assert!(matches!(
        frame::decode(&b, &l),
        Err(FrameError::LimitExceeded {
            field: "tensor_count",
            ..
        })
    ));
}

#[test]
fn limits_outside_the_ceilings_are_refused() {
    assert!(Limits::new(0, 1, 1).is_err());
    assert!(Limits::new(MAX_TENSORS_CEILING + 1, 1, 1).is_err());
    assert!(Limits::new(1, MAX_DIMS_CEILING + 1, 1).is_err());
    assert!(Limits::new(1, 1, 0).is_err());
    assert!(Limits::new(1, 1, MAX_PAYLOAD_CEILING + 1).is_err());
    assert!(Limits::new(MAX_TENSORS_CEILING, MAX_DIMS_CEILING, MAX_PAYLOAD_CEILING).is_ok());
}

/// A header whose total_len is the largest the limits admit passes the header check (so a
/// stream receiver may allocate it); one byte more does not.
#[test]
fn max_frame_len_is_the_header_bound() {
    for l in some_limits() {
        let mut h = frame::encode(&Meta::new(Kind::Control), &[], &l)
            .unwrap()
            .as_slice()
            .to_vec();
        h[24..32].copy_from_slice(&l.max_frame_len().to_le_bytes());
        assert!(frame::decode_header(&h, &l).is_ok());
        assert!(matches!(
            frame::decode(&h, &l),
            Err(FrameError::LengthMismatch { .. })
        ));
        h[24..32].copy_from_slice(&(l.max_frame_len() + 1).to_le_bytes());
        assert!(matches!(
            frame::decode_header(&h, &l),
            Err(FrameError::LimitExceeded {
                field: "total_len",
                ..
            })
        ));
    }
}

#[test]
fn long_error_messages_are_cut_on_a_char_boundary() {
    // "a" then two-byte 'é's: character boundaries are at odd byte offsets, so the 64 KiB
    // cut (byte 65 536) falls inside a character and moves back one byte.
    let msg = format!("a{}", "é".repeat(40_000));
    let buf = frame::encode_error(1, 0, control::USER_BASE, &msg);
    let d = decode_checked(buf.as_slice(), &Limits::default()).unwrap();
    let (_, got) = frame::error_parts(buf.as_slice(), &d);
    assert_eq!(got.len(), (1 << 16) - 1);
    assert!(msg.starts_with(got));
}

/// Zero-size tensors with huge dimensions: the decoder multiplies dimensions left to right
/// and fails on the first overflow (docs/PROTOCOL.md section 14, step 19).
#[test]
fn zero_size_dimension_order() {
    let m = Meta::new(Kind::Response);
    let base = frame::encode(
        &m,
        &[TensorRef {
            dtype: DType::Float64,
            shape: &[0, 0, 0],
            data: &[],
        }],
        &Limits::default(),
    )
    .unwrap()
    .as_slice()
    .to_vec();
    let with_dims = |dims: [u64; 3]| {
        let mut b = base.clone();
        for (k, d) in dims.iter().enumerate() {
            b[88 + 8 * k..96 + 8 * k].copy_from_slice(&d.to_le_bytes());
        }
        frame::decode(&b, &Limits::default())
    };
    assert!(with_dims([0, 1 << 62, 1 << 62]).is_ok());
    assert!(with_dims([1 << 62, 0, 1 << 62]).is_ok());
    assert!(matches!(
        with_dims([1 << 33, 1 << 33, 0]),
        Err(FrameError::Overflow { field: "shape" })
    ));
}

/// The generators above reach deep: a fair share of near-frames and mutated frames decode,
/// and the rest fail in many different checks (not all at the magic).
#[test]
fn generators_reach_every_stage() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;

    fn outcome(r: Result<Decoded, FrameError>) -> String {
        match r {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("{e:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }
    let mut runner = TestRunner::deterministic();
    let mut near = BTreeMap::<String, usize>::new();
    let strategy = near_frame();
    for _ in 0..2000 {
        let buf = strategy.new_tree(&mut runner).unwrap().current();
        *near
            .entry(outcome(decode_checked(&buf, &Limits::default())))
            .or_default() += 1;
    }
    let mut mutated = BTreeMap::<String, usize>::new();
    let strategy = (valid_frame(), prop::collection::vec(mutation(), 1..=4));
    for _ in 0..2000 {
        let ((mut buf, _, _), muts) = strategy.new_tree(&mut runner).unwrap().current();
        for m in &muts {
            apply(&mut buf, m);
        }
        *mutated
            .entry(outcome(decode_checked(&buf, &loose())))
            .or_default() += 1;
    }
    for (name, stats) in [("near", &near), ("mutated", &mutated)] {
        assert!(
            stats.get("ok").copied().unwrap_or(0) >= 100,
            "{name}: {stats:?}"
        );
        assert!(stats.len() >= 9, "{name}: {stats:?}");
    }
}
