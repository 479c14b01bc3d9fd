"""Fault injection, on every transport: clients and servers killed, stopped and restarted,
and servers that cannot start.

Servers run a deterministic function (``fault_helpers``: doubling, large blobs, or the fake
teacher's ``full`` logits), so every answer is checked byte for byte. Every wait is bounded;
the assertions are about liveness and correctness, never speed, except where the contract
is a bound ("within its timeout plus one second").
"""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import fault_helpers as fh
from sensai import Client, wrap_collate_function
from sensai.errors import PeerGoneError, SensAIError, TransportTimeout
from transport_helpers import (
    BIG_REQUEST,
    MP,
    Procs,
    ServerThread,
    big_or_echo,
    big_response_then_stop,
    double,
    make_client,
    make_server,
)

pytestmark = pytest.mark.timeout(120)

KILLS = 100  # clients SIGKILLed per transport


class FaultProcs(Procs):
    """`Procs` that can also start the fake teacher server of `fault_helpers`."""

    def server(self, kind: str, path: str, num_slots: int = 4) -> Any:
        ready = MP.Event()
        p = self.start(fh.serve_process, kind, path, num_slots, ready)
        assert ready.wait(30), "the server process did not start"
        return p


@pytest.fixture
def procs() -> Iterator[FaultProcs]:
    g = FaultProcs()
    yield g
    g.cleanup()


def _kill(p: Any, sig: int = signal.SIGKILL) -> None:
    os.kill(p.pid, sig)
    p.join(10)
    assert not p.is_alive()


class Steady:
    """A client in a thread sending distinct requests and checking every answer."""

    def __init__(self, kind: str, path: str, nbytes: int = 8000) -> None:
        self.client = make_client(kind, path, None)
        self.n = nbytes // 8
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            x = np.arange(self.n, dtype=np.float64) + i
            try:
                out = self.client.request(x, timeout=30)
                if not np.array_equal(out, 2 * x):
                    self.errors.append(f"request {i}: wrong answer")
            except SensAIError as e:
                self.errors.append(f"request {i}: {type(e).__name__}: {e}")
                return
            self.done += 1
            i += 1

    def wait_for_more_than(self, n: int, timeout: float = 30.0) -> None:
        fh.wait_until(
            lambda: self.done > n or self.errors, timeout, "the steady client to progress"
        )
        assert not self.errors, self.errors

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(40)
        assert not self._thread.is_alive(), "the steady client is stuck"
        self.client.close()
        assert not self.errors, self.errors
        return self.done


# --- clients killed -----------------------------------------------------------------------------


STEADY = 2  # clients that keep going while the others are killed


