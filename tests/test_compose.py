"""docker-compose.yml is accepted by `docker compose config` where the docker CLI has compose."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="this machine's docker CLI has no compose plugin")
def test_compose_file_is_valid() -> None:
    out = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
