#!/usr/bin/env bash
# Start (up) or stop (down) the local compose stack of docker-compose.yaml, MySQL and the API, on
# Docker or Podman; up writes .env with random secrets when there is none and returns only once
# the API answers /ready.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: scripts/compose.sh up|down     (or: make up / make down [CONTAINER=podman] [PORT=8080])
  up    write .env from .env.example with a random API token and MySQL password when there is
        no .env (an existing one is never changed), build the API image, start MySQL and the
        API, and wait until http://127.0.0.1:$PORT/ready answers 200 (at most UP_TIMEOUT s).
  down  stop and remove the containers; the data volume is kept, so the next up serves the
        same cars (delete it with: <compose> down --volumes).
Settings come from the environment:
  CONTAINER       docker (default) or podman, or a path to either. The compose tool is the
                  first that works of: docker compose (the plugin, with a running engine),
                  podman compose (Podman 4.7 and newer, with a provider), podman-compose.
                  Without a working `docker compose`, podman is tried.
  PODMAN_COMPOSE  the podman-compose to run (default: podman-compose on PATH, else
                  .venv/compose/bin/podman-compose, which `make compose-tool` installs)
  PORT            host port of the API, on 127.0.0.1 only (default 8080)
  UP_TIMEOUT      seconds up waits for /ready (default 300: a first MySQL start takes a while)
  PYTHON_IMAGE    the Dockerfile's base image (default: its pinned python:3.13-slim-trixie)
  MYSQL_IMAGE     the database image (default: the pinned docker.io/library/mysql:8.4.8)
Needs curl.
USAGE
}

say() { echo "compose: $*" >&2; }
die() {
  echo "compose: error: $*" >&2
  exit 1
}

env_file=.env
env_template=.env.example
api_token_min=32
env_tmp=''
# The secrets' scratch file is not git-ignored as .env is: it never outlives the script.
trap 'rm -f "$env_tmp"' EXIT

# A random secret: N bytes as 2N lowercase hex characters.
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# env_value NAME: NAME's value in .env (empty when absent).
env_value() { sed -n "s/^$1=//p" "$env_file" | tail -n 1; }

# Writes .env from the template with fresh secrets, unless a .env exists: that one is never
# touched. The file is made aside and linked into place, which fails if .env appeared meanwhile.
write_env() {
  [[ -e $env_file ]] && return
  [[ -f $env_template ]] || die "$env_template is missing: it is the template of $env_file"
  env_tmp=$(umask 077 && mktemp .env.XXXXXX)
  sed -e "s/^API_TOKEN=\$/API_TOKEN=$(random_hex 32)/" \
    -e "s/^MYSQL_PASSWORD=\$/MYSQL_PASSWORD=$(random_hex 24)/" "$env_template" >"$env_tmp"
  if ! grep -Eq '^API_TOKEN=[0-9a-f]{64}$' "$env_tmp" ||
    ! grep -Eq '^MYSQL_PASSWORD=[0-9a-f]{48}$' "$env_tmp"; then
    die "$env_template must hold the empty lines API_TOKEN= and MYSQL_PASSWORD= to fill in"
  fi
  if ln "$env_tmp" "$env_file" 2>/dev/null; then
    say "wrote $env_file with a random API token and MySQL password (git ignores it; keep it:" \
      "the data volume only opens with that password)"
  fi
  rm -f "$env_tmp"
}

