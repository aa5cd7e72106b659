"""Live configuration (issue 4, item 9; seed 003's config sync with graceful SIGHUP reload).

A reload is asked for by SIGHUP to any web or worker process, ``POST /v1/admin/config/reload`` or
``jobgate config reload``. The asking process validates gateway.yaml first: a bad file changes nothing
anywhere and the reason is logged (and answered). A good one bumps a generation counter in Redis; every
process of the deployment — web workers, Celery pool children on every machine — sees the new generation
within ``POLL_SECONDS`` of its next request or task, reads and validates the file itself and swaps its
settings. Work already running keeps the settings it started with, so nothing in flight is dropped.

Connection URLs (database, Redis, broker) and the set of queues a worker consumes need a restart: a
reload keeps the running URLs and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from gateway_core.errors import ConfigError
from gateway_core.settings import Settings, config_path, load_settings

log = logging.getLogger(__name__)

GENERATION_KEY = "jobgate:config:generation"
POLL_SECONDS = 1.0
URL_KEYS = ("database_url", "redis_url", "broker_url")


@dataclass
class ReloadResult:
    ok: bool
    generation: int | None = None
    changes: list[str] = field(default_factory=list)  # what the new file changes, e.g. "services.codegen.replicas"
    restart_required: list[str] = field(default_factory=list)  # changes a reload does not apply
    error: str | None = None


def changes_between(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """What differs between two configs, and which of those differences need a restart."""
    changes: list[str] = []
    restart: list[str] = []
    for key in URL_KEYS:
        if getattr(old, key) != getattr(new, key):
            restart.append(key)
    for section in ("gateway", "rate_limits", "alerts", "tiers"):
        if getattr(old, section) != getattr(new, section):
            changes.append(section)
    for name in sorted(set(old.services) | set(new.services)):
        before, after = old.services.get(name), new.services.get(name)
        if before is None or after is None:
            changes.append(f"services.{name} {'added' if before is None else 'removed'}")
            restart.append(f"services.{name}: workers consume queues chosen at start")
            continue
        for key in type(after).model_fields:
            if getattr(before, key) != getattr(after, key):
                changes.append(f"services.{name}.{key}")
    return changes, restart


def read_checked(running: Settings, path: Path) -> Settings:
    """The file's settings, validated (ConfigError otherwise), with the running connection URLs kept."""
    new = load_settings(path)
    return new.model_copy(update={key: getattr(running, key) for key in URL_KEYS})


def request_reload(running: Settings, path: Path, r: redis.Redis) -> ReloadResult:
    """Validate the file; when good, bump the generation so every process reloads. A bad file is refused."""
    try:
        new = load_settings(path)
    except ConfigError as exc:
        log.error("config reload refused, the running config stays: %s", exc)
        return ReloadResult(ok=False, error=str(exc))
    changes, restart = changes_between(running, new)
    generation = int(r.incr(GENERATION_KEY))  # type: ignore[arg-type]
    log.warning("config reload %d requested: %s", generation, ", ".join(changes) or "no changes")
    return ReloadResult(ok=True, generation=generation, changes=changes, restart_required=restart)


class LiveSettings:
    """A process's running settings, swapped when the deployment's config generation moves."""

    def __init__(self, settings: Settings, path: Path | None = None):
        self.current = settings
        self.path = path or config_path()
        self._seen: int | None = None  # the generation these settings belong to; None: not asked yet
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def poll(self, r: redis.Redis) -> bool:
        """At most every POLL_SECONDS: reload when the generation moved. True when the settings changed."""
        now = time.monotonic()
        if now - self._checked_at < POLL_SECONDS:
            return False
        with self._lock:
            if now - self._checked_at < POLL_SECONDS:
                return False
            self._checked_at = now
            raw = r.get(GENERATION_KEY)
            generation = int(raw) if raw is not None else 0  # type: ignore[arg-type]
            if generation == self._seen:
                return False
            # A new generation, or this process's first look (it may have started from an older file).
            self._seen = generation
            try:
                new = read_checked(self.current, self.path)
            except ConfigError as exc:  # changed again since it was validated: keep running as we are
                log.error("config generation %d not applied, the running config stays: %s", generation, exc)
                return False
            if new == self.current:
                return False
            self.current = new
            log.warning("config generation %d applied", generation)
            return True
