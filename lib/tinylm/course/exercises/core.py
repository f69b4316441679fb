"""The exercise registry, the `check` entry point and the helpers check functions use.

See the package docstring (`tinylm.exercises`) for how learners and chapter authors use it.
"""

from __future__ import annotations

import html
import importlib
import json
import math
import numbers
import os
import pkgutil
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from tinylm.util import in_notebook, is_number

DIFFICULTIES = ("warm-up", "core", "stretch")
Status = Literal["passed", "failed", "not_attempted"]

_ID_RE = re.compile(r"^(ch\d{2})\.[a-z][a-z0-9_]*$")
_CHAPTER_RE = re.compile(r"^(?:ch)?(\d{1,2})$")
_NOT_ATTEMPTED = (
    "not attempted yet: write your solution in the cell above (replace the "
    "`raise NotImplementedError`), run that cell, then run this check again."
)

# A hint is a fixed string, or a function of (got, expected, args) that recognises a typical
# mistake and returns a targeted hint (or None to fall back to no hint).
Hint = str | Callable[[Any, Any, Any], "str | None"] | None


class Fail(Exception):
    """Raised by a check function when the learner's answer is wrong.

    ``message`` says what is wrong (the failing input, expected vs got); ``hint`` suggests
    how to fix it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def full_message(self) -> str:
        """The message followed by the hint (if any) on its own line."""
        return self.message + (f"\nHint: {self.hint}" if self.hint else "")


class NotAttempted(Exception):
    """Raised when the answer is still a stub (``NotImplementedError``, ``None`` or ``...``)."""


@dataclass(frozen=True)
class Exercise:
    """One registered exercise: its id, chapter, difficulty, title and check function."""

    id: str
    chapter: str
    difficulty: str
    title: str
    check_fn: Callable[[Any], str | None] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Result:
    """The outcome of one `check` call (also what is written to the grade file)."""

    id: str
    chapter: str
    difficulty: str
    status: Status
    message: str

    def to_json(self) -> str:
        """One line of the grade file: the fields above as a JSON object."""
        return json.dumps(asdict(self), ensure_ascii=False)


_REGISTRY: dict[str, Exercise] = {}
_LOADED_CHAPTERS: set[str] = set()
_RESULTS: list[Result] = []
T = TypeVar("T")


# --------------------------------------------------------------------------- registration


def exercise(
    exercise_id: str, *, difficulty: str, title: str
) -> Callable[[Callable[[Any], str | None]], Callable[[Any], str | None]]:
    """Register the decorated function as the check for ``exercise_id``.

    The function receives the learner's answer, raises `Fail` (or ``AssertionError``) when it
    is wrong and may return a short success message such as "all 4 cases match".
    """
    match = _ID_RE.match(exercise_id)
    if match is None:
        raise ValueError(
            f"exercise id {exercise_id!r} is malformed: use 'chNN.snake_case_name', "
            "e.g. 'ch03.cosine_lr' (NN = the notebook's two-digit number)"
        )
    if difficulty not in DIFFICULTIES:
        raise ValueError(
            f"difficulty {difficulty!r} of {exercise_id} is unknown: use one of {DIFFICULTIES}"
        )

    def register(fn: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
        old = _REGISTRY.get(exercise_id)
        # Re-registering from the same function (a module reload) is fine; a second,
        # different check under the same id is a copy-paste slip worth stopping.
        if old is not None and (
            old.check_fn.__module__,
            old.check_fn.__qualname__,
        ) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"exercise {exercise_id} is already registered by "
                f"{old.check_fn.__module__}.{old.check_fn.__qualname__}: pick another id"
            )
        _REGISTRY[exercise_id] = Exercise(
            id=exercise_id,
            chapter=match.group(1),
            difficulty=difficulty,
            title=title,
            check_fn=fn,
        )
        return fn

    return register


def _normalise_chapter(chapter: str | int) -> str:
    match = _CHAPTER_RE.match(str(chapter).strip().lower())
    if match is None:
        raise ValueError(f"chapter {chapter!r} is not understood: use e.g. 3, '03' or 'ch03'")
    return f"ch{int(match.group(1)):02d}"


def _load_chapter(chapter: str) -> bool:
    """Import ``tinylm.exercises.<chapter>`` once; return False if it does not exist."""
    if chapter in _LOADED_CHAPTERS:
        return True
    module = f"{__package__}.{chapter}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return False
        raise
    _LOADED_CHAPTERS.add(chapter)
    return True


def _all_chapters() -> list[str]:
    package = importlib.import_module(__package__)
    names = (info.name for info in pkgutil.iter_modules(package.__path__))
    return sorted(name for name in names if re.fullmatch(r"ch\d{2}", name))


def list_exercises(chapter: str | int | None = None) -> list[Exercise]:
    """Return the registered exercises of one chapter (3, '03' or 'ch03'), or of all chapters."""
    chapters = _all_chapters() if chapter is None else [_normalise_chapter(chapter)]
    for name in chapters:
        _load_chapter(name)
    return [ex for ex in _REGISTRY.values() if ex.chapter in chapters]


def _get(exercise_id: str) -> Exercise:
    match = _ID_RE.match(exercise_id) if isinstance(exercise_id, str) else None
    if match is None:
        raise ValueError(
            f"exercise id {exercise_id!r} is malformed: ids look like 'ch00.training_flops'"
        )
    if exercise_id in _REGISTRY:  # also covers exercises registered outside a chNN module
        return _REGISTRY[exercise_id]
    chapter = match.group(1)
    if not _load_chapter(chapter):
        raise ValueError(
            f"there are no checks for chapter {chapter}: expected a module "
            f"lib/tinylm/course/exercises/{chapter}.py; check the exercise id {exercise_id!r}"
        )
    if exercise_id not in _REGISTRY:
        known = ", ".join(ex.id for ex in _REGISTRY.values() if ex.chapter == chapter)
        raise ValueError(f"unknown exercise {exercise_id!r}; {chapter} has: {known or 'none'}")
    return _REGISTRY[exercise_id]


# --------------------------------------------------------------------------- checking


def check(exercise_id: str, answer: Any) -> bool:
    """Check ``answer`` (a function or a value) for ``exercise_id`` and report the result.

    Prints (or, in a notebook, displays) one coloured line: passed, failed with the failing
    input, expected vs got and a hint, or not attempted. Never raises because of the answer;
    raises ValueError only for an unknown exercise id. Returns True only when it passed.
    """
    ex = _get(exercise_id)
    status, message = _run(ex, answer)
    result = Result(ex.id, ex.chapter, ex.difficulty, status, message)
    _RESULTS.append(result)
    _append_to_grade_file(result)
    _report(ex, result)
    return status == "passed"


def _run(ex: Exercise, answer: Any) -> tuple[Status, str]:
    if answer is None or answer is Ellipsis:
        return "not_attempted", _NOT_ATTEMPTED
    try:
        message = ex.check_fn(answer)
    except (NotAttempted, NotImplementedError):
        return "not_attempted", _NOT_ATTEMPTED
    except Fail as exc:
        return "failed", exc.full_message()
    except AssertionError as exc:
        return "failed", str(exc) or "an assertion in the check failed"
    except Exception as exc:  # the answer has an unexpected type or shape: report, never crash
        return "failed", f"the check could not use your answer: {type(exc).__name__}: {exc}"
    return "passed", message or "correct"


def results() -> list[Result]:
    """All check results of this session, oldest first (a copy)."""
    return list(_RESULTS)


def clear_results() -> None:
    """Forget this session's results (the grade file is left alone)."""
    _RESULTS.clear()


