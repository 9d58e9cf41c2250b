"""Test harness that runs crate-operator against real systemd, Caddy and HTTP peers.

Nothing here depends on pytest, so tests/demo.py uses the same classes.

Parts, in the order a test usually starts them:

- ensure_packages(): installs missing Debian packages (root only).
- make_shared_dir() / remove_shared_dir(): a /srv/crate-test-<hex> tree that
  the host, the sandboxed systemd and DynamicUser app processes all see.
- SystemdSandbox: systemd as PID 1 of private pid, mount, uts, ipc and
  cgroup namespaces (tests/sandbox/ns-init.sh), reached with nsenter.
- CaddyProcess: a host `caddy run` with its admin API on 127.0.0.1.
- AssetServer: serves release files, counts requests, injects faults.
- CallbackReceiver: records the operator's callback POSTs and can respond
  with a 5xx status.
- RequestLoop: sequential GETs through Caddy, counting failed requests.
- OperatorProcess: runs crate_operator.py with a generated config.
- DockerDaemon, RegistryProcess: dockerd as a unit inside the sandbox and a
  private docker-registry on 127.0.0.1, for docker deploys.

All network traffic goes to 127.0.0.1. Every process starts in its own
session, and each class has stop() to end what it started.
"""

from __future__ import annotations

import base64
import collections
import datetime
import glob
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterable

# === Paths and tunables ===

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
OPERATOR_SCRIPT = os.path.join(REPO_DIR, "crate_operator.py")
NS_INIT = os.path.join(TESTS_DIR, "sandbox", "ns-init.sh")
SAMPLE_APP = os.path.join(TESTS_DIR, "apps", "sample_app.py")

# The operator and the sample app run on Debian's interpreter, as on a host.
SYSTEM_PYTHON = "/usr/bin/python3"

# Debian packages that the tests and the demo call. python3 provides the
# sample app's interpreter, and iproute2 the `ip` command of the dockerd unit.
REQUIRED_PACKAGES = (
    "caddy", "docker.io", "docker-registry", "busybox-static", "apache2-utils",
    "wrk", "shellcheck", "lintian", "python3", "iproute2",
)

SHARED_BASE = "/srv"
SHARED_PREFIX = "crate-test-"
LOG_TAIL_LINES = 40

# Field of the operator's status document that wait_state() compares.
STATE_FIELD = "state"
INSTANCE_STATUS_PATH = "/v1/app/instance/deploy/%s/status"
LEGACY_STATUS_PATH = "/v1/app/deploy/%s/status"

_DEFAULT = object()


# === Small helpers ===

# Range of the ports free_port hands out, below Linux's ephemeral range
# (32768-60999 by default). A port from the ephemeral range can become the
# local end of an outgoing connection a moment later, and the app that should
# bind it then fails. The range also avoids the operator's default range for
# bluegreen siblings (20000-29999).
FREE_PORT_RANGE = (10000, 19999)
_handed_out: set = set()
_handed_out_lock = threading.Lock()
# A generator of its own: Hypothesis strategies call free_port, and they must
# not draw from (or reseed) the global random module.
_port_random = random.Random()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this function ran.

    Each port is handed out once per test process. NOTE: another process
    can still bind the port before the caller does.
    """
    low, high = FREE_PORT_RANGE
    with _handed_out_lock:
        for _ in range(10000):
            port = _port_random.randint(low, high)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port left in {low}-{high}")


def wait_http(url: str, timeout: float = 10.0,
              host_header: str | None = None) -> int:
    """Poll url with GET until any HTTP response arrives, and return its status.

    Raises TimeoutError with the last connection error when no response
    arrives within timeout seconds.
    """
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = {"Host": host_header} if host_header else {}
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError("no HTTP response from %s within %.1f s "
                               "(last error: %r)" % (url, timeout, last_error))
        time.sleep(0.05)


def sign(secret: str | bytes, body: bytes) -> str:
    """Return "sha256=" plus the hex HMAC-SHA256 of body under secret."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def status_seconds(text: str) -> float:
    """Return the epoch seconds of a status timestamp (RFC 3339, UTC, with
    milliseconds, as in a step's "at")."""
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def build_asset(build_name: str, dest_path: str) -> str:
    """Write a copy of the sample app whose BUILD constant is build_name.

    The copy is a raw executable with mode 0755. Returns dest_path. Raises
    ValueError when the sample app does not have exactly one BUILD line.
    """
    with open(SAMPLE_APP, encoding="utf-8") as handle:
        source = handle.read()
    marker = 'BUILD = "dev"\n'
    if source.count(marker) != 1:
        raise ValueError("%s must contain the line %r exactly once"
                         % (SAMPLE_APP, marker))
    source = source.replace(marker, "BUILD = %s\n" % json.dumps(build_name))

    parent = os.path.dirname(os.path.abspath(dest_path))
    os.makedirs(parent, exist_ok=True)
    with open(dest_path, "w", encoding="utf-8") as handle:
        handle.write(source)
    os.chmod(dest_path, 0o755)
    return dest_path


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last lines of a text file, or a note when it is missing."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(collections.deque(handle, maxlen=lines))
    except FileNotFoundError:
        return "(%s does not exist)\n" % path


def is_root() -> bool:
    """Return True when the effective uid is 0."""
    return os.geteuid() == 0


def _process_alive(pid: int) -> bool:
    """Return True when pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    # The state letter follows the command name, which is in parentheses.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop_popen(proc: subprocess.Popen | None, timeout: float,
                sig: int = signal.SIGTERM) -> int | None:
    """Send sig, wait up to timeout seconds, then SIGKILL. Return the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# === Packages ===

_apt_updated = False


def missing_packages(packages: Iterable[str] = REQUIRED_PACKAGES) -> list[str]:
    """Return the packages from the list that dpkg does not report as installed."""
    packages = list(packages)
    if shutil.which("dpkg-query") is None:
        return packages
    # dpkg-query exits 1 when a package is unknown, but stdout lists the rest.
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *packages],
        capture_output=True, text=True, check=False)
    installed = set()
    for line in result.stdout.splitlines():
        name, _, status = line.partition(" ")
        if status.startswith("ii"):
            installed.add(name)
    return [name for name in packages if name not in installed]


def ensure_packages(packages: Iterable[str] = REQUIRED_PACKAGES) -> list[str]:
    """Install missing packages with apt-get when root, and return those still missing.

    Runs `apt-get update` at most once per process. While apt-get runs,
    /usr/sbin/policy-rc.d exits 101 so that no postinst script starts a
    service (docker, caddy on :80, docker-registry on :5000). The file is
    created only when it did not exist, and only a file created here is
    removed afterwards. Raises RuntimeError when apt-get fails.
    """
    global _apt_updated
    missing = missing_packages(packages)
    if not missing or not is_root() or shutil.which("apt-get") is None:
        return missing

    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = "/usr/sbin/policy-rc.d"
    created_policy = False
    if not os.path.lexists(policy):
        with open(policy, "w", encoding="ascii") as handle:
            handle.write("#!/bin/sh\n# Written by crate-operator tests/harness.py\n"
                         "exit 101\n")
        os.chmod(policy, 0o755)
        created_policy = True
    try:
        if not _apt_updated:
            _run_apt(["apt-get", "update"], env)
            _apt_updated = True
        _run_apt(["apt-get", "install", "-y", *missing], env)
    finally:
        if created_policy:
            os.unlink(policy)
    return missing_packages(packages)


