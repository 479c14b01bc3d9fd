"""Type stubs for the Rust extension module ``sensai._core``."""

from collections.abc import Sequence

import numpy as np

PROTOCOL_VERSION: int
__version__: str
ERROR_CODES: dict[str, int]

def dtype_names() -> list[str]:
    """The wire dtype names, in dtype-code order."""

def shm_path(path: str) -> str:
    """The file a shared-memory server at ``path`` creates: a bare name goes under /dev/shm."""

class Message:
    """A received message; its arrays view the received buffer (no copy)."""

    @property
    def kind(self) -> str:
        """The frame kind: "request", "response", "error" or "control"."""
    @property
    def request_id(self) -> int:
        """The request id of the header (a response carries its request's)."""
    @property
    def slot(self) -> int:
        """The slot of the header."""
    @property
    def tag(self) -> int:
        """The 32-bit application tag of the header."""
    @property
    def value(self) -> int:
        """The 64-bit application value of the header."""
    @property
    def is_list(self) -> bool:
        """Whether the sender passed a list (rather than one array)."""
    @property
    def dtypes(self) -> list[str]:
        """Wire dtype names, one per tensor ("bfloat16" arrives as uint16 arrays)."""
    @property
    def has_bfloat16(self) -> bool:
        """Whether any tensor is bfloat16 (delivered as uint16 words)."""
    @property
    def nbytes(self) -> int:
        """Total frame size in bytes."""
    def __len__(self) -> int:
        """The number of tensors."""
    def arrays(self) -> list[np.ndarray]:
        """The tensors as numpy arrays viewing the message buffer (no copy)."""

class Reservation:
    """A response buffer reserved in shared memory by ``ServerEndpoint.reserve``: fill its
    arrays in place, then ``ServerEndpoint.publish`` it (or ``cancel`` it)."""

    @property
    def slot(self) -> int:
        """The slot whose oldest unanswered request this answers."""
    @property
    def done(self) -> bool:
        """Whether it was published or cancelled."""
    def arrays(self) -> list[np.ndarray]:
        """Writable numpy views of the reserved tensors (bfloat16 ones as uint16)."""
    def cancel(self) -> None:
        """Drop the reservation without sending anything."""

class ServerEndpoint:
    """The server side of a transport (Unix socket, named pipes or shared memory).

    Every method that takes a ``slot_id`` raises ``ValueError`` for one outside
    ``0 .. num_slots - 1``, naming the slot and the valid ids.

    Threads: an endpoint serves one call at a time. ``close()`` and the properties (``kind``,
    ``path``, ``num_slots``, ``limits``, ``closed``) work from any thread at any time, and from
    a signal handler. ``close()`` from another thread ends a ``wait_any`` in progress at once
    (it raises ``ClosedError``) and returns once the endpoint is closed; from a signal handler
    running inside this thread's own call, the endpoint closes when that call returns. Any
    other method called while another thread is inside ``wait_any`` raises ``BusyError``
    naming both calls (it would wait up to the whole timeout); while another thread is in a
    short call (``recv``, ``send``, ...), it waits for that call to end."""

    @staticmethod
    def unix_socket(
        path: str,
        num_slots: int,
        max_nbytes: int = 268435456,
        max_tensors: int = 8,
        max_dims: int = 8,
    ) -> ServerEndpoint:
        """Listen on a Unix socket at ``path``."""
    @staticmethod
    def named_pipe(
        path: str,
        num_slots: int,
        max_nbytes: int = 268435456,
        max_tensors: int = 8,
        max_dims: int = 8,
    ) -> ServerEndpoint:
        """Serve through named pipes in the directory ``path``."""
    @staticmethod
    def shared_memory(
        path: str,
        num_slots: int,
        max_nbytes: int = 268435456,
        max_tensors: int = 8,
        max_dims: int = 8,
        ring_depth: int = 2,
    ) -> ServerEndpoint:
        """Serve through a shared-memory file at ``path`` (a bare name goes under /dev/shm),
        with a ring of ``ring_depth`` buffers per slot and direction."""
    def reserve(
        self,
        slot_id: int,
        specs: Sequence[tuple[str, Sequence[int]]],
        is_list: bool = False,
        tag: int = 0,
        value: int = 0,
    ) -> Reservation:
        """Reserve a response buffer on ``slot_id`` for ``(dtype name, shape)`` tensors
        (shared memory only; a ``RoleError`` elsewhere)."""
    def publish(self, reservation: Reservation) -> None:
        """Send a filled reservation to its client."""
    @property
    def kind(self) -> str:
        """The transport: "unix_socket", "named_pipe" or "shared_memory"."""
    @property
    def path(self) -> str:
        """The path clients connect to (a shared-memory name resolved under /dev/shm)."""
    @property
    def num_slots(self) -> int:
        """The number of client slots."""
    @property
    def limits(self) -> tuple[int, int, int]:
        """``(max_tensors, max_dims, max_nbytes)``."""
    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
    def wait_any(self, timeout: float | None = None) -> list[int]:
        """Block until requests are pending; returns their slots. ``timeout=0`` polls.
        ``close()`` from another thread or a signal handler ends it with ``ClosedError``."""
    def is_ready_slot(self, slot_id: int) -> bool:
        """Whether ``slot_id`` has a pending request (does non-blocking I/O first)."""
    def is_connected(self, slot_id: int) -> bool:
        """Whether a client holds ``slot_id``."""
    def notices(self) -> list[str]:
        """Faults the server found and repaired on its own since the last call (a corrupt
        shared-memory slot reset), oldest first."""
    def recv(self, slot_id: int) -> Message | None:
        """The next request on ``slot_id``, or None."""
    def send(
        self,
        slot_id: int,
        arrays: Sequence[np.ndarray],
        dtypes: Sequence[str | None] | None = None,
        is_list: bool = False,
        tag: int = 0,
        value: int = 0,
        kind: str = "response",
    ) -> None:
        """Answer the oldest unanswered request of ``slot_id``."""
    def send_error(self, slot_id: int, code: int, message: str) -> None:
        """Answer the oldest unanswered request of ``slot_id`` with an error frame."""
    def close(self) -> None:
        """Stop serving and remove the transport's files. Idempotent; from any thread."""

