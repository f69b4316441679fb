"""Measure inference cost on this machine: timers, op breakdown, FLOPs, bytes, memory, roofline.

    t = time_fn(lambda: model(ids), repeats=10)               # Timing: median, IQR, samples
    table = time_generation(model, batch_sizes=(1, 8), context_lengths=(32, 64))
    print(table)                                              # TTFT, TPOT, tokens/s per cell
    rows = op_breakdown(model, ids, phase="decode")           # where a decode step's time goes
    roof = measure_roofline()                                 # this machine's peaks + a Chip
    plot_roofline(roof, generation_points(model, table[0]))   # prefill and decode on the roof

Chapter 08 measures before it projects. Everything here times what `tinylm.generate` runs
(its `prefill` and `decode_step`), counts FLOPs the way `tinylm.model.flops_per_token` does
(torch's FlopCounterMode, with the fused CPU attention kernel registered), and counts bytes
the way `tinylm.costs.estimate` does, so measured and predicted numbers can be put side by
side (`predicted_vs_measured`).

Device-agnostic: every clock read is preceded by `tinylm.device.synchronize`, so timings on
an accelerator measure the work, not the time to queue it. Timings on a shared machine are
noisy: read medians and ratios, not digits.
"""

from __future__ import annotations

import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tinylm import generate as gen
from tinylm.config import GPTConfig
from tinylm.costs import ACTIVATION_BYTES, SUPPORTED_BITS, ModelShape, estimate
from tinylm.course.plots import PALETTE, si
from tinylm.device import describe_device, pick_device, synchronize
from tinylm.hardware import Chip, this_machine
from tinylm.model import flops_per_token
from tinylm.util import check_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Comparison",
    "GenerationRecord",
    "OpRow",
    "Roofline",
    "RooflinePoint",
    "StepBytes",
    "Table",
    "Timing",
    "bytes_per_step",
    "count_flops",
    "flop_counter",
    "format_rows",
    "generation_points",
    "measure_roofline",
    "median_seconds",
    "op_breakdown",
    "peak_memory",
    "plot_op_breakdown",
    "plot_roofline",
    "predicted_vs_measured",
    "time_fn",
    "time_generation",
]


# ----------------------------------------------------------------------------- tables


