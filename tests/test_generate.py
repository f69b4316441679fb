"""Tests of tinylm.generate: sampling filters, KV-cache parity, batching, stop tokens, errors."""

from __future__ import annotations

import math

import pytest
import torch

from tinylm.generate import (
    decode_step,
    generate,
    prefill,
    sample_next,
    sampling_distribution,
    stream,
)
from tinylm.model import GPT, GPTConfig

VOCAB, CTX = 61, 24
ATTENTION = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_head=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4),
    "mla-absorbed": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4),
}
MLP = {"dense": dict(mlp="dense"), "moe": dict(mlp="moe", n_experts=4, experts_per_token=2)}
PROMPTS = [[5, 17, 3, 42, 8, 1, 30], [9], [12, 40, 2, 7]]  # different lengths: left padding


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(attention: str = "mha", mlp: str = "dense", seed: int = 0, sharp: bool = True) -> GPT:
    """A tiny seeded model; sharp=True gives O(1) weights so logits differ clearly.

    With the 0.02 init the logits are almost uniform (good for sampling tests, but a broken
    cache could still pick the same argmax by luck).
    """
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=VOCAB, context_length=CTX, n_layer=2, n_head=4, n_embd=32,
        **ATTENTION[attention], **MLP[mlp],
    )  # fmt: skip
    model = GPT(config)
    if sharp:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                scale = 0.2 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])
                p.copy_((p.dim() == 1) + scale * torch.randn(p.shape, generator=g))
    if attention == "mla-absorbed":
        model.set_mla_absorb(True)
    return model


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- KV cache parity


@pytest.mark.parametrize("mlp", MLP)
@pytest.mark.parametrize("attention", ATTENTION)
def test_cached_greedy_equals_full_recompute_and_batch_equals_alone(attention, mlp):
    model = make(attention, mlp)
    alone = [generate(model, p, 8, temperature=0) for p in PROMPTS]
    for p, tokens in zip(PROMPTS, alone, strict=True):
        assert generate(model, p, 8, temperature=0, use_cache=False) == tokens
    assert generate(model, PROMPTS, 8, temperature=0) == alone
    assert generate(model, PROMPTS, 8, temperature=0, use_cache=False) == alone
    assert len({tuple(t) for t in alone}) > 1  # the model is not degenerate


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mlp", MLP)
@pytest.mark.parametrize("attention", ATTENTION)
def test_cached_logits_equal_full_recompute_logits(attention, mlp, batch):
    """prefill + decode_step logits (padded batch) equal each row's full forward, alone."""
    model = make(attention, mlp).eval()
    prompts = PROMPTS[:batch]
    forced = torch.tensor([[4, 11, 50, 23, 6]] * batch)  # fed tokens, one column a step
    logits, cache = prefill(model, prompts)
    steps = [logits]
    for t in range(forced.shape[1]):
        steps.append(decode_step(model, forced[:, t], cache))
    assert cache.pos == max(map(len, prompts)) + forced.shape[1]
    with torch.no_grad():
        for b, p in enumerate(prompts):
            full = model(torch.tensor([p + forced[b].tolist()]))[0]
            close(torch.stack([s[b] for s in steps]), full[len(p) - 1 :])


def test_prompt_forms_agree():
    model = make()
    p = PROMPTS[0]
    expected = generate(model, p, 4, temperature=0)
    assert generate(model, torch.tensor(p), 4, temperature=0) == expected
    assert generate(model, torch.tensor([p, p]), 4, temperature=0) == [expected, expected]
    assert generate(model, [torch.tensor(p)], 4, temperature=0) == [expected]
    assert generate(model, p, 0) == [] and generate(model, [p, p], 0) == [[], []]


def test_decode_step_accepts_an_int_and_advances_the_cache():
    model = make().eval()
    logits, cache = prefill(model, [3, 4], max_len=5)
    assert logits.shape == (1, VOCAB) and cache.pos == 2 and cache.max_len == 5
    nxt = decode_step(model, 7, cache)
    assert cache.pos == 3
    with torch.no_grad():
        close(nxt[0], model(torch.tensor([[3, 4, 7]]))[0, -1])


# ----------------------------------------------------------------------------- sampling


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    close(sampling_distribution(logits, 1.0), torch.softmax(logits, -1))
    close(sampling_distribution(logits, 2.0), torch.softmax(logits / 2, -1))


