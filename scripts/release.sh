#!/usr/bin/env bash
# release.sh: build cars-api:<sha>, push it to ECR, deploy it to the service stack and verify it serves.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make release SHA=<commit sha> [CONTAINER=docker|podman] [AWS_REGION=...]
Builds $IMAGE:<sha> (scripts/image.sh) from the checked-out commit, pushes it to the ECR repository
of the base stack (skipped when that tag is already there: tags are immutable), deploys it to the
service stack and verifies that it is what serves. See scripts/deploy.sh for the verification.
USAGE
}

# Builds with scripts/image.sh, logs in to ECR and pushes <repository>:<sha>.
build_and_push() {
  local built registry=${REPOSITORY_URI%%/*}
  export SHA IMAGE CONTAINER
  built=$("$ROOT/scripts/image.sh" | tail -n 1) || die "the image build failed; nothing was pushed"
  [[ "$built" == "$IMAGE:$SHA" ]] \
    || die "built $built, not $IMAGE:$SHA (uncommitted changes?): commit them; nothing was pushed"
  aws_ ecr get-login-password 2>"$WORK/aws.err" \
    | "$CONTAINER" login --username AWS --password-stdin "$registry" >/dev/null \
    || die "cannot log in to $registry: $(last_line "$WORK/aws.err"); nothing was pushed"
  "$CONTAINER" tag "$IMAGE:$SHA" "$REPOSITORY_URI:$SHA"
  "$CONTAINER" push "$REPOSITORY_URI:$SHA" || die "push of $REPOSITORY_URI:$SHA failed"
}

# True when the tag is already in the repository.
image_exists() {
  aws_ ecr describe-images --repository-name "$REPOSITORY_NAME" --image-ids "imageTag=$1" \
    --output json >/dev/null 2>"$WORK/aws.err" && return 0
  grep -q 'ImageNotFoundException' "$WORK/aws.err" && return 1
  die "cannot read repository $REPOSITORY_NAME: $(last_line "$WORK/aws.err")"
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  check_sha
  require_tools aws python3 curl "$CONTAINER"
  require_credentials
  load_base
  if image_exists "$SHA"; then
    say "$REPOSITORY_URI:$SHA is already in ECR (tags are immutable): deploying it as it is"
  else
    build_and_push
  fi
  deploy_release "$SHA"
}

main "$@"