class Table(list):
    """A list of records (dataclasses with `as_row()`) that prints as an aligned text table.

    `to_rows()` gives plain dicts (for pandas, CSV or JSON, if you want them); `print(table)`
    and a notebook's display show the table itself, with no pandas needed.
    """

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict of plain numbers and strings per record."""
        return [r.as_row() if hasattr(r, "as_row") else dict(r) for r in self]

    def __str__(self) -> str:
        return format_rows(self.to_rows())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / Jupyter display
        printer.text(str(self))


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """Format dicts with the same keys as a text table: 4 significant digits, numbers right."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), int | float) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one timed function: every sample, and robust summaries of them.

    The median (not the mean) is the headline: on a shared machine a call that was
    descheduled is an outlier that would drag a mean, but barely moves a median. The spread
    is the interquartile range (q1 .. q3); min and max are there too.
    """

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(q1, q3): the middle half of the samples lies between them."""
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr(self) -> float:
        """Interquartile range q3 - q1 in seconds."""
        q1, q3 = self.quartiles
        return q3 - q1

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def __str__(self) -> str:
        q1, q3 = self.quartiles
        return f"{_ms(self.median)} median (IQR {_ms(q1)} .. {_ms(q3)}, n={len(self.samples)})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def time_fn(
    fn: Callable[..., Any],
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device | None = None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time `fn` `repeats` times (after `warmup` untimed calls); return a `Timing`.

    device: the device `fn` runs on (default: `tinylm.device.pick_device()`); it is
        synchronized before each clock read, because accelerators return before their work
        is done and the clock would otherwise time only the queueing.
    setup: called untimed before every call (warm-up ones included), its result is passed to
        `fn`; use it for state a call consumes, e.g. a freshly prefilled KV cache.

    Each call is timed on its own (rather than `repeats` calls in one block) so that a moment
    when the machine was busy spoils one sample, which the median then ignores.
    """
    check_int("repeats", repeats, integral=True)
    check_int("warmup", warmup, minimum=0, integral=True)
    dev = pick_device(device)

    def call() -> None:
        if setup is None:
            fn()
        else:
            fn(setup())

    for _ in range(warmup):  # first calls pay for lazy initialisation, allocation, caches
        call()
    samples = []
    for _ in range(repeats):
        arg = setup() if setup is not None else None
        synchronize(dev)  # setup's queued work must not be billed to fn
        start = time.perf_counter()
        fn() if setup is None else fn(arg)
        synchronize(dev)
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))


def median_seconds(
    *fns: Callable[[], Any],
    repeats: int = 11,
    warmup: int = 1,
    device: str | torch.device | None = None,
) -> list[float]:
    """Median seconds per call of each of `fns`, timed taking turns; one float per fn.

    Comparing variants (fp32 vs int8, ONNX vs NumPy, ...) by ratios is only fair if a busy
    moment of the machine hits all of them alike, so each round calls every fn once, in
    order, and the medians ignore the rounds a neighbour spoiled. `warmup` untimed rounds
    come first; the device is synchronized around every call (see `time_fn`). A fn that
    consumes state (a KV cache) must reset it itself, e.g. by rewinding `cache.pos`.
    """
    if not fns:
        raise ValueError(
            "median_seconds needs at least one function to time, e.g. median_seconds(f, g)"
        )
    check_int("repeats", repeats, integral=True)
    check_int("warmup", warmup, minimum=0, integral=True)
    dev = pick_device(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            synchronize(dev)
            start = time.perf_counter()
            fn()
            synchronize(dev)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


# ----------------------------------------------------------------------------- runtimes


@dataclass
class _Runner:
    """prefill / decode of one model, whatever runs it (torch or a tinylm port)."""

    vocab_size: int
    context_length: int
    device: torch.device
    # (ids [B, T], max_len) -> (logits [B, V] of the last position, cache)
    prefill: Callable[[Any, int], tuple[Any, Any]]
    # (token [B], cache) -> logits [B, V]
    decode: Callable[[Any, Any], Any]
    # a LongTensor [B, T] -> what prefill takes (a tensor on the model's device, an array)
    as_input: Callable[[torch.Tensor], Any]
    is_torch: bool


def _runner(model: Any) -> _Runner:
    """Adapt a model to prefill/decode. Raises TypeError naming what a runtime must offer.

    A torch `tinylm.model.GPT` (or anything with its interface: `.config`, `new_cache`,
    `forward(ids, cache=)`, e.g. a quantised model from tinylm.quant.model) runs through
    `tinylm.generate.prefill` / `decode_step`, exactly what `generate` runs. A port (NumPy,
    ONNX Runtime: tinylm.port.numpy_runtime.CachedLM) runs through its own
    `new_cache(batch, max_len)` and `forward(ids [B, T] int64 array, cache=)` -> logits
    [B, T, V], with `vocab_size` and `context_length` attributes.
    """
    if isinstance(model, torch.nn.Module) and hasattr(model, "new_cache"):
        params = list(model.parameters())
        device = params[0].device if params else torch.device("cpu")
        return _Runner(
            vocab_size=model.config.vocab_size,
            context_length=model.config.context_length,
            device=device,
            prefill=lambda ids, max_len: gen.prefill(model, ids, max_len=max_len),
            decode=lambda token, cache: gen.decode_step(model, token, cache),
            as_input=lambda ids: ids.to(device),
            is_torch=True,
        )
    needed = ("new_cache", "forward", "vocab_size", "context_length")
    if all(hasattr(model, name) for name in needed):

        def prefill(ids: Any, max_len: int) -> tuple[Any, Any]:
            cache = model.new_cache(ids.shape[0], max_len)
            return model.forward(ids, cache=cache)[:, -1], cache

        return _Runner(
            vocab_size=model.vocab_size,
            context_length=model.context_length,
            device=torch.device("cpu"),  # ports run on the host as far as torch can tell
            prefill=prefill,
            decode=lambda token, cache: model.forward(token[:, None], cache=cache)[:, -1],
            as_input=lambda ids: ids.numpy(),
            is_torch=False,
        )
    raise TypeError(
        f"cannot time a {type(model).__name__}: give a tinylm GPT (torch) or a runtime with "
        f"{', '.join(needed)} (the interface of tinylm.port.numpy_runtime.CachedLM)."
    )


def _random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids [batch, length]: speed does not depend on which tokens they are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def _model_config(model: Any) -> GPTConfig:
    """The GPTConfig of a torch model or of a port (whose config is GPTConfig.to_dict())."""
    config = getattr(model, "config", None)
    if isinstance(config, GPTConfig):
        return config
    if isinstance(config, dict):
        return GPTConfig.from_dict(config)
    raise TypeError(
        f"{type(model).__name__} has no tinylm config (.config as a GPTConfig or its to_dict()); "
        "pass a tinylm model or port."
    )


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationRecord:
    """Latency and throughput of generation for one (batch, context) cell.

    prefill: one prefill of `batch` prompts of `context` tokens, plus picking the first new
        token: the time to first token (TTFT) of every sequence in the batch.
    decode: `new_tokens` decode steps (each: one token per sequence, then the greedy pick of
        the next), timed as one loop as `generate` runs it; these steps attend to
        context + 1 .. context + new_tokens keys.
    """

    batch: int
    context: int
    new_tokens: int
    prefill: Timing
    decode: Timing

    @property
    def ttft_s(self) -> float:
        """Time to first token (median prefill)."""
        return self.prefill.median

    @property
    def tpot_s(self) -> float:
        """Time per output token: one decode step, the median loop over new_tokens."""
        return self.decode.median / self.new_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second over the whole batch."""
        return self.batch * self.context / self.ttft_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch (batch / TPOT)."""
        return self.batch / self.tpot_s

    def as_row(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "context": self.context,
            "ttft_ms": self.ttft_s * 1e3,
            "prefill_tok/s": self.prefill_tokens_per_s,
            "tpot_ms": self.tpot_s * 1e3,
            "decode_tok/s": self.decode_tokens_per_s,
        }


def time_generation(
    model: Any,
    batch_sizes: Iterable[int] = (1, 4),
    context_lengths: Iterable[int] = (32, 64),
    new_tokens: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> Table:
    """Time prefill and decode on a grid of batch sizes x context lengths -> Table of records.

    One `GenerationRecord` per (batch, context), batch-major. Prompts are random token ids
    (seeded): speed does not depend on what they say. Decoding is greedy.
    Works with torch models (GPT and its variants, quantised ones) through
    `tinylm.generate.prefill` / `decode_step`, and with ports that have `new_cache`,
    `forward(ids, cache=)`, `vocab_size` and `context_length` (tinylm.port's CachedLM).
    """
    batch_sizes, context_lengths = list(batch_sizes), list(context_lengths)
    for b in batch_sizes:
        check_int("batch size", b, integral=True)
    for c in context_lengths:
        check_int("context length", c, integral=True)
    check_int("new_tokens", new_tokens, integral=True)
    if not batch_sizes or not context_lengths:
        raise ValueError("give at least one batch size and one context length to time.")
    run = _runner(model)
    too_long = [c for c in context_lengths if c + new_tokens > run.context_length]
    if too_long:
        raise ValueError(
            f"context lengths {too_long} + new_tokens={new_tokens} exceed the model's "
            f"context_length={run.context_length}; use contexts up to "
            f"{run.context_length - new_tokens} or fewer new tokens."
        )
    was_training = getattr(model, "training", False)
    if run.is_torch:
        model.eval()
    try:
        records = Table()
        for b in batch_sizes:
            for c in context_lengths:
                ids = run.as_input(_random_prompts(run.vocab_size, b, c, seed))
                prefill_t, decode_t = _time_cell(run, ids, new_tokens, repeats, warmup)
                records.append(GenerationRecord(b, c, new_tokens, prefill_t, decode_t))
        return records
    finally:
        if run.is_torch:
            model.train(was_training)


def _time_cell(
    run: _Runner, ids: Any, new_tokens: int, repeats: int, warmup: int
) -> tuple[Timing, Timing]:
    """(prefill + first pick, new_tokens decode steps) timings for one batch of prompts."""
    max_len = ids.shape[1] + new_tokens  # the prompt + the new_tokens tokens fed back

    def first_token() -> Any:
        logits, _ = run.prefill(ids, max_len)
        return logits.argmax(-1)

    def decode_loop(state: tuple[Any, Any]) -> None:
        logits, cache = state
        token = logits.argmax(-1)
        for _ in range(new_tokens):
            token = run.decode(token, cache).argmax(-1)

    prefill = time_fn(first_token, repeats, warmup, run.device)
    # The loop consumes its cache, so every call gets a freshly prefilled one (untimed).
    setup = lambda: run.prefill(ids, max_len)
    decode = time_fn(decode_loop, repeats, warmup, run.device, setup=setup)
    return prefill, decode


# ----------------------------------------------------------------------------- op breakdown


@dataclass(frozen=True)
class OpRow:
    """One operator's share of a phase: self time (children excluded) per run of the phase."""

    op: str
    self_cpu_s: float  # host time spent in this op itself, per run
    calls: float  # calls per run
    share: float  # of the summed self time of all ops (device time when there is any)
    self_device_s: float = 0.0  # kernel time on an accelerator (0 on a CPU)

    def as_row(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "self_cpu_us": self.self_cpu_s * 1e6,
            "calls": self.calls,
            "share_%": 100 * self.share,
            "self_device_us": self.self_device_s * 1e6,
        }


def op_breakdown(
    model: torch.nn.Module,
    ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    phase: str = "prefill",
    repeats: int = 3,
    top: int | None = None,
) -> Table:
    """Where a prefill or a decode step spends its time, per operator (torch.profiler).

    phase="prefill": the prefill of `ids` (one prompt or a batch); "decode": one decode step
    after that prefill. The phase runs once untimed (warm-up), then `repeats` times under
    the profiler; each op's time and calls are its median over the runs. Rows are sorted by
    self time; `top` keeps the largest and sums the rest into an "other" row. Self time
    excludes children, so the shares add up to 1: aten::linear is cheap itself, the time is
    in the aten::mm it calls.
    On an accelerator, device (kernel) time is recorded too and the shares use it.
    """

    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}.")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "op_breakdown needs a torch model (it uses torch.profiler); for a port, use its "
            "runtime's own profiler (e.g. onnxruntime's SessionOptions.enable_profiling)."
        )
    check_int("repeats", repeats, integral=True)
    run = _runner(model)
    was_training = model.training
    model.eval()
    try:
        # Room for the warm-up step plus `repeats` decode steps after the prompt.
        prompt_len = ids.shape[-1] if isinstance(ids, torch.Tensor) else _prompt_len(ids)
        max_len = min(run.context_length, prompt_len + repeats + 1)
        if phase == "prefill":
            step = lambda: gen.prefill(model, ids, max_len=max_len)
        else:
            logits, cache = gen.prefill(model, ids, max_len=max_len)
            token = logits.argmax(-1)
            if cache.pos + repeats + 1 > cache.max_len:
                raise ValueError(
                    f"a {prompt_len}-token prompt leaves no room for {repeats + 1} decode steps "
                    f"in context_length={run.context_length}; use a shorter prompt."
                )
            step = lambda: gen.decode_step(model, token, cache)
        step()  # warm-up: the first call pays one-off costs (lazy init, allocations)
        synchronize(run.device)
        activities = [ProfilerActivity.CPU]
        if run.device.type != "cpu":
            activities = list(torch.profiler.supported_activities())
        runs: list[dict[str, tuple[float, int, float]]] = []
        for _ in range(repeats):
            # One profile per run, and per op the median over runs: on a shared machine a run
            # in which the process was descheduled inflates whichever op happened to be
            # running, by milliseconds; a sum over runs would blame that op, a median does not.
            with profile(activities=activities) as p:
                step()
                synchronize(run.device)
            runs.append(
                {
                    e.key: (  # profiler times are microseconds
                        e.self_cpu_time_total * 1e-6,
                        e.count,
                        getattr(e, "self_device_time_total", 0) * 1e-6,
                    )
                    for e in p.key_averages()
                }
            )
    finally:
        model.train(was_training)

    rows = []
    for op in {op for r in runs for op in r}:
        stats = [r.get(op, (0.0, 0, 0.0)) for r in runs]  # an op missing from a run took 0
        cpu, calls, dev = (statistics.median(s[i] for s in stats) for i in range(3))
        if cpu > 0 or dev > 0:
            rows.append((op, cpu, calls, dev))
    use_device = any(r[3] > 0 for r in rows)
    total = sum(r[3] if use_device else r[1] for r in rows) or 1.0
    rows.sort(key=lambda r: -(r[3] if use_device else r[1]))
    table = Table(
        OpRow(op, cpu, calls, (dev if use_device else cpu) / total, dev)
        for op, cpu, calls, dev in rows
    )
    if top is not None and len(table) > top:
        rest = table[top:]
        other = OpRow(
            "other",
            sum(r.self_cpu_s for r in rest),
            sum(r.calls for r in rest),
            sum(r.share for r in rest),
            sum(r.self_device_s for r in rest),
        )
        table = Table([*table[:top], other])
    return table


