import crate_operator as co

# Tests of the Caddy admin API section. The pure functions are tested alone, and
# the client is tested against a real `caddy run` (2.6.2 from Debian) that each
# test starts under /srv and stops again. All traffic stays on 127.0.0.1.

import http.client
import http.server
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

CADDY_BINARY = shutil.which("caddy")
SERVER = "crate"
SERVER_PATH = f"/config/apps/http/servers/{SERVER}"
ROUTES_PATH = SERVER_PATH + "/routes"
START_TIMEOUT = 10.0  # seconds to wait for Caddy's admin API to respond
BACKEND_BODIES = (b"backend-A", b"backend-B")


# --- Test helpers: raw admin calls, independent of the code under test ---


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=5.0):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CaddyProcess:
    """One `caddy run` host process with its files in a directory under /srv."""

    def __init__(self, root, unix_admin=False):
        self.root = root
        self.http_port = free_port()
        self.https_port = free_port()
        self.listen_port = free_port()
        self.listen = f"127.0.0.1:{self.listen_port}"
        if unix_admin:
            self.socket_path = str(root / "admin.sock")
            self.admin_listen = "unix/" + self.socket_path
            self.admin = "unix:" + self.socket_path
        else:
            self.socket_path = None
            self.admin_port = free_port()
            self.admin_listen = f"127.0.0.1:{self.admin_port}"
            self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = root / "caddy.log"
        self.process = None

    def config(self):
        return {
            "admin": {"listen": self.admin_listen, "config": {"persist": False}},
            "apps": {
                "http": {
                    "http_port": self.http_port,
                    "https_port": self.https_port,
                    "servers": {},
                }
            },
        }

    def start(self):
        config_path = self.root / "caddy.json"
        config_path.write_text(json.dumps(self.config()))
        home = self.root / "home"
        env = dict(
            os.environ,
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_DATA_HOME=str(home / ".local" / "share"),
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [CADDY_BINARY, "run", "--config", str(config_path)],
                cwd=str(self.root),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"caddy exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                status, _ = self.call("GET", "/config/")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(
            f"caddy admin API did not respond within {START_TIMEOUT} s:\n"
            f"{self.log_tail()}"
        )

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log_tail(self, lines=20):
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(
            self.log_path.read_text(errors="replace").splitlines()[-lines:]
        )

    def admin_writes(self):
        """Count the admin requests other than GET that Caddy has logged."""
        count = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"msg":"received request"' in line and '"method":"GET"' not in line:
                count += 1
        return count

    def admin_requests(self):
        """Return (method, uri) of every admin request that Caddy has logged."""
        requests = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"msg":"received request"' in line:
                entry = json.loads(line)
                requests.append((entry["method"], entry["uri"]))
        return requests

    def call(self, method, path, document=None, host=None):
        """Send an admin request without the code under test, return (status, body)."""
        body = None if document is None else json.dumps(document).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.socket_path is not None:
            headers["Host"] = "" if host is None else host
        elif host is not None:
            headers["Host"] = host
        for attempt in range(4):
            if self.socket_path is not None:
                connection = _UnixConnection(self.socket_path)
            else:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", self.admin_port, timeout=5
                )
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except ConnectionResetError:
                # Caddy resets connections accepted just before its admin
                # server restarts.
                if attempt == 3:
                    raise
                time.sleep(0.05)
            finally:
                connection.close()

    def call_json(self, method, path, document=None):
        status, body = self.call(method, path, document)
        assert status == 200, f"{method} {path} returned {status}: {body!r}"
        return json.loads(body) if body.strip() else None

    def routes(self):
        return self.call_json("GET", ROUTES_PATH) or []


def make_caddy_root():
    return pathlib.Path(tempfile.mkdtemp(prefix="crate-caddy-test-", dir="/srv"))


def run_caddy(unix_admin=False):
    if CADDY_BINARY is None:
        pytest.skip("the caddy binary is not installed")
    root = make_caddy_root()
    caddy = CaddyProcess(root, unix_admin=unix_admin)
    try:
        caddy.start()
        yield caddy
    finally:
        caddy.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert caddy.process.poll() is not None, "caddy is still running"
    assert not root.exists(), f"{root} was not removed"


@pytest.fixture
def caddy():
    yield from run_caddy()


@pytest.fixture
def unix_caddy():
    yield from run_caddy(unix_admin=True)


def make_client(caddy, **overrides):
    options = dict(
        admin=caddy.admin,
        server=SERVER,
        listen=caddy.listen,
        automatic_https=False,
        timeout=5.0,
    )
    options.update(overrides)
    return co.CaddyClient(**options)


@pytest.fixture
def client(caddy):
    client = make_client(caddy)
    client.ensure_server()
    return client


