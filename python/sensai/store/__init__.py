"""Record and replay teacher answers: an offline store of Parquet shards and a manifest.

Needs ``pyarrow`` (``pip install sensai[store]``). `StoreWriter` appends answers, one row per
sequence keyed by `sequence_key`; `StoreReader` finds them again and assembles batches;
``Client("store://DIR")`` replays a store through the client API.
"""

from __future__ import annotations

try:
    import pyarrow  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("sensai.store needs pyarrow: pip install 'sensai[store]' (or pyarrow)") from e

from .layout import LEVELS
from .manifest import (
    STORE_FORMAT_VERSION,
    build_manifest,
    dataset_hash,
    load_manifest,
    tokenizer_fingerprint,
)
from .reader import StoreReader, list_shards
from .writer import StoreWriter, sequence_key

__all__ = [
    "LEVELS",
    "STORE_FORMAT_VERSION",
    "StoreReader",
    "StoreWriter",
    "build_manifest",
    "dataset_hash",
    "list_shards",
    "load_manifest",
    "sequence_key",
    "tokenizer_fingerprint",
]
