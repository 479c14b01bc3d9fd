"""Transports: where a server and its clients exchange tensors.

``create_transport(kind, ...)`` makes a server endpoint; ``connect(address)`` makes a
client endpoint from an address such as ``shm:///dev/shm/sensai``,
``unix:///tmp/sensai.sock`` or ``pipe:///tmp/sensai-pipes``: the server's absolute path,
percent-encoded (a bare shared-memory name such as ``sensai`` means ``/dev/shm/sensai``).

Threads: an endpoint serves one call at a time. While one thread blocks in it (a server's
``wait_any``, a client's ``read_tensor``/``request``), another thread or a signal handler may
read its properties and ``close()`` it, which ends the blocked call with ``ClosedError``; any
other method raises ``BusyError`` (see ``sensai._core.ServerEndpoint``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

from .. import _core
from .named_pipe import NamedPipeClient, NamedPipeServer, NamedPipeTransport
from .shared_memory import SharedMemoryClient, SharedMemoryServer, SharedMemoryTransport
from .transport_abc import ClientMixin, Transport
from .unix_socket import UnixSocketClient, UnixSocketServer, UnixSocketTransport

__all__ = [
    "Transport",
    "ClientMixin",
    "NamedPipeServer",
    "NamedPipeClient",
    "UnixSocketServer",
    "UnixSocketClient",
    "SharedMemoryServer",
    "SharedMemoryClient",
    "NamedPipeTransport",
    "SharedMemoryTransport",
    "UnixSocketTransport",
    "TRANSPORT_KINDS",
    "create_transport",
    "default_path",
    "parse_address",
    "format_address",
    "connect",
    "register_scheme",
    "describe_address",
]

_SERVERS = {
    "shared_memory": SharedMemoryServer,
    "unix_socket": UnixSocketServer,
    "named_pipe": NamedPipeServer,
}
_CLIENTS = {
    "shared_memory": SharedMemoryClient,
    "unix_socket": UnixSocketClient,
    "named_pipe": NamedPipeClient,
}
_SCHEMES = {"shm": "shared_memory", "unix": "unix_socket", "pipe": "named_pipe"}
_SCHEME_OF = {v: k for k, v in _SCHEMES.items()}
TRANSPORT_KINDS = tuple(_SERVERS)
# Address schemes answered by other parts of SensAI (or by plugins), imported only when an
# address uses them: scheme -> a callable or "module:function", called as
# ``f(address, slot_id, **kwargs)`` and returning a client endpoint.
_EXTERNAL: dict[str, Any] = {"store": "sensai.store.replay:connect"}


def register_scheme(scheme: str, target: Any) -> None:
    """Make ``scheme://...`` addresses reach ``target`` (a callable, or ``"module:function"``
    imported on first use): ``target(address, slot_id, **kwargs)`` returns a client endpoint
    (``request_message``, ``server_alive``, ``close``, ``slot_id``)."""
    if scheme in _SCHEMES:
        raise ValueError(f"the {scheme}:// scheme is a built-in transport")
    _EXTERNAL[scheme] = target


def default_path(kind: str) -> str:
    """A per-process default path for a server of ``kind``."""
    base = tempfile.gettempdir()
    pid = os.getpid()
    if kind == "unix_socket":
        return os.path.join(base, f"sensai-{pid}.sock")
    if kind == "named_pipe":
        return os.path.join(base, f"sensai-{pid}-pipes")
    if kind == "shared_memory":
        return (
            f"/dev/shm/sensai-{pid}"
            if os.path.isdir("/dev/shm")
            else os.path.join(base, f"sensai-{pid}.shm")
        )
    raise ValueError(
        f"unknown transport kind {kind!r}; expected one of {', '.join(TRANSPORT_KINDS)}"
    )


def create_transport(
    kind: str, path: str | None = None, num_slots: int | None = None, **kwargs: Any
):
    """Create a server endpoint; returns ``(endpoint, path)`` like the seed's.

    ``num_clients`` is accepted as the seed's name for ``num_slots`` (default 1). Other
    keyword arguments (``max_nbytes``, ``max_tensors``, ``max_dims``, ``debug``) go to the
    endpoint's constructor.
    """
    if kind not in _SERVERS:
        raise ValueError(
            f"unknown transport kind {kind!r}; expected one of {', '.join(TRANSPORT_KINDS)}"
        )
    if "num_clients" in kwargs:
        n = kwargs.pop("num_clients")
        num_slots = n if num_slots is None else num_slots
    for alias in ("pipe_dir", "socket_path", "shm_path"):
        if alias in kwargs:
            v = kwargs.pop(alias)
            path = path or v
    path = str(path) if path else default_path(kind)
    _check_path(path, f"cannot create a {kind} server at")
    num_slots = 1 if num_slots is None else int(num_slots)
    return _SERVERS[kind](path, num_slots, **kwargs), path


_FORMS = (
    "shm:///dev/shm/name (or shm:name), unix:///path/to/socket or pipe:///path/to/dir, "
    "with the path percent-encoded"
)


def _control_char(text: str) -> str | None:
    """The first control character (C0, DEL or C1) in ``text``, if any."""
    return next((c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F), None)


def _check_path(path: str, what: str) -> None:
    c = _control_char(path)
    if c is not None:
        raise ValueError(
            f"{what} {path!r}: it holds the control character {c!r}; expected a path "
            "without control characters (newline, tab, NUL...)"
        )


def _server_path(kind: str, path: str) -> str:
    """The absolute path a server of ``kind`` given ``path`` listens on, as its core resolves
    it: a bare shared-memory name goes under /dev/shm; a relative path is joined to the
    working directory without collapsing ``..`` (the kernel follows symlinks first)."""
    if kind == "shared_memory":
        path = _core.shm_path(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def parse_address(address: str) -> tuple[str, str]:
    """``"unix:///tmp/s.sock"`` -> ``("unix_socket", "/tmp/s.sock")``; the path is
    percent-decoded, and ``shm:name`` or ``shm:///dev/shm/name`` names ``/dev/shm/name``."""

    def invalid(why: str) -> ValueError:
        return ValueError(f"invalid address {address!r}: {why}; expected {_FORMS}")

    c = _control_char(address)
    if c is not None:
        raise invalid(f"it holds the control character {c!r}")
    scheme, colon, rest = address.partition(":")
    if colon and scheme in _EXTERNAL:  # its own syntax, parsed by its own connect
        path = rest[2:].split("?", 1)[0] if rest.startswith("//") else ""
        if not path:
            raise invalid(f"no path after {scheme}://")
        return scheme, path
    if not colon or scheme not in _SCHEMES:
        raise invalid(f"unknown scheme {scheme!r}")
    if rest.startswith("//"):
        host, slash, tail = rest[2:].partition("/")
        if host:
            raise invalid(f"{host!r} is a host, and servers are local (write three slashes)")
        rest = slash + tail
    if not rest:
        raise invalid("no path")
    for ch, code in (("?", "%3F"), ("#", "%23")):
        if ch in rest:
            raise invalid(
                f"{ch!r} would start a query or fragment; percent-encode it as {code} in a path"
            )
    path = os.fsdecode(unquote_to_bytes(rest))
    c = _control_char(path)
    if c is not None:
        raise invalid(f"its path {path!r} holds the control character {c!r}")
    kind = _SCHEMES[scheme]
    return kind, _server_path(kind, path)


