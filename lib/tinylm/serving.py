"""A mixture-of-experts model served the way DeepSeek serves V3: expert parallelism.

`tinylm.costs.estimate` splits a model over chips with tensor parallelism. That does not
work for DeepSeek-V3: its 671B weights do not fit 8 H100s in 8 bits, and MLA's latent cache
is shared by all heads, so tensor parallelism would copy it onto every chip. DeepSeek's
inference-system overview (open-infra-index, day 6 of its Feb 2025 open-source week)
describes what it does instead:

- **Expert parallelism (EP)**: the routed experts are spread over `ep` chips (decode:
  EP144, 18 nodes of 8 H800s, 2 routed experts per GPU with 32 redundant copies; prefill:
  EP32, 9 per GPU). Every token is sent to the chips holding its k experts and the results
  come back: an all-to-all *dispatch* (FP8, 1 byte per value) and *combine* (BF16, 2 bytes)
  per MoE layer, over the scale-out network (InfiniBand, 50 GB/s per H800 in DeepSeek's
  V3 report, arXiv:2412.19437, section 3.2.2).
- **Data-parallel attention**: every chip keeps a full copy of the attention weights (MLA),
  the shared expert and the dense layers, and serves its own `batch_per_chip` sequences with
  their latent caches, so the cache is never duplicated.
- **Prefill and decode pools**: separate chips for the two phases (disaggregation), each
  with its own parallelism; communication is overlapped with computation (two micro-batches).

`ep_decode_step` and `ep_prefill` count one chip's FLOPs, bytes and all-to-all traffic and
take the roofline time: compute (matmuls at the 8-bit peak, MLA attention at the bf16 peak),
memory and network overlap, so the slowest of the three sets the pace (`overlap=False` adds
the network time instead). Routing is assumed balanced (DeepSeek balances experts with
redundant copies); norms, the router's top-k and kernel launch costs are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tinylm.costs import SUPPORTED_BITS, ModelShape, decode_attention_per_cached_token
from tinylm.economics import FrontierPoint, usd_per_million
from tinylm.hardware import Chip
from tinylm.util import is_int

#: Per-direction scale-out bandwidth of one H800 (400 Gb/s InfiniBand), DeepSeek-V3 report.
H800_INFINIBAND_GBPS = 50.0


def all_to_all_bytes_per_token(
    shape: ModelShape, ep: int, dispatch_bytes: float = 1.0, combine_bytes: float = 2.0
) -> float:
    """Bytes one token sends over the network per forward, all MoE layers: dispatch + combine.

    Each MoE layer sends the token's hidden state (d_model values) to each of its k routed
    experts (dispatch) and gets k expert outputs back (combine); the copies whose expert is on
    the token's own chip (1/ep of them, with balanced placement) never leave it:
    n_moe_layers * k * d_model * (dispatch_bytes + combine_bytes) * (1 - 1/ep).
    DeepSeek-V3 on EP144: 58 * 8 * 7168 * 3 * 143/144 = 9.9 MB per token. An upper bound for
    prefill, where DeepSeek's kernels send a token once per node rather than once per expert.
    """
    if shape.mlp != "moe":
        raise ValueError(f"{shape.name!r} has no experts; all-to-all traffic needs an MoE model.")
    if not is_int(ep) or ep < 1:
        raise ValueError(f"ep={ep!r} must be an integer >= 1 (chips sharing the experts).")
    per_layer = shape.experts_per_token * shape.d_model * (dispatch_bytes + combine_bytes)
    return shape.n_moe_layers * per_layer * (1 - 1 / ep)


def _replicated_params(shape: ModelShape) -> int:
    """Weights every chip keeps under DP attention: all but the routed experts (and embedding).

    Attention (MLA), norms, router, shared experts, the dense first layers and the output head.
    The embedding table is a lookup (read a row per token), so it is not read per step.
    """
    routed = shape.n_moe_layers * shape.n_experts * shape.routed_expert_params
    return shape.total_params - routed - shape.embedding_params


def experts_per_chip(shape: ModelShape, ep: int, redundant_experts: int = 0) -> int:
    """Routed experts (per MoE layer) each chip holds: (n_experts + redundant) / ep, rounded up."""
    return math.ceil((shape.n_experts + redundant_experts) / ep)


@dataclass(frozen=True)
class EPStep:
    """One chip's share of an expert-parallel forward (a decode step or a prefill chunk)."""

    chip: str
    ep: int
    tokens_per_chip: int  # decode: sequences on this chip; prefill: prompt tokens per chunk
    context: float
    matmul_flops: float
    attention_flops: float
    weight_bytes: float
    kv_bytes: float
    network_bytes: float
    compute_seconds: float
    memory_seconds: float
    network_seconds: float
    memory_per_chip_bytes: float
    fits: bool
    overlap: bool

    @property
    def seconds(self) -> float:
        """Roofline time: compute, memory and network overlap (or network added after)."""
        busy = max(self.compute_seconds, self.memory_seconds)
        return max(busy, self.network_seconds) if self.overlap else busy + self.network_seconds

    @property
    def bound(self) -> str:
        """What limits the step: "compute", "memory" or "network"."""
        times = {
            "compute": self.compute_seconds,
            "memory": self.memory_seconds,
            "network": self.network_seconds,
        }
        return max(times, key=times.get)

    @property
    def tokens_per_s_per_chip(self) -> float:
        """Tokens this chip finishes per second (decode: one per sequence per step)."""
        return self.tokens_per_chip / self.seconds


