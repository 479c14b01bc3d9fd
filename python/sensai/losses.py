"""Distillation losses on a teacher's answer: forward KL(teacher || student), per position.

Three losses with one signature, ``loss(student_logits, teacher, temperature=1.0,
reduction="mean")``:

- `sampled_kd_loss` (formats ``sampled``, ``compact`` and ``coo``): an unbiased estimate of
  the full-vocabulary KL whose gradient with respect to the student's logits is, in
  expectation, the exact full-KL gradient (random-sampling KD, Anshumann et al., ACL 2025).
  With ``N`` samples ``x_n`` drawn from the teacher's distribution ``p`` at a position::

      KL(p || q) = E_p[log p(x) - log q(x)]  ~  1/N * sum_n (log p(x_n) - log q(x_n))

  so a token sampled ``c`` times weighs ``c / N``. ``log p`` is exact (the server sends the
  log-partitions), ``log q`` comes from the student's full logits. When the server sampled at a
  temperature ``T`` and the loss distils at ``temperature == 1``, each sample is importance
  weighted by ``p_1(x) / p_T(x)``, which is again exact and unbiased.
- `topk_kd_loss` (format ``topk``): the teacher's top-k tokens renormalised, as offline kits
  do. Biased (the tail's mass is moved onto the head); here to compare against.
- `full_kd_loss` (format ``full``, or a plain [B, S, V] logits tensor): the exact KL.

Alignment: teacher position ``i`` is the distribution after tokens ``0..i`` of the request
(it predicts token ``i + 1``). Pass the student's logits for the same ``input_ids``
([B, S_in, V_student]); the loss pairs teacher position ``i`` with the student's position
``i``. A teacher answer has ``S_in - 1`` positions (1 for a one-token request), so the
student's last position is ignored; student logits already cut to the teacher's positions
are accepted too. Positions the teacher marks as padding (``teacher.mask`` False) contribute
nothing; ``mask=`` restricts further (for example to the answer tokens of a chat).

The student may have a larger vocabulary than the teacher (padded embeddings): the extra
logits have teacher probability 0 and only enter the student's normaliser.

Temperature: every loss is the KL between the two distributions softened by ``temperature``
(``softmax(logits / temperature)``), not multiplied by ``temperature ** 2``; scale it
yourself if you follow that convention.

Reductions: ``"mean"`` over the real positions, ``"sum"``, or ``"none"`` for the per-position
[B, S] values (0 at padded positions).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from .formats import TeacherOutput

__all__ = ["full_kd_loss", "sampled_kd_loss", "teacher_from_batch", "topk_kd_loss"]

_REDUCTIONS = ("mean", "sum", "none")

log = logging.getLogger("sensai.losses")


def teacher_from_batch(batch: Mapping, attribute: str = "teacher_logits") -> TeacherOutput | None:
    """The `TeacherOutput` that `sensai.wrap_collate_function` stored in a collated batch
    (under ``<attribute>_output``), or None when the batch has none (every request for it
    failed and the wrapper warned)."""
    out = batch.get(f"{attribute}_output")
    if out is not None and not isinstance(out, TeacherOutput):
        raise TypeError(
            f"batch[{attribute + '_output'!r}] should be a TeacherOutput, got {type(out).__name__}"
        )
    return out


# --------------------------------------------------------------------------------------------
# shared checks


def _check_common(student_logits: Any, temperature: float, reduction: str) -> None:
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise TypeError(
            "student_logits must be a floating-point torch.Tensor [B, S, V], got "
            f"{getattr(student_logits, 'dtype', type(student_logits).__name__)}"
        )
    if student_logits.dim() != 3:
        raise ValueError(
            f"student_logits must be 3-D [batch, positions, vocab], got shape "
            f"{tuple(student_logits.shape)}"
        )
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _align(student_logits: torch.Tensor, b: int, s: int, v_teacher: int) -> torch.Tensor:
    """The student's logits at the teacher's ``s`` positions: [b, s, V_student]."""
    sb, ss, sv = student_logits.shape
    if sb != b:
        raise ValueError(
            f"student_logits has batch size {sb}, but the teacher answered {b} sequences"
        )
    if ss not in (s, s + 1):
        raise ValueError(
            f"student_logits has {ss} positions, but the teacher answered {s}: pass the "
            f"student's logits for the same input_ids ({s + 1} positions, or {s} already "
            "aligned; a one-token request has 1)"
        )
    if v_teacher and sv < v_teacher:
        raise ValueError(
            f"student_logits has a vocabulary of {sv}, smaller than the teacher's {v_teacher}: "
            "the student must share the teacher's tokenizer (its vocabulary may be padded)"
        )
    return student_logits[:, :s]


def _position_mask(teacher_mask: torch.Tensor, mask: Any, b: int, s: int) -> torch.Tensor:
    m = teacher_mask.to(torch.bool)
    if mask is not None:
        mask = torch.as_tensor(mask, device=m.device)
        if tuple(mask.shape) not in ((b, s), (b, s + 1)):
            raise ValueError(
                f"mask must be [batch, positions] = {(b, s)} (or {(b, s + 1)}, the input's "
                f"shape), got {tuple(mask.shape)}"
            )
        m = m & mask[:, :s].to(torch.bool)
    return m


def _reduce(per_position: torch.Tensor, m: torch.Tensor, reduction: str) -> torch.Tensor:
    per_position = per_position.masked_fill(~m, 0.0)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    return total / m.sum().clamp(min=1)


def _student_logq(
    student: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log q_T(token) for entries at flat positions ``rows``, without a [P, V] log-softmax:
    ``s[token] / T - logsumexp(s / T)`` (autograd gives the exact softmax gradient)."""
    flat = student.reshape(-1, student.shape[-1]).float()
    if temperature != 1.0:
        flat = flat / temperature
    lse = torch.logsumexp(flat, dim=-1)
    return flat[rows, tokens] - lse[rows]


