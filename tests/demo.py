"""Demo of crate-operator on real parts: deploy v1, then v2 blue/green under load.

Run as root with `make demo`. It boots the namespaced systemd sandbox,
Caddy, an asset server and a callback receiver (all on 127.0.0.1), starts
crate_operator.py, and then:

1. deploys sample app build "v1" (deployment 1001, strategy immediate),
2. shows responses through Caddy for Host demo.example.test,
3. deploys build "v2" (deployment 1002, strategy bluegreen) while a request
   loop runs, and shows how the responses switched from v1 to v2,
4. prints the final status document and the callbacks received,
5. starts dockerd (a unit of the sandbox) and a private registry, and
   pushes two tags of a busybox image with credentials,
6. deploys them as docker app 2 in the same way: tag 1 (deployment 2001,
   immediate), then tag 2 (deployment 2002, bluegreen) under a request
   loop for Host docker.example.test.

Everything it started is stopped and removed at the end. The exit code is
1 when any step failed or any request through Caddy failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (needs the sys.path entry above)

DOMAIN = "demo.example.test"
DOCKER_DOMAIN = "docker.example.test"
BINARY_DEPLOY = "/v1/app/instance/binary/deploy"
DOCKER_DEPLOY = "/v1/app/instance/docker/deploy"
# The harness image runs httpd on 8080; the app must listen on $PORT.
DOCKER_COMMAND = ["/bin/busybox", "sh", "-c",
                  'exec /bin/busybox httpd -f -p "$PORT" -h /www']
FINAL_STATES = ("succeeded", "failed", "rolled_back")
DEPLOY_TIMEOUT_S = 90


class DemoError(Exception):
    """Raised when a demo step fails. The message names the step and the cause."""


# === Output ===

_started = time.monotonic()


def say(text: str = "") -> None:
    """Print one line of demo output, flushed at once."""
    print(text, flush=True)


def step(title: str) -> None:
    """Print a step banner with the time since the demo started."""
    say("\n== %s  (t=%.1f s)" % (title, time.monotonic() - _started))


def pretty(value: Any) -> str:
    """Return value as indented JSON (bytes as text)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value, indent=2, sort_keys=True)


# === Steps ===

