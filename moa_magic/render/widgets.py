"""The live view of a run: the header, the answer, one row of proposer cards per layer.

    tree (VBox, .moa-tree)
    ├── header (HTML, .moa-header .moa-head): preset · shape · status · elapsed · calls · tokens · cost
    ├── answer (VBox, .moa-answer .moa-final-section .moa-status-<status>)
    │   ├── HTML (.moa-answer-head): "Answer" and the aggregator's figures in a quiet line
    │   │   (--staircase: and the step being written, with what it saw: .moa-stair-live)
    │   └── HTML (.moa-final .moa-answer-body): the aggregator's answer as Markdown → safe HTML
    ├── layer 1 (one-child Accordion, .moa-layer .moa-layer-1)
    │   └── Box (.moa-grid: cards side by side, wrapping)
    │       ├── card (VBox, .moa-card .moa-node .moa-node-1-1 .moa-status-<status>)
    │       │   ├── HTML (.moa-card-head): mark, label, model; figures in a quiet line
    │       │   └── HTML (.moa-node-text .moa-card-text): the answer, scrolling inside the card
    │       └── ...
    └── layer 2 ...

The final answer comes first, in the notebook's content font size; it streams as rendered Markdown.
A layer opens when its first call starts and stays open (a click folds it: `Accordion` keeps only
one panel open, so each layer is its own one-child Accordion). Accordion titles are plain text
(ipywidgets 8 sets them with `textContent`); every HTML value is `sanitize.render` output or
escaped. Proposers stream as escaped plain text and become rendered Markdown when they finish.
Colours and sizes are the JupyterLab theme's (render/theme.py).

When the run ends the magic replaces this view with the finished one (render/view.py) and
disposes of these widgets; a tree used directly stays live until `dispose()`, or until it is one
of the oldest finished trees beyond those a process keeps live (render/live_trees.py).

The renderer is a listener: the engine calls it from its worker thread. A call's first chunk is
pushed at once (the first token is what a user waits for); later updates are coalesced: a widget
is written at most once per `interval` (50 ms → ≤ 20 updates/s per widget; longer when a push is
costly: at least 10× its render+send time) by the event itself or by a small flusher thread that
also ticks the elapsed time, and always at once with the final state on CallFinished /
CallFailed / RunFinished. One lock serializes all widget writes.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ..core.events import (
    CallFailed, CallFinished, CallRetrying, CallStarted, CallStep, Event, LayerFinished, RunFinished,
    RunStarted, TextDelta,
)
from ..core.result import Status
from ..figures import run_title
from . import live_trees
from .format import shown_error
from .mixture import answer_head_html, card_head_html
from .parts import call_body_html, esc, final_body_html, layer_title
from .theme import CSS
from .view import head_html

if TYPE_CHECKING:
    from ..core.plan import Plan
    from ..core.result import CallRecord, MoaResult

INTERVAL_S = 0.05
CARD_TEXT_MAX_HEIGHT = "14em"
CARD_MIN_WIDTH = "170px"


class _Node:
    """One call's place: a head (label, figures) and a body (its text), in a box."""

    def __init__(self, w, head_html: str, classes: list[str], head_class: str, text_class: list[str],
                 card: bool):
        text_layout = w.Layout(max_height=CARD_TEXT_MAX_HEIGHT, overflow="auto") if card else w.Layout()
        self.head = w.HTML(value=head_html)
        self.head.add_class(head_class)
        self.text = w.HTML(value="<i>waiting…</i>", layout=text_layout)
        for c in text_class:
            self.text.add_class(c)
        box_layout = w.Layout(flex="1 1 0", min_width=CARD_MIN_WIDTH) if card else w.Layout()
        self.section = w.VBox([self.head, self.text], layout=box_layout)
        for c in classes:
            self.section.add_class(c)
        self.status_class = "moa-status-waiting"
        self.section.add_class(self.status_class)
        self.record: CallRecord | None = None
        self.note: str | None = None  # e.g. "retry 1: HTTP 429" until the call streams again
        self.dirty = False
        self.shown_text = False  # its first chunk is on screen
        self.last_push = 0.0
        self.cost = 0.0  # seconds the last push took (render + send)

    def due(self, now: float, interval: float) -> bool:
        """The first chunk at once; then again only after `interval`, and after 10× the last
        push's cost: rendering a long answer's Markdown takes milliseconds, and it must never eat
        the run's CPU."""
        return not self.shown_text or now - self.last_push >= max(interval, 10 * self.cost)

    def push(self, head: str, body_html: str, now: float) -> None:
        """Write head, status class and text (only what changed). Caller holds the lock."""
        rec = self.record
        if rec is None:
            return
        if self.head.value != head:
            self.head.value = head
        status_class = f"moa-status-{rec.status}"
        if status_class != self.status_class:
            self.section.remove_class(self.status_class)
            self.section.add_class(status_class)
            self.status_class = status_class
        if self.text.value != body_html:
            self.text.value = body_html
        self.dirty = False
        self.shown_text = bool(rec.text)
        self.last_push = time.perf_counter()
        self.cost = self.last_push - now


