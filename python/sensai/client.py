"""Clients of a SensAI server.

`Client` is the user-facing one: it takes an address (``shm:///dev/shm/sensai``,
``unix:///tmp/sensai.sock``, ``pipe:///tmp/sensai-pipes``), connects lazily, asks the server
for its configuration, and turns answers into `TeacherOutput`. `SensAIClient` is the seed's
raw client over an endpoint, kept for seed users.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CapacityError, ClosedError
from .protocol import (
    INFO_TAG,
    SAMPLING_FORMATS,
    SEED_FLAG,
    check_tokenizer,
    decode_info,
    info_features,
    require_features,
)
from .transports import connect, parse_address
from .transports._endpoint import dense_tensor, message_arrays

if TYPE_CHECKING:  # formats imports torch; a transport-only user never needs it
    from .formats import TeacherOutput

__all__ = ["Client", "SensAIClient", "INFO_TAG", "SEED_FLAG"]  # the tags: sensai.protocol's

log = logging.getLogger("sensai.client")

_UNSET: Any = object()


def _ids_array(x: Any, name: str) -> Any:
    """``x`` as something the transport sends: an int64 numpy array or a CPU torch tensor."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
        return x if x.dtype == np.int64 else x.astype(np.int64)
    if type(x).__module__.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            t = dense_tensor(x, name)
            if t.dtype.is_floating_point or t.dtype.is_complex:
                raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
            return t if t.dtype == torch.int64 else t.to(torch.int64)
    if isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integers, got {arr.dtype}")
        return arr.astype(np.int64)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


