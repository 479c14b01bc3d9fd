"""SensAI: serve a teacher model's sampled logits to distillation students over local IPC."""

from __future__ import annotations

from . import _core
from .client import Client, SensAIClient
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
from .formats import TeacherOutput
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
from .utils import wrap_collate_function

__version__ = _core.__version__
PROTOCOL_VERSION = _core.PROTOCOL_VERSION

__all__ = [
    "SensAIServer",
    "SensAIClient",
    "Client",
    "TeacherOutput",
    "wrap_collate_function",
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
