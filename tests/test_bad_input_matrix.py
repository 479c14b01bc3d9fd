"""The bad-input matrix: one row per bad input, each asserting the error text and that the
server still answers the next good request.

* Teacher rows go through the real `TeacherService` over the tiny model, on every transport.
* Frame rows write bytes straight to a live server: after the handshake (docs/PROTOCOL.md
  §13) on the Unix socket and the named pipes, and into a leased slot's request ring on
  shared memory (``shm_raw``: the buffer is published as a client's send does), on every
  transport.
* Connection rows: slots, paths and files that are not what a client or server expects.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from sensai import _core
from sensai.errors import (
    AddressInUseError,
    CapacityError,
    PeerGoneError,
    ProtocolError,
    RemoteError,
)
from sensai.serving.batching import TeacherService
from sensai.transports import connect, create_transport, format_address, parse_address
from shm_raw import ShmFile
from transport_helpers import KINDS, ServerThread, answer_with, double, make_client, make_server

pytestmark = pytest.mark.timeout(60)

CODES = _core.ERROR_CODES
MAX_NBYTES = 4096  # small, so that capacity rows are cheap
HEADER = struct.Struct("<4sHBBQIIQIIQQQ")
ENTRY = struct.Struct("<BB6xQQ")
ANY_SLOT = (1 << 64) - 1
IO_TIMEOUT = 10.0


# --- frames, from docs/PROTOCOL.md -------------------------------------------------------------


def align64(x: int) -> int:
    return (x + 63) & ~63


def encode(kind: int, arrays: list[np.ndarray], *, request_id: int = 1, slot: int = 0,
           tag: int = 0, value: int = 0) -> bytearray:  # fmt: skip
    """A canonical frame (§2-§8)."""
    codes = {np.dtype(np.uint8): 6, np.dtype(np.int64): 5, np.dtype(np.float32): 12,
             np.dtype(np.uint64): 9}  # fmt: skip
    table = b""
    offset = align64(64 + sum(24 + 8 * a.ndim for a in arrays))
    datas = []
    for a in arrays:
        table += ENTRY.pack(codes[a.dtype], a.ndim, offset, a.nbytes)
        table += struct.pack(f"<{a.ndim}Q", *a.shape)
        datas.append((offset, a.tobytes()))
        offset = align64(offset + a.nbytes)
    total = datas[-1][0] + len(datas[-1][1]) if datas else 64
    out = bytearray(total)
    out[:64] = HEADER.pack(b"SNSA", 1, kind, 0, request_id, slot, len(arrays), total, tag, 0,
                           value, len(table), 0)  # fmt: skip
    out[64 : 64 + len(table)] = table
    for off, data in datas:
        out[off : off + len(data)] = data
    return out


def good_request(slot: int) -> bytearray:
    return encode(1, [np.arange(12, dtype=np.float32).reshape(3, 4)], slot=slot)


def put(buf: bytearray, fmt: str, offset: int, value: int) -> bytearray:
    struct.pack_into(fmt, buf, offset, value)
    return buf


def error_of(frame: bytes) -> tuple[int, str]:
    """(code, message) of an error frame (§11)."""
    _, _, kind, _, _, _, _, _, tag, _, _, _, _ = HEADER.unpack_from(frame)
    assert kind == 3, f"expected an error frame, got kind {kind}"
    _, _, offset, nbytes = ENTRY.unpack_from(frame, 64)
    return tag, bytes(frame[offset : offset + nbytes]).decode("utf-8")


def split(data: bytes) -> list[bytes]:
    frames = []
    while data:
        assert len(data) >= 64, f"a partial frame: {data!r}"
        (total,) = struct.unpack_from("<Q", data, 24)
        frames.append(data[:total])
        data = data[total:]
    return frames


# --- raw sessions: the client side of §13, by hand ----------------------------------------------


class RawSession:
    """A handshaken raw session with a Unix-socket or named-pipe server."""

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        if kind == "unix_socket":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(IO_TIMEOUT)
            self.sock.connect(path)
            self.sock.sendall(encode(4, [], request_id=77, tag=1, value=ANY_SLOT))
            ack = self.read_frame()
        else:
            deadline = time.monotonic() + IO_TIMEOUT
            while True:
                slot = self._open_pipe(path)
                got = self._pipe_ack(os.path.join(path, f"slot{slot}.resp"), deadline)
                if got is not None:
                    ack = got
                    break
                # We opened a slot's FIFOs just before the server replaced them (how it ends
                # a session that sent a bad frame): start over, as the library client does.
                self.close()
        kind_, tag, rid = ack[6], struct.unpack_from("<I", ack, 32)[0], ack[8]
        assert (kind_, tag, rid) == (4, 2, 77), "no HELLO_ACK"
        self.slot = struct.unpack_from("<I", ack, 16)[0]

    def _open_pipe(self, path: str) -> int:
        for i in range(64):
            fd = os.open(os.path.join(path, f"slot{i}.lock"), os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                os.close(fd)
        self.lock = fd
        deadline = time.monotonic() + IO_TIMEOUT
        while True:  # ENOENT/ENXIO while the server re-makes the FIFOs and listens again
            resp = -1
            try:
                resp = os.open(os.path.join(path, f"slot{i}.resp"), os.O_RDONLY | os.O_NONBLOCK)
                self.req = os.open(os.path.join(path, f"slot{i}.req"), os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if resp >= 0:
                    os.close(resp)
                if e.errno not in (errno.ENXIO, errno.ENOENT) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # raw test client only: the library waits on inotify
        self.resp = resp
        self.write(encode(4, [], request_id=77, slot=i, tag=1, value=i))
        return i

    def _pipe_ack(self, resp_path: str, deadline: float) -> bytes | None:
        """The HELLO_ACK, or None if the server hung up or replaced the FIFO. (Until the
        server opens its end, a read sees end-of-file and poll reports nothing: that is
        "not yet"; only a hang-up means it left.)"""
        poller = select.poll()
        poller.register(self.resp, select.POLLIN)
        out = b""
        while time.monotonic() < deadline:
            events = poller.poll(50)
            if not events:
                try:
                    if os.stat(resp_path).st_ino != os.fstat(self.resp).st_ino:
                        return None
                except FileNotFoundError:
                    return None
                continue
            chunk = b""
            if events[0][1] & select.POLLIN:
                try:
                    chunk = os.read(self.resp, 1 << 16)
                except BlockingIOError:
                    continue
            if not chunk:
                return None  # hung up
            out += chunk
            if len(out) >= 64 and len(out) >= struct.unpack_from("<Q", out, 24)[0]:
                return out
        raise AssertionError("no HELLO_ACK")

    def write(self, data: bytes) -> None:
        if self.kind == "unix_socket":
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed first: what it said is still readable
            return
        view = memoryview(bytes(data))
        deadline = time.monotonic() + IO_TIMEOUT
        while view:
            select.select([], [self.req], [], 0.1)
            try:
                view = view[os.write(self.req, view) :]
            except BlockingIOError:
                assert time.monotonic() < deadline, "the server stopped reading"
            except BrokenPipeError:
                return

    def _read(self, n: int) -> bytes:
        if self.kind == "unix_socket":
            try:
                return self.sock.recv(n)
            except ConnectionResetError:
                return b""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            select.select([self.resp], [], [], 0.1)
            try:
                return os.read(self.resp, n)
            except BlockingIOError:
                assert time.monotonic() < deadline, "the server neither answered nor closed"

    def read_frame(self) -> bytes:
        out = b""
        while len(out) < 64 or len(out) < struct.unpack_from("<Q", out, 24)[0]:
            need = 64 - len(out) if len(out) < 64 else struct.unpack_from("<Q", out, 24)[0]
            chunk = self._read(max(need - len(out), 1) if len(out) >= 64 else need)
            assert chunk, "the server closed mid-frame"
            out += chunk
        return out

    def finish(self, shutdown: bool = False) -> bytes:
        """Everything the server sends until it closes the session."""
        if shutdown:
            if self.kind == "unix_socket":
                self.sock.shutdown(socket.SHUT_WR)
            else:
                os.close(self.req)
        out = b""
        while chunk := self._read(1 << 16):
            out += chunk
        self.close(req=not shutdown)
        return out

    def close(self, req: bool = True) -> None:
        if self.kind == "unix_socket":
            self.sock.close()
        else:
            for fd in ([self.req] if req else []) + [self.resp, self.lock]:
                os.close(fd)


def raw_request_error(kind: str, path: str, make: Callable[[int], bytes]) -> tuple[int, str, int]:
    """Write the bytes ``make(slot)`` to a live server as a request on a slot of our own,
    and return ``(code, message, slot)`` of the error frame that answers it.

    Stream transports: in a raw session after the handshake; the server answers with one
    error frame not attributed to a request (request id 0) and ends the session. Shared
    memory: into the slot's request ring, the slot leased by a real client, which then
    reads the server's answer from the response ring (and is closed: it did not count the
    request it did not send)."""
    if kind == "shared_memory":
        c = make_client(kind, path, None, connect_timeout=10)
        try:
            with ShmFile(path) as f:
                f.publish_raw(c.slot_id, bytes(make(c.slot_id)))
            with pytest.raises(RemoteError) as ei:
                c._core.recv(timeout=IO_TIMEOUT)  # the raw answer: no request is counted
            return ei.value.code, ei.value.message, c.slot_id
        finally:
            c.close()
    raw = RawSession(kind, path)
    raw.write(make(raw.slot))
    frames = split(raw.finish())  # the server answers, then ends the session
    assert len(frames) == 1, frames
    assert struct.unpack_from("<Q", frames[0], 8)[0] == 0  # not attributed to a request
    return *error_of(frames[0]), raw.slot


# --- the rows -------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    kinds: tuple[str, ...]
    run: Callable[..., None]


TEACHER_ROWS: list[tuple[str, list[np.ndarray], str]] = [
    ("float token ids", [np.zeros((1, 5), np.float32)], "input_ids must be integer token ids"),
    ("negative ids", [np.array([[3, -1, 4]])], "negative token id -1"),
    ("ids >= vocab size", [np.array([[3, 320, 4]])], "beyond the vocabulary"),
    ("3-D input", [np.ones((1, 2, 3), np.int64)], "must be 1-D [S] or 2-D [B, S], got 3-D"),
    ("empty input", [np.ones((1, 0), np.int64)], "input_ids is empty"),
    (
        "mask of another shape",
        [np.ones((1, 5), np.int64), np.ones((1, 4), np.int64)],
        "attention_mask has shape (1, 4), but input_ids has shape (1, 5)",
    ),  # fmt: skip
    (
        "longer than the context",
        [np.ones((1, 65), np.int64)],
        "sequence length 65 exceeds the model's context of 64",
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: str) -> Any:
    from sensai.teacher import TeacherLogitsServer

    return TeacherLogitsServer(tiny_model_dir, device="cpu", num_samples=16)


@pytest.fixture(scope="module", params=KINDS)
def service(request: pytest.FixtureRequest, teacher: Any) -> Iterator[str]:
    """A `TeacherService` in a thread on ``request.param``; yields the address."""
    d = f"/tmp/sai-matrix-{os.getpid()}-{request.param}"
    os.makedirs(d, exist_ok=True)
    transport, path = create_transport(
        request.param, os.path.join(d, "ep"), num_slots=4, max_nbytes=MAX_NBYTES, max_tensors=8
    )
    svc = TeacherService(teacher, transport, poll_timeout=0.05)
    t = threading.Thread(target=svc.serve_forever, daemon=True)
    t.start()
    yield format_address(request.param, path)
    svc.stop()
    t.join(10)
    transport.close()
    shutil.rmtree(d, ignore_errors=True)


def answered(c: Any) -> None:
    """A good request on ``c`` is answered. (In a function of its own: a test frame that
    caught an exception is kept alive by it, and a message kept alive in it would hold a
    shared-memory response buffer until the garbage collector runs.)"""
    msg = c.request_message([np.array([[5, 6, 7, 8, 9]])], timeout=30)
    assert msg.kind == "response"
    assert tuple(msg.arrays()[0].shape) == (1, 4, 16)


def assert_teacher_answers(address: str) -> None:
    with connect(address, connect_timeout=10) as c:
        answered(c)


@pytest.mark.parametrize(
    "tensors, text", [r[1:] for r in TEACHER_ROWS], ids=[r[0] for r in TEACHER_ROWS]
)
def test_teacher_input(service: str, tensors: list[np.ndarray], text: str) -> None:
    with connect(service, connect_timeout=10) as c:
        with pytest.raises(RemoteError) as ei:
            c.request_message(tensors, timeout=30)
        assert ei.value.code == CODES["BAD_REQUEST"]
        assert text in ei.value.message, ei.value.message
        answered(c)  # the same connection goes on
    assert_teacher_answers(service)


def test_request_over_the_slots_capacity(service: str) -> None:
    with connect(service, connect_timeout=10) as c:
        with pytest.raises(CapacityError) as ei:
            c.request_message([np.ones((1, MAX_NBYTES), np.int64)], timeout=30)
        assert "32768 bytes of tensor data, the limit (max_nbytes) is 4096" in str(ei.value)
        answered(c)
    assert_teacher_answers(service)


# A request over the limit that reaches the server (the client above refuses it before
# sending): its payload is over max_nbytes, or its header claims more than any frame may be.
RAW_OVERSIZED: list[tuple[str, Callable[[int], bytes], str]] = [
    (
        "payload over the limit",
        lambda s: encode(1, [np.arange(513, dtype=np.int64)[None] % 300], slot=s),
        "payload bytes is 4104, over the limit of 4096",
    ),  # fmt: skip
    (
        "header claims 1 TiB",
        lambda s: put(encode(1, [np.ones((1, 5), np.int64)], slot=s), "<Q", 24, 1 << 40),
        "total_len is 1099511627776, over the limit of 5376",
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "make, text", [r[1:] for r in RAW_OVERSIZED], ids=[r[0] for r in RAW_OVERSIZED]
)
def test_raw_request_over_the_slots_capacity(
    service: str, make: Callable[[int], bytes], text: str
) -> None:
    kind, path = parse_address(service)
    code, message, _ = raw_request_error(kind, path, make)
    assert code == CODES["PROTOCOL"] and text in message, (code, message)
    assert_teacher_answers(service)


def test_response_over_the_slots_capacity(service: str) -> None:
    # 40 tokens fit (320 bytes) but their answer, 39 positions x 16 samples x 12 bytes, not
    with connect(service, connect_timeout=10) as c:
        with pytest.raises(RemoteError) as ei:
            c.request_message([np.arange(3, 43, dtype=np.int64)[None]], timeout=30)
        assert ei.value.code == CODES["CAPACITY"]
        assert "the response does not fit the transport" in ei.value.message
        assert "7839 bytes of tensor data, the limit (max_nbytes) is 4096" in ei.value.message
        answered(c)
    assert_teacher_answers(service)


# --- frame rows -----------------------------------------------------------------------------------


def _ndim9(slot: int) -> bytearray:
    # a second, 0-d tensor keeps table_len within its bound, so the ndim check is reached
    return encode(1, [np.zeros((1,) * 9, np.float32), np.zeros((), np.float32)], slot=slot)


def _two_tensors(slot: int) -> bytearray:
    return encode(1, [np.zeros(2, np.float32)] * 9, slot=slot)


# (id, make the bad bytes from the session's slot, expected text of the error frame)
FRAME_ROWS: list[tuple[str, Callable[[int], bytes], str]] = [
    ("wrong magic", lambda s: b"XXXX" + bytes(good_request(s)[4:]), "bad magic"),
    (
        "unknown protocol version",
        lambda s: put(good_request(s), "<H", 4, 2),
        "unsupported protocol version 2 (this build speaks version 1)",
    ),  # fmt: skip
    (
        "unknown dtype code",
        lambda s: put(good_request(s), "<B", 64, 99),
        "tensor 0: unknown dtype code 99",
    ),  # fmt: skip
    (
        "shape/length mismatch",
        lambda s: put(good_request(s), "<Q", 64 + 16, 40),
        "tensor 0: nbytes is 40 but shape [3, 4] of float32 needs 48",
    ),  # fmt: skip
    ("truncated frame", lambda s: put(good_request(s), "<Q", 24, 64), "truncated frame"),
    ("tensor count over the limit", _two_tensors, "tensor_count is 9, over the limit of 8"),
    ("ndim over the limit", _ndim9, "ndim is 9, over the limit of 8"),
    (
        "request over the slot's capacity (header)",
        lambda s: put(good_request(s), "<Q", 24, 1 << 40),
        "total_len is 1099511627776, over the limit",
    ),  # fmt: skip
]

STREAM_KINDS = ["unix_socket", "named_pipe"]


def _doubling_server(kind: str, short_tmp: str) -> Iterator[tuple[str, str]]:
    path = os.path.join(short_tmp, "ep")
    # Explicit limits: the rows name them ("over the limit of 8"), whatever the defaults are.
    server = make_server(kind, path, 2, max_nbytes=1 << 20, max_tensors=8, max_dims=8)
    with ServerThread(server, answer_with(double)):
        yield kind, path
    server.close()


@pytest.fixture(params=KINDS)
def doubling(request: pytest.FixtureRequest, short_tmp: str) -> Iterator[tuple[str, str]]:
    yield from _doubling_server(request.param, short_tmp)


@pytest.fixture(params=STREAM_KINDS)
def doubling_stream(request: pytest.FixtureRequest, short_tmp: str) -> Iterator[tuple[str, str]]:
    yield from _doubling_server(request.param, short_tmp)


def assert_doubling_answers(kind: str, path: str, slot: int | None = None) -> None:
    with make_client(kind, path, slot, connect_timeout=10) as c:
        x = np.arange(10, dtype=np.float32)
        np.testing.assert_array_equal(c.request(x, timeout=10), 2 * x)


@pytest.mark.parametrize("make, text", [r[1:] for r in FRAME_ROWS], ids=[r[0] for r in FRAME_ROWS])
def test_bad_frame(doubling: tuple[str, str], make: Callable[[int], bytes], text: str) -> None:
    kind, path = doubling
    code, message, slot = raw_request_error(kind, path, make)
    assert code == CODES["PROTOCOL"] and text in message, (code, message)
    assert_doubling_answers(kind, path, slot)  # the same slot serves the next client
    assert_doubling_answers(kind, path)


def test_frame_cut_short_by_the_client(doubling_stream: tuple[str, str]) -> None:
    """Half a frame, then the client hangs up: the server drops it silently."""
    kind, path = doubling_stream
    raw = RawSession(kind, path)
    raw.write(good_request(raw.slot)[:100])
    assert raw.finish(shutdown=True) == b""
    assert_doubling_answers(kind, path)


def frames_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(kind, request_id, frame)`` of each whole frame in ``data``."""
    out = []
    off = 0
    while off < len(data):
        (total,) = struct.unpack_from("<Q", data, off + 24)
        assert off + total <= len(data), f"a frame cut short at byte {off}"
        frame = data[off : off + total]
        out.append((frame[6], struct.unpack_from("<Q", frame, 8)[0], frame))
        off += total
    return out


