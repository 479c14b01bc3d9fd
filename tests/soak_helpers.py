"""The soak: client processes x requests of mixed sizes against a served function or the teacher.

Shared by ``tests/test_soak.py`` (a shortened run in CI) and ``scripts/soak`` (the full run).
A server runs in its own process (``SensAIServer`` with the doubling function, or the
teacher's ``TeacherService`` as ``sensai serve`` runs it); each client process sends its
requests one after another and checks every answer against the expected one:

* ``double``: random arrays and lists of arrays (7 dtypes, 0-3 dims, 1 byte to 4 MiB), each
  answer byte-exact ``2 * x``;
* ``teacher``: batches of token ids with masks and a per-request seed, drawn from a pool whose
  answers the parent computed with the in-process teacher (``TeacherLogitsServer.compute``):
  float arrays within float32 tolerance, integer arrays (sampled indices, counts) identical.

A request that raises is *lost*; an answer that differs is *corrupt*. The server's open file
descriptors and resident memory (less the pages of the shared-memory transport's file, whose
size is fixed at start) are read from /proc once every client has done its first
``warm`` requests (together the first thousand; half the run when it is shorter) and again
once all are done, while every client is still connected.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

KINDS = ("shared_memory", "unix_socket", "named_pipe")
MODES = ("double", "teacher")
NUM_CLIENTS = 4
MAX_NBYTES = 8 << 20  # the doubling server's payload limit; requests stay within half of it
NUM_SAMPLES = 16
POOL_SIZE = 32
REQUEST_TIMEOUT = 120.0  # seconds per request: generous for a loaded machine
START_TIMEOUT = 120.0
RSS_LIMIT = 20 << 20
_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.int8]

MP = multiprocessing.get_context("forkserver")
MP.set_forkserver_preload(["numpy", "torch", "sensai", "sensai.teacher", "soak_helpers"])


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def proc_rss(pid: int, file: str | None = None) -> tuple[int, int]:
    """Resident memory in bytes: (all but the pages mapped from ``file``, those of ``file``).

    ``file`` is the shared-memory transport's file: its size is fixed (and reserved) when the
    server starts, and its pages count as resident only once first touched, so they are
    counted apart from the memory a leak would grow.
    """
    rss = {False: 0, True: 0}
    of_file = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if _MAPPING.match(line):
                parts = line.split(None, 5)
                of_file = file is not None and len(parts) == 6 and parts[5].strip() == file
            elif line.startswith("Rss:"):
                rss[of_file] += int(line.split()[1]) * 1024
    return rss[False], rss[True]


# --- the servers --------------------------------------------------------------------------------


def double(x: Any) -> Any:
    """``2 * x``, elementwise; a 0-d array stays an array (numpy would give a scalar)."""
    if isinstance(x, list):
        return [np.asarray(t * 2) for t in x]
    return np.asarray(x * 2)


def _serve(kind: str, mode: str, path: str, model_dir: str | None, ready: Any) -> None:
    """A server process (forked from the forkserver, which has numpy, torch and sensai loaded):
    the doubling function on ``SensAIServer`` or the teacher on ``TeacherService`` (what
    ``sensai serve`` runs), until SIGTERM."""
    import torch

    from sensai import SensAIServer
    from sensai.transports import create_transport, format_address

    # One compute thread: torch's default (a thread per core, spin-waiting) slows a shared
    # 2-core machine's teacher down twenty-fold (measured: 287 ms against 11 ms a request).
    # The soak checks answers and leaks, not throughput.
    torch.set_num_threads(1)
    if mode == "double":
        transport, path = create_transport(kind, path, num_slots=NUM_CLIENTS, max_nbytes=MAX_NBYTES)
        server: Any = SensAIServer(transport)
    else:
        from sensai.serving.batching import TeacherService
        from sensai.teacher import TeacherLogitsServer

        # `sensai serve`'s limits (a sampled answer has 5 tensors; shared memory's default
        # max_tensors is 4).
        transport, path = create_transport(
            kind, path, num_slots=NUM_CLIENTS, max_tensors=8, max_dims=8
        )
        teacher = TeacherLogitsServer(model_dir, device="cpu", num_samples=NUM_SAMPLES)
        server = TeacherService(teacher, transport)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    ready.put(format_address(kind, path))
    try:
        if mode == "double":
            server.serve_forever(double)
        else:
            server.serve_forever()
    finally:
        transport.close()


class ServerProcess:
    """A soak server in its own process; ``pid`` is where its descriptors and memory are read."""

    def __init__(self, kind: str, mode: str, model_dir: str | None = None) -> None:
        self.kind, self.mode = kind, mode
        # Shared memory where it belongs (as a bare name would be); sockets under /tmp.
        base = "/dev/shm" if kind == "shared_memory" and os.path.isdir("/dev/shm") else "/tmp"
        self.dir = tempfile.mkdtemp(prefix="sai-soak-", dir=base)
        self.path = os.path.join(self.dir, {"unix_socket": "s.sock"}.get(kind, "t"))
        path = self.path
        self._ready = MP.Queue()
        self.proc = MP.Process(target=_serve, args=(kind, mode, path, model_dir, self._ready))
        self.proc.start()
        self.address = ""

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.address:
            if self.proc.exitcode is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"the {self.mode} server on {self.kind} did not start "
                    f"(exit code {self.proc.exitcode}; its log is on stderr)"
                )
            try:
                self.address = self._ready.get(timeout=1.0)
            except queue.Empty:
                continue
        return self.address

    def stop(self) -> int | None:
        if self.proc.exitcode is None:
            self.proc.terminate()  # SIGTERM: the server finishes and removes its files
            self.proc.join(30)
            if self.proc.exitcode is None:
                self.proc.kill()
                self.proc.join()
        return self.proc.exitcode

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- requests -----------------------------------------------------------------------------------


def random_array(rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(_DTYPES[rng.integers(len(_DTYPES))])
    r = rng.random()
    if r < 0.6:  # small: up to 1 KiB
        nbytes = int(rng.integers(1, 1 << 10))
    elif r < 0.9:  # medium: up to 256 KiB
        nbytes = int(rng.integers(1 << 10, 1 << 18))
    else:  # large: up to 4 MiB in all
        nbytes = int(rng.integers(1 << 18, 1 << 22))
    n = max(1, nbytes // dtype.itemsize)
    ndim = int(rng.integers(0, 4)) if n > 1 else 0
    shape: tuple[int, ...] = ()
    if ndim:
        lead = [int(rng.integers(1, 5)) for _ in range(ndim - 1)]
        shape = (*lead, max(1, n // int(np.prod(lead))))
    size = int(np.prod(shape)) if shape else 1
    if dtype.kind == "f":
        return (rng.standard_normal(size) * 100).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=size, dtype=dtype, endpoint=True).reshape(shape)


def random_request(rng: np.random.Generator) -> Any:
    if rng.random() < 0.3:  # a list of 1-3 arrays, within the payload limit together
        return [random_array(rng) for _ in range(int(rng.integers(1, 4)))]
    return random_array(rng)


def teacher_pool(model_dir: str, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, int, list]]:
    """Requests (ids, mask, seed) of mixed shapes and the in-process teacher's answers."""
    import torch

    from sensai.teacher import TeacherLogitsServer

    teacher = TeacherLogitsServer(model_dir, device="cpu", num_samples=NUM_SAMPLES)
    rng = np.random.default_rng(seed)
    pool = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the soak's servers (see ServerProcess)
    try:
        for i in range(POOL_SIZE):
            b, s = int(rng.integers(1, 5)), int(rng.integers(2, 48))
            ids = rng.integers(3, teacher.vocab_size, size=(b, s), dtype=np.int64)
            mask = np.ones_like(ids)
            for row in range(b):
                mask[row, int(rng.integers(1, s + 1)) :] = 0  # right padding, random length
            req_seed = 1000 + i
            ref = teacher.compute(ids, mask, seed=req_seed)
            pool.append((ids, mask, req_seed, [a.cpu().numpy() for a in ref.to_arrays()]))
    finally:
        torch.set_num_threads(threads)
    return pool


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check_double(x: Any, got: Any) -> str | None:
    """None if ``got`` is exactly ``2 * x``, else what differs."""
    want = double(x)
    if isinstance(want, list):
        ok = isinstance(got, list) and len(got) == len(want)
        ok = ok and all(_same_bytes(np.asarray(g), w) for g, w in zip(got, want, strict=False))
    else:
        ok = isinstance(got, np.ndarray) and _same_bytes(got, want)
    if ok:
        return None
    return f"answer differs from 2*x for {_describe(x)}"


