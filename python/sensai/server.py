"""The seed's ``sensai.server``: `SensAIServer` lives in :mod:`sensai.serving.loop`."""

from __future__ import annotations

from .serving.loop import SensAIServer

__all__ = ["SensAIServer"]
