"""``jobgate up``: the whole stack on one machine, its children supervised by supervisord.

supervisord restarts a child that exits (with a growing back-off while it keeps failing at start) and
logs each exit; the stack stops only on Ctrl-C or SIGTERM, and then in order: Flower, beat and the
workers first (a worker's SIGTERM is Celery's warm shutdown: it takes no new job and finishes the calls in
flight, up to ``stopwaitsecs``, after which the unacked messages go back to the broker), then the web
server, the replicas and Redis. The embedded PostgreSQL stops last, when this process exits.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import httpx
import redis

import celeryconfig
from gateway_core.credits import grant
from gateway_core.db import Database
from gateway_core.errors import ConfigError
from gateway_core.migrate import upgrade
from gateway_core.models import Tenant
from gateway_core.settings import Settings
from gateway_core.tenants import create_api_key, create_tenant
from gateway_tasks.celery_app import create_celery
from gateway_tasks.pool import CELERY_ROOT_WARNING
from jobgate.embedded import redis_command
from jobgate.stack import Stack, save_state, unreachable_database

DEMO_TENANT = "demo"
DEMO_CREDITS = 100_000
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Program:
    name: str
    command: str
    priority: int  # started in ascending order, stopped in descending order
    stop_wait_seconds: int = 10
    # A Celery worker's main process alone gets SIGTERM (its warm shutdown: no new job, the pool's calls in
    # flight finish); SIGTERM to the whole group would make billiard's pool children exit mid-call.
    signal_group: bool = True
    group: str | None = None  # programs of one group stop together, not one after another


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


def _programs(
    stack: Stack, port: int, flower_port: int, redis_port: int, *, with_replicas: bool, log_level: str
) -> list[Program]:
    settings = stack.settings
    py = shlex.quote(sys.executable)
    quiet = log_level in ("warning", "error")
    # Quiet: no start-up banner per worker, and not Celery's warning about running as root (the embedded
    # stack runs as whoever starts it; a production worker should not run as root).
    celery = (
        f"{py} -W {shlex.quote(CELERY_ROOT_WARNING)} -m celery --quiet" if quiet else f"{py} -m celery"
    ) + " -A gateway_tasks.worker"
    level = log_level.upper()
    # A worker's warm shutdown waits for its calls in flight, up to the longest replica timeout.
    longest_call = max(r.timeout for svc in settings.services.values() for r in svc.replicas)
    programs: list[Program] = []
    if stack.embedded_redis:
        redis_level = {"debug": "verbose", "info": "notice"}.get(log_level, "warning")
        programs.append(Program("redis", redis_command(stack.data_dir, redis_port, redis_level), priority=10))
    jobgate = shlex.quote(str(Path(sys.executable).with_name("jobgate")))
    if with_replicas:
        for svc in settings.services.values():
            for rep in svc.replicas:
                url = urlsplit(rep.base_url)
                if url.hostname in LOCAL_HOSTS and url.port:
                    cmd = (
                        f"{jobgate} replica --service {svc.kind} --name {rep.name} --port {url.port} "
                        f"--log-level {'info' if log_level == 'debug' else log_level}"
                    )
                    programs.append(Program(f"replica.{rep.name}", cmd, priority=20))
    access_log = "--access-logfile - " if log_level == "debug" else ""
    programs.append(
        Program(
            "web",
            # gevent: a greenlet per request, so thousands of clients can wait (Prefer: wait) at once. Keep-alive
            # past clients' poll intervals: a connection closed as a request arrives fails that request.
            f"{py} -m gunicorn --no-control-socket --workers 1 --worker-class gevent --worker-connections 2000 "
            "--keep-alive 75 "
            f"--bind 127.0.0.1:{port} --log-level {log_level} {access_log}'gateway_web:create_live_app()'",
            priority=30,
        )
    )
    for queue in [*settings.queues, celeryconfig.MAINTENANCE_QUEUE]:
        # Pool and size by the configuration's rule (gateway_tasks.pool); a worker's warm shutdown waits for
        # its calls in flight, up to the longest replica timeout.
        programs.append(
            Program(
                "worker.maintenance" if queue == celeryconfig.MAINTENANCE_QUEUE else f"worker.{queue}",
                f"{jobgate} worker {queue}{' --quiet' if quiet else ''} --loglevel {level}",
                priority=40,
                stop_wait_seconds=int(longest_call) + 5,
                signal_group=False,
                group="workers",
            )
        )
    schedule = shlex.quote(str(stack.data_dir / "celerybeat-schedule"))
    programs.append(Program("beat", f"{celery} beat --loglevel {level} -s {schedule}", priority=50))
    programs.append(
        Program(
            "flower",
            # Flower warns of every inspect a worker not yet up leaves unanswered: start-up noise, not news.
            f"{celery} flower --address=127.0.0.1 --port={flower_port} --logging={'error' if quiet else log_level}",
            priority=50,
        )
    )
    return programs


def supervisord_conf(data_dir: Path, programs: list[Program], log_level: str) -> str:
    """supervisord's configuration: every child's output on this terminal, restarted when it exits."""
    password = secrets.token_urlsafe(16)  # for its control socket; the file is readable by its owner only
    lines = [
        "[supervisord]",
        "nodaemon=true",
        *(["user=root"] if os.geteuid() == 0 else []),  # said, so that supervisord does not warn of it
        "logfile=/dev/null",  # in the foreground supervisord logs to stdout itself
        "logfile_maxbytes=0",
        f"loglevel={'info' if log_level in ('debug', 'info') else 'warn'}",  # unexpected exits are warnings
        f"pidfile={data_dir / 'supervisord.pid'}",
        f"childlogdir={data_dir}",
        "",
        "[unix_http_server]",
        f"file={data_dir / 'supervisor.sock'}",
        "chmod=0700",
        "username=jobgate",
        f"password={password}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",  # `supervisorctl -c <data dir>/supervisord.conf status` shows every child
        f"serverurl=unix://{data_dir / 'supervisor.sock'}",
        "username=jobgate",
        f"password={password}",
    ]
    for p in programs:
        lines += [
            "",
            f"[program:{p.name}]",
            f"command={p.command}",
            f"priority={p.priority}",
            "autorestart=true",
            "startsecs=2",
            "startretries=100",  # a back-off that grows by a second per failed start
            "stopsignal=TERM",
            f"stopwaitsecs={p.stop_wait_seconds}",
            f"stopasgroup={'true' if p.signal_group else 'false'}",
            "killasgroup=true",  # past stopwaitsecs, SIGKILL reaches the children too
            "redirect_stderr=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
        ]
    groups: dict[str, list[str]] = {}
    for p in programs:
        if p.group:
            groups.setdefault(p.group, []).append(p.name)
    for group, names in groups.items():
        priority = min(p.priority for p in programs if p.group == group)
        lines += ["", f"[group:{group}]", f"programs={','.join(names)}", f"priority={priority}"]
    return "\n".join(lines) + "\n"


def check_reachable(settings: Settings) -> None:
    """Fail at start in one line when the database or Redis cannot be reached."""
    from sqlalchemy.exc import OperationalError

    db = Database(settings.database_url)
    try:
        db.ping()
    except OperationalError as exc:
        raise ConfigError(unreachable_database(settings.database_url, exc)) from None
    finally:
        db.dispose()


def _check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except redis.RedisError as exc:
        raise ConfigError(f"cannot reach Redis at {urlsplit(url).netloc}: {exc}") from None


def run_stack(
    stack: Stack, port: int, flower_port: int, redis_port: int, *, with_replicas: bool, log_level: str = "warning"
) -> int:
    settings, data_dir = stack.settings, stack.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)  # with an external database nothing else has made it
    check_reachable(settings)
    if not stack.embedded_redis:
        _check_redis(settings.redis_url)
    upgrade(settings.database_url)
    key = _demo_key(settings.database_url, data_dir) if stack.embedded_database else None

    env = dict(os.environ)
    env.update(stack.environment())
    programs = _programs(stack, port, flower_port, redis_port, with_replicas=with_replicas, log_level=log_level)
    conf = data_dir / "supervisord.conf"
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text(supervisord_conf(data_dir, programs, log_level))
    save_state(data_dir, redis_port=redis_port, port=port, flower_port=flower_port)

    _append_to_stdout()
    supervisor = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)], env=env)

    def stop(signum: int, _frame: FrameType | None) -> None:
        # supervisord stops its children in order; a second signal does not cut that short.
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(signum, stop)
    nodes = {*settings.queues, "maintenance"}
    banner = _banner(stack, port, flower_port, key)
    threading.Thread(target=_announce_when_ready, args=(settings, port, nodes, banner), daemon=True).start()
    print("jobgate is starting; the URLs follow once every part answers", flush=True)
    return supervisor.wait()


def _append_to_stdout() -> None:
    """supervisord writes the children's output by opening /dev/stdout anew, in append mode; when stdout is
    a file, this process's own writes must append too or they overwrite what the children wrote."""
    if stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
        flags = fcntl.fcntl(sys.stdout.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(sys.stdout.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)


def _banner(stack: Stack, port: int, flower_port: int, key: str | None) -> str:
    api = f"http://127.0.0.1:{port}"
    if key:
        database = f"embedded PostgreSQL in {stack.data_dir / 'postgres'}"
        who = f"  demo API key (also in {stack.data_dir / 'demo_api_key'}):\n    {key}\n"
    else:
        database = f"{urlsplit(stack.settings.database_url).hostname or 'local socket'} (DATABASE_URL / config)"
        who = (
            "  create a tenant and a key: jobgate tenants create NAME --credits N; jobgate keys create --tenant NAME\n"
        )
    return (
        f"\njobgate is ready (config {stack.config}; database {database})\n"
        f"  jobs     {api}/v1/jobs/<service>   (POST; GET {api}/v1/jobs/<id>)\n"
        f"  docs     {api}/docs      spec {api}/openapi.json      ready {api}/ready\n"
        f"  Flower   http://127.0.0.1:{flower_port}\n"
        f"{who}"
        "Ctrl-C stops everything.\n"
    )


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
