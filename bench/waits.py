"""Prefer: wait and event streams on one web instance (gunicorn, one gevent worker, as `jobgate up` runs it):
held waits, open streams, and the wait overhead.

    .venv/bin/python -m bench.waits [--held 1000] [--streams 1000] [--hold-seconds 15] [--overhead-samples 200]
                                    [--overhead-only]

Held: N jobs go to replicas that answer after --hold-seconds (N slots in all, one dispatch worker), then N
clients each read their job with `Prefer: wait=60`, all at once. The web process's resident memory before the
waits and at its peak while they are held gives the memory per held request (target <= 50 KB); every wait must
answer 200 with its job SUCCEEDED. Reported: the delay from the job's end (finished_at, set in the worker's
transaction) to its answer, and from the announcement that it ended (heard on the same Redis channel) to its
answer: the web's own wake-up and read.

Streams: then N more such jobs, and N clients each open GET /v1/jobs/<id>/events (Server-Sent Events) at once and
read until the stream ends. Memory per open stream as above; every stream must end with its job's SUCCEEDED event
(carrying the result) and have seen each state once, in order.

Overhead: one client, one request at a time, alternating: POST straight to a replica answering at once, and
POST /v1/jobs/<service> with `Prefer: wait=10` through the gateway to that replica (admission, broker, worker,
database, the word that the job ended, the read). Overhead = the difference of medians, and of p99s (targets
<= 4 ms and <= 15 ms), and the median of each stage of a job's path, from the timestamps the gateway records.

Uses this machine's PostgreSQL (a scratch database) and Redis (db 9 for state, 10 for the broker). Prints a
table, writes bench/results/waits.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg2
import redis
import yaml
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway_core.credits import grant  # noqa: E402
from gateway_core.db import Database  # noqa: E402
from gateway_core.migrate import upgrade  # noqa: E402
from gateway_core.models import Job  # noqa: E402
from gateway_core.tenants import create_api_key, create_tenant  # noqa: E402
from gateway_tasks.announce import JOBS_ENDED_CHANNEL  # noqa: E402
from tests.procs import BIN, Proc, free_port, start_replica  # noqa: E402

PG = os.environ.get("JOBGATE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS = os.environ.get("JOBGATE_BENCH_REDIS", "redis://127.0.0.1:6379")


def _admin() -> Any:
    conn = psycopg2.connect(PG.replace("postgresql+psycopg2", "postgresql") + "/postgres")
    conn.autocommit = True
    return conn


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _sample_until_done(clients: list[Any], web: psutil.Process) -> tuple[int, int]:
    """Run the clients at once; the web process's peak resident memory and peak established connections."""
    peak = web.memory_info().rss
    connections = 0
    tasks = [asyncio.create_task(c) for c in clients]
    while not all(t.done() for t in tasks):
        peak = max(peak, web.memory_info().rss)
        held = len([c for c in web.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED])
        connections = max(connections, held)
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    return peak, connections


