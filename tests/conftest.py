"""Shared pytest set-up for the unit tests and the notebook runs."""

from __future__ import annotations

import signal

import matplotlib
import pytest

from tinylm.device import cpu_threads

# Tests never open windows; notebooks under nbval use their own inline backend.
matplotlib.use("Agg")


def pytest_configure(config):
    """Turn SIGTERM (CI time-outs, `timeout`) into KeyboardInterrupt so fixtures clean up."""

    def _raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"received signal {signum}")

    signal.signal(signal.SIGTERM, _raise_interrupt)


@pytest.hookimpl(tryfirst=True)  # before -m chooses the items
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every nbval item (a notebook cell) `notebook` and `slow`.

    So `pytest -m "not slow"` is the fast local selection: unit tests only, no notebooks,
    no browser.
    """
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one CPU thread, then restore the setting (opt in with ``usefixtures``).

    The test models are tiny, so a second thread buys nothing, and on a busy 2-core machine an
    op that opens an OpenMP region waits for a descheduled thread: in torch 2.13 index_add_
    into a few rows (the MoE scatter at small batch) took ~100 ms instead of microseconds.
    """
    with cpu_threads(1):
        yield


@pytest.fixture(autouse=True)
def _fresh_exercise_results(monkeypatch):
    """Each test starts with no recorded exercise results and no grade file (one home)."""
    from tinylm import exercises

    monkeypatch.delenv("TINYLM_GRADE_FILE", raising=False)
    exercises.clear_results()
    yield
    exercises.clear_results()


class ExerciseAsserts:
    """The three outcomes every exercise test pins, in one place (see the `exercise` fixture).

    Each call also checks what the learner sees printed under the check cell.
    """

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def _run(self, exercise_id: str, answer, returns: bool, status: str, label: str):
        from tinylm.exercises import check, results

        self.capsys.readouterr()  # forget earlier output
        assert check(exercise_id, answer) is returns, results()[-1].message
        result = results()[-1]
        assert result.status == status, result.message
        assert label in self.capsys.readouterr().out
        return result

    def passes(self, exercise_id: str, answer) -> None:
        """A right answer: check() returns True, records "passed" and prints a tick."""
        self._run(exercise_id, answer, True, "passed", "✓ passed")

    def fails(self, exercise_id: str, answer, *fragments: str) -> str:
        """A wrong answer: check() returns False, records "failed"; the message has each fragment."""
        message = self._run(exercise_id, answer, False, "failed", "✗ failed").message
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in: {message}"
        return message

    def not_attempted(self, exercise_id: str, answer) -> None:
        """A stub (raises NotImplementedError): check() returns False, "not attempted"."""
        self._run(exercise_id, answer, False, "not_attempted", "not attempted")


@pytest.fixture
def exercise(capsys) -> ExerciseAsserts:
    """Exercise-check assertions: ``.passes(id, f)``, ``.fails(id, f, *hints)``, ``.not_attempted``."""
    return ExerciseAsserts(capsys)


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    """A seconds-long recipe registered as RECIPES["unit-test"], data under tmp_path."""
    from tinylm import recipes as R
    from tinylm.train import TrainConfig

    monkeypatch.setenv("TINYLM_DATA_DIR", str(tmp_path))
    recipe = R.Recipe(
        description="test",
        model=dict(context_length=16, n_layer=1, n_head=2, n_embd=16),
        train=TrainConfig(steps=4, batch_size=2, warmup_steps=1, eval_interval=2, eval_batches=1),
        corpus_kwargs={"n_stories": 20},
        vocab_size=280,
    )
    monkeypatch.setitem(R.RECIPES, "unit-test", recipe)
    return recipe