def _prompt_len(ids: Sequence[Any]) -> int:
    seq = list(ids)
    if seq and isinstance(seq[0], Sequence | torch.Tensor):
        return max(len(row) for row in seq)
    return len(seq)


def plot_op_breakdown(
    rows: Sequence[OpRow], top: int = 10, ax: Any = None, title: str | None = None
) -> Figure:
    """Horizontal bars of each operator's share (largest on top); returns the figure."""
    import matplotlib.pyplot as plt  # lazy: pyplot is heavy, and only plotting needs it

    rows = sorted(rows, key=lambda r: -r.share)
    if len(rows) > top:
        rest = rows[top - 1 :]
        rows = [*rows[: top - 1], OpRow("other", 0.0, 0.0, sum(r.share for r in rest))]
    if ax is None:
        _, ax = plt.subplots()
    names = [r.op.removeprefix("aten::") for r in rows][::-1]
    ax.barh(names, [100 * r.share for r in rows][::-1], color=PALETTE[0])
    ax.set_xlabel("share of self time (%)")
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title)
    return ax.figure


# ----------------------------------------------------------------------------- FLOPs


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas FlopCounterMode lacks; the one place they are registered.

    torch (2.x, at least up to 2.13) has formulas for the CUDA attention kernels but not for
    the fused CPU one, which it would count as 0 FLOPs; it computes the same QK^T and
    scores x V products, so the generic SDPA formula applies (the full T x S square,
    the convention of tinylm.model.flops_per_token). FlopCounterMode hands formulas the
    shapes of the tensor arguments.
    """
    formulas = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        formulas[cpu_sdpa] = lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v)
    return formulas


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A torch FlopCounterMode that also counts the fused CPU attention kernel.

    with flop_counter() as counter:
        model(ids)
    counter.get_total_flops()
    """
    return FlopCounterMode(display=display, custom_mapping=_flop_formulas())


