"""Each chapter's typical wrong answers (tests/fixtures/classroom/chNN_wrong_answers.py) fail
their check with the hint written for that mistake, as a learner would see it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinylm.course.exercises import check, results

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "classroom").glob("ch*_wrong_answers.py"))


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name[:4])
def test_wrong_answers_fail_with_their_hint(fixture):
    wrong: dict = {}
    exec(compile(fixture.read_text(encoding="utf-8"), str(fixture), "exec"), wrong)
    assert wrong["HINTS"], f"{fixture.name} names no exercise"
    for exercise_id, hint in wrong["HINTS"].items():
        assert check(exercise_id, wrong[exercise_id.split(".")[1]]) is False
        result = results()[-1]
        assert result.status == "failed" and "Hint:" in result.message
        assert hint in result.message, result.message


def test_every_chapter_with_a_core_exercise_written_by_the_learner_has_a_fixture():
    names = {p.name[:4] for p in FIXTURES}
    assert {"ch00", "ch01", "ch02", "ch04"} <= names
