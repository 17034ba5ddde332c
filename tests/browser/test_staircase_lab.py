"""A `%%moa --staircase` cell in a real JupyterLab: the staircase as a user sees it, live and finished.

The aggregator's provider continues an assistant prefix (`prefill = "trailing"`, the stair preset of
tests/helpers.py). The server holds every stream at set points and the test lets each go only once
the page has shown what it should, so the live phase lasts as long as the test needs on a machine
of any speed, and what each step saw is fixed:

- step 1 starts when every proposer has streamed its first word (they are held there): it sees one
  word of each; it writes the answer's first part and runs out of its chunk ("length");
- step 2 follows at once: the proposers were let go to their fifth word and held again, so it sees
  five words of each; it writes the second part and stops by itself while they still stream;
- step 3 runs once every proposer has ended: it sees all of them and writes the last part.

Live: the answer card's orange "staircase step N · saw ..." line names each step with
the figures of the request the server got for it. Finished (the view that replaces the widget in
place): a numbered badge in the answer where each step began (orange: partial references), and the
Staircase table with one row per step, a bar and a figure per proposer matching those requests.
Screenshots of both phases (and the finished one in the dark theme) go to the artifacts directory.
"""

from __future__ import annotations

import re
import threading

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from chat_server import Reply, split_words
from helpers import STAIR_TOML, answer_so_far, seen_figure, staircase_requests
from lab import cell_outputs, open_notebook, run_all_cells, run_command, running_lab, screenshot, wait_idle

pytestmark = pytest.mark.browser

NB = "staircase.ipynb"
# each proposer's own words (no proposer's text starts like another's: staircase_requests finds
# what a step saw of each in its references)
PROPOSER_WORDS = {
    "a": split_words("Halves, quarters and eighths of one paper strip show that a fraction is "
                     "a share of one whole."),
    "b": split_words("Number lines help: mark 0 and 1, split the gap into equal steps, then "
                     "place 3/4 and 2/3."),
    "c": split_words("Pizza slices make it concrete, and children can argue which share is "
                     "bigger before they measure."),
}
FIRST_WORDS, HELD_AT = 1, 5  # the proposers stop after these many words until the test lets them go
PIECES = [
    "Fractions are **parts of a whole**: fold a paper strip into halves, then quarters. ",
    "Put 3/4 and 2/3 on a number line and ask which is bigger. ",
    "Then cut a pizza to check: a *share* only means something next to its whole.",
]
ANSWER = "".join(PIECES)
ANSWER_SHOWN = ANSWER.replace("**", "").replace("*", "")  # as the rendered Markdown reads


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def gated_aggregator(gates: list[threading.Event]):
    """Writes PIECES[n] in step n+1 (continuing its prefix), each step's stream held by gates[n]:
    the first step runs out of its chunk, the others stop by themselves."""
    ends = [len("".join(PIECES[:k])) for k in range(1, len(PIECES) + 1)]

    def reply(body: dict) -> Reply:
        step = ends.index(len(answer_so_far(body))) + 1 if answer_so_far(body) else 0
        return Reply(chunks=split_words(PIECES[step]), chunk_delay=0.01, pause_before={0: gates[step]},
                     finish_reason="length" if step == 0 else "stop")

    return reply


def luminance(css: str) -> float:
    """WCAG relative luminance of an `rgb(...)` colour."""
    def linear(v: float) -> float:
        v /= 255
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(v)) for v in re.findall(r"[\d.]+", css)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(locator, background) -> float:
    """WCAG contrast of `locator`'s text against `background`'s (a locator's background colour)."""
    fg = locator.evaluate("e => getComputedStyle(e).color")
    bg = background.evaluate("e => getComputedStyle(e).backgroundColor")
    light, dark = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def text_left(locator) -> float:
    """Where the first line of an element's content begins, in page pixels."""
    return locator.evaluate("e => { const r = document.createRange(); r.selectNodeContents(e);"
                            " return r.getClientRects()[0].left; }")


def check_legible(final) -> None:
    """Every badge's digit stands out from its badge (3:1, the bar for bold figures at a projector)."""
    for mark in final.locator("sup.moa-step-mark").all():
        assert contrast(mark, mark) >= 3, (mark.get_attribute("data-step"), contrast(mark, mark))


def saw_text(saw: dict[str, int]) -> str:
    return " · ".join(f"{label} {chars}" for label, chars in saw.items())


def words_chars(words: list[str], count: int) -> int:
    return len("".join(words[:count]))


# the texts of the elements matching a selector inside a cell, whitespace folded
_JS_TEXT = """([cell, selector]) => {
  const e = document.querySelectorAll('.jp-Notebook .jp-Cell')[cell].querySelectorAll(selector);
  return Array.from(e).map(x => x.textContent.replace(/\\s+/g, ' ').trim());
}"""


def colour_of(locator, variable: str) -> str:
    """The colour a theme variable resolves to inside `locator`'s element (a probe, then removed)."""
    return locator.evaluate(
        """(e, v) => { const p = document.createElement('span'); p.style.color = `var(${v})`;
                       e.appendChild(p); const c = getComputedStyle(p).color; p.remove(); return c; }""",
        variable)


