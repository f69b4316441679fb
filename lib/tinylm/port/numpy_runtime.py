"""A NumPy-only tinylm runtime: load a checkpoint and generate text without importing torch.

    lm = NumpyLM.load("data/checkpoints/default")          # float32 weights
    lm8 = NumpyLM.load("data/checkpoints/default", quantize="int8")
    lm.logits(ids)                                           # [T, V] float32
    lm.generate(prompt_ids, 20, temperature=0)               # new token ids, as tinylm.generate

Why a second implementation of the model? It is what porting to another vendor's stack
looks like: no PyTorch there, only that stack's kernels, and the only thing that carries over
is the checkpoint (safetensors + config.json + tokenizer.json, chapter 03). Re-implementing the
forward pass from those files in NumPy (the layer classes below) shows exactly which conventions a port
must get right (RoPE pairing, RMSNorm epsilon, GQA head grouping, MoE gate normalisation)
and `tinylm.port.parity` then checks it layer by layer against the PyTorch model.

Everything is float32 (NumPy would silently promote to float64 if we let it), vectorised over
batch and heads, with a preallocated KV cache like `tinylm.attention.KVCache`. Supported:
MHA / GQA / MQA and multi-head latent attention (MLA, in its plain form), dense SwiGLU and
mixture-of-experts MLPs. Int8: weight-only, symmetric, one scale per output channel; the int8
weights stay int8 in memory and are widened to float32 inside each matmul.

This module must never import torch (tests check it in a fresh interpreter): it and
`OnnxLM` share `CachedLM`, the prompt handling and the decode loop defined here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open  # the Rust reader; its NumPy front end needs no torch

from tinylm.cache_positions import CachePositions  # no torch
from tinylm.tokenizer import BPETokenizer  # pure Python, no torch
from tinylm.util import is_int, sha256_file

F32 = np.float32

#: Names of the activations a traced forward records, in execution order ({i} = layer).
#: `tinylm.port.parity` collects the PyTorch model's activations under the same names.
LAYER_ACTIVATIONS = ("attn_norm", "attn", "mlp_norm", "mlp", "")  # "" = block output


def activation_names(n_layer: int) -> list[str]:
    """All traced activation names of an n_layer model, in the order they are computed."""
    names = ["embed"]
    for i in range(n_layer):
        names += [f"layers.{i}.{a}" if a else f"layers.{i}" for a in LAYER_ACTIVATIONS]
    return [*names, "norm", "logits"]


# ----------------------------------------------------------------------------- numerics


def rope_tables(
    dim: int, length: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """RoPE cos/sin tables [length, dim] in float32, the half-split layout of tinylm.attention.

    Channel i and channel i + dim/2 form a pair rotated by pos * theta^(-2i/dim).
    scaling: Llama 3's frequency scaling (config "rope_scaling", see tinylm.layers) or None:
    long wavelengths slowed by `factor`, short ones kept, the band between blended.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=F32) / F32(dim)))
    if scaling is not None:
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * np.pi / inv_freq
        ratio = scaling["original_max_position_embeddings"] / wavelen
        smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / scaling["factor"] + smooth * inv_freq
    angles = np.outer(np.arange(length, dtype=F32), inv_freq.astype(F32))
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """Map the channel pairs (a, b) of the two halves of the last dim to (-b, a)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [..., T, dim] by the angles in cos/sin [T, dim] (Llama's half-split pairs)."""
    return x * cos + rotate_half(x) * sin


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in float32."""
    inv_rms = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + F32(eps))
    return x * inv_rms * weight


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)); exp overflows to inf for x < -88, which correctly gives 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), the SwiGLU gate activation."""
    return x * sigmoid(x)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last dim, in place on x (a fresh scores array nobody else holds)."""
    x -= x.max(axis=-1, keepdims=True)  # exp of the max is 1: no overflow, -inf -> 0
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


# ----------------------------------------------------------------------------- linear layers


class Linear:
    """y = x @ W.T for a float32 weight W [out, in] (nn.Linear's layout, no bias)."""

    def __init__(self, weight: np.ndarray) -> None:
        self.weight = np.ascontiguousarray(weight, dtype=F32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # W.T is a free view; BLAS multiplies by the transpose without copying it.
        return x @ self.weight.T

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class Int8Linear:
    """y = (x @ q.T) * scale with int8 weights q [out, in] and one scale per output row.

    The per-channel symmetric format of tinylm.quant ("int8"): scale_o = max_i |W_oi| / 127,
    stored as fp16 rounded up (so the largest weight stays on the grid), q = round(W / scale),
    each weight off by at most scale_o / 2. Scaling the output column instead of the weights
    is the same maths (the scale is constant along the summed axis) and lets the int8 matrix
    be used as stored.
    """

    def __init__(self, q: np.ndarray, scale: np.ndarray) -> None:
        scale = np.asarray(scale).reshape(-1)
        if q.dtype != np.int8 or scale.shape not in ((q.shape[0],), (1,)):
            raise ValueError(
                f"Int8Linear needs int8 weights [out, in] and one scale per output row (or "
                f"one in all), got {q.dtype} {q.shape} and scales {scale.shape}."
            )
        self.q = np.ascontiguousarray(q)
        self.scale = np.broadcast_to(scale.astype(F32), (q.shape[0],)).copy()

    @classmethod
    def quantize(cls, weight: np.ndarray) -> Int8Linear:
        """Quantise a float weight [out, in] exactly as tinylm.quant.quantize_tensor(w, 8)."""
        w = weight.astype(F32)
        amax = np.abs(w).max(axis=1)
        exact = np.where(amax > 0, amax / F32(127.0), F32(1.0)).astype(F32)  # all-zero row: any
        scale = _fp16_round_up(exact).astype(F32)
        q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        return cls(q, scale)

    def dequantize(self) -> np.ndarray:
        """The float32 weight [out, in] this layer computes with."""
        return self.q.astype(F32) * self.scale[:, None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # NumPy has no int8 x float32 GEMM (it would promote to float64), so widen the int8
        # matrix to float32 for the matmul; memory still holds 1 byte per weight.
        return (x @ self.q.astype(F32).T) * self.scale

    @property
    def nbytes(self) -> int:
        # Scales counted as the fp16 they are stored as (float32 here only for the maths).
        return self.q.nbytes + 2 * self.scale.size


def _fp16_round_up(s: np.ndarray) -> np.ndarray:
    """Cast float32 scales to float16, rounding up (never a smaller step than needed)."""
    h = s.astype(np.float16)
    return np.where(h.astype(F32) < s, np.nextafter(h, np.float16(np.inf)), h)


def dequantize_codes(
    data: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    spec: Mapping[str, Any],
) -> np.ndarray:
    """The float32 weight [out, in] of a tinylm.quant QuantLinear's buffers (any format).

    data: int8 / uint8 codes [out, cols_padded], or two 4-bit codes per byte (element 2i in the
    low nibble, symmetric codes stored + 8); scale / zero: per group; spec: QuantLinear.spec().
    """
    rows, cols = spec["out_features"], spec["in_features"]
    if spec["bits"] == 8:
        codes = data.astype(F32)
    else:
        codes = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(rows, -1).astype(F32)
        if zero is None:
            codes -= 8
    granularity, group = spec["granularity"], spec["group_size"]
    if granularity == "tensor":
        groups = codes.reshape(1, 1, -1)
    elif granularity == "channel":
        groups = codes.reshape(rows, 1, -1)
    else:
        groups = codes.reshape(rows, -1, group)
    if zero is not None:
        groups = groups - zero.astype(F32)[..., None]
    w = groups * scale.astype(F32)[..., None]
    return w.reshape(rows, -1)[:, :cols]


def quantized_linear(
    data: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, spec: Mapping[str, Any]
) -> Linear | Int8Linear:
    """A layer for stored tinylm.quant buffers: int8 per-channel/-tensor symmetric stays int8;
    other formats (int4, groups, asymmetric) are dequantised to float32 at load, as NumPy
    has no kernels that would gain anything from the packed form."""
    if spec.get("bias"):
        raise NotImplementedError("quantised layers with a bias are not used by tinylm models.")
    if spec["bits"] == 8 and zero is None and spec["granularity"] in ("channel", "tensor"):
        return Int8Linear(data.astype(np.int8), scale)
    return Linear(dequantize_codes(data, scale, zero, spec))


def _fuse(linears: Sequence[Linear | Int8Linear]) -> Linear | Int8Linear:
    """Stack several projections of the same input into one matmul (q|k|v, gate|up).

    One bigger matmul instead of three small ones: fewer calls, which is what dominates a
    one-token decode step. Per-output-row scales stack the same way as the rows.
    """
    if all(isinstance(lin, Int8Linear) for lin in linears):
        return Int8Linear(
            np.concatenate([lin.q for lin in linears]),
            np.concatenate([lin.scale for lin in linears]),
        )
    return Linear(np.concatenate([_dense_weight(lin) for lin in linears]))


def _dense_weight(lin: Linear | Int8Linear) -> np.ndarray:
    return lin.weight if isinstance(lin, Linear) else lin.dequantize()


# ----------------------------------------------------------------------------- KV cache


class NumpyKVCache(CachePositions):
    """Preallocated per-layer buffers [B, heads, max_len, dim], as tinylm.attention.KVCache.

    MHA/GQA/MQA keep (k, v) per layer; MLA keeps one latent buffer [c_kv | k_rope] with
    heads = 1. `mask` [B, max_len] marks real tokens (False = left padding), `pos` counts
    the positions filled.
    """

    def __init__(
        self, batch_size: int, max_len: int, layer_shapes: list[list[tuple[int, int]]]
    ) -> None:
        super().__init__(batch_size, max_len)
        self.layers = [
            tuple(np.zeros((batch_size, h, max_len, d), dtype=F32) for h, d in shapes)
            for shapes in layer_shapes
        ]
        self.mask = np.zeros((batch_size, max_len), dtype=bool)

    def update(self, layer: int, *new: np.ndarray) -> tuple[np.ndarray, ...]:
        """Write entries [B, heads, T, dim] at `pos`; return views of positions 0 .. pos+T."""
        end = self.pos + new[0].shape[2]
        for buf, x in zip(self.layers[layer], new, strict=True):
            buf[:, :, self.pos : end] = x
        return tuple(buf[:, :, :end] for buf in self.layers[layer])

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(buf.nbytes for bufs in self.layers for buf in bufs)


def attention_mask(cache_mask: np.ndarray | None, pos: int, T: int) -> np.ndarray | None:
    """Boolean mask (True = may attend) for T queries at pos .. pos+T-1 over keys 0 .. pos+T-1.

    Causal; with `cache_mask` [B, pos+T] pad keys are hidden too and every query still sees
    itself (so a pad row's softmax is never all -inf). Returns None when nothing needs
    masking (one query, no padding), [T, S] without padding, else [B, 1, T, S].
    Same rule as tinylm.attention.attention_mask.
    """
    if cache_mask is None and T == 1:
        return None
    q_pos = np.arange(pos, pos + T)[:, None]
    k_pos = np.arange(pos + T)[None, :]
    mask = k_pos <= q_pos
    if cache_mask is None:
        return mask
    mask = (mask[None] & cache_mask[:, None, :]) | (k_pos == q_pos)[None]
    return mask[:, None]


def masked_softmax(scores: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Softmax over keys of scores [..., T, S] where `mask` allows (broadcast from the left)."""
    if mask is not None:
        scores = np.where(mask, scores, F32(-np.inf))
    return softmax(scores)


# ----------------------------------------------------------------------------- layers


class WeightReader:
    """Hands out a checkpoint's tensors by name and records which ones were used.

    `param` returns a float32 array (norm weights, embeddings, buffers); `linear` returns the
    projection `name` as a Linear, an Int8Linear when quantising at load, or whatever a
    quantised checkpoint stored for it (`quant_layers`: {name: QuantLinear.spec()}).
    """

    def __init__(
        self,
        weights: Mapping[str, np.ndarray],
        cfg: Mapping[str, Any],
        quantize: str | None = None,
        include_head: bool = False,
        quant_layers: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.weights, self.cfg, self.quantize = weights, cfg, quantize
        self.include_head, self.quant_layers = include_head, dict(quant_layers or {})
        self.used: set[str] = set()
        self.nbytes = 0

    def _get(self, key: str) -> np.ndarray:
        if key not in self.weights:
            raise ValueError(
                f"weight {key!r} is missing from the checkpoint of a model with attention="
                f"{self.cfg['attention']!r}, mlp={self.cfg.get('mlp')!r}; were the weights saved "
                "from the model that config.json describes?"
            )
        self.used.add(key)
        return np.asarray(self.weights[key])

    def param(self, name: str) -> np.ndarray:
        arr = self._get(name).astype(F32)
        self.nbytes += arr.nbytes
        return arr

    def quantizable(self, name: str) -> bool:
        """The layers tinylm.quant.model.quantize_model replaces: every projection inside the
        blocks except MoE routers (a flipped top-k choice costs far more than the rounding),
        plus the output head only if include_head."""
        if name == "lm_head":
            return self.include_head
        return name.startswith("blocks.") and not name.endswith("router")

    def linear(self, name: str) -> Linear | Int8Linear:
        if name in self.quant_layers:
            spec = self.quant_layers[name]
            zero = self._get(f"{name}.zero") if f"{name}.zero" in self.weights else None
            layer = quantized_linear(
                self._get(f"{name}.qweight"), self._get(f"{name}.scale"), zero, spec
            )
        else:
            arr = self._get(f"{name}.weight").astype(F32)
            if self.quantize == "int8" and self.quantizable(name):
                layer = Int8Linear.quantize(arr)
            else:
                layer = Linear(arr)
        self.nbytes += layer.nbytes
        return layer


class Attention:
    """Causal self-attention with RoPE; n_kv_head < n_head is GQA (1 is MQA)."""

    def __init__(self, cfg: dict[str, Any], w: WeightReader, prefix: str) -> None:
        self.n_head, self.n_kv_head = cfg["n_head"], cfg["n_kv_head"]
        self.head_dim = cfg["n_embd"] // cfg["n_head"]
        self.qkv = _fuse([w.linear(f"{prefix}.{p}_proj") for p in "qkv"])
        self.o_proj = w.linear(f"{prefix}.o_proj")
        self.scale = F32(1.0 / math.sqrt(self.head_dim))

    def cache_shapes(self) -> list[tuple[int, int]]:
        return [(self.n_kv_head, self.head_dim)] * 2

    def __call__(
        self,
        x: np.ndarray,
        cos: np.ndarray,
        sin: np.ndarray,
        mask: np.ndarray | None,
        cache: NumpyKVCache,
        layer: int,
        rope: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] = apply_rope,
    ) -> np.ndarray:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).reshape(B, T, H + 2 * Hkv, D).transpose(0, 2, 1, 3)  # [B, heads, T, D]
        q, k, v = qkv[:, :H], qkv[:, H : H + Hkv], qkv[:, H + Hkv :]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = cache.update(layer, k, v)  # [B, Hkv, S, D]
        S = k.shape[2]
        # GQA without copying K/V: query head h uses K/V head h // G (SDPA's enable_gqa), so
        # group the G query heads of each K/V head and broadcast K/V over the group axis.
        # The G query heads of a group become G * T rows of one matmul against their K/V head.
        G = H // Hkv
        scores = (q.reshape(B, Hkv, G * T, D) @ k.transpose(0, 1, 3, 2)) * self.scale
        if mask is not None and mask.ndim == 4:
            mask = mask[:, :, None]  # [B, 1, T, S] -> [B, 1, 1, T, S], broadcast over groups
        probs = masked_softmax(scores.reshape(B, Hkv, G, T, S), mask)
        y = probs.reshape(B, Hkv, G * T, S) @ v  # [B, Hkv, G * T, D]
        return self.o_proj(y.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D))


class LatentAttention:
    """Multi-head latent attention (DeepSeek-V2/V3), plain (non-absorbed) form.

    The cache holds one latent per token, [RMSNorm(c_kv) | RoPE(k_rope)]; per-head keys and
    values are re-expanded from it with kv_b_proj every step. See tinylm.attention for the maths.
    """

    def __init__(self, cfg: dict[str, Any], w: WeightReader, prefix: str) -> None:
        self.n_head, self.head_dim = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
        self.rope_dim, self.rank = cfg["rope_head_dim"], cfg["kv_lora_rank"]
        self.eps = cfg["norm_eps"]
        if cfg.get("q_lora_rank") is None:
            self.q_proj = w.linear(f"{prefix}.q_proj")
        else:
            q_a, q_b = w.linear(f"{prefix}.q_a_proj"), w.linear(f"{prefix}.q_b_proj")
            q_norm = w.param(f"{prefix}.q_a_norm.weight")
            self.q_proj = lambda x: q_b(rms_norm(q_a(x), q_norm, self.eps))
        self.kv_a_proj = w.linear(f"{prefix}.kv_a_proj")
        self.kv_norm = w.param(f"{prefix}.kv_norm.weight")
        self.kv_b_proj = w.linear(f"{prefix}.kv_b_proj")
        self.o_proj = w.linear(f"{prefix}.o_proj")
        self.scale = F32(1.0 / math.sqrt(self.head_dim + self.rope_dim))

    def cache_shapes(self) -> list[tuple[int, int]]:
        return [(1, self.rank + self.rope_dim)]

    def __call__(
        self,
        x: np.ndarray,
        cos: np.ndarray,
        sin: np.ndarray,
        mask: np.ndarray | None,
        cache: NumpyKVCache,
        layer: int,
        rope: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] = apply_rope,
    ) -> np.ndarray:
        B, T, _ = x.shape
        H, D, Dr, r = self.n_head, self.head_dim, self.rope_dim, self.rank
        q = self.q_proj(x).reshape(B, T, H, D + Dr).transpose(0, 2, 1, 3)
        q_nope, q_rope = q[..., :D], rope(q[..., D:], cos, sin)
        kv_a = self.kv_a_proj(x)
        c_kv = rms_norm(kv_a[..., :r], self.kv_norm, self.eps)
        latent = np.concatenate([c_kv, rope(kv_a[..., r:], cos, sin)], axis=-1)[:, None]
        (latent,) = cache.update(layer, latent)  # [B, 1, S, r + Dr]
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0, :, :r]).reshape(B, S, H, 2 * D).transpose(0, 2, 1, 3)
        k_nope, v = kv[..., :D], kv[..., D:]
        # q.k = q_nope.k_nope + q_rope.k_rope: two matmuls instead of concatenating, so the
        # shared RoPE key [B, 1, S, Dr] broadcasts over heads without being copied H times.
        scores = q_nope @ k_nope.transpose(0, 1, 3, 2)
        scores += q_rope @ latent[..., r:].transpose(0, 1, 3, 2)
        y = masked_softmax(scores * self.scale, mask) @ v  # [B, H, T, D]
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, H * D))


class SwiGLU:
    """down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, w: WeightReader, prefix: str) -> None:
        self.gate_up = _fuse([w.linear(f"{prefix}.gate"), w.linear(f"{prefix}.up")])
        self.down = w.linear(f"{prefix}.down")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gate, up = np.split(self.gate_up(x), 2, axis=-1)
        return self.down(silu(gate) * up)


class MoE:
    """Routed + shared SwiGLU experts with sigmoid top-k routing, as tinylm.moe.MoE (inference).

    NumPy has no trouble with data-dependent shapes, so each expert runs on exactly the
    tokens routed to it, like the PyTorch version.
    """

    def __init__(self, cfg: dict[str, Any], w: WeightReader, prefix: str) -> None:
        self.k = cfg["experts_per_token"]
        self.router = w.linear(f"{prefix}.router")
        self.bias = w.param(f"{prefix}.expert_bias")
        self.experts = [SwiGLU(w, f"{prefix}.experts.{e}") for e in range(cfg["n_experts"])]
        self.shared = SwiGLU(w, f"{prefix}.shared") if cfg["n_shared_experts"] > 0 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = sigmoid(self.router(x))
        # The bias only steers which experts are chosen; gates are the unbiased affinities of
        # the chosen ones, normalised to sum 1 (DeepSeek-V3).
        idx = np.argsort(-(scores + self.bias), axis=-1, kind="stable")[:, : self.k]
        gates = np.take_along_axis(scores, idx, axis=-1)
        gates /= gates.sum(axis=-1, keepdims=True)
        out = np.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = np.nonzero(idx == e)  # a token picks an expert at most once
            if rows.size:
                out[rows] += expert(x[rows]) * gates[rows, slot][:, None]
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)


class Block:
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, cfg: dict[str, Any], w: WeightReader, i: int) -> None:
        prefix = f"blocks.{i}"
        self.attn_norm = w.param(f"{prefix}.attn_norm.weight")
        self.mlp_norm = w.param(f"{prefix}.mlp_norm.weight")
        attn_cls = LatentAttention if cfg["attention"] == "mla" else Attention
        self.attn = attn_cls(cfg, w, f"{prefix}.attn")
        self.mlp = (
            MoE(cfg, w, f"{prefix}.mlp") if cfg["mlp"] == "moe" else SwiGLU(w, f"{prefix}.mlp")
        )


# ----------------------------------------------------------------------------- checkpoint files


def verify_files(directory: Path, names: Sequence[str]) -> None:
    """Check `names` in a checkpoint folder against its manifest.json (size and SHA-256).

    A torch-free subset of tinylm.checkpoint.verify (which imports torch): a port should refuse
    a truncated or edited checkpoint before it produces plausible-looking garbage.
    """
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} is missing, so {directory} is not a complete tinylm checkpoint. "
            "Fix: save it with tinylm.checkpoint.save, or pass verify=False to skip the check."
        )
    files = json.loads(manifest_path.read_text(encoding="utf-8")).get("files", {})
    for name in names:
        entry, path = files.get(name), directory / name
        if entry is None or not path.is_file():
            continue  # absence of a needed file is reported by the reader
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ValueError(
                f"{path} does not match manifest.json (size or SHA-256 differs): the file was "
                "truncated, corrupted or edited after saving. Fix: copy the checkpoint again."
            )


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays, tied aliases restored.

    tinylm.checkpoint stores one copy of tied tensors and lists the aliases in the header
    metadata key "tinylm.tied" ({alias: source}).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing. Fix: point at a folder written by tinylm.checkpoint.save."
        )
    with safe_open(str(path), framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        metadata = f.metadata() or {}
    for alias, source in json.loads(metadata.get("tinylm.tied", "{}")).items():
        tensors[alias] = tensors[source]
    return tensors


# ----------------------------------------------------------------------------- generation


def _as_batch(prompt_ids: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(ids [B, T] int64 left-padded, pad mask [B, T] or None, whether a batch was given)."""
    if isinstance(prompt_ids, np.ndarray) or hasattr(prompt_ids, "__array__"):
        arr = np.asarray(prompt_ids)
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"prompt_ids must be integer token ids shaped [T] or [batch, T], got "
                f"{arr.dtype} {arr.shape}."
            )
        batched = arr.ndim == 2
        rows = list(arr) if batched else [arr]
    else:
        seq = list(prompt_ids)
        batched = len(seq) > 0 and not isinstance(seq[0], Integral)
        rows = seq if batched else [seq]
    rows = [np.asarray(row, dtype=np.int64).reshape(-1) for row in rows]
    if not rows or any(row.size == 0 for row in rows):
        raise ValueError("a prompt is empty; give at least one token id per prompt.")
    T = max(row.size for row in rows)
    ids = np.zeros((len(rows), T), dtype=np.int64)
    pad = np.zeros((len(rows), T), dtype=bool)
    for b, row in enumerate(rows):
        ids[b, T - row.size :], pad[b, T - row.size :] = row, True
    bad = pad & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        raise ValueError(
            f"token id {ids[bad][0]} is outside the vocabulary 0..{vocab_size - 1}; was the "
            "prompt encoded with this model's tokenizer?"
        )
    return ids, (None if pad.all() else pad), batched


def sample_next(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else top-k/top-p sampling.

    Same filtering order as tinylm.generate (temperature, then top-k, then top-p); the random
    stream is NumPy's, so sampled (not greedy) tokens differ from the PyTorch generator's.
    """
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, axis=-1, kind="stable")  # most likely first
    z_sorted = np.take_along_axis(z, order, axis=-1)
    if top_k is not None:
        z_sorted[:, top_k:] = -np.inf
    p = np.exp(z_sorted - z_sorted[:, :1])
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        mass_before = np.cumsum(p, axis=-1) - p
        p[mass_before >= top_p] = 0.0  # the first token has mass 0 before it: always kept
        p /= p.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random((p.shape[0], 1)) * cdf[:, -1:]
    pick = np.minimum((cdf < u).sum(axis=-1), p.shape[1] - 1)
    return order[np.arange(p.shape[0]), pick]


class CachedLM:
    """What every tinylm port offers, on top of two primitives a subclass implements:

    - ``new_cache(batch_size, max_len)``: an empty KV cache with ``.pos`` and ``.mask``;
    - ``forward(ids [B, T], cache=None, pad_mask=None) -> logits [B, T, V]`` (float32),
      which writes the T new positions into the cache and advances ``cache.pos``.

    Subclasses set ``self.config`` (the checkpoint's config.json as a dict).
    """

    config: dict[str, Any]

    def _checked_call(self, ids: Any, cache: Any) -> tuple[np.ndarray, Any]:
        """ids as a contiguous int64 [B, T] array and a cache that has room for them.

        The checks every port's forward makes before running (a new cache when none is given).
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must be [batch, time] with time >= 1, got shape {ids.shape}.")
        B, T = ids.shape
        if cache is None:
            if T > self.context_length:
                raise ValueError(
                    f"input has {T} tokens but context_length is {self.context_length}; "
                    "keep the last context_length tokens."
                )
            cache = self.new_cache(B, T)
        if cache.batch_size != B or cache.pos + T > cache.max_len:
            raise ValueError(
                f"cache (batch {cache.batch_size}, {cache.pos}/{cache.max_len} positions used) "
                f"cannot take {T} more tokens for batch {B}; make a new cache."
            )
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}.")
        return ids, cache

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Any:
        raise NotImplementedError

    def forward(
        self, ids: np.ndarray, cache: Any = None, pad_mask: np.ndarray | None = None
    ) -> np.ndarray:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def context_length(self) -> int:
        return self.config["context_length"]

    def logits(self, ids: Any) -> np.ndarray:
        """Logits for token ids [T] -> [T, V] or [B, T] -> [B, T, V], full recompute (no cache)."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
            raise ValueError(
                f"ids must be token ids shaped [T] or [batch, T] with T >= 1, got {arr.shape}."
            )
        out = self.forward(arr.reshape(-1, arr.shape[-1]))
        return out[0] if arr.ndim == 1 else out

    def generate(
        self,
        prompt_ids: Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        stop_token: int | None = None,
    ) -> list[int] | list[list[int]]:
        """Continue the prompt(s); return the new token ids (the contract of tinylm.generate).

        prompt_ids: one prompt (list / 1-D array) -> list[int], or a batch (list of lists of any
            lengths, or [B, T]) -> list[list[int]]; a batch is left-padded and masked, so greedy
            rows equal running each prompt alone.
        temperature=0 is greedy; top_k / top_p filter before sampling; seed seeds NumPy's
        generator. use_cache=False recomputes the whole sequence every step (the baseline).
        stop_token ends a row (not included); the batch ends when every row has.
        """
        if not is_int(max_new_tokens, integral=True):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if not isinstance(temperature, Real) or not temperature >= 0:
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}."
            )
        if top_k is not None and (not isinstance(top_k, Integral) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}.")
        if top_p is not None and not (isinstance(top_p, Real) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}.")
        ids, pad, batched = _as_batch(prompt_ids, self.vocab_size)
        B, T = ids.shape
        total, ctx = T + max_new_tokens, self.context_length
        if total > ctx:
            raise ValueError(
                f"prompt of {T} tokens + max_new_tokens={max_new_tokens} = {total} tokens does "
                f"not fit context_length={ctx}; shorten the prompt or max_new_tokens."
            )
        rng = np.random.default_rng(seed)
        new = np.zeros((B, max_new_tokens), dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        seq, valid = ids, pad
        cache = self.new_cache(B, max(T, total - 1)) if use_cache else None
        logits = self.forward(ids, cache=cache, pad_mask=pad)[:, -1] if max_new_tokens else None
        n = 0
        for n in range(1, max_new_tokens + 1):
            token = sample_next(logits, temperature, top_k, top_p, rng)
            new[:, n - 1] = token
            if stop_token is not None:
                done |= token == stop_token
                if done.all():
                    break
            if n == max_new_tokens:
                break
            if use_cache:
                logits = self.forward(token[:, None], cache=cache)[:, -1]
            else:
                seq = np.concatenate([seq, token[:, None]], axis=1)
                if valid is not None:
                    valid = np.concatenate([valid, np.ones((B, 1), dtype=bool)], axis=1)
                logits = self.forward(seq, pad_mask=valid)[:, -1]
        rows = new[:, :n].tolist()
        if stop_token is not None:
            rows = [row[: row.index(stop_token)] if stop_token in row else row for row in rows]
        return rows if batched else rows[0]


# ----------------------------------------------------------------------------- the runtime


QUANT_MODES = (None, "int8")


class NumpyLM(CachedLM):
    """A tinylm GPT running on NumPy alone. Build it with `NumpyLM.load(checkpoint_dir)`.

    config: the checkpoint's config.json (GPTConfig.to_dict()); weights: the state dict as
    NumPy arrays (names as in tinylm.model.GPT).

    Int8 weights, two ways, both in tinylm.quant's per-channel symmetric format:
    quantize="int8" quantises a float checkpoint at load, choosing the same layers as
    tinylm.quant.model.quantize_model (every projection in the blocks but the MoE routers;
    the output head only with include_head=True; the token embedding never: it is a lookup);
    or load a checkpoint written by tinylm.quant.model.save_quantized (`quant_layers` = the
    layer specs from its meta.json), whose int8 layers are used as stored and other formats
    (int4, groups) dequantised at load.

    Stated int8 bound (tests/test_port_numpy.py): the int8 port equals PyTorch running
    quantize_model(model, "int8") to float32 rounding (max abs error <= 1e-5 on logits), and
    its logits keep cosine similarity > 0.999 with the float32 model's.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        weights: Mapping[str, np.ndarray],
        tokenizer: Any = None,
        quantize: str | None = None,
        include_head: bool = False,
        quant_layers: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if quantize not in QUANT_MODES:
            raise ValueError(f"quantize={quantize!r} is not supported; use one of {QUANT_MODES}.")
        if quantize and quant_layers:
            raise ValueError(
                "this checkpoint is already quantised (it has quant_layers); load it with "
                "quantize=None."
            )
        cfg = dict(config)
        needed = ("vocab_size", "context_length", "n_layer", "n_head", "n_embd", "attention")
        missing = [k for k in needed if k not in cfg]
        if missing:
            raise ValueError(
                f"config is missing {missing}; pass the checkpoint's config.json "
                "(GPTConfig.to_dict()) unchanged."
            )
        if cfg["attention"] not in ("mha", "gqa", "mqa", "mla") or cfg["mlp"] not in (
            "dense",
            "moe",
        ):
            raise NotImplementedError(
                f"NumpyLM supports attention mha/gqa/mqa/mla and mlp dense/moe, got "
                f"attention={cfg['attention']!r}, mlp={cfg['mlp']!r}."
            )
        if cfg.get("position", "rope") != "rope" or cfg.get("norm_placement", "pre") != "pre":
            raise NotImplementedError(
                "NumpyLM runs the Llama layout (RoPE, pre-norm), got position="
                f"{cfg.get('position')!r}, norm_placement={cfg.get('norm_placement')!r}; these "
                "are chapter 03's ablation switches: port a model trained with the defaults."
            )
        self.config, self.tokenizer, self.quantize = cfg, tokenizer, quantize
        self.eps = cfg["norm_eps"]
        w = WeightReader(weights, cfg, quantize, include_head, quant_layers)
        self.tok_emb = w.param("tok_emb.weight")
        self.blocks = [Block(cfg, w, i) for i in range(cfg["n_layer"])]
        self.norm = w.param("norm.weight")
        self.lm_head = w.linear("lm_head")
        self.weight_bytes = w.nbytes
        unused = sorted(set(weights) - w.used)
        if unused:
            raise ValueError(
                f"the checkpoint has weights this runtime does not use: {unused[:5]}; the "
                "config and weights do not describe the same model."
            )
        rope_dim = (
            cfg["rope_head_dim"] if cfg["attention"] == "mla" else cfg["n_embd"] // cfg["n_head"]
        )
        self.rope_cos, self.rope_sin = rope_tables(
            rope_dim, cfg["context_length"], cfg["rope_theta"], cfg.get("rope_scaling")
        )
        # The RoPE function of each layer: a slot so that tinylm.port.parity.make_broken_port
        # can plant the classic porting bug (the other pairing convention) in one layer.
        self.rope_fns: list[Callable] = [apply_rope] * cfg["n_layer"]

    # ---------------------------------------------------------------- constructors

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        quantize: str | None = None,
        include_head: bool = False,
        verify: bool = True,
    ) -> NumpyLM:
        """Load a checkpoint folder written by tinylm.checkpoint.save (no torch needed).

        Reads config.json, model.safetensors, meta.json (a "quantization" entry written by
        tinylm.quant.model.save_quantized) and, if present, tokenizer.json (into `.tokenizer`,
        a pure-Python tinylm.tokenizer.BPETokenizer). verify first checks the files against
        manifest.json. quantize / include_head: see the class docstring.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoint folder at {directory}. Fix: check the path, or save a model "
                "there with tinylm.checkpoint.save."
            )
        names = ["config.json", "model.safetensors", "meta.json", "tokenizer.json"]
        if verify:
            verify_files(directory, names)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing. Fix: save the checkpoint again.")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        weights = read_safetensors(directory / "model.safetensors")
        meta_path = directory / "meta.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        quant_layers = (meta.get("quantization") or {}).get("layers")
        tokenizer = None
        if (directory / "tokenizer.json").is_file():
            tokenizer = BPETokenizer.load(directory / "tokenizer.json")
        return cls(config, weights, tokenizer, quantize, include_head, quant_layers)

    @classmethod
    def from_model(
        cls, model: Any, quantize: str | None = None, include_head: bool = False
    ) -> NumpyLM:
        """Build from an in-memory tinylm GPT, float or quantised (tinylm.quant.model).

        Duck-typed on `model.config.to_dict()`, `model.state_dict()` and the `spec()` of
        quantised layers, so this module still never imports torch. A convenience for
        notebooks and tests: the real port path is `load(checkpoint_dir)`.
        """
        weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        quant_layers = {
            name: m.spec()
            for name, m in model.named_modules()
            if hasattr(m, "qweight") and callable(getattr(m, "spec", None))
        }
        return cls(model.config.to_dict(), weights, None, quantize, include_head, quant_layers)

    # ---------------------------------------------------------------- running

    def new_cache(self, batch_size: int, max_len: int | None = None) -> NumpyKVCache:
        """An empty KV cache for batch_size sequences of up to max_len (context_length) tokens."""
        max_len = self.context_length if max_len is None else max_len
        if not 1 <= max_len <= self.context_length:
            raise ValueError(f"max_len={max_len} must be in 1..{self.context_length}.")
        return NumpyKVCache(batch_size, max_len, [b.attn.cache_shapes() for b in self.blocks])

    def forward(
        self,
        ids: np.ndarray,
        cache: NumpyKVCache | None = None,
        pad_mask: np.ndarray | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits [B, T, V] for ids [B, T]; with a cache, appends at cache.pos (as GPT.forward).

        pad_mask [B, T] (True = real token) for left-padded batches. trace: a dict that receives
        every activation of `activation_names()` (use `trace()` for the common case).
        """
        ids, cache = self._checked_call(ids, cache)
        B, T = ids.shape
        pos = cache.pos
        mask = attention_mask(cache.record_tokens(pad_mask, T), pos, T)
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        record = (lambda name, x: trace.__setitem__(name, x)) if trace is not None else None

        x = self.tok_emb[ids]
        if record:
            record("embed", x)
        for i, block in enumerate(self.blocks):
            h = rms_norm(x, block.attn_norm, self.eps)
            a = block.attn(h, cos, sin, mask, cache, i, rope=self.rope_fns[i])
            x = x + a
            h2 = rms_norm(x, block.mlp_norm, self.eps)
            m = block.mlp(h2)
            x = x + m
            if record:
                for name, value in (("attn_norm", h), ("attn", a), ("mlp_norm", h2), ("mlp", m)):
                    record(f"layers.{i}.{name}", value)
                record(f"layers.{i}", x)
        x = rms_norm(x, self.norm, self.eps)
        logits = self.lm_head(x)
        if record:
            record("norm", x)
            record("logits", logits)
        cache.advance(T)
        return logits

    def trace(self, ids: Any) -> dict[str, np.ndarray]:
        """Every named activation of a full forward over ids [T] or [B, T] (batch dim kept)."""
        arr = np.asarray(ids, dtype=np.int64)
        acts: dict[str, np.ndarray] = {}
        self.forward(arr.reshape(-1, arr.shape[-1]), trace=acts)
        return acts

    def nbytes(self) -> int:
        """Bytes of the weights as held in memory (int8 matrices count 1 byte per weight)."""
        return self.weight_bytes
