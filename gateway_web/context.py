"""What views need from the app: settings, database, Celery (to send tasks) and Redis."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app

from gateway_core.db import Database
from gateway_core.settings import Settings
from gateway_tasks.celery_app import JobgateCelery


@dataclass
class WebContext:
    settings: Settings
    db: Database
    celery: JobgateCelery
    redis: redis.Redis


def ctx() -> WebContext:
    return current_app.extensions["jobgate"]
