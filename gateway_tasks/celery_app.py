"""The Celery app factory; each process gets its settings, database and clients through ``app.jobgate``."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import httpx
import redis
from celery import Celery
from celery.signals import worker_process_init

import celeryconfig
from gateway_core.db import Database
from gateway_core.settings import Settings
from gateway_tasks.registry import Registry


class WorkerContext:
    """What tasks need, created on first use in each process (never before a fork)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.database_url)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2, socket_timeout=5)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.redis)

    @cached_property
    def http(self) -> httpx.Client:
        return httpx.Client(limits=httpx.Limits(max_connections=100, max_keepalive_connections=20))

    def reset_after_fork(self) -> None:
        """Drop connections inherited from the parent; children open their own."""
        for name in ("db", "redis", "http", "registry"):
            obj = self.__dict__.pop(name, None)
            if isinstance(obj, Database):
                obj.engine.dispose(close=False)


class JobgateCelery(Celery):
    jobgate: WorkerContext


def create_celery(settings: Settings) -> JobgateCelery:
    """A Celery app configured from celeryconfig.py and these settings."""
    app = JobgateCelery("jobgate", set_as_current=False)
    app.config_from_object(celeryconfig)
    app.conf.update(celeryconfig.from_settings(settings))
    app.jobgate = WorkerContext(settings)
    return app


@worker_process_init.connect
def _reset_after_fork(sender: Any = None, **_kw: Any) -> None:
    from celery import current_app

    ctx = getattr(current_app, "jobgate", None)
    if isinstance(ctx, WorkerContext):
        ctx.reset_after_fork()
