"""What views need from the app: settings, database, Celery (to send tasks) and Redis."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app
from redis import BlockingConnectionPool

from gateway_core.db import Database
from gateway_core.settings import Settings
from gateway_tasks.celery_app import JobgateCelery
from gateway_tasks.fanout import Fanout


@dataclass
class WebContext:
    settings: Settings
    db: Database
    celery: JobgateCelery
    redis: redis.Redis
    job_ends: Fanout  # requests waiting for a job to end (Prefer: wait) are woken through it
    job_moves: Fanout  # event streams are woken through it at each move of their job
    limit_pool: BlockingConnectionPool | None = None  # the rate limiter's connections

    def close(self) -> None:
        """Close every pool and connection of an app that serves no more requests (replaced by a reload)."""
        self.job_ends.close()
        self.job_moves.close()
        if self.limit_pool is not None:
            self.limit_pool.disconnect()
        self.db.dispose()
        self.redis.close()
        self.celery.close()


def ctx() -> WebContext:
    return current_app.extensions["jobgate"]
