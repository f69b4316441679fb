"""Classroom tools: a student edition of the notebooks, and batch grading of submissions.

Two commands (see notebooks/README.md for the instructor's guide)::

    python -m tinylm.classroom student-edition OUTDIR [--notebooks notebooks/]
    python -m tinylm.classroom grade SUBMISSIONS_DIR [--timeout 600] [--out grades.csv]

**Student edition.** Every cell tagged ``solution`` is replaced by a stub: a function keeps
its decorators, signature (with type hints) and docstring, and its body becomes
``# YOUR CODE HERE`` + ``raise NotImplementedError``; imports are kept; a value the cell
computed becomes ``name = ...  # YOUR CODE HERE`` (``check`` reports ``...`` and
``NotImplementedError`` as "not attempted"). Outputs, execution counts and saved widget
state are removed from every cell, since they could show the answers. Only the chapter
notebooks are written. Cells after an exercise that use its solution outside ``check(...)``
would stop the student edition, so they are reported as warnings.

**Grading.** ``SUBMISSIONS_DIR`` holds one folder per student, named after the student,
with that student's notebooks inside (``alice/00_why_inference.ipynb``, ...). Each
notebook runs in its own process, kernel and fresh working copy (a temporary folder
holding the notebook and a copy of the instructor's data folder, which it reaches through
``TINYLM_DATA_DIR``), with a wall-clock limit; a notebook that crashes, loops or tries to
delete files cannot stop the others or change the instructor's files (see `grade`). The
verdicts do not come from that run: what the student's kernel reports can be forged by
the student's code, so it is shown (column ``reported``) and never counted. Each
exercise's answer is instead run in a fresh worker process and checked in the grader's
own process, also on inputs drawn at grading time (`tinylm.course.grading`).
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from tinylm.course.exercises import list_exercises
from tinylm.course.grading import (
    EXERCISE_SECONDS,
    GUARD_SOURCE,
    Verdict,
    answer_expressions,
    grade_answers,
    kill_session,
)
from tinylm.paths import REPO_ROOT, data_dir

_GUARD_SOURCE = GUARD_SOURCE  # the kernel's guard (also installed in the grading worker)

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
SOLUTION_TAG = "solution"
STUB_MARKER = "# YOUR CODE HERE"
_CHAPTER_FILE = re.compile(r"^(\d{2})_.*\.ipynb$")
# Cell metadata that records a past run (timings, scroll state) rather than the content.
_RUN_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")


def chapter_notebooks(folder: Path) -> list[Path]:
    """Return the chapter notebooks (``NN_slug.ipynb``) directly inside ``folder``, sorted."""
    return sorted(p for p in Path(folder).glob("*.ipynb") if _CHAPTER_FILE.match(p.name))


def is_solution(cell: dict[str, Any]) -> bool:
    """True when the cell carries the ``solution`` tag."""
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


# =========================================================================== stubbing


def stub_solution_source(source: str) -> str:
    """Return the stub that replaces a solution cell's ``source`` in the student edition.

    Per top-level statement: imports are kept; a function (or async function) keeps its
    decorators, signature and docstring, and its body becomes ``# YOUR CODE HERE`` and
    ``raise NotImplementedError``; a class keeps its header, docstring and annotated fields
    and has its methods stubbed the same way; every other statement is dropped, and each
    name it bound becomes ``name = ...  # YOUR CODE HERE``. Comments are dropped (they
    explain the solution). Stubbing a stub gives the same stub.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(
            f"a solution cell is not valid Python ({exc.msg}, line {exc.lineno}); solution "
            "cells must hold plain Python (no %magics or !shell lines): move those to an "
            "untagged cell"
        ) from None
    lines = source.splitlines()
    chunks: list[tuple[bool, str]] = []  # (is a def/class block, text)
    bound: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            chunks.append((False, ast.get_source_segment(source, node) or ""))
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            chunks.append((True, _stub_function(source, lines, node)))
            bound.add(node.name)
        elif isinstance(node, ast.ClassDef):
            chunks.append((True, _stub_class(source, lines, node)))
            bound.add(node.name)
        else:
            for name, annotation in _assigned_names(node, source):
                if name not in bound:
                    bound.add(name)
                    typed = f": {annotation}" if annotation else ""
                    chunks.append((False, f"{name}{typed} = ...  {STUB_MARKER}"))
    if not chunks:
        return STUB_MARKER
    text = chunks[0][1]
    for (prev_block, _), (block, chunk) in pairwise(chunks):
        # Black's layout: two blank lines around top-level functions and classes.
        text += ("\n\n\n" if prev_block or block else "\n") + chunk
    return text


