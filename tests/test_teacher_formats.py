"""The tiny teacher's answers in every output format: consistent with the teacher's own
sampling and logits, with padded positions marked."""

from __future__ import annotations

import pytest
import torch

from sensai.formats import FORMATS, TeacherOutput, build_output


def _batch(teacher):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, teacher.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    return ids, mask


def _output(teacher, fmt: str, seed: int = 7, chunk_size: int = 5) -> TeacherOutput:
    ids, mask = teacher.prepare_inputs(*_batch(teacher))
    with torch.inference_mode():
        return build_output(
            fmt,
            teacher.iter_logit_chunks(ids, mask, chunk_size),
            ids.shape[0],
            teacher.num_positions(ids.shape[1]),
            teacher.vocab_size,
            teacher.position_mask(ids, mask),
            num_samples=teacher.num_samples,
            temperature=teacher.temperature,
            topk=8,
            generator=torch.Generator().manual_seed(seed),
        )


def test_sampled_format_is_the_teachers_own_sampling(tiny_teacher) -> None:
    out = _output(tiny_teacher, "sampled")
    ref = tiny_teacher.sample_input_ids(*_batch(tiny_teacher), seed=7, chunk_size=5)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.values, ref.values)
    torch.testing.assert_close(out.logz_full, ref.logz_full)
    assert torch.equal(out.mask, ref.mask)
    # position i is the distribution after tokens 0..i: real while token i is
    assert out.mask[2, :9].all() and not out.mask[2, 9:].any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_teachers_probabilities(tiny_teacher, fmt: str) -> None:
    out = _output(tiny_teacher, fmt)
    logits = tiny_teacher.get_logits_from_input_ids(*_batch(tiny_teacher))  # [B, S, V]
    ref = torch.log_softmax(logits, dim=-1)
    keep = out.mask
    lp = out.teacher_logprobs()
    if fmt == "full":
        torch.testing.assert_close(lp[keep], ref[keep])
    elif fmt in ("sampled", "topk"):
        torch.testing.assert_close(lp[keep], ref.gather(-1, out.indices)[keep])
    elif fmt == "coo":
        b, _, s, tok = out.coo_indices
        real = keep[b, s]
        torch.testing.assert_close(lp[real], ref[b, s, tok][real])
    else:
        pos = out.position_of_entries()
        b, s = pos // out.num_positions, pos % out.num_positions
        real = keep[b, s]
        torch.testing.assert_close(lp[real], ref[b, s, out.tokens.long()][real])


def test_compact_is_smaller_than_the_seed_layout(tiny_teacher) -> None:
    compact = _output(tiny_teacher, "compact")
    sampled = _output(tiny_teacher, "sampled")
    # the seed's layout: int64 indices + float32 values per sample
    seed_bytes = sampled.indices.numel() * (8 + 4)
    assert compact.nbytes < seed_bytes


@pytest.mark.parametrize("fmt", FORMATS)
def test_compute_answers_in_the_chosen_format(tiny_model_dir: str, fmt: str) -> None:
    from sensai.teacher import TeacherLogitsServer

    teacher = TeacherLogitsServer(
        tiny_model_dir, device="cpu", num_samples=16, output_format=fmt, topk=8, chunk_size=5
    )
    out = teacher.compute(*_batch(teacher), seed=7)
    assert out.format == fmt and out.mask.shape == (3, 11)
    ref = _output(teacher, fmt)
    for a, b in zip(out.to_arrays(), ref.to_arrays(), strict=True):
        torch.testing.assert_close(a, b)


def test_compute_refuses_bad_formats(tiny_model_dir: str) -> None:
    from sensai.teacher import TeacherLogitsServer

    with pytest.raises(ValueError, match="output_format must be one of"):
        TeacherLogitsServer(tiny_model_dir, device="cpu", output_format="dense")
    with pytest.raises(ValueError, match="topk must be"):
        TeacherLogitsServer(tiny_model_dir, device="cpu", output_format="topk", topk=0)
    full = TeacherLogitsServer(tiny_model_dir, device="cpu", num_samples=None)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        full.compute(*_batch(full), output_format="compact")
    assert full.compute(*_batch(full), output_format="full").logits.shape == (3, 11, 320)


