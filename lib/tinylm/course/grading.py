"""Verdicts a student's code cannot reach: learner functions run in a worker, checks run here.

The notebook's own ``check(...)`` calls run inside the student's kernel, so anything they
report (results in memory, lines in a grade file) can be forged by the student's code. The
grader therefore recomputes every verdict itself:

1. **What to run.** From the submitted notebook it takes, for every exercise of the chapter,
   the answer expression of its last ``check("chNN.id", answer)`` call, and the *slice* of
   the notebook that answer needs: walking back from the check, every top-level statement
   of an earlier cell that binds a name the answer (or an already kept statement) uses, and
   those that change such a name in place (``obj.x = ...``, ``xs.append(...)``). So a
   solution keeps its imports, the helpers defined above it and the variables it reads,
   while the rest of the chapter (training runs, plots, widgets, and any cell that tries
   to tamper with grading) does not run. Why a slice rather than the whole notebook: it is
   the same code the solution depends on, it costs seconds instead of the chapter's
   minutes, and a cell that crashes or loops elsewhere cannot take the exercises down with
   it. `solution_program` builds it; `Step` is one piece.
2. **Where it runs.** A fresh worker process (``python -m tinylm.course.grading _worker``)
   in an empty temporary folder with a copy of the data folder executes the slice and then
   calls the learner's functions on request. It runs with limits: wall-clock time per
   exercise (the grader kills its whole process session), address space and file size
   (``resource``), no network (a user+network namespace via ``unshare`` where the system
   allows it, and an audit hook refusing sockets in any case) and the same audit hook
   that refuses file changes outside its folder as the graded kernel. These are guards
   against mistakes and naive tricks, not a sandbox against native code: grade untrusted
   work in a container.
3. **What comes back.** Only the outputs, through `tinylm.course.wire` (JSON plus arrays
   saved with ``allow_pickle=False``), never a pickle: decoding them runs no code. Inputs
   travel the other way as a pickle, which is safe in that direction (the grader wrote it).
   Arguments that the learner's function changes in place (tensors, arrays, lists, dicts)
   are copied back, so checks that inspect them work as in the notebook.
4. **Where the verdict is made.** Here, in the grader's process: each exercise's registered
   check function runs unchanged, with a `RemoteFunction` standing in for the learner's
   function, so it compares against its reference and gives the same hints as in the
   notebook. It then runs a second time inside `tinylm.course.exercises.core.unseen_inputs`, where
   the check draws inputs from a seed chosen at grading time (`case_seed`, `unseen`):
   hard-coding the results the notebook showed fails there.

`grade_answers` does all of this for one notebook and returns one `Verdict` per exercise.
"""

from __future__ import annotations

import ast
import os
import pickle
import secrets
import select
import shutil
import signal
import struct
import subprocess
import symtable
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.course import wire
from tinylm.course.exercises.core import Exercise, list_exercises, run_check, unseen_inputs

# Limits of one worker (the command line of tinylm.classroom can change the time limits).
EXERCISE_SECONDS = 60.0  # one exercise's check, both runs, all calls of the learner's function
SETUP_SECONDS = 120.0  # worker start (imports torch) plus the notebook slice
MEMORY_BYTES = 8 * 2**30  # address space; torch alone maps about 1-2 GiB
FILE_BYTES = 512 * 2**20  # largest file the worker may write


@dataclass(frozen=True)
class Step:
    """One piece of the program a worker runs: notebook code, or an exercise's answer."""

    kind: str  # "code": exec ``source``; "answer": eval ``source`` as ``exercise``'s answer
    cell: int  # the notebook cell it comes from, counted from 1 (0: the instructor's notebook)
    source: str
    exercise: str = ""


@dataclass(frozen=True)
class Verdict:
    """The grader's verdict on one exercise.

    ``status`` is ``passed``, ``failed``, ``not attempted`` or ``not run`` (no answer to
    grade: the notebook has no check for it, or the worker could not start). ``unseen`` is
    True when the check also ran on inputs drawn at grading time.
    """

    exercise: str
    status: str
    message: str
    unseen: bool = False


