"""The transports through the public API, written once and run against every kind in KINDS.

Servers run in a background thread of the test process (``ServerThread``) or in a child
process; clients run in the test process or in child processes. Every wait is bounded by an
event, a pipe or a timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import sensai
from sensai import SensAIClient, SensAIServer
from sensai.errors import (
    AddressInUseError,
    CapacityError,
    PeerGoneError,
    RemoteError,
    RoleError,
    SensAIError,
    TransportTimeout,
)
from sensai.transports import ClientMixin, Transport, create_transport
from sensai.utils import create_transport as seed_create_transport
from transport_helpers import (
    BIG_REQUEST,
    KINDS,
    MP,
    Procs,
    ServerThread,
    answer_with,
    answer_with_slot,
    big_or_echo,
    big_response_then_stop,
    client_process,
    double,
    hold_slot_process,
    ignore_requests,
    interrupted_request,
    interrupted_wait_any,
    make_client,
    make_server,
    other_user_connect,
    serve_process,
)

pytestmark = pytest.mark.timeout(30)

ERROR_CODES = sensai._core.ERROR_CODES

NOBODY = 65534
MP_SPAWN = multiprocessing.get_context("spawn")  # direct children, for waitpid


# --- fixtures --------------------------------------------------------------------------------


def recv_within(conn: Any, timeout: float) -> Any:
    assert conn.poll(timeout), f"no message from the child process within {timeout}s"
    return conn.recv()


class Echo:
    def __init__(self, client: Any, thread: ServerThread) -> None:
        self.client = client
        self.thread = thread

    def __call__(self, x: Any) -> tuple[Any, Any]:
        """Send ``x``; return (what the server received, what came back)."""
        out = self.client.request(x, timeout=5)
        return self.thread.received[-1], out


@pytest.fixture(scope="module", params=KINDS)
def echo(request: pytest.FixtureRequest) -> Iterator[Echo]:
    """One echo server (in a thread) and one client per kind, shared by the data tests."""
    d = tempfile.mkdtemp(prefix="sai-", dir="/tmp")
    p = os.path.join(d, "ep")
    server = make_server(request.param, p, 1)
    thread = ServerThread(server).start()
    client = make_client(request.param, p)
    try:
        yield Echo(client, thread)
    finally:
        client.close()
        thread.stop()
        server.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serving(kind: str, path: str) -> Iterator[Any]:
    """Factory: ``serving(num_slots=1, handler=None, **limits)`` -> a started ServerThread."""
    made: list[tuple[Any, ServerThread]] = []

    def make(num_slots: int = 1, handler: Any = None, **kwargs: Any) -> ServerThread:
        server = make_server(kind, path, num_slots, **kwargs)
        t = ServerThread(server, handler).start()
        made.append((server, t))
        return t

    yield make
    for server, t in made:
        try:
            t.stop()
        finally:
            server.close()


# --- data: dtypes, shapes, lists, views --------------------------------------------------------

NUMPY_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
]


def sample(dtype: Any, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Values that exercise the whole range of ``dtype`` (extremes, nan, -0.0)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt == np.bool_:
        vals = np.arange(n) % 3 == 0
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        base = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
        vals = np.array([base[i % len(base)] for i in range(n)], dtype=dt)
    else:
        info = np.finfo(dt)
        base = [-np.inf, np.inf, np.nan, info.max, info.tiny, -0.0, 1.5, -2.25]
        vals = np.array([base[i % len(base)] for i in range(n)], dtype=dt)
    return np.asarray(vals, dtype=dt).reshape(shape)


def assert_same(got: Any, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_single_array(echo: Echo, dtype: Any) -> None:
    x = sample(dtype, (2, 3))
    seen, out = echo(x)
    assert not isinstance(seen, list) and not isinstance(out, list)
    assert_same(seen, x)
    assert_same(out, x)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_zero_dim_arrays(echo: Echo, dtype: Any) -> None:
    x = sample(dtype, (1,)).reshape(())
    seen, out = echo(x)
    assert_same(seen, x)
    assert_same(out, x)


def test_numpy_scalar_comes_back_as_zero_dim_array(echo: Echo) -> None:
    _, out = echo(np.float32(1.5))
    assert_same(out, np.array(1.5, dtype=np.float32))


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2)])
@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int64, np.float16, np.float64])
def test_empty_arrays(echo: Echo, shape: tuple[int, ...], dtype: Any) -> None:
    x = np.zeros(shape, dtype=dtype)
    seen, out = echo(x)
    assert_same(seen, x)
    assert_same(out, x)


def bf16(shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    vals = torch.tensor([1.0, -2.5, 3.0e38, float("inf"), 0.0078125, -0.0][: max(n, 1)] * n)[:n]
    return vals.reshape(shape).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(3, 4), (), (0,), (3, 0, 2)])
def test_bfloat16_torch_tensor(echo: Echo, shape: tuple[int, ...]) -> None:
    t = bf16(shape)
    seen, out = echo(t)
    for got in (seen, out):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == torch.bfloat16
        assert tuple(got.shape) == shape
        assert torch.equal(got.view(torch.int16), t.view(torch.int16))


def test_every_dtype_in_few_messages(echo: Echo) -> None:
    """All 13 dtypes in as few multi-tensor messages as the transport's max_tensors allows."""
    max_tensors = echo.client.limits[0]
    tensors: list[Any] = [sample(d, (i + 1, 2)) for i, d in enumerate(NUMPY_DTYPES)]
    tensors.insert(3, bf16((2, 5)))
    for k in range(0, len(tensors), max_tensors):
        msg = tensors[k : k + max_tensors]
        seen, out = echo(msg)
        for got in (seen, out):
            assert isinstance(got, list) and len(got) == len(msg)
            for g, want in zip(got, msg, strict=True):
                if isinstance(want, torch.Tensor):
                    assert isinstance(g, torch.Tensor) and g.dtype == torch.bfloat16
                    assert torch.equal(g, want)
                else:
                    assert_same(g, want)


