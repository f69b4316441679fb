"""Checks for notebook 02, "A GPT from scratch".

Each check compares the learner's answer with a reference built from `tinylm.model` /
`tinylm.attention` on inputs chosen so that the typical mistakes (counting heads as extra
weights, forgetting the norms, a causal mask aligned to the wrong corner, interleaved RoPE
pairs) give a different answer, and the hint names the mistake it recognised.
"""

from __future__ import annotations

import math
from typing import Any

from tinylm.course.exercises.core import (
    call,
    case_seed,
    check_cases,
    exercise,
    expect_close,
    is_close,
    unseen,
)

# torch and tinylm.model are imported inside the functions: listing the exercises of all
# chapters should not pay for importing torch.


def _ratio(got: Any, expected: Any) -> float:
    return float(got) / float(expected) if expected else math.nan


# --------------------------------------------------------------------------- warm-up


def reference_block_params(n_embd: int, n_head: int, mlp_hidden: int) -> int:
    """Parameters of one pre-norm block of tinylm's GPT (multi-head attention, no biases).

    Attention: q, k, v and o projections, each n_embd x n_embd (the heads split the n_embd
    channels, they do not multiply them, so n_head does not appear). SwiGLU MLP: gate, up
    (n_embd x mlp_hidden) and down (mlp_hidden x n_embd). Two RMSNorm weight vectors.
    """
    C = n_embd
    return 4 * C * C + 3 * C * mlp_hidden + 2 * C


def _block_params_hint(got: Any, expected: Any, args: Any) -> str:
    C, H, hidden = args
    attention, mlp, norms = 4 * C * C, 3 * C * hidden, 2 * C
    mistakes = [
        (attention + mlp, "you left out the two RMSNorm weight vectors (n_embd each)"),
        (
            attention + 2 * C * hidden + norms,
            "SwiGLU has three matrices (gate, up and down), not two",
        ),
        (
            H * attention + mlp + norms,
            "the heads split the n_embd channels between them (head_dim = n_embd // n_head); "
            "they do not multiply the weights, so n_head does not change the count",
        ),
        (
            3 * C * C + mlp + norms,
            "attention has four projections: q, k, v and the output projection o",
        ),
        (
            attention + mlp + norms + 4 * C + 2 * hidden + C,
            "tinylm's linear layers have no biases (nor do Llama's)",
        ),
        (attention + mlp + 4 * C, "RMSNorm has only a scale (no bias, unlike LayerNorm)"),
    ]
    for value, hint in mistakes:
        if is_close(got, value):
            return hint
    return "attention 4·C² + SwiGLU 3·C·hidden + two RMSNorm weights 2·C"


@exercise("ch02.block_params", difficulty="warm-up", title="Parameters of one transformer block")
def _check_block_params(answer: Any) -> str:
    inputs = [(128, 4, 344), (64, 8, 176), (4096, 32, 11008), (96, 1, 256)]
    inputs += unseen(lambda r: (32 * r.randint(1, 64), r.choice((1, 2, 4, 8)), r.randint(8, 8192)))
    return check_cases(
        answer,
        [(args, reference_block_params(*args)) for args in inputs],
        rel=1e-9,
        hint=_block_params_hint,
    )


# --------------------------------------------------------------------------- core: attention layer


