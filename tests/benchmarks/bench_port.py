"""Benchmark decode speed of the ports: PyTorch eager vs ONNX Runtime vs the NumPy runtime.

Run by hand (not collected by pytest):

    .venv/bin/python tests/benchmarks/bench_port.py [--batch 1 8] [--new-tokens 64]
        [--prompt-len 32] [--repeats 5] [--threads 2] [--checkpoint DIR] [--legacy-export]

Model: the workbook's default GPTConfig, from --checkpoint (or data/checkpoints/default if it
exists), else seeded random weights (speed does not depend on the values). Every runtime runs
the same greedy loop: prefill the prompt, then time `--new-tokens` one-token decode steps
through its KV cache. Decode tokens/s = batch * steps / time; medians of --repeats runs after
a warm-up, because a shared machine is noisy. All runtimes get the same thread count.

Also checks parity on random-token prompts (float32 ports: relative L2 error of the logits
< 1e-5, i.e. tinylm.port.parity.FP32_RULE, with the max abs error shown too; same greedy
tokens) and prints the goals: ORT decodes faster than torch eager; NumPy within 2x of torch.
On a trained model the logits of random tokens reach ~20, where float32 rounding alone gives
max abs errors ~1e-5: that is why the rule is relative.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--legacy-export", action="store_true", help="TorchScript exporter (faster)")
    return p.parse_args()


ARGS = parse_args()
if ARGS.threads is not None:
    # Must be set before NumPy loads OpenBLAS (it reads the variable once, at import).
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from tinylm import checkpoint  # noqa: E402
from tinylm.model import GPT, GPTConfig  # noqa: E402
from tinylm.paths import data_dir  # noqa: E402
from tinylm.port.numpy_runtime import NumpyLM  # noqa: E402
from tinylm.port.onnx import OnnxLM  # noqa: E402
from tinylm.port.onnx_export import export_onnx  # noqa: E402
from tinylm.port.parity import FP32_RULE, relative_l2_error  # noqa: E402


def load_model() -> tuple[GPT, Path | None]:
    path = ARGS.checkpoint or data_dir() / "checkpoints" / "default"
    if (path / "manifest.json").is_file():
        model, _, _ = checkpoint.load(path, device="cpu")
        return model.eval(), path
    if ARGS.checkpoint is not None:
        sys.exit(f"no checkpoint at {ARGS.checkpoint}")
    torch.manual_seed(0)
    return GPT(GPTConfig()).eval(), None


# ----------------------------------------------------------------------------- decode loops


def torch_decode(model: GPT, prompt: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """Seconds for `steps` cached greedy decode steps after a prefill, and the tokens."""
    B, T = prompt.shape
    with torch.inference_mode():
        cache = model.new_cache(B, T + steps)
        token = model(torch.as_tensor(prompt), cache=cache)[:, -1].argmax(-1)
        out = [token]
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
            out.append(token)
        elapsed = time.perf_counter() - start
    return elapsed, torch.stack(out, 1).numpy()


def port_decode(lm, prompt: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """The same loop for a tinylm port (NumpyLM / OnnxLM: new_cache + forward)."""
    B, T = prompt.shape
    cache = lm.new_cache(B, T + steps)
    token = lm.forward(prompt, cache)[:, -1].argmax(-1)
    out = [token]
    start = time.perf_counter()
    for _ in range(steps):
        token = lm.forward(token[:, None], cache)[:, -1].argmax(-1)
        out.append(token)
    elapsed = time.perf_counter() - start
    return elapsed, np.stack(out, 1)


def median_rate(run, batch: int, steps: int) -> tuple[float, np.ndarray]:
    """Median decode tokens/s over ARGS.repeats runs (after one warm-up) and the tokens."""
    _, tokens = run()  # warm-up: first-call allocations, ORT's lazy init, caches
    times = []
    for _ in range(ARGS.repeats):
        elapsed, tok = run()
        assert np.array_equal(tok, tokens), "non-deterministic decode"
        times.append(elapsed)
    return batch * steps / statistics.median(times), tokens


def main() -> None:
    threads = ARGS.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model, source = load_model()
    cfg = model.config
    print(
        f"model: {'checkpoint ' + str(source) if source else 'default GPTConfig, random weights'}"
    )
    print(
        f"  {cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads ({cfg.attention}), "
        f"vocab {cfg.vocab_size}; prompt {ARGS.prompt_len} tokens, {ARGS.new_tokens} decode "
        f"steps, median of {ARGS.repeats}; {threads} threads for every runtime"
    )
    print(f"  torch {torch.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        # Multi-threaded ops wait at barriers for threads the OS has descheduled: on a busy
        # machine torch's many small parallel ops suffer most, and the ratios mean little.
        print(
            f"  WARNING: load average {load:.1f} on {cores} cores; timings with >1 thread are "
            "unreliable here, compare with --threads 1"
        )

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", dynamo=not ARGS.legacy_export)
        export_s = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        runtimes = {
            "torch eager": None,
            "onnxruntime": OnnxLM(onnx_path, session_options=options),
            "numpy fp32": NumpyLM.from_model(model),
            "numpy int8": NumpyLM.from_model(model, quantize="int8"),
        }
        print(f"  ONNX export: {export_s:.1f} s ({'legacy' if ARGS.legacy_export else 'dynamo'})")

        # Parity of the prompt logits (float32 ports must match to float32 rounding).
        rng = np.random.default_rng(0)
        probe = rng.integers(0, cfg.vocab_size, (2, ARGS.prompt_len))
        with torch.inference_mode():
            ref = model(torch.as_tensor(probe)).numpy()
        outs = {name: lm.logits(probe) for name, lm in runtimes.items() if lm is not None}
        errors = {
            name: (float(np.abs(out - ref).max()), relative_l2_error(ref, out))
            for name, out in outs.items()
        }

        rows, rates, tokens = [], {}, {}
        for B in ARGS.batch:
            prompt = rng.integers(0, cfg.vocab_size, (B, ARGS.prompt_len))
            steps = ARGS.new_tokens
            for name, lm in runtimes.items():
                if lm is None:
                    run = lambda: torch_decode(model, prompt, steps)  # noqa: B023
                else:
                    run = lambda lm=lm: port_decode(lm, prompt, steps)  # noqa: B023
                rate, tok = median_rate(run, B, steps)
                rates[name, B], tokens[name, B] = rate, tok
        for B in ARGS.batch:
            base = rates["torch eager", B]
            for name in runtimes:
                same = np.array_equal(tokens[name, B], tokens["torch eager", B])
                rows.append(
                    (
                        name,
                        B,
                        f"{rates[name, B]:,.0f}",
                        f"{1e3 * B / rates[name, B]:.2f}",
                        f"{rates[name, B] / base:.2f}x",
                        "yes" if same else "no",
                    )
                )

    header = ("runtime", "batch", "decode tok/s", "ms/step", "vs torch", "same tokens as torch")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print(
            "  ".join(
                str(x).rjust(w) if i else str(x).ljust(w)
                for i, (x, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print()
    print(
        f"prompt logits vs torch (|logits| up to {np.abs(ref).max():.1f}); float32 ports must pass "
        f"the fp32 rule ({FP32_RULE.describe()}):"
    )
    for name, (err, rel) in errors.items():
        verdict = "" if "int8" in name else ("  ok" if rel < FP32_RULE.max_rel_l2 else "  FAIL")
        print(f"  {name:12s} max abs {err:.2e}  relative L2 {rel:.2e}{verdict}")
    print()
    print("goals:")
    for B in ARGS.batch:
        ort_x = rates["onnxruntime", B] / rates["torch eager", B]
        numpy_x = rates["numpy fp32", B] / rates["torch eager", B]
        print(
            f"  batch {B}: ORT faster than torch eager: {'yes' if ort_x > 1 else 'NO'} "
            f"({ort_x:.2f}x torch's tokens/s); NumPy within 2x of torch eager: "
            f"{'yes' if numpy_x >= 0.5 else 'NO'} ({numpy_x:.2f}x torch's tokens/s)"
        )
    fp32_ok = all(rel < FP32_RULE.max_rel_l2 for n, (_, rel) in errors.items() if "int8" not in n)
    print(f"  fp32 ports match torch (relative L2 < 1e-5): {'yes' if fp32_ok else 'NO'}")


if __name__ == "__main__":
    main()
