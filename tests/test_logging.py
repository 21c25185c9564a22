"""The log of real `python cars.py` processes: one JSON object per line, whatever happens.

The access line carries an audit (peer, X-Forwarded-For, X-Amzn-Trace-Id, user agent, and the
auth result of writes). Lines are queued and written in batches, so these tests also prove that
batching loses nothing on SIGTERM, SIGINT or an exit, and little on SIGKILL.
"""

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import MYSQL, ROOT, TOKEN, free_port

import cars

AUDIT = ("peer", "forwarded_for", "trace_id", "user_agent")


def lines_of(text):
    """Parse every line of a process's output as JSON; fail naming the first line that is not."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"output line {number} is not JSON: {line[:300]!r}")
        assert isinstance(entry, dict), f"output line {number} is not an object: {line[:300]!r}"
        entries.append(entry)
    return entries


def access_lines(server):
    """Return the access lines of a server's output (JSON throughout), less the start-up probes."""
    entries = lines_of(server.log())
    return [e for e in entries if e.get("message") == "request" and e["path"] != "/health"]


def call(port, method, path, headers=None, body=None):
    """Send one request on a new connection and return the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def raw(port, data):
    """Send raw bytes and return the status line's code, or None if the server closed on us."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
    return int(reply.split(b" ", 2)[1]) if reply else None


