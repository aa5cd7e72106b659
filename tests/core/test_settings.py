"""gateway.yaml: a bad file fails at start naming the bad key and value; the environment overrides it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway_core.errors import ConfigError
from gateway_core.settings import load_settings

GOOD = """
services:
  codegen:
    kind: codegen
    replicas: [{name: a, url: "http://127.0.0.1:9201"}]
"""


def test_repository_gateway_yaml_is_valid() -> None:
    settings = load_settings(Path(__file__).parents[2] / "gateway.yaml", environ={})
    assert {"transcribe", "codegen"} <= set(settings.services)
    assert settings.queue_for("transcribe") == "svc.transcribe"


def test_compose_gateway_yaml_is_valid() -> None:
    settings = load_settings(Path(__file__).parents[2] / "deploy" / "gateway.compose.yaml", environ={})
    assert {r.name for r in settings.services["codegen"].replicas} == {"codegen-a", "codegen-b"}


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(GOOD)
    s = load_settings(path, environ={"DATABASE_URL": "postgresql://x/y", "CELERY_BROKER_URL": "amqp://h//"})
    assert s.database_url == "postgresql+psycopg2://x/y" and s.celery_broker_url == "amqp://h//"
    s2 = load_settings(path, environ={"JOBGATE_CONFIG": "/nonexistent", "REDIS_URL": "redis://r:1/2"})
    assert s2.celery_broker_url == "redis://r:1/2"


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://u:p@db:5432/jobgate", "postgresql+psycopg2://u:p@db:5432/jobgate"),
        ("postgres://u@db/jobgate", "postgresql+psycopg2://u@db/jobgate"),
        ("postgresql+psycopg2://u@db/jobgate", "postgresql+psycopg2://u@db/jobgate"),
    ],
)
def test_database_urls_as_users_write_them_use_the_shipped_driver(tmp_path: Path, given: str, used: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(GOOD)
    assert load_settings(path, environ={"DATABASE_URL": given}).database_url == used


# URLs of engines or drivers jobgate does not run on (SQLite was the old embedded default): each must be refused.
@pytest.mark.parametrize("url", ["sqlite:///jobgate.db", "mysql://u:secret@db/x", "postgresql+psycopg://u@db/x", "db"])
def test_other_database_urls_are_one_line_naming_the_forms_accepted(tmp_path: Path, url: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={"DATABASE_URL": url})
    assert "postgresql://, postgres:// or postgresql+psycopg2://" in str(err.value)
    assert "secret" not in str(err.value)  # a password is never echoed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("kind: codegen", "kind: telepathy"), ["services.codegen.kind", "'telepathy'"]),
        (
            GOOD.replace('"http://127.0.0.1:9201"', '"not a url"'),
            ["services.codegen.replicas.0.url", "'not a url'"],
        ),
        (GOOD + "gateway: {max_body_bytes: -5}\n", ["gateway.max_body_bytes", "-5"]),
        (GOOD + "gateway: {colour: blue}\n", ["gateway.colour: unknown key"]),
        (GOOD.replace("codegen:", "Bad Name:"), ["services", "'Bad Name'"]),
        (
            GOOD.replace("kind: codegen", "kind: codegen\n    retry_schedule_seconds: [1, -2]"),
            ["services.codegen.retry_schedule_seconds.1", "-2"],
        ),
        ("services: [1, 2", ["not valid YAML"]),
    ],
)
def test_bad_config_names_key_and_value(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml", environ={})
