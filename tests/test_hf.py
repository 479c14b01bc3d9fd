"""`sensai.hf.DistillationTrainer`: a stock `transformers.Trainer` run against a live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from sensai import Client, wrap_collate_function
from sensai.hf import DistillationTrainer
from sensai.losses import full_kd_loss
from test_service import Server
from tiny_model import TINY_VOCAB, build_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer" / "train.py"


class _Rows(Dataset):
    def __init__(self, n: int, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, TINY_VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _held_out_kl(student, tiny_teacher, rows: torch.Tensor) -> float:
    with torch.no_grad():
        full = tiny_teacher.compute(rows, output_format="full")
        return float(full_kd_loss(student(input_ids=rows).logits, full))


@pytest.mark.timeout(300)
def test_trainer_distils_from_a_live_server(tiny_model_dir, tiny_teacher, tmp_path) -> None:
    from transformers import TrainingArguments

    server = Server(tiny_model_dir, "shared_memory", "--seed", "0")
    try:
        client = Client(server.address, connect_timeout=30)
        student = build_model(TINY_VOCAB, 0, 1, seed=1).train()
        held_out = _Rows(8, seed=99).rows
        kl_before = _held_out_kl(student, tiny_teacher, held_out)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=12,
            per_device_train_batch_size=4,
            learning_rate=2e-2,
            lr_scheduler_type="constant",
            logging_steps=4,
            report_to=[],
            save_strategy="no",
            dataloader_num_workers=2,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = DistillationTrainer(
            model=student,
            args=args,
            train_dataset=_Rows(48),
            data_collator=wrap_collate_function(_collate, client),
            kd_weight=0.9,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no batch may miss its teacher
            trainer.train()
        logged = [h for h in trainer.state.log_history if "kd_loss" in h]
        assert len(logged) == 3, trainer.state.log_history
        assert all("ce_loss" in h and h["kd_loss"] > 0 for h in logged)
        assert all(h["teacher_share"] == 1.0 for h in logged)
        assert logged[-1]["kd_loss"] < logged[0]["kd_loss"]
        kl_after = _held_out_kl(student.eval(), tiny_teacher, held_out)
        assert kl_after < 0.85 * kl_before, (kl_before, kl_after)
    finally:
        server.cleanup()


def test_trainer_without_a_teacher_answer_trains_on_cross_entropy(tmp_path) -> None:
    from transformers import TrainingArguments

    student = build_model(TINY_VOCAB, 0, 1, seed=1).train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=_Rows(4), data_collator=_collate
    )
    with pytest.warns(RuntimeWarning, match="holds no teacher answer"):
        trainer.train()
    shares = [h["teacher_share"] for h in trainer.state.log_history if "teacher_share" in h]
    assert shares and all(s == 0.0 for s in shares), trainer.state.log_history


def test_bad_trainer_options_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="kd_weight must be in"):
        DistillationTrainer(model=None, kd_weight=1.5)
    with pytest.raises(ValueError, match="kd_loss must be one of"):
        DistillationTrainer(model=None, kd_loss="mse")


# ------------------------------------------------------------------ gradient accumulation
class _Fake:
    """Stands in for a trainer in `DistillationTrainer._kd_is_scaled_for_ga`: only the
    attributes a case sets exist, as on a transformers version that lacks the others."""

    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


class _TakesKwargs(torch.nn.Module):
    def forward(self, input_ids, labels=None, **kwargs): ...


class _TakesNoKwargs(torch.nn.Module):
    def forward(self, input_ids, labels=None): ...


@pytest.mark.parametrize(
    "attrs, num_items, expected",
    [
        # the public switch wins, whatever else holds
        ({"loss_is_scaled_for_ga": True}, None, True),
        ({"loss_is_scaled_for_ga": False, "model_accepts_loss_kwargs": True}, 10, False),
        # a compute_loss_func owns the scaling: the Trainer never divides
        ({"model_accepts_loss_kwargs": False, "compute_loss_func": len}, 10, True),
        ({"compute_loss_func": len}, None, True),
        # no count: every version divides the loss itself
        ({"loss_is_scaled_for_ga": None, "model_accepts_loss_kwargs": True}, None, False),
        ({"model": _TakesKwargs()}, None, False),
        # a count, and the model's cross-entropy was normalised by it
        ({"loss_is_scaled_for_ga": None, "model_accepts_loss_kwargs": True}, 10, True),
        # a count the model never saw: the Trainer divides
        ({"model_accepts_loss_kwargs": False, "compute_loss_func": None}, 10, False),
        # a version without model_accepts_loss_kwargs: the model's forward decides
        ({"model": _TakesKwargs()}, 10, True),
        ({"model": _TakesNoKwargs()}, 10, False),
    ],
)
def test_kd_scaling_for_gradient_accumulation_follows_the_trainer(attrs, num_items, expected):
    fake = _Fake(**attrs)
    assert DistillationTrainer._kd_is_scaled_for_ga(fake, num_items) is expected


class _FullTeacherCollate:
    """Collates rows and adds the in-process tiny teacher's full logits, where the collate
    wrapper would put a served answer (deterministic: no sampling)."""

    def __init__(self, teacher) -> None:
        self.teacher = teacher

    def __call__(self, items):
        batch = _collate(items)
        with torch.no_grad():
            batch["teacher_logits_output"] = self.teacher.compute(
                batch["input_ids"], output_format="full"
            )
        return batch


def _one_sgd_step(tmp_path, tiny_teacher, batch, accumulation, setup=None, **trainer_kw):
    """The parameter change of one SGD step (lr 1, no clipping: minus the gradient) over the
    same 4 rows, in one batch or accumulated over several."""
    from transformers import TrainingArguments

    student = build_model(TINY_VOCAB, 0, 1, seed=1).train()
    before = [p.detach().clone() for p in student.parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"ga{accumulation}"),
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=_Rows(4, seed=3),
        data_collator=_FullTeacherCollate(tiny_teacher),
        kd_weight=0.5,
        kd_loss="full",
        **trainer_kw,
    )
    if setup is not None:
        setup(trainer)
    trainer.train()
    deltas = [p.detach() - b for p, b in zip(student.parameters(), before, strict=True)]
    return torch.cat([d.flatten() for d in deltas]), trainer


def _ce_sum_over_items(outputs, labels, num_items_in_batch=None):
    logits = outputs["logits"][:, :-1].flatten(0, 1).float()
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), reduction="sum")
    return ce / (num_items_in_batch if num_items_in_batch is not None else labels[:, 1:].numel())


def _no_loss_kwargs(trainer) -> None:
    trainer.model_accepts_loss_kwargs = False  # as for a model whose forward takes none


@pytest.mark.parametrize(
    "setup, trainer_kw",
    [
        (None, {}),  # Llama takes loss kwargs: its CE is normalised over the accumulated batch
        (_no_loss_kwargs, {}),  # per-batch CE: the Trainer divides the whole loss
        (None, {"compute_loss_func": _ce_sum_over_items}),
    ],
    ids=["model-loss-kwargs", "no-loss-kwargs", "compute_loss_func"],
)
def test_gradient_accumulation_gives_the_one_batch_gradient(
    tmp_path, tiny_teacher, setup, trainer_kw
) -> None:
    one, _ = _one_sgd_step(tmp_path, tiny_teacher, 4, 1, setup, **trainer_kw)
    two, trainer = _one_sgd_step(tmp_path, tiny_teacher, 2, 2, setup, **trainer_kw)
    assert one.abs().max() > 0
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)
    logged = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert logged and logged[0]["ce_loss"] > 1.0, logged  # per batch, not halved

    # The test tells a wrong decision apart: KD off by the accumulation factor.
    wrong = DistillationTrainer._kd_is_scaled_for_ga
    try:
        DistillationTrainer._kd_is_scaled_for_ga = lambda self, n: not wrong(self, n)
        off, _ = _one_sgd_step(tmp_path, tiny_teacher, 2, 2, setup, **trainer_kw)
    finally:
        DistillationTrainer._kd_is_scaled_for_ga = wrong
    assert not torch.allclose(off, one, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------ logging
class _ConstantKd:
    """A KD 'loss' whose value names the mode: 1 on training batches (2 rows), 100 on
    evaluation batches (3 rows); zero gradient."""

    def __call__(self, logits, teacher, temperature):
        return logits.sum() * 0 + (100.0 if logits.shape[0] == 3 else 1.0)


def test_evaluation_kd_stays_out_of_training_logs(tmp_path, tiny_teacher) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=build_model(TINY_VOCAB, 0, 1, seed=1).train(),
        args=args,
        train_dataset=_Rows(12),
        eval_dataset=_Rows(6, seed=5),
        data_collator=_FullTeacherCollate(tiny_teacher),
        kd_loss=_ConstantKd(),
    )
    trainer.train()
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(train_logs) == 3 and len(eval_logs) == 6, history
    assert all(h["kd_loss"] == 1.0 for h in train_logs), train_logs
    assert all(h["eval_kd_loss"] == 100.0 and h["eval_ce_loss"] > 0 for h in eval_logs)
    assert not any("kd_loss" in h for h in eval_logs) and not any(
        "eval_kd_loss" in h for h in train_logs
    )
    trainer.predict(_Rows(3, seed=6))  # values from predict() never reach a later evaluate()
    metrics = trainer.evaluate(_Rows(2, seed=7))  # 2 rows: KD 1, unlike predict's 3-row 100
    assert metrics["eval_kd_loss"] == 1.0, metrics


# ------------------------------------------------------------------------ install checks
def test_missing_accelerate_is_named_at_import() -> None:
    code = "import sys; sys.modules['accelerate'] = None; import sensai.hf"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "sensai.hf needs the accelerate package" in done.stderr
    assert "pip install 'sensai[hf]'" in done.stderr


# ----------------------------------------------------------------------------- example
@pytest.mark.timeout(300)
def test_hf_trainer_example_runs(tiny_model_dir, tmp_path) -> None:
    server = Server(tiny_model_dir, "shared_memory", "--num-clients", "8")
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(EXAMPLE),
                "--address",
                server.address,
                "--model",
                tiny_model_dir,
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--output-dir",
                str(tmp_path),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=280,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        server.cleanup()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "'kd_loss'" in done.stdout and "'eval_kd_loss'" in done.stdout, done.stdout
    assert re.search(r"held out \(\d+ rows\): KD \d+\.\d+, cross-entropy \d+\.\d+", done.stdout)
