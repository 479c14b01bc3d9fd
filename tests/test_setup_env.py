"""scripts/setup-env's choice of PyTorch: ``SENSAI_TORCH=system`` and ``SENSAI_TORCH_INDEX``.

Both are tested with a local stand-in wheel of torch (a version no index has), so that the
test shows which torch the virtualenv got without downloading one. The extension build is
skipped (``SENSAI_SETUP_NO_BUILD=1``): it is the same whatever torch is.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "99.0.0+sensaitest"
SETUP_TIMEOUT = 900


def _stand_in_torch_wheel(directory: Path) -> Path:
    """A pure-Python wheel named torch, version ``VERSION``, with no dependencies."""
    dist = f"torch-{VERSION}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {VERSION!r}\nSTAND_IN = True\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {VERSION}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: sensai-test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = directory / f"torch-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def _setup(env_extra: dict[str, str], venv: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(SENSAI_VENV=str(venv), SENSAI_SETUP_NO_BUILD="1", SENSAI_PYTHON=_base_python())
    env.update(env_extra)
    return subprocess.run(
        [str(ROOT / "scripts" / "setup-env")],
        env=env,
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT,
    )


def _base_python() -> str:
    return getattr(sys, "_base_executable", sys.executable)


def _torch_of(venv: Path, env_extra: dict[str, str] | None = None) -> str:
    env = dict(os.environ, **(env_extra or {}))
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import torch; print(torch.__version__, torch.__file__)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.timeout(SETUP_TIMEOUT + 60)
def test_torch_from_a_local_wheel_directory(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _stand_in_torch_wheel(wheels)
    venv = tmp_path / "venv"
    r = _setup({"SENSAI_TORCH_INDEX": str(wheels)}, venv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(venv)
    version, where = _torch_of(venv).split(" ", 1)
    assert version == VERSION and where.startswith(str(venv)), (version, where)
    assert f"from {wheels}" in r.stderr
    # a second run reuses it, keeping that torch
    r = _setup({"SENSAI_TORCH_INDEX": str(wheels)}, venv)
    assert r.returncode == 0 and "reusing" in r.stderr, r.stderr[-2000:]


@pytest.mark.timeout(SETUP_TIMEOUT + 60)
def test_torch_the_interpreter_already_has(tmp_path: Path) -> None:
    """``SENSAI_TORCH=system``: the interpreter's torch (here in its user site-packages) is
    used by the virtualenv, not replaced by a download."""
    base = tmp_path / "userbase"
    site_dir = base / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site_dir.mkdir(parents=True)
    with zipfile.ZipFile(_stand_in_torch_wheel(tmp_path)) as z:
        z.extractall(site_dir)  # what installing a pure wheel amounts to
    user = {"PYTHONUSERBASE": str(base), "PYTHONNOUSERSITE": ""}
    venv = tmp_path / "venv"
    r = _setup({"SENSAI_TORCH": "system", **user}, venv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the interpreter's torch" in r.stderr, r.stderr[-2000:]
    version, where = _torch_of(venv, user).split(" ", 1)
    assert version == VERSION and where.startswith(str(site_dir)), (version, where)
    assert not list((venv / "lib").glob("python*/site-packages/torch"))


@pytest.mark.parametrize(
    "env, text",
    [
        ({"SENSAI_TORCH": "cuda"}, "SENSAI_TORCH=cuda: expected 'system'"),
        ({"SENSAI_TORCH_INDEX": "no/such/dir"}, "is neither a directory of wheels nor"),
        (
            {"SENSAI_TORCH": "system", "SENSAI_TORCH_INDEX": "https://example.invalid/simple"},
            "give one of them",
        ),
        ({"SENSAI_TORCH": "system", "PYTHONNOUSERSITE": "1"}, "cannot import torch"),
    ],
    ids=["unknown mode", "bad index", "both", "no torch there"],
)
def test_bad_torch_choices_are_refused_before_anything_is_made(
    tmp_path: Path, env: dict[str, str], text: str
) -> None:
    venv = tmp_path / "venv"
    r = _setup(env, venv)
    assert r.returncode != 0 and text in r.stderr, r.stderr[-2000:]
    assert not venv.exists()
