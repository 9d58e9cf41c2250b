"""Benchmarks of crate-operator against a real systemd sandbox and Caddy.

Run as root: `make bench` (quick mode) or `BENCH_QUICK=0 make bench` (full
mode). Prints one markdown table and writes it, with the machine and the
date, to bench/results.md. Sections: deploy overhead of binary and docker
apps against straight-line floors, failed requests during traffic changes,
API throughput, operator time at 10/100/500 apps and memory and startup
footprint.
"""

from __future__ import annotations

import datetime
import functools
import http.client
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
sys.path.insert(0, os.path.join(REPO_DIR, "tests"))
sys.path.insert(0, REPO_DIR)

import harness  # noqa: E402  (needs the sys.path entries above)
from floor import DockerFloorDeployer, FloorDeployer  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK", "1") != "0"
RESULTS_PATH = os.path.join(BENCH_DIR, "results.md")

SLOTS = "/v1/app/instance/binary/deploy"
DOCKER_SLOTS = "/v1/app/instance/docker/deploy"
INSTANCES = "/v1/app/binary/deploy"
TERMINAL = ("succeeded", "failed", "rolled_back", "cancelled")

# Sizes per mode: (quick, full).
DEPLOY_REPEATS = 10
ZERO_DOWNTIME_REQUESTS = 1000 if QUICK else 10000
API_SECONDS = 5 if QUICK else 15
API_ROUNDS = 5
SCALE_POINTS = (10, 100) if QUICK else (10, 100, 500)
SCALE_REPEATS = 15
# Route changes after each measured deploy. A route change takes a few ms
# of own time, so its median needs more samples than the deploy's.
SCALE_ROUTE_CHANGES = 5
# Pause before each measured deploy and route change. Caddy goes on using
# the CPUs for a while after it responds to a config change, more with
# more routes, and a call made at once shared them (inferred from runs
# with and without the pause, see bench/results.md).
SCALE_SETTLE_S = 0.1
HISTORY_RECORDS = 1000
# Records the pruning row starts with; all but 100 are pruned.
PRUNE_RECORDS = 2000 if QUICK else 5000
# Runs of the pruning row, and status reads per operator between two
# checks of the log.
PRUNE_REPEATS = 5 if QUICK else 10
PRUNE_READ_BATCH = 20

# Settings that keep waits out of the measured time: health probes every
# 20 ms like the floor, no drain pause and no canary pause.
OPERATOR_OVERRIDES = {"health_interval_s": 0.02, "drain_s": 0.001,
                      "history_max_records": 5000}


def log(message: str) -> None:
    """Print a progress line on stderr with the elapsed time."""
    sys.stderr.write("[bench %7.1fs] %s\n" % (time.monotonic() - T0, message))
    sys.stderr.flush()


T0 = time.monotonic()


# === Environment ===

class Environment:
    """Sandboxed systemd, Caddy, asset server, callbacks and one operator."""

    def __init__(self, first_id: int = 700000) -> None:
        self.shared = harness.make_shared_dir()
        self.sandbox = harness.SystemdSandbox(self.shared)
        self.caddy = harness.CaddyProcess(self.shared)
        self.assets = harness.AssetServer(os.path.join(self.shared, "www"))
        self.callbacks = harness.CallbackReceiver()
        self.operator: harness.OperatorProcess | None = None
        self.extra: list[harness.OperatorProcess] = []
        self.dockerd: harness.DockerDaemon | None = None
        self.registry: harness.RegistryProcess | None = None
        self._images = 0
        self._ids = iter(range(first_id, first_id + 100000))
        self._builds = 0

    def start(self) -> None:
        """Start every process, the operator last."""
        self.sandbox.start()
        self.caddy.start()
        self.assets.start()
        self.callbacks.start()
        self.operator = harness.OperatorProcess(
            self.shared, self.sandbox, self.caddy, OPERATOR_OVERRIDES)
        self.operator.start()

    def stop(self) -> None:
        """Stop what start() started and delete the shared dir when unmounted."""
        for process in [self.operator] + self.extra:
            if process is not None:
                process.stop()
        if self.dockerd is not None:
            self.dockerd.stop()
        if self.registry is not None:
            self.registry.stop()
        self.callbacks.stop()
        self.assets.stop()
        self.caddy.stop()
        self.sandbox.stop()
        if harness.mounts_under(self.shared):
            log("keeping %s: mounts are left below it" % self.shared)
        else:
            harness.remove_shared_dir(self.shared)

    def next_id(self) -> int:
        """Return an app or deployment id that no other benchmark uses."""
        return next(self._ids)

    def new_asset(self, label: str = "b") -> str:
        """Write a new build of the sample app and return its URL."""
        self._builds += 1
        name = "%s%d" % (label, self._builds)
        harness.build_asset(name, os.path.join(self.assets.root_dir, name))
        return self.assets.url("/" + name)

    def start_docker(self) -> None:
        """Start dockerd (a sandbox unit) and the registry, and log in."""
        self.registry = harness.RegistryProcess(self.shared)
        self.registry.start()
        self.dockerd = harness.DockerDaemon(self.sandbox)
        self.dockerd.start()
        login = self.dockerd.docker(
            "login", "-u", self.registry.username, "--password-stdin",
            self.registry.address, input_text=self.registry.password)
        if login.returncode != 0:
            raise RuntimeError("docker login to the bench registry failed: %s"
                               % login.stderr)

    def new_images(self, count: int) -> tuple[str, list]:
        """Build and push count images of one repository; return (repo, tags).

        Each image serves its own text, so every deploy pulls a new layer;
        the local copies are removed so that the pulls reach the registry.
        """
        repository = "%s/crate-bench/web" % self.registry.address
        tags = []
        for _ in range(count):
            self._images += 1
            tag = "b%d" % self._images
            build_docker_image(self.dockerd, "%s:%s" % (repository, tag),
                               "bench image %s\n" % tag)
            self.dockerd.docker("push", "%s:%s" % (repository, tag))
            tags.append(tag)
        for tag in tags:
            self.dockerd.docker("rmi", "-f", "%s:%s" % (repository, tag))
        return repository, tags

    def docker_body(self, app_id: int, image: str, tag: str,
                    **changes) -> dict:
        """Return a docker slots-model deploy body with new ports."""
        body = {
            "app_id": app_id, "team_id": "bench", "environment_id": 1,
            "deployment_id": self.next_id(), "deployment_strategy": "immediate",
            "domain": "bench%d.example.test" % app_id, "image": image,
            "image_tag": tag, "target_version": tag,
            "slots": {"blue": {"port": harness.free_port()},
                      "green": {"port": harness.free_port()}},
            "env_vars": {}, "health_check_path": "/healthz",
            "registry_credentials": {"username": self.registry.username,
                                     "password": self.registry.password},
            "callback_url": self.callbacks.url("/cb/%d" % app_id),
        }
        body.update(changes)
        return body

    def new_busybox_asset(self) -> str:
        """Write a new build of the busybox httpd app and return its URL."""
        self._builds += 1
        name = "bb%d" % self._builds
        return self.assets.url("/" + write_busybox_asset(self.assets.root_dir, name))

    def slots_body(self, app_id: int, asset_url: str, **changes) -> dict:
        """Return a slots-model deploy body with new ports."""
        body = {
            "app_id": app_id, "team_id": "bench", "environment_id": 1,
            "deployment_id": self.next_id(), "deployment_strategy": "immediate",
            "domain": "bench%d.example.test" % app_id, "asset_url": asset_url,
            "target_version": "v1",
            "slots": {"blue": {"port": harness.free_port()},
                      "green": {"port": harness.free_port()}},
            "env_vars": {}, "health_check_path": "/healthz",
            "callback_url": self.callbacks.url("/cb/%d" % app_id),
        }
        body.update(changes)
        return body

    def instances_body(self, app_id: int, asset_url: str, ids: list,
                       **changes) -> dict:
        """Return an instances-model deploy body with new ports."""
        body = {
            "app_id": app_id, "team_id": "bench", "environment_id": 1,
            "deployment_id": self.next_id(), "deployment_strategy": "immediate",
            "domain": "bench%d.example.test" % app_id, "asset_url": asset_url,
            "instances": {i: {"port": harness.free_port()} for i in ids},
            "env_vars": {}, "health_check_path": "/healthz",
            "callback_url": self.callbacks.url("/cb/%d" % app_id),
        }
        body.update(changes)
        return body

    def update(self, body: dict, asset_url: str, **changes) -> dict:
        """Return body as the next deployment of the same app."""
        new = dict(body, deployment_id=self.next_id(), asset_url=asset_url,
                   target_version="v%d" % self._builds)
        new.update(changes)
        if "instances" in new:
            new.pop("target_version")
        return new


