"""Hostile input: outbound guards, injection attempts and fuzzed bodies.

Every request value here either gets a 400 or reaches its target as inert
data. A Procfile line arrives after the request was accepted, so a hostile
one fails the deployment before a unit exists. The fuzz tests draw bodies
and parameters from the OpenAPI document the operator serves. App ids are
700000 and up so that no other module's apps are disturbed.
"""

from __future__ import annotations

import base64
import copy
import http.client
import http.server
import io
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
import urllib.parse

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import harness
from openapi_bodies import (DocumentStrategies, Mutator, SafeTargets,
                            apply_mutation, operations, safe_bodies,
                            safe_strategies)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import crate_operator as co  # noqa: E402

DEPLOY = "/v1/app/instance/binary/deploy"
BLOCKED = "127.0.0.2"
_ids = iter(range(700000, 800000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture()
def guarded(operator_factory):
    """An operator that blocks 127.0.0.2/32 besides the default rules."""
    block = co.CONFIG_SPEC["outbound_block"][0] + [f"{BLOCKED}/32",
                                                   "blocked.test"]
    return operator_factory({"outbound_block": block})


@pytest.fixture(scope="module")
def sample_url(asset_server):
    path = os.path.join(asset_server.root_dir, "hostile-sample")
    harness.build_asset("hostile", path)
    return asset_server.url("/hostile-sample")


def deploy_body(app_id, asset_url, callbacks, **changes):
    deployment_id = next_id()
    body = {
        "app_id": app_id, "team_id": "team-h", "environment_id": 7,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"app{app_id}.example.test", "asset_url": asset_url,
        "target_version": f"v{deployment_id}",
        "slots": {"blue": {"port": harness.free_port()}},
        "env_vars": {}, "health_check_path": "/healthz",
        "callback_url": callbacks.url(f"/cb/{app_id}"),
    }
    body.update(changes)
    return body


def delete_app(operator, body):
    """Delete the blue slot of a deployed body and wait until it is gone."""
    status, _, answer = operator.request("POST", "/v1/app/delete", {
        "app_id": body["app_id"], "team_id": body["team_id"],
        "environment_id": body["environment_id"], "domain": body["domain"],
        "instance_ids": ["blue"], "callback_url": body["callback_url"]})
    assert status in (200, 202), answer
    # The delete runs as a job; wait until its unit file is gone.
    unit = os.path.join(operator.config["unit_dir"],
                        f"crate-app-{body['app_id']}-blue.service")
    deadline = time.monotonic() + 30
    while os.path.exists(unit) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)


def get_json(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


# --- What a request leaves on the host ---

def host_snapshot(shared_dir, caddy, sandbox, dockerd=None) -> dict:
    """Return the names of what requests could create on the host, by kind.

    Containers are listed only with a dockerd.
    """
    listed = sandbox.systemctl("list-units", "--all", "--plain", "--no-legend",
                               "--full", "crate-*")
    apps_dir = os.path.join(shared_dir, "apps")
    app_dirs = set()
    for directory, subdirs, _ in os.walk(apps_dir):
        relative = os.path.relpath(directory, apps_dir)
        app_dirs.add(relative)
        if relative.count(os.sep) >= 2:
            subdirs.clear()  # releases and data below an app are deep enough
    containers = []
    if dockerd is not None:
        status, containers = dockerd.api("GET", "/containers/json?all=1")
        assert status == 200, containers
    servers = (caddy.get_config().get("apps", {}).get("http", {})
               .get("servers") or {})
    return {
        "unit files": set(os.listdir(os.path.join(shared_dir, "units"))),
        "units": {line.split()[0] for line in listed.stdout.splitlines()
                  if line.strip()},
        "containers": {container["Names"][0] for container in containers},
        "app dirs": app_dirs,
        "caddy routes": {json.dumps([name, route], sort_keys=True)
                         for name, server in servers.items()
                         for route in server.get("routes") or []},
    }


def created_between(before: dict, after: dict) -> dict:
    """Return what is in after but not in before, by kind (empty kinds left out)."""
    return {kind: sorted(after[kind] - before[kind]) for kind in after
            if after[kind] - before[kind]}


def assert_no_server_error(status, answer, context) -> None:
    assert status < 500, (context, status, answer)
    text = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    assert b"Traceback" not in text, (context, text[:2000])
    assert b'File "' not in text, (context, text[:2000])


def settle(operator, answer) -> None:
    """Wait until the job a 202 response started has finished.

    Instance deploys return an integer deployment_id, and the other jobs
    return a text id for the legacy status path.
    """
    job_id = answer["deployment_id"]
    kind = "instance" if isinstance(job_id, int) else "legacy"
    operator.wait_state(job_id, co.STATES_TERMINAL, timeout=60, path_kind=kind)



# === Outbound guard, in process ===

class _HostRecorder(http.server.BaseHTTPRequestHandler):
    hosts: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.hosts.append(self.headers.get("Host"))
        body = b"payload"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def host_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostRecorder)
    _HostRecorder.hosts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_policy_default_blocks_metadata():
    policy = co.OutboundPolicy([], co.CONFIG_SPEC["outbound_block"][0])
    for host in ("169.254.169.254", "::ffff:169.254.169.254", "0.0.0.0",
                 "fe80::1", "fd00:ec2::254"):
        assert policy.check_before_resolving(host), host
    assert policy.check_before_resolving("127.0.0.1") is None
    assert policy.check_before_resolving("10.1.2.3") is None


def test_policy_allow_list_and_names():
    policy = co.OutboundPolicy(["10.0.0.0/8", ".assets.test"],
                               ["evil.test", "10.9.0.0/16"])
    assert policy.check_before_resolving("10.1.1.1") is None
    assert "outbound_block" in policy.check_before_resolving("10.9.1.1")
    assert "outbound_allow" in policy.check_before_resolving("192.0.2.1")
    assert "outbound_block" in policy.check_before_resolving("EVIL.test.")
    assert policy.check_addresses("a.assets.test", []) is None


def test_config_rejects_bad_outbound_rule(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"token": "t" * 32, "callback_secret": "s" * 32,
                                "outbound_block": ["not a rule!"]}))
    path.chmod(0o600)
    with pytest.raises(co.ConfigError, match="not a rule!"):
        co.load_config(str(path), {}, {})