def test_temperature_to_zero_is_greedy():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    one_hot = sampling_distribution(logits, 0)
    assert torch.equal(one_hot.argmax(-1), logits.argmax(-1)) and torch.equal(
        one_hot.sum(-1), torch.ones(3)
    )
    close(sampling_distribution(logits, 1e-3), one_hot)
    assert torch.equal(sample_next(logits, 0), logits.argmax(-1))
    model = make()
    greedy = generate(model, PROMPTS, 6, temperature=0)
    assert generate(model, PROMPTS, 6, temperature=1e-4, seed=3) == greedy


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 2.0])
    for k in (1, 2, 3, 4):
        probs = sampling_distribution(logits, 1.0, top_k=k)
        assert int((probs > 0).sum()) == k
        assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)
    kept = sampling_distribution(logits, 1.0, top_k=4) > 0
    assert kept.tolist() == [False, True, True, True, False, True]
    close(sampling_distribution(logits, 1.0, top_k=100), torch.softmax(logits, -1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Hand-computed: sorted probabilities 0.5, 0.3, 0.15, 0.05 (given out of order).
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    for p, kept in [
        (0.45, [1]),
        (0.55, [1, 3]),
        (0.75, [1, 3]),
        (0.85, [0, 1, 3]),
        (1.0, [0, 1, 2, 3]),
    ]:
        out = sampling_distribution(logits, 1.0, top_p=p)
        assert (out > 0).nonzero().flatten().tolist() == kept, p
        expected = torch.zeros(4)
        expected[kept] = probs[kept] / probs[kept].sum()
        close(out, expected)
    # top-k first, then top-p on the renormalised survivors {0.625, 0.375}: 0.625 alone
    # reaches 0.6 (on the original probabilities, 0.5 alone would not).
    out = sampling_distribution(logits, 1.0, top_k=2, top_p=0.6)
    assert (out > 0).nonzero().flatten().tolist() == [1]


def test_sample_next_only_draws_allowed_tokens():
    logits = torch.arange(10.0).repeat(2000, 1)  # token 9 most likely
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, 1.0, top_k=3, generator=g)
    assert drawn.shape == (2000,) and set(drawn.tolist()) == {7, 8, 9}
    assert sample_next(logits[0], 5.0, top_p=0.01).item() == 9


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = make(sharp=False)  # near-uniform logits: sampling really is random
    a = generate(model, PROMPTS[0], 12, seed=1)
    assert generate(model, PROMPTS[0], 12, seed=1) == a
    assert generate(model, PROMPTS[0], 12, seed=2) != a
    assert list(stream(model, PROMPTS[0], 12, seed=1)) == a
    assert generate(model, PROMPTS[0], 12, seed=1, use_cache=False) == a
    batch = generate(model, PROMPTS, 12, seed=5, top_k=20, top_p=0.9)
    assert generate(model, PROMPTS, 12, seed=5, top_k=20, top_p=0.9) == batch


# ----------------------------------------------------------------------------- stream, stop


def test_stream_yields_what_generate_returns():
    model = make("gqa", "moe")
    assert list(stream(model, PROMPTS[0], 8, temperature=0)) == generate(
        model, PROMPTS[0], 8, temperature=0
    )
    steps = list(stream(model, PROMPTS, 8, temperature=0))
    assert [list(row) for row in zip(*steps, strict=True)] == generate(
        model, PROMPTS, 8, temperature=0
    )


def test_stop_token_ends_each_row_independently():
    model = make()
    full = generate(model, PROMPTS, 10, temperature=0)
    stop = full[0][3]  # stop where row 0 first produces it; other rows may never
    out = generate(model, PROMPTS, 10, temperature=0, stop_token=stop)
    expected = [row[: row.index(stop)] if stop in row else row for row in full]
    assert out == expected and len(out[0]) == 3
    assert generate(model, PROMPTS[0], 10, temperature=0, stop_token=stop) == expected[0]
    assert list(stream(model, PROMPTS[0], 10, temperature=0, stop_token=stop)) == expected[0]
    rows = list(zip(*stream(model, PROMPTS, 10, temperature=0, stop_token=stop), strict=True))
    for row, exp in zip(rows, expected, strict=True):
        assert [t for t in row if t is not None] == exp
        assert all(t is None for t in row[len(exp) :])


def test_sliding_window_runs_past_the_context():
    model = make()
    n = CTX + 10
    cached = generate(model, PROMPTS, n, temperature=0, sliding_window=True)
    assert [len(row) for row in cached] == [n] * len(PROMPTS)
    assert (
        generate(model, PROMPTS, n, temperature=0, sliding_window=True, use_cache=False) == cached
    )
    # Until the window slides it is plain generation.
    fits = CTX - len(PROMPTS[0])
    assert cached[0][:fits] == generate(model, PROMPTS[0], fits, temperature=0)
    long_prompt = list(range(CTX + 5))
    assert len(generate(model, long_prompt, 3, temperature=0, sliding_window=True)) == 3


# ----------------------------------------------------------------------------- errors, mode


def test_context_overflow_error_names_the_numbers_and_the_fixes():
    model = make()
    msg = r"prompt of 20 tokens \+ max_new_tokens=10 = 30 .*context_length=24.*at most 4 new"
    with pytest.raises(ValueError, match=msg) as err:
        generate(model, [1] * 20, 10)
    assert "max_new_tokens" in str(err.value) and "sliding_window=True" in str(err.value)
    with pytest.raises(ValueError, match="prompt alone fills it"):
        stream(model, [1] * CTX, 1)  # checked at the call, not at the first token


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k must be None"),
        (dict(top_k=2.5), "top_k must be None"),
        (dict(top_p=0.0), r"top_p must be None .* \(0, 1\]"),
        (dict(top_p=1.5), "top_p must be None"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(stop_token="eot"), "stop_token must be None or one token id"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = dict(max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(make(), [1, 2], **args)


def test_bad_prompts_raise_clear_errors():
    model = make()
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="prompt 1 of the batch is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside .* 0..{VOCAB - 1}"):
        generate(model, [1, VOCAB], 3)
    with pytest.raises(ValueError, match="shaped \\[T\\] or \\[batch, T\\]"):
        generate(model, torch.zeros(1, 1, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="the prompt is empty"):
        prefill(model, [])


def test_model_mode_is_restored_and_no_graph_is_built():
    model = make().train()
    out = generate(model, PROMPTS, 3)
    assert model.training and len(out) == 3
    s = stream(model, PROMPTS[0], 5)
    next(s)
    assert not model.training  # eval while streaming ...
    s.close()
    assert model.training  # ... and restored when the stream ends
    logits, _ = prefill(model, PROMPTS[0])
    assert not logits.requires_grad
