"""Quantising whole models: schemes, quantize_model, real bytes, save/load, an int8 KV cache.

    qmodel = quantize_model(model, "int4-g32")            # a quantised deep copy
    model_nbytes(qmodel) / model_nbytes(model)             # ~0.3 with a float head/embedding
    save_quantized("out/q4", qmodel, tokenizer); load_quantized("out/q4")
    set_kv_cache(qmodel, "int8")                           # model.new_cache builds Int8KVCache

The tensor-level pieces (formats, packing, QuantLinear) live in `tinylm.quant.rtn`; GPTQ in
`tinylm.quant.calibrate`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tinylm import checkpoint
from tinylm.attention import KVCache
from tinylm.config import kv_vectors_per_token
from tinylm.model import GPT
from tinylm.quant.calibrate import gptq_quantize_model
from tinylm.quant.rtn import QuantLinear, check_format, compute_scale_zero, quantize_codes
from tinylm.tokenizer import BPETokenizer

# ----------------------------------------------------------------------------- whole models


@dataclass(frozen=True)
class QuantScheme:
    """How to quantise every Linear of a model: the format (as in quantize_tensor), RTN or GPTQ."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    granularity: str | None = None  # None: "group" if group_size else "channel"
    method: str = "rtn"  # "rtn" (round to nearest) or "gptq" (needs calibration tokens)

    def __post_init__(self) -> None:
        # frozen dataclass: store the resolved granularity through object.__setattr__
        object.__setattr__(
            self, "granularity", check_format(self.bits, self.group_size, self.granularity)
        )
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method must be 'rtn' or 'gptq', got {self.method!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Named schemes for quantize_model. Bytes per weight with fp16 scales: int8 ~1,
#: int4-gN = 0.5 + 2/N (+ 1/N for the uint8 zero points of -asym).
SCHEMES: dict[str, QuantScheme] = {
    "int8": QuantScheme(8),  # one scale per output channel
    "int8-tensor": QuantScheme(8, granularity="tensor"),
    "int8-g32": QuantScheme(8, 32),  # the Q8_0 layout
    "int4-channel": QuantScheme(4),
    "int4-g32": QuantScheme(4, 32),  # Q4_0-compatible layout
    "int4-g64": QuantScheme(4, 64),
    "int4-g128": QuantScheme(4, 128),
    "int4-g32-asym": QuantScheme(4, 32, symmetric=False),
    "int4-g128-asym": QuantScheme(4, 128, symmetric=False),
    "int4-channel-gptq": QuantScheme(4, method="gptq"),
    "int4-g32-gptq": QuantScheme(4, 32, method="gptq"),
    "int4-g128-gptq": QuantScheme(4, 128, method="gptq"),
}


def get_scheme(scheme: str | QuantScheme) -> QuantScheme:
    """Look a scheme up by name (or pass a QuantScheme through)."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme!r}; choose one of {list(SCHEMES)} or pass a QuantScheme."
        )
    return SCHEMES[scheme]


def quantizable_linears(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    """The Linear layers quantize_model replaces, by qualified name, in forward order.

    Every Linear inside the transformer blocks (attention, MLP, routed and shared experts)
    except MoE routers: a router is tiny, and a rounding that flips a close top-k choice
    sends a token to a different expert, a far larger change than the rounding itself.
    The token embedding and the output head stay in float by default: the embedding is a
    lookup (one row read per token, no matmul to speed up) and the head's errors land
    directly on the logits; include_head=True quantises the head too.
    """
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("blocks.") and not name.endswith("router")
    }
    if include_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        layers["lm_head"] = model.lm_head
    return layers


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(
    model: nn.Module,
    scheme: str | QuantScheme = "int8",
    calibration: Tensor | None = None,
    include_head: bool = False,
    compute: str = "dequant",
    **gptq_kw: Any,
) -> nn.Module:
    """Return a quantised deep copy of `model` (the original is untouched), in eval mode.

    scheme: a name from SCHEMES or a QuantScheme. calibration: token windows [n, T]
    (see quant.calibrate.calibration_windows), needed by GPTQ schemes. compute: "dequant" or
    "int8" (see QuantLinear). gptq_kw go to quant.calibrate.gptq_quantize_model.
    """
    sch = get_scheme(scheme)
    qmodel = copy.deepcopy(model).eval()
    targets = quantizable_linears(qmodel, include_head)
    if sch.method == "gptq":
        if calibration is None:
            raise ValueError(
                "GPTQ needs calibration data: pass calibration=calibration_windows(tokens) "
                "(tinylm.quant.calibrate), or use an RTN scheme."
            )
        gptq_quantize_model(qmodel, targets, sch, calibration, **gptq_kw)
    else:
        for name, linear in targets.items():
            q = QuantLinear.from_linear(
                linear, sch.bits, sch.group_size, sch.granularity, sch.symmetric
            )
            _set_module(qmodel, name, q)
    set_compute(qmodel, compute)
    qmodel.quant_scheme = scheme if isinstance(scheme, str) else "custom"
    qmodel.quant_config = {"scheme": sch.to_dict(), "include_head": include_head}
    return qmodel


def set_compute(model: nn.Module, compute: str) -> nn.Module:
    """Switch every QuantLinear of `model` to compute="dequant" or "int8" (in place)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.compute = compute
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's state: parameters and persistent buffers, tied tensors once.

    Non-persistent buffers (the RoPE tables, recomputed from the config) are not counted.
    """
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- save / load


def save_quantized(
    directory: str | os.PathLike, model: nn.Module, tokenizer: Any = None, meta: dict | None = None
) -> Path:
    """Save a quantised model as a tinylm checkpoint folder (safetensors + JSON, atomic).

    The packed buffers go to model.safetensors; the layer formats and the scheme go to
    meta.json under "quantization", from which load_quantized rebuilds the empty layers.
    """
    layers = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no QuantLinear layers; quantize_model it first.")
    info = {
        "format": "tinylm-quantized",
        "version": 1,
        "scheme": getattr(model, "quant_scheme", None),
        "config": getattr(model, "quant_config", None),
        "layers": layers,
    }
    return checkpoint.save(directory, model, tokenizer, meta={**(meta or {}), "quantization": info})


def load_quantized(
    directory: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[nn.Module, Any, dict]:
    """Load (model, tokenizer, meta) written by save_quantized; tokenizer may be None.

    The model is rebuilt from config.json, its quantised layers from meta["quantization"],
    then the packed weights are loaded and verified (names and shapes must match exactly).
    device: None keeps the CPU; pass e.g. tinylm.device.pick_device() to move it.
    """
    manifest = checkpoint.verify(directory)
    config = checkpoint.load_config(directory)
    meta = json.loads((Path(directory) / "meta.json").read_text(encoding="utf-8"))
    info = meta.get("quantization")
    if not isinstance(info, dict) or info.get("format") != "tinylm-quantized":
        raise ValueError(
            f"{directory} is not a quantised checkpoint (meta.json has no 'quantization'); "
            "load it with tinylm.checkpoint.load, or save it with save_quantized."
        )
    model = GPT(config)
    scale_dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    for name, spec in info["layers"].items():
        spec = dict(spec)
        if spec.get("scale_dtype") not in scale_dtypes:
            raise ValueError(
                f"{directory}: layer {name} has scale_dtype {spec.get('scale_dtype')!r}, expected "
                f"one of {list(scale_dtypes)}; save the model again with save_quantized."
            )
        spec["scale_dtype"] = scale_dtypes[spec["scale_dtype"]]
        _set_module(model, name, QuantLinear(**spec))
    checkpoint.load_weights(directory, model)
    model.quant_scheme, model.quant_config = info.get("scheme"), info.get("config")
    tokenizer = None
    if "tokenizer.json" in manifest["files"]:
        tokenizer = BPETokenizer.load(Path(directory) / "tokenizer.json")
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, meta


# ----------------------------------------------------------------------------- int8 KV cache


class Int8KVCache(KVCache):
    """A KV cache that stores int8 codes plus one fp16 scale per (token, head) vector.

    write() quantises each new key/value vector symmetrically (s = max|x| / 127, so every
    element is within s/2); read() dequantises the prefix back to the compute dtype. Per token
    and head, D channels cost D + 2 bytes instead of 4 D (fp32): about 3.8x smaller at D = 32.
    A production kernel would dequantise inside attention; here read() materialises the float
    prefix each step, so the saving is in what the cache holds, not in speed.
    """

    storage_dtype = torch.int8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The arguments of KVCache; the buffers hold int8 codes, plus one fp16 scale each."""
        super().__init__(*args, **kwargs)
        self.scales = [
            tuple(self._zeros(buf.shape[1], 1, torch.float16) for buf in bufs)
            for bufs in self.layers
        ]

    def write(self, layer: int, pos: int, *new: Tensor) -> None:
        for buf, sbuf, x in zip(self.layers[layer], self.scales[layer], new, strict=True):
            s, _ = compute_scale_zero(x.unsqueeze(-2), 8, True)  # x [B, H, T, D] -> s [B, H, T, 1]
            q = quantize_codes(x.unsqueeze(-2), s, None, 8).squeeze(-2)
            buf[:, :, pos : pos + x.shape[2]] = q.to(torch.int8)
            sbuf[:, :, pos : pos + x.shape[2]] = s

    def read(self, layer: int, end: int) -> tuple[Tensor, ...]:
        return tuple(
            (buf[:, :, :end].float() * sbuf[:, :, :end].float()).to(self.dtype)
            for buf, sbuf in zip(self.layers[layer], self.scales[layer], strict=True)
        )

    def nbytes(self) -> int:
        """Bytes of the int8 codes and their fp16 scales (the validity mask is not counted)."""
        tensors = [t for bufs in (*self.layers, *self.scales) for t in bufs]
        return sum(t.numel() * t.element_size() for t in tensors)


def new_int8_cache(
    model: nn.Module,
    batch_size: int,
    max_len: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Int8KVCache:
    """An Int8KVCache for `model`, with the arguments and defaults of GPT.new_cache."""
    return model.new_cache(batch_size, max_len, dtype, device, cache_class=Int8KVCache)


def set_kv_cache(model: nn.Module, kind: str = "int8") -> nn.Module:
    """Choose what model.new_cache(...) builds: the int8 cache ("int8") or the float one ("float").

    Sets model.kv_cache_class, so every caller of model.new_cache (tinylm.generate included)
    gets that cache with no change. In place; returns the model.
    """
    classes = {"int8": Int8KVCache, "float": KVCache}
    if kind not in classes:
        raise ValueError(f"kind must be 'int8' or 'float', got {kind!r}.")
    model.kv_cache_class = classes[kind]
    return model


def int8_kv_bytes_per_token(config: Any) -> int:
    """Bytes the int8 cache holds per token: one byte per element + an fp16 scale per vector."""
    vectors, width = kv_vectors_per_token(config)
    return vectors * (width + 2)
