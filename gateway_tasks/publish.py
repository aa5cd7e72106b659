"""The one way a dispatch message is sent: task id = job id, routed to the service's queue by
celeryconfig's task_routes, failing fast."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery import Celery

log = logging.getLogger(__name__)

DISPATCH_TASK = "jobgate.dispatch_job"
# Retry a failed publish once, quickly: a submit must answer fast while the broker is away,
# and the sweeper sends whatever was committed but not published.
_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def broker_priority(app: Celery, priority: int) -> int:
    """Our priority (0 first, as Redis orders it) in the broker's terms: RabbitMQ serves higher first."""
    return priority if str(app.conf.broker_url).startswith(("redis", "rediss")) else 9 - priority


def publish_dispatch(app: Celery, job_id: str, service: str, *, priority: int = 6) -> bool:
    """Hand the job's dispatch message to the broker; False (logged) when the broker cannot take it."""
    try:
        app.send_task(
            DISPATCH_TASK,
            args=[job_id],
            kwargs={"service": service},
            task_id=job_id,
            priority=broker_priority(app, priority),
            retry=True,
            retry_policy=_RETRY_POLICY,
        )
    except Exception as exc:  # kombu raises OperationalError, redis/amqp their own connection errors
        log.warning("could not publish dispatch of job %s (%s): %s", job_id, service, exc)
        return False
    return True


def empty_queues(app: Celery, queues: Iterable[str]) -> set[str]:
    """The queues holding no message ready for a worker (a queue the broker does not have holds none).
    Messages a worker has taken but not acknowledged do not count: they are the worker's."""
    empty = set()
    with app.connection_for_read() as conn:
        for queue in queues:
            channel = conn.channel()  # its own: RabbitMQ closes a channel that asked for a missing queue
            try:
                if channel.queue_declare(queue=queue, passive=True).message_count == 0:
                    empty.add(queue)
            except conn.channel_errors:
                empty.add(queue)
            finally:
                channel.close()
    return empty
