"""The collate wrapper when a batch cannot get the teacher's answer: raise or skip, the one
connection wait, counts and reports, and errors that name the cause and the fix."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from sensai import Client, SensAIClient, wrap_collate_function
from sensai.errors import CapacityError, NoTeacherError
from sensai.transports import connect, describe_address, format_address
from test_client import FakeTeacher, _path
from transport_helpers import (
    KINDS,
    MP,
    Procs,
    ServerThread,
    answer_with,
    double,
    hold_slot_process,
    make_server,
)

ROOT = Path(__file__).resolve().parents[1]


def _collate(rows: list) -> dict:
    return {"input_ids": np.stack(rows)}


ROWS = [np.arange(6, dtype=np.int64), np.arange(6, dtype=np.int64) + 1]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_a_client_raises_by_default_naming_the_address_the_cause_and_the_fix(
    kind: str, short_tmp: str
) -> None:
    address = format_address(kind, _path(kind, short_tmp) + "-typo")
    client = Client(address, connect_timeout=0.5)
    collate = wrap_collate_function(_collate, client, num_retries=3, retry_delay=0.2)
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NoTeacherError) as ei:
            collate(ROWS)
    waited = time.monotonic() - t0
    # one wait for the connection, never multiplied by the retries (4 x 0.5 s + 3 x 0.2 s)
    assert waited < 1.5, waited
    text = str(ei.value)
    assert address in text and "nothing is at" in text and "start the server" in text, text
    assert "on_error='skip'" in text
    assert ei.value.__cause__ is not None


def test_skip_returns_the_batch_counts_it_and_reports_every_n(
    short_tmp: str, caplog: pytest.LogCaptureFixture
) -> None:
    address = format_address("unix_socket", os.path.join(short_tmp, "none.sock"))
    client = Client(address, connect_timeout=0.2)
    collate = wrap_collate_function(
        _collate, client, num_retries=1, retry_delay=0, on_error="skip", report_every=3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with caplog.at_level(logging.WARNING, logger="sensai.collate"):
            t0 = time.monotonic()
            for _ in range(6):
                batch = collate(ROWS)
                assert set(batch) == {"input_ids"}
            # the connection was waited for once; the next batches looked without waiting
            assert time.monotonic() - t0 < 1.0
    assert collate.batches == 6 and collate.batches_without_teacher == 6
    reports = [r.getMessage() for r in caplog.records if "went without" in r.getMessage()]
    assert len(reports) == 2, reports
    assert "3 of the last 3 batches went without a teacher answer (6 of 6" in reports[1]


def test_the_seeds_client_skips_by_default_and_a_raw_endpoint_is_accepted(
    short_tmp: str,
) -> None:
    t = FakeTeacher("unix_socket", _path("unix_socket", short_tmp))
    try:
        ep = connect(t.address, connect_timeout=5)
        for client in (SensAIClient(ep), ep):
            collate = wrap_collate_function(_collate, client)
            assert "teacher_logits" in collate(ROWS)  # the seed's raw answer
        t.stop()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert "teacher_logits" not in collate(ROWS)
        texts = [str(w.message) for w in record]
        assert len(texts) == 4 + 1 and "Continuing without teacher logits" in texts[-1], texts
        assert collate.batches_without_teacher == 1
        ep.close()
    finally:
        t.stop()


def test_every_slot_held_names_num_clients(kind: str, short_tmp: str, procs: Procs) -> None:
    path = _path(kind, short_tmp)
    server = make_server(kind, path, 1)
    with ServerThread(server, answer_with(double)):
        here, there = MP.Pipe()
        procs.start(hold_slot_process, kind, path, None, there)
        assert here.poll(30) and here.recv()[0] == "held"
        collate = wrap_collate_function(
            _collate, Client(format_address(kind, path), connect_timeout=2)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(NoTeacherError) as ei:
                collate(ROWS)
        assert isinstance(ei.value.__cause__, CapacityError)
        assert "--num-clients" in str(ei.value) and "DataLoader workers + 1" in str(ei.value)
        procs.cleanup()
    server.close()


@pytest.mark.parametrize("kind", ["unix_socket", "shared_memory"])
def test_a_stale_file_of_a_dead_server_is_named_with_its_pid(kind: str, short_tmp: str) -> None:
    path = _path(kind, short_tmp)
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from sensai.transports import create_transport
        server, _ = create_transport({kind!r}, {path!r}, num_slots=1, max_nbytes=1 << 16)
        print(os.getpid(), flush=True)
        sys.stdin.read()
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        address = format_address(kind, path)
        assert describe_address(address) == f"{path} belongs to a live server (pid {pid})"
        os.kill(pid, signal.SIGKILL)  # no cleanup: its files stay
        proc.wait(30)
        assert describe_address(address) == (
            f"{path} is a stale file of a server that is gone (pid {pid})"
        )
        collate = wrap_collate_function(_collate, Client(address, connect_timeout=0.3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(NoTeacherError, match=f"gone \\(pid {pid}\\).*start it again"):
                collate(ROWS)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in (path, path + ".lock"):
            if os.path.exists(p):
                os.unlink(p)


def test_the_end_of_a_process_reports_its_batches_without_a_teacher(short_tmp: str) -> None:
    address = format_address("unix_socket", os.path.join(short_tmp, "none.sock"))
    code = textwrap.dedent(
        f"""
        import warnings
        import numpy as np
        from sensai import Client, wrap_collate_function
        warnings.simplefilter("ignore")
        c = wrap_collate_function(lambda r: {{"input_ids": np.stack(r)}},
                                  Client({address!r}, connect_timeout=0.1), on_error="skip")
        for _ in range(2):
            c([np.arange(3)])
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "ends with 2 of its 2 batches without a teacher answer" in done.stderr, done.stderr


def test_on_error_must_be_raise_or_skip() -> None:
    with pytest.raises(ValueError, match="'raise', 'skip'"):
        wrap_collate_function(_collate, SensAIClient(None), on_error="ignore")
    with pytest.raises(TypeError, match="client endpoint"):
        wrap_collate_function(_collate, object())