def burst(port, count, path="/health"):
    """Send count requests over one keep-alive connection; return their request ids."""
    ids = [uuid.uuid4().hex for _ in range(count)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for request_id in ids:
            conn.request("GET", path, headers={"X-Request-Id": request_id})
            reply = conn.getresponse()
            reply.read()
            assert reply.status == 200
    finally:
        conn.close()
    return ids


def logged_ids(server, sent):
    """Return the request ids of the access lines written so far that are among those sent."""
    wanted = set(sent)
    return [e["request_id"] for e in lines_of(server.log()) if e.get("request_id") in wanted]


# -- The access line -----------------------------------------------------------------------------


def test_access_line_carries_the_audit_fields_and_the_auth_result_of_writes(run_server):
    server = run_server({"API_TOKEN": TOKEN})
    car = b'{"brand": "Audi", "model": "A4", "year": 2020}'
    headers = {
        "X-Forwarded-For": "203.0.113.7, 10.0.0.2",
        "X-Amzn-Trace-Id": "Root=1-67891233-abcdef012345678912345678",
        "User-Agent": "audit-test/1.0",
        "Content-Type": "application/json",
    }
    assert call(server.port, "GET", "/cars", headers) == 200
    assert call(server.port, "POST", "/cars", {**headers, "Authorization": f"Bearer {TOKEN}"}, car)
    assert call(server.port, "POST", "/cars", {**headers, "Authorization": "Bearer no"}, car) == 401
    assert call(server.port, "DELETE", "/cars/1", {"Content-Type": "application/json"}) == 401
    server.stop()
    read, good, bad, anonymous = access_lines(server)
    for entry in (read, good, bad, anonymous):
        assert {"time", "level", "logger", "message", "method", "path", "status"} <= set(entry)
        assert {"duration_ms", "request_id", *AUDIT} <= set(entry)
        assert (entry["level"], entry["logger"], entry["peer"]) == ("INFO", "cars", "127.0.0.1")
    assert read["forwarded_for"] == "203.0.113.7, 10.0.0.2"
    assert read["trace_id"] == headers["X-Amzn-Trace-Id"]
    assert read["user_agent"] == "audit-test/1.0"
    assert read["auth"] is None  # every line has the field; reads are not checked
    assert (good["status"], good["auth"]) == (201, "ok")
    assert (bad["status"], bad["auth"]) == (401, "failed")
    assert (anonymous["forwarded_for"], anonymous["trace_id"]) == (None, None)
    assert anonymous["auth"] == "failed"


def test_writes_without_a_configured_token_are_audited_as_auth_none(run_server):
    server = run_server()
    body = b'{"brand": "Audi", "model": "A4", "year": 2020}'
    assert call(server.port, "POST", "/cars", {"Content-Type": "application/json"}, body) == 201
    server.stop()
    (entry,) = access_lines(server)
    assert (entry["method"], entry["auth"]) == ("POST", "none")


def test_audit_fields_are_cut_to_their_bound_and_escaped(run_server):
    server = run_server()
    hostile = b'"},{"level":"CRITICAL\\ \t\xff\xfe'
    request = (
        b"GET /cars?limit=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"User-Agent: " + hostile + b"u" * 5000 + b"\r\n"
        b"X-Forwarded-For: " + hostile + b", 198.51.100.1" * 400 + b"\r\n"
        b"X-Amzn-Trace-Id: " + hostile + b"t" * 5000 + b"\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert raw(server.port, request) == 200
    server.stop()
    (entry,) = access_lines(server)
    for name, _, limit in cars.AUDIT_FIELDS:
        value = entry[name]
        assert len(value) <= limit, name
        if name != "peer":
            # WSGI hands header bytes over as Latin-1, so each byte stays one escaped character.
            assert value.startswith(hostile.decode("latin-1")), name
    raw_line = next(line for line in server.log().splitlines() if "CRITICAL" in line)
    assert raw_line.isascii()
    assert '\\"},{\\"level\\":\\"CRITICAL\\\\ \\t\\u00ff\\u00fe' in raw_line


# -- Lines stay whole and none is lost -----------------------------------------------------------


def test_access_lines_are_whole_and_one_per_request_under_concurrency(run_server):
    server = run_server({"THREADS": "8"})
    sent, errors = [], []

    def client():
        try:
            sent.extend(burst(server.port, 60))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    clients = [threading.Thread(target=client) for _ in range(16)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=60)
    assert errors == []
    assert server.stop() == 0
    logged = logged_ids(server, sent)  # parses every line of the output as one JSON object
    assert len(sent) == 16 * 60
    assert sorted(logged) == sorted(sent)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_no_access_line_is_lost_when_the_server_stops(run_server, signum):
    server = run_server()
    sent = burst(server.port, 300)
    assert server.stop(signum) == 0  # at once: the last lines are still queued
    assert logged_ids(server, sent) == sent
    assert lines_of(server.log())[-1]["message"] == "stopped"


def test_lines_other_than_access_lines_are_written_at_once(run_server):
    server = run_server()  # returns as soon as /health answers: no time for a batch to go out
    messages = [e["message"] for e in lines_of(server.log())]
    assert "listening" in messages
    assert any("API_TOKEN is not set" in m for m in messages)


def test_sigkill_loses_only_lines_younger_than_the_flush_interval(run_server):
    server = run_server()
    sent = burst(server.port, 100)
    time.sleep(3 * cars.LOG_FLUSH_INTERVAL)
    server.stop(signal.SIGKILL)
    assert logged_ids(server, sent) == sent


def write_calls(server, requests):
    """Count the server's write system calls while it answers a burst of requests."""
    burst(server.port, 5)  # the start-up lines and the first connection are behind us
    time.sleep(3 * cars.LOG_FLUSH_INTERVAL)
    io_stats = Path(f"/proc/{server.proc.pid}/io")
    before = int(io_stats.read_text().split("syscw:")[1].split()[0])
    burst(server.port, requests)
    time.sleep(3 * cars.LOG_FLUSH_INTERVAL)
    return int(io_stats.read_text().split("syscw:")[1].split()[0]) - before


def test_access_lines_are_written_in_batches_not_one_write_per_request(run_server):
    # Waitress itself writes to a pipe to wake its loop; the server without access lines
    # counts those writes, so the difference is what the access lines cost.
    quiet = write_calls(run_server({"LOG_LEVEL": "WARNING"}), 400)
    started = time.monotonic()
    logged = write_calls(run_server(), 400)
    batches = (time.monotonic() - started) / cars.LOG_FLUSH_INTERVAL
    assert logged - quiet <= batches + 10, (logged, quiet, batches)


# -- Everything the process writes is JSON -------------------------------------------------------


def test_requests_that_break_a_hook_leave_only_json_on_stdout_and_stderr(run_server):
    server = run_server({"API_TOKEN": TOKEN})
    head = b"Host: 127.0.0.1\r\nConnection: close\r\n"
    raw(server.port, b"GET /cars?limit=1 HTTP/1.1\r\n" + head + b"X-Request-Id: a\xffb\r\n\r\n")
    body = b'{"brand": "Audi", "model": "A4", "year": 2020}'
    post = b"POST /cars HTTP/1.1\r\n" + head + b"Content-Type: application/json\r\n"
    raw(server.port, post + b"Authorization: Bearer \xff\r\nContent-Length: 46\r\n\r\n" + body)
    raw(server.port, b"DELETE /cars/1 HTTP/1.1\r\n" + head + b"If-Match: \xff\r\n\r\n")
    assert server.stop() == 0
    assert len(access_lines(server)) == 3


def run_python(code, env=None, timeout=30):
    """Run code in a fresh interpreter that imports cars; return (exit code, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def test_warnings_thread_crashes_stray_prints_and_a_crash_become_json_lines(mysql_database):
    code = f"""
        import logging, sys, threading
        import pymysql
        import cars
        cars.configure_logging("INFO")
        conn = pymysql.connect(host={MYSQL["host"]!r}, port={MYSQL["port"]}, user={MYSQL["user"]!r},
                               password={MYSQL["password"]!r}, database={mysql_database!r})
        conn.ping(reconnect=True)  # deprecated in PyMySQL 1.2: a DeprecationWarning
        thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
        thread.start()
        thread.join()
        print("a stray print")
        print("a stray complaint", file=sys.stderr)
        sys.stderr.write("Traceback (most recent call last):\\n  x\\nValueError: as Bottle\\n")
        logging.getLogger("waitress").warning("Task queue depth is %d", 5)
        raise RuntimeError("crash at the end")
    """
    code, out, err = run_python(code)
    assert code == 1
    stdout, stderr = lines_of(out), lines_of(err)
    by_logger = {}
    for entry in stdout + stderr:
        assert {"time", "level", "logger", "message"} <= set(entry)
        by_logger.setdefault(entry["logger"], []).append(entry)
    (warning,) = by_logger["py.warnings"]
    assert "reconnect" in warning["message"]
    assert "DeprecationWarning" in warning["message"]
    thread_crash, crash = by_logger["cars"]
    assert "ZeroDivisionError" in thread_crash["traceback"]
    assert "doomed" in thread_crash["message"]
    assert (crash["level"], crash["traceback"].splitlines()[-1]) == (
        "CRITICAL",
        "RuntimeError: crash at the end",
    )
    assert [e["message"] for e in by_logger["stdout"]] == ["a stray print"]
    complaint, bottle_style = by_logger["stderr"]
    assert complaint["message"] == "a stray complaint"
    assert bottle_style["message"] == "ValueError: as Bottle"
    assert bottle_style["traceback"].startswith("Traceback")
    assert by_logger["waitress"][0]["message"] == "Task queue depth is 5"


def test_crash_at_start_up_is_logged_as_json_with_the_lines_before_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"PORT": str(taken.getsockname()[1]), "SQLITE_PATH": str(tmp_path / "c.db")}
        done = subprocess.run(
            [sys.executable, str(ROOT / "cars.py")],
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1
    entries = lines_of(done.stdout) + lines_of(done.stderr)
    assert entries[0]["message"] == "starting"
    assert "Address already in use" in entries[-1]["traceback"]


def test_bad_setting_is_one_json_line_on_stderr(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PORT": str(free_port()), "THREADS": "lots"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "cars.py")], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert done.stdout == ""
    (entry,) = lines_of(done.stderr)
    assert "THREADS" in entry["message"]
    assert "lots" in entry["message"]


# The audit headers come first: Waitress stops reading at the line it refuses.
AUDIT_HEADERS = (
    b"X-Request-Id: refused-42\r\nUser-Agent: refused/1.0\r\nX-Forwarded-For: 203.0.113.9\r\n"
)
REFUSED = {
    400: b"GET /cars HTTP/1.1\r\nHost: x\r\n" + AUDIT_HEADERS + b"Bad Header\r\n",
    413: b"POST /cars HTTP/1.1\r\nHost: x\r\n" + AUDIT_HEADERS + b"Content-Length: 99999999\r\n",
    431: b"GET /cars HTTP/1.1\r\nHost: x\r\n"
    + AUDIT_HEADERS
    + b"X-Big: "
    + b"a" * 20_000
    + b"\r\n",
    501: b"POST /cars HTTP/1.1\r\nHost: x\r\n" + AUDIT_HEADERS + b"Transfer-Encoding: gzip\r\n",
}


@pytest.mark.parametrize("status", REFUSED, ids=[str(s) for s in REFUSED])
def test_requests_waitress_refuses_keep_the_request_id_and_every_access_field(run_server, status):
    server = run_server({"API_TOKEN": TOKEN})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(REFUSED[status] + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head.split(" ")[1] == str(status), head
    echoed = re.search(r"\r\nX-Request-Id: (\S+)", head).group(1)
    # Waitress drops a header block over its limit unread: a 431 gets an id of its own.
    assert echoed == "refused-42" or status == 431
    call(server.port, "GET", "/cars", {"X-Request-Id": "served-42"})
    server.stop()
    lines = lines_of(server.log())
    (refused,) = [e for e in lines if e.get("request_id") == echoed]
    (served,) = [e for e in lines if e.get("request_id") == "served-42"]
    assert set(refused) == set(served)  # the same field set on every access line
    assert (refused["message"], refused["status"], refused["peer"]) == (
        "request",
        status,
        "127.0.0.1",
    )
    if status != 431:
        assert refused["user_agent"] == "refused/1.0"
        assert refused["forwarded_for"] == "203.0.113.9"


def test_a_request_shed_after_the_queue_timeout_keeps_its_request_id_and_fields(
    run_server, tmp_path
):
    import sqlite3

    server = run_server({"THREADS": "1", "QUEUE_TIMEOUT": "0.2", "DB_TIMEOUT": "3"})
    assert call(server.port, "GET", "/cars") == 200  # the schema exists
    blocker = sqlite3.connect(tmp_path / f"{server.port}.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    body = b'{"brand": "Audi", "model": "A4", "year": 2020}'
    busy = threading.Thread(
        target=call,
        args=(server.port, "POST", "/cars", {"Content-Type": "application/json"}, body),
    )
    busy.start()  # the one worker now waits for the write lock
    time.sleep(0.3)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/cars", headers={"X-Request-Id": "shed-42"})
        reply = conn.getresponse()
        reply.read()
        conn.close()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        busy.join(timeout=10)
    assert (reply.status, reply.getheader("X-Request-Id")) == (503, "shed-42")
    server.stop()
    lines = lines_of(server.log())
    (shed,) = [e for e in lines if e.get("request_id") == "shed-42"]
    served = next(e for e in lines if e.get("message") == "request" and e.get("status") == 200)
    assert set(shed) == set(served)
    assert (shed["method"], shed["path"], shed["status"]) == ("GET", "/cars", 503)
    assert shed["duration_ms"] >= 200
