#!/usr/bin/env bash
# Build the image and prove it works as ECS runs it: fast health, walk-through, non-root, fast stop.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: scripts/image-test.sh     (or: make image-test [CONTAINER=podman])
Builds the image with scripts/image.sh (same settings: SHA, IMAGE, CONTAINER, PYTHON_IMAGE),
then runs it and checks: /health answers within 2 s of `start`; the seed's curl walk-through
(create, list, replace, read, delete; the write token enforced) works over HTTP; the process is
not root; `stop` returns in under 3 s with exit code 0; the logs are JSON and hold no token; the
image holds no compiler, no C headers, no pip, no test tools and no .git; its SBOM (in the
image, in dist/sbom.cdx.json and in its label) agrees and matches requirements.txt. Prints
image size, start-to-ready and stop.
It does this with the embedded store, then again against MySQL (read-only root file system)
when one is reachable from a host-network container: MYSQL_HOST (default 127.0.0.1),
MYSQL_PORT (3306), MYSQL_USER (root), MYSQL_PASSWORD (empty). A throwaway database is created
there and dropped afterwards. Without a reachable MySQL that part is skipped, saying so, except
with CI=true: then it fails. Needs bash 5, GNU coreutils, curl and jq. Always removes its
containers.
USAGE
}

READY_LIMIT_MS=2000
sbom_file=dist/sbom.cdx.json
sbom_in_image=/usr/share/doc/cars-api/sbom.cdx.json
STOP_LIMIT_MS=3000
WAIT_LIMIT_MS=15000

case "${1:-}" in
  '') ;;
  -h | --help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "image-test: $*" >&2; }
fail() {
  echo "image-test: FAIL: $*" >&2
  exit 1
}
now_ms() {
  local t=${EPOCHREALTIME/[.,]/}
  echo $((t / 1000))
}

engine=${CONTAINER:-docker}
if ! command -v "$engine" >/dev/null || ! "$engine" --version >/dev/null 2>&1; then
  fail "no usable container engine '$engine': THE IMAGE WAS NOT BUILT OR TESTED" \
    "(install docker or podman, or set CONTAINER)"
fi
for tool in curl jq timeout; do
  command -v "$tool" >/dev/null || fail "$tool is needed on the host"
done
podman=false
[[ $("$engine" --version) == *[Pp]odman* ]] && podman=true

mysql_host=${MYSQL_HOST:-127.0.0.1}
mysql_port=${MYSQL_PORT:-3306}
export MYSQL_USER=${MYSQL_USER:-root} MYSQL_PASSWORD=${MYSQL_PASSWORD:-}
# A fresh random token per run: the test proves it is enforced and never logged; it guards nothing.
API_TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
export API_TOKEN

work=$(mktemp -d)
containers=()
database=''
ref=''

# Runs a Python snippet inside the image on the host network (MySQL probe and clean-up).
in_image_python() {
  timeout 60 "$engine" run --rm --network host \
    -e MYSQL_HOST="$mysql_host" -e MYSQL_PORT="$mysql_port" -e MYSQL_USER -e MYSQL_PASSWORD \
    -e DATABASE="$database" --entrypoint python "$ref" -c "$1"
}

sql_connect='import os, pymysql
conn = pymysql.connect(host=os.environ["MYSQL_HOST"], port=int(os.environ["MYSQL_PORT"]),
    user=os.environ["MYSQL_USER"], password=os.environ["MYSQL_PASSWORD"], connect_timeout=3)'
sql_drop="$sql_connect
conn.cursor().execute('DROP DATABASE IF EXISTS \`' + os.environ['DATABASE'] + '\`')"

