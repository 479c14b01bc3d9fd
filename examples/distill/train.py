"""Distil the embedded SmolLM2-135M-Instruct teacher into a small random student, offline.

    python examples/distill/train.py [--steps 40] [--batch-size 4] [--seq-len 64] [--workers 2]
        [--teacher-threads N] [--threads N]

What it does, all on this machine and nothing downloaded:

1. starts ``sensai serve`` (the embedded teacher, compact format, shared memory) in its own
   process and waits for the address it prints;
2. builds the text from the docstrings of the Python standard library installed here (read
   with ``ast``, never imported), tokenised with the teacher's tokenizer, cut into
   ``--seq-len`` token rows; every tenth docstring is held out (text the student never
   trains on);
3. trains a few-layer Llama-shaped student (random init, the teacher's vocabulary) with
   ``(1 - w) * cross-entropy + w * sampled KD`` (`sensai.losses.sampled_kd_loss`), the teacher's
   answers fetched by ``--workers`` DataLoader worker processes through
   `sensai.wrap_collate_function`;
4. prints held-out KL(teacher || student) and cross-entropy before and after, and writes the
   curves to ``<out>/curves.png`` (and the numbers to ``<out>/metrics.json``).

The server is stopped (and its files removed) when training ends, fails or is interrupted
with Ctrl-C, also while it is still starting; a server that prints no address within
``--server-timeout`` seconds (or dies first) is an error that shows the end of its log.
Held-out KL is the unbiased sampled estimate from the teacher's answers (its standard error is
printed beside it).
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import importlib.util
import io
import itertools
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import sysconfig
import threading
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

#: Seconds to wait for the server to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 60.0


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
class ServerStartError(RuntimeError):
    """The teacher server died or printed no address in time; the message ends with its log."""


class _Relay(threading.Thread):
    """Copies a server stream to ours line by line, in a thread, keeping the last lines for an
    error message. Until `go_live` the lines are held back, so that a server that fails to
    start shows its log once, in the error."""

    def __init__(self, stream, out, live: bool = False) -> None:
        super().__init__(daemon=True)
        self.stream, self.out = stream, out
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self._held: list[str] | None = None if live else []
        self._lock = threading.Lock()

    def run(self) -> None:
        for line in self.stream:
            with self._lock:
                self.tail.append(line)
                if self._held is not None:
                    if len(self._held) < 1000:
                        self._held.append(line)
                    continue
            self.out.write(line)
            self.out.flush()

    def go_live(self) -> None:
        with self._lock:
            held, self._held = self._held or [], None
            self.out.write("".join(held))
            self.out.flush()


def _text(pipe) -> io.TextIOWrapper:
    """A server pipe as text; ``\r`` kept as is, so progress bars redraw in place."""
    return io.TextIOWrapper(pipe, errors="replace", newline="")


def _read_address(server: subprocess.Popen, timeout: float) -> str:
    """The first line the server prints on stdout, waiting at most ``timeout`` seconds on
    poll(2) (Ctrl-C interrupts the wait); '' when the server closed stdout (it exited)."""
    fd = server.stdout.fileno()  # type: ignore[union-attr]
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            buf += chunk
    line, rest = buf.split(b"\n", 1)
    if rest:
        sys.stdout.write(rest.decode(errors="replace"))
    return line.decode(errors="replace").strip()


def start_server(args, seed: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``sensai serve`` in its own process (and session) and wait for its address.

    ``seed``: the server's default sampling seed (``--seed``; None: unseeded). Raises
    `ServerStartError` when it exits or prints no address within ``args.server_timeout``
    seconds; on that, on Ctrl-C (KeyboardInterrupt) or any other error the server is stopped
    before the exception propagates."""
    cmd = [
        sys.executable, "-m", "sensai.cli", "serve",
        "--transport", "shared_memory", "--shm-path", args.shm_path,
        "--format", "compact", "--num-samples", str(args.num_samples),
        "--temperature", str(args.temperature), "--num-clients", str(args.workers + 1),
        "--log-level", "WARNING", *(["--model", args.model] if args.model else []),
        "--threads", str(args.teacher_threads),
        *(["--seed", str(seed)] if seed is not None else []),
    ]  # fmt: skip
    # Its own session, so a terminal's Ctrl-C reaches this program only, which then stops the
    # server cleanly (it would otherwise die mid-request or mid-start, leaving its files).
    server = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        print(f"teacher server: pid {server.pid}, waiting for its address ...", flush=True)
        stderr = _Relay(_text(server.stderr), sys.stderr)
        stderr.start()
        try:
            address = _read_address(server, args.server_timeout)
        except TimeoutError:
            address, why = "", f"printed no address within {args.server_timeout:g} s"
        else:
            why = "exited before printing its address"
        if not address:
            stop_server(server, args.shm_path)
            stderr.join(5.0)  # the server has exited: its stderr ends, the tail is complete
            if why.startswith("exited"):
                why += f" (exit status {server.returncode})"
            log = "".join(stderr.tail).rstrip() or "(nothing on stderr)"
            raise ServerStartError(f"the teacher server {why}; the end of its log:\n{log}")
        stderr.go_live()
        # Nothing more is expected on stdout, but a full pipe must never block the server.
        _Relay(_text(server.stdout), sys.stdout, live=True).start()
        return server, address
    except BaseException:
        stop_server(server, args.shm_path)
        raise


