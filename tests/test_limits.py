"""Container limits: enforced by the kernel, not only sent to dockerd.

The operator runs against a dockerd on the host (harness.HostDockerDaemon),
because the dockerd inside the namespaced sandbox drops memory and pids
limits silently. Each test deploys a busybox app through the operator's
API with the "limits" extension, reads the limits from the container's
cgroup files (found through docker inspect's pid and /proc/<pid>/cgroup),
and then makes the container run into one limit.
"""

from __future__ import annotations

import os
import shutil

import pytest

import harness

DEPLOY = "/v1/app/instance/docker/deploy"
FINAL = ("succeeded", "failed", "rolled_back")
# Must match DOCKER_PIDS_LIMIT in crate_operator.py, which every container gets.
PIDS_LIMIT = 512
# cgroup v1 reports "no memory limit" as the largest page-aligned int64.
V1_NO_MEMORY_LIMIT = 9223372036854771712
_ids = iter(range(950000, 960000))


def next_id() -> int:
    return next(_ids)


# === Fixtures ===

@pytest.fixture(scope="module")
def caddy(shared_dir, packages):
    """A Caddy for this module, so the session Caddy keeps no servers."""
    if "caddy" in packages:
        pytest.skip("caddy is not installed and cannot be installed without root")
    process = harness.CaddyProcess(shared_dir, name="caddy-limits")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def operator(shared_dir, sandbox, caddy, host_dockerd):
    """An operator whose docker_socket is the host dockerd's."""
    process = harness.OperatorProcess(
        shared_dir, sandbox, caddy,
        {"docker_socket": host_dockerd.socket_path})
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def image(host_dockerd, registry):
    """Push a busybox httpd image to the registry and return its name.

    The local copy is removed after the push, so the operator pulls it.
    """
    login = host_dockerd.docker("login", "-u", registry.username,
                                "--password-stdin", registry.address,
                                input_text=registry.password)
    assert login.returncode == 0, login.stderr
    name = f"{registry.address}/crate-test/limits"
    context = os.path.join(host_dockerd.dir, "build-limits")
    os.makedirs(os.path.join(context, "www"))
    shutil.copy("/bin/busybox", os.path.join(context, "busybox"))
    for file_name, text in (("index.html", "limits\n"), ("healthz", "ok\n")):
        with open(os.path.join(context, "www", file_name), "w",
                  encoding="utf-8") as handle:
            handle.write(text)
    # STOPSIGNAL SIGKILL because busybox httpd as PID 1 ignores SIGTERM.
    with open(os.path.join(context, "Dockerfile"), "w", encoding="utf-8") as handle:
        handle.write('FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n'
                     'STOPSIGNAL SIGKILL\n'
                     'CMD ["/bin/busybox", "sh", "-c", '
                     '"exec /bin/busybox httpd -f -p \\"$PORT\\" -h /www"]\n')
    try:
        host_dockerd.docker("build", "-q", "-t", f"{name}:v1", context)
    finally:
        shutil.rmtree(context, ignore_errors=True)
    host_dockerd.docker("push", f"{name}:v1")
    host_dockerd.docker("rmi", "-f", f"{name}:v1")
    return name


# === Helpers ===

def deploy_app(operator, registry, image, callbacks, limits):
    """Deploy one busybox app with these limits; return the container name."""
    app_id = next_id()
    deployment_id = next_id()
    body = {
        "app_id": app_id, "team_id": "team-l", "environment_id": 5,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"lim{app_id}.example.test", "image": image,
        "image_tag": "v1", "target_version": f"v{deployment_id}",
        "slots": {"blue": {"port": harness.free_port()}},
        "env_vars": {}, "health_check_path": "/healthz",
        "registry_credentials": {"username": registry.username,
                                 "password": registry.password},
        "callback_url": callbacks.url(f"/cb/limits/{app_id}"),
    }
    if limits is not None:
        body["limits"] = limits
    status, _, answer = operator.request("POST", DEPLOY, body)
    assert status == 202, answer
    doc = operator.wait_state(deployment_id, FINAL, timeout=90)
    assert doc["state"] == "succeeded", (doc, operator.log_tail())
    return f"crate-{app_id}-blue-{deployment_id}"


def container_pid(host_dockerd, name) -> int:
    status, details = host_dockerd.api("GET", f"/containers/{name}/json")
    assert status == 200, details
    assert details["State"]["Running"], details["State"]
    return details["State"]["Pid"]


def cgroup_dirs(pid) -> dict[str, str]:
    """Return {controller: cgroup dir} of a host pid, from /proc/<pid>/cgroup.

    A v1 line "4:memory:/a/b" gives /sys/fs/cgroup/memory/a/b. The v2 line
    "0::/a/b" gives "unified": <cgroup2 mount>/a/b, which holds the
    controllers that no v1 hierarchy has.
    """
    dirs = {}
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if not controllers:
                dirs["unified"] = harness.cgroup_root() + path
                continue
            for controller in controllers.split(","):
                mount = os.path.join("/sys/fs/cgroup", controllers)
                if not os.path.isdir(mount):
                    mount = os.path.join("/sys/fs/cgroup", controller)
                dirs[controller] = mount + path
    return dirs


def read_cgroup_file(dirs, controller, v1_name, v2_name) -> str:
    """Return the stripped text of a v1 file, or of its v2 counterpart."""
    if controller in dirs:
        path = os.path.join(dirs[controller], v1_name)
    else:
        path = os.path.join(dirs["unified"], v2_name)
    with open(path, encoding="ascii") as handle:
        return handle.read().strip()


