"""Fixtures for the browser tests: JupyterLab on copies of the chapters, driven by headless Chromium.

The tests need Debian's Chromium (``apt-get install chromium``, at /usr/bin/chromium; another
build can be named with ``TINYLM_CHROMIUM``) and the ``playwright`` package (``pip install
playwright``; no ``playwright install``: its bundled driver drives the system Chromium). When
either is missing the tests are skipped with the reason, so a plain ``pytest`` on a laptop
still passes; with ``TINYLM_REQUIRE_BROWSER=1`` (set by ``.ci/run``) they fail instead.

One JupyterLab server serves the whole session from a temporary root folder that holds
copies of ``notebooks/NN_*.ipynb`` with their outputs cleared. Settings, config, runtime
and IPython folders are temporary too, so nothing the user has configured gets in the way
and nothing is left behind. Each test gets a fresh browser context; afterwards every
kernel session is deleted so the next chapter starts with a fresh kernel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
CHROMIUM = Path(os.environ.get("TINYLM_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("TINYLM_BROWSER_ARTIFACTS", REPO / "test-artifacts" / "browser"))
REQUIRE_BROWSER = os.environ.get("TINYLM_REQUIRE_BROWSER", "") not in ("", "0")

# JupyterLab settings written into the temporary user-settings folder before the server
# starts: no news/update toasts over the notebook, every cell kept in the DOM (JupyterLab
# otherwise renders only the cells near the viewport of a long notebook), and no autosave
# (the copies are thrown away; saving a chapter full of plots every 2 min costs CPU).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

_REPORT: list[str] = []


def chapter_notebooks() -> list[Path]:
    """Every chapter notebook, in reading order (new chapters are picked up automatically)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _unavailable(reason: str) -> None:
    """Skip (a laptop without Chromium), or fail where the browser tests must run (CI)."""
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (TINYLM_REQUIRE_BROWSER is set, so this is an error)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop the server and everything it started (kernels run in sessions of their own)."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        proc.terminate()  # the server shuts its kernels down itself on SIGTERM
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for child in descendants:
        try:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=5)


def _copy_without_outputs(src: Path, dst: Path) -> None:
    """Copy a notebook with outputs, execution counts and saved widget state removed.

    A fresh copy is what a learner opening the chapter for the first time sees after
    "Restart Kernel and Clear Outputs"; it also lets the test tell a cell that ran in this
    session (prompt ``[n]``) from one that only shows a stored count.
    """
    import nbformat

    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, dst)


