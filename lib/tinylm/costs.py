"""Analytic inference cost: FLOPs, bytes, seconds, dollars and joules per token on a chip.

A transformer forward is a stack of matmuls plus attention. For each phase of serving we count
what the chip must do and move, then apply the roofline:

    time = max(FLOPs / peak_flops, bytes / memory_bandwidth) + tensor-parallel communication

- Prefill (the prompt, all tokens at once): every weight is read once and used for
  batch * prompt_len tokens, so FLOPs per byte are high: compute-bound on most chips.
- Decode (one new token per sequence per step): every weight is read again for only `batch`
  tokens, and the whole KV cache is read too: few FLOPs per byte, memory-bound. This is why a
  chip with little compute but a lot of memory bandwidth (NVIDIA's export-limited H20) sells
  well for inference, and why MoE (fewer weights touched per token), GQA/MLA (fewer KV bytes)
  and quantisation (fewer bytes per weight) cut the bill.

The model is a shape (`ModelShape`): the sizes from a model's config.json. Every weight matrix
of a layer is listed once in `ModelShape.layer_matmuls`; parameters, FLOPs and activation
traffic are all derived from that one table, so they cannot disagree.

What is left out (all second order for the questions the workbook asks): norms, RoPE,
softmax and activation functions (O(d_model) per token); FlashAttention's re-reads of K/V
during prefill (they mostly hit on-chip memory); quantisation scales; framework overheads,
kernel launch time and scheduling; replicated small tensors under tensor parallelism (norms,
K/V projections when tp > n_kv_head, MLA's shared down-projection); pipeline parallelism.
Expert parallelism (how DeepSeek serves V3) is modelled in tinylm.serving; turning seconds into
dollars, break-even prices and frontiers is tinylm.economics. Efficiencies (`compute_efficiency`, `memory_efficiency`) scale the peaks when
you want to model a real kernel; the defaults (1.0) give the roofline bound, the best a chip
can possibly do.

Comparison with published measurements (roofline = this module at efficiency 1.0):

- NVIDIA NeMo, Llama-2-7B, batch 1, 128 prompt + 20 new tokens, TP1, TensorRT-LLM
  (docs.nvidia.com/nemo-framework/user-guide/latest/performance/llama.html): measured
  234.0 ms on A100 80GB SXM and 153.8 ms on H100. This model's roofline: 6.8 ms prefill +
  20 x 6.5 ms decode = 137 ms on A100; 4.2 + 20 x 4.0 = 84 ms on H100. Measured is 1.7x and
  1.8x the bound: about 55-60% of peak memory bandwidth achieved, typical of batch-1 decode.
- NVIDIA NIM, Llama-3.3-70B (same shapes as Llama-3-70B), FP8, TP2 on 2 x H100, concurrency
  1, 5000 prompt / 500 new tokens (docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance):
  measured inter-token latency 18.58 ms, time to first token 406.8 ms. This model
  (weight_bits=8, compute_dtype="int8", tp=2): 12.2 ms and 212 ms, so measured is 1.5x the
  decode bound and 1.9x the prefill bound.
Both gaps are the expected kind (real kernels reach 50-80% of peak bandwidth and 40-60% of
peak FLOPs), so the model is a ceiling to reason with, not a prediction of a benchmark.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.config import ATTENTION_KINDS, MLP_KINDS, kv_vectors_per_token
from tinylm.hardware import Chip
from tinylm.paths import REPO_ROOT
from tinylm.util import check_int

#: The reference architectures shipped with the workbook.
DEFAULT_MODELS_CSV = REPO_ROOT / "data" / "models.csv"

#: Bit widths the cost model accepts for weights and for the KV cache.
SUPPORTED_BITS = (4, 8, 16, 32)
#: Activations (and the all-reduced hidden states) are kept in bf16: 2 bytes.
ACTIVATION_BYTES = 2
#: Fixed cost of one all-reduce (launch + synchronisation), an assumption of the order NCCL
#: shows for small messages over NVLink. Decode does 2 per layer, so it adds up.
DEFAULT_ALLREDUCE_LATENCY_S = 10e-6


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Matmul:
    """One weight matrix of a layer: d_in -> d_out.

    stored: how many copies the layer holds (n_experts for a routed expert, 1 otherwise).
    active: how many copies one token runs (experts_per_token for a routed expert).
    """

    name: str
    d_in: int
    d_out: int
    stored: int = 1
    active: int = 1
    routed: bool = False

    @property
    def params(self) -> int:
        """Weights of one copy."""
        return self.d_in * self.d_out


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    check_int(f"{owner}: {name}", value, minimum)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its inference cost.

    head_dim is given explicitly (DeepSeek-V3 has 128-wide heads on a 7168-wide model with 128
    heads, so it is not d_model // n_head). For MLA, head_dim is the non-RoPE query/key width
    and the value width (DeepSeek's qk_nope_head_dim = v_head_dim); rope_head_dim is the
    decoupled RoPE key width and kv_lora_rank the cached latent width. For MoE, mlp_hidden is
    the width of the dense MLP used by the first `first_dense_layers` layers (0 if none).
    Name, source, note and the published counts are metadata (not compared by ==).
    """

    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab: int
    attention: str = "mha"
    kv_lora_rank: int = 0
    rope_head_dim: int = 0
    q_lora_rank: int | None = None
    mlp: str = "dense"
    mlp_hidden: int = 0
    n_experts: int = 0
    n_shared: int = 0
    experts_per_token: int = 0
    expert_hidden: int = 0
    first_dense_layers: int = 0
    tie_embeddings: bool = False
    name: str = field(default="model", compare=False)
    source: str = field(default="", compare=False)
    note: str = field(default="", compare=False)
    published_total_params: float | None = field(default=None, compare=False)
    published_active_params: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        who = f"ModelShape {self.name!r}"
        for key in ("n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "vocab"):
            _positive_int(who, key, getattr(self, key))
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"{who}: attention={self.attention!r}; use one of {ATTENTION_KINDS}.")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"{who}: mlp={self.mlp!r}; use one of {MLP_KINDS}.")
        if self.attention == "mla":
            _positive_int(who, "kv_lora_rank", self.kv_lora_rank)
            _positive_int(who, "rope_head_dim", self.rope_head_dim)
            if self.q_lora_rank is not None:
                _positive_int(who, "q_lora_rank", self.q_lora_rank)
        elif self.n_head % self.n_kv_head:
            raise ValueError(
                f"{who}: n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (each K/V "
                "head serves n_head // n_kv_head query heads)."
            )
        if self.mlp == "dense" or self.first_dense_layers:
            _positive_int(who, "mlp_hidden", self.mlp_hidden)
        if self.mlp == "moe":
            _positive_int(who, "n_experts", self.n_experts)
            _positive_int(who, "experts_per_token", self.experts_per_token)
            _positive_int(who, "expert_hidden", self.expert_hidden)
            _positive_int(who, "n_shared", self.n_shared, minimum=0)
            if self.experts_per_token > self.n_experts:
                raise ValueError(
                    f"{who}: experts_per_token={self.experts_per_token} > n_experts="
                    f"{self.n_experts}; lower experts_per_token."
                )
            if not 0 <= self.first_dense_layers <= self.n_layer:
                raise ValueError(
                    f"{who}: first_dense_layers={self.first_dense_layers} must be between 0 "
                    f"and n_layer={self.n_layer}."
                )

    # -- the weight table ------------------------------------------------------------------

    def layer_matmuls(self, moe: bool) -> list[Matmul]:
        """Every weight matrix of one layer (an MoE layer if `moe`, else a dense one)."""
        C, H, Hkv, D = self.d_model, self.n_head, self.n_kv_head, self.head_dim
        if self.attention == "mla":
            # Multi-head latent attention (DeepSeek-V2/V3): the cache holds one latent of width
            # r plus a shared RoPE key of width Dr; per-head keys/values are expanded from it.
            r, Dr, rq = self.kv_lora_rank, self.rope_head_dim, self.q_lora_rank
            if rq is None:
                attn = [Matmul("q", C, H * (D + Dr))]
            else:
                attn = [Matmul("q_a", C, rq), Matmul("q_b", rq, H * (D + Dr))]
            attn += [
                Matmul("kv_a", C, r + Dr),  # x -> latent + RoPE key (this is what is cached)
                Matmul("kv_b", r, H * 2 * D),  # latent -> per-head keys and values
                Matmul("o", H * D, C),
            ]
        else:
            # MHA / GQA / MQA: queries for every head, keys and values for n_kv_head heads.
            attn = [
                Matmul("q", C, H * D),
                Matmul("k", C, Hkv * D),
                Matmul("v", C, Hkv * D),
                Matmul("o", H * D, C),
            ]
        if not moe:
            F = self.mlp_hidden  # SwiGLU: down(silu(gate(x)) * up(x))
            return attn + [Matmul("gate", C, F), Matmul("up", C, F), Matmul("down", F, C)]
        E, k, S, Fe = self.n_experts, self.experts_per_token, self.n_shared, self.expert_hidden
        mlp = [Matmul("router", C, E)]
        for part, d_in, d_out in (("gate", C, Fe), ("up", C, Fe), ("down", Fe, C)):
            mlp.append(Matmul(f"expert_{part}", d_in, d_out, stored=E, active=k, routed=True))
            if S:
                mlp.append(Matmul(f"shared_{part}", d_in, d_out, stored=S, active=S))
        return attn + mlp

    @property
    def n_moe_layers(self) -> int:
        """Layers with a mixture of experts (DeepSeek-V3 keeps its first 3 layers dense)."""
        return self.n_layer - self.first_dense_layers if self.mlp == "moe" else 0

    def _layers(self) -> list[tuple[int, list[Matmul]]]:
        """(number of such layers, their matmuls) for the dense and the MoE layers."""
        groups = [(self.n_layer - self.n_moe_layers, self.layer_matmuls(moe=False))]
        if self.n_moe_layers:
            groups.append((self.n_moe_layers, self.layer_matmuls(moe=True)))
        return [(n, mats) for n, mats in groups if n]

    @property
    def norm_params_per_layer(self) -> int:
        """RMSNorm weights of one layer (MLA adds norms on the latent and the query bottleneck)."""
        extra = self.kv_lora_rank + (self.q_lora_rank or 0) if self.attention == "mla" else 0
        return 2 * self.d_model + extra

    @property
    def head_params(self) -> int:
        """Output head d_model -> vocab (a matmul, tied to the embedding or not)."""
        return self.d_model * self.vocab

    @property
    def embedding_params(self) -> int:
        """Embedding table weights stored beyond the head: 0 when tied to the head."""
        return 0 if self.tie_embeddings else self.vocab * self.d_model

    def _params(self, copies: str) -> int:
        layers = sum(
            n * (self.norm_params_per_layer + sum(m.params * getattr(m, copies) for m in mats))
            for n, mats in self._layers()
        )
        return self.embedding_params + self.head_params + layers + self.d_model  # + final norm

    @property
    def total_params(self) -> int:
        """All parameters (tied weights once): equals tinylm.model.count_parameters."""
        return self._params("stored")

    @property
    def active_params(self) -> int:
        """Parameters one token touches: the routed experts it skips are left out.

        Like tinylm.model.active_parameters, the embedding table is counted in full although a
        lookup reads one row (DeepSeek quotes 36.6B active for V3 *without* it; this gives
        37.55B with its 0.93B embedding).
        """
        return self._params("active")

    @property
    def matmul_params_per_token(self) -> int:
        """Weights one token multiplies through (active matmuls of every layer + output head)."""
        layers = sum(n * sum(m.params * m.active for m in mats) for n, mats in self._layers())
        return layers + self.head_params

    @property
    def routed_expert_params(self) -> int:
        """Weights of one routed expert (gate + up + down)."""
        return 3 * self.d_model * self.expert_hidden if self.mlp == "moe" else 0

    def activation_elements_per_token(self) -> int:
        """Activation elements the layers read and write per token (not counting the head).

        Each matmul reads its input (d_in) and writes its output (d_out) once per copy a token
        runs; everything between matmuls is assumed fused.
        """
        return sum(
            n * sum((m.d_in + m.d_out) * m.active for m in mats) for n, mats in self._layers()
        )

    # -- attention and the KV cache --------------------------------------------------------

    @property
    def kv_elements_per_token(self) -> int:
        """Numbers the KV cache stores per token over all layers.

        MHA/GQA/MQA: a key and a value per K/V head, 2 * n_layer * n_kv_head * head_dim.
        MLA: the latent and the shared RoPE key, n_layer * (kv_lora_rank + rope_head_dim).
        """
        vectors, width = kv_vectors_per_token(self)
        return vectors * width

    @property
    def attention_dims(self) -> tuple[int, int]:
        """(query-key width, value width) per head in the plain (non-absorbed) form."""
        qk = self.head_dim + (self.rope_head_dim if self.attention == "mla" else 0)
        return qk, self.head_dim

    @classmethod
    def from_config(cls, config: Any, name: str = "tinylm") -> ModelShape:
        """The shape of a tinylm GPTConfig (resolved sizes), e.g. ModelShape.from_config(model.config)."""
        c = config
        moe = c.mlp == "moe"
        mla = c.attention == "mla"
        return cls(
            n_layer=c.n_layer,
            d_model=c.n_embd,
            n_head=c.n_head,
            n_kv_head=c.n_kv_head,
            head_dim=c.n_embd // c.n_head,
            vocab=c.vocab_size,
            attention=c.attention,
            kv_lora_rank=c.kv_lora_rank if mla else 0,
            rope_head_dim=c.rope_head_dim if mla else 0,
            q_lora_rank=c.q_lora_rank if mla else None,
            mlp=c.mlp,
            mlp_hidden=0 if moe else c.mlp_hidden,
            n_experts=c.n_experts if moe else 0,
            n_shared=c.n_shared_experts if moe else 0,
            experts_per_token=c.experts_per_token if moe else 0,
            expert_hidden=c.expert_hidden if moe else 0,
            first_dense_layers=0,
            tie_embeddings=c.tie_embeddings,
            name=name,
            source="tinylm.model.GPTConfig",
        )