def reference_causal_self_attention(attn: Any, x: Any, cos: Any, sin: Any) -> Any:
    """Multi-head causal self-attention with RoPE, as `tinylm.attention.CausalSelfAttention`.

    ``attn`` holds the four projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and
    ``n_head``; x [B, T, C]; cos, sin [T, D] are the RoPE tables of positions 0 .. T-1.
    Project, split the C channels into n_head heads of D = C // n_head ([B, H, T, D]),
    rotate q and k (not v), attend causally with scores scaled by 1/sqrt(D), put the heads
    side by side again ([B, T, C]) and mix them with o_proj.
    """
    import torch.nn.functional as F

    from tinylm.layers import apply_rope

    B, T, C = x.shape
    H = attn.n_head

    def heads(t: Any) -> Any:  # [B, T, C] -> [B, H, T, D]
        return t.view(B, T, H, C // H).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def _self_attention_variants(attn: Any, x: Any, cos: Any, sin: Any) -> list[tuple[Any, str]]:
    """What the typical mistakes compute, each with the hint that names it."""
    import torch

    from tinylm.layers import apply_rope

    B, T, C = x.shape
    H = attn.n_head
    D = C // H
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def heads(t: Any) -> Any:
        return t.view(B, T, H, D).transpose(1, 2)

    def attend(q: Any, k: Any, v: Any, mask: Any = causal, scale: float = D**-0.5) -> Any:
        scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v

    def merge(y: Any) -> Any:
        return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return [
        (merge(attend(q, k, v)), "apply RoPE to the queries and keys: apply_rope(q, cos, sin)"),
        (
            merge(attend(qr, kr, apply_rope(v, cos, sin))),
            "rotate only q and k: RoPE changes who attends to whom, the values pass on "
            "content and stay unrotated",
        ),
        (
            merge(attend(qr, kr, v, torch.ones(T, T, dtype=torch.bool))),
            "mask the future: token t may only attend to keys 0..t (scores of later keys "
            "-> -inf before the softmax)",
        ),
        (merge(attend(qr, kr, v, scale=1.0)), "scale the scores by 1/sqrt(head_dim)"),
        (
            merge(attend(qr, kr, v, scale=C**-0.5)),
            "the scale is 1/sqrt(head_dim), not 1/sqrt(n_embd)",
        ),
        (
            attn.o_proj(attend(qr, kr, v).reshape(B, T, C)),
            "put the heads back side by side with y.transpose(1, 2).reshape(B, T, C): "
            "reshaping [B, H, T, D] directly mixes tokens and heads",
        ),
        (
            attend(qr, kr, v).transpose(1, 2).reshape(B, T, C),
            "finish with the output projection o_proj, which mixes the heads",
        ),
        (
            merge(
                attend(
                    apply_rope(attn.q_proj(x).view(B, H, T, D), cos, sin),
                    apply_rope(attn.k_proj(x).view(B, H, T, D), cos, sin),
                    attn.v_proj(x).view(B, H, T, D),
                )
            ),
            "split the heads with view(B, T, n_head, head_dim).transpose(1, 2): the channels "
            "of one token are split between heads, viewing [B, H, T, D] directly mixes tokens",
        ),
    ]


def _self_attention_hint(got: Any, expected: Any, args: Any) -> str | None:
    import torch

    attn, x, cos, sin = args
    if getattr(got, "shape", None) is not None and tuple(got.shape) != tuple(expected.shape):
        return "return the layer's output with the input's shape [B, T, C]"
    got_t = torch.as_tensor(got).detach().to("cpu", torch.float32)
    with torch.no_grad():
        variants = _self_attention_variants(attn, x, cos, sin)
    for value, hint in variants:
        if not torch.allclose(value, expected, atol=1e-5) and torch.allclose(
            got_t, value, rtol=1e-4, atol=1e-5
        ):
            return hint
    return (
        "q, k, v = the projections split into heads [B, H, T, D]; rotate q and k; causal "
        "softmax(q·kᵀ/sqrt(D)) @ v; heads side by side [B, T, C]; o_proj"
    )


def random_attention_layer(n_embd: int, n_head: int, seed: int) -> Any:
    """A `tinylm.attention.CausalSelfAttention` (multi-head) with O(1) random weights.

    At the library's initialisation (std 0.02) every attention pattern is nearly uniform,
    so a missing mask or a wrong head split would hardly change the output; weights of
    order one make every mistake visible.
    """
    import torch

    from tinylm.attention import CausalSelfAttention
    from tinylm.config import GPTConfig

    config = GPTConfig(n_layer=1, n_head=n_head, n_embd=n_embd, vocab_size=256, context_length=64)
    layer = CausalSelfAttention(config, 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[-1]))
    return layer.eval()


