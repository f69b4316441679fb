"""Benchmark decode at batch 1: overhead vs matmuls on the tiny model, bytes on the ~100M one.

Run by hand (not collected by pytest):

    .venv/bin/python tests/benchmarks/bench_decode.py [--new-tokens 32] [--repeats 5]
        [--big 100M] [--no-compile] [--threads N] [--skip-tiny] [--skip-big] [--step-scope]

Prints, in one run (medians over repeats; ratios within this run):

1. The trained default model (checkpoint under data/checkpoints/default; random weights if
   there is none), greedy, prompt 16 tokens: per-token decode time and tokens/s of
   tinylm.generate (eager), Engine eager, Engine compiled, ONNX Runtime (tinylm.port.onnx)
   and Hugging Face transformers' LlamaForCausalLM.generate with the same weights. Per-token
   time of the external ones = (time for N new tokens - time for 1) / (N - 1), the same
   formula for ours. Then one decode step against the sum of its matmuls, each timed alone.
2. GPTConfig.preset("100M") with random weights (timing does not depend on training), for
   each weight format fp32 / bf16 / int8 / int4-g32, the Engine compiled (as the chapters
   run it; eager fp32 for reference, and with --step-scope the whole step compiled as one
   program), all timed in turns: per-token time, tokens/s, bytes read per token, achieved
   GB/s of weights; a bare GEMV of the format's own layer (compiled alike) over the same
   number of weight bytes; and the machine's measured read bandwidth (tinylm.machine). The
   issue's goals are printed next to the ratios.

On a CPU shared with other programs every figure is noisy; trust the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinylm import checkpoint
from tinylm.engine import (
    WEIGHT_FORMATS,
    Engine,
    GemvLinear,
    Int4WeightLinear,
    Int8WeightLinear,
)
from tinylm.generate import generate
from tinylm.machine import measure_machine
from tinylm.model import GPT, GPTConfig, count_parameters
from tinylm.paths import checkpoint_dir

HF_RENAMES = [  # tinylm name -> Hugging Face Llama name
    ("tok_emb.", "model.embed_tokens."),
    ("blocks.", "model.layers."),
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
    ("mlp.gate.", "mlp.gate_proj."),
    ("mlp.up.", "mlp.up_proj."),
    ("mlp.down.", "mlp.down_proj."),
]


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def hf_llama(model: GPT):
    import transformers

    c = model.config
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.n_embd,
            intermediate_size=c.mlp_hidden,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head,
            max_position_embeddings=c.context_length,
            rms_norm_eps=c.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            tie_word_embeddings=c.tie_embeddings,
        )
    )
    state = {}
    for name, tensor in model.state_dict().items():
        name = "model.norm.weight" if name == "norm.weight" else name
        for old, new in HF_RENAMES:
            name = name.replace(old, new)
        state[name] = tensor
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def per_token_in_turns(runs: dict[str, Callable[[int], object]], n: int, repeats: int) -> dict:
    """Per-token seconds of each run: (time of n tokens - time of 1) / (n - 1), medians.

    The runs take turns within every repeat, so a machine that speeds up or slows down
    during the benchmark (a shared or throttled CPU) shifts all of them alike and their
    ratios stay fair; timing one after the other would credit one with the other's luck.
    """
    samples: dict[str, dict[int, list[float]]] = {name: {n: [], 1: []} for name in runs}
    for run in runs.values():  # warm-up: compile, allocate, fill caches
        run(n)
    for _ in range(repeats):
        for name, run in runs.items():
            for k in (n, 1):
                start = time.perf_counter()
                run(k)
                samples[name][k].append(time.perf_counter() - start)
    return {
        name: max(statistics.median(t[n]) - statistics.median(t[1]), 1e-9) / (n - 1)
        for name, t in samples.items()
    }


def tiny_section(args: argparse.Namespace) -> None:
    path = checkpoint_dir() / "default"
    if (path / "model.safetensors").exists():
        model, _, _ = checkpoint.load(path)
        source = "trained checkpoint"
    else:
        torch.manual_seed(0)
        model, source = GPT(GPTConfig()).eval(), "random weights (no checkpoint)"
    c = model.config
    print(f"\n== 1. default model ({count_parameters(c) / 1e6:.2f}M parameters, {source}), batch 1")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (16,), generator=g).tolist()
    n, reps = args.new_tokens, args.repeats
    want = generate(model, prompt, n, temperature=0.0)
    runs: dict[str, Callable[[int], object]] = {
        "tinylm.generate (eager)": lambda k: generate(model, prompt, k, temperature=0.0)
    }
    # Caches sized to the request (prompt + new tokens), as transformers' grows to it: a static
    # cache attends over all its slots at every step.
    eager = Engine(model, compile=False, max_len=len(prompt) + n)
    assert eager.generate(prompt, n) == want
    runs["Engine eager"] = lambda k: eager.generate(prompt, k)
    if not args.no_compile:
        compiled = Engine(model, compile=True, max_len=len(prompt) + n)
        start = time.perf_counter()
        same = compiled.generate(prompt, n) == want
        first = time.perf_counter() - start
        print(f"compiled Engine: first generate {first:.1f} s (compile included); same greedy "
              f"tokens as generate(): {same}")  # fmt: skip
        runs["Engine compiled"] = lambda k: compiled.generate(prompt, k)
    try:
        from tinylm.port.onnx import OnnxLM
        from tinylm.port.onnx_export import export_onnx

        tmp = tempfile.TemporaryDirectory()
        onnx_path = export_onnx(model, Path(tmp.name) / "m.onnx", dynamo=False)
        lm = OnnxLM(onnx_path)
        same = lm.generate(prompt, n, temperature=0.0) == want
        runs["ONNX Runtime"] = lambda k: lm.generate(prompt, k, temperature=0.0)
        print(f"ONNX Runtime: same greedy tokens: {same}")
    except Exception as err:  # noqa: BLE001  a missing optional runtime is reported, not fatal
        print(f"ONNX Runtime skipped: {type(err).__name__}: {err}")
    try:
        hf = hf_llama(model)
        ids = torch.tensor([prompt])

        def hf_run(k: int):
            with torch.inference_mode():
                return hf.generate(
                    ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                    pad_token_id=0, eos_token_id=None,
                )  # fmt: skip

        same = hf_run(n)[0, len(prompt) :].tolist() == want
        runs["transformers Llama.generate"] = hf_run
        print(f"transformers: same greedy tokens: {same}")
    except Exception as err:  # noqa: BLE001
        print(f"transformers skipped: {type(err).__name__}: {err}")
    # The step's matmuls alone, back to back, k times: what a step would cost if nothing but
    # its 29 matrix-vector products ran (same formula, timed in the same turns).
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    vectors = [torch.randn(1, 1, m.in_features) for m in linears]

    @torch.inference_mode()
    def matmuls_only(k: int) -> None:
        for _ in range(k):
            for m, x in zip(linears, vectors, strict=True):
                F.linear(x, m.weight)

    runs["(the step's matmuls only)"] = matmuls_only
    rows = per_token_in_turns(runs, n, reps)

    print(f"\n{'decode, batch 1':<30}{'ms/token':>10}{'tokens/s':>10}")
    for name, s in rows.items():
        print(f"{name:<30}{1e3 * s:>10.3f}{1 / s:>10.0f}")
    hf_s = rows.get("transformers Llama.generate")
    best_name = "Engine compiled" if "Engine compiled" in rows else "Engine eager"
    if hf_s:
        print(f"{best_name} vs transformers: {hf_s / rows[best_name]:.2f}x faster (goal >= 3x)")
    matmul_s, step = rows["(the step's matmuls only)"], rows[best_name]
    print(f"the step's {len(linears)} matmuls alone: {1e3 * matmul_s:.3f} ms per token; "
          f"{best_name} {1e3 * step:.3f} ms = {step / matmul_s:.2f}x (goal <= 2x)")  # fmt: skip
    print(f"tinylm.generate (eager): {rows['tinylm.generate (eager)'] / matmul_s:.2f}x the matmuls")


def bare_gemv(
    fmt: str, n_weights: int, k: int, compiled: bool
) -> tuple[Callable[[int], object], int]:
    """A run of one-row products of this format's layer over n_weights weights, and its bytes.

    The layer is the Engine's own (GemvLinear, Int8WeightLinear, Int4WeightLinear) on a
    [n/k, k] weight; compiled, it runs the same generated GEMV the compiled step runs.
    run(calls) makes `calls` products, so per_token_in_turns times it beside the decode steps.
    """
    rows = n_weights // k // 16 * 16
    torch.manual_seed(0)
    linear = nn.Linear(k, rows, bias=False)
    x = torch.randn(1, k)
    if fmt == "fp32":
        layer: nn.Module = GemvLinear(linear)
    elif fmt == "bf16":
        layer, x = GemvLinear(linear.to(torch.bfloat16)), x.to(torch.bfloat16)
    else:
        cls = Int8WeightLinear if fmt == "int8" else Int4WeightLinear
        layer, x = cls(linear), x.to(torch.bfloat16)
    nbytes = sum(
        t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers())
    )
    product = torch.compile(layer, fullgraph=True, dynamic=False) if compiled else layer

    @torch.inference_mode()
    def run(calls: int) -> None:
        for _ in range(calls):
            product(x)

    return run, nbytes


def big_section(args: argparse.Namespace) -> None:
    machine = measure_machine()
    print(f"\n== 2. GPTConfig.preset({args.big!r}), random weights, batch 1, greedy")
    print(machine.summary())
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.big)).eval()
    c = model.config
    prompt = torch.tensor([torch.randint(0, c.vocab_size, (8,)).tolist()])
    compiled = not args.no_compile
    engines = {}
    for fmt in WEIGHT_FORMATS:
        start = time.perf_counter()
        engine = Engine(model, compile=compiled, weights=fmt, max_len=64)
        engine.prefill(prompt)
        engine.decode_step(prompt[:, -1], prompt.shape[1])  # compiles
        engines[fmt] = engine
        print(f"{fmt}: built and compiled in {time.perf_counter() - start:.1f} s")
    if compiled:
        engines["fp32 eager"] = Engine(model, compile=False, weights="fp32", max_len=64)
        if args.step_scope:  # the whole step as one program: no call per block, long compile
            start = time.perf_counter()
            engine = Engine(model, weights="fp32", max_len=64, compile_scope="step")
            engine.prefill(prompt)
            engine.decode_step(prompt[:, -1], prompt.shape[1])
            engines["fp32 step scope"] = engine
            print(
                f"fp32, compile_scope='step': built and compiled in {time.perf_counter() - start:.1f} s"
            )

    def steps(engine: Engine) -> Callable[[int], object]:
        def run(k: int) -> None:
            engine.prefill(prompt)
            token = prompt[:, -1]
            for i in range(k):
                engine.decode_step(token, prompt.shape[1] + i)

        return run

    # Each format's bare GEMV over the same weights, timed in the same turns as the steps.
    n_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    runs = {name: steps(e) for name, e in engines.items()}
    gemv_bytes = {}
    for fmt in WEIGHT_FORMATS + (("fp32 eager",) if compiled else ()):
        runs[f"GEMV {fmt}"], gemv_bytes[fmt] = bare_gemv(
            fmt.split()[0], n_lin, c.n_embd, compiled and fmt != "fp32 eager"
        )
    per_token = per_token_in_turns(runs, args.big_tokens, args.repeats)
    results = {}
    for name, engine in engines.items():
        gemv = name if name in gemv_bytes else name.split()[0]  # step scope: fp32's GEMV
        results[name] = dict(s=per_token[name], bytes=engine.step_weight_bytes,
                             gemv_gbps=gemv_bytes[gemv] / per_token[f"GEMV {gemv}"] / 1e9)  # fmt: skip
    how = "compiled" if compiled else "eager"
    print(
        f"\nEngine {how} (fp32 eager for reference); bare GEMV = the format's own layer over the same bytes, {how}"
    )
    print(f"{'weights':<15}{'ms/token':>9}{'tok/s':>7}{'MB/token':>9}{'GB/s':>7}"
          f"{'bare GEMV GB/s':>15}{'vs GEMV':>8}{'vs read BW':>11}{'speed-up':>9}")  # fmt: skip
    base = results["fp32"]["s"]
    for fmt, r in results.items():
        gbps = r["bytes"] / r["s"] / 1e9
        print(f"{fmt:<15}{1e3 * r['s']:>9.1f}{1 / r['s']:>7.1f}{r['bytes'] / 1e6:>9.1f}{gbps:>7.1f}"
              f"{r['gemv_gbps']:>15.1f}{gbps / r['gemv_gbps']:>8.2f}{gbps / machine.read_gbps:>11.2f}"
              f"{base / r['s']:>8.2f}x")  # fmt: skip
    fp = results["fp32"]
    gemv_fp32_s = fp["bytes"] / (fp["gemv_gbps"] * 1e9)
    print(
        f"\nfp32 per token / bare GEMV over its bytes: {fp['s'] / gemv_fp32_s:.2f}x (goal <= 1.2x); "
        f"/ bytes over the read bandwidth: {fp['s'] * machine.read_gbps * 1e9 / fp['bytes']:.2f}x"
    )
    goals = {"bf16": 1.8, "int8": 2.2, "int4-g32": 3.0}
    for fmt, goal in goals.items():
        r = results[fmt]
        kernel_bound = r["gemv_gbps"] * fp["bytes"] / r["bytes"] / fp["gemv_gbps"]
        print(f"{fmt}: {base / r['s']:.2f}x fp32's tokens/s (goal >= {goal}x); its bare kernel "
              f"alone allows {kernel_bound:.2f}x (same GEMV bytes ratio x kernel GB/s ratio)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--big", default="100M", choices=["100M", "300M"])
    p.add_argument("--big-tokens", type=int, default=12)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-big", action="store_true")
    p.add_argument(
        "--step-scope",
        action="store_true",
        help="also time the big model compiled as one whole step (about 30 s more compile)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_tiny:
        tiny_section(args)
    if not args.skip_big:
        big_section(args)


if __name__ == "__main__":
    main()