# A FROM-scratch busybox httpd on $PORT with a /healthz file, as in
# tests/test_docker.py. STOPSIGNAL SIGKILL because httpd as PID 1 ignores
# SIGTERM.
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY www /www
STOPSIGNAL SIGKILL
CMD ["/bin/busybox", "sh", "-c", \
"exec /bin/busybox httpd -f -p \\"$PORT\\" -h /www"]
"""


def build_docker_image(dockerd: harness.DockerDaemon, tag: str,
                       text: str) -> None:
    """Build an image whose busybox httpd serves text at / and ok at /healthz."""
    context = os.path.join(dockerd.dir, "bench-build")
    os.makedirs(os.path.join(context, "www"))
    try:
        shutil.copy("/bin/busybox", os.path.join(context, "busybox"))
        for name, content in (("index.html", text), ("healthz", "ok\n")):
            with open(os.path.join(context, "www", name), "w",
                      encoding="utf-8") as handle:
                handle.write(content)
        with open(os.path.join(context, "Dockerfile"), "w",
                  encoding="utf-8") as handle:
            handle.write(DOCKERFILE)
        dockerd.docker("build", "-q", "-t", tag, context)
    finally:
        shutil.rmtree(context, ignore_errors=True)


def post(operator: harness.OperatorProcess, path: str, body: dict) -> None:
    """POST a deploy body and raise unless the operator accepted it."""
    status, _, answer = operator.request("POST", path, body)
    if status != 202:
        raise RuntimeError("POST %s returned %d: %r" % (path, status, answer))


def deploy(operator: harness.OperatorProcess, path: str, body: dict,
           expect: str = "succeeded") -> tuple[float, dict]:
    """Deploy body and return (seconds from POST to the terminal state, document).

    The end time is the record's finished_at (millisecond precision), so
    the status polling interval does not add to the result.
    """
    kind = "legacy" if path == INSTANCES else "instance"
    started = time.time()
    post(operator, path, body)
    doc = operator.wait_state(body["deployment_id"], TERMINAL, timeout=120,
                              path_kind=kind)
    if doc["state"] != expect:
        raise RuntimeError("deployment %s ended %s, not %s: %s"
                           % (body["deployment_id"], doc["state"], expect,
                              doc.get("error")))
    return parse_time(doc["finished_at"]) - started, doc


def parse_time(text: str) -> float:
    """Return the epoch seconds of an RFC 3339 UTC timestamp ending in Z."""
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def median_ms(values: list) -> float:
    """Return the median of seconds values in milliseconds."""
    return statistics.median(values) * 1000.0


# === Deploy overhead ===

def bench_deploy_overhead(env: Environment, rows: list) -> None:
    """Compare update deploys per strategy with the straight-line floor.

    Floor and operator deploys alternate, so that load from other processes
    on the host falls on both alike.
    """
    floor = FloorDeployer(env.shared, env.sandbox, env.caddy,
                          "floor.example.test")
    ports = {"blue": harness.free_port(), "green": harness.free_port()}
    floor.deploy(env.new_asset("f"), "blue", ports["blue"])
    floor_slot = "blue"
    strategies = (
        ("immediate", {}),
        ("bluegreen", {"deployment_strategy": "bluegreen"}),
        ("canary", {"deployment_strategy": "canary",
                    "canary": {"steps": [100], "pause_s": 0}}),
    )
    bodies = {}
    for name, _changes in strategies:
        bodies[name] = env.slots_body(env.next_id(), env.new_asset())
        deploy(env.operator, SLOTS, bodies[name])
    times: dict = {name: [] for name, _ in strategies}
    floor_times: dict = {"in place": [], "switch": []}
    docs = {}
    for _ in range(DEPLOY_REPEATS):
        floor_times["in place"].append(
            floor.deploy(env.new_asset("f"), floor_slot, ports[floor_slot]))
        floor_steps = {"in place": floor.steps}
        other = "green" if floor_slot == "blue" else "blue"
        floor_times["switch"].append(
            floor.deploy(env.new_asset("f"), other, ports[other], floor_slot))
        floor_steps["switch"] = floor.steps
        floor_slot = other
        for name, changes in strategies:
            bodies[name] = env.update(bodies[name], env.new_asset(), **changes)
            seconds, docs[name] = deploy(env.operator, SLOTS, bodies[name])
            times[name].append(seconds)
    floor.cleanup()
    for kind, steps in floor_steps.items():
        log("steps of the last binary floor deploy (%s): %s" % (
            kind, ", ".join("%s %d" % item for item in steps.items())))
    add_overhead_rows(rows, "binary", strategies, times, floor_times, docs)


def bench_docker_deploy_overhead(env: Environment, rows: list) -> None:
    """Compare docker update deploys per strategy with the docker floor.

    Every deploy pulls its own image tag with registry credentials, and
    floor and operator deploys alternate, as in the binary rows.
    """
    env.start_docker()
    strategies = (
        ("immediate", {}),
        ("bluegreen", {"deployment_strategy": "bluegreen"}),
        ("canary", {"deployment_strategy": "canary",
                    "canary": {"steps": [100], "pause_s": 0}}),
    )
    repository, tags = env.new_images(1 + len(strategies)
                                      + DEPLOY_REPEATS * (2 + len(strategies)))
    tags = iter(tags)
    floor = DockerFloorDeployer(env.dockerd, env.registry, env.caddy,
                                "floor-docker.example.test")
    ports = {"blue": harness.free_port(), "green": harness.free_port()}
    floor.deploy(repository, next(tags), "blue", ports["blue"])
    floor_slot = "blue"
    bodies = {}
    for name, _changes in strategies:
        bodies[name] = env.docker_body(env.next_id(), repository, next(tags))
        deploy(env.operator, DOCKER_SLOTS, bodies[name])
    times: dict = {name: [] for name, _ in strategies}
    floor_times: dict = {"in place": [], "switch": []}
    docs = {}
    for _ in range(DEPLOY_REPEATS):
        floor_times["in place"].append(floor.deploy(
            repository, next(tags), floor_slot, ports[floor_slot]))
        other = "green" if floor_slot == "blue" else "blue"
        floor_times["switch"].append(floor.deploy(
            repository, next(tags), other, ports[other], floor_slot))
        floor_slot = other
        for name, changes in strategies:
            tag = next(tags)
            bodies[name] = dict(bodies[name], deployment_id=env.next_id(),
                                image_tag=tag, target_version=tag, **changes)
            seconds, docs[name] = deploy(env.operator, DOCKER_SLOTS,
                                         bodies[name])
            times[name].append(seconds)
    floor.cleanup()
    add_overhead_rows(rows, "docker", strategies, times, floor_times, docs)


def add_overhead_rows(rows: list, kind: str, strategies: tuple, times: dict,
                      floor_times: dict, docs: dict) -> None:
    """Append one deploy overhead row per strategy and log the step times."""
    note = "median of %d%s" % (DEPLOY_REPEATS, ", quick mode" if QUICK else "")
    for name, _changes in strategies:
        floor_kind = "in place" if name == "immediate" else "switch"
        ratio = statistics.median(times[name]) / \
            statistics.median(floor_times[floor_kind])
        log("deploy %s %s: %s vs floor %s" % (kind, name, times[name],
                                               floor_times[floor_kind]))
        log("steps of the last %s %s deploy: %s"
            % (kind, name, step_durations(docs[name])))
        low, high = resampled_ratios(times[name], floor_times[floor_kind])
        rows.append(("Deploy overhead", "%s %s update, POST to succeeded"
                     % (kind, name),
                     "%.0f ms vs floor (%s) %.0f ms: ratio %.2f (%s; "
                     "rounds resampled: 90 %% of ratios %.2f to %.2f)"
                     % (median_ms(times[name]), floor_kind,
                        median_ms(floor_times[floor_kind]), ratio, note,
                        low, high),
                     "ratio <= 1.15", verdict(ratio <= 1.15)))


def resampled_ratios(times: list, floor_times: list,
                     count: int = 2000) -> tuple:
    """Return the 5th and 95th percentile of the median ratio over rounds
    drawn again with replacement (a paired bootstrap).

    Round i contains one operator deploy and the floor deploy beside it, so
    a round is drawn as a pair. The range shows how far the ratio of one
    run of this many rounds moves on this machine; the verdict stays on
    the ratio measured.
    """
    pick = random.Random(0)
    rounds = len(times)
    ratios = []
    for _ in range(count):
        drawn = [pick.randrange(rounds) for _ in range(rounds)]
        ratios.append(statistics.median(times[i] for i in drawn)
                      / statistics.median(floor_times[i] for i in drawn))
    ratios.sort()
    return ratios[count // 20], ratios[count - 1 - count // 20]


def step_durations(doc: dict) -> str:
    """Return each step's name and milliseconds since the previous step ended."""
    previous = parse_time(doc["created_at"])
    parts = []
    for step in doc["steps"]:
        end = parse_time(step["at"])
        parts.append("%s %.0f" % (step["name"], (end - previous) * 1000.0))
        previous = end
    return ", ".join(parts)


