"""Checks for notebook 03, "Training".

The inputs are chosen so that the typical mistakes give a different answer: a loss in bits
instead of nats, a warm-up that starts at 0 or a cosine that ends one step late, clipping
each tensor on its own instead of by the global norm, Adam with an L2 penalty (weight
decay added to the gradient) instead of AdamW's decoupled decay, and a training step that
forgets zero_grad, clips too late or not at all, or ignores the schedule's learning rate.
"""

from __future__ import annotations

import math
from typing import Any

from tinylm.course.exercises.core import (
    Fail,
    call,
    case_seed,
    check_cases,
    exercise,
    expect_close,
    is_close,
    unseen,
)

# torch and tinylm.train are imported inside the functions: listing the exercises of all
# chapters should not pay for importing torch.


def _describe(value: Any) -> str:
    if isinstance(value, tuple | list):
        kinds = ", ".join(type(v).__name__ for v in value[:3])
        return (
            f"a {type(value).__name__} of {len(value)} ({kinds}{', ...' if len(value) > 3 else ''})"
        )
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- warm-up


def reference_uniform_loss(vocab_size: int) -> float:
    """Cross-entropy (nats per token) of a model that gives every token probability 1/V."""
    return math.log(vocab_size)


def _uniform_hint(got: Any, expected: Any, args: Any) -> str | None:
    V = args
    if is_close(got, math.log2(V)):
        return "that is in bits (log2); PyTorch's cross_entropy uses the natural log (nats)"
    if is_close(got, math.log10(V)):
        return "use the natural logarithm, math.log"
    if is_close(got, 1 / V):
        return "1/V is the probability of each token; the loss is -log of that probability"
    if is_close(got, -math.log(V)):
        return "the loss is -log p = -log(1/V), a positive number"
    return "every token has p = 1/V, and the loss is -log p averaged over tokens"


@exercise("ch03.uniform_loss", difficulty="warm-up", title="The loss of a uniform model")
def _check_uniform_loss(answer: Any) -> str:
    sizes = [2, 512, 1024, 50_257, 128_256] + unseen(lambda r: r.randint(2, 300_000))
    cases = [(V, reference_uniform_loss(V)) for V in sizes]
    return check_cases(answer, cases, rel=1e-9, hint=_uniform_hint)


# --------------------------------------------------------------------------- core: schedule


def reference_cosine_lr(
    step: int, steps: int, lr: float, min_lr: float, warmup_steps: int
) -> float:
    """The learning rate of update `step` (0-based): tinylm.train.lr_at with these settings."""
    from tinylm.train import TrainConfig, lr_at

    config = TrainConfig(steps=steps, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps)
    return lr_at(step, config)


_LR_CASES = [
    # (step, steps, lr, min_lr, warmup_steps): warm-up start and end, middle, last step, none
    (0, 100, 1e-3, 1e-4, 10),
    (4, 100, 1e-3, 1e-4, 10),
    (9, 100, 1e-3, 1e-4, 10),
    (10, 100, 1e-3, 1e-4, 10),
    (54, 100, 1e-3, 1e-4, 10),
    (70, 100, 1e-3, 1e-4, 10),
    (99, 100, 1e-3, 1e-4, 10),
    (0, 50, 3e-3, 0.0, 0),
    (30, 50, 3e-3, 0.0, 0),
    (49, 50, 3e-3, 3e-4, 5),
]


def _lr_case(r: Any) -> tuple[int, int, float, float, int]:
    """A random (step, steps, lr, min_lr, warmup_steps) for the unseen inputs."""
    steps = r.randint(10, 2000)
    warmup = r.choice((0, r.randint(1, steps // 3)))
    lr = r.uniform(1e-4, 1e-2)
    return r.randint(0, steps - 1), steps, lr, r.choice((0.0, 0.1 * lr)), warmup


def _lr_hint(got: Any, expected: Any, args: Any) -> str | None:
    step, steps, lr, min_lr, warmup = args
    if warmup and step < warmup:
        if is_close(got, lr * step / warmup):
            return (
                "during warm-up use (step + 1) / warmup_steps: update 0 must already move the "
                "weights, and update warmup_steps - 1 reaches the peak"
            )
        return "warm-up rises linearly: lr * (step + 1) / warmup_steps"
    span = steps - 1 - warmup
    progress = (step - warmup) / span if span > 0 else 1.0
    if span + 1 > 0 and is_close(got, min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (span + 1))) * (lr - min_lr)):  # fmt: skip
        return (
            "the decay should reach min_lr exactly at the last update, step = steps - 1: "
            "progress = (step - warmup_steps) / (steps - 1 - warmup_steps)"
        )
    if is_close(got, 0.5 * (1 + math.cos(math.pi * progress)) * lr):
        return "the cosine decays from lr to min_lr, not to 0: min_lr + 0.5 (1 + cos) (lr - min_lr)"
    if is_close(got, lr - progress * (lr - min_lr)):
        return "that is a linear decay; use 0.5 * (1 + cos(pi * progress))"
    return "after warm-up: min_lr + 0.5 * (1 + cos(pi * progress)) * (lr - min_lr)"


@exercise("ch03.cosine_lr", difficulty="core", title="Warm-up plus cosine decay")
def _check_cosine_lr(answer: Any) -> str:
    cases = [(args, reference_cosine_lr(*args)) for args in _LR_CASES + unseen(_lr_case, n=6)]
    return check_cases(answer, cases, rel=1e-9, abs_tol=1e-15, hint=_lr_hint)


# --------------------------------------------------------------------------- core: clipping


def reference_clip_grad_norm(grads: list, max_norm: float) -> tuple[list, float]:
    """(clipped copies of grads, their global L2 norm before clipping), like PyTorch's.

    The norm is taken over all tensors together, as if they were one long vector; if it
    exceeds max_norm every tensor is scaled by the same factor max_norm / norm, so the
    update keeps its direction and only its length shrinks.
    """
    import torch

    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * scale for g in grads], float(norm)


