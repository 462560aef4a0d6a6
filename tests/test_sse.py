"""Splitting a byte stream into server-sent events, however the network cuts it."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import EventSplitter, event_data

PAYLOAD = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b)
EVENT = st.one_of(
    PAYLOAD.map(lambda p: b"data: " + p),
    st.lists(PAYLOAD, min_size=2, max_size=3).map(lambda ps: b"\n".join(b"data:" + p for p in ps)),
    PAYLOAD.map(lambda p: b": " + p),  # a comment, such as a keep-alive
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(EVENT, min_size=1, max_size=6),
    st.lists(st.integers(0, 400), max_size=8),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.integers(0, 2),
)
def test_events_come_out_whole_and_in_order_however_the_bytes_are_split(
    events: list[bytes], cuts: list[int], eol: bytes, blank_lines: int
) -> None:
    # blank lines before the first event, as some servers send, are no event
    wire = eol * blank_lines + b"".join(e.replace(b"\n", eol) + eol + eol for e in events)
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    splitter = EventSplitter()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += splitter.feed(wire[a:b])
    # (a lone blank line before an event stays with it: it does not change the event)
    assert [e.lstrip(b"\n") for e in out] == [e + b"\n\n" for e in events]
    assert [event_data(e) for e in out] == [event_data(e + b"\n\n") for e in events]
    assert splitter.pending == b""


def test_one_whole_event_per_read_comes_back_as_the_same_object() -> None:
    splitter = EventSplitter()
    event = b'data: {"choices":[]}\n\n'
    assert splitter.feed(event)[0] is event
    assert splitter.feed(b"\n\n") == []
    assert splitter.feed(b"data: a\n\ndata: b") == [b"data: a\n\n"]
    assert splitter.feed(b"\n\n") == [b"data: b\n\n"]


def test_event_data() -> None:
    assert event_data(b"data: x\n\n") == b"x"
    assert event_data(b"data:a\ndata: b\n\n") == b"a\nb"
    assert event_data(b": keep-alive\n\n") is None
