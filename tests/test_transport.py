"""End-to-end: TLS, mutual TLS, bearer token rotation and request limits.

Certificates come from Debian's openssl command, because Python's ssl
module cannot create them: one CA, server certificates for 127.0.0.1
(subjectAltName IP:127.0.0.1) with chosen serial numbers, and a client
certificate. Every operator runs against the real systemd sandbox and
Caddy of the session and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
from typing import Any

import pytest

import crate_operator as co
import harness

OPENAPI = "/v1/openapi.json"
DELETE = "/v1/app/delete"
# Serial numbers of the server certificates before and after a reload.
FIRST_SERIAL = 0x1001
SECOND_SERIAL = 0x2002
# Time a start-up that must fail may take before the test gives up.
EXIT_TIMEOUT_S = 30.0


# === Certificates ===


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def new_key(directory: str, name: str) -> str:
    path = os.path.join(directory, name + ".key")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-out", path, cwd=directory)
    os.chmod(path, 0o600)
    return path


def issue_cert(directory: str, name: str, serial: int,
               extensions: str) -> tuple[str, str]:
    """Write <name>.key and <name>.crt signed by ca.key; return their paths."""
    key = new_key(directory, name)
    csr = os.path.join(directory, name + ".csr")
    cert = os.path.join(directory, name + ".crt")
    ext_file = os.path.join(directory, name + ".ext")
    with open(ext_file, "w", encoding="utf-8") as handle:
        handle.write(extensions)
    openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", csr,
            cwd=directory)
    openssl("x509", "-req", "-in", csr, "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", str(serial), "-days", "2", "-sha256",
            "-extfile", ext_file, "-out", cert, cwd=directory)
    return cert, key


SERVER_EXTENSIONS = ("subjectAltName=IP:127.0.0.1\n"
                     "basicConstraints=critical,CA:FALSE\n"
                     "keyUsage=critical,digitalSignature\n"
                     "extendedKeyUsage=serverAuth\n"
                     "subjectKeyIdentifier=hash\n"
                     "authorityKeyIdentifier=keyid\n")
CLIENT_EXTENSIONS = ("basicConstraints=critical,CA:FALSE\n"
                     "keyUsage=critical,digitalSignature\n"
                     "extendedKeyUsage=clientAuth\n"
                     "subjectKeyIdentifier=hash\n"
                     "authorityKeyIdentifier=keyid\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """Paths of a CA, two server certificates and a client certificate."""
    directory = str(tmp_path_factory.mktemp("pki"))
    new_key(directory, "ca")
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj",
            "/CN=crate test CA", "-days", "2", "-sha256", "-out", "ca.crt",
            cwd=directory)
    paths = {"dir": directory, "ca": os.path.join(directory, "ca.crt")}
    paths["server"] = issue_cert(directory, "server", FIRST_SERIAL,
                                 SERVER_EXTENSIONS)
    paths["server2"] = issue_cert(directory, "server2", SECOND_SERIAL,
                                  SERVER_EXTENSIONS)
    paths["client"] = issue_cert(directory, "client", 0x3003,
                                 CLIENT_EXTENSIONS)
    return paths


def client_context(pki: dict, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    if with_cert:
        context.load_cert_chain(*pki["client"])
    return context


def tls_files(operator, pki: dict, name: str = "server") -> dict:
    """Copy a server certificate and key to the operator's own paths."""
    base = os.path.join(operator.shared_dir, f"tls-{operator.index}")
    os.makedirs(base, exist_ok=True)
    paths = {"tls_cert_file": os.path.join(base, "server.crt"),
             "tls_key_file": os.path.join(base, "server.key")}
    install_cert(paths, pki, name)
    return paths


def install_cert(paths: dict, pki: dict, name: str) -> None:
    """Replace the certificate and key files atomically, key mode 0600."""
    cert, key = pki[name]
    for source, target in ((cert, paths["tls_cert_file"]),
                           (key, paths["tls_key_file"])):
        with open(source, "rb") as handle:
            data = handle.read()
        temporary = target + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)


# === Operators ===


def https_request(operator, context: ssl.SSLContext, method: str, path: str,
                  body: Any = None, token: Any = "", headers: dict | None = None,
                  timeout: float = 30.0) -> tuple:
    """Send one request over a new HTTPS connection, like harness request()."""
    all_headers = {}
    if token == "":
        token = operator.token
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    all_headers.update(headers or {})
    host, _, port = operator.config["listen"].rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=timeout,
                                       context=context)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, dict(response.getheaders()), raw


