"""The HTTP contract of cars.py, run through WebTest on SQLite and on the real MySQL."""

import datetime
import json

import pytest

import cars

GOLF = {"brand": "Volkswagen", "model": "Golf", "year": 2018}
POLO = {"brand": "Volkswagen", "model": "Polo", "year": 2019}
NEXT_YEAR = datetime.datetime.now(datetime.UTC).year + 1


def add(testapp, car=GOLF, **kwargs):
    """POST a car and return the response."""
    return testapp.post_json("/cars", car, status=201, **kwargs)


def count(db):
    """Return how many rows the table holds."""
    return db.execute("SELECT COUNT(*) FROM cars").fetchone()[0]


def assert_problem(res, status):
    """Check that a response is an RFC 9457 problem with the given status."""
    assert res.status_int == status
    assert res.content_type == "application/problem+json"
    body = res.json
    assert body["status"] == status
    assert {"type", "title", "detail"} <= set(body)
    assert "Traceback" not in res.text
    return body


def error_fields(res):
    """Return the field names a 4xx problem complains about."""
    return {error["field"] for error in res.json.get("errors", [])}


# -- Creating and reading ------------------------------------------------------------------------


def test_post_creates_car_with_location_and_etag(testapp):
    res = add(testapp)
    car_id = res.json["id"]
    assert res.json == {"id": car_id, **GOLF}
    assert res.headers["Location"] == f"/cars/{car_id}"
    assert res.headers["ETag"]
    assert testapp.get(res.headers["Location"], status=200).json == res.json


def test_get_returns_the_car_with_the_same_etag_as_post(testapp):
    res = add(testapp)
    got = testapp.get(f"/cars/{res.json['id']}", status=200)
    assert got.headers["ETag"] == res.headers["ETag"]


def test_list_is_ordered_by_id(testapp):
    ids = [add(testapp, {**GOLF, "year": 2000 + i}).json["id"] for i in range(5)]
    assert [car["id"] for car in testapp.get("/cars", status=200).json] == ids


def test_list_of_empty_table_is_empty_array(testapp):
    res = testapp.get("/cars", status=200)
    assert res.json == []
    assert "Link" not in res.headers


def test_strings_are_trimmed(testapp):
    res = add(testapp, {"brand": "  Seat ", "model": "\tIbiza\n", "year": 2020})
    assert (res.json["brand"], res.json["model"]) == ("Seat", "Ibiza")


def test_unicode_text_round_trips(testapp):
    car = {"brand": "Škoda", "model": "Octavia 🚗", "year": 2021}
    res = add(testapp, car)
    assert testapp.get(f"/cars/{res.json['id']}").json == {"id": res.json["id"], **car}


# -- Paging and filters --------------------------------------------------------------------------


def test_limit_and_after_page_through_everything_once(testapp):
    ids = [add(testapp, {**GOLF, "year": 2000 + i}).json["id"] for i in range(7)]
    seen, url = [], "/cars?limit=3"
    while url:
        res = testapp.get(url, status=200)
        seen += [car["id"] for car in res.json]
        link = res.headers.get("Link")
        url = link[1 : link.index(">")] if link else None
        assert len(res.json) <= 3
    assert seen == ids


def test_link_keeps_filters_and_limit(testapp):
    for _ in range(3):
        add(testapp, POLO)
    add(testapp, GOLF)
    res = testapp.get("/cars?model=Polo&limit=2", status=200)
    link = res.headers["Link"]
    assert "model=Polo" in link
    assert "limit=2" in link
    assert 'rel="next"' in link
    assert f"after={res.json[-1]['id']}" in link
    rest = testapp.get(link[1 : link.index(">")], status=200)
    assert [car["model"] for car in rest.json] == ["Polo"]
    assert "Link" not in rest.headers


def test_no_link_when_the_page_is_the_last(testapp):
    add(testapp)
    assert "Link" not in testapp.get("/cars?limit=1", status=200).headers


