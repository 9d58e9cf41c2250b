"""Packaging: the operator's unit, the .deb, and install/uninstall on a host.

The static tests check the unit file, the package's fields, files and
maintainer scripts. The install tests run dpkg and `crate_operator.py
install` for real, in a sandbox booted by tests/sandbox/ns-init-overlay.sh:
the same isolation as the other modules, plus a root file system that is an
overlay of the host's / with a tmpfs upper layer. Everything the installers
write lands in that layer and vanishes with the sandbox, and each install
test checks afterwards that the host has none of the installed paths and
that no process of the sandbox is left.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

import harness

sys.path.insert(0, harness.REPO_DIR)
import crate_operator as co  # noqa: E402  (the repository root is added above)

UNIT = co.SERVICE_NAME
UNIT_FILE = os.path.join(harness.REPO_DIR, "crate-operator.service")
DEB_DIR = os.path.join(harness.REPO_DIR, "packaging", "deb")
MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")
NS_INIT_OVERLAY = os.path.join(harness.TESTS_DIR, "sandbox",
                               "ns-init-overlay.sh")
DEPLOY = "/v1/app/instance/binary/deploy"
# Paths an installation writes. None of them may appear on the test host.
HOST_PATHS = ("/usr/bin/crate-operator", "/usr/local/bin/crate-operator",
              "/usr/lib/crate-operator", "/usr/local/lib/crate-operator",
              "/etc/crate-operator",
              "/etc/systemd/system/crate-operator.service",
              "/lib/systemd/system/crate-operator.service")
# systemd-analyze security exposure of the unit on systemd 252 (0 is the
# best, 10 the worst); the README quotes this number.
MAX_EXPOSURE = 1.8
# App ids of this module; other modules use other ranges.
APP_IDS = iter(range(880000, 881000))

# Every file of the package with its mode, as dpkg-deb -c prints them.
DEB_FILES = {
    "./usr/bin/crate-operator": "-rwxr-xr-x",
    "./usr/lib/crate-operator/crate_operator.py": "-rw-r--r--",
    "./lib/systemd/system/crate-operator.service": "-rw-r--r--",
    "./etc/crate-operator/config.json": "-rw-------",
    "./usr/share/doc/crate-operator/copyright": "-rw-r--r--",
    "./usr/share/doc/crate-operator/changelog.gz": "-rw-r--r--",
    "./usr/share/man/man1/crate-operator.1.gz": "-rw-r--r--",
    "./usr/share/lintian/overrides/crate-operator": "-rw-r--r--",
}


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    """Run argv, capturing text output, without raising on failure."""
    return subprocess.run(argv, capture_output=True, text=True, check=False,
                          **kwargs)


def need_tool(name: str) -> None:
    """Skip the test when the command name is not installed."""
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")


# === Unit file ===

def test_unit_file_matches_program_output():
    result = run([sys.executable, harness.OPERATOR_SCRIPT, "unit"])
    assert result.returncode == 0, result.stderr
    with open(UNIT_FILE, encoding="utf-8") as handle:
        assert handle.read() == result.stdout, (
            "crate-operator.service differs from `crate_operator.py unit`; "
            "regenerate it with: python3 crate_operator.py unit "
            "> crate-operator.service")


def test_unit_program_option():
    result = run([sys.executable, harness.OPERATOR_SCRIPT, "unit",
                  "--program", "/opt/crate/bin/crate-operator"])
    assert result.returncode == 0, result.stderr
    assert ("ExecStart=/usr/bin/python3 -I /opt/crate/bin/crate-operator "
            "serve --config /etc/crate-operator/config.json\n") in result.stdout


def test_unit_rejects_unsafe_program_path():
    result = run([sys.executable, harness.OPERATOR_SCRIPT, "unit",
                  "--program", "/opt/my crate/run"])
    assert result.returncode == 1
    assert "/opt/my crate/run" in result.stderr


def test_unit_directives():
    text = co.render_operator_unit()
    for line in ("Type=notify", "Restart=on-failure", "KillMode=mixed",
                 "SyslogIdentifier=crate-operator", "ProtectSystem=strict",
                 "StateDirectory=crate-operator",
                 "ReadWritePaths=/etc/systemd/system -/srv/crate-apps",
                 "WantedBy=multi-user.target"):
        assert line + "\n" in text, line
    # Output goes to the journal: no StandardOutput= redirects it elsewhere.
    assert "StandardOutput=" not in text
    assert "StandardError=" not in text


def test_unit_verify_prints_nothing():
    need_tool("systemd-analyze")
    # verify exits 0 even when it warns, so any output is a failure.
    result = run(["systemd-analyze", "verify", UNIT_FILE])
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


def test_unit_security_exposure():
    need_tool("systemd-analyze")
    result = run(["systemd-analyze", "security", "--offline=yes", UNIT_FILE])
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)",
                      result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


# === Install and uninstall checks that change nothing ===

def test_install_requires_root(monkeypatch):
    monkeypatch.setattr(co.os, "geteuid", lambda: 1000)
    with pytest.raises(co.InstallError, match="root"):
        co.install_host()
    with pytest.raises(co.InstallError, match="root"):
        co.uninstall_host()


def test_install_rejects_invalid_port(monkeypatch):
    monkeypatch.setattr(co, "_check_install_host", lambda: None)
    with pytest.raises(co.InstallError, match="--port 70000"):
        co.install_host(70000)


def test_initial_config_holds_no_secret():
    config = json.loads(co.initial_config(9000))
    assert config == {
        "listen": "127.0.0.1:9000",
        "token_file": "/etc/crate-operator/token",
        "callback_secret_file": "/etc/crate-operator/callback_secret",
    }


# === Debian package ===

@pytest.fixture(scope="module")
def deb_path(tmp_path_factory) -> str:
    """Build the .deb with `make deb` into a temporary build dir."""
    need_tool("dpkg-deb")
    build_dir = str(tmp_path_factory.mktemp("build"))
    result = run(["make", "-s", "-C", harness.REPO_DIR, "deb",
                  f"BUILD_DIR={build_dir}", f"PYTHON={sys.executable}"])
    assert result.returncode == 0, result.stdout + result.stderr
    path = os.path.join(build_dir, f"crate-operator_{co.__version__}_all.deb")
    assert result.stdout.strip().splitlines()[-1] == path
    return path


@pytest.fixture(scope="module")
def deb_tree(deb_path, tmp_path_factory) -> str:
    """The package's files and control files, extracted with dpkg-deb."""
    tree = str(tmp_path_factory.mktemp("deb-tree"))
    subprocess.run(["dpkg-deb", "-x", deb_path, tree], check=True)
    subprocess.run(["dpkg-deb", "-e", deb_path,
                    os.path.join(tree, "DEBIAN")], check=True)
    return tree