def cgroup_limits(pid) -> dict:
    """Return memory_bytes, pids_max, cpu_quota_us and cpu_period_us of a pid.

    "max" (v2) and -1 (v1 CPU quota) come back as None, meaning no limit.
    """
    dirs = cgroup_dirs(pid)
    memory = read_cgroup_file(dirs, "memory", "memory.limit_in_bytes", "memory.max")
    pids = read_cgroup_file(dirs, "pids", "pids.max", "pids.max")
    if "cpu" in dirs:
        quota = read_cgroup_file(dirs, "cpu", "cpu.cfs_quota_us", "")
        period = read_cgroup_file(dirs, "cpu", "cpu.cfs_period_us", "")
    else:
        quota, period = read_cgroup_file(dirs, "cpu", "", "cpu.max").split()
    return {
        "memory_bytes": None if memory in ("max", str(V1_NO_MEMORY_LIMIT))
        else int(memory),
        "pids_max": None if pids == "max" else int(pids),
        "cpu_quota_us": None if quota in ("max", "-1") else int(quota),
        "cpu_period_us": int(period),
    }


def cgroup_counter(pid, controller, v1_name, v2_name, key) -> int:
    """Return one "key value" line of a flat-keyed cgroup file as an int."""
    text = read_cgroup_file(cgroup_dirs(pid), controller, v1_name, v2_name)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    raise AssertionError(f"{key} is missing from {controller} {v1_name}/{v2_name}:"
                         f" {text!r}")


def execute(host_dockerd, name, script):
    """Run a busybox sh script in the container as its user; return the result."""
    return host_dockerd.docker("exec", name, "/bin/busybox", "sh", "-c", script,
                               check=False, timeout=120)


# === Limits in the cgroup files ===

def test_limits_reach_container_cgroup(operator, host_dockerd, registry, image,
                                       callbacks):
    name = deploy_app(operator, registry, image, callbacks,
                      {"memory_mb": 96, "cpu_percent": 25})
    limits = cgroup_limits(container_pid(host_dockerd, name))
    assert limits["memory_bytes"] == 96 << 20
    assert limits["pids_max"] == PIDS_LIMIT
    assert limits["cpu_quota_us"] is not None
    # 25 % of one CPU: a quarter of each period.
    assert limits["cpu_quota_us"] * 4 == limits["cpu_period_us"]


def test_no_limits_leaves_only_pids_limit(operator, host_dockerd, registry,
                                          image, callbacks):
    name = deploy_app(operator, registry, image, callbacks, None)
    limits = cgroup_limits(container_pid(host_dockerd, name))
    assert limits["memory_bytes"] is None
    assert limits["cpu_quota_us"] is None
    assert limits["pids_max"] == PIDS_LIMIT


# === Limits enforced ===

def test_fork_past_pids_limit_fails(operator, host_dockerd, registry, image,
                                    callbacks):
    name = deploy_app(operator, registry, image, callbacks, None)
    # Each background sleep is one more process in the container's cgroup.
    # The loop goes past the limit and stops at the first failed fork.
    script = ('n=0; pids=""; '
              f'while [ "$n" -lt {PIDS_LIMIT + 100} ]; do '
              '/bin/busybox sleep 600 & pids="$pids $!"; n=$((n + 1)); done; '
              'echo "started $n"')
    result = execute(host_dockerd, name, script)
    # busybox sh ends a non-interactive script when fork fails, so the
    # "started" line never comes. Kill what the loop left behind.
    execute(host_dockerd, name, "/bin/busybox pkill sleep")
    assert "can't fork" in result.stderr, (result.returncode, result.stderr[-500:])
    assert "started" not in result.stdout
    assert result.returncode != 0


def test_allocation_past_memory_limit_is_oom_killed(operator, host_dockerd,
                                                    registry, image, callbacks):
    name = deploy_app(operator, registry, image, callbacks, {"memory_mb": 32})
    pid = container_pid(host_dockerd, name)
    before = cgroup_counter(pid, "memory", "memory.oom_control", "memory.events",
                            "oom_kill")
    # dd allocates its block size as one buffer and fills it from /dev/zero.
    small = execute(host_dockerd, name,
                    "/bin/busybox dd if=/dev/zero of=/dev/null bs=8M count=1")
    assert small.returncode == 0, small.stderr
    large = execute(host_dockerd, name,
                    "/bin/busybox dd if=/dev/zero of=/dev/null bs=64M count=1")
    # 137 = 128 + SIGKILL, the kernel's OOM killer.
    assert large.returncode == 137, (large.returncode, large.stderr)
    after = cgroup_counter(pid, "memory", "memory.oom_control", "memory.events",
                           "oom_kill")
    assert after > before
    assert container_pid(host_dockerd, name) == pid


def test_busy_loop_past_cpu_quota_is_throttled(operator, host_dockerd, registry,
                                               image, callbacks):
    name = deploy_app(operator, registry, image, callbacks, {"cpu_percent": 10})
    pid = container_pid(host_dockerd, name)
    before = cgroup_counter(pid, "cpu", "cpu.stat", "cpu.stat", "nr_throttled")
    # A busy loop uses all of a 10 % quota early in each period, and the
    # kernel then throttles the cgroup for the rest of it. Without a quota
    # nr_throttled stays 0 however long the loop runs. Up to 10 rounds of
    # 1 s, because on a loaded host the loop may get little CPU at first.
    throttled = before
    for _ in range(10):
        execute(host_dockerd, name,
                "/bin/busybox timeout 1 /bin/busybox sh -c 'while :; do :; done'")
        throttled = cgroup_counter(pid, "cpu", "cpu.stat", "cpu.stat",
                                   "nr_throttled")
        if throttled > before:
            break
    assert throttled > before