def check_teacher(ref: list[np.ndarray], got: list[np.ndarray]) -> str | None:
    if len(got) != len(ref):
        return f"{len(got)} arrays, expected {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        g = np.asarray(g)
        if g.shape != r.shape:
            return f"array {i}: shape {g.shape}, expected {r.shape}"
        if r.dtype.kind == "f":
            if not np.allclose(g.astype(np.float32), r.astype(np.float32), rtol=1e-4, atol=1e-4):
                return f"array {i}: values beyond float32 tolerance"
        elif not np.array_equal(g, r):
            return f"array {i} ({r.dtype}): differs"
    return None


def _describe(x: Any) -> str:
    if isinstance(x, list):
        return "[" + ", ".join(_describe(t) for t in x) + "]"
    return f"{x.dtype}{list(x.shape)}"


# --- the client processes -----------------------------------------------------------------------


def client_main(
    index: int,
    address: str,
    mode: str,
    n: int,
    warm: int,
    seed: int,
    pool: list | None,
    events: Any,
    close_now: Any,
) -> None:
    """One client process: ``n`` requests, reporting ("warm", ...) after ``warm`` of them and
    ("done", ...) at the end, then staying connected until ``close_now`` is set."""
    from sensai.errors import SensAIError
    from sensai.formats import FORMAT_TAGS
    from sensai.protocol import SEED_FLAG
    from sensai.transports import connect

    rng = np.random.default_rng([seed, index])
    lost = corrupt = 0
    problems: list[str] = []
    client = None
    for i in range(n):
        try:
            if client is None:
                client = connect(address, connect_timeout=REQUEST_TIMEOUT)
            if mode == "double":
                x = random_request(rng)
                wrong = check_double(x, client.request(x, timeout=REQUEST_TIMEOUT))
            else:
                ids, mask, req_seed, ref = pool[int(rng.integers(len(pool)))]
                msg = client.request_message(
                    [ids, mask], tag=SEED_FLAG, value=req_seed, timeout=REQUEST_TIMEOUT
                )
                if msg.kind != "response" or msg.tag != FORMAT_TAGS["sampled"]:
                    wrong = f"a {msg.kind} frame with tag {msg.tag}"
                else:
                    wrong = check_teacher(ref, [np.array(a) for a in msg.arrays()])
                del msg
        except SensAIError as e:
            lost += 1
            if len(problems) < 5:
                problems.append(f"request {i}: lost: {type(e).__name__}: {e}")
            if client is not None:
                client.close()
                client = None
            wrong = None
        if wrong is not None:
            corrupt += 1
            if len(problems) < 5:
                problems.append(f"request {i}: corrupt: {wrong}")
        if i + 1 == warm:
            events.put(("warm", index))
    events.put(("done", index, lost, corrupt, problems))
    close_now.wait(REQUEST_TIMEOUT)
    if client is not None:
        client.close()


