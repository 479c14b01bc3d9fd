"""Raw bytes into a shared-memory server's request ring, from Python.

The shared-memory transport has no byte stream a test could write a bad frame into: its
frames sit in ring buffers of one mapped file. ``publish_raw`` does by hand what a client's
send does (rust/src/transport/shm.rs, "Layout", and rust/src/sync.rs): take a free request
buffer of a slot the caller holds (leased by a real client, which then reads the answer),
copy the bytes into it, queue its index, advance the ring's head and ring the server's
doorbell. The server decodes the buffer exactly as any request, so whatever it does with a
bad frame is what a test sees.

The layout is native-endian (little-endian on every machine this runs on); word stores from
Python are plain, aligned stores, and the head is written last (x86 keeps store order; the
server also polls, so a doorbell it missed only costs its wait slice).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct

MAGIC = b"SNSAshm\0"
LAYOUT_VERSION = 2
# magic | version u32 | num_slots u32 | ring depth u32 | max_tensors u32 | max_dims u32
# | server pid u32 | capacity u64 | max_payload_bytes u64 | slot stride u64 | file length u64
HEADER = struct.Struct("<8s6I4Q")
DOORBELL = 128  # event: seq u32, sleepers u32
HEADER_REGION = 4096
# offsets in a slot
LEASE = 0  # u32: the client's pid, 0 = free
REQ_HEAD, REQ_TAIL = 64, 128
RESP_HEAD, RESP_TAIL = 192, 256
REQ_QUEUE, REQ_STATES = 512, 768  # 64 buffer indices u32 | 64 buffer states u64
CTRL_LEN = 2048  # then K request buffers, then K response buffers, `capacity` bytes each
FREE, BUSY = 0, 1

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAKE = 1


class ShmFile:
    """The mapped file of a live shared-memory server at ``path``."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            self.map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        (magic, version, self.num_slots, self.depth, _, _, self.server_pid, self.capacity, _,
         self.stride, file_len) = HEADER.unpack_from(self.map, 0)  # fmt: skip
        assert magic == MAGIC and version == LAYOUT_VERSION, (magic, version)
        assert file_len == len(self.map)

    def _u32(self, off: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<I", self.map, off, value)
        return struct.unpack_from("<I", self.map, off)[0]

    def _u64(self, off: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<Q", self.map, off, value)
        return struct.unpack_from("<Q", self.map, off)[0]

    def slot_u64(self, slot: int, field: int, value: int | None = None) -> int:
        """Word ``field`` (an offset above) of ``slot``, after writing ``value`` if given."""
        assert 0 <= slot < self.num_slots, slot
        return self._u64(HEADER_REGION + slot * self.stride + field, value)

    def publish_raw(self, slot: int, data: bytes) -> int:
        """Put ``data`` in a free request buffer of ``slot`` and publish it; the buffer's index.

        The caller holds ``slot`` through a client that sends nothing meanwhile (its own
        count of requests sent is then one behind the ring: close it afterwards)."""
        assert 0 <= slot < self.num_slots and len(data) <= self.capacity, (slot, len(data))
        base = HEADER_REGION + slot * self.stride
        head, tail = self._u64(base + REQ_HEAD), self._u64(base + REQ_TAIL)
        assert tail <= head < tail + self.depth, f"no room in the request ring ({tail}, {head})"
        free = [b for b in range(self.depth) if self._u64(base + REQ_STATES + 8 * b) == FREE]
        assert free, "every request buffer is busy or held"
        b = free[0]
        self._u64(base + REQ_STATES + 8 * b, BUSY)
        at = base + CTRL_LEN + b * self.capacity
        self.map[at : at + len(data)] = data
        self._u32(base + REQ_QUEUE + 4 * (head % self.depth), b)
        self._u64(base + REQ_HEAD, head + 1)  # publish: last
        self.ring()
        return b

    def ring(self) -> None:
        """Bump the doorbell's sequence and wake the server if it sleeps on it."""
        self._u32(DOORBELL, (self._u32(DOORBELL) + 1) & 0xFFFF_FFFF)
        if _SYS_FUTEX is None:
            return  # the server finds the request when its wait slice ends
        word = ctypes.c_uint32.from_buffer(self.map, DOORBELL)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(_SYS_FUTEX, ctypes.byref(word), _FUTEX_WAKE, 0x7FFF_FFFF, None, None, 0)
        finally:
            del word  # release the export, so that the map can be closed

    def close(self) -> None:
        self.map.close()

    def __enter__(self) -> ShmFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