class _BackendHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The handler writes headers and body separately. With Nagle's algorithm on,
    # each proxied request then waits about 40 ms for a delayed ACK.
    disable_nagle_algorithm = True

    def do_GET(self):
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def backends():
    """Start two HTTP servers on 127.0.0.1 and yield their dials, A first."""
    servers = []
    for body in BACKEND_BODIES:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BackendHandler)
        server.daemon_threads = True
        server.body = body
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [f"127.0.0.1:{server.server_address[1]}" for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def proxy_get(caddy, host, connection=None):
    """Send GET / with this Host through Caddy, return (status, upstream, body)."""
    own = connection is None
    if own:
        connection = http.client.HTTPConnection(
            "127.0.0.1", caddy.listen_port, timeout=10
        )
    try:
        connection.request("GET", "/", headers={"Host": host})
        response = connection.getresponse()
        body = response.read()
        return response.status, response.getheader(co.CADDY_UPSTREAM_HEADER), body
    finally:
        if own:
            connection.close()


def route_ids(routes):
    return [route.get("@id") for route in routes]


FOREIGN_ROUTE = {
    "match": [{"host": ["Legacy.Example.Test."]}],
    "handle": [{"handler": "static_response", "body": "legacy site"}],
    "terminal": True,
}


# --- Pure functions ---


@pytest.mark.parametrize(
    "upstreams, expected_counts",
    [
        (
            [("127.0.0.1:1", 10), ("127.0.0.1:2", 90)],
            {"127.0.0.1:1": 1, "127.0.0.1:2": 9},
        ),
        (
            [("127.0.0.1:1", 50), ("127.0.0.1:2", 50)],
            {"127.0.0.1:1": 1, "127.0.0.1:2": 1},
        ),
        ([("127.0.0.1:1", 0), ("127.0.0.1:2", 100)], {"127.0.0.1:2": 1}),
        ([("127.0.0.1:1", 100), ("127.0.0.1:2", 0)], {"127.0.0.1:1": 1}),
        ([("127.0.0.1:1", 100)], {"127.0.0.1:1": 1}),
        (
            [("127.0.0.1:1", 33), ("127.0.0.1:2", 67)],
            {"127.0.0.1:1": 33, "127.0.0.1:2": 67},
        ),
        (
            [("127.0.0.1:1", 25), ("127.0.0.1:2", 25), ("127.0.0.1:3", 50)],
            {"127.0.0.1:1": 1, "127.0.0.1:2": 1, "127.0.0.1:3": 2},
        ),
    ],
)
def test_weights_to_entries_ratio(upstreams, expected_counts):
    entries = co.weights_to_entries(upstreams)
    counts = {dial: entries.count(dial) for dial in set(entries)}
    assert counts == expected_counts


def test_weights_to_entries_spreads_canary():
    entries = co.weights_to_entries([("127.0.0.1:1", 30), ("127.0.0.1:2", 70)])
    assert len(entries) == 10
    cyclic = entries + entries[:1]
    pairs = list(zip(cyclic, cyclic[1:]))
    assert ("127.0.0.1:1", "127.0.0.1:1") not in pairs


@pytest.mark.parametrize(
    "upstreams",
    [
        [],
        [("127.0.0.1:1", 0), ("127.0.0.1:2", 0)],
        [("127.0.0.1:1", 50)],
        [("127.0.0.1:1", 60), ("127.0.0.1:2", 60)],
        [("127.0.0.1:1", -10), ("127.0.0.1:2", 110)],
        [("127.0.0.1:1", 50.0), ("127.0.0.1:2", 50)],
        [("127.0.0.1:1", True), ("127.0.0.1:2", 99)],
        [("127.0.0.1:1", 50), ("127.0.0.1:1", 50)],
        [("127.0.0.1", 100)],
        [("127.0.0.1:0", 100)],
        [("127.0.0.1:70000", 100)],
        [("http://127.0.0.1:1", 100)],
        [("127.0.0.1:1",)],
        ["127.0.0.1:1"],
    ],
)
def test_weights_to_entries_rejects_invalid(upstreams):
    with pytest.raises(ValueError):
        co.weights_to_entries(upstreams)


def test_build_app_route_shape():
    route = co.build_app_route(
        "shop", "SHOP.Example.Test.", [("127.0.0.1:1", 10), ("127.0.0.1:2", 90)]
    )
    assert route["@id"] == "crate-app-shop"
    assert route["match"] == [{"host": ["shop.example.test"]}]
    assert route["terminal"] is True
    assert len(route["handle"]) == 1
    proxy = route["handle"][0]
    assert proxy["handler"] == "reverse_proxy"
    dials = [upstream["dial"] for upstream in proxy["upstreams"]]
    assert sorted(dials) == ["127.0.0.1:1"] + ["127.0.0.1:2"] * 9
    assert all(set(upstream) == {"dial"} for upstream in proxy["upstreams"])
    balancing = proxy["load_balancing"]
    assert balancing["selection_policy"] == {"policy": "round_robin"}
    assert balancing["try_duration"] == "5s"
    assert balancing["try_interval"] == "100ms"
    header = proxy["headers"]["response"]["set"]["X-Crate-Upstream"]
    assert header == ["{http.reverse_proxy.upstream.hostport}"]


def test_build_app_route_never_sends_weight():
    route = co.build_app_route(
        "shop", "shop.example.test", [("127.0.0.1:1", 0), ("127.0.0.1:2", 100)]
    )
    assert route["handle"][0]["upstreams"] == [{"dial": "127.0.0.1:2"}]
    assert "weight" not in json.dumps(route)


@pytest.mark.parametrize("app_id", ["", "a/b", "a b", "-x", "x" * 129, None, "é"])
def test_build_app_route_rejects_app_id(app_id):
    with pytest.raises(ValueError):
        co.build_app_route(app_id, "shop.example.test", [("127.0.0.1:1", 100)])


@pytest.mark.parametrize(
    "domain, expected",
    [
        ("shop.example.test", "shop.example.test"),
        ("SHOP.Example.Test.", "shop.example.test"),
        ("a-b.x1.example.test", "a-b.x1.example.test"),
    ],
)
def test_build_app_route_normalises_domain(domain, expected):
    route = co.build_app_route("shop", domain, [("127.0.0.1:1", 100)])
    assert route["match"] == [{"host": [expected]}]


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "localhost",
        "bad domain",
        "https://x.example.test/",
        "x.example.test:8080",
        "x..example.test",
        "-x.example.test",
        "x-.example.test",
        "*.example.test",
        "x.example.test..",
        "a" * 64 + ".example.test",
        "\u212aiosk.example.test",
        "bücher.example.test",
        None,
    ],
)
def test_build_app_route_rejects_domain(domain):
    with pytest.raises(ValueError):
        co.build_app_route("shop", domain, [("127.0.0.1:1", 100)])


def test_caddy_route_id_accepts_int_and_text():
    assert co.caddy_route_id(42) == "crate-app-42"
    assert co.caddy_route_id("web-1") == "crate-app-web-1"
    for bad in (-1, True, 1.5, "a/b"):
        with pytest.raises(ValueError):
            co.caddy_route_id(bad)


@st.composite
def weight_splits(draw):
    count = draw(st.integers(min_value=1, max_value=4))
    cuts = sorted(
        draw(st.lists(st.integers(0, 100), min_size=count - 1, max_size=count - 1))
    )
    bounds = [0] + cuts + [100]
    weights = [high - low for low, high in zip(bounds, bounds[1:])]
    return [
        (f"127.0.0.1:{1000 + index}", weight) for index, weight in enumerate(weights)
    ]