def test_single_in_single_out_list_in_list_out(echo: Echo) -> None:
    x = np.arange(6, dtype=np.int32)
    _, out = echo(x)
    assert isinstance(out, np.ndarray)
    seen, out = echo([x])
    assert isinstance(seen, list) and len(seen) == 1
    assert isinstance(out, list) and len(out) == 1
    assert_same(out[0], x)
    _, out = echo((x, x[:2]))  # a tuple counts as a list
    assert isinstance(out, list) and len(out) == 2
    assert_same(out[1], x[:2])
    _, out = echo([x, np.zeros((0,), np.float32), np.array(3, np.uint8), x.reshape(2, 3)])
    assert [o.shape for o in out] == [(6,), (0,), (), (2, 3)]


def _views() -> list[tuple[str, np.ndarray]]:
    a = np.arange(4 * 6 * 5, dtype=np.float64).reshape(4, 6, 5)
    return [
        ("transposed", a.T),
        ("strided", a[::2, 1::3]),
        ("reversed", a[::-1, :, ::-1]),
        ("column", a[:, 2, 3]),
        ("fortran", np.asfortranarray(a)),
        ("int8 stride", np.arange(40, dtype=np.int8)[::3]),
    ]


@pytest.mark.parametrize("name,view", _views(), ids=[n for n, _ in _views()])
def test_non_contiguous_input(echo: Echo, name: str, view: np.ndarray) -> None:
    assert not view.flags.c_contiguous
    seen, out = echo(view)
    assert seen.flags.c_contiguous and out.flags.c_contiguous
    assert_same(seen, np.ascontiguousarray(view))
    assert_same(out, np.ascontiguousarray(view))


def test_big_endian_input_arrives_as_values(echo: Echo) -> None:
    x = np.arange(10, dtype=">i4") - 5
    _, out = echo(x)
    np.testing.assert_array_equal(out, x)
    assert out.dtype == np.int32


def test_torch_tensors_accepted(echo: Echo) -> None:
    f = torch.linspace(-1, 1, 12).reshape(3, 4)
    i = torch.arange(10, dtype=torch.int64)
    nc = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # non-contiguous
    assert not nc.is_contiguous()
    _, out = echo([f, i, nc, np.ones(2, np.float16)])
    assert_same(out[0], f.numpy())
    assert_same(out[1], i.numpy())
    assert_same(out[2], nc.contiguous().numpy())
    assert_same(out[3], np.ones(2, np.float16))
    _, out = echo(torch.tensor([True, False, True]))
    assert_same(out, np.array([True, False, True]))


def test_builtin_endpoints_are_transports(echo: Echo) -> None:
    assert isinstance(echo.client, Transport)
    assert isinstance(echo.thread.server, Transport)
    assert echo.client.supports_multi_tensor() and echo.thread.server.supports_multi_tensor()


def test_invalid_input_refused_before_sending(echo: Echo) -> None:
    n = len(echo.thread.received)
    for bad in (object(), np.array(["a"]), np.zeros(2, np.complex128), [np.zeros(1), "x"]):
        with pytest.raises(TypeError):
            echo.client.request(bad, timeout=5)
    with pytest.raises(ValueError):
        echo.client.request(np.zeros(1), timeout=-1)
    assert len(echo.thread.received) == n  # nothing reached the server
    _, out = echo(np.arange(2))
    assert_same(out, np.arange(2))


# --- processes, slots ---------------------------------------------------------------------------


@pytest.mark.parametrize("slots", ["leased", "explicit"])
def test_several_client_processes_at_once(kind: str, path: str, procs: Procs, slots: str) -> None:
    n_clients = 3
    ready, got = MP.Event(), MP.Event()
    procs.start(serve_process, kind, path, n_clients, "double", ready, got)
    assert ready.wait(10), "server process did not start"
    barrier = MP.Barrier(n_clients)
    conns = []
    for seed in range(n_clients):
        mine, theirs = procs.pipe()
        slot_id = None if slots == "leased" else n_clients - 1 - seed
        procs.start(client_process, kind, path, slot_id, seed, 20, barrier, theirs)
        theirs.close()
        conns.append(mine)
    results = [recv_within(c, 20) for c in conns]
    assert all(r[0] == "ok" for r in results), results
    assert sorted(r[1] for r in results) == list(range(n_clients))
    if slots == "explicit":
        assert [r[1] for r in results] == [2, 1, 0]
    for p in procs.items[1:]:
        p.join(5)
        assert p.exitcode == 0


