#!/usr/bin/env bash
# deploy.sh: deploy an image already in ECR to the service stack and verify that it is what serves.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make deploy SHA=<commit sha> [AWS_REGION=...] [BASE_STACK=...] [SERVICE_STACK=...]
Deploys <repository>:<sha> (already pushed; a unique short SHA is expanded to its tag) with
ImageTag=<sha>, then verifies: the primary ECS deployment runs exactly that image, its rollout is
COMPLETED (not rolled back, not stuck), running = desired tasks, and <ServiceUrl>/ready answers 200.
Tunables: ROLLOUT_TIMEOUT (600 s), POLL_SECONDS (15), READY_TRIES (12), READY_INTERVAL (5 s),
SERVICE_URL (default: the base stack's ServiceUrl).
USAGE
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  check_sha
  require_tools aws python3 curl
  require_credentials
  load_base
  deploy_release "$(resolve_tag "$SHA")"
}

main "$@"
