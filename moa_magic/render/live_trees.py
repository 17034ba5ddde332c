"""How many live views one process keeps, across runs.

Widgets live in the kernel until closed. A process keeps the last LIVE_TREES trees live
(clickable); when a newer tree would exceed that, the oldest finished one is disposed: its widgets
(with their layouts and styles) are closed and its run dropped, so 500 runs hold as many widgets
as 20. One tree's own state (its widgets, its coalescing) is render/widgets.py.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .widgets import TreeRenderer

LIVE_TREES = 20
_trees: collections.deque = collections.deque()
_lock = threading.Lock()


def keep(tree: TreeRenderer) -> None:
    """Register a new tree; dispose of the oldest finished trees beyond LIVE_TREES."""
    with _lock:
        _trees.append(tree)
        retired = []
        for old in list(_trees):
            if len(_trees) - len(retired) <= LIVE_TREES:
                break
            if old.closed:
                retired.append(old)
        for old in retired:
            _trees.remove(old)
    for old in retired:
        old.dispose()


def forget(tree: TreeRenderer) -> None:
    """A tree disposed of: no longer one of the live ones."""
    with _lock:
        if tree in _trees:
            _trees.remove(tree)


def widget_parts(widget):
    """`widget`, its layout and style, and the same for all its children, depth first: what closing
    a view must close, so nothing of it stays in the kernel."""
    yield widget
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if part is not None:
            yield part
    for child in getattr(widget, "children", ()):
        yield from widget_parts(child)
