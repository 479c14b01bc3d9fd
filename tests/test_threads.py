"""Endpoints shared by threads: the rule in sensai/_core.pyi ("Threads").

While one thread is inside a blocking call (a server's ``wait_any``, a client's ``recv``),
another thread may read the properties and ``close()`` the endpoint, which ends that call with
``ClosedError``; any other method raises ``BusyError`` naming itself and the blocking call
(it was PyO3's bare ``RuntimeError: Already borrowed``). ``SensAIServer.stop()`` plus
``close()``, from another thread or from a signal handler, ends ``serve_forever`` at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from sensai import SensAIServer
from sensai.errors import BusyError, ClosedError
from transport_helpers import ServerThread, ignore_requests, make_client, make_server

pytestmark = pytest.mark.timeout(120)

PROMPT = 2.0  # seconds; "at once" on a loaded machine, far below the waits' own timeouts


def until_busy(call: Callable[[], Any], deadline_s: float = 10.0) -> BusyError:
    """Repeat a cheap call until the endpoint is held by the other thread's blocking call
    (there is no event for "the other thread is inside wait_any"; each try returns at once)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            call()
        except BusyError as e:
            return e
    raise AssertionError(f"the endpoint never became busy within {deadline_s} s")


class InThread:
    """Runs ``fn`` in a thread; ``result()`` is what it returned or raised, and when."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.outcome: Any = None
        self.ended = 0.0
        self._t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._t.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.outcome = fn()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            self.outcome = e
        self.ended = time.monotonic()

    def result(self, timeout: float) -> Any:
        self._t.join(timeout)
        assert not self._t.is_alive(), f"the call did not end within {timeout} s"
        return self.outcome


def test_server_busy_in_wait_any_serves_properties_and_close_from_another_thread(
    kind: str, path: str
) -> None:
    server = make_server(kind, path, num_slots=2)
    core = server._core
    waiter = InThread(lambda: core.wait_any(None))
    busy = until_busy(lambda: core.is_connected(0))
    text = str(busy)
    assert "ServerEndpoint.is_connected" in text and "inside ServerEndpoint.wait_any" in text, text
    assert isinstance(busy, RuntimeError)  # what PyO3's borrow error was: old handlers still work
    # Every other method says the same, naming itself.
    for name, call in [
        ("recv", lambda: core.recv(0)),
        ("is_ready_slot", lambda: core.is_ready_slot(1)),
        ("send_error", lambda: core.send_error(0, 4, "x")),
        ("send", lambda: core.send(0, [np.zeros(2)])),
        ("wait_any", lambda: core.wait_any(0)),
    ]:
        with pytest.raises(
            BusyError, match=rf"ServerEndpoint\.{name}: .*inside ServerEndpoint\.wait_any"
        ):
            call()
    # The properties answer without waiting.
    assert (core.kind, core.num_slots, core.closed) == (kind, 2, False)
    assert core.path == server.path and core.limits == server.limits
    # close() ends the wait at once, and returns once the files are gone.
    start = time.monotonic()
    server.close()
    assert core.closed and not os.path.exists(path)
    got = waiter.result(PROMPT)
    assert isinstance(got, ClosedError), repr(got)
    assert "wait_any" in str(got) and "closed" in str(got), str(got)
    assert waiter.ended - start < PROMPT
    with pytest.raises(ClosedError):
        core.wait_any(0)
    server.close()  # idempotent


def test_short_calls_of_two_threads_take_turns(kind: str, path: str) -> None:
    """Calls that do not block wait for each other instead of failing."""
    server = make_server(kind, path, num_slots=2)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(2000):
                server.is_connected(0)
                server.is_ready_slot(1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.close()
    assert not errors, errors[0]


def test_client_close_from_another_thread_ends_its_recv(kind: str, path: str) -> None:
    server = make_server(kind, path)
    with ServerThread(server, ignore_requests):
        client = make_client(kind, path)
        core = client._core
        core.send([np.arange(3)])
        waiter = InThread(lambda: core.recv(None))
        busy = until_busy(core.is_ready)
        assert "ClientEndpoint.is_ready" in str(busy) and "inside ClientEndpoint.recv" in str(busy)
        assert (core.kind, core.slot_id, core.closed) == (kind, 0, False)
        start = time.monotonic()
        client.close()
        got = waiter.result(PROMPT)
        assert isinstance(got, ClosedError) and "ClientEndpoint.recv" in str(got), repr(got)
        assert waiter.ended - start < PROMPT
        assert core.closed and not core.server_alive()
    server.close()


def test_stop_and_close_from_another_thread_end_serve_forever_at_once(kind: str, path: str) -> None:
    transport = make_server(kind, path)
    server = SensAIServer(transport)
    loop = InThread(lambda: server.serve_forever(lambda x: x, poll_timeout=60))
    until_busy(lambda: transport.is_connected(0))
    start = time.monotonic()
    server.stop()
    transport.close()
    assert loop.result(PROMPT) is None  # returned, no exception
    assert loop.ended - start < PROMPT


def test_transport_closed_without_stop_is_reported_by_serve_forever(kind: str, path: str) -> None:
    transport = make_server(kind, path)
    server = SensAIServer(transport)
    loop = InThread(lambda: server.serve_forever(lambda x: x, poll_timeout=60))
    until_busy(lambda: transport.is_connected(0))
    transport.close()
    assert isinstance(loop.result(PROMPT), ClosedError)


def test_signal_handler_stops_and_closes_inside_wait_any(kind: str, path: str) -> None:
    """A handler runs inside the main thread's own wait_any: a method there raises BusyError
    (not a deadlock), and stop() plus close() end serve_forever once the wait returns."""
    transport = make_server(kind, path)
    server = SensAIServer(transport)
    seen: dict[str, Any] = {}

    def on_alarm(signum: int, frame: Any) -> None:
        try:
            transport.is_connected(0)
        except BusyError as e:  # inside the loop's wait_any: act
            seen["busy"] = str(e)
            seen["at"] = time.monotonic()
            server.stop()
            transport.close()
            return
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # not inside it yet: try again soon

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        server.serve_forever(lambda x: x, poll_timeout=60)
        returned = time.monotonic()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert "while this thread is inside ServerEndpoint.wait_any" in seen["busy"], seen["busy"]
    assert returned - seen["at"] < PROMPT
    assert transport.closed and not os.path.exists(path)