def test_rebinding_connects_to_checked_address(host_server, monkeypatch,
                                               tmp_path):
    port = host_server.server_address[1]
    answers = iter(["127.0.0.1", BLOCKED, BLOCKED])
    calls = []
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, port_, *args, **kwargs):
        # socket.create_connection resolves the literal address again.
        if host[0].isdigit():
            return real_getaddrinfo(host, port_, *args, **kwargs)
        calls.append(host)
        address = next(answers)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]

    monkeypatch.setattr(co.socket, "getaddrinfo", fake_getaddrinfo)
    policy = co.OutboundPolicy([], [f"{BLOCKED}/32"])
    dest = str(tmp_path / "asset")
    digest = co.download(f"http://rebind.test:{port}/x", dest, 1000, 10.0,
                         {}, policy)
    assert len(digest) == 64
    assert calls == ["rebind.test"]
    assert _HostRecorder.hosts == [f"rebind.test:{port}"]


def test_download_blocked_after_resolution(monkeypatch, tmp_path):
    def fake_getaddrinfo(host, port_, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1",
                                                              port_)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (BLOCKED, port_))]

    monkeypatch.setattr(co.socket, "getaddrinfo", fake_getaddrinfo)
    policy = co.OutboundPolicy([], [f"{BLOCKED}/32"])
    with pytest.raises(co.OutboundBlockedError, match=BLOCKED):
        co.download("http://two.test:9/x", str(tmp_path / "a"), 1000, 5.0,
                    {}, policy)


# === Outbound guard, end to end ===

def test_blocked_literal_asset_url_is_400(guarded, callbacks):
    body = deploy_body(next_id(), f"http://{BLOCKED}:8080/a", callbacks)
    status, _, answer = guarded.request("POST", DEPLOY, body)
    assert status == 400, answer
    fields = [error["field"] for error in answer["errors"]]
    assert fields == ["$.asset_url"]


def test_blocked_callback_name_is_400(guarded, sample_url, callbacks):
    body = deploy_body(next_id(), sample_url, callbacks,
                       callback_url="http://blocked.test/cb")
    status, _, answer = guarded.request("POST", DEPLOY, body)
    assert status == 400, answer
    assert answer["errors"][0]["field"] == "$.callback_url"


