"""Calibrated weight quantisation: GPTQ (Frantar et al., 2022) on a few token windows.

Round to nearest (RTN) treats every weight alone. But what a Linear layer must preserve is
its output on real inputs. For one output row w and calibration inputs X [N, in], rounding to
w_hat costs

    E = || X (w - w_hat)^T ||^2 = (w - w_hat) H (w - w_hat)^T,      H = X^T X  [in, in]

Inputs are correlated (H is far from diagonal), so when rounding input column i leaves an error,
the columns not yet quantised can be nudged to cancel most of its effect on the output. GPTQ
(built on Optimal Brain Surgeon) goes through the columns in order:

    q_i = round(w_i) on the group's grid
    w_j -= (w_i - q_i) * [H_i^-1]_ij / [H_i^-1]_ii     for every later column j > i

where H_i^-1 is the inverse Hessian with the columns already fixed removed. Removing one
column after another from the inverse is Gaussian elimination, and the whole sequence is one
Cholesky factorisation: with H^-1 = U^T U (U upper triangular), row i of U is
[H_i^-1]_i: / sqrt([H_i^-1]_ii). So we factor once and, per column, use
err = (w_i - q_i) / U_ii and w_j -= err * U_ij.

Two refinements from the GPTQ code: act-order (inputs with the largest activations first,
while the most columns are left to absorb their error) and dampening (H + 1% of its mean
diagonal, so H stays invertible). Layers are quantised block by block ("sequential"): the
Hessians of block b are collected with blocks 0..b-1 already quantised, so each block also
corrects for the errors of those before it. At this size the plain column loop is fast; the
paper's lazy batch updates (for cache efficiency on big matrices) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.quant.rtn import (
    QuantizedTensor,
    QuantLinear,
    check_format,
    compute_scale_zero,
    dequantize_codes,
    group_view,
    pack_codes,
    quantize_codes,
    quantize_tensor,
    storage_layout,
)


def calibration_windows(
    tokens: Tensor, n_windows: int = 32, block_size: int = 128, seed: int = 0
) -> Tensor:
    """n_windows random windows [n_windows, block_size] of a 1-D token tensor (seeded).

    Take them from the *training* split: calibrating on the validation text would leak it
    into the quantised weights and flatter the evaluation.
    """
    if tokens.dim() != 1 or len(tokens) < block_size:
        raise ValueError(
            f"tokens must be a 1-D tensor of at least block_size={block_size} ids, got shape "
            f"{tuple(tokens.shape)}; use more text or a smaller block_size."
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - block_size + 1, (n_windows,), generator=g)
    return tokens[starts[:, None] + torch.arange(block_size)]


@torch.no_grad()
def collect_hessians(
    model: nn.Module, layers: dict[str, nn.Module], calibration: Tensor, batch_size: int = 8
) -> dict[str, tuple[Tensor, int]]:
    """Run the calibration windows through `model`; return {name: (X^T X, tokens seen)}.

    A forward hook on each layer accumulates its input's second moment. A routed MoE expert
    sees only the tokens sent to it (possibly none).
    """
    if calibration.dim() != 2:
        raise ValueError(
            f"calibration must be token windows [n, T], got shape {tuple(calibration.shape)}; "
            "make them with calibration_windows(tokens)."
        )
    stats: dict[str, list] = {}

    def hook(name: str):
        def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if name not in stats:
                stats[name] = [torch.zeros(x.shape[1], x.shape[1], device=x.device), 0]
            stats[name][0] += x.T @ x
            stats[name][1] += x.shape[0]

        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    device = model.tok_emb.weight.device
    try:
        for b in range(0, len(calibration), batch_size):
            model(calibration[b : b + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: (stats[n][0], stats[n][1]) if n in stats else (None, 0) for n in layers}


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    *,
    granularity: str | None = None,
    damp: float = 0.01,
    act_order: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """GPTQ-quantise weight [out, in] given H = X^T X [in, in]; same format as quantize_tensor.

    damp: a multiple of the mean diagonal of H added to it, so that H is safely invertible
        even when some input directions were never seen in the calibration data.
    act_order: quantise the inputs with the largest activations (largest H_ii) first, while
        the most columns are still free to absorb their error. Groups are then visited out
        of order, so their scales are fixed up front from the original weights ("static
        groups"); without act_order each group's scale comes from the corrected weights.
    """
    granularity = check_format(bits, group_size, granularity)
    if weight.dim() != 2 or tuple(hessian.shape) != (weight.shape[1],) * 2:
        raise ValueError(
            f"need weight [out, in] and hessian [in, in], got {tuple(weight.shape)} and "
            f"{tuple(hessian.shape)}."
        )
    shape = tuple(weight.shape)
    rows, cols_p, s_rows, n_groups = storage_layout(shape, bits, granularity, group_size)
    pad = cols_p - shape[1]
    W = F.pad(weight.detach().float(), (0, pad))
    H = F.pad(hessian.float(), (0, pad, 0, pad))
    # Inputs never seen (and the padding) have no row/column in H: give them a unit diagonal,
    # which decouples them; they are simply rounded to nearest and pass no error on.
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0

    if act_order:
        scale, zero = compute_scale_zero(
            group_view(W, granularity, group_size), bits, symmetric, scale_dtype
        )
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        scale = torch.empty(s_rows, n_groups, dtype=scale_dtype, device=W.device)
        zero = None if symmetric else torch.empty_like(scale, dtype=torch.uint8)
        perm = torch.arange(cols_p, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(cols_p, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ValueError(f"the Hessian is not positive definite ({err}); raise damp.") from err

    g = group_size if granularity == "group" else cols_p
    Q = torch.zeros_like(W)
    for i, col in enumerate(perm.tolist()):
        k = col // g  # the group (column of `scale`) this input belongs to
        if not act_order and col % g == 0:  # entering a group: scale from corrected weights
            block = W[:, i : i + g]
            s, z = compute_scale_zero(
                block.reshape(1, -1) if granularity == "tensor" else block,
                bits, symmetric, scale_dtype,
            )  # fmt: skip
            scale[:, k] = s
            if zero is not None:
                zero[:, k] = z
        s, z = scale[:, k], None if zero is None else zero[:, k]
        w = W[:, i : i + 1]
        q = quantize_codes(w, s, z, bits)
        Q[:, i : i + 1] = q
        err = (w - dequantize_codes(q, s, z)) / U[i, i]  # [rows, 1]
        W[:, i + 1 :] -= err * U[i, i + 1 :]  # push the rounding error onto later columns

    codes = torch.empty_like(Q)
    codes[:, perm] = Q  # back to the original column order
    return pack_codes(codes, scale, zero, shape, bits, group_size, granularity)


def layer_output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """sum over rows of (w - w_hat) H (w - w_hat)^T = || X (W - W_hat)^T ||^2 on calibration."""
    d = (weight.float() - approx.float()).to(hessian.device)
    return float(torch.einsum("oi,ij,oj->", d, hessian.float(), d))


def _stages(names: list[str]) -> list[list[str]]:
    """Group layer names by transformer block ("blocks.3.*"), keeping their order."""
    stages: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else name
        stages.setdefault(key, []).append(name)
    return list(stages.values())


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    scheme,
    calibration: Tensor,
    batch_size: int = 8,
    damp: float = 0.01,
    act_order: bool = True,
) -> nn.Module:
    """Replace `targets` (name -> Linear of `model`) by GPTQ QuantLinears, block by block, in place.

    `scheme` is a tinylm.quant.model.QuantScheme. A layer that saw no calibration token (an
    MoE expert the router never picked) falls back to round to nearest.
    """
    ctx = model.config.context_length
    if calibration.shape[-1] > ctx:
        raise ValueError(
            f"calibration windows have {calibration.shape[-1]} tokens, more than the model's "
            f"context_length={ctx}; use calibration_windows(tokens, block_size={ctx})."
        )
    for stage in _stages(list(targets)):
        hessians = collect_hessians(model, {n: targets[n] for n in stage}, calibration, batch_size)
        for name in stage:
            linear = targets[name]
            H, seen = hessians[name]
            if seen == 0:
                q = quantize_tensor(
                    linear.weight, scheme.bits, scheme.group_size, scheme.symmetric,
                    granularity=scheme.granularity,
                )  # fmt: skip
            else:
                q = gptq_quantize(
                    linear.weight, H, scheme.bits, scheme.group_size, scheme.symmetric,
                    granularity=scheme.granularity, damp=damp, act_order=act_order,
                )  # fmt: skip
            parent, _, child = name.rpartition(".")
            module = QuantLinear.from_linear(linear, qtensor=q)
            setattr(model.get_submodule(parent) if parent else model, child, module)
    return model
