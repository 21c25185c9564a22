"""POST /cars with an Idempotency-Key (IETF httpapi draft) creates at most one car per key.

Every test runs on SQLite and on the real MySQL, and uses keys of its own.
"""

import contextlib
import http.client
import json
import sqlite3
import threading
import time
import urllib.request
import uuid

import pymysql
import pytest
from conftest import MYSQL, TOKEN, mysql_env, scope

import cars

GOLF = {"brand": "Volkswagen", "model": "Golf", "year": 2018}
POLO = {"brand": "Volkswagen", "model": "Polo", "year": 2019}


def new_key():
    """Return a key no other test uses."""
    return f"test-{uuid.uuid4()}"


def post(testapp, body, key, status):
    """POST a car with an Idempotency-Key and return the response."""
    return testapp.post_json("/cars", body, headers={"Idempotency-Key": key}, status=status)


def cars_count(db):
    """Return how many cars are stored."""
    return db.execute("SELECT COUNT(*) FROM cars").fetchone()[0]


def stored_key(db, key, token=None):
    """Return (car_id, created_at) stored for a key of this caller, or None."""
    sql = "SELECT car_id, created_at FROM idempotency_keys WHERE idem_key = %s"
    return db.execute(sql, (scope(key, token),)).fetchone()


def test_same_key_and_body_returns_the_first_201_without_a_second_car(testapp, db):
    key = new_key()
    first = post(testapp, GOLF, key, 201)
    again = post(testapp, GOLF, key, 201)
    assert again.json == first.json
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["ETag"] == first.headers["ETag"]
    assert cars_count(db) == 1
    assert stored_key(db, key)[0] == first.json["id"]


def test_replay_is_the_original_answer_even_after_the_car_changed(testapp, db):
    key = new_key()
    first = post(testapp, GOLF, key, 201)
    testapp.put_json(first.headers["Location"], POLO, status=200)
    again = post(testapp, GOLF, key, 201)
    assert (again.json, again.headers["ETag"]) == (first.json, first.headers["ETag"])
    assert cars_count(db) == 1


def test_same_key_with_another_body_is_422_and_stores_nothing(testapp, db):
    key = new_key()
    post(testapp, GOLF, key, 201)
    res = post(testapp, POLO, key, 422)
    assert res.content_type == "application/problem+json"
    assert "Idempotency-Key" in res.json["detail"]
    assert cars_count(db) == 1


def test_quoted_key_of_the_draft_is_the_same_key(testapp, db):
    key = new_key()
    first = post(testapp, GOLF, key, 201)
    assert post(testapp, GOLF, f'"{key}"', 201).json == first.json
    assert cars_count(db) == 1


@pytest.mark.parametrize(
    "key", ["", "has space", "x" * 256, "caf\u00e9", "a\xffb", '"unterminated', "a\\b"]
)
def test_unusable_key_is_400_and_stores_nothing(testapp, db, key):
    raw = key if "\xff" in key else key.encode().decode("latin-1")  # \xff: a raw 0xFF byte
    headers = {"Idempotency-Key": raw}
    res = testapp.post_json("/cars", GOLF, headers=headers, status=400)
    assert res.content_type == "application/problem+json"
    assert cars_count(db) == 0


def test_without_a_key_every_post_creates_a_car(testapp, db):
    testapp.post_json("/cars", GOLF, status=201)
    testapp.post_json("/cars", GOLF, status=201)
    assert cars_count(db) == 2


