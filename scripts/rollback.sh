#!/usr/bin/env bash
# rollback.sh: redeploy an earlier image from ECR (no rebuild) and verify it, or refuse and change nothing.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make rollback SHA=<commit sha> [AWS_REGION=...] [BASE_STACK=...] [SERVICE_STACK=...]
Deploys the image <repository>:<sha> that is already in ECR, with the same verification as
make deploy. A short SHA is expanded when exactly one tag starts with it. When <sha> is not an image
in the repository it refuses and changes nothing. `make history` lists the candidates.
USAGE
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  check_sha
  require_tools aws python3 curl
  require_credentials
  load_base
  local tag
  tag=$(resolve_tag "$SHA")
  say "Rolling back to $REPOSITORY_URI:$tag"
  deploy_release "$tag"
}

main "$@"
