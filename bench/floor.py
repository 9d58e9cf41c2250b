"""Straight-line deploys: the floors that the operator's deploy times are compared with.

FloorDeployer does only the steps that every binary deploy needs, in one
thread and without records, callbacks or checks: download the asset, write
the unit and env file, daemon-reload, start (or restart) the unit, poll the
health path every 20 ms and make one Caddy admin call. A blue-green switch
also stops the old unit afterwards, as the operator does before it reports
success. The unit and env file texts come from crate_operator's own
render_unit and render_env_file, so that systemd does the same work for both.

DockerFloorDeployer does the same for a docker app: pull the image tag
from the registry with credentials, create the container (with the
operator's port binding, user and restart policy), start it, poll the
health path every 20 ms and make one Caddy admin call. In place, the old
container is stopped before the new one starts, because both bind the
same port. After a switch the old one is stopped at the end.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.parse
import urllib.request

import crate_operator
import harness

HEALTH_POLL_S = 0.02
HEALTH_TIMEOUT_S = 30.0
ROUTE_ID = "bench-floor-route"
DOCKER_ROUTE_ID = "bench-floor-docker-route"


class FloorDeployer:
    """Deploys one app in the fewest steps, with units named bench-floor-<slot>."""

    def __init__(self, shared_dir: str, sandbox: harness.SystemdSandbox,
                 caddy: harness.CaddyProcess, domain: str) -> None:
        self.sandbox = sandbox
        self.caddy = caddy
        self.domain = domain
        self.unit_dir = os.path.join(shared_dir, "units")
        self.root = os.path.join(shared_dir, "floor")
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        self.route_created = False
        self.count = 0
        self.steps: dict = {}
        self._last = 0.0

    def deploy(self, asset_url: str, slot: str, port: int,
               old_slot: str | None = None) -> float:
        """Deploy asset_url to slot and return the wall time in seconds.

        With old_slot None the unit of slot is restarted in place. Otherwise
        the unit of old_slot is stopped after the route switch.
        """
        self.count += 1
        started = time.monotonic()
        self.steps = {}
        self._last = started
        release = os.path.join(self.root, "release-%d" % self.count)
        os.makedirs(release, mode=0o755)
        binary = os.path.join(release, "app")
        self._download(asset_url, binary)
        self._lap("fetch_asset")
        unit = "bench-floor-%s.service" % slot
        self._write_unit(unit, slot, port, binary, release)
        self._lap("write_unit")
        self._systemctl("daemon-reload")
        self._lap("daemon_reload")
        self._systemctl("restart" if old_slot is None else "start", unit)
        self._lap("start_instance")
        self._wait_healthy(port)
        self._lap("health_check")
        self._set_route(port)
        self._lap("switch_route")
        if old_slot is not None:
            self._systemctl("stop", "bench-floor-%s.service" % old_slot)
            self._lap("stop_old")
        return time.monotonic() - started

    def _lap(self, step: str) -> None:
        # Step times in ms since the previous lap, named like the operator's
        # steps so that the bench log can show both side by side.
        now = time.monotonic()
        self.steps[step] = round((now - self._last) * 1000)
        self._last = now

    def cleanup(self) -> None:
        """Stop the floor units and delete their files and the route."""
        for name in os.listdir(self.unit_dir):
            if name.startswith("bench-floor-"):
                self._systemctl("stop", name)
                os.unlink(os.path.join(self.unit_dir, name))
        self._systemctl("daemon-reload")
        if self.route_created:
            self.caddy.request("DELETE", "/id/" + ROUTE_ID)

    def _download(self, url: str, dest: str) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=30) as response, \
                open(dest, "wb") as handle:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                digest.update(chunk)
                handle.write(chunk)
        os.chmod(dest, 0o755)

    def _write_unit(self, unit: str, slot: str, port: int, binary: str,
                    release: str) -> None:
        env_path = os.path.join(self.root, "%s.env" % slot)
        env = {"PORT": str(port), "CRATE_INSTANCE_ID": slot,
               "CRATE_VERSION": "floor-%d" % self.count}
        with open(env_path, "w", encoding="utf-8") as handle:
            handle.write(crate_operator.render_env_file(env))
        os.chmod(env_path, 0o600)
        text = crate_operator.render_unit({
            "app_id": "bench-floor", "instance_id": slot,
            "version": "floor-%d" % self.count, "deployment_id": self.count,
            "exec_argv": [binary], "workdir": release, "env_file": env_path,
            "app_user": "dynamic", "stop_timeout_s": 30.0, "restart_sec_s": 1.0,
        })
        with open(os.path.join(self.unit_dir, unit), "w", encoding="utf-8") as handle:
            handle.write(text)

    def _systemctl(self, *args: str) -> None:
        self.sandbox.systemctl(*args)

    def _wait_healthy(self, port: int) -> None:
        wait_healthy(port)

    def _set_route(self, port: int) -> None:
        self.route_created = set_route(self.caddy, ROUTE_ID, self.domain,
                                       port, self.route_created)


def wait_healthy(port: int) -> None:
    """Poll GET /healthz on 127.0.0.1:port every 20 ms until it returns 200."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError("floor app on port %d was not healthy within "
                               "%.0f s" % (port, HEALTH_TIMEOUT_S))
        time.sleep(HEALTH_POLL_S)


