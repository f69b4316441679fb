"""Tests for the chapter 04 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm.attention import apply_rope
from tinylm.exercises import check, list_exercises, results
from tinylm.exercises.ch04 import (
    ListKVCache,
    _tiny_model,
    reference_attention_with_cache,
    reference_decode_tokens_per_s,
    reference_greedy_with_cache,
    reference_kv_cache_bytes,
    reference_top_p_filter,
)
from tinylm.generate import generate
from tinylm.model import GPTConfig, kv_cache_bytes_per_token

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------- learner answers (fixtures)


def kv_cache_bytes(config, context, batch_size, bytes_per_element):
    return (
        2 * config.n_layer * config.n_kv_head * config.head_dim
        * bytes_per_element * context * batch_size
    )  # fmt: skip


def kv_cache_bytes_query_heads(config, context, batch_size, bytes_per_element):
    return 2 * config.n_layer * config.n_embd * bytes_per_element * context * batch_size


def kv_cache_bytes_keys_only(config, context, batch_size, bytes_per_element):
    return kv_cache_bytes(config, context, batch_size, bytes_per_element) // 2


def top_p_filter(probs, p):
    sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    kept = sorted_p.masked_fill(mass_before >= p, 0.0)
    out = torch.zeros_like(probs).scatter(-1, idx, kept)
    return out / out.sum(-1, keepdim=True)


def top_p_filter_drops_crossing(probs, p):
    sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
    kept = sorted_p.masked_fill(sorted_p.cumsum(-1) > p, 0.0)
    out = torch.zeros_like(probs).scatter(-1, idx, kept)
    return out / out.sum(-1, keepdim=True)


def top_p_filter_not_renormalised(probs, p):
    sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
    kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= p, 0.0)
    return torch.zeros_like(probs).scatter(-1, idx, kept)


def top_p_filter_sorted_order(probs, p):
    sorted_p, _ = torch.sort(probs, descending=True, dim=-1)
    kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= p, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def decode_tokens_per_s(weight_bytes, kv_bytes_per_token, context, batch_size, bandwidth):
    return batch_size * bandwidth / (weight_bytes + batch_size * context * kv_bytes_per_token)


def decode_tokens_per_s_weights_per_sequence(weight_bytes, kv, context, batch_size, bandwidth):
    return batch_size * bandwidth / (batch_size * (weight_bytes + context * kv))


def decode_tokens_per_s_no_kv(weight_bytes, kv, context, batch_size, bandwidth):
    return batch_size * bandwidth / weight_bytes


def greedy_with_cache(model, prompt_ids, max_new_tokens):
    cache = model.new_cache(1)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]), cache=cache)[0, -1]
        for _ in range(max_new_tokens):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache=cache)[0, -1]
    return out


def greedy_recompute(model, prompt_ids, max_new_tokens):
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def greedy_with_cache_off_by_one(model, prompt_ids, max_new_tokens):
    # feeds the prompt's last token again after the prefill: positions shift by one
    cache = model.new_cache(1)
    out = []
    with torch.no_grad():
        model(torch.tensor([prompt_ids]), cache=cache)
        token = prompt_ids[-1]
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([[token]]), cache=cache)[0, -1].argmax())
            out.append(token)
    return out


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references match the lib


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(),
        GPTConfig(n_layer=2, n_head=8, n_embd=64, attention="gqa", n_kv_head=2),
        GPTConfig(attention="mqa"),
    ],
)
def test_reference_kv_cache_bytes_matches_the_model_and_a_real_cache(config):
    per_token = kv_cache_bytes_per_token(config, torch.float32)
    assert reference_kv_cache_bytes(config, 1, 1, 4) == per_token
    assert reference_kv_cache_bytes(config, 10, 3, 2) == 30 * per_token // 2
    from tinylm.model import GPT

    small = GPT(GPTConfig(**{**config.to_dict(), "context_length": 16, "vocab_size": 32}))
    assert small.new_cache(3, max_len=16).nbytes() == reference_kv_cache_bytes(config, 16, 3, 4)


def test_reference_kv_cache_bytes_llama3_8b_is_128_kib_per_token_in_bf16():
    cfg = GPTConfig(n_layer=32, n_head=32, n_embd=4096, attention="gqa", n_kv_head=8)
    assert reference_kv_cache_bytes(cfg, 1, 1, 2) == 131072


def test_reference_top_p_keeps_the_crossing_token_and_renormalises():
    out = reference_top_p_filter(torch.tensor([0.1, 0.6, 0.3]), 0.7)
    torch.testing.assert_close(out, torch.tensor([0.0, 2 / 3, 1 / 3]))
    assert torch.equal(reference_top_p_filter(torch.tensor([0.5, 0.3, 0.2]), 1e-6) > 0,
                       torch.tensor([True, False, False]))  # fmt: skip


def test_reference_decode_bound_is_bandwidth_over_bytes_read():
    assert reference_decode_tokens_per_s(1e9, 0, 10, 1, 1e11) == pytest.approx(100.0)
    # batching divides the weight reads between the sequences
    one = reference_decode_tokens_per_s(1e9, 1e3, 100, 1, 1e11)
    eight = reference_decode_tokens_per_s(1e9, 1e3, 100, 8, 1e11)
    assert 7 < eight / one <= 8


def test_reference_greedy_with_cache_equals_lib_generate():
    model = _tiny_model(0)
    assert reference_greedy_with_cache(model, [1, 2, 3], 15) == generate(
        model, [1, 2, 3], 15, temperature=0
    )


# ----------------------------------------------------------------- the checks


def test_there_are_warm_up_core_and_stretch_exercises():
    ch04 = list_exercises(4)
    assert {ex.id for ex in ch04} == {
        "ch04.kv_cache_bytes",
        "ch04.attention_with_cache",
        "ch04.top_p_filter",
        "ch04.decode_tokens_per_s",
        "ch04.greedy_with_cache",
    }
    assert {ex.difficulty for ex in ch04} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch04.kv_cache_bytes", kv_cache_bytes),
        ("ch04.kv_cache_bytes", reference_kv_cache_bytes),
        ("ch04.top_p_filter", top_p_filter),
        ("ch04.top_p_filter", reference_top_p_filter),
        ("ch04.decode_tokens_per_s", decode_tokens_per_s),
        ("ch04.decode_tokens_per_s", reference_decode_tokens_per_s),
        ("ch04.greedy_with_cache", greedy_with_cache),
        ("ch04.greedy_with_cache", reference_greedy_with_cache),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "expected_in_message"),
    [
        ("ch04.kv_cache_bytes", kv_cache_bytes_query_heads, ["n_kv_head", "GQA"]),
        ("ch04.kv_cache_bytes", kv_cache_bytes_keys_only, ["key AND a value"]),
        ("ch04.top_p_filter", top_p_filter_drops_crossing, ["crosses p"]),
        ("ch04.top_p_filter", top_p_filter_not_renormalised, ["renormalise"]),
        ("ch04.top_p_filter", top_p_filter_sorted_order, ["vocabulary's order"]),
        ("ch04.decode_tokens_per_s", decode_tokens_per_s_weights_per_sequence, ["ONCE per step"]),
        ("ch04.decode_tokens_per_s", decode_tokens_per_s_no_kv, ["KV cache"]),
        ("ch04.greedy_with_cache", greedy_recompute, ["recompute the whole sequence"]),
        ("ch04.greedy_with_cache", greedy_with_cache_off_by_one, ["feed only the token"]),
    ],
)
def test_typical_mistakes_fail_with_a_targeted_hint(
    exercise_id, answer, expected_in_message, exercise
):
    exercise.fails(exercise_id, answer, answer.__name__, "Hint:", *expected_in_message)


@pytest.mark.parametrize(
    "exercise_id",
    [
        "ch04.kv_cache_bytes",
        "ch04.top_p_filter",
        "ch04.decode_tokens_per_s",
        "ch04.greedy_with_cache",
    ],
)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_wrong_shape_is_a_failure_not_a_crash():
    assert check("ch04.top_p_filter", lambda probs, p: probs.sum(-1)) is False
    assert "shape" in results()[-1].message


# ----------------------------------------------------------------- one cached step


def attention_with_cache(attn, x, cache, layer, pos, cos, sin):
    """The notebook's step, written independently: explicit scores, keys repeated for GQA."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    q = apply_rope(q, cos[pos : pos + T], sin[pos : pos + T])
    k = apply_rope(k, cos[pos : pos + T], sin[pos : pos + T])
    k, v = cache.append(layer, k, v)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    S = k.shape[2]
    scores = q @ k.transpose(-2, -1) / D**0.5
    visible = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    y = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def _step(mask, rope_start, append=True, gqa=True):
    """A cached step with one typical mistake switched on."""

    def step(attn, x, cache, layer, pos, cos, sin):
        B, T, C = x.shape
        H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
        q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        start = pos if rope_start == "pos" else 0
        q = apply_rope(q, cos[start : start + T], sin[start : start + T])
        k = apply_rope(k, cos[start : start + T], sin[start : start + T])
        if append:
            k, v = cache.append(layer, k, v)
        S = k.shape[2]
        kwargs = dict(enable_gqa=Hkv != H) if gqa else {}
        if mask == "top_left":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        else:
            visible = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, **kwargs)
        return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))

    return step


