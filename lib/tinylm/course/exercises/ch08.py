"""Checks for notebook 08, "Profiling inference cost".

Four small back-of-the-envelope calculations that the chapter's cost model is built from:
the arithmetic intensity of a decode step (warm-up), the memory-bound time of one decode
step from the bytes it reads and the chip's bandwidth (core), the dollars per million
output tokens of a throughput and a rental price (core), and the batch at which decode
stops being memory-bound: the ridge point turned into a batch size (stretch). Each check
runs the learner's function on a few inputs (Llama-3-8B-sized numbers, an H100 and an H20)
and the hint recognises the usual slip: a missing factor 2, GB/s taken as bytes/s, the KV
cache forgotten, hours taken as seconds.
"""

from __future__ import annotations

import math
from typing import Any

from tinylm.course.exercises.core import (
    Fail,
    call,
    check_cases,
    exercise,
    is_close,
    unseen,
)

# Plain arithmetic only: listing the exercises should not pay for importing torch.


# --------------------------------------------------------------------------- warm-up


def reference_decode_intensity(n_params: float, batch: int, bytes_per_weight: float) -> float:
    """FLOPs per byte of one decode step when only the weights are read (KV ignored).

    Each of the batch's tokens does 2 FLOPs (multiply + add) per weight; the weights are read
    once for the whole batch: 2 * n_params * batch / (n_params * bytes_per_weight).
    """
    return 2.0 * n_params * batch / (n_params * bytes_per_weight)


def _intensity_hint(got: Any, expected: float, args: Any) -> str | None:
    n_params, batch, bpw = args
    if is_close(got, expected / 2):
        return "count 2 FLOPs per weight per token: a multiply and an add"
    if is_close(got, expected / batch):
        return "every token of the batch uses the same weights: FLOPs grow with the batch, bytes do not"
    if is_close(got, 2.0 * batch * bpw):
        return "divide by the bytes per weight (a bf16 weight is 2 bytes), do not multiply"
    if is_close(got, 2.0 * n_params * batch):
        return "that is the FLOPs; divide by the bytes read (n_params * bytes_per_weight)"
    return None


@exercise("ch08.decode_intensity", difficulty="warm-up", title="Arithmetic intensity of decode")
def _decode_intensity(answer: Any) -> str:
    cases = [
        ((8.03e9, 1, 2), 1.0),
        ((8.03e9, 64, 2), 64.0),
        ((70.6e9, 8, 1), 16.0),
        ((1e6, 3, 4), 1.5),
    ]
    cases += [
        (args, reference_decode_intensity(*args))
        for args in unseen(
            lambda r: (r.uniform(1e6, 1e11), r.randint(1, 512), r.choice((0.5, 1, 2, 4)))
        )  # fmt: skip
    ]
    return check_cases(answer, cases, rel=1e-6, hint=_intensity_hint)


# --------------------------------------------------------------------------- core


def reference_decode_step_seconds(
    weight_bytes: float,
    kv_bytes_per_token: float,
    context: int,
    batch: int,
    bandwidth_gbps: float,
) -> float:
    """Memory-bound time of one decode step: (weights + every sequence's KV cache) / bandwidth.

    bandwidth_gbps is in 1e9 bytes per second, as datasheets print it.
    """
    read = weight_bytes + batch * context * kv_bytes_per_token
    return read / (bandwidth_gbps * 1e9)


def _step_hint(got: Any, expected: float, args: Any) -> str | None:
    wb, kv, ctx, batch, gbps = args
    if is_close(got, expected * 1e9):
        return "bandwidth_gbps is in GB/s: multiply by 1e9 to get bytes per second"
    if is_close(got, wb / (gbps * 1e9)):
        return "add the KV cache: every step reads the keys and values of all earlier tokens"
    if is_close(got, (wb + ctx * kv) / (gbps * 1e9)):
        return "each sequence in the batch has its own KV cache: multiply it by the batch"
    if is_close(got, batch * (wb + ctx * kv) / (gbps * 1e9)):
        return "the weights are read once per step for the whole batch, not once per sequence"
    return None


