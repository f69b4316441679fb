"""Shared matplotlib helpers: one look for every chapter's figures, and small PNGs.

Call `use_workbook_style()` once in a notebook's setup cell. It sets a modest resolution
(100 dpi at 7 x 3.6 inches: the committed PNGs stay well under 100 KB), a light grid and a
colour-blind-friendly palette (Okabe & Ito). `si` formats big numbers (FLOPs, tokens,
bytes) with SI prefixes; `bar_distribution` draws a probability distribution over labels
(token probabilities, expert loads, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["PALETTE", "bar_distribution", "si", "use_workbook_style"]

#: Okabe & Ito (2008) colour-blind-safe palette, in the order the workbook uses it.
PALETTE = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

_SI_PREFIXES = ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"))
_SI_PREFIXES += ((1e6, "M"), (1e3, "k"))


def use_workbook_style() -> None:
    """Set the workbook's matplotlib look (call after importing pyplot, once per notebook)."""
    import matplotlib as mpl
    import matplotlib.pyplot as plt  # noqa: F401  (selects the inline backend first, so our rc wins)

    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 3.6),
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "figure.facecolor": "white",
            "figure.constrained_layout.use": True,
            "axes.prop_cycle": mpl.cycler(color=PALETTE),
            "axes.grid": True,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.labelsize": 10,
            "grid.alpha": 0.3,
            "font.size": 10,
            "legend.frameon": False,
            "lines.linewidth": 2.0,
        }
    )


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """Format ``value`` with an SI prefix: ``si(7.2e23, "FLOP") == "720 ZFLOP"``.

    ``digits`` is the number of significant digits. Values below 1000 get no prefix.
    """
    sign = "-" if value < 0 else ""
    magnitude = abs(float(value))
    for scale, prefix in _SI_PREFIXES:
        if magnitude >= scale:
            return f"{sign}{magnitude / scale:.{digits}g} {prefix}{unit}".rstrip()
    return f"{sign}{magnitude:.{digits}g} {unit}".rstrip()


def bar_distribution(
    probabilities: Sequence[float],
    labels: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    top_k: int | None = None,
    title: str | None = None,
    color: str = PALETTE[0],
) -> Axes:
    """Bar chart of a probability distribution, largest first (optionally only the top k).

    ``probabilities`` may be a list, NumPy array or 1-D tensor; ``labels`` default to the
    indices. Returns the axes so the caller can add to them.
    """
    import matplotlib.pyplot as plt

    values = [float(p) for p in probabilities]
    names = [str(i) for i in range(len(values))] if labels is None else [str(s) for s in labels]
    if len(names) != len(values):
        raise ValueError(
            f"got {len(values)} probabilities but {len(names)} labels: pass one label per value"
        )
    order = sorted(range(len(values)), key=lambda i: -values[i])[:top_k]
    if ax is None:
        _, ax = plt.subplots()
    ax.bar(range(len(order)), [values[i] for i in order], color=color)
    ax.set_xticks(
        range(len(order)), [names[i] for i in order], rotation=45 if len(order) > 8 else 0
    )
    ax.set_ylabel("probability")
    ax.grid(axis="x", visible=False)
    if title:
        ax.set_title(title)
    return ax