def make_tls_operator(operator_factory, pki: dict, overrides: dict | None = None,
                      client_cert: bool = False):
    """Start an operator with TLS; its request() speaks HTTPS."""
    operator = operator_factory(overrides, start=False)
    operator.config.update(tls_files(operator, pki))
    operator.config.update(overrides or {})
    operator._write_config()
    context = client_context(pki, with_cert=client_cert)
    operator.request = functools.partial(https_request, operator, context)
    operator.start()
    return operator, context


def run_until_exit(operator, command: str = "serve") -> subprocess.CompletedProcess:
    """Run the operator with its config and return once it exits."""
    argv = operator.argv()
    argv[argv.index("serve")] = command
    return subprocess.run(argv, cwd=operator.shared_dir, capture_output=True,
                          text=True, timeout=EXIT_TIMEOUT_S)


def connect_tls(operator, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    host, _, port = operator.config["listen"].rpartition(":")
    return http.client.HTTPSConnection(host, int(port), timeout=10,
                                       context=context)


def get_openapi(conn: http.client.HTTPConnection, token: str) -> int:
    conn.request("GET", OPENAPI, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    response.read()
    return response.status


def peer_serial(conn: http.client.HTTPSConnection) -> int:
    return int(conn.sock.getpeercert()["serialNumber"], 16)


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.1)


# === TLS and mutual TLS ===


def test_tls_listener_serves_https(operator_factory, pki):
    operator, context = make_tls_operator(operator_factory, pki)
    conn = connect_tls(operator, context)
    try:
        for _ in range(3):
            assert get_openapi(conn, operator.token) == 200
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert peer_serial(conn) == FIRST_SERIAL
    finally:
        conn.close()
    assert "tls=true" in operator.log_text()


def test_tls_listener_rejects_plain_http(operator_factory, pki):
    operator, context = make_tls_operator(operator_factory, pki)
    host, _, port = operator.config["listen"].rpartition(":")
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    with pytest.raises((OSError, http.client.HTTPException)):
        plain.request("GET", OPENAPI)
        plain.getresponse().read()
    plain.close()
    status, _, _ = operator.request("GET", OPENAPI)
    assert status == 200


def test_tls_context_settings(pki):
    config = co.Config({"tls_cert_file": pki["server"][0],
                        "tls_key_file": pki["server"][1],
                        "tls_client_ca_file": pki["ca"]})
    context = co.build_tls_context(config)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    config = co.Config({"tls_cert_file": pki["server"][0],
                        "tls_key_file": pki["server"][1],
                        "tls_client_ca_file": None})
    assert co.build_tls_context(config).verify_mode == ssl.CERT_NONE


def test_slow_tls_handshake_cut_off(operator_factory, pki):
    operator, _ = make_tls_operator(operator_factory, pki,
                                    {"request_deadline_s": 2.0})
    host, _, port = operator.config["listen"].rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    started = time.monotonic()
    closed = False
    try:
        # A handshake record header announcing 512 bytes, then one byte
        # every 0.25 s: the whole record would take over two minutes.
        sock.sendall(b"\x16\x03\x01\x02\x00")
        for _ in range(512):
            sock.sendall(b"\x00")
            time.sleep(0.25)
            if time.monotonic() - started > 30:
                break
    except OSError:
        closed = True
    finally:
        sock.close()
    assert closed
    status, _, _ = operator.request("GET", OPENAPI)
    assert status == 200


def test_mtls_requires_client_certificate(operator_factory, pki):
    operator, with_cert = make_tls_operator(
        operator_factory, pki, {"tls_client_ca_file": pki["ca"]},
        client_cert=True)
    conn = connect_tls(operator, with_cert)
    try:
        assert get_openapi(conn, operator.token) == 200
        conn.request("POST", DELETE, body=b"{}", headers={
            "Authorization": f"Bearer {operator.token}",
            "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 400
    finally:
        conn.close()
    wait_until(lambda: "client_cert=client token=default"
               in operator.log_text(), what="the client_cert log field")
    without_cert = connect_tls(operator, client_context(pki))
    with pytest.raises((OSError, http.client.HTTPException)):
        get_openapi(without_cert, operator.token)
    without_cert.close()
    assert "mtls=true" in operator.log_text()


def test_mtls_rejects_certificate_of_other_ca(operator_factory, pki, tmp_path):
    operator, _ = make_tls_operator(
        operator_factory, pki, {"tls_client_ca_file": pki["ca"]},
        client_cert=True)
    other = str(tmp_path)
    new_key(other, "ca")
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=other CA",
            "-days", "2", "-out", "ca.crt", cwd=other)
    stranger = issue_cert(other, "stranger", 0x4004, CLIENT_EXTENSIONS)
    context = client_context(pki)
    context.load_cert_chain(*stranger)
    conn = connect_tls(operator, context)
    with pytest.raises((OSError, http.client.HTTPException)):
        get_openapi(conn, operator.token)
    conn.close()


class TLSRequestLoop:
    """Sends requests from a thread until stopped, each on a new connection.

    It also keeps one connection alive across the whole run, so that a
    reload that dropped open connections would count as failures.
    """

    def __init__(self, operator, context: ssl.SSLContext):
        self.operator = operator
        self.context = context
        self.serials: list[int] = []
        self.failures: list[str] = []
        self.kept_alive_requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TLSRequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        kept = connect_tls(self.operator, self.context)
        try:
            while not self._stop.is_set():
                self._one_new_connection()
                try:
                    if get_openapi(kept, self.operator.token) == 200:
                        self.kept_alive_requests += 1
                    else:
                        self.failures.append("kept-alive request not 200")
                except (OSError, http.client.HTTPException) as exc:
                    self.failures.append(f"kept-alive: {exc!r}")
        finally:
            kept.close()

    def _one_new_connection(self) -> None:
        conn = connect_tls(self.operator, self.context)
        try:
            status = get_openapi(conn, self.operator.token)
            if status != 200:
                self.failures.append(f"status {status}")
            else:
                self.serials.append(peer_serial(conn))
        except (OSError, http.client.HTTPException) as exc:
            self.failures.append(repr(exc))
        finally:
            conn.close()


def test_sighup_reloads_certificate_without_failures(operator_factory, pki):
    operator, context = make_tls_operator(operator_factory, pki)
    with TLSRequestLoop(operator, context) as loop:
        wait_until(lambda: len(loop.serials) >= 5, what="5 requests")
        install_cert(operator.config, pki, "server2")
        operator.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: SECOND_SERIAL in loop.serials,
                   what="a connection with the new certificate")
        count = len(loop.serials)
        wait_until(lambda: len(loop.serials) >= count + 5,
                   what="5 requests after the reload")
    assert loop.failures == []
    assert loop.serials[0] == FIRST_SERIAL
    assert loop.serials[-1] == SECOND_SERIAL
    switch = loop.serials.index(SECOND_SERIAL)
    assert set(loop.serials[switch:]) == {SECOND_SERIAL}
    assert loop.kept_alive_requests > 0
    assert operator.running()
    # Logged just after the new context is in place, so a connection can
    # see the new certificate first.
    wait_until(lambda: "event=operator.tls_loaded" in operator.log_text(),
               what="the tls_loaded log line")


def test_sighup_keeps_old_certificate_on_error(operator_factory, pki):
    operator, context = make_tls_operator(operator_factory, pki)
    with open(operator.config["tls_cert_file"], "w", encoding="utf-8") as handle:
        handle.write("not a certificate\n")
    operator.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "part=tls" in operator.log_text(),
               what="the reload error in the log")
    conn = connect_tls(operator, context)
    try:
        assert get_openapi(conn, operator.token) == 200
        assert peer_serial(conn) == FIRST_SERIAL
    finally:
        conn.close()


