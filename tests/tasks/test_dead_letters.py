"""Final failure (issue 4, items 6-7): dead-lettered with payload and attempts, credits released once,
one throttled alert by email (a real local SMTP server) and by webhook; admins list and replay."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select, text

from gateway_core.models import CreditEntry, DeadLetter, Tenant
from gateway_core.settings import Settings
from gateway_core.states import JobState
from gateway_core.tenants import create_api_key
from tests.conftest import Inbox, TenantKey, make_tenant, wait_terminal
from tests.procs import BIN

S = JobState


def _admin_headers(db: Any) -> dict[str, str]:
    ops = make_tenant(db, credits=0)
    with db.transaction() as s:
        return {"Authorization": f"Bearer {create_api_key(s, s.get(Tenant, ops.tenant_id), ('admin',))}"}


def _eventually(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.2)
    return result


def test_final_failure_is_dead_lettered_refunded_and_alerted_once(
    client: Any,
    worker: Any,
    db: Any,
    settings: Settings,
    smtp_inbox: tuple[Inbox, int],
    webhook_inbox: tuple[Inbox, str],
) -> None:
    tenant = make_tenant(db, credits=10)
    ids = [
        client.post("/v1/jobs/codegen-alerting", headers=tenant.headers, json={"prompt": f"p{i}"}).json["id"]
        for i in range(3)
    ]
    for job_id in ids:
        job = wait_terminal(db, job_id, timeout=30)
        assert job.state == S.FAILED and job.error_code == "ALL_ATTEMPTS_FAILED"
    with db.transaction() as s:
        kinds = [e.kind for e in s.query(CreditEntry).filter_by(tenant_id=tenant.tenant_id).order_by(CreditEntry.id)]
    assert kinds.count("release") == 3 and s.get(Tenant, tenant.tenant_id).credits_balance == 10

    listed = client.get("/v1/admin/dead-letters?service=codegen-alerting", headers=_admin_headers(db)).json
    letters = {d["job_id"]: d for d in listed["dead_letters"]}
    assert set(ids) <= set(letters)
    first = letters[ids[0]]
    assert first["payload"]["prompt"] == "p0" and first["error_code"] == "ALL_ATTEMPTS_FAILED"
    assert [a["attempt"] for a in first["attempts"]] == [1, 2, 3]
    assert {a["replica"] for a in first["attempts"]} == {"down-1", "down-2"}

    hooks = _eventually(lambda: webhook_inbox[0].matching(kind="job_failed", service="codegen-alerting"))
    mails = _eventually(lambda: [m for m in smtp_inbox[0].items if "job_failed on codegen-alerting" in m["subject"]])
    # Three failures, one window: all three were counted by the throttle (one sent, two held back), so no
    # further alert can follow.
    throttle = redis.Redis.from_url(settings.redis_url)
    _eventually(lambda: int(throttle.get("jobgate:alert:job_failed:codegen-alerting:count") or 0) == 2)
    assert len(webhook_inbox[0].matching(kind="job_failed", service="codegen-alerting")) == len(hooks) == 1
    assert len([m for m in smtp_inbox[0].items if "job_failed on codegen-alerting" in m["subject"]]) == len(mails) == 1
    assert hooks[0]["count"] == 1 and hooks[0]["text"].startswith("[jobgate] job_failed on codegen-alerting")
    assert mails[0]["to"] == ["ops@test"]


def test_admin_replays_a_dead_letter_on_the_same_job_id(client: Any, worker: Any, db: Any, tenant: TenantKey) -> None:
    job_id = client.post("/v1/jobs/codegen-down", headers=tenant.headers, json={"prompt": "again"}).json["id"]
    assert wait_terminal(db, job_id, timeout=30).state == S.FAILED
    admin = _admin_headers(db)
    letter = next(
        d
        for d in client.get("/v1/admin/dead-letters?service=codegen-down&limit=200", headers=admin).json["dead_letters"]
        if d["job_id"] == job_id
    )

    assert client.post(f"/v1/admin/dead-letters/{letter['id']}/replay", headers=tenant.headers).status_code == 403
    replay = client.post(f"/v1/admin/dead-letters/{letter['id']}/replay", headers=admin)
    assert replay.status_code == 202 and replay.json["id"] == job_id and replay.json["status"] == "QUEUED"
    again = client.post(f"/v1/admin/dead-letters/{letter['id']}/replay", headers=admin)
    assert again.status_code == 400 and again.json["error"]["code"] == "ALREADY_REPLAYED"

    _eventually(
        lambda: (
            len(
                [
                    d
                    for d in client.get("/v1/admin/dead-letters?service=codegen-down&limit=200", headers=admin).json[
                        "dead_letters"
                    ]
                    if d["job_id"] == job_id
                ]
            )
            == 2
        ),
        timeout=30,
    )
    job = wait_terminal(db, job_id, timeout=30)
    states = [e.to_state for e in job.events]
    assert states.count(S.FAILED) == 2 and job.attempts == 3  # a fresh round of attempts
    replayed = [e for e in job.events if (e.detail or {}).get("outcome") == "replayed"]
    assert len(replayed) == 1 and replayed[0].from_state == S.FAILED and replayed[0].to_state == S.QUEUED
    with db.transaction() as s:
        kinds = [e.kind for e in s.query(CreditEntry).filter_by(job_id=job_id).order_by(CreditEntry.id)]
    assert kinds == ["reserve", "release", "reserve", "release"]
    assert client.post("/v1/admin/dead-letters/999999/replay", headers=admin).status_code == 404


def test_the_cli_replays_a_dead_letter(
    client: Any, worker: Any, db: Any, tenant: TenantKey, worker_env: dict[str, str], tmp_path: Path
) -> None:
    job_id = client.post("/v1/jobs/codegen-down", headers=tenant.headers, json={"prompt": "by cli"}).json["id"]
    assert wait_terminal(db, job_id, timeout=30).state == S.FAILED
    with db.transaction() as s:
        letter_id = s.scalars(select(DeadLetter.id).where(DeadLetter.job_id == job_id)).one()
    done = subprocess.run(
        [str(BIN / "jobgate"), "dead-letters", "replay", str(letter_id)],
        env=worker_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"job {job_id} is QUEUED again"
    # Sent to the broker by the command itself (QUEUED and committed when it returns): a worker takes it, and
    # it fails for good once more after a fresh round of attempts.
    job = wait_terminal(db, job_id, timeout=30)
    assert [e.to_state for e in job.events].count(S.FAILED) == 2 and job.attempts == 3


def test_a_service_with_no_healthy_replica_is_alerted(worker: Any, webhook_inbox: tuple[Inbox, str]) -> None:
    alert = _eventually(lambda: webhook_inbox[0].matching(kind="no_healthy_replica", service="codegen-never"))
    assert "failing their health checks" in alert[0]["message"]


def test_alerts_test_command_sends_one_of_each_kind(
    worker_env: dict[str, str], smtp_inbox: tuple[Inbox, int], webhook_inbox: tuple[Inbox, str]
) -> None:
    import subprocess

    from tests.procs import BIN

    out = subprocess.run(
        [str(BIN / "jobgate"), "alerts", "test"], env=worker_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for kind in ("job_failed", "circuit_open", "no_healthy_replica", "held_too_long"):
        assert f"{kind}: sent by webhook, email" in out.stdout
        assert webhook_inbox[0].matching(kind=kind, service="test")
        assert [m for m in smtp_inbox[0].items if f"{kind} on test" in m["subject"]]


def test_a_job_past_its_overall_deadline_fails_before_its_attempts_run_out(client: Any, worker: Any, db: Any) -> None:
    # codegen-deadline: 10 attempts of 1 s on a replica that needs 1.5 s, but 2.5 s in all.
    tenant = make_tenant(db, credits=10)
    start = time.monotonic()
    job_id = client.post("/v1/jobs/codegen-deadline", headers=tenant.headers, json={"prompt": "x"}).json["id"]
    job = wait_terminal(db, job_id, timeout=30)
    assert job.state == S.FAILED and job.error_code == "DEADLINE_EXCEEDED", job.error_message
    assert 1 <= job.attempts <= 3 and time.monotonic() - start < 10
    with db.transaction() as s:
        assert s.get(Tenant, tenant.tenant_id).credits_balance == 10  # the reservation came back
    listed = client.get("/v1/admin/dead-letters?service=codegen-deadline", headers=_admin_headers(db)).json
    assert job_id in {d["job_id"] for d in listed["dead_letters"]}


def test_an_outcome_that_cannot_be_recorded_fails_the_job_once_instead_of_stranding_it(
    client: Any, worker: Any, db: Any
) -> None:
    # A real PostgreSQL trigger refuses this one job's success, as a broken constraint or a full disk would.
    marker = f"unrecordable-{uuid.uuid4().hex[:8]}"
    with db.transaction() as s:
        s.execute(
            text(
                "CREATE OR REPLACE FUNCTION jobgate_test_refuse() RETURNS trigger AS $$ "
                "BEGIN RAISE EXCEPTION 'refused by the test trigger'; END $$ LANGUAGE plpgsql"
            )
        )
        s.execute(
            text(
                "CREATE TRIGGER jobgate_test_refuse BEFORE UPDATE ON jobs FOR EACH ROW WHEN "
                f"(NEW.state = 'SUCCEEDED' AND NEW.request->>'prompt' = '{marker}') "
                "EXECUTE FUNCTION jobgate_test_refuse()"
            )
        )
    try:
        tenant = make_tenant(db, credits=100)
        job_id = client.post("/v1/jobs/codegen", headers=tenant.headers, json={"prompt": marker}).json["id"]
        job = wait_terminal(db, job_id, timeout=30)
    finally:
        with db.transaction() as s:
            s.execute(text("DROP TRIGGER IF EXISTS jobgate_test_refuse ON jobs"))
    assert job.state == S.FAILED and job.error_code == "OUTCOME_NOT_RECORDED" and job.attempts == 1
    with db.transaction() as s:
        t = s.get(Tenant, tenant.tenant_id)
        assert t is not None and (t.credits_balance, t.credits_reserved) == (100, 0)
        assert s.query(DeadLetter).filter_by(job_id=job_id).count() == 1
