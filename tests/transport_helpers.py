"""Helpers for the transport tests: endpoints per kind, a server thread, child-process targets.

Adding a transport to the suite is one entry in ``KINDS``: everything here goes through
``create_transport(kind, ...)`` and ``connect(format_address(kind, path), ...)``.
Child processes come from a forkserver that has numpy and sensai preloaded, so starting one
costs milliseconds; their targets live here so the forkserver can import them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sensai.errors import PeerGoneError, SensAIError, TransportTimeout
from sensai.transports import connect, create_transport, format_address

# Every transport kind the suite runs against.
KINDS = ["unix_socket", "named_pipe", "shared_memory"]

MP = multiprocessing.get_context("forkserver")
MP.set_forkserver_preload(["numpy", "sensai", "transport_helpers"])

# A large marker value: a request [BIG_REQUEST, n] asks the test servers for n bytes back.
BIG_REQUEST = -7_000_001


class Procs:
    """Child processes of one test; the teardown resumes, kills and reaps whatever is left."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def start(self, target: Any, *args: Any, ctx: Any = MP) -> Any:
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.items.append(p)
        return p

    def pipe(self) -> tuple[Any, Any]:
        return MP.Pipe()

    def cleanup(self) -> None:
        for p in self.items:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                except ProcessLookupError:
                    pass
            p.join(5)


def make_server(kind: str, path: str, num_slots: int = 1, **kwargs: Any):
    server, got = create_transport(kind, path, num_slots=num_slots, **kwargs)
    assert got == path
    return server


def make_client(kind: str, path: str, slot_id: int | None = None, connect_timeout: float = 5.0):
    return connect(format_address(kind, path), slot_id, connect_timeout=connect_timeout)


# --- request handlers (server side) ----------------------------------------------------------


def double(x: Any) -> Any:
    if isinstance(x, list):
        return [t * 2 for t in x]
    return x * 2


def big_or_echo(x: Any) -> Any:
    """``[BIG_REQUEST, n]`` -> n bytes of 7s; anything else comes back unchanged."""
    if (
        isinstance(x, np.ndarray)
        and x.shape == (2,)
        and x.dtype == np.int64
        and x[0] == BIG_REQUEST
    ):
        return np.full(int(x[1]), 7, dtype=np.uint8)
    return x


def answer_with(fn: Callable[[Any], Any]) -> Callable[[Any, int], None]:
    """A slot handler that answers each request with ``fn(request)``."""

    def handle(server: Any, slot: int) -> None:
        x = server.read_tensor_slot(slot)
        if x is not None:
            server.write_tensor_slot(slot, fn(x))

    return handle


def ignore_requests(server: Any, slot: int) -> None:
    """A slot handler that reads requests and never answers them."""
    server.read_tensor_slot(slot)


def answer_with_slot(server: Any, slot: int) -> None:
    """Answers ``x`` with ``[x, slot]``, so a client can check which slot the server saw."""
    x = server.read_tensor_slot(slot)
    if x is not None:
        server.write_tensor_slot(slot, [x, np.array(slot, dtype=np.int64)])


def _copy(x: Any) -> Any:
    if isinstance(x, list):
        return [_copy(t) for t in x]
    return x.clone() if hasattr(x, "clone") else np.array(x, copy=True)


