"""What a port to an accelerator with its own compiler meets: static shapes, missing number
formats and operators that fall back to the host.

    bucket_for(37, (16, 32, 64, 128))                  # -> 64: the graph that serves 37 tokens
    padding_waste([37, 12, 100], (16, 32, 64, 128))    # tokens computed for nothing
    w8 = quantize_fp8(weight)                           # FP8 E4M3 + 128 x 128 block scales
    dequantize_fp8(w8, torch.bfloat16)                  # for a chip without FP8 arithmetic
    fp8_to_int8(w8)                                     # or INT8 with one scale per row

- **Static shapes.** An ahead-of-time compiled graph (the usual way to run on an NPU) has
  fixed tensor shapes. A server compiles one graph per *bucket* of prompt lengths and pads
  each prompt up to the smallest bucket that holds it; the padded positions cost compute and
  return nothing.
- **FP8 weights on a chip without FP8.** DeepSeek-V3 ships its weights in FP8 (E4M3) with one
  float32 scale per 128 x 128 block (`weight_scale_inv` in its checkpoint). A chip with no FP8
  arithmetic (Ascend 910B, A100) must convert them: to BF16 (exact for E4M3 values, but twice
  the bytes) or to INT8 (the same bytes, a second rounding).
- **Host fallback.** When the target's operator library lacks an operator, a framework runs
  it on the host CPU: copy the input off the device, compute, copy back, with the device
  waiting. `HostFallback` wraps a module that way, so the cost can be measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

#: Block size of DeepSeek-V3's FP8 weight scales (quantization_config.weight_block_size).
FP8_BLOCK = 128


# ----------------------------------------------------------------------------- static shapes


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    if length < 1:
        raise ValueError(f"a prompt needs at least 1 token, got {length}.")
    fits = [b for b in sorted(buckets) if b >= length]
    if not fits:
        raise ValueError(
            f"a prompt of {length} tokens is longer than the largest bucket {max(buckets)}; "
            "add a bucket at least that long or truncate the prompt."
        )
    return fits[0]


@dataclass
class PaddingWaste:
    """Tokens a set of prompts needs, and what serving them from fixed-shape buckets computes."""

    real_tokens: int
    padded_tokens: int

    @property
    def wasted_fraction(self) -> float:
        """Share of the computed positions that are padding."""
        return 1 - self.real_tokens / self.padded_tokens


def padding_waste(lengths: Sequence[int], buckets: Sequence[int]) -> PaddingWaste:
    """Pad every prompt length to its bucket and count real and computed tokens."""
    return PaddingWaste(sum(lengths), sum(bucket_for(n, buckets) for n in lengths))


def pad_to_bucket(ids: Sequence[int], buckets: Sequence[int], pad_id: int = 0):
    """(ids [1, bucket], attention_mask [1, bucket]) with the padding on the left (1 = real),
    the layout a fixed-shape prefill graph takes."""
    n = len(ids)
    size = bucket_for(n, buckets)
    padded = torch.full((1, size), pad_id, dtype=torch.long)
    padded[0, size - n :] = torch.as_tensor(list(ids), dtype=torch.long)
    mask = torch.zeros((1, size), dtype=torch.long)
    mask[0, size - n :] = 1
    return padded, mask


# ----------------------------------------------------------------------------- FP8 weights


@dataclass
class Fp8Weight:
    """A matrix stored as FP8 values plus one float32 scale per block: w ~ data * scale."""

    data: Tensor  # [out, in] float8
    scale: Tensor  # [ceil(out / block), ceil(in / block)] float32
    block: int = FP8_BLOCK

    @property
    def nbytes(self) -> int:
        """Bytes stored: one per value plus four per block scale."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4


def _expand(scale: Tensor, shape: torch.Size, block: int) -> Tensor:
    """Block scales [rb, cb] repeated to cover a matrix of `shape`."""
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return full[: shape[0], : shape[1]]


def quantize_fp8(
    weight: Tensor, block: int = FP8_BLOCK, dtype: torch.dtype = torch.float8_e4m3fn
) -> Fp8Weight:
    """Store a 2-D weight as FP8 with one scale per `block` x `block` tile (DeepSeek-V3's
    layout): each tile's largest |value| maps to the format's largest finite number."""
    if weight.dim() != 2:
        raise ValueError(
            f"quantize_fp8 takes a 2-D weight matrix, got shape {tuple(weight.shape)}."
        )
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}.")
    w = weight.detach().float()
    rows, cols = math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)
    padded = torch.zeros(rows * block, cols * block)
    padded[: w.shape[0], : w.shape[1]] = w
    tiles = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3))
    scale = torch.where(tiles > 0, tiles / torch.finfo(dtype).max, torch.ones_like(tiles))
    data = (w / _expand(scale, w.shape, block)).to(dtype)
    return Fp8Weight(data, scale, block)


def dequantize_fp8(w: Fp8Weight, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """FP8 values times their block scales, as `dtype` (what a chip without FP8 stores)."""
    return (w.data.float() * _expand(w.scale, w.data.shape, w.block)).to(dtype)


def fp8_to_int8(w: Fp8Weight) -> tuple[Tensor, Tensor]:
    """Re-quantize an FP8 weight to INT8 with one float32 scale per output row (symmetric,
    round to nearest): (int8 [out, in], scale [out]); w ~ int8 * scale[:, None]."""
    full = dequantize_fp8(w, torch.float32)
    scale = full.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(full / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_nbytes(q: Tensor, scale: Tensor) -> int:
    """Bytes of an INT8 weight with its float32 row scales."""
    return q.numel() + scale.numel() * 4


# ----------------------------------------------------------------------------- host fallback


class HostFallback(nn.Module):
    """Run `fn` (a NumPy function of one array) on the host instead of the device: copy the
    input to host memory, compute there, copy the result back. Counts calls and bytes moved."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.fn = fn
        self.calls = 0
        self.bytes_moved = 0

    def forward(self, x: Tensor) -> Tensor:
        host = x.detach().to("cpu", copy=True).numpy()  # device -> host (waits for the device)
        y = torch.from_numpy(np.ascontiguousarray(self.fn(host))).to(x.device)  # host -> device
        self.calls += 1
        self.bytes_moved += host.nbytes + y.numel() * y.element_size()
        return y
