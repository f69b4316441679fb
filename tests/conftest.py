"""Shared pytest set-up for the unit tests and the notebook runs."""

from __future__ import annotations

import signal

import matplotlib

# Tests never open windows; notebooks under nbval use their own inline backend.
matplotlib.use("Agg")


def pytest_configure(config):
    """Turn SIGTERM (CI time-outs, `timeout`) into KeyboardInterrupt so fixtures clean up."""

    def _raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"received signal {signum}")

    signal.signal(signal.SIGTERM, _raise_interrupt)
