"""Tests of tinylm.card: the inference card's figures against hand-computed ones."""

from __future__ import annotations

import math

import pytest
import torch

from tinylm import checkpoint
from tinylm.card import format_card, inference_card, main
from tinylm.config import GPTConfig
from tinylm.hardware import Chip
from tinylm.hf import save_hf
from tinylm.model import GPT

# A tiny GQA model whose numbers are easy to compute by hand.
V, C, L, H, HKV, HIDDEN, CTX = 97, 32, 2, 4, 2, 48, 64
D = C // H  # 8


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(
        vocab_size=V,
        context_length=CTX,
        n_layer=L,
        n_head=H,
        n_embd=C,
        attention="gqa",
        n_kv_head=HKV,
        mlp_hidden=HIDDEN,
    )
    return GPT(GPTConfig(**(config | overrides))).eval()


# Hand count: embedding V*C, head V*C, per layer 2 norms + q (C*C) + k, v (C*HKV*D each) +
# o (C*C) + gate, up, down (3*C*HIDDEN), final norm C.
PER_LAYER = 2 * C + C * C + 2 * C * HKV * D + C * C + 3 * C * HIDDEN
PARAMS = 2 * V * C + L * PER_LAYER + C


def chip(memory_gb: float | None = 80.0, usd_per_hour: float | None = 2.0) -> Chip:
    """A chip so fast at math that decode is memory-bound: time = bytes / bandwidth."""
    return Chip(
        name="test chip",
        bf16_tflops=1e9,
        int8_tops=None,
        memory_gb=memory_gb,
        memory_gbps=1000.0,
        usd_per_hour=usd_per_hour,
    )


def test_parameters_and_bytes_per_token_by_hand():
    card = inference_card(tiny_model(), chips={"c": chip()}, measure=False)
    assert card.params == PARAMS == sum(p.numel() for p in tiny_model().parameters())
    assert card.active_params == PARAMS
    # A decode step reads every weight once, but only one row of the embedding table.
    read = PARAMS - V * C + C
    assert card.weight_bytes_per_token == {16: read * 2, 8: read, 4: read / 2}
    # K and V per layer per K/V head, head_dim numbers each.
    assert card.kv_bytes_per_token == {16: 2 * L * HKV * D * 2, 8: 2 * L * HKV * D}


def test_tied_model_counts_the_table_once():
    card = inference_card(tiny_model(tie_embeddings=True), chips={"c": chip()}, measure=False)
    assert card.params == PARAMS - V * C


def test_dollars_per_million_tokens_by_hand():
    batch, prompt, new = 4, 40, 8
    card = inference_card(
        tiny_model(),
        chips={"c": chip()},
        batch=batch,
        prompt_len=prompt,
        new_tokens=new,
        measure=False,
    )
    row16 = next(r for r in card.chips if r.weight_bits == 16)
    # Memory traffic of one decode step of the batch, in bytes (2 bytes per bf16 value):
    weights = (PARAMS - V * C + batch * C) * 2  # the batch reads `batch` embedding rows
    kv_token = 2 * L * HKV * D * 2
    context = prompt + (new + 1) / 2  # the mean context over the new tokens
    kv = batch * context * kv_token + batch * kv_token  # read the cache, append one entry
    # activations: every matmul's input and output per token, then the head's
    per_layer = (C + C) + 2 * (C + HKV * D) + (C + C) + 2 * (C + HIDDEN) + (HIDDEN + C)
    activations = (L * per_layer + C + V) * batch * 2
    seconds = (weights + kv + activations) / 1e12  # 1000 GB/s
    tokens_per_s = batch / seconds
    assert row16.decode_tokens_per_s == pytest.approx(tokens_per_s, rel=1e-9)
    assert row16.usd_per_million_output == pytest.approx(2.0 / 3600 / tokens_per_s * 1e6)
    assert row16.fits


def test_fits_and_missing_price():
    card = inference_card(tiny_model(), chips={"c": chip(memory_gb=1e-6, usd_per_hour=None)},
                          measure=False)  # fmt: skip
    assert all(not r.fits for r in card.chips)
    assert all(math.isnan(r.usd_per_million_output) for r in card.chips)
    assert "n/a" in format_card(card) and "NO" in format_card(card)


def test_measured_tokens_per_second_is_reported():
    card = inference_card(tiny_model(), chips={"c": chip()}, measure=True)
    assert card.measured_tokens_per_s > 0
    assert "measured here" in format_card(card)


@pytest.mark.parametrize("kind", ["hf", "tinylm"])
def test_command_line(tmp_path, capsys, kind):
    model = tiny_model()
    if kind == "hf":
        save_hf(model, None, tmp_path / "m")
    else:
        checkpoint.save(tmp_path / "m", model)
    main([str(tmp_path / "m"), "--no-measure", "--batch", "2"])
    out = capsys.readouterr().out
    assert f"parameters      {PARAMS:,}" in out
    assert "H100 SXM" in out and "Ascend 910B" in out  # the catalogue's chips
    assert "measured here" not in out