def test_explicit_and_leased_slots(kind: str, path: str, serving: Any) -> None:
    t = serving(3, answer_with_slot)
    c1 = make_client(kind, path, 1)
    a = make_client(kind, path, None)
    b = make_client(kind, path, None)
    assert c1.slot_id == 1
    assert {a.slot_id, b.slot_id} == {0, 2}
    for c in (c1, a, b):
        x = np.arange(5) + 10 * c.slot_id
        out = c.request(x, timeout=5)
        np.testing.assert_array_equal(out[0], x)
        assert int(out[1]) == c.slot_id  # the server saw it on this client's slot
    with pytest.raises(CapacityError):
        make_client(kind, path, None, connect_timeout=2)
    with pytest.raises(CapacityError, match="slot 1"):
        make_client(kind, path, 1, connect_timeout=2)
    with pytest.raises(ValueError, match="slot 3 is out of range"):
        make_client(kind, path, 3, connect_timeout=2)
    # Closing a client frees its slot (once the server has seen it go).
    freed = t.watch(lambda s: not s.is_connected(1))
    c1.close()
    assert freed.wait(5), "the server never noticed the closed client"
    c = make_client(kind, path, None)
    assert c.slot_id == 1
    assert int(c.request(np.zeros(1), timeout=5)[1]) == 1
    for x in (a, b, c):
        x.close()


def test_slot_out_of_range_is_the_same_value_error_everywhere(
    kind: str, path: str, serving: Any, short_tmp: str
) -> None:
    """A slot id past the server's last slot, or negative, is one error on every transport,
    from a connecting client and from every per-slot server method alike: a ``ValueError``
    (a bad argument, not a ``SensAIError``) naming the slot asked for and the valid ids."""
    serving(2, answer_with_slot)

    def expect(err: pytest.ExceptionInfo[ValueError], slot: int, at: str, valid: str) -> None:
        assert type(err.value) is ValueError, repr(err.value)
        assert str(err.value) == (
            f"invalid argument: slot {slot} is out of range for the server at {at}: {valid}"
        )

    for slot in (2, 7, 1 << 40):
        with pytest.raises(ValueError) as err:
            make_client(kind, path, slot, connect_timeout=5)
        expect(err, slot, path, "it has 2 slots, ids 0 to 1")
    with pytest.raises(ValueError) as err:
        make_client(kind, path, -1, connect_timeout=5)
    expect(err, -1, path, "slot ids start at 0")
    # The refusals cost the server nothing: both slots still serve.
    for slot in (0, 1):
        with make_client(kind, path, slot) as c:
            assert int(c.request(np.zeros(1), timeout=5)[1]) == slot

    # Server side (a second server, called from this thread only).
    other = os.path.join(short_tmp, "other")
    server = make_server(kind, other, 1)
    try:
        calls = {
            "is_ready_slot": lambda s: server.is_ready_slot(s),
            "is_connected": lambda s: server.is_connected(s),
            "read_tensor_slot": lambda s: server.read_tensor_slot(s),
            "write_tensor_slot": lambda s: server.write_tensor_slot(s, np.zeros(1)),
            "send_error": lambda s: server.send_error(s, ERROR_CODES["BAD_REQUEST"], "no"),
        }
        if kind == "shared_memory":
            calls["reserve"] = lambda s: server._core.reserve(s, [("float32", [1])])
        for name, call in calls.items():
            for slot in (1, 5, -1):
                with pytest.raises(ValueError) as err:
                    call(slot)
                try:
                    expect(err, slot, other, "it has 1 slot, id 0")
                except AssertionError as e:
                    raise AssertionError(f"{name}({slot}): {e}") from None
        assert server.is_connected(0) is False
    finally:
        server.close()


@pytest.mark.timeout(20)
def test_slot_reusable_immediately_after_close(
    kind: str, path: str, serving: Any, request: Any
) -> None:
    """A client that closes and a new one that connects at once (a DataLoader worker restart).

    Up to 200 close/connect cycles, for at most 2 s.
    """
    serving(1)
    failures, cycles = [], 0
    end = time.monotonic() + 2.0
    while cycles < 200 and time.monotonic() < end:
        try:
            with make_client(kind, path, None, connect_timeout=2) as c:
                out = c.request(np.array([cycles]), timeout=5)
                np.testing.assert_array_equal(out, [cycles])
        except SensAIError as e:
            failures.append(f"cycle {cycles}: {type(e).__name__}: {e}")
        cycles += 1
    assert not failures, f"{len(failures)}/{cycles} reconnects refused; first: {failures[0]}"