def verdict(met: bool) -> str:
    """Return the table word for a met or missed target."""
    return "met" if met else "missed"


# === Zero downtime ===

class WrkLoad:
    """wrk with concurrent keep-alive connections, stopped with SIGINT."""

    def __init__(self, url: str, host: str, connections: int = 8) -> None:
        self.argv = ["wrk", "-t", "2", "-c", str(connections), "-d", "600s",
                     "--timeout", "5s", "-H", "Host: " + host, url]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start wrk in its own session."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def stop(self) -> dict:
        """Stop wrk and return its counts parsed from the summary."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        output, _ = self.proc.communicate(timeout=30)
        return parse_wrk(output)


def parse_wrk(output: str) -> dict:
    """Return requests, rate, p99 and error counts from wrk's summary text."""
    result = {"requests": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0,
              "non2xx": 0, "rps": 0.0, "p99_ms": None, "text": output}
    match = re.search(r"(\d+) requests in", output)
    if match:
        result["requests"] = int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                      r"timeout (\d+)", output)
    if match:
        for key, value in zip(("connect", "read", "write", "timeout"),
                              match.groups()):
            result[key] = int(value)
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        result["non2xx"] = int(match.group(1))
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match:
        result["rps"] = float(match.group(1))
    match = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", output)
    if match:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        result["p99_ms"] = float(match.group(1)) * scale
    return result


def run_under_load(env: Environment, domain: str, action) -> tuple[dict, dict]:
    """Run action() while RequestLoop and wrk send GETs to domain through Caddy."""
    url = "http://127.0.0.1:%d/" % env.caddy.listen_port
    loop = harness.RequestLoop(url, domain)
    wrk = WrkLoad(url, domain)
    loop.start()
    wrk.start()
    loop.wait_requests(50, timeout=30)
    action()
    loop.wait_requests(ZERO_DOWNTIME_REQUESTS, timeout=600)
    wrk_counts = wrk.stop()
    return loop.stop(), wrk_counts