def test_deb_control_fields(deb_path):
    result = run(["dpkg-deb", "-f", deb_path])
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines()
                  if not line.startswith(" ") and ": " in line)
    assert fields["Package"] == "crate-operator"
    assert fields["Version"] == co.__version__
    assert fields["Architecture"] == "all"
    assert "python3 (>= 3.9)" in fields["Depends"]
    assert "passwd" in fields["Depends"]
    assert fields["Maintainer"]
    assert fields["Installed-Size"].isdigit()
    assert fields["Description"]


def test_deb_contents(deb_path):
    result = run(["dpkg-deb", "-c", deb_path])
    assert result.returncode == 0, result.stderr
    files = {}
    for line in result.stdout.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        assert owner == "root/root", line
        if not mode.startswith("d"):
            files[path] = mode
    assert files == DEB_FILES


def test_deb_files_come_from_program(deb_tree):
    with open(harness.OPERATOR_SCRIPT, "rb") as handle:
        program = handle.read()
    module = os.path.join(deb_tree, "usr/lib/crate-operator/crate_operator.py")
    with open(module, "rb") as f:
        assert f.read() == program
    with open(os.path.join(deb_tree, "usr/bin/crate-operator"), "rb") as f:
        assert f.read() == co.render_launcher(co.PACKAGE_LIB_DIR).encode()
    with open(os.path.join(deb_tree, "lib/systemd/system", UNIT), "rb") as f:
        unit = f.read()
    with open(UNIT_FILE, "rb") as handle:
        assert unit == handle.read()
    with open(os.path.join(deb_tree, "etc/crate-operator/config.json"),
              "rb") as handle:
        assert handle.read() == co.initial_config()


