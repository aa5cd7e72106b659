"""Live configuration (issue 4, item 9): a reload by the admin endpoint or SIGHUP moves new jobs to the new
replicas in the web process and a real worker without a restart; a bad file is refused and the running
config keeps serving."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from werkzeug.test import Client

from gateway_core.models import Tenant
from gateway_core.states import JobState
from gateway_core.tenants import create_api_key
from gateway_web.live import LiveApp
from tests.conftest import ISOLATED_QUEUE, make_tenant, wait_terminal
from tests.procs import start_worker

# A reload is a Redis generation and a file: the RabbitMQ pass of the suite leaves this module out.
pytestmark = pytest.mark.broker_independent

S = JobState


def test_reload_applies_a_good_file_everywhere_and_refuses_a_bad_one(
    db: Any, worker: Any, worker_env: dict[str, str], replicas: dict[str, str], config_file: Path, tmp_path: Path
) -> None:
    config = yaml.safe_load(config_file.read_text())
    service = {"kind": "codegen", "queue": ISOLATED_QUEUE, "max_attempts": 3, "retry_schedule_seconds": [0.2]}

    def write(replica: str) -> None:
        config["services"]["codegen-reload"] = {**service, "replicas": [{"name": replica, "url": replicas[replica]}]}
        path.write_text(yaml.safe_dump(config))

    path = tmp_path / "gateway.yaml"
    write("codegen-a")
    web = Client(LiveApp(path))  # the WSGI app gunicorn serves
    isolated = start_worker({**worker_env, "JOBGATE_CONFIG": str(path)}, [ISOLATED_QUEUE], tmp_path / "w.log")
    tenant = make_tenant(db)
    ops = make_tenant(db, credits=0)
    with db.transaction() as s:
        admin = {"Authorization": f"Bearer {create_api_key(s, s.get(Tenant, ops.tenant_id), ('admin',))}"}

    def run() -> str | None:
        time.sleep(1.2)  # processes look for a new config generation at most once a second
        resp = web.post("/v1/jobs/codegen-reload", headers=tenant.headers, json={"prompt": "x"})
        assert resp.status_code == 202, resp.json
        job = wait_terminal(db, resp.json["id"], timeout=30)
        assert job.state == S.SUCCEEDED
        return job.replica

    try:
        assert run() == "codegen-a"

        write("codegen-b")  # replica a leaves, b joins
        resp = web.post("/v1/admin/config/reload", headers=admin)
        assert resp.status_code == 200, resp.json
        assert "services.codegen-reload.replicas" in resp.json["changes"]
        assert run() == "codegen-b"

        path.write_text("services: {codegen-reload: {kind: codegen, replicas: []}}\n")
        resp = web.post("/v1/admin/config/reload", headers=admin)
        assert resp.status_code == 422 and resp.json["error"]["code"] == "CONFIG_INVALID"
        assert "replicas" in resp.json["error"]["details"]["errors"]
        os.kill(isolated.pid, signal.SIGHUP)  # the worker's main process only, not its pool
        isolated.wait_for(lambda out: "config reload refused" in out, 10, "the worker refusing the bad file")
        assert run() == "codegen-b"  # both kept the running config

        write("codegen-c")
        os.kill(isolated.pid, signal.SIGHUP)  # a reload asked for by SIGHUP reaches the web process too
        isolated.wait_for(lambda out: "config reload" in out and "requested" in out, 10, "the reload")
        assert run() == "codegen-c"
        assert isolated.popen.poll() is None  # reloaded, not restarted
    finally:
        isolated.stop()
