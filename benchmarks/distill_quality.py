"""Distillation quality: what the student learns from each kind of teacher signal.

    python benchmarks/distill_quality.py [--steps 150] [--batch-size 4] [--seq-len 64]
        [--num-samples 64] [--json PATH] [--plot PATH]

The demo's setting (examples/distill/train.py: the embedded SmolLM2-135M-Instruct teacher,
a 2-layer random student with the teacher's vocabulary, standard-library docstrings), four
arms trained side by side from the same student initialisation, on the same batches in the
same order, for the same number of steps, with the same optimizer and schedule:

* ``ce``: cross-entropy only;
* ``sampled``: ``(1 - w) * CE + w * sampled_kd_loss`` (``w``: ``--kd-weight``, 0.9) with the
  teacher's answers served by ``sensai serve`` (compact format, ``--num-samples`` samples at
  temperature 1) to two DataLoader workers through the collate wrapper;
* ``full``: ``(1 - w) * CE + w * full_kd_loss`` against the teacher's full logits, computed
  in this process;
* ``topk``: ``(1 - w) * CE + w * topk_kd_loss`` against the renormalised top-k, k chosen so
  that its bytes per position (int64 id + float32 log-prob per token) match those the
  ``sampled`` arm received on its first batches.

Each arm is evaluated every ``--eval-every`` steps on held-out rows (docstrings it never
trained on) with the exact KL(teacher || student) from the in-process teacher's full logits,
and the cross-entropy. Targets: ``sampled`` ends with a held-out KL >= 20% below ``ce``'s and
within 10% of ``full``'s. Absolute numbers hold only for the machine named in the output.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sensai import Client, wrap_collate_function
from sensai.formats import build_output
from sensai.logits_server import TeacherLogitsServer
from sensai.losses import full_kd_loss, sampled_kd_loss, teacher_from_batch, topk_kd_loss
from sensai.teacher import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("ce", "sampled", "full", "topk")
KL_VS_CE_TARGET = 0.80  # sampled's KL at most 80% of ce's
KL_VS_FULL_TARGET = 1.10  # and at most 110% of full's


def _demo():
    """examples/distill/train.py as a module: the benchmark measures the demo's setting."""
    spec = importlib.util.spec_from_file_location(
        "distill_demo", ROOT / "examples/distill/train.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--kd-weight", type=float, default=0.9, help="weight of KD against CE")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--held-out", type=int, default=32, help="held-out rows")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="teacher (default: the embedded SmolLM2)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--plot", type=Path, default=None, help="write the held-out curves here")
    args = ap.parse_args(argv)
    args.temperature, args.out = 1.0, None
    args.shm_path = f"/dev/shm/sensai-quality-{os.getpid()}"
    return args


def wire_bytes_per_position(out) -> float:
    """Bytes per real position of a teacher answer on the wire (all its tensors)."""
    return out.nbytes / max(1, out.batch_size * out.num_positions)


def topk_bytes_per_position(k: int) -> float:
    """The topk format: k int64 ids + k float32 log-probs, two float32 log-partitions, a mask
    byte."""
    return k * 12 + 8 + 1


