"""The peers `make bench` measures cars.py against: GET /cars/{id} as Flask and as FastAPI.

Each is what a user of that stack would write for the same read, and no smaller than honest: the
same SELECT on the same table, the same JSON body and ETag, a 404 for a missing car, one database
connection per worker thread (Flask on gunicorn gthread) or a pool of THREADS connections
(FastAPI on uvicorn with aiomysql). No access log, no validation beyond the int path parameter.
scripts/bench.py starts them: gunicorn 'bench_peers:flask_app()' and uvicorn --factory
bench_peers:fastapi_app, with MYSQL_* in the environment as for cars.py.
"""

import os
import threading

SELECT_CAR = "SELECT id, brand, model, year, version FROM cars WHERE id = %s"
NOT_FOUND = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "No such car."}


def mysql_settings():
    """Read the connection settings from the environment cars.py reads."""
    return {
        "host": os.environ.get("MYSQL_HOST", "127.0.0.1"),
        "port": int(os.environ.get("MYSQL_PORT", "3306")),
        "user": os.environ.get("MYSQL_USER", "root"),
        "password": os.environ.get("MYSQL_PASSWORD", ""),
        "db": os.environ.get("MYSQL_DATABASE", "cars"),
        "charset": "utf8mb4",
        "autocommit": True,
    }


def flask_app():
    """Flask with one PyMySQL connection per gunicorn thread."""
    import flask
    import pymysql

    app = flask.Flask(__name__)
    local = threading.local()

    def connection():
        if getattr(local, "conn", None) is None:
            settings = mysql_settings()
            settings["database"] = settings.pop("db")
            local.conn = pymysql.connect(**settings)
        return local.conn

    @app.get("/cars/<int:car_id>")
    def get_car(car_id):
        with connection().cursor() as cur:
            cur.execute(SELECT_CAR, (car_id,))
            row = cur.fetchone()
        if row is None:
            return NOT_FOUND, 404
        car = {"id": row[0], "brand": row[1], "model": row[2], "year": row[3]}
        return car, 200, {"ETag": f'"{row[4]}"'}

    return app


def fastapi_app():
    """FastAPI with an aiomysql pool of THREADS connections."""
    import contextlib

    import aiomysql
    import fastapi

    size = int(os.environ.get("THREADS", "8"))
    pools = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pools.append(await aiomysql.create_pool(minsize=size, maxsize=size, **mysql_settings()))
        yield
        pools[0].close()
        await pools[0].wait_closed()

    app = fastapi.FastAPI(lifespan=lifespan)

    @app.get("/cars/{car_id}")
    async def get_car(car_id: int, response: fastapi.Response):
        async with pools[0].acquire() as conn, conn.cursor() as cur:
            await cur.execute(SELECT_CAR, (car_id,))
            row = await cur.fetchone()
        if row is None:
            return fastapi.responses.JSONResponse(NOT_FOUND, 404)
        response.headers["ETag"] = f'"{row[4]}"'
        return {"id": row[0], "brand": row[1], "model": row[2], "year": row[3]}

    return app
