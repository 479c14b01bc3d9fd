"""benchmarks/distill_quality.py end to end on the tiny teacher, a few steps, one server seed
(and two, marked slow): it must run (its numbers are not asserted; a benchmark is never a
test), write a JSON and a plot, and leave no server or shared-memory file behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_quality.py"
ARMS = ("ce", "sampled", "full", "topk", "replay")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "seeds",
    [
        pytest.param([3], id="one-seed"),
        pytest.param([3, 4], id="two-seeds", marks=pytest.mark.slow),
    ],
)
def test_quality_benchmark_runs_end_to_end(
    tiny_model_dir: str, tmp_path: Path, seeds: list[int]
) -> None:
    out_json, out_png = tmp_path / "results.json", tmp_path / "curves.png"
    cmd = [
        sys.executable, str(BENCH), "--model", tiny_model_dir, "--steps", "3",
        "--batch-size", "2", "--seq-len", "16", "--held-out", "2", "--num-samples", "8",
        "--eval-every", "2", "--hidden", "16", "--server-seeds", ",".join(map(str, seeds)),
        "--teacher-threads", "1", "--threads", "1",
        "--json", str(out_json), "--plot", str(out_png),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, err = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert "| sampled | 8 samples, compact, served |" in out, out
    assert "targets: sampled KL <= 0.80x ce's" in out, out
    assert "| replay | 8 samples, counts store, replayed |" in out, out
    assert "replay vs sampled: held-out KL" in out, out

    results = json.loads(out_json.read_text())
    assert [r["server_seed"] for r in results["runs"]] == seeds
    for run in results["runs"]:
        assert run["eval_steps"] == [0, 2, 3]
        assert set(run["history"]) == set(ARMS)
        assert all(len(h) == 3 and h[-1]["kl"] > 0 for h in run["history"].values())
        assert run["topk_k"] >= 1 and run["sampled_bytes_per_position"] > 0
        assert run["store_level"] == "counts" and run["store_bytes_per_position"] > 0
    for arm in ARMS:
        kl = results["summary"][arm]["kl"]
        assert kl["min"] <= kl["mean"] <= kl["max"] and len(kl["values"]) == len(seeds)
    # Same student initialisation and data in every run: the ce arm repeats exactly.
    ce = results["summary"]["ce"]["kl"]["values"]
    assert ce == [ce[0]] * len(seeds), ce
    assert results["summary"]["full"]["kl_vs_full"]["mean"] == pytest.approx(1.0)
    assert out_png.stat().st_size > 1000

    assert not os.path.exists(f"/dev/shm/sensai-quality-{proc.pid}")
    pids = [line.split()[3].rstrip(",") for line in out.splitlines() if "server: pid" in line]
    assert len(pids) == len(seeds), out
    for pid in pids:  # both servers stopped (and reaped: no zombie either)
        assert not os.path.exists(f"/proc/{pid}"), f"server {pid} still runs"


def test_bad_server_seeds_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--server-seeds", "0,x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "expected distinct integers >= 0 separated by commas" in done.stderr
