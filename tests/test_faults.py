"""Database faults and what each means for a request: 503 and retry, or 500 and a log line.

Faults that can be caused for real are: lock waits, read-only sessions, a renamed column,
deadlocks, KILL and a dropped database on the real MySQL (and their SQLite twins where one
exists). pytest-mock stands in only for what cannot be caused on demand: a commit that loses its
link, a second deadlock in a row, too many connections.
"""

import http.client
import json
import logging
import socket
import sqlite3
import threading
import time
import warnings

import pymysql
import pytest
import webtest
from conftest import MYSQL, mysql_env

import cars

GOLF = {"brand": "Volkswagen", "model": "Golf", "year": 2018}
POLO = {"brand": "Volkswagen", "model": "Polo", "year": 2019}


def break_commit(mocker, db):
    """Make the next COMMIT on this thread's connection fail as if the link dropped."""
    db.execute("SELECT 1")  # open the connection the request will use
    proxy = mocker.MagicMock(wraps=db.local.conn)
    if db.mysql:
        lost = pymysql.err.OperationalError(2013, "Lost connection during COMMIT (simulated)")
    else:
        lost = sqlite3.OperationalError("disk I/O error (simulated)")
    proxy.commit.side_effect = lost
    db.local.conn = proxy
    return proxy


def rows(db):
    """Return every stored car as a tuple."""
    return db.execute("SELECT id, brand, model, year, version FROM cars ORDER BY id").fetchall()


def other_connection(db):
    """Open a second connection to the app's store, as another client would."""
    s = db.settings
    if db.mysql:
        return pymysql.connect(**MYSQL, database=s.mysql_database, autocommit=True)
    return sqlite3.connect(s.sqlite_path, isolation_level=None, timeout=5)