def count_flops(model: torch.nn.Module, ids: torch.Tensor, cache: Any = None) -> int:
    """FLOPs of one forward `model(ids, cache=cache)`, counted by torch (matmuls + attention).

    ids: token ids [B, T] (or [T]). For a tinylm GPT without a cache this equals
    `flops_per_token(config, T) * B * T`; with a cache at position p and T = 1 it equals
    `flops_per_token(config, p + 1) * B`. (GPT.forward computes logits at every position, so
    a prefill also pays the output head for all T tokens, which tinylm.costs does not.)
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    ids = ids[None] if ids.dim() == 1 else ids
    with torch.no_grad(), flop_counter() as counter:
        model(ids, cache=cache) if cache is not None else model(ids)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- bytes


@dataclass(frozen=True)
class StepBytes:
    """Memory traffic of one forward (prefill or one decode step) of the whole batch, in bytes."""

    weights: float  # weights read (the embedding: only the rows looked up)
    kv_read: float  # KV cache read by attention
    kv_write: float  # new keys/values written to the cache
    activations: float  # matmul inputs and outputs

    @property
    def total(self) -> float:
        return self.weights + self.kv_read + self.kv_write + self.activations


#: A chip with unit peaks: estimate() needs one, bytes_per_step only reads its byte counts.
_UNIT_CHIP = Chip("bytes only", bf16_tflops=1.0, int8_tops=None, memory_gb=None, memory_gbps=1.0)


def _bits(name: str, nbytes: float) -> int:
    bits = nbytes * 8
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{name}={nbytes!r} bytes per element is not supported; use one of "
            f"{[b / 8 for b in SUPPORTED_BITS]} (int4, int8, bf16, float32)."
        )
    return int(bits)


def bytes_per_step(
    config: GPTConfig,
    batch: int,
    context: int,
    phase: str,
    weight_bytes: float = 4,
    kv_bytes: float = 4,
    activation_bytes: float = 4,
) -> StepBytes:
    """Bytes one forward moves to/from memory, counted exactly as tinylm.costs.estimate does.

    phase="prefill": `batch` prompts of `context` tokens in one forward (weights read once,
        the prompt's K/V written to the cache, never read back from memory).
    phase="decode": one step, one new token per sequence, attending to `context` keys (its
        own included, as in flops_per_token: position p attends p + 1 keys), so context >= 2.
        Reads every weight again plus the whole cache of every sequence.
    weight_bytes / kv_bytes / activation_bytes: bytes per element (4 for float32, the
        default on a CPU; 2 bf16; 1 int8; 0.5 int4).

    Delegates to `estimate` (so the two can never disagree): its decode step at mean context
    prompt_len + (new_tokens + 1) / 2 is a step at `context` keys for prompt_len = context - 1
    and new_tokens = 1. estimate keeps activations in bf16; they are rescaled here.
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}.")
    check_int("batch", batch, integral=True)
    check_int("context", context, minimum=1 if phase == "prefill" else 2, integral=True)
    if not activation_bytes > 0:
        raise ValueError(f"activation_bytes must be > 0, got {activation_bytes!r}.")
    shape = ModelShape.from_config(config)
    bits = {
        "weight_bits": _bits("weight_bytes", weight_bytes),
        "kv_bits": _bits("kv_bytes", kv_bytes),
    }
    if phase == "prefill":
        cost = estimate(shape, _UNIT_CHIP, batch, context, new_tokens=1, **bits).prefill
    else:
        cost = estimate(shape, _UNIT_CHIP, batch, context - 1, new_tokens=1, **bits).decode
    return StepBytes(
        weights=cost.weight_bytes,
        kv_read=cost.kv_read_bytes,
        kv_write=cost.kv_write_bytes,
        activations=cost.activation_bytes * activation_bytes / ACTIVATION_BYTES,
    )