def kv_cache_bytes_per_token(shape: ModelShape, kv_bits: int = 16) -> int:
    """Bytes the KV cache stores per token (all layers), packed, rounded up to whole bytes.

    Llama-2-7B in bf16: 2 * 32 layers * 32 heads * 128 * 2 bytes = 524,288 B (0.5 MiB/token).
    DeepSeek-V3 (MLA): 61 * (512 + 64) * 2 = 70,272 B, 7.5x less with 2.6x more layers' width.
    """
    _check_bits("kv_bits", kv_bits)
    return math.ceil(shape.kv_elements_per_token * kv_bits / 8)


def decode_attention_per_cached_token(
    shape: ModelShape, kv_bits: int = 16, absorbed: bool = True
) -> tuple[float, float]:
    """(FLOPs, bytes) one decode step spends per cached token on attention, all layers and heads.

    The bytes are the cache entry read back (kv_cache_bytes_per_token). The FLOPs are the
    scores and the weighted sum: per head 2 * (qk + v) for MHA/GQA/MQA. For MLA in the
    absorbed form DeepSeek serves with, every head scores against the cached latent + RoPE key
    and sums cached latents: 2 * ((r + Dr) + r) per head, and all n_head heads read the *same*
    576 numbers, so MLA does far more arithmetic per cached byte than MHA. DeepSeek-V3 in bf16:
    2 * 61 * 128 * 1088 = 17.0 MFLOP per 70,272 B = 242 FLOP/B, above the H20's ridge point
    (37) and the 910B's: compute-bound there. absorbed=False gives MLA's plain form (keys and
    values expanded per head, 2 * (qk + v) per head), the cost of re-expanding the cache.
    """
    qk, v = shape.attention_dims
    if shape.attention == "mla" and absorbed:
        per_head = 2 * ((shape.kv_lora_rank + shape.rope_head_dim) + shape.kv_lora_rank)
    else:
        per_head = 2 * (qk + v)
    flops = float(shape.n_layer * shape.n_head * per_head)
    return flops, float(kv_cache_bytes_per_token(shape, kv_bits))


