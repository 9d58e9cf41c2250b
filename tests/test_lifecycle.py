"""End-to-end: start, stop, restart, delete and domain update.

Runs against a real systemd and Caddy. Each test uses its own app ids.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

import harness
from test_instances import instances_body, route_ports
from test_slice import deploy_body, through_caddy, unit_names

SLOTS = "/v1/app/instance/binary/deploy"
INSTANCES = "/v1/app/binary/deploy"
_ids = iter(range(400000, 500000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def assets(asset_server):
    urls = {}
    for build in ("l1", "l2"):
        path = os.path.join(asset_server.root_dir, f"sample-{build}")
        harness.build_asset(build, path)
        urls[build] = asset_server.url(f"/sample-{build}")
    return urls


def deployed(operator, path, body, kind):
    status, _, answer = operator.request("POST", path, body)
    assert status == 202, answer
    doc = operator.wait_state(body["deployment_id"],
                              ("succeeded", "failed", "rolled_back"),
                              timeout=60, path_kind=kind)
    assert doc["state"] == "succeeded", doc
    return doc


def two_instances(operator, assets, callbacks):
    body = instances_body(next_id(), next_id(), assets["l1"], callbacks,
                          ["w1", "w2"])
    deployed(operator, INSTANCES, body, "legacy")
    return body


def lifecycle(operator, action, body, instance_id, wait=True, **changes):
    request = {"app_id": body["app_id"], "team_id": body["team_id"],
               "environment_id": body["environment_id"],
               "callback_url": body["callback_url"],
               "domain": body["domain"], "instance_id": instance_id}
    request.update(changes)
    status, _, answer = operator.request("POST", f"/v1/app/{action}",
                                         request)
    if not wait or status != 202:
        return status, answer
    assert answer["status_url"].startswith("/v1/app/deploy/op-")
    doc = operator.wait_state(answer["deployment_id"],
                              ("succeeded", "failed", "cancelled"),
                              timeout=60, path_kind="legacy")
    return status, doc


def delete(operator, body, instance_ids, deployment_id=None, wait=True):
    request = {"app_id": body["app_id"], "team_id": body["team_id"],
               "environment_id": body["environment_id"],
               "callback_url": body["callback_url"],
               "domain": body["domain"], "instance_ids": instance_ids}
    if deployment_id is not None:
        request["deployment_id"] = deployment_id
    status, _, answer = operator.request("POST", "/v1/app/delete", request)
    assert status == 202, answer
    if not wait:
        return answer
    return operator.wait_state(answer["status_url"].split("/")[4],
                               ("succeeded", "failed"), timeout=60,
                               path_kind="legacy")


def domain_update(operator, body, old, new, **changes):
    request = {"app_id": body["app_id"], "team_id": body["team_id"],
               "environment_id": body["environment_id"],
               "old_domain": old, "new_domain": new,
               "server_id": "test-host"}
    request.update(changes)
    status, _, answer = operator.request("POST", "/v1/app/domain/update",
                                         request)
    return status, answer


# --- stop, start, restart

def test_stop_with_sibling_keeps_serving(operator, caddy, assets, callbacks,
                                         sandbox):
    body = two_instances(operator, assets, callbacks)
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               body["domain"], interval_s=0.005)
    loop.start()
    loop.wait_requests(20)
    status, doc = lifecycle(operator, "stop", body, "w1")
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert status == 202
    assert doc["state"] == "succeeded", doc
    assert doc["action"] == "stop"
    assert summary["failed"] == 0, summary["failures"]
    assert route_ports(caddy, body["app_id"]) == [
        body["instances"]["w2"]["port"]]
    unit = f"crate-app-{body['app_id']}-w1.a.service"
    assert sandbox.unit_property(unit, "ActiveState") == "inactive"
    assert sandbox.unit_property(unit, "UnitFileState") == "disabled"
    states = {i["instance_id"]: i["state"] for i in doc["instances"]}
    assert states == {"w1": "stopped", "w2": "running"}


def test_start_returns_after_health_check(operator, caddy, assets,
                                          callbacks):
    body = two_instances(operator, assets, callbacks)
    lifecycle(operator, "stop", body, "w2")
    status, doc = lifecycle(operator, "start", body, "w2")
    assert doc["state"] == "succeeded", doc
    names = [s["name"] for s in doc["steps"]]
    assert names.index("health_check") < names.index("switch_route")
    assert route_ports(caddy, body["app_id"]) == sorted(
        spec["port"] for spec in body["instances"].values())


def test_stop_last_instance_removes_route(operator, caddy, assets,
                                          callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    status, doc = lifecycle(operator, "stop", body, "blue")
    assert doc["state"] == "succeeded", doc
    assert doc["allocations"] == []
    assert doc["serving_version"] is None
    assert through_caddy(caddy, body["domain"])[0] == 404
    status, doc = lifecycle(operator, "start", body, "blue")
    assert doc["state"] == "succeeded", doc
    assert through_caddy(caddy, body["domain"])[1].startswith("l1 ")


def test_restart_keeps_serving(operator, caddy, assets, callbacks):
    body = two_instances(operator, assets, callbacks)
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               body["domain"], interval_s=0.005)
    loop.start()
    loop.wait_requests(20)
    status, doc = lifecycle(operator, "restart", body, "w1")
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert doc["state"] == "succeeded", doc
    assert summary["failed"] == 0, summary["failures"]
    assert len(route_ports(caddy, body["app_id"])) == 2


def test_crash_loop_recovers_on_restart_f12(operator, sandbox, caddy,
                                            assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    unit = f"crate-app-{body['app_id']}-blue.service"
    deadline = time.monotonic() + 60
    while sandbox.unit_property(unit, "ActiveState") != "failed":
        assert time.monotonic() < deadline, "start limit never hit"
        if sandbox.unit_property(unit, "ActiveState") == "active":
            sandbox.systemctl("kill", "--signal=SIGKILL", unit, check=False)
        time.sleep(0.2)
    # systemd's own restarts reach the start limit after 5 (checked in the
    # sandbox). A start by the reconciler while the unit waits for its next
    # restart counts too, and leaves 4 (checked in the sandbox as well).
    assert int(sandbox.unit_property(unit, "NRestarts")) >= 4
    refused = sandbox.systemctl("start", unit, check=False)
    assert refused.returncode != 0
    assert sandbox.unit_property(unit, "ActiveState") == "failed"
    status, doc = lifecycle(operator, "restart", body, "blue")
    assert doc["state"] == "succeeded", doc
    assert sandbox.unit_property(unit, "ActiveState") == "active"
    assert through_caddy(caddy, body["domain"])[1].startswith("l1 ")
    # The rejected start was cleared with reset-failed and tried again.
    retried = [line for line in operator.log_text().splitlines()
               if "event=systemd.start_retried" in line and unit in line]
    assert len(retried) == 1, retried


def test_unknown_instance_is_404(operator, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    status, answer = lifecycle(operator, "stop", body, "purple")
    assert status == 404
    assert "purple" in answer["error"]
    other = dict(body, app_id=next_id())
    status, answer = lifecycle(operator, "start", other, "blue")
    assert status == 404


def test_domain_mismatch_reported_not_error(operator, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    status, answer = lifecycle(operator, "restart", body, "blue", wait=False,
                               domain="elsewhere.example.test")
    assert status == 202
    assert "elsewhere.example.test" in answer["domain_note"]
    doc = operator.wait_state(answer["deployment_id"], ("succeeded",),
                              path_kind="legacy")
    assert doc["state"] == "succeeded"


def test_stop_survives_operator_and_systemd_restart(operator_factory, caddy,
                                                    assets, callbacks):
    shared = harness.make_shared_dir()
    box = harness.SystemdSandbox(shared)
    box.start()
    try:
        operator = operator_factory(None, start=False)
        operator.config.update(
            systemctl=box.systemctl_prefix(),
            unit_dir=os.path.join(shared, "units"),
            apps_dir=os.path.join(shared, "apps"))
        operator._write_config()
        operator.start()
        body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
        deployed(operator, SLOTS, body, "instance")
        second = dict(body, deployment_id=next_id(), asset_url=assets["l2"],
                      deployment_strategy="bluegreen")
        deployed(operator, SLOTS, second, "instance")
        lifecycle(operator, "stop", body, "blue")
        lifecycle(operator, "start", body, "blue")
        status, doc = lifecycle(operator, "stop", body, "green")
        assert doc["state"] == "succeeded"
        operator.restart()
        green = f"crate-app-{body['app_id']}-green.service"
        blue = f"crate-app-{body['app_id']}-blue.service"
        assert box.unit_property(green, "ActiveState") == "inactive"
        assert box.unit_property(blue, "ActiveState") == "active"
        box.stop()
        box = harness.SystemdSandbox(shared)
        box.start()
        deadline = time.monotonic() + 20
        while box.unit_property(blue, "ActiveState") != "active":
            assert time.monotonic() < deadline, "blue did not start at boot"
            time.sleep(0.1)
        assert box.unit_property(green, "ActiveState") == "inactive"
        operator.stop()
    finally:
        box.stop()
        harness.remove_shared_dir(shared)


# --- delete

def test_full_delete_leaves_nothing(operator, caddy, assets, callbacks,
                                    shared_dir, sandbox):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    second = dict(body, deployment_id=next_id(), asset_url=assets["l2"],
                  deployment_strategy="bluegreen")
    deployed(operator, SLOTS, second, "instance")
    app_id = body["app_id"]
    doc = delete(operator, body, ["blue", "green"], deployment_id=next_id())
    assert doc["state"] == "succeeded", doc
    assert doc["action"] == "delete"
    assert unit_names(shared_dir, app_id) == []
    assert not os.path.exists(os.path.join(shared_dir, "apps", str(app_id)))
    wants = os.path.join(shared_dir, "units", "multi-user.target.wants")
    if os.path.isdir(wants):
        assert [n for n in os.listdir(wants)
                if n.startswith(f"crate-app-{app_id}-")] == []
    routes = caddy.get_config("apps/http/servers/crate/routes")
    assert [r for r in routes if r.get("@id") == f"crate-app-{app_id}"] == []
    assert through_caddy(caddy, body["domain"])[0] == 404
    assert not os.path.exists(os.path.join(operator.state_dir, "apps",
                                           f"{app_id}.json"))
    listed = sandbox.systemctl("list-units", "--all", "--no-legend",
                               f"crate-app-{app_id}-*").stdout
    assert "crate-app" not in listed.replace("not-found", "")
    again = delete(operator, body, ["blue", "green"])
    assert again["state"] == "succeeded"
    status, _, raw = operator.request(
        "GET", f"/v1/app/deploy/{again['deployment_id']}/status")
    assert status == 200


def test_delete_reports_absent_ids(operator, assets, callbacks, shared_dir):
    body = two_instances(operator, assets, callbacks)
    doc = delete(operator, body, ["w1", "nope"])
    assert doc["state"] == "succeeded", doc
    app_id = body["app_id"]
    assert unit_names(shared_dir, app_id) == [
        f"crate-app-{app_id}-w2.a.service"]
    record = json.load(open(os.path.join(
        operator.state_dir, "deployments", f"{doc['deployment_id']}.json")))
    assert record["absent"] == ["nope"]
    assert any("w1" in item for item in record["removed"])


def test_delete_cancels_queued_deploys(operator, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    slow = dict(body, deployment_id=next_id(), asset_url=assets["l2"],
                deployment_strategy="bluegreen",
                env_vars={"SAMPLE_START_DELAY_S": "2"})
    queued = dict(body, deployment_id=next_id(), asset_url=assets["l1"],
                  deployment_strategy="bluegreen")
    for request in (slow, queued):
        status, _, answer = operator.request("POST", SLOTS, request)
        assert status == 202, answer
    # The delete also cancels a job that the app's worker thread has not
    # yet taken from its queue, and the 202 can come first. The status
    # shows "running" only after the worker has started the job.
    operator.wait_state(slow["deployment_id"], ("running",))
    doc = delete(operator, body, ["blue", "green"])
    assert doc["state"] == "succeeded", doc
    cancelled = operator.wait_state(queued["deployment_id"], ("cancelled",))
    assert "deletion" in cancelled["error"]
    finished = operator.wait_state(slow["deployment_id"],
                                   ("succeeded", "failed"))
    assert finished["state"] == "succeeded"


def test_delete_idempotent_by_deployment_id(operator, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    job_id = next_id()
    first = delete(operator, body, ["blue"], deployment_id=job_id,
                   wait=False)
    second = delete(operator, body, ["blue"], deployment_id=job_id,
                    wait=False)
    assert second["duplicate"] is True
    assert second["status_url"] == first["status_url"]
    request = {"app_id": body["app_id"], "team_id": body["team_id"],
               "environment_id": body["environment_id"],
               "callback_url": body["callback_url"],
               "domain": body["domain"], "instance_ids": ["green"],
               "deployment_id": job_id}
    status, _, _ = operator.request("POST", "/v1/app/delete", request)
    assert status == 409


# --- domain update

def test_domain_update_moves_route(operator, caddy, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    new = f"moved{body['app_id']}.example.test"
    status, answer = domain_update(operator, body, body["domain"], new)
    assert status == 200, answer
    assert answer["changed"] is True
    assert through_caddy(caddy, new)[1].startswith("l1 ")
    assert through_caddy(caddy, body["domain"])[0] == 404
    status, answer = domain_update(operator, body, body["domain"], new)
    assert status == 200
    assert answer["changed"] is False
    status, answer = domain_update(operator, body, "other.example.test",
                                   f"x{body['app_id']}.example.test")
    assert status == 404


def test_domain_update_conflicts_f2(operator, caddy, assets, callbacks):
    first = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    second = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, first, "instance")
    deployed(operator, SLOTS, second, "instance")
    status, answer = domain_update(operator, first, first["domain"],
                                   second["domain"])
    assert status == 409, answer
    foreign = f"foreign{first['app_id']}.example.test"
    route = {"match": [{"host": [foreign]}],
             "handle": [{"handler": "static_response", "body": "foreign"}]}
    caddy.request("PUT", "/config/apps/http/servers/crate/routes/0", route)
    status, answer = domain_update(operator, first, first["domain"], foreign)
    assert status == 409, answer
    assert through_caddy(caddy, first["domain"])[1].startswith("l1 ")
    status, answer = domain_update(operator, first, first["domain"],
                                   first["domain"].upper() + ".")
    assert status == 200
    assert answer["changed"] is False


def test_domain_update_wrong_server_is_400(operator, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    status, answer = domain_update(operator, body, body["domain"],
                                   f"n{body['app_id']}.example.test",
                                   server_id="another-host")
    assert status == 400
    assert answer["errors"][0]["field"] == "$.server_id"


def test_domain_update_never_recreates_route(operator, caddy, assets,
                                             callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    caddy.request("DELETE", f"/id/crate-app-{body['app_id']}")
    new = f"re{body['app_id']}.example.test"
    status, answer = domain_update(operator, body, body["domain"], new)
    assert status == 404, answer
    routes = caddy.get_config("apps/http/servers/crate/routes")
    assert [r for r in routes
            if r.get("@id") == f"crate-app-{body['app_id']}"] == []


def test_domain_update_waits_for_deploy(operator, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    slow = dict(body, deployment_id=next_id(), asset_url=assets["l2"],
                deployment_strategy="bluegreen",
                env_vars={"SAMPLE_START_DELAY_S": "8"})
    status, _, answer = operator.request("POST", SLOTS, slow)
    assert status == 202
    time.sleep(0.3)
    status, answer = domain_update(operator, body, body["domain"],
                                   f"busy{body['app_id']}.example.test")
    assert status == 409, answer
    assert "in progress" in answer["error"]
    operator.wait_state(slow["deployment_id"], ("succeeded", "failed"))


def test_domain_update_caddy_down_is_503(operator, caddy, assets,
                                         callbacks):
    body = deploy_body(next_id(), next_id(), assets["l1"], callbacks)
    deployed(operator, SLOTS, body, "instance")
    config = caddy.get_config()
    caddy.stop()
    try:
        status, answer = domain_update(operator, body, body["domain"],
                                       f"down{body['app_id']}.example.test")
    finally:
        caddy.start(config)
    assert status == 503, answer
    assert through_caddy(caddy, body["domain"])[1].startswith("l1 ")
    record = json.load(open(os.path.join(operator.state_dir, "apps",
                                         f"{body['app_id']}.json")))
    assert record["domain"] == body["domain"]


def test_parallel_domain_updates_and_deletes_f3(operator, caddy, assets,
                                                callbacks):
    apps = [deploy_body(next_id(), next_id(), assets["l1"], callbacks)
            for _ in range(3)]
    for body in apps:
        deployed(operator, SLOTS, body, "instance")
    domains = {b["app_id"]: [b["domain"], f"alt{b['app_id']}.example.test"]
               for b in apps}
    current = {b["app_id"]: b["domain"] for b in apps}
    errors = []

    def flip(body, round_no):
        old = current[body["app_id"]]
        new = domains[body["app_id"]][(round_no + 1) % 2]
        status, answer = domain_update(operator, body, old, new)
        if status != 200:
            errors.append((round_no, status, answer))
        else:
            current[body["app_id"]] = new

    def delete_and_redeploy(body, round_no):
        doc = delete(operator, body, ["blue", "green"])
        if doc["state"] != "succeeded":
            errors.append((round_no, "delete", doc))
        again = dict(body, deployment_id=next_id())
        status, _, answer = operator.request("POST", SLOTS, again)
        if status != 202:
            errors.append((round_no, "deploy", answer))
            return
        doc = operator.wait_state(again["deployment_id"],
                                  ("succeeded", "failed"))
        if doc["state"] != "succeeded":
            errors.append((round_no, "deploy", doc))

    for round_no in range(50):
        threads = [threading.Thread(target=flip, args=(apps[0], round_no)),
                   threading.Thread(target=flip, args=(apps[1], round_no)),
                   threading.Thread(target=delete_and_redeploy,
                                    args=(apps[2], round_no))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        routes = caddy.get_config("apps/http/servers/crate/routes")
        ids = [r.get("@id") for r in routes]
        for body in apps:
            mine = [r for r in routes
                    if r.get("@id") == f"crate-app-{body['app_id']}"]
            assert len(mine) == 1, (round_no, ids)
            hosts = mine[0]["match"][0]["host"]
            assert hosts == [current[body["app_id"]]], (round_no, hosts)
        assert ids[-1] == "crate-catch-all"
        assert len([i for i in ids if i]) == len({i for i in ids if i})
    assert errors == []