@pytest.mark.parametrize(
    ("query", "expected"),
    [("brand=Volkswagen", {"Golf", "Polo"}), ("model=Polo", {"Polo"}), ("year=2018", {"Golf"})],
)
def test_filters_are_exact(testapp, query, expected):
    add(testapp, GOLF)
    add(testapp, POLO)
    add(testapp, {"brand": "Seat", "model": "Polo Clone", "year": 2017})
    assert {car["model"] for car in testapp.get(f"/cars?{query}").json} == expected


def test_filters_match_non_ascii_text(testapp):
    skoda = add(testapp, {"brand": "Škoda", "model": "Octavia", "year": 2021}).json
    add(testapp)
    assert testapp.get("/cars", {"brand": "Škoda"}, status=200).json == [skoda]


@pytest.mark.parametrize("value", ["Ford%20", "%20Ford", "Ford%09", "%E3%80%80Ford%C2%A0"])
def test_filters_are_trimmed_like_stored_values_on_both_stores(testapp, value):
    ford = add(testapp, {"brand": "Ford", "model": "Focus", "year": 2015}).json
    add(testapp)
    assert testapp.get(f"/cars?brand={value}", status=200).json == [ford]


@pytest.mark.parametrize("value", ["%20", "Fo%00rd", "Ford%C2%85", "x" * 65])
def test_filter_that_no_stored_value_could_equal_is_400(testapp, value):
    res = testapp.get(f"/cars?brand={value}", status=400)
    assert error_fields(res) == {"brand"}


def test_query_that_is_not_utf8_is_400(testapp):
    assert_problem(testapp.get("/cars?brand=%FF", status=400), 400)


def test_filters_are_case_sensitive(testapp):
    add(testapp)
    assert testapp.get("/cars?brand=volkswagen", status=200).json == []


def test_default_limit_is_100(testapp, db):
    for _ in range(101):
        db.execute("INSERT INTO cars (brand, model, year) VALUES (%s, %s, %s)", ("A", "B", 2000))
    res = testapp.get("/cars", status=200)
    assert len(res.json) == 100
    assert "limit=100" in res.headers["Link"]


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "after=-1",
        "after=x",
        "after=99999999999999999999",
        "year=abc",
        "brand=",
        "brand=" + "x" * 65,
        "colour=red",
        "limit=1&limit=2",
    ],
)
def test_invalid_query_is_400_naming_the_parameter(testapp, query):
    res = testapp.get(f"/cars?{query}", status=400)
    assert_problem(res, 400)
    assert error_fields(res) == {query.split("=")[0]}


# -- Replacing and patching ----------------------------------------------------------------------


def test_put_replaces_and_changes_etag(testapp):
    created = add(testapp)
    car_id = created.json["id"]
    res = testapp.put_json(f"/cars/{car_id}", POLO, status=200)
    assert res.json == {"id": car_id, **POLO}
    assert res.headers["ETag"] != created.headers["ETag"]
    assert testapp.get(f"/cars/{car_id}").json == res.json


def test_put_accepts_an_id_equal_to_the_url(testapp):
    car_id = add(testapp).json["id"]
    assert (
        testapp.put_json(f"/cars/{car_id}", {**POLO, "id": car_id}, status=200).json["id"] == car_id
    )


def test_put_rejects_a_different_id(testapp):
    car_id = add(testapp).json["id"]
    res = testapp.put_json(f"/cars/{car_id}", {**POLO, "id": car_id + 1}, status=422)
    assert error_fields(res) == {"id"}
    assert testapp.get(f"/cars/{car_id}").json["model"] == "Golf"


def test_put_needs_every_field(testapp):
    car_id = add(testapp).json["id"]
    res = testapp.put_json(f"/cars/{car_id}", {"model": "Polo"}, status=422)
    assert error_fields(res) == {"brand", "year"}


@pytest.mark.parametrize("media", ["application/json", "application/merge-patch+json"])
def test_patch_changes_only_given_fields(testapp, media):
    car_id = add(testapp).json["id"]
    res = testapp.patch(
        f"/cars/{car_id}", json.dumps({"year": 2020}), content_type=media, status=200
    )
    assert res.json == {"id": car_id, **GOLF, "year": 2020}
    assert testapp.get(f"/cars/{car_id}").json["year"] == 2020


