"""The columns of a store shard, per format and level, and the conversions between one
sequence's `TeacherOutput` and one Parquet row (README, "Offline distillation", lists them).

A row holds the teacher's answer for one sequence of ``num_tokens`` ids: ``num_positions``
positions, each valid (a recorded answer has no padded positions). Position j is the teacher's
distribution after tokens 0..j, so a recorder that can stores ``num_tokens`` positions (the
last one is what a right-padded batch gets after the sequence's last token), else
``num_tokens - 1``.

``logz_sampled`` is stored empty when it equals ``logz_full`` bit for bit (sampling at T = 1
without top-k or top-p, the usual case) and restored from it on read, so every level stays
exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreError

__all__ = [
    "LEVELS",
    "ROW_COLUMNS",
    "Params",
    "RowColumns",
    "columns_for",
    "encode_row",
    "decode_row",
]

#: lossless: the format's own tensors, byte for byte. fp16: compact or topk with float16
#: log-probs. counts: compact without log-probs or log-partitions (tokens and counts only).
LEVELS = ("lossless", "fp16", "counts")
#: Columns every shard has, before the format's own.
ROW_COLUMNS = ("key", "sample_set", "num_tokens", "num_positions")


@dataclass(frozen=True)
class Params:
    """What decoding a row needs from the manifest."""

    format: str
    level: str
    vocab_size: int
    num_samples: int
    topk: int


@dataclass(frozen=True)
class RowColumns:
    """A format column: its name, the numpy dtype of its list values, and the dtype of the
    wire tensor it decodes into (None: not a wire tensor of its own)."""

    name: str
    dtype: str
    wire: str | None


def _check_level(fmt: str, level: str, num_samples: int) -> None:
    if level not in LEVELS:
        raise StoreError(f"unknown store level {level!r}; expected one of {', '.join(LEVELS)}")
    if level == "fp16" and fmt not in ("compact", "topk"):
        raise StoreError(f"the fp16 level stores the compact or topk format, not {fmt!r}")
    if level == "counts":
        if fmt != "compact":
            raise StoreError(f"the counts level stores the compact format, not {fmt!r}")
    if level != "lossless" and fmt == "compact" and not 1 <= num_samples <= 256:
        raise StoreError(
            f"the {level} level stores counts as uint8 (count - 1): it needs 1 <= num_samples "
            f"<= 256, got {num_samples}"
        )


def columns_for(fmt: str, level: str, num_samples: int) -> list[RowColumns]:
    """The format columns of a shard (after `ROW_COLUMNS`), in order."""
    _check_level(fmt, level, num_samples)
    logz = [
        RowColumns("logz_sampled", "float32", "float32"),
        RowColumns("logz_full", "float32", "float32"),
    ]
    if fmt == "full":
        return [RowColumns("logits", "float32", "float32")]
    if fmt == "sampled":
        return [
            RowColumns("indices", "int64", "int64"),
            RowColumns("values", "float32", "float32"),
            *logz,
        ]
    if fmt == "coo":
        # (sample, position, token) of each entry; the batch row is the replayed batch's
        return [
            RowColumns("coo_indices", "int64", "int64"),
            RowColumns("coo_values", "float32", "float32"),
            *logz,
        ]
    if fmt == "topk":
        if level == "lossless":
            return [
                RowColumns("indices", "int64", "int64"),
                RowColumns("logprobs", "float32", "float32"),
                *logz,
            ]
        return [
            RowColumns("indices", "int32", "int64"),
            RowColumns("logprobs", "float16", "float32"),
            *logz,
        ]
    if fmt != "compact":
        raise StoreError(f"unknown format {fmt!r}")
    if level == "lossless":
        counts = "int16" if num_samples <= np.iinfo(np.int16).max else "int32"
        return [
            RowColumns("offsets", "int64", "int64"),
            RowColumns("tokens", "int32", "int32"),
            RowColumns("counts", counts, counts),
            RowColumns("logprobs", "float32", "float32"),
            *logz,
        ]
    cols = [
        RowColumns("num_distinct", "uint16", None),  # distinct tokens per position
        RowColumns("tokens", "int32", "int32"),
        RowColumns("counts", "uint8", "int16"),  # count - 1
    ]
    if level == "fp16":
        cols += [RowColumns("logprobs", "float16", "float32"), *logz]
    return cols


def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            raise StoreError("bfloat16 tensors are not stored; record float32 logits")
        t = t.numpy()
    return np.ascontiguousarray(t).reshape(-1)


def encode_row(out: Any, level: str) -> tuple[int, dict[str, np.ndarray]]:
    """``(num_positions, columns)`` of a one-row `TeacherOutput` whose positions are all
    valid; each column a flat numpy array of its `RowColumns` dtype."""
    fmt = out.format
    cols = columns_for(fmt, level, int(out.num_samples))
    if out.batch_size != 1:
        raise StoreError(f"a store row is one sequence, got an output of {out.batch_size} rows")
    p = out.num_positions
    if not bool(out.mask.all()):
        raise StoreError("a stored answer must have every position valid (no padding)")
    values: dict[str, np.ndarray] = {}
    for c in cols:
        if c.name == "num_distinct":
            values[c.name] = np.diff(_np(out.offsets)).astype(np.uint16)
        elif c.name == "counts" and c.dtype == "uint8":
            values[c.name] = (_np(out.counts).astype(np.int64) - 1).astype(np.uint8)
        elif c.name == "coo_indices":
            values[c.name] = _np(out.coo_indices.reshape(4, -1)[1:])
        else:
            a = _np(getattr(out, c.name))
            if level == "lossless" and a.dtype != np.dtype(c.dtype):
                raise StoreError(
                    f"{fmt} tensor {c.name!r} is {a.dtype}, the lossless level stores {c.dtype}"
                )
            values[c.name] = a.astype(c.dtype, copy=False)
    if "logz_sampled" in values and _same_bits(values["logz_sampled"], values["logz_full"]):
        values["logz_sampled"] = values["logz_sampled"][:0]
    return p, values


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _bad(where: str, what: str) -> StoreError:
    return StoreError(f"{where}: {what}")


def _ids_in_range(a: np.ndarray, v: int, name: str, where: str) -> None:
    if a.size and (int(a.min()) < 0 or int(a.max()) >= v):
        raise _bad(where, f"{name} holds ids outside the vocabulary 0..{v - 1}")


def decode_row(
    p: int, cols: dict[str, np.ndarray], params: Params, where: str
) -> dict[str, np.ndarray]:
    """The wire tensors of one stored row (flat: ``[P * N]``, ``[P + 1]``, ...), checked
    against the manifest's parameters; ``where`` names the row in errors. Allocates nothing
    beyond the row's own data (a declared ``num_positions`` must match it)."""
    fmt, v = params.format, params.vocab_size
    spec = columns_for(fmt, params.level, params.num_samples)

    def need(name: str, n: int) -> np.ndarray:
        a = cols[name]
        if a.size != n:
            raise _bad(
                where, f"column {name!r} has {a.size} values, {n} expected for {p} positions"
            )
        return a

    out: dict[str, np.ndarray] = {}
    if fmt != "full" and not (fmt == "compact" and params.level == "counts"):
        out["logz_full"] = need("logz_full", p)
        if cols["logz_sampled"].size == 0 and p > 0:
            out["logz_sampled"] = out["logz_full"]  # stored empty: equal to logz_full
        else:
            out["logz_sampled"] = need("logz_sampled", p)
    if fmt == "full":
        out["logits"] = need("logits", p * v)
    elif fmt in ("sampled", "topk"):
        width = params.num_samples if fmt == "sampled" else params.topk
        idx = need("indices", p * width)
        _ids_in_range(idx, v, "indices", where)
        out["indices"] = idx.astype(np.int64, copy=False)
        name = "values" if fmt == "sampled" else "logprobs"
        out[name] = need(name, p * width).astype(np.float32, copy=False)
    elif fmt == "coo":
        n = p * params.num_samples
        idx = need("coo_indices", 3 * n).reshape(3, n)
        if n and (idx[0].min() < 0 or idx[0].max() >= params.num_samples):
            raise _bad(where, "coo_indices holds sample numbers out of range")
        if n and (idx[1].min() < 0 or idx[1].max() >= p):
            raise _bad(where, "coo_indices holds positions out of range")
        _ids_in_range(idx[2], v, "coo_indices", where)
        out["coo_indices"] = idx
        out["coo_values"] = need("coo_values", n)
    else:  # compact
        if params.level == "lossless":
            offsets = need("offsets", p + 1)
            lengths = np.diff(offsets)
            if offsets[0] != 0 or (lengths < 0).any():
                raise _bad(where, "offsets do not start at 0 and increase")
        else:
            lengths = need("num_distinct", p).astype(np.int64)
            offsets = np.zeros(p + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
        t = int(offsets[-1])
        if (lengths > params.num_samples).any():
            raise _bad(where, f"a position has more than {params.num_samples} distinct tokens")
        tokens = need("tokens", t)
        _ids_in_range(tokens, v, "tokens", where)
        counts = need("counts", t)
        if params.level == "lossless":
            if t and counts.min() < 1:
                raise _bad(where, "counts must be >= 1")
        else:
            counts = counts.astype(np.int16) + 1
        out["offsets"], out["tokens"], out["counts"] = offsets, tokens, counts
        if params.level == "counts":
            out["logprobs"] = np.full(t, np.nan, dtype=np.float32)
            out["logz_sampled"] = np.full(p, np.nan, dtype=np.float32)
            out["logz_full"] = np.full(p, np.nan, dtype=np.float32)
        else:
            out["logprobs"] = need("logprobs", t).astype(np.float32, copy=False)
    for c in spec:
        if c.wire is not None and c.name in out and out[c.name].dtype != np.dtype(c.wire):
            out[c.name] = out[c.name].astype(c.wire)
    return out