def _header_end(lines: list[str], node: ast.AST) -> tuple[int, int]:
    """(line index, column) just after the ``:`` ending a def/class header."""
    first = node.lineno - 1
    text = "\n".join([lines[first][node.col_offset :], *lines[first + 1 :]]) + "\n"
    depth = 0
    # The tokenizer is lazy: it stops at the colon, before any indentation it would dislike.
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type != tokenize.OP:
            continue
        if tok.string in {"(", "[", "{"}:
            depth += 1
        elif tok.string in {")", "]", "}"}:
            depth -= 1
        elif tok.string == ":" and depth == 0:
            row, col = tok.end
            return first + row - 1, col + (node.col_offset if row == 1 else 0)
    raise ValueError(f"could not find the end of the header on line {node.lineno}")


def _header(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    """The decorators and the ``def ...:`` / ``class ...:`` line(s), comments after ``:`` cut."""
    start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    end_line, end_col = _header_end(lines, node)
    return "\n".join([*lines[start:end_line], lines[end_line][:end_col]])


def _body_indent(lines: list[str], node: ast.AST, header_end_line: int) -> str:
    """The indentation of the body (taken from the source, so tabs and 2-space styles work)."""
    first = node.body[0]
    if first.lineno - 1 > header_end_line:
        return lines[first.lineno - 1][: first.col_offset]
    outer = lines[node.lineno - 1][: node.col_offset]
    return outer + "    "  # a one-line ``def f(): ...``


def _docstring(source: str, node: ast.AST, indent: str) -> list[str]:
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return [indent + ast.get_source_segment(source, first)]
    return []


def _stub_function(
    source: str, lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef
) -> str:
    indent = _body_indent(lines, node, _header_end(lines, node)[0])
    body = [*_docstring(source, node, indent), indent + STUB_MARKER]
    body.append(indent + "raise NotImplementedError")
    return "\n".join([_header(lines, node), *body])


def _stub_class(source: str, lines: list[str], node: ast.ClassDef) -> str:
    indent = _body_indent(lines, node, _header_end(lines, node)[0])
    parts: list[tuple[bool, str]] = [(False, line) for line in _docstring(source, node, indent)]
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append((True, _stub_function(source, lines, item)))
        elif isinstance(item, ast.ClassDef):
            parts.append((True, _stub_class(source, lines, item)))
        elif isinstance(item, ast.AnnAssign):  # a field (e.g. of a dataclass) is interface
            parts.append((False, indent + (ast.get_source_segment(source, item) or "")))
    if not parts:
        parts.append((False, f"{indent}pass  {STUB_MARKER}"))
    text = _header(lines, node) + "\n" + parts[0][1]
    for (prev_block, _), (block, chunk) in pairwise(parts):
        text += ("\n\n" if prev_block or block else "\n") + chunk
    return text


_NEW_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)


