"""The worker pool. Dispatch workers run Celery's gevent pool: one process, a greenlet per job, so the jobs in
flight follow the replicas' capacity instead of the number of processes (a job spends its life waiting on a
replica). Celery monkey-patches the standard library before it imports the app (``-P gevent``); psycopg2 is a C
library and needs its own wait callback, or every query would stop the whole process.

Sizing rule: a worker on a service queue runs ``Settings.dispatch_concurrency(queue)`` greenlets, the replicas'
Σ max_concurrency and a quarter more, and takes messages one ahead of them (see GEVENT_PREFETCH). The maintenance
queue (sweeper, probes, alerts) runs one prefork process.
"""

from __future__ import annotations

from celery import Celery
from gevent import monkey

import celeryconfig
from gateway_core.settings import Settings

# A -W filter (a message prefix): Celery warns of a worker running as root, as the embedded stack may.
CELERY_ROOT_WARNING = "ignore:You're running the worker with superuser"


def gevent_active() -> bool:
    """True in a process whose sockets gevent has patched (a ``-P gevent`` worker)."""
    return bool(monkey.is_module_patched("socket"))


def cooperate_with_gevent() -> None:
    """Make psycopg2 yield to other greenlets while it waits on the server, and kombu while it waits to reach a
    broker; nothing outside a gevent process."""
    if gevent_active():
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
        _yield_between_broker_retries()


def _yield_between_broker_retries() -> None:
    """The ``celery`` command imports ``kombu.utils`` before it monkey-patches the standard library, so
    ``kombu.utils.functional`` keeps the blocking ``time.sleep`` it imported by name. Kombu sleeps with it
    between a worker's attempts to reach a broker that is away: the whole gevent process, every replica call in
    flight and every answer waiting to be recorded, stood still until the broker came back. Its name is pointed
    at the patched sleep (celery/kombu 5.7.0, gevent 26.9.0)."""
    import time

    import kombu.utils.functional

    if kombu.utils.functional.sleep is not time.sleep:
        kombu.utils.functional.sleep = time.sleep


def without_task_events_on_amqp(app: Celery) -> None:
    """No task events from a gevent worker on RabbitMQ. Celery's event dispatcher publishes under one mutex and,
    with publisher confirms, waits under it for the broker's ack on a py-amqp connection, which is not safe for
    concurrent greenlets. Seen in the test suite: the worker-heartbeat greenlet waited for an ack that never came
    while holding the mutex, and the consumer, sending a task-received event, waited behind it — the worker took
    no message again. Without task events only the heartbeat publishes there, so the consumer never waits on it;
    Flower still lists the worker (heartbeats) but not its dispatch tasks, whose states are in the job rows."""
    if gevent_active() and str(app.conf.broker_url).startswith("amqp"):
        app.conf.worker_send_task_events = False


# A gevent worker consumes in Celery's blocking loop, which polls the broker with a 2 s timeout: with Redis,
# once its unacked messages reach the prefetch limit it stops asking for more, and an ack does not wake it,
# so a freed greenlet could idle up to 2 s. With a multiplier of 2 it keeps asking: the next message is taken
# while every greenlet is busy and handed over the moment one frees (the pool blocks it until then), so a
# worker holds at most one message more than it has greenlets.
GEVENT_PREFETCH = ["--prefetch-multiplier", "2"]


def worker_options(settings: Settings, queue: str) -> list[str]:
    """``celery worker`` options for one queue: its pool, its size and a node name after the queue."""
    if queue == celeryconfig.MAINTENANCE_QUEUE:
        pool = ["-P", "prefork", "-c", "1"]
        node = "maintenance"
    elif queue in settings.queues:
        pool = ["-P", "gevent", "-c", str(settings.dispatch_concurrency(queue)), *GEVENT_PREFETCH]
        node = queue
    else:
        raise ValueError(f"no service reads queue {queue!r}; queues: {', '.join(settings.queues)}")
    return [*pool, "-Q", queue, "-n", f"{node}@%h"]