class TreeRenderer:
    """Build with `for_plan(plan)` before the run starts, display `.widget`, pass it as a listener."""

    def __init__(self, preset: str | None, shape: str, layers: list[list[str]], aggregator: str,
                 interval: float = INTERVAL_S):
        import ipywidgets as w

        self.interval = interval
        self._lock = threading.RLock()
        self._result: MoaResult | None = None
        self._t0: float | None = None
        self._closed = False
        self._status_override: str | None = None
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._header_dirty = False
        self._header_push = 0.0

        self.header = w.HTML(
            value=f'<div class="moa-head">MoA · {esc(run_title(preset))} · {esc(shape)} · starting…</div>'
        )
        self.header.add_class("moa-header")

        self.final = _Node(
            w, f'<span class="moa-answer-label">Answer</span><span class="moa-figures">aggregator '
               f"{esc(aggregator)} · waiting for the proposers</span>",
            ["moa-answer", "moa-final-section"], "moa-answer-head", ["moa-final", "moa-answer-body"],
            card=False,
        )
        self.final.text.value = ""
        self.layer_sections: list = []
        self.layer_boxes: list = []
        self.nodes: dict[tuple[int, int], _Node] = {}
        for number, models in enumerate(layers, start=1):
            row = []
            for index, model in enumerate(models):
                node = _Node(
                    w, f'<div class="moa-card-head">… L{number}.{index + 1} · {esc(model)}</div>'
                       '<div class="moa-figures">waiting</div>',
                    ["moa-card", "moa-node", f"moa-node-{number}-{index + 1}"], "moa-card-head-box",
                    ["moa-node-text", "moa-card-text"], card=True,
                )
                self.nodes[(number, index)] = node
                row.append(node.section)
            box = w.Box(row, layout=w.Layout(flex_flow="row wrap", width="100%"))
            box.add_class("moa-grid")
            section = w.Accordion(
                children=[box], titles=(f"Layer {number} · {len(models)} proposers · waiting",)
            )
            section.selected_index = None
            section.add_class("moa-layer")
            section.add_class(f"moa-layer-{number}")
            self.layer_boxes.append(box)
            self.layer_sections.append(section)
        self._layer_open = [False] * len(layers)
        self._layer_titles = [s.titles[0] for s in self.layer_sections]
        self.widget = w.VBox([w.HTML(CSS), self.header, self.final.section, *self.layer_sections])
        self.widget.add_class("moa-tree")
        self._disposed = False
        live_trees.keep(self)

    @classmethod
    def for_plan(cls, plan: Plan, **kwargs) -> TreeRenderer:
        return cls(
            plan.preset, plan.shape, [[c.spec for c in layer] for layer in plan.layers],
            plan.aggregator.spec, **kwargs,
        )

    @classmethod
    def for_run_of(cls, result: MoaResult, **kwargs) -> TreeRenderer:
        """An empty tree shaped like `result`'s run, for a replay of it to fill."""
        return cls(
            result.preset, result.shape, [[r.model for r in layer] for layer in result.layers],
            result.aggregator.model, **kwargs,
        )

    @classmethod
    def for_result(cls, result: MoaResult, **kwargs) -> TreeRenderer:
        """A finished (or partial) result as a tree, without a run."""
        tree = cls.for_run_of(result, **kwargs)
        tree._bind(result)
        tree.close()
        return tree

    # --- introspection (tests, browser suite) ----------------------------------------------------

    @property
    def text_widgets(self) -> dict[tuple[int, int], object]:
        return {key: node.text for key, node in self.nodes.items()}

    @property
    def final_widget(self):
        return self.final.text

    @property
    def closed(self) -> bool:
        """The run it shows has ended (or the tree was closed): it only changes on a click now."""
        return self._closed

    @property
    def ticker(self) -> threading.Thread | None:
        """The thread that pushes coalesced updates while the run goes on (None before it starts)."""
        return self._flusher

    # --- listener ---------------------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        record = getattr(event, "record", None)
        if record is not None and record.role not in ("proposer", "aggregator"):
            return  # baselines and the judge: their own section (static.comparison_html)
        now = time.perf_counter()
        with self._lock:
            if self._disposed:
                return
            if isinstance(event, RunStarted):
                self._bind(event.result)
                self._t0 = now
                self._header_dirty = True
                self._start_flusher()
            elif isinstance(event, TextDelta):
                node = self._node(event.record)
                node.note = None
                node.dirty = True
                self._header_dirty = True
                if node.due(now, self.interval):
                    self._push_node(node, now)
            elif isinstance(event, CallStarted):
                node = self._node(event.record)
                self._open_layer(event.record)
                self._push_node(node, now)
                self._push_layers()
                self._push_header(now)
            elif isinstance(event, CallStep):  # the answer's head names the step and what it saw
                self._push_node(self._node(event.record), now)
            elif isinstance(event, CallRetrying):
                node = self._node(event.record)
                node.shown_text = False  # the retry's first chunk shows at once too
                node.note = f"retry {event.attempt} in {event.delay_s:.1f}s: {event.reason}"
                self._push_node(node, now)  # the text was reset: show that at once
            elif isinstance(event, (CallFinished, CallFailed)):
                node = self._node(event.record)
                node.note = None
                self._push_node(node, now)
                self._push_layers()
                self._push_header(now)
            elif isinstance(event, LayerFinished):
                self._push_layers()
            elif isinstance(event, RunFinished):
                self._bind(event.result)
                self._finish()
        if isinstance(event, RunFinished):
            self._join_flusher()

    def close(self, status: str | None = None) -> None:
        """Stop the ticker and write the final state; `status` overrides the header's status."""
        with self._lock:
            if self._disposed:
                return
            if status is not None:
                self._status_override = status
            self._finish()
        self._join_flusher()

    def dispose(self) -> None:
        """Close every widget of the tree (their views vanish) and drop the run it showed."""
        live_trees.forget(self)
        with self._lock:
            self._stop.set()
            self._closed = self._disposed = True
            for widget in live_trees.widget_parts(self.widget):
                widget.close()
            self._result = None
            for node in [*self.nodes.values(), self.final]:
                node.record = None
        self._join_flusher()

    # --- internals (callers hold the lock) --------------------------------------------------------

    def _bind(self, result: MoaResult) -> None:
        self._result = result
        for layer in result.layers:
            for record in layer:
                node = self.nodes.get((record.layer, record.index))
                if node is not None:
                    node.record = record
        self.final.record = result.aggregator

    def _node(self, record: CallRecord) -> _Node:
        if record.role == "aggregator":
            node = self.final
        else:
            node = self.nodes[(record.layer, record.index)]
        node.record = record
        return node

    def _open_layer(self, record: CallRecord) -> None:
        """Open the layer whose call starts; earlier layers stay as they are (open unless folded)."""
        if record.role == "aggregator":
            return
        i = record.layer - 1
        if 0 <= i < len(self.layer_sections) and not self._layer_open[i]:
            self.layer_sections[i].selected_index = 0
            self._layer_open[i] = True

    def _push_node(self, node: _Node, now: float) -> None:
        if node.record is None:
            return
        record = node.record
        if node is self.final:
            head = answer_head_html(record, node.note)
            body = final_body_html(self._result) if self._result is not None else ""
        else:
            head = card_head_html(record, node.note)
            if record.status == Status.STREAMING and record.text and not self._closed:
                # proposers stream as plain text (cheap), and turn into rendered Markdown when done
                body = f'<div class="moa-streaming" style="white-space:pre-wrap">{esc(record.text)}</div>'
            else:
                calls = self._result.calls() if self._result is not None else ()
                body = call_body_html(record, shown_error(record, calls))
        node.push(head, body, time.perf_counter())

    def _push_layers(self) -> None:
        if self._result is None:
            return
        for i, (section, records) in enumerate(zip(self.layer_sections, self._result.layers)):
            title = layer_title(i + 1, records)
            if self._layer_titles[i] != title:
                section.titles = (title,)
                self._layer_titles[i] = title

    def _push_header(self, now: float) -> None:
        if self._result is None:
            return
        running = self._result.status == Status.RUNNING and not self._closed
        elapsed = None
        if self._t0 is not None and (running or not self._result.elapsed_s):
            elapsed = now - self._t0
        value = f'<div class="moa-head">{head_html(self._result, elapsed, self._status_override)}</div>'
        if self.header.value != value:
            self.header.value = value
        self._header_dirty = False
        self._header_push = now

    def _flush(self) -> None:
        now = time.perf_counter()
        with self._lock:
            if self._closed or self._disposed:
                return
            for node in [*self.nodes.values(), self.final]:
                if node.dirty and node.due(now, self.interval):
                    self._push_node(node, now)
            # the elapsed time ticks ~4×/s even when nothing streams
            if now - self._header_push >= (self.interval if self._header_dirty else 0.25):
                self._push_header(now)
                self._refresh_heads()

    def _refresh_heads(self) -> None:
        """Rewrite the heads of streaming calls whose figures changed without an event of their
        own: the meter fills in every call's counts at once when its encodings are ready, while a
        call whose stream pauses would otherwise show "in … / out …" until its next chunk."""
        for node in [*self.nodes.values(), self.final]:
            record = node.record
            if record is None or record.status != Status.STREAMING or node.dirty:
                continue  # a dirty node gets its whole push soon anyway
            head = (answer_head_html if node is self.final else card_head_html)(record, node.note)
            if node.head.value != head:
                node.head.value = head

    def _start_flusher(self) -> None:
        if self._flusher is not None:
            return

        def loop():
            while not self._stop.wait(self.interval):
                try:
                    self._flush()
                except Exception:  # a broken frontend must not kill the thread silently mid-run
                    import logging

                    logging.getLogger("moa_magic").exception("moa-magic tree flush failed")

        self._flusher = threading.Thread(target=loop, name="moa-magic-tree", daemon=True)
        self._flusher.start()

    def _finish(self) -> None:
        self._stop.set()
        self._closed = True
        now = time.perf_counter()
        if self._result is not None:
            for node in [*self.nodes.values(), self.final]:
                node.note = None
                self._push_node(node, now)
            self._push_layers()
            self._push_header(now)
            # every layer that ran is open (also one where the run stopped)
            for i, records in enumerate(self._result.layers):
                if any(r.sent for r in records) and not self._layer_open[i]:
                    self.layer_sections[i].selected_index = 0
                    self._layer_open[i] = True

    def _join_flusher(self) -> None:
        """Called without the lock held: the flusher may be waiting for it."""
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=1.0)

