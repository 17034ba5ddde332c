"""notebooks/quickstart.ipynb in a real JupyterLab, in headless Chromium, as a user sees it.

The lab runs on loopback with MOA_MAGIC_CONFIG pointing at a moa.toml for a ChatServer in this
process (the kernel inherits the lab's environment). Run All, then check what the page shows:

- the live view of the first `%%moa` cell while it runs: the header, proposer cards side by side,
  the answer streaming (several growing partial answers, not one jump at the end). The server
  holds the answer's stream after a few words until the page has shown them, so the live phase
  lasts as long as the test needs to see it, on a machine of any speed;
- when it ends the same output holds the finished view, once: no widget, no second copy; the answer
  first, labelled, at the body font size or larger; one row of cards per layer (wrapping on a narrow
  window); what each layer-2 proposer changed (a word diff); agreement (a matrix) and the answer's
  closeness to each proposer (bars); the timeline (SVG) with the answer's first token marked;
  the prompt sent, folded; layers fold and unfold on a click;
- hostile model text (the `--preset local` cell) never runs, live or after save + kernel restart +
  reopen (the lab trusts a notebook it saved, so only escaping protects it);
- after save + restart + reopen: the finished view is there, no "Error displaying widget";
- `jupyter nbconvert --to html` of the saved notebook, opened in Chromium with every network
  request refused: the finished view is readable;
- the dark theme: the view follows the theme's colours.

Screenshots of every step go to the artifacts directory; `--readme-images` also writes
docs/tree.png (the README's picture) — a plain test run never touches tracked files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from chat_server import ChatServer, Reply, last_user_message, split_words
from lab import (
    SEL,
    VIEWPORT,
    cell_outputs,
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
    ("alpha", 2): "Air molecules scatter the short, blue wavelengths of sunlight much more than the "
                  "long red ones: **Rayleigh scattering**, roughly ∝ 1/λ⁴. All three answers agree.",
    ("beta", 2): "Sunlight is white. Crossing the atmosphere, its blue part is scattered by air "
                 "molecules in every direction, so blue light reaches us from all over the sky.",
    ("gamma", 2): "Rayleigh scattering by nitrogen and oxygen molecules. Violet scatters even more, "
                  "but the Sun emits less of it and our eyes are less sensitive to it.",
}
FINAL = (
    "Sunlight holds every colour, but the nitrogen and oxygen molecules in air scatter short blue "
    "wavelengths far more strongly than red ones (**Rayleigh scattering**, ∝ 1/λ⁴). That scattered "
    "blue light reaches our eyes from every direction, so the whole sky glows blue."
)
FINAL_SHOWN = FINAL.replace("**", "")  # as rendered Markdown reads
FINAL_CHUNK_DELAY = 0.04
FINAL_CHUNKS = split_words(FINAL)
# The answer's stream stops after this many words until the live view has shown them (all before
# the first "**", which shows literally while it is unclosed).
FINAL_PAUSES = (4, 9, 15)
SHOT_VIEWPORT = {"width": 1100, "height": 2400}

HOSTILE = (
    'Hostile text follows. <img src=x onerror="window.__moa_pwned=1"> then '
    "<script>window.__moa_pwned=2</script> then [click me](javascript:window.__moa_pwned=3) end."
)


def _layer(body: dict) -> int:
    """Layer 1 calls carry no system message; later calls carry the aggregate prompt in one."""
    return 2 if any(m.get("role") == "system" for m in body.get("messages") or []) else 1


def _is_sky(body: dict) -> bool:
    return "sky" in last_user_message(body).lower()


def script_server(server: ChatServer, pauses: dict[int, threading.Event]) -> None:
    for model in ("alpha", "beta", "gamma"):
        server.script(
            model=model, match=_is_sky,
            reply=lambda body, m=model: Reply(text=SKY[(m, _layer(body))], chunk_delay=0.03, usage=None),
        )
    server.script(model="omega", match=_is_sky, reply=Reply(
        chunks=FINAL_CHUNKS, chunk_delay=FINAL_CHUNK_DELAY, usage=None, pause_before=pauses))
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
    live: !!cell.querySelector('.moa-tree'),
    cards: cell.querySelectorAll('.moa-tree .moa-card').length,
  };
}
"""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _pwned(page):
    return page.evaluate("() => typeof window.__moa_pwned === 'undefined' ? null : window.__moa_pwned")


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



def rgb(css: str) -> tuple[float, ...]:
    return tuple(float(v) for v in re.findall(r"[\d.]+", css)[:3])


def luminance(css: str) -> float:
    r, g, b = rgb(css)
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def style_of(locator, prop: str) -> str:
    return locator.evaluate(f"e => getComputedStyle(e).getPropertyValue({prop!r})")


