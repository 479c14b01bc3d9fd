"""Random and mutated frames written to a live server over the Unix socket and the named pipes.

A seeded loop (reproducible: the case number is in every failure message) builds frames from
docs/PROTOCOL.md -- valid requests, then bit flips, overwritten fields, truncations, extensions,
wrong kinds, random bytes -- and writes each one on a fresh connection, after the stream
handshake (§13.1) or in its place, followed by a good request (the probe) when the payload
ends on a frame boundary, or by the end of the writer's side when it ends inside a frame. The
server must answer with well-formed frames only (a response when the mutation left a valid
request, otherwise an error frame) or close the connection, and a good client must then be
served correctly: a good client on the other slot after every case, and one on the fuzzed
slot after every tenth.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from sensai import SensAIServer
from sensai.errors import ProtocolError, SensAIError
from sensai.transports import connect, create_transport, format_address

pytestmark = pytest.mark.timeout(120)

SEED = 20260526
CASES = int(os.environ.get("SENSAI_WIRE_FUZZ_CASES", "200"))
IO_TIMEOUT = 20.0  # seconds; generous for a loaded CI machine
MAX_NBYTES = 1 << 16  # the server's payload limit: a hostile header cannot make it allocate more

HEADER = struct.Struct("<4sHBBQIIQIIQQQ")
ENTRY = struct.Struct("<BB6xQQ")
REQUEST, RESPONSE, ERROR, CONTROL = 1, 2, 3, 4
HELLO, HELLO_ACK = 1, 2
ANY_SLOT = 2**64 - 1
DTYPES = {np.dtype(n): c for n, c in [("int8", 2), ("int16", 3), ("int32", 4), ("int64", 5),
                                       ("uint8", 6), ("uint16", 7), ("float32", 12),
                                       ("float64", 13)]}  # fmt: skip
CODES = {**DTYPES, np.dtype("uint64"): 9}  # what encode() writes (uint64: HELLO_ACK's tensor)
# Offsets of the header fields (docs/PROTOCOL.md §3), with their widths.
FIELDS = [(4, 2), (6, 1), (7, 1), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8),
          (48, 8), (56, 8)]  # fmt: skip
INTERESTING = [0, 1, 2, 63, 64, 65, 255, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               MAX_NBYTES, MAX_NBYTES + 1, 2**44, 2**63, 2**64 - 1]  # fmt: skip


def align64(x: int) -> int:
    return (x + 63) & ~63


def encode(
    kind: int,
    arrays: list[np.ndarray],
    *,
    request_id: int = 1,
    slot: int = 0,
    app_tag: int = 0,
    app_value: int = 0,
    flags: int = 0,
) -> bytes:
    """A canonical frame (docs/PROTOCOL.md §2-§8), written from the spec alone."""
    table = b""
    offset = align64(64 + sum(24 + 8 * a.ndim for a in arrays))
    datas = []
    for a in arrays:
        table += ENTRY.pack(CODES[a.dtype], a.ndim, offset, a.nbytes)
        table += struct.pack(f"<{a.ndim}Q", *a.shape)
        datas.append((offset, a.tobytes()))
        offset = align64(offset + a.nbytes)
    total = datas[-1][0] + len(datas[-1][1]) if datas else 64
    head = HEADER.pack(b"SNSA", 1, kind, flags, request_id, slot, len(arrays), total, app_tag, 0,
                       app_value, len(table), 0)  # fmt: skip
    out = bytearray(total)
    out[:64] = head
    out[64 : 64 + len(table)] = table
    for off, data in datas:
        out[off : off + len(data)] = data
    return bytes(out)


@dataclass
class Frame:
    kind: int
    request_id: int
    app_tag: int
    app_value: int
    total_len: int
    body: bytes


def split_frames(data: bytes) -> list[Frame]:
    """The frames a server sent, back to back; fails on anything that is not one."""
    frames = []
    while data:
        assert len(data) >= 64, f"a partial frame header: {data[:64]!r}"
        magic, version, kind, flags, rid, _slot, count, total, tag, r0, value, tlen, r1 = (
            HEADER.unpack_from(data)
        )
        assert magic == b"SNSA" and version == 1 and r0 == 0 and r1 == 0 and flags & ~1 == 0
        assert 64 <= total <= len(data), f"frame of {total} bytes, {len(data)} received"
        assert count <= 8 and tlen <= len(data)
        frames.append(Frame(kind, rid, tag, value, total, data[:total]))
        data = data[total:]
    return frames


def error_text(f: Frame) -> str:
    """The UTF-8 message of an error frame (one 1-D uint8 tensor, §11)."""
    dtype, ndim, offset, nbytes = ENTRY.unpack_from(f.body, 64)
    assert (dtype, ndim) == (6, 1) and offset + nbytes <= f.total_len
    return f.body[offset : offset + nbytes].decode("utf-8")


# --- the cases ----------------------------------------------------------------------------------


def good_request(rng: random.Random, slot: int, request_id: int = 1) -> bytes:
    dtype = rng.choice(list(DTYPES))
    n = rng.choice([0, 1, 3, 64, 1000])
    arrays = [np.arange(n, dtype=dtype) for _ in range(rng.randint(0, 3))]
    return encode(REQUEST, arrays, request_id=request_id, slot=slot, flags=1)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    how = rng.randrange(9)
    if how == 0:  # flip a few bits anywhere
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif how == 1:  # a header field set to an interesting value
        off, width = rng.choice(FIELDS)
        v = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
        b[off : off + width] = v.to_bytes(width, "little")
    elif how == 2 and len(b) > 64:  # a table or payload word set to an interesting value
        off = rng.randrange(64, len(b) - 7) if len(b) > 71 else 64
        v = rng.choice(INTERESTING)
        b[off : off + 8] = v.to_bytes(8, "little")[: len(b) - off]
    elif how == 3:  # truncated
        del b[rng.randrange(len(b)) :]
    elif how == 4:  # extended: bytes after the frame
        b += rng.randbytes(rng.randint(1, 200))
    elif how == 5:  # another kind (a client may only send requests)
        b[6] = rng.choice([0, RESPONSE, ERROR, CONTROL, 5, 255])
    elif how == 6:  # random bytes with a valid magic
        b = bytearray(b"SNSA" + rng.randbytes(rng.randint(0, 200)))
    elif how == 7:  # pure noise
        b = bytearray(rng.randbytes(rng.randint(1, 300)))
    else:  # two frames, the second mutated
        return frame + mutate(rng, frame)
    return bytes(b)


def make_case(rng: random.Random, slot: int) -> tuple[bool, bytes]:
    """(do the handshake first?, the bytes to write)."""
    handshake = rng.random() < 0.8
    frame = good_request(rng, slot)
    if not handshake and rng.random() < 0.5:
        frame = encode(CONTROL, [], request_id=7, app_tag=HELLO, app_value=ANY_SLOT)
    payload = frame if rng.random() < 0.1 else mutate(rng, frame)
    return handshake, payload


# --- raw clients ---------------------------------------------------------------------------------


def _deadline_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise AssertionError("the server did not answer or close within the timeout")
    return left


class RawSocket:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(path)

    def write(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False  # the server already closed the connection: a valid outcome

    def read_frame(self) -> bytes:
        head = self._read_exact(64)
        (total,) = struct.unpack_from("<Q", head, 24)
        return head + self._read_exact(total - 64)

    def _read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the server closed during the handshake"
            out += chunk
        return out

    def recv_some(self) -> bytes:
        """The next bytes from the server; b"" once it closed the connection."""
        try:
            return self.sock.recv(1 << 16)
        except ConnectionResetError:
            return b""
        except TimeoutError:
            raise AssertionError("the server did not answer or close within the timeout") from None

    def finish(self) -> bytes:
        """Close our side and read everything the server sends until it closes."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        try:
            while chunk := self.sock.recv(1 << 16):
                out += chunk
        except ConnectionResetError:
            pass
        self.sock.close()
        return out


