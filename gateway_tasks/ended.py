"""Word that jobs ended, for the requests waiting on them (``Prefer: wait``): each id is published on one Redis
channel once the transaction that ended the job has committed; every web process listens with one
subscription (gateway_tasks.fanout)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from gateway_tasks.fanout import Fanout

log = logging.getLogger(__name__)

JOBS_ENDED_CHANNEL = "jobgate:jobs:ended"


def announcer(client: redis.Redis) -> Callable[[list[str]], None]:
    """A hook for Database.on_jobs_ended that publishes the ids; Redis being away costs the waiters only
    promptness (they read the job when their wait runs out), never the transaction."""

    def announce(job_ids: list[str]) -> None:
        try:
            with client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.publish(JOBS_ENDED_CHANNEL, job_id)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not announce the end of %d job(s): %s", len(job_ids), exc)

    return announce


def end_listener(client: redis.Redis) -> Fanout:
    """This process's subscription to the ends of jobs (``client`` without a read timeout: it waits)."""
    return Fanout(client, JOBS_ENDED_CHANNEL)
