"""The building blocks of a tinylm GPT: RMSNorm, the SwiGLU MLP and rotary position embeddings.

`tinylm.attention`, `tinylm.moe` and `tinylm.model` import them from here (imports go
downward: config -> layers -> attention, moe -> model).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Same bits as below with the scale folded into the fused op: a decode step runs
            # 2 * n_layer + 1 norms, and each saved op is a few microseconds of a ~1 ms step.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # x * rsqrt(mean(x^2) + eps) in float32 (squares of bf16/fp16 activations lose too
        # much precision), as one fused op.
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """The gated MLP of Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ----------------------------------------------------------------------------- RoPE


def llama3_inv_freq(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1's RoPE frequency scaling, to stretch a model trained on short context.

    With L = original_max_position_embeddings, a pair whose wavelength (2 pi / frequency)
    is longer than L / low_freq_factor (it never completed a turn in training) is slowed
    by `factor`; one shorter than L / high_freq_factor (many turns: local position) is kept;
    in between, the two are blended linearly in L / wavelength.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(
    dim: int, length: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None
) -> tuple[Tensor, Tensor]:
    """Return the RoPE cos and sin tables, each [length, dim] in float32 (Llama / HF layout).

    Channel i and channel i + dim/2 form a pair rotated by angle pos * theta^(-2i/dim);
    the frequencies are repeated ("half-split") so a table row lines up with `rotate_half`.
    scaling: GPTConfig.rope_scaling (Llama 3's frequency scaling) or None.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """Map the channel pairs (a, b) of the two halves of the last dim to (-b, a)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., T, dim] by the position angles in cos/sin [T, dim].

    Because a query at position m and a key at position n are rotated by m and n, their dot
    product depends only on m - n: shifting a whole sequence (e.g. by left padding) leaves
    every attention score unchanged.
    """
    return x * cos + rotate_half(x) * sin