# =========================================================================== the notebook slice


def _cell_source(cell: Any) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _python(source: str) -> str:
    """IPython syntax (%magics, !shell) turned into Python, as the kernel would run it."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except Exception:  # no IPython, or a cell it cannot transform: parse it as it is
        return source


def _segment(lines: list[str], node: ast.stmt) -> str:
    """A top-level statement's source, decorators included."""
    start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
    return "\n".join(lines[start - 1 : node.end_lineno]) + "\n"


def _check_answers(node: ast.AST, source: str) -> list[tuple[str, str]]:
    """(exercise id, answer expression) of each ``check("id", answer)`` call in ``node``."""
    found = []
    for call in ast.walk(node):
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == "check"
            and len(call.args) >= 2
            and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str)
        ):
            expr = ast.get_source_segment(source, call.args[1]) or ast.unparse(call.args[1])
            found.append((call.args[0].value, expr))
    return found


@dataclass
class _Statement:
    cell: int
    source: str
    node: ast.stmt | None  # None for an answer
    exercise: str = ""
    bound: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)


def _names(source: str, node: ast.AST | None) -> tuple[set[str], set[str]]:
    """(names bound, names read) at the top level by ``source``, nested scopes included."""
    table = symtable.symtable(source, "<cell>", "exec")
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    used = {s.get_name() for s in table.get_symbols() if s.is_referenced()}

    def nested(scope: symtable.SymbolTable) -> None:
        for child in scope.get_children():
            for symbol in child.get_symbols():
                if symbol.is_global() and symbol.is_referenced():
                    used.add(symbol.get_name())
                if symbol.is_declared_global() and symbol.is_assigned():
                    bound.add(symbol.get_name())
            nested(child)

    nested(table)
    if node is not None:  # ``x += 1`` and ``x[i] = v`` read x too
        for sub in ast.walk(node):
            if isinstance(sub, ast.AugAssign) and isinstance(sub.target, ast.Name):
                used.add(sub.target.id)
    return bound, used


def _root(node: ast.AST) -> str | None:
    """``a`` for ``a``, ``a.b.c``, ``a[i].b`` and ``a.f(...)``, else None."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _mutated(node: ast.stmt, modules: set[str]) -> set[str]:
    """Names a statement changes in place: ``a.x = ...``, ``a[i] += ...``, ``a.append(...)``."""
    targets: list[ast.AST] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    elif isinstance(node, ast.Delete):
        targets = list(node.targets)
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        if isinstance(node.value.func, ast.Attribute):
            root = _root(node.value.func)
            return {root} if root and root not in modules else set()
    names = set()
    for target in targets:
        for sub in ast.walk(target):
            if isinstance(sub, (ast.Attribute, ast.Subscript)):
                root = _root(sub)
                if root:
                    names.add(root)
    return names


def _killed(node: ast.stmt) -> set[str]:
    """Names a statement certainly rebinds (so earlier bindings of them are not needed)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and node.value is not None:
        return {node.target.id} if isinstance(node.target, ast.Name) else set()
    return set()


def answer_expressions(notebook: Any) -> dict[str, str]:
    """Exercise id -> answer expression of the notebook's last ``check`` call for it."""
    found: dict[str, str] = {}
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        source = _python(_cell_source(cell))
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for exercise_id, expr in _check_answers(tree, source):
            found[exercise_id] = expr
    return found


