#!/usr/bin/env bash
# Resolve every requirements input into a lock file with a hash for every package, or check
# that each lock file still is what its input resolves to.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: scripts/lock.sh [--check]     (or: make lock [UPGRADE=1]; make lint runs --check)
Inputs and the lock files made from them (universal: any OS, Python 3.11 and newer):
  tests/requirements-runtime.in  ->  requirements.txt   (the image and every venv)
  tests/requirements<NAME>.in    ->  tests/requirements<NAME>.txt
Without --check, writes the lock files, keeping every version already locked that still fits
its input (UPGRADE=1: the newest that fit instead). With --check, changes nothing and fails,
naming the file, when a lock file differs from what its input resolves to, or when a
requirements file has no input. Both ask the package index. UV: the uv to run (default
.venv/lock/bin/uv, which `make lock` installs).
USAGE
}

die() {
  echo "lock: $*" >&2
  exit 1
}

check=false
case "${1:-}" in
  '') ;;
  --check) check=true ;;
  -h | --help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac
[[ $# -le 1 ]] || { usage; exit 2; }
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shopt -s nullglob

uv=${UV:-.venv/lock/bin/uv}
[[ -x $uv ]] || die "$uv not found: run make lock (it installs uv), or set UV"

# lock_of INPUT: the lock file made from INPUT.
lock_of() {
  if [[ $1 == tests/requirements-runtime.in ]]; then
    echo requirements.txt
  else
    echo "${1%.in}.txt"
  fi
}

# The runtime lock first: the tests' input takes its versions from it (-c ../requirements.txt).
inputs=(tests/requirements-runtime.in)
for input in tests/requirements*.in; do
  [[ $input == tests/requirements-runtime.in ]] || inputs+=("$input")
done

# resolve INPUT OUTPUT [uv options...]: write to OUTPUT what INPUT resolves to, preferring the
# versions its lock holds. The lock's hashes are left behind on purpose: uv would reuse them
# as they are, so every hash is read afresh from the index, and a wrong one cannot survive.
resolve() {
  local lock
  lock=$(lock_of "$1")
  if [[ -f $lock ]]; then
    grep -E '^[a-z0-9]' "$lock" | sed 's/ *\\$//' >"$2" || true
  else
    : >"$2"
  fi
  "$uv" pip compile --quiet --no-config --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command 'make lock' "${@:3}" "$1" --output-file "$2"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! $check; then
  upgrade=()
  [[ -n ${UPGRADE:-} ]] && upgrade=(--upgrade)
  for input in "${inputs[@]}"; do
    echo "lock: $input -> $(lock_of "$input")" >&2
    resolve "$input" "$work/lock.txt" "${upgrade[@]}" || die "could not resolve $input"
    mv "$work/lock.txt" "$(lock_of "$input")"
  done
  exit 0
fi

stale=0
for input in "${inputs[@]}"; do
  lock=$(lock_of "$input")
  if [[ ! -f $lock ]]; then
    echo "lock: $lock is missing: run make lock" >&2
    stale=1
    continue
  fi
  resolve "$input" "$work/lock.txt" 2>"$work/err" ||
    die "could not resolve $input: $(tail -n 5 "$work/err")"
  if ! diff -u "$lock" "$work/lock.txt" >"$work/diff"; then
    echo "lock: $lock is stale against $input: run make lock; it would change:" >&2
    grep -E '^[-+][^-+]' "$work/diff" | head -n 20 >&2 || true
    stale=1
  fi
done
# A requirements file without an input is installed unlocked (or locked by hand): refuse it.
for file in requirements.txt tests/requirements*.txt; do
  known=false
  for input in "${inputs[@]}"; do
    [[ $(lock_of "$input") == "$file" ]] && known=true
  done
  if ! $known; then
    echo "lock: $file has no input ${file%.txt}.in: move its lines there and run make lock" >&2
    stale=1
  fi
done
((stale == 0)) || exit 1
echo "lock: ${#inputs[@]} lock files match their inputs" >&2
