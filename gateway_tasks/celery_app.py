"""The Celery app factory; each process gets its settings, database and clients through ``app.jobgate``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from functools import cached_property
from typing import Any

import httpx
import redis
from celery import Celery
from celery.signals import worker_process_init, worker_ready
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

import celeryconfig
from gateway_core.db import Database
from gateway_core.live import LiveSettings, request_reload
from gateway_core.settings import Settings
from gateway_tasks.announce import announcer, end_listener
from gateway_tasks.fanout import Fanout
from gateway_tasks.in_hand import InHand
from gateway_tasks.pool import gevent_active
from gateway_tasks.registry import Registry
from gateway_tasks.waiting import grant_listener

log = logging.getLogger(__name__)


class WorkerContext:
    """What tasks need, created on first use in each process (never before a fork)."""

    def __init__(self, settings: Settings):
        self.live = LiveSettings(settings)

    @property
    def settings(self) -> Settings:
        return self.live.current

    def refresh(self) -> None:
        """Pick up a config reload (gateway_core.live) before a task; the task keeps what it read."""
        try:
            self.live.poll(self.redis)
        except redis.RedisError as exc:
            log.warning("config generation unavailable: %s", exc)

    @cached_property
    def db(self) -> Database:
        db = Database(self.settings.database_url)
        db.on_jobs_moved(announcer(self.redis))
        return db

    @cached_property
    def redis(self) -> redis.Redis:
        # Slots, circuits and announcements are advisory around a job: a Redis that is away is given up on within
        # a second (redis-py's default retries back off for seconds per command), and the answer recorded.
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2)
        return redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2, socket_timeout=5, retry=retry)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.redis)

    @cached_property
    def grants(self) -> Fanout:
        # Its own client: a subscription waits without a read timeout, which the shared client has.
        client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2, socket_keepalive=True)
        return grant_listener(client)

    @cached_property
    def ends(self) -> Fanout:
        # The ends of jobs, heard by the calls in flight (a job canceled meanwhile has its call stopped); its own
        # client, as above. Not every move: a call would wake for its own job's claim.
        client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2, socket_keepalive=True)
        return end_listener(client)

    @cached_property
    def in_hand(self) -> InHand:
        return InHand(self.redis)

    @cached_property
    def http(self) -> httpx.Client:
        # Replica calls are bounded by the replicas' slots, not here; keep-alive for as many as a worker runs.
        return httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000))

    def reset_after_fork(self) -> None:
        """Drop connections inherited from the parent; children open their own."""
        for name in ("db", "redis", "http", "registry", "grants", "ends", "in_hand"):
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


@worker_ready.connect
def _reload_on_sighup(sender: Any = None, **_kw: Any) -> None:
    """In the worker's main process, SIGHUP asks for a config reload (validated first) instead of Celery's
    restart: the pool keeps running, in-flight jobs are untouched, and every process picks the change up."""
    app = getattr(sender, "app", None)
    ctx = getattr(app, "jobgate", None)
    if not isinstance(ctx, WorkerContext) or threading.current_thread() is not threading.main_thread():
        return

    def reload() -> None:
        r = redis.Redis.from_url(ctx.settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            request_reload(ctx.settings, ctx.live.path, r)
        except redis.RedisError as exc:
            log.error("config reload not propagated, Redis unavailable: %s", exc)
        finally:
            r.close()

    if gevent_active():  # a gevent worker's signal handlers run in its event loop, where nothing may block
        import gevent
        import gevent.util

        gevent.signal_handler(signal.SIGHUP, gevent.spawn, reload)
        # SIGUSR2 logs every greenlet's stack (Celery's SIGUSR1 shows threads only): what each job waits on.
        gevent.signal_handler(signal.SIGUSR2, gevent.util.print_run_info, file=sys.stderr)
    else:
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload, name="config-reload").start())


@worker_process_init.connect
def _reset_after_fork(sender: Any = None, **_kw: Any) -> None:
    from celery import current_app

    ctx = getattr(current_app, "jobgate", None)
    if isinstance(ctx, WorkerContext):
        ctx.reset_after_fork()
