"""Tests for tinylm.train: config, schedule, optimizer groups, loop, resume, evaluation, recipes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tinylm import checkpoint
from tinylm import train as T
from tinylm.data import TokenSplits, get_batch
from tinylm.model import GPT, GPTConfig
from tinylm.optim import embedding_tables
from tinylm.train import History, LivePlot, TrainConfig, TrainingDiverged, lr_at, train

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 32
# Timing fields differ between runs by nature; everything else in a record must not.
TIMING = ("elapsed", "tokens_per_s")


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**base, **overrides}))


def learnable_splits(n_train: int = 4000, n_val: int = 600) -> TokenSplits:
    """A sequence a model can learn: token t+1 = (t + 3) mod VOCAB, with 10% random tokens."""
    g = torch.Generator().manual_seed(0)

    def seq(n: int) -> torch.Tensor:
        x = (torch.arange(n) * 3) % VOCAB
        noise = torch.rand(n, generator=g) < 0.1
        return torch.where(noise, torch.randint(0, VOCAB, (n,), generator=g), x).long()

    return TokenSplits(
        train=seq(n_train), val=seq(n_val), train_bytes=2 * n_train, val_bytes=2 * n_val
    )


def small_config(**overrides) -> TrainConfig:
    base = dict(
        steps=12,
        batch_size=4,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=3,
        eval_interval=4,
        eval_batches=2,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def strip_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


# --------------------------------------------------------------------------- config and schedule


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("min_lr", 1.0),  # above lr
        ("warmup_steps", 2000),  # above steps
        ("weight_decay", -0.1),
        ("embedding_lr_scale", 0.0),
        ("embedding_lr_scale", float("nan")),
        ("beta2", 1.0),
        ("grad_clip", 0.0),
        ("eval_interval", 0),
        ("checkpoint_interval", 0),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_round_trips_and_rejects_unknown_keys():
    config = TrainConfig(steps=7, lr=2e-3, warmup_steps=2, block_size=8, grad_clip=None)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys.*'lr_max'"):
        TrainConfig.from_dict({**config.to_dict(), "lr_max": 1.0})


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    config = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, config) for s in range(config.steps)]
    assert lrs[0] == pytest.approx(1e-4)  # lr / warmup_steps
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))  # rising warm-up
    assert lrs[9] == pytest.approx(1e-3)  # peak at the end of warm-up
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # then never rising
    assert lrs[-1] == pytest.approx(1e-4)  # ends exactly at min_lr
    assert lr_at(10_000, config) == pytest.approx(1e-4)  # and stays there


def test_lr_schedule_without_warmup_starts_at_peak():
    config = TrainConfig(steps=5, lr=1e-3, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, config) == pytest.approx(1e-3)
    assert lr_at(2, config) == pytest.approx(0.5e-3)  # halfway through the cosine


def test_weight_decay_only_on_matrices_and_tied_weight_once():
    model = tiny_model(tie_embeddings=True)
    opt = T.make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])  # the RMSNorm gains
    norms = [m.weight for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert {id(p) for p in norms} == {id(p) for p in no_decay["params"]}
    all_params = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len(set(all_params)) == len(list(model.parameters()))


# --------------------------------------------------------------------------- the loop


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embedding_lr_scale_multiplies_the_embeddings_step_only(optimizer):
    x, y = get_batch(learnable_splits().train, 4, 16, torch.Generator().manual_seed(0))
    moved = {}
    for scale in (1.0, 10.0):
        model = tiny_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = TrainConfig(optimizer=optimizer, embedding_lr_scale=scale, weight_decay=0.0)
        opt = T.make_optimizer(model, config)
        T.training_step(model, opt, x, y, lr=1e-3, grad_clip=None)
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lrs[id(model.tok_emb.weight)] == pytest.approx(1e-3 * scale)
        assert all(lr == 1e-3 for i, lr in lrs.items() if i != id(model.tok_emb.weight))
        moved[scale] = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    # Adam's first step moves every weight with a gradient by about lr: 10x the lr, 10x the
    # step for the embedding's rows, and exactly the same step for every other weight.
    used = moved[1.0]["tok_emb.weight"] > 0
    ratio = moved[10.0]["tok_emb.weight"][used] / moved[1.0]["tok_emb.weight"][used]
    assert ratio.median().item() == pytest.approx(10.0, rel=1e-3)
    for name in moved[1.0]:
        if name != "tok_emb.weight":
            assert torch.equal(moved[1.0][name], moved[10.0][name]), name


def test_a_tied_embedding_is_also_the_head_and_keeps_the_common_lr():
    model = tiny_model(tie_embeddings=True)
    opt = T.make_optimizer(model, TrainConfig(embedding_lr_scale=30.0))
    assert all("lr_scale" not in g for g in opt.param_groups)
    assert embedding_tables(model) == []


def test_training_lowers_validation_bpb_and_records_every_step():
    records = []
    history = train(
        tiny_model(),
        learnable_splits(),
        small_config(steps=40, eval_interval=10),
        callback=records.append,
        progress=False,
    )
    assert isinstance(history, History)
    assert records == list(history)
    assert [r["step"] for r in history] == list(range(1, 41))
    steps, bpbs = history.column("val_bpb")
    assert steps == [10, 20, 30, 40]
    assert bpbs[-1] < bpbs[0]
    assert history.final_val_bpb == bpbs[-1]
    for r in history:
        assert r["tokens_seen"] == r["step"] * 4 * 16
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, small_config(steps=40)))
        assert r["aux_loss"] == 0.0  # dense model
        assert math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0


def test_grad_norm_is_recorded_before_clipping():
    history = train(
        tiny_model(), learnable_splits(), small_config(steps=3, grad_clip=1e-6), progress=False
    )
    assert all(r["grad_norm"] > 1e-3 for r in history)


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_history():
    a, b = tiny_model(), tiny_model()
    ha = train(a, learnable_splits(), small_config(), progress=False)
    hb = train(b, learnable_splits(), small_config(), progress=False)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert strip_timing(ha) == strip_timing(hb)
    c = tiny_model()
    train(c, learnable_splits(), small_config(seed=1), progress=False)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)  # the seed picks the batches


@pytest.mark.slow
@pytest.mark.parametrize(
    "mlp, optimizer", [("dense", "adamw"), ("moe", "adamw"), ("dense", "muon"), ("moe", "muon")]
)
def test_resume_is_bit_identical(tmp_path, mlp, optimizer):
    extra = (
        dict(mlp="moe", n_experts=4, experts_per_token=2, moe_balance="bias")
        if mlp == "moe"
        else {}
    )
    # Muon as the default recipe runs it: with the embedding's own, larger learning rate.
    scale = 30.0 if optimizer == "muon" else 1.0
    config = small_config(steps=10, optimizer=optimizer, embedding_lr_scale=scale)
    straight = tiny_model(**extra)
    h_straight = train(straight, learnable_splits(), config, progress=False)

    first = tiny_model(**extra)
    train(
        first,
        learnable_splits(),
        config,
        checkpoint_dir=tmp_path / "run",
        stop_at=5,
        progress=False,
    )
    # A different initialisation: everything must come from the checkpoint.
    resumed = tiny_model(seed=123, **extra)
    h_resumed = train(
        resumed,
        learnable_splits(),
        config,
        checkpoint_dir=tmp_path / "run",
        resume=True,
        progress=False,
    )

    for (name, x), y in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name
    assert strip_timing(h_resumed) == strip_timing(h_straight)
    assert checkpoint.load_train_state(tmp_path / "run")["step"] == 10


@pytest.mark.slow
def test_resume_without_checkpoint_starts_fresh(tmp_path):
    a, b = tiny_model(), tiny_model()
    train(a, learnable_splits(), small_config(), progress=False)
    train(
        b,
        learnable_splits(),
        small_config(),
        checkpoint_dir=tmp_path / "new",
        resume=True,
        progress=False,
    )
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert (tmp_path / "new" / "manifest.json").is_file()


def test_resume_refuses_a_different_model_or_changed_settings(tmp_path):
    train(
        tiny_model(),
        learnable_splits(),
        small_config(),
        checkpoint_dir=tmp_path / "run",
        stop_at=4,
        progress=False,
    )
    with pytest.raises(ValueError, match="different model.*n_embd"):
        train(
            tiny_model(n_embd=32),
            learnable_splits(),
            small_config(),
            checkpoint_dir=tmp_path / "run",
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"TrainConfig differs in \['lr'\]"):
        train(
            tiny_model(),
            learnable_splits(),
            small_config(lr=1e-2),
            checkpoint_dir=tmp_path / "run",
            resume=True,
            progress=False,
        )


def test_periodic_checkpoints_are_loadable(tmp_path):
    config = small_config(steps=6, checkpoint_interval=2)
    model = tiny_model()
    train(model, learnable_splits(), config, checkpoint_dir=tmp_path / "run", progress=False)
    loaded, tokenizer, meta = checkpoint.load(tmp_path / "run", device="cpu")
    assert meta["step"] == 6 and tokenizer is None
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_nan_loss_stops_with_a_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_model()
    forward = model.forward
    calls = {"n": 0}

    def poisoned(idx, *args, **kwargs):
        out = forward(idx, *args, **kwargs)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training step
                out = out * float("nan")
        return out

    model.forward = poisoned
    config = small_config(steps=10, checkpoint_interval=2, eval_interval=100)
    with pytest.raises(TrainingDiverged, match=r"step 5.*loss is nan.*learning rate.*fp16"):
        train(model, learnable_splits(), config, checkpoint_dir=tmp_path / "run", progress=False)
    state = checkpoint.load_train_state(tmp_path / "run")
    assert state["step"] == 4  # the last good one; nothing was written for the bad step
    loaded, _, _ = checkpoint.load(tmp_path / "run", device="cpu")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_keyboard_interrupt_stops_cleanly():
    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    history = train(
        tiny_model(), learnable_splits(), small_config(), callback=interrupt, progress=False
    )
    assert history.interrupted and len(history) == 3


def test_block_size_longer_than_context_is_rejected():
    with pytest.raises(
        ValueError, match="block_size=32 is longer than the model's context_length=16"
    ):
        train(tiny_model(), learnable_splits(), small_config(block_size=32), progress=False)


def test_too_little_validation_data_is_rejected():
    data = dataclasses.replace(learnable_splits(), val=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="val split has 10 tokens"):
        train(tiny_model(), data, small_config(), progress=False)


# --------------------------------------------------------------------------- evaluation


def uniform_model() -> GPT:
    """A model whose logits are all 0: its loss is exactly ln(vocab_size) on any token."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@pytest.mark.parametrize("n_batches", [None, 3])