def _kl_terms(target_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), 0 where p is 0 (a masked teacher logit of -inf)."""
    p = target_lp.exp()
    return torch.where(p > 0, p * (target_lp - student_lp), torch.zeros_like(p))


def _as_teacher(teacher: Any, student_logits: torch.Tensor) -> TeacherOutput:
    if isinstance(teacher, Mapping):
        found = teacher_from_batch(teacher)
        if found is None:
            raise ValueError(
                "the batch holds no teacher answer ('teacher_logits_output'); pass the "
                "TeacherOutput itself, or use teacher_from_batch(batch, attribute)"
            )
        teacher = found
    if not isinstance(teacher, TeacherOutput):
        raise TypeError(f"teacher must be a TeacherOutput, got {type(teacher).__name__}")
    if teacher.mask.device != student_logits.device:
        teacher = teacher.to(student_logits.device)
    return teacher


_warned_cross_entropy = False


def _warn_cross_entropy_once() -> None:
    global _warned_cross_entropy
    if not _warned_cross_entropy:
        _warned_cross_entropy = True
        log.warning(
            "sampled_kd_loss on a counts-only store answer returns the cross-entropy part of "
            "the KL (the KL minus the teacher's entropy, a constant): the gradient is the same, "
            "the value is not a KL"
        )


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------
# losses


def sampled_kd_loss(
    student_logits: torch.Tensor,
    teacher: TeacherOutput,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    truncated: bool = False,
    mask: Any = None,
) -> torch.Tensor:
    """Unbiased sampled estimate of KL(teacher || student) at ``temperature`` (see the module
    doc), from a ``sampled``, ``compact`` or ``coo`` teacher answer.

    - ``temperature`` equal to the server's sampling temperature: the sample counts are the
      weights.
    - ``temperature == 1`` with samples drawn at another temperature: importance weights
      ``p_1(x) / p_T(x)`` from the two log-partitions the answer carries. Serving at
      ``T > 1`` keeps the weights bounded; at ``T < 1`` rare tokens carry large weights and
      the estimate, still unbiased, gets noisy.
    - Anything else raises ValueError: no exact weights exist.

    A server started with ``--top-k`` or ``--top-p`` samples a truncated distribution, and no
    unbiased estimate of the full KL exists from it; the loss refuses unless
    ``truncated=True``, which distils towards the truncated, renormalised distribution
    (at the server's temperature only). ``mask`` [B, S] (or the input's [B, S + 1]) drops
    more positions. The estimate is exactly 0 when the student's logits equal the
    teacher's (each sample's term is ``log p(x) - log q(x)``).

    A ``compact`` answer from a counts-only store (``teacher.has_logprobs`` False) has no
    ``log p``: the loss is then the sampled cross-entropy ``-1/N * sum_n log q(x_n)``, the
    KL minus the teacher's entropy, with the same gradient; it logs a warning once per
    process, and refuses an importance-weighted temperature.
    """
    _check_common(student_logits, temperature, reduction)
    teacher = _as_teacher(teacher, student_logits)
    fmt = teacher.format
    if fmt not in ("sampled", "compact", "coo"):
        hint = {"full": "full_kd_loss", "topk": "topk_kd_loss"}.get(fmt, "another loss")
        raise ValueError(
            f"sampled_kd_loss needs a 'sampled', 'compact' or 'coo' teacher answer, got "
            f"{fmt!r}: use {hint}"
        )
    b, s = teacher.batch_size, teacher.num_positions
    student = _align(student_logits, b, s, teacher.vocab_size)
    m = _position_mask(teacher.mask, mask, b, s)

    t_server = float(teacher.temperature)
    is_truncated = int(teacher.top_k) > 0 or float(teacher.top_p) < 1.0
    if is_truncated and not truncated:
        raise ValueError(
            f"the server sampled with top_k={teacher.top_k}, top_p={teacher.top_p}: its samples "
            "cover only the truncated distribution, and no unbiased estimate of the full KL "
            "exists from them. Serve without --top-k/--top-p, or pass truncated=True to distil "
            "towards the truncated distribution"
        )
    if _same(temperature, t_server):
        importance = False
    elif _same(temperature, 1.0) and not is_truncated:
        importance = True
    else:
        allowed = (
            f"{t_server:g} (the server's)"
            if is_truncated
            else f"{t_server:g} (the server's) or 1 (importance weighted)"
        )
        raise ValueError(
            f"cannot estimate the KL at temperature {temperature:g} from samples drawn at "
            f"temperature {t_server:g}: use temperature {allowed}, or serve with "
            f"--temperature {temperature:g}"
        )

    p_total = b * s
    if fmt == "sampled":
        n = int(teacher.indices.shape[-1])  # type: ignore[union-attr]
        rows = torch.arange(p_total, device=student.device).repeat_interleave(n)
        tokens = teacher.indices.reshape(-1)  # type: ignore[union-attr]
        weight = torch.full((rows.numel(),), 1.0 / max(n, 1), device=student.device)
    elif fmt == "compact":
        rows = teacher.position_of_entries().to(student.device)
        tokens = teacher.tokens.long()  # type: ignore[union-attr]
        counts = teacher.counts.float()  # type: ignore[union-attr]
        per_pos = torch.zeros(p_total, device=student.device).index_add_(0, rows, counts)
        weight = counts / per_pos.clamp(min=1)[rows]
    else:  # coo: one entry per sample, index (batch, sample, position, token)
        bi, _, si, tokens = teacher.coo_indices  # type: ignore[misc]
        rows = bi * s + si
        ones = torch.ones(rows.numel(), device=student.device)
        per_pos = torch.zeros(p_total, device=student.device).index_add_(0, rows, ones)
        weight = 1.0 / per_pos.clamp(min=1)[rows]
    tokens = tokens.long().reshape(-1)

    student_lp = _student_logq(student, rows, tokens, temperature)
    if not teacher.has_logprobs:  # a counts-only store: the cross-entropy part of the KL
        if importance:
            raise ValueError(
                f"this answer comes from a counts-only store (samples drawn at temperature "
                f"{t_server:g}, no log-probs kept): importance weighting to temperature "
                f"{temperature:g} needs the teacher's log-probs. Use temperature {t_server:g}, "
                "or record with level 'fp16' or 'lossless'"
            )
        _warn_cross_entropy_once()
        terms = -weight * student_lp
    else:
        sampled_lp = teacher.sampled_logprobs().reshape(-1).float()
        if importance:
            target_lp = teacher.teacher_logprobs().reshape(-1).float()
            weight = weight * torch.exp(target_lp - sampled_lp)
        else:
            target_lp = sampled_lp
        terms = weight * (target_lp - student_lp)
    per_position = torch.zeros(p_total, device=student.device, dtype=terms.dtype)
    per_position = per_position.index_add(0, rows, terms).reshape(b, s)
    return _reduce(per_position, m, reduction)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher: TeacherOutput,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    mask: Any = None,
) -> torch.Tensor:
    """KL(renormalised teacher top-k || student) at ``temperature`` from a ``topk`` answer:
    the teacher's k most likely tokens, their probabilities at ``temperature`` renormalised
    to sum to 1, against the student's full distribution at ``temperature``. Biased (the
    tail's mass is moved onto the head); offered to compare with `sampled_kd_loss`."""
    _check_common(student_logits, temperature, reduction)
    teacher = _as_teacher(teacher, student_logits)
    if teacher.format != "topk":
        raise ValueError(f"topk_kd_loss needs a 'topk' teacher answer, got {teacher.format!r}")
    b, s = teacher.batch_size, teacher.num_positions
    student = _align(student_logits, b, s, teacher.vocab_size)
    m = _position_mask(teacher.mask, mask, b, s)
    assert teacher.indices is not None and teacher.logprobs is not None  # the topk format's
    k = int(teacher.indices.shape[-1])
    target_lp = torch.log_softmax(teacher.logprobs.float() / temperature, dim=-1)
    rows = torch.arange(b * s, device=student.device).repeat_interleave(k)
    student_lp = _student_logq(
        student, rows, teacher.indices.reshape(-1).long(), temperature
    ).reshape(b, s, k)
    per_position = _kl_terms(target_lp, student_lp).sum(-1)
    return _reduce(per_position, m, reduction)


