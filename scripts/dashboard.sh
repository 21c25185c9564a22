#!/usr/bin/env bash
# dashboard.sh: print the console URL of the service stack's CloudWatch dashboard; open it in a
# browser when run at a terminal that has one.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make dashboard [AWS_REGION=...] [SERVICE_STACK=...]
Prints the console URL of the CloudWatch dashboard of the service stack (named after the stack)
and, when standard output is a terminal, opens it with xdg-open or open if one is installed.
USAGE
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  require_tools aws
  require_credentials
  if ! aws_ cloudwatch get-dashboard --dashboard-name "$SERVICE_STACK" --output json \
    >"$WORK/dashboard.json" 2>"$WORK/aws.err"; then
    grep -q 'ResourceNotFound\|does not exist' "$WORK/aws.err" \
      || die "aws cloudwatch get-dashboard failed: $(last_line "$WORK/aws.err")"
    die "no dashboard $SERVICE_STACK in $AWS_REGION: the service stack creates it; deploy a" \
      "release first (make release SHA=<commit sha>)"
  fi
  local url opener
  url=$(dashboard_url "$SERVICE_STACK")
  say "$url"
  [[ -t 1 ]] || return 0
  for opener in xdg-open open; do
    if command -v "$opener" >/dev/null 2>&1; then
      "$opener" "$url" >/dev/null 2>&1 || say "($opener could not open it: copy the URL)"
      return 0
    fi
  done
}

main "$@"
