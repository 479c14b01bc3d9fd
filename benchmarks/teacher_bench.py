"""Teacher benchmark: forward only against forward + sampling in each output format, side by side.

    python benchmarks/teacher_bench.py [-B 2] [-S 256] [--repeats 3] [--json PATH]
    python benchmarks/teacher_bench.py --memory-check [--json PATH]      # B=8, S=2048, sampled
    python benchmarks/teacher_bench.py --device cuda --random-1b [--json PATH]   # on a GPU

The teacher is the embedded SmolLM2-135M-Instruct, the model named by ``--model``, or (with
``--random-1b``) a randomly initialised 1B-parameter Llama-shaped model in bfloat16: hidden 2048,
16 layers, 32 heads, intermediate 8192, SmolLM2's vocabulary of 49,152. Input is real English
text (this repository's README and protocol notes, then docstrings of standard-library modules)
tokenized by the teacher's tokenizer (SmolLM2's for the random model), cut into B rows of S
tokens.

Arms, timed round-robin in one process (median of ``--repeats`` after ``--warmup``):

* ``forward``: the model body only (final hidden states, no LM head);
* ``forward+head``: body + LM head over chunks of positions, logits dropped (what a plain
  ``model(input_ids)`` computes, without keeping [B, S, V]);
* one arm per output format (``full``, ``sampled``, ``coo``, ``compact``, ``topk``): body + LM
  head + sampling (N samples at temperature T) + the format's tensors, with the working memory
  the teacher keeps between requests (as ``TeacherLogitsServer.compute`` does);
* ``multinomial`` (when ``sampled`` is measured): the ``sampled`` arm with each position's draw
  made by ``torch.multinomial`` (and the row sums by a separate pass), the sampler this project
  used before its inverse-CDF draw: the baseline that draw has to beat.

Sampling overhead is an arm's time over ``forward+head`` (target: <= 10%). Peak memory is the
arm's peak resident memory above the resident memory after the model was loaded, each arm in a
fresh spawned process (CPU; the peak is reset through /proc/self/clear_refs), or
``torch.cuda.max_memory_allocated`` above the allocated memory before the arm (CUDA). It is
compared with one [B, S-1, V] float32 tensor. Bytes per position are ``TeacherOutput.nbytes``
over B x (S-1); ``compact`` is also given as a share of the seed's sampled layout (int64 index +
float32 value per sample: 12 x N bytes per position; target: <= 25% at temperature 1).
Absolute times hold only for the machine named in the output.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gc
import inspect
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from sensai import sampling
from sensai.formats import FORMATS, TeacherOutput, build_output
from sensai.teacher import TeacherLogitsServer

REPO = Path(__file__).resolve().parent.parent
BASE_ARMS = ("forward", "forward+head")
BASELINE_ARM = "multinomial"  # ``sampled``, drawn by torch.multinomial
#: Bytes per sample in the seed's sampled layout: an int64 index and a float32 value.
SEED_BYTES_PER_SAMPLE = 8 + 4
SAMPLING_TARGET = 0.10
COMPACT_TARGET = 0.25

#: Standard-library modules whose docstrings make the benchmark text (fixed order: same text
#: on every run of one Python version).
DOC_MODULES = (
    "argparse",
    "asyncio",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
)

log = logging.getLogger("teacher_bench")


@dataclass
class Config:
    """What one run measures (also sent to the memory subprocesses)."""

    device: str
    model: str | None  # None: the embedded SmolLM2 (unless random_1b)
    random_1b: bool
    batch: int
    seq: int
    repeats: int
    warmup: int
    num_samples: int
    temperature: float
    topk: int
    chunk_size: int
    seed: int
    formats: tuple[str, ...]
    threads: int


# ----------------------------------------------------------------------------------- inputs


def _doc_texts() -> list[str]:
    """Repository prose, then docstrings of :data:`DOC_MODULES` and their public members."""
    texts = [
        p.read_text(encoding="utf-8")
        for p in (REPO / "README.md", REPO / "docs/PROTOCOL.md")
        if p.is_file()
    ]
    for name in DOC_MODULES:
        try:
            module = import_module(name)
        except ImportError:
            continue
        objs: list[Any] = [module]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            objs.append(obj)
            if inspect.isclass(obj):
                objs.extend(v for k, v in sorted(vars(obj).items()) if not k.startswith("_"))
        seen: set[str] = set()
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


def text_token_ids(tokenizer: Any, batch: int, seq: int) -> torch.Tensor:
    """``[batch, seq]`` token ids of consecutive windows of the benchmark text."""
    need = batch * seq
    ids: list[int] = []
    for text in _doc_texts():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        log.warning("only %d tokens of text for %d needed: windows repeat", len(ids), need)
        ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return torch.tensor(ids[:need], dtype=torch.int64).reshape(batch, seq)


def _smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer (the random 1B model shares its 49,152-token vocabulary), or None."""
    try:
        from transformers import AutoTokenizer

        from sensai.teacher import convert_gguf, resolve_model

        resolved = resolve_model(None)
        source = convert_gguf(resolved.path, name=resolved.name)
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back to random ids
        log.warning("SmolLM2 tokenizer unavailable (%s): using random token ids", exc)
        return None


