"""benchmarks/teacher_bench.py end to end on the tiny teacher: every arm runs, the table and the
JSON carry them all, and the memory check reports. Its numbers are not asserted (a benchmark is
never a test); this keeps the benchmark from rotting between the runs that fill the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_bench.py"
ARMS = ("forward", "forward+head", "full", "sampled", "coo", "compact", "topk", "multinomial")


def _run(args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.timeout(300)
def test_teacher_benchmark_runs_every_arm(tiny_model_dir: str, tmp_path: Path) -> None:
    out_json = tmp_path / "teacher.json"
    common = ["--model", tiny_model_dir, "--device", "cpu", "-B", "2", "-S", "12"]
    out = _run([*common, "-N", "16", "--topk", "4", "--chunk-size", "7", "--repeats", "1",
                "--warmup", "0", "--no-memory", "--json", str(out_json)])  # fmt: skip
    for arm in ARMS:
        assert f"\n{arm} " in out, (arm, out)
    assert "sampling overhead (compact) vs forward+head" in out, out
    assert "drawn by torch.multinomial (the previous sampler)" in out, out
    data = json.loads(out_json.read_text())
    assert data["model"] == tiny_model_dir and data["positions"] == 2 * 11
    assert set(data["arms"]) == set(ARMS)
    for arm in ARMS:
        row = data["arms"][arm]
        assert row["tokens_per_s"] > 0 and len(row["times_s"]) == 1, arm
    sampled, baseline = data["arms"]["sampled"], data["arms"]["multinomial"]
    assert sampled["bytes_per_position"] == baseline["bytes_per_position"]  # the same layout

    out = _run([*common, "--memory-check", "--json", str(out_json)])
    assert "memory check (sampled, B=2, S=12)" in out, out
    check = json.loads(out_json.read_text())["memory_check"]
    assert check["full_tensor_bytes"] == 2 * 11 * data["vocab_size"] * 4
