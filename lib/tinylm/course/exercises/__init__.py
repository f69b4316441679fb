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
result. In-memory results of this session are available from `results()`. These are
what the learner's own kernel reports, so the learner's code can forge them: the grader
(``python -m tinylm.classroom grade``) shows them and never counts them. It computes
its verdicts itself (`tinylm.course.grading`): each answer runs in a separate worker
process and the check below runs in the grader's process, on the notebook's inputs and
on inputs drawn at grading time.

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
3. Give the check inputs the learner has not seen, for grading (one line; a test checks
   that every exercise has them). In the notebook they add nothing, so the learner sees
   the same fixed cases every run; when the grader runs the check a second time inside
   `unseen_inputs`, they are drawn from a fresh seed, so an answer that hard-codes the
   results the notebook showed fails::

       inputs = [(8e9, 15e12), (37e9, 14.8e12)]
       inputs += unseen(lambda r: (r.uniform(1e6, 1e11), r.uniform(1e9, 2e13)))  # r: random.Random
       return check_cases(answer, [(a, reference(*a)) for a in inputs], hint=...)

   or, where the check seeds a generator, ``torch.Generator().manual_seed(case_seed(2))``
   (``np.random.default_rng(case_seed(7))``). Draw only valid inputs (shapes that divide,
   probabilities that sum to 1): the reference must be right on every draw. When graded,
   each `case_seed` call gives a new seed: call it once per case and pass it to every
   helper that must build the same inputs (the reference's run and the learner's).
4. Keep what grading needs in mind (nothing else to write: the same check function grades
   the submission). The grader calls the learner's function in a worker process, so:
   the check passes it arguments that pickle (tensors, configs, modules, lists; no
   lambdas or local functions, e.g. as forward hooks: use `log_forwards` to watch how an
   answer runs); the function returns values the safe channel carries (numbers, strings,
   lists, tuples, dicts, NumPy arrays, torch tensors; `tinylm.course.wire`); arguments
   the function changes in place come back only for tensors, arrays, lists and dicts (and
   the attributes an object lists in ``__grading_writeback__``). An answer that is a value
   rather than a function is evaluated in the worker and sent back the same way.
5. Keep a few deliberately wrong answers in ``tests/test_exercises.py`` (or the chapter's
   test file) to pin that each check fails with a helpful message, and the reference
   solution from the notebook to pin that it passes.
6. In the notebook, put the solution in a cell tagged ``solution`` (cell metadata
   ``{"tags": ["solution"]}``) and the ``check(...)`` call in the next, untagged cell, as
   ``check("chNN.id", name)``: the grader finds the answer through that call (and through
   the instructor's notebook if a student deleted it). The solution may use imports,
   helpers and variables of earlier cells: the grader runs those statements too.
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
