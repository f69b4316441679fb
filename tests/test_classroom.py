"""Tests for tinylm.classroom: the student edition and the grader.

The grading tests run real chapter-00 notebooks (about 10 s each on an idle 2-core machine):
the submissions are built at test time from notebooks/00_why_inference.ipynb by editing its
solution cells, so no big notebook is committed as a fixture.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from tinylm import classroom, exercises
from tinylm.classroom import (
    NOTEBOOK_DIR,
    STUB_MARKER,
    GradeRow,
    RunOutcome,
    Submission,
    chapter_notebooks,
    find_solution_dependencies,
    find_submissions,
    format_table,
    grade,
    grade_rows,
    is_solution,
    make_student_edition,
    stub_solution_source,
    student_notebook,
    write_csv,
)
from tinylm.course.grading import Verdict
from tinylm.exercises import check, list_exercises

CHAPTER_00 = NOTEBOOK_DIR / "00_why_inference.ipynb"
FIXTURES = Path(__file__).parent / "fixtures" / "classroom"
WRONG_ANSWERS = FIXTURES / "ch00_wrong_answers.py"
CH00 = [ex.id for ex in list_exercises("ch00")]


@pytest.fixture(autouse=True)
def _no_grade_file(monkeypatch):
    monkeypatch.delenv("TINYLM_GRADE_FILE", raising=False)
    exercises.clear_results()
    yield
    exercises.clear_results()


def _functions(source: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}


def _body_lines(source: str, node: ast.FunctionDef) -> list[str]:
    """The non-blank source lines of a function's body, docstring excluded."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    if not body:
        return []
    lines = source.splitlines()[body[0].lineno - 1 : body[-1].end_lineno]
    return [line.strip() for line in lines if line.strip()]


def _assert_is_stub(stub: ast.FunctionDef) -> None:
    body = stub.body[1:] if ast.get_docstring(stub) is not None else stub.body
    assert len(body) == 1 and isinstance(body[0], ast.Raise), ast.dump(stub)
    assert isinstance(body[0].exc, ast.Name) and body[0].exc.id == "NotImplementedError"


# =========================================================================== stubbing

TRICKY = '''\
import math
from itertools import pairwise as pairs  # kept


@functools.cache
@other.decorator(level=2)
def first(a: int,
          b: list[int] = (1, 2)) -> dict[str, int]:  # a comment after the colon
    """Multi-line
    docstring."""
    # how it works: the secret
    secret = a + sum(b)
    return {"x": secret}

def second(x): return x * 2

async def third(*args, key: str = ":", **kwargs) -> None:
    await something(args)

class Counter(Base):
    """Counts."""
    n: int = 3

    def bump(self, by: float = 1.0) -> float:
        self.n += by
        return self.n

total = 0
for step in range(3):
    total += step
lo, (mid, hi) = 1, (2, 3)
ratio: float = 0.5 * total
print(ratio)
'''


def test_stub_keeps_interface_and_removes_every_body():
    stub = stub_solution_source(TRICKY)
    tree = ast.parse(stub)  # valid Python
    assert "import math" in stub and "from itertools import pairwise as pairs" in stub
    assert "@functools.cache\n@other.decorator(level=2)\ndef first(a: int," in stub
    assert "-> dict[str, int]:\n" in stub and "a comment after the colon" not in stub
    assert '    """Multi-line\n    docstring."""\n    # YOUR CODE HERE\n' in stub
    original, stubbed = _functions(TRICKY), _functions(stub)
    assert set(stubbed) == {"first", "second"}
    for name, node in original.items():
        assert ast.dump(stubbed[name].args) == ast.dump(node.args)
        assert ast.dump(stubbed[name].returns or ast.Pass()) == ast.dump(node.returns or ast.Pass())
        _assert_is_stub(stubbed[name])
    third = next(n for n in tree.body if isinstance(n, ast.AsyncFunctionDef))
    _assert_is_stub(third)
    counter = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    assert ast.get_docstring(counter) == "Counts." and "    n: int = 3" in stub
    _assert_is_stub(next(n for n in counter.body if isinstance(n, ast.FunctionDef)))
    for line in ("total = ...", "step = ...", "lo = ...", "mid = ...", "hi = ..."):
        assert f"{line}  {STUB_MARKER}" in stub
    assert f"ratio: float = ...  {STUB_MARKER}" in stub
    for leaked in ("secret", "x * 2", "await", "self.n +=", "0.5", "print", "range(3)"):
        assert leaked not in stub, leaked


