"""Hugging Face ``transformers.Trainer`` integration: a trainer whose loss mixes cross-entropy
with distillation from a SensAI server.

Only ``compute_loss`` is overridden (and ``log``, to report the two parts); everything else is
the stock Trainer. The teacher's answer comes in the batch, put there by
`sensai.wrap_collate_function` in each DataLoader worker::

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
teacher request failed (the wrapper warned) trains on cross-entropy alone.

Needs ``accelerate`` (the Trainer does): ``pip install 'sensai[hf]'``.
"""

from __future__ import annotations

import importlib.util
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
        self._parts: dict[str, list[torch.Tensor]] = {"kd_loss": [], "ce_loss": []}
        self._warned_missing = False

    def _split_teacher(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        attr = self.teacher_attribute
        teacher = teacher_from_batch(inputs, attr)
        model_inputs = {
            k: v for k, v in inputs.items() if not (k == attr or k.startswith(attr + "_"))
        }
        return model_inputs, teacher

    def _kd_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer takes this step's loss as already divided over gradient
        accumulation (as it decides in ``training_step``): then the KD term, a per-batch
        mean, is divided here so both parts are weighed alike."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

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
            self._parts["kd_loss"].append(kd.detach())  # no device sync per step
            if ce is None:
                loss = kd
            else:
                if self._kd_is_scaled_for_ga(num_items_in_batch):
                    steps = getattr(self, "current_gradient_accumulation_steps", None)
                    kd = kd / (steps or self.args.gradient_accumulation_steps)
                loss = (1.0 - self.kd_weight) * ce + self.kd_weight * kd
        if ce is not None:
            self._parts["ce_loss"].append(ce.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for name, values in self._parts.items():
            if values and "loss" in logs:
                logs[name] = round(float(torch.stack(values).float().mean()), 4)
                values.clear()
        super().log(logs, *args, **kwargs)
