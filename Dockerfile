# cars-api image: the API on Waitress, as ECS runs it. `make image` builds it, `make image-test`
# proves it. PYTHON_IMAGE picks the base: by default the official slim image named in the
# `upstream` stage below, or a local copy of one where no registry is reachable.
ARG PYTHON_IMAGE=upstream

# Named in a FROM line of its own so that Dependabot sees the base and proposes its updates
# (it does not read build arguments); skipped when PYTHON_IMAGE names another base.
FROM docker.io/library/python:3.13-slim-trixie@sha256:ffb752e139c0a19692a43af8d8523b274222dd68eebad5d583b45c2201c6e30a AS upstream

# Builder: a virtualenv with exactly the locked runtime packages, from wheels whose hashes the
# lock holds (no compiler anywhere); pip leaves the venv once it has done its job. Then the
# CycloneDX SBOM of that venv, written by a pinned tool that never reaches the final image.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt tests/requirements-sbom.txt /tmp/
RUN python -m venv /opt/venv \
  && /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
    -r /tmp/requirements.txt \
  && /opt/venv/bin/pip uninstall --yes --quiet pip
# --output-reproducible: no serial number or timestamp, so the same venv gives the same file.
RUN python -m venv /opt/sbom-tool \
  && /opt/sbom-tool/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
    -r /tmp/requirements-sbom.txt \
  && mkdir /opt/sbom \
  && /opt/sbom-tool/bin/cyclonedx-py environment --output-reproducible --output-format JSON \
    --output-file /opt/sbom/sbom.cdx.json /opt/venv

# The SBOM alone: scripts/image.sh copies it out next to the build output before building the
# final image, which carries the file and a label with its digest.
FROM scratch AS sbom
COPY --from=builder /opt/sbom/sbom.cdx.json /

# Runtime: the base minus everything the service never uses, plus the venv and cars.py.
FROM ${PYTHON_IMAGE} AS runtime
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
# pip and the wheels venv/ensurepip would install, IDLE, Tk, pydoc and the C headers and build
# configuration: removed here, and absent from the final image because that one is a copy of
# this file system, not a layer on top of the base. On a Debian-packaged Python (the local
# stand-in base) they are packages, purged through dpkg so that scanners see what is there.
RUN if command -v dpkg-query >/dev/null; then \
    dpkg-query -W -f '${Package}\n' \
      | { grep -E '^python3(\.[0-9]+)?-(pip|pip-whl|setuptools|setuptools-whl|venv|wheel)$' || true; } \
      | xargs --no-run-if-empty dpkg --purge >/dev/null; \
  fi \
  && stdlib=$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))') \
  && purelib=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
  && rm -rf "$stdlib"/{ensurepip,idlelib,tkinter,turtledemo,pydoc_data} "$stdlib"/config-* \
    "$purelib"/pip "$purelib"/pip-*.dist-info \
    /usr/local/bin/{pip,pip3,idle,pydoc}* /usr/local/include /usr/local/lib/pkgconfig \
  && if python -c 'import pip' 2>/dev/null; then echo 'pip is still importable' >&2; exit 1; fi
# Slim bases ship the standard library without bytecode, and the non-root user cannot cache it, so
# every start would compile it again (about 0.35 s measured): compile it once, here, skipping
# what CPython's own install skips.
RUN python -m compileall -q -j 0 -x 'bad_coding|badsyntax|site-packages|lib2to3/tests/data' \
    "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
COPY --from=builder /opt/venv /opt/venv
COPY --from=sbom /sbom.cdx.json /usr/share/doc/cars-api/sbom.cdx.json
COPY cars.py /app/

# Final: one layer holding the runtime stage's file system, so nothing removed above ships in
# a lower layer. The base's environment does not come along: what cars.py needs is set here.
FROM scratch
# hadolint ignore=DL3067 # the whole trimmed file system, on purpose: one layer, no leftovers below
COPY --from=runtime / /
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    SQLITE_PATH=/app/data/cars.db
WORKDIR /app
# The embedded store (used only when MYSQL_HOST is unset) needs a directory the app may write;
# with MySQL nothing is written, so the root file system can be read-only.
RUN install -d -o 10001 -g 10001 -m 0750 /app/data
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
