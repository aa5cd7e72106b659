"""The one settings object: gateway.yaml (path from JOBGATE_CONFIG), overridden by environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator, model_validator

from gateway_core.errors import ConfigError

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# Environment variables that override a key of gateway.yaml.
ENV_OVERRIDES = {
    "DATABASE_URL": "database_url",
    "REDIS_URL": "redis_url",
    "CELERY_BROKER_URL": "broker_url",
    "JOBGATE_ZONE": "gateway.zone",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: HttpUrl
    weight: int = Field(default=1, ge=1, le=1000)
    max_concurrency: int = Field(default=4, ge=1, le=10_000)
    timeout: float = Field(default=30.0, gt=0, le=3600, description="seconds allowed for one attempt")
    zone: str | None = Field(default=None, max_length=64, description="where it runs; workers prefer their own zone")
    tags: list[str] = Field(default_factory=list, description="free-form labels, shown in the ops views")

    @property
    def base_url(self) -> str:
        return str(self.url).rstrip("/")


class PricingConfig(_Strict):
    """Credits per unit: ``credits = max(minimum, int(units * rate + 0.5))`` (seed 003's formula for audio)."""

    unit: Literal["job", "audio_second", "token"] = "job"
    rate: float = Field(default=1.0, ge=0)
    minimum: int = Field(default=1, ge=0)


class CircuitConfig(_Strict):
    """Per-replica circuit breaker fed by real traffic (passive outlier detection, Envoy/LiteLLM style)."""

    failure_threshold: int = Field(default=5, ge=1, le=1000, description="consecutive failures that open it")
    cooldown_seconds: float = Field(default=5.0, gt=0, le=3600, description="open this long, then half-open")
    error_rate_threshold: float | None = Field(
        default=0.5, gt=0, le=1, description="share of failed jobs in a window that opens it; off when null"
    )
    window_seconds: float = Field(default=30.0, gt=0, le=3600, description="the error-rate window")
    min_requests: int = Field(default=10, ge=1, le=100_000, description="jobs in the window before the rate counts")


class ServiceConfig(_Strict):
    kind: Literal["transcribe", "codegen"] = Field(description="which request schema the service takes")
    pricing: PricingConfig = PricingConfig()
    cost_weight: int = Field(default=1, ge=1, le=1000, description="rate-limit units one submit consumes")
    rate_limit: str | None = Field(default=None, description="per-tenant limit on this endpoint, e.g. '5/second'")
    enabled: bool = True
    queue: str | None = Field(default=None, description="Celery queue; svc.<service> when omitted")
    max_attempts: int = Field(default=3, ge=1, le=20)
    # Each delay waits as the job's next_attempt_at in PostgreSQL (the sweeper sends it when due), not in the
    # broker: no bound from the visibility timeout.
    retry_schedule_seconds: list[Annotated[float, Field(ge=0, le=86400)]] = Field(
        default_factory=lambda: [5.0, 15.0, 45.0],
        min_length=1,
        description="delay before each retry on another replica (seed 003: 5 s, 15 s, 45 s), jittered; "
        "the last one repeats",
    )
    strategy: Literal["least_outstanding", "weighted_round_robin", "consistent_hash"] = Field(
        default="least_outstanding",
        description="least outstanding requests per weight; smooth weighted round-robin; or a hash ring on the "
        "tenant (affinity, minimal reshuffling)",
    )
    deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="a job not done this long after submit fails with DEADLINE_EXCEEDED (holds and retries "
        "included); no overall deadline when unset",
    )
    circuit: CircuitConfig | None = Field(default=None, description="this service's breaker; gateway.circuit if unset")
    max_hold_seconds: float = Field(
        default=600, ge=0, le=86400, description="how long a job may wait HELD for a replica before it fails"
    )
    replicas: list[ReplicaConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_replica_names(self) -> ServiceConfig:
        names = [r.name for r in self.replicas]
        if len(names) != len(set(names)):
            raise ValueError(f"replica names must be unique, got {names}")
        return self


def _check_limit(value: str) -> str:
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a rate limit like '10/minute;100/hour'") from None
    return value


class TierConfig(_Strict):
    """What a tenant of a tier may do (seed 001 / 002); a tenant's own overrides win where set."""

    rate_limit: str = Field(description="submits per window, ';'-separated, weighted by the service's cost_weight")
    read_rate_limit: str = Field(
        default="600/minute",
        description="reads (polls, lists, cancels, credits) per window, a budget apart from the submits",
    )
    concurrency: int = Field(ge=1, le=100_000, description="jobs QUEUED, HELD, DISPATCHED or PROCESSING at once")
    daily_credits: int | None = Field(default=None, ge=0)
    monthly_credits: int | None = Field(default=None, ge=0)
    daily_jobs: int | None = Field(default=None, ge=0)
    monthly_jobs: int | None = Field(default=None, ge=0)

    @field_validator("rate_limit", "read_rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        return _check_limit(value)


DEFAULT_TIERS = {
    # Reads: a free client may poll its two jobs every second; pro and enterprise ten and a hundred times that.
    "free": TierConfig(rate_limit="10/minute;100/hour;1000/day", read_rate_limit="120/minute", concurrency=2),
    "pro": TierConfig(rate_limit="100/minute;1000/hour;100000/day", read_rate_limit="1200/minute", concurrency=10),
    "enterprise": TierConfig(
        rate_limit="1000/minute;10000/hour;1000000/day", read_rate_limit="12000/minute", concurrency=50
    ),
}


class RateLimitConfig(_Strict):
    enabled: bool = True
    global_limit: str | None = Field(default="10000/second", description="all tenants together")
    read_cost: int = Field(default=1, ge=1, le=1000, description="units of the read budget a read consumes")
    # When Redis cannot be reached the limits still hold per process (flask-limiter's in-memory fallback);
    # admission never depends on Redis for credits, which live in the database.
    in_memory_fallback: bool = True

    @field_validator("global_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        return _check_limit(value) if value else value


class HealthConfig(_Strict):
    """Active probes of every replica's /health, from beat (seed 002's thresholds)."""

    interval_seconds: float = Field(default=5.0, gt=0, le=600)
    timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)
    healthy_threshold: int = Field(default=2, ge=1, le=100)


class SmtpConfig(_Strict):
    host: str
    port: int = Field(default=25, ge=1, le=65535)
    sender: str = Field(description="From: address")
    to: list[str] = Field(min_length=1)
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)


class AlertsConfig(_Strict):
    """Admin alerts over email and a JSON webhook (Slack-compatible), one per service and kind per window."""

    smtp: SmtpConfig | None = None
    webhook_url: HttpUrl | None = None
    window_seconds: float = Field(default=300, gt=0, le=86400)
    held_age_seconds: float = Field(default=300, gt=0, le=86400, description="alert on jobs HELD this long")


class GatewayConfig(_Strict):
    zone: str | None = Field(
        default=None, max_length=64, description="this process's zone (JOBGATE_ZONE): its replicas are preferred"
    )
    max_body_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    audio_fetch_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Fetching audio_url from loopback or private ranges is an SSRF hole in production;
    # the embedded stack and the tests serve audio from 127.0.0.1 and turn this on.
    allow_private_audio_urls: bool = False
    visibility_timeout_seconds: int = Field(default=120, ge=5, le=43200)
    # The one scheduler of delayed work (unsent jobs, backoff retries, holds, lost messages): how late a due job
    # may be sent.
    sweep_interval_seconds: float = Field(default=1.0, gt=0, le=600)
    sweep_unsent_after_seconds: float = Field(default=10.0, ge=0, le=3600)
    resend_lost_after_seconds: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description="a job sent this long ago and not moved since, whose message no live worker holds while its "
        "queue is empty, lost its message: it is sent again",
    )
    lease_margin_seconds: float = Field(default=15.0, ge=1, le=3600)
    publish_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # A held job is retried after this long (doubling up to hold_retry_max_seconds), from PostgreSQL by beat.
    hold_retry_seconds: float = Field(default=1.0, gt=0, le=600)
    hold_retry_max_seconds: float = Field(default=5.0, gt=0, le=3600)
    health: HealthConfig = HealthConfig()
    circuit: CircuitConfig = CircuitConfig()