def _clip_inputs() -> list[tuple[list, float]]:
    import torch

    g = torch.Generator().manual_seed(case_seed(3))
    big = [torch.randn(4, 3, generator=g) * 2, torch.randn(5, generator=g) * 3]
    small = [torch.randn(2, 2, generator=g) * 0.01, torch.randn(3, generator=g) * 0.01]
    # one big tensor and a small one: clipping each on its own would change the direction
    mixed = [torch.randn(6, 6, generator=g) * 5, torch.randn(4, generator=g) * 0.1]
    return [(big, 1.0), (small, 1.0), (mixed, 0.5), (big, 100.0)]


@exercise("ch03.clip_grad_norm", difficulty="core", title="Gradient clipping by the global norm")
def _check_clip_grad_norm(answer: Any) -> str:
    import torch

    for grads, max_norm in _clip_inputs():
        args = ([t.clone() for t in grads], max_norm)
        result = call(answer, *args)
        what = f"clip_grad_norm(<{len(grads)} tensors>, max_norm={max_norm})"
        if not (
            isinstance(result, tuple | list)
            and len(result) == 2
            and isinstance(result[0], tuple | list)
        ):
            raise Fail(
                f"{what} returned {_describe(result)}; expected a pair (clipped_grads, norm) "
                "with clipped_grads a list of tensors"
            )
        clipped, norm = result
        want_clipped, want_norm = reference_clip_grad_norm(grads, max_norm)
        per_tensor = [
            t * min(1.0, max_norm / (float(torch.linalg.vector_norm(t)) + 1e-6)) for t in grads
        ]
        expect_close(
            norm,
            want_norm,
            rel=1e-5,
            what=f"the norm returned by {what}",
            hint=(
                "the norm is taken before clipping, over all tensors together: "
                "sqrt(sum of squares of every element of every tensor)"
            ),
        )
        if len(clipped) != len(grads):
            raise Fail(f"{what} returned {len(clipped)} clipped tensors; expected {len(grads)}")
        for i, (got, want) in enumerate(zip(clipped, want_clipped, strict=True)):
            hint = (
                "clip by the global norm: one scale factor max_norm / total_norm for every "
                "tensor, not a separate one per tensor (that would change the update's direction)"
                if all(
                    torch.allclose(torch.as_tensor(c), p, rtol=1e-4, atol=1e-7)
                    for c, p in zip(clipped, per_tensor, strict=True)
                )
                else "scale every tensor by min(1, max_norm / total_norm)"
            )
            expect_close(
                got, want, rel=1e-4, abs_tol=1e-7, what=f"clipped tensor {i} of {what}", hint=hint
            )
    return "norms and clipped gradients match torch.nn.utils.clip_grad_norm_ in 4 cases"


# --------------------------------------------------------------------------- stretch: AdamW


def reference_adamw_step(
    param: Any,
    grad: Any,
    m: Any,
    v: Any,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
) -> tuple[Any, Any, Any]:
    """One AdamW update (Loshchilov & Hutter); returns new (param, m, v). `step` counts from 1."""
    b1, b2 = betas
    param = param * (1 - lr * weight_decay)  # decoupled decay: shrink the weights directly
    m = b1 * m + (1 - b1) * grad  # running mean of the gradient
    v = b2 * v + (1 - b2) * grad * grad  # running mean of its square
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)  # undo the bias toward the zero start
    return param - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _adam_l2_step(param, grad, m, v, step, lr, betas, eps, weight_decay):
    return reference_adamw_step(param, grad + weight_decay * param, m, v, step, lr, betas, eps, 0.0)


