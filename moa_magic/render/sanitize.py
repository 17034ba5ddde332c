"""Untrusted model text → inert HTML.

Model answers are Markdown written by someone else (a model that may have read a hostile page), and
JupyterLab does not sanitize HTML outputs made in the running session. So:

- raw HTML in the text is never passed through (`html=False`): `<script>` shows as text;
- link and image URLs must be relative, `#fragment`, or use http, https, mailto or ftp; anything
  else (`javascript:`, `vbscript:`, `data:` — images too —, `file:`, ...) is dropped and the
  Markdown source stays as plain text;
- links get `rel="noopener noreferrer nofollow"`;
- images never load: an image would make the browser fetch its URL the moment the answer shows,
  which is how a prompt-injected model sends notebook data (interpolated `{{variables}}`) to a
  server of its choice. Every image token — inline, reference-style, inside a link or a table,
  with any URL, relative and same-origin ones too — becomes a link `[image: alt — URL]` (inside a
  link: the same text without a link of its own), which loads nothing until clicked.

`render(text)` is the only entry point for HTML; everything that goes into a widget's HTML or an
HTML output is either passed through it or escaped with `html.escape`. `no_images_markdown(text)`
does the same for Markdown source handed to other renderers (the `text/markdown` output).
"""

from __future__ import annotations

import html
import re
from functools import lru_cache

ALLOWED_SCHEMES = frozenset({"http", "https", "mailto", "ftp"})
_SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*):")
# Browsers ignore ASCII whitespace and control characters inside a scheme ("java\tscript:").
_IGNORED = re.compile(r"[\x00-\x20\x7f-\x9f]+")


def url_allowed(url: str) -> bool:
    """True for relative URLs, fragments, and http/https/mailto/ftp URLs."""
    squeezed = _IGNORED.sub("", url).lower()
    match = _SCHEME.match(squeezed)
    if match is None:
        # No scheme: relative, fragment or query. A colon before any '/', '?' or '#' would be read
        # as a scheme by some parsers; refuse those too.
        head = re.split(r"[/?#]", squeezed, maxsplit=1)[0]
        return ":" not in head
    return match.group(1) in ALLOWED_SCHEMES


@lru_cache(maxsize=1)
def _parser():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.validateLink = url_allowed  # instance attribute: markdown-it calls self.validateLink(url)

    def link_open(renderer, tokens, idx, options, env):
        tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return renderer.renderToken(tokens, idx, options, env)

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        url = token.attrGet("src") or ""
        alt = renderer.renderInlineAsText(token.children or [], options, env)
        label = html.escape(f"[image: {alt} — {url}]" if alt else f"[image: {url}]")
        inside_link = sum(t.nesting for t in tokens[:idx] if t.type in ("link_open", "link_close"))
        if inside_link > 0:  # a link cannot hold another link
            return f'<span class="moa-image">{label}</span>'
        return (
            f'<a class="moa-image" href="{html.escape(url)}" rel="noopener noreferrer nofollow">'
            f"{label}</a>"
        )

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("image", image)
    return md


def render(text: str) -> str:
    """Markdown → HTML with raw HTML escaped and unsafe URLs dropped."""
    if not text:
        return ""
    return _parser().render(text)


# `!` right before `[` opens an image in every Markdown dialect; as the entity `&#33;` it is text.
_IMAGE_BANG = re.compile(r"!(?=\[)")


def no_images_markdown(text: str) -> str:
    """Markdown source in which no image can form (reference-style ones included): the `!` of
    `![` is written as `&#33;`, so what would be an image renders as a link. Inside code spans
    and blocks the entity shows as written — the price of being safe in any renderer."""
    return _IMAGE_BANG.sub("&#33;", text)