def block_writes(db):
    """Hold the store's write lock from another connection; return it (rollback releases)."""
    s = db.settings
    if db.mysql:
        conn = pymysql.connect(**MYSQL, database=s.mysql_database, autocommit=True)
        conn.cursor().execute("LOCK TABLES cars WRITE")
        return conn
    conn = sqlite3.connect(s.sqlite_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def release(conn, mysql):
    """Release what block_writes took."""
    if mysql:
        conn.cursor().execute("UNLOCK TABLES")
    else:
        conn.rollback()
    conn.close()


def test_second_request_while_the_first_runs_is_409(testapp, db):
    key = new_key()
    blocker = block_writes(db)
    first = []
    thread = threading.Thread(target=lambda: first.append(post(testapp, GOLF, key, "*")))
    try:
        thread.start()
        deadline = time.monotonic() + 5
        while scope(key) not in cars.in_flight_keys and time.monotonic() < deadline:
            time.sleep(0.01)
        res = post(testapp, GOLF, key, 409)
    finally:
        release(blocker, db.mysql)
        thread.join(timeout=15)
    assert res.content_type == "application/problem+json"
    assert first[0].status_int == 201
    assert post(testapp, GOLF, key, 201).json == first[0].json
    assert cars_count(db) == 1


def test_key_and_car_are_one_transaction_so_a_failed_commit_leaves_neither(testapp, db, mocker):
    key = new_key()
    db.execute("SELECT 1")
    proxy = mocker.MagicMock(wraps=db.local.conn)
    proxy.commit.side_effect = (
        pymysql.err.OperationalError(2013, "Lost connection during COMMIT (simulated)")
        if db.mysql
        else sqlite3.OperationalError("disk I/O error (simulated)")
    )
    db.local.conn = proxy
    post(testapp, GOLF, key, 503)
    assert cars_count(db) == 0
    assert stored_key(db, key) is None
    created = post(testapp, GOLF, key, 201)
    assert stored_key(db, key)[0] == created.json["id"]
    assert cars_count(db) == 1


def test_expired_key_is_forgotten_and_may_be_used_again(testapp, db):
    key = new_key()
    old = int(time.time()) - cars.KEY_LIFETIME - 1
    db.execute(
        "INSERT INTO idempotency_keys (idem_key, fingerprint, car_id, created_at)"
        " VALUES (%s, %s, %s, %s)",
        (scope(key), "0" * 64, 999999, old),
    )
    created = post(testapp, POLO, key, 201)  # another body: 422 if the key still counted
    assert created.json["id"] != 999999
    assert stored_key(db, key)[1] > old


def test_cleanup_of_expired_keys_is_bounded_per_request(testapp, db):
    old = int(time.time()) - cars.KEY_LIFETIME - 10
    prefix = f"expired-{uuid.uuid4().hex[:8]}-"
    batch = cars.KEY_CLEANUP_BATCH
    sql = (
        "INSERT INTO idempotency_keys (idem_key, fingerprint, car_id, created_at)"
        " VALUES (%s, %s, %s, %s)"
    )
    for n in range(batch + 50):
        db.execute(sql, (f"{prefix}{n}", "0" * 64, 1, old - n))
    count_sql = "SELECT COUNT(*) FROM idempotency_keys WHERE created_at < %s"
    cutoff = int(time.time()) - cars.KEY_LIFETIME
    before = db.execute(count_sql, (cutoff,)).fetchone()[0]
    post(testapp, GOLF, new_key(), 201)
    after = db.execute(count_sql, (cutoff,)).fetchone()[0]
    assert before - after == batch
    post(testapp, GOLF, new_key(), 201)
    assert db.execute(count_sql, (cutoff,)).fetchone()[0] == max(0, after - batch)


def test_openapi_documents_the_key_and_its_409(testapp):
    doc = testapp.get("/openapi.json").json
    post_op = doc["paths"]["/cars"]["post"]
    header = next(p for p in post_op["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header"
    assert {"201", "409", "410", "422"} <= set(post_op["responses"])
    assert header["schema"]["pattern"] == cars.IDEMPOTENCY_KEY


def test_replay_after_the_car_was_deleted_is_410_and_creates_nothing(testapp, db):
    key = new_key()
    first = post(testapp, GOLF, key, 201)
    testapp.delete(first.headers["Location"], status=204)
    res = post(testapp, GOLF, key, 410)
    assert res.content_type == "application/problem+json"
    assert first.headers["Location"] in res.json["detail"]
    assert cars_count(db) == 0


def test_keys_are_scoped_to_the_caller_so_another_token_gets_its_own_car(testapp, db, app):
    other = "another-caller-token-0123456789abcdef"  # pragma: allowlist secret -- made up
    settings = app.config["cars.settings"]
    app.config["cars.settings"] = settings._replace(api_token=TOKEN, api_token_previous=other)
    try:
        key = new_key()
        mine = testapp.post_json(
            "/cars", GOLF, headers={"Idempotency-Key": key, "Authorization": f"Bearer {TOKEN}"}
        )
        theirs = testapp.post_json(
            "/cars", GOLF, headers={"Idempotency-Key": key, "Authorization": f"Bearer {other}"}
        )
        # A rotation: the first token is now the previous one, and its retry still replays.
        app.config["cars.settings"] = settings._replace(api_token=other, api_token_previous=TOKEN)
        again = testapp.post_json(
            "/cars", GOLF, headers={"Idempotency-Key": key, "Authorization": f"Bearer {TOKEN}"}
        )
    finally:
        app.config["cars.settings"] = settings
    assert mine.json["id"] != theirs.json["id"]
    assert again.json == mine.json
    assert cars_count(db) == 2
    assert stored_key(db, key, TOKEN)[0] == mine.json["id"]
    assert stored_key(db, key, other)[0] == theirs.json["id"]
    assert stored_key(db, key) is None  # nothing is stored under the bare key's scope


def test_stored_keys_never_contain_the_credential(testapp, db, api_token):
    key = new_key()
    testapp.post_json(
        "/cars", GOLF, headers={"Idempotency-Key": key, "Authorization": f"Bearer {api_token}"}
    )
    rows = db.execute("SELECT idem_key FROM idempotency_keys").fetchall()
    assert rows
    assert not any(api_token in row[0] or key in row[0] for row in rows)


def lock_waits(admin):
    """Return how many InnoDB transactions wait for a row lock right now."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
        )
        return cur.fetchone()[0]


def test_an_expired_key_raced_by_another_process_makes_one_car_and_one_answer(
    mysql_app, run_server, mocker
):
    # This process (B) reads the expired key and pauses before replacing it; a real server
    # process (A) posts the same key meanwhile. The window the issue found, opened for sure.
    testapp, database = mysql_app
    name = database.settings.mysql_database
    server = run_server(mysql_env(name))
    with urllib.request.urlopen(f"{server.url}/ready", timeout=10) as ready:
        assert ready.status == 200
    key, brand = new_key(), f"race-{uuid.uuid4().hex[:12]}"
    body = {**GOLF, "brand": brand}
    expired = int(time.time()) - cars.KEY_LIFETIME - 60
    # Older expired keys, so that the cleanup of both requests (a batch each) leaves this one.
    rows = [(f"older-{brand}-{n}", "0" * 64, 1, expired - 1000 - n) for n in range(250)]
    with pymysql.connect(**MYSQL, database=name, autocommit=True) as admin, admin.cursor() as cur:
        cur.executemany(
            "INSERT INTO idempotency_keys (idem_key, fingerprint, car_id, created_at)"
            " VALUES (%s, %s, %s, %s)",
            [*rows, (scope(key), "0" * 64, 999_999_999, expired)],
        )
    reached, resume, answers = threading.Event(), threading.Event(), {}
    real_query = cars.query

    def pausing_query(sql, args=()):
        if sql.startswith("DELETE FROM idempotency_keys WHERE idem_key"):
            reached.set()
            assert resume.wait(20)
        return real_query(sql, args)

    mocker.patch.object(cars, "query", side_effect=pausing_query)

    def in_this_process():
        res = testapp.post_json("/cars", body, headers={"Idempotency-Key": key}, status="*")
        answers["B"] = (res.status_int, res.json)

    def in_the_server():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        conn.request("POST", "/cars", json.dumps(body), headers)
        res = conn.getresponse()
        answers["A"] = (res.status, json.loads(res.read()))
        conn.close()

    b = threading.Thread(target=in_this_process)
    b.start()
    a = threading.Thread(target=in_the_server)
    try:
        assert reached.wait(10), "this process never reached the replacement of the key"
        a.start()
        with pymysql.connect(**MYSQL, database=name, autocommit=True) as admin:
            deadline = time.monotonic() + 10
            while "A" not in answers and lock_waits(admin) == 0:  # A answered, or waits for B
                assert time.monotonic() < deadline, "the server neither answered nor waited"
                time.sleep(0.02)
    finally:
        resume.set()
        b.join(timeout=30)
        if a.ident is not None:  # started
            a.join(timeout=30)
    made = [row[0] for row in database.execute("SELECT id FROM cars WHERE brand = %s", (brand,))]
    assert len(made) == 1, f"one key made {len(made)} cars: {answers}"
    assert [answers[p][0] for p in "AB"] == [201, 201], answers
    assert answers["A"][1] == answers["B"][1]
    assert stored_key(database, key)[0] == made[0]


def test_two_processes_on_one_sqlite_file_make_one_car_per_key(run_server, tmp_path):
    # SQLite's BEGIN IMMEDIATE serialises the read of the key and the insert across processes;
    # half of the keys start out expired, the case the MySQL race above opened.
    env = {"SQLITE_PATH": str(tmp_path / "shared.db")}
    servers = [run_server(env), run_server(env)]
    for server in servers:
        with urllib.request.urlopen(f"{server.url}/ready", timeout=10) as ready:
            assert ready.status == 200
    keys = [new_key() for _ in range(10)]
    expired = int(time.time()) - cars.KEY_LIFETIME - 60
    with contextlib.closing(sqlite3.connect(tmp_path / "shared.db", timeout=10)) as db, db:
        db.executemany(
            "INSERT INTO idempotency_keys (idem_key, fingerprint, car_id, created_at)"
            " VALUES (?, ?, ?, ?)",
            [(scope(key), "0" * 64, 999_999_999, expired) for key in keys[::2]],
        )
    answers = {key: [] for key in keys}

    def post_until_answered(server, key):
        for _ in range(50):  # 409 while the other process holds the key: retry, as clients do
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            headers = {"Content-Type": "application/json", "Idempotency-Key": key}
            conn.request("POST", "/cars", json.dumps({**GOLF, "model": key[-12:]}), headers)
            res = conn.getresponse()
            body = json.loads(res.read())
            conn.close()
            if res.status != 409:
                answers[key].append((res.status, body.get("id")))
                return
            time.sleep(0.05)

    senders = [
        threading.Thread(target=post_until_answered, args=(server, key))
        for key in keys
        for server in servers
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=60)
    with contextlib.closing(sqlite3.connect(tmp_path / "shared.db", timeout=10)) as db:
        made = db.execute("SELECT model, COUNT(*) FROM cars GROUP BY model").fetchall()
    assert sorted(made) == sorted((key[-12:], 1) for key in keys)
    for key, got in answers.items():
        assert len(got) == 2, (key, got)
        assert {status for status, _ in got} == {201}, (key, got)
        assert len({car_id for _, car_id in got}) == 1, (key, got)


def test_a_key_stored_unscoped_by_the_previous_release_still_replays_after_the_upgrade(testapp, db):
    key = new_key()
    made = db.execute(
        "INSERT INTO cars (brand, model, year) VALUES (%s, %s, %s)", tuple(GOLF.values())
    ).lastrowid
    body = json.dumps(GOLF).encode()
    # What the release before scoped keys stored: the bare key, the body's hash, the car.
    db.execute(
        cars.INSERT_KEY,
        (key, cars.hashlib.sha256(body).hexdigest(), made, int(time.time()) - 60),
    )
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    again = testapp.post("/cars", body, headers=headers, status=201)
    assert again.json == {"id": made, **GOLF}
    assert cars_count(db) == 1
    other = testapp.post("/cars", json.dumps(POLO).encode(), headers=headers, status=422)
    assert other.content_type == "application/problem+json"
    assert cars_count(db) == 1
