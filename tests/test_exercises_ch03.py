"""Tests for the chapter 03 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import math

import pytest
import torch

from tinylm.course.exercises.ch03 import (
    reference_adamw_step,
    reference_clip_grad_norm,
    reference_cosine_lr,
    reference_training_step,
    reference_uniform_loss,
)
from tinylm.exercises import check, list_exercises, results
from tinylm.train import TrainConfig, lr_at

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------- learner answers
# The notebook's solutions (written independently of the references), then typical mistakes.


def uniform_loss(vocab_size):
    return math.log(vocab_size)


def uniform_loss_bits(vocab_size):
    return math.log2(vocab_size)


def uniform_loss_probability(vocab_size):
    return 1 / vocab_size


def cosine_lr(step, steps, lr, min_lr, warmup_steps):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def cosine_lr_warmup_from_zero(step, steps, lr, min_lr, warmup_steps):
    if step < warmup_steps:
        return lr * step / warmup_steps
    return cosine_lr(step, steps, lr, min_lr, warmup_steps)


def cosine_lr_to_zero(step, steps, lr, min_lr, warmup_steps):
    return cosine_lr(step, steps, lr, 0.0, warmup_steps)


def cosine_lr_one_step_late(step, steps, lr, min_lr, warmup_steps):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def clip_grad_norm(grads, max_norm):
    total = math.sqrt(sum(float((g**2).sum()) for g in grads))
    scale = min(1.0, max_norm / (total + 1e-6))
    return [g * scale for g in grads], total


def clip_each_tensor(grads, max_norm):
    clipped = [g * min(1.0, max_norm / (float(g.norm()) + 1e-6)) for g in grads]
    return clipped, math.sqrt(sum(float((g**2).sum()) for g in grads))


def clip_norm_after_clipping(grads, max_norm):
    clipped, _ = clip_grad_norm(grads, max_norm)
    return clipped, math.sqrt(sum(float((g**2).sum()) for g in clipped))


def adamw_step(param, grad, m, v, step, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    return param - lr * weight_decay * param - lr * update, m, v


def adam_l2(param, grad, m, v, step, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    return adamw_step(param, grad + weight_decay * param, m, v, step, lr, betas, eps, 0.0)


def adamw_no_bias_correction(
    param, grad, m, v, step, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
):
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    return param * (1 - lr * weight_decay) - lr * m / (v.sqrt() + eps), m, v


def training_step(model, optimizer, x, y, lr, grad_clip):
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item(), norm.item()


def step_without_zero_grad(model, optimizer, x, y, lr, grad_clip):
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item(), norm.item()


def step_clipping_after_the_update(model, optimizer, x, y, lr, grad_clip):
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    return loss.item(), norm.item()


def step_ignoring_lr(model, optimizer, x, y, lr, grad_clip):
    return training_step(model, optimizer, x, y, optimizer.defaults["lr"], grad_clip)


def step_returning_clipped_norm(model, optimizer, x, y, lr, grad_clip):
    loss, norm = training_step(model, optimizer, x, y, lr, grad_clip)
    return loss, min(norm, grad_clip)


def step_with_hand_written_clip(model, optimizer, x, y, lr, grad_clip):
    # right order, but a clip of its own (float64 norm): equal to rounding, not bit for bit
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    for g in grads:
        g.mul_(min(1.0, grad_clip / (norm + 1e-6)))
    optimizer.step()
    return loss.item(), norm


def stub(*args, **kwargs):
    raise NotImplementedError


# ----------------------------------------------------------------- pass / fail / not attempted


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch03.uniform_loss", uniform_loss),
        ("ch03.uniform_loss", reference_uniform_loss),
        ("ch03.cosine_lr", cosine_lr),
        ("ch03.cosine_lr", reference_cosine_lr),
        ("ch03.clip_grad_norm", clip_grad_norm),
        ("ch03.clip_grad_norm", reference_clip_grad_norm),
        ("ch03.adamw_step", adamw_step),
        ("ch03.adamw_step", reference_adamw_step),
        ("ch03.training_step", training_step),
        ("ch03.training_step", reference_training_step),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "fragment"),
    [
        ("ch03.uniform_loss", uniform_loss_bits, "bits"),
        ("ch03.uniform_loss", uniform_loss_probability, "-log"),
        ("ch03.cosine_lr", cosine_lr_warmup_from_zero, "(step + 1)"),
        ("ch03.cosine_lr", cosine_lr_to_zero, "not to 0"),
        ("ch03.cosine_lr", cosine_lr_one_step_late, "steps - 1"),
        ("ch03.clip_grad_norm", clip_each_tensor, "global norm"),
        ("ch03.clip_grad_norm", clip_norm_after_clipping, "before clipping"),
        ("ch03.adamw_step", adam_l2, "L2"),
        ("ch03.adamw_step", adamw_no_bias_correction, "beta1**step"),
        ("ch03.training_step", step_without_zero_grad, "zero_grad"),
        ("ch03.training_step", step_clipping_after_the_update, "too late"),
        ("ch03.training_step", step_ignoring_lr, "group['lr'] = lr"),
        ("ch03.training_step", step_returning_clipped_norm, "before clipping"),
        ("ch03.training_step", step_with_hand_written_clip, "bit for bit"),
    ],
)
def test_wrong_answers_fail_with_a_targeted_hint(exercise_id, answer, fragment, exercise):
    exercise.fails(exercise_id, answer, "Hint:", fragment)


def test_wrong_return_shapes_fail_clearly():
    assert check("ch03.clip_grad_norm", lambda grads, max_norm: grads) is False
    assert "pair (clipped_grads, norm)" in results()[-1].message
    assert check("ch03.adamw_step", lambda *a, **k: a[0]) is False
    assert "expected (param, m, v)" in results()[-1].message
    assert check("ch03.training_step", lambda *a: reference_training_step(*a)[0]) is False
    assert "a pair (loss, norm)" in results()[-1].message


@pytest.mark.parametrize(
    "exercise_id",
    [
        "ch03.uniform_loss",
        "ch03.cosine_lr",
        "ch03.clip_grad_norm",
        "ch03.adamw_step",
        "ch03.training_step",
    ],
)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_chapter_has_every_difficulty():
    ch03 = list_exercises(3)
    assert {ex.difficulty for ex in ch03} == {"warm-up", "core", "stretch"}
    assert len(ch03) >= 3


# ----------------------------------------------------------------- references agree with torch / lib


def test_reference_cosine_lr_is_lr_at():
    config = TrainConfig(steps=40, lr=2e-3, min_lr=1e-4, warmup_steps=4)
    got = [reference_cosine_lr(s, 40, 2e-3, 1e-4, 4) for s in range(40)]
    assert got == [lr_at(s, config) for s in range(40)]
    assert got[-1] == pytest.approx(1e-4) and max(got) == pytest.approx(2e-3)


def test_reference_clip_matches_torch():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g) * 4, torch.randn(7, generator=g)]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads, strict=True):
        p.grad = t.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped, ref_norm = reference_clip_grad_norm(grads, 1.0)
    assert ref_norm == pytest.approx(float(norm), rel=1e-6)
    for p, c in zip(params, clipped, strict=True):
        torch.testing.assert_close(p.grad, c)


def test_reference_adamw_matches_torch_over_several_steps():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(6, generator=g)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.3)
    param, m, v = p0.clone(), torch.zeros(6), torch.zeros(6)
    for step in range(1, 6):
        grad = torch.randn(6, generator=g)
        p.grad = grad.clone()
        opt.step()
        param, m, v = reference_adamw_step(param, grad, m, v, step, 0.05, (0.9, 0.95), 1e-8, 0.3)
        torch.testing.assert_close(param, p.detach())


# ----------------------------------------------------------------- the notebook and the grading fixture


def test_notebook_solutions_pass_and_the_grading_fixture_fails_with_its_hints():
    from pathlib import Path

    import nbformat

    from tinylm.course.classroom import is_solution

    root = Path(__file__).resolve().parents[1]
    notebook = nbformat.read(root / "notebooks" / "03_training.ipynb", as_version=4)
    solutions: dict = {"math": math, "torch": torch, "F": torch.nn.functional}
    for cell in notebook.cells:
        if is_solution(cell):
            exec(cell.source, solutions)
    wrong: dict = {}
    fixture = root / "tests" / "fixtures" / "classroom" / "ch03_wrong_answers.py"
    exec(fixture.read_text(encoding="utf-8"), wrong)
    ids = sorted(ex.id for ex in list_exercises(3))
    assert sorted(wrong["HINTS"]) == ids
    for exercise_id in ids:
        name = exercise_id.split(".")[1]
        assert check(exercise_id, solutions[name]) is True, results()[-1].message
        assert check(exercise_id, wrong[name]) is False
        assert wrong["HINTS"][exercise_id] in results()[-1].message
