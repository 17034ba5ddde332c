"""The staircase shown (render/staircase.py): every rendition of a `--staircase` run says which part
of the answer each step wrote and how much of each proposer's text it had seen.

The expected figures come from the requests the loopback server received, not from the record:
a step's answer so far is its assistant prefix, and what it saw of a proposer is the longest
streamed prefix of that proposer's text found in the step's references.
"""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys

import pytest

import moa_magic
from chat_server import Reply
from helpers import (
    HOSTILE, answer_so_far, assert_inert_html, assert_inert_markdown, seen_figure, stair_server,
    staircase_requests,
)
from moa_magic.core.events import CallStep, TextDelta
from moa_magic.render.sanitize import render
from moa_magic.render.static import result_html, result_markdown, result_text, result_text_with_proposers
from moa_magic.render.terminal import TerminalRenderer, one_screen

# each proposer streams words of its own (zero-padded: no word is part of another) at its own pace
PROPOSER_WORDS = {name: [f" {name}{i:02d}" for i in range(10)] for name in "abc"}
PACE = {"a": 0.03, "b": 0.05, "c": 0.08}
ANSWER = ("Fractions are **parts of a whole**. Fold a paper strip into halves, then quarters. "
          "Put 3/4 and 2/3 on a number line and compare. Ask *why* a third of a big pizza is more.")


def piecewise(pieces: list[str]):
    """An aggregator that writes one of `pieces` per step (continuing its prefix), then stops."""
    ends = [len("".join(pieces[:k])) for k in range(1, len(pieces) + 1)]

    def reply(body: dict) -> Reply:
        done = len(answer_so_far(body))
        end = next(end for end in ends if end > done) if done < ends[-1] else done
        rest = "".join(pieces)[done:end]
        return Reply(chunks=[rest], finish_reason="stop" if end == ends[-1] else "length")

    return reply


@pytest.fixture
def stairs(write_moa_toml, chat_server):
    server = stair_server(write_moa_toml, chat_server, piecewise(re.findall(".{1,40}", ANSWER)))
    for name, words in PROPOSER_WORDS.items():
        server.script(model=name, reply=Reply(chunks=words, chunk_delay=PACE[name]))
    return server


def expected_steps(server) -> list[dict]:
    """Per aggregator request: its span of the answer and what it saw of each proposer."""
    return staircase_requests(server, PROPOSER_WORDS, ANSWER)


def answer_body(page: str) -> str:
    """The finished view's answer: what lies between its body's tag and the staircase section."""
    return re.search(r'class="moa-answer-body moa-final">(.*?)</div></div><details class="moa-staircase"',
                     page, re.S).group(1)


def unmarked(body: str) -> str:
    return re.sub(r'<sup class="moa-step-mark[^>]*>\d+</sup>', "", body)


def span(step: dict) -> str:
    return f"chars {step['start'] + 1}–{step['end']}" if step["end"] > step["start"] else "no text"


def test_every_finished_rendition_shows_each_step_and_what_it_saw(stairs):
    result = moa_magic.run("Teach fractions", preset="stair", staircase=True, staircase_chunk=12)
    assert result.ok and result.final == ANSWER
    steps = expected_steps(stairs)
    totals = {f"L1.{i}": len("".join(PROPOSER_WORDS[n])) for i, n in enumerate("abc", start=1)}
    assert len(steps) >= 4 and any(s["saw"]["L1.3"] < totals["L1.3"] for s in steps)
    assert all(s["saw"] == totals for s in steps[-1:])  # the last step read every proposer whole

    page = result_html(result)
    table = page[page.index('class="moa-staircase"'):]
    rows = re.findall(r'<tr class="moa-stair-row[^"]*" data-step="(\d+)">(.*?)</tr>', table)
    assert [int(n) for n, _ in rows] == [s["step"] for s in steps]
    for (_, row), step in zip(rows, steps):
        for label, chars in step["saw"].items():
            assert seen_figure(chars, totals[label]) in row, (step, row)
        assert span(step) in row
        assert f'<div class="moa-stair-chunk">{ANSWER[step["start"]:step["end"]]}</div>' in row
        if any(step["saw"][label] < totals[label] for label in totals):
            assert "proposers still streaming" in row  # a partial read: they had not all ended
    # the answer: a step number where each step that wrote began, in order, and otherwise the same
    body = answer_body(page)
    marks = re.findall(r'<sup class="moa-step-mark[^"]*" data-step="(\d+)"', body)
    assert [int(m) for m in marks] == [s["step"] for s in steps if s["end"] > s["start"]]
    assert unmarked(body) == render(ANSWER)
    assert f"staircase: {len(steps)} steps" in page

    markdown = result_markdown(result)
    assert "**Staircase**" in markdown
    for step in steps:
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {step['step']} |"))
        assert f"| {span(step)} |" in row
        for label, chars in step["saw"].items():
            assert seen_figure(chars, totals[label]).replace("(", "\\(").replace(")", "\\)") in row

    for text in (result_text(result), result_text_with_proposers(result)):
        assert "── Staircase: the answer was written in" in text
        for step in steps:
            line = next(line for line in text.splitlines() if line.startswith(f"step {step['step']} · "))
            assert line.startswith(f"step {step['step']} · {span(step)} · saw L1.1 ")
            for label, chars in step["saw"].items():
                assert f"{label} " in line and seen_figure(chars, totals[label]) in line
    with_proposers = result_text_with_proposers(result)
    assert with_proposers.index("── Answer") < with_proposers.index("── Staircase")


