"""Parity reports: good ports pass, broken ports are caught at the layer that is broken."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tinylm.model import GPT, GPTConfig
from tinylm.port.numpy_runtime import NumpyLM, activation_names
from tinylm.port.onnx import OnnxLM
from tinylm.port.onnx_export import export_onnx
from tinylm.port.parity import (
    CANN_TOOL_RULE,
    FP32_RULE,
    VENDOR_RULE,
    ParityReport,
    Rule,
    compare,
    cosine_similarity,
    kl_divergence,
    make_broken_port,
    relative_l2_error,
    rope_interleaved,
)
from tinylm.quant_model import quantize_model

CONFIG = dict(vocab_size=97, context_length=64, n_layer=3, n_head=4, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(spread: float | None = None) -> GPT:
    """A seeded random model. spread: redraw the weights with a larger std so activations
    are of order 1-10, as in a trained model, rather than ~0.01 as at initialisation."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG)).eval()
    if spread is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    residual = name.endswith(("o_proj.weight", "down.weight"))
                    p.normal_(0.0, spread / 4 if residual else spread)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 97, n).tolist() for n in (2, 7, 16, 31)]


# ----------------------------------------------------------------------------- metrics


def test_metrics_on_known_values():
    a = np.array([[1.0, 2.0, 2.0]], dtype=np.float32)
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert cosine_similarity(a, np.array([[2.0, -1.0, 0.0]])) == pytest.approx(0.0)
    assert relative_l2_error(a, 1.1 * a) == pytest.approx(0.1)
    assert cosine_similarity(a, np.array([[np.nan, 0, 0]])) == -math.inf
    assert kl_divergence(a, a + 5.0)[0] == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    p = np.log(np.array([0.5, 0.5]))
    q = np.log(np.array([0.9, 0.1]))
    assert kl_divergence(p, q) == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))


def test_rules():
    assert VENDOR_RULE.passes(cosine=0.995, max_abs=5e-4, rel_l2=0.5)
    assert not VENDOR_RULE.passes(cosine=0.98, max_abs=5e-4, rel_l2=0.0)
    assert not VENDOR_RULE.passes(cosine=0.999, max_abs=2e-3, rel_l2=0.0)
    assert FP32_RULE.passes(cosine=1.0, max_abs=1.0, rel_l2=1e-6)
    assert not FP32_RULE.passes(cosine=1.0, max_abs=0.0, rel_l2=1e-4)
    assert "hiascend.com" in VENDOR_RULE.source
    assert VENDOR_RULE.describe() == "cosine > 0.99 and max abs error < 0.001"


# ----------------------------------------------------------------------------- good ports


def test_numpy_port_passes_every_layer(model, prompts):
    rng = np.random.default_rng(1)
    report = compare(
        model,
        NumpyLM.from_model(model),
        prompts,
        greedy_tokens=12,
        val_tokens=rng.integers(0, 97, 300),
        bytes_per_token=2.5,
    )
    assert isinstance(report, ParityReport)
    assert [lr.name for lr in report.layers] == activation_names(3)
    assert report.passed() and report.passed("fp32")
    assert report.first_failure() is None and report.first_failure(FP32_RULE) is None
    logits = report.layers[-1]
    assert logits.max_abs <= 1e-5 and logits.shape == (1, 31, 97)
    assert report.top1_agreement == 1.0
    assert report.greedy_prefix_agreement == 1.0 and report.greedy_identical == 1.0
    assert report.kl_max < 1e-9
    assert abs(report.bpb_diff) < 1e-5
    json.dumps(report.to_dict())  # JSON-safe


def test_onnx_port_passes_every_layer(model, prompts, tmp_path):
    port = OnnxLM(export_onnx(model, tmp_path / "m.onnx", activations=True, dynamo=False))
    report = compare(model, port, prompts, greedy_tokens=8)
    assert len(report.layers) == len(activation_names(3))
    assert report.passed() and report.passed("fp32")
    assert report.greedy_identical == 1.0
    plain = OnnxLM(export_onnx(model, tmp_path / "plain.onnx", dynamo=False))
    report = compare(model, plain, prompts[:2], greedy_tokens=0)
    assert [lr.name for lr in report.layers] == ["logits"] and report.passed("fp32")


def test_port_without_trace_compares_logits_only(model, prompts):
    class LogitsOnly:
        def __init__(self, lm: NumpyLM) -> None:
            self.lm = lm

        def logits(self, ids):
            return self.lm.logits(ids)

    report = compare(model, LogitsOnly(NumpyLM.from_model(model)), prompts[:2], greedy_tokens=3)
    assert [lr.name for lr in report.layers] == ["logits"]
    assert report.passed() and report.greedy_identical == 1.0
    assert any("logits compared only" in note for note in report.notes)


def test_int8_port_passes_against_the_quantised_reference(model, prompts):
    """Compare like with like: the int8 port is an fp32-exact port of the int8 model."""
    report = compare(
        quantize_model(model, "int8"),
        NumpyLM.from_model(model, quantize="int8"),
        prompts,
        greedy_tokens=0,
    )
    assert report.passed("fp32")
    assert report.greedy_prefix_agreement is None


# ----------------------------------------------------------------------------- broken ports


@pytest.mark.parametrize("layer", [0, 2])
def test_rope_bug_is_located_by_the_fp32_rule(model, prompts, layer):
    """At initialisation scale the bug hides under the vendor rule's 1e-3 in its own layer:
    only the scale-free fp32 rule pins it to the right place."""
    broken = make_broken_port(model, "rope_interleaved", layer=layer)
    report = compare(model, broken, prompts, greedy_tokens=0)
    assert report.first_failure(FP32_RULE) == f"layers.{layer}.attn"
    assert not report.passed()
    assert "rope_interleaved" in report.port


