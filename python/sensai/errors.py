"""Exceptions raised by SensAI. All derive from :class:`SensAIError`."""

from __future__ import annotations

from collections.abc import Iterable

from . import _core

__all__ = [
    "SensAIError",
    "ProtocolError",
    "TransportTimeout",
    "PeerGoneError",
    "CapacityError",
    "RoleError",
    "RemoteError",
    "AddressInUseError",
    "ClosedError",
    "BusyError",
    "ForkError",
    "NoTeacherError",
    "ModelNotFoundError",
    "StoreError",
    "SequenceNotStoredError",
    "UnsupportedFeatureError",
    "TokenizerMismatchError",
]

# "bad request", "capacity", ... by code, from the crate's ERROR_CODES
_CODE_NAMES = {code: name.lower().replace("_", " ") for name, code in _core.ERROR_CODES.items()}


class SensAIError(Exception):
    """Base class of every SensAI error."""


class ProtocolError(SensAIError):
    """The peer sent bytes that are not a valid frame, or a transport file is invalid."""


class TransportTimeout(SensAIError, TimeoutError):
    """A blocking call reached its timeout."""


class PeerGoneError(SensAIError, ConnectionError):
    """The other side closed, crashed, or never came."""


class CapacityError(SensAIError):
    """A message or a resource does not fit a configured limit (or no slot is free)."""


class RoleError(SensAIError):
    """An endpoint was asked to do what its role (server or client) does not allow, or the
    other side is not this process's own user: a client refuses a server of another uid
    (its shared-memory file, pipe directory or socket), a server refuses such a client, and
    a server refuses another user's lock file. The message names what was found and what
    was expected."""


class AddressInUseError(SensAIError, OSError):
    """Another live server already serves on this path."""


class ClosedError(SensAIError, ValueError):
    """The endpoint was already closed, or was closed (from another thread or a signal
    handler) while the call waited."""


class BusyError(SensAIError, RuntimeError):
    """An endpoint method was called while another thread is inside a blocking call on the
    same endpoint (``wait_any``; a client's ``send``, ``recv`` or ``request``), or from a
    signal handler running inside one. An endpoint serves one thread at a time: other calls
    wait for a short call of another thread to end, and ``close()`` and the properties work
    from any thread (``close()`` ends the blocking call with ``ClosedError``). The message
    names the method called and the call that holds the endpoint."""


class ForkError(SensAIError, RuntimeError):
    """An endpoint was used in a process other than the one that opened it: a forked child
    (a DataLoader worker, a ``multiprocessing`` fork) shares its parent's connection and
    slot, so their answers would be swapped. Open a new endpoint in the child after the
    fork; `sensai.Client` and the seed's ``SensAIClient`` do so by themselves. Closing or
    dropping the inherited copy in the child is safe: it gives back nothing of the
    parent's."""


class NoTeacherError(SensAIError):
    """A batch could not get the teacher's answer and the collate wrapper was told to raise
    (``on_error="raise"``, its default with a `sensai.Client`). The message names the
    address, the cause and the fix; the cause is chained (``__cause__``)."""


class ModelNotFoundError(SensAIError, FileNotFoundError):
    """The requested teacher model cannot be found locally (nothing is ever downloaded)."""


class RemoteError(SensAIError):
    """The server answered a request with an error frame.

    ``code`` is one of ``sensai._core.ERROR_CODES`` (1 bad request, 2 protocol, 3 capacity,
    4 internal, 5 unavailable, 6 role); ``message`` is the server's explanation.
    """

    def __init__(self, code: int, message: str) -> None:
        self.code = int(code)
        self.message = message
        super().__init__(
            f"server error {self.code} ({_CODE_NAMES.get(self.code, 'unknown')}): {message}"
        )

    def __reduce__(self):  # keep picklable across DataLoader workers
        return (type(self), (self.code, self.message))


class UnsupportedFeatureError(SensAIError):
    """The server lacks a protocol feature the client asked for; ``features`` names those
    missing, the message also the server's INFO version and what it has."""

    def __init__(self, features: Iterable[str], info_version: int, have: Iterable[str]) -> None:
        self.features = list(features)
        self.info_version = info_version
        self.have = list(have)
        super().__init__(
            f"the server lacks {', '.join(map(repr, self.features))} (INFO version "
            f"{info_version}; it has {', '.join(self.have) or 'no features'})"
        )

    def __reduce__(self):  # keep picklable across DataLoader workers
        return (type(self), (self.features, self.info_version, self.have))


class TokenizerMismatchError(SensAIError, ValueError):
    """The student's tokenizer is not the teacher's (another vocabulary or special tokens, or
    a student vocabulary smaller than the tokenizer's)."""


class StoreError(SensAIError, ValueError):
    """A teacher store (its manifest or a shard) is invalid, damaged or does not match what
    the reader expects; the message names the file and what was wrong."""


class SequenceNotStoredError(StoreError, LookupError):
    """A replayed sequence is not in the store; ``key`` is its hash (the store's row key)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)

    def __reduce__(self):  # keep picklable across DataLoader workers
        return (type(self), (self.key, self.args[0]))