# ----------------------------------------------------------------------------- memory


def peak_memory(
    fn: Callable[[], Any], device: str | torch.device | None = None, interval_s: float = 5e-4
) -> int | None:
    """Peak extra memory (bytes) while `fn()` runs on `device`, or None where unmeasurable.

    Accelerators: the allocator's own peak (torch.accelerator.max_memory_allocated, torch
    >= 2.8) minus what was allocated before: exact for torch tensors.
    CPU: torch has no peak counter for host memory (and tracemalloc does not see torch's
    allocations), so a thread samples the process's resident set size (psutil) every
    `interval_s`: the growth over the baseline. That is a lower bound (a peak between two
    samples is missed), and memory the allocator kept from earlier calls is reused without
    growing the RSS: trust it for calls that allocate many MB and run for milliseconds.
    """
    dev = pick_device(device)
    if dev.type != "cpu":
        acc = getattr(torch, "accelerator", None)
        if acc is None or not hasattr(acc, "max_memory_allocated"):
            warnings.warn(
                f"no peak-memory counter for {dev} in torch {torch.__version__} (needs "
                "torch.accelerator, torch >= 2.8); returning None.",
                stacklevel=2,
            )
            return None
        synchronize(dev)
        acc.reset_peak_memory_stats(dev)
        before = acc.memory_allocated(dev)
        fn()
        synchronize(dev)
        return max(0, acc.max_memory_allocated(dev) - before)

    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, peak - baseline)


