"""Distil the embedded SmolLM2-135M-Instruct teacher into a small random student, offline.

    python examples/distill/train.py [--steps 40] [--batch-size 4] [--seq-len 64] [--workers 2]
        [--teacher-threads N] [--threads N]

What it does, all on this machine and nothing downloaded:

1. starts ``sensai serve`` (the embedded teacher, compact format, shared memory) in its own
   process and waits for the address it prints;
2. builds the text from the docstrings of the Python standard library installed here (read
   with ``ast``, never imported), tokenised with the teacher's tokenizer, cut into
   ``--seq-len`` token rows; a few rows from other modules are held out;
3. trains a few-layer Llama-shaped student (random init, the teacher's vocabulary) with
   ``(1 - w) * cross-entropy + w * sampled KD`` (`sensai.losses.sampled_kd_loss`), the teacher's
   answers fetched by ``--workers`` DataLoader worker processes through
   `sensai.wrap_collate_function`;
4. prints held-out KL(teacher || student) and cross-entropy before and after, and writes the
   curves to ``<out>/curves.png`` (and the numbers to ``<out>/metrics.json``).

The server is stopped (and its files removed) when training ends, fails or is interrupted
with Ctrl-C. Held-out KL is the unbiased sampled estimate from the teacher's answers (its
standard error is printed beside it).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sensai import Client, TeacherOutput, wrap_collate_function
from sensai.losses import sampled_kd_loss, teacher_from_batch
from sensai.teacher import load_tokenizer


# --------------------------------------------------------------------------------- data
def stdlib_docstrings() -> Iterator[str]:
    """The module, class and function docstrings (>= 200 characters) of the standard library's
    own .py files (no tests, no site-packages), in a fixed order, read lazily."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc


