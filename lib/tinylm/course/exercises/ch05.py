"""Checks for notebook 05, "Cheaper architectures".

Each check compares the learner's answer with a reference built from `tinylm.model`,
`tinylm.moe`, `tinylm.attention` and `tinylm.costs`, on inputs chosen so that the typical
mistakes (caching query heads instead of key/value heads, caching a key AND a value for
MLA's latent, forgetting MLA's decoupled RoPE key, the router or the shared experts,
counting every expert as active, treating a token's k picks as independent draws,
up-projecting the cached latents in the "absorbed" path) give a different answer, and the
hint names the mistake it recognised.
"""

from __future__ import annotations

from typing import Any

from tinylm.course.exercises.core import (
    Fail,
    call,
    case_seed,
    check_cases,
    exercise,
    expect_close,
    first_matching_hint,
    is_close,
    log_forwards,
    unseen,
)

# torch and tinylm.model are imported inside the functions: listing the exercises of all
# chapters should not pay for importing torch.


def _num(value: Any) -> str:
    """A number with thousands separators, or the value's repr if it is not a number."""
    try:
        return f"{value:,}"
    except (TypeError, ValueError):
        return repr(value)


# --------------------------------------------------------------------------- warm-up


def reference_kv_bytes_per_token(config: Any, bytes_per_element: int) -> int:
    """Bytes the KV cache stores per token over all layers, for any attention kind.

    MHA / GQA / MQA: a key and a value per key/value head, 2 * n_layer * n_kv_head * head_dim
    numbers. MLA: one latent of kv_lora_rank numbers plus one decoupled RoPE key of
    rope_head_dim numbers per layer, shared by all heads. Equals
    `tinylm.model.kv_cache_bytes_per_token` for a dtype of that many bytes.
    """
    c = config
    if c.attention == "mla":
        elements = c.n_layer * (c.kv_lora_rank + c.rope_head_dim)
    else:
        elements = 2 * c.n_layer * c.n_kv_head * c.head_dim
    return elements * bytes_per_element


def _kv_bytes_hint(got: Any, expected: Any, args: Any) -> str:
    c, b = args
    L, H, D = c.n_layer, c.n_head, c.head_dim
    if c.attention == "mla":
        r, Dr = c.kv_lora_rank, c.rope_head_dim
        found = first_matching_hint(
            got,
            expected,
            [
                (
                    2 * L * H * D * b,
                    "MLA does not cache per-head keys and values: it caches the latent c_kv "
                    "(kv_lora_rank numbers) and the RoPE key (rope_head_dim numbers) per layer",
                ),
                (
                    2 * L * (r + Dr) * b,
                    "MLA caches ONE latent per token and layer (the keys AND the values are both "
                    "up-projected from it), so there is no factor 2",
                ),
                (
                    L * r * b,
                    "add the decoupled RoPE key: rope_head_dim numbers per layer, shared by all "
                    "heads, are cached next to the latent",
                ),
                (
                    L * (r + H * Dr) * b,
                    "the decoupled RoPE key is shared by all heads: rope_head_dim per layer, "
                    "not per head",
                ),
                (L * (r + Dr), "count bytes, not elements: multiply by bytes_per_element"),
            ],
        )
        return found or "MLA: n_layer × (kv_lora_rank + rope_head_dim) × bytes_per_element"
    found = first_matching_hint(
        got,
        expected,
        [
            (
                2 * L * H * D * b,
                "only the key/value heads are cached (n_kv_head), not the query heads (n_head)",
            ),
            (L * c.n_kv_head * D * b, "a layer caches a key AND a value per head: multiply by 2"),
            (2 * L * c.n_kv_head * D, "count bytes, not elements: multiply by bytes_per_element"),
        ],
    )
    return found or "MHA/GQA/MQA: 2 × n_layer × n_kv_head × head_dim × bytes_per_element"


