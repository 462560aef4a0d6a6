"""The policy snapshot: every policy file compiled into one immutable object.

A request takes the snapshot current when it starts and keeps it to the end, so a reload
never changes the rules under a request in flight."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from ..money import usd_to_nanos
from .catalog import Catalog
from .errors import ConfigError, format_problem
from .policy import Budgets, CachePolicy, Condition, Downgrade, Limits, PolicyFile


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """Nano-dollar limits per window; ``None`` means no limit for that window."""

    daily: int | None = None
    monthly: int | None = None
    total: int | None = None

    def items(self) -> list[tuple[str, int]]:
        return [
            (w, v)
            for w, v in (("daily", self.daily), ("monthly", self.monthly), ("total", self.total))
            if v is not None
        ]

    @property
    def any(self) -> bool:
        return self.daily is not None or self.monthly is not None or self.total is not None


@dataclass(frozen=True, slots=True)
class EndUserDefaults:
    """The tenant's ``end_users`` policy, compiled."""

    budgets: BudgetLimits = field(default_factory=BudgetLimits)
    limits: Limits = field(default_factory=Limits)
    prepaid: bool = False
    required: bool = False


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    budgets: BudgetLimits
    limits: Limits
    allowed: frozenset[str] | None
    cache: CachePolicy
    on_budget_exceeded: str
    clamp_min_tokens: int
    downgrade: Downgrade | None
    hit_charge: Decimal
    end_users: EndUserDefaults = field(default_factory=EndUserDefaults)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: Condition
    use: str
    regex: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    rules: tuple[Rule, ...]
    default: str


@dataclass(frozen=True, slots=True)
class Policy:
    tenants: Mapping[str, Tenant]
    # sha256 digest of a tenant key (raw 32 bytes) -> tenant
    keys: Mapping[bytes, Tenant]
    routes: Mapping[str, Route]
    # digest -> the key's own rate limits, for keys that have any
    key_limits: Mapping[bytes, Limits] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    digest: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)


def _nanos(v: Decimal | None) -> int | None:
    return None if v is None else usd_to_nanos(v)


def _budget_limits(b: Budgets) -> BudgetLimits:
    return BudgetLimits(_nanos(b.daily_usd), _nanos(b.monthly_usd), _nanos(b.total_usd))


def build_policy(files: list[tuple[Path, PolicyFile]], catalog: Catalog) -> Policy:
    """Compile policy files, checking every reference against the catalog."""
    problems: list[str] = []
    tenants: dict[str, Tenant] = {}
    keys: dict[bytes, Tenant] = {}
    key_limits: dict[bytes, Limits] = {}
    routes: dict[str, Route] = {}
    key_owner: dict[bytes, str] = {}
    tenant_file: dict[str, Path] = {}
    route_file: dict[str, Path] = {}
    digest = hashlib.sha256()

    for file, pf in files:
        digest.update(pf.model_dump_json().encode())
        for rname, r in pf.routes.items():
            where = ("routes", rname)
            if rname in route_file:
                problems.append(
                    format_problem(file, where, f"already defined in {route_file[rname]}")
                )
                continue
            if catalog.known(rname):
                problems.append(format_problem(file, where, "the name is already a model or alias"))
            route_file[rname] = file
            for i, rule in enumerate(r.rules):
                if not catalog.known(rule.use):
                    problems.append(
                        format_problem(
                            file, (*where, "rules", i, "use"), f"unknown model {rule.use!r}"
                        )
                    )
            if not catalog.known(r.default):
                problems.append(
                    format_problem(file, (*where, "default"), f"unknown model {r.default!r}")
                )
            routes[rname] = Route(
                name=rname,
                rules=tuple(
                    Rule(
                        name=rule.name,
                        when=rule.when,
                        use=rule.use,
                        regex=re.compile(rule.when.user_message_regex)
                        if rule.when.user_message_regex
                        else None,
                    )
                    for rule in r.rules
                ),
                default=r.default,
            )

    for file, pf in files:
        for tname, t in pf.tenants.items():
            where = ("tenants", tname)
            if tname in tenant_file:
                problems.append(
                    format_problem(file, where, f"already defined in {tenant_file[tname]}")
                )
                continue
            tenant_file[tname] = file
            if t.models is not None:
                for i, m in enumerate(t.models):
                    if not catalog.known(m) and m not in routes:
                        problems.append(
                            format_problem(
                                file, (*where, "models", i), f"unknown model or route {m!r}"
                            )
                        )
            if t.downgrade is not None:
                for src, dst in t.downgrade.map.items():
                    for name in (src, dst):
                        if not catalog.known(name):
                            problems.append(
                                format_problem(
                                    file,
                                    (*where, "downgrade", "map", src),
                                    f"unknown model {name!r}",
                                )
                            )
            eu = t.end_users
            tenant = Tenant(
                name=tname,
                budgets=_budget_limits(t.budgets),
                limits=t.limits,
                allowed=None if t.models is None else frozenset(t.models),
                cache=t.cache,
                on_budget_exceeded=t.on_budget_exceeded,
                clamp_min_tokens=t.clamp_min_tokens,
                downgrade=t.downgrade,
                hit_charge=t.cache.hit_charge,
                end_users=EndUserDefaults(
                    _budget_limits(eu.budgets), eu.limits, eu.prepaid, eu.required
                ),
            )
            tenants[tname] = tenant
            for i, entry in enumerate(t.keys):
                kh = entry if isinstance(entry, str) else entry.hash
                raw = bytes.fromhex(kh.removeprefix("sha256:"))
                if raw in key_owner:
                    problems.append(
                        format_problem(
                            file,
                            (*where, "keys", i),
                            f"this key already belongs to tenant {key_owner[raw]!r}",
                        )
                    )
                    continue
                key_owner[raw] = tname
                keys[raw] = tenant
                if not isinstance(entry, str) and entry.limits != Limits():
                    key_limits[raw] = entry.limits

    if problems:
        raise ConfigError(problems)
    return Policy(
        tenants=tenants,
        keys=keys,
        routes=routes,
        key_limits=key_limits,
        files=tuple(str(f) for f, _ in files),
        digest=digest.hexdigest()[:12],
    )
