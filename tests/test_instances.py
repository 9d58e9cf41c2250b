"""End-to-end: the instances model, POST /v1/app/binary/deploy.

The request's instances map is the desired set. These tests run it against
a real systemd and Caddy and check the route, the units and the traffic.
"""

from __future__ import annotations

import os
import socket

import pytest

import harness
from test_slice import through_caddy

DEPLOY = "/v1/app/binary/deploy"
_ids = iter(range(200000, 300000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def assets(asset_server):
    urls = {}
    for build in ("i1", "i2", "i3"):
        path = os.path.join(asset_server.root_dir, f"sample-{build}")
        harness.build_asset(build, path)
        urls[build] = asset_server.url(f"/sample-{build}")
    return urls


def instances_body(app_id, deployment_id, asset_url, callbacks, ids,
                   **changes):
    body = {
        "app_id": app_id, "team_id": "team-i", "environment_id": 4,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"inst{app_id}.example.test", "asset_url": asset_url,
        "instances": {i: {"port": harness.free_port()} for i in ids},
        "env_vars": {}, "health_check_path": "/healthz",
        "callback_url": callbacks.url(f"/cb/{app_id}"),
    }
    body.update(changes)
    return body


def deploy(operator, body):
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    assert answer["status_url"] == f"/v1/app/deploy/{body['deployment_id']}" \
                                   f"/status"
    return operator.wait_state(body["deployment_id"],
                               ("succeeded", "failed", "rolled_back"),
                               timeout=90, path_kind="legacy")


def route_ports(caddy, app_id):
    routes = caddy.get_config("apps/http/servers/crate/routes")
    mine = [r for r in routes if r.get("@id") == f"crate-app-{app_id}"]
    assert len(mine) == 1
    dials = mine[0]["handle"][0]["upstreams"]
    return sorted({int(d["dial"].rsplit(":", 1)[1]) for d in dials})


def app_files(shared_dir, app_id):
    units = sorted(n for n in os.listdir(os.path.join(shared_dir, "units"))
                   if n.startswith(f"crate-app-{app_id}-"))
    env_dir = os.path.join(shared_dir, "apps", str(app_id), "env")
    envs = sorted(os.listdir(env_dir)) if os.path.isdir(env_dir) else []
    return units, envs


def doc_ports(doc):
    return sorted(i["port"] for i in doc["instances"])


def test_create_three_instances(operator, caddy, assets, callbacks):
    app_id = next_id()
    body = instances_body(app_id, next_id(), assets["i1"], callbacks,
                          ["web1", "web2", "web3"])
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    assert doc["model"] == "instances"
    assert doc["action"] == "create"
    assert doc["changes"] == {"create": ["web1", "web2", "web3"],
                              "update": [], "remove": []}
    wanted = sorted(spec["port"] for spec in body["instances"].values())
    assert doc_ports(doc) == wanted
    assert route_ports(caddy, app_id) == wanted
    assert sorted(a["weight"] for a in doc["allocations"]) == [33, 33, 34]
    seen = set()
    for _ in range(30):
        status, text = through_caddy(caddy, body["domain"])
        assert status == 200
        seen.add(text.split("instance=")[1].strip())
    assert seen == {"web1", "web2", "web3"}


def test_legacy_status_accepts_text_id(operator):
    status, _, answer = operator.request("GET",
                                         "/v1/app/deploy/abc-123/status")
    assert status == 404, answer


def test_rolling_update_without_failed_requests(operator, caddy, assets,
                                                callbacks):
    app_id = next_id()
    body = instances_body(app_id, next_id(), assets["i1"], callbacks,
                          ["a", "b", "c"])
    assert deploy(operator, body)["state"] == "succeeded"
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               body["domain"])
    loop.start()
    loop.wait_requests(20)
    update = dict(body, deployment_id=next_id(), asset_url=assets["i2"])
    doc = deploy(operator, update)
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert doc["state"] == "succeeded", doc
    assert doc["action"] == "update"
    assert doc["changes"]["update"] == ["a", "b", "c"]
    assert summary["failed"] == 0, summary["failures"]
    builds = {text.split(" ")[0] for text in summary["bodies"]}
    assert builds == {"i1", "i2"}, summary["bodies"]
    wanted = sorted(spec["port"] for spec in body["instances"].values())
    assert route_ports(caddy, app_id) == wanted
    stops = [s for s in doc["steps"] if s["name"] == "stop_old"]
    drains = [s for s in doc["steps"] if s["name"] == "drain"]
    assert len(stops) == 3
    assert len(drains) == 3


def test_grow_to_four_then_shrink_to_two(operator, caddy, assets, callbacks,
                                         shared_dir):
    app_id = next_id()
    body = instances_body(app_id, next_id(), assets["i1"], callbacks,
                          ["n1", "n2", "n3"])
    assert deploy(operator, body)["state"] == "succeeded"
    grown = dict(body, deployment_id=next_id(),
                 instances=dict(body["instances"],
                                n4={"port": harness.free_port()}))
    doc = deploy(operator, grown)
    assert doc["state"] == "succeeded", doc
    assert doc["changes"]["create"] == ["n4"]
    assert len(route_ports(caddy, app_id)) == 4
    units, envs = app_files(shared_dir, app_id)
    assert len(units) == 4
    shrunk = dict(body, deployment_id=next_id(),
                  instances={k: grown["instances"][k] for k in ("n1", "n4")})
    doc = deploy(operator, shrunk)
    assert doc["state"] == "succeeded", doc
    assert doc["changes"]["remove"] == ["n2", "n3"]
    wanted = sorted(spec["port"] for spec in shrunk["instances"].values())
    assert route_ports(caddy, app_id) == wanted
    assert doc_ports(doc) == wanted
    units, envs = app_files(shared_dir, app_id)
    assert units == [f"crate-app-{app_id}-n1.a.service",
                     f"crate-app-{app_id}-n4.a.service"]
    assert envs == ["n1.a.env", "n4.a.env"]
    for gone in ("n2", "n3"):
        port = grown["instances"][gone]["port"]
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0


def bindable(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_run(length):
    """Return the first port of ``length`` bindable ports in a row.

    The search stays below Linux's ephemeral range (32768 and up), where
    outgoing connections would take ports at random.
    """
    for low in range(21000, 32000, 7):
        if all(bindable(low + n) for n in range(length)):
            return low
    raise AssertionError("no free run of ports found")


def test_bluegreen_on_free_ports_skips_held_port(operator_factory, caddy,
                                                 assets, callbacks,
                                                 shared_dir):
    low = free_run(3)
    held = socket.socket()
    held.bind(("127.0.0.1", low))
    held.listen()
    try:
        operator = operator_factory({"port_range_min": low,
                                     "port_range_max": low + 2})
        app_id = next_id()
        body = instances_body(app_id, next_id(), assets["i1"], callbacks,
                              ["x", "y"])
        first = deploy(operator, body)
        assert first["state"] == "succeeded", first
        update = dict(body, deployment_id=next_id(), asset_url=assets["i2"],
                      deployment_strategy="bluegreen")
        loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                                   body["domain"])
        loop.start()
        doc = deploy(operator, update)
        summary = loop.stop()
    finally:
        held.close()
    assert doc["state"] == "succeeded", doc
    ports = doc_ports(doc)
    assert ports == [low + 1, low + 2]
    assert route_ports(caddy, app_id) == ports
    assert summary["failed"] == 0, summary["failures"]
    units, envs = app_files(shared_dir, app_id)
    assert units == [f"crate-app-{app_id}-x.b.service",
                     f"crate-app-{app_id}-y.b.service"]
    assert through_caddy(caddy, body["domain"])[1].startswith("i2 ")


def test_bluegreen_fails_when_range_is_full(operator_factory, assets,
                                            callbacks):
    port = free_run(1)
    held = socket.socket()
    held.bind(("127.0.0.1", port))
    held.listen()
    try:
        operator = operator_factory({"port_range_min": port,
                                     "port_range_max": port})
        app_id = next_id()
        body = instances_body(app_id, next_id(), assets["i1"], callbacks,
                              ["x"], deployment_strategy="bluegreen")
        doc = deploy(operator, body)
    finally:
        held.close()
    assert doc["state"] == "failed"
    assert "port_range_min" in doc["error"]


def test_failing_instance_restores_previous_set(operator, caddy, assets,
                                                callbacks, shared_dir):
    app_id = next_id()
    body = instances_body(app_id, next_id(), assets["i1"], callbacks,
                          ["r1", "r2", "r3"])
    assert deploy(operator, body)["state"] == "succeeded"
    bad = dict(body, deployment_id=next_id(), asset_url=assets["i2"],
               env_vars={"SAMPLE_FAIL_HEALTH_INSTANCE": "r2"})
    doc = deploy(operator, bad)
    assert doc["state"] == "rolled_back", doc
    assert "instance r2" in doc["error"]
    assert "health check" in doc["error"]
    versions = {i["instance_id"]: i["version"] for i in doc["instances"]}
    assert versions == {k: f"deploy-{body['deployment_id']}"
                        for k in ("r1", "r2", "r3")}
    wanted = sorted(spec["port"] for spec in body["instances"].values())
    assert route_ports(caddy, app_id) == wanted
    builds = {through_caddy(caddy, body["domain"])[1].split(" ")[0]
              for _ in range(30)}
    assert builds == {"i1"}


def test_failure_on_first_new_instance_changes_nothing(operator, caddy,
                                                       assets, callbacks):
    app_id = next_id()
    body = instances_body(app_id, next_id(), assets["i1"], callbacks,
                          ["f1"])
    assert deploy(operator, body)["state"] == "succeeded"
    bad = dict(body, deployment_id=next_id(), asset_url=assets["i2"],
               instances=dict(body["instances"],
                              f2={"port": harness.free_port()}),
               env_vars={"SAMPLE_FAIL_HEALTH_INSTANCE": "f2"})
    doc = deploy(operator, bad)
    assert doc["state"] == "failed", doc
    assert "instance f2" in doc["error"]
    assert route_ports(caddy, app_id) == [body["instances"]["f1"]["port"]]
    assert through_caddy(caddy, body["domain"])[1].startswith("i1 ")