def test_metadata_address_rejected_by_default(operator, callbacks):
    body = deploy_body(next_id(), "http://169.254.169.254/latest/meta-data",
                       callbacks)
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 400, answer
    assert "169.254.169.254" in answer["errors"][0]["reason"]


def test_redirect_to_blocked_fails_deploy(guarded, callbacks):
    # A tiny redirecting server: asset_url passes the request-time check,
    # the redirect target is found blocked only at connection time.
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://{BLOCKED}:9/asset")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a"
        body = deploy_body(next_id(), url, callbacks)
        status, _, answer = guarded.request("POST", DEPLOY, body)
        assert status == 202, answer
        doc = guarded.wait_state(body["deployment_id"],
                                 ("failed", "succeeded", "rolled_back"))
    finally:
        server.shutdown()
        server.server_close()
    assert doc["state"] == "failed"
    assert "outbound_block" in json.dumps(doc)


# === Injection: each value is rejected or arrives inert ===

# Each character breaks out of something when a value is pasted unquoted.
# Newline, quotes, backslash, % specifiers and $ variables break a unit file
# line. ;, $, quotes and space break a shell command line. ../ leaves a
# path, CR and LF end an HTTP header, and NUL ends a C string. The last
# three look like ASCII or reverse the text shown to a person.
HOSTILE = [
    ("newline", "\n"), ("carriage return", "\r"), ("double quote", '"'),
    ("single quote", "'"), ("traversal", "../"), ("percent", "%n"),
    ("dollar", "$HOME"), ("semicolon", ";"), ("NUL", "\x00"),
    ("backslash", "\\"), ("space", " "), ("cyrillic a", "\u0430"),
    ("fullwidth semicolon", "\uff1b"), ("right-to-left override", "\u202e"),
]
HOSTILE_IDS = [name for name, _ in HOSTILE]
INSTANCES_DEPLOY = "/v1/app/binary/deploy"
DOCKER_DEPLOY = "/v1/app/instance/docker/deploy"


def assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, path, body,
                            field_prefix):
    """POST body; expect 400 naming a field below field_prefix, and no trace."""
    before = host_snapshot(shared_dir, caddy, sandbox, None)
    status, _, answer = operator.request("POST", path, body)
    assert_no_server_error(status, answer, body)
    assert status == 400, answer
    fields = [error["field"] for error in answer["errors"]]
    assert any(field.startswith(field_prefix) for field in fields), fields
    after = host_snapshot(shared_dir, caddy, sandbox, None)
    assert created_between(before, after) == {}


def docker_deploy_body(app_id, callbacks, image="example/app", **changes):
    body = deploy_body(app_id, None, callbacks, image=image, image_tag="v1",
                       **changes)
    del body["asset_url"]
    return body


@pytest.mark.parametrize("char", [char for _, char in HOSTILE], ids=HOSTILE_IDS)
def test_instance_id_injection_rejected(operator, shared_dir, caddy, sandbox,
                                        callbacks, char):
    slots = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                        slots={f"b{char}x": {"port": harness.free_port()}})
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY,
                            slots, "$.slots")
    instances = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                            instances={f"i{char}x": {"port": harness.free_port()}})
    del instances["slots"], instances["target_version"]
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox,
                            INSTANCES_DEPLOY, instances, "$.instances")
    restart = {"app_id": next_id(), "team_id": "team-h", "environment_id": 7,
               "domain": "restart.example.test", "instance_id": f"i{char}x",
               "callback_url": callbacks.url("/cb/restart")}
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox,
                            "/v1/app/restart", restart, "$.instance_id")


@pytest.mark.parametrize("char", [char for _, char in HOSTILE], ids=HOSTILE_IDS)
def test_version_injection_rejected(operator, shared_dir, caddy, sandbox,
                                    callbacks, char):
    body = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                       target_version=f"v1{char}x")
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY, body,
                            "$.target_version")


@pytest.mark.parametrize("char", [char for _, char in HOSTILE], ids=HOSTILE_IDS)
def test_domain_injection_rejected(operator, shared_dir, caddy, sandbox,
                                   callbacks, char):
    body = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                       domain=f"a{char}b.example.test")
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY, body,
                            "$.domain")


def test_domain_breaking_caddy_json_rejected(operator, shared_dir, caddy,
                                             sandbox, callbacks):
    body = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                       domain='a.example.test"},{"handle":[{"handler":"x"}]}')
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY, body,
                            "$.domain")