def test_killed_client_frees_its_leased_slot(
    kind: str, path: str, serving: Any, procs: Procs
) -> None:
    t = serving(1)
    mine, theirs = procs.pipe()
    p = procs.start(hold_slot_process, kind, path, None, theirs)
    theirs.close()
    assert recv_within(mine, 10) == ("held", 0, [0, 1, 2, 3])
    with pytest.raises(CapacityError):
        make_client(kind, path, None, connect_timeout=2)
    with pytest.raises(CapacityError):
        make_client(kind, path, 0, connect_timeout=2)
    freed = t.watch(lambda s: not s.is_connected(0))
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    assert p.exitcode == -signal.SIGKILL
    assert freed.wait(5), "the server never noticed the killed client"
    with make_client(kind, path, None) as c:
        assert c.slot_id == 0
        np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), np.arange(3))
        # The killed client died holding its answer (a view, on shared memory): the slot
        # still works at full depth, two requests in flight.
        c.write_tensor(np.arange(2))
        c.write_tensor(np.arange(3))
        np.testing.assert_array_equal(c.read_tensor(timeout=5), np.arange(2))
        np.testing.assert_array_equal(c.read_tensor(timeout=5), np.arange(3))


# --- shared memory only: zero copy, in-place responses, ring depth --------------------------------

SHM = "shared_memory"


def test_shared_memory_reserve_fill_publish_in_place(path: str) -> None:
    """The typical teacher response, written in place into the shared buffer by torch."""
    shape = (8, 511, 256)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50_000, shape, dtype=torch.int64, generator=g)
    val = torch.randn(shape, generator=g)

    def handler(server: Any, slot: int) -> None:
        x = server.read_tensor_slot(slot)
        if x is None:
            return
        assert x.shape == (8, 512)
        r = server.reserve_slot(slot, [("int64", shape), ("float32", shape)])
        a, b = r.arrays()
        assert a.shape == shape and a.dtype == np.int64 and a.flags.writeable
        assert b.shape == shape and b.dtype == np.float32
        assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0
        torch.from_numpy(a).copy_(idx)
        torch.from_numpy(b).copy_(val)
        server.publish(r)
        assert r.done

    server = make_server(SHM, path, 1, max_nbytes=16 << 20)
    with ServerThread(server, handler):
        with make_client(SHM, path) as c:
            out = c.request(np.zeros((8, 512), np.int64), timeout=10)
            assert isinstance(out, list) and len(out) == 2
            assert all(isinstance(o.base, sensai._core.Message) for o in out)  # zero copy
            assert torch.equal(torch.from_numpy(out[0]), idx)
            assert torch.equal(torch.from_numpy(out[1]), val)
            del out
    server.close()


def test_shared_memory_view_kept_alive_stays_intact(path: str) -> None:
    """A received array is a view of the shared buffer, valid for as long as it lives."""
    server = make_server(SHM, path, 1, max_nbytes=1 << 20)  # ring depth 2
    want = np.arange(1000, dtype=np.int64)
    with ServerThread(server):
        with make_client(SHM, path) as c:
            first = c.request(want, timeout=5)
            assert isinstance(first.base, sensai._core.Message)  # no copy
            for i in range(2, 8):
                out = c.request(want * i, timeout=5)
                assert isinstance(out.base, sensai._core.Message)
                np.testing.assert_array_equal(out, want * i)
                if i == 7:
                    # Two live views hold both response buffers: no room for an answer.
                    with pytest.raises(CapacityError, match="held"):
                        c.request(want, timeout=5)
                del out
            np.testing.assert_array_equal(first, want)
        # The closed client's view stays valid, and its slot is free at once.
        with make_client(SHM, path, 0, connect_timeout=2) as c2:
            np.testing.assert_array_equal(c2.request(np.arange(3), timeout=5), np.arange(3))
        np.testing.assert_array_equal(first, want)
    server.close()
    np.testing.assert_array_equal(first, want)  # still mapped after the server is gone


def test_shared_memory_abandoned_requests_do_not_wedge_the_client(path: str) -> None:
    """Ring depth 2, two requests time out: their late answers must not block the slot."""
    held: list[np.ndarray] = []

    def hold_negative(server: Any, slot: int) -> None:
        x = server.read_tensor_slot(slot)
        if x is None:
            return
        if int(x[0]) < 0:
            held.append(np.array(x, copy=True))  # answered later, by answer_held
        else:
            server.write_tensor_slot(slot, x)

    release = threading.Event()

    def answer_held(server: Any) -> bool:
        if not release.is_set() or len(held) < 2:
            return False
        for h in held:
            server.write_tensor_slot(0, h)
        held.clear()
        return True

    server = make_server(SHM, path, 1, max_nbytes=1 << 20, ring_depth=2)
    t = ServerThread(server, hold_negative)
    answered = t.watch(answer_held)
    with t, make_client(SHM, path) as c:
        for v in (-1, -2):
            with pytest.raises(TransportTimeout):
                c.request(np.array([v]), timeout=0.2)
        # Both response buffers are owed to abandoned requests: a request waits for their
        # late answers within its own timeout (it does not fail at once, nor hang).
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout, match="abandoned"):
            c.request(np.array([3]), timeout=0.3)
        assert 0.29 <= time.monotonic() - t0 < 1.3
        release.set()
        assert answered.wait(5), "the server never answered the held requests"
        # The late answers are discarded, never taken for later ones; the slot is whole again.
        for i in range(5):
            assert c.request(np.array([i]), timeout=5).tolist() == [i]
        c.write_tensor(np.array([10]))
        c.write_tensor(np.array([11]))
        assert c.read_tensor(timeout=5).tolist() == [10]
        assert c.read_tensor(timeout=5).tolist() == [11]
    server.close()


# --- capacity -----------------------------------------------------------------------------------

