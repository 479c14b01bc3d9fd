"""The README's distillation demo (examples/distill/train.py), run on the tiny teacher: it trains,
reports held-out KL and cross-entropy, writes its plot, and cleans up, also on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "distill" / "train.py"


def _cmd(model_dir: str, shm_path: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(DEMO), "--model", model_dir, "--shm-path", shm_path,
        "--out", str(out), "--batch-size", "2", "--seq-len", "16", "--held-out", "4",
        "--num-samples", "8", "--workers", "2", "--eval-every", "2", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(300)
def test_demo_distils_and_reports(tiny_model_dir: str, short_tmp: str) -> None:
    shm, out = os.path.join(short_tmp, "shm"), Path(short_tmp) / "out"
    done = subprocess.run(
        _cmd(tiny_model_dir, shm, out, "--steps", "4"),
        capture_output=True,
        text=True,
        timeout=280,
        env=_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "KL(teacher || student)" in done.stdout and "cross-entropy" in done.stdout
    cores = len(os.sched_getaffinity(0))  # split between the teacher and the student
    teacher = max(1, cores // 2)
    student = max(1, cores - teacher)
    assert f"{teacher} for the teacher, {student} for the student" in done.stdout
    assert "distilling" in done.stderr  # the progress bar
    assert (out / "curves.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_kl"]) == 4 and metrics["eval_step"] == [0, 2, 4]
    assert all(e["kl"] > 0 and e["ce"] > 0 for e in metrics["eval"])
    assert not os.path.exists(shm), "the server left its shared-memory file behind"


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_demo_and_its_server(tiny_model_dir: str, short_tmp: str) -> None:
    shm, out = os.path.join(short_tmp, "shm"), Path(short_tmp) / "out"
    proc = subprocess.Popen(
        _cmd(tiny_model_dir, shm, out, "--steps", "100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("student:"):
                break
            assert time.monotonic() < deadline, "the demo did not start training"
        else:
            pytest.fail("the demo ended before training: " + proc.stderr.read())  # type: ignore[union-attr]
        assert os.path.exists(shm)
        time.sleep(2)  # inside the training loop, DataLoader workers querying the teacher
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: stopping the teacher server" in err
    assert not os.path.exists(shm), "the server left its shared-memory file behind"
