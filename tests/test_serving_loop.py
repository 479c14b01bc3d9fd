"""The one serve loop (sensai.serving.loop) under both handlers: `SensAIServer` with a plain
function and the batching `TeacherService`. stop() then close() returns cleanly from either, a
close without stop() raises ClosedError, and a stop() before serving returns at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from sensai import Client, SensAIServer
from sensai.errors import ClosedError
from transport_helpers import make_server

PROMPT = 10.0  # seconds: far below the loop's own poll timeout of 60 s


def _serve(kind: str, transport: Any, tiny_teacher: Any) -> tuple[Callable[[], None], Any]:
    """``(serve_forever, stoppable)`` for a handler kind over ``transport``."""
    if kind == "function":
        server = SensAIServer(transport)
        return lambda: server.serve_forever(lambda x: x, poll_timeout=60), server
    from sensai.serving.batching import TeacherService

    service = TeacherService(tiny_teacher, transport, poll_timeout=60, batch_wait=0)
    return service.serve_forever, service


def _in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            fn()
            out["returned"] = True
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("handler", ["function", "teacher"])
def test_stop_then_close_returns_cleanly(handler: str, tmp_path: Any, tiny_teacher: Any) -> None:
    path = str(tmp_path / "s.sock")
    transport = make_server("unix_socket", path)
    serve, server = _serve(handler, transport, tiny_teacher)
    t, out = _in_thread(serve)
    if handler == "teacher":  # it answers a request first: the loop is running
        with Client(f"unix://{path}", timeout=30) as c:
            assert c.get_teacher_logits(np.arange(1, 6)[None]).batch_size == 1
    server.stop()
    transport.close()
    t.join(PROMPT)
    assert not t.is_alive() and out == {"returned": True}


@pytest.mark.parametrize("handler", ["function", "teacher"])
def test_close_without_stop_raises(handler: str, tmp_path: Any, tiny_teacher: Any) -> None:
    transport = make_server("unix_socket", str(tmp_path / "s.sock"))
    serve, _ = _serve(handler, transport, tiny_teacher)
    t, out = _in_thread(serve)
    transport.close()
    t.join(PROMPT)
    assert not t.is_alive() and isinstance(out.get("error"), ClosedError)


@pytest.mark.parametrize("handler", ["function", "teacher"])
def test_stop_before_serving_returns_at_once(
    handler: str, tmp_path: Any, tiny_teacher: Any
) -> None:
    transport = make_server("unix_socket", str(tmp_path / "s.sock"))
    try:
        serve, server = _serve(handler, transport, tiny_teacher)
        server.stop()
        t, out = _in_thread(serve)
        t.join(PROMPT)
        assert not t.is_alive() and out == {"returned": True}
    finally:
        transport.close()