def set_route(caddy: harness.CaddyProcess, route_id: str, domain: str,
              port: int, exists: bool) -> bool:
    """Create or replace one route with one Caddy admin call; return True."""
    route = {"@id": route_id, "match": [{"host": [domain]}],
             "handle": [{"handler": "reverse_proxy",
                         "upstreams": [{"dial": "127.0.0.1:%d" % port}]}],
             "terminal": True}
    if exists:
        status, body = caddy.request("PATCH", "/id/" + route_id, route)
    else:
        path = "/config/apps/http/servers/crate/routes/0"
        status, body = caddy.request("PUT", path, route)
    if status != 200:
        raise RuntimeError("Caddy returned %d for the floor route %s: %s"
                           % (status, route_id, json.dumps(body)[:300]))
    return True


class DockerFloorDeployer:
    """Deploys one docker app in the fewest steps, containers bench-floor-<slot>-<n>."""

    def __init__(self, dockerd: harness.DockerDaemon,
                 registry: harness.RegistryProcess,
                 caddy: harness.CaddyProcess, domain: str) -> None:
        self.dockerd = dockerd
        self.caddy = caddy
        self.domain = domain
        self.auth = harness.registry_auth_header(
            registry.username, registry.password, registry.address)
        self.route_created = False
        self.count = 0
        self.running: dict = {}  # slot -> container name

    def deploy(self, image: str, tag: str, slot: str, port: int,
               old_slot: str | None = None) -> float:
        """Deploy image:tag to slot and return the wall time in seconds.

        With old_slot None the container of slot is replaced in place.
        Otherwise the container of old_slot is stopped after the switch.
        """
        self.count += 1
        started = time.monotonic()
        self._api("POST", "/images/create?" + urllib.parse.urlencode(
            {"fromImage": image, "tag": tag}), None,
            {"X-Registry-Auth": self.auth}, 200)
        if old_slot is None and slot in self.running:
            self._stop(self.running.pop(slot))
        name = "bench-floor-%s-%d" % (slot, self.count)
        key = "%d/tcp" % port
        self._api("POST", "/containers/create?name=" + name, {
            "Image": "%s:%s" % (image, tag),
            "Env": ["PORT=%d" % port], "User": "65534:65534",
            "Labels": {"crate-bench": "floor"},
            "ExposedPorts": {key: {}},
            "HostConfig": {
                "PortBindings": {key: [{"HostIp": "127.0.0.1",
                                        "HostPort": str(port)}]},
                "RestartPolicy": {"Name": "unless-stopped"},
                "SecurityOpt": ["no-new-privileges"], "CapDrop": ["ALL"]},
        }, None, 201)
        self._api("POST", "/containers/%s/start" % name, None, None, 204)
        self.running[slot] = name
        wait_healthy(port)
        self.route_created = set_route(self.caddy, DOCKER_ROUTE_ID,
                                       self.domain, port, self.route_created)
        if old_slot is not None and old_slot in self.running:
            self._stop(self.running.pop(old_slot))
        return time.monotonic() - started

    def cleanup(self) -> None:
        """Remove the floor's containers and its route."""
        status, items = self.dockerd.api(
            "GET", "/containers/json?all=1&filters=" + urllib.parse.quote(
                json.dumps({"label": ["crate-bench=floor"]})))
        for item in items if status == 200 else []:
            self.dockerd.api("DELETE", "/containers/%s?force=1" % item["Id"])
        self.running.clear()
        if self.route_created:
            self.caddy.request("DELETE", "/id/" + DOCKER_ROUTE_ID)

    def _stop(self, name: str) -> None:
        # The bench images stop on SIGKILL (STOPSIGNAL), as the operator's
        # stop does after its timeout.
        self._api("POST", "/containers/%s/stop?t=30" % name, None, None, 204)

    def _api(self, method: str, path: str, body, headers, expect: int):
        status, answer = self.dockerd.api(method, path, body, headers=headers)
        if status != expect:
            raise RuntimeError("dockerd returned %d for %s %s: %r"
                               % (status, method, path, answer))
        # A pull returns 200 with a stream of JSON lines and reports a
        # failure as a line with an "error" key.
        text = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        if b'"error"' in text:
            raise RuntimeError("dockerd reported an error for %s %s: %r"
                               % (method, path, text[-300:]))
        return answer
