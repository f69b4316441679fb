"""A small Llama-style GPT: the model, then its analytic cost (parameters, FLOPs, KV bytes).

Token embedding -> n_layer pre-norm blocks (RMSNorm, attention with RoPE, SwiGLU MLP or a
mixture of experts) -> final RMSNorm -> output head. No biases, no dropout. With the same
weights it computes the same logits as Hugging Face's LlamaForCausalLM. The pieces live one
level down: GPTConfig in `tinylm.config`, RMSNorm / SwiGLU / RoPE in `tinylm.layers`, the
attention variants (MHA / GQA / MQA / MLA) and the KV cache in `tinylm.attention`, the
mixture of experts in `tinylm.moe`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tinylm.attention import (
    CausalSelfAttention,
    KVCache,
    MultiHeadLatentAttention,
    attention_mask,
    rope_tables,
)
from tinylm.config import (
    ATTENTION_KINDS,
    MLP_KINDS,
    MOE_BALANCE_KINDS,
    GPTConfig,
    kv_vectors_per_token,
)
from tinylm.layers import RMSNorm, SwiGLU
from tinylm.moe import MoE
from tinylm.util import check_memory

# GPTConfig and the kinds live in tinylm.config, RMSNorm and SwiGLU in tinylm.layers; they
# stay importable from here.
__all__ = [
    "ATTENTION_KINDS",
    "MLP_KINDS",
    "MOE_BALANCE_KINDS",
    "GPT",
    "Block",
    "GPTConfig",
    "RMSNorm",
    "SwiGLU",
    "active_parameters",
    "count_parameters",
    "flops_per_token",
    "kv_cache_bytes_per_token",
]


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm(x)); x += mlp(norm(x)).

    With config.norm_placement="post" it is the original Transformer's post-norm block,
    x = norm(x + attn(x)); x = norm(x + mlp(x)): every residual sum is normalised, so no
    clean path runs from the output back to the embedding (chapter 03's ablation).
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        attn_cls = MultiHeadLatentAttention if config.attention == "mla" else CausalSelfAttention
        self.post_norm = config.norm_placement == "post"
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = attn_cls(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        if config.mlp == "moe":
            self.mlp = MoE(config)
        else:
            self.mlp = SwiGLU(config.n_embd, config.mlp_hidden)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, cos, sin, mask, cache))
            return self.mlp_norm(x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    """The language model: token ids [B, T] -> next-token logits [B, T, vocab_size]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Big presets (GPTConfig.preset("300M")) are 1+ GB in float32: fail clearly, not swap.
        check_memory(
            4 * count_parameters(config), f"a GPT of {count_parameters(config) / 1e6:.0f}M "
            "parameters (float32)", "close other programs or use a smaller config, e.g. "
            "GPTConfig.preset('100M') or GPTConfig()",
        )  # fmt: skip
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE angles for every position, computed once; a forward slices the rows it needs.
        # Not persistent: they are a function of the config, not learned state.
        rope_dim = config.rope_head_dim if config.attention == "mla" else config.head_dim
        cos, sin = rope_tables(
            rope_dim, config.context_length, config.rope_theta, config.rope_scaling
        )
        if config.position == "none":  # rotate by angle 0 everywhere: RoPE becomes the identity
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # What new_cache builds: the float KVCache, or another KVCache class (int8, ...).
        self.kv_cache_class: type[KVCache] = KVCache
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
        if cache is not None:
            valid = cache.record_tokens(pad_mask, T)  # None while no padding was seen
        else:
            valid = pad_mask if pad_mask is not None and not bool(pad_mask.all()) else None
        if valid is None and (pos == 0 or T == 1):
            return None
        return attention_mask(valid, pos, T, self.rope_cos.device)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cache_class: type[KVCache] | None = None,
    ) -> KVCache:
        """Preallocate a KV cache for `batch_size` sequences of up to `max_len` tokens.

        Defaults: max_len = context_length, dtype and device of the model's weights, and the
        cache class `self.kv_cache_class` (KVCache; tinylm.quant.set_kv_cache(model, "int8")
        makes it the int8 cache, so every caller of new_cache, generate included, gets that).
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
        weight = self.tok_emb.weight  # always float, even in a model with a quantised head
        shapes = [block.attn.cache_shapes() for block in self.blocks]
        cls = cache_class or self.kv_cache_class
        return cls(batch_size, max_len, shapes, dtype or weight.dtype, device or weight.device)

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
    vectors, width = kv_vectors_per_token(config)
    return vectors * width * torch.empty((), dtype=dtype).element_size()
