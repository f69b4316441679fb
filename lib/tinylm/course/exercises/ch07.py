"""Checks for notebook 07, "Porting".

The three exercises are the small pieces a port is made of: the similarity measure a parity
report judges by (warm-up), one attention decode step written in NumPy (core), and the
weight permutation that fixes the most common porting bug, a RoPE convention mismatch,
without touching the runtime's code (stretch). Each check runs the learner's function on
inputs chosen so that the usual mistakes give a different answer, and the hint names the
mistake it recognised.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

from tinylm.course.exercises.core import (
    Fail,
    call,
    case_seed,
    exercise,
    expect_close,
    first_matching_hint,
    is_close,
)

# Only NumPy and the torch-free tinylm.port modules here: listing the exercises of all
# chapters should not pay for importing torch.


_close = partial(is_close, abs_tol=1e-9)  # differences of exactly 0 compare as close


def _arrays_close(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    try:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol))


# --------------------------------------------------------------------------- warm-up


def reference_cosine_similarity(ref: Any, port: Any) -> float:
    """Cosine of the angle between two tensors of the same shape, flattened, in float64.

    The same as tinylm.port.parity.cosine_similarity for finite, non-zero inputs: the
    measure vendors' accuracy tools report per tensor (1 = same direction, 0 = unrelated,
    -1 = opposite).
    """
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(port, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cosine_hint(got: Any, expected: Any, args: Any) -> str:
    ref, port = (np.asarray(x) for x in args)
    a, b = ref.astype(np.float64).ravel(), port.astype(np.float64).ravel()
    try:
        value = float(got)
    except (TypeError, ValueError):
        return (
            "return one number for the whole tensor: flatten both arrays (.ravel()) before "
            "the dot product"
        )
    if not math.isfinite(value):
        return (
            "your sums overflowed float32 (these activations are ~1e20, and 1e40 does not fit "
            "in float32): compute in float64, e.g. a = ref.astype(np.float64)"
        )
    if _close(value, a @ b) and not _close(a @ b, expected):
        return "divide the dot product by the product of the two norms"
    if _close(value, abs(expected)) and expected < 0:
        return "keep the sign: a port that flips every value has cosine -1, not 1"
    if _close(value, 1.0 - expected):
        return "that is the cosine distance (1 - similarity); return the similarity itself"
    if ref.ndim > 1:
        rows = [
            r @ p / (np.linalg.norm(r) * np.linalg.norm(p))
            for r, p in zip(
                ref.reshape(-1, ref.shape[-1]).astype(np.float64),
                port.reshape(-1, port.shape[-1]).astype(np.float64),
                strict=True,
            )
        ]
        if _close(value, float(np.mean(rows))):
            return "flatten the whole tensor first: the mean of per-row cosines is another measure"
    return "cos = (a · b) / (|a| |b|) over all elements of the flattened tensors, in float64"


@exercise("ch07.cosine_similarity", difficulty="warm-up", title="Cosine similarity of two tensors")
def _check_cosine_similarity(answer: Any) -> str:
    rng = np.random.default_rng(case_seed(7))
    x = rng.standard_normal((1, 6, 16)).astype(np.float32)
    rows = rng.standard_normal((4, 10)).astype(np.float32)
    rows_port = rows * np.array([[1.0], [0.2], [3.0], [-0.5]], dtype=np.float32)
    rows_port += 0.3 * rng.standard_normal((4, 10)).astype(np.float32)
    big = (rng.standard_normal(64) * 1e20).astype(np.float32)
    cases = [
        (x, x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), "a [1, 6, 16] activation"),
        (x, 3.0 * x, "a port that scales every value by 3"),
        (x, -x, "a port that flips the sign"),
        (np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0]), "two orthogonal vectors"),
        (rows, rows_port, "a [4, 10] matrix whose rows are scaled differently"),
        (big, big + (1e18 * rng.standard_normal(64)).astype(np.float32), "activations ~1e20"),
    ]
    name = getattr(answer, "__name__", "your function")
    for ref, port, label in cases:
        got = call(answer, ref.copy(), port.copy())
        expect_close(
            got,
            reference_cosine_similarity(ref, port),
            rel=1e-5,
            abs_tol=1e-7,
            what=f"{name}(ref, port) on {label}",
            hint=_cosine_hint,
            args=(ref, port),
        )
    return f"all {len(cases)} cases match (scaled, flipped, orthogonal, huge values)"


# --------------------------------------------------------------------------- core


def reference_attention_decode_step(q: Any, k: Any, v: Any) -> np.ndarray:
    """One decode step of causal attention for one sequence, in NumPy.

    q [H, D]: the new token's queries; k, v [Hkv, S, D]: the cached keys and values of all S
    positions (the new token's included). Query head h uses key/value head h // (H // Hkv)
    (grouped-query attention, as SDPA's enable_gqa and tinylm.attention). The new token
    attends to every cached position, so no mask is needed. Returns [H, D] in float32.
    """
    q = np.asarray(q, dtype=np.float64)
    k, v = np.asarray(k, dtype=np.float64), np.asarray(v, dtype=np.float64)
    H, D = q.shape
    group = H // k.shape[0]
    kh, vh = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # [H, S, D]
    scores = np.einsum("hd,hsd->hs", q, kh) / math.sqrt(D)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hs,hsd->hd", p, vh).astype(np.float32)


def _attention_variants(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> list[tuple[Any, str]]:
    H, D = q.shape
    Hkv = k.shape[0]
    group = H // Hkv
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    kh, vh = np.repeat(k64, group, axis=0), np.repeat(v64, group, axis=0)
    kt, vt = np.tile(k64, (group, 1, 1)), np.tile(v64, (group, 1, 1))

    def attend(scores: np.ndarray, values: np.ndarray, axis: int = -1) -> np.ndarray:
        s = scores - scores.max(axis=axis, keepdims=True)
        p = np.exp(s) / np.exp(s).sum(axis=axis, keepdims=True)
        return np.einsum("hs,hsd->hd", p, values)

    raw = np.einsum("hd,hsd->hs", q64, kh)
    return [
        (attend(raw, vh), "scale the scores by 1 / sqrt(head_dim) before the softmax"),
        (
            attend(np.einsum("hd,hsd->hs", q64, kt) / math.sqrt(D), vt),
            "query head h uses key/value head h // (H // Hkv) (np.repeat along the head axis), "
            "not h % Hkv (np.tile): the query heads of one group are neighbours",
        ),
        (
            attend(raw / math.sqrt(D), vh, axis=0),
            "take the softmax over the positions (the last axis of the scores), not over heads",
        ),
    ]


def _attention_hint(got: Any, expected: Any, args: Any) -> str:
    q, k, v = args
    arr = np.asarray(got, dtype=np.float64) if hasattr(got, "shape") else None
    if arr is not None and arr.shape == expected.shape and not np.isfinite(arr).all():
        return (
            "your softmax overflowed (these scores exceed 88, where float32 exp is inf): "
            "subtract each row's maximum score before np.exp; the result does not change"
        )
    return first_matching_hint(got, expected, _attention_variants(q, k, v), _arrays_close) or (
        "scores = q · k / sqrt(D) per head and position; softmax over positions; "
        "output = probabilities · v; with GQA repeat each key/value head H // Hkv times"
    )


@exercise(
    "ch07.attention_decode_step",
    difficulty="core",
    title="One attention decode step in NumPy (with GQA)",
)
def _check_attention_decode_step(answer: Any) -> str:
    rng = np.random.default_rng(case_seed(11))

    def case(H: int, Hkv: int, S: int, D: int, q_scale: float = 1.0) -> tuple:
        q = (q_scale * rng.standard_normal((H, D))).astype(np.float32)
        k = rng.standard_normal((Hkv, S, D)).astype(np.float32)
        v = rng.standard_normal((Hkv, S, D)).astype(np.float32)
        return q, k, v

    cases = [
        case(4, 4, 7, 8),  # multi-head attention
        case(8, 2, 5, 16),  # grouped-query attention: 4 query heads per key/value head
        case(4, 1, 1, 8),  # multi-query, one cached position: the output is v itself
        case(4, 4, 33, 32, q_scale=40.0),  # sharp scores above 88: needs a stable softmax
    ]
    name = getattr(answer, "__name__", "your function")
    for q, k, v in cases:
        got = call(answer, q.copy(), k.copy(), v.copy())
        expect_close(
            got,
            reference_attention_decode_step(q, k, v),
            rel=1e-4,
            abs_tol=1e-5,
            what=f"{name}(q[{q.shape[0]}, {q.shape[1]}], k/v[{k.shape[0]}, {k.shape[1]}, "
            f"{k.shape[2]}])",
            hint=_attention_hint,
            args=(q, k, v),
        )
    return f"all {len(cases)} cases match (MHA, GQA, MQA, sharp scores)"


# --------------------------------------------------------------------------- stretch


def reference_permute_for_half_rope(w: Any, n_head: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from interleaved to half-split RoPE.

    Weights trained with interleaved RoPE (pairs (2i, 2i+1), GPT-J / Meta's original Llama)
    run under half-split RoPE (pairs (i, i + D/2), Hugging Face / tinylm) once each head's
    rows are reordered: row 2i moves to i and row 2i+1 to i + D/2. The same permutation
    Hugging Face's Llama conversion script applies (`permute` in convert_llama_weights_to_hf).
    """
    w = np.asarray(w)
    out, cols = w.shape
    d = out // n_head
    return w.reshape(n_head, d // 2, 2, cols).transpose(0, 2, 1, 3).reshape(out, cols)


def _scores(
    wq: np.ndarray, wk: np.ndarray, x: np.ndarray, n_head: int, interleaved: bool
) -> np.ndarray:
    """Attention scores [H, T, T] of x [T, C] with RoPE in one of the two conventions."""
    from tinylm.port.numpy_runtime import apply_rope, rope_tables
    from tinylm.port.parity import rope_interleaved

    T = x.shape[0]
    d = wq.shape[0] // n_head
    cos, sin = rope_tables(d, T)
    rope = rope_interleaved if interleaved else apply_rope
    xf = x.astype(np.float32)
    q = (xf @ wq.T.astype(np.float32)).reshape(T, n_head, d).transpose(1, 0, 2)
    k = (xf @ wk.T.astype(np.float32)).reshape(T, n_head, d).transpose(1, 0, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    return (q @ k.transpose(0, 2, 1)).astype(np.float64)


def _permutation_hint(got: Any, w: np.ndarray, n_head: int) -> str:
    g = np.asarray(got)
    perm = reference_permute_for_half_rope(np.arange(w.shape[0])[:, None], n_head).ravel()
    if g.shape == w.shape:
        if np.array_equal(g, w):
            return (
                "the two conventions pair different channels: interleaved RoPE rotates "
                "(2i, 2i+1), half-split rotates (i, i + D/2); reorder each head's rows so "
                "that row 2i lands at i and row 2i+1 at i + D/2"
            )
        if np.array_equal(g, w[np.argsort(perm)]):
            return "that is the inverse permutation: row 2i must move TO position i, not from it"
        if n_head > 1 and np.array_equal(g, reference_permute_for_half_rope(w, 1)):
            return (
                f"permute within each head: the {n_head} heads have {w.shape[0] // n_head} "
                "channels each, and RoPE pairs channels of the same head"
            )
        if w.shape[0] == w.shape[1] and np.array_equal(g, w[:, perm]):
            return (
                "permute the ROWS (output channels) of W [out, in]: the rotation acts on "
                "q = x @ W.T, whose channels are W's rows"
            )
    return (
        "for each head, new rows = old rows [0, 2, 4, ..., D-2, 1, 3, ..., D-1]; e.g. "
        "w.reshape(n_head, D // 2, 2, C).transpose(0, 2, 1, 3).reshape(-1, C)"
    )


@exercise(
    "ch07.permute_for_half_rope",
    difficulty="stretch",
    title="Fix a RoPE-convention mismatch by permuting weights",
)
def _check_permute_for_half_rope(answer: Any) -> str:
    rng = np.random.default_rng(case_seed(3))
    cases = [(2, 8, 16, 6), (1, 8, 12, 7), (4, 16, 64, 9), (2, 4, 6, 5)]  # n_head, D, C, T
    name = getattr(answer, "__name__", "your function")
    for n_head, d, cols, T in cases:
        wq = rng.standard_normal((n_head * d, cols)).astype(np.float32) / math.sqrt(cols)
        wk = rng.standard_normal((n_head * d, cols)).astype(np.float32) / math.sqrt(cols)
        x = rng.standard_normal((T, cols)).astype(np.float32)
        what = f"{name}(w[{n_head * d}, {cols}], n_head={n_head})"
        got_q = call(answer, wq.copy(), n_head)
        got_k = call(answer, wk.copy(), n_head)
        for got, w in ((got_q, wq), (got_k, wk)):
            shape = getattr(got, "shape", None)
            if shape is None or tuple(shape) != w.shape:
                raise Fail(
                    f"{what} returned {type(got).__name__} of shape {shape}; expected an array "
                    f"of shape {w.shape} (the same weight, rows reordered)",
                    hint="return the permuted weight matrix itself",
                )
        want = _scores(wq, wk, x, n_head, interleaved=True)
        have = _scores(np.asarray(got_q), np.asarray(got_k), x, n_head, interleaved=False)
        if not np.allclose(have, want, rtol=1e-4, atol=1e-4):
            worst = float(np.max(np.abs(have - want)))
            raise Fail(
                f"{what}: attention scores under half-split RoPE with your weights differ from "
                f"the interleaved model's by up to {worst:.3g} (over {T} positions)",
                hint=_permutation_hint(got_q, wq, n_head),
            )
    return (
        f"all {len(cases)} cases: half-split RoPE on your weights gives the interleaved "
        "model's attention scores at every position"
    )
