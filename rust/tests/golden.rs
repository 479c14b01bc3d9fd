//! Golden frames: `tests/golden/<name>.bin` with `tests/golden/<name>.json` describing them.
//!
//! The frames are defined below in code. With `SENSAI_WRITE_GOLDEN=1` this test (re)writes
//! the `.bin` files (with `sensai::frame::encode`) and their `.json` descriptions. Always, it
//! decodes every committed `.bin` with `sensai::frame::decode`, compares it with its `.json`,
//! checks that encoding the definition, and re-encoding the decoded frame, both give the
//! committed bytes, and applies the mutations of `tests/golden/mutations.json` (shared with
//! the pure-Python reader in `tests/test_protocol_golden.py`), checking the error each gives.
//!
//! ```text
//! SENSAI_WRITE_GOLDEN=1 cargo test --test golden
//! ```

use std::path::{Path, PathBuf};

use sensai::frame::{
    self, control, error_code, DType, Decoded, Kind, Limits, Meta, TensorRef, FLAG_LIST,
};
use sensai::FrameError;
use serde_json::{json, Value};

/// One tensor of a golden frame: dtype, shape and its values as JSON (C order, flat).
/// 16-bit floats are given as their raw words (`"0x3f80"`).
struct GTensor {
    dtype: DType,
    shape: Vec<u64>,
    data: Vec<Value>,
}

struct Golden {
    name: &'static str,
    description: &'static str,
    meta: Meta,
    tensors: Vec<GTensor>,
}