def _scope_nodes(node: ast.AST) -> Iterable[ast.AST]:
    """Nodes of ``node`` in source order, not descending into nested scopes."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _NEW_SCOPES):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield ast.Name(id=child.name, ctx=ast.Store())  # the name it binds here
            continue
        yield from _scope_nodes(child)


def _bound_here(node: ast.AST) -> list[str]:
    """Names a statement binds in its own scope, in order of first appearance."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]  # its body is a scope of its own
    names = [
        n.id for n in _scope_nodes(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    ]
    return list(dict.fromkeys(names))


def _assigned_names(node: ast.stmt, source: str) -> list[tuple[str, str | None]]:
    """(name, annotation source or None) for each name a non-def statement binds."""
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [(node.target.id, ast.get_source_segment(source, node.annotation))]
    return [(name, None) for name in _bound_here(node)]


def student_notebook(notebook: Any) -> Any:
    """Return a copy of ``notebook`` (an nbformat v4 node) made into the student edition.

    Solution code cells become stubs (`stub_solution_source`), solution markdown cells a
    placeholder, and every cell loses its outputs, execution count and run metadata. The
    ``solution`` tags stay, so making a student edition of a student edition changes nothing.
    """
    nb = copy.deepcopy(notebook)
    nb.metadata.pop("widgets", None)  # saved widget state can show computed answers
    for index, cell in enumerate(nb.cells, start=1):
        for key in _RUN_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        if not is_solution(cell):
            continue
        if cell.cell_type == "code":
            try:
                cell.source = stub_solution_source(cell.source)
            except ValueError as exc:
                raise ValueError(f"cell {index}: {exc}") from None
        else:
            cell.source = "*Your answer here.*"
        cell.pop("attachments", None)
    return nb


# =========================================================================== dependency check


def find_solution_dependencies(notebook: Any) -> list[str]:
    """Warn about cells that use a solution outside ``check(...)``.

    In the student edition such a cell raises ``NotImplementedError`` (or ``NameError``)
    and stops a top-to-bottom run, so a learner cannot run the rest of the chapter before
    solving the exercise. Uses inside ``check(...)`` and inside ``if check(...):`` blocks
    are fine; a name bound inside such a block is only defined when the check passes, so
    its later unguarded uses are reported too. Returns one message per offending cell.
    """
    tainted: dict[str, str] = {}  # name -> why it is not usable in the student edition
    warnings: list[str] = []
    for index, cell in enumerate(notebook.cells, start=1):  # counted from 1, as people do
        if cell.cell_type != "code":
            continue
        tree = _parse_cell(cell.source)
        if tree is None:
            continue
        if is_solution(cell):
            for node in tree.body:
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    for name in _bound_here(node):
                        tainted[name] = f"stubbed from solution cell {index}"
            continue
        used: dict[str, str] = {}
        for node in tree.body:
            if isinstance(node, ast.If) and _calls_check(node.test):
                for inner in node.body:
                    for name in _bound_here(inner):
                        tainted[name] = f"only defined when the check in cell {index} passes"
                statements: list[ast.stmt] = node.orelse
            else:
                statements = [node]
            for stmt in statements:
                finder = _UseFinder(tainted)
                finder.visit(stmt)
                for name in finder.found:
                    used.setdefault(name, tainted[name])
                for name in _bound_here(stmt):
                    if finder.found:
                        tainted[name] = f"computed from {', '.join(finder.found)} in cell {index}"
                    else:
                        tainted.pop(name, None)  # rebound from usable values: fine again
        if used:
            what = "; ".join(f"{name} ({why})" for name, why in used.items())
            warnings.append(
                f"cell {index} uses {what} outside check(...): in the student edition it "
                "stops a top-to-bottom run until the exercise is solved (guard it with "
                "`if check(...):` or use the lib's reference instead)"
            )
    return warnings


def _parse_cell(source: str) -> ast.Module | None:
    """Parse a notebook cell, turning IPython syntax (%magics, !shell) into Python first."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        source = TransformerManager().transform_cell(source)
    except ImportError:  # without IPython, cells with magics are skipped below
        pass
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def _is_check_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check"
    )


def _calls_check(node: ast.AST) -> bool:
    return any(_is_check_call(n) for n in ast.walk(node))


class _UseFinder(ast.NodeVisitor):
    """Collect loads of the given names, skipping bare ``check(...)`` arguments and locals."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.found: list[str] = []
        self.local: list[set[str]] = []

    def visit_Call(self, node: ast.Call) -> None:
        if not _is_check_call(node):
            self.generic_visit(node)
            return
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            if not isinstance(arg, ast.Name):  # check("id", f(x)) would call f first
                self.visit(arg)

    def visit_Name(self, node: ast.Name) -> None:
        shadowed = any(node.id in scope for scope in self.local)
        if isinstance(node.ctx, ast.Load) and node.id in self.names and not shadowed:
            if node.id not in self.found:
                self.found.append(node.id)

    def _visit_scope(self, node: ast.AST, args: ast.arguments | None) -> None:
        names = set() if args is None else {a.arg for a in _all_args(args)}
        body = getattr(node, "body", None)
        for stmt in body if isinstance(body, list) else []:  # a lambda's body is one expression
            names.update(_bound_here(stmt))
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            for gen in node.generators:
                names.update(n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name))
        self.local.append(names)
        self.generic_visit(node)
        self.local.pop()

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)  # evaluated before the loop binds its target
        self.local.append({n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)})
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)
        self.local.pop()

    visit_AsyncFor = visit_For

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node, node.args)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_scope(node, node.args)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_scope(node, node.args)

    def visit_ListComp(self, node: ast.AST) -> None:
        self._visit_scope(node, None)

    visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_ListComp