def expected_experts_touched(n_experts: int, experts_per_token: int, tokens: float) -> float:
    """Expected number of distinct routed experts that `tokens` tokens use in one layer.

    Each token picks k of E experts; if picks are uniform and independent (a balanced router),
    a given expert is missed by one token with probability 1 - k/E, by all of them with
    (1 - k/E)^tokens. So E * (1 - (1 - k/E)^tokens) experts are touched and must be read:
    k for one token, all E once the batch is large. That is why MoE decode gets cheaper per
    token only while the batch is small relative to E / k.
    """
    E, k = n_experts, experts_per_token
    return E * (1.0 - (1.0 - k / E) ** tokens)


# ----------------------------------------------------------------------------- training vs inference


def inference_flops_per_token(shape: ModelShape, context: int = 0) -> int:
    """Forward FLOPs for one token attending to `context` keys: 2 * N_matmul + attention.

    2 FLOPs per multiply-add through every active matmul (the output head included, the
    embedding lookup free) plus QK^T and scores x V over `context` keys in every head. Same
    convention as tinylm.model.flops_per_token (MLA in its plain form), so the two agree.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}.")
    qk, v = shape.attention_dims
    attention = shape.n_layer * shape.n_head * context * (qk + v)
    return 2 * (shape.matmul_params_per_token + attention)


def training_flops(shape: ModelShape, tokens: float) -> float:
    """Training compute ~ 6 * N_active * D: forward 2N per token plus backward 4N per token."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}.")
    return 6.0 * shape.active_params * tokens


