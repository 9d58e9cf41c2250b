"""Tests of the test harness itself: each part works, and each check in it can fail."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import signal
import socket
import stat
import struct
import subprocess
import textwrap
import threading
import time
import types
import urllib.error
import urllib.request

import pytest

import harness

# === Helpers ===


def http_get(port: int, path: str = "/", host: str | None = None,
             method: str = "GET") -> tuple[int, bytes]:
    """Send one request to 127.0.0.1:port and return (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_sample_app(path: str, port: int, **extra_env: str) -> subprocess.Popen:
    """Run the sample app as a host process and wait until it serves."""
    env = {"PATH": "/usr/bin:/bin", "PORT": str(port), "CRATE_VERSION": "1.2.3",
           "CRATE_INSTANCE_ID": "inst-a", **extra_env}
    proc = subprocess.Popen([path], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        harness.wait_http("http://127.0.0.1:%d/healthz" % port, timeout=10)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def sysctl_values() -> dict[str, str]:
    """Read the host sysctls that a careless systemd PID 1 changes."""
    values = {}
    for name in ("fs/file-max", "fs/nr_open", "net/unix/max_dgram_qlen"):
        with open("/proc/sys/" + name, encoding="ascii") as handle:
            values[name] = handle.read().strip()
    return values


class ScriptedTCPServer:
    """Raw TCP server that misbehaves on chosen connections (1-based numbers).

    "reset": read the request, then close with SO_LINGER 0 (sends RST).
    "close": read the request, then close without sending a response.
    Any other connection gets a 200 with body "ok".
    """

    def __init__(self, actions: dict[int, str], default: str = "ok") -> None:
        self.actions = actions
        self.default = default
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            action = self.actions.get(self.connections, self.default)
            with conn:
                conn.recv(65536)
                if action == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                elif action == "close":
                    pass
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")

    def close(self) -> None:
        """Stop accepting connections."""
        self.sock.close()


@pytest.fixture
def scratch_dir(shared_dir, request):
    """A per-test dir inside the shared dir, so that the session cleanup removes it."""
    path = pathlib.Path(shared_dir, "scratch", request.node.name.replace("/", "_"))
    path.mkdir(parents=True)
    return path


# === Sample app (host process) ===

def test_sample_app_serves_paths(scratch_dir):
    app = harness.build_asset("build-x", os.path.join(scratch_dir, "app"))
    port = harness.free_port()
    proc = start_sample_app(app, port)
    try:
        status, body = http_get(port, "/")
        assert status == 200
        assert body == b"build-x version=1.2.3 instance=inst-a\n"

        status, body = http_get(port, "/env")
        assert status == 200
        assert json.loads(body)["PORT"] == str(port)

        status, body = http_get(port, "/whoami")
        assert set(json.loads(body)) == {"uid", "gid", "euid"}

        status, body = http_get(port, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert http_get(port, "/nope")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    assert code == 0, "sample app must exit 0 on SIGTERM"


def test_sample_app_health_failures(scratch_dir):
    app = harness.build_asset("h", os.path.join(scratch_dir, "app"))
    port = harness.free_port()
    proc = start_sample_app(app, port, SAMPLE_FAIL_HEALTH="1")
    try:
        assert http_get(port, "/healthz")[0] == 500
    finally:
        proc.kill()
        proc.wait()

    health_file = scratch_dir / "health"
    health_file.write_text("fail\n")
    port = harness.free_port()
    proc = start_sample_app(app, port, SAMPLE_HEALTH_FILE=str(health_file))
    try:
        assert http_get(port, "/healthz")[0] == 500
        health_file.write_text("ok\n")
        assert http_get(port, "/healthz")[0] == 200
        health_file.unlink()
        assert http_get(port, "/healthz")[0] == 200
    finally:
        proc.kill()
        proc.wait()


def test_sample_app_exit_code(scratch_dir):
    app = harness.build_asset("e", os.path.join(scratch_dir, "app"))
    result = subprocess.run([app], env={"SAMPLE_EXIT_CODE": "3", "PORT": "1"},
                            capture_output=True, timeout=10, check=False)
    assert result.returncode == 3


def test_build_asset_mode_and_marker(scratch_dir, monkeypatch):
    app = harness.build_asset('odd "name"', os.path.join(scratch_dir, "sub", "app"))
    assert stat.S_IMODE(os.stat(app).st_mode) == 0o755
    with open(app, encoding="utf-8") as handle:
        first_line = handle.readline()
        source = handle.read()
    assert first_line == "#!/usr/bin/python3 -I\n"
    assert 'BUILD = "odd \\"name\\""\n' in source

    no_marker = scratch_dir / "no_marker.py"
    no_marker.write_text("print('no build line')\n")
    monkeypatch.setattr(harness, "SAMPLE_APP", str(no_marker))
    with pytest.raises(ValueError, match="exactly once"):
        harness.build_asset("x", os.path.join(scratch_dir, "other"))


# === Shared dir and helpers ===

def test_shared_dir_layout(shared_dir):
    if harness.is_root():
        assert shared_dir.startswith("/srv/crate-test-")
    assert stat.S_IMODE(os.stat(shared_dir).st_mode) == 0o755
    for name in ("units", "apps", "www", "caddy"):
        assert os.path.isdir(os.path.join(shared_dir, name)), name


def test_remove_shared_dir_rejects_foreign(scratch_dir):
    with pytest.raises(RuntimeError, match="does not start with"):
        harness.remove_shared_dir(str(scratch_dir))
    assert scratch_dir.exists()


def test_mounts_under_finds_proc():
    assert "/proc" in harness.mounts_under("/proc")
    assert harness.mounts_under("/proc/nonexistent-dir") == []


def test_wait_http_times_out():
    port = harness.free_port()
    with pytest.raises(TimeoutError, match="no HTTP response"):
        harness.wait_http("http://127.0.0.1:%d/" % port, timeout=0.3)


def test_sign_known_vector():
    # HMAC-SHA256 test vector published for key "key" and this message.
    body = b"The quick brown fox jumps over the lazy dog"
    expected = ("sha256="
                "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")
    assert harness.sign("key", body) == expected
    assert harness.sign(b"key", body) == expected
    assert harness.sign("other", body) != expected


# === Asset server ===

def test_asset_server_counts(asset_server):
    url = asset_server.put("count/file.bin", b"0123456789")
    path = "/count/file.bin"
    assert url == asset_server.url(path)
    assert asset_server.count(path) == 0

    port = asset_server.port
    assert http_get(port, path) == (200, b"0123456789")
    assert http_get(port, path + "?x=1") == (200, b"0123456789")
    assert http_get(port, path, method="HEAD") == (200, b"")
    assert asset_server.count(path) == 3
    assert asset_server.count("/count/other") == 0
    methods = [r["method"] for r in asset_server.requests() if r["path"] == path]
    assert methods == ["GET", "GET", "HEAD"]


def test_asset_server_missing_and_traversal(asset_server, shared_dir):
    port = asset_server.port
    assert http_get(port, "/no/such/file")[0] == 404
    # The shared dir is the parent of the served www/ dir.
    outside = os.path.join(shared_dir, "outside.txt")
    with open(outside, "w", encoding="ascii") as handle:
        handle.write("must not be served\n")
    assert http_get(port, "/../outside.txt")[0] == 404
    assert http_get(port, "/%2e%2e/outside.txt")[0] == 404


def test_asset_server_faults(asset_server):
    path = "/fault/file.bin"
    asset_server.put(path, bytes(range(100)))
    port = asset_server.port
    try:
        asset_server.set_fault(path, status=500)
        assert http_get(port, path)[0] == 500

        asset_server.set_fault(path, cut_after=10)
        with pytest.raises(http.client.IncompleteRead) as info:
            http_get(port, path)
        assert len(info.value.partial) == 10

        asset_server.set_fault(path, delay_s=0.3)
        started = time.monotonic()
        assert http_get(port, path)[0] == 200
        assert time.monotonic() - started >= 0.3

        asset_server.clear_faults(path)
        assert http_get(port, path) == (200, bytes(range(100)))
    finally:
        asset_server.clear_faults()
    assert asset_server.count(path) == 4


# === Callback receiver ===

def post(url: str, body: bytes, headers: dict | None = None) -> int:
    """POST body to url and return the status (also for 4xx and 5xx)."""
    headers = headers or {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_callback_receiver_fail_next(callbacks):
    callbacks.clear()
    callbacks.fail_next(2, status=503)
    statuses = [post(callbacks.url(), json.dumps({"deployment_id": n}).encode())
                for n in (7, 7, 8)]
    assert statuses == [503, 503, 200]

    records = callbacks.records()
    assert [r.status for r in records] == [503, 503, 200]
    assert all(r.path == "/cb" for r in records)
    assert records[0].headers["content-type"] == "application/json"
    assert records[0].headers["Content-Type"] == "application/json"
    assert records[0].time <= records[1].time <= records[2].time
    assert len(callbacks.events(deployment_id=7)) == 2
    assert callbacks.events(deployment_id="8") == [{"deployment_id": 8}]
    assert callbacks.events() == [{"deployment_id": 7}, {"deployment_id": 7},
                                  {"deployment_id": 8}]


def test_callback_receiver_fail_next_for_one_path(callbacks):
    callbacks.clear()
    callbacks.fail_next(1, status=503, path="/cb/mine")
    statuses = [post(callbacks.url(path), b"{}")
                for path in ("/cb/other", "/cb/mine", "/cb/mine")]
    assert statuses == [200, 503, 200]


def test_callback_receiver_wait_for(callbacks):
    callbacks.clear()
    timer = threading.Timer(0.2, post, (callbacks.url("/late"), b'{"n": 1}'))
    timer.start()
    found = callbacks.wait_for(
        lambda records: [r for r in records if r.path == "/late"], timeout=5)
    timer.join()
    assert found[0].json() == {"n": 1}

    with pytest.raises(TimeoutError, match="callback condition not met"):
        callbacks.wait_for(lambda records: len(records) > 5, timeout=0.3)


def test_callback_receiver_chunked_and_non_json(callbacks):
    callbacks.clear()
    conn = http.client.HTTPConnection("127.0.0.1", callbacks.port, timeout=5)
    conn.request("POST", "/chunked", body=iter([b'{"a":', b' 1}']),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    assert callbacks.records()[0].body == b'{"a": 1}'

    post(callbacks.url(), b"not json")
    with pytest.raises(ValueError, match="not JSON"):
        callbacks.events()


# === Request loop ===

def test_request_loop_success(asset_server):
    asset_server.put("loop/ok.txt", b"v1\n")
    loop = harness.RequestLoop(asset_server.url("/loop/ok.txt"), "loop.example.test")
    loop.start()
    loop.wait_requests(5)
    summary = loop.stop()
    assert summary["failed"] == 0
    assert summary["failures"] == []
    assert summary["total"] >= 5
    assert summary["bodies"] == {"v1\n": summary["total"]}
    assert summary["runs"] == [["v1\n", summary["total"]]]
    host_headers = {r["headers"]["host"] for r in asset_server.requests()
                    if r["path"] == "/loop/ok.txt"}
    assert host_headers == {"loop.example.test"}


def test_request_loop_shows_switch(asset_server, shared_dir):
    path = os.path.join(shared_dir, "www", "loop", "switch.txt")
    asset_server.put("loop/switch.txt", b"v1\n")
    loop = harness.RequestLoop(asset_server.url("/loop/switch.txt"), "x.test")
    loop.start()
    loop.wait_requests(3)
    with open(path + ".new", "wb") as handle:
        handle.write(b"v2\n")
    os.replace(path + ".new", path)
    count = len(loop.results)
    loop.wait_requests(count + 3)
    summary = loop.stop()
    assert summary["failed"] == 0
    assert [run[0] for run in summary["runs"]] == ["v1\n", "v2\n"]


def test_request_loop_counts_500(asset_server):
    asset_server.put("loop/bad.txt", b"x")
    asset_server.set_fault("/loop/bad.txt", status=500)
    try:
        loop = harness.RequestLoop(asset_server.url("/loop/bad.txt"), "x.test")
        loop.start()
        loop.wait_requests(3)
        summary = loop.stop()
    finally:
        asset_server.clear_faults()
    assert summary["total"] >= 3
    assert summary["failed"] == summary["total"]
    assert "HTTP 500" in summary["failures"][0]
    assert summary["bodies"] == {}


def test_request_loop_counts_refused():
    port = harness.free_port()
    loop = harness.RequestLoop("http://127.0.0.1:%d/" % port, "x.test",
                               interval_s=0.01)
    loop.start()
    loop.wait_requests(3)
    summary = loop.stop()
    assert summary["failed"] == summary["total"]
    assert "ConnectionRefusedError" in summary["failures"][0]
    assert summary["retries"] == 0


def test_request_loop_counts_timeout(asset_server):
    asset_server.put("loop/slow.txt", b"x")
    asset_server.set_fault("/loop/slow.txt", delay_s=1.0)
    try:
        loop = harness.RequestLoop(asset_server.url("/loop/slow.txt"), "x.test",
                                   timeout_s=0.3)
        loop.start()
        loop.wait_requests(1)
        summary = loop.stop()
    finally:
        asset_server.clear_faults()
    assert summary["failed"] >= 1
    assert "timeout" in summary["failures"][0]


@pytest.mark.parametrize("action", ["reset", "close"])
def test_request_loop_retries_once(action):
    server = ScriptedTCPServer({1: action})
    try:
        loop = harness.RequestLoop("http://127.0.0.1:%d/" % server.port, "x.test")
        loop.start()
        loop.wait_requests(2)
        summary = loop.stop()
    finally:
        server.close()
    assert summary["failed"] == 0, summary["failures"]
    assert summary["retries"] == 1
    assert summary["bodies"]["ok"] == summary["total"]


@pytest.mark.parametrize("action", ["reset", "close"])
def test_request_loop_fails_second_error(action):
    server = ScriptedTCPServer({}, default=action)
    try:
        loop = harness.RequestLoop("http://127.0.0.1:%d/" % server.port, "x.test")
        loop.start()
        loop.wait_requests(2)
        summary = loop.stop()
    finally:
        server.close()
    assert summary["failed"] == summary["total"]
    assert "error again after retry" in summary["failures"][0]
    assert summary["retries"] == summary["total"]


# === Caddy ===

def test_caddy_starts_without_servers(shared_dir):
    # A Caddy of its own: the session one has the routes of earlier modules.
    caddy = harness.CaddyProcess(shared_dir, name="caddy-empty-test")
    caddy.start()
    try:
        assert caddy.running()
        assert caddy.get_config("apps/http/servers") == {}
        config = caddy.get_config()
        assert config["admin"]["listen"] == "127.0.0.1:%d" % caddy.admin_port
        assert config["admin"]["config"] == {"persist": False}
    finally:
        caddy.stop()


def test_caddy_routes_posted_route(shared_dir, asset_server):
    asset_server.put("caddy/index.txt", b"through caddy\n")
    upstream = "127.0.0.1:%d" % asset_server.port
    proxy = harness.CaddyProcess(shared_dir, name="caddy-route-test")
    proxy.start()
    try:
        server = {
            "listen": ["127.0.0.1:%d" % proxy.listen_port],
            "automatic_https": {"disable": True},
            "routes": [{
                "@id": "harness-route",
                "match": [{"host": ["route.example.test"]}],
                "handle": [{"handler": "reverse_proxy",
                            "upstreams": [{"dial": upstream}]}],
                "terminal": True,
            }],
        }
        status, _ = proxy.request("POST", "/config/apps/http/servers/harness", server)
        assert status == 200
        port = proxy.listen_port
        routed = http_get(port, "/caddy/index.txt", host="route.example.test")
        assert routed == (200, b"through caddy\n")
        # Caddy 2.6.2 responds to an unmatched Host with 200 and an empty body.
        assert http_get(port, "/caddy/index.txt", host="other.test") == (200, b"")

        proxy.restart(empty=False)
        route_id = proxy.get_config("apps/http/servers/harness/routes/0/@id")
        assert route_id == "harness-route"
        routed = http_get(port, "/caddy/index.txt", host="route.example.test")
        assert routed == (200, b"through caddy\n")

        proxy.restart(empty=True)
        assert proxy.get_config("apps/http/servers") == {}
        with pytest.raises(ConnectionRefusedError):
            http_get(port, "/", host="route.example.test")
    finally:
        code = proxy.stop()
    assert code == 0
    assert not proxy.running()


def test_caddy_start_failure_shows_log(shared_dir):
    proxy = harness.CaddyProcess(shared_dir, name="caddy-bad-config")
    bad = proxy.base_config()
    unknown_handler = {"routes": [{"handle": [{"handler": "nope"}]}]}
    bad["apps"]["http"]["servers"] = {"x": unknown_handler}
    with pytest.raises(RuntimeError, match="caddy exited"):
        proxy.start(bad)
    assert not proxy.running()


# === systemd sandbox ===

SAMPLE_UNIT = """\
[Unit]
Description=harness sample app

[Service]
Type=exec
DynamicUser=yes
ProtectSystem=strict
PrivateTmp=yes
Environment=PORT={port} CRATE_VERSION=9.9 CRATE_INSTANCE_ID=sbx-1
ExecStart={app}
"""


def test_sandbox_runs_dynamic_user_unit(sandbox, shared_dir):
    app_path = os.path.join(shared_dir, "apps", "harness", "app")
    app = harness.build_asset("sbx", app_path)
    port = harness.free_port()
    unit = "harness-sample.service"
    sandbox.write_unit(unit, SAMPLE_UNIT.format(port=port, app=app))
    sandbox.systemctl("daemon-reload")
    sandbox.systemctl("start", unit)
    try:
        harness.wait_http("http://127.0.0.1:%d/healthz" % port, timeout=10)
        assert http_get(port, "/") == (200, b"sbx version=9.9 instance=sbx-1\n")
        ids = json.loads(http_get(port, "/whoami")[1])
        assert ids["uid"] != 0
        assert ids["euid"] != 0
        assert sandbox.unit_property(unit, "ActiveState") == "active"
        assert sandbox.unit_property(unit, "NeedDaemonReload") == "no"
    finally:
        sandbox.systemctl("stop", unit)
    with pytest.raises(ConnectionRefusedError):
        http_get(port, "/")
    assert "listening on 127.0.0.1:%d" % port in sandbox.journal(unit)


def test_sandbox_prefix_reaches_sandbox(sandbox):
    result = subprocess.run([*sandbox.systemctl_prefix(), "is-system-running"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.stdout.strip() == "running"

    # The prefix without "systemctl" enters the sandbox's mount namespace.
    nsenter = sandbox.systemctl_prefix()[:-1]
    inside = subprocess.run([*nsenter, "readlink", "/proc/self/ns/mnt"],
                            capture_output=True, text=True, timeout=30, check=True)
    assert inside.stdout.strip() != os.readlink("/proc/self/ns/mnt")


def test_sandbox_boot_keeps_host_state():
    if not harness.is_root():
        pytest.skip("needs root: boots a second sandbox")
    markers = ["/tmp/crate-harness-marker-%d" % os.getpid(),
               "/var/tmp/crate-harness-marker-%d" % os.getpid()]
    for marker in markers:
        with open(marker, "w", encoding="ascii") as handle:
            handle.write("keep\n")
    sysctls = sysctl_values()
    with open("/proc/sys/kernel/hostname", encoding="ascii") as handle:
        hostname = handle.read()
    shared = harness.make_shared_dir()
    box = harness.SystemdSandbox(shared)
    try:
        box.start()
        # A unit with default dependencies pulls in sysinit.target, which on a
        # plain boot runs systemd-tmpfiles and empties /tmp.
        box.write_unit("harness-oneshot.service",
                       "[Service]\nType=oneshot\nExecStart=/bin/true\n")
        box.systemctl("daemon-reload")
        box.systemctl("start", "harness-oneshot.service")
        launcher = box.proc
        box.stop()
        print("sandbox boot %.2f s, stop %.2f s"
              % (box.boot_seconds, box.stop_seconds))

        for marker in markers:
            assert os.path.exists(marker), "%s vanished during a sandbox boot" % marker
        assert sysctl_values() == sysctls
        with open("/proc/sys/kernel/hostname", encoding="ascii") as handle:
            assert handle.read() == hostname
        assert launcher.returncode is not None
        assert not os.path.exists(box.cgroup)
        assert harness.mounts_under(shared) == []
        assert os.path.exists(os.path.join(shared, "journal.txt"))
    finally:
        box.stop()
        for marker in markers:
            if os.path.exists(marker):
                os.unlink(marker)
        harness.remove_shared_dir(shared)


def test_sandbox_start_failure_cleans_up():
    if not harness.is_root():
        pytest.skip("needs root: boots a sandbox")
    shared = harness.make_shared_dir()
    broken_init = os.path.join(shared, "broken-init.sh")
    with open(broken_init, "w", encoding="ascii") as handle:
        handle.write("echo broken init ran >&2\nexit 7\n")
    box = harness.SystemdSandbox(shared, ns_init=broken_init)
    try:
        with pytest.raises(RuntimeError, match="broken init ran"):
            box.start(timeout=10)
        assert not os.path.exists(box.cgroup)
    finally:
        box.stop()
        harness.remove_shared_dir(shared)


# === Docker daemon and registry ===

def test_docker_pull_and_run(dockerd, registry):
    image = "%s/crate-test/busybox-httpd" % registry.address
    dockerd.build_busybox_image(image + ":1", "hello from the harness container\n")
    login = dockerd.docker("login", "-u", registry.username, "--password-stdin",
                           registry.address, input_text=registry.password)
    assert login.returncode == 0
    dockerd.docker("push", image + ":1")
    dockerd.docker("rmi", "-f", image + ":1")

    # Standard base64 of these credentials contains "/" or "+", which dockerd
    # ignores silently; the URL-safe form must work.
    good = harness.registry_auth_header(registry.username, registry.password,
                                        registry.address)
    bad = harness.registry_auth_header(registry.username, "wrong", registry.address)
    query = "/images/create?fromImage=%s&tag=1" % image
    status, body = dockerd.api("POST", query, headers={"X-Registry-Auth": bad})
    assert status == 500, body
    status, body = dockerd.api("POST", query, headers={"X-Registry-Auth": good})
    assert status == 200
    # Errors after the stream started arrive as "error" objects in a 200 body.
    stream = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert b'"error"' not in stream
    assert b"Downloaded newer image" in stream

    port = harness.free_port()
    create = {"Image": image + ":1", "ExposedPorts": {"8080/tcp": {}},
              "HostConfig": {"PortBindings": {"8080/tcp": [
                  {"HostIp": "127.0.0.1", "HostPort": str(port)}]}}}
    status, created = dockerd.api("POST", "/containers/create?name=harness-web",
                                  create)
    assert status == 201, created
    try:
        status, _ = dockerd.api("POST", "/containers/%s/start" % created["Id"])
        assert status == 204
        harness.wait_http("http://127.0.0.1:%d/" % port, timeout=10)
        assert http_get(port, "/") == (200, b"hello from the harness container\n")
    finally:
        dockerd.api("DELETE", "/containers/%s?force=1" % created["Id"])


def test_host_dockerd_cleanup_after_crash(packages):
    if not harness.is_root():
        pytest.skip("needs root: a host dockerd makes a bridge, mounts and cgroups")
    if "docker.io" in packages:
        pytest.skip("docker.io is not installed")

    run_dirs_before = {path: os.path.isdir(path)
                       for path in harness.HostDockerDaemon.RUN_DIRS}
    daemon = harness.HostDockerDaemon()
    try:
        daemon.start()
        daemon.build_busybox_image("crhost-crash:1")
        started = daemon.docker("run", "-d", "crhost-crash:1")
        container_id = started.stdout.strip()
        inspected = daemon.docker("inspect", "-f", "{{.State.Pid}}", container_id)
        container_pid = int(inspected.stdout)
        key = "%s/containerd/containerd.sock/moby/%s" % (daemon.exec_root,
                                                         container_id)
        shim_socket = "/run/containerd/s/" + hashlib.sha256(key.encode()).hexdigest()

        # A crashed dockerd leaves its shim, the container and its mounts.
        daemon.proc.kill()
        daemon.proc.wait(10)
        assert harness._process_alive(container_pid)
        assert harness.mounts_under(daemon.dir)
        assert os.path.exists(shim_socket)
    finally:
        daemon.cleanup()

    assert not harness._process_alive(container_pid)
    assert daemon.cgroup_processes() == []
    assert daemon._cgroup_dirs() == []
    assert harness.mounts_under(daemon.dir) == []
    assert not os.path.exists(daemon.dir)
    link = subprocess.run(["ip", "link", "show", daemon.bridge],
                          capture_output=True, check=False)
    assert link.returncode != 0, link.stdout
    assert not os.path.exists(shim_socket)
    run_dirs_after = {path: os.path.isdir(path) for path in run_dirs_before}
    assert run_dirs_after == run_dirs_before


# === Operator process (with stand-in scripts) ===

FAKE_OPERATOR = textwrap.dedent("""\
    import http.server, json, sys
    config = json.load(open(sys.argv[sys.argv.index("--config") + 1]))
    host, port = config["listen"].rsplit(":", 1)
    STATES = {"1": "succeeded", "2": "running"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                return self.reply(200, {"ok": True})
            if self.path == "/echo":
                return self.reply(200, {"auth": self.headers.get("Authorization")})
            parts = self.path.split("/")
            if self.path.startswith("/v1/app/instance/deploy/"):
                state = STATES.get(parts[5])
                if state:
                    return self.reply(200, {"state": state})
            if self.path.startswith("/v1/app/deploy/"):
                return self.reply(200, {"state": "legacy-" + parts[4]})
            self.reply(404, {"error": "not found"})

        def reply(self, status, value):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    print("fake operator up", flush=True)
    http.server.HTTPServer((host, int(port)), Handler).serve_forever()
    """)


@pytest.fixture
def fake_caddy():
    """Attributes OperatorProcess reads from a CaddyProcess, without a process."""
    return types.SimpleNamespace(admin_url="http://127.0.0.1:9", listen_port=9)


def test_operator_process_startup_exit(shared_dir, fake_caddy):
    script = os.path.join(shared_dir, "exit-operator.py")
    with open(script, "w", encoding="ascii") as handle:
        handle.write("import sys\n"
                     "print('config rejected: boom', flush=True)\n"
                     "sys.exit(3)\n")
    process = harness.OperatorProcess(shared_dir, None, fake_caddy, script=script)
    with pytest.raises(harness.OperatorError, match="(?s)exited with 3.*boom"):
        process.start(timeout=10)


def test_operator_process_api(shared_dir, fake_caddy):
    script = os.path.join(shared_dir, "fake-operator.py")
    with open(script, "w", encoding="ascii") as handle:
        handle.write(FAKE_OPERATOR)
    overrides = {"drain_s": 1.5, "server_id": "other"}
    process = harness.OperatorProcess(shared_dir, None, fake_caddy, overrides,
                                      script=script)
    assert stat.S_IMODE(os.stat(process.config_path).st_mode) == 0o600
    with open(process.config_path, encoding="utf-8") as handle:
        written = json.load(handle)
    assert written == process.config
    assert written["drain_s"] == 1.5
    assert written["systemctl"] == ["/bin/false"]
    assert written["state_dir"] == os.path.join(shared_dir, "state-%d" % process.index)

    process.start(timeout=15)
    try:
        assert process.argv() == [process.python, "-I", script, "serve", "--config",
                                  process.config_path]
        if os.path.exists("/usr/bin/python3"):
            assert process.python == "/usr/bin/python3"
        status, headers, body = process.request("GET", "/echo")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert body == {"auth": "Bearer " + process.token}
        assert process.request("GET", "/echo", token=None)[2] == {"auth": None}
        assert process.request("GET", "/echo", token="t")[2] == {"auth": "Bearer t"}

        document = process.wait_state(1, ["succeeded"], timeout=5)
        assert document == {"state": "succeeded"}
        document = process.wait_state(5, "legacy-5", timeout=5, path_kind="legacy")
        assert document == {"state": "legacy-5"}
        with pytest.raises(harness.OperatorError, match="did not reach"):
            process.wait_state(2, ["succeeded", "failed"], timeout=0.5)
        with pytest.raises(ValueError):
            process.status_path(1, "other")

        process.restart()
        assert process.starts == 2
        assert process.log_text().count("fake operator up") == 2
    finally:
        process.kill()
    with pytest.raises(harness.OperatorError, match="operator exited"):
        process.wait_state(1, ["succeeded"], timeout=1)
