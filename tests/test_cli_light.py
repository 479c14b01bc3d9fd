"""The CLI paths that need no model do not import torch (about 3.5 s and 650 MB here):
``sensai --version``, ``--help``, ``sensai info`` against a live server, and a raw client's
round trip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_client import FakeTeacher, _path

ROOT = Path(__file__).resolve().parents[1]


def _run_without_torch(body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (which may call ``sensai.cli.main``), then fail if torch was imported."""
    code = "\n".join(
        [
            "import sys",
            "try:",
            textwrap.indent(textwrap.dedent(body).strip(), "    "),
            "except SystemExit as e:",
            "    if e.code not in (0, None):",
            "        raise",
            "assert 'torch' not in sys.modules, 'torch was imported'",
        ]
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["serve", "--help"], ["info", "-h"]])
def test_help_and_version_leave_torch_out(args: list[str]) -> None:
    done = _run_without_torch(f"from sensai.cli import main\nmain({args!r})")
    assert done.returncode == 0, done.stderr
    if args == ["--version"]:
        assert done.stdout.startswith("sensai ") and "wire protocol" in done.stdout


def test_info_against_a_live_server_leaves_torch_out(short_tmp: str) -> None:
    t = FakeTeacher("unix_socket", _path("unix_socket", short_tmp))
    try:
        done = _run_without_torch(
            f"from sensai.cli import main\nmain(['info', {t.address!r}, '--timeout', '10'])"
        )
        assert done.returncode == 0, done.stderr
        assert '"vocab_size"' in done.stdout, done.stdout
        done = _run_without_torch(
            f"""
            import numpy as np
            from sensai import connect
            with connect({t.address!r}, connect_timeout=10) as c:
                c.request_message([], kind="control", tag=0x1001, timeout=10)
            """
        )
        assert done.returncode == 0, done.stderr
    finally:
        t.stop()
