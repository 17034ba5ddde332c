"""A `%%moa` run in Notebook 7 (the `notebook` package's one-document page), as a user sees it.

The same story as test_quickstart.py, on the same server, with its scripted replies and checks,
in Notebook 7's page at `/notebooks/NAME` (narrower content column, its own shell) at a
classroom projector's 1024 × 768:

- the live widget tree while the cell runs: six proposer cards, the answer streaming (the server
  holds the answer after a few words until the page has shown them);
- when it ends, the same output holds the finished view, once: answer first and labelled, no
  widget, no "Error displaying widget"; the cards fit the column side by side, none overlapping;
- after save + kernel restart + reload: the finished view is still there, no widget error.

Screenshots go to the artifacts directory (nb7-*.png).
"""

from __future__ import annotations

import threading

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from lab import (
    SEL,
    cell_outputs,
    open_notebook,
    restart_kernel_and_reopen,
    run_all_cells,
    running_lab,
    save,
    screenshot,
    wait_idle,
)
from test_quickstart import (
    _JS_CELL,
    FINAL_CHUNKS,
    PROPOSERS,
    TOML,
    _norm,
    check_finished_view,
    script_server,
)

pytestmark = pytest.mark.browser

NB = "sky.ipynb"
RUN_CELL = 1
PROJECTOR = {"width": 1024, "height": 768}
# Notebook 7.6's own page throws this while it loads, with no moa code anywhere (its shortcuts
# plugin reads the schema of a plugin the settings registry does not hold); any other error is ours.
NOTEBOOK7_LOAD_ERROR = "Cannot read properties of undefined (reading 'schema')"
# The answer's stream stops after these many words until the live view has shown them.
PAUSES = (4, 9)

_JS_SHOWS_HELD = f"""
([i, held]) => {{
  const st = ({_JS_CELL})(i);
  return !!st && st.final === held;
}}
"""

# Where each card of a layer sits, and how wide the view is against the room it has.
_JS_LAYOUT = """
(view) => {
  const rect = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const layers = Array.from(view.querySelectorAll('.moa-grid')).map(
    g => Array.from(g.querySelectorAll(':scope > .moa-card')).map(rect));
  return {layers, view: rect(view), scrollWidth: view.scrollWidth, clientWidth: view.clientWidth};
}
"""


def check_cards_fit(out, where: str) -> None:
    """Each layer's cards sit side by side inside the view, apart, and nothing is cut off sideways."""
    root = out.locator(".moa-tree, .moa-view").first
    layout = root.evaluate(_JS_LAYOUT)
    assert layout["scrollWidth"] <= layout["clientWidth"] + 1, (where, layout)
    left, _, right, _ = layout["view"]
    assert [len(cards) for cards in layout["layers"]] == [len(m) for m in PROPOSERS], (where, layout)
    for cards in layout["layers"]:
        assert len({round(top) for _, top, _, _ in cards}) == 1, (where, "not side by side", cards)
        for (_, _, prev_right, _), (next_left, _, next_right, _) in zip(cards, cards[1:]):
            assert prev_right <= next_left, (where, "cards overlap", cards)
        assert cards[0][0] >= left - 1 and cards[-1][2] <= right + 1, (where, "outside the view", cards)
        assert min(r - l for l, _, r, _ in cards) >= 170, (where, "cramped cards", cards)


def test_a_run_in_notebook7(lab_root, artifacts_dir, chat_server, chromium, page):
    pauses = {n: threading.Event() for n in PAUSES}
    script_server(chat_server, pauses)
    config = lab_root / "moa.toml"
    config.write_text(TOML.format(url=chat_server.url), "utf-8")
    nb = new_notebook(cells=[new_code_cell("%load_ext moa_magic"), new_code_cell("%%moa\nWhy is the sky blue?")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, lab_root / NB)
    page.set_viewport_size(PROJECTOR)
    errors_before = len(chromium.page_errors)
    with running_lab(lab_root, env={"MOA_MAGIC_CONFIG": str(config)}) as lab:
        open_notebook(page, lab, NB, ui="notebook")
        assert page.evaluate("() => window.jupyterapp.name") == "Jupyter Notebook"
        assert page.locator(".jp-LabShell").count() == 0  # Notebook 7's own shell, not the lab's

        # ---- live: the widget tree, the answer streaming ----------------------------------
        run_all_cells(page)
        out = cell_outputs(page, RUN_CELL)
        for number, (words, release) in enumerate(pauses.items()):
            held = _norm("".join(FINAL_CHUNKS[:words]))
            page.wait_for_function(_JS_SHOWS_HELD, arg=[RUN_CELL, held], timeout=120_000)
            state = page.evaluate(_JS_CELL, RUN_CELL)
            assert "[*]" in state["prompt"] and state["live"] and state["cards"] == 6, state
            assert "Error displaying widget" not in out.text_content()
            if number == 0:
                check_cards_fit(out, "live")
                out.scroll_into_view_if_needed()
                screenshot(page, artifacts_dir / "nb7-00-live.png", full_page=False)
            release.set()

        # ---- finished: one output, the finished view, no widget ---------------------------
        wait_idle(page, timeout=180)
        assert not chat_server.errors, chat_server.errors
        out.scroll_into_view_if_needed()
        check_finished_view(page, out, "finished (Notebook 7)")
        assert out.locator(SEL["widget"]).count() == 0
        check_cards_fit(out, "finished")
        screenshot(page, artifacts_dir / "nb7-01-finished.png", full_page=False)
        timeline = out.locator("svg.moa-timeline-svg")
        timeline.scroll_into_view_if_needed()
        assert timeline.is_visible()
        screenshot(page, artifacts_dir / "nb7-01-finished-timeline.png", full_page=False)

        # ---- save, restart the kernel, reload the page -----------------------------------
        save(page)
        [saved] = nbformat.read(lab_root / NB, as_version=4).cells[RUN_CELL].outputs
        assert "application/vnd.jupyter.widget-view+json" not in saved["data"]
        assert "moa-view" in saved["data"]["text/html"]
        restart_kernel_and_reopen(page, lab, NB, ui="notebook")
        out = cell_outputs(page, RUN_CELL)
        out.locator(".moa-view").wait_for(state="visible")
        out.scroll_into_view_if_needed()
        check_finished_view(page, out, "reloaded (Notebook 7)")
        assert "Error displaying widget" not in page.locator(SEL["notebook"]).text_content()
        check_cards_fit(out, "reloaded")
        screenshot(page, artifacts_dir / "nb7-02-reloaded.png", full_page=False)

    # the session's Chromium is shared: leave its error list as this test found it
    errors = chromium.page_errors[errors_before:]
    del chromium.page_errors[errors_before:]
    assert [e for e in errors if e != NOTEBOOK7_LOAD_ERROR] == [], errors