def _kv_cases() -> list[tuple[tuple[Any, int], int]]:
    from tinylm.model import GPTConfig

    configs = [
        (GPTConfig(), 4),
        (GPTConfig(n_layer=6, n_head=8, n_embd=256, attention="gqa", n_kv_head=2), 2),
        (GPTConfig(n_layer=3, n_head=4, n_embd=64, attention="mqa"), 4),
        (GPTConfig(attention="mla"), 4),
        (GPTConfig(n_layer=5, n_head=8, n_embd=128, attention="mla", kv_lora_rank=24), 2),
        (
            GPTConfig(
                vocab_size=128256, context_length=8192, n_layer=32, n_head=32, n_embd=4096,
                attention="gqa", n_kv_head=8,
            ),
            2,
        ),  # Llama-3-8B in bf16
        (
            GPTConfig(
                vocab_size=129280, context_length=4096, n_layer=61, n_head=128, n_embd=7168,
                attention="mla", kv_lora_rank=512, rope_head_dim=64, q_lora_rank=1536,
            ),
            2,
        ),  # DeepSeek-V3's attention in bf16 (its real head_dim is 128; MLA caches none of it)
    ]  # fmt: skip
    configs += unseen(_random_attention_config)
    return [((c, b), reference_kv_bytes_per_token(c, b)) for c, b in configs]


def _random_attention_config(r: Any) -> tuple[Any, int]:
    """A random (config, bytes_per_element) with MHA, GQA, MQA or MLA, for unseen inputs."""
    from tinylm.model import GPTConfig

    n_head = r.choice((2, 4, 8))
    kind = r.choice(("mha", "gqa", "mqa", "mla"))
    extra: dict[str, Any] = {}
    if kind == "gqa":
        extra["n_kv_head"] = r.choice([d for d in (1, 2, 4) if n_head % d == 0])
    if kind == "mla":
        extra.update(kv_lora_rank=r.choice((8, 16, 24, 32)), rope_head_dim=r.choice((4, 8)))
    config = GPTConfig(
        n_layer=r.randint(1, 12), n_head=n_head, n_embd=n_head * 16, attention=kind, **extra
    )
    return config, r.choice((1, 2, 4))


@exercise(
    "ch05.kv_bytes_per_token",
    difficulty="warm-up",
    title="KV-cache bytes per token for MHA, GQA, MQA and MLA",
)
def _check_kv_bytes_per_token(answer: Any) -> str:
    cases = _kv_cases()
    message = check_cases(answer, cases, rel=1e-9, hint=_kv_bytes_hint)
    return f"{message} (MHA, GQA, MQA, MLA, Llama-3-8B and DeepSeek-V3 shapes)"


# --------------------------------------------------------------------------- core: MoE params


def reference_moe_layer_params(config: Any) -> tuple[int, int]:
    """(total, active) weights of one mixture-of-experts MLP layer of a GPTConfig.

    The router is an n_embd x n_experts matrix; every expert (routed or shared) is a SwiGLU
    with three n_embd x expert_hidden matrices (gate, up, down). A token runs the router,
    the shared experts and experts_per_token routed experts; the layer stores all of them.
    """
    c = config
    router = c.n_embd * c.n_experts
    expert = 3 * c.n_embd * c.expert_hidden
    total = router + (c.n_experts + c.n_shared_experts) * expert
    active = router + (c.experts_per_token + c.n_shared_experts) * expert
    return total, active