def solution_program(
    notebook: Any, exercise_ids: Sequence[str], fallback: dict[str, str] | None = None
) -> tuple[list[Step], list[str]]:
    """The slice of ``notebook`` that the answers of ``exercise_ids`` need, as `Step` s.

    ``notebook`` is an nbformat v4 node (or the same structure as plain dicts). Each
    exercise's answer is the expression of the last ``check("id", answer)`` call for it;
    without one, ``fallback[id]`` (the instructor notebook's expression) is evaluated after
    all the code. Returns the steps in notebook order and notes (cells that could not be
    parsed).
    """
    wanted = set(exercise_ids)
    statements: list[_Statement] = []
    notes: list[str] = []
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        source = _python(_cell_source(cell))
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            notes.append(f"cell {number} is not valid Python ({exc.msg}), so it was skipped")
            continue
        lines = source.splitlines()
        for node in tree.body:
            for exercise_id, expr in _check_answers(node, source):
                if exercise_id in wanted:
                    statements.append(_Statement(number, expr, None, exercise_id))
            text = _segment(lines, node)
            bound, used = _names(text, node)
            statements.append(_Statement(number, text, node, "", bound, used))
    last = {s.exercise: i for i, s in enumerate(statements) if s.node is None}
    statements = [s for i, s in enumerate(statements) if s.node or last[s.exercise] == i]
    for exercise_id in exercise_ids:
        if exercise_id not in last and fallback and exercise_id in fallback:
            statements.append(_Statement(0, fallback[exercise_id], None, exercise_id))
    for s in statements:
        if s.node is None:
            s.used = _names(s.source, None)[1]

    modules = {
        name
        for s in statements
        if isinstance(s.node, (ast.Import, ast.ImportFrom))
        for name in s.bound
    }
    needed: set[str] = set()
    keep = [False] * len(statements)
    for i in range(len(statements) - 1, -1, -1):
        s = statements[i]
        star = isinstance(s.node, ast.ImportFrom) and any(a.name == "*" for a in s.node.names)
        if s.node is None:
            keep[i] = True
        elif (s.bound & needed) or (star and needed) or (_mutated(s.node, modules) & needed):
            keep[i] = True
            needed -= _killed(s.node)
        else:
            continue
        needed |= s.used
    steps = [
        Step("code" if s.node else "answer", s.cell, s.source, s.exercise)
        for s, kept in zip(statements, keep, strict=True)
        if kept
    ]
    return steps, notes


# =========================================================================== the worker

_FRAME = struct.Struct("<Q")


def _write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(_FRAME.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data) :]


def _read_pickled(fd: int) -> Any:
    """Worker side: read one request (a pickle written by the grader)."""
    with os.fdopen(os.dup(fd), "rb", buffering=0, closefd=True) as stream:
        (size,) = _FRAME.unpack(wire._read_exact(stream, _FRAME.size))
        return pickle.loads(wire._read_exact(stream, size))


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"


def _install_guards(root: str, memory: int) -> None:
    """Worker side: limits and audit hooks, before any learner code runs."""
    import resource

    for limit, value in (
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_FSIZE, FILE_BYTES),
        (resource.RLIMIT_CORE, 0),
    ):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):  # a lower limit is already in place
            pass
    os.environ["TINYLM_GRADE_ROOT"] = root
    exec(compile(GUARD_SOURCE, "<tinylm grade guard>", "exec"), {"__name__": "guard"})

    def no_network(event: str, args: Any) -> None:
        if event in ("socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"):
            raise PermissionError("tinylm grader: network access is refused while grading")

    sys.addaudithook(no_network)


def _run_program(steps: list[Step]) -> tuple[dict[str, Any], list[str]]:
    """Worker side: run the slice in a fresh ``__main__``; return the answers and errors."""
    import types

    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    namespace = main.__dict__
    answers: dict[str, Any] = {}
    errors: list[str] = []
    for step in steps:
        where = f"cell {step.cell}" if step.cell else "the instructor's check call"
        try:
            if step.kind == "code":
                exec(compile(step.source, f"<cell {step.cell}>", "exec"), namespace)
            else:
                answers[step.exercise] = eval(
                    compile(step.source, f"<cell {step.cell}>", "eval"), namespace
                )
        except BaseException as exc:  # noqa: BLE001 - any failure is the learner's to see
            if step.kind == "answer":
                answers[step.exercise] = _AnswerError(f"{step.source}: {_describe_error(exc)}")
            else:
                errors.append(f"{where}: {_describe_error(exc)}")
    return answers, errors


