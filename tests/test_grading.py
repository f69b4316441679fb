"""Tests for tinylm.course.grading and tinylm.course.wire: verdicts a student cannot forge.

The exercises graded here are registered by this file under chapters "ch98" and "ch99", so the tests
do not depend on any chapter's content. Each `grade_answers` call starts one worker process
(about 1-3 s); the notebooks batch several exercises so that a handful of calls cover the
right answer, the typical mistake, a stub, hard-coded answers, a loop, a crash, and the
tricks that forge grades in the student's kernel.
"""

from __future__ import annotations

import io
import json
import math
import struct

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from tinylm.course import wire
from tinylm.course.exercises import (
    Fail,
    call,
    case_seed,
    check_cases,
    exercise,
    expect_close,
    list_exercises,
    run_check,
    unseen,
    unseen_inputs,
)
from tinylm.course.grading import answer_expressions, grade_answers, solution_program

# --------------------------------------------------------------------------- test exercises


def reference_scaled_sum(xs: list[float], scale: float) -> float:
    return scale * math.fsum(xs)


def _scaled_sum_hint(got, expected, args):
    return "multiply the sum by scale" if math.isclose(got, math.fsum(args[0])) else None


@exercise("ch99.scaled_sum", difficulty="warm-up", title="test: a scaled sum")
def _check_scaled_sum(answer):
    inputs = [([1.0, 2.0, 3.0], 2.0), ([0.5], -1.0), ([4.0, -1.0], 3.0)]
    inputs += unseen(
        lambda r: ([r.uniform(-5, 5) for _ in range(r.randint(1, 6))], r.uniform(1.5, 3))
    )
    cases = [(args, reference_scaled_sum(*args)) for args in inputs]
    return check_cases(answer, cases, rel=1e-9, hint=_scaled_sum_hint)


@exercise("ch99.unit_norm", difficulty="core", title="test: scale a tensor to unit norm")
def _check_unit_norm(answer):
    g = torch.Generator().manual_seed(case_seed(5))
    for shape in [(3,), (2, 4)]:
        x = torch.randn(*shape, generator=g)
        expect_close(call(answer, x.clone()), x / x.norm(), rel=1e-5, what=f"x{list(shape)}")
    return "both tensors match"


@exercise("ch99.clip_in_place", difficulty="core", title="test: clip tensors in place")
def _check_clip_in_place(answer):
    g = torch.Generator().manual_seed(case_seed(6))
    tensors = [torch.randn(3, generator=g) * 4, torch.randn(2, generator=g)]
    total = float(torch.sqrt(sum((t * t).sum() for t in tensors)))
    want = [t * min(1.0, 1.0 / total) for t in tensors]
    call(answer, tensors, 1.0)  # the check inspects its own argument afterwards
    for got, expected in zip(tensors, want, strict=True):
        expect_close(
            got, expected, rel=1e-5, what="a tensor after clipping", hint="one global scale"
        )
    return "clipped in place"


@exercise("ch99.magic_number", difficulty="warm-up", title="test: a value answer")
def _check_magic_number(answer):
    if answer != 42:
        raise Fail(f"got {answer!r}, expected 42", hint="six times seven")
    return "right"


@exercise("ch99.echo", difficulty="stretch", title="test: give back what you get")
def _check_echo(answer):
    expect_close(call(answer, 3.0), 3.0, what="echo(3.0)")
    return "echoed"


CH99 = ["ch99.scaled_sum", "ch99.unit_norm", "ch99.clip_in_place", "ch99.magic_number", "ch99.echo"]


def _solution(source: str):
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["solution"]
    return cell


def _checks():
    return [
        new_code_cell('check("ch99.scaled_sum", scaled_sum)'),
        new_code_cell('check("ch99.unit_norm", unit_norm)'),
        new_code_cell('check("ch99.clip_in_place", clip_in_place)'),
        new_code_cell('check("ch99.magic_number", magic)'),
        new_code_cell('check("ch99.echo", echo)'),
    ]


HEADER = "import math\nimport torch\nfrom tinylm.exercises import check\n"
# Earlier cells the solutions rely on: a helper function, a variable, an import.
HELPERS = "UNIT = 1.0\n\ndef total(xs):\n    return math.fsum(xs)\n"
CORRECT = {
    "scaled_sum": "def scaled_sum(xs, scale):\n    return scale * total(xs) * UNIT\n",
    "unit_norm": "def unit_norm(x):\n    return x / torch.linalg.vector_norm(x)\n",
    "clip_in_place": (
        "def clip_in_place(tensors, max_norm):\n"
        "    norm = math.sqrt(sum(float((t * t).sum()) for t in tensors))\n"
        "    for t in tensors:\n"
        "        t.mul_(min(1.0, max_norm / norm))\n"
        "    return norm\n"
    ),
    "magic": "magic = 6 * 7\n",
    "echo": "def echo(x):\n    return x\n",
}


