"""The live tree (ipywidgets) fed by real runs against the loopback server."""

from __future__ import annotations

import html
import re
import threading
import time

import ipywidgets as w
import pytest

from moa_magic.core import runner
from moa_magic.errors import RunFailed
from moa_magic.render.sanitize import render
from moa_magic.render.widgets import TreeRenderer

from chat_server import Reply
from helpers import FAKE_PRESET, FAKE_PROVIDER, HOSTILE, NO_RETRIES, assert_inert_html, dom_classes, wait_until

WIDE_TOML = "\n".join([FAKE_PROVIDER, NO_RETRIES, FAKE_PRESET]) + """
[presets.deep]
layers = [["fake:a", "fake:b"], ["fake:c", "fake:d"]]
aggregator = "fake:agg"

[presets.six]
layers = [["fake:p1", "fake:p2", "fake:p3", "fake:p4", "fake:p5", "fake:p6"]]
aggregator = "fake:agg"
max_tokens = 2000
"""


@pytest.fixture
def config(write_moa_toml):
    return write_moa_toml(WIDE_TOML)


def run_tree(prompt: str, preset: str, **kwargs):
    plan, _ = runner.prepare(prompt, preset=preset)
    tree = TreeRenderer.for_plan(plan, **kwargs)
    try:
        result = runner.run(prompt, preset=preset, listeners=[tree])
    except RunFailed as exc:
        result = exc.result
    return tree, result


def walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from walk(child)


def test_tree_structure_titles_and_texts(config, chat_server):
    tree, result = run_tree("Why is the sky blue?", "deep")
    assert result.ok
    root = tree.widget
    assert "moa-tree" in dom_classes(root)
    style, header, final, layer1, layer2 = root.children  # the answer right under the header
    assert style.value.startswith("<style>")
    assert "moa-header" in dom_classes(header)
    assert "preset deep" in header.value and ">done<" in header.value
    assert "3 layers: 2×2 proposers + aggregator" in header.value

    for number, section in ((1, layer1), (2, layer2)):
        assert isinstance(section, w.Accordion)
        assert {"moa-layer", f"moa-layer-{number}"} <= dom_classes(section)
        assert section.titles[0] == f"Layer {number} · 2 proposers · 2 done"
        # finished layers stay open, their proposers side by side in a wrapping row
        assert section.selected_index == 0
        grid = section.children[0]
        assert "moa-grid" in dom_classes(grid) and grid.layout.flex_flow == "row wrap"

    nodes = [n for n in walk(root) if "moa-node" in dom_classes(n)]
    assert len(nodes) == 4
    for node, (layer, index, model) in zip(nodes, [(1, 1, "a"), (1, 2, "b"), (2, 1, "c"), (2, 2, "d")]):
        assert isinstance(node, w.VBox) and "moa-card" in dom_classes(node)
        assert f"moa-node-{layer}-{index}" in dom_classes(node) and "moa-status-done" in dom_classes(node)
        head, text = node.children
        assert f"✓ L{layer}.{index} · fake:{model}</div>" in head.value
        assert '<div class="moa-figures">done · ' in head.value
        assert "ttft" in head.value and "tok" in head.value
        assert "moa-node-text" in dom_classes(text) and text.layout.overflow == "auto"
        assert text.value == render(result.layers[layer - 1][index - 1].text)
        assert f"{model} says: Why is the sky blue?" in html.unescape(text.value)

    assert "moa-final-section" in dom_classes(final)
    answer_head = final.children[0].value
    assert '<span class="moa-answer-label">Answer</span>' in answer_head
    assert "aggregator fake:agg · done" in answer_head
    assert "moa-final" in dom_classes(tree.final_widget)
    assert tree.final_widget.value == render(result.final)
    assert tree.ticker is not None and not tree.ticker.is_alive()  # ticker stopped


def test_failed_proposer_shows_its_error(config, chat_server):
    chat_server.script(model="b", reply=Reply(status=500))
    tree, result = run_tree("Q", "fake")
    assert result.ok
    node = tree.nodes[(1, 1)]
    assert "moa-status-failed" in dom_classes(node.section)
    assert "✗ L1.2 · fake:b</div>" in node.head.value and ">failed · " in node.head.value
    assert "moa-error" in node.text.value and "500" in node.text.value
    assert tree.layer_sections[0].titles[0] == "Layer 1 · 3 proposers · 2 done, 1 failed"


