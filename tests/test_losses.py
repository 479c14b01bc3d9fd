"""Distillation losses: the sampled estimator is unbiased in value and gradient, the seed's loss
is not, and alignment, masking, temperatures and truncation behave as documented."""

from __future__ import annotations

import pytest
import torch

from sensai.formats import OutputBuilder, TeacherOutput
from sensai.losses import full_kd_loss, sampled_kd_loss, teacher_from_batch, topk_kd_loss

V = 40  # vocabulary
S = 3  # distinct teacher distributions (positions)
R = 1500  # independent draws of each
N = 8  # samples per draw


def _teacher_logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, V, generator=g) * 2.0


def _student_logits(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, V, generator=g) * 1.5


def _draws(
    fmt: str, logits: torch.Tensor, temperature: float, seed: int = 5, **kw
) -> TeacherOutput:
    """R independent teacher answers for the same S distributions: batch R x S positions."""
    builder = OutputBuilder(
        fmt,
        R,
        S,
        V,
        num_samples=N,
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    builder.add(logits.repeat(R, 1))
    return builder.finish(torch.ones(R, S, dtype=torch.bool))


def _exact_grad(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """d KL(softmax(t/tau) || softmax(s/tau)) / d s = (q - p) / tau, per position."""
    return (torch.softmax(student / tau, -1) - torch.softmax(teacher / tau, -1)) / tau


def _per_draw_grads(loss_fn, teacher_out: TeacherOutput, tau: float) -> torch.Tensor:
    """[R, S, V] gradients of each draw's loss w.r.t. its own copy of the student logits."""
    student = _student_logits().repeat(R, 1, 1).requires_grad_(True)
    loss_fn(student, teacher_out, tau).backward()
    return student.grad


def _z_scores(grads: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|mean - exact| in standard errors. A token too rare to be drawn in R * N samples has a
    standard error of 0 while its gradient is off by its probability (< ~1e-4): the floor."""
    mean = grads.mean(0)
    se = grads.std(0) / R**0.5
    return (mean - exact).abs() / se.clamp(min=1e-4)


def _sampled_sum(student, teacher, tau):
    return sampled_kd_loss(student, teacher, tau, reduction="sum")


def _seed_loss_sum(student, teacher, tau):
    """The seed example's loss: a softmax over the N sampled logits of the teacher against one
    over the student's logits at the same N tokens (repeats double-count, the tail is lost)."""
    idx = teacher.indices  # [B, S, N]
    p = torch.softmax(teacher.values / tau, -1)
    lq = torch.log_softmax(student.gather(-1, idx) / tau, -1)
    return (p * (torch.log(p) - lq)).sum()


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize(
    ("fmt", "server_t", "tau"),
    [
        ("sampled", 1.0, 1.0),
        ("compact", 1.0, 1.0),
        ("sampled", 2.0, 2.0),  # another temperature, counts as weights
        ("compact", 2.0, 2.0),
        ("sampled", 1.5, 1.0),  # distil at 1 from samples at 1.5: importance weights
        ("compact", 1.6, 1.0),
        ("coo", 1.0, 1.0),  # the third format sampled_kd_loss takes
        ("coo", 2.0, 2.0),
        ("coo", 1.4, 1.0),
    ],
)
def test_mean_sampled_gradient_matches_the_full_kl_gradient(fmt, server_t, tau) -> None:
    t = _teacher_logits()
    out = _draws(fmt, t, server_t)
    grads = _per_draw_grads(_sampled_sum, out, tau)
    z = _z_scores(grads, _exact_grad(_student_logits(), t, tau))
    assert z.max() < 4.0, f"max |z| = {z.max():.2f} over {z.numel()} coordinates"


def test_the_seeds_loss_fails_the_same_gradient_test() -> None:
    t = _teacher_logits()
    out = _draws("sampled", t, 1.0)
    grads = _per_draw_grads(_seed_loss_sum, out, 1.0)
    z = _z_scores(grads, _exact_grad(_student_logits(), t, 1.0))
    assert z.max() > 4.0  # the test can tell a biased gradient from an unbiased one
    # ... and it is not a near miss: the bias is many standard errors wide.
    assert z.max() > 20.0, f"max |z| = {z.max():.2f}"


@pytest.mark.parametrize(("server_t", "tau"), [(1.0, 1.0), (2.0, 2.0), (1.5, 1.0)])
def test_mean_sampled_loss_is_the_full_kl(server_t, tau) -> None:
    t = _teacher_logits()
    out = _draws("compact", t, server_t)
    student = _student_logits().repeat(R, 1, 1)
    values = sampled_kd_loss(student, out, tau, reduction="none")  # [R, S]
    exact = full_kd_loss(student[:1], t[None], tau, reduction="none")[0]  # [S]
    z = (values.mean(0) - exact).abs() / (values.std(0) / R**0.5)
    assert z.max() < 4.0, (values.mean(0), exact)


@pytest.mark.parametrize("fmt", ["sampled", "compact", "coo"])
@pytest.mark.parametrize(("server_t", "tau"), [(1.0, 1.0), (2.0, 2.0), (0.5, 1.0)])
def test_loss_is_zero_when_the_student_is_the_teacher(fmt, server_t, tau) -> None:
    # Each sample's term is log p(x) - log q(x), exactly 0 for q = p: no sampling noise
    # at all, only float rounding.
    t = _teacher_logits()
    out = _draws(fmt, t, server_t)
    student = t.repeat(R, 1, 1).requires_grad_(True)
    loss = sampled_kd_loss(student, out, tau)
    assert abs(loss.item()) < 1e-5
    loss.backward()
    # The gradient is not 0 per draw (sum_x w(x) (q - e_x) fluctuates), only on average.
    assert student.grad.mean(0).abs().max() < 0.02


# ----------------------------------------------------------------------- the other losses


def test_full_kd_loss_is_torchs_kl_div() -> None:
    t, s = _teacher_logits()[None], _student_logits()[None]
    for tau in (1.0, 3.0):
        ref = (
            torch.nn.functional.kl_div(
                torch.log_softmax(s / tau, -1),
                torch.log_softmax(t / tau, -1),
                log_target=True,
                reduction="sum",
            )
            / S
        )
        torch.testing.assert_close(full_kd_loss(s, t, tau), ref)
    assert full_kd_loss(t, t).abs() < 1e-6


def test_full_kd_loss_takes_a_full_answer_and_a_padded_student_vocabulary() -> None:
    t, s = _teacher_logits(), _student_logits()
    builder = OutputBuilder("full", 1, S, V)
    builder.add(t)
    out = builder.finish(torch.ones(1, S, dtype=torch.bool))
    padded = torch.cat([s, torch.full((S, 8), -1.0)], -1)[None]  # 8 extra student tokens
    lq = torch.log_softmax(padded[0], -1)[:, :V]
    p = torch.softmax(t, -1)
    ref = (p * (p.log() - lq)).sum(-1).mean()
    torch.testing.assert_close(full_kd_loss(padded, out), ref)
    # The sampled estimate uses the same (padded) normaliser.
    sampled = _draws("compact", t, 1.0)
    est = sampled_kd_loss(padded.repeat(R, 1, 1), sampled, reduction="none").mean(0).mean()
    assert abs(est - ref) < 0.05


def test_topk_kd_loss_renormalises_the_head() -> None:
    t, s = _teacher_logits(), _student_logits()
    k, tau = 5, 2.0
    builder = OutputBuilder("topk", 1, S, V, topk=k)
    builder.add(t)
    out = builder.finish(torch.ones(1, S, dtype=torch.bool))
    top = t.topk(k, -1)
    p = torch.softmax(top.values / tau, -1)
    lq = torch.log_softmax(s / tau, -1).gather(-1, top.indices)
    ref = (p * (p.log() - lq)).sum(-1).mean()
    torch.testing.assert_close(topk_kd_loss(s[None], out, tau), ref)
    # Biased: not the full KL, even in expectation.
    assert abs(ref - full_kd_loss(s[None], t[None], tau)) > 0.05


# ------------------------------------------------------------------ masks and alignment


@pytest.mark.parametrize("fmt", ["sampled", "compact", "coo"])
def test_masked_positions_contribute_nothing(fmt) -> None:
    t = _teacher_logits()
    builder = OutputBuilder(fmt, 2, S, V, num_samples=N, generator=torch.Generator().manual_seed(0))
    builder.add(t.repeat(2, 1))
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, 1:] = False  # padding
    out = builder.finish(mask)
    student = _student_logits().repeat(2, 1, 1).requires_grad_(True)
    loss = sampled_kd_loss(student, out)
    loss.backward()
    assert student.grad[1, 1:].abs().max() == 0
    per = sampled_kd_loss(student.detach(), out, reduction="none")
    assert (per[1, 1:] == 0).all()
    torch.testing.assert_close(loss.detach(), per[mask].mean())
    # Garbage at padded positions changes nothing.
    noisy = student.detach().clone()
    noisy[1, 1:] = torch.randn(S - 1, V) * 100
    torch.testing.assert_close(sampled_kd_loss(noisy, out), loss.detach())
    # A user mask restricts further, in the teacher's or the input's shape.
    user = torch.ones(2, S + 1, dtype=torch.bool)
    user[0, 0] = False
    masked = sampled_kd_loss(student.detach(), out, mask=user)
    torch.testing.assert_close(masked, per[mask & user[:, :S]].mean())


def test_the_model_itself_has_zero_loss_at_every_aligned_position(tiny_teacher) -> None:
    """Teacher position i pairs with the student's position i for the same input_ids, with
    and without padding, and for a one-token request."""
    model = tiny_teacher.model
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 9, 10, 11, 0, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        student = model(input_ids=ids, attention_mask=am).logits  # [B, 6, V]
    full = tiny_teacher.compute(ids, am, output_format="full")
    assert full.logits.shape[1] == ids.shape[1] - 1
    assert full_kd_loss(student, full) < 1e-5
    per = full_kd_loss(student, full, reduction="none")
    assert (per[1, 4:] == 0).all()  # padded positions
    # Off by one position, the loss is large: the alignment matters.
    assert full_kd_loss(student[:, 1:], full) > 0.1
    sampled = tiny_teacher.compute(ids, am, output_format="compact", seed=3)
    assert sampled_kd_loss(student, sampled).abs() < 1e-5
    one = torch.tensor([[5]])
    with torch.no_grad():
        student_one = model(input_ids=one).logits  # [1, 1, V]
    out_one = tiny_teacher.compute(one, output_format="sampled", seed=1)
    assert out_one.num_positions == 1
    assert sampled_kd_loss(student_one, out_one).abs() < 1e-5


# ------------------------------------------------------------------------ refusals


def test_truncated_samples_are_refused_unless_asked_for() -> None:
    t = _teacher_logits()
    out = _draws("compact", t, 1.0, top_k=5)
    student = _student_logits().repeat(R, 1, 1)
    with pytest.raises(ValueError, match="truncated distribution.*truncated=True"):
        sampled_kd_loss(student, out)
    # With truncated=True the target is the renormalised top-5 distribution: its KL.
    est = sampled_kd_loss(student, out, truncated=True, reduction="none").mean(0)
    top = t.topk(5, -1)
    p = torch.softmax(top.values, -1)
    lq = torch.log_softmax(_student_logits(), -1).gather(-1, top.indices)
    exact = (p * (p.log() - lq)).sum(-1)
    torch.testing.assert_close(est, exact, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="temperature 2 from samples drawn at temperature 1"):
        sampled_kd_loss(student, out, 2.0, truncated=True)
    top_p = _draws("sampled", t, 1.0, top_p=0.9)
    with pytest.raises(ValueError, match="top_p=0.9"):
        sampled_kd_loss(student, top_p)


def test_temperatures_without_exact_weights_are_refused() -> None:
    out = _draws("sampled", _teacher_logits(), 0.7)
    student = _student_logits().repeat(R, 1, 1)
    with pytest.raises(ValueError, match=r"temperature 2 .* drawn at temperature 0.7.*or 1"):
        sampled_kd_loss(student, out, 2.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, o: sampled_kd_loss(s[:, :1], o), "has 1 positions, but the teacher answered 3"),
        (lambda s, o: sampled_kd_loss(s[:5], o), "batch size 5"),
        (lambda s, o: sampled_kd_loss(s[..., :10], o), "vocabulary of 10, smaller than"),
        (lambda s, o: sampled_kd_loss(s[0], o), "must be 3-D"),
        (lambda s, o: sampled_kd_loss(s.long(), o), "floating-point"),
        (lambda s, o: sampled_kd_loss(s, o, 0.0), "temperature must be a finite number > 0"),
        (lambda s, o: sampled_kd_loss(s, o, reduction="batchmean"), "reduction must be one of"),
        (lambda s, o: full_kd_loss(s, o), "needs a 'full' teacher answer"),
        (lambda s, o: topk_kd_loss(s, o), "needs a 'topk' teacher answer"),
        (lambda s, o: sampled_kd_loss(s, o, mask=torch.ones(2, 2)), "mask must be"),
        (lambda s, o: sampled_kd_loss(s, {"input_ids": 1}), "holds no teacher answer"),
    ],
)
def test_bad_arguments_say_what_was_expected(call, message) -> None:
    out = _draws("sampled", _teacher_logits(), 1.0)
    student = _student_logits().repeat(R, 1, 1)
    with pytest.raises((ValueError, TypeError), match=message):
        call(student, out)


def test_the_loss_takes_a_collated_batch() -> None:
    out = _draws("sampled", _teacher_logits(), 1.0)
    batch = {"input_ids": None, "teacher_logits_output": out}
    assert teacher_from_batch(batch) is out
    assert teacher_from_batch({}) is None
    student = _student_logits().repeat(R, 1, 1)
    torch.testing.assert_close(sampled_kd_loss(student, batch), sampled_kd_loss(student, out))