def _notebook(solutions: dict[str, str], extra_cells=(), checks=True):
    cells = [new_code_cell(HEADER), new_code_cell(HELPERS)]
    for source in solutions.values():
        cells.append(_solution(source))
    cells += list(extra_cells)
    if checks:
        cells += _checks()
    return new_notebook(cells=cells)


def _grade(notebook, chapter="ch99", **kwargs):
    verdicts, notes = grade_answers(json.loads(nbformat.writes(notebook)), chapter, **kwargs)
    return {v.exercise: v for v in verdicts}, notes


# Tricks that forge a perfect grade in the student's own kernel (they all worked against
# the grader that trusted the kernel's reports). None of them is in the slice the worker
# runs, and none can reach the grader's process.
FORGERIES = [
    # appends "passed" records to the grade file; the variable's name is split in pieces
    "import os, json\nname = 'TINYLM_' + 'GRADE' + '_FILE'\n"
    "with open(os.environ.get(name, os.devnull), 'a') as f:\n"
    "    for i in ('ch99.scaled_sum', 'ch99.unit_norm'):\n"
    "        f.write(json.dumps({'id': i, 'status': 'passed', 'message': 'ok'}) + '\\n')\n",
    # a check that passes everything
    "import tinylm.exercises as ex, tinylm.exercises.core as core\n"
    "def check(exercise_id, answer):\n    print('passed')\n    return True\n"
    "ex.check = core.check = check\n",
    # a replaced results registry and exercise registry
    "import tinylm.exercises.core as core\n"
    "core._RESULTS[:] = [core.Result(i, 'ch99', 'core', 'passed', 'ok') for i in core._REGISTRY]\n"
    "for i, e in list(core._REGISTRY.items()):\n"
    "    core._REGISTRY[i] = core.Exercise(i, e.chapter, e.difficulty, e.title, lambda a: 'ok')\n",
]


@pytest.fixture(scope="module")
def good():
    return _grade(_notebook(CORRECT, [new_code_cell(c) for c in FORGERIES]), seed=11)


@pytest.fixture(scope="module")
def bad():
    """Hard-coded answers, a loop, the typical mistake and a stub, in one notebook."""
    solutions = {
        # the answers the notebook's check shows, looked up: right there, wrong elsewhere
        "scaled_sum": (
            "SEEN = {(1.0, 2.0, 3.0): 12.0, (0.5,): -0.5, (4.0, -1.0): 9.0}\n\n"
            "def scaled_sum(xs, scale):\n    return SEEN.get(tuple(xs), 0.0)\n"
        ),
        "unit_norm": "def unit_norm(x):\n    while True:\n        pass\n",
        "clip_in_place": (  # per-tensor clipping: the typical mistake
            "def clip_in_place(tensors, max_norm):\n    for t in tensors:\n"
            "        t.mul_(min(1.0, max_norm / float(t.norm())))\n    return 0.0\n"
        ),
        "magic": "magic = ...  # YOUR CODE HERE\n",
        "echo": "def echo(x):\n    return x\n",
    }
    return _grade(_notebook(solutions), seed=12, exercise_seconds=5)


def test_correct_solutions_pass_on_seen_and_unseen_inputs(good):
    verdicts, notes = good
    assert {i: v.status for i, v in verdicts.items()} == dict.fromkeys(CH99, "passed")
    assert verdicts["ch99.scaled_sum"].unseen and verdicts["ch99.unit_norm"].unseen
    assert "also on unseen inputs" in verdicts["ch99.scaled_sum"].message
    assert not verdicts["ch99.magic_number"].unseen  # a value has no inputs to vary
    assert notes == []  # the forging cells never ran in the worker


def test_forging_in_the_kernel_changes_nothing():
    # The same forging cells with stubs: the grade file, the check and the registries the
    # kernel sees say "passed"; the grader's own verdict is "not attempted".
    stubs = {
        "scaled_sum": "def scaled_sum(xs, scale):\n    raise NotImplementedError\n",
        "unit_norm": "def unit_norm(x):\n    raise NotImplementedError\n",
        "clip_in_place": "def clip_in_place(tensors, max_norm):\n    raise NotImplementedError\n",
        "magic": "magic = ...\n",
        "echo": "def echo(x):\n    raise NotImplementedError\n",
    }
    cells = [new_code_cell(c) for c in FORGERIES]
    verdicts, _ = _grade(_notebook(stubs, cells), seed=13)
    assert {i: v.status for i, v in verdicts.items()} == dict.fromkeys(CH99, "not attempted")


