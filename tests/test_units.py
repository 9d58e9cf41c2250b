"""Unit tests of single components: config, store, rendering, signing.

These run without any real service; the end-to-end modules prove the same
components against real systemd and Caddy.
"""

import hashlib
import hmac
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import pathlib

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import crate_operator as co  # noqa: E402

BASE = {"token": "t" * 32, "callback_secret": "s" * 32}


# --- configuration

def write_config(tmp_path, values, mode=0o600):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    path.chmod(mode)
    return str(path)


def test_config_precedence_file_env_flags(tmp_path):
    path = write_config(tmp_path, dict(BASE, drain_s=1, server_id="file"))
    env = {"CRATE_OPERATOR_SERVER_ID": "env", "CRATE_OPERATOR_DRAIN_S": "2"}
    config = co.load_config(path, env, {"server_id": "flag"})
    assert config.server_id == "flag"
    assert config.drain_s == 2.0


def test_config_unknown_key_named(tmp_path):
    path = write_config(tmp_path, dict(BASE, colour="blue"))
    with pytest.raises(co.ConfigError, match="unknown key 'colour'"):
        co.load_config(path, {}, {})


def test_config_unknown_env_key_named(tmp_path):
    path = write_config(tmp_path, BASE)
    with pytest.raises(co.ConfigError, match="CRATE_OPERATOR_NOPE"):
        co.load_config(path, {"CRATE_OPERATOR_NOPE": "1"}, {})


def test_config_requires_token(tmp_path):
    path = write_config(tmp_path, {"callback_secret": "s" * 32})
    with pytest.raises(co.ConfigError, match="token"):
        co.load_config(path, {}, {})


def test_config_token_file_mode_checked(tmp_path):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o644)
    path = write_config(tmp_path, {"token_file": str(token),
                                   "callback_secret": "s" * 32})
    with pytest.raises(co.ConfigError, match=str(token)):
        co.load_config(path, {}, {})
    token.chmod(0o600)
    assert co.load_config(path, {}, {}).token == "x" * 32


def test_config_masks_secrets(tmp_path):
    config = co.load_config(write_config(tmp_path, BASE), {}, {})
    shown = json.dumps(config.as_dict())
    assert "t" * 32 not in shown
    assert "s" * 32 not in shown


def test_config_list_from_env(tmp_path):
    path = write_config(tmp_path, BASE)
    env = {"CRATE_OPERATOR_SYSTEMCTL": '["nsenter", "-t", "1", "systemctl"]'}
    config = co.load_config(path, env, {})
    assert config.systemctl == ["nsenter", "-t", "1", "systemctl"]


def test_check_config_cli_exit_codes(tmp_path):
    good = write_config(tmp_path, BASE)
    script = str(pathlib.Path(co.__file__))
    ok = subprocess.run([sys.executable, script, "check-config", "--config",
                         good], capture_output=True, text=True)
    assert ok.returncode == 0
    assert "***" in ok.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(BASE, listen="nonsense")))
    failed = subprocess.run([sys.executable, script, "check-config",
                             "--config", str(bad)], capture_output=True,
                            text=True)
    assert failed.returncode != 0
    assert "listen" in failed.stderr


# --- store

