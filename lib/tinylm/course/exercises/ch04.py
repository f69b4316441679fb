"""Checks for notebook 04, "Generation and the KV cache".

Each check compares the learner's answer with a reference built from `tinylm.model` /
`tinylm.generate` on inputs chosen so that the typical mistakes (counting query heads
instead of key/value heads, forgetting that K *and* V are cached, dropping the token that
crosses the top-p threshold, reading the weights once per sequence instead of once per
step, feeding the whole sequence every step) give a different answer, and the hint names
the mistake it recognised.
"""

from __future__ import annotations

import math
from typing import Any

from tinylm.course.exercises.core import (
    Fail,
    call,
    case_seed,
    check_cases,
    exercise,
    expect_close,
    expect_equal,
    first_matching_hint,
    log_forwards,
    unseen,
)

# torch and tinylm.model are imported inside the functions: listing the exercises of all
# chapters should not pay for importing torch.


# --------------------------------------------------------------------------- warm-up


def reference_kv_cache_bytes(
    config: Any, context: int, batch_size: int, bytes_per_element: int
) -> int:
    """Bytes of the KV cache of `batch_size` sequences of `context` tokens (MHA/GQA/MQA).

    Every layer stores a key and a value vector per token for each of its n_kv_head
    key/value heads: 2 * n_layer * n_kv_head * head_dim numbers per token. This is
    `tinylm.model.kv_cache_bytes_per_token` times the number of cached tokens.
    """
    c = config
    per_token = 2 * c.n_layer * c.n_kv_head * c.head_dim * bytes_per_element
    return per_token * context * batch_size


def _kv_bytes_hint(got: Any, expected: Any, args: Any) -> str:
    config, context, batch, nbytes = args
    c = config
    mistakes = [
        (expected / 2, "a layer caches a key AND a value per token: multiply by 2"),
        (
            expected * c.n_head / c.n_kv_head,
            "only the key/value heads are cached (n_kv_head), not the query heads (n_head): "
            "in GQA/MQA several query heads share one cached key/value head",
        ),
        (expected / batch, "each sequence of the batch has its own cache: multiply by batch"),
        (expected / c.n_layer, "every layer has its own cache: multiply by n_layer"),
        (expected / nbytes, "count bytes, not elements: multiply by bytes_per_element"),
        (expected * 8, "bytes_per_element is already in bytes; do not multiply by 8 bits"),
        (expected / context, "the cache holds every token of the context: multiply by context"),
    ]
    return first_matching_hint(got, expected, mistakes) or (
        "2 (K and V) × n_layer × n_kv_head × head_dim × bytes_per_element × context × batch"
    )


def _kv_case(r: Any) -> tuple[Any, int, int, int]:
    """A random (config, context, batch_size, bytes_per_element) for the unseen inputs."""
    from tinylm.model import GPTConfig

    n_head = r.choice((2, 4, 8))
    n_kv_head = r.choice([d for d in (1, 2, 4, 8) if n_head % d == 0])
    config = GPTConfig(
        n_layer=r.randint(1, 12), n_head=n_head, n_embd=n_head * r.choice((8, 16, 32)),
        attention="gqa", n_kv_head=n_kv_head,
    )  # fmt: skip
    return config, r.randint(1, 8192), r.randint(1, 8), r.choice((1, 2, 4))