class Client:
    """A client of a SensAI teacher server.

    ``timeout`` is the default for every request (None: wait as long as the server lives; a
    server that dies raises `PeerGoneError`). ``connect_timeout`` is how long the first use
    waits for a server that is still starting.

    The connection opens on first use. A client is picklable (the copy connects on its own
    first use) and fork-aware: used in a process other than the one that connected (e.g. a
    forked DataLoader worker), it opens its own connection and slot (the ``slot_id`` given, or
    any free slot while the parent holds that one). The inherited connection is let go of
    in the child, which closes only the child's copies of its descriptors: the parent's
    slot is untouched, and the server sees the parent's close when it comes.

    A client outlives its server: a request that finds the server gone (exited, or
    restarted on the same path) opens a new connection first, so a restarted server is
    used without any change in user code. A request in flight when the server dies raises
    `PeerGoneError` (or `TransportTimeout` at its timeout).

    ``require``: protocol features (see `sensai.protocol.FEATURES`) the server must have,
    checked when its INFO first arrives; a server without one raises
    `UnsupportedFeatureError` naming it.
    """

    def __init__(
        self,
        address: str,
        slot_id: int | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = 10.0,
        *,
        require: Iterable[str] = (),
    ) -> None:
        self._kind = parse_address(address)[0]  # validated now, not on first use
        self.address = address
        self._slot_id = slot_id
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._endpoint: Any = None
        self._pid: int | None = None
        # The process this client was made in: a fixed slot_id is that process's; a forked
        # or unpickled copy leases any free slot when that one is held.
        self._home_pid: int | None = os.getpid()
        self._info: dict[str, Any] | None = None
        self.required_features = tuple(require)
        self._closed = False
        self._lock = threading.Lock()
        self._epoch: int | None = None

    # -- connection ----------------------------------------------------------------
    def _ep(self, connect_timeout: Any = _UNSET) -> Any:
        """This process's endpoint, connecting first if needed (waiting up to
        ``connect_timeout``, default the client's)."""
        wait = self.connect_timeout if connect_timeout is _UNSET else connect_timeout
        if self._closed:
            raise ClosedError(f"this client of {self.address} was closed")
        pid = os.getpid()
        if self._pid is not None and self._pid != pid:
            # Inherited through fork: let go of the parent's endpoint (in a child, closing or
            # dropping one only closes the child's copies of its descriptors: see ForkError),
            # and take a fresh lock (the parent's may have been held at fork).
            self._endpoint, self._pid = None, None
            self._lock = threading.Lock()
        with self._lock:
            ep = self._endpoint
            if ep is not None and not ep.server_alive():
                # The server we talked to is gone (it exited, or restarted on the same
                # path): connect again as on first use, and ask the new one for its info.
                log.info("the server at %s is gone; reconnecting", self.address)
                ep.close()
                ep = self._endpoint = None
                self._info = None
            if ep is None:
                try:
                    ep = connect(self.address, self._slot_id, connect_timeout=wait)
                except CapacityError:
                    if self._slot_id is None or self._home_pid == pid:
                        raise
                    ep = connect(self.address, None, connect_timeout=wait)
                self._endpoint, self._pid = ep, pid
        return ep

    def connect(self, timeout: float | None = _UNSET) -> int:
        """Open this process's connection now rather than on first use, waiting up to
        ``timeout`` seconds (default ``connect_timeout``) for a server that is still
        starting; returns the slot. A no-op when connected."""
        return int(self._ep(timeout).slot_id)

    @property
    def connected(self) -> bool:
        """Whether this process holds an open connection."""
        return self._endpoint is not None and self._pid == os.getpid()

    @property
    def slot_id(self) -> int:
        """The slot this process holds (connects if needed)."""
        return int(self._ep().slot_id)

    def close(self) -> None:
        """Release this process's connection and slot. Idempotent; a connection inherited
        from a parent process is let go of here without touching the parent's slot."""
        ep, self._endpoint = self._endpoint, None
        self._closed = True
        if ep is not None:
            ep.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_endpoint"] = None
        state["_pid"] = None
        state["_home_pid"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = (
            "closed"
            if self._closed
            else (f"slot {self._endpoint.slot_id}" if self.connected else "not connected")
        )
        return f"Client({self.address!r}, {state})"

    def set_epoch(self, epoch: int) -> None:
        """The training epoch: a replayed store recorded with K sample sets per sequence
        answers from set ``epoch mod K`` (a live teacher draws fresh samples anyway). A
        DataLoader worker gets the epoch its client had when the worker started."""
        self._epoch = int(epoch)

    # -- requests ------------------------------------------------------------------
    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    def info(self, *, timeout: Any = _UNSET, refresh: bool = False) -> dict[str, Any]:
        """The server's configuration (model, vocab_size, output_format, num_samples,
        temperature, top_k, top_p, protocol_version, ...). Cached after the first call."""
        if self._info is not None and not refresh:
            return dict(self._info)
        ep = self._ep()
        with self._lock:
            msg = ep.request_message(
                [], tag=INFO_TAG, kind="control", timeout=self._timeout(timeout)
            )
        info = decode_info(msg)
        require_features(info, self.required_features)
        self._info = info
        return dict(info)

    def features(self) -> frozenset[str]:
        """The protocol features the server declares (a server of INFO version 0, which
        declares none, has `sensai.protocol.LEGACY_FEATURES`)."""
        return info_features(self.info())

    def require(self, *features: str) -> None:
        """`UnsupportedFeatureError` naming each of ``features`` the server lacks."""
        require_features(self.info(), features)

    def check_tokenizer(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        """Check the student's ``tokenizer`` against the teacher's fingerprint (INFO
        ``tokenizer``): `TokenizerMismatchError` for another vocabulary or special tokens, or
        a ``vocab_size`` (the student's logits) smaller than the tokenizer (a larger, padded
        one is fine); `UnsupportedFeatureError` for a server that sends no fingerprint."""
        check_tokenizer(self.info(), tokenizer, vocab_size)

    def _params(self, fmt: str) -> dict[str, Any]:
        info = self.info()
        return {
            "vocab_size": int(info.get("vocab_size") or 0),
            "num_samples": int(info.get("num_samples") or 0) if fmt in SAMPLING_FORMATS else 0,
            "temperature": float(info.get("temperature") or 1.0),
            "top_k": int(info.get("top_k") or 0),
            "top_p": float(info.get("top_p") or 1.0),
            # a replayed counts-only store (sensai.store) answers without teacher log-probs
            "has_logprobs": info.get("store_level") != "counts",
        }

    def get_teacher_logits(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        seed: int | None = None,
        timeout: Any = _UNSET,
        copy: bool | None = None,
    ) -> TeacherOutput:
        """The teacher's output for a batch of token ids [B, S] (numpy or torch; torch is
        moved to the CPU). ``seed`` makes the server's sampling reproducible.

        ``copy`` (default: only on shared memory) copies the tensors out of the received
        message. On shared memory a live message holds one of the slot's few response
        buffers (2 by default), so keeping uncopied outputs alive would soon block further
        requests with `CapacityError`. Uncopied tensors view the message's buffer; the
        message is kept in ``output.extra["message"]`` so the buffer outlives them.
        """
        ids = _ids_array(input_ids, "input_ids")
        tensors = [ids]
        if attention_mask is not None:
            mask = _ids_array(attention_mask, "attention_mask")
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}"
                )
            tensors.append(mask)
        tag, value = 0, 0
        if seed is not None:
            seed = int(seed)
            if not 0 <= seed < 1 << 64:
                raise ValueError(f"seed must be in [0, 2**64), got {seed}")
            tag, value = SEED_FLAG, seed
        self.info()  # the parameters to decode with (cached)
        ep = self._ep()
        if self._epoch is not None and hasattr(ep, "set_epoch"):
            ep.set_epoch(self._epoch)  # a replay endpoint (sensai.store)
        with self._lock:
            msg = ep.request_message(tensors, tag=tag, value=value, timeout=self._timeout(timeout))
        from .formats import TeacherOutput, format_name

        fmt = format_name(msg.tag)
        if copy is None:
            copy = self._kind == "shared_memory"
        out = TeacherOutput.from_arrays(msg.tag, message_arrays(msg, copy), **self._params(fmt))
        if not copy:
            out.extra["message"] = msg  # the tensors view its buffer
        return out

    def send_tensor(self, tensor: Any, interval: float = 0.001, timeout: Any = _UNSET) -> Any:
        """The seed's raw request: send ``tensor`` (an array or a list) and return the
        server's tensors as they came (``interval`` is ignored: the transport blocks)."""
        ep = self._ep()
        with self._lock:
            return ep.request(tensor, timeout=self._timeout(timeout))