def test_atomic_write_mode_and_content(tmp_path):
    path = str(tmp_path / "x.json")
    co.atomic_write_json(path, {"a": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert co.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_write_readers_never_see_partial(tmp_path):
    path = str(tmp_path / "r.json")
    co.atomic_write_json(path, {"n": 0, "pad": "x" * 100000})
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            try:
                value = co.read_json(path)
            except ValueError as exc:
                bad.append(exc)
                continue
            if value is None or len(value["pad"]) != 100000:
                bad.append(value)

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(200):
        co.atomic_write_json(path, {"n": n, "pad": "x" * 100000})
    stop.set()
    thread.join()
    assert bad == []


def test_store_lock_rejects_second_owner(tmp_path):
    first = co.Store(str(tmp_path))
    first.lock_exclusive()
    code = ("import sys; sys.path.insert(0, %r); import crate_operator as c; "
            "c.Store(%r).lock_exclusive()" % (str(pathlib.Path(co.__file__)
                                                  .parent), str(tmp_path)))
    other = subprocess.run([sys.executable, "-c", code], capture_output=True,
                           text=True)
    assert other.returncode != 0
    assert "in use by another crate-operator" in other.stderr


def test_store_seq_increases_across_threads(tmp_path):
    store = co.Store(str(tmp_path))
    seen = []
    lock = threading.Lock()

    def take():
        for _ in range(20):
            value = store.next_seq()
            with lock:
                seen.append(value)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == list(range(1, 81))


def test_store_seq_never_repeats_after_restart(tmp_path):
    first = co.Store(str(tmp_path))
    first_values = [first.next_seq() for _ in range(3)]
    # A new process on the same state_dir (a restart, or a crash right
    # after the values were handed out) continues above every one of them.
    second = co.Store(str(tmp_path))
    later = [second.next_seq() for _ in range(co.SEQ_BLOCK + 2)]
    assert first_values == [1, 2, 3]
    assert later[0] > first_values[-1]
    assert later == list(range(later[0], later[0] + co.SEQ_BLOCK + 2))
    third = co.Store(str(tmp_path))
    assert third.next_seq() > later[-1]


def test_store_seq_above_outbox_without_seq_file(tmp_path):
    first = co.Store(str(tmp_path))
    for _ in range(5):
        first.outbox_add({"seq": first.next_seq(), "event": "x"})
    # seq.json deleted by hand, or an older copy restored from a backup.
    os.unlink(os.path.join(str(tmp_path), "seq.json"))
    second = co.Store(str(tmp_path))
    assert second.next_seq() == 6
    second.outbox_add({"seq": 6, "event": "x"})
    # An older seq.json, restored from a backup.
    co.atomic_write_json(os.path.join(str(tmp_path), "seq.json"), {"seq": 2})
    third = co.Store(str(tmp_path))
    assert third.next_seq() == 7


def test_delivered_mark_skips_fsync(tmp_path, monkeypatch):
    """Only the mark of a finished event is written without fsync."""
    store = co.Store(str(tmp_path))
    event = {"seq": store.next_seq(), "event": "x", "attempts": 1}
    synced = []
    monkeypatch.setattr(co, "sync_fd", lambda fd, data_only=False:
                        synced.append(fd))
    store.outbox_update(dict(event, next_at=5.0))
    assert len(synced) == 2  # the file and its directory
    store.outbox_update(dict(event, delivered_at=6.0))
    store.outbox_update(dict(event, given_up_at=7.0))
    assert len(synced) == 2
    assert store.outbox_events() == [dict(event, given_up_at=7.0)]


def test_unreadable_outbox_event_skipped(tmp_path):
    """An outbox file left empty by a power loss is skipped, with a warning."""
    store = co.Store(str(tmp_path))
    first, second = store.next_seq(), store.next_seq()
    store.outbox_add({"seq": first, "event": "x"})
    with open(os.path.join(store.outbox_dir, f"{second:012d}.json"), "wb"):
        pass
    assert store.outbox_events() == [{"seq": first, "event": "x"}]
    assert store.outbox_after(0, 10) == ([{"seq": first, "event": "x"}],
                                         False)


def test_deferred_running_state_precedes_failure(tmp_path):
    """A deploy that fails before its first step still stores and sends
    "running" before "failed", and sends "running" once."""
    store = co.Store(str(tmp_path))
    config = co.load_config(write_config(tmp_path, BASE), {}, {})
    outbox = co.CallbackOutbox(store, config)
    outbox.stop()  # no delivery threads: the outbox files are checked

    class Failing:
        def run(self, job):
            raise RuntimeError("no app record")

    operator = types.SimpleNamespace(store=store, outbox=outbox, runtimes={},
                               strategies=Failing())
    record = {"deployment_id": 77, "app_id": 77, "state": "queued",
              "callback_url": "http://127.0.0.1:9/cb", "steps": []}
    co.DeployJob(operator, record, {"app_id": 77}).run()
    events = [e["event"] for e in store.outbox_events()]
    assert events == ["deployment.running", "deployment.failed"]
    assert store.deployment(77)["state"] == "failed"


def test_emit_stores_record_before_its_event(tmp_path):
    """Store the record before its event, and sync the record unless the
    caller passes sync=False. Only the event of a terminal state is
    synced, because after a restart a lost earlier event is followed by
    the terminal one."""
    order = []

    class Recording(co.Store):
        def save_deployment(self, record, sync=True):
            order.append(("record", record["state"], record["deployment_seq"],
                          sync))
            super().save_deployment(record, sync)

        def outbox_add(self, event, sync=True):
            order.append(("event", event["event"], sync))
            super().outbox_add(event, sync)

    store = Recording(str(tmp_path))
    config = co.load_config(write_config(tmp_path, BASE), {}, {})
    outbox = co.CallbackOutbox(store, config)
    outbox.stop()  # no delivery threads: only the order of the writes counts
    record = {"deployment_id": 9, "app_id": 9, "state": "running",
              "callback_url": "http://127.0.0.1:9/cb"}
    outbox.emit(record, "deployment.running")
    assert order == [("record", "running", 1, True),
                     ("event", "deployment.running", False)]
    assert store.deployment(9)["deployment_seq"] == 1
    outbox.emit(record, "deployment.canary_step", sync=False)
    assert order[2:] == [("record", "running", 2, False),
                         ("event", "deployment.canary_step", False)]
    record["state"] = "succeeded"
    outbox.emit(record, "deployment.succeeded", sync=False)
    assert order[4:] == [("record", "succeeded", 3, False),
                         ("event", "deployment.succeeded", True)]
    assert [e["event"] for e in store.outbox_events()] == [
        "deployment.running", "deployment.canary_step",
        "deployment.succeeded"]
    del record["callback_url"]
    record["state"] = "failed"
    outbox.emit(record, "deployment.failed")
    assert order[6:] == [("record", "failed", 3, True)]
    assert store.deployment(9)["state"] == "failed"


# === Cached status bodies (Store.deployment_view) ===

def record_on_disk(store, deployment_id) -> dict | None:
    """Read a record from its files, bypassing the store: the record file,
    or the change in its log with the highest rev when that is higher."""
    base = os.path.join(store.deployments_dir, str(deployment_id))
    record = co.read_json(base + ".json")
    if record is None:
        return None
    changes = []
    if os.path.exists(base + ".log"):
        with open(base + ".log", "rb") as handle:
            for line in handle:
                try:
                    changes.append(json.loads(line))
                except ValueError:
                    pass
    return max([record] + changes, key=lambda r: r.get("rev", 0))


def status_on_disk(store, deployment_id) -> bytes | None:
    """Render the record as it is on disk now, bypassing the cache."""
    record = record_on_disk(store, deployment_id)
    return None if record is None else co.render_status(record)


def test_record_changes_appended_until_terminal(tmp_path):
    store = co.Store(str(tmp_path))
    base = os.path.join(store.deployments_dir, "21")
    record = {"deployment_id": 21, "state": "queued", "steps": []}
    store.save_deployment(record)
    # The log is created empty beside the first write of the record.
    assert pathlib.Path(base + ".log").read_bytes() == b""
    first = pathlib.Path(base + ".json").read_bytes()
    for step in range(3):
        record.update(state="running", steps=record["steps"] + [step])
        store.save_deployment(record)
        # The record file keeps the first write; the log contains each change.
        assert pathlib.Path(base + ".json").read_bytes() == first
        assert store.deployment(21)["steps"] == list(range(step + 1))
        assert co.Store(str(tmp_path)).deployment(21) == record
    assert len(pathlib.Path(base + ".log").read_bytes().splitlines()) == 3
    record["state"] = "succeeded"
    store.save_deployment(record)
    assert not os.path.exists(base + ".log")
    assert co.read_json(base + ".json") == record
    assert list(co.Store(str(tmp_path)).iter_deployments()) == [record]


def test_progress_steps_skip_fsync(tmp_path, monkeypatch):
    """Write the start entries of PROGRESS_STEPS, and of every step after
    the journal marks traffic as moved, without fdatasync. Write the
    others with it. All of them are in the change log at once."""
    store = co.Store(str(tmp_path))
    record = {"deployment_id": 23, "app_id": 23, "state": "running",
              "steps": []}
    store.save_deployment(record)
    operator = types.SimpleNamespace(store=store)
    job = co.DeployJob(operator, record, {"app_id": 23})
    synced = []
    real_sync_fd = co.sync_fd
    monkeypatch.setattr(co, "sync_fd", lambda fd, data_only=False: (
        synced.append(fd), real_sync_fd(fd, data_only)))

    counts = {}
    for name in ("fetch_asset", "write_unit", "daemon_reload",
                 "start_instance", "health_check", "switch_route", "drain",
                 "stop_old"):
        synced.clear()
        job.step(name, lambda: None)
        counts[name] = len(synced)
    assert counts == {"fetch_asset": 0, "write_unit": 1, "daemon_reload": 0,
                      "start_instance": 0, "health_check": 0,
                      "switch_route": 1, "drain": 0, "stop_old": 1}

    # Once traffic moved for good, recovery reads the journal only.
    synced.clear()
    job.journal_moved()
    assert len(synced) == 1
    synced.clear()
    job.step("stop_old", lambda: None)
    assert synced == []

    on_disk = co.Store(str(tmp_path)).deployment(23)
    assert [s["name"] for s in on_disk["steps"]] == list(counts) + ["stop_old"]


def test_drain_counts_from_the_route_change(tmp_path, monkeypatch):
    """The drain step sleeps drain_s less the time since the last
    switch_route step ended, and never more than drain_s."""
    store = co.Store(str(tmp_path))
    record = {"deployment_id": 24, "app_id": 24, "state": "running",
              "steps": []}
    store.save_deployment(record)
    config = types.SimpleNamespace(drain_s=5.0)
    job = co.DeployJob(types.SimpleNamespace(store=store, config=config),
                       record, {"app_id": 24})
    slept = []
    monkeypatch.setattr(co.time, "sleep", slept.append)
    clock = [100.0]
    monkeypatch.setattr(co.time, "monotonic", lambda: clock[0])
    job.drain()  # no route change yet: the whole drain
    job.step("switch_route", lambda: None)
    clock[0] += 1.5  # journal and callback writes after the switch
    job.drain()
    clock[0] += 10.0
    job.drain()
    assert slept == [5.0, 3.5, 0.0]
    assert [s["message"] for s in record["steps"] if s["name"] == "drain"] \
        == ["5s", "5s", "5s"]


def test_record_log_torn_line_and_stale_log(tmp_path):
    store = co.Store(str(tmp_path))
    base = os.path.join(store.deployments_dir, "22")
    record = {"deployment_id": 22, "state": "queued"}
    store.save_deployment(record)
    store.save_deployment(dict(record, state="running", step=1))
    # A crash in the middle of the next append leaves half a line.
    with open(base + ".log", "ab") as handle:
        handle.write(b'{"deployment_id":22,"rev":9,"state":"runn')
    again = co.Store(str(tmp_path))
    assert again.deployment(22)["step"] == 1
    # A crash after folding the log into the record file, before the log
    # was deleted: the log is older and ignored.
    saved = pathlib.Path(base + ".log").read_bytes()
    again.save_deployment(dict(record, state="succeeded", rev=2))
    pathlib.Path(base + ".log").write_bytes(saved)
    assert co.Store(str(tmp_path)).deployment(22)["state"] == "succeeded"
    assert [r["state"] for r in co.Store(str(tmp_path)).deployments()] == \
        ["succeeded"]
    again.delete_deployment(22)
    assert os.listdir(store.deployments_dir) == []


def test_record_file_without_object_skipped(tmp_path):
    store = co.Store(str(tmp_path))
    store.save_deployment({"deployment_id": 25, "state": "queued"})
    store.save_deployment({"deployment_id": 25, "state": "running"})
    store.save_deployment({"deployment_id": 26, "state": "succeeded"})
    path = os.path.join(store.deployments_dir, "25.json")
    pathlib.Path(path).write_text("[1, 2]")
    again = co.Store(str(tmp_path))
    assert again.deployment(25) is None
    assert [r["deployment_id"] for r in again.iter_deployments()] == [26]


def test_record_log_folded_past_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(co, "RECORD_LOG_MAX", 400)
    store = co.Store(str(tmp_path))
    base = os.path.join(store.deployments_dir, "23")
    record = {"deployment_id": 23, "state": "running", "pad": "x" * 150}
    store.save_deployment(record)
    sizes = []
    for step in range(6):
        record["step"] = step
        store.save_deployment(record)
        sizes.append(os.path.getsize(base + ".log")
                     if os.path.exists(base + ".log") else 0)
        assert store.deployment(23) == record
    assert max(sizes) <= 400
    assert 0 in sizes[1:], sizes   # folded into 23.json at least once


def test_record_log_failed_append_cut_off(tmp_path, monkeypatch):
    store = co.Store(str(tmp_path))
    base = os.path.join(store.deployments_dir, "24")
    record = {"deployment_id": 24, "state": "running"}
    store.save_deployment(record)
    store.save_deployment(dict(record, step=1))
    size = os.path.getsize(base + ".log")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(co.os, "fdatasync", no_space)
    with pytest.raises(co.StorageError, match="24.log"):
        store.save_deployment(dict(record, step=2))
    monkeypatch.undo()
    # The failed line was cut off, so the next change is a line of its own.
    assert os.path.getsize(base + ".log") == size
    store.save_deployment(dict(record, step=3))
    assert co.Store(str(tmp_path)).deployment(24)["step"] == 3


def test_status_view_is_rendered_record():
    record = {"deployment_id": 7, "app_id": 3, "state": "running",
              "steps": [{"name": "start", "state": "done"}], "secret": "x"}
    body = co.render_status(record)
    assert json.loads(body) == co.status_document(record)
    assert b"secret" not in body


_STORE_OPS = st.lists(st.one_of(
    st.tuples(st.just("save"), st.sampled_from(["queued", "running",
                                                "succeeded", "failed"]),
              st.integers(0, 3)),
    st.tuples(st.just("delete"), st.just(""), st.integers(0, 3)),
    st.tuples(st.just("read"), st.just(""), st.integers(0, 3))),
    max_size=25)


@settings(max_examples=40, deadline=None)
@given(ops=_STORE_OPS)
def test_status_view_right_after_each_change(tmp_path_factory, ops):
    store = co.Store(str(tmp_path_factory.mktemp("view")))
    for step, (op, state, index) in enumerate(ops):
        deployment_id = 500 + index
        if op == "save":
            store.save_deployment({"deployment_id": deployment_id,
                                   "app_id": index, "state": state,
                                   "steps": [{"n": step}]})
        elif op == "delete":
            store.delete_deployment(deployment_id)
        # Every id is read after every operation, so that a view cached
        # before a change would be returned after it.
        for other in range(500, 504):
            assert store.deployment_view(other, co.render_status) == \
                status_on_disk(store, other), (step, op, other)


def test_status_view_skips_render_of_an_older_file(tmp_path):
    """A record saved by another thread while a read renders the old file."""
    store = co.Store(str(tmp_path))
    store.save_deployment({"deployment_id": 9, "state": "running"})
    rendering = threading.Event()
    saved = threading.Event()
    results = []

    def slow_render(record):
        rendering.set()
        assert saved.wait(10), "the writer thread did not save in 10 s"
        return co.render_status(record)

    reader = threading.Thread(target=lambda: results.append(
        store.deployment_view(9, slow_render)))
    reader.start()
    assert rendering.wait(10)
    writer = threading.Thread(target=store.save_deployment,
                              args=({"deployment_id": 9,
                                     "state": "succeeded"},))
    writer.start()
    writer.join()
    saved.set()
    reader.join()
    # The reader returned the file it read, which was current then.
    assert json.loads(results[0])["state"] == "running"
    # The old rendering did not enter the cache.
    assert json.loads(store.deployment_view(9, co.render_status))["state"] \
        == "succeeded"


def test_status_view_after_restart(tmp_path):
    """A new Store (an operator restart) reads what the last one wrote."""
    first = co.Store(str(tmp_path))
    first.save_deployment({"deployment_id": 11, "state": "running"})
    assert json.loads(first.deployment_view(11, co.render_status))["state"] \
        == "running"
    first.save_deployment({"deployment_id": 11, "state": "failed"})
    second = co.Store(str(tmp_path))
    assert second.deployment_view(11, co.render_status) == \
        status_on_disk(second, 11)
    assert json.loads(second.deployment_view(11, co.render_status))["state"] \
        == "failed"


def test_status_view_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(co, "STATUS_CACHE_MAX", 3)
    store = co.Store(str(tmp_path))
    for deployment_id in range(10):
        store.save_deployment({"deployment_id": deployment_id,
                               "state": "succeeded"})
        store.deployment_view(deployment_id, co.render_status)
    assert list(store._views) == ["7", "8", "9"]
    assert store.deployment_view(1, co.render_status) == \
        status_on_disk(store, 1)


def test_request_digest_keyed_not_plain(tmp_path):
    store = co.Store(str(tmp_path))
    body = {"registry_credentials": {"password": "hunter2"}}
    digest = store.request_digest(body)
    plain = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    assert digest != plain.hexdigest()
    assert digest == store.request_digest(dict(body))
    other = co.Store(str(tmp_path / "other"))
    assert other.request_digest(body) != digest


def test_store_domain_and_port_map(tmp_path):
    store = co.Store(str(tmp_path))
    store.save_app({"app_id": 1, "domain": "a.example.test",
                    "instances": {"blue": {"port": 18001}}})
    # Built from the files on first use, then kept current by save_app and
    # delete_app, so every result below must match the record files.
    assert store.apps_with_domain("a.example.test") == [1]
    assert store.used_ports() == {18001}
    store.save_app({"app_id": 2, "domain": "a.example.test",
                    "instances": {"x": {"port": 18002}, "y": {"port": 18003}}})
    assert store.apps_with_domain("a.example.test") == [1, 2]
    store.save_app({"app_id": 1, "domain": "b.example.test", "instances": {}})
    assert store.apps_with_domain("a.example.test") == [2]
    assert store.apps_with_domain("b.example.test") == [1]
    assert store.used_ports() == {18002, 18003}
    store.delete_app(2)
    assert store.apps_with_domain("a.example.test") == []
    assert store.used_ports() == set()
    fresh = co.Store(str(tmp_path))
    assert fresh.apps_with_domain("b.example.test") == [1]
    assert fresh.used_ports() == set()


# --- systemd rendering

ENV_CASES = {
    "SPACES": "hello world",
    "QUOTES": 'say "hi" and \'bye\'',
    "DOLLAR": "$HOME ${PATH} $$",
    "PERCENT": "(uid=%s) 50% a%20b %n %%",
    "BACKSLASH": "a\\b\\\\c\\",
    "TABS": "a\tb",
    "NEWLINES": "-----BEGIN KEY-----\nabc\n-----END KEY-----\n",
    "EQUALS": "a=b=c",
    "EMPTY": "",
    "UNICODE": "grüße ☃ 日本",
    "BACKTICK": "`id`",
}


def parse_env_file(text):
    """Parse env-file double-quoted values the way systemd 252 does."""
    out = {}
    i = 0
    while i < len(text):
        if text[i] == "#":
            i = text.index("\n", i) + 1
            continue
        eq = text.index("=", i)
        name = text[i:eq]
        assert text[eq + 1] == '"'
        j = eq + 2
        value = []
        while text[j] != '"':
            if text[j] == "\\" and text[j + 1] in '"\\`$':
                value.append(text[j + 1])
                j += 2
            else:
                value.append(text[j])
                j += 1
        out[name] = "".join(value)
        i = text.index("\n", j) + 1
    return out


def test_env_file_round_trip():
    text = co.render_env_file(ENV_CASES)
    assert parse_env_file(text) == ENV_CASES


@settings(max_examples=300, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\x00")))
def test_env_file_round_trip_any_text(value):
    assert parse_env_file(co.render_env_file({"V": value})) == {"V": value}


def test_env_file_rejects_nul():
    with pytest.raises(co.StepError):
        co.render_env_file({"A": "x\x00y"})


def test_exec_word_escaping():
    assert co.escape_unit_word("/a b") == '"/a b"'
    assert co.escape_unit_word("50%") == '"50%%"'
    assert co.escape_unit_word("$PORT") == '"$$PORT"'
    assert co.escape_unit_word('a"b\\c') == '"a\\"b\\\\c"'
    assert co.escape_unit_word("a\nb") == '"a\\x0ab"'


def unit_spec(**changes):
    spec = {"app_id": 7, "instance_id": "blue", "version": "v1%x",
            "deployment_id": "9", "exec_argv": ["/srv/apps/7/r/app", "--x=$Y"],
            "workdir": "/srv/apps/7/r", "env_file": "/srv/apps/7/env/b.env",
            "app_user": "dynamic", "stop_timeout_s": 30.0,
            "restart_sec_s": 1.0}
    spec.update(changes)
    return spec


def test_unit_rendering_contents():
    text = co.render_unit(unit_spec())
    assert "DynamicUser=yes" in text
    assert "Restart=on-failure" in text
    assert "RestartSec=1s" in text
    assert 'ExecStart="/srv/apps/7/r/app" "--x=$$Y"' in text
    assert "version v1%%x" in text
    assert "EnvironmentFile=/srv/apps/7/env/b.env" in text
    assert "NoNewPrivileges=yes" in text
    named = co.render_unit(unit_spec(app_user="crate-app"))
    assert "User=crate-app" in named
    assert "DynamicUser" not in named


def test_unit_rejects_unsafe_paths():
    with pytest.raises(co.StepError):
        co.render_unit(unit_spec(env_file="/srv/a b/env"))
    with pytest.raises(co.StepError):
        co.render_unit(unit_spec(workdir="/srv/../etc"))


@pytest.mark.skipif(not shutil.which("systemd-analyze"),
                    reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    app = tmp_path / "r"
    app.mkdir()
    exe = app / "app"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    env = tmp_path / "b.env"
    env.write_text(co.render_env_file(ENV_CASES))
    spec = unit_spec(exec_argv=[str(exe), "%h", "$X", ";"],
                     workdir=str(app), env_file=str(env))
    unit = tmp_path / "crate-app-7-blue.service"
    unit.write_text(co.render_unit(spec))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(unit)], capture_output=True, text=True)
    relevant = [line for line in result.stderr.splitlines()
                if "crate-app-7-blue" in line]
    assert relevant == []


# --- daemon-reload coalescing (a fake systemctl that records its calls)

def test_daemon_reload_coalesced(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nsleep 0.2\n")
    fake.chmod(0o755)
    systemd = co.Systemd([str(fake)], str(tmp_path))
    threads = [threading.Thread(target=systemd.daemon_reload)
               for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reloads = calls.read_text().splitlines()
    assert 1 <= len(reloads) <= 2
    assert time.monotonic() - started < 1.5


def test_daemon_reload_after_request_runs_again(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    systemd = co.Systemd([str(fake)], str(tmp_path))
    systemd.daemon_reload()
    systemd.daemon_reload()
    assert len(calls.read_text().splitlines()) == 2


def _recording_systemd(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    return co.Systemd([str(fake)], str(tmp_path)), calls


def test_start_retried_after_reset_failed(tmp_path):
    """Run a start or restart alone while it succeeds. After a failed
    one, run reset-failed and try once more, and raise that try's error."""
    calls = tmp_path / "calls"
    fails = tmp_path / "fails"
    fake = tmp_path / "systemctl"
    # Fails a start or restart while the file "fails" is not empty, and
    # removes one line of it per failure.
    fake.write_text(
        f"#!/bin/sh\necho \"$@\" >> {calls}\n"
        f"case \"$1\" in start|restart)\n"
        f"  if [ -s {fails} ]; then sed -i 1d {fails}; "
        f"echo 'start limit hit' >&2; exit 1; fi;;\nesac\n")
    fake.chmod(0o755)
    systemd = co.Systemd([str(fake)], str(tmp_path))
    unit = "crate-app-5-blue.service"
    systemd.start(unit)
    systemd.restart(unit)
    assert calls.read_text().splitlines() == [f"start {unit}",
                                              f"restart {unit}"]
    calls.write_text("")
    fails.write_text("x\n")
    systemd.restart(unit)
    assert calls.read_text().splitlines() == [
        f"restart {unit}", f"reset-failed {unit}", f"restart {unit}"]
    calls.write_text("")
    fails.write_text("x\nx\n")
    with pytest.raises(co.SystemdError, match="start limit hit"):
        systemd.start(unit)
    assert calls.read_text().splitlines() == [
        f"start {unit}", f"reset-failed {unit}", f"start {unit}"]


def test_enable_makes_the_boot_symlink(tmp_path):
    """enable and disable touch only <unit>'s relative link in the .wants
    directory, as systemctl would make it. Neither runs systemctl."""
    systemd, calls = _recording_systemd(tmp_path)
    unit = "crate-app-5-blue.service"
    link = tmp_path / "multi-user.target.wants" / unit
    assert not systemd.is_enabled(unit)
    systemd.enable(unit)
    systemd.enable(unit)
    assert os.readlink(link) == "../" + unit
    assert systemd.is_enabled(unit)
    assert [p.name for p in link.parent.iterdir()] == [unit]
    systemd.disable(unit)
    systemd.disable(unit)
    assert not os.path.lexists(link)
    assert not calls.exists()


def test_failed_disable_still_stops(tmp_path):
    systemd, calls = _recording_systemd(tmp_path)
    unit = "crate-app-5-blue.service"
    # A directory in place of the link makes the unlink fail.
    (tmp_path / "multi-user.target.wants" / unit).mkdir(parents=True)
    with pytest.raises(co.SystemdError, match="cannot disable"):
        systemd.disable_and_stop(unit)
    assert calls.read_text().splitlines() == [f"stop {unit}"]


def test_show_many_reads_blocks_by_id(tmp_path, monkeypatch):
    """One systemctl show runs per SHOW_MANY_UNITS units. Each block is
    matched to its unit by Id, and a unit missing from the output is left
    out."""
    monkeypatch.setattr(co, "SHOW_MANY_UNITS", 2)
    calls = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text(
        "#!/bin/sh\n"
        f"echo \"$@\" >> {calls}\n"
        "shift 2\n"
        "for unit in \"$@\"; do\n"
        "  [ \"$unit\" = crate-app-3-c.service ] && continue\n"
        "  printf 'Id=%s\\nActiveState=active\\nResult=x=y\\n\\n' \"$unit\"\n"
        "done\n")
    fake.chmod(0o755)
    systemd = co.Systemd([str(fake)], str(tmp_path))
    units = [f"crate-app-{n}-{c}.service" for n, c in ((1, "a"), (2, "b"),
                                                        (3, "c"))]
    properties = systemd.show_many(units, "ActiveState", "Result")
    assert properties == {units[0]: {"ActiveState": "active", "Result": "x=y"},
                     units[1]: {"ActiveState": "active", "Result": "x=y"}}
    assert calls.read_text().splitlines() == [
        f"show --property=Id,ActiveState,Result -- {units[0]} {units[1]}",
        f"show --property=Id,ActiveState,Result -- {units[2]}"]


def test_loopback_listeners_by_inode(tmp_path):
    """Sockets that accept 127.0.0.1:port count, by inode. Others do not."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    assert co.loopback_listeners(port) == set()  # bound, not listening
    listener.listen()
    other = socket.socket()
    other.bind(("127.0.0.2", port))
    other.listen()
    try:
        inode = os.fstat(listener.fileno()).st_ino
        assert co.loopback_listeners(port) == {inode}
    finally:
        listener.close()
        other.close()
    assert co.loopback_listeners(port) == set()
    wildcard = socket.socket(socket.AF_INET6)
    wildcard.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    wildcard.bind(("::", port))
    wildcard.listen()
    try:
        assert co.loopback_listeners(port) == {
            os.fstat(wildcard.fileno()).st_ino}
    finally:
        wildcard.close()


def test_listener_wait_ends_on_listen():
    """End the pause after a refused probe once the port accepts a
    connection, and sleep the whole pause while it does not."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    started = time.monotonic()
    co.wait_for_listener(port, 0.3)
    assert time.monotonic() - started >= 0.3
    timer = threading.Timer(0.3, listener.listen)
    timer.start()
    try:
        started = time.monotonic()
        co.wait_for_listener(port, 5.0)
        waited = time.monotonic() - started
        assert 0.25 <= waited < 1.0, waited
    finally:
        timer.cancel()
        listener.close()


def test_no_restart_without_listeners(monkeypatch):
    """When the listening sockets cannot be read, an in-place update stops
    and starts the unit, with start()'s port check, instead of a restart."""
    def unavailable(port):
        raise OSError(co.errno.EAFNOSUPPORT, "netlink is not available")

    monkeypatch.setattr(co, "loopback_listeners", unavailable)
    instance = {"app_id": 5, "instance_id": "blue", "port": 10001}
    assert co.Strategies._listeners_before_restart(None, instance) is None


def test_systemd_refuses_foreign_units(tmp_path):
    systemd = co.Systemd(["true"], str(tmp_path))
    with pytest.raises(co.OperatorError):
        systemd.write_unit("ssh.service", "x")


# --- signing and logging

def test_sign_body_matches_hmac():
    body = b'{"a":1}'
    expected = hmac.new(b"key", body, hashlib.sha256).hexdigest()
    assert co.sign_body("key", body) == "sha256=" + expected


def test_log_value_escapes_control_characters():
    rendered = co._log_value("evil\nlevel=error")
    assert "\n" not in rendered
    assert rendered.startswith('"')


def test_utc_now_format():
    text = co.utc_now(0)
    assert text == "1970-01-01T00:00:00.000Z"