class Demo:
    """Running parts of the demo and the steps that use them."""

    def __init__(self) -> None:
        self.shared_dir: str | None = None
        self.sandbox: harness.SystemdSandbox | None = None
        self.caddy: harness.CaddyProcess | None = None
        self.assets: harness.AssetServer | None = None
        self.callbacks: harness.CallbackReceiver | None = None
        self.operator: harness.OperatorProcess | None = None
        self.dockerd: harness.DockerDaemon | None = None
        self.registry: harness.RegistryProcess | None = None
        self.image = ""
        self.ports: dict[str, int] = {}
        self.urls: dict[str, str] = {}
        self.failed_requests = 0

    def start_parts(self) -> None:
        """Start sandbox, Caddy, asset server, callback receiver and the operator."""
        step("1. starting sandbox systemd, caddy, asset server, callback receiver")
        self.shared_dir = harness.make_shared_dir()
        say("shared dir: %s" % self.shared_dir)
        self.sandbox = harness.SystemdSandbox(self.shared_dir)
        self.sandbox.start()
        say("sandbox systemd: host pid %d, booted in %.2f s"
            % (self.sandbox.pid, self.sandbox.boot_seconds))
        self.caddy = harness.CaddyProcess(self.shared_dir)
        self.caddy.start()
        say("caddy: admin %s, sites on 127.0.0.1:%d"
            % (self.caddy.admin_url, self.caddy.listen_port))
        self.assets = harness.AssetServer(os.path.join(self.shared_dir, "www"))
        self.assets.start()
        self.callbacks = harness.CallbackReceiver()
        self.callbacks.start()
        say("callback receiver: %s" % self.callbacks.url())

        for build in ("v1", "v2"):
            asset_path = os.path.join(self.shared_dir, "www", "sample-" + build)
            harness.build_asset(build, asset_path)
            self.urls[build] = self.assets.url("/sample-" + build)
            say("asset %s: %s" % (build, self.urls[build]))
        self.ports = {name: harness.free_port() for name in
                      ("blue", "green", "docker-blue", "docker-green")}

        step("2. starting crate_operator.py")
        self.operator = harness.OperatorProcess(self.shared_dir, self.sandbox,
                                                self.caddy)
        say("command: %s" % " ".join(self.operator.argv()))
        try:
            self.operator.start()
        except harness.OperatorError as exc:
            raise DemoError("the operator did not start: %s" % exc) from None
        say("operator API: %s" % self.operator.base_url)

    def deploy(self, deployment_id: int, build: str, strategy: str) -> dict:
        """POST a binary deploy of build, wait for a final state, return the status."""
        assert self.callbacks is not None
        body = {
            "app_id": 1, "team_id": "demo-team", "environment_id": 1,
            "deployment_id": deployment_id, "deployment_strategy": strategy,
            "domain": DOMAIN, "asset_url": self.urls[build], "target_version": build,
            "slots": {"blue": {"port": self.ports["blue"]},
                      "green": {"port": self.ports["green"]}},
            "env_vars": {"GREETING": "hello"}, "health_check_path": "/healthz",
            "callback_url": self.callbacks.url(),
        }
        return self.post_deploy(BINARY_DEPLOY, body)

    def start_docker(self) -> None:
        """Start dockerd and the registry, then push tags 1 and 2 of an image."""
        assert self.sandbox is not None and self.shared_dir is not None
        self.dockerd = harness.DockerDaemon(self.sandbox)
        self.dockerd.start()
        self.registry = harness.RegistryProcess(self.shared_dir)
        self.registry.start()
        say("dockerd: %s, registry: %s (user %s)"
            % (self.dockerd.socket_path, self.registry.address,
               self.registry.username))
        self.image = "%s/demo/web" % self.registry.address
        login = self.dockerd.docker("login", "-u", self.registry.username,
                                    "--password-stdin", self.registry.address,
                                    input_text=self.registry.password)
        if login.returncode != 0:
            raise DemoError("docker login failed: %s" % login.stderr)
        for tag in ("1", "2"):
            self.dockerd.build_busybox_image(
                "%s:%s" % (self.image, tag), "docker web %s\n" % tag)
            self.dockerd.docker("push", "%s:%s" % (self.image, tag))
            self.dockerd.docker("rmi", "-f", "%s:%s" % (self.image, tag))
            say("pushed %s:%s" % (self.image, tag))

    def deploy_docker(self, deployment_id: int, tag: str, strategy: str) -> dict:
        """POST a docker deploy of image tag, wait for a final state, return it."""
        assert self.callbacks is not None and self.registry is not None
        body = {
            "app_id": 2, "team_id": "demo-team", "environment_id": 1,
            "deployment_id": deployment_id, "deployment_strategy": strategy,
            "domain": DOCKER_DOMAIN, "image": self.image, "image_tag": tag,
            "target_version": "tag-" + tag, "docker_command": DOCKER_COMMAND,
            "registry_credentials": {"username": self.registry.username,
                                     "password": self.registry.password},
            "slots": {"blue": {"port": self.ports["docker-blue"]},
                      "green": {"port": self.ports["docker-green"]}},
            "env_vars": {"GREETING": "hello"}, "health_check_path": "/",
            "callback_url": self.callbacks.url(),
        }
        return self.post_deploy(DOCKER_DEPLOY, body)

    def post_deploy(self, path: str, body: dict) -> dict:
        """POST a deploy body, wait for a final state, return the status."""
        assert self.operator is not None
        deployment_id = body["deployment_id"]
        say("POST %s (deployment %d, %s, %s)"
            % (path, deployment_id, body["target_version"],
               body["deployment_strategy"]))
        try:
            status, _, reply = self.operator.request("POST", path, body)
        except OSError as exc:
            raise DemoError("the deploy request failed: %r. The operator log ends "
                            "with:\n%s" % (exc, self.operator.log_tail())) from None
        say("-> HTTP %d %s" % (status, pretty(reply)))
        if status != 202:
            raise DemoError("expected 202 Accepted, got %d. The operator log ends "
                            "with:\n%s" % (status, self.operator.log_tail()))

        try:
            document = self.operator.wait_state(deployment_id, FINAL_STATES,
                                                timeout=DEPLOY_TIMEOUT_S)
        except harness.OperatorError as exc:
            raise DemoError(str(exc)) from None
        state = document.get("state")
        say("deployment %d finished: state=%s" % (deployment_id, state))
        if state != "succeeded":
            raise DemoError("deployment %d ended %s:\n%s\nThe operator log ends "
                            "with:\n%s" % (deployment_id, state, pretty(document),
                                            self.operator.log_tail()))
        return document

    def show_responses(self, domain: str = DOMAIN, count: int = 3) -> None:
        """GET / through Caddy a few times and print status and body."""
        assert self.caddy is not None
        url = "http://127.0.0.1:%d/" % self.caddy.listen_port
        loop = harness.RequestLoop(url, domain)
        failed = 0
        for _ in range(count):
            status, body, failure = loop.request_once()
            outcome = "%s %r" % (status, body)
            if failure:
                outcome += "  FAILED: " + failure
                failed += 1
            say("GET %s Host: %s -> %s" % (url, domain, outcome))
        self.failed_requests += failed
        if failed:
            http_config = pretty(self.caddy.get_config("apps/http"))
            raise DemoError("%d of %d requests through caddy failed. Caddy's http app "
                            "config is:\n%s" % (failed, count, http_config))

    def switch_under_load(self, domain: str = DOMAIN,
                          deploy: Callable[[], dict] | None = None) -> dict:
        """Run deploy (v2 blue/green) under a RequestLoop; print the switch."""
        assert self.caddy is not None
        url = "http://127.0.0.1:%d/" % self.caddy.listen_port
        loop = harness.RequestLoop(url, domain)
        loop.start()
        try:
            loop.wait_requests(20)
            if deploy is None:
                document = self.deploy(1002, "v2", "bluegreen")
            else:
                document = deploy()
            time.sleep(1.0)
        finally:
            summary = loop.stop()

        say("\nrequests through caddy during the switch: %d, failed: %d, retried: %d"
            % (summary["total"], summary["failed"], summary["retries"]))
        say("responses in order (body x count):")
        for body, count in summary["runs"]:
            say("  %5d x %r" % (count, body))
        for reason in summary["failures"][:20]:
            say("  FAILED: %s" % reason)
        self.failed_requests += summary["failed"]
        return document

    def show_callbacks(self) -> None:
        """Print each callback with its status and whether its signature verifies."""
        assert self.callbacks is not None and self.operator is not None
        records = self.callbacks.records()
        say("%d callbacks received:" % len(records))
        for record in records:
            signature = [value for name, value in record.headers.items()
                         if "signature" in name]
            expected = harness.sign(self.operator.callback_secret, record.body)
            if not signature:
                check = "no signature header"
            elif signature[0] == expected:
                check = "signature ok"
            else:
                check = "SIGNATURE MISMATCH"
            say("- POST %s got status %d, %s: %s"
                % (record.path, record.status, check,
                   record.body.decode("utf-8", "replace")))

    def stop_parts(self) -> None:
        """Stop everything in reverse order and delete the shared dir."""
        for part in (self.operator, self.caddy, self.assets, self.callbacks,
                     self.registry, self.dockerd):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # keep cleaning up the rest
                    say("cleanup: stopping %s failed: %r" % (type(part).__name__, exc))
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.shared_dir is not None:
            harness.remove_shared_dir(self.shared_dir)


