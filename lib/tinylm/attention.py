"""Attention for tinylm: the KV cache, MHA/GQA/MQA and multi-head latent attention.

`tinylm.model` builds the network from these pieces; they live in their own file so that
model.py stays readable in one sitting. Shapes: B batch, T new tokens, S = keys attended
(cached + new), H query heads, D head_dim, C n_embd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.cache_positions import CachePositions
from tinylm.config import GPTConfig
from tinylm.layers import RMSNorm, apply_rope, rope_tables, rotate_half

# RoPE lives in tinylm.layers; rope_tables, apply_rope and rotate_half stay importable from here.
__all__ = [
    "CausalSelfAttention",
    "KVCache",
    "MultiHeadLatentAttention",
    "apply_rope",
    "attention_mask",
    "rope_tables",
    "rotate_half",
]

# ----------------------------------------------------------------------------- KV cache


class KVCache(CachePositions):
    """Preallocated per-layer attention memory for incremental decoding.

    Every layer owns a tuple of buffers shaped [B, heads, max_len, dim] (time in dim 2, so
    that a prefix ``buf[:, :, :end]`` is a view SDPA can read without a copy):
    MHA/GQA/MQA store (k, v) with heads = n_kv_head; MLA stores one buffer with heads = 1
    holding the latent [c_kv | k_rope] (kv_lora_rank + rope_head_dim channels).

    ``mask`` [B, max_len] marks real tokens (False = left padding), ``pos`` counts the
    positions filled. A quantised cache can subclass this and override `write` / `read`.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        layer_shapes: list[list[tuple[int, int]]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(batch_size, max_len)
        self.dtype, self.device = dtype, device
        self.layers = [
            tuple(self._zeros(heads, dim, self.storage_dtype or dtype) for heads, dim in shapes)
            for shapes in layer_shapes
        ]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)

    #: What the buffers hold; None: the compute dtype. A quantised cache sets its code dtype.
    storage_dtype: torch.dtype | None = None

    def _zeros(self, heads: int, dim: int, dtype: torch.dtype) -> Tensor:
        """A zeroed buffer [batch_size, heads, max_len, dim] on the cache's device."""
        shape = (self.batch_size, heads, self.max_len, dim)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def write(self, layer: int, pos: int, *new: Tensor) -> None:
        """Store new entries [B, heads, T, dim] of `layer` at positions pos .. pos+T."""
        for buf, x in zip(self.layers[layer], new, strict=True):
            buf[:, :, pos : pos + x.shape[2]] = x

    def read(self, layer: int, end: int) -> tuple[Tensor, ...]:
        """Return views of the entries of `layer` at positions 0 .. end."""
        return tuple(buf[:, :, :end] for buf in self.layers[layer])

    def update(self, layer: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Write the new entries at `pos` and return everything up to and including them.

        `pos` itself is advanced once per forward by the model (`advance`), after all layers.
        """
        self.write(layer, self.pos, *new)
        return self.read(layer, self.pos + new[0].shape[2])

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers (the validity mask is not counted)."""
        return sum(t.numel() * t.element_size() for bufs in self.layers for t in bufs)


def attention_mask(valid: Tensor | None, pos: int, T: int, device: torch.device) -> Tensor:
    """Boolean SDPA mask (True = may attend) for T queries at positions pos .. pos+T-1.

    Keys are positions 0 .. pos+T-1: causal, and if `valid` [B, pos+T] is given, pad keys are
    hidden. Every query may always see itself, so a pad query's softmax row is never all
    -inf (which would give NaNs); pad rows are junk the caller ignores.
    Returns [T, S] without `valid`, else [B, 1, T, S].
    """
    q_pos = torch.arange(pos, pos + T, device=device).unsqueeze(1)  # [T, 1]
    k_pos = torch.arange(pos + T, device=device)  # [S]
    mask = k_pos <= q_pos
    if valid is None:
        return mask
    mask = (mask & valid[:, None, :]) | (k_pos == q_pos)
    return mask.unsqueeze(1)


# ----------------------------------------------------------------------------- attention


class CausalSelfAttention(nn.Module):
    """Multi-head attention with RoPE; n_kv_head < n_head gives GQA (1 gives MQA).

    In grouped-query attention each K/V head is shared by n_head // n_kv_head query heads,
    which shrinks the KV cache by the same factor. SDPA's ``enable_gqa`` broadcasts the
    shared heads without materialising copies.
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        C, H, Hkv, D = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.layer_idx = H, Hkv, D, layer_idx
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, Hkv * D, bias=False)
        self.v_proj = nn.Linear(C, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def cache_shapes(self) -> list[tuple[int, int]]:
        """(heads, dim) of each buffer this layer keeps in a KVCache: k and v."""
        return [(self.n_kv_head, self.head_dim)] * 2

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C]; with `mask` None the attention is plain causal."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,  # the model passes mask=None only if S == T
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): the KV cache holds one small latent.

    Per token, x is compressed to c_kv = RMSNorm(W_dkv x) of kv_lora_rank channels; per-head
    keys and values are up-projections of it, k_nope_h = W_uk_h c_kv and v_h = W_uv_h c_kv.
    RoPE cannot act on these keys: a rotation that depends on the key's position would sit
    between W_uk and the query, and the absorb trick below could no longer fold W_uk into the
    query. So position goes into a separate "decoupled" key k_rope = RoPE(W_kr x) of
    rope_head_dim channels, shared by all heads. (W_dkv and W_kr are one matmul, kv_a_proj;
    W_uk and W_uv are kv_b_proj.) Queries, optionally through their own low-rank bottleneck
    (q_lora_rank), split into q_nope (head_dim) and q_rope (rope_head_dim) per head:

        score_h(t, s) = (q_nope_h(t) . k_nope_h(s) + q_rope_h(t) . k_rope(s)) / sqrt(D + Dr)

    The cache stores only [c_kv | k_rope] per token, however many heads there are.

    Absorbed decode (``absorb = True``): by associativity,
        q_nope_h . (W_uk_h c) = (W_uk_h^T q_nope_h) . c     -> query in latent space
        sum_s p_h(s) W_uv_h c(s) = W_uv_h (sum_s p_h(s) c(s)) -> W_uv after attention
    so attention runs directly on the cached latents (like MQA with one K/V "head" of
    kv_lora_rank + rope_head_dim channels) and the per-step up-projection of every cached
    token, which grows with the context, disappears. Same weights, same function; only the
    order of the multiplications changes.
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        C, H, D = config.n_embd, config.n_head, config.head_dim
        r, Dr, rq = config.kv_lora_rank, config.rope_head_dim, config.q_lora_rank
        self.n_head, self.head_dim, self.rope_head_dim, self.kv_lora_rank = H, D, Dr, r
        self.layer_idx = layer_idx
        self.absorb = False  # switch to the absorbed (latent-space) formulation
        self.scale = 1.0 / math.sqrt(D + Dr)
        if rq is None:
            self.q_proj = nn.Linear(C, H * (D + Dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(C, rq, bias=False)
            self.q_a_norm = RMSNorm(rq, config.norm_eps)
            self.q_b_proj = nn.Linear(rq, H * (D + Dr), bias=False)
        self.kv_a_proj = nn.Linear(C, r + Dr, bias=False)  # x -> [c_kv | k_rope], one matmul
        self.kv_norm = RMSNorm(r, config.norm_eps)
        self.kv_b_proj = nn.Linear(r, H * 2 * D, bias=False)  # c_kv -> [k_nope | v] per head
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def cache_shapes(self) -> list[tuple[int, int]]:
        """(heads, dim) of the one buffer this layer keeps in a KVCache: [c_kv | k_rope]."""
        return [(1, self.kv_lora_rank + self.rope_head_dim)]

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C]; with `mask` None the attention is plain causal."""
        B, T, _ = x.shape
        H, D, Dr, r = self.n_head, self.head_dim, self.rope_head_dim, self.kv_lora_rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, H, D + Dr).transpose(1, 2).split([D, Dr], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.kv_a_proj(x).split([r, Dr], dim=-1)
        latent = torch.cat((self.kv_norm(c_kv), apply_rope(k_rope, cos, sin)), dim=-1)
        latent = latent.unsqueeze(1)  # [B, 1, T, r + Dr]: one shared "head"
        if cache is not None:
            (latent,) = cache.update(self.layer_idx, latent)
        S = latent.shape[2]
        c_kv, k_rope = latent.split([r, Dr], dim=-1)  # views [B, 1, S, r], [B, 1, S, Dr]
        causal = mask is None and T > 1  # the model passes mask=None only if S == T
        if self.absorb:
            w_uk, w_uv = self.kv_b_proj.weight.view(H, 2 * D, r).split([D, D], dim=1)
            q_lat = q_nope @ w_uk  # [B, H, T, D] @ [H, D, r]: W_uk_h^T q_nope_h per head
            y = F.scaled_dot_product_attention(
                torch.cat((q_lat, q_rope), dim=-1),
                latent,  # keys: [c_kv | k_rope]
                c_kv,  # values: the latent itself
                attn_mask=mask,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=True,
            )  # [B, H, T, r]
            y = y @ w_uv.transpose(1, 2)  # [B, H, T, r] @ [H, r, D]: W_uv_h after attention
        else:
            kv = self.kv_b_proj(c_kv).view(B, S, H, 2 * D).transpose(1, 2)
            k_nope, v = kv.split([D, D], dim=-1)
            k = torch.cat((k_nope, k_rope.expand(B, H, S, Dr)), dim=-1)
            y = F.scaled_dot_product_attention(
                torch.cat((q_nope, q_rope), dim=-1),
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                scale=self.scale,
            )  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
