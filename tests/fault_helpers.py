"""Helpers for the fault-injection tests: a deterministic fake teacher service, child-process
targets (importable by the forkserver of ``transport_helpers.MP``) and small utilities.

The fake service speaks the teacher service's protocol (INFO control request; ``[input_ids]``
or ``[input_ids, attention_mask]`` requests answered in the ``full`` format) with answers that
are a pure function of the request, so a test can check every byte:
``logits[b, p, v] = input_ids[b, p] + v / VOCAB`` (float32) over ``p < S - 1`` and an all-true
mask. Any other request is answered with its tensors doubled, and ``[BIG_REQUEST, n]`` with
``n`` bytes of 7s (as in ``transport_helpers``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from sensai import _core
from sensai.errors import PeerGoneError, SensAIError, TransportTimeout
from sensai.transports import format_address
from transport_helpers import BIG_REQUEST, double, make_client, make_server

INFO_TAG = 0x1001
FULL_TAG = 1  # sensai.formats.FORMAT_TAGS["full"]
VOCAB = 64


def info() -> dict[str, Any]:
    return {
        "model": "fake",
        "vocab_size": VOCAB,
        "output_format": "full",
        "format_tag": FULL_TAG,
        "num_samples": 0,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "topk": 0,
        "protocol_version": int(_core.PROTOCOL_VERSION),
        "max_batch_tokens": 1 << 20,
    }


def full_logits(ids: np.ndarray, vocab: int = VOCAB) -> np.ndarray:
    """The fake teacher's logits for ``ids`` [B, S]: [B, S-1, vocab] float32."""
    p = max(ids.shape[1] - 1, 1)
    base = ids[:, :p].astype(np.float32)[:, :, None]
    return base + np.arange(vocab, dtype=np.float32)[None, None, :] / vocab


def answer(server: Any, slot: int, vocab: int = VOCAB) -> bool:
    """Answer the next request of ``slot``; False when there was none."""
    msg = server.recv_message(slot)
    if msg is None:
        return False
    if msg.kind == "control" and msg.tag == INFO_TAG:
        blob = np.frombuffer(json.dumps(info()).encode(), dtype=np.uint8).copy()
        del msg
        server.send_message(slot, [blob], tag=INFO_TAG, kind="control")
        return True
    arrays = [np.array(a) for a in msg.arrays()]  # copies: the message may be released
    is_list = msg.is_list
    del msg
    if is_list and arrays and arrays[0].dtype == np.int64 and arrays[0].ndim == 2:
        ids = arrays[0]
        logits = full_logits(ids, vocab)
        mask = np.ones(logits.shape[:2], dtype=np.bool_)
        server.send_message(slot, [logits, mask], tag=FULL_TAG)
        return True
    x = arrays if is_list else arrays[0]
    if not is_list and x.shape == (2,) and x.dtype == np.int64 and x[0] == BIG_REQUEST:
        server.send_message(slot, np.full(int(x[1]), 7, dtype=np.uint8))
        return True
    server.send_message(slot, double(x))
    return True


def _exit_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


def serve_process(
    kind: str, path: str, num_slots: int, ready: Any, max_nbytes: int = 64 << 20
) -> None:
    """The fake service in its own process until SIGTERM (clean exit) or SIGKILL."""
    _exit_on_sigterm()
    with make_server(kind, path, num_slots, max_nbytes=max_nbytes) as server:
        ready.set()
        while True:
            try:
                slots = server.wait_any(0.5)
            except TransportTimeout:
                continue
            for slot in slots:
                try:
                    while answer(server, slot):
                        pass
                except PeerGoneError:
                    pass


def victim_client(kind: str, path: str, seed: int, report_dir: str, connected: Any) -> None:
    """Connect and send requests of random sizes, checking every answer, until killed.

    Writes ``<report_dir>/fail-<seed>`` with the reason if anything goes wrong, and
    ``<report_dir>/ok-<seed>`` once its first answer came back (a kill after that landed
    while the client was mid-conversation).
    """
    try:
        rng = np.random.default_rng(seed)
        c = make_client(kind, path, None, connect_timeout=20.0)
        connected.set()
        i = 0
        while True:
            n = int(2 ** rng.uniform(0, 18))  # 8 B to 2 MiB of float64, log-uniform
            x = np.arange(n, dtype=np.float64) + seed * 1e6 + i
            out = c.request(x, timeout=20)
            if not np.array_equal(out, 2 * x):
                raise AssertionError(f"wrong answer for request {i}")
            if i == 0:
                open(os.path.join(report_dir, f"ok-{seed}"), "w").close()
            i += 1
    except BaseException as e:  # noqa: BLE001 - reported to the parent through a file
        with open(os.path.join(report_dir, f"fail-{seed}"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")


def steady_client(
    kind: str, path: str, done: Any, stop: Any, report_dir: str, slot: int = 0
) -> None:
    """On ``slot``, send distinct requests and check every answer until ``stop``; counts
    answers in ``done`` (a shared integer) and writes ``<report_dir>/fail-steady<slot>`` on
    any error."""
    try:
        with make_client(kind, path, slot, connect_timeout=20.0) as c:
            i = 0
            while not stop.is_set():
                x = np.arange(1000, dtype=np.float64) + i + slot * 1e6
                out = c.request(x, timeout=30)
                if not np.array_equal(out, 2 * x):
                    raise AssertionError(f"wrong answer for request {i}")
                i += 1
                with done.get_lock():
                    done.value = i
                stop.wait(0.002)  # pace: leave the CPU to the clients being killed
    except BaseException as e:  # noqa: BLE001 - reported to the parent through a file
        with open(os.path.join(report_dir, f"fail-steady{slot}"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")


def address(kind: str, path: str) -> str:
    return format_address(kind, path)


def wait_until(pred: Any, timeout: float, what: str) -> None:
    """Poll ``pred`` (a liveness condition of another process) until it holds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# --- a tiny filesystem of our own ------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(target: str, options: str) -> Iterator[str]:
    """A tmpfs mounted on the existing directory ``target`` (mount(2) options such as
    ``size=64k,nr_inodes=32``), unmounted on exit. Skips the test where mounting is not
    permitted (not root, or no CAP_SYS_ADMIN, e.g. an unprivileged container)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); this test runs as a user")
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"mode=0700,{options}".encode()
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, opts) != 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            pytest.skip(
                f"mount -t tmpfs is not permitted here ({os.strerror(err)}): no CAP_SYS_ADMIN"
            )
        raise OSError(err, f"mount -t tmpfs -o {opts.decode()} {target}: {os.strerror(err)}")
    try:
        yield target
    finally:
        if libc.umount2(target.encode(), 0) != 0:
            libc.umount2(target.encode(), 2)  # MNT_DETACH: a file still open there


def fill_space(directory: str) -> str:
    """Write a file in ``directory`` until its filesystem is full (ENOSPC); its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return path


def fill_inodes(directory: str) -> list[str]:
    """Create empty files in ``directory`` until its filesystem has no inode left; their
    paths."""
    made: list[str] = []
    while True:
        p = os.path.join(directory, f"filler{len(made)}")
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return made
        made.append(p)


__all__ = [
    "INFO_TAG",
    "FULL_TAG",
    "VOCAB",
    "SensAIError",
    "address",
    "answer",
    "fill_inodes",
    "fill_space",
    "full_logits",
    "info",
    "make_client",
    "make_server",
    "mounted_tmpfs",
    "serve_process",
    "victim_client",
    "wait_until",
]
