"""Muon for the hidden matrices, AdamW for everything else: the default recipe's optimizer.

AdamW (torch.optim.AdamW) scales every weight's step by its own gradient history. Muon
(Jordan et al., 2024; Moonshot AI trained Kimi K2 with a variant of it) treats a weight
matrix as a matrix: it keeps a momentum of the gradient, as SGD does, then replaces that
momentum matrix M = U S V^T by its orthogonal part U V^T (every singular value set to 1)
before stepping. A raw gradient is dominated by a few directions (a few large singular
values); orthogonalising gives the rare directions an equal share of the step, the usual
explanation of why Muon needs fewer steps. What it buys here is measured, not assumed:
chapter 03's ablation table and tests/benchmarks/bench_floor_gap.py (default recipe, embedding
at the common lr: 1.17-1.18x the entropy floor on unseen stories after 900 steps, 1.27x with
AdamW; the comment on tinylm.recipes.RECIPES has the figures). U V^T comes from
five Newton-Schulz iterations, a few small matrix products, not from an SVD.

Muon is for 2-D weights that act on hidden vectors (attention and MLP projections). The
embedding (a lookup table), the output head and the norms' gains keep AdamW, as in
Muon's reference setup. `MuonWithAdamW` runs both as one torch.optim.Optimizer, so a
training step, a learning-rate schedule and a checkpoint treat it like any other: every
group reads the same `lr`, because Muon's step is rescaled to AdamW's typical size
(0.2 * sqrt(max(rows, cols)), Moonshot's "match the RMS of AdamW" rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

# Coefficients of the quintic Newton-Schulz iteration tuned by Muon's authors to push the
# singular values of a normalised matrix towards 1 in five steps (they land near 1, in
# about [0.5, 1.3] by tests/test_optim.py: close enough for an update direction, much
# cheaper than an exact SVD).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T for matrix = U S V^T: Newton-Schulz iterations, no SVD.

    The matrix is first scaled to Frobenius norm 1, which puts every singular value in
    (0, 1]; each iteration X <- aX + b(XX^T)X + c(XX^T)^2 X then maps each singular value s
    to a s + b s^3 + c s^5 and leaves U and V alone. Works on the short side (X X^T is the
    small Gram matrix). A stack of matrices [..., rows, cols] is orthogonalised matrix by
    matrix in one batched product per step (the optimizer stacks same-shaped weights).
    """
    if matrix.dim() < 2:
        raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = matrix / (matrix.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def embedding_tables(model: nn.Module) -> list[Tensor]:
    """The weights of the model's nn.Embedding lookup tables, except one tied to the head.

    A table row gets a gradient only from the positions where its token occurs, so the
    table learns from far fewer updates than a matrix every token goes through; make_optimizer
    can give it a larger learning rate (TrainConfig.embedding_lr_scale). A table tied to the
    output head (model.lm_head) is also the head, which every position trains: not listed.
    """
    return _weights_except_the_head(model, nn.Embedding)


def hidden_matrices(model: nn.Module) -> list[Tensor]:
    """The weights Muon should update: matrices of linear layers, except the output head.

    The head (model.lm_head, if the model has one) maps hidden vectors to vocabulary
    logits and is trained like the embedding, with AdamW; so is a head tied to the
    embedding. Each tensor is listed once.
    """
    return _weights_except_the_head(model, nn.Linear)


def _weights_except_the_head(model: nn.Module, module_type: type[nn.Module]) -> list[Tensor]:
    """Trainable .weight of every module_type module, each tensor once, not model.lm_head's."""
    head = getattr(model, "lm_head", None)
    skip = {id(head.weight)} if isinstance(head, nn.Linear) else set()
    found: dict[int, Tensor] = {}
    for module in model.modules():
        if isinstance(module, module_type) and module.weight.requires_grad:
            if id(module.weight) not in skip:
                found.setdefault(id(module.weight), module.weight)
    return list(found.values())


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: Muon for groups with use_muon=True, AdamW for the others.

    Muon group: momentum buffer B <- momentum * B + g; the step direction is
    orthogonalize(g + momentum * B) (Nesterov) scaled by 0.2 * sqrt(max(rows, cols)), so
    that its size matches an AdamW step and both rules share one learning rate. AdamW
    group: the usual bias-corrected moments. Both decay weights decoupled from the
    gradient: param <- param * (1 - lr * weight_decay).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_steps: int = 5,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            betas=betas,
            eps=eps,
            ns_steps=ns_steps,
            use_muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(
                            f"Muon updates 2-D matrices, got a parameter of shape {tuple(p.shape)}; "
                            "put it in a group with use_muon=False (AdamW)"
                        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient."""
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure; call loss.backward() first")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW does it
            if group["use_muon"]:
                self._muon_updates(params, group)
            else:
                for p in params:
                    self._adamw_update(p, self.state[p], group)

    def _muon_updates(self, params: list[Tensor], group: dict) -> None:
        by_shape: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(p.grad)
            direction = p.grad.add(buf, alpha=group["momentum"])  # Nesterov: one step ahead
            by_shape.setdefault(tuple(p.shape), []).append((p, direction))
        for shape, items in by_shape.items():  # same-shaped matrices: one batched product
            updates = orthogonalize(torch.stack([d for _, d in items]), group["ns_steps"])
            scale = 0.2 * math.sqrt(max(shape))  # an orthogonal update's RMS -> AdamW's ~0.2
            for (p, _), update in zip(items, updates, strict=True):
                p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)

    @staticmethod
    def _adamw_update(p: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if "step" not in state:
            state["step"] = torch.zeros(())
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
