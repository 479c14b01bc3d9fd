"""Unix-domain-socket transport (socket file 0600, same-user peers only)."""

from __future__ import annotations

from ._endpoint import ClientEndpointBase, SeedTransport, ServerEndpointBase

__all__ = ["UnixSocketServer", "UnixSocketClient", "UnixSocketTransport"]


class UnixSocketServer(ServerEndpointBase):
    """``UnixSocketServer(path, num_slots, debug=False, *, max_nbytes, max_tensors, max_dims)``."""

    _factory = "unix_socket"


class UnixSocketClient(ClientEndpointBase):
    """``UnixSocketClient(path, slot_id=None, debug=False, *, connect_timeout=30.0)``.

    ``slot_id=None`` leases any free slot; it is freed when the client closes or dies.
    """

    _factory = "unix_socket"


class UnixSocketTransport(SeedTransport, UnixSocketServer):
    """The seed's name: ``UnixSocketTransport(socket_path=..., num_clients=...)``, a
    `UnixSocketServer`."""

    _path_alias = "socket_path"
    _kind = "unix_socket"
