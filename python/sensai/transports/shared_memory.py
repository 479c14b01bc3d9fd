"""Shared-memory transport: slot rings in one mapped file, futex wake-up, zero copy.

Received arrays are numpy views of the shared buffer (no copy); the buffer is reused only
after every view of it is gone. Each slot has ``ring_depth`` response buffers: every message
a client keeps alive holds one, and a request needs one free for its answer, so a client that
keeps more than ``ring_depth - 1`` responses alive gets ``CapacityError`` until it drops some
(copy what you keep for long). Closing a client frees its slot at once; views it handed out
stay valid. A server can also write a response in place:

    r = server.reserve_slot(slot_id, [("int64", (8, 511, 256)), ("float32", (8, 511, 256))])
    idx, val = r.arrays()
    torch.from_numpy(idx).copy_(indices_on_gpu)   # fill in place
    server.publish(r)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import _core
from ._endpoint import (
    DEFAULT_MAX_TENSORS,
    ClientEndpointBase,
    SeedTransport,
    ServerEndpointBase,
    slot_count,
)

__all__ = [
    "SharedMemoryServer",
    "SharedMemoryClient",
    "SharedMemoryTransport",
    "DEFAULT_RING_DEPTH",
    "DEFAULT_SHM_MAX_NBYTES",
]

DEFAULT_RING_DEPTH = 2
#: Default capacity of one buffer: 64 MiB of tensor data, enough for an [8, 2047, 256] sampled
#: response (50 MB). The file holds 2 x ring_depth buffers per slot, reserved up front in
#: /dev/shm (memory), so a slot costs 256 MiB with the defaults.
DEFAULT_SHM_MAX_NBYTES = 64 << 20


class SharedMemoryServer(ServerEndpointBase):
    """``SharedMemoryServer(path, num_slots, max_nbytes, max_tensors=64, max_dims=8)`` (the
    seed's signature; its default of 4 tensors was raised to 64, as on the other transports,
    so that batches of many fields fit), plus ``ring_depth`` (buffers per slot and direction,
    >= 2), ``debug`` and the seed's ``num_clients`` for ``num_slots``. ``path`` is a file, by
    default under /dev/shm (a bare name goes there).
    """

    _factory = "shared_memory"

    def __init__(
        self,
        path: str,
        num_slots: int | None = None,
        max_nbytes: int = DEFAULT_SHM_MAX_NBYTES,
        max_tensors: int = DEFAULT_MAX_TENSORS,
        max_dims: int = 8,
        debug: bool = False,
        *,
        num_clients: int | None = None,
        ring_depth: int = DEFAULT_RING_DEPTH,
    ) -> None:
        self._ring_depth = int(ring_depth)
        super().__init__(
            path,
            slot_count(num_slots, num_clients),
            debug,
            max_nbytes=max_nbytes,
            max_tensors=max_tensors,
            max_dims=max_dims,
        )

    def _make_core(
        self, path: str, num_slots: int, max_nbytes: int, max_tensors: int, max_dims: int
    ):
        return _core.ServerEndpoint.shared_memory(
            path, num_slots, max_nbytes, max_tensors, max_dims, self._ring_depth
        )

    @property
    def ring_depth(self) -> int:
        return self._ring_depth

    def reserve_slot(
        self,
        slot_id: int,
        specs: Sequence[tuple[str, Sequence[int]]],
        *,
        is_list: bool | None = None,
        tag: int = 0,
        value: int = 0,
    ) -> _core.Reservation:
        """Reserve the response to the oldest unanswered request on ``slot_id``.

        ``specs`` lists ``(dtype_name, shape)`` per tensor. Fill ``reservation.arrays()`` in
        place, then call :meth:`publish`. ``is_list`` defaults to ``len(specs) != 1``.
        """
        lst = len(specs) != 1 if is_list is None else is_list
        specs = [(str(d), [int(x) for x in shape]) for d, shape in specs]
        return self._core.reserve(slot_id, specs, lst, tag, value)

    def publish(self, reservation: _core.Reservation) -> None:
        """Send a filled reservation to its client."""
        self._core.publish(reservation)


class SharedMemoryClient(ClientEndpointBase):
    """``SharedMemoryClient(path, slot_id=None, debug=False, *, connect_timeout=30.0)``."""

    _factory = "shared_memory"

    def __init__(
        self, path: str, slot_id: int | None = None, debug: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(path, slot_id, debug, **kwargs)


class SharedMemoryTransport(SeedTransport, SharedMemoryServer):
    """The seed's name: ``SharedMemoryTransport(shm_path=..., num_clients=..., max_nbytes=...)``
    is a `SharedMemoryServer`. The seed's ``max_elems`` and ``max_dtype`` (elements of the
    largest tensor and their dtype) give ``max_nbytes`` when it is not given."""

    _path_alias = "shm_path"
    _kind = "shared_memory"

    def __init__(self, path: str | None = None, *args: Any, **kwargs: Any) -> None:
        max_elems = kwargs.pop("max_elems", None)
        max_dtype = kwargs.pop("max_dtype", None)
        if max_elems is not None and "max_nbytes" not in kwargs and len(args) < 2:
            import numpy as np

            kwargs["max_nbytes"] = int(max_elems) * np.dtype(max_dtype or np.float32).itemsize
        super().__init__(path, *args, **kwargs)
