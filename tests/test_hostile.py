"""Hostile input against a real server process, byte for byte over raw sockets.

Every case must end in a 4xx or a closed connection, never a 5xx, a hung socket or a worker
that stays busy. After each case the server must still answer a burst of normal requests.
"""

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

THREADS = 4  # fewer workers than usual, so that one stuck worker shows
TIMEOUT = 5  # seconds: the most any single exchange below may take


@pytest.fixture
def server(run_server):
    # The longest queue wait there is: a stuck worker still shows as a 503, a busy CI machine not.
    return run_server({"THREADS": str(THREADS), "QUEUE_TIMEOUT": "1"})


def exchange(port, data, timeout=TIMEOUT):
    """Send raw bytes and return the response status, or None if the server closed on us."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server stopped reading; it may have answered
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except ConnectionResetError:
            pass
    if not reply:
        return None
    return int(reply.split(b" ", 2)[1])


def post(body, content_type=b"application/json", path=b"/cars"):
    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\n" % (path, content_type)
    return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


def get(target, extra=b""):
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sConnection: close\r\n\r\n" % (target, extra)


def nested(depth):
    return b'{"brand": ' + b"[" * depth + b"]" * depth + b', "model": "X", "year": 2000}'


CASES = {
    "url_over_header_limit": get(b"/cars/" + b"9" * 70_000),
    "query_just_under_header_limit": get(b"/cars?brand=" + b"a" * 12_000),
    "header_over_limit": get(b"/cars", b"X-Big: " + b"a" * 100_000 + b"\r\n"),
    "thousands_of_headers": get(b"/cars", b"".join(b"X-H%d: v\r\n" % i for i in range(5_000))),
    "nul_in_request_line": get(b"/cars/1\x00"),
    "escaped_nul_in_path": get(b"/cars/1%00"),
    "nul_in_header": get(b"/cars", b"X-Test: a\x00b\r\n"),
    "nul_in_body": post(b'{"brand": "a\x00b", "model": "X", "year": 2000}'),
    "escaped_nul_in_string": post(b'{"brand": "a\\u0000b", "model": "X", "year": 2000}'),
    "nul_in_content_type": post(b"{}", content_type=b"application/json\x00"),
    "deeply_nested_arrays": post(nested(30_000)),
    "deeply_nested_objects": post(b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
    "huge_integer_year": post(b'{"brand": "X", "model": "X", "year": 1%s}' % (b"0" * 4_000)),
    "over_digit_limit_year": post(b'{"brand": "X", "model": "X", "year": 1%s}' % (b"0" * 20_000)),
    "huge_float_year": post(b'{"brand": "X", "model": "X", "year": 1e999}'),
    "huge_id_in_path": get(b"/cars/" + b"9" * 40),
    "id_past_bigint": get(b"/cars/9223372036854775808"),
    "huge_id_in_put_body": post(
        b'{"id": 1%s, "brand": "X", "model": "X", "year": 2000}' % (b"0" * 30), path=b"/cars/1"
    ).replace(b"POST", b"PUT", 1),
    "huge_limit": get(b"/cars?limit=" + b"9" * 30),
    "huge_after": get(b"/cars?after=" + b"9" * 30),
    "invalid_utf8_body": post(b'{"brand": "\xff\xfe", "model": "X", "year": 2000}'),
    "lone_surrogate": post(b'{"brand": "\\ud800", "model": "X", "year": 2000}'),
    "body_over_limit": post(b'{"brand": "' + b"a" * 2_000_000 + b'"}'),
    "absurd_content_length": b"POST /cars HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 99999999999999\r\n\r\n{}",
    "negative_content_length": b"POST /cars HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
    "conflicting_content_lengths": b"POST /cars HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 9\r\nContent-Type: application/json\r\n\r\n{}",
    "huge_chunk_size": b"POST /cars HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nffffffffffffffff\r\n{}\r\n0\r\n\r\n",
    "tls_hello_on_plain_http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "garbage_request_line": b"\x00\x01\x02 \xff\xfe HTTP/9.9\r\n\r\n",
    "unknown_method": b"BREW /cars HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
}


def assert_still_serving(server):
    """Twice as many concurrent requests as workers must all be answered promptly."""
    statuses = []

    def fetch():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/cars?limit=1")
            statuses.append(conn.getresponse().status)
        finally:
            conn.close()

    workers = [threading.Thread(target=fetch) for _ in range(2 * THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=2 * TIMEOUT)
    assert statuses == [200] * (2 * THREADS)


def assert_no_server_error_logged(server):
    for line in server.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            assert entry.get("level") != "ERROR", entry
            assert entry.get("status", 0) < 500, entry


@pytest.mark.parametrize("payload", CASES.values(), ids=CASES.keys())
def test_hostile_request_gets_4xx_or_a_closed_connection(server, payload):
    status = exchange(server.port, payload)
    assert status is None or 400 <= status < 500, f"got {status}"
    assert_still_serving(server)
    assert_no_server_error_logged(server)


def test_hostile_requests_write_nothing(server):
    for name, payload in CASES.items():
        if payload.startswith((b"POST", b"PUT")):
            exchange(server.port, payload)
            assert server.proc.poll() is None, name
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    conn.request("GET", "/cars")
    assert json.loads(conn.getresponse().read()) == []
    conn.close()


def trickle(sockets, payload, seconds):
    """Send payload one byte per second on every socket, for at most `seconds`."""
    for index in range(min(seconds, len(payload))):
        for sock in sockets:
            with contextlib.suppress(OSError):  # the server may drop a slow client: allowed
                sock.sendall(payload[index : index + 1])
        time.sleep(1)


@pytest.mark.parametrize(
    "payload",
    [
        b"GET /cars HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100,
        b"POST /cars HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 200\r\n\r\n" + b" " * 200,
    ],
    ids=["slow_headers", "slow_body"],
)
def test_clients_sending_a_byte_a_second_do_not_starve_others(server, payload):
    address = ("127.0.0.1", server.port)
    slow = [socket.create_connection(address, timeout=TIMEOUT) for _ in range(3 * THREADS)]
    head = payload.index(b"\r\n\r\n") + 4 if payload.startswith(b"POST") else 0
    for sock in slow:
        sock.sendall(payload[:head])  # slow_body: headers at once, then the body dribbles
    dribble = threading.Thread(target=trickle, args=(slow, payload[head:], 6))
    dribble.start()
    try:
        served = []
        started = time.monotonic()
        while time.monotonic() - started < 5:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
            conn.request("GET", "/health")
            served.append(conn.getresponse().status)
            conn.close()
            assert_still_serving(server)
        assert served
        assert set(served) == {200}
    finally:
        dribble.join(timeout=15)
        for sock in slow:
            sock.close()
    assert_no_server_error_logged(server)


# Bytes that are not UTF-8 (a lone continuation byte, 0xFF, a truncated sequence) and latin-1
# text, in every header the service reads and in the path and query.
BAD_BYTES = [b"a\xffb", b"\x80", b"\xc3(", b"caf\xe9"]
READ_HEADERS = [
    b"X-Request-Id",
    b"Authorization",
    b"If-Match",
    b"Content-Type",
    b"Idempotency-Key",
    b"X-Forwarded-For",
    b"X-Amzn-Trace-Id",
    b"User-Agent",
]


def request_with(method, target, header=b"", body=b""):
    """Build a request with one extra raw header line and an optional JSON body."""
    lines = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (method, target)
    if body:
        lines += b"Content-Length: %d\r\n" % len(body)
        if not header.lower().startswith(b"content-type"):
            lines += b"Content-Type: application/json\r\n"
    return lines + header + b"\r\n" + body


def json_lines_only(server):
    """Assert that every line the process wrote is one JSON object; return them."""
    entries = []
    for line in server.log().splitlines():
        entry = json.loads(line)  # a bare traceback or warning fails here
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


@pytest.mark.parametrize("raw", BAD_BYTES, ids=["ff", "continuation", "truncated", "latin1"])
@pytest.mark.parametrize("name", READ_HEADERS, ids=[h.decode() for h in READ_HEADERS])
def test_non_utf8_bytes_in_any_header_never_give_a_5xx(server, name, raw):
    header = name + b": " + raw + b"\r\n"
    body = b'{"brand": "X", "model": "Y", "year": 2000}'
    requests = [
        request_with(b"GET", b"/health", header),
        request_with(b"GET", b"/cars", header),
        request_with(b"POST", b"/cars", header, body),
        request_with(b"PUT", b"/cars/1", header, body),
        request_with(b"DELETE", b"/cars/1", header),
    ]
    for payload in requests:
        status = exchange(server.port, payload)
        assert status is None or status < 500, (payload, status)
    entries = json_lines_only(server)
    assert not [e for e in entries if e.get("level") == "ERROR" or e.get("status", 0) >= 500]


def test_invalid_request_id_bytes_are_replaced_by_a_generated_id(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(request_with(b"GET", b"/health", b"X-Request-Id: a\xffb\r\n"))
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head = reply.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200")
    echoed = [line for line in head.split(b"\r\n") if line.startswith(b"X-Request-Id: ")]
    assert len(echoed) == 1
    assert echoed[0][len(b"X-Request-Id: ") :].isalnum()


@pytest.mark.parametrize("target", [b"/cars/\xff1", b"/cars/%FF1", b"/cars?brand=%FF", b"/\xc3("])
def test_non_utf8_path_or_query_is_a_4xx_problem(server, target):
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(request_with(b"GET", target))
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert 400 <= int(head.split(b" ")[1]) < 500, head
    assert b"Content-Type: application/problem+json" in head
    assert json.loads(body)["status"] >= 400
    json_lines_only(server)


def test_waitress_parse_errors_are_problem_json(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(CASES["header_over_limit"])
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert 400 <= int(head.split(b" ")[1]) < 500, head
    assert b"Content-Type: application/problem+json" in head
    assert json.loads(body)["title"]
