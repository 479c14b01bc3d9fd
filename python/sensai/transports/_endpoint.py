"""Python endpoints over the Rust core (`sensai._core`): the seed's API on real transports.

One array in gives one array out, a list gives a list. Torch tensors are accepted
(moved to the CPU); bfloat16 travels as raw 2-byte words and comes back as a torch
bfloat16 tensor, since numpy has no bfloat16.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .. import _core
from ..errors import CapacityError, RemoteError, RoleError, SensAIError
from .transport_abc import ClientMixin, Transport

__all__ = [
    "ServerEndpointBase",
    "ClientEndpointBase",
    "SeedTransport",
    "to_wire",
    "from_message",
    "message_arrays",
    "slot_count",
]

log = logging.getLogger("sensai.transports")

DEFAULT_MAX_NBYTES = 256 << 20
#: Most tensors in one message: a batch of many named fields fits; the frame table grows by
#: 88 bytes a tensor (docs/PROTOCOL.md section 9).
DEFAULT_MAX_TENSORS = 64


def slot_count(num_slots: int | None, num_clients: int | None, default: int = 1) -> int:
    """``num_slots``, or the seed's name for it, ``num_clients`` (both given must agree)."""
    if num_slots is not None and num_clients is not None and int(num_slots) != int(num_clients):
        raise TypeError(
            f"num_slots={num_slots} and num_clients={num_clients} disagree: num_clients is the "
            "seed's name for num_slots, give one of them"
        )
    n = num_slots if num_slots is not None else num_clients
    return default if n is None else int(n)


ACCEPTED = "a numpy array or a dense, strided torch tensor on the CPU or a GPU"


def dense_tensor(t: Any, what: str) -> Any:
    """The torch tensor ``t`` detached and on the CPU; `TypeError` naming what is accepted
    for one without dense, strided data (sparse or mkldnn layouts, nested, meta, quantized)."""
    import torch

    if t.is_nested:
        got = "a nested tensor (pad it first: .to_padded_tensor(0))"
    elif t.layout != torch.strided:
        layout = str(t.layout).removeprefix("torch.")
        got = f"a {layout} tensor (convert it first: .to_dense())"
    elif t.is_meta:
        got = "a tensor on the meta device (it holds no data)"
    elif t.is_quantized:
        got = f"a quantized {t.dtype} tensor (convert it first: .dequantize())"
    else:
        t = t.detach()
        return t if t.device.type == "cpu" else t.cpu()
    raise TypeError(f"{what}: expected {ACCEPTED}, got {got}")


def _one_to_wire(x: Any, index: int) -> tuple[np.ndarray, str | None]:
    if type(x) is np.ndarray and x.flags.c_contiguous and x.dtype.byteorder != ">":
        return x, None  # the common case, sent as it is
    if isinstance(x, np.ndarray):
        arr = x
    elif type(x).__module__.startswith("torch"):
        import torch

        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"tensor {index}: expected a numpy array or torch tensor, got {type(x).__name__}"
            )
        t = dense_tensor(x, f"tensor {index}")
        if t.dtype == torch.bfloat16:
            words = t.contiguous().view(torch.int16).numpy().view(np.uint16)
            return np.asarray(words, order="C"), "bfloat16"
        arr = t.contiguous().numpy()
    elif isinstance(x, (np.generic, int, float, bool)):
        arr = np.asarray(x)
    else:
        raise TypeError(
            f"tensor {index}: expected a numpy array or torch tensor, got {type(x).__name__}"
        )
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.asarray(arr, order="C"), None


def to_wire(tensor_or_list: Any) -> tuple[list[np.ndarray], list[str | None] | None, bool]:
    """Arrays to send, their dtype overrides, and whether the caller passed a list."""
    is_list = isinstance(tensor_or_list, (list, tuple))
    items = list(tensor_or_list) if is_list else [tensor_or_list]
    arrays, overrides = [], []
    for i, x in enumerate(items):
        a, o = _one_to_wire(x, i)
        arrays.append(a)
        overrides.append(o)
    return arrays, (overrides if any(o is not None for o in overrides) else None), is_list


def message_arrays(msg: Any, copy: bool = False) -> list[Any]:
    """A received message's tensors: numpy arrays, and torch bfloat16 tensors for bfloat16
    (numpy has none); copied out of the message's buffer if ``copy``."""
    arrays: list[Any] = [np.array(a) if copy else a for a in msg.arrays()]
    if msg.has_bfloat16:
        import torch

        arrays = [
            torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if d == "bfloat16" else a
            for a, d in zip(arrays, msg.dtypes, strict=True)
        ]
    return arrays


def from_message(msg: _core.Message) -> Any:
    """The tensors of a received message: an array, or a list when a list was sent."""
    arrays = message_arrays(msg)
    if msg.is_list:
        return arrays
    if len(arrays) == 1:
        return arrays[0]
    return arrays


