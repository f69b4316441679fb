"""Small helpers that several tinylm modules share (one home each)."""

from __future__ import annotations

from typing import Any


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