@exercise("ch04.kv_cache_bytes", difficulty="warm-up", title="Bytes of a KV cache")
def _check_kv_cache_bytes(answer: Any) -> str:
    from tinylm.model import GPTConfig

    llama3_8b = GPTConfig(
        vocab_size=128256, context_length=8192, n_layer=32, n_head=32, n_embd=4096,
        attention="gqa", n_kv_head=8,
    )  # fmt: skip
    cases = [
        (GPTConfig(), 256, 1, 4),
        (GPTConfig(n_layer=6, n_head=8, n_embd=256, attention="gqa", n_kv_head=2), 100, 3, 2),
        (GPTConfig(n_layer=3, n_head=4, n_embd=64, attention="mqa"), 50, 4, 4),
        (llama3_8b, 8192, 1, 2),
        (llama3_8b, 131072, 2, 1),
    ]
    cases += unseen(_kv_case)
    name = getattr(answer, "__name__", "your function")
    for config, context, batch, nbytes in cases:
        got = call(answer, config, context, batch, nbytes)
        what = (
            f"{name}(GPTConfig(n_layer={config.n_layer}, n_head={config.n_head}, "
            f"n_kv_head={config.n_kv_head}, head_dim={config.head_dim}), context={context}, "
            f"batch_size={batch}, bytes_per_element={nbytes})"
        )
        expect_close(
            got,
            reference_kv_cache_bytes(config, context, batch, nbytes),
            rel=1e-9,
            what=what,
            hint=_kv_bytes_hint,
            args=(config, context, batch, nbytes),
        )
    return f"all {len(cases)} cases match (MHA, GQA, MQA and a Llama-3-8B shape)"


# --------------------------------------------------------------------------- core: cached step


class ListKVCache:
    """The chapter's hand-built cache: per layer, keys and values [B, n_kv_head, tokens, D].

    The same interface as the notebook's ``SimpleKVCache``: ``append(layer, k, v)`` stores the
    new tokens' keys and values after the cached ones and returns everything stored.
    """

    # When the grader runs the learner's step in its worker process, the cache the step
    # appended to there comes back into this one (see tinylm.course.grading).
    __grading_writeback__ = ("k", "v")

    def __init__(self, n_layer: int) -> None:
        self.k: list[Any] = [None] * n_layer
        self.v: list[Any] = [None] * n_layer

    def append(self, layer: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Store k, v [B, n_kv_head, T, D] of the new tokens; return the layer's whole cache."""
        import torch

        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def _attention_with_cache(
    attn: Any, x: Any, cache: Any, layer: int, pos: int, cos: Any, sin: Any, mistake: str = ""
) -> Any:
    """One attention layer over cached keys and values; ``mistake`` switches in a typical one."""
    import torch
    import torch.nn.functional as F

    from tinylm.layers import apply_rope

    B, T, C = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
    k = attn.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
    v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    start = 0 if mistake == "rope_from_zero" else pos
    q = apply_rope(q, cos[start : start + T], sin[start : start + T])  # positions pos .. pos+T-1
    k = apply_rope(k, cos[start : start + T], sin[start : start + T])
    if mistake != "no_append":
        k, v = cache.append(layer, k, v)  # [B, Hkv, S, D], S = pos + T
    S = k.shape[2]
    visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
    if mistake == "top_left":
        visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril()
    elif mistake == "no_mask":
        visible = torch.ones(T, S, dtype=torch.bool, device=x.device)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=Hkv != H)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def reference_attention_with_cache(
    attn: Any, x: Any, cache: Any, layer: int, pos: int, cos: Any, sin: Any
) -> Any:
    """Attention of T new tokens at positions pos .. pos+T-1 over the cache plus themselves.

    attn: a library attention layer (q/k/v/o projections, n_head, n_kv_head, head_dim);
    x [B, T, C]; cache: has ``append(layer, k, v)`` (see `ListKVCache`); cos, sin: the RoPE
    tables of all positions. Project; rotate q and k by THEIR positions; append k, v to the
    cache; attend over all S = pos + T cached keys with the causal mask offset by pos
    (query i sees keys 0 .. pos + i); heads side by side; o_proj.
    """
    return _attention_with_cache(attn, x, cache, layer, pos, cos, sin)


_CACHED_STEP_MISTAKES = {
    "no_append": "append the new keys and values to the cache and attend over everything it "
    "returns: cache.append(layer, k, v) gives the keys of all tokens so far",
    "rope_from_zero": "rotate the new tokens by THEIR positions, cos[pos : pos + T], not "
    "cos[:T]: the first decode step after a 20-token prompt is at position 20",
    "top_left": "offset the causal mask by the cached tokens: query i sits at position pos + i "
    "and sees keys 0 .. pos + i, so use tril(diagonal=S - T); is_causal=True aligns the mask "
    "to the top-left corner and lets a decode step see only key 0",
    "no_mask": "a chunk of several new tokens needs the causal mask too (the prefill is one)",
}


