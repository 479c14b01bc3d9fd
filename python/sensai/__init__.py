"""SensAI: serve a teacher model's sampled logits to distillation students over local IPC.

Importing the package does not import torch (about 3 s and 650 MB): the transports, the
seed's server and client and the collate wrapper need only numpy. ``TeacherOutput`` (and
everything that builds one: `Client.get_teacher_logits`, the teacher, the losses) brings torch
in on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _core, errors
from .client import Client, SensAIClient
from .collate import wrap_collate_function
from .errors import *  # noqa: F403 - every exception, listed in errors.__all__
from .serving.loop import SensAIServer
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

if TYPE_CHECKING:
    from .formats import TeacherOutput
    from .teacher.model import TeacherLogitsServer

__version__ = _core.__version__
PROTOCOL_VERSION = _core.PROTOCOL_VERSION

__all__ = [
    "SensAIServer",
    "SensAIClient",
    "Client",
    "TeacherOutput",
    "TeacherLogitsServer",
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
    "PROTOCOL_VERSION",
    "__version__",
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    """``sensai.TeacherOutput`` and ``sensai.TeacherLogitsServer`` import their modules (and
    torch) on first access, so that ``import sensai`` stays light."""
    if name == "TeacherOutput":
        from .formats import TeacherOutput

        return TeacherOutput
    if name == "TeacherLogitsServer":
        from .teacher.model import TeacherLogitsServer

        return TeacherLogitsServer
    raise AttributeError(f"module 'sensai' has no attribute {name!r}")
