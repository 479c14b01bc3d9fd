"""Tests of sensai.sampling: exactness (chi-square), masks, log-partitions, shapes, validation."""

from __future__ import annotations

import collections

import pytest
import torch

from sensai.sampling import (
    SampleResult,
    _compact_counts,
    compact_counts,
    mask_logits,
    sample_from_logits,
    sample_positions,
    topk_positions,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
P_THRESHOLD = 1e-3  # reject the fit when the chi-square p-value falls below this


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _logits(p: int, v: int, seed: int, scale: float = 2.0, device: str = "cpu") -> torch.Tensor:
    return (torch.randn(p, v, generator=_gen(seed)) * scale).to(device)


def chi2_pvalue(observed: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson goodness-of-fit p-value of counts ``observed`` against ``probs`` (1-D).

    Bins with an expected count below ``min_expected`` are pooled into one; zero-probability
    bins must be empty (checked by the caller). The p-value is the chi-square survival function,
    ``Q(df/2, stat/2)``, the regularised upper incomplete gamma function.
    """
    obs = observed.double().cpu()
    n = obs.sum()
    exp = probs.double().cpu() * n
    support = exp > 0
    obs, exp = obs[support], exp[support]
    small = exp < min_expected
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum().reshape(1)])
        exp = torch.cat([exp[~small], exp[small].sum().reshape(1)])
    df = exp.numel() - 1
    assert df >= 1, "need at least two bins"
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def _counts(indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """[P, N] sampled ids -> [P, V] counts."""
    p = indices.shape[0]
    flat = (indices + torch.arange(p, device=indices.device)[:, None] * vocab).reshape(-1)
    return torch.bincount(flat, minlength=p * vocab).reshape(p, vocab).cpu()


def test_chi2_helper_has_power():
    # The helper must reject a wrong distribution, or the fit tests below prove nothing.
    logits = _logits(1, 20, seed=1)
    res = sample_positions(logits, 50_000, temperature=1.0, generator=_gen(2))
    obs = _counts(res.indices, 20)[0]
    right = torch.softmax(logits[0], -1)
    wrong = torch.softmax(logits[0] / 1.2, -1)
    assert chi2_pvalue(obs, right) > P_THRESHOLD
    assert chi2_pvalue(obs, wrong) < 1e-12


MASK_CASES = [
    dict(temperature=0.5),
    dict(temperature=1.0),
    dict(temperature=2.0),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(top_k=8, top_p=0.8, temperature=1.5),
    dict(top_k=6, top_p=0.9, temperature=1.2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case", MASK_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_frequencies_match_masked_softmax(case, device):
    vocab, n = 20, 40_000
    logits = _logits(4, vocab, seed=10, scale=1.0, device=device)
    res = sample_positions(logits, n, generator=_gen(11, device), **case)
    probs = torch.softmax(mask_logits(logits, **case), dim=-1).cpu()
    assert ((probs > 0).sum(-1) >= 3).all(), "the fit needs several kept tokens per row"
    counts = _counts(res.indices, vocab)
    assert counts.sum(-1).tolist() == [n] * 4
    assert (counts[probs == 0] == 0).all(), "a masked-out token was sampled"
    for row in range(4):
        pval = chi2_pvalue(counts[row], probs[row])
        assert pval > P_THRESHOLD, f"row {row}: chi-square p = {pval:.2e} for {case}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    [dict(), dict(temperature=0.6), dict(top_k=7), dict(top_p=0.5, temperature=2.0)]
    + [dict(top_k=50, top_p=0.9, temperature=0.8), dict(top_k=3, top_p=0.99)],
    ids=str,
)
def test_values_and_log_partitions_are_exact(case, device):
    logits = _logits(6, 300, seed=3, scale=3.0, device=device)
    t = case.get("temperature", 1.0)
    res = sample_positions(logits, 64, generator=_gen(4, device), **case)
    assert isinstance(res, SampleResult)
    masked = mask_logits(logits, **case)
    # values are the original logits at the sampled ids
    assert torch.equal(res.values, logits.gather(-1, res.indices))
    # never a masked-out token
    assert torch.isfinite(masked.gather(-1, res.indices)).all()
    torch.testing.assert_close(res.logz_sampled, torch.logsumexp(masked, -1))
    torch.testing.assert_close(res.logz_full, torch.logsumexp(logits, -1))
    # exp(value / T - logz_sampled) is the probability each sample was drawn with
    probs = torch.softmax(masked, -1).gather(-1, res.indices)
    torch.testing.assert_close(torch.exp(res.values / t - res.logz_sampled[:, None]), probs)
    # and exp(value - logz_full) its probability under the untempered teacher
    teacher = torch.softmax(logits, -1).gather(-1, res.indices)
    torch.testing.assert_close(torch.exp(res.values - res.logz_full[:, None]), teacher)
    for name in ("indices", "values", "logz_sampled", "logz_full"):
        assert getattr(res, name).device == logits.device
    assert res.indices.dtype == torch.int64 and res.values.dtype == torch.float32
    assert res.logz_sampled.dtype == torch.float32 and res.logz_full.dtype == torch.float32


def test_masked_tokens_never_sampled_large_vocab():
    logits = _logits(8, 5000, seed=5, scale=1.0)
    for case in (dict(top_k=3), dict(top_p=0.05), dict(top_k=40, top_p=0.1, temperature=3.0)):
        res = sample_positions(logits, 2000, generator=_gen(6), **case)
        masked = mask_logits(logits, **case)
        kept = torch.isfinite(masked)
        assert kept.gather(-1, res.indices).all(), case
        if "top_k" in case:
            assert (kept.sum(-1) <= case["top_k"]).all()


def test_mask_logits_matches_hf_warpers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(16, 500, seed=7, scale=2.5)
    ids = torch.zeros(16, 1, dtype=torch.long)
    for t, k, p in [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 20, 1.0), (2.0, 30, 0.8), (1.0, 5, 0.3)]:
        ref = logits / t
        if k:
            ref = lp.TopKLogitsWarper(k)(ids, ref)
        if p < 1:
            ref = lp.TopPLogitsWarper(p)(ids, ref)
        ours = mask_logits(logits, temperature=t, top_p=p, top_k=k)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (t, k, p)
        torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_mask_logits_matches_hf_on_wide_nuclei():
    # Flat rows need nuclei of thousands of tokens (the top-p window grows over several
    # rounds, for those rows only); peaked rows settle in the first window.
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(6, 5000, seed=21, scale=0.3)
    logits[::2] *= 20.0
    ids = torch.zeros(6, 1, dtype=torch.long)
    for p in (0.5, 0.9, 0.999):
        ref = lp.TopPLogitsWarper(p)(ids, logits.clone())
        ours = mask_logits(logits, top_p=p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), p
    kept = torch.isfinite(mask_logits(logits, top_p=0.9)).sum(-1)
    assert (kept[1::2] > 1000).all() and (kept[::2] < 1000).all()


def test_topk_tie_run_longer_than_window():
    logits = torch.zeros(3, 100)
    logits[:, 0] = 2.0
    logits[0, 1:40] = 1.0  # 39 tokens tied with the 2nd largest
    logits[1, 1] = 1.0
    kept = torch.isfinite(mask_logits(logits, top_k=2)).sum(-1).tolist()
    assert kept == [40, 2, 100]  # row 2: all 99 zeros tie with the 2nd largest
    res = sample_positions(logits, 4000, top_k=2, generator=_gen(3))
    counts = _counts(res.indices, 100)
    assert counts[0, 1:40].min() > 0 and counts[0, 40:].sum() == 0
    assert counts[1, 2:].sum() == 0
    torch.testing.assert_close(res.logz_sampled, torch.logsumexp(mask_logits(logits, top_k=2), -1))


def test_mask_semantics_edges():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda **kw: torch.isfinite(mask_logits(x, **kw)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_p=0.75) == [0, 1]  # 0.5 + 0.3 reaches 0.75
    assert kept(top_p=0.85) == [0, 1, 2]
    assert kept(top_p=0.4) == [0]
    assert kept(top_p=1e-9) == [0]  # always at least one token
    assert kept(top_k=2) == [0, 1]
    assert kept(top_k=4) == kept(top_k=100) == kept() == [0, 1, 2, 3]
    # top-p acts on the renormalised top-k distribution: 0.5/0.8 = 0.625 < 0.7 -> keep two
    assert kept(top_k=2, top_p=0.7) == [0, 1]
    assert kept(top_k=2, top_p=0.6) == [0]
    # ties with the k-th value are kept (HF convention)
    tied = torch.tensor([[5.0, 4.0, 4.0, 4.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    assert torch.isfinite(mask_logits(tied, top_k=2)).sum(-1).tolist() == [4, 2]
    assert torch.isfinite(mask_logits(tied, top_k=2, top_p=0.999)).sum(-1).tolist() == [4, 2]
    # temperature is applied before the masks and kept in the output
    torch.testing.assert_close(mask_logits(x, temperature=2.0), x / 2.0)
    assert mask_logits(x).shape == (4,) and mask_logits(tied).shape == (2, 5)


def test_single_token_vocab_and_empty_positions():
    res = sample_positions(torch.tensor([[0.3]]), 5)
    assert res.indices.tolist() == [[0] * 5]
    torch.testing.assert_close(res.logz_sampled, torch.tensor([0.3]))
    empty = sample_positions(torch.empty(0, 7), 3)
    assert empty.indices.shape == (0, 3) and empty.logz_full.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_generator_makes_results_reproducible(device):
    logits = _logits(10, 100, seed=8, device=device)
    kw = dict(temperature=0.9, top_p=0.95)
    a = sample_positions(logits, 32, generator=_gen(123, device), **kw)
    b = sample_positions(logits, 32, generator=_gen(123, device), **kw)
    c = sample_positions(logits, 32, generator=_gen(124, device), **kw)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.indices, c.indices)
    t1, v1 = sample_from_logits(logits, 16, generator=_gen(5, device))
    t2, v2 = sample_from_logits(logits, 16, generator=_gen(5, device))
    assert torch.equal(t1, t2) and torch.equal(v1, v2)


def test_sample_from_logits_shapes_and_dtypes():
    logits = _logits(7, 50, seed=9)
    tokens, values = sample_from_logits(logits, num_samples=5, generator=_gen(0))
    assert tokens.shape == (5, 7) and values.shape == (5, 7)
    assert tokens.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.equal(values, logits.gather(-1, tokens.t()).t())
    tokens1, values1 = sample_from_logits(logits[0], num_samples=3, generator=_gen(0))
    assert tokens1.shape == (3,) and values1.shape == (3,)
    assert torch.equal(values1, logits[0][tokens1])
    tokens_d, values_d = sample_from_logits(logits)  # seed default: one sample
    assert tokens_d.shape == (1, 7) and values_d.shape == (1, 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    logits = _logits(5, 200, seed=12).to(dtype)
    res = sample_positions(logits, 40, temperature=0.8, top_k=30, generator=_gen(1))
    ref = logits.float()
    assert res.values.dtype == torch.float32
    assert torch.equal(res.values, ref.gather(-1, res.indices))
    torch.testing.assert_close(res.logz_full, torch.logsumexp(ref, -1))
    masked = mask_logits(ref, temperature=0.8, top_k=30)
    torch.testing.assert_close(res.logz_sampled, torch.logsumexp(masked, -1))
    assert torch.equal(mask_logits(logits, temperature=0.8, top_k=30), masked)
    tokens, values = sample_from_logits(logits, 4, generator=_gen(1))
    assert values.dtype == dtype and tokens.shape == (4, 5)


def test_topk_positions_matches_torch():
    logits = _logits(9, 400, seed=13).to(torch.bfloat16)
    idx, logprobs, logz = topk_positions(logits, 10)
    ref = torch.log_softmax(logits.float(), -1)
    ref_vals, ref_idx = torch.topk(ref, 10, dim=-1)
    assert idx.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(logprobs, ref_vals)
    torch.testing.assert_close(logz, torch.logsumexp(logits.float(), -1))
    assert (logprobs[:, :-1] >= logprobs[:, 1:]).all()
    full_idx, full_lp, _ = topk_positions(logits, 400)
    torch.testing.assert_close(torch.logsumexp(full_lp, -1), torch.zeros(9), atol=1e-5, rtol=0)


@pytest.mark.parametrize("vocab,n", [(5, 64), (30, 256), (5000, 256), (3, 1)])
def test_compact_counts_matches_reference(vocab, n):
    g = _gen(vocab + n)
    # skewed draws so rows hold repeats and gaps
    weights = torch.rand(12, vocab, generator=g) ** 4
    indices = torch.multinomial(weights, n, replacement=True, generator=g)
    offsets, tokens, counts = compact_counts(indices, vocab)
    assert offsets.dtype == torch.int64 and tokens.dtype == torch.int32
    assert counts.dtype == torch.int32
    assert offsets.shape == (13,) and int(offsets[0]) == 0 and int(offsets[-1]) == tokens.numel()
    assert tokens.numel() == counts.numel()
    for row in range(12):
        lo, hi = int(offsets[row]), int(offsets[row + 1])
        ref = sorted(collections.Counter(indices[row].tolist()).items())
        assert list(zip(tokens[lo:hi].tolist(), counts[lo:hi].tolist(), strict=True)) == ref
        assert int(counts[lo:hi].sum()) == n
        assert (tokens[lo + 1 : hi] > tokens[lo : hi - 1]).all()  # ascending and distinct
    *unchecked, rows = _compact_counts(indices)  # what the compact format uses
    for a, b in zip(unchecked, (offsets, tokens, counts), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rows, torch.repeat_interleave(torch.arange(12), offsets.diff()))


def test_compact_counts_from_sampling_round_trip():
    logits = _logits(20, 1000, seed=14)
    res = sample_positions(logits, 256, generator=_gen(15))
    offsets, tokens, counts = compact_counts(res.indices, 1000)
    rows = torch.repeat_interleave(torch.arange(20), offsets.diff())
    dense = torch.zeros(20, 1000, dtype=torch.int64)
    dense.index_put_((rows, tokens.long()), counts.long(), accumulate=True)
    assert torch.equal(dense, _counts(res.indices, 1000))
    empty = compact_counts(torch.empty(4, 0, dtype=torch.int64), 10)
    assert empty[0].tolist() == [0] * 5 and empty[1].numel() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=2.0), "num_samples"),
    ],
)
def test_argument_validation(kwargs, match):
    logits = torch.zeros(2, 5)
    kw = dict(num_samples=3) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_positions(logits, **kw)
    if "num_samples" not in kwargs:
        with pytest.raises(ValueError, match=match):
            mask_logits(logits, **kwargs)
    with pytest.raises(ValueError, match=match):
        sample_from_logits(logits, **kw)


def test_logits_validation():
    with pytest.raises(ValueError, match="floating"):
        sample_positions(torch.zeros(2, 5, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="3-D"):
        sample_from_logits(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="2-D"):
        sample_positions(torch.zeros(5), 1)
    with pytest.raises(ValueError, match="vocabulary"):
        sample_positions(torch.zeros(2, 0), 1)
    with pytest.raises(ValueError, match="torch.Tensor"):
        mask_logits([0.0, 1.0])
    bad = torch.zeros(3, 6)
    bad[0, 1] = bad[2, 2] = bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match="3 NaN"):
        sample_positions(bad, 4)
    with pytest.raises(ValueError, match="3 NaN"):
        mask_logits(bad, top_p=0.5)
    with pytest.raises(ValueError, match="3 NaN"):
        topk_positions(bad, 2)
    inf = torch.zeros(2, 4)
    inf[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 \+inf"):
        sample_positions(inf, 1)
    dead = torch.zeros(3, 4)
    dead[1] = float("-inf")
    with pytest.raises(ValueError, match="1 row"):
        sample_positions(dead, 1)
    # -inf entries alone are fine: they are never sampled
    part = torch.zeros(1, 4)
    part[0, :2] = float("-inf")
    assert (sample_positions(part, 100, generator=_gen(0)).indices >= 2).all()


def test_topk_and_compact_validation():
    with pytest.raises(ValueError, match="k must be"):
        topk_positions(torch.zeros(2, 5), 0)
    with pytest.raises(ValueError, match="k must be"):
        topk_positions(torch.zeros(2, 5), 6)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        compact_counts(torch.tensor([[1, 10]]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        compact_counts(torch.tensor([[-1, 3]]), 10)
    with pytest.raises(ValueError, match="2-D"):
        compact_counts(torch.tensor([1, 2]), 10)
    with pytest.raises(ValueError, match="integer"):
        compact_counts(torch.zeros(2, 2), 10)
    with pytest.raises(ValueError, match="vocab_size"):
        compact_counts(torch.zeros(2, 2, dtype=torch.int64), 0)


def test_nucleus_boundary_is_hf_rule():
    # Dyadic weights make the cumulative sums exact: with p = 0.75 the mass before the third
    # token is exactly 0.75, so HF's rule (remove ascending cumsum <= 1 - p) drops it.
    from sensai.sampling import _nucleus_threshold

    e = torch.tensor([[1.0, 0.5, 0.25, 0.25], [0.25, 1.0, 0.25, 0.5]])
    z = e.sum(-1, keepdim=True)
    for k0 in (1, 2, 4):  # first window narrower than, equal to and wider than the nucleus
        assert _nucleus_threshold(e, z, 0.75, k0).flatten().tolist() == [0.5, 0.5]
        assert _nucleus_threshold(e, z, 0.8, k0).flatten().tolist() == [0.25, 0.25]
        assert _nucleus_threshold(e, z, 0.5, k0).flatten().tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "case",
    [{}, {"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 5, "temperature": 1.3}],
    ids=["plain", "tempered", "top_p", "top_k"],
)
@pytest.mark.parametrize("size", [700, 1000, 1300], ids=["weights", "weights+cumsum", "more"])
def test_a_reused_scratch_buffer_changes_nothing(case: dict, size: int) -> None:
    logits = _logits(10, 50, seed=3)
    scratch = torch.full((size,), float("nan"))  # garbage left by a previous call
    fresh = sample_positions(logits, 8, generator=_gen(1), **case)
    for _ in range(2):
        reused = sample_positions(logits, 8, generator=_gen(1), scratch=scratch, **case)
        for name in ("indices", "values", "logz_sampled", "logz_full"):
            assert torch.equal(getattr(fresh, name), getattr(reused, name)), name


def test_topk_with_a_reused_scratch_buffer_changes_nothing() -> None:
    logits = _logits(10, 50, seed=3)
    fresh = topk_positions(logits, 7)
    reused = topk_positions(logits, 7, scratch=torch.full((500,), float("nan")))
    for a, b in zip(fresh, reused, strict=True):
        assert torch.equal(a, b)


def test_a_bad_scratch_buffer_is_refused() -> None:
    logits = _logits(10, 50, seed=3)
    with pytest.raises(ValueError, match="scratch holds 499 elements; logits"):
        sample_positions(logits, 8, scratch=torch.empty(499))
    with pytest.raises(ValueError, match="contiguous float32"):
        sample_positions(logits, 8, scratch=torch.empty(500, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# the inverse-CDF draw's guard against zero-weight tokens


def _sliver_cumsum(real_cumsum):
    """A cumulative sum that, like a badly rounded parallel scan, gives every zero-weight token
    an interval of its own (a wide one, so that nearly every row hits one)."""

    def fake(w, dim=-1, *, out=None):
        cum = real_cumsum(w, dim=dim)
        bump = (w == 0).to(cum.dtype) * cum[..., -1:] * 0.3
        cum = cum + bump.cumsum(dim)
        cum = cum / cum[..., -1:] * real_cumsum(w, dim=dim)[..., -1:]  # same row totals
        return cum if out is None else out.copy_(cum)

    return fake


@pytest.mark.parametrize("case", [dict(), dict(top_p=0.7), dict(top_k=4)], ids=str)
def test_zero_weight_tokens_are_never_drawn_even_from_a_bad_scan(monkeypatch, case):
    logits = _logits(6, 12, seed=21, scale=1.0)
    logits[:, ::3] = float("-inf")  # zero weight, interleaved with kept tokens
    monkeypatch.setattr(torch, "cumsum", _sliver_cumsum(torch.cumsum))
    n = 20_000
    res = sample_positions(logits, n, generator=_gen(22), **case)
    monkeypatch.undo()
    probs = torch.softmax(mask_logits(logits, **case), dim=-1)
    counts = _counts(res.indices, 12)
    assert (counts[probs == 0] == 0).all(), "a zero-weight token was drawn"
    for row in range(6):  # every row was redrawn, exactly
        assert chi2_pvalue(counts[row], probs[row]) > P_THRESHOLD, row


def test_the_sliver_scan_would_draw_zero_weight_tokens_unguarded(monkeypatch):
    # Without the guard the fake scan above does draw zero-weight tokens: the test has power.
    from sensai import sampling

    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0]])
    monkeypatch.setattr(sampling, "_redraw_zero_weight", lambda w, idx, g: idx)
    monkeypatch.setattr(torch, "cumsum", _sliver_cumsum(torch.cumsum))
    idx, _ = sampling._draw(w, 2000, _gen(23))
    monkeypatch.undo()
    assert (w.gather(-1, idx) == 0).any()


def test_a_uniform_that_rounds_up_to_the_total_stays_in_range(monkeypatch):
    from sensai import sampling

    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones_like(real_rand(*a, **k)))
    last_kept, _ = sampling._draw(torch.tensor([[1.0, 2.0, 3.0]]), 50, _gen(24))
    last_zero, total = sampling._draw(torch.tensor([[1.0, 2.0, 0.0]]), 50, _gen(24))
    monkeypatch.undo()
    assert last_kept.tolist() == [[2] * 50]  # clamped to the last token, which has weight
    assert set(last_zero.flatten().tolist()) <= {0, 1}  # redrawn: never the empty last one
    assert total.tolist() == [[3.0]]
