"""The real server process: HTTP end to end, start-up checks, logs and graceful shutdown."""

import http.client
import json
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pymysql
import pytest
from conftest import MYSQL, ROOT, free_port, mysql_env

GOLF = {"brand": "Volkswagen", "model": "Golf", "year": 2018}


def call(server, method, path, body=None, headers=None, timeout=10):
    """Send one request and return (status, headers, parsed JSON or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    payload = None if body is None else json.dumps(body)
    sent = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, payload, {**sent, **(headers or {})})
    res = conn.getresponse()
    raw = res.read()
    conn.close()
    return res.status, dict(res.getheaders()), json.loads(raw) if raw else None


def log_lines(server):
    """Return the server's log as parsed JSON objects."""
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def test_walk_through_over_http_on_sqlite(run_server):
    server = run_server()
    status, headers, car = call(server, "POST", "/cars", GOLF)
    assert status == 201
    assert headers["Location"] == f"/cars/{car['id']}"
    update = {"brand": "Volkswagen", "model": "Polo", "year": 2019}
    assert call(server, "PUT", f"/cars/{car['id']}", update)[2] == {"id": car["id"], **update}
    assert call(server, "GET", "/cars")[2] == [{"id": car["id"], **update}]


def test_walk_through_over_http_on_mysql(run_server, mysql_database):
    server = run_server(mysql_env(mysql_database))
    status, _, car = call(server, "POST", "/cars", GOLF)
    assert status == 201
    assert call(server, "GET", f"/cars/{car['id']}")[2] == car
    assert call(server, "GET", "/ready")[0] == 200
    assert "mysql://" in server.log()


def test_start_up_creates_a_missing_mysql_database(run_server, mysql_database):
    server = run_server(mysql_env(f"{mysql_database}_fresh"))
    try:
        assert call(server, "POST", "/cars", GOLF)[0] == 201
    finally:
        server.stop()
        with pymysql.connect(**MYSQL, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{mysql_database}_fresh`")


def test_connections_killed_by_mysql_are_replaced(run_server, mysql_database):
    server = run_server(mysql_env(mysql_database))
    assert call(server, "GET", "/cars")[0] == 200
    with pymysql.connect(**MYSQL, autocommit=True) as admin, admin.cursor() as cur:
        cur.execute(
            "SELECT id FROM information_schema.processlist WHERE db = %s", (mysql_database,)
        )
        for (thread_id,) in cur.fetchall():
            cur.execute("KILL %s", (thread_id,))
    assert call(server, "GET", "/cars")[0] in (200, 503)
    assert call(server, "GET", "/cars")[0] == 200


def test_one_json_log_line_per_request_with_request_id(run_server):
    server = run_server()
    call(server, "GET", "/cars", headers={"X-Request-Id": "trace-me-42"})
    server.stop()
    lines = [e for e in log_lines(server) if e.get("request_id") == "trace-me-42"]
    assert len(lines) == 1
    entry = lines[0]
    assert {"time", "level", "method", "path", "status", "duration_ms"} <= set(entry)
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/cars", 200)


def test_start_up_log_names_the_store_and_warns_without_token(run_server):
    server = run_server()
    messages = [e["message"] for e in log_lines(server)]
    assert any("sqlite://" in e.get("store", "") for e in log_lines(server))
    assert any("API_TOKEN is not set" in m for m in messages)


def test_token_from_environment_protects_writes(run_server):
    token = secrets.token_hex(16)
    server = run_server({"API_TOKEN": token})
    assert call(server, "POST", "/cars", GOLF)[0] == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert call(server, "POST", "/cars", GOLF, auth)[0] == 201
    assert token not in server.log()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("THREADS", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("DB_TIMEOUT", "-1"),
    ],
)
def test_bad_setting_stops_start_up_with_one_clear_line(tmp_path, name, value):
    env = {"PATH": "/usr/bin:/bin", "SQLITE_PATH": str(tmp_path / "x.db"), name: value}
    done = subprocess.run(
        [sys.executable, str(ROOT / "cars.py")], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert name in lines[0]
    assert value in lines[0]


def test_unreachable_mysql_gives_503_until_it_answers(run_server):
    server = run_server(
        {"MYSQL_HOST": "127.0.0.1", "MYSQL_PORT": str(free_port()), "DB_TIMEOUT": "1"}
    )
    status, headers, body = call(server, "GET", "/cars")
    assert status == 503
    assert headers["Content-Type"] == "application/problem+json"
    assert int(headers["Retry-After"]) > 0
    assert body["status"] == 503
    assert call(server, "GET", "/ready")[0] == 503
    assert call(server, "GET", "/health")[0] == 200
    assert call(server, "POST", "/cars", GOLF)[0] == 503


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_request_in_flight_and_exits_0(run_server, tmp_path, signum):
    server = run_server({"DB_TIMEOUT": "10"})
    assert call(server, "GET", "/cars")[0] == 200  # the table exists before we lock it
    blocker = sqlite3.connect(tmp_path / f"{server.port}.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the POST below must wait for it
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/cars", json.dumps(GOLF), {"Content-Type": "application/json"})
    result = {}
    worker = threading.Thread(target=lambda: result.update(res=conn.getresponse()))
    worker.start()
    time.sleep(1.0)  # the request is sent; the server holds it, waiting for the lock
    server.proc.send_signal(signum)
    time.sleep(0.5)
    assert server.proc.poll() is None, "the server quit with a request in flight"
    with pytest.raises(ConnectionError):
        call(server, "GET", "/health", timeout=2)
    blocker.execute("ROLLBACK")
    worker.join(timeout=30)
    assert result["res"].status == 201
    conn.close()
    assert server.stop(timeout=10) == 0
    messages = [e["message"] for e in log_lines(server)]
    assert "stopped" in messages


def test_idle_server_exits_0_on_sigterm(run_server):
    server = run_server()
    assert server.stop(timeout=10) == 0
