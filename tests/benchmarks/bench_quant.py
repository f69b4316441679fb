"""Benchmark quantisation of the trained default model: bytes, quality, agreement, speed.

Run by hand (not collected by pytest):

    .venv/bin/python tests/benchmarks/bench_quant.py [--train] [--eval-batches 24] [--repeats 5] [--threads 1]

Model: the "default" recipe's checkpoint (tinylm.recipes.load_or_train). If there is none,
--train trains it now (2-2.5 minutes on 2 free cores); without --train a *random* default-size
model is used and the quality figures are meaningless (the script says so).

Prints, per scheme: model bytes, validation bits per byte (same seeded windows for every
scheme), top-1 agreement with fp32 on those windows, greedy-generation agreement, decode
tokens/s (KV cache, batch 1); then the int8 KV cache, and int8 `_int_mm` against the
dequantise-then-matmul path per layer shape. Timings are medians over --repeats runs
(a shared machine is noisy). Goals from the issue: int8 loses < 1% bpb, int4 per group
< 5%, GPTQ closes >= 1/3 of the RTN gap.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F

from tinylm.data import load_corpus, split_text
from tinylm.generate import generate
from tinylm.model import GPT, GPTConfig, kv_cache_bytes_per_token
from tinylm.paths import checkpoint_dir
from tinylm.quant import QuantLinear
from tinylm.quant_calibrate import calibration_windows
from tinylm.quant_model import (
    int8_kv_bytes_per_token,
    model_nbytes,
    new_int8_cache,
    quantize_model,
    set_compute,
    set_kv_cache,
)
from tinylm.recipes import RECIPES, load_or_train

SCHEMES = [
    "int8",
    "int8-tensor",
    "int8-g32",
    "int4-channel",
    "int4-channel-gptq",
    "int4-g128",
    "int4-g128-asym",
    "int4-g128-gptq",
    "int4-g64",
    "int4-g32",
    "int4-g32-asym",
    "int4-g32-gptq",
]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_model(train: bool):
    """(model, tokenizer, trained?) for the default recipe."""
    recipe = RECIPES["default"]
    if (checkpoint_dir() / "default").exists() or train:
        model, tokenizer, _ = load_or_train("default", device="cpu", progress=False)
        return model.eval(), tokenizer, True
    from tinylm.train import _cached_tokenizer

    print("NOTE: no trained 'default' checkpoint (run with --train to make one); using a RANDOM")
    print("      default-size model, so the bpb / agreement figures below mean nothing.")
    corpus = load_corpus(recipe.corpus, seed=recipe.corpus_seed, **recipe.corpus_kwargs)
    tokenizer = _cached_tokenizer(corpus, recipe.vocab_size, recipe.val_fraction)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**recipe.model, "vocab_size": tokenizer.vocab_size}))
    return model.eval(), tokenizer, False


@torch.no_grad()
def evaluate(model, ref_model, windows: torch.Tensor, bytes_per_token: float, cache_fn=None):
    """(bits per byte, top-1 agreement with ref_model, KL(ref || model) in nats per token).

    KL measures how far the quantised model's predictions moved from fp32's; it is far less
    noisy than the bpb difference, where errors that happen to help and hurt cancel.
    """
    nll, kl, count, agree = 0.0, 0.0, 0, 0
    for b in range(0, len(windows), 16):
        rows = windows[b : b + 16]
        x, y = rows[:, :-1], rows[:, 1:]
        cache = None if cache_fn is None else cache_fn(model, len(x))
        logp = model(x, cache=cache).log_softmax(-1)
        nll += F.nll_loss(logp.reshape(-1, logp.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
        if ref_model is not None:
            ref = ref_model(x).log_softmax(-1)
            agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            kl += (ref.exp() * (ref - logp)).sum().item()
    return nll / count / math.log(2) / bytes_per_token, agree / count, kl / count


def greedy_agreement(model, ref_outputs, prompts, n_new: int) -> float:
    """Fraction of greedy tokens equal to fp32's, position by position."""
    same = 0
    for prompt, ref in zip(prompts, ref_outputs, strict=True):
        out = generate(model, prompt, n_new, temperature=0)
        same += sum(a == b for a, b in zip(out, ref, strict=True))
    return same / (len(prompts) * n_new)