def check_finished_view(page, out, where: str) -> None:
    """One output holding the finished view: answer first and labelled, no widget, no error."""
    text = _norm(out.text_content())
    assert "Error displaying widget" not in text and "VBox(" not in text, f"{where}: {text[:300]}"
    assert out.locator(SEL["output"]).count() == 1, f"{where}: {out.locator(SEL['output']).count()} outputs"
    view = out.locator(".moa-view")
    assert view.count() == 1 and out.locator(".moa-tree").count() == 0, where
    labels = view.locator(".moa-answer-label")
    assert labels.count() == 1 and labels.text_content() == "Answer", where
    assert _norm(view.locator(".moa-final").text_content()) == FINAL_SHOWN, where
    assert view.locator(".moa-final strong").count() == 1, where  # rendered Markdown
    # the answer is in the eye: before the layers, at the notebook's body size or larger
    answer_box = view.locator(".moa-answer").bounding_box()
    assert answer_box["y"] < view.locator("details.moa-layer").first.bounding_box()["y"], where
    body_px = float(style_of(view.locator(".moa-answer-body p").first, "font-size").rstrip("px"))
    content_px = float(page.evaluate(
        "() => getComputedStyle(document.body).getPropertyValue('--jp-content-font-size1')"
    ).strip().rstrip("px") or 14)
    assert body_px >= content_px, (where, body_px, content_px)
    head_px = float(style_of(view.locator(".moa-head"), "font-size").rstrip("px"))
    assert head_px >= 12.5 and "monospace" not in style_of(view.locator(".moa-head"), "font-family")
    header = _norm(view.locator(".moa-head").text_content())
    assert f"preset {PRESET}" in header and SHAPE in header and "done" in header, header


