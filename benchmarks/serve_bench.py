"""Serving benchmark: the teacher in-process against the same work served to client processes.

    python benchmarks/serve_bench.py [-B 4] [-S 256] [--batches 3] [--warmup 1]
        [--transports shared_memory,unix_socket,named_pipe] [--clients 1,4] [--json PATH]
        [--device cpu|cuda] [--random-model] [--one-at-a-time]

    # the GPU clause, on a machine with CUDA that can download nothing:
    python benchmarks/serve_bench.py --device cuda --random-model --one-at-a-time \
        --clients 4 --batches 40 --warmup 5

Input is real English text (docstrings of standard-library modules, via ``inspect.getdoc``)
tokenized with the teacher's tokenizer and cut into ``--batches`` batches of ``[B, S]`` token
ids (plus ``--warmup`` batches run before timing). The teacher is the embedded
SmolLM2-135M-Instruct on ``--device``, output format ``sampled`` with ``--num-samples``
samples. ``--random-model`` serves instead a randomly initialised model of SmolLM2-135M's
shape, saved with a minimal tokenizer to a temporary folder, on random token ids: for machines
without the embedded model (a GPU box that can download nothing).

Arms (each times the same ``batches x B x S`` input tokens; tokens/s counts input tokens):

* ``in-process``: ``TeacherLogitsServer.compute`` on each ``[B, S]`` batch, in this process;
* ``<transport>``: one ``python -m sensai.cli serve`` subprocess per transport (started once,
  its first stdout line is the address, SIGTERM stops it), serving ``C`` client processes
  (multiprocessing ``spawn``) for each ``C`` of ``--clients``. The rows of every batch are
  split among the clients: with 1 client it sends each ``[B, S]`` batch whole; with 4 clients
  (B=4) each sends its own ``[1, S]`` row of every batch, so the server can batch the four
  requests into one ``[4, S]`` forward (``--max-batch-tokens`` >= B x S). Requests carry no
  seed (a seeded request would run alone). Every client connects and runs its warm-up
  requests, then all wait on a barrier with this process; the clock runs from the barrier's
  release until the last client has its last answer.
* ``<transport>/1x1`` (with ``--one-at-a-time``, for each client count > 1): the same clients
  served by a second server started with ``--max-batch-tokens S --batch-wait-ms 0``, which
  runs every request alone.

Targets: served with 1 client >= 95% of in-process; served with 4 clients >= in-process; on a
GPU, 4 clients batched >= 2x the same clients served one at a time (on a CPU the forward is
compute-bound and batching rows gains little, so there the ratio is reported, not judged).
Absolute numbers hold only for the machine named in the output.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import import_module
from multiprocessing.synchronize import Barrier
from typing import Any

import torch

ONE_CLIENT_TARGET = 0.95
MANY_CLIENTS_TARGET = 1.0
#: On a GPU: many clients batched over the same clients served one request per forward.
BATCHING_GAIN_TARGET = 2.0
TRANSPORTS = ("shared_memory", "unix_socket", "named_pipe")
#: Standard-library modules whose docstrings make the benchmark text (fixed order).
DOC_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "dataclasses",
    "datetime",
    "functools",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "re",
    "subprocess",
    "typing",
    "unittest",
)
SERVER_START_TIMEOUT = 300.0


# ----------------------------------------------------------------------------------- inputs


def doc_texts() -> list[str]:
    """Docstrings (longer than 80 characters) of :data:`DOC_MODULES` and their public members."""
    texts: list[str] = []
    seen: set[str] = set()
    for name in DOC_MODULES:
        try:
            module = import_module(name)
        except ImportError:
            continue
        objs: list[Any] = [module]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if not attr.startswith("_"):
                objs.append(getattr(module, attr, None))
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


def text_batches(tokenizer: Any, n: int, batch: int, seq: int) -> torch.Tensor:
    """``[n, batch, seq]`` token ids: consecutive windows of the benchmark text."""
    need = n * batch * seq
    ids: list[int] = []
    for text in doc_texts():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:  # not expected: the text is several hundred thousand tokens
        ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return torch.tensor(ids[:need], dtype=torch.int64).reshape(n, batch, seq)


def random_batches(vocab_size: int, n: int, batch: int, seq: int) -> torch.Tensor:
    """``[n, batch, seq]`` seeded random token ids (for ``--random-model``)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (n, batch, seq), generator=g, dtype=torch.int64)


