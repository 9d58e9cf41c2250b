"""Bare ThreadingHTTPServer that responds to every GET with one fixed JSON body.

Usage: bare_server.py BODY_FILE. It binds 127.0.0.1 on a free port, prints
the port on stdout and serves until SIGTERM. It speaks HTTP/1.1 with
keep-alive like the operator's API.
"""

from __future__ import annotations

import http.server
import os
import signal
import sys


def main() -> None:
    """Serve the body of sys.argv[1] on a free port until SIGTERM."""
    with open(sys.argv[1], "rb") as handle:
        body = handle.read()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes. With Nagle's algorithm on,
        # the second waits for the client's delayed ACK (about 40 ms).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        # The operator's ApiServer settings. The stdlib's listen backlog of 5
        # drops SYNs when wrk opens its 32 connections at once, and the
        # retransmission a second later showed up in this server's p99.
        daemon_threads = True
        request_queue_size = 128

        def handle_error(self, request, client_address) -> None:
            # wrk closes its connections mid-request when it stops, and the
            # stdlib prints a traceback to stderr for each of them.
            pass

    server = Server(("127.0.0.1", 0), Handler)
    # os._exit skips the interpreter shutdown, which can abort with a fatal
    # error while daemon threads still write to a socket.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