def test_evaluate_bpb_of_a_uniform_model_is_log2_vocab_over_bytes_per_token(n_batches):
    tokens = torch.randint(0, VOCAB, (203,), generator=torch.Generator().manual_seed(0))
    bpb = T.evaluate_bpb(
        uniform_model(),
        tokens,
        bytes_per_token=2.5,
        block_size=16,
        batch_size=4,
        n_batches=n_batches,
    )
    assert bpb == pytest.approx(math.log2(VOCAB) / 2.5, rel=1e-5)


def test_full_pass_predicts_every_token_once():
    seen = []

    class Recorder(torch.nn.Module):
        config = GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=2, n_embd=16)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            seen.append(idx.clone())
            return torch.zeros(*idx.shape, VOCAB)

    tokens = torch.arange(50) % VOCAB
    T.evaluate_loss(Recorder(), tokens, block_size=16, batch_size=2)
    inputs = torch.cat([x.reshape(-1) for x in seen])
    assert torch.equal(inputs, tokens[:-1])  # inputs 0..48 predict targets 1..49, once each


def test_sampled_evaluation_is_repeatable_and_restores_train_mode():
    model = tiny_model().train()
    tokens = learnable_splits().val
    a = T.evaluate_bpb(model, tokens, 2.0, block_size=16, batch_size=4, n_batches=2, seed=5)
    b = T.evaluate_bpb(model, tokens, 2.0, block_size=16, batch_size=4, n_batches=2, seed=5)
    assert a == b and model.training