LIMIT = 64 << 10


def test_request_over_limit_raises_and_slot_stays_usable(
    kind: str, path: str, serving: Any
) -> None:
    t = serving(1, max_nbytes=LIMIT)
    with make_client(kind, path) as c:
        assert c.limits[2] == LIMIT
        max_tensors, max_dims, _ = c.limits
        too_big = [
            np.zeros(LIMIT + 1, np.uint8),
            [np.zeros(LIMIT // 2 + 8, np.uint8), np.zeros(LIMIT // 2, np.uint8)],  # the sum
            [np.zeros(1)] * (max_tensors + 1),
            np.zeros([1] * (max_dims + 1)),
        ]
        for x in too_big:
            with pytest.raises(CapacityError):
                c.request(x, timeout=5)
            # The slot stays usable: the next request goes through.
            np.testing.assert_array_equal(c.request(np.arange(4), timeout=5), np.arange(4))
        exactly = np.full(LIMIT, 3, np.uint8)
        assert_same(c.request(exactly, timeout=5), exactly)
        with pytest.raises(CapacityError, match=str(LIMIT)):
            c.write_tensor(np.zeros(LIMIT + 8, np.uint8))
        np.testing.assert_array_equal(c.request(np.arange(2), timeout=5), np.arange(2))
    # The server never saw any of the refused messages.
    assert [np.asarray(r).nbytes for r in t.received] == [32] * 4 + [LIMIT] + [16]


def test_response_over_limit_then_error_frame(kind: str, path: str, serving: Any) -> None:
    server_saw: list[BaseException] = []

    def handler(server: Any, slot: int) -> None:
        x = server.read_tensor_slot(slot)
        if x is None:
            return
        if x.size == 1 and x[0] == BIG_REQUEST:
            try:
                server.write_tensor_slot(slot, np.zeros(LIMIT + 1, np.uint8))
            except CapacityError as e:
                server_saw.append(e)
                server.send_error(slot, ERROR_CODES["CAPACITY"], f"response too large: {e}")
                return
        server.write_tensor_slot(slot, x)

    serving(1, handler, max_nbytes=LIMIT)
    with make_client(kind, path) as c:
        with pytest.raises(RemoteError) as ei:
            c.request(np.array([BIG_REQUEST]), timeout=5)
        assert ei.value.code == ERROR_CODES["CAPACITY"]
        assert "response too large" in ei.value.message
        assert len(server_saw) == 1 and isinstance(server_saw[0], CapacityError)
        np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), np.arange(3))


# --- roles --------------------------------------------------------------------------------------


def test_role_violations(kind: str, path: str, serving: Any) -> None:
    t = serving(2)
    server = t.server
    x = np.arange(3)
    with make_client(kind, path, 0) as c:
        with pytest.raises(RoleError):
            c.wait_any(0)
        with pytest.raises(RoleError):
            c.write_tensor_slot(1, x)
        with pytest.raises(RoleError):
            c.read_tensor_slot(1)
        with pytest.raises(RoleError):
            c.is_ready_slot(1)
        with pytest.raises(RoleError):
            c.send_error(0, 1, "clients cannot send errors")
        with pytest.raises(RoleError):
            server.write_tensor(x)
        with pytest.raises(RoleError):
            server.read_tensor()
        with pytest.raises(RoleError):
            server.request(x)
        # Nothing reached the server, and the client still works.
        assert t.received == []
        np.testing.assert_array_equal(c.request(x, timeout=5), x)
        c.write_tensor_slot(0, x)  # its own slot is fine
        np.testing.assert_array_equal(c.read_tensor(timeout=5), x)


# --- liveness -----------------------------------------------------------------------------------


