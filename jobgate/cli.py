"""``jobgate`` command line. Every subcommand finds its stack by one rule (``jobgate.stack``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import psycopg2.errors
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from gateway_core.credits import MAX_GRANT
from gateway_core.db import Database
from gateway_core.errors import ConfigError, GatewayError
from gateway_core.settings import DEFAULT_TIERS
from jobgate.stack import DEFAULT_REDIS_PORT, Stack, open_stack, unreachable_database

LOG_LEVELS = ("debug", "info", "warning", "error")


PATH = click.Path(path_type=Path)


def _stack(**kw: Any) -> Stack:
    opts = click.get_current_context().find_root().params
    try:
        return open_stack(opts.get("config"), opts.get("data_dir"), **kw)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def _transaction() -> Iterator[Session]:
    """One transaction on the stack's database; a domain error or an unreachable database is one line."""
    stack = _stack()
    db = Database(stack.settings.database_url)
    try:
        with db.transaction() as s:
            yield s
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None
    except OperationalError as exc:
        raise click.ClickException(unreachable_database(stack.settings.database_url, exc)) from None
    except ProgrammingError as exc:
        if isinstance(exc.orig, psycopg2.errors.UndefinedTable):
            raise click.ClickException("the database has no jobgate tables yet: run `jobgate db upgrade`") from None
        raise
    finally:
        db.dispose()


def _to_root(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is not None and param.name:
        ctx.find_root().params[param.name] = value


def stack_options(command: Any) -> Any:
    """``--config`` and ``--data-dir`` after the subcommand too (``jobgate tenants list --data-dir X``)."""
    command = click.option("--config", type=PATH, expose_value=False, callback=_to_root, help="as jobgate --config")(
        command
    )
    return click.option("--data-dir", type=PATH, expose_value=False, callback=_to_root, help="as jobgate --data-dir")(
        command
    )


@click.group()
@click.version_option(package_name="jobgate", prog_name="jobgate")
@click.option("--config", type=PATH, default=None, help="configuration file [JOBGATE_CONFIG, ./gateway.yaml, packaged]")
@click.option(
    "--data-dir", type=PATH, default=None, help="embedded database, Redis and demo key [JOBGATE_DATA_DIR, ./.jobgate]"
)
def main(config: Path | None, data_dir: Path | None) -> None:
    """jobgate: an HTTP gateway for AI inference jobs."""


@main.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@stack_options
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate the stack's database to the given revision."""
    from gateway_core.migrate import upgrade

    url = _stack(create=True).settings.database_url
    try:
        upgrade(url, revision)
    except OperationalError as exc:
        raise click.ClickException(unreachable_database(url, exc)) from None
    click.echo(f"database at {revision}")


@main.group()
def tenants() -> None:
    """Tenants."""


@tenants.command("create")
@stack_options
@click.argument("name")
@click.option("--tier", type=click.Choice(list(DEFAULT_TIERS)), default="free", show_default=True)
@click.option("--credits", "credits_", type=click.IntRange(0, MAX_GRANT), default=0, help="credits granted at once")
def tenants_create(name: str, tier: str, credits_: int) -> None:
    """Create a tenant, with credits if given."""
    from gateway_core.credits import grant
    from gateway_core.tenants import create_tenant

    with _transaction() as s:
        tenant = create_tenant(s, name, tier)
        if credits_:
            s.flush()
            tenant = grant(s, tenant.id, credits_, note="granted when the tenant was created")
    click.echo(f"tenant {tenant.name} (id {tenant.id}, tier {tenant.tier}) created, balance {tenant.credits_balance}")


@tenants.command("list")
@stack_options
def tenants_list() -> None:
    """List tenants: id, name, tier, balance, reserved credits."""
    from sqlalchemy import select

    from gateway_core.models import Tenant

    with _transaction() as s:
        rows = s.execute(
            select(Tenant.id, Tenant.name, Tenant.tier, Tenant.credits_balance, Tenant.credits_reserved).order_by(
                Tenant.id
            )
        ).all()
    click.echo("id\tname\ttier\tbalance\treserved")
    for row in rows:
        click.echo("\t".join(str(v) for v in row))


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@stack_options
@click.option("--tenant", "tenant_name", required=True)
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["admin"]), help="extra scope (repeatable)")
def keys_create(tenant_name: str, scopes: tuple[str, ...]) -> None:
    """Create an API key for a tenant and print it (it is stored only as a hash)."""
    from gateway_core.tenants import create_api_key, tenant_by_name

    with _transaction() as s:
        key = create_api_key(s, tenant_by_name(s, tenant_name), scopes)
    click.echo(key)


@main.group()
def credits() -> None:
    """Credits."""


@credits.command("grant")
@stack_options
@click.argument("tenant_name")
@click.argument("amount", type=click.IntRange(-MAX_GRANT, MAX_GRANT))
@click.option("--kind", type=click.Choice(["grant", "refund", "adjustment"]), default="grant", show_default=True)
@click.option("--note", default=None)
def credits_grant(tenant_name: str, amount: int, kind: str, note: str | None) -> None:
    """Add credits to a tenant (an adjustment may be negative)."""
    from gateway_core.credits import grant
    from gateway_core.tenants import tenant_by_name

    with _transaction() as s:
        tenant = grant(s, tenant_by_name(s, tenant_name).id, amount, kind=kind, note=note)
    click.echo(f"tenant {tenant.name}: balance {tenant.credits_balance}, reserved {tenant.credits_reserved}")


