"""Reading token usage from upstream answers, or counting it when they leave it out."""

from __future__ import annotations

from typing import Any

from ..config.catalog import Model
from ..tokens import TokenCounter
from .assemble import choice_texts
from .context import RequestContext, Usage


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def usage_from(u: Any) -> Usage | None:
    """OpenAI's ``usage`` object (also accepts ``input_tokens``/``output_tokens``)."""
    if not isinstance(u, dict):
        return None
    prompt = _int(u.get("prompt_tokens")) or _int(u.get("input_tokens"))
    completion = _int(u.get("completion_tokens")) or _int(u.get("output_tokens"))
    ptd = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    ctd = u.get("completion_tokens_details") or u.get("output_tokens_details") or {}
    cached = _int(ptd.get("cached_tokens")) if isinstance(ptd, dict) else 0
    reasoning = _int(ctd.get("reasoning_tokens")) if isinstance(ctd, dict) else 0
    if prompt == 0 and completion == 0 and "prompt_tokens" not in u and "input_tokens" not in u:
        return None
    return Usage(prompt, completion, min(cached, prompt), reasoning, "upstream")


def counted_usage(
    tokens: TokenCounter, model: Model, prompt_tokens: int, texts: list[str]
) -> Usage:
    completion = tokens.count_texts(texts, model.upstream_model, model.encoding)
    return Usage(prompt_tokens, completion, 0, 0, "counted")


def count_json_response(ctx: RequestContext, model: Model, data: dict[str, Any]) -> Usage:
    """Usage of a non-stream answer that did not report it."""
    prompt = ctx.prompt.tokens if ctx.prompt else 0
    texts = choice_texts(data.get("choices"), "message") if ctx.endpoint == "chat" else []
    return counted_usage(ctx.runtime.tokens, model, prompt, texts)


def count_streamed(ctx: RequestContext, model: Model) -> Usage:
    """Usage of a stream from what was relayed, when the upstream sent no usage (cut
    short, or a server that ignores ``stream_options``)."""
    prompt = ctx.prompt.tokens if ctx.prompt else 0
    return counted_usage(ctx.runtime.tokens, model, prompt, ctx.streamed.texts())
