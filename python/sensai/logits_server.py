"""The seed's ``sensai.logits_server``: the teacher's names, and ``python -m sensai.logits_server``
(the flags of ``sensai serve``). The code lives in :mod:`sensai.teacher.model` and
:mod:`sensai.cli`; this module only keeps the seed's import path."""

from __future__ import annotations

from .cli import serve_main
from .teacher.model import (
    DEFAULT_CHUNK_SIZE,
    TeacherLogitsServer,
    TeacherSamples,
    process_logits_request,
)

__all__ = ["TeacherLogitsServer", "TeacherSamples", "process_logits_request", "DEFAULT_CHUNK_SIZE"]


def main(argv: list[str] | None = None) -> None:
    """``python -m sensai.logits_server``: ``sensai serve`` under the seed's name."""
    serve_main(argv, prog_name="python -m sensai.logits_server")


if __name__ == "__main__":
    main()
