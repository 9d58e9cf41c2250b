#!/usr/bin/env python3
"""Run crate-operator in the foreground with a development config (`make run`).

Usage: run_dev.py [DIR]   (default: build/dev in the repository)

On first use it writes DIR/config.json (mode 0600): the API on
127.0.0.1:8750, a fresh token and callback secret, and state, apps and unit
dirs below DIR. Later runs reuse that file, so the token stays the same.
It prints the address and the token, then replaces itself with
`crate_operator.py serve`.

The operator never writes outside DIR: the host's systemd does not read
DIR/units, so deployed apps are not started. Where systemd is not PID 1,
systemctl is replaced by a command that fails with a message, and deploys
stop at their first systemctl call. The Caddy server the operator creates
(when a Caddy admin API responds on 127.0.0.1:2019) listens on
127.0.0.1:8080 only, and the docker socket path points into DIR.
"""

from __future__ import annotations

import json
import os
import secrets
import sys

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(REPO_DIR, "crate_operator.py")
DEFAULT_DIR = os.path.join(REPO_DIR, "build", "dev")
LISTEN = "127.0.0.1:8750"
CADDY_LISTEN = "127.0.0.1:8080"
NO_SYSTEMD_MESSAGE = ("systemctl is disabled by `make run` because systemd is "
                      "not PID 1 on this machine")


def systemctl_command() -> list[str]:
    """Return the systemctl argument list for this machine.

    /run/systemd/system exists only when systemd is PID 1 (the test that
    sd_booted(3) makes).
    """
    if os.path.isdir("/run/systemd/system"):
        return ["systemctl", "--no-ask-password"]
    script = f"import sys; sys.exit({NO_SYSTEMD_MESSAGE!r})"
    return [sys.executable, "-c", script]


def new_config(directory: str) -> dict:
    """Return a development config with fresh secrets and dirs below directory."""
    return {
        "listen": LISTEN,
        "token": secrets.token_hex(16),
        "callback_secret": secrets.token_hex(16),
        "state_dir": os.path.join(directory, "state"),
        "apps_dir": os.path.join(directory, "apps"),
        "unit_dir": os.path.join(directory, "units"),
        "systemctl": systemctl_command(),
        "caddy_listen": [CADDY_LISTEN],
        "caddy_automatic_https": False,
        "docker_socket": os.path.join(directory, "docker.sock"),
    }


def write_config(path: str, config: dict) -> None:
    """Create path with mode 0600, because it contains the token."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=1, sort_keys=True)
        handle.write("\n")


def main(argv: list[str]) -> int:
    """Create the config when missing, print how to call the API, then serve."""
    directory = os.path.abspath(argv[1] if len(argv) > 1 else DEFAULT_DIR)
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        config = new_config(directory)
        for key in ("state_dir", "apps_dir", "unit_dir"):
            os.makedirs(config[key], exist_ok=True)
        write_config(path, config)
        print(f"wrote {path}")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)

    token = config.get("token") or f"(see {config.get('token_file')})"
    print(f"crate-operator listens on http://{config['listen']}")
    print(f"token: {token}")
    print(f"try: curl -H 'Authorization: Bearer {token}' "
          f"http://{config['listen']}/v1/openapi.json")
    print("stop it with Ctrl-C")
    sys.stdout.flush()
    os.execv(sys.executable,
             [sys.executable, PROGRAM, "serve", "--config", path])
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