# ----------------------------------------------------------------------------- roofline

#: dtypes measure_roofline knows; "int8" is int8 x int8 -> int32 via torch._int_mm.
ROOFLINE_DTYPES = ("float32", "bfloat16", "float16", "int8")


@dataclass(frozen=True)
class Roofline:
    """This machine's measured peaks: matmul throughput per dtype and memory bandwidth.

    peak_flops: dtype -> FLOP/s (op/s for int8) of a large square matmul (median);
    bandwidth: bytes/s of a large copy (bytes read + written, median);
    chip: the same as a hardware.Chip (`this_machine`), its "bf16" peak being the fastest
        float dtype measured, so tinylm.costs can project onto this machine.
    """

    device: str
    peak_flops: dict[str, float]
    bandwidth: float
    chip: Chip
    matmul_size: int
    copy_bytes: int
    timings: dict[str, Timing] = field(default_factory=dict, repr=False)

    def _peak(self, dtype: str | None) -> float:
        if dtype is None:
            return max(v for k, v in self.peak_flops.items() if k != "int8")
        if dtype not in self.peak_flops:
            raise ValueError(f"{dtype!r} was not measured; measured: {sorted(self.peak_flops)}.")
        return self.peak_flops[dtype]

    def ridge_point(self, dtype: str | None = None) -> float:
        """FLOPs per byte where compute and memory take equal time (default: best float)."""
        return self._peak(dtype) / self.bandwidth

    def attainable(self, intensity: float, dtype: str | None = None) -> float:
        """The roof: the most FLOP/s a kernel of this arithmetic intensity can reach here."""
        return min(self._peak(dtype), self.bandwidth * intensity)

    def as_chip(self, dtype: str) -> Chip:
        """A Chip whose "bf16" peak is this dtype's: for projecting a model run in `dtype`.

        tinylm.costs only knows bf16 and int8 peaks; a float32 model on a CPU runs at the
        float32 peak, so predict it with `estimate(shape, roofline.as_chip("float32"), ...)`.
        """
        return _machine_chip(self._peak(dtype), self.bandwidth, self.peak_flops.get("int8"))

    def summary(self) -> str:
        """A few readable lines: peaks, bandwidth, ridge points."""
        size, mib = self.matmul_size, self.copy_bytes / 2**20
        lines = [f"roofline of {self.device} (matmul {size}x{size}, copy {mib:.0f} MiB)"]
        for dtype, peak in self.peak_flops.items():
            unit = "op/s" if dtype == "int8" else "FLOP/s"
            lines.append(
                f"  {dtype:9s} {peak / 1e9:8.3g} G{unit}, ridge {peak / self.bandwidth:.3g} "
                f"{unit.split('/')[0]}/byte"
            )
        lines.append(f"  memory    {self.bandwidth / 1e9:8.3g} GB/s (copy: read + write)")
        return "\n".join(lines)


def _machine_chip(flops: float, bandwidth: float, int8_ops: float | None) -> Chip:
    memory_gb = None
    try:
        memory_gb = psutil.virtual_memory().total / 1e9
    except ImportError:  # psutil is in requirements.txt, but this is only a nicety
        pass
    return this_machine(
        flops / 1e12,
        bandwidth / 1e9,
        memory_gb,
        int8_tops=None if int8_ops is None else int8_ops / 1e12,
    )


def _matmul_fn(dtype: str, n: int, device: torch.device) -> Callable[[], Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    if dtype == "int8":
        a = torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8).to(device)
        b = torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8).to(device)
        torch._int_mm(a, b)  # raises where this device / build has no int8 matmul
        return lambda: torch._int_mm(a, b)
    tdtype = getattr(torch, dtype)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=tdtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=tdtype)
    return lambda: torch.mm(a, b)