def test_stub_is_idempotent_and_keeps_indentation_style():
    stub = stub_solution_source(TRICKY)
    assert stub_solution_source(stub) == stub
    two_spaces = stub_solution_source("def f(x):\n  '''Doc.'''\n  return x\n")
    assert two_spaces == "def f(x):\n  '''Doc.'''\n  # YOUR CODE HERE\n  raise NotImplementedError"
    assert stub_solution_source("print(1)\n") == STUB_MARKER


def test_stub_rejects_ipython_syntax_with_a_clear_error():
    with pytest.raises(ValueError, match="plain Python"):
        stub_solution_source("%timeit f()\ndef f():\n    return 1\n")


def test_stubs_are_reported_as_not_attempted(capsys):
    namespace: dict = {}
    solution = 'def training_utilisation(n, d, hours, peak):\n    """Doc."""\n    return 6 * n * d / (hours * 3600 * peak)\n'
    exec(stub_solution_source(solution), namespace)
    assert check("ch00.training_utilisation", namespace["training_utilisation"]) is False
    exec(stub_solution_source("days = 3 * 15e12 / 1e11\n"), namespace)
    assert namespace["days"] is Ellipsis
    assert check("ch00.days_with_growing_traffic", namespace["days"]) is False
    assert [r.status for r in exercises.results()] == ["not_attempted", "not_attempted"]
    assert "not attempted" in capsys.readouterr().out


# =========================================================================== student edition


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    return out, make_student_edition(out, NOTEBOOK_DIR)


@pytest.mark.parametrize("source", chapter_notebooks(NOTEBOOK_DIR), ids=lambda p: p.stem)
def test_student_edition_has_no_solution_code(edition, source):
    out, _ = edition
    original = nbformat.read(source, as_version=4)
    student = nbformat.read(out / source.name, as_version=4)
    assert len(student.cells) == len(original.cells)
    assert "widgets" not in student.metadata
    n_solutions = 0
    for before, after in zip(original.cells, student.cells, strict=True):
        assert after.cell_type == before.cell_type
        assert after.metadata.get("tags") == before.metadata.get("tags")
        if after.cell_type == "code":
            assert after.outputs == [] and after.execution_count is None
        if not is_solution(before):
            assert after.source == before.source
            continue
        n_solutions += 1
        functions = _functions(before.source)
        stubs = _functions(after.source)
        assert set(stubs) == set(functions)  # every solution function keeps its name ...
        for name, node in functions.items():
            assert ast.dump(stubs[name].args) == ast.dump(node.args)  # ... and signature
            assert ast.get_docstring(stubs[name]) == ast.get_docstring(node)
            _assert_is_stub(stubs[name])
            for line in _body_lines(before.source, node):  # no line of the body survives
                assert line not in after.source, f"{source.name}: {line!r} leaked"
    assert n_solutions > 0, f"{source.name} has no solution cells"


def test_student_edition_writes_only_the_notebooks(edition):
    out, result = edition
    assert sorted(p.name for p in out.iterdir()) == [
        p.name for p in chapter_notebooks(NOTEBOOK_DIR)
    ]
    assert result.notebooks == [out / p.name for p in chapter_notebooks(NOTEBOOK_DIR)]