def _run_cached(step: Any, model: Any, ids: Any, chunks: list[int]) -> list[Any]:
    """Feed ids [B, S] through the model chunk by chunk with `step` as the attention."""
    import torch

    cache, pos, out = ListKVCache(model.config.n_layer), 0, []
    with torch.no_grad():
        for T in chunks:
            x = model.tok_emb(ids[:, pos : pos + T])
            for layer, block in enumerate(model.blocks):
                h = block.attn_norm(x)
                x = x + step(block.attn, h, cache, layer, pos, model.rope_cos, model.rope_sin)
                x = x + block.mlp(block.mlp_norm(x))
            out.append(model.lm_head(model.norm(x)))
            pos += T
    return out


def _random_gpt(seed: int, **shape: Any) -> Any:
    import torch

    from tinylm.config import GPTConfig
    from tinylm.model import GPT

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=97, context_length=48, n_layer=2, n_embd=32, **shape))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # O(1) weights: a wrong mask or position changes the logits clearly
        for p in model.parameters():
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if p.dim() == 1
                else torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            )
    return model.eval()


_CACHED_STEP_CASES = [  # (seed, model shape, chunk lengths: a prefill, decode steps, a chunk of 3)
    (0, dict(n_head=2), [6, 1, 1, 1, 3, 1]),
    (1, dict(n_head=4, attention="gqa", n_kv_head=2), [5, 1, 1, 3]),
    (2, dict(n_head=1), [1, 1, 1, 1]),
]


def reference_chunk_logits(model: Any, ids: Any, chunks: list[int]) -> list[Any]:
    """What every chunk's logits must be: one full forward over the whole sequence, sliced."""
    import torch

    with torch.no_grad():
        full = model(ids)
    return [full[:, p : p + T] for p, T in zip(_starts(chunks), chunks, strict=True)]


@exercise(
    "ch04.attention_with_cache",
    difficulty="core",
    title="One cached step: append to the KV cache, attend over it",
)
def _check_attention_with_cache(answer: Any) -> str:
    import torch

    name = getattr(answer, "__name__", "your function")
    for seed, shape, chunks in _CACHED_STEP_CASES:
        # the case: a small random model and a token sequence fed chunk by chunk
        model = _random_gpt(case_seed(seed), **shape)
        g = torch.Generator().manual_seed(case_seed(seed))
        ids = torch.randint(0, 97, (2, sum(chunks)), generator=g)
        # the reference: a full recompute
        expected = reference_chunk_logits(model, ids, chunks)
        # the learner's step inside the same forward pass
        try:
            got = _run_cached(_shape_checked(answer), model, ids, chunks)
        except Fail as failure:
            hint = failure.hint
            if hint is None and shape.get("n_kv_head", shape["n_head"]) != shape["n_head"]:
                hint = (
                    "with grouped-query attention (n_kv_head < n_head) each cached key/value "
                    "head serves n_head // n_kv_head query heads: pass enable_gqa=True to "
                    "scaled_dot_product_attention (or repeat_interleave k and v)"
                )
            raise Fail(failure.message, hint) from None
        # the comparison, chunk by chunk
        for k, (g, e, p, T) in enumerate(zip(got, expected, _starts(chunks), chunks, strict=True)):
            what = (
                f"the forward pass with {name}, chunk {k} ({T} new token{'s' * (T > 1)} at "
                f"positions {p}..{p + T - 1}, {p} cached before; n_head={model.config.n_head}, "
                f"n_kv_head={model.config.n_kv_head})"
            )
            expect_close(
                g,
                e,
                rel=1e-4,
                abs_tol=1e-4,
                what=what,
                hint=_cached_hint,
                args=(got, model, ids, chunks, k),
            )
    return (
        f"all {len(_CACHED_STEP_CASES)} sequences give the full recompute's logits, chunk by chunk"
    )


