"""Exact, vectorised sampling of teacher logits (pure torch: no model, no numpy).

Every function works on the device of its input and has no Python loop over rows, positions
or samples. Logits of any floating dtype are computed on in float32.

Mask semantics (the seed's, which are Hugging Face's ``TopKLogitsWarper`` then
``TopPLogitsWarper``):

1. temperature: ``x = logits / temperature``;
2. top-k (``top_k > 0``): tokens whose tempered logit is below the k-th largest are removed
   (tokens tied with the k-th are kept, so a row may keep more than ``k``);
   ``top_k >= V`` removes nothing;
3. top-p (``top_p < 1``), on the tempered, top-k-masked distribution: HF's rule, remove every
   token whose ascending cumulative probability is ``<= 1 - top_p``. Equivalently, walking the
   tokens from most to least likely, keep a token while the probability mass before it is
   ``< top_p``: the kept set is the smallest set of highest-probability tokens whose total
   reaches ``top_p``, and the most likely token is always kept. Tokens tied with the last kept
   probability are kept too (HF breaks such ties arbitrarily).

The distribution sampled from is ``softmax`` of the masked, tempered logits; its log-partition
(``logz_sampled``) and that of the untempered logits over the whole vocabulary (``logz_full``)
come back with every sample, so that ``exp(value / T - logz_sampled)`` is the exact probability a
sampled token was drawn with and ``exp(value - logz_full)`` its probability under the teacher.

Cost per [P, V] call: without top-k, one exp pass gives the sampling weights, one cumulative
sum over them gives both the log-partition (its last column) and the inverse CDF that every
sample is drawn from (a binary search per sample, ``torch.searchsorted``); ``logz_full`` needs a
second exp pass only at ``temperature != 1`` or with top-p. That is two passes over [P, V] where
``torch.multinomial`` alone makes five on CUDA (two copies, a sum, a division, then its own
cumulative sum). Top-p takes the nucleus from ``torch.topk`` windows that grow 8x only for rows
that need it (no full sort unless the nucleus is huge). With top-k, only a ``torch.topk``
window of the k candidates is sampled from, plus one exp pass for ``logz_full``. Two [P, V]
float32 buffers are used per call (the weights and their cumulative sum), allocated unless the
caller passes scratch to reuse (``scratch=``: on a CPU, fresh pages cost about as much as an
exp pass); the input logits are never modified.

The draw is exact up to float32 rounding, like ``torch.multinomial``'s: a uniform in [0, 1)
scaled by the row's total is located in the cumulative sum. A token of zero weight (masked, or
``exp`` underflowed) owns an empty interval and is never found when the sum is monotone, as it
is on a CPU (accumulated in float64). A GPU's parallel scan rounds each prefix its own way, so
in principle a zero-weight token can get a sliver: every draw is checked against the weights,
and the rare row that hit one is drawn again with ``torch.multinomial``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import SamplingParams

__all__ = [
    "SampleResult",
    "mask_logits",
    "sample_positions",
    "topk_positions",
    "sample_from_logits",
    "compact_counts",
]


@dataclass
class SampleResult:
    """Samples drawn at ``P`` positions, ``N`` per position, with replacement.

    ``indices`` [P, N] int64 token ids; ``values`` [P, N] float32, the original (untempered,
    unmasked) logits at those ids; ``logz_sampled`` [P] float32, log-partition of the tempered,
    masked distribution actually sampled from; ``logz_full`` [P] float32, ``logsumexp`` of the
    untempered logits over the whole vocabulary.
    """

    indices: torch.Tensor
    values: torch.Tensor
    logz_sampled: torch.Tensor
    logz_full: torch.Tensor


# --------------------------------------------------------------------------------------------
# validation


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (1, 2):
        raise ValueError(
            f"logits must be 1-D [V] or 2-D [P, V], got {logits.dim()}-D {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits need a vocabulary of at least 1, got shape {tuple(logits.shape)}")


def _check_params(temperature: float, top_p: float, top_k: int) -> None:
    SamplingParams(None, temperature, top_p, top_k)  # validates, naming the field


def _check_row_max(logits: torch.Tensor, m: torch.Tensor) -> None:
    """Reject NaN, +inf and all -inf rows; ``m`` is the row max (amax propagates NaN).

    Reads only the [P] row maxima, so the common case costs one small device sync.
    """
    bad = torch.isnan(m) | torch.isinf(m)
    if not bool(bad.any()):
        return
    n_nan = int(torch.isnan(logits).sum())
    if n_nan:
        raise ValueError(f"logits contain {n_nan} NaN value(s)")
    n_pinf = int(torch.isposinf(logits).sum())
    if n_pinf:
        raise ValueError(f"logits contain {n_pinf} +inf value(s)")
    n_rows = int(torch.isneginf(m).sum())
    raise ValueError(f"{n_rows} row(s) of logits have no finite value (all -inf)")


# --------------------------------------------------------------------------------------------
# shared core


_NUCLEUS_WINDOW = 64  # first top-p window (tokens per row); grows 8x for rows it cannot settle


def _tempered(logits2d: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` as a float32 tensor (a view of the input when it already is one)."""
    x = logits2d.float()
    return x.div(float(temperature)) if temperature != 1.0 else x