class _AnswerError:
    def __init__(self, message: str) -> None:
        self.message = message


def _answer_info(answer: Any) -> dict[str, Any]:
    if isinstance(answer, _AnswerError):
        return {"kind": "error", "error": answer.message}
    if callable(answer):
        return {"kind": "callable", "name": str(getattr(answer, "__name__", "your function"))}
    try:
        wire.encode(answer)
    except wire.Unsendable as exc:
        return {"kind": "error", "error": str(exc)}
    return {"kind": "value", "value": answer}


_STATE = "__state_dict__"  # the write-back of a torch module's or optimizer's state
_GRADS = "__grads__"  # and of a module's gradients (a pickle does not carry .grad)


def _grads(module: Any) -> dict[str, Any]:
    """A module's gradients by parameter name (parameters without one are left out)."""
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _set_grads(module: Any, grads: dict[str, Any]) -> None:
    """Give a module's parameters these gradients (None where a name is missing)."""
    for name, parameter in module.named_parameters():
        grad = grads.get(name)
        fits = hasattr(grad, "shape") and grad.shape == parameter.shape
        parameter.grad = grad.to(parameter.dtype) if fits else None


def _torch_stateful(value: Any) -> bool:
    """A torch module or optimizer (whose weights or moments a step changes in place)."""
    torch = sys.modules.get("torch")  # loaded whenever such an argument exists
    return torch is not None and isinstance(value, (torch.nn.Module, torch.optim.Optimizer))


def _writeback(value: Any) -> bool:
    """Whether an argument's state after the call travels back (values a check may inspect)."""
    import numpy as np

    return isinstance(value, (list, dict, np.ndarray)) or (
        type(value).__module__.startswith("torch") and hasattr(value, "detach")
    )


def _serve_call(answer: Any, args: tuple, kwargs: dict) -> bytes:
    """Worker side: call the learner's function; encode the outcome (never a pickle)."""
    try:
        result = answer(*args, **kwargs)
    except NotImplementedError:
        return wire.encode({"status": "raised", "type": "NotImplementedError", "message": ""})
    except BaseException as exc:  # noqa: BLE001 - the learner's exception is the outcome
        message = " ".join(str(exc).split())[:400]
        return wire.encode({"status": "raised", "type": type(exc).__name__, "message": message})
    back = []
    for key, arg in [*enumerate(args), *kwargs.items()]:
        if _writeback(arg):
            back.append([key, arg])
        elif _torch_stateful(arg):
            back.append([[key, _STATE], arg.state_dict()])
            if hasattr(arg, "named_parameters"):
                back.append([[key, _GRADS], _grads(arg)])
        for attribute in getattr(arg, "__grading_writeback__", ()):
            back.append([[key, attribute], getattr(arg, attribute, None)])
    try:
        return wire.encode({"status": "ok", "value": result, "writeback": back})
    except wire.Unsendable as exc:
        try:
            return wire.encode({"status": "ok", "value": result, "writeback": []})
        except wire.Unsendable:
            return wire.encode({"status": "unsendable", "message": str(exc)})


def worker_main(request_fd: int, reply_fd: int) -> int:
    """The worker process: run the slice, then answer calls until told to stop."""
    # The learner's prints must not mix with replies: fd 1 goes to the log (fd 2).
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - for the life of the process
    steps, root, memory = _read_pickled(request_fd)
    # Import torch now (if installed), so that its seconds count against the start-up limit,
    # not against the first exercise whose inputs hold a tensor.
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    _install_guards(root, memory)
    answers, errors = _run_program(steps)
    info = {exercise: _answer_info(answer) for exercise, answer in answers.items()}
    _write_frame(reply_fd, wire.encode({"answers": info, "errors": errors}))
    while True:
        try:
            request = _read_pickled(request_fd)
        except EOFError:
            return 0
        if request[0] == "exit":
            return 0
        _, exercise, args, kwargs, grads = request
        for key, module_grads in grads.items():  # a pickle drops .grad: set it again
            _set_grads(kwargs[key] if isinstance(key, str) else args[key], module_grads)
        _write_frame(reply_fd, _serve_call(answers[exercise], args, kwargs))