def format_address(kind: str, path: str) -> str:
    """The address a client passes to reach a server of ``kind`` at ``path``."""
    if kind not in _SCHEME_OF:
        raise ValueError(
            f"unknown transport kind {kind!r}; expected one of {', '.join(TRANSPORT_KINDS)}"
        )
    path = os.fspath(path)
    if not path:
        raise ValueError(f"cannot format a {kind} address: expected a path, got ''")
    _check_path(path, f"cannot format a {kind} address for")
    encoded = quote_from_bytes(os.fsencode(_server_path(kind, path)), safe="/")
    return f"{_SCHEME_OF[kind]}://{encoded}"


def connect(address: str, slot_id: int | None = None, **kwargs: Any):
    """A client endpoint for ``address`` (see :func:`parse_address`)."""
    kind, path = parse_address(address)
    if kind in _EXTERNAL:
        target = _EXTERNAL[kind]
        if isinstance(target, str):
            import importlib

            module, _, name = target.partition(":")
            target = getattr(importlib.import_module(module), name)
        return target(address, slot_id, **kwargs)
    return _CLIENTS[kind](path, slot_id, **kwargs)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:  # a zombie (exited, not reaped) holds nothing any more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def describe_address(address: str) -> str:
    """What is at ``address`` now, for an error message: nothing, a stale file of a server
    that is gone (its pid), or a live server's files (its pid). Reads only: never connects
    and never changes anything."""
    try:
        kind, path = parse_address(address)
    except ValueError as e:
        return str(e)
    if kind in _EXTERNAL:
        return f"{path} ({'exists' if os.path.exists(path) else 'does not exist'})"
    lock = os.path.join(path, "server.lock") if kind == "named_pipe" else path + ".lock"
    if not os.path.lexists(path):
        return f"nothing is at {path}"
    try:
        with open(lock) as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return f"{path} exists but has no readable lock file {lock}: no SensAI server made it"
    if pid <= 0 or not _pid_alive(pid):
        return f"{path} is a stale file of a server that is gone (pid {pid})"
    return f"{path} belongs to a live server (pid {pid})"