def token_rows(tokenizer, seq_len: int, n_train: int, n_held: int):
    """([n_train, seq_len], [n_held, seq_len]) token ids and the number of docstrings read:
    docstrings joined by the eos token, every tenth one held out (so held-out text is text the
    student never trains on)."""
    train: list[int] = []
    held: list[int] = []
    read = 0
    for read, doc in enumerate(stdlib_docstrings(), start=1):
        ids = train if read % 10 else held
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        ids.append(tokenizer.eos_token_id)
        if len(train) >= n_train * seq_len and len(held) >= n_held * seq_len:
            break

    def rows(ids: list[int], n: int) -> torch.Tensor:
        count = min(n, len(ids) // seq_len)
        if count == 0:
            raise SystemExit(f"not enough text for one row of {seq_len} tokens")
        return torch.tensor(ids[: count * seq_len]).reshape(count, seq_len)

    return rows(train, n_train), rows(held, n_held), read


class Rows(Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(items)
    return {"input_ids": ids, "labels": ids}


# ------------------------------------------------------------------------------ teacher
def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable, "-m", "sensai.cli", "serve",
        "--transport", "shared_memory", "--shm-path", args.shm_path,
        "--format", "compact", "--num-samples", str(args.num_samples),
        "--temperature", str(args.temperature), "--num-clients", str(args.workers + 1),
        "--log-level", "WARNING", *(["--model", args.model] if args.model else []),
        "--threads", str(args.teacher_threads),
    ]  # fmt: skip
    # Its own session: Ctrl-C reaches this program only, which then stops the server cleanly.
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    address = server.stdout.readline().strip() if server.stdout else ""
    if not address:
        server.wait(30)
        raise SystemExit(f"the teacher server did not start (exit {server.returncode}); see above")
    return server, address


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ------------------------------------------------------------------------------ student
def build_student(vocab_size: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(args.seq_len, 128),
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(student, held_out: list[tuple[torch.Tensor, TeacherOutput]]) -> dict[str, float]:
    """Held-out KL(teacher || student) (sampled estimate and its standard error) and
    cross-entropy (nats per token)."""
    student.eval()
    kls, ce_sum, ce_n = [], 0.0, 0
    for ids, teacher in held_out:
        out = student(input_ids=ids, labels=ids)
        per_position = sampled_kd_loss(out.logits, teacher, reduction="none")
        kls.append(per_position[teacher.mask])
        n = ids.numel() - ids.shape[0]
        ce_sum, ce_n = ce_sum + float(out.loss) * n, ce_n + n
    student.train()
    kl = torch.cat(kls)
    return {
        "kl": float(kl.mean()),
        "kl_se": float(kl.std() / math.sqrt(kl.numel())),
        "ce": ce_sum / ce_n,
    }


def plot(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_ce) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(history["train_kl"]) + 1)
    ax_kl.plot(steps, history["train_kl"], alpha=0.4, label="train batch (sampled estimate)")
    ax_kl.plot(history["eval_step"], [e["kl"] for e in history["eval"]], "o-", label="held out")
    ax_kl.set(xlabel="step", ylabel="KL(teacher || student), nats", title="distillation")
    ax_ce.plot(steps, history["train_ce"], alpha=0.4, label="train batch")
    ax_ce.plot(history["eval_step"], [e["ce"] for e in history["eval"]], "o-", label="held out")
    ax_ce.set(xlabel="step", ylabel="cross-entropy, nats/token", title="language modelling")
    for ax in (ax_kl, ax_ce):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--kd-weight", type=float, default=0.9, help="weight of KD against CE")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling = distillation")
    ap.add_argument("--num-samples", type=int, default=64, help="teacher samples per position")
    ap.add_argument("--layers", type=int, default=2, help="student layers")
    ap.add_argument("--hidden", type=int, default=128, help="student hidden size")
    ap.add_argument("--held-out", type=int, default=16, help="held-out rows")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between held-out evals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="teacher (default: the embedded SmolLM2)")
    cores = len(os.sched_getaffinity(0))
    ap.add_argument(
        "--teacher-threads",
        type=int,
        default=max(1, cores // 2),
        help="the teacher server's CPU threads (default: half the cores)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="the student's CPU threads (default: the rest)"
    )
    ap.add_argument("--out", type=Path, default=Path("distill-out"), help="plot and metrics")
    ap.add_argument("--shm-path", default=f"/dev/shm/sensai-distill-{os.getpid()}")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "held_out", "eval_every", "num_samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        ap.error("--seq-len must be >= 2 (a teacher position predicts the next token)")
    if args.workers < 1:
        ap.error("--workers must be >= 1: the teacher is queried from DataLoader workers")
    if not 0.0 <= args.kd_weight <= 1.0:
        ap.error("--kd-weight must be in [0, 1]")
    if args.teacher_threads < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--teacher-threads and --threads must be >= 1")
    if args.threads is None:
        args.threads = max(1, cores - args.teacher_threads)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The teacher and the student share this machine's cores: two thread pools that each take
    # every core thrash (on 2 cores, 1 + 1 threads ran the defaults in 88 s instead of 145 s).
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(
        f"starting the teacher (sensai serve; the first run converts the GGUF, ~40 s); CPU "
        f"threads: {args.teacher_threads} for the teacher, {args.threads} for the student ..."
    )
    server, address = start_server(args)
    try:
        return train(args, address, started)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the teacher server", file=sys.stderr)
        return 130
    finally:
        stop_server(server)


def train(args, address: str, started: float) -> int:
    client = Client(address)
    info = client.info()
    print(
        f"teacher {info['model']} at {address}: vocabulary {info['vocab_size']}, "
        f"{info['output_format']} format, {info['num_samples']} samples at temperature "
        f"{info['temperature']}"
    )
    tokenizer = load_tokenizer(args.model)
    train_rows, held_rows, n_docs = token_rows(
        tokenizer, args.seq_len, args.steps * args.batch_size, args.held_out
    )
    print(
        f"text: {n_docs} standard-library docstrings; {len(train_rows)} training rows and "
        f"{len(held_rows)} held-out rows of {args.seq_len} tokens"
    )
    held_out = [
        (ids, client.get_teacher_logits(ids, seed=args.seed + i))
        for i, ids in enumerate(held_rows.split(args.batch_size))
    ]

    student = build_student(info["vocab_size"], args)
    n_params = sum(p.numel() for p in student.parameters())
    print(f"student: {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.1f}M parameters")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    loader = DataLoader(
        Rows(train_rows),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.workers,
        collate_fn=wrap_collate_function(collate, client),
        drop_last=True,
    )
    history: dict = {"train_kl": [], "train_ce": [], "eval_step": [0], "eval": []}
    history["eval"].append(evaluate(student, held_out))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epochs, as needed
    bar = tqdm(total=args.steps, desc="distilling", unit="step", dynamic_ncols=True)
    w = args.kd_weight
    for step, batch in enumerate(itertools.islice(batches, args.steps), start=1):
        teacher = teacher_from_batch(batch)
        out = student(input_ids=batch["input_ids"], labels=batch["labels"])
        if teacher is None:  # the wrapper warned: this batch trains on cross-entropy alone
            kl = torch.tensor(float("nan"))
            loss = out.loss
        else:
            kl = sampled_kd_loss(out.logits, teacher, args.temperature)
            loss = (1 - w) * out.loss + w * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        kl, ce, loss = float(kl.detach()), float(out.loss.detach()), float(loss.detach())
        history["train_kl"].append(kl)
        history["train_ce"].append(ce)
        if step % args.eval_every == 0 or step == args.steps:
            history["eval_step"].append(step)
            history["eval"].append(evaluate(student, held_out))
        bar.set_postfix(loss=f"{loss:.3f}", kl=f"{kl:.3f}", ce=f"{ce:.3f}")
        bar.update()
    bar.close()

    before, after = history["eval"][0], history["eval"][-1]
    print(f"\nheld-out ({len(held_rows)} rows x {args.seq_len} tokens)   before      after")
    print(
        f"  KL(teacher || student), nats   {before['kl']:7.3f}    {after['kl']:7.3f}"
        f"   (+- {after['kl_se']:.3f}, sampled estimate)"
    )
    print(f"  cross-entropy, nats/token      {before['ce']:7.3f}    {after['ce']:7.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(history, args.out / "curves.png")
    metrics = {"args": {k: str(v) for k, v in vars(args).items()}, **history}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(
        f"curves: {args.out / 'curves.png'}; metrics: {args.out / 'metrics.json'}; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        # One line per failed teacher request, not a traceback: the batch trains on CE alone.
        warnings.simplefilter("default", RuntimeWarning)
        sys.exit(main())
