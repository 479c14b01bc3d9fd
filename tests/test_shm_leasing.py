"""Leasing shared-memory slots when earlier clients left something behind (issue 14).

Kept answers of a closed client, a client killed and not yet reaped, and a ring word
corrupted by another process of the user must neither hand a new client an unusable slot
while another is free nor block leasing for good.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest

from sensai.errors import CapacityError
from shm_raw import RESP_HEAD, RESP_TAIL, ShmFile
from transport_helpers import ServerThread, make_client, make_server

SHM = "shared_memory"


def round_trips(c: Any, n: int = 3) -> None:
    for i in range(n):
        np.testing.assert_array_equal(c.request(np.arange(i + 2), timeout=5), np.arange(i + 2))


def test_kept_views_do_not_poison_leasing(path: str) -> None:
    """A closed client's two kept answers pin both response buffers of its slot: the next
    client gets a free slot, and only when none is left the pinned one, whose error says
    who pins it (not "2 buffers are held by received messages" of a client holding none)."""
    server = make_server(SHM, path, 2, max_nbytes=1 << 20, ring_depth=2)
    with ServerThread(server):
        c1 = make_client(SHM, path)
        assert c1.slot_id == 0
        kept = [c1.request(np.arange(1000) * k, timeout=5) for k in (1, 2)]
        c1.close()
        with make_client(SHM, path) as c2:
            assert c2.slot_id == 1, "the slot kept views pin was offered though slot 1 was free"
            round_trips(c2)
            with make_client(SHM, path) as c3:
                assert c3.slot_id == 0
                with pytest.raises(CapacityError) as e:
                    c3.request(np.arange(3), timeout=5)
                text = str(e.value)
                assert "this client's received messages hold 0" in text, text
                assert "2 are pinned by messages a previous client of this slot" in text, text
                assert "this process" in text, text
                for k, a in enumerate(kept, 1):
                    np.testing.assert_array_equal(a, np.arange(1000) * k)  # still intact
                del kept, a
                round_trips(c3)
    server.close()


_HOLDER = """
import sys
from sensai.transports import connect, format_address
c = connect(format_address("shared_memory", sys.argv[1]), connect_timeout=10)
print("leased", c.slot_id, flush=True)
sys.stdin.read()
"""


def test_a_killed_client_not_yet_reaped_frees_its_slot(path: str) -> None:
    """A SIGKILLed client that its parent has not reaped (a zombie) kept its slot."""
    server = make_server(SHM, path, 1, max_nbytes=1 << 20)
    with ServerThread(server):
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().split() == [b"leased", b"0"]
            os.kill(holder.pid, signal.SIGKILL)
            # Wait for its exit without reaping it: it stays a zombie meanwhile.
            os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)
            with make_client(SHM, path, connect_timeout=5) as c:
                assert c.slot_id == 0
                round_trips(c)
        finally:
            holder.kill()
            holder.wait(10)
    server.close()


class _Notice(logging.Handler):
    """Sets ``seen`` once a warning of the transports contains every one of ``words``."""

    def __init__(self, *words: str) -> None:
        super().__init__()
        self.words = words
        self.seen = threading.Event()
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.texts.append(text)
        if all(w in text for w in self.words):
            self.seen.set()


def test_a_corrupt_slot_is_skipped_reported_and_reset(path: str) -> None:
    """Another process of the user writes an impossible response tail into idle slot 0:
    connect() without a slot id still works (slot 1), the server logs slot 0 as corrupt
    and resets it, and slot 0 can be leased by id again."""
    server = make_server(SHM, path, 4, max_nbytes=1 << 20)
    notice = _Notice("slot 0 ", "corrupt", "reset")
    log = logging.getLogger("sensai.transports")
    log.addHandler(notice)
    try:
        with ShmFile(path) as f, ServerThread(server):
            f.slot_u64(0, RESP_TAIL, 2**64 - 2)
            with make_client(SHM, path) as c:
                assert c.slot_id == 1
                round_trips(c)
            assert notice.seen.wait(5), notice.texts
            assert f.slot_u64(0, RESP_TAIL) == f.slot_u64(0, RESP_HEAD)
            with make_client(SHM, path, 0) as c0:
                round_trips(c0)
    finally:
        log.removeHandler(notice)
    server.close()
