"""Old module paths that moved (issue 12's renovation), kept importable as aliases.

`import tinylm.quant_model`, `from tinylm.exercises import check` and
`python -m tinylm.classroom ...` keep working: each old name is an alias of the module's new
home, the very same module object (not a copy), so registries, monkeypatching and
`isinstance` all see one module. New code should import the new paths (the right column).

Why aliases instead of small re-export files at the old paths: a file left at an old path
would hide the move from git, so branches that edited the old file would not follow it to
its new home when they rebase.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

#: old module name -> its new home (submodules follow: tinylm.exercises.ch01 -> ...).
MOVED = {
    "tinylm.quant_model": "tinylm.quant.model",
    "tinylm.quant_calibrate": "tinylm.quant.calibrate",
    "tinylm.quant_formats": "tinylm.quant.formats",
    "tinylm.classroom": "tinylm.course.classroom",
    "tinylm.exercises": "tinylm.course.exercises",
    "tinylm.plots": "tinylm.course.plots",
    "tinylm.run_notebooks": "tinylm.course.run_notebooks",
    "tinylm.widgets": "tinylm.course.widgets",
}


def new_name(name: str) -> str | None:
    """The current name of module `name` if it moved, else None."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the already-imported module of its new name."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.target_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.target_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has just set module.__spec__ to the alias's spec: give it back.
        module.__spec__ = self.target_spec

    def get_code(self, fullname: str) -> CodeType | None:
        """The new module's code, so that `python -m OLD.NAME` runs it (runpy asks for it)."""
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target)


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 (importlib API)
        new = new_name(fullname)
        if new is None:
            return None
        target_spec = importlib.util.find_spec(new)
        if target_spec is None:
            return None
        return importlib.machinery.ModuleSpec(
            fullname,
            _AliasLoader(new),
            origin=target_spec.origin,
            is_package=target_spec.submodule_search_locations is not None,
        )


def install() -> None:
    """Put the alias finder first on sys.meta_path (once)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
