"""llama.cpp's Q8_0 and Q4_0 block formats, to relate tinylm's quantised tensors to GGUF files.

A GGUF tensor row is a run of 32-element blocks, each with its own fp16 scale d:

    Q8_0 block (34 bytes): fp16 d, int8 qs[32];                  x = qs[j] * d
    Q4_0 block (18 bytes): fp16 d, uint8 qs[16]; byte j holds element j in its low nibble and
                           element j + 16 in its high nibble;    x = (nibble - 8) * d

(ggml/src/ggml-common.h: block_q8_0, block_q4_0; ggml/src/ggml-quants.c:
quantize_row_q8_0_ref, quantize_row_q4_0_ref, dequantize_row_q8_0, dequantize_row_q4_0.)

Q8_0 is our "int8-g32" (d = max|x| / 127) and Q4_0's layout holds our "int4-g32" codes, so
`to_q8_0` / `to_q4_0` write our tensors as exact GGUF blocks. `quantize_q8_0` /
`quantize_q4_0` are ports of llama.cpp's reference quantisers, to compare the choices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinylm.quant.rtn import QuantizedTensor, unpack_int4


def _fp16_bytes(d: Tensor) -> Tensor:
    """fp16 values [n] -> their little-endian bytes [n, 2] (ggml stores ggml_half as uint16)."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _check_block_layout(q: QuantizedTensor, bits: int) -> None:
    if (q.bits, q.granularity, q.group_size, q.symmetric) != (bits, "group", 32, True):
        raise ValueError(
            f"Q{bits}_0 needs a symmetric {bits}-bit tensor with group_size=32, got bits={q.bits}, "
            f"granularity={q.granularity!r}, group_size={q.group_size}, symmetric={q.symmetric}."
        )
    if q.shape[-1] % 32:
        raise ValueError(
            f"ggml blocks need rows that are a multiple of 32 long, got {q.shape[-1]}; our "
            "padded last group has no Q8_0/Q4_0 equivalent."
        )


def _blocks_of_32(w: Tensor) -> Tensor:
    if w.dim() == 0 or w.shape[-1] % 32:
        raise ValueError(
            f"ggml blocks need rows that are a multiple of 32 long, got shape {tuple(w.shape)}; "
            "pad the rows or use tinylm.quant.quantize_tensor (which pads)."
        )
    return w.detach().float().reshape(-1, 32)


def to_q8_0(q: QuantizedTensor) -> Tensor:
    """Write an "int8-g32" tensor as llama.cpp Q8_0 blocks: uint8 [n_blocks, 34]."""
    _check_block_layout(q, 8)
    qs = q.data.reshape(-1, 32).view(torch.uint8)
    return torch.cat((_fp16_bytes(q.scale.reshape(-1)), qs), dim=1)


def to_q4_0(q: QuantizedTensor) -> Tensor:
    """Write an "int4-g32" tensor as llama.cpp Q4_0 blocks: uint8 [n_blocks, 18].

    Our symmetric int4 is Q4_0's rule (codes -8..7, d = signed extreme / -8), so the codes
    (+8 = 0..15) are Q4_0 nibbles with the same d (ours rounds |d| up to fp16, Q4_0 to
    nearest); only the nibble order changes (Q4_0 pairs element j with j + 16, we pair
    neighbours 2i and 2i + 1).
    """
    _check_block_layout(q, 4)
    nibbles = unpack_int4(q.data).reshape(-1, 32)
    qs = nibbles[:, :16] | (nibbles[:, 16:] << 4)
    return torch.cat((_fp16_bytes(q.scale.reshape(-1)), qs), dim=1)


def dequantize_q8_0(blocks: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Decode Q8_0 blocks uint8 [n, 34] to a float32 tensor of `shape` (dequantize_row_q8_0)."""
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).reshape(shape)


def dequantize_q4_0(blocks: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Decode Q4_0 blocks uint8 [n, 18] to a float32 tensor of `shape` (dequantize_row_q4_0)."""
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    qs = blocks[:, 2:]
    nibbles = torch.cat((qs & 0x0F, qs >> 4), dim=1).float()  # elements 0..15, then 16..31
    return ((nibbles - 8) * d).reshape(shape)


def quantize_q8_0(w: Tensor) -> Tensor:
    """llama.cpp's reference Q8_0 quantiser (quantize_row_q8_0_ref) -> blocks uint8 [n, 34].

    d = amax / 127, q = roundf(x / d) (half away from zero), computed with the fp32 d; only
    the stored d is rounded to fp16 (to nearest; ours rounds up). So a code can differ from
    our "int8-g32" by one, and its error bound is d/2 plus the fp16 rounding of d times |q|.
    """
    x = _blocks_of_32(w)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    v = x * inv
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)  # C roundf
    return torch.cat((_fp16_bytes(d.reshape(-1)), q.view(torch.uint8)), dim=1)


def quantize_q4_0(w: Tensor) -> Tensor:
    """llama.cpp's reference Q4_0 quantiser (quantize_row_q4_0_ref) -> blocks uint8 [n, 18].

    d = max / -8 where max is the element of largest magnitude *with its sign*, so that
    element lands exactly on code -8 and all 16 codes are used (a finer step than amax / 7).
    The price: an element of the opposite sign close to -max maps to +8, which does not exist
    and is clamped to +7, an error of up to one full step |d| instead of |d| / 2.
    """
    x = _blocks_of_32(w)
    idx = x.abs().argmax(dim=1, keepdim=True)
    d = x.gather(1, idx) / -8
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.floor(x * inv + 8.5).clamp(0, 15).to(torch.uint8)  # (int8_t)(x0 + 8.5f), MIN(15, .)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat((_fp16_bytes(d.reshape(-1)), qs), dim=1)