fn t(dtype: DType, shape: &[u64], data: Vec<Value>) -> GTensor {
    GTensor {
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn nums<T: Into<Value> + Copy>(v: &[T]) -> Vec<Value> {
    v.iter().map(|x| (*x).into()).collect()
}

fn words(v: &[u16]) -> Vec<Value> {
    v.iter().map(|w| Value::from(format!("{w:#06x}"))).collect()
}

const ERROR_MESSAGE: &str = "token id 70000 is out of range for vocab 32000 (größe)";

fn goldens() -> Vec<Golden> {
    vec![
        Golden {
            name: "f32_single",
            description: "request: one 2x3 float32 tensor (the worked example of docs/PROTOCOL.md)",
            meta: Meta {
                kind: Kind::Request,
                flags: 0,
                request_id: 0x0102_0304_0506_0708,
                slot: 2,
                app_tag: 7,
                app_value: 42,
            },
            tensors: vec![t(
                DType::Float32,
                &[2, 3],
                nums(&[0.0f64, 1.0, -2.5, 3.25, 100.0, 0.5]),
            )],
        },
        Golden {
            name: "list_mixed",
            description:
                "response, FLAG_LIST: int64, bool, empty float64 [0,5], 0-d uint16, int8 [2,1,3]",
            meta: Meta {
                kind: Kind::Response,
                flags: FLAG_LIST,
                request_id: 17,
                slot: 0,
                app_tag: 3,
                app_value: 0xdead_beef,
            },
            tensors: vec![
                t(DType::Int64, &[4], nums(&[-1i64, 0, 1 << 40, i64::MIN])),
                t(DType::Bool, &[2, 2], nums(&[true, false, false, true])),
                t(DType::Float64, &[0, 5], vec![]),
                t(DType::UInt16, &[], nums(&[65535u64])),
                t(DType::Int8, &[2, 1, 3], nums(&[-128i64, -1, 0, 1, 2, 127])),
            ],
        },
        Golden {
            name: "numeric_misc",
            description:
                "response, FLAG_LIST: int16, int32, uint32, uint64, float16 (raw words), float64",
            meta: Meta {
                kind: Kind::Response,
                flags: FLAG_LIST,
                request_id: u64::MAX,
                slot: u32::MAX,
                app_tag: 0,
                app_value: 1,
            },
            tensors: vec![
                t(DType::Int16, &[3], nums(&[-32768i64, -2, 32767])),
                t(
                    DType::Int32,
                    &[2],
                    nums(&[i64::from(i32::MIN), 123_456_789]),
                ),
                t(DType::UInt32, &[1, 2], nums(&[0u64, u64::from(u32::MAX)])),
                t(DType::UInt64, &[2], nums(&[u64::MAX, 1u64 << 53])),
                // 1.0, -2.0, 0.5, 65504.0, 0.0
                t(
                    DType::Float16,
                    &[5],
                    words(&[0x3c00, 0xc000, 0x3800, 0x7bff, 0x0000]),
                ),
                t(DType::Float64, &[2], nums(&[-0.125f64, 1e300])),
            ],
        },
        Golden {
            name: "bf16",
            description: "response: one 2x3 bfloat16 tensor, raw 2-byte words",
            meta: Meta {
                kind: Kind::Response,
                flags: 0,
                request_id: 5,
                slot: 1,
                app_tag: 2,
                app_value: 1234,
            },
            // 1.0, -2.0, 0.5, 3.140625, 0.0, -0.0
            tensors: vec![t(
                DType::BFloat16,
                &[2, 3],
                words(&[0x3f80, 0xc000, 0x3f00, 0x4049, 0x0000, 0x8000]),
            )],
        },
        Golden {
            name: "error",
            description: "error frame: app_tag = BAD_REQUEST (1), one 1-D uint8 UTF-8 message",
            meta: Meta {
                kind: Kind::Error,
                flags: 0,
                request_id: 99,
                slot: 1,
                app_tag: error_code::BAD_REQUEST,
                app_value: 0,
            },
            tensors: vec![t(
                DType::UInt8,
                &[ERROR_MESSAGE.len() as u64],
                nums(ERROR_MESSAGE.as_bytes()),
            )],
        },
        Golden {
            name: "control_hello",
            description:
                "control frame HELLO (app_tag 1) asking for any slot (app_value 2^64-1); no tensors",
            meta: Meta {
                kind: Kind::Control,
                flags: 0,
                request_id: 0,
                slot: 0,
                app_tag: control::HELLO,
                app_value: control::ANY_SLOT,
            },
            tensors: vec![],
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Values <-> bytes.

fn as_i64(v: &Value) -> Result<i64, String> {
    v.as_i64().ok_or_else(|| format!("{v} is not an i64"))
}

fn as_u64(v: &Value) -> Result<u64, String> {
    v.as_u64().ok_or_else(|| format!("{v} is not a u64"))
}

fn as_f64(v: &Value) -> Result<f64, String> {
    v.as_f64().ok_or_else(|| format!("{v} is not a number"))
}

fn as_word(v: &Value) -> Result<u16, String> {
    let s = v.as_str().ok_or_else(|| format!("{v} is not a hex word"))?;
    let h = s
        .strip_prefix("0x")
        .ok_or_else(|| format!("{s} lacks 0x"))?;
    u16::from_str_radix(h, 16).map_err(|e| format!("{s}: {e}"))
}

/// Pack JSON values of `dtype` into little-endian bytes (checking each fits).
fn pack(dtype: DType, data: &[Value]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for v in data {
        match dtype {
            DType::Bool => out.push(u8::from(
                v.as_bool().ok_or_else(|| format!("{v} is not a bool"))?,
            )),
            DType::Int8 => out.extend(
                i8::try_from(as_i64(v)?)
                    .map_err(|e| e.to_string())?
                    .to_le_bytes(),
            ),
            DType::Int16 => out.extend(
                i16::try_from(as_i64(v)?)
                    .map_err(|e| e.to_string())?
                    .to_le_bytes(),
            ),
            DType::Int32 => out.extend(
                i32::try_from(as_i64(v)?)
                    .map_err(|e| e.to_string())?
                    .to_le_bytes(),
            ),
            DType::Int64 => out.extend(as_i64(v)?.to_le_bytes()),
            DType::UInt8 => out.push(u8::try_from(as_u64(v)?).map_err(|e| e.to_string())?),
            DType::UInt16 => out.extend(
                u16::try_from(as_u64(v)?)
                    .map_err(|e| e.to_string())?
                    .to_le_bytes(),
            ),
            DType::UInt32 => out.extend(
                u32::try_from(as_u64(v)?)
                    .map_err(|e| e.to_string())?
                    .to_le_bytes(),
            ),
            DType::UInt64 => out.extend(as_u64(v)?.to_le_bytes()),
            DType::Float16 | DType::BFloat16 => out.extend(as_word(v)?.to_le_bytes()),
            DType::Float32 => {
                let x = as_f64(v)?;
                if f64::from(x as f32) != x {
                    return Err(format!("{x} is not exactly a float32"));
                }
                out.extend((x as f32).to_le_bytes());
            }
            DType::Float64 => out.extend(as_f64(v)?.to_le_bytes()),
        }
    }
    Ok(out)
}

/// Unpack little-endian bytes of `dtype` into JSON values.
fn unpack(dtype: DType, bytes: &[u8]) -> Vec<Value> {
    let n = dtype.itemsize() as usize;
    bytes
        .chunks_exact(n)
        .map(|c| {
            let mut b8 = [0u8; 8];
            b8[..n].copy_from_slice(c);
            let u = u64::from_le_bytes(b8);
            match dtype {
                DType::Bool => Value::from(u != 0),
                DType::Int8 => Value::from(c[0] as i8),
                DType::Int16 => Value::from(u as u16 as i16),
                DType::Int32 => Value::from(u as u32 as i32),
                DType::Int64 => Value::from(u as i64),
                DType::UInt8 | DType::UInt16 | DType::UInt32 | DType::UInt64 => Value::from(u),
                DType::Float16 | DType::BFloat16 => Value::from(format!("{:#06x}", u as u16)),
                DType::Float32 => Value::from(f64::from(f32::from_bits(u as u32))),
                DType::Float64 => Value::from(f64::from_bits(u)),
            }
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex string {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The expected description, computed from the definition with the layout rules of
// docs/PROTOCOL.md (independently of the crate's own `layout`).

fn align64(x: u64) -> u64 {
    x.div_ceil(64) * 64
}

fn describe(g: &Golden) -> Value {
    let table_len: u64 = g
        .tensors
        .iter()
        .map(|t| 24 + 8 * t.shape.len() as u64)
        .sum();
    let payload_start = align64(64 + table_len);
    let mut pos = payload_start;
    let mut tensors = Vec::new();
    for t in &g.tensors {
        let count: u64 = t.shape.iter().product();
        let nbytes = count * t.dtype.itemsize();
        let bytes = pack(t.dtype, &t.data).expect("golden data packs");
        assert_eq!(bytes.len() as u64, nbytes, "{}: data length", g.name);
        let offset = align64(pos);
        pos = offset + nbytes;
        tensors.push(json!({
            "dtype": t.dtype.name(),
            "dtype_code": t.dtype.code(),
            "shape": t.shape,
            "offset": offset,
            "nbytes": nbytes,
            "data": t.data,
            "data_hex": hex(&bytes),
        }));
    }
    let total_len = if g.tensors.is_empty() {
        payload_start
    } else {
        pos
    };
    let m = &g.meta;
    let error = if m.kind == Kind::Error {
        json!({
            "code": m.app_tag,
            "code_name": frame::error_code_name(m.app_tag),
            "message": ERROR_MESSAGE,
        })
    } else {
        Value::Null
    };
    json!({
        "name": g.name,
        "description": g.description,
        "limits": {
            "max_tensors": GOLDEN_LIMITS.max_tensors,
            "max_dims": GOLDEN_LIMITS.max_dims,
            "max_payload_bytes": GOLDEN_LIMITS.max_payload_bytes,
        },
        "header": {
            "magic": "SNSA",
            "version": 1,
            "kind": m.kind.name(),
            "kind_code": m.kind as u8,
            "flags": m.flags,
            "request_id": m.request_id,
            "slot": m.slot,
            "tensor_count": g.tensors.len(),
            "total_len": total_len,
            "app_tag": m.app_tag,
            "app_value": m.app_value,
            "table_len": table_len,
        },
        "payload_start": payload_start,
        "tensors": tensors,
        "error": error,
    })
}

fn encode_golden(g: &Golden) -> Vec<u8> {
    if g.meta.kind == Kind::Error {
        // Error frames come from the crate's own builder.
        return frame::encode_error(
            g.meta.request_id,
            g.meta.slot,
            g.meta.app_tag,
            ERROR_MESSAGE,
        )
        .as_slice()
        .to_vec();
    }
    let bytes: Vec<Vec<u8>> = g
        .tensors
        .iter()
        .map(|t| pack(t.dtype, &t.data).expect("golden data packs"))
        .collect();
    let refs: Vec<TensorRef<'_>> = g
        .tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| TensorRef {
            dtype: t.dtype,
            shape: &t.shape,
            data: b,
        })
        .collect();
    frame::encode(&g.meta, &refs, &GOLDEN_LIMITS)
        .expect("golden encodes")
        .as_slice()
        .to_vec()
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run SENSAI_WRITE_GOLDEN=1 cargo test --test golden)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The limits the golden frames and their mutations were written for (the defaults when they
/// were made): fixed here so that raising a default does not move a mutation's verdict.
const GOLDEN_LIMITS: Limits = Limits {
    max_tensors: 8,
    max_dims: 8,
    max_payload_bytes: 256 << 20,
};

fn limits_of(v: &Value) -> Limits {
    Limits::new(
        v["max_tensors"].as_u64().expect("max_tensors") as u32,
        v["max_dims"].as_u64().expect("max_dims") as u32,
        v["max_payload_bytes"].as_u64().expect("max_payload_bytes"),
    )
    .expect("valid limits")
}

/// Compare a decoded frame with its JSON description, field by field.
fn check_against_json(name: &str, buf: &[u8], d: &Decoded, j: &Value) {
    let h = &j["header"];
    let m = &d.header.meta;
    assert_eq!(
        &buf[0..4],
        h["magic"].as_str().expect("magic").as_bytes(),
        "{name}"
    );
    assert_eq!(
        u64::from(u16::from_le_bytes([buf[4], buf[5]])),
        h["version"],
        "{name}"
    );
    assert_eq!(m.kind.name(), h["kind"], "{name}");
    assert_eq!(u64::from(m.kind as u8), h["kind_code"], "{name}");
    assert_eq!(u64::from(m.flags), h["flags"], "{name}");
    assert_eq!(m.request_id, h["request_id"], "{name}");
    assert_eq!(u64::from(m.slot), h["slot"], "{name}");
    assert_eq!(
        u64::from(d.header.tensor_count),
        h["tensor_count"],
        "{name}"
    );
    assert_eq!(d.header.total_len, h["total_len"], "{name}");
    assert_eq!(buf.len() as u64, d.header.total_len, "{name}");
    assert_eq!(u64::from(m.app_tag), h["app_tag"], "{name}");
    assert_eq!(m.app_value, h["app_value"], "{name}");
    assert_eq!(d.header.table_len, h["table_len"], "{name}");
    assert_eq!(d.header.payload_start(), j["payload_start"], "{name}");
    let jt = j["tensors"].as_array().expect("tensors");
    assert_eq!(d.tensors.len(), jt.len(), "{name}");
    for (i, (t, e)) in d.tensors.iter().zip(jt).enumerate() {
        assert_eq!(t.dtype.name(), e["dtype"], "{name} tensor {i}");
        assert_eq!(
            u64::from(t.dtype.code()),
            e["dtype_code"],
            "{name} tensor {i}"
        );
        let shape: Vec<u64> = e["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|x| x.as_u64().expect("dim"))
            .collect();
        assert_eq!(t.shape, shape, "{name} tensor {i}");
        assert_eq!(t.offset, e["offset"], "{name} tensor {i}");
        assert_eq!(t.nbytes, e["nbytes"], "{name} tensor {i}");
        let bytes = &buf[t.range()];
        assert_eq!(hex(bytes), e["data_hex"], "{name} tensor {i}");
        let data = e["data"].as_array().expect("data");
        assert_eq!(&unpack(t.dtype, bytes), data, "{name} tensor {i}");
        assert_eq!(
            pack(t.dtype, data).expect("packs"),
            bytes,
            "{name} tensor {i}"
        );
    }
    if m.kind == Kind::Error {
        let (code, msg) = frame::error_parts(buf, d);
        assert_eq!(u64::from(code), j["error"]["code"], "{name}");
        assert_eq!(msg, j["error"]["message"], "{name}");
    } else {
        assert!(j["error"].is_null(), "{name}");
    }
    // Every padding byte an encoder writes is zero.
    let mut covered = vec![false; buf.len()];
    covered[..64 + d.header.table_len as usize].fill(true);
    for t in &d.tensors {
        covered[t.range()].fill(true);
    }
    for (i, c) in covered.iter().enumerate() {
        if !c {
            assert_eq!(buf[i], 0, "{name}: padding byte {i}");
        }
    }
}

/// Re-encode a decoded frame from its own meta and tensor bytes.
fn reencode(buf: &[u8], d: &Decoded, limits: &Limits) -> Vec<u8> {
    let refs: Vec<TensorRef<'_>> = d
        .tensors
        .iter()
        .map(|t| TensorRef {
            dtype: t.dtype,
            shape: &t.shape,
            data: &buf[t.range()],
        })
        .collect();
    frame::encode(&d.header.meta, &refs, limits)
        .expect("re-encode")
        .as_slice()
        .to_vec()
}

#[test]
fn golden_frames() {
    let dir = golden_dir();
    let write = std::env::var("SENSAI_WRITE_GOLDEN").is_ok_and(|v| v == "1");
    if write {
        std::fs::create_dir_all(&dir).expect("create tests/golden");
    }
    for g in goldens() {
        let bin_path = dir.join(format!("{}.bin", g.name));
        let json_path = dir.join(format!("{}.json", g.name));
        let expected_json = describe(&g);
        let encoded = encode_golden(&g);
        if write {
            std::fs::write(&bin_path, &encoded).expect("write .bin");
            let text = serde_json::to_string_pretty(&expected_json).expect("json") + "\n";
            std::fs::write(&json_path, text).expect("write .json");
        }
        let committed = std::fs::read(&bin_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run SENSAI_WRITE_GOLDEN=1 cargo test --test golden)",
                bin_path.display()
            )
        });
        let j = read_json(&json_path);
        assert_eq!(j, expected_json, "{}: the .json is stale", g.name);
        assert_eq!(
            hex(&encoded),
            hex(&committed),
            "{}: encoding the definition no longer gives the committed bytes",
            g.name
        );
        let limits = limits_of(&j["limits"]);
        let d = frame::decode(&committed, &limits)
            .unwrap_or_else(|e| panic!("{}: committed frame does not decode: {e}", g.name));
        check_against_json(g.name, &committed, &d, &j);
        assert_eq!(
            reencode(&committed, &d, &limits),
            committed,
            "{}: re-encoding the decoded frame changed its bytes",
            g.name
        );
    }
}

/// The `FrameError` variant's name and, where it has one, the field it names.
fn error_name(e: &FrameError) -> (&'static str, Option<&'static str>) {
    match e {
        FrameError::Truncated { field, .. } => ("Truncated", Some(field)),
        FrameError::BadMagic { .. } => ("BadMagic", None),
        FrameError::UnsupportedVersion { .. } => ("UnsupportedVersion", None),
        FrameError::UnknownKind(_) => ("UnknownKind", None),
        FrameError::UnknownFlags(_) => ("UnknownFlags", None),
        FrameError::NonZeroReserved { field, .. } => ("NonZeroReserved", Some(field)),
        FrameError::UnknownDtype { .. } => ("UnknownDtype", None),
        FrameError::LimitExceeded { field, .. } => ("LimitExceeded", Some(field)),
        FrameError::Overflow { field } => ("Overflow", Some(field)),
        FrameError::LengthMismatch { .. } => ("LengthMismatch", None),
        FrameError::TableLengthMismatch { .. } => ("TableLengthMismatch", None),
        FrameError::ShapeMismatch { .. } => ("ShapeMismatch", None),
        FrameError::Misaligned { .. } => ("Misaligned", None),
        FrameError::OutOfRange { .. } => ("OutOfRange", None),
        FrameError::Overlap { .. } => ("Overlap", None),
        FrameError::BadErrorFrame(_) => ("BadErrorFrame", None),
    }
}

/// Apply one mutation of `mutations.json` to a golden frame's bytes.
fn mutate(mut buf: Vec<u8>, m: &Value) -> Vec<u8> {
    for p in m["patch"].as_array().into_iter().flatten() {
        let at = p["at"].as_u64().expect("patch.at") as usize;
        let bytes = unhex(p["hex"].as_str().expect("patch.hex"));
        buf[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    if let Some(n) = m["truncate"].as_u64() {
        buf.truncate(n as usize);
    }
    if let Some(h) = m["append"].as_str() {
        buf.extend(unhex(h));
    }
    if m["fix_total_len"].as_bool() == Some(true) {
        let n = buf.len() as u64;
        buf[24..32].copy_from_slice(&n.to_le_bytes());
    }
    buf
}

#[test]
fn golden_mutations() {
    let dir = golden_dir();
    let cases = read_json(&dir.join("mutations.json"));
    let cases = cases.as_array().expect("a list of mutations");
    assert!(cases.len() >= 10);
    for m in cases {
        let name = m["name"].as_str().expect("name");
        let base =
            std::fs::read(dir.join(format!("{}.bin", m["golden"].as_str().expect("golden"))))
                .expect("golden .bin");
        let buf = mutate(base, m);
        let limits = match m.get("limits") {
            Some(l) => limits_of(l),
            None => GOLDEN_LIMITS,
        };
        let got = frame::decode(&buf, &limits);
        let expected = m["expect"].as_str().expect("expect");
        match got {
            Ok(_) => assert_eq!(expected, "ok", "{name}: decoded, expected {expected}"),
            Err(e) => {
                let (variant, field) = error_name(&e);
                assert_eq!(variant, expected, "{name}: got {e}");
                if let Some(f) = m["field"].as_str() {
                    assert_eq!(field, Some(f), "{name}: got {e}");
                }
            }
        }
    }
}
