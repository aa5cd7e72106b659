"""`jobgate up` as a new user runs it: embedded PostgreSQL and Redis, the README's walks, a child that dies
comes back, Ctrl-C stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.audio import wav_bytes
from tests.procs import BIN, Proc, free_port

ROOT = Path(__file__).parents[1]


def readme_block(marker: str) -> list[str]:
    """The commands of the README's ``sh`` block that follows ``marker``, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(marker) + r"\s*```sh\n(.*?)```", text, re.S)
    assert block, f"README has no sh block after {marker!r}"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postgres" / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` has exited within ``timeout`` (a zombie not yet reaped by init counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _replica_process(up_pid: int, name: str) -> psutil.Process | None:
    for child in psutil.Process(up_pid).children(recursive=True):
        try:
            if "replica" in child.cmdline() and name in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[tuple[Proc, Path, int, dict[str, str]]]:
    """`jobgate up` in a fresh directory, on the repository's config with ports free on this machine."""
    config = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    for svc in config["services"].values():
        for rep in svc["replicas"]:
            rep["url"] = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env.pop("JOBGATE_CONFIG", None)
    env.pop("JOBGATE_DATA_DIR", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `jobgate` as after `. .venv/bin/activate`
    port = free_port()
    args = ["jobgate", "up", "--port", str(port), "--flower-port", str(free_port()), "--redis-port", str(free_port())]
    up = Proc([str(BIN / "jobgate"), *args[1:]], tmp_path / "up.log", env=env, cwd=tmp_path)
    children: list[psutil.Process] = []
    try:
        up.wait_for(lambda o: "jobgate is ready" in o, 120, "jobgate up ready banner")
        children = psutil.Process(up.pid).children(recursive=True)
        yield up, tmp_path, port, env
    finally:
        up.signal(signal.SIGTERM)
        try:
            up.popen.wait(60)
        except subprocess.TimeoutExpired:
            pass
        pg = _postmaster_pid(tmp_path / ".jobgate")
        leftovers = [p for p in children if p.is_running()]
        for proc in leftovers:
            proc.kill()
        if pg and psutil.pid_exists(pg):
            os.kill(pg, signal.SIGKILL)
        up.stop()


def test_up_runs_the_readme_walks_restarts_a_dead_child_and_stops_every_child(
    stack: tuple[Proc, Path, int, dict[str, str]],
) -> None:
    up, cwd, port, env = stack
    data = cwd / ".jobgate"
    out = up.output()
    banner = out[out.index("jobgate is ready") :]
    for url in re.findall(r"http://127\.0\.0\.1:\d+/[\w./-]*(?<![/<])(?=\s)", banner):  # every URL shown works
        assert httpx.get(url, timeout=10, follow_redirects=True).status_code == 200, url
    key = (data / "demo_api_key").read_text().strip()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=10)

    submitted = time.monotonic()
    resp = api.post(
        "/v1/jobs/transcribe", files={"file": ("hello.wav", wav_bytes(2.0), "audio/wav")}, data={"language": "en"}
    )
    assert resp.status_code == 202, resp.text
    while (job := api.get(resp.headers["Location"]).json())["status"] not in ("SUCCEEDED", "FAILED"):
        assert time.monotonic() - submitted < 10, f"not done within 10 s: {job}\n{up.output()[-3000:]}"
        time.sleep(0.2)
    assert job["status"] == "SUCCEEDED", job
    assert job["result"]["output"]["text"] == "[simulated transcript of 2.00 s of audio]"

    # Clients that wait (Prefer: wait) are held by the gevent web server together and answered as their jobs end.
    def submit_and_wait(i: int) -> httpx.Response:
        with httpx.Client(base_url=api.base_url, headers=api.headers, timeout=60) as one:
            return one.post("/v1/jobs/codegen", headers={"Prefer": "wait=30"}, json={"prompt": f"job {i}"})

    # As many as the demo tenant (tier pro) may have in progress at once.
    with ThreadPoolExecutor(max_workers=8) as pool:
        waited = list(pool.map(submit_and_wait, range(8)))
    assert all(r.status_code == 200 and r.json()["status"] == "SUCCEEDED" for r in waited), [r.text for r in waited]
    assert {r.headers["Preference-Applied"] for r in waited} == {"wait=30"}

    # An upload refused before its body is read (a bad Idempotency-Key) leaves the kept-alive connection usable.
    for _ in range(3):
        refused = api.post(
            "/v1/jobs/transcribe",
            headers={"Idempotency-Key": "not visible ascii"},
            files={"file": ("big.wav", wav_bytes(30.0), "audio/wav")},
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_IDEMPOTENCY_KEY"
        assert api.get("/health").status_code == 200

    # The README's admin walk, verbatim, from the directory `jobgate up` runs in.
    for command in readme_block("<!-- admin walk -->"):
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    listing = subprocess.run(
        ["jobgate", "tenants", "list"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert re.search(r"\tacme\tpro\t1500\t0$", listing, re.M), listing

    # A replica killed outright comes back (supervised), on its port, while the API keeps answering.
    replica = _replica_process(up.pid, "transcribe-a")
    assert replica is not None
    replica.kill()
    deadline = time.monotonic() + 30
    while (again := _replica_process(up.pid, "transcribe-a")) is None or again.pid == replica.pid:
        assert time.monotonic() < deadline, up.output()[-3000:]
        assert api.get("/health").status_code == 200
        time.sleep(0.2)
    assert "exited: replica.transcribe-a (terminated by SIGKILL; not expected)" in up.output()

    # Ctrl-C to jobgate up alone: it stops its children itself, the embedded PostgreSQL last.
    children = psutil.Process(up.pid).children(recursive=True)
    assert len(children) >= 10  # supervisord, redis, web, 3 workers, beat, flower, 4 replicas and theirs
    postmaster = _postmaster_pid(data)
    assert postmaster is not None and psutil.pid_exists(postmaster)
    os.kill(up.pid, signal.SIGINT)
    up.popen.wait(90)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], f"still running after Ctrl-C: {[p.cmdline() for p in alive]}"
    assert _gone(postmaster, timeout=15), "the embedded PostgreSQL still runs after Ctrl-C"


def test_up_on_a_database_url_as_users_write_it(tmp_path: Path, database_url: str) -> None:
    """`postgres://…` (Heroku's form) runs the stack on that database: no embedded PostgreSQL, no demo tenant."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL", "JOBGATE_DATA_DIR")}
    env["DATABASE_URL"] = database_url.replace("postgresql+psycopg2://", "postgres://", 1)
    env["JOBGATE_CONFIG"] = str(ROOT / "gateway.yaml")
    port = free_port()
    ports = ["--port", str(port), "--flower-port", str(free_port()), "--redis-port", str(free_port())]
    up = Proc([str(BIN / "jobgate"), "up", "--no-replicas", *ports], tmp_path / "up.log", env=env, cwd=tmp_path)
    children: list[psutil.Process] = []
    try:
        out = up.wait_for(lambda o: "jobgate is ready" in o, 120, "jobgate up ready banner")
        children = psutil.Process(up.pid).children(recursive=True)
        assert "(DATABASE_URL / config)" in out and "demo API key" not in out
        assert (
            not (tmp_path / ".jobgate" / "postgres").exists() and not (tmp_path / ".jobgate" / "demo_api_key").exists()
        )
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).status_code == 200
        os.kill(up.pid, signal.SIGINT)
        up.popen.wait(90)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], f"still running after Ctrl-C: {[p.cmdline() for p in alive]}"
    finally:
        for proc in children:
            if proc.is_running():
                proc.kill()
        up.stop()