def canonical_split(upstreams: list) -> list:
    """Return the pairs that upstreams_from_route gives for upstreams.

    A split whose weights differ by at most 1 (33/33/34) is routed as an
    equal split, the same route whichever upstream has the larger share,
    so reading it back gives the larger shares to the first upstreams.
    """
    active = [(dial, weight) for dial, weight in upstreams if weight]
    weights = [weight for _, weight in active]
    if len(active) < 2 or max(weights) - min(weights) > 1:
        return active
    share, extra = divmod(100, len(active))
    return [(dial, share + (1 if index < extra else 0))
            for index, (dial, _) in enumerate(active)]


@settings(database=None)
@given(weight_splits())
def test_upstreams_from_route_round_trip(upstreams):
    route = co.build_app_route("app", "app.example.test", upstreams)
    assert co.upstreams_from_route(route) == canonical_split(upstreams)
    assert len(route["handle"][0]["upstreams"]) <= 100


def test_near_equal_split_read_back():
    upstreams = [("127.0.0.1:1000", 33), ("127.0.0.1:1001", 33),
                 ("127.0.0.1:1002", 34)]
    route = co.build_app_route("app", "app.example.test", upstreams)
    assert len(route["handle"][0]["upstreams"]) == 3
    assert co.upstreams_from_route(route) == [
        ("127.0.0.1:1000", 34), ("127.0.0.1:1001", 33),
        ("127.0.0.1:1002", 33)]


def test_upstreams_from_foreign_route_sums_to_100():
    route = {
        "handle": [
            {
                "handler": "reverse_proxy",
                "upstreams": [{"dial": "a:1"}, {"dial": "b:1"}, {"dial": "c:1"}],
            }
        ]
    }
    weights = co.upstreams_from_route(route)
    assert sum(weight for _, weight in weights) == 100
    assert sorted(weight for _, weight in weights) == [33, 33, 34]


def test_caddy_config_etag_known_value():
    # Value read from the ETag trailer of a Caddy 2.6.2 GET /config/.
    body = (
        b'{"admin":{"config":{"persist":false},"listen":"127.0.0.1:22019"},'
        b'"apps":{"http":{"http_port":22080,"https_port":22443,"servers":{}}}}\n'
    )
    assert co.caddy_config_etag("/config/", body) == '"/config/ 66804915"'


@pytest.mark.parametrize(
    "admin",
    ["localhost:2019", "https://127.0.0.1:2019", "http://127.0.0.1", "unix:relative"],
)
def test_client_rejects_bad_admin_address(admin):
    with pytest.raises(ValueError):
        co.CaddyClient(admin, SERVER, "127.0.0.1:8080", automatic_https=False)


def test_domain_taken_error_is_409_caddy_error():
    error = co.DomainTakenError(
        "shop.example.test", "crate-app-a", SERVER, "crate-app-b"
    )
    assert isinstance(error, co.CaddyError)
    assert isinstance(error, co.OperatorError)
    assert error.status == 409
    assert error.owner == "crate-app-a"
    assert "shop.example.test" in str(error)


# --- Against a real Caddy: server and catch-all ---


def test_empty_servers_map_accepted(caddy):
    config = caddy.call_json("GET", "/config/")
    assert config["apps"]["http"]["servers"] == {}


