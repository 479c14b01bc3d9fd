"""`StoreReader`: find recorded answers by sequence and assemble them into batches.

Every shard is checked where it enters: the Parquet footer's declared length against the
file, the columns' names and types against the manifest's layout, every column chunk's
declared size against ``max_row_group_bytes`` (before anything is read), nulls, and each row's
lengths and ids against the manifest (before it is used). A shard that fails is refused
with a `StoreError` naming it; nothing is clipped or guessed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SequenceNotStoredError, StoreError
from ..protocol import FORMAT_TAGS, INFO_VERSION, SAMPLING_FORMATS
from .layout import Params, columns_for, decode_row
from .manifest import check_expectations, load_manifest, params_of

__all__ = ["StoreReader", "list_shards", "read_keys", "shard_schema", "FORMAT_TAGS"]

log = logging.getLogger("sensai.store")

#: Largest Parquet footer (metadata) accepted.
MAX_FOOTER_BYTES = 16 << 20
#: Default bound on one column chunk of a row group, declared and read.
DEFAULT_MAX_ROW_GROUP_BYTES = 1 << 30
#: Most positions a stored row may declare.
MAX_POSITIONS = 1 << 24


def shard_schema(fmt: str, level: str, num_samples: int) -> pa.Schema:
    """The Arrow schema of a shard's columns (Parquet keeps it)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("sample_set", pa.int16(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_positions", pa.int32(), nullable=False),
    ]
    lst = pa.large_list if fmt == "full" else pa.list_
    for c in columns_for(fmt, level, num_samples):
        fields.append(pa.field(c.name, lst(pa.from_numpy_dtype(np.dtype(c.dtype)))))
    return pa.schema(fields)


def list_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """The published shards of a store, in name order."""
    return sorted(Path(directory).glob("shard-*.parquet"))


def _sig(t: pa.DataType) -> str:
    if pa.types.is_large_list(t):
        return f"large_list<{t.value_type}>"
    if pa.types.is_list(t):
        return f"list<{t.value_type}>"
    return str(t)


def _open_shard(path: Path, schema: pa.Schema, max_bytes: int) -> pq.ParquetFile:
    """Open a shard after checking its footer, schema and declared sizes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
    except OSError as e:
        raise StoreError(f"cannot read shard {path}: {e}") from None
    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1":
        raise StoreError(f"shard {path} is not a complete Parquet file (truncated or damaged)")
    footer = int.from_bytes(tail[:4], "little")
    if footer > size - 12 or footer > MAX_FOOTER_BYTES:
        raise StoreError(
            f"shard {path} declares a {footer}-byte footer in a {size}-byte file "
            f"(limit {MAX_FOOTER_BYTES}): truncated or hostile"
        )
    try:
        pf = pq.ParquetFile(path)
        got = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"shard {path} is not a readable Parquet file: {e}") from None
    want = [(f.name, _sig(f.type)) for f in schema]
    have = [(f.name, _sig(f.type)) for f in got]
    if have != want:
        diff = [f"{h} (expected {w})" for h, w in zip(have, want, strict=False) if h != w]
        if len(have) != len(want):
            diff.append(f"{len(have)} columns (expected {len(want)})")
        raise StoreError(f"shard {path} does not have this store's columns: {'; '.join(diff[:4])}")
    md = pf.metadata
    for rg in range(md.num_row_groups):
        r = md.row_group(rg)
        if r.num_rows < 0 or r.num_rows > 1 << 24:
            raise StoreError(f"shard {path}: row group {rg} declares {r.num_rows} rows")
        for ci in range(r.num_columns):
            c = r.column(ci)
            declared = max(c.total_uncompressed_size, c.total_compressed_size)
            if declared > max_bytes or declared < 0:
                raise StoreError(
                    f"shard {path}: column {c.path_in_schema!r} of row group {rg} declares "
                    f"{declared} bytes, over the limit of {max_bytes} (max_row_group_bytes)"
                )
    return pf


def _read_group(pf: pq.ParquetFile, rg: int, columns: list[str] | None, where: str) -> pa.Table:
    try:
        t = pf.read_row_group(rg, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise StoreError(f"{where}: cannot read row group {rg}: {e}") from None
    for name in t.column_names:
        col = t.column(name)
        if col.null_count:
            raise StoreError(f"{where}: column {name!r} holds nulls")
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            if any(ch.values.null_count for ch in col.chunks):
                raise StoreError(f"{where}: column {name!r} holds null values")
    return t


def read_keys(path: Path, schema: pa.Schema | None = None) -> set[tuple[str, int]]:
    """The ``(key, sample_set)`` pairs of a shard (checked like any shard)."""
    pf = _open_shard(path, schema or _schema_of_file(path), DEFAULT_MAX_ROW_GROUP_BYTES)
    keys: set[tuple[str, int]] = set()
    for rg in range(pf.metadata.num_row_groups):
        t = _read_group(pf, rg, ["key", "sample_set"], str(path))
        keys.update(
            zip(t.column("key").to_pylist(), t.column("sample_set").to_pylist(), strict=True)
        )
    return keys


def _schema_of_file(path: Path) -> pa.Schema:
    m = load_manifest(path.parent)
    return shard_schema(m["format"], m["level"], m["sampling"]["num_samples"])


class _Group:
    """One row group's columns as numpy: flat values and row offsets of each list column."""

    def __init__(self, table: pa.Table, names: list[str]) -> None:
        self.keys = table.column("key").to_pylist()
        self.sample_set = table.column("sample_set").to_numpy()
        self.num_tokens = table.column("num_tokens").to_numpy()
        self.num_positions = table.column("num_positions").to_numpy()
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in names:
            col = table.column(name).combine_chunks()
            values = col.values.to_numpy(zero_copy_only=False)
            offsets = col.offsets.to_numpy()
            self.lists[name] = (offsets, values)
        self.nbytes = table.nbytes

    def row(self, i: int) -> dict[str, np.ndarray]:
        return {n: v[o[i] : o[i + 1]] for n, (o, v) in self.lists.items()}