# Fails, saying what to do, when .env lacks a secret that the compose file needs. A variable set
# in the environment wins over .env, as compose itself has it.
check_env() {
  local token=${API_TOKEN:-$(env_value API_TOKEN)}
  local password=${MYSQL_PASSWORD:-$(env_value MYSQL_PASSWORD)}
  local fix="set it in $env_file, or move $env_file away and run make up again to write a new one"
  ((${#token} >= api_token_min)) ||
    die "API_TOKEN in $env_file is empty or shorter than $api_token_min characters: $fix" \
      "(openssl rand -hex 32 makes one)"
  [[ -n $password ]] || die "MYSQL_PASSWORD in $env_file is empty: $fix"
}

is_podman() { [[ $("$1" --version 2>/dev/null) == *[Pp]odman* ]]; }

# Sets compose=(the command that runs compose) and engine, following CONTAINER and what works.
pick_compose() {
  engine=${CONTAINER:-docker}
  if ! is_podman "$engine"; then
    if command -v "$engine" >/dev/null && "$engine" compose version >/dev/null 2>&1 &&
      "$engine" info >/dev/null 2>&1; then
      compose=("$engine" compose)
      return
    fi
    command -v podman >/dev/null ||
      die "no working '$engine compose' (it needs the compose plugin and a running engine)" \
        "and no podman: install Docker with its compose plugin, or Podman and podman-compose"
    say "no working '$engine compose' (the compose plugin, or a running engine, is missing):" \
      "using podman"
    engine=podman
  fi
  engine=$(command -v "$engine") || die "container engine '$engine' not found"
  if "$engine" compose version >/dev/null 2>&1; then
    compose=("$engine" compose)
    return
  fi
  local tool=${PODMAN_COMPOSE:-}
  if [[ -z $tool ]]; then
    tool=$(command -v podman-compose) || tool=.venv/compose/bin/podman-compose
  fi
  [[ -x $tool ]] || command -v "$tool" >/dev/null ||
    die "Podman has no 'compose' command here and podman-compose is not installed: install it" \
      "(your distribution's podman-compose package, or pip install podman-compose), or run" \
      "make compose-tool, which installs it into .venv/compose"
  compose=("$tool" --podman-path "$engine")
}

# Polls /ready until it answers 200; on timeout shows the end of the logs and says where to look.
wait_ready() {
  local url="http://127.0.0.1:${PORT:-8080}/ready" timeout=${UP_TIMEOUT:-300}
  local deadline=$((SECONDS + timeout))
  say "waiting for $url (at most $timeout s)"
  until curl --silent --fail --noproxy '*' --max-time 2 --output /dev/null "$url"; do
    if ((SECONDS >= deadline)); then
      "${compose[@]}" logs --tail 20 >&2 2>&1 || true
      die "the API did not answer $url within $timeout s. The logs: ${compose[*]} logs" \
        "(the last lines are above); stop the stack with: make down"
    fi
    sleep 1
  done
  say "up: the API answers on http://127.0.0.1:${PORT:-8080} (stop it with make down; the data is kept)"
  say "writes need the token from $env_file: TOKEN=\$(grep ^API_TOKEN= $env_file | cut -d= -f2)"
}

up() {
  command -v curl >/dev/null || die "curl is needed to wait for the API"
  [[ ${PORT:-8080} =~ ^[0-9]+$ ]] || die "PORT must be a port number, got '$PORT'"
  write_env
  check_env
  pick_compose
  say "starting MySQL and the API with: ${compose[*]}"
  "${compose[@]}" up --build --detach || die "${compose[*]} up failed (see above)"
  wait_ready
}

down() {
  pick_compose
  # Compose interpolates the whole file even to stop the stack, and the file requires the
  # secrets. Without a .env, stand-ins satisfy it: down creates nothing that could receive them.
  if [[ ! -e $env_file ]]; then
    export MYSQL_USER=${MYSQL_USER:-none} MYSQL_PASSWORD=${MYSQL_PASSWORD:-none} \
      API_TOKEN=${API_TOKEN:-none}
  fi
  "${compose[@]}" down || die "${compose[*]} down failed (see above)"
  say "down: containers removed; the data volume is kept (make up serves the same cars)"
}

main() {
  [[ $# -eq 1 ]] || { usage; exit 2; }
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  # podman builds OCI images by default, which drop the Dockerfile's HEALTHCHECK; docker keeps it.
  export BUILDAH_FORMAT=docker
  case $1 in
    up) up ;;
    down) down ;;
    -h | --help) usage ;;
    *) usage; exit 2 ;;
  esac
}

main "$@"
