#!/usr/bin/env bash
# Entrypoint of the MariaDB stand-in (mariadb.Dockerfile): on the first start of a data volume,
# create MYSQL_DATABASE and MYSQL_USER (with MYSQL_PASSWORD, owner of that database) as the
# mysql image does; root gets no password and logs in through the container's socket only.
# Then serve on port 3306 in the foreground, as PID 1.
set -euo pipefail

usage() {
  echo "usage: mariadb-entrypoint.sh   (no arguments; settings: MYSQL_DATABASE, MYSQL_USER, MYSQL_PASSWORD)" >&2
}

datadir=/var/lib/mysql

say() { echo "mariadb-entrypoint: $*" >&2; }

# sql_string TEXT: TEXT as a single-quoted SQL string literal.
sql_string() {
  local text=${1//\\/\\\\}
  printf "'%s'" "${text//\'/\'\'}"
}

initialise() {
  local database=${MYSQL_DATABASE:-cars}
  : "${MYSQL_USER:?MYSQL_USER is required}" "${MYSQL_PASSWORD:?MYSQL_PASSWORD is required}"
  [[ $database =~ ^[A-Za-z0-9_]+$ ]] || { say "MYSQL_DATABASE must be letters, digits and _"; exit 2; }
  say "initialising $datadir: database $database, user $MYSQL_USER"
  mariadb-install-db --datadir="$datadir" --auth-root-authentication-method=socket \
    --skip-test-db >/dev/null
  # Bootstrap mode: the server reads the statements on stdin without any login, then exits
  # (FLUSH PRIVILEGES first: it starts without the grant tables, which CREATE USER needs).
  mariadbd --bootstrap --datadir="$datadir" --log-warnings=0 <<SQL
FLUSH PRIVILEGES;
CREATE DATABASE \`$database\` CHARACTER SET utf8mb4;
CREATE USER $(sql_string "$MYSQL_USER")@'%' IDENTIFIED BY $(sql_string "$MYSQL_PASSWORD");
GRANT ALL ON \`$database\`.* TO $(sql_string "$MYSQL_USER")@'%';
SQL
}

if [[ $# -gt 0 ]]; then
  usage
  exit 2
fi
[[ -d $datadir/mysql ]] || initialise
exec mariadbd --datadir="$datadir" --bind-address=0.0.0.0 --port=3306
