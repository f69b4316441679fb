"""Weight quantisation: int8 / int4 formats, 4-bit packing, and QuantLinear (real packed bytes).

Round-to-nearest (RTN) quantisation stores each weight w as a small integer code q plus a
float scale s shared by a group of weights (and, asymmetric, an integer zero point z):

    symmetric 8  w ~ s * q         q in [-127, 127]               s = max|w| / 127
    symmetric 4  w ~ s * q         q in [-8, 7] (all 16 codes)    s = w_ext / -8 (signed)
    asymmetric   w ~ s * (q - z)   q in [0, 2^bits - 1]           s = (max w - min w) / (2^bits - 1)

Symmetric int4 follows llama.cpp's Q4_0: w_ext is the group's weight of largest magnitude
*with its sign*, so it lands exactly on code -8 and all 16 codes are in use (a step of
max|w| / 8 instead of max|w| / 7: at 4 bits that one level is worth ~13% less error). The
price is one weight: an element of the other sign near -w_ext would need code +8, which does
not exist, and is clamped to +7 (error up to one step). Everywhere else, rounding to the
nearest code is off by at most half a step: |w - w_hat| <= |s| / 2. The step is
set by the group's largest magnitude, so one outlier coarsens the grid for all its neighbours.
That is the whole story of granularity: one scale per tensor < one per output channel (a row
of the weight matrix) < one per group of 32 inputs, each costing more scale bytes than the last.

Layout (`QuantizedTensor`): codes row-major [rows, cols], 8-bit as int8 (or uint8 when
asymmetric), 4-bit packed two per byte (element 2i in the low nibble, 2i+1 in the high one),
symmetric 4-bit codes stored with an offset of 8 (0..15, like llama.cpp's Q4_0). Scales are
fp16, rounded *up* from the exact value so the largest weight never falls off the grid and the
s/2 bound holds exactly. Groups run along the input dimension; if it is not a multiple of the
group size, the last group of each row is padded with zeros (stored: real bytes).

The rest of the quantisation chapter's code:
    tinylm.quant.model      schemes, quantize_model, model_nbytes, save/load, the int8 KV cache
    tinylm.quant.calibrate  calibration windows and GPTQ (beats round-to-nearest at 4 bits)
    tinylm.quant.formats    llama.cpp's Q8_0 / Q4_0 blocks, to relate our layout to GGUF files
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.util import is_int

GRANULARITIES = ("tensor", "channel", "group")

# ----------------------------------------------------------------------------- the math


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code: symmetric -127..127 and -8..7, else 0..2^b-1.

    Symmetric int8 leaves -128 unused, so +max and -max are both on the grid (one code in
    256 costs nothing). Symmetric int4 uses all 16 codes with a signed scale (Q4_0's rule,
    see the module docstring): one code in 16 is worth having.
    """
    if symmetric:
        return (-8, 7) if bits == 4 else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    return 0, 2**bits - 1


def _round_up_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast exact scales to `dtype`, rounding up: the stored step is never smaller than needed.

    A scale rounded down would put max|w| / s slightly above qmax, the code would clamp, and
    that weight's error would exceed s/2. Rounding up keeps every weight inside the grid.
    """
    t = s.to(dtype)
    t = torch.where(t.float() < s, torch.nextafter(t, torch.full_like(t, float("inf"))), t)
    if not torch.isfinite(t).all():
        raise ValueError(
            f"a quantisation scale ({s.max().item():.3g}) overflows {dtype}: the weights are "
            "too large for it; pass scale_dtype=torch.float32."
        )
    return t


def compute_scale_zero(
    x: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) for each group x[..., :] -> scale [...], zero [...] or None.

    Asymmetric groups always include 0 in their range ([min(w, 0), max(w, 0)]): zero weights
    (and the padding) stay exact, and the zero point z = round(-min / s) is a valid code.
    """
    lo, hi = qrange(bits, symmetric)
    x = x.float()
    if symmetric and bits == 4:
        # Q4_0: the extreme weight, with its sign, maps to code -8. The scale is rounded to
        # the nearest fp16 as Q4_0 does (no need to round up: the extreme stays within 0.4%
        # of a step of code -8 either way), and codes are rounded on the stored grid, so no
        # element is further from its value than in Q4_0.
        extreme = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        s = torch.where(extreme != 0, extreme / lo, torch.ones_like(extreme))
        t = s.to(scale_dtype)
        tiny = torch.nextafter(torch.zeros_like(t), t.float().sign().to(t.dtype))
        t = torch.where(t == 0, tiny, t)  # an fp16 underflow must not become a zero step
        if not torch.isfinite(t).all():
            raise ValueError(
                f"a quantisation scale ({s.abs().max().item():.3g}) overflows {scale_dtype}: "
                "the weights are too large for it; pass scale_dtype=torch.float32."
            )
        return t, None
    if symmetric:
        s = x.abs().amax(dim=-1) / hi
    else:
        wmin, wmax = x.amin(dim=-1).clamp(max=0), x.amax(dim=-1).clamp(min=0)
        s = (wmax - wmin) / hi
    s = _round_up_scale(torch.where(s > 0, s, torch.ones_like(s)), scale_dtype)  # all-zero group
    if symmetric:
        return s, None
    # z <= hi because -min <= max - min <= hi * s; the s/2 bound holds for min and max too.
    zero = torch.round(-wmin / s.float()).clamp(lo, hi).to(torch.uint8)
    return s, zero


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """Integer codes of x [..., g] for per-group scale / zero [...]: round(x / s) + z, clamped."""
    lo, hi = qrange(bits, zero is None)
    q = torch.round(x.float() / scale.float().unsqueeze(-1))
    if zero is not None:
        q = q + zero.float().unsqueeze(-1)
    return q.clamp(lo, hi)


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """The grid values s * (q - z) of codes q [..., g] (float32)."""
    if zero is not None:
        q = q.float() - zero.float().unsqueeze(-1)
    return q.float() * scale.float().unsqueeze(-1)