def full_kd_loss(
    student_logits: torch.Tensor,
    teacher: TeacherOutput | torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    mask: Any = None,
) -> torch.Tensor:
    """The exact KL(teacher || student) at ``temperature`` from dense teacher logits: a
    ``full`` answer, or a [B, S, V] logits tensor already aligned to the teacher's positions
    (then every position counts, unless ``mask`` says otherwise)."""
    _check_common(student_logits, temperature, reduction)
    if isinstance(teacher, torch.Tensor):
        if teacher.dim() != 3:
            raise ValueError(f"teacher logits must be [B, S, V], got shape {tuple(teacher.shape)}")
        logits = teacher.to(student_logits.device)
        teacher_mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    else:
        teacher = _as_teacher(teacher, student_logits)
        if teacher.format != "full":
            raise ValueError(f"full_kd_loss needs a 'full' teacher answer, got {teacher.format!r}")
        logits = teacher.logits  # type: ignore[assignment]
        teacher_mask = teacher.mask
    b, s, v = logits.shape
    student = _align(student_logits, b, s, v).float()
    m = _position_mask(teacher_mask, mask, b, s)
    target_lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    st = student / temperature if temperature != 1.0 else student
    student_lp = st[..., :v] - torch.logsumexp(st, dim=-1, keepdim=True)
    per_position = _kl_terms(target_lp, student_lp).sum(-1)
    return _reduce(per_position, m, reduction)
