"""Run the fake on its own, e.g. for load tests: ``PYTHONPATH=tests python -m fake_upstream
--port 8900 --api-key sk-provider --latency 0.05``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .server import FakeUpstream


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeUpstream(api_key=args.api_key, latency=args.latency, host=args.host, port=args.port)
    async with fake:
        print(f"fake upstream at {fake.base_url}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="fake_upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop  # optional, and faster
        except ImportError:
            asyncio.run(_serve(args))
        else:
            uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
