"""Endpoints after fork(2): a child never uses, closes or frees what its parent opened.

A forked child (a DataLoader worker) holds copies of its parent's connection, slot and
shared mapping. Used from there, both processes count the same request ids, so each could
take the other's answer. A raw endpoint raises `ForkError` in the child; closing or dropping
the copy there gives back nothing of the parent's; the seed's `SensAIClient` and
`sensai.Client` open their own endpoint in each new process.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sensai import Client, SensAIClient, wrap_collate_function
from sensai.errors import CapacityError, ForkError
from sensai.transports import format_address
from test_client import VOCAB, FakeTeacher, _path, expected_output
from transport_helpers import KINDS, ServerThread, answer_with, double, make_client, make_server

FORK = multiprocessing.get_context("fork")
BATCHES = 200


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _in_child(fn: Any) -> tuple[str, str]:
    """Run ``fn()`` in a forked child; ``(exception class name or "ok", text)``."""
    recv, send = FORK.Pipe(duplex=False)

    def run() -> None:
        try:
            out = fn()
            send.send(("ok", repr(out)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            send.send((type(e).__name__, str(e)))

    p = FORK.Process(target=run)
    p.start()
    try:
        assert recv.poll(30), "the child said nothing"
        return recv.recv()
    finally:
        p.join(30)
        assert p.exitcode == 0, p.exitcode


def test_a_raw_client_used_in_a_forked_child_raises_fork_error(kind: str, short_tmp: str) -> None:
    path = _path(kind, short_tmp)
    server = make_server(kind, path, 2)
    with ServerThread(server, answer_with(double)):
        c = make_client(kind, path, 0)
        x = np.arange(16, dtype=np.float32)
        np.testing.assert_array_equal(c.request(x, timeout=10), 2 * x)

        def child() -> None:
            try:
                c.request(x + 1, timeout=10)
            finally:
                c.close()  # the parent's slot: given back by nothing done here

        name, text = _in_child(child)
        assert name == ForkError.__name__, (name, text)
        assert f"opened by process {os.getpid()}" in text and "forked" in text, text
        assert "Open a new endpoint in this process" in text, text
        # The parent's endpoint and slot are untouched: it is answered, slot 0 is still its own.
        for i in range(3):
            np.testing.assert_array_equal(c.request(x + i, timeout=10), 2 * (x + i))
        with pytest.raises(CapacityError):
            make_client(kind, path, 0)
        c.close()
    server.close()


def test_a_server_inherited_by_a_child_keeps_serving_the_parent(kind: str, short_tmp: str) -> None:
    path = _path(kind, short_tmp)
    server = make_server(kind, path, 1)

    def child() -> None:
        try:
            server.wait_any(timeout=0)
        finally:
            server.close()  # must not remove the parent's files or tell its clients anything

    name, text = _in_child(child)
    assert name == ForkError.__name__ and "wait_any" in text, (name, text)
    assert os.path.exists(path)
    with ServerThread(server, answer_with(double)):
        with make_client(kind, path, connect_timeout=10) as c:
            x = np.arange(8, dtype=np.float32)
            np.testing.assert_array_equal(c.request(x, timeout=10), 2 * x)
    server.close()


def test_a_message_a_child_drops_stays_the_parents(short_tmp: str) -> None:
    """A received shared-memory answer is a view of the slot's buffer: the child's copy of the
    message, dropped, must not free that buffer while the parent still reads it."""
    kind = "shared_memory"
    path = _path(kind, short_tmp)
    server = make_server(kind, path, 1)
    with ServerThread(server, answer_with(double)):
        c = make_client(kind, path)
        kept = [c.request(np.full(1024, 1.0, np.float32), timeout=10)]

        def child() -> None:
            kept.clear()  # the child's copy of the only reference: the message is dropped
            gc.collect()

        assert _in_child(child)[0] == "ok"
        for v in (2.0, 3.0, 4.0):  # answers that would land in a freed buffer
            np.testing.assert_array_equal(c.request(np.full(1024, v, np.float32)), 2 * v)
        np.testing.assert_array_equal(kept[0], np.full(1024, 2.0, np.float32))
        kept.clear()
        c.close()
    server.close()


def test_a_parents_close_frees_its_slot_while_its_forked_workers_live(
    kind: str, short_tmp: str
) -> None:
    """A worker that opened its own endpoint lets go of its copy of the parent's, so the
    server sees the parent's close at once, not when the last worker exits."""
    path = _path(kind, short_tmp)
    server = make_server(kind, path, 3)
    with ServerThread(server, answer_with(double)):
        client = SensAIClient(make_client(kind, path, 0))
        client.send_tensor(np.arange(3))
        ready, done = FORK.Event(), FORK.Event()

        def worker() -> None:
            client.send_tensor(np.arange(3))  # opens its own endpoint, drops the parent's
            gc.collect()
            ready.set()
            done.wait(60)

        p = FORK.Process(target=worker)
        p.start()
        try:
            assert ready.wait(30)
            client.transport.close()
            with make_client(kind, path, 0, connect_timeout=10) as again:  # slot 0 is free
                np.testing.assert_array_equal(again.request(np.ones(2), timeout=10), 2.0)
        finally:
            done.set()
            p.join(30)
    assert p.exitcode == 0
    server.close()