def _nucleus_threshold(e: torch.Tensor, z: torch.Tensor, top_p: float, k0: int) -> torch.Tensor:
    """Per row, the smallest weight the nucleus keeps ([P, 1]).

    ``e`` [P, V] non-negative weights (zeros for tokens already removed), ``z`` [P, 1] their sum.
    Walking the weights in descending order, a token is kept while the mass before it is
    ``< top_p * z`` (HF's rule: ascending cumulative probability ``> 1 - top_p``), so the first is
    always kept. The descending order comes from ``torch.topk`` over a window of ``k0`` tokens
    per row; rows whose nucleus may extend past the window are redone with an 8x window (a loop
    over rounds, at most log8(V) of them, never over rows).
    """
    n_pos, vocab = e.shape
    pz = z * float(top_p)
    thr = torch.empty(n_pos, 1, dtype=e.dtype, device=e.device)
    rows: torch.Tensor | None = None  # None: all rows
    k = max(1, min(k0, vocab))
    while True:
        sub = e if rows is None else e[rows]
        sub_pz = pz if rows is None else pz[rows]
        if k == vocab:
            vals = torch.sort(sub, dim=-1, descending=True).values  # faster than a full topk
        else:
            vals = torch.topk(sub, k, dim=-1, sorted=True).values  # descending
        cum = vals.cumsum(-1)
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
        n_keep = (before < sub_pz).sum(-1, keepdim=True).clamp_(min=1)
        row_thr = vals.gather(-1, n_keep - 1)
        settled = (n_keep < k) | (cum[:, -1:] >= sub_pz) | (k == vocab)
        if rows is None:
            thr.copy_(row_thr)
            pending = ~settled.squeeze(-1)
            rows_idx = torch.nonzero(pending).squeeze(-1)
        else:
            thr[rows] = row_thr
            rows_idx = rows[~settled.squeeze(-1)]
        if rows_idx.numel() == 0:
            return thr
        rows = rows_idx
        k = k * 8 if k * 8 < vocab // 4 else vocab  # a window near V costs a sort anyway


def _row_max(logits2d: torch.Tensor) -> torch.Tensor:
    """Row max [P, 1] in float32, after checking every row has one (no NaN, no +inf)."""
    m0 = logits2d.amax(dim=-1, keepdim=True).float()
    _check_row_max(logits2d, m0)
    return m0


