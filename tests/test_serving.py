"""Tests for tinylm.serving: expert-parallel decode/prefill of an MLA + MoE model, by hand."""

from __future__ import annotations

import pytest

from tinylm.costs import ModelShape, load_models
from tinylm.hardware import Chip, load_chips
from tinylm.serving import (
    all_to_all_bytes_per_token,
    batch_for_speed,
    ep_decode_step,
    ep_frontier,
    ep_prefill,
    experts_per_chip,
)

# A toy MLA + MoE model small enough to count by hand:
#   1 layer (an MoE layer), d_model 4, 2 heads of 4, latent r = 2, RoPE key 2, vocab 8,
#   4 routed experts of width 2, k = 2 per token, 1 shared expert.
TOY = ModelShape(
    1, 4, 2, 2, 4, 8, attention="mla", kv_lora_rank=2, rope_head_dim=2, mlp="moe",
    n_experts=4, n_shared=1, experts_per_token=2, expert_hidden=2, name="toy-moe",
)  # fmt: skip
# 1 FLOP/s per ... : 1e3 FLOP/s in bf16, 2e3 in int8, 1e3 B/s memory, 1 MB of it.
CHIP = Chip("c", bf16_tflops=1e-9, int8_tops=2e-9, memory_gb=1e-3, memory_gbps=1e-6, watts=1)


def test_all_to_all_bytes_per_token_by_hand():
    # 1 MoE layer * k 2 * d_model 4 * (1 + 2 bytes) = 24 B, of which 1 - 1/4 leaves the chip
    assert all_to_all_bytes_per_token(TOY, ep=4) == pytest.approx(18.0)
    assert all_to_all_bytes_per_token(TOY, ep=1) == 0  # every expert is local
    # DeepSeek-V3 on EP144: 58 layers * 8 * 7168 * 3 B * 143/144 = 9.906 MB per token
    ds = load_models()["DeepSeek-V3"]
    assert all_to_all_bytes_per_token(ds, ep=144) == pytest.approx(58 * 8 * 7168 * 3 * 143 / 144)
    with pytest.raises(ValueError, match="has no experts"):
        all_to_all_bytes_per_token(load_models()["Llama-3-8B"], ep=8)
    with pytest.raises(ValueError, match="ep=0 must be an integer >= 1"):
        all_to_all_bytes_per_token(TOY, ep=0)


def test_experts_per_chip():
    ds = load_models()["DeepSeek-V3"]
    # DeepSeek's decode deployment: 256 + 32 redundant experts over 144 GPUs = 2 per GPU
    assert experts_per_chip(ds, 144, redundant_experts=32) == 2
    # prefill: EP32 with 32 redundant = 9 per GPU
    assert experts_per_chip(ds, 32, redundant_experts=32) == 9


def test_ep_decode_step_by_hand():
    # Params: embedding 32, head 32, norms 2*4 + 2 = 10, final norm 4;
    #   attention q 4x12 = 48, kv_a 4x4 = 16, kv_b 2x16 = 32, o 8x4 = 32 -> 128
    #   router 4x4 = 16, shared 3*4*2 = 24, one routed expert 24 (4 stored)
    #   replicated (all but routed experts and embedding): 32 + 10 + 4 + 128 + 16 + 24 = 214
    #   matmul params per token: 128 + 16 + 24 + 2 * 24 + head 32 = 248
    step = ep_decode_step(TOY, CHIP, batch_per_chip=2, context=10, ep=2, weight_bits=8,
                          kv_bits=16, network_gbps=1e-9)  # fmt: skip
    assert step.matmul_flops == 2 * 248 * 2 == 992
    # absorbed attention per cached token: 2 * 1 layer * 2 heads * ((2 + 2) + 2) = 24 FLOPs
    assert step.attention_flops == 24 * 10 * 2 == 480
    # compute: 992 at 2e3 (int8) + 480 at 1e3 (bf16) = 0.496 + 0.48 s
    assert step.compute_seconds == pytest.approx(0.976)
    # weights: 214 replicated + 2 local experts * 24, each picked by one of the 4 global tokens
    # with probability 1 - (1 - 2/4)^4 = 15/16: 214 + 45 = 259 B (8-bit)
    assert step.weight_bytes == pytest.approx(214 + 2 * 24 * 15 / 16)
    # KV: 2 sequences * 10 tokens * (2 + 2) values * 2 bytes = 160 B
    assert step.kv_bytes == 160
    assert step.memory_seconds == pytest.approx((259 + 160) / 1e3)
    # network: 2 tokens * 24 B * (1 - 1/2) = 24 B at 1 B/s
    assert step.network_bytes == 24 and step.network_seconds == pytest.approx(24.0)
    assert step.bound == "network" and step.seconds == pytest.approx(24.0)
    assert step.tokens_per_s_per_chip == pytest.approx(2 / 24)
    no_overlap = ep_decode_step(TOY, CHIP, 2, 10, 2, network_gbps=1e-9, overlap=False)
    assert no_overlap.seconds == pytest.approx(0.976 + 24.0)
    # memory held: weights 214 + 2 experts * 24 + embedding 32 = 294 B + KV 160 B
    assert step.memory_per_chip_bytes == pytest.approx(294 + 160) and step.fits


