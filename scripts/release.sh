#!/usr/bin/env bash
# release.sh: push the tested image of a commit to ECR, gate it on its scan and deploy it by digest.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make release SHA=<commit sha> [CONTAINER=docker|podman] [AWS_REGION=...]
usage: make push SHA=<commit sha> [IMAGE_ARCHIVE=dist/image.tar IMAGE_ID=sha256:<id>]
The image: with IMAGE_ARCHIVE (CI), the archive the test job saved, loaded and checked to be
IMAGE_ID, the image the test job tested; without it (a laptop), built here by scripts/image.sh.
Its org.opencontainers.image.revision label must be <sha>. It is pushed as <repository>:<sha>;
when that tag is already in ECR it must hold this very image (else the release stops and says
why). Then ECR's scan is awaited (SCAN_TIMEOUT, 600 s) and CRITICAL findings, and HIGH ones with
a fix, stop the release unless .github/scan-allowlist excuses them. make push stops there (in
GitHub Actions it writes the step outputs repository and digest, for the attestation); make
release goes on as make deploy does: attestation check, deploy by digest, verification.
USAGE
}

# The ID of image $1 as sha256:<hex> (podman prints it without the prefix).
image_id() {
  local id
  id=$("$CONTAINER" image inspect --format '{{.Id}}' "$1" 2>"$WORK/engine.err") \
    || die "$1 is not a local image: $(last_line "$WORK/engine.err"); nothing was pushed"
  [[ "$id" == sha256:* ]] || id="sha256:$id"
  printf '%s\n' "$id"
}

# Loads the tested image from IMAGE_ARCHIVE, or builds it; sets LOCAL_ID and checks its label.
local_image() {
  local ref="$IMAGE:$SHA" revision
  if [[ -n "${IMAGE_ARCHIVE:-}" ]]; then
    [[ "${IMAGE_ID:-}" =~ ^sha256:[0-9a-f]{64}$ ]] \
      || usage_error "IMAGE_ARCHIVE needs IMAGE_ID=sha256:<64 hex>, the ID of the tested image"
    [[ -f "$IMAGE_ARCHIVE" ]] || die "no image archive at $IMAGE_ARCHIVE; nothing was pushed"
    "$CONTAINER" load --input "$IMAGE_ARCHIVE" >"$WORK/load.out" 2>&1 \
      || die "cannot load $IMAGE_ARCHIVE: $(last_line "$WORK/load.out"); nothing was pushed"
    LOCAL_ID=$(image_id "$ref")
    [[ "$LOCAL_ID" == "$IMAGE_ID" ]] || die "$IMAGE_ARCHIVE holds $ref as $LOCAL_ID, not the tested" \
      "$IMAGE_ID: the archive changed between the jobs; nothing was pushed"
    say "loaded $ref from $IMAGE_ARCHIVE: $LOCAL_ID, the image the test job tested"
  else
    local built
    export SHA IMAGE CONTAINER
    built=$("$ROOT/scripts/image.sh" | tail -n 1) || die "the image build failed; nothing was pushed"
    [[ "$built" == "$ref" ]] \
      || die "built $built, not $ref (uncommitted changes?): commit them; nothing was pushed"
    LOCAL_ID=$(image_id "$ref")
  fi
  revision=$("$CONTAINER" image inspect \
    --format '{{ index .Config.Labels "org.opencontainers.image.revision" }}' "$ref") || revision=''
  [[ "$revision" == "$SHA" ]] || die "$ref has the revision label '$revision', not $SHA:" \
    "it was not built from this commit; nothing was pushed"
}

# True when the tag is already in the repository.
image_exists() {
  aws_ ecr describe-images --repository-name "$REPOSITORY_NAME" --image-ids "imageTag=$1" \
    --output json >/dev/null 2>"$WORK/aws.err" && return 0
  grep -q 'ImageNotFoundException' "$WORK/aws.err" && return 1
  die "cannot read repository $REPOSITORY_NAME: $(last_line "$WORK/aws.err")"
}

# Pushes the local image as <repository>:<sha>, or checks that the tag there holds it already.
push_image() {
  local remote="$REPOSITORY_URI:$SHA"
  if image_exists "$SHA"; then
    awsq ecr batch-get-image --repository-name "$REPOSITORY_NAME" --image-ids "imageTag=$SHA" \
      --output json >"$WORK/batch.json"
    state_or_die same-image "$WORK/batch.json" "$LOCAL_ID" "$remote"
    return 0
  fi
  ecr_login
  "$CONTAINER" tag "$IMAGE:$SHA" "$remote"
  "$CONTAINER" push "$remote" >&2 || die "push of $remote failed"
  say "pushed $remote"
}

# The step outputs the attestation step of the release job reads.
publish_outputs() {
  [[ -n "${GITHUB_OUTPUT:-}" ]] || return 0
  printf 'repository=%s\ndigest=%s\n' "$REPOSITORY_URI" "$1" >>"$GITHUB_OUTPUT"
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  check_sha
  check_prefix
  require_tools aws python3 curl "$CONTAINER"
  require_credentials
  load_base
  check_freeze
  local_image
  push_image
  local digest  # assigned apart from `local` so that a failure stops the script
  digest=$(tag_digest "$SHA")
  scan_gate "$digest" fresh || die "release stopped: $SCAN_REFUSAL; nothing was deployed; fix" \
    "them (rebuild on patched packages) or excuse each in .github/scan-allowlist with a reason" \
    "and an expiry date"
  publish_outputs "$digest"
  if [[ "${RELEASE_STEP:-}" == push ]]; then
    say "ok: $REPOSITORY_URI:$SHA is $digest, scanned and cleared; make deploy SHA=$SHA deploys it"
    return 0
  fi
  verify_attestation "$digest"
  deploy_release "$SHA" "$digest"
}

main "$@"
