"""Interactive experiments that also leave a readable result when run headless.

Every chapter has an experiment with sliders: ``interactive_panel(render, **controls)``
shows the controls and calls ``render(**values)`` once with their default values; in a live
Jupyter kernel, moving a control calls ``render`` again with the new values.

Why not just ``ipywidgets.interact`` or an ``Output`` widget? Both put the plot *inside a
widget*. When a notebook is executed headless (nbclient, ``nbconvert --execute``, nbval)
nbclient mimics the front end: whatever is written into an ``Output`` widget is stored in
the widget's state (notebook metadata, ``application/vnd.jupyter.widget-state+json``), not
in the cell's outputs. GitHub and most notebook viewers do not render widget state, so the
reader of a committed notebook would see an empty cell where the experiment should be.

So the default rendering is written as *ordinary cell outputs* (text and PNG figures), each
one displayed with a ``display_id``. Below the controls sits an ``Output`` widget that stays
empty until a control changes. On the first change (only possible in a live kernel) the
default outputs are blanked through their display ids and every later rendering goes into
the ``Output`` widget, which the front end updates in place. The controls' plain-text
fallback lists their current values, so a reader without widgets still sees the settings.

``render`` may print text and draw matplotlib figures; figures it leaves open are shown and
closed for it (text first, then figures, in the static rendering).

Renders run one at a time and with matplotlib's interactive mode off. JupyterLab 4.4+ with
ipykernel 7 handles widget messages in a kernel *subshell*, a thread of its own, and every
widget message ends with IPython's ``post_execute`` hooks, which with the inline backend draw
and display every open figure queued for display. Without these two guards such a hook could
draw the figure a render is still drawing in another thread (matplotlib is not thread-safe):
the learner's first slider move then showed a blank or half-drawn plot.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ipywidgets as widgets
from IPython.display import display, update_display
from IPython.utils.capture import capture_output

from tinylm.util import kernel_shell

__all__ = ["Panel", "interactive_panel"]

# One render at a time, across panels and threads (see the module docstring). Re-entrant:
# an observer may change another control, and so start a render, from inside a render.
_RENDER_LOCK = threading.RLock()


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else repr(value)


def _open_figures() -> set[int]:
    # Only look at pyplot if the render function (or the notebook) imported it.
    pyplot = sys.modules.get("matplotlib.pyplot")
    return set(pyplot.get_fignums()) if pyplot is not None else set()


@contextmanager
def _figures_kept_from_hooks() -> Iterator[None]:
    """Turn matplotlib's interactive mode off while a render draws (restored afterwards).

    Figures made while it is off are not queued for the inline backend's ``post_execute``
    hooks, so a hook run in another thread leaves them alone; the render shows them itself.
    """
    matplotlib = sys.modules.get("matplotlib")
    if matplotlib is None:  # the render may still import it; nothing to guard before that
        yield
        return
    was_interactive = matplotlib.is_interactive()
    matplotlib.interactive(False)
    try:
        yield
    finally:
        matplotlib.interactive(was_interactive)


def _show_new_figures(before: set[int]) -> None:
    """Display and close the figures created since ``before`` (so each is shown exactly once)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in sorted(set(pyplot.get_fignums()) - before):
        figure = pyplot.figure(number)
        display(figure)
        pyplot.close(figure)


