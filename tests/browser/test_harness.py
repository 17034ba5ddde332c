"""Proves the browser harness itself on a stand-in notebook.

What a person would do: open the notebook in JupyterLab, Run All, watch a
widget update live, click an Accordion title, save, restart the kernel,
reopen the notebook from disk and still see the static outputs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from lab import (
    SEL,
    browser,
    cell_outputs,
    notebook_state,
    open_notebook,
    restart_kernel_and_reopen,
    run_all_cells,
    running_lab,
    save,
    screenshot,
    wait_idle,
)

pytestmark = pytest.mark.browser

NB = "harness.ipynb"

CELLS = [
    # 0: which python runs the kernel, and an env var passed through running_lab(env=)
    new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.environ.get('MOA_HARNESS_FLAG'))"),
    # 1: a live widget: Accordion whose first pane's HTML changes 5 times
    new_code_cell(
        "import time\n"
        "import ipywidgets as widgets\n"
        "live = widgets.HTML('tick-0')\n"
        "acc = widgets.Accordion(children=[live, widgets.HTML('second pane')], titles=('live', 'other'))\n"
        "acc.selected_index = 0\n"
        "display(acc)\n"
        "for i in range(1, 6):\n"
        "    time.sleep(0.2)\n"
        "    live.value = f'tick-{i}'\n"
        "time.sleep(0.2)\n"
    ),
    # 2: the same hostile HTML, escaped and not (flags differ so each is detectable)
    new_code_cell(
        "import html\n"
        "from IPython.display import HTML, display\n"
        "evil = '<img src=x onerror=\"window.__pwned_raw=1\">'\n"
        "display(HTML(html.escape(evil.replace('__pwned_raw', '__pwned_escaped'))))\n"
        "display(HTML(evil))\n"
    ),
    # 3: static outputs that must survive save / restart / reopen
    new_code_cell(
        "from IPython.display import Markdown, HTML, display\n"
        "display(Markdown('**static-markdown-output** survives'))\n"
        "display(HTML('<b class=\"static\">static-html-output</b> survives'))\n"
    ),
    new_markdown_cell("## A markdown cell"),
]


def _write_notebook(root: Path) -> None:
    nb = new_notebook(cells=CELLS)
    # Deliberately no kernelspec metadata: the harness must cope with the
    # "Select Kernel" path (autoStartDefaultKernel / dialog) and land on python3.
    nbformat.write(nb, root / NB)


def _flag(page, name: str):
    return page.evaluate(f"() => window.{name} ?? null")


def test_harness_end_to_end(lab_root, artifacts_dir, record_property):
    _write_notebook(lab_root)
    t0 = time.monotonic()
    with running_lab(lab_root, env={"MOA_HARNESS_FLAG": "from-env-42"}) as lab, browser() as b:
        t_lab = lab.started_in
        page = b.new_page()
        open_notebook(page, lab, NB)
        t_open = time.monotonic() - t0
        assert notebook_state(page)["kernelName"] == "python3"

        # -- run everything, watching the live widget while the cell runs --
        run_all_cells(page)
        seen_while_busy: list[str] = []
        deadline = time.monotonic() + 60
        started = False
        while time.monotonic() < deadline:
            st = notebook_state(page)
            texts = page.locator(SEL["widget_html_content"]).evaluate_all(
                "es => es.map(e => e.textContent)"
            )
            ticks = [t for t in texts if t.startswith("tick-")]
            busy = st["busyPrompts"] > 0 or st["status"] != "idle"
            if busy:
                started = True
                seen_while_busy.extend(t for t in ticks if t not in seen_while_busy)
            elif started:
                break
            page.wait_for_timeout(50)
        wait_idle(page)
        t_run = time.monotonic() - t0

        # cell 0: the kernel is the venv's python and got the env
        out0 = cell_outputs(page, 0).inner_text()
        import sys

        assert sys.executable in out0, out0
        assert "from-env-42" in out0, out0

        # cell 1: the widget rendered and updated live
        widget_out = cell_outputs(page, 1).locator(SEL["widget_output"])
        assert widget_out.count() == 1
        acc = cell_outputs(page, 1).locator(SEL["accordion"])
        assert acc.count() == 1
        assert acc.locator(SEL["widget_html"]).count() == 2
        live = acc.locator(SEL["widget_html_content"]).first
        assert live.inner_text() == "tick-5"
        intermediate = [t for t in seen_while_busy if t not in ("tick-0", "tick-5")]
        assert len(intermediate) >= 2, f"saw only {seen_while_busy} while running"

        # clicking a title toggles its pane
        titles = acc.locator(SEL["collapse_header"])
        assert titles.count() == 2
        children = acc.locator(SEL["accordion_child"])
        contents0 = children.nth(0).locator(SEL["accordion_contents"])
        assert "jupyter-widget-Collapse-open" in children.nth(0).get_attribute("class")
        assert live.is_visible()
        titles.nth(0).click()
        page.wait_for_function(
            "el => el.classList.contains('lm-mod-hidden')", arg=contents0.element_handle()
        )
        assert not live.is_visible()
        assert "jupyter-widget-Collapse-open" not in children.nth(0).get_attribute("class")
        titles.nth(1).click()
        children.nth(1).locator(SEL["accordion_contents"]).locator(SEL["widget_html"]).wait_for(
            state="visible"
        )
        assert "second pane" in children.nth(1).inner_text()

        # cell 2: the pwned-detector works (unescaped fires, escaped does not)
        out2 = cell_outputs(page, 2)
        assert out2.locator(SEL["html_output"]).count() == 2
        page.wait_for_function("() => window.__pwned_raw === 1", timeout=10_000)
        assert _flag(page, "__pwned_escaped") is None
        assert "onerror" in out2.locator(SEL["html_output"]).first.inner_text()

        # cell 3: static outputs render
        out3 = cell_outputs(page, 3)
        assert "static-markdown-output" in out3.locator(SEL["markdown_output"]).inner_text()
        assert "static-html-output" in out3.locator(SEL["html_output"]).inner_text()
        shot = screenshot(page, artifacts_dir / "harness-after-run.png")
        assert shot.stat().st_size > 10_000

        # -- save, restart kernel, close, reopen from disk --
        save(page)
        on_disk = json.loads((lab_root / NB).read_text())
        assert on_disk["metadata"]["kernelspec"]["name"] == "python3"
        saved_types = [
            o.get("output_type") for o in on_disk["cells"][1].get("outputs", [])
        ]
        assert "display_data" in saved_types
        t1 = time.monotonic()
        restart_kernel_and_reopen(page, lab, NB)
        t_reopen = time.monotonic() - t1

        out3 = cell_outputs(page, 3)
        out3.locator(SEL["markdown_output"]).wait_for(state="visible")
        assert "static-markdown-output" in out3.locator(SEL["markdown_output"]).inner_text()
        assert "static-html-output" in out3.locator(SEL["html_output"]).inner_text()
        assert "A markdown cell" in page.locator(SEL["markdown_cell"]).inner_text()
        # after a restart, the widget model is gone; record what the user sees
        page.wait_for_timeout(3000)
        widget_after = cell_outputs(page, 1).inner_text()
        # a notebook saved by the lab is signed (trusted), so its raw HTML runs again
        pwned_after_reopen = _flag(page, "__pwned_raw")
        screenshot(page, artifacts_dir / "harness-after-reopen.png")
        assert not b.page_errors, b.page_errors

    timings = {
        "lab_start_s": round(t_lab, 2),
        "lab_plus_open_s": round(t_open, 2),
        "run_all_s": round(t_run - t_open, 2),
        "restart_reopen_s": round(t_reopen, 2),
        "total_s": round(time.monotonic() - t0, 2),
    }
    for k, v in timings.items():
        record_property(k, v)
    print(f"\nbrowser harness timings: {timings}")
    print(f"widget output after restart+reopen: {widget_after!r}")
    print(f"raw onerror ran again after reopen (notebook trusted): {pwned_after_reopen}")
    print(f"ticks seen while running: {seen_while_busy}")
    print(f"screenshots: {artifacts_dir}")
