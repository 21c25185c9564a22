#!/usr/bin/env bash
# deploy.sh: deploy (or roll back to) an image already in ECR and verify that it is what serves.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make deploy SHA=<commit sha> [AWS_REGION=...] [BASE_STACK=...] [SERVICE_STACK=...]
usage: make rollback SHA=<commit sha> [...]   the same, for an earlier image (make history lists them)
Deploys <repository>:<sha> with ImageTag=<sha>, without rebuilding. A short SHA is expanded when
exactly one tag starts with it; when <sha> is not an image in the repository it refuses and
changes nothing. Then it verifies: the primary ECS deployment runs exactly that image, its rollout
is COMPLETED (not rolled back, not stuck), running = desired tasks, and <ServiceUrl>/ready
answers 200.
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
  local tag  # assigned apart from `local` so that a SHA not in ECR stops the script here
  tag=$(resolve_tag "$SHA")
  deploy_release "$tag"
}

main "$@"
