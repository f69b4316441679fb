"""Tests for the chapter 02 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinylm.attention import apply_rope, rope_tables
from tinylm.exercises import check, list_exercises, results
from tinylm.exercises.ch02 import (
    random_attention_layer,
    reference_apply_rope_at,
    reference_block_params,
    reference_causal_attention,
    reference_causal_self_attention,
    reference_forward_flops,
)
from tinylm.model import Block, GPTConfig

# ----------------------------------------------------------------- learner answers (fixtures)


def block_params(n_embd, n_head, mlp_hidden):
    return 4 * n_embd**2 + 3 * n_embd * mlp_hidden + 2 * n_embd


def block_params_without_norms(n_embd, n_head, mlp_hidden):
    return 4 * n_embd**2 + 3 * n_embd * mlp_hidden


def block_params_per_head(n_embd, n_head, mlp_hidden):
    return n_head * 4 * n_embd**2 + 3 * n_embd * mlp_hidden + 2 * n_embd


def forward_flops(config, context):
    c = config
    matmuls = c.n_layer * (4 * c.n_embd**2 + 3 * c.n_embd * c.mlp_hidden)
    matmuls += c.n_embd * c.vocab_size
    attention = c.n_layer * 2 * context * c.n_embd
    return 2 * (matmuls + attention)


def forward_flops_no_attention(config, context):
    return forward_flops(config, 0)


def forward_flops_two_n(config, context):  # counts the embedding lookup as a matmul
    from tinylm.model import count_parameters

    return 2 * count_parameters(config) + 4 * config.n_layer * context * config.n_embd


def causal_attention(q, k, v):
    T, S = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def causal_attention_top_left(q, k, v):  # SDPA's is_causal aligns the mask top-left
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def causal_attention_unscaled(q, k, v):
    T, S = q.shape[-2], k.shape[-2]
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    return (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1) @ v


def apply_rope_at(x, positions, theta=10000.0):
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = positions.float()[:, None] * inv_freq
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rope_interleaved(x, positions, theta=10000.0):
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = positions.float()[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def apply_rope_ignores_positions(x, positions, theta=10000.0):
    return apply_rope_at(x, torch.arange(x.shape[-2]), theta)


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references match the lib


@pytest.mark.parametrize("n_embd, n_head, mlp_hidden", [(128, 4, 344), (64, 8, 176), (32, 1, 40)])
def test_reference_block_params_counts_a_lib_block(n_embd, n_head, mlp_hidden):
    config = GPTConfig(n_embd=n_embd, n_head=n_head, mlp_hidden=mlp_hidden)
    block = Block(config, 0)
    assert reference_block_params(n_embd, n_head, mlp_hidden) == sum(
        p.numel() for p in block.parameters()
    )


def test_reference_causal_attention_is_ordinary_causal_attention_when_square():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(
        reference_causal_attention(q, k, v),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )


def test_reference_rope_at_offset_positions_keeps_relative_scores():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    score = lambda m, n: (
        reference_apply_rope_at(q, torch.tensor([m]))
        @ reference_apply_rope_at(k, torch.tensor([n])).T
    ).item()
    assert score(9, 4) == pytest.approx(score(105, 100), abs=1e-4)


def test_reference_forward_flops_is_two_n_without_embedding_at_context_zero():
    c = GPTConfig()
    n_matmul = c.n_layer * (4 * c.n_embd**2 + 3 * c.n_embd * c.mlp_hidden) + c.n_embd * c.vocab_size
    assert reference_forward_flops(c, 0) == 2 * n_matmul


# ----------------------------------------------------------------- the checks


def test_there_are_warm_up_core_and_stretch_exercises():
    ch02 = list_exercises(2)
    assert {ex.id for ex in ch02} == {
        "ch02.block_params",
        "ch02.causal_self_attention",
        "ch02.forward_flops",
        "ch02.causal_attention",
        "ch02.apply_rope_at",
    }
    assert {ex.difficulty for ex in ch02} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch02.block_params", block_params),
        ("ch02.block_params", reference_block_params),
        ("ch02.forward_flops", forward_flops),
        ("ch02.forward_flops", reference_forward_flops),
        ("ch02.causal_attention", causal_attention),
        ("ch02.causal_attention", reference_causal_attention),
        ("ch02.apply_rope_at", apply_rope_at),
        ("ch02.apply_rope_at", reference_apply_rope_at),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "expected_in_message"),
    [
        ("ch02.block_params", block_params_without_norms, ["RMSNorm weight vectors"]),
        ("ch02.block_params", block_params_per_head, ["do not multiply"]),
        ("ch02.forward_flops", forward_flops_no_attention, ["left out attention"]),
        ("ch02.forward_flops", forward_flops_two_n, ["embedding lookup"]),
        ("ch02.causal_attention", causal_attention_top_left, ["top-left", "diagonal=S - T"]),
        ("ch02.causal_attention", causal_attention_unscaled, ["1 / sqrt(head_dim)"]),
        ("ch02.apply_rope_at", apply_rope_interleaved, ["half-split"]),
        ("ch02.apply_rope_at", apply_rope_ignores_positions, ["positions you are given"]),
    ],
)
def test_typical_mistakes_fail_with_a_targeted_hint(
    exercise_id, answer, expected_in_message, exercise
):
    exercise.fails(exercise_id, answer, answer.__name__, "Hint:", *expected_in_message)


@pytest.mark.parametrize(
    "exercise_id",
    ["ch02.block_params", "ch02.forward_flops", "ch02.causal_attention", "ch02.apply_rope_at"],
)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_wrong_shape_is_a_failure_not_a_crash():
    assert check("ch02.causal_attention", lambda q, k, v: q.sum(-1)) is False
    assert "shape" in results()[-1].message


# ----------------------------------------------------------------- causal self-attention layer


def _split(attn, t, B, T, C):
    return t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)


def causal_self_attention(attn, x, cos, sin):
    """The notebook's layer, written independently of the reference (explicit softmax)."""
    B, T, C = x.shape
    q, k, v = (_split(attn, p(x), B, T, C) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = causal_attention(q, k, v)  # the offset-mask answer above, square here
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def self_attention_without_mask(attn, x, cos, sin):  # wrong: every token sees the future
    B, T, C = x.shape
    q, k, v = (_split(attn, p(x), B, T, C) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return attn.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


def self_attention_heads_merged_without_transpose(attn, x, cos, sin):  # wrong: [B, H, T, D]
    B, T, C = x.shape
    q, k, v = (_split(attn, p(x), B, T, C) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(y.reshape(B, T, C))


def self_attention_split_without_transpose(attn, x, cos, sin):  # wrong: view(B, H, T, D)
    B, T, C = x.shape
    H = attn.n_head
    q, k, v = (p(x).view(B, H, T, C // H) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def self_attention_without_rope(attn, x, cos, sin):  # wrong: no positions at all
    B, T, C = x.shape
    q, k, v = (_split(attn, p(x), B, T, C) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def self_attention_rope_on_values(attn, x, cos, sin):  # wrong: rotates v as well
    B, T, C = x.shape
    q, k, v = (_split(attn, p(x), B, T, C) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k, v = (apply_rope(t, cos, sin) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def test_causal_self_attention_right_answers_pass(exercise):
    exercise.passes("ch02.causal_self_attention", causal_self_attention)
    exercise.passes("ch02.causal_self_attention", reference_causal_self_attention)


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (self_attention_without_mask, "mask the future"),
        (self_attention_heads_merged_without_transpose, "transpose(1, 2).reshape(B, T, C)"),
        (self_attention_split_without_transpose, "view(B, T, n_head, head_dim)"),
        (self_attention_without_rope, "apply RoPE"),
        (self_attention_rope_on_values, "rotate only q and k"),
    ],
)
def test_causal_self_attention_typical_mistakes_get_their_hint(answer, fragment, exercise):
    exercise.fails("ch02.causal_self_attention", answer, "n_head=", "differs", "Hint:", fragment)


def test_causal_self_attention_stub_is_not_attempted(exercise):
    exercise.not_attempted("ch02.causal_self_attention", stub)


def test_reference_self_attention_equals_the_library_layer_with_gqa_off():
    layer = random_attention_layer(64, 4, seed=7)
    x = torch.randn(2, 10, 64)
    cos, sin = rope_tables(16, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            reference_causal_self_attention(layer, x, cos, sin), layer(x, cos, sin, None, None)
        )
