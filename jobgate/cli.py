"""``jobgate`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gateway_core.db import Database
from gateway_core.errors import ConfigError, GatewayError
from gateway_core.settings import Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """jobgate: an HTTP gateway for AI inference jobs."""


@main.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate the database of gateway.yaml / DATABASE_URL to the given revision."""
    from gateway_core.migrate import upgrade

    upgrade(_settings().database_url, revision)
    click.echo(f"database at {revision}")


@main.group()
def tenants() -> None:
    """Tenants."""


@tenants.command("create")
@click.argument("name")
@click.option("--tier", type=click.Choice(["free", "pro", "enterprise"]), default="free", show_default=True)
def tenants_create(name: str, tier: str) -> None:
    """Create a tenant."""
    from gateway_core.tenants import create_tenant

    try:
        with Database(_settings().database_url).transaction() as s:
            tenant = create_tenant(s, name, tier)
            click.echo(f"tenant {tenant.name} (id {tenant.id}, tier {tenant.tier}) created")
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.option("--tenant", "tenant_name", required=True)
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["admin"]), help="extra scope (repeatable)")
def keys_create(tenant_name: str, scopes: tuple[str, ...]) -> None:
    """Create an API key for a tenant and print it (it is stored only as a hash)."""
    from gateway_core.tenants import create_api_key, tenant_by_name

    try:
        with Database(_settings().database_url).transaction() as s:
            key = create_api_key(s, tenant_by_name(s, tenant_name), scopes)
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(key)


@main.group()
def credits() -> None:
    """Credits."""


@credits.command("grant")
@click.argument("tenant_name")
@click.argument("amount", type=int)
@click.option("--kind", type=click.Choice(["grant", "refund", "adjustment"]), default="grant", show_default=True)
@click.option("--note", default=None)
def credits_grant(tenant_name: str, amount: int, kind: str, note: str | None) -> None:
    """Add credits to a tenant (an adjustment may be negative)."""
    from gateway_core.credits import grant
    from gateway_core.tenants import tenant_by_name

    try:
        with Database(_settings().database_url).transaction() as s:
            tenant = grant(s, tenant_by_name(s, tenant_name).id, amount, kind=kind, note=note)
            click.echo(f"tenant {tenant.name}: balance {tenant.credits_balance}, reserved {tenant.credits_reserved}")
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None


@main.group("dead-letters")
def dead_letters() -> None:
    """Jobs that failed for good."""


@dead_letters.command("list")
@click.option("--service", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
def dead_letters_list(service: str | None, limit: int) -> None:
    """List dead letters, newest first."""
    from gateway_core.deadletters import page

    with Database(_settings().database_url).transaction() as s:
        for d in page(s, service=service, before=None, limit=limit):
            replayed = f" replayed {d.replayed_at:%Y-%m-%d %H:%M}" if d.replayed_at else ""
            click.echo(
                f"{d.id}\t{d.created_at:%Y-%m-%d %H:%M:%S}\t{d.service}\t{d.job_id}\t{d.error_code}"
                f"\t{len(d.attempts)} attempt(s){replayed}"
            )


@dead_letters.command("replay")
@click.argument("letter_id", type=int)
def dead_letters_replay(letter_id: int) -> None:
    """Replay a dead letter: a new round of attempts on the same job id."""
    from gateway_web.admin import replay_dead_letter
    from gateway_web.app import create_app

    settings = _settings()
    app = create_app(settings)
    try:
        with app.app_context():
            job = replay_dead_letter(settings, letter_id)
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"job {job.id} is {job.state.value} again")


@main.group()
def config() -> None:
    """Live configuration."""


@config.command("reload")
def config_reload() -> None:
    """Validate gateway.yaml and have every running web and worker process apply it (within about a second).
    A bad file is refused and nothing changes."""
    import redis

    from gateway_core.live import request_reload
    from gateway_core.settings import config_path

    settings = _settings()  # a bad file stops here, with the reasons
    result = request_reload(settings, config_path(), redis.Redis.from_url(settings.redis_url, socket_timeout=5))
    if not result.ok:
        raise click.ClickException(result.error or "refused")
    click.echo(f"config generation {result.generation}: every process applies it within about a second")


@main.group()
def alerts() -> None:
    """Admin alerts."""


@alerts.command("test")
def alerts_test() -> None:
    """Send one alert of each kind on every configured channel (no throttling)."""
    import httpx

    from gateway_tasks.alerts import KINDS, deliver

    cfg = _settings().alerts
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
def replica(service: str, name: str | None, host: str, port: int, latency_ms: int, fail_rate: float) -> None:
    """Run a reference replica speaking the replica protocol (simulated output, no model)."""
    from jobgate.replica import serve_replica

    serve_replica(service, name or f"{service}-{port}", host, port, latency_ms, fail_rate)


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".jobgate"),
    show_default=True,
)
@click.option("--port", type=int, default=8080, show_default=True, help="API port")
@click.option("--flower-port", type=int, default=5555, show_default=True)
@click.option("--redis-port", type=int, default=6390, show_default=True, help="embedded Redis port")
@click.option("--no-replicas", is_flag=True, help="do not start reference replicas for local replica URLs")
def up(data_dir: Path, port: int, flower_port: int, redis_port: int, no_replicas: bool) -> None:
    """Run everything: Redis (embedded unless REDIS_URL), web, workers, beat, Flower, reference replicas."""
    from jobgate.up import run_stack

    try:
        sys.exit(run_stack(data_dir, port, flower_port, redis_port, with_replicas=not no_replicas))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
