"""SensAI's application protocol over the frames, without torch: request tags and flags, the
output formats, the INFO codec and its versioning, the tokenizer fingerprint, and the sampling
parameters. docs/PROTOCOL.md describes the same bytes on the wire."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from .errors import ProtocolError, TokenizerMismatchError, UnsupportedFeatureError

__all__ = [
    "ERROR_CODES",
    "FEATURES",
    "FORMATS",
    "FORMAT_TABLE",
    "FORMAT_TAGS",
    "INFO_TAG",
    "INFO_VERSION",
    "LEGACY_FEATURES",
    "PROTOCOL_VERSION",
    "SAMPLING_FORMATS",
    "SEED_FLAG",
    "FormatSpec",
    "SamplingParams",
    "check_tokenizer",
    "decode_info",
    "encode_info",
    "format_name",
    "format_spec",
    "answer_nbytes",
    "info_features",
    "max_message_nbytes",
    "require_features",
    "tokenizer_fingerprint",
    "tokenizer_hash",
]

#: The frame format's version (the Rust crate's).
PROTOCOL_VERSION = int(_core.PROTOCOL_VERSION)
#: Error-frame codes by name; the crate is their source.
ERROR_CODES: dict[str, int] = dict(_core.ERROR_CODES)

#: Header tag of the INFO control request and of its reply.
INFO_TAG = 0x1001
#: Request header tag bit: the header's value carries the sampling seed.
SEED_FLAG = 0x1

#: Version of the INFO reply's keys. A server without ``info_version`` speaks version 0.
INFO_VERSION = 1
#: What a teacher server of this version supports (INFO ``features``).
FEATURES = ("attention_mask", "seed", "tokenizer_fingerprint")
#: What a server of INFO version 0 (no ``features`` key) supports.
LEGACY_FEATURES = ("attention_mask", "seed")


# ------------------------------------------------------------------------------- formats
_LOGZ = (("logz_sampled", "float32"), ("logz_full", "float32"))
_MASK = (("mask", "bool"),)


@dataclass(frozen=True)
class FormatSpec:
    """One output format: its wire ``tag``, its own tensors ``body`` as ``(TeacherOutput
    field, wire dtype)`` in wire order, whether it ``samples`` (num_samples, temperature and
    the masks apply, and a seed changes the answer), and whether ``logz_sampled`` and
    ``logz_full`` follow the body. ``mask`` always comes last."""

    name: str
    tag: int
    body: tuple[tuple[str, str], ...]
    samples: bool
    logz: bool = True

    @property
    def tensors(self) -> tuple[tuple[str, str], ...]:
        """Every tensor of a response, in wire order."""
        return self.body + (_LOGZ if self.logz else ()) + _MASK

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tensors)


#: The formats. ``counts`` is int32 when num_samples > 32767; ``full`` logits may be bfloat16.
FORMAT_TABLE: tuple[FormatSpec, ...] = (
    FormatSpec("full", 1, (("logits", "float32"),), samples=False, logz=False),
    FormatSpec("sampled", 2, (("indices", "int64"), ("values", "float32")), samples=True),
    FormatSpec("coo", 3, (("coo_indices", "int64"), ("coo_values", "float32")), samples=True),
    FormatSpec(
        "compact",
        4,
        (("offsets", "int64"), ("tokens", "int32"), ("counts", "int16"), ("logprobs", "float32")),
        samples=True,
    ),
    FormatSpec("topk", 5, (("indices", "int64"), ("logprobs", "float32")), samples=False),
)
FORMATS = tuple(f.name for f in FORMAT_TABLE)
FORMAT_TAGS: dict[str, int] = {f.name: f.tag for f in FORMAT_TABLE}
SAMPLING_FORMATS = tuple(f.name for f in FORMAT_TABLE if f.samples)
_BY_NAME = {f.name: f for f in FORMAT_TABLE}
_BY_TAG = {f.tag: f for f in FORMAT_TABLE}


def format_spec(fmt: str | int) -> FormatSpec:
    """The format of a name or a wire tag; ValueError for an unknown one."""
    spec = _BY_TAG.get(fmt) if isinstance(fmt, int) else _BY_NAME.get(fmt)
    if spec is None:
        if isinstance(fmt, int):
            raise ValueError(
                f"unknown teacher output format tag {fmt}; expected one of {sorted(_BY_TAG)}"
            )
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return spec


def format_name(tag: int) -> str:
    """The format of a wire tag; ValueError for an unknown tag."""
    return format_spec(int(tag)).name


#: Bytes per token of the largest request: int64 ``input_ids`` and an int64 attention mask.
REQUEST_BYTES_PER_TOKEN = 16
#: The least a message may carry whatever the teacher: INFO replies and error messages.
MIN_MESSAGE_NBYTES = 64 << 10


def answer_nbytes(
    fmt: str, vocab_size: int, positions: int, num_samples: int = 256, topk: int = 64
) -> int:
    """Tensor bytes of a teacher's answer of format ``fmt`` over ``positions`` positions P
    (exact, except ``compact``: its most). With N = ``num_samples``, V = ``vocab_size``,
    k = min(``topk``, V):

    ========  ==============================================================================
    full      logits P x V float32 (bfloat16 logits are smaller)
    sampled   indices P x N int64 + values P x N float32
    coo       coo_indices 4 x (P x N) int64 + coo_values P x N float32
    compact   offsets (P + 1) int64 + at most min(N, V) distinct tokens per position, each an
              int32 token, an int16 count (int32 when N > 32767) and a float32 log-prob
    topk      indices P x k int64 + logprobs P x k float32
    ========  ==============================================================================

    plus ``logz_sampled`` and ``logz_full`` (float32 each) except for ``full``, and the bool
    ``mask``, one byte a position."""
    spec = format_spec(fmt)
    for name, value in (("vocab_size", vocab_size), ("positions", positions), ("topk", topk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    p, v = positions, vocab_size
    n = SamplingParams(num_samples=num_samples).samples(fmt) if spec.samples else 0
    if fmt == "full":
        body = p * v * 4
    elif fmt == "sampled":
        body = p * n * (8 + 4)
    elif fmt == "coo":
        body = p * n * (4 * 8 + 4)
    elif fmt == "compact":
        count_bytes = 2 if n <= 32767 else 4
        body = (p + 1) * 8 + p * min(n, v) * (4 + count_bytes + 4)
    else:  # topk
        body = p * min(topk, v) * (8 + 4)
    return body + (2 * 4 * p if spec.logz else 0) + p


def max_message_nbytes(
    fmt: str,
    vocab_size: int,
    max_batch_tokens: int,
    num_samples: int = 256,
    topk: int = 64,
) -> int:
    """Tensor bytes of the largest message a teacher of format ``fmt`` sends or receives: its
    answer (:func:`answer_nbytes`) to a request of ``max_batch_tokens`` tokens, which has at
    most that many positions (S - 1 per row of S tokens, or 1 when S == 1), or that request
    itself (int64 ids and mask, ``REQUEST_BYTES_PER_TOKEN`` a token); at least
    ``MIN_MESSAGE_NBYTES``. This is what ``sensai serve`` reserves per shared-memory buffer
    when ``--max-nbytes`` is not given. A larger single request (the batcher runs it alone)
    is answered with an error naming the limit, before any compute."""
    if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool):
        raise ValueError(f"max_batch_tokens must be an int >= 1, got {max_batch_tokens!r}")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be an int >= 1, got {max_batch_tokens!r}")
    answer = answer_nbytes(fmt, vocab_size, max_batch_tokens, num_samples, topk)
    return max(answer, max_batch_tokens * REQUEST_BYTES_PER_TOKEN, MIN_MESSAGE_NBYTES)


# ---------------------------------------------------------------------------------- INFO
def encode_info(info: dict[str, Any]) -> list[np.ndarray]:
    """The tensors of an INFO reply: one uint8 1-D tensor of UTF-8 JSON."""
    blob = json.dumps(info).encode("utf-8")
    return [np.frombuffer(blob, dtype=np.uint8).copy()]


def decode_info(msg: Any) -> dict[str, Any]:
    """The configuration an INFO reply carries; ProtocolError for anything else."""
    arrays = msg.arrays()
    if msg.kind != "control" or msg.tag != INFO_TAG or len(arrays) != 1:
        raise ProtocolError(
            f"unexpected answer to the INFO request: kind {msg.kind!r}, tag {msg.tag:#x}, "
            f"{len(arrays)} tensor(s)"
        )
    try:
        info = json.loads(np.ascontiguousarray(arrays[0]).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"the INFO answer is not UTF-8 JSON: {e}") from None
    if not isinstance(info, dict):
        raise ProtocolError(f"the INFO answer is not a JSON object: {type(info).__name__}")
    return info


def info_features(info: dict[str, Any]) -> frozenset[str]:
    """The features a server's INFO declares (those of version 0 when it has no version)."""
    if "info_version" not in info:
        return frozenset(LEGACY_FEATURES)
    features = info.get("features")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise ProtocolError(f"INFO 'features' must be a list of names, got {features!r}")
    return frozenset(features)


