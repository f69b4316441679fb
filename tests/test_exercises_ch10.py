"""Tests for the chapter 10 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import pytest

from tinylm.config import GPTConfig
from tinylm.costs import ModelShape, estimate, kv_cache_bytes_per_token
from tinylm.course.exercises import check, list_exercises, results
from tinylm.course.exercises.ch10 import (
    LLAMA2_7B,
    SMOLLM2_135M,
    TINYLLAMA_11B,
    reference_decode_weight_bytes,
    reference_hf_weight_name,
    reference_kv_bytes_per_token,
)
from tinylm.hardware import load_chips
from tinylm.hf import config_from_hf, tinylm_to_hf_names
from tinylm.model import GPT

# ----------------------------------------------------------------- learner answers (fixtures)


def hf_weight_name(name):
    table = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn": "self_attn", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # fmt: skip
    if name == "lm_head.weight":
        return name
    if name == "tok_emb.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    parts = name.split(".")
    return ".".join(["model", "layers", parts[1], *[table.get(p, p) for p in parts[2:]]])


def name_without_model_prefix(name):
    return hf_weight_name(name).removeprefix("model.")


def name_keeping_mlp_names(name):
    return hf_weight_name(name).replace("_proj", "") if ".mlp." in name else hf_weight_name(name)


def kv_bytes_per_token(config, bits):
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv * d * bits / 8


def kv_query_heads(config, bits):
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_attention_heads"] * d * bits / 8


def kv_ignores_head_dim(config, bits):
    d = config["hidden_size"] // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv * d * bits / 8


def kv_keys_only(config, bits):
    return kv_bytes_per_token(config, bits) / 2


def _layers(config):
    C, L = config["hidden_size"], config["num_hidden_layers"]
    H = config["num_attention_heads"]
    D = config.get("head_dim") or C // H
    Hkv = config.get("num_key_value_heads") or H
    per_layer = 2 * C + 2 * C * H * D + 2 * C * Hkv * D + 3 * C * config["intermediate_size"]
    return L * per_layer + C


def decode_weight_bytes(config, bits):
    C, V = config["hidden_size"], config["vocab_size"]
    if config.get("tie_word_embeddings"):
        return (_layers(config) + V * C) * bits / 8
    return (_layers(config) + V * C + C) * bits / 8


def weights_tied_twice(config, bits):
    C, V = config["hidden_size"], config["vocab_size"]
    return (_layers(config) + 2 * V * C if config.get("tie_word_embeddings") else _layers(config)
            + V * C + C) * bits / 8  # fmt: skip


def weights_whole_table(config, bits):
    C, V = config["hidden_size"], config["vocab_size"]
    if config.get("tie_word_embeddings"):
        return (_layers(config) + V * C) * bits / 8
    return (_layers(config) + 2 * V * C) * bits / 8


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references agree with lib


def test_weight_names_agree_with_tinylm_hf():
    for ours, theirs in tinylm_to_hf_names(3).items():
        assert reference_hf_weight_name(ours) == theirs


@pytest.mark.parametrize("config", [SMOLLM2_135M, TINYLLAMA_11B, LLAMA2_7B])
def test_references_agree_with_the_cost_model(config):
    hf = dict(config, model_type="llama", max_position_embeddings=2048)
    shape = ModelShape.from_config(config_from_hf(hf))
    for bits in (16, 8):
        assert reference_kv_bytes_per_token(config, bits) == kv_cache_bytes_per_token(shape, bits)
        e = estimate(shape, load_chips()["H100 SXM"], 1, 64, 1, weight_bits=bits)
        assert reference_decode_weight_bytes(config, bits) == e.decode.weight_bytes


def test_reference_counts_a_real_model_by_hand():
    """On a small model built from the config: every parameter is counted once."""
    config = dict(SMOLLM2_135M, num_hidden_layers=2, vocab_size=50, model_type="llama")
    model = GPT(config_from_hf(dict(config, max_position_embeddings=32)))
    n = sum(p.numel() for p in model.parameters())  # tied: the table once
    assert reference_decode_weight_bytes(config, 32) == n * 4  # tied: the table is the head
    untied = GPT(GPTConfig(**(model.config.to_dict() | {"tie_embeddings": False})))
    n_untied = sum(p.numel() for p in untied.parameters())
    table = config["vocab_size"] * config["hidden_size"]
    untied_config = dict(config, tie_word_embeddings=False)
    expected = (n_untied - table + config["hidden_size"]) * 4
    assert reference_decode_weight_bytes(untied_config, 32) == expected


# ----------------------------------------------------------------- the checks

IDS = ["ch10.hf_weight_name", "ch10.kv_bytes_per_token", "ch10.decode_weight_bytes"]


def test_there_are_warm_up_core_and_stretch_exercises():
    ch10 = list_exercises(10)
    assert {ex.id for ex in ch10} == set(IDS)
    assert {ex.difficulty for ex in ch10} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch10.hf_weight_name", hf_weight_name),
        ("ch10.hf_weight_name", reference_hf_weight_name),
        ("ch10.kv_bytes_per_token", kv_bytes_per_token),
        ("ch10.kv_bytes_per_token", reference_kv_bytes_per_token),
        ("ch10.decode_weight_bytes", decode_weight_bytes),
        ("ch10.decode_weight_bytes", reference_decode_weight_bytes),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "expected_in_message"),
    [
        ("ch10.hf_weight_name", name_without_model_prefix, ["model.layers"]),
        ("ch10.hf_weight_name", name_keeping_mlp_names, ["gate_proj"]),
        ("ch10.kv_bytes_per_token", kv_query_heads, ["num_key_value_heads"]),
        ("ch10.kv_bytes_per_token", kv_ignores_head_dim, ["head_dim"]),
        ("ch10.kv_bytes_per_token", kv_keys_only, ["a factor 2"]),
        ("ch10.decode_weight_bytes", weights_tied_twice, ["read it once"]),
        ("ch10.decode_weight_bytes", weights_whole_table, ["one row"]),
    ],
)
def test_typical_mistakes_fail_with_a_targeted_hint(
    exercise_id, answer, expected_in_message, exercise
):
    exercise.fails(exercise_id, answer, answer.__name__, "Hint:", *expected_in_message)


@pytest.mark.parametrize("exercise_id", IDS)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_non_numbers_are_a_failure_not_a_crash():
    for exercise_id in IDS:
        assert check(exercise_id, lambda *args: 3.5) is False
        assert results()[-1].status == "failed"
