"""Attacks on the record change log, the in-place restart of a slot, the
waits on log lines and the Caddy route count probe.

Each test states the defect or the behavior it checks. App ids of this module start at
970000.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import threading
import time
import types

import pytest

import crate_operator as co
import harness

_ids = iter(range(970000, 980000))
DEPLOY = "/v1/app/instance/binary/deploy"


def next_id() -> int:
    return next(_ids)


# === Record change log (no sandbox) ===


def test_append_after_torn_line_is_read(tmp_path):
    """A change appended after a torn last line must be the one read back.

    A crash in the middle of an append leaves a line without its newline.
    The next process appended its first change right behind those bytes,
    so that line did not parse and readers fell back to the change before
    the torn one, although the new change was written and synced.
    """
    store = co.Store(str(tmp_path))
    base = os.path.join(store.deployments_dir, f"{next_id()}")
    deployment_id = int(os.path.basename(base))
    record = {"deployment_id": deployment_id, "state": "queued"}
    store.save_deployment(record)
    record.update(state="running", step=1)
    store.save_deployment(record)
    with open(base + ".log", "ab") as handle:
        handle.write(b'{"deployment_id":%d,"rev":3,"state":"runn'
                     % deployment_id)
    restarted = co.Store(str(tmp_path))
    recovered = restarted.deployment(deployment_id)
    assert recovered["step"] == 1
    recovered["step"] = 2
    restarted.save_deployment(recovered)
    assert restarted.deployment(deployment_id)["step"] == 2
    assert co.Store(str(tmp_path)).deployment(deployment_id)["step"] == 2
    listed = list(co.Store(str(tmp_path)).iter_deployments())
    assert [r["step"] for r in listed] == [2]


def test_read_during_terminal_save_not_older(tmp_path, monkeypatch):
    """A read that overlaps the terminal save must not return a state older
    than the one stored when the read began.

    The reader took the record file and then the change log. When the
    terminal save replaced the file and deleted the log between those two
    reads, the reader returned the first write ("queued") although the log
    held "running".
    """
    store = co.Store(str(tmp_path))
    deployment_id = next_id()
    record = {"deployment_id": deployment_id, "state": "queued"}
    store.save_deployment(record)
    record["state"] = "running"
    store.save_deployment(record)
    writer = co.Store(str(tmp_path))
    finished = dict(record, state="succeeded")
    pending = [finished]

    def after_first_read(read):
        def wrapper(path):
            value = read(path)
            if pending:
                # The writer runs between the reader's two file reads.
                writer.save_deployment(pending.pop())
            return value
        return wrapper

    monkeypatch.setattr(co, "read_json", after_first_read(co.read_json))
    monkeypatch.setattr(co, "_last_logged_record",
                        after_first_read(co._last_logged_record))
    seen = store.deployment(deployment_id)
    assert not pending, "the writer did not run during the read"
    assert seen["state"] in ("running", "succeeded"), seen


# === Waits on log lines (no sandbox) ===


def test_cancelled_job_logs_no_waits(tmp_path, caplog):
    """A queued deployment cancelled by a delete request must not log that
    request's waits as its own, because the deployment never ran."""
    store = co.Store(str(tmp_path))
    operator = types.SimpleNamespace(
        store=store,
        outbox=types.SimpleNamespace(
            emit=lambda record, event, sync=True: store.save_deployment(record)))
    deployment_id = next_id()
    record = {"deployment_id": deployment_id, "app_id": deployment_id,
              "state": "queued"}
    store.save_deployment(record)
    job = co.DeployJob(operator, record, {"app_id": deployment_id})
    # The delete request waited for systemctl before it cancelled the job.
    co.reset_waits()
    co.count_wait("systemctl", 2.0)
    with caplog.at_level("INFO", logger=co.LOG.name):
        job.cancel("cancelled by a deletion")
    lines = [entry for entry in caplog.records
             if entry.getMessage() == "deployment.cancelled"]
    assert len(lines) == 1, caplog.records
    fields = lines[0].fields
    assert fields.get("systemctl_ms", 0.0) == 0.0, fields
    assert store.deployment(deployment_id)["state"] == "cancelled"


def gated_systemd(tmp_path, blocked: str):
    """Return (Systemd, gate): a fake systemctl whose calls matching the
    shell pattern ``blocked`` wait until the test creates the gate file."""
    gate = tmp_path / "gate"
    script = tmp_path / "systemctl"
    script.write_text(f"#!/bin/sh\ncase \"$1\" in {blocked}) ;; *) exit 0 ;; "
                      f"esac\nwhile [ ! -e {gate} ]; do sleep 0.01; done\n")
    script.chmod(0o755)
    return co.Systemd([str(script)], str(tmp_path)), gate