class SensAIClient:
    """Send tensors through a client endpoint and wait for the answer.

    Fork-aware over SensAI's own endpoints: used in a process other than the one that
    opened ``transport`` (a forked DataLoader worker), it first opens its own endpoint to
    the same server, on the same slot if it is free, else on any free one, and uses that
    from then on (``self.transport``). The inherited endpoint is let go of, which leaves the
    parent's slot untouched. A transport of the user's own is used as it is.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._pid = os.getpid()

    def _transport(self) -> Any:
        """This process's transport, opening one first in a forked child."""
        pid = os.getpid()
        if pid != self._pid:
            reopen = getattr(self.transport, "reopen", None)
            if reopen is not None:
                # The parent's endpoint is dropped here: in this process that only closes its
                # copies of the descriptors, never the parent's slot (see ForkError).
                self.transport = reopen()
                log.info(
                    "process %d: opened its own endpoint to %s on slot %s (it was forked "
                    "from process %d, whose endpoint it must not use)",
                    pid,
                    self.transport.path,
                    self.transport.slot_id,
                    self._pid,
                )
            self._pid = pid
        return self.transport

    def send_tensor(
        self, tensor: Any, interval: float = 0.001, timeout: float | None = None
    ) -> Any:
        """Send ``tensor`` (an array or a list) and return the server's answer.

        Built-in transports block efficiently (``interval`` is ignored); a user transport
        without ``request`` is polled every ``interval`` seconds as in the seed.
        """
        transport = self._transport()
        request = getattr(transport, "request", None)
        if request is not None:
            return request(tensor, timeout=timeout)
        transport.write_tensor(tensor)
        while not transport.is_ready():
            time.sleep(interval)
        return transport.read_tensor()
