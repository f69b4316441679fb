"""Tests for tinylm.checkpoint: round trip, atomic writes, verification, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from tinylm import checkpoint
from tinylm.checkpoint import CheckpointError
from tinylm.model import GPT, GPTConfig
from tinylm.tokenizer import BPETokenizer
from tinylm.util import sha256_file

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "once upon a time there was a tiny model.<|endoftext|>the tiny model liked to read.<|endoftext|>"


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=300, context_length=16, n_layer=2, n_head=2, n_embd=16)
    return GPTConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(TEXT, 270)


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    """Every test here fails if anything falls back to pickle-based torch.load."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must never be used by tinylm.checkpoint")

    monkeypatch.setattr(torch, "load", refuse)


def logits(model: GPT) -> torch.Tensor:
    idx = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    with torch.no_grad():
        return model.eval()(idx)


def test_round_trip_gives_same_logits_tokenizer_and_meta(tmp_path, tokenizer):
    model = tiny_model()
    meta = {"val_bpb": 1.25, "note": "hello", "history": [{"step": 1, "loss": 3.0}]}
    path = checkpoint.save(tmp_path / "ck", model, tokenizer, meta=meta)
    assert path == tmp_path / "ck"
    loaded, tok, meta2 = checkpoint.load(path, device="cpu")
    assert loaded.config == model.config
    assert torch.equal(logits(loaded), logits(model))
    assert not loaded.training
    assert tok.encode(TEXT) == tokenizer.encode(TEXT)
    assert meta2 == meta
    manifest = json.loads((path / "manifest.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "meta.json"} <= set(
        manifest["files"]
    )


def test_checkpoint_without_tokenizer_loads_none(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model())
    _, tok, meta = checkpoint.load(path, device="cpu")
    assert tok is None and meta == {}


def test_tied_embeddings_are_saved_once_and_stay_tied(tmp_path):
    model = tiny_model(tie_embeddings=True)
    path = checkpoint.save(tmp_path / "ck", model)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) != ("tok_emb.weight" in names)  # exactly one copy
    loaded, _, _ = checkpoint.load(path, device="cpu")
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert torch.equal(logits(loaded), logits(model))


def test_failed_save_keeps_old_checkpoint_and_leaves_no_temp(tmp_path, tokenizer, monkeypatch):
    old = tiny_model(seed=0)
    path = checkpoint.save(tmp_path / "ck", old, tokenizer, meta={"version": "old"})

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    # The crash hits after the weights were written, while the new checkpoint is half done.
    write_json = checkpoint._write_json
    monkeypatch.setattr(checkpoint, "_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(path, tiny_model(seed=1), tokenizer, meta={"version": "new"})
    monkeypatch.setattr(checkpoint, "_write_json", write_json)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no .tmp- or .old- folder
    loaded, _, meta = checkpoint.load(path, device="cpu")
    assert meta == {"version": "old"}
    assert torch.equal(logits(loaded), logits(old))


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model(seed=0), meta={"v": 1})
    new = tiny_model(seed=1)
    checkpoint.save(path, new, meta={"v": 2})
    loaded, _, meta = checkpoint.load(path, device="cpu")
    assert meta == {"v": 2}
    assert torch.equal(logits(loaded), logits(new))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_save_that_races_another_writer_still_succeeds(tmp_path, monkeypatch):
    """Two notebooks saving the same recipe at once: whoever renames last wins, whole."""
    import os

    target = tmp_path / "ck"
    checkpoint.save(target, tiny_model(seed=0), meta={"writer": "old"})
    real_replace = os.replace
    raced = []

    def racing_replace(src, dst):
        # Just before writer A moves its finished folder into place, writer B gets in first.
        if os.fspath(dst) == os.fspath(target) and ".tmp-" in os.fspath(src) and not raced:
            raced.append(True)
            checkpoint.save(target, tiny_model(seed=2), meta={"writer": "B"})
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    a = tiny_model(seed=1)
    checkpoint.save(target, a, meta={"writer": "A"})
    assert raced
    loaded, _, meta = checkpoint.load(target, device="cpu")
    assert meta == {"writer": "A"} and torch.equal(logits(loaded), logits(a))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_missing_folder_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder.*Fix"):
        checkpoint.load(tmp_path / "nope")


def test_missing_manifest_is_an_incomplete_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model())
    (path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        checkpoint.load(path)


def test_missing_file_is_named(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model())
    (path / "config.json").unlink()
    with pytest.raises(
        FileNotFoundError, match="config.json is listed in the manifest but missing"
    ):
        checkpoint.load(path)


def test_truncated_weights_are_detected(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is \d+ bytes.*truncated.*Fix"):
        checkpoint.load(path)


def test_corrupted_weights_fail_the_hash(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model())
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        checkpoint.load(path)


def _rewrite(path, name: str, text: str) -> None:
    """Change a file and update the manifest, as a buggy writer (not a damaged copy) would."""
    (path / name).write_text(text)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {
        "bytes": (path / name).stat().st_size,
        "sha256": sha256_file(path / name),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_config_that_does_not_validate(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model())
    config = json.loads((path / "config.json").read_text())
    config["n_head"] = 3  # does not divide n_embd=16
    _rewrite(path, "config.json", json.dumps(config))
    with pytest.raises(
        CheckpointError, match="config.json does not describe a valid model.*n_head"
    ):
        checkpoint.load(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    model = tiny_model()
    model.config = tiny_config(n_layer=3, n_embd=32)  # writes a config the weights do not fit
    path = checkpoint.save(tmp_path / "ck", model)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    message = str(err.value)
    assert "missing tensors" in message and "blocks.2." in message
    assert "mis-shaped tensors" in message and "tok_emb.weight" in message
    assert "Fix" in message


def test_unexpected_tensor_is_named(tmp_path):
    model = tiny_model(n_layer=3)
    model.config = tiny_config(n_layer=2)
    path = checkpoint.save(tmp_path / "ck", model)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \[blocks\.2\."):
        checkpoint.load(path)


def test_optimizer_and_train_state_round_trip(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(3)
    state = {"step": 7, "history": [{"step": 1}], "generator_state": gen.get_state()}
    path = checkpoint.save(tmp_path / "ck", model, optimizer=opt, train_state=state)

    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    loaded = checkpoint.load_train_state(path, fresh)
    assert loaded["step"] == 7 and loaded["history"] == [{"step": 1}]
    assert torch.equal(loaded["generator_state"], gen.get_state())
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, entries in a["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, b["state"][i][key]), (i, key)


def test_train_state_missing_is_a_clear_error(tmp_path):
    path = checkpoint.save(tmp_path / "ck", tiny_model())
    with pytest.raises(FileNotFoundError, match="no training state"):
        checkpoint.load_train_state(path)