@pytest.mark.parametrize("char", [char for _, char in HOSTILE], ids=HOSTILE_IDS)
def test_env_name_injection_rejected(operator, shared_dir, caddy, sandbox,
                                     callbacks, char):
    body = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                       env_vars={f"A{char}B": "x"})
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY, body,
                            "$.env_vars")


def test_env_value_nul_rejected(operator, shared_dir, caddy, sandbox,
                                callbacks):
    # Environment entries are C strings, so a NUL would cut the value.
    body = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                       env_vars={"A": "x\x00y"})
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY, body,
                            "$.env_vars")


def test_asset_url_newline_rejected(operator, shared_dir, caddy, sandbox,
                                    callbacks):
    body = deploy_body(next_id(), "http://127.0.0.1/a\nb", callbacks)
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY, body,
                            "$.asset_url")


def test_callback_url_credentials_rejected(operator, shared_dir, caddy,
                                           sandbox, callbacks):
    body = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                       callback_url="http://u:p@127.0.0.1/")
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY, body,
                            "$.callback_url")


INERT_ENV = {
    "UNIT_BREAK": "x\nExecStartPre=/bin/touch /tmp/pwned\n[Service]",
    "QUOTES": "it's \"quoted\" `cmd` $HOME ${PATH} %n %%",
    "SHELL": "; rm -rf / && echo $(id) | cat",
    "SPACES": "  lead and trail  ",
    "UNICODE": "\u0430\u200b\u202e",
}
# Every hostile character but NUL, which test_env_value_nul_rejected covers.
INERT_ENV.update({f"CHAR_{index}": f"a{char}b"
                  for index, (_, char) in enumerate(HOSTILE) if char != "\x00"})


def test_env_values_arrive_verbatim(operator, shared_dir, sample_url,
                                    callbacks, sandbox):
    app_id = next_id()
    body = deploy_body(app_id, sample_url, callbacks, env_vars=INERT_ENV,
                       limits={"memory_mb": 256, "cpu_percent": 150})
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    doc = operator.wait_state(body["deployment_id"],
                              ("succeeded", "failed", "rolled_back"))
    assert doc["state"] == "succeeded", doc
    env = get_json(body["slots"]["blue"]["port"], "/env")
    for name, value in INERT_ENV.items():
        assert env[name] == value, name
    unit = f"crate-app-{app_id}-blue.service"
    text = pathlib.Path(shared_dir, "units", unit).read_text()
    assert "ExecStartPre" not in text
    assert text.count("[Service]") == 1
    assert "MemoryMax=256M" in text
    assert "CPUQuota=150%" in text
    assert not os.path.exists("/tmp/pwned")
    shown = subprocess.run(
        sandbox.systemctl_prefix() + ["show", "-p", "MemoryMax,CPUQuotaPerSecUSec,"
                                      "ExecStartPre", unit],
        capture_output=True, text=True, timeout=30).stdout
    assert "MemoryMax=268435456" in shown
    assert "CPUQuotaPerSecUSec=1.500000s" in shown
    delete_app(operator, body)


