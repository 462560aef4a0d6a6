"""Policy files (``policies/*.yaml``): tenants and routed virtual models.

Operators edit these while the gateway runs; they are hot-reloaded."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .deployment import KeyHash, Name, Strict, exact_usd

Usd = Annotated[Decimal, Field(ge=0)]


class Budgets(Strict):
    """Spending limits in USD over UTC calendar windows; all that are set apply together."""

    daily_usd: Usd | None = None
    monthly_usd: Usd | None = None
    total_usd: Usd | None = None

    _exact = field_validator("daily_usd", "monthly_usd", "total_usd", mode="before")(
        lambda cls, v: exact_usd(v, budget=True)
    )


class Limits(Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    concurrent: int | None = Field(default=None, ge=1)


class CachePolicy(Strict):
    mode: Literal["off", "deterministic", "always"] = "deterministic"
    ttl_seconds: int = Field(default=3600, ge=1)
    # Share entries with every tenant that also sets shared: true (same models, same prompt).
    shared: bool = False
    # Share of the saved cost charged to the tenant on a hit (0 = hits are free).
    hit_charge: Decimal = Field(default=Decimal(0), ge=0, le=1)


class Downgrade(Strict):
    """When less than ``below_share`` of a budget window remains, use ``map[model]`` instead."""

    below_share: float = Field(gt=0, lt=1)
    map: dict[str, str]


class KeySpec(Strict):
    """A key with a name (for operators) and, optionally, rate limits of its own that
    apply on top of the tenant's."""

    hash: KeyHash
    name: str | None = Field(default=None, max_length=128)
    limits: Limits = Limits()


class EndUsersPolicy(Strict):
    """What applies to each of a tenant's own customers (end users, named on a call by
    ``x-gateway-end-user`` or the ``user`` field), on top of the tenant's own budgets and
    limits. ``prepaid``: calls are paid from the end user's balance of prepaid credits
    (topped up through ``POST /v1/gateway/end-users/{id}/credits``); an end user with no
    credits left is refused (402 ``insufficient_credits``)."""

    budgets: Budgets = Budgets()
    limits: Limits = Limits()
    prepaid: bool = False
    # Refuse calls that name no end user (400), e.g. when every call must be billed.
    required: bool = False


class TenantPolicy(Strict):
    keys: list[KeyHash | KeySpec] = Field(min_length=1)
    budgets: Budgets = Budgets()
    # reject: 402 when the worst case does not fit; clamp: lower max_tokens to what fits,
    # as long as at least clamp_min_tokens remain.
    on_budget_exceeded: Literal["reject", "clamp"] = "reject"
    clamp_min_tokens: int = Field(default=256, ge=1)
    limits: Limits = Limits()
    models: list[str] | None = None
    cache: CachePolicy = CachePolicy()
    downgrade: Downgrade | None = None
    end_users: EndUsersPolicy = EndUsersPolicy()


class Condition(Strict):
    """Everything listed must hold (AND). An empty condition always matches."""

    prompt_tokens_gt: int | None = Field(default=None, ge=0)
    prompt_tokens_lte: int | None = Field(default=None, ge=0)
    max_output_gt: int | None = Field(default=None, ge=0)
    max_output_lte: int | None = Field(default=None, ge=0)
    has_tools: bool | None = None
    has_images: bool | None = None
    has_response_format: bool | None = None
    task: list[str] | None = None
    user_message_regex: str | None = None
    tenant: list[str] | None = None

    @field_validator("task", "tenant", mode="before")
    @classmethod
    def _listify(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("user_message_regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return v


class RouteRule(Strict):
    name: Name
    when: Condition = Condition()
    use: str


class RoutedModel(Strict):
    rules: list[RouteRule] = Field(default_factory=list)
    default: str

    @model_validator(mode="after")
    def _unique_names(self) -> RoutedModel:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)
        return self


class PolicyFile(Strict):
    version: Literal[1]
    tenants: dict[Name, TenantPolicy] = Field(default_factory=dict)
    routes: dict[Name, RoutedModel] = Field(default_factory=dict)
