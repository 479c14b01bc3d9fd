"""Named-pipe transport: a directory (0700) of per-slot request/response FIFOs."""

from __future__ import annotations

from ._endpoint import ClientEndpointBase, SeedTransport, ServerEndpointBase

__all__ = ["NamedPipeServer", "NamedPipeClient", "NamedPipeTransport"]


class NamedPipeServer(ServerEndpointBase):
    """``NamedPipeServer(path, num_slots, debug=False, *, max_nbytes, max_tensors, max_dims)``.

    ``path`` is the pipe directory; the server creates it and removes it on close.
    """

    _factory = "named_pipe"


class NamedPipeClient(ClientEndpointBase):
    """``NamedPipeClient(path, slot_id=None, debug=False, *, connect_timeout=30.0)``.

    ``slot_id=None`` leases any free slot; the lease ends when the client closes or dies.
    """

    _factory = "named_pipe"


class NamedPipeTransport(SeedTransport, NamedPipeServer):
    """The seed's name: ``NamedPipeTransport(pipe_dir=..., num_clients=...)``, a
    `NamedPipeServer`."""

    _path_alias = "pipe_dir"
    _kind = "named_pipe"
