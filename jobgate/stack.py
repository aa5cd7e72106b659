"""Where a `jobgate` command finds its stack: one rule for `jobgate up` and every other subcommand.

- configuration: ``--config``, else ``JOBGATE_CONFIG``, else ``./gateway.yaml``, else the packaged default;
- data dir: ``--data-dir``, else ``JOBGATE_DATA_DIR``, else ``./.jobgate``;
- database and Redis: ``DATABASE_URL`` / ``REDIS_URL``, else ``database_url`` / ``redis_url`` in the
  configuration, else the embedded PostgreSQL and Redis of the data dir.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.exc import OperationalError

from gateway_core.errors import ConfigError
from gateway_core.settings import Settings, config_path, load_settings

DEFAULT_DATA_DIR = Path(".jobgate")
DEFAULT_REDIS_PORT = 6390
STATE_FILE = "stack.json"  # what `jobgate up` started, for the other commands to find


@dataclass(frozen=True)
class Stack:
    config: Path
    data_dir: Path
    settings: Settings  # URLs resolved: the embedded servers' when nothing else names one
    embedded_database: bool
    embedded_redis: bool

    def environment(self) -> dict[str, str]:
        """What a child process (web, worker, beat) needs in its environment to find this stack."""
        return {
            "JOBGATE_CONFIG": str(self.config),
            "DATABASE_URL": self.settings.database_url,
            "REDIS_URL": self.settings.redis_url,
            "CELERY_BROKER_URL": self.settings.celery_broker_url,
        }


def resolve_paths(
    config: Path | None, data_dir: Path | None, environ: Mapping[str, str] | None = None
) -> tuple[Path, Path]:
    env = os.environ if environ is None else environ
    cfg = (config or config_path(env)).resolve()
    data = (data_dir or Path(env.get("JOBGATE_DATA_DIR") or DEFAULT_DATA_DIR)).resolve()
    return cfg, data


def open_stack(
    config: Path | None,
    data_dir: Path | None,
    *,
    redis_port: int | None = None,
    create: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Stack:
    """Read the configuration and resolve the database and Redis. The embedded PostgreSQL is started when
    it is not running (and stopped again when this process exits, unless `jobgate up` holds it); a data dir
    without one is an error unless ``create``. The embedded Redis runs only under `jobgate up`:
    ``redis_port`` is the port it will have, else the one the running stack wrote in the data dir."""
    cfg, data = resolve_paths(config, data_dir, environ)
    settings = load_settings(cfg, environ)
    update: dict[str, str] = {}
    embedded_database = "database_url" not in settings.model_fields_set
    if embedded_database:
        from jobgate.embedded import has_postgres, start_postgres

        if not create and not has_postgres(data):
            raise ConfigError(
                f"no jobgate database in {data}: run `jobgate up` there first, or pass --data-dir, or set DATABASE_URL"
            )
        try:
            update["database_url"] = start_postgres(data)
        except Exception as exc:  # initdb or the server failed: its log is in the data dir
            raise ConfigError(f"could not start the embedded PostgreSQL in {data / 'postgres'}: {exc}") from None
    embedded_redis = "redis_url" not in settings.model_fields_set
    if embedded_redis:
        port = redis_port or _running_state(data).get("redis_port") or DEFAULT_REDIS_PORT
        update["redis_url"] = f"redis://127.0.0.1:{port}/0"
    settings = settings.model_copy(update=update)  # values already in the form the validators give
    return Stack(cfg, data, settings, embedded_database, embedded_redis)


def _running_state(data_dir: Path) -> dict[str, int]:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def save_state(data_dir: Path, **state: int) -> None:
    (data_dir / STATE_FILE).write_text(json.dumps(state) + "\n")


def unreachable_database(url: str, exc: OperationalError) -> str:
    """One line saying which database could not be reached and why (libpq's first line)."""
    where = urlsplit(url).hostname or "its socket"
    first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    return f"cannot reach the database at {where}: {first}"
