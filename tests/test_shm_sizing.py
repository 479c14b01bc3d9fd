"""The default shared-memory buffer of ``sensai serve`` (``protocol.max_message_nbytes``) holds
the largest answer the teacher gives to a request of ``--max-batch-tokens`` tokens, in every
format: checked against the real answers of the tiny model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sensai.protocol import FORMATS, MIN_MESSAGE_NBYTES, answer_nbytes, max_message_nbytes

TOKENS = 64  # the tiny model's context


def _answer_nbytes(teacher: Any, fmt: str, rows: int, seq_len: int) -> int:
    ids = np.random.default_rng(0).integers(0, teacher.vocab_size, (rows, seq_len))
    out = teacher.compute(ids, np.ones_like(ids), seed=1, output_format=fmt)
    return int(out.nbytes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_sizes_are_those_of_the_real_answers_of_each_format(
    fmt: str, tiny_teacher: Any
) -> None:
    v, n, k = tiny_teacher.vocab_size, tiny_teacher.num_samples, tiny_teacher.topk
    want = answer_nbytes(fmt, v, TOKENS, num_samples=n, topk=k)
    # One token per row: one position per token, the most positions TOKENS tokens give.
    got = _answer_nbytes(tiny_teacher, fmt, TOKENS, 1)
    if fmt == "compact":  # data-dependent: at most min(N, V) distinct tokens per position
        assert got <= want
        assert want == (TOKENS + 1) * 8 + TOKENS * min(n, v) * 10 + TOKENS * 9
    else:
        assert got == want
    # Longer rows give fewer positions (S - 1 each): still within the bound, which covers
    # the request (ids and mask) too.
    bound = max_message_nbytes(fmt, v, TOKENS, num_samples=n, topk=k)
    assert want <= bound and TOKENS * 16 <= bound
    assert _answer_nbytes(tiny_teacher, fmt, 2, TOKENS // 2) <= bound


def test_the_largest_message_at_the_defaults_and_the_edges() -> None:
    v, k = 320, 64
    assert max_message_nbytes("full", v, TOKENS) == TOKENS * v * 4 + TOKENS
    # The defaults of `sensai serve` (16384 tokens, N 256, k 64) on a SmolLM2-sized vocabulary.
    p = 16384
    assert max_message_nbytes("sampled", 49152, p) == p * (256 * 12 + 9)
    assert max_message_nbytes("coo", 49152, p) == p * (256 * 36 + 9)
    assert max_message_nbytes("topk", 49152, p, topk=k) == p * (k * 12 + 9)
    # num_samples beyond the vocabulary: at most V distinct tokens, int32 counts past 32767.
    assert answer_nbytes("compact", 100, 10, num_samples=40000) == 88 + 10 * 100 * 12 + 90
    # A tiny answer still leaves room for the INFO reply and error messages; the request
    # (int64 ids and mask) bounds it from below too.
    assert max_message_nbytes("topk", v, 1, topk=1) == MIN_MESSAGE_NBYTES
    assert max_message_nbytes("full", 2, 1 << 20) == 16 << 20


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        max_message_nbytes("sampled", 320, 0)
    with pytest.raises(ValueError, match="unknown output format"):
        max_message_nbytes("dense", 320, 64)
    with pytest.raises(ValueError, match="num_samples"):
        max_message_nbytes("sampled", 320, 64, num_samples=0)
