"""Engine and the one unit of work: ``with db.transaction() as session`` commits once, or rolls back."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, create_engine, event, insert, select, union_all
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import Insert, Update

log = logging.getLogger(__name__)

# session.info key: the jobs the session's transaction moved to another state, each with whether it ended.
MOVED_JOBS = "jobgate.moved_jobs"


@dataclass(frozen=True)
class Moves:
    """The jobs one committed transaction moved, and those of them it ended."""

    moved: list[str]
    ended: list[str]


def note_moved(session: Session, job_id: str, *, ended: bool) -> None:
    """Remember that this transaction moves ``job_id`` (to a terminal state when ``ended``), for the Database's
    on_jobs_moved hooks after commit."""
    noted: dict[str, bool] = session.info.setdefault(MOVED_JOBS, {})
    noted[job_id] = ended or noted.get(job_id, False)


def make_engine(url: str) -> Engine:
    """A PostgreSQL engine (production and the embedded default run the same server, the same SQL).

    Up to 30 connections per process, 20 of them kept: the pool closes an overflow connection as soon as it
    is returned, and a dispatch worker of 16 replica slots runs 20 greenlets, each in a transaction now and
    then; with 10 kept it opened and closed a server process every few jobs."""
    engine = create_engine(url, pool_size=20, max_overflow=10, pool_timeout=10, pool_recycle=1800)
    event.listen(engine.pool, "checkin", _stamp)
    event.listen(engine.pool, "checkout", _ping_if_idle)
    return engine


IDLE_PING_SECONDS = 10.0


def _stamp(dbapi_conn: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, proxy: Any) -> None:
    """pool_pre_ping costs a round trip per transaction (a third of a submit's); ping only connections
    that sat idle, where a server restart or a firewall is likely to have cut them. A connection cut
    while busy fails its statement once: the pool is invalidated and the caller gets a 503 (web) or a
    retry (worker)."""
    if time.monotonic() - record.info.get("checked_in_at", 0.0) < IDLE_PING_SECONDS:
        return
    try:
        cur = dbapi_conn.cursor()
        cur.execute("SELECT 1")
        cur.close()
    except Exception as exc:
        raise DisconnectionError(str(exc)) from exc


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._moved_hooks: list[Callable[[Moves], None]] = []
        event.listen(self._sessions, "after_commit", self._after_commit)
        event.listen(self._sessions, "after_rollback", lambda session: session.info.pop(MOVED_JOBS, None))

    def on_jobs_moved(self, hook: Callable[[Moves], None]) -> None:
        """Call ``hook`` with the jobs a transaction moved (and ended), once it has committed. A hook that
        raises is logged: the transaction is already durable."""
        self._moved_hooks.append(hook)

    def _after_commit(self, session: Session) -> None:
        noted: dict[str, bool] | None = session.info.pop(MOVED_JOBS, None)
        if not noted:
            return
        moves = Moves(list(noted), [job_id for job_id, ended in noted.items() if ended])
        for hook in self._moved_hooks:
            try:
                hook(moves)
            except Exception:
                log.exception("a jobs-moved hook failed")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: commit when the block ends, roll back when it raises."""
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()


@dataclass
class Writes:
    """INSERT/UPDATE statements built once, with bind parameters named ``<row>__<column>`` (``job__id``,
    ``tenant__credits_balance``: never a column's own name, so one dict of values can feed them all), and
    the values for one execution."""

    statements: list[Insert | Update] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: Writes) -> Writes:
        clash = [k for k in self.params.keys() & other.params.keys() if self.params[k] != other.params[k]]
        if clash:  # the same statement twice with different values: it needs its own parameter names
            raise ValueError(f"writes disagree on {sorted(clash)}")
        return Writes([*self.statements, *other.statements], {**self.params, **other.params})


def write_together(session: Session, writes: Writes) -> None:
    """Run independent writes in one round trip: PostgreSQL runs them as data-modifying CTEs of one
    statement. They share one snapshot, so none may read what another writes or touch the same row, and
    foreign keys between their rows are checked when the statement ends."""
    stmt = writes.statements[0] if len(writes.statements) == 1 else _together(tuple(writes.statements))
    session.execute(stmt, writes.params)


@functools.lru_cache(maxsize=64)
def _together(statements: tuple[Insert | Update, ...]) -> Insert | Update:
    """One statement of several built-once ones, itself built once, so SQLAlchemy compiles it once."""
    first, *rest = statements
    return first.add_cte(*(stmt.cte(f"write_{i}") for i, stmt in enumerate(rest)))


def insert_rows(table: Table, prefixes: Sequence[str], columns: Sequence[str]) -> Insert:
    """An INSERT of one row per prefix, in that order (ids follow it), each column's value the parameter
    ``<prefix>__<column>``. Written INSERT … SELECT … UNION ALL …: SQLAlchemy caches no multi-row VALUES,
    and sibling statements of ``write_together`` run in no set order."""
    rows = [select(*(bindparam(f"{p}__{c}", type_=table.c[c].type) for c in columns)) for p in prefixes]
    return insert(table).from_select(list(columns), rows[0] if len(rows) == 1 else union_all(*rows))