@torch.no_grad()
def evaluate(student, teacher_full: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    student.eval()
    kl_sum = ce_sum = 0.0
    n = 0
    for ids, logits in teacher_full:
        out = student(input_ids=ids, labels=ids)
        positions = logits.shape[0] * logits.shape[1]
        kl_sum += float(full_kd_loss(out.logits, logits, reduction="sum"))
        ce_sum += float(out.loss) * positions
        n += positions
    student.train()
    return {"kl": kl_sum / n, "ce": ce_sum / n}


def main(argv=None) -> int:
    args = parse_args(argv)
    demo = _demo()
    torch.manual_seed(args.seed)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    server, address = demo.start_server(args)
    try:
        return run(args, demo, address)
    finally:
        demo.stop_server(server)


def run(args, demo, address: str) -> int:
    started = time.perf_counter()
    client = Client(address)
    info = client.info()
    teacher = TeacherLogitsServer(args.model, device="cpu", num_samples=None)
    tokenizer = load_tokenizer(args.model)
    train_rows, held_rows, _ = demo.token_rows(
        tokenizer, args.seq_len, args.steps * args.batch_size, args.held_out
    )
    print(
        f"teacher {info['model']}: {len(train_rows)} training rows, {len(held_rows)} held-out "
        f"rows of {args.seq_len} tokens; {args.steps} steps of {args.batch_size} rows"
    )
    held_out = [
        (ids, teacher.compute(ids, output_format="full").logits)
        for ids in held_rows.split(args.batch_size)
    ]

    base = demo.build_student(info["vocab_size"], args)
    students = {arm: copy.deepcopy(base) for arm in ARMS}
    optims, scheds = {}, {}
    warmup = max(1, args.steps // 10)

    def schedule(s: int) -> float:
        return (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        )

    for arm, model in students.items():
        optims[arm] = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        scheds[arm] = torch.optim.lr_scheduler.LambdaLR(optims[arm], schedule)

    loader = torch.utils.data.DataLoader(
        demo.Rows(train_rows),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.workers,
        collate_fn=wrap_collate_function(demo.collate, client),
        drop_last=True,
    )
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), args.steps)
    history = {arm: [evaluate(m, held_out)] for arm, m in students.items()}
    eval_steps = [0]
    sampled_bytes: list[float] = []
    k = None
    w = args.kd_weight
    for step, batch in enumerate(tqdm(batches, total=args.steps, desc="arms", unit="step"), 1):
        ids = batch["input_ids"]
        served = teacher_from_batch(batch)
        if served is None:
            raise SystemExit("a batch came back without the teacher's answer (see the warning)")
        with torch.no_grad():
            full = teacher.compute(ids, output_format="full")
        if k is None:  # match the sampled arm's bytes per position on its first batch
            sampled_bytes.append(wire_bytes_per_position(served))
            per_pos = sampled_bytes[0]
            k = max(1, round((per_pos - topk_bytes_per_position(0)) / 12))
        flat = full.logits.reshape(-1, full.logits.shape[-1])
        topk = build_output(
            "topk", [(0, flat)], full.batch_size, full.num_positions, full.vocab_size,
            full.mask, topk=k,
        )  # fmt: skip
        signals = {
            "sampled": (sampled_kd_loss, served),
            "full": (full_kd_loss, full),
            "topk": (topk_kd_loss, topk),
        }
        for arm, model in students.items():
            out = model(input_ids=ids, labels=ids)
            if arm == "ce":
                loss = out.loss
            else:
                kd_loss, target = signals[arm]
                loss = (1 - w) * out.loss + w * kd_loss(out.logits, target)
            optims[arm].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optims[arm].step()
            scheds[arm].step()
        if step % args.eval_every == 0 or step == args.steps:
            eval_steps.append(step)
            for arm, model in students.items():
                history[arm].append(evaluate(model, held_out))

    final = {arm: h[-1] for arm, h in history.items()}
    first = history["ce"][0]
    print(
        f"\nheld-out: {len(held_rows)} rows x {args.seq_len} tokens, exact KL from the full "
        f"teacher logits; at step 0 every arm has KL {first['kl']:.3f}, CE {first['ce']:.3f}"
    )
    print("| arm | teacher signal | bytes/position | held-out KL | vs ce | vs full | held-out CE |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    signal_of = {
        "ce": ("none (labels only)", "0"),
        "sampled": (
            f"{info['num_samples']} samples, compact, served",
            f"{sampled_bytes[0]:.0f}",
        ),
        "full": ("full logits, in-process", f"{full.vocab_size * 4}"),
        "topk": (f"top-{k}, renormalised", f"{topk_bytes_per_position(k):.0f}"),
    }
    for arm in ARMS:
        r = final[arm]
        what, nbytes = signal_of[arm]
        print(
            f"| {arm} | {what} | {nbytes} | {r['kl']:.3f} | {r['kl'] / final['ce']['kl']:.2f}x "
            f"| {r['kl'] / final['full']['kl']:.2f}x | {r['ce']:.3f} |"
        )
    vs_ce = final["sampled"]["kl"] / final["ce"]["kl"]
    vs_full = final["sampled"]["kl"] / final["full"]["kl"]
    print(
        f"targets: sampled KL <= {KL_VS_CE_TARGET:.2f}x ce's: {vs_ce:.2f}x "
        f"({'met' if vs_ce <= KL_VS_CE_TARGET else 'MISSED'}); sampled KL <= "
        f"{KL_VS_FULL_TARGET:.2f}x full's: {vs_full:.2f}x "
        f"({'met' if vs_full <= KL_VS_FULL_TARGET else 'MISSED'}); "
        f"{time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {"node": platform.node(), "cpus": os.cpu_count()},
                    "args": {k_: str(v) for k_, v in vars(args).items()},
                    "topk_k": k,
                    "sampled_bytes_per_position": sampled_bytes[0],
                    "eval_steps": eval_steps,
                    "history": history,
                },
                indent=1,
            )
        )
    if args.plot:
        plot(eval_steps, history, args.plot)
    return 0


def plot(steps: list[int], history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_ce) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ARMS:
        ax_kl.plot(steps, [h["kl"] for h in history[arm]], "o-", label=arm)
        ax_ce.plot(steps, [h["ce"] for h in history[arm]], "o-", label=arm)
    ax_kl.set(xlabel="step", ylabel="held-out KL(teacher || student), nats", yscale="log")
    ax_ce.set(xlabel="step", ylabel="held-out cross-entropy, nats/token")
    for ax in (ax_kl, ax_ce):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
