"""Export a tinylm GPT to ONNX with an explicit KV cache (needs torch and onnx).

    export_onnx(model, "tinylm.onnx")                    # then tinylm.port.onnx.OnnxLM runs it

The graph's inputs and outputs, the choice of exporter and what `ExportGraph` restates are
described in `tinylm.port.onnx`, which holds the runtime and stays free of torch (so a
deployment target without torch can run the file); this module is the torch side.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from tinylm.layers import apply_rope
from tinylm.port.numpy_runtime import activation_names
from tinylm.port.onnx import METADATA_KEY, io_names

# ----------------------------------------------------------------------------- the graph


class ExportGraph(torch.nn.Module):
    """What is exported: GPT.forward restated over the same weights, with an explicit cache.

    (input_ids, attention_mask, past...) -> (logits, present..., activations...).
    """

    def __init__(self, model: Any, activations: bool) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.mla = model.config.attention == "mla"
        self.activations = activations

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        m, c = self.model, self.config
        T = input_ids.shape[1]
        P = past[0].shape[2]
        # Queries sit at positions P .. P+T-1 of the row, keys at 0 .. P+T-1: causal, pad
        # keys hidden, and every query sees itself (tinylm.attention.attention_mask).
        q_pos = torch.arange(T, device=input_ids.device) + P
        k_pos = torch.arange(P + T, device=input_ids.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
        diag = k_pos[None, :] == q_pos[:, None]
        valid = attention_mask.to(torch.bool)[:, None, :]  # [B, 1, S]
        mask = ((causal[None] & valid) | diag[None])[:, None]  # [B, 1, T, S]
        cos, sin = m.rope_cos[P : P + T], m.rope_sin[P : P + T]

        acts: dict[str, torch.Tensor] = {}
        presents: list[torch.Tensor] = []
        x = m.tok_emb(input_ids)
        acts["embed"] = x
        per_layer = 1 if self.mla else 2
        for i, block in enumerate(m.blocks):
            h = _rms_norm(block.attn_norm, x)
            layer_past = past[i * per_layer : (i + 1) * per_layer]
            if self.mla:
                a, new = _latent_attention(block.attn, h, cos, sin, mask, *layer_past)
            else:
                a, new = _attention(block.attn, h, cos, sin, mask, *layer_past)
            presents += new
            x = x + a
            h2 = _rms_norm(block.mlp_norm, x)
            f = _moe_dense(block.mlp, h2) if c.mlp == "moe" else block.mlp(h2)
            x = x + f
            for name, value in (("attn_norm", h), ("attn", a), ("mlp_norm", h2), ("mlp", f)):
                acts[f"layers.{i}.{name}"] = value
            acts[f"layers.{i}"] = x
        x = _rms_norm(m.norm, x)
        logits = m.lm_head(x)
        acts["norm"], acts["logits"] = x, logits
        extra = [acts[n] for n in activation_names(c.n_layer)[:-1]] if self.activations else []
        return (logits, *presents, *extra)


def _rms_norm(norm, x):
    # Written out rather than F.rms_norm: aten::rms_norm has no ONNX translation below
    # opset 23 (RMSNormalization), which many runtimes do not implement yet.
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _attention(attn, x, cos, sin, mask, past_k, past_v):
    B, T, _ = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    S = k.shape[2]
    # GQA: the G query heads of K/V head j (heads j*G .. j*G+G-1, as SDPA's enable_gqa)
    # become G*T rows of one matmul against that head; no K/V copies.
    G = H // Hkv
    scores = (q.reshape(B, Hkv, G * T, D) @ k.transpose(2, 3)) * (1.0 / D**0.5)
    scores = scores.view(B, Hkv, G, T, S).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(B, Hkv, G * T, S)
    y = (probs @ v).view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
    return attn.o_proj(y), [k, v]


def _latent_attention(attn, x, cos, sin, mask, past_latent):
    B, T, _ = x.shape
    H, D, Dr, r = attn.n_head, attn.head_dim, attn.rope_head_dim, attn.kv_lora_rank
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(x)
    else:
        q = attn.q_b_proj(_rms_norm(attn.q_a_norm, attn.q_a_proj(x)))
    q = q.view(B, T, H, D + Dr).transpose(1, 2)
    q_nope, q_rope = q[..., :D], apply_rope(q[..., D:], cos, sin)
    kv_a = attn.kv_a_proj(x)
    c_kv = _rms_norm(attn.kv_norm, kv_a[..., :r])
    latent = torch.cat([c_kv, apply_rope(kv_a[..., r:], cos, sin)], dim=-1)[:, None]
    latent = torch.cat([past_latent, latent], dim=2)  # [B, 1, S, r + Dr]: the whole cache
    S = latent.shape[2]
    kv = attn.kv_b_proj(latent[:, 0, :, :r]).view(B, S, H, 2 * D).transpose(1, 2)
    k_nope, v = kv[..., :D], kv[..., D:]
    scores = q_nope @ k_nope.transpose(2, 3) + q_rope @ latent[..., r:].transpose(2, 3)
    scores = (scores * attn.scale).masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v  # [B, H, T, D]
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D)), [latent]


def _moe_dense(moe, x):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    scores, idx, gates = moe.route(x)  # the model's own routing: top-k exports as TopK
    weights = torch.zeros_like(scores).scatter(-1, idx, gates).to(x.dtype)  # [N, E]
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        out = out + expert(x) * weights[:, e : e + 1]
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out.reshape(shape)


# ----------------------------------------------------------------------------- the export


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    activations: bool = False,
    opset_version: int | None = None,
    dynamo: bool = True,
) -> Path:
    """Export `model` (a tinylm GPT) to one ONNX file with an explicit KV cache; return its path.

    activations=True adds every named activation of the forward as an extra output
    (`act.embed`, `act.layers.0.attn`, ... , `act.norm`), so that `OnnxLM.trace` can feed
    tinylm.port.parity's layer-by-layer report; leave it off for deployment.
    opset_version: None lets the exporter choose (recommended). dynamo=True (default) uses
    torch 2.13's torch.export-based exporter; dynamo=False the deprecated TorchScript one,
    which gives the same graph numerically and exports much faster (~1 s vs ~10 s for the
    default model), so tests use it for their extra variants. The model's config is stored
    in the file's metadata, so `OnnxLM` needs nothing else. One file serves both prefill
    (an empty past) and decode.
    """
    cfg = model.config
    if cfg.position != "rope" or cfg.norm_placement != "pre":
        raise NotImplementedError(
            f"export_onnx builds the Llama layout (RoPE, pre-norm), got position={cfg.position!r}, "
            f"norm_placement={cfg.norm_placement!r}; export a model trained with the defaults."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = ExportGraph(model, activations).eval()
    device = model.lm_head.weight.device
    # Sample shapes: B=2, T=3, P=4, all > 1 so that torch.export does not specialise them
    # (it treats sizes 0 and 1 as constants); the exported axes still accept 0 and 1.
    B, T, P = 2, 3, 4
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    attn_mask = torch.ones(B, P + T, dtype=torch.long, device=device)
    shapes = [block.attn.cache_shapes() for block in model.blocks]
    dtype = model.lm_head.weight.dtype
    past = [torch.zeros(B, h, P, d, dtype=dtype, device=device) for s in shapes for h, d in s]
    input_names, output_names = io_names(cfg, activations)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if dynamo:
                # DYNAMIC lets torch.export work out the relations itself (every batch axis
                # is one symbol; the mask's length is seq + past).
                dyn = torch.export.Dim.DYNAMIC
                dynamic_shapes = {
                    "input_ids": {0: dyn, 1: dyn},
                    "attention_mask": {0: dyn, 1: dyn},
                    "past": [{0: dyn, 2: dyn} for _ in past],
                }
                with _quiet_exporter():
                    program = torch.onnx.export(
                        graph,
                        (ids, attn_mask, past),
                        dynamo=True,
                        input_names=input_names,
                        output_names=output_names,
                        dynamic_shapes=dynamic_shapes,
                        opset_version=opset_version,
                        optimize=True,
                        verbose=False,
                    )
                proto = program.model_proto
                _name_axes(proto)
            else:  # the deprecated TorchScript exporter
                axes = {
                    "input_ids": {0: "batch", 1: "seq"},
                    "attention_mask": {0: "batch", 1: "total"},
                }
                for name in input_names[2:]:
                    axes[name] = {0: "batch", 2: "past"}
                for name in output_names:
                    axes[name] = (
                        {0: "batch", 2: "total"}
                        if name.startswith("present.")
                        else {0: "batch", 1: "seq"}
                    )
                buffer = io.BytesIO()
                with _quiet_exporter():
                    torch.onnx.export(
                        graph,
                        (ids, attn_mask, past),
                        buffer,
                        dynamo=False,
                        input_names=input_names,
                        output_names=output_names,
                        dynamic_axes=axes,
                        opset_version=opset_version or 17,
                    )
                proto = onnx.load_from_string(buffer.getvalue())
    finally:
        model.train(was_training)
    meta = {p.key: p.value for p in proto.metadata_props}
    meta[METADATA_KEY] = json.dumps(cfg.to_dict(), sort_keys=True)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's progress prints and known-harmless warnings (notebook output).

    Errors still raise; only stdout chatter ("[torch.onnx] Obtain model graph ...") and
    warnings (the legacy exporter's deprecation notice, optional torchvision ops) are muted.
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _name_axes(proto: Any) -> None:
    """Rename torch.export's symbolic axes (s25, s70 + s15, ...) to batch / seq / past / total.

    Pure cosmetics for whoever opens the graph (e.g. in Netron): the names are read off the
    inputs, whose axes are known, and substituted in every shape expression of the graph.
    """
    graph = proto.graph
    names: dict[str, str] = {}
    roles = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {1: "total"}}
    for value in graph.input:
        role = roles.get(value.name, {2: "past"} if value.name.startswith("past.") else {})
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis in role and dim.dim_param:
                names.setdefault(dim.dim_param, role[axis])
    if not names:
        return
    pattern = re.compile("|".join(rf"\b{re.escape(k)}\b" for k in sorted(names, key=len)[::-1]))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(0)], dim.dim_param)