class _OwnsCore:
    """What both roles read from their `_core` endpoint; it is closed when dropped."""

    _core: Any

    @property
    def limits(self) -> tuple[int, int, int]:
        """The server's ``(max_tensors, max_dims, max_nbytes)``."""
        return self._core.limits

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            core.close()


class ServerEndpointBase(_OwnsCore, Transport):
    """Server endpoint over a `_core.ServerEndpoint`."""

    _factory: str = ""

    def __init__(
        self,
        path: str,
        num_slots: int | None = None,
        debug: bool = False,
        *,
        num_clients: int | None = None,
        max_nbytes: int = DEFAULT_MAX_NBYTES,
        max_tensors: int = DEFAULT_MAX_TENSORS,
        max_dims: int = 8,
    ) -> None:
        num_slots = slot_count(num_slots, num_clients)
        super().__init__(str(path), debug=debug, is_server=True)
        self._core = self._make_core(
            str(path), int(num_slots), int(max_nbytes), int(max_tensors), int(max_dims)
        )
        self._num_slots = int(num_slots)
        self._debug(f"serving {num_slots} slot(s) on {path}")

    def _make_core(
        self, path: str, num_slots: int, max_nbytes: int, max_tensors: int, max_dims: int
    ):
        return getattr(_core.ServerEndpoint, self._factory)(
            path, num_slots, max_nbytes, max_tensors, max_dims
        )

    # -- seed API -------------------------------------------------------------------
    def supports_multi_tensor(self) -> bool:
        return True

    def is_ready_slot(self, slot_id: int) -> bool:
        return self._core.is_ready_slot(slot_id)

    def read_tensor_slot(self, slot_id: int) -> Any:
        """The next request's tensors on ``slot_id``, or None when nothing is pending."""
        msg = self._core.recv(slot_id)
        if msg is None:
            return None
        if self.debug:
            self._debug(f"slot {slot_id}: {msg!r}")
        return from_message(msg)

    def write_tensor_slot(self, slot_id: int, tensor: Any) -> None:
        """Answer the oldest unanswered request on ``slot_id``. Never blocks on the client."""
        arrays, dtypes, is_list = to_wire(tensor)
        self._core.send(slot_id, arrays, dtypes, is_list)

    def wait_any(self, timeout: float | None = None) -> list[int]:
        try:
            return self._core.wait_any(timeout)
        finally:
            self._log_notices()

    def _log_notices(self) -> None:
        """Log what the server found and repaired on its own (a corrupt shm slot reset)."""
        try:
            notes = self._core.notices()
        except SensAIError:  # closed meanwhile
            return
        for note in notes:
            log.warning("%s", note)

    def close(self) -> None:
        self._core.close()

    # -- richer API -----------------------------------------------------------------
    def recv_message(self, slot_id: int) -> _core.Message | None:
        """The next request as a raw message (header fields and zero-copy arrays)."""
        return self._core.recv(slot_id)

    def send_message(
        self, slot_id: int, tensor: Any, *, tag: int = 0, value: int = 0, kind: str = "response"
    ) -> None:
        arrays, dtypes, is_list = to_wire(tensor)
        self._core.send(slot_id, arrays, dtypes, is_list, tag, value, kind)

    def send_error(self, slot_id: int, code: int, message: str) -> None:
        """Answer the oldest unanswered request on ``slot_id`` with an error frame."""
        self._core.send_error(slot_id, int(code), str(message))

    def is_connected(self, slot_id: int) -> bool:
        return self._core.is_connected(slot_id)

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def num_clients(self) -> int:
        """The seed's name for :attr:`num_slots`."""
        return self._num_slots

    # -- role checks ----------------------------------------------------------------
    def write_tensor(self, tensor: Any) -> None:
        raise RoleError("a server endpoint answers on a slot: use write_tensor_slot(slot_id, ...)")

    def read_tensor(self) -> Any:
        raise RoleError("a server endpoint reads from a slot: use read_tensor_slot(slot_id)")

    def request(self, tensor: Any, timeout: float | None = None) -> Any:
        raise RoleError("a server endpoint cannot send requests")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, num_slots={self._num_slots})"


