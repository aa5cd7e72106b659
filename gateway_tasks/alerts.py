"""Admin alerts (issue 4, item 7): email over SMTP and a JSON webhook with a Slack-compatible body.

One alert per service and kind per window: every event is counted in Redis, and the first one of a window
sends an alert carrying the count of events since the last alert. Delivery runs as its own task on the
maintenance queue, so a slow mail server never holds up a dispatch.
"""

from __future__ import annotations

import logging
import smtplib
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import httpx
import redis
from celery import Celery

import celeryconfig
from gateway_core.settings import AlertsConfig

log = logging.getLogger(__name__)

KINDS = ("job_failed", "circuit_open", "no_healthy_replica", "held_too_long")
SEND_TASK = "jobgate.send_alert"


def due_count(r: redis.Redis, kind: str, service: str, window: float) -> int | None:
    """Count one event; the number of events to report if an alert is due now, None while throttled."""
    base = f"jobgate:alert:{kind}:{service}"
    pipe = r.pipeline()
    pipe.incr(f"{base}:count")
    pipe.set(f"{base}:window", 1, nx=True, px=int(window * 1000))
    _, opened = pipe.execute()
    if not opened:
        return None
    return int(r.getdel(f"{base}:count") or 1)  # type: ignore[arg-type]


def raise_alert(
    app: Celery, r: redis.Redis, cfg: AlertsConfig, kind: str, service: str, message: str, detail: dict[str, Any]
) -> bool:
    """Queue an alert unless one of this kind for this service went out within the window."""
    if cfg.smtp is None and cfg.webhook_url is None:
        return False
    try:
        count = due_count(r, kind, service, cfg.window_seconds)
    except redis.RedisError:
        count = 1  # without Redis there is no throttle: an extra alert beats a silent failure
    if count is None:
        return False
    alert = {
        "kind": kind,
        "service": service,
        "message": message,
        "count": count,
        "detail": detail,
        "at": datetime.now(UTC).isoformat(),
    }
    app.send_task(SEND_TASK, kwargs={"alert": alert}, queue=celeryconfig.MAINTENANCE_QUEUE)
    return True


def deliver(cfg: AlertsConfig, http: httpx.Client, alert: dict[str, Any]) -> list[str]:
    """Send one alert on every configured channel; the channels used."""
    summary = f"[jobgate] {alert['kind']} on {alert['service']} (x{alert['count']}): {alert['message']}"
    sent = []
    if cfg.webhook_url is not None:
        resp = http.post(str(cfg.webhook_url), json={"text": summary, **alert}, timeout=10)
        resp.raise_for_status()
        sent.append("webhook")
    if cfg.smtp is not None:
        msg = EmailMessage()
        msg["Subject"] = summary[:200]
        msg["From"] = cfg.smtp.sender
        msg["To"] = ", ".join(cfg.smtp.to)
        body = "\n".join(f"{k}: {v}" for k, v in alert.items())
        msg.set_content(f"{summary}\n\n{body}\n")
        with smtplib.SMTP(cfg.smtp.host, cfg.smtp.port, timeout=cfg.smtp.timeout_seconds) as smtp:
            if cfg.smtp.starttls:
                smtp.starttls()
            if cfg.smtp.username:
                smtp.login(cfg.smtp.username, cfg.smtp.password or "")
            smtp.send_message(msg)
        sent.append("email")
    return sent
