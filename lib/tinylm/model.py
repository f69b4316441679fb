"""A small Llama-style GPT: config, layers, the model, and its analytic cost (params, FLOPs, KV).

Token embedding -> n_layer pre-norm blocks (RMSNorm, attention with RoPE, SwiGLU MLP or a
mixture of experts) -> final RMSNorm -> output head. No biases, no dropout. With the same
weights it computes the same logits as Hugging Face's LlamaForCausalLM. The attention
variants (MHA / GQA / MQA / MLA) and the KV cache live in `tinylm.attention`; the mixture of
experts lives in `tinylm.moe`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.attention import (
    CausalSelfAttention,
    KVCache,
    MultiHeadLatentAttention,
    attention_mask,
    rope_tables,
)

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
MLP_KINDS = ("dense", "moe")
MOE_BALANCE_KINDS = ("bias", "aux_loss", "none")


def _round_to_multiple(x: float, multiple: int = 8) -> int:
    """Round x to the nearest multiple (at least one multiple): friendlier matmul shapes."""
    return max(multiple, multiple * round(x / multiple))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"GPTConfig.{name} must be an integer >= {minimum}, got {value!r}; set it to one."
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GPTConfig: unknown {name}={value!r}; choose one of {choices}.")


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT. Defaults give a ~1M-parameter model that trains on a CPU.

    Fields left as None are resolved in __post_init__ (so to_dict() holds the real sizes),
    but only for the kind in use: MLA sizes only for attention="mla", mlp_hidden only for
    mlp="dense", expert sizes only for mlp="moe". Fields of a kind not in use are ignored.
    """

    vocab_size: int = 1024
    context_length: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    # attention: "mha", "gqa" (n_kv_head K/V heads), "mqa" (one K/V head), "mla" (latent)
    attention: str = "mha"
    n_kv_head: int | None = None  # None -> n_head (mha, mla) or 1 (mqa); gqa must set it
    kv_lora_rank: int | None = None  # MLA latent width; None -> n_embd // 2
    q_lora_rank: int | None = None  # MLA query bottleneck; None = full-rank query
    rope_head_dim: int | None = None  # MLA decoupled RoPE width; None -> ~head_dim // 2 (even)
    # MLP: "dense" SwiGLU or "moe" (routed + shared SwiGLU experts, see tinylm.moe)
    mlp: str = "dense"
    mlp_hidden: int | None = None  # None -> 8/3 * n_embd rounded to a multiple of 8
    n_experts: int = 8
    n_shared_experts: int = 1
    experts_per_token: int = 2
    expert_hidden: int | None = None  # None -> dense hidden / (active experts per token)
    moe_balance: str = "bias"  # "bias" (DeepSeek-V3, aux-loss-free), "aux_loss", "none"
    moe_aux_loss_coef: float = 0.01
    moe_bias_update_rate: float = 1e-3
    # numerics
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            _check_int(name, getattr(self, name))
        _check_choice("attention", self.attention, ATTENTION_KINDS)
        _check_choice("mlp", self.mlp, MLP_KINDS)
        _check_choice("moe_balance", self.moe_balance, MOE_BALANCE_KINDS)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_head={self.n_head} does not divide n_embd={self.n_embd} (each "
                f"head gets n_embd // n_head channels); use n_head in {_divisors(self.n_embd)} "
                "or change n_embd."
            )
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a number > 0, got {value!r}.")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"GPTConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}."
            )
        self._resolve_attention()
        self._resolve_mlp()

    def _resolve_attention(self) -> None:
        H, D = self.n_head, self.head_dim
        if self.attention == "mla":
            if self.n_kv_head not in (None, H):
                raise ValueError(
                    f"GPTConfig: attention='mla' has one key/value per query head, so n_kv_head "
                    f"must be None or n_head={H}, got {self.n_kv_head}; remove n_kv_head."
                )
            self.n_kv_head = H
            if self.kv_lora_rank is None:
                self.kv_lora_rank = max(1, self.n_embd // 2)
            if self.rope_head_dim is None:
                self.rope_head_dim = max(2, D // 4 * 2)
            _check_int("kv_lora_rank", self.kv_lora_rank)
            _check_int("rope_head_dim", self.rope_head_dim)
            if self.q_lora_rank is not None:
                _check_int("q_lora_rank", self.q_lora_rank)
            if self.rope_head_dim % 2:
                raise ValueError(
                    f"GPTConfig: rope_head_dim={self.rope_head_dim} is odd, but RoPE rotates "
                    "channel pairs; use an even rope_head_dim."
                )
            return
        if self.n_kv_head is None:
            if self.attention == "gqa":
                raise ValueError(
                    "GPTConfig: attention='gqa' needs n_kv_head (the number of key/value heads); "
                    f"set it to a divisor of n_head={H} below n_head, e.g. {max(1, H // 2)}."
                )
            self.n_kv_head = 1 if self.attention == "mqa" else H
        _check_int("n_kv_head", self.n_kv_head)
        if self.attention == "mha" and self.n_kv_head != H:
            raise ValueError(
                f"GPTConfig: attention='mha' means n_kv_head == n_head={H}, got n_kv_head="
                f"{self.n_kv_head}; use attention='gqa' for fewer key/value heads."
            )
        if self.attention == "mqa" and self.n_kv_head != 1:
            raise ValueError(
                f"GPTConfig: attention='mqa' means n_kv_head=1, got {self.n_kv_head}; "
                "use attention='gqa' for more than one key/value head."
            )
        if H % self.n_kv_head:
            raise ValueError(
                f"GPTConfig: n_kv_head={self.n_kv_head} does not divide n_head={H} (each key/"
                f"value head serves n_head // n_kv_head query heads); use one of {_divisors(H)}."
            )
        if D % 2:
            raise ValueError(
                f"GPTConfig: head_dim = n_embd // n_head = {D} is odd, but RoPE rotates channel "
                "pairs; choose n_embd and n_head so that n_embd // n_head is even."
            )

    def _resolve_mlp(self) -> None:
        dense_hidden = _round_to_multiple(8 * self.n_embd / 3)
        if self.mlp == "dense":
            if self.mlp_hidden is None:
                self.mlp_hidden = dense_hidden
            _check_int("mlp_hidden", self.mlp_hidden)
            return
        _check_int("n_experts", self.n_experts)
        _check_int("experts_per_token", self.experts_per_token)
        _check_int("n_shared_experts", self.n_shared_experts, minimum=0)
        if self.experts_per_token > self.n_experts:
            raise ValueError(
                f"GPTConfig: experts_per_token={self.experts_per_token} > n_experts="
                f"{self.n_experts}: a token cannot use more experts than exist; lower "
                "experts_per_token or raise n_experts."
            )
        if self.expert_hidden is None:
            # Fine-grained experts: the experts a token runs add up to about one dense MLP,
            # so an MoE costs about the same FLOPs per token as the dense model it replaces.
            active = self.experts_per_token + self.n_shared_experts
            self.expert_hidden = _round_to_multiple(dense_hidden / active)
        _check_int("expert_hidden", self.expert_hidden)
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"GPTConfig.{name} must be a number >= 0, got {value!r}.")

    @property
    def head_dim(self) -> int:
        """Channels per attention head (for MLA: the non-RoPE query/key part and the value)."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of all fields (resolved sizes included)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """Build a config from `to_dict()` output; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"GPTConfig.from_dict: unknown key(s) {unknown}; known keys are {sorted(known)}. "
                "Fix the spelling or remove them (was the config written by another version?)."
            )
        return cls(**d)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Same bits as below with the scale folded into the fused op: a decode step runs
            # 2 * n_layer + 1 norms, and each saved op is a few microseconds of a ~1 ms step.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # x * rsqrt(mean(x^2) + eps) in float32 (squares of bf16/fp16 activations lose too
        # much precision), as one fused op.
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """The gated MLP of Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        attn_cls = MultiHeadLatentAttention if config.attention == "mla" else CausalSelfAttention
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = attn_cls(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        if config.mlp == "moe":
            from tinylm.moe import MoE  # lazy: moe.py imports SwiGLU from this module

            self.mlp = MoE(config)
        else:
            self.mlp = SwiGLU(config.n_embd, config.mlp_hidden)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    """The language model: token ids [B, T] -> next-token logits [B, T, vocab_size]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE angles for every position, computed once; a forward slices the rows it needs.
        # Not persistent: they are a function of the config, not learned state.
        rope_dim = config.rope_head_dim if config.attention == "mla" else config.head_dim
        cos, sin = rope_tables(rope_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # nanoGPT / GPT-2: N(0, 0.02) everywhere, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        std = 0.02
        for name, p in self.named_parameters():  # tied weights are listed once
            if p.dim() >= 2:
                residual = name.endswith(("o_proj.weight", "down.weight"))
                nn.init.normal_(
                    p, 0.0, std / math.sqrt(2 * self.config.n_layer) if residual else std
                )

    def forward(
        self, idx: Tensor, cache: KVCache | None = None, pad_mask: Tensor | None = None
    ) -> Tensor:
        """Logits [B, T, vocab_size] for token ids idx [B, T].

        cache: a `new_cache()`; the T tokens are written at positions cache.pos .. +T, attend
            to everything cached before them, and cache.pos advances by T.
        pad_mask: [B, T] bool, True = real token. For batched prompts of different lengths,
            pad on the LEFT: RoPE scores depend only on relative position, so each row gives
            the logits it would give alone. Logits at pad positions are junk.
        """
        if idx.dim() != 2:
            raise ValueError(
                f"idx must be [batch, time] token ids, got shape {tuple(idx.shape)}; "
                "add a batch dim with idx[None]."
            )
        B, T = idx.shape
        pos = 0 if cache is None else cache.pos
        self._check_length(B, T, cache)
        if pad_mask is not None:
            if tuple(pad_mask.shape) != (B, T):
                raise ValueError(
                    f"pad_mask has shape {tuple(pad_mask.shape)} but idx has {(B, T)}; "
                    "give one bool per token (True = real token)."
                )
            pad_mask = pad_mask.to(torch.bool)
        mask = self._attention_mask(pad_mask, cache, pos, T)
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.norm(x))

    def _check_length(self, B: int, T: int, cache: KVCache | None) -> None:
        ctx = self.config.context_length
        if T < 1:
            raise ValueError("idx has no tokens (T = 0); pass at least one token.")
        if cache is None:
            if T > ctx:
                raise ValueError(
                    f"input has {T} tokens but context_length is {ctx}; keep the last {ctx} "
                    f"tokens (idx[:, -{ctx}:]) or use a model with a longer context_length."
                )
            return
        if cache.batch_size != B:
            raise ValueError(
                f"cache was made for batch size {cache.batch_size} but idx has {B} rows; "
                "make a new cache with model.new_cache(batch_size)."
            )
        if cache.pos + T > cache.max_len:
            raise ValueError(
                f"KV cache full: {cache.pos} positions filled + {T} new = {cache.pos + T} > "
                f"cache max_len {cache.max_len} (context_length {ctx}); shorten the input, "
                "cache.reset(), or allocate a larger cache with model.new_cache(max_len=...)."
            )

    def _attention_mask(
        self, pad_mask: Tensor | None, cache: KVCache | None, pos: int, T: int
    ) -> Tensor | None:
        """The SDPA mask of this forward, or None where plain causal attention is right.

        None (the fast path) needs no padded key and queries that line up with the keys from
        position 0 (pos == 0), or a single query, which may see every key before it.
        """
        padded = pad_mask is not None and not bool(pad_mask.all())
        valid = pad_mask if padded else None
        if cache is not None:
            cache.mask[:, pos : pos + T] = True if pad_mask is None else pad_mask
            cache.has_padding |= padded
            valid = cache.mask[:, : pos + T] if cache.has_padding else None
        if valid is None and (pos == 0 or T == 1):
            return None
        return attention_mask(valid, pos, T, self.rope_cos.device)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Preallocate a KV cache for `batch_size` sequences of up to `max_len` tokens.

        Defaults: max_len = context_length, dtype and device of the model's weights.
        """
        ctx = self.config.context_length
        max_len = ctx if max_len is None else max_len
        if not 1 <= max_len <= ctx:
            raise ValueError(
                f"max_len={max_len} must be between 1 and context_length={ctx} (positions "
                "past it were never trained and have no RoPE table); lower max_len."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        weight = self.lm_head.weight
        shapes = [block.attn.cache_shapes() for block in self.blocks]
        return KVCache(batch_size, max_len, shapes, dtype or weight.dtype, device or weight.device)

    def set_mla_absorb(self, absorb: bool = True) -> None:
        """Switch every MLA layer to the absorbed (latent-space) formulation, or back."""
        if self.config.attention != "mla":
            raise ValueError(
                f"set_mla_absorb needs attention='mla', this model has {self.config.attention!r}."
            )
        for block in self.blocks:
            block.attn.absorb = absorb

    def aux_loss(self) -> Tensor:
        """Sum over MoE layers of their balance loss in the last forward (0 for dense)."""
        losses = [getattr(b.mlp, "aux_loss", None) for b in self.blocks]
        losses = [loss for loss in losses if loss is not None]
        if not losses:
            return torch.zeros((), device=self.lm_head.weight.device)
        return torch.stack(losses).sum()


# ----------------------------------------------------------------------------- analytic cost


def _attention_matmul_params(c: GPTConfig) -> int:
    """Weights of the attention projections of one layer (all of them are matmuls)."""
    C, H, D = c.n_embd, c.n_head, c.head_dim
    if c.attention != "mla":
        return C * H * D + 2 * C * c.n_kv_head * D + H * D * C
    Dr, r, rq = c.rope_head_dim, c.kv_lora_rank, c.q_lora_rank
    q = C * H * (D + Dr) if rq is None else C * rq + rq * H * (D + Dr)
    return q + C * (r + Dr) + r * H * 2 * D + H * D * C


def _mlp_params(c: GPTConfig, experts: int | None = None) -> int:
    """Weights of one layer's MLP; for MoE with `experts` routed experts (default: all)."""
    if c.mlp == "dense":
        return 3 * c.n_embd * c.mlp_hidden
    routed = c.n_experts if experts is None else experts
    return c.n_embd * c.n_experts + (routed + c.n_shared_experts) * 3 * c.n_embd * c.expert_hidden


