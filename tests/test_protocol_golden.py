"""A second, independent reader of the SensAI wire format, written from docs/PROTOCOL.md alone.

It decodes the golden frames of tests/golden/ with nothing but the standard library (no sensai,
no compiled extension), validates them with the rules of the document's section 14 in their
order, and compares them with their JSON descriptions. The mutations of
tests/golden/mutations.json (shared with rust/tests/golden.rs) check that it rejects the same
frames, with the same error, as the reference decoder.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parent / "golden"

# --- constants of docs/PROTOCOL.md -------------------------------------------------------

MAGIC = b"SNSA"
VERSION = 1
HEADER_LEN = 64
ENTRY_FIXED = 24
ALIGN = 64
FLAG_LIST = 0x01
U64_MAX = 2**64 - 1
KINDS = {1: "request", 2: "response", 3: "error", 4: "control"}
# code -> (name, itemsize, struct format or None for the raw 16-bit float words)
DTYPES: dict[int, tuple[str, int, str | None]] = {
    1: ("bool", 1, "?"),
    2: ("int8", 1, "b"),
    3: ("int16", 2, "h"),
    4: ("int32", 4, "i"),
    5: ("int64", 8, "q"),
    6: ("uint8", 1, "B"),
    7: ("uint16", 2, "H"),
    8: ("uint32", 4, "I"),
    9: ("uint64", 8, "Q"),
    10: ("float16", 2, None),
    11: ("bfloat16", 2, None),
    12: ("float32", 4, "f"),
    13: ("float64", 8, "d"),
}
ERROR_CODES = {
    1: "bad request",
    2: "protocol",
    3: "capacity",
    4: "internal",
    5: "unavailable",
    6: "role",
}
DEFAULT_LIMITS = (8, 8, 256 << 20)  # max_tensors, max_dims, max_payload_bytes

# Header: magic, version, kind, flags, request_id, slot, tensor_count, total_len, app_tag,
# reserved0, app_value, table_len, reserved1.
HEADER = struct.Struct("<4sHBBQIIQIIQQQ")
ENTRY = struct.Struct("<BB6sQQ")
assert HEADER.size == HEADER_LEN and ENTRY.size == ENTRY_FIXED


def align64(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


class FrameError(Exception):
    """A rejected frame: `name` is the error of docs/PROTOCOL.md section 14, `field` its field."""

    def __init__(self, name: str, field: str | None = None, detail: str = "") -> None:
        super().__init__(f"{name}{'{' + field + '}' if field else ''}: {detail}")
        self.name = name
        self.field = field


@dataclass
class Tensor:
    dtype: int
    shape: list[int]
    offset: int
    nbytes: int


@dataclass
class Frame:
    version: int
    kind: int
    flags: int
    request_id: int
    slot: int
    tensor_count: int
    total_len: int
    app_tag: int
    app_value: int
    table_len: int
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def payload_start(self) -> int:
        return align64(HEADER_LEN + self.table_len)


def max_frame_len(limits: tuple[int, int, int]) -> int:
    max_tensors, max_dims, max_payload = limits
    return (
        align64(HEADER_LEN + max_tensors * (ENTRY_FIXED + 8 * max_dims))
        + max_payload
        + ALIGN * max_tensors
    )


def decode(buf: bytes, limits: tuple[int, int, int] = DEFAULT_LIMITS) -> Frame:
    """Validate and decode one frame (steps 1-29 of section 14, in order)."""
    max_tensors, max_dims, max_payload = limits
    if len(buf) < HEADER_LEN:  # 1
        raise FrameError("Truncated", "header", f"{len(buf)} bytes")
    (
        magic,
        version,
        kind,
        flags,
        request_id,
        slot,
        tensor_count,
        total_len,
        app_tag,
        reserved0,
        app_value,
        table_len,
        reserved1,
    ) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:  # 2
        raise FrameError("BadMagic", detail=repr(magic))
    if version != VERSION:  # 3
        raise FrameError("UnsupportedVersion", detail=str(version))
    if kind not in KINDS:  # 4
        raise FrameError("UnknownKind", detail=str(kind))
    if flags & ~FLAG_LIST & 0xFF:  # 5
        raise FrameError("UnknownFlags", detail=hex(flags))
    if reserved0:  # 6
        raise FrameError("NonZeroReserved", "reserved0")
    if reserved1:  # 7
        raise FrameError("NonZeroReserved", "reserved1")
    if tensor_count > max_tensors:  # 8
        raise FrameError("LimitExceeded", "tensor_count")
    if total_len > max_frame_len(limits):  # 9
        raise FrameError("LimitExceeded", "total_len")
    if table_len > tensor_count * (ENTRY_FIXED + 8 * max_dims):  # 10
        raise FrameError("LimitExceeded", "table_len")
    if HEADER_LEN + table_len > total_len:  # 11
        raise FrameError("Truncated", "tensor table")
    if len(buf) != total_len:  # 12
        raise FrameError("LengthMismatch", detail=f"total_len {total_len}, have {len(buf)}")
    frame = Frame(
        version,
        kind,
        flags,
        request_id,
        slot,
        tensor_count,
        total_len,
        app_tag,
        app_value,
        table_len,
    )
    # 13
    payload_start = frame.payload_start
    pos = HEADER_LEN
    table_end = HEADER_LEN + table_len
    previous_end = payload_start
    payload_sum = 0
    for index in range(tensor_count):
        if pos + ENTRY_FIXED > table_end:  # 14
            raise FrameError("TableLengthMismatch", detail=f"entry {index}")
        code, ndim, reserved, offset, nbytes = ENTRY.unpack_from(buf, pos)
        if code not in DTYPES:  # 15
            raise FrameError("UnknownDtype", detail=f"tensor {index}: {code}")
        if ndim > max_dims:  # 16
            raise FrameError("LimitExceeded", "ndim")
        if reserved != bytes(6):  # 17
            raise FrameError("NonZeroReserved", "tensor entry reserved")
        shape_end = pos + ENTRY_FIXED + 8 * ndim
        if shape_end > table_end:  # 18
            raise FrameError("TableLengthMismatch", detail=f"shape of entry {index}")
        shape = list(struct.unpack_from(f"<{ndim}Q", buf, pos + ENTRY_FIXED))
        count = 1  # 19
        for d in shape:
            count *= d
            if count > U64_MAX:
                raise FrameError("Overflow", "shape")
        expected = count * DTYPES[code][1]
        if expected > U64_MAX:
            raise FrameError("Overflow", "shape")
        if nbytes != expected:  # 20
            raise FrameError("ShapeMismatch", detail=f"tensor {index}: {nbytes} != {expected}")
        if offset % ALIGN:  # 21
            raise FrameError("Misaligned", detail=f"tensor {index}: {offset}")
        end = offset + nbytes  # 22
        if end > U64_MAX:
            raise FrameError("Overflow", "offset + nbytes")
        if offset < payload_start or end > total_len:  # 23
            raise FrameError("OutOfRange", detail=f"tensor {index}: {offset}..{end}")
        if offset < previous_end:  # 24
            raise FrameError("Overlap", detail=f"tensor {index}")
        payload_sum += nbytes  # 25
        if payload_sum > max_payload:
            raise FrameError("LimitExceeded", "payload bytes")
        previous_end = end  # 26
        pos = shape_end
        frame.tensors.append(Tensor(code, shape, offset, nbytes))
    if pos != table_end:  # 27
        raise FrameError("TableLengthMismatch", detail=f"entries take {pos - HEADER_LEN}")
    if kind == 3:
        ts = frame.tensors
        if len(ts) != 1 or ts[0].dtype != 6 or len(ts[0].shape) != 1:  # 28
            raise FrameError("BadErrorFrame", detail="expected one 1-D uint8 tensor")
        try:  # 29
            tensor_bytes(buf, ts[0]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FrameError("BadErrorFrame", detail="message is not UTF-8") from e
    return frame


def tensor_bytes(buf: bytes, t: Tensor) -> bytes:
    return buf[t.offset : t.offset + t.nbytes]


def values(buf: bytes, t: Tensor) -> list[Any]:
    """A tensor's elements, flat in C order, as the golden JSON writes them."""
    name, size, fmt = DTYPES[t.dtype]
    raw = tensor_bytes(buf, t)
    n = len(raw) // size
    if fmt is None:  # 16-bit floats: raw words
        return [f"{w:#06x}" for w in struct.unpack(f"<{n}H", raw)]
    return list(struct.unpack(f"<{n}{fmt}", raw))