def float32_tensor(frame: bytes) -> np.ndarray:
    _, _, offset, nbytes = ENTRY.unpack_from(frame, 64)
    return np.frombuffer(frame[offset : offset + nbytes], np.float32)


@pytest.mark.parametrize("n", [12, 200_000], ids=["small", "over the socket buffer"])
def test_requests_sent_before_a_half_close_are_answered(
    doubling_stream: tuple[str, str], n: int
) -> None:
    """A client that sends requests, then shuts down its sending side (end of file on the
    server's side) while it still reads, gets every answer in order; then the server ends the
    session. A frame cut short by the end of file is dropped."""
    kind, path = doubling_stream
    raw = RawSession(kind, path)
    xs = [np.arange(n, dtype=np.float32) + 1000 * i for i in range(3)]
    sent = b"".join(encode(1, [x], request_id=i + 1, slot=raw.slot) for i, x in enumerate(xs))
    raw.write(sent + good_request(raw.slot)[:100])
    got = frames_of(raw.finish(shutdown=True))
    assert [(k, rid) for k, rid, _ in got] == [(2, 1), (2, 2), (2, 3)], [f[:2] for f in got]
    for x, (_, _, frame) in zip(xs, got, strict=True):
        np.testing.assert_array_equal(float32_tensor(frame), 2 * x)
    assert_doubling_answers(kind, path, raw.slot)  # the slot is free again


