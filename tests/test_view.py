"""The finished view (render/view.py) and what it is built from: compare, mixture, timeline."""

from __future__ import annotations

import re

import pytest

from moa_magic.core import runner
from moa_magic.render.compare import Change, agreement, mean_agreement, similarity, word_diff
from moa_magic.render.mixture import diff_html
from moa_magic.render.timeline import spans, timeline_svg
from moa_magic.render.view import finished_html

from chat_server import Reply
from helpers import FAKE_PRESET, FAKE_PROVIDER, HOSTILE, NO_RETRIES, assert_inert_html

TOML = "\n".join([FAKE_PROVIDER, NO_RETRIES, FAKE_PRESET]) + """
[presets.deep]
layers = [["fake:a", "fake:b"], ["fake:a", "fake:b"]]
aggregator = "fake:agg"
system = "Be brief."
"""


@pytest.fixture
def config(write_moa_toml):
    return write_moa_toml(TOML)


# --- compare ------------------------------------------------------------------------------------


def test_similarity_is_word_overlap_ignoring_case_and_edge_punctuation():
    assert similarity("The sky is blue.", "the sky is Blue") == 1.0
    assert similarity("", "") == 1.0 and similarity("a", "") == 0.0
    assert similarity("red green blue", "cyan magenta yellow") == 0.0
    # 2 × 3 shared words / 8 words
    assert similarity("the sky is blue", "the sea is blue") == pytest.approx(0.75)


def test_similarity_counts_frequent_words_in_long_texts():
    """autojunk off: in texts over 200 words, 'the' still matches (it would be junk otherwise)."""
    long_a = " ".join(["the cat"] * 150)
    long_b = " ".join(["the dog"] * 150)
    assert similarity(long_a, long_b) == pytest.approx(0.5)


def test_word_diff_shows_removed_then_added_words_in_order():
    assert word_diff("the sky is blue", "the sky is very blue!") == [
        Change("same", "the sky is"), Change("added", "very"), Change("same", "blue!"),
    ]
    assert word_diff("a b c", "a x c") == [
        Change("same", "a"), Change("removed", "b"), Change("added", "x"), Change("same", "c"),
    ]


def test_diff_html_escapes_every_word():
    out = diff_html("safe <b>old</b>", 'safe <img src=x onerror="alert(1)">')
    assert "<del>&lt;b&gt;old&lt;/b&gt;</del>" in out and "<ins>&lt;img" in out
    assert_inert_html(out)