def measure_roofline(
    device: str | torch.device | None = None,
    dtypes: Sequence[str] = ("float32", "bfloat16", "int8"),
    size: int | None = None,
    copy_bytes: int | None = None,
    repeats: int = 3,
) -> Roofline:
    """Measure peak matmul throughput per dtype and memory bandwidth; return a Roofline.

    size: side of the square matmuls (2 * size^3 FLOPs each); default 1024 on a CPU (a few
    seconds on 2 cores for the default dtypes), 8192 on an accelerator. copy_bytes: size of
    the copied buffer, default 64 MiB on a CPU (well past its caches, so this is DRAM
    bandwidth) and 1 GiB on an accelerator. A dtype this device cannot multiply (int8 without
    torch._int_mm support) is skipped with a warning.

    These are *achievable* peaks (what torch's own kernels reach), below the datasheet peaks
    that tinylm.hardware lists for datacenter chips; a busy machine measures lower.
    """
    dev = pick_device(device)
    on_cpu = dev.type == "cpu"
    size = (1024 if on_cpu else 8192) if size is None else size
    copy_bytes = (64 if on_cpu else 1024) * 2**20 if copy_bytes is None else copy_bytes
    check_int("size", size, minimum=16, integral=True)  # torch._int_mm needs more than 16 rows
    check_int("copy_bytes", copy_bytes, minimum=4, integral=True)
    unknown = [d for d in dtypes if d not in ROOFLINE_DTYPES]
    if unknown or not any(d != "int8" for d in dtypes):
        raise ValueError(
            f"dtypes {list(dtypes)}: use some of {ROOFLINE_DTYPES}, at least one float type."
        )

    peaks: dict[str, float] = {}
    timings: dict[str, Timing] = {}
    for dtype in dtypes:
        try:
            fn = _matmul_fn(dtype, size, dev)
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(f"skipping {dtype} matmul on {dev}: {err}", stacklevel=2)
            continue
        timings[dtype] = time_fn(fn, repeats=repeats, warmup=1, device=dev)
        peaks[dtype] = 2 * size**3 / timings[dtype].median

    # Copy: every byte is read once and written once. Filled (not torch.empty) so that the
    # pages really exist before the clock starts.
    n_copy = copy_bytes // 4
    src = torch.ones(n_copy, dtype=torch.float32, device=dev)
    dst = torch.zeros_like(src)
    timings["copy"] = time_fn(lambda: dst.copy_(src), repeats=max(repeats, 5), device=dev)
    bandwidth = 2 * n_copy * 4 / timings["copy"].median

    best = max(v for k, v in peaks.items() if k != "int8")
    return Roofline(
        device=describe_device(dev),
        peak_flops=peaks,
        bandwidth=bandwidth,
        chip=_machine_chip(best, bandwidth, peaks.get("int8")),
        matmul_size=size,
        copy_bytes=n_copy * 4,
        timings=timings,
    )


@dataclass(frozen=True)
class RooflinePoint:
    """One measured kernel or phase: its FLOPs, the bytes it moves and the time it took."""

    label: str
    flops: float
    bytes: float
    seconds: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes

    @property
    def achieved_flops(self) -> float:
        """FLOP/s actually reached."""
        return self.flops / self.seconds

    def efficiency(self, roofline: Roofline, dtype: str | None = None) -> float:
        """Achieved FLOP/s as a fraction of the roof at this intensity."""
        return self.achieved_flops / roofline.attainable(self.intensity, dtype)


