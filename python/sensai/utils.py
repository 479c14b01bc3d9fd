"""Helpers on the seed's import path (``sensai.utils``)."""

from __future__ import annotations

from .transports import create_transport

__all__ = ["create_transport"]
