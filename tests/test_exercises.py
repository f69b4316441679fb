"""Tests for tinylm.exercises: pass on right answers, helpful failures, stubs, grade file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinylm import exercises
from tinylm.exercises import Fail, check, expect_close, list_exercises, results
from tinylm.exercises.ch00 import (
    reference_arithmetic_intensity,
    reference_days_to_crossover,
    reference_decode_tokens_per_second,
    reference_training_flops,
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


def training_flops(n_params, n_tokens):
    return 6 * n_params * n_tokens


def training_flops_forward_only(n_params, n_tokens):  # deliberately wrong: no backward pass
    return 2 * n_params * n_tokens


def days_to_crossover(n_params, train_tokens, tokens_per_day):
    # N cancels: inference overtakes training after 3·D served tokens
    return 3 * train_tokens / tokens_per_day


def days_to_crossover_equal_cost(n_params, train_tokens, tokens_per_day):  # deliberately wrong
    return train_tokens / tokens_per_day


def arithmetic_intensity(n_tokens, d_in, d_out, bytes_per_value):
    flops = 2 * n_tokens * d_in * d_out
    return flops / (bytes_per_value * (n_tokens * d_in + d_in * d_out + n_tokens * d_out))


def arithmetic_intensity_weights_only(n_tokens, d_in, d_out, bytes_per_value):  # wrong
    return 2 * n_tokens * d_in * d_out / (bytes_per_value * d_in * d_out)


def decode_tokens_per_second(n_params, bytes_per_param, batch_size, mem_bandwidth, peak_flops):
    weight_bytes = n_params * bytes_per_param
    return min(batch_size * mem_bandwidth / weight_bytes, peak_flops / (2 * n_params))


def decode_memory_only(n_params, bytes_per_param, batch_size, mem_bandwidth, peak_flops):  # wrong
    return batch_size * mem_bandwidth / (n_params * bytes_per_param)


def stub(*args):
    raise NotImplementedError


def crashes(*args):
    return 1 / 0


def forgets_return(n_params, n_tokens):
    6 * n_params * n_tokens  # noqa: B018  (the mistake under test)


# ----------------------------------------------------------------- ch00


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch00.training_flops", training_flops),
        ("ch00.training_flops", reference_training_flops),
        ("ch00.days_to_crossover", days_to_crossover),
        ("ch00.days_to_crossover", reference_days_to_crossover),
        ("ch00.arithmetic_intensity", arithmetic_intensity),
        ("ch00.arithmetic_intensity", reference_arithmetic_intensity),
        ("ch00.decode_tokens_per_second", decode_tokens_per_second),
        ("ch00.decode_tokens_per_second", reference_decode_tokens_per_second),
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
        ("ch00.training_flops", training_flops_forward_only, ["expected 7.2e+23", "forward pass"]),
        ("ch00.days_to_crossover", days_to_crossover_equal_cost, ["expected 450", "ratio is 3"]),
        ("ch00.arithmetic_intensity", arithmetic_intensity_weights_only, ["weight bytes"]),
        ("ch00.decode_tokens_per_second", decode_memory_only, ["compute runs out"]),
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


@pytest.mark.parametrize("answer", [stub, None, ...])
def test_stub_is_not_attempted(answer, capsys):
    assert check("ch00.training_flops", answer) is False
    assert results()[-1].status == "not_attempted"
    assert "not attempted" in capsys.readouterr().out


def test_learner_exception_is_a_failure_not_a_crash():
    assert check("ch00.training_flops", crashes) is False
    message = results()[-1].message
    assert "ZeroDivisionError" in message and "crashes(8e+09, 1.5e+13)" in message


def test_missing_return_and_non_function_get_hints():
    check("ch00.training_flops", forgets_return)
    assert "returned None" in results()[-1].message and "return" in results()[-1].message
    check("ch00.training_flops", 7.2e23)
    assert "expected a function" in results()[-1].message


def test_grade_file_gets_one_json_line_per_check(tmp_path, monkeypatch):
    grade_file = tmp_path / "grades" / "alice.jsonl"
    monkeypatch.setenv("TINYLM_GRADE_FILE", str(grade_file))
    check("ch00.training_flops", training_flops)
    check("ch00.days_to_crossover", days_to_crossover_equal_cost)
    check("ch00.decode_tokens_per_second", stub)
    lines = [json.loads(line) for line in grade_file.read_text(encoding="utf-8").splitlines()]
    assert [line["status"] for line in lines] == ["passed", "failed", "not_attempted"]
    assert set(lines[0]) == {"id", "chapter", "difficulty", "status", "message"}
    assert lines[1]["id"] == "ch00.days_to_crossover" and lines[1]["chapter"] == "ch00"
    assert lines[2]["difficulty"] == "stretch"


def test_list_exercises_and_progress():
    ch00 = list_exercises(0)
    assert {ex.id for ex in ch00} >= {
        "ch00.training_flops",
        "ch00.days_to_crossover",
        "ch00.arithmetic_intensity",
        "ch00.decode_tokens_per_second",
    }
    assert {ex.difficulty for ex in ch00} == {"warm-up", "core", "stretch"}
    assert [ex.id for ex in list_exercises("ch00")] == [ex.id for ex in ch00]
    assert set(ex.id for ex in ch00) <= {ex.id for ex in list_exercises()}

    check("ch00.training_flops", training_flops)
    report = exercises.progress("ch00")
    assert report.passed == 1
    assert repr(report).startswith(f"1/{len(report.rows)} exercises passed")
    assert "<table>" in report._repr_html_()


@pytest.mark.parametrize("bad_id", ["ch00.no_such_exercise", "ch42.anything", "training_flops"])
def test_unknown_ids_raise_value_error(bad_id):
    with pytest.raises(ValueError, match="exercise|chapter"):
        check(bad_id, training_flops)


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
