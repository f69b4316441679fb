"""Tests for the chapter 07 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinylm.exercises import check, list_exercises, results
from tinylm.exercises.ch07 import (
    _scores,
    reference_attention_decode_step,
    reference_cosine_similarity,
    reference_permute_for_half_rope,
)
from tinylm.port.parity import cosine_similarity as lib_cosine_similarity

# ----------------------------------------------------------------- learner answers (fixtures)


def cosine_similarity(ref, port):
    a, b = ref.astype(np.float64).ravel(), port.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cosine_float32(ref, port):
    a, b = ref.ravel().astype(np.float32), port.ravel().astype(np.float32)
    return float(a @ b / (np.sqrt(np.sum(a * a)) * np.sqrt(np.sum(b * b))))


def cosine_unnormalised(ref, port):
    return float(ref.astype(np.float64).ravel() @ port.astype(np.float64).ravel())


def cosine_abs(ref, port):
    return abs(cosine_similarity(ref, port))


def cosine_per_row_mean(ref, port):
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = port.reshape(-1, port.shape[-1]).astype(np.float64)
    rows = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(rows.mean())


def attention_decode_step(q, k, v):
    H, D = q.shape
    group = H // k.shape[0]
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = np.einsum("hd,hsd->hs", q, k) / np.sqrt(D)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hs,hsd->hd", p, v)


def attention_no_scale(q, k, v):
    return attention_decode_step(q * np.sqrt(q.shape[1]), k, v)


def attention_tiled_gqa(q, k, v):
    group = q.shape[0] // k.shape[0]
    k, v = np.tile(k, (group, 1, 1)), np.tile(v, (group, 1, 1))
    return attention_decode_step(q, k, v)


def attention_unstable(q, k, v):
    H, D = q.shape
    group = H // k.shape[0]
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    p = np.exp(np.einsum("hd,hsd->hs", q, k) / np.float32(np.sqrt(D)))
    return np.einsum("hs,hsd->hd", p / p.sum(-1, keepdims=True), v)


def permute_for_half_rope(w, n_head):
    out, cols = w.shape
    d = out // n_head
    order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    return np.concatenate([w[h * d + order] for h in range(n_head)])


def permute_identity(w, n_head):
    return w.copy()


def permute_inverse(w, n_head):
    d = w.shape[0] // n_head
    order = np.argsort(np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)]))
    return np.concatenate([w[h * d + order] for h in range(n_head)])


def permute_whole_matrix(w, n_head):
    return permute_for_half_rope(w, 1)


def permute_columns(w, n_head):
    d = w.shape[0] // n_head
    order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    rows = np.concatenate([h * d + order for h in range(n_head)])
    return w[:, rows] if w.shape[0] == w.shape[1] else permute_identity(w, n_head)


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references are right


def test_reference_cosine_matches_the_parity_module():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    assert reference_cosine_similarity(a, b) == pytest.approx(lib_cosine_similarity(a, b))
    assert reference_cosine_similarity(a, -2 * a) == pytest.approx(-1.0)


@pytest.mark.parametrize(("H", "Hkv", "S", "D"), [(4, 4, 6, 8), (8, 2, 5, 16), (4, 1, 3, 8)])
def test_reference_attention_step_matches_torch_sdpa(H, Hkv, S, D):
    g = torch.Generator().manual_seed(H * S + D)
    q = torch.randn(1, H, 1, D, generator=g)
    k, v = torch.randn(1, Hkv, S, D, generator=g), torch.randn(1, Hkv, S, D, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H)[0, :, 0]
    got = reference_attention_decode_step(q[0, :, 0].numpy(), k[0].numpy(), v[0].numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_reference_permutation_turns_interleaved_into_half_split_rope():
    rng = np.random.default_rng(1)
    n_head, d, cols, T = 2, 8, 16, 7
    wq, wk = rng.standard_normal((2, n_head * d, cols)).astype(np.float32)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    want = _scores(wq, wk, x, n_head, interleaved=True)
    got = _scores(
        reference_permute_for_half_rope(wq, n_head),
        reference_permute_for_half_rope(wk, n_head),
        x,
        n_head,
        interleaved=False,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # without the permutation the conventions disagree (except at position 0)
    assert not np.allclose(_scores(wq, wk, x, n_head, interleaved=False), want, atol=1e-2)


def test_permutation_matches_the_hugging_face_llama_conversion():
    # convert_llama_weights_to_hf.permute: view(n_heads, dim1 // n_heads // 2, 2, dim2)
    w = torch.arange(48.0).reshape(8, 6)
    hf = w.view(2, 2, 2, 6).transpose(1, 2).reshape(8, 6)
    np.testing.assert_array_equal(reference_permute_for_half_rope(w.numpy(), 2), hf.numpy())


# ----------------------------------------------------------------- the checks


def test_there_are_warm_up_core_and_stretch_exercises():
    ch07 = list_exercises(7)
    assert {ex.id for ex in ch07} == {
        "ch07.cosine_similarity",
        "ch07.attention_decode_step",
        "ch07.permute_for_half_rope",
    }
    assert {ex.difficulty for ex in ch07} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch07.cosine_similarity", cosine_similarity),
        ("ch07.cosine_similarity", reference_cosine_similarity),
        ("ch07.cosine_similarity", lib_cosine_similarity),
        ("ch07.attention_decode_step", attention_decode_step),
        ("ch07.attention_decode_step", reference_attention_decode_step),
        ("ch07.permute_for_half_rope", permute_for_half_rope),
        ("ch07.permute_for_half_rope", reference_permute_for_half_rope),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "expected_in_message"),
    [
        ("ch07.cosine_similarity", cosine_float32, ["float64"]),
        ("ch07.cosine_similarity", cosine_unnormalised, ["norms"]),
        ("ch07.cosine_similarity", cosine_abs, ["sign"]),
        ("ch07.cosine_similarity", cosine_per_row_mean, ["flatten"]),
        ("ch07.attention_decode_step", attention_no_scale, ["sqrt(head_dim)"]),
        ("ch07.attention_decode_step", attention_tiled_gqa, ["h // (H // Hkv)"]),
        ("ch07.attention_decode_step", attention_unstable, ["maximum"]),
        ("ch07.permute_for_half_rope", permute_identity, ["(2i, 2i+1)"]),
        ("ch07.permute_for_half_rope", permute_inverse, ["inverse"]),
        ("ch07.permute_for_half_rope", permute_whole_matrix, ["within each head"]),
        ("ch07.permute_for_half_rope", permute_columns, ["ROWS"]),
    ],
)
def test_typical_mistakes_fail_with_a_targeted_hint(
    exercise_id, answer, expected_in_message, exercise
):
    with np.errstate(all="ignore"):
        exercise.fails(exercise_id, answer, answer.__name__, "Hint:", *expected_in_message)


@pytest.mark.parametrize(
    "exercise_id",
    ["ch07.cosine_similarity", "ch07.attention_decode_step", "ch07.permute_for_half_rope"],
)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_wrong_shape_is_a_failure_not_a_crash():
    assert check("ch07.attention_decode_step", lambda q, k, v: v) is False
    assert "shape" in results()[-1].message
    assert check("ch07.permute_for_half_rope", lambda w, n_head: w[:, :2]) is False
    assert "shape" in results()[-1].message
    assert check("ch07.cosine_similarity", lambda a, b: a * b) is False
    assert "flatten" in results()[-1].message
