"""Token counting for the fake's ``usage``: tiktoken's o200k_base when it loads, else an
estimate of ``len(text) // 4 + 1`` per text.

The choice is made once per process, so every answer in a test run counts the same way.
tiktoken downloads its files on first use unless ``TIKTOKEN_CACHE_DIR`` points at them;
without network that could hang, so loading gets a deadline."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import orjson

ENCODING = "o200k_base"
LOAD_TIMEOUT = 10.0
# OpenAI's cookbook: every message costs three tokens of framing, a name one more, and
# the reply is primed with three.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
TOKENS_PER_IMAGE = 85

_lock = threading.Lock()
_done = threading.Event()
_started = False
_encoding: Any = None


def _load() -> None:
    global _encoding
    try:
        import tiktoken

        enc = tiktoken.get_encoding(ENCODING)
    except Exception:  # no files, no network: estimate instead
        enc = None
    with _lock:
        if not _done.is_set():
            _encoding = enc
            _done.set()


def load(timeout: float = LOAD_TIMEOUT) -> bool:
    """Load the encoding once (blocking, at most ``timeout`` seconds); True if exact."""
    global _started
    with _lock:
        if not _started:
            _started = True
            threading.Thread(target=_load, name="fake-tiktoken", daemon=True).start()
    if not _done.wait(timeout):
        with _lock:
            _done.set()  # give up for good: counting must not change half-way through a run
    return _encoding is not None


def encoding() -> Any:
    """The loaded tiktoken encoding, or None when estimating."""
    if not _done.is_set():
        load()
    return _encoding


def count(text: str) -> int:
    if not text:
        return 0
    enc = encoding()
    return len(enc.encode_ordinary(text)) if enc is not None else len(text) // 4 + 1


def count_all(texts: Iterable[str]) -> int:
    return sum(count(t) for t in texts)


def split(text: str, width: int = 4) -> list[str]:
    """``text`` cut into its tokens (or ``width``-character pieces when estimating)."""
    enc = encoding()
    if enc is None:
        return [text[i : i + width] for i in range(0, len(text), width)]
    return [enc.decode([t]) for t in enc.encode_ordinary(text)]


def chat_prompt(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat request, counted the way OpenAI's cookbook does."""
    texts: list[str] = []
    framing = REPLY_PRIMING
    images = 0
    messages = body.get("messages")
    for msg in messages if isinstance(messages, list) else ():
        if not isinstance(msg, dict):
            continue
        framing += TOKENS_PER_MESSAGE
        for key, value in msg.items():
            if key == "content":
                images += _content(value, texts)
            elif key == "name" and isinstance(value, str):
                framing += TOKENS_PER_NAME
                texts.append(value)
            elif key == "role" and isinstance(value, str):
                texts.append(value)
            elif key in ("tool_calls", "function_call") and value:
                texts.append(orjson.dumps(value).decode())
    tools = body.get("tools") or body.get("functions")
    if tools:
        texts.append(orjson.dumps(tools).decode())
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        texts.append(orjson.dumps(rf).decode())
    return framing + count_all(texts) + images * TOKENS_PER_IMAGE


def embedding_input(value: Any) -> int:
    """Tokens of an embeddings ``input``: a string, strings, token ids or lists of ids."""
    if isinstance(value, str):
        return count(value)
    if not isinstance(value, list):
        return 0
    if all(isinstance(v, int) for v in value):
        return len(value)
    return sum(
        len(v) if isinstance(v, list) else count(v) if isinstance(v, str) else 0 for v in value
    )


def _content(value: Any, texts: list[str]) -> int:
    """Append a message content's texts; return how many images it holds."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    images = 0
    for part in value if isinstance(value, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "image"):
            images += 1
        else:
            texts.append(orjson.dumps(part).decode())
    return images
