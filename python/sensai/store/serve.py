"""Stores behind ``sensai serve``: `ReplayTeacher` answers from a store (``--replay DIR``),
`RecordingTeacher` records what a live teacher answers (``--record DIR``). Both look like a
`TeacherLogitsServer` to the serving loop (prepare_inputs, compute, num_positions and the
sampling attributes), so batching, validation and transports are the loop's own."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .reader import StoreReader
from .writer import StoreWriter, sequence_key

__all__ = ["RecordingTeacher", "ReplayTeacher"]


class ReplayTeacher:
    """A teacher whose answers are a store's (sample set ``sample_set``)."""

    tokenizer = None
    max_length = None

    def __init__(self, reader: StoreReader, sample_set: int = 0) -> None:
        self.reader = reader
        self.sample_set = int(sample_set)
        s = reader.manifest["sampling"]
        self.output_format = reader.format
        self.vocab_size = reader.params.vocab_size
        self.num_samples = s["num_samples"]
        self.temperature, self.top_k, self.top_p = s["temperature"], s["top_k"], s["top_p"]
        self.topk = s["topk"] or 64

    def extra_info(self) -> dict[str, Any]:
        info = self.reader.info()
        return {k: info[k] for k in ("store", "store_level", "samples_per_epoch", "rows")}

    @staticmethod
    def num_positions(seq_len: int) -> int:
        return max(seq_len - 1, 1)

    def prepare_inputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[Any, Any]:
        import torch

        ids = torch.as_tensor(np.asarray(input_ids))
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.numel() == 0:
            raise ValueError(f"input_ids must be [B, S] and non-empty, got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
        ids = ids.to(torch.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"input_ids must be in 0..{self.vocab_size - 1}")
        if attention_mask is None:
            return ids, None
        mask = torch.as_tensor(np.asarray(attention_mask)).reshape(-1).to(torch.int64)
        if mask.numel() != ids.numel() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must be 0/1 with the shape of input_ids")
        return ids, mask.reshape(ids.shape)

    def compute(self, input_ids: Any, attention_mask: Any = None, *, seed: Any = None) -> Any:
        """The recorded answer (``seed`` is ignored: the draws were made when recording)."""
        mask = None if attention_mask is None else np.asarray(attention_mask)
        return self.reader.get(np.asarray(input_ids), mask, self.sample_set)


class RecordingTeacher:
    """``teacher`` (a `TeacherLogitsServer`), recording into ``writer`` the answer of every
    sequence it computes that starts at position 0 of its row (right-padded or unpadded);
    the attributes and methods of ``teacher`` pass through."""

    def __init__(self, teacher: Any, writer: StoreWriter) -> None:
        self._teacher = teacher
        self.writer = writer
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._teacher, name)

    def compute(self, input_ids: Any, attention_mask: Any = None, **kw: Any) -> Any:
        out = self._teacher.compute(input_ids, attention_mask, **kw)
        ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids)
        ids = ids.reshape(-1, ids.shape[-1])
        mask = None
        if attention_mask is not None:
            m = attention_mask.cpu() if hasattr(attention_mask, "cpu") else attention_mask
            mask = np.asarray(m).reshape(ids.shape)
        host = out.to("cpu")
        p = host.num_positions
        with self._lock:
            for i in range(ids.shape[0]):
                n_tok = ids.shape[1] if mask is None else int(mask[i].sum())
                if n_tok == 0 or (mask is not None and not mask[i, :n_tok].all()):
                    continue  # left padding or holes: not a sequence from position 0
                seq = ids[i, :n_tok]
                n = min(n_tok, p)
                self.writer.add(sequence_key(seq), n_tok, host.rows(i, i + 1, n))
        return out