class LabServer:
    """A running JupyterLab: its address, token, root folder and a tiny REST client."""

    def __init__(self, base_url: str, token: str, root: Path, log: Path, proc: subprocess.Popen):
        self.base_url, self.token, self.root, self.log, self.proc = base_url, token, root, log, proc

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path}{sep}token={self.token}"

    def api(self, method: str, path: str, timeout: float = 30) -> object:
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def delete_sessions(self) -> None:
        """Shut down every kernel session, so the next notebook opened gets a fresh kernel."""
        for session in self.api("GET", "/api/sessions"):
            try:
                self.api("DELETE", f"/api/sessions/{session['id']}", timeout=60)
            except urllib.error.HTTPError as err:
                if err.code != 404:
                    raise

    def save_log(self, path: Path) -> Path | str:
        """Copy the server's log (its folder is removed at the end of the session)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log, path)
        except OSError as err:
            return f"(not saved: {err})"
        return path

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


def missing_prerequisite() -> str | None:
    """Why the browser tests cannot run here (Chromium or Playwright missing), or None."""
    if importlib.util.find_spec("playwright") is None:
        return "browser tests need the playwright package: pip install playwright"
    if not CHROMIUM.exists():
        return (
            f"browser tests need Chromium at {CHROMIUM}: apt-get install chromium "
            "(or point TINYLM_CHROMIUM at another Chromium build)"
        )
    return None


@pytest.fixture(scope="session")
def browser_prerequisites() -> None:
    """Skip (or, with TINYLM_REQUIRE_BROWSER=1, fail) when Chromium or Playwright is missing."""
    reason = missing_prerequisite()
    if reason is not None:
        _unavailable(reason)


@pytest.hookimpl(trylast=True)  # after -m / -k / --deselect have chosen the items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run each chapter once: leave out nbval's cells of the chapters the browser tests run.

    A browser test executes its chapter from the first cell to the last in a fresh kernel
    and fails on any error output, on a traceback in stderr and on any code cell that did not
    run: everything nbval --nbval-lax asserts, and more (live widgets, a re-rendering main
    experiment). So when a chapter's browser test is selected and will really run (Chromium
    and Playwright are here, or TINYLM_REQUIRE_BROWSER makes their absence a failure), its
    nbval items are deselected; otherwise (`-m "not browser"`, no Chromium, a notebook named
    on the command line alone) nbval runs the chapter as before.
    """
    if missing_prerequisite() is not None and not REQUIRE_BROWSER:
        return
    in_browser = {
        Path(item.callspec.params["notebook"]).resolve()
        for item in items
        if item.get_closest_marker("browser") is not None
        and "notebook" in getattr(getattr(item, "callspec", None), "params", {})
    }
    if not in_browser:
        return
    kept, dropped = [], []
    for item in items:
        runs_in_browser = item.path.suffix == ".ipynb" and item.path.resolve() in in_browser
        (dropped if runs_in_browser else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
        chapters = sorted({item.path.stem for item in dropped})
        _REPORT.append(
            f"nbval: {len(dropped)} notebook cells deselected; the browser tests run "
            f"{len(chapters)} chapters ({', '.join(c[:2] for c in chapters)}) instead"
        )


@pytest.fixture(scope="session")
def lab_server(browser_prerequisites, tmp_path_factory) -> LabServer:
    """JupyterLab on 127.0.0.1 (free port, random token) serving copies of the chapters."""
    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "root"
    root.mkdir()
    for notebook in chapter_notebooks():
        _copy_without_outputs(notebook, root / notebook.name)
    for name, settings in LAB_SETTINGS.items():
        path = tmp / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))

    port, token = _free_port(), uuid.uuid4().hex
    venv_bin = Path(sys.executable).parent
    env = {
        key: value
        for key, value in os.environ.items()
        # The kernel must use the inline matplotlib backend and record no grades; a
        # JUPYTER_PATH/JUPYTER_DATA_DIR of the user's could bring another `python3` kernelspec.
        if key not in {"MPLBACKEND", "TINYLM_GRADE_FILE", "JUPYTER_PATH", "JUPYTER_DATA_DIR"}
    }
    env.update(
        # This interpreter's folder first: the `python3` kernelspec ("python -m
        # ipykernel_launcher") then starts the same Python that runs pytest, where
        # tinylm is installed (pip install -e .) and finds the repo's data/ folder itself.
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_DATA_DIR=str(tmp / "data"),  # no user-level kernelspecs or extensions
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTER_PREFER_ENV_PATH="1",
        IPYTHONDIR=str(tmp / "ipython"),
        MPLCONFIGDIR=str(tmp / "mpl"),
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",  # CI containers run as root; JupyterLab refuses that without it
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.user_settings_dir={tmp / 'settings'}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
    ]
    log = tmp / "server.log"
    # The server stays in pytest's process group (no start_new_session): if pytest is
    # killed outright, the group kill takes the server with it.
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = LabServer(f"http://127.0.0.1:{port}", token, root, log, proc)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with code {proc.returncode}:\n{server.log_tail()}"
                )
            try:
                server.api("GET", "/api/status", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"JupyterLab did not answer within 120 s:\n{server.log_tail()}"
                    ) from None
                time.sleep(0.25)
        specs = server.api("GET", "/api/kernelspecs")
        assert "python3" in specs["kernelspecs"], f"no python3 kernelspec: {specs}"
        yield server
    finally:
        try:
            if proc.poll() is None:
                server.delete_sessions()
        except Exception:  # noqa: BLE001 - best effort; _kill_tree stops everything anyway
            pass
        _kill_tree(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def browser(browser_prerequisites):
    """Headless Chromium (the system build) driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            timeout=120_000,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield chromium
        finally:
            try:
                chromium.close()
            except Exception:  # noqa: BLE001 - the browser may already be gone (killed run)
                pass


@pytest.fixture
def lab_page(browser, lab_server):
    """A fresh browser page; afterwards the page is closed and every kernel is shut down."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        try:
            context.close()
        except Exception:  # noqa: BLE001 - TargetClosedError when the browser died first
            pass
        if lab_server.proc.poll() is None:
            try:
                lab_server.delete_sessions()
            except (urllib.error.URLError, OSError):  # the server is going down (SIGTERM)
                pass


@pytest.fixture(scope="session")
def browser_artifacts() -> Path:
    """Folder for this run's screenshots (git-ignored); ``TINYLM_BROWSER_ARTIFACTS`` moves it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.log")]:  # from an earlier run
        old.unlink()
    return ARTIFACTS


@pytest.fixture
def browser_report():
    """Lines for the "browser tests" section of pytest's terminal summary."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("browser tests: chapters in JupyterLab")
        for line in _REPORT:
            terminalreporter.write_line(line)
