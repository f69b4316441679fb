"""Benchmark: this machine's roofline, where the default model sits on it, and costs vs reality.

Run by hand (not collected by pytest):

    .venv/bin/python tests/benchmarks/bench_profile.py [--threads N] [--device cpu] [--quick]
                                                       [--plot roofline.png]

Prints, for the "default" model of tinylm.recipes.RECIPES (its checkpoint if there is one, else
random weights of the same shape: speed does not depend on what the weights learned; this
script never trains):

1. this machine's roofline (tinylm.profile.measure_roofline): matmul peak per dtype, copy
   bandwidth, ridge points;
2. measured prefill / decode latency and throughput over a batch x context grid
   (time_generation, i.e. tinylm.generate's prefill and decode_step);
3. each cell's prefill and mean decode step on the roofline: arithmetic intensity (counted
   FLOPs / tinylm.costs bytes), achieved FLOP/s and the fraction of the roof reached;
4. tinylm.costs.estimate on the measured "this machine" chip (float32 peak, 32-bit weights and
   KV, as the model runs) against the measured times: the ratio measured / predicted is how
   far the code is from the roofline bound;
5. the top operators of a prefill and of a decode step (torch.profiler).

On a shared machine, torch's default thread count can make tiny-model ops very slow when
the cores are busy (threads wait for each other at every op): try --threads 1. Figures are
noisy there: trust ratios and orders of magnitude, not digits.
"""

from __future__ import annotations

import argparse

import torch

from tinylm import checkpoint
from tinylm.device import describe_device, pick_device
from tinylm.model import GPT, GPTConfig
from tinylm.paths import checkpoint_dir
from tinylm.profile import (
    format_rows,
    generation_points,
    measure_roofline,
    op_breakdown,
    plot_roofline,
    predicted_vs_measured,
    time_generation,
)
from tinylm.recipes import RECIPES


def default_model(device: torch.device) -> tuple[GPT, str]:
    """The default recipe's trained checkpoint, else a random model of the same shape."""
    path = checkpoint_dir() / "default"
    try:
        model, _, _ = checkpoint.load(path, device=device)
        return model, f"checkpoint {path}"
    except (FileNotFoundError, OSError, ValueError) as err:
        recipe = RECIPES["default"]
        torch.manual_seed(0)
        config = GPTConfig(**{**recipe.model, "vocab_size": recipe.vocab_size})
        return GPT(config).to(device), f"random weights ({type(err).__name__}: no usable {path})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, mps, npu (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smaller grid, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--plot", default=None, help="save the roofline figure to this PNG")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    batches, contexts = ((1, 4), (32,)) if args.quick else ((1, 8), (32, 96))
    new_tokens = 8 if args.quick else 16
    repeats = args.repeats or (3 if args.quick else 5)
    print(describe_device(device))
    if device.type == "cpu" and torch.get_num_threads() > 1:
        print("(on a busy shared machine, several threads per op can stall: try --threads 1)")

    roof = measure_roofline(device, repeats=repeats)
    print(roof.summary())

    model, source = default_model(device)
    model.eval()
    c = model.config
    print(
        f"\nmodel: {c.n_layer} layers x {c.n_embd} wide, vocab {c.vocab_size}, "
        f"{sum(p.numel() for p in model.parameters()):,} params ({source})"
    )
    table = time_generation(model, batches, contexts, new_tokens=new_tokens, repeats=repeats)
    print(f"\nmeasured ({new_tokens} decode steps per cell, medians of {repeats}):")
    print(table)

    ridge = roof.ridge_point("float32")
    print(f"\non this machine's roofline (float32 roof, ridge {ridge:.3g} FLOP/byte):")
    rows = []
    for record in table:
        for p in generation_points(model, record):
            bound = "memory" if p.intensity < ridge else "compute"
            rows.append(
                {
                    "phase": p.label,
                    "FLOP/byte": p.intensity,
                    "achieved_GFLOP/s": p.achieved_flops / 1e9,
                    "roof_GFLOP/s": roof.attainable(p.intensity, "float32") / 1e9,
                    "%_of_roof": 100 * p.efficiency(roof, "float32"),
                    "roofline_bound": bound,
                }
            )
    print(format_rows(rows))

    comparison = predicted_vs_measured(table, c, roof.as_chip("float32"))
    print("\ntinylm.costs.estimate on 'this machine' vs measured (x = measured / predicted):")
    print(comparison)
    prefill_x = [r.prefill_ratio for r in comparison]
    decode_x = [r.decode_ratio for r in comparison]
    print(
        f"prefill {min(prefill_x):.3g}x .. {max(prefill_x):.3g}x, decode {min(decode_x):.3g}x "
        f".. {max(decode_x):.3g}x the roofline bound"
    )

    ids = torch.randint(
        0, c.vocab_size, (1, contexts[-1]), generator=torch.Generator().manual_seed(0)
    )
    for phase in ("prefill", "decode"):
        print(f"\ntop operators, {phase} (batch 1, context {contexts[-1]}):")
        print(op_breakdown(model, ids, phase=phase, repeats=repeats, top=8))

    if args.plot:
        points = [p for r in (table[0], table[-1]) for p in generation_points(model, r)]
        plot_roofline(roof, points).savefig(args.plot)
        print(f"\nroofline figure saved to {args.plot}")


if __name__ == "__main__":
    main()