# --------------------------------------------------------------------------- live plot


def test_live_plot_collects_records_and_draws_headless():
    plot = LivePlot(entropy_floor=0.5)
    history = train(
        tiny_model(), learnable_splits(), small_config(steps=8), callback=plot, progress=False
    )
    assert plot.records == list(history)
    fig = plot.figure()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "bits per byte"
    assert len(ax.lines) == 4  # raw train, smoothed train, validation, entropy floor


# --------------------------------------------------------------------------- whole-story evaluation


@pytest.fixture(scope="module")
def story_tokenizer():
    from tinylm.data import EOT
    from tinylm.stories import generate_stories
    from tinylm.tokenizer import BPETokenizer

    text = "".join(story + EOT for story, _ in generate_stories(30, seed=1))
    return BPETokenizer.train(text, 300)


def _story_bpb_by_hand(model, tokenizer, texts) -> float:
    """Each target scored with all the tokens before it that fit in the context, one at a time."""
    from tinylm.data import EOT

    ctx, nats = model.config.context_length, 0.0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.eot_id, *tokenizer.encode(text), tokenizer.eot_id]
            for t in range(1, len(ids)):
                context = torch.tensor([ids[max(0, t - ctx) : t]])
                logp = model(context)[0, -1].log_softmax(-1)
                nats -= logp[ids[t]].item()
    return nats / math.log(2) / sum(len((s + EOT).encode()) for s in texts)


