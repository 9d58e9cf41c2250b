"""Crash safety: SIGKILL the operator at every deploy step, then restart.

The step list comes from the engine itself (STEP_NAMES), so a new step is
covered without editing this file. After the restart every deployment must
end in a terminal state and the app must serve, the new version when the
deployment succeeded and the previous one otherwise.
"""

from __future__ import annotations

import json
import os
import time

import pytest

import crate_operator
import harness
from test_slice import deploy_body, through_caddy

SLOTS = "/v1/app/instance/binary/deploy"
TERMINAL = ("succeeded", "failed", "rolled_back", "cancelled")
_ids = iter(range(600000, 700000))


def next_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def assets(asset_server):
    urls = {}
    for build in ("old", "new"):
        path = os.path.join(asset_server.root_dir, f"sample-r-{build}")
        harness.build_asset(build, path)
        urls[build] = asset_server.url(f"/sample-r-{build}")
    return urls


def start_crashing(operator, step):
    """Restart ``operator`` so that it kills itself at ``step``."""
    operator.stop()
    os.environ["CRATE_TEST_CRASH_AT_STEP"] = step
    try:
        operator.start()
    finally:
        del os.environ["CRATE_TEST_CRASH_AT_STEP"]


def wait_dead_or_done(operator, deployment_id, timeout=60):
    """Return True when the process died, False when the job finished."""
    path = operator.status_path(deployment_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not operator.running():
            return True
        try:
            status, _, doc = operator.request("GET", path, timeout=2)
        except OSError:
            continue
        if status == 200 and doc["state"] in TERMINAL:
            return False
        time.sleep(0.05)
    raise AssertionError(f"deployment {deployment_id} neither finished nor "
                         f"crashed within {timeout}s")


@pytest.mark.parametrize("strategy", ["bluegreen", "canary", "immediate"])
@pytest.mark.parametrize("step", crate_operator.STEP_NAMES)
def test_sigkill_at_step_recovers(step, strategy, operator_factory, caddy,
                                  assets, callbacks):
    operator = operator_factory({"canary_pause_s": 0.3})
    first = deploy_body(next_id(), next_id(), assets["old"], callbacks)
    status, _, answer = operator.request("POST", SLOTS, first)
    assert status == 202, answer
    assert operator.wait_state(first["deployment_id"], TERMINAL)[
        "state"] == "succeeded"
    start_crashing(operator, step)
    second = dict(first, deployment_id=next_id(), asset_url=assets["new"],
                  deployment_strategy=strategy,
                  canary={"steps": [50, 100], "pause_s": 0.3})
    status, _, answer = operator.request("POST", SLOTS, second)
    assert status == 202, answer
    crashed = wait_dead_or_done(operator, second["deployment_id"])
    if crashed:
        assert operator.proc.returncode == -9
        operator.start()
    doc = operator.wait_state(second["deployment_id"], TERMINAL, timeout=60)
    assert doc["state"] in ("succeeded", "rolled_back", "failed"), doc
    code, text = through_caddy(caddy, first["domain"])
    assert code == 200, (doc, text)
    expected = "new " if doc["state"] == "succeeded" else "old "
    assert text.startswith(expected), (doc, text)
    serving = [a for a in doc["allocations"] if a["weight"]]
    assert sum(a["weight"] for a in serving) == 100
    if crashed:
        names = [s["name"] for s in doc["steps"]]
        assert step in names
        assert doc["steps"][-1]["state"] == "done", doc["steps"]
    app = json.load(open(os.path.join(operator.state_dir, "apps",
                                      f"{first['app_id']}.json")))
    running = [i for i in app["instances"].values() if i.get("serving")]
    assert len(running) == 1
    assert running[0]["version"] == doc["serving_version"]
