"""Server-sent events, parsed as the WHATWG HTML standard's "event stream interpretation" says.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

- The stream is UTF-8, decoded with replacement characters, one leading BOM dropped; bytes may
  arrive split anywhere, also inside a character or between the CR and LF of one line ending.
- A line ends at CRLF, LF or a lone CR.
- `:` at the start of a line makes it a comment. Otherwise the field name is everything before
  the first `:` (the whole line if there is none) and the value everything after it, minus one
  leading space.
- `data` appends the value and a LF to the data buffer; `event` sets the type; `id` sets the last
  event ID unless the value contains NUL; `retry` is honoured only when all ASCII digits; any
  other field is ignored.
- A blank line dispatches: with an empty data buffer nothing is dispatched (the buffers reset);
  otherwise the buffer's last LF is removed and the event has type `event` or "message".
- At the end of the stream a pending, undispatched event is discarded.

`EventStream.feed(chunk)` returns the events completed by `chunk`; the work per chunk is linear in
its size (the buffers never rescan what they already hold). An event (or unfinished line) longer
than `max_event` characters raises EventTooLarge: a hostile server cannot fill the memory.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(slots=True)
class Event:
    data: str
    type: str = "message"
    last_event_id: str = ""


class EventTooLarge(ValueError):
    pass


class EventStream:
    """Incremental parser: bytes in, `Event`s out. `retry_ms` holds the last valid `retry` field."""

    def __init__(self, max_event: int = 8 * 2**20):
        self.max_event = max_event
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False  # a BOM is dropped only at the very start
        self._pending: list[str] = []  # the pieces of an unfinished line
        self._pending_size = 0
        self._pending_cr = False  # the last chunk ended in CR: a LF right after belongs to it
        self._data: list[str] = []
        self._data_size = 0
        self._type = ""
        self.last_event_id = ""
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if not text:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if text[0] == "\n":
                text = text[1:]
        if "\r" in text:
            if text[-1] == "\r":
                self._pending_cr = True  # CR now; whether a LF follows is known with the next chunk
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        if len(lines) == 1:
            self._hold(text)
            return []
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = "".join(self._pending)
        self._pending, self._pending_size = [], 0
        rest = lines.pop()
        events: list[Event] = []
        for line in lines:
            # The two lines of nearly every chat chunk ("data: {...}", then a blank line) are
            # handled here; `_line` does the rest of the spec.
            if line.startswith("data: "):
                self._data_size += len(line) - 5
                if self._data_size > self.max_event:
                    self._check(0)
                self._data.append(line[6:])
            elif not line and len(self._data) == 1 and not self._type:
                events.append(Event(self._data[0], "message", self.last_event_id))
                self._data, self._data_size = [], 0
            else:
                self._line(line, events)
        self._hold(rest)
        return events

    def _hold(self, piece: str) -> None:
        if piece:
            self._pending.append(piece)
            self._pending_size += len(piece)
            self._check(self._pending_size)

    def _check(self, size: int) -> None:
        if size + self._data_size > self.max_event:
            raise EventTooLarge(f"an event over {self.max_event // 2**20} MiB")

    def _line(self, line: str, events: list[Event]) -> None:
        if not line:
            if self._data:
                data = "\n".join(self._data)
                events.append(Event(data, self._type or "message", self.last_event_id))
            self._data = []
            self._data_size = 0
            self._type = ""
            return
        if line[0] == ":":
            return
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data_size += len(value) + 1
            self._check(0)
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                self.retry_ms = int(value)
