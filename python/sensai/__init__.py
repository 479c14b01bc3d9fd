"""SensAI: serve a teacher model's sampled logits to distillation students over local IPC."""

from __future__ import annotations

from . import _core
from .client import SensAIClient
from .errors import (
    AddressInUseError,
    CapacityError,
    ClosedError,
    ModelNotFoundError,
    PeerGoneError,
    ProtocolError,
    RemoteError,
    RoleError,
    SensAIError,
    TransportTimeout,
)
from .server import SensAIServer
from .transports import (
    NamedPipeClient,
    NamedPipeServer,
    SharedMemoryClient,
    SharedMemoryServer,
    Transport,
    UnixSocketClient,
    UnixSocketServer,
    connect,
    create_transport,
)

__version__ = _core.__version__
PROTOCOL_VERSION = _core.PROTOCOL_VERSION

__all__ = [
    "SensAIServer",
    "SensAIClient",
    "Transport",
    "NamedPipeServer",
    "NamedPipeClient",
    "UnixSocketServer",
    "UnixSocketClient",
    "SharedMemoryServer",
    "SharedMemoryClient",
    "create_transport",
    "connect",
    "SensAIError",
    "ProtocolError",
    "TransportTimeout",
    "PeerGoneError",
    "CapacityError",
    "RoleError",
    "RemoteError",
    "AddressInUseError",
    "ClosedError",
    "ModelNotFoundError",
    "PROTOCOL_VERSION",
    "__version__",
]