def test_answers_still_queued_at_a_half_close_are_delivered_whole(
    stream_kind: str, short_tmp: str
) -> None:
    """The server has answered every request, but the answers are still queued (the client
    has read nothing yet) when it reads the client's end of file: the session lasts until the
    queue is sent, and the client then reads every answer whole. (It used to end the session
    at once because no request was unanswered, cutting the queued bytes short.)"""
    kind = stream_kind
    path = os.path.join(short_tmp, "ep")
    n = 400_000  # 1.6 MB an answer: three of them are far over any socket or pipe buffer
    server = make_server(kind, path, 1, max_nbytes=4 << 20)
    try:
        xs = [np.arange(n, dtype=np.float32) + 1000 * i for i in range(3)]
        session: list[RawSession] = []
        errors: list[BaseException] = []

        def client_sends() -> None:
            try:
                raw = RawSession(kind, path)
                session.append(raw)
                frames = [encode(1, [x], request_id=i + 1, slot=raw.slot) for i, x in enumerate(xs)]
                raw.write(b"".join(frames))
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        writer = threading.Thread(target=client_sends, daemon=True)
        writer.start()
        got = []
        deadline = time.monotonic() + IO_TIMEOUT
        while len(got) < len(xs):  # this thread is the server until every request is in
            assert time.monotonic() < deadline, "the requests did not arrive"
            for slot in server.wait_any(timeout=IO_TIMEOUT):
                if (x := server.read_tensor_slot(slot)) is not None:
                    got.append(x.copy())
                    server.write_tensor_slot(slot, 2 * x)  # queued: nobody reads yet
        writer.join(IO_TIMEOUT)
        assert not errors, errors
        (raw,) = session
        # Every request is answered, the answers are queued, and only now the client ends its
        # side: the server reads that end of file with its answers still queued.
        if kind == "unix_socket":
            raw.sock.shutdown(socket.SHUT_WR)
        else:
            os.close(raw.req)
        assert server.wait_any(timeout=0) == []
        assert server.is_connected(raw.slot), "the session ended with its answers still queued"
        data = b""
        with ServerThread(server, answer_with(double)):
            while chunk := raw._read(1 << 16):  # until the server ends the session
                data += chunk
        raw.close(req=False)
        for x, y in zip(xs, got, strict=True):
            np.testing.assert_array_equal(x, y)
        frames = frames_of(data)
        assert [(k, rid) for k, rid, _ in frames] == [(2, 1), (2, 2), (2, 3)]
        for x, (_, _, frame) in zip(xs, frames, strict=True):
            np.testing.assert_array_equal(float32_tensor(frame), 2 * x)
    finally:
        server.close()


