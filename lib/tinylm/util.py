"""Small helpers that several tinylm modules share (one home each): notebooks, files.

Plain Python only (no torch), so the torch-free NumPy runtime can use them too.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import psutil

#: Use at most this share of the RAM available now (the rest is for activations, the OS).
MEMORY_HEADROOM = 0.9


def available_memory_bytes() -> int:
    """Bytes of RAM the operating system can give this process now."""
    return int(psutil.virtual_memory().available)


def check_memory(nbytes: int, what: str, fix: str = "free memory or pick a smaller model") -> None:
    """Raise MemoryError *before* allocating `nbytes` if they do not fit in the available RAM."""
    available = available_memory_bytes()
    if nbytes > MEMORY_HEADROOM * available:
        raise MemoryError(
            f"{what} needs {nbytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of "
            f"RAM is available; fix: {fix}."
        )


def kernel_shell() -> Any:
    """The running IPython shell if we are inside a Jupyter kernel (headless ones too), else None."""
    try:
        # Lazy and optional: IPython comes with Jupyter, which `pip install .` alone lacks,
        # and scripts that never ask should not pay for importing it.
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def in_notebook() -> bool:
    """True inside a Jupyter kernel (including a headless one run by nbval/nbclient)."""
    return kernel_shell() is not None


# ----------------------------------------------------------------------------- arguments


def is_int(value: Any, *, integral: bool = False) -> bool:
    """True if `value` is an integer argument: an int, never a bool (True is an int in Python).

    integral=True also accepts any numbers.Integral, e.g. a NumPy integer or a value read
    back from JSON by a library that gives NumPy types; the default accepts plain int only.
    """
    kinds = Integral if integral else int
    return isinstance(value, kinds) and not isinstance(value, bool)


def is_number(value: Any, *, real: bool = False) -> bool:
    """True if `value` is a numeric argument: an int or a float, never a bool.

    real=True also accepts any numbers.Real (a NumPy float, a Fraction); the default accepts
    plain int and float only.
    """
    kinds = Real if real else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def check_int(
    name: str, value: Any, minimum: int = 1, *, integral: bool = False, fix: str | None = None
) -> None:
    """Raise ValueError unless `value` is an integer (see is_int) of at least `minimum`.

    The message names the argument, the value and the fix, e.g. "max_batch must be an
    integer >= 1, got 0; pass a whole number of at least 1."
    """
    if not is_int(value, integral=integral) or value < minimum:
        fix = fix or f"pass a whole number of at least {minimum}"
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {fix}.")


# ----------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never half.

    The bytes go to a temporary file next to the target, are flushed to disk, then renamed
    over the target (os.replace is atomic). On any failure the temporary file is removed.
    The file gets ordinary permissions (0o644; mkstemp would leave it private).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