# --------------------------------------------------------------------------- grader side


class WorkerStopped(Exception):
    """The worker ran out of time, crashed or sent something malformed."""


def _unshare_prefix() -> list[str]:
    """``unshare`` arguments for a private network namespace, where the system allows it."""
    tool = shutil.which("unshare")
    if tool is None:
        return []
    try:
        probe = subprocess.run([tool, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [tool, "-rn"] if probe.returncode == 0 else []


class Worker:
    """A running worker process and the grader's end of its two pipes."""

    def __init__(
        self,
        steps: list[Step],
        *,
        data_dir: Path | None,
        setup_seconds: float,
        memory: int,
        threads: int | None = None,
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tinylm-worker-")).resolve()
        if data_dir is not None and Path(data_dir).is_dir():
            shutil.copytree(data_dir, self.folder / "data")
        else:
            (self.folder / "data").mkdir()
        (self.folder / "tmp").mkdir()
        to_worker_r, self._to_worker = os.pipe()
        self._from_worker, from_worker_w = os.pipe()
        env = dict(os.environ)
        for name in ("TINYLM_GRADE_FILE", "PYTHONSTARTUP"):
            env.pop(name, None)
        if threads is not None and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(threads)
        env.update(
            TINYLM_DATA_DIR=str(self.folder / "data"),
            TMPDIR=str(self.folder / "tmp"),
            HOME=str(self.folder),
            MPLBACKEND="Agg",
        )
        command = [*_UNSHARE, sys.executable, "-m", "tinylm.course.grading", "_worker"]
        command += [str(to_worker_r), str(from_worker_w)]
        self.log = (self.folder / "worker.log").open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=self.folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            pass_fds=(to_worker_r, from_worker_w),
            start_new_session=True,  # its own session: we can kill it and all it started
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._send((steps, str(self.folder), memory))
        ready = self._receive(time.monotonic() + setup_seconds, "starting and running the slice")
        answers, self.errors = _check_ready(ready)
        if answers is None:
            self.stop(graceful=False)
            raise WorkerStopped("the grading process sent a malformed reply")
        self.answers: dict[str, dict[str, Any]] = answers

    def _send(self, message: Any) -> None:
        try:
            _write_frame(self._to_worker, pickle.dumps(message))
        except OSError as exc:
            self.stop()
            raise WorkerStopped(f"the grading process stopped ({exc})") from None

    def _read(self, n: int, deadline: float, doing: str) -> bytes:
        chunks, left = [], n
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self._from_worker], [], [], wait)[0]:
                self.stop(graceful=False)
                raise WorkerStopped(f"time limit reached while {doing}")
            chunk = os.read(self._from_worker, min(left, 2**20))
            if not chunk:
                code = self.process.poll()
                self.stop(graceful=False)
                raise WorkerStopped(
                    f"the grading process died while {doing}"
                    + (f" (exit code {code})" if code is not None else "")
                    + "; running out of memory is a common cause"
                )
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _receive(self, deadline: float, doing: str) -> Any:
        (size,) = _FRAME.unpack(self._read(_FRAME.size, deadline, doing))
        if size > wire.MAX_MESSAGE_BYTES + wire.MAX_HEADER_BYTES:
            self.stop()
            raise WorkerStopped("the grading process sent a message over the size limit")
        try:
            return wire.decode(self._read(size, deadline, doing))
        except wire.WireError as exc:
            self.stop()
            raise WorkerStopped(f"the grading process sent a malformed reply ({exc})") from None

    def call(self, exercise: str, args: tuple, kwargs: dict, deadline: float) -> Any:
        """Call the answer of ``exercise`` in the worker; return the decoded reply."""
        grads = {}
        for key, arg in [*enumerate(args), *kwargs.items()]:
            if _torch_stateful(arg) and hasattr(arg, "named_parameters"):
                grads[key] = _grads(arg)
        self._send(("call", exercise, args, kwargs, grads))
        return self._receive(deadline, "running your function")

    def stop(self, graceful: bool = True) -> None:
        """Kill the worker and everything it started; remove its folder.

        ``graceful``: ask it to exit first (it is idle), rather than killing it at once.
        """
        if graceful and self.process.poll() is None:
            try:
                self._send_exit()
                self.process.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        kill_session(self.process.pid)
        self.process.wait()
        for fd in (self._to_worker, self._from_worker):
            try:
                os.close(fd)
            except OSError:
                pass
        self._to_worker = self._from_worker = -1
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _send_exit(self) -> None:
        if self._to_worker >= 0:
            _write_frame(self._to_worker, pickle.dumps(("exit",)))


def _check_ready(ready: Any) -> tuple[dict[str, dict[str, Any]] | None, list[str]]:
    """The worker's first reply as (answers, errors); (None, []) when it is malformed."""
    fields = {"callable": "name", "value": "value", "error": "error"}
    if not isinstance(ready, dict) or not isinstance(ready.get("answers"), dict):
        return None, []
    answers = {}
    for exercise, info in ready["answers"].items():
        kind = info.get("kind") if isinstance(info, dict) else None
        if kind not in fields or fields[kind] not in info:
            return None, []
        if kind != "value" and not isinstance(info[fields[kind]], str):
            return None, []
        answers[exercise] = info
    errors = ready.get("errors")
    return answers, [str(e)[:500] for e in errors] if isinstance(errors, list) else []


_UNSHARE: list[str] = []  # filled on first use (probing costs a process start)
_UNSHARE_PROBED = False


def _learner_exception(name: str, message: str) -> Exception:
    """An exception named like the one the learner's code raised (for the check's message)."""
    if name == "NotImplementedError":
        return NotImplementedError(message)
    safe = name if name.isidentifier() else "Error"
    return type(safe, (Exception,), {})(message)


class RemoteFunction:
    """Stands in for the learner's function in the grader: each call runs in the worker."""

    def __init__(self, worker: Worker, exercise: str, name: str, deadline: float) -> None:
        self.worker, self.exercise, self.deadline = worker, exercise, deadline
        self.__name__ = self.__qualname__ = name
        self.stopped: str | None = None  # why the worker stopped, once it has

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.stopped:
            raise WorkerStopped(self.stopped)
        try:
            reply = self.worker.call(self.exercise, args, kwargs, self.deadline)
        except WorkerStopped as exc:
            self.stopped = str(exc)
            raise
        if not isinstance(reply, dict):
            raise TypeError("the grading process sent a malformed reply")
        if reply.get("status") == "raised":
            raise _learner_exception(str(reply.get("type")), str(reply.get("message", "")))
        if reply.get("status") != "ok":
            raise TypeError(str(reply.get("message", "the result could not be sent back")))
        writeback = reply.get("writeback")
        for item in writeback if isinstance(writeback, list) else []:
            if isinstance(item, list) and len(item) == 2:
                _copy_back(args, kwargs, item[0], item[1])
        return reply.get("value")


def _copy_back(args: tuple, kwargs: dict, key: Any, value: Any) -> None:
    """Apply an argument's state after the call (from the worker) to the grader's argument."""
    import numpy as np

    attribute = None
    if isinstance(key, list) and len(key) == 2:
        key, attribute = key
    try:
        original = kwargs[key] if isinstance(key, str) else args[key]
    except (KeyError, IndexError, TypeError):
        return
    if attribute == _STATE and _torch_stateful(original) and isinstance(value, dict):
        _load_state(original, value)
        return
    if attribute == _GRADS and _torch_stateful(original) and isinstance(value, dict):
        _set_grads(original, value)
        return
    if attribute is not None:
        if attribute in getattr(original, "__grading_writeback__", ()):
            setattr(original, attribute, value)
        return
    if isinstance(original, list) and isinstance(value, list):
        original[:] = value
    elif isinstance(original, dict) and isinstance(value, dict):
        original.clear()
        original.update(value)
    elif isinstance(original, np.ndarray) and isinstance(value, np.ndarray):
        if original.shape == value.shape and original.flags.writeable:
            np.copyto(original, value, casting="unsafe")
    elif hasattr(original, "detach") and hasattr(value, "detach"):
        import torch

        if original.shape == value.shape:
            with torch.no_grad():
                original.copy_(value)


def _load_state(original: Any, state: dict) -> None:
    """Copy a module's weights in place (tensors that alias them stay valid) or load an
    optimizer's state; a state that does not fit is left out (the check then sees it)."""
    import torch

    try:
        if isinstance(original, torch.nn.Module):
            with torch.no_grad():
                for name, tensor in original.state_dict(keep_vars=True).items():
                    new = state.get(name)
                    if hasattr(new, "shape") and new.shape == tensor.shape:
                        tensor.copy_(new)
        else:
            original.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError):
        pass


