"""End-to-end: canary deployments with weighted traffic and rollback.

Caddy 2.6.2 has no weighted selection policy, so the split is made by
repeating upstream entries under round_robin. These tests count where the
requests actually went.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import time

import pytest

import harness
from test_instances import instances_body, route_ports
from test_slice import deploy_body, through_caddy

SLOTS = "/v1/app/instance/binary/deploy"
INSTANCES = "/v1/app/binary/deploy"
_ids = iter(range(300000, 400000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def assets(asset_server):
    urls = {}
    for build in ("stable", "canary"):
        path = os.path.join(asset_server.root_dir, f"sample-c-{build}")
        harness.build_asset(build, path)
        urls[build] = asset_server.url(f"/sample-c-{build}")
    return urls


def post(operator, path, body):
    status, _, answer = operator.request("POST", path, body)
    assert status == 202, answer


def wait_doc(operator, body, kind="instance", timeout=90):
    return operator.wait_state(body["deployment_id"],
                               ("succeeded", "failed", "rolled_back"),
                               timeout=timeout, path_kind=kind)


def wait_step(operator, body, percent, kind="instance", timeout=30):
    """Wait until the deployment's route gives the canary ``percent``."""
    path = operator.status_path(body["deployment_id"], kind)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, doc = operator.request("GET", path)
        steps = [s for s in doc["steps"] if s["name"] == "canary_step"
                 and s["state"] == "done"]
        if steps and steps[-1]["message"].startswith(f"{percent}%"):
            return doc
        time.sleep(0.05)
    raise AssertionError(f"no {percent}% step within {timeout}s: {doc}")


def count_builds(caddy, domain, total):
    counts = collections.Counter()
    conn = None
    for _ in range(total):
        conn = http.client.HTTPConnection("127.0.0.1", caddy.listen_port,
                                          timeout=5)
        conn.request("GET", "/", headers={"Host": domain})
        counts[conn.getresponse().read().decode().split(" ")[0]] += 1
        conn.close()
    return counts


def test_ten_percent_step_split(operator, caddy, assets, callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["stable"], callbacks)
    post(operator, SLOTS, first)
    assert wait_doc(operator, first)["state"] == "succeeded"
    canary = dict(first, deployment_id=next_id(), asset_url=assets["canary"],
                  deployment_strategy="canary",
                  canary={"steps": [10, 100], "pause_s": 20})
    post(operator, SLOTS, canary)
    doc = wait_step(operator, canary, 10)
    weights = sorted(a["weight"] for a in doc["allocations"])
    assert weights == [10, 90]
    counts = count_builds(caddy, first["domain"], 1000)
    share = counts["canary"] / 1000
    assert 0.07 <= share <= 0.13, counts
    assert counts["stable"] + counts["canary"] == 1000
    final = wait_doc(operator, canary)
    assert final["state"] == "succeeded", final


def test_unhealthy_canary_rolls_back(operator, caddy, assets, callbacks,
                                     shared_dir):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["stable"], callbacks)
    post(operator, SLOTS, first)
    assert wait_doc(operator, first)["state"] == "succeeded"
    flag = os.path.join(shared_dir, "www", f"health-{app_id}")
    with open(flag, "w") as handle:
        handle.write("ok")
    os.chmod(flag, 0o644)
    canary = dict(first, deployment_id=next_id(), asset_url=assets["canary"],
                  deployment_strategy="canary",
                  env_vars={"SAMPLE_HEALTH_FILE": flag},
                  canary={"steps": [25, 100], "pause_s": 30})
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               first["domain"], interval_s=0.005)
    loop.start()
    post(operator, SLOTS, canary)
    wait_step(operator, canary, 25)
    loop.wait_requests(len(loop.results) + 40)
    with open(flag, "w") as handle:
        handle.write("fail")
    doc = wait_doc(operator, canary)
    loop.wait_requests(len(loop.results) + 40)
    summary = loop.stop()
    assert doc["state"] == "rolled_back", doc
    assert "25%" in doc["error"]
    assert "canary instance" in doc["error"]
    assert doc["allocations"] == [{"instance_id": "blue", "slot": "blue",
                                   "weight": 100}]
    assert doc["serving_version"] == first["target_version"]
    assert summary["failed"] == 0, summary["failures"]
    counts = count_builds(caddy, first["domain"], 200)
    assert counts == {"stable": 200}