def test_story_evaluation_scores_every_token_once_from_the_story_start(story_tokenizer):
    from tinylm.stories import generate_stories

    texts = [s for s, _ in generate_stories(3, seed=2)]
    lengths = [len(story_tokenizer.encode(s)) for s in texts]
    # context longer than every story: one row per story, exactly the per-token sum
    torch.manual_seed(0)
    long = GPT(GPTConfig(vocab_size=300, context_length=max(lengths) + 2, n_layer=1, n_head=2, n_embd=16))  # fmt: skip
    want = _story_bpb_by_hand(long, story_tokenizer, texts)
    assert T.evaluate_stories_bpb(long, story_tokenizer, texts, batch_size=2) == pytest.approx(want, rel=1e-5)  # fmt: skip
    # a short context: stride 1 gives every target its full window, as by hand
    torch.manual_seed(0)
    short = GPT(GPTConfig(vocab_size=300, context_length=24, n_layer=1, n_head=2, n_embd=16))
    want = _story_bpb_by_hand(short, story_tokenizer, texts[:1])
    got = T.evaluate_stories_bpb(short, story_tokenizer, texts[:1], stride=1)
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="stride=30"):
        T.evaluate_stories_bpb(short, story_tokenizer, texts, stride=30)
    with pytest.raises(ValueError, match="no stories given"):
        T.evaluate_stories_bpb(short, story_tokenizer, [])


def test_train_is_training_step_repeated_bit_for_bit():
    """train() adds only bookkeeping: the public per-step function gives the same weights."""
    config = small_config(steps=4, eval_interval=100)
    data = learnable_splits()
    trained = tiny_model()
    history = train(trained, data, config, progress=False)

    model = tiny_model().train()
    optimizer = T.make_optimizer(model, config)
    batches = torch.Generator().manual_seed(config.seed)
    block = model.config.context_length
    for step in range(config.steps):
        x, y = get_batch(data.train, config.batch_size, block, batches)
        result = T.training_step(model, optimizer, x, y, lr_at(step, config), config.grad_clip)
        assert result.loss == history[step]["train_loss"]
        assert result.grad_norm == history[step]["grad_norm"]
    for mine, theirs in zip(model.parameters(), trained.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_training_step_refuses_a_nan_loss_before_changing_the_weights():
    model = tiny_model().train()
    optimizer = T.make_optimizer(model, small_config())
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.zeros(2, 8, dtype=torch.long)
    forward = model.forward
    model.forward = lambda idx: forward(idx) * float("nan")
    with pytest.raises(TrainingDiverged, match=r"loss is nan.*learning rate") as err:
        T.training_step(model, optimizer, x, x, lr=1e-3, grad_clip=1.0)
    assert err.value.what == "loss"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