@exercise(
    "ch02.causal_self_attention",
    difficulty="core",
    title="Causal self-attention with RoPE: the layer the model runs on",
)
def _check_causal_self_attention(answer: Any) -> str:
    import torch

    from tinylm.layers import rope_tables

    cases = [(32, 4, 2, 7), (64, 8, 1, 12), (16, 1, 3, 5), (48, 3, 2, 9)]  # C, H, B, T
    name = getattr(answer, "__name__", "your function")
    for seed, (C, H, B, T) in enumerate(cases):
        layer = random_attention_layer(C, H, case_seed(seed))
        x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(case_seed(100 + seed)))
        cos, sin = rope_tables(C // H, T)
        with torch.no_grad():
            expected = layer(x, cos, sin, None, None)  # the library's layer itself
            got = call(answer, layer, x.clone(), cos, sin)
        what = f"{name}(layer with n_embd={C}, n_head={H}, x[{B},{T},{C}], cos, sin)"
        expect_close(
            got,
            expected,
            rel=1e-4,
            abs_tol=1e-5,
            what=what,
            hint=_self_attention_hint,
            args=(layer, x, cos, sin),
        )
    return f"all {len(cases)} layers match tinylm.attention.CausalSelfAttention"


# --------------------------------------------------------------------------- core: FLOPs


def reference_forward_flops(config: Any, context: int) -> int:
    """Forward FLOPs per token of a dense multi-head-attention GPT (tinylm's convention).

    2 FLOPs per multiply-add. Matmuls: per layer 4·C² (attention projections) + 3·C·hidden
    (SwiGLU), plus the output head C·V; the embedding lookup is a read, not a matmul. Attention
    itself: per layer and head, context·head_dim multiply-adds for the scores QK^T and as many
    for the weighted sum of V, i.e. 2·context·C per layer.
    """
    from tinylm.model import flops_per_token

    return flops_per_token(config, context)


def _forward_flops_mistakes(config: Any, context: int) -> list[tuple[float, str]]:
    from tinylm.model import count_parameters

    c = config
    L, C, V = c.n_layer, c.n_embd, c.vocab_size
    matmuls = L * (4 * C * C + 3 * C * c.mlp_hidden) + C * V
    attention = L * 2 * context * C
    full = 2 * (matmuls + attention)
    return [
        (matmuls + attention, "a multiply-add is 2 FLOPs: multiply everything by 2"),
        (
            2 * matmuls,
            "you left out attention itself: QK^T and the weighted sum of V grow with "
            "the context (2·context·n_embd multiply-adds per layer)",
        ),
        (
            2 * (matmuls + attention / 2),
            "attention has two context-long products per head: "
            "the scores q·k and the weighted sum of the values",
        ),
        (
            2 * (matmuls + 2 * L * C + C + attention),
            "close: the RMSNorm scales are "
            "elementwise, not matmuls; count only the weight matrices",
        ),
        (
            2 * count_parameters(c) + 2 * attention,
            "the embedding lookup reads one row of the "
            "table: it costs no FLOPs. Count the matmuls: projections, MLP and the output head",
        ),
        (
            2 * (matmuls - C * V + attention),
            "the output head (n_embd x vocab_size) is a matmul "
            "too, and the most expensive single one in a small model",
        ),
        (full - 2 * L * C * c.mlp_hidden, "SwiGLU has three matrices: gate, up and down"),
    ]


def _forward_flops_hint(got: Any, expected: Any, args: Any) -> str:
    config, context = args
    if config.tie_embeddings and is_close(got, expected - 2 * config.n_embd * config.vocab_size):
        return (
            "with tie_embeddings=True the head shares its weights with the embedding, but "
            "the head's matmul still runs for every token"
        )
    for value, hint in _forward_flops_mistakes(config, context):
        if is_close(got, value):
            return hint
    return "2 × (layers × (4·C² + 3·C·hidden + 2·context·C) + C·vocab)"


@exercise("ch02.forward_flops", difficulty="core", title="Forward FLOPs per token")
def _check_forward_flops(answer: Any) -> str:
    from tinylm.model import GPTConfig

    cases = [
        (GPTConfig(), 1),
        (GPTConfig(), 256),
        (GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=300, mlp_hidden=100), 17),
        (GPTConfig(n_layer=6, n_head=8, n_embd=256, vocab_size=4096, tie_embeddings=True), 1000),
    ]
    cases += unseen(
        lambda r: (
            GPTConfig(
                n_layer=r.randint(1, 8), n_head=2, n_embd=16 * r.randint(1, 16),
                vocab_size=r.randint(50, 5000), mlp_hidden=r.randint(16, 1024),
                tie_embeddings=r.random() < 0.5,
            ),
            r.randint(1, 1000),
        )
    )  # fmt: skip
    for config, context in cases:
        got = call(answer, config, context)
        expected = reference_forward_flops(config, context)
        what = (
            f"{getattr(answer, '__name__', 'your function')}(GPTConfig(n_layer={config.n_layer}, "
            f"n_embd={config.n_embd}, n_head={config.n_head}, mlp_hidden={config.mlp_hidden}, "
            f"vocab_size={config.vocab_size}, tie_embeddings={config.tie_embeddings}), "
            f"context={context})"
        )
        expect_close(
            got, expected, rel=1e-9, what=what, hint=_forward_flops_hint, args=(config, context)
        )
    return f"all {len(cases)} cases match flops_per_token"


