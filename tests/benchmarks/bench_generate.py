"""Benchmark generation: prefill, decode with and without the KV cache, and per-token overhead.

Run by hand (not collected by pytest):

    .venv/bin/python tests/benchmarks/bench_generate.py [--device cpu] [--threads N] [--quick]

For the default GPTConfig with random weights (speed does not depend on what the weights
learned) and each attention / MLP variant, prints medians over repeats of:

- prefill tokens/s: one forward over a whole prompt of 64 and 256 tokens;
- decode tokens/s at batch 1 with the cache (one `decode_step` at position 64 or 256) and
  without it (one full forward over 64 or 256 tokens: what every step of `use_cache=False`
  costs), and their ratio;
- stream: time to first token and median time per token of `stream()` (greedy, prompt 64,
  64 new tokens): the loop a user sees, sampling included;
- for one cached decode step at position 64: its time against the time of the same matrix multiplications
  run alone (shapes recorded with torch.profiler, then replayed back to back) and against
  the same plus attention. The ratio says how far a token's time is above the matmul floor;
  the gap is per-op dispatch overhead (norms, RoPE, views, cache writes, masks ...).

On a shared CPU the figures are noisy: trust ratios and orders of magnitude, not digits.
There, `--threads 1 --clock cpu` (CPU time instead of wall time) is much steadier.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tinylm.device import describe_device, pick_device
from tinylm.generate import decode_step, prefill, stream
from tinylm.model import GPT, GPTConfig

VARIANTS: dict[str, dict] = {
    "mha": {},
    "gqa": {"attention": "gqa", "n_kv_head": 2},
    "mqa": {"attention": "mqa"},
    "mla": {"attention": "mla"},
    "mla-absorbed": {"attention": "mla"},
    "moe": {"mlp": "moe"},
}
CONTEXTS = (64, 256)
clock = time.perf_counter  # --clock cpu swaps in time.process_time


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time measures the work itself."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def median_seconds(
    fns: list[Callable[[], object]], device: torch.device, calls: int
) -> list[float]:
    """Median time of one call of each fn, over `calls` individually timed calls of each.

    Calls are timed one by one and the functions take turns, so that on a shared machine a
    descheduled moment hits one sample (which the median ignores) and a slow phase hits all
    of them alike (which keeps their ratios honest).
    """
    for fn in fns:
        fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for fn, ts in zip(fns, times, strict=True):
            t0 = clock()
            fn()
            sync(device)
            ts.append(clock() - t0)
    return [statistics.median(ts) for ts in times]


def build(variant: str, device: torch.device) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**VARIANTS[variant])).to(device).eval()
    if variant == "mla-absorbed":
        model.set_mla_absorb(True)
    return model


def prompt(model: GPT, length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(length)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(device)


def cached_step(model: GPT, context: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """A closure running one cached decode step at position context - 1, again and again.

    Rewinding cache.pos makes each call overwrite the same slot, so every repeat does
    exactly the work of the step at this context.
    """
    _, cache = prefill(model, prompt(model, context - 1, device), max_len=context)
    token = torch.zeros(1, dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        cache.pos = context - 1
        return decode_step(model, token, cache)

    return step


def speeds(model: GPT, device: torch.device, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in CONTEXTS:
        ids = prompt(model, c, device)

        def full(ids: torch.Tensor = ids) -> torch.Tensor:
            with torch.inference_mode():
                return model(ids)[:, -1].argmax(-1)

        pre, cached, nocache = median_seconds(
            [lambda ids=ids: prefill(model, ids), cached_step(model, c, device), full],
            device,
            3 * repeats,
        )
        out[f"prefill@{c}"] = c / pre  # prompt tokens per second
        out[f"cached@{c}"], out[f"nocache@{c}"] = 1 / cached, 1 / nocache  # new tokens/s
    ids = prompt(model, 64, device)[0]
    ttft, per_token = [], []
    for _ in range(max(3, repeats // 3)):
        t0 = clock()
        stamps = [clock() for _ in stream(model, ids, 64, temperature=0)]
        ttft.append(stamps[0] - t0)
        per_token.append(statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)))
    out["ttft_ms"] = 1e3 * statistics.median(ttft)
    out["stream_ms"] = 1e3 * statistics.median(per_token)
    return out


# ----------------------------------------------------------------------------- matmul floor

MATMULS = {"aten::linear", "aten::matmul", "aten::bmm", "aten::mm", "aten::addmm"}
ATTENTION = {"aten::scaled_dot_product_attention"}


def recorded_ops(fn: Callable[[], object]) -> tuple[list, int]:
    """(top-level matmul / attention events of one call of fn, number of top-level aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    wanted, n_ops = [], 0
    for ev in prof.events():
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            nested |= parent.name.startswith("aten::")
            parent = parent.cpu_parent
        if nested or not ev.name.startswith("aten::"):
            continue
        n_ops += 1
        if ev.name in MATMULS | ATTENTION:
            wanted.append(ev)
    return wanted, n_ops


def replay(events: list, device: torch.device) -> list[Callable[[], torch.Tensor]]:
    """Closures running each recorded op on fresh tensors of the recorded shapes."""
    calls = []
    for ev in events:
        shapes = [s for s in ev.input_shapes if s]
        a, b = (torch.randn(s, device=device) for s in shapes[:2])
        if ev.name == "aten::linear":
            calls.append(lambda a=a, b=b: F.linear(a, b))
        elif ev.name in ATTENTION:
            v = torch.randn(shapes[2], device=device)
            gqa = a.shape[-3] != b.shape[-3]
            calls.append(
                lambda a=a, b=b, v=v, g=gqa: F.scaled_dot_product_attention(a, b, v, enable_gqa=g)
            )
        else:
            calls.append(lambda a=a, b=b: a @ b)
    return calls


def overhead(model: GPT, device: torch.device, repeats: int, context: int = 64) -> dict[str, float]:
    step = cached_step(model, context, device)
    events, n_ops = recorded_ops(step)
    calls = replay(events, device)
    is_mm = [ev.name in MATMULS for ev in events]

    def run(which: list[bool]) -> None:
        with torch.inference_mode():
            for call, keep in zip(calls, which, strict=True):
                if keep:
                    call()

    step_s, mm_s, all_s = median_seconds(
        [step, lambda: run(is_mm), lambda: run([True] * len(calls))], device, 5 * repeats
    )
    return {
        "step_ms": 1e3 * step_s,
        "matmul_ms": 1e3 * mm_s,
        "n_matmul": sum(is_mm),
        "with_attn_ms": 1e3 * all_s,
        "ops": n_ops,
        "ratio_mm": step_s / mm_s,
        "ratio_all": step_s / all_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, mps, npu (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time, robust on a busy shared machine (CPU device only; "
        "use with --threads 1, since waiting OpenMP threads also burn CPU time)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error("--clock cpu only measures CPU work; use the wall clock on a GPU")
        global clock
        clock = time.process_time
    repeats = 5 if args.quick else 20
    variants = args.variants.split(",")
    print(f"device: {describe_device(device)}; {args.clock} clock; medians of {3 * repeats}-"
          f"{5 * repeats} timed calls")  # fmt: skip
    c = GPTConfig()
    print(f"default GPTConfig: {c.n_layer} layers, n_embd {c.n_embd}, {c.n_head} heads, "
          f"vocab {c.vocab_size}, context {c.context_length}; random weights, batch 1\n")  # fmt: skip

    head = (f"{'variant':<13}{'prefill tok/s':>16}{'decode tok/s cached':>22}"
            f"{'no cache':>16}{'cache speed-up':>17}{'stream':>17}")  # fmt: skip
    sub = (f"{'':<13}{'@64':>8}{'@256':>8}{'@64':>11}{'@256':>11}{'@64':>8}{'@256':>8}"
           f"{'@64':>8}{'@256':>9}{'TTFT ms':>9}{'ms/tok':>8}")  # fmt: skip
    print(head, sub, "-" * len(sub), sep="\n")
    rows = {}
    for name in variants:
        s = rows[name] = speeds(build(name, device), device, repeats)
        print(
            f"{name:<13}{s['prefill@64']:>8.0f}{s['prefill@256']:>8.0f}"
            f"{s['cached@64']:>11.0f}{s['cached@256']:>11.0f}"
            f"{s['nocache@64']:>8.0f}{s['nocache@256']:>8.0f}"
            f"{s['cached@64'] / s['nocache@64']:>7.1f}x{s['cached@256'] / s['nocache@256']:>8.1f}x"
            f"{s['ttft_ms']:>9.2f}{s['stream_ms']:>8.2f}",
            flush=True,
        )

    print("\nCached decode step at position 64, batch 1: step time vs its matmuls replayed alone")
    head = (f"{'variant':<13}{'step ms':>9}{'matmul ms':>11}{'(#)':>5}{'+attn ms':>10}"
            f"{'aten ops':>10}{'step/matmul':>13}{'step/(mm+attn)':>16}")  # fmt: skip
    print(head, "-" * len(head), sep="\n")
    for name in variants:
        o = overhead(build(name, device), device, repeats)
        print(
            f"{name:<13}{o['step_ms']:>9.3f}{o['matmul_ms']:>11.3f}{o['n_matmul']:>5}"
            f"{o['with_attn_ms']:>10.3f}{o['ops']:>10}{o['ratio_mm']:>12.1f}x"
            f"{o['ratio_all']:>15.1f}x",
            flush=True,
        )
    print(
        "\nNotes: without a cache every step recomputes the whole context, so its cost grows "
        "with the context; a cached step stays nearly flat. Medians on a shared machine vary "
        "by tens of percent between runs."
    )
    if device.type == "cpu" and torch.get_num_threads() > 1:
        print(
            "On a busy machine, ops that use several threads wait for descheduled ones (a small "
            "decode step can slow down 10-100x): compare with --threads 1."
        )


if __name__ == "__main__":
    main()
