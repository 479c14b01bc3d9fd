"""Store sizes and speeds: bytes per token on disk for each store level, against the wire
formats (`compact`, `topk` at the k matching compact's distinct tokens), the cost of recording
next to the teacher's compute, and replay throughput from disk.

    python benchmarks/store_bench.py                       # embedded SmolLM2, repository prose
    python benchmarks/store_bench.py --rows 4 --seq 128    # quicker

Bytes on disk count every file of the store (shards and manifest) divided by the positions
recorded. Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_bench import text_token_ids  # noqa: E402

from sensai.store import StoreReader, StoreWriter, sequence_key  # noqa: E402
from sensai.store.record import _answer_rows, manifest_for  # noqa: E402
from sensai.teacher import TeacherLogitsServer  # noqa: E402

ARMS = [("compact", "lossless"), ("compact", "fp16"), ("compact", "counts"),
        ("topk", "lossless"), ("topk", "fp16")]  # fmt: skip


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def run(args: argparse.Namespace) -> dict[str, Any]:
    teacher = TeacherLogitsServer(
        args.model, device=args.device, num_samples=args.num_samples, output_format="compact"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = text_token_ids(teacher.tokenizer, args.rows, args.seq).numpy()
    seqs = [row for row in ids]
    results: dict[str, Any] = {"rows": args.rows, "seq": args.seq, "num_samples": args.num_samples}
    answers: dict[str, list[Any]] = {}
    t0 = time.perf_counter()
    answers["compact"] = [_answer_rows(teacher, [q], seed=i)[0] for i, q in enumerate(seqs)]
    compute_s = time.perf_counter() - t0
    positions = sum(a.num_positions for a in answers["compact"])
    distinct = sum(int(a.tokens.numel()) for a in answers["compact"]) / positions
    k = max(1, round(distinct))
    teacher.output_format, teacher.topk = "topk", k
    answers["topk"] = [_answer_rows(teacher, [q], seed=0)[0] for q in seqs]
    results.update(positions=positions, distinct_per_position=distinct, topk_k=k)
    results["wire_bytes_per_token"] = {
        f: sum(a.nbytes for a in answers[f]) / positions for f in ("compact", "topk")
    }
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, level in ARMS:
            teacher.output_format = fmt
            d = Path(tmp) / f"{fmt}-{level}"
            man = manifest_for(teacher, level, model=str(args.model), revision=None, dataset={})
            t0 = time.perf_counter()
            with StoreWriter(d, man) as w:
                for q, a in zip(seqs, answers[fmt], strict=True):
                    w.add(sequence_key(q), int(q.size), a)
            write_s = time.perf_counter() - t0
            reader = StoreReader(d)
            t0 = time.perf_counter()
            for q in seqs:
                reader.get(q)
            replay_s = time.perf_counter() - t0
            arms[f"{fmt}/{level}"] = {
                "bytes_per_token": _dir_bytes(d) / positions,
                "write_cost_vs_compute": write_s / compute_s,
                "replay_answers_per_s": len(seqs) / replay_s,
                "replay_tokens_per_s": positions / replay_s,
            }
    results["compute_tokens_per_s"] = positions / compute_s
    results["arms"] = arms
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="teacher (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=8, help="sequences")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("-N", "--num-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    res = run(args)
    print(
        f"{res['rows']} x {res['seq']} tokens, N = {res['num_samples']}, "
        f"{res['distinct_per_position']:.1f} distinct tokens a position (topk k = {res['topk_k']})"
    )
    wire = res["wire_bytes_per_token"]
    print(f"wire: compact {wire['compact']:.1f} B/token, topk {wire['topk']:.1f} B/token")
    head = f"{'store arm':<18}{'B/token':>9}{'x compact wire':>16}{'write/compute':>15}"
    print(f"{head}{'replay tok/s':>14}")
    for name, a in res["arms"].items():
        print(
            f"{name:<18}{a['bytes_per_token']:>9.1f}{a['bytes_per_token'] / wire['compact']:>16.2f}"
            f"{a['write_cost_vs_compute']:>15.3f}{a['replay_tokens_per_s']:>14.0f}"
        )
    print(f"teacher compute: {res['compute_tokens_per_s']:.0f} tokens/s (this machine)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