cleanup() {
  local name
  for name in "${containers[@]}"; do
    timeout 30 "$engine" rm --force "$name" >/dev/null 2>&1 || true
  done
  if [[ -n $database ]] && ! in_image_python "$sql_drop" >/dev/null 2>&1; then
    say "could not drop the throwaway database $database on $mysql_host:$mysql_port; drop it"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# request METHOD URL [JSON] [curl options...]: sets $status; body and headers go to $work.
request() {
  local method=$1 url=$2 data=${3:-}
  local args=(--silent --show-error --noproxy '*' --max-time 5 --request "$method"
    --output "$work/body" --dump-header "$work/headers" --write-out '%{http_code}')
  [[ -n $data ]] && args+=(--header 'Content-Type: application/json' --data "$data")
  status=$(curl "${args[@]}" "${@:4}" "$url") || fail "$method $url: no HTTP answer"
}

expect() {
  [[ $status == "$1" ]] ||
    fail "$2: HTTP $status, expected $1; body: $(head -c 500 "$work/body")"
}

header() { sed -n "s/^$1: *//Ip" "$work/headers" | tr -d '\r' | tail -n 1; }

# expect_car BRAND MODEL YEAR: the body is that car, with a numeric id.
expect_car() {
  jq -e --arg brand "$1" --arg model "$2" --argjson year "$3" \
    '.brand == $brand and .model == $model and .year == $year and (.id | type == "number")' \
    "$work/body" >/dev/null || fail "unexpected car: $(head -c 500 "$work/body")"
}

# start NAME OPTIONS...: creates the container without capabilities (untimed, like the pull and
# create on ECS), then starts it; sets $started_ms to the moment `start` was called.
start() {
  local name=$1
  containers+=("$name")
  timeout 60 "$engine" create --name "$name" --health-interval 1s \
    --cap-drop ALL --security-opt no-new-privileges "${@:2}" "$ref" \
    >/dev/null 2>"$work/run.err" || fail "could not create $name: $(cat "$work/run.err")"
  started_ms=$(now_ms)
  timeout 60 "$engine" start "$name" >/dev/null 2>"$work/run.err" ||
    fail "could not start $name: $(cat "$work/run.err")"
}

# wait_ready NAME BASE_URL: polls /health until it answers; sets $ready_ms (from `start`).
wait_ready() {
  local name=$1 base=$2
  until curl --silent --fail --noproxy '*' --max-time 1 --output "$work/body" "$base/health"; do
    if (($(now_ms) - started_ms > WAIT_LIMIT_MS)); then
      "$engine" logs "$name" >&2 || true
      fail "$name: /health did not answer within $((WAIT_LIMIT_MS / 1000)) s"
    fi
    sleep 0.05
  done
  ready_ms=$(($(now_ms) - started_ms))
  jq -e '.status == "ok"' "$work/body" >/dev/null || fail "/health said $(cat "$work/body")"
  ((ready_ms <= READY_LIMIT_MS)) ||
    fail "$name: /health answered after $ready_ms ms, limit $READY_LIMIT_MS ms"
  say "$name: ready in $ready_ms ms"
}

check_non_root() {
  local name=$1 uids uid
  uids=$(timeout 30 "$engine" exec "$name" cat /proc/1/status | sed -n 's/^Uid:[[:space:]]*//p')
  [[ -n $uids ]] || fail "$name: could not read the uid of the server process"
  for uid in $uids; do
    [[ $uid != 0 ]] || fail "$name: the server process runs as root (Uid: $uids)"
  done
  say "$name: server process runs as uid ${uids%%[[:space:]]*}"
}

check_healthy() {
  local name=$1 health deadline=$(($(now_ms) + WAIT_LIMIT_MS))
  while :; do
    # podman schedules HEALTHCHECK with systemd timers; without systemd, run it on demand.
    if $podman; then timeout 30 "$engine" healthcheck run "$name" >/dev/null 2>&1 || true; fi
    health=$("$engine" inspect --format '{{.State.Health.Status}}' "$name" 2>/dev/null || true)
    [[ $health == healthy ]] && break
    (($(now_ms) < deadline)) || fail "$name: HEALTHCHECK status is '$health', not healthy"
    sleep 0.5
  done
  say "$name: HEALTHCHECK reports healthy"
}

# The seed's curl walk-through, with the write token enforced.
walk_through() {
  local base=$1 auth="Authorization: Bearer $API_TOKEN" first second
  local golf='{"brand": "Volkswagen", "model": "Golf", "year": 2018}'
  request POST "$base/cars" "$golf"
  expect 401 'POST /cars without the token'
  [[ $(header Content-Type) == application/problem+json* ]] || fail 'a 401 is not problem+json'

  request POST "$base/cars" "$golf" --header "$auth"
  expect 201 'POST /cars'
  expect_car Volkswagen Golf 2018
  first=$(jq -r .id "$work/body")
  [[ $(header Location) == */cars/"$first" ]] ||
    fail "Location is '$(header Location)', not /cars/$first"

  request POST "$base/cars" '{"brand": "Volkswagen", "model": "T-cross", "year": 2021}' \
    --header "$auth"
  expect 201 'POST /cars (second)'
  second=$(jq -r .id "$work/body")

  request GET "$base/cars"
  expect 200 'GET /cars'
  jq -e --argjson a "$first" --argjson b "$second" 'any(.[]; .id == $a) and any(.[]; .id == $b)' \
    "$work/body" >/dev/null || fail "GET /cars does not list cars $first and $second"

  request PUT "$base/cars/$first" '{"brand": "Volkswagen", "model": "Polo", "year": 2019}' \
    --header "$auth"
  expect 200 "PUT /cars/$first"
  expect_car Volkswagen Polo 2019

  request GET "$base/cars/$first"
  expect 200 "GET /cars/$first"
  expect_car Volkswagen Polo 2019

  request DELETE "$base/cars/$second" '' --header "$auth"
  expect 204 "DELETE /cars/$second"
  request GET "$base/cars/$second"
  expect 404 "GET /cars/$second after DELETE"

  request GET "$base/ready"
  expect 200 'GET /ready'
  say "walk-through passed at $base"
}

check_logs() {
  local name=$1
  "$engine" logs "$name" >"$work/stdout" 2>"$work/stderr" || fail "$name: could not read the logs"
  if grep -qF "$API_TOKEN" "$work/stdout" "$work/stderr"; then
    fail "$name: the API token appears in the logs"
  fi
  jq -e -s 'all(type == "object") and any(.path == "/cars")' "$work/stdout" >/dev/null 2>&1 ||
    fail "$name: stdout is not JSON lines with one per request: $(head -c 500 "$work/stdout")"
}

# check_stop NAME: `stop` must return within the limit and the server must have exited 0.
check_stop() {
  local name=$1 begin code
  begin=$(now_ms)
  timeout 60 "$engine" stop --time 10 "$name" >/dev/null 2>"$work/stop.err" ||
    fail "$name: stop failed: $(cat "$work/stop.err")"
  stop_ms=$(($(now_ms) - begin))
  code=$("$engine" inspect --format '{{.State.ExitCode}}' "$name")
  if [[ $code != 0 ]]; then
    "$engine" logs "$name" >&2 || true
    fail "$name: exit code $code after SIGTERM, expected 0"
  fi
  ((stop_ms < STOP_LIMIT_MS)) || fail "$name: stop took $stop_ms ms, limit $STOP_LIMIT_MS ms"
  say "$name: stopped in $stop_ms ms, exit code $code"
}

# Runs in the image as root, to see every file: no build tools or C headers, no pip, no test
# tools, no .git; prints the SBOM's digest, then lists /app.
contents_probe=$(
  cat <<'PROBE'
set -eu
for tool in gcc cc c++ g++ clang make ld as pip pip3; do
  if command -v "$tool" >/dev/null; then echo "build tool or pip in the image: $tool" >&2; exit 1; fi
done
found=$(find / -xdev \( -name Python.h -o -name pip -o -name 'pip-*.dist-info' -o -name ensurepip \) \
  -print 2>/dev/null | head -n 1)
if [ -n "$found" ]; then echo "C headers, pip or ensurepip in the image: $found" >&2; exit 1; fi
if python -c 'import importlib.util as u, sys
sys.exit(not any(u.find_spec(m) for m in ("pytest", "pytest_mock", "webtest", "pip")))'; then
  echo "test dependencies or pip in the image" >&2; exit 1
fi
git=$(find / -xdev -name .git -print 2>/dev/null | head -n 1)
if [ -n "$git" ]; then echo "a .git in the image: $git" >&2; exit 1; fi
sha256sum "$SBOM_PATH" | cut -d ' ' -f 1
ls -A /app
PROBE
)

# check_sbom IN_IMAGE_SHA256: the SBOM in the image, the one beside the build and the label
# agree, and it lists the venv's packages at exactly the versions requirements.txt locks.
check_sbom() {
  local in_image=$1 label file_sha component pin
  label=$("$engine" image inspect --format '{{index .Config.Labels "cars-api.sbom.digest"}}' "$ref")
  [[ -f $sbom_file ]] || fail "no SBOM at $sbom_file"
  file_sha=sha256:$(sha256sum "$sbom_file" | cut -d ' ' -f 1)
  [[ $label == "$file_sha" && $label == "sha256:$in_image" ]] ||
    fail "SBOM digests differ: label '$label', $sbom_file $file_sha, in the image sha256:$in_image"
  jq -e '.bomFormat == "CycloneDX" and (.components | length > 0)' "$sbom_file" >/dev/null ||
    fail "$sbom_file is not a CycloneDX SBOM with components"
  for pin in bottle waitress pymysql cryptography; do
    jq -e --arg n "$pin" 'any(.components[]; (.name | ascii_downcase) == $n)' "$sbom_file" \
      >/dev/null || fail "the SBOM does not list $pin"
  done
  while read -r component; do
    pin=$(sed -n "s/^\(${component%%==*}==[^ ;]*\).*/\1/Ip" requirements.txt | head -n 1)
    [[ ${pin,,} == "${component,,}" ]] ||
      fail "the SBOM lists $component, but requirements.txt locks '${pin:-nothing}'"
  done < <(jq -r '.components[] | "\(.name | gsub("[_.]"; "-"))==\(.version)"' "$sbom_file")
  say "SBOM: $sbom_file ($label) matches the image and requirements.txt"
}

check_contents() {
  local user files
  user=$("$engine" image inspect --format '{{.Config.User}}' "$ref")
  [[ ${user%%:*} =~ ^[0-9]+$ && ${user%%:*} != 0 ]] ||
    fail "image USER is '$user', expected a numeric non-root uid"
  "$engine" image inspect --format '{{json .Config.Healthcheck}}' "$ref" |
    jq -e '.Test | join(" ") | test("/health")' >/dev/null ||
    fail 'the image has no HEALTHCHECK on /health (podman builds need --format docker)'
  files=$(timeout 60 "$engine" run --rm --network none --user 0 -e SBOM_PATH="$sbom_in_image" \
    --entrypoint sh "$ref" -c "$contents_probe" 2>"$work/contents.err") ||
    fail "image contents: $(cat "$work/contents.err")"
  sbom_sha=${files%%$'\n'*}
  files=${files#*$'\n'}
  files=${files//$'\n'/ }
  [[ $files == 'cars.py data' ]] || fail "/app holds '$files', expected only cars.py and data"
  say "contents: numeric user $user, HEALTHCHECK on /health, no compiler, no C headers, no pip," \
    "no test tools, no .git"
  check_sbom "$sbom_sha"
}

# A free TCP port on the host (published port, or the listening port of the host-network run),
# taken below the ephemeral range so that no client connection can be holding it.
free_port() {
  local port low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  for _ in $(seq 50); do
    port=$((10000 + RANDOM % (low - 10000)))
    if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
  done
  fail 'no free port found'
}

ref=$(scripts/image.sh | tail -n 1) || fail 'the image did not build (see above)'
[[ -n $ref ]] || fail 'the build printed no image reference'
size=$("$engine" image inspect --format '{{.Size}}' "$ref")
check_contents

say '--- embedded store (SQLite) ---'
name=cars-api-test-$$-store
port=$(free_port)
start "$name" --publish "127.0.0.1:$port:8080" -e API_TOKEN
wait_ready "$name" "http://127.0.0.1:$port"
store_ready_ms=$ready_ms
check_non_root "$name"
check_healthy "$name"
walk_through "http://127.0.0.1:$port"
check_logs "$name"
check_stop "$name"
store_stop_ms=$stop_ms

say '--- MySQL ---'
mysql_result=skipped
if in_image_python "$sql_connect" >/dev/null 2>"$work/probe.err"; then
  database=cars_image_test_$$_$RANDOM
  name=cars-api-test-$$-mysql
  port=$(free_port)
  # With MySQL nothing in the image is written: prove it runs on a read-only root file system.
  start "$name" --network host --read-only -e HOST=127.0.0.1 -e PORT="$port" -e API_TOKEN \
    -e MYSQL_HOST="$mysql_host" -e MYSQL_PORT="$mysql_port" -e MYSQL_USER -e MYSQL_PASSWORD \
    -e MYSQL_DATABASE="$database"
  wait_ready "$name" "http://127.0.0.1:$port"
  check_non_root "$name"
  walk_through "http://127.0.0.1:$port"
  check_logs "$name"
  check_stop "$name"
  mysql_result="passed (ready $ready_ms ms, stop $stop_ms ms, on $mysql_host:$mysql_port)"
elif [[ ${CI:-} == true ]]; then
  fail "CI=true but no MySQL is reachable at $mysql_host:$mysql_port from the container:" \
    "$(tail -n 1 "$work/probe.err")"
else
  mysql_result="SKIPPED: no MySQL at $mysql_host:$mysql_port reachable from the container"
  say "$mysql_result ($(tail -n 1 "$work/probe.err"))"
fi

cat <<SUMMARY
image-test: PASSED $ref
  image size:     $((size / 1000000)) MB ($size bytes)
  SBOM:           $sbom_file
  start to ready: $store_ready_ms ms, \`start\` to the first 200 on /health (limit $READY_LIMIT_MS)
  stop:           $store_stop_ms ms after SIGTERM, exit code 0 (limit $STOP_LIMIT_MS)
  MySQL run:      $mysql_result
SUMMARY
