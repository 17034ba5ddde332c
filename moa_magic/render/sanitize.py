"""Untrusted model text → inert HTML.

Model answers are Markdown written by someone else (a model that may have read a hostile page), and
JupyterLab does not sanitize HTML outputs made in the running session. So:

- raw HTML in the text is never passed through (`html=False`): `<script>` shows as text;
- link and image URLs must be relative, `#fragment`, or use http, https, mailto or ftp; anything
  else (`javascript:`, `vbscript:`, `data:` — images too —, `file:`, ...) is dropped and the
  Markdown source stays as plain text;
- links get `rel="noopener noreferrer nofollow"`.

`render(text)` is the only entry point; everything that goes into a widget's HTML or an HTML
output is either passed through it or escaped with `html.escape`.
"""

from __future__ import annotations

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

    md.add_render_rule("link_open", link_open)
    return md


def render(text: str) -> str:
    """Markdown → HTML with raw HTML escaped and unsafe URLs dropped."""
    if not text:
        return ""
    return _parser().render(text)
