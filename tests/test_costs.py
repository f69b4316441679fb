"""Tests for tinylm.costs: model shapes, parameter/KV/FLOP counts and the roofline estimate.

Expected numbers are computed by hand in the comments from the formulas in the module
docstrings (or taken from the models' published configs), never copied from a run.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tinylm import model as tm
from tinylm.costs import (
    MODEL_CSV_COLUMNS,
    ModelShape,
    crossover_tokens,
    estimate,
    expected_experts_touched,
    inference_flops_per_token,
    kv_cache_bytes_per_token,
    load_models,
    training_flops,
)
from tinylm.hardware import Chip, load_chips, ridge_point, this_machine

REFERENCE = ("Llama-2-7B", "Llama-3-8B", "Llama-3-70B", "DeepSeek-V3", "tinylm-default")


@pytest.fixture(scope="module")
def models() -> dict[str, ModelShape]:
    return load_models()


@pytest.fixture(scope="module")
def chips() -> dict[str, Chip]:
    return load_chips()


# A made-up model small enough to count by hand:
#   layer matmuls: q 8x8=64, k 8x4=32, v 8x4=32, o 8x8=64, gate/up 8x16=128 each, down 16x8=128
#   -> 576 per layer; norms 2*8 = 16; so 592 per layer, 1184 for 2 layers.
#   total = embedding 16*8=128 + head 128 + 1184 + final norm 8 = 1448
#   matmul params per token = 2*576 + head 128 = 1280
#   KV per token = 2 (k,v) * 2 layers * 1 head * 4 = 16 numbers = 32 bytes in bf16
#   activations per token per layer (in + out of each matmul):
#   q 16 + k 12 + v 12 + o 16 + gate 24 + up 24 + down 24 = 128 -> 256 for 2 layers
TOY = ModelShape(
    n_layer=2,
    d_model=8,
    n_head=2,
    n_kv_head=1,
    head_dim=4,
    vocab=16,
    attention="gqa",
    mlp_hidden=16,
    name="toy",
)
# A made-up chip: 1e9 FLOP/s and 1e9 byte/s (ridge point 1 FLOP/byte), 4000 bytes of memory,
# 1e9 byte/s of link per direction, 10 W, 3.6 USD/h (= 0.001 USD/s).
TOY_CHIP = Chip(
    "toy chip",
    bf16_tflops=1e-3,
    int8_tops=2e-3,
    memory_gb=4e-6,
    memory_gbps=1.0,
    link_gbps=1.0,
    watts=10,
    usd_per_hour=3.6,
)


# ----------------------------------------------------------------------------- shapes and counts


def test_reference_models_load(models):
    assert tuple(models) == REFERENCE
    ds = models["DeepSeek-V3"]
    assert (ds.n_layer, ds.d_model, ds.n_head, ds.vocab) == (61, 7168, 128, 129280)
    assert (ds.kv_lora_rank, ds.rope_head_dim, ds.q_lora_rank) == (512, 64, 1536)
    assert (ds.n_experts, ds.n_shared, ds.experts_per_token) == (256, 1, 8)
    assert (ds.expert_hidden, ds.mlp_hidden, ds.first_dense_layers) == (2048, 18432, 3)
    assert ds.n_moe_layers == 58
    assert all(m.source for m in models.values())


@pytest.mark.parametrize("name", ["Llama-2-7B", "Llama-3-8B", "Llama-3-70B", "DeepSeek-V3"])
def test_total_params_match_published_counts(models, name):
    shape = models[name]
    assert shape.total_params == pytest.approx(shape.published_total_params, rel=0.01)


def test_exact_param_counts_by_hand(models):
    # Llama-2-7B: per layer 4*4096^2 + 3*4096*11008 + 2*4096 = 202,383,360; x32 layers,
    # + embedding and head 2*32000*4096 + final norm 4096 = 6,738,415,616 (HF: "6.74B").
    assert models["Llama-2-7B"].total_params == 6_738_415_616
    # Llama-3-8B: per layer 2*4096^2 + 2*4096*1024 + 3*4096*14336 + 8192 = 218,112,000;
    # x32 + 2*128256*4096 + 4096 = 8,030,261,248.
    assert models["Llama-3-8B"].total_params == 8_030_261_248


def test_deepseek_v3_active_params(models):
    ds = models["DeepSeek-V3"]
    assert ds.active_params == pytest.approx(37e9, rel=0.02)
    # DeepSeek's README_WEIGHTS quotes 36.6B active *without* the 0.93B input embedding.
    assert ds.active_params - ds.embedding_params == pytest.approx(36.6e9, rel=0.005)
    assert ds.total_params / ds.active_params > 17  # 671B stored, ~37B used per token


def test_kv_bytes_per_token_of_reference_models(models):
    assert kv_cache_bytes_per_token(models["Llama-2-7B"]) == 2 * 32 * 4096 * 2 == 524_288
    assert kv_cache_bytes_per_token(models["Llama-3-8B"]) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_cache_bytes_per_token(models["Llama-3-70B"]) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_cache_bytes_per_token(models["DeepSeek-V3"]) == 61 * (512 + 64) * 2 == 70_272
    # quantised caches scale with the bits; packed 4-bit rounds up to whole bytes
    assert kv_cache_bytes_per_token(models["Llama-3-8B"], kv_bits=8) == 65_536
    odd = ModelShape(
        1, 8, 2, 2, 4, 16, attention="mla", kv_lora_rank=3, rope_head_dim=2, mlp_hidden=8
    )
    assert kv_cache_bytes_per_token(odd, kv_bits=4) == math.ceil(5 * 4 / 8) == 3


def test_toy_counts_by_hand():
    assert TOY.total_params == TOY.active_params == 1448
    assert TOY.matmul_params_per_token == 1280
    assert TOY.kv_elements_per_token == 16
    assert kv_cache_bytes_per_token(TOY) == 32
    assert TOY.activation_elements_per_token() == 256
    # forward FLOPs with 5 cached keys: 2*1280 + 2 * 2 layers * 2 heads * 5 * (4 + 4) = 2880
    assert inference_flops_per_token(TOY, context=5) == 2880


WORKBOOK_CONFIGS = [
    tm.GPTConfig(),
    tm.GPTConfig(vocab_size=512, context_length=128),  # the "default" training recipe
    tm.GPTConfig(attention="gqa", n_kv_head=2),
    tm.GPTConfig(attention="mqa"),
    tm.GPTConfig(attention="mla"),
    tm.GPTConfig(attention="mla", q_lora_rank=32, kv_lora_rank=48, rope_head_dim=8),
    tm.GPTConfig(mlp="moe"),
    tm.GPTConfig(mlp="moe", attention="mla", n_shared_experts=0, tie_embeddings=True),
    tm.GPTConfig(n_layer=3, n_head=6, n_embd=96, vocab_size=300, mlp_hidden=100),
]


@pytest.mark.parametrize("config", WORKBOOK_CONFIGS, ids=lambda c: f"{c.attention}-{c.mlp}")
def test_from_config_matches_tinylm_model(config):
    shape = ModelShape.from_config(config)
    assert shape.total_params == tm.count_parameters(config)
    assert shape.active_params == tm.active_parameters(config)
    for context in (1, 37):
        assert inference_flops_per_token(shape, context) == tm.flops_per_token(config, context)
    for bits, dtype in ((32, torch.float32), (16, torch.bfloat16)):
        assert kv_cache_bytes_per_token(shape, bits) == tm.kv_cache_bytes_per_token(config, dtype)


def test_from_config_counts_a_real_module():
    config = tm.GPTConfig(mlp="moe", attention="mla", q_lora_rank=16)
    n = sum(p.numel() for p in tm.GPT(config).parameters())
    assert ModelShape.from_config(config).total_params == n


def test_tinylm_default_row_matches_gptconfig_defaults(models):
    assert models["tinylm-default"] == ModelShape.from_config(tm.GPTConfig())


def test_shape_validation():
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        ModelShape(1, 8, 4, 3, 2, 16, attention="gqa", mlp_hidden=8)
    with pytest.raises(ValueError, match="attention='flash'"):
        ModelShape(1, 8, 4, 4, 2, 16, attention="flash", mlp_hidden=8)
    with pytest.raises(ValueError, match="experts_per_token=5 > n_experts=4"):
        ModelShape(1, 8, 4, 4, 2, 16, mlp="moe", n_experts=4, experts_per_token=5, expert_hidden=4)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        ModelShape(1, 8, 4, 4, 2, 16, attention="mla", mlp_hidden=8)


# ----------------------------------------------------------------------------- the estimate by hand


def test_toy_estimate_by_hand():
    est = estimate(TOY, TOY_CHIP, batch=1, prompt_len=4, new_tokens=3)
    p, d = est.prefill, est.decode
    # Prefill, T = 4 tokens:
    #   matmuls 2 * 1152 (layer matmul params) * 4 + head only for the last token 2 * 128 = 9472
    #   attention: causal pairs 4*5/2 = 10; 2 * 2 layers * 2 heads * 10 * (4 + 4) = 640
    assert p.flops == 9472 + 640 == 10112
    #   weights read: all but the embedding table (1448 - 128 = 1320) + 4 looked-up rows of 8
    #   = 1352 params * 2 bytes = 2704; KV written 4 * 32 = 128;
    #   activations (256 * 4 tokens + head in/out (8 + 16) once) * 2 bytes = 2096
    assert (p.weight_bytes, p.kv_read_bytes, p.kv_write_bytes) == (2704, 0, 128)
    assert p.activation_bytes == 2096 and p.bytes == 4928
    #   10112 FLOPs / 1e9 = 10.112 us > 4928 B / 1e9 = 4.928 us: compute-bound
    assert p.arithmetic_intensity == pytest.approx(10112 / 4928)
    assert p.seconds == pytest.approx(10.112e-6) and p.bound == "compute"
    # Decode at the mean context 4 + (3 + 1) / 2 = 6:
    #   2 * 1280 + attention 2 * 2 * 2 * 6 * 8 = 2560 + 384 = 2944 FLOPs
    #   weights (1320 + 1 row of 8) * 2 = 2656, KV read 6 * 32 = 192, written 32,
    #   activations (256 + 24) * 2 = 560: 3440 bytes -> 3.44 us > 2.944 us: memory-bound
    assert d.flops == 2944
    assert (d.weight_bytes, d.kv_read_bytes, d.kv_write_bytes, d.activation_bytes) == (
        2656,
        192,
        32,
        560,
    )
    assert d.seconds == pytest.approx(3.44e-6) and d.bound == "memory"
    assert est.prefill_seconds == p.seconds and est.decode_seconds_per_token == d.seconds
    assert est.request_seconds == pytest.approx(10.112e-6 + 3 * 3.44e-6)
    # Throughput and money: 1 token per 3.44 us; the chip costs 0.001 USD/s and draws 10 W.
    assert est.tokens_per_second == pytest.approx(1 / 3.44e-6)
    assert est.usd_per_million_output_tokens == pytest.approx(0.001 * 3.44e-6 * 1e6)
    assert est.usd_per_million_input_tokens == pytest.approx(0.001 * 10.112e-6 / 4 * 1e6)
    assert est.joules_per_token == pytest.approx(10 * 3.44e-6)
    assert est.joules_per_input_token == pytest.approx(10 * 10.112e-6 / 4)
    # Memory: weights 1448 * 2 = 2896 B; KV per sequence at the full 7 tokens: 7 * 32 = 224 B.
    # 2896 + 224 = 3120 <= 4000 fits; max batch floor((4000 - 2896) / 224) = 4.
    assert est.weight_bytes == 2896 and est.kv_cache_bytes == 224
    assert est.memory_bytes_per_chip == 3120 and est.fits and est.max_batch == 4
    assert estimate(TOY, TOY_CHIP, batch=4, prompt_len=4, new_tokens=3).fits
    assert not estimate(TOY, TOY_CHIP, batch=5, prompt_len=4, new_tokens=3).fits


def test_toy_tensor_parallel_by_hand():
    est = estimate(
        TOY, TOY_CHIP, batch=1, prompt_len=4, new_tokens=3, tp=2, allreduce_latency_s=1e-6
    )
    d = est.decode
    # FLOPs, weights and activations halve: 1472 FLOPs, 1328 B weights, 280 B activations.
    # One K/V head and 2 chips: the head is replicated, so each chip reads all 192 + 32 B of KV.
    assert (d.flops, d.weight_bytes, d.activation_bytes) == (1472, 1328, 280)
    assert (d.kv_read_bytes, d.kv_write_bytes) == (192, 32)
    assert d.memory_seconds == pytest.approx((1328 + 192 + 32 + 280) / 1e9)
    # All-reduces: 2 per layer x 2 layers of 1 token x 8 values x 2 bytes = 16 B; a ring sends
    # 2 * (2 - 1) / 2 = 1 x the message: 4 * 16 = 64 B, 64 ns at 1 GB/s, + 4 x 1 us latency.
    assert d.comm_bytes == 64
    assert d.comm_seconds == pytest.approx(64e-9 + 4e-6)
    assert d.bound == "interconnect"
    assert d.seconds == pytest.approx(1.832e-6 + 4.064e-6)
    # Two chips cost twice as much per second; per-chip throughput is half the aggregate.
    assert est.usd_per_hour == 7.2 and est.tokens_per_second_per_chip == est.tokens_per_second / 2
    assert est.kv_cache_bytes == 2 * 224  # every chip keeps the replicated head


def test_moe_decode_reads_only_touched_experts():
    # E = 4 experts, k = 2 per token: one token touches 4 * (1 - (1 - 2/4)^1) = 2 experts,
    # two tokens 4 * (1 - 1/4) = 3, and a big batch all 4.
    assert expected_experts_touched(4, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(4, 2, 2) == pytest.approx(3)
    assert expected_experts_touched(4, 2, 1000) == pytest.approx(4)
    # Toy MoE: 1 layer, d_model 4, one 4-wide head, vocab 8, 4 experts of width 2, 1 shared.
    #   attention 4 * 16 = 64, router 4x4 = 16, one expert 3 * 4 * 2 = 24 (x4 stored, x2 active),
    #   shared 24, norms 8: total = 32 + 32 + (8 + 64 + 16 + 96 + 24) + 4 = 276
    #   active = 32 + 32 + (8 + 64 + 16 + 48 + 24) + 4 = 228
    moe = ModelShape(
        1, 4, 1, 1, 4, 8, mlp="moe", n_experts=4, n_shared=1, experts_per_token=2, expert_hidden=2
    )
    assert (moe.total_params, moe.active_params) == (276, 228)
    # Weights read per decode step: 276 - 32 (embedding) - 96 (routed) = 148 always,
    # + touched experts * 24 + looked-up rows * 4:
    #   batch 1: 148 + 48 + 4 = 200 params; batch 2: 148 + 72 + 8 = 228 params (2 bytes each)
    chip = Chip("c", bf16_tflops=1, int8_tops=None, memory_gb=1, memory_gbps=1)
    one = estimate(moe, chip, batch=1, prompt_len=2, new_tokens=1).decode
    two = estimate(moe, chip, batch=2, prompt_len=2, new_tokens=1).decode
    assert one.weight_bytes == pytest.approx(200 * 2)
    assert two.weight_bytes == pytest.approx(228 * 2)
    # int4 weights: a quarter of the bytes
    four = estimate(moe, chip, batch=1, prompt_len=2, new_tokens=1, weight_bits=4).decode
    assert four.weight_bytes == pytest.approx(200 / 2)


def test_mla_decode_attends_in_latent_space():
    # 1 layer, 2 heads of 4, latent r = 6, RoPE key 2: the cache holds 6 + 2 = 8 numbers.
    # Matmuls: q 8x12 = 96, kv_a 8x8 = 64, kv_b 6x16 = 96, o 8x8 = 64, MLP 3 * 64 = 192 -> 512
    mla = ModelShape(
        1, 8, 2, 2, 4, 8, attention="mla", kv_lora_rank=6, rope_head_dim=2, mlp_hidden=8
    )
    assert mla.matmul_params_per_token == 512 + 64  # + head 8x8
    assert kv_cache_bytes_per_token(mla) == 16
    chip = Chip("c", bf16_tflops=1, int8_tops=None, memory_gb=1, memory_gbps=1)
    d = estimate(mla, chip, batch=1, prompt_len=3, new_tokens=2).decode
    # mean context 3 + 1.5 = 4.5; absorbed: per key (6 + 2) + 6 = 14 numbers per head:
    # 2 * 576 + 2 * 1 layer * 2 heads * 4.5 * 14 = 1152 + 252
    assert d.flops == pytest.approx(1404)
    assert d.kv_read_bytes == pytest.approx(4.5 * 16)
    # the plain form (tinylm.model.flops_per_token's convention): qk 4 + 2, v 4 per key
    assert inference_flops_per_token(mla, context=4) == 2 * (576 + 2 * 4 * (6 + 4))


# ----------------------------------------------------------------------------- the story on real chips


def test_llama3_8b_on_h100_decode_memory_bound_prefill_compute_bound(models, chips):
    h100 = chips["H100 SXM"]
    est = estimate(models["Llama-3-8B"], h100, batch=1, prompt_len=2048, new_tokens=256)
    assert est.decode.bound == "memory"
    assert est.decode.arithmetic_intensity < 2 < ridge_point(h100)  # ~1 FLOP per byte
    assert est.prefill.bound == "compute"
    assert est.prefill.arithmetic_intensity > ridge_point(h100)
    # batch-1 decode reads ~15 GB of bf16 weights (8.03B - 0.53B embedding) at 3.35 TB/s
    assert est.decode_seconds_per_token == pytest.approx(15.0e9 / 3.35e12, rel=0.05)
    # batching shares each weight read between sequences: throughput grows with the batch
    big = estimate(models["Llama-3-8B"], h100, batch=64, prompt_len=2048, new_tokens=256)
    assert big.tokens_per_second > 20 * est.tokens_per_second
    assert big.usd_per_million_output_tokens < est.usd_per_million_output_tokens / 20


def test_h20_matches_h100_on_decode_despite_its_compute_deficit(models, chips):
    h100, h20 = chips["H100 SXM"], chips["H20"]
    kw = dict(batch=1, prompt_len=2048, new_tokens=256)
    a = estimate(models["Llama-3-8B"], h100, **kw)
    b = estimate(models["Llama-3-8B"], h20, **kw)
    # 6.7x less compute: prefill (compute-bound on both) is ~6.7x slower ...
    assert b.prefill_seconds / a.prefill_seconds == pytest.approx(989 / 148, rel=0.05)
    # ... but decode (memory-bound) is faster: 4.0 vs 3.35 TB/s
    assert b.decode_seconds_per_token < a.decode_seconds_per_token
    assert a.decode_seconds_per_token / b.decode_seconds_per_token == pytest.approx(
        4.0 / 3.35, rel=0.05
    )
    assert b.usd_per_million_output_tokens < a.usd_per_million_output_tokens


def test_smaller_kv_and_weights_cut_the_decode_bill(models, chips):
    h100 = chips["H100 SXM"]
    kw = dict(batch=32, prompt_len=4096, new_tokens=512)
    # GQA: Llama-3-8B stores 4x less KV per token than Llama-2-7B (8 vs 32 K/V heads).
    l2 = estimate(models["Llama-2-7B"], h100, **kw)
    l3 = estimate(models["Llama-3-8B"], h100, **kw)
    assert l2.decode.kv_read_bytes == pytest.approx(4 * l3.decode.kv_read_bytes)
    # int8 weights halve the weight bytes; int8 KV halves the cache
    q = estimate(models["Llama-3-8B"], h100, weight_bits=8, kv_bits=8, **kw)
    assert q.decode.weight_bytes == pytest.approx(l3.decode.weight_bytes / 2)
    assert q.decode.kv_read_bytes == pytest.approx(l3.decode.kv_read_bytes / 2)
    assert q.decode_seconds_per_token < l3.decode_seconds_per_token


def test_fits_and_max_batch(models, chips):
    h100 = chips["H100 SXM"]
    llama70 = models["Llama-3-70B"]
    one = estimate(llama70, h100, batch=1, prompt_len=1024, new_tokens=1024)
    assert not one.fits and one.max_batch == 0  # 141 GB of bf16 weights > 80 GB
    two = estimate(llama70, h100, batch=1, prompt_len=1024, new_tokens=1024, tp=2)
    assert two.fits and two.max_batch > 0  # 70.6 GB per chip + KV
    at_max = estimate(llama70, h100, batch=two.max_batch, prompt_len=1024, new_tokens=1024, tp=2)
    over = estimate(llama70, h100, batch=two.max_batch + 1, prompt_len=1024, new_tokens=1024, tp=2)
    assert at_max.fits and not over.fits
    # 8 chips share the weights and the (GQA, 8-head) cache: far more sequences fit
    eight = estimate(llama70, h100, batch=1, prompt_len=1024, new_tokens=1024, tp=8)
    assert eight.max_batch > 10 * two.max_batch


def test_every_catalogue_chip_gives_finite_costs(models, chips):
    for chip in chips.values():
        est = estimate(models["Llama-3-8B"], chip, batch=8, prompt_len=512, new_tokens=128, tp=2)
        for value in (
            est.prefill_seconds,
            est.decode_seconds_per_token,
            est.usd_per_million_output_tokens,
            est.joules_per_token,
        ):
            assert math.isfinite(value) and value > 0, chip.name
    # PCIe-only L20 pays far more for tensor parallelism than NVLink H100
    l20 = estimate(models["Llama-3-8B"], chips["L20"], batch=8, prompt_len=512, tp=2)
    h100 = estimate(models["Llama-3-8B"], chips["H100 SXM"], batch=8, prompt_len=512, tp=2)
    assert l20.prefill.comm_seconds > 10 * h100.prefill.comm_seconds


def test_this_machine_without_price_gives_nan_money():
    chip = this_machine(0.1, 10.0)
    est = estimate(TOY, chip, batch=1, prompt_len=4, new_tokens=3)
    assert math.isnan(est.usd_per_million_output_tokens) and math.isnan(est.joules_per_token)
    assert est.fits and est.max_batch is None  # memory unknown: nothing ruled out
    assert "toy" in est.summary()


def test_estimate_rejects_bad_inputs(chips):
    h100 = chips["H100 SXM"]
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        estimate(TOY, h100, batch=0)
    with pytest.raises(ValueError, match="tp=3 does not divide n_head=2"):
        estimate(TOY, h100, tp=3)
    with pytest.raises(ValueError, match=r"weight_bits=3 is not supported; use one of \(4, 8"):
        estimate(TOY, h100, weight_bits=3)
    with pytest.raises(ValueError, match="kv_bits=12"):
        estimate(TOY, h100, kv_bits=12)
    with pytest.raises(ValueError, match=r"memory_efficiency=1.5 must be in \(0, 1\]"):
        estimate(TOY, h100, memory_efficiency=1.5)
    with pytest.raises(ValueError, match="unknown dtype 'fp4'"):
        estimate(TOY, h100, compute_dtype="fp4")
    with pytest.raises(ValueError, match="has no link_gbps"):
        estimate(TOY, this_machine(1.0, 10.0), tp=2)
    gqa = ModelShape(1, 64, 8, 4, 8, 16, attention="gqa", mlp_hidden=8)
    estimate(gqa, h100, tp=8)  # 4 K/V heads replicated over 8 chips: fine
    with pytest.raises(ValueError, match="K/V heads must split"):
        estimate(ModelShape(1, 48, 6, 3, 8, 16, attention="gqa", mlp_hidden=8), h100, tp=2)


# ----------------------------------------------------------------------------- training vs inference


def test_training_vs_inference(models):
    ds = models["DeepSeek-V3"]
    # 6 * N_active * D: 6 * 37.55e9 * 14.8e12 = 3.33e24 FLOPs for DeepSeek-V3's pre-training
    assert training_flops(ds, 14.8e12) == 6 * ds.active_params * 14.8e12
    assert training_flops(ds, 14.8e12) == pytest.approx(3.3e24, rel=0.02)
    # With attention ignored, inference is 2N per token, so the crossover is 3x the training
    # tokens (slightly more, since the embedding table costs nothing at inference).
    cross = crossover_tokens(ds, 14.8e12)
    assert cross == training_flops(ds, 14.8e12) / inference_flops_per_token(ds)
    assert 3 * 14.8e12 < cross < 3.2 * 14.8e12
    # Long contexts make each served token dearer, so the crossover comes sooner.
    assert crossover_tokens(ds, 14.8e12, context=32_000) < cross
    with pytest.raises(ValueError, match="context must be >= 0"):
        inference_flops_per_token(ds, -1)


# ----------------------------------------------------------------------------- the models CSV


def _write_models(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MODEL_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _toy_row(**override):
    row = dict.fromkeys(MODEL_CSV_COLUMNS, "")
    row.update(name="toy", n_layer="2", d_model="8", n_head="2", n_kv_head="1", head_dim="4")
    row.update(vocab="16", attention="gqa", mlp="dense", mlp_hidden="16", tie_embeddings="false")
    row.update(override)
    return row


def test_load_models_round_trip_and_errors(tmp_path):
    assert load_models(_write_models(tmp_path / "ok.csv", [_toy_row()]))["toy"] == TOY
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_models(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match=r"line 2 \(toy\): column 'n_layer' is 'two'"):
        load_models(_write_models(tmp_path / "a.csv", [_toy_row(n_layer="two")]))
    with pytest.raises(ValueError, match="tie_embeddings is 'yes'"):
        load_models(_write_models(tmp_path / "b.csv", [_toy_row(tie_embeddings="yes")]))
    with pytest.raises(ValueError, match="line 3 .*appears twice"):
        load_models(_write_models(tmp_path / "c.csv", [_toy_row(), _toy_row()]))
    with pytest.raises(ValueError, match="n_kv_head=3 must divide"):
        load_models(_write_models(tmp_path / "d.csv", [_toy_row(n_kv_head="3")]))
    (tmp_path / "e.csv").write_text("name,n_layer\ntoy,2\n")
    with pytest.raises(ValueError, match="missing column"):
        load_models(tmp_path / "e.csv")
