"""`jobgate up` as a new user runs it: embedded Redis and SQLite, the README's walk, Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import yaml

from tests.audio import wav_bytes
from tests.procs import BIN, Proc, free_port

ROOT = Path(__file__).parents[1]


def test_up_runs_the_readme_walk_and_stops_every_child(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    for svc in config["services"].values():  # the repository's config, on ports free on this machine
        for rep in svc["replicas"]:
            rep["url"] = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env["JOBGATE_CONFIG"] = str(tmp_path / "gateway.yaml")
    port, data = free_port(), tmp_path / "data"
    up = Proc(
        [
            str(BIN / "jobgate"),
            "up",
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--flower-port",
            str(free_port()),
            "--redis-port",
            str(free_port()),
        ],
        tmp_path / "up.log",
        env=env,
        cwd=tmp_path,
    )
    try:
        # What a user waits for: the banner appears once the API and a worker of every queue answer.
        up.wait_for(lambda o: "jobgate is ready" in o, 120, "jobgate up ready banner")
        key = (data / "demo_api_key").read_text().strip()
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        deadline = time.monotonic() + 60
        while True:  # wait until the web process answers and every dependency is reachable
            try:
                if api.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, up.output()[-3000:]
            time.sleep(0.3)

        submitted = time.monotonic()
        resp = api.post(
            "/v1/jobs/transcribe",
            files={"file": ("hello.wav", wav_bytes(2.0), "audio/wav")},
            data={"language": "en"},
        )
        assert resp.status_code == 202, resp.text
        while (job := api.get(resp.headers["Location"]).json())["status"] not in ("SUCCEEDED", "FAILED"):
            assert time.monotonic() - submitted < 10, f"not done within 10 s: {job}\n{up.output()[-3000:]}"
            time.sleep(0.2)
        assert job["status"] == "SUCCEEDED", job
        assert job["result"]["output"]["text"] == "[simulated transcript of 2.00 s of audio]"
        assert (data / "jobgate.db").exists()  # the embedded default: SQLite in the data dir

        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 10  # redis, web, 3 workers, beat, flower, 4 replicas and their children
        os.kill(up.pid, signal.SIGINT)  # Ctrl-C to jobgate up alone: it must stop its children itself
        up.popen.wait(30)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], f"still running after Ctrl-C: {[p.pid for p in alive]}"
    finally:
        up.stop()