def decode_tokens_per_s(model, prompt, n_new: int, repeats: int) -> float:
    generate(model, prompt, 4, temperature=0)  # warm-up
    return n_new / median_time(lambda: generate(model, prompt, n_new, temperature=0), repeats)


def matmul_speed(repeats: int) -> None:
    """int8 _int_mm path vs dequantise-then-matmul vs fp32 F.linear, per layer shape."""
    print("\n## int8 matmul: QuantLinear(compute='int8') vs compute='dequant' vs fp32 nn.Linear")
    print(f"{'in->out':>10} {'M':>5} {'fp32 us':>9} {'dequant us':>11} {'int8 us':>9} "
          f"{'int8/dequant':>13} {'int8/fp32':>10}")  # fmt: skip
    torch.manual_seed(0)
    for k, n in [(128, 128), (128, 344), (344, 128), (512, 2048)]:
        linear = torch.nn.Linear(k, n, bias=False)
        deq = QuantLinear.from_linear(linear, 8, compute="dequant")
        i8 = QuantLinear.from_linear(linear, 8, compute="int8")
        for M in (1, 16, 256, 2048):
            x = torch.randn(M, k)
            inner = max(1, 2000 // M)

            def run(f, inner=inner, x=x):
                return lambda: [f(x) for _ in range(inner)]

            with torch.no_grad():
                t = [median_time(run(f), repeats) / inner * 1e6 for f in (linear, deq, i8)]
            print(f"{f'{k}->{n}':>10} {M:>5} {t[0]:>9.1f} {t[1]:>11.1f} {t[2]:>9.1f} "
                  f"{t[1] / t[2]:>12.2f}x {t[0] / t[2]:>9.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", action="store_true", help="train the default model if needed")
    parser.add_argument("--eval-batches", type=int, default=24, help="batches of 16 windows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-new", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer, trained = load_model(args.train)
    recipe = RECIPES["default"]
    ctx = model.config.context_length
    corpus = load_corpus(recipe.corpus, seed=recipe.corpus_seed, **recipe.corpus_kwargs)
    train_text, val_text = split_text(corpus.text, recipe.val_fraction)
    val_text = val_text[: 16 * args.eval_batches * (ctx + 1) * 6]  # enough for the windows
    val = torch.tensor(tokenizer.encode(val_text))
    bytes_per_token = len(val_text.encode("utf-8")) / len(val)
    g = torch.Generator().manual_seed(0)
    n_windows = min(16 * args.eval_batches, len(val) // (ctx + 1))
    starts = torch.randperm(len(val) - ctx - 1, generator=g)[:n_windows]
    windows = val[starts[:, None] + torch.arange(ctx + 1)]
    cal_tokens = torch.tensor(tokenizer.encode(train_text[:200_000]))
    calibration = calibration_windows(cal_tokens, 32, ctx, seed=0)
    prompts = [val[s : s + 16].tolist() for s in starts[:6].tolist()]

    print(f"# tinylm quantisation benchmark  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")  # fmt: skip
    print(f"model: {'trained default checkpoint' if trained else 'RANDOM default-size model'}, "
          f"{sum(p.numel() for p in model.parameters()):,} params, context {ctx}; "
          f"eval: {len(windows)} val windows ({windows[:, 1:].numel():,} tokens, "
          f"{bytes_per_token:.2f} bytes/token); calibration: 32 train windows of {ctx}")  # fmt: skip
    print(
        "KL = KL(fp32 || quantised) in millinats per token; greedy = fraction of greedy tokens "
        f"equal to fp32's ({len(prompts)} prompts x {args.n_new}); decode = batch 1, KV cache"
    )

    fp_bytes = model_nbytes(model)
    fp_bpb, _, _ = evaluate(model, None, windows, bytes_per_token)
    ref_out = [generate(model, p, args.n_new, temperature=0) for p in prompts]
    fp_tps = decode_tokens_per_s(model, prompts[0], 64, args.repeats)
    header = (f"{'scheme':<18} {'bytes':>9} {'x fp32':>7} {'val bpb':>8} {'Δbpb %':>7} "
              f"{'KL':>7} {'top1':>6} {'greedy':>7} {'decode tok/s':>12} {'quant s':>8}")  # fmt: skip
    print("\n" + header)
    print(f"{'fp32':<18} {fp_bytes:>9,} {1:>7.3f} {fp_bpb:>8.4f} {0:>7.2f} {0:>7.3f} {1:>6.3f} "
          f"{1:>7.3f} {fp_tps:>12.0f}")  # fmt: skip
    bpb, kl = {}, {}
    for name in SCHEMES:
        t0 = time.perf_counter()
        q = quantize_model(model, name, calibration=calibration)
        t_quant = time.perf_counter() - t0
        bpb[name], top1, kl[name] = evaluate(q, model, windows, bytes_per_token)
        greedy = greedy_agreement(q, ref_out, prompts, args.n_new)
        tps = decode_tokens_per_s(q, prompts[0], 64, args.repeats)
        print(f"{name:<18} {model_nbytes(q):>9,} {model_nbytes(q) / fp_bytes:>7.3f} "
              f"{bpb[name]:>8.4f} {100 * (bpb[name] / fp_bpb - 1):>7.2f} {1e3 * kl[name]:>7.3f} "
              f"{top1:>6.3f} {greedy:>7.3f} {tps:>12.0f} {t_quant:>8.2f}")  # fmt: skip
        if name == "int8":
            set_compute(q, "int8")
            b8, top1_8, kl8 = evaluate(q, model, windows, bytes_per_token)
            greedy8 = greedy_agreement(q, ref_out, prompts, args.n_new)
            tps8 = decode_tokens_per_s(q, prompts[0], 64, args.repeats)
            print(f"{'  int8 (_int_mm)':<18} {'':>9} {'':>7} {b8:>8.4f} "
                  f"{100 * (b8 / fp_bpb - 1):>7.2f} {1e3 * kl8:>7.3f} {top1_8:>6.3f} "
                  f"{greedy8:>7.3f} {tps8:>12.0f}")  # fmt: skip

    print("\n## goals (issue: int8 < 1% bpb, int4 per group < 5%, GPTQ closes >= 1/3 of the gap)")
    print(f"int8 loses {100 * (bpb['int8'] / fp_bpb - 1):.2f}% bpb")
    for gs in (32, 64, 128):
        print(f"int4-g{gs} loses {100 * (bpb[f'int4-g{gs}'] / fp_bpb - 1):.2f}% bpb")
    for rtn in ("int4-g32", "int4-g128", "int4-channel"):
        gap = bpb[rtn] - fp_bpb
        closed = (bpb[rtn] - bpb[f"{rtn}-gptq"]) / gap if gap > 0 else float("nan")
        kl_closed = 1 - kl[f"{rtn}-gptq"] / kl[rtn]
        print(f"{rtn}-gptq closes {100 * closed:.0f}% of the RTN bpb gap, "
              f"{100 * kl_closed:.0f}% of its KL")  # fmt: skip

    print("\n## int8 KV cache (fp32 weights)")
    c = model.config
    fp_kv, i8_kv = kv_cache_bytes_per_token(c), int8_kv_bytes_per_token(c)
    print(f"bytes per token: fp32 {fp_kv}, int8 {i8_kv} ({fp_kv / i8_kv:.2f}x smaller)")
    bpb_kv, top1_kv, kl_kv = evaluate(model, model, windows, bytes_per_token, new_int8_cache)
    print(f"val bpb with the int8 cache {bpb_kv:.4f} ({100 * (bpb_kv / fp_bpb - 1):+.3f}%), "
          f"KL {1e3 * kl_kv:.4f} mnats/token, top-1 agreement {top1_kv:.4f}")  # fmt: skip
    kv8 = set_kv_cache(copy.deepcopy(model), "int8")
    print(
        f"decode tok/s: fp32 cache {fp_tps:.0f}, "
        f"int8 cache {decode_tokens_per_s(kv8, prompts[0], 64, args.repeats):.0f}"
    )

    matmul_speed(args.repeats)


if __name__ == "__main__":
    main()
