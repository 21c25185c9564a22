#!/usr/bin/env bash
# logs.sh: print the most recent log events of the service's containers (CloudWatch Logs).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make logs [LOG_LINES=50] [STREAMS=4] [AWS_REGION=...] [BASE_STACK=...]
Prints the newest LOG_LINES events (time UTC, task id, message) of the STREAMS most recently written
log streams (one per task) of the base stack's log group.
USAGE
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  local lines=${LOG_LINES:-50} streams=${STREAMS:-4} log_group names stream
  [[ "$lines" =~ ^[1-9][0-9]{0,3}$ ]] || usage_error "LOG_LINES must be a number from 1 to 9999"
  [[ "$streams" =~ ^[1-9][0-9]?$ ]] || usage_error "STREAMS must be a number from 1 to 99"
  require_tools aws python3
  require_credentials
  load_base
  log_group=$(state_or_die output "$WORK/base.json" "$BASE_STACK" LogGroupName)
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

main "$@"
