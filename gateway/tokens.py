"""Counting prompt tokens for estimates (reservations, tpm, routing rules).

Billing never uses these counts when the upstream reports ``usage``; they only size the
worst case before the call. Encodings load in a background thread at start-up: tiktoken
downloads them on first use and this machine may have no internet, so the gateway must
start anyway, with a logged warning, and estimate from the UTF-8 size until (unless) an
encoding is available."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("gateway.tokens")

# Per OpenAI's cookbook: every message costs a few tokens of framing; the reply is primed
# with three more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Without an encoding: about 4 bytes per token in English, fewer in code and other
# scripts. Three bytes per token errs on the side of reserving too much.
BYTES_PER_TOKEN_ESTIMATE = 3
# Counts of texts at least this long are remembered (bounded by their total size).
REMEMBER_CHARS = 256
REMEMBER_TOTAL_CHARS = 8 * 1024 * 1024
# Counts of texts this short are remembered too, up to SHORT_MAX per encoding: every
# message's role ("system", "user"), short system prompts, "Thanks!". A lookup costs a
# tenth of tiktoken's ~0.7 us for even one word.
SHORT_CHARS = 48
SHORT_MAX = 4096

_DEFAULT_ENCODING = "o200k_base"
_KNOWN_ENCODINGS = ("o200k_base", "cl100k_base")


@dataclass(frozen=True, slots=True)
class PromptInfo:
    """What the gateway learns about a prompt before forwarding it."""

    tokens: int
    images: int = 0
    has_tools: bool = False
    has_response_format: bool = False
    chars: int = 0


class SizedMemo:
    """Remembered values, the oldest forgotten first once their keys' sizes pass a bound."""

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._size = 0
        self._d: dict[tuple[int, str], tuple[int, int]] = {}

    def get(self, key: tuple[int, str]) -> int | None:
        hit = self._d.get(key)
        return None if hit is None else hit[0]

    def put(self, key: tuple[int, str], value: int, size: int) -> int:
        if size > self._max:
            return value
        self._d[key] = (value, size)
        self._size += size
        while self._size > self._max:
            _, old = self._d.pop(next(iter(self._d)))
            self._size -= old
        return value

    def __len__(self) -> int:
        return len(self._d)


def estimate_from_text(text: str) -> int:
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN_ESTIMATE)