def test_deb_conffiles_and_scripts(deb_tree):
    control = os.path.join(deb_tree, "DEBIAN")
    with open(os.path.join(control, "conffiles"), encoding="utf-8") as f:
        assert f.read() == "/etc/crate-operator/config.json\n"
    for name in MAINTAINER_SCRIPTS:
        mode = stat.S_IMODE(os.stat(os.path.join(control, name)).st_mode)
        assert mode == 0o755, name
    with open(os.path.join(control, "md5sums"), encoding="utf-8") as f:
        listed = sorted(line.split()[1] for line in f)
    assert listed == sorted(path[2:] for path in DEB_FILES
                            if not path.startswith("./etc/"))


def test_maintainer_scripts_pass_shellcheck(packages):
    need_tool("shellcheck")
    paths = [os.path.join(DEB_DIR, name) for name in MAINTAINER_SCRIPTS]
    result = run(["shellcheck", "--shell=sh", *paths])
    assert result.returncode == 0, result.stdout + result.stderr


def test_deb_lintian_clean(deb_path, packages):
    need_tool("lintian")
    result = run(["lintian", "--fail-on", "error,warning", deb_path])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    tags = [line for line in result.stdout.splitlines()
            if line[:2] in ("E:", "W:")]
    assert tags == []


def test_deb_build_is_reproducible(tmp_path):
    need_tool("dpkg-deb")
    digests = []
    for name in ("one", "two"):
        out = tmp_path / name
        env = dict(os.environ, OUT_DIR=str(out), PYTHON=sys.executable,
                   SOURCE_DATE_EPOCH="1700000000")
        result = run(["sh", os.path.join(DEB_DIR, "build-deb.sh")], env=env)
        assert result.returncode == 0, result.stderr
        with open(result.stdout.strip(), "rb") as handle:
            digests.append(hashlib.sha256(handle.read()).hexdigest())
    assert digests[0] == digests[1]


# === Disposable root: helpers ===

def host_paths_present() -> list:
    """Return the installed paths that exist on the host."""
    return [path for path in HOST_PATHS if os.path.lexists(path)]


def pid_namespace_processes(ns_link: str) -> list:
    """Return host pids of the processes in the pid namespace ns_link."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") == ns_link:
                found.append(int(name))
        except OSError:
            continue
    return found


@pytest.fixture
def root_box(packages):
    """A sandbox whose / is a disposable overlay; checks the host afterwards."""
    if not harness.is_root():
        pytest.skip("needs root: the sandbox uses namespaces, mounts and "
                    "cgroups")
    before = host_paths_present()
    assert before == [], f"the host already has {before}; remove them first"
    shared = harness.make_shared_dir()
    box = harness.SystemdSandbox(shared, ns_init=NS_INIT_OVERLAY)
    ns_link = None
    try:
        box.start()
        ns_link = os.readlink(f"/proc/{box.pid}/ns/pid")
        yield box
    finally:
        box.stop()
        left = pid_namespace_processes(ns_link) if ns_link else []
        mounts = harness.mounts_under(shared)
        if not mounts and not os.environ.get("CRATE_TEST_KEEP"):
            harness.remove_shared_dir(shared)
    assert left == [], "processes of the sandbox are still running"
    assert mounts == [], "mounts are left below the shared dir"
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        assert "sbx-root" not in handle.read()
    assert not os.path.exists(box.cgroup)
    assert host_paths_present() == []


def inside(box, path: str) -> str:
    """Return the host path of a path inside the sandbox's root."""
    return f"/proc/{box.pid}/root{path}"


