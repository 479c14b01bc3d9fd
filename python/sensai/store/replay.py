"""The ``store://`` scheme: a client endpoint that answers from a store instead of a server.

``Client("store:///path/to/store")`` reaches it through `sensai.transports.connect` (the
scheme is registered there by name, so the client imports this module only when used).
Query parameters state what the client expects, refused at open when the manifest differs:
``store:///data/teacher?vocab_size=49152&format=compact&tokenizer=<fingerprint>``.
``sample_set=K`` picks a sample set of a store recorded with several per sequence.
``fallback=ADDRESS`` sends a sequence the store lacks to the live teacher at ADDRESS and
records its answer into the store (`LiveFallback`); the value is percent-decoded once.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from ..errors import ClosedError, ProtocolError
from ..protocol import INFO_TAG, SEED_FLAG, encode_info
from .reader import StoreReader

__all__ = ["ReplayEndpoint", "connect"]

_QUERY = {"vocab_size", "format", "tokenizer", "sample_set", "fallback"}


class _Message:
    """What a transport's ``request_message`` returns, for answers built here."""

    has_bfloat16 = False

    def __init__(self, kind: str, tag: int, arrays: list[np.ndarray]) -> None:
        self.kind, self.tag, self.value = kind, tag, 0
        self._arrays = arrays
        self.dtypes = [str(a.dtype) for a in arrays]

    def arrays(self) -> list[np.ndarray]:
        return self._arrays

    def __len__(self) -> int:
        return len(self._arrays)


class ReplayEndpoint:
    """A client endpoint over a `StoreReader`. Requests carry ``[input_ids]`` or
    ``[input_ids, attention_mask]`` as for a live server; a seed is accepted and ignored
    (the answer is what was recorded)."""

    slot_id = 0

    def __init__(self, reader: StoreReader, sample_set: int = 0) -> None:
        self.reader = reader
        self.sample_set = int(sample_set)
        self._closed = False

    def server_alive(self) -> bool:
        return not self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.reader.close()  # publishes what a fallback recorded

    def set_epoch(self, epoch: int) -> None:
        """Answer from sample set ``epoch mod samples_per_epoch``."""
        self.sample_set = int(epoch) % self.reader.samples_per_epoch

    def request_message(
        self,
        tensors: list[Any],
        tag: int = 0,
        value: int = 0,
        kind: str = "request",
        timeout: float | None = None,
    ) -> _Message:
        if self._closed:
            raise ClosedError(f"the replay endpoint of {self.reader.directory} was closed")
        if kind == "control":
            if tag != INFO_TAG:
                raise ProtocolError(f"unknown control tag {tag:#x}")
            return _Message("control", INFO_TAG, encode_info(self.reader.info()))
        if tag & ~SEED_FLAG:
            raise ValueError(f"unknown request flags {tag:#x} (only bit 0, seed)")
        if len(tensors) not in (1, 2):
            raise ValueError(
                f"a request carries [input_ids] or [input_ids, attention_mask], got {len(tensors)}"
            )
        arrays = [np.asarray(t.numpy() if hasattr(t, "numpy") else t) for t in tensors]
        fmt_tag, body = self.reader.batch_arrays(
            arrays[0], arrays[1] if len(arrays) == 2 else None, self.sample_set
        )
        return _Message("response", fmt_tag, body)

    def request(self, tensor: Any, timeout: float | None = None) -> list[np.ndarray]:
        """The seed's raw request: a tensor or ``[input_ids, attention_mask]``."""
        tensors = list(tensor) if isinstance(tensor, (list, tuple)) else [tensor]
        return self.request_message(tensors).arrays()


def connect(address: str, slot_id: int | None = None, **kwargs: Any) -> ReplayEndpoint:
    """The endpoint of a ``store://`` address (``kwargs`` such as connect_timeout are
    accepted for the transports' signature and unused)."""
    from ..transports import parse_address

    _, path = parse_address(address)
    query = parse_qs(urlparse(address).query, strict_parsing=False)
    unknown = set(query) - _QUERY
    if unknown:
        raise ValueError(f"unknown store:// parameters {sorted(unknown)}; known: {sorted(_QUERY)}")

    def one(name: str) -> str | None:
        v = query.get(name)
        return v[-1] if v else None

    vocab = one("vocab_size")
    reader = StoreReader(
        path,
        vocab_size=int(vocab) if vocab is not None else None,
        output_format=one("format"),
        tokenizer=one("tokenizer"),
        fallback=one("fallback"),
    )
    return ReplayEndpoint(reader, int(one("sample_set") or 0))
