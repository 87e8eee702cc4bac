"""Property-based tests of SSE decoding, through the path every HTTP adapter reads a stream by.

``modules.providers.sse.iter_events`` over a real ``httpx`` response whose body
comes, in pieces, from ``httpx.MockTransport`` (httpx's own testing transport):
the client, response, text decoding and httpx-sse's decoder are the ones a
live request uses. Hypothesis draws streams of events (multi-line data,
event names, ids, comments and ``: ping`` heartbeats, unknown fields, LF /
CRLF / CR line endings, any unicode but surrogates) and splits the encoded
bytes at arbitrary points, inside multi-byte UTF-8 characters too. The
expected events come from a small model of the WHATWG rules
(PROTOCOLS.md §1), written independently of the decoder.

httpx-sse 0.4.3 departs from those rules in two places, pinned down by the
strict xfail tests at the end (they start failing once the library is fixed):
a block without ``data:`` (a heartbeat) is dispatched as an empty event once
an ``id:``, ``event:`` or ``retry:`` is pending, and a leading byte-order mark
is not skipped. Adapters skip events with empty data, so the first does not
reach them (property ``test_what_adapters_see``); nobody sends a BOM.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from modules.providers import errors
from modules.providers.sse import iter_events

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that must survive: str.splitlines() would break lines at several of these
# (\x0b \x0c \x1c \x1d \x1e \x85 \u2028 \u2029); the SSE rules break only at CR and LF.
TRICKY = ["\x00", "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029", "\ufeff", ":", " ", "你", "é", "🎉",
          "\U0001f469\u200d\U0001f467", "data: ", "\\r"]
chars = st.one_of(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), st.sampled_from(TRICKY))
line_value = st.lists(chars, max_size=12).map("".join)
field_name_value = st.lists(chars.filter(lambda c: c != "\x00"), max_size=8).map("".join)
ending = st.sampled_from(["\n", "\r\n", "\r"])


@dataclass(frozen=True)
class Event:
    event: str = "message"
    data: str = ""
    id: str = ""


@dataclass
class Stream:
    raw: bytes
    events: list[Event]  # what the WHATWG rules dispatch
    ends: list[int]  # byte offset just past each event's dispatching blank line


@st.composite
def streams(draw, *, ids: bool = True, heartbeats: bool = True) -> Stream:
    """A stream and the events it carries; every event has at least one data line."""
    lines: list[str] = []  # logical lines; a line is (text) and its ending is drawn at encode time
    marks: list[int] = []  # index in ``lines`` of each dispatching blank line
    events: list[Event] = []
    last_id = ""
    for _ in range(draw(st.integers(0, 6))):
        if heartbeats and draw(st.booleans()):
            lines += [draw(st.sampled_from([": ping", ":", ": keep-alive 心跳"])), ""]  # a heartbeat block
        data_lines = draw(st.lists(line_value, min_size=1, max_size=4))
        name = draw(st.one_of(st.none(), field_name_value))
        new_id = draw(st.one_of(st.none(), field_name_value)) if ids else None
        fields: list[str] = []
        for value in data_lines:
            if value == "" and draw(st.booleans()):
                fields.append("data")  # a field name alone: empty value
            elif not value.startswith(" ") and draw(st.booleans()):
                fields.append("data:" + value)  # no space after the colon
            else:
                fields.append("data: " + value)
        if name is not None:
            fields.insert(draw(st.integers(0, len(fields))), "event: " + name)
        if new_id is not None:
            fields.insert(draw(st.integers(0, len(fields))), "id: " + new_id)
            last_id = new_id
        if ids and draw(st.booleans()):
            fields.insert(draw(st.integers(0, len(fields))), f"retry: {draw(st.integers(0, 10**6))}")
        for extra in draw(st.lists(st.sampled_from([": comment", ":", "unknown: field", "Data: not data"]),
                                   max_size=2)):
            fields.insert(draw(st.integers(0, len(fields))), extra)
        lines += fields + [""]
        marks.append(len(lines) - 1)
        events.append(Event(event=name or "message", data="\n".join(data_lines), id=last_id))
    # Encode, choosing each line's ending. A CR followed by an empty line's LF would read
    # as one CRLF, so that pair is avoided (the rules make it one line end, not two).
    out: list[str] = []
    ends: list[int] = []
    size = 0
    previous = ""
    for index, line in enumerate(lines):
        end = draw(ending)
        if previous == "\r" and line == "" and end == "\n":
            end = "\r\n"
        piece = line + end
        out.append(piece)
        size += len(piece.encode("utf-8"))
        previous = end
        if index in marks:
            ends.append(size)
    return Stream("".join(out).encode("utf-8"), events, ends)


@st.composite
def splits(draw, raw: bytes) -> list[bytes]:
    """``raw`` cut at arbitrary offsets (sometimes every byte apart)."""
    if len(raw) > 1 and draw(st.integers(0, 9)) == 0:
        return [raw[i:i + 1] for i in range(len(raw))]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=12))) if len(raw) > 1 else []
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


async def decode(chunks: list[bytes], failure: Exception | None = None,
                 content_type: str = "text/event-stream; charset=utf-8") -> tuple[list[Event], BaseException | None]:
    """The events ``iter_events`` yields for a body arriving as ``chunks`` (then ``failure``, if any)."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
        if failure is not None:
            raise failure

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=body())

    out: list[Event] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        async with client.stream("POST", "http://flow.test/score") as response:
            try:
                async for sse in iter_events(response):
                    out.append(Event(sse.event, sse.data, sse.id))
            except errors.ModelError as exc:
                return out, exc
    return out, None