# === Plain HTTP on a non-loopback address ===


def test_plaintext_on_non_loopback_refused(operator_factory):
    port = harness.free_port()
    operator = operator_factory({"listen": f"0.0.0.0:{port}"}, start=False)
    result = run_until_exit(operator)
    assert result.returncode != 0
    assert "is not a loopback address" in result.stderr
    assert "allow_plaintext" in result.stderr
    assert "tls_cert_file" in result.stderr
    assert "operator.listening" not in result.stderr


def test_allow_plaintext_accepts_config(operator_factory):
    # check-config validates without binding, so nothing listens on 0.0.0.0.
    port = harness.free_port()
    operator = operator_factory({"listen": f"0.0.0.0:{port}",
                                 "allow_plaintext": True}, start=False)
    result = run_until_exit(operator, "check-config")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["allow_plaintext"] is True


def test_tls_config_accepts_non_loopback(operator_factory, pki):
    port = harness.free_port()
    operator = operator_factory({"listen": f"0.0.0.0:{port}"}, start=False)
    operator.config.update(tls_files(operator, pki))
    operator._write_config()
    result = run_until_exit(operator, "check-config")
    assert result.returncode == 0, result.stderr


# === Tokens ===


def write_token(directory: str, name: str, mode: int = 0o600) -> str:
    token = secrets.token_hex(20)
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    os.chmod(path, mode)
    return token


