#!/usr/bin/env bash
# deploy.sh: deploy (or roll back to) an image already in ECR, by digest, and verify that it serves.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make deploy SHA=<commit sha> [AWS_REGION=...] [BASE_STACK=...] [SERVICE_STACK=...]
usage: make rollback SHA=<commit sha> [ALLOW_VULNERABLE=true] [...]   an earlier image (make history)
Deploys <repository>:<sha> by its digest (ImageTag=<sha>@<digest>), without rebuilding. A short
SHA is expanded when exactly one tag starts with it; when <sha> is not an image in the repository
it refuses and changes nothing. Before changing anything it applies the scan gate (CRITICAL
findings and fixable HIGH ones stop it unless .github/scan-allowlist excuses them; only a
rollback may pass with ALLOW_VULNERABLE=true) and, in GitHub Actions, verifies the image's build
provenance attestation. DEPLOY_FREEZE stops make deploy but not make rollback. Then it verifies:
the primary ECS deployment runs exactly that digest, its rollout is COMPLETED (not rolled back,
not stuck), running = desired tasks, and <ServiceUrl>/ready answers 200.
Tunables: SCAN_TIMEOUT (600 s), ROLLOUT_TIMEOUT (600 s), POLL_SECONDS (15), READY_TRIES (12),
READY_INTERVAL (5 s), SERVICE_URL (default: the base stack's ServiceUrl).
USAGE
}

# The override of the scan gate: "true" only for make rollback with ALLOW_VULNERABLE=true.
override() {
  case "${ALLOW_VULNERABLE:-}" in
    '' | false) echo false ;;
    true)
      [[ "${DEPLOY_KIND:-}" == rollback ]] \
        || usage_error "ALLOW_VULNERABLE=true is for make rollback only: a release passes the gate"
      echo true ;;
    *) usage_error "ALLOW_VULNERABLE must be true or false, not '$ALLOW_VULNERABLE'" ;;
  esac
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  check_sha
  check_prefix
  local allow tag digest  # assigned apart from `local` so that a failure stops the script
  allow=$(override)
  require_tools aws python3 curl
  require_credentials
  load_base
  check_freeze
  tag=$(resolve_tag "$SHA")
  digest=$(tag_digest "$tag")
  if ! scan_gate "$digest" "" "$allow"; then
    local hint="fix them (rebuild on patched packages) or excuse each in .github/scan-allowlist"
    if [[ "${DEPLOY_KIND:-}" == rollback ]]; then
      hint="to roll back anyway: make rollback SHA=$SHA ALLOW_VULNERABLE=true"
    fi
    die "$SCAN_REFUSAL: nothing changed; $hint"
  fi
  verify_attestation "$digest"
  deploy_release "$tag" "$digest"
}

main "$@"