def _moe_hint(got: Any, expected: Any, args: Any) -> str:
    c = args
    router, expert = c.n_embd * c.n_experts, 3 * c.n_embd * c.expert_hidden
    E, S, k = c.n_experts, c.n_shared_experts, c.experts_per_token
    total, active = expected
    pairs = [
        ((total - router, active - router), "include the router: an n_embd × n_experts matrix"),
        (
            (total - S * expert, active - S * expert),
            "include the shared experts: every token runs them, and the layer stores them",
        ),
        (
            (router + (E + S) * expert * 2 // 3, router + (k + S) * expert * 2 // 3),
            "each expert is a SwiGLU with THREE matrices (gate, up, down) of n_embd × expert_hidden",
        ),
        ((total, total), "active parameters count only experts_per_token routed experts"),
        ((total, router + k * expert), "the shared experts are active for every token"),
        ((total, active - router), "the router runs for every token: it is active too"),
    ]
    try:
        got_pair = (float(got[0]), float(got[1]))
    except (TypeError, ValueError, IndexError, KeyError):
        return "return a pair (total, active), e.g. `return total, active`"
    for (t, a), hint in pairs:
        if (t, a) != (total, active) and is_close(got_pair[0], t) and is_close(got_pair[1], a):
            return hint
    return (
        "total = n_embd × n_experts + (n_experts + n_shared_experts) × 3 × n_embd × expert_hidden; "
        "active: experts_per_token instead of n_experts"
    )


@exercise(
    "ch05.moe_layer_params",
    difficulty="core",
    title="Total and active parameters of a mixture-of-experts layer",
)
def _check_moe_layer_params(answer: Any) -> str:
    from tinylm.model import GPTConfig, _mlp_params

    configs = [
        GPTConfig(mlp="moe"),
        GPTConfig(n_embd=64, n_head=4, mlp="moe", n_experts=4, experts_per_token=1),
        GPTConfig(n_embd=96, n_head=4, mlp="moe", n_experts=16, n_shared_experts=2,
                  experts_per_token=4, expert_hidden=40),
        GPTConfig(n_embd=64, n_head=4, mlp="moe", n_experts=6, n_shared_experts=0),
        GPTConfig(vocab_size=129280, n_layer=61, n_head=128, n_embd=7168, mlp="moe",
                  n_experts=256, n_shared_experts=1, experts_per_token=8, expert_hidden=2048),
    ]  # fmt: skip
    configs += unseen(
        lambda r: (lambda E: GPTConfig(
            n_embd=32 * r.randint(1, 4), n_head=4, mlp="moe", n_experts=E,
            n_shared_experts=r.randint(0, 2), experts_per_token=r.randint(1, E),
            expert_hidden=r.randint(8, 96),
        ))(r.randint(2, 16))
    )  # fmt: skip
    name = getattr(answer, "__name__", "your function")
    for c in configs:
        expected = reference_moe_layer_params(c)
        assert expected == (_mlp_params(c), _mlp_params(c, c.experts_per_token))  # the lib agrees
        got = call(answer, c)
        what = (
            f"{name}(GPTConfig(n_embd={c.n_embd}, n_experts={c.n_experts}, "
            f"n_shared_experts={c.n_shared_experts}, experts_per_token={c.experts_per_token}, "
            f"expert_hidden={c.expert_hidden}))"
        )
        try:
            pair = tuple(got)
        except TypeError:
            pair = None
        if pair is None or len(pair) != 2:
            raise Fail(
                f"{what} returned {got!r}; expected a pair (total, active)",
                hint="return both numbers: `return total, active`",
            )
        if not (is_close(pair[0], expected[0], 1e-9) and is_close(pair[1], expected[1], 1e-9)):
            raise Fail(
                f"{what} gave (total, active) = ({_num(pair[0])}, {_num(pair[1])}); expected "
                f"({expected[0]:,}, {expected[1]:,})",
                hint=_moe_hint(pair, expected, c),
            )
    return f"all {len(configs)} layers match tinylm.model's parameter count (DeepSeek-V3's too)"


# --------------------------------------------------------------------------- core: experts touched


def reference_experts_touched(n_experts: int, experts_per_token: int, tokens: int) -> float:
    """Expected distinct routed experts that `tokens` tokens use in one layer.

    With a balanced router each token picks k of E experts uniformly: a given expert is
    among a token's picks with probability k/E, missed by all `tokens` tokens (independent)
    with probability (1 - k/E)^tokens. Same as `tinylm.costs.expected_experts_touched`.
    """
    E, k = n_experts, experts_per_token
    return E * (1.0 - (1.0 - k / E) ** tokens)


def _touched_hint(got: Any, expected: Any, args: Any) -> str:
    E, k, n = args
    found = first_matching_hint(
        got,
        expected,
        [
            (k * n, "two tokens may pick the same expert: the count cannot grow past n_experts"),
            (
                min(E, k * n),
                "min(n_experts, k × tokens) is the best case (no two tokens share an expert); "
                "ask for the expected value when every token picks at random",
            ),
            (
                E * (1 - (1 - 1 / E) ** (k * n)),
                "a token's k picks are k DIFFERENT experts (top-k), not k independent draws: "
                "a given expert is among them with probability k / n_experts",
            ),
            (E * (1 - k / E) ** n, "that is the expected number of experts NOT touched"),
            (E * (1 - (1 - 1 / E) ** n), "each token picks experts_per_token experts, not one"),
        ],
    )
    return found or (
        "expected count = n_experts × P(a given expert is touched); it is missed by one token "
        "with probability 1 - k/n_experts"
    )


@exercise(
    "ch05.experts_touched",
    difficulty="core",
    title="How many experts does a batch of tokens touch?",
)
def _check_experts_touched(answer: Any) -> str:
    cases = [(8, 2, 1), (8, 2, 4), (8, 2, 64), (64, 6, 10), (256, 8, 1), (256, 8, 32), (4, 4, 3)]
    cases += unseen(
        lambda r: (lambda E: (E, r.randint(1, E), r.randint(1, 512)))(r.randint(2, 256))
    )
    return check_cases(
        answer,
        [(args, reference_experts_touched(*args)) for args in cases],
        rel=1e-6,
        hint=_touched_hint,
    )


# --------------------------------------------------------------------------- stretch: absorbed MLA


def _mla_parts(attn: Any, x: Any, cos: Any, sin: Any) -> tuple[Any, ...]:
    """Queries and cached latent of a full-rank-query MLA layer for x [B, T, C]."""
    from tinylm.attention import apply_rope

    B, T, _ = x.shape
    H, D, Dr, r = attn.n_head, attn.head_dim, attn.rope_head_dim, attn.kv_lora_rank
    q = attn.q_proj(x).view(B, T, H, D + Dr).transpose(1, 2)
    q_nope, q_rope = q.split([D, Dr], dim=-1)
    c_kv, k_rope = attn.kv_a_proj(x).split([r, Dr], dim=-1)
    return q_nope, apply_rope(q_rope, cos, sin), attn.kv_norm(c_kv), apply_rope(k_rope, cos, sin)


def reference_plain_scores(attn: Any, x: Any, cos: Any, sin: Any) -> Any:
    """Pre-softmax attention scores [B, H, T, T] of an MLA layer, the plain way.

    Up-project every cached latent to per-head keys (kv_b_proj), append the shared RoPE key,
    and take scaled dot products with the queries (no mask).
    """
    B, T, _ = x.shape
    H, D, Dr = attn.n_head, attn.head_dim, attn.rope_head_dim
    q_nope, q_rope, c_kv, k_rope = _mla_parts(attn, x, cos, sin)
    k_nope = attn.kv_b_proj(c_kv).view(B, T, H, 2 * D).transpose(1, 2)[..., :D]
    import torch

    q = torch.cat((q_nope, q_rope), dim=-1)
    k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(B, H, T, Dr)), dim=-1)
    return (q @ k.transpose(-2, -1)) * attn.scale


