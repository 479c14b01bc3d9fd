"""The seed's names, signatures and messages, as its users call them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from sensai import SensAIClient, SensAIServer, wrap_collate_function
from sensai.errors import RoleError
from sensai.transports import connect, format_address
from sensai.utils import _request_teacher_logits_with_retry
from transport_helpers import ServerThread, answer_with, double

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_logits_server_imports_from_the_package_without_torch_on_import() -> None:
    code = (
        "import sys, sensai\n"
        "assert 'torch' not in sys.modules, 'import sensai imported torch'\n"
        "from sensai import TeacherLogitsServer\n"
        "from sensai.logits_server import TeacherLogitsServer as T\n"
        "assert TeacherLogitsServer is T and 'TeacherLogitsServer' in sensai.__all__\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


SEED_TRANSPORTS = [
    ("NamedPipeTransport", "named_pipe", "pipe_dir", "pipes"),
    ("UnixSocketTransport", "unix_socket", "socket_path", "s.sock"),
    ("SharedMemoryTransport", "shared_memory", "shm_path", "shm"),
]


@pytest.mark.parametrize(
    "name, kind, alias, leaf", SEED_TRANSPORTS, ids=[t[0] for t in SEED_TRANSPORTS]
)
def test_the_seeds_transport_classes_make_working_servers(
    name: str, kind: str, alias: str, leaf: str, short_tmp: str
) -> None:
    import sensai.transports as tr

    module = {"named_pipe": "named_pipe", "unix_socket": "unix_socket"}.get(kind, "shared_memory")
    star: dict[str, Any] = {}
    exec(f"from sensai.transports.{module} import *", star)  # noqa: S102 - the seed's import
    cls = getattr(tr, name)
    assert star[name] is cls
    path = os.path.join(short_tmp, leaf)
    server = cls(**{alias: path, "num_clients": 2})
    try:
        assert server.num_clients == server.num_slots == 2
        assert server.limits[0] == 64  # max_tensors: a batch of many fields fits
        with ServerThread(server, answer_with(double)):
            with connect(format_address(kind, path), connect_timeout=10) as c:
                xs = [np.full(3, i, np.float32) for i in range(20)]  # 20 tensors in one message
                for x, y in zip(xs, c.request(xs, timeout=10), strict=True):
                    np.testing.assert_array_equal(y, 2 * x)
    finally:
        server.close()
    # our keywords, and both names of the slot count, work too
    server = cls(path=path, num_slots=3)
    assert server.num_clients == 3
    server.close()
    with pytest.raises(TypeError, match="num_clients is the seed's name for num_slots"):
        cls(path=path, num_slots=3, num_clients=2)
    with pytest.raises(RoleError, match="connect"):
        cls(path=path, num_clients=1, is_server=False)


def test_the_seeds_shared_memory_max_elems_sets_the_buffer_size(short_tmp: str) -> None:
    from sensai.transports import SharedMemoryTransport

    path = os.path.join(short_tmp, "shm")
    server = SharedMemoryTransport(shm_path=path, num_clients=1, max_elems=1000, max_dtype=np.int64)
    try:
        assert server.limits[2] == 8000
    finally:
        server.close()


def test_process_slot_answers_one_request_and_says_whether_it_did(short_tmp: str) -> None:
    from sensai.transports import UnixSocketTransport

    path = os.path.join(short_tmp, "s.sock")
    server = UnixSocketTransport(socket_path=path, num_clients=1)
    try:
        loop = SensAIServer(server)
        assert loop.process_slot(0, lambda x: 2 * x) is False  # nothing pending
        got: list[Any] = []

        def client() -> None:  # the handshake and the request, while this thread serves
            with connect(format_address("unix_socket", path), connect_timeout=10) as c:
                got.append(c.request(np.arange(4), timeout=10))

        t = threading.Thread(target=client, daemon=True)
        t.start()
        assert server.wait_any(timeout=10) == [0]
        assert loop.process_slot(0, lambda x: 2 * x) is True
        assert loop.process_slot(0, lambda x: 2 * x) is False
        while t.is_alive():  # until the answer is read and the client hangs up
            server.wait_any(timeout=0)
            t.join(0.01)
        np.testing.assert_array_equal(got[0], 2 * np.arange(4))
    finally:
        server.close()


class _Scripted:
    """A seed-style client: ``send_tensor`` returns (or raises) the next scripted result."""

    def __init__(self, *results: Any) -> None:
        self.results = list(results)
        self.calls = 0
        self.lock = threading.Lock()

    def send_tensor(self, tensor: Any) -> Any:
        with self.lock:
            self.calls += 1
            r = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(r, BaseException):
            raise r
        return r(tensor) if callable(r) else r


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_the_wrapper_makes_one_attempt_plus_num_retries(retries: int) -> None:
    client = _Scripted(ConnectionError("down"))
    collate = wrap_collate_function(
        lambda b: {"input_ids": np.stack(b)}, client, num_retries=retries, retry_delay=0
    )
    with pytest.warns(RuntimeWarning) as record:
        batch = collate([np.arange(3), np.arange(3)])
    assert client.calls == 1 + retries
    assert "teacher_logits" not in batch
    texts = [str(w.message) for w in record]
    assert texts[-1].startswith(f"Failed to obtain teacher logits after {retries} retries.")
    assert f"failed after {1 + retries} attempts" in texts[-2]


@pytest.mark.parametrize(
    "bad",
    [None, np.array([-1]), np.array([]), "not an array", 3, [np.array([-1]), np.ones(2)], []],
    ids=["None", "[-1]", "empty", "str", "int", "list with [-1]", "empty list"],
)
def test_results_the_seed_counted_as_failures_give_none(bad: Any) -> None:
    client = _Scripted(bad)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _request_teacher_logits_with_retry(client, np.arange(4), 1, 0) is None
    assert client.calls == 2 and len(record) == 2
    assert "Teacher logits request failed" in str(record[0].message)


def test_torch_input_and_good_answers_come_back() -> None:
    ids = torch.arange(6).reshape(2, 3)
    client = _Scripted(lambda t: [np.asarray(t) * 2, np.ones(2, np.float32)])
    got = _request_teacher_logits_with_retry(client, ids, 2, 0)
    np.testing.assert_array_equal(got[0], 2 * ids.numpy())
    assert client.calls == 1


@pytest.mark.parametrize(
    "make, start",
    [
        (lambda b: [1, 2], "Collate function must return a dictionary."),
        (lambda b: {"x": 1}, "Batch must contain 'input_ids' key for teacher logits request."),
        (lambda b: {"input_ids": [1, 2]}, "input_ids must be numpy array or torch tensor"),
    ],
)
def test_the_seeds_error_messages_start_ours(make: Any, start: str) -> None:
    collate = wrap_collate_function(make, SensAIClient(None))
    with pytest.raises(ValueError) as ei:
        collate([0])
    assert str(ei.value).startswith(start), str(ei.value)