def test_patch_with_null_is_rejected(testapp):
    car_id = add(testapp).json["id"]
    res = testapp.patch_json(f"/cars/{car_id}", {"brand": None}, status=422)
    assert error_fields(res) == {"brand"}


def test_every_update_changes_the_etag(testapp):
    res = add(testapp)
    car_id, tags = res.json["id"], {res.headers["ETag"]}
    for _ in range(3):
        tags.add(testapp.patch_json(f"/cars/{car_id}", {}, status=200).headers["ETag"])
    assert len(tags) == 4


# -- Deleting ------------------------------------------------------------------------------------


def test_delete_removes_with_empty_204(testapp):
    car_id = add(testapp).json["id"]
    res = testapp.delete(f"/cars/{car_id}", status=204)
    assert res.body == b""
    testapp.get(f"/cars/{car_id}", status=404)


def test_deleted_id_is_never_reused(testapp):
    car_id = add(testapp).json["id"]
    testapp.delete(f"/cars/{car_id}", status=204)
    assert add(testapp).json["id"] > car_id


# -- Conditional requests ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_stale_if_match_is_412_and_changes_nothing(testapp, method):
    created = add(testapp)
    car_id, stale = created.json["id"], created.headers["ETag"]
    testapp.patch_json(f"/cars/{car_id}", {"year": 2001}, status=200)
    before = testapp.get(f"/cars/{car_id}")
    headers = {"If-Match": stale}
    if method == "delete":
        res = testapp.delete(f"/cars/{car_id}", headers=headers, status=412)
    else:
        res = getattr(testapp, f"{method}_json")(
            f"/cars/{car_id}", POLO, headers=headers, status=412
        )
    assert_problem(res, 412)
    after = testapp.get(f"/cars/{car_id}")
    assert (after.json, after.headers["ETag"]) == (before.json, before.headers["ETag"])


@pytest.mark.parametrize("method", ["put", "patch"])
@pytest.mark.parametrize("body", [b'{"brand": 42}', b"{", b'{"colour": "red"}'])
def test_stale_if_match_is_412_even_with_an_invalid_body(testapp, method, body):
    created = add(testapp)
    car_id, stale = created.json["id"], created.headers["ETag"]
    testapp.patch_json(f"/cars/{car_id}", {"year": 2001}, status=200)
    res = getattr(testapp, method)(
        f"/cars/{car_id}",
        body,
        content_type="application/json",
        headers={"If-Match": stale},
        status=412,
    )
    assert_problem(res, 412)


@pytest.mark.parametrize("header", ["current", "*", 'W/"x", current'])
def test_matching_if_match_lets_the_write_through(testapp, header):
    created = add(testapp)
    value = header.replace("current", created.headers["ETag"])
    car_id = created.json["id"]
    testapp.put_json(f"/cars/{car_id}", POLO, headers={"If-Match": value}, status=200)


def test_weak_etag_never_matches(testapp):
    created = add(testapp)
    weak = "W/" + created.headers["ETag"]
    testapp.delete(f"/cars/{created.json['id']}", headers={"If-Match": weak}, status=412)


# -- Unknown ids and paths -----------------------------------------------------------------------


def expect_404(testapp, method, url, body):
    """Send method to url (with body for PUT and PATCH) and check the 404 problem."""
    if method in ("put", "patch"):
        res = getattr(testapp, f"{method}_json")(url, body, status=404)
    else:
        res = getattr(testapp, method)(url, status=404)
    assert_problem(res, 404)