def _run_apt(argv: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(argv, env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError("%s failed with exit code %d:\n%s"
                           % (" ".join(argv), result.returncode,
                              result.stderr[-4000:]))


# === Shared directory ===

def make_shared_dir(base: str = SHARED_BASE) -> str:
    """Create <base>/crate-test-<hex> with subdirs units, apps, www, caddy and dk.

    The default base is /srv because a unit with PrivateTmp= or DynamicUser=
    gets its own /tmp, and /var is an overlay inside the sandbox, so files
    below either are not where the host wrote them. Mode 0755 lets
    DynamicUser app processes traverse the tree.
    """
    os.makedirs(base, mode=0o755, exist_ok=True)
    path = os.path.join(base, SHARED_PREFIX + secrets.token_hex(4))
    os.mkdir(path)
    os.chmod(path, 0o755)  # mkdir applies the umask
    for name in ("units", "apps", "www", "caddy", "dk"):
        os.mkdir(os.path.join(path, name))
        os.chmod(os.path.join(path, name), 0o755)
    return path


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mounts_under(path: str) -> list[str]:
    """Return the mount points in /proc/self/mountinfo at or below path."""
    prefix = os.path.abspath(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            # Field 5 is the mount point. The kernel writes space, tab,
            # newline and backslash in it as octal escapes.
            point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)),
                                      line.split()[4])
            if point == prefix[:-1] or point.startswith(prefix):
                found.append(point)
    return found


def remove_shared_dir(path: str) -> None:
    """Delete a dir made by make_shared_dir when nothing is mounted below it.

    Raises RuntimeError and deletes nothing when a mount is below path
    (rmtree would descend into it) or when path is not a crate-test dir.
    """
    name = os.path.basename(path.rstrip("/"))
    if not name.startswith(SHARED_PREFIX):
        raise RuntimeError("not deleting %s: the name does not start with %s"
                           % (path, SHARED_PREFIX))
    mounts = mounts_under(path)
    if mounts:
        raise RuntimeError("not deleting %s: mounts below it: %s"
                           % (path, ", ".join(mounts)))
    shutil.rmtree(path)


# === systemd sandbox ===

def cgroup_root() -> str:
    """Return the cgroup2 mount point: /sys/fs/cgroup/unified on hybrid hosts."""
    if os.path.isdir("/sys/fs/cgroup/unified"):
        return "/sys/fs/cgroup/unified"
    return "/sys/fs/cgroup"


