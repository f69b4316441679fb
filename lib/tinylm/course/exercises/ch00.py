"""Checks for notebook 00, "Why inference".

The exercises ask the learner to reason with the chapter's rules of thumb rather than copy
them: estimate a utilisation from published figures, predict a measurement from a roofline
before the notebook takes it, and work out crossovers for scenarios the text did not work
through (growing traffic, inference that runs at a lower utilisation than training). Each
check compares the learner's function with the reference below on inputs chosen so that
the typical mistakes (hours left in hours, the forward pass only, adding the two limits
instead of taking the slower, growth ignored, a ratio upside down) give a different answer.
"""

from __future__ import annotations

import math
from typing import Any

from tinylm.course.exercises.core import (
    check_cases,
    exercise,
    first_matching_hint,
    is_close,
    unseen,
)


def _ratio(got: Any, expected: Any) -> float:
    return float(got) / float(expected) if expected else math.nan


def _close(a: Any, b: Any, rel: float = 1e-3) -> bool:
    """is_close with this chapter's default: its answers are estimates, 0.1% is close."""
    return is_close(a, b, rel)


# --------------------------------------------------------------------------- warm-up


def reference_training_utilisation(
    n_params: float, train_tokens: float, gpu_hours: float, peak_flops: float
) -> float:
    """Share of the GPUs' peak that training sustained: 6·N·D over (GPU-seconds × peak)."""
    return 6.0 * n_params * train_tokens / (gpu_hours * 3600.0 * peak_flops)


def _utilisation_hint(got: Any, expected: Any, args: Any) -> str:
    ratio = _ratio(got, expected)
    if _close(ratio, 3600.0):
        return "gpu_hours are hours: multiply by 3600 to get GPU-seconds (peak is per second)"
    if _close(ratio, 1 / 3):
        return (
            "you counted only the forward pass (2·N per token); training also runs the "
            "backward pass, about 6·N FLOPs per token in all"
        )
    if _close(ratio, 100.0):
        return "return a fraction (0.4), not a percentage (40)"
    if _close(float(got), 1 / expected if expected else math.nan):
        return "utilisation = FLOPs done / FLOPs the GPUs could have done, not the inverse"
    return "FLOPs done (6·N·D) / FLOPs possible (gpu_hours · 3600 s · peak FLOP/s per GPU)"


@exercise(
    "ch00.training_utilisation",
    difficulty="warm-up",
    title="How busy were the GPUs? Utilisation from published figures",
)
def _check_training_utilisation(answer: Any) -> str:
    inputs = [
        (8e9, 15e12, 1.3e6, 989e12),  # Llama 3 8B on H100s (bf16 dense peak)
        (37e9, 14.8e12, 2.664e6, 989e12),
        (1e6, 1e9, 1.0, 1e12),
        (70e9, 15e12, 6.4e6, 312e12),
    ]
    inputs += unseen(
        lambda r: (
            r.uniform(1e8, 1e11),
            r.uniform(1e10, 2e13),
            r.uniform(1e3, 1e7),
            r.uniform(1e14, 2e15),
        )  # fmt: skip
    )
    return check_cases(
        answer,
        [(args, reference_training_utilisation(*args)) for args in inputs],
        rel=1e-6,
        hint=_utilisation_hint,
    )


# --------------------------------------------------------------------------- core: predict


def reference_predict_matmul_seconds(
    n_tokens: int,
    d_in: int,
    d_out: int,
    bytes_per_value: float,
    bandwidth: float,
    peak_flops: float,
) -> float:
    """Roofline prediction of the time of y = x @ W for x [n, d_in] and W [d_in, d_out].

    The multiply cannot take less than its FLOPs at the peak rate, nor less than its bytes
    (x and W read once, y written once) at the memory bandwidth; the slower limit wins.
    """
    flops = 2.0 * n_tokens * d_in * d_out
    moved = bytes_per_value * (n_tokens * d_in + d_in * d_out + n_tokens * d_out)
    return max(flops / peak_flops, moved / bandwidth)


def _predict_variants(args: Any) -> list[tuple[float, str]]:
    n, d_in, d_out, b, bw, peak = args
    flops = 2.0 * n * d_in * d_out
    moved = b * (n * d_in + d_in * d_out + n * d_out)
    return [
        (
            flops / peak + moved / bw,
            "the arithmetic and the memory traffic overlap (the chip computes while the next "
            "bytes arrive): take the slower of the two times, max(...), not their sum",
        ),
        (
            max(flops / peak, b * d_in * d_out / bw),
            "with many tokens x and y are big too: count n·d_in + d_in·d_out + n·d_out values",
        ),
        (
            min(flops / peak, moved / bw),
            "the slower resource sets the pace: take the maximum of the two times",
        ),
        (
            max(flops / 2 / peak, moved / bw),
            "a multiply-add is 2 FLOPs: the matmul costs 2 · n · d_in · d_out FLOPs",
        ),
        (
            moved / bw,
            "at many tokens the arithmetic takes longer than the reads: include FLOPs / peak",
        ),
        (
            flops / peak,
            "at one token the reads take longer than the arithmetic: include bytes / bandwidth",
        ),
    ]


def _predict_hint(got: Any, expected: Any, args: Any) -> str:
    close = lambda a, b: _close(a, b, 1e-6)
    return first_matching_hint(got, expected, _predict_variants(args), close) or (
        "seconds = max(2·n·d_in·d_out / peak, bytes · (n·d_in + d_in·d_out + n·d_out) / bandwidth)"
    )