def _all_args(args: ast.arguments) -> list[ast.arg]:
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]


# =========================================================================== student edition


@dataclass
class StudentEdition:
    """What `make_student_edition` wrote: the notebooks and the warnings per notebook."""

    notebooks: list[Path]
    warnings: dict[str, list[str]] = field(default_factory=dict)


def make_student_edition(out_dir: Path, notebook_dir: Path = NOTEBOOK_DIR) -> StudentEdition:
    """Write the student edition of every chapter notebook in ``notebook_dir`` to ``out_dir``.

    Only the ``NN_slug.ipynb`` notebooks are written (nothing else from the folder: the
    instructor's guide and any scratch files stay behind). Refuses to write into the
    source folder, which would replace the solutions.
    """
    notebook_dir, out_dir = Path(notebook_dir), Path(out_dir)
    if not notebook_dir.is_dir():
        raise FileNotFoundError(
            f"notebook folder {notebook_dir} does not exist; pass --notebooks with the folder "
            "holding the NN_slug.ipynb chapters"
        )
    sources = chapter_notebooks(notebook_dir)
    if not sources:
        raise FileNotFoundError(
            f"no chapter notebooks (NN_slug.ipynb) in {notebook_dir}; pass --notebooks with "
            "the folder that holds them"
        )
    if out_dir.resolve() == notebook_dir.resolve():
        raise ValueError(
            f"the output folder {out_dir} is the notebook folder itself: writing there would "
            "replace the solutions; pick another OUTDIR"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    edition = StudentEdition(notebooks=[])
    for path in sources:
        notebook = nbformat.read(path, as_version=4)
        try:
            student = student_notebook(notebook)
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
        warnings = find_solution_dependencies(notebook)
        if warnings:
            edition.warnings[path.name] = warnings
        nbformat.validate(student)
        target = out_dir / path.name
        tmp = target.with_suffix(".ipynb.tmp")
        nbformat.write(student, tmp)
        tmp.replace(target)
        edition.notebooks.append(target)
    return edition


# =========================================================================== grading

STATUSES = ("passed", "failed", "not attempted", "not run")


@dataclass(frozen=True)
class Submission:
    """One submitted notebook: whose it is, where it is and which chapter it belongs to."""

    student: str
    path: Path
    chapter: str  # "ch00"

    @property
    def notebook(self) -> str:
        """The notebook's file name without ``.ipynb``."""
        return self.path.stem


@dataclass
class RunOutcome:
    """How one graded notebook run ended.

    ``status`` is ``completed``, ``error`` (a cell raised; ``error`` says which and what),
    ``timeout`` or ``crashed`` (the kernel or the runner died).
    """

    status: str
    error: str = ""
    seconds: float = 0.0
    grade_lines: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GradeRow:
    """One line of the grade table (and of the CSV).

    ``status`` and ``message`` are the grader's verdict (`tinylm.course.grading`);
    ``reported`` is what the notebook's own check reported in the student's kernel: shown
    for comparison, never counted (a difference is worth a look).
    """

    student: str
    notebook: str
    chapter: str
    exercise: str
    difficulty: str
    status: str  # one of STATUSES
    message: str
    run: str  # how the notebook run ended: completed / error / timeout / crashed
    seconds: float
    note: str = ""
    reported: str = ""


def find_submissions(submissions_dir: Path) -> list[Submission]:
    """Find the chapter notebooks in ``submissions_dir/<student>/`` (searched recursively).

    The student is the name of the top-level folder; a notebook belongs to the chapter of
    its two-digit prefix (``00_why_inference.ipynb``, also ``00_why_inference (1).ipynb``).
    """
    root = Path(submissions_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"submissions folder {root} does not exist; it should hold one folder per "
            "student with that student's notebooks (e.g. alice/00_why_inference.ipynb)"
        )
    found: list[Submission] = []
    for student_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(student_dir.rglob("*.ipynb")):
            match = _CHAPTER_FILE.match(path.name)
            if match and ".ipynb_checkpoints" not in path.parts:
                found.append(Submission(student_dir.name, path, f"ch{match.group(1)}"))
    if not found:
        loose = sorted(p.name for p in root.glob("*.ipynb"))
        extra = (
            f" (found {len(loose)} notebook(s) directly in it, e.g. {loose[0]}: move each "
            "into a folder named after its student)"
            if loose
            else ""
        )
        raise FileNotFoundError(
            f"no submitted notebooks in {root}{extra}; expected one folder per student "
            "holding notebooks named like the chapters, e.g. alice/00_why_inference.ipynb"
        )
    return found


def grade(
    submissions_dir: Path,
    *,
    timeout: float = 600,
    jobs: int = 1,
    source_data_dir: Path | None = None,
    keep_dir: Path | None = None,
    log: Any = None,
    exercise_timeout: float = EXERCISE_SECONDS,
    seed: int | None = None,
) -> list[GradeRow]:
    """Run and grade every submitted notebook; return one `GradeRow` per exercise.

    Two steps per notebook. First the whole notebook runs as the student would run it (the
    ``run`` column, the executed copy in ``keep_dir``, and the results its checks report,
    shown in ``reported``). Then the verdicts are computed where the student's code cannot
    reach them (`tinylm.course.grading.grade_answers`): the answer of each exercise's
    ``check`` call, with the part of the notebook it needs, runs in a fresh worker process
    with limits (``exercise_timeout`` seconds per exercise), only its outputs come back,
    and each exercise's check compares them here, on the notebook's inputs and on inputs
    drawn from ``seed`` (default: a fresh one per notebook) that the student never saw.

    Each notebook gets a fresh temporary working copy: the notebook, a copy of
    ``source_data_dir`` (default: the instructor's `tinylm.paths.data_dir`, so the trained
    checkpoint need not be trained again; it is a few MB) reached through
    ``TINYLM_DATA_DIR``, and the grade file. It runs in its own process session with
    ``timeout`` seconds of wall-clock time (kernel start included); after that, or when it
    ends, every process left in its session is killed. Inside the kernel an audit hook
    refuses to write, delete, rename or truncate files outside the working copy (best
    effort against mistakes and naive scripts, not a sandbox: shell commands and native
    code can get past it, so grade untrusted work in a container as an unprivileged user).
    ``keep_dir`` receives the executed notebooks, for reviewing errors.
    """
    if os.name == "nt":
        raise OSError("grading needs Linux or macOS (on Windows, run it inside WSL)")
    if timeout <= 0 or jobs < 1:
        raise ValueError(f"need timeout > 0 and jobs >= 1, got timeout={timeout}, jobs={jobs}")
    submissions = find_submissions(submissions_dir)
    source = Path(source_data_dir) if source_data_dir is not None else data_dir()
    if log is not None:
        students = len({s.student for s in submissions})
        print(
            f"grading {len(submissions)} notebook(s) of {students} student(s), "
            f"up to {timeout:g} s each, {jobs} at a time",
            file=log,
            flush=True,
        )
    if log is not None and source.is_dir():
        size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        print(f"each run gets a copy of {source} ({size / 1e6:.0f} MB)", file=log, flush=True)

    # Several kernels each using every core would slow each other down: share the cores
    # (unless the caller chose a thread count already).
    threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)

    def one(submission: Submission) -> list[GradeRow]:
        outcome = run_submission(
            submission,
            timeout=timeout,
            source_data_dir=source,
            keep_dir=keep_dir,
            threads=threads,
        )
        start = time.perf_counter()
        try:
            notebook = json.loads(submission.path.read_text(encoding="utf-8"))
            verdicts, notes = grade_answers(
                notebook,
                submission.chapter,
                data_dir=source,
                seed=seed,
                exercise_seconds=exercise_timeout,  # the worker keeps the default threads, as
                # this process does: a bit-for-bit check compares results of both
                fallback=_instructor_answers(submission.chapter),
            )
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            verdicts = [
                Verdict(ex.id, "not run", f"the notebook could not be read: {exc}")
                for ex in list_exercises(submission.chapter)
            ]
            notes = []
        outcome.notes += notes
        if log is not None:
            passed = sum(v.status == "passed" for v in verdicts)
            print(
                f"  {submission.student}/{submission.path.name}: run {outcome.status} "
                f"({outcome.seconds:.0f} s), {passed}/{len(verdicts)} passed "
                f"(graded in {time.perf_counter() - start:.0f} s)",
                file=log,
                flush=True,
            )
        return grade_rows(submission, outcome, verdicts)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [row for rows in pool.map(one, submissions) for row in rows]


