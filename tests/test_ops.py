"""Operability: GET /metrics, GET /v1/app/logs, GET /v1/events, history.

The end-to-end tests run the operator against the real systemd sandbox,
Caddy, asset server and callback receiver.  The others call the metrics
registry, the query validation and history pruning directly.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import types

import pytest

import crate_operator as co
import harness

DEPLOY = "/v1/app/instance/binary/deploy"
_ids = iter(range(800000, 880000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def asset_url(asset_server):
    path = os.path.join(asset_server.root_dir, "sample-ops")
    harness.build_asset("ops", path)
    return asset_server.url("/sample-ops")


def deploy_body(app_id, deployment_id, asset_url, callbacks, **changes):
    body = {
        "app_id": app_id, "team_id": "team-ops", "environment_id": 3,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"ops{app_id}.example.test", "asset_url": asset_url,
        "target_version": f"v{deployment_id}",
        "slots": {"blue": {"port": harness.free_port()},
                  "green": {"port": harness.free_port()}},
        "env_vars": {"GREETING": "hello"}, "health_check_path": "/healthz",
        "callback_url": callbacks.url(f"/cb/ops/{app_id}"),
    }
    body.update(changes)
    return body


def deploy(operator, body, states=("succeeded", "failed", "rolled_back")):
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    return operator.wait_state(body["deployment_id"], states, timeout=90)


# === A small Prometheus text format parser ===

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def _unescape(text):
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            nxt = text[index + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}[nxt])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def parse_metrics(text):
    """Parse exposition text into (types, helps, samples).

    samples maps (name, frozenset of label pairs) to a float.
    """
    types, helps, samples = {}, {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, line
            name, raw_labels, value = match.groups()
            labels = {}
            if raw_labels:
                consumed = "".join(m.group(0) for m in
                                   _LABEL.finditer(raw_labels))
                assert consumed == raw_labels, line
                labels = {key: _unescape(val)
                          for key, val in _LABEL.findall(raw_labels)}
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert family in types or name in types, line
            samples[(name, frozenset(labels.items()))] = float(value)
    return types, helps, samples


def sample(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(operator):
    status, headers, body = operator.request("GET", "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(body.decode())


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


# === Metrics registry (no sandbox) ===


def test_registry_renders_escaped_labels():
    registry = co.MetricsRegistry()
    registry.declare("t_total", "counter", "Test counter.")
    registry.inc("t_total", {"path": 'a"b\\c\nd'}, 2)
    types, helps, samples = parse_metrics(registry.render())
    assert types == {"t_total": "counter"}
    assert helps == {"t_total": "Test counter."}
    assert sample(samples, "t_total", path='a"b\\c\nd') == 2


def test_registry_histogram_cumulative():
    registry = co.MetricsRegistry()
    registry.declare("d_seconds", "histogram", "Test.", (1, 5))
    for value in (0.5, 3, 3, 10):
        registry.observe("d_seconds", {"kind": "x"}, value)
    _, _, samples = parse_metrics(registry.render())
    assert sample(samples, "d_seconds_bucket", kind="x", le="1") == 1
    assert sample(samples, "d_seconds_bucket", kind="x", le="5") == 3
    assert sample(samples, "d_seconds_bucket", kind="x", le="+Inf") == 4
    assert sample(samples, "d_seconds_count", kind="x") == 4
    assert sample(samples, "d_seconds_sum", kind="x") == 16.5


def test_registry_rejects_misuse():
    registry = co.MetricsRegistry()
    registry.declare("c_total", "counter", "Test.")
    registry.declare("g", "gauge", "Test.")
    with pytest.raises(KeyError):
        registry.inc("undeclared_total")
    with pytest.raises(ValueError):
        registry.inc("c_total", None, -1)
    with pytest.raises(ValueError):
        registry.set("c_total", None, 3)
    registry.set("g", None, 7)
    registry.inc("g", None, -2)
    assert registry.value("g") == 5


def test_adapter_errors_counted():
    labels = {"adapter": "caddy"}
    before = co.METRICS.value("crate_adapter_errors_total", labels)
    co.CaddyError("admin API unreachable", status=503)
    after = co.METRICS.value("crate_adapter_errors_total", labels)
    assert after == before + 1
    co.DomainTakenError("shop.example.test", "crate-app-1", "crate",
                        "crate-app-2")
    assert co.METRICS.value("crate_adapter_errors_total", labels) == after
    docker = {"adapter": "docker"}
    before = co.METRICS.value("crate_adapter_errors_total", docker)
    co.DockerError("dockerd did not respond", None)
    assert co.METRICS.value("crate_adapter_errors_total", docker) == \
        before + 1


def test_journalctl_command_derived():
    prefix = ["nsenter", "-t", "1", "-m", "systemctl"]
    assert co.journalctl_command(prefix) == ["nsenter", "-t", "1", "-m",
                                             "journalctl"]
    assert co.journalctl_command(["/bin/systemctl"]) == ["/bin/journalctl"]
    with pytest.raises(co.RequestError):
        co.journalctl_command(["my-wrapper"])


@pytest.mark.parametrize("query, field", [
    ("app_id=1", "instance_id"),
    ("app_id=-1&instance_id=blue", "app_id"),
    ("app_id=1&instance_id=blue&lines=1001", "lines"),
    ("app_id=1&instance_id=blue&lines=0", "lines"),
    ("app_id=1&instance_id=..&lines=1", "instance_id"),
    ("app_id=1&instance_id=blue&line=5", "line"),
    ("app_id=1&app_id=2&instance_id=blue", "app_id"),
])
def test_logs_query_rejects(query, field):
    values, errors = co.validate_query("app_logs", query)
    assert values is None
    assert field in [error["field"] for error in errors]


def test_events_query_defaults():
    values, errors = co.validate_query("events", "")
    assert errors == []
    assert values == {"after": 0, "limit": co.EVENTS_DEFAULT_LIMIT}


def test_openapi_lists_extensions():
    paths = co.openapi_document("t")["paths"]
    assert "text/plain; version=0.0.4; charset=utf-8" in paths["/metrics"][
        "get"]["responses"]["200"]["content"]
    for path in ("/v1/app/logs", "/v1/events"):
        names = [p["name"] for p in paths[path]["get"]["parameters"]]
        assert names, path


# === History pruning (no sandbox) ===


def _record(store, deployment_id, state, created, finished):
    store.save_deployment({
        "deployment_id": deployment_id, "state": state,
        "created_at": co.utc_now(created),
        "finished_at": co.utc_now(finished) if finished else None,
    })


def _finished_records(store, count, now):
    """Store count succeeded records d0, d1, ..., the last one newest."""
    for index in range(count):
        _record(store, f"d{index}", "succeeded", now - 100 + index,
                now - 99 + index)


def test_prune_keeps_newest_by_count(tmp_path):
    store = co.Store(str(tmp_path))
    now = time.time()
    _finished_records(store, 6, now)
    removed = co.prune_history(store, 4, 3600, now)
    assert removed == 2
    left = sorted(r["deployment_id"] for r in store.deployments())
    assert left == ["d2", "d3", "d4", "d5"]


def test_prune_by_age_spares_running(tmp_path):
    store = co.Store(str(tmp_path))
    now = time.time()
    _record(store, "old-done", "failed", now - 5000, now - 4000)
    _record(store, "old-running", "running", now - 5000, None)
    _record(store, "new-done", "succeeded", now - 10, now - 5)
    removed = co.prune_history(store, 100, 3600, now)
    assert removed == 1
    left = sorted(r["deployment_id"] for r in store.deployments())
    assert left == ["new-done", "old-running"]


def test_prune_never_removes_unfinished(tmp_path):
    store = co.Store(str(tmp_path))
    now = time.time()
    for index in range(3):
        _record(store, f"q{index}", "queued", now - 3 + index, None)
    assert co.prune_history(store, 1, 1, now) == 0
    assert len(store.deployments()) == 3


def _write_without_key(store, deployment_id, state, created, finished):
    """Replace a record the way a version without HISTORY_XATTR did."""
    record = {"deployment_id": deployment_id, "state": state,
              "created_at": co.utc_now(created),
              "finished_at": co.utc_now(finished) if finished else None}
    path = os.path.join(store.deployments_dir, f"{deployment_id}.json")
    temporary = path + ".old-writer"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    os.replace(temporary, path)
    return path


def test_unfinished_records_found_without_parsing_finished(tmp_path,
                                                          monkeypatch):
    """Start-up recovery reads only records that may be unfinished."""
    store = co.Store(str(tmp_path))
    now = time.time()
    _finished_records(store, 3, now)
    _record(store, "later-done", "running", now - 3, None)
    _record(store, "later-done", "succeeded", now - 3, now - 1)
    _record(store, "running", "running", now - 2, None)
    # A change appended to the log leaves the file's attribute at queued.
    changing = {"deployment_id": "queued-then-running", "state": "queued",
                "created_at": co.utc_now(now - 2), "finished_at": None}
    store.save_deployment(changing)
    store.save_deployment(dict(changing, state="running"))
    _write_without_key(store, "no-key", "succeeded", now - 5, now - 4)
    read = []
    original = store._read_deployment

    def reading(key):
        read.append(key)
        return original(key)

    monkeypatch.setattr(store, "_read_deployment", reading)
    found = {r["deployment_id"]: r["state"]
             for r in store.iter_deployments(unfinished_only=True)}
    assert found == {"no-key": "succeeded", "queued-then-running": "running",
                     "running": "running"}
    assert sorted(read) == ["no-key", "queued-then-running", "running"]
    read.clear()
    assert len(list(store.iter_deployments())) == 7
    assert len(read) == 7


def test_prune_ranks_by_key_without_parsing(tmp_path):
    store = co.Store(str(tmp_path))
    now = time.time()
    _finished_records(store, 6, now)
    # Overwriting the content in place keeps each file's attribute, so a
    # pass that parsed the files would find no valid record to rank.
    for name in os.listdir(store.deployments_dir):
        with open(os.path.join(store.deployments_dir, name), "r+b") as handle:
            handle.write(b"not json")
    assert co.prune_history(store, 4, 3600, now) == 2
    left = sorted(os.listdir(store.deployments_dir))
    assert left == ["d2.json", "d3.json", "d4.json", "d5.json"]


def test_prune_ranks_records_without_key(tmp_path):
    store = co.Store(str(tmp_path))
    now = time.time()
    for index in range(6):
        if index % 2:
            _record(store, f"d{index}", "succeeded", now - 100 + index,
                    now - 99 + index)
        else:
            path = _write_without_key(store, f"d{index}", "succeeded",
                                      now - 100 + index, now - 99 + index)
            with pytest.raises(OSError):
                os.getxattr(path, co.HISTORY_XATTR)
    assert co.prune_history(store, 3, 3600, now) == 3
    left = sorted(r["deployment_id"] for r in store.deployments())
    assert left == ["d3", "d4", "d5"]
    # The pass added the attribute to the kept record it had to parse.
    path = os.path.join(store.deployments_dir, "d4.json")
    key = os.getxattr(path, co.HISTORY_XATTR)
    assert key == co.history_key(co.read_json(path))


def test_prune_key_follows_each_rewrite(tmp_path):
    store = co.Store(str(tmp_path))
    now = time.time()
    _record(store, "rerun", "running", now - 5000, None)
    _record(store, "rerun", "failed", now - 5000, now - 4000)
    _record(store, "reverted", "failed", now - 5000, now - 4000)
    # A first pass with a longer retention removes nothing but reads every
    # key, so that a key kept by file name would now be out of date.
    assert co.prune_history(store, 100, 1e9, now) == 0
    # An older version replaces the record with a running one and no key,
    # and the operator restarts with a new Store.
    _write_without_key(store, "reverted", "running", now - 5000, None)
    restarted = co.Store(str(tmp_path))
    assert co.prune_history(restarted, 100, 3600, now) == 1
    left = [r["deployment_id"] for r in restarted.deployments()]
    assert left == ["reverted"]


def test_prune_without_xattr_support(tmp_path, monkeypatch):
    def unsupported(*_args, **_kwargs):
        raise OSError(co.errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(co.os, "setxattr", unsupported)
    store = co.Store(str(tmp_path))
    now = time.time()
    _finished_records(store, 4, now)
    path = os.path.join(store.deployments_dir, "d0.json")
    with pytest.raises(OSError):
        os.getxattr(path, co.HISTORY_XATTR)
    assert co.prune_history(store, 2, 3600, now) == 2
    left = sorted(r["deployment_id"] for r in store.deployments())
    assert left == ["d2", "d3"]


def test_prune_skips_invalid_record(tmp_path):
    store = co.Store(str(tmp_path))
    now = time.time()
    _finished_records(store, 3, now)
    invalid = os.path.join(store.deployments_dir, "broken.json")
    with open(invalid, "w", encoding="utf-8") as handle:
        handle.write("{not json")
    assert co.prune_history(store, 1, 3600, now) == 2
    assert os.path.exists(invalid)
    assert os.path.exists(os.path.join(store.deployments_dir, "d2.json"))


class _PassHost:
    """The parts of an Operator that a reconciliation pass uses.

    Each app has one running instance, unit u<app id>. The apps named in
    ``down`` have that unit reported stopped, and ``routes`` are Caddy's
    routes.
    """

    def __init__(self, app_ids, down=None, routes=(), domain=None):
        self.runner = co.JobRunner()
        self.batches = []
        down = set(app_ids) if down is None else set(down)

        def check_many(instances):
            self.batches.append(sorted(i["unit"] for i in instances))
            return {i["unit"]: ("stopped" if i["app_id"] in down
                                else None, None) for i in instances}

        def app(app_id):
            instance = {"app_id": app_id, "instance_id": "a",
                        "unit": f"u{app_id}", "state": "running",
                        "serving": True, "kind": "binary", "port": app_id}
            return {"app_id": app_id, "domain": domain,
                    "instances": {"a": instance}}

        self.store = types.SimpleNamespace(
            apps=lambda: [app(app_id) for app_id in app_ids])
        self.caddy = types.SimpleNamespace(ping=lambda: True,
                                           ensure_server=lambda: None,
                                           routes=lambda: list(routes))
        self.runtime_for = lambda kind: types.SimpleNamespace(
            check_many=check_many)


def test_reconcile_pass_checks_one_app_at_a_time(monkeypatch):
    host = _PassHost(range(1, 21))
    reconciler = co.Reconciler(host)
    lock = threading.Lock()
    running, max_running, checked = [0], [0], []

    def check_app(app_id):
        with lock:
            running[0] += 1
            max_running[0] = max(max_running[0], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1
            checked.append(app_id)

    monkeypatch.setattr(reconciler, "check_app", check_app)
    reconciler.run_once()
    assert host.runner.wait_idle(10)
    assert sorted(checked) == list(range(1, 21))
    assert max_running[0] == 1


def test_reconcile_pass_goes_on_past_a_busy_app(monkeypatch):
    monkeypatch.setattr(co, "RECONCILE_APP_WAIT_S", 0.1)
    host = _PassHost([1, 2])
    reconciler = co.Reconciler(host)
    release = threading.Event()
    host.runner.submit(1, co._InlineJob(lambda: release.wait(10)))
    checked = []
    monkeypatch.setattr(reconciler, "check_app", checked.append)
    started = time.monotonic()
    reconciler.run_once()
    # App 2 was checked although app 1's deploy still runs.
    assert time.monotonic() - started < 5
    assert checked == [2]
    release.set()
    assert host.runner.wait_idle(10)
    assert checked == [2, 1]


def test_reconcile_pass_queues_only_apps_out_of_order(monkeypatch):
    """One batch check covers all apps. Only an app whose unit is down or
    whose route differs from its record gets a check of its own."""
    def route(app_id, port):
        return co.build_app_route(app_id, f"a{app_id}.example.test",
                                  [(f"127.0.0.1:{port}", 100)])

    host = _PassHost([1, 2, 3, 4], down=[2], domain="x.example.test",
                     routes=[route(1, 1), route(2, 2), route(3, 9)])
    reconciler = co.Reconciler(host)
    reconciler.drift["app 1 route"] = "an old report"
    checked = []
    monkeypatch.setattr(reconciler, "check_app", checked.append)
    reconciler.run_once()
    assert host.runner.wait_idle(10)
    # 2: unit down; 3: route to another port; 4: no route at all.
    assert checked == [2, 3, 4]
    assert host.batches == [["u1", "u2", "u3", "u4"]]
    assert reconciler.report() == []


def test_reconcile_pass_caddy_unreachable(monkeypatch):
    host = _PassHost([1, 2], down=[])

    def unreachable():
        raise co.CaddyError("the Caddy admin API is unreachable", 503)

    host.caddy.routes = unreachable
    reconciler = co.Reconciler(host)
    checked = []
    monkeypatch.setattr(reconciler, "check_app", checked.append)
    reconciler.run_once()
    assert host.runner.wait_idle(10)
    assert checked == [1, 2]


def test_history_key_rejects_spaces():
    record = {"created_at": "2026-12-04T10:00:00.000Z", "state": "succeeded",
              "finished_at": None}
    assert co.history_key(record) == \
        b"1 2026-12-04T10:00:00.000Z succeeded -"
    assert co.history_key(dict(record, state="in progress")) is None
    assert co.history_key(dict(record, created_at=12)) is None


# === End to end ===


def test_metrics_count_a_deploy(operator, asset_url, callbacks):
    app_id, deployment_id = next_id(), next_id()
    _, _, before = scrape(operator)
    record = deploy(operator, deploy_body(app_id, deployment_id, asset_url,
                                          callbacks))
    assert record["state"] == "succeeded", record
    callbacks.wait_for(lambda records: any(
        r.json().get("event") == "deployment.succeeded" and
        str(r.json()["deployment"]["deployment_id"]) == str(deployment_id)
        for r in records if r.status == 200 and r.body.startswith(b"{")))

    def delivered_moved():
        _, _, now = scrape(operator)
        moved = sample(now, "crate_callbacks_delivered_total") > sample(
            before, "crate_callbacks_delivered_total")
        return now if moved else None

    after = wait_until(delivered_moved)
    labels = {"kind": "binary", "strategy": "immediate",
              "result": "succeeded"}
    assert sample(after, "crate_deployments_total", **labels) == sample(
        before, "crate_deployments_total", **labels) + 1
    assert sample(after, "crate_deployment_duration_seconds_count",
                  kind="binary") == sample(
        before, "crate_deployment_duration_seconds_count", kind="binary") + 1
    accepted = {"endpoint": "deploy_binary_slots", "status": "202"}
    assert sample(after, "crate_http_requests_total", **accepted) == sample(
        before, "crate_http_requests_total", **accepted) + 1
    scrapes = {"endpoint": "metrics", "status": "200"}
    assert sample(after, "crate_http_requests_total", **scrapes) > sample(
        before, "crate_http_requests_total", **scrapes)
    assert ("crate_job_queue_length", frozenset()) in after


def logged_fields(operator, *words, timeout=10.0):
    """Wait for the one log line with all words and return its fields.

    A request is logged just after its response and a deployment just
    after its record is saved, so the line can appear a moment later.
    """
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in operator.log_text().splitlines()
                 if all(word in line.split() for word in words)]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, (words, lines)
    return dict(word.split("=", 1) for word in lines[0].split() if "=" in word)


def test_waits_logged_per_request_and_deployment(operator, asset_url,
                                                 callbacks):
    """A finished deployment and each logged request log how long they
    waited for systemctl, Caddy and fsync, counted in their own threads."""
    app_id, deployment_id = next_id(), next_id()
    body = deploy_body(app_id, deployment_id, asset_url, callbacks)
    record = deploy(operator, body)
    assert record["state"] == "succeeded", record
    ids = f"deployment_id={deployment_id}"
    done = logged_fields(operator, "event=deployment.succeeded", ids)
    # daemon-reload and start alone take milliseconds; the route change
    # makes at least one Caddy request.
    assert float(done["systemctl_ms"]) > 1.0, done
    assert float(done["caddy_ms"]) > 0.0, done
    assert float(done["storage_ms"]) > 0.0, done   # state file fsyncs
    accepted = logged_fields(operator, "event=http.request", ids)
    assert float(accepted["systemctl_ms"]) == 0.0, accepted
    assert float(accepted["caddy_ms"]) > 0.0, accepted   # the domain check
    assert float(accepted["storage_ms"]) > 0.0, accepted  # the new record
    update = {"app_id": app_id, "team_id": body["team_id"],
              "environment_id": body["environment_id"],
              "old_domain": body["domain"],
              "new_domain": f"moved{app_id}.example.test",
              "server_id": "test-host"}
    status, _, answer = operator.request("POST", "/v1/app/domain/update",
                                         update)
    assert status == 200, answer
    moved = logged_fields(operator, "event=http.request",
                          "path=/v1/app/domain/update", f"app_id={app_id}")
    # The change runs as a job of the app; its Caddy time is the request's.
    assert float(moved["caddy_ms"]) > 0.0, moved


def test_metrics_families_declared(operator):
    types, helps, samples = scrape(operator)
    for name, kind in (
            ("crate_deployments_total", "counter"),
            ("crate_deployment_duration_seconds", "histogram"),
            ("crate_job_queue_length", "gauge"),
            ("crate_callbacks_delivered_total", "counter"),
            ("crate_callbacks_retried_total", "counter"),
            ("crate_callbacks_given_up_total", "counter"),
            ("crate_http_requests_total", "counter"),
            ("crate_adapter_errors_total", "counter"),
            ("crate_drift_found_total", "counter"),
            ("crate_drift_repaired_total", "counter"),
            ("crate_build_info", "gauge")):
        assert types.get(name) == kind, name
        assert helps.get(name), name
    build = [labels for (name, labels), value in samples.items()
             if name == "crate_build_info" and value == 1]
    assert len(build) == 1
    assert dict(build[0])["version"] == co.__version__


def test_metrics_need_token_by_default(operator):
    status, headers, _ = operator.request("GET", "/metrics", token=None)
    assert status == 401
    assert "Bearer" in headers["WWW-Authenticate"]
    status, _, _ = operator.request("GET", "/metrics", token="x" * 32)
    assert status == 401


def test_metrics_public_needs_no_token(operator_factory):
    public = operator_factory({"metrics_public": True})
    status, _, body = public.request("GET", "/metrics", token=None)
    assert status == 200
    assert b"# TYPE crate_build_info gauge" in body
    status, _, _ = public.request("GET", "/v1/events", token=None)
    assert status == 401


def test_logs_of_a_running_unit(operator, asset_url, callbacks):
    app_id, deployment_id = next_id(), next_id()
    body = deploy_body(app_id, deployment_id, asset_url, callbacks)
    record = deploy(operator, body)
    assert record["state"] == "succeeded", record
    port = body["slots"]["blue"]["port"]
    expected = f"sample app ops listening on 127.0.0.1:{port}"
    path = f"/v1/app/logs?app_id={app_id}&instance_id=blue&lines=200"

    def logged():
        status, _, answer = operator.request("GET", path)
        assert status == 200, answer
        return answer if any(expected in line
                             for line in answer["lines"]) else None

    answer = wait_until(logged)
    assert answer["unit"] == f"crate-app-{app_id}-blue.service"
    assert answer["truncated"] is False
    status, _, one = operator.request(
        "GET", f"/v1/app/logs?app_id={app_id}&instance_id=blue&lines=1")
    assert status == 200
    assert len(one["lines"]) <= 1


@pytest.mark.parametrize("query, expected", [
    ("app_id={app}&instance_id=green", 404),
    ("app_id=1999999999&instance_id=blue", 404),
    ("app_id={app}&instance_id=blue&lines=0", 400),
    ("app_id={app}&instance_id=blue&lines=5000", 400),
    ("instance_id=blue", 400),
    ("app_id=abc&instance_id=blue", 400),
])
def test_logs_bad_requests(operator, query, expected):
    # The app deployed by test_logs_of_a_running_unit may not exist when
    # this runs alone; a missing app is still a 404 or a 400.
    path = "/v1/app/logs?" + query.format(app=next_id())
    status, _, answer = operator.request("GET", path)
    assert status == expected, answer
    assert answer["error"]


def test_logs_need_token(operator):
    status, _, _ = operator.request(
        "GET", "/v1/app/logs?app_id=1&instance_id=blue", token=None)
    assert status == 401


def _all_events(operator, after=0):
    events = []
    while True:
        status, _, page = operator.request(
            "GET", f"/v1/events?after={after}&limit=1000")
        assert status == 200, page
        events += page["events"]
        after = page["next_after"]
        if not page["more"]:
            return events, after


def test_events_replay_after_receiver_down(operator_factory, asset_url,
                                           callbacks):
    op = operator_factory({"callback_backoff_s": 0.2,
                           "callback_backoff_max_s": 0.5})
    app_id, deployment_id = next_id(), next_id()
    _, start = _all_events(op)
    callbacks.fail_next(100000, 503)
    try:
        record = deploy(op, deploy_body(app_id, deployment_id, asset_url,
                                        callbacks))
        assert record["state"] == "succeeded", record
        # The record is saved before its callback event is written, so the
        # succeeded event can follow the status by a moment.

        def succeeded_event_written():
            found, _ = _all_events(op, start)
            return any(e["event"] == "deployment.succeeded" and
                       str(e["deployment_id"]) == str(deployment_id)
                       for e in found)

        wait_until(succeeded_event_written, timeout=10)
        events, _ = _all_events(op, start)
    finally:
        callbacks.fail_next(0)
    mine = [e for e in events if str(e["deployment_id"]) == str(deployment_id)]
    names = [e["event"] for e in mine]
    assert names[0] == "deployment.queued"
    assert names[-1] == "deployment.succeeded"
    assert "deployment.running" in names
    seqs = [e["seq"] for e in mine]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    for event in mine:
        assert event["app_id"] == app_id
        assert event["body"]["seq"] == event["seq"]
        assert event["body"]["event"] == event["event"]
        assert event["delivery_id"].startswith(f"{event['seq']}-")
        assert event["created_at"].endswith("Z")
    assert not mine[-1]["delivered"]

    status, _, page = op.request("GET", f"/v1/events?after={start}&limit=2")
    assert status == 200
    assert [e["seq"] for e in page["events"]] == [e["seq"] for e in events[:2]]
    assert page["next_after"] == events[1]["seq"]
    assert page["more"] is True

    def all_delivered():
        again, _ = _all_events(op, start)
        return all(e["delivered"] for e in again
                   if str(e["deployment_id"]) == str(deployment_id))

    wait_until(all_delivered, timeout=30)


def test_events_bad_query(operator):
    for query in ("after=-1", "limit=0", "limit=1001", "after=x", "page=2"):
        status, _, answer = operator.request("GET", f"/v1/events?{query}")
        assert status == 400, (query, answer)


def test_history_pruning_keeps_newest(operator_factory, asset_server,
                                      callbacks):
    op = operator_factory({"history_max_records": 3,
                           "history_prune_interval_s": 0.5})
    missing = asset_server.url("/no-such-asset-ops")
    app_id = next_id()
    ids = [next_id() for _ in range(5)]
    for deployment_id in ids:
        record = deploy(op, deploy_body(app_id, deployment_id, missing,
                                        callbacks), states=("failed",))
        assert record["state"] == "failed"
        time.sleep(0.01)

    def pruned():
        codes = [op.request("GET", op.status_path(i))[0] for i in ids]
        return codes if codes == [404, 404, 200, 200, 200] else None

    wait_until(pruned, timeout=20)
    # The pass logs after its last removal and a directory fsync, so the
    # line can come a moment after the 404s.
    wait_until(lambda: "event=history.pruned" in op.log_text())


def test_log_has_no_secret_values(operator_factory, asset_url, callbacks):
    op = operator_factory({"log_format": "json"})
    secret_value = "sk_live_" + secrets.token_hex(16)
    app_id, deployment_id = next_id(), next_id()
    body = deploy_body(app_id, deployment_id, asset_url, callbacks,
                       env_vars={"API_KEY": secret_value,
                                 "DATABASE_URL": f"postgres://u:{secret_value}"
                                                 f"@db/x"})
    record = deploy(op, body)
    assert record["state"] == "succeeded", record
    status, _, _ = op.request(
        "GET", f"/v1/app/logs?app_id={app_id}&instance_id=blue")
    assert status == 200
    text = op.log_text()
    assert f"deployment_id\": {deployment_id}" in text or \
        f"\"deployment_id\": \"{deployment_id}\"" in text
    assert '"instance_id": "blue"' in text
    assert secret_value not in text
    assert op.callback_secret not in text
    assert op.token not in text


def test_status_reads_while_pruning(operator_factory):
    op = operator_factory({"history_max_records": 50,
                           "history_prune_interval_s": 3600}, start=False)
    records_dir = os.path.join(op.state_dir, "deployments")
    os.makedirs(records_dir, mode=0o700)
    base = time.time() - 3000
    first = 690000
    count = 1500
    for index in range(count):
        deployment_id = first + index
        created = co.utc_now(base + index)
        record = {"deployment_id": deployment_id, "app_id": 690000,
                  "state": "succeeded", "created_at": created,
                  "finished_at": created, "steps": []}
        path = os.path.join(records_dir, f"{deployment_id}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    newest = first + count - 1
    op.start()
    # The first prune starts with the operator. Reads of the newest record
    # must keep returning 200 while it runs.
    statuses = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses.add(op.request("GET", op.status_path(newest))[0])
        if len(os.listdir(records_dir)) <= 50:
            break
    assert statuses == {200}
    assert len(os.listdir(records_dir)) == 50
    status, _, _ = op.request("GET", op.status_path(first))
    assert status == 404
    status, _, document = op.request("GET", op.status_path(newest - 49))
    assert status == 200
    assert document["state"] == "succeeded"