def _shape_checked(answer: Any) -> Any:
    """The learner's function, called through `call`, refusing an output of the wrong shape."""

    def step(attn: Any, x: Any, *rest: Any) -> Any:
        out = call(answer, attn, x, *rest)
        if tuple(getattr(out, "shape", ())) != tuple(x.shape):
            raise Fail(
                f"{getattr(answer, '__name__', 'your function')} returned "
                f"{type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))} for x of "
                f"shape {tuple(x.shape)}",
                hint="return the layer's output [B, T, C]: o_proj of the heads side by side",
            )
        return out

    return step


def _starts(chunks: list[int]) -> list[int]:
    return [sum(chunks[:i]) for i in range(len(chunks))]


def _cached_hint(got_chunk: Any, expected: Any, args: Any) -> str | None:
    """Name the typical mistake whose logits the learner's chunks 0..k reproduce."""
    import torch

    got, model, ids, chunks, k = args
    for mistake, hint in _CACHED_STEP_MISTAKES.items():

        def step(*step_args: Any, mistake: str = mistake) -> Any:
            return _attention_with_cache(*step_args, mistake=mistake)

        variant = _run_cached(step, model, ids, chunks)
        if all(
            torch.allclose(torch.as_tensor(g).float(), v, atol=1e-4)
            for g, v in zip(got[: k + 1], variant[: k + 1], strict=True)
        ):
            return hint
    return (
        "project; rotate q and k with cos[pos : pos + T]; k, v = cache.append(layer, k, v); "
        "attend with the mask tril(diagonal=S - T); heads side by side; o_proj"
    )


# --------------------------------------------------------------------------- core: top-p


def reference_top_p_filter(probs: Any, p: float) -> Any:
    """Nucleus filtering: keep the most likely tokens until their mass reaches p, renormalise.

    probs [..., V] sums to 1 along the last dim. Walking from most to least likely, a token
    is dropped when the mass *before* it already reaches p, so the token that crosses p is
    kept and at least one token always survives. Same as
    `sampling_distribution(log(probs), temperature=1, top_p=p)`.
    """
    import torch

    from tinylm.generate import sampling_distribution

    return sampling_distribution(torch.as_tensor(probs).float().log(), 1.0, None, p)


def _top_p_variants(probs: Any, p: float) -> list[tuple[Any, str]]:
    import torch

    sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
    cum = sorted_p.cumsum(-1)

    def back(kept_sorted: Any, renorm: bool = True) -> Any:
        out = torch.zeros_like(probs).scatter(-1, idx, kept_sorted)
        return out / out.sum(-1, keepdim=True) if renorm else out

    kept_right = sorted_p.masked_fill(cum - sorted_p >= p, 0.0)
    kept_le = sorted_p.masked_fill(cum > p, 0.0)
    asc_p, asc_idx = torch.sort(probs, dim=-1)
    asc_kept = asc_p.masked_fill(asc_p.cumsum(-1) - asc_p >= p, 0.0)
    ascending = torch.zeros_like(probs).scatter(-1, asc_idx, asc_kept)
    return [
        (
            back(kept_right, renorm=False),
            "renormalise: divide the kept probabilities by their sum so they add up to 1",
        ),
        (
            back(kept_le),
            "you dropped the token that crosses p (a mask like cumsum <= p). Keep a token "
            "while the mass BEFORE it is still below p: the crossing token stays, and the "
            "most likely token always survives",
        ),
        (
            kept_right / kept_right.sum(-1, keepdim=True),
            "return the probabilities in the vocabulary's order, not sorted: scatter them "
            "back to their token ids",
        ),
        (
            ascending / ascending.sum(-1, keepdim=True),
            "walk from the MOST likely token down (sort descending)",
        ),
    ]


