"""Tests for tinylm.recipes: train_recipe / recipe_data / load_or_train, the one home of "train a recipe and save it"."""

from __future__ import annotations

import pytest
import torch

from tinylm import recipes as R

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def test_recipe_data_uses_the_recipes_corpus_and_vocabulary(tiny_recipe):
    corpus, tokenizer, data = R.recipe_data("unit-test")
    assert corpus.n_documents == 20 and tokenizer.vocab_size == tiny_recipe.vocab_size
    assert data.train_bytes + data.val_bytes == corpus.n_bytes
    again = R.recipe_data("unit-test")[2]  # the tokenizer comes from the cache: same tokens
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)


def test_train_recipe_calls_back_every_step_and_saves_what_load_or_train_reuses(
    tiny_recipe, tmp_path, monkeypatch
):
    records = []
    model, tokenizer, meta = R.train_recipe(
        "unit-test", device="cpu", progress=False, callback=records.append
    )
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert meta["recipe"] == tiny_recipe.to_dict() and meta["history"] == records
    assert (tmp_path / "checkpoints" / "unit-test" / "manifest.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the checkpoint train_recipe saved should have been used")

    monkeypatch.setattr(R, "train", no_training)
    loaded, _, loaded_meta = R.load_or_train("unit-test", device="cpu", progress=False)
    assert loaded_meta == meta
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_load_or_train_retrains_when_the_recipe_changes_but_not_its_description(
    tiny_recipe, monkeypatch, capsys
):
    import dataclasses

    R.train_recipe("unit-test", device="cpu", progress=False)
    trained = []
    real_train = R.train
    monkeypatch.setattr(R, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))

    reworded = dataclasses.replace(tiny_recipe, description="reworded prose")
    monkeypatch.setitem(R.RECIPES, "unit-test", reworded)
    R.load_or_train("unit-test", device="cpu", progress=False)
    assert trained == []  # prose only: the checkpoint is reused

    longer = dataclasses.replace(reworded, train=dataclasses.replace(reworded.train, steps=5))
    monkeypatch.setitem(R.RECIPES, "unit-test", longer)
    meta = R.load_or_train("unit-test", device="cpu", progress=False)[2]
    assert trained == [1] and meta["recipe"]["train"]["steps"] == 5
    assert "the recipe changed" in capsys.readouterr().out


def test_train_recipe_is_deterministic(tiny_recipe):
    a = R.train_recipe("unit-test", device="cpu", progress=False)[0]
    b = R.train_recipe("unit-test", device="cpu", progress=False)[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ValueError, match="no recipe named 'nope'.*default"):
        R.train_recipe("nope")
    with pytest.raises(ValueError, match="no recipe named 'nope'"):
        R.recipe_data("nope")


def test_load_or_train_trains_once_then_loads(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe
    model, tokenizer, meta = R.load_or_train("unit-test", device="cpu", progress=False)
    assert (tmp_path / "checkpoints" / "unit-test" / "manifest.json").is_file()
    assert meta["recipe"] == recipe.to_dict()
    assert len(meta["history"]) == 4 and meta["seed"] == 0
    for key in ("val_bpb", "entropy_floor_bpb", "train_time_s", "tokens_per_s", "sample"):
        assert key in meta
    assert tokenizer.vocab_size == model.config.vocab_size

    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been used")

    monkeypatch.setattr(R, "train", no_training)
    model2, _, meta2 = R.load_or_train("unit-test", device="cpu", progress=False)
    assert meta2 == meta
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)


def test_load_or_train_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="no recipe named 'nope'.*default"):
        R.load_or_train("nope")


@pytest.mark.parametrize(
    "name, balance",
    [("moe_unbalanced", "none"), ("moe_aux_loss", "aux_loss"), ("moe_bias_short", "bias")],
)
def test_router_recipes_differ_from_moe_only_in_balance_and_length(name, balance):
    moe, variant = R.RECIPES["moe"], R.RECIPES[name]
    assert variant.model == {**moe.model, "moe_balance": balance}
    assert variant.train.steps == R.ROUTER_STEPS < moe.train.steps
    same = {"lr", "min_lr", "batch_size", "seed", "warmup_steps", "eval_batches"}
    assert all(getattr(variant.train, k) == getattr(moe.train, k) for k in same)
    assert (variant.corpus, variant.vocab_size) == (moe.corpus, moe.vocab_size)


def test_second_seed_recipe_differs_from_dense_only_in_its_seed():
    dense, seed1 = R.RECIPES["dense"], R.RECIPES["dense_seed1"]
    assert seed1.train.seed != dense.train.seed
    assert _what_trains_but_seed(seed1) == _what_trains_but_seed(dense)


def _what_trains_but_seed(recipe):
    d = recipe.to_dict()
    d.pop("description")
    d["train"].pop("seed")
    return d
