"""Request lines, header fields and body framing of the API, byte by byte.

Each case sends exact bytes over one TCP connection to a real operator and
checks the response against RFC 9112 (HTTP/1.1 message syntax) and RFC 9110
section 5 (fields). Where the connection must stay open, a pipelined second
request shows that the server found the start of the next request. Where
the framing is invalid, the connection must close after the error, because
a proxy in front may have framed the bytes another way (request smuggling).
"""

from __future__ import annotations

import socket

import pytest

import crate_operator as co
from test_http import (DELETE, OPENAPI, RawConnection, Response,
                       assert_follow_up, assert_json_error, auth, follow_up,
                       json_headers, request_bytes)

HEADER_BYTES_MAX = co.CONFIG_SPEC["max_header_bytes"][0]
HEADER_COUNT_MAX = co.CONFIG_SPEC["max_header_count"][0]
# Seconds a test waits for the server to close a connection that it should
# close right after its response.
CLOSE_WAIT_S = 3.0


# === Helpers ===


def closes_soon(conn: RawConnection, seconds: float = CLOSE_WAIT_S) -> bool:
    """Return True when the server closes the connection within seconds
    without sending more bytes."""
    conn.sock.settimeout(seconds)
    try:
        return conn.reader.read(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def read_until_closed(conn: RawConnection) -> bytes:
    """Return every byte the server sends until it closes the connection."""
    data = b""
    try:
        while True:
            chunk = conn.sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except OSError:
        return data


def chunked_post(operator, body: bytes, **more: str) -> bytes:
    """Build a POST to the delete endpoint with Transfer-Encoding: chunked."""
    headers = json_headers(operator, **{"Transfer-Encoding": "chunked"})
    headers.update(more)
    return request_bytes("POST", DELETE, headers, body, length=False)


def assert_array_body_error(response: Response) -> None:
    """Check the 400 that the delete endpoint returns for the body []."""
    value = assert_json_error(response, 400)
    assert [error["field"] for error in value["errors"]] == ["$"]


def assert_closed_after_error(conn: RawConnection, response: Response,
                              statuses: tuple) -> None:
    """Check an error response that must end the connection."""
    assert response.status in statuses, response
    assert response.headers.get("connection") == "close", response
    assert closes_soon(conn)


def assert_both_served(operator, data: bytes) -> None:
    """Send data, a request for the OpenAPI document, and the follow-up on
    one connection, and check that both get the document."""
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        assert_follow_up(conn.read_response())
        assert_follow_up(conn.read_response())


def assert_error_closes(operator, data: bytes, statuses: tuple) -> Response:
    """Send data and the follow-up on one connection, check that the error
    response to data ends the connection, and return that response."""
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        response = conn.read_response()
        assert_closed_after_error(conn, response, statuses)
    return response


def raw_head(lines: list) -> bytes:
    """Join a request line and header lines into a header section."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# === Request line ===


def test_leading_empty_line_ignored(operator):
    # RFC 9112 section 2.2: a server SHOULD ignore at least one empty line
    # received before the request line.
    with RawConnection(operator) as conn:
        conn.send(b"\r\n" + follow_up(operator))
        assert_follow_up(conn.read_response())


def test_blank_request_line_not_timeout(operator):
    with RawConnection(operator) as conn:
        conn.send(b"   \r\n")
        response = conn.read_response()
    assert response.status != 408, response
    assert_json_error(response, 400)


def separated_request(operator, separator: str, end: str = "") -> bytes:
    """Return a GET whose request line splits its words with separator."""
    line = f"GET{separator}{OPENAPI}{separator}HTTP/1.1{end}"
    return raw_head([line, "Host: 127.0.0.1",
                     f"Authorization: Bearer {operator.token}"])


@pytest.mark.parametrize("separator", ["\t", "  ", "\x0b", "\x0c"],
                         ids=["tab", "two spaces", "VT", "FF"])
def test_request_line_whitespace_allowed(operator, separator):
    # RFC 9112 section 3 lets a server split the request line on SP, HTAB,
    # VT, FF or a bare CR.
    assert_both_served(operator, separated_request(operator, separator, " "))


@pytest.mark.parametrize("separator", ["\x1c", "\x1f", "\x85", "\xa0"],
                         ids=["FS", "US", "NEL", "NBSP"])
def test_request_line_other_separator_rejected(operator, separator):
    # str.split() also splits on these latin-1 characters, which RFC 9112
    # section 3 does not list as whitespace of a request line.
    assert_error_closes(operator, separated_request(operator, separator),
                        (400,))


@pytest.mark.parametrize("version", ["http/1.1", "HTTP/1", "HTTP/1.1.1",
                                     "HTTP/+1.1", "HTTP/1.-1", "HTTP 1.1"])
def test_invalid_version_rejected(operator, version):
    data = request_bytes("GET", OPENAPI, auth(operator), version=version)
    response = assert_error_closes(operator, data, (400,))
    assert_json_error(response, 400)


@pytest.mark.parametrize("version", ["HTTP/1.10", "HTTP/01.1", "HTTP/1.01",
                                     "HTTP/1.00"])
def test_version_digit_count_enforced(operator, version):
    # RFC 9112 section 2.3: HTTP-version is "HTTP/" DIGIT "." DIGIT.
    data = request_bytes("GET", OPENAPI, auth(operator), version=version)
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        response = conn.read_response()
        assert_json_error(response, 400)


@pytest.mark.parametrize("version", ["HTTP/1.00", "HTTP/0.9"])
def test_old_version_chunked_closes(operator, version):
    # RFC 9112 section 6.1: Transfer-Encoding in a request below HTTP/1.1
    # means faulty framing, and the connection must close after it.
    headers = json_headers(operator, **{"Transfer-Encoding": "chunked",
                                        "Connection": "keep-alive"})
    data = request_bytes("POST", DELETE, headers, b"2\r\n[]\r\n0\r\n\r\n",
                         version=version, length=False)
    assert_error_closes(operator, data, (400, 505))


def test_absolute_form_target_routed(operator):
    # RFC 9112 section 3.2.2: a server must accept the absolute form.
    data = request_bytes("GET", "http://127.0.0.1" + OPENAPI, auth(operator))
    assert_both_served(operator, data)


@pytest.mark.parametrize("target", ["http://[/v1/openapi.json",
                                    "http://[zz]/v1/openapi.json"])
def test_invalid_authority_is_400(operator, target):
    # urlsplit raises ValueError for these targets: a client error, not a
    # 500 with a logged traceback.
    data = request_bytes("GET", target, auth(operator))
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        response = conn.read_response()
    assert_json_error(response, 400)


@pytest.mark.parametrize("method", ["get", "G" * 10000, "GET\x00"],
                         ids=["lowercase", "10000 bytes", "NUL"])
def test_unknown_method_501_closes(operator, method):
    # Methods are case-sensitive (RFC 9110 section 9.1).
    data = request_bytes(method, OPENAPI, auth(operator))
    response = assert_error_closes(operator, data, (501,))
    assert_json_error(response, 501)


def test_http10_expect_continue_ignored(operator):
    # RFC 9110 section 10.1.1: a server must ignore 100-continue in an
    # HTTP/1.0 request, so the first response is the final one.
    headers = json_headers(operator, Expect="100-continue",
                           Connection="keep-alive")
    data = request_bytes("POST", DELETE, headers, b"[]", version="HTTP/1.0")
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        response = conn.read_response()
        assert response.status != 100
        assert_array_body_error(response)
        assert response.headers["connection"] == "keep-alive"
        assert_follow_up(conn.read_response())


def test_expect_invalid_length_no_continue(operator):
    headers = json_headers(operator, Expect="100-continue",
                           **{"Content-Length": "2, 3"})
    data = request_bytes("POST", DELETE, headers, length=False)
    with RawConnection(operator) as conn:
        conn.send(data)
        response = conn.read_response()
        assert response.status != 100
        assert_closed_after_error(conn, response, (400,))


# === Header lines ===


@pytest.mark.parametrize("line", [
    "X-A: a\x00b", "X\x00A: 1", "X\rA: 1", "X-A : 1", ": 1",
    "X\xe9: 1", "X A: 1", "X-A\t: 1"],
    ids=["NUL in value", "NUL in name", "CR in name", "space before colon",
         "empty name", "latin-1 name", "space in name", "tab before colon"])
def test_invalid_header_line_400(operator, line):
    # RFC 9112 section 5.1 and RFC 9110 sections 5.1 and 5.5.
    data = raw_head([f"GET {OPENAPI} HTTP/1.1", "Host: 127.0.0.1", line,
                     f"Authorization: Bearer {operator.token}"])
    response = assert_error_closes(operator, data, (400,))
    assert_json_error(response, 400)


def test_whitespace_before_first_header_400(operator):
    # RFC 9112 section 2.2: a line that starts with whitespace right after
    # the request line must be rejected or ignored as a whole.
    data = raw_head([f"POST {DELETE} HTTP/1.1", " Content-Length: 2",
                     "Host: 127.0.0.1"]) + b"[]"
    assert_error_closes(operator, data, (400,))


@pytest.mark.parametrize("value", ["a\x01b", "a\x7fb", "caf\xe9", "a\x0bb"],
                         ids=["SOH", "DEL", "latin-1", "VT"])
def test_other_value_bytes_kept(operator, value):
    # RFC 9110 section 5.5 lets a recipient keep CTLs other than CR, LF
    # and NUL, and obs-text, in a field value.
    data = request_bytes("GET", OPENAPI, auth(operator, **{"X-Odd": value}))
    assert_both_served(operator, data)


def test_bare_lf_header_lines_accepted(operator):
    # RFC 9112 section 2.2 lets a recipient take a bare LF as a line end.
    data = (f"GET {OPENAPI} HTTP/1.1\nHost: 127.0.0.1\n"
            f"Authorization: Bearer {operator.token}\n\n").encode()
    assert_both_served(operator, data)


def test_unterminated_headers_not_run(operator):
    # RFC 9112 section 8: a request whose header section never ended is
    # incomplete, and the server may send an error before it closes. Running
    # it as a complete request is not one of the choices.
    data = (f"GET {OPENAPI} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {operator.token}\r\n").encode()
    with RawConnection(operator) as conn:
        conn.send(data)
        conn.sock.shutdown(socket.SHUT_WR)
        answer = read_until_closed(conn)
    assert not answer.startswith(b"HTTP/1.1 200 "), answer[:200]


# === Host ===


@pytest.mark.parametrize("hosts", [[], ["127.0.0.1", "127.0.0.1"],
                                   ["127.0.0.1", "other.test"], ["a b"]],
                         ids=["missing", "twice equal", "twice unequal",
                              "invalid"])
def test_host_field_enforced(operator, hosts):
    # RFC 9112 section 3.2: an HTTP/1.1 request without Host, with more
    # than one Host line or with an invalid Host value gets 400.
    lines = [f"GET {OPENAPI} HTTP/1.1"]
    lines += [f"Host: {host}" for host in hosts]
    lines.append(f"Authorization: Bearer {operator.token}")
    with RawConnection(operator) as conn:
        conn.send(raw_head(lines))
        response = conn.read_response()
    assert_json_error(response, 400)


def test_http10_without_host_served(operator):
    data = raw_head([f"GET {OPENAPI} HTTP/1.0",
                     f"Authorization: Bearer {operator.token}"])
    with RawConnection(operator) as conn:
        conn.send(data)
        assert_follow_up(conn.read_response())
        assert conn.at_eof()


# === Connection ===


def test_close_in_second_connection_line(operator):
    # RFC 9110 section 5.3: field lines with the same name form one list.
    # RFC 9112 section 9.6: after "close" the server must close.
    lines = [f"GET {OPENAPI} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {operator.token}",
             "Connection: keep-alive", "Connection: close"]
    with RawConnection(operator) as conn:
        conn.send(raw_head(lines))
        response = conn.read_response()
        assert response.status == 200
        assert response.headers.get("connection") == "close"
        assert closes_soon(conn)


# === Content-Length ===


def test_equal_length_lines_accepted(operator):
    # RFC 9110 section 8.6 allows taking repeated equal values as one.
    headers = json_headers(operator)
    data = raw_head([f"POST {DELETE} HTTP/1.1", "Host: 127.0.0.1",
                     f"Authorization: {headers['Authorization']}",
                     "Content-Type: application/json",
                     "Content-Length: 2", "Content-Length: 2"]) + b"[]"
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        assert_array_body_error(conn.read_response())
        assert_follow_up(conn.read_response())


@pytest.mark.parametrize("values", [["2", "3"], ["2", "02"], ["2", ""]],
                         ids=["unequal", "leading zero", "empty second"])
def test_differing_length_lines_close(operator, values):
    lines = [f"POST {DELETE} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {operator.token}",
             "Content-Type: application/json"]
    lines += [f"Content-Length: {value}" for value in values]
    with RawConnection(operator) as conn:
        conn.send(raw_head(lines) + b"[]" + follow_up(operator))
        response = conn.read_response()
        assert_closed_after_error(conn, response, (400,))


@pytest.mark.parametrize("value", ["+2", "-2", "2.0", "0x2", "2 2", "2;"])
def test_malformed_length_closes(operator, value):
    headers = json_headers(operator, **{"Content-Length": value})
    data = request_bytes("POST", DELETE, headers, b"[]", length=False)
    assert_error_closes(operator, data, (400,))


@pytest.mark.parametrize("value", ["\x0b2", "2\x0c", "\xa02", "2\x1c",
                                   "2\x85"],
                         ids=["VT", "FF", "NBSP", "FS", "NEL"])
def test_length_with_odd_whitespace_closes(operator, value):
    # RFC 9110 section 8.6: Content-Length is 1*DIGIT, and only SP and HTAB
    # around a field value are optional whitespace (RFC 9110 section 5.5).
    headers = json_headers(operator, **{"Content-Length": value})
    data = request_bytes("POST", DELETE, headers, b"[]", length=False)
    assert_error_closes(operator, data, (400,))


def test_length_body_holding_request(operator):
    # The body looks like a request, but it is only body bytes: the server
    # must send two responses, not three.
    inner = follow_up(operator)
    data = request_bytes("POST", DELETE, json_headers(operator), inner)
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        assert_json_error(conn.read_response(), 400)
        assert_follow_up(conn.read_response())
        assert not closes_soon(conn, 1.0)


# === Transfer-Encoding ===


@pytest.mark.parametrize("value", ["CHUNKED", "Chunked", "chunked ",
                                   "\tchunked", "chunked,", ", chunked"])
def test_chunked_spellings_accepted(operator, value):
    # Coding names ignore case (RFC 9112 section 7), OWS around a field
    # value is dropped and empty list elements are ignored (RFC 9110
    # section 5.6.1).
    data = chunked_post(operator, b"2\r\n[]\r\n0\r\n\r\n",
                        **{"Transfer-Encoding": value})
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        assert_array_body_error(conn.read_response())
        assert_follow_up(conn.read_response())


@pytest.mark.parametrize("value,status", [
    ("chunked, chunked", 501), ("identity", 501), ("chunked, identity", 501),
    ("chunked;q=1", 501), ("", 501), ("x-chunked", 501)])
def test_other_codings_close(operator, value, status):
    data = chunked_post(operator, b"2\r\n[]\r\n0\r\n\r\n",
                        **{"Transfer-Encoding": value})
    assert_error_closes(operator, data, (400, status))


def test_chunked_in_two_lines_closes(operator):
    lines = [f"POST {DELETE} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {operator.token}",
             "Content-Type: application/json",
             "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"]
    data = raw_head(lines) + b"2\r\n[]\r\n0\r\n\r\n"
    assert_error_closes(operator, data, (400, 501))


@pytest.mark.parametrize("value", ["\x0bchunked", "chunked\x0c",
                                   "\xa0chunked", "chunked\x1f",
                                   "\x85chunked"],
                         ids=["VT", "FF", "NBSP", "US", "NEL"])
def test_chunked_with_odd_whitespace_closes(operator, value):
    # A proxy in front that does not see "chunked" here frames the body
    # another way: the classic Transfer-Encoding obfuscation.
    data = chunked_post(operator, b"2\r\n[]\r\n0\r\n\r\n",
                        **{"Transfer-Encoding": value})
    assert_error_closes(operator, data, (400, 501))


@pytest.mark.parametrize("order", ["te first", "length first"])
@pytest.mark.parametrize("names", [
    ("Transfer-Encoding", "Content-Length"),
    ("transfer-encoding", "content-length"),
    ("TRANSFER-ENCODING", "CONTENT-LENGTH")],
    ids=["canonical", "lower", "upper"])
def test_length_and_chunked_close(operator, names, order):
    # RFC 9112 section 6.1: a request with both may be a smuggling attempt.
    te_line = f"{names[0]}: chunked"
    length_line = f"{names[1]}: 7"
    framing = [te_line, length_line]
    if order == "length first":
        framing.reverse()
    lines = [f"POST {DELETE} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {operator.token}",
             "Content-Type: application/json"] + framing
    data = raw_head(lines) + b"2\r\n[]\r\n0\r\n\r\n"
    assert_error_closes(operator, data, (400,))


# === Chunked framing ===


@pytest.mark.parametrize("body", [
    b"2\n[]\r\n0\r\n\r\n", b"2\r\n[]\n0\r\n\r\n", b"2\r\n[]\r\n0\n\r\n",
    b"2;a\rb\r\n[]\r\n0\r\n\r\n", b" 2\r\n[]\r\n0\r\n\r\n",
    b"\x0b2\r\n[]\r\n0\r\n\r\n", b"2\x0c\r\n[]\r\n0\r\n\r\n"],
    ids=["LF after size", "LF after data", "LF after last chunk",
         "CR in extension", "space before size", "VT before size",
         "FF after size"])
def test_lenient_chunk_lines_close(operator, body):
    # RFC 9112 section 7.1 ends every chunked line with CRLF and allows no
    # whitespace around chunk-size except before ";". The bare LF
    # leniency of section 2.2 covers only the start line and fields.
    data = chunked_post(operator, body)
    assert_error_closes(operator, data, (400,))


def test_chunk_size_overflow_closes(operator):
    data = chunked_post(operator, b"1" + b"0" * 16 + b"\r\n[]\r\n0\r\n\r\n")
    assert_error_closes(operator, data, (400, 413))


def test_chunked_trailer_with_length_ignored(operator):
    # A Content-Length in the trailer section must not frame anything.
    body = b"2\r\n[]\r\n0\r\nContent-Length: 40\r\n\r\n"
    data = chunked_post(operator, body)
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        assert_array_body_error(conn.read_response())
        assert_follow_up(conn.read_response())


# === Header limits ===


def padded_head(operator, total: int, version: str = "HTTP/1.1") -> bytes:
    """Build a GET whose header lines, CRLFs included, are total bytes."""
    lines = ["Host: 127.0.0.1", f"Authorization: Bearer {operator.token}"]
    used = sum(len(line) + 2 for line in lines)
    pad = "X-Pad: "
    lines.append(pad + "a" * (total - used - len(pad) - 2))
    head = raw_head([f"GET {OPENAPI} {version}"] + lines)
    assert len(head) - len(f"GET {OPENAPI} {version}\r\n") - 2 == total
    return head


def test_header_bytes_at_limit_accepted(operator):
    # The empty line that ends the header section does not count.
    with RawConnection(operator) as conn:
        conn.send(padded_head(operator, HEADER_BYTES_MAX)
                  + follow_up(operator))
        assert_follow_up(conn.read_response())
        assert_follow_up(conn.read_response())


def test_header_bytes_below_limit_accepted(operator):
    with RawConnection(operator) as conn:
        conn.send(padded_head(operator, HEADER_BYTES_MAX - 1)
                  + follow_up(operator))
        assert_follow_up(conn.read_response())
        assert_follow_up(conn.read_response())


def test_header_bytes_over_limit_431(operator):
    with RawConnection(operator) as conn:
        conn.send(padded_head(operator, HEADER_BYTES_MAX + 1)
                  + follow_up(operator))
        response = conn.read_response()
        value = assert_json_error(response, 431)
        assert "max_header_bytes" in value["error"]
        assert_closed_after_error(conn, response, (431,))


@pytest.mark.parametrize("count,status", [(HEADER_COUNT_MAX, 200),
                                          (HEADER_COUNT_MAX + 1, 431)])
def test_header_count_boundary(operator, count, status):
    lines = [f"GET {OPENAPI} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {operator.token}"]
    lines += [f"X-N{n}: 1" for n in range(count - 2)]
    with RawConnection(operator) as conn:
        conn.send(raw_head(lines) + follow_up(operator))
        response = conn.read_response()
        assert response.status == status, response
        if status == 200:
            assert_follow_up(conn.read_response())
        else:
            assert "max_header_count" in response.json()["error"]
            assert_closed_after_error(conn, response, (431,))


def test_header_line_max_boundary(operator_factory):
    # With max_header_bytes above it, HEADER_LINE_MAX limits one line:
    # a line of exactly 65536 bytes (CRLF included) passes, one more fails.
    operator = operator_factory({"max_header_bytes": 4 * co.HEADER_LINE_MAX})
    pad = "X-Long: "
    at_limit = pad + "a" * (co.HEADER_LINE_MAX - len(pad) - 2)
    over = at_limit + "a"
    first = [f"GET {OPENAPI} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {operator.token}"]
    with RawConnection(operator) as conn:
        conn.send(raw_head(first + [at_limit]) + follow_up(operator))
        assert_follow_up(conn.read_response())
        assert_follow_up(conn.read_response())
    with RawConnection(operator) as conn:
        conn.send(raw_head(first + [over]) + follow_up(operator))
        response = conn.read_response()
        assert_json_error(response, 431)
        assert_closed_after_error(conn, response, (431,))


# === Authorization ===


def test_latin1_token_is_401(operator):
    headers = {"Authorization": "Bearer caf\xe9-\xff-token-0123456789",
               "Content-Type": "application/json"}
    data = request_bytes("POST", DELETE, headers, b"{}")
    with RawConnection(operator) as conn:
        conn.send(data + follow_up(operator))
        assert_json_error(conn.read_response(), 401)
        assert_follow_up(conn.read_response())
