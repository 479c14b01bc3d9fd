"""The seed's ``sensai.utils``: the collate wrapper (:mod:`sensai.collate`) and
``create_transport`` (:mod:`sensai.transports`) under the seed's import path."""

from __future__ import annotations

from .collate import request_teacher_logits as _request_teacher_logits_with_retry
from .collate import wrap_collate_function
from .transports import create_transport

__all__ = ["create_transport", "wrap_collate_function", "_request_teacher_logits_with_retry"]
