"""Tests for tinylm.port.accelerator: buckets and padding, FP8 storage and conversion, host
fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinylm.port.accelerator import (
    HostFallback,
    bucket_for,
    dequantize_fp8,
    fp8_to_int8,
    int8_nbytes,
    pad_to_bucket,
    padding_waste,
    quantize_fp8,
)

BUCKETS = (16, 32, 64, 128)


def test_buckets_and_padding_waste_by_hand():
    assert [bucket_for(n, BUCKETS) for n in (1, 16, 17, 64, 65, 128)] == [16, 16, 32, 64, 128, 128]
    # 10 -> 16, 20 -> 32, 100 -> 128: 130 real tokens, 176 computed, 46 / 176 wasted.
    waste = padding_waste([10, 20, 100], BUCKETS)
    assert (waste.real_tokens, waste.padded_tokens) == (130, 176)
    assert waste.wasted_fraction == pytest.approx(46 / 176)
    assert padding_waste([16, 32], BUCKETS).wasted_fraction == 0
    ids, mask = pad_to_bucket([5, 6, 7], BUCKETS, pad_id=0)
    assert ids.tolist() == [[0] * 13 + [5, 6, 7]] and mask.sum() == 3 and mask[0, -3:].all()
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(129, BUCKETS)
    with pytest.raises(ValueError, match="at least 1"):
        bucket_for(0, BUCKETS)


def test_fp8_bytes_and_conversion():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * 0.05
    w8 = quantize_fp8(w)
    # 200 x 300 values at 1 byte + ceil(200/128) x ceil(300/128) = 2 x 3 float32 block scales.
    assert w8.data.dtype == torch.float8_e4m3fn and w8.scale.shape == (2, 3)
    assert w8.nbytes == 200 * 300 + 6 * 4
    bf16 = dequantize_fp8(w8, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.numel() * bf16.element_size() == 2 * 200 * 300
    # E4M3 keeps 3 mantissa bits: relative error of a value at most 2^-4 (half a step).
    fp32 = dequantize_fp8(w8, torch.float32)
    big = w.abs() > 1e-2  # away from the subnormal range of each tile
    assert ((fp32 - w).abs()[big] / w.abs()[big]).max() <= 2**-4 + 1e-6
    # BF16 (8 significant bits) holds the E4M3 values times power-of-two-ish scales closely.
    assert (bf16.float() - fp32).abs().max() <= fp32.abs().max() * 2**-8
    q, scale = fp8_to_int8(w8)
    assert q.dtype == torch.int8 and scale.shape == (200,)
    assert int8_nbytes(q, scale) == 200 * 300 + 200 * 4
    # int8 adds at most half a step per row on top of the FP8 rounding.
    assert ((q.float() * scale[:, None] - fp32).abs() <= scale[:, None] / 2 + 1e-7).all()
    # The largest |value| of every tile is exactly representable: it maps to E4M3's max.
    assert w8.data.float().abs().max() == torch.finfo(torch.float8_e4m3fn).max


def test_fp8_refuses_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.ones(3))
    with pytest.raises(ValueError, match="float8"):
        quantize_fp8(torch.ones(2, 2), dtype=torch.bfloat16)
    zeros = quantize_fp8(torch.zeros(4, 4))  # an all-zero tile must not divide by zero
    assert dequantize_fp8(zeros, torch.float32).abs().max() == 0


def test_host_fallback_same_result_and_counts():
    fallback = HostFallback(lambda a: a * 2 + 1)
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    y = fallback(x)
    assert torch.equal(y, x * 2 + 1) and y.device == x.device
    assert fallback.calls == 1 and fallback.bytes_moved == 2 * x.numel() * 4
    assert isinstance(fallback.fn(np.ones(2)), np.ndarray)
