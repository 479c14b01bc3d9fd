"""The store's manifest (``manifest.json``): who answered, how, over what data, and in which
layout. Written once, atomically; a writer that resumes must agree with it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..protocol import FORMATS, SAMPLING_FORMATS
from ..protocol import tokenizer_hash as tokenizer_fingerprint
from .layout import LEVELS, Params, columns_for

__all__ = [
    "MANIFEST",
    "STORE_FORMAT_VERSION",
    "MAX_MANIFEST_BYTES",
    "build_manifest",
    "check_expectations",
    "dataset_hash",
    "file_hash",
    "load_manifest",
    "params_of",
    "tokenizer_fingerprint",
    "write_manifest",
]

MANIFEST = "manifest.json"
#: Bumped whenever a shard's columns or their meaning change. 2: ``logz_sampled`` may be
#: empty (equal to ``logz_full``); Parquet encodings are not part of the version.
STORE_FORMAT_VERSION = 2
#: Versions this SensAI reads (a version-1 store never has an empty logz_sampled).
READABLE_VERSIONS = (1, 2)
MAX_MANIFEST_BYTES = 1 << 20
#: Fields two writers of one store must agree on (the rest is informative).
_IDENTITY = ("store_format_version", "format", "level", "teacher", "sampling", "dataset")


def file_hash(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def dataset_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a data file, or of a folder's files (recursively, sorted by path)."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return file_hash(files)


def build_manifest(
    *,
    fmt: str,
    level: str,
    vocab_size: int,
    num_samples: int,
    temperature: float,
    top_k: int,
    top_p: float,
    topk: int,
    model: str,
    revision: str | None = None,
    tokenizer: str | None = None,
    dataset: dict[str, Any] | None = None,
    samples_per_epoch: int = 1,
) -> dict[str, Any]:
    """A manifest; ``revision`` is the model's revision or a hash of its files, ``tokenizer``
    its `tokenizer_fingerprint`, ``dataset`` e.g. ``{"path": ..., "hash": ...}``."""
    from .. import __version__

    manifest = {
        "store_format_version": STORE_FORMAT_VERSION,
        "format": fmt,
        "level": level,
        "teacher": {
            "model": model,
            "revision": revision,
            "vocab_size": int(vocab_size),
            "tokenizer_fingerprint": tokenizer,
        },
        "sampling": {
            "num_samples": int(num_samples) if fmt in SAMPLING_FORMATS else 0,
            "temperature": float(temperature),
            "top_k": int(top_k),
            "top_p": float(top_p),
            "topk": int(topk) if fmt == "topk" else 0,
            "samples_per_epoch": int(samples_per_epoch),
        },
        "dataset": dataset or {},
        "created_by": f"sensai {__version__}",
    }
    _validate(manifest, "the new manifest")
    return manifest


def _validate(m: Any, where: str) -> None:
    def bad(what: str) -> StoreError:
        return StoreError(f"{where}: {what}")

    if not isinstance(m, dict):
        raise bad(f"not a JSON object ({type(m).__name__})")
    version = m.get("store_format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise bad(f"store format version {version!r}; this SensAI reads versions {readable}")
    if m.get("format") not in FORMATS:
        raise bad(f"unknown format {m.get('format')!r}")
    if m.get("level") not in LEVELS:
        raise bad(f"unknown level {m.get('level')!r}")
    teacher, sampling = m.get("teacher"), m.get("sampling")
    if not isinstance(teacher, dict) or not isinstance(sampling, dict):
        raise bad("'teacher' and 'sampling' must be objects")
    ints = {
        "teacher.vocab_size": (teacher.get("vocab_size"), 1),
        "sampling.num_samples": (sampling.get("num_samples"), 0),
        "sampling.topk": (sampling.get("topk"), 0),
        "sampling.top_k": (sampling.get("top_k"), 0),
        "sampling.samples_per_epoch": (sampling.get("samples_per_epoch"), 1),
    }
    for name, (value, low) in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 1 << 31:
            raise bad(f"{name} must be an integer in [{low}, 2**31), got {value!r}")
    if m["format"] in SAMPLING_FORMATS and sampling["num_samples"] < 1:
        raise bad(f"a {m['format']} store needs num_samples >= 1")
    if m["format"] == "topk" and sampling["topk"] < 1:
        raise bad("a topk store needs topk >= 1")
    for name in ("temperature", "top_p"):
        value = sampling.get(name)
        if not isinstance(value, (int, float)) or not value > 0:
            raise bad(f"sampling.{name} must be a number > 0, got {value!r}")
    columns_for(m["format"], m["level"], sampling["num_samples"])  # raises StoreError


def params_of(m: dict[str, Any]) -> Params:
    s = m["sampling"]
    return Params(m["format"], m["level"], m["teacher"]["vocab_size"], s["num_samples"], s["topk"])


def load_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The store's manifest, validated; StoreError naming the problem otherwise."""
    path = Path(directory) / MANIFEST
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise StoreError(f"{directory} is not a SensAI store: it has no {MANIFEST}") from None
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e}") from None
    if len(blob) > MAX_MANIFEST_BYTES:
        raise StoreError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        m = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path} is not UTF-8 JSON: {e}") from None
    _validate(m, str(path))
    return m


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Create ``manifest.json``, or check that an existing one describes the same store."""
    d = Path(directory)
    path = d / MANIFEST
    if path.exists():
        old = load_manifest(d)
        diff = [k for k in _IDENTITY if old.get(k) != manifest.get(k)]
        if diff:
            detail = "; ".join(f"{k}: store {old.get(k)!r}, now {manifest.get(k)!r}" for k in diff)
            raise StoreError(f"{d} holds a different recording ({detail})")
        return
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-manifest-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_expectations(
    m: dict[str, Any],
    where: str,
    *,
    vocab_size: int | None = None,
    output_format: str | None = None,
    tokenizer: str | None = None,
) -> None:
    """Refuse a store whose vocabulary, format or tokenizer fingerprint is not the expected."""
    have = {
        "vocab_size": m["teacher"]["vocab_size"],
        "format": m["format"],
        "tokenizer fingerprint": m["teacher"].get("tokenizer_fingerprint"),
    }
    want = {"vocab_size": vocab_size, "format": output_format, "tokenizer fingerprint": tokenizer}
    wrong = [k for k, v in want.items() if v is not None and have[k] != v]
    if wrong:
        detail = "; ".join(f"{k} {have[k]!r}, expected {want[k]!r}" for k in wrong)
        raise StoreError(f"the store {where} does not match: {detail}")