class _RequestHeadRecorder:
    """A one-shot TCP server on 127.0.0.1 that stores the raw request head."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.head = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            while b"\r\n\r\n" not in self.head:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                self.head += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def close(self):
        self.thread.join(10)
        self.sock.close()


@pytest.mark.parametrize("char", [char for _, char in HOSTILE], ids=HOSTILE_IDS)
def test_health_path_injection(operator, shared_dir, caddy, sandbox,
                               callbacks, char):
    path = f"/healthz?q=a{char}b"
    body = deploy_body(next_id(), "http://127.0.0.1:9/a", callbacks,
                       health_check_path=path)
    result = co.validate_body("deploy_binary_slots", body)
    if result.errors:
        assert_rejected_cleanly(operator, shared_dir, caddy, sandbox, DEPLOY,
                                body, "$.health_check_path")
        return
    # Accepted: the probe must send the path as the request target of one
    # request line, with no header or line of its own.
    cleaned = result.value["health_check_path"]
    assert cleaned == path
    recorder = _RequestHeadRecorder()
    try:
        ready, detail = co.probe_http(recorder.port, cleaned)
    finally:
        recorder.close()
    assert ready, detail
    lines = recorder.head.split(b"\r\n")
    assert lines[0] == b"GET " + path.encode() + b" HTTP/1.1"
    names = sorted(line.split(b":", 1)[0].lower() for line in lines[1:] if line)
    assert names == [b"accept-encoding", b"host", b"user-agent"]


def test_health_path_with_accepted_characters_deploys(operator, sample_url,
                                                      callbacks):
    # Every character the health path accepts, in one path: the deploy
    # succeeds only if the probe reached /healthz of the app.
    accepted = [char for _, char in HOSTILE
                if co.validate_body("deploy_binary_slots", deploy_body(
                    1, sample_url, callbacks,
                    health_check_path=f"/healthz?q={char}")).ok]
    assert len(accepted) >= 5, accepted
    body = deploy_body(next_id(), sample_url, callbacks,
                       health_check_path="/healthz?q=" + "".join(accepted))
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    doc = operator.wait_state(body["deployment_id"],
                              ("succeeded", "failed", "rolled_back"))
    assert doc["state"] == "succeeded", doc
    delete_app(operator, body)


# --- Docker: volumes and docker_command ---

@pytest.fixture(scope="module")
def hostile_image(dockerd, registry):
    """Push a busybox httpd image to the registry; return its name without tag."""
    login = dockerd.docker("login", "-u", registry.username, "--password-stdin",
                           registry.address, input_text=registry.password)
    assert login.returncode == 0, login.stderr
    name = f"{registry.address}/crate-test/hostile"
    dockerd.build_busybox_image(f"{name}:v1", "hostile\n")
    dockerd.docker("push", f"{name}:v1")
    dockerd.docker("rmi", "-f", f"{name}:v1")
    return name


def volume_target_accepted(char) -> bool:
    """Return whether the validator accepts char inside a volume's target."""
    offline = types.SimpleNamespace(url=lambda path: "http://127.0.0.1" + path)
    body = docker_deploy_body(1, offline, volumes=[f"data:/da{char}ta"])
    return co.validate_body("deploy_docker_slots", body).ok


@pytest.mark.parametrize("char", [char for _, char in HOSTILE], ids=HOSTILE_IDS)
def test_volume_injection(operator, shared_dir, caddy, sandbox, callbacks,
                          char):
    # Sources name a volume or a path inside the app's data dir, so every
    # hostile character is rejected there except inside a path word
    # ("da../ta" is a dir named "da.."). Targets are container paths: what
    # they accept is carried through as inert data by
    # test_docker_values_arrive_inert.
    source = docker_deploy_body(next_id(), callbacks,
                                volumes=[f"{char}data:/data"])
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox,
                            DOCKER_DEPLOY, source, "$.volumes")
    if not volume_target_accepted(char):
        target = docker_deploy_body(next_id(), callbacks,
                                    volumes=[f"data:/da{char}ta"])
        assert_rejected_cleanly(operator, shared_dir, caddy, sandbox,
                                DOCKER_DEPLOY, target, "$.volumes")


def test_volume_comma_and_traversal_rejected(operator, shared_dir, caddy,
                                             sandbox, callbacks):
    for volumes in (["data:/data,ro"], ["../../etc:/etc"], ["./../up:/x"],
                    ["data:/x:rw,z"]):
        body = docker_deploy_body(next_id(), callbacks, volumes=volumes)
        assert_rejected_cleanly(operator, shared_dir, caddy, sandbox,
                                DOCKER_DEPLOY, body, "$.volumes")


def test_docker_command_nul_rejected(operator, shared_dir, caddy, sandbox,
                                     callbacks):
    body = docker_deploy_body(next_id(), callbacks,
                              docker_command=["/bin/busybox", "a\x00b"])
    assert_rejected_cleanly(operator, shared_dir, caddy, sandbox,
                            DOCKER_DEPLOY, body, "$.docker_command")


