"""Which jobs' dispatch messages a live worker holds, so the sweeper can tell a lost message from a busy one.

A job can stay QUEUED long after its message was sent and still be in good hands: the message waits in a
worker's prefetch buffer, or its greenlet waits in the service's line for a free slot. The broker cannot say
so (an unacknowledged message is invisible to a queue's length), and a message a broker lost looks the same
from PostgreSQL. So each dispatch worker process keeps the ids of the jobs whose messages it holds (from the
moment it receives one until its task has run) in a Redis sorted set, each scored by when the claim expires,
and renews them every few seconds; a worker that dies stops renewing, and its jobs count as unheld
``HOLD_SECONDS`` later. The sweeper sends again only a job no live worker holds (``holding``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

import redis
from celery.signals import task_postrun, task_received, task_revoked

from gateway_tasks.publish import DISPATCH_TASK

log = logging.getLogger(__name__)

KEY = "jobgate:in_hand"
RENEW_SECONDS = 5.0
GATHER_SECONDS = 0.2  # changes are written together: one round trip for a burst of messages, not one each
HOLD_SECONDS = 3 * RENEW_SECONDS  # a claim not renewed this long belongs to a dead worker


def holding(client: redis.Redis, now: float) -> set[str]:
    """The ids of the jobs whose dispatch messages live workers hold."""
    return {m.decode() for m in client.zrangebyscore(KEY, now, "+inf")}  # type: ignore[union-attr]


class InHand:
    """This process's held messages, counted per job (a duplicate message is held twice), written to Redis by a
    background thread (a greenlet in a gevent worker): soon after a change, and every RENEW_SECONDS."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._held: Counter[str] = Counter()
        self._gone: set[str] = set()
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    def took(self, job_id: str) -> None:
        with self._lock:
            self._held[job_id] += 1
            self._gone.discard(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_forever, name="in-hand", daemon=True)
                self._thread.start()
        self._changed.set()

    def done(self, job_id: str) -> None:
        with self._lock:
            if self._held[job_id] > 1:
                self._held[job_id] -= 1
                return
            self._held.pop(job_id, None)
            self._gone.add(job_id)
        self._changed.set()

    def renew(self) -> None:
        """Write this process's claims, renewed, and drop those it let go."""
        with self._lock:
            held, gone = list(self._held), list(self._gone)
            self._gone.clear()
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        if held:
            pipe.zadd(KEY, dict.fromkeys(held, now + HOLD_SECONDS))
        if gone:
            pipe.zrem(KEY, *gone)
        pipe.zremrangebyscore(KEY, "-inf", now - HOLD_SECONDS)  # dead workers' claims
        try:
            pipe.execute()
        except redis.RedisError as exc:
            with self._lock:  # tried again at the next renewal
                self._gone.update(job_id for job_id in gone if job_id not in self._held)
            log.warning("held dispatch messages not written to Redis: %s", exc)

    def _renew_forever(self) -> None:
        while True:
            if self._changed.wait(RENEW_SECONDS):
                time.sleep(GATHER_SECONDS)
            self._changed.clear()
            self.renew()


def _in_hand(app: Any) -> InHand | None:
    ctx = getattr(app, "jobgate", None)
    return getattr(ctx, "in_hand", None)


@task_received.connect
def _took(sender: Any = None, request: Any = None, **_kw: Any) -> None:
    if request is not None and request.name == DISPATCH_TASK and (hand := _in_hand(request.task.app)) is not None:
        hand.took(request.id)


@task_postrun.connect
def _ran(sender: Any = None, task_id: str | None = None, **_kw: Any) -> None:
    if sender is not None and sender.name == DISPATCH_TASK and task_id and (hand := _in_hand(sender.app)) is not None:
        hand.done(task_id)


@task_revoked.connect
def _revoked(sender: Any = None, request: Any = None, **_kw: Any) -> None:
    if sender is not None and sender.name == DISPATCH_TASK and request is not None:
        if (hand := _in_hand(sender.app)) is not None:
            hand.done(request.id)