# --------------------------------------------------------------------------- grading


def grade_answers(
    notebook: Any,
    chapter: str,
    *,
    data_dir: Path | None = None,
    seed: int | None = None,
    exercise_seconds: float = EXERCISE_SECONDS,
    setup_seconds: float = SETUP_SECONDS,
    memory: int = MEMORY_BYTES,
    threads: int | None = None,
    fallback: dict[str, str] | None = None,
) -> tuple[list[Verdict], list[str]]:
    """Grade every exercise of ``chapter`` in ``notebook`` (see the module docstring).

    ``seed`` picks the unseen inputs (default: a fresh random one). ``fallback`` maps
    exercise ids to the answer expression used when the notebook has no check call for
    one. Returns the verdicts, in the chapter's order, and notes for the instructor.
    """
    global _UNSHARE, _UNSHARE_PROBED
    if not _UNSHARE_PROBED:
        _UNSHARE, _UNSHARE_PROBED = _unshare_prefix(), True
    exercises = list_exercises(chapter)
    steps, notes = solution_program(notebook, [ex.id for ex in exercises], fallback)
    seed = secrets.randbelow(2**31) if seed is None else seed
    if not any(step.kind == "answer" for step in steps):  # nothing to run a worker for
        message = "the notebook has no check(...) call for it"
        return [Verdict(ex.id, "not run", message) for ex in exercises], notes
    verdicts: list[Verdict] = []
    worker: Worker | None = None
    try:
        for ex in exercises:
            if worker is None:
                try:
                    worker = Worker(
                        steps,
                        data_dir=data_dir,
                        setup_seconds=setup_seconds,
                        memory=memory,
                        threads=threads,
                    )
                except WorkerStopped as exc:
                    message = f"the grader could not run your code: {exc}"
                    left = exercises[len(verdicts) :]
                    verdicts += [Verdict(e.id, "not run", message) for e in left]
                    break
                notes += [f"while grading, {error}" for error in worker.errors]
            verdict, alive = _grade_one(ex, worker, seed, exercise_seconds)
            verdicts.append(verdict)
            if not alive:
                worker.stop()
                worker = None
    finally:
        if worker is not None:
            worker.stop()
    return verdicts, list(dict.fromkeys(notes))