# ---------------------------------------------------------------------------------- teacher


def random_1b_model(device: torch.device) -> Any:
    """A randomly initialised Llama-shaped causal LM of about 1.2B parameters, in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=8192,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load(cfg: Config) -> tuple[TeacherLogitsServer, torch.Tensor]:
    """The teacher and the prepared ``[B, S]`` input ids on its device."""
    if cfg.random_1b:
        device = torch.device(cfg.device)
        teacher = TeacherLogitsServer.from_model(
            random_1b_model(device),
            device=device,
            num_samples=cfg.num_samples,
            temperature=cfg.temperature,
            chunk_size=cfg.chunk_size,
        )
        tokenizer = _smollm2_tokenizer()
    else:
        teacher = TeacherLogitsServer(
            cfg.model,
            device=cfg.device,
            num_samples=cfg.num_samples,
            temperature=cfg.temperature,
            chunk_size=cfg.chunk_size,
        )
        tokenizer = teacher.tokenizer
    if tokenizer is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        raw = torch.randint(0, teacher.vocab_size, (cfg.batch, cfg.seq), generator=gen)
    else:
        raw = text_token_ids(tokenizer, cfg.batch, cfg.seq)
    ids, mask = teacher.prepare_inputs(raw)
    assert mask is None  # no padding: every row is a full window
    return teacher, ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _multinomial_draw(
    w: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous sampler's draw (``sampling._draw``'s signature): a sum pass for the row
    totals, then ``torch.multinomial``, which normalises and scans the weights itself."""
    total = w.sum(dim=-1, keepdim=True)
    return torch.multinomial(w, num_samples, replacement=True, generator=generator), total


@contextlib.contextmanager
def _drawing_with(draw: Any) -> Iterator[None]:
    saved = sampling._draw
    sampling._draw = draw
    try:
        yield
    finally:
        sampling._draw = saved


def run_arm(
    teacher: TeacherLogitsServer, arm: str, ids: torch.Tensor, cfg: Config
) -> TeacherOutput | None:
    """One pass of ``arm`` over ``ids``; the output for a format arm, else None."""
    out: TeacherOutput | None = None
    with torch.inference_mode():
        if arm == "forward":
            hidden = teacher._hidden_states(ids, None)
            del hidden
        elif arm == "forward+head":
            for _start, logits in teacher.iter_logit_chunks(ids, None, cfg.chunk_size):
                del logits
        else:
            fmt = "sampled" if arm == BASELINE_ARM else arm
            draw = _multinomial_draw if arm == BASELINE_ARM else sampling._draw
            b, s = ids.shape
            p = teacher.num_positions(s)
            generator = torch.Generator(device=teacher.device).manual_seed(cfg.seed)
            with (
                teacher._sampling_scratch(b * p, cfg.chunk_size, fmt) as scratch,
                _drawing_with(draw),
            ):
                out = build_output(
                    fmt,
                    teacher.iter_logit_chunks(ids, None, cfg.chunk_size),
                    b,
                    p,
                    teacher.vocab_size,
                    teacher.position_mask(ids, None),
                    num_samples=cfg.num_samples,
                    temperature=cfg.temperature,
                    topk=cfg.topk,
                    generator=generator,
                    device=teacher.device,
                    scratch=scratch,
                )
    _sync(teacher.device)
    return out