def test_rope_bug_is_located_by_the_vendor_rule_at_trained_scale(prompts):
    """With activations of order 1-10 (as in a trained model) the vendor rule sees it too."""
    big = make_model(spread=0.2)
    assert compare(big, NumpyLM.from_model(big), prompts[:2], greedy_tokens=0).passed()
    report = compare(big, make_broken_port(big, "rope_interleaved", layer=1), prompts)
    assert report.first_failure() == "layers.1.attn"
    assert report.first_failure("fp32") == "layers.1.attn"
    assert report.greedy_identical < 1.0 and report.top1_agreement < 1.0
    text = str(report)
    assert "first failing layer: layers.1.attn" in text
    html = report._repr_html_()
    assert "<table>" in html and "layers.1.attn" in html and "FAIL" in html
    assert html.count("<th>") == 9  # layer, shape, 4 metrics, 3 verdicts


def test_half_precision_layer_is_located_by_the_fp32_rule(model, prompts):
    report = compare(model, make_broken_port(model, "fp16_mlp", layer=1), prompts, greedy_tokens=0)
    assert report.first_failure("fp32") == "layers.1.mlp"


def test_broken_port_leaves_the_original_alone(model):
    good = NumpyLM.from_model(model)
    make_broken_port(good, "rope_interleaved", layer=0)
    make_broken_port(good, "fp16_mlp", layer=0)
    assert compare(model, good, [[1, 2, 3, 4]], greedy_tokens=0).passed("fp32")
    with pytest.raises(ValueError, match="unknown fault"):
        make_broken_port(good, "typo")
    with pytest.raises(ValueError, match="out of range"):
        make_broken_port(good, layer=3)


def test_interleaved_rope_is_a_rotation_that_differs_from_half_split():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    from tinylm.port.numpy_runtime import apply_rope, rope_tables

    cos, sin = rope_tables(8, 5)
    y = rope_interleaved(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[..., 0, :], x[..., 0, :])  # position 0: no rotation
    assert not np.allclose(y[..., 1:, :], apply_rope(x, cos, sin)[..., 1:, :], atol=1e-3)


def test_compare_rejects_bad_input(model):
    with pytest.raises(ValueError, match="non-empty prompt"):
        compare(model, NumpyLM.from_model(model), [[]])
    with pytest.raises(TypeError, match="logits"):
        compare(model, object(), [[1, 2]])
    with pytest.raises(ValueError, match="bytes_per_token"):
        compare(model, NumpyLM.from_model(model), [[1, 2]], val_tokens=[1, 2, 3])
    report = compare(
        model, NumpyLM.from_model(model), [[1, 2]], rules=[Rule("abs", max_abs=1)], greedy_tokens=0
    )
    with pytest.raises(ValueError, match="not evaluated"):
        report.passed("vendor")


# ----------------------------------------------------------------------------- the vendor tool


def test_cann_tool_rule_flags_only_when_both_thresholds_miss():
    # msprobe's check_accuracy: No when (cos < 0.99 and abs > 0.001) or cos < 0.9 or abs > 1.
    tool = CANN_TOOL_RULE
    assert tool.passes(cosine=0.98, max_abs=5e-4, rel_l2=1.0)  # cosine misses, abs holds
    assert tool.passes(cosine=0.999, max_abs=0.5, rel_l2=1.0)  # abs misses, cosine holds
    assert not tool.passes(cosine=0.98, max_abs=2e-3, rel_l2=0.0)  # both miss
    assert not tool.passes(cosine=0.85, max_abs=0.0, rel_l2=0.0)  # cosine misses badly
    assert not tool.passes(cosine=1.0, max_abs=1.5, rel_l2=0.0)  # abs misses badly
    assert tool.passes(cosine=0.99, max_abs=1e-3, rel_l2=0.0)  # at the thresholds: strict < / >
    # The documented acceptance rule fails the first two, where the tool says "Yes".
    assert not VENDOR_RULE.passes(cosine=0.98, max_abs=5e-4, rel_l2=1.0)
    assert not VENDOR_RULE.passes(cosine=0.999, max_abs=0.5, rel_l2=1.0)
    assert "msprobe" in tool.source
    assert tool.describe().startswith("flagged only if cosine < 0.99 and max abs error > 0.001")


def test_tool_misses_a_real_bug_in_a_small_activation_layer_the_fp32_rule_catches(prompts):
    model = make_model(spread=0.3)  # trained-like activations of order 1
    with torch.no_grad():
        model.blocks[1].mlp.down.weight.mul_(1e-3)  # layer 1's MLP now outputs small values
    broken = make_broken_port(model, "gelu_mlp", layer=1)
    report = compare(model, broken, prompts, greedy_tokens=0)
    row = next(lr for lr in report.layers if lr.name == "layers.1.mlp")
    assert row.max_abs < 1e-3 and 0.9 < row.cosine < 0.9999  # a real, moderate error, small
    assert report.passed(CANN_TOOL_RULE)  # the tool's verdict column: all "Yes"
    assert report.first_failure(FP32_RULE) == "layers.1.mlp"  # the scale-free rule names it
    assert [r.name for r in report.rules] == ["vendor", "fp32", "CANN tool"]
    assert "CANN tool" in report.to_text().splitlines()[1]  # its own column


def test_gelu_fault_needs_a_dense_mlp():
    moe = GPT(GPTConfig(**CONFIG, mlp="moe", n_experts=4, experts_per_token=2)).eval()
    with pytest.raises(ValueError, match="dense SwiGLU"):
        make_broken_port(moe, "gelu_mlp", layer=0)
