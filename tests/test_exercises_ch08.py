"""Tests for the chapter 08 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import math

import pytest

from tinylm.costs import estimate, kv_cache_bytes_per_token, load_models
from tinylm.exercises import check, list_exercises, results
from tinylm.exercises.ch08 import (
    reference_compute_bound_batch,
    reference_decode_intensity,
    reference_decode_step_seconds,
    reference_usd_per_million_tokens,
)
from tinylm.hardware import load_chips, ridge_point

# ----------------------------------------------------------------- learner answers (fixtures)


def decode_intensity(n_params, batch, bytes_per_weight):
    return 2 * batch / bytes_per_weight


def intensity_no_two(n_params, batch, bytes_per_weight):
    return batch / bytes_per_weight


def intensity_no_batch(n_params, batch, bytes_per_weight):
    return 2 / bytes_per_weight


def decode_step_seconds(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_gbps):
    return (weight_bytes + batch * context * kv_bytes_per_token) / (bandwidth_gbps * 1e9)


def step_no_kv(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_gbps):
    return weight_bytes / (bandwidth_gbps * 1e9)


def step_gbps_as_bytes(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_gbps):
    return (weight_bytes + batch * context * kv_bytes_per_token) / bandwidth_gbps


def step_kv_not_batched(weight_bytes, kv_bytes_per_token, context, batch, bandwidth_gbps):
    return (weight_bytes + context * kv_bytes_per_token) / (bandwidth_gbps * 1e9)


def usd_per_million_tokens(tokens_per_second, usd_per_hour):
    return usd_per_hour / 3600 / tokens_per_second * 1e6


def usd_hourly_as_seconds(tokens_per_second, usd_per_hour):
    return usd_per_hour / tokens_per_second * 1e6


def usd_per_token(tokens_per_second, usd_per_hour):
    return usd_per_hour / 3600 / tokens_per_second


def compute_bound_batch(peak_tflops, bandwidth_gbps, bytes_per_weight):
    return math.ceil(peak_tflops * 1e12 / (bandwidth_gbps * 1e9) * bytes_per_weight / 2)


def batch_not_rounded(peak_tflops, bandwidth_gbps, bytes_per_weight):
    return peak_tflops * 1e12 / (bandwidth_gbps * 1e9) * bytes_per_weight / 2


def batch_no_half(peak_tflops, bandwidth_gbps, bytes_per_weight):
    return math.ceil(peak_tflops * 1e12 / (bandwidth_gbps * 1e9) * bytes_per_weight)


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references agree with lib


def test_references_agree_with_the_cost_model():
    chips, models = load_chips(), load_models()
    h100, shape = chips["H100 SXM"], models["Llama-3-8B"]
    assert reference_compute_bound_batch(989, 3350, 2) == math.ceil(ridge_point(h100))
    est = estimate(shape, h100, batch=4, prompt_len=1000, new_tokens=1, kv_bits=16)
    d = est.decode
    predicted = reference_decode_step_seconds(
        d.weight_bytes, kv_cache_bytes_per_token(shape, 16), 1001, 4, h100.memory_gbps
    )
    # the lib also counts activations and the new token's K/V write: a few percent at most
    assert predicted == pytest.approx(d.memory_seconds, rel=0.02)
    assert reference_usd_per_million_tokens(est.tokens_per_second, h100.usd_per_hour) == (
        pytest.approx(est.usd_per_million_output_tokens, rel=0.02)
    )
    assert reference_decode_intensity(8e9, 64, 2) == 64


# ----------------------------------------------------------------- the checks

IDS = [
    "ch08.decode_intensity",
    "ch08.decode_step_seconds",
    "ch08.usd_per_million_tokens",
    "ch08.compute_bound_batch",
]


def test_there_are_warm_up_core_and_stretch_exercises():
    ch08 = list_exercises(8)
    assert {ex.id for ex in ch08} == set(IDS)
    assert {ex.difficulty for ex in ch08} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch08.decode_intensity", decode_intensity),
        ("ch08.decode_intensity", reference_decode_intensity),
        ("ch08.decode_step_seconds", decode_step_seconds),
        ("ch08.decode_step_seconds", reference_decode_step_seconds),
        ("ch08.usd_per_million_tokens", usd_per_million_tokens),
        ("ch08.usd_per_million_tokens", reference_usd_per_million_tokens),
        ("ch08.compute_bound_batch", compute_bound_batch),
        ("ch08.compute_bound_batch", reference_compute_bound_batch),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "expected_in_message"),
    [
        ("ch08.decode_intensity", intensity_no_two, ["2 FLOPs"]),
        ("ch08.decode_intensity", intensity_no_batch, ["batch"]),
        ("ch08.decode_step_seconds", step_no_kv, ["KV cache"]),
        ("ch08.decode_step_seconds", step_gbps_as_bytes, ["1e9"]),
        ("ch08.decode_step_seconds", step_kv_not_batched, ["multiply it by the batch"]),
        ("ch08.usd_per_million_tokens", usd_hourly_as_seconds, ["3600"]),
        ("ch08.usd_per_million_tokens", usd_per_token, ["per million"]),
        ("ch08.compute_bound_batch", batch_not_rounded, ["math.ceil"]),
        ("ch08.compute_bound_batch", batch_no_half, ["divide by 2"]),
    ],
)
def test_typical_mistakes_fail_with_a_targeted_hint(
    exercise_id, answer, expected_in_message, exercise
):
    exercise.fails(exercise_id, answer, answer.__name__, "Hint:", *expected_in_message)


@pytest.mark.parametrize("exercise_id", IDS)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_non_numbers_are_a_failure_not_a_crash():
    for exercise_id in IDS:
        assert check(exercise_id, lambda *args: "fast") is False
        assert results()[-1].status == "failed"
