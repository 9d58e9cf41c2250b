#!/usr/bin/env python3
"""crate-operator: the per-host agent that deploys apps and routes their domains.

A hosting platform calls this daemon over HTTP (see ``GET /v1/openapi.json``).
On its own host the daemon:

* runs binary apps as systemd units (one unit per instance, an
  EnvironmentFile per instance, read-only releases unpacked from a raw
  executable or a tar.gz, tar or zip archive under ``apps_dir``);
* runs docker apps as containers of a local dockerd, reached over the
  Engine API at ``docker_socket``. Each instance and deployment gets one
  labelled container that publishes its port on 127.0.0.1 only;
* routes each app's domain to its serving instances through the Caddy
  admin API (one route per app, addressed by its ``@id``);
* answers deploy, delete and lifecycle calls with 202, runs the work as a
  job of that app (one job at a time per app, apps in parallel) and POSTs
  signed callbacks to the platform at every state change;
* keeps its state in JSON files under ``state_dir`` written atomically.

Lifecycle: ``serve`` loads the configuration (defaults, then the JSON file,
then ``CRATE_OPERATOR_<KEY>`` variables, then flags), takes an exclusive lock
on ``state_dir``, queues recovery jobs that finish or roll back what a
previous process left running, starts the callback delivery, history
pruning and reconciliation threads and then the HTTP listener.  SIGTERM and
SIGINT stop the listener and wait up to ``shutdown_timeout_s`` for running
jobs; SIGHUP re-reads token files and TLS certificates.

Files it touches: ``state_dir`` (state and callback outbox), ``apps_dir``
(releases, environment files and docker bind-mount data), ``unit_dir``
(``crate-app-*.service`` units only), dockerd's containers and volumes
named ``crate-*`` with the label ``crate.managed=1``.  Sockets: the listen
address, the Caddy admin API, dockerd's socket, the callback and asset URLs
named in requests.

Known limitations: see the README.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import copy
import datetime
import errno
import fcntl
import fractions
import functools
import grp
import gzip
import hashlib
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import posixpath
import pwd
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import string
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import zipfile
import zlib
from typing import Any, Callable, NamedTuple

__version__ = "0.1.0"

LOG = logging.getLogger("crate_operator")


# === Tunables ===

# Every configuration key: default, type and meaning.  Units are in the name
# (``_s`` seconds, ``_bytes`` bytes).  Secrets are masked by check-config.
CONFIG_SPEC = {
    "listen": ("127.0.0.1:8750", str,
               "address:port of the HTTP API; keep it on loopback or behind TLS"),
    "token": (None, str, "bearer token every /v1 call must present"),
    "token_file": (None, str, "file holding the bearer token (mode 0600)"),
    "tokens": ([], list,
               "more bearer tokens as a list of {\"name\", \"token\"} "
               "objects; token and token_file add one named 'default'"),
    "tokens_dir": (None, str,
                   "directory of token files (mode 0600), each named after "
                   "its token; re-read on SIGHUP"),
    "tls_cert_file": (None, str,
                      "PEM certificate chain of the HTTPS listener; re-read "
                      "on SIGHUP"),
    "tls_key_file": (None, str,
                     "PEM private key of tls_cert_file (mode 0600); re-read "
                     "on SIGHUP"),
    "tls_client_ca_file": (None, str,
                           "PEM CA certificates that must have signed every "
                           "client certificate (mutual TLS)"),
    "allow_plaintext": (False, bool,
                        "allow plain HTTP on a listen address that is not "
                        "loopback"),
    "state_dir": ("/var/lib/crate-operator", str,
                  "JSON state, callback outbox and lock file"),
    "apps_dir": ("/srv/crate-apps", str,
                 "releases and environment files, one directory per app"),
    "unit_dir": ("/etc/systemd/system", str,
                 "directory the app units are written to"),
    "systemctl": (["systemctl"], list,
                  "systemctl command as an argument list"),
    "caddy_admin": ("http://127.0.0.1:2019", str,
                    "Caddy admin API: http URL or unix socket path"),
    "caddy_server": ("crate", str, "name of the Caddy server holding app routes"),
    "caddy_listen": ([":443"], list, "listen addresses of that server"),
    "caddy_automatic_https": (True, bool,
                              "leave Caddy's automatic HTTPS on for app routes"),
    "docker_socket": ("/var/run/docker.sock", str, "dockerd Engine API socket"),
    "docker_pull_timeout_s": (600.0, float, "time limit of one image pull"),
    "callback_secret": (None, str, "HMAC-SHA256 key for X-Crate-Signature"),
    "callback_secret_file": (None, str, "file holding callback_secret"),
    "app_user": ("crate-app", str,
                 "user the app units run as; 'dynamic' means DynamicUser=yes"),
    "server_id": (socket.gethostname(), str,
                  "this host's id, checked by domain updates"),
    "health_timeout_s": (60.0, float, "time a new instance has to pass its check"),
    "health_interval_s": (0.5, float,
                          "pause between two health probes (ended early "
                          "when a binary app starts to listen)"),
    "health_grace_s": (3.0, float,
                       "without a health path: time the unit must stay active"),
    "drain_s": (5.0, float,
                "time between a route switch and stopping the old version"),
    "stop_timeout_s": (30.0, float, "TimeoutStopSec of app units"),
    "restart_sec_s": (1.0, float, "RestartSec of app units (must be > 0)"),
    "callback_timeout_s": (10.0, float, "time limit of one callback POST"),
    "callback_backoff_s": (1.0, float, "first retry delay of a failed callback"),
    "callback_backoff_max_s": (60.0, float, "upper bound of the retry delay"),
    "callback_retry_window_s": (900.0, float,
                                "time after which an undelivered callback is "
                                "given up"),
    "download_timeout_s": (600.0, float, "time limit of one asset download"),
    "max_asset_bytes": (1 << 30, int, "size limit of one asset"),
    "max_unpacked_bytes": (4 << 30, int,
                           "size limit of the files unpacked from one archive"),
    "max_archive_members": (50000, int,
                            "limit on the number of members of one archive"),
    "release_retention": (3, int,
                          "releases kept per app; the serving and previous "
                          "releases are kept in addition"),
    "max_body_bytes": (1 << 20, int, "size limit of one request body"),
    "request_timeout_s": (30.0, float,
                          "socket timeout while reading a request"),
    "request_deadline_s": (60.0, float,
                           "time limit to receive one request's headers and "
                           "body, counted from its first byte"),
    "max_header_bytes": (16384, int,
                         "size limit of a request's header lines together"),
    "max_header_count": (50, int, "limit on the header lines of a request"),
    "max_connections": (64, int,
                        "open API connections; more are answered 503 and "
                        "closed"),
    "max_json_depth": (32, int,
                       "nesting limit of arrays and objects in a JSON body"),
    "log_format": ("text", str, "'text' (key=value) or 'json'"),
    "port_range_min": (20000, int,
                       "lowest loopback port the operator picks for a "
                       "bluegreen sibling in the instances model"),
    "port_range_max": (29999, int, "highest such port"),
    "canary_steps": ([10, 25, 50, 100], list,
                     "traffic percentages of a canary, increasing, ending "
                     "at 100"),
    "reconcile_interval_s": (30.0, float,
                             "pause between two reconciliation passes"),
    "shutdown_timeout_s": (20.0, float,
                           "time SIGTERM waits for running jobs"),
    "canary_pause_s": (60.0, float,
                       "time each canary step lasts while the canary is "
                       "watched"),
    "metrics_public": (False, bool,
                       "serve GET /metrics without the bearer token"),
    "events_retention": (1000, int,
                         "delivered or given-up callback events kept in the "
                         "outbox for GET /v1/events"),
    "history_max_records": (1000, int,
                            "finished deployment records kept; older ones "
                            "are removed in the background"),
    "history_max_age_s": (30 * 86400.0, float,
                          "finished deployment records older than this are "
                          "removed in the background"),
    "history_prune_interval_s": (300.0, float,
                                 "pause between two runs of history pruning"),
    "outbound_allow": ([], list,
                       "host names and CIDR networks asset_url and "
                       "callback_url may reach; empty allows every "
                       "destination not blocked (.example.com matches "
                       "subdomains)"),
    "outbound_block": (["0.0.0.0/8", "169.254.0.0/16", "fe80::/10",
                        "100.100.100.200/32", "fd00:ec2::254/128",
                        "224.0.0.0/4", "255.255.255.255/32", "ff00::/8"],
                       list,
                       "host names and CIDR networks asset_url and "
                       "callback_url may never reach; checked after DNS "
                       "resolution and before the allow list"),
}

# History pruning sleeps PRUNE_PAUSE_S (seconds) after every PRUNE_BATCH
# records it reads or removes, so that status reads keep their latency.
PRUNE_BATCH = 10
PRUNE_PAUSE_S = 0.01
# Time a domain update waits for the app's running job before it answers
# 409 "deploy in progress".
DOMAIN_UPDATE_WAIT_S = 5.0
# Ports handed to a bluegreen sibling stay reserved this long (seconds), so
# two deploys running at once never pick the same one before it is recorded.
PORT_RESERVATION_S = 600

SECRET_KEYS = frozenset({"token", "callback_secret"})
ENV_PREFIX = "CRATE_OPERATOR_"
DEFAULT_CONFIG_PATH = "/etc/crate-operator/config.json"

# Retries of a failed asset connection before the deployment fails.
DOWNLOAD_ATTEMPTS = 3
# Redirects followed for an asset URL.
DOWNLOAD_MAX_REDIRECTS = 5
# A download logs its progress each time this many more bytes arrived.
DOWNLOAD_PROGRESS_BYTES = 64 << 20
# A zip member larger than ARCHIVE_RATIO_MIN_BYTES may expand at most
# ARCHIVE_MAX_RATIO times its compressed size.  Deflate reached 1028:1 on
# 32 MiB of zeros (Python's zlib, level 6), while code, text and binaries
# typically compress 2:1 to 10:1 (an estimate).
ARCHIVE_MAX_RATIO = 100
ARCHIVE_RATIO_MIN_BYTES = 1 << 20
# Central directory bytes allowed per permitted zip member, which bounds the
# memory zipfile needs to read the directory.
# NOTE: 512 is an estimate.  An entry is 46 bytes plus its name and extra
# fields, usually under 200 bytes.
ZIP_DIRECTORY_BYTES_PER_MEMBER = 512
# Size limit of a Procfile and of a symlink target read from a zip archive.
PROCFILE_MAX_BYTES = 64 << 10
LINK_TARGET_MAX_BYTES = 4096
# Directories systemd searches for a program name without a slash
# (systemd 252, systemd.service(5) "COMMAND LINES").
EXEC_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Time limit of one journalctl call of GET /v1/app/logs.
JOURNAL_TIMEOUT_S = 10.0
# Byte limit of the log lines one GET /v1/app/logs returns.
LOGS_MAX_BYTES = 256 << 10
# Line limits of GET /v1/app/logs and page size limit of GET /v1/events.
LOGS_DEFAULT_LINES = 100
LOGS_MAX_LINES = 1000
EVENTS_DEFAULT_LIMIT = 100
EVENTS_MAX_LIMIT = 1000
# Time a health probe waits for one HTTP answer.
HEALTH_PROBE_TIMEOUT_S = 2.0
# Minimum time between two unit state checks (a systemctl call) while a
# health check waits; the first check comes after this time of failed probes.
# Each check stops the probes for one systemctl call (10 to 30 ms), so it
# comes after the start-up time of a typical app, not during it; a unit that
# exits is reported at most this much later.
HEALTH_UNIT_CHECK_S = 0.5
# The detail of a health probe whose connection was refused: nothing
# listens on the port yet.
PROBE_REFUSED = "connection refused"
# While nothing listens on the port of a binary instance, its health check
# tries to connect this often and probes again as soon as a connection is
# accepted, instead of a whole health_interval_s after the refused probe
# (see wait_for_listener).
LISTEN_POLL_S = 0.005
# Prefix of every unit this program writes; nothing else is touched.
UNIT_PREFIX = "crate-app-"
# The target that starts app units at boot: their [Install] WantedBy=.
BOOT_TARGET = "multi-user.target"
# Units per `systemctl show` call when the reconciler checks all of them.
SHOW_MANY_UNITS = 200
# Newest Engine API this program speaks (docker 20.10); newer daemons are
# asked for this version.
DOCKER_API_MAX = (1, 41)
# Oldest Engine API that has HostConfig.Mounts, which bind mounts rely on.
DOCKER_API_MIN = (1, 25)
# Time limit of one Engine API call other than pulls and stops.
DOCKER_CALL_TIMEOUT_S = 60.0
# Added to a container's stop timeout to bound the HTTP call that waits
# for the stop.
DOCKER_STOP_MARGIN_S = 30.0
# Size limits of a container's json-file log (dockerd's own units).
DOCKER_LOG_MAX_SIZE = "10m"
DOCKER_LOG_MAX_FILES = "3"
# Owner of app data directories and user of containers when app_user is
# "dynamic": nobody:nogroup on Debian.
NOBODY_UID = 65534
NOBODY_GID = 65534
# Deployments whose rendered status the store keeps in memory. The body of
# a first binary deploy is about 1.5 KB, so 512 bodies take about 1 MB;
# records with many steps or instances take more.
STATUS_CACHE_MAX = 512

# Longest wait of a reconciliation pass for one app's check before it goes
# on to the next app (a deploy of that app may run first).
RECONCILE_APP_WAIT_S = 5.0

# Callback seq values reserved by one durable write of seq.json.
SEQ_BLOCK = 64
# Size past which a deployment's change log is folded into its record file
# (see Store.save_deployment). A bluegreen deploy appends about 10 lines of
# 2-4 KB each.
RECORD_LOG_MAX = 256 << 10

# Test-only: the name of a deploy step at which the process kills itself
# with SIGKILL, so that the tests can crash it at every step.
_CRASH_AT_STEP = os.environ.get("CRATE_TEST_CRASH_AT_STEP")

STATES_TERMINAL = frozenset({"succeeded", "failed", "rolled_back", "cancelled"})


# === Errors ===

class OperatorError(Exception):
    """Base of every error this program raises on purpose.

    ``status`` is the HTTP status a request handler reports for it.
    """

    status = 500


class ConfigError(OperatorError):
    """Raised when the configuration is invalid."""


class RequestError(OperatorError):
    """Raised when a request is invalid; ``errors`` lists each field."""

    status = 400

    def __init__(self, message: str, errors: list | None = None,
                 status: int = 400):
        super().__init__(message)
        self.errors = errors or []
        self.status = status


class ConflictError(OperatorError):
    """Raised when a request contradicts the state of the host."""

    status = 409


class NotFoundError(OperatorError):
    """Raised when a requested record does not exist."""

    status = 404


class StorageError(OperatorError):
    """Raised when a state or release file cannot be written (disk full,
    read-only file system, permissions)."""

    status = 507


class StepError(OperatorError):
    """Raised when a deploy step fails; the message names what and why."""


class SystemdError(StepError):
    """Raised when a systemctl call fails; counted as an adapter error."""

    def __init__(self, *args):
        super().__init__(*args)
        METRICS.inc("crate_adapter_errors_total", {"adapter": "systemd"})


class FetchError(StepError):
    """Raised when an asset cannot be downloaded or verified."""


class ArchiveError(StepError):
    """Raised when an archive or one of its members is unsafe or invalid.

    ``member`` is the member's name as stored in the archive, or None when
    the problem concerns the whole archive.
    """

    def __init__(self, member: str | None, reason: str):
        if member is None:
            message = f"archive rejected: {reason}"
        else:
            message = f"archive member {member!r} rejected: {reason}"
        super().__init__(message)
        self.member = member
        self.reason = reason


class DockerError(StepError):
    """Raised when dockerd rejects a call, cannot be reached or a pull fails.

    ``http_status`` is dockerd's HTTP status, or None without a response.
    """

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status
        METRICS.inc("crate_adapter_errors_total", {"adapter": "docker"})


# === Logging ===

_LOG_UNSAFE = re.compile(r'[\x00-\x20"\\=\x7f]')


def _log_value(value) -> str:
    """Render one value for the key=value format, escaping untrusted text."""
    if type(value) is int:  # ids and counts; bool is left to json (true)
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not _LOG_UNSAFE.search(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """Format records as ``ts=.. level=.. event=.. key=value ...`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": utc_now(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        line = " ".join(f"{k}={_log_value(v)}" for k, v in fields.items()
                        if v is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """Format records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": utc_now(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str, ensure_ascii=False)


def log(event: str, level: int = logging.INFO, exc_info=None, **fields):
    """Log one event with its ids; callers never pass secrets or env values."""
    LOG.log(level, event, extra={"fields": fields}, exc_info=exc_info)


# Seconds the current thread spent waiting for systemctl, the Caddy admin
# API and fsync, and its CPU time, since its last reset_waits(): a deploy
# job and an HTTP request log them when they end, so their own time can be
# told from the time of the services they called, also while other threads
# call them.
_WAITS = threading.local()
WAIT_KINDS = ("systemctl", "caddy", "storage")


def count_wait(kind: str, seconds: float) -> None:
    """Add ``seconds`` to this thread's wait for ``kind`` (one of
    WAIT_KINDS), or with ``kind`` "cpu" the CPU time of a job that ran
    for this thread."""
    setattr(_WAITS, kind, getattr(_WAITS, kind, 0.0) + seconds)


def reset_waits() -> None:
    """Start counting this thread's waits and CPU time from zero."""
    _WAITS.systemctl = _WAITS.caddy = _WAITS.storage = 0.0
    _WAITS.cpu = 0.0  # of jobs that ran for this thread (run_exclusive)
    _WAITS.cpu_start = time.thread_time()


def thread_cpu_s() -> float:
    """Return this thread's CPU seconds since reset_waits()."""
    now = time.thread_time()
    return now - getattr(_WAITS, "cpu_start", now) + getattr(_WAITS, "cpu", 0.0)


def waits_ms() -> dict:
    """Return this thread's waits and CPU time as log fields in ms."""
    fields = {f"{kind}_ms": round(getattr(_WAITS, kind, 0.0) * 1000, 1)
              for kind in WAIT_KINDS}
    fields["cpu_ms"] = round(thread_cpu_s() * 1000, 1)
    return fields


def setup_logging(log_format: str) -> None:
    """Send log lines to stderr (the journal under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(KeyValueFormatter())
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    # The formatters use none of the caller's file and line, thread or
    # process fields, which logging otherwise collects for every record.
    # Switched off as the "Optimization" section of the logging HOWTO
    # describes, a line took 26 us instead of 35 in a loop here.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def utc_now(timestamp: float | None = None) -> str:
    """Return an RFC 3339 UTC timestamp with millisecond precision."""
    if timestamp is None:
        timestamp = time.time()
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{moment.microsecond // 1000:03d}Z"


# === Metrics ===
#
# A small registry rendered in the Prometheus text exposition format 0.0.4.
# Every metric is declared once with its type and help text.  inc, set and
# observe raise KeyError for an undeclared name, so a typo fails loudly
# instead of creating a new series.  Label values come from bounded sets
# (endpoint names, kinds, strategies, states), never from request paths.

# Upper bounds (seconds) of the deployment duration buckets.  Deploys wait
# for downloads and health checks, so they take seconds to minutes.
DEPLOY_DURATION_BUCKETS_S = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def _metric_label_value(text: str) -> str:
    """Escape a label value: backslash, double quote and line feed."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _metric_labels(labels: tuple, extra: tuple = ()) -> str:
    pairs = list(labels) + list(extra)
    if not pairs:
        return ""
    inner = ",".join(f'{key}="{_metric_label_value(str(value))}"'
                     for key, value in pairs)
    return "{" + inner + "}"


class MetricsRegistry:
    """Thread-safe counters, gauges and histograms with their HELP and TYPE.

    Use: ``declare(name, kind, help_text, buckets=None)`` once, then
    ``inc(name, labels, value)`` for counters (and gauges),
    ``set(name, labels, value)`` for gauges and
    ``observe(name, labels, value)`` for histograms.  ``labels`` is a dict
    of label name to value, or None.  ``render()`` returns the exposition
    text and ``value(name, labels)`` one current value.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._meta = {}
        self._series = {}

    def declare(self, name: str, kind: str, help_text: str,
                buckets: tuple | None = None) -> None:
        """Declare a metric; declaring the same name again is a no-op."""
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric type {kind!r}")
        with self._lock:
            if name not in self._meta:
                bounds = tuple(sorted(buckets or ())) + (math.inf,)
                self._meta[name] = (kind, help_text, bounds)
                self._series[name] = {}

    def inc(self, name: str, labels: dict | None = None,
            value: float = 1.0) -> None:
        """Add ``value`` (at least 0 for a counter) to one series."""
        self.inc_series(name, self._key(labels), value)

    def series_key(self, labels: dict | None) -> tuple:
        """Return the key of a series for inc_series."""
        return self._key(labels)

    def inc_series(self, name: str, key: tuple, value: float = 1.0) -> None:
        """Add value to the series of a series_key() key (for hot paths)."""
        with self._lock:
            kind = self._meta[name][0]
            if kind == "histogram" or (kind == "counter" and value < 0):
                raise ValueError(f"cannot add {value} to {kind} {name}")
            series = self._series[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, labels: dict | None = None,
            value: float = 0.0) -> None:
        """Set one series of a gauge."""
        key = self._key(labels)
        with self._lock:
            if self._meta[name][0] != "gauge":
                raise ValueError(f"{name} is not a gauge")
            self._series[name][key] = float(value)

    def observe(self, name: str, labels: dict | None, value: float) -> None:
        """Record one observation of a histogram."""
        key = self._key(labels)
        with self._lock:
            kind, _help, bounds = self._meta[name]
            if kind != "histogram":
                raise ValueError(f"{name} is not a histogram")
            state = self._series[name].setdefault(
                key, {"buckets": [0] * len(bounds), "sum": 0.0, "count": 0})
            for index, bound in enumerate(bounds):
                if value <= bound:
                    state["buckets"][index] += 1
            state["sum"] += value
            state["count"] += 1

    def value(self, name: str, labels: dict | None = None) -> float:
        """Return a counter or gauge value, or a histogram's count."""
        key = self._key(labels)
        with self._lock:
            item = self._series[name].get(key)
        if isinstance(item, dict):
            return item["count"]
        return item or 0.0

    def render(self) -> str:
        """Return every metric in the text exposition format 0.0.4."""
        lines = []
        with self._lock:
            for name in sorted(self._meta):
                kind, help_text, bounds = self._meta[name]
                help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                for key in sorted(self._series[name]):
                    item = self._series[name][key]
                    if kind == "histogram":
                        lines += self._histogram_lines(name, key, bounds, item)
                    else:
                        lines.append(f"{name}{_metric_labels(key)} "
                                     f"{_metric_number(item)}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram_lines(name: str, key: tuple, bounds: tuple,
                         item: dict) -> list:
        lines = []
        for bound, count in zip(bounds, item["buckets"]):
            le = (("le", _metric_number(bound)),)
            lines.append(f"{name}_bucket{_metric_labels(key, le)} {count}")
        lines.append(f"{name}_sum{_metric_labels(key)} "
                     f"{_metric_number(item['sum'])}")
        lines.append(f"{name}_count{_metric_labels(key)} {item['count']}")
        return lines

    @staticmethod
    def _key(labels: dict | None) -> tuple:
        return tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))


def platform_python_version() -> str:
    """Return the running Python version as major.minor.micro."""
    return ".".join(str(part) for part in sys.version_info[:3])


METRICS = MetricsRegistry()
METRICS.declare("crate_build_info", "gauge",
                "Always 1; the labels name the operator and Python versions.")
METRICS.set("crate_build_info",
            {"version": __version__, "python": platform_python_version()}, 1)
METRICS.declare("crate_deployments_total", "counter",
                "Jobs that reached a terminal state, by kind, strategy and "
                "result.")
METRICS.declare("crate_deployment_duration_seconds", "histogram",
                "Time from the start of a job to its terminal state.",
                DEPLOY_DURATION_BUCKETS_S)
METRICS.declare("crate_job_queue_length", "gauge",
                "Jobs queued or running, over all apps.")
METRICS.declare("crate_callbacks_delivered_total", "counter",
                "Callback events delivered with a 2xx answer.")
METRICS.declare("crate_callbacks_retried_total", "counter",
                "Failed callback attempts that were scheduled again.")
METRICS.declare("crate_callbacks_given_up_total", "counter",
                "Callback events given up after callback_retry_window_s.")
METRICS.declare("crate_http_requests_total", "counter",
                "API requests by endpoint name and HTTP status.")
METRICS.declare("crate_http_connections_open", "gauge",
                "API connections being served, each using one of "
                "max_connections.")
METRICS.declare("crate_http_connections_rejected_total", "counter",
                "API connections closed at once because max_connections "
                "were open.")
METRICS.declare("crate_adapter_errors_total", "counter",
                "Failed calls to a host adapter (caddy, docker, systemd).")
METRICS.declare("crate_drift_found_total", "counter",
                "Differences between recorded and actual host state found "
                "by reconciliation, by kind.")
METRICS.declare("crate_drift_repaired_total", "counter",
                "Differences repaired by reconciliation, by kind.")
METRICS.declare("crate_reconcile_apps_total", "counter",
                "Apps looked at by reconciliation passes: in_order when the "
                "pass's read of all apps found them as recorded, "
                "checked_alone when they were checked on their own.")
METRICS.declare("crate_history_pruned_total", "counter",
                "Deployment records removed by history retention.")
METRICS.declare("crate_systemctl_seconds_total", "counter",
                "Wall time spent waiting for systemctl commands.")
METRICS.declare("crate_systemctl_calls_total", "counter",
                "systemctl commands run, failed ones included.")
METRICS.declare("crate_caddy_admin_seconds_total", "counter",
                "Wall time spent in Caddy admin API requests, resends included.")
METRICS.declare("crate_caddy_admin_calls_total", "counter",
                "Caddy admin API requests, failed ones included.")
# Metrics without labels start at 0 so that scrapers see them at once.
for _name in ("crate_callbacks_delivered_total",
              "crate_callbacks_retried_total",
              "crate_http_connections_open",
              "crate_http_connections_rejected_total",
              "crate_callbacks_given_up_total", "crate_history_pruned_total",
              "crate_systemctl_seconds_total", "crate_systemctl_calls_total",
              "crate_caddy_admin_seconds_total", "crate_caddy_admin_calls_total"):
    METRICS.inc(_name, None, 0)


# === Schemas and validation ===
#
# Every request body is described once, as data, in the JSON Schema subset that
# OpenAPI 3.1 uses. The validator and openapi_document() both read these tables,
# so the published contract and the enforced one cannot drift apart. A request is
# checked completely before anything on the host changes. The validator collects
# every error with a JSONPath-like field, lists unknown fields instead of
# rejecting them, and returns a cleaned copy with defaults filled in. Rules that a
# regex cannot express are Python functions named by "format", and rules that
# span several fields are functions named by "x-crate-rules".

# --- Limits ---

INT32_MIN = -2147483648
INT32_MAX = 2147483647
MIN_APP_PORT = 1024  # apps run unprivileged, so they cannot bind ports below 1024
MAX_PORT = 65535
MAX_SLOTS = 2
MAX_INSTANCES = 64
MAX_TEXT_ID_LENGTH = 128  # team_id, server_id
MAX_URL_LENGTH = 2048
MAX_DOMAIN_LENGTH = 253  # RFC 1035 2.3.4: 255 octets on the wire, 253 as text
MAX_LABEL_LENGTH = 63
MAX_ENV_VARS = 256
# Bounds of the "limits" extension: below 16 MiB even a static binary
# hardly starts, and 6400 % is 64 CPUs.
MIN_LIMIT_MEMORY_MB = 16
MAX_LIMIT_MEMORY_MB = 1 << 20
MAX_LIMIT_CPU_PERCENT = 6400
MAX_ENV_VALUE_LENGTH = 32 * 1024  # characters
MAX_ENV_TOTAL_BYTES = 256 * 1024  # UTF-8 bytes of all NAME=value pairs
MAX_HEALTH_PATH_LENGTH = 1024
MAX_IMAGE_LENGTH = 255  # NameTotalLengthMax in distribution/reference
MAX_VOLUMES = 32
MAX_VOLUME_SPEC_LENGTH = 4096
MAX_COMMAND_ARGS = 64
MAX_COMMAND_ARG_LENGTH = 4096
MAX_PASSWORD_LENGTH = 4096
MAX_CANARY_STEPS = 10
MAX_CANARY_PAUSE_S = 3600
MAX_DELETE_IDS = 64

# --- Patterns ---
# Every pattern is anchored with ^ and $ and uses only syntax that Python re and
# ECMA-262 read the same way, because OpenAPI clients evaluate them with ECMA-262.
# Classes are spelled out ([0-9], not \d) since Python's \d also matches
# non-ASCII digits.

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
NO_NUL_PATTERN = r"^[^\x00]*$"
# The path goes into an HTTP request line as is, so it must be printable ASCII
# without "#".
HEALTH_PATH_PATTERN = r"^/[\x21\x22\x24-\x7e]*$"
IMAGE_TAG_PATTERN = (
    r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|sha256:[0-9a-f]{64})$"
)
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# No leading ".", so that "." and ".." cannot name a parent directory.
LEGACY_DEPLOYMENT_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
SIGNATURE_PATTERN = r"^sha256=[0-9a-f]{64}$"

# Reasons for patterns whose regex is harder to read than a sentence. Other
# patterns are reported as "must match <pattern>".
_PATTERN_REASONS = {
    NO_CONTROL_PATTERN: "must not contain control characters",
    NO_NUL_PATTERN: "must not contain NUL characters",
    HEALTH_PATH_PATTERN: (
        "must start with / and contain only printable ASCII without spaces"
        " or #"),
    IMAGE_TAG_PATTERN: (
        "must be a tag of up to 128 characters [A-Za-z0-9_.-] not starting"
        " with . or -, or a digest sha256:<64 lowercase hex digits>"),
    SHA256_PATTERN: "must be 64 lowercase hex digits",
    LEGACY_DEPLOYMENT_ID_PATTERN: (
        "must be 1 to 128 characters [A-Za-z0-9._-] not starting with ."),
}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_IMAGE_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,20}")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Keywords that the validator reads or may safely skip (annotations). A schema
# keyword outside this set would be silently ignored, so the tests reject it.
SCHEMA_KEYWORDS = frozenset({
    "$ref", "anyOf", "type", "properties", "required", "additionalProperties",
    "propertyNames", "items", "enum", "minimum", "maximum", "minLength",
    "maxLength", "pattern", "minItems", "maxItems", "uniqueItems",
    "minProperties", "maxProperties", "format", "default", "title",
    "description", "examples", "x-crate-extension", "x-crate-rules",
})

_REF_PREFIX = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF_PREFIX + name}


def _optional(schema: dict, default: Any = None, **annotations: Any) -> dict:
    """Return a copy of schema that also accepts null.

    The validator puts default in place of null or an absent field.
    """
    if "$ref" in schema:
        result = {"anyOf": [schema, {"type": "null"}]}
    else:
        result = dict(schema)
        types = schema["type"]
        types = [types] if isinstance(types, str) else list(types)
        result["type"] = [*types, "null"]
    result["default"] = default
    result.update(annotations)
    return result


def _extension(schema: dict, description: str) -> dict:
    """Return schema marked as a crate-operator addition to the platform API."""
    return dict(schema, description=description, **{"x-crate-extension": True})


def _object(required: dict, optional: dict | None = None, **extra: Any) -> dict:
    """Build a fixed-field object schema from required and optional properties."""
    optional = optional or {}
    schema = {
        "type": "object",
        "required": list(required),
        "properties": {**required, **optional},
    }
    schema.update(extra)
    return schema


def _int32_id(description: str) -> dict:
    return {
        "type": "integer", "format": "int32", "minimum": 0,
        "maximum": INT32_MAX, "description": description,
    }


def _text_id(description: str) -> dict:
    return {
        "type": "string", "minLength": 1, "maxLength": MAX_TEXT_ID_LENGTH,
        "pattern": NO_CONTROL_PATTERN, "description": description,
    }


def _key_schema(title: str, pattern: str) -> dict:
    return {"type": "string", "title": title, "pattern": pattern}


# --- Field schemas shared by several requests ---

_APP_ID = _int32_id(
    "App id. Must be >= 0 because it is part of unit and container names.")
_DEPLOYMENT_ID = _int32_id(
    "Deployment id chosen by the platform. Must be >= 0.")
_ENVIRONMENT_ID = _int32_id("Environment id. Must be >= 0.")
_TEAM_ID = _text_id("Team id: 1 to 128 characters without control characters.")
_SERVER_ID = _text_id(
    "Server id: 1 to 128 characters without control characters.")

_URL_RULES = (
    "http or https only, with a host, without user credentials (they would"
    " end up in logs), ASCII without whitespace or control characters,"
    " at most 2048 characters."
)
_ASSET_URL = {
    "type": "string", "maxLength": MAX_URL_LENGTH, "format": "http-url",
    "description": "URL of the release archive to download. " + _URL_RULES,
}
_CALLBACK_URL = {
    "type": "string", "maxLength": MAX_URL_LENGTH, "format": "http-url",
    "description": "URL that receives deployment events. " + _URL_RULES,
}
_DOMAIN_RULES = (
    "Compared and stored in normal form: ASCII lower case, one trailing dot"
    " removed. Then RFC 1123: at least two labels of 1 to 63 characters"
    " [a-z0-9-] that neither start nor end with -, at most 253 characters,"
    " and a last label that is not all digits. No scheme, port or path."
)
_DOMAIN = {
    # One more than the limit for the trailing dot that normalisation removes.
    "type": "string", "minLength": 1, "maxLength": MAX_DOMAIN_LENGTH + 1,
    "format": "domain-name", "description": "Domain routed to the app. "
    + _DOMAIN_RULES,
}
_ENV_VARS = {
    "type": "object",
    "maxProperties": MAX_ENV_VARS,
    "propertyNames": dict(
        _key_schema("variable name", ENV_NAME_PATTERN), format="env-name"),
    "additionalProperties": {
        "type": "string", "maxLength": MAX_ENV_VALUE_LENGTH,
        "pattern": NO_NUL_PATTERN,
    },
    "description": (
        "Environment variables of the app. Names are POSIX names. PORT and"
        " names starting with CRATE_ are reserved, because the operator sets"
        " them. Values are strings without NUL of at most 32768 characters."
        " At most 256 variables and 256 KiB of UTF-8 in total."
    ),
}
_SLOTS = {
    "type": "object", "minProperties": 1, "maxProperties": MAX_SLOTS,
    "propertyNames": _key_schema("slot name", ID_PATTERN),
    "additionalProperties": _ref("InstancePort"),
    "description": (
        "Slots by name (for example blue and green), 1 or 2. bluegreen and"
        " canary need exactly 2, because one slot serves while the other"
        " takes the new version."
    ),
}
_INSTANCES = {
    "type": "object", "minProperties": 1, "maxProperties": MAX_INSTANCES,
    "propertyNames": _key_schema("instance id", ID_PATTERN),
    "additionalProperties": _ref("BinaryAppInstance"),
    "description": "Instances by id, 1 to 64.",
}
_TARGET_VERSION = {
    "type": "string", "pattern": VERSION_PATTERN,
    "description": "Version label of the release being deployed.",
}
_HEALTH_CHECK_PATH = _optional(
    {"type": "string", "maxLength": MAX_HEALTH_PATH_LENGTH,
     "pattern": HEALTH_PATH_PATTERN},
    description=(
        "HTTP path probed for readiness (for example /healthz): starts with /,"
        " printable ASCII without spaces or #, at most 1024 characters."
        " null means no HTTP probe."
    ),
)
_ASSET_SHA256 = _optional(_extension(
    {"type": "string", "pattern": SHA256_PATTERN},
    "Expected SHA-256 of the downloaded asset as 64 lowercase hex digits."
    " The deployment fails before installing anything when it differs.",
))
_CANARY = _optional(
    _ref("CanarySettings"),
    description=(
        "Traffic steps for deployment_strategy canary. Other strategies"
        " ignore it."
    ),
    **{"x-crate-extension": True},
)
_OPTIONAL_TARGET_VERSION = _optional(_extension(
    _TARGET_VERSION,
    "Version label recorded for the new instances and shown in the status"
    " and callbacks. The platform API has no version in this model.",
))
_IMAGE = {
    "type": "string", "minLength": 1, "maxLength": MAX_IMAGE_LENGTH,
    "format": "image-name",
    "description": (
        "Docker image without tag or digest, for example"
        " registry.example.com/team/app or localhost:5000/app. An optional"
        " registry host (DNS name, IPv4 or localhost, with an optional"
        " :port) comes first, then lowercase path components. An image with"
        " its own tag or digest is rejected as ambiguous."
    ),
}
_IMAGE_TAG = {
    "type": "string", "pattern": IMAGE_TAG_PATTERN,
    "description": "Image tag (for example v1.2.3) or digest sha256:<64 hex>.",
}
_DOCKER_COMMAND = _optional(
    {
        "type": "array", "minItems": 1, "maxItems": MAX_COMMAND_ARGS,
        "items": {
            "type": "string", "maxLength": MAX_COMMAND_ARG_LENGTH,
            "pattern": NO_NUL_PATTERN,
        },
    },
    description="Command and arguments that replace the image's CMD.",
)
_REGISTRY_CREDENTIALS = _optional(
    _ref("DockerRegistryCredentials"),
    description="Credentials for pulling the image from a private registry.",
)
_VOLUMES = _optional(
    {
        "type": "array", "maxItems": MAX_VOLUMES, "format": "volume-list",
        "items": {
            "type": "string", "maxLength": MAX_VOLUME_SPEC_LENGTH,
            "format": "volume-spec",
        },
    },
    default=[],
    description=(
        "Mounts as SRC:DST, SRC:DST:ro or SRC:DST:rw. SRC is a volume name"
        " (no /) or a path relative to the app data directory that stays"
        " inside it. DST is an absolute path without .. components, distinct"
        " per mount. No commas or control characters."
    ),
)
_INSTANCE_ID = {
    "type": "string", "pattern": ID_PATTERN,
    "description": "Instance id or slot name.",
}

# Cross-field rules, named in "x-crate-rules" and implemented by _RULES below.
_DEPLOY_RULES = {
    "distinct-ports": "All ports in one request are distinct.",
    "env-total-size": "env_vars contains at most 256 KiB of UTF-8 in total.",
}
_SLOT_DEPLOY_RULES = dict(_DEPLOY_RULES, **{
    "strategy-slot-count": "bluegreen and canary need exactly 2 slots.",
})
_NULL_NOTE = "Optional fields accept null, which means the same as absent."


def _deploy_request(required: dict, optional: dict, rules: dict,
                    description: str) -> dict:
    return _object(required, optional, description=description + " "
                   + _NULL_NOTE, **{"x-crate-rules": rules})


_COMMON_DEPLOY = {
    "app_id": _APP_ID,
    "callback_url": _CALLBACK_URL,
    "deployment_id": _DEPLOYMENT_ID,
    "deployment_strategy": _ref("DeploymentStrategy"),
    "domain": _DOMAIN,
    "environment_id": _ENVIRONMENT_ID,
    "team_id": _TEAM_ID,
}
_LIMITS = _optional(
    _ref("ResourceLimits"),
    description=(
        "Memory and CPU limits of each instance. Binary apps get MemoryMax="
        " and CPUQuota= in their unit."
    ),
    **{"x-crate-extension": True},
)
_DOCKER_OPTIONAL = {
    "limits": _LIMITS,
    "docker_command": _DOCKER_COMMAND,
    "health_check_path": _HEALTH_CHECK_PATH,
    "registry_credentials": _REGISTRY_CREDENTIALS,
    "volumes": _VOLUMES,
    "canary": _CANARY,
}
_BINARY_OPTIONAL = {
    "limits": _LIMITS,
    "health_check_path": _HEALTH_CHECK_PATH,
    "asset_sha256": _ASSET_SHA256,
    "canary": _CANARY,
}
_INSTANCE_ACTION = _object({
    "app_id": _APP_ID,
    "callback_url": _CALLBACK_URL,
    "domain": _DOMAIN,
    "environment_id": _ENVIRONMENT_ID,
    "instance_id": _INSTANCE_ID,
    "team_id": _TEAM_ID,
}, description="Names one instance (or slot) of an app.")

_PORT = {
    "type": "integer", "format": "int32", "minimum": MIN_APP_PORT,
    "maximum": MAX_PORT,
    "description": (
        "Local TCP port of the instance, 1024 to 65535 because apps run"
        " unprivileged."
    ),
}

# --- Response schemas ---

_TIMESTAMP = {
    "type": ["string", "null"], "format": "date-time",
    "description": "RFC 3339 time in UTC, or null when it has not happened.",
}
_NULLABLE_TEXT = {"type": ["string", "null"]}

_DEPLOYMENT_STATUS = _object({
    "deployment_id": {"type": ["integer", "string"]},
    "app_id": {"type": "integer", "format": "int32"},
    "kind": {"type": "string", "enum": ["binary", "docker"]},
    "model": {"type": "string", "enum": ["slots", "instances"]},
    "strategy": {
        "type": ["string", "null"],
        "enum": ["immediate", "bluegreen", "canary", None],
    },
    "action": {
        "type": "string",
        "enum": ["create", "update", "start", "stop", "restart", "delete"],
    },
    "state": {
        "type": "string",
        "enum": ["queued", "running", "succeeded", "failed", "rolled_back",
                 "cancelled"],
    },
    "error": dict(_NULLABLE_TEXT, description="Why the deployment failed."),
    "created_at": _TIMESTAMP,
    "started_at": _TIMESTAMP,
    "finished_at": _TIMESTAMP,
    "target_version": _NULLABLE_TEXT,
    "serving_version": dict(
        _NULLABLE_TEXT, description="Version that receives traffic now."),
    "domain": {"type": "string"},
    "steps": {"type": "array", "items": _ref("DeploymentStep")},
    "instances": {"type": "array", "items": _ref("InstanceState")},
    "allocations": {"type": "array", "items": _ref("TrafficAllocation")},
    "changes": {
        "type": ["object", "null"],
        "description": "Instances model only: the instance ids this "
                       "deployment creates, updates and removes, decided "
                       "from the host's own records.",
        "properties": {
            key: {"type": "array", "items": {"type": "string"}}
            for key in ("create", "update", "remove")},
    },
}, description="Progress and outcome of one deployment or instance action.")

_DEPLOYMENT_STEP = _object({
    "name": {"type": "string"},
    "state": {"type": "string"},
    "at": _TIMESTAMP,
    "message": _NULLABLE_TEXT,
}, description="One recorded step of a deployment.")

_INSTANCE_STATE = _object({
    "instance_id": {"type": "string"},
    "slot": _NULLABLE_TEXT,
    "port": {"type": "integer", "format": "int32"},
    "version": _NULLABLE_TEXT,
    "state": {"type": "string"},
    "unit": dict(
        _NULLABLE_TEXT, description="systemd unit or docker container name."),
}, {
    "image": dict(_NULLABLE_TEXT, description="Docker image (docker only)."),
    "tag": dict(_NULLABLE_TEXT,
                description="Image tag or sha256 digest (docker only)."),
}, description="State of one instance on this host.")

_TRAFFIC_ALLOCATION = _object({
    "instance_id": {"type": "string"},
    "slot": _NULLABLE_TEXT,
    "weight": {
        "type": "integer", "minimum": 0, "maximum": 100,
        "description": "Percentage of the app's traffic.",
    },
}, description="Share of traffic routed to one instance.")

_ACCEPTED = _object({
    "deployment_id": {"type": ["integer", "string"]},
    "app_id": {"type": "integer", "format": "int32"},
    "state": {"type": "string", "enum": ["queued"]},
    "status_url": {"type": "string", "description": "Path of the status."},
    "ignored_fields": {
        "type": "array", "items": {"type": "string"},
        "description": "JSON paths of request fields that were not used.",
    },
    "duplicate": {
        "type": "boolean",
        "description": "True when this deployment_id was already accepted.",
    },
}, description="Response to a queued job. Its events go to callback_url.")

_FIELD_ERROR = _object({
    "field": {
        "type": "string",
        "description": "JSONPath-like location, for example $.slots.blue.port.",
    },
    "reason": {"type": "string"},
}, description="One invalid request field.")

_ERROR = _object(
    {"error": {"type": "string"}},
    {"errors": {"type": "array", "items": _ref("FieldError")}},
    description="Error body. errors lists every invalid field of a 400.",
)

_CALLBACK_BODY = _object({
    "seq": {
        "type": "integer",
        "description": "Increasing number of the event on this host.",
    },
    "deployment_seq": {
        "type": "integer",
        "description": "Increasing number of the event within its deployment.",
    },
    "event": {"type": "string", "description": "Event name."},
    "deployment": _ref("DeploymentStatus"),
}, description="Body POSTed to callback_url.")

_DOMAIN_UPDATED = _object({
    "app_id": {"type": "integer", "format": "int32"},
    "old_domain": {"type": "string"},
    "new_domain": {"type": "string"},
    "changed": {
        "type": "boolean",
        "description": "False when new_domain was already the app's domain.",
    },
}, description="Result of a domain update.")

_HEALTH = _object({
    "status": {"type": "string", "enum": ["ok", "degraded"]},
    "version": {"type": "string"},
    "server_id": {"type": "string"},
    "systemd": {"type": "boolean"},
    "caddy": {"type": "boolean"},
    "docker": {"type": "boolean"},
    "jobs": {"type": "integer", "description": "Jobs waiting to run."},
    "callbacks_pending": {
        "type": "integer", "description": "Callbacks not yet delivered."},
}, description="Reachability of systemd, Caddy and dockerd.")

# Named component schemas: request bodies, their parts and the response
# shapes. Every "$ref" points into this dict.
SCHEMAS: dict[str, dict] = {
    "DeploymentStrategy": {
        "type": "string", "enum": ["immediate", "bluegreen", "canary"],
        "description": (
            "immediate replaces instances in place (a rolling update in the"
            " instances model); bluegreen switches traffic between two slots;"
            " canary shifts traffic in steps."
        ),
    },
    "InstancePort": _object({"port": _PORT}, description="Port of one slot."),
    "BinaryAppInstance": _object(
        {"port": _PORT}, description="Port of one instance."),
    "DockerRegistryCredentials": _object(
        {
            "username": {"type": "string", "minLength": 1},
            "password": {
                "type": "string", "minLength": 1,
                "maxLength": MAX_PASSWORD_LENGTH,
            },
        },
        {"serveraddress": _optional(
            {"type": "string", "minLength": 1, "format": "registry-host"},
            description="Registry as host[:port], without scheme.",
        )},
        description="Registry login, sent to dockerd and never logged.",
    ),
    "CanarySettings": _object(
        {
            "steps": {
                "type": "array", "minItems": 1, "maxItems": MAX_CANARY_STEPS,
                "format": "canary-steps",
                "items": {
                    "type": "integer", "format": "int32", "minimum": 1,
                    "maximum": 100,
                },
                "description": (
                    "Percentages of traffic for the new version, strictly"
                    " increasing and ending at 100."
                ),
            },
            "pause_s": {
                "type": "number", "minimum": 0, "maximum": MAX_CANARY_PAUSE_S,
                "description": "Seconds to wait after each step.",
            },
        },
        description="Canary traffic steps.",
        **{"x-crate-extension": True},
    ),
    "ResourceLimits": _object(
        {},
        {
            "memory_mb": _optional(
                {
                    "type": "integer", "format": "int32",
                    "minimum": MIN_LIMIT_MEMORY_MB,
                    "maximum": MAX_LIMIT_MEMORY_MB,
                },
                description="Memory limit in MiB (MemoryMax=).",
            ),
            "cpu_percent": _optional(
                {
                    "type": "integer", "format": "int32", "minimum": 1,
                    "maximum": MAX_LIMIT_CPU_PERCENT,
                },
                description=(
                    "CPU time in percent of one CPU (CPUQuota=); 200 is two"
                    " full CPUs."
                ),
            ),
        },
        description="Resource limits of each instance.",
        **{"x-crate-extension": True},
    ),
    "BinarySlotsDeployRequest": _deploy_request(
        dict(_COMMON_DEPLOY, asset_url=_ASSET_URL, env_vars=_ENV_VARS,
             slots=_SLOTS, target_version=_TARGET_VERSION),
        _BINARY_OPTIONAL, _SLOT_DEPLOY_RULES,
        "Binary deploy in the slots model.",
    ),
    "DockerSlotsDeployRequest": _deploy_request(
        dict(_COMMON_DEPLOY, env_vars=_ENV_VARS, image=_IMAGE,
             image_tag=_IMAGE_TAG, slots=_SLOTS,
             target_version=_TARGET_VERSION),
        _DOCKER_OPTIONAL, _SLOT_DEPLOY_RULES,
        "Docker deploy in the slots model.",
    ),
    "BinaryInstancesDeployRequest": _deploy_request(
        dict(_COMMON_DEPLOY, asset_url=_ASSET_URL, env_vars=_ENV_VARS,
             instances=_INSTANCES),
        dict(_BINARY_OPTIONAL, target_version=_OPTIONAL_TARGET_VERSION),
        _DEPLOY_RULES, "Binary deploy in the instances model.",
    ),
    "DockerInstancesDeployRequest": _deploy_request(
        dict(_COMMON_DEPLOY, image=_IMAGE, image_tag=_IMAGE_TAG,
             instances=_INSTANCES),
        dict(_DOCKER_OPTIONAL, env_vars=_optional(_ENV_VARS, default={}),
             target_version=_OPTIONAL_TARGET_VERSION),
        _DEPLOY_RULES, "Docker deploy in the instances model.",
    ),
    "DeleteRequest": _object(
        {
            "app_id": _APP_ID,
            "callback_url": _CALLBACK_URL,
            "domain": _DOMAIN,
            "environment_id": _ENVIRONMENT_ID,
            "instance_ids": {
                "type": "array", "minItems": 1, "maxItems": MAX_DELETE_IDS,
                "uniqueItems": True, "items": _INSTANCE_ID,
                "description": "Instance ids or slot names to remove.",
            },
            "team_id": _TEAM_ID,
        },
        {"deployment_id": _optional(_DEPLOYMENT_ID)},
        description="Instances to delete. " + _NULL_NOTE,
    ),
    "DomainUpdateRequest": _object({
        "app_id": _APP_ID,
        "environment_id": _ENVIRONMENT_ID,
        "new_domain": _DOMAIN,
        "old_domain": _DOMAIN,
        "server_id": _SERVER_ID,
        "team_id": _TEAM_ID,
    }, description="Moves an app's route from old_domain to new_domain."),
    "InstanceActionRequest": _INSTANCE_ACTION,
    "DeploymentStatus": _DEPLOYMENT_STATUS,
    "DeploymentStep": _DEPLOYMENT_STEP,
    "InstanceState": _INSTANCE_STATE,
    "TrafficAllocation": _TRAFFIC_ALLOCATION,
    "Accepted": _ACCEPTED,
    "FieldError": _FIELD_ERROR,
    "Error": _ERROR,
    "CallbackBody": _CALLBACK_BODY,
    "DomainUpdated": _DOMAIN_UPDATED,
    "Health": _HEALTH,
}

# --- Endpoints ---

_COMMON_ERRORS = {
    "401": ("Missing or invalid bearer token.", "Error"),
    "413": ("Request body too large.", "Error"),
    "415": ("Content-Type is not application/json.", "Error"),
    "500": ("Internal error.", "Error"),
}
_JOB_RESPONSES = {
    "202": ("Queued. Events follow at callback_url and status_url.",
            "Accepted"),
    "400": ("Invalid body. errors lists every invalid field.", "Error"),
    **_COMMON_ERRORS,
    "409": ("The deployment_id was used for a different request, or the"
            " domain belongs to another app.", "Error"),
}
_ACTION_RESPONSES = dict(_JOB_RESPONSES, **{
    "404": ("No such app or instance on this host.", "Error"),
    "409": ("The request conflicts with the app's current state, or its"
            " deployment_id was used for a different request.", "Error"),
})
_STATUS_RESPONSES = {
    "200": ("Deployment status.", "DeploymentStatus"),
    "400": ("Invalid deployment_id.", "Error"),
    "401": _COMMON_ERRORS["401"],
    "404": ("No deployment with this id.", "Error"),
}
_DOMAIN_RESPONSES = {
    "200": ("Route moved, or already in place.", "DomainUpdated"),
    "400": ("Invalid body. errors lists every invalid field.", "Error"),
    **_COMMON_ERRORS,
    "404": ("No route for old_domain.", "Error"),
    "409": ("new_domain already routes to another app.", "Error"),
    "503": ("The Caddy admin API is unavailable, so nothing changed.",
            "Error"),
}


def _path_param(schema: dict, description: str) -> list[dict]:
    return [{
        "name": "deployment_id", "in": "path", "required": True,
        "schema": schema, "description": description,
    }]


def _query_param(name: str, schema: dict, description: str,
                 default: Any = None) -> dict:
    schema = dict(schema)
    if default is not None:
        schema["default"] = default
    return {"name": name, "in": "query", "required": default is None,
            "schema": schema, "description": description}


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Largest seq a query accepts: 2**53 - 1, exact in every JSON parser.
MAX_EVENT_SEQ = 9007199254740991
_LOGS_PARAMS = [
    _query_param("app_id", _int32_id("App id."), "App id."),
    _query_param("instance_id", _INSTANCE_ID, "Instance id or slot name."),
    _query_param("lines", {"type": "integer", "minimum": 1,
                           "maximum": LOGS_MAX_LINES},
                 "Number of lines, counted from the newest.",
                 LOGS_DEFAULT_LINES),
]
_EVENTS_PARAMS = [
    _query_param("after", {"type": "integer", "minimum": 0,
                           "maximum": MAX_EVENT_SEQ},
                 "Return events with a seq greater than this.", 0),
    _query_param("limit", {"type": "integer", "minimum": 1,
                           "maximum": EVENTS_MAX_LIMIT},
                 "Page size.", EVENTS_DEFAULT_LIMIT),
]
_INSTANCE_LOGS = {
    "type": "object",
    "required": ["app_id", "instance_id", "unit", "lines", "truncated"],
    "properties": {
        "app_id": {"type": "integer"},
        "instance_id": {"type": "string"},
        "unit": {"type": "string"},
        "lines": {"type": "array", "items": {"type": "string"}},
        "truncated": {"type": "boolean",
                      "description": "True when the byte limit cut off"
                                     " older lines."},
    },
}
_EVENTS_PAGE = {
    "type": "object",
    "required": ["events", "next_after", "more"],
    "properties": {
        "events": {"type": "array", "items": {
            "type": "object",
            "required": ["seq", "event", "delivery_id", "deployment_id",
                         "app_id", "created_at", "delivered", "body"],
            "properties": {
                "seq": {"type": "integer"},
                "event": {"type": "string"},
                "delivery_id": {"type": "string"},
                "deployment_id": {"type": ["integer", "string"]},
                "app_id": {"type": "integer"},
                "created_at": {"type": "string", "format": "date-time"},
                "delivered": {"type": "boolean"},
                "body": _ref("CallbackBody"),
            },
        }},
        "next_after": {"type": "integer",
                       "description": "after value of the next page."},
        "more": {"type": "boolean",
                 "description": "True when more events follow this page."},
    },
}


def _endpoint(method: str, path: str, body_name: str | None, summary: str,
              responses: dict, params: list | None = None,
              description: str = "") -> dict:
    return {
        "method": method, "path": path, "body_name": body_name,
        "body": SCHEMAS[body_name] if body_name else None,
        "params": params or [], "summary": summary,
        "description": description, "responses": responses,
    }


_INSTANCE_ACTION_NOTE = "The instance is named by instance_id."
_DEPLOY_NOTE = (
    "Creates the app when this host has none, otherwise updates it. The"
    " operator decides from local state (app directory, units, containers)."
)

# Endpoint name -> method, path, body (request schema or None), body_name (its
# name in SCHEMAS), params (OpenAPI path parameters), summary, description and
# responses (status code -> (description, schema name or inline schema)).
ENDPOINTS: dict[str, dict] = {
    "deploy_binary_slots": _endpoint(
        "POST", "/v1/app/instance/binary/deploy", "BinarySlotsDeployRequest",
        "Deploy or create a binary app (slots model)", _JOB_RESPONSES,
        description=_DEPLOY_NOTE),
    "deploy_docker_slots": _endpoint(
        "POST", "/v1/app/instance/docker/deploy", "DockerSlotsDeployRequest",
        "Deploy or create a docker app (slots model)", _JOB_RESPONSES,
        description=_DEPLOY_NOTE),
    "deploy_binary_instances": _endpoint(
        "POST", "/v1/app/binary/deploy", "BinaryInstancesDeployRequest",
        "Deploy or create a binary app (instances model)", _JOB_RESPONSES,
        description=_DEPLOY_NOTE),
    "deploy_docker_instances": _endpoint(
        "POST", "/v1/app/docker/deploy", "DockerInstancesDeployRequest",
        "Deploy or create a docker app (instances model)", _JOB_RESPONSES,
        description=_DEPLOY_NOTE),
    "delete": _endpoint(
        "POST", "/v1/app/delete", "DeleteRequest",
        "Delete app instances, their files and the Caddy route",
        _ACTION_RESPONSES),
    "domain_update": _endpoint(
        "POST", "/v1/app/domain/update", "DomainUpdateRequest",
        "Move an app's Caddy route to a new domain", _DOMAIN_RESPONSES),
    "start": _endpoint(
        "POST", "/v1/app/start", "InstanceActionRequest",
        "Start an app instance", _ACTION_RESPONSES,
        description=_INSTANCE_ACTION_NOTE),
    "stop": _endpoint(
        "POST", "/v1/app/stop", "InstanceActionRequest",
        "Stop an app instance", _ACTION_RESPONSES,
        description=_INSTANCE_ACTION_NOTE),
    "restart": _endpoint(
        "POST", "/v1/app/restart", "InstanceActionRequest",
        "Restart an app instance", _ACTION_RESPONSES,
        description=_INSTANCE_ACTION_NOTE),
    "status_legacy": _endpoint(
        "GET", "/v1/app/deploy/{deployment_id}/status", None,
        "Get deployment status (string id)", _STATUS_RESPONSES,
        _path_param(
            {"type": "string", "pattern": LEGACY_DEPLOYMENT_ID_PATTERN},
            "Deployment id: 1 to 128 characters of [A-Za-z0-9._-], not"
            " starting with a dot.")),
    "status_instance": _endpoint(
        "GET", "/v1/app/instance/deploy/{deployment_id}/status", None,
        "Get deployment status (integer id)", _STATUS_RESPONSES,
        _path_param({"type": "integer", "format": "int32"},
                    "Deployment id as decimal digits, int32.")),
    "openapi": _endpoint(
        "GET", "/v1/openapi.json", None, "Get this OpenAPI document",
        {"200": ("OpenAPI 3.1 document.", {"type": "object"}),
         "401": _COMMON_ERRORS["401"]}),
    "healthz": _endpoint(
        "GET", "/healthz", None, "Report the reachability of dependencies",
        {"200": ("systemd and Caddy are reachable.", "Health"),
         "503": ("systemd or Caddy is unreachable.", "Health")},
        description="Needs no token."),
    "metrics": _endpoint(
        "GET", "/metrics", None, "Get operator metrics for Prometheus",
        {"200": ("Metrics in the Prometheus text exposition format 0.0.4.",
                 {"type": "string",
                  "contentMediaType": METRICS_CONTENT_TYPE}),
         "401": ("Missing or invalid bearer token, unless metrics_public is"
                 " true.", "Error")},
        description=(
            "Needs the bearer token unless the metrics_public setting is"
            " true. An extension to the platform API.")),
    "app_logs": _endpoint(
        "GET", "/v1/app/logs", None, "Get the last log lines of an instance",
        {"200": ("Log lines, oldest first.", _INSTANCE_LOGS),
         "400": ("Invalid query parameter.", "Error"),
         "401": _COMMON_ERRORS["401"],
         "404": ("No such app or instance on this host.", "Error"),
         "502": ("journalctl or dockerd failed.", "Error")},
        _LOGS_PARAMS,
        description=(
            "Reads the systemd journal of the instance's unit. At most"
            f" {LOGS_MAX_LINES} lines and {LOGS_MAX_BYTES // 1024} KiB are"
            " returned, the newest kept. An extension to the platform"
            " API.")),
    "events": _endpoint(
        "GET", "/v1/events", None, "List callback events in seq order",
        {"200": ("One page of events with seq greater than after.",
                 _EVENTS_PAGE),
         "400": ("Invalid query parameter.", "Error"),
         "401": _COMMON_ERRORS["401"]},
        _EVENTS_PARAMS,
        description=(
            "Replays the callback outbox, delivered or not, so a platform"
            " that missed callbacks can catch up. Pass the answer's"
            " next_after as after to read the next page. Delivered events"
            " are kept up to the events_retention setting. An extension to"
            " the platform API.")),
}


# --- Formats: rules that a regex cannot express ---


def _int32_error(number: int) -> str | None:
    if INT32_MIN <= number <= INT32_MAX:
        return None
    return f"must fit in int32 ({INT32_MIN} to {INT32_MAX})"


def _http_url_error(text: str) -> str | None:
    if not text.isascii():
        return "must be ASCII, so percent-encode other characters"
    if any(char <= " " or char == "\x7f" for char in text):
        return "must not contain whitespace or control characters"
    if "\\" in text:
        # The WHATWG URL standard (browsers, Node) reads \ as / in http URLs but
        # urllib does not, so the host would depend on the parser.
        return "must not contain a backslash"
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        return "is not a valid URL (check the host and port)"
    if parts.scheme.lower() not in ("http", "https"):
        return "must use http or https"
    if "@" in parts.netloc:
        return "must not contain user credentials, because URLs are logged"
    if not parts.hostname:
        return "must have a host"
    if port == 0:
        return "port must be 1 to 65535"
    return None


def normalise_domain(text: str) -> str:
    """Return the form in which domains are stored and compared.

    Only ASCII letters are lowered (str.lower() would turn the Kelvin sign into
    "k"), and one trailing dot is removed. The result is not validated.
    """
    lowered = text.translate(_ASCII_LOWER)
    return lowered[:-1] if lowered.endswith(".") else lowered


def domain_error(text: Any) -> str | None:
    """Return why text is not a valid app domain, or None when it is valid.

    The text is normalised first, so "SHOP.Example.Test." is valid. The rules
    are RFC 1123 host names with at least two labels, which rejects URLs, ports,
    spaces, non-ASCII look-alikes and IP addresses.
    """
    if not isinstance(text, str):
        return "must be a string"
    return _normal_domain_error(normalise_domain(text))


def _normal_domain_error(name: str) -> str | None:
    """Return why an already normalised domain is invalid, or None."""
    if not name.isascii():
        return "must be ASCII (write internationalised names in their xn-- form)"
    if not name:
        return "must not be empty"
    if "/" in name:
        return "must be a bare domain name without scheme or path"
    if ":" in name:
        return "must not contain a port"
    if any(char.isspace() for char in name):
        return "must not contain whitespace"
    if len(name) > MAX_DOMAIN_LENGTH:
        return f"must be at most {MAX_DOMAIN_LENGTH} characters"
    return _domain_labels_error(name.split("."))


def _domain_labels_error(labels: list[str]) -> str | None:
    if len(labels) < 2:
        return "must have at least two labels, for example app.example.com"
    for label in labels:
        if not label:
            return ("must not contain an empty label (a leading dot or two"
                    " dots in a row)")
        if len(label) > MAX_LABEL_LENGTH:
            return f"labels must be at most {MAX_LABEL_LENGTH} characters"
        if not _DOMAIN_LABEL.fullmatch(label):
            return ("labels must contain only a-z, 0-9 and -, and must not"
                    " start or end with -")
    if labels[-1].isdigit():
        return "must be a domain name, not an IP address"
    return None


def _env_name_error(name: str) -> str | None:
    if name == "PORT" or name.startswith("CRATE_"):
        return ("is reserved because the operator sets it (PORT and names"
                " starting with CRATE_)")
    return None


def _registry_host_error(text: str) -> str | None:
    """Return why text is not host[:port] with a DNS name, IPv4 or localhost."""
    if not text.isascii():
        return "must be ASCII"
    if "/" in text:
        return "must be host[:port] without scheme or path"
    host, colon, port = text.partition(":")
    if colon and not _port_text_valid(port):
        return "port must be a number from 1 to 65535"
    if host == "localhost":
        return None
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        if len(labels) == 4 and all(int(label) <= 255 for label in labels):
            return None
        return "must be a DNS name, an IPv4 address or localhost"
    for label in labels:
        if len(label) > MAX_LABEL_LENGTH or not _HOST_LABEL.fullmatch(label):
            return "must be a DNS name, an IPv4 address or localhost"
    return None


def _port_text_valid(text: str) -> bool:
    return bool(_PORT_TEXT.fullmatch(text)) and 1 <= int(text) <= MAX_PORT


def _image_name_error(text: str) -> str | None:
    if "@" in text:
        return ("ambiguous: put the tag in image_tag (a digest goes there as"
                " sha256:<hex>)")
    if ":" in text.rsplit("/", 1)[-1]:
        return "ambiguous: put the tag in image_tag"
    components = text.split("/")
    first = components[0]
    # Docker's rule (splitDockerDomain in distribution/reference): the first
    # component is a registry host only when more components follow and it
    # contains "." or ":" or is "localhost".
    if len(components) > 1 and ("." in first or ":" in first
                                or first == "localhost"):
        reason = _registry_host_error(first)
        if reason:
            return "registry host " + reason
        components = components[1:]
    for component in components:
        if not _IMAGE_COMPONENT.fullmatch(component):
            return ("path components must be lowercase letters and digits,"
                    " joined by ., _, __ or -, and separated by /")
    return None


def _volume_spec_error(text: str) -> str | None:
    if "," in text or _CONTROL_CHARACTERS.search(text):
        return "must not contain commas or control characters"
    parts = text.split(":")
    if len(parts) not in (2, 3):
        return "must be SRC:DST, SRC:DST:ro or SRC:DST:rw"
    if len(parts) == 3 and parts[2] not in ("ro", "rw"):
        return "mode must be ro or rw"
    return _volume_source_error(parts[0]) or _volume_target_error(parts[1])


def _volume_source_error(source: str) -> str | None:
    if "/" not in source:
        if re.fullmatch(ID_PATTERN, source):
            return None
        return (f"source must be a volume name matching {ID_PATTERN}, or a"
                " relative path that contains /")
    if source.startswith("/"):
        return "source must be relative to the app data directory"
    normal = posixpath.normpath(source)
    if normal in (".", "..") or normal.startswith("../"):
        return "source must stay inside the app data directory"
    return None


def _volume_target_error(target: str) -> str | None:
    if not target.startswith("/"):
        return "target must be an absolute path"
    if ".." in target.split("/"):
        return "target must not contain .. components"
    if _volume_target(target) == "/":
        return "target must not be /"
    return None


def _volume_target(target: str) -> str:
    return "/" + posixpath.normpath(target).lstrip("/")


def _volume_list_error(specs: list[str]) -> str | None:
    targets = [_volume_target(spec.split(":")[1]) for spec in specs]
    for index, target in enumerate(targets):
        if target in targets[:index]:
            return f"item {index} mounts at {target} like an earlier item"
    return None


def _canary_steps_error(steps: list[int]) -> str | None:
    for index in range(1, len(steps)):
        if steps[index] <= steps[index - 1]:
            return f"must be strictly increasing (item {index})"
    if steps[-1] != 100:
        return "must end at 100"
    return None


# Each function returns the reason a value is invalid, or None. It runs only
# after the type, length and pattern checks passed.
FORMAT_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "int32": _int32_error,
    "http-url": _http_url_error,
    "domain-name": _normal_domain_error,
    "env-name": _env_name_error,
    "registry-host": _registry_host_error,
    "image-name": _image_name_error,
    "volume-spec": _volume_spec_error,
    "volume-list": _volume_list_error,
    "canary-steps": _canary_steps_error,
}
# Formats whose cleaned value is a normal form of the input.
_NORMALISERS = {"domain-name": normalise_domain}


# --- The validator ---


class ValidationResult(NamedTuple):
    """Outcome of validate_body().

    value is a cleaned deep copy of the body, or None when errors is not empty.
    errors lists {"field": path, "reason": text} dicts sorted by field, and
    ignored lists the JSON paths of unknown fields, sorted.
    """

    value: dict | None
    errors: list
    ignored: list

    @property
    def ok(self) -> bool:
        """True when the body is valid."""
        return not self.errors


class _Findings:
    """Errors and ignored paths collected during one validation."""

    def __init__(self) -> None:
        self.errors: list[dict] = []
        self.ignored: list[str] = []

    def error(self, path: str, reason: str) -> None:
        self.errors.append({"field": path, "reason": reason})


_TYPE_WORDS = {
    "object": "an object", "array": "an array", "string": "a string",
    "integer": "an integer", "number": "a number", "boolean": "a boolean",
    "null": "null",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _child_path(path: str, key: str | int) -> str:
    """Return the path of key below path: .name, ["other key"] or [index]."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"][len(_REF_PREFIX):]]
    return schema


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _schema_types(schema: dict) -> list[str]:
    types = schema.get("type", [])
    return [types] if isinstance(types, str) else list(types)


def _type_error(schema: dict, value: Any) -> str | None:
    types = _schema_types(schema)
    if not types:
        return None
    actual = _json_type(value)
    # NOTE: 1.0 is an integer in JSON Schema but not here, because ids and
    # ports should arrive as JSON integers.
    if actual in types or (actual == "integer" and "number" in types):
        if actual == "number" and not math.isfinite(value):
            return "must be a finite number"
        return None
    expected = " or ".join(_TYPE_WORDS[name] for name in types)
    if actual == "number" and "integer" in types and value.is_integer():
        return f"must be {expected} without a decimal point or exponent"
    return f"must be {expected}, got {actual}"


def _string_error(schema: dict, text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it contains an unpaired surrogate)"
    min_length = schema.get("minLength", 0)
    if len(text) < min_length:
        if min_length == 1:
            return "must not be empty"
        return f"must be at least {min_length} characters"
    max_length = schema.get("maxLength")
    if max_length is not None and len(text) > max_length:
        return f"must be at most {max_length} characters"
    pattern = schema.get("pattern")
    if pattern and not _compiled(pattern).fullmatch(text):
        return _PATTERN_REASONS.get(pattern, f"must match {pattern}")
    return None


def _number_error(schema: dict, number: float) -> str | None:
    if "minimum" in schema and number < schema["minimum"]:
        return f"must be at least {schema['minimum']}"
    if "maximum" in schema and number > schema["maximum"]:
        return f"must be at most {schema['maximum']}"
    return None


def _check_scalar(schema: dict, value: Any) -> tuple[Any, str | None]:
    """Check a string, number or boolean and return (cleaned value, reason)."""
    reason = None
    if isinstance(value, str):
        reason = _string_error(schema, value)
    elif not isinstance(value, bool):
        reason = _number_error(schema, value)
    if reason:
        return value, reason

    name = schema.get("format")
    if name in _NORMALISERS:
        value = _NORMALISERS[name](value)
    if name in FORMAT_CHECKS:
        reason = FORMAT_CHECKS[name](value)
    if not reason and "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(str(choice) for choice in schema["enum"])
        reason = f"must be one of: {choices}"
    return value, reason


def _validate(schema: dict, value: Any, path: str, findings: _Findings) -> Any:
    """Check value against schema and return the cleaned copy, None if invalid."""
    schema = _resolve(schema)
    if "anyOf" in schema:
        return _validate_any_of(schema["anyOf"], value, path, findings)
    reason = _type_error(schema, value)
    if reason:
        findings.error(path, reason)
        return None
    if value is None:
        return None
    if isinstance(value, dict):
        if "properties" in schema:
            return _validate_fields(schema, value, path, findings)
        return _validate_map(schema, value, path, findings)
    if isinstance(value, list):
        return _validate_array(schema, value, path, findings)
    value, reason = _check_scalar(schema, value)
    if reason:
        findings.error(path, reason)
        return None
    return value


def _validate_any_of(branches: list, value: Any, path: str,
                     findings: _Findings) -> Any:
    for branch in branches:
        trial = _Findings()
        cleaned = _validate(branch, value, path, trial)
        if not trial.errors:
            findings.ignored.extend(trial.ignored)
            return cleaned
    # Report the errors of the branch whose type fits, so that the reasons
    # name the actual problem instead of listing every alternative.
    for branch in branches:
        if _type_error(_resolve(branch), value) is None:
            return _validate(branch, value, path, findings)
    types = [word for branch in branches for word in _schema_types(
        _resolve(branch))]
    expected = " or ".join(_TYPE_WORDS[name] for name in types)
    findings.error(path, f"must be {expected}, got {_json_type(value)}")
    return None


def _validate_fields(schema: dict, value: dict, path: str,
                     findings: _Findings) -> dict:
    """Check a fixed-field object. Unknown fields are listed, not copied."""
    required = schema.get("required", [])
    cleaned = {}
    for name, field_schema in schema["properties"].items():
        field_path = _child_path(path, name)
        if name in value:
            cleaned[name] = _validate(field_schema, value[name], field_path,
                                      findings)
        elif name in required:
            findings.error(field_path, "is required")
            cleaned[name] = None
        if cleaned.get(name) is None and name not in required:
            cleaned[name] = copy.deepcopy(field_schema.get("default"))

    for name in value:
        if name not in schema["properties"]:
            findings.ignored.append(_child_path(path, name))
    for rule in schema.get("x-crate-rules", {}):
        _RULES[rule](cleaned, path, findings)
    return cleaned


def _count_error(count: int, schema: dict, nouns: tuple[str, str]) -> str | None:
    """Return why count is outside minItems..maxItems or the Properties pair.

    nouns is the singular and plural word for one element, such as
    ("item", "items").
    """
    low = schema.get("minItems", schema.get("minProperties"))
    high = schema.get("maxItems", schema.get("maxProperties"))
    if low is not None and count < low:
        return f"must have at least {low} {nouns[low != 1]}"
    if high is not None and count > high:
        return f"must have at most {high} {nouns[high != 1]}"
    return None


def _validate_map(schema: dict, value: dict, path: str,
                  findings: _Findings) -> dict:
    """Check a map: the count, every key, then every value."""
    reason = _count_error(len(value), schema, ("entry", "entries"))
    if reason:
        findings.error(path, reason)
    key_schema = schema.get("propertyNames")
    item_schema = schema.get("additionalProperties", {})
    cleaned = {}
    for key, item in value.items():
        item_path = _child_path(path, key)
        key_reason = _key_error(key_schema, key) if key_schema else None
        if key_reason:
            findings.error(item_path, key_reason)
            cleaned[key] = None
            continue
        cleaned[key] = _validate(item_schema, item, item_path, findings)
    return cleaned


def _key_error(key_schema: dict, key: str) -> str | None:
    _, reason = _check_scalar(key_schema, key)
    if reason:
        return f"{key_schema.get('title', 'key')} {reason}"
    return None


def _validate_array(schema: dict, value: list, path: str,
                    findings: _Findings) -> list:
    """Check an array: the count, every item, uniqueness, then its format."""
    errors_before = len(findings.errors)
    reason = _count_error(len(value), schema, ("item", "items"))
    if reason:
        findings.error(path, reason)
    item_schema = schema.get("items", {})
    cleaned = [
        _validate(item_schema, item, _child_path(path, index), findings)
        for index, item in enumerate(value)
    ]
    if schema.get("uniqueItems"):
        _check_unique(value, path, findings)

    name = schema.get("format")
    if name in FORMAT_CHECKS and len(findings.errors) == errors_before:
        reason = FORMAT_CHECKS[name](cleaned)
        if reason:
            findings.error(path, reason)
    return cleaned


def _check_unique(items: list, path: str, findings: _Findings) -> None:
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        key = json.dumps(item, sort_keys=True)
        if key in first_index:
            findings.error(_child_path(path, index),
                           f"duplicates item {first_index[key]}")
        else:
            first_index[key] = index


# --- Cross-field rules ---


def _check_distinct_ports(body: dict, path: str, findings: _Findings) -> None:
    used_by: dict[int, str] = {}
    for field in ("slots", "instances"):
        for key, entry in (body.get(field) or {}).items():
            port = (entry or {}).get("port")
            if port is None:
                continue
            port_path = _child_path(_child_path(_child_path(path, field), key),
                                    "port")
            if port in used_by:
                findings.error(port_path,
                               f"port {port} is already used by {used_by[port]}")
            else:
                used_by[port] = port_path


def _check_strategy_slot_count(body: dict, path: str,
                               findings: _Findings) -> None:
    strategy = body.get("deployment_strategy")
    slots = body.get("slots")
    if strategy not in ("bluegreen", "canary") or not isinstance(slots, dict):
        return
    if len(slots) != 2:
        findings.error(
            _child_path(path, "deployment_strategy"),
            f"{strategy} needs exactly 2 slots, because one slot serves while"
            f" the other takes the new version (got {len(slots)})")


def _check_env_total_size(body: dict, path: str, findings: _Findings) -> None:
    env = body.get("env_vars") or {}
    total = sum(
        len(name.encode()) + 1 + len(value.encode())
        for name, value in env.items() if value is not None
    )
    if total > MAX_ENV_TOTAL_BYTES:
        findings.error(
            _child_path(path, "env_vars"),
            f"must contain at most {MAX_ENV_TOTAL_BYTES} bytes of NAME=value in"
            f" total (got {total})")


_RULES: dict[str, Callable[[dict, str, _Findings], None]] = {
    "distinct-ports": _check_distinct_ports,
    "strategy-slot-count": _check_strategy_slot_count,
    "env-total-size": _check_env_total_size,
}


# --- Public entry points ---


def _endpoint_entry(endpoint_name: str) -> dict:
    try:
        return ENDPOINTS[endpoint_name]
    except KeyError:
        raise ValueError(f"unknown endpoint {endpoint_name!r}") from None


def validate_body(endpoint_name: str, body: Any) -> ValidationResult:
    """Validate a parsed JSON request body for the named endpoint.

    Every error is reported, not only the first. Unknown fields are not errors
    and are listed in ignored. Raises ValueError for an endpoint name that is
    not in ENDPOINTS or that takes no body.
    """
    endpoint = _endpoint_entry(endpoint_name)
    if endpoint["body"] is None:
        raise ValueError(f"endpoint {endpoint_name!r} takes no request body")
    if not isinstance(body, dict):
        reason = f"request body must be a JSON object, got {_json_type(body)}"
        return ValidationResult(None, [{"field": "$", "reason": reason}], [])

    findings = _Findings()
    cleaned = _validate(endpoint["body"], body, "$", findings)
    errors = sorted(findings.errors, key=lambda error: error["field"])
    return ValidationResult(None if errors else cleaned, errors,
                            sorted(findings.ignored))


def validate_path_param(endpoint_name: str,
                        raw_string: str) -> tuple[Any, list[dict]]:
    """Validate the percent-decoded deployment_id segment of a status path.

    Returns (value, errors): value is an int for status_instance and a str for
    status_legacy, or None when errors (dicts with field "deployment_id") is
    not empty. Raises ValueError for an endpoint without a path parameter.
    """
    params = _endpoint_entry(endpoint_name)["params"]
    if not params:
        raise ValueError(f"endpoint {endpoint_name!r} has no path parameter")
    name, schema = params[0]["name"], params[0]["schema"]
    value: Any = raw_string
    if schema.get("type") == "integer":
        if not _INTEGER_TEXT.fullmatch(raw_string):
            reason = "must be a decimal integer such as 42 or -1"
            return None, [{"field": name, "reason": reason}]
        value = int(raw_string)

    findings = _Findings()
    cleaned = _validate(schema, value, name, findings)
    return (None if findings.errors else cleaned), findings.errors


def validate_query(endpoint_name: str,
                   query: str) -> tuple[dict | None, list[dict]]:
    """Validate the query string of a GET endpoint against its parameters.

    Returns (values, errors): values maps every declared parameter to its
    cleaned value (defaults filled in), or is None when errors is not empty.
    Unknown and repeated parameters are errors.
    """
    params = [param for param in _endpoint_entry(endpoint_name)["params"]
              if param["in"] == "query"]
    try:
        raw = urllib.parse.parse_qs(query, keep_blank_values=True,
                                    strict_parsing=bool(query),
                                    max_num_fields=len(params) + 8)
    except ValueError as exc:
        return None, [{"field": "$query", "reason": f"is malformed: {exc}"}]
    findings = _Findings()
    declared = {param["name"] for param in params}
    for name in sorted(set(raw) - declared):
        findings.error(name[:64], "is not a parameter of this endpoint; use "
                                  + ", ".join(sorted(declared)))
    values = {}
    for param in params:
        name, schema = param["name"], param["schema"]
        items = raw.get(name)
        if not items:
            if param["required"]:
                findings.error(name, "is required")
            values[name] = schema.get("default")
            continue
        if len(items) > 1:
            findings.error(name, "must be given once")
            continue
        value: Any = items[0]
        if schema.get("type") == "integer":
            if not _INTEGER_TEXT.fullmatch(value):
                findings.error(name, "must be a decimal integer")
                continue
            value = int(value)
        values[name] = _validate(schema, value, name, findings)
    return (None if findings.errors else values), findings.errors


# --- OpenAPI document ---


def _media(schema: str | dict) -> dict:
    if isinstance(schema, str):
        schema = _ref(schema)
    media_type = schema.get("contentMediaType", "application/json")
    return {media_type: {"schema": copy.deepcopy(schema)}}


def _operation(name: str, endpoint: dict) -> dict:
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": endpoint["summary"],
        "responses": {
            code: {"description": description, "content": _media(schema)}
            for code, (description, schema) in sorted(
                endpoint["responses"].items())
        },
    }
    if endpoint["description"]:
        operation["description"] = endpoint["description"]
    if endpoint["path"].startswith("/v1/"):
        operation["security"] = [{"bearerAuth": []}]
    if endpoint["params"]:
        operation["parameters"] = copy.deepcopy(endpoint["params"])
    if endpoint["body_name"]:
        operation["requestBody"] = {
            "required": True, "content": _media(endpoint["body_name"]),
        }
    return operation


def _header(name: str, description: str, schema: dict) -> dict:
    return {"name": name, "in": "header", "required": True,
            "description": description, "schema": schema}


def _callback_webhook() -> dict:
    headers = [
        _header("X-Crate-Event", "Event name, the same as the body's event.",
                {"type": "string"}),
        _header("X-Crate-Delivery",
                "Delivery id. A retry repeats it and the same body bytes, so"
                " receivers can drop duplicates.", {"type": "string"}),
        _header("X-Crate-Signature",
                "sha256=<hex HMAC-SHA256 of the raw body, keyed by the"
                " callback secret>.",
                {"type": "string", "pattern": SIGNATURE_PATTERN}),
    ]
    return {"post": {
        "summary": "Deployment event POSTed to callback_url",
        "parameters": headers,
        "requestBody": {"required": True, "content": _media("CallbackBody")},
        "responses": {"2XX": {
            "description": "Delivered. Any other status counts as a failed"
                           " delivery."}},
    }}


def openapi_document(version: str) -> dict:
    """Build the OpenAPI 3.1.0 document of the API from ENDPOINTS and SCHEMAS.

    version is the operator's version, shown as info.version. The result is a
    new dict on every call, so callers may change it.
    """
    paths: dict[str, dict] = {}
    for name, endpoint in ENDPOINTS.items():
        item = paths.setdefault(endpoint["path"], {})
        item[endpoint["method"].lower()] = _operation(name, endpoint)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crate-operator",
            "version": version,
            "description": (
                "Host agent that deploys binary and docker apps and routes"
                " their domains through Caddy. Fields marked"
                " x-crate-extension are additions to the platform API."
            ),
        },
        "paths": paths,
        "webhooks": {"deploymentEvent": _callback_webhook()},
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
            },
        },
    }


# === Configuration ===

class Config:
    """Effective configuration: every key of CONFIG_SPEC as an attribute."""

    def __init__(self, values: dict):
        self._values = dict(values)
        for key, value in values.items():
            setattr(self, key, value)

    def as_dict(self, mask_secrets: bool = True) -> dict:
        """Return the values, with secrets replaced by a mask."""
        out = dict(self._values)
        if mask_secrets:
            for key in SECRET_KEYS:
                if out.get(key):
                    out[key] = "***"
            out["tokens"] = [dict(item, token="***")
                             for item in out.get("tokens") or []]
        return out


def _coerce(key: str, value, source: str):
    """Convert one raw value to the type CONFIG_SPEC gives for key."""
    kind = CONFIG_SPEC[key][1]
    if value is None:
        return None
    if isinstance(value, str) and kind is not str:
        try:
            value = json.loads(value)
        except ValueError:
            if kind is list:
                value = value.split()
            else:
                raise ConfigError(
                    f"{source}: {key} must be {kind.__name__}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, list):
        default = CONFIG_SPEC[key][0]
        # tokens holds {"name", "token"} objects; every other list key
        # with an empty default holds strings.
        item_kind = type(default[0]) if default else (
            dict if key == "tokens" else str)
        if not all(type(item) is item_kind for item in value):
            raise ConfigError(f"{source}: {key} must be a list of "
                              f"{item_kind.__name__}")
        return value
    if not isinstance(value, kind) or (kind is not bool and
                                       isinstance(value, bool)):
        raise ConfigError(
            f"{source}: {key} must be {kind.__name__}, got {value!r}")
    return value


def check_private_file(path: str, key: str) -> None:
    """Raise ConfigError unless path is a file only its owner may access."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {key} file {path}: {exc.strerror}")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{key} file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{key} file {path} is readable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 600 {path}")


def _read_secret_file(path: str, key: str) -> str:
    """Read a secret from a file that only its owner may read."""
    check_private_file(path, key)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read {key} file {path}: {reason}")
    if not text:
        raise ConfigError(f"{key} file {path} is empty")
    return text


def load_config(path: str | None, environ: dict, overrides: dict) -> Config:
    """Build the configuration: defaults, file, environment, then flags.

    Unknown keys in any source are an error naming the key and its source.
    """
    values = {key: copy.deepcopy(spec[0]) for key, spec in CONFIG_SPEC.items()}
    file_path = path or DEFAULT_CONFIG_PATH
    if path is not None or os.path.exists(file_path):
        values.update(_read_config_file(file_path))
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in CONFIG_SPEC:
            raise ConfigError(f"environment variable {name}: unknown key {key!r}")
        values[key] = _coerce(key, raw, f"environment variable {name}")
    for key, raw in overrides.items():
        if key not in CONFIG_SPEC:
            raise ConfigError(f"--set: unknown key {key!r}")
        values[key] = _coerce(key, raw, f"--set {key}")
    _resolve_secrets(values)
    _check_config(values)
    return Config(values)


def _read_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}")
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    out = {}
    for key, raw in data.items():
        if key not in CONFIG_SPEC:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        out[key] = _coerce(key, raw, f"config file {path}")
    return out


def _resolve_secrets(values: dict) -> None:
    for key in ("token", "callback_secret"):
        file_key = key + "_file"
        if values.get(file_key) and not values.get(key):
            values[key] = _read_secret_file(values[file_key], key)


_TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOKEN_MIN_CHARS = 16


def read_tokens_dir(path: str) -> list:
    """Read (name, token) pairs from the files of a tokens_dir.

    Each file's name is its token's name. Names starting with a dot are
    skipped, because editors leave such swap and backup files.
    """
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise ConfigError(f"cannot read tokens_dir {path}: {exc.strerror}")
    pairs = []
    for name in names:
        if name.startswith("."):
            continue
        file_path = os.path.join(path, name)
        if not _TOKEN_NAME.fullmatch(name):
            raise ConfigError(f"token file {file_path}: the name must be "
                              f"1-64 of [A-Za-z0-9_.-]")
        pairs.append((name, _read_secret_file(file_path, "token")))
    return pairs


def collect_tokens(values) -> list:
    """Return every accepted (name, token) pair, or raise ConfigError.

    values is a Config or a dict of config values. token (already read
    from token_file by load_config) is named "default". tokens_dir is read
    again on each call, which is how SIGHUP picks up a changed directory.
    """
    if not isinstance(values, dict):
        values = values.as_dict(mask_secrets=False)
    pairs = []
    if values.get("token"):
        pairs.append(("default", values["token"]))
    for item in values.get("tokens") or []:
        if not isinstance(item, dict) or set(item) != {"name", "token"} or \
                not all(isinstance(v, str) for v in item.values()):
            raise ConfigError('each item of tokens must be an object '
                              '{"name": str, "token": str}')
        if not _TOKEN_NAME.fullmatch(item["name"]):
            raise ConfigError(f"tokens: name {item['name'][:80]!r} must be "
                              f"1-64 of [A-Za-z0-9_.-]")
        pairs.append((item["name"], item["token"]))
    if values.get("tokens_dir"):
        pairs.extend(read_tokens_dir(values["tokens_dir"]))
    seen = set()
    for name, token in pairs:
        if name in seen:
            raise ConfigError(f"token name {name!r} is used twice; token and "
                              f"token_file are named 'default'")
        seen.add(name)
        if len(token) < TOKEN_MIN_CHARS:
            raise ConfigError(f"token {name!r} must be at least "
                              f"{TOKEN_MIN_CHARS} characters")
    if not pairs:
        raise ConfigError("no bearer token: set token, token_file, tokens "
                          "or tokens_dir")
    return pairs


def is_loopback_host(host: str) -> bool:
    """Return True when host names a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_transport(values: dict, problems: list) -> None:
    cert, key = values["tls_cert_file"], values["tls_key_file"]
    if bool(cert) != bool(key):
        problems.append("tls_cert_file and tls_key_file must be set together")
    if values["tls_client_ca_file"] and not cert:
        problems.append("tls_client_ca_file needs tls_cert_file and "
                        "tls_key_file")
    if key:
        try:
            check_private_file(key, "tls_key_file")
        except ConfigError as exc:
            problems.append(str(exc))
    try:
        host, _port = parse_listen(values["listen"])
    except ConfigError as exc:
        problems.append(str(exc))
        return
    if not cert and not values["allow_plaintext"] and \
            not is_loopback_host(host):
        problems.append(
            f"listen {values['listen']} is not a loopback address, and "
            f"without TLS the bearer tokens would cross the network in "
            f"plain text; set tls_cert_file and tls_key_file, listen on "
            f"127.0.0.1, or set allow_plaintext to true when the network "
            f"itself is encrypted (a VPN, for example)")


def parse_listen(text: str) -> tuple:
    """Split 'host:port' (IPv6 in brackets) into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen {text!r} must be host:port, e.g. 127.0.0.1:8750")
    return host.strip("[]"), int(port)


def _check_config(values: dict) -> None:
    problems = []
    try:
        collect_tokens(values)
    except ConfigError as exc:
        problems.append(str(exc))
    if not values.get("callback_secret"):
        problems.append("callback_secret (or callback_secret_file) is required")
    _check_transport(values, problems)
    for key, spec in CONFIG_SPEC.items():
        if spec[1] in (int, float) and values[key] is not None \
                and values[key] <= 0:
            problems.append(f"{key} must be greater than 0")
    for key in ("state_dir", "apps_dir", "unit_dir"):
        if not os.path.isabs(values[key]):
            problems.append(f"{key} must be an absolute path")
    if not values["systemctl"]:
        problems.append("systemctl must name a command")
    steps = values["canary_steps"]
    increasing = all(a < b for a, b in zip(steps, steps[1:]))
    if not steps or steps[-1] != 100 or steps[0] <= 0 or not increasing:
        problems.append("canary_steps must be increasing percentages "
                        "ending at 100")
    if not 1024 <= values["port_range_min"] <= values["port_range_max"] \
            <= 65535:
        problems.append("port_range_min..port_range_max must be a range "
                        "within 1024-65535")
    for key in ("outbound_allow", "outbound_block"):
        for rule in values[key]:
            if _parse_outbound_rule(rule) is None:
                problems.append(f"{key}: {rule!r} is neither a CIDR network "
                                f"nor a host name")
    if values["log_format"] not in ("text", "json"):
        problems.append("log_format must be 'text' or 'json'")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", values["caddy_server"]):
        problems.append("caddy_server must be 1-64 of [A-Za-z0-9_-]")
    if values["app_user"] != "dynamic" and \
            not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", values["app_user"]):
        problems.append("app_user must be a user name or 'dynamic'")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


# === State store ===

def sync_fd(fd: int, data_only: bool = False) -> None:
    """Flush ``fd`` with fsync (or fdatasync), counted as this thread's
    storage wait.

    The wait also depends on what else the filesystem has to write, so it
    can grow with other processes' writes (an estimate: not traced here).
    """
    started = time.monotonic()
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        count_wait("storage", time.monotonic() - started)


def fsync_dir(path: str) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync_fd(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o600,
                 xattrs: dict | None = None, sync: bool = True) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync.

    Readers see the old or the new content, never a partial file.
    ``xattrs`` (name to bytes) are set on the temporary file before its
    fsync, so they describe the new content from the moment it is visible.
    With ``sync`` False both fsyncs are left out: a process crash still
    leaves the old or the new file, but a power loss may leave either, or
    on some filesystems an empty file, so readers must handle that.
    """
    directory = os.path.dirname(path)
    try:
        _atomic_write(path, directory, data, mode, xattrs or {}, sync)
    except OSError as exc:
        raise StorageError(
            f"cannot write {path}: {exc.strerror}; check the free space "
            f"and permissions of {directory}") from exc


def _atomic_write(path: str, directory: str, data: bytes, mode: int,
                  xattrs: dict, sync: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        # Plain descriptor calls: a Python file object around fd and a
        # chmod by path made the write a quarter slower here.
        try:
            _write_all(fd, data)
            for name, value in xattrs.items():
                _set_xattr(fd, name, value)
            os.fchmod(fd, mode)
            if sync:
                sync_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(directory)


def _set_xattr(fd: int, name: str, value: bytes) -> None:
    """Set an extended attribute unless the filesystem or seccomp rejects it.

    Callers treat a missing attribute as unknown and read the file instead.
    """
    try:
        os.setxattr(fd, name, value)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG,
                             errno.ERANGE, errno.ENOSPC, errno.EDQUOT,
                             errno.EPERM, errno.EACCES):
            raise


def atomic_write_json(path: str, value, mode: int = 0o600,
                      xattrs: dict | None = None, sync: bool = True) -> None:
    """Write ``value`` as JSON through atomic_write."""
    # Without indentation, because only then does json use its C encoder:
    # a 3.3 KB deployment record took 82 us with indent=1 and 21 us so.
    data = json.dumps(value, sort_keys=True,
                      separators=(",", ":")).encode() + b"\n"
    atomic_write(path, data, mode, xattrs, sync)


def read_json(path: str):
    """Return the JSON value stored at ``path``, or None when it is absent."""
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _last_logged_record(path: str) -> dict | None:
    """Return the record on the last complete line of a change log, or None.

    A line cut off by a crash, or one that is not a JSON object, is
    skipped.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    for line in reversed(data.split(b"\n")):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _safe_key(text: str) -> str:
    """Map an id to a file name; ids are already restricted by validation."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", text) or text.startswith("."):
        raise OperatorError(f"unsafe record id {text!r}")
    return text


def _app_summary(record: dict) -> tuple:
    """Return (domain, instance ports) of an app record."""
    ports = tuple(instance.get("port")
                  for instance in record.get("instances", {}).values())
    return record.get("domain"), ports


class Store:
    """JSON records under ``state_dir``, one file per record.

    Callers use: lock_exclusive (once per process), app / save_app,
    deployment / save_deployment / deployments, next_seq, request_digest,
    and the outbox_* methods for the callback outbox.
    """

    def __init__(self, state_dir: str):
        self.root = state_dir
        self.apps_dir = os.path.join(state_dir, "apps")
        self.deployments_dir = os.path.join(state_dir, "deployments")
        self.outbox_dir = os.path.join(state_dir, "outbox")
        self._seq_lock = threading.Lock()
        self._seq_next = None
        self._seq_reserved = 0
        self._lock_handle = None
        # Rendered views of deployment records by id (see deployment_view).
        # Every write of a record goes through this Store, which drops the
        # record's view after the file is replaced. _view_generation counts
        # those writes, so a reader that read a file before a write does not
        # put what it rendered from the old file into the cache.
        self._view_lock = threading.Lock()
        self._views: dict = {}
        self._view_generation = 0
        # App id -> (domain, instance ports) of every app record, read on
        # first use and kept current by save_app and delete_app, so that a
        # deploy's domain and port checks do not read every app record.
        self._summaries: dict[int, tuple] | None = None
        self._summaries_lock = threading.Lock()
        for path in (state_dir, self.apps_dir, self.deployments_dir,
                     self.outbox_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._digest_key = self._load_digest_key()

    def lock_exclusive(self) -> None:
        """Hold an exclusive lock so a second operator cannot share state."""
        path = os.path.join(self.root, "lock")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"state_dir {self.root} is in use by another crate-operator "
                f"process (lock {path} is held); stop it or use another "
                f"state_dir")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def _load_digest_key(self) -> bytes:
        path = os.path.join(self.root, "digest.key")
        if not os.path.exists(path):
            atomic_write(path, secrets.token_hex(32).encode())
        with open(path, "rb") as handle:
            return handle.read().strip()

    def request_digest(self, value) -> str:
        """Return a keyed digest of a request, so no secret is stored."""
        canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._digest_key, canonical.encode(),
                        hashlib.sha256).hexdigest()

    # --- apps

    def app(self, app_id: int) -> dict | None:
        """Return the record of one app, or None."""
        return read_json(os.path.join(self.apps_dir, f"{int(app_id)}.json"))

    def save_app(self, record: dict) -> None:
        """Store the record of one app."""
        record["updated_at"] = utc_now()
        path = os.path.join(self.apps_dir, f"{int(record['app_id'])}.json")
        try:
            atomic_write_json(path, record)
        except BaseException:
            # The rename may have happened before the failure, so the file
            # can hold either record.
            self._forget_summaries()
            raise
        with self._summaries_lock:
            if self._summaries is not None:
                self._summaries[int(record["app_id"])] = _app_summary(record)

    def delete_app(self, app_id: int) -> None:
        """Remove the record of one app."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.apps_dir, f"{int(app_id)}.json"))
                fsync_dir(self.apps_dir)
        except BaseException:
            # The unlink may have happened before the failure.
            self._forget_summaries()
            raise
        with self._summaries_lock:
            if self._summaries is not None:
                self._summaries.pop(int(app_id), None)

    def _forget_summaries(self) -> None:
        """Read every app record again on next use, after a failed write."""
        with self._summaries_lock:
            self._summaries = None

    def _app_summaries(self) -> dict:
        # Called with _summaries_lock held.
        if self._summaries is None:
            self._summaries = {int(app["app_id"]): _app_summary(app)
                               for app in self.apps()}
        return self._summaries

    def apps_with_domain(self, domain: str) -> list[int]:
        """Return the ids of the apps whose record has this domain, sorted."""
        with self._summaries_lock:
            return sorted(app_id for app_id, (value, _)
                          in self._app_summaries().items() if value == domain)

    def used_ports(self) -> set:
        """Return the ports that the instances of all app records use."""
        with self._summaries_lock:
            return {port for _, ports in self._app_summaries().values()
                    for port in ports}

    def apps(self) -> list:
        """Return every app record."""
        out = []
        for name in sorted(os.listdir(self.apps_dir)):
            if name.endswith(".json") and not name.startswith("."):
                record = read_json(os.path.join(self.apps_dir, name))
                if record:
                    out.append(record)
        return out

    # --- deployments

    def deployment(self, deployment_id) -> dict | None:
        """Return one deployment record, or None."""
        return self._read_deployment(_safe_key(str(deployment_id)))

    def _read_deployment(self, key: str) -> dict | None:
        """Return the newer of <key>.json and the last change in <key>.log.

        The "rev" counter of save_deployment orders them: after a crash
        between folding the log into the record file and deleting the log,
        the log is older.  A torn last line (a crash while appending) is
        skipped, so the change before it is returned.  The log is read
        first, so that a save which replaces the record file and deletes the
        log between the two reads is found in the record file.  In the other
        order, the record file from before that save was returned.
        """
        logged = _last_logged_record(
            os.path.join(self.deployments_dir, key + ".log"))
        record = read_json(os.path.join(self.deployments_dir, key + ".json"))
        if record is None:
            return None
        if not isinstance(record, dict):
            # Only a hand-edited or damaged file holds this; as a record it
            # would stop recovery and every reader that lists records.
            log("deployment.record_invalid", logging.WARNING,
                deployment_id=key,
                error="the record file holds no JSON object; it is skipped")
            return None
        if logged is not None and logged.get("rev", 0) > record.get("rev", 0):
            return logged
        return record

    def deployment_view(self, deployment_id, render):
        """Return render(record) of one deployment, or None without a record.

        The result is kept until the record is saved or deleted through
        this Store, so render must return a value nobody changes (bytes).
        Status reads use it to skip reading, parsing and serializing an
        unchanged record.
        """
        key = _safe_key(str(deployment_id))
        with self._view_lock:
            view = self._views.get(key)
            if view is not None:
                return view
            generation = self._view_generation
        record = self._read_deployment(key)
        if record is None:
            return None
        view = render(record)
        with self._view_lock:
            if generation == self._view_generation:
                if len(self._views) >= STATUS_CACHE_MAX:
                    # Dicts keep insertion order: drop the oldest view.
                    del self._views[next(iter(self._views))]
                self._views[key] = view
        return view

    def _forget_view(self, key: str) -> None:
        """Drop the view of one record after its file changed."""
        with self._view_lock:
            self._view_generation += 1
            self._views.pop(key, None)

    def save_deployment(self, record: dict, sync: bool = True) -> None:
        """Store one deployment record.

        A running deployment changes its record at every step, and
        rewriting the file costs a file and a directory fsync each time.
        So the first write and a terminal state replace <id>.json
        atomically, while the changes between are appended to <id>.log as
        one JSON line each, with fdatasync (a third to a fifth of the time
        in measurements on ext4), or with ``sync`` False without it.  Every
        save counts up the record's "rev", by which readers pick the newer
        of the two files.

        An append without fdatasync survives a crash of this process, but
        a power loss may lose it, and with it every later append that was
        not synced either: the record then reads as an earlier change.
        The next synced append makes the earlier lines durable too.
        """
        key = _safe_key(str(record["deployment_id"]))
        path = os.path.join(self.deployments_dir, key + ".json")
        log_path = os.path.join(self.deployments_dir, key + ".log")
        record["rev"] = record.get("rev", 0) + 1
        terminal = record.get("state") in STATES_TERMINAL
        try:
            if not terminal and not os.path.exists(path):
                # The empty log is created before the record's rename, so
                # the directory fsync of that rename makes its name durable
                # too, and the first change needs no directory fsync.
                os.close(os.open(log_path,
                                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
                self._replace_deployment(path, None, record)
            elif terminal or not self._append_change(log_path, record, sync):
                self._replace_deployment(path, log_path, record)
        except OSError as exc:
            raise StorageError(
                f"cannot write {log_path}: {exc.strerror}; check the free "
                f"space and permissions of {self.deployments_dir}") from exc
        finally:
            # Also after a failure: the rename may have happened before
            # the directory fsync failed, so the file can be new.
            self._forget_view(key)

    def _replace_deployment(self, path: str, log_path: str | None,
                            record: dict) -> None:
        history = history_key(record)
        atomic_write_json(path, record,
                          xattrs={HISTORY_XATTR: history} if history else None)
        if log_path is None:
            return
        # Without a directory fsync the log may come back after a crash;
        # its changes then have a lower rev than the record and are ignored.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_path)

    def _append_change(self, log_path: str, record: dict,
                       sync: bool = True) -> bool:
        """Append one record to the change log and return True, or return
        False when the log has reached RECORD_LOG_MAX and should be folded
        into the record file instead.  With ``sync`` False the line is not
        flushed to disk (see save_deployment)."""
        line = json.dumps(record, sort_keys=True,
                          separators=(",", ":")).encode() + b"\n"
        created = False
        try:
            try:
                fd = os.open(log_path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:
                fd = os.open(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT,
                             0o600)
                created = True
            try:
                size = os.fstat(fd).st_size
                if size + len(line) > RECORD_LOG_MAX:
                    return False
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A crash cut the last append short. Without a newline
                    # first, this line would join it and readers skip both.
                    line = b"\n" + line
                try:
                    _write_all(fd, line)
                    if sync:
                        sync_fd(fd, data_only=True)
                except OSError:
                    # A part of the line may be on disk; cut it off so the
                    # next append starts on a line of its own.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
            if created and sync:
                fsync_dir(self.deployments_dir)
        except OSError as exc:
            raise StorageError(
                f"cannot write {log_path}: {exc.strerror}; check the free "
                f"space and permissions of {self.deployments_dir}") from exc
        return True

    def delete_deployment(self, deployment_id) -> None:
        """Remove one deployment record; a missing record is no error."""
        key = _safe_key(str(deployment_id))
        try:
            # The log goes first: a log without its record is never read.
            for suffix in (".log", ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.deployments_dir, key + suffix))
        finally:
            self._forget_view(key)

    def deployments(self) -> list:
        """Return every deployment record."""
        return list(self.iter_deployments())

    def iter_deployments(self, unfinished_only: bool = False):
        """Yield every deployment record, reading one file at a time.

        With ``unfinished_only``, a record whose HISTORY_XATTR names a
        terminal state is skipped without reading it: the attribute
        describes its file, which a terminal state replaces whole, and no
        state follows a terminal one. Parsing 1,000 finished records added
        about 45 ms to start-up (bench/results.md).
        """
        for name in sorted(os.listdir(self.deployments_dir)):
            if not name.endswith(".json") or name.startswith("."):
                continue
            if unfinished_only and self._finished_by_xattr(name):
                continue
            record = self._read_deployment(name[:-len(".json")])
            if record:
                yield record

    def _finished_by_xattr(self, name: str) -> bool:
        try:
            value = os.getxattr(os.path.join(self.deployments_dir, name),
                                HISTORY_XATTR)
        except OSError:
            # No attribute (an older record, or no user xattrs on this
            # filesystem), or the file is gone: the caller reads it.
            return False
        entry = _parse_history_key(value)
        return entry is not None and entry["state"] in STATES_TERMINAL

    # --- callback outbox

    def next_seq(self) -> int:
        """Return the next value of the operator-wide event counter.

        seq.json holds the highest value this or an earlier process may
        have handed out.  Values are reserved in blocks of SEQ_BLOCK, so
        that one durable write covers many events; after a restart the
        counter continues above the block, which leaves a gap but never
        repeats a value.  It also continues above every event left in the
        outbox, so that a lost or older seq.json (restored from a backup,
        or deleted by hand) cannot make a new event overwrite an old one.
        """
        path = os.path.join(self.root, "seq.json")
        with self._seq_lock:
            if self._seq_next is None or self._seq_next > self._seq_reserved:
                if self._seq_next is None:
                    stored = read_json(path) or {"seq": 0}
                    self._seq_next = max(stored["seq"],
                                         self._highest_outbox_seq()) + 1
                reserved = self._seq_next + SEQ_BLOCK - 1
                # The block counts as reserved only once seq.json holds it:
                # after a failed write, handing out values from it would
                # repeat them after a restart.
                atomic_write_json(path, {"seq": reserved})
                self._seq_reserved = reserved
            value = self._seq_next
            self._seq_next += 1
            return value

    def _highest_outbox_seq(self) -> int:
        """Return the highest seq among the outbox file names, or 0."""
        highest = 0
        for name in os.listdir(self.outbox_dir):
            stem = name[:-len(".json")]
            if name.endswith(".json") and stem.isdigit():
                highest = max(highest, int(stem))
        return highest

    def outbox_add(self, event: dict, sync: bool = True) -> None:
        """Store one callback event before anyone tries to deliver it.

        With ``sync`` False the event is written without fsync: a crash of
        this process keeps it, a power loss may lose it or leave its file
        empty, which _read_event skips.
        """
        path = os.path.join(self.outbox_dir, f"{event['seq']:012d}.json")
        atomic_write_json(path, event, sync=sync)

    def outbox_update(self, event: dict) -> None:
        """Store the delivery progress of one event.

        The mark of a delivered or given-up event is written without
        fsync: after a power loss it may be missing, and the event is then
        sent once more (delivery is at least once), or the file may be
        empty, and _read_event skips it.  Those fsyncs ran in the delivery
        thread while a deploy wrote its own records, and all fsyncs share
        the filesystem's journal.  A failed attempt is stored durably,
        because its event has not been delivered yet.
        """
        finished = bool(event.get("delivered_at") or event.get("given_up_at"))
        path = os.path.join(self.outbox_dir, f"{event['seq']:012d}.json")
        atomic_write_json(path, event, sync=not finished)

    def _read_event(self, name: str) -> dict | None:
        """Return one outbox event, or None when its file is unreadable."""
        path = os.path.join(self.outbox_dir, name)
        try:
            event = read_json(path)
        except (OSError, ValueError) as exc:
            log("outbox.event_unreadable", logging.WARNING, path=path,
                error=str(exc))
            return None
        return event if isinstance(event, dict) and event else None

    def outbox_events(self) -> list:
        """Return every outbox event in seq order."""
        out = []
        for name in sorted(os.listdir(self.outbox_dir)):
            if name.endswith(".json") and not name.startswith("."):
                event = self._read_event(name)
                if event:
                    out.append(event)
        return out

    def outbox_after(self, after: int, limit: int) -> tuple:
        """Return (up to ``limit`` events with seq > ``after``, more left)."""
        names = sorted(name for name in os.listdir(self.outbox_dir)
                       if name.endswith(".json") and not name.startswith("."))
        events = []
        for name in names:
            if int(name[:-len(".json")]) <= after:
                continue
            if len(events) == limit:
                return events, True
            event = self._read_event(name)
            if event:
                events.append(event)
        return events, False

    def outbox_prune(self, keep_delivered: int) -> None:
        """Drop the oldest finished events past ``keep_delivered``."""
        finished = [e for e in self.outbox_events()
                    if e.get("delivered_at") or e.get("given_up_at")]
        for event in finished[:max(0, len(finished) - keep_delivered)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.outbox_dir,
                                       f"{event['seq']:012d}.json"))


# === Host adapter: HTTP over unix sockets ===

class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket (dockerd, Caddy admin)."""

    def __init__(self, path: str, timeout: float = 30.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        """Connect to the socket file instead of a TCP address."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


# === Host adapter: systemd ===

# Paths written into unit files are restricted to these characters, so that
# no quoting, specifier or variable rule of systemd can change their meaning.
_UNIT_SAFE_PATH = re.compile(r"/[A-Za-z0-9/_.+-]*")


def unit_name(app_id: int, instance_id: str) -> str:
    """Return the unit name of one instance of one app."""
    return f"{UNIT_PREFIX}{int(app_id)}-{instance_id}.service"


def unit_safe_path(path: str) -> str:
    """Return ``path`` when it can go into a unit file verbatim."""
    if not _UNIT_SAFE_PATH.fullmatch(path) or "/../" in path + "/":
        raise StepError(
            f"path {path!r} contains characters that cannot go into a unit "
            f"file; use a directory of [A-Za-z0-9/_.+-]")
    return path


def escape_env_file_value(value: str) -> str:
    """Quote one value for an EnvironmentFile= file.

    systemd's env-file parser (env-file.c) takes a double-quoted value
    verbatim except that a backslash before one of ``" \\ ` $`` yields that
    character; newlines and tabs may stay raw inside the quotes, and
    specifiers (``%``) are never expanded in these files.
    """
    if "\x00" in value:
        raise StepError("environment values cannot contain NUL")
    escaped = re.sub(r'(["\\`$])', r"\\\1", value)
    return f'"{escaped}"'


def render_env_file(env: dict) -> str:
    """Render the EnvironmentFile of one instance."""
    lines = ["# Written by crate-operator; changes are overwritten.\n"]
    for name in sorted(env):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise StepError(f"invalid environment variable name {name!r}")
        lines.append(f"{name}={escape_env_file_value(env[name])}\n")
    return "".join(lines)


def escape_unit_word(word: str) -> str:
    """Quote one word of an ExecStart= line.

    Inside double quotes systemd still decodes C escapes, expands ``%``
    specifiers and ``$`` variables, so those become ``\\\\``, ``\\"``,
    ``%%`` and ``$$``; control characters become ``\\xNN``.
    """
    out = []
    for char in word:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "%":
            out.append("%%")
        elif char == "$":
            out.append("$$")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# Hardening a typical binary web app survives: it may write only to its own
# StateDirectory and private /tmp, and it cannot gain privileges.  Checked
# with `systemd-analyze security --offline=yes` (systemd 252): exposure 5.0
# before the capability, system call and /proc lines, 1.3 with them.  A
# Python app and a static busybox httpd run under it (tests/test_hostile.py).
# Not set, because typical apps break: MemoryDenyWriteExecute= (JIT runtimes
# such as V8, HotSpot, .NET and PyPy), PrivateNetwork= and IPAddressDeny=
# (apps reach their databases and APIs), PrivateUsers= (see the README).
# A filtered system call fails with EPERM instead of killing the process.
APP_UNIT_HARDENING = """\
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
ProtectProc=invisible
ProcSubset=pid
RemoveIPC=yes
PrivateMounts=yes
KeyringMode=private
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native
UMask=0077
"""


def render_limits(limits: dict | None) -> str:
    """Render MemoryMax= and CPUQuota= lines for a deploy's "limits".

    CPUQuota= is a percentage of one CPU, so 200 allows two full CPUs.
    """
    lines = []
    limits = limits or {}
    if limits.get("memory_mb"):
        lines.append(f"MemoryMax={int(limits['memory_mb'])}M\n")
    if limits.get("cpu_percent"):
        lines.append(f"CPUQuota={int(limits['cpu_percent'])}%\n")
    return "".join(lines)


def render_unit(spec: dict) -> str:
    """Render the unit of one binary instance.

    ``spec`` holds app_id, instance_id, version, deployment_id, exec_argv,
    workdir, env_file, app_user, stop_timeout_s and restart_sec_s, and
    optionally limits ({"memory_mb": int, "cpu_percent": int}).
    """
    argv = " ".join(escape_unit_word(word) for word in spec["exec_argv"])
    if spec["app_user"] == "dynamic":
        user = "DynamicUser=yes"
    else:
        user = f"User={spec['app_user']}\nGroup={spec['app_user']}"
    description = (f"crate-operator app {spec['app_id']} instance "
                   f"{spec['instance_id']} version {spec['version']}")
    return (
        "# Written by crate-operator; changes are overwritten.\n"
        "[Unit]\n"
        f"Description={description.replace('%', '%%')}\n"
        "After=network.target\n"
        "StartLimitIntervalSec=60\n"
        "StartLimitBurst=5\n"
        "\n[Service]\n"
        "Type=exec\n"
        f"ExecStart={argv}\n"
        f"WorkingDirectory={unit_safe_path(spec['workdir'])}\n"
        f"EnvironmentFile={unit_safe_path(spec['env_file'])}\n"
        f"{user}\n"
        "Restart=on-failure\n"
        f"RestartSec={spec['restart_sec_s']:g}s\n"
        f"TimeoutStopSec={spec['stop_timeout_s']:g}s\n"
        "KillMode=mixed\n"
        f"{render_limits(spec.get('limits'))}"
        f"{APP_UNIT_HARDENING}"
        "\n[Install]\n"
        f"WantedBy={BOOT_TARGET}\n"
    )


class Systemd:
    """systemctl through an argument list (never a shell), plus unit files.

    Callers use write_unit / remove_unit, daemon_reload (coalesced across
    threads), start, stop, enable, disable, is_enabled and show.
    """

    def __init__(self, command: list, unit_dir: str, timeout_s: float = 120.0):
        self.command = list(command)
        self.unit_dir = unit_dir
        self.timeout_s = timeout_s
        self._reload_cond = threading.Condition()
        self._reload_requested = 0
        self._reload_done = 0
        self._reload_running = False

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run systemctl with ``args``; raise SystemdError on failure."""
        started = time.monotonic()
        try:
            result = subprocess.run(
                self.command + list(args), capture_output=True, text=True,
                timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SystemdError(f"systemctl {' '.join(args)} failed: {exc}")
        finally:
            elapsed = time.monotonic() - started
            count_wait("systemctl", elapsed)
            METRICS.inc("crate_systemctl_seconds_total", None, elapsed)
            METRICS.inc("crate_systemctl_calls_total")
        if check and result.returncode != 0:
            message = (result.stderr or result.stdout).strip()
            raise SystemdError(
                f"systemctl {' '.join(args)} exited {result.returncode}: "
                f"{message[:500]}")
        return result

    def ping(self) -> bool:
        """Return whether the service manager answers."""
        try:
            self.run("show", "--property=Version", "--value")
        except SystemdError:
            return False
        return True

    def unit_path(self, name: str) -> str:
        """Return the file path of a unit this program owns."""
        if not name.startswith(UNIT_PREFIX) or "/" in name:
            raise OperatorError(f"refusing to touch unit {name!r}")
        return os.path.join(self.unit_dir, name)

    def write_unit(self, name: str, text: str) -> None:
        """Write a unit file atomically; daemon_reload must follow."""
        atomic_write(self.unit_path(name), text.encode(), 0o644)

    def read_unit(self, name: str) -> str | None:
        """Return the text of a unit file, or None."""
        try:
            with open(self.unit_path(name), encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def remove_unit(self, name: str) -> bool:
        """Delete a unit file; return whether it existed."""
        try:
            os.unlink(self.unit_path(name))
        except FileNotFoundError:
            return False
        fsync_dir(self.unit_dir)
        return True

    # --- starting at boot
    #
    # enable and disable make and remove the one symlink that `systemctl
    # enable` makes for an app unit: <unit_dir>/multi-user.target.wants/
    # <unit>, relative, so that it resolves in any mount namespace.  systemd
    # reads .wants directories at boot and at each reload; our units have
    # no Alias= or Also= that enable would also handle.  Doing it in
    # systemctl cost deploy time: with an app unit in the test sandbox,
    # `enable --no-reload --now` took 45.2 ms against 44.1 ms for a plain
    # start, and `disable --no-reload --now` 12.1 ms against 10.1 ms for a
    # plain stop (medians of 20).

    def wants_path(self, name: str) -> str:
        """Return the path of the symlink that starts unit ``name`` at boot."""
        unit = os.path.basename(self.unit_path(name))
        return os.path.join(self.unit_dir, f"{BOOT_TARGET}.wants", unit)

    def is_enabled(self, name: str) -> bool:
        """Return whether unit ``name`` starts at boot."""
        return os.path.islink(self.wants_path(name))

    def enable(self, name: str) -> None:
        """Start the unit at boot; an enabled unit is left as it is."""
        link = self.wants_path(name)
        if os.path.islink(link):
            return
        directory = os.path.dirname(link)
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o755, exist_ok=True)
                fsync_dir(self.unit_dir)
            temporary = os.path.join(directory, f".tmp-{secrets.token_hex(6)}")
            os.symlink(f"../{os.path.basename(link)}", temporary)
            try:
                os.replace(temporary, link)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            fsync_dir(directory)
        except OSError as exc:
            raise SystemdError(
                f"cannot enable {name}: writing {link} failed: {exc.strerror}; "
                f"check the permissions of {self.unit_dir}") from exc

    def disable(self, name: str) -> None:
        """Do not start the unit at boot; a disabled unit is no error."""
        link = self.wants_path(name)
        try:
            os.unlink(link)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SystemdError(
                f"cannot disable {name}: removing {link} failed: "
                f"{exc.strerror}; check the permissions of {self.unit_dir}"
            ) from exc
        fsync_dir(os.path.dirname(link))

    # --- reloads and starts

    def daemon_reload(self) -> None:
        """Reload unit files, sharing one reload among concurrent callers.

        A caller returns only after a reload that started after its own
        request finished, so every unit written before the call is loaded.
        """
        with self._reload_cond:
            self._reload_requested += 1
            ticket = self._reload_requested
            # Waiting for another caller's reload is a wait for systemctl
            # too; run() counts only this thread's own call.
            waited_from = time.monotonic()
            while self._reload_running:
                self._reload_cond.wait()
            count_wait("systemctl", time.monotonic() - waited_from)
            if self._reload_done >= ticket:
                return
            self._reload_running = True
            covers = self._reload_requested
        ok = False
        try:
            self.run("daemon-reload")
            ok = True
        finally:
            with self._reload_cond:
                self._reload_running = False
                if ok:
                    self._reload_done = max(self._reload_done, covers)
                self._reload_cond.notify_all()

    def start(self, name: str) -> None:
        """Start a unit (see _start_or_retry)."""
        self._start_or_retry("start", name)

    def _start_or_retry(self, verb: str, name: str) -> None:
        """Run ``systemctl <verb> <name>``, and when it fails, clear the
        failed state with reset-failed and try once more.

        A unit rejects a start once it started StartLimitBurst times in
        StartLimitIntervalSec: after a crash loop (Restart= restarts
        count), or after restarts in a row with no daemon-reload between
        (seen with systemd 252, where stop-and-start pairs did not reach
        the limit).  reset-failed clears the count.  It used to run before
        every start, which cost one more systemctl call per start.
        """
        try:
            self.run(verb, name)
        except SystemdError as exc:
            log("systemd.start_retried", logging.WARNING, unit=name,
                verb=verb, error=str(exc))
            self.run("reset-failed", name, check=False)
            self.run(verb, name)

    def stop(self, name: str) -> None:
        """Stop a unit; stopping an absent or stopped unit succeeds."""
        self.run("stop", name, check=False)

    def enable_and_start(self, name: str) -> None:
        """Enable the unit, then start it (see _start_or_retry)."""
        self.enable(name)
        self.start(name)

    def restart(self, name: str) -> None:
        """Restart the unit (see _start_or_retry).

        One restart stops the running process and starts one from the unit
        file that the last daemon-reload loaded, as an in-place update
        needs; a unit that is not running is started.
        """
        self._start_or_retry("restart", name)

    def disable_and_stop(self, name: str) -> None:
        """Disable and stop a unit; absent units are fine.

        The unit is stopped also when the disable fails, whose error is
        raised after the stop.
        """
        try:
            self.disable(name)
        finally:
            self.stop(name)

    def show(self, name: str, *props: str) -> dict:
        """Return the named properties of a unit as a dict."""
        result = self.run("show", name, "--property=" + ",".join(props))
        values = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key] = value
        return values

    def show_many(self, names: list, *props: str) -> dict:
        """Return {unit name: its named properties} from one systemctl
        call per SHOW_MANY_UNITS units.

        systemctl prints one block of lines per unit, blocks separated by
        an empty line; the Id property names each block's unit.
        """
        found = {}
        fields = "--property=" + ",".join(("Id",) + props)
        for first in range(0, len(names), SHOW_MANY_UNITS):
            chunk = names[first:first + SHOW_MANY_UNITS]
            result = self.run("show", fields, "--", *chunk)
            for block in result.stdout.split("\n\n"):
                values = {}
                for line in block.splitlines():
                    key, sep, value = line.partition("=")
                    if sep:
                        values[key] = value
                if values.get("Id") in chunk:
                    found[values.pop("Id")] = values
        return found


# === Host adapter: Docker Engine API ===

# serveraddress that the docker CLI sends with Docker Hub credentials.
DOCKER_HUB_AUTH_SERVER = "https://index.docker.io/v1/"
# Maximum length of one line of a pull stream; progress lines are far
# shorter.
DOCKER_STREAM_LINE_MAX = 1 << 20


def image_registry(image: str) -> str | None:
    """Return the registry host[:port] that an image names, or None for Hub.

    Docker's rule (splitDockerDomain in distribution/reference): the first
    path component is a registry only when more components follow and it
    contains "." or ":" or is "localhost". So the ":5000" of
    ``registry.example.test:5000/team/app`` is a port, never a tag.
    """
    first, slash, _rest = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return None


def image_reference(image: str, tag: str) -> str:
    """Return the reference of one tag (app:v1) or digest (app@sha256:...)."""
    if tag.startswith("sha256:"):
        return f"{image}@{tag}"
    return f"{image}:{tag}"


def registry_auth_header(credentials: dict, image: str) -> str:
    """Return the X-Registry-Auth value for registry credentials.

    dockerd decodes the header as URL-safe base64 with padding. A standard
    base64 value that contains "+" or "/" fails to decode, and dockerd 20.10
    then pulls without credentials as if none were sent.
    serveraddress defaults to the image's registry, or Docker Hub.
    """
    server = (credentials.get("serveraddress") or image_registry(image)
              or DOCKER_HUB_AUTH_SERVER)
    document = {"username": credentials["username"],
                "password": credentials["password"],
                "serveraddress": server}
    raw = json.dumps(document).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii")


def hide_secrets(text: str, hidden: list) -> str:
    """Return text with every non-empty string of hidden replaced by ***."""
    for secret in hidden:
        if secret:
            text = text.replace(secret, "***")
    return text


def _docker_body(raw: bytes):
    """Parse an Engine API answer: JSON, else text, else None when empty."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _docker_message(value) -> str:
    """Return the error text of an Engine API answer ({"message": ...})."""
    if isinstance(value, dict) and value.get("message"):
        return str(value["message"])
    if value is None:
        return "(empty answer)"
    return str(value)[:500]


def _stream_error(message) -> str | None:
    """Return the error of one pull stream object, or None."""
    if not isinstance(message, dict):
        return None
    detail = message.get("errorDetail")
    if message.get("error"):
        return str(message["error"])
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    return None


def _api_version_tuple(text) -> tuple:
    match = re.fullmatch(r"([0-9]{1,4})\.([0-9]{1,4})", str(text or ""))
    if not match:
        raise DockerError(f"dockerd reported an unreadable API version "
                          f"{text!r} in GET /version")
    return int(match.group(1)), int(match.group(2))


class DockerClient:
    """Engine API calls over dockerd's unix socket, one connection each.

    Callers use version, pull, inspect_image, create_container,
    start_container, stop_container, restart_container, remove_container,
    inspect_container and list_containers. Every answer is read to its end.
    The API version comes from GET /version once: the server's version,
    but at most DOCKER_API_MAX.
    """

    def __init__(self, socket_path: str, pull_timeout_s: float):
        self.socket_path = socket_path
        self.pull_timeout_s = pull_timeout_s
        self._version: str | None = None
        self._version_lock = threading.Lock()

    # --- transport

    def _send(self, method: str, path: str, query: dict | None, body,
              headers: dict | None, timeout_s: float) -> tuple:
        """Send one request and return (connection, response)."""
        target = path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        all_headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        conn = UnixHTTPConnection(self.socket_path, timeout=timeout_s)
        try:
            conn.request(method, target, body=data, headers=all_headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DockerError(f"dockerd at {self.socket_path} did not respond "
                              f"to {method} {path}: {exc}") from None

    def _read_answer(self, conn, resp, method: str, path: str):
        try:
            return _docker_body(resp.read())
        except (OSError, http.client.HTTPException) as exc:
            raise DockerError(f"reading dockerd's response to {method} "
                              f"{path} failed: {exc}") from None
        finally:
            conn.close()

    def version(self) -> str:
        """Return the negotiated API version, such as "1.41"."""
        with self._version_lock:
            if self._version is None:
                self._version = self._negotiate()
            return self._version

    def _negotiate(self) -> str:
        conn, resp = self._send("GET", "/version", None, None, None,
                                DOCKER_CALL_TIMEOUT_S)
        value = self._read_answer(conn, resp, "GET", "/version")
        if resp.status != 200 or not isinstance(value, dict):
            raise DockerError(f"GET /version failed with HTTP {resp.status}: "
                              f"{_docker_message(value)}", resp.status)
        chosen = min(_api_version_tuple(value.get("ApiVersion")),
                     DOCKER_API_MAX)
        if chosen < DOCKER_API_MIN:
            raise DockerError(
                f"dockerd speaks Engine API {value.get('ApiVersion')}, older "
                f"than the {DOCKER_API_MIN[0]}.{DOCKER_API_MIN[1]} this "
                f"program needs; upgrade docker")
        return f"{chosen[0]}.{chosen[1]}"

    def call(self, method: str, path: str, query: dict | None = None,
             body=None, headers: dict | None = None,
             timeout_s: float = DOCKER_CALL_TIMEOUT_S) -> tuple:
        """Send one call of the negotiated version; return (status, value).

        value is the parsed JSON answer, its text, or None when empty.
        Raises DockerError when dockerd does not answer.
        """
        versioned = f"/v{self.version()}{path}"
        conn, resp = self._send(method, versioned, query, body, headers,
                                timeout_s)
        return resp.status, self._read_answer(conn, resp, method, path)

    def _expect(self, statuses: tuple, what: str, method: str, path: str,
                **kwargs):
        status, value = self.call(method, path, **kwargs)
        if status not in statuses:
            raise DockerError(f"{what} failed with HTTP {status}: "
                              f"{_docker_message(value)}", status)
        return status, value

    # --- images

    def pull(self, image: str, tag: str, auth_header: str | None,
             hidden: list) -> str:
        """Pull exactly one tag or digest of image; return the last status.

        auth_header is the X-Registry-Auth value, or None to send no
        credentials. Fails on an HTTP error, on an error object inside the
        200 stream, on a stream that breaks off, and after
        pull_timeout_s. Error texts never contain the strings in hidden.
        """
        if not tag:
            # dockerd pulls every tag of the repository for an empty tag.
            raise DockerError(f"refusing to pull {image} without a tag")
        reference = image_reference(image, tag)
        headers = {"X-Registry-Auth": auth_header} if auth_header else None
        deadline = time.monotonic() + self.pull_timeout_s
        path = f"/v{self.version()}/images/create"
        conn, resp = self._send("POST", path, {"fromImage": image, "tag": tag},
                                None, headers, self.pull_timeout_s)
        try:
            if resp.status != 200:
                value = self._read_answer(conn, resp, "POST", path)
                raise DockerError(hide_secrets(
                    f"pull of {reference} failed with HTTP {resp.status}: "
                    f"{_docker_message(value)}", hidden), resp.status)
            return self._read_pull_stream(resp, reference, deadline, hidden)
        finally:
            conn.close()

    def _read_pull_stream(self, resp, reference: str, deadline: float,
                          hidden: list) -> str:
        """Read a pull's JSON lines to the end and raise on any error."""
        last_status = ""
        for text in self._stream_lines(resp, reference, deadline):
            try:
                message = json.loads(text)
            except ValueError:
                fragment = hide_secrets(
                    text[:200].decode("utf-8", "replace"), hidden)
                raise DockerError(
                    f"pull of {reference} stopped before it finished: "
                    f"dockerd sent an incomplete line {fragment!r}") from None
            error = _stream_error(message)
            if error:
                raise DockerError(hide_secrets(
                    f"pull of {reference} failed: {error}", hidden))
            if isinstance(message, dict) and message.get("status"):
                last_status = str(message["status"])
        return last_status

    def _stream_lines(self, resp, reference: str, deadline: float):
        """Yield the non-empty lines of a streamed answer.

        Raises DockerError when the stream breaks off. HTTPResponse.readline
        cannot be used: on a chunked body that ends without its last chunk
        it returns b"" as at a clean end (CPython 3.11).
        """
        pending = b""
        while True:
            if time.monotonic() > deadline:
                raise DockerError(f"pull of {reference} timed out after "
                                  f"{self.pull_timeout_s:g}s "
                                  f"(docker_pull_timeout_s)")
            try:
                data = resp.read1(1 << 16)
            except (OSError, http.client.HTTPException) as exc:
                raise DockerError(
                    f"pull of {reference} stopped before it finished: the "
                    f"stream from dockerd broke off "
                    f"({type(exc).__name__})") from None
            if not data:
                break
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            if len(pending) > DOCKER_STREAM_LINE_MAX:
                raise DockerError(f"pull of {reference}: dockerd sent a line "
                                  f"longer than {DOCKER_STREAM_LINE_MAX} bytes")
            yield from (line.strip() for line in lines if line.strip())
        if resp.length:
            raise DockerError(f"pull of {reference} stopped before it "
                              f"finished: {resp.length} bytes were missing")
        if pending.strip():
            yield pending.strip()

    def inspect_image(self, reference: str) -> dict | None:
        """Return the image's inspect document, or None when it is absent."""
        path = "/images/" + urllib.parse.quote(reference, safe="/:@") + "/json"
        status, value = self.call("GET", path)
        if status == 404:
            return None
        if status != 200 or not isinstance(value, dict):
            raise DockerError(f"inspecting image {reference} failed with HTTP "
                              f"{status}: {_docker_message(value)}", status)
        return value

    # --- containers

    @staticmethod
    def _container_path(name: str, action: str = "") -> str:
        path = "/containers/" + urllib.parse.quote(name, safe="")
        return path + ("/" + action if action else "")

    def container_logs(self, name: str, lines: int, max_bytes: int) -> tuple:
        """Return (raw log bytes, truncated) of a container's last lines.

        Without a TTY dockerd multiplexes stdout and stderr into frames of
        an 8-byte header (stream, 3 zero bytes, big-endian length) and the
        payload; the payloads are joined in order.  At most ``max_bytes``
        are kept, the newest ones.
        """
        path = f"/v{self.version()}" + self._container_path(name, "logs")
        conn, resp = self._send("GET", path, {
            "stdout": 1, "stderr": 1, "timestamps": 1, "tail": lines},
            None, None, DOCKER_CALL_TIMEOUT_S)
        try:
            if resp.status != 200:
                message = _docker_body(resp.read())
                raise DockerError(f"reading the log of container {name} "
                                  f"failed: HTTP {resp.status} {message}",
                                  resp.status)
            chunks, size, truncated = collections.deque(), 0, False
            while True:
                header = resp.read(8)
                if len(header) < 8:
                    break
                length = int.from_bytes(header[4:8], "big")
                payload = resp.read(length)
                chunks.append(payload)
                size += len(payload)
                while size > max_bytes and chunks:
                    size -= len(chunks.popleft())
                    truncated = True
            return b"".join(chunks), truncated
        except (OSError, http.client.HTTPException) as exc:
            raise DockerError(f"reading the log of container {name} failed: "
                              f"{exc}") from None
        finally:
            conn.close()

    def create_container(self, name: str, config: dict) -> str:
        """Create (not start) a container and return its id."""
        _, value = self._expect((201,), f"creating container {name}", "POST",
                                "/containers/create", query={"name": name},
                                body=config)
        return value["Id"]

    def start_container(self, name: str) -> None:
        """Start a container; one that already runs is fine (304)."""
        self._expect((204, 304), f"starting container {name}", "POST",
                     self._container_path(name, "start"))

    def stop_container(self, name: str, timeout_s: float) -> None:
        """Stop a container: its stop signal, then SIGKILL after timeout_s.

        A stopped (304) or absent (404) container is fine. The HTTP call
        waits DOCKER_STOP_MARGIN_S longer than the stop itself may take.
        """
        seconds = int(math.ceil(timeout_s))
        self._expect((204, 304, 404), f"stopping container {name}", "POST",
                     self._container_path(name, "stop"),
                     query={"t": seconds},
                     timeout_s=seconds + DOCKER_STOP_MARGIN_S)

    def restart_container(self, name: str, timeout_s: float) -> None:
        """Stop (as stop_container does) and start a container again."""
        seconds = int(math.ceil(timeout_s))
        self._expect((204,), f"restarting container {name}", "POST",
                     self._container_path(name, "restart"),
                     query={"t": seconds},
                     timeout_s=seconds + DOCKER_STOP_MARGIN_S)

    def remove_container(self, name: str) -> None:
        """Remove a container (killed first) and its anonymous volumes.

        Named volumes stay. An absent container is fine.
        """
        self._expect((204, 404), f"removing container {name}", "DELETE",
                     self._container_path(name), query={"force": 1, "v": 1})

    def inspect_container(self, name: str) -> dict | None:
        """Return the inspect document of a container, or None when absent."""
        status, value = self.call("GET", self._container_path(name, "json"))
        if status == 404:
            return None
        if status != 200 or not isinstance(value, dict):
            raise DockerError(f"inspecting container {name} failed with HTTP "
                              f"{status}: {_docker_message(value)}", status)
        return value

    def list_volumes(self, labels: dict) -> list:
        """Return the names of the volumes carrying all labels."""
        filters = {"label": [f"{key}={value}"
                             for key, value in sorted(labels.items())]}
        _, value = self._expect((200,), "listing volumes", "GET", "/volumes",
                                query={"filters": json.dumps(filters)})
        volumes = (value or {}).get("Volumes") or []
        return sorted(v["Name"] for v in volumes if v.get("Name"))

    def remove_volume(self, name: str) -> None:
        """Remove a named volume; an absent one is fine."""
        self._expect((204, 404), f"removing volume {name}", "DELETE",
                     f"/volumes/{urllib.parse.quote(name, safe='')}")

    def list_containers(self, labels: dict) -> list:
        """Return every container (running or not) carrying all labels."""
        filters = {"label": [f"{key}={value}"
                             for key, value in sorted(labels.items())]}
        _, value = self._expect((200,), "listing containers", "GET",
                                "/containers/json",
                                query={"all": 1,
                                       "filters": json.dumps(filters)})
        return value if isinstance(value, list) else []


# === Caddy admin API ===

# Every route whose "@id" starts with this prefix belongs to crate-operator.
# All other routes are foreign, and this section never modifies or deletes them.
CADDY_ROUTE_PREFIX = "crate-"
CADDY_APP_ROUTE_PREFIX = "crate-app-"
CADDY_CATCH_ALL_ID = "crate-catch-all"

# Response header naming the upstream that served a request, so a traffic split
# can be measured from outside.
CADDY_UPSTREAM_HEADER = "X-Crate-Upstream"

# reverse_proxy retries a dial error (for example a port that just closed) on
# another upstream for up to CADDY_TRY_DURATION, waiting CADDY_TRY_INTERVAL
# between tries. Caddy 2.6.2 retries other errors only for GET requests.
CADDY_TRY_DURATION = "5s"
CADDY_TRY_INTERVAL = "100ms"

# Caddy 2.6.2 restarts its admin server after every config change and resets
# connections that the old server accepted but had not read yet. Such requests
# were never applied in tests, so they are resent, up to this many attempts.
CADDY_RESET_ATTEMPTS = 6
CADDY_RESET_DELAY = 0.02  # seconds before the first resend, doubled per resend

# Maximum read-check-write cycles of one change while other writers keep
# changing the config between our read and our write (Caddy returns 412).
CADDY_WRITE_ATTEMPTS = 8

# Maximum characters of Caddy's error text quoted in an error message.
CADDY_MAX_ERROR_TEXT = 500

_APP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_SERVER_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DOMAIN_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Normalised domains that a byte search of Caddy's JSON output can find:
# Caddy 2.6.2 escapes none of these characters, and bytes.lower() changes
# ASCII letters only.
_PLAIN_DOMAIN_RE = re.compile(r"[a-z0-9.-]+")
_DIAL_RE = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})"
)

# Returned by a step of a guarded write when the config must be read again.
_READ_AGAIN = object()


class CaddyError(OperatorError):
    """Raised when a Caddy admin API call fails.

    status is 503 when the admin API is unreachable or busy, 502 when Caddy
    returns an unexpected response, 404 when the route to change does not exist
    and 409 when a domain is taken.
    """

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status
        # A 404 or 409 reports the state of the routes, not a failed call.
        if status >= 500:
            METRICS.inc("crate_adapter_errors_total", {"adapter": "caddy"})


class DomainTakenError(CaddyError):
    """Raised when another Caddy route already matches the requested domain.

    owner is the other route's "@id", or "foreign route #<index>" for a route
    without one. server is the name of the Caddy server that contains it.
    """

    def __init__(
        self, domain: str, owner: str, server: str, requested_by: str
    ) -> None:
        message = (
            f"domain {domain} is already taken: {owner} in Caddy server "
            f"{server!r} matches it, so route {requested_by} cannot use it"
        )
        super().__init__(message, 409)
        self.domain = domain
        self.owner = owner
        self.server = server


# --- Route documents (pure functions) ---


def _caddy_domain(domain: str) -> str:
    """Return ``domain`` normalised, or raise ValueError when it is invalid."""
    problem = domain_error(domain)
    if problem:
        raise ValueError(f"invalid domain {domain!r}: {problem}")
    return normalise_domain(domain)


def caddy_route_id(app_id: int | str) -> str:
    """Return the "@id" of the route of app app_id. Raises ValueError on a bad id.

    app_id is an int >= 0 or a string of letters, digits, '_' and '-', which
    keeps the id safe inside /id/<id> admin paths.
    """
    if isinstance(app_id, int) and not isinstance(app_id, bool) and app_id >= 0:
        return f"{CADDY_APP_ROUTE_PREFIX}{app_id}"
    if not isinstance(app_id, str) or not _APP_ID_RE.fullmatch(app_id):
        raise ValueError(
            f"invalid app id {app_id!r}: expected an int >= 0 or 1 to 128 "
            "letters, digits, '_' or '-'"
        )
    return CADDY_APP_ROUTE_PREFIX + app_id


def _validate_upstreams(upstreams: list) -> list[tuple[str, int]]:
    """Return upstreams as (dial, weight) tuples. Raises ValueError when invalid."""
    pairs = []
    for item in upstreams:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"invalid upstream {item!r}: expected (dial, weight)")
        dial, weight = item
        match = _DIAL_RE.fullmatch(dial) if isinstance(dial, str) else None
        if match is None or not 1 <= int(match.group("port")) <= 65535:
            raise ValueError(f"invalid upstream dial {dial!r}: expected HOST:PORT")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(
                f"invalid weight {weight!r} for {dial}: expected an int >= 0"
            )
        pairs.append((dial, weight))
    dials = [dial for dial, _ in pairs]
    if len(set(dials)) != len(dials):
        raise ValueError(f"invalid upstreams {dials}: each dial may appear only once")
    total = sum(weight for _, weight in pairs)
    if total != 100:
        raise ValueError(
            f"invalid upstream weights {pairs}: they sum to {total}, not 100"
        )
    return pairs


def _interleave(counts: list[tuple[str, int]]) -> list[str]:
    """Spread counts[i][1] copies of each dial evenly over one round-robin cycle.

    Copy k of a dial with n copies sits at position k/n of the cycle, so a
    small share (a canary) does not get its requests in one burst. Ties go to
    the earlier dial, so the dials first appear in input order, which lets
    upstreams_from_route return them in that order.
    """
    slots = []
    for index, (dial, count) in enumerate(counts):
        for position in range(count):
            slots.append((fractions.Fraction(position, count), index, dial))
    return [dial for _, _, dial in sorted(slots)]


def weights_to_entries(upstreams: list) -> list[str]:
    """Expand (dial, weight) pairs into the dial list for round_robin selection.

    Caddy 2.6.2 has no weighted_round_robin selection policy, so each dial is
    repeated weight / gcd(weights) times. Weights must be ints that sum to 100.
    A dial with weight 0 gets no entry, so no weight is ever sent to Caddy.
    Raises ValueError on invalid upstreams.
    """
    active = [
        (dial, weight) for dial, weight in _validate_upstreams(upstreams) if weight
    ]
    weights = [weight for _, weight in active]
    if len(active) > 1 and max(weights) - min(weights) <= 1:
        # An equal split that integer percentages cannot express exactly
        # (three upstreams are 34/33/33) gets one entry per upstream.
        return [dial for dial, _ in active]
    divisor = 0
    for _, weight in active:
        divisor = math.gcd(divisor, weight)
    return _interleave([(dial, weight // divisor) for dial, weight in active])


def build_app_route(app_id: int | str, domain: str, upstreams: list) -> dict:
    """Build the Caddy route that sends domain to the weighted upstreams of app_id.

    The domain is normalised (lower case, no trailing dot). Raises ValueError on
    an invalid app id, domain or upstream list.
    """
    proxy = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": dial} for dial in weights_to_entries(upstreams)],
        "load_balancing": {
            "selection_policy": {"policy": "round_robin"},
            "try_duration": CADDY_TRY_DURATION,
            "try_interval": CADDY_TRY_INTERVAL,
        },
        "headers": {
            "response": {
                "set": {
                    CADDY_UPSTREAM_HEADER: ["{http.reverse_proxy.upstream.hostport}"]
                }
            }
        },
    }
    return {
        "@id": caddy_route_id(app_id),
        "match": [{"host": [_caddy_domain(domain)]}],
        "handle": [proxy],
        "terminal": True,
    }


def catch_all_route() -> dict:
    """Build the last route of the server, which returns 404 for unknown hosts.

    Without it Caddy 2.6.2 returns 200 with an empty body when no route matches.
    """
    return {
        "@id": CADDY_CATCH_ALL_ID,
        "handle": [
            {
                "handler": "static_response",
                "status_code": 404,
                "headers": {"Content-Type": ["application/json"]},
                "body": json.dumps({"error": "no route for this host"}),
            }
        ],
        "terminal": True,
    }


def upstreams_from_route(route: dict) -> list[tuple[str, int]]:
    """Return the (dial, weight) pairs that route sends traffic to.

    This inverts build_app_route, so the result lists no zero weights. Weights
    are percentages of the reverse_proxy entries. For a route built elsewhere
    whose entry counts do not divide 100, they are rounded by largest remainder.
    A split of weights that differ by at most 1 (34/33/33) is routed as an
    equal split, the same route whichever upstream had the larger share, so
    the larger shares come back on the first upstreams.
    """
    counts: dict[str, int] = {}
    for handler in route.get("handle") or []:
        if isinstance(handler, dict) and handler.get("handler") == "reverse_proxy":
            for upstream in handler.get("upstreams") or []:
                if isinstance(upstream, dict):
                    dial = str(upstream.get("dial", ""))
                    counts[dial] = counts.get(dial, 0) + 1
            break
    total = sum(counts.values())
    if not total:
        return []
    weights = {dial: count * 100 // total for dial, count in counts.items()}
    missing = 100 - sum(weights.values())
    by_remainder = sorted(counts, key=lambda dial: -(counts[dial] * 100 % total))
    for dial in by_remainder[:missing]:
        weights[dial] += 1
    return [(dial, weights[dial]) for dial in counts]


def caddy_json(value) -> bytes | None:
    """Return the bytes that Caddy 2.6.2 returns for a GET of ``value``, or
    None when they cannot be told here.

    Go's encoder sorts object keys and writes compact JSON with a final
    newline, as json.dumps does with these options.  It escapes <, >, &,
    U+2028 and U+2029, writes some control characters differently and
    formats floats its own way, so values with any of those give None.
    """
    if _has_float(value):
        return None
    text = json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    if any(char in text for char in "\\<>&\u2028\u2029"):
        return None
    return text.encode("utf-8") + b"\n"


def _has_float(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_float(item) for item in value)
    return False


def caddy_config_etag(path: str, body: bytes) -> str:
    """Compute the ETag that Caddy 2.6.2 sends for GET path with this body.

    Caddy 2.6.2 sends the ETag as an HTTP trailer, which http.client
    discards, so it is rebuilt here: 32-bit FNV-1a over the exact response
    bytes, in the quoted "<path> <8 hex digits>" form that If-Match expects.
    """
    value = 0x811C9DC5
    for byte in body:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f'"{path} {value:08x}"'


# --- Reading a config document ---


def _route_id(route: object) -> str | None:
    """Return the "@id" of route as a string, or None when it has none."""
    if isinstance(route, dict) and route.get("@id") is not None:
        return str(route["@id"])
    return None


def _find_servers(config: object) -> dict:
    """Return the apps.http.servers map of config, or {} when it is missing."""
    node = config
    for key in ("apps", "http", "servers"):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _route_hosts(route: object) -> set[str]:
    """Return the normalised hosts that route matches, subroutes included."""
    hosts: set[str] = set()
    if not isinstance(route, dict):
        return hosts
    for matcher_set in route.get("match") or []:
        if isinstance(matcher_set, dict):
            for host in matcher_set.get("host") or []:
                host = str(host)
                # Only ASCII is lowered, for the same reason as in _caddy_domain.
                # NOTE: Caddy folds Unicode case when it matches hosts, so a
                # foreign non-ASCII host can match one of our domains unseen.
                hosts.add((host.lower() if host.isascii() else host).rstrip("."))
    for handler in route.get("handle") or []:
        if isinstance(handler, dict) and handler.get("handler") == "subroute":
            for inner in handler.get("routes") or []:
                hosts |= _route_hosts(inner)
    return hosts


def _find_domain_owner(
    config: object, domain: str, skip: tuple[str, str] | None = None
) -> tuple[str, str] | None:
    """Return (server, owner) of the first route in config that matches domain.

    skip is a (server, "@id") pair to ignore, normally the route being written.
    NOTE: hosts are compared exactly, so a foreign wildcard host such as
    *.example.com does not count as owning shop.example.com.
    """
    servers = _find_servers(config)
    for server_name in sorted(servers):
        server = servers[server_name]
        routes = server.get("routes") if isinstance(server, dict) else None
        for index, route in enumerate(routes if isinstance(routes, list) else []):
            route_id = _route_id(route)
            if skip == (server_name, route_id):
                continue
            if domain in _route_hosts(route):
                return server_name, route_id or f"foreign route #{index}"
    return None


def _sole_mention_owner(body: bytes, domain: str):
    """Return the owner of domain found by a byte search of a config body.

    domain is normalised plain ASCII. Returns None when no route can match
    it, and the route's "@id" when the only mention is inside one of our app
    routes that matches it. Returns _READ_AGAIN when the body must be
    parsed. Routes with our "@id" prefix are ours, so such an id nested
    inside a foreign route is not expected.
    """
    lowered = body.lower()
    needle = b'"' + domain.encode("ascii")
    first = lowered.find(needle)
    if first < 0:
        return None
    if lowered.find(needle, first + 1) >= 0:
        return _READ_AGAIN
    # Caddy writes compact JSON with sorted keys, so an app route starts
    # with its "@id".
    start = body.rfind(b'{"@id":"' + CADDY_APP_ROUTE_PREFIX.encode(), 0, first)
    if start < 0:
        return _READ_AGAIN
    text = body[start:].decode("utf-8", "replace")
    try:
        route, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return _READ_AGAIN
    if first >= start + len(text[:end].encode("utf-8")):
        return _READ_AGAIN
    if domain not in _route_hosts(route):
        return _READ_AGAIN
    return _route_id(route)


def _parse_admin_address(admin: str) -> tuple[str | None, str, int]:
    """Split admin into (unix socket path, TCP host, TCP port).

    Accepts http://HOST:PORT, unix:/PATH, Caddy's own unix//PATH and /PATH.
    """
    if not isinstance(admin, str):
        raise ValueError(f"invalid Caddy admin address {admin!r}")
    address = admin
    for prefix in ("unix:", "unix/"):
        if address.startswith(prefix):
            address = address[len(prefix) :]
            break
    if address.startswith("/"):
        return address, "", 0
    parts = urllib.parse.urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise ValueError(
            f"invalid Caddy admin address {admin!r}: expected http://HOST:PORT, "
            "unix:/PATH or an absolute socket path"
        )
    return None, parts.hostname, port


class _ConfigSnapshot:
    """Config document read from GET /config/, with the If-Match value for it."""

    def __init__(self, config: object, body: bytes) -> None:
        self.config = config
        self._body = body
        self._if_match: str | None = None

    @property
    def if_match(self) -> str:
        # Hashed on first use, because the pure-Python FNV-1a loop is the
        # slowest part of a large read and reads that do not write skip it.
        if self._if_match is None:
            self._if_match = caddy_config_etag("/config/", self._body)
        return self._if_match

    def server(self, name: str) -> dict | None:
        server = _find_servers(self.config).get(name)
        return server if isinstance(server, dict) else None


# --- Client ---


class CaddyClient:
    """Routes of one Caddy HTTP server, managed through the admin API.

    admin is http://HOST:PORT, unix:/PATH or an absolute socket path. listen
    and automatic_https are used when the server has to be created. timeout is
    in seconds per admin request.

    Reads: ping, routes, domain_owner, get_app_route, app_upstreams.
    Writes: ensure_server, set_app_route, change_domain, delete_app_route.
    Writes hold one lock per admin address, shared by all clients in the
    process. Each write also sends If-Match with the hash of the config it read,
    so a change by another process in between makes Caddy reject the write with
    412, and the write reads again and retries.
    """

    _locks: dict[str, threading.RLock] = {}
    _locks_guard = threading.Lock()

    def __init__(
        self,
        admin: str,
        server: str,
        listen: str | list[str],
        automatic_https: bool,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(server, str) or not _SERVER_NAME_RE.fullmatch(server):
            raise ValueError(
                f"invalid Caddy server name {server!r}: expected 1 to 64 letters, "
                "digits, '_' or '-'"
            )
        self.admin = admin
        self.server = server
        self.listen = [listen] if isinstance(listen, str) else list(listen)
        self.automatic_https = automatic_https
        self.timeout = timeout
        self._socket_path, self._host, self._port = _parse_admin_address(admin)
        self._server_path = "/config/apps/http/servers/" + server
        self._lock = self._lock_for(self._admin_key())
        self._drift_warned: set[str] = set()
        self._ping_failing = False
        # (positions of app routes by "@id", route count) from the last full
        # read, or None. Replaced as a whole, never changed in place, so a
        # reader without the lock sees one consistent pair.
        self._route_index: tuple[dict[str, int], int] | None = None
        # (position, body of GET .../routes/<position>) of app routes by
        # "@id", as this client last wrote or read them; changed under the
        # write lock only.  A write based on it sends If-Match with the
        # body's hash, so Caddy rejects it when the route changed since.
        self._known: dict[str, tuple[int, bytes]] = {}

    def _admin_key(self) -> str:
        if self._socket_path is not None:
            return "unix:" + os.path.abspath(self._socket_path)
        return f"http://{self._host.lower()}:{self._port}"

    @classmethod
    def _lock_for(cls, key: str) -> threading.RLock:
        with cls._locks_guard:
            return cls._locks.setdefault(key, threading.RLock())

    # --- Transport ---

    def _connect(self) -> http.client.HTTPConnection:
        # A new connection per request, because Caddy closes kept-alive admin
        # connections when it restarts its admin server after each change.
        if self._socket_path is not None:
            return UnixHTTPConnection(self._socket_path, self.timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _request_headers(self, body: bytes | None, if_match: str | None) -> dict:
        headers = {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if if_match is not None:
            headers["If-Match"] = if_match
        if self._socket_path is not None:
            # On a unix socket Caddy 2.6.2 rejects every Host but the empty one
            # with 403 "host not allowed".
            headers["Host"] = ""
        return headers

    def _request(
        self,
        method: str,
        path: str,
        action: str,
        document: object = None,
        if_match: str | None = None,
    ) -> tuple[int, bytes]:
        """Send one admin request and return (status, body).

        Raises CaddyError 503 when the admin API cannot be reached and 502 when
        the response is not valid HTTP. NOTE: after a timeout the outcome of a
        write is unknown, so a caller should read the state back before relying
        on it.
        """
        started = time.monotonic()
        try:
            return self._request_with_resends(method, path, action, document,
                                              if_match)
        finally:
            elapsed = time.monotonic() - started
            count_wait("caddy", elapsed)
            METRICS.inc("crate_caddy_admin_seconds_total", None, elapsed)
            METRICS.inc("crate_caddy_admin_calls_total")

    def _request_with_resends(
        self,
        method: str,
        path: str,
        action: str,
        document: object,
        if_match: str | None,
    ) -> tuple[int, bytes]:
        body = None if document is None else json.dumps(document).encode()
        headers = self._request_headers(body, if_match)
        delay = CADDY_RESET_DELAY
        attempt = 1
        while True:
            connection = self._connect()
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (ConnectionResetError, BrokenPipeError) as exc:
                if attempt >= CADDY_RESET_ATTEMPTS:
                    raise self._unreachable_error(action, method, path, exc) from exc
                LOG.debug(
                    "Caddy reset %s %s on attempt %d of %d (%s), sending it again",
                    method,
                    path,
                    attempt,
                    CADDY_RESET_ATTEMPTS,
                    exc,
                )
            except OSError as exc:
                raise self._unreachable_error(action, method, path, exc) from exc
            except http.client.HTTPException as exc:
                raise CaddyError(
                    f"{action} failed: {method} {path} on the Caddy admin API at "
                    f"{self.admin} returned invalid HTTP: {exc!r}",
                    502,
                ) from exc
            finally:
                connection.close()
            time.sleep(delay)
            delay *= 2
            attempt += 1

    def _unreachable_error(
        self, action: str, method: str, path: str, exc: OSError
    ) -> CaddyError:
        return CaddyError(
            f"{action} failed: the Caddy admin API at {self.admin} is unreachable "
            f"({method} {path}: {exc!r}). Check that Caddy is running",
            503,
        )

    def _response_error(
        self,
        action: str,
        method: str,
        path: str,
        status: int,
        body: bytes,
    ) -> CaddyError:
        try:
            detail = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            detail = body.decode("utf-8", "replace").strip()
        if len(detail) > CADDY_MAX_ERROR_TEXT:
            detail = detail[:CADDY_MAX_ERROR_TEXT] + "..."
        return CaddyError(
            f"{action} failed: Caddy returned {status} for {method} {path}: "
            f"{detail!r}",
            502,
        )

    def _get_json(self, path: str, action: str) -> tuple[object, bytes]:
        status, body = self._request("GET", path, action)
        if status != 200:
            raise self._response_error(action, "GET", path, status, body)
        try:
            return json.loads(body), body
        except ValueError as exc:
            raise CaddyError(
                f"{action} failed: GET {path} returned invalid JSON: {body[:200]!r}",
                502,
            ) from exc

    def _snapshot(self, action: str) -> _ConfigSnapshot:
        config, body = self._get_json("/config/", action)
        snapshot = _ConfigSnapshot(config, body)
        self._index_routes(snapshot)
        return snapshot

    def _guarded_write(
        self,
        method: str,
        path: str,
        document: object,
        snapshot: _ConfigSnapshot,
        action: str,
    ) -> bool:
        """Send a write that Caddy applies only if the config is still snapshot.

        Returns False when the config changed since the snapshot (412).
        """
        status, body = self._request(method, path, action, document, snapshot.if_match)
        if status == 412:
            LOG.info(
                "%s: the Caddy config changed since it was read, reading it again",
                action,
            )
            return False
        if status != 200:
            raise self._response_error(action, method, path, status, body)
        return True

    def _run_guarded(self, action: str, step):
        """Run step(snapshot) under the write lock until it returns a result.

        step returns _READ_AGAIN when its write was rejected with 412 or when it
        changed the config and needs a fresh read.
        """
        with self._lock:
            for _ in range(CADDY_WRITE_ATTEMPTS):
                outcome = step(self._snapshot(action))
                if outcome is not _READ_AGAIN:
                    return outcome
        raise CaddyError(
            f"{action} failed: the Caddy config kept changing during "
            f"{CADDY_WRITE_ATTEMPTS} read-write attempts because another writer is "
            "busy. Try again later",
            503,
        )

    # --- Route index ---
    #
    # A change of one route must not read the whole config, which grows with
    # every app. The client keeps the position of each of its routes from the
    # last full read. A fast change reads only that route (GET .../routes/<i>),
    # checks its "@id", checks that the catch-all is still exactly at the last
    # position (so no route was inserted into or removed from the server), and
    # sends If-Match with the hash of that one route. Caddy 2.6.2 compares the
    # If-Match hash against a read of the path named in it, under its config
    # lock, so it rejects the write with 412 when the route changed in between.
    # A failed check drops the index, and the change falls back to a full read,
    # which rebuilds the index. Positions, not GET /id/<id>, are used, because
    # Caddy 2.6.2 resolves an id outside its config lock and sometimes returned
    # a neighbouring route during another client's change.
    #
    # The client also keeps each route as it last wrote it (_known), in the
    # bytes Caddy returns for it (caddy_json), so the next change skips the
    # read of the route and sends If-Match with the hash of those bytes.
    # A replacement checks the route count first, so that a copy of the
    # route inserted by another writer is still found and removed; a
    # domain change reads the whole config for its domain check anyway.
    # Any failed guessed write falls back to the read of the route.

    def _index_routes(self, snapshot: _ConfigSnapshot) -> None:
        """Rebuild the route index from a full read.

        A server without its exact catch-all last gets no index, and an id
        that appears more than once is left out, so both go through a full
        read that repairs them.
        """
        server = snapshot.server(self.server)
        self._index_route_list(server.get("routes") if server else None)

    def _index_route_list(self, routes: object) -> None:
        """Rebuild the route index from the server's current list of routes."""
        if not isinstance(routes, list) or not routes:
            self._route_index = None
            return
        ids = [_route_id(route) for route in routes]
        if routes[-1] != catch_all_route() or ids.count(CADDY_CATCH_ALL_ID) != 1:
            self._route_index = None
            return
        seen: dict[str, int] = {}
        repeated = set()
        for position, route_id in enumerate(ids):
            if route_id is None or not route_id.startswith(CADDY_APP_ROUTE_PREFIX):
                continue
            if route_id in seen:
                repeated.add(route_id)
            seen[route_id] = position
        for route_id in repeated:
            del seen[route_id]
        self._route_index = (seen, len(routes))

    def _drop_index(self, index: tuple[dict[str, int], int]) -> None:
        # Only the index that failed a check is dropped, not a newer one that
        # another thread built meanwhile.
        if self._route_index is index:
            self._route_index = None

    def _route_path(self, position: int) -> str:
        return f"{self._server_path}/routes/{position}"

    def _read_position(self, position: int, action: str) -> tuple[object, bytes]:
        """GET one route by position; returns (route or None, body)."""
        status, body = self._request("GET", self._route_path(position), action)
        if status != 200:
            # Caddy 2.6.2 rejects an index past the end, so the server shrank.
            return None, body
        try:
            return json.loads(body), body
        except ValueError:
            return None, body

    def _catch_all_last(self, index: tuple[dict[str, int], int], action: str) -> bool:
        """Return True when the catch-all is still the indexed last route.

        Reads the indexed last position and the one after it, which Caddy
        2.6.2 rejects with 400 "array index out of bounds" while the server
        has exactly the indexed number of routes.
        """
        count = index[1]
        route, _ = self._read_position(count - 1, action)
        if route == catch_all_route():
            status, body = self._request("GET", self._route_path(count), action)
            if status == 400 and b"out of bounds" in body:
                return True
        LOG.debug(
            "Caddy server %r no longer has exactly %d routes with the catch-all "
            "last, reading all routes",
            self.server,
            count,
        )
        self._drop_index(index)
        return False

    def _count_unchanged(self, index: tuple[dict[str, int], int],
                         action: str) -> bool:
        """Return True unless the server has more routes than indexed.

        Caddy 2.6.2 answers 400 "array index out of bounds" for any position
        at or past the end, so routes removed after the indexed route (the
        catch-all included) pass this probe; ensure_server finds those.  Any
        other answer means routes were added, and the index is dropped.
        """
        status, body = self._request("GET", self._route_path(index[1]), action)
        if status == 400 and b"out of bounds" in body:
            return True
        LOG.debug("Caddy server %r no longer has exactly %d routes, reading "
                  "all routes", self.server, index[1])
        self._drop_index(index)
        return False

    def _read_indexed(
        self, route_id: str, action: str, check: str = "catch_all"
    ) -> tuple[int, dict, str] | None:
        """Read one route at its indexed position and check the index.

        Returns (position, route, If-Match value for that position), or None
        when the route is not indexed or the index is stale (then dropped).
        check "catch_all" also checks that the catch-all is the last route,
        "count" only the route count (one request fewer), "none" nothing
        more (two fewer).
        """
        index = self._route_index
        position = index[0].get(route_id) if index else None
        if position is None:
            return None
        route, body = self._read_position(position, action)
        if _route_id(route) != route_id:
            LOG.debug(
                "Caddy route %s is no longer at position %d, reading all routes",
                route_id,
                position,
            )
            self._drop_index(index)
            return None
        if check == "catch_all" and not self._catch_all_last(index, action):
            return None
        if check == "count" and not self._count_unchanged(index, action):
            return None
        return position, route, caddy_config_etag(self._route_path(position), body)

    def _remember(self, route_id: str, position: int, route: dict) -> None:
        """Note the route that this client wrote or read at position."""
        body = caddy_json(route)
        if body is None:
            self._known.pop(route_id, None)
        else:
            self._known[route_id] = (position, body)

    def _known_route(self, route_id: str) -> tuple[int, dict, str] | None:
        """Return (position, route, If-Match value) of a route as this client
        last wrote or read it, or None; no request is made."""
        known = self._known.get(route_id)
        index = self._route_index
        if known is None or index is None or index[0].get(route_id) != known[0]:
            return None
        position, body = known
        return (position, json.loads(body),
                caddy_config_etag(self._route_path(position), body))

    def _write_known(self, route_id: str, position: int, suffix: str,
                     document: object, if_match: str, action: str) -> bool:
        """PATCH a route based on _known_route; False when that failed.

        Any error counts as a stale guess, not only 412: Caddy 2.6.2 answers
        "array index out of bounds" when the server has shrunk below the
        position.  Caddy applies no part of a failed change, and the caller
        reads the route and tries once more, which reports a real error.
        """
        path = self._route_path(position) + suffix
        status, body = self._request("PATCH", path, action, document, if_match)
        if status == 200:
            return True
        self._known.pop(route_id, None)
        LOG.debug("%s: writing Caddy route %s as last known returned %d, "
                  "reading it", action, route_id, status)
        return False

    def _write_position(
        self,
        method: str,
        position: int,
        suffix: str,
        document: object,
        if_match: str,
        action: str,
    ) -> bool:
        """Write to one route guarded by its own hash; False after a 412."""
        path = self._route_path(position) + suffix
        status, body = self._request(method, path, action, document, if_match)
        if status == 412:
            LOG.info(
                "%s: Caddy route at position %d changed since it was read, "
                "reading all routes",
                action,
                position,
            )
            self._route_index = None
            return False
        if status != 200:
            raise self._response_error(action, method, path, status, body)
        return True

    def _domain_mentioned(self, domain: str, action: str,
                          route_id: str | None = None) -> bool:
        """Return False only when no route in any server can match domain,
        and the config has route_id (when given) exactly once.

        Reads the whole config but does not parse it: a route matching domain
        contains the JSON string "<domain>" in some letter case, with trailing
        dots at most, so a byte search that finds no '"<domain>' proves that
        no route matches it. A hit, which may be a false one, returns True,
        and the caller falls back to parsing. Only domains that match
        _PLAIN_DOMAIN_RE are searched.
        """
        if not _PLAIN_DOMAIN_RE.fullmatch(domain):
            return True
        status, body = self._request("GET", "/config/", action)
        if status != 200:
            raise self._response_error(action, "GET", "/config/", status, body)
        if route_id is not None and \
                body.count(b'"@id":' + json.dumps(route_id).encode()) != 1:
            return True
        return b'"' + domain.encode("ascii") in body.lower()

    # --- Reads ---

    def ping(self) -> bool:
        """Return True when the admin API returns 200 for GET /config/.

        Logs a warning when Caddy stops responding and an info line when it
        responds again, not on every failed ping.
        """
        try:
            status, body = self._request("GET", "/config/", "ping Caddy")
            error = None
            if status != 200:
                error = self._response_error(
                    "ping Caddy", "GET", "/config/", status, body
                )
        except CaddyError as exc:
            error = exc
        if error is not None and not self._ping_failing:
            LOG.warning("%s", error)
        elif error is None and self._ping_failing:
            LOG.info("Caddy admin API at %s responds again", self.admin)
        self._ping_failing = error is not None
        return error is None

    def routes(self) -> list[dict]:
        """Return the routes of the server in match order, or [] when it is missing."""
        action = f"list the routes of Caddy server {self.server!r}"
        server = self._snapshot(action).server(self.server)
        routes = server.get("routes") if server else None
        return routes if isinstance(routes, list) else []

    def domain_owner(self, domain: str) -> str | None:
        """Return the owner of the first route in any server that matches domain.

        The owner is the route's "@id", or "foreign route #<index>" when it has
        none. Hosts are compared in lower case without a trailing dot.
        """
        name = _caddy_domain(domain)
        action = f"look up the owner of domain {name}"
        if _PLAIN_DOMAIN_RE.fullmatch(name):
            # The byte search of _domain_mentioned, on one read, so that the
            # common answers (no route, or only one app route) skip parsing.
            status, body = self._request("GET", "/config/", action)
            if status != 200:
                raise self._response_error(action, "GET", "/config/", status, body)
            owner = _sole_mention_owner(body, name)
            if owner is not _READ_AGAIN:
                return owner
        snapshot = self._snapshot(action)
        found = _find_domain_owner(snapshot.config, name)
        return found[1] if found else None

    def get_app_route(self, app_id: int | str,
                      check: str = "catch_all") -> dict | None:
        """Return the route of app_id in the server, or None when it has none.

        The route is read at its indexed position, or looked up in a read of
        the whole config, and never with GET /id/<id>. Caddy 2.6.2 maps the
        id to a path in one step and reads that path in a second one, so
        during another client's change it sometimes returned a neighbouring
        route. check is passed to _read_indexed: "none" reads one route
        only, and may return the first of two copies that another writer
        made.
        """
        route_id = caddy_route_id(app_id)
        action = f"read Caddy route {route_id}"
        found = self._read_indexed(route_id, action, check)
        if found is not None:
            return found[1]
        snapshot = self._snapshot(action)
        indexes = self._route_indexes(snapshot, route_id)
        if not indexes:
            return None
        # Writes by "@id" reach the last copy when another writer left duplicates.
        return snapshot.server(self.server)["routes"][indexes[-1]]

    def app_upstreams(self, app_id: int | str) -> list[tuple[str, int]]:
        """Return the (dial, weight) pairs of app_id's route, or [] without a route.

        Zero weights are never written, so compare against the desired pairs
        with weight 0 removed.
        """
        route = self.get_app_route(app_id)
        return upstreams_from_route(route) if route else []

    # --- Server and catch-all ---

    def _new_server(self) -> dict:
        server = {"listen": list(self.listen), "routes": [catch_all_route()]}
        if not self.automatic_https:
            server["automatic_https"] = {"disable": True}
        return server

    def _warn_on_drift(self, server: dict) -> None:
        """Log each difference between the live server and the settings, once."""
        drift = []
        if server.get("listen") != self.listen:
            drift.append(f"listens on {server.get('listen')}, not {self.listen}")
        automatic_https = server.get("automatic_https")
        disabled = (
            isinstance(automatic_https, dict)
            and automatic_https.get("disable") is True
        )
        if not self.automatic_https and not disabled:
            drift.append("has automatic HTTPS enabled")
        for text in drift:
            if text not in self._drift_warned:
                self._drift_warned.add(text)
                LOG.warning(
                    "Caddy server %r %s, and it is left as it is", self.server, text
                )

    def _ensure_server_step(self, snapshot: _ConfigSnapshot):
        """Make one change towards the server with its catch-all last.

        Returns True when nothing was left to change and _READ_AGAIN otherwise.
        """
        action = f"set up Caddy server {self.server!r}"
        server = snapshot.server(self.server)
        if server is None:
            document = self._new_server()
            if not self._guarded_write(
                "PUT", self._server_path, document, snapshot, action
            ):
                return _READ_AGAIN
            LOG.info(
                "Caddy server %r created, listening on %s", self.server, self.listen
            )
            return _READ_AGAIN

        self._warn_on_drift(server)
        routes = server.get("routes")
        path = self._server_path + "/routes"
        if routes is None:
            method, document = "PUT", [catch_all_route()]
        elif not isinstance(routes, list):
            raise CaddyError(
                f"{action} failed: its routes are not a list: {routes!r}", 502
            )
        else:
            others = [
                route for route in routes if _route_id(route) != CADDY_CATCH_ALL_ID
            ]
            expected_routes = others + [catch_all_route()]
            if routes == expected_routes:
                return True
            if len(others) == len(routes):
                method, document = "POST", catch_all_route()
            else:
                # One PATCH of the whole array moves the catch-all to the end
                # atomically. Other routes are sent back unchanged.
                method, document = "PATCH", expected_routes
        if not self._guarded_write(method, path, document, snapshot, action):
            return _READ_AGAIN
        LOG.info("Caddy catch-all route placed last in server %r", self.server)
        return _READ_AGAIN

    def ensure_server(self) -> None:
        """Create the server if missing and keep the catch-all as its last route.

        Creates apps/http and the server with path-scoped PUTs (never POST /load),
        disabling automatic HTTPS when the client was built with
        automatic_https=False. An existing server's listen addresses and HTTPS
        settings are left as they are, with a warning when they differ.
        Idempotent: makes no write when everything is in place. With a route
        index it reads only the last route, and the listen and HTTPS drift
        warnings come from the full reads that build the index.
        """
        action = f"set up Caddy server {self.server!r}"
        with self._lock:
            index = self._route_index
            if index is not None and self._catch_all_last(index, action):
                return
            self._run_guarded(action, self._ensure_server_step)

    # --- App routes ---

    def _route_indexes(self, snapshot: _ConfigSnapshot, route_id: str) -> list[int]:
        """Return the positions of the routes with this "@id" in the server."""
        server = snapshot.server(self.server) or {}
        routes = server.get("routes")
        routes = routes if isinstance(routes, list) else []
        return [
            index for index, route in enumerate(routes) if _route_id(route) == route_id
        ]

    def _check_domain_free(
        self, snapshot: _ConfigSnapshot, domain: str, route_id: str
    ) -> None:
        found = _find_domain_owner(
            snapshot.config, domain, skip=(self.server, route_id)
        )
        if found is not None:
            server_name, owner = found
            raise DomainTakenError(domain, owner, server_name, route_id)

    def _set_route_step(self, snapshot: _ConfigSnapshot, route: dict, action: str):
        # Repair the server first, so that the catch-all exists, is last and the
        # new route can go right before it.
        if self._ensure_server_step(snapshot) is not True:
            return _READ_AGAIN
        route_id = route["@id"]
        self._check_domain_free(snapshot, route["match"][0]["host"][0], route_id)

        indexes = self._route_indexes(snapshot, route_id)
        routes = snapshot.server(self.server)["routes"]
        if len(indexes) == 1 and routes[indexes[0]] == route:
            self._remember(route_id, indexes[0], route)
            return route
        if len(indexes) == 1:
            method, path, document = "PATCH", "/id/" + route_id, route
        elif indexes:
            # Duplicate ids come from another writer. One PATCH of the array
            # keeps the first copy, replaced, and drops the others.
            document = [
                route if index == indexes[0] else other
                for index, other in enumerate(routes)
                if index == indexes[0] or index not in indexes
            ]
            method, path = "PATCH", self._server_path + "/routes"
            LOG.warning(
                "Caddy route %s appears %d times, keeping one", route_id, len(indexes)
            )
        else:
            catch_all_index = len(routes) - 1
            path = f"{self._server_path}/routes/{catch_all_index}"
            method, document = "PUT", route
        if not self._guarded_write(method, path, document, snapshot, action):
            return _READ_AGAIN
        if len(indexes) > 1:
            self._index_route_list(document)
        elif not indexes:
            # The PUT inserted the route where the catch-all was.
            self._index_route_list(
                routes[:catch_all_index] + [route] + routes[catch_all_index:]
            )
        self._remember(route_id, indexes[0] if indexes else catch_all_index,
                       route)
        LOG.info("Caddy route %s %s", route_id, "replaced" if indexes else "created")
        return route

    def _set_route_fast(self, route: dict, action: str):
        """Replace an indexed route that keeps its domain, reading only it.

        Returns _READ_AGAIN when the route is not indexed, the index is
        stale or the domain changes, because a new domain must be checked
        against every route.
        """
        route_id = route["@id"]
        index = self._route_index
        known = self._known_route(route_id)
        if known is not None:
            # The route as last written, unless If-Match says it changed:
            # the route count (which shows a copy of it added by another
            # writer) and the write, two requests.
            position, live, if_match = known
            if live.get("match") == route["match"] and live != route and \
                    self._count_unchanged(index, action) and \
                    self._write_known(route_id, position, "", route, if_match,
                                      action):
                self._remember(route_id, position, route)
                LOG.info("Caddy route %s replaced", route_id)
                return route
        # Replacing a route in place does not need the catch-all last;
        # ensure_server, which the reconciler runs every pass, puts it back.
        found = self._read_indexed(route_id, action, check="count")
        if found is None:
            return _READ_AGAIN
        position, live, if_match = found
        if live.get("match") != route["match"]:
            return _READ_AGAIN
        if live == route:
            self._remember(route_id, position, live)
            return route
        if not self._write_position("PATCH", position, "", route, if_match, action):
            return _READ_AGAIN
        self._remember(route_id, position, route)
        LOG.info("Caddy route %s replaced", route_id)
        return route

    def set_app_route(self, app_id: int | str, domain: str, upstreams: list) -> dict:
        """Route domain to the weighted upstreams of app_id and return the route.

        upstreams is a list of (dial, weight) with int weights summing to 100.
        An existing route is replaced in one PATCH /id/<id>, and a missing one
        is inserted before the catch-all in one PUT. No write is made when the
        live route already matches. First repairs the server as ensure_server
        does when it is missing or its catch-all is not last. Raises
        DomainTakenError when another route, ours or foreign, matches the
        domain, and ValueError on invalid arguments.

        NOTE: an indexed route that keeps its domain is replaced after reading
        only that route, so a foreign route added for the same domain after
        ours is not detected here. Operator.accept_deploy checks the domain
        with domain_owner before every deploy.
        """
        route = build_app_route(app_id, domain, upstreams)
        route_id = route["@id"]
        action = (
            f"set Caddy route {route_id} for domain {route['match'][0]['host'][0]}"
        )
        with self._lock:
            result = self._set_route_fast(route, action)
            if result is not _READ_AGAIN:
                return result
            return self._run_guarded(
                action, lambda snapshot: self._set_route_step(snapshot, route, action)
            )

    def _change_domain_step(
        self, snapshot: _ConfigSnapshot, route_id: str, domain: str
    ):
        action = f"change the domain of Caddy route {route_id} to {domain}"
        indexes = self._route_indexes(snapshot, route_id)
        if not indexes:
            raise CaddyError(
                f"{action} failed: Caddy server {self.server!r} has no route "
                f"{route_id}. Set the app's route first",
                404,
            )
        self._check_domain_free(snapshot, domain, route_id)
        route = dict(snapshot.server(self.server)["routes"][indexes[-1]])
        match = [{"host": [domain]}]
        if route.get("match") == match:
            return route
        path = f"/id/{route_id}/match"
        if not self._guarded_write("PATCH", path, match, snapshot, action):
            return _READ_AGAIN
        LOG.info("Caddy route %s now matches domain %s", route_id, domain)
        route["match"] = match
        return route

    def change_domain(self, app_id: int | str, new_domain: str) -> dict:
        """Point app_id's route at new_domain in one write and return the route.

        Raises CaddyError with status 404 when the route is missing (it is not
        created), and DomainTakenError when another route matches new_domain.
        Setting the domain the route already has makes no write.
        """
        route_id = caddy_route_id(app_id)
        domain = _caddy_domain(new_domain)
        action = f"change the domain of Caddy route {route_id} to {domain}"
        with self._lock:
            result = self._change_domain_fast(route_id, domain, action)
            if result is not _READ_AGAIN:
                return result
            return self._run_guarded(
                action,
                lambda snapshot: self._change_domain_step(snapshot, route_id, domain),
            )

    def _change_domain_fast(self, route_id: str, domain: str, action: str):
        """Move an indexed route to a domain that no route mentions.

        The domain check reads the whole config without parsing it (see
        _domain_mentioned). NOTE: the write is guarded by the hash of this
        route only, so a route for the same domain that another process adds
        between that read and the write is not detected. Writers in this
        process are ordered by the lock.
        """
        # The write is guarded by the hash of the route, and the domain check
        # reads every route (and finds a second copy of the route), so the
        # index needs no check of its own here.
        known = self._known_route(route_id)
        if known is not None:
            position, route, if_match = known
            if route.get("match") != [{"host": [domain]}]:
                if self._domain_mentioned(domain, action, route_id):
                    return _READ_AGAIN
                if self._write_known(route_id, position, "/match",
                                     [{"host": [domain]}], if_match, action):
                    return self._domain_changed(route_id, position, route,
                                                domain)
        found = self._read_indexed(route_id, action, check="none")
        if found is None:
            return _READ_AGAIN
        position, route, if_match = found
        match = [{"host": [domain]}]
        if route.get("match") == match:
            return route
        if self._domain_mentioned(domain, action, route_id):
            return _READ_AGAIN
        if not self._write_position(
            "PATCH", position, "/match", match, if_match, action
        ):
            return _READ_AGAIN
        return self._domain_changed(route_id, position, route, domain)

    def _domain_changed(self, route_id: str, position: int, route: dict,
                        domain: str) -> dict:
        route = dict(route, match=[{"host": [domain]}])
        self._remember(route_id, position, route)
        LOG.info("Caddy route %s now matches domain %s", route_id, domain)
        return route

    def delete_app_route(self, app_id: int | str) -> bool:
        """Delete the route of app_id and return False when Caddy had none.

        Deletes by "@id" with If-Match until the server has no route with that
        id, so duplicates left by another writer go too.
        """
        route_id = caddy_route_id(app_id)
        action = f"delete Caddy route {route_id}"
        deleted = []

        def delete_step(snapshot: _ConfigSnapshot):
            if not self._route_indexes(snapshot, route_id):
                return bool(deleted)
            path = "/id/" + route_id
            if self._guarded_write("DELETE", path, None, snapshot, action):
                LOG.info("Caddy route %s deleted", route_id)
                deleted.append(path)
                self._known.pop(route_id, None)
            return _READ_AGAIN

        return self._run_guarded(action, delete_step)


# === Outbound guard ===

# Callback responses are read up to this many bytes; the rest is dropped.
CALLBACK_MAX_RESPONSE_BYTES = 64 << 10
_HOST_RULE = re.compile(r"\.?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                        r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


class OutboundBlockedError(FetchError):
    """Raised when a URL's destination is outside the outbound rules."""


def _parse_outbound_rule(rule: str):
    """Return an ip_network or a lower-case host name rule, or None."""
    try:
        return ipaddress.ip_network(rule, strict=False)
    except ValueError:
        pass
    name = rule.strip().lower().rstrip(".")
    return name if _HOST_RULE.fullmatch(name) else None


def _plain_address(text: str):
    """Return the ip_address of ``text``, IPv4-mapped IPv6 as IPv4."""
    address = ipaddress.ip_address(text.split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class OutboundPolicy:
    """The outbound_allow and outbound_block rules of asset and callback URLs.

    A destination is rejected when its host name or any address it resolves
    to matches outbound_block.  When outbound_allow is not empty, the host
    name must match it or every resolved address must lie in it.  A name
    rule matches that name; with a leading dot it matches every subdomain.
    """

    def __init__(self, allow: list, block: list):
        self.allow_names, self.allow_networks = self._split(allow)
        self.block_names, self.block_networks = self._split(block)

    @classmethod
    def from_config(cls, config) -> OutboundPolicy:
        """Build the policy from a Config (or anything with the two keys)."""
        return cls(config.outbound_allow, config.outbound_block)

    @staticmethod
    def _split(rules: list) -> tuple:
        names, networks = [], []
        for rule in rules:
            parsed = _parse_outbound_rule(rule)
            if isinstance(parsed, str):
                names.append(parsed)
            elif parsed is not None:
                networks.append(parsed)
        return names, networks

    @staticmethod
    def _name_matches(host: str, names: list) -> bool:
        for rule in names:
            if rule.startswith("."):
                if host.endswith(rule):
                    return True
            elif host == rule:
                return True
        return False

    @staticmethod
    def _address_in(address, networks: list) -> bool:
        return any(address.version == net.version and address in net
                   for net in networks)

    def check_before_resolving(self, host: str) -> str | None:
        """Return why ``host`` is rejected, when that is known without DNS.

        A literal address is checked in full; a name only against the
        name rules of outbound_block, because its addresses are unknown.
        """
        host = host.lower().rstrip(".")
        if _is_ip(host):
            return self.check_addresses(host, [_plain_address(host)])
        if self._name_matches(host, self.block_names):
            return f"host {host} is blocked by outbound_block"
        return None

    def check_addresses(self, host: str, addresses: list) -> str | None:
        """Return why ``host`` with these resolved addresses is rejected."""
        host = host.lower().rstrip(".")
        if self._name_matches(host, self.block_names):
            return f"host {host} is blocked by outbound_block"
        what = "address" if _is_ip(host) else f"host {host} resolves to"
        for address in addresses:
            if self._address_in(address, self.block_networks):
                return f"{what} {address}, which is blocked by outbound_block"
        if not (self.allow_names or self.allow_networks):
            return None
        if self._name_matches(host, self.allow_names):
            return None
        for address in addresses:
            if not self._address_in(address, self.allow_networks):
                return f"{what} {address}, which is not in outbound_allow"
        return None

    def resolve(self, host: str, port: int) -> list:
        """Resolve ``host`` once, check every address, return them all.

        Raises OutboundBlockedError when any address is rejected, so that a
        name with one good and one blocked address is never used.
        """
        # A resolver error (socket.gaierror, an OSError) propagates, so that
        # callers retry it like any other failed connection.
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except UnicodeError as exc:
            raise FetchError(f"invalid host name {host}: {exc}")
        addresses = []
        for info in infos:
            address = _plain_address(info[4][0])
            if address not in addresses:
                addresses.append(address)
        problem = self.check_addresses(host, addresses)
        if problem:
            raise OutboundBlockedError(problem)
        return addresses


def guarded_connection(url: str, timeout_s: float, policy: OutboundPolicy):
    """Return an unconnected HTTP(S)Connection for ``url`` that obeys policy.

    The host is resolved and checked here, once.  The connection then goes
    to the checked addresses only, so a DNS answer that changes between
    the check and the connect (DNS rebinding) cannot move the target.  The
    Host header, TLS SNI and certificate check still use the URL's name.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    problem = policy.check_before_resolving(host)
    if problem:
        raise OutboundBlockedError(problem)
    addresses = policy.resolve(host, port)
    if parts.scheme == "https":
        import ssl  # imported lazily: plain-HTTP hosts never need OpenSSL
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout_s,
            context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)

    def connect_checked(_address, timeout, source_address=None):
        last_error = None
        for address in addresses:
            try:
                sock = socket.create_connection((str(address), port), timeout,
                                                source_address)
            except OSError as exc:
                last_error = exc
                continue
            # Kept for _Deadline: http.client drops conn.sock after reading
            # the headers of a response that closes the connection.
            conn.checked_socket = sock
            return sock
        raise last_error

    # http.client opens its socket through this attribute (CPython 3.9 to
    # 3.13); HTTPSConnection wraps the result with server_hostname=host.
    conn._create_connection = connect_checked
    return conn


class _Deadline:
    """Shut down a connection's socket when a total time limit passes.

    Socket timeouts bound each read, but a peer that trickles one byte at a
    time would otherwise keep a request alive indefinitely.
    """

    def __init__(self, conn, seconds: float):
        self._conn = conn
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self.expired = False

    def _expire(self) -> None:
        self.expired = True
        sock = getattr(self._conn, "checked_socket", None) or self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()


# === Host adapter: downloads ===

def _open_url(url: str, timeout_s: float, policy: OutboundPolicy):
    """Send a GET for ``url`` and return (connection, response)."""
    parts = urllib.parse.urlsplit(url)
    conn = guarded_connection(url, timeout_s, policy)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn.request("GET", path, headers={
        "User-Agent": f"crate-operator/{__version__}", "Accept": "*/*"})
    return conn, conn.getresponse()


# HTTP statuses after which the same request may succeed later.  Every other
# non-200 status fails the download at once.
_TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class _TransientHTTPError(FetchError):
    """Raised when the asset server responds with a status worth retrying."""


def download(url: str, dest: str, max_bytes: int, timeout_s: float,
             log_fields: dict, policy: OutboundPolicy | None = None) -> str:
    """Stream ``url`` into ``dest`` and return the hex SHA-256 of the bytes.

    Follows a few redirects, stops at ``max_bytes`` and at ``timeout_s`` per
    attempt.  A failed connection, a cut transfer and the statuses 408, 429
    and 5xx are tried DOWNLOAD_ATTEMPTS times in total.  Any other non-200
    status (a 404, a 403) fails at once, because repeating it cannot help.
    Every URL, redirects included, must pass ``policy`` (the default
    outbound rules when None); a rejected one fails at once.
    """
    if policy is None:
        policy = OutboundPolicy(CONFIG_SPEC["outbound_allow"][0],
                                CONFIG_SPEC["outbound_block"][0])
    last_error = None
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return _download_once(url, dest, max_bytes, timeout_s, log_fields,
                                  policy)
        except (OSError, http.client.HTTPException,
                _TransientHTTPError) as exc:
            last_error = exc
            log("asset.download_retry", logging.WARNING, attempt=attempt,
                error=str(exc), **log_fields)
            time.sleep(min(2.0, 0.2 * attempt))
    raise FetchError(f"download of {redact_url(url)} failed after "
                     f"{DOWNLOAD_ATTEMPTS} attempts: {last_error}")


def redact_url(url: str) -> str:
    """Return ``url`` without its query string, which may carry a token."""
    parts = urllib.parse.urlsplit(url)
    query = "?..." if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path,
                                    "", "")) + query


def _download_once(url: str, dest: str, max_bytes: int, timeout_s: float,
                   log_fields: dict, policy: OutboundPolicy) -> str:
    deadline = time.monotonic() + timeout_s
    for _ in range(DOWNLOAD_MAX_REDIRECTS + 1):
        conn, resp = _open_url(url, min(timeout_s, 30.0), policy)
        try:
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location") or ""
                url = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                    raise FetchError(f"asset redirect to a non-HTTP URL "
                                     f"{redact_url(url)}")
                continue
            if resp.status in _TRANSIENT_HTTP_STATUSES:
                raise _TransientHTTPError(f"asset {redact_url(url)} returned "
                                          f"HTTP {resp.status}")
            if resp.status != 200:
                raise FetchError(f"asset {redact_url(url)} answered HTTP "
                                 f"{resp.status}; check asset_url")
            return _stream_to_file(resp, dest, max_bytes, deadline, url,
                                   log_fields)
        finally:
            conn.close()
    raise FetchError(f"asset {redact_url(url)}: more than "
                     f"{DOWNLOAD_MAX_REDIRECTS} redirects")


def _declared_length(resp, url: str, max_bytes: int) -> int | None:
    """Return the Content-Length of ``resp``; raise when it is over the limit."""
    declared = resp.getheader("Content-Length")
    if not declared or not declared.isdigit():
        return None
    if int(declared) > max_bytes:
        raise FetchError(f"asset {redact_url(url)} is {declared} bytes, over "
                         f"the limit of {max_bytes} (max_asset_bytes)")
    return int(declared)


def _stream_to_file(resp, dest: str, max_bytes: int, deadline: float,
                    url: str, log_fields: dict) -> str:
    declared = _declared_length(resp, url, max_bytes)
    started = time.monotonic()
    log("asset.download_started", url=redact_url(url), bytes_total=declared,
        **log_fields)
    digest = hashlib.sha256()
    size = 0
    next_report = DOWNLOAD_PROGRESS_BYTES
    with open(dest, "wb") as handle:
        while True:
            if time.monotonic() > deadline:
                raise FetchError(f"download of {redact_url(url)} timed out "
                                 f"(download_timeout_s)")
            chunk = resp.read(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"asset {redact_url(url)} exceeds the limit "
                                 f"of {max_bytes} bytes (max_asset_bytes)")
            digest.update(chunk)
            handle.write(chunk)
            if size >= next_report:
                percent = round(100 * size / declared) if declared else None
                log("asset.download_progress", bytes=size,
                    bytes_total=declared, percent=percent, **log_fields)
                next_report += DOWNLOAD_PROGRESS_BYTES
        handle.flush()
        sync_fd(handle.fileno())
    if declared is not None and declared != size:
        raise OSError(errno.EIO, f"connection closed after {size} of "
                                 f"{declared} bytes")
    log("asset.downloaded", bytes=size,
        seconds=round(time.monotonic() - started, 3), **log_fields)
    return digest.hexdigest()


# === Releases ===
#
# An asset becomes a release directory in three steps, all inside a fresh
# staging directory that nothing else writes to: unpack (a raw executable is
# renamed to "app", an archive is extracted member by member), seal (read-only
# modes), then one rename to apps_dir/<app_id>/releases/<version>-<deployment>.
# Archives are checked here rather than by tarfile's extraction filters,
# because Debian 12's python3 (3.11.2) has no tarfile.data_filter, and the
# filters of later 3.11 releases had symlink bypasses (CVE-2025-4517) until
# 3.11.13.

class ArchiveLimits(NamedTuple):
    """Limits applied while an archive is unpacked."""

    max_members: int
    max_bytes: int
    max_ratio: int = ARCHIVE_MAX_RATIO
    ratio_min_bytes: int = ARCHIVE_RATIO_MIN_BYTES


# Magic numbers of compressed formats this version does not unpack.
_UNSUPPORTED_MAGIC = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                      (b"\x28\xb5\x2f\xfd", "zstd"), (b"7z\xbc\xaf\x27\x1c", "7z"))


def asset_kind(path: str) -> str:
    """Return the kind of a downloaded asset, read from its first bytes.

    The kinds are "executable" (ELF or ``#!`` script), "tar.gz", "tar" and
    "zip".  The name of the asset is never consulted.
    """
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith((b"\x7fELF", b"#!")):
        return "executable"
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise StepError(f"asset is a {name} file; use a raw executable, "
                            f"a .tar.gz, .tar or .zip archive")
    raise StepError("asset is neither an ELF executable, a script starting "
                    "with #!, nor a .tar.gz, .tar or .zip archive")


def member_parts(name: str) -> tuple:
    """Split an archive member name into path components, or raise.

    ``.`` and empty components are dropped; an absolute name or a ``..``
    component raises ArchiveError.  The archive root itself gives ().
    """
    if name.startswith("/"):
        raise ArchiveError(name, "has an absolute path")
    if "\x00" in name:
        raise ArchiveError(name, "contains a NUL character")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ArchiveError(name, "has a '..' component")
    return parts


def _check_symlink_target(name: str, parts: tuple, target: str) -> None:
    """Raise unless ``target``, read from the link's directory, stays inside.

    Every prefix of the target must stay inside, so ``../<release>/x`` is
    rejected even though it ends inside again.  Chains of links are checked
    once the whole archive is unpacked (_check_links_inside).
    """
    if not target:
        raise ArchiveError(name, "is a symlink with an empty target")
    if target.startswith("/"):
        raise ArchiveError(name, f"is a symlink to the absolute path "
                                 f"{target!r}; only relative links that stay "
                                 f"inside the release are allowed")
    depth = len(parts) - 1
    for part in target.split("/"):
        if part in ("", "."):
            continue
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise ArchiveError(name, f"is a symlink to {target!r}, which "
                                     f"points outside the release")


class _MemberBudget:
    """Counts members and declared sizes against ArchiveLimits."""

    def __init__(self, limits: ArchiveLimits):
        self.limits = limits
        self.members = 0
        self.declared_bytes = 0

    def count(self, name: str, declared_size: int) -> None:
        """Count one member and its declared size, or raise ArchiveError."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(name, f"is past the limit of "
                                     f"{self.limits.max_members} members "
                                     f"(max_archive_members)")
        self.declared_bytes += max(0, declared_size)
        if self.declared_bytes > self.limits.max_bytes:
            raise ArchiveError(name, f"declares {declared_size} bytes, which "
                                     f"takes the archive over the limit of "
                                     f"{self.limits.max_bytes} unpacked bytes "
                                     f"(max_unpacked_bytes)")


class _ReleaseWriter:
    """Write archive members below a new, empty directory, counting them.

    Paths are opened one component at a time relative to a directory
    descriptor, with O_NOFOLLOW, and files are created with O_EXCL.  So a
    symlink unpacked earlier never redirects a later write, and no member
    replaces another one.  Callers use count(), then add_directory(),
    add_file(), add_symlink() or add_hardlink(), and stats() and close().
    """

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    _FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                   | os.O_CLOEXEC)

    def __init__(self, root: str, limits: ArchiveLimits):
        self.limits = limits
        self.budget = _MemberBudget(limits)
        self.written_bytes = 0
        self.files = set()
        self._root_fd = os.open(root, self._DIR_FLAGS)

    def close(self) -> None:
        """Close the directory descriptor of the root."""
        os.close(self._root_fd)

    def count(self, name: str, declared_size: int) -> None:
        """Count one member and its declared size against the limits."""
        self.budget.count(name, declared_size)

    def stats(self) -> dict:
        """Return {"members", "bytes"} written so far."""
        return {"members": self.budget.members, "bytes": self.written_bytes}

    def _open_parent(self, name: str, parts: tuple) -> int:
        """Return a descriptor of the directory that will hold ``parts``.

        Missing directories are created; a component that is a symlink or a
        file raises ArchiveError.
        """
        fd = os.dup(self._root_fd)
        try:
            for index, part in enumerate(parts[:-1]):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                try:
                    child = os.open(part, self._DIR_FLAGS, dir_fd=fd)
                except OSError:
                    shown = "/".join(parts[:index + 1])
                    info = os.lstat(part, dir_fd=fd)
                    what = "symlink" if stat.S_ISLNK(info.st_mode) \
                        else "non-directory"
                    raise ArchiveError(name, f"would be written through the "
                                             f"{what} {shown!r}")
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def add_directory(self, name: str, parts: tuple) -> None:
        """Create a directory member; an existing directory is kept."""
        if not parts:
            return
        parent = self._open_parent(name, parts)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            info = os.lstat(parts[-1], dir_fd=parent)
            if not stat.S_ISDIR(info.st_mode):
                raise ArchiveError(name, "is a directory, but an earlier "
                                         "member has the same path")
        finally:
            os.close(parent)

    def add_file(self, name: str, parts: tuple, source,
                 executable: bool | None) -> None:
        """Copy a regular file member from the file object ``source``.

        ``executable`` None means the archive has no mode for the member,
        which is then executable when it starts like an ELF file or a
        script.
        """
        if not parts:
            raise ArchiveError(name, "is a file without a name")
        parent = self._open_parent(name, parts)
        try:
            try:
                fd = os.open(parts[-1], self._FILE_FLAGS, 0o600,
                             dir_fd=parent)
            except FileExistsError:
                raise ArchiveError(name, "has the same path as an earlier "
                                         "member")
            with os.fdopen(fd, "wb") as handle:
                head = self._copy(name, source, handle)
                if executable is None:
                    executable = head.startswith((b"\x7fELF", b"#!"))
                if executable:
                    os.fchmod(handle.fileno(), 0o700)
        finally:
            os.close(parent)
        self.files.add(parts)

    def _copy(self, name: str, source, handle) -> bytes:
        """Copy ``source`` to ``handle`` under the byte limit; return the head."""
        head = b""
        while True:
            chunk = source.read(1 << 16)
            if not chunk:
                return head
            if not head:
                head = chunk[:4]
            self.written_bytes += len(chunk)
            if self.written_bytes > self.limits.max_bytes:
                raise ArchiveError(name, f"takes the unpacked files over the "
                                         f"limit of {self.limits.max_bytes} "
                                         f"bytes (max_unpacked_bytes)")
            handle.write(chunk)

    def add_symlink(self, name: str, parts: tuple, target: str) -> None:
        """Create a symlink member whose target stays inside the release."""
        if not parts:
            raise ArchiveError(name, "is a symlink without a name")
        _check_symlink_target(name, parts, target)
        parent = self._open_parent(name, parts)
        try:
            os.symlink(target, parts[-1], dir_fd=parent)
        except FileExistsError:
            raise ArchiveError(name, "has the same path as an earlier member")
        finally:
            os.close(parent)

    def add_hardlink(self, name: str, parts: tuple, target: str) -> None:
        """Create a hard link to a regular file unpacked before it."""
        if not parts:
            raise ArchiveError(name, "is a hard link without a name")
        try:
            target_parts = member_parts(target)
        except ArchiveError as exc:
            raise ArchiveError(name, f"is a hard link to {target!r}, which is "
                                     f"outside the release ({exc.reason})")
        if target_parts not in self.files:
            raise ArchiveError(name, f"is a hard link to {target!r}, which is "
                                     f"not a regular file unpacked before it")
        source_parent = self._open_parent(name, target_parts)
        try:
            parent = self._open_parent(name, parts)
            try:
                os.link(target_parts[-1], parts[-1],
                        src_dir_fd=source_parent, dst_dir_fd=parent,
                        follow_symlinks=False)
            except FileExistsError:
                raise ArchiveError(name, "has the same path as an earlier "
                                         "member")
            finally:
                os.close(parent)
        finally:
            os.close(source_parent)
        self.files.add(parts)


class _CountingReader:
    """File object that raises once more than ``limit`` bytes were read.

    It bounds what tarfile decompresses and parses, pax headers included,
    before any member size is known.
    """

    def __init__(self, raw, limit: int):
        self.raw = raw
        self.limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        """Read from the wrapped file object, counting the bytes."""
        data = self.raw.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise ArchiveError(None, f"the tar stream is longer than "
                                     f"{self.limit} bytes (max_unpacked_bytes "
                                     f"plus headers)")
        return data


# Exceptions that reading or writing a damaged archive raises besides
# ArchiveError.
_READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError,
                zipfile.BadZipFile, NotImplementedError, RuntimeError)


def _unpack_member(func, writer, archive, member, name: str) -> None:
    """Run ``func`` for one member; name the member in any error."""
    try:
        func(writer, archive, member)
    except ArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise ArchiveError(name, f"could not be unpacked: {exc}")


def _tar_member(writer: _ReleaseWriter, tar: tarfile.TarFile,
                member: tarfile.TarInfo) -> None:
    """Check one tar member and write it."""
    name = member.name
    parts = member_parts(name)
    writer.count(name, member.size if member.isreg() else 0)
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        raise ArchiveError(name, f"has the setuid or setgid bit (mode "
                                 f"{member.mode:04o}); clear it with "
                                 f"chmod u-s,g-s before packing")
    if member.isreg():
        source = tar.extractfile(member)
        writer.add_file(name, parts, source, bool(member.mode & 0o111))
    elif member.isdir():
        writer.add_directory(name, parts)
    elif member.issym():
        writer.add_symlink(name, parts, member.linkname)
    elif member.islnk():
        writer.add_hardlink(name, parts, member.linkname)
    else:
        raise ArchiveError(name, f"is a {_tar_type_name(member)}; only "
                                 f"files, directories and links are allowed")


def _tar_type_name(member: tarfile.TarInfo) -> str:
    if member.ischr():
        return "character device"
    if member.isblk():
        return "block device"
    if member.isfifo():
        return "FIFO"
    return f"special file (tar type {member.type!r})"


def extract_tar(path: str, dest: str, limits: ArchiveLimits,
                compressed: bool) -> dict:
    """Unpack a tar or tar.gz archive into the empty directory ``dest``.

    The archive is read once, as a stream; each member is checked and
    written before the next one is read.  Returns {"members", "bytes"}.
    """
    # Headers take 512 bytes per member, long names more.
    stream_limit = limits.max_bytes + limits.max_members * 8192 + (1 << 20)
    writer = _ReleaseWriter(dest, limits)
    last = None
    try:
        with open(path, "rb") as raw:
            source = gzip.GzipFile(fileobj=raw, mode="rb") if compressed \
                else raw
            reader = _CountingReader(source, stream_limit)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    last = member.name
                    _unpack_member(_tar_member, writer, tar, member,
                                   member.name)
    except ArchiveError:
        raise
    except _READ_ERRORS as exc:
        where = f" after member {last!r}" if last else ""
        raise ArchiveError(None, f"the archive is damaged or not a tar "
                                 f"archive{where}: {exc}")
    finally:
        writer.close()
    return writer.stats()


def _zip_directory_size(path: str) -> int:
    """Return the size of a zip archive's central directory in bytes.

    Read from the end-of-central-directory record (and its Zip64 variant),
    so that a huge directory is rejected before zipfile reads it into
    memory.  Returns 0 when no record is found; zipfile then reports the
    damage.
    """
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        length = handle.tell()
        start = max(0, length - (22 + 0xFFFF))
        handle.seek(start)
        tail = handle.read()
        found = tail.rfind(b"PK\x05\x06")
        if found < 0 or len(tail) - found < 22:
            return 0
        size = struct.unpack("<I", tail[found + 12:found + 16])[0]
        if size != 0xFFFFFFFF or found < 20:
            return size
        locator = tail[found - 20:found]
        if not locator.startswith(b"PK\x06\x07"):
            return size
        handle.seek(struct.unpack("<Q", locator[8:16])[0])
        record = handle.read(56)
        if len(record) < 56 or not record.startswith(b"PK\x06\x06"):
            return size
        return struct.unpack("<Q", record[40:48])[0]


def _zip_member_mode(info: zipfile.ZipInfo) -> int | None:
    """Return the Unix mode of a zip member, or None when it has none."""
    if info.create_system != 3:
        return None
    mode = info.external_attr >> 16
    return mode or None


def _zip_precheck(limits: ArchiveLimits, archive: zipfile.ZipFile) -> None:
    """Check counts, declared sizes, ratios and encryption of every member.

    Runs before the first byte is written, since the central directory
    lists every member up front.
    """
    budget = _MemberBudget(limits)
    for info in archive.infolist():
        budget.count(info.filename, info.file_size)
        if info.flag_bits & 0x1:
            raise ArchiveError(info.filename, "is encrypted")
        compressed = max(1, info.compress_size)
        if info.file_size > limits.ratio_min_bytes and \
                info.file_size > limits.max_ratio * compressed:
            raise ArchiveError(info.filename, f"expands "
                                              f"{info.file_size // compressed}"
                                              f":1 ({info.compress_size} to "
                                              f"{info.file_size} bytes), over "
                                              f"the limit of "
                                              f"{limits.max_ratio}:1")


def _zip_member(writer: _ReleaseWriter, archive: zipfile.ZipFile,
                info: zipfile.ZipInfo) -> None:
    """Check one zip member and write it."""
    name = info.filename
    parts = member_parts(name)
    writer.count(name, info.file_size)
    mode = _zip_member_mode(info)
    kind = stat.S_IFMT(mode) if mode else 0
    if mode and mode & (stat.S_ISUID | stat.S_ISGID):
        raise ArchiveError(name, f"has the setuid or setgid bit (mode "
                                 f"{stat.S_IMODE(mode):04o}); clear it with "
                                 f"chmod u-s,g-s before packing")
    if kind == stat.S_IFLNK:
        with archive.open(info) as source:
            target = source.read(LINK_TARGET_MAX_BYTES + 1)
        if len(target) > LINK_TARGET_MAX_BYTES:
            raise ArchiveError(name, "is a symlink with an overlong target")
        writer.add_symlink(name, parts, target.decode("utf-8", "replace"))
    elif kind == stat.S_IFDIR or (not kind and info.is_dir()):
        writer.add_directory(name, parts)
    elif kind in (0, stat.S_IFREG):
        executable = bool(mode & 0o111) if mode else None
        with archive.open(info) as source:
            writer.add_file(name, parts, source, executable)
    else:
        raise ArchiveError(name, f"is a special file (mode {mode:o}); only "
                                 f"files, directories and links are allowed")


def extract_zip(path: str, dest: str, limits: ArchiveLimits) -> dict:
    """Unpack a zip archive into the empty directory ``dest``.

    Every member is checked before anything is written (counts, declared
    sizes, compression ratios), and again while it is written (bytes
    actually produced).  Returns {"members", "bytes"}.
    """
    directory_limit = limits.max_members * ZIP_DIRECTORY_BYTES_PER_MEMBER
    directory_size = _zip_directory_size(path)
    if directory_size > directory_limit:
        raise ArchiveError(None, f"its central directory is "
                                 f"{directory_size} bytes, more than "
                                 f"{limits.max_members} members need "
                                 f"(max_archive_members)")
    writer = _ReleaseWriter(dest, limits)
    try:
        with zipfile.ZipFile(path) as archive:
            _zip_precheck(limits, archive)
            for info in archive.infolist():
                _unpack_member(_zip_member, writer, archive, info,
                               info.filename)
    except ArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise ArchiveError(None, f"the zip archive is damaged: {exc}")
    finally:
        writer.close()
    return writer.stats()


def _check_links_inside(root: str) -> None:
    """Raise when a symlink below ``root`` resolves outside it.

    Each link was checked alone when it was written; this catches chains,
    such as a link through another link followed by ``..``.
    """
    real_root = os.path.realpath(root)
    for current, dirs, files in os.walk(root):
        for entry in dirs + files:
            path = os.path.join(current, entry)
            if not os.path.islink(path):
                continue
            resolved = os.path.realpath(path)
            if resolved != real_root and \
                    not resolved.startswith(real_root + os.sep):
                member = os.path.relpath(path, root)
                raise ArchiveError(member, f"is a symlink that resolves to "
                                           f"{resolved}, outside the release")


def seal_tree(root: str) -> None:
    """Make a release read-only: directories 0555, files 0444 or 0555.

    A file with any executable bit becomes 0555, so the app user (not the
    owner, root) may run it.  Symlinks are left alone.
    """
    for current, dirs, files in os.walk(root, topdown=False):
        for entry in files + dirs:
            path = os.path.join(current, entry)
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                os.chmod(path, 0o555)
            elif stat.S_ISREG(info.st_mode):
                os.chmod(path, 0o555 if info.st_mode & 0o111 else 0o444)
    os.chmod(root, 0o555)


def unpack_asset(path: str, kind: str, dest: str,
                 limits: ArchiveLimits) -> dict:
    """Turn a downloaded asset into the tree of a release at ``dest``.

    ``dest`` must be a new, empty directory.  A raw executable becomes
    ``dest/app``; an archive is extracted.  Returns {"members", "bytes"}.
    """
    if kind == "executable":
        size = os.path.getsize(path)
        os.rename(path, os.path.join(dest, "app"))
        os.chmod(os.path.join(dest, "app"), 0o555)
        return {"members": 1, "bytes": size}
    if kind == "zip":
        stats = extract_zip(path, dest, limits)
    else:
        stats = extract_tar(path, dest, limits, compressed=kind == "tar.gz")
    _check_links_inside(dest)
    return stats


# --- what to run

# Marks where $PORT stood in a Procfile command.  install() replaces it with
# the instance's port.  The operator resolves the port itself, instead of
# writing ${PORT} for systemd to expand, so the unit shows the real port,
# escape_unit_word needs no exception for "$", and the word stays one
# argument whatever the environment contains.  procfile_web_command rejects
# control characters, so a Procfile cannot contain the mark itself.
PORT_MARK = "\x00PORT\x00"

_SHELL_OPERATORS = ("&&", "||", ">>", "<<", "|", "&", ";", "<", ">", "(", ")")


def _shell_error(lineno: int, line: str, problem: str) -> StepError:
    shown = line if len(line) <= 200 else line[:200] + "..."
    return StepError(f"Procfile line {lineno} ({shown!r}) {problem}; the web "
                     f"command runs without a shell, so put shell syntax in "
                     f"a script inside the release and start that script")


def _dollar(command: str, index: int, lineno: int, line: str) -> tuple:
    """Read a ``$`` reference at ``index``; return (replacement, next index)."""
    rest = command[index + 1:]
    if rest.startswith("{PORT}"):
        return PORT_MARK, index + 7
    if rest.startswith("PORT") and not re.match(r"[A-Za-z0-9_]", rest[4:5]):
        return PORT_MARK, index + 5
    if rest.startswith("("):
        raise _shell_error(lineno, line, "uses command substitution '$('")
    raise _shell_error(lineno, line, "uses a variable other than $PORT; write "
                                     "a literal $ as \\$ or inside single "
                                     "quotes")


def _mark_port(command: str, lineno: int, line: str) -> str:
    """Check a Procfile command for shell syntax and mark $PORT.

    Follows POSIX sh quoting: nothing is special inside single quotes;
    inside double quotes ``$`` and backquotes still are.  Returns the
    command with PORT_MARK for each $PORT or ${PORT}, backslash escapes of
    ``$`` and backquote inside double quotes removed (shlex keeps the
    backslash there, sh does not), and a trailing comment cut off.
    """
    out = []
    quote = None
    index = 0
    while index < len(command):
        char = command[index]
        if quote == "'":
            quote = None if char == "'" else quote
        elif char == "\\":
            escaped = command[index + 1:index + 2]
            if quote == '"' and escaped in ("$", "`"):
                out.append(escaped)
            else:
                out.append(command[index:index + 2])
            index += 2
            continue
        elif char == "`":
            raise _shell_error(lineno, line, "uses command substitution '`'")
        elif char == "$":
            replacement, index = _dollar(command, index, lineno, line)
            out.append(replacement)
            continue
        elif quote == '"':
            quote = None if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (not out or out[-1][-1:].isspace()):
            break
        else:
            for operator in _SHELL_OPERATORS:
                if command.startswith(operator, index):
                    raise _shell_error(lineno, line, f"uses the shell "
                                                     f"operator {operator!r}")
        out.append(char)
        index += 1
    return "".join(out)


def procfile_web_command(text: str) -> list:
    """Return the words of the ``web:`` line of a Procfile.

    Lines are ``name: command``; blank lines, ``#`` comments and other
    process types are skipped.  The command is split like sh would split it
    (shlex, POSIX mode) but nothing is expanded except $PORT and ${PORT},
    which become PORT_MARK.  Shell operators, command substitution and other
    variables raise StepError naming the line.
    """
    found = None
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, command = stripped.partition(":")
        if not sep or name.strip() != "web":
            continue
        if found is not None:
            raise StepError(f"Procfile has more than one web: line (lines "
                            f"{found} and {lineno}); keep one")
        found = lineno
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", command):
            raise StepError(f"Procfile line {lineno} contains control "
                            f"characters other than tab")
        try:
            words = shlex.split(_mark_port(command, lineno, line))
        except ValueError as exc:
            raise _shell_error(lineno, line, f"cannot be split ({exc})")
        if not words:
            raise StepError(f"Procfile line {lineno} has an empty web command")
        if PORT_MARK in words[0]:
            raise StepError(f"Procfile line {lineno}: the program cannot be "
                            f"$PORT; name a file in the release")
    if found is None:
        raise StepError("Procfile has no web: line; add one such as "
                        "'web: ./server --port $PORT'")
    return words


def _is_executable_file(path: str) -> bool:
    """Return whether ``path`` is a regular file with an executable bit."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def _inside(path: str, root: str) -> str | None:
    """Return ``path`` relative to ``root`` after resolving links, or None."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real == real_root or not real.startswith(real_root + os.sep):
        return None
    return os.path.relpath(real, real_root)


def resolve_program(root: str, program: str) -> str:
    """Return the absolute path of the program named on a Procfile web line.

    A relative path with a slash is resolved inside the release and must
    stay inside; an absolute path is a program of the host; a bare name is
    looked up in systemd's search path, like ExecStart= does.
    """
    if program.startswith("/"):
        if not _is_executable_file(program):
            raise StepError(f"Procfile web program {program} is not an "
                            f"executable file on this host")
        return program
    if "/" not in program:
        found = shutil.which(program, path=EXEC_SEARCH_PATH)
        if not found:
            raise StepError(f"Procfile web program {program!r} was not found "
                            f"in {EXEC_SEARCH_PATH}; write ./{program} for a "
                            f"file in the release")
        return found
    relative = _inside(os.path.join(root, program), root)
    if relative is None:
        raise StepError(f"Procfile web program {program!r} points outside "
                        f"the release")
    path = os.path.join(root, relative)
    if not _is_executable_file(path):
        raise StepError(f"Procfile web program {program!r} is not an "
                        f"executable file in the release (missing, a "
                        f"directory, or without an executable bit)")
    return path


def _top_level_listing(root: str) -> str:
    """Describe the top level of a release for an error message."""
    names = sorted(os.listdir(root))
    shown = []
    for name in names[:20]:
        path = os.path.join(root, name)
        if os.path.islink(path):
            shown.append(name + "@")
        elif os.path.isdir(path):
            shown.append(name + "/")
        elif _is_executable_file(path):
            shown.append(name + "*")
        else:
            shown.append(name)
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    return (", ".join(shown) + more) if shown else "nothing"


def release_command(root: str) -> list:
    """Return the argv that runs the release unpacked at ``root``.

    A Procfile at the top wins; else the single executable file at the top
    level.  Words of a Procfile may contain PORT_MARK.
    """
    procfile = os.path.join(root, "Procfile")
    if os.path.lexists(procfile):
        relative = _inside(procfile, root)
        if relative is None or not os.path.isfile(procfile):
            raise StepError("Procfile is not a regular file inside the "
                            "release")
        with open(procfile, "rb") as handle:
            data = handle.read(PROCFILE_MAX_BYTES + 1)
        if len(data) > PROCFILE_MAX_BYTES:
            raise StepError(f"Procfile is larger than {PROCFILE_MAX_BYTES} "
                            f"bytes")
        words = procfile_web_command(data.decode("utf-8", "replace"))
        return [resolve_program(root, words[0])] + words[1:]
    candidates = [name for name in sorted(os.listdir(root))
                  if _inside(os.path.join(root, name), root) is not None
                  and _is_executable_file(os.path.join(root, name))]
    if len(candidates) == 1:
        return [os.path.join(root, candidates[0])]
    problem = "no executable file" if not candidates else \
        f"{len(candidates)} executable files"
    raise StepError(f"the release has no Procfile and {problem} at its top "
                    f"level, so what to run is unclear; found: "
                    f"{_top_level_listing(root)}. Add a Procfile with a web: "
                    f"line")


# === Binary runtime ===

def _port_in_use(port: int) -> bool:
    """Return whether an app could not bind 127.0.0.1:port now.

    A listener on any address and a connection that holds the port as its
    local end both make bind fail; SO_REUSEADDR (which Python's and most
    servers set) lets a port that is only in TIME_WAIT count as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return _accepts_connection(port)


def _accepts_connection(port: int) -> bool:
    """Return whether a TCP connection to 127.0.0.1:port is accepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Local addresses of sockets that accept connections to 127.0.0.1:
# 127.0.0.1 and 0.0.0.0, then :: and ::ffff:127.0.0.1.
_LOOPBACK_LISTEN = {
    socket.AF_INET: (bytes([127, 0, 0, 1]), bytes(4)),
    socket.AF_INET6: (bytes(16), bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])),
}
# Linux sock_diag (linux/sock_diag.h, linux/inet_diag.h): the netlink
# protocol, the request type, and the length of struct inet_diag_msg.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_INET_DIAG_MSG_LEN = 72
_TCP_LISTEN = 10


def loopback_listeners(port: int) -> set:
    """Return the inodes of the sockets that listen for 127.0.0.1:port.

    Asks the kernel for the listening TCP sockets of this network
    namespace, which the apps share, over netlink (sock_diag): no process
    is started, unlike a systemctl call, and no other socket is read,
    unlike /proc/net/tcp, which took 10 ms with 1,900 connections in
    TIME_WAIT.  Raises OSError when netlink is not available.
    """
    inodes = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                       _NETLINK_SOCK_DIAG) as netlink:
        netlink.settimeout(5.0)
        for family, addresses in _LOOPBACK_LISTEN.items():
            # struct inet_diag_req_v2: family, protocol, ext, pad, states,
            # then a zeroed struct inet_diag_sockid (48 bytes).
            request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0,
                                  1 << _TCP_LISTEN) + bytes(48)
            # struct nlmsghdr: length, type, flags (REQUEST | DUMP), seq, pid.
            netlink.send(struct.pack("=IHHII", 16 + len(request),
                                     _SOCK_DIAG_BY_FAMILY, 0x301, 1, 0)
                         + request)
            try:
                messages = list(_netlink_dump(netlink))
            except OSError as exc:
                # A kernel without IPv6 has no such sockets to list.
                if family == socket.AF_INET6 and exc.errno in (
                        errno.ENOENT, errno.EINVAL, errno.EAFNOSUPPORT):
                    continue
                raise
            for message in messages:
                if len(message) < _INET_DIAG_MSG_LEN:
                    continue
                # struct inet_diag_msg: family, state, timer, retrans, then
                # sockid (sport and dport big-endian, src 16 bytes, ...), and
                # expires, rqueue, wqueue, uid and inode at the end.
                source_port = struct.unpack_from("!H", message, 4)[0]
                source = message[8:8 + (4 if family == socket.AF_INET else 16)]
                if source_port == port and source in addresses:
                    inodes.add(struct.unpack_from("=I", message, 68)[0])
    return inodes


def _netlink_dump(netlink: socket.socket):
    """Yield the payloads of one netlink dump until its NLMSG_DONE."""
    while True:
        data = netlink.recv(1 << 16)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                raise OSError(errno.EPROTO, "invalid netlink message length")
            if kind == 3:  # NLMSG_DONE
                return
            if kind == 2:  # NLMSG_ERROR: a negative errno follows
                code = -struct.unpack_from("=i", data, offset + 16)[0]
                raise OSError(code, os.strerror(code))
            yield data[offset + 16:offset + length]
            offset += (length + 3) & ~3


def wait_for_listener(port: int, seconds: float) -> None:
    """Sleep up to ``seconds``, but return once 127.0.0.1:port accepts a
    connection (tried every LISTEN_POLL_S).

    A refused connection took about 30 us here, whatever else listens on
    the host.  A netlink read of the listening sockets (loopback_listeners)
    took 550 us with 500 of them, too much to repeat every few ms while
    many deploys wait.  The accepted connection is closed at once, as a
    TCP health check would.
    """
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(LISTEN_POLL_S, left))
        if _accepts_connection(port):
            return


def probe_http(port: int, path: str) -> tuple:
    """Return (ready, detail) for one GET of http://127.0.0.1:port<path>.

    A 2xx or 3xx is ready; redirects are not followed.  A refused
    connection means the instance is still booting.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port,
                                      timeout=HEALTH_PROBE_TIMEOUT_S)
    try:
        conn.request("GET", path, headers={
            "User-Agent": f"crate-operator/{__version__} health-check"})
        resp = conn.getresponse()
        resp.read(65536)
        if 200 <= resp.status < 400:
            return True, f"HTTP {resp.status}"
        return False, f"HTTP {resp.status}"
    except ConnectionRefusedError:
        return False, PROBE_REFUSED
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def probe_tcp(port: int) -> tuple:
    """Return (ready, detail): whether 127.0.0.1:port accepts connections."""
    if _port_in_use(port):
        return True, "port accepts connections"
    return False, PROBE_REFUSED


def instance_environment(plan: dict, instance: dict) -> dict:
    """Return the environment of one instance: env_vars, PORT, CRATE_*."""
    env = dict(plan["env_vars"])
    env.update({
        "PORT": str(instance["port"]),
        "CRATE_APP_ID": str(plan["app_id"]),
        "CRATE_INSTANCE_ID": instance["instance_id"],
        "CRATE_VERSION": plan["version"],
        "CRATE_DEPLOYMENT_ID": str(plan["deployment_id"]),
    })
    return env


# Unit properties that BinaryRuntime.check reads.
_UNIT_CHECK_PROPS = ("LoadState", "ActiveState", "SubState", "Result",
                     "ExecMainCode", "ExecMainStatus", "NRestarts")


class BinaryRuntime:
    """Prepare, start, stop, check and remove binary instances.

    One systemd unit per instance, an EnvironmentFile next to it, and a
    read-only release directory per version and deployment.  Releases
    older than the newest release_retention are pruned, except those that
    an instance of the app still points at.
    """

    kind = "binary"
    # An in-place update of a running instance is one systemctl restart of
    # its unit, which stops the old process and starts the new one.
    restarts_in_place = True
    # The app's own process listens on the instance's port, so a health
    # check can wait for the port to accept connections (see
    # wait_for_listener).
    app_listens_on_host = True

    def __init__(self, config: Config, systemd: Systemd,
                 store: Store | None = None):
        self.config = config
        self.systemd = systemd
        self.store = store

    # --- paths

    def app_dir(self, app_id: int) -> str:
        """Return the directory of one app under apps_dir."""
        return os.path.join(self.config.apps_dir, str(int(app_id)))

    def env_path(self, app_id: int, name: str) -> str:
        """Return the EnvironmentFile path of the instance named ``name``."""
        return os.path.join(self.app_dir(app_id), "env", f"{name}.env")

    def releases_dir(self, app_id: int) -> str:
        """Return the directory holding every release of one app."""
        return os.path.join(self.app_dir(app_id), "releases")

    def release_path(self, app_id: int, version: str, deployment_id) -> str:
        """Return the release directory of one version and deployment."""
        return os.path.join(self.app_dir(app_id), "releases",
                            f"{version}-{deployment_id}")

    def _record_path(self, app_id: int, name: str) -> str:
        # Release records live in a dot directory, which no release name
        # can clash with because versions start with a letter or digit.
        return os.path.join(self.releases_dir(app_id), ".meta", f"{name}.json")

    def archive_limits(self) -> ArchiveLimits:
        """Return the unpacking limits from the configuration."""
        return ArchiveLimits(max_members=self.config.max_archive_members,
                             max_bytes=self.config.max_unpacked_bytes)

    # --- prepare

    def prepare(self, plan: dict) -> dict:
        """Return the release of a plan as {"release", "sha256", "argv"}.

        A retained release of the same version and asset_url (and
        asset_sha256, when given) is reused.  Otherwise the asset is
        downloaded, verified and unpacked into a new release.  Old releases
        are pruned afterwards.  ``argv`` may contain PORT_MARK.
        """
        app_id = plan["app_id"]
        os.makedirs(self.releases_dir(app_id), mode=0o755, exist_ok=True)
        os.chmod(self.app_dir(app_id), 0o755)
        release = self._reusable_release(plan)
        if release is None:
            release = self._new_release(plan)
        self.prune_releases(app_id, os.path.basename(release["release"]))
        return release

    def _new_release(self, plan: dict) -> dict:
        """Download, verify and unpack the asset of ``plan`` into a release."""
        app_id = plan["app_id"]
        ids = {"app_id": app_id, "deployment_id": plan["deployment_id"]}
        releases = self.releases_dir(app_id)
        release = self.release_path(app_id, plan["version"],
                                    plan["deployment_id"])
        staging = tempfile.mkdtemp(prefix=".staging-", dir=releases)
        tree = os.path.join(staging, "tree")
        try:
            # The digest is checked before a single member is unpacked.
            asset = os.path.join(staging, "asset")
            digest = download(plan["asset_url"], asset,
                              self.config.max_asset_bytes,
                              self.config.download_timeout_s, ids,
                              OutboundPolicy.from_config(self.config))
            self._check_digest(plan, digest)

            kind = asset_kind(asset)
            os.mkdir(tree, 0o700)
            stats = unpack_asset(asset, kind, tree, self.archive_limits())
            seal_tree(tree)
            command = release_command(tree)

            if os.path.lexists(release):
                _remove_tree(release)
            os.rename(tree, release)
            fsync_dir(releases)
        finally:
            _remove_tree(staging)
        if command[0].startswith(tree + os.sep):
            command[0] = release + command[0][len(tree):]

        name = os.path.basename(release)
        now = time.time()
        self._write_record(app_id, {
            "name": name, "version": plan["version"],
            "deployment_id": plan["deployment_id"],
            "asset_url_sha256": _url_digest(plan["asset_url"]),
            "sha256": digest, "kind": kind, "created_at": now,
            "used_at": now})
        log("release.unpacked", release=name, asset_kind=kind,
            members=stats["members"], bytes=stats["bytes"], **ids)
        return {"release": release, "sha256": digest, "argv": command}

    def _check_digest(self, plan: dict, digest: str) -> None:
        expected = plan.get("asset_sha256")
        if expected and not hmac.compare_digest(expected, digest):
            raise FetchError(f"asset sha256 is {digest}, but asset_sha256 "
                             f"expects {expected}; check the asset")

    # --- release records, reuse and pruning

    def _write_record(self, app_id: int, record: dict) -> None:
        # Without fsync: the release is durable before its record is
        # written, and a record that a power loss empties or loses is
        # skipped by release_records, so the release is downloaded again
        # instead of reused, and pruned by its age like any other.
        path = self._record_path(app_id, record["name"])
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        atomic_write_json(path, record, 0o600, sync=False)

    def release_records(self, app_id: int) -> list:
        """Return the records of the app's releases whose directory exists."""
        meta_dir = os.path.dirname(self._record_path(app_id, "x"))
        records = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(meta_dir)):
                if not entry.endswith(".json") or entry.startswith("."):
                    continue
                try:
                    record = read_json(os.path.join(meta_dir, entry))
                except ValueError:
                    continue
                name = record.get("name") if isinstance(record, dict) else None
                if name != entry[:-len(".json")]:
                    continue
                if os.path.isdir(os.path.join(self.releases_dir(app_id),
                                              name)):
                    records.append(record)
        return records

    def _reusable_release(self, plan: dict) -> dict | None:
        """Return a retained release that matches ``plan``, or None."""
        app_id = plan["app_id"]
        expected = plan.get("asset_sha256")
        url_digest = _url_digest(plan["asset_url"])
        matches = [record for record in self.release_records(app_id)
                   if record.get("version") == plan["version"]
                   and record.get("asset_url_sha256") == url_digest
                   and (not expected or record.get("sha256") == expected)]
        if not matches:
            return None
        record = max(matches, key=lambda item: item.get("used_at", 0))
        path = os.path.join(self.releases_dir(app_id), record["name"])
        argv = release_command(path)
        record["used_at"] = time.time()
        self._write_record(app_id, record)
        log("release.reused", release=record["name"],
            version=plan["version"], app_id=app_id,
            deployment_id=plan["deployment_id"])
        return {"release": path, "sha256": record["sha256"], "argv": argv}

    def _releases_in_use(self, app_id: int) -> set:
        """Return the release names that an instance of the app points at.

        They include the serving release and the previous one, which a
        failed deployment restores.
        """
        if self.store is None:
            return set()
        app = self.store.app(app_id) or {}
        return {os.path.basename(instance["release"])
                for instance in app.get("instances", {}).values()
                if instance.get("release")}

    def prune_releases(self, app_id: int, current: str) -> None:
        """Delete releases past release_retention, never ones in use.

        The newest releases (by last deployment) are kept, plus ``current``
        and every release an instance points at.  Staging directories left
        by an interrupted deployment are deleted too; one job at a time
        runs per app, so none of them is in use.  Errors are logged, never
        raised: a failed prune must not fail a deployment.
        """
        try:
            self._prune(app_id, {current} | self._releases_in_use(app_id))
        except OSError as exc:
            log("release.prune_failed", logging.WARNING, error=str(exc),
                app_id=app_id)

    def _prune(self, app_id: int, keep: set) -> None:
        releases = self.releases_dir(app_id)
        used = {record["name"]: record.get("used_at", 0)
                for record in self.release_records(app_id)}
        names = []
        for name in os.listdir(releases):
            path = os.path.join(releases, name)
            if name.startswith(".staging-"):
                _remove_tree(path)
            elif not name.startswith(".") and os.path.isdir(path) \
                    and not os.path.islink(path):
                names.append(name)
        names.sort(key=lambda name: used.get(name) or
                   os.lstat(os.path.join(releases, name)).st_mtime,
                   reverse=True)
        for name in names[self.config.release_retention:]:
            if name in keep:
                continue
            _remove_tree(os.path.join(releases, name))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._record_path(app_id, name))
            log("release.pruned", release=name, app_id=app_id)

    # --- install, start, stop

    def instance_env(self, plan: dict, instance: dict) -> dict:
        """Return the environment of one instance: env_vars, PORT, CRATE_*."""
        return instance_environment(plan, instance)

    def snapshot(self, app_id: int, name: str) -> dict:
        """Return the current unit and env file texts, for a later restore.

        ``name`` is the instance's unit stem: the slot name in the slots
        model, "<instance_id>.<color>" in the instances model.
        """
        env_path = self.env_path(app_id, name)
        unit = unit_name(app_id, name)
        env_text = None
        with contextlib.suppress(FileNotFoundError):
            with open(env_path, "rb") as handle:
                env_text = handle.read()
        snap = {"unit": self.systemd.read_unit(unit), "env": env_text}
        self._write_backup(app_id, name, snap)
        return snap

    def _backup_path(self, app_id: int, name: str) -> str:
        return os.path.join(self.app_dir(app_id), "backup", f"{name}.json")

    def _write_backup(self, app_id: int, name: str, snap: dict) -> None:
        """Keep a snapshot on disk so recovery after a crash can restore it.

        The file holds the env file's bytes, so it gets the env file's
        protection: mode 0600 in a 0700 directory under apps_dir.
        """
        path = self._backup_path(app_id, name)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        env = snap["env"]
        data = {"unit": snap["unit"],
                "env": base64.b64encode(env).decode() if env is not None
                else None}
        atomic_write_json(path, data)

    def restore_backup(self, app_id: int, name: str) -> bool:
        """Restore the on-disk snapshot of ``name``; False when none."""
        data = read_json(self._backup_path(app_id, name))
        if data is None:
            return False
        env = data["env"]
        self.restore(app_id, name, {
            "unit": data["unit"],
            "env": base64.b64decode(env) if env is not None else None})
        return True

    def finish_job(self, app_id: int) -> None:
        """Delete the snapshots of a finished job."""
        path = os.path.join(self.app_dir(app_id), "backup")
        if os.path.isdir(path):
            shutil.rmtree(path)

    def restore(self, app_id: int, name: str, snap: dict) -> None:
        """Put back the unit and env file texts saved by snapshot."""
        unit = unit_name(app_id, name)
        env_path = self.env_path(app_id, name)
        if snap["unit"] is None:
            self.systemd.remove_unit(unit)
        else:
            self.systemd.write_unit(unit, snap["unit"])
        if snap["env"] is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(env_path)
        else:
            atomic_write(env_path, snap["env"], 0o600)

    def install(self, plan: dict, instance: dict, release: dict) -> None:
        """Write the env file and unit of one instance (reload follows)."""
        app_id = plan["app_id"]
        env_path = self.env_path(app_id, instance["name"])
        os.makedirs(os.path.dirname(env_path), mode=0o700, exist_ok=True)
        text = render_env_file(self.instance_env(plan, instance))
        atomic_write(env_path, text.encode("utf-8"), 0o600)
        port = str(instance["port"])
        argv = [word.replace(PORT_MARK, port) for word in release["argv"]]
        unit = render_unit({
            "app_id": app_id, "instance_id": instance["instance_id"],
            "version": plan["version"], "deployment_id": plan["deployment_id"],
            "exec_argv": argv, "workdir": release["release"],
            "env_file": env_path, "app_user": self.config.app_user,
            "stop_timeout_s": self.config.stop_timeout_s,
            "restart_sec_s": self.config.restart_sec_s,
            "limits": plan.get("limits"),
        })
        self.systemd.write_unit(instance["unit"], unit)

    def start(self, instance: dict) -> None:
        """Start an instance whose port must be free."""
        if _port_in_use(instance["port"]):
            raise StepError(f"port {instance['port']} of instance "
                            f"{instance['instance_id']} is already in use by "
                            f"another process; free it or choose another port")
        self.systemd.enable_and_start(instance["unit"])

    def restart(self, instance: dict) -> None:
        """Restart the running unit of ``instance`` from its new unit file.

        The old process of the same unit holds the port until systemd
        stops it, so the port is not checked here: the caller checks after
        the health check that a new socket listens on the port (see
        Strategies._in_place).  A
        running unit is enabled already: the operator enabled it when it
        started it, and the reconciler enables it again when someone
        disabled it (see check).
        """
        self.systemd.restart(instance["unit"])

    def stop(self, instance: dict) -> None:
        """Stop an instance and keep it from starting at boot."""
        self.systemd.disable_and_stop(instance["unit"])

    def problem(self, instance: dict) -> str | None:
        """Return why an instance is not running, or None when it runs."""
        return self.check(instance)[0]

    def check(self, instance: dict) -> tuple:
        """Return (why the instance is not running or None, boot problem).

        The boot problem is None, or says that the unit runs but is
        disabled, so it would not start after a reboot.  The first comes
        from one systemctl show, the second from the unit's symlink in
        the .wants directory (see Systemd.enable).
        """
        props = self.systemd.show(instance["unit"], *_UNIT_CHECK_PROPS)
        return self._judge(instance, props)

    def check_many(self, instances: list) -> dict:
        """Return {unit: check(instance)} for many instances, with one
        systemctl call per SHOW_MANY_UNITS units instead of one each."""
        units = sorted({instance["unit"] for instance in instances})
        shown = self.systemd.show_many(units, *_UNIT_CHECK_PROPS)
        return {instance["unit"]: self._judge(instance,
                                              shown.get(instance["unit"], {}))
                for instance in instances}

    def _judge(self, instance: dict, props: dict) -> tuple:
        """Return the check() result for the shown properties of a unit."""
        active = props.get("ActiveState")
        if active in ("active", "activating", "reloading") and \
                props.get("SubState") != "auto-restart":
            if not self.systemd.is_enabled(instance["unit"]):
                return None, (f"unit {instance['unit']} runs but is "
                              f"disabled, so it would not start at boot")
            return None, None
        if props.get("LoadState") != "loaded":
            return f"unit {instance['unit']} is {props.get('LoadState')}", None
        status = props.get("ExecMainStatus", "?")
        code = {"1": "exit status", "2": "signal", "3": "dumped core, signal"}
        how = code.get(props.get("ExecMainCode", ""), "status")
        return (f"unit {instance['unit']} is {active}/{props.get('SubState')} "
                f"(result {props.get('Result')}, {how} {status}, "
                f"{props.get('NRestarts', '0')} restarts)"), None

    def enable(self, instance: dict) -> None:
        """Start the unit of a running instance at boot again."""
        self.systemd.enable(instance["unit"])

    # --- names and checks used by the strategies

    def describe_source(self, plan: dict) -> str:
        """Return what prepare fetches, for the step log (no query string)."""
        return redact_url(plan["asset_url"])

    def instance_name(self, plan: dict, instance_id: str) -> str:
        """Return the unit name of one instance."""
        return unit_name(plan["app_id"], instance_id)

    def reload(self) -> None:
        """Load the unit files that install wrote (a coalesced reload)."""
        self.systemd.daemon_reload()

    def probe(self, instance: dict, path: str | None) -> tuple:
        """Return (ready, detail): the HTTP path answers, or the port accepts."""
        if path:
            return probe_http(instance["port"], path)
        return probe_tcp(instance["port"])

    def remove_app(self, app_id: int) -> list:
        """Delete what is left of an app: releases, env files, data.

        Unit files of instances no record names are removed too, so a
        record lost in a crash leaves nothing behind.
        """
        removed = []
        prefix = f"{UNIT_PREFIX}{int(app_id)}-"
        for name in sorted(os.listdir(self.systemd.unit_dir)):
            if name.startswith(prefix) and name.endswith(".service"):
                self.systemd.disable(name)
                self.systemd.stop(name)
                self.systemd.remove_unit(name)
                removed.append(f"unit {name}")
        if removed:
            self.systemd.daemon_reload()
        return removed + _remove_app_dir(self, app_id)

    def remove(self, instance: dict) -> None:
        """Stop an instance and delete its unit and env file."""
        self.stop(instance)
        self.systemd.remove_unit(instance["unit"])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.env_path(instance["app_id"], instance["name"]))


def _remove_app_dir(runtime, app_id: int) -> list:
    """Delete an app's directory (releases, env files, data)."""
    path = runtime.app_dir(app_id)
    if not os.path.lexists(path):
        return []
    _remove_tree(path)
    return [f"directory {path}"]


def _url_digest(url: str) -> str:
    """Return the SHA-256 of an asset URL, stored instead of the URL.

    The query string may carry a token, which must not land on disk.
    """
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def _remove_tree(path: str) -> None:
    """Delete a directory tree, read-only releases included."""
    if not os.path.lexists(path):
        return

    def make_writable(func, target, _exc):
        os.chmod(os.path.dirname(target), 0o700)
        with contextlib.suppress(OSError):
            os.chmod(target, 0o700)
        func(target)

    for root, dirs, _files in os.walk(path):
        os.chmod(root, 0o700)
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), 0o700)
    shutil.rmtree(path, onerror=make_writable)


# === Docker runtime ===

# Labels on every container (and named volume) this program creates. A
# container without LABEL_MANAGED=1 is never removed or changed.
LABEL_MANAGED = "crate.managed"
LABEL_APP = "crate.app_id"
LABEL_INSTANCE = "crate.instance_id"
# The instance's unit stem: the slot name, or "<instance_id>.<color>" in the
# instances model, where a bluegreen sibling runs beside the old container
# of the same instance id.
LABEL_NAME = "crate.name"
LABEL_DEPLOYMENT = "crate.deployment_id"
LABEL_VERSION = "crate.version"
LABEL_TEAM = "crate.team_id"
LABEL_ENVIRONMENT = "crate.environment_id"
CONTAINER_PREFIX = "crate-"
# Most processes and threads one container may run (a fork bomb stops here).
DOCKER_PIDS_LIMIT = 512
# Time a probe connection through docker-proxy must stay open to count as
# accepted by the container.
DOCKER_PROXY_PROBE_S = 0.3
# Container states in which an instance counts as down.
_CONTAINER_DOWN = ("created", "restarting", "paused", "exited", "dead",
                   "removing")


def container_name(app_id: int, instance_id: str, deployment_id) -> str:
    """Return the container name of one instance of one deployment."""
    return f"{CONTAINER_PREFIX}{int(app_id)}-{instance_id}-{deployment_id}"


def volume_name(app_id: int, name: str) -> str:
    """Return the docker volume name of an app's named volume."""
    return f"{CONTAINER_PREFIX}{int(app_id)}-{name}"


def split_volume_spec(spec: str) -> tuple:
    """Return (source, target, read_only) of a validated SRC:DST[:ro|rw]."""
    parts = spec.split(":")
    read_only = len(parts) == 3 and parts[2] == "ro"
    return parts[0], _volume_target(parts[1]), read_only


def probe_published_port(port: int) -> tuple:
    """Return (ready, detail) for a port that docker-proxy publishes.

    docker-proxy accepts every connection and closes it at once when
    nothing listens in the container, so an accepted connection proves
    nothing. The port counts as ready when the connection stays open for
    DOCKER_PROXY_PROBE_S or the container sends data first.
    """
    try:
        sock = socket.create_connection(("127.0.0.1", port),
                                        timeout=HEALTH_PROBE_TIMEOUT_S)
    except ConnectionRefusedError:
        return False, PROBE_REFUSED
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    with sock:
        sock.settimeout(DOCKER_PROXY_PROBE_S)
        try:
            data = sock.recv(1)
        except socket.timeout:
            return True, "port accepts connections"
        except OSError as exc:
            return False, f"connection reset ({type(exc).__name__})"
    if data:
        return True, "port accepts connections"
    return False, "connection closed at once (nothing listens in the container)"


def _resolved_inside(base: str, source: str) -> str | None:
    """Return the real path of base/source when it is strictly inside base.

    Symlinks are resolved, also in parts that exist already, so a link that
    an app wrote into its data directory cannot point a mount elsewhere.
    """
    real_base = os.path.realpath(base)
    resolved = os.path.realpath(os.path.join(real_base, source))
    if resolved != real_base and \
            os.path.commonpath([real_base, resolved]) == real_base:
        return resolved
    return None


class DockerRuntime:
    """Prepare, start, stop, check and remove docker instances.

    One container per instance and deployment (container_name), labelled
    with its ids and publishing its port on 127.0.0.1 only. The interface is
    BinaryRuntime's; nothing here depends on the request model. Containers
    run as app_user's uid:gid, or 65534:65534 when app_user is "dynamic",
    and the data directories of bind mounts belong to the same ids.
    """

    kind = "docker"
    # The new container of an in-place update is another container, so the
    # old one is stopped first (both bind the same port).
    restarts_in_place = False
    # docker-proxy listens on the published port from the container's
    # start, before the app inside does.
    app_listens_on_host = False

    def __init__(self, config: Config, client: DockerClient):
        self.config = config
        self.client = client
        # Removals of replaced containers that install started, by app id;
        # finish_job waits for them.
        self._removals: dict = {}
        self._removals_lock = threading.Lock()

    # --- paths, names and identity

    def data_dir(self, app_id: int) -> str:
        """Return the directory that relative bind sources start from."""
        return os.path.join(self.config.apps_dir, str(int(app_id)), "data")

    def identity(self) -> tuple:
        """Return (uid, gid) that containers run as and data dirs belong to.

        A DynamicUser has no fixed uid that a container could share, so
        app_user "dynamic" maps to nobody:nogroup (65534:65534).
        """
        if self.config.app_user == "dynamic":
            return NOBODY_UID, NOBODY_GID
        try:
            entry = pwd.getpwnam(self.config.app_user)
        except KeyError:
            raise StepError(f"app_user {self.config.app_user!r} does not exist "
                            f"on this host; create it or set app_user to "
                            f"dynamic") from None
        return entry.pw_uid, entry.pw_gid

    def describe_source(self, plan: dict) -> str:
        """Return the image reference that prepare pulls."""
        return image_reference(plan["image"], plan["image_tag"])

    def instance_name(self, plan: dict, instance_id: str) -> str:
        """Return the container name of one instance of this deployment."""
        return container_name(plan["app_id"], instance_id,
                              plan["deployment_id"])

    def _labels(self, app_id: int, name: str) -> dict:
        return {LABEL_MANAGED: "1", LABEL_APP: str(int(app_id)),
                LABEL_NAME: name}

    # --- request checks

    def check_plan(self, plan: dict) -> None:
        """Reject bind sources that leave the app data directory.

        Runs before a deployment is accepted, so such a request is a 400
        with nothing created; install checks again before each mount.
        """
        errors = []
        for index, spec in enumerate(plan.get("volumes") or []):
            source = split_volume_spec(spec)[0]
            if "/" not in source:
                continue
            if _resolved_inside(self.data_dir(plan["app_id"]), source) is None:
                errors.append({
                    "field": f"$.volumes[{index}]",
                    "reason": ("source must stay inside the app data "
                               "directory once symlinks are resolved")})
        if errors:
            raise RequestError("invalid request", errors)

    # --- prepare

    def prepare(self, plan: dict) -> dict:
        """Pull the image tag or digest with the request's credentials."""
        image, tag = plan["image"], plan["image_tag"]
        credentials = plan.get("registry_credentials")
        header, hidden = None, []
        if credentials:
            header = registry_auth_header(credentials, image)
            hidden = [credentials["password"], header]
        reference = image_reference(image, tag)
        log("docker.pull", image=image, tag=tag,
            credentials=bool(credentials), app_id=plan["app_id"],
            deployment_id=plan["deployment_id"])
        self.client.pull(image, tag, header, hidden)
        details = self.client.inspect_image(reference)
        if details is None:
            raise DockerError(f"pull of {reference} ended without an error, "
                              f"but dockerd has no such image afterwards")
        return {"release": reference, "image": image, "tag": tag,
                "image_id": details.get("Id")}

    # --- snapshot and restore

    def _containers(self, app_id: int, instance_id: str) -> list:
        """Return (name, state) of this program's containers of an instance."""
        found = []
        for item in self.client.list_containers(
                self._labels(app_id, instance_id)):
            names = item.get("Names") or ["/" + item.get("Id", "")]
            found.append((names[0].lstrip("/"), item.get("State")))
        return sorted(found)

    def snapshot(self, app_id: int, instance_id: str) -> dict:
        """Return the names of the instance's containers, for restore."""
        return {"containers": [name for name, _ in
                               self._containers(app_id, instance_id)]}

    def restore(self, app_id: int, instance_id: str, snap: dict) -> None:
        """Remove the instance's containers created after the snapshot."""
        for name, _state in self._containers(app_id, instance_id):
            if name not in snap["containers"]:
                self.client.remove_container(name)
                log("docker.container_removed", container=name,
                    reason="rollback", app_id=app_id)

    # --- install, start, stop

    def install(self, plan: dict, instance: dict, release: dict) -> None:
        """Create the instance's container (not started) and its mounts."""
        mounts = self._mounts(plan)
        self._remove_stopped(plan["app_id"], instance["name"], instance["unit"])
        config = self._container_config(plan, instance, release, mounts)
        name = instance["unit"]
        try:
            self.client.create_container(name, config)
            return
        except DockerError as exc:
            if exc.http_status != 409:
                raise
        self._clear_name(name)
        self.client.create_container(name, config)

    def _remove_stopped(self, app_id: int, instance_id: str,
                        new_name: str) -> None:
        """Remove stopped containers of earlier deployments of an instance.

        They never serve again: the instance is about to get a new
        container, and a running one (the live version during an in-place
        update) is kept. The list is read now, before the strategy stops
        the live one, which a rollback starts again. One that holds
        new_name (left by an unfinished attempt of this deployment) is
        removed at once; the others in a helper thread beside the create
        and start (a removal took about 9 ms here), and finish_job waits
        for them.
        """
        stopped = []
        for name, state in self._containers(app_id, instance_id):
            if state == "running":
                continue
            if name == new_name:
                self._remove_containers(app_id, [(name, state)])
            else:
                stopped.append((name, state))
        if not stopped:
            return
        thread = threading.Thread(
            target=self._remove_containers, args=(app_id, stopped),
            name=f"docker-remove-{app_id}", daemon=True)
        with self._removals_lock:
            self._removals.setdefault(int(app_id), []).append(thread)
        thread.start()

    def _remove_containers(self, app_id: int, containers: list) -> None:
        for name, state in containers:
            try:
                self.client.remove_container(name)
            except DockerError as exc:
                # A stopped container only takes disk space; the next
                # deployment of the instance tries again.
                log("docker.container_remove_failed", logging.WARNING,
                    container=name, state=state, error=str(exc),
                    app_id=app_id)
                continue
            log("docker.container_removed", container=name,
                reason="replaced", state=state, app_id=app_id)

    def _clear_name(self, name: str) -> None:
        """Free a container name that another container holds, if it is ours.

        Only a stopped container with this program's label is removed; any
        other holder stays, and the deployment fails with a clear message.
        """
        details = self.client.inspect_container(name)
        if details is None:
            return
        labels = (details.get("Config") or {}).get("Labels") or {}
        state = (details.get("State") or {}).get("Status")
        if labels.get(LABEL_MANAGED) != "1":
            raise StepError(
                f"container name {name} is taken by a container that "
                f"crate-operator did not create (no {LABEL_MANAGED}=1 "
                f"label); it was left alone. Remove or rename it, then "
                f"deploy again")
        if state == "running":
            raise StepError(
                f"container {name} from an earlier attempt of this "
                f"deployment is still running; stop it or deploy with a new "
                f"deployment_id")
        self.client.remove_container(name)
        log("docker.container_removed", container=name, reason="stale",
            state=state)

    def _mounts(self, plan: dict) -> list:
        """Return HostConfig.Mounts, creating missing data directories."""
        app_id = plan["app_id"]
        mounts = []
        for spec in plan.get("volumes") or []:
            source, target, read_only = split_volume_spec(spec)
            if "/" in source:
                mounts.append({"Type": "bind", "Target": target,
                               "Source": self._bind_source(app_id, source),
                               "ReadOnly": read_only})
                continue
            mounts.append({
                "Type": "volume", "Source": volume_name(app_id, source),
                "Target": target, "ReadOnly": read_only,
                "VolumeOptions": {"Labels": {LABEL_MANAGED: "1",
                                             LABEL_APP: str(int(app_id))}},
            })
        return mounts

    def _bind_source(self, app_id: int, source: str) -> str:
        """Return the real host path of a bind source, creating it if missing.

        Missing directories are created here with the container's uid and
        gid. dockerd would not create them, because a bind Mount with a
        missing source fails (and Binds would create them owned by root).
        The check runs again after creating, because the app may add
        symlinks to its data directory at any time.
        NOTE: a container that replaces a checked directory with a symlink
        between this check and dockerd's mount can still redirect the
        mount; only a container of the same app can write there.
        """
        base = self.data_dir(app_id)
        uid, gid = self.identity()
        os.makedirs(os.path.dirname(base), mode=0o755, exist_ok=True)
        self._make_owned_dir(base, uid, gid)
        resolved = _resolved_inside(base, source)
        if resolved is None:
            raise StepError(f"volume source {source!r} leaves the app data "
                            f"directory once symlinks are resolved")
        current = os.path.realpath(base)
        for part in os.path.relpath(resolved, current).split(os.sep):
            current = os.path.join(current, part)
            self._make_owned_dir(current, uid, gid)
        if _resolved_inside(base, source) != resolved:
            raise StepError(f"volume source {source!r} changed while its "
                            f"directories were created; deploy again")
        return resolved

    @staticmethod
    def _make_owned_dir(path: str, uid: int, gid: int) -> None:
        """Create a directory owned by uid:gid, mode 0750, unless it exists."""
        try:
            os.mkdir(path, 0o750)
        except FileExistsError:
            return
        os.chown(path, uid, gid)

    def _container_config(self, plan: dict, instance: dict, release: dict,
                          mounts: list) -> dict:
        """Return the body of POST /containers/create for one instance."""
        port_key = f"{instance['port']}/tcp"
        env = instance_environment(plan, instance)
        uid, gid = self.identity()
        labels = self._labels(plan["app_id"], instance["name"])
        labels.update({
            LABEL_INSTANCE: instance["instance_id"],
            LABEL_DEPLOYMENT: str(plan["deployment_id"]),
            LABEL_VERSION: plan["version"],
            LABEL_TEAM: plan["team_id"],
            LABEL_ENVIRONMENT: str(plan["environment_id"]),
        })
        config = {
            "Image": release["release"],
            "Env": [f"{name}={env[name]}" for name in sorted(env)],
            "Labels": labels,
            "User": f"{uid}:{gid}",
            # dockerd publishes only ports listed here; PortBindings alone
            # are ignored without an error.
            "ExposedPorts": {port_key: {}},
            "StopTimeout": int(math.ceil(self.config.stop_timeout_s)),
            "HostConfig": {
                "PortBindings": {port_key: [
                    {"HostIp": "127.0.0.1", "HostPort": str(instance["port"])}
                ]},
                "RestartPolicy": {"Name": "unless-stopped"},
                "LogConfig": {"Type": "json-file", "Config": {
                    "max-size": DOCKER_LOG_MAX_SIZE,
                    "max-file": DOCKER_LOG_MAX_FILES}},
                "Mounts": mounts,
                "SecurityOpt": ["no-new-privileges"],
                # A web app needs no capability to bind its port above 1024
                # as a non-root user.
                "CapDrop": ["ALL"],
                "PidsLimit": DOCKER_PIDS_LIMIT,
            },
        }
        limits = plan.get("limits") or {}
        if limits.get("memory_mb"):
            config["HostConfig"]["Memory"] = limits["memory_mb"] << 20
        if limits.get("cpu_percent"):
            # NanoCpus counts billionths of one CPU.
            config["HostConfig"]["NanoCpus"] = limits["cpu_percent"] * 10 ** 7
        if plan.get("docker_command"):
            config["Cmd"] = list(plan["docker_command"])
        return config

    def reload(self) -> None:
        """Do nothing: dockerd reads a container's config when it is created."""

    def start(self, instance: dict) -> None:
        """Start an instance's container; its port must be free.

        Other running containers of the same instance are removed first.
        None of them serves: the strategies stop the serving container of
        an instance before starting its replacement, so such a container
        is left over from a deployment that the operator did not finish.
        """
        self._remove_leftovers(instance)
        if _port_in_use(instance["port"]):
            raise StepError(f"port {instance['port']} of instance "
                            f"{instance['instance_id']} is already in use by "
                            f"another process; free it or choose another port")
        self.client.start_container(instance["unit"])

    def _remove_leftovers(self, instance: dict) -> None:
        details = self.client.inspect_container(instance["unit"]) or {}
        labels = (details.get("Config") or {}).get("Labels") or {}
        if LABEL_APP not in labels:
            return
        for name, state in self._containers(int(labels[LABEL_APP]),
                                            instance["name"]):
            if name != instance["unit"] and state == "running":
                self.client.remove_container(name)
                log("docker.container_removed", logging.WARNING,
                    container=name, reason="left running by an unfinished "
                    "deployment", app_id=labels[LABEL_APP])

    def stop(self, instance: dict) -> None:
        """Stop a container (stop_timeout_s, then SIGKILL); it stays stopped."""
        self.client.stop_container(instance["unit"],
                                   self.config.stop_timeout_s)

    def restore_backup(self, app_id: int, name: str) -> bool:
        """Containers keep no file snapshots; recovery removes new ones."""
        return False

    def finish_job(self, app_id: int) -> None:
        """Wait for the removals of replaced containers that install started
        for the app's job. Containers keep no file snapshots to drop."""
        with self._removals_lock:
            threads = self._removals.pop(int(app_id), [])
        for thread in threads:
            thread.join(DOCKER_CALL_TIMEOUT_S)

    def remove_app(self, app_id: int) -> list:
        """Remove every container and named volume this program made for
        an app; the data directory goes with the app directory."""
        removed = []
        labels = {LABEL_MANAGED: "1", LABEL_APP: str(int(app_id))}
        for item in self.client.list_containers(labels):
            name = (item.get("Names") or ["/" + item.get("Id", "")])[0]
            self.client.remove_container(name.lstrip("/"))
            removed.append(f"container {name.lstrip('/')}")
        for name in self.client.list_volumes(labels):
            self.client.remove_volume(name)
            removed.append(f"volume {name}")
        return removed

    def remove(self, instance: dict) -> None:
        """Stop and remove an instance's container; named volumes stay."""
        self.stop(instance)
        self.client.remove_container(instance["unit"])

    # --- health

    def check(self, instance: dict) -> tuple:
        """Return (problem(instance), None): a container with its restart
        policy starts with dockerd, so it has no boot problem."""
        return self.problem(instance), None

    def check_many(self, instances: list) -> dict:
        """Return {container name: check(instance)}: one inspect each,
        since an Engine API call costs no process start."""
        return {instance["unit"]: self.check(instance)
                for instance in instances}

    def problem(self, instance: dict) -> str | None:
        """Return why an instance is not running, or None when it runs."""
        name = instance["unit"]
        details = self.client.inspect_container(name)
        if details is None:
            return f"container {name} does not exist"
        state = details.get("State") or {}
        status = state.get("Status")
        health = state.get("Health") or {}
        if status == "running":
            if health.get("Status") == "unhealthy":
                return (f"container {name} is unhealthy according to its "
                        f"image's HEALTHCHECK: {_last_health_output(health)}")
            return None
        if status not in _CONTAINER_DOWN:
            return None
        notes = [f"exit code {state.get('ExitCode')}",
                 f"{details.get('RestartCount', 0)} restarts"]
        if state.get("OOMKilled"):
            notes.append("killed for lack of memory")
        if state.get("Error"):
            notes.append(f"error: {state['Error']}")
        return f"container {name} is {status} ({', '.join(notes)})"

    def probe(self, instance: dict, path: str | None) -> tuple:
        """Return (ready, detail): HTTP path or port check, then HEALTHCHECK.

        With a HEALTHCHECK in the image the container must also report
        healthy; without one State.Running is enough (problem checks it).
        """
        if path:
            ready, detail = probe_http(instance["port"], path)
        else:
            ready, detail = probe_published_port(instance["port"])
        if not ready:
            return ready, detail
        details = self.client.inspect_container(instance["unit"]) or {}
        health = (details.get("State") or {}).get("Health") or {}
        if health and health.get("Status") != "healthy":
            return False, (f"{detail}, but the image's HEALTHCHECK reports "
                           f"{health.get('Status')}")
        return True, detail


def _last_health_output(health: dict) -> str:
    """Return the output of the last HEALTHCHECK run, shortened."""
    entries = health.get("Log") or []
    if not entries:
        return "no check has finished yet"
    last = entries[-1]
    output = str(last.get("Output") or "").strip()[:300]
    return f"exit code {last.get('ExitCode')}: {output or '(no output)'}"


# === Deploy engine ===

# Every step a deploy job can record, in the order they run.  Recovery and
# the crash tests enumerate this list.
STEP_NAMES = (
    "fetch_asset",
    "write_unit",
    "daemon_reload",  # runtime.reload(): a no-op for docker
    "start_instance",
    "health_check",
    "switch_route",
    "canary_step",
    "canary_watch",
    "drain",
    "stop_old",
    "rollback",
    "stop_instance",
    "remove_instance",
    "remove_route",
)


# Steps that change nothing recovery reads: it decides by the journal,
# stored with the start entry of write_unit before any unit is written,
# and by whether a step that moves traffic (stop_old, switch_route,
# canary_step) started.  Their start entries are stored without fsync, so
# a power loss may leave a record whose last entry is the step before (see
# DeployJob._save_needs_flush for the other saves that skip the flush).  A
# crash of the operator process loses none of them.
PROGRESS_STEPS = frozenset({
    "fetch_asset", "daemon_reload", "start_instance", "health_check",
    "canary_watch", "drain",
})


STATUS_KEYS = ("deployment_id", "app_id", "kind", "model", "strategy",
               "action", "state", "error", "created_at", "started_at",
               "finished_at", "target_version", "serving_version", "domain",
               "steps", "instances", "allocations", "changes")


def status_document(record: dict) -> dict:
    """Return the public status document of a deployment record.

    The values are the record's own, not copies: both callers serialize
    the document at once (a deep copy took twice as long as the JSON
    encoding of a finished record).
    """
    return {key: record.get(key) for key in STATUS_KEYS}


def instance_view(instance: dict) -> dict:
    """Return the public fields of one instance (image and tag for docker)."""
    keys = ["instance_id", "slot", "port", "version", "state", "unit"]
    if instance.get("kind") == "docker":
        keys += ["image", "tag"]
    return {key: instance.get(key) for key in keys}


class DeployJob:
    """One deployment of one app, run by the job runner.

    ``run`` executes the strategy; every step is written to the deployment
    record before and after it runs, and every state change is sent to the
    callback outbox.
    """

    # A deploy changes nothing on the host before its first step, whose
    # start entry is saved before the step runs.  So the "running" state is
    # stored and sent with that entry, one write instead of two.  A crash
    # before it leaves the record queued, which start-up marks failed.
    # Lifecycle jobs store it at once, because a stop changes the route
    # before its first step.
    defers_running = True

    def __init__(self, operator, record: dict, plan: dict):
        self.op = operator
        self.record = record
        self.plan = plan
        self.app_id = plan["app_id"]
        self.ids = {"app_id": self.app_id,
                    "deployment_id": record["deployment_id"]}
        self.cancelled = False
        # A state change stored and sent with the next save (see above).
        self._deferred_event: str | None = None
        # Monotonic time at which the last switch_route step ended.
        self._routed_at: float | None = None

    # --- record keeping

    def save(self, sync: bool = True) -> None:
        """Store the deployment record, with a deferred state change.

        ``sync`` False writes it without flushing it to disk (see
        PROGRESS_STEPS).
        """
        event, self._deferred_event = self._deferred_event, None
        if event is None:
            self.op.store.save_deployment(self.record, sync=sync)
            return
        self.refresh_view()
        self.op.outbox.emit(self.record, event, sync=sync)  # saves

    def set_state(self, state: str, error: str | None = None,
                  defer: bool = False) -> None:
        """Change the state, store it and emit the callback event.

        With ``defer`` the record is stored and the event sent by the next
        save().
        """
        if self._deferred_event is not None:
            # Events go out in the order of the state changes.
            self.save()
        self.record["state"] = state
        self.record["error"] = error
        now = utc_now()
        if state == "running":
            self.record["started_at"] = now
            self._started_monotonic = time.monotonic()
        if state in STATES_TERMINAL:
            self.record["finished_at"] = now
            self._count_outcome(state)
        if defer:
            self._deferred_event = f"deployment.{state}"
        else:
            self.refresh_view()
            self.op.outbox.emit(self.record, f"deployment.{state}")  # saves
        level = logging.WARNING if state in ("failed", "rolled_back") \
            else logging.INFO
        # A cancelled job never ran. It ends in the thread of the request
        # that cancelled it, and that request logs its own waits.
        waits = waits_ms() if state in STATES_TERMINAL and \
            not self.cancelled else {}
        log(f"deployment.{state}", level, error=error, **self.ids, **waits)

    def _count_outcome(self, state: str) -> None:
        kind = self.record.get("kind") or "none"
        labels = {"kind": kind,
                  "strategy": self.record.get("strategy") or "none",
                  "result": state}
        METRICS.inc("crate_deployments_total", labels)
        started = getattr(self, "_started_monotonic", None)
        if started is not None:
            METRICS.observe("crate_deployment_duration_seconds",
                            {"kind": kind}, time.monotonic() - started)

    def journal_new(self, *instances: dict) -> None:
        """Record instances this job creates, before it creates them.

        Every caller runs the write_unit step next, whose start entry is
        saved together with this change before any unit is written.
        """
        journal = self.record.setdefault("journal", {"new": []})
        journal["new"] += [copy.deepcopy(i) for i in instances]

    def journal_moved(self) -> None:
        """Record that traffic has moved to the new version for good."""
        self.record.setdefault("journal", {})["moved"] = True
        self.save()

    def progress(self, event_name: str, app: dict | None = None) -> None:
        """Store the record and send a callback without a state change.

        The record shows the instances and weights of ``app``, or of the
        stored app record.
        """
        if self._deferred_event is not None:
            self.save()
        self.refresh_view(app)
        self.op.outbox.emit(self.record, event_name,
                            sync=self._save_needs_flush())  # saves

    def _save_needs_flush(self, step: str | None = None) -> bool:
        """Return whether recovery after a power loss may depend on the
        next save, which is then flushed to disk before the job goes on.

        Recovery reads the journal and which steps started.  Once the
        journal marks traffic as moved for good, recovery finishes the
        deployment from the journal alone.  The start of a step in
        PROGRESS_STEPS matters at no point.
        """
        if (self.record.get("journal") or {}).get("moved"):
            return False
        return step not in PROGRESS_STEPS

    def refresh_view(self, app: dict | None = None) -> None:
        """Copy the instances and route weights of ``app`` (by default the
        stored app record) into the record."""
        if app is None:
            app = self.op.store.app(self.app_id) or {}
        instances = sorted(app.get("instances", {}).values(),
                           key=lambda item: item["instance_id"])
        self.record["instances"] = [instance_view(i) for i in instances]
        self.record["allocations"] = copy.deepcopy(app.get("allocations", []))
        self.record["serving_version"] = app.get("serving_version")

    def step(self, name: str, func, *args, message: str = ""):
        """Run one named step, recording it before and after."""
        entry = {"name": name, "state": "running", "at": utc_now(),
                 "message": message}
        self.record["steps"].append(entry)
        self.save(sync=self._save_needs_flush(name))
        ids = dict(self.ids)
        for arg in args:
            if isinstance(arg, dict) and arg.get("instance_id"):
                ids["instance_id"] = arg["instance_id"]
                break
        log("step.start", step=name, **ids)
        if name == _CRASH_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            result = func(*args)
        except Exception as exc:
            entry.update(state="failed", at=utc_now(), message=str(exc))
            self.save()
            log("step.failed", logging.WARNING, step=name, error=str(exc),
                **ids)
            raise
        # The done entry is saved with the next change (the next step's
        # start entry, a journal entry or a state change): a crash before
        # that leaves the step looking unfinished, which recovery treats
        # like a crash inside the step.
        entry.update(state="done", at=utc_now())
        if name == "switch_route":
            self._routed_at = time.monotonic()
        return result

    def drain(self) -> None:
        """Run the drain step: drain_s after the last route change.

        Requests that Caddy had sent to the instances taken out of the
        route finish meanwhile. The time since the route change (journal
        and callback writes) counts, so only the rest is slept.
        """
        drain_s = self.op.config.drain_s
        left = drain_s
        if self._routed_at is not None:
            left -= time.monotonic() - self._routed_at
        self.step("drain", time.sleep, max(0.0, min(left, drain_s)),
                  message=f"{drain_s:g}s")

    # --- entry point

    def execute(self) -> tuple:
        """Run the work; return (terminal state, error or None)."""
        return self.op.strategies.run(self)

    def cancel(self, reason: str) -> None:
        """End a job that has not started yet as cancelled."""
        if self.record["state"] != "queued":
            return
        self.cancelled = True
        self.set_state("cancelled", reason)

    def run(self) -> None:
        """Run the deployment to a terminal state; never raises."""
        try:
            self._run()
        finally:
            # Registry credentials exist only in this in-memory plan, and no
            # step needs them after the job.
            self.plan.pop("registry_credentials", None)

    def _run(self) -> None:
        if self.cancelled or self.record["state"] != "queued":
            return
        self.set_state("running", defer=self.defers_running)
        try:
            outcome, error = self.execute()
        except StepError as exc:
            # Steps outside a strategy's rollback scope (fetch_asset) run
            # before anything on the host changes, and their message names
            # what failed and why, so it is reported as it is.
            outcome, error = "failed", str(exc)
        except Exception as exc:  # the one catch-all of a job
            log("deployment.crashed", logging.ERROR, exc_info=True,
                error=str(exc), **self.ids)
            outcome, error = "failed", f"internal error: {exc}"
        self.finish(outcome, error)

    def finish(self, outcome: str, error: str | None) -> None:
        """Let each runtime end the job (drop its on-disk snapshots, wait
        for its container removals), then store the terminal state."""
        for runtime in self.op.runtimes.values():
            with contextlib.suppress(OSError, AttributeError):
                runtime.finish_job(self.app_id)
        self.set_state(outcome, error)


def new_instance(plan: dict, instance_id: str, name: str, port: int,
                 release: dict, runtime) -> dict:
    """Return the record of an instance about to run ``release``.

    ``name`` is the unit stem: the slot in the slots model, and
    "<instance_id>.<color>" in the instances model, where a bluegreen
    sibling runs beside the old instance under the other color.
    """
    instance = {
        "instance_id": instance_id, "app_id": plan["app_id"],
        "kind": plan["kind"], "name": name,
        "slot": instance_id if plan["model"] == "slots" else None,
        "port": port, "version": plan["version"],
        "deployment_id": plan["deployment_id"],
        "release": release["release"],
        "unit": runtime.instance_name(plan, name),
        "state": "starting", "serving": False,
    }
    for key in ("image", "tag"):
        if key in release:
            instance[key] = release[key]
    return instance


class Strategies:
    """immediate and bluegreen written once against a runtime and Caddy.

    ``run(job)`` returns (terminal state, error or None).  A failure before
    traffic moved returns "failed" with the old version still serving; a
    failure after the old version stopped or traffic moved restores the
    previous version and returns "rolled_back".
    """

    def __init__(self, operator):
        self.op = operator

    def run(self, job: DeployJob) -> tuple:
        """Run the strategy named in the plan."""
        plan = job.plan
        app = self.op.load_or_new_app(plan)
        job.record["action"] = "update" if app["instances"] else "create"
        job.record["journal"] = {"app_before": copy.deepcopy(app),
                                 "new": [], "moved": False}
        # Saved with the start entry of the fetch_asset step, which every
        # strategy runs first.
        if plan["model"] == "instances":
            return InstanceSetDeploy(self, job, app).run()
        live = [i for i in app["instances"].values() if i.get("serving")]
        if not live:
            target = sorted(plan["targets"])[0]
            return self._switch(job, app, target, [])
        live_slot = live[0]["instance_id"]
        if plan["strategy"] == "immediate" and live_slot in plan["targets"]:
            return self._in_place(job, app, live[0])
        if plan["strategy"] == "canary" and len(live) == 1:
            idle = [s for s in sorted(plan["targets"]) if s != live_slot]
            return self._canary_slot(job, app, idle[0], live[0])
        idle = [s for s in sorted(plan["targets"]) if s != live_slot]
        return self._switch(job, app, idle[0], live)

    # --- helpers

    def fetch(self, job: DeployJob, runtime) -> dict:
        """Run the fetch_asset step and return the release."""
        return job.step("fetch_asset", runtime.prepare, job.plan,
                        message=runtime.describe_source(job.plan))

    def _new_instance(self, plan: dict, slot: str, release: dict) -> dict:
        runtime = self.op.runtime_for(plan["kind"])
        return new_instance(plan, slot, slot, plan["targets"][slot], release,
                            runtime)

    def _start_and_check(self, job: DeployJob, instance: dict) -> None:
        runtime = self.op.runtime_for(job.plan["kind"])
        job.step("start_instance", runtime.start, instance,
                 message=f"{instance['unit']} on port {instance['port']}")
        job.step("health_check", self.op.wait_healthy, job.plan, instance)

    def _route(self, job: DeployJob, app: dict, serving: list) -> None:
        """Point the app's route at ``serving`` (one Caddy call)."""
        self._route_groups(job, app, [(serving, 100)])

    def _route_groups(self, job: DeployJob, app: dict, groups: list) -> None:
        """Route ``groups``, a list of (instances, percent), in one call.

        Each group's percent is split evenly over its instances; a group
        or instance with 0 percent is left out of the route.
        """
        members, weights = [], []
        for instances, percent in groups:
            share = percent // len(instances)
            for n, instance in enumerate(instances):
                members.append(instance)
                weights.append(share + (1 if n < percent % len(instances)
                                        else 0))
        upstreams = [(f"127.0.0.1:{i['port']}", w)
                     for i, w in zip(members, weights)]
        # set_app_route repairs the server before it creates a route; the
        # replacement of an existing route does not need the catch-all
        # last, and the reconciler checks that every pass.
        self.op.caddy.set_app_route(job.app_id, job.plan["domain"], upstreams)
        app["domain"] = job.plan["domain"]
        app["allocations"] = [
            {"instance_id": i["instance_id"], "slot": i.get("slot"),
             "weight": w}
            for i, w in zip(members, weights) if w]

    # --- bluegreen and first deploys: start beside, switch, drain, stop

    def _switch(self, job: DeployJob, app: dict, slot: str, old: list):
        plan = job.plan
        runtime = self.op.runtime_for(plan["kind"])
        release = self.fetch(job, runtime)
        instance = self._new_instance(plan, slot, release)
        snap = runtime.snapshot(job.app_id, slot)
        job.journal_new(instance)
        moved = False
        try:
            job.step("write_unit", runtime.install, plan, instance, release,
                     message=instance["unit"])
            job.step("daemon_reload", runtime.reload)
            self._start_and_check(job, instance)
            instance.update(state="running", serving=True)
            job.step("switch_route", self._route, job, app, [instance],
                     message=f"{plan['domain']} -> port {instance['port']}")
            job.journal_moved()
            moved = True
        except Exception as exc:
            self._undo_new(job, instance, snap)
            return "failed", f"{exc}; the previous version keeps serving" \
                if old else str(exc)
        for item in old:
            item.update(serving=False)
        app["instances"][slot] = instance
        app["serving_version"] = plan["version"]
        if old:
            # The app record is saved once, after the old instances
            # stopped: a crash before that is finished from the journal.
            job.drain()
            for item in old:
                self._stop_old(job, item)
        self.op.store.save_app(app)
        return ("succeeded", None) if moved else ("failed", "route not set")

    def _stop_old(self, job: DeployJob, item: dict) -> None:
        """Stop an instance that no longer takes traffic.

        A failure here is recorded in the step log but does not fail the
        deployment, because the new version already serves.
        """
        try:
            runtime = self.op.runtime_for(item["kind"])
            job.step("stop_old", runtime.stop, item, message=item["unit"])
            item["state"] = "stopped"
        except Exception:
            item["state"] = "stop-failed"

    def _undo_new(self, job: DeployJob, instance: dict, snap: dict) -> None:
        """Stop a new instance that never took traffic and restore files."""
        runtime = self.op.runtime_for(job.plan["kind"])

        def undo():
            runtime.stop(instance)
            runtime.restore(job.app_id, instance["name"], snap)
            runtime.reload()

        with contextlib.suppress(Exception):
            job.step("rollback", undo, message=f"stop {instance['unit']}")

    # --- canary: start beside, shift traffic in steps, watch, promote

    def _canary_slot(self, job: DeployJob, app: dict, slot: str,
                     stable: dict):
        """Run a canary of the slots model on the idle slot."""
        plan = job.plan
        runtime = self.op.runtime_for(plan["kind"])
        before = copy.deepcopy(app)
        release = self.fetch(job, runtime)
        instance = self._new_instance(plan, slot, release)
        snap = runtime.snapshot(job.app_id, instance["name"])
        job.journal_new(instance)
        try:
            job.step("write_unit", runtime.install, plan, instance, release,
                     message=instance["unit"])
            job.step("daemon_reload", runtime.reload)
            self._start_and_check(job, instance)
        except Exception as exc:
            self._undo_new(job, instance, snap)
            return "failed", f"{exc}; the previous version keeps serving"
        instance.update(state="running", serving=True)
        app["instances"][slot] = instance

        def remove_canary():
            runtime.stop(instance)
            runtime.restore(job.app_id, instance["name"], snap)
            runtime.reload()

        def promote():
            stable.update(serving=False)
            self._stop_old(job, stable)

        return self.canary_steps(job, app, before, [stable], [instance],
                                 remove_canary, promote)

    def canary_steps(self, job: DeployJob, app: dict, before: dict,
                     stable: list, canary: list, remove_canary,
                     promote) -> tuple:
        """Shift traffic to ``canary`` step by step, watching it each pause.

        Any failure of a canary instance sends all traffic back to
        ``stable`` in one Caddy call, removes the canary and restores the
        app record ``before``; the deployment ends rolled_back.
        """
        settings = job.plan.get("canary") or {}
        steps = settings.get("steps") or self.op.config.canary_steps
        pause = settings.get("pause_s")
        if pause is None:
            pause = self.op.config.canary_pause_s
        version = job.plan["version"]
        for percent in steps:
            if percent >= 100:
                break
            job.step("canary_step", self._route_groups, job, app,
                     [(canary, percent), (stable, 100 - percent)],
                     message=f"{percent}% to version {version}")
            self.op.store.save_app(app)
            job.progress("deployment.canary_step")
            try:
                job.step("canary_watch", self._watch, job.plan, canary,
                         pause, message=f"{pause:g}s at {percent}%")
            except Exception as exc:
                return self._canary_rollback(job, before, stable, percent,
                                             exc, remove_canary)
        job.step("switch_route", self._route, job, app, canary,
                 message=f"100% to version {version}")
        job.journal_moved()
        app["serving_version"] = version
        # The app record is saved after promote() stopped the stable
        # version: a crash before that is finished from the journal.
        job.progress("deployment.canary_step", app)
        job.drain()
        promote()
        self.op.store.save_app(app)
        return "succeeded", None

    def _watch(self, plan: dict, canary: list, pause_s: float) -> None:
        """Probe every canary instance until ``pause_s`` has passed."""
        runtime = self.op.runtime_for(plan["kind"])
        path = plan.get("health_check_path")
        end = time.monotonic() + pause_s
        while True:
            for instance in canary:
                problem = runtime.problem(instance)
                if problem is None:
                    ready, detail = runtime.probe(instance, path)
                    if not ready:
                        problem = f"health check answered {detail}"
                if problem:
                    raise StepError(f"canary instance "
                                    f"{instance['instance_id']} on port "
                                    f"{instance['port']} failed: {problem}")
            if time.monotonic() >= end:
                return
            time.sleep(min(self.op.config.health_interval_s,
                           max(0.0, end - time.monotonic())))

    def _canary_rollback(self, job: DeployJob, before: dict, stable: list,
                         percent: int, exc: Exception, remove_canary):
        """Send all traffic back to the stable version and drop the canary."""
        app = copy.deepcopy(before)

        def rollback():
            self._route(job, app, stable)
            self.op.store.save_app(app)
            remove_canary()

        try:
            job.step("rollback", rollback, message="all traffic to stable")
        except Exception as rollback_exc:
            return "failed", (f"{exc} at the {percent}% step; sending all "
                              f"traffic back to the stable version also "
                              f"failed: {rollback_exc}")
        return "rolled_back", (f"{exc} at the {percent}% step; all traffic "
                               f"is back on version "
                               f"{before.get('serving_version')}")

    # --- immediate: replace the live instance in place (short gap)

    def _in_place(self, job: DeployJob, app: dict, live: dict):
        plan = job.plan
        runtime = self.op.runtime_for(plan["kind"])
        old = copy.deepcopy(live)
        # A restart skips start()'s port check, which is safe while the old
        # process of the same unit holds the port, because the restart frees
        # it for the new one.  When another process holds it instead (the old
        # unit died and something else took the port), the health check
        # reaches that process, so _healthy_after_restart fails the update.
        slot = live["instance_id"]
        restart = runtime.restarts_in_place and \
            old.get("state") == "running" and \
            old.get("port") == plan["targets"][slot]
        release = self.fetch(job, runtime)
        instance = self._new_instance(plan, slot, release)
        restart = restart and old["unit"] == instance["unit"]
        snap = runtime.snapshot(job.app_id, slot)
        job.journal_new(instance)
        try:
            job.step("write_unit", runtime.install, plan, instance, release,
                     message=instance["unit"])
            job.step("daemon_reload", runtime.reload)
        except Exception as exc:
            runtime.restore(job.app_id, slot, snap)
            with contextlib.suppress(Exception):
                runtime.reload()
            return "failed", f"{exc}; the previous version keeps serving"
        held = self._listeners_before_restart(instance) if restart else None
        try:
            if held is not None:
                job.step("start_instance", runtime.restart, instance,
                         message=f"restart {instance['unit']} on port "
                                 f"{instance['port']}")
                job.step("health_check", self._healthy_after_restart,
                         job.plan, instance, held)
            else:
                job.step("stop_old", runtime.stop, old, message=old["unit"])
                self._start_and_check(job, instance)
            instance.update(state="running", serving=True)
            job.step("switch_route", self._route, job, app, [instance],
                     message=f"{plan['domain']} -> port {instance['port']}")
            job.journal_moved()
        except Exception as exc:
            return self._restore_in_place(job, app, old, snap, exc)
        app["instances"][slot] = instance
        app["serving_version"] = plan["version"]
        self.op.store.save_app(app)
        return "succeeded", None

    def _listeners_before_restart(self, instance: dict) -> set | None:
        """Return the sockets listening for the instance's port, or None
        when they cannot be read, so that the update stops and starts."""
        try:
            return loopback_listeners(instance["port"])
        except OSError as exc:
            log("listeners.unreadable", logging.WARNING, error=str(exc),
                app_id=instance["app_id"], instance_id=instance["instance_id"])
            return None

    def _healthy_after_restart(self, plan: dict, instance: dict,
                               held: set) -> None:
        """Wait for the health check, then make sure that the new process
        answered it: some socket must listen for the port that did not
        before the restart (``held``)."""
        self.op.wait_healthy(plan, instance)
        try:
            listening = loopback_listeners(instance["port"])
        except OSError as exc:
            raise StepError(f"cannot read the sockets listening on port "
                            f"{instance['port']}: {exc}") from exc
        if not listening - held:
            raise StepError(
                f"port {instance['port']} is held by another process: after "
                f"the restart of {instance['unit']} only the socket that "
                f"listened before answers, so the health check did not "
                f"reach the new version; free the port or deploy to another "
                f"one")

    def _restore_in_place(self, job, app, old, snap, exc):
        """Bring back the version that served before an in-place update."""
        runtime = self.op.runtime_for(job.plan["kind"])

        def restore():
            runtime.stop(old)
            runtime.restore(job.app_id, old["name"], snap)
            runtime.reload()
            runtime.start(old)
            self.op.wait_healthy(job.plan, old)
            self._route(job, app, [old])

        try:
            job.step("rollback", restore, message=f"restore {old['version']}")
        except Exception as restore_exc:
            old.update(state="failed", serving=False)
            app["instances"][old["instance_id"]] = old
            app["serving_version"] = None
            self.op.store.save_app(app)
            return "failed", (f"{exc}; restoring version {old['version']} "
                              f"also failed: {restore_exc}")
        app["instances"][old["instance_id"]] = old
        self.op.store.save_app(app)
        return "rolled_back", (f"{exc}; version {old['version']} was "
                               f"restored and serves again")


class InstanceSetDeploy:
    """One deployment of the instances model: the request is the desired set.

    Instance ids in the request but not on the host are created, ids on the
    host but not in the request are drained and removed, and the others are
    updated: one at a time in place (``immediate``, a rolling update), or
    all at once beside the old ones on free ports from the configured range
    (``bluegreen``).  A failure restores the previous set.
    """

    def __init__(self, strategies: Strategies, job: DeployJob, app: dict):
        self.strategies = strategies
        self.op = strategies.op
        self.job = job
        self.plan = job.plan
        self.app = app
        self.runtime = self.op.runtime_for(job.plan["kind"])
        current = app["instances"]
        desired = job.plan["targets"]
        self.creates = sorted(i for i in desired if i not in current)
        self.updates = sorted(i for i in desired if i in current)
        self.removes = sorted(i for i in current if i not in desired)
        self.before = copy.deepcopy(current)

    def run(self) -> tuple:
        """Run the strategy; return (terminal state, error or None)."""
        self.job.record["changes"] = {"create": self.creates,
                                      "update": self.updates,
                                      "remove": self.removes}
        # Saved with the start entry of the fetch_asset step below.
        log("deployment.instance_set", create=self.creates,
            update=self.updates, remove=self.removes, **self.job.ids)
        self.release = self.strategies.fetch(self.job, self.runtime)
        if self.plan["strategy"] == "bluegreen":
            return self._bluegreen()
        if self.plan["strategy"] == "canary" and self.before:
            return self._canary()
        # immediate, and a canary without a stable version to compare with
        return self._rolling()

    # --- shared steps

    def _member(self, instance_id: str, port: int, color: str) -> dict:
        return new_instance(self.plan, instance_id, f"{instance_id}.{color}",
                            port, self.release, self.runtime)

    def _route(self, serving: dict) -> None:
        members = [serving[key] for key in sorted(serving)]
        self.job.step("switch_route", self.strategies._route, self.job,
                      self.app, members,
                      message=", ".join(str(m["port"]) for m in members))

    def _bring_up(self, members: list) -> None:
        """Write units, reload once, then start and check each member."""
        for member in members:
            self.runtime.snapshot(self.job.app_id, member["name"])
        self.job.journal_new(*members)
        for member in members:
            self.job.step("write_unit", self.runtime.install, self.plan,
                          member, self.release, message=member["unit"])
        self.job.step("daemon_reload", self.runtime.reload)
        for member in members:
            self.active_id = member["instance_id"]
            self.strategies._start_and_check(self.job, member)
            member.update(state="running", serving=True)

    def _save(self, serving: dict, version: str | None = None) -> None:
        self.app["instances"] = serving
        if version:
            self.app["serving_version"] = version
        self.op.store.save_app(self.app)

    def _remove_members(self, members: list) -> None:
        for member in members:
            try:
                self.job.step("stop_old", self.runtime.remove, member,
                              message=member["unit"])
            except Exception:  # recorded by step(); the new set serves
                pass
        self.runtime.reload()

    # --- immediate: rolling update, one instance at a time

    def _rolling(self) -> tuple:
        serving = {k: v for k, v in self.before.items() if v.get("serving")}
        self.changed = False
        self.created, self.updated, self.current = [], [], None
        self.active_id = "?"
        try:
            self._rolling_creates(serving)
            for instance_id in self.updates:
                self._rolling_update(serving, instance_id)
        except Exception as exc:
            return self._rolling_restore(exc, self.active_id)
        self.job.journal_moved()
        self._remove_unwanted(serving)
        return "succeeded", None

    def _rolling_creates(self, serving: dict) -> None:
        members = [self._member(i, self.plan["targets"][i], "a")
                   for i in self.creates]
        if not members:
            return
        self.created = members
        self._bring_up(members)
        serving.update({m["instance_id"]: m for m in members})
        self.changed = True
        self._route(serving)
        self._save(serving)

    def _rolling_update(self, serving: dict, instance_id: str) -> None:
        self.active_id = instance_id
        old = self.before[instance_id]
        color = old.get("name", "x.a").rsplit(".", 1)[-1]
        member = self._member(instance_id, self.plan["targets"][instance_id],
                              color)
        snap = self.runtime.snapshot(self.job.app_id, member["name"])
        self.current = (old, snap)
        others = {k: v for k, v in serving.items() if k != instance_id}
        if others:
            self._route(others)
            self.job.drain()
        self.changed = True
        self.job.step("stop_old", self.runtime.stop, old, message=old["unit"])
        self._bring_up([member])
        serving[instance_id] = member
        self._route(serving)
        self.updated.append((old, snap))
        self.current = None
        self._save(serving)

    def _rolling_restore(self, exc: Exception, failing: str) -> tuple:
        """Put the previous set back after a failed rolling update."""
        reason = f"instance {failing} failed: {exc}"
        restore = list(self.updated)
        if self.current is not None:
            restore.append(self.current)

        def undo():
            for member in self.created:
                self.runtime.remove(member)
            for old, snap in restore:
                self.runtime.stop(old)
                self.runtime.restore(self.job.app_id, old["name"], snap)
            self.runtime.reload()
            for old, _snap in restore:
                self.runtime.start(old)
                self.op.wait_healthy(self.plan, old)
            previous = {k: v for k, v in self.before.items()
                        if v.get("serving")}
            if previous:
                self.strategies._route(self.job, self.app,
                                       [previous[k] for k in sorted(previous)])
            self._save(self.before)

        if not self.changed:
            with contextlib.suppress(Exception):
                self.job.step("rollback", undo, message="remove new instances")
            return "failed", f"{reason}; nothing was changed"
        try:
            self.job.step("rollback", undo, message="restore previous set")
        except Exception as restore_exc:
            return "failed", (f"{reason}; restoring the previous set also "
                              f"failed: {restore_exc}")
        return "rolled_back", f"{reason}; the previous set was restored"

    def _remove_unwanted(self, serving: dict) -> None:
        gone = [self.before[i] for i in self.removes]
        for instance_id in self.removes:
            serving.pop(instance_id, None)
        if not gone:
            self._save(serving, self.plan["version"])
            return
        self._route(serving)
        self.job.drain()
        self._remove_members(gone)
        self._save(serving, self.plan["version"])

    # --- bluegreen: siblings on free ports, one switch, drain, stop old

    def _siblings(self) -> dict:
        """Return a new member on a free port for every requested id."""
        ports = self.op.free_ports(len(self.plan["targets"]))
        siblings = {}
        for instance_id, port in zip(sorted(self.plan["targets"]), ports):
            old = self.before.get(instance_id)
            color = "a"
            if old and old.get("name", "").endswith(".a"):
                color = "b"
            siblings[instance_id] = self._member(instance_id, port, color)
        return siblings

    def _remove_siblings(self, siblings: dict) -> None:
        for member in siblings.values():
            self.runtime.remove(member)
        self.runtime.reload()

    def _bluegreen(self) -> tuple:
        siblings = self._siblings()
        try:
            self._bring_up(list(siblings.values()))
            self._route(siblings)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.job.step("rollback", self._remove_siblings, siblings,
                              message="remove siblings")
            return "failed", f"{exc}; the previous set keeps serving"
        self.job.journal_moved()
        self._save(siblings, self.plan["version"])
        old = list(self.before.values())
        if old:
            self.job.drain()
            self._remove_members(old)
        return "succeeded", None

    def _canary(self) -> tuple:
        """New instances on free ports take traffic in steps (a canary)."""
        siblings = self._siblings()
        app_before = copy.deepcopy(self.app)
        try:
            self._bring_up(list(siblings.values()))
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.job.step("rollback", self._remove_siblings, siblings,
                              message="remove canary instances")
            return "failed", f"{exc}; the previous set keeps serving"
        stable = [v for _, v in sorted(self.before.items())
                  if v.get("serving")]
        canary = [siblings[k] for k in sorted(siblings)]
        self.app["instances"] = dict(
            {f"{k}~stable": v for k, v in self.before.items()}, **siblings)

        def promote():
            self.app["instances"] = siblings
            self.op.store.save_app(self.app)
            self._remove_members(list(self.before.values()))

        return self.strategies.canary_steps(
            self.job, self.app, app_before, stable, canary,
            lambda: self._remove_siblings(siblings), promote)


# === Lifecycle: start, stop, restart, delete ===

LIFECYCLE_ACTIONS = ("start", "stop", "restart", "delete")


class LifecycleJob(DeployJob):
    """A start, stop, restart or delete of an app's instances.

    It runs as a job of its app, so it waits behind a running deploy and
    never interleaves with one; the record and callbacks have the same
    shape as a deployment's, with ``action`` naming the operation.
    """

    defers_running = False

    def __init__(self, operator, record: dict, plan: dict):
        super().__init__(operator, record, plan)
        self.strategies = operator.strategies

    def execute(self) -> tuple:
        """Run the operation named by the record's action."""
        action = self.record["action"]
        app = self.op.store.app(self.app_id)
        if action == "delete":
            return self._delete(app)
        instance = (app or {}).get("instances", {}).get(
            self.plan["instance_id"])
        if instance is None:
            return "failed", (f"instance {self.plan['instance_id']} of app "
                              f"{self.app_id} no longer exists on this host")
        handler = {"start": self._start, "stop": self._stop,
                   "restart": self._restart}[action]
        return handler(app, instance)

    # --- helpers

    def _serving(self, app: dict, without: dict | None = None) -> list:
        return [i for _, i in sorted(app["instances"].items())
                if i.get("serving") and i is not without]

    def _route_or_remove(self, app: dict, serving: list) -> None:
        """Route the app to ``serving``, or remove its route when empty."""
        if serving:
            self.plan["domain"] = app["domain"]
            self.strategies._route(self, app, serving)
        else:
            self.op.caddy.delete_app_route(self.app_id)
            app["allocations"] = []

    def _take_out(self, app: dict, instance: dict) -> None:
        """Remove an instance from the route, then let requests drain."""
        if not instance.get("serving") or not app.get("domain"):
            return
        others = self._serving(app, without=instance)
        self.step("switch_route", self._route_or_remove, app, others,
                  message=f"without {instance['instance_id']}")
        instance["serving"] = False
        self.op.store.save_app(app)
        self.drain()

    def _bring_back(self, app: dict, instance: dict) -> None:
        runtime = self.op.runtime_for(instance["kind"])
        self.step("start_instance", runtime.start, instance,
                  message=f"{instance['unit']} on port {instance['port']}")
        plan = dict(self.plan, kind=instance["kind"],
                    health_check_path=app.get("health_check_path"))
        self.step("health_check", self.op.wait_healthy, plan, instance)
        instance.update(state="running", serving=True)
        if app.get("domain"):
            self.step("switch_route", self._route_or_remove, app,
                      self._serving(app),
                      message=f"with {instance['instance_id']}")
        app["serving_version"] = instance["version"]
        self.op.store.save_app(app)

    # --- operations

    def _stop(self, app: dict, instance: dict) -> tuple:
        runtime = self.op.runtime_for(instance["kind"])
        self._take_out(app, instance)
        self.step("stop_instance", runtime.stop, instance,
                  message=instance["unit"])
        instance.update(state="stopped", serving=False)
        if not self._serving(app):
            app["serving_version"] = None
        self.op.store.save_app(app)
        return "succeeded", None

    def _start(self, app: dict, instance: dict) -> tuple:
        try:
            self._bring_back(app, instance)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.op.runtime_for(instance["kind"]).stop(instance)
            instance.update(state="failed", serving=False)
            self.op.store.save_app(app)
            return "failed", str(exc)
        return "succeeded", None

    def _restart(self, app: dict, instance: dict) -> tuple:
        runtime = self.op.runtime_for(instance["kind"])
        if self._serving(app, without=instance):
            self._take_out(app, instance)
        self.step("stop_instance", runtime.stop, instance,
                  message=instance["unit"])
        return self._start(app, instance)

    def _delete(self, app: dict | None) -> tuple:
        """Remove the named instances, and the whole app once none is left."""
        removed, absent = [], []
        wanted = self.plan["instance_ids"]
        instances = (app or {}).get("instances", {})
        doomed = [instances[i] for i in wanted if i in instances]
        absent = [i for i in wanted if i not in instances]
        if app and doomed:
            remaining = [i for i in self._serving(app) if i not in doomed]
            if any(i.get("serving") for i in doomed) and app.get("domain"):
                self.step("switch_route", self._route_or_remove, app,
                          remaining, message="without deleted instances")
                if remaining:
                    self.drain()
            for instance in doomed:
                runtime = self.op.runtime_for(instance["kind"])
                self.step("remove_instance", runtime.remove, instance,
                          message=instance["unit"])
                removed.append(f"instance {instance['instance_id']} "
                               f"({instance['unit']})")
                del app["instances"][instance["instance_id"]]
            self.step("daemon_reload", runtime.reload)
        if app is not None and not app["instances"]:
            removed += self._delete_app(app)
        elif app is not None:
            self.op.store.save_app(app)
        self.record["removed"] = removed
        self.record["absent"] = absent
        self.save()
        log("app.deleted", removed=len(removed), absent=absent, **self.ids)
        return "succeeded", None

    def _delete_app(self, app: dict) -> list:
        """Remove the route, files and record of an app with no instance."""
        removed = []
        if self.step("remove_route", self.op.caddy.delete_app_route,
                     self.app_id):
            removed.append(f"route {caddy_route_id(self.app_id)}")
        if app.get("kind") == "docker":
            removed += self.op.runtime_for("docker").remove_app(self.app_id)
        removed += self.op.runtime_for("binary").remove_app(self.app_id)
        self.op.store.delete_app(self.app_id)
        removed.append(f"app record {self.app_id}")
        return removed


# === Recovery after a restart ===

class RecoveryJob(DeployJob):
    """Finish or roll back a job that an earlier process left running.

    A deploy whose journal says traffic moved for good is finished (the
    old version is stopped or removed); any other deploy is rolled back
    to the app record it started from, using the on-disk snapshots of the
    unit and env files it replaced.  Lifecycle jobs are run again, since
    start, stop, restart and delete are safe to repeat.
    """

    def run(self) -> None:
        """Bring the record to a terminal state; never raises."""
        try:
            outcome, error = self.execute()
        except Exception as exc:  # the one catch-all of a recovery job
            log("recovery.crashed", logging.ERROR, exc_info=True,
                error=str(exc), **self.ids)
            outcome, error = "failed", (f"recovery after an operator "
                                        f"restart failed: {exc}")
        self.finish(outcome, error)

    def execute(self) -> tuple:
        """Choose between finishing, rolling back and running again."""
        steps = self.record.get("steps") or []
        self.last = steps[-1]["name"] if steps else "none"
        log("recovery.start", step=self.last, **self.ids)
        if self.record["action"] in LIFECYCLE_ACTIONS:
            job = LifecycleJob(self.op, self.record, self.plan)
            return job.execute()
        journal = self.record.get("journal") or {}
        if "app_before" not in journal:
            return "failed", (f"the operator stopped at step {self.last} "
                              f"before the deployment changed anything; "
                              f"post it again with a new deployment_id")
        before = journal["app_before"]
        self.plan.update(health_check_path=before.get("health_check_path"),
                         domain=self.record.get("domain"))
        if journal.get("moved"):
            return self._finish_forward(journal)
        return self._roll_back(journal)

    def _ensure_running(self, runtime, instance: dict) -> None:
        if runtime.problem(instance):
            runtime.start(instance)
            self.op.wait_healthy(self.plan, instance)

    def _roll_back(self, journal: dict) -> tuple:
        before = journal["app_before"]
        app = copy.deepcopy(before)
        runtime = self.op.runtime_for(self.record["kind"])

        def undo():
            for instance in journal.get("new", []):
                runtime.stop(instance)
                if not runtime.restore_backup(self.app_id, instance["name"]):
                    runtime.remove(instance)
            runtime.reload()
            serving = [i for _, i in sorted(before["instances"].items())
                       if i.get("serving")]
            for instance in serving:
                self._ensure_running(runtime, instance)
            if serving:
                self.op.strategies._route(self, app, serving)
            else:
                self.op.caddy.delete_app_route(self.app_id)
                app["allocations"] = []
            self.op.store.save_app(app)

        self.step("rollback", undo,
                  message=f"after an operator restart at step {self.last}")
        touched = {"stop_old", "switch_route", "canary_step"}
        moved = any(s["name"] in touched for s in self.record["steps"])
        reason = (f"the operator restarted during step {self.last}; the "
                  f"previous version was restored")
        return ("rolled_back" if moved else "failed"), reason

    def _finish_forward(self, journal: dict) -> tuple:
        before = journal["app_before"]
        new = [dict(i, state="running", serving=True)
               for i in journal.get("new", [])]
        runtime = self.op.runtime_for(self.record["kind"])
        app = copy.deepcopy(before)
        new_units = {i["unit"] for i in new}
        old = [i for _, i in sorted(before["instances"].items())
               if i["unit"] not in new_units]

        def forward():
            for instance in new:
                self._ensure_running(runtime, instance)
            self.op.strategies._route(self, app, new)
            kept = {}
            for instance in old:
                if self.record["model"] == "slots":
                    runtime.stop(instance)
                    kept[instance["instance_id"]] = dict(
                        instance, state="stopped", serving=False)
                else:
                    runtime.remove(instance)
            runtime.reload()
            kept.update({i["instance_id"]: i for i in new})
            app["instances"] = kept
            app["serving_version"] = self.record["target_version"]
            self.op.store.save_app(app)

        self.step("stop_old", forward,
                  message=f"finish after an operator restart at step "
                          f"{self.last}")
        return "succeeded", None


# === Job runner and callbacks ===

class JobRunner:
    """Run jobs one at a time per app and apps in parallel.

    ``submit`` appends a job to its app's queue and starts a worker thread
    for that app when none runs; ``wait_idle`` is used at shutdown.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queues = collections.defaultdict(collections.deque)
        self._workers = {}
        self._idle = threading.Condition(self._lock)

    def submit(self, app_id: int, job) -> None:
        """Queue ``job`` behind the running and queued jobs of its app."""
        with self._lock:
            self._queues[app_id].append(job)
            if app_id not in self._workers:
                worker = threading.Thread(target=self._work, args=(app_id,),
                                          name=f"app-{app_id}", daemon=True)
                self._workers[app_id] = worker
                worker.start()

    def take_queued(self, app_id: int) -> list:
        """Remove and return the jobs of an app that have not started."""
        with self._lock:
            queue = self._queues.get(app_id)
            if not queue:
                return []
            jobs = list(queue)
            queue.clear()
            return jobs

    def run_exclusive(self, app_id: int, func, wait_s: float):
        """Run ``func`` as a job of the app and return its result.

        Raises ConflictError when the app's running job does not finish
        within ``wait_s``; ``func`` then never runs.
        """
        job = _InlineJob(func)
        self.submit(app_id, job)
        if not job.claim_or_abandon(wait_s):
            raise ConflictError(f"deploy in progress for app {app_id}; "
                                f"retry when it has finished")
        job.done.wait()
        for kind, seconds in job.waits.items():
            count_wait(kind, seconds)
        count_wait("cpu", job.cpu)
        if job.error is not None:
            raise job.error
        return job.result

    def queue_length(self) -> int:
        """Return the number of jobs waiting or running."""
        with self._lock:
            return sum(len(q) for q in self._queues.values()) + \
                len(self._workers)

    def _work(self, app_id: int) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(app_id)
                if not queue:
                    self._queues.pop(app_id, None)
                    del self._workers[app_id]
                    self._idle.notify_all()
                    return
                job = queue.popleft()
            reset_waits()
            try:
                job.run()
            except Exception:  # job.run catches its own errors; last resort
                log("job.crashed", logging.ERROR, exc_info=True, app_id=app_id)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no job runs; return False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._workers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


class _InlineJob:
    """A function run in an app's queue on behalf of a waiting request."""

    def __init__(self, func):
        self.func = func
        self._lock = threading.Lock()
        self._state = "waiting"
        self._started = threading.Event()
        self.done = threading.Event()
        self.result = None
        self.error = None
        self.waits: dict = {}
        self.cpu = 0.0

    def claim_or_abandon(self, wait_s: float) -> bool:
        """Return True once the job started; abandon it after ``wait_s``."""
        if self._started.wait(wait_s):
            return True
        with self._lock:
            if self._state == "waiting":
                self._state = "abandoned"
                return False
        return True

    def cancel(self, reason: str) -> None:
        """Give up a job that has not started; its request answers 409."""
        with self._lock:
            if self._state == "waiting":
                self._state = "abandoned"

    def run(self) -> None:
        """Run the function unless the request gave up waiting."""
        with self._lock:
            if self._state == "abandoned":
                return
            self._state = "running"
        self._started.set()
        try:
            self.result = self.func()
        except BaseException as exc:  # re-raised in the waiting request
            self.error = exc
        finally:
            # The waiting request logs these waits as its own.
            self.waits = {kind: getattr(_WAITS, kind, 0.0)
                          for kind in WAIT_KINDS}
            self.cpu = thread_cpu_s()
            self.done.set()


def sign_body(secret: str, body: bytes) -> str:
    """Return the X-Crate-Signature value of a callback body."""
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


class CallbackOutbox:
    """Durable, ordered, at-least-once delivery of callback events.

    ``emit`` writes the event to the outbox before anything is sent; one
    delivery thread per callback URL sends that URL's events in seq order,
    retrying with exponential backoff and jitter, the same bytes and
    delivery id every time, until callback_retry_window_s has passed.
    """

    def __init__(self, store: Store, config: Config):
        self.store = store
        self.config = config
        self._lock = threading.Lock()
        # Held from next_seq until the event is written and queued.
        self._emit_lock = threading.Lock()
        self._pending = {}
        self._workers = {}
        self._stopping = threading.Event()
        self.policy = OutboundPolicy.from_config(config)
        self.delivered = 0
        self.retried = 0
        self.given_up = 0
        for event in store.outbox_events():
            if not event.get("delivered_at") and not event.get("given_up_at"):
                self._pending[event["seq"]] = event

    def emit(self, record: dict, event_name: str, sync: bool = True) -> None:
        """Store a deployment record and queue one event about it.

        The record is stored even when it has no callback_url, so that a
        state change needs one write of the record.  ``sync`` is passed to
        save_deployment.  Only an event of a terminal state is written
        with fsync.  After a power loss, every deployment that had not
        ended is ended by start-up or recovery, which sends that terminal
        event, so a lost queued, running or canary_step event is followed
        by the event that tells how its deployment ended.  Nothing sends a
        terminal event again, so it must not be lost.
        """
        if not record.get("callback_url"):
            self.store.save_deployment(record, sync=sync)
            return
        record["deployment_seq"] = record.get("deployment_seq", 0) + 1
        document = status_document(record)
        # The record goes first, so that no event (which may be delivered
        # after a restart) reports a state the record on disk lacks.
        self.store.save_deployment(record, sync=sync)
        # Outbox files appear in seq order: GET /v1/events hands out the
        # last seq it returned as the reader's next cursor, so a smaller
        # seq written after a larger one would never be read.
        with self._emit_lock:
            seq = self.store.next_seq()
            body = {"seq": seq, "deployment_seq": record["deployment_seq"],
                    "event": event_name, "deployment": document}
            raw = json.dumps(body, sort_keys=True, separators=(",", ":"))
            event = {"seq": seq, "delivery_id": f"{seq}-{secrets.token_hex(8)}",
                     "url": record["callback_url"], "event": event_name,
                     "deployment_id": record["deployment_id"],
                     "app_id": record["app_id"], "body": raw, "attempts": 0,
                     "created_at": time.time(), "next_at": 0.0}
            self.store.outbox_add(
                event, sync=record.get("state") in STATES_TERMINAL)
            # Queued under the same lock, so that a delivery thread, which
            # sends the smallest pending seq of its URL next, never sees a
            # larger seq before this one.
            with self._lock:
                self._pending[seq] = event
                self._start_worker(event["url"])

    def start(self) -> None:
        """Start delivering events left from an earlier run."""
        with self._lock:
            for url in {e["url"] for e in self._pending.values()}:
                self._start_worker(url)

    def stop(self) -> None:
        """Stop starting new attempts; pending events stay in the outbox."""
        self._stopping.set()

    def _start_worker(self, url: str) -> None:
        if url in self._workers or self._stopping.is_set():
            return
        worker = threading.Thread(target=self._deliver_url, args=(url,),
                                  name="callbacks", daemon=True)
        self._workers[url] = worker
        worker.start()

    def _next_event(self, url: str):
        with self._lock:
            mine = [e for e in self._pending.values() if e["url"] == url]
            if not mine or self._stopping.is_set():
                self._workers.pop(url, None)
                return None
            return min(mine, key=lambda e: e["seq"])

    def _deliver_url(self, url: str) -> None:
        while True:
            event = self._next_event(url)
            if event is None:
                return
            wait = event["next_at"] - time.time()
            if wait > 0:
                self._stopping.wait(min(wait, 5.0))
                continue
            self._attempt(event)

    def _attempt(self, event: dict) -> None:
        event["attempts"] += 1
        ids = {"app_id": event["app_id"],
               "deployment_id": event["deployment_id"], "seq": event["seq"],
               "delivery_id": event["delivery_id"]}
        error = self._post(event)
        if error is None:
            event["delivered_at"] = time.time()
            self.delivered += 1
            METRICS.inc("crate_callbacks_delivered_total")
            log("callback.delivered", attempts=event["attempts"], **ids)
        elif event.pop("blocked", False) or time.time() - \
                event["created_at"] > self.config.callback_retry_window_s:
            event["given_up_at"] = time.time()
            self.given_up += 1
            METRICS.inc("crate_callbacks_given_up_total")
            log("callback.given_up", logging.ERROR, error=error,
                attempts=event["attempts"], **ids)
        else:
            base = self.config.callback_backoff_s * 2 ** (event["attempts"] - 1)
            delay = min(self.config.callback_backoff_max_s, base)
            delay *= random.uniform(0.8, 1.2)
            event["next_at"] = time.time() + delay
            self.retried += 1
            METRICS.inc("crate_callbacks_retried_total")
            log("callback.retry", logging.WARNING, error=error,
                attempts=event["attempts"], retry_in_s=round(delay, 3), **ids)
        self.store.outbox_update(event)
        if event.get("delivered_at") or event.get("given_up_at"):
            with self._lock:
                self._pending.pop(event["seq"], None)
            if event["seq"] % 100 == 0:
                self.store.outbox_prune(self.config.events_retention)

    def _post(self, event: dict) -> str | None:
        """POST one event; return None on a 2xx, else the error text.

        A destination outside the outbound rules marks the event
        "blocked", because retrying cannot change the answer.  Redirects
        are not followed.  The whole exchange, response included, ends
        after callback_timeout_s and at most CALLBACK_MAX_RESPONSE_BYTES
        of the response body are read.
        """
        body = event["body"].encode()
        parts = urllib.parse.urlsplit(event["url"])
        timeout = self.config.callback_timeout_s
        try:
            conn = guarded_connection(event["url"], timeout, self.policy)
        except OutboundBlockedError as exc:
            event["blocked"] = True
            return f"callback_url rejected: {exc}"
        except (OSError, FetchError) as exc:
            return f"{type(exc).__name__}: {exc}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"crate-operator/{__version__}",
            "X-Crate-Event": event["event"],
            "X-Crate-Delivery": event["delivery_id"],
            "X-Crate-Signature": sign_body(self.config.callback_secret, body),
        }
        deadline = _Deadline(conn, timeout)
        try:
            with deadline:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read(CALLBACK_MAX_RESPONSE_BYTES)
            if 200 <= resp.status < 300:
                return None
            return f"HTTP {resp.status}"
        except (OSError, http.client.HTTPException) as exc:
            if deadline.expired:
                return f"timed out after {timeout:g} s (callback_timeout_s)"
            return f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()


class PeriodicThread:
    """A daemon thread that runs one pass at start and then every interval.

    Subclasses set ``name`` and implement ``run_once`` and ``interval_s``;
    callers use ``start`` and ``stop``.
    """

    name = "periodic"

    def __init__(self):
        self._stopping = threading.Event()
        self._thread = None

    def start(self) -> None:
        """Start the thread; the first pass runs at once."""
        self._thread = threading.Thread(target=self._loop, name=self.name,
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after the pass in progress."""
        self._stopping.set()

    def interval_s(self) -> float:
        """Return the pause between two passes."""
        raise NotImplementedError

    def run_once(self) -> None:
        """Run one pass."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception as exc:  # the one catch-all of a pass
                log(f"{self.name}.failed", logging.ERROR, exc_info=True,
                    error=str(exc))
            self._stopping.wait(self.interval_s())


# === Reconciliation ===

class Reconciler(PeriodicThread):
    """Bring routes and instances back in line with the records.

    At start-up and every reconcile_interval_s it reads the state of all
    apps at once (_in_order), then checks each app that looks wrong on
    its own, one after another, as a job of that app so it never runs
    beside a deploy: a running instance whose unit or container is down is
    started again, a running unit that is disabled is enabled, and a route
    that Caddy lost or changed is written again from the record, route by
    route (never with POST /load).  What it cannot repair stays in
    ``drift`` (shown by GET /healthz) until a later pass succeeds.
    """

    name = "reconcile"

    def __init__(self, operator):
        super().__init__()
        self.op = operator
        self.drift = {}
        self._lock = threading.Lock()

    def interval_s(self) -> float:
        """Return reconcile_interval_s."""
        return self.op.config.reconcile_interval_s

    def report(self) -> list:
        """Return the unrepaired differences, one message each."""
        with self._lock:
            return [self.drift[key] for key in sorted(self.drift)]

    def run_once(self) -> None:
        """Check every app; queue a repair of each that looks wrong behind
        its running jobs."""
        caddy_ok = self.op.caddy.ping()
        if not caddy_ok:
            self._set("caddy", "the Caddy admin API is unreachable")
        else:
            try:
                self.op.caddy.ensure_server()
            except OperatorError as exc:
                self._set("caddy", f"Caddy server setup failed: {exc}")
                log("caddy.ensure_server_failed", logging.ERROR,
                    error=str(exc))
            else:
                self._set("caddy", None)
        apps = self.op.store.apps()
        in_order = self._in_order(apps) if caddy_ok else set()
        for app in apps:
            if self._stopping.is_set():
                return
            app_id = app["app_id"]
            if app_id in in_order:
                METRICS.inc("crate_reconcile_apps_total",
                            {"outcome": "in_order"})
                self._clear(app)
                continue
            METRICS.inc("crate_reconcile_apps_total",
                        {"outcome": "checked_alone"})
            job = _InlineJob(lambda app_id=app_id: self.check_app(app_id))
            self.op.runner.submit(app_id, job)
            # One app at a time: a pass that queued every app at once ran
            # a systemctl process per app in parallel, a CPU burst every
            # pass that slowed deploys and requests on hosts with many
            # apps.  An app busy with a deploy gets its check when its turn
            # comes, without holding up the pass for longer than this.
            job.done.wait(RECONCILE_APP_WAIT_S)

    def _in_order(self, apps: list) -> set:
        """Return the ids of the apps that look as their records say.

        One read of Caddy's routes and one systemctl call per
        SHOW_MANY_UNITS units cover all apps, so a pass starts no process
        per app.  An app that looks wrong, or that a deploy changes in the
        meantime, is checked again on its own (check_app) as a job of the
        app, so this read only decides which apps need that.  When a read
        fails, every app is checked on its own.
        """
        try:
            routes = {_route_id(route): {dial for dial, _ in
                                         upstreams_from_route(route)}
                      for route in self.op.caddy.routes()
                      if isinstance(route, dict)}
            running = {}
            for app in apps:
                for instance in app.get("instances", {}).values():
                    if instance.get("state") == "running":
                        running.setdefault(instance["kind"], []).append(
                            instance)
            results = {}
            for kind, instances in running.items():
                results.update(
                    self.op.runtime_for(kind).check_many(instances))
        except (OperatorError, OSError) as exc:
            log("reconcile.batch_failed", logging.WARNING, error=str(exc))
            return set()
        in_order = set()
        for app in apps:
            instances = app.get("instances", {}).values()
            if any(results.get(i["unit"]) != (None, None) for i in instances
                   if i.get("state") == "running"):
                continue
            expected = _serving_dials(app)
            if app.get("domain") and expected and \
                    routes.get(caddy_route_id(app["app_id"])) != expected:
                continue
            in_order.add(app["app_id"])
        return in_order

    def _clear(self, app: dict) -> None:
        """Drop the drift reports of an app found in order."""
        prefix = f"app {app['app_id']} "
        with self._lock:
            for key in [k for k in self.drift if k.startswith(prefix)]:
                del self.drift[key]

    def _set(self, key: str, message: str | None) -> None:
        with self._lock:
            if message is None:
                self.drift.pop(key, None)
            else:
                self.drift[key] = message

    def _found(self, key: str, kind: str, message: str, **ids) -> None:
        METRICS.inc("crate_drift_found_total", {"kind": kind})
        log("drift.found", logging.WARNING, kind=kind, detail=message, **ids)
        self._set(key, message)

    def _repaired(self, key: str, kind: str, **ids) -> None:
        METRICS.inc("crate_drift_repaired_total", {"kind": kind})
        log("drift.repaired", kind=kind, **ids)
        self._set(key, None)

    def check_app(self, app_id: int) -> None:
        """Repair one app's instances, then its route."""
        app = self.op.store.app(app_id)
        if app is None:
            return
        for instance in sorted(app["instances"].values(),
                               key=lambda i: i["instance_id"]):
            if instance.get("state") == "running":
                self._check_instance(app, instance)
        self._check_route(app)

    def _check_instance(self, app: dict, instance: dict) -> None:
        ids = {"app_id": app["app_id"], "instance_id": instance["instance_id"]}
        key = f"app {app['app_id']} instance {instance['instance_id']}"
        runtime = self.op.runtime_for(instance["kind"])
        try:
            problem, boot_problem = runtime.check(instance)
        except OperatorError as exc:
            self._set(key, f"{key}: cannot inspect: {exc}")
            return
        if problem is None and boot_problem is None:
            self._set(key, None)
            return
        if problem is None:
            self._found(key, "instance", f"{key}: {boot_problem}", **ids)
            try:
                runtime.enable(instance)
            except OperatorError as exc:  # reported in /healthz
                self._set(key, f"{key}: {boot_problem}; enabling it failed: "
                               f"{exc}")
                log("drift.repair_failed", logging.ERROR, error=str(exc),
                    **ids)
                return
            self._repaired(key, "instance", **ids)
            return
        self._found(key, "instance", f"{key} should run but {problem}", **ids)
        plan = {"kind": instance["kind"],
                "health_check_path": app.get("health_check_path")}
        try:
            runtime.start(instance)
            self.op.wait_healthy(plan, instance)
        except Exception as exc:  # reported in /healthz, tried again later
            self._set(key, f"{key} should run but {problem}; starting it "
                           f"again failed: {exc}")
            log("drift.repair_failed", logging.ERROR, error=str(exc), **ids)
            return
        self._repaired(key, "instance", **ids)

    def _check_route(self, app: dict) -> None:
        serving = [i for _, i in sorted(app["instances"].items())
                   if i.get("serving")]
        if not app.get("domain") or not serving:
            return
        app_id = app["app_id"]
        key = f"app {app_id} route"
        try:
            current = {dial for dial, _ in self.op.caddy.app_upstreams(app_id)}
        except OperatorError as exc:
            self._set(key, f"{key}: cannot read it: {exc}")
            return
        wanted = _serving_dials(app)
        if current == wanted:
            self._set(key, None)
            return
        detail = (f"route of app {app_id} lists {sorted(current) or 'nothing'}"
                  f", the record says {sorted(wanted)}")
        self._found(key, "route", detail, app_id=app_id)
        job = _RouteWriter(app_id, app["domain"])
        try:
            self.op.strategies._route(job, app, serving)
            self.op.store.save_app(app)
        except Exception as exc:  # reported in /healthz, tried again later
            self._set(key, f"{detail}; writing it failed: {exc}")
            log("drift.repair_failed", logging.ERROR, error=str(exc),
                app_id=app_id)
            return
        self._repaired(key, "route", app_id=app_id)


def _serving_dials(app: dict) -> set:
    """Return the upstream dials that an app's route should list: one per
    serving instance."""
    return {f"127.0.0.1:{instance['port']}"
            for instance in app["instances"].values()
            if instance.get("serving")}


class _RouteWriter:
    """The two attributes Strategies._route reads from a job."""

    def __init__(self, app_id: int, domain: str):
        self.app_id = app_id
        self.plan = {"domain": domain}


# === Operator ===

def _resolves_to(url: str, host: str, port: int) -> bool:
    """Return whether ``url`` would connect to host:port on this machine."""
    parts = urllib.parse.urlsplit(url)
    try:
        url_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if url_port != port or not parts.hostname:
        return False
    try:
        infos = socket.getaddrinfo(parts.hostname, url_port,
                                   proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    target = ipaddress.ip_address(host) if _is_ip(host) else None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if target is None or address == target:
            return True
        if target.is_unspecified and (address.is_loopback or
                                      address.is_private):
            return True
    return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def journalctl_command(systemctl: list) -> list:
    """Derive the journalctl argv from the configured systemctl argv.

    The last element must be "systemctl" (or a path ending in /systemctl)
    and is replaced by "journalctl" in the same directory, so a prefix such
    as nsenter or ssh applies to both commands.
    """
    head, tail = posixpath.split(systemctl[-1])
    if tail != "systemctl":
        raise RequestError(f"cannot derive journalctl from the systemctl "
                           f"setting {systemctl!r}: its last element is not "
                           f"systemctl", status=501)
    return list(systemctl[:-1]) + [posixpath.join(head, "journalctl")]


def _record_time(text: str | None) -> float | None:
    """Parse a utc_now() timestamp into seconds since the epoch."""
    if not text:
        return None
    try:
        moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def _yield_to_requests(count: int) -> None:
    """Pause the pruning thread now and then.

    When the pruner parsed every record, it held the GIL for the
    interpreter's whole switch interval at a time, which doubled the p99 of
    status reads in bench/ (5.0 ms against 2.5 ms). Records without
    HISTORY_XATTR are still parsed, so a short sleep every PRUNE_BATCH
    records lets request threads run first.
    """
    if count % PRUNE_BATCH == PRUNE_BATCH - 1:
        time.sleep(PRUNE_PAUSE_S)


# Extended attribute of a deployment record file that contains the fields
# history pruning ranks by, so that pruning needs no JSON parse per record.
# Store.save_deployment sets it on the temporary file before the fsync and
# the rename, so it always describes the content of its file: a rewrite
# replaces the file, and the new file carries its own attribute or none.
HISTORY_XATTR = "user.crate_operator.history"
# Version tag at the start of the attribute value.
HISTORY_KEY_VERSION = "1"


def history_key(record: dict) -> bytes | None:
    """Encode created_at, state and finished_at for HISTORY_XATTR.

    Returns None when a field is not an ASCII string without whitespace
    (a lone surrogate would make encode() raise). Pruning then reads the
    record's content, and ranks it, or skips it when a field is not ASCII.
    """
    fields = [HISTORY_KEY_VERSION]
    for name in ("created_at", "state", "finished_at"):
        value = record.get(name)
        if value is None:
            fields.append("-")
        elif isinstance(value, str) and value and value != "-" and \
                value.isascii() and not any(char.isspace() for char in value):
            fields.append(value)
        else:
            return None
    return " ".join(fields).encode()


def _parse_history_key(value: bytes) -> dict | None:
    """Decode a history_key() value; None when it is not version 1."""
    try:
        fields = value.decode().split(" ")
    except UnicodeDecodeError:
        return None
    if len(fields) != 4 or fields[0] != HISTORY_KEY_VERSION:
        return None
    created_at, state, finished_at = (None if field == "-" else field
                                      for field in fields[1:])
    return {"created_at": created_at, "state": state,
            "finished_at": finished_at}


def _read_history_entry(path: str) -> tuple[dict | None, bool]:
    """Return (created_at, state and finished_at of one record, parsed).

    The fields come from HISTORY_XATTR when the file has it. A record
    without it (written by a version before the attribute, or on a
    filesystem without user xattrs) is parsed, and the attribute is added
    through the file descriptor that was read, so it matches that content
    even when a writer replaces the file meanwhile. The entry is None when
    the file is gone or contains no JSON object.
    """
    try:
        entry = _parse_history_key(os.getxattr(path, HISTORY_XATTR))
    except FileNotFoundError:
        return None, False
    except OSError:
        entry = None
    if entry is not None:
        return entry, False
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None, False
    with handle:
        try:
            record = json.loads(handle.read())
        except ValueError as exc:
            record, error = None, str(exc)
        else:
            error = "the file contains no JSON object"
            if isinstance(record, dict) and not all(
                    record.get(name) is None or (
                        isinstance(record.get(name), str)
                        and record.get(name).isascii())
                    for name in ("created_at", "state", "finished_at")):
                # Ranking compares these fields, and a list or a number
                # would make the sort or the state check raise TypeError.
                record = None
                error = "created_at, state or finished_at is not an ASCII string"
        if not isinstance(record, dict) or not record:
            # Such a record is neither ranked nor removed, so it needs a
            # look or removal by hand.
            log("history.record_invalid", logging.WARNING, path=path,
                error=error)
            return None, True
        key = history_key(record)
        if key is not None:
            try:
                _set_xattr(handle.fileno(), HISTORY_XATTR, key)
            except OSError as exc:
                log("history.key_not_saved", logging.WARNING, path=path,
                    error=str(exc))
    return {name: record.get(name) for name in
            ("created_at", "state", "finished_at")}, True


def prune_history(store: Store, max_records: int, max_age_s: float,
                  now: float | None = None) -> int:
    """Remove finished deployment records past the retention; return count.

    Records are ranked newest first by created_at.  A finished record is
    removed when more than ``max_records`` records are newer, or when it
    finished more than ``max_age_s`` ago.  Queued and running records are
    never removed, and they count toward ``max_records``.

    The ranking fields come from each file's HISTORY_XATTR, so a pass reads
    no record content unless a record lacks the attribute.  No lock is
    taken: status reads of a record that is removed meanwhile see 404, as
    they would right after the pass.
    """
    now = time.time() if now is None else now
    names = [name for name in os.listdir(store.deployments_dir)
             if name.endswith(".json") and not name.startswith(".")]
    # (created_at, deployment id, state, finished_at) per record; the file
    # name is the deployment id followed by ".json".
    records = []
    parsed = 0
    for index, name in enumerate(names):
        entry, was_parsed = _read_history_entry(
            os.path.join(store.deployments_dir, name))
        parsed += was_parsed
        if entry is not None:
            records.append((entry["created_at"] or "", name[:-len(".json")],
                            entry["state"], entry["finished_at"]))
        _yield_to_requests(index)
    records.sort(reverse=True)
    removed = 0
    for rank, (_, deployment_id, state, finished_at) in enumerate(records):
        if state not in STATES_TERMINAL:
            continue
        finished = _record_time(finished_at)
        too_old = finished is not None and now - finished > max_age_s
        if rank < max_records and not too_old:
            continue
        store.delete_deployment(deployment_id)
        removed += 1
        _yield_to_requests(removed)
    if removed:
        fsync_dir(store.deployments_dir)
        METRICS.inc("crate_history_pruned_total", value=removed)
        log("history.pruned", removed=removed, kept=len(records) - removed,
            parsed=parsed)
    elif parsed:
        log("history.keys_added", parsed=parsed, kept=len(records))
    return removed


class HistoryPruner(PeriodicThread):
    """Background thread that applies the deployment history retention.

    Pruning only unlinks record files and takes no lock that status reads
    use, so reads are never blocked by it.
    """

    name = "history"

    def __init__(self, store: Store, config: Config):
        super().__init__()
        self.store = store
        self.config = config

    def interval_s(self) -> float:
        """Return history_prune_interval_s."""
        return self.config.history_prune_interval_s

    def run_once(self) -> None:
        """Prune once with the configured retention."""
        prune_history(self.store, self.config.history_max_records,
                      self.config.history_max_age_s)


class Operator:
    """The daemon's parts wired together; the HTTP API calls into it."""

    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.state_dir)
        self.systemd = Systemd(config.systemctl, config.unit_dir)
        self.caddy = CaddyClient(config.caddy_admin, config.caddy_server,
                                 config.caddy_listen,
                                 config.caddy_automatic_https)
        self.docker = DockerClient(config.docker_socket,
                                   config.docker_pull_timeout_s)
        self.runtimes = {"binary": BinaryRuntime(config, self.systemd,
                                                 self.store),
                         "docker": DockerRuntime(config, self.docker)}
        self.strategies = Strategies(self)
        self.runner = JobRunner()
        self.outbox = CallbackOutbox(self.store, config)
        self.history = HistoryPruner(self.store, config)
        self.reconciler = Reconciler(self)
        self._accept_lock = threading.Lock()
        self._ports_lock = threading.Lock()
        self._reserved_ports = {}
        self.started_at = time.time()

    # --- start-up

    def recover(self) -> None:
        """Finish, roll back or end the jobs an earlier process left.

        Runs before the listener serves, so each recovery job is queued
        ahead of any new request for its app.
        """
        for record in self.store.iter_deployments(unfinished_only=True):
            state = record.get("state")
            if state in STATES_TERMINAL:
                continue
            ids = {"app_id": record.get("app_id"),
                   "deployment_id": record.get("deployment_id")}
            plan = dict(record.get("plan") or {}, app_id=record["app_id"],
                        deployment_id=str(record["deployment_id"]))
            if state == "running":
                log("recovery.queued", logging.WARNING, **ids)
                self.runner.submit(record["app_id"],
                                   RecoveryJob(self, record, plan))
            elif record.get("action") in LIFECYCLE_ACTIONS:
                log("recovery.requeued", logging.WARNING, **ids)
                self.runner.submit(record["app_id"],
                                   LifecycleJob(self, record, plan))
            else:
                record["state"] = "failed"
                record["finished_at"] = utc_now()
                record["error"] = (
                    "the operator stopped before this deployment started; "
                    "the request body is not kept, so post the deployment "
                    "again with a new deployment_id")
                self.store.save_deployment(record)
                self.outbox.emit(record, "deployment.failed")
                log("deployment.interrupted", logging.WARNING, **ids)

    # --- helpers used by strategies

    def load_or_new_app(self, plan: dict) -> dict:
        """Return the app record, creating an empty one for a new app."""
        app = self.store.app(plan["app_id"])
        if app is None:
            app = {"app_id": plan["app_id"], "team_id": plan["team_id"],
                   "environment_id": plan["environment_id"],
                   "kind": plan["kind"], "model": plan["model"],
                   "domain": None, "instances": {}, "allocations": [],
                   "serving_version": None, "created_at": utc_now()}
        app["health_check_path"] = plan.get("health_check_path")
        return app

    def free_ports(self, count: int) -> list:
        """Pick ``count`` free loopback ports from the configured range.

        A port is skipped when any app record uses it, a deploy reserved it
        recently, or something on 127.0.0.1 already accepts connections on
        it.
        """
        low, high = self.config.port_range_min, self.config.port_range_max
        used = self.store.used_ports()
        picked = []
        with self._ports_lock:
            now = time.monotonic()
            self._reserved_ports = {p: t for p, t in self._reserved_ports.items()
                                    if now - t < PORT_RESERVATION_S}
            size = high - low + 1
            start = random.randrange(size)
            for offset in range(size):
                port = low + (start + offset) % size
                if port in used or port in self._reserved_ports or \
                        _port_in_use(port):
                    continue
                picked.append(port)
                if len(picked) == count:
                    break
            if len(picked) < count:
                raise StepError(
                    f"only {len(picked)} free ports in port_range_min.."
                    f"port_range_max ({low}-{high}), {count} needed; widen "
                    f"the range")
            for port in picked:
                self._reserved_ports[port] = now
        return picked

    def runtime_for(self, kind: str):
        """Return the runtime of an app kind ("binary" or "docker")."""
        return self.runtimes[kind]

    def wait_healthy(self, plan: dict, instance: dict) -> None:
        """Wait until an instance passes its health check, or raise."""
        cfg = self.config
        runtime = self.runtime_for(instance["kind"])
        path = plan.get("health_check_path")
        deadline = time.monotonic() + cfg.health_timeout_s
        next_unit_check = time.monotonic() + HEALTH_UNIT_CHECK_S
        detail = "not checked yet"
        while True:
            ready, detail = runtime.probe(instance, path)
            if ready:
                break
            if time.monotonic() >= next_unit_check:
                problem = runtime.problem(instance)
                if problem:
                    raise StepError(f"instance {instance['instance_id']} stopped "
                                    f"during its health check: {problem}")
                next_unit_check = time.monotonic() + HEALTH_UNIT_CHECK_S
            if time.monotonic() > deadline:
                target = f"http://127.0.0.1:{instance['port']}{path or ''}"
                raise StepError(
                    f"health check of instance {instance['instance_id']} on "
                    f"{target} timed out after {cfg.health_timeout_s:g}s "
                    f"(last result: {detail})")
            if detail == PROBE_REFUSED and runtime.app_listens_on_host:
                wait_for_listener(instance["port"], cfg.health_interval_s)
            else:
                time.sleep(cfg.health_interval_s)
        if not path:
            self._wait_grace(runtime, instance)

    def _wait_grace(self, runtime, instance: dict) -> None:
        """Without a health path the unit must stay active for a while."""
        end = time.monotonic() + self.config.health_grace_s
        while time.monotonic() < end:
            time.sleep(self.config.health_interval_s)
            problem = runtime.problem(instance)
            if problem:
                raise StepError(f"instance {instance['instance_id']} did not "
                                f"stay up: {problem}")

    # --- requests

    def check_urls(self, value: dict) -> None:
        """Reject URLs aimed at this operator, Caddy's admin API or a blocked host.

        Only what is known without DNS is checked here (a literal address, a
        blocked name); the rest is checked when the connection is made.
        """
        listen_host, listen_port = parse_listen(self.config.listen)
        targets = [(listen_host, listen_port, "the operator's own listener")]
        admin = urllib.parse.urlsplit(self.config.caddy_admin)
        if admin.scheme in ("http", "https") and admin.hostname:
            targets.append((admin.hostname, admin.port or 80,
                            "the Caddy admin API"))
        errors = []
        policy = OutboundPolicy.from_config(self.config)
        for field in ("callback_url", "asset_url"):
            url = value.get(field)
            if not url:
                continue
            problem = policy.check_before_resolving(
                urllib.parse.urlsplit(url).hostname or "")
            if problem:
                errors.append({"field": f"$.{field}", "reason": problem})
                continue
            for host, port, what in targets:
                if _resolves_to(url, host, port):
                    errors.append({"field": f"$.{field}",
                                   "reason": f"points at {what}"})
        if errors:
            raise RequestError("invalid request", errors)

    def accept_deploy(self, endpoint: str, value: dict, ignored: list,
                      plan: dict) -> tuple:
        """Record a deployment and queue its job; return (status, answer).

        The same deployment_id with the same body returns the first answer;
        with another body it is a conflict.  Runs under one lock so that two
        identical requests arriving together start one job.
        """
        digest = self.store.request_digest(idempotency_view(endpoint, value))
        key = str(value["deployment_id"])
        with self._accept_lock:
            existing = self.store.deployment(key)
            if existing is not None:
                if existing.get("request_digest") != digest:
                    raise ConflictError(
                        f"deployment_id {key} was already used with a "
                        f"different request; use a new deployment_id")
                return 202, dict(existing["answer"], duplicate=True)
            app = self.store.app(plan["app_id"])
            self._check_app_ownership(app, plan)
            self._check_domain(plan["app_id"], plan["domain"])
            record = self._new_record(app, plan, digest, ignored)
            # emit stores the record before its event; inside the lock, so
            # that a repeat of this request finds the record.
            self.outbox.emit(record, "deployment.queued")
        log("deployment.accepted", strategy=plan["strategy"],
            version=plan["version"], app_id=plan["app_id"],
            deployment_id=key)
        self.runner.submit(plan["app_id"], DeployJob(self, record, plan))
        return 202, record["answer"]

    def _check_app_ownership(self, app: dict | None, plan: dict) -> None:
        if app is None:
            return
        for field in ("team_id", "environment_id"):
            if app[field] != plan[field]:
                raise ConflictError(
                    f"app {plan['app_id']} belongs to {field} {app[field]!r}, "
                    f"not {plan[field]!r}")
        if (app["kind"], app["model"]) != (plan["kind"], plan["model"]):
            raise ConflictError(
                f"app {plan['app_id']} is a {app['kind']} app of the "
                f"{app['model']} model; it cannot be deployed as a "
                f"{plan['kind']} app of the {plan['model']} model")

    def _check_domain(self, app_id: int, domain: str) -> None:
        """Raise ConflictError when another app or route owns ``domain``."""
        for other_id in self.store.apps_with_domain(domain):
            if other_id != app_id:
                raise ConflictError(
                    f"domain {domain} is routed to app {other_id}")
        owner = self.caddy.domain_owner(domain)
        if owner is not None and owner != caddy_route_id(app_id):
            raise ConflictError(
                f"domain {domain} is already routed by Caddy route {owner}")

    def _new_record(self, app: dict | None, plan: dict, digest: str,
                    ignored: list) -> dict:
        key = plan["deployment_id"]
        status_path = ("/v1/app/instance/deploy/{}/status"
                       if plan["model"] == "slots"
                       else "/v1/app/deploy/{}/status")
        answer = {"deployment_id": plan["request_deployment_id"],
                  "app_id": plan["app_id"], "state": "queued",
                  "status_url": status_path.format(key),
                  "ignored_fields": ignored, "duplicate": False}
        return {
            "deployment_id": plan["request_deployment_id"],
            "app_id": plan["app_id"], "kind": plan["kind"],
            "model": plan["model"], "strategy": plan["strategy"],
            "action": "update" if app and app.get("instances") else "create",
            "state": "queued", "error": None, "created_at": utc_now(),
            "started_at": None, "finished_at": None,
            "target_version": plan["version"],
            "serving_version": app.get("serving_version") if app else None,
            "domain": plan["domain"], "steps": [], "instances": [],
            "allocations": copy.deepcopy(app.get("allocations", []))
            if app else [],
            "callback_url": plan["callback_url"],
            "env_var_names": sorted(plan["env_vars"]),
            "request_digest": digest, "answer": answer, "deployment_seq": 0,
        }

    # --- lifecycle requests

    def _owned_app(self, value: dict) -> dict:
        """Return the app a lifecycle request names, or raise 404/409."""
        app = self.store.app(value["app_id"])
        if app is None:
            raise NotFoundError(f"app {value['app_id']} has no instances on "
                                f"this host")
        for field in ("team_id", "environment_id"):
            if app[field] != value[field]:
                raise ConflictError(
                    f"app {value['app_id']} belongs to {field} "
                    f"{app[field]!r}, not {value[field]!r}")
        return app

    def _lifecycle_record(self, key: str, app: dict | None, action: str,
                          value: dict, ignored: list) -> dict:
        answer = {"deployment_id": key, "app_id": value["app_id"],
                  "state": "queued",
                  "status_url": f"/v1/app/deploy/{key}/status",
                  "ignored_fields": ignored, "duplicate": False}
        app = app or {}
        return {
            "deployment_id": key, "app_id": value["app_id"],
            "kind": app.get("kind"), "model": app.get("model"),
            "strategy": None, "action": action, "state": "queued",
            "error": None, "created_at": utc_now(), "started_at": None,
            "finished_at": None, "target_version": None,
            "serving_version": app.get("serving_version"),
            "domain": app.get("domain"), "steps": [],
            "instances": [instance_view(i) for _, i in
                          sorted(app.get("instances", {}).items())],
            "allocations": copy.deepcopy(app.get("allocations", [])),
            "callback_url": value["callback_url"], "answer": answer,
            "deployment_seq": 0,
        }

    def accept_lifecycle(self, action: str, value: dict,
                         ignored: list) -> tuple:
        """Queue a start, stop or restart of one instance."""
        app = self._owned_app(value)
        instance_id = value["instance_id"]
        if instance_id not in app["instances"]:
            raise NotFoundError(
                f"app {value['app_id']} has no instance {instance_id} on this "
                f"host; known: {', '.join(sorted(app['instances']))}")
        key = f"op-{secrets.token_hex(8)}"
        record = self._lifecycle_record(key, app, action, value, ignored)
        if app.get("domain") and value["domain"] != app["domain"]:
            note = (f"request domain {value['domain']} differs from the "
                    f"app's route domain {app['domain']}; the target is "
                    f"identified by app_id and instance_id")
            record["answer"]["domain_note"] = note
            log("lifecycle.domain_differs", request_domain=value["domain"],
                route_domain=app["domain"], app_id=value["app_id"],
                deployment_id=key)
        self.outbox.emit(record, "deployment.queued")
        plan = {"app_id": value["app_id"], "instance_id": instance_id,
                "deployment_id": key, "domain": app.get("domain")}
        record["plan"] = plan
        self.store.save_deployment(record)
        log(f"{action}.accepted", instance_id=instance_id,
            app_id=value["app_id"], deployment_id=key)
        self.runner.submit(value["app_id"], LifecycleJob(self, record, plan))
        return 202, record["answer"]

    def accept_delete(self, value: dict, ignored: list) -> tuple:
        """Queue the deletion of instances; cancel the app's queued jobs."""
        app = self.store.app(value["app_id"])
        if app is not None:
            self._owned_app(value)
        given = value.get("deployment_id")
        key = str(given) if given is not None else \
            f"op-{secrets.token_hex(8)}"
        digest = self.store.request_digest({"endpoint": "delete",
                                            "body": value})
        with self._accept_lock:
            existing = self.store.deployment(key)
            if existing is not None:
                if existing.get("request_digest") != digest:
                    raise ConflictError(
                        f"deployment_id {key} was already used with a "
                        f"different request; use a new deployment_id")
                return 202, dict(existing["answer"], duplicate=True)
            record = self._lifecycle_record(key, app, "delete", value,
                                            ignored)
            record["request_digest"] = digest
            if given is not None:
                record["answer"]["deployment_id"] = given
                record["answer"]["status_url"] = \
                    f"/v1/app/deploy/{key}/status"
            self.store.save_deployment(record)
        for job in self.runner.take_queued(value["app_id"]):
            job.cancel(f"cancelled by the deletion {key}")
        self.outbox.emit(record, "deployment.queued")
        plan = {"app_id": value["app_id"], "deployment_id": key,
                "instance_ids": value["instance_ids"],
                "domain": app.get("domain") if app else None}
        record["plan"] = plan
        self.store.save_deployment(record)
        log("delete.accepted", instance_ids=value["instance_ids"],
            app_id=value["app_id"], deployment_id=key)
        self.runner.submit(value["app_id"], LifecycleJob(self, record, plan))
        return 202, record["answer"]

    def update_domain(self, value: dict) -> tuple:
        """Move an app's route to a new domain in one Caddy call."""
        if value["server_id"] != self.config.server_id:
            raise RequestError("invalid request", [{
                "field": "$.server_id",
                "reason": f"is {value['server_id']!r}, but this host is "
                          f"{self.config.server_id!r}"}])
        self._owned_app(value)

        def change():
            return self._change_domain(value)

        return 200, self.runner.run_exclusive(
            value["app_id"], change, DOMAIN_UPDATE_WAIT_S)

    def _change_domain(self, value: dict) -> dict:
        app_id, old, new = value["app_id"], value["old_domain"], \
            value["new_domain"]
        # One request: change_domain reads the whole config and falls back
        # to parsing it when the route appears twice, so the index needs no
        # check here.
        route = self.caddy.get_app_route(app_id, check="none")
        hosts = []
        for matcher in (route or {}).get("match", []):
            hosts += [normalise_domain(h) for h in matcher.get("host", [])]
        answer = {"app_id": app_id, "old_domain": old, "new_domain": new,
                  "changed": False}
        if route is not None and new in hosts:
            return answer
        if route is None or old not in hosts:
            raise NotFoundError(
                f"no route of app {app_id} has domain {old}; the route "
                f"is not re-created here, deploy the app to create it")
        for other_id in self.store.apps_with_domain(new):
            if other_id != app_id:
                raise ConflictError(
                    f"domain {new} is routed to app {other_id}")
        self.caddy.change_domain(app_id, new)
        app = self.store.app(app_id)
        app["domain"] = new
        self.store.save_app(app)
        log("domain.updated", old_domain=old, new_domain=new, app_id=app_id)
        return dict(answer, changed=True)

    # --- observability

    def instance_logs(self, app_id: int, instance_id: str, lines: int) -> dict:
        """Return the last ``lines`` log lines of one instance.

        A unit's lines come from its journal, a container's from dockerd.

        Raises NotFoundError for an unknown app or instance, and
        DockerError when dockerd cannot return a container's log.
        """
        app = self.store.app(app_id)
        if app is None:
            raise NotFoundError(f"app {app_id} has no instances on this host")
        instance = app.get("instances", {}).get(instance_id)
        if instance is None:
            raise NotFoundError(f"app {app_id} has no instance "
                                f"{instance_id!r} on this host")
        if instance.get("kind", app.get("kind")) == "docker":
            output, truncated = self.docker.container_logs(
                instance["unit"], lines, LOGS_MAX_BYTES)
            text = output.decode("utf-8", "replace")
            return {"app_id": app_id, "instance_id": instance_id,
                    "unit": instance["unit"], "lines": text.splitlines(),
                    "truncated": truncated}
        argv = journalctl_command(self.config.systemctl) + [
            "--no-pager", "--quiet", "--output", "short-iso",
            "--lines", str(lines), "--unit", instance["unit"]]
        ids = {"app_id": app_id, "instance_id": instance_id}
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL,
                                    capture_output=True,
                                    timeout=JOURNAL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log("instance.logs_failed", logging.ERROR, error=str(exc), **ids)
            raise OperatorError(f"journalctl failed for unit "
                                f"{instance['unit']}: {exc}")
        if result.returncode != 0:
            error = result.stderr.decode("utf-8", "replace").strip()[:500]
            log("instance.logs_failed", logging.ERROR, error=error,
                exit_status=result.returncode, **ids)
            raise OperatorError(f"journalctl failed for unit "
                                f"{instance['unit']} with exit status "
                                f"{result.returncode}: {error}")
        output = result.stdout
        truncated = len(output) > LOGS_MAX_BYTES
        if truncated:
            # Keep the newest bytes, starting at a whole line.
            output = output[-LOGS_MAX_BYTES:]
            output = output[output.find(b"\n") + 1:]
        text = output.decode("utf-8", "replace")
        return {"app_id": app_id, "instance_id": instance_id,
                "unit": instance["unit"], "lines": text.splitlines(),
                "truncated": truncated}

    def events_page(self, after: int, limit: int) -> dict:
        """Return the callback events with seq > ``after``, oldest first."""
        events, more = self.store.outbox_after(after, limit)
        page = []
        for event in events:
            page.append({
                "seq": event["seq"], "event": event["event"],
                "delivery_id": event["delivery_id"],
                "deployment_id": event["deployment_id"],
                "app_id": event["app_id"],
                "created_at": utc_now(event["created_at"]),
                "delivered": bool(event.get("delivered_at")),
                "body": json.loads(event["body"]),
            })
        next_after = page[-1]["seq"] if page else after
        return {"events": page, "next_after": next_after, "more": more}

    def health(self) -> dict:
        """Return the reachability of systemd, Caddy and dockerd."""
        docker = False
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = UnixHTTPConnection(self.config.docker_socket, timeout=2.0)
            conn.request("GET", "/_ping")
            docker = conn.getresponse().status == 200
            conn.close()
        report = {"version": __version__, "server_id": self.config.server_id,
                  "systemd": self.systemd.ping(), "caddy": self.caddy.ping(),
                  "docker": docker, "jobs": self.runner.queue_length(),
                  "callbacks_pending": len(self.outbox._pending)}
        report["drift"] = self.reconciler.report()
        report["status"] = "ok" if report["systemd"] and report["caddy"] \
            else "degraded"
        return report


def plan_from_instances_request(value: dict, kind: str) -> dict:
    """Normalise a validated instances-model request into a deploy plan.

    The reference has no version in this model, so target_version is an
    optional extension and defaults to "deploy-<deployment_id>".
    """
    plan = plan_from_slots_request(dict(value, slots=value["instances"],
                                        target_version=value.get(
                                            "target_version") or
                                        f"deploy-{value['deployment_id']}"),
                                   kind)
    plan["model"] = "instances"
    return plan


def idempotency_view(endpoint: str, value: dict) -> dict:
    """Return the part of a request that its idempotency digest covers.

    The registry password is left out. Telling two passwords apart would
    need something derived from each password on disk, and the digest key
    lies in the same state_dir, so anyone who can read the digests could
    test password guesses offline. The cost: a resend of a deployment_id
    that differs only in the password counts as a duplicate, not a 409.
    """
    body = copy.deepcopy(value)
    credentials = body.get("registry_credentials")
    if isinstance(credentials, dict):
        credentials.pop("password", None)
    return {"endpoint": endpoint, "body": body}


def plan_from_slots_request(value: dict, kind: str) -> dict:
    """Normalise a validated slots-model request into a deploy plan.

    Docker fields are None for binary requests and the asset fields None
    for docker requests. registry_credentials stays in memory only: the
    plan is never stored, and the job drops it when it ends.
    plan["limits"] exists only when the request sets the limits extension,
    so runtimes read it with plan.get("limits").
    """
    plan = {
        "kind": kind, "model": "slots", "app_id": value["app_id"],
        "team_id": value["team_id"], "environment_id": value["environment_id"],
        "deployment_id": str(value["deployment_id"]),
        "request_deployment_id": value["deployment_id"],
        "strategy": value["deployment_strategy"], "domain": value["domain"],
        "env_vars": value.get("env_vars") or {},
        "health_check_path": value.get("health_check_path"),
        "version": value["target_version"],
        "asset_url": value.get("asset_url"),
        "asset_sha256": value.get("asset_sha256"),
        "image": value.get("image"),
        "image_tag": value.get("image_tag"),
        "docker_command": value.get("docker_command"),
        "volumes": value.get("volumes") or [],
        "registry_credentials": value.get("registry_credentials"),
        "targets": {slot: spec["port"] for slot, spec in value["slots"].items()},
        "callback_url": value["callback_url"],
        "canary": value.get("canary"),
    }
    limits = {name: number for name, number in
              (value.get("limits") or {}).items() if number is not None}
    if limits:
        plan["limits"] = limits
    return plan


# === HTTP API ===

# (method, path pattern, handler name, needs a token).  A string in place
# of True names a bool setting that, when true, lifts the token check.
ROUTES = (
    ("GET", r"/healthz", "healthz", False),
    ("GET", r"/v1/openapi\.json", "openapi", True),
    ("POST", r"/v1/app/instance/binary/deploy", "deploy_binary_slots", True),
    ("POST", r"/v1/app/instance/docker/deploy", "deploy_docker_slots", True),
    ("POST", r"/v1/app/binary/deploy", "deploy_binary_instances", True),
    ("POST", r"/v1/app/docker/deploy", "deploy_docker_instances", True),
    ("GET", r"/v1/app/deploy/(?P<id>[^/]+)/status", "status_legacy", True),
    ("GET", r"/v1/app/instance/deploy/(?P<id>[^/]+)/status",
     "status_instance", True),
    ("POST", r"/v1/app/delete", "delete", True),
    ("POST", r"/v1/app/domain/update", "domain_update", True),
    ("POST", r"/v1/app/start", "start", True),
    ("POST", r"/v1/app/stop", "stop", True),
    ("POST", r"/v1/app/restart", "restart", True),
    ("GET", r"/metrics", "metrics", "metrics_public"),
    ("GET", r"/v1/app/logs", "app_logs", True),
    ("GET", r"/v1/events", "events", True),
)
# Paths without a parameter are looked up in a dict; only the two status
# paths are matched with a regular expression. Each value lists every
# (method, handler name, auth) of the path, for the 405 answer.
_STATIC_ROUTES: dict = {}
_PARAM_ROUTES = []
for _method, _pattern, _name, _auth in ROUTES:
    if "(" in _pattern:
        _PARAM_ROUTES.append((re.compile(_pattern + r"\Z"),
                              [(_method, _name, _auth)]))
    else:
        _STATIC_ROUTES.setdefault(_pattern.replace("\\", ""), []).append(
            (_method, _name, _auth))
del _method, _pattern, _name, _auth

# Request bodies over max_body_bytes but up to this size are read and dropped
# after the 413, so that the connection stays usable. A larger body closes it.
DISCARD_LIMIT_BYTES = 16 << 20
# Longest chunk-size or trailer line of a chunked request body, and the
# maximum number of trailer lines after its last chunk.
CHUNK_LINE_MAX_BYTES = 4096
CHUNK_TRAILERS_MAX = 64
# Time a connection closed with unread request bytes keeps reading and
# dropping them. Closing a socket with unread data makes the kernel send a
# TCP reset, which can destroy the error response before the client reads it.
LINGER_S = 2.0
# Content-Length values with more digits are over every body limit. Python
# releases since 3.11 and 3.9.14 reject int() of texts over 4300 digits.
CONTENT_LENGTH_MAX_DIGITS = 18
# Longest header line read, as http.client's limit; max_header_bytes
# (smaller by default) applies to all lines together.
HEADER_LINE_MAX = 65536
# Longest request line, as http.server's limit; a longer one gets a 414.
REQUEST_LINE_MAX = 65536
_CONTENT_LENGTH_TEXT = re.compile(r"[0-9]+")
_CHUNK_SIZE_TEXT = re.compile(rb"[0-9A-Fa-f]{1,16}")


class TextAnswer(NamedTuple):
    """A non-JSON response body that a handler returns."""

    content_type: str
    text: str


class JSONBytes(NamedTuple):
    """A JSON response body that a handler returns already serialized."""

    body: bytes


# Longest raw status id whose validation is memoized; ids are at most 128
# characters, so the memo stays small even when clients send long paths.
STATUS_ID_MEMO_MAX_CHARS = 160


@functools.lru_cache(maxsize=1024)
def _status_id(endpoint: str, raw_id: str) -> tuple:
    """Return validate_path_param of a raw status path segment, memoized.

    Clients poll the same ids over and over, and the generic schema walk
    of the validation was one of the larger parts of a cached status read
    in a cProfile run.
    """
    value, errors = validate_path_param(endpoint, urllib.parse.unquote(raw_id))
    return value, tuple(errors)


def json_body(value) -> bytes:
    """Return the body of a JSON answer: one line, without indentation.

    json uses its C encoder only without indent: a status document of a
    finished deployment took 118 us with indent=1 and 20 us without.
    Clients parse the body, and `jq` shows it indented.
    """
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def render_status(record: dict) -> bytes:
    """Return the status response body of a deployment record.

    The same bytes as send_json writes for status_document(record), so a
    cached body and a fresh one cannot differ.
    """
    return json_body(status_document(record))


# (second, text) of the last Date header; see ApiHandler.date_time_string.
_date_header = (0, "")
# Status line and Server header by status code, for ApiHandler.send_body.
_STATUS_HEADS: dict = {}
# Series keys of crate_http_requests_total by (endpoint, status). Both come
# from small fixed sets, so the dict stays small.
_REQUEST_SERIES: dict = {}


# Sent on a connection over max_connections before it is closed.
_CONNECTION_LIMIT_BODY = json.dumps(
    {"error": "too many open connections (max_connections); retry later"}
).encode() + b"\n"
CONNECTION_LIMIT_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_CONNECTION_LIMIT_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\n" + _CONNECTION_LIMIT_BODY)
# Connections rejected over max_connections are logged at most once per
# this many seconds, with the count since the last line.
CONNECTION_LIMIT_LOG_S = 10.0


def build_tls_context(config) -> ssl.SSLContext | None:
    """Load the listener's certificate, key and client CAs; None without TLS.

    Raises ConfigError naming the file that is missing, invalid or readable
    by group or others.
    """
    cert, key = config.tls_cert_file, config.tls_key_file
    if not cert:
        return None
    check_private_file(key, "tls_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:
        raise ConfigError(f"cannot load tls_cert_file {cert} with "
                          f"tls_key_file {key}: {exc}")
    if config.tls_client_ca_file:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca_file)
        except OSError as exc:
            raise ConfigError(f"cannot load tls_client_ca_file "
                              f"{config.tls_client_ca_file}: {exc}")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def token_digests(pairs: list) -> list:
    """Return (name, SHA-256 of the token) pairs for match_token."""
    return [(name, hashlib.sha256(token.encode()).digest())
            for name, token in pairs]


def match_token(presented: str, digests: list) -> str | None:
    """Return the name of the token equal to presented, or None.

    Every token is compared in constant time, with no early exit, so the
    response time does not show which token matched or how much of it.
    Comparing SHA-256 digests also hides the tokens' lengths.
    """
    digest = hashlib.sha256(presented.encode()).digest()
    matched = None
    for name, expected in digests:
        if hmac.compare_digest(digest, expected):
            matched = name
    return matched


class ApiServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with TLS, a connection limit and SIGHUP reloads.

    Binding skips the reverse DNS lookup. tls_context and tokens are
    replaced whole by reload(), so that a connection uses the context that
    was current when it was accepted and a request checks the token set
    that was current when it arrived.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, operator: Operator):
        self.operator = operator
        config = operator.config
        self.tls_context = build_tls_context(config)
        self.tokens = token_digests(collect_tokens(config))
        self._connection_slots = threading.BoundedSemaphore(
            config.max_connections)
        self._rejected_connections = 0
        self._rejected_logged_at = -CONNECTION_LIMIT_LOG_S
        super().__init__(address, handler)

    def reload(self) -> None:
        """Re-read tokens_dir and the TLS files; keep the old ones on error."""
        log("operator.reloading", signal="SIGHUP")
        config = self.operator.config
        try:
            pairs = collect_tokens(config)
        except ConfigError as exc:
            log("operator.reload_failed", logging.ERROR, part="tokens",
                error=str(exc))
        else:
            self.tokens = token_digests(pairs)
            log("operator.tokens_loaded",
                names=",".join(name for name, _ in pairs))
        if not config.tls_cert_file:
            return
        try:
            self.tls_context = build_tls_context(config)
        except ConfigError as exc:
            log("operator.reload_failed", logging.ERROR, part="tls",
                error=str(exc))
        else:
            log("operator.tls_loaded", cert=config.tls_cert_file)

    def get_request(self) -> tuple:
        """Accept a connection and wrap it in the current TLS context.

        The TLS handshake happens later in the connection's thread, so
        that a slow client cannot stall the accept loop.
        """
        sock, address = super().get_request()
        context = self.tls_context
        if context is None:
            return sock, address
        try:
            return context.wrap_socket(sock, server_side=True,
                                       do_handshake_on_connect=False), address
        except OSError:
            sock.close()
            raise

    def process_request(self, request, client_address) -> None:
        """Start a thread for the connection, or reject it over the limit."""
        if not self._connection_slots.acquire(blocking=False):
            self._reject_connection(request, client_address)
            return
        METRICS.inc_series("crate_http_connections_open", (), 1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._free_slot()
            raise

    def process_request_thread(self, request, client_address) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._free_slot()

    def _free_slot(self) -> None:
        METRICS.inc_series("crate_http_connections_open", (), -1)
        self._connection_slots.release()

    def _reject_connection(self, sock, client_address) -> None:
        # Counted first, so that a client that has read the 503 finds it
        # in the metrics.
        METRICS.inc_series("crate_http_connections_rejected_total", ())
        # A TLS connection gets no response, because writing one would
        # need a handshake on the accept thread.
        if not isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(CONNECTION_LIMIT_RESPONSE)
        self.shutdown_request(sock)
        self._rejected_connections += 1
        now = time.monotonic()
        if now - self._rejected_logged_at >= CONNECTION_LIMIT_LOG_S:
            log("http.connections_rejected", logging.WARNING,
                count=self._rejected_connections, client=client_address[0],
                max_connections=self.operator.config.max_connections)
            self._rejected_connections = 0
            self._rejected_logged_at = now

    def server_bind(self) -> None:
        """Bind without socket.getfqdn, which may stall on a bad resolver."""
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """Log an error that escaped a connection's handler, then drop it.

        A client that resets its connection is logged without a traceback,
        and an idle keep-alive connection that times out is not logged (on
        Python 3.9 socket.timeout escapes http.server, which catches only
        TimeoutError). The stdlib default prints every traceback to stderr.
        """
        exc = sys.exc_info()[1]
        if isinstance(exc, socket.timeout):
            return
        if isinstance(exc, ssl.SSLError):
            log("http.tls_error", logging.WARNING, client=client_address[0],
                error=repr(exc))
            return
        if isinstance(exc, OSError):
            log("http.connection_error", logging.WARNING,
                client=client_address[0], error=repr(exc))
            return
        log("http.handler_error", logging.ERROR, exc_info=True,
            client=client_address[0], error=repr(exc))


class _HeaderLimitReader:
    """The file read_request_headers reads a request's header lines from.

    It raises the exceptions that http.server answers with 431 once the
    lines together exceed max_bytes or there are more than max_count, and
    stores the reason in .problem for the error response.
    """

    def __init__(self, rfile, max_bytes: int, max_count: int):
        self.rfile = rfile
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.size = 0
        self.count = 0
        self.problem = None

    def readline(self, limit: int = -1) -> bytes:
        """Read one header line, reading no further than the size limit."""
        # Two bytes past the limit: the CRLF of the empty line that ends
        # the header section, which does not count, still fits; any other
        # line read there puts the size over the limit.
        budget = self.max_bytes - self.size + 2
        line = self.rfile.readline(budget if limit < 0 else
                                   min(limit, budget))
        if line in (b"\r\n", b"\n", b""):
            return line
        self.size += len(line)
        self.count += 1
        if self.size > self.max_bytes:
            self.problem = (f"request header lines are longer than "
                            f"{self.max_bytes} bytes (max_header_bytes)")
            raise http.client.LineTooLong("header")
        if self.count > self.max_count:
            self.problem = (f"request has more than {self.max_count} "
                            f"header lines (max_header_count)")
            raise http.client.HTTPException(self.problem)
        return line


# RFC 9110 section 5.1: a field name is a token.
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 section 5.5: CR, LF and NUL are never part of a field value.
_FIELD_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")
# RFC 9112 section 2.3: HTTP-version is "HTTP/" DIGIT "." DIGIT.
_REQUEST_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
# RFC 9112 section 3: the words of a request line may be split on SP,
# HTAB, VT, FF and a bare CR, and on nothing else.
_REQUEST_LINE_SPACE = re.compile(r"[ \t\x0b\x0c\r]+")
# RFC 9112 section 3.2: Host is uri-host [":" port], where uri-host is a
# reg-name or an IP literal in brackets; the value may be empty.
_HOST_VALUE = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]*")


class RequestHeaders:
    """The header fields of one request, in their order.

    Names match without regard to case. Offers the part of http.client's
    HTTPMessage interface that the handler uses: get, get_all, ``in`` and
    items.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: list):
        self._fields = fields  # (lowercase name, name, value)

    def get(self, name: str, default=None):
        """Return the first value of a field, or default."""
        key = name.lower()
        for lower, _, value in self._fields:
            if lower == key:
                return value
        return default

    def get_all(self, name: str, default=None):
        """Return every value of a field in order, or default."""
        key = name.lower()
        values = [value for lower, _, value in self._fields if lower == key]
        return values or default

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def items(self) -> list:
        """Return (name, value) of every field, as sent."""
        return [(name, value) for _, name, value in self._fields]


def read_request_headers(reader) -> RequestHeaders:
    """Read header lines up to the empty line (RFC 9112 section 5).

    Raises ValueError naming the first invalid line: one without a colon,
    a field name that is not a token, obsolete line folding (a line that
    starts with a space or tab) and CR or NUL inside a value, and when the
    stream ends before the empty line. http.client skipped such a line and
    every line after it without an error, so a Content-Length after it
    went unseen.
    """
    fields = []
    while True:
        line = reader.readline(HEADER_LINE_MAX + 1)
        if line in (b"\r\n", b"\n"):
            return RequestHeaders(fields)
        if len(line) > HEADER_LINE_MAX:
            raise http.client.LineTooLong("header line")
        if not line.endswith(b"\n"):
            # The client closed its side inside the header section: the
            # request is incomplete and must not run.
            raise ValueError("the request ended before the empty line after "
                             "its header fields")
        text = str(line, "iso-8859-1")
        text = text[:-2] if text.endswith("\r\n") else text.rstrip("\n")
        if text[:1] in (" ", "\t"):
            raise ValueError("header lines folded onto the next line are "
                             "not accepted; send each field on one line")
        name, colon, value = text.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"invalid header line {text[:60]!r}; send "
                             f"name: value with a name of letters, digits "
                             f"and !#$%&'*+.^_`|~-")
        value = value.strip(" \t")
        if _FIELD_VALUE_FORBIDDEN.search(value):
            raise ValueError(f"header {name[:60]} contains a CR or NUL "
                             f"character")
        fields.append((name.lower(), name, value))


class _DeadlineReader(io.RawIOBase):
    """Socket reader of a connection that enforces request_deadline_s.

    The handler's deadline starts with the first bytes of a request and
    ends when its response starts. Each receive waits at most
    request_timeout_s and never past the deadline.
    """

    def __init__(self, handler: ApiHandler):
        super().__init__()
        self.handler = handler

    def readable(self) -> bool:
        """Return True: this is a reader."""
        return True

    def readinto(self, buffer) -> int:
        """Receive into buffer, raising socket.timeout at the deadline."""
        return self.handler.receive_into(buffer)


def tls_handshake(sock: ssl.SSLSocket, timeout_s: float,
                  deadline_s: float) -> None:
    """Run the server side of a TLS handshake within deadline_s in total.

    A blocking handshake applies its timeout to each read, so a client
    sending one byte at a time could keep it going for hours.
    """
    deadline = time.monotonic() + deadline_s
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                poller.modify(sock, select.POLLIN)
            except ssl.SSLWantWriteError:
                poller.modify(sock, select.POLLOUT)
            remaining = min(timeout_s, deadline - time.monotonic())
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise socket.timeout("TLS handshake not finished within "
                                     "request_timeout_s or "
                                     "request_deadline_s")
    finally:
        sock.settimeout(timeout_s)


def certificate_common_name(certificate: dict | None) -> str | None:
    """Return the subject commonName of a verified peer certificate."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value[:128]
    return None


# A string runs to its closing quote or, unterminated, to the end of the
# text, so every match attempt succeeds and the scan stays linear.
_JSON_STRING = re.compile(r'"(?:[^"\\]+|\\.)*(?:"|\\?\Z)', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth_over(text: str, limit: int) -> bool:
    """Return True when arrays and objects in text nest deeper than limit.

    Strings are removed first, so brackets inside them do not count. This
    runs before json.loads, whose C scanner recurses once per level and
    raises RecursionError near 1000 levels deep.
    """
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


class ApiHandler(http.server.BaseHTTPRequestHandler):
    """One HTTP/1.1 connection of the API; one method per endpoint.

    Every response is JSON with an exact Content-Length, and HEAD gets the
    headers of the GET response without its body. A request body is read
    to its end before the request is routed, so every error response leaves
    a kept-alive connection at the start of the next request. When the end
    of the body cannot be found (invalid framing, a body over
    DISCARD_LIMIT_BYTES, a timeout) the response says Connection: close.
    """

    protocol_version = "HTTP/1.1"
    # A request line without a version (HTTP/0.9) is answered as HTTP/1.0,
    # because the stdlib omits the status line and headers for HTTP/0.9.
    default_request_version = "HTTP/1.0"
    server_version = f"crate-operator/{__version__}"
    # send_json writes the headers and the body separately. With Nagle's
    # algorithm on, the body waits for the client's delayed ACK (about 40 ms
    # on Linux) on every kept-alive request.
    disable_nagle_algorithm = True
    sys_version = ""
    timeout = 30.0
    # send_json writes the headers and the body in two send() calls. With
    # Nagle's algorithm the body waits for the client's delayed ACK, which
    # added about 20 ms to each response on a kept-alive loopback connection
    # (measured with tests/test_http.py, 2 cores).
    disable_nagle_algorithm = True
    # True once the connection may hold request bytes that were not read.
    _unread_request = False
    # Monotonic time by which the current request must have arrived; None
    # between requests.
    _deadline = None
    _deadline_passed = False
    _responded = False
    _header_reader = None
    # Token name, the ids of the body and, with mutual TLS, the client
    # certificate's common name, for the log line of the request.
    _token_name = None
    _request_ids: dict = {}
    _client_cert = None
    # (major, minor) of the request line's HTTP version.
    _version = (1, 0)

    # --- plumbing

    def setup(self) -> None:
        """Finish the TLS handshake, then read through _DeadlineReader."""
        if isinstance(self.request, ssl.SSLSocket):
            tls_handshake(self.request, self.timeout,
                          self.server.operator.config.request_deadline_s)
            self._client_cert = certificate_common_name(
                self.request.getpeercert())
        super().setup()
        socket_file = self.rfile
        self.rfile = io.BufferedReader(_DeadlineReader(self))
        socket_file.close()

    def receive_into(self, buffer) -> int:
        """Receive bytes of a request within request_timeout_s and the deadline."""
        timeout = self.timeout
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._deadline_passed = True
                raise socket.timeout("request_deadline_s passed")
            timeout = min(timeout, remaining)
        # settimeout is a system call; between requests the timeout is
        # already request_timeout_s.
        if timeout != self.connection.gettimeout():
            self.connection.settimeout(timeout)
        try:
            count = self.connection.recv_into(buffer)
        except socket.timeout:
            if self._deadline is not None and \
                    time.monotonic() >= self._deadline:
                self._deadline_passed = True
            raise
        if count and self._deadline is None:
            self._deadline = (time.monotonic() +
                              self.server.operator.config.request_deadline_s)
        return count

    def handle_one_request(self) -> None:
        """Handle one request; a partial request that timed out gets 408.

        http.server closes such a connection without a response, and on
        Python 3.9 its socket.timeout escapes to handle_error.
        """
        self._responded = False
        self._token_name = None
        self._request_ids = {}
        self.request_version = self.default_request_version
        self.requestline = ""
        self.command = None
        try:
            super().handle_one_request()
        except socket.timeout:
            self.close_connection = True
        if self._deadline is not None and not self._responded:
            self._close_after_response()
            if self._deadline_passed:
                reason = "within request_deadline_s"
            else:
                reason = "with no pause over request_timeout_s"
            log("http.request_timeout", client=self.client_address[0],
                error=f"request not received {reason}")
            with contextlib.suppress(OSError):
                self.send_json(408, {"error": f"request not received "
                                              f"{reason}"})
        self._deadline = None
        self._deadline_passed = False

    def parse_request(self) -> bool:
        """Parse the request line and the header fields, then act on
        Connection and Expect; return False after an error response.

        http.server's own parse_request reads the fields with the email
        package, which took half of the CPU time of a status request
        (py-spy, wrk at 32 connections). This one keeps its answers to a
        request line (400, 505 for HTTP/2 and later, HTTP/0.9 for GET
        only) and adds a 400 for invalid header lines.
        """
        self.command = None
        self.request_version = self.default_request_version
        self._version = (1, 0)
        self.close_connection = True
        if self.raw_requestline in (b"\r\n", b"\n"):
            # RFC 9112 section 2.2: an empty line before the request line
            # (left by a client after a body) is ignored.
            self.raw_requestline = self.rfile.readline(REQUEST_LINE_MAX + 1)
            if not self.raw_requestline:
                return False
            if len(self.raw_requestline) > REQUEST_LINE_MAX:
                self.send_error(http.HTTPStatus.REQUEST_URI_TOO_LONG)
                return False
        self.requestline = str(self.raw_requestline,
                               "iso-8859-1").rstrip("\r\n")
        words = [word for word in
                 _REQUEST_LINE_SPACE.split(self.requestline) if word]
        if not self._parse_request_line(words):
            return False
        config = self.server.operator.config
        self._header_reader = _HeaderLimitReader(
            self.rfile, config.max_header_bytes, config.max_header_count)
        try:
            self.headers = read_request_headers(self._header_reader)
        except http.client.HTTPException as exc:  # LineTooLong too
            self.send_error(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "header lines over the limit", str(exc))
            return False
        except ValueError as exc:
            self.send_error(http.HTTPStatus.BAD_REQUEST, str(exc))
            return False
        if not self._check_host():
            return False
        # Fields of one name form one comma-separated list (RFC 9110
        # section 5.3), so every Connection and Expect line counts.
        options = self._list_field("Connection")
        if "close" in options:
            self.close_connection = True
        elif "keep-alive" in options:
            self.close_connection = False
        if "100-continue" in self._list_field("Expect") and \
                self._version >= (1, 1):
            return self.handle_expect_100()
        return True

    def _list_field(self, name: str) -> set:
        """Return the lowercase members of a list-valued header field."""
        return {part.strip(" \t").lower()
                for value in self.headers.get_all(name) or []
                for part in value.split(",")}

    def _check_host(self) -> bool:
        """Send a 400 unless an HTTP/1.1 request has one valid Host field
        (RFC 9112 section 3.2); return whether the request may go on."""
        hosts = self.headers.get_all("Host") or []
        if self._version < (1, 1) and not hosts:
            return True
        if len(hosts) != 1 or not _HOST_VALUE.fullmatch(hosts[0]):
            self.send_error(http.HTTPStatus.BAD_REQUEST,
                            "send exactly one valid Host header field")
            return False
        return True

    def _parse_request_line(self, words: list) -> bool:
        """Set command, path and request_version from the request line."""
        if not words:
            self.send_error(http.HTTPStatus.BAD_REQUEST,
                            "the request line is empty")
            return False
        if len(words) >= 3:
            version = words[-1]
            match = _REQUEST_VERSION.fullmatch(version)
            if match is None:
                self.send_error(http.HTTPStatus.BAD_REQUEST,
                                f"invalid HTTP version {version[:40]!r}")
                return False
            number = int(match.group(1)), int(match.group(2))
            if number >= (2, 0):
                self.send_error(http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                                f"{version} is not supported; use HTTP/1.1")
                return False
            self.close_connection = number < (1, 1)
            self.request_version = version
            self._version = number
        if len(words) > 3:
            self.send_error(http.HTTPStatus.BAD_REQUEST,
                            f"invalid request line "
                            f"{self.requestline[:80]!r}")
            return False
        self.command, self.path = words[0], words[1] if len(words) > 1 \
            else ""
        if len(words) < 3:
            # HTTP/0.9 (no version) knows only GET, and its connection
            # carries one request.
            self.close_connection = True
            if len(words) == 1 or self.command != "GET":
                self.command = None
                self.send_error(http.HTTPStatus.BAD_REQUEST,
                                f"invalid request line "
                                f"{self.requestline[:80]!r}")
                return False
        if self.path.startswith("//"):
            # A path of "//host" reads as an address without a scheme, so
            # any redirect built from it would leave this server.
            self.path = "/" + self.path.lstrip("/")
        return True

    def _response_starts(self) -> None:
        """End the request's deadline, so that writes get request_timeout_s."""
        self._responded = True
        self._deadline = None
        if self.connection.gettimeout() != self.timeout:
            with contextlib.suppress(OSError):
                self.connection.settimeout(self.timeout)

    def log_message(self, format, *args):  # noqa: A002 (stdlib signature)
        """Silence the stdlib access log; dispatch logs each request."""

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Send a JSON error for a request that http.server rejects itself.

        http.server calls this for an invalid request line (400), a request
        line over 65536 bytes (414), header lines over max_header_bytes or
        max_header_count (431) and a method without a do_ method (501).
        The rest of such a request cannot be framed, so the connection
        closes.
        """
        self._close_after_response()
        text = message or self.responses.get(code, ("error",))[0]
        if code == http.HTTPStatus.REQUEST_URI_TOO_LONG:
            text = f"the request line is longer than {REQUEST_LINE_MAX} bytes"
        problem = getattr(self._header_reader, "problem", None)
        if code == http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE and problem:
            text, explain = problem, None
        if explain:
            text = f"{text}: {explain}"
        if code == http.HTTPStatus.NOT_IMPLEMENTED:
            text += "; the API accepts GET, HEAD and POST"
        log("http.rejected", method=str(self.command or "")[:20],
            status=code, error=text[:200], client=self.client_address[0])
        self.send_json(code, {"error": text})

    def handle_expect_100(self) -> bool:
        """Reject a body over max_body_bytes before the client sends it.

        After the 413 the connection closes, because a client may send the
        body anyway (RFC 9110 section 10.1.1). Other requests get
        100 Continue; their errors come after the body was read.
        """
        try:
            if self.headers.get("Transfer-Encoding") is None:
                self._check_length(self._content_length())
        except RequestError as exc:
            self._close_after_response()
            self.send_error_json(exc)
            return False
        return super().handle_expect_100()

    def finish(self) -> None:
        """Flush the response and, after a rejected body, linger."""
        super().finish()
        if self.close_connection and self._unread_request:
            self._linger()

    def _linger(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.connection.settimeout(remaining)
                if not self.connection.recv(1 << 16):
                    return

    def send_json(self, status: int, value, headers: dict | None = None):
        """Send a JSON response with an exact Content-Length."""
        self.send_body(status, "application/json", json_body(value), headers)

    def send_text(self, status: int, answer: TextAnswer) -> None:
        """Send a text response with an exact Content-Length."""
        self.send_body(status, answer.content_type, answer.text.encode())

    def send_body(self, status: int, content_type: str, body: bytes,
                  headers: dict | None = None) -> None:
        """Send the status line, headers and body in one write.

        The headers are the ones send_response and send_header would write,
        in the same order, but joined as one string: one send() per response
        instead of the stdlib's two (headers, then body) and no per-header
        method calls. log_request is not called, because log_message is
        silent and dispatch logs requests.
        """
        self._response_starts()
        parts = [self._status_head(status), self.date_time_string(),
                 "\r\nContent-Type: ", content_type,
                 "\r\nContent-Length: ", str(len(body)), "\r\n"]
        for key, item in (headers or {}).items():
            parts += (key, ": ", str(item), "\r\n")
        if self.close_connection:
            parts.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        data = "".join(parts).encode("latin-1", "strict")
        if self.command != "HEAD":
            data += body
        self.wfile.write(data)

    def _status_head(self, status: int) -> str:
        """Return the status line, Server header and "Date: " of a status."""
        head = _STATUS_HEADS.get(status)
        if head is None:
            phrase = self.responses.get(status, ("",))[0]
            head = (f"{self.protocol_version} {status} {phrase}\r\n"
                    f"Server: {self.version_string()}\r\nDate: ")
            _STATUS_HEADS[status] = head
        return head

    def date_time_string(self, timestamp=None) -> str:
        """Return the Date header text, formatted once per second."""
        global _date_header
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        second, text = _date_header
        if second != now:
            text = super().date_time_string(now)
            # One tuple assignment, so threads never see a mixed pair.
            _date_header = (now, text)
        return text

    def send_error_json(self, exc: OperatorError) -> None:
        """Send exc as a JSON error body with its status and headers."""
        answer = {"error": str(exc)}
        if getattr(exc, "errors", None):
            answer["errors"] = exc.errors
        self.send_json(exc.status, answer, getattr(exc, "headers", None))

    # --- request bodies

    def read_body(self) -> bytes:
        """Read the whole request body, or raise RequestError.

        A body over max_body_bytes (413) is still read to its end when it is
        at most DISCARD_LIMIT_BYTES long, so that the next request on a
        kept-alive connection starts at its first byte. Chunked bodies are
        decoded with the same limits. Invalid framing, a larger body and a
        read timeout close the connection instead.
        """
        headers = self.headers
        if "Content-Length" not in headers and \
                "Transfer-Encoding" not in headers:
            return b""
        try:
            if self._is_chunked():
                return self._read_chunked()
            length = self._content_length()
            if length > self.server.operator.config.max_body_bytes:
                self._discard(length)
                self._check_length(length)
            data = self.rfile.read(length)
        except socket.timeout:
            reason = ("within request_deadline_s" if self._deadline_passed
                      else "with no pause over request_timeout_s")
            raise self._framing_error(
                f"request body not received {reason}", 408)
        if len(data) != length:
            raise self._framing_error("request body ended before its "
                                      "Content-Length")
        return data

    def _close_after_response(self) -> None:
        """Close the connection after the response and linger before that."""
        self.close_connection = True
        self._unread_request = True

    def _framing_error(self, message: str, status: int = 400) -> RequestError:
        """Return an error after which the connection must close."""
        self._close_after_response()
        return RequestError(message, status=status)

    def _check_length(self, length: int) -> None:
        limit = self.server.operator.config.max_body_bytes
        if length > limit:
            raise RequestError(f"request body of {length} bytes is over the "
                               f"limit of {limit} bytes (max_body_bytes)",
                               status=413)

    def _content_length(self) -> int:
        """Return the declared body length, 0 without Content-Length.

        Several Content-Length values must be equal (RFC 9112 section 6.3),
        because a proxy in front could frame the body by another one.
        """
        texts = {part.strip(" \t") for value in
                 self.headers.get_all("Content-Length") or []
                 for part in value.split(",")}
        if not texts:
            return 0
        text = texts.pop()
        if texts or not _CONTENT_LENGTH_TEXT.fullmatch(text):
            raise self._framing_error("invalid Content-Length; send one "
                                      "decimal number of bytes")
        text = text.lstrip("0") or "0"
        if len(text) > CONTENT_LENGTH_MAX_DIGITS:
            self._close_after_response()
            raise RequestError(f"request body of {text[:40]}... bytes is over "
                               f"the limit (max_body_bytes)", status=413)
        return int(text)

    def _is_chunked(self) -> bool:
        """Return True for a chunked body; raise for other transfer codings."""
        values = self.headers.get_all("Transfer-Encoding")
        if values is None:
            return False
        # Only SP and HTAB are whitespace around a list member (RFC 9110
        # section 5.6.1); str.strip would also take VT, FF and others,
        # which a proxy in front may read otherwise.
        codings = [part.strip(" \t").lower() for value in values
                   for part in value.split(",") if part.strip(" \t")]
        if self._version < (1, 1):
            raise self._framing_error("Transfer-Encoding is not allowed in "
                                      "requests before HTTP/1.1")
        if self.headers.get("Content-Length") is not None:
            # RFC 9112 section 6.1: both headers may be a smuggling attempt.
            raise self._framing_error("send either Transfer-Encoding or "
                                      "Content-Length, not both")
        if codings != ["chunked"]:
            raise self._framing_error(
                f"transfer coding {', '.join(codings)[:100]!r} is not "
                f"supported; send chunked or Content-Length", 501)
        return True

    def _read_chunked(self) -> bytes:
        """Decode a chunked body (RFC 9112 section 7.1), trailers dropped."""
        limit = self.server.operator.config.max_body_bytes
        data = bytearray()
        total = 0
        while True:
            size = self._chunk_size()
            if size == 0:
                break
            total += size
            if total > limit and total > DISCARD_LIMIT_BYTES:
                self._close_after_response()
                raise RequestError(f"chunked request body is over the limit "
                                   f"of {limit} bytes (max_body_bytes)",
                                   status=413)
            if total > limit:
                data.clear()
                self._discard(size)
            else:
                data += self._read_exactly(size)
            if self.rfile.readline(3) != b"\r\n":
                raise self._framing_error("chunk data is not followed by "
                                          "CRLF; it is longer than its "
                                          "chunk size or ends in a bare LF")
        self._skip_trailers()
        self._check_length(total)
        return bytes(data)

    def _chunk_size(self) -> int:
        """Read a chunk-size line: hex digits, optional extensions (after
        optional SP or HTAB), CRLF (RFC 9112 section 7.1.1).

        Every line of a chunked body must end in CRLF, because a proxy in
        front may read a bare LF or stray whitespace differently and frame
        the body another way.
        """
        line = self.rfile.readline(CHUNK_LINE_MAX_BYTES + 1)
        size_text, semicolon, extensions = line[:-2].partition(b";")
        if semicolon:
            size_text = size_text.rstrip(b" \t")
        if not line.endswith(b"\r\n") or b"\r" in extensions or \
                b"\x00" in extensions or \
                not _CHUNK_SIZE_TEXT.fullmatch(size_text):
            raise self._framing_error("invalid chunk size line in the "
                                      "chunked request body")
        return int(size_text, 16)

    def _skip_trailers(self) -> None:
        for _ in range(CHUNK_TRAILERS_MAX + 1):
            line = self.rfile.readline(CHUNK_LINE_MAX_BYTES + 1)
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                break
            if line == b"\r\n":
                return
        raise self._framing_error("invalid or too many trailer lines after "
                                  "the last chunk")

    def _read_exactly(self, length: int) -> bytes:
        data = self.rfile.read(length)
        if len(data) != length:
            raise self._framing_error("request body ended inside a chunk")
        return data

    def _discard(self, length: int) -> None:
        """Read and drop length body bytes, or close when there are too many."""
        if length > DISCARD_LIMIT_BYTES:
            self._close_after_response()
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                raise self._framing_error("request body ended before its "
                                          "length")
            length -= len(chunk)

    def do_GET(self):  # noqa: N802 (stdlib naming)
        """Dispatch a GET."""
        self.dispatch()

    def do_HEAD(self):  # noqa: N802
        """Dispatch a HEAD."""
        self.dispatch()

    def do_POST(self):  # noqa: N802
        """Dispatch a POST."""
        self.dispatch()

    def do_PUT(self):  # noqa: N802
        """Dispatch a PUT (answered with 405)."""
        self.dispatch()

    def do_DELETE(self):  # noqa: N802
        """Dispatch a DELETE (answered with 405)."""
        self.dispatch()

    def do_PATCH(self):  # noqa: N802
        """Dispatch a PATCH (answered with 405)."""
        self.dispatch()

    def dispatch(self) -> None:
        """Read, authenticate, route and answer one request."""
        started = time.monotonic()
        # GET and HEAD are not logged (unless they fail with a 5xx), so
        # their waits and CPU time are not counted: reading a thread's CPU
        # clock is a system call, about 7 % of a status request's CPU time.
        counted = self.command not in ("GET", "HEAD")
        if counted:
            reset_waits()
        status = 500
        name = "unmatched"
        try:
            body = self.read_body()
            name, params, needs_token = self._route()
            if needs_token is True or (
                    needs_token and
                    not getattr(self.server.operator.config, needs_token)):
                self._authenticate()
            status, value = self.HANDLERS[name](self, body, params)
            if isinstance(value, JSONBytes):
                self.send_body(status, "application/json", value.body)
            elif isinstance(value, TextAnswer):
                self.send_text(status, value)
            else:
                self.send_json(status, value)
        except OperatorError as exc:
            status = exc.status
            self.send_error_json(exc)
        except Exception as exc:  # the one catch-all of a request
            log("http.internal_error", logging.ERROR, exc_info=True,
                path=self.path[:200], error=str(exc))
            status = 500
            # Part of the body may be unread, so the start of the next
            # request on this connection is unknown.
            self._close_after_response()
            self.send_json(500, {"error": "internal error; see the "
                                          "crate-operator log"})
        finally:
            key = _REQUEST_SERIES.get((name, status))
            if key is None:
                key = METRICS.series_key({"endpoint": name, "status": status})
                _REQUEST_SERIES[name, status] = key
            METRICS.inc_series("crate_http_requests_total", key)
            if counted or status >= 500:
                log("http.request", method=self.command,
                    path=self.path[:200], status=status,
                    client=self.client_address[0],
                    client_cert=self._client_cert, token=self._token_name,
                    **self._request_ids,
                    ms=round((time.monotonic() - started) * 1000, 1),
                    **(waits_ms() if counted else {}))

    def _route(self) -> tuple:
        try:
            path = urllib.parse.urlsplit(self.path).path
        except ValueError as exc:  # such as an unclosed "[" of an IPv6 host
            raise RequestError(f"invalid request target "
                               f"{self.path[:80]!r}: {exc}") from None
        params = {}
        candidates = _STATIC_ROUTES.get(path)
        if candidates is None:
            candidates = ()
            for pattern, routes in _PARAM_ROUTES:
                match = pattern.match(path)
                if match:
                    params, candidates = match.groupdict(), routes
                    break
        allowed = []
        for method, name, auth in candidates:
            if method == self.command or (method == "GET" and
                                          self.command == "HEAD"):
                return name, params, auth
            allowed.append(method)
        if allowed:
            if "GET" in allowed:
                allowed.append("HEAD")
            methods = ", ".join(sorted(set(allowed)))
            error = RequestError(f"method {self.command} is not allowed on "
                                 f"{path}; use {methods}", status=405)
            error.headers = {"Allow": methods}
            raise error
        raise NotFoundError(f"no endpoint {path}; see GET /v1/openapi.json")

    def _authenticate(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        name = match_token(token.strip(), self.server.tokens)
        if scheme.lower() == "bearer" and name is not None:
            self._token_name = name
        else:
            error = RequestError("missing or invalid bearer token; send "
                                 "Authorization: Bearer <token>", status=401)
            error.headers = {"WWW-Authenticate": 'Bearer realm="crate-operator"'}
            raise error

    def _json_body(self, body: bytes):
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise RequestError(f"Content-Type must be application/json, "
                               f"not {ctype[:100]!r}", status=415)
        limit = self.server.operator.config.max_json_depth
        try:
            text = body.decode("utf-8")
            if json_depth_over(text, limit):
                raise RequestError(f"request body nests arrays and objects "
                                   f"deeper than {limit} levels "
                                   f"(max_json_depth)")
            value = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(f"request body is not valid JSON: {exc}")
        except RecursionError:
            raise RequestError(f"request body nests arrays and objects "
                               f"deeper than {limit} levels (max_json_depth)")
        if isinstance(value, dict):
            self._request_ids = {
                key: str(value[key])[:128]
                for key in ("app_id", "deployment_id", "instance_id")
                if isinstance(value.get(key), (str, int))}
        return value

    def _validated(self, endpoint: str, body: bytes) -> tuple:
        result = validate_body(endpoint, self._json_body(body))
        if result.errors:
            raise RequestError(f"invalid request: {len(result.errors)} "
                               f"invalid field(s)", result.errors)
        return result.value, result.ignored

    # --- endpoints

    def handle_healthz(self, body, params):
        """GET /healthz: reachability of systemd, Caddy and dockerd."""
        report = self.server.operator.health()
        return (200 if report["status"] == "ok" else 503), report

    def handle_openapi(self, body, params):
        """GET /v1/openapi.json."""
        return 200, openapi_document(__version__)

    def handle_deploy_binary_slots(self, body, params):
        """POST /v1/app/instance/binary/deploy."""
        op = self.server.operator
        value, ignored = self._validated("deploy_binary_slots", body)
        op.check_urls(value)
        plan = plan_from_slots_request(value, "binary")
        return op.accept_deploy("deploy_binary_slots", value, ignored, plan)

    def handle_deploy_docker_slots(self, body, params):
        """POST /v1/app/instance/docker/deploy."""
        op = self.server.operator
        value, ignored = self._validated("deploy_docker_slots", body)
        op.check_urls(value)
        plan = plan_from_slots_request(value, "docker")
        op.runtime_for("docker").check_plan(plan)
        return op.accept_deploy("deploy_docker_slots", value, ignored, plan)

    def handle_deploy_docker_instances(self, body, params):
        """POST /v1/app/docker/deploy (the instances model)."""
        op = self.server.operator
        value, ignored = self._validated("deploy_docker_instances", body)
        op.check_urls(value)
        plan = plan_from_instances_request(value, "docker")
        op.runtime_for("docker").check_plan(plan)
        return op.accept_deploy("deploy_docker_instances", value, ignored,
                                plan)

    def handle_deploy_binary_instances(self, body, params):
        """POST /v1/app/binary/deploy (the instances model)."""
        op = self.server.operator
        value, ignored = self._validated("deploy_binary_instances", body)
        op.check_urls(value)
        plan = plan_from_instances_request(value, "binary")
        return op.accept_deploy("deploy_binary_instances", value, ignored,
                                plan)

    def _lifecycle(self, action: str, body: bytes):
        op = self.server.operator
        value, ignored = self._validated(action, body)
        op.check_urls(value)
        return op.accept_lifecycle(action, value, ignored)

    def handle_start(self, body, params):
        """POST /v1/app/start."""
        return self._lifecycle("start", body)

    def handle_stop(self, body, params):
        """POST /v1/app/stop."""
        return self._lifecycle("stop", body)

    def handle_restart(self, body, params):
        """POST /v1/app/restart."""
        return self._lifecycle("restart", body)

    def handle_delete(self, body, params):
        """POST /v1/app/delete."""
        op = self.server.operator
        value, ignored = self._validated("delete", body)
        op.check_urls(value)
        return op.accept_delete(value, ignored)

    def handle_domain_update(self, body, params):
        """POST /v1/app/domain/update (synchronous)."""
        value, _ignored = self._validated("domain_update", body)
        return self.server.operator.update_domain(value)

    def _status(self, endpoint: str, raw_id: str):
        if len(raw_id) <= STATUS_ID_MEMO_MAX_CHARS:
            value, errors = _status_id(endpoint, raw_id)
        else:
            value, errors = validate_path_param(
                endpoint, urllib.parse.unquote(raw_id))
        if errors:
            raise RequestError("invalid deployment id", list(errors))
        body = self.server.operator.store.deployment_view(
            str(value), render_status)
        if body is None:
            raise NotFoundError(f"no deployment {value} on this host")
        return 200, JSONBytes(body)

    def handle_status_legacy(self, body, params):
        """GET /v1/app/deploy/{deployment_id}/status (string ids)."""
        return self._status("status_legacy", params["id"])

    def handle_status_instance(self, body, params):
        """GET /v1/app/instance/deploy/{deployment_id}/status (int ids)."""
        return self._status("status_instance", params["id"])

    def _query(self, endpoint: str) -> dict:
        query = urllib.parse.urlsplit(self.path).query
        values, errors = validate_query(endpoint, query)
        if errors:
            raise RequestError(f"invalid query: {len(errors)} invalid "
                               f"parameter(s)", errors)
        return values

    def handle_metrics(self, body, params):
        """GET /metrics in the Prometheus text format (an extension)."""
        op = self.server.operator
        METRICS.set("crate_job_queue_length", None, op.runner.queue_length())
        return 200, TextAnswer(METRICS_CONTENT_TYPE, METRICS.render())

    def handle_app_logs(self, body, params):
        """GET /v1/app/logs?app_id=..&instance_id=..&lines=N (an extension)."""
        query = self._query("app_logs")
        return 200, self.server.operator.instance_logs(
            query["app_id"], query["instance_id"], query["lines"])

    def handle_events(self, body, params):
        """GET /v1/events?after=SEQ&limit=N (an extension)."""
        query = self._query("events")
        return 200, self.server.operator.events_page(query["after"],
                                                     query["limit"])

    HANDLERS = {
        "healthz": handle_healthz,
        "openapi": handle_openapi,
        "deploy_binary_slots": handle_deploy_binary_slots,
        "deploy_docker_slots": handle_deploy_docker_slots,
        "deploy_docker_instances": handle_deploy_docker_instances,
        "deploy_binary_instances": handle_deploy_binary_instances,
        "start": handle_start,
        "stop": handle_stop,
        "restart": handle_restart,
        "delete": handle_delete,
        "domain_update": handle_domain_update,
        "status_legacy": handle_status_legacy,
        "status_instance": handle_status_instance,
        "metrics": handle_metrics,
        "app_logs": handle_app_logs,
        "events": handle_events,
    }


# === Host installation ===

# Paths of an installed operator. The Debian package owns PACKAGE_PROGRAM
# and puts the unit in /lib/systemd/system. `install` uses LOCAL_PROGRAM and
# SYSTEM_UNIT_DIR, which no package manager touches.
SERVICE_NAME = "crate-operator.service"
PACKAGE_PROGRAM = "/usr/bin/crate-operator"
LOCAL_PROGRAM = "/usr/local/bin/crate-operator"
SYSTEM_UNIT_DIR = "/etc/systemd/system"
# The unit names Debian's interpreter instead of the first python3 in PATH,
# because an interpreter under /root or /home is hidden by ProtectHome=.
UNIT_PYTHON = "/usr/bin/python3"
# An installed operator is this file in a directory of its own, and the
# program above is a launcher that imports it. Python compiles a script run
# as __main__ at every start and never caches that bytecode. For this file
# that left about 17 MB more in the process (Python 3.11.2) and made the
# start 60 to 100 ms slower (bench/results.md). An imported module runs
# from __pycache__, which install and the package's postinst write,
# because ProtectSystem=strict keeps /usr read-only.
PACKAGE_LIB_DIR = "/usr/lib/crate-operator"
LOCAL_LIB_DIR = "/usr/local/lib/crate-operator"
MODULE_NAME = "crate_operator.py"
CONFIG_DIR = os.path.dirname(DEFAULT_CONFIG_PATH)
# The secrets are files of their own, so config.json contains no secret and
# the Debian package can ship it as a conffile that no script rewrites.
SECRET_FILES = {
    "token_file": os.path.join(CONFIG_DIR, "token"),
    "callback_secret_file": os.path.join(CONFIG_DIR, "callback_secret"),
}
SECRET_BYTES = 32
DEFAULT_PORT = parse_listen(CONFIG_SPEC["listen"][0])[1]

# Hardening of the operator's own unit. The operator runs as root because
# it writes unit files and talks to PID 1 over /run/systemd/private. So the
# directives limit root: it may write only the unit dir, its state dir and
# apps_dir, and use only the system calls of an ordinary service. Its one
# capability, CAP_DAC_OVERRIDE, lets it connect to a Caddy admin or docker
# socket that another user owns. AF_NETLINK is for loopback_listeners
# (sock_diag); without CAP_NET_ADMIN netlink cannot change the network.
OPERATOR_UNIT_HARDENING = """\
CapabilityBoundingSet=CAP_DAC_OVERRIDE
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
"""


class InstallError(OperatorError):
    """Raised when install or uninstall cannot go on."""


def render_operator_unit(program: str = PACKAGE_PROGRAM) -> str:
    """Render the systemd unit that runs ``program serve`` as a service."""
    if not _UNIT_SAFE_PATH.fullmatch(program):
        raise InstallError(f"program path {program!r} must be absolute and "
                           f"consist of [A-Za-z0-9/_.+-]")
    # StateDirectory= names a directory below /var/lib, where the default
    # state_dir is.
    state_name = os.path.basename(CONFIG_SPEC["state_dir"][0])
    writable = [CONFIG_SPEC["unit_dir"][0], "-" + CONFIG_SPEC["apps_dir"][0]]
    return (
        "# crate-operator: deploys apps as systemd units and routes their\n"
        "# domains through Caddy. Written by `crate-operator unit`; change\n"
        "# settings with `systemctl edit crate-operator`, not in this file.\n"
        "[Unit]\n"
        "Description=crate-operator host agent\n"
        "Wants=network-online.target\n"
        "After=network-online.target docker.service caddy.service "
        "caddy-api.service\n"
        "\n[Service]\n"
        "Type=notify\n"
        f"ExecStart={UNIT_PYTHON} -I {program} serve "
        f"--config {DEFAULT_CONFIG_PATH}\n"
        "# SIGHUP re-reads tokens_dir and the TLS certificate and key.\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "SyslogIdentifier=crate-operator\n"
        "Restart=on-failure\n"
        "RestartSec=2s\n"
        "# A running deploy step gets 20 s to finish after SIGTERM, and\n"
        "# KillMode=mixed leaves the systemctl calls of that step alone.\n"
        "TimeoutStopSec=60s\n"
        "KillMode=mixed\n"
        "# Writable: its state dir, app units and apps_dir. When config.json\n"
        "# moves state_dir or apps_dir, add them to ReadWritePaths= too.\n"
        f"StateDirectory={state_name}\n"
        "StateDirectoryMode=0700\n"
        f"ReadWritePaths={' '.join(writable)}\n"
        "# Releases must stay readable for the app user.\n"
        "UMask=0022\n"
        f"{OPERATOR_UNIT_HARDENING}"
        "\n[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def render_launcher(lib_dir: str = PACKAGE_LIB_DIR) -> str:
    """Render the program that runs main() of the module in ``lib_dir``."""
    if not _UNIT_SAFE_PATH.fullmatch(lib_dir):
        raise InstallError(f"module directory {lib_dir!r} must be absolute "
                           f"and consist of [A-Za-z0-9/_.+-]")
    return (
        f"#!{UNIT_PYTHON} -I\n"
        f"# crate-operator: runs main() of {lib_dir}/{MODULE_NAME}.\n"
        f"# An imported module runs from the bytecode that installation\n"
        f"# compiled into {lib_dir}/__pycache__; a script\n"
        f"# is compiled again at every start.\n"
        f"# Written by `crate-operator launcher`.\n"
        f"import sys\n"
        f"\n"
        f"sys.path.insert(0, \"{lib_dir}\")\n"
        f"import crate_operator  # noqa: E402\n"
        f"\n"
        f"sys.exit(crate_operator.main())\n"
    )


def compile_module(path: str) -> None:
    """Write the bytecode of the module at ``path`` with the unit's python."""
    _run_tool([UNIT_PYTHON, "-I", "-m", "py_compile", path])


def initial_config(port: int = DEFAULT_PORT) -> bytes:
    """Return the config.json of a new installation (no secret in it)."""
    config = dict(listen=f"127.0.0.1:{port}", **SECRET_FILES)
    return (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()


def _write_if_changed(path: str, data: bytes, mode: int) -> bool:
    """Write ``path`` unless it has this content and mode; return whether."""
    try:
        with open(path, "rb") as handle:
            same = handle.read() == data
        same = same and stat.S_IMODE(os.stat(path).st_mode) == mode
    except FileNotFoundError:
        same = False
    if same:
        return False
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    atomic_write(path, data, mode)
    return True


def _write_new_file(path: str, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data``; leave an existing file alone."""
    if os.path.lexists(path):
        return False
    atomic_write(path, data, mode)
    return True


def _run_tool(argv: list) -> str:
    """Run a command (never through a shell); return its stdout."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{' '.join(argv)} failed: {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise InstallError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{output[:1000]}")
    return result.stdout


def _ensure_app_user(name: str) -> bool:
    """Create the system user the app units run as; return whether."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    argv = ["useradd", "--system", "--no-create-home",
            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
            "--comment", "crate-operator apps"]
    try:
        grp.getgrnam(name)
        argv += ["--gid", name]
    except KeyError:
        argv.append("--user-group")
    _run_tool(argv + [name])
    return True


def _installed_settings() -> dict:
    """Return app_user, state_dir and apps_dir of the config on disk."""
    settings = {key: CONFIG_SPEC[key][0]
                for key in ("app_user", "state_dir", "apps_dir")}
    if os.path.exists(DEFAULT_CONFIG_PATH):
        values = _read_config_file(DEFAULT_CONFIG_PATH)
        settings.update({key: values[key] for key in settings if key in values})
    return settings


def _check_install_host() -> None:
    """Raise InstallError when this host cannot run the installed service."""
    if os.geteuid() != 0:
        raise InstallError("install must run as root, because it writes "
                           "/usr/local/bin, /etc and /var/lib; run it with "
                           "sudo")
    if not os.path.isdir("/run/systemd/system"):
        raise InstallError("systemd is not running on this host (no "
                           "/run/systemd/system); crate-operator runs only "
                           "under systemd as PID 1")
    if not os.access(UNIT_PYTHON, os.X_OK):
        raise InstallError(f"{UNIT_PYTHON} is missing; install python3 "
                           f"(3.9 or newer)")
    if os.path.exists(PACKAGE_PROGRAM):
        raise InstallError(f"{PACKAGE_PROGRAM} exists, so the Debian package "
                           f"is installed; upgrade it with the package")


def _install_files(port: int) -> tuple:
    """Write the program, the unit, the config and the secrets.

    Returns (changes, restart_needed): the list of what changed, and
    whether a running service must restart to use the new program or unit.
    """
    changes = []
    with open(os.path.abspath(__file__), "rb") as handle:
        module = handle.read()
    unit_path = os.path.join(SYSTEM_UNIT_DIR, SERVICE_NAME)
    module_path = os.path.join(LOCAL_LIB_DIR, MODULE_NAME)
    restart = False
    if _write_if_changed(module_path, module, 0o644):
        changes.append(f"wrote {module_path}")
        restart = True
    # Also when the module is unchanged: the bytecode may be missing or
    # belong to an older python3.
    compile_module(module_path)
    launcher = render_launcher(LOCAL_LIB_DIR).encode()
    if _write_if_changed(LOCAL_PROGRAM, launcher, 0o755):
        changes.append(f"wrote {LOCAL_PROGRAM}")
        restart = True
    unit = render_operator_unit(LOCAL_PROGRAM).encode()
    if _write_if_changed(unit_path, unit, 0o644):
        changes.append(f"wrote {unit_path}")
        restart = True

    os.makedirs(CONFIG_DIR, mode=0o755, exist_ok=True)
    if _write_new_file(DEFAULT_CONFIG_PATH, initial_config(port), 0o600):
        changes.append(f"wrote {DEFAULT_CONFIG_PATH}")
    for path in SECRET_FILES.values():
        secret = secrets.token_hex(SECRET_BYTES) + "\n"
        if _write_new_file(path, secret.encode(), 0o600):
            changes.append(f"generated {path}")
    return changes, restart


def _install_host_setup(settings: dict) -> list:
    """Create the app user, the state dir and apps_dir when missing."""
    changes = []
    if settings["app_user"] != "dynamic" and \
            _ensure_app_user(settings["app_user"]):
        changes.append(f"created system user {settings['app_user']}")
    for key, mode in (("state_dir", 0o700), ("apps_dir", 0o755)):
        path = settings[key]
        if not os.path.isdir(path):
            os.makedirs(path, mode=mode)
            os.chmod(path, mode)
            changes.append(f"created {path}")
        if path != CONFIG_SPEC[key][0]:
            print(f"note: {DEFAULT_CONFIG_PATH} sets {key} to {path}; add it "
                  f"to ReadWritePaths= with `systemctl edit crate-operator`")
    return changes


def install_host(port: int = DEFAULT_PORT) -> list:
    """Install this file as the crate-operator service and start it.

    Every step first checks whether its result is already there, so a
    second run changes nothing. An existing config.json or secret file is
    never overwritten. Returns the list of changes.
    """
    _check_install_host()
    if not 0 < port < 65536:
        raise InstallError(f"--port {port} must be between 1 and 65535")
    settings = _installed_settings()
    changes, restart = _install_files(port)
    changes += _install_host_setup(settings)
    _run_tool([UNIT_PYTHON, "-I", LOCAL_PROGRAM, "check-config",
               "--config", DEFAULT_CONFIG_PATH])

    systemd = Systemd(["systemctl"], SYSTEM_UNIT_DIR)
    if restart:
        systemd.run("daemon-reload")
    if systemd.run("is-enabled", "--quiet", SERVICE_NAME,
                   check=False).returncode != 0:
        systemd.run("enable", SERVICE_NAME)
        changes.append(f"enabled {SERVICE_NAME}")
    if systemd.run("is-active", "--quiet", SERVICE_NAME,
                   check=False).returncode != 0:
        systemd.run("start", SERVICE_NAME)
        changes.append(f"started {SERVICE_NAME}")
    elif restart:
        systemd.run("restart", SERVICE_NAME)
        changes.append(f"restarted {SERVICE_NAME}")
    return changes


def uninstall_host(purge: bool = False) -> list:
    """Stop and disable the service, delete its unit and program.

    With ``purge`` it also deletes CONFIG_DIR and the default state dir.
    Deployed apps (their units and apps_dir) and the app user stay. Returns
    the list of changes.
    """
    if os.geteuid() != 0:
        raise InstallError("uninstall must run as root; run it with sudo")
    unit_path = os.path.join(SYSTEM_UNIT_DIR, SERVICE_NAME)
    if os.path.exists(PACKAGE_PROGRAM) and not os.path.exists(unit_path):
        raise InstallError(f"{PACKAGE_PROGRAM} belongs to the Debian "
                           f"package; remove it with apt-get remove "
                           f"crate-operator (purge to delete its config)")
    changes = []
    # Without a running systemd (a chroot) only the files are removed.
    systemd = None
    if os.path.isdir("/run/systemd/system"):
        systemd = Systemd(["systemctl"], SYSTEM_UNIT_DIR)
    if os.path.exists(unit_path):
        if systemd is not None:
            systemd.run("disable", "--now", SERVICE_NAME)
            changes.append(f"stopped and disabled {SERVICE_NAME}")
        os.unlink(unit_path)
        changes.append(f"removed {unit_path}")
        if systemd is not None:
            systemd.run("daemon-reload")
            systemd.run("reset-failed", SERVICE_NAME, check=False)
    if os.path.exists(LOCAL_PROGRAM):
        os.unlink(LOCAL_PROGRAM)
        changes.append(f"removed {LOCAL_PROGRAM}")
    if os.path.lexists(LOCAL_LIB_DIR):
        shutil.rmtree(LOCAL_LIB_DIR)
        changes.append(f"removed {LOCAL_LIB_DIR}")
    if purge:
        for path in (CONFIG_DIR, CONFIG_SPEC["state_dir"][0]):
            if os.path.lexists(path):
                shutil.rmtree(path)
                changes.append(f"deleted {path}")
    return changes


def cmd_unit(args: argparse.Namespace) -> int:
    """Print the unit for ``--program``."""
    sys.stdout.write(render_operator_unit(args.program))
    return 0


def cmd_launcher(args: argparse.Namespace) -> int:
    """Print the launcher for ``--lib-dir``."""
    sys.stdout.write(render_launcher(args.lib_dir))
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """Run install_host and print what changed."""
    changes = install_host(args.port)
    for change in changes:
        print(change)
    if not changes:
        print("crate-operator is already installed and running; "
              "nothing changed")
    print(f"crate-operator runs as {SERVICE_NAME}; the bearer token is in "
          f"{SECRET_FILES['token_file']}")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Run uninstall_host and print what changed."""
    changes = uninstall_host(args.purge)
    for change in changes:
        print(change)
    if not changes:
        print("crate-operator is not installed; nothing changed")
    elif not args.purge:
        print(f"kept {CONFIG_DIR} and {CONFIG_SPEC['state_dir'][0]}; "
              f"uninstall --purge deletes them")
    return 0


HOST_COMMANDS = {"unit": cmd_unit, "launcher": cmd_launcher,
                 "install": cmd_install, "uninstall": cmd_uninstall}


def add_host_commands(sub) -> None:
    """Add the unit, install and uninstall subcommands to ``sub``."""
    unit = sub.add_parser("unit", help="print the systemd unit of the "
                                       "operator")
    unit.add_argument("--program", metavar="PATH", default=PACKAGE_PROGRAM,
                      help=f"path of the installed program (default "
                           f"{PACKAGE_PROGRAM})")
    launcher = sub.add_parser("launcher", help="print the program that "
                                               "imports and runs the "
                                               "installed module")
    launcher.add_argument("--lib-dir", metavar="DIR", default=PACKAGE_LIB_DIR,
                          help=f"directory of {MODULE_NAME} (default "
                               f"{PACKAGE_LIB_DIR})")
    install = sub.add_parser(
        "install", help=f"install this file in {LOCAL_LIB_DIR}, a launcher "
                        f"as {LOCAL_PROGRAM} and a systemd service, and "
                        f"start it (root)")
    install.add_argument("--port", type=int, default=DEFAULT_PORT,
                         help=f"TCP port on 127.0.0.1 for the API, used "
                              f"only when config.json is new (default "
                              f"{DEFAULT_PORT})")
    uninstall = sub.add_parser(
        "uninstall", help="stop the service, remove its unit and program "
                          "(root)")
    uninstall.add_argument("--purge", action="store_true",
                           help=f"also delete {CONFIG_DIR} and "
                                f"{CONFIG_SPEC['state_dir'][0]}")


# === CLI and main ===

def _notify_systemd(message: str) -> None:
    """Send ``message`` to $NOTIFY_SOCKET when systemd started us."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the exit code."""
    setup_logging(config.log_format)
    operator = Operator(config)
    operator.store.lock_exclusive()
    host, port = parse_listen(config.listen)
    ApiHandler.timeout = config.request_timeout_s
    server = ApiServer((host, port), ApiHandler, operator)
    operator.recover()
    operator.outbox.start()
    operator.history.start()
    operator.reconciler.start()
    if operator.caddy.ping():
        try:
            operator.caddy.ensure_server()
        except OperatorError as exc:
            log("caddy.ensure_server_failed", logging.ERROR, error=str(exc))
    else:
        log("caddy.unreachable", logging.WARNING, admin=config.caddy_admin)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            log("operator.stopping", signal=signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, daemon=True).start()

    def on_reload(_signum, _frame):
        # The handler runs on the accept loop's thread, which must not
        # wait for file reads.
        threading.Thread(target=server.reload, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_reload)
    log("operator.listening", address=f"{host}:{server.server_port}",
        tls=server.tls_context is not None,
        mtls=bool(config.tls_client_ca_file), version=__version__,
        pid=os.getpid())
    _notify_systemd("READY=1")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        _notify_systemd("STOPPING=1")
        server.server_close()
        operator.reconciler.stop()
        if not operator.runner.wait_idle(config.shutdown_timeout_s):
            log("operator.jobs_unfinished", logging.WARNING)
        operator.outbox.stop()
        operator.history.stop()
        log("operator.stopped")
    return 0


def _parse_sets(items: list) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must be KEY=VALUE")
        out[key.strip()] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="crate-operator",
        description="Host agent that deploys apps and routes their domains.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the HTTP API"),
                       ("check-config", "print the effective configuration "
                                        "with secrets masked")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", metavar="PATH",
                         help=f"JSON config file (default "
                              f"{DEFAULT_CONFIG_PATH})")
        cmd.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override one configuration key")
        cmd.add_argument("--listen", metavar="HOST:PORT",
                         help="override the listen address")
    sub.add_parser("version", help="print the version")
    add_host_commands(sub)
    return parser


def main(argv: list | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command in HOST_COMMANDS:
        try:
            return HOST_COMMANDS[args.command](args)
        except (OperatorError, OSError) as exc:
            print(f"crate-operator: {exc}", file=sys.stderr)
            return 1
    try:
        overrides = _parse_sets(args.set)
        if args.listen:
            overrides["listen"] = args.listen
        config = load_config(args.config, os.environ, overrides)
        if args.command == "check-config":
            print(json.dumps(config.as_dict(), indent=2, sort_keys=True))
            return 0
        return serve(config)
    except ConfigError as exc:
        print(f"crate-operator: {exc}", file=sys.stderr)
        return 2
    except OperatorError as exc:
        print(f"crate-operator: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"crate-operator: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
