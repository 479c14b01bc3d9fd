"""Hugging Face ``transformers.Trainer`` integration: a trainer whose loss mixes cross-entropy
with distillation from a SensAI server.

``compute_loss`` is overridden for the loss; ``log`` and ``evaluate`` only to report the two
parts (``kd_loss``/``ce_loss`` in training logs, ``eval_kd_loss``/``eval_ce_loss`` in
evaluation metrics). Everything else is the stock Trainer. The teacher's answer comes in the
batch, put there by `sensai.wrap_collate_function` in each DataLoader worker (a runnable
version: ``examples/hf_trainer/train.py``)::

    from sensai import Client, wrap_collate_function
    from sensai.hf import DistillationTrainer

    client = Client("shm:///dev/shm/sensai")
    trainer = DistillationTrainer(
        model=student,
        args=TrainingArguments("out", dataloader_num_workers=2, max_steps=1000),
        train_dataset=dataset,  # items: dicts with input_ids (and labels for cross-entropy)
        data_collator=wrap_collate_function(collate, client),
        kd_weight=0.5,
    )
    trainer.train()

The loss is ``(1 - kd_weight) * cross_entropy + kd_weight * kd``, where ``kd`` is
`sensai.losses.sampled_kd_loss` (or ``kd_loss="topk"``/``"full"``, or any callable with the
same signature) between the student's logits and the teacher's answer. Cross-entropy is the
model's own loss from ``labels``; without labels the loss is the KD alone. A batch whose
teacher request failed (the wrapper warned) trains on cross-entropy alone. With gradient
accumulation the KD term (a mean over the batch's positions) is scaled like the Trainer
scales the cross-entropy, so both keep their weights.

Needs ``accelerate`` (the Trainer does): ``pip install 'sensai[hf]'``.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

if importlib.util.find_spec("accelerate") is None:
    raise ImportError(
        "sensai.hf needs the accelerate package (transformers' Trainer and TrainingArguments "
        "require it), which is not installed: pip install 'sensai[hf]' (or: pip install "
        "'accelerate>=0.30')"
    )

import torch
from transformers import Trainer

from .losses import full_kd_loss, sampled_kd_loss, teacher_from_batch, topk_kd_loss

__all__ = ["DistillationTrainer"]

log = logging.getLogger("sensai.hf")

_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sampled": sampled_kd_loss,
    "topk": topk_kd_loss,
    "full": full_kd_loss,
}


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that adds knowledge distillation from a SensAI teacher.

    Keyword arguments on top of the Trainer's:

    - ``kd_weight`` (0.5): weight of the KD term, in [0, 1]; cross-entropy gets the rest.
    - ``kd_temperature`` (1.0): the distillation temperature (see `sensai.losses`).
    - ``kd_loss`` ("sampled"): "sampled", "topk", "full", or a callable
      ``(student_logits, teacher, temperature) -> scalar``.
    - ``teacher_attribute`` ("teacher_logits"): the prefix the collate wrapper stored the
      answer under; every batch key with that prefix is removed before the model is called.
    - ``kd_loss_kwargs``: extra keyword arguments for the loss (e.g. ``{"truncated": True}``).

    The mean KD and cross-entropy since the last log are added to the Trainer's logs as
    ``kd_loss`` and ``ce_loss``.
    """

    def __init__(
        self,
        *args: Any,
        kd_weight: float = 0.5,
        kd_temperature: float = 1.0,
        kd_loss: str | Callable[..., torch.Tensor] = "sampled",
        teacher_attribute: str = "teacher_logits",
        kd_loss_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= float(kd_weight) <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight!r}")
        if isinstance(kd_loss, str):
            if kd_loss not in _LOSSES:
                raise ValueError(
                    f"kd_loss must be one of {sorted(_LOSSES)} or a callable, got {kd_loss!r}"
                )
            kd_loss = _LOSSES[kd_loss]
        elif not callable(kd_loss):
            raise TypeError(f"kd_loss must be a name or a callable, got {type(kd_loss).__name__}")
        super().__init__(*args, **kwargs)
        self.kd_weight = float(kd_weight)
        self.kd_temperature = float(kd_temperature)
        self.kd_loss_fn = kd_loss
        self.kd_loss_kwargs = dict(kd_loss_kwargs or {})
        self.teacher_attribute = teacher_attribute
        # Per mode ("train": the model in training mode, "eval": evaluate/predict), the parts
        # since they were last logged: evaluation never leaks into a training log entry.
        self._parts: dict[str, dict[str, list[torch.Tensor]]] = {
            mode: {"kd_loss": [], "ce_loss": []} for mode in ("train", "eval")
        }
        self._warned_missing = False
        self._evaluating = False
        # Training batches since the last log entry: (with a teacher answer, all).
        self._teacher_steps = [0, 0]
        self._teacher_total = [0, 0]

    def _split_teacher(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        attr = self.teacher_attribute
        teacher = teacher_from_batch(inputs, attr)
        model_inputs = {
            k: v for k, v in inputs.items() if not (k == attr or k.startswith(attr + "_"))
        }
        return model_inputs, teacher

    def _kd_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer takes this training step's loss as already divided over the
        gradient accumulation steps (and so will not divide it): then the KD term, a mean
        over this batch, is divided here, and both parts keep their weights.

        In order, so that it holds across transformers versions:

        1. ``loss_is_scaled_for_ga`` when set (the public switch of recent versions, also
           settable by a user on this trainer);
        2. a ``compute_loss_func`` was given: the Trainer leaves the loss to it, never
           dividing (every version that has the argument);
        3. no ``num_items_in_batch`` (every version before 4.46; later ones when they do not
           count label tokens): the Trainer divides the loss itself;
        4. with the count, the Trainer leaves the loss alone exactly when the model's
           cross-entropy was normalised by it: the model takes loss keyword arguments
           (``model_accepts_loss_kwargs``, or, where a version lacks that attribute, a
           ``num_items_in_batch`` or ``**kwargs`` parameter of its ``forward``).
        """
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        if getattr(self, "compute_loss_func", None) is not None:
            return True
        if num_items_in_batch is None:
            return False
        accepts = getattr(self, "model_accepts_loss_kwargs", None)
        if accepts is None:
            accepts = _forward_takes_loss_kwargs(self.model)
        return bool(accepts)

    def _accumulation_steps(self) -> int:
        """Micro-batches in this optimizer step (fewer at the end of an epoch)."""
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return int(steps or self.args.gradient_accumulation_steps)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        model_inputs, teacher = self._split_teacher(inputs)
        has_labels = model_inputs.get("labels") is not None
        if has_labels:
            ce, outputs = super().compute_loss(
                model, model_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        else:
            outputs = model(**model_inputs)
            ce = None
        training = model.training
        parts = self._parts["train" if training else "eval"]
        # Evaluation losses are never divided for accumulation (no backward pass).
        scaled = training and self._kd_is_scaled_for_ga(num_items_in_batch)
        steps = self._accumulation_steps() if scaled else 1
        if ce is not None:
            # Logged per batch, as without accumulation (the Trainer's own loss is its sum).
            parts["ce_loss"].append(ce.detach() * steps)  # no device sync per step
        if training:
            for counts in (self._teacher_steps, self._teacher_total):
                counts[0] += teacher is not None
                counts[1] += 1
        if teacher is None:
            if not self._warned_missing:
                warnings.warn(
                    f"a batch holds no teacher answer ({self.teacher_attribute}_output): it "
                    "trains on cross-entropy alone (was the data collator wrapped with "
                    "sensai.wrap_collate_function, and is the server up?)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned_missing = True
            if ce is None:
                raise ValueError(
                    "a batch has neither labels nor a teacher answer: nothing to train on"
                )
            loss = ce
        else:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            kd = self.kd_loss_fn(logits, teacher, self.kd_temperature, **self.kd_loss_kwargs)
            parts["kd_loss"].append(kd.detach())
            kd = kd / steps
            loss = kd if ce is None else (1.0 - self.kd_weight) * ce + self.kd_weight * kd
        return (loss, outputs) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            with_teacher, batches = self._teacher_total
            if batches and with_teacher < batches:
                log.warning(
                    "%d of %d training batches had no teacher answer and trained on "
                    "cross-entropy alone",
                    batches - with_teacher,
                    batches,
                )

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        for values in self._parts["eval"].values():  # nothing from an earlier predict()
            values.clear()
        outer, self._evaluating = self._evaluating, True  # nested: one call per eval set
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = outer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log entry: the parts since the last one
            self._add_parts(logs, "train", "")
            with_teacher, batches = self._teacher_steps
            if batches:
                # The share of batches since the last entry that had the teacher's answer.
                logs["teacher_share"] = round(with_teacher / batches, 4)
                self._teacher_steps = [0, 0]
        elif self._evaluating:  # evaluate()'s metrics: <prefix>_loss, <prefix>_runtime, ...
            prefix = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime")), None)
            if prefix is not None:
                self._add_parts(logs, "eval", prefix + "_")
        super().log(logs, *args, **kwargs)

    def _add_parts(self, logs: dict[str, float], mode: str, prefix: str) -> None:
        for name, values in self._parts[mode].items():
            if values:
                logs[prefix + name] = round(float(torch.stack(values).float().mean()), 4)
                values.clear()


def _forward_takes_loss_kwargs(model: Any) -> bool:
    """Whether ``model.forward`` takes ``num_items_in_batch`` (named or through ``**kwargs``),
    as the Trainer checks where it has no ``model_accepts_loss_kwargs``."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return False
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch" for p in params
    )
