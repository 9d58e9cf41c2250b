"""Docker apps: the slots-model API against a real dockerd and registry.

The end-to-end tests run the operator against dockerd 20.10 (a unit of the
sandbox systemd), a docker-registry with htpasswd auth and Caddy, all on
127.0.0.1. The test images are built FROM scratch around busybox-static
and pushed to the registry with credentials, so every deploy pulls with
X-Registry-Auth.

The pull-stream tests and the request-shape tests need responses that a
real dockerd cannot be made to give. There, and nowhere else, a small HTTP
server on a unix socket replaces dockerd.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import socket
import socketserver
import sys
import threading
import urllib.parse

import pytest

import crate_operator as co
import harness

DEPLOY = "/v1/app/instance/docker/deploy"
FINAL = ("succeeded", "failed", "rolled_back")
NOBODY = "65534:65534"
_ids = iter(range(70000, 80000))


def next_id() -> int:
    return next(_ids)


# === Fixtures ===

@pytest.fixture(scope="module")
def caddy(shared_dir, packages):
    """A Caddy for this module only.

    test_harness expects the session Caddy to have no servers, and the
    deploys here would add one.
    """
    if "caddy" in packages:
        pytest.skip("caddy is not installed and cannot be installed without root")
    process = harness.CaddyProcess(shared_dir, name="caddy-docker")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def operator(shared_dir, sandbox, caddy):
    """An operator of this module, routing through this module's Caddy."""
    process = harness.OperatorProcess(shared_dir, sandbox, caddy)
    try:
        process.start()
        yield process
    finally:
        process.stop()


# === Test images ===

CGI_HEADER = 'echo "Content-Type: application/octet-stream"\necho ""\n'
CGI_SCRIPTS = {
    "environ": "exec /bin/busybox cat /proc/1/environ\n",
    "cmdline": "exec /bin/busybox cat /proc/1/cmdline\n",
    "ids": "/bin/busybox id -u\n/bin/busybox id -g\n",
    "write": ('echo "$QUERY_STRING" > /data/note\n'
              'echo "$QUERY_STRING" > /named/note\n'
              'echo "written"\n'),
    "read": "/bin/busybox cat /data/note /named/note\n",
}
# Runs busybox httpd on $PORT; STOPSIGNAL SIGKILL because httpd as PID 1
# ignores SIGTERM. /named belongs to 65534, and dockerd copies that owner
# into a new named volume mounted there.
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY www /www
COPY --chown=65534:65534 named /named
STOPSIGNAL SIGKILL
{healthcheck}CMD ["/bin/busybox", "sh", "-c", \
"exec /bin/busybox httpd -f -p \\"$PORT\\" -h /www"]
"""


def build_image(dockerd, tag: str, text: str, healthcheck: str = "") -> None:
    """Build a FROM-scratch busybox httpd image serving text at / and CGIs."""
    context = os.path.join(dockerd.dir, f"build-{next_id()}")
    www = os.path.join(context, "www")
    os.makedirs(os.path.join(www, "cgi-bin"))
    os.makedirs(os.path.join(context, "named"))
    shutil.copy("/bin/busybox", os.path.join(context, "busybox"))
    with open(os.path.join(context, "named", ".keep"), "w") as handle:
        handle.write("")
    for name, content in (("index.html", text), ("healthz", "ok\n")):
        with open(os.path.join(www, name), "w", encoding="utf-8") as handle:
            handle.write(content)
    for name, script in CGI_SCRIPTS.items():
        path = os.path.join(www, "cgi-bin", name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("#!/bin/busybox sh\n" + CGI_HEADER + script)
        os.chmod(path, 0o755)
    with open(os.path.join(context, "Dockerfile"), "w") as handle:
        handle.write(DOCKERFILE.format(healthcheck=healthcheck))
    try:
        dockerd.docker("build", "-q", "-t", tag, context)
    finally:
        shutil.rmtree(context, ignore_errors=True)


@pytest.fixture(scope="module")
def images(dockerd, registry):
    """Push the test images and return their names, tags and digests.

    Local copies are removed after the push, so each deploy really pulls.
    """
    login = dockerd.docker("login", "-u", registry.username,
                           "--password-stdin", registry.address,
                           input_text=registry.password)
    assert login.returncode == 0, login.stderr
    web = f"{registry.address}/crate-test/web"
    f7 = f"{registry.address}/crate-test/f7"
    built = [
        (f"{web}:v1", "web v1\n", ""),
        (f"{web}:v2", "web v2\n", ""),
        (f"{web}:unhealthy", "web unhealthy\n",
         'HEALTHCHECK --interval=1s --timeout=2s --retries=1 '
         'CMD ["/bin/busybox", "false"]\n'),
        (f"{web}:healthy", "web healthy\n",
         'HEALTHCHECK --interval=1s --timeout=2s --retries=1 '
         'CMD ["/bin/busybox", "true"]\n'),
        (f"{f7}:a", "f7 a\n", ""),
        (f"{f7}:b", "f7 b\n", ""),
    ]
    digests = {}
    for tag, text, healthcheck in built:
        build_image(dockerd, tag, text, healthcheck)
        dockerd.docker("push", tag)
        result = dockerd.docker("inspect", "--format",
                                "{{json .RepoDigests}}", tag)
        digests[tag] = json.loads(result.stdout)[0].split("@", 1)[1]
    for tag, _text, _healthcheck in built:
        dockerd.docker("rmi", "-f", tag)
    return {"web": web, "f7": f7, "digests": digests}


# === Helpers ===

def docker_body(registry, images, app_id, deployment_id, callbacks,
                **changes):
    body = {
        "app_id": app_id, "team_id": "team-d", "environment_id": 4,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"dk{app_id}.example.test", "image": images["web"],
        "image_tag": "v1", "target_version": f"v{deployment_id}",
        "slots": {"blue": {"port": harness.free_port()},
                  "green": {"port": harness.free_port()}},
        "env_vars": {"GREETING": "hello"}, "health_check_path": "/healthz",
        "registry_credentials": {"username": registry.username,
                                 "password": registry.password},
        "callback_url": callbacks.url(f"/cb/docker/{app_id}"),
    }
    body.update(changes)
    return body


def deploy(operator, body, timeout=90):
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    return operator.wait_state(body["deployment_id"], FINAL, timeout=timeout)


def redeploy(first, **changes):
    """Return a follow-up body of the same app with a new deployment_id."""
    deployment_id = next_id()
    return dict(first, deployment_id=deployment_id,
                target_version=f"v{deployment_id}", **changes)


def wait_callback(callbacks, body, event):
    """Wait for the callback of one event of one deployment; return its body."""
    path = urllib.parse.urlsplit(body["callback_url"]).path

    def find(records):
        # The receiver is shared by the session, and other modules post
        # bodies that are not JSON to other paths, so match the path first.
        for record in records:
            if record.path != path:
                continue
            data = record.json()
            if data["event"] == event and \
                    data["deployment"]["deployment_id"] == body["deployment_id"]:
                return data
        return None
    return callbacks.wait_for(find, timeout=15)


def get(caddy, domain, path="/"):
    """GET path with Host: domain through Caddy; return (status, bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", caddy.listen_port,
                                      timeout=10)
    try:
        conn.request("GET", path, headers={"Host": domain})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def containers_of(dockerd, app_id):
    filters = json.dumps({"label": [f"crate.app_id={app_id}"]})
    status, items = dockerd.api(
        "GET", "/containers/json?all=1&filters="
        + urllib.parse.quote(filters))
    assert status == 200, items
    return {item["Names"][0].lstrip("/"): item for item in items}