def _append_to_grade_file(result: Result) -> None:
    path = os.environ.get("TINYLM_GRADE_FILE")
    if not path:
        return
    try:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8") as f:
            f.write(result.to_json() + "\n")
    except OSError as exc:
        warnings.warn(
            f"could not append the result to TINYLM_GRADE_FILE={path!r} ({exc}); "
            "point the variable at a writable file or unset it",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- helpers for checks


def _fmt(value: Any) -> str:
    """A short, readable rendering of a value for failure messages."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):.4g}" if abs(int(value)) >= 10**6 else str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        kind = type(value).__name__
        return f"{kind}(shape={tuple(shape)}, dtype={value.dtype})"
    text = repr(value)
    if "\n" in text or " object at 0x" in text:  # a module or a plain object: name its type
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _call_repr(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    parts = [_fmt(a) for a in args] + [f"{k}={_fmt(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _resolve_hint(hint: Hint, got: Any, expected: Any, args: Any) -> str | None:
    if hint is None or isinstance(hint, str):
        return hint
    try:
        return hint(got, expected, args)
    except Exception:  # a hint must never turn a clear failure into a crash
        return None


def call(answer: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function; turn stubs and crashes into clear outcomes.

    ``NotImplementedError`` (a stub) becomes `NotAttempted`; any other exception becomes a
    `Fail` naming the input; a ``None`` result becomes a `Fail` hinting at a missing return.
    """
    if answer is None or answer is Ellipsis:
        raise NotAttempted()
    if not callable(answer):
        raise Fail(
            f"expected a function, got the {type(answer).__name__} {_fmt(answer)}",
            hint="pass the function itself, without calling it: check(id, my_function)",
        )
    name = getattr(answer, "__name__", "your function")
    try:
        result = answer(*args, **kwargs)
    except NotImplementedError:
        raise NotAttempted() from None
    except Exception as exc:
        raise Fail(f"{_call_repr(name, args, kwargs)} raised {type(exc).__name__}: {exc}") from None
    if result is Ellipsis:
        raise NotAttempted()
    if result is None:
        raise Fail(
            f"{_call_repr(name, args, kwargs)} returned None",
            hint="did you forget the `return` statement?",
        )
    return result


def is_close(a: Any, b: Any, rel: float = 1e-6, abs_tol: float = 0.0) -> bool:
    """True if a and b are numbers within `rel` (relative) or `abs_tol`; False for non-numbers.

    For telling a typical mistake's value apart in a hint; `expect_close` is the check itself.
    """
    try:
        return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_tol)
    except (TypeError, ValueError):
        return False


