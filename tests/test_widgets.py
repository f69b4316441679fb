"""Tests for tinylm.widgets: defaults rendered once, re-render on change, headless outputs."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import ipywidgets as widgets
import pytest

import tinylm
from tinylm.widgets import interactive_panel


def test_renders_defaults_once_then_again_on_each_change():
    calls: list[dict] = []
    panel = interactive_panel(
        lambda n, scale: calls.append({"n": n, "scale": scale}),
        n=widgets.IntSlider(value=3, min=1, max=10),
        scale=widgets.Dropdown(options=["linear", "log"], value="log"),
    )
    assert calls == [{"n": 3, "scale": "log"}]
    panel.controls["n"].value = 7
    panel.controls["scale"].value = "linear"
    assert calls[1:] == [{"n": 7, "scale": "log"}, {"n": 7, "scale": "linear"}]
    assert panel.render_count == 3
    assert panel.values == {"n": 7, "scale": "linear"}


def test_sliders_update_on_release_and_get_a_label():
    panel = interactive_panel(lambda x: None, x=widgets.FloatSlider(value=0.5))
    assert panel.controls["x"].continuous_update is False
    assert panel.controls["x"].description == "x"
    live = interactive_panel(lambda x: None, continuous=True, x=widgets.FloatSlider(value=0.5))
    assert live.controls["x"].continuous_update is True


def test_bad_controls_are_rejected_with_a_fix():
    with pytest.raises(TypeError, match="IntSlider"):
        interactive_panel(lambda n: None, n=4)
    with pytest.raises(ValueError, match="at least one control"):
        interactive_panel(lambda: None)


def test_renders_run_one_at_a_time_with_interactive_mode_off():
    """JupyterLab handles widget messages in a kernel subshell (a thread): renders must not
    overlap, and matplotlib's post_execute hooks must not see a figure being drawn."""
    import threading
    import time

    import matplotlib

    running, overlaps, interactive_seen = [0], [0], []

    def render(n):
        running[0] += 1
        overlaps[0] = max(overlaps[0], running[0])
        interactive_seen.append(matplotlib.is_interactive())
        time.sleep(0.02)
        running[0] -= 1

    was = matplotlib.is_interactive()
    matplotlib.interactive(True)
    try:
        panel = interactive_panel(render, n=widgets.IntSlider(value=0, max=100))
        threads = [
            threading.Thread(target=setattr, args=(panel.controls["n"], "value", v))
            for v in range(1, 9)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert matplotlib.is_interactive()  # restored after every render
    finally:
        matplotlib.interactive(was)
    assert overlaps[0] == 1
    assert len(interactive_seen) == 9 and not any(interactive_seen)


@pytest.mark.slow
def test_headless_run_keeps_the_default_rendering_as_cell_outputs(tmp_path, monkeypatch):
    """Executed by nbclient (as nbval and nbconvert do), the plot and text must be ordinary
    cell outputs, not hidden in the widget state that GitHub does not render."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    lib = str(Path(tinylm.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([lib, os.environ.get("PYTHONPATH", "")]))
    source = """
import ipywidgets as widgets
import matplotlib.pyplot as plt
from tinylm.widgets import interactive_panel

def render(n):
    print(f"n is {n}")
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot(range(n))

panel = interactive_panel(render, n=widgets.IntSlider(value=4, min=1, max=9))
"""
    change = "panel.controls['n'].value = 7"  # what a slider move does in a live kernel
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source), nbformat.v4.new_code_cell(change)]
    )
    # A short per-cell timeout: about one run in 15 here, the reply to the second cell sat
    # unnoticed by the client until its timeout ran out (the kernel idle, the reply then
    # read at once and the test passing), which cost 120 s of the suite with timeout=120.
    # Each cell takes under a second.
    client = nbclient.NotebookClient(
        nb, timeout=20, resources={"metadata": {"path": str(tmp_path)}}
    )
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        outputs = copy.deepcopy(nb.cells[0].outputs)
        client.execute_cell(nb.cells[1], 1)
        client.set_widgets_metadata()
    assert all(out.output_type != "error" for out in outputs)
    texts = [out.data.get("text/plain", "") for out in outputs if "data" in out]
    assert any("n is 4" in text for text in texts)
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 1
    controls = [
        out for out in outputs if "application/vnd.jupyter.widget-view+json" in out.get("data", {})
    ]
    assert len(controls) == 1 and "n=4" in controls[0].data["text/plain"]

    # After the change, the static outputs are blanked and the new rendering lives in the
    # Output widget (which a live front end shows in place).
    blanked = [out for out in nb.cells[0].outputs if out not in controls]
    assert len(blanked) == 2 and all(out.data == {"text/plain": ""} for out in blanked)
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    (area,) = [m["state"] for m in state.values() if m["model_name"] == "OutputModel"]
    assert any("n is 7" in out.get("text", "") for out in area["outputs"])
    assert any("image/png" in out.get("data", {}) for out in area["outputs"])
