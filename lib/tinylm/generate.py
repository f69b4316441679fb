"""Text generation: sampling (temperature, top-k, top-p), the KV-cache loop, and streaming.

    ids = generate(model, tokenizer.encode("Once upon a time"), 50, temperature=0.8, seed=0)
    for token in stream(model, prompt, 50, top_p=0.9): print(tokenizer.decode([token]), end="")

Generation runs in two phases. *Prefill* reads the whole prompt in one forward (a big,
compute-bound matmul over T tokens) and fills the KV cache. *Decode* then feeds one token per
step: each step attends to the cached keys/values instead of recomputing them, so it costs
O(context) attention instead of O(context^2), but it multiplies every weight matrix by a
single vector, which is why decode is bound by memory bandwidth and per-op overhead rather
than by arithmetic. `prefill` and `decode_step` are exposed so that notebooks and the
profiler can time the two phases separately; `stream` and `generate` are built on them.

The sampling pieces (`sampling_distribution`, `sample_next`) are pure functions of the
logits, so a notebook can plot what temperature, top-k and top-p do to a distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor

from tinylm.attention import KVCache
from tinylm.model import GPT
from tinylm.util import is_int, is_number

#: A prompt: one sequence of token ids, or a batch of them (a list of sequences or [B, T]).
Prompt = Sequence[int] | Sequence[Sequence[int]] | Tensor

# ----------------------------------------------------------------------------- sampling


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not is_number(temperature, real=True) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy, 1 = the model's own "
            f"distribution), got {temperature!r}."
        )
    if top_k is not None and (not is_int(top_k, integral=True) or top_k < 1):
        raise ValueError(f"top_k must be None (off) or an integer >= 1, got {top_k!r}.")
    if top_p is not None and (not is_number(top_p, real=True) or not 0 < top_p <= 1):
        raise ValueError(
            f"top_p must be None (off) or a number in (0, 1], got {top_p!r}; 0.9 is typical."
        )


def _filtered_logits(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    """Scale by 1/temperature, then set every logit outside top-k and top-p to -inf."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # Scatter the k winners into -inf rather than masking `logits < kth value`: with ties
        # at the k-th value a threshold would keep more than k candidates.
        values, idx = torch.topk(logits, top_k)
        logits = torch.full_like(logits, -math.inf).scatter_(-1, idx, values)
    if top_p is not None and top_p < 1:
        # Nucleus: walk the tokens from most to least likely and keep them until the mass
        # kept reaches top_p, i.e. drop a token if the mass before it already reaches top_p.
        # The first token has mass 0 before it, so at least one token always survives.
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = F.pad(probs.cumsum(-1)[..., :-1], (1, 0))
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, -math.inf)
        logits = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    return logits


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Next token ids [B] from logits [B, V], arguments already checked (the hot path)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(_filtered_logits(logits, temperature, top_k, top_p), dim=-1)
    # Exponential race: with E_i ~ Exp(1), argmax_i p_i / E_i is i with probability p_i.
    # This is what torch.multinomial does for one sample (same random stream, same tokens),
    # minus its input check, which costs a device->host sync every step on a GPU.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


