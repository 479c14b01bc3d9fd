"""Distil a running SensAI teacher into a small student with a Hugging Face ``Trainer``.

    sensai serve --shm-path /dev/shm/sensai-hf &   # prints its address when ready
    python examples/hf_trainer/train.py --address shm:///dev/shm/sensai-hf [--max-steps 50]

`sensai.hf.DistillationTrainer` is a stock ``transformers.Trainer`` whose loss is
``(1 - kd_weight) * cross-entropy + kd_weight * sampled KD``; the teacher's answer for each
batch is fetched by the DataLoader workers through `sensai.wrap_collate_function`. The student
is a 2-layer Llama (random init) with the teacher's vocabulary and tokenizer (``--model``
names the teacher the server runs, default the embedded SmolLM2), the text the docstrings of
a few standard-library modules. Training logs show ``loss``, ``kd_loss`` and ``ce_loss``, and
evaluation ``eval_kd_loss`` and ``eval_ce_loss``. Needs ``pip install 'sensai[hf]'``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import Dataset

from sensai import Client, wrap_collate_function
from sensai.hf import DistillationTrainer  # before transformers: names what to install
from sensai.teacher import load_tokenizer

MODULES = ("argparse", "collections", "functools", "itertools", "json", "pathlib", "typing")


class TextRows(Dataset):
    """Fixed-length rows of token ids; each item a dict with input_ids and labels."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def token_rows(tokenizer, seq_len: int) -> torch.Tensor:
    """The modules' docstrings, joined by eos and cut into rows of ``seq_len`` tokens."""
    ids: list[int] = []
    for name in MODULES:
        doc = __import__(name).__doc__ or ""
        ids += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    if n < 2:
        raise SystemExit(f"not enough text for two rows of {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True, help="the address `sensai serve` printed")
    ap.add_argument("--model", default=None, help="the teacher the server runs (its tokenizer)")
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--kd-weight", type=float, default=0.9)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--output-dir", default="hf-distill-out")
    args = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    client = Client(args.address, connect_timeout=30)
    info = client.info()  # model, vocabulary, format: nothing hard-coded
    tokenizer = load_tokenizer(args.model)
    rows = token_rows(tokenizer, args.seq_len)
    held = max(1, len(rows) // 10)
    train_set, eval_set = TextRows(rows[held:]), TextRows(rows[:held])
    torch.manual_seed(0)
    student = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=info["vocab_size"],
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(args.seq_len, 128),
            tie_word_embeddings=True,
        )
    )
    trainer = DistillationTrainer(
        model=student,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.max_steps // 10),
            logging_steps=max(1, args.max_steps // 10),
            eval_strategy="steps",
            eval_steps=max(1, args.max_steps // 2),
            dataloader_num_workers=args.workers,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=wrap_collate_function(collate, client),
        kd_weight=args.kd_weight,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(
        f"held out ({len(eval_set)} rows): KD {metrics['eval_kd_loss']:.3f}, "
        f"cross-entropy {metrics['eval_ce_loss']:.3f} nats/token"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