async def _hold(base: str, headers: dict[str, str], ids: list[str], web: psutil.Process) -> dict[str, Any]:
    """Read every job with Prefer: wait=60 at once; sample the web process's memory meanwhile."""
    answers: dict[str, tuple[float, int, str]] = {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:

        async def wait_one(job_id: str) -> None:
            resp = await client.get(f"/v1/jobs/{job_id}", headers={**headers, "Prefer": "wait=60"})
            body = resp.json()
            answers[job_id] = (
                time.time(),
                resp.status_code,
                body.get("status") or body.get("error", {}).get("code", ""),
            )

        peak, held_peak = await _sample_until_done([wait_one(job_id) for job_id in ids], web)
    return {"answers": answers, "peak_rss": peak, "held_peak": held_peak}


async def _streams(base: str, headers: dict[str, str], ids: list[str], web: psutil.Process) -> dict[str, Any]:
    """Open every job's event stream at once and read each to its end; sample the web's memory meanwhile."""
    seen: dict[str, list[str]] = {}
    final: dict[str, str] = {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:

        async def follow(job_id: str) -> None:
            states = seen.setdefault(job_id, [])
            async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
                if resp.status_code != 200:
                    states.append(f"HTTP {resp.status_code}")
                    return
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                        states.append(data["to_state"])
                        if "job" in data:
                            final[job_id] = data["job"]["status"]

        peak, open_peak = await _sample_until_done([follow(job_id) for job_id in ids], web)
    whole = ["RECEIVED", "QUEUED", "DISPATCHED", "PROCESSING", "SUCCEEDED"]
    complete = [j for j in ids if seen.get(j) == whole and final.get(j) == "SUCCEEDED"]
    odd = [{"job_id": j, "states": seen.get(j), "final": final.get(j)} for j in ids if j not in set(complete)][:5]
    return {"complete": len(complete), "incomplete_examples": odd, "peak_rss": peak, "open_peak": open_peak}


def _listen_for_ends(url: str) -> dict[str, float]:
    """When each job's end was announced (the web's wake-up), heard on the same channel by a thread of ours."""
    heard: dict[str, float] = {}
    pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(JOBS_ENDED_CHANNEL)
    while pubsub.get_message(timeout=0.01) is not None:  # the subscription is confirmed before jobs can end
        pass

    def listen() -> None:
        for message in pubsub.listen():
            heard.setdefault(message["data"].decode(), time.time())

    threading.Thread(target=listen, daemon=True).start()
    return heard


# Where a job's time goes, from the timestamps the gateway writes: the job row's created_at (admission, in the
# web), its DISPATCHED event (the worker's claim) and finished_at (the worker's record of the answer).
STAGES = {
    "request -> admitted (web: parse, auth, limits, admission)": "admitted",
    "admitted -> claimed (commit, publish, mark sent, broker, worker receives and claims)": "claimed",
    "claimed -> recorded (the replica call, recording the answer and the ledger)": "recorded",
    "recorded -> answered (commit, announce, web wakes, reads, responds)": "answered",
}


def _stages(db: Database, spans: list[tuple[str, float, float]]) -> dict[str, float]:
    """Median milliseconds of each stage of the sequential jobs."""
    with db.transaction() as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_([job_id for job_id, _, _ in spans])))}
        parts: dict[str, list[float]] = {key: [] for key in STAGES.values()}
        for job_id, sent_at, answered_at in spans:
            job = jobs[job_id]
            claimed = next(e.at for e in job.events if e.to_state == "DISPATCHED").timestamp()
            marks = [sent_at, job.created_at.timestamp(), claimed, job.finished_at.timestamp(), answered_at]
            for key, before, after in zip(STAGES.values(), marks, marks[1:], strict=False):
                parts[key].append((after - before) * 1000)
    return {key: round(statistics.median(values), 2) for key, values in parts.items()}


def _overhead(direct: list[float], gateway: list[float]) -> dict[str, Any]:
    return {
        "samples": len(direct),
        "direct_median_ms": round(statistics.median(direct), 2),
        "direct_p99_ms": round(_pct(direct, 0.99), 2),
        "gateway_median_ms": round(statistics.median(gateway), 2),
        "gateway_p99_ms": round(_pct(gateway, 0.99), 2),
        "overhead_median_ms": round(statistics.median(gateway) - statistics.median(direct), 2),
        "overhead_p99_ms": round(_pct(gateway, 0.99) - _pct(direct, 0.99), 2),
    }