def test_hard_coded_answers_fail_on_inputs_drawn_at_grading_time(bad):
    verdict = bad[0]["ch99.scaled_sum"]
    assert verdict.status == "failed" and verdict.unseen
    assert "not on inputs drawn at grading time (seed 12)" in verdict.message


def test_an_endless_loop_is_stopped_and_the_next_exercises_still_graded(bad):
    verdicts = bad[0]
    assert verdicts["ch99.unit_norm"].status == "failed"
    assert "time limit" in verdicts["ch99.unit_norm"].message
    assert verdicts["ch99.clip_in_place"].status == "failed"  # graded by a fresh worker


def test_the_typical_mistake_gets_its_hint_and_stubs_are_not_attempted(bad):
    verdicts = bad[0]
    assert "one global scale" in verdicts["ch99.clip_in_place"].message
    assert verdicts["ch99.magic_number"].status == "not attempted"


def test_crashes_unsendable_results_memory_and_network_fail_cleanly():
    solutions = {
        "scaled_sum": "def scaled_sum(xs, scale):\n    return lambda: 1\n",  # cannot travel
        "unit_norm": (
            "def unit_norm(x):\n    import socket\n    socket.create_connection(('127.0.0.1', 9))\n"
        ),
        "clip_in_place": (
            "def clip_in_place(tensors, max_norm):\n    return bytearray(64 * 2**30)\n"
        ),
        "magic": "magic = 6 * 7\n",
        "echo": "import os\n\ndef echo(x):\n    os._exit(3)\n",
    }
    verdicts, _ = _grade(_notebook(solutions), seed=14)
    assert "cannot be sent back" in verdicts["ch99.scaled_sum"].message
    assert "PermissionError" in verdicts["ch99.unit_norm"].message  # no network
    assert "MemoryError" in verdicts["ch99.clip_in_place"].message  # the address-space limit
    assert "died" in verdicts["ch99.echo"].message
    assert [v.status for v in verdicts.values()] == ["failed"] * 3 + ["passed", "failed"]


def test_a_missing_check_call_is_not_run_unless_the_instructor_names_the_answer():
    notebook = _notebook({"magic": "magic = 42\n"}, checks=False)
    verdicts, _ = _grade(notebook, seed=15)
    assert verdicts["ch99.magic_number"].status == "not run"
    verdicts, _ = _grade(notebook, seed=15, fallback={"ch99.magic_number": "magic"})
    assert verdicts["ch99.magic_number"].status == "passed"


# --------------------------------------------------------------------------- the slice


def test_the_slice_keeps_what_the_answer_needs_and_nothing_else():
    cells = [
        new_code_cell("import math\nimport matplotlib.pyplot as plt\n%matplotlib inline"),
        new_code_cell("SCALE = 2\nmodel = train_for_ten_minutes()\nplt.plot([1, 2])"),
        new_code_cell("@decorate(SCALE)\ndef helper(x):\n    return math.sqrt(x) * SCALE\n"),
        new_code_cell("cfg = Config()\ncfg.width = 3\nitems = []\nitems.append(cfg)\nprint(cfg)"),
        _solution("def answer(x):\n    return helper(x) + cfg.width + len(items)\n"),
        new_code_cell('check("ch99.scaled_sum", answer)\nanswer = None'),
        new_code_cell("SCALE = 100  # after the check: not part of the answer"),
        new_code_cell('if check("ch99.unit_norm", lambda x: answer):\n    pass'),
    ]
    steps, notes = solution_program(new_notebook(cells=cells), ["ch99.scaled_sum"])
    code = [s.source.strip() for s in steps if s.kind == "code"]
    assert code == [
        "import math",
        "SCALE = 2",
        "@decorate(SCALE)\ndef helper(x):\n    return math.sqrt(x) * SCALE",
        "cfg = Config()",
        "cfg.width = 3",
        "items = []",
        "items.append(cfg)",
        "def answer(x):\n    return helper(x) + cfg.width + len(items)",
    ]
    answers = [(s.exercise, s.source, s.cell) for s in steps if s.kind == "answer"]
    assert answers == [("ch99.scaled_sum", "answer", 6)] and notes == []
    assert answer_expressions(new_notebook(cells=cells)) == {
        "ch99.scaled_sum": "answer",
        "ch99.unit_norm": "lambda x: answer",
    }


def test_unseen_inputs_only_inside_the_block():
    assert unseen(lambda r: r.random()) == [] and case_seed(7) == 7
    with unseen_inputs(1) as drew:
        assert not drew()
        first = unseen(lambda r: r.random(), n=2)
        assert len(first) == 2 and drew() and case_seed(7) != 7
    with unseen_inputs(1):
        assert unseen(lambda r: r.random(), n=2) == first  # a seed reproduces its inputs
    assert unseen(lambda r: r.random()) == []