class ServerThread:
    """Runs ``handler(server, slot)`` for every ready slot in a background thread.

    The endpoint is used from this thread only while it runs. ``watch(pred)`` returns an
    event set (in the server thread, after each wait) once ``pred(server)`` holds.
    ``received`` keeps every request the default echo handler saw, in order.
    """

    def __init__(self, server: Any, handler: Callable[[Any, int], None] | None = None) -> None:
        self.server = server
        self.received: list[Any] = []
        self.handler = handler or self._echo
        self.errors: list[BaseException] = []
        self.gone = 0
        self._stop = threading.Event()
        self._watches: list[tuple[Callable[[Any], bool], threading.Event]] = []
        self._thread = threading.Thread(target=self._run, name="sensai-test-server", daemon=True)

    def _echo(self, server: Any, slot: int) -> None:
        x = server.read_tensor_slot(slot)
        if x is not None:
            # Keep copies: a received array may borrow transport memory (shared memory).
            self.received.append(_copy(x))
            server.write_tensor_slot(slot, x)

    def watch(self, pred: Callable[[Any], bool]) -> threading.Event:
        ev = threading.Event()
        self._watches.append((pred, ev))
        return ev

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    ready = self.server.wait_any(0.02)
                except TransportTimeout:
                    ready = []
                for slot in ready:
                    try:
                        self.handler(self.server, slot)
                    except PeerGoneError:  # the client left before its answer: allowed
                        self.gone += 1
                for pred, ev in list(self._watches):
                    if not ev.is_set() and pred(self.server):
                        ev.set()
        except BaseException as e:  # noqa: BLE001 - re-raised in stop()
            self.errors.append(e)

    def start(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the server thread did not stop within 10 s"
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def echo_request(client: Any, x: Any, timeout: float = 5.0) -> Any:
    return client.request(x, timeout=timeout)


def distinct_data(seed: int, i: int) -> np.ndarray:
    return (np.arange(1000, dtype=np.float32) + 1000 * seed + i).reshape(10, 100)


# --- child-process targets -------------------------------------------------------------------


def _exit_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


def serve_process(
    kind: str, path: str, num_slots: int, mode: str, ready: Any, got_request: Any
) -> None:
    """A server in its own process. mode "double" answers 2*x; "silent" reads and never answers.

    Sets ``ready`` once clients may connect and ``got_request`` on the first request.
    """
    _exit_on_sigterm()
    with make_server(kind, path, num_slots) as server:
        ready.set()
        while True:
            try:
                slots = server.wait_any(0.5)
            except TransportTimeout:
                continue
            for slot in slots:
                x = server.read_tensor_slot(slot)
                if x is None:
                    continue
                got_request.set()
                if mode == "double":
                    server.write_tensor_slot(slot, double(x))


def client_process(
    kind: str, path: str, slot_id: int | None, seed: int, n: int, barrier: Any, conn: Any
) -> None:
    """Connect, wait for the other clients, then send ``n`` distinct requests and check each answer.

    Sends ``("ok", slot_id)`` or ``("fail", message)`` through ``conn``.
    """
    try:
        with make_client(kind, path, slot_id) as c:
            barrier.wait(10)
            for i in range(n):
                x = distinct_data(seed, i)
                out = c.request([x, x.astype(np.int64)], timeout=10)
                assert isinstance(out, list) and len(out) == 2, out
                np.testing.assert_array_equal(out[0], 2 * x)
                assert out[1].dtype == np.int64
                np.testing.assert_array_equal(out[1], 2 * x.astype(np.int64))
            conn.send(("ok", c.slot_id))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("fail", f"{type(e).__name__}: {e}"))


def hold_slot_process(kind: str, path: str, slot_id: int | None, conn: Any) -> None:
    """Lease a slot, report its id, prove it works, then hold it until killed."""
    c = make_client(kind, path, slot_id)
    out = c.request(np.arange(4), timeout=5)
    conn.send(("held", c.slot_id, out.tolist()))
    conn.recv()  # blocks until the parent kills us (or closes its end)


def big_response_then_stop(kind: str, path: str, nbytes: int, conn: Any) -> None:
    """Ask for ``nbytes`` back, stop ourselves before reading, and check the answer on SIGCONT."""
    try:
        c = make_client(kind, path)
        c.write_tensor(np.array([BIG_REQUEST, nbytes], dtype=np.int64))
        conn.send(("sent", c.slot_id))
        os.kill(os.getpid(), signal.SIGSTOP)
        out = c.read_tensor(timeout=10)
        ok = out.shape == (nbytes,) and bool((out == 7).all())
        conn.send(("ok",) if ok else ("fail", f"bad response {out.shape} {out[:8]}"))
    except BaseException as e:  # noqa: BLE001
        conn.send(("fail", f"{type(e).__name__}: {e}"))


def interrupted_request(kind: str, path: str, conn: Any) -> None:
    """A request with no deadline that a SIGINT from a timer thread must end promptly."""
    c = make_client(kind, path)
    sent_at: list[float] = []

    def fire() -> None:
        sent_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Timer(0.3, fire).start()
    try:
        c.request(np.arange(8), timeout=None)
        conn.send(("returned", 0.0))
    except KeyboardInterrupt:
        conn.send(("KeyboardInterrupt", time.monotonic() - sent_at[0]))
    except BaseException as e:  # noqa: BLE001
        conn.send((f"{type(e).__name__}: {e}", 0.0))


def interrupted_wait_any(kind: str, path: str, conn: Any) -> None:
    """A server's ``wait_any(None)`` that a SIGINT from a timer thread must end promptly."""
    with make_server(kind, path, 1) as server:
        sent_at: list[float] = []

        def fire() -> None:
            sent_at.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

        threading.Timer(0.3, fire).start()
        try:
            server.wait_any(None)
            conn.send(("returned", 0.0))
        except KeyboardInterrupt:
            conn.send(("KeyboardInterrupt", time.monotonic() - sent_at[0]))
        except BaseException as e:  # noqa: BLE001
            conn.send((f"{type(e).__name__}: {e}", 0.0))


def other_user_connect(kind: str, path: str, uid: int, conn: Any) -> None:
    """Drop to ``uid`` and try to connect and send; report what happened."""
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as e:
        conn.send(("setuid failed", str(e)))
        return
    try:
        c = make_client(kind, path, None, connect_timeout=1.0)
        out = c.request(np.arange(3), timeout=2.0)
        conn.send(("connected", repr(out)))
    except (SensAIError, OSError) as e:
        conn.send(("refused", f"{type(e).__name__}: {e}"))
    except BaseException as e:  # noqa: BLE001
        conn.send(("other error", f"{type(e).__name__}: {e}"))
