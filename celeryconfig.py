"""Celery settings for jobgate: reliability constants here, connection settings derived from gateway.yaml.

Celery reads the module-level names (``app.config_from_object("celeryconfig")``); ``from_settings``
adds what depends on the deployment. Importing this module reads no environment and opens nothing.
See ../shared/CELERY_NOTES.md for why each reliability setting is what it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway_core.settings import Settings

MAINTENANCE_QUEUE = "jobgate.maintenance"

# Ack after the task returns: a killed worker loses no message. Dispatch workers run one gevent process, so a
# kill loses every call in flight at once: RabbitMQ redelivers at once, Redis after the visibility timeout, and
# the sweeper re-sends each job as soon as its lease runs out. (reject_on_worker_lost covers the maintenance
# worker's prefork child.)
task_acks_late = True
task_reject_on_worker_lost = True
# With late acks only a multiplier of 1 keeps one worker from hoarding jobs that others could run: a gevent
# worker then holds as many messages as it has greenlets (its replicas' slots and a quarter more), the rest wait
# in the broker in priority order.
worker_prefetch_multiplier = 1
# Countdown messages sit unacked in worker memory and ignore prefetch: bound them.
worker_eta_task_limit = 1000
# A lost broker connection must not cancel calls in flight: their answers are recorded in PostgreSQL (the
# job row, not the message, says what is done), and a message redelivered later finds the job ended.
worker_cancel_long_running_tasks_on_connection_loss = False
broker_connection_retry_on_startup = True
# A web thread must not block forever on an exhausted producer pool.
broker_pool_acquire_timeout = 5.0

task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"
# The job row is the source of truth for clients; Celery's results would be a second copy.
task_ignore_result = True
task_track_started = False
# Priorities (enterprise before pro before free): Redis keeps a list per step of [0, 3, 6, 9] and serves
# 0 first; RabbitMQ queues are declared with x-max-priority and serve higher first (publish.py maps).
# An existing RabbitMQ queue declared without it must be deleted once to take the argument.
task_queue_max_priority = 9
task_default_queue = MAINTENANCE_QUEUE
task_create_missing_queues = True
worker_send_task_events = True  # for Flower
# No task-sent events: each would cost the web a second publish per submit; Flower still sees a task
# from the worker's received/started/succeeded events.
task_send_sent_event = False
enable_utc = True
timezone = "UTC"


def dispatch_router(settings: Settings) -> Any:
    """Route each job's dispatch to its service's queue (svc.<service>); an unknown service goes to the
    maintenance queue, where dispatch_job fails the job instead of leaving it in a queue nobody reads."""

    def route(name: str, args: Any, kwargs: dict[str, Any], options: Any, task: Any = None, **_kw: Any) -> Any:
        if name != "jobgate.dispatch_job":
            return None
        service = (kwargs or {}).get("service")
        if service in settings.services:
            return {"queue": settings.queue_for(service)}
        return {"queue": MAINTENANCE_QUEUE}

    return route


def from_settings(settings: Settings) -> dict[str, Any]:
    """Broker, routes, limits and the beat schedule for one deployment's settings."""
    gw = settings.gateway
    # RabbitMQ: publisher confirms, so a 202 means the broker has the message. (It redelivers an unacked
    # message as soon as the consumer's channel closes; its consumer_timeout, 30 min by default, must
    # exceed the longest task.)
    transport: dict[str, Any] = {"confirm_publish": True}
    if settings.celery_broker_url.startswith(("redis", "rediss")):
        transport = {
            # Redis re-delivers any message unacked this long: a killed worker's job comes back after it.
            "visibility_timeout": gw.visibility_timeout_seconds,
            # kombu 5.7: scan for expired unacked messages every 2 s instead of every ~100 s.
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": gw.publish_timeout_seconds,
        }
    return {
        "broker_url": settings.celery_broker_url,
        "broker_transport_options": transport,
        "broker_connection_timeout": gw.publish_timeout_seconds,
        "task_routes": (
            dispatch_router(settings),
            {
                "jobgate.sweep_jobs": {"queue": MAINTENANCE_QUEUE},
                "jobgate.probe_replicas": {"queue": MAINTENANCE_QUEUE},
            },
        ),
        # No time limit on dispatch: a job may wait for a slot as long as its replicas are busy, and each
        # replica call is bounded by that replica's live timeout (gateway_tasks.replicas), not by the limits
        # this process booted with.
        "task_annotations": {
            "jobgate.sweep_jobs": {"soft_time_limit": 30, "time_limit": 40},
            "jobgate.send_alert": {"soft_time_limit": 30, "time_limit": 40},
            "jobgate.probe_replicas": {
                "soft_time_limit": gw.health.timeout_seconds + 10,
                "time_limit": gw.health.timeout_seconds + 20,
            },
        },
        "beat_schedule": {
            "probe-replicas": {
                "task": "jobgate.probe_replicas",
                "schedule": gw.health.interval_seconds,
                "options": {"queue": MAINTENANCE_QUEUE, "expires": gw.health.interval_seconds},
            },
            "sweep-jobs": {
                "task": "jobgate.sweep_jobs",
                "schedule": gw.sweep_interval_seconds,
                "options": {"queue": MAINTENANCE_QUEUE, "expires": gw.sweep_interval_seconds},
            },
        },
    }