def _param_count(c: GPTConfig, experts: int | None) -> int:
    C = c.n_embd
    norms = 2 * C  # attn_norm, mlp_norm
    if c.attention == "mla":
        norms += c.kv_lora_rank + (c.q_lora_rank or 0)  # kv_norm, q_a_norm
    per_layer = norms + _attention_matmul_params(c) + _mlp_params(c, experts)
    head = 0 if c.tie_embeddings else c.vocab_size * C
    return c.vocab_size * C + head + c.n_layer * per_layer + C


def count_parameters(config: GPTConfig) -> int:
    """Number of parameters of GPT(config) (tied weights once; buffers are not parameters)."""
    return _param_count(config, experts=None)


def active_parameters(config: GPTConfig) -> int:
    """Parameters one token touches in a forward: all but the routed experts it skips.

    Counts the shared experts, the router and experts_per_token routed experts per MoE layer.
    The embedding table is counted in full, as the usual "active parameters" figures do
    (Mixtral's 12.9B, DeepSeek-V3's 37B), although a lookup reads only one row of it.
    For a dense model this equals count_parameters(config).
    """
    return _param_count(config, experts=config.experts_per_token if config.mlp == "moe" else None)


def flops_per_token(config: GPTConfig, context: int) -> int:
    """Forward FLOPs per token when each token attends to `context` keys.

    2 FLOPs per multiply-add of every matmul (projections, active experts, router, output
    head) plus attention: QK^T (head_dim + rope_head_dim per score for MLA) and scores x V
    over `context` keys per head. For a T-token forward, context = T and the full T x T
    square is counted, ignoring that the causal mask makes half of it unused: that is what
    torch.utils.flop_counter counts for SDPA (on CPU the fused kernel
    aten._scaled_dot_product_flash_attention_for_cpu has no formula in torch 2.x and must be
    registered via custom_mapping, see tests/test_model.py). For one cached decode step at
    position p, context = p + 1 is exact. Norms, RoPE, softmax and activations are left out
    (O(n_embd) per token). MLA is counted in its plain form; the absorbed path and the
    plain path's per-step re-expansion of the cached latents differ.
    """
    c = config
    matmuls = c.n_layer * (_attention_matmul_params(c) + _mlp_params(c, c.experts_per_token))
    matmuls += c.n_embd * c.vocab_size  # output head (a table lookup costs no FLOPs)
    qk_dim = c.head_dim + (c.rope_head_dim if c.attention == "mla" else 0)
    attention = c.n_layer * c.n_head * context * (qk_dim + c.head_dim)
    return 2 * (matmuls + attention)


def kv_cache_bytes_per_token(config: GPTConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache stores per token over all layers.

    MHA/GQA/MQA: k and v, 2 * n_layer * n_kv_head * head_dim elements;
    MLA: the latent and the RoPE key, n_layer * (kv_lora_rank + rope_head_dim) elements.
    """
    c = config
    if c.attention == "mla":
        elements = c.n_layer * (c.kv_lora_rank + c.rope_head_dim)
    else:
        elements = 2 * c.n_layer * c.n_kv_head * c.head_dim
    return elements * torch.empty((), dtype=dtype).element_size()