def test_etag_matches_caddy_trailer(caddy, client):
    with socket.create_connection(("127.0.0.1", caddy.admin_port), timeout=5) as sock:
        request = (
            f"GET /config/ HTTP/1.1\r\nHost: {caddy.admin_listen}\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        raw = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"Trailer: ETag" in head
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    trailer = rest.decode().strip()
    assert trailer.lower().startswith("etag:")
    assert trailer.split(":", 1)[1].strip() == co.caddy_config_etag("/config/", body)


def test_ensure_server_creates_server(caddy, client):
    server = caddy.call_json("GET", SERVER_PATH)
    assert server["listen"] == [caddy.listen]
    assert server["automatic_https"] == {"disable": True}
    assert server["routes"] == [co.catch_all_route()]


def test_ensure_server_idempotent(caddy, client, backends):
    writes = caddy.admin_writes()
    client.ensure_server()
    assert caddy.admin_writes() == writes
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    writes = caddy.admin_writes()
    client.ensure_server()
    client.ensure_server()
    assert caddy.admin_writes() == writes
    assert route_ids(caddy.routes()) == ["crate-app-shop", "crate-catch-all"]


def test_ensure_server_moves_catch_all_last(caddy, client):
    caddy.call_json("POST", ROUTES_PATH, FOREIGN_ROUTE)
    foreign_before = caddy.routes()[1]
    assert route_ids(caddy.routes()) == ["crate-catch-all", None]
    writes = caddy.admin_writes()
    client.ensure_server()
    routes = caddy.routes()
    assert route_ids(routes) == [None, "crate-catch-all"]
    assert routes[0] == foreign_before
    assert caddy.admin_writes() == writes + 1


def test_ensure_server_removes_duplicate_catch_all(caddy, client):
    caddy.call_json("PUT", ROUTES_PATH + "/0", co.catch_all_route())
    client.ensure_server()
    assert route_ids(caddy.routes()) == ["crate-catch-all"]


def test_ensure_server_restores_catch_all(caddy, client):
    caddy.call_json("DELETE", "/id/crate-catch-all")
    assert caddy.routes() == []
    client.ensure_server()
    assert caddy.routes() == [co.catch_all_route()]


def test_ensure_server_without_routes_key(caddy, client):
    caddy.call_json("DELETE", ROUTES_PATH)
    client.ensure_server()
    assert caddy.routes() == [co.catch_all_route()]


def test_ensure_server_on_config_without_http(caddy):
    caddy.call_json("DELETE", "/config/apps/http")
    make_client(caddy).ensure_server()
    assert route_ids(caddy.routes()) == ["crate-catch-all"]


def test_ensure_server_leaves_automatic_https(caddy):
    listen = f"127.0.0.1:{caddy.http_port}"
    make_client(caddy, listen=listen, automatic_https=True).ensure_server()
    server = caddy.call_json("GET", SERVER_PATH)
    assert "automatic_https" not in server
    assert server["listen"] == [listen]


def test_ensure_server_warns_on_listen_drift(caddy, client, caplog):
    other = make_client(caddy, listen="127.0.0.1:1")
    with caplog.at_level("WARNING", logger="crate_operator"):
        other.ensure_server()
        other.ensure_server()
    warnings = [
        r.getMessage() for r in caplog.records if "listens on" in r.getMessage()
    ]
    assert len(warnings) == 1
    server = caddy.call_json("GET", SERVER_PATH)
    assert server["listen"] == [caddy.listen]


def test_unknown_host_gets_catch_all_404(caddy, client):
    status, upstream, body = proxy_get(caddy, "nobody.example.test")
    assert status == 404
    assert upstream is None
    assert json.loads(body) == {"error": "no route for this host"}


# --- App routes ---


def test_set_route_reaches_upstream(caddy, client, backends):
    written = client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert written == co.build_app_route(
        "shop", "shop.example.test", [(backends[0], 100)]
    )
    assert route_ids(caddy.routes()) == ["crate-app-shop", "crate-catch-all"]
    for host in (
        "shop.example.test",
        "Shop.Example.Test",
        f"shop.example.test:{caddy.listen_port}",
    ):
        status, upstream, body = proxy_get(caddy, host)
        assert status == 200, host
        assert body == b"backend-A", host
        assert upstream == backends[0], host


def test_set_route_int_app_id(caddy, client, backends):
    client.set_app_route(7, "seven.example.test", [(backends[1], 100)])
    assert client.domain_owner("seven.example.test") == "crate-app-7"
    assert client.get_app_route(7)["@id"] == "crate-app-7"
    assert proxy_get(caddy, "seven.example.test")[2] == b"backend-B"
    assert client.delete_app_route(7) is True


def test_set_route_replaces_in_one_write(caddy, client, backends):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    writes = caddy.admin_writes()
    client.set_app_route("shop", "shop.example.test", [(backends[1], 100)])
    assert caddy.admin_writes() == writes + 1
    assert route_ids(caddy.routes()) == ["crate-app-shop", "crate-catch-all"]
    assert proxy_get(caddy, "shop.example.test")[2] == b"backend-B"


def test_set_route_unchanged_makes_no_write(caddy, client, backends):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    writes = caddy.admin_writes()
    client.set_app_route("shop", "SHOP.example.test.", [(backends[0], 100)])
    assert caddy.admin_writes() == writes


def test_set_route_creates_in_one_write(caddy, client, backends):
    client.set_app_route("first", "first.example.test", [(backends[0], 100)])
    writes = caddy.admin_writes()
    client.set_app_route("second", "second.example.test", [(backends[1], 100)])
    assert caddy.admin_writes() == writes + 1
    ids = route_ids(caddy.routes())
    assert ids == ["crate-app-first", "crate-app-second", "crate-catch-all"]


def test_set_route_creates_missing_catch_all(caddy, client, backends):
    caddy.call_json("DELETE", "/id/crate-catch-all")
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert route_ids(caddy.routes()) == ["crate-app-shop", "crate-catch-all"]


def test_set_route_moves_catch_all_first(caddy, client, backends):
    caddy.call_json("POST", ROUTES_PATH, FOREIGN_ROUTE)
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert route_ids(caddy.routes()) == [None, "crate-app-shop", "crate-catch-all"]
    assert proxy_get(caddy, "shop.example.test")[2] == b"backend-A"


def test_client_rejects_bad_server_name(caddy):
    for name in ("", "a/b", "a b", None):
        with pytest.raises(ValueError):
            make_client(caddy, server=name)


def test_set_route_creates_missing_server(caddy, backends):
    make_client(caddy).set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert route_ids(caddy.routes()) == ["crate-app-shop", "crate-catch-all"]
    assert proxy_get(caddy, "shop.example.test")[2] == b"backend-A"


def test_set_route_split_10_90(caddy, client, backends):
    client.set_app_route(
        "shop", "shop.example.test", [(backends[0], 10), (backends[1], 90)]
    )
    counts = {backends[0]: 0, backends[1]: 0}
    statuses = set()
    connection = http.client.HTTPConnection("127.0.0.1", caddy.listen_port, timeout=10)
    try:
        for _ in range(1000):
            status, upstream, _ = proxy_get(caddy, "shop.example.test", connection)
            statuses.add(status)
            counts[upstream] += 1
    finally:
        connection.close()
    assert statuses == {200}
    assert 90 <= counts[backends[0]] <= 110, counts
    assert counts[backends[0]] + counts[backends[1]] == 1000


@pytest.mark.parametrize("zero_first", [True, False])
def test_set_route_weight_zero_lists_one(caddy, client, backends, zero_first):
    weights = (0, 100) if zero_first else (100, 0)
    live = backends[1] if zero_first else backends[0]
    upstreams = [(backends[0], weights[0]), (backends[1], weights[1])]
    client.set_app_route("shop", "shop.example.test", upstreams)
    route = caddy.call_json("GET", "/id/crate-app-shop")
    assert route["handle"][0]["upstreams"] == [{"dial": live}]
    assert "weight" not in json.dumps(route)
    assert client.app_upstreams("shop") == [(live, 100)]
    for _ in range(20):
        assert proxy_get(caddy, "shop.example.test")[1] == live


def test_app_upstreams_reconstructs_split(caddy, client, backends):
    upstreams = [(backends[0], 25), (backends[1], 75)]
    client.set_app_route("shop", "shop.example.test", upstreams)
    assert client.app_upstreams("shop") == upstreams
    assert client.app_upstreams("absent") == []


def test_get_app_route_absent_is_none(caddy, client):
    assert client.get_app_route("absent") is None


def test_delete_app_route(caddy, client, backends):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert client.delete_app_route("shop") is True
    assert client.delete_app_route("shop") is False
    assert client.get_app_route("shop") is None
    assert route_ids(caddy.routes()) == ["crate-catch-all"]
    assert proxy_get(caddy, "shop.example.test")[0] == 404


def test_delete_app_route_removes_duplicates(caddy, client, backends):
    route = client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    caddy.call_json("PUT", ROUTES_PATH + "/0", route)
    assert route_ids(caddy.routes()).count("crate-app-shop") == 2
    assert client.delete_app_route("shop") is True
    assert route_ids(caddy.routes()) == ["crate-catch-all"]


def test_set_route_collapses_duplicates(caddy, client, backends):
    route = client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    caddy.call_json("PUT", ROUTES_PATH + "/0", route)
    client.set_app_route("shop", "shop.example.test", [(backends[1], 100)])
    assert route_ids(caddy.routes()) == ["crate-app-shop", "crate-catch-all"]
    assert proxy_get(caddy, "shop.example.test")[2] == b"backend-B"


# --- Route index: changes that read one route ---


def test_route_update_reads_one_route(caddy, client, backends):
    client.set_app_route("first", "first.example.test", [(backends[0], 100)])
    client.set_app_route("second", "second.example.test", [(backends[0], 100)])
    before = len(caddy.admin_requests())
    client.set_app_route("second", "second.example.test", [(backends[1], 100)])
    requests = caddy.admin_requests()[before:]
    # The route is known from the client's own write: the position after
    # the last route, and one write guarded by the known route's hash.
    assert requests == [
        ("GET", ROUTES_PATH + "/3"),
        ("PATCH", ROUTES_PATH + "/1"),
    ]
    assert proxy_get(caddy, "second.example.test")[2] == b"backend-B"
    assert proxy_get(caddy, "first.example.test")[2] == b"backend-A"
    # Another client changes the route: the write guarded by the hash of
    # the route as this client wrote it gets 412, so the change reads the
    # route, finds it as expected and writes nothing.
    other = make_client(caddy)
    other.set_app_route("second", "second.example.test", [(backends[0], 100)])
    before = len(caddy.admin_requests())
    client.set_app_route("second", "second.example.test", [(backends[0], 100)])
    assert caddy.admin_requests()[before:] == [
        ("GET", ROUTES_PATH + "/3"),
        ("PATCH", ROUTES_PATH + "/1"),
        ("GET", ROUTES_PATH + "/1"),
        ("GET", ROUTES_PATH + "/3"),
    ]
    assert proxy_get(caddy, "second.example.test")[2] == b"backend-A"


def test_known_route_past_the_end_read_again(caddy, client, backends):
    """A route this client knows at a position the server no longer has
    is read again; the error of the guessed write is not reported."""
    client.set_app_route("first", "first.example.test", [(backends[0], 100)])
    client.set_app_route("second", "second.example.test", [(backends[0], 100)])
    second = caddy.routes()[1]
    caddy.call_json("PATCH", ROUTES_PATH, [second])
    route = client.set_app_route("second", "second.example.test",
                                 [(backends[1], 100)])
    assert route_ids(caddy.routes()) == ["crate-app-second", "crate-catch-all"]
    assert proxy_get(caddy, "second.example.test")[2] == b"backend-B"
    assert route == caddy.routes()[0]


def test_caddy_json_matches_caddy_bytes(caddy, client, backends):
    """The bytes caddy_json predicts are those Caddy returns for a GET."""
    route = client.set_app_route("shop", "shop.example.test",
                                 [(backends[0], 60), (backends[1], 40)])
    status, body = caddy.call("GET", ROUTES_PATH + "/0")
    assert status == 200
    assert co.caddy_json(route) == body
    assert co.caddy_json({"a": "<b>"}) is None
    assert co.caddy_json({"a": 0.5}) is None


def test_domain_change_parses_no_config(caddy, client, backends, monkeypatch):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])

    def no_full_parse(self, action):
        raise AssertionError(f"{action} parsed the whole config")

    monkeypatch.setattr(co.CaddyClient, "_snapshot", no_full_parse)
    writes = caddy.admin_writes()
    route = client.change_domain("shop", "moved.example.test")
    assert route["match"] == [{"host": ["moved.example.test"]}]
    assert caddy.admin_writes() == writes + 1
    assert client.domain_owner("moved.example.test") == "crate-app-shop"
    assert client.domain_owner("free.example.test") is None
    assert client.get_app_route("shop") == route
    assert proxy_get(caddy, "moved.example.test")[2] == b"backend-A"


