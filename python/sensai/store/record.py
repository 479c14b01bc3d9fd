"""Recording: run a teacher over tokenised sequences into a `StoreWriter`, and read the
datasets ``sensai record`` accepts (JSONL, Parquet, a folder of them, a ``datasets`` folder)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .manifest import build_manifest, file_hash, tokenizer_fingerprint
from .writer import StoreWriter, sequence_key

__all__ = [
    "count_sequences",
    "manifest_for",
    "model_revision",
    "read_sequences",
    "record_sequences",
]

log = logging.getLogger("sensai.store")


def model_revision(path: str | os.PathLike[str]) -> str:
    """A model's revision: the Hugging Face cache snapshot it lives in, else a sha256 over
    its folder's top-level files (or the file itself)."""
    p = Path(path).resolve()
    if p.is_dir():
        if p.parent.name == "snapshots":
            return f"hf:{p.name}"
        return "sha256:" + file_hash(sorted(q for q in p.iterdir() if q.is_file()))
    return "sha256:" + file_hash([p])


def manifest_for(
    teacher: Any,
    level: str,
    *,
    model: str,
    revision: str | None,
    dataset: dict[str, Any] | None,
    samples_per_epoch: int = 1,
) -> dict[str, Any]:
    """The manifest of a recording by ``teacher`` (a `TeacherLogitsServer`)."""
    return build_manifest(
        fmt=teacher.output_format,
        level=level,
        vocab_size=teacher.vocab_size,
        num_samples=int(teacher.num_samples or 0),
        temperature=teacher.temperature,
        top_k=teacher.top_k,
        top_p=teacher.top_p,
        topk=min(teacher.topk, teacher.vocab_size),
        model=model,
        revision=revision,
        tokenizer=tokenizer_fingerprint(teacher.tokenizer),
        dataset=dataset,
        samples_per_epoch=samples_per_epoch,
    )


def _answer_rows(teacher: Any, seqs: list[np.ndarray], seed: int | None) -> list[Any]:
    """One-row outputs, every position valid, for each sequence: ``L`` positions (a pad is
    appended so the distribution after the last token exists) unless at the context limit."""
    lens = [int(s.size) for s in seqs]
    longest = max(lens)
    extra = 1 if teacher.max_length is None or longest < teacher.max_length else 0
    s = longest + extra
    tok = teacher.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = int(pad) if isinstance(pad, int) and pad >= 0 else 0
    ids = np.full((len(seqs), s), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), s), dtype=np.int64)
    for i, q in enumerate(seqs):
        ids[i, : q.size] = q
        mask[i, : q.size] = 1
    out = teacher.compute(ids, mask, seed=seed).to("cpu")
    p = max(s - 1, 1)
    return [out.rows(i, i + 1, min(n, p)) for i, n in enumerate(lens)]