def inspect(dockerd, name):
    status, details = dockerd.api("GET", f"/containers/{name}/json")
    assert status == 200, details
    return details


def create_container(dockerd, registry, image, name, labels, env=(),
                     port=None):
    """Pull image with credentials and create (not start) a container.

    With port, the container publishes that port on 127.0.0.1.
    """
    header = harness.registry_auth_header(registry.username,
                                          registry.password, registry.address)
    repository, tag = image.rsplit(":", 1)
    status, body = dockerd.api(
        "POST", "/images/create?" + urllib.parse.urlencode(
            {"fromImage": repository, "tag": tag}),
        headers={"X-Registry-Auth": header})
    assert status == 200, body
    config = {"Image": image, "Labels": labels, "Env": list(env),
              "User": NOBODY}
    if port:
        config["ExposedPorts"] = {f"{port}/tcp": {}}
        config["HostConfig"] = {"PortBindings": {f"{port}/tcp": [
            {"HostIp": "127.0.0.1", "HostPort": port}]}}
    status, created = dockerd.api(
        "POST", "/containers/create?name=" + name, config)
    assert status == 201, created
    return created["Id"]


def secret_forms(username, password, server):
    """Return the password and the base64 forms its auth header can take."""
    raw = json.dumps({"username": username, "password": password,
                      "serveraddress": server}).encode()
    return [password, base64.urlsafe_b64encode(raw).decode(),
            base64.b64encode(raw).decode()]


def files_containing(root, needles):
    """Return (path, needle) for each file below root that contains needle."""
    found = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                data = handle.read()
            found += [(path, n) for n in needles if n.encode() in data]
    return found


# === Create, update and serve ===

def test_create_and_bluegreen_update_through_caddy(operator, caddy, dockerd,
                                                   registry, images,
                                                   callbacks):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks)
    doc = deploy(operator, first)
    assert doc["state"] == "succeeded", doc
    assert doc["kind"] == "docker"
    assert doc["action"] == "create"
    blue = f"crate-{app_id}-blue-{first['deployment_id']}"
    assert doc["instances"] == [{
        "instance_id": "blue", "slot": "blue",
        "port": first["slots"]["blue"]["port"],
        "version": first["target_version"], "state": "running",
        "unit": blue, "image": images["web"], "tag": "v1"}]
    assert get(caddy, first["domain"]) == (200, b"web v1\n")

    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               first["domain"])
    loop.start()
    loop.wait_requests(20)
    second = redeploy(first, image_tag="v2", deployment_strategy="bluegreen")
    doc = deploy(operator, second)
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert doc["state"] == "succeeded", doc
    assert summary["failed"] == 0, summary["failures"]
    assert set(summary["bodies"]) == {"web v1\n", "web v2\n"}
    assert doc["allocations"] == [{"instance_id": "green", "slot": "green",
                                   "weight": 100}]
    green = f"crate-{app_id}-green-{second['deployment_id']}"
    states = {i["unit"]: i["state"] for i in doc["instances"]}
    assert states == {blue: "stopped", green: "running"}
    names = containers_of(dockerd, app_id)
    assert names[blue]["State"] == "exited"
    assert names[green]["State"] == "running"

    final = wait_callback(callbacks, second, "deployment.succeeded")
    assert final["deployment"]["kind"] == "docker"
    assert final["deployment"]["instances"][1]["image"] == images["web"]
    assert final["deployment"]["instances"][1]["tag"] == "v2"