def test_domain_update_requests(caddy, client, backends):
    """A domain update as the operator makes it: the route, read at its
    position, then the config for the domain check, then one write."""
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    before = len(caddy.admin_requests())
    route = client.get_app_route("shop", check="none")
    assert route["match"] == [{"host": ["shop.example.test"]}]
    client.change_domain("shop", "moved.example.test")
    assert caddy.admin_requests()[before:] == [
        ("GET", ROUTES_PATH + "/0"), ("GET", "/config/"),
        ("PATCH", ROUTES_PATH + "/0/match")]
    assert proxy_get(caddy, "moved.example.test")[2] == b"backend-A"


def shift_first_away(caddy):
    caddy.call_json("DELETE", "/id/crate-app-first")


def swap_first_and_second(caddy):
    first, second, catch_all = caddy.routes()
    caddy.call_json("PATCH", ROUTES_PATH, [second, first, catch_all])


def insert_before_catch_all(caddy):
    caddy.call_json("PUT", ROUTES_PATH + "/2", FOREIGN_ROUTE)


def append_after_catch_all(caddy):
    caddy.call_json("POST", ROUTES_PATH, FOREIGN_ROUTE)


def duplicate_second(caddy):
    caddy.call_json("PUT", ROUTES_PATH + "/0", caddy.routes()[1])


