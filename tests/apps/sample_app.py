#!/usr/bin/python3 -I
"""Sample "binary" app that the tests deploy with crate-operator.

Serves HTTP/1.1 on 127.0.0.1:$PORT with the standard library only:

  GET /         200 "<BUILD> version=<CRATE_VERSION> instance=<CRATE_INSTANCE_ID>"
  GET /env      200 JSON object of the process environment
  GET /healthz  200 "ok", or 500 "fail" when SAMPLE_FAIL_HEALTH=1 or the file
                named by SAMPLE_HEALTH_FILE exists and contains "fail", or
                when SAMPLE_FAIL_HEALTH_INSTANCE equals CRATE_INSTANCE_ID
  GET /whoami   200 JSON {"uid", "gid", "euid"}
  GET /argv     200 JSON list of the command-line arguments

The port comes from "--port N" (or "--port=N") on the command line when
given, else from $PORT (for Procfile tests).

SAMPLE_EXIT_CODE=N makes the process exit with status N before it binds the
port (for crash-loop tests). SAMPLE_START_DELAY_S=N waits N seconds before it
binds the port (for slow-boot tests). SIGTERM ends it with status 0. Tests make
distinct releases by rewriting the BUILD line (harness.build_asset).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import time

BUILD = "dev"


class SampleHandler(http.server.BaseHTTPRequestHandler):
    """Handle the GET paths listed in the module docstring."""

    protocol_version = "HTTP/1.1"
    server_version = "crate-sample"
    # Without TCP_NODELAY each keep-alive response to Caddy waits for the
    # client's delayed ACK (about 40 ms per request).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        """Dispatch one GET request by path; unknown paths get 404."""
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send_text(200, root_text())
        elif path == "/env":
            self._send_json(200, dict(os.environ))
        elif path == "/healthz":
            if health_failing():
                self._send_text(500, "fail\n")
            else:
                self._send_text(200, "ok\n")
        elif path == "/argv":
            self._send_json(200, sys.argv[1:])
        elif path == "/whoami":
            ids = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid()}
            self._send_json(200, ids)
        else:
            self._send_text(404, "not found\n")

    def _send_text(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, value: object) -> None:
        body = json.dumps(value, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # One line per request on stderr ends up in the unit's journal.
        sys.stderr.write("%s\n" % (format % args))


def root_text() -> str:
    """Return the body of GET /, which identifies build, version and instance."""
    version = os.environ.get("CRATE_VERSION", "")
    instance = os.environ.get("CRATE_INSTANCE_ID", "")
    return "%s version=%s instance=%s\n" % (BUILD, version, instance)


def health_failing() -> bool:
    """Return True when the environment or the health file requests a 500."""
    if os.environ.get("SAMPLE_FAIL_HEALTH") == "1":
        return True
    failing_instance = os.environ.get("SAMPLE_FAIL_HEALTH_INSTANCE")
    if failing_instance and failing_instance == os.environ.get(
            "CRATE_INSTANCE_ID"):
        return True
    health_file = os.environ.get("SAMPLE_HEALTH_FILE")
    if not health_file:
        return False
    try:
        with open(health_file, encoding="utf-8", errors="replace") as handle:
            return "fail" in handle.read()
    except OSError:
        return False


def port_argument(argv: list[str]) -> str | None:
    """Return the value of --port N or --port=N in argv, or None."""
    for index, word in enumerate(argv):
        if word == "--port" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--port="):
            return word[len("--port="):]
    return None


def handle_sigterm(signum: int, frame: object) -> None:
    """Exit with status 0, as a well-behaved service does on SIGTERM."""
    sys.exit(0)


def main() -> int:
    """Start the server on 127.0.0.1 (--port or $PORT) and serve until SIGTERM."""
    exit_code = os.environ.get("SAMPLE_EXIT_CODE")
    if exit_code:
        sys.stderr.write("SAMPLE_EXIT_CODE=%s, exiting\n" % exit_code)
        return int(exit_code)
    # A slow start: the port refuses connections until the delay has passed.
    time.sleep(float(os.environ.get("SAMPLE_START_DELAY_S") or 0))
    port_text = port_argument(sys.argv[1:]) or os.environ.get("PORT")
    if not port_text:
        sys.stderr.write("PORT is not set and no --port was given; "
                         "set one to the TCP port to serve on\n")
        return 2

    signal.signal(signal.SIGTERM, handle_sigterm)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port_text)),
                                             SampleHandler)
    server.daemon_threads = True
    sys.stderr.write("sample app %s listening on 127.0.0.1:%s\n" % (BUILD, port_text))
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
