"""Tests for tinylm.exercises: pass on right answers, helpful failures, stubs, grade file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tinylm import exercises
from tinylm.exercises import Fail, check, expect_close, list_exercises, results
from tinylm.exercises.ch00 import (
    reference_days_with_growing_traffic,
    reference_gpu_time_crossover_tokens,
    reference_predict_matmul_seconds,
    reference_training_utilisation,
)


@pytest.fixture
def scratch_exercise():
    """Register throw-away exercises under ch99 and remove them afterwards."""
    from tinylm.exercises import core

    added: list[str] = []

    def register(exercise_id: str, fn, difficulty: str = "core"):
        exercises.exercise(exercise_id, difficulty=difficulty, title="scratch")(fn)
        added.append(exercise_id)

    yield register
    for exercise_id in added:
        core._REGISTRY.pop(exercise_id, None)


# ----------------------------------------------------------------- learner answers (fixtures)
# The notebook's solutions (written independently of the references), then typical mistakes.


def training_utilisation(n_params, train_tokens, gpu_hours, peak_flops):
    return 6 * n_params * train_tokens / (gpu_hours * 3600 * peak_flops)


def utilisation_in_hours(n_params, train_tokens, gpu_hours, peak_flops):  # wrong: no 3600
    return 6 * n_params * train_tokens / (gpu_hours * peak_flops)


def utilisation_forward_only(n_params, train_tokens, gpu_hours, peak_flops):  # wrong: 2·N·D
    return 2 * n_params * train_tokens / (gpu_hours * 3600 * peak_flops)


def predict_matmul_seconds(n_tokens, d_in, d_out, bytes_per_value, bandwidth, peak_flops):
    flops = 2 * n_tokens * d_in * d_out
    moved = bytes_per_value * (n_tokens * d_in + d_in * d_out + n_tokens * d_out)
    return max(flops / peak_flops, moved / bandwidth)


def predict_sum(n_tokens, d_in, d_out, bytes_per_value, bandwidth, peak_flops):  # wrong: adds
    flops = 2 * n_tokens * d_in * d_out
    moved = bytes_per_value * (n_tokens * d_in + d_in * d_out + n_tokens * d_out)
    return flops / peak_flops + moved / bandwidth


def predict_weights_only(n_tokens, d_in, d_out, bytes_per_value, bandwidth, peak_flops):  # wrong
    return max(2 * n_tokens * d_in * d_out / peak_flops, bytes_per_value * d_in * d_out / bandwidth)


def days_with_growing_traffic(train_tokens, first_day_tokens, daily_growth):
    # closed form: first_day · (g^d - 1) / (g - 1) >= 3·D, solved for the first whole d
    target = 3 * train_tokens
    if daily_growth == 1:
        return math.ceil(target / first_day_tokens)
    g = daily_growth
    return math.ceil(math.log(1 + target * (g - 1) / first_day_tokens) / math.log(g))


def days_ignoring_growth(train_tokens, first_day_tokens, daily_growth):  # wrong: flat traffic
    return math.ceil(3 * train_tokens / first_day_tokens)


def days_without_the_3(train_tokens, first_day_tokens, daily_growth):  # wrong: target D
    return days_with_growing_traffic(train_tokens / 3, first_day_tokens, daily_growth)


def gpu_time_crossover_tokens(train_tokens, train_utilisation, serve_utilisation):
    return 3 * train_tokens * serve_utilisation / train_utilisation


def gpu_time_upside_down(train_tokens, train_utilisation, serve_utilisation):  # wrong ratio
    return 3 * train_tokens * train_utilisation / serve_utilisation


def stub(*args):
    raise NotImplementedError


def crashes(*args):
    return 1 / 0


def forgets_return(n_params, train_tokens, gpu_hours, peak_flops):
    6 * n_params * train_tokens / (gpu_hours * 3600 * peak_flops)  # noqa: B018 (the mistake)


# ----------------------------------------------------------------- ch00


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch00.training_utilisation", training_utilisation),
        ("ch00.training_utilisation", reference_training_utilisation),
        ("ch00.predict_matmul_seconds", predict_matmul_seconds),
        ("ch00.predict_matmul_seconds", reference_predict_matmul_seconds),
        ("ch00.days_with_growing_traffic", days_with_growing_traffic),
        ("ch00.days_with_growing_traffic", reference_days_with_growing_traffic),
        ("ch00.gpu_time_crossover_tokens", gpu_time_crossover_tokens),
        ("ch00.gpu_time_crossover_tokens", reference_gpu_time_crossover_tokens),
    ],
)
def test_correct_answers_pass(exercise_id, answer, capsys):
    assert check(exercise_id, answer) is True
    out = capsys.readouterr().out
    assert "✓ passed" in out and exercise_id in out
    assert results()[-1].status == "passed"


@pytest.mark.parametrize(
    ("exercise_id", "answer", "expected_in_message"),
    [
        ("ch00.training_utilisation", utilisation_in_hours, ["expected 0.1556", "3600"]),
        ("ch00.training_utilisation", utilisation_forward_only, ["forward pass"]),
        ("ch00.predict_matmul_seconds", predict_sum, ["not their sum"]),
        ("ch00.predict_matmul_seconds", predict_weights_only, ["x and y are big too"]),
        ("ch00.days_with_growing_traffic", days_ignoring_growth, ["expected 172", "grows"]),
        ("ch00.days_with_growing_traffic", days_without_the_3, ["3 · train_tokens"]),
        ("ch00.gpu_time_crossover_tokens", gpu_time_upside_down, ["upside down"]),
    ],
)
def test_wrong_answers_fail_with_input_expected_got_and_hint(
    exercise_id, answer, expected_in_message, capsys
):
    assert check(exercise_id, answer) is False
    result = results()[-1]
    assert result.status == "failed"
    # the message names the failing call, what it gave, and a targeted hint
    assert f"{answer.__name__}(" in result.message
    assert " gave " in result.message and "Hint:" in result.message
    for fragment in expected_in_message:
        assert fragment in result.message
    assert "✗ failed" in capsys.readouterr().out


def test_growth_reference_counts_whole_days():
    assert reference_days_with_growing_traffic(15e12, 1e11, 1.0) == 450  # 3·D / T exactly
    # 2 % a day: day 5 has served 1 + 1.02 + ... + 1.02^4 = 5.204 days' worth of day 1
    assert reference_days_with_growing_traffic(5.204 / 3, 1.0, 1.02) == 5
    assert reference_days_with_growing_traffic(5.205 / 3, 1.0, 1.02) == 6


def test_gpu_time_crossover_equals_flop_crossover_at_equal_utilisation():
    assert reference_gpu_time_crossover_tokens(15e12, 0.4, 0.4) == pytest.approx(45e12)
    assert reference_predict_matmul_seconds(1, 4096, 4096, 4, 20e9, 1e20) == pytest.approx(
        4 * (4096 * 4096 + 2 * 4096) / 20e9
    )


@pytest.mark.parametrize("answer", [stub, None, ...])
def test_stub_is_not_attempted(answer, capsys):
    assert check("ch00.training_utilisation", answer) is False
    assert results()[-1].status == "not_attempted"
    assert "not attempted" in capsys.readouterr().out


def test_learner_exception_is_a_failure_not_a_crash():
    assert check("ch00.training_utilisation", crashes) is False
    message = results()[-1].message
    assert "ZeroDivisionError" in message and "crashes(8e+09, 1.5e+13, 1.3e+06" in message


def test_missing_return_and_non_function_get_hints():
    check("ch00.training_utilisation", forgets_return)
    assert "returned None" in results()[-1].message and "return" in results()[-1].message
    check("ch00.training_utilisation", 0.4)
    assert "expected a function" in results()[-1].message


def test_grade_file_gets_one_json_line_per_check(tmp_path, monkeypatch):
    grade_file = tmp_path / "grades" / "alice.jsonl"
    monkeypatch.setenv("TINYLM_GRADE_FILE", str(grade_file))
    check("ch00.training_utilisation", training_utilisation)
    check("ch00.days_with_growing_traffic", days_ignoring_growth)
    check("ch00.gpu_time_crossover_tokens", stub)
    lines = [json.loads(line) for line in grade_file.read_text(encoding="utf-8").splitlines()]
    assert [line["status"] for line in lines] == ["passed", "failed", "not_attempted"]
    assert set(lines[0]) == {"id", "chapter", "difficulty", "status", "message"}
    assert lines[1]["id"] == "ch00.days_with_growing_traffic" and lines[1]["chapter"] == "ch00"
    assert lines[2]["difficulty"] == "stretch"


def test_list_exercises_and_progress():
    ch00 = list_exercises(0)
    assert {ex.id for ex in ch00} >= {
        "ch00.training_utilisation",
        "ch00.predict_matmul_seconds",
        "ch00.days_with_growing_traffic",
        "ch00.gpu_time_crossover_tokens",
    }
    assert {ex.difficulty for ex in ch00} == {"warm-up", "core", "stretch"}
    assert [ex.id for ex in list_exercises("ch00")] == [ex.id for ex in ch00]
    assert set(ex.id for ex in ch00) <= {ex.id for ex in list_exercises()}

    check("ch00.training_utilisation", training_utilisation)
    report = exercises.progress("ch00")
    assert report.passed == 1
    assert repr(report).startswith(f"1/{len(report.rows)} exercises passed")
    assert "<table>" in report._repr_html_()


@pytest.mark.parametrize("bad_id", ["ch00.no_such_exercise", "ch42.anything", "training_flops"])
def test_unknown_ids_raise_value_error(bad_id):
    with pytest.raises(ValueError, match="exercise|chapter"):
        check(bad_id, training_utilisation)


# ----------------------------------------------------------------- authoring helpers


def test_assertion_and_unexpected_errors_in_a_check_are_reported(scratch_exercise):
    def asserting(answer):
        assert answer == 3, "the answer should be 3"

    def fragile(answer):
        return f"{answer + 1}"  # a str answer makes this raise TypeError

    scratch_exercise("ch99.asserting", asserting)
    scratch_exercise("ch99.fragile", fragile)
    assert check("ch99.asserting", 4) is False
    assert results()[-1].message.startswith("the answer should be 3")
    assert check("ch99.fragile", "three") is False
    assert "could not use your answer: TypeError" in results()[-1].message
    assert check("ch99.asserting", 3) is True


def test_expect_close_compares_arrays_and_tensors():
    expect_close(torch.ones(2, 3), np.ones((2, 3)))
    with pytest.raises(Fail, match=r"shape \(3, 2\); expected \(2, 3\)"):
        expect_close(torch.ones(3, 2), torch.ones(2, 3))
    wrong = torch.ones(2, 3)
    wrong[1, 2] = 5.0
    with pytest.raises(Fail, match=r"1 of 6 positions; first at index \(1, 2\)"):
        expect_close(wrong, torch.ones(2, 3), what="attention output")
    with pytest.raises(Fail, match="should be a number"):
        expect_close("7", 7.0)
    expect_close(torch.tensor(2.0), 2.0)


def test_registration_validates_id_and_difficulty():
    with pytest.raises(ValueError, match="malformed"):
        exercises.exercise("chapter0.x", difficulty="core", title="t")
    with pytest.raises(ValueError, match="difficulty"):
        exercises.exercise("ch99.x", difficulty="hard", title="t")
