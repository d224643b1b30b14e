"""Server-sent events, parsed incrementally across arbitrary chunk boundaries, re-serialised."""

from __future__ import annotations

from dataclasses import dataclass


class SseError(ValueError):
    pass


@dataclass
class Event:
    data: str
    event: str | None = None
    id: str | None = None
    retry: str | None = None
    comments: tuple[str, ...] = ()
    has_data: bool = True  # False: the block had no data field (a client dispatches no event)

    def encode(self) -> bytes:
        # A comment is sent as a bare `:`: it still keeps the connection alive, but its text,
        # which no stage inspects or masks, never reaches the client.
        lines = [":" for _ in self.comments]
        if self.event is not None:
            lines.append(f"event: {self.event}")
        if self.id is not None:
            lines.append(f"id: {self.id}")
        if self.retry is not None:
            lines.append(f"retry: {self.retry}")
        if self.has_data:  # `data: ` would make a keep-alive an empty event (SDKs parse it)
            lines += [f"data: {line}" for line in self.data.split("\n")]
        return ("\n".join(lines) + "\n\n").encode()


class SseParser:
    """Feed bytes, get complete events. Memory is bounded by `max_event_bytes`."""

    def __init__(self, max_event_bytes: int = 1024 * 1024):
        self.max_event_bytes = max_event_bytes
        self._buffer = b""
        self._fields: dict[str, list[str]] = {}
        self._comments: list[str] = []
        self._size = 0

    def feed(self, data: bytes) -> list[Event]:
        """Parse what `data` completes; `b""` signals the end of the stream."""
        if not data:
            tail, self._buffer = self._buffer, b""
            events = self._lines([tail]) if tail else []
            if self._fields or self._comments:
                events += self._dispatch()
            return events
        self._buffer += data
        *complete, self._buffer = self._split(self._buffer)
        if len(self._buffer) > self.max_event_bytes:
            raise SseError("an SSE line exceeds the size limit")
        return self._lines(complete)

    @staticmethod
    def _split(buffer: bytes) -> list[bytes]:
        # Lines end in CRLF, LF or CR; a trailing CR may be the first half of a CRLF.
        parts = buffer.replace(b"\r\n", b"\n").split(b"\n")
        out: list[bytes] = []
        for part in parts[:-1]:
            out += part.split(b"\r")
        last = parts[-1]
        if b"\r" in last:
            *done, last = last.split(b"\r")
            if last == b"" and buffer.endswith(b"\r"):
                out += done[:-1] if done else []
                last = (done[-1] if done else b"") + b"\r"
            else:
                out += done
        return [*out, last]

    def _lines(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        for raw in lines:
            line = raw.decode("utf-8", errors="strict").rstrip("\r")
            if line == "":
                if self._fields or self._comments:
                    events += self._dispatch()
                continue
            self._size += len(raw)
            if self._size > self.max_event_bytes:
                raise SseError("an SSE event exceeds the size limit")
            if line.startswith(":"):
                self._comments.append(line[1:])
                continue
            name, _, value = line.partition(":")
            self._fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        return events

    def _dispatch(self) -> list[Event]:
        fields, comments = self._fields, self._comments
        self._fields, self._comments, self._size = {}, [], 0

        def last(name: str) -> str | None:
            return fields[name][-1] if name in fields else None

        return [Event(data="\n".join(fields.get("data", [])), event=last("event"), id=last("id"),
                      retry=last("retry"), comments=tuple(comments), has_data="data" in fields)]
