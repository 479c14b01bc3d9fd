"""Transport benchmark: SensAI's transports against the baselines, side by side.

    python benchmarks/transport_bench.py [--small N] [--large N] [--json PATH]

Server and client run in separate processes. Two workloads:

* small: a [1, 8] int64 request answered by a [1, 8] int64 response; p50/p99 round trip.
* large: the typical sampled-teacher answer: a [8, 512] int64 request answered by
  [8, 511, 256] int64 indices + [8, 511, 256] float32 values (12.6 MB).

The "shared_memory in place" arm answers through reserve/fill/publish: the server writes
the response straight into the shared buffer instead of filling its own arrays and having
write_tensor_slot copy them (the teacher's path on shared memory).

In every arm the server writes every byte of every response (it refills its output arrays
with the request's sequence number), and the client's data is checked against the
expected bytes after the timed loop. Baselines: one numpy copy of the same bytes (the
floor of any transport that copies once) and multiprocessing.Pipe with pickle (what a
user would write by hand). Absolute times hold only for the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

LARGE_SHAPE = (8, 511, 256)
LARGE_BYTES = int(np.prod(LARGE_SHAPE)) * (8 + 4)


def _responses():
    small = np.zeros((1, 8), np.int64)
    idx = np.zeros(LARGE_SHAPE, np.int64)
    val = np.zeros(LARGE_SHAPE, np.float32)
    return small, idx, val


def _answer(req, small, idx, val):
    seq = int(req.reshape(-1)[0])
    if req.shape == (1, 8):
        small.fill(seq)
        return small
    idx.fill(seq)
    val.fill(float(seq % 1000))
    return [idx, val]


def _sensai_server(kind: str, path: str, ready, stop, in_place: bool = False) -> None:
    from sensai.errors import TransportTimeout
    from sensai.transports import create_transport

    transport, _ = create_transport(kind, path=path, num_slots=1, max_nbytes=64 << 20)
    small, idx, val = _responses()
    ready.set()
    try:
        while not stop.is_set():
            try:
                slots = transport.wait_any(0.2)
            except TransportTimeout:
                continue
            for s in slots:
                req = transport.read_tensor_slot(s)
                if in_place and req.shape != (1, 8):
                    # Shared memory's loan-then-send path: write the answer straight into the
                    # shared buffer (what a teacher does with torch.from_numpy(view).copy_(t)).
                    seq = int(req.reshape(-1)[0])
                    del req
                    r = transport.reserve_slot(
                        s, [("int64", LARGE_SHAPE), ("float32", LARGE_SHAPE)]
                    )
                    out_idx, out_val = r.arrays()
                    out_idx.fill(seq)
                    out_val.fill(float(seq % 1000))
                    del out_idx, out_val
                    transport.publish(r)
                else:
                    transport.write_tensor_slot(s, _answer(req, small, idx, val))
    finally:
        transport.close()


def _pipe_server(conn, ready) -> None:
    small, idx, val = _responses()
    ready.set()
    while True:
        req = conn.recv()
        if req is None:
            return
        conn.send(_answer(req, small, idx, val))


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _check(resp, seq: int, large: bool) -> None:
    if large:
        idx, val = resp
        assert idx.shape == LARGE_SHAPE and val.shape == LARGE_SHAPE
        assert np.all(idx == seq) and np.all(val == np.float32(seq % 1000)), "corrupt response"
    else:
        assert np.all(np.asarray(resp) == seq), "corrupt response"


def _measure(request, n_small: int, n_large: int) -> dict:
    small_req = np.zeros((1, 8), np.int64)
    large_req = np.zeros((8, 512), np.int64)
    for i in range(min(200, n_small)):  # warm-up
        small_req[0, 0] = i
        request(small_req)
    small_times = []
    for i in range(n_small):
        small_req[0, 0] = i
        t0 = time.perf_counter()
        request(small_req)
        small_times.append(time.perf_counter() - t0)
    small_req[0, 0] = 12345
    _check(request(small_req), 12345, False)
    for i in range(3):
        large_req[0, 0] = i
        request(large_req)
    large_times = []
    for i in range(n_large):
        large_req[0, 0] = i + 7
        t0 = time.perf_counter()
        r = request(large_req)
        large_times.append(time.perf_counter() - t0)
        del r
    large_req[0, 0] = 424242
    _check(request(large_req), 424242, True)
    med = statistics.median(large_times)
    return {
        "small_p50_us": _percentile(small_times, 0.5) * 1e6,
        "small_p99_us": _percentile(small_times, 0.99) * 1e6,
        "large_ms": med * 1e3,
        "large_gbps": LARGE_BYTES / med / 1e9,
    }


def bench_sensai(kind: str, n_small: int, n_large: int, in_place: bool = False) -> dict:
    from sensai.transports import connect, format_address

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sensai-bench-") as tmp:
        path = os.path.join(tmp, "ep")
        ready, stop = ctx.Event(), ctx.Event()
        proc = ctx.Process(
            target=_sensai_server, args=(kind, path, ready, stop, in_place), daemon=True
        )
        proc.start()
        if not ready.wait(60):
            raise RuntimeError(f"{kind} server did not start")
        with connect(format_address(kind, path), connect_timeout=30) as client:
            res = _measure(lambda x: client.request(x, timeout=60), n_small, n_large)
        stop.set()
        proc.join(10)
    return res


def bench_mp_pipe(n_small: int, n_large: int) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    ready = ctx.Event()
    proc = ctx.Process(target=_pipe_server, args=(b, ready), daemon=True)
    proc.start()
    ready.wait(60)

    def request(x):
        a.send(x)
        return a.recv()

    res = _measure(request, n_small, n_large)
    a.send(None)
    proc.join(10)
    return res


def bench_numpy_copy(n_large: int) -> dict:
    _, idx, val = _responses()
    dst_i, dst_v = np.empty_like(idx), np.empty_like(val)
    times = []
    for i in range(max(n_large, 10)):
        idx.fill(i)
        t0 = time.perf_counter()
        np.copyto(dst_i, idx)
        np.copyto(dst_v, val)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "small_p50_us": None,
        "small_p99_us": None,
        "large_ms": med * 1e3,
        "large_gbps": LARGE_BYTES / med / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="SensAI transport benchmark")
    ap.add_argument("--small", type=int, default=10_000, help="small round trips per arm")
    ap.add_argument("--large", type=int, default=30, help="12.6 MB round trips per arm")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--arms", default="all", help="comma-separated subset of arms")
    args = ap.parse_args()

    from sensai.transports import TRANSPORT_KINDS

    arms: dict[str, object] = {
        k: (lambda k=k: bench_sensai(k, args.small, args.large)) for k in TRANSPORT_KINDS
    }
    arms["shared_memory in place"] = lambda: bench_sensai(
        "shared_memory", args.small, args.large, in_place=True
    )
    arms["numpy copy (floor)"] = lambda: bench_numpy_copy(args.large)
    arms["mp.Pipe + pickle"] = lambda: bench_mp_pipe(args.small, args.large)
    if args.arms != "all":
        wanted = set(args.arms.split(","))
        arms = {k: v for k, v in arms.items() if k in wanted}

    results = {}
    for name, fn in arms.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = fn()

    floor = results.get("numpy copy (floor)", {}).get("large_ms")
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(
        f"{'arm':22s} {'small p50':>10s} {'small p99':>10s} {'12.6 MB rt':>11s} "
        f"{'GB/s':>6s} {'x copy':>7s}"
    )
    for name, r in results.items():
        p50 = f"{r['small_p50_us']:.1f} us" if r["small_p50_us"] is not None else "-"
        p99 = f"{r['small_p99_us']:.1f} us" if r["small_p99_us"] is not None else "-"
        ratio = f"{r['large_ms'] / floor:.2f}" if floor else "-"
        print(
            f"{name:22s} {p50:>10s} {p99:>10s} {r['large_ms']:>8.2f} ms "
            f"{r['large_gbps']:>6.2f} {ratio:>7s}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": platform.platform(), "cores": os.cpu_count(), "results": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