def _check(shape: ModelShape, chip: Chip, weight_bits: int, kv_bits: int, network_gbps) -> None:
    if shape.attention != "mla" or shape.mlp != "moe":
        raise ValueError(
            f"{shape.name!r} is not an MLA + MoE model; expert-parallel serving with DP "
            "attention is modelled for DeepSeek-style models (use tinylm.costs.estimate)."
        )
    for name, bits in (("weight_bits", weight_bits), ("kv_bits", kv_bits)):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{name}={bits!r} is not supported; use one of {SUPPORTED_BITS}.")
    if chip.memory_gb is None:
        raise ValueError(f"chip {chip.name!r} has no memory figure; give memory_gb.")
    if not network_gbps or network_gbps <= 0:
        raise ValueError(f"network_gbps={network_gbps!r} must be > 0 (GB/s per direction).")


def _memory(shape, chip, ep, redundant, weight_bits, kv_bits, sequences, max_context):
    wb = weight_bits / 8
    local_experts = shape.n_moe_layers * experts_per_chip(shape, ep, redundant)
    weights = (_replicated_params(shape) + local_experts * shape.routed_expert_params) * wb
    weights += shape.embedding_params * wb  # the table is stored, though read a row at a time
    _, kv_token = decode_attention_per_cached_token(shape, kv_bits)
    total = weights + sequences * max_context * kv_token
    return weights, total, total <= chip.memory_bytes


def _timed_step(chip: Chip, compute_dtype: str, network_gbps: float, **counts: Any) -> EPStep:
    """An EPStep whose three times follow from its counts (one home for decode and prefill).

    Matmuls run at the `compute_dtype` peak, attention at the bf16 peak; weights and KV
    stream at the chip's memory bandwidth; the all-to-all at `network_gbps` per chip.
    """
    return EPStep(
        chip=chip.name,
        compute_seconds=counts["matmul_flops"] / chip.peak_flops(compute_dtype)
        + counts["attention_flops"] / chip.peak_flops("bf16"),
        memory_seconds=(counts["weight_bytes"] + counts["kv_bytes"]) / chip.memory_bytes_per_s,
        network_seconds=counts["network_bytes"] / (network_gbps * 1e9),
        **counts,
    )


def ep_decode_step(
    shape: ModelShape,
    chip: Chip,
    batch_per_chip: int,
    context: float,
    ep: int,
    *,
    redundant_experts: int = 0,
    weight_bits: int = 8,
    kv_bits: int = 16,
    network_gbps: float = H800_INFINIBAND_GBPS,
    max_context: float | None = None,
    overlap: bool = True,
    compute_dtype: str = "int8",
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
) -> EPStep:
    """One decode step on one chip of an expert-parallel deployment (DP attention).

    Each of the `ep` chips serves `batch_per_chip` sequences whose mean cached length is
    `context`. Per step the chip:
    - computes batch_per_chip tokens' worth of matmuls (balanced experts: the expert work of
      all ep * batch tokens is spread evenly), 2 FLOPs per active weight, at the
      `compute_dtype` peak (DeepSeek: FP8), and absorbed MLA attention over its sequences'
      caches at the bf16 peak (decode_attention_per_cached_token);
    - reads its replicated weights (attention, shared expert, dense layers, head) and its
      local routed experts once, plus the KV cache of its sequences;
    - sends all_to_all_bytes_per_token() per token over `network_gbps` (per direction).
    Memory: the weights it holds + its sequences' caches at `max_context` (default: context).
    """
    _check(shape, chip, weight_bits, kv_bits, network_gbps)
    b = batch_per_chip
    matmul_flops = 2.0 * shape.matmul_params_per_token * b
    attn_per_token, kv_token = decode_attention_per_cached_token(shape, kv_bits)
    attention_flops = attn_per_token * context * b
    # weights read: the replicated part + the local experts any token picked (all, at scale)
    wb = weight_bits / 8
    local = experts_per_chip(shape, ep, redundant_experts)
    tokens_global = b * ep
    p_touched = 1 - (1 - shape.experts_per_token / shape.n_experts) ** tokens_global
    expert_bytes = shape.n_moe_layers * local * p_touched * shape.routed_expert_params * wb
    weight_bytes = _replicated_params(shape) * wb + expert_bytes
    kv_bytes = b * context * kv_token
    network = b * all_to_all_bytes_per_token(shape, ep, dispatch_bytes, combine_bytes)
    _, mem, fits = _memory(
        shape, chip, ep, redundant_experts, weight_bits, kv_bits, b, max_context or context
    )
    return _timed_step(
        chip, compute_dtype, network_gbps,
        ep=ep,
        tokens_per_chip=b,
        context=context,
        matmul_flops=matmul_flops,
        attention_flops=attention_flops,
        weight_bytes=weight_bytes,
        kv_bytes=kv_bytes,
        network_bytes=network,
        memory_per_chip_bytes=mem,
        fits=fits,
        overlap=overlap,
    )  # fmt: skip


