"""What a relayed stream leaves for later: the payloads of its events, to count the text
when the upstream reports no usage and to assemble the answer the cache stores, in
memory that grows with the answer's text rather than with its chunks.

A chunk's JSON is some 200 bytes for a token of 3-4 characters, so keeping every payload
as it came made a 20,000-token stream hold ~5.8 MB (100 such streams at once: 760 MB of
RSS, measured). Payloads are kept as they come, which costs nothing per chunk, until they
pass ``FOLD_BYTES``; then they are compressed together (zlib level 1: the JSON around
each token is the same every time, so 64 KiB become a few KiB, for ~0.4 us per chunk,
where parsing them would cost ~1.3 us). Nothing reads them unless the upstream gave no
usage or the cache stores the answer, and then they are read once. A short stream, the
common case, is never compressed."""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Iterator
from typing import Any

import orjson

from .assemble import assemble, choice_texts

FOLD_BYTES = 64 * 1024


class Streamed:
    """The payloads of the events relayed to the client, in order (see the module doc)."""

    __slots__ = ("_blocks", "_fold_at", "_raw", "_size", "first")

    def __init__(self, fold_at: int = FOLD_BYTES) -> None:
        # Made for every request, so only this; what folding needs comes when it does.
        self.first: bytes | None = None  # the first payload (its id, created, model)
        self._raw: list[bytes] = []
        self._size = 0
        self._fold_at = fold_at
        # compressed runs of payloads, in order, each with its payloads' lengths
        self._blocks: list[tuple[bytes, array[int]]] = []

    def append(self, payload: bytes) -> None:
        if self.first is None:
            self.first = payload
        self._raw.append(payload)
        self._size += len(payload)
        if self._size > self._fold_at:
            self._fold()

    def __bool__(self) -> bool:
        return self.first is not None

    def payloads(self) -> Iterator[bytes]:
        """Every payload, in the order relayed."""
        for block, lengths in self._blocks:
            data = zlib.decompress(block)
            at = 0
            for n in lengths:
                yield data[at : at + n]
                at += n
        yield from self._raw

    def texts(self) -> list[str]:
        """The text of every relayed chunk, one piece per chunk and field, for counting
        (a payload that is not JSON is skipped)."""
        texts: list[str] = []
        for payload in self.payloads():
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                texts.extend(choice_texts(chunk.get("choices"), "delta"))
        return texts

    def answer(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The relayed stream as one ``chat.completion``, for the cache (ValueError if a
        payload is not JSON)."""
        return assemble(self.payloads() if self._blocks else self._raw, usage)

    def _fold(self) -> None:
        raw = self._raw
        self._blocks.append((zlib.compress(b"".join(raw), 1), array("I", map(len, raw))))
        raw.clear()
        self._size = 0
