"""Straight-line deploy: the floor that the operator's deploy time is compared with.

FloorDeployer does only the steps that every binary deploy needs, in one
thread and without records, callbacks or checks: download the asset, write
the unit and env file, daemon-reload, start (or restart) the unit, poll the
health path every 20 ms and make one Caddy admin call. A blue-green switch
also stops the old unit afterwards, as the operator does before it reports
success. The unit and env file texts come from crate_operator's own
render_unit and render_env_file, so that systemd does the same work for both.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.request

import crate_operator
import harness

HEALTH_POLL_S = 0.02
HEALTH_TIMEOUT_S = 30.0
ROUTE_ID = "bench-floor-route"


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

    def deploy(self, asset_url: str, slot: str, port: int,
               old_slot: str | None = None) -> float:
        """Deploy asset_url to slot and return the wall time in seconds.

        With old_slot None the unit of slot is restarted in place. Otherwise
        the unit of old_slot is stopped after the route switch.
        """
        self.count += 1
        started = time.monotonic()
        release = os.path.join(self.root, "release-%d" % self.count)
        os.makedirs(release, mode=0o755)
        binary = os.path.join(release, "app")
        self._download(asset_url, binary)
        unit = "bench-floor-%s.service" % slot
        self._write_unit(unit, slot, port, binary, release)
        self._systemctl("daemon-reload")
        self._systemctl("restart" if old_slot is None else "start", unit)
        self._wait_healthy(port)
        self._set_route(port)
        if old_slot is not None:
            self._systemctl("stop", "bench-floor-%s.service" % old_slot)
        return time.monotonic() - started

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

    def _set_route(self, port: int) -> None:
        route = {"@id": ROUTE_ID, "match": [{"host": [self.domain]}],
                 "handle": [{"handler": "reverse_proxy",
                             "upstreams": [{"dial": "127.0.0.1:%d" % port}]}],
                 "terminal": True}
        if self.route_created:
            status, body = self.caddy.request("PATCH", "/id/" + ROUTE_ID, route)
        else:
            path = "/config/apps/http/servers/crate/routes/0"
            status, body = self.caddy.request("PUT", path, route)
            self.route_created = True
        if status != 200:
            raise RuntimeError("Caddy returned %d for the floor route: %s"
                               % (status, json.dumps(body)[:300]))
