"""Provider capacity: per-provider ``rpm``/``tpm`` limits that protect the account.

Each provider with limits has two token buckets (requests, tokens) refilling per
minute. A request that finds capacity goes straight through. Otherwise it waits in a
queue that is fair across tenants: each tenant has its own FIFO and the dispatcher
serves tenants round-robin, so one tenant's burst cannot starve the others. A request
waits at most ``max_queue_wait`` seconds; a full queue (``max_queue_size``) or an
expired wait gets 429 with ``Retry-After``. Limits apply per gateway process."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from ..config.deployment import ProviderConfig
from ..pipeline.context import Responder, interruptible
from .errors import UpstreamError

if TYPE_CHECKING:
    from ..config.catalog import Model
    from ..pipeline.context import RequestContext


class CapacityExhausted(UpstreamError):
    retryable = False

    def __init__(self, provider: str, model: str, retry_after: float, why: str) -> None:
        super().__init__(
            429,
            f"The gateway's capacity for provider {provider!r} is exhausted ({why}); "
            f"retry in about {max(1, round(retry_after))}s.",
            code="upstream_capacity_exhausted",
            type="requests",
            provider=provider,
            model=model,
            retry_after=retry_after,
        )


class Bucket:
    """Refills at ``per_minute / 60`` per second and holds at most ``burst_seconds`` of
    refill, so a provider never sees more than that burst at once."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int, burst_seconds: float, now: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate


@dataclass(slots=True, eq=False)
class Waiter:
    tenant: str
    tokens: int
    future: asyncio.Future[None] = field(repr=False)


class ProviderCapacity:
    def __init__(
        self, name: str, cfg: ProviderConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self._clock = clock
        now = clock()
        self.requests = Bucket(cfg.rpm, cfg.burst_seconds, now) if cfg.rpm else None
        self.tokens = Bucket(cfg.tpm, cfg.burst_seconds, now) if cfg.tpm else None
        self.max_wait = cfg.max_queue_wait
        self.max_queue = cfg.max_queue_size
        self._queues: dict[str, deque[Waiter]] = {}
        self._order: deque[str] = deque()
        self.waiting = 0
        self._timer: asyncio.TimerHandle | None = None

    def _wait_needed(self, tokens: int, now: float) -> float:
        wait = 0.0
        for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
            if bucket is not None:
                bucket.refill(now)
                wait = max(wait, bucket.wait_for(amount))
        return wait

    def _take(self, tokens: int) -> None:
        if self.requests is not None:
            self.requests.level -= 1
        if self.tokens is not None:
            self.tokens.level -= min(tokens, self.tokens.capacity)

    def give_back(self, tokens: int) -> None:
        if self.tokens is not None and tokens > 0:
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + tokens)

    async def acquire(self, tenant: str, tokens: int, model: str) -> None:
        now = self._clock()
        if not self.waiting and self._wait_needed(tokens, now) == 0:
            self._take(tokens)
            return
        if self.waiting >= self.max_queue:
            raise CapacityExhausted(
                self.name, model, self._wait_needed(tokens, now) + 1, "the wait queue is full"
            )
        waiter = Waiter(tenant, tokens, asyncio.get_running_loop().create_future())
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
        if not queue:
            self._order.append(tenant)
        queue.append(waiter)
        self.waiting += 1
        self._dispatch()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.max_wait)
        except TimeoutError:
            if not waiter.future.done():
                self._remove(waiter)
                waiter.future.cancel()
                raise CapacityExhausted(
                    self.name,
                    model,
                    max(self._wait_needed(tokens, self._clock()), 1.0),
                    f"waited {self.max_wait:g}s for a slot",
                ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.give_back(tokens)  # granted just as the caller went away
            else:
                self._remove(waiter)
                waiter.future.cancel()
            raise

    def _remove(self, waiter: Waiter) -> None:
        queue = self._queues.get(waiter.tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.waiting -= 1
            if not queue:
                self._order.remove(waiter.tenant)

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._order:
            tenant = self._order[0]
            queue = self._queues[tenant]
            head = queue[0]
            wait = self._wait_needed(head.tokens, self._clock())
            if wait > 0:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(wait, self._dispatch)
                return
            self._take(head.tokens)
            queue.popleft()
            self.waiting -= 1
            self._order.popleft()
            if queue:
                self._order.append(tenant)  # round-robin: this tenant goes to the back
            head.future.set_result(None)


class _Slot:
    __slots__ = ("_cap", "_ctx", "_model", "_out", "_tokens")

    def __init__(
        self, cap: ProviderCapacity, ctx: RequestContext, model: Model, out: Responder
    ) -> None:
        self._cap = cap
        self._ctx = ctx
        self._model = model
        self._out = out
        self._tokens = ctx.admitted_tokens

    async def __aenter__(self) -> None:
        await interruptible(
            self._out, self._cap.acquire(self._ctx.tenant_name, self._tokens, self._model.name)
        )

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        u = self._ctx.usage
        used = (u.prompt_tokens + u.completion_tokens) if u is not None else 0
        self._cap.give_back(self._tokens - used)


class _NoLimit:
    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_NO_LIMIT = _NoLimit()


class Capacity:
    def __init__(self, providers: dict[str, ProviderConfig]) -> None:
        self._by_provider = {
            name: ProviderCapacity(name, cfg)
            for name, cfg in providers.items()
            if cfg.rpm is not None or cfg.tpm is not None
        }

    def slot(self, ctx: RequestContext, model: Model, out: Responder) -> _Slot | _NoLimit:
        """Wait for capacity (interruptibly: a client that leaves stops waiting)."""
        cap = self._by_provider.get(model.provider)
        return _NO_LIMIT if cap is None else _Slot(cap, ctx, model, out)

    def get(self, provider: str) -> ProviderCapacity | None:
        return self._by_provider.get(provider)