def test_immediate_update_in_place_and_rollback(operator, caddy, dockerd,
                                                registry, images, callbacks):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    second = redeploy(first, image_tag="v2")
    doc = deploy(operator, second)
    assert doc["state"] == "succeeded", doc
    assert get(caddy, first["domain"]) == (200, b"web v2\n")
    old = f"crate-{app_id}-blue-{first['deployment_id']}"
    new = f"crate-{app_id}-blue-{second['deployment_id']}"
    assert [i["unit"] for i in doc["instances"]] == [new]
    names = containers_of(dockerd, app_id)
    assert names[old]["State"] == "exited"
    assert names[new]["State"] == "running"

    crash = redeploy(first, image_tag="v1",
                     docker_command=["/bin/busybox", "sh", "-c", "exit 9"])
    doc = deploy(operator, crash)
    assert doc["state"] == "rolled_back", doc
    assert "exit code 9" in doc["error"]
    assert get(caddy, first["domain"]) == (200, b"web v2\n")
    names = containers_of(dockerd, app_id)
    assert sorted(names) == [new]
    assert names[new]["State"] == "running"


def test_container_settings(operator, dockerd, registry, images, callbacks):
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    port = str(body["slots"]["blue"]["port"])
    details = inspect(dockerd, f"crate-{app_id}-blue-{body['deployment_id']}")
    config, host = details["Config"], details["HostConfig"]
    assert config["Labels"] == {
        "crate.managed": "1", "crate.app_id": str(app_id),
        "crate.instance_id": "blue", "crate.name": "blue",
        "crate.deployment_id": str(body["deployment_id"]),
        "crate.version": body["target_version"], "crate.team_id": "team-d",
        "crate.environment_id": "4"}
    assert config["User"] == NOBODY
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert config["Image"] == images["web"] + ":v1"
    assert f"PORT={port}" in config["Env"]
    assert f"{port}/tcp" in config["ExposedPorts"]
    assert host["PortBindings"] == {
        f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": port}]}
    published = details["NetworkSettings"]["Ports"][f"{port}/tcp"]
    assert published == [{"HostIp": "127.0.0.1", "HostPort": port}]
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["LogConfig"] == {"Type": "json-file", "Config": {
        "max-file": "3", "max-size": "10m"}}
    assert "no-new-privileges" in host["SecurityOpt"]


def test_container_config_carries_limits():
    # dockerd inside the namespaced sandbox has no cgroup controllers and
    # drops memory and pids limits silently, so the request is checked here.
    values = {key: spec[0] for key, spec in co.CONFIG_SPEC.items()}
    config = co.Config(dict(values, app_user="dynamic", apps_dir="/srv/x"))
    runtime = co.DockerRuntime(config, client=None)
    plan = {"app_id": 5, "deployment_id": "9", "version": "v1",
            "team_id": "t", "environment_id": 1, "env_vars": {},
            "limits": {"memory_mb": 256, "cpu_percent": 150}}
    instance = {"instance_id": "blue", "name": "blue", "port": 18000}
    built = runtime._container_config(plan, instance, {"release": "img:1"},
                                      [])
    host = built["HostConfig"]
    assert host["Memory"] == 256 << 20
    assert host["NanoCpus"] == 1_500_000_000
    assert host["PidsLimit"] == 512
    assert host["CapDrop"] == ["ALL"]
    without = runtime._container_config(dict(plan, limits=None), instance,
                                        {"release": "img:1"}, [])
    assert "Memory" not in without["HostConfig"]
    assert "NanoCpus" not in without["HostConfig"]


class _RemovalClient:
    """Lists containers in fixed states; removals wait for ``release``."""

    def __init__(self, states: dict, failing: tuple = ()) -> None:
        self.states = dict(states)
        self.failing = set(failing)
        self.removed: list = []
        self.release = threading.Event()

    def list_containers(self, labels: dict) -> list:
        return [{"Names": ["/" + name], "State": state}
                for name, state in self.states.items()]

    def remove_container(self, name: str) -> None:
        assert self.release.wait(10), "the test never released the removals"
        if name in self.failing:
            raise co.DockerError(f"removing container {name} failed with "
                                 f"HTTP 500: injected", 500)
        self.removed.append(name)

    def create_container(self, name: str, config: dict) -> None:
        self.states[name] = "created"


def test_replaced_containers_removed_beside_the_job(caplog):
    # install reads which containers are stopped and removes them in a
    # helper thread; finish_job waits for it. A container stopped after
    # install (the live one, which a rollback starts again) stays, and a
    # removal that fails is logged without failing the deployment.
    values = {key: spec[0] for key, spec in co.CONFIG_SPEC.items()}
    config = co.Config(dict(values, app_user="dynamic", apps_dir="/srv/x"))
    client = _RemovalClient({"c-bad": "exited", "c-live": "running",
                             "c-old": "exited"}, failing=("c-bad",))
    runtime = co.DockerRuntime(config, client=client)
    plan = {"app_id": 5, "deployment_id": "9", "version": "v1",
            "team_id": "t", "environment_id": 1, "env_vars": {}}
    instance = {"instance_id": "blue", "name": "blue", "port": 18000,
                "unit": "c-new"}
    with caplog.at_level("INFO", logger="crate_operator"):
        runtime.install(plan, instance, {"release": "img:1"})
        assert client.states["c-new"] == "created"
        assert client.removed == []  # install did not wait for them
        client.states["c-live"] = "exited"
        client.release.set()
        runtime.finish_job(5)
        assert client.removed == ["c-old"]
    failed = [r for r in caplog.records
              if r.getMessage() == "docker.container_remove_failed"]
    assert [r.fields["container"] for r in failed] == ["c-bad"]
    runtime.finish_job(5)  # nothing left to wait for


def test_process_runs_as_nobody(operator, caddy, registry, images,
                                callbacks):
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    status, text = get(caddy, body["domain"], "/cgi-bin/ids")
    assert status == 200
    assert text.split() == [b"65534", b"65534"]


HARD_VALUES = {
    "SPACES": "hello world  two",
    "QUOTES": 'say "hi" and \'bye\'',
    "DOLLAR": "$HOME ${PATH} $$ $1",
    "PERCENT": "(uid=%s) 50% a%20b %n %%",
    "BACKSLASH": "a\\b\\\\c\\",
    "TABS": "a\tb\t",
    "PEM": "-----BEGIN KEY-----\nabc\ndef\n-----END KEY-----\n",
    "EQUALS": "a=b=c",
    "EMPTY": "",
    "UNICODE": "grüße ☃ 日本",
    "BACKTICK": "`id` $(id)",
}


def test_env_values_arrive_exactly(operator, caddy, registry, images,
                                   callbacks):
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks,
                       env_vars=dict(HARD_VALUES))
    assert deploy(operator, body)["state"] == "succeeded"
    status, raw = get(caddy, body["domain"], "/cgi-bin/environ")
    assert status == 200
    env = dict(item.split("=", 1)
               for item in raw.decode("utf-8").split("\0") if item)
    for name, value in HARD_VALUES.items():
        assert env.get(name) == value, name
    assert env["PORT"] == str(body["slots"]["blue"]["port"])
    assert env["CRATE_APP_ID"] == str(app_id)
    assert env["CRATE_INSTANCE_ID"] == "blue"
    assert env["CRATE_VERSION"] == body["target_version"]
    assert env["CRATE_DEPLOYMENT_ID"] == str(body["deployment_id"])
    assert "GREETING" not in env


