"""Stage 3, route: requested name -> concrete model, its fallback chain and the reason.

A name is a routed virtual model from the policy (ordered rules, first match wins, then
the default), an alias, or a concrete model. The tenant's allow-list is checked on the
name it asked for. When the tenant's budget runs low, its policy may map premium models
to cheap ones (``downgrade``); the reason says so. Prompt tokens are counted here
because rules can depend on them; later stages reuse the count."""

from __future__ import annotations

import asyncio
from typing import Any

from ..config.catalog import Catalog, Model
from ..config.snapshot import Route, Rule, Tenant
from ..errors import bad_request, model_not_allowed, model_not_found
from ..tokens import PromptInfo
from .context import RequestContext, RouteDecision

_MAX_LISTED = 25


def _listing(names: list[str]) -> str:
    shown = sorted(names)[:_MAX_LISTED]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" (and {more} more)" if more > 0 else "")


def visible_models(catalog: Catalog, routes: dict[str, Route] | Any, tenant: Tenant) -> list[str]:
    names = [*catalog.models, *catalog.aliases, *routes]
    if tenant.allowed is not None:
        names = [n for n in names if n in tenant.allowed]
    return names


# A prompt this large is counted in a thread: tiktoken releases the GIL, and a megabyte
# of text (about 70 ms of encoding) must not stall every other request on the loop.
OFFLOAD_BYTES = 64 * 1024


async def measure_prompt(ctx: RequestContext, model: Model) -> PromptInfo:
    if len(ctx.raw) > OFFLOAD_BYTES:
        return await asyncio.to_thread(count_prompt, ctx, model)
    return count_prompt(ctx, model)


def count_prompt(ctx: RequestContext, model: Model) -> PromptInfo:
    tokens = ctx.runtime.tokens
    if ctx.endpoint == "chat":
        return tokens.chat_prompt(
            ctx.body, model.upstream_model, model.encoding, model.image_tokens
        )
    n = tokens.embedding_input(ctx.body.get("input"), model.upstream_model, model.encoding)
    return PromptInfo(tokens=n)


def requested_max_output(ctx: RequestContext) -> int | None:
    return ctx.requested_max


def latest_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or ()):
        if isinstance(msg, dict) and msg.get("role") == "user":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return "\n".join(
                    p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            return ""
    return ""


def matches(rule: Rule, ctx: RequestContext, prompt: PromptInfo) -> bool:
    w = rule.when
    if w.prompt_tokens_gt is not None and not prompt.tokens > w.prompt_tokens_gt:
        return False
    if w.prompt_tokens_lte is not None and not prompt.tokens <= w.prompt_tokens_lte:
        return False
    if w.max_output_gt is not None or w.max_output_lte is not None:
        req = requested_max_output(ctx)
        if req is None:
            return False
        if w.max_output_gt is not None and not req > w.max_output_gt:
            return False
        if w.max_output_lte is not None and not req <= w.max_output_lte:
            return False
    if w.has_tools is not None and prompt.has_tools != w.has_tools:
        return False
    if w.has_images is not None and (prompt.images > 0) != w.has_images:
        return False
    if w.has_response_format is not None and prompt.has_response_format != w.has_response_format:
        return False
    if w.task is not None and ctx.task not in w.task:
        return False
    if w.tenant is not None and ctx.tenant_name not in w.tenant:
        return False
    return not (rule.regex is not None and not rule.regex.search(latest_user_text(ctx.body)))


async def route(ctx: RequestContext) -> None:
    rt = ctx.runtime
    catalog = rt.catalog
    tenant = ctx.tenant
    assert tenant is not None
    name = ctx.requested_model
    virtual = ctx.policy.routes.get(name)

    if virtual is None and not catalog.known(name):
        raise model_not_found(
            f"The model {name!r} does not exist on this gateway. Available: "
            f"{_listing(visible_models(catalog, ctx.policy.routes, tenant))}."
        )
    if tenant.allowed is not None and name not in tenant.allowed:
        allowed = _listing(list(tenant.allowed))
        raise model_not_allowed(f"Model {name!r} is not allowed for your key. Allowed: {allowed}.")

    if virtual is not None:
        default_model = catalog.resolve(virtual.default)
        assert default_model is not None
        prompt = await measure_prompt(ctx, default_model)
        target, reason, label = virtual.default, f"{name}/default", f"{name}/default"
        for rule in virtual.rules:
            if matches(rule, ctx, prompt):
                target, reason, label = rule.use, f"{name}/{rule.name}", f"{name}/{rule.name}"
                break
        model = catalog.resolve(target)
        assert model is not None
    else:
        model = catalog.resolve(name)
        assert model is not None
        prompt = await measure_prompt(ctx, model)
        reason = label = "direct" if name in catalog.models else f"alias:{name}"

    kind = "chat" if ctx.endpoint == "chat" else "embedding"
    if model.kind != kind:
        where = "/v1/chat/completions" if model.kind == "chat" else "/v1/embeddings"
        raise bad_request(
            f"Model {name!r} is a {model.kind} model; send it to {where}.", param="model"
        )

    model, reason, label = _downgrade(ctx, model, reason, label)
    ctx.prompt = prompt
    ctx.route = RouteDecision(model=model, chain=catalog.chain(model), reason=reason, label=label)
    ctx.model = model


def _downgrade(
    ctx: RequestContext, model: Model, reason: str, label: str
) -> tuple[Model, str, str]:
    tenant = ctx.tenant
    assert tenant is not None
    dg = tenant.downgrade
    if dg is None or model.name not in dg.map:
        return model, reason, label
    share = ctx.runtime.budget_share_remaining(tenant)
    if share is None or share >= dg.below_share:
        return model, reason, label
    cheaper = ctx.runtime.catalog.resolve(dg.map[model.name])
    if cheaper is None or cheaper.kind != model.kind:
        return model, reason, label
    return cheaper, f"{reason};downgrade:{model.name}->{cheaper.name}", "downgrade"