def _adam_no_bias_correction(param, grad, m, v, step, lr, betas, eps, weight_decay):
    b1, b2 = betas
    param = param * (1 - lr * weight_decay)
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    return param - lr * m / (v.sqrt() + eps), m, v


def _torch_adamw_trajectory(param0: Any, grads: list, lr: float, betas, eps, wd) -> list:
    import torch

    p = torch.nn.Parameter(param0.clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    out = []
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


@exercise("ch03.adamw_step", difficulty="stretch", title="One AdamW update by hand")
def _check_adamw_step(answer: Any) -> str:
    import torch

    g = torch.Generator().manual_seed(case_seed(7))
    lr, betas, eps, wd = 0.01, (0.9, 0.95), 1e-8, 0.5  # a big decay makes L2 vs AdamW visible
    param0 = torch.randn(3, 4, generator=g)
    grads = [torch.randn(3, 4, generator=g) * s for s in (1.0, 0.1, 3.0, 0.5, 1.0)]
    expected = _torch_adamw_trajectory(param0, grads, lr, betas, eps, wd)
    mistakes = [
        (
            _adam_l2_step,
            "that is Adam with an L2 penalty (weight_decay * param added to the gradient); "
            "AdamW decays the weights directly: param = param * (1 - lr * weight_decay)",
        ),
        (
            _adam_no_bias_correction,
            "divide m by (1 - beta1**step) and v by (1 - beta2**step): both start at zero, "
            "so without this correction the first updates are far too small or too large",
        ),
    ]
    param, m, v = param0.clone(), torch.zeros_like(param0), torch.zeros_like(param0)
    for step, (grad, want) in enumerate(zip(grads, expected, strict=True), start=1):
        args = (param.clone(), grad.clone(), m.clone(), v.clone(), step, lr)
        kwargs = dict(betas=betas, eps=eps, weight_decay=wd)
        result = call(answer, *args, **kwargs)
        what = f"adamw_step(..., step={step}, lr={lr}, weight_decay={wd})"
        if not (isinstance(result, tuple | list) and len(result) == 3):
            raise Fail(f"{what} returned {type(result).__name__}; expected (param, m, v)")
        got = torch.as_tensor(result[0])
        hint = None
        for wrong, message in mistakes:
            if torch.allclose(got, wrong(*args, **kwargs)[0], rtol=1e-5, atol=1e-7):
                hint = message
        expect_close(
            got,
            want,
            rel=1e-5,
            abs_tol=1e-6,
            what=f"the parameter after {what} (compared with torch.optim.AdamW)",
            hint=hint or "decay, then update m and v, correct their bias, then take the step",
        )
        param, m, v = got, torch.as_tensor(result[1]), torch.as_tensor(result[2])
    return "5 updates in a row match torch.optim.AdamW"


# --------------------------------------------------------------------------- core: a training step


def reference_training_step(
    model: Any, optimizer: Any, x: Any, y: Any, lr: float, grad_clip: float
) -> tuple[float, float]:
    """One update, exactly as tinylm.train.train does it; returns (loss, norm before clipping).

    Set this step's lr, forward, cross-entropy, forget the last step's gradients, backward,
    clip by the global norm, AdamW step. The order matters bit for bit: clipping before the
    step, and the gradients zeroed before backward (else they add up over steps). It is the
    library's own step, tinylm.train.training_step, so the two cannot drift apart.
    """
    from tinylm.train import training_step

    result = training_step(model, optimizer, x, y, lr, grad_clip)
    return result.loss, result.grad_norm


def _step_without_zero_grad(model, optimizer, x, y, lr, grad_clip):
    import torch
    import torch.nn.functional as F

    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item(), norm.item()


def _step_without_clipping(model, optimizer, x, y, lr, grad_clip):
    return reference_training_step(model, optimizer, x, y, lr, float("inf"))


def _step_ignoring_lr(model, optimizer, x, y, lr, grad_clip):
    return reference_training_step(model, optimizer, x, y, optimizer.defaults["lr"], grad_clip)


_STEP_MISTAKES = [
    (
        _step_without_zero_grad,
        "the gradients of earlier steps were added to this one's: .backward() accumulates "
        "into .grad, so call optimizer.zero_grad() before loss.backward() in every step",
    ),
    (
        _step_without_clipping,
        "the update used the unclipped gradient: call torch.nn.utils.clip_grad_norm_("
        "model.parameters(), grad_clip) after loss.backward() and before optimizer.step() "
        "(clipping after the step is too late)",
    ),
    (
        _step_ignoring_lr,
        "the step used the optimizer's initial learning rate: set group['lr'] = lr for every "
        "group in optimizer.param_groups before optimizer.step()",
    ),
]

_STEP_SETUP = dict(vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=32)
_STEP_TRAIN = dict(
    steps=20, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, grad_clip=0.5, seed=5
)
_STEP_COUNT = 3


def _step_world(data_seed: int = 11) -> tuple[Any, Any, Any]:
    """(data, GPTConfig, TrainConfig) of the check: a tiny model on random token ids."""
    import torch

    from tinylm.data import TokenSplits
    from tinylm.model import GPTConfig
    from tinylm.train import TrainConfig

    g = torch.Generator().manual_seed(data_seed)
    train = torch.randint(0, _STEP_SETUP["vocab_size"], (2_000,), generator=g)
    val = torch.randint(0, _STEP_SETUP["vocab_size"], (200,), generator=g)
    data = TokenSplits(train, val, 4 * len(train), 4 * len(val))
    return data, GPTConfig(**_STEP_SETUP), TrainConfig(**_STEP_TRAIN, device="cpu")


def _library_trajectory(data_seed: int = 11) -> tuple[list[dict], list[dict]]:
    """The weights after each of the first _STEP_COUNT steps of tinylm.train.train, and its records."""
    import torch

    from tinylm.model import GPT
    from tinylm.train import train

    data, config, train_config = _step_world(data_seed)
    torch.manual_seed(0)
    model = GPT(config)
    snapshots: list[dict] = []

    def snapshot(record: dict) -> None:
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    history = train(
        model, data, train_config, callback=snapshot, progress=False, stop_at=_STEP_COUNT
    )
    return snapshots, list(history)


def _run_steps(
    step_fn: Any, n_steps: int, learner: bool, data_seed: int = 11
) -> tuple[list[dict], list]:
    """Apply step_fn n_steps times the way train() does: same init, optimizer, batches, lr."""
    import torch

    from tinylm.data import get_batch
    from tinylm.model import GPT
    from tinylm.train import lr_at, make_optimizer

    data, config, train_config = _step_world(data_seed)
    torch.manual_seed(0)
    model = GPT(config).train()
    optimizer = make_optimizer(model, train_config)
    batches = torch.Generator().manual_seed(train_config.seed)
    snapshots, returns = [], []
    for step in range(n_steps):
        x, y = get_batch(data.train, train_config.batch_size, config.context_length, batches)
        lr = lr_at(step, train_config)
        args = (model, optimizer, x, y, lr, train_config.grad_clip)
        returns.append(call(step_fn, *args) if learner else step_fn(*args))
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snapshots, returns


def _same_weights(a: dict, b: dict, exact: bool = True) -> bool:
    import torch

    if exact:
        return all(torch.equal(a[k], b[k]) for k in b)
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in b)


