"""The teacher: loading a model (:mod:`.load`) and computing its answers (:mod:`.model`)."""

from __future__ import annotations

from .load import (
    EMBEDDED_ALIAS,
    EMBEDDED_INSTALL_COMMAND,
    ModelNotFoundError,
    ResolvedModel,
    convert_gguf,
    embedded_gguf_path,
    load_teacher,
    load_tokenizer,
    model_cache_root,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from .model import DEFAULT_CHUNK_SIZE, TeacherLogitsServer, TeacherSamples, process_logits_request

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "EMBEDDED_ALIAS",
    "EMBEDDED_INSTALL_COMMAND",
    "ModelNotFoundError",
    "ResolvedModel",
    "TeacherLogitsServer",
    "TeacherSamples",
    "convert_gguf",
    "embedded_gguf_path",
    "load_teacher",
    "load_tokenizer",
    "model_cache_root",
    "process_logits_request",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
]