def _work_buffer(logits2d: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """A [P, V] float32 buffer on the logits' device: a view of ``scratch`` when given."""
    shape, dev = logits2d.shape, logits2d.device
    if scratch is None:
        return torch.empty(shape, dtype=torch.float32, device=dev)
    need = shape[0] * shape[1]
    if scratch.dtype != torch.float32 or scratch.device != dev or not scratch.is_contiguous():
        raise ValueError(
            f"scratch must be a contiguous float32 tensor on {dev}, got {scratch.dtype} "
            f"on {scratch.device}"
        )
    if scratch.numel() < need:
        raise ValueError(
            f"scratch holds {scratch.numel()} elements; logits {tuple(shape)} need {need}"
        )
    return scratch.reshape(-1)[:need].view(shape)


def _cum_buffer(e: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor | None:
    """The second half of ``scratch`` as a buffer shaped like ``e``, when it has room for one."""
    need = e.numel()
    if scratch is None or scratch.numel() < 2 * need:
        return None
    return scratch.reshape(-1)[need : 2 * need].view(e.shape)


def _draw(
    w: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` draws with replacement per row of the weights ``w`` [P, K] (non-negative,
    unnormalised, each row with a positive one), by inverse CDF.

    Returns ``(indices [P, N] int64, total [P, 1])``, ``total`` being the row sums (the last
    column of the cumulative sum, which ``out``, shaped like ``w``, receives when given).
    """
    cum = torch.cumsum(w, dim=-1) if out is None else torch.cumsum(w, dim=-1, out=out)
    total = cum[:, -1:]
    u = torch.rand(w.shape[0], num_samples, generator=generator, device=w.device)
    idx = torch.searchsorted(cum, u.mul_(total), right=True)
    idx.clamp_(max=w.shape[-1] - 1)  # u * total may round up to total itself
    return _redraw_zero_weight(w, idx, generator), total


def _redraw_zero_weight(
    w: torch.Tensor, idx: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``idx`` with every row that drew a token of zero weight drawn again, exactly.

    A monotone cumulative sum never leads there (a zero weight owns an empty interval); a
    parallel scan's rounding, or ``u * total`` rounding up to the total, can. Rare, so the
    redraw uses ``torch.multinomial`` on those rows only; the check costs one gather and one
    device sync.
    """
    bad = (w.gather(-1, idx) <= 0).any(dim=-1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).squeeze(-1)
        idx[rows] = torch.multinomial(w[rows], idx.shape[-1], replacement=True, generator=generator)
    return idx


def _untempered_logz(logits2d: torch.Tensor, m0: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of the logits [P], with ``buf`` as scratch (no allocation)."""
    torch.sub(logits2d, m0, out=buf).exp_()
    return (m0 + torch.log(buf.sum(dim=-1, keepdim=True))).squeeze(-1)


def _check_tempered(m: torch.Tensor, temperature: float) -> None:
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"logits / temperature overflows float32 at temperature {temperature!r}")


def _full_weights(
    logits2d: torch.Tensor,
    temperature: float,
    top_p: float,
    want_mask: bool,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Weights over the whole vocabulary (no top-k): temperature, then top-p if asked.

    Returns ``(e, m, logz_full, removed)``: ``e`` [P, V] float32 ``exp(x - m)`` with removed
    tokens zeroed, where ``x = logits / T`` and ``m`` [P, 1] its row max; ``logz_full`` [P] when it
    comes for free or is needed anyway (None at T == 1 without top-p: it is then
    ``logz_sampled``); ``removed`` the top-p mask (only when ``want_mask``). One [P, V] float32
    buffer is used (``scratch``, or a fresh one: fresh pages cost about as much as an exp pass
    on CPU); at T != 1 it first holds the untempered weights, for ``logz_full``.
    """
    m0 = _row_max(logits2d)
    buf = _work_buffer(logits2d, scratch)
    logz_full = None
    if temperature != 1.0:
        logz_full = _untempered_logz(logits2d, m0, buf)
        x = buf.copy_(logits2d).div_(float(temperature))  # the same ops as _tempered
        m = x.amax(dim=-1, keepdim=True)
        _check_tempered(m, temperature)
    else:
        x, m = logits2d, m0  # subtracted in float32 below, by type promotion
    e = torch.sub(x, m, out=buf).exp_()  # the one exp pass over the tempered logits
    removed = None
    if top_p < 1.0:
        z = e.sum(dim=-1, keepdim=True)
        if logz_full is None:
            logz_full = (m + torch.log(z)).squeeze(-1)
        below = e < _nucleus_threshold(e, z, top_p, _NUCLEUS_WINDOW)
        e.masked_fill_(below, 0.0)  # ties with the last kept weight stay
        removed = below if want_mask else None
    return e, m, logz_full, removed


def _topk_window(
    logits2d: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (``0 < top_k < V``), then top-p, on a window of the highest tempered logits.

    Only the top-k survivors can be sampled, so they are all the sampling needs: ``torch.topk``
    takes ``top_k + 8`` per row (ties with the k-th value are kept, HF's convention; a rare tie
    run longer than the window widens it to every survivor). Returns ``(idx, w, keep, m,
    logz_full)``: window token ids [P, W], their weights ``exp(x - m)`` [P, W] float32 with
    removed tokens zeroed, the window's kept mask, the tempered row max [P, 1], and the
    untempered ``logsumexp`` [P] (the only full pass over the vocabulary besides ``topk``).
    """
    vocab = logits2d.shape[-1]
    m0 = _row_max(logits2d)
    buf = _work_buffer(logits2d, scratch)
    logz_full = _untempered_logz(logits2d, m0, buf)
    if temperature != 1.0:
        x = buf.copy_(logits2d).div_(float(temperature))  # the same ops as _tempered
    else:
        x = logits2d
    width = min(top_k + 8, vocab)
    vals, idx = torch.topk(x, width, dim=-1, sorted=True)  # descending
    kth = vals[:, top_k - 1 : top_k]
    if width < vocab and bool((vals[:, -1:] >= kth).any()):
        width = int((x >= kth).sum(dim=-1).max())
        vals, idx = torch.topk(x, width, dim=-1, sorted=True)
    vals = vals.float()
    m = vals[:, :1]
    if temperature != 1.0:
        _check_tempered(m, temperature)
    keep = vals >= kth
    w = torch.exp(vals - m).masked_fill_(~keep, 0.0)
    if top_p < 1.0:
        z = w.sum(dim=-1, keepdim=True)
        keep &= w >= _nucleus_threshold(w, z, top_p, width)  # one round: the window is whole
        w.masked_fill_(~keep, 0.0)
    return idx, w, keep, m, logz_full


# --------------------------------------------------------------------------------------------
# public API


def mask_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """``logits / temperature`` in float32 with top-k and top-p removed tokens set to ``-inf``.

    Accepts [V] or [P, V]; returns the same shape. See the module docstring for the exact mask
    semantics (top-k first, then HF's top-p convention on the top-k-masked distribution).
    ``softmax`` of the result is the distribution :func:`sample_positions` samples from: both
    compute the mask with the same code.
    """
    _check_logits(logits)
    _check_params(temperature, top_p, top_k)
    x2 = logits.reshape(1, -1) if logits.dim() == 1 else logits
    x = _tempered(x2, temperature)
    if x.shape[0] == 0:
        return x.reshape(logits.shape).clone()
    with torch.no_grad():  # the mask is data, not part of a graph through ``logits``
        x2 = x2.detach()
        removed = None
        if 0 < top_k < x.shape[-1]:
            idx, _, keep, _, _ = _topk_window(x2, temperature, top_p, top_k)
            removed = torch.ones(x.shape, dtype=torch.bool, device=x.device)
            removed.scatter_(-1, idx, ~keep)
        elif top_p < 1.0:
            _, _, _, removed = _full_weights(x2, temperature, top_p, want_mask=True)
    out = x.clone() if removed is None else x.masked_fill(removed, float("-inf"))
    return out.reshape(logits.shape)


@torch.no_grad()
def sample_positions(
    logits: torch.Tensor,
    num_samples: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    *,
    scratch: torch.Tensor | None = None,
) -> SampleResult:
    """Draw ``num_samples`` tokens with replacement at each of ``P`` positions of ``[P, V]`` logits.

    Sampling is from ``softmax(mask_logits(logits, temperature, top_p, top_k))``, exactly. One
    exp pass gives the sampling weights, their cumulative sum ``logz_sampled`` and the draw;
    ``logz_full`` reuses it at temperature 1 and costs a second exp pass otherwise.
    ``generator`` (on the logits' device) makes the draw reproducible. ``scratch``, a contiguous
    float32 tensor on the logits' device, is the working memory (overwritten) instead of fresh
    buffers: reuse one across calls. It needs at least P * V elements (the weights) and is used
    for the cumulative sum too when it holds 2 * P * V. The logits are never modified.
    """
    _check_logits(logits)
    SamplingParams(num_samples, temperature, top_p, top_k).samples("sample_positions")
    if logits.dim() != 2:
        raise ValueError(f"sample_positions takes 2-D [P, V] logits, got {tuple(logits.shape)}")
    n_pos = logits.shape[0]
    dev = logits.device
    if n_pos == 0:
        empty = torch.empty(0, dtype=torch.float32, device=dev)
        return SampleResult(
            indices=torch.empty(0, num_samples, dtype=torch.int64, device=dev),
            values=torch.empty(0, num_samples, dtype=torch.float32, device=dev),
            logz_sampled=empty,
            logz_full=empty.clone(),
        )
    if 0 < top_k < logits.shape[-1]:
        idx, w, _, m, logz_full = _topk_window(logits, temperature, top_p, top_k, scratch)
        # w's max is 1 (the row max is always kept), so each row's total is >= 1.
        pos, total = _draw(w, num_samples, generator)
        logz_sampled = (m + torch.log(total)).squeeze(-1)
        indices = idx.gather(-1, pos)
    else:
        e, m, lz_full, _ = _full_weights(logits, temperature, top_p, False, scratch)
        indices, total = _draw(e, num_samples, generator, _cum_buffer(e, scratch))
        logz_sampled = (m + torch.log(total)).squeeze(-1)
        # None at T == 1 without a mask: the distribution sampled from is the teacher's
        logz_full = logz_sampled.clone() if lz_full is None else lz_full
    values = logits.gather(-1, indices).float()
    return SampleResult(
        indices=indices, values=values, logz_sampled=logz_sampled, logz_full=logz_full
    )


@torch.no_grad()
def topk_positions(
    logits: torch.Tensor, k: int, *, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of the untempered distribution at each position.

    Returns ``(indices [P, k] int64, logprobs [P, k] float32, logz_full [P] float32)``, indices
    in descending probability order. ``scratch`` as for :func:`sample_positions`.
    """
    _check_logits(logits)
    if logits.dim() != 2:
        raise ValueError(f"topk_positions takes 2-D [P, V] logits, got {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= vocab):
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary size), got {k!r}")
    x = logits.float()
    if x.shape[0] == 0:
        return (
            torch.empty(0, k, dtype=torch.int64, device=x.device),
            torch.empty(0, k, dtype=torch.float32, device=x.device),
            torch.empty(0, dtype=torch.float32, device=x.device),
        )
    m0 = _row_max(x)
    vals, idx = torch.topk(x, k, dim=-1, sorted=True)
    logz = _untempered_logz(x, m0, _work_buffer(x, scratch))
    return idx, vals - logz.unsqueeze(-1), logz


def sample_from_logits(
    logits: torch.Tensor,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's API: ``(tokens, values)`` shaped [num_samples, S] for [S, V] logits.

    For [V] logits both are [num_samples]. ``tokens`` are int64; ``values`` are the original
    (untempered, unmasked) logits at the sampled tokens, in the logits' dtype.
    """
    _check_logits(logits)
    one_d = logits.dim() == 1
    x2 = logits.reshape(1, -1) if one_d else logits
    res = sample_positions(x2, num_samples, temperature, top_p, top_k, generator)
    tokens = res.indices.t()
    values = x2.gather(-1, res.indices).t()
    if one_d:
        return tokens[:, 0], values[:, 0]
    return tokens, values


@torch.no_grad()
def compact_counts(
    indices: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position, the distinct sampled tokens (ascending id) and how often each was drawn.

    ``indices`` [P, N] integer token ids. Returns CSR ``(offsets [P+1] int64, tokens [T] int32,
    counts [T] int32)``: position ``p`` owns ``tokens[offsets[p]:offsets[p+1]]``, and each
    row's counts sum to ``N``.
    """
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D [P, N], got shape {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    if vocab_size > 2**31 - 1:
        raise ValueError(f"vocab_size {vocab_size} does not fit the int32 token ids")
    n_pos, n_samp = indices.shape
    dev = indices.device
    if indices.numel() == 0:
        return (
            torch.zeros(n_pos + 1, dtype=torch.int64, device=dev),
            torch.empty(0, dtype=torch.int32, device=dev),
            torch.empty(0, dtype=torch.int32, device=dev),
        )
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got values in [{lo}, {hi}]")
    offsets, tokens, counts, _ = _compact_counts(indices)
    return offsets, tokens, counts


def _compact_counts(
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`compact_counts` of non-empty ids already known valid (no check, so no device
    sync for it), plus each distinct token's row [T] int64. One sync remains: the number of
    distinct tokens."""
    n_pos, n_samp = indices.shape
    s = torch.sort(indices.to(torch.int64), dim=-1).values
    is_start = torch.ones_like(s, dtype=torch.bool)
    is_start[:, 1:] = s[:, 1:] != s[:, :-1]
    flat_start = is_start.reshape(-1)
    tokens = s.reshape(-1)[flat_start].to(torch.int32)
    starts = torch.nonzero(flat_start).squeeze(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([n_pos * n_samp])])
    counts = (ends - starts).to(torch.int32)
    offsets = torch.zeros(n_pos + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = is_start.sum(dim=-1).cumsum(0)
    return offsets, tokens, counts, starts.div_(n_samp, rounding_mode="floor")
