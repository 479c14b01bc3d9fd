"""`StoreWriter`: append teacher answers to a store, one Parquet row per sequence.

A shard is written to a hidden temporary file in the store's folder and published by a
rename once complete, so a reader (or a killed writer's successor) sees whole shards or
nothing. Each writer names its shards with its own process id and a random tag, so several
processes may write one store at once without ever sharing a file.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StoreError
from .layout import ROW_COLUMNS, RowColumns, columns_for, encode_row
from .manifest import _fsync_dir, write_manifest
from .reader import list_shards, read_keys, shard_schema

__all__ = ["StoreWriter", "column_encodings", "sequence_key"]

log = logging.getLogger("sensai.store")

_TMP_PREFIX = ".tmp-shard-"


def sequence_key(ids: Any) -> str:
    """The store's key of a sequence: blake2b-128 of its token ids as little-endian int64."""
    import hashlib

    a = np.ascontiguousarray(np.asarray(ids), dtype="<i8").reshape(-1)
    return hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def column_encodings(spec: list[RowColumns]) -> dict[str, str]:
    """Parquet encodings of a shard's list columns, by leaf path: BYTE_STREAM_SPLIT for each
    (measured smaller under zstd than PLAIN, DELTA_BINARY_PACKED or a dictionary on every
    column of SmolLM2 answers; benchmarks/store_bench.py), on float columns only where
    pyarrow is older than 16 and cannot write it for integers or float16."""
    new = tuple(int(x) for x in pa.__version__.split(".")[:1]) >= (16,)
    keep = [c for c in spec if new or c.dtype in ("float32", "float64")]
    return {f"{c.name}.list.element": "BYTE_STREAM_SPLIT" for c in keep}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreWriter:
    """Writes answers into the store at ``directory`` described by ``manifest`` (see
    `build_manifest`); an existing store must have the same identity, and its rows are not
    written again (`add` skips a key the store already holds: a killed recording resumes).

    ``rows_per_shard`` and ``shard_bytes`` bound a shard (and the memory of its buffer).
    Use as a context manager, or call `close` to publish the last shard.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        manifest: dict[str, Any],
        *,
        rows_per_shard: int = 1024,
        shard_bytes: int = 128 << 20,
        compression_level: int = 9,
    ) -> None:
        if rows_per_shard < 1 or shard_bytes < 1:
            raise ValueError("rows_per_shard and shard_bytes must be >= 1")
        self.directory = Path(directory)
        write_manifest(self.directory, manifest)
        self.manifest = manifest
        self.level = manifest["level"]
        self.format = manifest["format"]
        self.num_samples = manifest["sampling"]["num_samples"]
        self._spec = columns_for(self.format, self.level, self.num_samples)
        self._schema = shard_schema(self.format, self.level, self.num_samples)
        self.rows_per_shard = rows_per_shard
        self.shard_bytes = shard_bytes
        self.compression_level = compression_level
        self._encodings = column_encodings(self._spec)
        self._remove_stale_tmp()
        self._keys: set[tuple[str, int]] = set()
        for shard in list_shards(self.directory):
            self._keys.update(read_keys(shard))
        self._tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0
        self._rows: list[tuple[str, int, int, int, dict[str, np.ndarray]]] = []
        self._bytes = 0
        self.rows_written = 0
        self.shards_written = 0

    def _remove_stale_tmp(self) -> None:
        """Temporary shards of writers that died (their process is gone)."""
        for tmp in self.directory.glob(_TMP_PREFIX + "*"):
            try:
                pid = int(tmp.name[len(_TMP_PREFIX) :].split("-", 1)[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        """Rows the store holds, this writer's buffer included."""
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        """Whether the store (or this writer's buffer) holds ``key``, sample set 0, or a
        ``(key, sample_set)`` pair."""
        k = key if isinstance(key, tuple) else (key, 0)
        return k in self._keys

    def add(self, key: str, num_tokens: int, output: Any, sample_set: int = 0) -> bool:
        """Buffer the answer ``output`` (a one-row `TeacherOutput`, every position valid) of
        the sequence ``key`` of ``num_tokens`` ids; False if the store has it already."""
        if (key, sample_set) in self._keys:
            return False
        p, cols = encode_row(output, self.level)
        if output.format != self.format:
            raise StoreError(f"this store records {self.format!r} answers, got {output.format!r}")
        if not (p == num_tokens or p == num_tokens - 1 or p == num_tokens == 1):
            raise StoreError(f"{p} positions recorded for a sequence of {num_tokens} tokens")
        self._rows.append((key, int(sample_set), int(num_tokens), p, cols))
        self._keys.add((key, sample_set))
        self._bytes += sum(a.nbytes for a in cols.values())
        if len(self._rows) >= self.rows_per_shard or self._bytes >= self.shard_bytes:
            self.flush()
        return True

    def flush(self) -> Path | None:
        """Publish the buffered rows as one shard; returns its path (None if nothing)."""
        if not self._rows:
            return None
        rows, self._rows, self._bytes = self._rows, [], 0
        arrays: list[pa.Array] = [
            pa.array([r[0] for r in rows], pa.string()),
            pa.array([r[1] for r in rows], pa.int16()),
            pa.array([r[2] for r in rows], pa.int32()),
            pa.array([r[3] for r in rows], pa.int32()),
        ]
        for c, field in zip(self._spec, list(self._schema)[len(ROW_COLUMNS) :], strict=True):
            parts = [r[4][c.name] for r in rows]
            lengths = np.fromiter((a.size for a in parts), dtype=np.int64, count=len(parts))
            offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            values = pa.array(np.concatenate(parts))
            list_type = field.type
            if pa.types.is_large_list(list_type):
                arrays.append(pa.LargeListArray.from_arrays(pa.array(offsets), values))
            else:
                if offsets[-1] >= 1 << 31:
                    raise StoreError(f"column {c.name!r} overflows a shard; lower shard_bytes")
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values))
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        name = f"shard-{self._tag}-{self._seq:06d}.parquet"
        self._seq += 1
        tmp = self.directory / f"{_TMP_PREFIX}{self._tag}-{name}"
        try:
            pq.write_table(
                table,
                tmp,
                compression="zstd",
                compression_level=self.compression_level,
                use_dictionary=False,
                column_encoding=self._encodings,
                write_statistics=False,
            )
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            final = self.directory / name
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        self.rows_written += len(rows)
        self.shards_written += 1
        log.info("published shard %s (%d rows)", final.name, len(rows))
        return final

    def close(self) -> None:
        """Publish what is buffered."""
        self.flush()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