def sampling_distribution(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The probabilities [..., V] that sampling draws the next token from, given logits [..., V].

    Order as in Hugging Face: divide by temperature, keep the top_k most likely tokens, then
    keep the smallest most-likely set whose probability reaches top_p; renormalise.
    temperature = 0 is greedy decoding: all mass on the argmax.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(_filtered_logits(logits, temperature, top_k, top_p), dim=-1)


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token id per row of logits [B, V] (or [V]) -> LongTensor [B] (or a scalar).

    temperature = 0 takes the argmax. `generator` (on the logits' device) makes the draw
    reproducible; None uses torch's global random state.
    """
    _check_sampling(temperature, top_k, top_p)
    if logits.dim() == 1:
        return _sample(logits[None], temperature, top_k, top_p, generator)[0]
    return _sample(logits, temperature, top_k, top_p, generator)


# ----------------------------------------------------------------------------- prompts


def _model_device(model: GPT) -> torch.device:
    return model.lm_head.weight.device


def _as_batch(model: GPT, prompt_ids: Prompt) -> tuple[Tensor, Tensor | None, bool]:
    """(ids [B, T], left-padding mask [B, T] or None, whether the input was a batch)."""
    device = _model_device(model)
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() not in (1, 2) or prompt_ids.is_floating_point():
            raise ValueError(
                f"prompt_ids must be integer token ids shaped [T] or [batch, T], got a "
                f"{prompt_ids.dtype} tensor of shape {tuple(prompt_ids.shape)}."
            )
        batched = prompt_ids.dim() == 2
        rows = list(prompt_ids) if batched else [prompt_ids]
    else:
        seq = list(prompt_ids)
        is_id = [isinstance(x, Integral) or (isinstance(x, Tensor) and x.dim() == 0) for x in seq]
        batched = len(seq) > 0 and not is_id[0]
        if batched and any(is_id):
            raise ValueError("prompt_ids mixes token ids and lists; pass one or the other.")
        rows = seq if batched else [seq]
    rows = [torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in rows]
    for b, row in enumerate(rows):
        if row.numel() == 0:
            where = f"prompt {b} of the batch" if batched else "the prompt"
            raise ValueError(
                f"{where} is empty; give at least one token id (e.g. tokenizer.eot_id to start "
                "a fresh text)."
            )
    if not rows:
        raise ValueError("prompt_ids is an empty batch; give at least one prompt.")
    # Left padding: each row's last token sits in the last column, so one decode step serves
    # every row and (RoPE being relative) each row computes what it would compute alone.
    T = max(len(row) for row in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    pad_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        idx[b, T - len(row) :], pad_mask[b, T - len(row) :] = row, True
    V = model.config.vocab_size
    if int(idx.min()) < 0 or int(idx.max()) >= V:
        bad = idx[pad_mask & ((idx < 0) | (idx >= V))][0].item()
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary 0..{V - 1}; was the prompt "
            "encoded with the tokenizer this model was trained with?"
        )
    pad_mask = None if bool(pad_mask.all()) else pad_mask.to(device)
    return idx.to(device), pad_mask, batched


# ----------------------------------------------------------------------------- prefill, decode


def prefill(model: GPT, prompt_ids: Prompt, max_len: int | None = None) -> tuple[Tensor, KVCache]:
    """Read the prompt in one forward: (next-token logits [B, V], the filled KV cache).

    prompt_ids: one prompt or a batch (left-padded here). max_len: positions the cache holds,
    prompt included (default: the model's context_length).
    """
    idx, pad_mask, _ = _as_batch(model, prompt_ids)
    return _prefill(model, idx, pad_mask, max_len)


def _prefill(
    model: GPT, idx: Tensor, pad_mask: Tensor | None, max_len: int | None
) -> tuple[Tensor, KVCache]:
    # Allocated outside inference_mode, so the cache stays a normal tensor that a notebook can
    # also fill with plain model(...) calls; writing into it inside inference_mode is allowed.
    cache = model.new_cache(idx.shape[0], max_len)
    with torch.inference_mode():
        logits = model(idx, cache=cache, pad_mask=pad_mask)[:, -1]
    return logits, cache


def decode_step(model: GPT, token: Tensor | int, cache: KVCache) -> Tensor:
    """Feed one new token per row (LongTensor [B] or an int) through the cache: logits [B, V]."""
    if not isinstance(token, Tensor):
        token = torch.tensor([token], device=_model_device(model))
    with torch.inference_mode():
        return model(token.view(-1, 1), cache=cache)[:, -1]


# ----------------------------------------------------------------------------- the loop


def _token_steps(
    model: GPT,
    idx: Tensor,
    pad_mask: Tensor | None,
    max_new_tokens: int,
    pick: Callable[[Tensor], Tensor],
    use_cache: bool,
) -> Iterator[Tensor]:
    """Yield the next token ids [B] (a device tensor) once per step: the one decode loop.

    Yields before computing the following forward, so a consumer that times the first yield
    measures prefill + sampling only. The caller has checked the lengths: without a sliding
    window the whole sequence fits the context, so the cache never fills up.
    """
    if max_new_tokens == 0:
        return
    ctx = model.config.context_length
    B, T = idx.shape
    total = T + max_new_tokens
    was_training = model.training
    model.eval()
    try:
        # Preallocated once: prompt + new tokens, and which columns are real tokens.
        seq = torch.empty(B, total, dtype=torch.long, device=idx.device)
        seq[:, :T] = idx
        valid = None
        if pad_mask is not None:
            valid = torch.ones(B, total, dtype=torch.bool, device=idx.device)
            valid[:, :T] = pad_mask
        cache = None
        if use_cache:
            # The last new token is never fed back, so total - 1 positions suffice.
            logits, cache = _prefill(model, idx, pad_mask, max(T, min(total - 1, ctx)))
        else:
            with torch.inference_mode():
                logits = model(idx, pad_mask=pad_mask)[:, -1]
        with torch.inference_mode():
            token = pick(logits)
        for L in range(T, total):
            yield token
            if L + 1 == total:
                return
            # One inference_mode block per step, never open across a yield: grad mode is
            # thread-local, and the consumer's code between tokens must not run inside it.
            with torch.inference_mode():
                seq[:, L] = token
                if cache is not None and cache.pos < cache.max_len:
                    logits = decode_step(model, token, cache)
                else:
                    # No cache (the baseline), or sliding window with a full cache: drop the
                    # cache and recompute the last ctx tokens from scratch every step.
                    cache = None
                    lo = max(0, L + 1 - ctx)
                    window_mask = None if valid is None else valid[:, lo : L + 1]
                    logits = model(seq[:, lo : L + 1], pad_mask=window_mask)[:, -1]
                token = pick(logits)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class GenerationOptions:
    """How `generate` and `stream` produce tokens (their keyword arguments, checked once).

    See `generate` for what each field means.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    use_cache: bool = True
    stop_token: int | None = None
    sliding_window: bool = False

    def __post_init__(self) -> None:
        # Checked up front, so errors appear at the call, not mid-stream.
        _check_sampling(self.temperature, self.top_k, self.top_p)
        n = self.max_new_tokens
        if not is_int(n, integral=True):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}.")
        if n < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {n}.")
        stop = self.stop_token
        if stop is not None and not is_int(stop, integral=True):
            raise ValueError(f"stop_token must be None or one token id (an int), got {stop!r}.")


def _prepare(
    model: GPT, prompt_ids: Prompt, opts: GenerationOptions
) -> tuple[Tensor, Tensor | None, bool, Callable[[Tensor], Tensor]]:
    """The prompt as a left-padded batch, its mask, whether it was a batch, and the sampler."""
    idx, pad_mask, batched = _as_batch(model, prompt_ids)
    ctx, T, max_new_tokens = model.config.context_length, idx.shape[1], opts.max_new_tokens
    if opts.sliding_window:
        idx = idx[:, -ctx:]  # the window would drop these first tokens anyway
        pad_mask = None if pad_mask is None else pad_mask[:, -ctx:]
    elif T + max_new_tokens > ctx:
        room = (
            f"at most {ctx - T} new tokens fit after this prompt"
            if T < ctx
            else f"the prompt alone fills it, keep at most its last {ctx - 1} tokens"
        )
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} = {T + max_new_tokens} "
            f"tokens does not fit the model's context_length={ctx} ({room}). Shorten the prompt "
            "or max_new_tokens, or pass sliding_window=True to keep only the last "
            f"{ctx} tokens (slower: past the window it recomputes instead of using the KV cache)."
        )
    generator = None
    if opts.seed is not None and opts.temperature > 0:
        generator = torch.Generator(device=idx.device).manual_seed(opts.seed)
    pick = lambda logits: _sample(logits, opts.temperature, opts.top_k, opts.top_p, generator)
    return idx, pad_mask, batched, pick