def _top_p_hint(got: Any, expected: Any, args: Any) -> str | None:
    import torch

    probs, p = args
    if getattr(got, "shape", None) is not None and tuple(got.shape) != tuple(expected.shape):
        return "return a tensor with the shape of probs: one probability per token"
    got_t = torch.as_tensor(got).detach().to("cpu", torch.float32)
    for value, hint in _top_p_variants(probs, p):
        if not torch.allclose(value, expected, atol=1e-6) and torch.allclose(
            got_t, value, atol=1e-5
        ):
            return hint
    return (
        "sort descending, cumulative sum; drop a token when the mass before it >= p; "
        "renormalise; put the probabilities back in vocabulary order"
    )


@exercise("ch04.top_p_filter", difficulty="core", title="Top-p (nucleus) filtering")
def _check_top_p_filter(answer: Any) -> str:
    import torch

    g = torch.Generator().manual_seed(case_seed(4))

    def dirichlet(*shape: int, sharp: float = 1.0) -> Any:
        x = torch.rand(*shape, generator=g).pow(sharp)
        return x / x.sum(-1, keepdim=True)

    cases = [
        (torch.tensor([0.6, 0.3, 0.1]), 0.7),  # the crossing token (0.3) must stay
        (torch.tensor([0.1, 0.2, 0.05, 0.4, 0.25]), 0.5),  # unsorted input
        (dirichlet(12, sharp=4.0), 0.9),
        (dirichlet(3, 40, sharp=3.0), 0.8),  # a batch of distributions
        (dirichlet(30), 1.0),  # p = 1 keeps everything
        (dirichlet(20, sharp=4.0), 1e-4),  # tiny p keeps only the most likely token
    ]
    for probs, p in cases:
        expected = reference_top_p_filter(probs, p)
        got = call(answer, probs.clone(), p)
        what = f"{getattr(answer, '__name__', 'your function')}(probs{list(probs.shape)}, p={p})"
        if probs.dim() == 1 and probs.numel() <= 5:
            what = f"{getattr(answer, '__name__', 'your function')}({[round(x, 4) for x in probs.tolist()]}, p={p})"
        expect_close(
            got, expected, rel=1e-4, abs_tol=1e-6, what=what, hint=_top_p_hint, args=(probs, p)
        )
    return f"all {len(cases)} cases match tinylm.generate.sampling_distribution(top_p=p)"


# --------------------------------------------------------------------------- core: bound


def reference_decode_tokens_per_s(
    weight_bytes: float,
    kv_bytes_per_token: float,
    context: int,
    batch_size: int,
    bandwidth: float,
) -> float:
    """Memory-bound ceiling on decode throughput (new tokens per second, whole batch).

    One decode step reads every weight once (shared by the whole batch) plus the KV cache
    of every sequence (batch_size * context * kv_bytes_per_token); at `bandwidth` bytes/s
    it cannot take less than bytes / bandwidth seconds, and it yields batch_size tokens.
    """
    bytes_per_step = weight_bytes + batch_size * context * kv_bytes_per_token
    return batch_size * bandwidth / bytes_per_step


def _decode_bound_hint(got: Any, expected: Any, args: Any) -> str:
    W, kv, ctx, B, bw = args
    mistakes = [
        (
            bw / (W + B * ctx * kv),
            "multiply by batch_size: every step gives one token per sequence",
        ),
        (
            B * bw / (B * W + B * ctx * kv),
            "the weights are read ONCE per step for the whole batch (that is why batching is "
            "almost free in decode), not once per sequence",
        ),
        (B * bw / W, "each step also reads the KV cache: add batch_size × context × kv bytes"),
        (
            B * bw / (W + ctx * kv),
            "every sequence of the batch reads its own KV cache: batch_size × context × kv bytes",
        ),
        (
            (W + B * ctx * kv) / (B * bw),
            "you computed seconds per token; tokens/s is the inverse",
        ),
    ]
    return first_matching_hint(got, expected, mistakes) or (
        "batch_size × bandwidth / (weight_bytes + batch_size × context × kv_bytes_per_token)"
    )