def reference_absorbed_scores(attn: Any, x: Any, cos: Any, sin: Any) -> Any:
    """The same scores computed on the cached latent: W_uk is folded into the query."""
    H, D, r = attn.n_head, attn.head_dim, attn.kv_lora_rank
    q_nope, q_rope, c_kv, k_rope = _mla_parts(attn, x, cos, sin)
    w_uk = attn.kv_b_proj.weight.view(H, 2 * D, r)[:, :D]  # [H, D, r]
    q_lat = q_nope @ w_uk  # [B, H, T, r]
    scores = q_lat @ c_kv.transpose(1, 2).unsqueeze(1) + q_rope @ k_rope.transpose(1, 2).unsqueeze(
        1
    )
    return scores * attn.scale


def _mla_layer(seed: int, **config: Any) -> Any:
    """A small MLA layer with O(1) random weights (so every term of a score matters)."""
    import torch

    from tinylm.model import GPTConfig, MultiHeadLatentAttention

    cfg = GPTConfig(**{"n_embd": 64, "n_head": 4, "attention": "mla", **config})
    torch.manual_seed(seed)
    attn = MultiHeadLatentAttention(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.uniform_(0.5, 1.5)
    return attn.eval(), cfg


def _absorbed_hint(attn: Any, x: Any, cos: Any, sin: Any, got: Any) -> str | None:
    import torch

    plain = reference_plain_scores(attn, x, cos, sin)
    got = torch.as_tensor(got, dtype=plain.dtype)
    if got.shape != plain.shape:
        return None
    _, q_rope, _, k_rope = _mla_parts(attn, x, cos, sin)
    rope_part = (q_rope @ k_rope.transpose(1, 2).unsqueeze(1)) * attn.scale
    candidates = [
        (plain / attn.scale, "scale the scores by attn.scale = 1 / sqrt(head_dim + rope_head_dim)"),
        (plain - rope_part, "add the RoPE part: q_rope · k_rope (the position-dependent term)"),
        (
            rope_part,
            "add the content part: (W_uk_h^T q_nope_h) · c_kv, the query absorbed into latent space",
        ),
    ]
    for value, hint in candidates:
        if torch.allclose(got, value, rtol=1e-4, atol=1e-5):
            return hint
    return None


@exercise(
    "ch05.mla_absorbed_scores",
    difficulty="stretch",
    title="MLA attention scores straight from the cached latent (the absorb trick)",
)
def _check_mla_absorbed_scores(answer: Any) -> str:
    import torch

    from tinylm.attention import rope_tables

    cases = [(0, {}, 1, 7), (1, {"kv_lora_rank": 16, "rope_head_dim": 4}, 2, 5), (2, {}, 1, 1)]
    name = getattr(answer, "__name__", "your function")
    for seed, config, B, T in cases:
        attn, cfg = _mla_layer(seed, **config)
        g = torch.Generator().manual_seed(case_seed(seed))
        x = torch.randn(B, T, cfg.n_embd, generator=g)
        cos, sin = rope_tables(cfg.rope_head_dim, T + 3, cfg.rope_theta)
        cos, sin = cos[3:], sin[3:]  # positions 3 .. T+2: RoPE must use the given tables
        hook = log_forwards(attn, attn.kv_b_proj)
        try:
            with torch.no_grad():
                got = call(answer, attn, x, cos, sin)
        finally:
            hook.remove()
        calls = attn.forwards_seen
        what = (
            f"{name}(attn with kv_lora_rank={cfg.kv_lora_rank}, rope_head_dim="
            f"{cfg.rope_head_dim}, x of shape {tuple(x.shape)}, cos, sin)"
        )
        with torch.no_grad():
            expected = reference_plain_scores(attn, x, cos, sin)
            expect_close(
                got,
                expected,
                rel=1e-4,
                abs_tol=1e-5,
                what=what,
                hint=lambda got, e, a, attn=attn, x=x, cos=cos, sin=sin: _absorbed_hint(
                    attn, x, cos, sin, got
                ),
            )
        if calls:
            raise Fail(
                f"{what} gave the right scores but ran attn.kv_b_proj on the latents: that is "
                "the plain path, which up-projects every cached token at every step",
                hint="use the weight instead: w_uk = attn.kv_b_proj.weight.view(H, 2 * D, r)[:, :D] "
                "and fold it into the query, q_lat = q_nope @ w_uk",
            )
    return f"all {len(cases)} layers: absorbed scores equal the plain ones, no key up-projection"
