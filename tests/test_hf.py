"""Tests of tinylm.hf: HF Llama-family folders in (logit parity with transformers) and out.

No downloads: tiny random models are built with transformers and saved to tmp_path.
"""

from __future__ import annotations

import json
import math
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from tinylm.config import GPTConfig
from tinylm.generate import generate
from tinylm.hf import HFImportError, HFTokenizer, bpe_to_hf, load_hf, save_hf
from tinylm.model import GPT
from tinylm.tokenizer import BPETokenizer

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=500.0,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) random weights (norm scales too): with the 0.02 init the logits are near-uniform
    and a wrong mapping could pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def hf_model(kind: str = "llama", **overrides):
    """A tiny random transformers model of `kind` (llama, mistral, qwen2), in eval mode."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    return randomize(model_cls(config_cls(**(BASE | overrides)))).eval()


def tokens(batch: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- import parity


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("llama", {}),
        ("llama", dict(tie_word_embeddings=True)),
        ("llama", dict(num_key_value_heads=4)),  # MHA
        ("llama", dict(num_key_value_heads=1)),  # MQA
        ("mistral", dict(sliding_window=None)),
        ("mistral", dict(sliding_window=64)),  # window >= context: exact
    ],
)
def test_logits_match_transformers(tmp_path, kind, overrides):
    reference = hf_model(kind, **overrides)
    reference.save_pretrained(tmp_path)
    model, tokenizer = load_hf(tmp_path)
    assert tokenizer is None  # no tokenizer files in the folder
    assert model.config.tie_embeddings == overrides.get("tie_word_embeddings", False)
    ids = tokens()
    assert_same_logits(our_logits(model, ids), hf_logits(reference, ids))


def test_sharded_checkpoint_loads(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, _ = load_hf(tmp_path)
    ids = tokens()
    assert_same_logits(our_logits(model, ids), hf_logits(reference, ids))


def test_tied_head_ignores_a_stored_lm_head(tmp_path):
    """With tie_word_embeddings HF uses the embedding as the head whatever lm_head holds."""
    reference = hf_model(tie_word_embeddings=True)
    reference.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(path)
    tensors["lm_head.weight"] = torch.zeros(VOCAB, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    model, _ = load_hf(tmp_path)
    assert model.lm_head.weight is model.tok_emb.weight
    ids = tokens()
    assert_same_logits(our_logits(model, ids), hf_logits(reference, ids))


def test_cached_generation_matches_full_recompute_and_transformers(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    prompt = tokens(1, 6)[0].tolist()
    cached = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    # full recompute, one argmax per step with no cache
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(our_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt) :]
    assert generate(model, prompt, max_new_tokens=12, temperature=0.0, use_cache=False) == cached
    theirs = reference.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0
    )[0].tolist()
    assert theirs == ids


def test_context_length_argument_shrinks_the_model(tmp_path):
    hf_model().save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path, context_length=16)
    assert model.config.context_length == 16
    with pytest.raises(HFImportError, match="context_length=100 is outside"):
        load_hf(tmp_path, context_length=100)


def test_bfloat16_load(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = tokens()
    ours = our_logits(model, ids).float()
    theirs = hf_logits(reference, ids)
    # bf16 weights: close, not exact (8 bits of mantissa)
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()


# ----------------------------------------------------------------------------- refusals


def _save_with_config(tmp_path, kind="llama", **config_changes):
    hf_model(kind).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling=.*'yarn'"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"rope_scaling=.*'linear'"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), r"rope_parameters=.*'dyn"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"'llama3' scaling"),  # keys
        (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
        (dict(attention_bias=True), r"attention_bias=true"),
        (dict(mlp_bias=True), r"mlp_bias=true"),
        (dict(head_dim=16), r"head_dim=16"),
        (dict(model_type="gpt2"), r"model_type='gpt2'"),
    ],
)
def test_unsupported_config_fields_are_refused(tmp_path, changes, message):
    with pytest.raises(HFImportError, match=message):
        load_hf(_save_with_config(tmp_path, **changes))


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the tiny model's pairs span all 3 bands
}


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    reference = hf_model(rope_scaling=dict(LLAMA3))
    reference.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    assert model.config.rope_scaling == LLAMA3
    ids = tokens(2, 40)
    theirs = hf_logits(reference, ids)
    assert_same_logits(our_logits(model, ids), theirs)
    plain = GPT(GPTConfig(**(model.config.to_dict() | {"rope_scaling": None})))
    plain.load_state_dict(model.state_dict())
    assert (our_logits(plain.eval(), ids) - theirs).abs().max() > 1e-2  # the scaling matters
    generated = generate(model, ids[0, :8].tolist(), 8, temperature=0)
    assert generated == generate(model, ids[0, :8].tolist(), 8, temperature=0, use_cache=False)
    # export: transformers reads the scaling back from our config.json
    save_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_logits(hf_logits(back, ids), theirs)


def test_llama3_rope_scaling_in_the_numpy_port(tmp_path):
    from tinylm.port import NumpyLM

    hf_model(rope_scaling=dict(LLAMA3)).save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    ids = tokens(1, 40)
    port = NumpyLM.from_model(model).logits(ids[0].numpy())
    torch.testing.assert_close(torch.from_numpy(port), our_logits(model, ids)[0], atol=1e-4, rtol=0)


def test_rope_scaling_config_is_validated():
    base = dict(vocab_size=VOCAB, n_layer=1, n_head=4, n_embd=32)
    with pytest.raises(ValueError, match="only Llama 3's scaling"):
        GPTConfig(**base, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="high_freq_factor must exceed"):
        GPTConfig(**base, rope_scaling=LLAMA3 | {"high_freq_factor": 0.5})
    config = GPTConfig(**base, rope_scaling=dict(LLAMA3))
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_qwen2_biases_are_refused(tmp_path):
    hf_model("qwen2").save_pretrained(tmp_path)
    with pytest.raises(HFImportError, match="Qwen2 adds biases to q_proj/k_proj/v_proj"):
        load_hf(tmp_path)


def test_short_sliding_window_is_refused_with_the_fix(tmp_path):
    hf_model("mistral", sliding_window=16).save_pretrained(tmp_path)
    with pytest.raises(HFImportError, match=r"sliding_window=16 .*context_length=16"):
        load_hf(tmp_path)
    model, _ = load_hf(tmp_path, context_length=16)  # the suggested fix works
    assert model.config.context_length == 16


def test_pickled_weights_are_refused_without_reading_them(tmp_path):
    _save_with_config(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read: a pickle could run code")
    with pytest.raises(HFImportError, match=r"only pickled weights \['pytorch_model.bin'\]"):
        load_hf(tmp_path)


def test_missing_head_and_missing_shard_are_named(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "a" / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFImportError, match="lm_head.weight is absent.*tie_word_embeddings"):
        load_hf(tmp_path / "a")
    reference.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    next((tmp_path / "b").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(HFImportError, match="lists shard"):
        load_hf(tmp_path / "b")


def test_memory_is_checked_before_allocating(tmp_path, monkeypatch):
    hf_model().save_pretrained(tmp_path)

    import tinylm.hf as hf
    import tinylm.util as util

    monkeypatch.setattr(util, "available_memory_bytes", lambda: 1000)  # bytes
    built = []
    monkeypatch.setattr(hf, "GPT", lambda *a: built.append(a))
    with pytest.raises(MemoryError, match="GiB of RAM is available.*bfloat16"):
        load_hf(tmp_path)
    assert built == []  # refused before building the model


def test_not_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(HFImportError, match="neither a folder nor a Hugging Face hub id"):
        load_hf(tmp_path / "does not exist")


def test_hub_id_offline_and_not_cached_fails_fast(tmp_path):
    # A port nobody listens on at 127.0.0.1: the connection is refused at once, as offline.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(HFImportError, match=r"could not get 'nobody/no-such-model'.*local folder"):
        load_hf("nobody/no-such-model", cache_dir=tmp_path, endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 30  # fails, not hangs (generous for a loaded CI box)


# ----------------------------------------------------------------------------- export


def tinylm_model(**overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        **(dict(vocab_size=VOCAB, context_length=32, n_layer=2, n_head=4, n_embd=32) | overrides)
    )
    return randomize(GPT(config)).eval()


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(tie_embeddings=True), dict(attention="gqa", n_kv_head=2), dict(attention="mqa")],
)
def test_export_round_trip_through_transformers(tmp_path, overrides):
    model = tinylm_model(**overrides)
    save_hf(model, None, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = tokens(2, 16)
    assert_same_logits(hf_logits(theirs, ids), our_logits(model, ids))
    back, _ = load_hf(tmp_path / "out")
    assert back.config == model.config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_export_sharded_and_overwrite(tmp_path):
    model = tinylm_model()
    save_hf(model, None, tmp_path / "out")
    save_hf(model, None, tmp_path / "out", max_shard_bytes=20_000)  # replaces the folder
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    back, _ = load_hf(tmp_path / "out")
    ids = tokens(1, 8)
    torch.testing.assert_close(our_logits(back, ids), our_logits(model, ids), atol=0, rtol=0)


def test_export_refuses_what_llama_cannot_express(tmp_path):
    with pytest.raises(HFImportError, match="attention='mla'.*no LlamaForCausalLM equivalent"):
        save_hf(tinylm_model(attention="mla"), None, tmp_path / "x")
    with pytest.raises(HFImportError, match="mlp='moe'"):
        save_hf(tinylm_model(mlp="moe", n_experts=4), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- tokenizer

TEXT = (
    'Once upon a time, a little fox found 123 shiny stones. She said: "I\'ll keep them!"\n\n'
    "The fox's friends   laughed.\tThen they all went home.<|endoftext|>Café naïve résumé. "
)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT * 20, vocab_size=300, pattern="gpt4")


@pytest.mark.parametrize("pattern", ["whitespace", "gpt2", "gpt4"])
def test_bpe_export_encodes_like_tinylm(pattern):
    tok = BPETokenizer.train(TEXT * 20, vocab_size=320, pattern=pattern)
    hf = bpe_to_hf(tok)
    assert hf.vocab_size == tok.vocab_size
    assert hf.eot_id == tok.eot_id
    for text in [TEXT, "unseen words: zebra quizzically 98765 !!", " leading space", "a\n\n\nb"]:
        assert hf.encode(text) == tok.encode(text), text
        assert hf.decode(hf.encode(text)) == text


def test_tokenizer_round_trip_through_a_folder(tmp_path, bpe):
    model = tinylm_model(vocab_size=bpe.vocab_size)
    save_hf(model, bpe, tmp_path / "out")
    back, tok = load_hf(tmp_path / "out")
    assert isinstance(tok, HFTokenizer)
    assert tok.encode(TEXT) == bpe.encode(TEXT)
    assert tok.decode(bpe.encode(TEXT)) == TEXT
    # transformers reads the same tokenizer files
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == bpe.encode(TEXT)
    assert theirs.eos_token_id == bpe.eot_id
    json_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert json_config["eos_token_id"] == bpe.eot_id