@pytest.mark.parametrize("raw_id", ["999999", "0", "-1", "abc", "1.5", "9" * 30, "%D9%A3", "1e3"])
@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
def test_unknown_or_malformed_id_is_404(testapp, method, raw_id):
    expect_404(testapp, method, f"/cars/{raw_id}", GOLF)


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
def test_id_with_leading_zeros_is_404_so_each_car_has_one_url(testapp, method):
    car_id = add(testapp).json["id"]
    expect_404(testapp, method, f"/cars/00{car_id}", POLO)
    assert testapp.get(f"/cars/{car_id}").json == {"id": car_id, **GOLF}


def test_unknown_path_is_404_problem(testapp):
    assert_problem(testapp.get("/trucks", status=404), 404)


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("delete", "/cars", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("post", "/cars/1", {"GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"}),
    ],
)
def test_wrong_method_is_405_with_allow(testapp, method, url, allowed):
    res = getattr(testapp, method)(url, status=405)
    assert_problem(res, 405)
    assert {m.strip() for m in res.headers["Allow"].split(",")} == allowed


# -- Validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"model": "Golf", "year": 2018}, {"brand"}),
        ({**GOLF, "brand": ""}, {"brand"}),
        ({**GOLF, "brand": "   "}, {"brand"}),
        ({**GOLF, "brand": "x" * 65}, {"brand"}),
        ({**GOLF, "brand": " " * 10 + "x" * 60}, {"brand"}),
        ({**GOLF, "brand": "\u0085"}, {"brand"}),
        ({**GOLF, "brand": "\u001fFord"}, {"brand"}),
        ({**GOLF, "brand": 42}, {"brand"}),
        ({**GOLF, "model": ["Golf"]}, {"model"}),
        ({**GOLF, "model": "Go\u0000lf"}, {"model"}),
        ({**GOLF, "year": "2018"}, {"year"}),
        ({**GOLF, "year": 2018.0}, {"year"}),
        ({**GOLF, "year": True}, {"year"}),
        ({**GOLF, "year": 1885}, {"year"}),
        ({**GOLF, "year": NEXT_YEAR + 1}, {"year"}),
        ({**GOLF, "year": 10**30}, {"year"}),
        ({**GOLF, "colour": "red"}, {"colour"}),
        ({**GOLF, "id": 7}, {"id"}),
        ({"brand": 1, "model": None, "year": "x", "extra": 1}, {"brand", "model", "year", "extra"}),
    ],
)
def test_invalid_car_is_422_naming_each_field_and_writes_nothing(testapp, db, body, fields):
    res = testapp.post_json("/cars", body, status=422)
    assert_problem(res, 422)
    assert error_fields(res) == fields
    assert all(error["message"] for error in res.json["errors"])
    assert count(db) == 0


def test_year_bounds_are_inclusive(testapp):
    add(testapp, {**GOLF, "year": 1886})
    add(testapp, {**GOLF, "year": NEXT_YEAR})
    add(testapp, {**GOLF, "brand": "x" * 64, "model": "y"})


def test_lone_surrogate_is_rejected_not_a_crash(testapp, db):
    body = '{"brand": "\\ud800", "model": "Golf", "year": 2018}'
    res = testapp.post("/cars", body, content_type="application/json", status=422)
    assert error_fields(res) == {"brand"}
    assert count(db) == 0


@pytest.mark.parametrize(
    "body",
    [b"{", b"", b'{"brand": NaN}', b"\xff\xfe{}", b"[" * 30_000 + b"]" * 30_000, b"{} {}"],
)
def test_malformed_json_is_400(testapp, db, body):
    res = testapp.post("/cars", body, content_type="application/json", status=400)
    assert_problem(res, 400)
    assert count(db) == 0


@pytest.mark.parametrize("body", [b"[]", b'"car"', b"42", b"null"])
def test_body_that_is_not_an_object_is_422(testapp, body):
    assert_problem(testapp.post("/cars", body, content_type="application/json", status=422), 422)


@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_non_json_content_type_is_415(testapp, db, media):
    res = testapp.post("/cars", json.dumps(GOLF), content_type=media, status=415)
    assert_problem(res, 415)
    assert count(db) == 0


