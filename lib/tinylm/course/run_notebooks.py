"""Execute the workbook's notebooks top to bottom and save their outputs in place.

This is the single documented command that makes the outputs committed with
the notebooks (so a reader on the web sees the plots and figures)::

    python -m tinylm.run_notebooks            # every chapter, in order
    python -m tinylm.run_notebooks 03 04      # chapters whose file name starts with 03 / 04

Each notebook runs in a fresh kernel with the notebooks/ folder as working
directory, exactly as a learner runs it. A cell that raises stops that
notebook, which is then left unchanged on disk, and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tinylm.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def find_notebooks(prefixes: list[str] | None = None, folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """Return the chapter notebooks (``NN_*.ipynb``) whose names start with one of ``prefixes``."""
    chapters = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not prefixes:
        return chapters
    chosen = [p for p in chapters if any(p.name.startswith(prefix) for prefix in prefixes)]
    if not chosen:
        names = ", ".join(p.name for p in chapters) or "none"
        raise SystemExit(f"no notebook matches {prefixes}; the chapters are: {names}")
    return chosen


def execute_notebook(path: Path, timeout: int = 900) -> float:
    """Run one notebook in a fresh kernel, write it back with outputs, return seconds taken."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    # Write to a temporary file first so an interrupted write never corrupts the notebook.
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, tmp)
    tmp.replace(path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: execute the chosen notebooks in order and report times."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapters", nargs="*", help="file-name prefixes, e.g. 00 03 (default: all)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = parser.parse_args(argv)

    failed = []
    for path in find_notebooks(args.chapters):
        print(f"running {path.name} ...", flush=True)
        try:
            seconds = execute_notebook(path, timeout=args.timeout)
        except Exception as error:  # report and go on with the other chapters
            print(f"  FAILED: {type(error).__name__}: {str(error)[-2000:]}", flush=True)
            failed.append(path.name)
            continue
        print(f"  done in {seconds:.0f} s", flush=True)
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