def test_client_killed_mid_request_many_times(
    kind: str, path: str, short_tmp: str, procs: FaultProcs
) -> None:
    """KILLS clients SIGKILLed at random moments (connecting, sending, being answered) while
    STEADY other clients keep going: they get every answer right and keep being answered,
    the server never fails, and the dead clients' slot is leased again by the next one each
    time."""
    reports = os.path.join(short_tmp, "reports")
    os.mkdir(reports)
    server = procs.server(kind, path, STEADY + 1)
    stop = MP.Event()
    done = [MP.Value("q", 0) for _ in range(STEADY)]
    steady = [  # slots 0..STEADY-1
        procs.start(fh.steady_client, kind, path, done[k], stop, reports, k) for k in range(STEADY)
    ]

    def progress(since: list[int]) -> bool:
        """Every steady client got more answers than ``since`` (or something failed: the
        failure is reported below). Victims' "ok-" reports do not count."""
        moved = all(d.value > n for d, n in zip(done, since, strict=True))
        return moved or any(n.startswith("fail-") for n in os.listdir(reports))

    fh.wait_until(lambda: progress([0] * STEADY), 30, "the steady clients")
    rng = random.Random(7)
    checkpoint = [d.value for d in done]
    for i in range(KILLS):
        connected = MP.Event()
        p = procs.start(fh.victim_client, kind, path, i, reports, connected)  # slot STEADY
        # One in ten is killed whenever it is (often while connecting); the others at a
        # random moment of their requests (a random delay, not a synchronisation).
        if i % 10:
            assert connected.wait(30), f"victim {i} could not connect: {os.listdir(reports)}"
        time.sleep(rng.uniform(0.0, 0.05))
        _kill(p)
        procs.items.remove(p)
        if i % 25 == 24:  # liveness: every other client kept being answered meanwhile
            fh.wait_until(lambda c=checkpoint: progress(c), 30, "progress of every client")
            checkpoint = [d.value for d in done]
    assert server.is_alive()
    names = os.listdir(reports)
    fails = {n: open(os.path.join(reports, n)).read() for n in names if n.startswith("fail-")}
    assert not fails, fails
    answered = sum(n.startswith("ok-") for n in names)
    # The dead clients' slot: explicitly, and leased, it works at once.
    x = np.arange(100_000, dtype=np.float64)
    with make_client(kind, path, STEADY, connect_timeout=10) as c:
        np.testing.assert_array_equal(c.request(x, timeout=10), 2 * x)
    with make_client(kind, path, None, connect_timeout=10) as c:
        assert c.slot_id == STEADY
        np.testing.assert_array_equal(c.request(x, timeout=10), 2 * x)
    stop.set()
    for p in steady:
        p.join(30)
        assert p.exitcode == 0
    assert not [n for n in os.listdir(reports) if n.startswith("fail-")]
    # Most victims were killed mid-conversation (after at least one answer); each of those
    # leased the slot the previous victim died holding.
    assert answered >= KILLS // 4, f"only {answered}/{KILLS} victims got an answer before dying"
    counts = " and ".join(str(d.value) for d in done)
    print(
        f"\nFIGURE client-kill {kind}: {KILLS} clients SIGKILLed ({answered} after their first "
        f"answer); the {STEADY} other clients got {counts} answers, all correct; the dead "
        "clients' slot served at once"
    )


