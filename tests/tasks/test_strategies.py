"""Balancing strategies (issue 4, item 2), each over 300 real jobs on three real replicas, and the hash
ring's minimal reshuffling; zone preference layered on top."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from gateway_core.models import Job
from gateway_core.settings import ReplicaConfig, Settings
from gateway_core.states import TERMINAL, JobState
from gateway_tasks.balancer import choose
from gateway_tasks.registry import Registry
from gateway_tasks.strategies import ring_order
from tests.conftest import TenantKey, make_tenant

# Balancing strategies choose in Redis: the RabbitMQ pass of the suite leaves this module out.
pytestmark = pytest.mark.broker_independent

S = JobState
JOBS = 300


def _run(client: Any, db: Any, service: str, tenants: list[TenantKey], per_tenant: int) -> list[Job]:
    """Submit per_tenant jobs for each tenant (interleaved), wait until all are terminal; the jobs."""
    ids = []
    for _ in range(per_tenant):
        for t in tenants:
            resp = client.post(f"/v1/jobs/{service}", headers=t.headers, json={"prompt": "x"})
            assert resp.status_code == 202, resp.json
            ids.append(resp.json["id"])
    deadline = time.monotonic() + 120
    while True:
        with db.transaction() as s:
            done = s.scalar(select(func.count()).where(Job.id.in_(ids), Job.state.in_(TERMINAL)))
        if done == len(ids):
            break
        assert time.monotonic() < deadline, f"only {done} of {len(ids)} jobs finished"
        time.sleep(0.3)
    with db.transaction() as s:
        jobs = list(s.scalars(select(Job).where(Job.id.in_(ids))))
        s.expunge_all()
    assert all(j.state == S.SUCCEEDED and j.attempts == 1 for j in jobs)
    return jobs


def _tenants(db: Any, n: int) -> list[TenantKey]:
    return [make_tenant(db, tier="enterprise", credits=10_000, concurrency_limit=10_000) for _ in range(n)]


def test_least_outstanding_spreads_jobs_over_every_replica(
    client: Any, worker: Any, db: Any, settings: Settings
) -> None:
    jobs = _run(client, db, "codegen-lor", _tenants(db, 3), JOBS // 3)
    counts = Counter(j.replica for j in jobs)
    assert set(counts) == {"codegen-a", "codegen-b", "codegen-c"}
    assert all(n >= JOBS * 0.2 for n in counts.values()), counts  # an even share is 100 each
    # Their live state, shared in Redis: nothing in flight now, and a recent latency from the calls.
    states = Registry(redis.Redis.from_url(settings.redis_url)).snapshot(
        "codegen-lor", settings.services["codegen-lor"].replicas, time.time(), 5
    )
    assert all(st.in_flight == 0 and st.healthy and st.circuit == "closed" for st in states.values())
    assert all(st.latency_ms is not None and 0 < st.latency_ms < 5000 for st in states.values()), states


def test_weighted_round_robin_follows_the_weights(client: Any, worker: Any, db: Any) -> None:
    jobs = _run(client, db, "codegen-wrr", _tenants(db, 3), JOBS // 3)
    counts = Counter(j.replica for j in jobs)
    # Weights 1:2:3 over 300 turns of the shared counter: 50, 100, 150.
    for name, expected in (("codegen-a", 50), ("codegen-b", 100), ("codegen-c", 150)):
        assert abs(counts[name] - expected) <= 3, counts


def test_consistent_hashing_keeps_each_tenant_on_one_replica(client: Any, worker: Any, db: Any) -> None:
    tenants = _tenants(db, 30)
    jobs = _run(client, db, "codegen-hash", tenants, JOBS // 30)
    by_tenant: dict[int, set[str | None]] = {}
    for j in jobs:
        by_tenant.setdefault(j.tenant_id, set()).add(j.replica)
    assert all(len(r) == 1 for r in by_tenant.values()), by_tenant  # affinity: one replica per tenant
    assert {r for rs in by_tenant.values() for r in rs} == {"codegen-a", "codegen-b", "codegen-c"}


def _replicas(*names: str, **kw: Any) -> list[ReplicaConfig]:
    return [ReplicaConfig(name=n, url=f"http://{n}.internal:8080", **kw) for n in names]


def test_the_hash_ring_moves_only_the_tenants_of_a_replica_that_leaves_or_joins() -> None:
    keys = [str(i) for i in range(2000)]
    five = _replicas("a", "b", "c", "d", "e")
    before = {k: ring_order(five, k)[0] for k in keys}
    spread = Counter(before.values())
    assert all(2000 * 0.12 <= n <= 2000 * 0.28 for n in spread.values()), spread  # 400 each when even

    without_c = {k: ring_order([r for r in five if r.name != "c"], k)[0] for k in keys}
    moved = {k for k in keys if without_c[k] != before[k]}
    assert moved == {k for k in keys if before[k] == "c"}  # only c's tenants move
    # ...and they go where the ring walk from c said they would: the next replica after c.
    assert all(without_c[k] == ring_order(five, k)[1] for k in moved)

    six = {k: ring_order([*five, *_replicas("f")], k)[0] for k in keys}
    joined = {k for k in keys if six[k] != before[k]}
    assert joined and all(six[k] == "f" for k in joined)  # a newcomer only takes tenants
    assert 2000 * 0.08 <= len(joined) <= 2000 * 0.25  # about a sixth


def test_zone_preference_keeps_jobs_local_while_a_local_replica_can_take_them(
    client: Any, worker: Any, db: Any
) -> None:
    jobs = _run(client, db, "codegen-zoned", _tenants(db, 2), 30)
    counts = Counter(j.replica for j in jobs)
    assert "codegen-a" not in counts, counts  # codegen-a is in zone eu; the worker is in us
    assert set(counts) == {"codegen-b", "codegen-c"}


def test_zone_preference_falls_back_to_other_zones(settings: Settings) -> None:
    registry = Registry(redis.Redis.from_url(settings.redis_url))
    service = f"zones-{uuid.uuid4().hex[:6]}"
    svc = settings.services["codegen"].model_copy(
        update={"replicas": [*_replicas("far", zone="eu"), *_replicas("near", zone="us")]}
    )

    def pick() -> str | None:
        choice = choose(
            registry, service, svc, token=uuid.uuid4().hex, lease_seconds=5, avoid=set(), cooldown=5, zone="us"
        )
        if choice.replica is None:
            return None
        registry.release(service, choice.replica, choice.token or "", time.time())  # the job is done
        return choice.replica.name

    assert {pick() for _ in range(10)} == {"near"}
    registry.mark_down(service, "near")
    assert pick() == "far"


@pytest.mark.parametrize("weights", [(1, 1), (1, 3), (2, 3, 5)])
def test_weighted_round_robin_schedule_interleaves_by_weight(weights: tuple[int, ...]) -> None:
    from gateway_tasks.strategies import weighted_round_robin

    reps = [ReplicaConfig(name=f"r{i}", url="http://x.internal", weight=w) for i, w in enumerate(weights)]
    firsts = [weighted_round_robin(reps, turn)[0].name for turn in range(sum(weights) * 10)]
    assert Counter(firsts) == {f"r{i}": w * 10 for i, w in enumerate(weights)}
    if weights == (2, 3, 5):  # smooth: the heaviest never runs three turns in a row
        assert "r2" * 3 not in "".join(firsts)