class ClientEndpoint:
    """The client side of a transport, bound to one slot. Connecting with a ``slot_id``
    outside the server's slots raises ``ValueError`` on every transport.

    Threads: as for ``ServerEndpoint``, with ``send``, ``recv`` and ``request`` the blocking
    calls: while one thread is inside one, another may read the properties (``kind``,
    ``path``, ``slot_id``, ``limits``, ``closed``) or ``close()`` the client, which ends that
    call with ``ClosedError``; any other method raises ``BusyError``."""

    @staticmethod
    def unix_socket(
        path: str, slot_id: int | None = None, connect_timeout: float | None = 30.0
    ) -> ClientEndpoint:
        """Connect to a Unix-socket server and claim ``slot_id`` (None: any free slot)."""
    @staticmethod
    def named_pipe(
        path: str, slot_id: int | None = None, connect_timeout: float | None = 30.0
    ) -> ClientEndpoint:
        """Lease ``slot_id`` (None: any free slot) of a named-pipe server."""
    @staticmethod
    def shared_memory(
        path: str, slot_id: int | None = None, connect_timeout: float | None = 30.0
    ) -> ClientEndpoint:
        """Attach to a shared-memory server and lease ``slot_id`` (None: any free slot)."""
    @property
    def kind(self) -> str:
        """The transport: "unix_socket", "named_pipe" or "shared_memory"."""
    @property
    def path(self) -> str:
        """The server's path (a shared-memory name resolved under /dev/shm)."""
    @property
    def slot_id(self) -> int:
        """The slot this client holds."""
    @property
    def limits(self) -> tuple[int, int, int]:
        """The server's ``(max_tensors, max_dims, max_nbytes)``."""
    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
    def send(
        self,
        arrays: Sequence[np.ndarray],
        dtypes: Sequence[str | None] | None = None,
        is_list: bool = False,
        tag: int = 0,
        value: int = 0,
        kind: str = "request",
        timeout: float | None = None,
    ) -> int:
        """Send a request; returns its request id."""
    def is_ready(self) -> bool:
        """Whether a response can be received without blocking."""
    def server_alive(self) -> bool:
        """Whether the server is still there, as far as can be told without blocking."""
    def recv(self, timeout: float | None = None) -> Message:
        """Receive the response to the oldest outstanding request."""
    def request(
        self,
        arrays: Sequence[np.ndarray],
        dtypes: Sequence[str | None] | None = None,
        is_list: bool = False,
        tag: int = 0,
        value: int = 0,
        kind: str = "request",
        timeout: float | None = None,
    ) -> Message:
        """Send a request and wait for its response (the timeout covers both)."""
    def close(self) -> None:
        """Release the slot and the connection. Idempotent; from any thread."""
