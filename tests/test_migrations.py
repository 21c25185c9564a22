"""Versioned migrations for real: `python cars.py migrate` and the server's schema check.

Each test runs on SQLite and on the real MySQL (a database of its own, dropped at the end).
Release N is this cars.py; release N+1's schema is made here by applying one more migration
by hand, as the next release's `migrate` would.
"""

import contextlib
import http.client
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid

import pymysql
import pytest
from conftest import MYSQL, ROOT, TOKEN, free_port, mysql_env

import cars

# What release N+1 adds (expand: code N still works) and then removes (contract: it does not).
EXPAND = {
    "mysql": "ALTER TABLE cars ADD COLUMN colour VARCHAR(32) NULL",
    "sqlite": "ALTER TABLE cars ADD COLUMN colour TEXT",
}
RECORD = "INSERT INTO schema_migrations (version, description, oldest_code, applied_at) VALUES "
NEXT = cars.SCHEMA_VERSION + 1


class Store:
    """One store the tests migrate: its environment, and direct SQL on it."""

    def __init__(self, kind, env, path=None):
        self.kind, self.env, self.path = kind, env, path
        self.name = env.get("MYSQL_DATABASE")

    def sql(self, statement, args=()):
        """Run one statement as the owner, outside cars.py; return the rows."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
                return conn.execute(statement.replace("%s", "?"), args).fetchall()
        conn = pymysql.connect(**MYSQL, database=self.name, autocommit=True)
        with conn, conn.cursor() as cur:
            cur.execute(statement, args or None)
            return [tuple(row) for row in cur.fetchall()]

    def versions(self):
        """Return the recorded (version, oldest_code) rows in order."""
        return [tuple(row) for row in self.sql(SELECT_VERSIONS)]

    def record(self, version, description, oldest_code):
        """Record a migration the way release N+1's migrate would."""
        self.sql(RECORD + "(%s, %s, %s, %s)", (version, description, oldest_code, int(time.time())))


SELECT_VERSIONS = "SELECT version, oldest_code FROM schema_migrations ORDER BY version"


