"""The deployment config (``config/gateway.yaml``): where the gateway listens, where its
state lives, which providers and models exist and what they cost."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ..money import MAX_EXACT_NANOS, MoneyError, Price, usd_to_nanos

KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
KeyHash = Annotated[str, Field(pattern=KEY_HASH_PATTERN)]
Name = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
]
PositiveFloat = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    """Every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class Timeouts(Strict):
    """Upstream timeouts in seconds. There is deliberately no total limit on a stream:
    it may run as long as chunks keep arriving within ``idle``."""

    connect: PositiveFloat = 5.0
    first_byte: PositiveFloat = 60.0
    idle: PositiveFloat = 60.0
    non_stream: PositiveFloat = 600.0


class Retries(Strict):
    max_attempts: int = Field(default=3, ge=1, le=10)
    backoff_base: PositiveFloat = 0.25
    backoff_max: PositiveFloat = 8.0
    retry_after_max: PositiveFloat = 30.0


class Breaker(Strict):
    failure_threshold: int = Field(default=5, ge=1)
    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    min_requests: int = Field(default=20, ge=1)
    window_seconds: PositiveFloat = 30.0
    open_seconds: PositiveFloat = 15.0


class ProviderConfig(Strict):
    type: Literal["openai", "mock"] = "openai"
    base_url: str | None = None
    api_key: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # TLS: verify the upstream's certificate against the system's CAs, or this CA file
    # (a private CA for a self-hosted vLLM, say). tls_verify: false is for tests only.
    tls_ca_file: str | None = None
    tls_verify: bool = True
    # http://[user:password@]host:port: connections go through this HTTP proxy (CONNECT
    # tunnels, TLS to the upstream inside them). Empty (an unset ${HTTPS_PROXY:-}): none.
    proxy: SecretStr | None = None
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    breaker: Breaker = Breaker()
    max_connections: int = Field(default=512, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    # The most a provider sees at once: this many seconds' worth of rpm/tpm.
    burst_seconds: PositiveFloat = 1.0
    max_queue_wait: PositiveFloat = 10.0
    max_queue_size: int = Field(default=1000, ge=1)
    # The mock provider's simulated latency, for demos and benchmarks.
    mock_latency_ms: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _needs_base_url(self) -> ProviderConfig:
        if self.type == "openai" and not self.base_url:
            raise ValueError("an 'openai' provider needs a base_url")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        from ..upstream.rawhttp import parse_proxy  # imported only when a proxy is set

        parse_proxy(v.get_secret_value())  # its errors never hold the credentials
        return v


class PriceConfig(Strict):
    """USD per 1M tokens."""

    input: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    output: Decimal = Field(default=Decimal(0), ge=0)

    _exact = field_validator("input", "cached_input", "output", mode="before")(
        lambda cls, v: exact_usd(v)
    )

    def to_price(self) -> Price:
        return Price.from_usd_per_million(
            str(self.input),
            str(self.output),
            None if self.cached_input is None else str(self.cached_input),
        )


class ModelConfig(Strict):
    provider: str
    upstream_model: str | None = None
    kind: Literal["chat", "embedding"] = "chat"
    tier: Literal["cheap", "premium"] = "cheap"
    price: PriceConfig
    # Cap sent upstream when a chat request sets no max_tokens; also the reservation's
    # worst case for output.
    max_output_tokens: int = Field(default=4096, ge=1)
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    encoding: str | None = None
    # Worst-case prompt tokens counted for each image part, for the reservation.
    image_tokens: int = Field(default=1600, ge=0)
    fallbacks: list[str] = Field(default_factory=list)


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    log_prompts: bool = False
    access_log: bool = True


class MetricsConfig(Strict):
    enabled: bool = True
    # prometheus-client multiprocess directory for --workers > 1; default: a fresh temp dir.
    multiproc_dir: str | None = None


class LedgerConfig(Strict):
    # "normal" survives kill -9 (WAL); "full" also survives power loss, at an fsync per batch.
    sync: Literal["normal", "full"] = "normal"


class ReservationConfig(Strict):
    # A reservation not settled within this lease (process died) stops counting. Long
    # requests renew their lease while they run.
    lease_seconds: int = Field(default=300, ge=5)


class IdempotencyConfig(Strict):
    ttl_seconds: int = Field(default=86_400, ge=1)
    wait_seconds: PositiveFloat = 30.0


class CacheConfig(Strict):
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    single_flight_wait_seconds: PositiveFloat = 120.0


class TokenizerConfig(Strict):
    cache_dir: str | None = None
    load_timeout_seconds: PositiveFloat = 10.0


class RequestLimits(Strict):
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class GatewayConfig(Strict):
    version: Literal[1]
    listen: Listen = Listen()
    workers: int = Field(default=1, ge=1, le=64)
    state: str = "sqlite:///./data/gateway.db"
    # Prefix of every Redis key (state: redis://): gateways sharing a Redis and a prefix
    # share budgets; another prefix is another, separate deployment.
    redis_key_prefix: str = Field(default="gw", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    admin_keys: list[KeyHash] = Field(default_factory=list)
    policies: str = "../policies"
    requests: RequestLimits = RequestLimits()
    reservations: ReservationConfig = ReservationConfig()
    ledger: LedgerConfig = LedgerConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    cache: CacheConfig = CacheConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    providers: dict[Name, ProviderConfig]
    models: dict[Name, ModelConfig]
    aliases: dict[Name, str] = Field(default_factory=dict)

    @field_validator("state")
    @classmethod
    def _state_url(cls, v: str) -> str:
        if not v.startswith(("sqlite://", "redis://", "rediss://", "memory://")):
            raise ValueError(
                "state must be sqlite:///path, memory:// or redis://host:port/db, got " + repr(v)
            )
        if v.startswith(("redis://", "rediss://")):
            from ..state.redis import check_url  # imported only for a Redis URL

            check_url(v)
        return v

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        problems: list[str] = []
        for name, model in self.models.items():
            if model.provider not in self.providers:
                problems.append(
                    f"models.{name}.provider: unknown provider {model.provider!r} "
                    f"(known: {', '.join(sorted(self.providers))})"
                )
            for fb in model.fallbacks:
                if fb not in self.models:
                    problems.append(f"models.{name}.fallbacks: unknown model {fb!r}")
                elif fb == name:
                    problems.append(f"models.{name}.fallbacks: a model cannot fall back to itself")
                elif self.models[fb].kind != model.kind:
                    problems.append(
                        f"models.{name}.fallbacks: {fb!r} is a {self.models[fb].kind} model, "
                        f"{name!r} is a {model.kind} model"
                    )
        for alias, target in self.aliases.items():
            if alias in self.models:
                problems.append(f"aliases.{alias}: the name is already a model")
            if target not in self.models:
                problems.append(f"aliases.{alias}: unknown model {target!r}")
        if self.workers > 1 and not self.state.startswith(("redis://", "rediss://")):
            problems.append(
                "workers: several worker processes need shared state; "
                "set state to a redis:// URL or use workers: 1"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def exact_usd(v: object, *, budget: bool = False) -> object:
    """Validate (before parsing) that a USD amount is exact to the nano-dollar; floats
    from YAML are read through their shortest repr (0.15, not 0.1499999...)."""
    if v is None:
        return v
    if isinstance(v, float):
        v = repr(v)
    try:
        nanos = usd_to_nanos(v)  # type: ignore[arg-type]
    except MoneyError as exc:
        raise ValueError(str(exc)) from exc
    if budget and nanos >= MAX_EXACT_NANOS:
        raise ValueError("budgets above $9,007,199 per window cannot be enforced exactly")
    return v