def _instructor_answers(chapter: str) -> dict[str, str]:
    """The answer expressions of the instructor's notebook of ``chapter`` (for deleted checks)."""
    for path in chapter_notebooks(NOTEBOOK_DIR):
        if f"ch{path.name[:2]}" == chapter:
            try:
                return answer_expressions(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                return {}
    return {}


def run_submission(
    submission: Submission,
    *,
    timeout: float,
    source_data_dir: Path,
    keep_dir: Path | None = None,
    threads: int | None = None,
) -> RunOutcome:
    """Execute one submitted notebook in a fresh working copy; return how the run ended.

    ``threads`` sets ``OMP_NUM_THREADS`` for the kernel unless it is set already.
    """
    work = Path(tempfile.mkdtemp(prefix="tinylm-grade-")).resolve()
    try:
        notebook = work / submission.path.name
        shutil.copyfile(submission.path, notebook)
        if Path(source_data_dir).is_dir():
            shutil.copytree(source_data_dir, work / "data")
        else:
            (work / "data").mkdir()
        startup = work / ".ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-tinylm-grade-guard.py").write_text(_GUARD_SOURCE, encoding="utf-8")
        (work / "tmp").mkdir()
        grade_file, result_file = work / "grades.jsonl", work / "run.json"
        env = dict(os.environ)
        for name in ("TINYLM_GRADE_FILE", "JUPYTER_PATH", "PYTHONSTARTUP"):
            env.pop(name, None)
        if threads is not None and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(threads)
        env.update(
            TINYLM_GRADE_FILE=str(grade_file),
            TINYLM_DATA_DIR=str(work / "data"),
            TINYLM_GRADE_ROOT=str(work),
            IPYTHONDIR=str(work / ".ipython"),
            JUPYTER_RUNTIME_DIR=str(work / "runtime"),
            TMPDIR=str(work / "tmp"),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        command = [sys.executable, "-m", "tinylm.course.classroom", "_execute", notebook.name]
        command += [result_file.name, str(timeout)]
        start = time.perf_counter()
        with (work / "runner.log").open("wb") as runner_log:
            process = subprocess.Popen(
                command,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=runner_log,
                start_new_session=True,  # its own session: we can kill it and all it started
            )
            try:
                # The runner enforces the limit itself; the margin covers kernel shut-down.
                process.wait(timeout=timeout + 30)
                killed = False
            except subprocess.TimeoutExpired:
                killed = True
            finally:
                kill_session(process.pid)
                process.wait()
        seconds = time.perf_counter() - start
        outcome = _read_outcome(result_file, grade_file, process.returncode, killed, timeout, work)
        outcome.seconds = seconds
        outcome.notes += _suspicious(submission.path)
        if keep_dir is not None and (work / "executed.ipynb").exists():
            target = Path(keep_dir) / submission.student / submission.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "executed.ipynb", target)
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_outcome(
    result_file: Path,
    grade_file: Path,
    returncode: int | None,
    killed: bool,
    timeout: float,
    work: Path,
) -> RunOutcome:
    """Combine the runner's report and the grade file into a `RunOutcome`."""
    outcome = RunOutcome(status="crashed")
    try:
        report = json.loads(result_file.read_text(encoding="utf-8"))
        outcome.status, outcome.error = str(report["status"]), str(report.get("error", ""))
    except (OSError, ValueError, KeyError, TypeError):
        if killed:
            outcome.status, outcome.error = "timeout", f"still running after {timeout:g} s"
        else:
            log = (work / "runner.log").read_text(encoding="utf-8", errors="replace")
            tail = " | ".join(log.strip().splitlines()[-3:])
            outcome.error = f"the runner exited with code {returncode} ({tail or 'no output'})"
    bad = 0
    if grade_file.exists():
        for line in grade_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    outcome.grade_lines.append(entry)
                    continue
            except ValueError:
                pass
            bad += bool(line.strip())
    if bad:
        outcome.notes.append(f"{bad} malformed line(s) in the grade file were ignored")
    return outcome


