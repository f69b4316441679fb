"""Checks for notebook 10, "Your own model".

Three pieces of reading a Hugging Face checkpoint: mapping a tinylm weight name to its name
in a Llama folder (warm-up), the KV-cache bytes per token straight from a config.json
(core), and the bytes of weights one batch-1 decode step reads, tied or untied head
(stretch). The cases use the shapes of SmolLM2-135M, Llama-3.2-1B, TinyLlama-1.1B and
Llama-2-7B as their config.json files publish them; the hints recognise the usual slips
(the grouped K/V heads, a head_dim that is not hidden / heads, the tied head counted twice,
the whole embedding table counted as read).
"""

from __future__ import annotations

import math
import re
from typing import Any

from tinylm.course.exercises.core import check_cases, exercise, unseen

# Plain Python only: listing the exercises should not pay for importing torch.

# Shapes as published in each model's config.json on the Hugging Face hub (inputs, not
# measurements).
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
)  # fmt: skip
LLAMA_32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
)  # fmt: skip
TINYLLAMA_11B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
)  # fmt: skip
LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, tie_word_embeddings=False,
)  # fmt: skip
# A made-up shape whose head_dim is not hidden_size / num_attention_heads (as in Gemma or
# Qwen3), to catch answers that ignore the head_dim field.
WIDE_HEADS = dict(
    vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False,
)  # fmt: skip


# --------------------------------------------------------------------------- warm-up

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
_TOP_NAMES = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def reference_hf_weight_name(name: str) -> str:
    """The name of a tinylm weight in a Hugging Face Llama folder.

    "blocks.3.mlp.gate.weight" -> "model.layers.3.mlp.gate_proj.weight". Layers live under
    "model.layers.i", the embedding and final norm under "model.", the head at the top.
    """
    module = name.removesuffix(".weight")
    if module in _TOP_NAMES:
        return _TOP_NAMES[module] + ".weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"{name!r} is not a weight of a dense tinylm GPT")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def _name_hint(got: Any, expected: str, args: Any) -> str | None:
    if isinstance(got, str) and got.startswith("layers."):
        return "Llama's layers live inside the base model: 'model.layers.i...'"
    if isinstance(got, str) and got.endswith(
        ("mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")
    ):
        return "HF's MLP projections are called gate_proj, up_proj and down_proj"
    if isinstance(got, str) and "_norm" in got:
        return (
            "HF calls the two norms of a block input_layernorm (before attention) and "
            "post_attention_layernorm (before the MLP)"
        )
    if isinstance(got, str) and got.startswith("model.lm_head"):
        return "the head sits next to the base model, not inside it: just 'lm_head.weight'"
    return None


@exercise("ch10.hf_weight_name", difficulty="warm-up", title="tinylm names in a Llama folder")
def _hf_weight_name(answer: Any) -> str:
    names = [
        "blocks.0.attn.q_proj.weight",
        "blocks.11.mlp.gate.weight",
        "blocks.2.mlp.down.weight",
        "blocks.5.attn_norm.weight",
        "blocks.5.mlp_norm.weight",
        "tok_emb.weight",
        "norm.weight",
        "lm_head.weight",
    ]
    names += unseen(lambda r: f"blocks.{r.randint(0, 79)}.{r.choice(sorted(_LAYER_NAMES))}.weight")
    cases = [(n, reference_hf_weight_name(n)) for n in names]
    return check_cases(answer, cases, exact=True, hint=_name_hint)


# --------------------------------------------------------------------------- core


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _kv_heads(config: dict[str, Any]) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def reference_kv_bytes_per_token(config: dict[str, Any], bits: int) -> float:
    """KV-cache bytes per token of a HF Llama-family config.json dict at `bits` per value.

    A key and a value per layer per K/V head, head_dim numbers each. num_key_value_heads
    defaults to num_attention_heads (plain multi-head attention) and head_dim to
    hidden_size // num_attention_heads when the config does not give them.
    """
    layers = config["num_hidden_layers"]
    return 2 * layers * _kv_heads(config) * _head_dim(config) * bits / 8


def _kv_hint(got: Any, expected: float, args: Any) -> str | None:
    config, bits = args
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    try:
        got = float(got)
    except (TypeError, ValueError):
        return None
    if math.isclose(got, expected / 2, rel_tol=1e-9):
        return "store a key AND a value per layer per K/V head: a factor 2"
    if math.isclose(got, expected * 8 / bits, rel_tol=1e-9):
        return "that is a count of numbers; multiply by bits / 8 to get bytes"
    if math.isclose(got, 2 * layers * heads * _head_dim(config) * bits / 8, rel_tol=1e-9):
        return "grouped-query attention caches num_key_value_heads heads, not num_attention_heads"
    plain_dim = config["hidden_size"] // heads
    if math.isclose(got, 2 * layers * _kv_heads(config) * plain_dim * bits / 8, rel_tol=1e-9):
        return "when config.json gives head_dim, use it: it need not be hidden_size / heads"
    return None