def read_inside(box, path: str) -> str:
    """Return the text of a file inside the sandbox's root."""
    with open(inside(box, path), encoding="utf-8") as handle:
        return handle.read()


def write_inside(box, path: str, text: str, mode: int = 0o644) -> None:
    """Write a file inside the sandbox's root (its overlay layer)."""
    target = inside(box, path)
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(target, mode)


def mode_inside(box, path: str) -> int:
    """Return the permission bits of a path inside the sandbox's root."""
    return stat.S_IMODE(os.stat(inside(box, path)).st_mode)


def assert_runs_from_bytecode(box, module: str) -> None:
    """Assert that the box's python3 finds current bytecode of module.

    The header of a .pyc contains the magic number of the Python version that
    wrote it and the mtime and size of its source. The import uses the file
    only when all three match (PEP 552, timestamp-based).
    """
    probe = box.run("/usr/bin/python3", "-I", "-c",
                    "import importlib.util, sys; "
                    "print(sys.implementation.cache_tag, "
                    "importlib.util.MAGIC_NUMBER.hex())").stdout.split()
    tag, magic = probe
    cache = os.path.join(os.path.dirname(module), "__pycache__",
                         f"crate_operator.{tag}.pyc")
    assert os.path.exists(inside(box, cache)), (
        f"{cache} is missing, so the service compiles the module at every "
        f"start")
    with open(inside(box, cache), "rb") as handle:
        header = handle.read(16)
    source = os.stat(inside(box, module))
    assert header[:4].hex() == magic
    assert int.from_bytes(header[4:8], "little") == 0
    assert int.from_bytes(header[8:12], "little") == \
        int(source.st_mtime) & 0xFFFFFFFF
    assert int.from_bytes(header[12:16], "little") == source.st_size


def set_policy_rc(box, exit_code: int) -> None:
    """Let (0) or forbid (101) service starts from maintainer scripts."""
    write_inside(box, "/usr/sbin/policy-rc.d",
                 f"#!/bin/sh\nexit {exit_code}\n", 0o755)


def service_state(box) -> tuple:
    """Return (is-active, is-enabled) of the operator's unit."""
    active = box.systemctl("is-active", UNIT, check=False).stdout.strip()
    enabled = box.systemctl("is-enabled", UNIT, check=False).stdout.strip()
    return active, enabled


def sandbox_config(caddy, port: int) -> dict:
    """Return a config.json for the sandbox that uses the shared Caddy.

    caddy_server and caddy_listen match the other modules' operators, so
    this operator adds its route to the same server instead of moving
    Caddy onto :443.
    """
    config = json.loads(co.initial_config(port))
    config.update({
        "caddy_admin": caddy.admin_url,
        "caddy_server": "crate",
        "caddy_listen": [f"127.0.0.1:{caddy.listen_port}"],
        "caddy_automatic_https": False,
        "server_id": "packaging-test",
        "health_interval_s": 0.1,
        "health_grace_s": 0.5,
    })
    return config


def api(port: int, method: str, path: str, token: str | None = None,
        body: dict | None = None) -> tuple:
    """Send one request to the operator on 127.0.0.1:port; return (status, body)."""
    headers = {}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, json.loads(raw) if raw else None


def wait_deployment(port: int, token: str, deployment_id: int,
                    timeout: float = 60.0) -> dict:
    """Poll the status endpoint until the deployment reaches a final state."""
    deadline = time.monotonic() + timeout
    path = f"/v1/app/instance/deploy/{deployment_id}/status"
    while True:
        status, document = api(port, "GET", path, token)
        if status == 200 and document["state"] in co.STATES_TERMINAL:
            return document
        assert time.monotonic() < deadline, (status, document)
        time.sleep(0.1)