def test_ep_decode_fits_and_frontier_ends_at_memory():
    tiny = Chip("tiny", bf16_tflops=1e-9, int8_tops=2e-9, memory_gb=1000e-9, memory_gbps=1e-6)
    # 294 B of weights + 4 values * 2 B = 8 B per cached token: 10-token caches (80 B each)
    # fit 8 sequences (294 + 640 = 934 <= 1000), not 9 (1014)
    assert ep_decode_step(TOY, tiny, 8, 10, 2, network_gbps=1).fits
    assert not ep_decode_step(TOY, tiny, 9, 10, 2, network_gbps=1).fits
    points = ep_frontier(TOY, tiny, 1.0, 1.0, context=10, ep=2, network_gbps=1)
    assert [p.batch for p in points] == [1, 2, 4, 8]
    # batch 1: compute 2 * 248 / 2e3 + 24 * 10 / 1e3 = 0.488 s; memory (214 + 2 experts * 24 *
    # (1 - (1/2)^2) + KV 80) / 1e3 = 0.33 s; network 12 B / 1e9: compute-bound at 0.488 s
    first = points[0]
    assert first.bound == "compute"
    assert first.tokens_per_s_per_user == first.tokens_per_s_per_chip == pytest.approx(1 / 0.488)
    # 1 USD/h: 1 / 3600 * 0.488 * 1e6 USD per million tokens; 1 W: tokens/s * 1e6 per MW
    assert first.usd_per_million_output == pytest.approx(0.488 / 3600 * 1e6)
    assert first.tokens_per_s_per_mw == pytest.approx(1e6 / 0.488)


def test_ep_prefill_by_hand():
    p = ep_prefill(TOY, CHIP, prompt_len=3, ep=2, network_gbps=1e-9)
    # 3 tokens: matmuls 2 * 248 * 3 = 1488; plain attention: qk 4 + 2, v 4 -> 2 * (6 + 4) = 20
    # per pair per head; mean keys (3 + 1) / 2 = 2: 20 * 2 heads * 2 * 3 tokens = 240
    assert p.matmul_flops == 1488 and p.attention_flops == 240
    # all local experts are read; KV written 3 * 8 B; network 3 * 12 B
    assert p.weight_bytes == 214 + 2 * 24 and p.kv_bytes == 24 and p.network_bytes == 36


def test_batch_for_speed_meets_the_target():
    models, chips = load_models(), load_chips()
    ds, h800 = models["DeepSeek-V3"], chips["H800 SXM"]
    step = batch_for_speed(ds, h800, 21.0, context=4989, ep=144, redundant_experts=32)
    assert step is not None and step.fits and 1 / step.seconds >= 21.0
    bigger = ep_decode_step(ds, h800, step.tokens_per_chip + 1, 4989, 144, redundant_experts=32)
    assert 1 / bigger.seconds < 21.0 or not bigger.fits
    assert batch_for_speed(ds, h800, 1e6, context=4989, ep=144) is None


def test_rejects_models_that_are_not_mla_moe():
    llama = load_models()["Llama-3-8B"]
    with pytest.raises(ValueError, match="not an MLA \\+ MoE model"):
        ep_decode_step(llama, CHIP, 1, 10, 2)