def crossover_tokens(shape: ModelShape, training_tokens: float, context: int = 0) -> float:
    """Served tokens after which inference has cost more FLOPs than training did.

    training_flops / inference_flops_per_token: about 3 x the training tokens when attention
    is small (6ND / 2N). DeepSeek-V3 trained on 14.8T tokens, so once it has served ~45T
    tokens its inference compute exceeds its training compute, and that is a few months of
    traffic for a popular model: inference, not training, is the recurring bill.
    """
    return training_flops(shape, training_tokens) / inference_flops_per_token(shape, context)


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class PhaseCost:
    """One forward pass of the whole batch on ONE chip: prefill (all prompt tokens of every
    sequence) or one decode step (one new token per sequence).

    Byte counts are memory traffic (HBM/DRAM) of one chip; flops are that chip's share.
    """

    name: str
    tokens: int  # tokens this forward processes over the whole batch
    flops: float
    weight_bytes: float  # weights read once per forward (MoE: experts actually touched)
    kv_read_bytes: float  # KV cache read by attention
    kv_write_bytes: float  # new keys/values appended to the cache
    activation_bytes: float  # matmul inputs and outputs
    comm_bytes: float  # bytes each chip sends in the tensor-parallel all-reduces
    compute_seconds: float
    memory_seconds: float
    comm_seconds: float

    @property
    def bytes(self) -> float:
        """Total memory traffic of this chip."""
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.activation_bytes

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte of memory traffic; compare with hardware.ridge_point(chip)."""
        return self.flops / self.bytes

    @property
    def seconds(self) -> float:
        """Roofline time: compute and memory overlap; the all-reduces sit between layers."""
        return max(self.compute_seconds, self.memory_seconds) + self.comm_seconds

    @property
    def bound(self) -> str:
        """What limits this phase: "compute", "memory" or "interconnect"."""
        times = {
            "compute": self.compute_seconds,
            "memory": self.memory_seconds,
            "interconnect": self.comm_seconds,
        }
        return max(times, key=times.get)


@dataclass(frozen=True)
class Estimate:
    """The cost of serving `batch` requests of prompt_len + new_tokens on tp chips.

    Latency: prefill_seconds (time to first token for the batch), decode_seconds_per_token
    (time between tokens). Throughput: tokens_per_second is the aggregate decode rate of the
    batch (batch / decode_seconds_per_token, output tokens over all tp chips);
    tokens_per_second_per_chip divides it by tp. Money and energy split the chips' time by
    phase, like API prices: input tokens pay for prefill, output tokens for decode, at the
    rental price and the TDP (an upper bound on power) of all tp chips. NaN where the chip
    lacks a price or power figure.
    """

    model: str
    chip: str
    batch: int
    prompt_len: int
    new_tokens: int
    tp: int
    weight_bits: int
    kv_bits: int
    compute_dtype: str
    prefill: PhaseCost
    decode: PhaseCost  # one step at the mean context prompt_len + (new_tokens + 1) / 2
    weight_bytes: float  # weights stored, all chips together
    kv_cache_bytes: float  # KV cache at the full context for the batch, all chips together
    memory_bytes_per_chip: float  # (weights + KV) per chip
    fits: bool  # weights + KV fit in the chips' memory
    max_batch: int | None  # largest batch that fits at this context (None: memory unknown)
    usd_per_hour: float  # all tp chips
    watts: float  # all tp chips

    @property
    def prefill_seconds(self) -> float:
        """Time to first token: one prefill forward of the whole batch."""
        return self.prefill.seconds

    @property
    def decode_seconds_per_token(self) -> float:
        """Time between tokens: one decode step (each sequence gets one new token)."""
        return self.decode.seconds

    @property
    def request_seconds(self) -> float:
        """End-to-end latency of one request: prefill + new_tokens decode steps."""
        return self.prefill_seconds + self.new_tokens * self.decode_seconds_per_token

    @property
    def tokens_per_second(self) -> float:
        """Aggregate decode throughput of the batch (output tokens/s over the tp chips)."""
        return self.batch / self.decode_seconds_per_token

    @property
    def tokens_per_second_per_chip(self) -> float:
        """Aggregate decode throughput divided by the tp chips that produce it."""
        return self.tokens_per_second / self.tp

    @property
    def input_tokens_per_second(self) -> float:
        """Prefill throughput (prompt tokens/s over the tp chips)."""
        return self.batch * self.prompt_len / self.prefill_seconds

    @property
    def usd_per_million_output_tokens(self) -> float:
        """Rental cost of the decode time, per million generated tokens."""
        return self.usd_per_hour / 3600 / self.tokens_per_second * 1e6

    @property
    def usd_per_million_input_tokens(self) -> float:
        """Rental cost of the prefill time, per million prompt tokens."""
        return self.usd_per_hour / 3600 / self.input_tokens_per_second * 1e6

    @property
    def joules_per_token(self) -> float:
        """Energy per output token at TDP (an upper bound)."""
        return self.watts / self.tokens_per_second

    @property
    def joules_per_input_token(self) -> float:
        """Energy per prompt token at TDP (an upper bound)."""
        return self.watts / self.input_tokens_per_second

    def summary(self) -> str:
        """A few readable lines for notebooks."""
        p, d = self.prefill, self.decode
        return "\n".join(
            [
                f"{self.model} on {self.tp} x {self.chip}: batch {self.batch}, "
                f"{self.prompt_len} prompt + {self.new_tokens} new tokens, "
                f"weights {self.weight_bits}-bit, KV {self.kv_bits}-bit",
                f"  prefill {p.seconds * 1e3:.3g} ms ({p.bound}-bound, "
                f"{p.arithmetic_intensity:.3g} FLOP/B)",
                f"  decode  {d.seconds * 1e3:.3g} ms/token ({d.bound}-bound, "
                f"{d.arithmetic_intensity:.3g} FLOP/B), {self.tokens_per_second:.4g} tokens/s",
                f"  ${self.usd_per_million_output_tokens:.3g} per M output tokens, "
                f"${self.usd_per_million_input_tokens:.3g} per M input tokens, "
                f"{self.joules_per_token:.3g} J/token",
                f"  memory per chip {self.memory_bytes_per_chip / 1e9:.3g} GB "
                f"({'fits' if self.fits else 'does NOT fit'}; max batch {self.max_batch})",
            ]
        )


def _check_bits(name: str, bits: Any) -> None:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise ValueError(f"{name}={bits!r} is not supported; use one of {SUPPORTED_BITS}.")


def _check_tp(shape: ModelShape, tp: int) -> None:
    _positive_int("estimate", "tp", tp)
    if shape.n_head % tp:
        raise ValueError(
            f"tp={tp} does not divide n_head={shape.n_head} of {shape.name!r}: tensor "
            f"parallelism gives each chip n_head // tp heads; use a divisor of {shape.n_head}."
        )
    if shape.attention != "mla" and shape.n_kv_head % tp and tp % shape.n_kv_head:
        raise ValueError(
            f"tp={tp} and n_kv_head={shape.n_kv_head} of {shape.name!r}: K/V heads must split "
            "evenly over the chips or be replicated evenly (one must divide the other)."
        )


def _kv_share_per_chip(shape: ModelShape, tp: int) -> float:
    """Fraction of the full KV cache each chip stores under tensor parallelism.

    GQA/MHA: K/V heads are split, n_kv_head / tp per chip, but never less than one head (with
    more chips than K/V heads, heads are replicated). MLA: the latent is shared by all heads,
    so every chip keeps all of it (which is why DeepSeek serves attention data-parallel).
    """
    if shape.attention == "mla":
        return 1.0
    return max(1, shape.n_kv_head // tp) / shape.n_kv_head


def _weight_bytes_read(shape: ModelShape, tokens: int, weight_bytes: float) -> float:
    """Bytes of weights one forward of `tokens` tokens reads (whole model, before splitting).

    Every weight except the embedding table (a lookup reads only the rows of the tokens) and
    the routed experts no token picked. For MoE, expected_experts_touched() of each layer.
    """
    dense_params = shape.total_params - shape.embedding_params  # head, norms, attention, ...
    dense_params -= shape.n_moe_layers * shape.n_experts * shape.routed_expert_params
    routed_params = 0.0
    if shape.n_moe_layers:
        touched = expected_experts_touched(shape.n_experts, shape.experts_per_token, tokens)
        routed_params = shape.n_moe_layers * touched * shape.routed_expert_params
    embedding_rows = min(tokens, shape.vocab) * shape.d_model if shape.embedding_params else 0
    return (dense_params + routed_params + embedding_rows) * weight_bytes


def _allreduce(
    msg_bytes: float, n_layer: int, tp: int, chip: Chip, latency: float
) -> tuple[float, float]:
    """(bytes sent per chip, seconds) of the 2 all-reduces per layer of tensor parallelism.

    Megatron-style TP splits attention by heads and the MLP by hidden columns; each half-layer
    ends with partial sums that are all-reduced: 2 all-reduces of the hidden states
    (tokens * d_model values) per layer. A ring all-reduce sends 2 (tp-1)/tp of the message
    from every chip (reduce-scatter, then all-gather) at the per-direction link bandwidth, plus
    a fixed latency per all-reduce.
    """
    if tp == 1:
        return 0.0, 0.0
    if not chip.link_gbps:
        raise ValueError(
            f"tp={tp} needs chip-to-chip bandwidth but {chip.name!r} has no link_gbps; "
            "give one (GB/s per direction) or use tp=1."
        )
    sent = 2 * n_layer * 2 * (tp - 1) / tp * msg_bytes
    return sent, sent / chip.link_bytes_per_s + 2 * n_layer * latency


def estimate(
    shape: ModelShape,
    chip: Chip,
    batch: int = 1,
    prompt_len: int = 512,
    new_tokens: int = 256,
    weight_bits: int = 16,
    kv_bits: int = 16,
    tp: int = 1,
    compute_efficiency: float = 1.0,
    memory_efficiency: float = 1.0,
    *,
    compute_dtype: str = "bf16",
    allreduce_latency_s: float = DEFAULT_ALLREDUCE_LATENCY_S,
) -> Estimate:
    """Roofline cost of serving `batch` requests (prompt_len in, new_tokens out) on tp chips.

    weight_bits / kv_bits: storage precision of the weights and the KV cache (4, 8, 16, 32).
    Quantisation here is weight-only: it cuts bytes, while the math runs in `compute_dtype`
    ("bf16", or "int8" for 8-bit tensor-core math, W8A8 / FP8). tp: chips in a
    tensor-parallel group (must divide n_head). compute_efficiency / memory_efficiency: the
    fraction of peak FLOPs / bandwidth real kernels reach (1.0 = the roofline bound).

    Decode is evaluated at the mean context prompt_len + (new_tokens + 1) / 2, which the
    average step attends to. MLA decode uses the absorbed form DeepSeek serves with: scores and
    values are computed against the cached latent (per head 2 * (2r + Dr) FLOPs per key), so
    the cache is never expanded; prefill uses the plain form.
    """
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        _positive_int("estimate", name, value)
    _check_bits("weight_bits", weight_bits)
    _check_bits("kv_bits", kv_bits)
    _check_tp(shape, tp)
    for name, value in (
        ("compute_efficiency", compute_efficiency),
        ("memory_efficiency", memory_efficiency),
    ):
        if not 0 < value <= 1:
            raise ValueError(f"{name}={value!r} must be in (0, 1]; 1.0 means peak.")
    if allreduce_latency_s < 0:
        raise ValueError(f"allreduce_latency_s must be >= 0, got {allreduce_latency_s}.")
    peak = chip.peak_flops(compute_dtype) * compute_efficiency  # raises on an unknown dtype
    bandwidth = chip.memory_bytes_per_s * memory_efficiency

    L, H, C = shape.n_layer, shape.n_head, shape.d_model
    wb, ab = weight_bits / 8, ACTIVATION_BYTES
    kv_token = kv_cache_bytes_per_token(shape, kv_bits) * _kv_share_per_chip(shape, tp)  # per chip
    qk, v = shape.attention_dims
    layer_matmul_params = shape.matmul_params_per_token - shape.head_params
    act_per_token = shape.activation_elements_per_token()
    head_act = C + shape.vocab  # the head reads d_model and writes vocab logits

    def phase(
        name: str,
        tokens: int,
        flops: float,
        weights: float,
        kv_read: float,
        kv_write: float,
        activations: float,
        msg_bytes: float,
    ) -> PhaseCost:
        """Split whole-model FLOPs/weights/activations over the tp chips and time them.

        Tensor parallelism gives every chip n_head / tp heads and 1/tp of every MLP's hidden
        columns: 1/tp of the FLOPs and of the weights. kv_read / kv_write are already per chip.
        Activations are counted as sharded too (an approximation: matmul inputs are replicated).
        """
        comm_bytes, comm_s = _allreduce(msg_bytes, L, tp, chip, allreduce_latency_s)
        traffic = weights / tp + kv_read + kv_write + activations / tp
        return PhaseCost(
            name=name,
            tokens=tokens,
            flops=flops / tp,
            weight_bytes=weights / tp,
            kv_read_bytes=kv_read,
            kv_write_bytes=kv_write,
            activation_bytes=activations / tp,
            comm_bytes=comm_bytes,
            compute_seconds=flops / tp / peak,
            memory_seconds=traffic / bandwidth,
            comm_seconds=comm_s,
        )

    # Prefill: the batch * prompt_len prompt tokens in one forward.
    T = batch * prompt_len
    # Matmuls: 2 FLOPs (multiply + add) per weight per token. The output head runs only for
    # the last prompt token of each sequence: its logits give the first new token.
    prefill_matmul_flops = 2 * layer_matmul_params * T + 2 * shape.head_params * batch
    # Causal attention: query i scores against i keys (qk wide) and sums i values (v wide):
    # P(P+1)/2 query-key pairs per head per layer (FlashAttention skips the masked half).
    pairs = batch * prompt_len * (prompt_len + 1) / 2
    prefill_attention_flops = 2 * L * H * pairs * (qk + v)
    prefill = phase(
        "prefill",
        tokens=T,
        flops=prefill_matmul_flops + prefill_attention_flops,
        weights=_weight_bytes_read(shape, T, wb),  # read once, used by all T tokens
        kv_read=0.0,  # the prompt's K/V are produced and consumed on chip (FlashAttention)
        kv_write=T * kv_token,  # ... and written to the cache for decode
        activations=(act_per_token * T + head_act * batch) * ab,
        msg_bytes=T * C * ab,  # all-reduced hidden states: T tokens x d_model
    )

    # Decode: one new token per sequence per step, attending to `context` cached keys.
    context = prompt_len + (new_tokens + 1) / 2  # the mean over the new_tokens steps
    decode_matmul_flops = 2 * shape.matmul_params_per_token * batch
    if shape.attention == "mla":
        # Absorbed MLA: W_UK is folded into the query and W_UV into the output projection
        # (same matmul FLOPs as the plain form), so each head scores against the cached
        # latent + RoPE key (r + Dr wide) and sums cached latents (r wide) directly.
        per_key = (shape.kv_lora_rank + shape.rope_head_dim) + shape.kv_lora_rank
    else:
        per_key = qk + v
    decode_attention_flops = 2 * L * H * context * per_key * batch
    decode = phase(
        "decode",
        tokens=batch,
        flops=decode_matmul_flops + decode_attention_flops,
        # every weight the batch needs, read again for just `batch` tokens: the memory wall
        weights=_weight_bytes_read(shape, batch, wb),
        kv_read=batch * context * kv_token,  # the whole cache of every sequence
        kv_write=batch * kv_token,
        activations=(act_per_token + head_act) * batch * ab,
        msg_bytes=batch * C * ab,
    )

    # Memory: weights are split over the chips; the KV cache at the full context per chip.
    full_context = prompt_len + new_tokens
    weight_bytes = shape.total_params * wb
    weights_per_chip = weight_bytes / tp
    kv_per_sequence_per_chip = full_context * kv_token
    memory_per_chip = weights_per_chip + batch * kv_per_sequence_per_chip
    capacity = chip.memory_bytes
    if math.isinf(capacity):
        max_batch = None
    else:
        max_batch = max(0, math.floor((capacity - weights_per_chip) / kv_per_sequence_per_chip))
    nan = float("nan")
    return Estimate(
        model=shape.name,
        chip=chip.name,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        tp=tp,
        weight_bits=weight_bits,
        kv_bits=kv_bits,
        compute_dtype=compute_dtype,
        prefill=prefill,
        decode=decode,
        weight_bytes=weight_bytes,
        kv_cache_bytes=tp * batch * kv_per_sequence_per_chip,
        memory_bytes_per_chip=memory_per_chip,
        fits=memory_per_chip <= capacity,
        max_batch=max_batch,
        usd_per_hour=nan if chip.usd_per_hour is None else tp * chip.usd_per_hour,
        watts=nan if chip.watts is None else tp * chip.watts,
    )


# ----------------------------------------------------------------------------- the catalogue

_INT_COLUMNS = (
    "n_layer",
    "d_model",
    "n_head",
    "n_kv_head",
    "head_dim",
    "vocab",
    "kv_lora_rank",
    "rope_head_dim",
    "mlp_hidden",
    "n_experts",
    "n_shared",
    "experts_per_token",
    "expert_hidden",
    "first_dense_layers",
)
MODEL_CSV_COLUMNS = (
    ("name",)
    + _INT_COLUMNS
    + ("q_lora_rank", "attention", "mlp", "tie_embeddings")
    + ("published_total_params", "published_active_params", "source", "note")
)


def load_models(path: str | Path | None = None) -> dict[str, ModelShape]:
    """Read the reference architectures (default: data/models.csv) into {name: ModelShape}.

    One row per model, one column per ModelShape field; empty cells mean "not used" (0, or
    None for q_lora_rank and the published counts). Shipped: Llama-2-7B, Llama-3-8B,
    Llama-3-70B, DeepSeek-V3 and tinylm-default (GPTConfig's defaults).
    """
    path = Path(path) if path is not None else DEFAULT_MODELS_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"model catalogue {path} not found; pass the path of a models CSV "
            f"(the workbook ships one at {DEFAULT_MODELS_CSV})."
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MODEL_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; the header must name {MODEL_CSV_COLUMNS}."
            )
        models: dict[str, ModelShape] = {}
        for line, row in enumerate(reader, start=2):
            name = (row["name"] or "").strip()
            where = f"{path}, line {line} ({name or 'no name'})"
            if not name:
                raise ValueError(f"{where}: empty 'name' column; name the model.")
            if name in models:
                raise ValueError(f"{where}: model {name!r} appears twice; keep one row.")
            kw: dict[str, Any] = {}
            for col in _INT_COLUMNS + ("q_lora_rank",):
                text = (row[col] or "").strip()
                if not text:
                    kw[col] = None if col == "q_lora_rank" else 0
                    continue
                try:
                    kw[col] = int(text)
                except ValueError:
                    raise ValueError(
                        f"{where}: column {col!r} is {text!r}, not a whole number; fix the cell."
                    ) from None
            for col in ("published_total_params", "published_active_params"):
                text = (row[col] or "").strip()
                try:
                    kw[col] = float(text) if text else None
                except ValueError:
                    raise ValueError(
                        f"{where}: column {col!r} is {text!r}, not a number (e.g. 6.74e9)."
                    ) from None
            tie = (row["tie_embeddings"] or "false").strip().lower()
            if tie not in ("true", "false"):
                raise ValueError(f"{where}: tie_embeddings is {tie!r}; write true or false.")
            try:
                models[name] = ModelShape(
                    **kw,
                    attention=(row["attention"] or "").strip(),
                    mlp=(row["mlp"] or "").strip(),
                    tie_embeddings=tie == "true",
                    name=name,
                    source=(row["source"] or "").strip(),
                    note=(row["note"] or "").strip(),
                )
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return models