@exercise(
    "ch00.predict_matmul_seconds",
    difficulty="core",
    title="Predict a matmul's time from the roofline, then measure it",
)
def _check_predict_matmul_seconds(answer: Any) -> str:
    inputs = [
        (1, 4096, 4096, 4, 20e9, 100e9),  # one token: memory-bound
        (512, 4096, 4096, 4, 20e9, 100e9),  # many tokens: compute-bound
        (64, 2048, 8192, 2, 3.35e12, 989e12),  # an H100-like chip, bf16
        (4096, 1024, 1024, 4, 50e9, 200e9),  # activations bigger than the weights
    ]
    inputs += unseen(
        lambda r: (
            r.randint(1, 4096),
            r.randint(64, 8192),
            r.randint(64, 8192),
            r.choice((1, 2, 4)),
            r.uniform(1e10, 4e12),
            r.uniform(1e11, 2e15),
        )  # fmt: skip
    )
    return check_cases(
        answer,
        [(args, reference_predict_matmul_seconds(*args)) for args in inputs],
        rel=1e-6,
        hint=_predict_hint,
    )


# --------------------------------------------------------------------------- core: growth


def reference_days_with_growing_traffic(
    train_tokens: float, first_day_tokens: float, daily_growth: float
) -> int:
    """Whole days of serving until inference compute (2·N per token) reaches training's 6·N·D.

    Day 1 serves ``first_day_tokens``, and each later day ``daily_growth`` times the day
    before (1.0 = flat traffic). N cancels, so the answer is the first day d on which the
    tokens served so far, first_day_tokens · (g^d - 1) / (g - 1), reach 3 · train_tokens.
    """
    target, served, today, day = 3.0 * train_tokens, 0.0, float(first_day_tokens), 0
    while served < target:
        day += 1
        served += today
        today *= daily_growth
    return day


def _growth_hint(got: Any, expected: Any, args: Any) -> str | None:
    train, first, g = args
    try:
        value = float(got)
    except (TypeError, ValueError):
        return "return a whole number of days (an int)"
    flat = 3.0 * train / first
    if _close(value, flat, 1e-6) or value == math.ceil(flat):
        return "the traffic grows: day d serves first_day_tokens · growth^(d-1), so sum the days"
    if value == reference_days_with_growing_traffic(train / 3.0, first, g):
        return "inference costs 2·N per token and training 6·N: the target is 3 · train_tokens"
    if not float(value).is_integer():
        return "count whole days: the first day on which the running total reaches 3·D"
    if abs(value - expected) == 1:
        return (
            "off by one day: day 1 serves first_day_tokens, so after d days the total is "
            "first_day_tokens · (growth^d - 1) / (growth - 1)"
        )
    return "add up the tokens day by day until the total reaches 3 · train_tokens"


@exercise(
    "ch00.days_with_growing_traffic",
    difficulty="core",
    title="The crossover when traffic grows every day",
)
def _check_days_with_growing_traffic(answer: Any) -> str:
    inputs = [
        (15e12, 1e11, 1.0),  # flat traffic: 450 days
        (15e12, 1e11, 1.01),  # +1 % a day
        (14.8e12, 1e10, 1.02),
        (1e9, 1e6, 1.001),
        (15e12, 1e13, 1.05),  # overtaken within days
    ]
    inputs += unseen(lambda r: (r.uniform(1e9, 2e13), r.uniform(1e9, 1e12), r.uniform(1.0, 1.05)))
    return check_cases(
        answer,
        [(args, reference_days_with_growing_traffic(*args)) for args in inputs],
        exact=True,
        hint=_growth_hint,
    )


# --------------------------------------------------------------------------- stretch


def reference_gpu_time_crossover_tokens(
    train_tokens: float, train_utilisation: float, serve_utilisation: float
) -> float:
    """Served tokens after which inference has used as much GPU time as training did.

    GPU time = FLOPs / (peak · utilisation). Training: 6·N·D / (peak · u_train); serving T
    tokens: 2·N·T / (peak · u_serve). Equal at T = 3 · D · u_serve / u_train: a chip that
    decodes at a low utilisation reaches the training bill sooner than the FLOPs say.
    """
    return 3.0 * train_tokens * serve_utilisation / train_utilisation


def _gpu_time_hint(got: Any, expected: Any, args: Any) -> str:
    D, u_train, u_serve = args
    mistakes = [
        (
            3.0 * D * u_train / u_serve,
            "the ratio is upside down: a LOWER serving utilisation makes every served token "
            "cost MORE GPU time, so the crossover comes after FEWER tokens",
        ),
        (
            3.0 * D,
            "that is the FLOP crossover; GPU time also depends on how well each phase uses the chip",
        ),
        (
            D * u_serve / u_train,
            "training costs 6·N per token and inference 2·N: keep the factor 3",
        ),
    ]
    close = lambda a, b: _close(a, b, 1e-6)
    return first_matching_hint(got, expected, mistakes, close) or (
        "solve 2·N·T / (peak · u_serve) = 6·N·D / (peak · u_train) for T"
    )


@exercise(
    "ch00.gpu_time_crossover_tokens",
    difficulty="stretch",
    title="The crossover in GPU time, not FLOPs",
)
def _check_gpu_time_crossover_tokens(answer: Any) -> str:
    inputs = [(15e12, 0.4, 0.4), (15e12, 0.4, 0.02), (14.8e12, 0.35, 0.1), (1e9, 0.5, 0.8)]
    inputs += unseen(lambda r: (r.uniform(1e9, 2e13), r.uniform(0.05, 0.6), r.uniform(0.01, 0.9)))
    return check_cases(
        answer,
        [(args, reference_gpu_time_crossover_tokens(*args)) for args in inputs],
        rel=1e-6,
        hint=_gpu_time_hint,
    )