attention_is_causal_true = _step("top_left", "pos")  # SDPA's is_causal: top-left corner
attention_rope_from_zero = _step("offset", "zero")  # cos[:T] instead of cos[pos : pos + T]
attention_never_appends = _step("offset", "pos", append=False)  # attends to the new tokens only
attention_without_gqa = _step("offset", "pos", gqa=False)  # shapes clash when n_kv_head < n_head


def test_attention_with_cache_right_answers_pass(exercise):
    exercise.passes("ch04.attention_with_cache", attention_with_cache)
    exercise.passes("ch04.attention_with_cache", reference_attention_with_cache)


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (attention_is_causal_true, "offset the causal mask"),
        (attention_rope_from_zero, "THEIR positions"),
        (attention_never_appends, "append the new keys and values"),
        (attention_without_gqa, "enable_gqa=True"),
    ],
)
def test_attention_with_cache_typical_mistakes_get_their_hint(answer, fragment, exercise):
    exercise.fails("ch04.attention_with_cache", answer, "Hint:", fragment)


def test_attention_with_cache_failure_names_the_chunk(exercise):
    message = exercise.fails("ch04.attention_with_cache", attention_rope_from_zero)
    assert "chunk 1 (1 new token at positions 6..6, 6 cached before" in message


def test_attention_with_cache_stub_is_not_attempted(exercise):
    exercise.not_attempted("ch04.attention_with_cache", stub)


def test_list_cache_appends_along_time():
    cache = ListKVCache(n_layer=2)
    k, v = cache.append(1, torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    k, v = cache.append(1, torch.ones(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert k.shape == v.shape == (1, 2, 4, 4) and cache.k[0] is None