def word_to_float(dtype: str, word: int) -> float:
    if dtype == "bfloat16":
        return struct.unpack("<f", struct.pack("<I", word << 16))[0]
    return struct.unpack("<e", struct.pack("<H", word))[0]


# --- the golden frames ---------------------------------------------------------------------

GOLDEN_NAMES = sorted(p.stem for p in GOLDEN.glob("*.bin"))
MUTATIONS = json.loads((GOLDEN / "mutations.json").read_text())


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    return (GOLDEN / f"{name}.bin").read_bytes(), json.loads((GOLDEN / f"{name}.json").read_text())


def limits_of(j: dict[str, Any] | None) -> tuple[int, int, int]:
    if j is None:
        return DEFAULT_LIMITS
    return (j["max_tensors"], j["max_dims"], j["max_payload_bytes"])


def test_goldens_present() -> None:
    assert {"f32_single", "list_mixed", "numeric_misc", "bf16", "error", "control_hello"} <= set(
        GOLDEN_NAMES
    )
    used = set()
    for name in GOLDEN_NAMES:
        used |= {t["dtype"] for t in load(name)[1]["tensors"]}
    assert used == {n for n, _, _ in DTYPES.values()}, "the goldens cover every dtype"


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_decodes_as_described(name: str) -> None:
    buf, j = load(name)
    f = decode(buf, limits_of(j["limits"]))
    h = j["header"]
    assert buf[:4].decode("ascii") == h["magic"]
    assert f.version == h["version"]
    assert KINDS[f.kind] == h["kind"] and f.kind == h["kind_code"]
    for key in (
        "flags",
        "request_id",
        "slot",
        "tensor_count",
        "total_len",
        "app_tag",
        "app_value",
        "table_len",
    ):
        assert getattr(f, key) == h[key], key
    assert f.payload_start == j["payload_start"]
    assert len(f.tensors) == len(j["tensors"])
    for t, e in zip(f.tensors, j["tensors"], strict=True):
        name_, size, _ = DTYPES[t.dtype]
        assert name_ == e["dtype"] and t.dtype == e["dtype_code"]
        assert t.shape == e["shape"]
        assert t.offset == e["offset"] and t.nbytes == e["nbytes"]
        assert tensor_bytes(buf, t).hex() == e["data_hex"]
        assert values(buf, t) == e["data"]
        count = 1
        for d in t.shape:
            count *= d
        assert len(e["data"]) == count
        if e["dtype"] in ("float16", "bfloat16"):
            floats = [word_to_float(e["dtype"], int(w, 16)) for w in e["data"]]
            assert all(x == x for x in floats)  # the goldens hold no NaN
    if f.kind == 3:
        t = f.tensors[0]
        assert f.app_tag == j["error"]["code"]
        assert ERROR_CODES[f.app_tag] == j["error"]["code_name"]
        assert tensor_bytes(buf, t).decode("utf-8") == j["error"]["message"]
    else:
        assert j["error"] is None


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_layout_is_canonical(name: str) -> None:
    """Section 8: canonical offsets, total_len, and zero padding."""
    buf, _ = load(name)
    f = decode(buf)
    assert f.table_len == sum(ENTRY_FIXED + 8 * len(t.shape) for t in f.tensors)
    pos = f.payload_start
    covered = bytearray(len(buf))
    covered[: HEADER_LEN + f.table_len] = b"\x01" * (HEADER_LEN + f.table_len)
    for t in f.tensors:
        assert t.offset == align64(pos)
        pos = t.offset + t.nbytes
        covered[t.offset : t.offset + t.nbytes] = b"\x01" * t.nbytes
    assert f.total_len == (pos if f.tensors else HEADER_LEN)
    assert all(b == 0 for b, c in zip(buf, covered, strict=True) if not c), "padding is zero"


