"""The README's distillation demo (examples/distill/train.py), run on the tiny teacher: it trains,
reports held-out KL and cross-entropy, writes its plot, and cleans up, also on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
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
    # not a terminal: no progress bar (escape codes) but a plain line per held-out eval
    assert "distilling" not in done.stderr and "\r" not in done.stderr
    assert "step 2/4: loss" in done.stdout and "step 4/4: loss" in done.stdout
    assert (out / "curves.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_kl"]) == 4 and metrics["eval_step"] == [0, 2, 4]
    assert metrics["args"]["steps"] == 4 and isinstance(metrics["args"]["out"], str)
    assert all(e["kl"] > 0 and e["ce"] > 0 for e in metrics["eval"])
    assert not os.path.exists(shm), "the server left its shared-memory file behind"


class _Watch:
    """Reads a stream in a thread; ``wait_for`` blocks (on a condition, with a timeout) until
    the text read so far matches a pattern."""

    def __init__(self, stream) -> None:
        self.text = ""
        self.done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(4096):  # a binary pipe: whatever has arrived
            with self._cond:
                self.text += chunk.decode(errors="replace")
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        with self._cond:
            self._cond.wait_for(lambda: re.search(pattern, self.text) or self.done, timeout)
            match = re.search(pattern, self.text)
        assert match, f"no {pattern!r} in {timeout} s (stream ended: {self.done}):\n{self.text}"
        return match

    def rest(self, timeout: float) -> str:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        return self.text


def _interrupt(tiny_model_dir: str, short_tmp: str, when: str) -> None:
    """Start the demo in its own session (as a terminal runs it), wait until ``when``
    ("start-up": the server is starting, "training": a step is done), send SIGINT to the whole
    process group (as Ctrl-C does) and check that the demo and its server end cleanly."""
    shm = f"/dev/shm/sensai-test-demo-{uuid.uuid4().hex[:12]}"
    out_dir = Path(short_tmp) / "out"
    proc = subprocess.Popen(
        _cmd(tiny_model_dir, shm, out_dir, "--steps", "100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        start_new_session=True,
    )
    out, err = _Watch(proc.stdout), _Watch(proc.stderr)
    server_pid = None
    try:
        server_pid = int(out.wait_for(r"teacher server: pid (\d+)", 120).group(1))
        if when == "training":
            assert re.search(r"^teacher .* at shm://", out.wait_for("student:", 240).string, re.M)
            assert os.path.exists(shm)
            out.wait_for(r"step [1-9]\d*/100000: loss", 240)  # a step done (not a terminal)
        else:
            assert "at shm://" not in out.text, "the server started before the interrupt"
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
        stdout, stderr = out.rest(10), err.rest(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if server_pid is not None and os.path.exists(f"/proc/{server_pid}"):
            os.kill(server_pid, signal.SIGKILL)  # leave nothing behind, even on failure
    if when == "start-up":
        assert "at shm://" not in stdout, "the server started before the interrupt"
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted: stopping the teacher server" in stderr
    assert "Traceback" not in stderr, stderr
    assert not os.path.exists(f"/proc/{server_pid}"), f"the server (pid {server_pid}) still runs"
    assert not os.path.exists(shm), "the server left its shared-memory file behind"
    assert not os.path.exists(shm + ".lock"), "the server left its lock file behind"


@pytest.mark.timeout(300)
def test_ctrl_c_during_training_stops_the_demo_and_its_server(
    tiny_model_dir: str, short_tmp: str
) -> None:
    _interrupt(tiny_model_dir, short_tmp, "training")


@pytest.mark.timeout(300)
def test_ctrl_c_during_server_start_up_stops_the_server(
    tiny_model_dir: str, short_tmp: str
) -> None:
    _interrupt(tiny_model_dir, short_tmp, "start-up")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "extra, why",
    [
        (("--server-timeout", "0.5"), "printed no address within 0.5 s"),
        (("--model", "/nonexistent/teacher"), "exited before printing its address"),
    ],
    ids=["timeout", "server-dies"],
)
def test_a_server_that_does_not_start_is_a_clear_error(
    tiny_model_dir: str, short_tmp: str, extra: tuple[str, ...], why: str
) -> None:
    shm = f"/dev/shm/sensai-test-demo-{uuid.uuid4().hex[:12]}"
    done = subprocess.run(
        [*_cmd(tiny_model_dir, shm, Path(short_tmp) / "out", "--steps", "1"), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: the teacher server {why}" in done.stderr, done.stderr
    assert "the end of its log:" in done.stderr
    if extra[0] == "--model":  # the tail of the server's stderr names the cause
        assert "Invalid value for '--model'" in done.stderr.split("the end of its log:")[1]
    assert "Traceback" not in done.stderr.split("the end of its log:")[0]
    pid = re.search(r"teacher server: pid (\d+)", done.stdout)
    assert pid and not os.path.exists(f"/proc/{pid.group(1)}")
    assert not os.path.exists(shm) and not os.path.exists(shm + ".lock")


def test_missing_matplotlib_is_named_before_anything_starts(short_tmp: str) -> None:
    """Without matplotlib the demo would train for minutes, then fail on its plot."""
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = [{str(DEMO)!r}, '--out', {short_tmp!r}]; "
        f"runpy.run_path({str(DEMO)!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs matplotlib" in done.stderr and "pip install 'sensai[demo]'" in done.stderr
    assert "teacher server: pid" not in done.stdout  # nothing started