def test_promotion_without_failed_requests(operator, caddy, assets,
                                           callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["stable"], callbacks)
    post(operator, SLOTS, first)
    assert wait_doc(operator, first)["state"] == "succeeded"
    canary = dict(first, deployment_id=next_id(), asset_url=assets["canary"],
                  deployment_strategy="canary",
                  canary={"steps": [10, 50, 100], "pause_s": 1})
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               first["domain"], interval_s=0.005)
    loop.start()
    loop.wait_requests(20)
    post(operator, SLOTS, canary)
    doc = wait_doc(operator, canary)
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert doc["state"] == "succeeded", doc
    assert summary["failed"] == 0, summary["failures"]
    assert doc["allocations"] == [{"instance_id": "green", "slot": "green",
                                   "weight": 100}]
    states = {i["slot"]: i["state"] for i in doc["instances"]}
    assert states == {"blue": "stopped", "green": "running"}
    assert through_caddy(caddy, first["domain"])[1].startswith("canary ")

    path = f"/cb/{app_id}"
    callbacks.wait_for(lambda rs: any(
        r.path == path and b"deployment.succeeded" in r.body and
        str(canary["deployment_id"]).encode() in r.body for r in rs),
        timeout=15)
    events = [json.loads(r.body) for r in callbacks.records()
              if r.path == path and r.status == 200]
    mine = [e for e in events
            if e["deployment"]["deployment_id"] == canary["deployment_id"]]
    steps = [e for e in mine if e["event"] == "deployment.canary_step"]
    shares = []
    for event in steps:
        allocation = {a["slot"]: a["weight"]
                      for a in event["deployment"]["allocations"]}
        shares.append(allocation.get("green", 0))
    assert shares == [10, 50, 100]
    seqs = [e["deployment_seq"] for e in mine]
    assert seqs == sorted(seqs)


def test_canary_zero_weight_never_sent_f4(operator, caddy, assets,
                                          callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["stable"], callbacks)
    post(operator, SLOTS, first)
    assert wait_doc(operator, first)["state"] == "succeeded"
    canary = dict(first, deployment_id=next_id(), asset_url=assets["canary"],
                  deployment_strategy="canary",
                  canary={"steps": [100], "pause_s": 0})
    post(operator, SLOTS, canary)
    assert wait_doc(operator, canary)["state"] == "succeeded"
    routes = caddy.get_config("apps/http/servers/crate/routes")
    route = [r for r in routes if r.get("@id") == f"crate-app-{app_id}"][0]
    upstreams = route["handle"][0]["upstreams"]
    assert all("weight" not in json.dumps(u) for u in upstreams)
    green = canary["slots"]["green"]["port"]
    assert [u["dial"] for u in upstreams] == [f"127.0.0.1:{green}"]


def test_instances_model_canary_promotes(operator, caddy, assets,
                                         callbacks):
    app_id = next_id()
    body = instances_body(app_id, next_id(), assets["stable"], callbacks,
                          ["c1", "c2"])
    post(operator, INSTANCES, body)
    assert wait_doc(operator, body, "legacy")["state"] == "succeeded"
    canary = dict(body, deployment_id=next_id(), asset_url=assets["canary"],
                  deployment_strategy="canary",
                  canary={"steps": [50, 100], "pause_s": 4})
    post(operator, INSTANCES, canary)
    doc = wait_step(operator, canary, 50, "legacy")
    assert sum(a["weight"] for a in doc["allocations"]) == 100
    counts = count_builds(caddy, body["domain"], 200)
    assert counts["stable"] == 100, counts
    assert counts["canary"] == 100, counts
    final = wait_doc(operator, canary, "legacy")
    assert final["state"] == "succeeded", final
    assert len(route_ports(caddy, app_id)) == 2
    assert {i["instance_id"] for i in final["instances"]} == {"c1", "c2"}
    assert count_builds(caddy, body["domain"], 20) == {"canary": 20}


def test_instances_model_canary_rollback(operator, caddy, assets, callbacks,
                                         shared_dir):
    app_id = next_id()
    body = instances_body(app_id, next_id(), assets["stable"], callbacks,
                          ["k1", "k2"])
    post(operator, INSTANCES, body)
    assert wait_doc(operator, body, "legacy")["state"] == "succeeded"
    canary = dict(body, deployment_id=next_id(), asset_url=assets["canary"],
                  deployment_strategy="canary",
                  env_vars={"SAMPLE_FAIL_HEALTH_INSTANCE": "k2",
                            "SAMPLE_START_DELAY_S": "0"},
                  canary={"steps": [50, 100], "pause_s": 5})
    post(operator, INSTANCES, canary)
    doc = wait_doc(operator, canary, "legacy")
    assert doc["state"] == "failed", doc
    assert "k2" in doc["error"]
    wanted = sorted(spec["port"] for spec in body["instances"].values())
    assert route_ports(caddy, app_id) == wanted
    assert count_builds(caddy, body["domain"], 20) == {"stable": 20}