def record_sequences(
    teacher: Any,
    sequences: Iterable[np.ndarray],
    writer: StoreWriter,
    *,
    max_batch_tokens: int = 16384,
    samples_per_epoch: int = 1,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Record every sequence the store does not hold yet; returns how many were computed.
    ``progress(n)`` is called with the number of sequences done (skipped ones included)."""
    batch: list[tuple[str, np.ndarray]] = []
    computed = 0
    longest = 0

    def run() -> None:
        nonlocal computed, longest
        if not batch:
            return
        seqs = [q for _, q in batch]
        for k in range(samples_per_epoch):
            todo = [i for i, (key, _) in enumerate(batch) if (key, k) not in writer]
            if not todo:
                continue
            s = None if seed is None else (seed + int(batch[todo[0]][0][:12], 16) + k) % 2**63
            rows = _answer_rows(teacher, [seqs[i] for i in todo], s)
            for i, row in zip(todo, rows, strict=True):
                writer.add(batch[i][0], int(seqs[i].size), row, sample_set=k)
        computed += len(batch)
        if progress is not None:
            progress(len(batch))
        batch.clear()
        longest = 0

    for q in sequences:
        key = sequence_key(q)
        if all((key, k) in writer for k in range(samples_per_epoch)):
            if progress is not None:
                progress(1)
            continue
        if batch and (len(batch) + 1) * (max(longest, q.size) + 1) > max_batch_tokens:
            run()
        batch.append((key, q))
        longest = max(longest, int(q.size))
    run()
    return computed


# ------------------------------------------------------------------------------- datasets


def _ids(value: Any, where: str, vocab_size: int | None) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        raise StoreError(f"{where}: expected a non-empty list of token ids")
    try:
        a = np.asarray(value)
    except (ValueError, TypeError):
        raise StoreError(f"{where}: not a flat list of token ids") from None
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise StoreError(f"{where}: expected integer token ids, got {a.dtype} of shape {a.shape}")
    if int(a.min()) < 0 or (vocab_size is not None and int(a.max()) >= vocab_size):
        raise StoreError(f"{where}: token ids outside the vocabulary 0..{(vocab_size or 0) - 1}")
    return a.astype(np.int64)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(q for q in path.rglob("*") if q.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise StoreError(f"{path} holds no .jsonl or .parquet files")
        return files
    if not path.is_file():
        raise StoreError(f"no dataset at {path}")
    return [path]


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file()


def count_sequences(path: str | os.PathLike[str]) -> int | None:
    """How many sequences a dataset holds, when cheap to tell (for a progress bar)."""
    p = Path(path)
    if _is_hf_dataset(p):
        return None
    import pyarrow.parquet as pq

    total = 0
    for f in _files(p):
        if f.suffix == ".parquet":
            total += pq.ParquetFile(f).metadata.num_rows
        else:
            with open(f, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
    return total


def read_sequences(
    path: str | os.PathLike[str],
    column: str = "input_ids",
    *,
    text_column: str | None = None,
    tokenizer: Any = None,
    vocab_size: int | None = None,
) -> Iterator[np.ndarray]:
    """The token ids of each example: ``column`` of each JSONL object (or the line itself,
    a JSON list), Parquet row or ``datasets`` row; with ``text_column``, that text encoded
    by ``tokenizer``."""
    p = Path(path)
    name = text_column or column
    if text_column is not None and tokenizer is None:
        raise StoreError("text_column needs the teacher's tokenizer")

    def convert(value: Any, where: str) -> np.ndarray:
        if text_column is not None:
            if not isinstance(value, str):
                raise StoreError(f"{where}: {text_column!r} is not text")
            value = tokenizer(value, add_special_tokens=True)["input_ids"]
        return _ids(value, where, vocab_size)

    if _is_hf_dataset(p):
        try:
            import datasets
        except ImportError:
            raise StoreError(f"{p} is a datasets folder: pip install datasets") from None
        ds = datasets.load_from_disk(str(p))
        if name not in ds.column_names:
            raise StoreError(f"{p} has no column {name!r} (columns: {ds.column_names})")
        for i, row in enumerate(ds):
            yield convert(row[name], f"{p} row {i}")
        return
    import pyarrow.parquet as pq

    for f in _files(p):
        if f.suffix == ".parquet":
            pf = pq.ParquetFile(f)
            if name not in pf.schema_arrow.names:
                raise StoreError(f"{f} has no column {name!r} (columns: {pf.schema_arrow.names})")
            i = 0
            for rb in pf.iter_batches(columns=[name], batch_size=1024):
                for value in rb.column(0).to_pylist():
                    yield convert(value, f"{f} row {i}")
                    i += 1
            continue
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f} line {n}"
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise StoreError(f"{where}: not JSON: {e}") from None
                if isinstance(obj, dict):
                    if name not in obj:
                        raise StoreError(f"{where}: no {name!r} field")
                    obj = obj[name]
                yield convert(obj, where)