def run_demo(demo: Demo) -> None:
    """Run every demo step; raise DemoError at the first failed step."""
    demo.start_parts()

    step("3. deploying v1 (deployment 1001, immediate)")
    demo.deploy(1001, "v1", "immediate")

    step("4. responses through caddy for Host: %s" % DOMAIN)
    demo.show_responses()

    step("5. deploying v2 (deployment 1002, bluegreen) under a request loop")
    document = demo.switch_under_load()

    step("6. final status of deployment 1002")
    say(pretty(document))

    step("7. callbacks")
    demo.show_callbacks()

    step("8. starting dockerd and a registry, pushing image tags 1 and 2")
    demo.start_docker()

    step("9. deploying docker tag 1 (deployment 2001, immediate)")
    demo.deploy_docker(2001, "1", "immediate")
    demo.show_responses(DOCKER_DOMAIN)

    step("10. deploying docker tag 2 (deployment 2002, bluegreen) under a "
         "request loop")
    document = demo.switch_under_load(
        DOCKER_DOMAIN, lambda: demo.deploy_docker(2002, "2", "bluegreen"))

    step("11. final status of deployment 2002")
    say(pretty(document))


def main() -> int:
    """Run the demo and return the process exit code."""
    if not harness.is_root():
        say("make demo needs root, because the sandbox uses namespaces, mounts "
            "and a cgroup dir.")
        return 1
    missing = harness.ensure_packages()
    if missing:
        say("missing packages that could not be installed: %s" % ", ".join(missing))
        return 1

    demo = Demo()
    failure = None
    try:
        run_demo(demo)
    except DemoError as exc:
        failure = str(exc)
    finally:
        step("cleanup")
        demo.stop_parts()
        say("stopped everything and removed %s" % demo.shared_dir)

    if failure:
        say("\nDEMO FAILED: %s" % failure)
        return 1
    if demo.failed_requests:
        say("\nDEMO FAILED: %d requests through caddy failed" % demo.failed_requests)
        return 1
    say("\ndemo passed: binary v1 and v2 and docker tags 1 and 2 deployed, "
        "zero failed requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
