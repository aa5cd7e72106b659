"""Fixtures on the real parts: PostgreSQL, Redis, a Celery worker (with beat) and reference replicas.

PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379 (databases 13 for the broker, 14 for gateway state);
override with JOBGATE_TEST_PG / JOBGATE_TEST_REDIS. Every process started here is stopped here.
"""

from __future__ import annotations

import email
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Imported while collecting, not lazily at the end of a run by its pytest plugin: on CPython 3.11.7 a
# late import can hit python/cpython#106905 ("AST constructor recursion depth mismatch") after a session
# that started Celery workers, failing a green run.
import hypothesis  # noqa: F401
import psycopg2
import pytest
import redis
import yaml
from sqlalchemy import func, select

from gateway_core.credits import grant
from gateway_core.db import Database
from gateway_core.migrate import upgrade
from gateway_core.models import CreditEntry, Job, Tenant
from gateway_core.settings import Settings, load_settings
from gateway_core.states import ACTIVE, TERMINAL
from gateway_core.tenants import create_api_key, create_tenant
from gateway_web import create_app
from tests.audio import wav_bytes
from tests.procs import Proc, free_port, start_replica, start_worker

PG = os.environ.get("JOBGATE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS = os.environ.get("JOBGATE_TEST_REDIS", "redis://127.0.0.1:6379")
RABBITMQ = os.environ.get("JOBGATE_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
ISOLATED_QUEUE = "svc.isolated"
PRIORITY_QUEUE = "svc.priority"
REVIVE_PORT = free_port()
CHAOS_PORT = free_port()  # tests/tasks/test_chaos.py kills and restarts the replica "chaos" on it


# Timings short enough for tests to see redeliveries, sweeps, leases and holds within seconds.
FAST_GATEWAY: dict[str, Any] = {
    "visibility_timeout_seconds": 10,
    "sweep_interval_seconds": 1,
    "sweep_unsent_after_seconds": 1,
    "resend_lost_after_seconds": 3,
    "lease_margin_seconds": 3,
    "hold_retry_seconds": 0.5,
    "hold_retry_max_seconds": 1,
}


def admin_pg() -> Any:
    conn = psycopg2.connect(PG.replace("postgresql+psycopg2", "postgresql") + "/postgres")
    conn.autocommit = True
    return conn


@contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh PostgreSQL database migrated to head by Alembic; its URL, and the database dropped at the end."""
    name = f"jobgate_test_{uuid.uuid4().hex[:8]}"
    admin = admin_pg()
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    url = f"{PG}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        admin.cursor().execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_urls() -> dict[str, str]:
    """Gateway state in Redis db 14; the broker is Redis db 13, or RabbitMQ when JOBGATE_TEST_BROKER=rabbitmq."""
    urls = {"redis": f"{REDIS}/14", "broker": f"{REDIS}/13"}
    for url in urls.values():
        redis.Redis.from_url(url).flushdb()
    if os.environ.get("JOBGATE_TEST_BROKER") == "rabbitmq":
        urls["broker"] = RABBITMQ
    return urls


def _reset_rabbitmq(queues: list[str]) -> None:
    """Delete the queues (not only purge them): Celery declares them again with x-max-priority, which an
    existing queue declared without it would refuse."""
    from kombu import Connection

    with Connection(RABBITMQ, connect_timeout=5) as conn:
        channel = conn.default_channel
        for queue in queues:
            try:
                channel.queue_delete(queue)
            except Exception:  # a queue that does not exist yet: nothing to delete
                channel = conn.channel()


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobgate")


@pytest.fixture(scope="session")
def replicas(tmp_session: Path) -> Iterator[dict[str, str]]:
    """Reference replicas by name: healthy ones, ones that always fail, a slow one."""
    specs = {
        "transcribe-a": ("transcribe", {}),
        "transcribe-b": ("transcribe", {}),
        "codegen-a": ("codegen", {}),
        "codegen-b": ("codegen", {}),
        "codegen-c": ("codegen", {}),
        "flaky": ("codegen", {"fail_rate": 1.0}),
        "down-1": ("codegen", {"fail_rate": 1.0}),
        "down-2": ("codegen", {"fail_rate": 1.0}),
        "slow": ("codegen", {"latency_ms": 1500}),
        "slower": ("codegen", {"latency_ms": 4000}),
        "narrow": ("codegen", {"latency_ms": 800}),
        "glacial": ("codegen", {"latency_ms": 60_000}),  # only ever canceled
        "flippy": ("codegen", {"fail_rate": 1.0}),  # its fail rate is switched at run time
    }
    procs: list[Proc] = []
    urls: dict[str, str] = {}
    try:
        for name, (service, opts) in specs.items():
            proc, url = start_replica(tmp_session, service, name, **opts)
            procs.append(proc)
            urls[name] = url
        yield urls
    finally:
        for proc in procs:
            proc.stop()


def _replica(name: str, url: str, timeout: float = 10) -> dict[str, Any]:
    return {"name": name, "url": url, "timeout": timeout}


class Inbox:
    """What a real local SMTP server (aiosmtpd) or webhook receiver got."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, item: dict[str, Any]) -> None:
        with self.lock:
            self.items.append(item)

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [i for i in self.items if all(i.get(k) == v for k, v in fields.items())]


@pytest.fixture(scope="session")
def smtp_inbox() -> Iterator[tuple[Inbox, int]]:
    from aiosmtpd.controller import Controller

    inbox = Inbox()

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            msg = email.message_from_bytes(envelope.content)
            inbox.add({"subject": msg["Subject"], "to": envelope.rcpt_tos, "body": msg.get_payload()})
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


@pytest.fixture(scope="session")
def webhook_inbox() -> Iterator[tuple[Inbox, str]]:
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    inbox = Inbox()

    def app(environ: Any, start_response: Any) -> Any:
        inbox.add(json.loads(Request(environ).get_data()))
        return Response("ok")(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield inbox, f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


@pytest.fixture(scope="session")
def config_file(
    tmp_session: Path,
    replicas: dict[str, str],
    database_url: str,
    redis_urls: dict[str, str],
    smtp_inbox: tuple[Inbox, int],
    webhook_inbox: tuple[Inbox, str],
) -> Path:
    fast = {"max_attempts": 3, "retry_schedule_seconds": [0.2, 0.5]}
    config = {
        "database_url": database_url,
        "redis_url": redis_urls["redis"],
        "broker_url": redis_urls["broker"],
        "gateway": {
            "max_body_bytes": 256 * 1024,
            "allow_private_audio_urls": True,
            **FAST_GATEWAY,
            # Breakers stay out of the way of tests about other things; codegen-circuit sets its own.
            "circuit": {"failure_threshold": 1000, "error_rate_threshold": None, "cooldown_seconds": 5},
            "health": {"interval_seconds": 0.5, "timeout_seconds": 1, "unhealthy_threshold": 3, "healthy_threshold": 2},
        },
        "services": {
            "transcribe": {
                "kind": "transcribe",
                **fast,
                "pricing": {"unit": "audio_second", "rate": 5.555556},
                "replicas": [
                    _replica("transcribe-a", replicas["transcribe-a"]),
                    _replica("transcribe-b", replicas["transcribe-b"]),
                ],
            },
            "codegen": {
                "kind": "codegen",
                **fast,
                "replicas": [
                    _replica("codegen-a", replicas["codegen-a"]),
                    _replica("codegen-b", replicas["codegen-b"]),
                ],
            },
            "codegen-flaky": {
                "kind": "codegen",
                **fast,
                "strategy": "weighted_round_robin",  # alternates: one of two jobs meets the failing replica first
                "replicas": [
                    _replica("flaky", replicas["flaky"]),
                    _replica("codegen-b", replicas["codegen-b"]),
                ],
            },
            "codegen-down": {
                "kind": "codegen",
                **fast,
                "replicas": [_replica("down-1", replicas["down-1"]), _replica("down-2", replicas["down-2"])],
            },
            # A retry an hour away: it waits in the database until a test brings its time forward.
            "codegen-later": {
                "kind": "codegen",
                "max_attempts": 2,
                "retry_schedule_seconds": [3600],
                "replicas": [_replica("down-1", replicas["down-1"])],
            },
            "codegen-slow": {"kind": "codegen", **fast, "replicas": [_replica("slow", replicas["slow"])]},
            "codegen-off": {
                "kind": "codegen",
                "enabled": False,
                **fast,
                "replicas": [_replica("codegen-a", replicas["codegen-a"])],
            },
        },
    }
    services = config["services"]
    services["codegen-heavy"] = {
        "kind": "codegen",
        **fast,
        "cost_weight": 3,
        "replicas": [_replica("codegen-a", replicas["codegen-a"])],
    }
    services["codegen-limited"] = {
        "kind": "codegen",
        **fast,
        "rate_limit": "2/minute",
        "replicas": [_replica("codegen-a", replicas["codegen-a"])],
    }
    services["codegen-tokens"] = {
        "kind": "codegen",
        **fast,
        "pricing": {"unit": "token", "rate": 1},
        "replicas": [_replica("codegen-a", replicas["codegen-a"])],
    }
    # Served only by workers a test starts itself (the session worker does not read svc.isolated).
    services["codegen-isolated"] = {
        "kind": "codegen",
        **fast,
        "queue": ISOLATED_QUEUE,
        "replicas": [_replica("slower", replicas["slower"])],
    }
    # Many calls in flight in one worker that a test kills (tests/tasks/test_worker_loss.py).
    services["codegen-crowd"] = {
        "kind": "codegen",
        **fast,
        "queue": ISOLATED_QUEUE,
        "replicas": [{**_replica("slower", replicas["slower"]), "max_concurrency": 16}],
    }
    # Replicas that are not running: tests start "revive" on its port; "never" stays away.
    services["codegen-revive"] = {
        "kind": "codegen",
        **fast,
        "max_hold_seconds": 60,
        "replicas": [_replica("revive", f"http://127.0.0.1:{REVIVE_PORT}")],
    }
    services["codegen-never"] = {
        "kind": "codegen",
        **fast,
        "max_hold_seconds": 3,
        "replicas": [_replica("never", f"http://127.0.0.1:{free_port()}")],
    }
    services["codegen-narrow"] = {
        "kind": "codegen",
        **fast,
        "max_hold_seconds": 60,
        "replicas": [{**_replica("narrow", replicas["narrow"]), "max_concurrency": 1}],
    }
    # One slot on a replica that takes a minute: held by a job until the job is canceled.
    services["codegen-glacial"] = {
        "kind": "codegen",
        **fast,
        "replicas": [{**_replica("glacial", replicas["glacial"], timeout=90), "max_concurrency": 1}],
    }
    config["tiers"] = {"free": {"rate_limit": "6/minute", "read_rate_limit": "6/minute", "concurrency": 2}}
    services["codegen-circuit"] = {
        "kind": "codegen",
        **fast,
        "circuit": {"failure_threshold": 2, "cooldown_seconds": 6},
        "replicas": [_replica("flippy", replicas["flippy"]), _replica("codegen-b", replicas["codegen-b"])],
    }
    services["codegen-priority"] = {
        "kind": "codegen",
        **fast,
        "queue": PRIORITY_QUEUE,
        "replicas": [_replica("codegen-a", replicas["codegen-a"])],
    }
    services["codegen-alerting"] = {
        "kind": "codegen",
        **fast,
        "replicas": [_replica("down-1", replicas["down-1"]), _replica("down-2", replicas["down-2"])],
    }
    # One service per strategy over the same three replicas (tests/tasks/test_strategies.py); the session
    # worker's zone is "us" (gateway.zone), which only codegen-zoned's replicas declare.
    trio = ["codegen-a", "codegen-b", "codegen-c"]
    wide = {"max_concurrency": 64}  # never full: the strategy alone decides
    services["codegen-lor"] = {
        "kind": "codegen",
        **fast,
        "replicas": [{**_replica(n, replicas[n]), **wide} for n in trio],
    }
    services["codegen-wrr"] = {
        "kind": "codegen",
        **fast,
        "strategy": "weighted_round_robin",
        "replicas": [{**_replica(n, replicas[n]), **wide, "weight": w} for n, w in zip(trio, (1, 2, 3), strict=True)],
    }
    services["codegen-hash"] = {
        "kind": "codegen",
        **fast,
        "strategy": "consistent_hash",
        "replicas": [{**_replica(n, replicas[n]), **wide} for n in trio],
    }
    services["codegen-zoned"] = {
        "kind": "codegen",
        **fast,
        "replicas": [
            {**_replica(n, replicas[n]), **wide, "zone": z} for n, z in zip(trio, ("eu", "us", "us"), strict=True)
        ],
    }
    services["codegen-deadline"] = {
        "kind": "codegen",
        "max_attempts": 10,
        "retry_schedule_seconds": [0.2],
        "deadline_seconds": 2.5,
        "replicas": [_replica("slow", replicas["slow"], timeout=1)],
    }
    services["codegen-chaos"] = {
        "kind": "codegen",
        **fast,
        "circuit": {"failure_threshold": 2, "cooldown_seconds": 1},
        # Turn about, whatever the load: the slow replica gets every other job, so calls are in flight on it when
        # it is killed (least-outstanding would send nearly all to the fast one, as fast as the worker runs).
        "strategy": "weighted_round_robin",
        "replicas": [
            {**_replica("chaos", f"http://127.0.0.1:{CHAOS_PORT}"), "max_concurrency": 8},
            {**_replica("codegen-c", replicas["codegen-c"]), "max_concurrency": 8},
        ],
    }
    # Served by workers tests start and kill (tests/tasks/test_chaos.py): a 1.5 s call, a 2 s timeout.
    services["codegen-poison"] = {
        "kind": "codegen",
        **fast,
        "queue": ISOLATED_QUEUE,
        "replicas": [_replica("slow", replicas["slow"], timeout=2)],
    }
    config["gateway"]["zone"] = "us"
    config["alerts"] = {
        "smtp": {"host": "127.0.0.1", "port": smtp_inbox[1], "sender": "jobgate@test", "to": ["ops@test"]},
        "webhook_url": webhook_inbox[1],
        "window_seconds": 3600,
    }
    path = tmp_session / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def settings(config_file: Path) -> Settings:
    return load_settings(config_file, environ={})


@pytest.fixture(scope="session")
def worker_env(config_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env["JOBGATE_CONFIG"] = str(config_file)
    return env


@pytest.fixture(scope="session")
def worker(settings: Settings, worker_env: dict[str, str], tmp_session: Path) -> Iterator[Proc]:
    """Real Celery workers as deployed: a dispatch worker (gevent) on every service queue, and a maintenance
    worker (prefork, beat embedded: the sweeper and the probes)."""
    if settings.celery_broker_url.startswith("amqp"):
        _reset_rabbitmq([*settings.queues, "jobgate.maintenance"])
    queues = [q for q in settings.queues if q not in (ISOLATED_QUEUE, PRIORITY_QUEUE)]
    maintenance = start_worker(
        worker_env,
        ["jobgate.maintenance"],
        tmp_session / "maintenance.log",
        beat_schedule=tmp_session / "beat-schedule",
        pool="prefork",
        concurrency=1,
    )
    try:
        proc = start_worker(worker_env, queues, tmp_session / "worker.log")
        try:
            yield proc
        finally:
            proc.stop()
    finally:
        maintenance.stop()


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[Any]:
    app = create_app(settings)
    yield app
    app.extensions["jobgate"].db.dispose()  # before the test database is dropped under its connections


@pytest.fixture()
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture(scope="session")
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


class TenantKey:
    def __init__(self, tenant_id: int, key: str):
        self.tenant_id = tenant_id
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}


def make_tenant(db: Database, tier: str = "pro", credits: int = 1000, **overrides: Any) -> TenantKey:
    """A tenant of its own, with credits: tests see only their own jobs, as tenants do."""
    with db.transaction() as s:
        t = create_tenant(s, f"t-{uuid.uuid4().hex[:10]}", tier)
        for name, value in overrides.items():
            setattr(t, name, value)
        key = create_api_key(s, t)
    if credits:
        with db.transaction() as s:
            grant(s, t.id, credits, note="test fixture")
    return TenantKey(t.id, key)


@pytest.fixture()
def tenant(db: Database) -> TenantKey:
    return make_tenant(db)


def wait_state(db: Database, job_id: str, states: Any, timeout: float = 20) -> Job:
    """Poll the job row until its state is one of ``states``; the job with its events."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        with db.transaction() as s:
            job = s.get(Job, job_id)
            if job is not None and job.state in wanted:
                s.refresh(job, ["events"])
                return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.state if job else 'missing'} after {timeout} s")
        time.sleep(0.1)


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something true (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)
    return result


def wait_terminal(db: Database, job_id: str, timeout: float = 20) -> Job:
    """Poll the job row until it reaches a terminal state."""
    return wait_state(db, job_id, TERMINAL, timeout)


@pytest.fixture(scope="session")
def embedded_db(tmp_session: Path) -> Iterator[Database]:
    """The embedded default's database: a PostgreSQL started in a data dir exactly as `jobgate up` starts
    it, migrated; stopped at the end."""
    from jobgate.embedded import start_postgres, stop_postgres

    data_dir = tmp_session / "embedded"
    url = start_postgres(data_dir)
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()
    stop_postgres(data_dir)


@pytest.fixture(params=["test-postgres", "embedded"])
def any_db(request: pytest.FixtureRequest) -> Database:
    """The test PostgreSQL, then the embedded default's: invariants that must hold on both."""
    return request.getfixturevalue("db" if request.param == "test-postgres" else "embedded_db")


@pytest.fixture(scope="session")
def audio_server() -> Iterator[str]:
    """A real HTTP server on an ephemeral port serving a 2.5 s WAV at /clip.wav."""
    clip = wav_bytes(2.5)

    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    def app(environ: Any, start_response: Any) -> Any:
        req = Request(environ)
        resp = Response(clip, mimetype="audio/wav") if req.path == "/clip.wav" else Response("no", status=404)
        return resp(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def wait_message_handled(settings: Settings, service: str, task_id: str, timeout: float = 20) -> None:
    """Wait until no message of ``task_id`` waits in ``service``'s queue and no worker holds one: the
    dispatches sent for it have all been handled (seen twice in a row, 0.2 s apart)."""
    from gateway_tasks.celery_app import create_celery
    from gateway_tasks.publish import empty_queues

    celery = create_celery(settings)
    queue = settings.queue_for(service)
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2:
        replies = celery.control.inspect(timeout=0.5).query_task(task_id) or {}  # {worker: {task id: ...}}
        held = any(task_id in (tasks or {}) for tasks in replies.values())
        busy = held or queue not in empty_queues(celery, [queue])
        quiet = 0 if busy else quiet + 1
        assert time.monotonic() < deadline, f"a dispatch of {task_id} is still pending after {timeout} s"
        time.sleep(0.2)


def assert_ledger_invariants(db: Database, tenant_id: int) -> None:
    """Balance = the ledger's sum >= 0; reserved = the ledger's reserved sum = the open jobs' reservations;
    no job charged beyond its reservation."""
    with db.transaction() as s:
        t = s.get(Tenant, tenant_id)
        assert t is not None
        amount, held = s.execute(
            select(
                func.coalesce(func.sum(CreditEntry.amount), 0), func.coalesce(func.sum(CreditEntry.reserved_change), 0)
            ).where(CreditEntry.tenant_id == tenant_id)
        ).one()
        open_reservations = s.scalar(
            select(func.coalesce(func.sum(Job.credits_reserved), 0)).where(
                Job.tenant_id == tenant_id, Job.state.in_(ACTIVE)
            )
        )
        charged_beyond = s.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.credits_charged > Job.credits_reserved)
        )
    assert t.credits_balance == amount >= 0
    assert t.credits_reserved == held == open_reservations >= 0
    assert charged_beyond == 0
