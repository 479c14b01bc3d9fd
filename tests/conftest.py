"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A fresh directory under /tmp whose paths stay short enough for Unix sockets (< 108 bytes).

    pytest's ``tmp_path`` can be longer than that for long parametrised test names.
    """
    d = tempfile.mkdtemp(prefix="sai-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)