def first_matching_hint(
    got: Any,
    expected: Any,
    mistakes: Iterable[tuple[Any, str]],
    close: Callable[[Any, Any], bool] = is_close,
) -> str | None:
    """The hint of the first typical mistake whose value `got` matches, or None.

    `mistakes` pairs the value a typical mistake gives with the hint for it; a mistake whose
    value equals the right answer on these inputs cannot be told apart, so it is skipped.
    """
    for value, hint in mistakes:
        if close(got, value) and not close(value, expected):
            return hint
    return None


def _to_numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor, possibly on an accelerator
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=float)


def expect_close(
    got: Any,
    expected: Any,
    *,
    rel: float = 1e-6,
    abs_tol: float = 0.0,
    what: str = "your answer",
    hint: Hint = None,
    args: Any = None,
) -> None:
    """Raise `Fail` unless ``got`` is numerically close to ``expected``.

    Works for numbers, NumPy arrays and torch tensors (shapes must match). ``what`` names
    the thing being compared in the message, e.g. ``"training_flops(8e9, 1.5e13)"``.
    """
    if getattr(expected, "shape", ()) != ():  # arrays and tensors
        _expect_close_array(got, expected, rel, abs_tol, what, hint, args)
        return
    value = got.item() if getattr(got, "shape", None) == () and hasattr(got, "item") else got
    if not is_number(value, real=True):
        raise Fail(
            f"{what} should be a number, got the {type(got).__name__} {_fmt(got)}",
            _resolve_hint(hint, got, expected, args),
        )
    expected_value = float(expected)
    if not math.isclose(float(value), expected_value, rel_tol=rel, abs_tol=abs_tol):
        raise Fail(
            f"{what} gave {_fmt(value)}; expected {_fmt(expected_value)}",
            _resolve_hint(hint, float(value), expected_value, args),
        )


