"""Every tinylm module imports on its own: no import circles, no missing imports.

A circle between two modules can hide when a test session happens to import them in the
"right" order. So a fresh interpreter imports each module with no other tinylm module
loaded: before each import it forgets every tinylm module (third-party ones like torch stay
loaded; they cannot be part of a circle of ours, and re-importing torch ~45 times would cost
more than a minute of CPU).
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import tinylm
from tinylm import _moved


def _all_modules() -> list[str]:
    names = ["tinylm"]
    names += [m.name for m in pkgutil.walk_packages(tinylm.__path__, prefix="tinylm.")]
    return sorted(names)


MODULES = _all_modules()

_IMPORT_EACH_ALONE = """
import importlib, sys, traceback
failures = 0
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "tinylm" or m.startswith("tinylm.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures += 1
        print(f"--- import {name} failed:", traceback.format_exc())
sys.exit(1 if failures else 0)
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    result = _python("-c", _IMPORT_EACH_ALONE, *MODULES)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_module_list_is_complete():
    for expected in (
        "tinylm.config",
        "tinylm.layers",
        "tinylm.model",
        "tinylm.quant.rtn",
        "tinylm.course.exercises.core",
        "tinylm.port.onnx",
        "tinylm.recipes",
    ):
        assert expected in MODULES


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_a_moved_module_is_the_same_object_under_its_old_name(old):
    new = _moved.MOVED[old]
    assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new  # its own spec, not the alias's


def test_python_dash_m_runs_a_moved_module_under_its_old_name():
    result = _python(
        "-c",
        "import runpy, sys; sys.argv = ['x', '--help']; runpy.run_module('tinylm.classroom', run_name='__main__')",
    )
    assert result.returncode == 0, result.stderr
    assert "student-edition" in result.stdout
