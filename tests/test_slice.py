"""End-to-end: binary apps deployed through the slots-model API.

Runs the operator under Debian's python3 against a real systemd (PID 1 of
its own namespaces), a real Caddy, an asset server and a callback receiver.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time

import pytest

import harness

DEPLOY = "/v1/app/instance/binary/deploy"
_ids = iter(range(100, 100000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def assets(asset_server):
    """URLs of sample app builds b1..b4."""
    urls = {}
    for build in ("b1", "b2", "b3", "b4"):
        path = os.path.join(asset_server.root_dir, f"sample-{build}")
        harness.build_asset(build, path)
        urls[build] = asset_server.url(f"/sample-{build}")
    return urls


def deploy_body(app_id, deployment_id, asset_url, callbacks, **changes):
    body = {
        "app_id": app_id, "team_id": "team-a", "environment_id": 3,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"app{app_id}.example.test", "asset_url": asset_url,
        "target_version": f"v{deployment_id}",
        "slots": {"blue": {"port": harness.free_port()},
                  "green": {"port": harness.free_port()}},
        "env_vars": {"GREETING": "hello"}, "health_check_path": "/healthz",
        "callback_url": callbacks.url(f"/cb/{app_id}"),
    }
    body.update(changes)
    return body


def deploy(operator, body, states=("succeeded", "failed", "rolled_back")):
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    return operator.wait_state(body["deployment_id"], states, timeout=60)


def through_caddy(caddy, domain, path="/"):
    """GET path with Host: domain through Caddy; return (status, text)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", caddy.listen_port,
                                      timeout=5)
    try:
        conn.request("GET", path, headers={"Host": domain})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def unit_names(shared_dir, app_id):
    units = os.path.join(shared_dir, "units")
    return sorted(n for n in os.listdir(units)
                  if n.startswith(f"crate-app-{app_id}-"))


# --- create, update, serve