@pytest.mark.parametrize(
    "change, expected_ids",
    [
        (shift_first_away, ["crate-app-second", "crate-catch-all"]),
        (swap_first_and_second,
         ["crate-app-second", "crate-app-first", "crate-catch-all"]),
        (insert_before_catch_all,
         ["crate-app-first", "crate-app-second", None, "crate-catch-all"]),
        (append_after_catch_all,
         ["crate-app-first", "crate-app-second", None, "crate-catch-all"]),
        (duplicate_second,
         ["crate-app-second", "crate-app-first", "crate-catch-all"]),
    ],
)
def test_stale_index_repaired(caddy, client, backends, change, expected_ids):
    client.set_app_route("first", "first.example.test", [(backends[0], 100)])
    client.set_app_route("second", "second.example.test", [(backends[0], 100)])
    first = caddy.call_json("GET", "/id/crate-app-first")
    change(caddy)
    route = client.set_app_route(
        "second", "second.example.test", [(backends[1], 100)]
    )
    routes = caddy.routes()
    assert route_ids(routes) == expected_ids
    assert route in routes
    if "crate-app-first" in expected_ids:
        assert first in routes
    assert proxy_get(caddy, "second.example.test")[2] == b"backend-B"
    # The full read that repaired the change rebuilt the index, and the
    # route is known from the repairing write, so the next change reads
    # only the config for the domain check, then writes.
    positions, count = client._route_index
    assert count == len(routes)
    assert positions["crate-app-second"] == expected_ids.index("crate-app-second")
    before = len(caddy.admin_requests())
    client.change_domain("second", "second2.example.test")
    assert caddy.admin_requests()[before:] == [
        ("GET", "/config/"),
        ("PATCH", ROUTES_PATH + "/%d/match"
         % expected_ids.index("crate-app-second"))]
    assert proxy_get(caddy, "second2.example.test")[2] == b"backend-B"


def test_stale_index_read_and_domain_change(caddy, client, backends):
    client.set_app_route("first", "first.example.test", [(backends[0], 100)])
    client.set_app_route("second", "second.example.test", [(backends[1], 100)])
    first = caddy.call_json("GET", "/id/crate-app-first")
    swap_first_and_second(caddy)
    assert client.get_app_route("second")["@id"] == "crate-app-second"
    swap_first_and_second(caddy)
    route = client.change_domain("second", "moved.example.test")
    assert route["@id"] == "crate-app-second"
    assert caddy.call_json("GET", "/id/crate-app-second") == route
    assert caddy.call_json("GET", "/id/crate-app-first") == first
    assert proxy_get(caddy, "moved.example.test")[2] == b"backend-B"
    assert proxy_get(caddy, "first.example.test")[2] == b"backend-A"


def test_route_changed_after_read_gets_412(
    caddy, client, backends, monkeypatch, caplog
):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    client._known.clear()  # so that the change reads the route first
    original = co.CaddyClient._read_indexed
    interrupted = []

    def read_then_foreign_write(self, route_id, action, **options):
        found = original(self, route_id, action, **options)
        if found is not None and not interrupted:
            interrupted.append(found[0])
            # Another process changes the same route between our read and
            # our write, without moving it.
            foreign = dict(found[1], terminal=False)
            caddy.call_json("PATCH", f"{ROUTES_PATH}/{found[0]}", foreign)
        return found

    monkeypatch.setattr(co.CaddyClient, "_read_indexed", read_then_foreign_write)
    with caplog.at_level("INFO", logger="crate_operator"):
        route = client.set_app_route("shop", "shop.example.test", [(backends[1], 100)])
    assert interrupted == [0]
    assert any("changed since it was read" in r.getMessage() for r in caplog.records)
    assert caddy.routes() == [route, co.catch_all_route()]
    assert proxy_get(caddy, "shop.example.test")[2] == b"backend-B"


def test_change_domain_taken_with_index(caddy, client, backends):
    client.set_app_route("one", "one.example.test", [(backends[0], 100)])
    client.set_app_route("two", "two.example.test", [(backends[1], 100)])
    # A foreign route added after the index was built must still block.
    caddy.call_json("PUT", ROUTES_PATH + "/0", FOREIGN_ROUTE)
    with pytest.raises(co.DomainTakenError) as caught:
        client.change_domain("two", "legacy.example.test")
    assert caught.value.owner == "foreign route #0"
    assert caddy.call_json("GET", "/id/crate-app-two")["match"] == [
        {"host": ["two.example.test"]}
    ]


def test_sole_mention_owner_cases():
    def body(*routes):
        config = {"apps": {"http": {"servers": {SERVER: {"routes": list(routes)}}}}}
        # Caddy writes compact JSON with sorted keys and a newline.
        text = json.dumps(config, separators=(",", ":"), sort_keys=True)
        return (text + "\n").encode()

    ours = co.build_app_route("shop", "shop.example.test", [("127.0.0.1:9", 100)])
    foreign = dict(FOREIGN_ROUTE, match=[{"host": ["Shop.Example.Test."]}])
    longer = co.build_app_route("s2", "shop.example.test2", [("127.0.0.1:9", 100)])
    owner = co._sole_mention_owner
    assert owner(body(ours), "free.example.test") is None
    assert owner(body(ours), "shop.example.test") == "crate-app-shop"
    assert owner(body(foreign), "shop.example.test") is co._READ_AGAIN
    assert owner(body(foreign, ours), "shop.example.test") is co._READ_AGAIN
    assert owner(body(ours, longer), "shop.example.test") is co._READ_AGAIN
    assert owner(body(longer), "shop.example.test") is co._READ_AGAIN


# --- Domain ownership ---


def test_foreign_route_blocks_domain(caddy, client, backends):
    caddy.call_json("POST", ROUTES_PATH, FOREIGN_ROUTE)
    client.ensure_server()
    before = caddy.routes()
    assert client.domain_owner("legacy.example.test") == "foreign route #0"
    with pytest.raises(co.DomainTakenError) as caught:
        client.set_app_route("shop", "legacy.example.test", [(backends[0], 100)])
    assert caught.value.status == 409
    assert caught.value.owner == "foreign route #0"
    assert "legacy.example.test" in str(caught.value)
    assert caddy.routes() == before
    assert proxy_get(caddy, "legacy.example.test.")[2] == b"legacy site"


