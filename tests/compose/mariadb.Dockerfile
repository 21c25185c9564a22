# A MySQL-compatible stand-in for docker.io/library/mysql, built from Debian's MariaDB packages,
# for `make compose-test` where no image registry is reachable (docker-compose.yaml takes it
# through MYSQL_IMAGE). Its entrypoint honours the settings of the mysql image's that the compose
# file uses: MYSQL_DATABASE, MYSQL_USER, MYSQL_PASSWORD, and no usable root password.
# BASE_IMAGE: any Debian 13 image; the test passes the local localhost/python-base:trixie.
ARG BASE_IMAGE=docker.io/library/debian:trixie-slim
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
# Debian's packages of the base's release, whatever their point version: a test fixture, not a
# product. The package's own first database is removed: the entrypoint makes one per volume.
# The mysql user is made first with a fixed id, which the package then keeps, so that USER can
# name it by number.
# hadolint ignore=DL3008 # the release's current MariaDB is the point; Debian pins the rest
RUN groupadd --system --gid 999 mysql \
  && useradd --system --uid 999 --gid mysql --home-dir /nonexistent --shell /usr/sbin/nologin mysql \
  && apt-get update \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    mariadb-server mariadb-client mariadb-client-compat \
  && rm -rf /var/lib/apt/lists/* /var/lib/mysql \
  && install -d -o mysql -g mysql -m 0750 /var/lib/mysql /run/mysqld
COPY mariadb-entrypoint.sh /usr/local/bin/
USER 999:999
EXPOSE 3306
ENTRYPOINT ["/usr/local/bin/mariadb-entrypoint.sh"]