# --------------------------------------------------------------------------- core: attention


def reference_causal_attention(q: Any, k: Any, v: Any) -> Any:
    """Causal attention where the T queries are the LAST T of the S key positions.

    q [B, H, T, D], k and v [B, H, S, D] with S >= T: query i sits at position S - T + i and
    may attend to keys 0 .. S - T + i (the situation of a KV cache: new tokens attend to
    everything cached before them). With T == S it is ordinary causal self-attention.
    """
    import torch.nn.functional as F

    from tinylm.attention import attention_mask

    T, S = q.shape[-2], k.shape[-2]
    mask = attention_mask(None, S - T, T, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attention_variants(q: Any, k: Any, v: Any) -> list[tuple[Any, str]]:
    import torch

    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1)
    right = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    top_left = torch.ones(T, S, dtype=torch.bool).tril()

    def attend(s: Any, mask: Any) -> Any:
        return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    full = torch.ones(T, S, dtype=torch.bool)
    diagonal = torch.zeros(T, S, dtype=torch.bool)
    diagonal[torch.arange(T), torch.arange(S - T, S)] = True
    return [
        (
            attend(scores / math.sqrt(D), top_left),
            "your mask is aligned to the top-left corner (torch.tril on a T x S matrix, or "
            "is_causal=True in SDPA): but query i is at position S - T + i, so it may see keys "
            "0 .. S - T + i; use tril(diagonal=S - T)",
        ),
        (
            attend(scores / math.sqrt(D), full),
            "no causal mask: position i must not see keys after i",
        ),
        (attend(scores, right), "scale the scores by 1 / sqrt(head_dim) before the softmax"),
        (attend(scores / D, right), "the scale is 1 / sqrt(head_dim), not 1 / head_dim"),
        (
            attend(scores / math.sqrt(D), ~right | diagonal),
            "your mask is flipped: a query may see the keys at or BEFORE its position",
        ),
        (
            scores.div(math.sqrt(D)).masked_fill(~right, float("-inf")).softmax(-2) @ v,
            "take the softmax over the keys (the last dim), not over the queries",
        ),
    ]


def _attention_hint(got: Any, expected: Any, args: Any) -> str | None:
    import torch

    q, k, v = args
    if getattr(got, "shape", None) != expected.shape:
        return "the output has the queries' shape [B, H, T, D]"
    got_t = torch.as_tensor(got).detach().to("cpu", torch.float32)
    for value, hint in _attention_variants(q, k, v):
        if torch.allclose(got_t, value, rtol=1e-4, atol=1e-5, equal_nan=True):
            return hint
    return "softmax(q·kᵀ / sqrt(D) with future keys at -inf) @ v, per batch row and head"


@exercise(
    "ch02.causal_attention",
    difficulty="core",
    title="Causal attention when the queries are the last T of S positions",
)
def _check_causal_attention(answer: Any) -> str:
    import torch

    g = torch.Generator().manual_seed(case_seed(2))
    shapes = [(2, 3, 5, 5, 8), (1, 2, 1, 7, 16), (2, 4, 3, 8, 8), (1, 1, 6, 6, 4)]
    for B, H, T, S, D in shapes:
        q = torch.randn(B, H, T, D, generator=g)
        k = torch.randn(B, H, S, D, generator=g)
        v = torch.randn(B, H, S, D, generator=g)
        expected = reference_causal_attention(q, k, v)
        got = call(answer, q.clone(), k.clone(), v.clone())
        what = (
            f"{getattr(answer, '__name__', 'your function')}(q[{B},{H},{T},{D}], "
            f"k[{B},{H},{S},{D}], v[{B},{H},{S},{D}])"
        )
        expect_close(
            got, expected, rel=1e-4, abs_tol=1e-5, what=what, hint=_attention_hint, args=(q, k, v)
        )
    return f"all {len(shapes)} shapes match scaled_dot_product_attention with the offset mask"