def test_docker_command_keeps_argument_boundaries(operator, caddy, dockerd,
                                                  registry, images,
                                                  callbacks):
    command = ["/bin/busybox", "sh", "-c",
               '/bin/busybox httpd -f -p "$PORT" -h /www; exit 3',
               "crate-sh", 'two words "quoted" $HOME \\', ""]
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks,
                       docker_command=command)
    assert deploy(operator, body)["state"] == "succeeded"
    details = inspect(dockerd, f"crate-{app_id}-blue-{body['deployment_id']}")
    assert details["Config"]["Cmd"] == command
    status, raw = get(caddy, body["domain"], "/cgi-bin/cmdline")
    assert status == 200
    assert raw.decode().split("\0")[:-1] == command


# === Volumes ===

def test_volume_data_survives_bluegreen(operator, caddy, shared_dir,
                                        registry, images, callbacks):
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks,
                       volumes=["files/sub:/data", "store:/named"])
    assert deploy(operator, body)["state"] == "succeeded"
    assert get(caddy, body["domain"], "/cgi-bin/write?kept-42") == \
        (200, b"written\n")
    data_dir = os.path.join(shared_dir, "apps", str(app_id), "data")
    for path in (data_dir, os.path.join(data_dir, "files"),
                 os.path.join(data_dir, "files", "sub")):
        info = os.stat(path)
        assert (info.st_uid, info.st_gid) == (65534, 65534), path
        assert info.st_mode & 0o777 == 0o750, path

    second = redeploy(body, image_tag="v2", deployment_strategy="bluegreen")
    doc = deploy(operator, second)
    assert doc["state"] == "succeeded", doc
    assert get(caddy, body["domain"]) == (200, b"web v2\n")
    assert get(caddy, body["domain"], "/cgi-bin/read") == \
        (200, b"kept-42\nkept-42\n")


def test_bind_source_escaping_data_dir_is_400(operator, dockerd, shared_dir,
                                              registry, images, callbacks):
    app_id = next_id()
    data_dir = os.path.join(shared_dir, "apps", str(app_id), "data")
    outside = os.path.join(shared_dir, f"outside-{app_id}")
    os.makedirs(data_dir)
    os.makedirs(outside)
    os.symlink(outside, os.path.join(data_dir, "link"))
    cases = {
        "link/created:/x": "symlinks are resolved",
        "../escape/dir:/x": "stay inside the app data directory",
    }
    for spec, reason in cases.items():
        body = docker_body(registry, images, app_id, next_id(), callbacks,
                           volumes=["ok/dir:/ok", spec])
        status, _, answer = operator.request("POST", DEPLOY, body)
        assert status == 400, answer
        assert answer["errors"][0]["field"] == "$.volumes[1]"
        assert reason in answer["errors"][0]["reason"]
        missing = operator.request(
            "GET", f"/v1/app/instance/deploy/{body['deployment_id']}/status")
        assert missing[0] == 404
    assert os.listdir(outside) == []
    assert sorted(os.listdir(data_dir)) == ["link"]
    assert containers_of(dockerd, app_id) == {}


# === Health ===

def test_image_healthcheck_must_pass(operator, caddy, dockerd, registry,
                                     images, callbacks):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    bad = redeploy(first, image_tag="unhealthy",
                   deployment_strategy="bluegreen")
    doc = deploy(operator, bad)
    assert doc["state"] == "failed", doc
    assert "unhealthy" in doc["error"]
    assert doc["serving_version"] == first["target_version"]
    assert get(caddy, first["domain"]) == (200, b"web v1\n")
    assert f"crate-{app_id}-green-{bad['deployment_id']}" not in \
        containers_of(dockerd, app_id)

    good = redeploy(first, image_tag="healthy",
                    deployment_strategy="bluegreen")
    assert deploy(operator, good)["state"] == "succeeded"
    details = inspect(dockerd, f"crate-{app_id}-green-{good['deployment_id']}")
    assert details["State"]["Health"]["Status"] == "healthy"