def through_caddy(caddy, domain: str, path: str = "/") -> tuple:
    """GET path with Host: domain through Caddy; return (status, text)."""
    conn = http.client.HTTPConnection("127.0.0.1", caddy.listen_port,
                                      timeout=5)
    try:
        conn.request("GET", path, headers={"Host": domain})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def dpkg_argv(*args: str) -> list:
    """Return the argv of dpkg without prompts."""
    return ["env", "DEBIAN_FRONTEND=noninteractive", "dpkg", *args]


def dpkg(box, *args: str) -> subprocess.CompletedProcess:
    """Run dpkg inside the sandbox."""
    return box.run(*dpkg_argv(*args), check=False, timeout=120)


def copy_package(box, deb_path: str) -> str:
    """Copy the .deb into the shared dir and return its path there.

    Also switches off the man-db trigger in the sandbox's /var, which
    rebuilds the manual page index for several seconds per dpkg call.
    """
    box.run("rm", "-f", "/var/lib/man-db/auto-update")
    package = os.path.join(box.shared_dir, os.path.basename(deb_path))
    shutil.copy(deb_path, package)
    return package


# === Disposable root: the Debian package ===

def test_deb_install_starts_and_deploys(root_box, deb_path, caddy,
                                        asset_server, callbacks):
    box = root_box
    package = copy_package(box, deb_path)
    # The start is left to `systemctl start` below, after the config
    # points at the test's Caddy.
    set_policy_rc(box, 101)
    result = dpkg(box, "-i", package)
    assert result.returncode == 0, result.stdout + result.stderr

    assert service_state(box) == ("inactive", "enabled")
    assert_runs_from_bytecode(
        box, os.path.join(co.PACKAGE_LIB_DIR, "crate_operator.py"))
    passwd = box.run("getent", "passwd", "crate-app").stdout.split(":")
    assert passwd[0] == "crate-app"
    assert passwd[6].strip() == "/usr/sbin/nologin"
    assert mode_inside(box, "/var/lib/crate-operator") == 0o700
    assert mode_inside(box, "/srv/crate-apps") == 0o755
    for name in ("token", "callback_secret"):
        path = f"/etc/crate-operator/{name}"
        assert mode_inside(box, path) == 0o600
        assert re.fullmatch(r"[0-9a-f]{64}\n", read_inside(box, path))
    assert json.loads(read_inside(box, "/etc/crate-operator/config.json")) \
        == json.loads(co.initial_config())

    port = harness.free_port()
    write_inside(box, "/etc/crate-operator/config.json",
                 json.dumps(sandbox_config(caddy, port)), 0o600)
    start = box.systemctl("start", UNIT, check=False)
    assert start.returncode == 0, start.stderr + box.journal(UNIT)[-3000:]
    assert box.unit_property(UNIT, "ActiveState") == "active"
    assert box.unit_property(UNIT, "Type") == "notify"
    status, health = api(port, "GET", "/healthz")
    assert status == 200, health
    assert health["systemd"] is True
    assert health["caddy"] is True

    token = read_inside(box, "/etc/crate-operator/token").strip()
    secret = read_inside(box, "/etc/crate-operator/callback_secret").strip()
    app_id = next(APP_IDS)
    deployment_id = next(APP_IDS)
    asset = harness.build_asset(
        "pkg1", os.path.join(asset_server.root_dir, "sample-pkg1"))
    body = {
        "app_id": app_id, "team_id": "team-pkg", "environment_id": 1,
        "deployment_id": deployment_id, "deployment_strategy": "immediate",
        "domain": f"pkg{app_id}.example.test",
        "asset_url": asset_server.url("/" + os.path.basename(asset)),
        "target_version": "v1",
        "slots": {"blue": {"port": harness.free_port()},
                  "green": {"port": harness.free_port()}},
        "env_vars": {}, "health_check_path": "/healthz",
        "callback_url": callbacks.url(f"/cb/pkg/{app_id}"),
    }
    try:
        status, answer = api(port, "POST", DEPLOY, token, body)
        assert status == 202, answer
        document = wait_deployment(port, token, deployment_id)
        assert document["state"] == "succeeded", (
            document, box.journal()[-4000:])
        status, text = through_caddy(caddy, body["domain"])
        assert status == 200
        assert text.startswith("pkg1 version=v1")
        status, whoami = through_caddy(caddy, body["domain"], "/whoami")
        uid = int(box.run("id", "-u", "crate-app").stdout)
        assert json.loads(whoami)["uid"] == uid

        records = callbacks.wait_for(
            lambda rs: [r for r in rs if r.path == f"/cb/pkg/{app_id}"
                        and b"deployment.succeeded" in r.body])
        for record in records:
            assert record.headers["X-Crate-Signature"] == \
                harness.sign(secret, record.body)
        journal = box.journal(UNIT)
        assert "event=operator.listening" in journal
        assert "event=http.request" in journal
    finally:
        caddy.request("DELETE", f"/id/crate-app-{app_id}")


