"""The one serve loop (wait, take, answer each slot in order, stop, close) and `SensAIServer`,
which runs a plain function over every request on it."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import CapacityError, ClosedError, PeerGoneError, SensAIError, TransportTimeout
from ..protocol import ERROR_CODES

__all__ = ["SensAIServer", "ServeLoop", "deliver", "send_error_frame"]

log = logging.getLogger("sensai.serving")


def send_error_frame(transport: Any, slot: int, code: str, text: str) -> None:
    """Answer the oldest unanswered request of ``slot`` with an error frame (``code``: a name of
    ``ERROR_CODES``); a frame that cannot be delivered is logged."""
    send_error = getattr(transport, "send_error", None)
    if send_error is None:
        return
    try:
        send_error(slot, ERROR_CODES[code], text)
    except SensAIError as e:
        log.warning("slot %d: could not deliver the error frame: %s", slot, e)


def deliver(transport: Any, slot: int, send: Callable[[], Any]) -> str | None:
    """Run ``send()``, which writes the answer of ``slot``'s oldest request. A client already
    gone is logged; an answer that does not fit the transport gets a CAPACITY error frame, any
    other transport failure an INTERNAL one. Returns the code of the error frame sent, if any;
    never raises a `SensAIError`."""
    try:
        send()
        return None
    except PeerGoneError as e:
        log.info("slot %d: client left before its answer: %s", slot, e)
        return None
    except CapacityError as e:
        code, text = "CAPACITY", f"the response does not fit the transport: {e}"
    except SensAIError as e:
        code, text = "INTERNAL", f"cannot send the response: {e}"
    log.error("slot %d: %s", slot, text)
    send_error_frame(transport, slot, code, text)
    return code


class ServeLoop:
    """Waits on ``transport`` and hands the ready slots to a round function until :meth:`stop`.

    ``stop()`` takes effect when the current wait or round ends (a wait lasts at most
    ``poll_timeout``); ``stop()`` then ``transport.close()`` (from another thread or a signal
    handler) ends a wait at once and :meth:`run` returns. A transport closed without
    ``stop()`` raises `ClosedError`. A stop before :meth:`run` makes it return at once; once
    it has returned, the loop can run again.
    """

    def __init__(self, transport: Any, poll_timeout: float | None = 0.5) -> None:
        self.transport = transport
        self.poll_timeout = poll_timeout
        self._stop = threading.Event()

    def stop(self) -> None:
        """Safe from any thread and from a signal handler (it only sets an event)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(
        self, serve_round: Callable[[list[int]], Any], tick: Callable[[], Any] | None = None
    ) -> None:
        """Until stopped: wait for ready slots, ``serve_round(ready)``, then ``tick()``."""
        try:
            while not self._stop.is_set():
                try:
                    ready = self.transport.wait_any(self.poll_timeout)
                except TransportTimeout:
                    ready = []
                except ClosedError:
                    if self._stop.is_set():
                        return  # closed after stop(): the way to end a wait at once
                    raise
                if ready:
                    serve_round(ready)
                if tick is not None:
                    tick()
        finally:
            self._stop.clear()


def _is_tensor_result(x: Any) -> bool:
    def one(t: Any) -> bool:
        return isinstance(t, np.ndarray) or type(t).__module__.startswith("torch")

    return one(x) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(one(t) for t in x))


class SensAIServer:
    """Serve ``fn(tensor_or_list) -> tensor_or_list`` on every slot of ``transport``.

    The loop blocks in the transport's ``wait_any`` (no sleep polling with the built-in
    transports). A request whose handler fails gets an error frame on its own slot; the
    server logs it and keeps serving everyone else.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._loop = ServeLoop(transport)

    def process_slot(self, slot_id: int, fn: Callable[[Any], Any]) -> bool:
        """Handle one pending request on ``slot_id``; False if there was none."""
        if not self.transport.is_ready_slot(slot_id):
            return False
        request = self.transport.read_tensor_slot(slot_id)
        if request is None:
            return False
        try:
            result = fn(request)
            if not _is_tensor_result(result):
                raise TypeError(
                    "the processing function must return an array or a list of arrays, "
                    f"got {type(result).__name__}"
                )
        except Exception as e:  # noqa: BLE001 - a handler failure is reported to its client
            text = f"{type(e).__name__}: {e}"
            # On shared memory the request arrays are views of the client's request buffer,
            # which the client gets back only once they are gone. A logged or kept exception
            # reaches them through its traceback's frames: clear those and drop our references.
            traceback.clear_frames(e.__traceback__)
            request = result = None
            log.error("slot %d: request failed: %s", slot_id, text)
            send_error_frame(self.transport, slot_id, "INTERNAL", text)
            return True
        request = None  # release the request buffer before answering
        deliver(self.transport, slot_id, lambda: self.transport.write_tensor_slot(slot_id, result))
        return True

    def serve_forever(self, fn: Callable[[Any], Any], poll_timeout: float = 0.5) -> None:
        """Serve until :meth:`stop` is called (or KeyboardInterrupt); see `ServeLoop`."""
        self._loop.poll_timeout = poll_timeout

        def serve_round(ready: list[int]) -> None:
            for slot_id in ready:
                self.process_slot(slot_id, fn)

        self._loop.run(serve_round)

    def run_loop(self, fn: Callable[[Any], Any], interval: float = 0.001) -> None:
        """The seed's loop; ``interval`` is accepted and ignored (the loop is event-driven)."""
        self.serve_forever(fn)

    def stop(self) -> None:
        """Make :meth:`serve_forever` return after the current request. Safe from any thread
        and from a signal handler (it only sets an event); close the transport after it to
        end a wait in progress at once."""
        self._loop.stop()