# --------------------------------------------------------------------------- stretch


def reference_apply_rope_at(x: Any, positions: Any, theta: float = 10000.0) -> Any:
    """Rotate x [..., T, D] by RoPE at the given positions [T] (half-split, as tinylm/Llama)."""
    from tinylm.attention import apply_rope, rope_tables

    cos, sin = rope_tables(x.shape[-1], int(positions.max()) + 1, theta)
    return apply_rope(x, cos[positions], sin[positions])


def _rope_variants(x: Any, positions: Any, theta: float) -> list[tuple[Any, str]]:
    import torch

    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    angles = positions.float()[:, None] * inv_freq  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()
    # GPT-J / original-paper layout: pairs are neighbouring channels (2i, 2i+1)
    even, odd = x[..., 0::2], x[..., 1::2]
    interleaved = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    T = x.shape[-2]
    return [
        (
            interleaved.flatten(-2),
            "you rotated neighbouring channels (2i, 2i+1) together (the interleaved layout); "
            "tinylm and Llama pair channel i with channel i + D/2 (the half-split layout)",
        ),
        (
            reference_apply_rope_at(x, positions, theta)
            .neg()
            .add(2 * x * torch.cat((cos, cos), -1)),
            "your rotation goes the wrong way: x·cos + rotate_half(x)·sin with "
            "rotate_half(a, b) = (-b, a)",
        ),
        (
            reference_apply_rope_at(x, torch.arange(T), theta),
            "use the positions you are given, not 0 .. T-1 (a KV cache writes new tokens at "
            "positions that start after the cached ones)",
        ),
        (
            reference_apply_rope_at(x, positions, 10000.0),
            "use the theta you are given (the frequencies are theta^(-2i/D))",
        ),
    ]


def _rope_hint(got: Any, expected: Any, args: Any) -> str | None:
    import torch

    x, positions, theta = args
    if getattr(got, "shape", None) != expected.shape:
        return "the output has the shape of x"
    got_t = torch.as_tensor(got).detach().to("cpu", torch.float32)
    for value, hint in _rope_variants(x, positions, theta):
        if not torch.allclose(value, expected, atol=1e-6) and torch.allclose(
            got_t, value, rtol=1e-4, atol=1e-5
        ):
            return hint
    return "angle of pair i at position p: p · theta^(-2i/D); out = x·cos + rotate_half(x)·sin"


@exercise("ch02.apply_rope_at", difficulty="stretch", title="Rotary embedding at any positions")
def _check_apply_rope_at(answer: Any) -> str:
    import torch

    g = torch.Generator().manual_seed(case_seed(3))
    cases = [
        ((2, 3, 5, 8), torch.arange(5), 10000.0),
        ((1, 2, 4, 16), torch.tensor([7, 8, 9, 10]), 10000.0),
        ((3, 6), torch.tensor([0, 100, 3]), 10000.0),
        ((1, 1, 2, 32), torch.tensor([5, 6]), 500.0),
    ]
    for shape, positions, theta in cases:
        x = torch.randn(*shape[:-2], len(positions), shape[-1], generator=g)
        expected = reference_apply_rope_at(x, positions, theta)
        got = call(answer, x.clone(), positions.clone(), theta)
        what = (
            f"{getattr(answer, '__name__', 'your function')}(x{list(x.shape)}, "
            f"positions={positions.tolist()}, theta={theta:g})"
        )
        expect_close(
            got,
            expected,
            rel=1e-4,
            abs_tol=1e-5,
            what=what,
            hint=_rope_hint,
            args=(x, positions, theta),
        )
    return f"all {len(cases)} cases match tinylm.attention.apply_rope"
