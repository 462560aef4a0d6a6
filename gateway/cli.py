"""The ``gateway`` command: serve, check, keys, usage."""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import secrets
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from .config import ConfigError, load_config, load_policy
from .money import nanos_to_usd

KEY_PREFIX = "sk-gw-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    try:
        serve(args.config, args.host, args.port, args.workers)
    except ConfigError as exc:
        print(f"gateway: configuration is not valid:\n{exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.config)
        policy = load_policy(loaded)
    except ConfigError as exc:
        print(f"configuration is not valid ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    cfg = loaded.gateway
    print(f"{loaded.path}: OK")
    print(f"  state: {cfg.state}")
    print(f"  providers: {', '.join(sorted(cfg.providers))}")
    print(f"  models: {', '.join(sorted(cfg.models))}")
    if cfg.aliases:
        print(f"  aliases: {', '.join(f'{a} -> {t}' for a, t in sorted(cfg.aliases.items()))}")
    print(f"{loaded.policy_dir}: OK ({len(policy.files)} file(s))")
    print(f"  tenants: {', '.join(sorted(policy.tenants)) or '(none)'}")
    print(f"  routes: {', '.join(sorted(policy.routes)) or '(none)'}")
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    key = new_key()
    print(f"key for tenant {args.tenant!r} (give it to the tenant; it is not stored anywhere):")
    print(f"  {key}")
    print("add this line under the tenant's keys: in a policy file:")
    print(f'  - "{key_hash(key)}"')
    return 0


def cmd_keys_hash(args: argparse.Namespace) -> int:
    print(key_hash(args.key))
    return 0


def _since(value: str) -> int:
    units = {"m": 60, "h": 3600, "d": 86400}
    if value and value[-1] in units and value[:-1].isdigit():
        delta = timedelta(seconds=int(value[:-1]) * units[value[-1]])
        return int((datetime.now(UTC) - delta).timestamp() * 1000)
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {value!r}: give an ISO date/time or a duration like 24h, 7d"
        ) from None


async def _aggregate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .state import LedgerQuery, open_state

    loaded = load_config(args.config)
    state = open_state(loaded.gateway.state, loaded.gateway)
    await state.start()
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    try:
        cursor = None
        while True:
            page = await state.ledger(
                LedgerQuery(tenant=args.tenant, since_ms=args.since, limit=1000, cursor=cursor)
            )
            for r in page.rows:
                key = {"tenant": r.tenant, "model": r.model or "-", "route": r.route or "-"}[
                    args.by
                ]
                g = groups[key]
                g["requests"] += 1
                g["errors"] += 1 if r.status >= 400 else 0
                g["cache_hits"] += 1 if r.cache == "hit" else 0
                g["prompt_tokens"] += r.prompt_tokens
                g["completion_tokens"] += r.completion_tokens
                g["cost_nanos"] += r.cost
            cursor = page.next_cursor
            if cursor is None:
                break
    finally:
        await state.close()
    rows = []
    for key, g in sorted(groups.items(), key=lambda kv: -kv[1]["cost_nanos"]):
        rows.append(
            {
                args.by: key,
                **{k: v for k, v in g.items() if k != "cost_nanos"},
                "cost_usd": nanos_to_usd(g["cost_nanos"]),
            }
        )
    return rows


def cmd_usage(args: argparse.Namespace) -> int:
    try:
        rows = asyncio.run(_aggregate(args))
    except ConfigError as exc:
        print(f"configuration is not valid:\n{exc}", file=sys.stderr)
        return 1
    cols = [
        args.by,
        "requests",
        "errors",
        "cache_hits",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ]
    if args.format == "json":
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, 0) for c in cols})
        print(buf.getvalue(), end="")
    else:
        table = [cols] + [[str(r.get(c, 0)) for c in cols] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        for i, row in enumerate(table):
            print(
                "  ".join(
                    v.ljust(widths[j]) if j == 0 else v.rjust(widths[j]) for j, v in enumerate(row)
                )
            )
            if i == 0:
                print("  ".join("-" * w for w in widths))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway", description="A cost-aware OpenAI-compatible LLM gateway."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", required=True, help="path to gateway.yaml")
    s.add_argument("--host", help="listen address (overrides listen.host)")
    s.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    s.add_argument("--workers", type=int, help="worker processes (overrides workers; needs Redis)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate the config and the policy files")
    c.add_argument("--config", required=True)
    c.set_defaults(func=cmd_check)

    k = sub.add_parser("keys", help="tenant keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("new", help="make a new random key and its sha256 line")
    kn.add_argument("--tenant", required=True)
    kn.set_defaults(func=cmd_keys_new)
    kh = ksub.add_parser("hash", help="the sha256 line of an existing key")
    kh.add_argument("key")
    kh.set_defaults(func=cmd_keys_hash)

    u = sub.add_parser("usage", help="spend from the ledger, grouped")
    u.add_argument("--config", required=True)
    u.add_argument("--since", type=_since, default=None, help="ISO time or duration (24h, 7d)")
    u.add_argument("--tenant", default=None)
    u.add_argument("--by", choices=["tenant", "model", "route"], default="tenant")
    u.add_argument("--format", choices=["table", "csv", "json"], default="table")
    u.set_defaults(func=cmd_usage)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