def counting_waits(func, counted: list) -> threading.Thread:
    """Start func in a thread that records its systemctl_ms in counted."""
    def run():
        co.reset_waits()
        func()
        counted.append(co.waits_ms()["systemctl_ms"])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_shared_reload_wait_counted(tmp_path):
    """A caller that waits for another thread's daemon-reload before its own
    waits for systemctl, so that wait must count as its systemctl time."""
    systemd, gate = gated_systemd(tmp_path, "*")
    first = threading.Thread(target=systemd.daemon_reload)
    first.start()
    while not systemd._reload_running:
        time.sleep(0.01)
    counted = []
    second = counting_waits(systemd.daemon_reload, counted)
    while systemd._reload_requested < 2:
        time.sleep(0.01)
    # The second caller waits for the first reload from here on.
    time.sleep(0.5)
    gate.touch()
    first.join(30)
    second.join(30)
    assert counted, "the second reload did not finish"
    assert counted[0] >= 500.0, counted


# === In-place update of a slot (sandbox) ===


@pytest.fixture(scope="module")
def asset_url(asset_server):
    path = os.path.join(asset_server.root_dir, "sample-review")
    harness.build_asset("review", path)
    return asset_server.url("/sample-review")


def deploy_body(app_id, deployment_id, asset_url, callbacks, ports):
    return {
        "app_id": app_id, "team_id": "team-review", "environment_id": 3,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"review{app_id}.example.test", "asset_url": asset_url,
        "target_version": f"v{deployment_id}",
        "slots": {"blue": {"port": ports[0]}, "green": {"port": ports[1]}},
        "env_vars": {"GREETING": "hello"}, "health_check_path": "/healthz",
        "callback_url": callbacks.url(f"/cb/review/{app_id}"),
    }


def deploy(operator, body):
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    return operator.wait_state(body["deployment_id"],
                               ("succeeded", "failed", "rolled_back"),
                               timeout=90)


class _AlwaysHealthy(http.server.BaseHTTPRequestHandler):
    """A process that is not the operator's and returns 200 on any path."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def squatting(port):
    """Serve _AlwaysHealthy on 127.0.0.1:port (0 picks a free port) and
    yield the port it listens on."""
    squatter = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                               _AlwaysHealthy)
    thread = threading.Thread(target=squatter.serve_forever, daemon=True)
    thread.start()
    try:
        yield squatter.server_address[1]
    finally:
        squatter.shutdown()
        squatter.server_close()


def test_in_place_new_port_taken(operator, asset_url, callbacks):
    """An immediate update that moves the live slot to a port where another
    process listens must not succeed.

    The restart path skipped the port check of start(), so the health check
    reached the other process and the route was pointed at it while the
    new unit could not bind.
    """
    app_id = next_id()
    ports = [harness.free_port(), harness.free_port()]
    first = deploy(operator, deploy_body(app_id, next_id(), asset_url,
                                         callbacks, ports))
    assert first["state"] == "succeeded", first
    with squatting(0) as squatter_port:
        ports_after = [squatter_port, ports[1]]
        second = deploy(operator, deploy_body(app_id, next_id(), asset_url,
                                              callbacks, ports_after))
    assert second["state"] != "succeeded", second
    assert str(squatter_port) in (second.get("error") or ""), second


def test_in_place_old_unit_dead_port_taken(operator, sandbox, asset_url,
                                           callbacks):
    """An immediate update must not succeed on a port that another process
    took after the live unit stopped.

    The record still marks the old instance as running, so the update
    restarted the unit without start()'s port check, and the health check
    reached the other process.
    """
    app_id = next_id()
    ports = [harness.free_port(), harness.free_port()]
    first = deploy(operator, deploy_body(app_id, next_id(), asset_url,
                                         callbacks, ports))
    assert first["state"] == "succeeded", first
    unit = f"crate-app-{app_id}-blue.service"
    sandbox.systemctl("stop", unit)
    with squatting(ports[0]):
        second = deploy(operator, deploy_body(app_id, next_id(), asset_url,
                                              callbacks, ports))
    assert second["state"] != "succeeded", second
    assert str(ports[0]) in (second.get("error") or ""), second


# === Caddy route count probe (host Caddy) ===


def _admin(caddy, method, path):
    connection = http.client.HTTPConnection("127.0.0.1", caddy.admin_port,
                                            timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_route_probe_misses_removed_catch_all(caddy):
    """The count probe of an in-place route write passes when the catch-all
    was removed after the indexed route, because Caddy returns "out of
    bounds" for every position past the end. ensure_server finds it."""
    name = f"review{next_id()}"
    client = co.CaddyClient(caddy.admin_url, name,
                            f"127.0.0.1:{harness.free_port()}", False)
    routes = f"/config/apps/http/servers/{name}/routes"
    client.ensure_server()
    try:
        client.set_app_route(1, "probe.review.test", [("127.0.0.1:9", 100)])
        status, body = _admin(caddy, "GET", routes)
        assert status == 200, body
        assert json.loads(body)[-1] == co.catch_all_route()
        status, body = _admin(caddy, "DELETE", routes + "/1")
        assert status == 200, body
        client.set_app_route(1, "probe.review.test", [("127.0.0.1:10", 100)])
        status, body = _admin(caddy, "GET", routes)
        live = json.loads(body)
        assert [co._route_id(route) for route in live] == ["crate-app-1"]
        assert "127.0.0.1:10" in json.dumps(live[0])
        client.ensure_server()
        status, body = _admin(caddy, "GET", routes)
        assert json.loads(body)[-1] == co.catch_all_route()
    finally:
        _admin(caddy, "DELETE", f"/config/apps/http/servers/{name}")