class TokenCounter:
    """Counts tokens with tiktoken when an encoding has loaded, else estimates."""

    def __init__(self, cache_dir: str | None = None, encodings: Iterable[str] = ()) -> None:
        """``encodings``: the names to load (those the catalog's models use); all the
        known ones when empty. Each costs memory for good (o200k_base about 50 MB,
        cl100k_base about 25 MB), so a catalog of o200k models never loads cl100k."""
        self._cache_dir = cache_dir
        self._wanted = tuple(dict.fromkeys(encodings)) or _KNOWN_ENCODINGS
        self._encodings: dict[str, Any] = {}
        self._fallback: Any | None = None
        self._loaded = threading.Event()
        self._failed: str | None = None
        self._name_cache: dict[str, str] = {}
        self._seen = SizedMemo(REMEMBER_TOTAL_CHARS)
        self._short: dict[int, dict[str, int]] = {}  # id(encoding) -> short text -> tokens

    # -- loading -----------------------------------------------------------------------
    def load_blocking(self) -> None:
        """Load the wanted encodings; remember why any failed (never raises)."""
        if self._cache_dir:
            os.environ.setdefault("TIKTOKEN_CACHE_DIR", self._cache_dir)
        failures: list[str] = []
        try:
            import tiktoken

            for name in self._wanted:
                try:
                    enc = tiktoken.get_encoding(name)
                except Exception as exc:  # network, file, unknown name: estimate instead
                    failures.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
                    continue
                # The ranks live on in the Rust encoder; the Python copy (37 MB for both
                # encodings) only serves pickling, which the gateway never does.
                enc._mergeable_ranks = {}
                self._encodings[name] = enc
            # A model whose encoding did not load counts with one that did: closer than
            # the estimate from text size.
            self._fallback = self._encodings.get(_DEFAULT_ENCODING) or next(
                iter(self._encodings.values()), None
            )
        except Exception as exc:  # tiktoken itself cannot be imported
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            self._failed = "; ".join(failures) or None
            self._loaded.set()

    async def load(self, timeout: float) -> None:
        """Start loading in a thread; wait up to ``timeout`` seconds, then carry on."""
        thread = threading.Thread(target=self.load_blocking, name="tiktoken-load", daemon=True)
        thread.start()
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(None, self._loaded.wait, timeout)
        if not done:
            log.warning(
                "tiktoken encodings did not load within %.0fs (no network?); prompt tokens are "
                "estimated from text size until they do. Set tokenizer.cache_dir or "
                "TIKTOKEN_CACHE_DIR to a folder holding the encoding files.",
                timeout,
            )
        elif self._failed and not self._encodings:
            log.warning(
                "tiktoken encodings could not be loaded (%s); prompt tokens are estimated "
                "from text size (%d bytes per token). Set tokenizer.cache_dir or "
                "TIKTOKEN_CACHE_DIR to a folder holding the encoding files.",
                self._failed,
                BYTES_PER_TOKEN_ESTIMATE,
            )
        elif self._failed:
            log.warning(
                "some tiktoken encodings could not be loaded (%s); models configured with "
                "them count prompt tokens with %s instead.",
                self._failed,
                ", ".join(self._encodings),
            )
        else:
            log.info("tiktoken encodings loaded: %s", ", ".join(self._encodings))

    @property
    def exact(self) -> bool:
        return bool(self._encodings)

    # -- counting ----------------------------------------------------------------------
    def _encoding(self, model_name: str, configured: str | None) -> Any | None:
        if not self._encodings:
            return None
        name = configured or self._name_cache.get(model_name)
        if name is None:
            name = _encoding_name_for(model_name)
            self._name_cache[model_name] = name
        return self._encodings.get(name) or self._fallback

    def count_text(self, text: str, model_name: str = "", encoding: str | None = None) -> int:
        if not text:
            return 0
        enc = self._encoding(model_name, encoding)
        if enc is None:
            return estimate_from_text(text)
        return len(enc.encode_ordinary(text))

    def count_texts(self, texts: Iterable[str], model_name: str, encoding: str | None) -> int:
        enc = self._encoding(model_name, encoding)
        if enc is None:
            return sum(estimate_from_text(t) for t in texts)
        # Not encode_ordinary_batch: it starts a thread pool per call (8 threads), which
        # cost more than the counting itself.
        encode = enc.encode_ordinary
        seen = self._seen
        short = self._short.get(id(enc))
        if short is None:
            short = self._short[id(enc)] = {}
        total = 0
        for t in texts:
            if not t:
                continue
            if len(t) <= SHORT_CHARS:
                n = short.get(t)
                if n is None:
                    n = len(encode(t))
                    if len(short) < SHORT_MAX:
                        short[t] = n
                total += n
                continue
            if len(t) < REMEMBER_CHARS:
                total += len(encode(t))
                continue
            # Long texts come back: a system prompt, a conversation's earlier turns.
            key = (id(enc), t)
            n = seen.get(key)
            if n is None:
                n = seen.put(key, len(encode(t)), len(t))
            total += n
        return total

    def chat_prompt(
        self, body: dict[str, Any], model_name: str, encoding: str | None, image_tokens: int
    ) -> PromptInfo:
        """Count a chat request's prompt: messages, tool definitions, response format."""
        texts: list[str] = []
        framing = REPLY_PRIMING
        images = 0
        messages = body.get("messages")
        if isinstance(messages, list):
            for msg in messages:
                if not isinstance(msg, dict):
                    continue
                framing += TOKENS_PER_MESSAGE
                for key, value in msg.items():
                    if key == "content":
                        images += _collect_content(value, texts)
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
        chars = sum(len(t) for t in texts)
        tokens = framing + self.count_texts(texts, model_name, encoding) + images * image_tokens
        return PromptInfo(
            tokens=tokens,
            images=images,
            has_tools=bool(tools),
            has_response_format=rf is not None,
            chars=chars,
        )

    def embedding_input(self, value: Any, model_name: str, encoding: str | None) -> int:
        """Count an embeddings ``input``: a string, strings, token ids, or lists of ids."""
        if isinstance(value, str):
            return self.count_text(value, model_name, encoding)
        if isinstance(value, list):
            if all(isinstance(v, int) for v in value):
                return len(value)
            total = 0
            strings: list[str] = []
            for item in value:
                if isinstance(item, str):
                    strings.append(item)
                elif isinstance(item, list):
                    total += len(item)
            return total + self.count_texts(strings, model_name, encoding)
        return 0


def _collect_content(value: Any, texts: list[str]) -> int:
    """Append a message content's text parts; return how many images it holds."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    images = 0
    if isinstance(value, list):
        for part in value:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image", "image"):
                images += 1
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            else:
                texts.append(orjson.dumps(part).decode())
    return images


def encodings_for(models: Iterable[tuple[str, str | None]]) -> list[str]:
    """The encodings a catalog needs, from its models' (upstream name, configured
    encoding) pairs."""
    return [configured or _encoding_name_for(name) for name, configured in models]


def _encoding_name_for(model_name: str) -> str:
    try:
        import tiktoken

        return str(tiktoken.encoding_name_for_model(model_name))
    except Exception:
        return _DEFAULT_ENCODING