# --- servers killed -----------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [3.0, None], ids=["timeout3s", "no-timeout"])
def test_server_killed_mid_response(
    kind: str, path: str, procs: FaultProcs, timeout: float | None
) -> None:
    """Three clients stream 8 MiB answers; the server is SIGKILLed at a random moment. Each
    client's request in flight ends with PeerGoneError (or TransportTimeout) within its
    timeout plus one second (without a timeout: within 5 s of the kill)."""
    server = procs.server(kind, path, 4)
    nbytes = 8 << 20
    results: list[tuple[float, float, BaseException | None, int]] = []
    first = [threading.Event() for _ in range(3)]
    start = threading.Barrier(3)

    def client(k: int) -> None:
        c = make_client(kind, path, None)
        start.wait(10)
        done = 0
        while True:
            t0 = time.monotonic()
            try:
                out = c.request(np.array([BIG_REQUEST, nbytes], dtype=np.int64), timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - checked by the test
                results.append((t0, time.monotonic(), e, done))
                c.close()
                return
            if out.shape != (nbytes,) or out[0] != 7 or out[-1] != 7:
                results.append((t0, time.monotonic(), AssertionError("bad answer"), done))
                return
            done += 1
            first[k].set()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    for ev in first:
        assert ev.wait(30), "a client got no answer before the kill"
    time.sleep(random.Random(3).uniform(0, 0.03))  # a random moment, mid-stream
    killed_at = time.monotonic()
    os.kill(server.pid, signal.SIGKILL)
    for t in threads:
        t.join((timeout or 5.0) + 10)
        assert not t.is_alive(), "a client is still waiting for a dead server"
    assert len(results) == 3

    bound = (timeout or 5.0) + 1.0
    for t0, t1, e, done in results:
        assert isinstance(e, (PeerGoneError, TransportTimeout)), repr(e)
        if timeout is None:
            assert isinstance(e, PeerGoneError), repr(e)
        assert done >= 1
        assert t1 - max(t0, killed_at) <= bound, f"{type(e).__name__} after {t1 - t0:.2f}s"
        if timeout is not None:
            assert t1 - t0 <= bound
    # The README's figure (pytest -s): each client's time from the kill to its error.
    errors = sorted((t1 - killed_at, type(e).__name__) for _, t1, e, _ in results)
    names = "/".join(sorted({n for _, n in errors}))
    arm = f"timeout {timeout:.0f} s" if timeout is not None else "no timeout"
    bound_text = f"{timeout:.0f}+1 s" if timeout is not None else "5+1 s after the kill"
    print(
        f"\nFIGURE server-kill {kind} ({arm}): {len(errors)} clients, {names} "
        f"{', '.join(f'{dt:.3f}' for dt, _ in errors)} s after the kill (bound: {bound_text})"
    )


def test_collate_wrapper_warns_and_continues_when_the_server_dies_mid_response(
    kind: str, path: str, procs: FaultProcs
) -> None:
    """The fake teacher answers 4 MiB of logits per batch; it is SIGKILLed while batches are
    being collated. The batch in flight comes back without teacher logits and a warning;
    the following batches too (no server), each within its timeouts."""
    server = procs.server(kind, path, 2)
    client = Client(fh.address(kind, path), timeout=3.0, connect_timeout=1.0)

    def collate(rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"input_ids": np.stack(rows)}

    wrapped = wrap_collate_function(
        collate, client, num_retries=2, retry_delay=0.05, on_error="skip"
    )
    rows = [np.arange(1024, dtype=np.int64) % fh.VOCAB + i for i in range(16)]
    batch = wrapped(rows)
    np.testing.assert_array_equal(batch["teacher_logits"].numpy(), fh.full_logits(np.stack(rows)))
    threading.Timer(random.Random(5).uniform(0, 0.05), os.kill, (server.pid, 9)).start()
    lost = 0
    for _ in range(400):
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = wrapped(rows)
        elapsed = time.monotonic() - t0
        np.testing.assert_array_equal(batch["input_ids"], np.stack(rows))
        if "teacher_logits" in batch:
            assert not caught
            np.testing.assert_array_equal(
                batch["teacher_logits"].numpy(), fh.full_logits(np.stack(rows))
            )
            continue
        assert not any(k.startswith("teacher_logits") for k in batch)
        assert caught and all(issubclass(w.category, RuntimeWarning) for w in caught)
        assert "PeerGoneError" in str(caught[0].message) or "TransportTimeout" in str(
            caught[0].message
        )
        # two tries: each at most the request timeout, or the connect timeout to find
        # that no server is back
        assert elapsed < 2 * (3.0 + 1.0) + 1.0, f"{elapsed:.2f}s"
        lost += 1
        if lost == 2:
            break
    assert lost == 2, "the server was killed but batches kept their teacher logits"
    client.close()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_server_restarted_on_the_same_path(
    kind: str, path: str, procs: FaultProcs, how: str
) -> None:
    """Existing `Client` objects (the raw seed call and the teacher call) recover on their next
    request after the server restarts on the same path, without any change in user code."""
    sig = getattr(signal, how)
    server = procs.server(kind, path, 4)
    address = fh.address(kind, path)
    a = Client(address, timeout=10, connect_timeout=2)
    b = Client(address, timeout=10, connect_timeout=2)
    ids = np.arange(24, dtype=np.int64).reshape(2, 12) % fh.VOCAB
    x = np.linspace(0, 1, 1000)

    def check() -> None:
        out = a.get_teacher_logits(ids)
        np.testing.assert_array_equal(out.logits.numpy(), fh.full_logits(ids))
        assert out.format == "full" and bool(out.mask.all())
        np.testing.assert_array_equal(b.send_tensor(x), 2 * x)

    check()
    for _ in range(3):  # restart, and restart again
        _kill(server, sig)
        server = procs.server(kind, path, 4)
        check()
    # A request while no server runs fails (within the connect timeout); the next one after
    # the server is back works.
    _kill(server, sig)
    t0 = time.monotonic()
    with pytest.raises(PeerGoneError):
        b.send_tensor(x)
    assert time.monotonic() - t0 < 2 + 2
    server = procs.server(kind, path, 4)
    check()
    a.close()
    b.close()


# --- a stopped client ---------------------------------------------------------------------------


def test_stopped_client_with_a_large_answer_does_not_hold_up_the_others(
    kind: str, path: str, procs: FaultProcs
) -> None:
    """A client asks for 32 MiB and stops itself (SIGSTOP) before reading it; two other
    clients keep getting their answers (liveness), and the stopped one gets its whole
    answer after SIGCONT."""
    big_sent = threading.Event()

    def handler(server: Any, slot: int) -> None:
        x = server.read_tensor_slot(slot)
        if x is None:
            return
        if x.shape == (2,) and x[0] == BIG_REQUEST:
            server.write_tensor_slot(slot, big_or_echo(x))
            big_sent.set()
        else:
            server.write_tensor_slot(slot, double(x))

    server = make_server(kind, path, 3, max_nbytes=40 << 20)
    with ServerThread(server, handler):
        mine, theirs = MP.Pipe()
        a = procs.start(big_response_then_stop, kind, path, 32 << 20, theirs)
        theirs.close()
        assert mine.poll(30) and mine.recv()[0] == "sent"
        fh.wait_until(lambda: _stopped(a.pid), 30, "the client to stop itself")
        assert big_sent.wait(30), "the server never answered the stopped client"
        others = [Steady(kind, path, nbytes=64 << 10) for _ in range(2)]
        try:
            for s in others:
                s.wait_for_more_than(50)
            # Still stopped: the answers above came while it held its 32 MiB unread.
            assert _stopped(a.pid)
            counts = [s.done for s in others]
        finally:
            os.kill(a.pid, signal.SIGCONT)
            for s in others:
                s.stop()
        assert mine.poll(30), "the resumed client never reported"
        assert mine.recv() == ("ok",)
        a.join(10)
        assert a.exitcode == 0
    # The README's figure (pytest -s).
    print(
        f"\nFIGURE sigstop {kind}: while a client stood stopped with a 32 MiB answer unread, "
        f"the {len(counts)} other clients got {' and '.join(map(str, counts))} answers "
        "(64 KiB each, all correct); the stopped one got its whole answer after SIGCONT"
    )


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


# --- servers that cannot start ------------------------------------------------------------------


def _start_error(kind: str, path: str, **kw: Any) -> str:
    with pytest.raises((SensAIError, OSError)) as ei:
        make_server(kind, path, 2, **kw)
    return str(ei.value)


def test_path_in_a_missing_directory(kind: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "missing", "ep")
    text = _start_error(kind, path)
    assert os.path.join(short_tmp, "missing") in text and "No such file" in text, text
    assert os.listdir(short_tmp) == []


def _try_start_as(uid: int, kind: str, path: str, conn: Any) -> None:
    try:
        if uid != os.geteuid():
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        make_server(kind, path, 2)
        conn.send(("started", ""))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send((type(e).__name__, str(e)))


def test_path_the_user_may_not_write(kind: str, short_tmp: str, procs: FaultProcs) -> None:
    """A directory the server's user may only read: root runs the server as nobody (root
    would bypass the mode); anyone else uses a read-only directory of their own."""
    ro = os.path.join(short_tmp, "ro")
    os.mkdir(ro)
    os.chmod(ro, 0o555)
    os.chmod(short_tmp, 0o755)
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    mine, theirs = MP.Pipe()
    procs.start(_try_start_as, uid, kind, os.path.join(ro, "ep"), theirs)
    theirs.close()
    assert mine.poll(30)
    name, text = mine.recv()
    assert name != "started"
    assert "Permission denied" in text and ro in text, (name, text)
    assert os.listdir(ro) == []
    assert os.listdir(short_tmp) == ["ro"]


def _start_with_fsize_limit(kind: str, path: str, limit: int, conn: Any) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        make_server(kind, path, 2, max_nbytes=64 << 20)
        conn.send(("started", ""))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send((type(e).__name__, str(e)))


def test_file_size_limit_at_start(kind: str, path: str, short_tmp: str, procs: FaultProcs) -> None:
    """No file may grow (RLIMIT_FSIZE, "File too large"; a full device is the test below):
    writing the lock file's pid, or reserving the shared-memory file, fails. The error says
    so and nothing is left behind."""
    # Shared memory: a limit above the lock file's few bytes, so that reserving fails.
    limit = 1 << 20 if kind == "shared_memory" else 0
    mine, theirs = MP.Pipe()
    procs.start(_start_with_fsize_limit, kind, path, limit, theirs)
    theirs.close()
    assert mine.poll(30)
    name, text = mine.recv()
    assert name != "started"
    assert "File too large" in text, (name, text)
    assert os.listdir(short_tmp) == []


class LeftBehind(AssertionError):
    """A server that failed to start left files behind."""


def _sweep_full_device(
    kind: str, mnt: str, free_one_more: Any, tries: int
) -> tuple[int | None, list[str], list[str]]:
    """Start a server in ``mnt`` (a full filesystem), freeing one more unit (a page or an
    inode) before each further try, until one starts or ``tries`` failed, so that each try
    fails one creation step later. Every failure must name the endpoint (not only a temporary
    name the server makes a file under first) and say the device is full. Returns the try that
    started (None if none did), the error texts and what the failed tries left behind
    (removed, so that the next try starts clean)."""
    path = os.path.join(mnt, "ep")
    texts: list[str] = []
    left: list[str] = []
    for i in range(tries):
        if i:
            free_one_more()
        before = set(os.listdir(mnt))
        try:
            server = make_server(kind, path, 2, max_nbytes=1 << 16)
        except (SensAIError, OSError) as e:
            text = str(e)
            texts.append(text)
            assert path in text, f"try {i}: the error does not name the endpoint {path}: {text}"
            if "for the shared-memory file" in text:  # the space check before reserving
                assert f"for the shared-memory file {path}: " in text, text
                assert "are free in" in text and "--max-nbytes" in text, text
                assert "--num-clients" in text and "--shm-size=" in text, text
            else:
                assert isinstance(e, OSError) and e.errno == errno.ENOSPC, f"try {i}: {e!r}"
                assert "No space left on device" in text, f"try {i}: {text}"
            extra = sorted(set(os.listdir(mnt)) - before)
            if extra:
                inside = {n: os.listdir(os.path.join(mnt, n)) for n in extra
                          if os.path.isdir(os.path.join(mnt, n))}  # fmt: skip
                left.append(f"try {i} ({text}) left {extra} {inside}")
                for n in extra:
                    p = os.path.join(mnt, n)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            continue
        server.close()
        assert set(os.listdir(mnt)) == before, "a closed server left files behind"
        return i, texts, left
    return None, texts, left


@pytest.mark.parametrize("full", ["space", "inodes"])
def test_device_full_at_start(kind: str, short_tmp: str, full: str) -> None:
    """A real full device (ENOSPC): a tmpfs of 64 KiB filled with a file, or one whose
    inodes are all taken. One page or inode is freed per try, so every creation step of
    the server (lock file, directory, temporary names, socket, FIFOs, the shared-memory
    file) meets the full device in turn: each try fails with an error that names the path
    and says the device is full, and leaves nothing behind; the server starts once there is
    room. Skipped where mounting is not permitted."""
    mnt = os.path.join(short_tmp, "mnt")
    os.mkdir(mnt)
    with fh.mounted_tmpfs(mnt, "size=64k" if full == "space" else "size=1m,nr_inodes=32"):
        if full == "space":
            filler = fh.fill_space(mnt)

            def free_one_more() -> None:
                os.truncate(filler, max(os.path.getsize(filler) - 4096, 0))

            started, texts, left = _sweep_full_device(kind, mnt, free_one_more, 3)
        else:
            fillers = fh.fill_inodes(mnt)
            started, texts, left = _sweep_full_device(
                kind, mnt, lambda: os.unlink(fillers.pop()), 12
            )
    assert os.listdir(mnt) == []  # unmounted
    if full == "space" and kind == "shared_memory":
        # 0.5 MiB never fits in 64 KiB: the lock file fails first, then the space check
        assert started is None and "No space left" in texts[0], texts
        assert all("for the shared-memory file" in t for t in texts[1:]), texts
    else:
        assert started is not None and started >= 1, (started, texts)
    print(
        f"{kind} {full}: {len(texts)} failed starts, then {'-' if started is None else 'started'}"
    )
    if left:
        raise LeftBehind("\n".join(left))


def test_shared_memory_larger_than_dev_shm(short_tmp: str) -> None:
    """A shared-memory file larger than /dev/shm can hold: refused before anything is made,
    saying how much was asked and how much is free."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    st = os.statvfs("/dev/shm")
    total = st.f_blocks * st.f_frsize
    name = f"sensai-full-{os.getpid()}"
    path = f"/dev/shm/{name}"
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(SensAIError) as ei:
        make_server("shared_memory", path, 4, max_nbytes=max(total, 1 << 20))
    text = str(ei.value)
    assert "MiB" in text and "free" in text, text
    assert {n for n in set(os.listdir("/dev/shm")) - before if name in n} == set()
