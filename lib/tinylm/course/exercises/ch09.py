"""Checks for notebook 09, "Many chips".

The inputs are chosen so that the typical mistakes (one all-reduce per layer instead of two,
forgetting the ring factor 2 (tp-1)/tp, splitting the MLP's down projection by rows instead of
columns, re-sharding onto a degree that does not divide the heads) give a different answer,
and the hint names the mistake it recognised.
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
    unseen,
)

# --------------------------------------------------------------------------- warm-up


def reference_allreduce_bytes(
    tokens: int, d_model: int, n_layer: int, tp: int, bytes_per_value: int
) -> float:
    """Bytes each chip sends in one tensor-parallel forward of `tokens` tokens.

    Two all-reduces of tokens x d_model values per layer (after attention and after the MLP);
    a ring all-reduce sends 2 (tp - 1) / tp of the message from every chip. 0 for tp = 1.
    """
    return 2 * n_layer * 2 * (tp - 1) / tp * tokens * d_model * bytes_per_value


def _allreduce_hint(got: Any, expected: Any, args: Any) -> str:
    tokens, d, n_layer, tp, nbytes = args
    message = 2 * n_layer * tokens * d * nbytes
    mistakes = [
        (expected / 2, "there are TWO all-reduces per layer: after attention and after the MLP"),
        (message, "a ring all-reduce sends 2 (tp-1)/tp of the message per chip, not 1x"),
        (expected / nbytes, "count bytes: multiply by bytes_per_value"),
        (expected / n_layer, "every layer all-reduces: multiply by n_layer"),
        (expected * tp, "the ring factor is 2 (tp-1)/tp, not 2 (tp-1)"),
    ]
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-9)
    return first_matching_hint(got, expected, mistakes, close) or (
        "2 per layer x n_layer x 2 (tp-1)/tp x tokens x d_model x bytes_per_value"
    )


@exercise("ch09.allreduce_bytes", difficulty="warm-up", title="Bytes all-reduced per forward")
def _check_allreduce_bytes(answer: Any) -> str:
    cases = [
        ((1, 128, 4, 2, 4), None),
        ((1, 8192, 80, 8, 2), None),  # Llama-3-70B decode, batch 1, bf16
        ((2048, 8192, 80, 4, 2), None),  # a 2048-token prefill
        ((16, 64, 3, 1, 4), None),  # one chip: nothing to send
    ]
    cases += unseen(lambda r: ((r.randint(1, 4096), 64 * r.randint(1, 128), r.randint(1, 96), r.choice((1, 2, 4, 8)), r.choice((1, 2, 4))), None))  # fmt: skip
    cases = [(args, reference_allreduce_bytes(*args)) for args, _ in cases]
    return check_cases(answer, cases, rel=1e-9, hint=_allreduce_hint)


# --------------------------------------------------------------------------- core


def reference_shard_mlp(gate: Any, up: Any, down: Any, x: Any, world: int) -> list[Any]:
    """Each rank's partial output of the SwiGLU MLP down(silu(gate x) * up x).

    Rank r keeps hidden units r of `world` equal slices: rows of gate and up (column-parallel)
    and the same columns of down (row-parallel). The partial outputs sum to the full MLP: the
    sum is the all-reduce.
    """
    import torch.nn.functional as F

    parts = []
    for g, u, d in zip(gate.chunk(world, 0), up.chunk(world, 0), down.chunk(world, 1), strict=True):
        parts.append(F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d))
    return parts


@exercise("ch09.shard_mlp", difficulty="core", title="Split an MLP over ranks")
def _check_shard_mlp(answer: Any) -> str:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(case_seed(9))
    C, hidden = 8, 24
    gate, up = torch.randn(hidden, C, generator=g), torch.randn(hidden, C, generator=g)
    down, x = torch.randn(C, hidden, generator=g), torch.randn(3, C, generator=g)
    full = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    for world in (2, 3, 4):
        got = call(answer, gate, up, down, x, world)
        what = f"your function(gate, up, down, x, world={world})"
        if not isinstance(got, list | tuple) or len(got) != world:
            raise Fail(
                f"{what} should return a list of {world} partial outputs (one per rank)",
                "return [partial of rank 0, partial of rank 1, ...]",
            )
        expect_close(
            sum(got),
            full,
            rel=1e-4,
            abs_tol=1e-4,
            what=f"the sum of the partials of {what}",
            hint="split gate and up by ROWS (hidden units, dim 0) and down by COLUMNS (dim 1), "
            "with the same slice of hidden units on each rank",
        )
        for rank, (mine, ref) in enumerate(
            zip(got, reference_shard_mlp(gate, up, down, x, world), strict=True)
        ):
            expect_close(
                mine,
                ref,
                rel=1e-4,
                abs_tol=1e-4,
                what=f"rank {rank}'s partial of {what}",
                hint="rank r should hold the r-th contiguous slice of the hidden units "
                "(tensor.chunk(world, dim))",
            )
    return "partials match for 2, 3 and 4 ranks and sum to the full MLP"


# --------------------------------------------------------------------------- stretch


def reference_survivor_world(n_head: int, n_kv_head: int, mlp_hidden: int, world: int) -> int:
    """The tensor-parallel degree to re-shard onto after one of `world` workers died.

    The largest w < world that divides n_head, n_kv_head and mlp_hidden (every rank needs an
    equal share); 1 (one process serves alone) if no larger degree works.
    """
    return max(w for w in range(1, world) if not (n_head % w or n_kv_head % w or mlp_hidden % w))


@exercise("ch09.survivor_world", difficulty="stretch", title="Re-shard after a failure")
def _check_survivor_world(answer: Any) -> str:
    cases = [
        (4, 4, 344, 2),
        (4, 4, 344, 4),
        (8, 8, 64, 8),
        (8, 2, 64, 4),
        (12, 12, 48, 6),
        (6, 6, 36, 4),
    ]
    cases += unseen(lambda r: (lambda h: (h, r.choice([d for d in range(1, h + 1) if h % d == 0]), 4 * r.randint(4, 200), r.randint(2, 8)))(r.choice((4, 6, 8, 12, 16))))  # fmt: skip
    for args in cases:
        got = call(answer, *args)
        want = reference_survivor_world(*args)
        n_head, n_kv, hidden, world = args
        hint = None
        if got == world - 1 and want != world - 1:
            hint = (
                f"{world - 1} workers cannot take equal shares of n_head={n_head}, "
                f"n_kv_head={n_kv} and mlp_hidden={hidden}: pick a degree that divides all three"
            )
        elif isinstance(got, int) and got < want:
            hint = "take the LARGEST degree below world that divides all three sizes"
        expect_equal(
            got,
            want,
            what=f"your function(n_head={n_head}, n_kv_head={n_kv}, mlp_hidden={hidden}, "
            f"world={world})",
            hint=hint or "the largest w < world with n_head, n_kv_head, mlp_hidden all % w == 0",
        )
    return f"all {len(cases)} cases match"
