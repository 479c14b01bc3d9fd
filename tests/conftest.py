"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from transport_helpers import KINDS, Procs


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A fresh directory under /tmp whose paths stay short enough for Unix sockets (< 108 bytes).

    pytest's ``tmp_path`` can be longer than that for long parametrised test names.
    """
    d = tempfile.mkdtemp(prefix="sai-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- transports ---------------------------------------------------------------------------------
# A test taking `kind` runs once per transport (a module may narrow it with its own fixture or a
# parametrize); `path` is an endpoint path in a short directory; `procs` reaps child processes.


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def path(short_tmp: str) -> str:
    return os.path.join(short_tmp, "ep")


@pytest.fixture
def procs() -> Iterator[Procs]:
    g = Procs()
    yield g
    g.cleanup()


# --- the tiny teacher model (tests/tiny_model.py) ----------------------------------------------
# torch and transformers are imported inside the fixtures, so tests that do not use them (the
# transports) collect without paying for those imports.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder with a tiny random Llama (2 layers, hidden 64, context 64) and its byte-level
    BPE tokenizer (320 tokens, the model's vocabulary; bos/eos, no pad), built once per session."""
    from tiny_model import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny-teacher") / "model"))


@pytest.fixture
def tiny_teacher(tiny_model_dir: str):
    """A fresh ``TeacherLogitsServer`` on the CPU over the tiny model (loads in well under 1 s):
    num_samples 16, temperature 1, no masks."""
    from sensai.teacher import TeacherLogitsServer

    return TeacherLogitsServer(tiny_model_dir, device="cpu", num_samples=16)