def stop_server(server: subprocess.Popen, shm_path: str | None = None) -> None:
    """SIGTERM, then wait for the server to finish its requests and remove its files. One
    that does not exit in time (or a second Ctrl-C) is killed. A server that died of a
    signal could not remove its files: those at ``shm_path`` whose lock names it are removed
    here in its stead."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            # A server still loading its model exits only when the load is done.
            server.wait(STOP_TIMEOUT)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            server.kill()
            server.wait(STOP_TIMEOUT)
    if shm_path is not None and server.returncode < 0:
        _remove_leftovers(server.pid, shm_path)


def _remove_leftovers(pid: int, shm_path: str) -> None:
    lock = shm_path + ".lock"
    try:
        with open(lock) as f:
            owner = f.read().strip()
    except FileNotFoundError:
        return  # it died before creating its files
    if owner == str(pid):  # not a file another server has since taken over
        for leftover in (shm_path, lock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


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
def add_thread_args(ap: argparse.ArgumentParser, threads_help: str) -> None:
    """``--teacher-threads`` (the server's, default half the cores) and ``--threads`` (this
    process's, default the rest): two torch pools that each take every core thrash."""
    ap.add_argument(
        "--teacher-threads",
        type=int,
        default=max(1, len(os.sched_getaffinity(0)) // 2),
        help="the teacher server's CPU threads (default: half the cores)",
    )
    ap.add_argument("--threads", type=int, default=None, help=threads_help)


def resolve_threads(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the two thread counts and give ``--threads`` its default, the cores left."""
    if args.teacher_threads < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--teacher-threads and --threads must be >= 1")
    if args.threads is None:
        args.threads = max(1, len(os.sched_getaffinity(0)) - args.teacher_threads)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    add_thread_args(ap, "the student's CPU threads (default: the rest)")
    ap.add_argument("--out", type=Path, default=Path("distill-out"), help="plot and metrics")
    ap.add_argument("--shm-path", default=f"/dev/shm/sensai-distill-{os.getpid()}")
    ap.add_argument(
        "--server-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the teacher server's address (the first run converts the GGUF)",
    )
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
    if args.server_timeout <= 0:
        ap.error("--server-timeout must be > 0 seconds")
    resolve_threads(ap, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [m for m in ("matplotlib",) if importlib.util.find_spec(m) is None]
    if missing:  # found now, not after minutes of training
        print(
            f"the demo needs {', '.join(missing)} for its plot, which is not installed: "
            "pip install 'sensai[demo]' (or: pip install matplotlib)",
            file=sys.stderr,
        )
        return 2
    # The teacher and the student share this machine's cores: two thread pools that each take
    # every core thrash (on 2 cores, 1 + 1 threads ran the defaults in 88 s instead of 145 s).
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(
        f"starting the teacher (sensai serve; the first run converts the GGUF, ~40 s); CPU "
        f"threads: {args.teacher_threads} for the teacher, {args.threads} for the student ...",
        flush=True,
    )
    server = None
    try:
        server, address = start_server(args)
        return train(args, address, started)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the teacher server", file=sys.stderr)
        return 130
    except ServerStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            stop_server(server, args.shm_path)


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
    # on a terminal only (disable=None); in a log, a line per held-out eval below
    bar = tqdm(total=args.steps, desc="distilling", unit="step", dynamic_ncols=True, disable=None)
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
            if bar.disable:  # not a terminal: a plain line instead of the bar
                print(f"step {step}/{args.steps}: loss {loss:.3f} kl {kl:.3f} ce {ce:.3f}")
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
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    metrics = {"args": settings, **history}  # numbers stay numbers
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