def _suspicious(path: Path) -> list[str]:
    """Notes for the instructor when a notebook's code touches the grading machinery."""
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        cells = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
        sources = [
            "".join(c.get("source", "")) if isinstance(c.get("source"), list) else c["source"]
            for c in cells
        ]
        code = "\n".join(sources)
        solutions = "\n".join(s for c, s in zip(cells, sources, strict=True) if is_solution(c))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ["the notebook is not valid JSON"]
    notes = []
    if re.search(r"TINYLM_GRADE_FILE|TINYLM_GRADE_ROOT|exercises\.core|_RESULTS", code):
        notes.append("review: the code mentions the grading machinery")
    if re.search(r"^\s*(def\s+check\s*\(|check\s*=[^=])", code, re.MULTILINE):
        notes.append("review: the code redefines check")
    if re.search(r"reference_[a-z]|exercises\.ch\d\d", solutions):  # chapters may, answers not
        notes.append("review: a solution reads the checks' reference solutions")
    return notes


def grade_rows(
    submission: Submission, outcome: RunOutcome, verdicts: Sequence[Verdict]
) -> list[GradeRow]:
    """The grade table rows of one notebook: one per exercise of its chapter.

    Status and message come from the grader's ``verdicts``. What the notebook's checks
    reported in the student's kernel (the last report per exercise) goes to ``reported``,
    and is never counted.
    """
    reported: dict[str, str] = {}
    for entry in outcome.grade_lines:
        reported[entry["id"]] = str(entry.get("status", "")).replace("_", " ")[:20]
    run = outcome.status if not outcome.error else f"{outcome.status}: {outcome.error}"
    common = dict(
        student=submission.student,
        notebook=submission.notebook,
        run=run,
        seconds=round(outcome.seconds, 1),
        note="; ".join(outcome.notes),
    )
    by_id = {ex.id: ex for ex in list_exercises(submission.chapter)}
    rows = [
        GradeRow(
            chapter=submission.chapter,
            exercise=v.exercise,
            difficulty=by_id[v.exercise].difficulty if v.exercise in by_id else "",
            status=v.status if v.status in STATUSES else "failed",
            message=v.message,
            reported=reported.get(v.exercise, ""),
            **common,
        )
        for v in verdicts
    ]
    if not rows:
        rows.append(
            GradeRow(
                chapter=submission.chapter,
                exercise="-",
                difficulty="",
                status="not run",
                message=f"chapter {submission.chapter} has no registered exercises",
                **common,
            )
        )
    return rows