def _print_overhead(o: dict[str, Any], stages: dict[str, float]) -> None:
    print(f"\nPrefer: wait, one gunicorn gevent worker ({os.cpu_count()} cores)")
    print(f"overhead over {o['samples']} sequential jobs (ms): direct to the replica vs through the gateway")
    print(f"{'':>10} {'direct':>8} {'gateway':>8} {'overhead':>9} {'target':>7}")
    for row, target in (("median", 4), ("p99", 15)):
        print(
            f"{row:>10} {o[f'direct_{row}_ms']:>8.2f} {o[f'gateway_{row}_ms']:>8.2f} "
            f"{o[f'overhead_{row}_ms']:>9.2f} {target:>7}"
        )
    print("\nwhere a job's time goes (median ms)")
    for label, key in STAGES.items():
        print(f"{stages[key]:>8.2f}  {label}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=1000, help="event streams open at once (0: skip)")
    ap.add_argument("--hold-seconds", type=float, default=15.0)
    ap.add_argument("--overhead-samples", type=int, default=200)
    ap.add_argument("--overhead-only", action="store_true", help="measure the overhead alone; nothing is written")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "waits.json")
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"jobgate-waits-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    dbname = f"jobgate_waits_{uuid.uuid4().hex[:8]}"
    admin = _admin()
    admin.cursor().execute(f'CREATE DATABASE "{dbname}"')
    db_url = f"{PG}/{dbname}"
    db = Database(db_url)
    procs: list[Proc] = []
    try:
        upgrade(db_url)
        for n in (9, 10):
            redis.Redis.from_url(f"{REDIS}/{n}").flushdb()
        hold_reps, fast_reps = [], []
        for i in range(2):
            proc, url = start_replica(tmp, "codegen", f"hold-{i}", latency_ms=int(args.hold_seconds * 1000))
            procs.append(proc)
            slots = -(-max(args.held, args.streams) // 2)
            hold_reps.append({"name": f"hold-{i}", "url": url, "max_concurrency": slots, "timeout": 120})
        proc, fast_url = start_replica(tmp, "codegen", "fast")
        procs.append(proc)
        fast_reps.append({"name": "fast", "url": fast_url, "max_concurrency": 16, "timeout": 30})
        config = {
            "database_url": db_url,
            "redis_url": f"{REDIS}/9",
            "broker_url": f"{REDIS}/10",
            "gateway": {"visibility_timeout_seconds": 3600},
            "tiers": {
                "enterprise": {
                    "rate_limit": "100000000/minute",
                    "read_rate_limit": "100000000/minute",
                    "concurrency": 100_000,
                }
            },
            "services": {
                "hold": {"kind": "codegen", "replicas": hold_reps},
                "fast": {"kind": "codegen", "replicas": fast_reps},
            },
        }
        path = tmp / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        with db.transaction() as s:
            tenant = create_tenant(s, "bench", "enterprise")
            key = create_api_key(s, tenant)
        with db.transaction() as s:
            grant(s, tenant.id, 10**12)
        headers = {"Authorization": f"Bearer {key}"}

        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
        env["JOBGATE_CONFIG"] = str(path)
        for queue in ("svc.hold", "svc.fast"):
            worker = Proc(
                [str(BIN / "jobgate"), "worker", queue, "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
                tmp / f"worker-{queue}.log",
                env=env,
            )
            procs.append(worker)
            worker.wait_for(lambda out: " ready." in out, 60, f"worker {queue}")
        port = free_port()
        web_proc = Proc(
            [
                str(BIN / "gunicorn"),
                "--no-control-socket",
                "--workers",
                "1",
                "--worker-class",
                "gevent",
                "--worker-connections",
                str(max(args.held, args.streams) + 1000),
                "--bind",
                f"127.0.0.1:{port}",
                "gateway_web:create_app()",
            ],
            tmp / "web.log",
            env=env,
            cwd=ROOT,
        )
        procs.append(web_proc)
        web_proc.wait_for(lambda out: "Booting worker" in out, 60, "web server")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline, "web not answering"
            time.sleep(0.2)
        web = psutil.Process(web_proc.pid).children()[0]

        # Overhead first, on a quiet stack.
        body = {"prompt": "write a function that reverses a list"}
        direct, gateway = [], []
        spans: list[tuple[str, float, float]] = []  # (job id, sent, answered) in epoch seconds
        with httpx.Client(timeout=30) as client:
            for i in range(args.overhead_samples + 20):  # the first 20 warm up connections and caches
                started = time.perf_counter()
                resp = client.post(
                    f"{fast_url}/v1/process",
                    json={"job_id": f"direct-{i}", "service": "fast", "kind": "codegen", "input": body},
                )
                took_direct = time.perf_counter() - started
                assert resp.status_code == 200, resp.text
                sent_at, started = time.time(), time.perf_counter()
                resp = client.post(f"{base}/v1/jobs/fast", headers={**headers, "Prefer": "wait=10"}, json=body)
                took_gateway = time.perf_counter() - started
                assert resp.status_code == 200 and resp.json()["status"] == "SUCCEEDED", resp.text
                if i >= 20:
                    direct.append(took_direct * 1000)
                    gateway.append(took_gateway * 1000)
                    spans.append((resp.json()["id"], sent_at, sent_at + took_gateway))
        stages = _stages(db, spans)
        if args.overhead_only:
            _print_overhead(_overhead(direct, gateway), stages)
            return 0

        # Held waits.
        idle_rss = web.memory_info().rss
        with httpx.Client(base_url=base, timeout=30) as client:
            ids = [client.post("/v1/jobs/hold", headers=headers, json=body).json()["id"] for _ in range(args.held)]
        submitted = time.time()
        announced = _listen_for_ends(f"{REDIS}/9")
        held = asyncio.run(_hold(base, headers, ids, web))
        with db.transaction() as s:
            ends: dict[str, datetime] = {
                job_id: at for job_id, at in s.execute(select(Job.id, Job.finished_at).where(Job.id.in_(ids)))
            }
        answers = held["answers"]
        ok = sum(1 for _, code, status in answers.values() if code == 200 and status == "SUCCEEDED")
        outcomes = collections.Counter(f"{code} {status}" for _, code, status in answers.values())
        delays = [(answers[j][0] - ends[j].timestamp()) * 1000 for j in ids if ends.get(j) is not None]
        wakes = [(answers[j][0] - announced[j]) * 1000 for j in ids if j in announced]
        result = {
            "overhead": _overhead(direct, gateway),
            "stages_median_ms": stages,
            "held": {
                "requests": args.held,
                "answered_succeeded": ok,
                "answers": dict(outcomes),
                "peak_connections_held": held["held_peak"],
                "web_idle_rss_mb": round(idle_rss / 2**20, 1),
                "web_peak_rss_mb": round(held["peak_rss"] / 2**20, 1),
                "kb_per_held_request": round((held["peak_rss"] - idle_rss) / 1024 / args.held, 1),
                "end_to_answer_median_ms": round(statistics.median(delays), 1) if delays else None,
                "end_to_answer_p99_ms": round(_pct(delays, 0.99), 1) if delays else None,
                "announced": len(wakes),
                "announce_to_answer_median_ms": round(statistics.median(wakes), 1) if wakes else None,
                "announce_to_answer_p99_ms": round(_pct(wakes, 0.99), 1) if wakes else None,
                "waits_started_after_submit_s": round(min(a[0] for a in answers.values()) - submitted, 1),
            },
        }
        if args.streams:
            idle_rss = web.memory_info().rss
            with httpx.Client(base_url=base, timeout=30) as client:
                ids = [
                    client.post("/v1/jobs/hold", headers=headers, json=body).json()["id"] for _ in range(args.streams)
                ]
            streamed = asyncio.run(_streams(base, headers, ids, web))
            result["streams"] = {
                "streams": args.streams,
                "complete": streamed["complete"],
                "peak_connections_open": streamed["open_peak"],
                "web_idle_rss_mb": round(idle_rss / 2**20, 1),
                "web_peak_rss_mb": round(streamed["peak_rss"] / 2**20, 1),
                "kb_per_open_stream": round((streamed["peak_rss"] - idle_rss) / 1024 / args.streams, 1),
                "incomplete_examples": streamed["incomplete_examples"],
            }
        h = result["held"]
        _print_overhead(result["overhead"], stages)
        print(f"\nheld: {h['requests']} waits at once")
        print(
            f"{'answered ok':>12} {'conns held':>11} {'idle MB':>8} {'peak MB':>8} {'KB/wait':>8} "
            f"{'end->answer p50/p99 ms':>23} {'announced->answer p50/p99 ms':>29}"
        )
        print(
            f"{h['answered_succeeded']:>12} {h['peak_connections_held']:>11} {h['web_idle_rss_mb']:>8.1f} "
            f"{h['web_peak_rss_mb']:>8.1f} {h['kb_per_held_request']:>8.1f} "
            f"{str(h['end_to_answer_median_ms']) + ' / ' + str(h['end_to_answer_p99_ms']):>23} "
            f"{str(h['announce_to_answer_median_ms']) + ' / ' + str(h['announce_to_answer_p99_ms']):>29}"
        )
        if args.streams:
            st = result["streams"]
            print(f"\nstreams: {st['streams']} event streams open at once, each read to its end")
            print(f"{'complete':>9} {'conns open':>11} {'idle MB':>8} {'peak MB':>8} {'KB/stream':>10}")
            print(
                f"{st['complete']:>9} {st['peak_connections_open']:>11} {st['web_idle_rss_mb']:>8.1f} "
                f"{st['web_peak_rss_mb']:>8.1f} {st['kb_per_open_stream']:>10.1f}"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": "waits", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}
        args.out.write_text(json.dumps({**doc, **result}, indent=2))
        streams_ok = not args.streams or result["streams"]["complete"] == args.streams
        return 0 if ok == args.held and streams_ok else 1
    finally:
        for p in procs:
            p.stop()
        db.dispose()
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    sys.exit(main())