# ----------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_child(cfg: Config, arm: str) -> dict[str, Any]:
    """In a fresh process: load, warm up, then the peak resident memory of one pass of ``arm``
    above the resident memory before it."""
    torch.set_num_threads(cfg.threads)
    teacher, ids = load(cfg)
    # A small pass first: pages in the (memory-mapped) weights and the runtime's one-time
    # allocations, which are not the arm's.
    run_arm(teacher, arm, ids[:1, : min(16, ids.shape[1])], cfg)
    gc.collect()
    base_kib = _status_kib("VmRSS") or 0
    exact = _reset_peak_rss()
    run_arm(teacher, arm, ids, cfg)
    peak_kib = _status_kib("VmHWM") if exact else None
    if peak_kib is None:  # ru_maxrss includes the load's peak: an upper bound
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        exact = False
    return {
        "peak_bytes": max(peak_kib - base_kib, 0) * 1024,
        "exact": exact,
        "vocab_size": teacher.vocab_size,
    }


def peak_memory(
    cfg: Config,
    arm: str,
    teacher: TeacherLogitsServer | None = None,
    ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Peak memory of one pass of ``arm`` above the loaded model: a spawned process on CPU,
    the CUDA allocator's peak on a GPU (using the already loaded ``teacher``)."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        assert teacher is not None and ids is not None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_arm(teacher, arm, ids, cfg)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "exact": True}
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_memory_child, cfg, arm).result()


# -------------------------------------------------------------------------------- benchmark


def output_stats(out: TeacherOutput, cfg: Config) -> dict[str, Any]:
    positions = out.batch_size * out.num_positions
    stats: dict[str, Any] = {
        "nbytes": out.nbytes,
        "bytes_per_position": out.nbytes / positions,
    }
    if out.format == "compact":
        assert out.offsets is not None
        distinct = (out.offsets[1:] - out.offsets[:-1]).float().cpu()
        seed_bytes = SEED_BYTES_PER_SAMPLE * cfg.num_samples * positions
        stats["share_of_seed_sampled"] = out.nbytes / seed_bytes
        stats["distinct_mean"] = float(distinct.mean())
        stats["distinct_median"] = float(distinct.median())
    return stats