@pytest.mark.parametrize("fmt", ["sampled", "compact", "topk"])
def test_the_kept_scratch_buffer_changes_no_answer(tiny_teacher, fmt: str) -> None:
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with tiny_teacher._scratch_lock:  # held elsewhere: this call samples without it
        fresh = tiny_teacher.compute(ids, output_format=fmt, seed=4, chunk_size=5)
    assert tiny_teacher._scratch is None
    for _ in range(2):  # the first call allocates it, the second reuses it across chunks
        kept = tiny_teacher.compute(ids, output_format=fmt, seed=4, chunk_size=5)
        for a, b in zip(fresh.to_arrays(), kept.to_arrays(), strict=True):
            assert torch.equal(a, b)
    assert tiny_teacher._scratch is not None
    buffers = 1 if fmt == "topk" else 2  # the sampler keeps the weights and their cumsum
    assert tiny_teacher._scratch.numel() == buffers * 5 * tiny_teacher.vocab_size


def _sample_counts(out: TeacherOutput) -> torch.Tensor:
    """[B, S, V] how many of each position's samples fell on each token (sampling formats)."""
    b, s, v = out.batch_size, out.num_positions, out.vocab_size
    dense = torch.zeros(b, s, v, dtype=torch.int64)
    if out.format == "sampled":
        return dense.scatter_add_(-1, out.indices, torch.ones_like(out.indices))
    if out.format == "coo":
        bi, _, si, tok = out.coo_indices
        return dense.index_put_((bi, si, tok), torch.ones_like(tok), accumulate=True)
    pos = out.position_of_entries()
    return dense.index_put_(
        (pos // s, pos % s, out.tokens.long()), out.counts.long(), accumulate=True
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lo,hi,p", [(0, 3, 11), (1, 3, 8), (2, 3, 1), (0, 1, 11), (1, 2, 5)])
def test_rows_is_the_answer_for_those_rows_alone(tiny_teacher, fmt: str, lo, hi, p) -> None:
    """What a server sends each request of a batched forward: the rows' own draws, logits
    and masks, with compact offsets and coo batch indices renumbered from 0."""
    out = _output(tiny_teacher, fmt)
    part = out.rows(lo, hi, p)
    assert (part.format, part.batch_size, part.num_positions) == (fmt, hi - lo, p)
    assert torch.equal(part.mask, out.mask[lo:hi, :p])
    if fmt == "full":
        assert torch.equal(part.logits, out.logits[lo:hi, :p])
    else:
        assert torch.equal(part.logz_full, out.logz_full[lo:hi, :p])
        assert torch.equal(part.logz_sampled, out.logz_sampled[lo:hi, :p])
    if fmt == "topk":
        assert torch.equal(part.indices, out.indices[lo:hi, :p])
        assert torch.equal(part.logprobs, out.logprobs[lo:hi, :p])
    if fmt in ("sampled", "coo", "compact"):
        # the same seed draws the same samples in every sampling format
        ref = _sample_counts(_output(tiny_teacher, "sampled"))[lo:hi, :p]
        assert torch.equal(_sample_counts(part), ref)
        assert int(_sample_counts(part).sum()) == (hi - lo) * p * tiny_teacher.num_samples
    if fmt == "compact":
        assert int(part.offsets[0]) == 0 and int(part.offsets[-1]) == part.tokens.numel()
        assert part.offsets.numel() == (hi - lo) * p + 1
        logits = tiny_teacher.get_logits_from_input_ids(*_batch(tiny_teacher))[lo:hi, :p]
        pos = part.position_of_entries()
        ref_lp = torch.log_softmax(logits, -1)[pos // p, pos % p, part.tokens.long()]
        real = part.mask[pos // p, pos % p]
        torch.testing.assert_close(part.logprobs[real], ref_lp[real])
    back = TeacherOutput.from_arrays(part.tag, part.to_arrays())
    for a, b in zip(back.to_arrays(), part.to_arrays(), strict=True):
        assert torch.equal(a, b.to(a.dtype))


def test_rows_refuses_rows_outside_the_output(tiny_teacher) -> None:
    out = _output(tiny_teacher, "compact")
    for args in ((0, 4), (2, 2), (-1, 1), (0, 1, 12), (0, 1, 0)):
        with pytest.raises(ValueError, match="do not fit an output of 3 rows x 11"):
            out.rows(*args)
