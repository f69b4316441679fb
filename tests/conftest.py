"""Shared pytest set-up for the unit tests and the notebook runs."""

from __future__ import annotations

import signal

import matplotlib
import pytest

# Tests never open windows; notebooks under nbval use their own inline backend.
matplotlib.use("Agg")


def pytest_configure(config):
    """Turn SIGTERM (CI time-outs, `timeout`) into KeyboardInterrupt so fixtures clean up."""

    def _raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"received signal {signum}")

    signal.signal(signal.SIGTERM, _raise_interrupt)


@pytest.fixture(autouse=True)
def _fresh_exercise_results(monkeypatch):
    """Each test starts with no recorded exercise results and no grade file (one home)."""
    from tinylm import exercises

    monkeypatch.delenv("TINYLM_GRADE_FILE", raising=False)
    exercises.clear_results()
    yield
    exercises.clear_results()