def _element_bytes(model: Any) -> float:
    """Bytes per weight of a torch model (its float parameters' dtype), 4 for ports."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.element_size()
    return 4


def generation_points(
    model: Any,
    record: GenerationRecord,
    weight_bytes: float | None = None,
    kv_bytes: float | None = None,
    seed: int = 0,
) -> list[RooflinePoint]:
    """The prefill and the mean decode step of a `time_generation` record, as roofline points.

    FLOPs: counted by torch (`count_flops`) for torch models, over the prefill and over all
    the record's decode steps (mean per step); `flops_per_token` for ports. Bytes:
    `bytes_per_step` (decode: the mean over the steps' contexts), with weight and KV element
    sizes from the model's dtype unless given (pass weight_bytes=1 for an int8 model).
    Seconds: the record's medians (TTFT includes picking the first token).
    """
    config = _model_config(model)
    B, T, n = record.batch, record.context, record.new_tokens
    wb = _element_bytes(model) if weight_bytes is None else weight_bytes
    kb = wb if kv_bytes is None else kv_bytes
    if isinstance(model, torch.nn.Module):
        ids = _random_prompts(config.vocab_size, B, T, seed).to(next(model.parameters()).device)
        prefill_flops = count_flops(model, ids)
        with torch.no_grad():
            cache = model.new_cache(B, T + n)
            token = model(ids, cache=cache)[:, -1:].argmax(-1)
            with flop_counter() as counter:
                for _ in range(n):
                    token = model(token, cache=cache)[:, -1:].argmax(-1)
        decode_flops = counter.get_total_flops() / n
    else:
        prefill_flops = flops_per_token(config, T) * B * T
        decode_flops = sum(flops_per_token(config, T + i) * B for i in range(1, n + 1)) / n
    sizes = {"weight_bytes": wb, "kv_bytes": kb, "activation_bytes": 4}
    prefill_bytes = bytes_per_step(config, B, T, "prefill", **sizes).total
    decode_bytes = statistics.fmean(
        bytes_per_step(config, B, T + i, "decode", **sizes).total for i in range(1, n + 1)
    )
    return [
        RooflinePoint(f"prefill B={B} T={T}", prefill_flops, prefill_bytes, record.ttft_s),
        RooflinePoint(f"decode B={B} T={T}", decode_flops, decode_bytes, record.tpot_s),
    ]


def plot_roofline(
    roofline: Roofline,
    points: Sequence[RooflinePoint] = (),
    ax: Any = None,
    title: str | None = None,
) -> Figure:
    """Log-log roofline of this machine (one roof per measured dtype) with measured points.

    x: arithmetic intensity (FLOPs per byte), y: FLOP/s. Under the slanted part a phase is
    memory-bound, under the flat part compute-bound; the gap between a point and the roof
    above it is what the implementation leaves on the table (overheads, small matmuls).
    """
    import matplotlib.pyplot as plt  # lazy: pyplot is heavy, and only plotting needs it

    if ax is None:
        _, ax = plt.subplots()
    ridges = [roofline.ridge_point(d) for d in roofline.peak_flops]
    xs = [p.intensity for p in points] + ridges
    lo, hi = min(xs) / 10, max(xs) * 10
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    colors = [c for c in PALETTE if c != "#F0E442"]  # yellow is hard to see on white
    for i, (dtype, peak) in enumerate(roofline.peak_flops.items()):
        ax.plot(
            grid,
            [roofline.attainable(x, dtype) for x in grid],
            color=colors[i % len(colors)],
            label=f"{dtype} roof: {si(peak, 'op/s' if dtype == 'int8' else 'FLOP/s')}",
        )
    for j, p in enumerate(points):
        color = colors[(len(roofline.peak_flops) + j) % len(colors)]
        ax.plot([p.intensity], [p.achieved_flops], "o", color=color, label=p.label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title or f"roofline: {si(roofline.bandwidth, 'B/s')} memory bandwidth")
    ax.legend(fontsize=8)
    return ax.figure


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Comparison:
    """Measured prefill/decode time against tinylm.costs' roofline prediction for one cell."""

    batch: int
    context: int
    predicted_prefill_s: float
    measured_prefill_s: float
    predicted_decode_s: float
    measured_decode_s: float

    @property
    def prefill_ratio(self) -> float:
        """measured / predicted: 1 would be the roofline bound; real code is above it."""
        return self.measured_prefill_s / self.predicted_prefill_s

    @property
    def decode_ratio(self) -> float:
        return self.measured_decode_s / self.predicted_decode_s

    def as_row(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "context": self.context,
            "prefill_pred_ms": self.predicted_prefill_s * 1e3,
            "prefill_meas_ms": self.measured_prefill_s * 1e3,
            "prefill_x": self.prefill_ratio,
            "decode_pred_ms": self.predicted_decode_s * 1e3,
            "decode_meas_ms": self.measured_decode_s * 1e3,
            "decode_x": self.decode_ratio,
        }


def predicted_vs_measured(
    records: Iterable[GenerationRecord],
    config: GPTConfig,
    chip: Chip,
    weight_bits: int = 32,
    kv_bits: int = 32,
) -> Table:
    """tinylm.costs.estimate on `chip` next to the measured times of each record.

    Predicted: prefill_seconds and decode_seconds_per_token of `estimate(shape, chip, batch,
    prompt_len=context, new_tokens=record.new_tokens)`, whose decode is a step at the mean
    context, the same steps the record timed. For a float32 model on this machine use
    `roofline.as_chip("float32")` and the default 32-bit weights and KV. The ratio
    measured / predicted says how far the code is from the bound; for tiny models it is
    large, because per-op overhead (not FLOPs or bytes) dominates.
    """
    shape = ModelShape.from_config(config)
    table = Table()
    for r in records:
        est = estimate(shape, chip, r.batch, r.context, r.new_tokens, weight_bits, kv_bits)
        table.append(
            Comparison(
                r.batch,
                r.context,
                est.prefill_seconds,
                r.ttft_s,
                est.decode_seconds_per_token,
                r.tpot_s,
            )
        )
    return table