@exercise(
    "ch04.decode_tokens_per_s",
    difficulty="core",
    title="The memory-bound ceiling on decode tokens/s",
)
def _check_decode_tokens_per_s(answer: Any) -> str:
    cases = [
        (16.06e9, 131072, 8192, 1, 3.35e12),  # Llama-3-8B bf16 on an H100, 8k context
        (16.06e9, 131072, 8192, 32, 3.35e12),  # same, batch 32
        (4.0e6, 16384, 128, 8, 50e9),  # a tiny model on a laptop
        (140e9, 327680, 1000, 4, 8.0e12),  # a 70B model on a faster chip
        (1e9, 0, 100, 16, 1e11),  # no KV cache at all (e.g. a state-space model)
    ]
    cases += unseen(
        lambda r: (
            r.uniform(1e6, 2e11),
            r.randint(1, 400_000),
            r.randint(1, 32768),
            r.randint(1, 64),
            r.uniform(5e10, 8e12),
        )  # fmt: skip
    )
    return check_cases(
        answer,
        [(args, reference_decode_tokens_per_s(*args)) for args in cases],
        rel=1e-6,
        hint=_decode_bound_hint,
    )


# --------------------------------------------------------------------------- stretch


def reference_greedy_with_cache(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list:
    """Greedy continuation of one prompt with the KV cache: prefill once, then 1 token/step."""
    import torch

    device = model.lm_head.weight.device
    cache = model.new_cache(1, max_len=len(prompt_ids) + max_new_tokens)
    out: list[int] = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[0, -1]
        for _ in range(max_new_tokens):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]], device=device), cache=cache)[0, -1]
    return out


def _tiny_model(seed: int) -> Any:
    import torch

    from tinylm.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=97, context_length=48, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # sharper logits than at init, so greedy choices are clear-cut
        model.lm_head.weight.mul_(20)
    return model.eval()


@exercise(
    "ch04.greedy_with_cache",
    difficulty="stretch",
    title="A greedy decode loop on the KV cache",
)
def _check_greedy_with_cache(answer: Any) -> str:
    from tinylm.generate import generate

    cases = [(0, [3, 14, 15, 92, 65], 20), (1, [7], 30), (2, list(range(10, 40)), 12)]
    cases += unseen(
        lambda r: (
            r.randint(3, 10**6),
            [r.randrange(97) for _ in range(r.randint(1, 16))],
            r.randint(2, 24),
        ),  # fmt: skip
        n=2,
    )
    for seed, prompt, n in cases:
        model = _tiny_model(seed)
        hook = log_forwards(model, model.tok_emb)  # token positions fed, per forward
        try:
            got = call(answer, model, list(prompt), n)
        finally:
            hook.remove()
        fed = model.forwards_seen
        expected = generate(model, prompt, n, temperature=0)
        what = (
            f"{getattr(answer, '__name__', 'your function')}(model, prompt of {len(prompt)} "
            f"tokens, max_new_tokens={n})"
        )
        got_list = [int(t) for t in got] if hasattr(got, "__iter__") else got
        expect_equal(
            got_list,
            expected,
            what=what,
            hint="prefill the whole prompt once with a fresh model.new_cache(1), then feed only "
            "the token you just picked (shape [1, 1]) with cache=cache; pick argmax of the last "
            "position's logits",
        )
        budget = len(prompt) + n  # prompt once, then one token per step (the last optional)
        if sum(fed) > budget:
            raise Fail(
                f"{what} gave the right tokens but pushed {sum(fed)} token positions through "
                f"the model in {len(fed)} forwards; with a KV cache it needs at most {budget}",
                hint="you recompute the whole sequence every step: after the prefill, feed only "
                "the newest token, the cache already holds the keys and values of the rest",
            )
    return f"all {len(cases)} prompts match generate(temperature=0), one token per decode step"