class SystemdSandbox:
    """systemd as PID 1 of private namespaces that share the host network.

    Callers use start(), stop(), run(), systemctl(), systemctl_prefix(),
    write_unit(), unit_property() and journal(). Attributes: pid (host pid
    of the sandbox's systemd), cgroup (its cgroup2 dir), boot_seconds and
    stop_seconds (measured wall time).

    The launcher joins a new cgroup sbx-<shared dir name>, then runs unshare
    under `setpriv --pdeathsig KILL`. So the sandbox dies with the thread
    that started it, also when the test runner is killed with SIGKILL.
    NOTE: call start() from a thread that outlives the sandbox, such as the
    main thread that runs pytest fixtures.
    """

    def __init__(self, shared_dir: str, ns_init: str = NS_INIT) -> None:
        self.shared_dir = shared_dir
        self.ns_init = ns_init
        self.cgroup = os.path.join(cgroup_root(),
                                   "sbx-" + os.path.basename(shared_dir))
        self.log_path = os.path.join(shared_dir, "ns-init.log")
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.boot_seconds: float | None = None
        self.stop_seconds: float | None = None

    def __enter__(self) -> SystemdSandbox:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Boot the sandbox and wait until systemd reports running or degraded.

        On any failure it stops what it started before raising.
        """
        started = time.monotonic()
        try:
            self._launch()
            self._wait_for_manager(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started

    def _launch(self) -> None:
        os.makedirs(self.cgroup, exist_ok=True)
        os.makedirs(os.path.join(self.shared_dir, "units"), exist_ok=True)
        env = {
            "SBX_DIR": self.shared_dir,
            "SBX_HOST_MNTNS": os.readlink("/proc/self/ns/mnt"),
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        # A shell joins the cgroup and then execs the launcher, because
        # preexec_fn is unsafe while the test process runs server threads.
        join_cgroup = 'echo $$ > "$1" && shift && exec "$@"'
        argv = [
            "/bin/sh", "-c", join_cgroup, "sbx-join-cgroup",
            os.path.join(self.cgroup, "cgroup.procs"),
            "setpriv", "--pdeathsig", "KILL",
            "unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts",
            "--ipc", "--cgroup", "--propagation", "private", "--mount-proc",
            "/bin/sh", self.ns_init, "systemd",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for_manager(self, deadline: float) -> None:
        assert self.proc is not None
        children_file = "/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)
        while self.pid is None:
            self._check_launcher(deadline, "the sandbox PID 1 did not start")
            try:
                with open(children_file, encoding="ascii") as handle:
                    children = handle.read().split()
            except FileNotFoundError:
                children = []
            if children:
                self.pid = int(children[0])
            else:
                time.sleep(0.01)

        private_socket = "/proc/%d/root/run/systemd/private" % self.pid
        while not os.path.exists(private_socket):
            self._check_launcher(deadline, "systemd did not open its private socket")
            time.sleep(0.01)

        remaining = max(1.0, deadline - time.monotonic())
        result = self.run("systemctl", "is-system-running", "--wait",
                          check=False, timeout=remaining)
        state = result.stdout.strip()
        if state not in ("running", "degraded"):
            raise RuntimeError("sandbox systemd state is %r, expected running:\n%s\n%s"
                               % (state, result.stderr, log_tail(self.log_path)))

    def _check_launcher(self, deadline: float, problem: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError("%s: the launcher exited with %s. %s ends with:\n%s"
                               % (problem, self.proc.returncode, self.log_path,
                                  log_tail(self.log_path)))
        if time.monotonic() > deadline:
            raise TimeoutError("%s (timed out). %s ends with:\n%s"
                               % (problem, self.log_path, log_tail(self.log_path)))

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the sandbox namespaces and return the completed process."""
        if self.pid is None:
            raise RuntimeError("the sandbox is not running")
        command = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-C",
                   "--", *argv]
        return subprocess.run(command, capture_output=True, text=True, check=check,
                              timeout=timeout, input=input)

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run systemctl with args against the sandbox's systemd."""
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def systemctl_prefix(self) -> list[str]:
        """Return the argv prefix that the operator uses in place of `systemctl`."""
        if self.pid is None:
            raise RuntimeError("the sandbox is not running")
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl"]

    def write_unit(self, name: str, text: str) -> str:
        """Write a unit file to the shared units dir (/etc/systemd/system inside)."""
        path = os.path.join(self.shared_dir, "units", name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def unit_property(self, unit: str, name: str) -> str:
        """Return the value of one `systemctl show` property of unit."""
        result = self.systemctl("show", "-p", name, "--value", unit)
        return result.stdout.strip()

    def journal(self, unit: str | None = None) -> str:
        """Return the sandbox journal, which is volatile and ends with the sandbox."""
        argv = ["journalctl", "--no-pager", "-o", "short-iso"]
        if unit:
            argv += ["-u", unit]
        return self.run(*argv, check=False, timeout=15).stdout

    def stop(self, timeout: float = 20.0) -> None:
        """Save the journal to journal.txt, power off, and remove the cgroup dirs.

        Sends SIGRTMIN+4 (the poweroff request of systemd) and falls back to
        SIGKILL of PID 1 after timeout seconds, which makes the kernel kill
        the whole pid namespace. Raises RuntimeError when the cgroup dir
        cannot be removed.
        """
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self._save_journal()
            self._power_off(timeout)
        self._remove_cgroup()
        self.stop_seconds = time.monotonic() - started
        self.pid = None

    def _save_journal(self) -> None:
        if self.pid is None or not _process_alive(self.pid):
            return
        try:
            text = self.journal()
        except (OSError, subprocess.SubprocessError) as exc:
            text = "reading the journal failed: %r\n" % exc
        with open(os.path.join(self.shared_dir, "journal.txt"), "w",
                  encoding="utf-8") as handle:
            handle.write(text)

    def _power_off(self, timeout: float) -> None:
        assert self.proc is not None
        if self.pid is not None and _process_alive(self.pid):
            os.kill(self.pid, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                sys.stderr.write("sandbox poweroff timed out after %.0f s, "
                                 "sending SIGKILL to pid %d\n" % (timeout, self.pid))
                os.kill(self.pid, signal.SIGKILL)
        else:
            # PID 1 never started. --kill-child ends it together with unshare.
            self.proc.kill()
        self.proc.wait(10)

    def _remove_cgroup(self) -> None:
        deadline = time.monotonic() + 5
        while os.path.isdir(self.cgroup):
            # systemd leaves empty cgroup dirs behind. Remove the deepest first.
            walk = sorted(os.walk(self.cgroup), key=lambda entry: -entry[0].count("/"))
            for directory, _, _ in walk:
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
            if not os.path.isdir(self.cgroup):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("removing cgroup %s failed; processes in it: %s"
                                   % (self.cgroup, self._cgroup_processes()))
            time.sleep(0.05)

    def _cgroup_processes(self) -> list[str]:
        pids = []
        for directory, _, files in os.walk(self.cgroup):
            if "cgroup.procs" in files:
                procs = os.path.join(directory, "cgroup.procs")
                with open(procs, encoding="ascii") as handle:
                    pids.extend(handle.read().split())
        return pids


# === Caddy ===

class CaddyProcess:
    """A host `caddy run` process with its admin API on 127.0.0.1.

    Callers use start(), stop(), restart(), running(), get_config(),
    request() and log_text(). Attributes: admin_url, listen_port (the port
    the operator tells Caddy to listen on), http_port (the same number, as
    Caddy's http_port), https_port.

    The initial config has an empty servers map, so the operator creates its
    own server. "persist": false and HOME/XDG_* below the caddy dir keep
    autosave.json and certificate storage out of /root.
    """

    def __init__(self, shared_dir: str, name: str = "caddy") -> None:
        self.dir = os.path.join(shared_dir, name)
        self.home = os.path.join(self.dir, "home")
        self.config_path = os.path.join(self.dir, "caddy.json")
        self.log_path = os.path.join(self.dir, "caddy.log")
        self.admin_port = free_port()
        self.admin_url = "http://127.0.0.1:%d" % self.admin_port
        self.listen_port = free_port()
        self.http_port = self.listen_port
        self.https_port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> CaddyProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def base_config(self) -> dict:
        """Return the startup config: admin, storage, an http app without servers."""
        return {
            "admin": {"listen": "127.0.0.1:%d" % self.admin_port,
                      "config": {"persist": False}},
            "storage": {"module": "file_system",
                        "root": os.path.join(self.dir, "storage")},
            "apps": {"http": {"http_port": self.http_port,
                              "https_port": self.https_port,
                              "servers": {}}},
        }

    def start(self, config: dict | None = None, timeout: float = 15.0) -> None:
        """Start caddy with config (or base_config()) and wait for the admin API."""
        if self.running():
            raise RuntimeError("caddy is already running (pid %d)" % self.proc.pid)
        os.makedirs(self.home, exist_ok=True)
        config = self.base_config() if config is None else config
        with open(self.config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=1)

        env = dict(os.environ, HOME=self.home,
                   XDG_CONFIG_HOME=os.path.join(self.home, ".config"),
                   XDG_DATA_HOME=os.path.join(self.home, ".local", "share"))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["caddy", "run", "--config", self.config_path],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_admin(time.monotonic() + timeout)

    def _wait_admin(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("caddy exited with %s during startup:\n%s"
                                   % (self.proc.returncode, log_tail(self.log_path)))
            try:
                status, _ = self.request("GET", "/config/")
                if status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("caddy admin API timed out during startup:\n%s"
                                   % log_tail(self.log_path))
            time.sleep(0.03)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop caddy with SIGTERM (SIGKILL after timeout) and return its exit code."""
        return _stop_popen(self.proc, timeout)

    def restart(self, empty: bool = True) -> None:
        """Stop and start caddy on the same ports.

        With empty=True caddy comes back with base_config(), as a caddy
        restarted without --resume does. With empty=False it comes back with
        the config that was live before the stop, as with --resume.
        """
        config = None if empty else self.get_config()
        self.stop()
        self.start(config)

    def running(self) -> bool:
        """Return True while the caddy process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 10.0) -> tuple[int, Any]:
        """Send one admin API request on a new connection.

        Returns (status, body). The body is parsed JSON, text when it is
        not JSON, or None when it is empty.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port,
                                          timeout=timeout)
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        if not raw.strip():
            return response.status, None
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode("utf-8", "replace")

    def get_config(self, path: str = "") -> Any:
        """Return the live config, or its part at path such as "apps/http/servers"."""
        status, value = self.request("GET", "/config/" + path.lstrip("/"))
        if status != 200:
            raise RuntimeError("GET /config/%s returned %d: %r"
                               % (path, status, value))
        return value

    def log_text(self) -> str:
        """Return caddy's log so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


# === HTTP test servers ===

class _HeaderDict(dict):
    """Dict of HTTP headers with lowercase keys and case-insensitive lookup."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__((key.lower(), value) for key, value in pairs)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


class _QuietHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that prints no traceback when a client disconnects."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _ThreadedServer:
    """ThreadingHTTPServer on 127.0.0.1:0, served from a daemon thread."""

    handler_class: type = http.server.BaseHTTPRequestHandler

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server: _QuietHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.port: int | None = None

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind a free port on 127.0.0.1 and start serving."""
        owner = self

        class Handler(self.handler_class):
            harness = owner

        self.server = _QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name=type(self).__name__, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def url(self, path: str = "/") -> str:
        """Return http://127.0.0.1:<port><path>."""
        if not path.startswith("/"):
            path = "/" + path
        return "http://127.0.0.1:%d%s" % (self.port, path)


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    harness: Any = None

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Fault:
    """Failure mode of one AssetServer path. Unset fields mean normal service."""

    status: int | None = None
    cut_after: int | None = None
    delay_s: float = 0.0


class _AssetHandler(_QuietHandler):
    def do_GET(self) -> None:
        self.harness._serve(self, send_body=True)

    def do_HEAD(self) -> None:
        self.harness._serve(self, send_body=False)


class AssetServer(_ThreadedServer):
    """Static file server for release assets, with faults per path.

    Callers use start(), stop(), url(), put(), count(), requests(),
    set_fault() and clear_faults(). Paths are URL paths without the query,
    for example "/v1/app".
    """

    handler_class = _AssetHandler

    def __init__(self, root_dir: str) -> None:
        super().__init__()
        self.root_dir = os.path.realpath(root_dir)
        self._counts: collections.Counter = collections.Counter()
        self._requests: list[dict] = []
        self._faults: dict[str, Fault] = {}

    def put(self, name: str, data: bytes, mode: int = 0o644) -> str:
        """Write data to root_dir/name and return its URL."""
        path = os.path.join(self.root_dir, name.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)
        return self.url("/" + name.lstrip("/"))

    def count(self, path: str) -> int:
        """Return the number of GET and HEAD requests received for path."""
        with self.lock:
            return self._counts[path]

    def requests(self) -> list[dict]:
        """Return every request so far as {"method", "path", "headers", "time"}."""
        with self.lock:
            return list(self._requests)

    def set_fault(self, path: str, status: int | None = None,
                  cut_after: int | None = None, delay_s: float = 0.0) -> None:
        """Make requests for path fail.

        status: respond with this status and a short text body.
        cut_after: send the headers (with the full Content-Length) and this
        many body bytes, then close the connection.
        delay_s: wait this many seconds before responding.
        """
        with self.lock:
            self._faults[path] = Fault(status=status, cut_after=cut_after,
                                       delay_s=delay_s)

    def clear_faults(self, path: str | None = None) -> None:
        """Remove the fault of path, or of every path when path is None."""
        with self.lock:
            if path is None:
                self._faults.clear()
            else:
                self._faults.pop(path, None)

    def _serve(self, handler: http.server.BaseHTTPRequestHandler,
               send_body: bool) -> None:
        path = urllib.parse.urlsplit(handler.path).path
        with self.lock:
            self._counts[path] += 1
            self._requests.append({"method": handler.command, "path": path,
                                   "headers": _HeaderDict(handler.headers.items()),
                                   "time": time.time()})
            fault = self._faults.get(path, Fault())

        if fault.delay_s:
            time.sleep(fault.delay_s)
        if fault.status is not None:
            self._send(handler, fault.status, b"injected failure\n", send_body)
            return
        data = self._read_file(path)
        if data is None:
            self._send(handler, 404, b"not found\n", send_body)
            return
        if fault.cut_after is not None:
            self._send_cut(handler, data, fault.cut_after)
            return
        self._send(handler, 200, data, send_body, "application/octet-stream")

    def _read_file(self, url_path: str) -> bytes | None:
        relative = urllib.parse.unquote(url_path).lstrip("/")
        path = os.path.realpath(os.path.join(self.root_dir, relative))
        if not path.startswith(self.root_dir + os.sep) or not os.path.isfile(path):
            return None
        with open(path, "rb") as handle:
            return handle.read()

    @staticmethod
    def _send(handler: http.server.BaseHTTPRequestHandler, status: int,
              data: bytes, send_body: bool, content_type: str = "text/plain") -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(data)

    @staticmethod
    def _send_cut(handler: http.server.BaseHTTPRequestHandler, data: bytes,
                  cut_after: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[:cut_after])
        handler.wfile.flush()
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass
class CallbackRecord:
    """One POST received by CallbackReceiver, with the status it was given."""

    path: str
    headers: dict
    body: bytes
    time: float
    status: int

    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)


class _CallbackHandler(_QuietHandler):
    def do_POST(self) -> None:
        self.harness._receive(self)


class CallbackReceiver(_ThreadedServer):
    """Records every POST (path, headers, raw body, arrival time) in order.

    Callers use start(), stop(), url(), records(), events(), wait_for(),
    fail_next(), set_delay() and clear(). Each record keeps the status this
    receiver sent, so a test can tell a retried delivery from the first.
    Header keys are lowercase, and lookups ignore case.
    """

    handler_class = _CallbackHandler

    def __init__(self) -> None:
        super().__init__()
        self._records: list[CallbackRecord] = []
        self._fail_remaining = 0
        self._fail_status = 500
        self._fail_path = None
        self._delay_s = 0.0
        self._changed = threading.Condition(self.lock)

    def url(self, path: str = "/cb") -> str:
        """Return the callback URL to give the operator."""
        return super().url(path)

    def fail_next(self, n: int, status: int = 500,
                  path: str | None = None) -> None:
        """Respond to the next n POSTs with status; they are still recorded.

        With path, only POSTs to that path count: the receiver is shared
        by every test, and a late callback of an earlier test's app would
        otherwise take a failure meant for this one.
        """
        with self.lock:
            self._fail_remaining = n
            self._fail_status = status
            self._fail_path = path

    def set_delay(self, seconds: float) -> None:
        """Wait this many seconds before responding to each POST (a slow receiver)."""
        with self.lock:
            self._delay_s = seconds

    def clear(self) -> None:
        """Forget the records received so far."""
        with self.lock:
            self._records.clear()

    def records(self) -> list[CallbackRecord]:
        """Return a copy of the records in arrival order."""
        with self.lock:
            return list(self._records)

    def events(self, deployment_id: Any = None) -> list[dict]:
        """Return the bodies parsed as JSON, in arrival order.

        With deployment_id, only bodies whose "deployment_id" equals it,
        compared as text so that 7 and "7" match. Raises ValueError when a
        body is not JSON, because the operator must always send JSON.
        """
        events = []
        for record in self.records():
            try:
                event = record.json()
            except ValueError as exc:
                raise ValueError("callback body to %s is not JSON: %r"
                                 % (record.path, record.body[:200])) from exc
            if deployment_id is None or (
                    str(event.get("deployment_id")) == str(deployment_id)):
                events.append(event)
        return events

    def wait_for(self, predicate: Callable[[list[CallbackRecord]], Any],
                 timeout: float = 10.0) -> Any:
        """Wait until predicate(records) is truthy, and return its value.

        Raises TimeoutError listing the records received when the predicate
        stays false for timeout seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate(list(self._records))
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    received = [(r.path, r.status, r.body[:120])
                                for r in self._records]
                    raise TimeoutError("callback condition not met within %.1f s; "
                                       "received: %r" % (timeout, received))
                self._changed.wait(min(remaining, 0.2))

    def _receive(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_request_body(handler)
        with self.lock:
            status = 200
            if self._fail_remaining > 0 and self._fail_path in (
                    None, handler.path):
                self._fail_remaining -= 1
                status = self._fail_status
            delay = self._delay_s
        if delay:
            time.sleep(delay)
        record = CallbackRecord(path=handler.path,
                                headers=_HeaderDict(handler.headers.items()),
                                body=body, time=time.time(), status=status)
        with self._changed:
            self._records.append(record)
            self._changed.notify_all()
        reply = b"ok\n" if status < 400 else b"injected failure\n"
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)


def _read_request_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """Read a request body sent with Content-Length or chunked encoding."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size_line = handler.rfile.readline()
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Skip optional trailers up to the blank line.
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


# === Request loop ===

class RequestLoop:
    """Sends one GET at a time, each on a new connection, until stop().

    This class defines "zero failed requests" for the project. A request
    fails on a 5xx status, a timeout (timeout_s, default 5 s) or a
    connection error, with one exception. A connection reset or
    RemoteDisconnected while sending the request or reading the status line
    and headers is retried once, and only an error on that retry is a
    failure. A reset while reading the body fails at once. Responses below
    500 count as successes, and their bodies are tallied.
    """

    def __init__(self, url: str, host_header: str, timeout_s: float = 5.0,
                 interval_s: float = 0.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.host_header = host_header
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.results: list[dict] = []
        self.retries = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> RequestLoop:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the request thread."""
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="RequestLoop",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """Stop after the request in flight and return summary()."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s * 2 + 5)
        return self.summary()

    def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least count requests have completed."""
        deadline = time.monotonic() + timeout
        while len(self.results) < count:
            if time.monotonic() > deadline:
                raise TimeoutError("only %d of %d requests completed within %.1f s"
                                   % (len(self.results), count, timeout))
            time.sleep(0.01)

    def summary(self) -> dict:
        """Return the counts as a dict.

        Keys: total, failed, failures (reasons), bodies (a Counter of the
        bodies of successful responses), statuses (a Counter), retries and
        runs. runs lists [body, count] per stretch of equal successive
        successful bodies. It shows when the served version switched.
        """
        results = list(self.results)
        failures = [r["failure"] for r in results if r["failure"]]
        ok_bodies = [r["body"] for r in results if not r["failure"]]
        runs: list[list] = []
        for body in ok_bodies:
            if runs and runs[-1][0] == body:
                runs[-1][1] += 1
            else:
                runs.append([body, 1])
        return {
            "total": len(results),
            "failed": len(failures),
            "failures": failures,
            "bodies": collections.Counter(ok_bodies),
            "statuses": collections.Counter(r["status"] for r in results),
            "retries": self.retries,
            "runs": runs,
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body, failure = self.request_once()
            elapsed = time.monotonic() - self._started
            if failure:
                failure = "t=%.3fs %s" % (elapsed, failure)
            self.results.append({"time": elapsed, "status": status, "body": body,
                                 "failure": failure})
            if self.interval_s:
                self._stop.wait(self.interval_s)

    def request_once(self) -> tuple[int | None, str | None, str | None]:
        """Send one GET under the retry rule of the class.

        Returns (status, body text, failure reason or None).
        """
        headers = {"Host": self.host_header, "Connection": "close"}
        for attempt in (1, 2):
            conn = http.client.HTTPConnection(self.host, self.port,
                                              timeout=self.timeout_s)
            try:
                try:
                    conn.request("GET", self.path, headers=headers)
                    response = conn.getresponse()
                except ConnectionResetError as exc:  # includes RemoteDisconnected
                    if attempt == 1:
                        self.retries += 1
                        continue
                    return None, None, "error again after retry: %r" % exc
                except socket.timeout:
                    return None, None, ("timeout after %.1f s waiting for the response"
                                        % self.timeout_s)
                except (OSError, http.client.HTTPException) as exc:
                    return None, None, "connection error: %r" % exc
                return self._read_response(response)
            finally:
                conn.close()
        raise AssertionError("unreachable: the second attempt always returns")

    def _read_response(self, response: http.client.HTTPResponse
                       ) -> tuple[int | None, str | None, str | None]:
        try:
            data = response.read()
        except socket.timeout:
            return response.status, None, ("timeout after %.1f s reading the body"
                                           % self.timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            return response.status, None, "error reading the body: %r" % exc
        body = data.decode("utf-8", "replace")
        if response.status >= 500:
            return response.status, body, "HTTP %d: %r" % (response.status, body[:120])
        return response.status, body, None


# === Operator process ===

class OperatorError(RuntimeError):
    """Raised when the operator process fails to start or a wait times out."""


class OperatorProcess:
    """Runs `python3 -I crate_operator.py serve --config PATH` with a generated config.

    Callers use start(), stop(), kill(), restart(), running(), request(),
    wait_state(), log_text() and log_tail(). Attributes: config (the dict
    written to config_path with mode 0600), token, callback_secret,
    state_dir, base_url, log_path, proc, starts.

    The config file, state_dir and log file keep their paths across
    restart(). The log file is appended to, with a harness line per start.
    """

    def __init__(self, shared_dir: str, sandbox: SystemdSandbox | None,
                 caddy: CaddyProcess, config_overrides: dict | None = None,
                 script: str = OPERATOR_SCRIPT, python: str | None = None) -> None:
        self.shared_dir = shared_dir
        self.index = self._next_index(shared_dir)
        self.script = script
        if python is None:
            python = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable
        self.python = python
        self.config = self._base_config(sandbox, caddy)
        self.config.update(config_overrides or {})
        self.config_path = os.path.join(shared_dir, "operator-%d.json" % self.index)
        self.log_path = os.path.join(shared_dir, "operator-%d.log" % self.index)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._write_config()

    def __enter__(self) -> OperatorProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def _next_index(shared_dir: str) -> int:
        index = 1
        while (os.path.exists(os.path.join(shared_dir, "operator-%d.json" % index))
               or os.path.exists(os.path.join(shared_dir, "state-%d" % index))):
            index += 1
        return index

    def _base_config(self, sandbox: SystemdSandbox | None,
                     caddy: CaddyProcess) -> dict:
        shared = self.shared_dir
        # Without a sandbox every systemctl call fails, so that none reaches
        # the host's systemd.
        if sandbox is not None:
            systemctl = sandbox.systemctl_prefix()
        else:
            systemctl = ["/bin/false"]
        return {
            "listen": "127.0.0.1:%d" % free_port(),
            "token": secrets.token_hex(16),
            "state_dir": os.path.join(shared, "state-%d" % self.index),
            "apps_dir": os.path.join(shared, "apps"),
            "unit_dir": os.path.join(shared, "units"),
            "systemctl": systemctl,
            "caddy_admin": caddy.admin_url,
            "caddy_server": "crate",
            "caddy_listen": ["127.0.0.1:%d" % caddy.listen_port],
            "caddy_automatic_https": False,
            "docker_socket": os.path.join(shared, "dk", "docker.sock"),
            "callback_secret": secrets.token_hex(16),
            "app_user": "dynamic",
            "server_id": "test-host",
            "health_timeout_s": 10,
            "health_interval_s": 0.1,
            "health_grace_s": 0.5,
            "drain_s": 0.2,
            "callback_backoff_s": 0.1,
            "callback_backoff_max_s": 1.0,
        }

    def _write_config(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(self.config_path, flags, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.config, handle, indent=1, sort_keys=True)
            handle.write("\n")

    @property
    def token(self) -> str:
        """Bearer token of the operator's API."""
        return self.config["token"]

    @property
    def callback_secret(self) -> str:
        """HMAC-SHA256 key of the callback signatures."""
        return self.config["callback_secret"]

    @property
    def state_dir(self) -> str:
        """State dir of this operator."""
        return self.config["state_dir"]

    @property
    def base_url(self) -> str:
        """URL of the operator's API, http://<listen>."""
        return "http://" + self.config["listen"]

    def argv(self) -> list[str]:
        """Return the command line that start() runs."""
        return [self.python, "-I", self.script, "serve", "--config", self.config_path]

    def start(self, timeout: float = 20.0) -> None:
        """Start the operator and wait until GET /healthz gets a response (any status).

        Raises OperatorError with the log tail when the process exits first
        or no response arrives within timeout seconds.
        """
        if self.running():
            raise OperatorError("the operator is already running (pid %d)"
                                % self.proc.pid)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(b"=== harness: start %d: %s ===\n"
                      % (self.starts, " ".join(self.argv()).encode()))
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(), cwd=self.shared_dir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_healthz(time.monotonic() + timeout)

    def _wait_healthz(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise OperatorError("the operator exited with %s during startup. "
                                    "%s ends with:\n%s" % (self.proc.returncode,
                                                           self.log_path,
                                                           self.log_tail()))
            try:
                self.request("GET", "/healthz", timeout=2)
                return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise OperatorError("GET /healthz timed out during startup. "
                                    "%s ends with:\n%s" % (self.log_path,
                                                           self.log_tail()))
            time.sleep(0.05)

    def running(self) -> bool:
        """Return True while the operator process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop with SIGTERM (SIGKILL after timeout) and return the exit code."""
        return _stop_popen(self.proc, timeout)

    def kill(self) -> int | None:
        """Kill the operator with SIGKILL (a crash) and return its exit code."""
        return _stop_popen(self.proc, 10, sig=signal.SIGKILL)

    def restart(self, timeout: float = 20.0) -> None:
        """Stop the operator and start it with the same config and state dir."""
        self.stop()
        self.start(timeout)

    def log_text(self) -> str:
        """Return the whole operator log (stdout and stderr of every start)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of the operator log."""
        return log_tail(self.log_path, lines)

    def request(self, method: str, path: str, body: Any = None,
                token: Any = _DEFAULT, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, dict, Any]:
        """Send one API request on a new connection.

        body: a dict or list (sent as JSON), bytes or str (sent as is), or
        None. token: the config token by default, and None sends no
        Authorization header. Returns (status, headers, body), where the body
        is parsed JSON when it parses and raw bytes otherwise.
        """
        all_headers: dict[str, str] = {}
        if token is _DEFAULT:
            token = self.token
        if token is not None:
            all_headers["Authorization"] = "Bearer %s" % token
        data = _encode_body(body, all_headers)
        all_headers.update(headers or {})

        host, _, port = self.config["listen"].rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=all_headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        return response.status, _HeaderDict(response.getheaders()), _decode_body(raw)

    def status_path(self, deployment_id: Any, path_kind: str = "instance") -> str:
        """Return the status endpoint path of the "instance" or "legacy" API."""
        if path_kind == "instance":
            return INSTANCE_STATUS_PATH % deployment_id
        if path_kind == "legacy":
            return LEGACY_STATUS_PATH % deployment_id
        raise ValueError("path_kind must be 'instance' or 'legacy', not %r"
                         % path_kind)

    def wait_state(self, deployment_id: Any, states: Iterable[str] | str,
                   timeout: float = 60.0, path_kind: str = "instance") -> dict:
        """Poll the status endpoint until its "state" is one of states.

        Returns the status document. Raises OperatorError with the last
        response and the log tail when the operator exits or timeout seconds
        pass first.
        """
        expected = {states} if isinstance(states, str) else set(states)
        path = self.status_path(deployment_id, path_kind)
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            if not self.running():
                code = self.proc.returncode if self.proc is not None else None
                raise OperatorError("the operator exited (code %s) while waiting for "
                                    "%s at %s. Its log ends with:\n%s"
                                    % (code, sorted(expected), path, self.log_tail()))
            try:
                status, _, document = self.request("GET", path, timeout=5)
                last = (status, document)
                if (status == 200 and isinstance(document, dict)
                        and document.get(STATE_FIELD) in expected):
                    return document
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise OperatorError("deployment %s did not reach %s within %.0f s. "
                                    "Last response: %r. The log ends with:\n%s"
                                    % (deployment_id, sorted(expected), timeout, last,
                                       self.log_tail()))
            time.sleep(0.1)


def _encode_body(body: Any, headers: dict[str, str]) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    headers["Content-Type"] = "application/json"
    return json.dumps(body).encode()


def _decode_body(raw: bytes) -> Any:
    if not raw:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


# === Docker daemon and registry ===

DOCKER_API = "v1.41"  # docker.io 20.10.24 rejects newer API versions with 400


def docker_bridge_for(shared_dir: str) -> tuple[str, str]:
    """Return (bridge name, address/prefix) for the dockerd of one shared dir.

    Concurrent test runs on one host get their own bridges. A hash of the
    dir name picks the /24 from 10.231.1.0 to 10.231.254.0.
    NOTE: two concurrent runs draw the same /24 with probability 1/254.
    """
    digest = hashlib.sha256(os.path.basename(shared_dir).encode()).hexdigest()
    subnet = int(digest[:4], 16) % 254 + 1
    return "crbr-" + digest[:8], "10.231.%d.1/24" % subnet


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket."""

    def __init__(self, socket_path: str, timeout: float = 120.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class DockerDaemon:
    """dockerd 20.10 as a unit inside the sandbox, with its socket at <shared>/dk.

    Callers use start(), stop(), api(), docker() and build_busybox_image().
    Attributes: socket_path, bridge, bridge_addr. Everything dockerd mounts
    or starts is in the sandbox's namespaces and ends with it. The bridge is
    the one host-visible object, and stop() deletes it.

    Flags: --iptables=false and --ip-forward=false keep the host firewall
    and sysctls unchanged. A pre-created bridge replaces --bridge=none,
    which deletes the host's docker0 at startup. An own --config-file keeps
    /etc/docker/daemon.json out, and its deprecated-key-path keeps dockerd
    from writing /etc/docker/key.json. Side effect: containers have no
    outbound network.
    """

    UNIT = "crate-test-dockerd.service"

    def __init__(self, sandbox: SystemdSandbox) -> None:
        self.sandbox = sandbox
        self.dir = os.path.join(sandbox.shared_dir, "dk")
        self.socket_path = os.path.join(self.dir, "docker.sock")
        self.bridge, self.bridge_addr = docker_bridge_for(sandbox.shared_dir)

    def unit_text(self) -> str:
        """Return the unit file of dockerd."""
        # A bridge without a set MAC takes the lowest MAC of its ports, so it
        # changes whenever a container starts or stops, and running
        # containers keep sending to the old MAC for seconds. dockerd sets a
        # fixed MAC on the bridges it creates itself; this one needs its own.
        digest = hashlib.sha256(self.bridge.encode()).hexdigest()
        mac = "02:" + ":".join(digest[i:i + 2] for i in range(0, 10, 2))
        setup_bridge = ("ip link show {br} >/dev/null 2>&1 || "
                        "ip link add {br} type bridge; "
                        "ip link set {br} address {mac}; "
                        "ip addr replace {addr} dev {br}; ip link set {br} up"
                        ).format(br=self.bridge, addr=self.bridge_addr, mac=mac)
        dockerd = " ".join([
            "/usr/sbin/dockerd",
            "--data-root %s/data" % self.dir,
            "--exec-root /run/crate-docker",
            "-H unix://%s" % self.socket_path,
            "--pidfile /run/crate-dockerd.pid",
            "--config-file %s/daemon.json" % self.dir,
            "--iptables=false --ip-forward=false --ip-masq=false",
            "--bridge=%s" % self.bridge,
            "--storage-driver=overlay2",
            "--exec-opt native.cgroupdriver=cgroupfs",
            "--shutdown-timeout=2",
        ])
        return ("[Unit]\nDescription=crate-operator test dockerd\n\n"
                "[Service]\nType=notify\n"
                "ExecStartPre=/bin/sh -c '%s'\n"
                "ExecStart=%s\n"
                "Delegate=yes\nKillMode=mixed\nTimeoutStopSec=20s\n"
                % (setup_bridge, dockerd))

    def start(self, timeout: float = 60.0) -> None:
        """Write the unit, start it, and wait until GET /_ping returns 200."""
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        key_path = os.path.join(self.dir, "key.json")
        with open(os.path.join(self.dir, "daemon.json"), "w",
                  encoding="utf-8") as handle:
            json.dump({"deprecated-key-path": key_path}, handle)
        self.sandbox.write_unit(self.UNIT, self.unit_text())
        self.sandbox.systemctl("daemon-reload")
        result = self.sandbox.systemctl("start", self.UNIT, check=False,
                                        timeout=timeout)
        if result.returncode != 0:
            journal = self.sandbox.journal(self.UNIT)[-3000:]
            raise RuntimeError("starting the dockerd unit failed: %s\n%s"
                               % (result.stderr, journal))
        self._wait_for_ping(
            timeout, "dockerd",
            lambda: self.sandbox.journal(self.UNIT)[-3000:])

    def _wait_for_ping(self, timeout: float, name: str, log_text,
                       exited=lambda: None) -> None:
        """Wait until /_ping answers 200.

        Raises RuntimeError when exited() returns a message (the daemon
        died) and TimeoutError after timeout seconds, both with log_text().
        """
        deadline = time.monotonic() + timeout
        while True:
            problem = exited()
            if problem is not None:
                raise RuntimeError("%s:\n%s" % (problem, log_text()))
            try:
                status, _ = self.api("GET", "/_ping", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("%s /_ping timed out:\n%s"
                                   % (name, log_text()))
            time.sleep(0.05)

    def _remove_containers(self) -> None:
        """Force-remove every container before dockerd stops.

        A container whose PID 1 ignores SIGTERM would hold up the stop for
        docker's 10 s stop timeout.
        """
        try:
            status, containers = self.api("GET", "/containers/json?all=1",
                                          timeout=10)
            for container in containers if status == 200 else []:
                self.api("DELETE", "/containers/%s?force=1" % container["Id"],
                         timeout=30)
        except OSError as exc:
            sys.stderr.write("removing the containers of %s failed: %r\n"
                             % (self.socket_path, exc))

    def stop(self) -> None:
        """Remove all containers, stop the unit and delete the bridge."""
        if self.sandbox.pid is not None and os.path.exists(self.socket_path):
            self._remove_containers()
            self.sandbox.systemctl("stop", self.UNIT, check=False)
        show = subprocess.run(["ip", "link", "show", self.bridge],
                              capture_output=True, check=False)
        if show.returncode == 0:
            subprocess.run(["ip", "link", "del", self.bridge], check=False)

    def api(self, method: str, path: str, body: Any = None,
            headers: dict | None = None, timeout: float = 120.0) -> tuple[int, Any]:
        """Call the Engine API v1.41 over the unix socket and return (status, body)."""
        conn = _UnixHTTPConnection(self.socket_path, timeout=timeout)
        all_headers = dict(headers or {})
        data = _encode_body(body, all_headers)
        try:
            conn.request(method, "/%s%s" % (DOCKER_API, path), body=data,
                         headers=all_headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        return response.status, _decode_body(raw)

    def docker(self, *args: str, check: bool = True, timeout: float = 120.0,
               input_text: str | None = None) -> subprocess.CompletedProcess:
        """Run the docker 20.10 CLI against this daemon, with its config in dk/cli.

        The CLI is called as /usr/bin/docker because another docker CLI may
        come first in PATH.
        """
        env = dict(os.environ, DOCKER_HOST="unix://" + self.socket_path,
                   DOCKER_CONFIG=os.path.join(self.dir, "cli"))
        return subprocess.run(["/usr/bin/docker", *args], env=env,
                              capture_output=True, text=True, check=check,
                              timeout=timeout, input=input_text)

    def build_busybox_image(self, tag: str,
                            index_html: str = "hello from busybox\n") -> None:
        """Build a FROM-scratch image whose busybox httpd serves index_html on 8080."""
        context = os.path.join(self.dir, "build-" + secrets.token_hex(3))
        os.makedirs(os.path.join(context, "www"))
        shutil.copy("/bin/busybox", os.path.join(context, "busybox"))
        with open(os.path.join(context, "www", "index.html"), "w",
                  encoding="utf-8") as handle:
            handle.write(index_html)
        # STOPSIGNAL SIGKILL because busybox httpd as PID 1 ignores SIGTERM.
        with open(os.path.join(context, "Dockerfile"), "w",
                  encoding="utf-8") as handle:
            handle.write("FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n"
                         "EXPOSE 8080\nSTOPSIGNAL SIGKILL\n"
                         'CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", '
                         '"-h", "/www"]\n')
        try:
            self.docker("build", "-q", "-t", tag, context)
        finally:
            shutil.rmtree(context, ignore_errors=True)


def host_docker_names(run_dir: str) -> tuple[str, str]:
    """Return (base name, bridge address/prefix) of the host dockerd in run_dir.

    The base name "crhost-<8 hex>" is 15 characters, the longest name a
    network interface can have, and names the bridge and the two cgroups.
    The /24 comes from 10.232.1.0 to 10.232.254.0, so it never clashes
    with the 10.231.x.0/24 bridges of docker_bridge_for().
    """
    digest = hashlib.sha256(os.path.basename(run_dir).encode()).hexdigest()
    subnet = int(digest[8:12], 16) % 254 + 1
    return "crhost-" + digest[:8], "10.232.%d.1/24" % subnet


class HostDockerDaemon(DockerDaemon):
    """dockerd 20.10 directly on the host, in a new /tmp/crhost-* dir.

    The sandbox dockerd cannot apply memory and pids limits: on a host with
    the hybrid cgroup layout the sandbox's cgroup2 has no controllers, and
    dockerd drops those limits without an error. This daemon uses the host's
    cgroup controllers. Callers use start() and stop() (same as cleanup()),
    plus api(), docker() and build_busybox_image() of DockerDaemon.

    cleanup() removes every host-visible object, and those with a name carry
    base_name: the bridge, the cgroup "<base>-dockerd" of dockerd and
    containerd, and the cgroup "<base>-docker" of the containers (in every
    v1 hierarchy too). It also removes the mounts below the run dir, the
    shim sockets in /run/containerd/s, and /run/containerd and /run/docker
    when they did not exist before.
    """

    # Dirs below the host's /run that dockerd 20.10 and containerd 1.6
    # create regardless of --exec-root.
    RUN_DIRS = ("/run/containerd", "/run/containerd/s", "/run/docker",
                "/run/docker/plugins")

    def __init__(self, parent_dir: str = "/tmp") -> None:
        # No DockerDaemon.__init__: there is no sandbox.
        self.dir = tempfile.mkdtemp(prefix="crhost-", dir=parent_dir)
        self.base_name, self.bridge_addr = host_docker_names(self.dir)
        self.bridge = self.base_name
        self.socket_path = os.path.join(self.dir, "docker.sock")
        self.exec_root = os.path.join(self.dir, "exec")
        self.log_path = os.path.join(self.dir, "dockerd.log")
        self.cgroup_parent = self.base_name + "-docker"
        self.daemon_cgroup = os.path.join(cgroup_root(), self.base_name + "-dockerd")
        self.proc: subprocess.Popen | None = None
        self.missing_run_dirs = [path for path in self.RUN_DIRS
                                 if not os.path.isdir(path)]

    def argv(self) -> list[str]:
        """Return the dockerd command line.

        --iptables=false and --ip-forward=false keep the host firewall and
        sysctls unchanged. --exec-opt native.cgroupdriver=cgroupfs keeps
        dockerd from asking a systemd over D-Bus for scopes.
        """
        return [
            "/usr/sbin/dockerd",
            "--data-root", os.path.join(self.dir, "data"),
            "--exec-root", self.exec_root,
            "-H", "unix://" + self.socket_path,
            "--pidfile", os.path.join(self.dir, "docker.pid"),
            "--config-file", os.path.join(self.dir, "daemon.json"),
            "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=" + self.bridge,
            "--storage-driver=overlay2",
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--cgroup-parent=" + self.cgroup_parent,
            "--shutdown-timeout=2",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Create the bridge and cgroup, start dockerd, and wait for GET /_ping.

        A failed start calls cleanup() before it raises.
        """
        try:
            self._start(timeout)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, timeout: float) -> None:
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        with open(os.path.join(self.dir, "daemon.json"), "w",
                  encoding="utf-8") as handle:
            json.dump({"deprecated-key-path": os.path.join(self.dir, "key.json")},
                      handle)

        # dockerd only creates a bridge named docker0 itself. A fixed MAC
        # keeps the bridge MAC from changing as containers come and go.
        digest = hashlib.sha256(self.bridge.encode()).hexdigest()
        mac = "02:" + ":".join(digest[i:i + 2] for i in range(0, 10, 2))
        if subprocess.run(["ip", "link", "show", self.bridge],
                          capture_output=True, check=False).returncode != 0:
            subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"],
                           check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "address", mac], check=True)
        subprocess.run(["ip", "addr", "replace", self.bridge_addr, "dev", self.bridge],
                       check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)

        os.makedirs(self.daemon_cgroup, exist_ok=True)
        # The shell moves itself into the cgroup before exec, so dockerd and
        # every process it starts (containerd, the shims) are in it from
        # their first instruction, and cleanup() can kill them all.
        script = 'echo $$ > "$1" && shift && exec "$@"'
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", script, "sh",
                 os.path.join(self.daemon_cgroup, "cgroup.procs"), *self.argv()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

        def exited():
            if self.proc.poll() is None:
                return None
            return "host dockerd exited with %s" % self.proc.returncode

        self._wait_for_ping(timeout, "host dockerd",
                            lambda: log_tail(self.log_path), exited)

    def stop(self) -> None:
        """Remove everything start() and dockerd made; see cleanup()."""
        self.cleanup()

    def cleanup(self) -> None:
        """Remove what this daemon left on the host, also after dockerd was killed.

        After SIGKILL of dockerd the shims and containers keep running, and
        the data-root bind mount, overlay mounts and network namespace
        mounts stay. Raises RuntimeError naming what could not be removed.
        """
        problems = []
        self._stop_daemon()
        self._kill_cgroup_processes(problems)
        for point in sorted(mounts_under(self.dir), key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True,
                              check=False).returncode != 0:
                subprocess.run(["umount", "-l", point], check=False)
        for path in self._cgroup_dirs():
            _remove_cgroup_tree(path, problems)
        self._remove_shim_sockets()
        for path in reversed(self.missing_run_dirs):
            try:
                os.rmdir(path)
            except OSError:
                pass  # absent, or another dockerd now uses it
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True,
                          check=False).returncode == 0:
            subprocess.run(["ip", "link", "del", self.bridge], check=False)
        mounts = mounts_under(self.dir)
        if mounts:
            problems.append("mounts left below %s: %s" % (self.dir, mounts))
        elif os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
        if problems:
            raise RuntimeError("host dockerd cleanup incomplete: "
                               + "; ".join(problems))

    def _stop_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._remove_containers()
        _stop_popen(self.proc, 20)

    def _cgroup_dirs(self) -> list[str]:
        """Return the cgroup dirs of this daemon that exist, in any hierarchy."""
        paths = [self.daemon_cgroup,
                 os.path.join(cgroup_root(), self.cgroup_parent)]
        # The cgroupfs driver makes the parent in every v1 hierarchy (named
        # ones too), and in the memory hierarchy below the memory cgroup of
        # dockerd, which is the caller's.
        paths.extend(glob.glob(os.path.join("/sys/fs/cgroup/*", self.cgroup_parent)))
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            for line in handle:
                _, controllers, own = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    paths.append("/sys/fs/cgroup/memory%s/%s"
                                 % (own.rstrip("/"), self.cgroup_parent))
        return sorted({path for path in paths if os.path.isdir(path)})

    def cgroup_processes(self) -> list[int]:
        """Return the PIDs in this daemon's cgroup2 dirs: dockerd, shims, containers."""
        pids = []
        for top in (self.daemon_cgroup,
                    os.path.join(cgroup_root(), self.cgroup_parent)):
            for directory, _, files in os.walk(top):
                if "cgroup.procs" in files:
                    with open(os.path.join(directory, "cgroup.procs"),
                              encoding="ascii") as handle:
                        pids.extend(int(pid) for pid in handle.read().split())
        return pids

    def _kill_cgroup_processes(self, problems: list[str]) -> None:
        for top in (self.daemon_cgroup,
                    os.path.join(cgroup_root(), self.cgroup_parent)):
            kill_file = os.path.join(top, "cgroup.kill")
            if os.path.exists(kill_file):  # Linux 5.14 and later
                with open(kill_file, "w", encoding="ascii") as handle:
                    handle.write("1")
        for pid in self.cgroup_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while True:
            alive = [pid for pid in self.cgroup_processes() if _process_alive(pid)]
            if not alive:
                return
            if time.monotonic() > deadline:
                problems.append("processes still alive in the cgroups: %s" % alive)
                return
            time.sleep(0.05)

    def _remove_shim_sockets(self) -> None:
        """Delete the shim sockets of this daemon's containers from /run/containerd/s.

        containerd 1.6 puts them at the fixed path
        /run/containerd/s/<sha256 of "<containerd.sock>/moby/<container id>">.
        """
        containers = os.path.join(self.dir, "data", "containers")
        if not os.path.isdir(containers):
            return
        address = os.path.join(self.exec_root, "containerd", "containerd.sock")
        for container_id in os.listdir(containers):
            key = "%s/moby/%s" % (address, container_id)
            name = hashlib.sha256(key.encode()).hexdigest()
            try:
                os.unlink(os.path.join("/run/containerd/s", name))
            except FileNotFoundError:
                pass


