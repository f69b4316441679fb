"""A model's inference card: the numbers that decide what serving it costs, in one printout.

    python -m tinylm.card MODEL_DIR [--batch 8] [--no-measure]

MODEL_DIR is a tinylm checkpoint, a Hugging Face Llama-family folder or a hub id (see
tinylm.hf). The card lists parameters (total and active), the bytes of weights one decoded
token reads in each weight format, the KV-cache bytes each token adds, the decode speed
measured here, and for every chip in the catalogue the projected dollars per million output
tokens and whether the model fits. Every figure comes from the modules that own it:
tinylm.costs (the analytic cost model), tinylm.hardware (the chip catalogue with sources)
and tinylm.profile (the timing); this module only gathers and prints them.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm import checkpoint
from tinylm.costs import ModelShape, estimate, kv_cache_bytes_per_token
from tinylm.hardware import Chip, load_chips
from tinylm.hf import load_hf
from tinylm.model import GPT, count_parameters
from tinylm.profile import time_generation

#: Weight formats the card compares (bits per weight; scales of grouped formats not counted).
WEIGHT_BITS = (16, 8, 4)
#: KV-cache formats the card compares.
KV_BITS = (16, 8)


@dataclass
class ChipRow:
    """One chip's projection for the card's workload."""

    chip: str
    weight_bits: int
    usd_per_million_output: float  # NaN when the catalogue has no price for the chip
    decode_tokens_per_s: float  # aggregate over the batch, roofline bound
    fits: bool
    max_batch: int | None
    price_source: str


@dataclass
class InferenceCard:
    """Everything `format_card` prints; the figures are plain numbers for tests and notebooks."""

    name: str
    shape: ModelShape
    params: int
    active_params: int
    weight_bytes_per_token: dict[int, float]  # bits -> bytes of weights read per decoded token
    kv_bytes_per_token: dict[int, int]  # bits -> KV-cache bytes stored per token
    batch: int
    prompt_len: int
    new_tokens: int
    measured_tokens_per_s: float | None  # decode here, batch 1 (None if not measured)
    measured_setting: str = ""
    chips: list[ChipRow] = field(default_factory=list)


def inference_card(
    model: GPT,
    name: str = "model",
    chips: dict[str, Chip] | None = None,
    batch: int = 1,
    prompt_len: int | None = None,
    new_tokens: int | None = None,
    measure: bool = True,
) -> InferenceCard:
    """The inference card of a tinylm GPT (imported or trained): shape, bytes, speed, cost.

    prompt_len / new_tokens: the workload projected onto the chips (default 512 / 256, or
    less when the model's context is shorter). measure: time batch-1 greedy decoding here
    with tinylm.profile.time_generation (a few seconds for a ~100M model).
    """
    config = model.config
    shape = ModelShape.from_config(config, name=name)
    if count_parameters(config) != shape.total_params:  # two homes must agree
        raise AssertionError("tinylm.model and tinylm.costs disagree on the parameter count")
    ctx = config.context_length
    new_tokens = new_tokens or min(256, max(1, ctx // 4))
    prompt_len = prompt_len or min(512, max(1, ctx - new_tokens))
    # Bytes of weights one batch-1 decode step reads (= per token): the cost model's own count.
    weight_bytes = {
        bits: estimate(shape, _any_chip(chips), 1, prompt_len, new_tokens, bits).decode.weight_bytes
        for bits in WEIGHT_BITS
    }
    card = InferenceCard(
        name=name,
        shape=shape,
        params=shape.total_params,
        active_params=shape.active_params,
        weight_bytes_per_token=weight_bytes,
        kv_bytes_per_token={bits: kv_cache_bytes_per_token(shape, bits) for bits in KV_BITS},
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        measured_tokens_per_s=None,
    )
    if measure:
        context = max(1, min(64, ctx - 16))
        record = time_generation(model, (1,), (context,), new_tokens=16, repeats=3)[0]
        card.measured_tokens_per_s = record.decode_tokens_per_s
        card.measured_setting = f"batch 1, {context}-token prompt, 16 greedy tokens, median of 3"
    for chip in (chips or load_chips()).values():
        for bits in (16, 4):
            e = estimate(shape, chip, batch, prompt_len, new_tokens, weight_bits=bits)
            card.chips.append(
                ChipRow(
                    chip=chip.name,
                    weight_bits=bits,
                    usd_per_million_output=e.usd_per_million_output_tokens,
                    decode_tokens_per_s=e.tokens_per_second,
                    fits=e.fits,
                    max_batch=e.max_batch,
                    price_source=chip.certainty.get("usd_per_hour", "no price"),
                )
            )
    return card


def _any_chip(chips: dict[str, Chip] | None) -> Chip:
    """A chip for estimate() where only chip-independent byte counts are read."""
    return next(iter((chips or load_chips()).values()))


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_card(card: InferenceCard) -> str:
    """The card as text."""
    s = card.shape
    lines = [
        f"Inference card: {card.name}",
        f"  shape           {s.n_layer} layers, d_model {s.d_model}, {s.n_head} heads "
        f"({s.n_kv_head} K/V), head_dim {s.head_dim}, vocab {s.vocab}, {s.attention}/{s.mlp}",
        f"  parameters      {card.params:,} ({_si(card.params, '')}); active {card.active_params:,}",
        "  weights read per decoded token (batch 1): "
        + ", ".join(f"{b}-bit {_si(v, 'B')}" for b, v in card.weight_bytes_per_token.items()),
        "  KV cache per token: "
        + ", ".join(f"{b}-bit {_si(v, 'B')}" for b, v in card.kv_bytes_per_token.items()),
    ]
    if card.measured_tokens_per_s is not None:
        lines.append(
            f"  measured here   {card.measured_tokens_per_s:.1f} tokens/s ({card.measured_setting})"
        )
    lines.append(
        f"  projection      batch {card.batch}, {card.prompt_len} prompt + {card.new_tokens} new "
        "tokens, roofline bound (tinylm.costs; prices are assumptions, see data/hardware.csv)"
    )
    lines.append(f"  {'chip':<22}{'weights':>8}{'$/M out':>11}{'tok/s':>12}  fits  max batch")
    for r in card.chips:
        usd = "n/a" if math.isnan(r.usd_per_million_output) else f"{r.usd_per_million_output:.3g}"
        lines.append(
            f"  {r.chip:<22}{str(r.weight_bits) + '-bit':>8}{usd:>11}{r.decode_tokens_per_s:>12.4g}"
            f"  {'yes ' if r.fits else 'NO  '}  {r.max_batch}"
        )
    return "\n".join(lines)


def load_any(model_dir: str) -> tuple[GPT, str]:
    """Load a tinylm checkpoint or a Hugging Face folder / hub id; return (model, name)."""
    path = Path(model_dir)
    config = path / "config.json"
    if config.is_file() and "model_type" not in json.loads(config.read_text(encoding="utf-8")):
        model, _, _ = checkpoint.load(path, device="cpu")
    else:
        model, _ = load_hf(model_dir)
    return model, path.name or model_dir


def main(argv: list[str] | None = None) -> None:
    """Command line: print the inference card of MODEL_DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m tinylm.card", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model_dir", help="tinylm checkpoint, HF Llama-family folder or hub id")
    parser.add_argument("--batch", type=int, default=1, help="batch size projected on the chips")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--no-measure", action="store_true", help="skip timing on this machine")
    args = parser.parse_args(argv)
    model, name = load_any(args.model_dir)
    card = inference_card(
        model,
        name,
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        measure=not args.no_measure,
    )
    print(format_card(card))


if __name__ == "__main__":
    main()


__all__: list[Any] = [
    "ChipRow",
    "InferenceCard",
    "format_card",
    "inference_card",
    "load_any",
    "main",
]