def test_quickstart_in_jupyterlab(lab_root, artifacts_dir, chat_server, chromium, page, record_property,
                                  readme_images, tmp_path):
    cells = moa_cells(QUICKSTART)
    shutil.copy(QUICKSTART, lab_root / NB)
    t0 = time.monotonic()
    server = chat_server
    pauses = {n: threading.Event() for n in FINAL_PAUSES}
    script_server(server, pauses)
    config = lab_root / "moa.toml"
    config.write_text(TOML.format(url=server.url), "utf-8")
    with running_lab(lab_root, env={"MOA_MAGIC_CONFIG": str(config)}) as lab:
        open_notebook(page, lab, NB)
        t_open = time.monotonic() - t0

        # ---- Run All, polling the sky cell's live view while its prompt shows [*] ----------
        run_all_cells(page)
        partials: list[str] = []
        live_cards = 0

        def watch(until, failure: str) -> dict:
            """Poll the sky cell until `until(state)`, noting live cards and partial answers."""
            nonlocal live_cards
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                st = page.evaluate(_JS_CELL, cells["sky"])
                if st and "[*]" in st["prompt"]:
                    live_cards = max(live_cards, st["cards"] if st["live"] else 0)
                    fin = st["final"] or ""
                    if (fin and not fin.endswith("…") and len(fin) < len(FINAL_SHOWN)
                            and (not partials or partials[-1] != fin)):
                        partials.append(fin)
                if until(st):
                    return st
                page.wait_for_timeout(30)
            raise AssertionError(f"{failure}; the cell last showed {st}")

        for number, (words, release) in enumerate(pauses.items()):
            held = _norm("".join(FINAL_CHUNKS[:words]))
            st = watch(lambda st: st and st["final"] == held,
                       f"the live view never showed the answer's first {words} words (all it had)")
            assert "[*]" in st["prompt"] and st["live"], st
            if number == 1:  # what a user sees mid-stream
                cell_outputs(page, cells["sky"]).scroll_into_view_if_needed()
                screenshot(page, artifacts_dir / "00-live-streaming.png", full_page=False)
            release.set()
        watch(lambda st: st and "[*]" not in st["prompt"], "the sky cell did not finish")
        t_cell = time.monotonic() - t0 - t_open
        wait_idle(page, timeout=180)
        t_run = time.monotonic() - t0 - t_open
        assert not server.errors, server.errors
        assert live_cards == 6, "the live view did not show the 2 × 3 proposer cards"
        # streaming is visible: several growing partial answers, each a prefix of the whole
        assert len(partials) >= 3, f"final answer did not stream visibly: {partials}"
        assert all(FINAL_SHOWN.startswith(p.replace("**", "")[:30]) for p in partials), partials
        lengths = [len(p.replace("*", "")) for p in partials]  # an unclosed ** shows literally
        assert lengths == sorted(lengths), lengths

        # ---- the finished view, in the same output -----------------------------------------
        out = cell_outputs(page, cells["sky"])
        out.scroll_into_view_if_needed()
        check_finished_view(page, out, "finished")
        view = out.locator(".moa-view")
        screenshot(page, artifacts_dir / "01-finished-view.png", full_page=False)

        # the grid: a row of cards per layer, side by side at this width
        for number, models in enumerate(PROPOSERS, start=1):
            layer = view.locator(f'details.moa-layer[data-layer="{number}"]')
            assert layer.get_attribute("open") is not None  # finished layers stay visible
            cards = layer.locator(".moa-card")
            assert cards.count() == len(models)
            tops = set()
            for index, model in enumerate(models):
                card = cards.nth(index)
                assert card.get_attribute("data-model") == f"demo:{model}"
                assert "moa-status-done" in card.get_attribute("class")
                assert f"L{number}.{index + 1}" in _norm(card.locator(".moa-card-head").text_content())
                text = _norm(card.locator(".moa-card-text").text_content())
                assert text == SKY[(model, number)].replace("**", "").replace("*", ""), text
                tops.add(round(card.bounding_box()["y"]))
            assert len(tops) == 1, f"layer {number}'s cards are not side by side: {tops}"

        # what changed: layer 2's cards hold a word diff against their own layer-1 answer
        change = view.locator('.moa-card[data-layer="2"][data-index="0"] details.moa-change')
        assert "changes since L1.1" in change.locator("summary").text_content()
        change.locator("summary").click()
        added = change.locator("ins")
        added.first.wait_for(state="visible")
        assert "All three answers agree." in _norm(" ".join(added.all_text_contents()))
        # agreement between the proposers, and the answer's closeness to each
        matrix = view.locator('details.moa-layer[data-layer="2"] .moa-agreement table')
        assert matrix.locator("tr").count() == 4 and matrix.is_visible()
        assert view.locator(".moa-closeness .moa-bar").count() == 3
        view.locator('details.moa-layer[data-layer="2"]').scroll_into_view_if_needed()
        screenshot(page, artifacts_dir / "02-diff-and-agreement.png", full_page=False)

        # the timeline: every call, the answer's first token marked
        svg = view.locator("svg.moa-timeline-svg")
        svg.scroll_into_view_if_needed()
        assert svg.is_visible() and svg.locator(".moa-timeline-call").count() == 7
        assert "answer's first token at" in svg.text_content()
        assert svg.locator(".moa-ttft-mark").count() == 1
        screenshot(page, artifacts_dir / "03-timeline.png", full_page=False)

        # the prompt sent, folded
        prompt = view.locator("details.moa-prompt")
        assert prompt.get_attribute("open") is None
        prompt.locator("summary").click()
        assert "why is the sky blue?" in prompt.locator("pre").last.inner_text()

        # fold / unfold a layer with a click
        for number in (1, 2):
            layer = view.locator(f'details.moa-layer[data-layer="{number}"]')
            first_card = layer.locator(".moa-card").first
            layer.locator(":scope > summary").click()
            first_card.wait_for(state="hidden")
            view.scroll_into_view_if_needed()
            screenshot(page, artifacts_dir / f"04-layer-{number}-folded.png", full_page=False)
            layer.locator(":scope > summary").click()
            first_card.wait_for(state="visible")

        # a narrow window: the cards wrap
        page.set_viewport_size({"width": 620, "height": 1000})
        page.wait_for_timeout(400)
        layer1 = view.locator('details.moa-layer[data-layer="1"]')
        layer1.scroll_into_view_if_needed()
        tops = {round(layer1.locator(".moa-card").nth(i).bounding_box()["y"]) for i in range(3)}
        assert len(tops) > 1, "the cards did not wrap on a narrow window"
        screenshot(page, artifacts_dir / "05-narrow.png", full_page=False)
        page.set_viewport_size(VIEWPORT)

        # ---- the README's picture, on request only ------------------------------------------
        run_command(page, "application:toggle-left-area")
        page.set_viewport_size(SHOT_VIEWPORT)
        page.wait_for_timeout(500)
        view.scroll_into_view_if_needed()
        box = view.bounding_box()
        assert box and box["height"] < SHOT_VIEWPORT["height"] - 150, box
        view.screenshot(path=str(artifacts_dir / "tree.png"))
        if readme_images:
            DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(artifacts_dir / "tree.png", DOCS_SHOT)
        page.set_viewport_size(VIEWPORT)
        run_command(page, "application:toggle-left-area")

        # ---- hostile text in the local cell: shown as text, never run ----------------------
        local_out = cell_outputs(page, cells["local"])
        assert local_out.locator(".moa-view").count() == 1 and local_out.locator(".moa-tree").count() == 0
        assert _pwned(page) is None  # nothing ran while the live view streamed it either
        check_no_script_ran(page, local_out.locator('.moa-card[data-layer="1"][data-index="0"] .moa-card-text'),
                            "proposer card")
        check_no_script_ran(page, local_out.locator(".moa-final"), "final answer")
        screenshot(page, artifacts_dir / "06-hostile.png", full_page=False)

        # ---- save, restart the kernel, reopen from disk ------------------------------------
        save(page)
        saved = nbformat.read(lab_root / NB, as_version=4)
        for index in (cells["sky"], cells["local"]):
            [only] = saved.cells[index].outputs
            assert "application/vnd.jupyter.widget-view+json" not in only["data"]
            assert "moa-view" in only["data"]["text/html"]
        t1 = time.monotonic()
        restart_kernel_and_reopen(page, lab, NB)
        t_reopen = time.monotonic() - t1
        # the reopened kernel settles idle, nothing re-runs; not a single look, since JupyterLab's
        # own requests on connecting (kernel and comm info) make it busy for a moment
        wait_idle(page, timeout=60)

        out = cell_outputs(page, cells["sky"])
        out.scroll_into_view_if_needed()
        out.locator(".moa-view").wait_for(state="visible")
        page.wait_for_timeout(1500)  # let any widget error or trusted-output script show up
        check_finished_view(page, out, "reopened")
        assert "Error displaying widget" not in page.locator(SEL["notebook"]).text_content()
        view = out.locator(".moa-view")
        layer1 = view.locator('details.moa-layer[data-layer="1"]')
        layer1.locator(":scope > summary").click()
        layer1.locator(".moa-card").first.wait_for(state="hidden")
        layer1.locator(":scope > summary").click()
        layer1.locator(".moa-card").first.wait_for(state="visible")
        screenshot(page, artifacts_dir / "07-reopened.png", full_page=False)

        local_out = cell_outputs(page, cells["local"])
        local_out.locator(".moa-view").wait_for(state="attached")
        for details in local_out.locator("details").all():
            details.evaluate("e => e.open = true")
        check_no_script_ran(page, local_out.locator(".moa-view"), "reopened finished view")

        # ---- the dark theme ------------------------------------------------------------------
        out.scroll_into_view_if_needed()
        light_answer = style_of(view.locator(".moa-answer-body"), "color")
        run_command(page, "apputils:change-theme", {"theme": "JupyterLab Dark"})
        page.wait_for_function(
            "() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
        page.wait_for_timeout(800)
        out.scroll_into_view_if_needed()
        dark_answer = style_of(view.locator(".moa-answer-body"), "color")
        card_bg = style_of(view.locator(".moa-card").first, "background-color")
        assert luminance(light_answer) < 0.4 < luminance(dark_answer), (light_answer, dark_answer)
        assert luminance(card_bg) < 0.3, card_bg
        screenshot(page, artifacts_dir / "08-dark-theme.png", full_page=False)
        view.locator("svg.moa-timeline-svg").scroll_into_view_if_needed()
        screenshot(page, artifacts_dir / "08-dark-theme-timeline.png", full_page=False)
        run_command(page, "apputils:change-theme", {"theme": "JupyterLab Light"})

        assert not chromium.page_errors, chromium.page_errors
        assert not server.errors, server.errors

    # ---- nbconvert --to html of the saved notebook, opened with the network refused -------
    exported = tmp_path / "quickstart.html"
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output", str(exported),
                    str(lab_root / NB)], check=True, capture_output=True, timeout=120)
    page_html = exported.read_text("utf-8")
    assert "VBox(" not in page_html and "Error displaying widget" not in page_html
    assert "unpkg.com" not in page_html  # no widget state saved: nothing to load
    refused: list[str] = []

    def only_the_file(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_file)
    page.goto(exported.as_uri(), wait_until="load")
    views = page.locator(".moa-view")
    assert views.count() == 3
    sky = views.first
    sky.scroll_into_view_if_needed()
    assert sky.locator(".moa-answer-label").text_content() == "Answer"
    assert _norm(sky.locator(".moa-final").text_content()) == FINAL_SHOWN
    assert sky.locator(".moa-card").count() == 6 and sky.locator("svg .moa-timeline-call").count() == 7
    sky.locator('details.moa-layer[data-layer="1"] > summary').click()
    sky.locator('details.moa-layer[data-layer="1"] .moa-card').first.wait_for(state="hidden")
    sky.locator('details.moa-layer[data-layer="1"] > summary').click()
    screenshot(page, artifacts_dir / "09-nbconvert-html.png", full_page=False)
    assert _pwned(page) is None
    page.unroute("**/*")

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
    print(f"requests refused while viewing the nbconvert HTML: {len(refused)} {refused[:3]}")
    print(f"screenshots: {artifacts_dir}" + (f"; README image: {DOCS_SHOT}" if readme_images else ""))
