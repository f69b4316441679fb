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

What is exported is `tinylm.port.onnx_export.ExportGraph`, a functional re-statement of GPT.forward over the same
weights: attention is written out as matmul + softmax (portable to every runtime; fused SDPA
exports differently across opsets), RMSNorm likewise (its ONNX operator needs opset 23,
which few runtimes implement yet), and MoE layers run every expert and weight the outputs
with a gate matrix that is zero for unchosen experts. That dense dispatch gives the same
numbers as the sparse one (adding 0 * y changes nothing for finite y, and the chosen experts
are summed in the same order) at n_experts / experts_per_token times the expert FLOPs: fine
for a tiny model, wrong for a big one, where a runtime-specific MoE kernel would be needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.cache_positions import CachePositions
from tinylm.port.numpy_runtime import CachedLM, activation_names

METADATA_KEY = "tinylm.config"  # GPTConfig.to_dict() as JSON, stored in the ONNX file


def io_names(config: Any, activations: bool) -> tuple[list[str], list[str]]:
    """The graph's input and output names for `config` (shared by the export and OnnxLM)."""
    kinds = ["latent"] if config.attention == "mla" else ["key", "value"]
    past = [f"past.{i}.{k}" for i in range(config.n_layer) for k in kinds]
    present = [p.replace("past.", "present.", 1) for p in past]
    acts = [f"act.{n}" for n in activation_names(config.n_layer)[:-1]] if activations else []
    return ["input_ids", "attention_mask", *past], ["logits", *present, *acts]


# ----------------------------------------------------------------------------- the runtime


class OnnxCache(CachePositions):
    """The KV cache of an OnnxLM: the last `present` arrays, fed back as the next `past`.

    ONNX Runtime returns new arrays each step (the graph appends with Concat), so there is
    nothing to preallocate; `mask` [B, max_len] and `pos` mirror the other caches.
    """

    def __init__(self, batch_size: int, max_len: int, empty: list[np.ndarray]) -> None:
        super().__init__(batch_size, max_len)
        self.arrays = empty
        self.mask = np.zeros((batch_size, max_len), dtype=bool)

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
                f"no ONNX file at {path}. Fix: write one with tinylm.port.onnx_export.export_onnx(model, "
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
                "tinylm.port.onnx_export.export_onnx; export the model with it."
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
        ids, cache = self._checked_call(ids, cache)
        B, T = ids.shape
        pos = cache.pos
        cache.record_tokens(pad_mask, T)
        feed = {"input_ids": ids, "attention_mask": cache.mask[:, : pos + T].astype(np.int64)}
        feed.update(zip(self.past_names, cache.arrays, strict=True))
        outputs = self.session.run(None, feed)
        cache.arrays = outputs[1 : 1 + self.n_present]
        cache.advance(T)
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
