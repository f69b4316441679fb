"""Tests of tinylm.quant, quant_formats, quant_model and quant_calibrate.

Error bounds used here, all derived rather than measured:
- RTN: |w - w_hat| <= s/2 per element, plus the float32 rounding of w / s, which moves the
  rounded value by at most qmax * 2^-24 steps (we allow qmax * 2^-23 steps).
- int8 matmul with per-token activation scales s_x: |y - y_ref|[m, n] <= s_x[m] / 2 *
  sum_k |W_hat[n, k]|, plus float32 accumulation slack (1e-5 of sum |x| |W_hat|).
- int8 KV cache: each cached element is within s/2 of the float value, s = max|vector| / 127.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinylm.generate import generate
from tinylm.model import GPT, GPTConfig
from tinylm.quant import (
    QuantizedTensor,
    QuantLinear,
    dequantize_tensor,
    int8_linear,
    pack_int4,
    qrange,
    quantize_tensor,
    unpack_int4,
)
from tinylm.quant_calibrate import (
    calibration_windows,
    collect_hessians,
    gptq_quantize,
    layer_output_error,
)
from tinylm.quant_formats import (
    dequantize_q4_0,
    dequantize_q8_0,
    quantize_q4_0,
    quantize_q8_0,
    to_q4_0,
    to_q8_0,
)
from tinylm.quant_model import (
    SCHEMES,
    Int8KVCache,
    QuantScheme,
    int8_kv_bytes_per_token,
    load_quantized,
    model_nbytes,
    new_int8_cache,
    quantize_model,
    save_quantized,
    set_kv_cache,
)
from tinylm.tokenizer import BPETokenizer

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMATS = [
    (bits, symmetric, granularity, group)
    for bits in (8, 4)
    for symmetric in (True, False)
    for granularity, group in [
        ("tensor", None),
        ("channel", None),
        ("group", 32),
        ("group", 64),
        ("group", 128),
    ]
]


def weights(kind: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Gaussian weights, or heavy-tailed ones: a log-normal scale mixture plus a few outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "heavy":
        w = w * torch.exp(1.5 * torch.randn(shape, generator=g))
        flat = w.view(-1)
        idx = torch.randint(0, flat.numel(), (3,), generator=g)
        flat[idx] = torch.tensor([5.0, -3.0, 1.0])
    return w


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=64, context_length=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**(base | overrides))


def tiny_model(seed: int = 0, std: float = 0.1, **overrides) -> GPT:
    """A random model with weights large enough that logits differ clearly between tokens."""
    torch.manual_seed(seed)
    model = GPT(tiny(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model


def tokens(model: GPT, B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


# ----------------------------------------------------------------------------- RTN formats


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("shape", [(37, 100), (3, 5, 70), (45,)])
@pytest.mark.parametrize(("bits", "symmetric", "granularity", "group"), FORMATS)
def test_round_trip_error_is_at_most_half_a_step(kind, shape, bits, symmetric, granularity, group):
    w = weights(kind, shape)
    q = quantize_tensor(w, bits, group, symmetric, granularity=granularity)
    w_hat = dequantize_tensor(q)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    step = q.step().double()
    qmax = qrange(bits, symmetric)[1]
    err = (w.double() - w_hat.double()).abs()
    bound = step / 2 + step * qmax * 2**-23
    if bits == 4 and symmetric:
        # Q4_0's rule: the side opposite the extreme ends at code +7, one short of the
        # extreme's -8, so a weight clamped there may be off by up to one step.
        clamped = (q.codes()[..., : w.shape[-1]].reshape(w.shape) == 7) & (err > bound)
        assert (err[clamped] <= step[clamped] * (1 + 2**-20)).all()
        err, bound = err[~clamped], bound[~clamped]
    assert (err <= bound).all()
    # and the bound is not vacuous: some element is rounded by close to half a step
    assert (err / bound).max() > 0.5


def test_symmetric_int4_uses_16_levels_and_is_no_worse_than_q4_0():
    g = torch.Generator().manual_seed(7)
    # rows with a positive extreme, a negative one, and an outlier, in blocks of 32
    w = torch.randn(24, 256, generator=g)
    w[0, 3], w[1, 40], w[2, 77] = 9.0, -9.0, 25.0
    q = quantize_tensor(w, 4, 32)
    assert qrange(4, True) == (-8, 7) and q.codes().unique().tolist() == list(range(-8, 8))
    ours = (q.dequantize() - w).abs()
    q4_0 = (dequantize_q4_0(quantize_q4_0(w), w.shape) - w).abs()
    assert ours.pow(2).mean() <= q4_0.pow(2).mean()
    assert (ours <= q4_0 + 1e-6).all()  # element by element, up to float rounding
    # and 15 levels (max|w| / 7, codes -7..7) is clearly worse on the same tensor
    blocks = w.reshape(-1, 32)
    s15 = blocks.abs().amax(1, keepdim=True) / 7
    err15 = ((blocks / s15).round().clamp(-7, 7) * s15 - blocks).pow(2).mean()
    assert ours.pow(2).mean() < 0.95 * err15


def test_public_signature_and_defaults():
    w = weights("normal", (16, 64))
    q8 = quantize_tensor(w)  # int8, one scale per output channel
    assert (q8.bits, q8.granularity, q8.symmetric) == (8, "channel", True)
    assert q8.data.dtype == torch.int8 and q8.scale.shape == (16, 1)
    q4 = quantize_tensor(w, 4, 32, False)
    assert (q4.bits, q4.granularity, q4.group_size, q4.symmetric) == (4, "group", 32, False)
    assert q4.data.dtype == torch.uint8 and q4.data.shape == (16, 32)
    assert q4.zero.dtype == torch.uint8 and q4.scale.dtype == torch.float16
    assert quantize_tensor(w, 8, granularity="tensor").scale.shape == (1, 1)


def test_asymmetric_uses_the_full_code_range_on_a_shifted_group():
    w = torch.linspace(-0.1, 1.4, 32)[None]  # mostly positive: symmetric wastes codes
    sym, asym = quantize_tensor(w, 4, 32, True), quantize_tensor(w, 4, 32, False)
    assert asym.scale.float().item() < sym.scale.float().abs().item()
    err = lambda q: (w - dequantize_tensor(q)).abs().max().item()
    assert err(asym) < err(sym)
    assert asym.codes().min() == 0 and asym.codes().max() == 15


def test_zero_and_constant_tensors_round_trip():
    z = torch.zeros(4, 32)
    for q in (quantize_tensor(z, 4, 32), quantize_tensor(z, 8, None, False)):
        assert torch.equal(dequantize_tensor(q), z)
    c = torch.full((2, 32), 0.3)
    assert torch.allclose(dequantize_tensor(quantize_tensor(c, 8, 32)), c, rtol=0, atol=0.3 / 254)


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((3,), {}, "bits must be 8 or 4"),
        ((4, 31), {}, "even"),
        ((8, 32), {"granularity": "channel"}, "only applies"),
        ((8,), {"granularity": "group"}, "needs group_size"),
        ((8,), {"granularity": "row"}, "granularity must be"),
    ],
)
def test_bad_arguments_are_clear_errors(args, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_tensor(torch.randn(4, 64), *args, **kw)


def test_non_finite_and_non_float_weights_are_rejected():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_tensor(torch.ones(2, 2, dtype=torch.long))


def test_huge_weights_need_float32_scales():
    w = torch.tensor([[1e7, 1.0]])
    with pytest.raises(ValueError, match="scale_dtype=torch.float32"):
        quantize_tensor(w)
    q = quantize_tensor(w, scale_dtype=torch.float32)
    assert (w - dequantize_tensor(q)).abs().max() <= q.scale.item() / 2


# ----------------------------------------------------------------------------- packing


def test_pack_unpack_all_16_values_and_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (8,)
    assert packed[0].item() == 0x10 and packed[7].item() == 0xFE  # (0, 1) and (14, 15)
    assert torch.equal(unpack_int4(packed), codes)
    every_pair = torch.cartesian_prod(codes, codes).flatten()  # all 256 byte values
    assert sorted(pack_int4(every_pair).tolist()) == list(range(256))
    assert torch.equal(unpack_int4(pack_int4(every_pair)), every_pair)


def test_pack_odd_shapes_and_errors():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 14), generator=g)
    assert torch.equal(unpack_int4(pack_int4(codes)).long(), codes)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([-1, 3]))


@pytest.mark.parametrize("bits", [4, 8])
def test_odd_input_width_is_padded_and_cropped(bits):
    w = weights("normal", (5, 33))
    q = quantize_tensor(w, bits, 32)
    assert q.data.shape == (5, 64 if bits == 8 else 32)  # two groups, the second padded
    assert q.scale.shape == (5, 2)
    assert dequantize_tensor(q).shape == (5, 33)


# ----------------------------------------------------------------------------- bytes


def test_nbytes_are_the_real_storage():
    w = weights("normal", (64, 128))
    n = w.numel()
    assert quantize_tensor(w, 8).nbytes == n + 64 * 2  # int8 + one fp16 scale per row
    assert quantize_tensor(w, 8, granularity="tensor").nbytes == n + 2
    assert quantize_tensor(w, 4, 32).nbytes == n * (0.5 + 2 / 32)
    assert quantize_tensor(w, 4, 32, False).nbytes == n * (0.5 + 3 / 32)  # + uint8 zero point
    assert quantize_tensor(w, 4, 128).nbytes == n * (0.5 + 2 / 128)


def test_model_nbytes_counts_packed_layers_and_float_rest():
    model = tiny_model(n_embd=64, mlp_hidden=128)  # every Linear input is a multiple of 32
    C, V, L, hidden = 64, 64, 2, 128
    float_bytes = 4 * (2 * V * C + (2 * L + 1) * C)  # embedding, head, norms
    linear_weights = L * (4 * C * C + 3 * C * hidden)
    assert model_nbytes(model) == float_bytes + 4 * linear_weights
    q4 = quantize_model(model, "int4-g32")
    assert model_nbytes(q4) == float_bytes + linear_weights * (0.5 + 2 / 32)
    q8 = quantize_model(model, "int8")
    rows = L * (4 * C + 2 * hidden + C)  # one fp16 scale per output row
    assert model_nbytes(q8) == float_bytes + linear_weights + 2 * rows


def test_model_nbytes_counts_tied_weights_once():
    model = tiny_model(tie_embeddings=True)
    assert model_nbytes(model) == sum(p.numel() * 4 for p in model.parameters())


# ----------------------------------------------------------------------------- llama.cpp


def test_q8_0_layout_matches_our_int8_g32():
    w = weights("heavy", (4, 64))
    q = quantize_tensor(w, 8, 32)
    blocks = to_q8_0(q)
    assert blocks.dtype == torch.uint8 and blocks.shape == (8, 34)
    assert blocks[0, :2].contiguous().view(torch.float16) == q.scale[0, 0]
    assert torch.equal(blocks[0, 2:].view(torch.int8), q.data[0, :32])
    assert torch.equal(dequantize_q8_0(blocks, w.shape), dequantize_tensor(q))
    with pytest.raises(ValueError, match="Q8_0 needs"):
        to_q8_0(quantize_tensor(w, 8))


def test_q4_0_layout_pairs_element_j_with_j_plus_16():
    w = weights("normal", (2, 64))
    q = quantize_tensor(w, 4, 32)
    blocks = to_q4_0(q)
    assert blocks.shape == (4, 18)
    nibbles = unpack_int4(q.data).reshape(4, 32)  # our codes + 8
    assert torch.equal(blocks[:, 2:] & 0x0F, nibbles[:, :16])
    assert torch.equal(blocks[:, 2:] >> 4, nibbles[:, 16:])
    assert torch.equal(dequantize_q4_0(blocks, w.shape), dequantize_tensor(q))


def test_reference_q8_0_rounds_half_away_from_zero():
    x = torch.zeros(32)
    x[:5] = torch.tensor([127.0, -63.5, 2.5, -2.5, 0.5])  # amax 127 -> d = 1 exactly
    blocks = quantize_q8_0(x)
    assert blocks[0, :2].contiguous().view(torch.float16).item() == 1.0
    assert blocks[0, 2:7].view(torch.int8).tolist() == [127, -64, 3, -3, 1]  # C roundf
    w = weights("heavy", (3, 64))
    d = quantize_q8_0(w)[:, :2].contiguous().view(torch.float16).float()
    err = (dequantize_q8_0(quantize_q8_0(w), w.shape) - w).abs().reshape(-1, 32)
    assert (err <= d / 2 + 127 * d * 2**-11).all()  # + fp16 rounding of d, times |q| <= 127
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.randn(2, 48))


def test_reference_q4_0_uses_code_minus_8_and_clips_plus_8():
    x = torch.zeros(32)
    x[[0, 1, 16, 17]] = torch.tensor([-8.0, 7.9, 3.4, -2.5])
    blocks = quantize_q4_0(x)
    assert blocks[0, :2].contiguous().view(torch.float16).item() == 1.0  # d = max / -8
    assert blocks[0, 2].item() == 0 | (11 << 4)  # -8 -> 0, 3.4 -> 11 (3)
    assert blocks[0, 3].item() == 15 | (6 << 4)  # 7.9 -> 16 clipped to 15 (7), -2.5 -> 6 (-2)
    back = dequantize_q4_0(blocks, (32,))
    assert back[[0, 1, 16, 17]].tolist() == [-8.0, 7.0, 3.0, -2.0]
    # In general: within |d|/2 unless clipped at +7, and always within one step |d|.
    w = weights("heavy", (8, 64))
    b = quantize_q4_0(w)
    d = b[:, :2].contiguous().view(torch.float16).float().abs()
    err = (dequantize_q4_0(b, w.shape) - w).abs().reshape(-1, 32)
    clipped = torch.cat((b[:, 2:] & 0x0F, b[:, 2:] >> 4), dim=1) == 15
    slack = 8 * d * 2**-11  # fp16 rounding of d times |code - 8| <= 8
    assert (err <= d + slack).all()
    assert (err[~clipped.expand_as(err)] <= (d / 2 + slack).expand_as(err)[~clipped]).all()


# ----------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize(
    "fmt", [(8, None, "channel", True), (4, 32, None, True), (4, 32, None, False)]
)
def test_quant_linear_stores_bytes_and_equals_dequantised_f_linear(fmt):
    bits, group, granularity, symmetric = fmt
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    ql = QuantLinear.from_linear(linear, bits, group, granularity, symmetric)
    state = ql.state_dict()
    assert set(state) == {"qweight", "scale", "bias"} | ({"zero"} if not symmetric else set())
    assert state["qweight"].dtype in (torch.int8, torch.uint8)
    x = torch.randn(3, 7, 96)
    w_hat = dequantize_tensor(ql.quantized)
    assert torch.equal(ql(x), F.linear(x, w_hat, linear.bias))
    assert torch.equal(ql.weight, w_hat)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_int8_matmul_is_within_its_activation_rounding_bound(granularity, M):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=False)
    ql = QuantLinear.from_linear(linear, 8, granularity=granularity, compute="int8")
    x = weights("heavy", (M, 128), seed=3) * 10
    y = ql(x)
    w_hat = ql.weight
    y_ref = F.linear(x, w_hat)
    s_x = x.abs().amax(dim=1, keepdim=True) / 127
    bound = s_x / 2 * w_hat.abs().sum(dim=1) + 1e-5 * (x.abs() @ w_hat.abs().T)
    assert ((y - y_ref).abs() <= bound).all()
    assert not torch.equal(y, y_ref)  # the int8 path really ran
    assert torch.equal(int8_linear(x, ql.qweight, ql.scale), y)


def test_int8_compute_falls_back_to_dequant_for_other_formats():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    ql = QuantLinear.from_linear(linear, 4, 32, compute="int8")
    x = torch.randn(4, 64)
    assert torch.equal(ql(x), F.linear(x, ql.weight))
    with pytest.raises(ValueError, match="compute must be"):
        ql.compute = "fp8"


# ----------------------------------------------------------------------------- quantize_model


def test_quantize_model_replaces_blocks_keeps_embedding_head_and_original():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize_model(model, "int4-g32")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    block = qmodel.blocks[0]
    for layer in (block.attn.q_proj, block.attn.o_proj, block.mlp.gate, block.mlp.down):
        assert isinstance(layer, QuantLinear)
    assert type(qmodel.lm_head) is nn.Linear and type(qmodel.tok_emb) is nn.Embedding
    assert isinstance(quantize_model(model, "int8", include_head=True).lm_head, QuantLinear)


def test_moe_experts_are_quantised_and_the_router_is_not():
    model = tiny_model(mlp="moe", n_experts=4, experts_per_token=2)
    qmodel = quantize_model(model, "int8")
    moe = qmodel.blocks[0].mlp
    assert type(moe.router) is nn.Linear
    assert all(isinstance(e.gate, QuantLinear) for e in moe.experts)
    assert isinstance(moe.shared.up, QuantLinear)
    x = tokens(model)
    with torch.no_grad():
        ref = model(x)
        assert (qmodel(x) - ref).norm() < 0.05 * ref.norm()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_runs_and_stays_close(scheme):
    model = tiny_model()
    x = tokens(model)
    cal = calibration_windows(tokens(model, 1, 400, seed=2)[0], 8, 32)
    qmodel = quantize_model(model, scheme, calibration=cal)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    # A sanity bound on a random model (a wrong scale or sign gives ~1 or more): 8-bit
    # layers err by ~0.4% each, 4-bit by ~7%; they compound through 14 layers.
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.05 if SCHEMES[scheme].bits == 8 else 0.5)
    assert qmodel.quant_scheme == scheme


@pytest.mark.slow
def test_finer_granularity_and_more_bits_give_smaller_errors():
    model = tiny_model(n_embd=128)  # inputs of 128 and 344: several groups per row
    x = tokens(model)
    with torch.no_grad():
        ref = model(x)
        err = {
            s: (quantize_model(model, s)(x) - ref).norm().item() for s in SCHEMES if "gptq" not in s
        }
    assert err["int8"] < err["int8-tensor"] and err["int8"] < err["int4-g32"]
    assert err["int4-g32"] < err["int4-g64"] < err["int4-channel"]


def test_unknown_scheme_and_missing_calibration_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown scheme"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, "int4-g32-gptq")
    with pytest.raises(ValueError, match="method"):
        QuantScheme(4, 32, method="awq")


def test_greedy_generation_of_a_quantised_model_runs_and_cache_matches_recompute():
    model = tiny_model(std=0.3)
    for compute in ("dequant", "int8"):
        qmodel = quantize_model(model, "int8", compute=compute)
        out = generate(qmodel, [1, 2, 3], 12, temperature=0)
        assert len(out) == 12 and all(0 <= t < 64 for t in out)
        # per-token activation scales: a token's result does not depend on the others, so
        # incremental decoding with the KV cache equals recomputing the whole sequence
        assert generate(qmodel, [1, 2, 3], 12, temperature=0, use_cache=False) == out


# ----------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize(
    "fmt", [dict(group_size=32), dict(group_size=32, symmetric=False), dict(granularity="channel")]
)
def test_gptq_reduces_layer_output_error_vs_rtn(fmt, act_order):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated
    W = torch.randn(48, 64, generator=g) * 0.1
    H = X.T @ X
    rtn = dequantize_tensor(quantize_tensor(W, 4, **fmt))
    gptq = gptq_quantize(W, H, 4, **fmt, act_order=act_order)
    assert isinstance(gptq, QuantizedTensor) and gptq.data.shape == (48, 32)
    assert layer_output_error(W, gptq.dequantize(), H) < 0.8 * layer_output_error(W, rtn, H)
    assert torch.allclose(
        layer_output_error(W, rtn, H) * torch.ones(()), ((X @ (W - rtn).T) ** 2).sum(), rtol=1e-3
    )


def test_gptq_model_beats_rtn_on_calibration_logits():
    model = tiny_model()
    cal = calibration_windows(tokens(model, 1, 600, seed=2)[0], 16, 32)
    rtn = quantize_model(model, "int4-g32")
    gptq = quantize_model(model, "int4-g32-gptq", calibration=cal)
    with torch.no_grad():
        ref = model(cal)
        assert ((gptq(cal) - ref) ** 2).mean() < 0.8 * ((rtn(cal) - ref) ** 2).mean()


def test_collect_hessians_sees_the_layer_inputs():
    model = tiny_model()
    cal = tokens(model, 3, 10)
    layer = model.blocks[1].mlp.down
    seen = []
    handle = layer.register_forward_hook(
        lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1]))
    )
    with torch.no_grad():
        ((H, n),) = collect_hessians(model, {"down": layer}, cal, batch_size=2).values()
    handle.remove()
    X = torch.cat(seen)
    assert n == 30 and torch.allclose(H, X.T @ X, rtol=1e-5, atol=1e-6)


def test_calibration_windows_are_seeded_slices():
    t = torch.arange(1000)
    a, b = calibration_windows(t, 4, 16, seed=3), calibration_windows(t, 4, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        calibration_windows(t[:10], 4, 16)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    ("scheme", "overrides", "include_head"),
    [
        ("int8", {}, False),
        ("int4-g32-asym", {}, True),
        ("int4-g32", {"tie_embeddings": True}, False),
    ],
)
def test_save_load_round_trip_gives_identical_logits(
    tmp_path, monkeypatch, scheme, overrides, include_head
):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("pickle must not be used"))
    model = tiny_model(**overrides)
    qmodel = quantize_model(model, scheme, include_head=include_head)
    tok = BPETokenizer.train("once upon a time there was a tiny model " * 4, 270)
    path = save_quantized(tmp_path / "q", qmodel, tok, meta={"note": "hi"})
    loaded, tok2, meta = load_quantized(path)
    x = tokens(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert model_nbytes(loaded) == model_nbytes(qmodel)
    assert tok2.encode("a tiny model") == tok.encode("a tiny model")
    assert meta["note"] == "hi" and meta["quantization"]["scheme"] == scheme
    assert loaded.quant_config == qmodel.quant_config
    json.loads((path / "meta.json").read_text())  # plain JSON
    assert {p.suffix for p in path.iterdir()} == {".json", ".safetensors"}


def test_load_quantized_rejects_a_float_checkpoint(tmp_path):
    from tinylm import checkpoint

    checkpoint.save(tmp_path / "f", tiny_model())
    with pytest.raises(ValueError, match="not a quantised checkpoint"):
        load_quantized(tmp_path / "f")
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(tmp_path / "g", tiny_model())


# ----------------------------------------------------------------------------- int8 KV cache

ATTENTION = {
    "mha": {},
    "gqa": dict(attention="gqa", n_kv_head=2),
    "mla": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4),
}


def test_int8_cache_read_back_is_within_half_a_step():
    cache = Int8KVCache(2, 8, [[(3, 16), (3, 16)]])
    k, v = weights("heavy", (2, 3, 5, 16)), weights("normal", (2, 3, 5, 16), seed=1)
    cache.write(0, 2, k, v)
    k2, v2 = (t[:, :, 2:7] for t in cache.read(0, 7))
    for x, back, s in ((k, k2, cache.scales[0][0]), (v, v2, cache.scales[0][1])):
        step = s[:, :, 2:7].float()
        assert ((x - back).abs() <= step / 2 + step * 127 * 2**-23).all()
        assert torch.allclose(step, x.abs().amax(-1, keepdim=True) / 127, rtol=2**-10)


@pytest.mark.parametrize("variant", list(ATTENTION))
def test_int8_cache_logits_close_to_float_cache(variant):
    model = tiny_model(std=0.05, **ATTENTION[variant])  # trained weights are of this order
    x = tokens(model, 2, 24)
    out = {}
    for name, cache in (("fp32", model.new_cache(2)), ("int8", new_int8_cache(model, 2))):
        with torch.no_grad():
            steps = [model(x[:, :12], cache=cache)]
            steps += [model(x[:, t : t + 1], cache=cache) for t in range(12, 24)]
        out[name] = torch.cat(steps, dim=1)
    # Each cached vector moves by <= 1/254 of its largest element (0.4%); through the
    # softmax and two more layers we allow 5x that, relative to the largest logit.
    diff = (out["int8"] - out["fp32"]).abs().max()
    assert diff <= 0.02 * out["fp32"].abs().max()
    assert diff > 0  # it really is quantised


@pytest.mark.parametrize("variant", list(ATTENTION))
def test_int8_cache_bytes_per_token(variant):
    config = tiny(**ATTENTION[variant])
    model = GPT(config)
    cache = new_int8_cache(model, 3, 10)
    assert cache.nbytes() == int8_kv_bytes_per_token(config) * 3 * 10
    fp32 = model.new_cache(3, 10).nbytes()
    D = config.kv_lora_rank + config.rope_head_dim if variant == "mla" else config.head_dim
    assert fp32 / cache.nbytes() == pytest.approx(4 * D / (D + 2))


def test_set_kv_cache_switches_what_generate_uses():
    model = tiny_model(std=0.3)
    ref = generate(model, [5, 6, 7], 10, temperature=0)
    set_kv_cache(model, "int8")
    assert isinstance(model.new_cache(1), Int8KVCache)
    out = generate(model, [5, 6, 7], 10, temperature=0)
    assert len(out) == 10
    set_kv_cache(model, "float")
    assert type(model.new_cache(1)).__name__ == "KVCache"
    assert generate(model, [5, 6, 7], 10, temperature=0) == ref
    with pytest.raises(ValueError, match="max_len"):
        new_int8_cache(model, 1, 1000)