def ep_prefill(
    shape: ModelShape,
    chip: Chip,
    prompt_len: int,
    ep: int,
    *,
    tokens_per_chip: int | None = None,
    redundant_experts: int = 0,
    weight_bits: int = 8,
    kv_bits: int = 16,
    network_gbps: float = H800_INFINIBAND_GBPS,
    overlap: bool = True,
    compute_dtype: str = "int8",
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
) -> EPStep:
    """One prefill chunk on one chip of an expert-parallel prefill pool.

    The chip processes `tokens_per_chip` prompt tokens (default: one prompt of prompt_len)
    through the matmuls at the `compute_dtype` peak and causal attention in MLA's plain form
    at the bf16 peak (query i attends to i keys: prompt_len (prompt_len + 1) / 2 pairs per
    prompt, 2 * (qk + v) FLOPs per pair per head per layer). It reads its weights once and
    writes the prompt's latent cache; each token sends all_to_all_bytes_per_token().
    """
    _check(shape, chip, weight_bits, kv_bits, network_gbps)
    T = tokens_per_chip or prompt_len
    matmul_flops = 2.0 * shape.matmul_params_per_token * T
    qk, v = shape.attention_dims
    pairs_per_token = (prompt_len + 1) / 2  # mean keys per query under the causal mask
    attention_flops = 2.0 * shape.n_layer * shape.n_head * (qk + v) * pairs_per_token * T
    _, kv_token = decode_attention_per_cached_token(shape, kv_bits)
    wb = weight_bits / 8
    local = experts_per_chip(shape, ep, redundant_experts)
    weight_bytes = (
        _replicated_params(shape) + shape.n_moe_layers * local * shape.routed_expert_params
    ) * wb
    kv_bytes = T * kv_token  # written once
    network = T * all_to_all_bytes_per_token(shape, ep, dispatch_bytes, combine_bytes)
    sequences = max(1, math.ceil(T / prompt_len))
    _, mem, fits = _memory(
        shape, chip, ep, redundant_experts, weight_bits, kv_bits, sequences, prompt_len
    )
    return _timed_step(
        chip, compute_dtype, network_gbps,
        ep=ep,
        tokens_per_chip=T,
        context=pairs_per_token,
        matmul_flops=matmul_flops,
        attention_flops=attention_flops,
        weight_bytes=weight_bytes,
        kv_bytes=kv_bytes,
        network_bytes=network,
        memory_per_chip_bytes=mem,
        fits=fits,
        overlap=overlap,
    )  # fmt: skip


def ep_frontier(
    shape: ModelShape,
    chip: Chip,
    usd_per_hour_per_chip: float,
    watts_per_chip: float,
    context: float,
    ep: int,
    *,
    max_batch: int = 4096,
    **step_kwargs,
) -> list[FrontierPoint]:
    """The decode frontier of an expert-parallel deployment: batch per chip 1, 2, 4, ...

    Ends at the last batch whose weights and caches (at `context`) fit in the chip's memory.
    Same FrontierPoint as tinylm.economics.frontier (tp is reported as 1: every chip serves
    its own sequences).
    """
    points, batch = [], 1
    while batch <= max_batch:
        step = ep_decode_step(shape, chip, batch, context, ep, **step_kwargs)
        if not step.fits:
            break
        per_chip = step.tokens_per_s_per_chip
        points.append(
            FrontierPoint(
                chip=chip.name,
                batch=batch,
                tp=1,
                tokens_per_s_per_user=1 / step.seconds,
                tokens_per_s_per_chip=per_chip,
                usd_per_million_output=usd_per_million(usd_per_hour_per_chip, per_chip),
                tokens_per_s_per_mw=per_chip / watts_per_chip * 1e6,
                bound=step.bound,
                memory_per_chip_gb=step.memory_per_chip_bytes / 1e9,
            )
        )
        batch *= 2
    return points


def batch_for_speed(
    shape: ModelShape,
    chip: Chip,
    tokens_per_s_per_user: float,
    context: float,
    ep: int,
    **step_kwargs,
) -> EPStep | None:
    """The largest batch per chip whose step still gives each user the requested speed.

    Step time grows with the batch, so bisect on whole batches from 1 up to what fits.
    None when even batch 1 is too slow or does not fit.
    """

    def ok(b: int) -> bool:
        step = ep_decode_step(shape, chip, b, context, ep, **step_kwargs)
        return step.fits and 1 / step.seconds >= tokens_per_s_per_user

    if not ok(1):
        return None
    low, high = 1, 2
    while ok(high):
        low, high = high, high * 2
        if high > 1 << 20:
            break
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return ep_decode_step(shape, chip, low, context, ep, **step_kwargs)