class StoreReader:
    """The recorded answers of the store at ``directory``.

    ``vocab_size``, ``output_format`` and ``tokenizer`` (a `tokenizer_fingerprint`), when
    given, must match the manifest or the store is refused. ``max_row_group_bytes`` bounds
    what one read may allocate; ``cache_groups`` row groups stay decoded. ``fallback``, the
    address of a live teacher, answers and records the sequences the store lacks
    (`LiveFallback`); without it a missing sequence raises `SequenceNotStoredError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        vocab_size: int | None = None,
        output_format: str | None = None,
        tokenizer: str | None = None,
        max_row_group_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES,
        cache_groups: int = 4,
        fallback: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        check_expectations(
            self.manifest,
            str(self.directory),
            vocab_size=vocab_size,
            output_format=output_format,
            tokenizer=tokenizer,
        )
        self.params: Params = params_of(self.manifest)
        self.format = self.params.format
        self.level = self.params.level
        self.samples_per_epoch = int(self.manifest["sampling"]["samples_per_epoch"])
        self._schema = shard_schema(self.format, self.level, self.params.num_samples)
        self._names = [
            c.name for c in columns_for(self.format, self.level, self.params.num_samples)
        ]
        self.max_row_group_bytes = int(max_row_group_bytes)
        self._files: list[pq.ParquetFile] = []
        self._paths: list[Path] = []
        self._index: dict[tuple[str, int], tuple[int, int, int]] = {}
        self._cache: OrderedDict[tuple[int, int], _Group] = OrderedDict()
        self._cache_groups = max(1, int(cache_groups))
        self._lock = threading.Lock()
        # answers recorded by the fallback whose shard is not published yet
        self._held: dict[tuple[str, int], tuple[int, int, dict[str, np.ndarray]]] = {}
        self.refresh()
        self.fallback: Any = None
        if fallback is not None:
            from .fallback import LiveFallback

            self.fallback = LiveFallback(self, fallback)

    def hold(
        self, key: str, sample_set: int, num_tokens: int, p: int, arrays: dict[str, np.ndarray]
    ) -> None:
        """Answer ``key`` with ``arrays`` (decoded wire arrays of ``p`` positions) until a
        published shard holds it."""
        with self._lock:
            self._held[(key, int(sample_set))] = (int(num_tokens), int(p), arrays)

    def close(self) -> None:
        """Publish what the fallback recorded in this process."""
        if self.fallback is not None:
            self.fallback.close()

    def refresh(self) -> int:
        """Index shards published since the last call; returns how many were added."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> int:
        known = set(self._paths)
        added = 0
        for path in list_shards(self.directory):
            if path in known:
                continue
            pf = _open_shard(path, self._schema, self.max_row_group_bytes)
            fi = len(self._files)
            for rg in range(pf.metadata.num_row_groups):
                t = _read_group(pf, rg, ["key", "sample_set"], str(path))
                keys = t.column("key").to_pylist()
                sets = t.column("sample_set").to_pylist()
                for row, k in enumerate(zip(keys, sets, strict=True)):
                    self._index.setdefault(k, (fi, rg, row))  # a duplicate: the first wins
            self._files.append(pf)
            self._paths.append(path)
            added += 1
        for k in [k for k in self._held if k in self._index]:
            del self._held[k]
        return added

    def __len__(self) -> int:
        return len(self._index) + len(self._held)

    def __contains__(self, key: object) -> bool:
        k = key if isinstance(key, tuple) else (key, 0)
        return k in self._index or k in self._held

    def keys(self) -> list[tuple[str, int]]:
        return list(self._index)

    def _group(self, fi: int, rg: int) -> _Group:
        g = self._cache.get((fi, rg))
        if g is not None:
            self._cache.move_to_end((fi, rg))
            return g
        t = _read_group(self._files[fi], rg, None, str(self._paths[fi]))
        g = _Group(t, self._names)
        self._cache[(fi, rg)] = g
        while len(self._cache) > self._cache_groups:
            self._cache.popitem(last=False)
        return g

    def row(
        self, key: str, num_tokens: int | None = None, sample_set: int = 0
    ) -> tuple[int, dict[str, np.ndarray]]:
        """``(num_positions, flat wire arrays)`` of the sequence ``key``."""
        with self._lock:
            held = self._held.get((key, sample_set))
            if held is not None:
                n_tok, p, arrays = held
                if num_tokens is not None and n_tok != num_tokens:
                    raise StoreError(f"{key}: recorded for {n_tok} tokens, asked for {num_tokens}")
                return p, arrays
            loc = self._index.get((key, sample_set))
            if loc is None:
                self._refresh()  # another process may have published it since
                loc = self._index.get((key, sample_set))
            if loc is None:
                what = f"sequence {key}" + (f" (sample set {sample_set})" if sample_set else "")
                raise SequenceNotStoredError(
                    key, f"{what} is not in the store {self.directory} ({len(self)} rows)"
                )
            fi, rg, i = loc
            g = self._group(fi, rg)
        where = f"shard {self._paths[fi].name}, row {i} ({key})"
        p, n_tok = int(g.num_positions[i]), int(g.num_tokens[i])
        if g.keys[i] != key:
            raise StoreError(f"{where}: the shard changed since it was indexed")
        if not 1 <= p <= MAX_POSITIONS or p not in (n_tok, n_tok - 1):
            raise StoreError(f"{where}: {p} positions declared for {n_tok} tokens")
        if num_tokens is not None and n_tok != num_tokens:
            raise StoreError(f"{where}: recorded for {n_tok} tokens, asked for {num_tokens}")
        return p, decode_row(p, g.row(i), self.params, where)

    def batch_arrays(
        self, input_ids: Any, attention_mask: Any = None, sample_set: int = 0
    ) -> tuple[int, list[np.ndarray]]:
        """``(format tag, wire arrays)`` answering a batch ``[B, S]`` as a live teacher would:
        each row's sequence is its masked-in (one contiguous run of) tokens."""
        from .writer import sequence_key

        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, S] with S >= 1, got shape {ids.shape}")
        mask = None if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
        b, s = ids.shape
        p = max(s - 1, 1)
        spans: list[tuple[int, int, int]] = []  # (start, length, positions answered)
        for i in range(b):
            if mask is None:
                start, length = 0, s
            else:
                nz = np.flatnonzero(mask[i])
                if nz.size == 0:
                    spans.append((0, 0, 0))
                    continue
                start, length = int(nz[0]), int(nz[-1] - nz[0] + 1)
                if nz.size != length:
                    raise ValueError(f"attention_mask row {i} is not one contiguous run of ones")
            spans.append((start, length, min(length, p - start)))
        if self.fallback is not None:
            self._fill(ids, spans, sample_set)
        rows: list[tuple[int, int, dict[str, np.ndarray]]] = []
        for i, (start, length, n) in enumerate(spans):
            if n <= 0:
                rows.append((0, 0, {}))
                continue
            seq = ids[i, start : start + length]
            rp, cols = self.row(sequence_key(seq), length, sample_set)
            if n > rp:
                raise StoreError(
                    f"sequence {sequence_key(seq)} has {rp} positions recorded, {n} needed"
                )
            rows.append((start, n, cols))
        return FORMAT_TAGS[self.format], self._assemble(rows, b, p)

    def _fill(self, ids: np.ndarray, spans: list[tuple[int, int, int]], sample_set: int) -> None:
        """Have the fallback answer the batch's sequences the store lacks."""
        from .writer import sequence_key

        missing: dict[str, np.ndarray] = {}
        for i, (start, length, n) in enumerate(spans):
            if n > 0:
                seq = ids[i, start : start + length]
                key = sequence_key(seq)
                if (key, sample_set) not in self:
                    missing[key] = seq
        if missing:
            self.refresh()  # another process may have published them since
            todo = [q for k, q in missing.items() if (k, sample_set) not in self]
            if todo:
                self.fallback(todo, sample_set)

    def _assemble(
        self, rows: list[tuple[int, int, dict[str, np.ndarray]]], b: int, p: int
    ) -> list[np.ndarray]:
        fmt, prm = self.format, self.params
        mask = np.zeros((b, p), dtype=np.bool_)
        for i, (start, n, _) in enumerate(rows):
            mask[i, start : start + n] = True
        if fmt == "full":
            logits = np.zeros((b, p, prm.vocab_size), dtype=np.float32)
            for i, (start, n, c) in enumerate(rows):
                if n:
                    logits[i, start : start + n] = c["logits"][: n * prm.vocab_size].reshape(n, -1)
            return [logits, mask]
        lz = [np.zeros((b, p), dtype=np.float32) for _ in range(2)]
        for i, (start, n, c) in enumerate(rows):
            if n:
                lz[0][i, start : start + n] = c["logz_sampled"][:n]
                lz[1][i, start : start + n] = c["logz_full"][:n]
        body: list[np.ndarray]
        if fmt in ("sampled", "topk"):
            w = prm.num_samples if fmt == "sampled" else prm.topk
            second = "values" if fmt == "sampled" else "logprobs"
            idx = np.zeros((b, p, w), dtype=np.int64)
            val = np.zeros((b, p, w), dtype=np.float32)
            for i, (start, n, c) in enumerate(rows):
                if n:
                    idx[i, start : start + n] = c["indices"][: n * w].reshape(n, w)
                    val[i, start : start + n] = c[second][: n * w].reshape(n, w)
            body = [idx, val]
        elif fmt == "coo":
            nn = prm.num_samples
            parts_i, parts_v = [], []
            for i, (start, n, c) in enumerate(rows):
                if n:
                    sub = c["coo_indices"][:, : n * nn]
                    full = np.empty((4, sub.shape[1]), dtype=np.int64)
                    full[0] = i
                    full[1], full[2], full[3] = sub[0], sub[1] + start, sub[2]
                    parts_i.append(full)
                    parts_v.append(c["coo_values"][: n * nn])
            body = [
                np.concatenate(parts_i, axis=1) if parts_i else np.zeros((4, 0), np.int64),
                np.concatenate(parts_v) if parts_v else np.zeros(0, np.float32),
            ]
        else:  # compact
            lengths = np.zeros(b * p, dtype=np.int64)
            toks, cnts, lps = [], [], []
            for i, (start, n, c) in enumerate(rows):
                if n:
                    o = c["offsets"]
                    lengths[i * p + start : i * p + start + n] = np.diff(o[: n + 1])
                    t = int(o[n])
                    toks.append(c["tokens"][:t])
                    cnts.append(c["counts"][:t])
                    lps.append(c["logprobs"][:t])
            offsets = np.zeros(b * p + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            cdt = self._schema.field("counts").type.value_type.to_pandas_dtype()
            cdt = np.int16 if self.level != "lossless" else cdt
            body = [
                offsets,
                np.concatenate(toks) if toks else np.zeros(0, np.int32),
                np.concatenate(cnts) if cnts else np.zeros(0, cdt),
                np.concatenate(lps) if lps else np.zeros(0, np.float32),
            ]
        return [*body, lz[0], lz[1], mask]

    def get(self, input_ids: Any, attention_mask: Any = None, sample_set: int = 0) -> Any:
        """The `TeacherOutput` for a batch, as `batch_arrays` assembles it (imports torch)."""
        from ..formats import TeacherOutput

        tag, arrays = self.batch_arrays(input_ids, attention_mask, sample_set)
        return TeacherOutput.from_arrays(tag, arrays, **self.output_params())

    def output_params(self) -> dict[str, Any]:
        """`TeacherOutput` fields of this store's answers."""
        s = self.manifest["sampling"]
        sampled = self.format in SAMPLING_FORMATS
        return {
            "vocab_size": self.params.vocab_size,
            "num_samples": self.params.num_samples if sampled else 0,
            "temperature": float(s["temperature"]),
            "top_k": int(s["top_k"]),
            "top_p": float(s["top_p"]),
            "has_logprobs": self.level != "counts",
        }

    def info(self) -> dict[str, Any]:
        """What a live server's INFO would say, from the manifest (a store replays recorded
        draws: it takes attention masks, and seeds have no effect)."""
        m, s = self.manifest, self.manifest["sampling"]
        return {
            "info_version": INFO_VERSION,
            "features": ["attention_mask"],
            "model": m["teacher"]["model"],
            "revision": m["teacher"].get("revision"),
            "tokenizer_fingerprint": m["teacher"].get("tokenizer_fingerprint"),
            "vocab_size": self.params.vocab_size,
            "output_format": self.format,
            "format_tag": FORMAT_TAGS[self.format],
            "num_samples": s["num_samples"],
            "temperature": s["temperature"],
            "top_k": s["top_k"],
            "top_p": s["top_p"],
            "topk": s["topk"],
            "store": str(self.directory),
            "store_level": self.level,
            "samples_per_epoch": self.samples_per_epoch,
            "rows": len(self),
        }
