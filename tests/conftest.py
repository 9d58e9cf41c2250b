"""pytest fixtures that start real systemd, Caddy and HTTP peers for the tests.

Session fixtures: shared_dir, sandbox, caddy, asset_server, callbacks,
operator, dockerd, host_dockerd and registry (started only when a test
requests them).
Function fixture: operator_factory. Fixtures that need root
(namespaces, mounts, cgroups) skip with a stated reason when not root.
Teardown runs even when a test or a later fixture fails: operator
processes, Caddy, the sandbox, and last the shared dir (only when nothing
is mounted below it).
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from typing import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# crate_operator.py sits at the repository root, one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402  (needs the sys.path entry above)

ROOT_REASON = ("needs root: the sandbox uses pid/mount/cgroup namespaces, mounts "
               "and a cgroup dir")

_module_seconds: dict[str, float] = collections.defaultdict(float)


# === Hooks ===

def pytest_configure(config: pytest.Config) -> None:
    """Show skip reasons in the short summary, so no skip goes unnoticed."""
    chars = config.option.reportchars or ""
    if "s" not in chars and "a" not in chars and "A" not in chars:
        config.option.reportchars = chars + "s"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add setup, call and teardown time of each test to its module's total."""
    module = report.nodeid.split("::", 1)[0]
    _module_seconds[module] += report.duration


def pytest_terminal_summary(terminalreporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """Print each test module's total duration (setup, call and teardown)."""
    if not _module_seconds:
        return
    terminalreporter.section("duration per test module")
    for module, seconds in sorted(_module_seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line("%8.2f s  %s" % (seconds, module))


# === Session fixtures ===

@pytest.fixture(scope="session")
def packages() -> list[str]:
    """Install missing Debian packages when root, and return the ones still missing."""
    return harness.ensure_packages()


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[str]:
    """A new /srv/crate-test-<hex> dir, deleted at session end unless a mount is in it.

    Without write access to /srv (not root) the dir goes to the temp dir,
    because the fixtures that need the sandbox skip in that case anyway.
    """
    base = harness.SHARED_BASE
    if not os.access(base if os.path.isdir(base) else "/", os.W_OK):
        base = tempfile.gettempdir()
    path = harness.make_shared_dir(base)
    yield path
    mounts = harness.mounts_under(path)
    if mounts:
        pytest.fail("not deleting %s: mounts left below it: %s" % (path, mounts))
    if os.environ.get("CRATE_TEST_KEEP"):
        sys.stderr.write("CRATE_TEST_KEEP is set, keeping %s\n" % path)
        return
    harness.remove_shared_dir(path)


@pytest.fixture(scope="session")
def sandbox(shared_dir: str, packages: list[str]) -> Iterator[harness.SystemdSandbox]:
    """systemd as PID 1 of private namespaces, with units in <shared_dir>/units."""
    if not harness.is_root():
        pytest.skip(ROOT_REASON)
    box = harness.SystemdSandbox(shared_dir)
    box.start()  # a failed start() stops what it started
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="session")
def caddy(shared_dir: str, packages: list[str]) -> Iterator[harness.CaddyProcess]:
    """A host caddy with an empty servers map and its admin API on 127.0.0.1."""
    if "caddy" in packages:
        pytest.skip("caddy is not installed and cannot be installed without root")
    process = harness.CaddyProcess(shared_dir)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def asset_server(shared_dir: str) -> Iterator[harness.AssetServer]:
    """Serves files from <shared_dir>/www over HTTP on 127.0.0.1."""
    server = harness.AssetServer(os.path.join(shared_dir, "www"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def callbacks() -> Iterator[harness.CallbackReceiver]:
    """Records the operator's callback POSTs."""
    receiver = harness.CallbackReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="session")
def dockerd(sandbox: harness.SystemdSandbox,
            packages: list[str]) -> Iterator[harness.DockerDaemon]:
    """dockerd as a sandbox unit, listening on <shared_dir>/dk/docker.sock."""
    if "docker.io" in packages:
        pytest.skip("docker.io is not installed")
    daemon = harness.DockerDaemon(sandbox)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def host_dockerd(packages: list[str]) -> Iterator[harness.HostDockerDaemon]:
    """dockerd on the host (not in the sandbox), in its own /tmp/crhost-* dir.

    Only this daemon applies memory and pids limits on a host with the
    hybrid cgroup layout. The finalizer removes its processes, mounts,
    cgroups, bridge and dir, also after dockerd crashed.
    """
    if not harness.is_root():
        pytest.skip(ROOT_REASON)
    if "docker.io" in packages:
        pytest.skip("docker.io is not installed")
    daemon = harness.HostDockerDaemon()
    try:
        daemon.start()  # a failed start() cleans up before it raises
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="session")
def registry(shared_dir: str,
             packages: list[str]) -> Iterator[harness.RegistryProcess]:
    """A docker-registry with htpasswd auth on 127.0.0.1."""
    if "docker-registry" in packages or "apache2-utils" in packages:
        pytest.skip("docker-registry or apache2-utils (htpasswd) is not installed")
    process = harness.RegistryProcess(shared_dir)
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def operator(shared_dir: str, sandbox: harness.SystemdSandbox,
             caddy: harness.CaddyProcess) -> Iterator[harness.OperatorProcess]:
    """One operator shared by the tests that never stop or restart it."""
    process = harness.OperatorProcess(shared_dir, sandbox, caddy)
    try:
        process.start()
        yield process
    finally:
        process.stop()


# === Function fixtures ===

@pytest.fixture
def operator_factory(shared_dir: str, sandbox: harness.SystemdSandbox,
                     caddy: harness.CaddyProcess
                     ) -> Iterator[Callable[..., harness.OperatorProcess]]:
    """Return make(config_overrides=None, start=True) -> OperatorProcess.

    Every operator made this way is stopped when the test ends.
    """
    started: list[harness.OperatorProcess] = []

    def make(config_overrides: dict | None = None,
             start: bool = True) -> harness.OperatorProcess:
        process = harness.OperatorProcess(shared_dir, sandbox, caddy, config_overrides)
        started.append(process)
        if start:
            process.start()
        return process

    yield make
    for process in started:
        try:
            process.stop()
        except OSError as exc:  # stop the others anyway
            sys.stderr.write("stopping operator %s failed: %r\n"
                             % (process.config_path, exc))

