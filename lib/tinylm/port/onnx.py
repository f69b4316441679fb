"""Export a tinylm GPT to ONNX with an explicit KV cache, and run it in ONNX Runtime.

    export_onnx(model, "tinylm.onnx")                    # needs torch (the exporter)
    lm = OnnxLM("tinylm.onnx")                           # needs only onnxruntime + numpy
    lm.logits(ids); lm.generate(prompt_ids, 20, temperature=0)

ONNX is the hand-over format between stacks: a graph of standard operators plus the weights,
which every vendor's runtime can load. ONNX Runtime picks the hardware through "execution
providers": the same file runs on this CPU (CPUExecutionProvider), on an NVIDIA GPU
(`OnnxLM(path, providers=["CUDAExecutionProvider"])`), on Huawei Ascend NPUs
(`["CANNExecutionProvider"]`), on AMD (`["ROCMExecutionProvider"]` / MIGraphX), or through
TensorRT / OpenVINO / CoreML, each with the CPU as fallback for operators it lacks.

The graph. A PyTorch KV cache is a mutable object; an ONNX graph is a pure function. So the
cache becomes explicit inputs and outputs, one graph serving both phases:

    inputs   input_ids [B, T] int64, attention_mask [B, P + T] int64 (1 = real, 0 = left pad),
             past.{i}.key / past.{i}.value [B, n_kv_head, P, head_dim]     (MHA / GQA / MQA)
             past.{i}.latent [B, 1, P, kv_lora_rank + rope_head_dim]       (MLA)
    outputs  logits [B, T, V], present.{i}.* = past.{i}.* with the T new positions appended

Prefill is a call with an empty past (P = 0) and the whole prompt; each decode step feeds
one token and the previous step's `present` as `past`. B, T and P are dynamic axes.

Exporter. Both of torch 2.13's exporters produce a correct graph here (same numbers to
~1e-7, same decode speed in ONNX Runtime). The default is `torch.onnx.export(dynamo=True)`:
it captures the graph with torch.export (symbolic shapes, so the dynamic axes are real
rather than traced constants), translates it with onnxscript (opset 20) and is the only one
maintained. The TorchScript exporter (dynamo=False, opset 17) warns that it will be removed,
but exports ~10-30x faster (two symbolic traces vs one plain trace), so tests use it for
their extra variants. Quantised models (tinylm.quant.model) export and match as well, but
the exporters constant-fold (most of) the dequantisation back into float32 weights, so the
file is no smaller: a truly int8 ONNX model needs DequantizeLinear / MatMulInteger nodes
(e.g. from onnxruntime.quantization), which this module does not write.

What is exported is `_ExportGraph`, a functional re-statement of GPT.forward over the same
weights: attention is written out as matmul + softmax (portable to every runtime; fused SDPA
exports differently across opsets), RMSNorm likewise (its ONNX operator needs opset 23,
which few runtimes implement yet), and MoE layers run every expert and weight the outputs
with a gate matrix that is zero for unchosen experts. That dense dispatch gives the same
numbers as the sparse one (adding 0 * y changes nothing for finite y, and the chosen experts
are summed in the same order) at n_experts / experts_per_token times the expert FLOPs: fine
for a tiny model, wrong for a big one, where a runtime-specific MoE kernel would be needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinylm.port.numpy_runtime import CachedLM, activation_names

if TYPE_CHECKING:
    import torch

METADATA_KEY = "tinylm.config"  # GPTConfig.to_dict() as JSON, stored in the ONNX file


# ----------------------------------------------------------------------------- the graph


def _build_export_graph(model: Any, activations: bool) -> Any:
    """The torch module that is exported: (ids, mask, past...) -> (logits, present..., acts...)."""
    import torch

    from tinylm.attention import apply_rope

    class _ExportGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.config = model.config
            self.mla = model.config.attention == "mla"

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
            extra = [acts[n] for n in activation_names(c.n_layer)[:-1]] if activations else []
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

    return _ExportGraph().eval()


def _io_names(config: Any, activations: bool) -> tuple[list[str], list[str]]:
    kinds = ["latent"] if config.attention == "mla" else ["key", "value"]
    past = [f"past.{i}.{k}" for i in range(config.n_layer) for k in kinds]
    present = [p.replace("past.", "present.", 1) for p in past]
    acts = [f"act.{n}" for n in activation_names(config.n_layer)[:-1]] if activations else []
    return ["input_ids", "attention_mask", *past], ["logits", *present, *acts]


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
    import onnx
    import torch

    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _build_export_graph(model, activations)
    device = model.lm_head.weight.device
    # Sample shapes: B=2, T=3, P=4, all > 1 so that torch.export does not specialise them
    # (it treats sizes 0 and 1 as constants); the exported axes still accept 0 and 1.
    B, T, P = 2, 3, 4
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    attn_mask = torch.ones(B, P + T, dtype=torch.long, device=device)
    shapes = [block.attn.cache_shapes() for block in model.blocks]
    dtype = model.lm_head.weight.dtype
    past = [torch.zeros(B, h, P, d, dtype=dtype, device=device) for s in shapes for h, d in s]
    input_names, output_names = _io_names(cfg, activations)
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


# ----------------------------------------------------------------------------- the runtime


class OnnxCache:
    """The KV cache of an OnnxLM: the last `present` arrays, fed back as the next `past`.

    ONNX Runtime returns new arrays each step (the graph appends with Concat), so there is
    nothing to preallocate; `mask` [B, max_len] and `pos` mirror the other caches.
    """

    def __init__(self, batch_size: int, max_len: int, empty: list[np.ndarray]) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.arrays = empty
        self.mask = np.zeros((batch_size, max_len), dtype=bool)
        self.pos = 0

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


class OnnxLM(CachedLM):
    """Run a file written by `export_onnx` in ONNX Runtime: logits, trace, generate.

    providers: ONNX Runtime execution providers in order of preference, e.g.
        ["CUDAExecutionProvider", "CPUExecutionProvider"] on an NVIDIA GPU or
        ["CANNExecutionProvider", "CPUExecutionProvider"] on an Ascend NPU (each needs the
        matching onnxruntime build). None: CPUExecutionProvider, which every build has.
    session_options: an onnxruntime.SessionOptions (threads, graph optimisation level ...).

    Needs only onnxruntime and NumPy: a deployment target without torch can run it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        session_options: Any = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no ONNX file at {path}. Fix: write one with tinylm.port.onnx.export_onnx(model, "
                f"{str(path)!r})."
            )
        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ValueError(
                f"execution provider(s) {unknown} are not in this onnxruntime build (it has "
                f"{available}); install the matching onnxruntime package (e.g. "
                "onnxruntime-gpu for CUDA) or choose from the list."
            )
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options, providers=providers
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(
                f"{path} has no {METADATA_KEY!r} metadata, so it was not written by "
                "tinylm.port.onnx.export_onnx; export the model with it."
            )
        self.config = json.loads(meta[METADATA_KEY])
        self.path = path
        inputs = self.session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.n_present = len(self.past_names)
        self.past_shapes = [(i.shape[1], i.shape[3]) for i in inputs if i.name.startswith("past.")]
        self.has_activations = any(n.startswith("act.") for n in self.output_names)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return self.session.get_providers()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> OnnxCache:
        """An empty cache (P = 0): feeding it runs the graph's prefill."""
        max_len = self.context_length if max_len is None else max_len
        if not 1 <= max_len <= self.context_length:
            raise ValueError(f"max_len={max_len} must be in 1..{self.context_length}.")
        empty = [np.zeros((batch_size, h, 0, d), dtype=np.float32) for h, d in self.past_shapes]
        return OnnxCache(batch_size, max_len, empty)

    def _run(
        self, ids: np.ndarray, cache: OnnxCache | None, pad_mask: np.ndarray | None
    ) -> list[np.ndarray]:
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
        pos = cache.pos
        cache.mask[:, pos : pos + T] = True if pad_mask is None else pad_mask
        feed = {"input_ids": ids, "attention_mask": cache.mask[:, : pos + T].astype(np.int64)}
        feed.update(zip(self.past_names, cache.arrays, strict=True))
        outputs = self.session.run(None, feed)
        cache.arrays = outputs[1 : 1 + self.n_present]
        cache.pos += T
        return outputs

    def forward(
        self, ids: np.ndarray, cache: OnnxCache | None = None, pad_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Logits [B, T, V] for ids [B, T]; with a cache, appends at cache.pos (decode)."""
        return self._run(ids, cache, pad_mask)[0]

    def trace(self, ids: Any) -> dict[str, np.ndarray]:
        """Every named activation of a full forward (needs export_onnx(..., activations=True))."""
        if not self.has_activations:
            raise ValueError(
                f"{self.path} was exported without activation outputs; export it again with "
                "export_onnx(model, path, activations=True) to trace it."
            )
        arr = np.asarray(ids, dtype=np.int64)
        outputs = self._run(arr.reshape(-1, arr.shape[-1]), None, None)
        acts = {
            name.removeprefix("act."): value
            for name, value in zip(self.output_names, outputs, strict=True)
            if name.startswith("act.")
        }
        acts["logits"] = outputs[0]
        return acts