class _Rows(torch.utils.data.Dataset):
    """Row i holds 8 values that no other row holds (below ``vocab``, rows that differ from
    their neighbours), so a swapped answer shows."""

    def __init__(self, vocab: int | None = None) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return 2 * BATCHES

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.vocab is None:
            return torch.arange(8, dtype=torch.int64) + 8 * i
        return (torch.arange(8, dtype=torch.int64) * (i % 7 + 1) + i) % self.vocab


def _collate_rows(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack(rows)}


def _loader(collate: Any, vocab: int | None = None) -> DataLoader:
    return DataLoader(
        _Rows(vocab),
        batch_size=2,
        num_workers=4,
        collate_fn=collate,
        multiprocessing_context="fork",
    )


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_the_seeds_dataloader_pattern_gets_its_own_answer_in_every_worker(
    kind: str, short_tmp: str
) -> None:
    """``SensAIClient(connect(address, slot_id=0))`` in the collate wrapper, 4 fork workers:
    each worker opens its own endpoint (slot 0 is the parent's) and every batch carries the
    answer to its own rows."""
    path = _path(kind, short_tmp)
    server = make_server(kind, path, 5)
    with ServerThread(server, answer_with(double)) as st:
        from sensai.transports import connect

        client = SensAIClient(connect(format_address(kind, path), slot_id=0))
        np.testing.assert_array_equal(client.send_tensor(np.arange(3)), 2 * np.arange(3))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed request fails the test
            n = 0
            for batch in _loader(wrap_collate_function(_collate_rows, client, num_retries=1)):
                ids = batch["input_ids"].numpy()
                np.testing.assert_array_equal(batch["teacher_logits"], 2 * ids)
                n += 1
        assert n == BATCHES
        np.testing.assert_array_equal(client.send_tensor(np.arange(3)), 2 * np.arange(3))
        client.transport.close()
    assert not st.errors, st.errors
    server.close()


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_client_gets_its_own_answer_in_every_worker(kind: str, short_tmp: str) -> None:
    t = FakeTeacher(kind, _path(kind, short_tmp))
    try:
        with Client(t.address, slot_id=0, connect_timeout=10) as c:
            c.info()  # connected before the fork
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                n = 0
                collate = wrap_collate_function(_collate_rows, c, num_retries=1)
                for batch in _loader(collate, VOCAB):
                    want = expected_output("sampled", batch["input_ids"])
                    assert torch.equal(batch["teacher_logits_indices"], want.indices)
                    assert torch.equal(batch["teacher_logits_values"], want.values)
                    n += 1
            assert n == BATCHES
    finally:
        t.stop()
    assert not t.errors, t.errors