def test_stopped_client_does_not_block_others(
    kind: str, path: str, serving: Any, procs: Procs
) -> None:
    serving(2, answer_with(big_or_echo))
    nbytes = 8 << 20
    mine, theirs = procs.pipe()
    # A direct child (spawn), so that waitpid can confirm it stopped.
    a = procs.start(big_response_then_stop, kind, path, nbytes, theirs, ctx=MP_SPAWN)
    theirs.close()
    assert recv_within(mine, 20)[0] == "sent"
    _, status = os.waitpid(a.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    try:
        with make_client(kind, path) as b:
            t0 = time.monotonic()
            for i in range(10):
                x = np.full(1000, i, np.int32)
                np.testing.assert_array_equal(b.request(x, timeout=5), x)
            assert time.monotonic() - t0 < 5
    finally:
        os.kill(a.pid, signal.SIGCONT)
    # The stopped client still gets its whole answer once it runs again.
    assert recv_within(mine, 15) == ("ok",)
    a.join(5)
    assert a.exitcode == 0


@pytest.mark.parametrize("timeout", [3.0, None], ids=["timeout3s", "no-timeout"])
def test_client_whose_server_dies(
    kind: str, path: str, procs: Procs, timeout: float | None
) -> None:
    ready, got = MP.Event(), MP.Event()
    server = procs.start(serve_process, kind, path, 1, "silent", ready, got)
    assert ready.wait(10)
    c = make_client(kind, path)

    def kill_when_waiting() -> None:
        if got.wait(10):
            os.kill(server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_waiting, daemon=True)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises((PeerGoneError, TransportTimeout) if timeout else PeerGoneError) as ei:
        c.request(np.arange(3), timeout=timeout)
    elapsed = time.monotonic() - t0
    assert got.is_set(), "the server never received the request"
    assert elapsed < (timeout or 4.0) + 1.0, f"{type(ei.value).__name__} after {elapsed:.2f}s"
    killer.join(5)
    c.close()


def test_connect_without_server_fails_within_timeout(kind: str, path: str) -> None:
    t0 = time.monotonic()
    with pytest.raises((PeerGoneError, TransportTimeout)):
        make_client(kind, path, None, connect_timeout=0.3)
    assert time.monotonic() - t0 < 1.3


def test_server_close_ends_waiting_client(kind: str, path: str) -> None:
    server = make_server(kind, path, 1)
    t = ServerThread(server, ignore_requests).start()
    c = make_client(kind, path)
    c.write_tensor(np.arange(3))
    t.stop()
    server.close()
    t0 = time.monotonic()
    with pytest.raises((PeerGoneError, TransportTimeout)):
        c.read_tensor(timeout=3)
    assert time.monotonic() - t0 < 4
    c.close()


# --- security, ownership of paths ----------------------------------------------------------------


def _other_user_result(kind: str, path: str, procs: Procs) -> tuple[str, str]:
    mine, theirs = procs.pipe()
    p = procs.start(other_user_connect, kind, path, NOBODY, theirs)
    theirs.close()
    res = recv_within(mine, 10)
    p.join(5)
    return res


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_other_user_cannot_connect(
    kind: str, path: str, short_tmp: str, serving: Any, procs: Procs
) -> None:
    serving(2)
    os.chmod(short_tmp, 0o755)  # only the transport's own modes stand in the way
    res = _other_user_result(kind, path, procs)
    assert res[0] == "refused", res
    with make_client(kind, path) as c:  # the server is unharmed
        np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), np.arange(3))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_unix_socket_checks_peer_uid(short_tmp: str, procs: Procs) -> None:
    """With the file modes widened on purpose, SO_PEERCRED still refuses another user."""
    path = os.path.join(short_tmp, "ep")
    server = make_server("unix_socket", path, 2)
    with ServerThread(server):
        os.chmod(short_tmp, 0o755)
        os.chmod(path, 0o666)
        os.chmod(path + ".lock", 0o644)
        res = _other_user_result("unix_socket", path, procs)
        assert res[0] == "refused", res
        with make_client("unix_socket", path) as c:
            np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), np.arange(3))
    server.close()


def _tree(root: str) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mode
    return out


def test_file_modes(kind: str, path: str, short_tmp: str, serving: Any) -> None:
    serving(2)
    with make_client(kind, path):
        tree = _tree(short_tmp)
    assert tree, "the server created no files"
    for name, mode in tree.items():  # nothing is open to group or others
        assert mode & 0o077 == 0, f"{name}: {oct(mode)}"
    if kind == "unix_socket":
        assert stat.S_ISSOCK(tree["ep"]) and stat.S_IMODE(tree["ep"]) == 0o600
        assert stat.S_IMODE(tree["ep.lock"]) == 0o600
    elif kind == "named_pipe":
        assert stat.S_ISDIR(tree["ep"]) and stat.S_IMODE(tree["ep"]) == 0o700
        fifos = [n for n, m in tree.items() if stat.S_ISFIFO(m)]
        assert len(fifos) == 4  # a request and a response FIFO per slot
        for name, mode in tree.items():
            if name != "ep":
                assert stat.S_IMODE(mode) == 0o600, f"{name}: {oct(mode)}"


def test_second_server_on_live_path(kind: str, path: str, serving: Any, procs: Procs) -> None:
    serving(1)
    with pytest.raises(AddressInUseError):
        make_server(kind, path, 1)
    with make_client(kind, path) as c:  # the refused server removed nothing
        np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), np.arange(3))
    # The same from another process.
    other = os.path.join(os.path.dirname(path), "ep2")
    ready, got = MP.Event(), MP.Event()
    procs.start(serve_process, kind, other, 1, "double", ready, got)
    assert ready.wait(10)
    with pytest.raises(AddressInUseError):
        make_server(kind, other, 1)
    with make_client(kind, other) as c:
        np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), 2 * np.arange(3))


def test_stale_path_of_killed_server_is_replaced(
    kind: str, path: str, short_tmp: str, procs: Procs
) -> None:
    ready, got = MP.Event(), MP.Event()
    p = procs.start(serve_process, kind, path, 1, "double", ready, got)
    assert ready.wait(10)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    assert os.path.exists(path), "a SIGKILLed server cannot have removed its files"
    server = make_server(kind, path, 1)
    with ServerThread(server):
        with make_client(kind, path) as c:
            np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), np.arange(3))
    server.close()
    assert os.listdir(short_tmp) == []