def save_random_model(path: str) -> str:
    """A randomly initialised Llama of SmolLM2-135M's shape (30 layers, hidden 576, vocabulary
    49,152) and a minimal tokenizer (it only supplies a pad token), saved to ``path``."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {"<unk>": 0, "<pad>": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>") \
        .save_pretrained(path)  # fmt: skip
    return path


# -------------------------------------------------------------------------------- in-process


def bench_in_process(args: argparse.Namespace) -> tuple[dict[str, Any], torch.Tensor]:
    """Load the teacher, tokenize the input and time ``compute`` over the timed batches."""
    from sensai.teacher import TeacherLogitsServer

    teacher = TeacherLogitsServer(
        args.model, device=args.device, num_samples=args.num_samples, output_format="sampled"
    )
    n = args.warmup + args.batches
    if args.random_model:
        data = random_batches(teacher.vocab_size, n, args.batch, args.seq)
    else:
        data = text_batches(teacher.tokenizer, n, args.batch, args.seq)
    for i in range(args.warmup):
        teacher.compute(data[i])
    _sync(args.device)
    t0 = time.perf_counter()
    for i in range(args.warmup, len(data)):
        # answers are used on the host, as a served client gets them
        [t.cpu() for t in teacher.compute(data[i]).to_arrays()]
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    del teacher
    return arm_result("in-process", 0, args, elapsed), data


# ------------------------------------------------------------------------------------ served


def client_main(
    address: str, rows: torch.Tensor, warmup: int, barrier: Barrier, results: Any
) -> None:
    """A client process: warm up on ``rows[:warmup]``, wait on the barrier, send the rest."""
    from sensai import Client

    try:
        with Client(address, timeout=600.0) as client:
            for i in range(warmup):
                client.get_teacher_logits(rows[i])
            barrier.wait()
            for i in range(warmup, len(rows)):
                client.get_teacher_logits(rows[i])
        results.put(("ok", os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def start_server(
    args: argparse.Namespace, transport: str, num_clients: int, one_at_a_time: bool = False
) -> tuple[Any, str]:
    """A ``sensai serve`` subprocess and its address (its first stdout line); with
    ``one_at_a_time`` it runs every ``[1, S]`` request in a forward of its own."""
    cmd = [sys.executable, "-m", "sensai.cli", "serve", "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    batching = ["--max-batch-tokens", str(args.max_batch_tokens)]
    if one_at_a_time:
        batching = ["--max-batch-tokens", str(args.seq), "--batch-wait-ms", "0"]
    cmd += [
        "--transport", transport,
        "--num-clients", str(num_clients),
        "--format", "sampled",
        "--num-samples", str(args.num_samples),
        *batching,
        "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()  # blocks until ready (or EOF if it died)
    if not address:
        proc.wait(timeout=10)
        raise RuntimeError(f"sensai serve ({transport}) exited with {proc.returncode}")
    return proc, address


def stop_server(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_served(
    args: argparse.Namespace, transport: str, address: str, clients: int, data: torch.Tensor
) -> dict[str, Any]:
    """Split the rows of every batch among ``clients`` spawned processes and time them."""
    if args.batch % clients:
        raise ValueError(f"B={args.batch} does not split among {clients} clients")
    share = args.batch // clients
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=client_main,
            args=(address, data[:, c * share : (c + 1) * share].clone(), args.warmup, barrier,
                  results),
        )
        for c in range(clients)
    ]  # fmt: skip
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=SERVER_START_TIMEOUT)
        t0 = time.perf_counter()
        outcomes = [results.get(timeout=600) for _ in procs]
        elapsed = time.perf_counter() - t0
    except Exception:
        errors = []
        while not results.empty():
            errors.append(results.get_nowait())
        raise RuntimeError(f"{transport}, {clients} client(s) failed: {errors}") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    failed = [msg for status, msg in outcomes if status != "ok"]
    if failed:
        raise RuntimeError(f"{transport}, {clients} client(s) failed: {failed}")
    return arm_result(transport, clients, args, elapsed)


# ----------------------------------------------------------------------------------- results


def arm_result(arm: str, clients: int, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    tokens = args.batches * args.batch * args.seq
    return {
        "arm": arm,
        "clients": clients,
        "tokens": tokens,
        "seconds": round(elapsed, 4),
        "tokens_per_s": round(tokens / elapsed, 2),
    }


def add_ratios(rows: list[dict[str, Any]], gpu: bool) -> dict[str, bool]:
    """Ratio of every arm to in-process (and of each batched arm to its one-at-a-time twin:
    ``gain``), and whether each target holds."""
    base = rows[0]["tokens_per_s"]
    by_name = {(r["arm"], r["clients"]): r for r in rows}
    checks: dict[str, bool] = {}
    for row in rows:
        row["ratio"] = round(row["tokens_per_s"] / base, 4)
        if row["arm"].endswith("/1x1"):
            continue  # the baseline of the batching gain, no target of its own
        if row["clients"] == 1:
            row["target"] = ONE_CLIENT_TARGET
        elif row["clients"] > 1:
            row["target"] = MANY_CLIENTS_TARGET
        if "target" in row:
            row["pass"] = row["ratio"] >= row["target"]
            checks[f"{row['arm']}/{row['clients']}"] = row["pass"]
        twin = by_name.get((f"{row['arm']}/1x1", row["clients"]))
        if twin is not None:
            row["gain"] = round(row["tokens_per_s"] / twin["tokens_per_s"], 4)
            if gpu:
                checks[f"{row['arm']}/{row['clients']} batching gain"] = (
                    row["gain"] >= BATCHING_GAIN_TARGET
                )
    return checks


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, machine: str) -> None:
    print(f"\n{machine}; B={args.batch}, S={args.seq}, {args.batches} timed batches "
          f"({args.warmup} warm-up), sampled, N={args.num_samples}")  # fmt: skip
    print(f"{'arm':<18} {'clients':>7} {'tokens/s':>10} {'ratio':>7} {'target':>7}  result"
          f"  {'vs 1x1':>7}")  # fmt: skip
    for r in rows:
        target = f">={r['target']:.2f}" if "target" in r else ""
        result = ("PASS" if r["pass"] else "FAIL") if "pass" in r else ""
        clients = str(r["clients"]) if r["clients"] else "-"
        gain = f"{r['gain']:>7.2f}" if "gain" in r else ""
        print(f"{r['arm']:<18} {clients:>7} {r['tokens_per_s']:>10.1f} {r['ratio']:>7.3f} "
              f"{target:>7}  {result:<6}  {gain}")  # fmt: skip
    print(f"targets: 1 client >= {ONE_CLIENT_TARGET:.0%} of in-process; "
          f"more clients >= {MANY_CLIENTS_TARGET:.0%} of in-process; on a GPU, batched >= "
          f"{BATCHING_GAIN_TARGET:.0f}x one at a time (vs 1x1)")  # fmt: skip


def machine_name(device: str) -> str:
    where = "cpu"
    if device == "cuda":
        where = torch.cuda.get_device_name(0)
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({where})"


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _transport_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in TRANSPORTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown transport(s) {bad}; choose from {TRANSPORTS}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-B", "--batch", type=int, default=4, help="rows per batch (default 4)")
    p.add_argument("-S", "--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batches", type=int, default=3, help="timed batches per arm (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up batches per arm (default 1)")
    p.add_argument("--transports", type=_transport_list, default=list(TRANSPORTS))
    p.add_argument("--clients", type=_int_list, default=[1, 4], help="default 1,4")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument(
        "--random-model",
        action="store_true",
        help="serve a random model of SmolLM2-135M's shape on random ids",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="also serve the clients with one request per forward (the 1x1 arms)",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq < 2 or args.batches < 1 or args.warmup < 0:
        p.error("need B >= 1, S >= 2, --batches >= 1, --warmup >= 0")
    bad = [c for c in args.clients if c < 1 or args.batch % c]
    if bad:
        p.error(f"client counts {bad} must be >= 1 and divide B={args.batch}")
    if args.batch * args.seq > args.max_batch_tokens:
        p.error("--max-batch-tokens must be >= B x S so the server can batch a whole batch")
    if args.random_model and args.model:
        p.error("--random-model and --model exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sensai-bench-model-") as tmp:
        if args.random_model:
            print("saving a random SmolLM2-135M-shaped model ...", file=sys.stderr, flush=True)
            args.model = save_random_model(tmp)
        return run(args)


def run(args: argparse.Namespace) -> int:
    machine = machine_name(args.device)
    print(f"in-process ({machine}) ...", file=sys.stderr, flush=True)
    base, data = bench_in_process(args)
    rows = [base]
    for transport in args.transports:
        servers = [False] + ([True] if args.one_at_a_time else [])
        for one_at_a_time in servers:
            counts = [c for c in args.clients if c > 1 or not one_at_a_time]
            if not counts:
                continue
            arm = f"{transport}/1x1" if one_at_a_time else transport
            proc, address = start_server(args, transport, max(counts), one_at_a_time)
            try:
                for clients in counts:
                    print(f"{arm}, {clients} client(s) ...", file=sys.stderr, flush=True)
                    row = bench_served(args, transport, address, clients, data)
                    rows.append({**row, "arm": arm})
            finally:
                stop_server(proc)
    checks = add_ratios(rows, gpu=args.device == "cuda")
    print_table(rows, args, machine)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        out = {"machine": machine, "config": config, "rows": rows, "targets_met": checks}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