def test_foreign_route_never_deleted(caddy, client, backends):
    caddy.call_json("PUT", ROUTES_PATH + "/0", FOREIGN_ROUTE)
    foreign = caddy.routes()[0]
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    client.change_domain("shop", "shop2.example.test")
    client.delete_app_route("shop")
    client.ensure_server()
    assert caddy.routes() == [foreign, co.catch_all_route()]


def test_domain_owner_searches_all_servers(caddy, client, backends):
    other = {
        "listen": [f"127.0.0.1:{free_port()}"],
        "automatic_https": {"disable": True},
        "routes": [
            {
                "@id": "legacy-site",
                "match": [{"host": ["other.example.test"]}],
                "handle": [{"handler": "static_response", "body": "other"}],
            }
        ],
    }
    caddy.call_json("PUT", "/config/apps/http/servers/other", other)
    assert client.domain_owner("OTHER.example.test.") == "legacy-site"
    with pytest.raises(co.DomainTakenError) as caught:
        client.set_app_route("shop", "other.example.test", [(backends[0], 100)])
    assert caught.value.server == "other"
    assert caught.value.owner == "legacy-site"


def test_domain_owner_none_and_own(caddy, client, backends):
    assert client.domain_owner("free.example.test") is None
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert client.domain_owner("shop.example.test") == "crate-app-shop"


def test_domain_case_and_dot_conflict(caddy, client, backends):
    client.set_app_route("shop", "SHOP.Example.Test.", [(backends[0], 100)])
    route = caddy.call_json("GET", "/id/crate-app-shop")
    assert route["match"] == [{"host": ["shop.example.test"]}]
    with pytest.raises(co.DomainTakenError) as caught:
        client.set_app_route("other", "shop.example.test", [(backends[1], 100)])
    assert caught.value.owner == "crate-app-shop"
    assert client.get_app_route("other") is None
    assert proxy_get(caddy, "Shop.Example.Test")[2] == b"backend-A"


def test_foreign_host_case_and_dot_conflict(caddy, client, backends):
    caddy.call_json("PUT", ROUTES_PATH + "/0", FOREIGN_ROUTE)
    with pytest.raises(co.DomainTakenError):
        client.set_app_route("shop", "legacy.example.test", [(backends[0], 100)])


# --- change_domain ---


def test_change_domain_moves_host(caddy, client, backends):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    writes = caddy.admin_writes()
    route = client.change_domain("shop", "NEW.example.test.")
    assert caddy.admin_writes() == writes + 1
    assert route["match"] == [{"host": ["new.example.test"]}]
    assert caddy.call_json("GET", "/id/crate-app-shop") == route
    assert proxy_get(caddy, "new.example.test")[2] == b"backend-A"
    assert proxy_get(caddy, "shop.example.test")[0] == 404


def test_change_domain_same_is_noop(caddy, client, backends):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    writes = caddy.admin_writes()
    client.change_domain("shop", "Shop.Example.Test.")
    assert caddy.admin_writes() == writes


def test_change_domain_missing_route_404(caddy, client):
    before = caddy.routes()
    with pytest.raises(co.CaddyError) as caught:
        client.change_domain("ghost", "ghost.example.test")
    assert caught.value.status == 404
    assert "crate-app-ghost" in str(caught.value)
    assert client.get_app_route("ghost") is None
    assert caddy.routes() == before


def test_change_domain_taken(caddy, client, backends):
    client.set_app_route("one", "one.example.test", [(backends[0], 100)])
    client.set_app_route("two", "two.example.test", [(backends[1], 100)])
    with pytest.raises(co.DomainTakenError) as caught:
        client.change_domain("two", "ONE.example.test")
    assert caught.value.owner == "crate-app-one"
    assert caddy.call_json("GET", "/id/crate-app-two")["match"] == [
        {"host": ["two.example.test"]}
    ]


# --- Concurrency ---


def test_parallel_writes_lose_nothing(caddy, client, backends, caplog):
    caddy.call_json("PUT", ROUTES_PATH + "/0", FOREIGN_ROUTE)
    foreign = caddy.routes()[0]
    rounds = 50
    errors = []
    stop_reading = threading.Event()

    def deletes(index, round_number):
        if index == 0:
            return round_number % 2 == 1
        return round_number % 3 == 0

    def worker(index):
        # A client per thread, so the per-address lock must be shared.
        own = make_client(caddy)
        app = f"app{index}"
        upstreams = [(backends[0], 10 * index), (backends[1], 100 - 10 * index)]
        try:
            for round_number in range(rounds):
                domain = f"{app}-r{round_number}.example.test"
                own.set_app_route(app, domain, upstreams)
                moved = f"{app}-r{round_number}-moved.example.test"
                own.change_domain(app, moved)
                route = own.get_app_route(app)
                if route is None or route["match"] != [{"host": [moved]}]:
                    errors.append((app, round_number, "route lost or stale", route))
                if deletes(index, round_number):
                    if own.delete_app_route(app) is not True:
                        errors.append((app, round_number, "delete found nothing"))
                    if own.get_app_route(app) is not None:
                        errors.append((app, round_number, "route still present"))
        except Exception as exc:
            errors.append((app, "raised", repr(exc)))

    def reader():
        reader_client = make_client(caddy)
        try:
            while not stop_reading.is_set():
                reader_client.routes()
        except Exception as exc:
            errors.append(("reader", "raised", repr(exc)))

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(3)]
    read_thread = threading.Thread(target=reader)
    with caplog.at_level("INFO", logger="crate_operator"):
        read_thread.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        stop_reading.set()
        read_thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    assert errors == []
    # The shared lock orders the three clients' writes, so none of them
    # should have been rejected with 412 for a change made by another.
    retries = [
        r for r in caplog.records if "changed since it was read" in r.getMessage()
    ]
    assert retries == []

    routes = caddy.routes()
    ids = route_ids(routes)
    assert ids.count("crate-app-app0") == 0
    assert ids.count("crate-app-app1") == 1
    assert ids.count("crate-app-app2") == 1
    assert ids.count("crate-catch-all") == 1
    assert ids[-1] == "crate-catch-all"
    assert routes[0] == foreign
    assert len(routes) == 4
    for app in ("app1", "app2"):
        domain = f"{app}-r{rounds - 1}-moved.example.test"
        assert client.get_app_route(app)["match"] == [{"host": [domain]}]
        assert proxy_get(caddy, domain)[0] == 200