def test_a_client_waits_on_a_stale_shm_file_as_on_a_missing_one(path: str, procs: Procs) -> None:
    ready, got = MP.Event(), MP.Event()
    p = procs.start(serve_process, SHM, path, 1, "double", ready, got)
    assert ready.wait(10)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    assert os.path.exists(path), "a SIGKILLed server cannot have removed its file"
    # No server comes: the client fails at its deadline, not at once, naming the dead pid.
    t0 = time.monotonic()
    with pytest.raises(PeerGoneError, match=f"pid {p.pid}\\) that created .* is gone"):
        make_client(SHM, path, None, connect_timeout=0.5)
    assert time.monotonic() - t0 >= 0.5
    # A server that comes up 1 s after the client started waiting is found.
    result: dict[str, Any] = {}

    def connect_and_ask() -> None:
        try:
            with make_client(SHM, path, None, connect_timeout=5) as c:
                result["connected_after"] = time.monotonic() - started
                result["answer"] = c.request(np.arange(3), timeout=5)
        except SensAIError as e:
            result["error"] = e

    started = time.monotonic()
    client = threading.Thread(target=connect_and_ask)
    client.start()
    time.sleep(1.0)  # the scenario itself (a restart 1 s later), not a synchronisation
    server = make_server(SHM, path, 1)
    with ServerThread(server):
        client.join(10)
    server.close()
    assert not client.is_alive()
    assert "error" not in result, result.get("error")
    assert 1.0 <= result["connected_after"] < 3.0, result
    np.testing.assert_array_equal(result["answer"], np.arange(3))


def test_close_removes_files_clients_never_do(
    kind: str, path: str, short_tmp: str, procs: Procs
) -> None:
    server = make_server(kind, path, 2)
    t = ServerThread(server).start()
    before = _tree(short_tmp)
    assert before
    with make_client(kind, path) as c:
        c.request(np.arange(3), timeout=5)
    assert _tree(short_tmp) == before
    # A client process that dies leaves them alone too.
    mine, theirs = procs.pipe()
    p = procs.start(hold_slot_process, kind, path, None, theirs)
    theirs.close()
    assert recv_within(mine, 10)[0] == "held"
    p.kill()
    p.join(5)
    assert _tree(short_tmp) == before
    t.stop()
    server.close()
    assert server.closed
    assert os.listdir(short_tmp) == []
    server.close()  # idempotent


# --- serving loop, user transports ----------------------------------------------------------------


def test_run_loop_reports_handler_errors(kind: str, path: str) -> None:
    def fn(x: Any) -> Any:
        if isinstance(x, np.ndarray) and x.size and x.min() < 0:
            raise ValueError(f"negative input: {x.min()}")
        if isinstance(x, np.ndarray) and x.size == 0:
            return {"not": "a tensor"}
        return double(x)

    server = make_server(kind, path, 1)
    loop = SensAIServer(server)
    th = threading.Thread(target=loop.run_loop, args=(fn,), daemon=True)
    th.start()
    try:
        with make_client(kind, path) as c:
            client = SensAIClient(c)
            np.testing.assert_array_equal(client.send_tensor(np.arange(3), timeout=5), [0, 2, 4])
            with pytest.raises(RemoteError, match="negative input: -4") as ei:
                client.send_tensor(np.array([1, -4]), timeout=5)
            assert ei.value.code == ERROR_CODES["INTERNAL"]
            out = client.send_tensor([np.arange(2), np.ones(1)], timeout=5)
            assert isinstance(out, list)
            np.testing.assert_array_equal(out[0], [0, 2])
            with pytest.raises(RemoteError, match="must return an array"):
                client.send_tensor(np.zeros(0), timeout=5)
            np.testing.assert_array_equal(client.send_tensor(np.arange(2), timeout=5), [0, 2])
    finally:
        loop.stop()
        th.join(5)
        server.close()
    assert not th.is_alive()


class QueueServer(Transport):
    """A pure-Python, in-memory, one-slot transport (server side)."""

    def __init__(self) -> None:
        super().__init__("memory://test", is_server=True)
        self.requests: list[Any] = []
        self.responses: list[Any] = []
        self._lock = threading.Lock()
        self.closed = False

    def is_ready_slot(self, slot_id: int) -> bool:
        with self._lock:
            return bool(self.requests)

    def read_tensor_slot(self, slot_id: int) -> Any:
        with self._lock:
            return self.requests.pop(0) if self.requests else None

    def write_tensor_slot(self, slot_id: int, tensor: Any) -> None:
        with self._lock:
            self.responses.append(tensor)

    def close(self) -> None:
        self.closed = True


class QueueClient(ClientMixin, Transport):
    """The client side of :class:`QueueServer`."""

    def __init__(self, server: QueueServer) -> None:
        super().__init__(server.path)
        self.server = server
        self.slot_id = 0

    def is_ready_slot(self, slot_id: int) -> bool:
        with self.server._lock:
            return bool(self.server.responses)

    def read_tensor_slot(self, slot_id: int) -> Any:
        with self.server._lock:
            return self.server.responses.pop(0) if self.server.responses else None

    def write_tensor_slot(self, slot_id: int, tensor: Any) -> None:
        with self.server._lock:
            self.server.requests.append(tensor)

    def close(self) -> None:
        pass


