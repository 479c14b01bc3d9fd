"""Start a SensAI server in its own process and run round trips against it.

    python examples/roundtrip.py [--transport unix_socket|named_pipe|all] [--requests N]

The server doubles every tensor it receives (a stand-in for the teacher;
examples/teacher_roundtrip.py serves the real one). The client sends a batch shaped like a
training batch and checks the answer, then reports the round-trip times.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time

import numpy as np

from sensai import SensAIServer
from sensai.transports import TRANSPORT_KINDS, connect, create_transport, format_address


def _double(x):
    return [t * 2 for t in x] if isinstance(x, list) else x * 2


def serve(kind: str, path: str, ready) -> None:
    transport, _ = create_transport(kind, path=path, num_slots=4)
    server = SensAIServer(transport)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    ready.set()
    try:
        server.serve_forever(_double)
    finally:
        transport.close()


def run(kind: str, requests: int) -> None:
    # Shared memory belongs in /dev/shm (memory); the others anywhere on disk.
    base = "/dev/shm" if kind == "shared_memory" and os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="sensai-demo-", dir=base) as tmp:
        _run_in(kind, os.path.join(tmp, "endpoint"), requests)


def _run_in(kind: str, path: str, requests: int) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=serve, args=(kind, path, ready), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise SystemExit(f"{kind}: the server did not start")
    address = format_address(kind, path)
    input_ids = np.random.default_rng(0).integers(0, 49152, size=(8, 512), dtype=np.int64)
    mask = np.ones_like(input_ids, dtype=np.int8)
    times = []
    with connect(address, connect_timeout=30) as client:
        for _ in range(requests):
            t0 = time.perf_counter()
            ids2, mask2 = client.request([input_ids, mask], timeout=30)
            times.append(time.perf_counter() - t0)
            assert np.array_equal(ids2, input_ids * 2) and np.array_equal(mask2, mask * 2)
    proc.terminate()
    proc.join(10)
    gone = not os.path.exists(path)
    print(
        f"{kind:12s} {address}  {requests} round trips of [8,512] int64 + int8: "
        f"median {statistics.median(times) * 1e6:.0f} us, answers correct, "
        f"server files removed: {gone}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="all", choices=[*TRANSPORT_KINDS, "all"])
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    kinds = TRANSPORT_KINDS if args.transport == "all" else [args.transport]
    for kind in kinds:
        run(kind, args.requests)


if __name__ == "__main__":
    main()
