"""Tests for the chapter 06 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import pytest
import torch

from tinylm.exercises import list_exercises
from tinylm.exercises.ch06 import (
    _gptq_cases,
    _row_error,
    reference_bytes_per_weight,
    reference_dequantize_q4_0_block,
    reference_gptq_row,
    reference_quantize_int4_groups,
)
from tinylm.quant import compute_scale_zero, quantize_tensor
from tinylm.quant_calibrate import gptq_quantize
from tinylm.quant_formats import dequantize_q4_0, quantize_q4_0, to_q4_0

# ----------------------------------------------------------------- learner answers (fixtures)


def bytes_per_weight(bits, group_size, scale_bytes, zero_bytes):
    return bits / 8 + (scale_bytes + zero_bytes) / group_size


def bytes_no_scale(bits, group_size, scale_bytes, zero_bytes):
    return bits / 8


def bytes_no_zero(bits, group_size, scale_bytes, zero_bytes):
    return bits / 8 + scale_bytes / group_size


def bytes_in_bits(bits, group_size, scale_bytes, zero_bytes):
    return bits + 8 * (scale_bytes + zero_bytes) / group_size


def bytes_scale_in_bits(bits, group_size, scale_bytes, zero_bytes):
    return bits / 8 + 8 * (scale_bytes + zero_bytes) / group_size


def int4_groups(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size)
    s = g.abs().amax(-1, keepdim=True) / 7
    s[s == 0] = 1.0
    return (torch.round(g / s).clamp(-7, 7) * s).reshape(rows, cols)


def int4_minus8_to_7(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size)
    s = (g.abs().amax(-1, keepdim=True) / 8).clamp_min(1e-12)
    return (torch.round(g / s).clamp(-8, 7) * s).reshape(rows, cols)


def int4_no_clamp_mean(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size)
    s = (g.abs().mean(-1, keepdim=True) / 7).clamp_min(1e-12)
    return (torch.round(g / s) * s).reshape(rows, cols)


def int4_mean_scale(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size)
    s = (g.abs().mean(-1, keepdim=True) / 7).clamp_min(1e-12)
    return (torch.round(g / s).clamp(-7, 7) * s).reshape(rows, cols)


def int4_per_tensor(w, group_size):
    s = w.abs().max() / 7
    return torch.round(w / s).clamp(-7, 7) * s


def int4_per_row(w, group_size):
    s = w.abs().amax(1, keepdim=True) / 7
    return torch.round(w / s).clamp(-7, 7) * s


def int4_truncate(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size)
    s = (g.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-12)
    return (torch.trunc(g / s).clamp(-7, 7) * s).reshape(rows, cols)


def int4_codes(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size)
    s = (g.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-12)
    return torch.round(g / s).clamp(-7, 7).reshape(rows, cols)


def int4_nan_on_zero_group(w, group_size):
    rows, cols = w.shape
    g = w.reshape(rows, -1, group_size)
    s = g.abs().amax(-1, keepdim=True) / 7
    return (torch.round(g / s).clamp(-7, 7) * s).reshape(rows, cols)


def q4_0_block(block):
    d = block[:2].view(torch.float16).float()
    qs = block[2:]
    return (torch.cat((qs & 0x0F, qs >> 4)).float() - 8) * d


def q4_0_neighbours(block):
    d = block[:2].view(torch.float16).float()
    qs = block[2:]
    return (torch.stack((qs & 0x0F, qs >> 4), dim=-1).flatten().float() - 8) * d


def q4_0_no_offset(block):
    d = block[:2].view(torch.float16).float()
    qs = block[2:]
    return torch.cat((qs & 0x0F, qs >> 4)).float() * d


def q4_0_high_first(block):
    d = block[:2].view(torch.float16).float()
    qs = block[2:]
    return (torch.cat((qs >> 4, qs & 0x0F)).float() - 8) * d


def q4_0_big_endian(block):
    d = block[:2].flip(0).contiguous().view(torch.float16).float()
    qs = block[2:]
    return (torch.cat((qs & 0x0F, qs >> 4)).float() - 8) * d


def gptq_rtn(w, H, scale):
    return torch.clamp(torch.round(w / scale), -8, 7) * scale


def gptq_plus(w, H, scale):
    w, h_inv = w.clone(), torch.linalg.inv(H)
    q = torch.zeros_like(w)
    for i in range(len(w)):
        q[i] = torch.clamp(torch.round(w[i] / scale), -8, 7) * scale
        w[i + 1 :] += (w[i] - q[i]) / h_inv[i, i] * h_inv[i, i + 1 :]
        h_inv = h_inv - torch.outer(h_inv[:, i], h_inv[i, :]) / h_inv[i, i]
    return q


def gptq_no_downdate(w, H, scale):
    w, h_inv = w.clone(), torch.linalg.inv(H)
    q = torch.zeros_like(w)
    for i in range(len(w)):
        q[i] = torch.clamp(torch.round(w[i] / scale), -8, 7) * scale
        w[i + 1 :] -= (w[i] - q[i]) / h_inv[i, i] * h_inv[i, i + 1 :]
    return q


def gptq_returns_corrected_weights(w, H, scale):
    w, h_inv = w.clone(), torch.linalg.inv(H)
    for i in range(len(w)):
        q = torch.clamp(torch.round(w[i] / scale), -8, 7) * scale
        w[i + 1 :] -= (w[i] - q) / h_inv[i, i] * h_inv[i, i + 1 :]
        h_inv = h_inv - torch.outer(h_inv[:, i], h_inv[i, :]) / h_inv[i, i]
    return w


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references agree with lib


def test_reference_bytes_per_weight_matches_llama_cpp_blocks_and_lib_storage():
    assert reference_bytes_per_weight(4, 32, 2, 0) == 18 / 32  # Q4_0 block: 18 bytes
    assert reference_bytes_per_weight(8, 32, 2, 0) == 34 / 32  # Q8_0 block: 34 bytes
    w = torch.randn(16, 256)
    for bits, group, symmetric in [(4, 32, True), (8, 32, True), (4, 128, False), (8, 64, False)]:
        q = quantize_tensor(w, bits, group, symmetric)
        zero_bytes = 0 if symmetric else 1
        assert q.nbytes / w.numel() == reference_bytes_per_weight(bits, group, 2, zero_bytes)


@pytest.mark.parametrize(("shape", "group"), [((8, 64), 32), ((4, 256), 128), ((3, 48), 16)])
def test_reference_int4_groups_is_the_15_level_grid_lib_improves_on(shape, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(group))
    ref = reference_quantize_int4_groups(w, group)
    step = w.abs().reshape(shape[0], -1, group).amax(-1, keepdim=True) / 7
    step = step.expand(shape[0], -1, group).reshape(shape)
    assert ((ref - w).abs() <= step / 2 * (1 + 1e-6)).all()  # the half-step bound
    assert set((ref / step).round().unique().tolist()) <= set(range(-7, 8))
    # lib's int4 (Q4_0's 16 levels) has the smaller error on the same weights
    lib = quantize_tensor(w, 4, group).dequantize()
    assert (lib - w).pow(2).mean() < (ref - w).pow(2).mean()


def test_reference_int4_groups_keeps_an_all_zero_group_at_zero():
    w = torch.randn(2, 64)
    w[1, :32] = 0
    out = reference_quantize_int4_groups(w, 32)
    assert torch.isfinite(out).all() and (out[1, :32] == 0).all()


def test_reference_q4_0_block_decodes_like_the_ggml_port():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    for blocks in (quantize_q4_0(w), to_q4_0(quantize_tensor(w, 4, 32))):
        want = dequantize_q4_0(blocks, (blocks.shape[0], 32))
        for i, block in enumerate(blocks):
            assert torch.equal(reference_dequantize_q4_0_block(block), want[i])


def test_reference_gptq_row_equals_lib_gptq_without_act_order():
    for w, H, _, _ in _gptq_cases():
        w32, H32 = w.float()[None], H.float()
        scale, _ = compute_scale_zero(w32[:, None, :], 4, True)  # lib's fp16 scale (signed)
        lib = gptq_quantize(w32, H32, 4, granularity="channel", act_order=False, damp=0.0)
        ref = reference_gptq_row(w, H, float(scale))
        torch.testing.assert_close(ref.float(), lib.dequantize()[0], rtol=0, atol=1e-6)


def test_the_gptq_cases_leave_room_to_beat_round_to_nearest():
    for w, H, scale, _ in _gptq_cases():
        rtn = torch.clamp(torch.round(w / scale), -8, 7) * scale
        assert _row_error(w, reference_gptq_row(w, H, scale), H) < 0.9 * _row_error(w, rtn, H)


# ----------------------------------------------------------------- the checks


def test_there_are_warm_up_core_and_stretch_exercises():
    ch06 = list_exercises(6)
    assert {ex.id for ex in ch06} == {
        "ch06.bytes_per_weight",
        "ch06.int4_group_quantize",
        "ch06.dequantize_q4_0_block",
        "ch06.gptq_row",
    }
    assert {ex.difficulty for ex in ch06} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch06.bytes_per_weight", bytes_per_weight),
        ("ch06.bytes_per_weight", reference_bytes_per_weight),
        ("ch06.int4_group_quantize", int4_groups),
        ("ch06.int4_group_quantize", reference_quantize_int4_groups),
        ("ch06.dequantize_q4_0_block", q4_0_block),
        ("ch06.dequantize_q4_0_block", reference_dequantize_q4_0_block),
        ("ch06.gptq_row", reference_gptq_row),
    ],
)
def test_correct_answers_pass(exercise, exercise_id, answer):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "fragments"),
    [
        ("ch06.bytes_per_weight", bytes_no_scale, ["add the scale"]),
        ("ch06.bytes_per_weight", bytes_no_zero, ["zero point"]),
        ("ch06.bytes_per_weight", bytes_in_bits, ["return bytes, not bits"]),
        ("ch06.bytes_per_weight", bytes_scale_in_bits, ["already bytes"]),
        ("ch06.int4_group_quantize", int4_minus8_to_7, ["-7..7", "+8"]),
        ("ch06.int4_group_quantize", int4_mean_scale, ["not its mean"]),
        ("ch06.int4_group_quantize", int4_no_clamp_mean, ["not its mean", "clamp"]),
        ("ch06.int4_group_quantize", int4_per_tensor, ["not one for the whole tensor"]),
        ("ch06.int4_group_quantize", int4_per_row, ["not one per row"]),
        ("ch06.int4_group_quantize", int4_truncate, ["torch.round"]),
        ("ch06.int4_group_quantize", int4_codes, ["not the integer codes"]),
        ("ch06.int4_group_quantize", int4_nan_on_zero_group, ["NaN", "all-zero group"]),
        ("ch06.dequantize_q4_0_block", q4_0_neighbours, ["j + 16", "not neighbours"]),
        ("ch06.dequantize_q4_0_block", q4_0_no_offset, ["offset of 8"]),
        ("ch06.dequantize_q4_0_block", q4_0_high_first, ["LOW nibble"]),
        ("ch06.dequantize_q4_0_block", q4_0_big_endian, ["little-endian"]),
        ("ch06.gptq_row", gptq_rtn, ["round to nearest", "push its error"]),
        ("ch06.gptq_row", gptq_plus, ["subtract"]),
        ("ch06.gptq_row", gptq_no_downdate, ["remove it from the inverse Hessian"]),
        ("ch06.gptq_row", gptq_returns_corrected_weights, ["not the corrected weights"]),
    ],
)
def test_typical_mistakes_fail_with_a_targeted_hint(exercise, exercise_id, answer, fragments):
    message = exercise.fails(exercise_id, answer, *fragments)
    assert answer.__name__ in message and "Hint:" in message


@pytest.mark.parametrize(
    "exercise_id",
    [
        "ch06.bytes_per_weight",
        "ch06.int4_group_quantize",
        "ch06.dequantize_q4_0_block",
        "ch06.gptq_row",
    ],
)
def test_stub_is_not_attempted(exercise, exercise_id):
    exercise.not_attempted(exercise_id, stub)


def test_wrong_shapes_and_types_are_failures_not_crashes(exercise):
    exercise.fails("ch06.int4_group_quantize", lambda w, g: w[:, :g], "shape")
    exercise.fails("ch06.dequantize_q4_0_block", lambda block: block, "shape")
    exercise.fails("ch06.gptq_row", lambda w, H, scale: "q", "expected a tensor")
    exercise.fails("ch06.gptq_row", lambda w, H, scale: 3, "expected 16")
    exercise.fails("ch06.gptq_row", lambda w, H, scale: w[:2], "expected")
    exercise.fails("ch06.bytes_per_weight", lambda *a: "0.5", "should be a number")