def bench_zero_downtime(env: Environment, rows: list, causes: list) -> None:
    """Count failed requests during five traffic changes."""
    op = env.operator
    scenarios = []

    def bluegreen():
        body = env.slots_body(env.next_id(), env.new_asset())
        deploy(op, SLOTS, body)
        update = env.update(body, env.new_asset(),
                            deployment_strategy="bluegreen")
        return body["domain"], lambda: deploy(op, SLOTS, update)
    scenarios.append(("bluegreen deploy", bluegreen))

    def rolling():
        body = env.instances_body(env.next_id(), env.new_asset(), ["a", "b", "c"])
        deploy(op, INSTANCES, body)
        update = env.update(body, env.new_asset())
        return body["domain"], lambda: deploy(op, INSTANCES, update)
    scenarios.append(("rolling update, 3 instances", rolling))

    def canary():
        body = env.slots_body(env.next_id(), env.new_asset())
        deploy(op, SLOTS, body)
        update = env.update(body, env.new_asset(), deployment_strategy="canary",
                            canary={"steps": [10, 50, 100], "pause_s": 1})
        return body["domain"], lambda: deploy(op, SLOTS, update)
    scenarios.append(("canary promotion 10/50/100", canary))

    def rollback():
        flag = os.path.join(env.assets.root_dir, "health-%d" % env._builds)
        with open(flag, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.chmod(flag, 0o644)
        body = env.slots_body(env.next_id(), env.new_asset())
        deploy(op, SLOTS, body)
        update = env.update(body, env.new_asset(), deployment_strategy="canary",
                            env_vars={"SAMPLE_HEALTH_FILE": flag},
                            canary={"steps": [25, 100], "pause_s": 30})

        def action():
            post(op, SLOTS, update)
            wait_canary_step(op, update["deployment_id"], 25)
            time.sleep(1.0)
            with open(flag, "w", encoding="utf-8") as handle:
                handle.write("fail")
            doc = op.wait_state(update["deployment_id"], TERMINAL, timeout=120)
            if doc["state"] != "rolled_back":
                raise RuntimeError("rollback scenario ended %s" % doc["state"])
        return body["domain"], action
    scenarios.append(("canary rollback at 25%", rollback))

    def stop_sibling():
        body = env.instances_body(env.next_id(), env.new_asset(), ["w1", "w2"])
        deploy(op, INSTANCES, body)
        request = {"app_id": body["app_id"], "team_id": body["team_id"],
                   "environment_id": body["environment_id"],
                   "callback_url": body["callback_url"],
                   "domain": body["domain"], "instance_id": "w1"}

        def action():
            status, _, answer = op.request("POST", "/v1/app/stop", request)
            if status != 202:
                raise RuntimeError("stop returned %d: %r" % (status, answer))
            doc = op.wait_state(answer["deployment_id"], TERMINAL, timeout=60,
                                path_kind="legacy")
            if doc["state"] != "succeeded":
                raise RuntimeError("stop ended %s" % doc["state"])
        return body["domain"], action
    scenarios.append(("stop of an instance with a sibling", stop_sibling))

    def caddy_only():
        body = env.slots_body(env.next_id(), env.new_asset())
        deploy(op, SLOTS, body)
        return body["domain"], lambda: change_foreign_route(env.caddy)
    scenarios.append(("control: 5 Caddy config changes of another route, "
                      "no operator call", caddy_only))

    for name, setup in scenarios:
        domain, action = setup()
        loop, wrk = run_under_load(env, domain, action)
        log("zero downtime %s: loop %d/%d failed, wrk %s"
            % (name, loop["failed"], loop["total"],
               {k: v for k, v in wrk.items() if k != "text"}))
        wrk_errors = wrk["connect"] + wrk["read"] + wrk["write"] + wrk["timeout"] \
            + wrk["non2xx"]
        rows.append(("Zero downtime", name,
                     "RequestLoop %d failed of %d (%d retried); wrk %d errors of %d "
                     "(connect %d, read %d, write %d, timeout %d, non-2xx %d)"
                     % (loop["failed"], loop["total"], loop["retries"], wrk_errors,
                        wrk["requests"], wrk["connect"], wrk["read"], wrk["write"],
                        wrk["timeout"], wrk["non2xx"]),
                     "0 failed (RequestLoop)", verdict(loop["failed"] == 0)))
        if loop["failed"]:
            causes.append("%s: %s" % (name, "; ".join(loop["failures"][:3])))
        if wrk_errors:
            causes.append("%s: %d wrk errors, compare the control row, where "
                          "only Caddy's config changes" % (name, wrk_errors))


def change_foreign_route(caddy: harness.CaddyProcess) -> None:
    """Add, change three times and delete a route of an unrelated domain."""
    route = {"@id": "bench-control-route",
             "match": [{"host": ["control.example.test"]}],
             "handle": [{"handler": "static_response", "body": "0"}]}
    caddy.request("PUT", "/config/apps/http/servers/crate/routes/0", route)
    for index in range(1, 4):
        time.sleep(0.3)
        route["handle"][0]["body"] = str(index)
        caddy.request("PATCH", "/id/bench-control-route", route)
    time.sleep(0.3)
    caddy.request("DELETE", "/id/bench-control-route")


def wait_canary_step(op: harness.OperatorProcess, deployment_id: int,
                     percent: int, timeout: float = 60) -> None:
    """Wait until the deployment's log shows a done canary_step at percent."""
    path = op.status_path(deployment_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, doc = op.request("GET", path)
        steps = [s for s in doc["steps"] if s["name"] == "canary_step"
                 and s["state"] == "done"]
        if steps and steps[-1]["message"].startswith("%d%%" % percent):
            return
        time.sleep(0.05)
    raise TimeoutError("no %d%% canary step within %.0f s" % (percent, timeout))


# === API throughput ===

def bench_api(env: Environment, rows: list) -> None:
    """Compare GET status with wrk at 32 connections against a bare server.

    Both servers run API_ROUNDS rounds of API_SECONDS each, in turns, so
    that load from other processes falls on both. Throughput is the total
    over all rounds, p99 the median of the rounds. The CPU time of each
    server process per request is shown too, because on 2 shared CPUs the
    throughput also depends on wrk and on other load.
    """
    op = env.operator
    body = env.slots_body(env.next_id(), env.new_asset())
    deploy(op, SLOTS, body)
    path = op.status_path(body["deployment_id"])
    _, _, doc = op.request("GET", path)
    body_file = os.path.join(env.shared, "bench-status.json")
    with open(body_file, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
    bare = subprocess.Popen([harness.SYSTEM_PYTHON, "-I",
                             os.path.join(BENCH_DIR, "bare_server.py"), body_file],
                            stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    op_rounds, bare_rounds = [], []
    cpu = {"op": 0.0, "bare": 0.0}
    try:
        bare_port = int(bare.stdout.readline())
        for _ in range(API_ROUNDS):
            before = cpu_seconds(bare.pid)
            bare_rounds.append(run_wrk("http://127.0.0.1:%d%s"
                                       % (bare_port, path), []))
            cpu["bare"] += cpu_seconds(bare.pid) - before
            before = cpu_seconds(op.proc.pid)
            op_rounds.append(run_wrk(op.base_url + path,
                                     ["-H", "Authorization: Bearer " + op.token]))
            cpu["op"] += cpu_seconds(op.proc.pid) - before
    finally:
        bare.terminate()
        bare.wait(10)
    op_result, bare_result = combine_wrk(op_rounds), combine_wrk(bare_rounds)
    ratio = op_result["rps"] / bare_result["rps"]
    spread = ", ".join("%.2f" % (o["rps"] / b["rps"])
                       for o, b in zip(op_rounds, bare_rounds))
    cpu_us = {name: cpu[name] * 1e6 / max(1, sum(r["requests"] for r in rounds))
              for name, rounds in (("op", op_rounds), ("bare", bare_rounds))}
    log("api: operator %s, bare %s" % (op_result["rps"], bare_result["rps"]))
    rows.append(("API", "GET status, wrk 32 connections, %d rounds of %d s "
                 "in turns" % (API_ROUNDS, API_SECONDS),
                 "%.0f req/s, p99 %.1f ms vs bare server %.0f req/s, p99 %.1f ms: "
                 "ratio %.2f (rounds %s; errors %d). Server CPU per request "
                 "%.0f vs %.0f us"
                 % (op_result["rps"], op_result["p99_ms"], bare_result["rps"],
                    bare_result["p99_ms"], ratio, spread,
                    op_result["errors"], cpu_us["op"], cpu_us["bare"]),
                 "ratio >= 0.8", verdict(ratio >= 0.8)))


def combine_wrk(results: list) -> dict:
    """Return total requests per second, median p99 and errors of wrk rounds."""
    # wrk's own rate gives each round's measured duration (about 5.02 s for
    # -d 5s), which is closer than API_SECONDS.
    seconds = sum(r["requests"] / r["rps"] for r in results if r["rps"])
    return {"rps": sum(r["requests"] for r in results) / seconds,
            "p99_ms": statistics.median(r["p99_ms"] or -1 for r in results),
            "errors": sum(r["non2xx"] + r["read"] + r["connect"]
                          for r in results)}


def bench_prune(env: Environment, rows: list) -> None:
    """Compare status latency of an operator while its history pruner runs.

    Two operators serve copies of the same records: one starts
    PRUNE_REPEATS times with PRUNE_RECORDS finished records and
    history_max_records 100, so its pruner removes most of them right after
    each start; the other keeps 100 records and stays at rest. One client
    reads the newest record's status from both in turn, in batches of
    PRUNE_READ_BATCH per operator over one kept-alive connection each,
    until the log shows history.pruned. Load from other processes on the
    machine therefore falls on both within milliseconds. After each pass
    the client reads as many batches again as a control, where both
    operators are at rest and the ratio shows the noise of the method.

    NOTE: the pruner's CPU time also slows the resting operator when the
    CPUs are busy, so the ratio shows what pruning costs requests inside
    its own process (mostly the GIL); the row reports that CPU time too.
    """
    template_dir = os.path.join(env.shared, "prune-template")
    ensure_finished_record(env)
    write_history(env, template_dir, PRUNE_RECORDS, spread=True)
    template_records = os.path.join(template_dir, "deployments")
    names = sorted(os.listdir(template_records))
    pruning = prune_operator(env, "benchprune")
    resting = prune_operator(env, "benchrest")
    link_records(template_records, names[-100:], resting.state_dir)
    resting.start()
    path = pruning.status_path(900000 + PRUNE_RECORDS - 1)
    rest_conn = operator_connection(resting)
    read_status_batch(rest_conn, resting, path)
    samples: dict = {"during": ([], []), "control": ([], [])}
    ratios: dict = {"during": [], "control": []}
    cpu_ms = []
    left = 0
    for repeat in range(PRUNE_REPEATS):
        link_records(template_records, names, pruning.state_dir)
        log_offset = os.path.getsize(pruning.log_path) \
            if os.path.exists(pruning.log_path) else 0
        pruning.start()
        prune_conn = operator_connection(pruning)
        phase: dict = {"during": ([], []), "control": ([], [])}
        cpu_start = (cpu_seconds(pruning.proc.pid), cpu_seconds(resting.proc.pid))
        batches = 0
        deadline = time.monotonic() + 120
        while not log_contains(pruning.log_path, log_offset,
                               "event=history.pruned"):
            if time.monotonic() > deadline:
                raise RuntimeError("no history.pruned in %s within 120 s; "
                                   "read its end for history.failed"
                                   % pruning.log_path)
            read_pair(phase["during"], batches, (prune_conn, pruning),
                      (rest_conn, resting), path)
            batches += 1
        cpu_ms.append(1000 * ((cpu_seconds(pruning.proc.pid) - cpu_start[0]) -
                              (cpu_seconds(resting.proc.pid) - cpu_start[1])))
        for index in range(batches):
            # The same calls as above, with a log check that never matches.
            log_contains(pruning.log_path, log_offset, "event=never.logged")
            read_pair(phase["control"], index, (prune_conn, pruning),
                      (rest_conn, resting), path)
        prune_conn.close()
        pruning.stop()
        left = len(os.listdir(os.path.join(pruning.state_dir, "deployments")))
        for name, (busy, idle) in phase.items():
            ratios[name].append(percentile(busy, 0.99) / percentile(idle, 0.99))
            samples[name][0].extend(busy)
            samples[name][1].extend(idle)
        log("prune run %d: %d reads per operator and phase, p99 ratio %.2f "
            "during, %.2f control; pruner CPU %.0f ms; %d records left"
            % (repeat + 1, len(phase["during"][0]), ratios["during"][-1],
               ratios["control"][-1], cpu_ms[-1], left))
    rest_conn.close()
    resting.stop()
    busy, idle = samples["during"]
    ratio = percentile(busy, 0.99) / percentile(idle, 0.99)
    control = percentile(samples["control"][0], 0.99) / \
        percentile(samples["control"][1], 0.99)
    rows.append(("API", "GET status p99 while pruning %d of %d records"
                 % (PRUNE_RECORDS - 100, PRUNE_RECORDS),
                 "%.2f ms vs %.2f ms at rest, read in turn (%d reads each, %d "
                 "runs): ratio %.2f, per run %.2f to %.2f; control after "
                 "pruning %.2f (%.2f to %.2f); pruner CPU %.0f ms per pass "
                 "(median); %d records left"
                 % (percentile(busy, 0.99), percentile(idle, 0.99), len(busy),
                    PRUNE_REPEATS, ratio, min(ratios["during"]),
                    max(ratios["during"]), control, min(ratios["control"]),
                    max(ratios["control"]), statistics.median(cpu_ms), left),
                 "ratio <= 1.5 (noise margin)", verdict(ratio <= 1.5)))


def prune_operator(env: Environment, server: str) -> harness.OperatorProcess:
    """Return a stopped operator for the pruning row, with history_max_records 100."""
    process = harness.OperatorProcess(env.shared, env.sandbox, env.caddy, {
        "caddy_server": server,
        "caddy_listen": ["127.0.0.1:%d" % harness.free_port()],
        "unit_dir": os.path.join(env.shared, "units-" + server),
        "apps_dir": os.path.join(env.shared, "apps-" + server),
        "history_max_records": 100,
        "history_prune_interval_s": 3600,
    })
    env.extra.append(process)
    os.makedirs(process.config["unit_dir"], exist_ok=True)
    return process


def link_records(source: str, names: list, state_dir: str) -> None:
    """Replace the deployment records in state_dir with hard links to names.

    Links are fast and share the source files' metadata, so every run
    starts from the same records without writing them again.
    """
    records_dir = os.path.join(state_dir, "deployments")
    os.makedirs(records_dir, mode=0o700, exist_ok=True)
    for name in os.listdir(records_dir):
        os.unlink(os.path.join(records_dir, name))
    for name in names:
        os.link(os.path.join(source, name), os.path.join(records_dir, name))


def operator_connection(process: harness.OperatorProcess) -> http.client.HTTPConnection:
    """Open a kept-alive HTTP connection to process's API."""
    host, _, port = process.config["listen"].rpartition(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def read_pair(phase: tuple, index: int, first: tuple, second: tuple,
              path: str) -> None:
    """Read one batch from each operator; the first goes first in even batches.

    first and second are (connection, process); the latencies are added to
    phase[0] and phase[1].
    """
    order = [(0, first), (1, second)]
    if index % 2:
        order.reverse()
    for slot, (conn, process) in order:
        phase[slot].extend(read_status_batch(conn, process, path))


def read_status_batch(conn: http.client.HTTPConnection,
                      process: harness.OperatorProcess, path: str) -> list:
    """Read path PRUNE_READ_BATCH times on conn; return each latency in ms."""
    headers = {"Authorization": "Bearer " + process.token}
    latencies = []
    for _ in range(PRUNE_READ_BATCH):
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            raise RuntimeError("status read %s returned %d during the pruning "
                               "benchmark" % (path, response.status))
    return latencies


def log_contains(log_path: str, offset: int, text: str) -> bool:
    """Return whether the log after byte offset contains text."""
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        return text.encode() in handle.read()


def percentile(values: list, fraction: float) -> float:
    """Return the value at fraction (0.99 for p99) of the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def ensure_finished_record(env: Environment) -> None:
    """Deploy one app when the main operator has no succeeded record yet.

    write_history copies such a record; without it the section could not
    run alone (BENCH_SECTIONS=prune).
    """
    import crate_operator
    store = crate_operator.Store(env.operator.state_dir)
    if any(r.get("state") == "succeeded" for r in store.iter_deployments()):
        return
    body = env.slots_body(env.next_id(), env.new_asset())
    deploy(env.operator, SLOTS, body)


def run_wrk(url: str, extra: list) -> dict:
    """Run wrk for API_SECONDS at 32 connections and return parse_wrk()."""
    argv = ["wrk", "-t", "2", "-c", "32", "-d", "%ds" % API_SECONDS,
            "--latency"] + extra + [url]
    output = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            check=True).stdout
    return parse_wrk(output)


# === Scale ===

def cpu_seconds(pid: int) -> float:
    """Return user plus system CPU seconds of a process from /proc."""
    with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(op: harness.OperatorProcess, action, markers: list) -> dict:
    """Run action() and return total, systemctl, Caddy, fsync, own and CPU
    seconds.

    The systemctl, Caddy and fsync times are the waits that the operator
    logs per HTTP request and per deployment (systemctl_ms, caddy_ms,
    storage_ms). They are summed over the log lines of this action: the
    lines that action() added and that contain each word of one of
    ``markers``. So the reconciler's or another thread's calls that
    overlap the action are not subtracted from its own time.
    """
    offset = os.path.getsize(op.log_path)
    total = action()
    waits = logged_waits(op, offset, markers)
    return {"total": total, "systemctl": waits["systemctl"],
            "caddy": waits["caddy"], "fsync": waits["storage"],
            "own": total - waits["systemctl"] - waits["caddy"]
            - waits["storage"], "cpu": waits["cpu"]}


def logged_waits(op: harness.OperatorProcess, offset: int, markers: list,
                 timeout: float = 10.0) -> dict:
    """Sum systemctl_ms, caddy_ms, storage_ms and cpu_ms, in seconds, of
    the log lines after offset that match a marker (a list of words).

    Waits until each marker has a line, because a deployment is logged
    just after its record is saved.
    """
    deadline = time.monotonic() + timeout
    while True:
        with open(op.log_path, encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            lines = handle.read().splitlines()
        found = [[line for line in lines
                  if all(word in line.split() for word in marker)]
                 for marker in markers]
        if all(len(matches) == 1 for matches in found):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("expected one operator log line per marker "
                               "%r, found %r" % (markers, found))
        time.sleep(0.02)
    sums = {"systemctl": 0.0, "caddy": 0.0, "storage": 0.0, "cpu": 0.0}
    for (line,) in found:
        fields = dict(word.split("=", 1) for word in line.split()
                      if "=" in word)
        for key in sums:
            sums[key] += float(fields[key + "_ms"]) / 1000.0
    return sums


def populate(env: Environment, count: int) -> None:
    """Create apps with one instance each until the operator has count apps."""
    op = env.operator
    existing = len(os.listdir(os.path.join(op.state_dir, "apps")))
    pending: list[dict] = []
    for _ in range(max(0, count - existing)):
        body = env.slots_body(env.next_id(), env.assets.url("/scale-app.tar.gz"))
        post(op, SLOTS, body)
        pending.append(body)
        if len(pending) >= 8:
            wait_all(op, pending)
            pending = []
    wait_all(op, pending)


def wait_all(op: harness.OperatorProcess, bodies: list) -> None:
    """Wait for every body's deployment to succeed."""
    for body in bodies:
        doc = op.wait_state(body["deployment_id"], TERMINAL, timeout=300)
        if doc["state"] != "succeeded":
            raise RuntimeError("populating deploy ended %s: %s"
                               % (doc["state"], doc.get("error")))


class ScaleWorld:
    """One app count of the scale section: a sandboxed systemd, a Caddy
    and an operator of its own, with count apps, and the app whose
    deploys and route changes are measured."""

    def __init__(self, count: int, first_id: int) -> None:
        self.count = count
        self.env = Environment(first_id)
        self.probe: dict = {}
        self.deploys: list = []
        self.routes: list = []
        self.changes = 0

    def start(self) -> None:
        """Start the world and deploy its count apps, the probe included."""
        env = self.env
        env.start()
        write_busybox_asset(env.assets.root_dir, "scale-app")
        populate(env, self.count - 1)
        self.probe = env.slots_body(env.next_id(), env.new_busybox_asset())
        deploy(env.operator, SLOTS, self.probe)

    def apps(self) -> int:
        """Return the number of app records of the world's operator."""
        return len(os.listdir(os.path.join(self.env.operator.state_dir, "apps")))

    def measure_round(self) -> None:
        """Measure one update deploy of the probe and SCALE_ROUTE_CHANGES
        domain changes."""
        env, op = self.env, self.env.operator
        body = env.update(self.probe, env.new_busybox_asset())
        time.sleep(SCALE_SETTLE_S)
        ids = "deployment_id=%d" % body["deployment_id"]
        docs: list = []
        self.deploys.append(measured(op, functools.partial(
            deploy_seconds, op, body, docs),
            [["event=http.request", ids],
             ["event=deployment.succeeded", ids]]))
        self.deploys[-1]["health"] = health_wait_seconds(docs[-1])
        self.probe = body
        for _ in range(SCALE_ROUTE_CHANGES):
            time.sleep(SCALE_SETTLE_S)
            self.changes += 1
            old = self.probe["domain"]
            new = "moved%d-%d.example.test" % (body["app_id"], self.changes)
            self.routes.append(measured(op, functools.partial(
                domain_update, op, self.probe, old, new),
                [["event=http.request", "path=/v1/app/domain/update"]]))
            self.probe = dict(self.probe, domain=new)


def bench_scale(rows: list) -> None:
    """Measure the operator's own time per deploy and route change as apps grow.

    Each app count gets a world of its own (ScaleWorld), and all of them
    run at once. The measured deploys and route changes take turns between
    the worlds, round by round, so the machine's changing speed falls on
    every count alike.
    """
    if shutil.which("busybox") is None:
        raise RuntimeError("the scale section runs its apps with busybox httpd, and "
                           "busybox is not installed: install the Debian package "
                           "busybox, or leave out scale in BENCH_SECTIONS")
    worlds = [ScaleWorld(count, 2000000 + n * 100000)
              for n, count in enumerate(SCALE_POINTS)]
    try:
        for world in worlds:
            world.start()
            log("scale: %d apps ready" % world.apps())
        for index in range(SCALE_REPEATS):
            for world in (worlds if index % 2 == 0 else worlds[::-1]):
                world.measure_round()
        scale_rows(rows, worlds)
    finally:
        for world in worlds:
            world.env.stop()


def scale_rows(rows: list, worlds: list) -> None:
    """Add the rows of each app count and the growth from first to last."""
    own = {}
    for world in worlds:
        deploy_row = dict(summarize(world.deploys), samples=len(world.deploys))
        route_row = dict(summarize(world.routes), samples=len(world.routes))
        own[world.count] = (deploy_row["own"], route_row["own"],
                            deploy_row["own"] + deploy_row["fsync"],
                            route_row["own"] + route_row["fsync"],
                            deploy_row["cpu"], route_row["cpu"])
        log("scale %d: deploy %s route %s" % (world.apps(), deploy_row,
                                               route_row))
        for label, row in (("deploy", deploy_row), ("route change", route_row)):
            text = ("total %.1f ms = systemctl %.1f + Caddy %.1f + fsync %.1f "
                    "+ own %.1f ms (medians of %d; CPU time of the job and "
                    "request threads %.1f ms"
                    % (row["total"], row["systemctl"], row["caddy"],
                       row["fsync"], row["own"], row["samples"], row["cpu"]))
            if "health" in row:
                # Own time includes this wait, in which the new process
                # starts and the operator probes it every 20 ms.
                text += "; own includes %.0f ms of health check wait" % row["health"]
            rows.append(("Scale", "%d apps: %s" % (world.apps(), label),
                         text + ")", "", ""))
    first, last = SCALE_POINTS[0], SCALE_POINTS[-1]
    for index, label in ((0, "deploy"), (1, "route change")):
        growth = own[last][index] / own[first][index]
        with_fsync = own[last][index + 2] / own[first][index + 2]
        cpu_growth = own[last][index + 4] / max(own[first][index + 4], 0.1)
        rows.append(("Scale", "own time %s, %d vs %d apps" % (label, last, first),
                     "%.2f times (%.2f with the fsync waits counted as own; "
                     "thread CPU %.2f times)" % (growth, with_fsync, cpu_growth),
                     "<= 1.3", verdict(growth <= 1.3)))


def write_busybox_asset(root_dir: str, name: str) -> str:
    """Write name.tar.gz, a release that serves /healthz with busybox httpd.

    One busybox httpd process had 1.5 MB resident against about 19 MB for
    the Python sample app (VmRSS on the benchmark VM), so 500 apps fit, and
    it starts without an interpreter. Returns the file name.
    """
    file_name = name + ".tar.gz"
    files = {
        "Procfile": "web: busybox httpd -f -p 127.0.0.1:$PORT -h www\n",
        "www/healthz": "ok\n",
        # Distinct content gives each build its own digest.
        "www/index.html": name + "\n",
    }
    with tarfile.open(os.path.join(root_dir, file_name), "w:gz") as archive:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return file_name


def deploy_seconds(op: harness.OperatorProcess, body: dict, docs: list) -> float:
    """Deploy a slots-model body and return the seconds from POST to success.

    The final status document is appended to docs.
    """
    seconds, doc = deploy(op, SLOTS, body)
    docs.append(doc)
    return seconds


def health_wait_seconds(doc: dict) -> float:
    """Return the seconds between the start_instance and health_check steps."""
    ends = {step["name"]: parse_time(step["at"]) for step in doc["steps"]}
    return ends["health_check"] - ends["start_instance"]


def domain_update(op: harness.OperatorProcess, body: dict, old: str,
                  new: str) -> float:
    """Move body's app from domain old to new and return the seconds it took."""
    request = {"app_id": body["app_id"], "team_id": body["team_id"],
               "environment_id": body["environment_id"], "old_domain": old,
               "new_domain": new, "server_id": "test-host"}
    started = time.monotonic()
    status, _, answer = op.request("POST", "/v1/app/domain/update", request)
    elapsed = time.monotonic() - started
    if status != 200:
        raise RuntimeError("domain update returned %d: %r" % (status, answer))
    return elapsed


def summarize(samples: list) -> dict:
    """Return the median of each key of samples, in milliseconds."""
    return {key: statistics.median(s[key] for s in samples) * 1000.0
            for key in samples[0]}


# === Footprint ===

def bench_footprint(env: Environment, rows: list) -> None:
    """Measure startup time and resident memory, idle and with 1,000 records.

    The operator starts the way the installed service starts it: a launcher
    imports crate_operator from a directory whose bytecode was compiled
    beforehand (render_launcher and the package's postinst). For comparison
    the same measurement runs with the file started as a script, which
    Python compiles at every start. The two take turns.
    """
    launcher = installed_launcher(env)
    config = {
        "caddy_server": "benchfoot",
        "caddy_listen": ["127.0.0.1:%d" % harness.free_port()],
        "unit_dir": os.path.join(env.shared, "units-footprint"),
        "apps_dir": os.path.join(env.shared, "apps-footprint"),
    }
    os.makedirs(config["unit_dir"], exist_ok=True)
    processes = {}
    for name, script in (("service", launcher),
                         ("script", harness.OPERATOR_SCRIPT)):
        processes[name] = harness.OperatorProcess(
            env.shared, env.sandbox, env.caddy, config, script=script)
        env.extra.append(processes[name])
    idle = measure_starts(processes)
    for process in processes.values():
        write_history(env, process.state_dir, HISTORY_RECORDS)
    full = measure_starts(processes)
    started_as = "launcher importing compiled module, as the installed service"
    rows.append(("Footprint", "VmRSS idle", "%.1f MB (%s); %.1f MB as a script"
                 % (idle["service"][1], started_as, idle["script"][1]), "", ""))
    rows.append(("Footprint", "VmRSS with %d finished deployment records"
                 % HISTORY_RECORDS, "%.1f MB (%s); %.1f MB as a script"
                 % (full["service"][1], started_as, full["script"][1]),
                 "<= 40 MB", verdict(full["service"][1] <= 40)))
    rows.append(("Footprint", "process start to first GET /healthz answer",
                 "%.0f ms idle, %.0f ms with %d records (median of 5, %s); "
                 "%.0f and %.0f ms as a script"
                 % (idle["service"][0], full["service"][0], HISTORY_RECORDS,
                    started_as, idle["script"][0], full["script"][0]),
                 "<= 200 ms",
                 verdict(max(idle["service"][0], full["service"][0]) <= 200)))


def installed_launcher(env: Environment) -> str:
    """Lay out crate_operator.py like an installation; return the launcher.

    The module is copied to <shared>/footprint-lib and compiled with the
    system python, and the launcher is the one the package installs, with
    that directory in it.
    """
    import crate_operator
    lib_dir = os.path.join(env.shared, "footprint-lib")
    os.makedirs(lib_dir, exist_ok=True)
    module = os.path.join(lib_dir, "crate_operator.py")
    with open(harness.OPERATOR_SCRIPT, "rb") as source, \
            open(module, "wb") as target:
        target.write(source.read())
    subprocess.run([harness.SYSTEM_PYTHON, "-I", "-m", "py_compile", module],
                   check=True)
    launcher = os.path.join(lib_dir, "crate-operator")
    with open(launcher, "w", encoding="utf-8") as handle:
        handle.write(crate_operator.render_launcher(lib_dir))
    return launcher


def measure_starts(processes: dict) -> dict:
    """Start each operator 5 times, in turns, and measure start-up and memory.

    Returns name -> (median ms from process start to the first /healthz
    response, VmRSS in MB 2 s after that response in a sixth start).
    """
    times = {name: [] for name in processes}
    for _ in range(5):
        for name, process in processes.items():
            times[name].append(start_once(process))
            process.stop()
    result = {}
    for name, process in processes.items():
        start_once(process)
        process.request("GET", "/healthz")
        time.sleep(2.0)
        result[name] = (statistics.median(times[name]),
                        vm_rss_mb(process.proc.pid))
        process.stop()
    return result


def start_once(process: harness.OperatorProcess) -> float:
    """Start the operator; return the ms until /healthz got a response."""
    started = time.monotonic()
    process.proc = subprocess.Popen(
        process.argv(), cwd=process.shared_dir, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    while True:
        try:
            process.request("GET", "/healthz", timeout=1)
            break
        except (OSError, http.client.HTTPException):
            if process.proc.poll() is not None:
                raise RuntimeError("the footprint operator exited with %s"
                                   % process.proc.returncode)
            time.sleep(0.001)
    return (time.monotonic() - started) * 1000.0


def vm_rss_mb(pid: int) -> float:
    """Return VmRSS of a process in MB (1,000,000 bytes)."""
    with open("/proc/%d/status" % pid, encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmRSS in /proc/%d/status" % pid)


def write_history(env: Environment, state_dir: str, count: int,
                  spread: bool = False) -> None:
    """Write count finished deployment records, copies of a real one, to state_dir.

    With spread, each copy gets a created_at one second after the previous
    one, so that history pruning has a well-defined newest record.

    NOTE: the copies come from one finished record of the main operator with
    new ids, because 1,000 real deploys take too long for a benchmark run.
    """
    import crate_operator
    source = crate_operator.Store(env.operator.state_dir)
    template = next(r for r in source.deployments()
                    if r.get("state") == "succeeded")
    target = crate_operator.Store(state_dir)
    for index in range(count):
        record = json.loads(json.dumps(template))
        record["deployment_id"] = 900000 + index
        if spread:
            moment = time.time() - count + index
            record["created_at"] = crate_operator.utc_now(moment)
            record["finished_at"] = record["created_at"]
        target.save_deployment(record)


# === Report ===

def machine_line() -> str:
    """Return nproc, memory, kernel, Python and Caddy versions of this host."""
    with open("/proc/meminfo", encoding="ascii") as handle:
        total_kb = int(handle.readline().split()[1])
    python = subprocess.run([harness.SYSTEM_PYTHON, "--version"],
                            capture_output=True, text=True).stdout.strip()
    caddy = subprocess.run(["caddy", "version"], capture_output=True,
                           text=True).stdout.split(" ")[0].strip()
    return ("%d CPUs (nproc), %.1f GB memory, Linux %s, %s, Caddy %s"
            % (os.cpu_count() or 0, total_kb / 1e6, platform.release(), python,
               caddy))


TABLE_START = "<!-- bench table: written by bench/run_bench.py -->"
TABLE_END = "<!-- end of bench table -->"


def write_results(text: str) -> None:
    """Replace the generated part of bench/results.md and keep the rest."""
    block = "%s\n%s%s" % (TABLE_START, text, TABLE_END)
    try:
        with open(RESULTS_PATH, encoding="utf-8") as handle:
            page = handle.read()
    except FileNotFoundError:
        page = "# Benchmark results\n\n%s\n" % block
    else:
        start = page.index(TABLE_START)
        end = page.index(TABLE_END) + len(TABLE_END)
        page = page[:start] + block + page[end:]
    with open(RESULTS_PATH, "w", encoding="utf-8") as handle:
        handle.write(page)


def render(rows: list, causes: list) -> str:
    """Return the results page: machine, date, mode, the table and error causes."""
    lines = ["| section | measurement | result | target | verdict |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    mode = "quick (BENCH_QUICK=1)" if QUICK else "full (BENCH_QUICK=0)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["Machine: %s." % machine_line(), "Date: %s. Mode: %s." % (now, mode),
             "", table]
    if causes:
        parts += ["", "Errors seen under load:", ""] + ["- " + c for c in causes]
    return "\n".join(parts) + "\n"


def main() -> int:
    """Run every section, print the table and write bench/results.md."""
    if not harness.is_root():
        sys.stderr.write("bench needs root: the sandbox uses namespaces, mounts "
                         "and a cgroup dir\n")
        return 2
    missing = harness.ensure_packages(("caddy", "wrk", "python3", "docker.io",
                                       "docker-registry", "busybox-static",
                                       "apache2-utils"))
    if missing:
        sys.stderr.write("missing Debian packages: %s\n" % " ".join(missing))
        return 2
    rows: list = []
    causes: list = []
    env = Environment()
    try:
        env.start()
        sections = os.environ.get("BENCH_SECTIONS",
                                  "deploy,zero,api,scale,foot,prune")
        selected = set(sections.split(","))
        if "deploy" in selected:
            bench_deploy_overhead(env, rows)
        if "deploy" in selected or "docker" in selected:
            bench_docker_deploy_overhead(env, rows)
        if "zero" in selected:
            bench_zero_downtime(env, rows, causes)
        if "api" in selected:
            bench_api(env, rows)
        if "foot" in selected:
            bench_footprint(env, rows)
        if "prune" in selected:
            bench_prune(env, rows)
        if "scale" in selected:
            bench_scale(rows)
    finally:
        env.stop()
    text = render(rows, causes)
    print(text)
    if os.environ.get("BENCH_SECTIONS") is None:
        write_results(text)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
