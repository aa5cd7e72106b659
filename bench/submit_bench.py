"""Submit throughput and latency: POST /v1/jobs/codegen against a bare apply_async endpoint.

    .venv/bin/python -m bench.submit_bench [--concurrency 16] [--seconds 8] [--rounds 3] [--client wrk|python]

Starts its own stack on this machine's PostgreSQL and Redis (a scratch database, Redis db 11/12),
two gunicorn servers with the same worker model (gthread, 2 workers x 8 threads) — the full gateway
and the baseline — and drives both with the same client, alternating rounds so machine noise hits
both alike. The client is wrk (Debian package `wrk`) when it is installed: a Python client on the
same 2 cores takes CPU from the servers and caps the baseline; `--client python` forces that one.
Nothing consumes the queue; it is purged after each round. Prints a table, writes JSON to
bench/results/submit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import redis
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_core.db import Database  # noqa: E402
from gateway_core.migrate import upgrade  # noqa: E402
from gateway_core.tenants import create_api_key, create_tenant  # noqa: E402
from tests.procs import BIN, Proc, free_port  # noqa: E402

PG = os.environ.get("JOBGATE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS = os.environ.get("JOBGATE_BENCH_REDIS", "redis://127.0.0.1:6379")
GUNICORN = ["--no-control-socket", "--workers", "2", "--worker-class", "gthread", "--threads", "8"]


def _admin() -> Any:
    conn = psycopg2.connect(PG.replace("postgresql+psycopg2", "postgresql") + "/postgres")
    conn.autocommit = True
    return conn


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%s"
"""


def _ms(value: str) -> float:
    num, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(num) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def drive_wrk(
    url: str, headers: dict[str, str], body: dict[str, Any], seconds: float, concurrency: int, tmp: Path
) -> dict[str, Any]:
    """wrk for `seconds` with `concurrency` keep-alive connections on 2 threads."""
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT % (json.dumps(body), headers["Authorization"]))
    out = subprocess.run(
        ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Latency Distribution" not in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    dist = out.split("Latency Distribution", 1)[1]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": total,
        "errors": (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"50%\s+(\S+)", dist).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"99%\s+(\S+)", dist).group(1)),  # type: ignore[union-attr]
    }


def drive(url: str, headers: dict[str, str], body: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    """n POSTs from `concurrency` threads, each with its own keep-alive connection."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    per = n // concurrency

    def worker() -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(headers=headers, timeout=30) as c:
            for _ in range(per):
                t0 = time.perf_counter()
                r = c.post(url, json=body)
                mine.append(time.perf_counter() - t0)
                bad += r.status_code != 202
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=1500, help="per round and target (python client)")
    ap.add_argument("--seconds", type=float, default=8, help="per round and target (wrk client)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "submit.json")
    args = ap.parse_args()

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"jobgate-bench-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    dbname = f"jobgate_bench_{uuid.uuid4().hex[:8]}"
    admin = _admin()
    admin.cursor().execute(f'CREATE DATABASE "{dbname}"')
    procs: list[Proc] = []
    try:
        db_url = f"{PG}/{dbname}"
        upgrade(db_url)
        broker = f"{REDIS}/12"
        config = yaml.safe_load((ROOT / "gateway.yaml").read_text())
        config.update(database_url=db_url, redis_url=f"{REDIS}/11", broker_url=broker)
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
        env["JOBGATE_CONFIG"] = str(tmp / "gateway.yaml")
        db = Database(db_url)
        with db.transaction() as s:
            key = create_api_key(s, create_tenant(s, "bench", "enterprise"))
        db.dispose()

        ports = {"full": free_port(), "baseline": free_port()}
        apps = {"full": "gateway_web:create_app()", "baseline": "bench.baseline:create_baseline()"}
        for name, app in apps.items():
            p = Proc(
                [str(BIN / "gunicorn"), *GUNICORN, "--bind", f"127.0.0.1:{ports[name]}", app],
                tmp / f"{name}.log",
                env=env,
                cwd=ROOT,
            )
            procs.append(p)
            p.wait_for(lambda o: o.count("Booting worker") >= 2, 60, f"{name} server")
        urls = {
            "full": f"http://127.0.0.1:{ports['full']}/v1/jobs/codegen",
            "baseline": f"http://127.0.0.1:{ports['baseline']}/baseline",
        }
        headers = {"Authorization": f"Bearer {key}"}
        body = {"prompt": "write a function that reverses a list", "max_tokens": 128}
        queue = redis.Redis.from_url(broker)

        def run(name: str, warmup: bool = False) -> dict[str, Any]:
            if args.client == "wrk":
                return drive_wrk(urls[name], headers, body, 2 if warmup else args.seconds, args.concurrency, tmp)
            return drive(urls[name], headers, body, 200 if warmup else args.requests, args.concurrency)

        for name in urls:  # warm up connections, imports and pools
            run(name, warmup=True)
        queue.flushdb()
        rounds: dict[str, list[dict[str, Any]]] = {"full": [], "baseline": []}
        for _ in range(args.rounds):
            for name in ("baseline", "full"):
                rounds[name].append(run(name))
                queue.flushdb()

        summary = {
            name: {metric: statistics.median(r[metric] for r in rs) for metric in ("rps", "p50_ms", "p99_ms")}
            | {"errors": sum(r["errors"] for r in rs), "requests": sum(r["requests"] for r in rs)}
            for name, rs in rounds.items()
        }
        ratio = {
            "rps_full_over_baseline": summary["full"]["rps"] / summary["baseline"]["rps"],
            "p50_full_over_baseline": summary["full"]["p50_ms"] / summary["baseline"]["p50_ms"],
            "p50_added_ms": summary["full"]["p50_ms"] - summary["baseline"]["p50_ms"],
        }
        size = f"{args.seconds:g} s" if args.client == "wrk" else f"{args.requests} requests"
        print(
            f"\nsubmit benchmark ({args.client}): concurrency {args.concurrency}, {size} x {args.rounds} rounds, "
            "gunicorn gthread 2x8, medians of rounds"
        )
        print(f"{'target':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for name in ("baseline", "full"):
            s = summary[name]
            print(f"{name:<10} {s['rps']:>9.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['errors']:>7}")
        print(
            f"full / baseline: throughput x{ratio['rps_full_over_baseline']:.2f}, "
            f"p50 x{ratio['p50_full_over_baseline']:.2f} (+{ratio['p50_added_ms']:.2f} ms)"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "benchmark": "submit",
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "client": args.client,
                    "concurrency": args.concurrency,
                    "round_size": size,
                    "rounds": args.rounds,
                    "server": "gunicorn gthread 2 workers x 8 threads",
                    "cpus": os.cpu_count(),
                    "summary": summary,
                    "ratio": ratio,
                    "rounds_raw": rounds,
                },
                indent=2,
            )
        )
        print(f"wrote {args.out}")
        return 0
    finally:
        for p in procs:
            p.stop()
        admin.cursor().execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{dbname}"')
        admin.close()


if __name__ == "__main__":
    sys.exit(main())
