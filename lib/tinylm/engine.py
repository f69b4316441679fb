"""A low-overhead decode path: a static KV cache, a compiled decode step, low-bit weights.

    engine = Engine(model, weights="int4-g32")          # compile="auto" by default
    ids = engine.generate(prompt_ids, 50)               # greedy: the same tokens as generate()
    engine.compiled, engine.fallback_reason, engine.weight_bytes

Why it exists: a decode step of a small model is mostly *overhead*. Eager PyTorch launches
each op separately (tens of ops per layer, a few microseconds each), and tinylm.model's
forward also slices the cache to a length that grows every step, so nothing about the step
stays the same. The Engine removes both:

- Static shapes. The KV cache is preallocated for max_len positions (StaticKVCache); a step
  writes its keys/values at a position held in a *tensor* (`index_copy_`) and attends over
  all max_len slots with a mask hiding the unwritten ones. Every step then has identical
  shapes, so one compiled program serves them all. The step runs the model's own blocks
  and attention layers: only the cache they write to differs.
- torch.compile fuses the small ops into a few kernels called from C++. On a CPU it compiles
  either the whole step as one program (shallow models: least overhead per token) or one
  block that every layer reuses (deep models: compile time independent of depth), see
  `compile_scope`. On CUDA the whole step runs with mode="reduce-overhead" (CUDA graphs: one
  launch replays the step). Compile time is paid once per batch size and reported
  (`compile_seconds`).
  Where compiling is impossible (no C++ compiler, an unsupported platform, a compile
  error) the Engine prints one line saying why and runs eagerly.
- Matrix-vector products written for the compiler. A decode step multiplies one row by
  every weight matrix. BLAS runs such a product on one thread (~11-18 GB/s on the 2-core
  machine, whatever the thread count), so on a CPU the compiled step computes products of
  up to GEMV_MAX_ROWS rows as an explicit multiply-and-sum (`gemv`): the compiler turns it
  into a loop that splits the rows between all threads and converts bf16 or int8 weights
  to float in registers, reading ~26-33 GB/s. This is the CPU cousin of what gpt-fast does
  on GPUs.
- Low-bit weights on real kernels: "bf16" halves the bytes each step reads; "int8"
  (per-channel, `aten._weight_int8pack_mm`) and "int4-g32" (groups of 32, tinylm's
  symmetric quantiser, `aten._weight_int4pack_mm[_for_cpu]`) read 1 and ~0.56 bytes per
  weight *inside* the matmul, instead of expanding the weight to floats first. Activations
  are bf16 for all three (PyTorch's CPU int8 kernel is slower with float32 activations).

Supported: attention "mha", "gqa", "mqa" and "mla" (plain or absorbed), dense MLP. A
mixture-of-experts model runs eagerly with fp32 or bf16 weights (its routing gives every
step data-dependent shapes, so it is not compiled; its experts are not quantised here).
Greedy output equals tinylm.generate.generate for fp32 weights; logits agree within
LOGITS_ATOL (the masked static attention sums in another order).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tinylm.attention import KVCache
from tinylm.device import is_cuda
from tinylm.generate import _check_sampling, _sample
from tinylm.model import GPT, count_parameters
from tinylm.quant import quantize_tensor
from tinylm.util import check_int, check_memory

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4-g32")
INT4_GROUP = 32
#: compile_scope="auto" compiles the whole step up to this depth. Measured on 2 CPU cores:
#: the 4-layer default model decoded 1.6-2.3x faster per token with the whole step compiled
#: than with one compiled block per layer; the 12-layer 100M preset took ~37 s to compile
#: as a whole step (cold cache) against ~7 s as one block.
STEP_SCOPE_MAX_LAYERS = 6
#: Largest |logit difference| between Engine (fp32, eager or compiled) and GPT.forward
#: seen on the trained default model is ~4e-6 (logits up to ~19); the bound leaves room.
LOGITS_ATOL = 1e-3


def _say(message: str) -> None:
    print(f"tinylm.engine: {message}")


# ----------------------------------------------------------------------------- kernels


def _op(name: str) -> Callable[..., Tensor] | None:
    return getattr(torch.ops.aten, name, None)


def low_bit_kernels(device: torch.device) -> dict[str, str | None]:
    """For "int8" and "int4-g32": None if this torch has the kernel on `device`, else why not."""
    cpu = device.type == "cpu"
    need = {
        "int8": ["_weight_int8pack_mm"],
        "int4-g32": (
            ["_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"]
            if cpu
            else ["_convert_weight_to_int4pack", "_weight_int4pack_mm"]
        ),
    }
    if not cpu and not is_cuda(device):
        return {k: f"no low-bit kernel for {device.type} in torch" for k in need}
    out: dict[str, str | None] = {}
    for fmt, ops in need.items():
        missing = [op for op in ops if _op(op) is None]
        out[fmt] = (
            None
            if not missing
            else f"torch {torch.__version__} lacks aten.{missing[0]} (upgrade torch to >= 2.6)"
        )
    return out


#: A compiled CPU step computes a product with at most this many input rows as an explicit
#: multiply-and-sum (`gemv`), larger ones with the matmul kernel. Measured on 2 CPU cores, the
#: 100M preset's layers: the generated reduction read fp32 weights at ~28-30 GB/s (the
#: memory's read rate) for 1 row and ~20 GB/s for 2, BLAS's `F.linear` at ~11 GB/s (it runs
#: a one-row product on one thread); at 8 rows the reduction fell to ~6 GB/s, below BLAS.
GEMV_MAX_ROWS = 2


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weight[out, in]^T written as multiply-and-sum, computed in float32.

    Inside torch.compile on a CPU this becomes one generated loop that splits the weight
    rows between all threads and converts bf16 or int8 weights to float in registers, so
    only the stored bytes cross the memory bus. Eagerly it would materialise a [..., out, in]
    product: only call it while compiling (see `use_gemv`).
    """
    return (x.float().unsqueeze(-2) * weight.float()).sum(-1)


