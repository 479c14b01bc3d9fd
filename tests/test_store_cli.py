"""``sensai record``: datasets in, a store out; killed by SIGKILL, it resumes with no duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CI") == "true":
    import pyarrow  # noqa: F401  - CI installs the store extra: a missing pyarrow fails
else:
    pytest.importorskip("pyarrow")

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from sensai import Client
from sensai.cli import cli
from sensai.store import StoreReader, list_shards, load_manifest, sequence_key

TEACHER_FLAGS = ["--device", "cpu", "--format", "compact", "--num-samples", "16", "--threads", "1"]


def _write_jsonl(path: Path, seqs: list[list[int]]) -> None:
    with open(path, "w") as f:
        for q in seqs:
            f.write(json.dumps({"input_ids": q}) + "\n")


def _rows_on_disk(store: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(store))


def test_record_killed_mid_run_resumes_without_duplicates(tiny_model_dir, short_tmp):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 320, size=int(rng.integers(20, 40))).tolist() for _ in range(600)]
    data = Path(short_tmp) / "data.jsonl"
    _write_jsonl(data, seqs)
    out = Path(short_tmp) / "store"
    cmd = [sys.executable, "-m", "sensai.cli", "record", "--model", tiny_model_dir, "--data",
           str(data), "--out", str(out), *TEACHER_FLAGS, "--rows-per-shard", "4",
           "--max-batch-tokens", "40", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    published = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "published shard" in line:
                published.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert published.wait(120), "no shard was published"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    partial = len(StoreReader(out))  # a killed recording leaves a store that opens
    assert 4 <= partial < len(seqs)
    assert _rows_on_disk(out) == partial
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"store://{out.resolve()}"
    unique = {sequence_key(q) for q in seqs}
    assert len(StoreReader(out)) == len(unique) == _rows_on_disk(out)  # nothing twice
    assert not list(out.glob(".tmp-*"))
    m = load_manifest(out)
    assert m["dataset"]["hash"] and m["teacher"]["revision"].startswith("sha256:")
    assert m["teacher"]["tokenizer_fingerprint"] and m["sampling"]["num_samples"] == 16
    q = np.asarray(seqs[123])
    assert Client(f"store://{out}").get_teacher_logits(q[None]).num_positions == q.size - 1


def test_record_parquet_and_text_column(tiny_model_dir, short_tmp):
    runner = CliRunner()
    data = Path(short_tmp) / "ids.parquet"
    pq.write_table(pa.table({"ids": [[1, 2, 3, 4], [9, 8, 7], [5]]}), data)
    out = Path(short_tmp) / "s1"
    args = ["record", "--model", tiny_model_dir, "--data", str(data), "--out", str(out),
            "--column", "ids", "--level", "counts", "--no-progress", *TEACHER_FLAGS]  # fmt: skip
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    reader = StoreReader(out)
    assert len(reader) == 3 and reader.level == "counts"
    assert sequence_key([9, 8, 7]) in reader

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = Path(short_tmp) / "text.jsonl"
    text.write_text('{"text": "The capital of France is Paris."}\n{"text": "A fox."}\n')
    out2 = Path(short_tmp) / "s2"
    args = ["record", "--model", tiny_model_dir, "--data", str(text), "--out", str(out2),
            "--text-column", "text", "--no-progress", *TEACHER_FLAGS]  # fmt: skip
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    ids = tok("A fox.")["input_ids"]
    assert sequence_key(ids) in StoreReader(out2)


def test_record_refuses_bad_input_clearly(tiny_model_dir, short_tmp):
    runner = CliRunner()
    data = Path(short_tmp) / "bad.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 99999]}\n')
    out = Path(short_tmp) / "s"
    base = ["record", "--model", tiny_model_dir, "--data", str(data), "--out", str(out),
            "--no-progress"]  # fmt: skip
    r = runner.invoke(cli, [*base, *TEACHER_FLAGS])
    assert r.exit_code != 0 and "line 2" in r.output and "vocabulary" in r.output
    flags = [f if f != "compact" else "sampled" for f in TEACHER_FLAGS]
    r = runner.invoke(cli, [*base, *flags, "--level", "counts"])
    assert r.exit_code != 0 and "counts level stores the compact format" in r.output


def test_serve_fallback_needs_replay(short_tmp):
    sock = os.path.join(short_tmp, "s.sock")
    res = CliRunner().invoke(
        cli,
        ["serve", "--transport", "unix_socket", "--socket-path", sock, "--fallback", "unix:///x"],
    )
    assert res.exit_code == 2 and "--fallback needs --replay" in res.output
