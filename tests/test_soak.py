"""Soak (shortened for CI): 4 client processes x 150 requests of mixed sizes on each transport,
against the doubling function (byte-exact answers) and against the teacher (answers equal to
the in-process teacher's). 0 lost, 0 corrupt, the server's descriptors unchanged and its
resident memory grown by at most 20 MB between the first half of the requests and the end.

The full run (5,000 requests per client): ``scripts/soak``, or
``SENSAI_SOAK_REQUESTS=5000 python -m pytest tests/test_soak.py -s``. Logic: ``soak_helpers``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from soak_helpers import KINDS, MODES, RSS_LIMIT, ServerProcess, run_soak, teacher_pool

REQUESTS = int(os.environ.get("SENSAI_SOAK_REQUESTS", "150"))

pytestmark = pytest.mark.timeout(max(300, REQUESTS))


@pytest.fixture(scope="module")
def servers(tiny_model_dir: str) -> Iterator[dict[tuple[str, str], ServerProcess]]:
    """A doubling server and a `sensai serve` per transport, started together (their start-up,
    mostly importing torch, overlaps)."""
    started: dict[tuple[str, str], ServerProcess] = {}
    try:
        for mode in MODES:
            for kind in KINDS:
                started[kind, mode] = ServerProcess(kind, mode, tiny_model_dir)
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            if s.proc.exitcode is None:
                s.proc.terminate()
        for s in started.values():
            s.cleanup()


@pytest.fixture(scope="module")
def pool(tiny_model_dir: str) -> list:
    return teacher_pool(tiny_model_dir)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_soak(kind: str, mode: str, servers: dict[tuple[str, str], ServerProcess], request) -> None:
    pool = request.getfixturevalue("pool") if mode == "teacher" else None
    res = run_soak(servers[kind, mode], REQUESTS, pool=pool)
    print(res.line())
    assert res.lost == 0 and res.corrupt == 0, res.problems
    assert res.fd_delta == 0, res.line()
    assert res.rss_growth <= RSS_LIMIT, res.line()
    assert not res.problems, res.problems