def test_port_check_waits_for_late_listener(operator, caddy, registry,
                                           images, callbacks):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks,
                        health_check_path=None)
    assert deploy(operator, first)["state"] == "succeeded"
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               first["domain"])
    loop.start()
    loop.wait_requests(20)
    late = redeploy(first, image_tag="v2", deployment_strategy="bluegreen",
                    docker_command=[
                        "/bin/busybox", "sh", "-c",
                        "/bin/busybox sleep 2; exec /bin/busybox httpd -f"
                        ' -p "$PORT" -h /www'])
    doc = deploy(operator, late)
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert doc["state"] == "succeeded", doc
    assert summary["failed"] == 0, summary["failures"]
    assert set(summary["bodies"]) == {"web v1\n", "web v2\n"}
    # docker-proxy accepts at once, so a plain connect would pass long before
    # httpd listens. Caddy's retries would hide that from the loop above.
    times = {step["name"]: step["at"] for step in doc["steps"]}
    waited = (harness.status_seconds(times["health_check"])
              - harness.status_seconds(times["start_instance"]))
    assert waited >= 1.5, doc["steps"]


def test_probe_published_port_needs_open_connection():
    closing = socket.socket()
    holding = socket.socket()
    for server in (closing, holding):
        server.bind(("127.0.0.1", 0))
        server.listen()
    accepted = []

    def accept_and_close():
        conn, _ = closing.accept()
        conn.close()

    def accept_and_hold():
        conn, _ = holding.accept()
        accepted.append(conn)

    threads = [threading.Thread(target=accept_and_close),
               threading.Thread(target=accept_and_hold)]
    for thread in threads:
        thread.start()
    try:
        ready, detail = co.probe_published_port(closing.getsockname()[1])
        assert not ready
        assert "closed at once" in detail
        assert co.probe_published_port(holding.getsockname()[1])[0]
        free = harness.free_port()
        assert co.probe_published_port(free) == (False, "connection refused")
    finally:
        for thread in threads:
            thread.join(5)
        for sock in [closing, holding, *accepted]:
            sock.close()


def test_crashing_container_fails_with_exit_code(operator, caddy, registry,
                                                 images, callbacks):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    crash = redeploy(first, deployment_strategy="bluegreen",
                     docker_command=["/bin/busybox", "sh", "-c", "exit 7"])
    doc = deploy(operator, crash)
    assert doc["state"] == "failed", doc
    assert "exit code 7" in doc["error"]
    assert get(caddy, first["domain"]) == (200, b"web v1\n")


def test_container_left_running_on_idle_port_is_replaced(
        operator, caddy, dockerd, registry, images, callbacks):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    green_port = str(first["slots"]["green"]["port"])
    leftover = f"crate-{app_id}-green-{next_id()}"
    create_container(dockerd, registry, images["web"] + ":v1", leftover,
                     {"crate.managed": "1", "crate.app_id": str(app_id),
                      "crate.instance_id": "green", "crate.name": "green"},
                     env=[f"PORT={green_port}"], port=green_port)
    status, answer = dockerd.api("POST", f"/containers/{leftover}/start")
    assert status == 204, answer

    second = redeploy(first, image_tag="v2", deployment_strategy="bluegreen")
    doc = deploy(operator, second)
    assert doc["state"] == "succeeded", doc
    assert get(caddy, first["domain"]) == (200, b"web v2\n")
    assert leftover not in containers_of(dockerd, app_id)


# === Registry credentials ===

def test_wrong_password_fails_and_is_never_stored_f5(operator, caddy,
                                                     registry, images,
                                                     callbacks):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, first)["state"] == "succeeded"
    wrong = "wrong-Pw/+7f3a=="
    bad = redeploy(first, image_tag="v2", deployment_strategy="bluegreen",
                   registry_credentials={"username": registry.username,
                                         "password": wrong})
    doc = deploy(operator, bad)
    assert doc["state"] == "failed", doc
    assert "unauthorized" in doc["error"]
    assert get(caddy, first["domain"]) == (200, b"web v1\n")

    wait_callback(callbacks, bad, "deployment.failed")
    needles = (secret_forms(registry.username, wrong, registry.address)
               + secret_forms(registry.username, registry.password,
                              registry.address))
    log = operator.log_text()
    for needle in needles:
        assert needle not in log
    assert files_containing(operator.state_dir, needles) == []
    for record in callbacks.records():
        for needle in needles:
            assert needle.encode() not in record.body


def test_password_with_base64_specials_pulls_f5(operator, caddy, registry,
                                                images, callbacks):
    raw = json.dumps({"username": registry.username,
                      "password": registry.password,
                      "serveraddress": registry.address}).encode()
    standard = base64.b64encode(raw).decode()
    assert "+" in standard or "/" in standard
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    assert get(caddy, body["domain"]) == (200, b"web v1\n")


def test_resend_differing_in_password_is_duplicate(operator, registry,
                                                   images, callbacks):
    body = docker_body(registry, images, next_id(), next_id(), callbacks)
    assert deploy(operator, body)["state"] == "succeeded"
    other_password = dict(body, registry_credentials={
        "username": registry.username, "password": "another-password"})
    status, _, answer = operator.request("POST", DEPLOY, other_password)
    assert status == 202, answer
    assert answer["duplicate"] is True
    other_user = dict(body, registry_credentials={
        "username": "someone-else", "password": registry.password})
    status, _, answer = operator.request("POST", DEPLOY, other_user)
    assert status == 409, answer


