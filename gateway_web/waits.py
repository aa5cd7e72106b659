"""``Prefer: wait=N`` (RFC 7240, as Replicate uses it): hold a submit or a read until the job ends or N seconds
pass, woken by the word that a job ended (gateway_tasks.announce), never by polling the database."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

from flask import request

from gateway_core.errors import InvalidRequestError
from gateway_web.context import ctx

HEADER = "Prefer"
MAX_WAIT_SECONDS = 60
_SECONDS = re.compile(r"[0-9]{1,2}")  # ASCII digits only: str.isdigit() takes '²', which int() refuses
_WAIT = re.compile(r"^\s*wait\s*=\s*(?P<value>[^\s;]*)\s*(;.*)?$", re.IGNORECASE)

T = TypeVar("T")


def preferred_wait() -> int | None:
    """The seconds a client asked to wait for (1-60), None when it did not; other preferences are ignored."""
    for header in request.headers.getlist(HEADER):
        for preference in header.split(","):
            match = _WAIT.match(preference)
            if match is None:
                continue
            value = match["value"].strip('"')
            if not _SECONDS.fullmatch(value) or not 1 <= int(value) <= MAX_WAIT_SECONDS:
                raise InvalidRequestError(
                    f"Prefer: wait must be a whole number of seconds from 1 to {MAX_WAIT_SECONDS}",
                    code="INVALID_PREFER_WAIT",
                    details={"header": HEADER, "value": match["value"][:100]},
                )
            return int(value)
    return None


def applied(seconds: int) -> dict[str, str]:
    """The response header saying the wait was honoured."""
    return {"Preference-Applied": f"wait={seconds}"}


def wait_for_end(job_id: str, seconds: float, read: Callable[[], tuple[T, bool]]) -> tuple[T, bool]:
    """``read()`` (what to answer, and whether the job has ended) now, and again when the job ends or
    ``seconds`` pass; the subscription is in place before the first read, so an end in between is heard."""
    deadline = time.monotonic() + seconds
    with ctx().job_ends.expecting(job_id) as ended:
        answer, done = read()
        if done:
            return answer, done
        ended.wait(max(0.0, deadline - time.monotonic()))
    return read()
