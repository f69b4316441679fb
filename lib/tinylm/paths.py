"""Where the workbook keeps the files it writes (corpora, downloads, checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root when tinylm is installed from a checkout (``pip install -e .``).
REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """Return the data folder: ``$TINYLM_DATA_DIR`` if set, else ``<repo>/data``."""
    env = os.environ.get("TINYLM_DATA_DIR")
    return Path(env) if env else REPO_ROOT / "data"


def cache_dir() -> Path:
    """Return (and create) the ignored folder for downloads and generated corpora."""
    path = data_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_dir() -> Path:
    """Return (and create) the ignored folder for trained checkpoints."""
    path = data_dir() / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def display_path(path: str | os.PathLike) -> str:
    """`path` as messages print it: relative to the workbook when inside it (``data/...``).

    Notebook outputs are committed and read on the web; an absolute path names one machine.
    """
    resolved = Path(path).resolve()
    for base in (data_dir().resolve().parent, REPO_ROOT):
        if resolved.is_relative_to(base):
            return str(resolved.relative_to(base))
    return str(path)