def test_the_staircase_live_and_finished_in_jupyterlab(lab_root, artifacts_dir, chat_server, chromium, page,
                                                        write_moa_toml):
    held = {FIRST_WORDS: threading.Event(), HELD_AT: threading.Event()}  # after N words, until set
    gates = [threading.Event() for _ in PIECES]
    write_moa_toml(STAIR_TOML)  # MOA_MAGIC_CONFIG: the lab and its kernel inherit it
    for name, words in PROPOSER_WORDS.items():
        chat_server.script(model=name, reply=Reply(
            chunks=words, chunk_delay=0.01,
            pause_before=held))
    chat_server.script(model="agg", reply=gated_aggregator(gates))
    nb = new_notebook(cells=[
        new_code_cell("%load_ext moa_magic"),
        new_code_cell("%%moa --preset stair --staircase --staircase-chunk 16\n"
                      "How would you teach fractions to ten-year-olds?"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, lab_root / NB)
    labels = {name: f"L1.{index}" for index, name in enumerate(PROPOSER_WORDS, start=1)}

    with running_lab(lab_root) as lab:
        open_notebook(page, lab, NB)
        run_all_cells(page)
        out = cell_outputs(page, 1)
        live = out.locator(".moa-tree .moa-stair-live")

        def texts(selector: str) -> list[str]:
            return page.evaluate(_JS_TEXT, [1, selector])

        def until(condition, what: str) -> None:
            """Poll the page (the widgets re-render their HTML: no element handle lasts)."""
            for _ in range(1200):
                if condition():
                    return
                page.wait_for_timeout(50)
            raise AssertionError(f"the page never showed {what}: {texts('.moa-tree')}")

        def step_shown(number: int, state: str) -> dict[str, int]:
            """The live line names step `number` with the figures its request carried."""
            chat_server.wait_for_requests(number + len(PROPOSER_WORDS), timeout=60)
            saw = staircase_requests(chat_server, PROPOSER_WORDS, ANSWER)[number - 1]["saw"]
            want = f"staircase step {number} · saw {saw_text(saw)} chars"
            until(lambda: any(t.startswith(want) for t in texts(".moa-tree .moa-stair-live")), want)
            assert state in live.text_content(), live.text_content()
            return saw

        def cards_show(count: int) -> None:
            """Every live proposer card shows its first `count` words (all the server let go)."""
            wants = [_norm("".join(words[:count])) for words in PROPOSER_WORDS.values()]
            until(lambda: all(want in text for want, text in zip(wants, texts(".moa-tree .moa-card"))),
                  f"the proposers' first {count} words")

        def answer_shows(text: str) -> None:
            want = _norm(text.replace("**", ""))
            until(lambda: texts(".moa-tree .moa-final") == [want], f"the answer {want!r}")

        # ---- step 1: one word of each proposer ------------------------------------------------
        live.wait_for(state="visible", timeout=120_000)  # the kernel started and the run began
        saw1 = step_shown(1, "proposers still streaming")
        assert saw1 == {labels[n]: words_chars(w, FIRST_WORDS) for n, w in PROPOSER_WORDS.items()}
        assert colour_of(live, "--jp-warn-color0") == live.evaluate("e => getComputedStyle(e).color")
        assert contrast(live, out.locator(".moa-tree .moa-answer")) >= 3
        held[FIRST_WORDS].set()
        cards_show(HELD_AT)
        gates[0].set()

        # ---- step 2: five words of each, the first part of the answer written ------------------
        saw2 = step_shown(2, "proposers still streaming")
        assert saw2 == {labels[n]: words_chars(w, HELD_AT) for n, w in PROPOSER_WORDS.items()}
        answer_shows(PIECES[0])
        assert out.locator(".moa-tree").count() == 1 and out.locator(".moa-view").count() == 0
        out.scroll_into_view_if_needed()
        screenshot(page, artifacts_dir / "20-staircase-live.png", full_page=False)
        gates[1].set()

        # ---- step 3: after every proposer ended -----------------------------------------------
        answer_shows("".join(PIECES[:2]))  # step 2 stopped: the run waits for the proposers
        held[HELD_AT].set()
        saw3 = step_shown(3, "proposers all ended")
        assert saw3 == {labels[n]: len("".join(w)) for n, w in PROPOSER_WORDS.items()}
        gates[2].set()
        wait_idle(page, timeout=120)

        # ---- finished: the view replaced the widget in place -----------------------------------
        steps = staircase_requests(chat_server, PROPOSER_WORDS, ANSWER)
        assert [s["saw"] for s in steps] == [saw1, saw2, saw3]
        assert [ANSWER[s["start"]:s["end"]] for s in steps] == PIECES
        totals = saw3
        assert out.locator(".jp-OutputArea-output").count() == 1 and out.locator(".moa-tree").count() == 0
        view = out.locator(".moa-view")
        assert view.get_attribute("data-status") == "done"
        final = view.locator(".moa-answer .moa-final")
        assert _norm(final.evaluate(
            "e => { const c = e.cloneNode(true); c.querySelectorAll('.moa-step-mark').forEach(m => m.remove());"
            " return c.textContent; }")) == _norm(ANSWER_SHOWN)
        assert final.locator("strong").count() == 1 and final.locator("em").count() == 1  # rendered

        # a badge where each step began, orange for a step that saw partial references
        marks = final.locator("sup.moa-step-mark")
        assert [m.get_attribute("data-step") for m in marks.all()] == ["1", "2", "3"]
        partial = [bool(s["saw"] != totals) for s in steps]
        assert partial == [True, True, False]
        warn, brand = colour_of(final, "--jp-warn-color0"), colour_of(final, "--jp-brand-color1")
        for mark, is_partial in zip(marks.all(), partial):
            assert ("moa-stair-partial" in mark.get_attribute("class")) == is_partial
            assert mark.evaluate("e => getComputedStyle(e).backgroundColor") == (warn if is_partial else brand)
            assert mark.is_visible()
        check_legible(final)
        for mark, step in zip(marks.all(), steps):  # each badge sits just before its step's text
            following = _norm(mark.evaluate("e => e.nextSibling ? e.nextSibling.textContent : ''"))
            wrote = _norm(ANSWER[step["start"]:step["end"]].replace("*", ""))
            assert following and wrote.startswith(following), (following, wrote)

        # the Staircase table: a row per step, a bar and a figure per proposer
        section = view.locator("details.moa-staircase")
        assert section.get_attribute("open") is not None and section.is_visible()
        assert "the answer was written in 3 steps; 2 of them wrote before seeing all" in _norm(
            section.locator("summary").text_content())
        head = [_norm(t) for t in section.locator("thead th").all_text_contents()]
        assert head == ["step", *(f"saw of {label}" for label in totals), "what it wrote"]
        rows = section.locator("tbody tr.moa-stair-row")
        assert rows.count() == len(steps)
        for row, step in zip(rows.all(), steps):
            assert row.get_attribute("data-step") == str(step["step"])
            cells = row.locator(":scope > td")
            for column, (label, chars) in enumerate(step["saw"].items(), start=1):
                cell = cells.nth(column)
                assert _norm(cell.text_content()) == seen_figure(chars, totals[label]), (step, label)
                track = cell.locator(".moa-stair-track").bounding_box()
                fill = cell.locator(".moa-stair-fill").bounding_box()
                assert track["width"] >= 40 and track["height"] >= 6, track
                assert abs(fill["width"] - track["width"] * chars / totals[label]) <= 1.5, (fill, track, chars)
            wrote = cells.nth(len(totals) + 1)
            assert _norm(wrote.locator(".moa-stair-chunk").text_content()) == _norm(
                ANSWER[step["start"]:step["end"]])
            assert f"chars {step['start'] + 1}–{step['end']}" in wrote.text_content()

        # left-aligned under its headings (JupyterLab right-aligns output tables), at the view's
        # left edge (not centred); nothing overlaps: columns side by side, rows stacked, inside the view
        view_box, table = view.bounding_box(), section.locator("table.moa-stair-table")
        assert abs(table.bounding_box()["x"] - section.bounding_box()["x"]) <= 2
        headings = [text_left(th) for th in section.locator("thead th").all()]
        for row in rows.all():
            lefts = [text_left(td) for td in row.locator(":scope > td").all()]
            assert all(abs(h - x) <= 2 for h, x in zip(headings, lefts)), (headings, lefts)
        for row in rows.all():
            boxes = [c.bounding_box() for c in row.locator(":scope > td").all()]
            assert all(a["x"] + a["width"] <= b["x"] + 0.5 for a, b in zip(boxes, boxes[1:])), boxes
            assert boxes[-1]["x"] + boxes[-1]["width"] <= view_box["x"] + view_box["width"] + 0.5
        tops = [r.bounding_box() for r in rows.all()]
        assert all(a["y"] + a["height"] <= b["y"] + 0.5 for a, b in zip(tops, tops[1:])), tops

        def shoot(name: str) -> None:
            section.scroll_into_view_if_needed()
            first, last = view.locator(".moa-answer").bounding_box(), section.bounding_box()
            top = first["y"] - 8
            page.screenshot(path=str(artifacts_dir / name), clip={
                "x": first["x"] - 8, "y": top, "width": view_box["width"] + 16,
                "height": last["y"] + last["height"] - top + 8})

        shoot("21-staircase-finished.png")
        run_command(page, "apputils:change-theme", {"theme": "JupyterLab Dark"})
        page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
        page.wait_for_timeout(800)  # the theme's stylesheet settles
        for part in (final, section.locator("tbody")):  # light text on the dark theme
            assert luminance(part.evaluate("e => getComputedStyle(e).color")) > 0.5, part
        check_legible(final)
        shoot("22-staircase-finished-dark.png")
        run_command(page, "apputils:change-theme", {"theme": "JupyterLab Light"})
        assert not chromium.page_errors, chromium.page_errors
    assert not chat_server.errors, chat_server.errors
