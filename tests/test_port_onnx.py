"""ONNX export with an explicit KV cache, run in ONNX Runtime: parity, decode, batching."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from tiny_models import TINY, make_model, torch_logits

from tinylm.generate import generate
from tinylm.model import GPT
from tinylm.port.numpy_runtime import activation_names
from tinylm.port.onnx import METADATA_KEY, OnnxLM
from tinylm.port.onnx_export import export_onnx

# Exported with the legacy TorchScript exporter (dynamo=False), which takes well under a
# second; the default dynamo exporter (~10 s, two symbolic traces) is exercised once, on the
# one-layer "mha" model below.
MHA = {**TINY, "n_layer": 1}
VARIANTS = {
    "gqa": {**TINY, "attention": "gqa", "n_kv_head": 2},
    "mla": {**TINY, "attention": "mla", "q_lora_rank": 16},
    "moe": {**TINY, "mlp": "moe", "n_experts": 4, "experts_per_token": 2, "attention": "mqa"},
    "default": {},  # the workbook's default shape
}


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[GPT, OnnxLM]]:
    """Every model exported once for the whole module (export is the slow part)."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    model = make_model(MHA)
    out["mha"] = (model, OnnxLM(export_onnx(model, root / "mha.onnx", activations=True)))
    for name, cfg in VARIANTS.items():
        model = make_model(cfg)
        out[name] = (model, OnnxLM(export_onnx(model, root / f"{name}.onnx", dynamo=False)))
    return out


@pytest.mark.parametrize("variant", ["mha", *VARIANTS])
def test_logits_match_torch(exported, variant):
    model, lm = exported[variant]
    V = model.config.vocab_size
    for B, T in [(2, 24), (1, 1), (3, 5)]:
        ids = np.random.default_rng(B * T).integers(0, V, (B, T))
        out = lm.logits(ids)
        assert out.shape == (B, T, V) and out.dtype == np.float32
        assert np.abs(out - torch_logits(model, ids)).max() <= 1e-5


@pytest.mark.parametrize("variant", ["mha", *VARIANTS])
def test_kv_cache_decode_equals_full_recompute(exported, variant):
    """Prefill (empty past) then one-token steps through present -> past."""
    model, lm = exported[variant]
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, (2, 16))
    full = lm.logits(ids)
    cache = lm.new_cache(2)
    parts = [lm.forward(ids[:, :9], cache)]
    parts += [lm.forward(ids[:, t : t + 1], cache) for t in range(9, 16)]
    assert cache.pos == 16 and cache.arrays[0].shape[2] == 16
    assert np.abs(np.concatenate(parts, axis=1) - full).max() <= 1e-5


@pytest.mark.parametrize("variant", ["mha", "moe", "mla"])
def test_greedy_generation_matches_tinylm_generate(exported, variant):
    """Batch 1 and a ragged batch > 1 (left padding via attention_mask)."""
    model, lm = exported[variant]
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 97, n).tolist() for n in (4, 10, 7)]
    assert lm.generate(prompts[0], 12, temperature=0) == generate(
        model, prompts[0], 12, temperature=0
    )
    assert lm.generate(prompts, 12, temperature=0) == generate(model, prompts, 12, temperature=0)


def test_graph_interface_is_documented_one(exported):
    """Named inputs/outputs, dynamic batch / sequence / past axes, config in the metadata."""
    model, lm = exported["mha"]
    inputs = {i.name: i.shape for i in lm.session.get_inputs()}
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["past.0.value"] == ["batch", 4, "past", 8]
    outputs = {o.name: o.shape for o in lm.session.get_outputs()}
    assert outputs["logits"] == ["batch", "seq", 97]
    assert outputs["present.0.key"][2] in ("past + seq", "seq + past")
    assert lm.config == model.config.to_dict()
    _, mla = exported["mla"]
    assert [i.name for i in mla.session.get_inputs()][2:] == ["past.0.latent", "past.1.latent"]
    assert mla.past_shapes[0] == (1, model.config.n_embd // 2 + 4)  # kv_lora_rank + rope dim


def test_trace_returns_named_activations(exported):
    model, lm = exported["mha"]
    acts = lm.trace([3, 1, 4, 1, 5])
    assert list(acts) == activation_names(model.config.n_layer)
    _, plain = exported["gqa"]
    with pytest.raises(ValueError, match="activations=True"):
        plain.trace([1, 2])


def test_onnx_runtime_side_needs_no_torch(exported):
    """The deployment side (OnnxLM) runs where only onnxruntime and NumPy are installed."""
    _, lm = exported["gqa"]
    code = (
        "import sys\n"
        "from tinylm.port.onnx import OnnxLM\n"
        f"lm = OnnxLM({str(lm.path)!r})\n"
        "print(lm.generate([[1, 2, 3], [4, 5]], 3, temperature=0))\n"
        "assert 'torch' not in sys.modules, 'OnnxLM pulled in torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(lm.generate([[1, 2, 3], [4, 5]], 3, temperature=0))


def test_runs_without_torch_tensors_and_reports_provider(exported):
    _, lm = exported["gqa"]
    assert lm.providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="not in this onnxruntime build"):
        OnnxLM(lm.path, providers=["NoSuchExecutionProvider"])


def test_clear_errors(exported, tmp_path):
    _, lm = exported["gqa"]
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        OnnxLM(tmp_path / "missing.onnx")
    proto = onnx.load(str(lm.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match=METADATA_KEY):
        OnnxLM(tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="does not fit context_length"):
        lm.generate([1] * 40, 10)
