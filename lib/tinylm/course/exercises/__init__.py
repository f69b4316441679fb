"""Automatic checks for the workbook's exercises.

Learner side
------------
Each exercise in a notebook is a cell where you write a function (or compute a value),
followed by a cell that checks it::

    check("ch00.training_flops", training_flops)

`check` runs your answer on test inputs and prints one line: passed, failed (with the
failing input, what was expected, what your answer gave and a hint) or not attempted
(your cell still raises ``NotImplementedError``, or the answer is ``None`` / ``...``).
It never raises because of your answer; it returns True only when the check passed.

Grade file (for instructors)
----------------------------
When the environment variable ``TINYLM_GRADE_FILE`` names a file, every `check` appends
one JSON object per line (UTF-8) to it::

    {"id": "ch00.training_flops", "chapter": "ch00", "difficulty": "warm-up",
     "status": "passed", "message": "all 4 cases match"}

``status`` is one of ``passed``, ``failed``, ``not_attempted``. The file is append-only:
when an exercise was checked several times, the last line for its id is the current
result. In-memory results of this session are available from `results()`.

Adding a chapter's checks (chapter authors)
-------------------------------------------
1. Create ``lib/tinylm/course/exercises/chNN.py``, where ``NN`` is the notebook's two-digit number.
   It is imported lazily the first time a ``chNN.*`` id is checked or listed.
2. Register one check function per exercise with the `exercise` decorator. Ids are
   ``chNN.snake_case_name``; difficulty is ``"warm-up"``, ``"core"`` or ``"stretch"``. The
   check function receives the learner's answer and returns an optional short success
   message; it signals a wrong answer by raising `Fail` (or ``AssertionError``)::

       from tinylm.course.exercises import Fail, call, check_cases, exercise, expect_close

       @exercise("ch03.cosine_lr", difficulty="core", title="Warm-up plus cosine decay")
       def _cosine_lr(answer):
           # table-driven: (arguments, expected result); the message names the failing call
           return check_cases(answer, [((0, 100, 1e-3), 0.0), ((100, 100, 1e-3), 1e-3)],
                              hint="the learning rate rises linearly during warm-up")

       @exercise("ch03.final_loss", difficulty="warm-up", title="Read the final loss")
       def _final_loss(answer):
           expect_close(answer, 2.31, rel=0.05, what="your final loss")

   Use `call` to run a learner's function (it turns ``NotImplementedError`` into "not
   attempted" and other exceptions into a failure that names the input), and
   `expect_close` / `expect_equal` to compare (numbers, NumPy arrays, torch tensors). A
   ``hint`` may be a string or a function ``(got, expected, args) -> str | None`` that
   recognises a typical mistake (e.g. "you counted only the forward pass").
3. Keep a few deliberately wrong answers in ``tests/test_exercises.py`` (or the chapter's
   test file) to pin that each check fails with a helpful message, and the reference
   solution from the notebook to pin that it passes.
4. In the notebook, put the solution in a cell tagged ``solution`` (cell metadata
   ``{"tags": ["solution"]}``) and the ``check(...)`` call in the next, untagged cell.
"""

from __future__ import annotations

from tinylm.course.exercises.core import (
    DIFFICULTIES,
    Exercise,
    Fail,
    NotAttempted,
    Progress,
    Result,
    call,
    case_seed,
    check,
    check_cases,
    clear_results,
    exercise,
    expect_close,
    expect_equal,
    list_exercises,
    log_forwards,
    progress,
    results,
    run_check,
    unseen,
    unseen_inputs,
)

__all__ = [
    "DIFFICULTIES",
    "Exercise",
    "Fail",
    "NotAttempted",
    "Progress",
    "Result",
    "call",
    "case_seed",
    "check",
    "check_cases",
    "clear_results",
    "exercise",
    "expect_close",
    "expect_equal",
    "list_exercises",
    "log_forwards",
    "progress",
    "results",
    "run_check",
    "unseen",
    "unseen_inputs",
]
