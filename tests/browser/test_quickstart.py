"""notebooks/quickstart.ipynb in a real JupyterLab, in headless Chromium, as a user sees it.

The lab runs on loopback with MOA_MAGIC_CONFIG pointing at a moa.toml for a ChatServer in this
process (the kernel inherits the lab's environment). Run All, then check what the page shows:

- the live tree of the first `%%moa` cell: header (preset + shape), one section per layer, one
  node per proposer titled with its model, the aggregator's answer in `.moa-final`;
- the final answer streams: while the cell still shows `[*]` the page holds partial answers,
  several of them, each shorter than the whole (not one jump at the end);
- clicking a layer title folds and unfolds it;
- hostile model text (one proposer and the aggregator of the `--preset local` cell) never runs:
  `window.__moa_pwned` stays undefined live, and after save + kernel restart + reopen (the lab
  trusts a notebook it saved, so only escaping protects the static output);
- after the restart + reopen the static rendition still shows the final answer and every layer;
- docs/tree.png: the finished tree, layers unfolded, cropped to the cell.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from chat_server import ChatServer, Reply, last_user_message
from lab import (
    SEL,
    VIEWPORT,
    cell_outputs,
    notebook_state,
    open_notebook,
    restart_kernel_and_reopen,
    run_all_cells,
    run_command,
    running_lab,
    save,
    screenshot,
    wait_idle,
)

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "notebooks" / "quickstart.ipynb"
DOCS_SHOT = REPO / "docs" / "tree.png"
NB = "quickstart.ipynb"

# The default preset answers the first %%moa cell ("why is the sky blue?") with scripted, readable
# replies (they end up in docs/tree.png); `local` is redefined to the same server: its cell
# (`--preset local --layers 3`) gets the hostile replies.
TOML = """\
default_preset = "demo"

[providers.demo]
base_url = "{url}"

[presets.demo]
description = "a scripted loopback server (the browser test)"
layers = [["demo:alpha", "demo:beta", "demo:gamma"], ["demo:alpha", "demo:beta", "demo:gamma"]]
aggregator = "demo:omega"

