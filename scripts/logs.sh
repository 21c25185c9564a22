#!/usr/bin/env bash
# logs.sh: print the service's log events (CloudWatch Logs): the newest ones, or those matching a
# filter pattern in a time window, as readable lines.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make logs [FILTER='<filter pattern>'] [SINCE=<n>m|<n>h|<n>d] [LOG_LINES=50] [STREAMS=4]
                 [AWS_REGION=...] [BASE_STACK=...]
       make logs TASK=<task id> [STREAM_PREFIX=migrate|bootstrap|cars-api] [LOG_LINES=...]
With TASK: prints the log of exactly that ECS task (a failed bootstrap or migration names the
command), oldest line first: the stream <prefix>/<container>/<task id> of the log group.
Without FILTER and SINCE: prints the newest LOG_LINES events (time UTC, task id, message) of the
STREAMS most recently written log streams (one per task) of the base stack's log group.
With FILTER or SINCE: prints the newest LOG_LINES events of the last SINCE (default 1h) that match
FILTER (a CloudWatch Logs filter pattern; empty matches all), oldest first, one readable line each:
time UTC, task id, then status, method and path of a request, or level and message of other lines.
  make logs FILTER='{ $.status >= 500 }' SINCE=1h
  make logs FILTER='{ $.level = "ERROR" }' SINCE=2d
  make logs FILTER='{ $.message = "database unavailable" }' SINCE=30m
USAGE
}

# Milliseconds since the epoch, $1 (15m, 1h, 2d) ago.
start_time() {
  [[ "$1" =~ ^([1-9][0-9]{0,4})([mhd])$ ]] \
    || usage_error "SINCE must be a number and a unit m, h or d (15m, 1h, 2d), not '$1'"
  local unit=60
  case ${BASH_REMATCH[2]} in
    h) unit=3600 ;;
    d) unit=86400 ;;
  esac
  echo $((($(date +%s) - BASH_REMATCH[1] * unit) * 1000))
}

# The newest events of the STREAMS latest streams of log group $1 (the view without a filter).
newest() {
  local log_group=$1 lines=$2 streams=$3 names stream
  mkdir -p "$WORK/logs"
  # Newest streams first; --max-items is the CLI's own paging limit (v1 and v2).
  names=$(awsq logs describe-log-streams --log-group-name "$log_group" --order-by LastEventTime \
    --descending --max-items "$streams" --query 'logStreams[].logStreamName' --output text)
  for stream in $names; do
    [[ "$stream" != None ]] || continue
    # Without --start-from-head, GetLogEvents answers the newest events of the stream.
    awsq logs get-log-events --log-group-name "$log_group" --log-stream-name "$stream" \
      --limit "$lines" --output json >"$WORK/logs/${stream##*/}.json"
  done
  if [[ -z "$(ls -A "$WORK/logs")" ]]; then
    say "No log events in $log_group yet (no task has run)."
    return 0
  fi
  state logs "$WORK" "$lines"
}

# The events of log group $1 since $2 (ms; $3 in words) that match filter pattern $4, readable.
matching() {
  local log_group=$1 start=$2 since=$3 pattern=$4 lines=$5 out
  # Up to 10000 matches are read (the CLI follows the pages); the newest LOG_LINES are shown.
  awsq logs filter-log-events --log-group-name "$log_group" --start-time "$start" \
    ${pattern:+--filter-pattern "$pattern"} --max-items 10000 --output json >"$WORK/events.json"
  out=$(state_or_die events "$WORK/events.json" "$lines")
  if [[ -z "$out" ]]; then
    say "No events in $log_group in the last $since${pattern:+ that match $pattern}."
    return 0
  fi
  printf '%s\n' "$out"
}

# The log of one task: every stream of log group $1 that ends in /<task id> $2 (under prefix $3).
task_log() {
  local log_group=$1 task=$2 prefix=$3 lines=$4 stream found=
  mkdir -p "$WORK/logs"
  for stream in $(awsq logs describe-log-streams --log-group-name "$log_group" \
    ${prefix:+--log-stream-name-prefix "$prefix/"} --query 'logStreams[].logStreamName' \
    --output text); do
    [[ "$stream" == */"$task" ]] || continue
    found=$stream
    awsq logs get-log-events --log-group-name "$log_group" --log-stream-name "$stream" \
      --start-from-head --limit "$lines" --output json >"$WORK/logs/${stream##*/}.json"
  done
  if [[ -z "$found" ]]; then
    say "No log stream of task $task${prefix:+ under prefix $prefix} in $log_group (did it start?" \
      "ECS writes one only once its container runs)."
    return 0
  fi
  state logs "$WORK" "$lines"
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  local lines=${LOG_LINES:-50} streams=${STREAMS:-4} filter=${FILTER:-} since=${SINCE:-} start
  local log_group
  [[ "$lines" =~ ^[1-9][0-9]{0,3}$ ]] || usage_error "LOG_LINES must be a number from 1 to 9999"
  [[ "$streams" =~ ^[1-9][0-9]?$ ]] || usage_error "STREAMS must be a number from 1 to 99"
  [[ -z "$filter$since" ]] || start=$(start_time "${since:-1h}")
  [[ -z "${TASK:-}" || "$TASK" =~ ^[A-Za-z0-9]{1,64}$ ]] \
    || usage_error "TASK must be an ECS task id (the last part of its ARN), not '$TASK'"
  [[ "${STREAM_PREFIX:-}" =~ ^[A-Za-z0-9_.-]{0,64}$ ]] \
    || usage_error "STREAM_PREFIX must be a log stream prefix (letters, digits, . _ -)"
  require_tools aws python3
  require_credentials
  load_base
  log_group=$(state_or_die output "$WORK/base.json" "$BASE_STACK" LogGroupName)
  if [[ -n "${TASK:-}" ]]; then
    task_log "$log_group" "$TASK" "${STREAM_PREFIX:-}" "$lines"
  elif [[ -z "$filter$since" ]]; then
    newest "$log_group" "$lines" "$streams"
  else
    matching "$log_group" "$start" "${since:-1h}" "$filter" "$lines"
  fi
}

main "$@"
