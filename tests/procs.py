"""Child processes for tests: started in their own session, stopped by process group, always."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from gateway_tasks.pool import GEVENT_PREFETCH

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose output goes to a log file; ``stop()`` ends its whole process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(
            args, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if predicate(out):
                return out
            if self.popen.poll() is not None:
                raise RuntimeError(f"{what}: process exited with {self.popen.returncode}:\n{out[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{what} not seen within {timeout} s:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15) -> int | None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self.signal(signal.SIGKILL)  # grandchildren left in the group
        self._fh.close()
        return self.popen.returncode


def start_replica(
    tmp: Path, service: str, name: str, *, latency_ms: int = 0, fail_rate: float = 0.0, port: int = 0
) -> tuple[Proc, str]:
    """A reference replica on ``port`` (a free one by default); returns the process and its base URL."""
    proc = Proc(
        [
            str(BIN / "jobgate"),
            "replica",
            "--service",
            service,
            "--name",
            name,
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
            "--fail-rate",
            str(fail_rate),
        ],
        tmp / f"replica-{name}-{uuid.uuid4().hex[:4]}.log",
    )
    out = proc.wait_for(lambda o: "listening on http://" in o, 30, f"replica {name}")
    url = out.split("listening on ", 1)[1].split()[0]
    return proc, url


def start_worker(
    env: dict[str, str],
    queues: list[str],
    log: Path,
    *,
    beat_schedule: Path | None = None,
    concurrency: int = 64,
    pool: str = "gevent",
) -> Proc:
    """A real Celery worker on ``queues`` with the dispatch workers' pool (gevent), with beat embedded when a
    schedule file is given; returns once it is ready."""
    args = [
        str(BIN / "celery"),
        "-A",
        "gateway_tasks.worker",
        "worker",
        "-Q",
        ",".join(queues),
        "-P",
        pool,
        "-c",
        str(concurrency),
        *(GEVENT_PREFETCH if pool == "gevent" else []),
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "-n",
        f"test-{uuid.uuid4().hex[:6]}@%h",
    ]
    if beat_schedule is not None:
        args += ["-B", "-s", str(beat_schedule)]
    proc = Proc(args, log, env=env)
    try:
        proc.wait_for(lambda o: " ready." in o, 60, "celery worker")
    except Exception:
        proc.stop()
        raise
    return proc