def _grade_one(ex: Exercise, worker: Worker, seed: int, seconds: float) -> tuple[Verdict, bool]:
    """One exercise's verdict, and whether the worker is still usable afterwards."""
    info = worker.answers.get(ex.id)
    if info is None:
        return Verdict(ex.id, "not run", "the notebook has no check(...) call for it"), True
    if info["kind"] == "error":
        message = f"your answer could not be evaluated: {info['error']}"
        if "NotImplementedError" in info["error"]:
            return Verdict(ex.id, "not attempted", message), True
        return Verdict(ex.id, "failed", message), True
    deadline = time.monotonic() + seconds
    if info["kind"] == "value":
        answer: Any = info["value"]
    else:
        answer = RemoteFunction(worker, ex.id, info["name"], deadline)

    def stopped() -> str | None:
        return answer.stopped if isinstance(answer, RemoteFunction) else None

    status, message = run_check(ex, answer)
    if stopped():
        return Verdict(ex.id, "failed", f"{stopped()} (limit {seconds:g} s per exercise)"), False
    if status != "passed":
        return Verdict(ex.id, status.replace("_", " "), message), True
    with unseen_inputs(seed) as drew:
        status2, message2 = run_check(ex, answer)
        drawn = drew()
    if stopped():
        return Verdict(ex.id, "failed", f"{stopped()} (limit {seconds:g} s per exercise)"), False
    if not drawn:
        return Verdict(ex.id, "passed", f"{message} (no unseen inputs for this check)"), True
    if status2 != "passed":
        message2 = (
            f"passed on the notebook's inputs but not on inputs drawn at grading time "
            f"(seed {seed}): {message2}"
        )
        return Verdict(ex.id, "failed", message2, unseen=True), True
    return Verdict(ex.id, "passed", f"{message}; also on unseen inputs", unseen=True), True