@pytest.fixture(params=["sqlite", "mysql"])
def store(request, tmp_path):
    """A store with nothing in it yet; the MySQL database is dropped at the end."""
    if request.param == "sqlite":
        path = tmp_path / "migrations.db"
        yield Store("sqlite", {"SQLITE_PATH": str(path)}, path)
        return
    base = request.getfixturevalue("mysql_database")
    name = f"{base}_m{uuid.uuid4().hex[:6]}"
    yield Store("mysql", mysql_env(name))
    with pymysql.connect(**MYSQL, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def command_env(env):
    """Return a clean process environment for cars.py with these settings."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL_", "API_TOKEN"))}
    return {**keep, "PYTHONPATH": str(ROOT), "SQLITE_PATH": "unused.db", **env}


def log_lines(text):
    """Parse every line a process printed; each must be JSON."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def migrate_code(extra=()):
    """Return Python that runs `cars.py migrate` with extra migrations after this release's."""
    return (
        "import sys, cars\n"
        f"cars.MIGRATIONS += tuple(cars.Migration(*m) for m in {list(extra)!r})\n"
        "sys.argv = ['cars.py', 'migrate']\n"
        "cars.main()\n"
    )


def start_migrate(env, extra=()):
    """Start `cars.py migrate` (with extra migrations, if any) as its own process."""
    return subprocess.Popen(
        [sys.executable, "-c", migrate_code(extra)],
        env=command_env(env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def migrate(env, extra=()):
    """Run `cars.py migrate` to the end; return (exit code, its log lines)."""
    proc = start_migrate(env, extra)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, log_lines(out + err)


def call(server, method, path, body=None):
    """Send one request; return (status, content type, parsed body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        res = conn.getresponse()
        raw = res.read()
        return res.status, res.getheader("Content-Type"), json.loads(raw) if raw else None
    finally:
        conn.close()


def refusals(server):
    """Return the server's `schema not supported` log lines."""
    return [e for e in log_lines(server.log()) if e.get("message") == "schema not supported"]


# -- The migrate command ------------------------------------------------------------------------


def test_migrate_creates_the_schema_records_its_version_and_is_idempotent(store):
    code, lines = migrate(store.env)
    assert code == 0, lines
    assert store.versions() == [(m.version, m.oldest_code) for m in cars.MIGRATIONS]
    assert [e["version"] for e in lines if e["message"] == "migration applied"] == [1]
    assert store.sql("SELECT COUNT(*) FROM cars") == [(0,)]
    code, lines = migrate(store.env)
    assert code == 0, lines
    assert [e["message"] for e in lines] == ["schema current"]
    assert lines[0]["schema_version"] == cars.SCHEMA_VERSION
    assert store.versions() == [(1, 1)]


def test_a_database_made_by_the_previous_release_adopts_version_1_keeping_its_rows(store):
    # The previous release ran these statements at first use, and recorded no version.
    if store.kind == "mysql":
        with pymysql.connect(**MYSQL, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{store.name}` CHARACTER SET utf8mb4")
    for statement in cars.MYSQL_SCHEMA if store.kind == "mysql" else cars.SQLITE_SCHEMA:
        store.sql(statement)
    store.sql("INSERT INTO cars (brand, model, year) VALUES ('Old', 'Release', 2001)")
    code, lines = migrate(store.env)
    assert code == 0, lines
    assert store.versions() == [(1, 1)]
    assert store.sql("SELECT brand, model, year FROM cars") == [("Old", "Release", 2001)]


def test_a_failing_migration_exits_1_with_one_json_line_and_keeps_the_version(store):
    assert migrate(store.env)[0] == 0
    statement = "ALTER TABLE no_such_table ADD COLUMN x INTEGER"
    broken = (NEXT, "broken on purpose", (statement,), (statement,), 1)
    code, lines = migrate(store.env, [broken])
    assert code == 1
    assert len(lines) == 1, lines
    (line,) = lines
    assert (line["level"], line["message"], line["version"]) == ("ERROR", "migration failed", NEXT)
    assert "no_such_table" in line["error"]
    assert store.versions() == [(1, 1)]


def test_migrate_against_an_unreachable_mysql_exits_1_with_one_json_line():
    env = {"MYSQL_HOST": "127.0.0.1", "MYSQL_PORT": str(free_port()), "DB_TIMEOUT": "1"}
    code, lines = migrate(env)
    assert code == 1
    assert [(e["level"], e["message"]) for e in lines] == [("ERROR", "migration failed")]
    assert "connect" in lines[0]["error"].lower()


def test_concurrent_migrate_runs_apply_each_migration_exactly_once(store):
    # Adding a column twice fails, so a second run applying it too would exit 1. MySQL's copy
    # sleeps first, to make sure the runs overlap while one of them holds the lock.
    slow = ("SELECT SLEEP(0.5)",) if store.kind == "mysql" else ()
    added = (NEXT, "cars.colour", (*slow, EXPAND["mysql"]), (EXPAND["sqlite"],), 1)
    procs = [start_migrate(store.env, [added]) for _ in range(4)]
    results = [(proc.wait(timeout=120), proc) for proc in procs]
    outputs = [log_lines(proc.stdout.read() + proc.stderr.read()) for _, proc in results]
    for proc in procs:
        proc.stdout.close()
        proc.stderr.close()
    assert [code for code, _ in results] == [0] * 4, outputs
    applied = [e["version"] for out in outputs for e in out if e["message"] == "migration applied"]
    assert sorted(applied) == [1, NEXT]
    assert store.versions() == [(1, 1), (NEXT, 1)]
    assert store.sql("SELECT colour FROM cars") == []


# -- The server's schema check ------------------------------------------------------------------


def test_without_auto_migrate_the_server_runs_no_ddl_and_is_ready_once_migrate_ran(
    store, run_server
):
    if store.kind == "mysql":  # bootstrap's part: the database exists, with nothing in it
        with pymysql.connect(**MYSQL, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{store.name}`")
    server = run_server({**store.env, "AUTO_MIGRATE": "false"})
    for _ in range(3):
        for path in ("/ready", "/cars"):
            status, media, body = call(server, "GET", path)
            assert (status, media, body["status"]) == (503, "application/problem+json", 503)
        assert call(server, "GET", "/health")[0] == 200
        time.sleep(0.5)
    tables = "SHOW TABLES" if store.kind == "mysql" else "SELECT name FROM sqlite_master"
    assert store.sql(tables) == []  # no DDL ran
    (line,) = refusals(server)
    assert (line["schema_version"], line["code_version"], line["level"]) == (0, 1, "ERROR")
    assert migrate(store.env)[0] == 0
    deadline = time.monotonic() + 2 * cars.SCHEMA_RECHECK + 5
    while call(server, "GET", "/ready")[0] != 200:
        assert time.monotonic() < deadline, "the server did not notice the migration"
        time.sleep(0.2)
    assert call(server, "GET", "/cars")[0] == 200
    assert len(refusals(server)) == 1
    assert server.proc.poll() is None  # no restart


def test_release_n_serves_an_expanded_schema_and_refuses_a_contracted_one(store, run_server):
    env = {**store.env, "API_TOKEN": TOKEN}
    assert migrate(store.env)[0] == 0
    # Release N+1's expand: a nullable column, and a version that code N still works with.
    store.sql(EXPAND[store.kind])
    store.record(NEXT, "expand: cars.colour", cars.SCHEMA_VERSION)
    server = run_server(env)
    status, _, created = call(
        server, "POST", "/cars", {"brand": "Saab", "model": "900", "year": 1987}
    )
    assert status == 201
    path = f"/cars/{created['id']}"
    assert call(server, "GET", path)[0] == 200
    assert call(server, "PATCH", path, {"model": "9000"})[0] == 200
    assert call(server, "GET", "/cars")[2] == [{**created, "model": "9000"}]
    assert call(server, "DELETE", path)[0] == 204
    assert call(server, "GET", "/ready")[0] == 200
    assert server.stop() == 0
    assert refusals(server) == []

    # Release N+1's contract: from now on only code N+1 or newer works. Rolling back to N:
    store.record(NEXT + 1, "contract: code N+1 or newer only", NEXT)
    server = run_server(env)
    answers = []
    for _ in range(3):
        answers += [call(server, "GET", p) for p in ("/ready", "/cars", path)]
        answers.append(call(server, "POST", "/cars", {"brand": "A", "model": "B", "year": 2000}))
        time.sleep(0.6)  # past SCHEMA_RECHECK: the database is asked again, the log stays quiet
    assert {(status, media) for status, media, _ in answers} == {(503, "application/problem+json")}
    assert call(server, "GET", "/health")[0] == 200
    (line,) = refusals(server)
    assert (line["schema_version"], line["schema_needs_code"], line["code_version"]) == (
        NEXT + 1,
        NEXT,
        cars.SCHEMA_VERSION,
    )
    statuses = [e["status"] for e in log_lines(server.log()) if e.get("message") == "request"]
    assert 500 not in statuses
    assert store.versions()[-1] == (NEXT + 1, NEXT)  # the refusing server changed nothing


def test_migrate_exits_1_on_a_schema_newer_than_this_code_supports(store):
    assert migrate(store.env)[0] == 0
    store.sql(EXPAND[store.kind])
    store.record(NEXT, "expand: cars.colour", cars.SCHEMA_VERSION)
    code, lines = migrate(store.env)
    assert code == 0, lines  # an expanded schema is one this code still serves
    store.record(NEXT + 1, "contract: code N+1 or newer only", NEXT)
    code, lines = migrate(store.env)
    assert code == 1, lines  # a release gate on the exit code stops here
    (line,) = lines
    assert (line["level"], line["message"]) == ("ERROR", "schema not supported by this release")
    assert (line["schema_version"], line["schema_needs_code"]) == (NEXT + 1, NEXT)
    assert line["code_version"] == cars.SCHEMA_VERSION


def test_a_migration_lock_held_elsewhere_costs_a_request_db_timeout_not_a_minute(
    run_server, mysql_database
):
    name = f"{mysql_database}_lock"
    lock = f"cars-api:migrate:{name}"[:64]
    holder = pymysql.connect(**MYSQL, autocommit=True)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (lock,))
            assert cur.fetchone()[0] == 1
        server = run_server({**mysql_env(name), "DB_TIMEOUT": "2"})
        started = time.monotonic()
        status, media, _ = call(server, "GET", "/cars")
        took = time.monotonic() - started
        assert (status, media) == (503, "application/problem+json")
        assert took <= 2 + 1 + 0.75, f"the request waited {took:.1f} s for the migration lock"
        with holder.cursor() as cur:
            cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
        assert call(server, "GET", "/cars")[0] == 200
    finally:
        with holder.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        holder.close()