def _remove_cgroup_tree(path: str, problems: list[str]) -> None:
    """Remove a cgroup dir and its children, the deepest first."""
    deadline = time.monotonic() + 5
    while os.path.isdir(path):
        walk = sorted(os.walk(path), key=lambda entry: -entry[0].count("/"))
        for directory, _, _ in walk:
            try:
                os.rmdir(directory)
            except OSError:
                pass
        if not os.path.isdir(path):
            return
        if time.monotonic() > deadline:
            problems.append("cgroup %s could not be removed" % path)
            return
        time.sleep(0.05)


def registry_auth_header(username: str, password: str, server: str) -> str:
    """Return an X-Registry-Auth value: URL-safe base64 of the JSON credentials."""
    raw = json.dumps({"username": username, "password": password,
                      "serveraddress": server}).encode()
    return base64.urlsafe_b64encode(raw).decode()


class RegistryProcess:
    """A host docker-registry (distribution 2.8) on 127.0.0.1 with htpasswd auth.

    Callers use start() and stop(). Attributes: address ("127.0.0.1:PORT"),
    username, password. With the default password, the standard base64 of
    the auth JSON contains "/" or "+", so a client that sends standard
    instead of URL-safe base64 fails to authenticate.
    """

    def __init__(self, shared_dir: str, username: str = "crateuser",
                 password: str = "s3cr3t?>~0") -> None:
        self.dir = os.path.join(shared_dir, "registry")
        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.username = username
        self.password = password
        self.log_path = os.path.join(self.dir, "registry.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Write the config and a bcrypt htpasswd, start, and wait for GET /v2/."""
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", self.username, self.password],
            capture_output=True, text=True, check=True).stdout
        with open(os.path.join(self.dir, "htpasswd"), "w", encoding="utf-8") as f:
            f.write(htpasswd)
        config_path = os.path.join(self.dir, "config.yml")
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(
                "version: 0.1\n"
                "storage: {filesystem: {rootdirectory: %s/data}, "
                "delete: {enabled: true}}\n"
                "http: {addr: %s, secret: crate-test-only}\n"
                "auth: {htpasswd: {realm: crate-test-registry, path: %s/htpasswd}}\n"
                % (self.dir, self.address, self.dir))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", config_path], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited with %s:\n%s"
                                   % (self.proc.returncode, log_tail(self.log_path)))
            try:
                wait_http("http://%s/v2/" % self.address, timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the registry with SIGTERM (SIGKILL after timeout)."""
        return _stop_popen(self.proc, timeout)
