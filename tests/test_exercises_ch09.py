"""Tests for the chapter 09 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from tinylm.costs import ModelShape, estimate
from tinylm.distributed import valid_tp
from tinylm.exercises import list_exercises
from tinylm.exercises.ch09 import reference_allreduce_bytes, reference_survivor_world
from tinylm.hardware import this_machine
from tinylm.model import GPTConfig

# ----------------------------------------------------------------- learner answers


def allreduce_bytes(tokens, d_model, n_layer, tp, bytes_per_value):
    return 2 * n_layer * 2 * (tp - 1) / tp * tokens * d_model * bytes_per_value


def allreduce_bytes_one_per_layer(tokens, d_model, n_layer, tp, bytes_per_value):
    return allreduce_bytes(tokens, d_model, n_layer, tp, bytes_per_value) / 2


def shard_mlp(gate, up, down, x, world):
    return [
        F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        for g, u, d in zip(
            gate.chunk(world, 0), up.chunk(world, 0), down.chunk(world, 1), strict=True
        )
    ]


def shard_mlp_down_by_rows(gate, up, down, x, world):
    # wrong: every rank computes the whole MLP and divides by world (the sum is right,
    # but no rank holds a shard)
    h = F.silu(F.linear(x, gate)) * F.linear(x, up)
    return [F.linear(h, down) / world for _ in range(world)]


def survivor_world(n_head, n_kv_head, mlp_hidden, world):
    return max(w for w in range(1, world) if not (n_head % w or n_kv_head % w or mlp_hidden % w))


def survivor_world_minus_one(n_head, n_kv_head, mlp_hidden, world):
    return world - 1


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- references match the lib


def test_reference_allreduce_bytes_matches_the_cost_model():
    cfg = GPTConfig()
    est = estimate(ModelShape.from_config(cfg), this_machine(1.0, 1.0, link_gbps=1.0), tp=4)
    assert reference_allreduce_bytes(1, cfg.n_embd, cfg.n_layer, 4, 2) == pytest.approx(
        est.decode.comm_bytes
    )


def test_reference_survivor_world_matches_the_lib_rule():
    cfg = GPTConfig(n_head=8, n_embd=64)
    for world in (2, 4, 8):
        want = max(w for w in range(1, world) if valid_tp(cfg, w))
        assert reference_survivor_world(cfg.n_head, cfg.n_kv_head, cfg.mlp_hidden, world) == want


def test_chapter_has_three_levels():
    ch09 = [ex for ex in list_exercises() if ex.id.startswith("ch09.")]
    assert {ex.id for ex in ch09} == {
        "ch09.allreduce_bytes",
        "ch09.shard_mlp",
        "ch09.survivor_world",
    }
    assert {ex.difficulty for ex in ch09} == {"warm-up", "core", "stretch"}


@pytest.mark.parametrize(
    "exercise_id, answer",
    [
        ("ch09.allreduce_bytes", allreduce_bytes),
        ("ch09.shard_mlp", shard_mlp),
        ("ch09.survivor_world", survivor_world),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    "exercise_id, answer, hint",
    [
        ("ch09.allreduce_bytes", allreduce_bytes_one_per_layer, "TWO all-reduces"),
        ("ch09.shard_mlp", shard_mlp_down_by_rows, "rank r should hold"),
        ("ch09.survivor_world", survivor_world_minus_one, "divides all three"),
    ],
)
def test_typical_mistakes_fail_with_a_hint(exercise_id, answer, hint, exercise):
    exercise.fails(exercise_id, answer, "Hint:", hint)


@pytest.mark.parametrize(
    "exercise_id", ["ch09.allreduce_bytes", "ch09.shard_mlp", "ch09.survivor_world"]
)
def test_stubs_are_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)
