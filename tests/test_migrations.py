"""Alembic is the only schema authority: one head, and head matches the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from gateway_core.migrate import alembic_config
from gateway_core.models import Base


def test_one_head() -> None:
    # Reads the scripts only; the URL is never connected to.
    assert len(ScriptDirectory.from_config(alembic_config("postgresql+psycopg2://unused/never")).get_heads()) == 1


def test_upgraded_database_matches_models(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
