"""The DataLoader collate wrapper: adds the teacher's answer to every batch."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["request_teacher_logits", "wrap_collate_function"]

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
    attempt. ``input_tensor`` may be a numpy array or a torch tensor.
    """
    from .client import Client

    attempts = 1 + max(0, int(num_retries))
    for attempt in range(1, attempts + 1):
        try:
            if isinstance(client, Client):
                return client.get_teacher_logits(input_tensor, attention_mask)
            payload = input_tensor if attention_mask is None else [input_tensor, attention_mask]
            result = client.send_tensor(payload)
            _check_raw_answer(result)
            return result
        except Exception as e:  # noqa: BLE001 - any failure degrades to "no teacher logits"
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
                stacklevel=2,
            )
            if not last and retry_delay > 0:
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
    A batch that already has the attribute is left alone. A failed request is tried again up
    to ``num_retries`` times (1 + ``num_retries`` attempts, as the seed); when every attempt
    fails, the batch comes back without teacher logits (each failure warns with
    `RuntimeWarning`).
    A `Client` works in DataLoader workers: each worker opens its own slot.
    """
    attr = teacher_logits_attribute

    @functools.wraps(collate_fn)
    def wrapped(batch: list) -> Any:
        out = collate_fn(batch)
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
        answer = request_teacher_logits(
            sensai_client, input_ids, num_retries, retry_delay, attention_mask=mask
        )
        if answer is not None:
            _store(out, attr, answer)
        else:
            warnings.warn(
                f"Failed to obtain teacher logits after {num_retries} retries. "
                "Continuing without teacher logits.",
                RuntimeWarning,
                stacklevel=2,
            )
        return out

    return wrapped