def test_run_without_final_answer_keeps_the_layer_open(config, chat_server):
    chat_server.script(reply=Reply(status=500))
    tree, result = run_tree("Q", "fake")
    assert result.status == "failed"
    assert tree.layer_sections[0].selected_index == 0
    assert ">failed<" in tree.header.value
    assert "moa-status-skipped" in dom_classes(tree.final.section)
    assert "fewer than min_ok" in tree.final_widget.value


def test_hostile_model_text_is_inert_in_the_widgets(config, chat_server):
    chat_server.script(reply=Reply(text=HOSTILE))
    tree, result = run_tree("Q", "fake")
    assert result.ok
    html_widgets = [x for x in walk(tree.widget) if isinstance(x, w.HTML)]
    assert html_widgets[0].value.startswith("<style>") and "<" not in html_widgets[0].value[7:-8]
    html_widgets = html_widgets[1:]  # our constant CSS; the rest carry model text
    assert len(html_widgets) == 1 + 2 + 3 * 2  # header, answer head + text, 3 cards' head + text
    for widget in html_widgets:
        assert_inert_html(widget.value)
    assert "&lt;script&gt;" in tree.final_widget.value
    for node in tree.nodes.values():
        assert "\x1b" not in node.head.value


def test_widget_updates_are_coalesced(config, chat_server):
    """6 proposers × 500 tokens with small chunk delays: bounded pushes, exact final texts."""
    chunks = [f"tok{i} " for i in range(500)]
    chat_server.script(match=lambda b: b["model"].startswith("p"),
                       reply=Reply(chunks=chunks, chunk_delay=0.002))
    plan, _ = runner.prepare("Count", preset="six")
    tree = TreeRenderer.for_plan(plan)
    counts = {key: 0 for key in tree.nodes}
    times = {key: [] for key in tree.nodes}
    values = {key: [] for key in tree.nodes}
    lock = threading.Lock()

    def counter(key):
        def on_change(change):
            with lock:
                counts[key] += 1
                times[key].append(time.perf_counter())
                values[key].append(change["new"])
        return on_change

    for key, node in tree.nodes.items():
        node.text.observe(counter(key), names="value")
    started = time.perf_counter()
    result = runner.run("Count", preset="six", listeners=[tree])
    duration = time.perf_counter() - started
    assert result.ok
    expected = "".join(chunks)
    for key, node in tree.nodes.items():
        record = result.layers[0][key[1]]
        assert record.text == expected
        assert node.text.value == render(expected)  # the final state is exact
    total = sum(counts.values())
    print(f"\nwidget text updates: {counts} total {total} for 6×500 deltas in {duration:.2f}s")
    assert total < 6 * 500 / 5
    for key, stamps in times.items():
        # at most one push per 50 ms window, plus the start and final pushes
        assert counts[key] <= duration / 0.05 + 3
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert sum(g < 0.045 for g in gaps) <= 2, gaps
        # while streaming: escaped plain text; at the end: rendered Markdown
        assert any('class="moa-streaming"' in v for v in values[key][:-1])
        assert values[key][-1] == render(expected)


def test_costly_pushes_slow_down():
    from moa_magic.render.widgets import _Node

    node = _Node(w, "t", ["moa-node"], "moa-card-head", ["moa-node-text"], card=True)
    node.last_push, node.cost = 10.0, 0.001
    assert node.due(10.0, 0.05)  # nothing shown yet: the first chunk goes out at once
    node.shown_text = True
    assert node.due(10.05, 0.05) and not node.due(10.04, 0.05)
    node.cost = 0.03  # a 30 ms Markdown render: wait 300 ms before the next one
    assert not node.due(10.2, 0.05) and node.due(10.3, 0.05)


