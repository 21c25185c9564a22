#!/usr/bin/env bash
# status.sh: show the live image, running/desired tasks, recent deployments and events, and the URL.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make status [AWS_REGION=...] [BASE_STACK=...] [SERVICE_STACK=...]
Shows what the service runs now: the image of the primary deployment, running/desired tasks, the
deployments ECS knows (with rollout state and reason), the latest service events and the URL.
USAGE
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  require_tools aws python3
  require_credentials
  load_base
  if ! load_service; then
    say "No release deployed yet: stack $SERVICE_STACK does not exist in $AWS_REGION."
    say "url          $SERVICE_URL"
    say "Deploy one with: make release SHA=<commit sha>"
    return 0
  fi
  snapshot_or_die
  say "stack        $SERVICE_STACK ($(state stack "$WORK/service-stack.json" "$SERVICE_STACK" || true))"
  state_or_die status "$WORK" "$SERVICE_URL"
}

main "$@"