def use_gemv(x: Tensor) -> bool:
    """Whether a linear layer should call `gemv`: compiling for a CPU, with few input rows."""
    return (
        torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.numel() // x.shape[-1] <= GEMV_MAX_ROWS
    )


class GemvLinear(nn.Module):
    """An nn.Linear's weight and bias (shared, not copied) whose compiled decode uses `gemv`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if not use_gemv(x):
            return F.linear(x, self.weight, self.bias)
        y = gemv(x, self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8WeightLinear(nn.Module):
    """y = x W^T with W stored as int8 codes + one bf16 scale per output row (weight-only).

    The kernel (`aten._weight_int8pack_mm`) reads the int8 bytes and scales inside the dot
    product; nothing is expanded to floats in memory. Compiled on a CPU, one- and two-row
    products use `gemv` instead (the codes converted in registers, the scale applied after
    the sum), which splits the rows between all threads.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q = quantize_tensor(linear.weight, bits=8, granularity="channel")
        self.out_features, self.in_features = linear.weight.shape
        # The kernel reads K in blocks of 16 and returns garbage (or crashes) otherwise, so
        # pad the inputs with zero columns (zero weights: the result is unchanged).
        self.pad = -self.in_features % 16
        data = F.pad(q.data, (0, self.pad))
        self.register_buffer("weight_int8", data.contiguous())  # int8 [out, in + pad]
        self.register_buffer("scales", q.scale.reshape(-1).to(torch.bfloat16))

    def dequantized(self) -> Tensor:
        """The float weight this layer multiplies by (the reference for tests)."""
        w = self.weight_int8[:, : self.in_features].float()
        return w * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if use_gemv(x):  # int8 bytes converted in registers: ~1 byte read per weight
            w = self.weight_int8[:, : self.in_features]
            return (gemv(x, w) * self.scales.float()).to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        return y.reshape(*shape[:-1], self.out_features)


