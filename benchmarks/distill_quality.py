"""Distillation quality: what the student learns from each kind of teacher signal.

    python benchmarks/distill_quality.py [--steps 150] [--batch-size 4] [--seq-len 64]
        [--num-samples 64] [--server-seeds 0,1,2] [--teacher-threads N] [--threads N]
        [--epochs 1] [--store-level counts] [--model PATH] [--json PATH] [--plot PATH]

The demo's setting (examples/distill/train.py: the embedded SmolLM2-135M-Instruct teacher,
a 2-layer random student with the teacher's vocabulary, standard-library docstrings), five
arms trained side by side from the same student initialisation, on the same batches in the
same order, for the same number of steps, with the same optimizer and schedule:

* ``ce``: cross-entropy only;
* ``sampled``: ``(1 - w) * CE + w * sampled_kd_loss`` (``w``: ``--kd-weight``, 0.9) with the
  teacher's answers served by ``sensai serve`` (compact format, ``--num-samples`` samples at
  temperature 1) to two DataLoader workers through the collate wrapper; each request carries
  a seed drawn from the run's server seed and the batch's tokens (`SeededClient`);
* ``full``: ``(1 - w) * CE + w * full_kd_loss`` against the teacher's full logits, computed
  in this process;
* ``topk``: ``(1 - w) * CE + w * topk_kd_loss`` against the renormalised top-k, k chosen so
  that its bytes per position (int64 id + float32 log-prob per token) match those the
  ``sampled`` arm received on its first batch;
* ``replay``: as ``sampled``, but from a store (`sensai.store`, level ``--store-level``)
  recorded from the same server before training, one answer per training row with draws of
  their own (seeded apart from the ``sampled`` arm's): the offline path. Over ``--epochs``
  epochs it sees the same draws every epoch, where ``sampled`` gets fresh ones; the table
  gives its bytes per position on disk.

The whole comparison runs once per server seed (``--server-seeds``): only the server's
sampling changes between runs (student initialisation and data order come from ``--seed``),
so the spread over runs is the sampled signal's (and, through k, the top-k arm's); the
``ce`` and ``full`` arms repeat exactly. Each arm is evaluated every ``--eval-every`` steps on
held-out rows (docstrings it never trained on) with the exact KL(teacher || student) from the
in-process teacher's full logits, and the cross-entropy; the table gives the mean, standard
deviation and range over runs. Targets: ``sampled`` ends with a held-out KL >= 20% below
``ce``'s and within 10% of ``full``'s. Absolute numbers hold only for the machine named in the
output.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sensai import Client, wrap_collate_function
from sensai.formats import build_output
from sensai.losses import full_kd_loss, sampled_kd_loss, teacher_from_batch, topk_kd_loss
from sensai.teacher import TeacherLogitsServer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("ce", "sampled", "full", "topk", "replay")
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


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct integers >= 0 separated by commas (e.g. 0,1,2), got {text!r}"
        )
    return seeds


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--kd-weight", type=float, default=0.9, help="weight of KD against CE")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128, help="student hidden size (4 heads)")
    ap.add_argument("--held-out", type=int, default=32, help="held-out rows")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="student initialisation and data order")
    ap.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="passes over the training rows in --steps steps (fewer rows, seen again)",
    )
    ap.add_argument(
        "--store-level",
        choices=("lossless", "fp16", "counts"),
        default="counts",
        help="the replay arm's store level (at T = 1 all three give the same gradient)",
    )
    ap.add_argument(
        "--server-seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="one run per seed of the server's sampling (sensai serve --seed), comma-separated",
    )
    ap.add_argument("--model", default=None, help="teacher (default: the embedded SmolLM2)")
    _demo().add_thread_args(
        ap, "this process's CPU threads: students and in-process teacher (default: the rest)"
    )
    ap.add_argument(
        "--server-timeout", type=float, default=300.0, help="seconds to wait for the server"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--plot", type=Path, default=None, help="write the held-out curves here")
    args = ap.parse_args(argv)
    for name in (
        "steps", "batch_size", "held_out", "eval_every", "num_samples", "workers", "epochs"
    ):  # fmt: skip
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        ap.error("--seq-len must be >= 2 (a teacher position predicts the next token)")
    if args.hidden < 4 or args.hidden % 4:
        ap.error(
            f"--hidden must be a positive multiple of 4 (4 attention heads), got {args.hidden}"
        )
    if not 0.0 <= args.kd_weight <= 1.0:
        ap.error("--kd-weight must be in [0, 1]")
    if args.server_timeout <= 0:
        ap.error("--server-timeout must be > 0 seconds")
    _demo().resolve_threads(ap, args)
    args.temperature, args.out = 1.0, None
    args.shm_path = f"/dev/shm/sensai-quality-{os.getpid()}"
    return args


class SeededClient(Client):
    """A `Client` whose requests carry a seed drawn from the run's server seed and the batch's
    token ids: each batch gets its own reproducible draw, whatever worker sends it and in
    whatever order. (A server ``--seed`` alone gives every seedless request the same seed,
    so every batch would reuse one random stream: the same quantiles of each position's
    distribution at every step, a fixed and biased target instead of independent samples.)"""

    def __init__(self, address: str, run_seed: int, **kwargs) -> None:
        super().__init__(address, **kwargs)
        self.run_seed = run_seed

    def get_teacher_logits(self, input_ids, attention_mask=None, *, seed=None, **kwargs):
        if seed is None:
            ids = torch.as_tensor(input_ids).to(torch.int64).contiguous()
            digest = hashlib.blake2b(
                ids.numpy().tobytes(), digest_size=8, key=self.run_seed.to_bytes(8, "little")
            ).digest()
            seed = int.from_bytes(digest, "little") >> 1  # the server takes [0, 2**64)
        return super().get_teacher_logits(input_ids, attention_mask, seed=seed, **kwargs)


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
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install 'sensai[demo]'"
        )
    demo = _demo()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"threads: {args.teacher_threads} for the server, {args.threads} for this process"
    )
    started = time.perf_counter()
    teacher = TeacherLogitsServer(args.model, device="cpu", num_samples=None)
    tokenizer = load_tokenizer(args.model)
    n_train = max(args.batch_size, math.ceil(args.steps * args.batch_size / args.epochs))
    train_rows, held_rows, _ = demo.token_rows(tokenizer, args.seq_len, n_train, args.held_out)
    held_out = [
        (ids, teacher.compute(ids, output_format="full").logits)
        for ids in held_rows.split(args.batch_size)
    ]
    print(
        f"{len(train_rows)} training rows, {len(held_rows)} held-out rows of {args.seq_len} "
        f"tokens; {args.steps} steps of {args.batch_size} rows; server seeds {args.server_seeds}"
        f"; replay from a {args.store_level} store"
    )
    runs = []
    for seed in args.server_seeds:
        try:
            server, address = demo.start_server(args, seed=seed)
        except demo.ServerStartError as e:
            raise SystemExit(f"error: {e}") from None
        try:
            runs.append(run(args, demo, address, seed, teacher, train_rows, held_out))
        finally:
            demo.stop_server(server, args.shm_path)
    report(args, runs, len(held_rows), time.perf_counter() - started)
    return 0


def record_store(args, client, info: dict, train_rows, directory: Path, server_seed: int):
    """Record the server's answer for every training row into a store at ``directory``
    (level ``--store-level``), each batch with a seed of its own, apart from those of the
    ``sampled`` arm; returns ``(reader, bytes on disk per position)``."""
    from sensai.store import StoreReader, StoreWriter, build_manifest, sequence_key

    manifest = build_manifest(
        fmt="compact", level=args.store_level, vocab_size=info["vocab_size"],
        num_samples=info["num_samples"], temperature=info["temperature"],
        top_k=info["top_k"], top_p=info["top_p"], topk=0, model=str(info["model"]),
        dataset={"rows": len(train_rows), "seq_len": args.seq_len},
    )  # fmt: skip
    key = (server_seed + (1 << 32)).to_bytes(8, "little")  # not a seed the sampled arm draws
    with StoreWriter(directory, manifest) as writer:
        for ids in train_rows.split(args.batch_size):
            ids = ids.to(torch.int64).contiguous()
            digest = hashlib.blake2b(ids.numpy().tobytes(), digest_size=8, key=key).digest()
            out = client.get_teacher_logits(ids, seed=int.from_bytes(digest, "little") >> 1)
            for i, row in enumerate(ids):
                writer.add(sequence_key(row.numpy()), row.numel(), out.rows(i, i + 1))
    positions = len(train_rows) * (args.seq_len - 1)
    disk = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return StoreReader(directory), disk / positions


def run(args, demo, address: str, server_seed: int, teacher, train_rows, held_out) -> dict:
    """The five arms, side by side, with the server sampling from ``server_seed``."""
    with tempfile.TemporaryDirectory(prefix="sensai-quality-store-") as tmp:
        return _run(args, demo, address, server_seed, teacher, train_rows, held_out, Path(tmp))


def _run(args, demo, address, server_seed, teacher, train_rows, held_out, store_dir) -> dict:
    started = time.perf_counter()
    client = SeededClient(address, server_seed)
    info = client.info()
    store, store_bytes = record_store(args, client, info, train_rows, store_dir, server_seed)
    base = demo.build_student(info["vocab_size"], args)  # seeds torch with args.seed
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
    sampled_bytes = k = None
    w = args.kd_weight
    desc = f"server seed {server_seed}"
    for step, batch in enumerate(tqdm(batches, total=args.steps, desc=desc, unit="step"), 1):
        ids = batch["input_ids"]
        served = teacher_from_batch(batch)
        if served is None:
            raise SystemExit("a batch came back without the teacher's answer (see the warning)")
        with torch.no_grad():
            full = teacher.compute(ids, output_format="full")
        if k is None:  # match the sampled arm's bytes per position on its first batch
            sampled_bytes = wire_bytes_per_position(served)
            k = max(1, round((sampled_bytes - topk_bytes_per_position(0)) / 12))
        flat = full.logits.reshape(-1, full.logits.shape[-1])
        topk = build_output(
            "topk", [(0, flat)], full.batch_size, full.num_positions, full.vocab_size,
            full.mask, topk=k,
        )  # fmt: skip
        signals = {
            "sampled": (sampled_kd_loss, served),
            "full": (full_kd_loss, full),
            "topk": (topk_kd_loss, topk),
            "replay": (sampled_kd_loss, store.get(ids)),
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
    return {
        "server_seed": server_seed,
        "teacher": info["model"],
        "num_samples": info["num_samples"],
        "vocab_size": info["vocab_size"],
        "topk_k": k,
        "sampled_bytes_per_position": sampled_bytes,
        "store_level": args.store_level,
        "store_bytes_per_position": store_bytes,
        "eval_steps": eval_steps,
        "history": history,
        "seconds": time.perf_counter() - started,
    }


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), range and the values."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarise(runs: list[dict]) -> dict:
    """Per arm, over runs: final held-out KL and CE, and KL relative to ce and full (the ratio
    taken within each run, then averaged)."""
    summary = {}
    for arm in ARMS:
        finals = [r["history"][arm][-1] for r in runs]
        kl_ce = [r["history"]["ce"][-1]["kl"] for r in runs]
        kl_full = [r["history"]["full"][-1]["kl"] for r in runs]
        summary[arm] = {
            "kl": spread([f["kl"] for f in finals]),
            "ce": spread([f["ce"] for f in finals]),
            "kl_vs_ce": spread([f["kl"] / c for f, c in zip(finals, kl_ce, strict=True)]),
            "kl_vs_full": spread([f["kl"] / c for f, c in zip(finals, kl_full, strict=True)]),
        }
    return summary


def _pm(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def report(args, runs: list[dict], n_held: int, seconds: float) -> None:
    summary = summarise(runs)
    first = runs[0]["history"]["ce"][0]
    vocab = runs[0]["vocab_size"]
    print(
        f"\nheld-out: {n_held} rows x {args.seq_len} tokens, exact KL from the full teacher "
        f"logits; at step 0 every arm has KL {first['kl']:.3f}, CE {first['ce']:.3f}; "
        f"{len(runs)} run(s), server seeds {[r['server_seed'] for r in runs]}: mean ± standard "
        "deviation [range]"
    )
    ks = sorted({r["topk_k"] for r in runs})
    sampled_bytes = statistics.fmean(r["sampled_bytes_per_position"] for r in runs)
    topk_bytes = statistics.fmean(topk_bytes_per_position(r["topk_k"]) for r in runs)
    signal_of = {
        "ce": ("none (labels only)", "0"),
        "sampled": (f"{runs[0]['num_samples']} samples, compact, served", f"{sampled_bytes:.0f}"),
        "full": ("full logits, in-process", f"{vocab * 4}"),
        "topk": (f"top-{'/'.join(map(str, ks))}, renormalised", f"{topk_bytes:.0f}"),
        "replay": (
            f"{runs[0]['num_samples']} samples, {args.store_level} store, replayed",
            f"{statistics.fmean(r['store_bytes_per_position'] for r in runs):.0f} on disk",
        ),
    }
    print("| arm | teacher signal | bytes/position | held-out KL | vs ce | vs full | held-out CE |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arm in ARMS:
        r = summary[arm]
        what, nbytes = signal_of[arm]
        print(
            f"| {arm} | {what} | {nbytes} | {_pm(r['kl'])} [{r['kl']['min']:.3f}, "
            f"{r['kl']['max']:.3f}] | {_pm(r['kl_vs_ce'])} | {_pm(r['kl_vs_full'])} "
            f"| {_pm(r['ce'])} |"
        )
    vs_ce, vs_full = summary["sampled"]["kl_vs_ce"], summary["sampled"]["kl_vs_full"]
    targets = {
        "kl_vs_ce": {
            "target": KL_VS_CE_TARGET,
            "met_by_mean": vs_ce["mean"] <= KL_VS_CE_TARGET,
            "runs_met": sum(v <= KL_VS_CE_TARGET for v in vs_ce["values"]),
        },
        "kl_vs_full": {
            "target": KL_VS_FULL_TARGET,
            "met_by_mean": vs_full["mean"] <= KL_VS_FULL_TARGET,
            "runs_met": sum(v <= KL_VS_FULL_TARGET for v in vs_full["values"]),
        },
    }
    n = len(runs)
    replay_kl, sampled_kl = summary["replay"]["kl"], summary["sampled"]["kl"]
    gap = abs(replay_kl["mean"] - sampled_kl["mean"])
    band = max(sampled_kl["max"] - sampled_kl["min"], replay_kl["max"] - replay_kl["min"])
    targets["replay_vs_sampled"] = {
        "gap": gap,
        "spread": band,
        "met": gap <= band if n > 1 else None,
    }
    print(
        f"replay vs sampled: held-out KL {replay_kl['mean']:.3f} vs {sampled_kl['mean']:.3f}, "
        f"gap {gap:.3f} against a run-to-run range of {band:.3f} "
        + (
            f"({'within' if gap <= band else 'OUTSIDE'} it)"
            if n > 1
            else "(one run: no spread to compare with)"
        )
    )
    print(
        f"targets: sampled KL <= {KL_VS_CE_TARGET:.2f}x ce's: {_pm(vs_ce)} "
        f"({'met' if targets['kl_vs_ce']['met_by_mean'] else 'MISSED'} on the mean, in "
        f"{targets['kl_vs_ce']['runs_met']}/{n} runs); sampled KL <= {KL_VS_FULL_TARGET:.2f}x "
        f"full's: {_pm(vs_full)} ({'met' if targets['kl_vs_full']['met_by_mean'] else 'MISSED'}"
        f" on the mean, in {targets['kl_vs_full']['runs_met']}/{n} runs); {seconds:.0f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {"node": platform.node(), "cpus": os.cpu_count()},
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "seconds": seconds,
                    "summary": summary,
                    "targets": targets,
                    "runs": runs,
                },
                indent=1,
            )
        )
    if args.plot:
        plot(runs, args.plot)


def plot(runs: list[dict], path: Path) -> None:
    """Held-out curves per arm: the mean over runs, the range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = runs[0]["eval_steps"]
    fig, (ax_kl, ax_ce) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ARMS:
        for ax, key in ((ax_kl, "kl"), (ax_ce, "ce")):
            per_run = [[h[key] for h in r["history"][arm]] for r in runs]
            mean = [statistics.fmean(v) for v in zip(*per_run, strict=True)]
            (line,) = ax.plot(steps, mean, "o-", label=arm)
            ax.fill_between(
                steps,
                [min(v) for v in zip(*per_run, strict=True)],
                [max(v) for v in zip(*per_run, strict=True)],
                color=line.get_color(),
                alpha=0.2,
            )
    n = len(runs)
    ax_kl.set(
        xlabel="step",
        ylabel="held-out KL(teacher || student), nats",
        yscale="log",
        title=f"mean of {n} server seed(s), range shaded",
    )
    ax_ce.set(xlabel="step", ylabel="held-out cross-entropy, nats/token")
    for ax in (ax_kl, ax_ce):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