def in_thread(target):
    """Run target in a thread; return the thread and a list that receives its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(target()))
    thread.start()
    return thread, result


def wait_for_lock_wait(side):
    """Return the MySQL thread id of a transaction that waits for a lock, or None after 5 s."""
    deadline = time.monotonic() + 5
    cur = side.cursor()
    while time.monotonic() < deadline:
        cur.execute(
            "SELECT trx_mysql_thread_id, trx_state, trx_query FROM information_schema.INNODB_TRX"
        )
        found = cur.fetchall()
        waiting = [row[0] for row in found if row[1] == "LOCK WAIT"]
        if waiting:
            return waiting[0]
        time.sleep(0.02)
    return None


# -- Link lost at commit (simulated) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/cars", GOLF),
        ("put", "/cars/{id}", {**GOLF, "model": "Polo"}),
        ("patch", "/cars/{id}", {"year": 2001}),
        ("delete", "/cars/{id}", None),
    ],
)
def test_write_that_fails_at_commit_is_503_and_changes_nothing(
    testapp, db, mocker, method, path, body
):
    car_id = testapp.post_json("/cars", GOLF, status=201).json["id"]
    before = rows(db)
    proxy = break_commit(mocker, db)
    url = path.format(id=car_id)
    if body is None:
        res = getattr(testapp, method)(url, status=503)
    else:
        res = getattr(testapp, f"{method}_json")(url, body, status=503)
    assert proxy.commit.called
    assert res.content_type == "application/problem+json"
    assert int(res.headers["Retry-After"]) > 0
    assert rows(db) == before


def test_next_request_after_a_failed_commit_uses_a_fresh_connection(testapp, db, mocker):
    proxy = break_commit(mocker, db)
    testapp.post_json("/cars", GOLF, status=503)
    assert db.local.conn is None
    testapp.post_json("/cars", GOLF, status=201)
    assert db.local.conn is not proxy


def test_bug_in_a_handler_is_a_bare_500_logged_with_traceback(testapp, mocker, caplog):
    mocker.patch("cars.row_to_car", side_effect=RuntimeError("boom: secret internals"))
    testapp.post_json("/cars", GOLF, status=201)
    with caplog.at_level(logging.ERROR, logger="cars"):
        res = testapp.get("/cars", status=500)
    assert res.content_type == "application/problem+json"
    assert "boom" not in res.text
    assert "Traceback" not in res.text
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


# -- Real faults on both stores -----------------------------------------------------------------


def test_lock_wait_timeout_is_503_on_a_connection_that_stays_usable(testapp, db):
    car_id = testapp.post_json("/cars", GOLF, status=201).json["id"]
    db.execute(
        "SET SESSION innodb_lock_wait_timeout = 1" if db.mysql else "PRAGMA busy_timeout = 300"
    )
    conn = db.local.conn
    side = other_connection(db)
    try:
        if db.mysql:
            side.cursor().execute("BEGIN")
            side.cursor().execute("SELECT id FROM cars WHERE id = %s FOR UPDATE", (car_id,))
        else:
            side.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        res = testapp.put_json(f"/cars/{car_id}", POLO, status=503)
        waited = time.monotonic() - started
        side.rollback()
    finally:
        side.close()
    assert int(res.headers["Retry-After"]) > 0
    assert waited < 3
    assert db.local.conn is conn  # a clean error from the server, not a dead socket
    assert testapp.put_json(f"/cars/{car_id}", POLO, status=200).json["model"] == "Polo"
    db.discard()  # drop the shortened lock wait


def test_read_only_database_is_503_and_stores_nothing(testapp, db):
    db.execute("SET SESSION TRANSACTION READ ONLY" if db.mysql else "PRAGMA query_only = ON")
    try:
        res = testapp.post_json("/cars", GOLF, status=503)
    finally:
        db.discard()
    assert int(res.headers["Retry-After"]) > 0
    assert not rows(db)


def test_unknown_column_is_500_and_logs_the_cause(testapp, db, caplog):
    testapp.post_json("/cars", GOLF, status=201)
    db.execute("ALTER TABLE cars RENAME COLUMN model TO model_was")
    try:
        with caplog.at_level(logging.ERROR, logger="cars"):
            res = testapp.get("/cars", status=500)
    finally:
        db.execute("ALTER TABLE cars RENAME COLUMN model_was TO model")
    assert res.content_type == "application/problem+json"
    assert "model" not in res.text
    logged = [r for r in caplog.records if r.getMessage() == "database error"]
    assert logged
    assert "model" in logged[0].fields["cause"]
    assert "Retry-After" not in res.headers


# -- Real faults on MySQL -----------------------------------------------------------------------


def test_deadlock_is_retried_once_inside_the_request(mysql_app, caplog):
    testapp, database = mysql_app
    car_id = testapp.post_json("/cars", GOLF, status=201).json["id"]
    side = other_connection(database)
    cur = side.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS ballast (n INT)")
    try:
        cur.execute("BEGIN")
        # Heavier than the request, so that InnoDB picks the request as the deadlock victim.
        cur.executemany("INSERT INTO ballast VALUES (%s)", [(n,) for n in range(200)])
        cur.execute("SELECT id FROM cars WHERE id = %s LOCK IN SHARE MODE", (car_id,))
        with caplog.at_level(logging.INFO, logger="cars"):
            thread, result = in_thread(lambda: testapp.put_json(f"/cars/{car_id}", POLO))
            assert wait_for_lock_wait(other_connection(database)), result
            cur.execute("UPDATE cars SET year = 1999 WHERE id = %s", (car_id,))  # closes the cycle
            time.sleep(0.2)
            side.commit()
            thread.join(timeout=10)
    finally:
        cur.execute("DROP TABLE IF EXISTS ballast")
        side.close()
    assert result[0].status_int == 200
    assert any(r.getMessage().startswith("deadlock; retrying") for r in caplog.records)
    assert testapp.get(f"/cars/{car_id}").json == {"id": car_id, **POLO}


def test_second_deadlock_in_a_row_is_503(mysql_app, mocker):
    testapp, _ = mysql_app
    car_id = testapp.post_json("/cars", GOLF, status=201).json["id"]
    victim = pymysql.err.OperationalError(1213, "Deadlock found (simulated)")
    find = mocker.patch("cars.find_car", side_effect=victim)
    res = testapp.put_json(f"/cars/{car_id}", POLO, status=503)
    assert find.call_count == 2
    assert int(res.headers["Retry-After"]) > 0


def test_too_many_connections_is_503(mysql_app, mocker):
    testapp, database = mysql_app
    database.discard()
    full = pymysql.err.OperationalError(1040, "Too many connections (simulated)")
    mocker.patch.object(database, "open", side_effect=full)
    res = testapp.get("/ready", status=503)
    assert int(res.headers["Retry-After"]) > 0


def test_connection_killed_while_idle_is_replaced_within_the_request(mysql_app):
    testapp, database = mysql_app
    old = database.execute("SELECT CONNECTION_ID()").fetchone()[0]
    with other_connection(database) as side:
        side.cursor().execute(f"KILL CONNECTION {int(old)}")
    time.sleep(0.1)
    testapp.get("/ready", status=200)
    assert database.execute("SELECT CONNECTION_ID()").fetchone()[0] != old


def test_connection_lost_inside_a_transaction_is_503_without_reconnecting(
    mysql_app, mocker, monkeypatch
):
    testapp, database = mysql_app
    car_id = testapp.post_json("/cars", GOLF, status=201).json["id"]
    monkeypatch.setattr(cars.Database, "IDLE_CHECK", 0, raising=False)  # old code pinged here
    original = cars.find_car

    def find_then_lose_the_link(*args, **kwargs):
        found = original(*args, **kwargs)  # the row is locked now
        thread_id = database.local.conn.thread_id()
        with other_connection(database) as side:
            side.cursor().execute(f"KILL CONNECTION {int(thread_id)}")
        return found

    mocker.patch("cars.find_car", side_effect=find_then_lose_the_link)
    opened = mocker.spy(database, "open")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = testapp.put_json(f"/cars/{car_id}", POLO, status=503)
    assert int(res.headers["Retry-After"]) > 0
    assert opened.call_count == 0
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    mocker.stopall()
    assert testapp.get(f"/cars/{car_id}").json == {"id": car_id, **GOLF}


def test_dropped_database_is_500_not_503(mysql_database, caplog):
    name = f"{mysql_database}_gone"
    saved = cars.app.config.get("cars.settings"), cars.app.config.get("cars.db")
    cars.configure(cars.load_settings(mysql_env(name)))
    database = cars.app.config["cars.db"]
    try:
        testapp = webtest.TestApp(cars.app)
        testapp.get("/ready", status=200)  # creates the database
        with pymysql.connect(**MYSQL, autocommit=True) as side:
            side.cursor().execute(f"DROP DATABASE `{name}`")
        database.discard()
        with caplog.at_level(logging.ERROR, logger="cars"):
            res = testapp.get("/cars", status=500)
    finally:
        database.discard()
        cars.app.config["cars.settings"], cars.app.config["cars.db"] = saved
    assert "Retry-After" not in res.headers
    assert any(
        r.getMessage() == "database error" and "Unknown database" in r.fields["cause"]
        for r in caplog.records
    )


def test_slow_body_upload_holds_no_row_lock(run_server, mysql_database):
    server = run_server(mysql_env(mysql_database))

    def request(method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        sent = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, None if body is None else json.dumps(body), sent)
        res = conn.getresponse()
        return res.status, res.getheader("ETag"), json.loads(res.read() or b"null")

    _, tag, car = request("POST", "/cars", GOLF)
    body = json.dumps({"year": 2001}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        head = (
            f"PATCH /cars/{car['id']} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nIf-Match: {tag}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        slow.sendall(head.encode() + body[:5])  # the rest of the body is still on its way
        time.sleep(0.3)
        started = time.monotonic()
        status, _, _ = request("PUT", f"/cars/{car['id']}", POLO)
        assert (status, time.monotonic() - started < 2) == (200, True)
        slow.sendall(body[5:])
        answer = slow.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 412")  # the PUT changed the ETag the PATCH named


def test_many_threads_creating_the_sqlite_schema_at_once_never_see_a_locked_database(tmp_path):
    # A race, so many rounds: before SQLite opens took turns, a few rounds in a hundred failed
    # at once with "database is locked" while switching the new file to WAL (a 503 at start-up).
    failures = []
    for round_ in range(200):
        settings = cars.load_settings({"SQLITE_PATH": str(tmp_path / f"{round_}.db")})
        database = cars.Database(settings)
        barrier = threading.Barrier(16)

        def create(database=database, barrier=barrier):
            barrier.wait()
            try:
                database.create_schema()
            except sqlite3.Error as exc:
                failures.append(str(exc))

        threads = [threading.Thread(target=create) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[:3]


def test_a_new_sqlite_file_locked_by_another_process_while_it_switches_to_wal_is_not_a_503(
    run_server, tmp_path
):
    # Another process (this one) holds the new file, still in rollback mode, when the server's
    # first request switches it to WAL: the switch waits within DB_TIMEOUT instead of failing.
    path = tmp_path / "shared.db"
    server = run_server({"SQLITE_PATH": str(path)})
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    answers = []

    def first_request():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/cars")
        answers.append(conn.getresponse().status)
        conn.close()

    caller = threading.Thread(target=first_request)
    caller.start()
    time.sleep(0.5)
    other.execute("ROLLBACK")
    other.close()
    caller.join(timeout=30)
    assert answers == [200]