class Replaced(Exception):
    """The named-pipe server replaced a slot's FIFOs under a connecting raw client."""


class RawPipe:
    """The named-pipe client side of docs/PROTOCOL.md §13.4, by hand."""

    def __init__(self, directory: str, slot: int) -> None:
        deadline = time.monotonic() + IO_TIMEOUT
        self.resp_path = os.path.join(directory, f"slot{slot}.resp")
        self.lock = os.open(os.path.join(directory, f"slot{slot}.lock"), os.O_RDWR)
        fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        while True:
            # After a bad frame the server replaces the slot's FIFOs; until it listens on the
            # new ones, opening for writing fails with ENXIO.
            try:
                self.resp = os.open(
                    os.path.join(directory, f"slot{slot}.resp"), os.O_RDONLY | os.O_NONBLOCK
                )
                try:
                    self.req = os.open(
                        os.path.join(directory, f"slot{slot}.req"), os.O_WRONLY | os.O_NONBLOCK
                    )
                    break
                except OSError:
                    os.close(self.resp)
                    raise
            except OSError as e:
                if e.errno not in (errno.ENXIO, errno.ENOENT):
                    raise
                _deadline_left(deadline)
                time.sleep(0.005)  # raw test client only: the library waits on inotify

    def write(self, data: bytes) -> bool:
        deadline = time.monotonic() + IO_TIMEOUT
        view = memoryview(data)
        while view:
            _, w, _ = select.select([], [self.req], [], _deadline_left(deadline))
            if not w:
                continue
            try:
                view = view[os.write(self.req, view) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return False
        return True

    def read_frame(self) -> bytes:
        head = self._read_exact(64)
        (total,) = struct.unpack_from("<Q", head, 24)
        return head + self._read_exact(total - 64)

    def _read_exact(self, n: int) -> bytes:
        deadline = time.monotonic() + IO_TIMEOUT
        out = b""
        while len(out) < n:
            r, _, _ = select.select([self.resp], [], [], min(0.05, _deadline_left(deadline)))
            if not r:
                if self.replaced():
                    # The server replaced the FIFOs (ending the previous session) while we
                    # opened them: our HELLO went to the old ones. Start over, as the library
                    # client does.
                    raise Replaced
                continue
            try:
                chunk = os.read(self.resp, n - len(out))
            except BlockingIOError:
                continue
            if not chunk:
                raise Replaced  # the writer of the old FIFO went away
            out += chunk
        return out

    def abandon(self) -> None:
        for fd in (self.req, self.resp, self.lock):
            os.close(fd)

    def replaced(self) -> bool:
        """Whether the server replaced the slot's FIFOs (how it ends a session it never
        opened the response FIFO for: a first frame that was not a valid HELLO)."""
        try:
            return os.stat(self.resp_path).st_ino != os.fstat(self.resp).st_ino
        except FileNotFoundError:
            return True

    def recv_some(self) -> bytes:
        """The next bytes from the server; b"" once it closed the FIFO or replaced it."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            r, _, _ = select.select([self.resp], [], [], min(0.05, _deadline_left(deadline)))
            if not r:
                if self.replaced():
                    return b""
                continue
            try:
                return os.read(self.resp, 1 << 16)
            except BlockingIOError:
                continue

    def finish(self) -> bytes:
        os.close(self.req)
        deadline = time.monotonic() + IO_TIMEOUT
        out = b""
        while True:
            # A FIFO that never had a writer never reports end-of-file: look at the path too.
            r, _, _ = select.select([self.resp], [], [], min(0.05, _deadline_left(deadline)))
            if not r:
                if self.replaced():
                    break
                continue
            try:
                chunk = os.read(self.resp, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            out += chunk
        os.close(self.resp)
        os.close(self.lock)
        return out


# --- the server and the test -------------------------------------------------------------------


def double(x):
    return [t * 2 for t in x] if isinstance(x, list) else x * 2


@pytest.fixture(params=["unix_socket", "named_pipe"])
def live_server(request: pytest.FixtureRequest, short_tmp: str) -> Iterator[tuple[str, str]]:
    kind = request.param
    path = os.path.join(short_tmp, "s.sock" if kind == "unix_socket" else "pipes")
    transport, path = create_transport(kind, path, num_slots=2, max_nbytes=MAX_NBYTES)
    server = SensAIServer(transport)
    t = threading.Thread(target=server.serve_forever, args=(double,), kwargs={"poll_timeout": 0.1})
    t.start()
    try:
        yield kind, path
    finally:
        server.stop()
        t.join(30)
        transport.close()
    assert not t.is_alive()


def check_good_client(kind: str, path: str, i: int, slot: int | None = None) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + i
    with connect(format_address(kind, path), slot, connect_timeout=IO_TIMEOUT) as c:
        got = c.request([x, x.astype(np.int64)], timeout=IO_TIMEOUT)
    assert np.array_equal(got[0], 2 * x) and np.array_equal(got[1], 2 * x.astype(np.int64))


def open_session(kind: str, path: str, handshake: bool) -> RawSocket | RawPipe:
    if kind == "unix_socket":
        raw: RawSocket | RawPipe = RawSocket(path)
    else:
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            raw = RawPipe(path, 0)
            if not handshake:
                break
            try:
                return hello(raw)
            except Replaced:
                raw.abandon()
                _deadline_left(deadline)
    return hello(raw) if handshake else raw


def hello(raw: RawSocket | RawPipe) -> RawSocket | RawPipe:
    assert raw.write(encode(CONTROL, [], request_id=99, app_tag=HELLO, app_value=0))
    ack = split_frames(raw.read_frame())[0]
    assert (ack.kind, ack.app_tag, ack.request_id, ack.app_value) == (CONTROL, HELLO_ACK, 99, 0)
    return raw


PROBE_ID = 1 << 40


def is_complete(payload: bytes) -> bool:
    """Whether no frame the server accepts a header of can be waiting for more bytes."""
    off = 0
    while off < len(payload):
        if len(payload) - off < 64:
            return False
        (total,) = struct.unpack_from("<Q", payload, off + 24)
        if total < 64:
            return True  # a header the server rejects: it answers and closes
        if off + total > len(payload):
            return False
        off += total
    return True


def read_until_answered(raw: RawSocket | RawPipe, request_id: int) -> bytes:
    """What the server sends until it answers ``request_id`` or closes the connection."""
    data = b""
    off = 0
    while True:
        while len(data) - off >= 64:
            (rid,) = struct.unpack_from("<Q", data, off + 8)
            (total,) = struct.unpack_from("<Q", data, off + 24)
            assert total >= 64, f"the server sent a frame of {total} bytes"
            if off + total > len(data):
                break
            if rid == request_id:
                return data
            off += total
        chunk = raw.recv_some()
        if not chunk:
            return data
        data += chunk


def run_case(kind: str, path: str, handshake: bool, payload: bytes) -> list[Frame]:
    """Write ``payload`` in a session of its own; the frames the server sent back, the answer
    to the probe excluded.

    A payload of complete frames is followed by a good request (the probe): the server has
    handled the payload once it answers the probe or closes, and only then do we close our
    side. A payload that ends inside a frame is followed by the end of our side at once,
    which is all the server waits for (it answers the whole requests before, then closes).
    """
    raw = open_session(kind, path, handshake)
    data = b""
    if is_complete(payload):
        probe = encode(REQUEST, [np.arange(3, dtype=np.int32)], request_id=PROBE_ID)
        if raw.write(payload + probe):
            data = read_until_answered(raw, PROBE_ID)
    else:
        raw.write(payload)
    frames = split_frames(data + raw.finish())
    return [f for f in frames if f.request_id != PROBE_ID]


def test_random_and_mutated_frames_get_an_error_or_a_closed_connection(
    live_server: tuple[str, str],
) -> None:
    kind, path = live_server
    rng = random.Random(f"{SEED}-{kind}")
    seen = {"response": 0, "error": 0, "closed silently": 0}
    for i in range(CASES):
        handshake, payload = make_case(rng, 0)
        what = f"case {i} (seed {SEED}, {kind}, handshake={handshake}): {payload[:96].hex()}"
        try:
            frames = run_case(kind, path, handshake, payload)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
        for f in frames:
            if f.kind == CONTROL and not handshake:  # the payload began with a HELLO of its own
                assert f.app_tag == HELLO_ACK, what
                continue
            assert f.kind in (RESPONSE, ERROR), f"{what}: the server sent a frame of kind {f.kind}"
            if f.kind == ERROR:
                assert error_text(f), what
                seen["error"] += 1
            else:
                seen["response"] += 1
        if not frames:
            seen["closed silently"] += 1
        # After every case a good client is served on the fuzzed slot (0), which the server
        # may have just reset (on named pipes by replacing its FIFOs: a client that opened
        # the old ones starts over at once), and on the other slot.
        slots = [0, 1]
        for slot in slots:
            try:
                check_good_client(kind, path, i, slot)
            except (AssertionError, SensAIError) as e:
                raise AssertionError(
                    f"{what}: then a good client on slot {slot}: {type(e).__name__}: {e}"
                ) from None
    print(kind, seen)
    # The mix reached both outcomes (the cases are seeded, so this is not a matter of luck).
    assert seen["error"] > CASES // 4 and seen["response"] > 0, seen


@pytest.mark.parametrize("kind", ["unix_socket", "named_pipe"])
def test_golden_request_is_answered_over_the_raw_protocol(kind: str, short_tmp: str) -> None:
    """The raw clients above speak the protocol: a valid request gets its doubled answer."""
    path = os.path.join(short_tmp, "s.sock" if kind == "unix_socket" else "pipes")
    transport, path = create_transport(kind, path, num_slots=1, max_nbytes=MAX_NBYTES)
    server = SensAIServer(transport)
    t = threading.Thread(target=server.serve_forever, args=(double,), kwargs={"poll_timeout": 0.1})
    t.start()
    try:
        x = np.arange(5, dtype=np.int32)
        frames = run_case(kind, path, True, encode(REQUEST, [x], request_id=1, flags=1))
        assert [f.kind for f in frames] == [RESPONSE]
        f = frames[0]
        assert f.request_id == 1
        dtype, ndim, offset, nbytes = ENTRY.unpack_from(f.body, 64)
        assert (dtype, ndim) == (DTYPES[x.dtype], 1)
        assert np.array_equal(np.frombuffer(f.body[offset : offset + nbytes], np.int32), 2 * x)
    finally:
        server.stop()
        t.join(30)
        transport.close()


@pytest.mark.parametrize("ack_id", ["nonce", "other"])
def test_unix_socket_client_takes_only_the_acknowledgement_of_its_own_hello(
    ack_id: str, short_tmp: str
) -> None:
    """A fake server (a raw socket speaking §13.1) acknowledges the client's HELLO with the
    HELLO's nonce, or with another request id: the client connects on the first, and refuses
    the second with a ProtocolError naming both ids."""
    path = os.path.join(short_tmp, "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(IO_TIMEOUT)
    seen: dict[str, int] = {}

    def fake_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(IO_TIMEOUT)
            head = conn.recv(64, socket.MSG_WAITALL)
            hello = split_frames(head)[0]
            assert (hello.kind, hello.app_tag, hello.app_value) == (CONTROL, HELLO, ANY_SLOT)
            seen["nonce"] = hello.request_id
            rid = hello.request_id if ack_id == "nonce" else hello.request_id ^ (1 << 63)
            seen["sent"] = rid
            params = np.array([1, 8, 8, MAX_NBYTES, os.getpid()], dtype=np.uint64)
            conn.sendall(encode(CONTROL, [params], request_id=rid, app_tag=HELLO_ACK))
            conn.recv(1)  # hold the connection until the client closes it

    t = threading.Thread(target=fake_server)
    t.start()
    try:
        if ack_id == "nonce":
            with connect(format_address("unix_socket", path), connect_timeout=IO_TIMEOUT) as c:
                assert c.slot_id == 0
        else:
            with pytest.raises(ProtocolError) as e:
                connect(format_address("unix_socket", path), connect_timeout=IO_TIMEOUT)
            text = str(e.value)
            assert f"request id {seen['sent']}, not for our HELLO" in text, text
            assert f"expected request id {seen['nonce']}" in text, text
    finally:
        t.join(IO_TIMEOUT)
        listener.close()
    assert not t.is_alive()
