"""The DataLoader collate wrapper: adds the teacher's answer to every batch."""

from __future__ import annotations

import functools
import logging
import multiprocessing.util
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import (
    CapacityError,
    NoTeacherError,
    PeerGoneError,
    RemoteError,
    TransportTimeout,
)

__all__ = ["ON_ERROR", "TeacherCollate", "request_teacher_logits", "wrap_collate_function"]

log = logging.getLogger("sensai.collate")

# TeacherOutput fields stored by the wrapper, when the format has them.
_OUTPUT_FIELDS = (
    "indices",
    "values",
    "logprobs",
    "offsets",
    "tokens",
    "counts",
    "coo_indices",
    "coo_values",
    "logz_sampled",
    "logz_full",
    "mask",
)


def _is_tensor(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return True
    if type(x).__module__.startswith("torch"):
        import torch

        return isinstance(x, torch.Tensor)
    return False


def _numel(x: Any) -> int:
    return int(x.numel()) if hasattr(x, "numel") else int(x.size)


def _check_raw_answer(result: Any) -> None:
    """Raise ValueError for what the seed treated as a failed answer: None, something that is
    not an array or a list of arrays, an empty array, or the error indicator ``[-1]``."""
    if result is None:
        raise ValueError("Server returned None")
    items = list(result) if isinstance(result, (list, tuple)) else [result]
    if not items:
        raise ValueError("Server returned an empty list")
    for x in items:
        if not _is_tensor(x):
            raise ValueError(
                f"Server returned invalid type: {type(x).__name__} (expected an array or a "
                "list of arrays)"
            )
    if not isinstance(result, (list, tuple)) and _numel(result) == 0:
        raise ValueError("Server returned empty tensor")
    for x in items:
        if _numel(x) == 1 and float(x.reshape(-1)[0]) == -1:
            raise ValueError("Server returned error indicator")


def request_teacher_logits(
    client: Any,
    input_tensor: Any,
    num_retries: int,
    retry_delay: float,
    attention_mask: Any = None,
) -> Any:
    """Ask ``client`` for the teacher's answer: one attempt, then up to ``num_retries`` more
    (as the seed), ``retry_delay`` seconds apart; each failure warns with a
    `RuntimeWarning`. Returns the answer, or None when every attempt failed.

    With a `sensai.client.Client` the answer is a `TeacherOutput`; with any other client
    (the seed's `SensAIClient`) it is what ``send_tensor`` returns, and an answer the seed
    counted as a failure (None, not an array or list of arrays, empty, ``[-1]``) fails the
    attempt. ``input_tensor`` may be a numpy array or a torch tensor. A `Client` that has
    no connection yet waits for one once (its ``connect_timeout``) and is not retried.
    """
    return _request(client, input_tensor, num_retries, retry_delay, attention_mask)[0]


def _warn_attempt(e: BaseException, attempt: int, attempts: int, retry_delay: float) -> None:
    last = attempt == attempts
    warnings.warn(
        (
            f"Teacher logits request failed after {attempts} attempts. Last error: "
            if last
            else f"Teacher logits request failed (attempt {attempt}/{attempts}): "
        )
        + f"{type(e).__name__}: {e}"
        + ("" if last else f". Retrying in {retry_delay}s..."),
        RuntimeWarning,
        stacklevel=4,
    )


def _request(
    client: Any,
    input_tensor: Any,
    num_retries: int,
    retry_delay: float,
    attention_mask: Any = None,
    connect_timeout: Any = None,
) -> tuple[Any, BaseException | None]:
    """``(answer, None)``, or ``(None, the last error)``. A `Client` not yet connected in
    this process connects first, waiting ``connect_timeout`` (None: its own); a failed
    connection is the error at once: retrying would only multiply the wait."""
    from .client import Client

    if isinstance(client, Client) and not client.connected:
        try:
            client.connect() if connect_timeout is None else client.connect(connect_timeout)
        except Exception as e:  # noqa: BLE001 - reported by the caller, with the fix
            _warn_attempt(e, 1, 1, 0.0)
            return None, e
    attempts = 1 + max(0, int(num_retries))
    for attempt in range(1, attempts + 1):
        try:
            if isinstance(client, Client):
                return client.get_teacher_logits(input_tensor, attention_mask), None
            payload = input_tensor if attention_mask is None else [input_tensor, attention_mask]
            result = client.send_tensor(payload)
            _check_raw_answer(result)
            return result, None
        except Exception as e:  # noqa: BLE001 - any failure degrades to "no teacher logits"
            _warn_attempt(e, attempt, attempts, retry_delay)
            if attempt == attempts:
                return None, e
            if retry_delay > 0:
                time.sleep(retry_delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _address_of(client: Any) -> str:
    address = getattr(client, "address", None)
    if address is not None:
        return str(address)
    transport = getattr(client, "transport", client)
    path = getattr(transport, "path", None)
    return str(path) if path is not None else type(client).__name__


def _fix_for(client: Any, e: BaseException) -> str:
    """What to do about ``e``, the reason a batch got no teacher answer."""
    text = str(e)
    if isinstance(e, CapacityError) and "slots" in text and "in use" in text:
        return (
            "every slot of the server is held: start it with --num-clients of at least the "
            "number of DataLoader workers + 1 (the main process keeps one), or use fewer workers"
        )
    address = getattr(client, "address", None)
    if address is not None and isinstance(e, (TransportTimeout, PeerGoneError, OSError)):
        from .transports import describe_address

        there = describe_address(address)
        if there.startswith("nothing is at"):
            fix = "start the server (sensai serve prints its address when ready) or correct it"
        elif "stale file" in there:
            fix = "its server is gone: start it again (it replaces the stale file)"
        elif "live server" in there:
            fix = (
                "it runs but did not answer in time: it may still be loading its model; "
                "raise connect_timeout, or wait for the address it prints"
            )
        else:
            fix = "check the address the server printed"
        return f"{there}; {fix}"
    if isinstance(e, RemoteError):
        return "the server refused the request: see its message (and its log)"
    return "see the error above; the server's log may say more"


def _store(batch: dict, attr: str, answer: Any) -> None:
    from .formats import TeacherOutput

    if isinstance(answer, TeacherOutput):
        batch[f"{attr}_format"] = answer.format
        batch[f"{attr}_output"] = answer  # what sensai.losses take (teacher_from_batch)
        if answer.format == "full":
            batch[attr] = answer.logits
        for name in _OUTPUT_FIELDS:
            value = getattr(answer, name)
            if value is not None:
                batch[f"{attr}_{name}"] = value
        return
    if isinstance(answer, (list, tuple)):
        if len(answer) == 2:
            batch[f"{attr}_indices"], batch[f"{attr}_values"] = answer
            return
        if len(answer) == 1:
            batch[attr] = answer[0]
            return
        batch[attr] = list(answer)
        return
    batch[attr] = answer


ON_ERROR = ("raise", "skip")


class _Counts:
    """Batches seen and those that went without a teacher answer, in one process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.batches = 0
        self.without = 0
        self.reported = (0, 0)  # (batches, without) at the last report
        self.last_error = ""
        self.waited_to_connect = False
        self.finalizer: Any = None


def _report(counts: _Counts, address: str, end: bool) -> None:
    since = counts.without - counts.reported[1]
    if end and counts.without:
        log.warning(
            "%s: process %d ends with %d of its %d batches without a teacher answer; last "
            "cause: %s",
            address,
            counts.pid,
            counts.without,
            counts.batches,
            counts.last_error,
        )
    elif since and not end:
        log.warning(
            "%s: %d of the last %d batches went without a teacher answer (%d of %d in "
            "process %d so far); last cause: %s",
            address,
            since,
            counts.batches - counts.reported[0],
            counts.without,
            counts.batches,
            counts.pid,
            counts.last_error,
        )
    counts.reported = (counts.batches, counts.without)


class TeacherCollate:
    """A collate function that adds the teacher's answer to each batch (see
    `wrap_collate_function`). ``batches`` and ``batches_without_teacher`` count this
    process's batches (each DataLoader worker counts its own)."""

    def __init__(
        self,
        collate_fn: Callable[[list], Any],
        client: Any,
        attr: str,
        num_retries: int,
        retry_delay: float,
        on_error: str,
        report_every: int,
    ) -> None:
        self.collate_fn = collate_fn
        self.client = client
        self.attr = attr
        self.num_retries = num_retries
        self.retry_delay = retry_delay
        self.on_error = on_error
        self.report_every = max(1, int(report_every))
        self._counts = _Counts()
        functools.update_wrapper(self, collate_fn)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_counts"] = None  # a new process counts its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._counts = _Counts()

    def _here(self) -> _Counts:
        if self._counts.pid != os.getpid():  # a forked worker: its own counts
            self._counts = _Counts()
        c = self._counts
        if c.finalizer is None and self.on_error == "skip":
            # The end-of-process report (also in DataLoader workers, which multiprocessing
            # ends through its finalizers); with "raise" the error said it already.
            c.finalizer = multiprocessing.util.Finalize(
                None, _report, args=(c, _address_of(self.client), True), exitpriority=10
            )
        return c

    @property
    def batches(self) -> int:
        return self._here().batches

    @property
    def batches_without_teacher(self) -> int:
        return self._here().without

    def __call__(self, batch: list) -> Any:
        out = self.collate_fn(batch)
        attr = self.attr
        if not isinstance(out, dict):
            raise ValueError(
                "Collate function must return a dictionary. It returned a "
                f"{type(out).__name__}; return a dict with 'input_ids'."
            )
        if "input_ids" not in out:
            raise ValueError(
                "Batch must contain 'input_ids' key for teacher logits request. Its keys are "
                f"{sorted(map(str, out))}."
            )
        input_ids = out["input_ids"]
        if not _is_tensor(input_ids):
            raise ValueError(
                f"input_ids must be numpy array or torch tensor, got {type(input_ids).__name__}."
            )
        if any(k in out for k in (attr, f"{attr}_indices", f"{attr}_format", f"{attr}_output")):
            return out
        mask = out.get("attention_mask")
        if mask is not None and not _is_tensor(mask):
            raise ValueError(
                f"attention_mask must be a numpy array or a torch tensor, got {type(mask).__name__}"
            )
        c = self._here()
        c.batches += 1
        # The first connection waits once; later batches of a process that could not connect
        # look again without waiting.
        connect_timeout = 0.0 if c.waited_to_connect else None
        answer, error = _request(
            self.client, input_ids, self.num_retries, self.retry_delay, mask, connect_timeout
        )
        c.waited_to_connect = True
        if answer is not None:
            _store(out, attr, answer)
        else:
            assert error is not None  # _request returns an answer or its error
            c.without += 1
            c.last_error = f"{type(error).__name__}: {error}"
            if self.on_error == "raise":
                raise NoTeacherError(
                    f"batch {c.batches} of process {c.pid} got no teacher answer from "
                    f"{_address_of(self.client)}: {c.last_error}. Fix: "
                    f"{_fix_for(self.client, error)}. (on_error='skip' returns such batches "
                    "without the teacher's answer instead.)"
                ) from error
            warnings.warn(
                f"Failed to obtain teacher logits after {self.num_retries} retries. "
                f"Continuing without teacher logits. Fix: {_fix_for(self.client, error)}",
                RuntimeWarning,
                stacklevel=2,
            )
        if c.batches - c.reported[0] >= self.report_every:
            _report(c, _address_of(self.client), end=False)
        return out


def wrap_collate_function(
    collate_fn: Callable[[list], Any],
    sensai_client: Any,
    teacher_logits_attribute: str = "teacher_logits",
    num_retries: int = 3,
    retry_delay: float = 0.1,
    *,
    on_error: str | None = None,
    report_every: int = 100,
) -> TeacherCollate:
    """A collate function that adds the teacher's answer to each batch.

    ``collate_fn(batch)`` must return a dict with ``input_ids`` (numpy or torch); its
    ``attention_mask`` is sent too when present. A two-tensor answer is stored as
    ``<attr>_indices`` and ``<attr>_values``, a single tensor as ``<attr>``. With a
    `sensai.client.Client` every tensor of the `TeacherOutput` is stored under the same
    prefix (the README lists the keys of each format), plus ``<attr>_format`` and the
    whole `TeacherOutput` as ``<attr>_output`` (what the `sensai.losses` functions take).
    A batch that already has the attribute is left alone.

    ``sensai_client`` is a `Client`, the seed's `SensAIClient`, or a client endpoint
    (``connect(address)``). A failed request is tried again up to ``num_retries`` times (1 +
    ``num_retries`` attempts, as the seed); a `Client`'s first connection in a process waits
    once, up to its ``connect_timeout``, and is not retried. When a batch cannot get an
    answer, ``on_error`` decides: ``"raise"`` (the default with a `Client`) raises
    `NoTeacherError` naming the cause and the fix; ``"skip"`` (the default otherwise, the
    seed's behaviour) returns the batch without the teacher's answer, warns, and logs every
    ``report_every`` batches and when the process ends how many went without one.
    A `Client` works in DataLoader workers: each worker opens its own slot.
    """
    from .client import Client, SensAIClient

    if on_error is None:
        on_error = "raise" if isinstance(sensai_client, Client) else "skip"
    if on_error not in ON_ERROR:
        raise ValueError(
            f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, got {on_error!r}"
        )
    client = sensai_client
    if not isinstance(client, Client) and not hasattr(client, "send_tensor"):
        if not hasattr(client, "request"):
            raise TypeError(
                "sensai_client must be a sensai.Client, a SensAIClient or a client endpoint "
                f"(connect(address)), got {type(client).__name__}"
            )
        client = SensAIClient(client)  # a raw endpoint: the seed's client over it
    return TeacherCollate(
        collate_fn,
        client,
        teacher_logits_attribute,
        num_retries,
        retry_delay,
        on_error,
        report_every,
    )
