"""POST /cars with an Idempotency-Key (IETF httpapi draft) creates at most one car per key.

Every test runs on SQLite and on the real MySQL, and uses keys of its own.
"""

import sqlite3
import threading
import time
import uuid

import pymysql
import pytest
from conftest import MYSQL

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


def stored_key(db, key):
    """Return (car_id, created_at) stored for a key, or None."""
    sql = "SELECT car_id, created_at FROM idempotency_keys WHERE idem_key = %s"
    return db.execute(sql, (key,)).fetchone()


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
        while key not in cars.in_flight_keys and time.monotonic() < deadline:
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
        (key, "0" * 64, 999999, old),
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
    assert {"201", "409", "422"} <= set(post_op["responses"])
    assert header["schema"]["pattern"] == cars.IDEMPOTENCY_KEY
