"""Tests of tinylm.engine: parity with generate(), compile and its fallback, low-bit kernels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinylm.engine as engine_mod
from tinylm.engine import LOGITS_ATOL, Engine, Int4WeightLinear, Int8WeightLinear, low_bit_kernels
from tinylm.generate import generate, prefill
from tinylm.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, CTX = 61, 40
ATTENTION = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_head=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4),
    "mla-absorbed": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4),
}
PROMPT = [5, 17, 3, 42, 8, 1, 30]


def make(attention: str = "mha", mlp: str = "dense", seed: int = 0) -> GPT:
    """A tiny seeded model with O(1) weights, so a wrong cache changes the argmax."""
    torch.manual_seed(seed)
    extra = dict(mlp="moe", n_experts=4, experts_per_token=2) if mlp == "moe" else {}
    config = GPTConfig(
        vocab_size=VOCAB, context_length=CTX, n_layer=2, n_head=4, n_embd=32,
        **ATTENTION[attention], **extra,
    )  # fmt: skip
    model = GPT(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.2 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])
            p.copy_((p.dim() == 1) + scale * torch.randn(p.shape, generator=g))
    if attention == "mla-absorbed":
        model.set_mla_absorb(True)
    return model


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_eager_engine_matches_generate_tokens_and_logits(attention):
    model = make(attention)
    engine = Engine(model, compile=False)
    assert engine.generate(PROMPT, 20) == generate(model, PROMPT, 20, temperature=0.0)
    # logits of the prompt and of one decode step, against GPT.forward with its own cache
    ref_logits, cache = prefill(model, PROMPT)
    ids = torch.tensor([PROMPT])
    got = engine.prefill(ids)
    torch.testing.assert_close(got, ref_logits, atol=LOGITS_ATOL, rtol=0)
    token = ref_logits.argmax(-1)
    with torch.inference_mode():
        ref_next = model(token.view(1, 1), cache=cache)[:, -1]
    torch.testing.assert_close(
        engine.decode_step(token, len(PROMPT)), ref_next, atol=LOGITS_ATOL, rtol=0
    )


def test_batched_rows_equal_each_row_alone():
    model = make("gqa")
    rows = [[5, 17, 3, 42], [9, 9, 1, 2], [12, 40, 2, 7]]
    engine = Engine(model, max_batch=3, compile=False)
    assert engine.generate(rows, 8) == [generate(model, r, 8, temperature=0.0) for r in rows]


def test_moe_runs_eagerly_and_refuses_low_bit_weights(capsys):
    model = make("mha", mlp="moe")
    engine = Engine(model, compile="auto")
    assert not engine.compiled and "mixture-of-experts" in engine.fallback_reason
    assert "decoding eagerly" in capsys.readouterr().out
    assert engine.generate(PROMPT, 10) == generate(model, PROMPT, 10, temperature=0.0)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        Engine(model, compile=False, weights="int8")


def test_absorbed_mla_refuses_quantised_weights():
    with pytest.raises(ValueError, match="absorbed MLA"):
        Engine(make("mla-absorbed"), compile=False, weights="int4-g32")


def test_eager_fallback_when_no_compiler(monkeypatch, capsys):
    monkeypatch.setattr(engine_mod.shutil, "which", lambda name: None)
    model = make("mha")
    engine = Engine(model, compile=True)
    assert engine.compiled is False
    assert "C++ compiler" in engine.fallback_reason
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "decoding eagerly" in out
    assert engine.generate(PROMPT, 10) == generate(model, PROMPT, 10, temperature=0.0)


def test_compile_error_falls_back_to_eager(monkeypatch, capsys):
    def broken_compile(*args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("simulated inductor failure")

        return fails

    monkeypatch.setattr(engine_mod.torch, "compile", broken_compile)
    model = make("mha")
    if engine_mod.compile_unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("no compiler here: the no-compiler fallback test covers this machine")
    engine = Engine(model, compile="auto")
    assert engine.compiled
    assert engine.generate(PROMPT, 10) == generate(model, PROMPT, 10, temperature=0.0)
    assert not engine.compiled and "simulated inductor failure" in engine.fallback_reason
    assert "decoding eagerly" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["step", "block"])
def test_compiled_decode_gives_the_eager_tokens(scope):
    model = make("gqa")
    engine = Engine(model, compile=True, compile_scope=scope)
    if not engine.compiled:
        pytest.skip(f"torch.compile unavailable here: {engine.fallback_reason}")
    want = Engine(model, compile=False).generate(PROMPT, 16)
    assert engine.generate(PROMPT, 16) == want
    assert list(engine.compile_seconds) == [1] and engine.compiled
    assert engine.fallback_reason is None  # compiled for real, not an eager fallback
    assert engine.generate(PROMPT, 16) == want  # second run: no recompile, same tokens
    assert list(engine.compile_seconds) == [1]
    eager = Engine(model, compile=False)
    token = torch.tensor([PROMPT[-1]])
    for e in (engine, eager):
        e.prefill(torch.tensor([PROMPT[:-1]]))
    want_logits = eager.decode_step(token, len(PROMPT) - 1)
    torch.testing.assert_close(
        engine.decode_step(token, len(PROMPT) - 1), want_logits, rtol=0, atol=LOGITS_ATOL
    )
    # a token given as a strided int32 view is the same step, not a new shape to compile
    strided = torch.tensor([[0, PROMPT[-1]]], dtype=torch.int32)[:, -1]
    got = engine.decode_step(strided, len(PROMPT) - 1)
    torch.testing.assert_close(got, want_logits, rtol=0, atol=LOGITS_ATOL)
    assert list(engine.compile_seconds) == [1]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_compiled_one_row_products_use_gemv_and_match_the_kernel(fmt, monkeypatch):
    """Compiled on a CPU, 1-2 rows go through `gemv` (traced), more rows through the kernel."""
    if engine_mod.compile_unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("torch.compile unavailable here")
    if fmt == "int8" and low_bit_kernels(torch.device("cpu"))["int8"]:
        pytest.skip(low_bit_kernels(torch.device("cpu"))["int8"])
    traced = []
    real_gemv = engine_mod.gemv
    monkeypatch.setattr(engine_mod, "gemv", lambda x, w: traced.append(x.shape) or real_gemv(x, w))
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=False)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    if fmt == "int8":
        layer = Int8WeightLinear(linear)
    else:
        layer = engine_mod.GemvLinear(linear.to(dtype))
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    tol = 1e-5 if fmt == "fp32" else 1e-2  # bf16 outputs: ~3 significant digits
    most = engine_mod.GEMV_MAX_ROWS
    for rows in (most, most + 1):  # the most rows that take gemv, and one more
        x = torch.randn(rows, 1, 96).to(dtype)
        with torch.inference_mode():
            want, got = layer(x).float(), compiled(x).float()  # eager: the matmul kernel
        assert (got - want).abs().max() <= tol * want.abs().max()
    # traced for the rows that take the gemv path only
    assert [shape[0] for shape in traced] == [most]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])  # bf16's layer: the test above
def test_compiled_low_bit_engine_matches_its_eager_logits(fmt):
    if low_bit_kernels(torch.device("cpu")).get(fmt):
        pytest.skip(low_bit_kernels(torch.device("cpu"))[fmt])
    model = make("mha")
    engine = Engine(model, compile=True, weights=fmt)
    if not engine.compiled:
        pytest.skip(f"torch.compile unavailable here: {engine.fallback_reason}")
    eager = Engine(model, compile=False, weights=fmt)
    token = torch.tensor([PROMPT[-1]])
    for e in (engine, eager):
        e.prefill(torch.tensor([PROMPT[:-1]]))
    want = eager.decode_step(token, len(PROMPT) - 1)
    got = engine.decode_step(token, len(PROMPT) - 1)
    assert engine.fallback_reason is None
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # bf16 activations


def test_compile_scope_auto_follows_depth():
    shallow = Engine(make("mha"), compile=False)
    assert shallow.compile_scope == "step"  # 2 layers
    torch.manual_seed(0)
    deep = GPT(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_layer=7, n_head=2, n_embd=16))
    assert engine_mod.STEP_SCOPE_MAX_LAYERS < 7
    assert Engine(deep, compile=False).compile_scope == "block"
    with pytest.raises(ValueError, match="compile_scope"):
        Engine(deep, compile_scope="layer")


def test_sampling_is_seeded():
    engine = Engine(make("mha"), compile=False)
    a = engine.generate(PROMPT, 12, temperature=1.0, seed=3)
    assert a == engine.generate(PROMPT, 12, temperature=1.0, seed=3)
    assert a != engine.generate(PROMPT, 12, temperature=1.0, seed=4)


def test_bad_arguments_are_named():
    model = make("mha")
    with pytest.raises(ValueError, match="weights="):
        Engine(model, weights="int3")
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, compile=False).generate([[1, 2], [3, 4]], 3)
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, compile=False, max_len=8).generate(PROMPT, 5)


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
@pytest.mark.parametrize("shape", [(344, 128), (128, 344), (48, 96)])  # (out, in): padded cases
def test_low_bit_kernel_matches_dequantised_reference(fmt, shape):
    if low_bit_kernels(torch.device("cpu"))[fmt]:
        pytest.skip(low_bit_kernels(torch.device("cpu"))[fmt])
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    layer = (Int8WeightLinear if fmt == "int8" else Int4WeightLinear)(linear)
    x = torch.randn(3, 2, shape[1]).to(torch.bfloat16)
    got = layer(x).float()
    want = F.linear(x.float(), layer.dequantized())
    assert got.shape == want.shape == (3, 2, shape[0])
    # bf16 output: ~3 significant digits of the largest output
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    # and the weight really is quantised: the float weight gives a different answer
    assert (F.linear(x.float(), linear.weight.detach()) - want).abs().max() > 1e-4


def test_weight_bytes_are_counted_exactly():
    model = make("mha")
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    other = sum(p.numel() for p in model.parameters()) - n_linear
    fp32 = Engine(model, compile=False)
    assert fp32.weight_bytes == 4 * (n_linear + other)
    bf16 = Engine(model, compile=False, weights="bf16")
    assert bf16.weight_bytes == 2 * (n_linear + other)
    int8 = Engine(model, compile=False, weights="int8")
    expected = 2 * other
    for m in int8.model.modules():
        if isinstance(m, Int8WeightLinear):
            expected += m.out_features * (m.in_features + m.pad) + 2 * m.out_features
    assert int8.weight_bytes == expected
    int4 = Engine(model, compile=False, weights="int4-g32")
    expected = 2 * other
    for m in int4.model.modules():
        if isinstance(m, Int4WeightLinear):
            rows, cols = m.out_features + m.pad_out, m.in_features + m.pad
            expected += m.weight_int4.numel() + rows * cols // 32 * 2 * 2
            assert m.weight_int4.numel() == rows * cols // 2  # two codes per byte
    assert int4.weight_bytes == expected