def test_merge_patch_type_is_only_for_patch(testapp):
    body = json.dumps(GOLF)
    testapp.post("/cars", body, content_type="application/merge-patch+json", status=415)


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", '"utf-8"'])
def test_json_with_utf8_charset_parameter_is_accepted(testapp, charset):
    media = f"application/json; charset={charset}"
    testapp.post("/cars", json.dumps(GOLF), content_type=media, status=201)


@pytest.mark.parametrize("charset", ["latin-1", "ISO-8859-1", "utf-16", "utf8", ""])
def test_json_with_another_charset_is_415_and_writes_nothing(testapp, db, charset):
    media = f"application/json; charset={charset}"
    res = testapp.post("/cars", json.dumps(GOLF), content_type=media, status=415)
    assert_problem(res, 415)
    assert count(db) == 0


def test_body_over_64_kib_is_413(testapp, db):
    body = json.dumps({**GOLF, "pad": "x" * 70_000})
    assert_problem(testapp.post("/cars", body, content_type="application/json", status=413), 413)
    assert count(db) == 0


# -- Authentication ------------------------------------------------------------------------------


def test_writes_without_token_are_401_with_challenge(testapp, db, api_token):
    res = testapp.post_json("/cars", GOLF, status=401)
    assert_problem(res, 401)
    assert res.headers["WWW-Authenticate"].startswith("Bearer")
    assert count(db) == 0


@pytest.mark.parametrize(
    "header", ["Bearer wrong", "Basic dGVzdA==", "Bearer", "test-token-for-writes"]
)
def test_writes_with_a_bad_token_are_401(testapp, api_token, header):
    testapp.post_json("/cars", GOLF, headers={"Authorization": header}, status=401)


def test_every_write_needs_the_token(testapp, api_token):
    auth = {"Authorization": f"Bearer {api_token}"}
    car_id = add(testapp, headers=auth).json["id"]
    testapp.put_json(f"/cars/{car_id}", POLO, status=401)
    testapp.patch_json(f"/cars/{car_id}", {"year": 2000}, status=401)
    testapp.delete(f"/cars/{car_id}", status=401)
    testapp.put_json(f"/cars/{car_id}", POLO, headers=auth, status=200)
    testapp.delete(f"/cars/{car_id}", headers=auth, status=204)


def test_reads_stay_public_with_a_token_set(testapp, api_token):
    testapp.get("/cars", status=200)
    testapp.get("/health", status=200)


# -- Operations ----------------------------------------------------------------------------------


def test_health_is_ok(testapp):
    assert testapp.get("/health", status=200).json == {"status": "ok"}


def test_ready_when_the_database_answers(testapp):
    assert testapp.get("/ready", status=200).json == {"status": "ready"}


def test_request_id_is_echoed(testapp):
    res = testapp.get("/health", headers={"X-Request-Id": "abc-123"})
    assert res.headers["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize("given", [None, "", "x" * 200, "bad\u00e9id"])
def test_request_id_is_generated_when_missing_or_unusable(testapp, given):
    headers = {} if given is None else {"X-Request-Id": given.encode().decode("latin-1")}
    res = testapp.get("/cars", headers=headers)
    assert res.headers["X-Request-Id"] not in ("", given)
    assert len(res.headers["X-Request-Id"]) == 32


def test_openapi_describes_every_route(testapp, app):
    doc = testapp.get("/openapi.json", status=200).json
    assert doc["openapi"].startswith("3.1")
    routes = {(r.method, r.rule.replace("<raw_id>", "{id}")) for r in app.routes}
    documented = {
        (m.upper(), path) for path, ops in doc["paths"].items() for m in ops if m != "parameters"
    }
    assert routes == documented


def test_openapi_attaches_the_bearer_scheme_to_every_write_and_to_no_read(testapp):
    doc = testapp.get("/openapi.json", status=200).json
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert "security" not in doc  # no default: each operation says
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            if method.upper() in cars.WRITE_METHODS:
                assert operation["security"] == [{"bearer": []}], (method, path)
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
            else:
                assert operation["security"] == [], (method, path)
