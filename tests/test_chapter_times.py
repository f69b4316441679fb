"""One source for the chapters' times: the instructor guide's table.

The run-times table in notebooks/README.md gives each chapter's reading time and its
measured headless run time. Each notebook's **Time:** line and the README's chapter map
must say the same: reading minutes equal, and the header's "runs in ..." consistent with the
measured seconds (a header rounds; it must not promise a run several times shorter or
longer than the measurement).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "notebooks" / "README.md"
README = ROOT / "README.md"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

_GUIDE_ROW = re.compile(r"^\| (\d\d) [^|]*\| (\d+) min \| (\d+) s[^|]*\|[^|]*\|$", re.M)
_MAP_ROW = re.compile(r"^\| (\d\d) \|.*\| (\d+) min \|$", re.M)
_READING = re.compile(r"\*\*Time:\*\* about (\d+) minutes to read and do the exercises")
_RUN = re.compile(r"runs in (about|under|well under) (a|\d+)\s+(seconds?|minutes?)")


def guide_times() -> dict[str, tuple[int, int]]:
    """{"00": (reading minutes, headless seconds), ...} from the instructor guide's table."""
    rows = _GUIDE_ROW.findall(GUIDE.read_text(encoding="utf-8"))
    return {nb: (int(reading), int(seconds)) for nb, reading, seconds in rows}


def run_claim_allows(kind: str, amount: str, unit: str, seconds: float) -> bool:
    """Whether a header's "runs in <kind> <amount> <unit>" fits a measured run time."""
    value = (1 if amount == "a" else int(amount)) * (60 if unit.startswith("minute") else 1)
    if kind in ("under", "well under"):
        return seconds < value
    return value / 2 <= seconds <= value * 1.5  # "about": within rounding of the figure


def test_the_guide_table_covers_every_chapter():
    assert sorted(guide_times()) == [p.name[:2] for p in NOTEBOOKS]


def test_the_readme_chapter_map_has_the_guide_reading_times():
    in_map = {nb: int(m) for nb, m in _MAP_ROW.findall(README.read_text(encoding="utf-8"))}
    assert in_map == {nb: reading for nb, (reading, _) in guide_times().items()}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_header_agrees_with_the_guide(notebook):
    reading, seconds = guide_times()[notebook.name[:2]]
    header = nbformat.read(notebook, as_version=4).cells[0].source
    text = " ".join(header.split())  # line breaks inside the sentence do not matter
    found = _READING.search(text)
    assert found, f"{notebook.name}: no '**Time:** about N minutes to read and do the exercises'"
    assert int(found.group(1)) == reading, (
        f"{notebook.name}: header {found.group(1)} min, guide {reading} min"
    )
    claim = _RUN.search(text)
    assert claim, f"{notebook.name}: the Time line does not say what the notebook 'runs in'"
    assert run_claim_allows(*claim.groups(), seconds), (
        f"{notebook.name}: header says it runs in {' '.join(claim.groups())}, "
        f"the guide measured {seconds} s"
    )


def test_run_claims_are_read_strictly():
    assert run_claim_allows("under", "a", "minute", 59) and not run_claim_allows(
        "under", "a", "minute", 61
    )
    assert run_claim_allows("about", "3", "minutes", 152)
    assert not run_claim_allows("about", "2", "minutes", 23)  # the stale chapter-07 header
    assert not run_claim_allows("about", "a", "minute", 10)