def test_worked_example_values() -> None:
    """The numbers spelled out in section 15 of docs/PROTOCOL.md."""
    buf, _ = load("f32_single")
    assert len(buf) == 152
    f = decode(buf)
    assert (f.request_id, f.slot, f.app_tag, f.app_value, f.table_len) == (
        0x0102030405060708,
        2,
        7,
        42,
        40,
    )
    assert f.tensors == [Tensor(12, [2, 3], 128, 24)]
    assert values(buf, f.tensors[0]) == [0.0, 1.0, -2.5, 3.25, 100.0, 0.5]
    bf, _ = load("bf16")
    t = decode(bf).tensors[0]
    assert [word_to_float("bfloat16", int(w, 16)) for w in values(bf, t)][:4] == [
        1.0,
        -2.0,
        0.5,
        3.140625,
    ]


# --- mutations -----------------------------------------------------------------------------


def mutate(buf: bytes, m: dict[str, Any]) -> bytes:
    b = bytearray(buf)
    for p in m.get("patch", []):
        patch = bytes.fromhex(p["hex"])
        b[p["at"] : p["at"] + len(patch)] = patch
    if "truncate" in m:
        del b[m["truncate"] :]
    if "append" in m:
        b += bytes.fromhex(m["append"])
    if m.get("fix_total_len"):
        b[24:32] = struct.pack("<Q", len(b))
    return bytes(b)


