#!/usr/bin/env bash
# history.sh: list the images in ECR, newest first, with push time, digest, scan and which one is live.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make history [AWS_REGION=...] [BASE_STACK=...] [SERVICE_STACK=...]
Lists the images of the ECR repository, newest first: push time (UTC), tag (the commit SHA),
digest, scan findings, and "live" on the image (by digest) the service's primary deployment
runs. Any tag listed is a valid target of make rollback SHA=<tag>.
USAGE
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  require_tools aws python3
  require_credentials
  load_base
  save_images
  local live=""
  if load_service && snapshot_service; then
    live=$(state live "$WORK" || true)
  fi
  say "Images in $REPOSITORY_URI (region $AWS_REGION):"
  state history "$WORK" "$live"
}

main "$@"