class Panel:
    """Controls plus a rendering area; see the module docstring for how the output is kept.

    ``controls`` maps each keyword argument of ``render`` to an ipywidgets value widget
    (``IntSlider``, ``FloatLogSlider``, ``Dropdown``, ...). Sliders re-render when released
    (``continuous_update=False``) unless ``continuous=True``, because a matplotlib redraw
    takes a noticeable fraction of a second.
    """

    def __init__(
        self,
        render: Callable[..., Any],
        controls: Mapping[str, widgets.ValueWidget],
        *,
        continuous: bool = False,
    ) -> None:
        if not controls:
            raise ValueError("interactive_panel needs at least one control, e.g. n=IntSlider(4)")
        for name, control in controls.items():
            if not isinstance(control, widgets.ValueWidget):
                raise TypeError(
                    f"control {name!r} is a {type(control).__name__}; pass an ipywidgets value "
                    f"widget, e.g. {name}=widgets.IntSlider(value=4, min=1, max=16)"
                )
        self.render = render
        self.controls: dict[str, widgets.ValueWidget] = dict(controls)
        self.output = widgets.Output()
        self.render_count = 0
        self._static_ids: list[str] = []
        self._shown = False
        for name, control in self.controls.items():
            if not getattr(control, "description", None):
                control.description = name
                control.style = {"description_width": "initial"}
            if hasattr(control, "continuous_update") and not continuous:
                control.continuous_update = False
            control.observe(self._on_change, names="value")
        self.box = widgets.VBox([*self.controls.values(), self.output])

    @property
    def values(self) -> dict[str, Any]:
        """The current value of every control, by keyword name."""
        return {name: control.value for name, control in self.controls.items()}

    def _render(self) -> None:
        with _RENDER_LOCK, _figures_kept_from_hooks():
            before = _open_figures()
            self.render_count += 1
            self.render(**self.values)
            _show_new_figures(before)

    def show(self) -> None:
        """Display the controls and render the current values as ordinary cell outputs."""
        self._shown = True
        shell = kernel_shell()
        if shell is None:  # plain Python or a test: just render (prints go to stdout)
            self._render()
            return
        bundle = self.box._repr_mimebundle_()
        settings = ", ".join(f"{name}={_short(value)}" for name, value in self.values.items())
        bundle["text/plain"] = f"[interactive controls (live when run in Jupyter): {settings}]"
        display(bundle, raw=True)
        with capture_output(stdout=True, stderr=False, display=True) as captured:
            self._render()
        outputs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        if captured.stdout:
            outputs.append(({"text/plain": captured.stdout.rstrip("\n")}, {}))
        outputs += [(out.data, out.metadata or {}) for out in captured.outputs]
        for data, metadata in outputs:
            display_id = f"tinylm-panel-{uuid.uuid4().hex}"
            display(data, metadata=metadata, raw=True, display_id=display_id)
            self._static_ids.append(display_id)

    def _ipython_display_(self) -> None:
        # `panel = interactive_panel(...)` or a bare `interactive_panel(...)` as the last line
        # of a cell: either way the panel appears exactly once.
        if not self._shown:
            self.show()

    def _on_change(self, change: Mapping[str, Any]) -> None:
        """Re-render into the Output widget (live kernel) after blanking the static outputs."""
        with _RENDER_LOCK:
            self._rerender()

    def _rerender(self) -> None:
        if self._static_ids:
            for display_id in self._static_ids:
                update_display({"text/plain": ""}, raw=True, display_id=display_id)
            self._static_ids.clear()
        with self.output:
            self.output.clear_output(wait=True)
            self._render()


def interactive_panel(
    render: Callable[..., Any], /, *, continuous: bool = False, **controls: widgets.ValueWidget
) -> Panel:
    """Show ``controls`` and ``render(**values)`` now; re-render whenever a control changes.

    Example::

        def render(n_params: float, tokens_per_day: float) -> None:
            fig, ax = plt.subplots()
            ...  # draw; print() text if useful

        interactive_panel(
            render,
            n_params=widgets.FloatLogSlider(value=8e9, base=10, min=8, max=12),
            tokens_per_day=widgets.FloatLogSlider(value=1e11, base=10, min=8, max=13),
        )

    The default rendering is stored as ordinary cell outputs, so a headless run (nbval,
    ``jupyter nbconvert --execute``) leaves the plot in the committed notebook.
    """
    panel = Panel(render, controls, continuous=continuous)
    panel.show()
    return panel