@main.group("dead-letters")
def dead_letters() -> None:
    """Jobs that failed for good."""


@dead_letters.command("list")
@stack_options
@click.option("--service", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
def dead_letters_list(service: str | None, limit: int) -> None:
    """List dead letters, newest first."""
    from gateway_core.deadletters import page

    with _transaction() as s:
        for d in page(s, service=service, before=None, limit=limit):
            replayed = f" replayed {d.replayed_at:%Y-%m-%d %H:%M}" if d.replayed_at else ""
            click.echo(
                f"{d.id}\t{d.created_at:%Y-%m-%d %H:%M:%S}\t{d.service}\t{d.job_id}\t{d.error_code}"
                f"\t{len(d.attempts)} attempt(s){replayed}"
            )


@dead_letters.command("replay")
@stack_options
@click.argument("letter_id", type=int)
def dead_letters_replay(letter_id: int) -> None:
    """Replay a dead letter: a new round of attempts on the same job id."""
    import functools

    from gateway_core.deadletters import replay_and_send
    from gateway_tasks.celery_app import create_celery
    from gateway_tasks.publish import publish_dispatch

    settings = _stack().settings
    db = Database(settings.database_url)
    try:
        job = replay_and_send(db, settings, functools.partial(publish_dispatch, create_celery(settings)), letter_id)
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None
    finally:
        db.dispose()
    click.echo(f"job {job.id} is {job.state.value} again")


@main.group()
def config() -> None:
    """Live configuration."""


@config.command("reload")
@stack_options
def config_reload() -> None:
    """Validate gateway.yaml and have every running web and worker process apply it (within about a second).
    A bad file is refused and nothing changes."""
    import redis

    from gateway_core.live import request_reload

    stack = _stack()  # a bad file stops here, with the reasons
    server = redis.Redis.from_url(stack.settings.redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        result = request_reload(stack.settings, stack.config, server)
    except redis.ConnectionError as exc:
        raise click.ClickException(
            f"cannot reach Redis at {urlsplit(stack.settings.redis_url).netloc}: {exc}"
        ) from None
    if not result.ok:
        raise click.ClickException(result.error or "refused")
    click.echo(f"config generation {result.generation}: every process applies it within about a second")


@main.group()
def alerts() -> None:
    """Admin alerts."""


@alerts.command("test")
@stack_options
def alerts_test() -> None:
    """Send one alert of each kind on every configured channel (no throttling)."""
    import httpx

    from gateway_tasks.alerts import KINDS, deliver

    cfg = _stack().settings.alerts
    if cfg.smtp is None and cfg.webhook_url is None:
        raise click.ClickException("no alert channel configured (alerts.smtp, alerts.webhook_url)")
    with httpx.Client() as http:
        for kind in KINDS:
            alert = {
                "kind": kind,
                "service": "test",
                "message": f"test alert: {kind}",
                "count": 1,
                "detail": {"test": True},
                "at": "",
            }
            click.echo(f"{kind}: sent by {', '.join(deliver(cfg, http, alert))}")


@main.command()
@click.option("--service", required=True, help="transcribe or codegen: which output to simulate")
@click.option("--name", default=None, help="replica name (default: <service>-<port>)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=0, show_default=True, help="0 picks a free port")
@click.option("--latency-ms", type=click.IntRange(0, 600_000), default=0, show_default=True)
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option(
    "--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True, help="info: a line a request"
)
def replica(
    service: str, name: str | None, host: str, port: int, latency_ms: int, fail_rate: float, log_level: str
) -> None:
    """Run a reference replica speaking the replica protocol (simulated output, no model)."""
    from jobgate.replica import serve_replica

    serve_replica(service, name or f"{service}-{port}", host, port, latency_ms, fail_rate, log_level)


@main.command(context_settings={"ignore_unknown_options": True})
@stack_options
@click.argument("queue")
@click.option("--quiet", is_flag=True, help="no start-up banner, no warning about running as root")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queue: str, quiet: bool, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker on QUEUE (svc.<service> or jobgate.maintenance) with the pool and size the
    configuration calls for; further options go to `celery worker` (e.g. --loglevel INFO)."""
    import os

    from gateway_tasks.pool import CELERY_ROOT_WARNING, worker_options

    stack = _stack()
    try:
        options = worker_options(stack.settings, queue)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    os.environ.update(stack.environment())
    python = [sys.executable, "-W", CELERY_ROOT_WARNING] if quiet else [sys.executable]
    celery = ["-m", "celery", *(["--quiet"] if quiet else []), "-A", "gateway_tasks.worker", "worker"]
    os.execv(sys.executable, [*python, *celery, *options, *celery_args])


@main.command()
@stack_options
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="API port")
@click.option("--flower-port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--redis-port", type=click.IntRange(1, 65535), default=DEFAULT_REDIS_PORT, show_default=True)
@click.option("--no-replicas", is_flag=True, help="do not start reference replicas for local replica URLs")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="warning", show_default=True)
def up(port: int, flower_port: int, redis_port: int, no_replicas: bool, log_level: str) -> None:
    """Run everything: PostgreSQL and Redis (embedded unless configured), web, workers, beat, Flower, replicas."""
    from jobgate.up import run_stack

    stack = _stack(redis_port=redis_port, create=True)
    try:
        sys.exit(run_stack(stack, port, flower_port, redis_port, with_replicas=not no_replicas, log_level=log_level))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