@exercise("ch03.training_step", difficulty="core", title="One training step, bit for bit")
def _check_training_step(answer: Any) -> str:
    data_seed = case_seed(11)  # once: the library's run and the learner's see the same data
    expected, records = _library_trajectory(data_seed)
    got, returns = _run_steps(answer, _STEP_COUNT, learner=True, data_seed=data_seed)
    for step, (mine, want, value, record) in enumerate(
        zip(got, expected, returns, records, strict=True), start=1
    ):
        what = f"after step {step} (lr {record['lr']:.2e}, grad_clip {_STEP_TRAIN['grad_clip']})"
        if not (isinstance(value, tuple | list) and len(value) == 2):
            raise Fail(
                f"training_step returned {_describe(value)} at step {step}; expected a pair "
                "(loss, norm) of numbers"
            )
        if not _same_weights(mine, want):
            hint = None
            for wrong, message in _STEP_MISTAKES:
                if _same_weights(
                    mine, _run_steps(wrong, step, learner=False, data_seed=data_seed)[0][-1]
                ):
                    hint = message
                    break
            if hint is None and _same_weights(mine, want, exact=False):
                hint = (
                    "your weights agree to rounding but not bit for bit: use the library's "
                    "pieces in its order (F.cross_entropy on the float logits, "
                    "torch.nn.utils.clip_grad_norm_, optimizer.step()); a hand-written "
                    "clip or update rounds differently"
                )
            raise Fail(
                f"the weights {what} differ from tinylm.train.train's",
                hint=hint or "forward, loss, zero_grad, backward, clip, step: in this order",
            )
        loss, norm = value
        expect_close(
            loss,
            record["train_loss"],
            rel=1e-6,
            what=f"the loss returned at step {step}",
            hint="return loss.item(), the loss of this step's batch before the update",
        )
        expect_close(
            norm,
            record["grad_norm"],
            rel=1e-6,
            what=f"the gradient norm returned at step {step}",
            hint=(
                "return the norm before clipping: the value torch.nn.utils.clip_grad_norm_ "
                "returns, not grad_clip"
            ),
        )
    return (
        f"{_STEP_COUNT} steps give bit-identical weights to tinylm.train.train "
        "(clipping was active), and the same loss and gradient norm"
    )
