"""Tests for tinylm.plots: SI formatting, the distribution bar chart, the style."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from tinylm.plots import PALETTE, bar_distribution, si, use_workbook_style  # noqa: E402


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (7.2e23, "FLOP", "720 ZFLOP"),
        (3.2856e24, "FLOP", "3.29 YFLOP"),
        (15e12, "tokens", "15 Ttokens"),
        (512, "B", "512 B"),
        (-2.5e9, "", "-2.5 G"),
        (0.25, "", "0.25"),
    ],
)
def test_si(value, unit, text):
    assert si(value, unit) == text


def test_bar_distribution_sorts_and_keeps_top_k():
    ax = bar_distribution([0.1, 0.6, 0.3], ["a", "b", "c"], top_k=2, title="next token")
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == [0.6, 0.3]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["b", "c"]
    plt.close(ax.figure)


def test_bar_distribution_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one label per value"):
        bar_distribution([0.5, 0.5], ["only one"])


def test_workbook_style_sets_small_figures_and_palette():
    use_workbook_style()
    assert matplotlib.rcParams["figure.dpi"] == 100
    assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0] == PALETTE[0]