@pytest.mark.parametrize("half_close_first", [False, True])
def test_answer_to_a_client_gone_for_good_is_peer_gone(
    stream_kind: str, short_tmp: str, half_close_first: bool
) -> None:
    """An answer to a client that closed its connection (after a half close or not) fails at
    once with PeerGoneError, and the slot is free for the next client."""
    kind = stream_kind
    path = os.path.join(short_tmp, "ep")
    server = make_server(kind, path, 1, max_nbytes=1 << 20)
    try:
        ready: list[int] = []
        waiter = threading.Thread(target=lambda: ready.extend(server.wait_any(timeout=20)))
        waiter.start()
        raw = RawSession(kind, path)
        raw.write(good_request(raw.slot))
        waiter.join(20)
        assert ready == [raw.slot]
        x = server.read_tensor_slot(raw.slot)
        if half_close_first:
            if kind == "unix_socket":
                raw.sock.shutdown(socket.SHUT_WR)
            else:
                os.close(raw.req)
            assert server.wait_any(timeout=0) == []  # the server reads the end of file
            assert server.is_connected(raw.slot)  # ... and still owes the answer
        raw.close(req=not half_close_first)
        with pytest.raises(PeerGoneError):
            server.write_tensor_slot(raw.slot, 2 * x)
        assert not server.is_connected(raw.slot)
    finally:
        server.close()