class ClientEndpointBase(ClientMixin, _OwnsCore, Transport):
    """Client endpoint over a `_core.ClientEndpoint`, bound to one slot."""

    _factory: str = ""

    def __init__(
        self,
        path: str,
        slot_id: int | None = None,
        debug: bool = False,
        *,
        connect_timeout: float | None = 30.0,
    ) -> None:
        super().__init__(str(path), debug=debug, is_server=False)
        self._core = getattr(_core.ClientEndpoint, self._factory)(
            str(path), slot_id, connect_timeout
        )
        self._connect_timeout = connect_timeout
        self.slot_id = self._core.slot_id
        self._outstanding = 0
        self._debug(f"connected to {path} on slot {self.slot_id}")

    def supports_multi_tensor(self) -> bool:
        return True

    def reopen(self) -> ClientEndpointBase:
        """A new endpoint to the same server, opened by this process: on this endpoint's slot
        if it is free, else on any free one. For a forked child, whose inherited endpoint
        (the parent's connection and slot) raises `ForkError`."""
        cls = type(self)
        try:
            return cls(self.path, self.slot_id, self.debug, connect_timeout=self._connect_timeout)
        except CapacityError:  # held (by the parent, usually): lease any free slot
            return cls(self.path, None, self.debug, connect_timeout=self._connect_timeout)

    def _check_slot(self, slot_id: int) -> None:
        if slot_id != self.slot_id:
            raise RoleError(
                f"this client holds slot {self.slot_id} of {self.path}; "
                f"it cannot use slot {slot_id}"
            )

    def write_tensor_slot(self, slot_id: int, tensor: Any) -> None:
        self._check_slot(slot_id)
        self.write_tensor(tensor)

    def read_tensor_slot(self, slot_id: int) -> Any:
        self._check_slot(slot_id)
        return self.read_tensor()

    def is_ready_slot(self, slot_id: int) -> bool:
        self._check_slot(slot_id)
        return self.is_ready()

    def write_tensor(self, tensor: Any, timeout: float | None = None) -> None:
        """Send a request (an array or a list of arrays)."""
        arrays, dtypes, is_list = to_wire(tensor)
        self._core.send(arrays, dtypes, is_list, 0, 0, "request", timeout)
        self._outstanding += 1

    def is_ready(self) -> bool:
        """Whether a response can be read without waiting."""
        return self._core.is_ready()

    def server_alive(self) -> bool:
        """Whether the server is still there, as far as can be told without blocking
        (False once closed). An endpoint whose server is gone stays unusable: connect again."""
        return self._core.server_alive()

    def read_tensor(self, timeout: float | None = None) -> Any:
        """The response to the oldest outstanding request, waiting up to ``timeout`` seconds."""
        if self._outstanding == 0:
            raise SensAIError(f"no request is outstanding on slot {self.slot_id} of {self.path}")
        try:
            msg = self._core.recv(timeout)  # a timeout leaves the request outstanding
        except RemoteError:
            self._outstanding -= 1  # answered, with an error
            raise
        self._outstanding -= 1
        return from_message(msg)

    def request(self, tensor: Any, timeout: float | None = None) -> Any:
        """Send a request and return its response (``timeout`` covers both)."""
        return from_message(self.request_message(tensor, timeout=timeout))

    def request_message(
        self,
        tensor: Any,
        *,
        tag: int = 0,
        value: int = 0,
        kind: str = "request",
        timeout: float | None = None,
    ) -> _core.Message:
        """Like :meth:`request`, returning the raw message (header fields, zero-copy arrays)."""
        if self._outstanding:
            raise SensAIError(
                f"{self._outstanding} response(s) on slot {self.slot_id} are still unread; "
                "read them first"
            )
        arrays, dtypes, is_list = to_wire(tensor)
        return self._core.request(arrays, dtypes, is_list, tag, value, kind, timeout)

    def close(self) -> None:
        self._core.close()

    # -- role checks ----------------------------------------------------------------
    def wait_any(self, timeout: float | None = None) -> list[int]:
        raise RoleError("a client endpoint cannot wait for requests; only a server can")

    def send_error(self, slot_id: int, code: int, message: str) -> None:
        raise RoleError("a client endpoint cannot send error frames")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, slot_id={self.slot_id})"


class SeedTransport:
    """The seed's server class names (``NamedPipeTransport``, ``SharedMemoryTransport``,
    ``UnixSocketTransport``), each a server endpoint of its transport. Besides our arguments
    they take the seed's spellings: the path as ``pipe_dir``/``shm_path``/``socket_path``
    (default: a per-process path), ``num_clients`` for ``num_slots``, and ``is_server``
    (only True: a client is ``connect(address)``)."""

    _path_alias = ""
    _kind = ""

    def __init__(self, path: str | None = None, *args: Any, **kwargs: Any) -> None:
        alias = kwargs.pop(self._path_alias, None)
        if path is not None and alias is not None and str(path) != str(alias):
            raise TypeError(
                f"{type(self).__name__}: path={path!r} and {self._path_alias}={alias!r} "
                f"disagree: {self._path_alias} is the seed's name for path, give one of them"
            )
        if not kwargs.pop("is_server", True):
            raise RoleError(
                f"{type(self).__name__}(is_server=False): the seed's client side is now "
                f"connect(address) or the {self._kind} client class with a slot_id; "
                f"{type(self).__name__} makes the server's endpoint"
            )
        if path is None and alias is None:
            from . import default_path  # the package imports this module first

            path = default_path(self._kind)
        # A mixin listed before a server class: the next __init__ is the server's.
        super().__init__(str(path if path is not None else alias), *args, **kwargs)  # type: ignore[call-arg]
