"""Every chapter, run from JupyterLab's Run menu in headless Chromium, with its widgets live.

For each ``notebooks/NN_*.ipynb`` (one test per chapter) the test opens a fresh copy in
JupyterLab, waits for the kernel, chooses Run > Run All Cells like a learner would, waits
for every cell to finish and then checks what the learner sees:

* every code cell ran (its prompt reads ``[n]``) and none shows an error;
* every widget is a live widget: there are rendered ipywidgets views, and no plain-text
  stand-in (``IntSlider(value=...``, ``[interactive controls (live when run
  in Jupyter): ...]``) or "Error displaying widget" anywhere;
* the chapter's main experiment (the first cell that calls ``interactive_panel(``, or the
  cell tagged ``main-widget``) reacts: after its first control is changed, the panel's
  Output widget shows a new rendering that differs from the default one, and the default
  rendering (ordinary cell outputs, see ``tinylm.widgets``) is blanked.

Those checks include everything nbval (``--nbval-lax``) asserts of a chapter (each code
cell runs, in order, in one fresh kernel, and none fails), so where a chapter's browser test
runs, its nbval cells are deselected (see ``pytest_collection_modifyitems`` in conftest.py):
each chapter is executed once per ``pytest``, not twice.

They run as part of a plain ``pytest``; ``pytest -m browser`` runs only them, ``pytest -m
"not browser"`` everything else. All chapters take about 7 minutes on two otherwise idle
CPU cores, half of it chapter 03, which trains its model live; on a busy machine that
chapter alone can take many times longer (``TINYLM_BROWSER_RUN_TIMEOUT_S``, default 1200,
is the budget per chapter). What was changed, and the output before and after, is listed in
the terminal summary; screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
#: Every chapter, in reading order; a new chapter gets its test without any change here.
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

#: Budget for Run All (seconds). Alone on two cores the slowest chapter (03) takes ~3 min;
#: next to another CPU-bound job it took more than 15.
RUN_ALL_TIMEOUT_S = float(os.environ.get("TINYLM_BROWSER_RUN_TIMEOUT_S", "1200"))
KERNEL_TIMEOUT_MS = 180_000
RERENDER_TIMEOUT_MS = 180_000

NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"
#: A rendered widget: JupyterLab's widget renderer puts the view straight into the output
#: (without a data-mime-type); the text/plain stand-in would be a jp-RenderedText instead.
WIDGET_VIEW = ".jp-OutputArea-output > .jupyter-widgets"
ERROR_MIME = "application/vnd.jupyter.error"
STDERR_MIME = "application/vnd.jupyter.stderr"
#: Where errors show: JupyterLab renders an exception as stderr-style text (the traceback).
ERROR_OUTPUT = (
    f'.jp-OutputArea-output:is([data-mime-type="{ERROR_MIME}"], [data-mime-type="{STDERR_MIME}"])'
)

#: What JupyterLab shows instead of a widget when the widget manager cannot render it:
#: the widget's text/plain repr (``IntSlider(value=3, ...)``, ``HBox(children=(...``), our
#: panel's own fallback line, or an error from the widget manager.
WIDGET_FALLBACK = re.compile(
    r"\[interactive controls \(live when run in Jupyter\)"
    r"|\b(?:Int|Float|FloatLog|Selection|IntRange|FloatRange)?Slider\(value="
    r"|\b(?:Dropdown|Textarea|Text|Checkbox|ToggleButtons?|RadioButtons|\w*Progress|Output)\("
    r"(?:value|children|layout|outputs|description|options)="
    r"|\b(?:HBox|VBox|Box|GridBox|Tab|Accordion|interactive)\(children="
    r"|Error displaying widget"
)

#: A problem reported on stderr. Chapters may print harmless warnings to stderr (a library's
#: UserWarning/FutureWarning, for example); nbval does not fail on those either. What is
#: never harmless is a traceback or a named exception ("RuntimeError: ..."), which is what a
#: failure inside a widget callback or a background thread prints.
STDERR_PROBLEM = re.compile(r"Traceback|\b[A-Z]\w*Error\b")


def _main_widget_cell(notebook: Path) -> int:
    """Index (among all cells) of the chapter's main experiment.

    A code cell tagged ``main-widget`` wins; otherwise the first code cell that calls
    ``interactive_panel(`` (the import line names it without calling it).
    """
    cells = json.loads(notebook.read_text())["cells"]
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code" and "main-widget" in cell["metadata"].get("tags", []):
            return index
    call = re.compile(r"(?<![\w.])interactive_panel\(")
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and call.search(source):
            return index
    raise AssertionError(
        f"{notebook.name}: no cell calls interactive_panel( and none is tagged main-widget"
    )


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _digest(srcs: list[str], ink: list[float]) -> str:
    """Short id of each image and the share of its pixels that are drawn."""
    parts = [
        f"{hashlib.sha1(s.encode()).hexdigest()[:8]} ({share:.0%} ink)"
        for s, share in zip(srcs, ink, strict=True)
    ]
    return ", ".join(parts) or "none"


def _screenshot(target, folder: Path, name: str) -> str:
    """Save a screenshot of a page or of one element; return its path (or why there is none)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    try:
        if hasattr(target, "evaluate") and not hasattr(target, "goto"):
            # An element: put its top at the top of the notebook's scroll area, or the
            # part below the fold comes out blank.
            target.evaluate("e => e.scrollIntoView({block: 'start'})")
        target.screenshot(path=str(path))
    except Exception as err:  # noqa: BLE001 - the page may be gone; say so in the message
        return f"(no screenshot: {err})"
    return str(path)


# JavaScript run in the page ------------------------------------------------------------

_PROMPTS_JS = f"""() => [...document.querySelectorAll('{NOTEBOOK} .jp-CodeCell .jp-InputPrompt')]
    .map(e => e.textContent.trim())"""

# Done when every prompt reads [n]. Also stop waiting when a cell failed and nothing is
# queued any more: JupyterLab stops Run All at an error and leaves later prompts empty.
# (JupyterLab renders an error output as stderr text holding the traceback.)
_RUN_FINISHED_JS = f"""() => {{
    const prompts = ({_PROMPTS_JS})();
    if (prompts.length === 0) return false;
    if (prompts.every(t => /^\\[\\d+\\]:$/.test(t))) return true;
    const failed = [...document.querySelectorAll('{NOTEBOOK} {ERROR_OUTPUT}')]
        .some(e => e.dataset.mimeType === '{ERROR_MIME}' || /Traceback/.test(e.innerText));
    return failed && !prompts.some(t => t === '[*]:');
}}"""

# The main cell's outputs outside the panel: the default ("static") rendering.
_STATIC_OUTPUTS_JS = """cell => [...cell.querySelectorAll('.jp-OutputArea-output')]
    .filter(e => !e.closest('.widget-output') && !e.querySelector(':scope > .jupyter-widgets'))
    .map(e => ({text: e.innerText.trim(), imgs: [...e.querySelectorAll('img')].map(i => i.src)}))"""

# A fingerprint of the Output widget's content, to wait until it stops changing; "loading"
# while an image is not decoded yet (its box is there but blank).
_OUTPUT_STATE_JS = """out => {
    const imgs = [...out.querySelectorAll('img')];
    if (imgs.some(i => !i.complete || i.naturalWidth === 0)) return 'loading';
    return out.innerText.trim() + '|' + imgs.map(i => i.src.length + ':' + i.src.slice(-64)).join(',');
}"""


# How much of each image is drawn: the share of its pixels that are opaque and not white.
# A plot has axes and labels (a few % at least); a blank or transparent PNG has ~0.
_INK_JS = """async root => {
    const shares = [];
    for (const img of root.querySelectorAll('img')) {
        await img.decode();
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d');
        g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let ink = 0;
        for (let k = 0; k < d.length; k += 4)
            if (d[k + 3] > 128 && (d[k] < 240 || d[k + 1] < 240 || d[k + 2] < 240)) ink++;
        shares.push(ink / (d.length / 4));
    }
    return shares;
}"""
MIN_INK = 0.002


# Before a failure screenshot: bring the first failed, running or unrun code cell into view.
_SHOW_TROUBLE_JS = f"""() => {{
    const cells = [...document.querySelectorAll('{NOTEBOOK} .jp-CodeCell')];
    const bad = cells.find(c => c.querySelector('{ERROR_OUTPUT}'))
        || cells.find(c => !/^\\[\\d+\\]:$/.test(c.querySelector('.jp-InputPrompt').textContent.trim()));
    if (bad) bad.scrollIntoView({{block: 'start'}});
}}"""


def _show_trouble(page) -> None:
    try:
        page.evaluate(_SHOW_TROUBLE_JS)
    except Exception:  # noqa: BLE001 - only a nicer screenshot is at stake
        pass


def _run_all(page) -> None:
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator('li.lm-Menu-item[data-command="runmenu:run-all"]').click()


def _wait_until_stable(page, locator, *, n_images: int, timeout_s: float) -> str:
    """Wait until the Output widget's content stops changing and the kernel is idle.

    "Stopped" means unchanged for 1 s once it holds ``n_images`` images (as many as the
    default rendering had), or for 15 s with fewer: a render prints its text before it
    draws, and the status bar does not show a kernel subshell busy with a widget message.
    """
    idle = page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\| Idle$"))
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        state = locator.evaluate(_OUTPUT_STATE_JS)
        if state != last:
            last, since = state, time.monotonic()
        elif state != "loading" and idle.count() > 0:
            quiet = time.monotonic() - since
            if quiet >= 15 or (quiet >= 1 and locator.locator("img").count() >= n_images):
                return state
        page.wait_for_timeout(250)
    raise AssertionError(f"the panel's output did not settle within {timeout_s:.0f} s")


def _change_first_control(page, control) -> tuple[str, str, str, str]:
    """Change ``control`` the way a learner would; return (kind, label, old, new)."""
    classes = control.get_attribute("class") or ""
    label_el = control.locator(".widget-label").first
    label = label_el.inner_text().strip() if label_el.count() else ""
    if "widget-slider" in classes:
        handle = control.locator(".noUi-handle").first
        readout = control.locator(".widget-readout").first
        old = (
            readout.inner_text().strip()
            if readout.count()
            else handle.get_attribute("aria-valuenow")
        )
        at_max = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
        handle.focus()
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
        new_value = handle.get_attribute("aria-valuenow")
        new = readout.inner_text().strip() if readout.count() else new_value
        return "slider (ArrowLeft)" if at_max else "slider (ArrowRight)", label, old, new
    if "widget-dropdown" in classes:
        select = control.locator("select")
        options = select.locator("option").all_inner_texts()
        current = select.evaluate("s => s.selectedIndex")
        index = next(i for i in range(len(options)) if i != current)
        # ArrowDown on a focused <select> is taken by JupyterLab's notebook shortcuts;
        # select_option fires the input/change events a mouse choice fires.
        select.select_option(index=index)
        return "dropdown", label, options[current], options[index]
    if "widget-toggle-buttons" in classes:
        buttons = control.locator("button")
        texts = buttons.all_inner_texts()
        active = [
            i
            for i in range(buttons.count())
            if "mod-active" in (buttons.nth(i).get_attribute("class") or "")
        ]
        index = next(i for i in range(len(texts)) if i not in active)
        buttons.nth(index).click()
        return "toggle buttons", label, ",".join(texts[i] for i in active), texts[index]
    if "widget-checkbox" in classes or "widget-toggle-button" in classes:
        target = (
            control.locator("input[type=checkbox]") if "widget-checkbox" in classes else control
        )
        old = str(target.is_checked()) if "widget-checkbox" in classes else classes
        target.click()
        return "checkbox/toggle (click)", label, old, "clicked"
    if "widget-textarea" in classes or "widget-text" in classes:
        box = control.locator("textarea, input").first
        old = box.input_value()
        new = old + " little"  # a word that fits a story prompt too
        box.fill(new)
        # With continuous_update=False the value is sent on "change": blur (Enter for Text).
        box.evaluate("e => e.blur()")
        return "text (typed, then left the box)", label, old, new
    raise AssertionError(f"don't know how to change a control with classes {classes!r}")


def _open_and_run_all(page, server, notebook: Path, cells) -> dict[str, float]:
    """Open the chapter, wait for its kernel, Run > Run All Cells, wait until all finished."""
    from playwright.sync_api import expect

    t0 = time.monotonic()
    # A workspace of its own, reset: otherwise JupyterLab reopens the previous tests'
    # notebooks as tabs, each with a new kernel.
    url = server.url(f"/lab/workspaces/{notebook.stem}/tree/{notebook.name}?reset")
    page.goto(url, wait_until="domcontentloaded")
    # "Python 3 (ipykernel) | Idle" in the status bar; the notebook's own busy indicator
    # already reads idle while the kernel is still starting.
    idle = page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\| Idle$"))
    expect(idle).to_be_visible(timeout=KERNEL_TIMEOUT_MS)
    n_cells = len(json.loads(notebook.read_text())["cells"])
    expect(cells).to_have_count(n_cells, timeout=KERNEL_TIMEOUT_MS)
    t1 = time.monotonic()
    _run_all(page)
    try:
        page.wait_for_function(_RUN_FINISHED_JS, timeout=RUN_ALL_TIMEOUT_S * 1000, polling=250)
    except Exception as err:
        prompts = page.evaluate(_PROMPTS_JS)
        pending = [(i, p) for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", p)]
        raise AssertionError(
            f"Run All did not finish in {RUN_ALL_TIMEOUT_S:.0f} s (TINYLM_BROWSER_RUN_TIMEOUT_S); "
            f"code cells not done (index among code cells, prompt): {pending[:5]}"
        ) from err
    return {"open": t1 - t0, "run_all": time.monotonic() - t1}


def _check_outputs(page) -> dict[str, object]:
    """Every cell ran, no errors, every widget live; return what was seen."""
    from playwright.sync_api import expect

    # Errors first: JupyterLab shows an exception as stderr-style text with the traceback,
    # and stops Run All there. Chapters may print harmless warnings to stderr (a library's
    # UserWarning, say), which nbval lets pass too; a traceback or a named exception
    # ("ValueError: ...") never is harmless, so either fails the test.
    stderr_texts = page.locator(f"{NOTEBOOK} {ERROR_OUTPUT}").all_inner_texts()
    for text in stderr_texts:
        print(f"stderr output (allowed unless it names an error): {_short(text, 300)}")
        if STDERR_PROBLEM.search(text):
            raise AssertionError(f"a cell failed:\n{text[-3000:]}")
    errors = page.locator(f'{NOTEBOOK} .jp-OutputArea-output[data-mime-type="{ERROR_MIME}"]')
    assert errors.count() == 0, f"a cell failed:\n{errors.first.inner_text()[-3000:]}"
    prompts = page.evaluate(_PROMPTS_JS)
    not_run = [(i, p) for i, p in enumerate(prompts) if not re.fullmatch(r"\[\d+\]:", p)]
    assert not not_run, f"code cells that did not run (index among code cells, prompt): {not_run}"

    # Widgets: rendered views, and no text stand-in anywhere. Views appear a moment after
    # their cell finished; give a busy machine time.
    expect(page.locator(NOTEBOOK).get_by_text("Loading widget...")).to_have_count(0, timeout=60_000)
    all_text = "\n".join(page.locator(f"{NOTEBOOK} .jp-OutputArea-output").all_inner_texts())
    fallback = WIDGET_FALLBACK.search(all_text)
    if fallback:
        raise AssertionError(
            "a widget is shown as text, not as a live widget: "
            f"...{all_text[max(fallback.start() - 200, 0) : fallback.end() + 200]}..."
        )
    live_views = page.locator(f"{NOTEBOOK} {WIDGET_VIEW}").count()
    assert live_views >= 1, "no widget was rendered as a live widget"
    return {"code_cells": len(prompts), "live_views": live_views, "stderr": len(stderr_texts)}


def _exercise_main_widget(page, cell, shots: Path, name: str) -> dict[str, object]:
    """Change the main panel's first control; the Output widget must show a new rendering."""
    from playwright.sync_api import expect

    outputs = cell.locator(".jp-Cell-outputWrapper")
    outputs.scroll_into_view_if_needed()
    panel = cell.locator(f"{WIDGET_VIEW}.widget-vbox").first
    expect(panel).to_be_visible()
    controls = panel.locator(":scope > .jupyter-widgets:not(.widget-output)")
    output = panel.locator(":scope > .widget-output")
    assert controls.count() >= 1, "the panel shows no controls"
    expect(output).to_have_count(1)
    before = cell.evaluate(_STATIC_OUTPUTS_JS)
    before_text = "\n".join(o["text"] for o in before).strip()
    before_imgs = [src for o in before for src in o["imgs"]]
    assert before_text or before_imgs, "the panel's default rendering is empty"
    before_ink = outputs.evaluate(_INK_JS)
    assert all(share > MIN_INK for share in before_ink), f"a blank default image: ink {before_ink}"
    _screenshot(outputs, shots, f"{name}-main-before")

    kind, label, old, new = _change_first_control(page, controls.first)
    assert old != new, f"{kind} {label!r}: the value did not change ({old!r})"
    # The new rendering goes into the Output widget (the render runs in the kernel)...
    expect(output.locator(".jp-OutputArea-output").first).to_be_attached(
        timeout=RERENDER_TIMEOUT_MS
    )
    _wait_until_stable(
        page, output, n_images=len(before_imgs), timeout_s=RERENDER_TIMEOUT_MS / 1000
    )
    _screenshot(outputs, shots, f"{name}-main-after")
    for text in output.locator(ERROR_OUTPUT).all_inner_texts():
        if STDERR_PROBLEM.search(text):
            raise AssertionError(f"re-rendering failed:\n{text[-3000:]}")
    after_text = output.inner_text().strip()
    after_imgs = [img.get_attribute("src") for img in output.locator("img").all()]
    assert after_text or after_imgs, "the panel's Output widget stayed empty"
    after_ink = output.evaluate(_INK_JS)
    assert all(share > MIN_INK for share in after_ink), (
        f"the new rendering has a blank image (share of drawn pixels per image: {after_ink})"
    )
    assert (after_text, after_imgs) != (before_text, before_imgs), (
        f"changing {label!r} from {old!r} to {new!r} did not change the rendering"
    )
    # ...and the default rendering (ordinary cell outputs) is blanked.
    static_after = cell.evaluate(_STATIC_OUTPUTS_JS)
    assert all(not o["text"] and not o["imgs"] for o in static_after), (
        f"the default rendering is still shown after the change: {static_after}"
    )
    return {
        "change": f"{kind} {label!r}: {_short(old, 70)!r} -> {_short(new, 70)!r}",
        "before": f"text {_short(before_text)!r}; images {_digest(before_imgs, before_ink)}",
        "after": f"text {_short(after_text)!r}; images {_digest(after_imgs, after_ink)}",
    }


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
@pytest.mark.timeout(int(RUN_ALL_TIMEOUT_S) + 600)
def test_chapter_runs_with_live_widgets(
    notebook: Path, lab_page, lab_server, browser_report, browser_artifacts
):
    page, name = lab_page, notebook.stem
    main_index = _main_widget_cell(notebook)
    cells = page.locator(f"{NOTEBOOK} .jp-Cell")
    try:
        times = _open_and_run_all(page, lab_server, notebook, cells)
        seen = _check_outputs(page)
        t0 = time.monotonic()
        main = _exercise_main_widget(page, cells.nth(main_index), browser_artifacts, name)
        times["widget"] = time.monotonic() - t0
    except Exception as err:  # assertion or Playwright timeout: add a screenshot and the log
        _show_trouble(page)
        shot = _screenshot(page, browser_artifacts, f"{name}-FAILED")
        log = lab_server.save_log(browser_artifacts / f"{name}-FAILED-server.log")
        raise AssertionError(
            f"{name}: {err if isinstance(err, AssertionError) else repr(err)}\n"
            f"screenshot: {shot}\nserver log: {log}"
        ) from err

    summary = (
        f"{name}: open {times['open']:.0f} s, run all {times['run_all']:.0f} s, "
        f"widget {times['widget']:.0f} s; {seen['code_cells']} code cells ran, "
        f"{seen['live_views']} live widgets, {seen['stderr']} stderr outputs\n"
        f"  changed {main['change']}\n"
        f"  before: {main['before']}\n"
        f"  after:  {main['after']}"
    )
    print(summary)
    browser_report(summary)
