"""Submit throughput and latency: POST /v1/jobs/codegen against a bare apply_async endpoint.

    .venv/bin/python -m bench.submit_bench [--concurrency 16] [--seconds 8] [--rounds 3] [--client wrk|python]

Starts its own stack on this machine's PostgreSQL and Redis (a scratch database, Redis db 11/12),
gunicorn servers of 2 workers — the full gateway and the baseline on gthread (x 8 threads), and the full
gateway again on gevent, the web model `jobgate up` runs — and drives them with the same client, alternating
rounds so machine noise hits them alike. The client is wrk (Debian package `wrk`) when it is installed: a Python
client on the same 2 cores takes CPU from the servers and caps the baseline; `--client python` forces that one.
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

from gateway_core.credits import grant  # noqa: E402
from gateway_core.db import Database  # noqa: E402
from gateway_core.migrate import upgrade  # noqa: E402
from gateway_core.tenants import create_api_key, create_tenant  # noqa: E402
from tests.procs import BIN, Proc, free_port  # noqa: E402

PG = os.environ.get("JOBGATE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS = os.environ.get("JOBGATE_BENCH_REDIS", "redis://127.0.0.1:6379")
GUNICORN = ["--no-control-socket", "--workers", "2"]
GTHREAD = ["--worker-class", "gthread", "--threads", "8"]
GEVENT = ["--worker-class", "gevent", "--worker-connections", "2000"]


def _admin() -> Any:
    conn = psycopg2.connect(PG.replace("postgresql+psycopg2", "postgresql") + "/postgres")
    conn.autocommit = True
    return conn


WRK_SCRIPT = """
local keys = {%s}
local body = [[%s]]
local n = 0
request = function()
  n = n + 1
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = keys[(n %% #keys) + 1]}
  return wrk.format("POST", nil, headers, body)
end
"""


def _ms(value: str) -> float:
    num, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(num) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def drive_wrk(
    url: str, auth: list[str], body: dict[str, Any], seconds: float, concurrency: int, tmp: Path
) -> dict[str, Any]:
    """wrk for `seconds` with `concurrency` keep-alive connections on 2 threads, rotating the API keys."""
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT % (", ".join(json.dumps(a) for a in auth), json.dumps(body)))
    out = subprocess.run(
        ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
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


def drive(url: str, auth: list[str], body: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    """n POSTs from `concurrency` threads, each with its own keep-alive connection and API key."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    per = n // concurrency

    def worker(index: int) -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(headers={"Authorization": auth[index % len(auth)]}, timeout=30) as c:
            for _ in range(per):
                t0 = time.perf_counter()
                r = c.post(url, json=body)
                mine.append(time.perf_counter() - t0)
                bad += r.status_code != 202
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
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


def _finish_jobs(dbname: str, stop: threading.Event) -> None:
    conn = psycopg2.connect(PG.replace("postgresql+psycopg2", "postgresql") + f"/{dbname}")
    conn.autocommit = True
    while not stop.wait(0.2):
        conn.cursor().execute("UPDATE jobs SET state = 'SUCCEEDED' WHERE state = 'QUEUED'")
    conn.close()


def measure_admission(config: Path, key: str, samples: int) -> dict[str, float]:
    """What admission adds to a submit, measured in-process so server noise does not swamp it:
    the database part (lock, concurrency count, quotas, reservation, ledger, usage) as admit() against
    recording the job alone, and the rate limits as one request with limits on against off."""
    from gateway_core.admission import JobInput, admit
    from gateway_core.jobs import create_job
    from gateway_core.models import Job
    from gateway_core.settings import load_settings
    from gateway_core.tenants import authenticate_key
    from gateway_web import create_app

    settings = load_settings(config, environ={})
    db = Database(settings.database_url)
    job_input = JobInput("codegen", {"prompt": "x", "max_tokens": 128})

    def record() -> None:
        with db.transaction() as s:
            p = authenticate_key(s, key)
            create_job(s, tenant_id=p.tenant_id, service="codegen", request=job_input.request)

    def admitted() -> None:
        with db.transaction() as s:
            p = authenticate_key(s, key)
            admit(s, settings, tenant_id=p.tenant_id, job_input=job_input)

    off = settings.model_copy(update={"rate_limits": settings.rate_limits.model_copy(update={"enabled": False})})
    clients = {"on": create_app(settings).test_client(), "off": create_app(off).test_client()}
    headers = {"Authorization": f"Bearer {key}"}
    fns = {
        "record job (no admission)": record,
        "admit job (admission)": admitted,
        "request, rate limits on": lambda: clients["on"].get("/v1/credits?limit=1", headers=headers),
        "request, rate limits off": lambda: clients["off"].get("/v1/credits?limit=1", headers=headers),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(10):  # interleaved rounds: noise hits every variant alike
        for name, fn in fns.items():
            for i in range(samples // 10 + (5 if round_ == 0 else 0)):
                t0 = time.perf_counter()
                fn()
                if round_ or i >= 5:  # the first five of the first round warm up
                    times[name].append(time.perf_counter() - t0)
                if i % 20 == 19:  # keep the tenant's active jobs under its cap, as workers would
                    with db.transaction() as s:
                        s.query(Job).filter(Job.state == "QUEUED").update({"state": "SUCCEEDED"})
    med = {name: 1000 * statistics.median(ts) for name, ts in times.items()}
    # Round trips to Redis per limited request (EVALSHA calls: the limits' scripts), counted by Redis itself.
    server = redis.Redis.from_url(settings.redis_url)
    calls = lambda: server.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)  # noqa: E731
    before = calls()
    for _ in range(100):
        fns["request, rate limits on"]()
    med["Redis round trips per limited request (count)"] = (calls() - before) / 100
    db.dispose()
    med["admission in the database (admit - record)"] = med["admit job (admission)"] - med["record job (no admission)"]
    med["rate limits (on - off)"] = med["request, rate limits on"] - med["request, rate limits off"]
    med["admission added to a submit"] = (
        med["admission in the database (admit - record)"] + med["rate limits (on - off)"]
    )
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=1500, help="per round and target (python client)")
    ap.add_argument("--seconds", type=float, default=8, help="per round and target (wrk client)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--admission-samples", type=int, default=600)
    ap.add_argument("--tenants", type=int, default=32, help="API keys (tenants) the load rotates over")
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
        # Limits are evaluated on every request (their cost is measured): the default tiers' three windows and the
        # global limit, set high enough not to refuse.
        tier = {
            "rate_limit": "10000000/minute;100000000/hour;1000000000/day",
            "read_rate_limit": "10000000/minute",
            "concurrency": 50,
        }
        config["tiers"] = {"enterprise": tier}
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
        env["JOBGATE_CONFIG"] = str(tmp / "gateway.yaml")
        db = Database(db_url)
        keys = []
        for i in range(args.tenants):  # a gateway serves many tenants; each one's admissions serialize
            with db.transaction() as s:
                tenant = create_tenant(s, f"bench-{i}", "enterprise")
                keys.append(create_api_key(s, tenant))
            with db.transaction() as s:
                grant(s, tenant.id, 10**12)
        db.dispose()
        admission = measure_admission(tmp / "gateway.yaml", keys[0], args.admission_samples)
        # Nothing runs the queued jobs; finish them every 0.2 s, as workers would, so that tenants'
        # active-job counts stay under their concurrency caps.
        stop_finishing = threading.Event()
        finisher = threading.Thread(target=_finish_jobs, args=(dbname, stop_finishing), daemon=True)
        finisher.start()

        ports = {"full": free_port(), "full-gevent": free_port(), "baseline": free_port()}
        apps = {
            "full": (GTHREAD, "gateway_web:create_app()"),
            "full-gevent": (GEVENT, "gateway_web:create_app()"),
            "baseline": (GTHREAD, "bench.baseline:create_baseline()"),
        }
        for name, (model, app) in apps.items():
            p = Proc(
                [str(BIN / "gunicorn"), *GUNICORN, *model, "--bind", f"127.0.0.1:{ports[name]}", app],
                tmp / f"{name}.log",
                env=env,
                cwd=ROOT,
            )
            procs.append(p)
            p.wait_for(lambda o: o.count("Booting worker") >= 2, 60, f"{name} server")
        urls = {
            "full": f"http://127.0.0.1:{ports['full']}/v1/jobs/codegen",
            "full-gevent": f"http://127.0.0.1:{ports['full-gevent']}/v1/jobs/codegen",
            "baseline": f"http://127.0.0.1:{ports['baseline']}/baseline",
        }
        auth = [f"Bearer {key}" for key in keys]
        body = {"prompt": "write a function that reverses a list", "max_tokens": 128}
        queue = redis.Redis.from_url(broker)

        def run(name: str, warmup: bool = False) -> dict[str, Any]:
            if args.client == "wrk":
                return drive_wrk(urls[name], auth, body, 2 if warmup else args.seconds, args.concurrency, tmp)
            return drive(urls[name], auth, body, 200 if warmup else args.requests, args.concurrency)

        for name in urls:  # warm up connections, imports and pools
            run(name, warmup=True)
        queue.flushdb()
        rounds: dict[str, list[dict[str, Any]]] = {"full": [], "full-gevent": [], "baseline": []}
        for _ in range(args.rounds):
            for name in ("baseline", "full", "full-gevent"):
                rounds[name].append(run(name))
                queue.flushdb()

        stop_finishing.set()
        summary = {
            name: {metric: statistics.median(r[metric] for r in rs) for metric in ("rps", "p50_ms", "p99_ms")}
            | {"errors": sum(r["errors"] for r in rs), "requests": sum(r["requests"] for r in rs)}
            for name, rs in rounds.items()
        }
        ratio = {
            "rps_full_over_baseline": summary["full"]["rps"] / summary["baseline"]["rps"],
            "p50_full_over_baseline": summary["full"]["p50_ms"] / summary["baseline"]["p50_ms"],
            "p50_added_ms": summary["full"]["p50_ms"] - summary["baseline"]["p50_ms"],
            "rps_gevent_over_gthread": summary["full-gevent"]["rps"] / summary["full"]["rps"],
        }
        size = f"{args.seconds:g} s" if args.client == "wrk" else f"{args.requests} requests"
        print(
            f"\nsubmit benchmark ({args.client}): concurrency {args.concurrency}, {size} x {args.rounds} rounds, "
            "gunicorn 2 workers (gthread x8 threads, or gevent), medians of rounds"
        )
        print(f"{'target':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for name in ("baseline", "full", "full-gevent"):
            s = summary[name]
            print(f"{name:<12} {s['rps']:>9.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['errors']:>7}")
        print(
            f"full / baseline: throughput x{ratio['rps_full_over_baseline']:.2f}, "
            f"p50 x{ratio['p50_full_over_baseline']:.2f} (+{ratio['p50_added_ms']:.2f} ms); "
            f"full on gevent / on gthread: throughput x{ratio['rps_gevent_over_gthread']:.2f}"
        )
        print(f"\nadmission step, in-process medians of {args.admission_samples} (ms)")
        for name, value in admission.items():
            print(f"  {name:<34} {value:>7.3f}")
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
                    "tenants": args.tenants,
                    "server": "gunicorn 2 workers: gthread x 8 threads (baseline, full), gevent (full-gevent)",
                    "cpus": os.cpu_count(),
                    "summary": summary,
                    "ratio": ratio,
                    "admission": admission,
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