@exercise("ch08.decode_step_seconds", difficulty="core", title="Memory-bound decode time")
def _decode_step_seconds(answer: Any) -> str:
    kv8b = 131072  # Llama-3-8B, bf16: 2 * 32 layers * 8 KV heads * 128 * 2 bytes
    cases = [
        ((16.06e9, kv8b, 1024, 1, 3350), (16.06e9 + 1024 * kv8b) / 3.35e12),
        ((16.06e9, kv8b, 1024, 64, 4000), (16.06e9 + 64 * 1024 * kv8b) / 4.0e12),
        ((141.2e9, 327680, 4096, 8, 3350), (141.2e9 + 8 * 4096 * 327680) / 3.35e12),
    ]
    cases += [
        (args, reference_decode_step_seconds(*args))
        for args in unseen(
            lambda r: (
                r.uniform(1e6, 2e11),
                r.randint(1, 400_000),
                r.randint(1, 32768),
                r.randint(1, 64),
                r.uniform(50, 8000),
            )
        )  # fmt: skip
    ]
    return check_cases(answer, cases, rel=1e-6, hint=_step_hint)


def reference_usd_per_million_tokens(tokens_per_second: float, usd_per_hour: float) -> float:
    """Rental dollars per million tokens: seconds per million tokens times dollars per second."""
    return usd_per_hour / 3600.0 * 1e6 / tokens_per_second


def _usd_hint(got: Any, expected: float, args: Any) -> str | None:
    tps, usd = args
    if is_close(got, expected * 3600):
        return "the price is per HOUR: divide it by 3600 to get dollars per second"
    if is_close(got, expected / 1e6):
        return "that is dollars per token; the question asks per million tokens"
    if is_close(got, usd * tps / 3600 * 1e6) or is_close(got, usd * tps):
        return "more tokens per second should make a token cheaper: divide by the throughput"
    return None


@exercise("ch08.usd_per_million_tokens", difficulty="core", title="Dollars per million tokens")
def _usd_per_million(answer: Any) -> str:
    cases = [
        ((1000.0, 3.6), 1.0),
        ((265.5, 1.2), 1.2 / 3600 * 1e6 / 265.5),
        ((12000.0, 2.5), 2.5 / 3600 * 1e6 / 12000),
    ]
    cases += [
        (args, reference_usd_per_million_tokens(*args))
        for args in unseen(lambda r: (r.uniform(1, 50_000), r.uniform(0.1, 100)))
    ]
    return check_cases(answer, cases, rel=1e-6, hint=_usd_hint)


# --------------------------------------------------------------------------- stretch


def reference_compute_bound_batch(
    peak_tflops: float, bandwidth_gbps: float, bytes_per_weight: float
) -> int:
    """Smallest whole batch at which a decode step (weights only) reaches the ridge point.

    Decode intensity is 2 * batch / bytes_per_weight FLOPs per byte (warm-up); the chip's
    ridge point is peak / bandwidth. Decode turns compute-bound at
    batch >= ridge * bytes_per_weight / 2.
    """
    ridge = peak_tflops * 1e12 / (bandwidth_gbps * 1e9)
    return math.ceil(ridge * bytes_per_weight / 2 - 1e-9)


def _batch_hint(got: Any, expected: int, args: Any) -> str | None:
    tflops, gbps, bpw = args
    ridge = tflops * 1e12 / (gbps * 1e9)
    if is_close(got, ridge * bpw / 2) and not is_close(got, expected):
        return "a batch is a whole number of sequences: round UP (math.ceil)"
    if is_close(got, math.ceil(ridge)) or is_close(got, ridge):
        return "the ridge point is in FLOPs per byte; a batch of B gives 2B / bytes_per_weight"
    if is_close(got, math.ceil(ridge * bpw)):
        return "each token does 2 FLOPs per weight: divide by 2"
    if is_close(got, math.ceil(tflops / gbps * bpw / 2)):
        return "TFLOPS are 1e12 and GB/s 1e9: the units differ by 1000"
    return None


@exercise(
    "ch08.compute_bound_batch", difficulty="stretch", title="The batch where decode hits the ridge"
)
def _compute_bound_batch(answer: Any) -> str:
    cases = [
        ((989, 3350, 2), 296),
        ((148, 4000, 2), 37),
        ((989, 3350, 1), 148),
        ((320, 1600, 0.5), 50),
    ]
    cases += [
        (args, reference_compute_bound_batch(*args))
        for args in unseen(
            lambda r: (r.randint(10, 2000), r.randint(100, 8000), r.choice((0.5, 1, 2, 4)))
        )  # fmt: skip
    ]
    for args, expected in cases:
        assert expected == reference_compute_bound_batch(*args)
        got = call(answer, *args)
        try:
            ok = float(got) == expected
        except (TypeError, ValueError):
            ok = False
        if not ok:
            hint = _batch_hint(got, expected, args)
            raise Fail(
                f"{getattr(answer, '__name__', 'your function')}{args} returned {got!r}, "
                f"expected {expected}" + (f". Hint: {hint}" if hint else "")
            )
    return f"all {len(cases)} cases match"