def run(chunks: list[bytes], failure: Exception | None = None) -> tuple[list[Event], BaseException | None]:
    return asyncio.run(decode(chunks, failure))


# -- properties ---------------------------------------------------------------------------------------------
@SETTINGS
@given(st.data(), streams(ids=False))
def test_events_survive_any_split(data, stream):
    """Data, names, comments, heartbeats, line endings and unicode, split anywhere."""
    chunks = data.draw(splits(stream.raw))
    note(f"raw={stream.raw!r} chunks={len(chunks)}")
    decoded, exc = run(chunks)
    assert exc is None
    assert decoded == stream.events


@SETTINGS
@given(st.data(), streams(ids=True, heartbeats=False))
def test_ids_persist_and_retry_is_not_data(data, stream):
    """``id:`` sets the last event id for later events too; ``retry:`` and unknown fields are no data."""
    decoded, exc = run(data.draw(splits(stream.raw)))
    assert exc is None
    assert decoded == stream.events


@SETTINGS
@given(st.data(), streams(ids=True, heartbeats=True))
def test_what_adapters_see(data, stream):
    """Everything at once, as an adapter reads it: the events that carry data."""
    decoded, exc = run(data.draw(splits(stream.raw)))
    assert exc is None
    assert [e for e in decoded if e.data] == [e for e in stream.events if e.data]


@SETTINGS
@given(st.data(), streams(ids=False))
def test_a_cut_body_delivers_what_came_then_interrupts(data, stream):
    """A connection cut at any byte: every event complete before it arrives, in order, then
    InterruptedError (never a half event, never an event from after the cut)."""
    cut = data.draw(st.integers(0, len(stream.raw)))
    chunks = data.draw(splits(stream.raw[:cut])) if cut else []
    decoded, exc = run(chunks, httpx.RemoteProtocolError("peer closed connection without sending complete message body"))
    assert type(exc) is errors.InterruptedError
    assert decoded == stream.events[:len(decoded)]  # a prefix, nothing invented
    # Complete before the cut: its blank line ended before the last byte (a final CR may yet be a CRLF).
    complete = sum(1 for end in stream.ends if end < cut)
    assert len(decoded) >= complete


@pytest.mark.parametrize("failure, kind", [
    (httpx.ReadTimeout("timed out"), errors.TimeoutError),
    (httpx.RemoteProtocolError("incomplete chunked read"), errors.InterruptedError),
    (httpx.ReadError("connection reset"), errors.InterruptedError),
])
def test_transport_failures_mid_body_map_to_model_errors(failure, kind):
    decoded, exc = run([b'data: {"answer": "Hel"}\n\ndata: {"answer": "lo"}\n\ndata: {"ans'], failure)
    assert type(exc) is kind
    assert [e.data for e in decoded] == ['{"answer": "Hel"}', '{"answer": "lo"}']


def test_wrong_content_type_is_an_error():
    async def go():
        return await decode([b'{"answer": "whole"}'], content_type="application/json")

    decoded, exc = asyncio.run(go())
    assert type(exc) is errors.BadRequestError
    assert decoded == []


def test_the_seed_example_split_inside_characters():
    """Seed 004's stream shape with Chinese text, one byte at a time."""
    body = "".join(f'data: {{"answer": "{piece}"}}\r\n\r\n' for piece in ["", "聊天", "机器人", "！", ""])
    raw = body.encode("utf-8")
    decoded, exc = run([raw[i:i + 1] for i in range(len(raw))])
    assert exc is None
    assert [e.data for e in decoded] == [f'{{"answer": "{p}"}}' for p in ["", "聊天", "机器人", "！", ""]]


# -- where httpx-sse 0.4.3 departs from the WHATWG rules ---------------------------------------------------
@pytest.mark.xfail(strict=True, reason="httpx-sse 0.4.3 dispatches a data-less block once an id is set")
def test_heartbeat_after_an_id_dispatches_nothing():
    decoded, exc = run([b"id: 7\ndata: a\n\n: ping\n\ndata: b\n\n"])
    assert exc is None
    assert decoded == [Event(data="a", id="7"), Event(data="b", id="7")]


@pytest.mark.xfail(strict=True, reason="httpx-sse 0.4.3 does not skip a leading byte-order mark")
def test_a_leading_byte_order_mark_is_skipped():
    decoded, exc = run(["\ufeffdata: first\n\n".encode("utf-8")])
    assert exc is None
    assert decoded == [Event(data="first")]
