"""Helpers on the seed's import path (``sensai.utils``): the DataLoader collate wrapper."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .transports import create_transport

__all__ = ["create_transport", "wrap_collate_function"]

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


def _request_teacher_logits_with_retry(
    client: Any,
    input_tensor: Any,
    num_retries: int,
    retry_delay: float,
    attention_mask: Any = None,
) -> Any:
    """Ask ``client`` for the teacher's answer, trying up to ``num_retries`` times (at least
    once) and sleeping ``retry_delay`` seconds between tries; each failure warns with a
    `RuntimeWarning`. Returns the answer, or None when every try failed.

    With a `sensai.client.Client` the answer is a `TeacherOutput`; with any other client
    (the seed's `SensAIClient`) it is what ``send_tensor`` returns.
    """
    from .client import Client

    attempts = max(1, int(num_retries))
    for attempt in range(1, attempts + 1):
        try:
            if isinstance(client, Client):
                return client.get_teacher_logits(input_tensor, attention_mask)
            payload = input_tensor if attention_mask is None else [input_tensor, attention_mask]
            return client.send_tensor(payload)
        except Exception as e:  # noqa: BLE001 - any failure degrades to "no teacher logits"
            warnings.warn(
                f"teacher logits request failed (attempt {attempt}/{attempts}): "
                f"{type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=2,
            )
            if attempt < attempts and retry_delay > 0:
                time.sleep(retry_delay)
    return None


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


def wrap_collate_function(
    collate_fn: Callable[[list], Any],
    sensai_client: Any,
    teacher_logits_attribute: str = "teacher_logits",
    num_retries: int = 3,
    retry_delay: float = 0.1,
) -> Callable[[list], Any]:
    """A collate function that adds the teacher's answer to each batch.

    ``collate_fn(batch)`` must return a dict with ``input_ids`` (numpy or torch); its
    ``attention_mask`` is sent too when present. A two-tensor answer is stored as
    ``<attr>_indices`` and ``<attr>_values``, a single tensor as ``<attr>``. With a
    `sensai.client.Client` every tensor of the `TeacherOutput` is stored under the same
    prefix (``<attr>_indices``, ``<attr>_values``, ``<attr>_logz_sampled``,
    ``<attr>_logz_full``, ``<attr>_mask``, or the format's own tensors such as
    ``<attr>_tokens``; ``full`` logits go to ``<attr>``), plus ``<attr>_format`` and the
    whole `TeacherOutput` as ``<attr>_output`` (what the `sensai.losses` functions take:
    ``sampled_kd_loss(student_logits, batch["teacher_logits_output"])``).
    A batch that already has the attribute is left alone. When every try fails, the
    batch comes back without teacher logits (each failure warns with `RuntimeWarning`).
    A `Client` works in DataLoader workers: each worker opens its own slot.
    """
    attr = teacher_logits_attribute

    @functools.wraps(collate_fn)
    def wrapped(batch: list) -> Any:
        out = collate_fn(batch)
        if not isinstance(out, dict):
            raise ValueError(
                f"the collate function must return a dict with 'input_ids', "
                f"got {type(out).__name__}"
            )
        if "input_ids" not in out:
            raise ValueError(
                f"the collated batch has no 'input_ids' (keys: {sorted(map(str, out))})"
            )
        input_ids = out["input_ids"]
        if not _is_tensor(input_ids):
            raise ValueError(
                f"input_ids must be a numpy array or a torch tensor, got {type(input_ids).__name__}"
            )
        if any(k in out for k in (attr, f"{attr}_indices", f"{attr}_format", f"{attr}_output")):
            return out
        mask = out.get("attention_mask")
        if mask is not None and not _is_tensor(mask):
            raise ValueError(
                f"attention_mask must be a numpy array or a torch tensor, got {type(mask).__name__}"
            )
        answer = _request_teacher_logits_with_retry(
            sensai_client, input_ids, num_retries, retry_delay, attention_mask=mask
        )
        if answer is not None:
            _store(out, attr, answer)
        return out

    return wrapped