def benchmark(cfg: Config, with_memory: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    teacher, ids = load(cfg)
    log.info("loaded in %.1f s", time.perf_counter() - started)
    arms = [*BASE_ARMS, *cfg.formats, *([BASELINE_ARM] if "sampled" in cfg.formats else [])]
    times: dict[str, list[float]] = {a: [] for a in arms}
    stats: dict[str, dict[str, Any]] = {}
    for rep in range(cfg.warmup + cfg.repeats):
        order = arms[rep % len(arms) :] + arms[: rep % len(arms)]  # rotate: no fixed order bias
        for arm in order:
            t0 = time.perf_counter()
            out = run_arm(teacher, arm, ids, cfg)
            dt = time.perf_counter() - t0
            if rep >= cfg.warmup:
                times[arm].append(dt)
            if out is not None and arm not in stats:
                stats[arm] = output_stats(out, cfg)
            del out
        log.info("repeat %d/%d done", rep + 1, cfg.warmup + cfg.repeats)
    b, s = ids.shape
    positions = b * teacher.num_positions(s)
    full_tensor = positions * teacher.vocab_size * 4
    t_body = statistics.median(times["forward"])
    t_fwd = statistics.median(times["forward+head"])
    results: dict[str, Any] = {}
    for arm in arms:
        t = statistics.median(times[arm])
        row: dict[str, Any] = {
            "median_s": t,
            "times_s": times[arm],
            "tokens_per_s": b * s / t,
            "vs_forward_head": t / t_fwd,
            "vs_forward_body": t / t_body,
            **stats.get(arm, {}),
        }
        if with_memory:
            mem = peak_memory(cfg, arm, teacher, ids)
            row["peak_bytes"] = mem["peak_bytes"]
            row["peak_exact"] = mem["exact"]
            row["peak_vs_full_tensor"] = mem["peak_bytes"] / full_tensor
            log.info("memory of %s: %.0f MB", arm, mem["peak_bytes"] / 1e6)
        results[arm] = row
    return {
        "positions": positions,
        "vocab_size": teacher.vocab_size,
        "full_tensor_bytes": full_tensor,
        "seed_sampled_bytes_per_position": SEED_BYTES_PER_SAMPLE * cfg.num_samples,
        "arms": results,
    }


def memory_check(cfg: Config, fmt: str) -> dict[str, Any]:
    """Peak memory of one sampling pass at ``cfg``'s B, S against one [B, S-1, V] float32."""
    teacher = ids = None
    if torch.device(cfg.device).type == "cuda":
        teacher, ids = load(cfg)
    t0 = time.perf_counter()
    mem = peak_memory(cfg, fmt, teacher, ids)
    vocab = mem["vocab_size"] if teacher is None else teacher.vocab_size
    full_tensor = cfg.batch * TeacherLogitsServer.num_positions(cfg.seq) * vocab * 4
    return {
        "format": fmt,
        "batch": cfg.batch,
        "seq": cfg.seq,
        "peak_bytes": mem["peak_bytes"],
        "peak_exact": mem["exact"],
        "full_tensor_bytes": full_tensor,
        "ratio": mem["peak_bytes"] / full_tensor,
        "passed": mem["peak_bytes"] < full_tensor,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------- reports


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def print_table(cfg: Config, res: dict[str, Any], machine: str) -> None:
    arms = res["arms"]
    seed_pp = res["seed_sampled_bytes_per_position"]
    print(f"\nTeacher benchmark on {machine}")
    print(
        f"B={cfg.batch} S={cfg.seq} ({res['positions']} positions), V={res['vocab_size']}, "
        f"N={cfg.num_samples}, T={cfg.temperature}, topk k={cfg.topk}, chunk={cfg.chunk_size}; "
        f"median of {cfg.repeats} (after {cfg.warmup} warm-up)"
    )
    print(
        f"one [B, S-1, V] float32 tensor: {_mb(res['full_tensor_bytes'])} MB; seed sampled "
        f"layout: {seed_pp} bytes/position"
    )
    head = (
        f"{'arm':<13}{'tok/s':>9}{'ms':>9}{'vs fwd+head':>12}{'vs body':>9}"
        f"{'peak MB':>9}{'peak/[BSV]':>11}{'bytes/pos':>11}{'/seed':>8}"
    )
    print(head)
    print("-" * len(head))
    for arm, r in arms.items():
        peak = _mb(r["peak_bytes"]) if "peak_bytes" in r else "-"
        peak_ratio = f"{r['peak_vs_full_tensor']:.2f}" if "peak_bytes" in r else "-"
        bpp = f"{r['bytes_per_position']:,.0f}" if "bytes_per_position" in r else "-"
        share = f"{r['bytes_per_position'] / seed_pp:.1%}" if "bytes_per_position" in r else "-"
        print(
            f"{arm:<13}{r['tokens_per_s']:>9,.0f}{r['median_s'] * 1e3:>9,.0f}"
            f"{r['vs_forward_head']:>12.3f}{r['vs_forward_body']:>9.3f}"
            f"{peak:>9}{peak_ratio:>11}{bpp:>11}{share:>8}"
        )
    print()
    for fmt in cfg.formats:
        if fmt == "full":
            continue
        over = arms[fmt]["vs_forward_head"] - 1
        ok = "meets" if over <= SAMPLING_TARGET else "misses"
        print(f"sampling overhead ({fmt}) vs forward+head: {over:+.1%} ({ok} <= 10%)")
    if BASELINE_ARM in arms:
        over = arms[BASELINE_ARM]["vs_forward_head"] - 1
        print(f"sampled, drawn by torch.multinomial (the previous sampler): {over:+.1%}")
    if "compact" in arms:
        c = arms["compact"]
        ok = "meets" if c["share_of_seed_sampled"] <= COMPACT_TARGET else "misses"
        print(
            f"compact: {c['share_of_seed_sampled']:.1%} of the seed's sampled bytes ({ok} <= 25%); "
            f"distinct tokens per position: mean {c['distinct_mean']:.1f}, "
            f"median {c['distinct_median']:.0f} (of N={cfg.num_samples})"
        )


def print_memory_check(check: dict[str, Any]) -> None:
    verdict = "below" if check["passed"] else "NOT below"
    note = "" if check["peak_exact"] else " (upper bound: peak includes model load)"
    print(
        f"\nmemory check ({check['format']}, B={check['batch']}, S={check['seq']}): peak "
        f"{_mb(check['peak_bytes'])} MB{note}, {verdict} one [B, S-1, V] float32 tensor of "
        f"{_mb(check['full_tensor_bytes'])} MB ({check['ratio']:.1%}); {check['wall_s']:.0f} s"
    )


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"({torch.get_num_threads()} torch threads)"
    )


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument(
        "--model",
        help="the teacher: a local folder, a .gguf file or a cached Hugging Face name "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--random-1b",
        action="store_true",
        help="a randomly initialised 1B Llama-shaped model in bf16 (needs CUDA)",
    )
    p.add_argument("-B", "--batch", type=int, help="rows (default 2 on CPU, 8 on CUDA)")
    p.add_argument("-S", "--seq", type=int, help="tokens per row (default 256 CPU, 2048 CUDA)")
    p.add_argument("--repeats", type=int, help="timed passes per arm (default 3 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per arm first")
    p.add_argument("-N", "--num-samples", type=int, default=256)
    p.add_argument("-T", "--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=64, help="k of the topk format")
    p.add_argument("--chunk-size", type=int, default=1024, help="positions per LM-head chunk")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory passes")
    p.add_argument(
        "--memory-check",
        action="store_true",
        help="only the memory claim: one sampling pass at B=8, S=2048 (or -B/-S)",
    )
    p.add_argument("--check-format", default="sampled", choices=FORMATS[1:])
    p.add_argument(
        "--json",
        type=Path,
        help="write results here (--memory-check adds its "
        "result to an existing file under 'memory_check')",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.random_1b and device.type != "cuda":
        print(
            "error: --random-1b needs a CUDA device (--device cuda); a 1B model on CPU "
            "would take hours here",
            file=sys.stderr,
        )
        return 2
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        print(f"error: unknown format(s) {unknown}; expected {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if args.memory_check:
        batch, seq = args.batch or 8, args.seq or 2048
    else:
        batch, seq = args.batch or (8 if gpu else 2), args.seq or (2048 if gpu else 256)
    if args.model and args.random_1b:
        print("error: --model and --random-1b name two teachers; give one", file=sys.stderr)
        return 2
    cfg = Config(
        device=str(device),
        model=args.model,
        random_1b=args.random_1b,
        batch=batch,
        seq=seq,
        repeats=args.repeats or (10 if gpu else 3),
        warmup=args.warmup,
        num_samples=args.num_samples,
        temperature=args.temperature,
        topk=args.topk,
        chunk_size=args.chunk_size,
        seed=args.seed,
        formats=formats,
        threads=torch.get_num_threads(),
    )
    if min(cfg.batch, cfg.seq, cfg.repeats, cfg.num_samples) < 1 or cfg.warmup < 0:
        print("error: -B, -S, --repeats and -N must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    machine = machine_name(device)
    meta = {
        "machine": machine,
        "model": "random-1b-llama (bf16)"
        if cfg.random_1b
        else (cfg.model or "smollm2-135m (embedded)"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": asdict(cfg),
    }
    if args.memory_check:
        check = memory_check(cfg, args.check_format)
        print_memory_check(check)
        if args.json:
            data = json.loads(args.json.read_text()) if args.json.is_file() else {}
            data["memory_check"] = {**meta, **check}
            args.json.write_text(json.dumps(data, indent=2) + "\n")
        return 0
    res = benchmark(cfg, with_memory=not args.no_memory)
    print_table(cfg, res, machine)
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.is_file() else {}
        data.update({**meta, **res})
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