def test_student_edition_refuses_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="replace the solutions"):
        make_student_edition(NOTEBOOK_DIR, NOTEBOOK_DIR)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_student_edition(tmp_path / "out", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no chapter notebooks"):
        make_student_edition(tmp_path / "out", tmp_path)


def test_student_edition_command_line(tmp_path, capsys):
    nb = nbformat.v4.new_notebook(
        cells=[_solution("def f():\n    return 1\n"), new_code_cell("f()")]
    )
    (tmp_path / "src").mkdir()
    nbformat.write(nb, tmp_path / "src" / "07_demo.ipynb")
    args = ["student-edition", str(tmp_path / "out"), "--notebooks", str(tmp_path / "src")]
    assert classroom.main(args) == 0
    assert classroom.main([*args, "--strict"]) == 1  # cell 1 calls the solution directly
    captured = capsys.readouterr()
    assert "07_demo.ipynb" in captured.out and "cell 2 uses f" in captured.err
    assert classroom.main(["student-edition", str(tmp_path / "o"), "--notebooks", "nope"]) == 2


def _solution(source: str):
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["solution"]
    return cell


def test_dependency_warnings_find_unguarded_uses_only():
    cells = [
        _solution("def f(x):\n    return x\n"),
        new_code_cell('check("ch00.training_flops", f)'),  # fine
        new_code_cell("def g(f):\n    return f(1)\n[f for f in range(3)]"),  # f is local: fine
        new_code_cell('if check("ch00.training_flops", f):\n    y = f(2)\n'),  # guarded: fine
        new_code_cell("print(f(3))"),  # stops the student edition
        new_code_cell("print(y)"),  # y exists only when the check passed
        new_code_cell("f = len\nprint(f('ab'))"),  # rebound: fine from here on
        new_code_cell("%time f('x')"),
    ]
    warnings = find_solution_dependencies(nbformat.v4.new_notebook(cells=cells))
    assert len(warnings) == 2
    assert warnings[0].startswith("cell 5 uses f (stubbed from solution cell 1)")
    assert warnings[1].startswith("cell 6 uses y (only defined when the check in cell 4 passes)")


@pytest.mark.parametrize(
    "notebook", sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem[:2]
)
def test_every_chapter_student_edition_runs_past_unsolved_exercises(notebook):
    # the main path must never need a learner's solution (exercises are side quests)
    warnings = find_solution_dependencies(nbformat.read(notebook, as_version=4))
    assert warnings == [], "\n".join(warnings)


# =========================================================================== checks


def test_checks_pass_on_the_notebook_solutions_and_fail_on_wrong_answers(capsys):
    notebook = nbformat.read(CHAPTER_00, as_version=4)
    solutions: dict = {}
    for cell in notebook.cells:
        if is_solution(cell):
            exec(cell.source, solutions)
    wrong: dict = {}
    exec(WRONG_ANSWERS.read_text(encoding="utf-8"), wrong)
    assert sorted(wrong["HINTS"]) == sorted(CH00)
    for exercise_id in CH00:
        name = exercise_id.split(".")[1]
        assert check(exercise_id, solutions[name]) is True
        assert check(exercise_id, wrong[name]) is False
        result = exercises.results()[-1]
        assert result.status == "failed" and "expected" in result.message
        assert wrong["HINTS"][exercise_id] in result.message
    assert "✗ failed" in capsys.readouterr().out


# =========================================================================== grading (unit)


def test_find_submissions_layout_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_submissions(tmp_path / "missing")
    (tmp_path / "00_why_inference.ipynb").write_text("{}")
    with pytest.raises(FileNotFoundError, match="folder named after its student"):
        find_submissions(tmp_path)
    for name in ("alice/00_why_inference.ipynb", "alice/sub/01_x (1).ipynb", "bob/notes.ipynb"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "alice/.ipynb_checkpoints").mkdir()
    (tmp_path / "alice/.ipynb_checkpoints/00_why_inference.ipynb").write_text("{}")
    found = find_submissions(tmp_path)
    assert [(s.student, s.path.name, s.chapter) for s in found] == [
        ("alice", "00_why_inference.ipynb", "ch00"),
        ("alice", "01_x (1).ipynb", "ch01"),
    ]


def test_grade_rows_count_the_verdicts_and_only_show_what_the_kernel_reported():
    submission = Submission("alice", Path("alice/00_why_inference.ipynb"), "ch00")
    lines = [  # what the student's kernel wrote to the grade file: shown, never counted
        {"id": CH00[0], "status": "failed", "message": "first try"},
        {"id": CH00[0], "status": "passed", "message": "all 4 cases match"},
        {"id": CH00[1], "status": "passed", "message": "forged"},
    ]
    outcome = RunOutcome("error", "cell 12: ValueError: boom", 3.0, lines)
    verdicts = [
        Verdict(CH00[0], "passed", "all 4 cases match", unseen=True),
        Verdict(CH00[1], "not attempted", "stub"),
        Verdict(CH00[2], "failed", "wrong"),
        Verdict(CH00[3], "not run", "no check"),
    ]
    rows = grade_rows(submission, outcome, verdicts)
    assert [(r.exercise, r.status, r.reported) for r in rows] == [
        (CH00[0], "passed", "passed"),
        (CH00[1], "not attempted", "passed"),
        (CH00[2], "failed", ""),
        (CH00[3], "not run", ""),
    ]
    assert rows[1].message == "stub" and rows[2].run == "error: cell 12: ValueError: boom"


def test_table_and_csv(tmp_path):
    row = GradeRow(
        "alice", "00_x", "ch00", CH00[0], "warm-up", "failed", "x" * 200, "completed", 1.0
    )
    table = format_table([row])
    assert "alice" in table and "x" * 61 + "..." in table and "0/1 passed" in table
    write_csv([row], tmp_path / "g.csv")
    with open(tmp_path / "g.csv", encoding="utf-8", newline="") as f:
        (read,) = list(csv.DictReader(f))
    assert read["message"] == "x" * 200 and read["status"] == "failed"


GUARD_PROBE = """
import os, shutil, sys
exec(open(sys.argv[1]).read())
work, outside = sys.argv[2], sys.argv[3]
def attempt(label, fn):
    try:
        fn()
        print(label, "allowed")
    except PermissionError:
        print(label, "refused")
attempt("write inside", lambda: open(os.path.join(work, "a.txt"), "w").close())
attempt("rename inside", lambda: os.replace(os.path.join(work, "a.txt"), os.path.join(work, "b.txt")))
attempt("remove inside", lambda: os.remove(os.path.join(work, "b.txt")))
attempt("write outside", lambda: open(os.path.join(outside, "s.txt"), "a").close())
attempt("remove outside", lambda: os.remove(os.path.join(outside, "s.txt")))
attempt("rmtree outside", lambda: shutil.rmtree(outside))
attempt("move outside in", lambda: os.rename(os.path.join(outside, "s.txt"), os.path.join(work, "s")))
attempt("hardlink outside in", lambda: os.link(os.path.join(outside, "s.txt"), os.path.join(work, "h")))
os.symlink(outside, os.path.join(work, "link"))
attempt("write through symlink", lambda: open(os.path.join(work, "link", "s.txt"), "w").close())
attempt("remove the symlink", lambda: os.remove(os.path.join(work, "link")))
fd = os.open(outside, os.O_RDONLY)
attempt("remove via dir_fd", lambda: os.remove("s.txt", dir_fd=fd))
"""


def test_guard_refuses_changes_outside_the_working_copy(tmp_path):
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "s.txt").write_text("keep")
    guard = tmp_path / "guard.py"
    guard.write_text(classroom._GUARD_SOURCE)
    env = {**os.environ, "TINYLM_GRADE_ROOT": str(work)}
    command = [sys.executable, "-c", GUARD_PROBE, str(guard), str(work), str(outside)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    verdicts = dict(line.rsplit(" ", 1) for line in out.splitlines())
    assert verdicts == {
        "write inside": "allowed",
        "rename inside": "allowed",
        "remove inside": "allowed",
        "write outside": "refused",
        "remove outside": "refused",
        "rmtree outside": "refused",
        "move outside in": "refused",
        "hardlink outside in": "refused",
        "write through symlink": "refused",
        "remove the symlink": "allowed",
        "remove via dir_fd": "refused",
    }
    assert (outside / "s.txt").read_text() == "keep"


# =========================================================================== grading (end to end)


def _replace_solutions(notebook, sources: dict[str, str]):
    """Put ``sources[name]`` in the solution cell that defines function ``name``."""
    for cell in notebook.cells:
        if is_solution(cell):
            (name,) = _functions(cell.source)
            cell.source = sources.get(name, cell.source)
    return notebook


def _first_code_index(notebook) -> int:
    return next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade seven chapter-00 submissions: correct, wrong, empty, crashing, malicious, looping,
    forging."""
    root = tmp_path_factory.mktemp("grading")
    subs, slow = root / "submissions", root / "slow"
    original = nbformat.read(CHAPTER_00, as_version=4)
    empty = student_notebook(original)
    wrong_source = WRONG_ANSWERS.read_text(encoding="utf-8")
    wrong = {
        name: ast.get_source_segment(wrong_source, node)
        for name, node in _functions(wrong_source).items()
    }
    # A folder outside every working copy, and the "instructor's" data folder.
    outside = root / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("keep me")
    data = root / "data"
    (data / "checkpoints").mkdir(parents=True)
    (data / "checkpoints" / "sentinel.txt").write_text("checkpoint")

    crashing = nbformat.from_dict(json.loads(json.dumps(original)))
    first_check = next(
        i
        for i, c in enumerate(crashing.cells)
        if c.cell_type == "code" and 'check("ch00.' in c.source
    )
    crashing.cells.insert(first_check + 1, new_code_cell("ratio = 1 / 0"))

    malicious = student_notebook(original)
    malicious.cells.insert(
        _first_code_index(malicious),
        new_code_cell(
            textwrap.dedent(f"""\
            import os, pathlib, shutil
            # its own copy of the data folder: allowed
            (pathlib.Path(os.environ["TINYLM_DATA_DIR"]) / "checkpoints" / "sentinel.txt").unlink()
            try:
                shutil.rmtree({str(outside)!r})
            except PermissionError as error:
                print("refused:", error)
            os.remove({str(outside / "sentinel.txt")!r})
            """)
        ),
    )
    looping = student_notebook(original)
    looping.cells.insert(
        _first_code_index(looping),
        new_code_cell(
            "import os, time\nprint('kernel pid', os.getpid(), flush=True)\n"
            "while True:\n    time.sleep(0.2)"
        ),
    )
    # Three ways to forge a perfect grade in the student's own kernel, on the student
    # edition (stubs): a check that passes everything, replaced exercise and result
    # registries, and a last cell appending "passed" records to the grade file named by an
    # environment variable (its name split in pieces, so no review note flags it).
    forged = student_notebook(original)
    first = _first_code_index(forged) + 1
    forged.cells.insert(
        first,
        new_code_cell(
            "import tinylm.exercises as ex\nimport tinylm.exercises.core as core\n"
            "core.list_exercises('ch00')\n"
            "for i, e in list(core._REGISTRY.items()):\n"
            "    core._REGISTRY[i] = core.Exercise(i, e.chapter, e.difficulty, e.title, lambda a: 'ok')\n"
            "def check(exercise_id, answer):\n"
            "    result = core.Result(exercise_id, 'ch00', 'core', 'passed', 'ok')\n"
            "    core._RESULTS.append(result)\n"
            "    core._append_to_grade_file(result)\n"
            "    return False  # so the chapter keeps its own versions and runs to the end\n"
            "ex.check = core.check = check\n"
        ),
    )
    forged.cells.append(
        new_code_cell(
            "import json, os\nname = 'TINYLM_' + 'GRADE' + '_FILE'\n"
            "with open(os.environ[name], 'a') as f:\n"
            f"    for i in {CH00!r}:\n"
            "        f.write(json.dumps({'id': i, 'status': 'passed', 'message': 'ok'}) + '\\n')\n"
        )
    )
    notebooks = {
        subs / "mallory": forged,
        subs / "alice": original,
        subs / "bob": _replace_solutions(nbformat.read(CHAPTER_00, as_version=4), wrong),
        subs / "carol": empty,
        subs / "dave": crashing,
        subs / "frank": malicious,
        slow / "erin": looping,
    }
    for folder, notebook in notebooks.items():
        folder.mkdir(parents=True)
        nbformat.write(notebook, folder / CHAPTER_00.name)

    keep = root / "executed"
    with ThreadPoolExecutor(2) as pool:  # the looping one waits out its short limit alongside
        main = pool.submit(grade, subs, timeout=300, jobs=3, source_data_dir=data)
        hung = pool.submit(grade, slow, timeout=10, source_data_dir=data, keep_dir=keep)
        rows = main.result() + hung.result()
    write_csv(rows, root / "grades.csv")
    print(format_table(rows))
    return {"rows": rows, "outside": outside, "data": data, "keep": keep, "root": root}


def _by_student(rows: list[GradeRow]) -> dict[str, list[GradeRow]]:
    out: dict[str, list[GradeRow]] = {}
    for row in rows:
        out.setdefault(row.student, []).append(row)
    return out


@pytest.mark.slow
def test_grading_table(graded):
    table = {
        s: [(r.exercise, r.status) for r in rows] for s, rows in _by_student(graded["rows"]).items()
    }
    assert table == {
        "alice": [(ex, "passed") for ex in CH00],
        "bob": [(ex, "failed") for ex in CH00],
        "carol": [(ex, "not attempted") for ex in CH00],
        # graded from its solutions, although a cell after the first check crashed
        "dave": [(ex, "passed") for ex in CH00],
        "frank": [(ex, "not attempted") for ex in CH00],
        "erin": [(ex, "not attempted") for ex in CH00],
        "mallory": [(ex, "not attempted") for ex in CH00],
    }
    for row in _by_student(graded["rows"])["alice"]:
        assert "also on unseen inputs" in row.message  # inputs drawn at grading time


def test_forged_grades_are_shown_but_never_counted(graded):
    rows = _by_student(graded["rows"])["mallory"]
    # The replaced check and registries and the forged grade file all said "passed" ...
    assert all(r.run == "completed" and r.reported == "passed" for r in rows)
    # ... the grader ran the answers itself and found stubs.
    assert all(r.status == "not attempted" for r in rows)
    assert all("mentions the grading machinery" in r.note for r in rows)


@pytest.mark.slow
def test_wrong_answers_are_reported_with_their_hints(graded):
    wrong: dict = {}
    exec(WRONG_ANSWERS.read_text(encoding="utf-8"), wrong)
    for row in _by_student(graded["rows"])["bob"]:
        assert wrong["HINTS"][row.exercise] in row.message
        assert row.run == "completed"


@pytest.mark.slow
def test_student_edition_runs_headless_to_the_end(graded):
    for row in _by_student(graded["rows"])["carol"]:
        assert row.run == "completed" and "not attempted" in row.message


@pytest.mark.slow
def test_a_crash_stops_only_its_own_notebook(graded):
    rows = _by_student(graded["rows"])
    for row in rows["dave"]:
        assert "ZeroDivisionError" in row.run and row.run.startswith("error: cell")
    assert all(r.run == "completed" for r in rows["alice"])


@pytest.mark.slow
def test_a_looping_notebook_is_stopped_and_its_kernel_killed(graded):
    rows = _by_student(graded["rows"])["erin"]
    assert all(r.run.startswith("timeout") for r in rows)
    executed = nbformat.read(graded["keep"] / "erin" / CHAPTER_00.name, as_version=4)
    printed = "".join(
        o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
    )
    pid = int(printed.split("kernel pid")[1].split()[0])
    status = Path(f"/proc/{pid}/status")
    if status.exists():  # a zombie waiting to be reaped is dead too
        assert "zombie" in status.read_text()


@pytest.mark.slow
def test_a_notebook_cannot_touch_files_outside_its_working_copy(graded):
    rows = _by_student(graded["rows"])["frank"]
    assert all("PermissionError" in r.run for r in rows)
    assert (graded["outside"] / "sentinel.txt").read_text() == "keep me"
    assert (graded["data"] / "checkpoints" / "sentinel.txt").read_text() == "checkpoint"


@pytest.mark.slow
def test_grades_csv_matches_the_table(graded):
    with open(graded["root"] / "grades.csv", encoding="utf-8", newline="") as f:
        read = list(csv.DictReader(f))
    assert [(r["student"], r["exercise"], r["status"]) for r in read] == [
        (r.student, r.exercise, r.status) for r in graded["rows"]
    ]


def test_grade_command_line_errors(tmp_path, capsys):
    assert classroom.main(["grade", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
