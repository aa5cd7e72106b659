"""Word that jobs moved, for the requests following them: every move is published on one Redis channel (event
streams), every end also on another (``Prefer: wait``), once the transaction that made it has committed; each
web process listens with one subscription per channel (gateway_tasks.fanout)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from gateway_core.db import Moves
from gateway_tasks.fanout import Fanout

log = logging.getLogger(__name__)

JOBS_ENDED_CHANNEL = "jobgate:jobs:ended"
JOBS_MOVED_CHANNEL = "jobgate:jobs:moved"


def announcer(client: redis.Redis) -> Callable[[Moves], None]:
    """A hook for Database.on_jobs_moved that publishes the ids (one round trip); Redis being away costs the
    followers only promptness (a wait reads the job when it runs out, a stream at its next keep-alive), never
    the transaction."""

    def announce(moves: Moves) -> None:
        try:
            with client.pipeline(transaction=False) as pipe:
                for job_id in moves.moved:
                    pipe.publish(JOBS_MOVED_CHANNEL, job_id)
                for job_id in moves.ended:
                    pipe.publish(JOBS_ENDED_CHANNEL, job_id)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not announce the moves of %d job(s): %s", len(moves.moved), exc)

    return announce


def end_listener(client: redis.Redis) -> Fanout:
    """This process's subscription to the ends of jobs (``client`` without a read timeout: it waits)."""
    return Fanout(client, JOBS_ENDED_CHANNEL)


def move_listener(client: redis.Redis) -> Fanout:
    """This process's subscription to every move of a job (``client`` without a read timeout: it waits)."""
    return Fanout(client, JOBS_MOVED_CHANNEL)