class Int4WeightLinear(nn.Module):
    """y = x W^T with W stored as 4-bit codes in groups of 32 (tinylm's symmetric int4).

    The codes come from tinylm.quant.quantize_tensor(bits=4, group_size=32); they are
    repacked into the tile layout of PyTorch's int4 kernel, which computes
    (code - 8) * scale + zero per weight inside the matmul; symmetric means zero = 0.
    Storage: in/2 bytes of codes per row, plus 2 bf16 (scale, zero) per group: the zero
    points are padding this kernel needs (counted in weight_bytes: 0.625 bytes per weight).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_f, in_f = linear.weight.shape
        self.out_features, self.in_features = out_f, in_f
        q = quantize_tensor(linear.weight, bits=4, group_size=INT4_GROUP)
        # The quantiser pads each row to whole groups (code 8 = weight 0); inputs get the
        # same zero columns in forward.
        self.pad = q.data.shape[1] * 2 - in_f
        nibbles = torch.stack((q.data & 0x0F, q.data >> 4), dim=-1).reshape(out_f, -1)
        # The CPU kernel packs output rows in tiles of 16: pad with rows of weight 0 (code 8).
        self.pad_out = -out_f % 16
        codes = F.pad(nibbles.to(torch.int32), (0, 0, 0, self.pad_out), value=8)  # code + 8
        scale = F.pad(q.scale.float(), (0, 0, 0, self.pad_out), value=1.0).t()  # [groups, out]
        scales_zeros = torch.stack((scale, torch.zeros_like(scale)), dim=-1)
        self.cpu = linear.weight.device.type == "cpu"
        if self.cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        else:
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16).contiguous())
        self._codes = codes  # not a buffer (not counted, not moved): for dequantized() only

    def dequantized(self) -> Tensor:
        """The float weight the kernel multiplies by (codes - 8) * bf16 scale."""
        codes, sz = self._codes, self.scales_zeros
        scale = sz[..., 0].float().t().repeat_interleave(INT4_GROUP, dim=1)
        return ((codes.float() - 8) * scale)[: self.out_features, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        if self.cpu:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.weight_int4, INT4_GROUP, self.scales_zeros
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm(
                x2, self.weight_int4, INT4_GROUP, self.scales_zeros
            )
        if self.pad_out:
            y = y[:, : self.out_features]
        return y.reshape(*shape[:-1], self.out_features)


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every nn.Linear below `model` (the output head included) by make(linear)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, make(child))
        else:
            _replace_linears(child, make)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer that is a weight (RoPE tables excluded), counted once."""
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or name.startswith("rope_") or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- compile


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None if it should): checked before trying."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32" and device.type == "cpu":
        return "torch.compile's CPU backend is not supported on Windows here"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        return "no C++ compiler found (install g++ or clang to compile decode steps)"
    if device.type != "cpu" and not is_cuda(device):
        return f"torch.compile is not set up for {device.type} here"
    return None


_SET_STANCE = getattr(torch.compiler, "set_stance", None)
#: Whether this torch can skip guard checks (torch >= 2.6); looked up once, not per token.
CAN_SKIP_GUARDS = (
    _SET_STANCE is not None
    and "skip_guard_eval_unsafe" in inspect.signature(_SET_STANCE).parameters
)


def _skip_guard_checks() -> contextlib.AbstractContextManager:
    """torch.compiler.set_stance(skip_guard_eval_unsafe=True) where this torch has it."""
    if not CAN_SKIP_GUARDS:
        return contextlib.nullcontext()
    return _SET_STANCE("default", skip_guard_eval_unsafe=True)


# ----------------------------------------------------------------------------- the cache


