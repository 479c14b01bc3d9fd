"""`LiveFallback`: a store's missing sequences answered by a live teacher and recorded.

``Client("store://DIR?fallback=ADDRESS")`` and ``sensai serve --replay DIR --fallback ADDRESS``
use it. Each process records into shards of its own (`StoreWriter` names them by process id
and publishes them by rename), so DataLoader workers sharing a store never write one file;
until a shard is published its rows are answered from memory (at most ``rows_per_shard``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from multiprocessing.util import Finalize
from typing import Any

import numpy as np

from ..errors import RemoteError, StoreError
from .layout import decode_row, encode_row
from .writer import StoreWriter, sequence_key

__all__ = ["LiveFallback"]

log = logging.getLogger("sensai.store")


class LiveFallback:
    """Answers ``reader``'s missing sequences from the teacher server at ``address``, whose
    configuration (INFO) must match the store's manifest, and records them into the store.
    Connects, and opens its writer, on the first miss in each process."""

    def __init__(
        self,
        reader: Any,
        address: str,
        *,
        rows_per_shard: int = 256,
        timeout: float | None = None,
    ) -> None:
        from ..transports import parse_address

        parse_address(address)  # validated now, not on the first miss
        if address.startswith("store:"):
            raise ValueError(f"a store's fallback must be a live teacher, not {address!r}")
        self.reader = reader
        self.address = address
        self.rows_per_shard = int(rows_per_shard)
        self.timeout = timeout
        self.recorded = 0
        self._pid: int | None = None
        self._client: Any = None
        self._writer: StoreWriter | None = None
        self._lock = threading.Lock()

    def _open(self) -> tuple[Any, StoreWriter]:
        """This process's client and writer (a forked child opens its own)."""
        pid = os.getpid()
        if self._pid != pid or self._client is None or self._writer is None:
            from ..client import Client

            client = Client(self.address, timeout=self.timeout)
            self._check(client.info())
            writer = StoreWriter(
                self.reader.directory, self.reader.manifest, rows_per_shard=self.rows_per_shard
            )
            # publish the last rows at exit, in the main process and in multiprocessing's
            # children (a DataLoader worker) alike
            Finalize(self, writer.close, exitpriority=10)
            self._client, self._writer, self._pid = client, writer, pid
        return self._client, self._writer

    def _check(self, info: dict[str, Any]) -> None:
        m, s = self.reader.manifest, self.reader.manifest["sampling"]
        want: dict[str, Any] = {
            "vocab_size": m["teacher"]["vocab_size"],
            "output_format": m["format"],
            "temperature": s["temperature"],
            "top_k": s["top_k"],
            "top_p": s["top_p"],
        }
        if m["format"] in ("sampled", "coo", "compact"):
            want["num_samples"] = s["num_samples"]
        if m["format"] == "topk":
            want["topk"] = s["topk"]
        wrong = []
        for k, v in want.items():
            got = info.get(k)
            same = (
                math.isclose(float(got), float(v), rel_tol=1e-6)
                if isinstance(v, float) and isinstance(got, (int, float))
                else got == v
            )
            if not same:
                wrong.append(f"{k} {got!r}, the store's {v!r}")
        if wrong:
            raise StoreError(
                f"the fallback teacher at {self.address} does not answer as the store "
                f"{self.reader.directory} was recorded: {'; '.join(wrong)}"
            )
        if info.get("model") != m["teacher"]["model"]:
            log.warning(
                "the fallback teacher serves %r, the store %s was recorded from %r",
                info.get("model"),
                self.reader.directory,
                m["teacher"]["model"],
            )

    def _live(self, client: Any, seqs: list[np.ndarray]) -> list[Any]:
        """One-row answers, every position valid: ``L`` positions per sequence (a masked pad
        is appended so the distribution after the last token exists), ``L - 1`` if the
        server refuses the longer request (its context)."""
        longest = max(int(q.size) for q in seqs)
        for extra in (1, 0):
            s = longest + extra
            ids = np.zeros((len(seqs), s), dtype=np.int64)
            mask = np.zeros((len(seqs), s), dtype=np.int64)
            for i, q in enumerate(seqs):
                ids[i, : q.size], mask[i, : q.size] = q, 1
            try:
                out = client.get_teacher_logits(ids, mask, copy=True)
            except RemoteError:
                if extra == 0 or len(seqs) > 1:
                    raise
                continue
            p = out.num_positions
            return [out.rows(i, i + 1, min(int(q.size), p)) for i, q in enumerate(seqs)]
        raise AssertionError("unreachable")  # pragma: no cover

    def __call__(self, seqs: list[np.ndarray], sample_set: int) -> None:
        """Answer and record ``seqs`` (as sample set ``sample_set``), and hand the answers
        to the reader until the shard that holds them is published."""
        with self._lock:
            client, writer = self._open()
            log.info("%d sequence(s) not in the store: asking %s", len(seqs), self.address)
            try:
                rows = self._live(client, seqs)
            except RemoteError:
                if len(seqs) == 1:
                    raise
                rows = [self._live(client, [q])[0] for q in seqs]  # one at a time
            published = writer.shards_written
            for q, row in zip(seqs, rows, strict=True):
                key = sequence_key(q)
                if not writer.add(key, int(q.size), row, sample_set):
                    continue
                self.recorded += 1
                p, cols = encode_row(row, self.reader.level)
                where = f"the fallback's answer for {key}"
                self.reader.hold(
                    key, sample_set, int(q.size), p, decode_row(p, cols, self.reader.params, where)
                )
            if writer.shards_written != published:
                self.reader.refresh()  # drops what the new shards hold from memory

    def close(self) -> None:
        """Publish what this process recorded and close its connection."""
        with self._lock:
            if self._pid == os.getpid():
                if self._writer is not None:
                    self._writer.close()
                if self._client is not None:
                    self._client.close()
            self._client = self._writer = None
            self._pid = None