def test_deb_upgrade_remove_and_purge(root_box, deb_path, caddy):
    box = root_box
    package = copy_package(box, deb_path)
    # A config from before the installation is kept (--force-confold), so
    # postinst starts the service on a free port instead of 8750.
    port = harness.free_port()
    box.run("mkdir", "-p", "/etc/crate-operator")
    write_inside(box, "/etc/crate-operator/config.json",
                 json.dumps(sandbox_config(caddy, port)), 0o600)
    set_policy_rc(box, 0)
    result = dpkg(box, "--force-confold", "-i", package)
    assert result.returncode == 0, result.stdout + result.stderr
    assert service_state(box) == ("active", "enabled")
    assert api(port, "GET", "/healthz")[0] == 200
    token = read_inside(box, "/etc/crate-operator/token")
    first_pid = box.unit_property(UNIT, "MainPID")

    # The same version again runs postinst as an upgrade: a restart, and
    # the secrets stay.
    result = dpkg(box, "--force-confold", "-i", package)
    assert result.returncode == 0, result.stdout + result.stderr
    assert service_state(box)[0] == "active"
    assert box.unit_property(UNIT, "MainPID") != first_pid
    assert read_inside(box, "/etc/crate-operator/token") == token

    install = box.run("/usr/bin/python3", "-I", "/usr/bin/crate-operator",
                      "install", check=False)
    assert install.returncode == 1
    assert "Debian package" in install.stderr

    result = dpkg(box, "-r", "crate-operator")
    assert result.returncode == 0, result.stdout + result.stderr
    assert service_state(box)[0] == "inactive"
    assert not os.path.exists(inside(box, "/usr/bin/crate-operator"))
    # prerm removed the bytecode, so dpkg could remove the directory.
    assert not os.path.exists(inside(box, co.PACKAGE_LIB_DIR))
    assert os.path.exists(inside(box, "/etc/crate-operator/token"))
    assert os.path.isdir(inside(box, "/var/lib/crate-operator"))

    result = dpkg(box, "--purge", "crate-operator")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not os.path.exists(inside(box, "/etc/crate-operator"))
    assert not os.path.exists(inside(box, "/var/lib/crate-operator"))
    wants = inside(box, "/etc/systemd/system/multi-user.target.wants/" + UNIT)
    assert not os.path.lexists(wants)
    # Deployed apps may still run, so their user and directory stay.
    assert box.run("getent", "passwd", "crate-app", check=False).returncode == 0
    assert os.path.isdir(inside(box, "/srv/crate-apps"))


