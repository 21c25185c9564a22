#!/usr/bin/env bash
# image-save.sh: save the built image $IMAGE:<sha> to an archive and record its ID, for the release job.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: make image-save [SHA=<sha>] [IMAGE_ARCHIVE=dist/image.tar] [CONTAINER=podman]
Saves the image make image built, $IMAGE:<sha> (SHA defaults to the checked-out commit), with
`docker save` to IMAGE_ARCHIVE and its image ID to IMAGE_ARCHIVE with .id instead of .tar. In
GitHub Actions it also writes the step output image-id: the release job loads the archive and
deploys it only when it is still that image.
USAGE
}

die() {
  echo "image-save: $*" >&2
  exit 1
}

case "${1:-}" in
  '') ;;
  -h | --help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

engine=${CONTAINER:-docker}
archive=${IMAGE_ARCHIVE:-dist/image.tar}
[[ $archive == *.tar ]] || die "IMAGE_ARCHIVE must end in .tar, got '$archive'"
sha=${SHA:-$(git rev-parse --verify --quiet HEAD || true)}
[[ $sha =~ ^[0-9a-f]{7,40}$ ]] || die "SHA must be 7 to 40 lowercase hex characters, got '$sha'"
ref=${IMAGE:-cars-api}:$sha
id=$("$engine" image inspect --format '{{.Id}}' "$ref") || die "no image $ref: run make image first"
[[ $id == sha256:* ]] || id=sha256:$id
mkdir -p "$(dirname "$archive")"
"$engine" save --output "$archive" "$ref" || die "could not save $ref to $archive"
printf '%s\n' "$id" >"${archive%.tar}.id"
[[ -z ${GITHUB_OUTPUT:-} ]] || printf 'image-id=%s\n' "$id" >>"$GITHUB_OUTPUT"
echo "image-save: $ref ($id) saved to $archive" >&2