# --------------------------------------------------------------------------- process control


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session (a runner or worker and anything it started).

    A kernel runs in its own process group, so killing the runner's group is not enough;
    on Linux the session's members are found in /proc, elsewhere only the group is killed
    (the kernel then exits by itself when it notices its parent is gone).
    """
    members = set()
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == session_id:
                        members.add(int(entry.name))
                except OSError:  # gone already, or not ours to inspect
                    pass
    for pid in members - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(session_id, signal.SIGKILL)
    except OSError:
        pass


# --------------------------------------------------------------------------- the guard

GUARD_SOURCE = """\
# Installed by tinylm.classroom for a graded run. Best effort, not a sandbox: refuses
# Python-level writes, deletions, renames and truncations outside this working copy.
def _tinylm_grade_guard():
    import os
    import sys

    root = os.path.realpath(os.environ["TINYLM_GRADE_ROOT"])
    allowed = root + os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # event -> (positions of the paths it changes, position of their dir_fd or None)
    events = {
        "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "shutil.rmtree": ((0,), 1),
        "os.truncate": ((0,), None), "os.chmod": ((0,), 2), "os.chown": ((0,), 3),
        "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2),
    }

    def fd_path(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
        try:
            import fcntl

            return os.fsdecode(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\\0"))
        except (ImportError, AttributeError, OSError):
            return None

    def inside(path, dir_fd=None, follow=True):
        if isinstance(path, int):
            return True  # an open file descriptor: its opening was checked
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return False
        if not os.path.isabs(path) and dir_fd not in (None, -1):
            base = fd_path(dir_fd)
            if base is None:
                return False
            path = os.path.join(base, path)
        if follow:
            path = os.path.realpath(path)
        else:  # the entry itself (a symlink is removed, not its target)
            path = os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
        return path in (root, os.devnull) or path.startswith(allowed)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = bool(flags & write_flags) or any(c in (mode or "") for c in "wax+")
            if writing and not inside(path):
                refuse("writing", path)
        elif event in events:
            positions, fd_at = events[event]
            for i in positions:
                dir_fd = args[fd_at] if fd_at is not None and fd_at < len(args) else None
                if event == "os.rename" and i == 1:
                    dir_fd = args[3]
                if not inside(args[i], dir_fd, follow=event in ("os.truncate", "os.chmod", "os.chown")):
                    refuse(event, args[i])

    def refuse(what, path):
        raise PermissionError(
            f"tinylm grader: {what} {path!r} refused: a graded notebook may only change "
            "files inside its working copy"
        )

    sys.addaudithook(hook)


_tinylm_grade_guard()
del _tinylm_grade_guard
"""


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        sys.exit(worker_main(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit("usage: python -m tinylm.course.grading _worker REQUEST_FD REPLY_FD (internal)")
