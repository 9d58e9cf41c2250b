"""Crash safety: SIGKILL the operator at every deploy step, then restart.

The step list comes from the engine itself (STEP_NAMES), so a new step is
covered without editing this file. After the restart every deployment must
end in a terminal state and the app must serve, the new version when the
deployment succeeded and the previous one otherwise.
"""

from __future__ import annotations

import http.client
import json
import os
import time

import pytest

import crate_operator
import harness
from test_slice import deploy_body, through_caddy

SLOTS = "/v1/app/instance/binary/deploy"
TERMINAL = ("succeeded", "failed", "rolled_back", "cancelled")
_ids = iter(range(600000, 700000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def assets(asset_server):
    urls = {}
    for build in ("old", "new"):
        path = os.path.join(asset_server.root_dir, f"sample-r-{build}")
        harness.build_asset(build, path)
        urls[build] = asset_server.url(f"/sample-r-{build}")
    return urls


def start_crashing(operator, step):
    """Restart ``operator`` so that it kills itself at ``step``."""
    operator.stop()
    os.environ["CRATE_TEST_CRASH_AT_STEP"] = step
    try:
        operator.start()
    finally:
        del os.environ["CRATE_TEST_CRASH_AT_STEP"]


def wait_dead_or_done(operator, deployment_id, timeout=60):
    """Return True when the process died, False when the job finished."""
    path = operator.status_path(deployment_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not operator.running():
            return True
        try:
            status, _, doc = operator.request("GET", path, timeout=2)
        except (OSError, http.client.HTTPException):
            # The kill can land while the operator writes this response.
            continue
        if status == 200 and doc["state"] in TERMINAL:
            return False
        time.sleep(0.05)
    raise AssertionError(f"deployment {deployment_id} neither finished nor "
                         f"crashed within {timeout}s")


def post_through_crash(operator, body):
    """POST a deploy body and return (status, answer, crashed).

    The job can reach the crash step before the request thread sends the
    202. The client then gets no answer and, as a client should, sends the
    same body again once the operator runs again (crashed is True).
    """
    try:
        status, _, answer = operator.request("POST", SLOTS, body)
        return status, answer, False
    except (OSError, http.client.HTTPException):
        pass
    deadline = time.monotonic() + 10
    while operator.running():
        assert time.monotonic() < deadline, "the POST failed, but the " \
            "operator did not exit"
        time.sleep(0.05)
    assert operator.proc.returncode == -9
    operator.start()
    status, _, answer = operator.request("POST", SLOTS, body)
    return status, answer, True


@pytest.mark.parametrize("strategy", ["bluegreen", "canary", "immediate"])
@pytest.mark.parametrize("step", crate_operator.STEP_NAMES)
def test_sigkill_at_step_recovers(step, strategy, operator_factory, caddy,
                                  assets, callbacks):
    operator = operator_factory({"canary_pause_s": 0.3})
    first = deploy_body(next_id(), next_id(), assets["old"], callbacks)
    status, _, answer = operator.request("POST", SLOTS, first)
    assert status == 202, answer
    assert operator.wait_state(first["deployment_id"], TERMINAL)[
        "state"] == "succeeded"
    start_crashing(operator, step)
    second = dict(first, deployment_id=next_id(), asset_url=assets["new"],
                  deployment_strategy=strategy,
                  canary={"steps": [50, 100], "pause_s": 0.3})
    status, answer, crashed = post_through_crash(operator, second)
    assert status == 202, answer
    if crashed:
        # The record was stored before the job started, so the repeated
        # request finds it.
        assert answer["duplicate"] is True, answer
    else:
        crashed = wait_dead_or_done(operator, second["deployment_id"])
        if crashed:
            assert operator.proc.returncode == -9
            operator.start()
    doc = operator.wait_state(second["deployment_id"], TERMINAL, timeout=60)
    assert doc["state"] in ("succeeded", "rolled_back", "failed"), doc
    code, text = through_caddy(caddy, first["domain"])
    assert code == 200, (doc, text)
    expected = "new " if doc["state"] == "succeeded" else "old "
    assert text.startswith(expected), (doc, text)
    serving = [a for a in doc["allocations"] if a["weight"]]
    assert sum(a["weight"] for a in serving) == 100
    if crashed:
        names = [s["name"] for s in doc["steps"]]
        assert step in names
        assert doc["steps"][-1]["state"] == "done", doc["steps"]
    app = json.load(open(os.path.join(operator.state_dir, "apps",
                                      f"{first['app_id']}.json")))
    running = [i for i in app["instances"].values() if i.get("serving")]
    assert len(running) == 1
    assert running[0]["version"] == doc["serving_version"]


# --- reconciliation, shutdown, concurrency, storage

def serves(caddy, domain, prefix, timeout=10.0):
    """Wait until ``domain`` responds through Caddy with ``prefix``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = through_caddy(caddy, domain)
        except OSError as exc:
            last = exc
        if isinstance(last, tuple) and last[0] == 200 and \
                last[1].startswith(prefix):
            return True
        time.sleep(0.1)
    raise AssertionError(f"{domain} did not serve {prefix!r}: {last}")


def fast_reconciling(operator_factory):
    return operator_factory({"reconcile_interval_s": 0.5})


def deployed(operator, assets, callbacks):
    """Deploy a new app with the old build; return its request body."""
    body = deploy_body(next_id(), next_id(), assets["old"], callbacks)
    status, _, answer = operator.request("POST", SLOTS, body)
    assert status == 202, answer
    assert operator.wait_state(body["deployment_id"], TERMINAL)[
        "state"] == "succeeded"
    return body


def stop_until_started_again(sandbox, unit: str) -> None:
    """Stop unit behind the operator's back and wait until it runs again."""
    sandbox.systemctl("stop", unit)
    deadline = time.monotonic() + 10
    while sandbox.unit_property(unit, "ActiveState") != "active":
        assert time.monotonic() < deadline, f"{unit} was not started again"
        time.sleep(0.1)


def reconciled_apps(operator) -> dict:
    """Return crate_reconcile_apps_total by outcome from GET /metrics."""
    status, _, text = operator.request("GET", "/metrics")
    assert status == 200
    counts = {"in_order": 0.0, "checked_alone": 0.0}
    for line in text.decode().splitlines():
        if line.startswith("crate_reconcile_apps_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def test_reconcile_reads_all_apps_at_once(operator_factory, sandbox, assets,
                                          callbacks):
    """Healthy apps pass the read of all apps (one systemctl show, one
    Caddy read). An app whose unit stopped is checked alone and started."""
    operator = fast_reconciling(operator_factory)
    first = deployed(operator, assets, callbacks)
    deployed(operator, assets, callbacks)
    before = reconciled_apps(operator)
    deadline = time.monotonic() + 10
    while reconciled_apps(operator)["in_order"] < before["in_order"] + 4:
        assert time.monotonic() < deadline, reconciled_apps(operator)
        time.sleep(0.1)
    assert reconciled_apps(operator)["checked_alone"] == \
        before["checked_alone"]
    assert "reconcile.batch_failed" not in operator.log_text()
    stop_until_started_again(sandbox,
                             f"crate-app-{first['app_id']}-blue.service")
    assert reconciled_apps(operator)["checked_alone"] > \
        before["checked_alone"]


def test_routes_restored_after_caddy_restart(operator_factory, caddy,
                                             assets, callbacks):
    operator = fast_reconciling(operator_factory)
    body = deploy_body(next_id(), next_id(), assets["old"], callbacks)
    status, _, answer = operator.request("POST", SLOTS, body)
    assert status == 202
    assert operator.wait_state(body["deployment_id"], TERMINAL)[
        "state"] == "succeeded"
    repaired = f"event=drift.repaired kind=route app_id={body['app_id']}"
    assert repaired not in operator.log_text()
    # The operator reconciles every 0.5 s and may put the route back before
    # this test could see Caddy empty, so the test checks its log instead.
    caddy.restart(empty=True)
    serves(caddy, body["domain"], "old ")
    deadline = time.monotonic() + 10
    while repaired not in operator.log_text():
        assert time.monotonic() < deadline, "route repair was not logged"
        time.sleep(0.1)
    routes = caddy.get_config("apps/http/servers/crate/routes")
    ids = [r.get("@id") for r in routes]
    assert ids.count(f"crate-app-{body['app_id']}") == 1
    assert ids[-1] == "crate-catch-all"


def test_reconciler_moves_catch_all_last(operator_factory, caddy, assets,
                                         callbacks):
    """A deploy that replaces a route does not check the route order; the
    reconciler puts the catch-all back behind a route appended after it."""
    operator = fast_reconciling(operator_factory)
    body = deployed(operator, assets, callbacks)
    foreign = {"match": [{"host": [f"foreign-{body['app_id']}.test"]}],
               "handle": [{"handler": "static_response", "body": "foreign"}]}
    status, answer = caddy.request(
        "POST", "/config/apps/http/servers/crate/routes", foreign)
    assert status == 200, answer
    routes = caddy.get_config("apps/http/servers/crate/routes")
    assert routes[-1] == foreign
    deadline = time.monotonic() + 10
    while True:
        routes = caddy.get_config("apps/http/servers/crate/routes")
        if routes[-1].get("@id") == "crate-catch-all":
            break
        assert time.monotonic() < deadline, [r.get("@id") for r in routes]
        time.sleep(0.1)
    assert foreign in routes
    code, text = through_caddy(caddy, f"foreign-{body['app_id']}.test")
    assert (code, text) == (200, "foreign")
    status, answer = caddy.request(
        "DELETE", "/config/apps/http/servers/crate/routes/"
        f"{routes.index(foreign)}")
    assert status == 200, answer


def test_disabled_unit_enabled_again(operator_factory, sandbox, assets,
                                     callbacks):
    """An in-place update restarts the unit without enabling it again, so
    the reconciler enables a unit that someone disabled."""
    operator = fast_reconciling(operator_factory)
    body = deployed(operator, assets, callbacks)
    unit = f"crate-app-{body['app_id']}-blue.service"
    sandbox.systemctl("disable", unit)
    deadline = time.monotonic() + 10
    while sandbox.systemctl("is-enabled", unit, check=False).stdout.strip() \
            != "enabled":
        assert time.monotonic() < deadline, "the unit was not enabled again"
        time.sleep(0.1)
    assert sandbox.unit_property(unit, "ActiveState") == "active"
    repaired = f"event=drift.repaired kind=instance app_id={body['app_id']}"
    deadline = time.monotonic() + 10
    while repaired not in operator.log_text():
        assert time.monotonic() < deadline, "the repair was not logged"
        time.sleep(0.1)
    assert "runs but is disabled" in operator.log_text()


def test_in_place_update_restarts_enabled_unit(operator_factory, sandbox,
                                               caddy, assets, callbacks):
    operator = operator_factory()
    body = deployed(operator, assets, callbacks)
    unit = f"crate-app-{body['app_id']}-blue.service"
    before = sandbox.unit_property(unit, "MainPID")
    update = dict(body, deployment_id=next_id(), asset_url=assets["new"],
                  deployment_strategy="immediate")
    operator.request("POST", SLOTS, update)
    doc = operator.wait_state(update["deployment_id"], TERMINAL)
    assert doc["state"] == "succeeded", doc
    names = [step["name"] for step in doc["steps"]]
    assert "stop_old" not in names, names
    assert "start_instance" in names, names
    assert sandbox.unit_property(unit, "MainPID") != before
    assert sandbox.unit_property(unit, "UnitFileState") == "enabled"
    serves(caddy, body["domain"], "new ")


def test_lost_instance_started_again(operator_factory, sandbox, caddy,
                                     assets, callbacks):
    operator = fast_reconciling(operator_factory)
    body = deployed(operator, assets, callbacks)
    stop_until_started_again(sandbox,
                             f"crate-app-{body['app_id']}-blue.service")
    serves(caddy, body["domain"], "old ")
    deadline = time.monotonic() + 10
    while "event=drift.repaired" not in operator.log_text():
        assert time.monotonic() < deadline, "repair was not logged"
        time.sleep(0.1)
    assert "event=drift.found" in operator.log_text()


def test_unrepairable_drift_reported_in_healthz(operator_factory, sandbox,
                                                assets, callbacks,
                                                shared_dir):
    operator = fast_reconciling(operator_factory)
    body = deploy_body(next_id(), next_id(), assets["old"], callbacks)
    operator.request("POST", SLOTS, body)
    doc = operator.wait_state(body["deployment_id"], TERMINAL)
    assert doc["state"] == "succeeded"
    release = os.path.join(shared_dir, "apps", str(body["app_id"]),
                           "releases")
    program = [os.path.join(root, "app")
               for root, _, files in os.walk(release) if "app" in files][0]
    unit = f"crate-app-{body['app_id']}-blue.service"
    os.chmod(program, 0o000)
    try:
        sandbox.systemctl("stop", unit)
        deadline = time.monotonic() + 20
        drift = []
        while not drift:
            assert time.monotonic() < deadline, "no drift reported"
            _, _, report = operator.request("GET", "/healthz", token=None)
            drift = [d for d in report["drift"]
                     if f"app {body['app_id']} " in d and
                     "starting it again failed" in d]
            time.sleep(0.2)
        assert "instance blue" in drift[0]
    finally:
        os.chmod(program, 0o555)
    deadline = time.monotonic() + 30
    while True:
        _, _, report = operator.request("GET", "/healthz", token=None)
        if not [d for d in report["drift"] if f"app {body['app_id']} " in d]:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.2)
    assert sandbox.unit_property(unit, "ActiveState") == "active"


def test_sigterm_exits_within_timeout(operator_factory, caddy, assets,
                                      callbacks):
    operator = operator_factory({"shutdown_timeout_s": 3})
    body = deployed(operator, assets, callbacks)
    slow = dict(body, deployment_id=next_id(), asset_url=assets["new"],
                deployment_strategy="bluegreen",
                env_vars={"SAMPLE_START_DELAY_S": "8"})
    operator.request("POST", SLOTS, slow)
    time.sleep(0.5)
    started = time.monotonic()
    code = operator.stop(timeout=15)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 3 + 2
    operator.start()
    doc = operator.wait_state(slow["deployment_id"], TERMINAL, timeout=60)
    assert doc["state"] in ("succeeded", "failed", "rolled_back")
    expected = "new " if doc["state"] == "succeeded" else "old "
    serves(caddy, body["domain"], expected)


def test_parallel_deploys_of_25_apps(operator, caddy, assets, callbacks):
    firsts = [deploy_body(next_id(), next_id(), assets["old"], callbacks)
              for _ in range(25)]
    seconds = [dict(b, deployment_id=next_id(), asset_url=assets["new"],
                    deployment_strategy="bluegreen") for b in firsts]
    results = []

    def post(body):
        results.append(operator.request("POST", SLOTS, body)[0])

    import threading
    threads = [threading.Thread(target=post, args=(b,))
               for b in firsts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    threads = [threading.Thread(target=post, args=(b,)) for b in seconds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [202] * 50
    for first, second in zip(firsts, seconds):
        one = operator.wait_state(first["deployment_id"], TERMINAL,
                                  timeout=180)
        two = operator.wait_state(second["deployment_id"], TERMINAL,
                                  timeout=180)
        assert one["state"] == "succeeded", one
        assert two["state"] == "succeeded", two
        assert one["finished_at"] <= two["started_at"]
        # The other apps' deploys still change Caddy's config, and in one
        # CI run Caddy 2.6.2 reset a new connection during such a change;
        # serves() retries for up to 10 s.
        serves(caddy, first["domain"], "new ")


def test_second_operator_on_same_state_refused(operator_factory):
    first = operator_factory()
    second = operator_factory({"state_dir": first.state_dir}, start=False)
    with pytest.raises(harness.OperatorError) as failure:
        second.start(timeout=5)
    assert "in use by another crate-operator" in str(failure.value)
    assert first.running()


def test_read_only_state_gives_clear_error(operator_factory, assets,
                                           callbacks):
    operator = operator_factory()
    body = deploy_body(next_id(), next_id(), assets["old"], callbacks)
    operator.request("POST", SLOTS, body)
    before = operator.wait_state(body["deployment_id"], TERMINAL)
    deployments = os.path.join(operator.state_dir, "deployments")
    import subprocess
    subprocess.run(["chattr", "+i", deployments], check=True)
    try:
        again = dict(body, deployment_id=next_id(), asset_url=assets["new"])
        status, _, answer = operator.request("POST", SLOTS, again)
        path = operator.status_path(body["deployment_id"])
        kept = operator.request("GET", path)
    finally:
        subprocess.run(["chattr", "-i", deployments], check=True)
    assert status == 507, answer
    assert "cannot write" in answer["error"]
    assert deployments in answer["error"]
    assert kept[0] == 200
    assert kept[2]["state"] == before["state"]
    missing = operator.request("GET",
                               operator.status_path(again["deployment_id"]))
    assert missing[0] == 404


def test_outbox_survives_restart_and_keeps_order(operator_factory, assets,
                                                 callbacks):
    operator = operator_factory({"callback_backoff_s": 0.2,
                                 "callback_backoff_max_s": 0.5})
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["old"], callbacks,
                       callback_url=callbacks.url(f"/cb/outbox/{app_id}"))
    path = f"/cb/outbox/{app_id}"
    callbacks.fail_next(100000, 503)
    try:
        operator.request("POST", SLOTS, body)
        operator.wait_state(body["deployment_id"], TERMINAL)
        callbacks.wait_for(lambda rs: len([r for r in rs if r.path == path])
                           >= 2, timeout=10)
        operator.kill()
    finally:
        callbacks.fail_next(0)
    failed = [r for r in callbacks.records() if r.path == path]
    assert failed
    assert all(r.status == 503 for r in failed)
    operator.start()
    records = callbacks.wait_for(
        lambda rs: [r for r in rs if r.path == path and r.status == 200
                    and b"deployment.succeeded" in r.body], timeout=20)
    assert records
    delivered = [r for r in callbacks.records()
                 if r.path == path and r.status == 200]
    events = [json.loads(r.body)["event"] for r in delivered]
    assert events == ["deployment.queued", "deployment.running",
                      "deployment.succeeded"]
    by_id = {r.headers["X-Crate-Delivery"]: r.body for r in delivered}
    for attempt in failed:
        delivery = attempt.headers["X-Crate-Delivery"]
        assert by_id[delivery] == attempt.body
