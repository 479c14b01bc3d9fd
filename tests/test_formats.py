"""Teacher output formats: shapes, wire round trips, and exact probabilities from each."""

from __future__ import annotations

import pytest
import torch

from sensai.formats import FORMAT_TAGS, FORMATS, OutputBuilder, TeacherOutput, format_name

B, S, V, N = 2, 7, 50, 64


def _logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B * S, V, generator=g) * 3


def _build(fmt: str, chunk: int = 5, **kw) -> tuple[TeacherOutput, torch.Tensor]:
    logits = _logits()
    builder = OutputBuilder(
        fmt, B, S, V, num_samples=N, generator=torch.Generator().manual_seed(1), **kw
    )
    for lo in range(0, B * S, chunk):
        builder.add(logits[lo : lo + chunk])
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 5:] = False
    return builder.finish(mask), logits


@pytest.mark.parametrize("fmt", FORMATS)
def test_wire_round_trip_keeps_every_tensor(fmt: str) -> None:
    out, _ = _build(fmt, topk=8)
    arrays = [t.numpy() for t in out.to_arrays()]
    back = TeacherOutput.from_arrays(FORMAT_TAGS[fmt], arrays, vocab_size=V, num_samples=N)
    assert back.format == fmt
    for a, b in zip(out.to_arrays(), back.to_arrays(), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    assert not back.mask[1, 5:].any() and back.mask[0].all()


@pytest.mark.parametrize("fmt", ["sampled", "coo", "compact", "topk", "full"])
def test_teacher_logprobs_are_exact(fmt: str) -> None:
    out, logits = _build(fmt, topk=8)
    ref = torch.log_softmax(logits, dim=-1)  # [P, V]
    lp = out.teacher_logprobs()
    if fmt == "full":
        torch.testing.assert_close(lp.reshape(B * S, V), ref)
    elif fmt in ("sampled", "topk"):
        idx = out.indices.reshape(B * S, -1)
        torch.testing.assert_close(lp.reshape(B * S, -1), ref.gather(1, idx))
    elif fmt == "coo":
        b, _, s, tok = out.coo_indices
        torch.testing.assert_close(lp, ref[b * S + s, tok])
    else:
        pos = out.position_of_entries()
        torch.testing.assert_close(lp, ref[pos, out.tokens.long()])


def test_topk_holds_the_k_most_likely_tokens() -> None:
    out, logits = _build("topk", topk=8)
    top = torch.topk(logits, 8, dim=-1)
    assert torch.equal(
        out.indices.reshape(B * S, 8).sort(dim=-1).values, top.indices.sort(dim=-1).values
    )


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_sampled_logprobs_match_the_tempered_distribution(temperature: float) -> None:
    out, logits = _build("sampled", temperature=temperature)
    ref = torch.log_softmax(logits / temperature, dim=-1)
    idx = out.indices.reshape(B * S, N)
    torch.testing.assert_close(out.sampled_logprobs().reshape(B * S, N), ref.gather(1, idx))
    comp, _ = _build("compact", temperature=temperature)
    pos = comp.position_of_entries()
    torch.testing.assert_close(comp.sampled_logprobs(), ref[pos, comp.tokens.long()])


def test_compact_counts_are_the_sampled_multiset() -> None:
    sampled, _ = _build("sampled")
    compact, _ = _build("compact")  # same generator seed, same chunks: the same draws
    idx = sampled.indices.reshape(B * S, N)
    offs = compact.offsets
    assert offs.shape == (B * S + 1,) and int(offs[-1]) == compact.tokens.numel()
    for p in range(B * S):
        toks = compact.tokens[offs[p] : offs[p + 1]].long()
        cnts = compact.counts[offs[p] : offs[p + 1]]
        ref_t, ref_c = torch.unique(idx[p], return_counts=True)
        assert torch.equal(toks, ref_t) and torch.equal(cnts.long(), ref_c)
    assert compact.tokens.dtype == torch.int32


def test_sparse_coo_layout_matches_the_seed() -> None:
    out, logits = _build("sampled")
    coo = out.to_sparse_coo().coalesce()
    assert coo.shape == (B, N, S, V)
    i = coo.indices()
    # every stored value is the original logit at (batch, position, token)
    torch.testing.assert_close(coo.values(), logits[i[0] * S + i[2], i[3]])
    coo2 = _build("coo")[0].to_sparse_coo().coalesce()
    assert torch.equal(coo2.indices(), i) and torch.equal(coo2.values(), coo.values())


def test_full_chunked_equals_unchunked() -> None:
    a, _ = _build("full", chunk=3)
    b, _ = _build("full", chunk=B * S)
    assert torch.equal(a.logits, b.logits)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        OutputBuilder("dense", B, S, V)
    with pytest.raises(ValueError, match="topk must be in"):
        OutputBuilder("topk", B, S, V, topk=0)
    with pytest.raises(ValueError, match="unknown teacher output format tag"):
        format_name(99)
    out, _ = _build("sampled")
    with pytest.raises(ValueError, match="has 5 tensors"):
        TeacherOutput.from_arrays(FORMAT_TAGS["sampled"], out.to_arrays()[:3])
    builder = OutputBuilder("sampled", B, S, V, num_samples=4)
    builder.add(_logits()[:3])
    with pytest.raises(ValueError, match="only 3 of"):
        builder.finish(torch.ones(B, S, dtype=torch.bool))


def test_to_moves_every_tensor() -> None:
    out, _ = _build("compact")
    moved = out.to("cpu")
    assert moved is not out and torch.equal(moved.tokens, out.tokens)


def test_a_pickled_output_leaves_the_received_message_behind() -> None:
    import pickle

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle a live message")

    out, _ = _build("sampled")
    out.extra.update(message=Unpicklable(), note="kept")
    back = pickle.loads(pickle.dumps(out))
    assert back.extra == {"note": "kept"} and "message" in out.extra
    for a, b in zip(out.to_arrays(), back.to_arrays(), strict=True):
        assert torch.equal(a, b)
