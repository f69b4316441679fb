"""Shared matplotlib helpers: one look for every chapter's figures, and small PNGs.

Call `use_workbook_style()` once in a notebook's setup cell. It sets a modest resolution
(100 dpi at 7 x 3.6 inches: the committed PNGs stay well under 100 KB), a light grid and a
colour-blind-friendly palette (Okabe & Ito). `si` formats big numbers (FLOPs, tokens,
bytes) with SI prefixes; `bar_distribution` draws a probability distribution over labels
(token probabilities, expert loads, ...); `LivePlot` redraws a training run's loss as it goes.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tinylm.util import in_notebook

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["PALETTE", "LivePlot", "bar_distribution", "si", "use_workbook_style"]

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
    import matplotlib.pyplot as plt  # lazy: pyplot is heavy, and only plotting needs it

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


# --------------------------------------------------------------------------- live training plot


class LivePlot:
    """A live bits-per-byte plot for notebooks: `train(..., callback=LivePlot())`.

    Redraws one figure in place (through an IPython display handle) at most every `every_s`
    seconds, at every evaluation and at the last step. Outside a notebook it only collects
    the records; `figure()` draws them whenever you want (e.g. to savefig).
    """

    def __init__(
        self, every_s: float = 3.0, entropy_floor: float | None = None, title: str = "training"
    ) -> None:
        self.every_s = every_s
        self.entropy_floor = entropy_floor
        self.title = title
        self.records: list[dict] = []
        self._handle = None
        self._last_draw = -math.inf
        self._live = in_notebook()

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        last = record.get("step") == record.get("total_steps")
        now = time.perf_counter()
        if self._live and ("val_bpb" in record or last or now - self._last_draw >= self.every_s):
            self._last_draw = now
            self._show()

    def figure(self):
        """Draw the records so far into a new matplotlib Figure (no pyplot, no global state)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.add_subplot()
        steps = [r["step"] for r in self.records]
        train = [r["train_bpb"] for r in self.records]
        if steps:
            ax.plot(steps, train, lw=0.6, alpha=0.35, color="C0")
            ax.plot(steps, _ema(train, 0.95), lw=1.5, color="C0", label="train (smoothed)")
        evals = [(r["step"], r["val_bpb"]) for r in self.records if r.get("val_bpb") is not None]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", color="C1", ms=4, label="validation")
        if self.entropy_floor is not None:
            ax.axhline(self.entropy_floor, ls="--", color="k", lw=1, label="entropy floor")
        ax.set(xlabel="step", ylabel="bits per byte", title=self.title)
        if steps:
            ax.set_xlim(0, self.records[-1].get("total_steps", steps[-1]))
            ax.set_ylim(0, max(train[: max(1, len(train) // 20)] + [1.0]) * 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        return fig

    def _show(self) -> None:
        from IPython.display import Image, display  # lazy: only a live notebook draws

        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=90)
        image = Image(data=buf.getvalue())
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def _ema(values: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (so it starts at the first value)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out