def test_private_image_without_credentials_fails_f5(operator, registry,
                                                     images, callbacks):
    body = docker_body(registry, images, next_id(), next_id(), callbacks,
                       image_tag="v2", registry_credentials=None)
    doc = deploy(operator, body)
    assert doc["state"] == "failed", doc
    assert "no basic auth credentials" in doc["error"]


# === Image references ===

def test_registry_port_and_tag_pull_one_tag_f7(operator, caddy, dockerd,
                                               registry, images, callbacks):
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks,
                       image=images["f7"], image_tag="a")
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    assert get(caddy, body["domain"]) == (200, b"f7 a\n")
    filters = json.dumps({"reference": [images["f7"]]})
    status, local = dockerd.api("GET", "/images/json?filters="
                                + urllib.parse.quote(filters))
    assert status == 200
    tags = sorted(tag for image in local for tag in image["RepoTags"] or [])
    assert tags == [images["f7"] + ":a"]


def test_image_by_digest_f7(operator, caddy, dockerd, registry, images,
                            callbacks):
    digest = images["digests"][images["f7"] + ":b"]
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks,
                       image=images["f7"], image_tag=digest)
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    assert doc["instances"][0]["tag"] == digest
    assert get(caddy, body["domain"]) == (200, b"f7 b\n")
    details = inspect(dockerd, f"crate-{app_id}-blue-{body['deployment_id']}")
    assert details["Config"]["Image"] == f"{images['f7']}@{digest}"


# === Stale containers ===

def test_stale_labelled_container_is_replaced_f8(operator, caddy, dockerd,
                                                 registry, images,
                                                 callbacks):
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks)
    name = f"crate-{app_id}-blue-{body['deployment_id']}"
    stale_id = create_container(
        dockerd, registry, images["web"] + ":v2", name,
        {"crate.managed": "1", "crate.app_id": str(app_id),
         "crate.instance_id": "blue", "crate.name": "blue"})
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    assert inspect(dockerd, name)["Id"] != stale_id
    assert get(caddy, body["domain"]) == (200, b"web v1\n")


def test_stale_foreign_container_is_left_alone_f8(operator, dockerd,
                                                  registry, images,
                                                  callbacks):
    app_id = next_id()
    body = docker_body(registry, images, app_id, next_id(), callbacks)
    name = f"crate-{app_id}-blue-{body['deployment_id']}"
    foreign_id = create_container(dockerd, registry, images["web"] + ":v2",
                                  name, {"owner": "someone-else"})
    doc = deploy(operator, body)
    assert doc["state"] == "failed", doc
    assert name in doc["error"]
    assert "did not create" in doc["error"]
    assert inspect(dockerd, name)["Id"] == foreign_id


# === Pull stream and request shape against a stand-in dockerd ===

