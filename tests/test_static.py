"""The static rendition (saved notebooks, GitHub, nbconvert), MoaResult's reprs and sanitize."""

from __future__ import annotations

import pytest

from moa_magic.core import runner
from moa_magic.core.result import CallRecord, MoaResult
from moa_magic.render.sanitize import render, url_allowed
from moa_magic.render.static import StaticRun, md_safe, result_html, result_markdown, result_text

from chat_server import Reply
from helpers import HOSTILE, assert_inert_html, assert_inert_markdown

def make_result(final: str = "The **answer**.", status: str = "done") -> MoaResult:
    def rec(layer, index, model, role, text, st="done", error=None):
        r = CallRecord(layer=layer, index=index, model=model, role=role, temperature=0.7,
                       max_tokens=100)
        r.status, r.text, r.error, r.latency_s, r.ttft_s = st, text, error, 0.5, 0.1
        r.prompt_tokens, r.completion_tokens, r.cost_usd = 10, 5, 0.0
        return r

    layers = [[rec(1, 0, "fake:a", "proposer", "answer A"),
               rec(1, 1, "fake:b", "proposer", "", "failed", "HTTP 500 <b>boom</b>")]]
    agg = rec(2, 0, "fake:agg", "aggregator", final, "done" if status == "done" else "skipped")
    return MoaResult(prompt="q", preset="fake", shape="2 layers: 2 proposers + aggregator",
                     template="T", system=None, layers=layers, aggregator=agg, status=status,
                     error=None if status == "done" else "layer 1 failed", elapsed_s=1.5)


# --- sanitize ----------------------------------------------------------------------------


def test_render_makes_hostile_markdown_inert():
    out = render(HOSTILE)
    assert_inert_html(out)
    assert "&lt;script&gt;" in out  # shown as text, not dropped silently
    assert '<a href="https://example.com/a?b=1" rel="noopener noreferrer nofollow">good link</a>' in out


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", " JAVASCRIPT:alert(1)", "java\tscript:alert(1)", "java\nscript:x",
    "vbscript:x", "data:text/html,x", "data:image/png;base64,AA", "file:///etc/passwd", "foo:bar",
])
def test_unsafe_urls_refused(url):
    assert not url_allowed(url)


@pytest.mark.parametrize("url", ["https://a.b", "http://a.b/c", "mailto:x@y.z", "#frag", "rel/path",
                                 "/abs/path?x=1:2", "?q=1"])
def test_safe_urls_allowed(url):
    assert url_allowed(url)


def test_markdown_features_render():
    out = render("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```py\nx = '<b>'\n```\n\n~~gone~~")
    assert "<h1>Title</h1>" in out and "<table>" in out and "<s>gone</s>" in out
    assert "x = '&lt;b&gt;'" in out


# --- static rendition ---------------------------------------------------------------------------


def test_static_bundle_has_three_forms():
    bundle = StaticRun(make_result())._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/markdown", "text/html"}
    html = bundle["text/html"]
    assert html.count('class="moa-card ') == 2 and html.count('class="moa-answer"') == 1
    assert "<strong>answer</strong>" in html
    assert "fake:a" in html and "answer A" in html
    assert "HTTP 500 &lt;b&gt;boom&lt;/b&gt;" in html  # error text escaped
    assert "**Answer**\n\nThe **answer**." in bundle["text/markdown"]
    assert "The **answer**." in bundle["text/plain"]
    assert "✗ L1.2 fake:b" in bundle["text/plain"]


def test_result_reprs_delegate_to_static():
    result = make_result()
    assert result._repr_html_() == result_html(result)
    assert result._repr_markdown_() == result_markdown(result)
    from IPython.lib.pretty import pretty

    assert pretty(result) == result_text(result)


def test_failed_result_rendition_shows_error():
    result = make_result(final="", status="failed")
    html = result_html(result)
    assert "failed: layer 1 failed" in html
    assert "failed: layer 1 failed" in result_text(result)
    assert "**failed:**" in result_markdown(result)


def test_hostile_final_answer_is_inert_in_every_form():
    result = make_result(final=HOSTILE)
    result.layers[0][0].text = HOSTILE
    result.layers[0][1].error = "<script>alert('err')</script>"
    bundle = StaticRun(result)._repr_mimebundle_()
    assert_inert_html(bundle["text/html"])
    assert_inert_markdown(bundle["text/markdown"])
    assert "\x1b" not in bundle["text/plain"]
    # what a Markdown front end would make of the Markdown form is inert too
    assert_inert_html(render(bundle["text/markdown"]))


def test_md_safe_keeps_good_links_and_breaks_bad_ones():
    assert md_safe("[a](https://x.y)") == "[a](https://x.y)"
    assert md_safe("[a](javascript:x)") == "[a]\\(javascript:x)"
    assert md_safe("[a](java\\script:x)").startswith("[a]\\(")  # a colon before any '/': refused
    assert md_safe("[a](javascript\\:x)").startswith("[a]\\(")
    assert md_safe("[r]: javascript:x") == "[r]\\: javascript:x"
    assert md_safe("[r]: https://x.y\n\n[a][r]") == "[r]: https://x.y\n\n[a][r]"
    assert md_safe("a < b & c") == "a &lt; b & c"


@pytest.mark.parametrize("definition", [
    "> [r]: javascript:alert(1)",  # a reference definition counts document-wide from any container
    "- [r]: javascript:alert(1)",
    "1. [r]: data:text/html,x",
    "> - [r]: javascript:alert(1)",
    "[r\nr]: javascript:alert(1)",  # a label may span lines
])
def test_a_reference_definition_inside_a_container_makes_no_unsafe_link(definition):
    """The Markdown form must stay inert in a renderer that keeps every URL (md_safe's promise)."""
    from markdown_it import MarkdownIt

    permissive = MarkdownIt("commonmark", {"html": True})
    permissive.validateLink = lambda url: True
    text = f"{definition}\n\nSee [click][r] or [again][r r]."
    assert 'href="javascript' in permissive.render(text) or 'href="data' in permissive.render(text)
    result = make_result(final=text)
    shown = permissive.render(result_markdown(result))
    assert "href=" not in shown, shown


def test_static_rendition_of_a_real_run(moa_config, chat_server):
    chat_server.script(model="b", reply=Reply(text="B's *answer*"))
    result = runner.run("What is 2+2?", preset="fake")
    html = result_html(result)
    assert "B&#x27;s" in html or "B's" in html
    assert "<em>answer</em>" in html
    assert html.count('class="moa-card ') == 3
    assert 'data-model="fake:agg"' not in html  # the aggregator is the answer, not a card
    assert "agg says: What is 2+2?" in html