def test_agreement_matrix_is_symmetric_with_ones_on_the_diagonal():
    m = agreement(["a b c d", "a b c x", "p q r s"])
    assert [m[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert m[0][1] == m[1][0] == pytest.approx(0.75) and m[0][2] == 0.0
    assert mean_agreement(m) == pytest.approx(0.25)
    assert mean_agreement(agreement(["one"])) is None


# --- the finished view of a real run ------------------------------------------------------------


def scripted_run(chat_server):
    def reply(text_1, text_2):
        def pick(body):
            later = any(m["role"] == "system" and "responses from various" in m["content"]
                        for m in body["messages"])
            return Reply(text=text_2 if later else text_1, chunk_delay=0.01)
        return pick

    chat_server.script(model="a", reply=reply("Rayleigh scattering makes the sky blue.",
                                              "Rayleigh scattering of sunlight makes the sky blue."))
    chat_server.script(model="b", reply=reply("Blue light scatters most in air.",
                                              "Blue light scatters most in air, so the sky is blue."))
    chat_server.script(model="agg", reply=Reply(text="Rayleigh scattering of sunlight: the sky is blue.",
                                                delay=0.1))
    return runner.run("Why is {the} sky blue?", preset="deep")


def test_finished_view_holds_answer_first_grid_diffs_agreement_timeline_prompt(config, chat_server):
    result = scripted_run(chat_server)
    assert result.ok
    html = finished_html(result)
    assert_inert_html(html.replace(html[html.index("<style>"):html.index("</style>") + 8], ""))
    # the answer comes first, labelled
    answer = html.index('<span class="moa-answer-label">Answer</span>')
    assert answer < html.index('class="moa-layer"') and html.count('class="moa-answer-label"') == 1
    assert "Rayleigh scattering of sunlight: the sky is blue." in html
    # the grid: two layers of two cards, open
    assert html.count('<details class="moa-layer"') == 2 and html.count(" open><summary>") >= 2
    assert html.count('class="moa-card ') == 4
    # layer 2's cards say what changed since the same proposer's layer-1 answer
    assert html.count('<details class="moa-change">') == 2
    assert "changes since L1.1" in html and "<ins>of sunlight</ins>" in html
    assert "changes since L1.2" in html and "<ins>so the sky is blue.</ins>" in html
    # agreement per layer, closeness of the answer to the proposers it read
    assert html.count('class="moa-agreement"') == 2
    assert re.search(r"Layer 1 · 2 proposers · 2 done · agreement \d+%", html)
    assert html.count('class="moa-bar"') == 2
    # the timeline: one bar per call, the answer's first token marked; no script
    assert html.count('class="moa-timeline-call"') == 5 and 'class="moa-ttft-mark"' in html
    assert "<script" not in html
    # the prompt as sent, and the system prompt
    assert "<pre>Why is {the} sky blue?</pre>" in html and "<pre>Be brief.</pre>" in html


def test_timeline_spans_follow_the_layers(config, chat_server):
    result = scripted_run(chat_server)
    first, second, final = spans(result)
    assert len(first) == len(second) == 2 and len(final) == 1
    layer_1_end = max(s.end for s in first)
    for span in second:  # queued when layer 1 ended, sent after, streamed after its first token
        assert layer_1_end <= span.queued <= span.start <= span.first <= span.end
    agg = final[0]
    assert agg.first - agg.start >= 0.1  # the scripted delay before the answer's first token
    assert f"answer's first token at {agg.first:.2f}s" in timeline_svg(result)


def test_timeline_of_a_run_without_recorded_times_is_estimated(config, chat_server):
    result = scripted_run(chat_server)
    result.timeline = None  # e.g. a run loaded from --json output
    assert timeline_svg(result).count('class="moa-timeline-call"') == 5


def test_hostile_texts_are_inert_in_the_finished_view(config, chat_server):
    chat_server.script(reply=Reply(text=HOSTILE))
    result = runner.run("Q", preset="deep")
    html = finished_html(result)
    assert_inert_html(html.replace(html[html.index("<style>"):html.index("</style>") + 8], ""))


def test_a_layer_cut_by_quorum_shows_the_cut_card_and_its_bar(config, chat_server):
    chat_server.script(model="b", reply=Reply(text="late", delay=5))
    result = runner.run("Q", preset="deep", quorum=1)
    assert result.ok
    html = finished_html(result)
    cut = re.search(r'<div class="moa-card moa-status-cancelled" data-layer="1" data-index="1".*?cut by quorum', html, re.S)
    assert cut, html
    first, *_ = spans(result)
    assert [s.record.label for s in first] == ["L1.1", "L1.2"]  # the cut call was sent: it has a bar


def test_a_staircase_run_draws_its_early_aggregator(write_moa_toml, chat_server):
    from helpers import FAKE_PROVIDER, NO_RETRIES

    write_moa_toml("\n".join([FAKE_PROVIDER + 'prefill = "trailing"\n', NO_RETRIES, """
[presets.stair]
layers = [["fake:a", "fake:b"]]
aggregator = "fake:agg"
max_tokens = 64
"""]))
    chat_server.default_reply = Reply(chunks=[f" w{i}" for i in range(8)], chunk_delay=0.05)
    chat_server.script(model="agg", reply=Reply(text=" end."))
    result = runner.run("Explain", preset="stair", staircase=True, staircase_chunk=4)
    assert result.ok, result.error
    proposers, (agg,) = spans(result)
    assert agg.start < max(s.end for s in proposers)  # it began while the proposers streamed
    assert agg.queued <= agg.start and "answer's first token at" in timeline_svg(result)