@pytest.fixture(params=STREAM_KINDS)
def stream_kind(request: pytest.FixtureRequest) -> str:
    return request.param


# --- connection rows ------------------------------------------------------------------------------


@pytest.fixture(params=KINDS)
def live(request: pytest.FixtureRequest, short_tmp: str) -> Iterator[tuple[str, str]]:
    kind = request.param
    path = os.path.join(short_tmp, "ep")
    server = make_server(kind, path, 2, max_nbytes=1 << 20)
    with ServerThread(server, answer_with(double)):
        yield kind, path
    server.close()


def test_slot_id_out_of_range(live: tuple[str, str]) -> None:
    kind, path = live
    with pytest.raises(ValueError) as ei:
        make_client(kind, path, 2, connect_timeout=5)
    assert "slot 2 is out of range" in str(ei.value), str(ei.value)
    assert str(ei.value).endswith("it has 2 slots, ids 0 to 1"), str(ei.value)
    assert_doubling_answers(kind, path)


def test_second_server_on_a_live_path(live: tuple[str, str]) -> None:
    kind, path = live
    with pytest.raises(AddressInUseError) as ei:
        make_server(kind, path, 1)
    assert "another server is running there" in str(ei.value)
    assert_doubling_answers(kind, path)


def _fake_server_of_version(path: str, version: int) -> threading.Thread:
    """A Unix socket that answers a HELLO with a HELLO_ACK of another protocol version."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(IO_TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                hello = conn.recv(64)
                rid = struct.unpack_from("<Q", hello, 8)[0]
                limits = np.array([2, 8, 8, 1 << 20, os.getpid()], np.uint64)
                ack = encode(4, [limits], request_id=rid, tag=2)
                conn.sendall(put(ack, "<H", 4, version))
                conn.recv(1)  # until the client hangs up
        except OSError:
            pass
        finally:
            listener.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _fake_pipe_server_of_version(path: str, version: int) -> threading.Thread:
    """A pipe directory (docs/PROTOCOL.md §13.4: 0700, FIFOs and lock files 0600, our pid
    in server.lock) whose one slot answers a HELLO with a HELLO_ACK of another protocol
    version."""
    os.mkdir(path, 0o700)

    def make(name: str, fifo: bool = False) -> str:
        p = os.path.join(path, name)
        if fifo:
            os.mkfifo(p, 0o600)
        else:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.chmod(p, 0o600)  # whatever the umask
        return p

    with open(make("server.lock"), "w") as f:
        f.write(f"{os.getpid()}\n")
    make("slot0.lock")
    req, resp = make("slot0.req", fifo=True), make("slot0.resp", fifo=True)
    # Held open for reading from the start, as the server does: a client's non-blocking
    # open for writing fails with ENXIO without a reader.
    rfd = os.open(req, os.O_RDONLY | os.O_NONBLOCK)

    def read_some(deadline: float) -> bytes | None:
        """Bytes from the client; b"" once it hung up; None at the deadline."""
        while time.monotonic() < deadline:
            if select.select([rfd], [], [], 0.05)[0]:
                try:
                    return os.read(rfd, 1 << 16)
                except BlockingIOError:
                    pass
        return None

    def serve() -> None:
        deadline = time.monotonic() + IO_TIMEOUT
        wfd = -1
        try:
            hello = b""
            while len(hello) < 64:
                chunk = read_some(deadline)
                if not chunk:
                    return
                hello += chunk
            rid = struct.unpack_from("<Q", hello, 8)[0]
            limits = np.array([1, 8, 8, 1 << 20, os.getpid()], np.uint64)
            ack = put(encode(4, [limits], request_id=rid, tag=2), "<H", 4, version)
            wfd = os.open(resp, os.O_WRONLY | os.O_NONBLOCK)  # the client reads it already
            os.write(wfd, ack)
            while read_some(deadline):  # until the client hangs up
                pass
        finally:
            if wfd >= 0:
                os.close(wfd)
            os.close(rfd)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_client_attaching_to_another_protocol_version(live: tuple[str, str]) -> None:
    kind, path = live
    other = path + "-v2"
    if kind == "shared_memory":
        with open(path, "rb") as f:  # a live server's file, version patched
            data = bytearray(f.read())
        struct.pack_into("<I", data, 8, 99)
        with open(other, "wb") as f:
            f.write(data)
        text = "layout version 99"
    else:
        fake = _fake_server_of_version if kind == "unix_socket" else _fake_pipe_server_of_version
        fake_thread = fake(other, 2)
        text = "unsupported protocol version 2 (this build speaks version 1)"
    with pytest.raises(ProtocolError) as ei:
        make_client(kind, other, None, connect_timeout=5)
    assert text in str(ei.value), str(ei.value)
    if kind != "shared_memory":
        fake_thread.join(IO_TIMEOUT)  # it saw the client hang up
        assert not fake_thread.is_alive()
    assert_doubling_answers(kind, path)