# ----------------------------------------------------------------------------- 4-bit packing


def pack_int4(codes: Tensor) -> Tensor:
    """Pack codes 0..15 [..., n] (n even) two per byte -> uint8 [..., n/2].

    Element 2i goes to the low nibble and 2i+1 to the high nibble of byte i.
    """
    if codes.shape[-1] % 2:
        raise ValueError(
            f"pack_int4 needs an even last dimension, got {codes.shape[-1]}; pad it with one code."
        )
    c = codes.to(torch.int16)  # int16: no overflow in the shift, whatever the input dtype
    if codes.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("pack_int4 takes codes in 0..15; offset signed codes by 8 first.")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: uint8 [..., m] -> codes 0..15 as uint8 [..., 2m]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- QuantizedTensor


@dataclass
class QuantizedTensor:
    """A quantised weight: packed codes, per-group scales (and zero points), and its layout.

    data: [rows, cols_padded] int8 (8-bit symmetric) / uint8 (8-bit asymmetric), or
        [rows, cols_padded / 2] uint8 with two 4-bit codes per byte (symmetric stored + 8).
    scale: [n_row_groups, n_groups] (fp16 by default); [1, 1] for granularity "tensor".
    zero: uint8 like scale (asymmetric), else None.
    shape: the original shape; rows = prod(shape[:-1]), cols = shape[-1] (input features).
    """

    data: Tensor
    scale: Tensor
    zero: Tensor | None
    shape: tuple[int, ...]
    bits: int
    group_size: int | None
    granularity: str

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def nbytes(self) -> int:
        """Real storage: codes + scales + zero points (layout metadata not counted)."""
        tensors = [self.data, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in tensors)

    def codes(self) -> Tensor:
        """The integer codes as float32 [rows, cols_padded] (4-bit unpacked, offset removed)."""
        if self.bits == 8:
            return self.data.float()
        q = unpack_int4(self.data).float()
        return q - 8 if self.symmetric else q

    def step(self) -> Tensor:
        """The quantisation step |scale| of every element, float32 in the original shape."""
        rows, cols_p, _, _ = storage_layout(
            self.shape, self.bits, self.granularity, self.group_size
        )
        ones = torch.ones(rows, cols_p, device=self.scale.device)
        s = group_view(
            ones, self.granularity, self.group_size
        ) * self.scale.float().abs().unsqueeze(-1)
        return s.reshape(rows, cols_p)[:, : self.shape[-1]].reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float tensor s * (q - z) in the original shape."""
        q = self.codes()
        rows, cols_p = q.shape
        w = dequantize_codes(
            group_view(q, self.granularity, self.group_size), self.scale, self.zero
        )
        return w.reshape(rows, cols_p)[:, : self.shape[-1]].reshape(self.shape).to(dtype)


def storage_layout(
    shape: tuple[int, ...], bits: int, granularity: str, group_size: int | None
) -> tuple[int, int, int, int]:
    """(rows, padded cols, scale rows, groups per row) of a weight of `shape`."""
    cols = shape[-1]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    multiple = group_size if granularity == "group" else (2 if bits == 4 else 1)
    cols_p = -(-cols // multiple) * multiple
    if granularity == "tensor":
        return rows, cols_p, 1, 1
    return rows, cols_p, rows, (cols_p // group_size if granularity == "group" else 1)


def group_view(x: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """View x [rows, cols_padded] as groups [scale rows, groups per row, group length]."""
    rows, cols_p = x.shape
    if granularity == "tensor":
        return x.reshape(1, 1, rows * cols_p)
    if granularity == "channel":
        return x.reshape(rows, 1, cols_p)
    return x.reshape(rows, cols_p // group_size, group_size)


def check_format(bits: Any, group_size: Any, granularity: str | None) -> str:
    """Validate the arguments of quantize_tensor; return the resolved granularity."""
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}.")
    if granularity is None:
        granularity = "channel" if group_size is None else "group"
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if granularity == "group":
        if not is_int(group_size) or group_size < 1:
            raise ValueError(
                f"granularity='group' needs group_size, a positive int (32, 64, 128), got {group_size!r}."
            )
        if bits == 4 and group_size % 2:
            raise ValueError(
                f"4-bit groups are packed two codes per byte, so group_size must be even, got {group_size}."
            )
    elif group_size is not None:
        raise ValueError(
            f"group_size={group_size} only applies to granularity='group', not {granularity!r}; "
            "drop one of them."
        )
    return granularity


def pack_codes(
    q: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    shape: tuple[int, ...],
    bits: int,
    group_size: int | None,
    granularity: str,
) -> QuantizedTensor:
    """Store integer codes q [rows, cols_padded] (signed if symmetric) as a QuantizedTensor."""
    if bits == 8:
        data = q.to(torch.int8 if zero is None else torch.uint8)
    else:
        data = pack_int4((q + 8) if zero is None else q)
    return QuantizedTensor(data, scale, zero, tuple(shape), bits, group_size, granularity)


def quantize_tensor(
    w: Tensor,
    bits: int = 8,
    group_size: int | None = None,
    symmetric: bool = True,
    *,
    granularity: str | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Round-to-nearest quantisation of a weight w [..., in_features].

    granularity: "tensor" (one scale), "channel" (one per output row) or "group" (one per
    group_size consecutive inputs of a row). Default: "group" if group_size is given, else
    "channel". Every element comes back within half a step, |w - dequantize(q)| <= |scale| / 2,
    except, in symmetric int4, elements clamped to code +7 (within one step; module docstring).
    """
    granularity = check_format(bits, group_size, granularity)
    if not torch.is_tensor(w) or not w.is_floating_point() or w.dim() == 0:
        raise ValueError("quantize_tensor takes a floating-point tensor with at least one dim.")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or inf values; fix the model before quantising.")
    shape = tuple(w.shape)
    rows, cols_p, _, _ = storage_layout(shape, bits, granularity, group_size)
    x = F.pad(w.detach().float().reshape(rows, shape[-1]), (0, cols_p - shape[-1]))
    groups = group_view(x, granularity, group_size)
    scale, zero = compute_scale_zero(groups, bits, symmetric, scale_dtype)
    q = quantize_codes(groups, scale, zero, bits).reshape(rows, cols_p)
    return pack_codes(q, scale, zero, shape, bits, group_size, granularity)


