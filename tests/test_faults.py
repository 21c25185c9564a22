"""Faults that cannot be caused on demand: the connection dying mid-write, a bug in a handler."""

import logging

import pytest

GOLF = {"brand": "Volkswagen", "model": "Golf", "year": 2018}


def break_commit(mocker, db):
    """Make the next COMMIT on this thread's connection fail as if the link dropped."""
    db.execute("SELECT 1")  # open the connection the request will use
    proxy = mocker.MagicMock(wraps=db.local.conn)
    proxy.commit.side_effect = db.errors[0](2013, "Lost connection during COMMIT (simulated)")
    db.local.conn = proxy
    return proxy


def rows(db):
    """Return every stored car as a tuple."""
    return db.execute("SELECT id, brand, model, year, version FROM cars ORDER BY id").fetchall()


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