def test_python_transport_under_serving_loop() -> None:
    server = QueueServer()
    loop = SensAIServer(server)
    th = threading.Thread(target=loop.serve_forever, args=(double,), kwargs={"poll_timeout": 0.05})
    th.start()
    try:
        with QueueClient(server) as t:
            client = SensAIClient(t)
            np.testing.assert_array_equal(client.send_tensor(np.arange(3)), [0, 2, 4])
            out = client.send_tensor([np.ones(2), np.arange(3, dtype=np.int64)])
            assert isinstance(out, list)
            np.testing.assert_array_equal(out[0], [2, 2])
            np.testing.assert_array_equal(out[1], [0, 2, 4])
    finally:
        loop.stop()
        th.join(5)
    assert not th.is_alive()
    assert server.requests == [] and server.responses == []


# --- interrupts and timeouts ----------------------------------------------------------------------


def test_request_interrupted_by_sigint(kind: str, path: str, serving: Any, procs: Procs) -> None:
    serving(1, ignore_requests)
    mine, theirs = procs.pipe()
    p = procs.start(interrupted_request, kind, path, theirs)
    theirs.close()
    what, latency = recv_within(mine, 10)
    assert what == "KeyboardInterrupt", what
    assert latency < 1.0, f"KeyboardInterrupt {latency:.3f}s after SIGINT"
    p.join(5)


def test_wait_any_interrupted_by_sigint(kind: str, path: str, procs: Procs) -> None:
    mine, theirs = procs.pipe()
    p = procs.start(interrupted_wait_any, kind, path, theirs)
    theirs.close()
    what, latency = recv_within(mine, 10)
    assert what == "KeyboardInterrupt", what
    assert latency < 1.0, f"KeyboardInterrupt {latency:.3f}s after SIGINT"
    p.join(5)
    assert not os.path.exists(path), "the interrupted server did not clean up on close"


def test_wait_any_timeouts(kind: str, path: str) -> None:
    with make_server(kind, path, 2) as server:
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout) as ei:
            server.wait_any(timeout=0.2)
        elapsed = time.monotonic() - t0
        assert isinstance(ei.value, TimeoutError)
        assert 0.19 <= elapsed < 0.8, elapsed
        t0 = time.monotonic()
        assert server.wait_any(timeout=0) == []
        assert time.monotonic() - t0 < 0.05
        with pytest.raises(ValueError):
            server.wait_any(timeout=-1)


def test_request_timeout(kind: str, path: str, serving: Any) -> None:
    serving(1, ignore_requests)
    with make_client(kind, path) as c:
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout):
            c.request(np.arange(3), timeout=0.3)
        assert 0.29 <= time.monotonic() - t0 < 1.3


def test_late_answer_is_not_taken_for_the_next_request(kind: str, path: str, serving: Any) -> None:
    held: list[Any] = []

    def answer_late(server: Any, slot: int) -> None:
        """Holds request [1]; answers it (late) just before answering the next one."""
        x = server.read_tensor_slot(slot)
        if x is None:
            return
        if int(x[0]) == 1:
            held.append(x)
            return
        for h in held:
            server.write_tensor_slot(slot, h)
        held.clear()
        server.write_tensor_slot(slot, x)

    serving(1, answer_late)
    with make_client(kind, path) as c:
        with pytest.raises(TransportTimeout):
            c.request(np.array([1]), timeout=0.2)
        try:
            out = c.request(np.array([2]), timeout=5)
        except SensAIError:
            return  # refusing to go on after a timeout is acceptable; a wrong answer is not
        assert out.tolist() == [2], f"request [2] got the late answer {out.tolist()}"


def _classes(kind: str) -> tuple[type, type]:
    """The public endpoint classes of ``kind``: "named_pipe" -> NamedPipeServer, NamedPipeClient."""
    stem = "".join(w.title() for w in kind.split("_"))
    return getattr(sensai.transports, stem + "Server"), getattr(sensai.transports, stem + "Client")


def test_create_transport_and_addresses(kind: str, path: str) -> None:
    server_cls, client_cls = _classes(kind)
    assert getattr(sensai, server_cls.__name__) is server_cls
    server, got = seed_create_transport(kind, path, num_clients=3, debug=True)
    assert isinstance(server, server_cls) and isinstance(server, Transport)
    assert got == path and server.num_slots == 3 and server.num_clients == 3
    address = sensai.transports.format_address(kind, path)
    assert sensai.transports.parse_address(address) == (kind, os.path.abspath(path))
    with ServerThread(server):
        with client_cls(path, slot_id=None, debug=True) as c:
            assert isinstance(c, client_cls)
            np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), np.arange(3))
        with sensai.connect(address, 2) as c:
            assert isinstance(c, client_cls) and c.slot_id == 2
    server.close()
    with pytest.raises(ValueError):
        create_transport("carrier_pigeon")
    with pytest.raises(ValueError):
        sensai.transports.parse_address("http://example.com/x")


def test_create_transport_default_path(kind: str) -> None:
    server, path = create_transport(kind)
    try:
        assert os.path.exists(path)
    finally:
        server.close()
    assert not os.path.exists(path)


def test_every_transport_takes_a_teachers_answer_by_default(kind: str, path: str) -> None:
    """The teacher's answers carry up to 7 tensors (compact: 4 + 2 log-partitions + mask): the
    default limits of every transport, shared memory included, admit them."""
    server = make_server(kind, path)
    try:
        assert server.limits[0] >= 7
    finally:
        server.close()
