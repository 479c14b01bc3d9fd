"""Serving: the one serve loop (:mod:`.loop`) and the batching teacher service
(:mod:`.batching`, which imports torch on first access)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .loop import SensAIServer

if TYPE_CHECKING:
    from .batching import TeacherService

__all__ = ["SensAIServer", "TeacherService"]


def __getattr__(name: str) -> Any:
    if name == "TeacherService":
        from .batching import TeacherService

        return TeacherService
    raise AttributeError(f"module 'sensai.serving' has no attribute {name!r}")
