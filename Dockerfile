# cars-api image: the API on Waitress, as ECS runs it. `make image` builds it, `make image-test`
# proves it. PYTHON_IMAGE picks the base: an official slim image pinned to a minor version, or a
# local copy of one where no registry is reachable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Builder: a virtualenv with exactly the pinned runtime requirements, from wheels only (no
# compiler anywhere); pip and setuptools leave the venv once they have done their job.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
  && /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
    -r /tmp/requirements.txt \
  && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

# Final: the base, the venv and cars.py; nothing else.
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    SQLITE_PATH=/app/data/cars.db
WORKDIR /app
# Slim bases ship the standard library without bytecode, and the non-root user cannot cache it, so
# every start would compile it again (about 0.35 s measured): compile it once, here, skipping
# what CPython's own install skips.
RUN python -m compileall -q -j 0 -x 'bad_coding|badsyntax|site-packages|lib2to3/tests/data' \
    "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
# The embedded store (used only when MYSQL_HOST is unset) needs a directory the app may write;
# with MySQL nothing is written, so the root file system can be read-only.
RUN install -d -o 10001 -g 10001 -m 0750 /app/data
COPY --from=builder /opt/venv /opt/venv
COPY cars.py ./
# Numeric, so that orchestrators can verify "not root" without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# Standard library only (no curl in the image), and no proxy: the check is local.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as r; \
r.build_opener(r.ProxyHandler({})).open( \
'http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health', timeout=2)"]
# Exec form: python is PID 1 and gets SIGTERM itself; cars.py finishes in-flight requests and
# exits 0 within a second, long before the engine's kill timeout.
CMD ["python", "cars.py"]