def _expect_close_array(
    got: Any, expected: Any, rel: float, abs_tol: float, what: str, hint: Hint, args: Any
) -> None:
    import numpy as np

    want = _to_numpy(expected)
    if getattr(got, "shape", None) is None and not isinstance(got, (list, tuple)):
        raise Fail(
            f"{what} should be an array of shape {want.shape}, got the "
            f"{type(got).__name__} {_fmt(got)}",
            _resolve_hint(hint, got, expected, args),
        )
    have = _to_numpy(got)
    if have.shape != want.shape:
        raise Fail(
            f"{what} has shape {have.shape}; expected {want.shape}",
            _resolve_hint(hint, got, expected, args),
        )
    bad = ~np.isclose(have, want, rtol=rel, atol=abs_tol)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise Fail(
            f"{what} differs at {int(bad.sum())} of {bad.size} positions; first at index "
            f"{index}: got {_fmt(have[index])}, expected {_fmt(want[index])} "
            f"(largest difference {_fmt(float(np.max(np.abs(have - want))))})",
            _resolve_hint(hint, got, expected, args),
        )


def expect_equal(
    got: Any, expected: Any, *, what: str = "your answer", hint: Hint = None, args: Any = None
) -> None:
    """Raise `Fail` unless ``got == expected`` (for ints, strings, lists, tuples, ...)."""
    if got != expected:
        raise Fail(
            f"{what} gave {_fmt(got)}; expected {_fmt(expected)}",
            _resolve_hint(hint, got, expected, args),
        )


def check_cases(
    answer: Any,
    cases: Iterable[tuple[Any, Any]],
    *,
    rel: float = 1e-6,
    abs_tol: float = 0.0,
    exact: bool = False,
    hint: Hint = None,
) -> str:
    """Call ``answer`` on each case and compare with the expected result.

    ``cases`` holds ``(arguments, expected)`` pairs; arguments is a tuple (positional), a
    dict (keyword arguments) or a single value. Comparison is `expect_close` (or
    `expect_equal` with ``exact=True``). Returns a success message for the check to return.
    """
    name = getattr(answer, "__name__", "your function")
    count = 0
    for arguments, expected in cases:
        if isinstance(arguments, dict):
            args, kwargs = (), arguments
        else:
            args, kwargs = (arguments if isinstance(arguments, tuple) else (arguments,)), {}
        got = call(answer, *args, **kwargs)
        what = _call_repr(name, args, kwargs)
        if exact:
            expect_equal(got, expected, what=what, hint=hint, args=arguments)
        else:
            expect_close(
                got, expected, rel=rel, abs_tol=abs_tol, what=what, hint=hint, args=arguments
            )
        count += 1
    return f"all {count} cases match"


# --------------------------------------------------------------------------- unseen inputs
#
# In the notebook a check uses fixed inputs, so the learner sees the same cases every run.
# The grader (tinylm.course.grading) runs each check a second time inside `unseen_inputs`,
# where `case_seed` and `unseen` hand out inputs drawn from a seed chosen at grading time:
# an answer that hard-codes the results the notebook showed fails there.


class _Unseen:
    rng: random.Random | None = None
    drawn = False


def case_seed(seed: int) -> int:
    """The seed a check draws its random inputs from: ``seed`` in the notebook, fresh when graded.

    Use it wherever a check seeds a generator, e.g.
    ``g = torch.Generator().manual_seed(case_seed(2))``. When graded, every call returns a
    new seed: where the reference and the learner's run must see the same inputs (e.g. two
    helpers that each build the data), call it once per check and pass the seed down.
    """
    if _Unseen.rng is None:
        return seed
    _Unseen.drawn = True
    return _Unseen.rng.randrange(2**31)


def unseen(draw: Callable[[random.Random], T], n: int = 3) -> list[T]:
    """Extra inputs for a check: none in the notebook, ``n`` calls of ``draw(rng)`` when graded.

    Append them to a check's fixed inputs, e.g.
    ``inputs = [(8e9, 15e12), ...] + unseen(lambda r: (r.uniform(1e6, 1e11), r.uniform(1e9, 1e13)))``;
    the reference computes their expected results like those of the fixed ones.
    """
    if _Unseen.rng is None:
        return []
    _Unseen.drawn = True
    return [draw(_Unseen.rng) for _ in range(n)]