def test_get_app_route_during_changes(caddy, client, backends):
    # Caddy 2.6.2 resolves GET /id/<id> in two steps, so a read during another
    # client's change could return a neighbouring route.
    client.set_app_route("target", "target.example.test", [(backends[0], 100)])
    stop = threading.Event()
    wrong = []

    def change_neighbours():
        writer = make_client(caddy)
        while not stop.is_set():
            writer.set_app_route("before", "before.example.test", [(backends[1], 100)])
            writer.delete_app_route("before")

    thread = threading.Thread(target=change_neighbours)
    thread.start()
    try:
        for _ in range(1000):
            route = client.get_app_route("target")
            if route is None or route.get("@id") != "crate-app-target":
                wrong.append(route)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert wrong == []


def test_lock_shared_per_admin_address(caddy):
    first = make_client(caddy)
    second = make_client(caddy, admin=caddy.admin + "/")
    assert first._lock is second._lock


def add_foreign_route_after_first_read(caddy, monkeypatch):
    """Make the client's first config read be followed by a foreign write.

    Returns a list that receives the action of the interrupted read.
    """
    original = co.CaddyClient._snapshot
    interrupted = []

    def snapshot_then_foreign_write(self, action):
        snapshot = original(self, action)
        if not interrupted:
            interrupted.append(action)
            caddy.call_json("PUT", ROUTES_PATH + "/0", FOREIGN_ROUTE)
        return snapshot

    monkeypatch.setattr(co.CaddyClient, "_snapshot", snapshot_then_foreign_write)
    return interrupted


def test_retry_after_concurrent_change(caddy, client, backends, monkeypatch, caplog):
    interrupted = add_foreign_route_after_first_read(caddy, monkeypatch)
    with caplog.at_level("INFO", logger="crate_operator"):
        client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert interrupted
    assert any("changed since it was read" in r.getMessage() for r in caplog.records)
    assert route_ids(caddy.routes()) == [None, "crate-app-shop", "crate-catch-all"]


def test_retry_sees_domain_taken_meanwhile(caddy, client, backends, monkeypatch):
    interrupted = add_foreign_route_after_first_read(caddy, monkeypatch)
    with pytest.raises(co.DomainTakenError):
        client.set_app_route("shop", "legacy.example.test", [(backends[0], 100)])
    assert interrupted
    assert route_ids(caddy.routes()) == [None, "crate-catch-all"]


def test_delete_retries_after_concurrent_change(caddy, client, backends, monkeypatch):
    client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    interrupted = add_foreign_route_after_first_read(caddy, monkeypatch)
    assert client.delete_app_route("shop") is True
    assert interrupted
    routes = caddy.routes()
    assert route_ids(routes) == [None, "crate-catch-all"]
    assert routes[0]["handle"] == FOREIGN_ROUTE["handle"]


# --- Failures ---


def test_caddy_stopped_gives_503(caddy, client, backends):
    caddy.stop()
    assert client.ping() is False
    with pytest.raises(co.CaddyError) as caught:
        client.routes()
    assert caught.value.status == 503
    assert caddy.admin in str(caught.value)
    with pytest.raises(co.CaddyError) as caught:
        client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert caught.value.status == 503
    assert "crate-app-shop" in str(caught.value)
    with pytest.raises(co.CaddyError) as caught:
        client.delete_app_route("shop")
    assert caught.value.status == 503


def test_ping_warns_once_when_down(caddy, client, caplog):
    assert client.ping() is True
    caddy.stop()
    with caplog.at_level("WARNING", logger="crate_operator"):
        assert client.ping() is False
        assert client.ping() is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert caddy.admin in warnings[0].getMessage()


def test_silent_admin_times_out_503():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        silent = co.CaddyClient(
            f"http://127.0.0.1:{port}", SERVER, "127.0.0.1:1", False, timeout=0.3
        )
        with pytest.raises(co.CaddyError) as caught:
            silent.routes()
    assert caught.value.status == 503


def test_non_caddy_response_gives_502(backends):
    wrong = co.CaddyClient(
        f"http://{backends[0]}", SERVER, "127.0.0.1:1", False, timeout=5
    )
    with pytest.raises(co.CaddyError) as caught:
        wrong.routes()
    assert caught.value.status == 502
    assert "invalid JSON" in str(caught.value)


def test_caddy_rejection_gives_502(caddy, client, monkeypatch, backends):
    build_app_route = co.build_app_route

    def bad_route(app_id, domain, upstreams):
        route = build_app_route(app_id, domain, upstreams)
        route["handle"][0]["load_balancing"]["selection_policy"] = {
            "policy": "weighted_round_robin"
        }
        return route

    monkeypatch.setattr(co, "build_app_route", bad_route)
    with pytest.raises(co.CaddyError) as caught:
        client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert caught.value.status == 502
    assert "crate-app-shop" in str(caught.value)
    assert "weighted_round_robin" in str(caught.value)
    assert route_ids(caddy.routes()) == ["crate-catch-all"]


# --- Unix socket admin ---


def test_unix_socket_needs_empty_host(unix_caddy):
    status, body = unix_caddy.call("GET", "/config/", host="localhost")
    assert status == 403
    assert b"host not allowed" in body


@pytest.mark.parametrize("form", ["unix:", ""])
def test_unix_socket_admin(unix_caddy, backends, form):
    unix_client = make_client(unix_caddy, admin=form + unix_caddy.socket_path)
    assert unix_client.ping() is True
    unix_client.set_app_route("shop", "shop.example.test", [(backends[0], 100)])
    assert route_ids(unix_caddy.routes()) == ["crate-app-shop", "crate-catch-all"]
    assert proxy_get(unix_caddy, "shop.example.test")[2] == b"backend-A"
    unix_caddy.stop()
    assert unix_client.ping() is False
    with pytest.raises(co.CaddyError) as caught:
        unix_client.routes()
    assert caught.value.status == 503