def stream(
    model: GPT,
    prompt_ids: Prompt,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_token: int | None = None,
    sliding_window: bool = False,
) -> Iterator[int] | Iterator[list[int | None]]:
    """Yield new token ids one step at a time (arguments as in `generate`).

    One prompt: yields ints. A batch: yields one list per step with an id per row, None
    for rows that have stopped. The stop token itself is not yielded. Arguments are checked
    at the call; the model is in eval mode while the stream is being consumed.
    """
    opts = GenerationOptions(
        max_new_tokens, temperature, top_k, top_p, seed, use_cache, stop_token, sliding_window
    )
    idx, pad_mask, batched, pick = _prepare(model, prompt_ids, opts)

    def tokens() -> Iterator:
        done = [False] * idx.shape[0]
        for token in _token_steps(model, idx, pad_mask, max_new_tokens, pick, use_cache):
            ids = token.tolist()  # the one device->host sync per step
            for b, t in enumerate(ids):
                done[b] = done[b] or t == stop_token
            if all(done):
                return
            if not batched:
                yield ids[0]
            else:
                yield [None if d else t for t, d in zip(ids, done, strict=True)]

    return tokens()


def generate(
    model: GPT,
    prompt_ids: Prompt,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_token: int | None = None,
    sliding_window: bool = False,
) -> list[int] | list[list[int]]:
    """Continue the prompt(s) by up to max_new_tokens tokens; return the new token ids.

    prompt_ids: one prompt (list of ids or 1-D tensor) -> list[int], or a batch (list of
        lists of any lengths, or a [B, T] tensor) -> list[list[int]]. Batched prompts are
        left-padded and masked; greedy results equal running each prompt alone.
    temperature, top_k, top_p: see `sampling_distribution`; temperature=0 is greedy.
    seed: makes sampling reproducible (a torch.Generator on the model's device); None
        draws from torch's global random state. In a batch, each row's draws depend on the
        batch, so sampled (not greedy) rows differ from running them alone.
    use_cache: False recomputes the whole sequence every step (the baseline without a KV
        cache; same tokens, much slower).
    stop_token: a row ends when it samples this id (not included in its output); the batch
        ends when every row has.
    sliding_window: let prompt + max_new_tokens exceed context_length by keeping only the
        last context_length tokens. Once the window slides, the KV cache is dropped and every
        step recomputes the window from scratch: the cached keys/values were computed while
        the tokens that just left the window were still visible, so they are no longer valid.
    """
    opts = GenerationOptions(
        max_new_tokens, temperature, top_k, top_p, seed, use_cache, stop_token, sliding_window
    )
    idx, pad_mask, batched, pick = _prepare(model, prompt_ids, opts)
    B = idx.shape[0]
    steps: list[Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for token in _token_steps(model, idx, pad_mask, max_new_tokens, pick, use_cache):
        steps.append(token)
        # Without a stop token the loop never waits for the device; with one, one sync per
        # step tells us whether every row has stopped.
        if stop_token is not None:
            done |= token == stop_token
            if bool(done.all()):
                break
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(B)]
    if stop_token is not None:
        rows = [row[: row.index(stop_token)] if stop_token in row else row for row in rows]
    return rows if batched else rows[0]
