"""Saturation: does the gateway keep every replica slot busy under a backlog?

    .venv/bin/python -m bench.saturation [--cases 0.2:16:400,2:16:160,10:64:256] [--broker redis|rabbitmq]

For each case (L seconds per call, C replica slots in all, N jobs): two reference replicas of C/2 slots each
answering after L, one dispatch worker started as deployed (`jobgate worker svc.codegen`: gevent, sized by the
configuration's rule). N jobs are admitted (core admission, credits reserved) and published before the worker
starts. Makespan = last job's end - first job's dispatch;
ideal = ceil(N / C) * L. Also reported: the replicas' own peak concurrency (never above C) and the worker's
start-up (process start to first dispatch, not counted), whether any job ran twice at a replica, the database
sessions opened during the run, and the worker's CPU time per job (from its first dispatch to the last end).

In flight (--in-flight N, default 1000): N calls of --in-flight-latency seconds against N slots, the worker started
first, so that its resident memory idle and at the peak give the memory per call in flight.

Uses this machine's PostgreSQL (a scratch database) and Redis (db 13/14) or RabbitMQ. Prints a table, writes
bench/results/saturation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg2
import redis
import yaml
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_core.admission import JobInput, admit  # noqa: E402
from gateway_core.credits import grant  # noqa: E402
from gateway_core.db import Database  # noqa: E402
from gateway_core.migrate import upgrade  # noqa: E402
from gateway_core.models import Job  # noqa: E402
from gateway_core.settings import load_settings  # noqa: E402
from gateway_core.states import TERMINAL  # noqa: E402
from gateway_core.tenants import create_tenant  # noqa: E402
from gateway_tasks.celery_app import create_celery  # noqa: E402
from gateway_tasks.publish import publish_dispatch  # noqa: E402
from tests.procs import BIN, Proc, start_replica  # noqa: E402

PG = os.environ.get("JOBGATE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS = os.environ.get("JOBGATE_BENCH_REDIS", "redis://127.0.0.1:6379")
RABBIT = os.environ.get("JOBGATE_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = "svc.codegen"


def _admin() -> Any:
    conn = psycopg2.connect(PG.replace("postgresql+psycopg2", "postgresql") + "/postgres")
    conn.autocommit = True
    return conn


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _sessions(admin: Any, dbname: str) -> int:
    cur = admin.cursor()
    cur.execute("SELECT pg_stat_force_next_flush()")
    cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (dbname,))
    return int(cur.fetchone()[0])


def run_case(
    latency: float, slots: int, jobs: int, *, broker: str, tmp: Path, worker_first: bool = False
) -> dict[str, Any]:
    dbname = f"jobgate_sat_{uuid.uuid4().hex[:8]}"
    admin = _admin()
    admin.cursor().execute(f'CREATE DATABASE "{dbname}"')
    procs: list[Proc] = []
    db_url = f"{PG}/{dbname}"
    db = Database(db_url)
    try:
        upgrade(db_url)
        reps = []
        for i in range(2):
            proc, url = start_replica(tmp, "codegen", f"sat-{i}", latency_ms=int(latency * 1000))
            procs.append(proc)
            reps.append({"name": f"sat-{i}", "url": url, "max_concurrency": slots // 2, "timeout": latency + 60})
        config = {
            "database_url": db_url,
            "redis_url": f"{REDIS}/13",
            "broker_url": f"{REDIS}/14" if broker == "redis" else RABBIT,
            "gateway": {"visibility_timeout_seconds": 3600},
            "tiers": {"enterprise": {"rate_limit": "1000000/minute", "concurrency": 100_000}},
            "services": {"codegen": {"kind": "codegen", "replicas": reps}},
        }
        path = tmp / f"gateway-{dbname}.yaml"
        path.write_text(yaml.safe_dump(config))
        settings = load_settings(path, environ={})
        app = create_celery(settings)
        # A clean queue and waiting line, whatever an earlier run left.
        redis.Redis.from_url(f"{REDIS}/13").flushdb()
        if broker == "redis":
            redis.Redis.from_url(f"{REDIS}/14").flushdb()
        else:
            with app.connection_for_write() as conn:
                channel = conn.channel()
                try:
                    channel.queue_purge(QUEUE)
                except conn.channel_errors:
                    pass  # no such queue yet
                finally:
                    channel.close()

        with db.transaction() as s:
            tenant = create_tenant(s, "bench", "enterprise")
        with db.transaction() as s:
            grant(s, tenant.id, 10**12)
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
        env["JOBGATE_CONFIG"] = str(path)

        def start_worker() -> Proc:
            worker = Proc(
                [str(BIN / "jobgate"), "worker", QUEUE, "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
                tmp / f"worker-{dbname}.log",
                env=env,
            )
            procs.append(worker)
            return worker

        idle_rss = None
        if worker_first:  # the worker's own footprint first, then the backlog
            worker = start_worker()
            worker.wait_for(lambda out: " ready." in out, 60, "worker ready")
            idle_rss = psutil.Process(worker.pid).memory_info().rss
        for i in range(jobs):
            with db.transaction() as s:
                job = admit(s, settings, tenant_id=tenant.id, job_input=JobInput("codegen", {"prompt": f"job {i}"})).job
                job_id, priority = job.id, job.priority
            assert publish_dispatch(app, job_id, "codegen", priority=priority)
        if not worker_first:  # the backlog is in the broker before any worker runs
            worker = start_worker()
        start = time.time()
        deadline = start + 5 * math.ceil(jobs / slots) * latency + 60
        peak_rss = 0
        cpu_at_first: float | None = None  # the worker's CPU seconds when the first job was dispatched
        while True:
            proc = psutil.Process(worker.pid)
            peak_rss = max(peak_rss, proc.memory_info().rss)
            with db.transaction() as s:
                done = s.scalar(select(func.count()).where(Job.state.in_(list(TERMINAL))))
                if cpu_at_first is None and s.scalar(select(func.count()).where(Job.dispatched_at.is_not(None))):
                    cpu_at_first = _cpu_seconds(proc)
            if done == jobs:
                worker_cpu = _cpu_seconds(proc) - (cpu_at_first or 0.0)
                break
            if time.time() > deadline:
                raise TimeoutError(f"{done}/{jobs} jobs ended; worker log: {worker.output()[-2000:]}")
            time.sleep(0.05)
        with db.transaction() as s:
            last_end = s.scalar(select(func.max(Job.finished_at)))
            first_dispatch = s.scalar(select(func.min(Job.dispatched_at)))
            ok = s.scalar(select(func.count()).where(Job.state == "SUCCEEDED"))
            times = s.execute(select(Job.dispatched_at, Job.started_at, Job.finished_at)).all()
        assert last_end is not None and first_dispatch is not None
        # From the first job dispatched to the last one ended: the worker's start-up is not the gateway's pace.
        makespan = last_end.timestamp() - first_dispatch.timestamp()
        ideal = math.ceil(jobs / slots) * latency
        # Where a job's time went: DISPATCHED -> PROCESSING (claim to call), PROCESSING -> end (call and record).
        claim = statistics.median((t.started_at - t.dispatched_at).total_seconds() for t in times)
        call = statistics.median((t.finished_at - t.started_at).total_seconds() for t in times)
        # Database sessions opened during the run (a pool that closes and reopens connections costs the server a
        # process start each time).
        sessions = _sessions(admin, dbname)
        stats = [httpx.get(f"{r['url']}/stats").json() for r in reps]
        peaks = [st["max_in_flight"] for st in stats]
        runs = [n for st in stats for n in st["processed"].values()]
        return {
            "latency_s": latency,
            "slots": slots,
            "jobs": jobs,
            "worker_concurrency": settings.dispatch_concurrency(QUEUE),
            "succeeded": ok,
            "makespan_s": round(makespan, 3),
            "ideal_s": ideal,
            "ratio": round(makespan / ideal, 3),
            "median_dispatched_to_processing_s": round(claim, 4),
            "median_processing_to_end_s": round(call, 4),
            "worker_start_s": round(first_dispatch.timestamp() - start, 3),
            "replica_peak_in_flight": peaks,
            "inference_runs": len(runs),
            "jobs_run_twice": sum(1 for n in runs if n > 1),
            "worker_peak_rss_mb": round(peak_rss / 2**20, 1),
            "db_sessions": sessions,
            "worker_cpu_ms_per_job": round(worker_cpu * 1000 / jobs, 2),
            **(
                {
                    "worker_idle_rss_mb": round(idle_rss / 2**20, 1),
                    "kb_per_in_flight_job": round((peak_rss - idle_rss) / 1024 / max(1, sum(peaks)), 1),
                }
                if idle_rss is not None
                else {}
            ),
        }
    finally:
        for p in procs:
            p.stop()
        db.dispose()
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="0.2:16:400,2:16:160,10:64:256", help="L:C:N,... (seconds, slots, jobs)")
    ap.add_argument("--in-flight", type=int, default=1000, help="calls in flight on one worker (0: skip)")
    ap.add_argument("--in-flight-latency", type=float, default=20.0, help="seconds per call in that case")
    ap.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "saturation.json")
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"jobgate-sat-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    results = []
    for case in filter(None, args.cases.split(",")):
        latency, slots, jobs = case.split(":")
        results.append(run_case(float(latency), int(slots), int(jobs), broker=args.broker, tmp=tmp))
        r = results[-1]
        print(f"  L={r['latency_s']:g}s C={r['slots']} N={r['jobs']}: {r['makespan_s']:.2f} s, ratio {r['ratio']:.3f}")
    in_flight = None
    if args.in_flight:
        n = args.in_flight
        in_flight = run_case(args.in_flight_latency, n, n, broker=args.broker, tmp=tmp, worker_first=True)
    print(
        f"\nsaturation ({args.broker} broker, {os.cpu_count()} cores): makespan / ideal (ceil(N/C) x L), target <= 1.15"
    )
    print(
        f"{'L s':>6} {'C':>4} {'N':>5} {'pool':>5} {'ideal s':>8} {'makespan s':>11} {'ratio':>6} {'start s':>8} "
        f"{'peak':>9} {'claim ms':>9} {'call ms':>8} {'db conns':>9} {'cpu ms/job':>11} {'twice':>6}"
    )
    for r in results:
        print(
            f"{r['latency_s']:>6g} {r['slots']:>4} {r['jobs']:>5} {r['worker_concurrency']:>5} {r['ideal_s']:>8.1f} "
            f"{r['makespan_s']:>11.2f} {r['ratio']:>6.3f} {r['worker_start_s']:>8.3f} "
            f"{'+'.join(map(str, r['replica_peak_in_flight'])):>9} "
            f"{r['median_dispatched_to_processing_s'] * 1000:>9.1f} {r['median_processing_to_end_s'] * 1000:>8.1f} "
            f"{r['db_sessions']:>9} {r['worker_cpu_ms_per_job']:>11.2f} {r['jobs_run_twice']:>6}"
        )
    if in_flight is not None:
        r = in_flight
        print(f"\nin flight: {r['jobs']} calls of {r['latency_s']:g} s on one worker process (gevent)")
        print(f"{'peak in flight':>15} {'succeeded':>10} {'run twice':>10} {'idle MB':>8} {'peak MB':>8} {'KB/job':>7}")
        print(
            f"{sum(r['replica_peak_in_flight']):>15} {r['succeeded']:>10} {r['jobs_run_twice']:>10} "
            f"{r['worker_idle_rss_mb']:>8.1f} {r['worker_peak_rss_mb']:>8.1f} {r['kb_per_in_flight_job']:>7.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "saturation",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "broker": args.broker,
                "cpus": os.cpu_count(),
                "results": results,
                "in_flight": in_flight,
            },
            indent=2,
        )
    )
    every = [*results, *([in_flight] if in_flight else [])]
    return 0 if all(r["succeeded"] == r["jobs"] and not r["jobs_run_twice"] for r in every) else 1


if __name__ == "__main__":
    sys.exit(main())
