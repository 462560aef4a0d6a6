"""Stage 2, parse & validate: the JSON body and what the gateway needs from it.

Only what the gateway itself relies on is checked here (model, messages, input, stream,
max tokens, n); everything else is the upstream's to judge, and passes through."""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..errors import bad_request, unsupported_media_type
from .context import RequestContext

MAX_N = 128


async def parse(ctx: RequestContext) -> None:
    ctype = ctx.headers.get(b"content-type", b"")
    if ctype.split(b";", 1)[0].strip().lower() != b"application/json":
        raise unsupported_media_type(ctype.decode("latin-1"))
    if ctx.read_body is not None:
        ctx.raw = await ctx.read_body()
    try:
        body = orjson.loads(ctx.raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON ({exc}).") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    ctx.body = body

    model = body.get("model")
    if model is None:
        raise bad_request("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' must be a non-empty string.", param="model")
    ctx.requested_model = model

    if ctx.endpoint == "chat":
        _chat(ctx, body)
    else:
        _embeddings(body)

    ctx.end_user = end_user_of(ctx.headers.get(b"x-gateway-end-user"), body.get("user"))
    if not ctx.end_user and ctx.tenant is not None and ctx.tenant.end_users.required:
        raise bad_request(
            "This tenant bills every call to an end user: name one with the "
            "x-gateway-end-user header or the 'user' field.",
            param="user",
            code="end_user_required",
        )
    task = ctx.headers.get(b"x-gateway-task")
    meta = body.get("metadata")
    if task:
        ctx.task = task.decode("utf-8", "replace")[:128]
    elif isinstance(meta, dict) and isinstance(meta.get("task"), str):
        ctx.task = meta["task"][:128]


def _positive_int(body: dict[str, Any], name: str) -> None:
    v = body.get(name)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        # Echo numbers only: a string here may be prompt text, and this message is logged.
        got = repr(v) if isinstance(v, int | float) else _JSON_TYPES.get(type(v), "a value")
        raise bad_request(f"'{name}' must be a positive integer, got {got}.", param=name)


_JSON_TYPES: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}


def _chat(ctx: RequestContext, body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of messages.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(
                f"messages[{i}] must be an object with a string 'role'.", param=f"messages[{i}]"
            )
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    ctx.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("'stream_options' must be an object.", param="stream_options")
        ctx.include_usage = opts.get("include_usage") is True
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    asked = [body.get("max_completion_tokens"), body.get("max_tokens")]
    ctx.requested_max = min((v for v in asked if v is not None), default=None)
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N):
        raise bad_request(f"'n' must be an integer from 1 to {MAX_N}.", param="n")


def _embeddings(body: dict[str, Any]) -> None:
    inp = body.get("input")
    if isinstance(inp, str):
        return
    if isinstance(inp, list) and inp and all(isinstance(x, str | int | list) for x in inp):
        return
    raise bad_request(
        "'input' must be a string, an array of strings, or an array of token arrays.",
        param="input",
    )


END_USER_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
END_USER_RULE = "1 to 128 characters: letters, digits and . _ : @ + = -"


def valid_end_user(value: str) -> bool:
    return END_USER_ID.fullmatch(value) is not None


def end_user_of(header: bytes | None, user: object) -> str:
    """The end user a call names: the x-gateway-end-user header, else OpenAI's ``user``
    field; '' if neither. A malformed id is refused rather than guessed at."""
    if header:
        value, param = header.decode("utf-8", "replace"), "x-gateway-end-user"
    elif user is None or user == "":
        return ""
    elif isinstance(user, str):
        value, param = user, "user"
    else:
        raise bad_request("'user' must be a string.", param="user", code="invalid_end_user")
    if not valid_end_user(value):
        raise bad_request(
            f"Invalid end user id {value[:64]!r} in {param}: an end user id is {END_USER_RULE}.",
            param=param,
            code="invalid_end_user",
        )
    return value