[presets.local]
description = "the embedded model, replaced by the loopback server in the browser test"
layers = [["demo:l1", "demo:l2"]]
aggregator = "demo:lagg"
"""
PRESET = "demo"
SHAPE = "3 layers: 2×3 proposers + aggregator"
PROPOSERS = [["alpha", "beta", "gamma"], ["alpha", "beta", "gamma"]]

SKY = {
    ("alpha", 1): "Air molecules scatter the short, blue wavelengths of sunlight much more than the "
                  "long red ones: **Rayleigh scattering**, roughly ∝ 1/λ⁴.",
    ("beta", 1): "Sunlight is white. Crossing the atmosphere, its blue part is scattered in every "
                 "direction, so blue light reaches us from all over the sky.",
    ("gamma", 1): "Scattering by nitrogen and oxygen molecules. Violet scatters even more, but the "
                  "Sun emits less of it and our eyes are less sensitive to it.",
    ("alpha", 2): "All three agree: Rayleigh scattering by air molecules favours short wavelengths, "
                  "so scattered blue light fills the sky.",
    ("beta", 2): "Keep the mechanism (*∝ 1/λ⁴* scattering) and add why the sky looks blue rather "
                 "than violet (solar spectrum, eye sensitivity).",
    ("gamma", 2): "Molecules in air scatter blue light far more than red and send it across the "
                  "whole sky; violet is weaker in sunlight and to our eyes.",
}
FINAL = (
    "Sunlight holds every colour, but the nitrogen and oxygen molecules in air scatter short blue "
    "wavelengths far more strongly than red ones (**Rayleigh scattering**, ∝ 1/λ⁴). That scattered "
    "blue light reaches our eyes from every direction, so the whole sky glows blue."
)
FINAL_SHOWN = FINAL.replace("**", "")  # as rendered Markdown reads
FINAL_CHUNK_DELAY = 0.04
SHOT_VIEWPORT = {"width": 1100, "height": 2000}

HOSTILE = (
    'Hostile text follows. <img src=x onerror="window.__moa_pwned=1"> then '
    "<script>window.__moa_pwned=2</script> then [click me](javascript:window.__moa_pwned=3) end."
)


def _layer(body: dict) -> int:
    """Layer 1 calls carry no system message; later calls carry the aggregate prompt in one."""
    return 2 if any(m.get("role") == "system" for m in body.get("messages") or []) else 1


def _is_sky(body: dict) -> bool:
    return "sky" in last_user_message(body).lower()


def script_server(server: ChatServer) -> None:
    for model in ("alpha", "beta", "gamma"):
        server.script(
            model=model, match=_is_sky,
            reply=lambda body, m=model: Reply(text=SKY[(m, _layer(body))], chunk_delay=0.02, usage=None),
        )
    server.script(model="omega", match=_is_sky, reply=Reply(text=FINAL, chunk_delay=FINAL_CHUNK_DELAY, usage=None))
    server.script(model="l1", reply=Reply(text=HOSTILE, chunk_delay=0.005))
    server.script(model="lagg", reply=Reply(text=HOSTILE, chunk_delay=0.005))


def moa_cells(path: Path) -> dict[str, int]:
    """Indices (in the notebook, = in the DOM) of the %%moa cells this test looks at."""
    nb = nbformat.read(path, as_version=4)
    found = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.startswith("%%moa"):
            continue
        first, _, prompt = cell.source.partition("\n")
        if "sky" in prompt.lower() and "--preset" not in first:
            found.setdefault("sky", i)
        if "--preset local" in first:
            found.setdefault("local", i)
    assert set(found) == {"sky", "local"}, (
        f"quickstart.ipynb changed: wanted a default-preset %%moa cell about the sky and a "
        f"`--preset local` cell, found {found}; update the scripted replies in this test"
    )
    return found


# The state of one cell: its prompt and the final answer's text (textContent: works for cells
# outside the viewport too, which JupyterLab's default windowing skips rendering).
_JS_CELL = """
(i) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
  if (!cell) return null;
  const prompt = cell.querySelector('.jp-InputArea-prompt');
  const fin = cell.querySelector('.moa-final');
  return {
    prompt: prompt ? prompt.textContent.trim() : '',
    final: fin ? fin.textContent.replace(/\\s+/g, ' ').trim() : null,
  };
}
"""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _pwned(page):
    return page.evaluate("() => typeof window.__moa_pwned === 'undefined' ? null : window.__moa_pwned")


def layer_parts(tree, number: int):
    """(title, contents) of layer NUMBER: the direct child Collapse of the `.moa-layer-N` Accordion
    (a node is an Accordion too, nested inside the contents)."""
    child = tree.locator(f".moa-layer-{number} > {SEL['accordion_child']}")
    return child.locator(f":scope > {SEL['collapse_header']}"), child.locator(f":scope > {SEL['accordion_contents']}")


def check_no_script_ran(page, out, where: str) -> None:
    """The payload is on the page as text; no flag is set; a rendered 'click me' link is inert."""
    out.scroll_into_view_if_needed()
    text = _norm(out.text_content())
    assert "window.__moa_pwned=1" in text and "<script>" in text, (
        f"{where}: the hostile text is not shown as text: {text[:500]}"
    )
    links = out.locator("a", has_text="click me")
    assert links.count() or "(javascript:window.__moa_pwned=3)" in text, f"{where}: {text[:500]}"
    for i in range(links.count()):
        href = links.nth(i).get_attribute("href") or ""
        assert not href.strip().lower().startswith("javascript"), f"{where}: link {href!r}"
        links.nth(i).click()
    assert out.locator("script").count() == 0, f"{where}: a <script> element made it into the DOM"
    assert out.locator("img[onerror]").count() == 0, f"{where}: an <img onerror> made it into the DOM"
    page.wait_for_timeout(500)  # an onerror fires asynchronously
    assert _pwned(page) is None, f"{where}: window.__moa_pwned = {_pwned(page)!r}"


def test_quickstart_in_jupyterlab(lab_root, artifacts_dir, chat_server, chromium, page, record_property):
    cells = moa_cells(QUICKSTART)
    shutil.copy(QUICKSTART, lab_root / NB)
    t0 = time.monotonic()
    server = chat_server
    script_server(server)
    config = lab_root / "moa.toml"
    config.write_text(TOML.format(url=server.url), "utf-8")
    with running_lab(lab_root, env={"MOA_MAGIC_CONFIG": str(config)}) as lab:
        open_notebook(page, lab, NB)
        t_open = time.monotonic() - t0

        # ---- Run All, polling the sky cell's final answer while its prompt shows [*] -------
        run_all_cells(page)
        partials: list[str] = []
        seen_busy = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = page.evaluate(_JS_CELL, cells["sky"])
            if st and "[*]" in st["prompt"]:
                seen_busy = True
                fin = st["final"] or ""
                if (fin and not fin.endswith("…") and len(fin) < len(FINAL_SHOWN)
                        and (not partials or partials[-1] != fin)):
                    partials.append(fin)
                    if len(partials) == 8:  # what a user sees mid-stream
                        cell_outputs(page, cells["sky"]).scroll_into_view_if_needed()
                        screenshot(page, artifacts_dir / "00-streaming.png", full_page=False)
            elif seen_busy:
                break
            page.wait_for_timeout(30)
        assert seen_busy, "the sky cell never showed [*]"
        t_cell = time.monotonic() - t0 - t_open
        screenshot(page, artifacts_dir / "01-sky-cell-done.png", full_page=False)
        wait_idle(page, timeout=180)
        t_run = time.monotonic() - t0 - t_open
        screenshot(page, artifacts_dir / "02-run-all-done.png", full_page=False)

        assert not server.errors, server.errors
        # streaming is visible: several growing partial answers, each a prefix of the whole
        assert len(partials) >= 3, f"final answer did not stream visibly: {partials}"
        assert all(FINAL_SHOWN.startswith(p.replace("**", "")[:30]) for p in partials), partials
        lengths = [len(p.replace("*", "")) for p in partials]  # an unclosed ** shows literally
        assert lengths == sorted(lengths), lengths

        # ---- the live tree of the sky cell ------------------------------------------------
        out = cell_outputs(page, cells["sky"])
        out.scroll_into_view_if_needed()
        tree = out.locator(".moa-tree")
        assert tree.count() == 1
        header = _norm(tree.locator(".moa-header").text_content())
        assert f"preset {PRESET}" in header and SHAPE in header and "done" in header, header
        assert tree.locator(".moa-layer").count() == len(PROPOSERS)
        for number, models in enumerate(PROPOSERS, start=1):
            layer = tree.locator(f".moa-layer-{number}")
            assert layer.locator(".moa-node").count() == len(models)
            for index, model in enumerate(models, start=1):
                node = layer.locator(f".moa-node-{number}-{index}")
                assert "moa-status-done" in node.get_attribute("class")
                title = _norm(node.locator(SEL["collapse_header"]).text_content())
                assert model in title and f"L{number}.{index}" in title, title
                text = _norm(node.locator(".moa-node-text").text_content())
                assert text == SKY[(model, number)].replace("**", "").replace("*", ""), text
        final = _norm(tree.locator(".moa-final").text_content())
        assert final == FINAL_SHOWN, final
        assert tree.locator(".moa-final strong").count() == 1  # rendered Markdown
        assert tree.locator(".moa-final").is_visible()
        final_title = _norm(tree.locator(f".moa-final-section {SEL['collapse_header']}").text_content())
        assert "omega" in final_title, final_title

        # ---- fold / unfold: the run leaves every layer folded; click to open, close, open --
        for number in range(len(PROPOSERS), 0, -1):
            title, contents = layer_parts(tree, number)
            first_node = tree.locator(f".moa-node-{number}-1 .moa-node-text")
            assert contents.evaluate("e => e.classList.contains('lm-mod-hidden')"), "layer left open"
            assert not first_node.is_visible()
            title.click()
            first_node.wait_for(state="visible")
            title.click()
            first_node.wait_for(state="hidden")
            assert contents.evaluate("e => e.classList.contains('lm-mod-hidden')")
            title.click()
            first_node.wait_for(state="visible")
            for index in range(1, len(PROPOSERS[number - 1]) + 1):
                assert tree.locator(f".moa-node-{number}-{index} .moa-node-text").is_visible()

        # ---- docs/tree.png: the finished tree, layers open, cropped to the tree -------------
        # The notebook scrolls inside its own panel, so an element taller than the viewport is
        # cut off: make the page tall enough for the whole tree, and hide the file browser so
        # the lines wrap as in a typical lab window.
        run_command(page, "application:toggle-left-area")
        page.set_viewport_size(SHOT_VIEWPORT)
        page.wait_for_timeout(500)
        tree.scroll_into_view_if_needed()
        box = tree.bounding_box()
        assert box and box["height"] < SHOT_VIEWPORT["height"] - 150, box
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        tree.screenshot(path=str(DOCS_SHOT))
        shutil.copy(DOCS_SHOT, artifacts_dir / "tree.png")
        assert DOCS_SHOT.stat().st_size > 20_000
        out.screenshot(path=str(artifacts_dir / "03-sky-cell-output.png"))  # tree + static copy
        page.set_viewport_size(VIEWPORT)
        run_command(page, "application:toggle-left-area")
        screenshot(page, artifacts_dir / "03-layers-open.png", full_page=False)

        # ---- static rendition of the sky cell (live) ---------------------------------------
        static = out.locator(".moa-static")
        assert static.count() == 1
        assert FINAL_SHOWN in _norm(static.locator(".moa-static-final").text_content())

        # ---- hostile text in the local cell: shown as text, never run ----------------------
        local_out = cell_outputs(page, cells["local"])
        local_tree = local_out.locator(".moa-tree")
        assert local_tree.count() == 1
        assert local_tree.locator(".moa-layer").count() == 2
        # open the layers so the hostile proposer text is rendered and visible
        for number in (1, 2):
            title, _ = layer_parts(local_tree, number)
            title.click()
            local_tree.locator(f".moa-node-{number}-1 .moa-node-text").wait_for(state="visible")
        check_no_script_ran(page, local_tree.locator(".moa-node-1-1 .moa-node-text"), "live proposer")
        check_no_script_ran(page, local_tree.locator(".moa-final"), "live final answer")
        check_no_script_ran(page, local_out.locator(".moa-static-final"), "live static output")
        screenshot(page, artifacts_dir / "04-hostile-live.png", full_page=False)

        # ---- save, restart the kernel, reopen from disk ------------------------------------
        save(page)
        saved = nbformat.read(lab_root / NB, as_version=4)
        assert any("moa-static" in str(o.get("data", {}).get("text/html", ""))
                   for o in saved.cells[cells["sky"]].outputs)
        t1 = time.monotonic()
        restart_kernel_and_reopen(page, lab, NB)
        t_reopen = time.monotonic() - t1
        assert notebook_state(page)["status"] == "idle"

        out = cell_outputs(page, cells["sky"])
        out.scroll_into_view_if_needed()
        static = out.locator(".moa-static")
        static.wait_for(state="visible")
        assert FINAL_SHOWN in _norm(static.locator(".moa-static-final").text_content())
        assert PRESET in _norm(static.locator(".moa-static-header").text_content())
        layers = static.locator("details.moa-static-layer")
        assert layers.count() == len(PROPOSERS)
        for number, models in enumerate(PROPOSERS, start=1):
            layer = static.locator(f'details.moa-static-layer[data-layer="{number}"]')
            nodes = layer.locator("details.moa-static-node")
            assert nodes.count() == len(models)
            for index, model in enumerate(models):
                summary = _norm(nodes.nth(index).locator("summary").text_content())
                assert model in summary and model in nodes.nth(index).get_attribute("data-model")
        # a <details> opens on click and shows the proposer's answer
        layer1 = static.locator('details.moa-static-layer[data-layer="1"]')
        layer1.locator(":scope > summary").click()
        node = layer1.locator("details.moa-static-node").first
        node.locator(":scope > summary").click()
        assert _norm(node.locator(".moa-static-text").inner_text()) == _norm(
            SKY[("alpha", 1)].replace("**", "")
        )
        page.wait_for_timeout(2000)
        widget_after = _norm(out.locator(SEL["output"]).first.text_content())
        screenshot(page, artifacts_dir / "05-reopened.png", full_page=False)

        local_out = cell_outputs(page, cells["local"])
        local_out.locator(".moa-static").wait_for(state="attached")
        page.wait_for_timeout(1500)  # let any trusted-output script or onerror run
        for details in local_out.locator("details").all():
            details.evaluate("e => e.open = true")
        check_no_script_ran(page, local_out.locator(".moa-static"), "reopened static output")
        screenshot(page, artifacts_dir / "06-hostile-reopened.png", full_page=False)

        assert not chromium.page_errors, chromium.page_errors
        assert not server.errors, server.errors

    timings = {
        "lab_plus_open_s": round(t_open, 2),
        "sky_cell_s": round(t_cell, 2),
        "run_all_s": round(t_run, 2),
        "restart_reopen_s": round(t_reopen, 2),
        "total_s": round(time.monotonic() - t0, 2),
    }
    for k, v in timings.items():
        record_property(k, v)
    print(f"\nquickstart browser timings: {timings}")
    print(f"partial final answers seen while [*]: {len(partials)} (lengths {lengths})")
    print(f"sky cell's widget output after restart+reopen: {widget_after[:160]!r}")
    print(f"screenshots: {artifacts_dir}; docs screenshot: {DOCS_SHOT}")
