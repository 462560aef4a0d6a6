"""Stage 9, record: the ledger row of a request that reserved nothing (rejected before
admission), Prometheus, and one structured log line per request."""

from __future__ import annotations

import logging

from ..state.base import StateUnavailable
from .context import RequestContext
from .settle import ledger_row

log = logging.getLogger("gateway.pipeline")


async def record(ctx: RequestContext) -> None:
    rt = ctx.runtime
    if ctx.row is None and ctx.tenant is not None:
        ctx.row = ledger_row(ctx)
        try:
            await rt.state.record(ctx.row)
        except StateUnavailable as exc:
            rt.metrics.ledger_failure()
            log.error("ledger row for request %s was not written: %s", ctx.request_id, exc)
    if rt.metrics_enabled:
        rt.metrics.observe(ctx)
    rt.access_log.write(ctx)