def dequantize_tensor(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float tensor a QuantizedTensor stands for (same shape as the original)."""
    return q.dequantize(dtype)


# ----------------------------------------------------------------------------- QuantLinear


def int8_linear(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T with int8 x int8 -> int32 matmul (torch._int_mm) and dynamic per-token scales.

    Each token row of x gets its own symmetric scale s_x = max|x_row| / 127, so
    y[m, n] = s_x[m] * s_w[n] * sum_k qx[m, k] * qw[n, k]; the sum is exact in int32.
    Its only error against F.linear(x, W_hat) is the rounding of x:
    |y - y_ref|[m, n] <= s_x[m] / 2 * sum_k |W_hat[n, k]| (plus float32 rounding).
    qweight: int8 [out, in]; w_scale: [out, 1] (per channel) or [1, 1] (per tensor).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    # clamp_min: an all-zero row gets a tiny positive scale (its codes are all 0 anyway)
    s_x = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).div_(127)
    qx = (x2 / s_x).round_().clamp_(-127, 127).to(torch.int8)
    acc = _int_mm(qx, qweight.t())  # [M, out] int32, exact
    y = acc.float().mul_(s_x).mul_(w_scale.reshape(1, -1))
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """torch._int_mm; on backends with shape rules (rows > 16, inner and outer dims multiples
    of 8 on some GPUs) pad with zeros and retry. The CPU kernel in torch 2.13 takes any shape."""
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        M, K = a.shape
        N = b.shape[1]
        Mp, Kp, Np = max(32, -(-M // 8) * 8), -(-K // 8) * 8, -(-N // 8) * 8
        a_p = F.pad(a, (0, Kp - K, 0, Mp - M))
        b_p = F.pad(b, (0, Np - N, 0, Kp - K)).t().contiguous().t()  # column-major operand
        return torch._int_mm(a_p, b_p)[:M, :N]


class QuantLinear(nn.Module):
    """A bias-free (or float-bias) Linear whose weight is stored quantised, as real bytes.

    Buffers: qweight (packed codes), scale (fp16) and zero (asymmetric only), so that
    state_dict, `.to(device)` and `model_nbytes` see the small tensors, never a float copy.

    compute="dequant" (the reference): dequantise the weight, then F.linear. Simple and works
    for every format, but a decode step re-reads (and re-expands) every weight.
    compute="int8": int8 x int8 matmul with per-token activation scales (`int8_linear`);
    only for 8-bit symmetric per-channel or per-tensor weights (others use "dequant").
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 8,
        group_size: int | None = None,
        granularity: str | None = None,
        symmetric: bool = True,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        compute: str = "dequant",
    ) -> None:
        super().__init__()
        granularity = check_format(bits, group_size, granularity)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.granularity = bits, group_size, granularity
        rows, cols_p, s_rows, n_groups = storage_layout(
            (out_features, in_features), bits, granularity, group_size
        )
        data_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
        data_cols = cols_p if bits == 8 else cols_p // 2
        self.register_buffer("qweight", torch.zeros(rows, data_cols, dtype=data_dtype))
        self.register_buffer("scale", torch.ones(s_rows, n_groups, dtype=scale_dtype))
        zero = None if symmetric else torch.zeros(s_rows, n_groups, dtype=torch.uint8)
        self.register_buffer("zero", zero)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.compute = compute

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 8,
        group_size: int | None = None,
        granularity: str | None = None,
        symmetric: bool = True,
        qtensor: QuantizedTensor | None = None,
        compute: str = "dequant",
    ) -> QuantLinear:
        """Quantise an nn.Linear with RTN, or wrap a precomputed QuantizedTensor (e.g. GPTQ's)."""
        if qtensor is None:
            qtensor = quantize_tensor(
                linear.weight, bits, group_size, symmetric, granularity=granularity
            )
        q = qtensor
        module = cls(
            linear.in_features, linear.out_features, q.bits, q.group_size, q.granularity,
            q.symmetric, linear.bias is not None, q.scale.dtype, compute,
        )  # fmt: skip
        device = linear.weight.device
        module.qweight.copy_(q.data)
        module.scale.copy_(q.scale)
        if q.zero is not None:
            module.zero.copy_(q.zero)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach().float())
        return module.to(device)

    @property
    def compute(self) -> str:
        return self._compute

    @compute.setter
    def compute(self, value: str) -> None:
        if value not in ("dequant", "int8"):
            raise ValueError(f"compute must be 'dequant' or 'int8', got {value!r}.")
        self._compute = value

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (sharing this module's buffers)."""
        return QuantizedTensor(
            self.qweight, self.scale, self.zero, (self.out_features, self.in_features),
            self.bits, self.group_size, self.granularity,
        )  # fmt: skip

    @property
    def weight(self) -> Tensor:
        """The dequantised float32 weight [out, in] (materialised on every access)."""
        return self.quantized.dequantize()

    def spec(self) -> dict[str, Any]:
        """JSON-safe description, enough to rebuild an empty module for loading."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "granularity": self.granularity,
            "symmetric": self.zero is None,
            "bias": self.bias is not None,
            "scale_dtype": str(self.scale.dtype).removeprefix("torch."),
        }

    def forward(self, x: Tensor) -> Tensor:
        int8_ok = self.bits == 8 and self.zero is None and self.granularity != "group"
        if self._compute == "int8" and int8_ok:
            return int8_linear(x, self.qweight, self.scale, self.bias)
        w = self.quantized.dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        sym = "symmetric" if self.zero is None else "asymmetric"
        return (
            f"in={self.in_features}, out={self.out_features}, int{self.bits} {self.granularity}{g}, "
            f"{sym}, compute={self._compute}"
        )