@contextmanager
def unseen_inputs(seed: int) -> Iterator[Callable[[], bool]]:
    """Within this block `case_seed` and `unseen` draw from ``seed`` (used by the grader).

    Yields a function that tells whether the check drew any unseen input (ask it inside
    the block: leaving the block restores the notebook's fixed inputs).
    """
    saved = (_Unseen.rng, _Unseen.drawn)
    _Unseen.rng, _Unseen.drawn = random.Random(seed), False
    try:
        yield lambda: _Unseen.drawn
    finally:
        _Unseen.rng, _Unseen.drawn = saved


def run_check(ex: Exercise, answer: Any) -> tuple[Status, str]:
    """Run ``ex``'s check on ``answer`` and return (status, message); never raises for it."""
    return _run(ex, answer)


def _log_input_size(log: list[int], module: Any, inputs: Any, output: Any) -> None:
    log.append(int(inputs[0].numel()) if inputs and hasattr(inputs[0], "numel") else 1)


def log_forwards(owner: Any, module: Any) -> Any:
    """Record the input size of every forward of ``module`` in ``owner.forwards_seen``.

    For checks that watch *how* an answer computes (e.g. "feeds one token per step"):
    ``owner`` is the object handed to the learner's function and ``module`` it or one of
    its submodules. The hook is picklable and ``forwards_seen`` is copied back, so it also
    works when the grader runs the learner's function in its worker process (a lambda
    hook would not travel there). Returns the hook's handle (call ``.remove()`` after).
    """
    owner.forwards_seen = []
    owner.__grading_writeback__ = ("forwards_seen",)
    return module.register_forward_hook(partial(_log_input_size, owner.forwards_seen))


# --------------------------------------------------------------------------- reporting

_LABEL = {"passed": "✓ passed", "failed": "✗ failed", "not_attempted": "○ not attempted"}
_COLOUR = {"passed": "#1a7f37", "failed": "#cf222e", "not_attempted": "#9a6700"}


def _report(ex: Exercise, result: Result) -> None:
    heading = f"{_LABEL[result.status]}  {ex.id} · {ex.title} ({ex.difficulty})"
    text = heading + "".join(f"\n    {line}" for line in result.message.splitlines())
    if not in_notebook():  # rich HTML output only in a kernel
        print(text)
        return
    from IPython.display import display

    colour = _COLOUR[result.status]
    body = html.escape(result.message)
    markup = (
        f'<div style="border-left:4px solid {colour};padding:2px 10px;margin:4px 0">'
        f'<b style="color:{colour}">{html.escape(_LABEL[result.status])}</b> '
        f"<code>{html.escape(ex.id)}</code> · {html.escape(ex.title)} "
        f'<span style="opacity:0.7">({ex.difficulty})</span>'
        f'<div style="white-space:pre-wrap;font-size:90%">{body}</div></div>'
    )
    display({"text/html": markup, "text/plain": text}, raw=True)


@dataclass(frozen=True)
class Progress:
    """The latest status of each exercise in one or all chapters (shown as a small table)."""

    rows: tuple[tuple[Exercise, str], ...]

    @property
    def passed(self) -> int:
        """How many exercises passed."""
        return sum(status == "passed" for _, status in self.rows)

    def __repr__(self) -> str:
        lines = [f"{self.passed}/{len(self.rows)} exercises passed"]
        for ex, status in self.rows:
            lines.append(f"  {status.replace('_', ' '):<14} {ex.id:<32} {ex.difficulty}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td style='color:{_COLOUR.get(status, 'inherit')}'>"
            f"{status.replace('_', ' ')}</td><td><code>{ex.id}</code></td>"
            f"<td>{html.escape(ex.title)}</td><td>{ex.difficulty}</td></tr>"
            for ex, status in self.rows
        )
        return (
            f"<p><b>{self.passed}/{len(self.rows)} exercises passed</b></p>"
            f"<table><tr><th>status</th><th>id</th><th>title</th><th>difficulty</th></tr>"
            f"{cells}</table>"
        )


def progress(chapter: str | int | None = None) -> Progress:
    """The latest result of each exercise of a chapter (or all): passed / failed / not checked."""
    latest = {r.id: r.status for r in _RESULTS}
    rows = tuple((ex, latest.get(ex.id, "not_checked")) for ex in list_exercises(chapter))
    return Progress(rows)