def require_features(info: dict[str, Any], wanted: Iterable[str]) -> None:
    """UnsupportedFeatureError naming every feature of ``wanted`` the server lacks."""
    have = info_features(info)
    missing = [f for f in wanted if f not in have]
    if missing:
        raise UnsupportedFeatureError(missing, info.get("info_version", 0), sorted(have))


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_hash(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's vocabulary and special tokens (None without a tokenizer)."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    special = getattr(tokenizer, "special_tokens_map", {})
    blob = json.dumps([sorted(vocab.items()), special], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any] | None:
    """``{"vocab_size": tokens in the vocabulary, "hash": tokenizer_hash}`` (INFO
    ``tokenizer``), None without a tokenizer."""
    if tokenizer is None:
        return None
    return {"vocab_size": len(tokenizer.get_vocab()), "hash": tokenizer_hash(tokenizer)}


def check_tokenizer(info: dict[str, Any], tokenizer: Any, vocab_size: int | None = None) -> None:
    """Check a student's ``tokenizer`` against the server's (INFO ``tokenizer``): the same
    vocabulary and special tokens. ``vocab_size``, the width of the student's logits, may be
    padded beyond the tokenizer's tokens but not fall short of them."""
    require_features(info, ["tokenizer_fingerprint"])
    theirs = info.get("tokenizer")
    if not isinstance(theirs, dict) or "hash" not in theirs:
        raise ProtocolError(f"INFO 'tokenizer' must be a fingerprint object, got {theirs!r}")
    mine = tokenizer_fingerprint(tokenizer)
    if mine is None:
        raise TokenizerMismatchError("no student tokenizer given to compare with the teacher's")
    if mine["hash"] != theirs["hash"]:
        raise TokenizerMismatchError(
            f"the student's tokenizer ({mine['vocab_size']} tokens, hash {mine['hash'][:12]}) "
            f"is not the teacher's ({theirs.get('vocab_size')} tokens, hash "
            f"{str(theirs['hash'])[:12]}): token ids would not mean the same tokens"
        )
    if vocab_size is not None and int(vocab_size) < int(mine["vocab_size"]):
        raise TokenizerMismatchError(
            f"the student's logits have {vocab_size} entries, fewer than the tokenizer's "
            f"{mine['vocab_size']} tokens"
        )


# ----------------------------------------------------------------------------- sampling
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How a teacher samples: ``num_samples`` per position (None, 0 or -1: no sampling, full
    logits), ``temperature`` > 0, nucleus ``top_p`` in (0, 1], ``top_k`` >= 0 (0: no mask).
    Validated when made: a ValueError names the field."""

    num_samples: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "temperature", "top_p", "top_k"):
            self.check(name, getattr(self, name))

    @staticmethod
    def check(name: str, value: Any) -> None:
        """Validate one field (what the CLI's flags call)."""
        if name == "num_samples":
            if not (value is None or value in (0, -1)) and (not _is_int(value) or value < 1):
                raise ValueError(
                    f"num_samples must be an int >= 1, or None, 0 or -1 for full logits; "
                    f"got {value!r}"
                )
        elif name == "temperature":
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
        elif name == "top_p":
            if not (_is_number(value) and 0.0 < value <= 1.0):  # also rejects NaN
                raise ValueError(f"top_p must be in (0, 1], got {value!r}")
        elif name == "top_k":
            if not _is_int(value) or value < 0:
                raise ValueError(f"top_k must be an int >= 0 (0: no top-k mask), got {value!r}")
        else:
            raise ValueError(f"unknown sampling parameter {name!r}")

    @property
    def full(self) -> bool:
        """Whether no sampling is asked for (full logits)."""
        return self.num_samples is None or self.num_samples in (0, -1)

    def samples(self, what: str = "sampling") -> int:
        """``num_samples`` as an int >= 1; ValueError naming ``what`` needs it otherwise."""
        if self.full:
            raise ValueError(f"{what} needs num_samples >= 1, got {self.num_samples!r}")
        return int(self.num_samples)  # type: ignore[arg-type]  # not None: not full

    def for_format(self, fmt: str) -> None:
        """ValueError when format ``fmt`` samples and there is nothing to sample."""
        if format_spec(fmt).samples and self.full:
            raise ValueError(
                f"the {fmt!r} format samples; num_samples must be >= 1, got {self.num_samples!r}"
            )
