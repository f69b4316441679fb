"""Tests for the chapter 05 checks (right answers pass, typical mistakes fail with a hint)
and for the chapter's training recipes (same budget as each other, derived from "default")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm.attention import apply_rope, rope_tables
from tinylm.costs import expected_experts_touched
from tinylm.exercises import check, list_exercises, results
from tinylm.exercises.ch05 import (
    _mla_layer,
    reference_absorbed_scores,
    reference_experts_touched,
    reference_kv_bytes_per_token,
    reference_moe_layer_params,
    reference_plain_scores,
)
from tinylm.model import (
    GPT,
    GPTConfig,
    active_parameters,
    count_parameters,
    kv_cache_bytes_per_token,
)
from tinylm.recipes import RECIPES, VARIANT_BUDGET_DIVISOR

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------- learner answers (fixtures)


def kv_bytes_per_token(config, bytes_per_element):
    if config.attention == "mla":
        return config.n_layer * (config.kv_lora_rank + config.rope_head_dim) * bytes_per_element
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * bytes_per_element


def kv_bytes_mla_as_key_and_value(config, bytes_per_element):
    if config.attention == "mla":
        return 2 * config.n_layer * (config.kv_lora_rank + config.rope_head_dim) * bytes_per_element
    return kv_bytes_per_token(config, bytes_per_element)


def kv_bytes_mla_without_rope(config, bytes_per_element):
    if config.attention == "mla":
        return config.n_layer * config.kv_lora_rank * bytes_per_element
    return kv_bytes_per_token(config, bytes_per_element)


def kv_bytes_query_heads(config, bytes_per_element):
    if config.attention == "mla":
        return kv_bytes_per_token(config, bytes_per_element)
    return 2 * config.n_layer * config.n_head * config.head_dim * bytes_per_element


def moe_layer_params(config):
    expert = 3 * config.n_embd * config.expert_hidden
    router = config.n_embd * config.n_experts
    total = router + (config.n_experts + config.n_shared_experts) * expert
    active = router + (config.experts_per_token + config.n_shared_experts) * expert
    return total, active


def moe_layer_params_no_router(config):
    total, active = moe_layer_params(config)
    return total - config.n_embd * config.n_experts, active - config.n_embd * config.n_experts


def moe_layer_params_all_active(config):
    total, _ = moe_layer_params(config)
    return total, total


def moe_layer_params_no_shared(config):
    expert = 3 * config.n_embd * config.expert_hidden
    router = config.n_embd * config.n_experts
    return router + config.n_experts * expert, router + config.experts_per_token * expert


def moe_layer_params_one_number(config):
    return moe_layer_params(config)[0]


def experts_touched(n_experts, experts_per_token, tokens):
    return n_experts * (1 - (1 - experts_per_token / n_experts) ** tokens)


def experts_touched_uncapped(n_experts, experts_per_token, tokens):
    return experts_per_token * tokens


def experts_touched_independent_draws(n_experts, experts_per_token, tokens):
    return n_experts * (1 - (1 - 1 / n_experts) ** (experts_per_token * tokens))


def absorbed_scores(attn, x, cos, sin):
    B, T, _ = x.shape
    H, D, Dr, r = attn.n_head, attn.head_dim, attn.rope_head_dim, attn.kv_lora_rank
    q = attn.q_proj(x).view(B, T, H, D + Dr).transpose(1, 2)
    q_nope, q_rope = q.split([D, Dr], dim=-1)
    c_kv, k_rope = attn.kv_a_proj(x).split([r, Dr], dim=-1)
    c_kv, k_rope = attn.kv_norm(c_kv), apply_rope(k_rope, cos, sin)
    w_uk = attn.kv_b_proj.weight.view(H, 2 * D, r)[:, :D]
    content = (q_nope @ w_uk) @ c_kv.transpose(1, 2).unsqueeze(1)
    position = apply_rope(q_rope, cos, sin) @ k_rope.transpose(1, 2).unsqueeze(1)
    return (content + position) * attn.scale


def absorbed_scores_unscaled(attn, x, cos, sin):
    return absorbed_scores(attn, x, cos, sin) / attn.scale


def absorbed_scores_no_rope(attn, x, cos, sin):
    B, T, _ = x.shape
    H, D, Dr, r = attn.n_head, attn.head_dim, attn.rope_head_dim, attn.kv_lora_rank
    q_nope = attn.q_proj(x).view(B, T, H, D + Dr).transpose(1, 2)[..., :D]
    c_kv = attn.kv_norm(attn.kv_a_proj(x)[..., :r])
    w_uk = attn.kv_b_proj.weight.view(H, 2 * D, r)[:, :D]
    return (q_nope @ w_uk) @ c_kv.transpose(1, 2).unsqueeze(1) * attn.scale


def plain_scores(attn, x, cos, sin):  # right numbers, but up-projects the latents
    return reference_plain_scores(attn, x, cos, sin)


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references match the lib


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(),
        GPTConfig(n_layer=2, n_head=8, n_embd=64, attention="gqa", n_kv_head=2),
        GPTConfig(attention="mqa"),
        GPTConfig(attention="mla"),
        GPTConfig(n_layer=3, attention="mla", kv_lora_rank=20, rope_head_dim=6),
    ],
)
def test_reference_kv_bytes_matches_the_model_and_a_real_cache(config):
    assert reference_kv_bytes_per_token(config, 4) == kv_cache_bytes_per_token(config)
    assert reference_kv_bytes_per_token(config, 2) == kv_cache_bytes_per_token(
        config, torch.bfloat16
    )
    small = GPT(GPTConfig(**{**config.to_dict(), "context_length": 16, "vocab_size": 32}))
    assert small.new_cache(1, max_len=16).nbytes() == 16 * reference_kv_bytes_per_token(config, 4)


@pytest.mark.parametrize(
    "config",
    [GPTConfig(mlp="moe"), GPTConfig(n_embd=64, mlp="moe", n_experts=6, n_shared_experts=2)],
)
def test_reference_moe_params_match_the_model(config):
    total, active = reference_moe_layer_params(config)
    model = GPT(config)
    mlp_weights = sum(
        p.numel() for n, p in model.named_parameters() if ".mlp." in n and p.dim() == 2
    )
    assert mlp_weights == config.n_layer * total
    skipped = count_parameters(config) - active_parameters(config)
    assert skipped == config.n_layer * (total - active)


@pytest.mark.parametrize("args", [(8, 2, 1), (8, 2, 100), (256, 8, 32), (5, 5, 2)])
def test_reference_experts_touched_equals_costs_and_its_limits(args):
    E, k, n = args
    assert reference_experts_touched(*args) == pytest.approx(expected_experts_touched(*args))
    assert reference_experts_touched(E, k, 1) == pytest.approx(k)
    assert k <= reference_experts_touched(*args) <= E


def test_reference_experts_touched_matches_random_routing():
    g = torch.Generator().manual_seed(0)
    E, k, n, trials = 8, 2, 5, 4000
    picks = torch.rand(trials, n, E, generator=g).topk(k, dim=-1).indices  # uniform k-subsets
    touched = torch.zeros(trials, E).scatter_(1, picks.reshape(trials, -1), 1.0).sum(1)
    assert touched.mean().item() == pytest.approx(reference_experts_touched(E, k, n), rel=0.02)


def test_reference_mla_scores_reproduce_the_lib_layer_and_each_other():
    attn, cfg = _mla_layer(0)
    x = torch.randn(2, 6, cfg.n_embd, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(cfg.rope_head_dim, 6, cfg.rope_theta)
    with torch.no_grad():
        scores = reference_plain_scores(attn, x, cos, sin)
        torch.testing.assert_close(reference_absorbed_scores(attn, x, cos, sin), scores)
        # softmax(scores) @ values, through o_proj, is the layer's own causal output
        B, T, H, D = 2, 6, attn.n_head, attn.head_dim
        c_kv = attn.kv_norm(attn.kv_a_proj(x)[..., : attn.kv_lora_rank])
        v = attn.kv_b_proj(c_kv).view(B, T, H, 2 * D).transpose(1, 2)[..., D:]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        y = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        out = attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        torch.testing.assert_close(out, attn(x, cos, sin, None, None), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- the checks


IDS = [
    "ch05.kv_bytes_per_token",
    "ch05.moe_layer_params",
    "ch05.experts_touched",
    "ch05.mla_absorbed_scores",
]


def test_there_are_warm_up_core_and_stretch_exercises():
    ch05 = list_exercises(5)
    assert {ex.id for ex in ch05} == set(IDS)
    assert {ex.difficulty for ex in ch05} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch05.kv_bytes_per_token", kv_bytes_per_token),
        ("ch05.kv_bytes_per_token", reference_kv_bytes_per_token),
        ("ch05.moe_layer_params", moe_layer_params),
        ("ch05.moe_layer_params", reference_moe_layer_params),
        ("ch05.experts_touched", experts_touched),
        ("ch05.experts_touched", reference_experts_touched),
        ("ch05.experts_touched", expected_experts_touched),
        ("ch05.mla_absorbed_scores", absorbed_scores),
        ("ch05.mla_absorbed_scores", reference_absorbed_scores),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "expected_in_message"),
    [
        ("ch05.kv_bytes_per_token", kv_bytes_mla_as_key_and_value, ["ONE latent"]),
        ("ch05.kv_bytes_per_token", kv_bytes_mla_without_rope, ["RoPE key"]),
        ("ch05.kv_bytes_per_token", kv_bytes_query_heads, ["n_kv_head"]),
        ("ch05.moe_layer_params", moe_layer_params_no_router, ["router"]),
        ("ch05.moe_layer_params", moe_layer_params_all_active, ["experts_per_token"]),
        ("ch05.moe_layer_params", moe_layer_params_no_shared, ["shared experts"]),
        ("ch05.moe_layer_params", moe_layer_params_one_number, ["pair"]),
        ("ch05.experts_touched", experts_touched_uncapped, ["same expert"]),
        ("ch05.experts_touched", experts_touched_independent_draws, ["DIFFERENT experts"]),
        ("ch05.mla_absorbed_scores", absorbed_scores_unscaled, ["attn.scale"]),
        ("ch05.mla_absorbed_scores", absorbed_scores_no_rope, ["RoPE part"]),
        ("ch05.mla_absorbed_scores", plain_scores, ["kv_b_proj", "q_lat"]),
    ],
)
def test_typical_mistakes_fail_with_a_targeted_hint(
    exercise_id, answer, expected_in_message, exercise
):
    exercise.fails(exercise_id, answer, answer.__name__, "Hint:", *expected_in_message)


@pytest.mark.parametrize("exercise_id", IDS)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_wrong_shape_is_a_failure_not_a_crash():
    assert check("ch05.mla_absorbed_scores", lambda attn, x, cos, sin: x) is False
    assert "shape" in results()[-1].message


# ----------------------------------------------------------------- the chapter's recipes


def test_chapter_05_variants_share_one_budget_derived_from_the_default():
    default = RECIPES["default"]
    variants = {name: RECIPES[name] for name in ("dense", "gqa", "mla", "moe")}
    for recipe in variants.values():
        assert recipe.train == variants["dense"].train  # same steps, batch, schedule, seed
        assert recipe.train.steps == max(1, default.train.steps // VARIANT_BUDGET_DIVISOR)
        assert recipe.train.batch_size == default.train.batch_size
        assert recipe.train.lr == default.train.lr
        assert (recipe.corpus, recipe.vocab_size, recipe.val_fraction) == (
            default.corpus,
            default.vocab_size,
            default.val_fraction,
        )
    assert variants["dense"].model == default.model
    configs = {name: GPTConfig(**r.model) for name, r in variants.items()}
    dense = configs["dense"]
    assert configs["gqa"].n_kv_head < dense.n_head
    assert kv_cache_bytes_per_token(configs["gqa"]) < kv_cache_bytes_per_token(dense)
    assert kv_cache_bytes_per_token(configs["mla"]) < kv_cache_bytes_per_token(dense)
    assert configs["moe"].mlp == "moe" and configs["moe"].moe_balance == "bias"
    for recipe in variants.values():  # a variant only adds settings to the default model's
        assert {k: recipe.model[k] for k in default.model} == default.model