@dataclass
class SoakResult:
    kind: str
    mode: str
    clients: int
    requests: int
    lost: int = 0
    corrupt: int = 0
    fds_warm: int = 0
    fds_end: int = 0
    rss_warm: int = 0
    rss_end: int = 0
    shm_file_rss_end: int = 0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def fd_delta(self) -> int:
        return self.fds_end - self.fds_warm

    @property
    def rss_growth(self) -> int:
        return self.rss_end - self.rss_warm

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.corrupt == 0
            and self.fd_delta == 0
            and self.rss_growth <= RSS_LIMIT
            and not self.problems
        )

    def line(self) -> str:
        return (
            f"{self.kind:13} {self.mode:7} {self.clients} x {self.requests // self.clients} = "
            f"{self.requests} requests: lost {self.lost}, corrupt {self.corrupt}, server fds "
            f"{self.fds_warm} -> {self.fds_end} (delta {self.fd_delta}), RSS "
            f"{self.rss_warm / 2**20:.1f} -> {self.rss_end / 2**20:.1f} MiB (growth "
            f"{self.rss_growth / 2**20:+.1f} MiB"
            + (
                f"; plus {self.shm_file_rss_end / 2**20:.1f} MiB of the shared-memory file"
                if self.kind == "shared_memory"
                else ""
            )
            + f"), {self.wall_s:.1f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(fd_delta=self.fd_delta, rss_growth=self.rss_growth, ok=self.ok())
        return d


def run_soak(
    server: ServerProcess,
    n: int,
    *,
    clients: int = NUM_CLIENTS,
    pool: list | None = None,
    seed: int = 0,
    timeout: float = 3600.0,
) -> SoakResult:
    """``clients`` processes x ``n`` requests against a started server (see module docs)."""
    assert server.address, "start the server first (wait_ready)"
    pid = server.pid
    shm_file = server.path if server.kind == "shared_memory" else None
    # The first thousand requests (250 per client) warm up; a short run warms up on half.
    warm = max(1, min(1000 // clients, n // 2))
    res = SoakResult(server.kind, server.mode, clients, clients * n)
    events, close_now = MP.Queue(), MP.Event()
    procs = [
        MP.Process(
            target=client_main,
            args=(i, server.address, server.mode, n, warm, seed, pool, events, close_now),
        )
        for i in range(clients)
    ]
    t0 = time.monotonic()
    deadline = t0 + timeout
    for p in procs:
        p.start()
    try:
        warmed = done = 0
        while done < clients:
            left = deadline - time.monotonic()
            if left <= 0 or any(p.exitcode not in (None, 0) for p in procs):
                raise AssertionError(
                    f"soak on {server.kind}: {done} of {clients} clients finished in time; "
                    f"exit codes {[p.exitcode for p in procs]}; server exit code "
                    f"{server.proc.exitcode}"
                )
            try:
                ev = events.get(timeout=min(left, 5.0))
            except queue.Empty:  # re-check the clients and the deadline
                continue
            if ev[0] == "warm":
                warmed += 1
                if warmed == clients:
                    res.fds_warm, (res.rss_warm, _) = proc_fds(pid), proc_rss(pid, shm_file)
            else:
                done += 1
                res.lost += ev[2]
                res.corrupt += ev[3]
                res.problems += [f"client {ev[1]}: {p}" for p in ev[4]]
        # Every client is done and still connected.
        res.fds_end = proc_fds(pid)
        res.rss_end, res.shm_file_rss_end = proc_rss(pid, shm_file)
        res.wall_s = time.monotonic() - t0
    finally:
        close_now.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
    return res
