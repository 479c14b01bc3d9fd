"""The transport interface (the seed's ``sensai.transports.transport_abc``).

A server endpoint implements ``is_ready_slot``, ``read_tensor_slot``, ``write_tensor_slot``
and ``close``; a client endpoint adds :class:`ClientMixin`, which binds those calls to its
own ``slot_id``. Subclass :class:`Transport` to plug in a transport of your own: the serving
loop only needs these methods (and uses ``wait_any`` when the transport has a better way to
wait than asking each slot).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

__all__ = ["ClientMixin", "Transport", "TensorLike"]

TensorLike = "np.ndarray | list[np.ndarray]"


class ClientMixin:
    """Client-side calls of the seed, bound to ``self.slot_id``."""

    slot_id: int

    def write_tensor(self, tensor) -> None:
        self.write_tensor_slot(self.slot_id, tensor)  # type: ignore[attr-defined]

    def read_tensor(self):
        return self.read_tensor_slot(self.slot_id)

    def is_ready(self) -> bool:
        return self.is_ready_slot(self.slot_id)  # type: ignore[attr-defined]


class Transport(ABC):
    """Abstract base of every transport endpoint."""

    def __init__(self, path: str, debug: bool = False, is_server: bool = False) -> None:
        self.path = path
        self.debug = debug
        self.is_server = is_server
        self._log = logging.getLogger(f"sensai.transports.{type(self).__name__}")
        if debug:
            self._log.setLevel(logging.DEBUG)

    @abstractmethod
    def is_ready_slot(self, slot_id: int) -> bool: ...

    @abstractmethod
    def read_tensor_slot(self, slot_id: int) -> np.ndarray | list[np.ndarray] | None: ...

    @abstractmethod
    def write_tensor_slot(
        self, slot_id: int, tensor: np.ndarray | Sequence[np.ndarray]
    ) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    def num_clients(self) -> int:
        """The seed's name for :attr:`num_slots`."""
        return self.num_slots

    @property
    def num_slots(self) -> int:
        return int(getattr(self, "_num_slots", 1))

    def supports_multi_tensor(self) -> bool:
        return False

    def wait_any(self, timeout: float | None = None) -> list[int]:
        """Slots with a pending request, waiting up to ``timeout`` seconds.

        This generic version asks every slot in turn with a short pause between rounds; the
        built-in transports override it with a real blocking wait. ``timeout=0`` polls once;
        any other expired timeout raises :class:`~sensai.errors.TransportTimeout`.
        """
        from ..errors import TransportTimeout

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = [s for s in range(self.num_slots) if self.is_ready_slot(s)]
            if ready or timeout == 0:
                return ready
            if deadline is not None and time.monotonic() >= deadline:
                raise TransportTimeout(f"no request arrived on {self.path} within {timeout}s")
            time.sleep(0.0005)

    def _debug(self, msg: str) -> None:
        self._log.debug("%s", msg)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.close()
