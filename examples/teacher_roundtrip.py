"""Serve the embedded teacher in its own process and fetch its sampled logits for a sentence.

    python examples/teacher_roundtrip.py [--transport shared_memory] [--text "..."]

Starts `sensai serve` (SmolLM2-135M-Instruct, converted and cached on first use), connects a
`sensai.Client` to the address it prints, asks for the teacher's answer in the compact format,
prints for each position the most probable of the tokens the teacher sampled, with their
probabilities, and stops the server (which removes its files).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import torch

from sensai import Client
from sensai.teacher import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="shared_memory")
    ap.add_argument("--text", default="The capital of France is Paris, and the capital of Italy is")
    args = ap.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "sensai.cli", "serve", "--transport", args.transport,
         "--format", "compact", "--num-clients", "2", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        t0 = time.perf_counter()
        address = server.stdout.readline().strip() if server.stdout else ""
        if not address:
            raise SystemExit("the server did not start (see its messages above)")
        print(f"teacher ready at {address} after {time.perf_counter() - t0:.1f}s")
        tokenizer = load_tokenizer()  # the teacher's, without its weights
        ids = tokenizer(args.text, return_tensors="pt").input_ids
        with Client(address) as client:
            info = client.info()
            t1 = time.perf_counter()
            out = client.get_teacher_logits(ids, seed=0)
            ms = (time.perf_counter() - t1) * 1e3
        print(
            f"{info['model']}: {info['num_samples']} samples per position at temperature "
            f"{info['temperature']}, {out.nbytes} bytes for {out.num_positions} positions "
            f"in {ms:.0f} ms"
        )
        logprobs, pos = out.teacher_logprobs(), out.position_of_entries()
        tokens = ids[0].tolist()
        for p in range(out.num_positions):
            sel = pos == p
            toks, lp = out.tokens[sel], logprobs[sel]
            top = torch.argsort(lp, descending=True)[:3]  # the most probable sampled tokens
            guesses = ", ".join(
                f"{tokenizer.decode([int(toks[i])])!r} {float(lp[i].exp()):.2f}" for i in top
            )
            context = tokenizer.decode(tokens[: p + 1])[-28:]
            print(f"  ...{context!r:32s} -> {guesses}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