def status_with(operator, token: str) -> int:
    status, _, _ = operator.request("GET", OPENAPI, token=token)
    return status


def test_token_rotation_with_sighup(operator_factory, tmp_path):
    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir(mode=0o700)
    old = write_token(str(tokens_dir), "old")
    listed = secrets.token_hex(20)
    operator = operator_factory({
        "tokens_dir": str(tokens_dir),
        "tokens": [{"name": "listed", "token": listed}]})
    assert status_with(operator, old) == 200
    assert status_with(operator, listed) == 200
    assert status_with(operator, operator.token) == 200
    assert status_with(operator, "x" * 40) == 401

    new = write_token(str(tokens_dir), "new")
    assert status_with(operator, new) == 401
    operator.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status_with(operator, new) == 200,
               what="the new token accepted")
    assert status_with(operator, old) == 200

    os.unlink(tokens_dir / "old")
    operator.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status_with(operator, old) == 401,
               what="the removed token rejected")
    assert status_with(operator, new) == 200
    assert status_with(operator, listed) == 200

    for token in (new, listed, operator.token):
        status, _, _ = operator.request(
            "POST", DELETE, {"app_id": 770001, "deployment_id": 770002},
            token=token)
        assert status == 400
    # The operator writes a request's log line after its response.
    for name in ("new", "listed", "default"):
        line = f"token={name} app_id=770001 deployment_id=770002"
        wait_until(lambda line=line: line in operator.log_text(), what=line)

    def loaded_names() -> list:
        # One line per reload, logged just after the new set is in place.
        return [field for line in operator.log_text().splitlines()
                if "event=operator.tokens_loaded" in line.split()
                for field in line.split() if field.startswith("names=")]

    wait_until(lambda: len(loaded_names()) == 2, what="two tokens_loaded lines")
    assert loaded_names() == ["names=default,listed,new,old",
                              "names=default,listed,new"]
    text = operator.log_text()
    for token in (old, new, listed, operator.token):
        assert token not in text


def test_token_comparison_rejects_prefix(operator_factory):
    operator = operator_factory()
    assert status_with(operator, operator.token[:-1]) == 401
    assert status_with(operator, operator.token + "x") == 401
    assert status_with(operator, operator.token) == 200


def test_sighup_keeps_tokens_on_error(operator_factory, tmp_path):
    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir(mode=0o700)
    kept = write_token(str(tokens_dir), "kept")
    operator = operator_factory({"tokens_dir": str(tokens_dir)})
    write_token(str(tokens_dir), "loose", mode=0o644)
    operator.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "part=tokens" in operator.log_text(),
               what="the reload error in the log")
    assert status_with(operator, kept) == 200


# === Permission checks ===


def test_token_file_readable_by_others_fails(operator_factory, tmp_path):
    path = str(tmp_path / "token")
    write_token(str(tmp_path), "token", mode=0o644)
    operator = operator_factory({"token": None, "token_file": path},
                                start=False)
    result = run_until_exit(operator)
    assert result.returncode != 0
    assert f"token file {path} is readable by group or others" in result.stderr


def test_tokens_dir_file_readable_by_others_fails(operator_factory, tmp_path):
    write_token(str(tmp_path), "good")
    write_token(str(tmp_path), "loose", mode=0o640)
    operator = operator_factory({"tokens_dir": str(tmp_path)}, start=False)
    result = run_until_exit(operator)
    assert result.returncode != 0
    path = os.path.join(str(tmp_path), "loose")
    assert f"token file {path} is readable by group or others" in result.stderr