def write_csv(rows: Sequence[GradeRow], path: Path) -> None:
    """Write the grade table as CSV (UTF-8, one row per student x exercise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(GradeRow)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def format_table(rows: Sequence[GradeRow], width: int = 64) -> str:
    """The grade table as text: one line per exercise, then a summary per notebook."""

    def short(text: str) -> str:
        line = " ".join(text.split())
        return line if len(line) <= width else line[: width - 3] + "..."

    header = ("student", "notebook", "exercise", "status", "reported", "message")
    table = [header] + [
        (r.student, r.notebook, r.exercise, r.status, r.reported or "-", short(r.message))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    lines.append("")
    summary: dict[tuple[str, str], list[GradeRow]] = {}
    for row in rows:
        summary.setdefault((row.student, row.notebook), []).append(row)
    for (student, notebook), group in summary.items():
        passed = sum(r.status == "passed" for r in group)
        first = group[0]
        note = f"  [{first.note}]" if first.note else ""
        lines.append(
            f"{student} {notebook}: {passed}/{len(group)} passed, run {short(first.run)} "
            f"({first.seconds:.0f} s){note}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- inside the run


def _execute(notebook_name: str, result_name: str, timeout: float) -> int:
    """Runner side of `run_submission`: execute the notebook, write the outcome as JSON.

    Runs in the working copy (the current folder). The wall-clock limit covers kernel
    start and all cells: each cell may use what is left of it.
    """
    deadline = time.monotonic() + timeout
    report: dict[str, Any] = {"status": "completed"}
    notebook = nbformat.read(notebook_name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=max(1, int(timeout)),
        kernel_name="python3",
        resources={"metadata": {"path": os.getcwd()}},
    )
    index = -1

    def where() -> str:  # cells counted from 1, as a person counts them in Jupyter
        return f"cell {index + 1}" if index >= 0 else "kernel start"

    try:
        client.reset_execution_trackers()
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CellTimeoutError("no time left")
                client.timeout = max(1, int(left))
                client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
    except CellExecutionError as exc:
        ename = getattr(exc, "ename", "") or "error"
        evalue = " ".join(str(getattr(exc, "evalue", "")).split())[:300]
        report = {
            "status": "error",
            "error": f"{where()}: {ename}" + (f": {evalue}" * bool(evalue)),
        }
    except CellTimeoutError:
        report = {"status": "timeout", "error": f"{where()} still running after {timeout:g} s"}
    except DeadKernelError:
        report = {"status": "crashed", "error": f"the kernel died in {where()}"}
    except Exception as exc:  # report anything else the same way: the grader goes on
        report = {"status": "crashed", "error": f"{where()}: {type(exc).__name__}: {exc}"[:300]}
    try:
        nbformat.write(notebook, "executed.ipynb")
    except Exception:  # the outcome matters more than the executed copy
        pass
    Path(result_name).write_text(json.dumps(report), encoding="utf-8")
    return 0


# =========================================================================== command line


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m tinylm.classroom --help``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_execute"]:  # internal: the per-notebook runner started by `grade`
        return _execute(argv[1], argv[2], float(argv[3]))
    parser = argparse.ArgumentParser(
        prog="python -m tinylm.classroom", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    edition = commands.add_parser(
        "student-edition", help="write the notebooks with the solutions replaced by stubs"
    )
    edition.add_argument("outdir", type=Path, help="folder to write the student notebooks to")
    edition.add_argument(
        "--notebooks", type=Path, default=NOTEBOOK_DIR, help="instructor notebooks folder"
    )
    edition.add_argument(
        "--strict", action="store_true", help="exit with status 1 when there are warnings"
    )
    grading = commands.add_parser("grade", help="run and grade submitted notebooks")
    grading.add_argument(
        "submissions", type=Path, help="folder with one folder of notebooks per student"
    )
    grading.add_argument(
        "--timeout", type=float, default=600, help="seconds per notebook (default 600)"
    )
    grading.add_argument("--out", type=Path, default=Path("grades.csv"), help="CSV to write")
    grading.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1)")
    grading.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data folder copied into each run (default: $TINYLM_DATA_DIR or <repo>/data)",
    )
    grading.add_argument("--keep", type=Path, default=None, help="save executed notebooks here")
    grading.add_argument(
        "--exercise-timeout",
        type=float,
        default=EXERCISE_SECONDS,
        help=f"seconds per exercise when grading answers (default {EXERCISE_SECONDS:g})",
    )
    grading.add_argument(
        "--seed", type=int, default=None, help="seed of the unseen inputs (default: fresh)"
    )
    args = parser.parse_args(argv)

    try:
        if args.command == "student-edition":
            result = make_student_edition(args.outdir, args.notebooks)
            for path in result.notebooks:
                print(f"wrote {path}")
            for name, warnings in result.warnings.items():
                for warning in warnings:
                    print(f"warning: {name}: {warning}", file=sys.stderr)
            return 1 if args.strict and result.warnings else 0
        rows = grade(
            args.submissions,
            timeout=args.timeout,
            jobs=args.jobs,
            source_data_dir=args.data_dir,
            keep_dir=args.keep,
            log=sys.stderr,
            exercise_timeout=args.exercise_timeout,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_csv(rows, args.out)
    print(format_table(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
