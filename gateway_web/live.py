"""The WSGI app servers run: the gateway app, rebuilt when the config generation moves (gateway_core.live).

A reload builds a whole new Flask app from the new settings — routes for its services, its limits and
tiers — and swaps it in; requests already running finish on the app they started on. SIGHUP to a web
process asks for a reload (validated first) the way the admin endpoint does.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

from gateway_core.live import LiveSettings, request_reload
from gateway_core.settings import config_path, load_settings
from gateway_web.app import create_app
from gateway_web.openapi import JobgateOpenAPI

log = logging.getLogger(__name__)
RETIRE_AFTER_SECONDS = 120  # an old app's pools close this long after the swap, when its requests are done


class LiveApp:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else config_path()
        settings = load_settings(self.path)
        self.live = LiveSettings(settings, self.path)
        self.app = self._build()
        self._redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.request_reload).start())

    def _build(self) -> JobgateOpenAPI:
        app = create_app(self.live.current)
        app.config["JOBGATE_CONFIG_PATH"] = self.path
        return app

    def request_reload(self) -> None:
        try:
            request_reload(self.live.current, self.path, self._redis)
        except redis.RedisError as exc:
            log.error("config reload not propagated, Redis unavailable: %s", exc)

    def refresh(self) -> None:
        try:
            changed = self.live.poll(self._redis)
        except redis.RedisError as exc:
            log.warning("config generation unavailable: %s", exc)
            return
        if changed:
            old, self.app = self.app, self._build()
            timer = threading.Timer(RETIRE_AFTER_SECONDS, _retire, args=(old,))
            timer.daemon = True
            timer.start()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.refresh()
        return self.app(environ, start_response)


def _retire(app: JobgateOpenAPI) -> None:
    app.extensions["jobgate"].close()


def create_live_app(path: str | None = None) -> LiveApp:
    """The entry point for gunicorn: ``gunicorn 'gateway_web:create_live_app()'``."""
    return LiveApp(path)