def test_tls_key_readable_by_others_fails(operator_factory, pki):
    operator = operator_factory(start=False)
    paths = tls_files(operator, pki)
    os.chmod(paths["tls_key_file"], 0o644)
    operator.config.update(paths)
    operator._write_config()
    result = run_until_exit(operator)
    assert result.returncode != 0
    assert (f"tls_key_file file {paths['tls_key_file']} is readable by group "
            f"or others") in result.stderr


def test_tokens_need_name_and_length(operator_factory):
    operator = operator_factory(
        {"tokens": [{"name": "short", "token": "abc"}]}, start=False)
    result = run_until_exit(operator, "check-config")
    assert result.returncode != 0
    assert "token 'short' must be at least 16 characters" in result.stderr


# === Request limits ===

LIMITS = {"request_deadline_s": 3.0, "request_timeout_s": 10.0,
          "max_header_count": 20, "max_header_bytes": 4096,
          "max_connections": 4}


@pytest.fixture(scope="module")
def limited(shared_dir, sandbox, caddy):
    """One operator with low limits, shared by the limit tests."""
    process = harness.OperatorProcess(shared_dir, sandbox, caddy, LIMITS)
    try:
        process.start()
        yield process
    finally:
        process.stop()


def plain_connection(operator) -> http.client.HTTPConnection:
    host, _, port = operator.config["listen"].rpartition(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def raw_socket(operator) -> socket.socket:
    host, _, port = operator.config["listen"].rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except OSError:
        return data


@pytest.fixture
def normal_client(limited):
    """A kept-alive connection that must work before and after each test."""
    conn = plain_connection(limited)
    assert get_openapi(conn, limited.token) == 200
    yield conn
    assert get_openapi(conn, limited.token) == 200
    conn.close()


def test_slow_client_cut_off(limited, normal_client):
    request = (f"GET {OPENAPI} HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {limited.token}\r\n\r\n").encode()
    sock = raw_socket(limited)
    started = time.monotonic()
    try:
        # At one byte per 0.25 s the request of about 100 bytes would take
        # about 25 s.
        for byte in request:
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
    except OSError:
        pass
    elapsed = time.monotonic() - started
    response = read_all(sock)
    sock.close()
    assert response.startswith(b"HTTP/1.1 408 ")
    assert b"request_deadline_s" in response
    assert elapsed < len(request) * 0.25 / 2


def test_slow_body_cut_off(limited, normal_client):
    head = (f"POST {DELETE} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {limited.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n")
    sock = raw_socket(limited)
    try:
        sock.sendall(head.encode())
        for _ in range(200):
            sock.sendall(b" ")
            time.sleep(0.25)
    except OSError:
        pass
    response = read_all(sock)
    sock.close()
    assert response.startswith(b"HTTP/1.1 408 ")


def test_idle_kept_alive_connection_not_cut(limited, normal_client):
    # Idle time between two requests does not count against the deadline.
    time.sleep(LIMITS["request_deadline_s"] + 1)
    assert get_openapi(normal_client, limited.token) == 200


def test_too_many_headers_is_431(limited, normal_client):
    conn = plain_connection(limited)
    headers = {f"X-Extra-{n}": "a" for n in range(LIMITS["max_header_count"])}
    headers["Authorization"] = f"Bearer {limited.token}"
    conn.request("GET", OPENAPI, headers=headers)
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 431
    assert "max_header_count" in body["error"]


def test_large_headers_are_431(limited, normal_client):
    conn = plain_connection(limited)
    conn.request("GET", OPENAPI, headers={
        "Authorization": f"Bearer {limited.token}",
        "X-Large": "a" * LIMITS["max_header_bytes"]})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 431
    assert "max_header_bytes" in body["error"]


def test_deep_json_is_400(limited, normal_client):
    depth = co.CONFIG_SPEC["max_json_depth"][0] + 1
    for body in ("[" * depth + "]" * depth,
                 '{"a":' * depth + "1" + "}" * depth,
                 "[" * 100000):
        normal_client.request("POST", DELETE, body=body.encode(), headers={
            "Authorization": f"Bearer {limited.token}",
            "Content-Type": "application/json"})
        response = normal_client.getresponse()
        answer = json.loads(response.read())
        assert response.status == 400
        assert "max_json_depth" in answer["error"]


def test_brackets_in_strings_not_counted(limited, normal_client):
    body = json.dumps({"app_id": "[" * 500, "deployment_id": "{" * 500})
    normal_client.request("POST", DELETE, body=body.encode(), headers={
        "Authorization": f"Bearer {limited.token}",
        "Content-Type": "application/json"})
    response = normal_client.getresponse()
    answer = json.loads(response.read())
    assert response.status == 400
    assert "errors" in answer


def connection_metrics(conn: http.client.HTTPConnection, token: str) -> dict:
    """Return the crate_http_connections_* values of GET /metrics."""
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200, text
    return {name: float(value) for name, _, value in
            (line.partition(" ") for line in text.splitlines())
            if name.startswith("crate_http_connections_")}


def test_extra_connection_refused(limited, normal_client):
    def count(name: str) -> float:
        return connection_metrics(normal_client, limited.token)[name]

    # A connection closed by an earlier test keeps its slot until its
    # server thread ends, which can come after this test's connects: then
    # the third idle socket gets the 503 and the extra one a free slot.
    # So first wait until normal_client is the only open connection, then
    # until the idle sockets are open too.
    wait_until(lambda: count("crate_http_connections_open") == 1,
               what="normal_client alone open")
    rejected = count("crate_http_connections_rejected_total")
    idle = [raw_socket(limited) for _ in range(LIMITS["max_connections"] - 1)]
    try:
        wait_until(lambda: count("crate_http_connections_open")
                   == LIMITS["max_connections"], what="idle sockets served")
        extra = raw_socket(limited)
        response = read_all(extra)
        extra.close()
        assert response.startswith(b"HTTP/1.1 503 ")
        assert b"max_connections" in response
        assert get_openapi(normal_client, limited.token) == 200
        assert count("crate_http_connections_rejected_total") == rejected + 1
    finally:
        for sock in idle:
            sock.close()

    def new_connection_works() -> bool:
        conn = plain_connection(limited)
        try:
            return get_openapi(conn, limited.token) == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    wait_until(new_connection_works, what="a new connection served")
    wait_until(lambda: "event=http.connections_rejected" in limited.log_text(),
               what="the connections_rejected log line")


# === Units: token matching, token collection, JSON depth ===


def test_match_token_names_each_token():
    digests = co.token_digests([("a", "a" * 20), ("b", "b" * 30)])
    assert co.match_token("a" * 20, digests) == "a"
    assert co.match_token("b" * 30, digests) == "b"
    assert co.match_token("b" * 29, digests) is None
    assert co.match_token("", digests) is None


@pytest.mark.parametrize("values, message", [
    ({"tokens": [{"name": "x", "token": "t" * 16}, {"name": "x",
                                                    "token": "u" * 16}]},
     "token name 'x' is used twice"),
    ({"token": "t" * 16, "tokens": [{"name": "default", "token": "u" * 16}]},
     "token name 'default' is used twice"),
    ({"tokens": [{"name": "a b", "token": "t" * 16}]}, "must be 1-64 of"),
    ({"tokens": [{"name": "x"}]}, "each item of tokens must be an object"),
    ({"tokens": ["t" * 16]}, "each item of tokens must be an object"),
    ({}, "no bearer token"),
])
def test_collect_tokens_rejects(values, message):
    with pytest.raises(co.ConfigError) as caught:
        co.collect_tokens(values)
    assert message in str(caught.value)


def test_tokens_dir_skips_dot_files(tmp_path):
    token = write_token(str(tmp_path), "ci")
    write_token(str(tmp_path), ".ci.swp", mode=0o644)
    assert co.collect_tokens({"tokens_dir": str(tmp_path)}) == [("ci", token)]


def test_check_config_masks_tokens(tmp_path):
    empty = tmp_path / "config.json"
    empty.write_text("{}")
    config = co.load_config(str(empty), {}, {
        "tokens": json.dumps([{"name": "ci", "token": "t" * 20}]),
        "callback_secret": "s" * 20, "state_dir": "/nonexistent/state"})
    assert config.as_dict()["tokens"] == [{"name": "ci", "token": "***"}]


@pytest.mark.parametrize("text, limit, over", [
    ("[[[]]]", 3, False),
    ("[[[]]]", 2, True),
    ('{"a": {"b": [1, 2]}}', 3, False),
    ('{"a": {"b": [1, [2]]}}', 3, True),
    ('["[[[[[[", "\\"[[[["]', 1, False),
    ('"unterminated [[[[', 1, False),
    ("[" * 5000, 32, True),
])
def test_json_depth_over(text, limit, over):
    assert co.json_depth_over(text, limit) is over
