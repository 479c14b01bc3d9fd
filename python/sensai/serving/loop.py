"""``SensAIServer``: runs a function over every request that arrives on a transport."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from .._core import ERROR_CODES
from ..errors import ClosedError, PeerGoneError, SensAIError, TransportTimeout

__all__ = ["SensAIServer"]

log = logging.getLogger("sensai.serving")


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
        self._stop = threading.Event()

    def _answer_error(self, slot_id: int, code: int, message: str) -> None:
        send_error = getattr(self.transport, "send_error", None)
        if send_error is None:
            return
        try:
            send_error(slot_id, code, message)
        except SensAIError as e:
            log.warning("slot %d: could not deliver error frame: %s", slot_id, e)

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
            self._answer_error(slot_id, ERROR_CODES["INTERNAL"], text)
            return True
        try:
            self.transport.write_tensor_slot(slot_id, result)
        except PeerGoneError as e:
            log.info("slot %d: client left before its answer: %s", slot_id, str(e))
        except SensAIError as e:
            text = str(e)
            request = result = None  # release the request buffer before answering
            log.error("slot %d: cannot send the response: %s", slot_id, text)
            self._answer_error(slot_id, ERROR_CODES["CAPACITY"], text)
        return True

    def serve_forever(self, fn: Callable[[Any], Any], poll_timeout: float = 0.5) -> None:
        """Serve until :meth:`stop` is called (or KeyboardInterrupt).

        ``stop()`` alone takes effect when the current wait ends (at most ``poll_timeout``);
        ``stop()`` then ``transport.close()`` (from another thread or a signal handler) ends
        the wait at once. A transport closed without ``stop()`` raises ``ClosedError``.
        """
        self._stop.clear()
        while not self._stop.is_set():
            try:
                self._serve_once(fn, poll_timeout)
            except ClosedError:
                if self._stop.is_set():
                    return  # closed after stop(): the way to end a wait at once
                raise

    def _serve_once(self, fn: Callable[[Any], Any], poll_timeout: float) -> None:
        try:
            ready = self.transport.wait_any(poll_timeout)
        except TransportTimeout:
            return
        for slot_id in ready:
            self.process_slot(slot_id, fn)

    def run_loop(self, fn: Callable[[Any], Any], interval: float = 0.001) -> None:
        """The seed's loop; ``interval`` is accepted and ignored (the loop is event-driven)."""
        self.serve_forever(fn)

    def stop(self) -> None:
        """Make :meth:`serve_forever` return after the current request. Safe from any thread
        and from a signal handler (it only sets an event); close the transport after it to
        end a wait in progress at once."""
        self._stop.set()
