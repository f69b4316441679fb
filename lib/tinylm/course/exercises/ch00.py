"""Checks for notebook 00, "Why inference".

Each check compares the learner's function with the reference formula below on a few
inputs chosen so that the typical mistakes (forgetting the backward pass, the factor of
two in a multiply-add, the activations' bytes, the batch) give a different answer.
"""

from __future__ import annotations

import math
from typing import Any

from tinylm.course.exercises.core import check_cases, exercise


def _ratio(got: Any, expected: Any) -> float:
    return float(got) / float(expected) if expected else math.nan


# --------------------------------------------------------------------------- warm-up


def reference_training_flops(n_params: float, n_tokens: float) -> float:
    """Training compute: about 6 FLOPs per parameter per token (2 forward + 4 backward)."""
    return 6.0 * n_params * n_tokens


def _training_flops_hint(got: Any, expected: Any, args: Any) -> str:
    ratio = _ratio(got, expected)
    if math.isclose(ratio, 1 / 3, rel_tol=1e-3):
        return (
            "you counted only the forward pass (2·N per token); the backward pass costs "
            "about twice the forward, so training is 6·N per token"
        )
    return "each token costs about 6 FLOPs per parameter in training: C = 6 · N · D"


@exercise("ch00.training_flops", difficulty="warm-up", title="Training compute with 6·N·D")
def _check_training_flops(answer: Any) -> str:
    inputs = [(8e9, 15e12), (37e9, 14.8e12), (1, 1), (125e6, 3e9)]
    return check_cases(
        answer,
        [(args, reference_training_flops(*args)) for args in inputs],
        hint=_training_flops_hint,
    )


# --------------------------------------------------------------------------- core


def reference_days_to_crossover(
    n_params: float, train_tokens: float, tokens_per_day: float
) -> float:
    """Days of serving until inference compute (2·N per token) equals training (6·N·D)."""
    return 6.0 * n_params * train_tokens / (2.0 * n_params * tokens_per_day)


def _crossover_hint(got: Any, expected: Any, args: Any) -> str:
    ratio = _ratio(got, expected)
    if math.isclose(ratio, 1 / 3, rel_tol=1e-3):
        return "training costs 6·N per token but inference only 2·N: the ratio is 3, not 1"
    if math.isclose(ratio, 3.0, rel_tol=1e-3):
        return "inference costs 2·N FLOPs per token (forward pass), training 6·N"
    return "solve 2·N · tokens_per_day · days = 6·N · train_tokens for days"


@exercise(
    "ch00.days_to_crossover",
    difficulty="core",
    title="Days until inference compute overtakes training",
)
def _check_days_to_crossover(answer: Any) -> str:
    inputs = [(8e9, 15e12, 1e11), (37e9, 14.8e12, 1e12), (1e6, 1e9, 1e7), (70e9, 15e12, 3e10)]
    return check_cases(
        answer,
        [(args, reference_days_to_crossover(*args)) for args in inputs],
        rel=1e-6,
        hint=_crossover_hint,
    )


def reference_arithmetic_intensity(
    n_tokens: int, d_in: int, d_out: int, bytes_per_value: float
) -> float:
    """FLOPs per byte moved for y[n, d_out] = x[n, d_in] @ W[d_in, d_out].

    FLOPs: one multiply-add (2 FLOPs) per (token, input, output) triple. Bytes: x and W are
    read once and y is written once.
    """
    flops = 2.0 * n_tokens * d_in * d_out
    moved = bytes_per_value * (n_tokens * d_in + d_in * d_out + n_tokens * d_out)
    return flops / moved


def _intensity_hint(got: Any, expected: Any, args: Any) -> str:
    n, d_in, d_out, b = args
    weights_only = 2.0 * n * d_in * d_out / (b * d_in * d_out)
    ratio = _ratio(got, expected)
    if math.isclose(float(got), weights_only, rel_tol=1e-3):
        return (
            "you counted only the weight bytes; with many tokens the input x and output y "
            "are big too: count n·d_in + d_in·d_out + n·d_out values"
        )
    if math.isclose(ratio, 0.5, rel_tol=1e-3):
        return "a multiply-add is 2 FLOPs, so the matmul costs 2 · n · d_in · d_out FLOPs"
    if math.isclose(ratio, float(b), rel_tol=1e-3) or math.isclose(ratio, 1 / b, rel_tol=1e-3):
        return "bytes = number of values × bytes_per_value (check where bytes_per_value goes)"
    return "intensity = FLOPs / bytes, with FLOPs = 2·n·d_in·d_out"


@exercise(
    "ch00.arithmetic_intensity",
    difficulty="core",
    title="Arithmetic intensity of a matrix multiply",
)
def _check_arithmetic_intensity(answer: Any) -> str:
    inputs = [(1, 4096, 4096, 4), (256, 4096, 4096, 4), (1, 4096, 4096, 2), (1024, 1024, 1024, 2)]
    return check_cases(
        answer,
        [(args, reference_arithmetic_intensity(*args)) for args in inputs],
        rel=1e-6,
        hint=_intensity_hint,
    )


# --------------------------------------------------------------------------- stretch


def reference_decode_tokens_per_second(
    n_params: float,
    bytes_per_param: float,
    batch_size: int,
    mem_bandwidth: float,
    peak_flops: float,
) -> float:
    """Upper bound on decode throughput (tokens/s) of a batch on one chip (a roofline).

    Each decode step reads every weight once and that one read serves the whole batch, so
    memory allows batch · bandwidth / (N · bytes) tokens per second; each token also needs
    2·N FLOPs, so compute allows peak / (2·N). The slower of the two limits wins. KV-cache traffic and
    activations are ignored here; chapter 08 adds them.
    """
    memory_bound = batch_size * mem_bandwidth / (n_params * bytes_per_param)
    compute_bound = peak_flops / (2.0 * n_params)
    return min(memory_bound, compute_bound)


def _decode_hint(got: Any, expected: Any, args: Any) -> str:
    n, b, batch, bw, peak = args
    memory_bound = batch * bw / (n * b)
    compute_bound = peak / (2.0 * n)
    if math.isclose(float(got), bw / (n * b), rel_tol=1e-3):
        return "one read of the weights serves every sequence in the batch: multiply by batch_size"
    if math.isclose(float(got), memory_bound, rel_tol=1e-3):
        return "at large batches compute runs out: a token also needs 2·N FLOPs (take the minimum)"
    if math.isclose(float(got), compute_bound, rel_tol=1e-3):
        return "at small batches memory runs out first: each step must read all N·bytes of weights"
    if math.isclose(float(got), max(memory_bound, compute_bound), rel_tol=1e-3):
        return "the slower resource sets the pace: take the minimum of the two limits"
    return "tokens/s = min(batch · bandwidth / (N · bytes), peak_flops / (2 · N))"


@exercise(
    "ch00.decode_tokens_per_second",
    difficulty="stretch",
    title="Decode throughput: memory-bound or compute-bound?",
)
def _check_decode_tokens_per_second(answer: Any) -> str:
    inputs = [
        (8e9, 2, 1, 2e12, 1e15),  # batch 1: memory-bound
        (8e9, 2, 64, 2e12, 1e15),  # still memory-bound, 64x the tokens
        (8e9, 2, 1024, 2e12, 1e15),  # compute-bound
        (1e9, 4, 8, 5e10, 1e12),  # a laptop-like case
    ]
    return check_cases(
        answer,
        [(args, reference_decode_tokens_per_second(*args)) for args in inputs],
        rel=1e-6,
        hint=_decode_hint,
    )
