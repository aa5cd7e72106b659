"""SQLAlchemy 2 typed models: tenants, API keys, jobs and their events, the credits ledger, usage."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column, relationship

from gateway_core.states import ACTIVE, JobState

CONTENT_TYPE_LENGTH = 128  # an upload's Content-Type as stored; longer ones are refused at submit


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC: refuses naive datetimes, returns aware ones."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


# The predicate of the active-jobs index, literal; a query that says the same uses the index.
ACTIVE_SQL = text("state IN ({})".format(", ".join(f"'{s.value}'" for s in sorted(ACTIVE))))


def _state_enum() -> Enum:
    return Enum(
        JobState,
        name="job_state",
        native_enum=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("credits_balance >= 0", name="ck_tenants_balance_not_negative"),
        CheckConstraint("credits_reserved >= 0", name="ck_tenants_reserved_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    tier: Mapped[str] = mapped_column(String(16), default="free")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Spendable credits, and credits held by open reservations; both always equal sums over the ledger.
    credits_balance: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    credits_reserved: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Per-tenant overrides of the tier's limits (NULL: the tier decides).
    concurrency_limit: Mapped[int | None] = mapped_column(Integer, default=None)
    daily_credit_quota: Mapped[int | None] = mapped_column(BigInteger, default=None)
    monthly_credit_quota: Mapped[int | None] = mapped_column(BigInteger, default=None)
    daily_job_quota: Mapped[int | None] = mapped_column(Integer, default=None)
    monthly_job_quota: Mapped[int | None] = mapped_column(Integer, default=None)
    # Jobs and credits admitted in the current day and month (UTC), for quotas: the counters of the period
    # starting on usage_day / usage_month (a period that has ended counts as nothing; see gateway_core.usage).
    usage_day: Mapped[date | None] = mapped_column(Date, default=None)
    usage_day_jobs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    usage_day_credits: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    usage_month: Mapped[date | None] = mapped_column(Date, default=None)
    usage_month_jobs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    usage_month_credits: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """An API key, stored only as its SHA-256; the key itself is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_state_updated", "state", "updated_at"),
        # A tenant's jobs that hold a concurrency slot, counted at every admission: only those rows are
        # indexed, so the count stays as cheap as the cap is small, however many jobs the tenant has run.
        Index("ix_jobs_tenant_active", "tenant_id", postgresql_where=ACTIVE_SQL, sqlite_where=ACTIVE_SQL),
        Index("uq_jobs_tenant_idempotency_key", "tenant_id", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    service: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(_state_enum())
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    input_data: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, default=None))
    input_content_type: Mapped[str | None] = mapped_column(String(CONTENT_TYPE_LENGTH), default=None)
    audio_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Broker priority from the tenant's tier at submit: 0 first (enterprise), 3 (pro), 6 (free).
    priority: Mapped[int] = mapped_column(Integer, default=6, server_default="6")
    replica: Mapped[str | None] = mapped_column(String(64), default=None)
    # Until when the worker that moved the job in flight owns it; past it the sweeper re-sends the job.
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # A HELD job waits in the database, not the broker: since when, and when beat re-sends it.
    held_since: Mapped[datetime | None] = mapped_column(default=None)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the dispatch message was last handed to the broker; NULL means the sweeper must send it.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    credits_reserved: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    credits_charged: Mapped[int | None] = mapped_column(BigInteger, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )


class JobEvent(Base):
    """One state change of a job; appended in the same transaction that changes the job."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[JobState | None] = mapped_column(_state_enum(), default=None)
    to_state: Mapped[JobState] = mapped_column(_state_enum())
    replica: Mapped[str | None] = mapped_column(String(64), default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[dict[str, Any] | None] = mapped_column(default=None)

    job: Mapped[Job] = relationship(back_populates="events")


class CreditEntry(Base):
    """One movement of a tenant's credits. ``amount`` changes the spendable balance, ``reserved_change``
    the credits held for open jobs; the tenant's two columns are always the sums of these."""

    __tablename__ = "credit_entries"
    __table_args__ = (Index("ix_credit_entries_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    kind: Mapped[str] = mapped_column(String(16))  # grant reserve capture release refund adjustment
    amount: Mapped[int] = mapped_column(BigInteger)
    reserved_change: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    reserved_after: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeadLetter(Base):
    """A job that failed for good for a reason an operator can act on, with what it asked and every attempt."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_service_id", "service", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    service: Mapped[str] = mapped_column(String(64))
    error_code: Mapped[str] = mapped_column(String(64))
    error_message: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    replayed_at: Mapped[datetime | None] = mapped_column(default=None)
