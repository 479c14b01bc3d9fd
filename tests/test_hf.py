"""`sensai.hf.DistillationTrainer`: a stock `transformers.Trainer` run against a live server."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import Dataset

from sensai import Client, wrap_collate_function
from sensai.hf import DistillationTrainer
from sensai.losses import full_kd_loss
from test_service import Server
from tiny_model import TINY_VOCAB, build_model


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


def test_bad_trainer_options_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="kd_weight must be in"):
        DistillationTrainer(model=None, kd_weight=1.5)
    with pytest.raises(ValueError, match="kd_loss must be one of"):
        DistillationTrainer(model=None, kd_loss="mse")


# ------------------------------------------------------------------------ install checks
def test_missing_accelerate_is_named_at_import() -> None:
    code = "import sys; sys.modules['accelerate'] = None; import sensai.hf"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "sensai.hf needs the accelerate package" in done.stderr
    assert "pip install 'sensai[hf]'" in done.stderr