def test_first_chunk_of_the_answer_is_pushed_at_once(config, chat_server):
    """With a 10 s coalescing interval only the first chunk and the final state can be pushed
    mid-run: the first chunk must show alone, before the second one arrives."""
    chat_server.script(model="agg", reply=Reply(chunks=["First ", "second ", "third."], chunk_delay=0.3))
    plan, _ = runner.prepare("Q", preset="fake")
    tree = TreeRenderer.for_plan(plan, interval=10.0)
    values = []
    tree.final_widget.observe(lambda change: values.append(change["new"]), names="value")
    result = runner.run("Q", preset="fake", listeners=[tree])
    assert result.ok
    streamed = [v for v in values if "First" in v]
    assert "second" not in streamed[0], values
    assert streamed[-1] == render("First second third.")


def test_header_ticks_while_running_and_stops(config, chat_server):
    # the answer holds its stream until the header has shown three elapsed times while nothing
    # streamed (without ticks it stalls into its chunk_timeout and the run fails)
    ticked = threading.Event()
    chat_server.script(model="agg", reply=Reply(text="slow answer", pause_before={0: ticked}))
    plan, _ = runner.prepare("Q", preset="fake")
    tree = TreeRenderer.for_plan(plan)
    values = []

    held: set[str] = set()  # elapsed times shown while the answer's request was held

    def on_header(change) -> None:
        values.append(change["new"])
        if ">running<" in change["new"] and chat_server.requests_for("agg"):
            held.add(re.search(r"(\d+\.\d\d)s", change["new"]).group(1))
            if len(held) >= 3:
                ticked.set()

    tree.header.observe(on_header, names="value")
    result = runner.run("Q", preset="fake", listeners=[tree])
    assert result.ok and len(held) >= 3
    assert ">done<" in values[-1]
    n = len(values)
    time.sleep(0.3)
    assert len(values) == n  # no ticks after the end


def test_a_paused_card_gets_its_counts_once_the_encodings_are_ready(config, chat_server, monkeypatch):
    """In a fresh process the encodings are built beside the first requests. A proposer whose
    stream pauses after its first chunk shows "in … / out …" until then (a 0 would be wrong), and
    its figures as soon as the meter has them, not only at its next chunk."""
    from moa_magic.accounting import tokens

    encodings_go, resume_b, resume_a = threading.Event(), threading.Event(), threading.Event()
    build = tokens.load_encoding

    def held_build(name, data_dir=None):
        encodings_go.wait(30)
        return build(name, data_dir)

    monkeypatch.setattr(tokens, "_encodings", {})  # as in a fresh process
    monkeypatch.setattr(tokens, "load_encoding", held_build)
    chat_server.script(model="a", reply=Reply(chunks=["Halves and ", "quarters."], pause_before={1: resume_a}))
    chat_server.script(model="b", reply=Reply(chunks=["Number ", "lines."], pause_before={1: resume_b}))
    plan, _ = runner.prepare("Q", preset="fake")
    tree = TreeRenderer.for_plan(plan)
    heads: list[str] = []
    tree.nodes[(1, 0)].head.observe(lambda change: heads.append(change["new"]), names="value")
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(result=runner.run("Q", preset="fake", listeners=[tree])))
    run.start()
    try:
        wait_until(lambda: "Halves" in tree.nodes[(1, 0)].text.value, "the first proposer's first chunk")
        assert "in … / out … tok" in heads[-1] and "out 0" not in heads[-1], heads[-1]
        encodings_go.set()
        wait_until(lambda: tokens.loaded_encodings(), "the encodings built")
        resume_b.set()  # an event after the encodings are ready: the meter settles every call
        wait_until(lambda: re.search(r"in ≈?[1-9]\d* / out ≈?[1-9]\d* tok", heads[-1]),
                   "the paused card's counts")
        assert not chat_server.requests_for("agg")  # the first proposer was still paused
    finally:
        for event in (encodings_go, resume_b, resume_a):
            event.set()
        run.join(30)
    assert outcome["result"].ok


def test_for_result_renders_a_finished_run(config, chat_server):
    result = runner.run("Q", preset="fake")
    tree = TreeRenderer.for_result(result)
    assert tree.final_widget.value == render(result.final)
    assert all("moa-status-done" in dom_classes(n.section) for n in tree.nodes.values())
    assert ">done<" in tree.header.value