@pytest.mark.parametrize("m", MUTATIONS, ids=[m["name"] for m in MUTATIONS])
def test_mutation(m: dict[str, Any]) -> None:
    buf = mutate((GOLDEN / f"{m['golden']}.bin").read_bytes(), m)
    limits = limits_of(m.get("limits"))
    if m["expect"] == "ok":
        decode(buf, limits)
        return
    with pytest.raises(FrameError) as info:
        decode(buf, limits)
    assert info.value.name == m["expect"], str(info.value)
    if "field" in m:
        assert info.value.field == m["field"], str(info.value)


def test_required_mutations_are_covered() -> None:
    expected = {m["expect"] for m in MUTATIONS}
    assert {
        "BadMagic",
        "UnsupportedVersion",
        "UnknownDtype",
        "Truncated",
        "LengthMismatch",
    } <= expected
    # Every error of section 14 is exercised, and so are a few surprising but valid frames.
    assert expected >= {
        "Truncated",
        "BadMagic",
        "UnsupportedVersion",
        "UnknownKind",
        "UnknownFlags",
        "NonZeroReserved",
        "LimitExceeded",
        "Overflow",
        "LengthMismatch",
        "TableLengthMismatch",
        "ShapeMismatch",
        "Misaligned",
        "OutOfRange",
        "Overlap",
        "BadErrorFrame",
        "ok",
    }


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_every_truncation_is_rejected(name: str) -> None:
    buf, _ = load(name)
    for cut in range(len(buf)):
        with pytest.raises(FrameError) as info:
            decode(buf[:cut])
        assert info.value.name in ("Truncated", "LengthMismatch")


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_single_byte_flips_never_crash(name: str) -> None:
    """Every one-byte change either fails with a FrameError or gives in-bounds tensors."""
    buf, _ = load(name)
    for i in range(len(buf)):
        for x in (0x01, 0x80, 0xFF):
            b = bytearray(buf)
            b[i] ^= x
            try:
                f = decode(bytes(b))
            except FrameError:
                continue
            end = f.payload_start
            for t in f.tensors:
                assert t.offset % ALIGN == 0 and t.offset >= end and t.offset + t.nbytes <= len(b)
                end = t.offset + t.nbytes