class FakeDockerd(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves Engine API calls on a unix socket with a scripted pull reply.

    pull is one of "ok", "error-in-stream", "cut", "broken-line" or
    ("http", status, message). Every request is recorded in requests as
    (method, path, query dict, headers dict).
    """

    daemon_threads = True

    def __init__(self, path: str, api_version: str = "1.41"):
        self.api_version = api_version
        self.pull = "ok"
        self.requests: list = []
        super().__init__(path, FakeDockerdHandler)

    def handle_error(self, request, client_address):
        """Stay quiet when the client hangs up first, as after an error line."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeDockerdHandler(http.server.BaseHTTPRequestHandler):
    """Routes one connection's requests to the scripted replies."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def address_string(self):
        return "unix"

    def do_GET(self):
        self.route()

    def do_POST(self):
        self.route()

    def route(self):
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query,
                                            keep_blank_values=True))
        self.server.requests.append((self.command, parts.path, query,
                                     dict(self.headers.items())))
        if parts.path == "/version":
            return self.reply(200, {"ApiVersion": self.server.api_version})
        if parts.path.endswith("/images/create"):
            return self.pull_reply()
        if "/images/" in parts.path and parts.path.endswith("/json"):
            return self.reply(200, {"Id": "sha256:" + "0" * 64})
        return self.reply(404, {"message": "not found"})

    def reply(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def pull_reply(self):
        behaviour = self.server.pull
        if isinstance(behaviour, tuple):
            return self.reply(behaviour[1], {"message": behaviour[2]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunk(b'{"status":"Pulling from crate-test/web","id":"v1"}\r\n')
        self.chunk(b'{"status":"Downloading","progressDetail":'
                   b'{"current":1,"total":9},"id":"abc"}\r\n')
        if behaviour == "cut":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if behaviour == "broken-line":
            self.chunk(b'{"status":"Downl')
            self.wfile.write(b"0\r\n\r\n")
            return
        if behaviour == "error-in-stream":
            self.chunk(b'{"errorDetail":{"message":"unknown blob"},'
                       b'"error":"unknown blob"}\r\n')
        else:
            self.chunk(b'{"status":"Status: Downloaded newer image"}\r\n')
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def fake_dockerd(tmp_path):
    path = str(tmp_path / "docker.sock")
    server = FakeDockerd(path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def pull_with(fake, image="127.0.0.1:5000/team/app", tag="v1",
              credentials=None):
    client = co.DockerClient(fake.server_address, pull_timeout_s=10)
    header = co.registry_auth_header(credentials, image) if credentials \
        else None
    hidden = [credentials["password"], header] if credentials else []
    return client.pull(image, tag, header, hidden)


def test_pull_error_inside_200_stream_fails_f6(fake_dockerd):
    fake_dockerd.pull = "error-in-stream"
    with pytest.raises(co.DockerError, match="unknown blob"):
        pull_with(fake_dockerd)


def test_pull_stream_cut_midway_fails_f6(fake_dockerd):
    fake_dockerd.pull = "cut"
    with pytest.raises(co.DockerError, match="stopped before it finished"):
        pull_with(fake_dockerd)


def test_pull_stream_ending_in_broken_line_fails_f6(fake_dockerd):
    fake_dockerd.pull = "broken-line"
    with pytest.raises(co.DockerError, match="incomplete line"):
        pull_with(fake_dockerd)


def test_pull_http_error_carries_message_and_hides_password(fake_dockerd):
    password = "pw-in-message"
    fake_dockerd.pull = ("http", 500, f"login {password} rejected: "
                                      "unauthorized")
    credentials = {"username": "u", "password": password}
    with pytest.raises(co.DockerError) as caught:
        pull_with(fake_dockerd, credentials=credentials)
    assert "unauthorized" in str(caught.value)
    assert password not in str(caught.value)
    assert caught.value.http_status == 500


def test_pull_complete_stream_succeeds(fake_dockerd):
    assert pull_with(fake_dockerd) == "Status: Downloaded newer image"


def test_pull_sends_urlsafe_auth_only_with_credentials_f5(fake_dockerd):
    password = "s3cr3t?>~0"
    pull_with(fake_dockerd, credentials={"username": "crateuser",
                                         "password": password})
    pull_with(fake_dockerd)
    pulls = [r for r in fake_dockerd.requests if r[1].endswith("/create")]
    header = pulls[0][3]["X-Registry-Auth"]
    assert "+" not in header
    assert "/" not in header
    decoded = json.loads(base64.urlsafe_b64decode(header))
    assert decoded == {"username": "crateuser", "password": password,
                       "serveraddress": "127.0.0.1:5000"}
    assert "X-Registry-Auth" not in pulls[1][3]


def test_pull_names_one_tag_or_digest_f7(fake_dockerd):
    digest = "sha256:" + "ab" * 32
    pull_with(fake_dockerd, image="registry.example.test:5000/team/app",
              tag="v1")
    pull_with(fake_dockerd, image="team/app", tag=digest)
    pulls = [r for r in fake_dockerd.requests if r[1].endswith("/create")]
    assert pulls[0][2] == {"fromImage": "registry.example.test:5000/team/app",
                           "tag": "v1"}
    assert pulls[1][2] == {"fromImage": "team/app", "tag": digest}
    with pytest.raises(co.DockerError, match="without a tag"):
        pull_with(fake_dockerd, tag="")


def test_image_reference_and_registry_f7():
    digest = "sha256:" + "cd" * 32
    assert co.image_reference("host:5000/app", "v1") == "host:5000/app:v1"
    assert co.image_reference("team/app", digest) == f"team/app@{digest}"
    assert co.image_registry("host:5000/app") == "host:5000"
    assert co.image_registry("localhost/app") == "localhost"
    assert co.image_registry("team/app") is None
    assert co.image_registry("app") is None
    header = co.registry_auth_header({"username": "u", "password": "p"},
                                     "team/app")
    assert json.loads(base64.urlsafe_b64decode(header))["serveraddress"] == \
        co.DOCKER_HUB_AUTH_SERVER


@pytest.mark.parametrize("server, expected", [
    ("1.43", "1.41"), ("1.41", "1.41"), ("1.40", "1.40")])
def test_api_version_negotiated(tmp_path, server, expected):
    fake = FakeDockerd(str(tmp_path / "docker.sock"), api_version=server)
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        pull_with(fake)
    finally:
        fake.shutdown()
        fake.server_close()
    paths = [r[1] for r in fake.requests]
    assert paths[0] == "/version"
    assert paths[1] == f"/v{expected}/images/create"


def test_old_api_version_rejected(tmp_path):
    fake = FakeDockerd(str(tmp_path / "docker.sock"), api_version="1.24")
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(co.DockerError, match="older than the 1.25"):
            pull_with(fake)
    finally:
        fake.shutdown()
        fake.server_close()


# === Idempotency digest ===

def test_idempotency_view_drops_only_the_password():
    body = {"deployment_id": 1, "registry_credentials": {
        "username": "u", "password": "p", "serveraddress": None}}
    view = co.idempotency_view("deploy_docker_slots", body)
    assert view == {"endpoint": "deploy_docker_slots", "body": {
        "deployment_id": 1, "registry_credentials": {
            "username": "u", "serveraddress": None}}}
    assert body["registry_credentials"]["password"] == "p"


def test_request_digest_ignores_password_not_username(tmp_path):
    store = co.Store(str(tmp_path))

    def digest(username, password):
        body = {"registry_credentials": {"username": username,
                                         "password": password}}
        return store.request_digest(co.idempotency_view("e", body))

    assert digest("u", "one") == digest("u", "two")
    assert digest("u", "one") != digest("v", "one")


# === The instances model, canary and delete ===

INSTANCES = "/v1/app/docker/deploy"


def instances_body(registry, images, app_id, deployment_id, callbacks, ids,
                   **changes):
    body = docker_body(registry, images, app_id, deployment_id, callbacks,
                       **changes)
    body.pop("slots")
    body.setdefault("instances", {i: {"port": harness.free_port()}
                                  for i in ids})
    return body


def deploy_instances(operator, body, timeout=90):
    status, _, answer = operator.request("POST", INSTANCES, body)
    assert status == 202, answer
    return operator.wait_state(body["deployment_id"], FINAL,
                               timeout=timeout, path_kind="legacy")


def test_instances_model_create_rolling_and_bluegreen(operator, caddy,
                                                      dockerd, registry,
                                                      images, callbacks):
    app_id = next_id()
    first = instances_body(registry, images, app_id, next_id(), callbacks,
                           ["d1", "d2"])
    doc = deploy_instances(operator, first)
    assert doc["state"] == "succeeded", doc
    assert doc["model"] == "instances"
    assert doc["kind"] == "docker"
    assert sorted(i["port"] for i in doc["instances"]) == sorted(
        spec["port"] for spec in first["instances"].values())
    assert get(caddy, first["domain"]) == (200, b"web v1\n")

    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               first["domain"])
    loop.start()
    loop.wait_requests(20)
    rolling = redeploy(first, image_tag="v2")
    doc = deploy_instances(operator, rolling)
    loop.wait_requests(len(loop.results) + 20)
    assert doc["state"] == "succeeded", doc
    assert doc["changes"]["update"] == ["d1", "d2"]
    green = redeploy(first, image_tag="v1", deployment_strategy="bluegreen")
    doc = deploy_instances(operator, green)
    loop.wait_requests(len(loop.results) + 20)
    summary = loop.stop()
    assert doc["state"] == "succeeded", doc
    assert summary["failed"] == 0, summary["failures"]
    assert set(summary["bodies"]) == {"web v1\n", "web v2\n"}
    running = [n for n, c in containers_of(dockerd, app_id).items()
               if c["State"] == "running"]
    assert len(running) == 2
    assert all(f"-{green['deployment_id']}" in n for n in running)
    assert get(caddy, first["domain"]) == (200, b"web v1\n")


def test_docker_canary_and_delete(operator, caddy, dockerd, registry, images,
                                  callbacks, shared_dir):
    app_id = next_id()
    first = docker_body(registry, images, app_id, next_id(), callbacks,
                        volumes=["data:/data"])
    assert deploy(operator, first)["state"] == "succeeded"
    canary = redeploy(first, image_tag="v2", deployment_strategy="canary",
                      canary={"steps": [50, 100], "pause_s": 1})
    doc = deploy(operator, canary)
    assert doc["state"] == "succeeded", doc
    steps = [s["message"] for s in doc["steps"] if s["name"] == "canary_step"]
    assert steps[0].startswith("50%")
    # The fetch step names the image pulled, as in the other strategies.
    fetch = [s["message"] for s in doc["steps"] if s["name"] == "fetch_asset"]
    assert fetch == [f"{canary['image']}:v2"], doc["steps"]
    assert get(caddy, first["domain"]) == (200, b"web v2\n")

    request = {"app_id": app_id, "team_id": first["team_id"],
               "environment_id": first["environment_id"],
               "callback_url": first["callback_url"],
               "domain": first["domain"], "instance_ids": ["blue", "green"]}
    status, _, answer = operator.request("POST", "/v1/app/delete", request)
    assert status == 202, answer
    done = operator.wait_state(answer["deployment_id"], FINAL,
                               path_kind="legacy")
    assert done["state"] == "succeeded", done
    assert containers_of(dockerd, app_id) == {}
    filters = json.dumps({"label": [f"crate.app_id={app_id}"]})
    status, volumes = dockerd.api(
        "GET", "/volumes?filters=" + urllib.parse.quote(filters))
    assert status == 200
    assert (volumes.get("Volumes") or []) == []
    assert not os.path.exists(os.path.join(shared_dir, "apps", str(app_id)))
    assert get(caddy, first["domain"])[0] == 404


def test_lifecycle_and_logs_of_a_container(operator, caddy, dockerd,
                                           registry, images, callbacks):
    app_id = next_id()
    command = ["/bin/busybox", "sh", "-c",
               'echo "hello from $CRATE_INSTANCE_ID"; '
               'exec /bin/busybox httpd -f -p "$PORT" -h /www']
    body = instances_body(registry, images, app_id, next_id(), callbacks,
                          ["c1", "c2"], docker_command=command)
    assert deploy_instances(operator, body)["state"] == "succeeded"
    request = {"app_id": app_id, "team_id": body["team_id"],
               "environment_id": body["environment_id"],
               "callback_url": body["callback_url"],
               "domain": body["domain"], "instance_id": "c1"}
    loop = harness.RequestLoop(f"http://127.0.0.1:{caddy.listen_port}/",
                               body["domain"])
    loop.start()
    loop.wait_requests(20)
    for action in ("stop", "start", "restart"):
        status, _, answer = operator.request("POST", f"/v1/app/{action}",
                                             request)
        assert status == 202, answer
        doc = operator.wait_state(answer["deployment_id"], FINAL,
                                  path_kind="legacy")
        assert doc["state"] == "succeeded", doc
        loop.wait_requests(len(loop.results) + 10)
    summary = loop.stop()
    assert summary["failed"] == 0, summary["failures"]
    status, _, logs = operator.request(
        "GET", f"/v1/app/logs?app_id={app_id}&instance_id=c2&lines=50")
    assert status == 200, logs
    assert logs["unit"].startswith(f"crate-{app_id}-c2.a-")
    assert len(logs["lines"]) == 1
    assert logs["lines"][0].endswith("hello from c2")
