"""The README's first transport example, run as written (on a name of its own): the teacher
side in a process, the trainer side here, and the rule it shows (one array in, one array
out; a list in, a list out) checked on what comes back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _example() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using the transports") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "no python block under 'Using the transports'"
    teacher, trainer = code.group(1).split("# trainer side")
    imports = [line for line in teacher.splitlines() if line.startswith(("import ", "from "))]
    return teacher, "\n".join(imports) + "\n" + trainer.replace("(another process)", "", 1)


def test_the_readme_transport_example_round_trips() -> None:
    teacher, trainer = _example()
    name = f"sensai-readme-{uuid.uuid4().hex[:8]}"
    teacher = teacher.replace('"sensai"', repr(name))
    trainer = trainer.replace("/dev/shm/sensai", f"/dev/shm/{name}")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", teacher], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        printed = proc.stdout.readline().strip()  # the address, printed once serving
        assert printed == f"shm:///dev/shm/{name}", printed
        scope: dict = {}
        exec(compile(trainer, "README", "exec"), scope)  # noqa: S102
        np.testing.assert_array_equal(scope["y"], 2 * np.arange(4))
        assert isinstance(scope["y"], np.ndarray)
        np.testing.assert_array_equal(scope["a"], 2 * np.arange(4))
        np.testing.assert_array_equal(scope["b"], 2 * np.ones(3))
    finally:
        proc.send_signal(signal.SIGINT)  # "Ctrl-C stops it"
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not os.path.exists(f"/dev/shm/{name}"), "the server left its file behind"