def test_deb_install_without_running_systemd(root_box, deb_path):
    box = root_box
    package = copy_package(box, deb_path)
    set_policy_rc(box, 0)
    # An empty /run in a child mount namespace looks like a chroot or an
    # image build: no /run/systemd/system, so postinst must not call
    # systemctl, and only the enable links are made.
    result = box.run(
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mount -t tmpfs sbx-empty-run /run && exec "$@"', "sh",
        *dpkg_argv("-i", package), check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert service_state(box) == ("inactive", "enabled")
    assert os.path.exists(inside(box, "/etc/crate-operator/token"))


# === Disposable root: crate_operator.py install ===

def test_install_twice_then_uninstall_twice(root_box):
    box = root_box
    program = os.path.join(box.shared_dir, "crate_operator.py")
    shutil.copy(harness.OPERATOR_SCRIPT, program)
    port = harness.free_port()
    command = ["/usr/bin/python3", "-I", program]

    first = box.run(*command, "install", "--port", str(port), check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    for line in ("wrote /usr/local/lib/crate-operator/crate_operator.py",
                 "wrote /usr/local/bin/crate-operator",
                 "wrote /etc/systemd/system/crate-operator.service",
                 "wrote /etc/crate-operator/config.json",
                 "generated /etc/crate-operator/token",
                 "created system user crate-app",
                 "enabled crate-operator.service",
                 "started crate-operator.service"):
        assert line in first.stdout.splitlines(), line
    assert service_state(box) == ("active", "enabled")
    assert box.unit_property(UNIT, "Type") == "notify"
    status, health = api(port, "GET", "/healthz")
    assert health["systemd"] is True, (status, health)
    with open(harness.OPERATOR_SCRIPT, "rb") as handle:
        program_bytes = handle.read()
    module = os.path.join(co.LOCAL_LIB_DIR, "crate_operator.py")
    with open(inside(box, module), "rb") as handle:
        assert handle.read() == program_bytes
    assert mode_inside(box, module) == 0o644
    with open(inside(box, co.LOCAL_PROGRAM), encoding="utf-8") as handle:
        assert handle.read() == co.render_launcher(co.LOCAL_LIB_DIR)
    assert mode_inside(box, co.LOCAL_PROGRAM) == 0o755
    assert_runs_from_bytecode(box, module)
    unit_text = read_inside(box, "/etc/systemd/system/" + UNIT)
    assert unit_text == co.render_operator_unit(co.LOCAL_PROGRAM)
    assert mode_inside(box, "/etc/crate-operator/config.json") == 0o600
    config = json.loads(read_inside(box, "/etc/crate-operator/config.json"))
    assert config["listen"] == f"127.0.0.1:{port}"
    token = read_inside(box, "/etc/crate-operator/token")
    main_pid = box.unit_property(UNIT, "MainPID")

    second = box.run(*command, "install", "--port", "1", check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing changed" in second.stdout
    assert "wrote" not in second.stdout
    assert read_inside(box, "/etc/crate-operator/token") == token
    assert box.unit_property(UNIT, "MainPID") == main_pid
    config = json.loads(read_inside(box, "/etc/crate-operator/config.json"))
    assert config["listen"] == f"127.0.0.1:{port}"

    # Restart=on-failure: a killed operator comes back after RestartSec.
    box.systemctl("kill", "--signal=SIGKILL", UNIT)
    deadline = time.monotonic() + 30
    while box.unit_property(UNIT, "NRestarts") != "1" or \
            box.unit_property(UNIT, "ActiveState") != "active":
        assert time.monotonic() < deadline, box.journal(UNIT)[-3000:]
        time.sleep(0.2)
    assert box.unit_property(UNIT, "MainPID") != main_pid

    first = box.run(co.LOCAL_PROGRAM, "uninstall", check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped and disabled crate-operator.service" in first.stdout
    assert service_state(box)[0] == "inactive"
    assert not os.path.exists(inside(box, co.LOCAL_PROGRAM))
    assert not os.path.exists(inside(box, co.LOCAL_LIB_DIR))
    assert not os.path.exists(inside(box, "/etc/systemd/system/" + UNIT))
    assert os.path.exists(inside(box, "/etc/crate-operator/config.json"))
    assert os.path.isdir(inside(box, "/var/lib/crate-operator"))

    second = box.run(*command, "uninstall", check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing changed" in second.stdout

    purge = box.run(*command, "uninstall", "--purge", check=False)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not os.path.exists(inside(box, "/etc/crate-operator"))
    assert not os.path.exists(inside(box, "/var/lib/crate-operator"))