@exercise("ch10.kv_bytes_per_token", difficulty="core", title="KV bytes from config.json")
def _kv_bytes_per_token(answer: Any) -> str:
    cases = [
        ((cfg, bits), reference_kv_bytes_per_token(cfg, bits))
        for cfg, bits in (
            (SMOLLM2_135M, 16),
            (LLAMA_32_1B, 16),
            (TINYLLAMA_11B, 8),
            (LLAMA2_7B, 16),
            (WIDE_HEADS, 4),
        )
    ]
    cases += [(args, reference_kv_bytes_per_token(*args)) for args in unseen(_random_config)]
    return check_cases(answer, cases, rel=1e-9, hint=_kv_hint)


# --------------------------------------------------------------------------- stretch


def _random_config(r: Any) -> tuple[dict[str, Any], int]:
    """A random Llama-family config.json dict and a bit width, for the unseen inputs."""
    heads = r.choice((4, 8, 16, 32))
    config: dict[str, Any] = {
        "hidden_size": heads * r.choice((32, 64, 128)),
        "num_attention_heads": heads,
        "num_hidden_layers": r.randint(1, 40),
        "intermediate_size": 64 * r.randint(4, 200),
        "vocab_size": r.randint(1000, 200_000),
        "tie_word_embeddings": r.random() < 0.5,
    }
    if r.random() < 0.7:
        config["num_key_value_heads"] = r.choice([d for d in (1, 2, 4, 8) if heads % d == 0])
    if r.random() < 0.3:
        config["head_dim"] = r.choice((64, 96, 128))
    return config, r.choice((4, 8, 16))


def _params(config: dict[str, Any]) -> tuple[int, int, int]:
    """(layer parameters incl. the final norm, embedding table, separate head) of a config."""
    C, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    H, D, Hkv = config["num_attention_heads"], _head_dim(config), _kv_heads(config)
    attention = C * H * D + 2 * C * Hkv * D + H * D * C
    layer = 2 * C + attention + 3 * C * config["intermediate_size"]
    head = 0 if config.get("tie_word_embeddings", False) else V * C
    return L * layer + C, V * C, head


def reference_decode_weight_bytes(config: dict[str, Any], bits: int) -> float:
    """Bytes of weights one batch-1 decode step reads, from a HF Llama config.json dict.

    Every layer weight and the final norm, the output head (the embedding table itself when
    tie_word_embeddings is true), and of the embedding table only the one row the token
    looks up (unless the table is the head, which is read whole anyway).
    """
    layers, table, head = _params(config)
    tied = config.get("tie_word_embeddings", False)
    read = layers + (table if tied else head + config["hidden_size"])
    return read * bits / 8


def _weights_hint(got: Any, expected: float, args: Any) -> str | None:
    config, bits = args
    layers, table, head = _params(config)
    C = config["hidden_size"]
    tied = config.get("tie_word_embeddings", False)
    try:
        got = float(got)
    except (TypeError, ValueError):
        return None
    if tied and math.isclose(got, (layers + 2 * table) * bits / 8, rel_tol=1e-9):
        return "with tie_word_embeddings the head IS the embedding table: read it once"
    if tied and math.isclose(got, (layers + table + C) * bits / 8, rel_tol=1e-9):
        return "with a tied head the whole table is read as the head; no extra row"
    if not tied and math.isclose(got, (layers + table + head) * bits / 8, rel_tol=1e-9):
        return "a lookup reads one row of the embedding table (hidden_size numbers), not all of it"
    if not tied and math.isclose(got, (layers + head) * bits / 8, rel_tol=1e-9):
        return "the looked-up embedding row is read too: add hidden_size numbers"
    return None


@exercise("ch10.decode_weight_bytes", difficulty="stretch", title="Weights read per token")
def _decode_weight_bytes(answer: Any) -> str:
    cases = [
        ((cfg, bits), reference_decode_weight_bytes(cfg, bits))
        for cfg, bits in (
            (SMOLLM2_135M, 16),
            (LLAMA_32_1B, 4),
            (TINYLLAMA_11B, 16),
            (LLAMA2_7B, 8),
            (WIDE_HEADS, 16),
        )
    ]
    cases += [(args, reference_decode_weight_bytes(*args)) for args in unseen(_random_config)]
    return check_cases(answer, cases, rel=1e-9, hint=_weights_hint)