# --------------------------------------------------------------------------- the wire


def test_wire_round_trips_the_values_checks_compare():
    value = {
        "n": [1, 2.5, -0.0, float("inf"), True, None, "é", b"\x00\xff", Ellipsis],
        (1, 2): {3, 4},
        "a": np.arange(6, dtype=np.int16).reshape(2, 3),
        "s": np.float32(1.5),
        "t": (torch.randn(2, 3), torch.ones(2, dtype=torch.bfloat16)),
    }
    back = wire.decode(wire.encode(value))
    assert back["n"] == value["n"] and back[(1, 2)] == {3, 4}
    assert back["a"].dtype == np.int16 and (back["a"] == value["a"]).all()
    assert back["s"] == np.float32(1.5) and isinstance(back["s"], np.float32)
    assert torch.equal(back["t"][0], value["t"][0])
    assert back["t"][1].dtype == torch.bfloat16 and torch.equal(back["t"][1], value["t"][1])
    assert math.isnan(wire.decode(wire.encode(float("nan"))))


def test_wire_refuses_objects_and_pickles():
    for unsendable in (object(), lambda: 1, np.array([object()]), [1, {2: object()}]):
        with pytest.raises(wire.Unsendable):
            wire.encode(unsendable)
    # An object array smuggled in by hand needs a pickle to load: refused.
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    blob = buffer.getvalue()
    header = json.dumps({"value": {"$": "ndarray", "blob": 0}, "blobs": [len(blob)]}).encode()
    with pytest.raises(wire.WireError, match="bad array"):
        wire.decode(struct.pack("<Q", len(header)) + header + blob)
    for bad in (b"\x80\x04K\x01.", struct.pack("<Q", 2**40), b""):  # a pickle, a huge header
        with pytest.raises((wire.WireError, EOFError)):
            wire.decode(bad)
    header = json.dumps({"value": {"$": "module", "v": "os"}, "blobs": []}).encode()
    with pytest.raises(wire.WireError, match="unknown item"):
        wire.decode(struct.pack("<Q", len(header)) + header)


# --------------------------------------------------------------------------- every chapter


def _stub(*args, **kwargs):
    raise NotImplementedError


# Exercises whose answer is a value rather than a function have no inputs to vary.
VALUE_ANSWERS: set[str] = set()


def test_every_exercise_draws_inputs_the_learner_has_not_seen():
    # A new exercise gets them with one line: `inputs += unseen(lambda r: ...)` for fixed
    # inputs, or `case_seed(N)` where it seeds a generator (see tinylm.exercises).
    missing = []
    for ex in list_exercises():
        if ex.chapter in ("ch98", "ch99") or ex.id in VALUE_ANSWERS:
            continue
        with unseen_inputs(1) as drew:
            run_check(ex, _stub)
            if not drew():
                missing.append(ex.id)
    assert missing == []


# --------------------------------------------------------------------------- state changed in place


def _train(step, steps: int, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    losses = [step(model, optimizer, x, y) for _ in range(steps)]
    return model, losses


def _reference_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


@exercise("ch98.train_step", difficulty="core", title="test: one optimiser step in place")
def _check_train_step(answer):
    seed = case_seed(3)
    got, losses = _train(lambda *a: call(answer, *a), 3, seed)  # model and AdamW persist
    want, want_losses = _train(_reference_step, 3, seed)
    expect_close(got.weight, want.weight, rel=1e-5, what="the weights after 3 steps")
    expect_close(losses[-1], want_losses[-1], rel=1e-5, what="the loss of step 3")
    return "3 steps match"


def test_modules_and_optimizers_changed_in_place_come_back():
    # The learner's step updates the weights and AdamW's moments in the worker; the check,
    # here, sees them (a step that forgot zero_grad would not match).
    step = (
        "import torch\n\ndef train_step(model, optimizer, x, y):\n"
        "    optimizer.zero_grad()\n"
        "    loss = torch.nn.functional.mse_loss(model(x), y)\n"
        "    loss.backward()\n    optimizer.step()\n    return loss.item()\n"
    )
    check = new_code_cell('check("ch98.train_step", train_step)')
    notebook = new_notebook(cells=[new_code_cell(HEADER), _solution(step), check])
    verdicts, _ = _grade(notebook, seed=16, chapter="ch98")
    assert verdicts["ch98.train_step"].status == "passed", verdicts["ch98.train_step"].message
    assert verdicts["ch98.train_step"].unseen
    forgetful = step.replace("    optimizer.zero_grad()\n", "")
    notebook.cells[1] = _solution(forgetful)
    verdicts, _ = _grade(notebook, seed=16, chapter="ch98")
    assert verdicts["ch98.train_step"].status == "failed"
