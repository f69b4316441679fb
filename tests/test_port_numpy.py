"""The NumPy-only runtime: no torch import, parity with the PyTorch model, KV cache, int8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import TINY, make_model, torch_logits

from tinylm import checkpoint
from tinylm.generate import generate
from tinylm.model import GPT
from tinylm.port.numpy_runtime import NumpyLM, activation_names
from tinylm.quant_model import quantize_model, save_quantized
from tinylm.tokenizer import BPETokenizer

VARIANTS = {
    "mha": TINY,
    "gqa": {**TINY, "attention": "gqa", "n_kv_head": 2},
    "mqa": {**TINY, "attention": "mqa", "tie_embeddings": True},
    "mla": {**TINY, "attention": "mla", "q_lora_rank": 16},
    "moe": {**TINY, "mlp": "moe", "n_experts": 4, "experts_per_token": 2},
    "default": {},  # the workbook's default shape (4 layers, 128 wide, vocab 1024)
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[GPT, Path]]:
    """Each variant saved once with the real tinylm.checkpoint.save (+ a tokenizer)."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = BPETokenizer.train("the cat sat on the mat. the dog sat on the log. " * 4, 262)
    out = {}
    for name, cfg in VARIANTS.items():
        model = make_model(cfg)
        out[name] = (model, checkpoint.save(root / name, model, tok))
    return out


def test_importing_the_runtime_does_not_import_torch(saved):
    """A port target has no torch: loading and generating must not pull it in."""
    _, path = saved["mha"]
    code = (
        "import sys\n"
        "import tinylm.port.numpy_runtime as rt\n"
        "from tinylm.port import NumpyLM\n"
        "assert NumpyLM is rt.NumpyLM\n"
        "assert 'torch' not in sys.modules, 'import pulled in torch'\n"
        f"lm = rt.NumpyLM.load({str(path)!r})\n"
        "print(lm.generate([1, 2, 3], 4, temperature=0))\n"
        "assert 'torch' not in sys.modules, 'load/generate pulled in torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_torch(saved, variant):
    model, path = saved[variant]
    lm = NumpyLM.load(path)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 24))
    out = lm.logits(ids)
    assert out.dtype == np.float32 and out.shape == (2, 24, model.config.vocab_size)
    assert np.abs(out - torch_logits(model, ids)).max() <= 1e-5
    # one sequence in, [T, V] out
    np.testing.assert_allclose(lm.logits(ids[0]), out[0], atol=1e-6)


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "moe"])
def test_kv_cache_decode_equals_full_recompute(saved, variant):
    model, path = saved[variant]
    lm = NumpyLM.load(path)
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (3, 20))
    full = lm.logits(ids)
    cache = lm.new_cache(3)
    parts = [lm.forward(ids[:, :11], cache)]
    parts += [lm.forward(ids[:, t : t + 1], cache) for t in range(11, 20)]
    assert cache.pos == 20
    assert np.abs(np.concatenate(parts, axis=1) - full).max() <= 1e-5
    prompt = ids[0, :5].tolist()
    assert lm.generate(prompt, 12, temperature=0) == lm.generate(
        prompt, 12, temperature=0, use_cache=False
    )


@pytest.mark.parametrize("variant", ["gqa", "mla", "moe"])
def test_greedy_generation_matches_tinylm_generate(saved, variant):
    """Batch 1 and a ragged batch (left padding) give PyTorch's greedy tokens."""
    model, path = saved[variant]
    lm = NumpyLM.load(path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 9, 6)]
    assert lm.generate(prompts[1], 10, temperature=0) == generate(
        model, prompts[1], 10, temperature=0
    )
    assert lm.generate(prompts, 10, temperature=0) == generate(model, prompts, 10, temperature=0)


def test_load_reads_config_and_tokenizer(saved):
    model, path = saved["mha"]
    lm = NumpyLM.load(path)
    assert lm.config == model.config.to_dict()
    assert lm.tokenizer.decode(lm.tokenizer.encode("the cat")) == "the cat"
    assert lm.nbytes() == sum(t.numel() * 4 for t in model.state_dict().values())


def test_trace_names_and_values(saved):
    model, path = saved["mha"]
    acts = NumpyLM.load(path).trace([5, 6, 7, 8])
    assert list(acts) == activation_names(model.config.n_layer)
    assert acts["layers.1"].shape == (1, 4, 32)
    np.testing.assert_allclose(
        acts["logits"][0], torch_logits(model, np.array([[5, 6, 7, 8]]))[0], atol=1e-6
    )


def test_sampling_is_seeded_and_top_k_1_is_greedy(saved):
    _, path = saved["mha"]
    lm = NumpyLM.load(path)
    a = lm.generate([1, 2, 3], 15, temperature=1.0, seed=7)
    assert a == lm.generate([1, 2, 3], 15, temperature=1.0, seed=7)
    assert lm.generate([1, 2, 3], 15, top_k=1, seed=1) == lm.generate([1, 2, 3], 15, temperature=0)
    greedy = lm.generate([1, 2, 3], 15, temperature=0)
    assert (
        lm.generate([1, 2, 3], 15, temperature=0, stop_token=greedy[4])
        == greedy[: greedy.index(greedy[4])]
    )


# ----------------------------------------------------------------------------- int8


@pytest.mark.parametrize("variant", ["default", "moe"])
def test_int8_at_load_matches_quantize_model(saved, variant):
    """Stated bound: equal to PyTorch's quantize_model(model, "int8") to float32 rounding, and
    cosine similarity > 0.999 with the float32 logits."""
    model, path = saved[variant]
    lm8 = NumpyLM.load(path, quantize="int8")
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (2, 16))
    out = lm8.logits(ids)
    assert np.abs(out - torch_logits(quantize_model(model, "int8"), ids)).max() <= 1e-5
    ref = torch_logits(model, ids).ravel()
    cos = out.ravel() @ ref / (np.linalg.norm(out) * np.linalg.norm(ref))
    assert cos > 0.999
    assert lm8.nbytes() < 0.6 * NumpyLM.load(path).nbytes()


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_reads_save_quantized_checkpoints(saved, tmp_path, scheme):
    model, _ = saved["gqa"]
    qmodel = quantize_model(model, scheme, include_head=True)
    lm = NumpyLM.load(save_quantized(tmp_path / scheme, qmodel))
    ids = np.random.default_rng(5).integers(0, 97, (1, 12))
    assert np.abs(lm.logits(ids) - torch_logits(qmodel, ids)).max() <= 1e-5
    with pytest.raises(ValueError, match="already quantised"):
        NumpyLM.load(tmp_path / scheme, quantize="int8")


# ----------------------------------------------------------------------------- errors


def test_damaged_checkpoint_is_refused(saved, tmp_path):
    _, path = saved["mha"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="manifest"):
        NumpyLM.load(bad)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        NumpyLM.load(tmp_path / "missing")


def test_bad_inputs_are_clear_errors(saved):
    model, path = saved["mha"]
    lm = NumpyLM.load(path)
    with pytest.raises(ValueError, match="does not fit context_length"):
        lm.generate([1] * 40, 20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.generate([1, 500], 2)
    with pytest.raises(ValueError, match="quantize"):
        NumpyLM.load(path, quantize="int3")
    cfg = {**model.config.to_dict(), "attention": "linear"}
    with pytest.raises(NotImplementedError, match="attention"):
        NumpyLM(cfg, {})