DATABASE_URL_FORMS = "postgresql://, postgres:// or postgresql+psycopg2://"


def normalize_database_url(url: str) -> str:
    """The URL with the driver this project ships (psycopg2): ``postgresql://`` and ``postgres://``, as Docker,
    Heroku and libpq write them, mean PostgreSQL through psycopg2 (SQLAlchemy alone would pick psycopg 3)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres", "postgresql+psycopg2"):
        raise ValueError(f"database_url must be a PostgreSQL URL ({DATABASE_URL_FORMS}), got {scheme + sep!r}")
    return f"postgresql+psycopg2://{rest}"


class Settings(_Strict):
    # When neither gateway.yaml nor the environment names them, `jobgate` commands use the embedded database
    # and Redis of their data dir (see ``model_fields_set``); these defaults are for processes started alone.
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/jobgate"
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = Field(default=None, description="Celery broker; redis_url when omitted")
    gateway: GatewayConfig = GatewayConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    alerts: AlertsConfig = AlertsConfig()
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    services: dict[str, ServiceConfig] = Field(min_length=1)

    @field_validator("database_url")
    @classmethod
    def _postgresql(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("services")
    @classmethod
    def _service_names(cls, services: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        for name in services:
            if not SERVICE_NAME.match(name):
                raise ValueError(f"service name {name!r} must match {SERVICE_NAME.pattern}")
        return services

    @field_validator("tiers")
    @classmethod
    def _all_tiers(cls, tiers: dict[str, TierConfig]) -> dict[str, TierConfig]:
        unknown = set(tiers) - set(DEFAULT_TIERS)
        if unknown:
            raise ValueError(f"unknown tier(s) {sorted(unknown)}; tiers are {sorted(DEFAULT_TIERS)}")
        return {**DEFAULT_TIERS, **tiers}

    @field_validator("services")
    @classmethod
    def _endpoint_limits(cls, services: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        for svc in services.values():
            if svc.rate_limit:
                _check_limit(svc.rate_limit)
        return services

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    def circuit_for(self, service: str) -> CircuitConfig:
        return self.services[service].circuit or self.gateway.circuit

    def queue_for(self, service: str) -> str:
        return self.services[service].queue or f"svc.{service}"

    @property
    def queues(self) -> list[str]:
        return sorted({self.queue_for(name) for name in self.services})

    def replica_slots(self, queue: str) -> int:
        """How many replica calls the services read from ``queue`` can run at once (Σ max_concurrency)."""
        return sum(
            rep.max_concurrency
            for name, svc in self.services.items()
            if self.queue_for(name) == queue
            for rep in svc.replicas
        )

    def dispatch_concurrency(self, queue: str) -> int:
        """Jobs one dispatch worker on ``queue`` takes at once: its replicas' slots and a quarter more, so that
        when a call ends a job already taken from the broker is waiting for the slot it frees."""
        slots = self.replica_slots(queue)
        return max(1, slots + -(-slots // 4))


def _describe(err: Mapping[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if not key:  # a rule across keys: its message names them
        return str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "value_error":  # our own check: its message says what was wrong (URLs are not echoed)
        return f"{key}: {str(err['msg']).removeprefix('Value error, ')}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def parse_settings(data: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: str = "") -> Settings:
    """Validate a config mapping with environment overrides; ConfigError names each bad key and value."""
    merged = dict(data)
    for var, key in ENV_OVERRIDES.items():
        if environ and environ.get(var):
            section, _, name = key.rpartition(".")
            if section:
                merged[section] = {**(merged.get(section) or {}), name: environ[var]}
            else:
                merged[key] = environ[var]
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration{' in ' + source if source else ''}:\n  {lines}") from None


PACKAGED_CONFIG = Path(__file__).with_name("gateway.yaml")


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """JOBGATE_CONFIG when set; else ./gateway.yaml when the working directory has one; else the default
    configuration shipped with the package (two reference replicas per service on 127.0.0.1)."""
    env = os.environ if environ is None else environ
    if env.get("JOBGATE_CONFIG"):
        return Path(env["JOBGATE_CONFIG"])
    local = Path("gateway.yaml")
    return local if local.is_file() else PACKAGED_CONFIG


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the configuration file (``config_path``) and apply DATABASE_URL, REDIS_URL, CELERY_BROKER_URL."""
    env = os.environ if environ is None else environ
    file = Path(path) if path else config_path(env)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a mapping at the top level")
    return parse_settings(data, env, source=str(file))
