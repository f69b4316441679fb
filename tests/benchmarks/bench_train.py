"""Benchmark: training throughput of the default recipe's model on this machine.

Run by hand: `python tests/benchmarks/bench_train.py [--recipe default] [--repeats 5]`.
Prints time per step and tokens per second (median over repeats, plus the fastest step:
on a busy machine the fastest step is the best estimate of what an idle one would do),
and the wall time the recipe's full run would take at those speeds.

The batches are random token ids: speed does not depend on what the tokens say, and this
skips building the corpus and tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from tinylm.data import TokenSplits
from tinylm.device import describe_device, pick_device, synchronize
from tinylm.model import GPT, GPTConfig, flops_per_token
from tinylm.recipes import RECIPES
from tinylm.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per repeat")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    recipe = RECIPES[args.recipe]
    device = pick_device(args.device)
    config = GPTConfig(**{**recipe.model, "vocab_size": recipe.vocab_size})
    tc = recipe.train
    block = tc.block_size or config.context_length
    tokens_per_step = tc.batch_size * block
    g = torch.Generator().manual_seed(0)
    n = 200_000
    data = TokenSplits(
        train=torch.randint(0, config.vocab_size, (n,), generator=g),
        val=torch.randint(0, config.vocab_size, (n // 10,), generator=g),
        train_bytes=4 * n,
        val_bytes=4 * n // 10,
    )
    print(f"device: {describe_device(device)}; torch threads: {torch.get_num_threads()}")
    print(
        f"recipe {args.recipe!r}: {sum(p.numel() for p in GPT(config).parameters()) / 1e6:.2f} M params, "
        f"batch {tc.batch_size} x {block} tokens, {tc.steps} steps"
    )

    warmup = 3
    medians, fastest = [], []
    for r in range(args.repeats):
        torch.manual_seed(0)
        model = GPT(config)
        times: list[float] = []
        last = [time.perf_counter()]

        def clock(record: dict, times=times, last=last) -> None:
            synchronize(device)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        # Evaluation only at the (never reached) last step; stop_at ends the run before it.
        steps = warmup + args.steps + 1
        run = dataclasses.replace(
            tc, steps=steps, warmup_steps=1, eval_interval=steps, device=str(device)
        )
        train(model, data, run, callback=clock, progress=False, stop_at=warmup + args.steps)
        timed = times[warmup:]
        medians.append(statistics.median(timed))
        fastest.append(min(timed))
        print(
            f"  repeat {r + 1}: median {medians[-1] * 1e3:7.1f} ms/step, fastest {fastest[-1] * 1e3:7.1f} ms/step"
        )

    step_s, best_s = statistics.median(medians), min(fastest)
    flops = 3 * flops_per_token(config, block)  # forward + backward ~ 3x the forward
    print(f"time per step : {step_s * 1e3:.1f} ms (median), {best_s * 1e3:.1f} ms (fastest)")
    print(
        f"tokens/s      : {tokens_per_step / step_s:,.0f} (median), {tokens_per_step / best_s:,.0f} (fastest)"
    )
    print(
        f"achieved      : {flops * tokens_per_step / step_s / 1e9:.1f} GFLOP/s (training, median)"
    )
    print(
        f"full recipe   : {tc.steps} steps ~ {tc.steps * step_s:.0f} s at the median, "
        f"{tc.steps * best_s:.0f} s at the fastest step (evaluation not included)"
    )


if __name__ == "__main__":
    main()