def test_docker_values_arrive_inert(operator, dockerd, registry, hostile_image,
                                    callbacks):
    words = [f"a{char}b" for _, char in HOSTILE if char != "\x00"]
    # sh stays PID 1 because a command follows httpd, so /proc/1/cmdline is
    # the docker_command itself; the hostile words are sh's $1, $2, ...
    command = ["/bin/busybox", "sh", "-c",
               '/bin/busybox httpd -f -p "$PORT" -h /www; exit 3',
               "crate-sh", *words]
    targets = [f"/t{index}{char}x" for index, (_, char) in enumerate(HOSTILE)
               if volume_target_accepted(char)]
    assert len(targets) >= 5, targets
    volumes = [f"v{index}:{target}" for index, target in enumerate(targets)]
    app_id = next_id()
    body = docker_deploy_body(
        app_id, callbacks, image=hostile_image, docker_command=command,
        volumes=volumes, health_check_path="/",
        registry_credentials={"username": registry.username,
                              "password": registry.password})
    status, _, answer = operator.request("POST", DOCKER_DEPLOY, body)
    assert status == 202, answer
    doc = operator.wait_state(body["deployment_id"],
                              ("succeeded", "failed", "rolled_back"), timeout=90)
    assert doc["state"] == "succeeded", doc
    name = f"crate-{app_id}-blue-{body['deployment_id']}"
    status, details = dockerd.api("GET", f"/containers/{name}/json")
    assert status == 200, details
    assert details["Config"]["Cmd"] == command
    destinations = sorted(mount["Destination"] for mount in details["Mounts"])
    assert destinations == sorted(targets)
    # base64, because the CLI's text output turns a CR into a newline.
    encoded = dockerd.docker("exec", name, "/bin/busybox", "base64", "/proc/1/cmdline")
    cmdline = base64.b64decode(encoded.stdout).decode()
    assert cmdline.split("\0")[:-1] == command
    for target in targets:
        # The target is one argv element of test -d inside the container.
        found = dockerd.docker("exec", name, "/bin/busybox", "test", "-d", target,
                               check=False)
        assert found.returncode == 0, (target, found.stderr)
    delete_app(operator, body)


# --- Procfile lines ---

# Words of a Procfile web line, each quoted for sh by shlex.quote. Each must
# arrive as one argv element, unchanged: systemd must not expand % or $, and
# nothing may split a word at a space or a semicolon.
PROCFILE_WORDS = ["semi;colon", 'dq"uote', "sq'uote", "dollar$HOME",
                  "${PATH}", "%n%h%%", "back\\slash", "two words", "../x",
                  "\u0430\uff1b\u202e", "", "--flag=$PORT"]
# Lines after the web line that would add unit settings if pasted into the
# unit file. A Procfile parser skips them: they are not "web:" lines.
PROCFILE_EXTRA = ("ExecStartPre=/bin/touch /run/crate-procfile-pwned\n"
                  "[Service]\nUser=root\nworker: ./app; touch /run/x\n")