def test_create_immediate_serves_through_caddy(operator, caddy, assets,
                                               callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    assert doc["action"] == "create"
    assert doc["model"] == "slots"
    assert doc["kind"] == "binary"
    assert doc["serving_version"] == body["target_version"]
    assert doc["allocations"] == [{"instance_id": "blue", "slot": "blue",
                                   "weight": 100}]
    served = [i for i in doc["instances"] if i["slot"] == "blue"]
    assert served[0]["port"] == body["slots"]["blue"]["port"]
    status, text = through_caddy(caddy, body["domain"])
    assert status == 200
    assert text.startswith("b1 ")
    assert f"version={body['target_version']}" in text


def test_update_immediate_and_status_fields(operator, caddy, assets,
                                            callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    second = dict(first, deployment_id=next_id(), asset_url=assets["b2"],
                  target_version="v-two")
    doc = deploy(operator, second)
    assert doc["state"] == "succeeded", doc
    assert doc["action"] == "update"
    assert doc["serving_version"] == "v-two"
    for key in ("created_at", "started_at", "finished_at"):
        assert doc[key].endswith("Z")
    names = [step["name"] for step in doc["steps"]]
    assert "health_check" in names
    assert all(step["state"] == "done" for step in doc["steps"])
    assert through_caddy(caddy, first["domain"])[1].startswith("b2 ")


def test_bluegreen_switch_without_failed_requests(operator, caddy, assets,
                                                  callbacks, shared_dir):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               first["domain"])
    loop.start()
    loop.wait_requests(20)
    second = dict(first, deployment_id=next_id(), asset_url=assets["b2"],
                  target_version="green-v2",
                  deployment_strategy="bluegreen")
    doc = deploy(operator, second)
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert doc["state"] == "succeeded", doc
    assert summary["failed"] == 0, summary["failures"]
    kinds = {body.split(" ")[0] for body in summary["bodies"]}
    assert kinds == {"b1", "b2"}, summary["bodies"]
    assert doc["allocations"] == [{"instance_id": "green", "slot": "green",
                                   "weight": 100}]
    states = {i["slot"]: i["state"] for i in doc["instances"]}
    assert states == {"blue": "stopped", "green": "running"}
    assert unit_names(shared_dir, app_id) == [
        f"crate-app-{app_id}-blue.service", f"crate-app-{app_id}-green.service"]


def test_bluegreen_drains_before_stopping_old_f19(operator, assets, callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    second = dict(first, deployment_id=next_id(), asset_url=assets["b2"],
                  deployment_strategy="bluegreen")
    doc = deploy(operator, second)
    names = [step["name"] for step in doc["steps"]]
    assert names.index("switch_route") < names.index("drain") < \
        names.index("stop_old")


# --- environment and privileges

HARD_VALUES = {
    "SPACES": "hello world  two",
    "QUOTES": 'say "hi" and \'bye\'',
    "DOLLAR": "$HOME ${PATH} $$ $1",
    "PERCENT": "(uid=%s) 50% a%20b %n %%",
    "BACKSLASH": "a\\b\\\\c\\",
    "TRAILING_BACKSLASH": "ends with \\",
    "TABS": "a\tb\t",
    "PEM": "-----BEGIN KEY-----\nabc\ndef\n-----END KEY-----\n",
    "EQUALS": "a=b=c",
    "EMPTY": "",
    "UNICODE": "grüße ☃ 日本",
    "BACKTICK": "`id` $(id)",
    "SEMICOLON": "a; rm -rf /",
}


def test_env_values_arrive_exactly_f9_f10_f11(operator, caddy, assets,
                                              callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks,
                       env_vars=dict(HARD_VALUES))
    assert deploy(operator, body)["state"] == "succeeded"
    status, text = through_caddy(caddy, body["domain"], "/env")
    assert status == 200
    env = json.loads(text)
    for name, value in HARD_VALUES.items():
        assert env.get(name) == value, name
    assert env["PORT"] == str(body["slots"]["blue"]["port"])
    assert env["CRATE_APP_ID"] == str(app_id)
    assert env["CRATE_VERSION"] == body["target_version"]
    assert env["CRATE_INSTANCE_ID"] == "blue"
    assert env["CRATE_DEPLOYMENT_ID"] == str(body["deployment_id"])
    phantom = set(env) - set(HARD_VALUES) - {
        "PORT", "CRATE_APP_ID", "CRATE_VERSION", "CRATE_INSTANCE_ID",
        "CRATE_DEPLOYMENT_ID", "GREETING"}
    assert not any(name in ("abc", "def", "-----END KEY-----")
                   for name in phantom)


def test_env_file_mode_0600(operator, assets, callbacks, shared_dir):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    path = os.path.join(shared_dir, "apps", str(app_id), "env", "blue.env")
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_unit_runs_unprivileged(operator, caddy, assets, callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    ids = json.loads(through_caddy(caddy, body["domain"], "/whoami")[1])
    assert ids["uid"] != 0
    assert ids["euid"] != 0
    assert ids["gid"] != 0


def test_no_pending_daemon_reload_f13(operator, sandbox, assets, callbacks):
    bodies = [deploy_body(next_id(), next_id(), assets["b1"], callbacks)
              for _ in range(3)]
    for body in bodies:
        status, _, answer = operator.request("POST", DEPLOY, body)
        assert status == 202, answer
    for body in bodies:
        doc = operator.wait_state(body["deployment_id"], ("succeeded",
                                                          "failed"))
        assert doc["state"] == "succeeded", doc
        unit = f"crate-app-{body['app_id']}-blue.service"
        assert sandbox.unit_property(unit, "NeedDaemonReload") == "no"
        assert sandbox.unit_property(unit, "ActiveState") == "active"


# --- failures

def test_failing_health_check_keeps_old_version_f18(operator, caddy, assets,
                                                     callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    bad = dict(first, deployment_id=next_id(), asset_url=assets["b2"],
               deployment_strategy="bluegreen",
               env_vars={"SAMPLE_FAIL_HEALTH": "1"})
    doc = deploy(operator, bad)
    assert doc["state"] == "failed", doc
    assert "health check" in doc["error"]
    assert "HTTP 500" in doc["error"]
    assert doc["serving_version"] == first["target_version"]
    assert through_caddy(caddy, first["domain"])[1].startswith("b1 ")
    green = [i for i in doc["instances"] if i["slot"] == "green"]
    assert green == []


def test_slow_boot_is_not_a_failure_f18(operator, caddy, assets, callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    slow = dict(first, deployment_id=next_id(), asset_url=assets["b2"],
                deployment_strategy="bluegreen",
                env_vars={"SAMPLE_START_DELAY_S": "2"})
    doc = deploy(operator, slow)
    assert doc["state"] == "succeeded", doc
    assert through_caddy(caddy, first["domain"])[1].startswith("b2 ")


def test_health_probe_follows_listen(operator_factory, caddy, assets,
                                     callbacks):
    """After a refused probe the next one comes when the app starts to
    listen, not a whole health_interval_s (here 5 s) later."""
    slow_poller = operator_factory({"health_interval_s": 5.0})
    body = deploy_body(next_id(), next_id(), assets["b1"], callbacks)
    doc = deploy(slow_poller, body)
    assert doc["state"] == "succeeded", doc
    steps = {step["name"]: step for step in doc["steps"]}
    started = harness.status_seconds(steps["start_instance"]["at"])
    checked = harness.status_seconds(steps["health_check"]["at"])
    # The sample app listened about 40 ms after its start in this
    # project's runs; 2 s leaves room for a slow machine.
    assert checked - started < 2.0, doc["steps"]
    assert through_caddy(caddy, body["domain"])[1].startswith("b1 ")


def test_crashing_instance_fails_fast(operator, caddy, assets, callbacks):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    bad = dict(first, deployment_id=next_id(), asset_url=assets["b2"],
               deployment_strategy="immediate",
               env_vars={"SAMPLE_EXIT_CODE": "3"})
    started = time.monotonic()
    doc = deploy(operator, bad)
    assert doc["state"] == "rolled_back", doc
    assert "exit status 3" in doc["error"]
    assert time.monotonic() - started < 10
    assert through_caddy(caddy, first["domain"])[1].startswith("b1 ")


def test_asset_404_fails_before_any_change(operator, caddy, assets,
                                           callbacks, asset_server):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    bad = dict(first, deployment_id=next_id(),
               asset_url=asset_server.url("/missing"))
    doc = deploy(operator, bad)
    assert doc["state"] == "failed"
    assert "HTTP 404" in doc["error"]
    assert through_caddy(caddy, first["domain"])[1].startswith("b1 ")


def test_canary_first_deploy_creates_directly(operator, caddy, assets,
                                              callbacks):
    body = deploy_body(next_id(), next_id(), assets["b1"], callbacks,
                       deployment_strategy="canary")
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    assert [s for s in doc["steps"] if s["name"] == "canary_step"] == []
    assert through_caddy(caddy, body["domain"])[1].startswith("b1 ")


# --- callbacks

def test_callbacks_signed_and_ordered(operator, assets, callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    path = f"/cb/{app_id}"
    records = callbacks.wait_for(
        lambda rs: [r for r in rs if r.path == path and
                    b"deployment.succeeded" in r.body] and
        [r for r in rs if r.path == path], timeout=10)
    mine = [r for r in callbacks.records() if r.path == path]
    events = [json.loads(r.body) for r in mine]
    assert [e["event"] for e in events] == [
        "deployment.queued", "deployment.running", "deployment.succeeded"]
    # The running state is stored with the start entry of the first step.
    running = events[1]["deployment"]
    assert running["state"] == "running"
    assert [(s["name"], s["state"]) for s in running["steps"]] == [
        ("fetch_asset", "running")]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    assert [e["deployment_seq"] for e in events] == [1, 2, 3]
    for record in mine:
        expected = "sha256=" + hmac.new(operator.callback_secret.encode(),
                                        record.body,
                                        hashlib.sha256).hexdigest()
        assert record.headers["X-Crate-Signature"] == expected
        assert record.headers["X-Crate-Event"] == json.loads(
            record.body)["event"]
        assert record.headers["X-Crate-Delivery"]
    assert records


def test_callback_retry_same_bytes_f17(operator, assets, callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    path = f"/cb/{app_id}"
    callbacks.fail_next(2, status=500, path=path)
    assert deploy(operator, body)["state"] == "succeeded"
    callbacks.wait_for(lambda rs: len([
        r for r in rs if r.path == path and r.status == 200]) >= 3,
        timeout=15)
    mine = [r for r in callbacks.records() if r.path == path]
    first_delivery = mine[0].headers["X-Crate-Delivery"]
    same = [r for r in mine if r.headers["X-Crate-Delivery"] == first_delivery]
    assert len(same) >= 2
    assert len({r.body for r in same}) == 1
    assert len({r.headers["X-Crate-Signature"] for r in same}) == 1
    ok = [json.loads(r.body)["event"] for r in mine if r.status == 200]
    assert ok == ["deployment.queued", "deployment.running",
                  "deployment.succeeded"]


def test_slow_receiver_does_not_block_deploy(operator, assets, callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    callbacks.set_delay(3.0)
    try:
        started = time.monotonic()
        doc = deploy(operator, body)
        elapsed = time.monotonic() - started
    finally:
        callbacks.set_delay(0)
    assert doc["state"] == "succeeded"
    assert elapsed < 3.0


# --- idempotency and conflicts

def test_same_request_twice_runs_once_f16(operator, assets, callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    answers = []

    def post():
        answers.append(operator.request("POST", DEPLOY, body))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a[0] for a in answers] == [202] * 4
    duplicates = sorted(a[2]["duplicate"] for a in answers)
    assert duplicates == [False, True, True, True]
    doc = operator.wait_state(body["deployment_id"], ("succeeded", "failed"))
    assert doc["state"] == "succeeded"
    runs = [s for s in doc["steps"] if s["name"] == "fetch_asset"]
    assert len(runs) == 1


def test_same_id_different_body_conflicts(operator, assets, callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    changed = dict(body, target_version="other")
    status, _, answer = operator.request("POST", DEPLOY, changed)
    assert status == 409
    assert "deployment_id" in answer["error"]


def test_other_team_conflicts(operator, assets, callbacks):
    app_id = next_id()
    body = deploy_body(app_id, next_id(), assets["b1"], callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    other = dict(body, deployment_id=next_id(), team_id="team-b")
    status, _, answer = operator.request("POST", DEPLOY, other)
    assert status == 409
    assert "team_id" in answer["error"]


def test_domain_of_other_app_conflicts_f1(operator, caddy, assets,
                                          callbacks, shared_dir):
    owner = deploy_body(next_id(), next_id(), assets["b1"], callbacks,
                        domain=f"shop{next_id()}.example.test")
    assert deploy(operator, owner)["state"] == "succeeded"
    intruder_id = next_id()
    shouting = owner["domain"].upper() + "."
    intruder = deploy_body(intruder_id, next_id(), assets["b2"], callbacks,
                           domain=shouting)
    before = caddy.get_config("apps/http/servers/crate/routes")
    status, _, answer = operator.request("POST", DEPLOY, intruder)
    assert status == 409, answer
    assert owner["domain"] in answer["error"]
    assert caddy.get_config("apps/http/servers/crate/routes") == before
    assert unit_names(shared_dir, intruder_id) == []
    missing = operator.request("GET", f"/v1/app/instance/deploy/"
                                      f"{intruder['deployment_id']}/status")
    assert missing[0] == 404


def test_foreign_caddy_route_conflicts(operator, caddy, assets, callbacks):
    domain = f"foreign{next_id()}.example.test"
    route = {"match": [{"host": [domain]}],
             "handle": [{"handler": "static_response", "body": "foreign"}]}
    status, _ = caddy.request("PUT", "/config/apps/http/servers/crate/"
                                     "routes/0", route)[:2]
    assert status == 200
    body = deploy_body(next_id(), next_id(), assets["b1"], callbacks,
                       domain=domain)
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 409, answer


# --- the API surface

def test_missing_token_is_401(operator):
    status, headers, answer = operator.request("GET", "/v1/openapi.json",
                                               token=None)
    assert status == 401
    assert "token" in answer["error"]
    status, _, _ = operator.request("GET", "/v1/openapi.json", token="nope")
    assert status == 401


def test_invalid_body_lists_every_field(operator, callbacks):
    body = {"app_id": "x", "domain": "bad domain", "env_vars": {"1X": "a"}}
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 400
    fields = {e["field"] for e in answer["errors"]}
    assert "$.app_id" in fields
    assert "$.domain" in fields
    assert "$.asset_url" in fields


def test_url_pointing_at_operator_rejected(operator, assets, callbacks):
    body = deploy_body(next_id(), next_id(), assets["b1"], callbacks,
                       callback_url=operator.base_url + "/cb")
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 400
    assert answer["errors"][0]["field"] == "$.callback_url"


def test_unknown_deployment_is_404(operator):
    status, _, _ = operator.request("GET",
                                    "/v1/app/instance/deploy/999999/status")
    assert status == 404
    status, _, _ = operator.request("GET", "/v1/app/deploy/no-such/status")
    assert status == 404


def test_healthz_reports_parts(operator):
    status, _, report = operator.request("GET", "/healthz", token=None)
    assert status == 200
    assert report["systemd"] is True
    assert report["caddy"] is True
