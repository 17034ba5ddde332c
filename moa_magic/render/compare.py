"""What changed between answers, and how much they agree: word diffs and word-level similarity.

Pure functions of texts (no HTML, no records), for the finished view (`render/mixture.py`) and
anyone who wants the numbers.

Both use the standard library's `difflib.SequenceMatcher` on words: the similarity of two answers
is its `ratio()` (2 × matched words / all words, 0..1), the diff is its opcodes. One measure for
both, so a similarity of 0.9 is exactly "90 % of the words sit in the unchanged runs the diff
shows". It is order-aware lexical overlap — it says whether proposers *wrote* alike, not whether
they *meant* the same (that would need an embedding model, which this offline package does not
carry). Words are compared case-insensitively and without surrounding punctuation, so "Blue," and
"blue" match; the diff shows the original words. `autojunk` is off: with it, frequent words such
as "the" in answers over 200 words would be ignored and the ratio would drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from itertools import combinations

_WORD = re.compile(r"\S+")
_EDGE_PUNCTUATION = re.compile(r"^\W+|\W+$")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _keys(tokens: list[str]) -> list[str]:
    return [_EDGE_PUNCTUATION.sub("", t.casefold()) or t for t in tokens]


def _matcher(a: list[str], b: list[str]) -> SequenceMatcher:
    return SequenceMatcher(None, _keys(a), _keys(b), autojunk=False)


def similarity(a: str, b: str) -> float:
    """0 (no word in common) .. 1 (the same words in the same order); two empty texts are 1."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return _matcher(wa, wb).ratio()


@dataclass(frozen=True)
class Change:
    """One run of a word diff: `kind` is "same", "added" or "removed"; `text` the original words."""

    kind: str
    text: str


def word_diff(old: str, new: str) -> list[Change]:
    """How `new` differs from `old`, word by word; a replaced run is its removal, then its addition."""
    a, b = words(old), words(new)
    changes: list[Change] = []
    for tag, i1, i2, j1, j2 in _matcher(a, b).get_opcodes():
        if tag == "equal":
            changes.append(Change("same", " ".join(b[j1:j2])))
            continue
        if i2 > i1:
            changes.append(Change("removed", " ".join(a[i1:i2])))
        if j2 > j1:
            changes.append(Change("added", " ".join(b[j1:j2])))
    return changes


def agreement(texts: list[str]) -> list[list[float]]:
    """The symmetric matrix of pairwise similarities (1 on the diagonal)."""
    n = len(texts)
    matrix = [[1.0] * n for _ in range(n)]
    for i, j in combinations(range(n), 2):
        matrix[i][j] = matrix[j][i] = similarity(texts[i], texts[j])
    return matrix


def mean_agreement(matrix: list[list[float]]) -> float | None:
    """The mean of the off-diagonal similarities; None with fewer than two texts."""
    pairs = [matrix[i][j] for i, j in combinations(range(len(matrix)), 2)]
    return sum(pairs) / len(pairs) if pairs else None