def release_archive(asset_server, name, procfile):
    """Write a tar.gz of the sample app as ./app and this Procfile; return its URL."""
    work = os.path.join(asset_server.root_dir, name + ".d")
    app = harness.build_asset("procfile", os.path.join(work, "app"))
    archive = os.path.join(asset_server.root_dir, name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(app, arcname="app")
        info = tarfile.TarInfo("Procfile")
        data = procfile.encode("utf-8")
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return asset_server.url(f"/{name}.tar.gz")


def test_procfile_words_arrive_as_argv(operator, shared_dir, asset_server,
                                       callbacks):
    line = "web: ./app " + " ".join(shlex.quote(word) for word in PROCFILE_WORDS)
    url = release_archive(asset_server, "hostile-procfile",
                          line + " $PORT\n" + PROCFILE_EXTRA)
    app_id = next_id()
    body = deploy_body(app_id, url, callbacks)
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    doc = operator.wait_state(body["deployment_id"],
                              ("succeeded", "failed", "rolled_back"))
    assert doc["state"] == "succeeded", doc
    port = body["slots"]["blue"]["port"]
    assert get_json(port, "/argv") == PROCFILE_WORDS + [str(port)]
    unit = pathlib.Path(shared_dir, "units", f"crate-app-{app_id}-blue.service")
    text = unit.read_text()
    assert text.count("\nExecStart=") == 1
    assert "ExecStartPre" not in text
    assert "User=root" not in text
    assert text.count("[Service]") == 1
    delete_app(operator, body)


PROCFILE_BREAKOUTS = [
    ("NUL", "web: ./app a\x00b\n"),
    ("newline inside quotes", "web: ./app 'a\nExecStartPre=/bin/true'\n"),
    ("semicolon", "web: ./app; touch /run/crate-procfile-pwned\n"),
    ("and operator", "web: ./app && touch /run/crate-procfile-pwned\n"),
    ("pipe", "web: ./app | cat\n"),
    ("variable", "web: ./app $HOME\n"),
    ("backquote", "web: ./app `id`\n"),
    ("command substitution", "web: ./app $(id)\n"),
    ("unterminated quote", "web: ./app 'open\n"),
    ("look-alike program", "web: ./\u0430pp\n"),
]


@pytest.mark.parametrize("procfile", [text for _, text in PROCFILE_BREAKOUTS],
                         ids=[case for case, _ in PROCFILE_BREAKOUTS])
def test_procfile_breakout_fails_deploy(operator, shared_dir, caddy, sandbox,
                                        asset_server, callbacks, procfile):
    # The Procfile arrives after the request was accepted, so a bad line
    # fails the deployment before any unit is written or started.
    app_id = next_id()
    url = release_archive(asset_server, f"hostile-procfile-{app_id}", procfile)
    body = deploy_body(app_id, url, callbacks)
    before = host_snapshot(shared_dir, caddy, sandbox)
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    doc = operator.wait_state(body["deployment_id"],
                              ("succeeded", "failed", "rolled_back"))
    assert doc["state"] == "failed", doc
    assert "Procfile" in json.dumps(doc), doc
    after = host_snapshot(shared_dir, caddy, sandbox)
    created = created_between(before, after)
    assert created.get("unit files", []) == []
    assert created.get("units", []) == []
    assert created.get("caddy routes", []) == []


def test_busybox_httpd_runs_hardened(operator, asset_server, callbacks,
                                     tmp_path):
    import tarfile
    busybox = "/bin/busybox"
    if not os.path.exists(busybox):
        pytest.skip("busybox is not installed")
    archive = os.path.join(asset_server.root_dir, "hostile-busybox.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(busybox, arcname="busybox")
        procfile = tmp_path / "Procfile"
        procfile.write_text("web: ./busybox httpd -f -p 127.0.0.1:$PORT -h www\n")
        tar.add(str(procfile), arcname="Procfile")
        www = tmp_path / "www"
        www.mkdir()
        (www / "index.html").write_text("busybox ok\n")
        tar.add(str(www), arcname="www")
    app_id = next_id()
    body = deploy_body(app_id, asset_server.url("/hostile-busybox.tar.gz"),
                       callbacks, health_check_path="/index.html")
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    doc = operator.wait_state(body["deployment_id"],
                              ("succeeded", "failed", "rolled_back"))
    assert doc["state"] == "succeeded", doc
    conn = http.client.HTTPConnection("127.0.0.1", body["slots"]["blue"]["port"],
                                      timeout=5)
    conn.request("GET", "/index.html")
    assert conn.getresponse().read() == b"busybox ok\n"
    conn.close()
    delete_app(operator, body)


# === Fuzzing from the served OpenAPI document ===

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40)
    | st.text(max_size=30) | st.sampled_from(["../x", "a\nb", "%n", "$X",
                                              "\x00", "\u0430"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
# Path and query values: valid ones come from the parameter's schema, these
# try to break out of the path or the query string.
HOSTILE_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["../../etc/passwd", "%00", "a\nb", "-1", "1e3", " 1",
                     "9" * 30, "\u0661", "x?y=1", "a/b", "%2e%2e", ""]))
# No shrink phase, because each shrink step sends requests and may start a
# deployment. Bounded examples and a fixed seed keep every run the same.
FUZZ = settings(max_examples=10, derandomize=True, database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=list(HealthCheck))
BODY_KINDS = ["valid", "mutated", "random field", "random body"]
POST_OPERATIONS = sorted(name for name, endpoint in co.ENDPOINTS.items()
                         if endpoint["body"] is not None)


@pytest.fixture(scope="module")
def served(operator) -> dict:
    """The OpenAPI document as the running operator serves it."""
    status, _, document = operator.request("GET", "/v1/openapi.json")
    assert status == 200, document
    return document


@pytest.fixture(scope="module")
def fuzz_targets(operator, callbacks, asset_server) -> SafeTargets:
    return SafeTargets(
        callback_url=callbacks.url("/cb/hostile-fuzz"),
        asset_url=asset_server.url("/missing/hostile-fuzz-asset"),
        closed_port=harness.free_port(),
        server_id=operator.config["server_id"])


@pytest.mark.parametrize("operation_id", POST_OPERATIONS)
def test_fuzz_bodies_from_served_schema(operator, shared_dir, caddy, sandbox,
                                        dockerd, served, fuzz_targets,
                                        operation_id):
    paths = [path for path, method, operation in operations(served)
             if operation["operationId"] == operation_id]
    assert len(paths) == 1, (operation_id, paths)
    path = paths[0]
    strategies = safe_strategies(served, fuzz_targets)
    schema = strategies.request_schema(operation_id)
    mutator = Mutator(strategies)
    kinds_sent = set()

    def variant(data, valid, kind):
        """Return a copy of the valid body, changed as kind names."""
        body = copy.deepcopy(valid)
        if kind == "mutated":
            choices = mutator.mutations(body, schema)
            _, site, new_value, _ = data.draw(st.sampled_from(choices),
                                              label="mutation")
            apply_mutation(site, new_value)
        elif kind == "random field":
            key = data.draw(st.one_of(st.sampled_from(sorted(body)),
                                      st.text(max_size=12)), label="field")
            body[key] = data.draw(JSON_VALUES, label="value")
        elif kind == "random body":
            body = data.draw(JSON_VALUES, label="body")
        return body

    @FUZZ
    @given(data=st.data())
    def run(data):
        valid = data.draw(safe_bodies(strategies, operation_id, fuzz_targets,
                                      next_id), label="valid body")
        for kind in BODY_KINDS:
            body = variant(data, valid, kind)
            kinds_sent.add(kind)
            before = host_snapshot(shared_dir, caddy, sandbox, dockerd)
            status, _, answer = operator.request("POST", path, body)
            assert_no_server_error(status, answer, (kind, body))
            if kind == "valid":
                assert status != 400, (body, answer)
            if kind == "mutated":
                # The document declares every mutation invalid.
                assert status == 400, (body, answer)
            if status >= 400:
                after = host_snapshot(shared_dir, caddy, sandbox, dockerd)
                assert created_between(before, after) == {}, (kind, body, answer)
            elif status == 202:
                settle(operator, answer)

    run()
    assert kinds_sent == set(BODY_KINDS)


def test_fuzz_get_parameters(operator, shared_dir, caddy, sandbox, dockerd,
                             served):
    gets = [(path, operation) for path, method, operation in operations(served)
            if method == "get"]
    assert gets
    strategies = DocumentStrategies(served)
    before = host_snapshot(shared_dir, caddy, sandbox, dockerd)

    def parameter_value(data, parameter):
        valid = strategies.for_schema(parameter["schema"]).map(str)
        return data.draw(st.one_of(valid, HOSTILE_TEXT),
                         label=parameter["name"])

    @FUZZ
    @given(data=st.data())
    def run(data):
        for template, operation in gets:
            path = template
            query = {}
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    value = parameter_value(data, parameter)
                    path = path.replace("{%s}" % parameter["name"],
                                        urllib.parse.quote(value, safe=""))
                elif data.draw(st.booleans(), label="send " + parameter["name"]):
                    query[parameter["name"]] = parameter_value(data, parameter)
            if query:
                path += "?" + urllib.parse.urlencode(query)
            status, _, answer = operator.request("GET", path)
            assert_no_server_error(status, answer, path)

    run()
    after = host_snapshot(shared_dir, caddy, sandbox, dockerd)
    assert created_between(before, after) == {}


# === Callback delivery bounds, in process ===

def callback_outbox(block):
    config = type("Config", (), {
        "callback_timeout_s": 1.0, "callback_secret": "s" * 32,
        "outbound_allow": [], "outbound_block": block})()
    store = type("Store", (), {"outbox_events": lambda self: []})()
    return co.CallbackOutbox(store, config)


def callback_event(url):
    return {"url": url, "body": "{}", "event": "deployment.running",
            "delivery_id": "1-x"}


def test_callback_blocked_is_not_retried():
    outbox = callback_outbox([f"{BLOCKED}/32"])
    event = callback_event(f"http://{BLOCKED}:9/cb")
    error = outbox._post(event)
    assert "outbound_block" in error
    assert event["blocked"] is True


def test_callback_trickling_response_times_out():
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not stop.is_set():
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outbox = callback_outbox([])
        started = time.monotonic()
        error = outbox._post(callback_event(
            f"http://127.0.0.1:{server.server_address[1]}/cb"))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    # The status line arrived, so the event counts as delivered; the
    # trickled body (10 000 s at this rate) is cut at callback_timeout_s.
    assert error is None
    assert elapsed < 30