class StaticLayerCache:
    """One layer's slice of the Engine's KV cache: fixed buffers, written at tensor positions.

    The model's attention layers call `update(layer, *new)` on it exactly as they call a
    tinylm.attention.KVCache (the layer index is not needed: this object is one layer's), so
    the Engine runs the model's own blocks. What makes a step compilable once: the new
    entries go in with `index_copy_` at `positions` (a tensor, so the code does not change as
    decoding advances) and the *whole* buffers come back, max_len slots each; the step's
    mask hides the slots not written yet. `rows` is the step's batch (a prefix of the rows).
    """

    def __init__(self, buffers: tuple[Tensor, ...], positions: Tensor) -> None:
        self.buffers, self.positions, self.rows = buffers, positions, buffers[0].shape[0]

    def update(self, layer: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Write new entries [B, heads, T, dim] at `positions` [T]; return the full buffers."""
        bufs = tuple(buf[: self.rows] for buf in self.buffers)
        for buf, x in zip(bufs, new, strict=True):
            buf.index_copy_(2, self.positions, x)
        return bufs


def run_block(
    block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: StaticLayerCache
) -> Tensor:
    """One transformer block on its static cache."""
    return block(x, cos, sin, mask, cache)


def run_block_math_attention(
    block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: StaticLayerCache
) -> Tensor:
    """run_block with attention written out as matmul + softmax (what a CPU Engine compiles).

    A decode step attends one query to at most max_len keys: tiny work, for which the fused
    SDPA kernel's call costs more than the arithmetic. Written out, the compiler fuses it
    into the block's own generated code.
    """
    with sdpa_kernel([SDPBackend.MATH]):
        return block(x, cos, sin, mask, cache)


def run_head(model: GPT, x: Tensor) -> Tensor:
    """Float32 next-token logits [B, V] from the last position of hidden states x [B, T, C]."""
    return model.lm_head(model.norm(x[:, -1])).float()


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Decode with a static KV cache, a compiled step and optional low-bit weights.

    model: a tinylm GPT (not modified: converted weights go into a copy).
    max_batch: rows the cache holds; max_len: positions (default context_length). Every
        step attends over all max_len slots, so size it to the longest request you will
        serve (prompt + new tokens): a cache twice too long doubles attention's work.
    compile: "auto"/True compile when possible (else eager, with one printed line saying
        why); False: eager. weights: "fp32", "bf16", "int8" or "int4-g32".
    compile_scope (CPU): "step" compiles the whole decode step as one program (least
        overhead per token; compile time grows with depth), "block" compiles one block that
        every layer reuses (compile time independent of depth); "auto": "step" up to
        STEP_SCOPE_MAX_LAYERS layers, else "block". On CUDA the whole step is one CUDA graph.
    Attributes: compiled, fallback_reason, weight_bytes (bytes of all weights as stored),
    step_weight_bytes (bytes a decode step reads: all weights but the embedding table, of
    which it reads one row per token), compile_seconds (per batch size compiled).
    """

    def __init__(
        self,
        model: GPT,
        max_batch: int = 1,
        max_len: int | None = None,
        compile: str | bool = "auto",
        weights: str = "fp32",
        compile_scope: str = "auto",
    ) -> None:
        if not isinstance(model, GPT):
            raise TypeError(f"Engine takes a tinylm.model.GPT, got {type(model).__name__}.")
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights={weights!r}: choose one of {WEIGHT_FORMATS}.")
        if compile not in ("auto", True, False):
            raise ValueError(f"compile={compile!r}: use 'auto', True or False.")
        if compile_scope not in ("auto", "step", "block"):
            raise ValueError(f"compile_scope={compile_scope!r}: use 'auto', 'step' or 'block'.")
        cfg = model.config
        ctx = cfg.context_length
        self.max_len = ctx if max_len is None else max_len
        if not 1 <= self.max_len <= ctx:
            raise ValueError(f"max_len={max_len} must be in 1..context_length={ctx}.")
        check_int("max_batch", max_batch, 1, fix="the most rows one step may batch, e.g. 8")
        self.config, self.max_batch, self.weights = cfg, max_batch, weights
        if compile_scope == "auto":
            compile_scope = "step" if cfg.n_layer <= STEP_SCOPE_MAX_LAYERS else "block"
        self.compile_scope = compile_scope
        self.device = model.lm_head.weight.device
        self.fallback_reason: str | None = None
        moe = cfg.mlp == "moe"
        if moe and weights not in ("fp32", "bf16"):
            raise ValueError(
                f"weights={weights!r} is not supported for mixture-of-experts models (their "
                "experts are not nn.Linear layers the low-bit kernels replace); use 'fp32' or "
                "'bf16', or tinylm.quant.quantize_model for quality experiments."
            )
        if weights in ("int8", "int4-g32"):
            missing = low_bit_kernels(self.device)[weights]
            if missing:
                _say(f"weights={weights!r} unavailable ({missing}); using 'bf16' instead.")
                self.fallback_reason = f"{weights}: {missing}"
                weights = self.weights = "bf16"
        self.model = self._convert(model, weights)
        self.dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        self.weight_bytes = weight_bytes(self.model)
        emb = self.model.tok_emb.weight
        self.step_weight_bytes = self.weight_bytes - (
            0 if cfg.tie_embeddings else emb.numel() * emb.element_size()
        )
        self.rope_cos = self.model.rope_cos[: self.max_len].to(self.dtype)
        self.rope_sin = self.model.rope_sin[: self.max_len].to(self.dtype)
        shapes = [block.attn.cache_shapes() for block in self.model.blocks]
        cache = KVCache(max_batch, self.max_len, shapes, self.dtype, self.device)
        self.layer_caches = [
            StaticLayerCache(bufs, torch.zeros(1, dtype=torch.long, device=self.device))
            for bufs in cache.layers
        ]
        self.compile_seconds: dict[int, float] = {}
        self._decode_fn: Callable[[Tensor, Tensor], Tensor] = self._step
        self.compiled = False
        if compile is not False:
            reason = compile_unavailable_reason(self.device)
            if reason is None and moe:
                reason = "mixture-of-experts routing has data-dependent shapes"
            if reason is None:
                self._compile()
            else:
                self._fall_back(reason)

    # -- setup

    def _convert(self, model: GPT, weights: str) -> GPT:
        if weights == "fp32":
            if model.lm_head.weight.dtype != torch.float32:
                raise ValueError("weights='fp32' needs a float32 model; call model.float() first.")
            # A copy of the modules that shares every weight (nothing is duplicated), with
            # linears that compile to `gemv` for a one-row decode step.
            shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
            new = copy.deepcopy(model, memo=shared).eval()
            _replace_linears(new, GemvLinear)
            return new
        if weights != "bf16" and any(getattr(b.attn, "absorb", False) for b in model.blocks):
            raise ValueError(
                "absorbed MLA multiplies by kv_b_proj's weight matrix directly, so it cannot be "
                f"stored as {weights!r}; use weights='bf16' or model.set_mla_absorb(False)."
            )
        check_memory(  # the converted copy starts as a float32 deep copy
            4 * count_parameters(model.config), f"converting the weights to {weights}",
            "free memory, or use weights='fp32' (no copy)",
        )  # fmt: skip
        new = copy.deepcopy(model).eval()
        new.to(torch.bfloat16)
        make = {"bf16": GemvLinear, "int8": Int8WeightLinear, "int4-g32": Int4WeightLinear}
        _replace_linears(new, make[weights])
        return new

    def _compile(self) -> None:
        import torch._dynamo  # noqa: F401  (makes the compiler's errors importable below)

        self.compiled = True

        if is_cuda(self.device):
            # One CUDA graph for the whole step: launching it costs one call, not hundreds.
            self._decode_fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)
            return
        # On a CPU a C++ wrapper calls the generated kernels: on a small model the Python that
        # would otherwise run between them is a good part of the step.
        options = {"cpp_wrapper": True}
        if self.compile_scope == "step":
            # The whole step as one program: one call and no Python between layers.
            self._decode_fn = torch.compile(
                self._step_math_attention, fullgraph=True, dynamic=False, options=options
            )
        else:
            # One compiled block, reused by every layer (same code, same shapes: "regional"
            # compilation), so compile time does not grow with depth.
            block_fn = torch.compile(
                run_block_math_attention, fullgraph=True, dynamic=False, options=options
            )
            # The output head too: a large matrix-vector product that gains from `gemv`.
            head_fn = torch.compile(run_head, fullgraph=True, dynamic=False, options=options)
            self._decode_fn = lambda idx, pos: self._step(idx, pos, block_fn, head_fn)

    def _fall_back(self, reason: str) -> None:
        _say(f"decoding eagerly (not compiled): {reason}.")
        self.fallback_reason = reason
        self._decode_fn, self.compiled = self._step, False

    # -- forward

    def _step(
        self,
        idx: Tensor,
        pos: Tensor,
        block_fn: Callable[..., Tensor] = run_block,
        head_fn: Callable[[GPT, Tensor], Tensor] = run_head,
    ) -> Tensor:
        """Float32 next-token logits [B, V] after tokens idx [B, T] written at positions pos [T]."""
        B = idx.shape[0]
        mask = torch.arange(self.max_len, device=idx.device) <= pos[:, None]  # [T, max_len]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.model.tok_emb(idx)
        for block, cache in zip(self.model.blocks, self.layer_caches, strict=True):
            cache.positions, cache.rows = pos, B
            x = block_fn(block, x, cos, sin, mask, cache)  # the model's own blocks
        return head_fn(self.model, x)  # only the last position

    def _step_math_attention(self, idx: Tensor, pos: Tensor) -> Tensor:
        return self._step(idx, pos, run_block_math_attention)

    def _decode(self, token: Tensor, pos: Tensor) -> Tensor:
        """One decode step (the compiled one), compiling on first use of this batch size."""
        B = token.shape[0]
        if not self.compiled:
            return self._decode_fn(token, pos)
        if B in self.compile_seconds:
            # This shape is compiled and nothing else about the step changes, so skip
            # re-checking the compiled code's guards (weights, buffers, shapes) on every call:
            # torch.compile's own per-call overhead. Only the guards that tell compiled
            # shapes apart (the batch size) still run.
            with _skip_guard_checks():
                return self._decode_fn(token, pos)
        start = time.perf_counter()
        try:
            logits = self._decode_fn(token, pos)
        except Exception as err:  # noqa: BLE001  any compiler failure -> eager, never fail
            self._fall_back(
                f"compile error ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
            )
            return self._decode_fn(token, pos)
        self.compile_seconds[B] = time.perf_counter() - start
        _say(
            f"compiled the decode step for batch {B} in {self.compile_seconds[B]:.1f} s (once per shape)."
        )
        return logits

    def _batch(
        self, prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Tensor
    ) -> tuple[Tensor, bool]:
        ids = (
            torch.as_tensor(prompt_ids, dtype=torch.long)
            if not isinstance(prompt_ids, Tensor)
            else prompt_ids
        )
        batched = ids.dim() == 2
        ids = ids.reshape(1, -1) if not batched else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError("prompt_ids: give token ids [T] or equal-length rows [B, T], T >= 1.")
        if ids.shape[0] > self.max_batch:
            raise ValueError(
                f"{ids.shape[0]} prompts but the Engine was built with max_batch={self.max_batch}; "
                "build it with a larger max_batch."
            )
        V = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"token ids must be in 0..{V - 1} (this model's vocabulary).")
        return ids.to(self.device), batched

    def reset(self) -> None:
        """Forget the cached keys/values (the masks hide them anyway; this is for tidiness)."""
        for cache in self.layer_caches:
            for b in cache.buffers:
                b.zero_()

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """Fill the cache with prompts ids [B, T] (eager); next-token logits [B, V] (float32)."""
        pos = torch.arange(ids.shape[1], device=self.device)
        return self._step(ids, pos)

    @torch.inference_mode()
    def decode_step(self, token: Tensor, position: int) -> Tensor:
        """Logits [B, V] (float32) for tokens [B] at `position` (the cache holds 0..position-1)."""
        pos = torch.tensor([position], device=self.device)
        # A fresh contiguous int64 column: the compiled step was specialised to one layout,
        # and a strided view (e.g. ids[:, -1]) must not look like a new shape.
        idx = token.to(torch.long).reshape(-1, 1).clone(memory_format=torch.contiguous_format)
        return self._decode(idx, pos)

    def generate(
        self,
        prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[int] | list[list[int]]:
        """New token ids for one prompt (-> list[int]) or equal-length rows (-> list[list])."""
        _check_sampling(temperature, top_k, top_p)
        check_int("max_new_tokens", max_new_tokens, 0, fix="0 returns no new tokens")
        ids, batched = self._batch(prompt_ids)
        B, T = ids.shape
        if T + max_new_tokens - 1 > self.max_len:
            raise ValueError(
                f"prompt ({T}) + max_new_tokens ({max_new_tokens}) - 1 exceeds max_len="
                f"{self.max_len}; shorten them or build the Engine with a larger max_len."
            )
        gen = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        out: list[Tensor] = []
        if max_new_tokens:
            logits = self.prefill(ids)
            token = _sample(logits, temperature, top_k, top_p, gen)
            out.append(token)
            for i in range(1, max_new_tokens):
                logits = self.decode_step(token, T + i - 1)
                token = _sample(logits, temperature, top_k, top_p, gen)
                out.append(token)
        rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
        return rows if batched else rows[0]