def test_hostile_text_in_the_staircase_stays_inert(write_moa_toml, chat_server):
    # steps that begin inside <script>, a link's URL and its title (an attribute), and right after
    # a closing code fence; the model's own private-use characters must not become step marks
    pieces = ["Hello <scr", HOSTILE[len("Hello <scr"):] + "\n\nSee [docs](https://exa",
              'mple.com/x "a ti', 'tle here") now.\n\n```\ncode\n```', "\nafter \ue001\ue002 the fence ",
              "<b onclick=alert(1)>bold</b>"]
    answer = "".join(pieces)
    stair_server(write_moa_toml, chat_server, piecewise(pieces))
    result = moa_magic.run("Q", preset="stair", staircase=True, staircase_chunk=8, max_tokens=2000)
    assert result.ok and result.final == answer
    page = result_html(result)
    assert_inert_html(page)
    assert "<b onclick" not in page
    assert not re.search("[\ue000-\uf8ff]", answer_body(page))  # the model's own: replaced
    for tag in re.findall(r"<[^>]*>", page):  # no step mark landed inside a tag (a link's title)
        assert "moa-step-mark" not in tag or tag.startswith("<sup ")
    body = answer_body(page)
    # marked: the steps that begin in text (also inside a tag's escaped text); not marked: the ones
    # in a URL, in a title and after a fence, where a mark would change the answer or enter a tag
    assert re.findall(r'<sup class="moa-step-mark[^"]*" data-step="(\d+)"', body) == ["1", "2", "6"]
    assert unmarked(body) == render(answer.replace("\ue001", "\ufffd").replace("\ue002", "\ufffd"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in unmarked(body)
    assert_inert_markdown(result_markdown(result))
    for text in (result_text(result), result_text_with_proposers(result)):
        assert "\x1b" not in text and "── Staircase:" in text


def test_the_live_views_name_the_step_being_written(stairs):
    from moa_magic.core import runner
    from moa_magic.render.widgets import TreeRenderer

    plan, _ = runner.prepare("Q", preset="stair", staircase=True, staircase_chunk=12)
    tree = TreeRenderer.for_plan(plan)
    heads = []
    tree.final.head.observe(lambda change: heads.append(change["new"]), names="value")
    progress = io.StringIO()
    result = moa_magic.run("Q", preset="stair", staircase=True, staircase_chunk=12,
                           listeners=[tree, TerminalRenderer(progress, io.StringIO())])
    assert result.ok, result.error
    steps = expected_steps(stairs)
    for step in steps[1:]:
        saw = " · ".join(f"{label} {chars}" for label, chars in step["saw"].items())
        assert f"⋯ aggregator staircase step {step['step']} · saw {saw} chars" in progress.getvalue()
    # the live head and the terminal say each step in the same words
    said = [line.split("⋯ aggregator ", 1)[1] for line in progress.getvalue().splitlines()
            if "⋯ aggregator staircase step" in line]
    assert len(said) == len(steps) - 1
    for line in said:
        assert any(f'<div class="moa-stair-live">{line}</div>' in h for h in heads), (line, heads)
    assert any(" chars · proposers still streaming</div>" in h for h in heads)
    assert "moa-stair-live" not in tree.final.head.value  # ended: the figures say how many steps
    assert f"staircase: {len(steps)} steps" in tree.final.head.value
    tree.dispose()


def test_a_replay_steps_like_the_run(stairs, tmp_path):
    result = moa_magic.run("Q", preset="stair", staircase=True, staircase_chunk=12)
    result.save(tmp_path / "run.json")
    events = []
    again = moa_magic.replay(tmp_path / "run.json", speed=4, listeners=[events.append])
    steps = [e for e in events if isinstance(e, CallStep)]
    assert [e.step["step"] for e in steps] == list(range(2, len(result.aggregator.steps) + 1))
    starts = expected_steps(stairs)
    for event in steps:  # each step came before the text it wrote
        written = "".join(e.text for e in events[:events.index(event)]
                          if isinstance(e, TextDelta) and e.record.role == "aggregator")
        assert written == ANSWER[:starts[event.step["step"] - 1]["start"]]
    assert result_html(again).split('class="moa-answer"', 1)[1].split("Layer 1")[0] == \
        result_html(result).split('class="moa-answer"', 1)[1].split("Layer 1")[0]
    done = subprocess.run([sys.executable, "-m", "moa_magic", "replay", str(tmp_path / "run.json"),
                           "--speed", "20"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "⋯ aggregator staircase step 2 · saw L1.1" in done.stderr
    assert done.stdout.strip() == ANSWER


def test_cli_show_proposers_prints_the_answer_whole_then_the_layer_then_the_staircase(stairs):
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "stair", "--staircase",
                           "--staircase-chunk", "12", "--show-proposers", "Q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.index("══ Answer ══") < out.index(ANSWER) < out.index("══ Layer 1 ══") < out.index(
        "── Staircase:")
    steps = expected_steps(stairs)
    assert f"step {len(steps)} · " in out and "proposers still streaming" in out
    assert "… aggregator fake:agg · staircase step 1 · saw L1.1 " in done.stderr


def test_progress_and_answer_on_one_screen_keep_their_own_lines(stairs):
    """Terminal IPython (one stream) or a shell (stdout and stderr on one terminal): a step's line
    never lands in the middle of the answer's line."""
    primary, secondary = pty.openpty()
    with open(secondary, "w", closefd=False) as one, open(secondary, "w", closefd=False) as other:
        assert one_screen(one, other)
    read, write = os.pipe()
    with open(write, "w") as piped, open(secondary, "w", closefd=False) as terminal:
        assert not one_screen(piped, terminal)
    os.close(read), os.close(primary), os.close(secondary)
    screen = io.StringIO()
    moa_magic.run("Q", preset="stair", staircase=True, staircase_chunk=12,
                  listeners=[TerminalRenderer(screen, screen)])
    lines = screen.getvalue().splitlines()
    assert sum("⋯ aggregator staircase step" in line for line in lines) >= 3
    assert all(line.startswith("  ⋯ ") for line in lines if "⋯ aggregator" in line)
    answer = [line for line in lines if line and not line.startswith(("  ", "moa · ", "total: "))]
    assert "".join(answer) == ANSWER


def test_a_doctored_saved_staircase_renders_inert_or_is_refused(stairs, tmp_path):
    """A saved file is untrusted: a step naming no proposer of the run is not drawn, a count that
    is not one is a one-line refusal."""
    import json

    from moa_magic.errors import MoaUserError

    result = moa_magic.run("Q", preset="stair", staircase=True, staircase_chunk=12)
    result.save(tmp_path / "run.json")
    data = json.loads((tmp_path / "run.json").read_text("utf-8"))
    hostile = "<img src=x onerror=alert(1)>\x1b[31m"
    data["aggregator"]["staircase"][1]["saw"] = {hostile: 7, "L1.1": 0}
    (tmp_path / "run.json").write_text(json.dumps(data), "utf-8")
    saved = moa_magic.load(tmp_path / "run.json")
    page = result_html(saved)
    assert_inert_html(page)
    assert "onerror" not in page and 'title="step 2 (' in page and "saw L1.1 0/40 (0%) chars;" in page
    assert_inert_markdown(result_markdown(saved))
    assert "\x1b" not in result_text_with_proposers(saved)
    progress = io.StringIO()
    moa_magic.replay(saved, speed=50, listeners=[TerminalRenderer(progress, io.StringIO())])
    assert "⋯ aggregator staircase step 2 · saw <img src=x onerror=alert(1)> 7 · L1.1 0 chars" in (
        progress.getvalue())  # plain text on a terminal, its escape sequence gone

    data["aggregator"]["staircase"][1]["chars"] = "x"
    (tmp_path / "run.json").write_text(json.dumps(data), "utf-8")
    with pytest.raises(MoaUserError, match=r"character count is 'x', not a whole number"):
        moa_magic.load(tmp_path / "run.json")
