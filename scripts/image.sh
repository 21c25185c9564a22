#!/usr/bin/env bash
# Build the container image $IMAGE:<sha> from the Dockerfile, with the SBOM of its Python
# environment beside it, and print the reference it built.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: scripts/image.sh          (or: make image [SHA=<sha>] [CONTAINER=podman])
Settings come from the environment:
  SHA           commit to tag, 7 to 40 hex characters; default: the checked-out commit.
                It must be the checked-out commit, so that a tag always names what was built.
  IMAGE         image name (default cars-api)
  CONTAINER     engine: docker (default), podman, or a path to either
  PYTHON_IMAGE  base image build argument (default: the one in the Dockerfile)
When a file the image is built from (Dockerfile, .dockerignore, requirements.txt,
tests/requirements-sbom.txt, cars.py) differs from the commit, the tag is <sha>-dirty: such an
image runs locally but can never be deployed (the service stack accepts hex tags only).
Writes the CycloneDX SBOM of the image's venv to dist/sbom.cdx.json (the same file is in the
image at /usr/share/doc/cars-api/sbom.cdx.json, and the label cars-api.sbom.digest holds its
sha256). Prints IMAGE:TAG last on stdout.
USAGE
}

die() {
  echo "image: $*" >&2
  exit 1
}

case "${1:-}" in
  '') ;;
  -h | --help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

engine=${CONTAINER:-docker}
command -v "$engine" >/dev/null ||
  die "container engine '$engine' not found (set CONTAINER=docker or podman)"
version=$("$engine" --version) || die "'$engine --version' failed; is the engine working?"
build_args=()
# podman writes OCI images by default, and the OCI format has no HEALTHCHECK; docker format does.
[[ ${version,,} == *podman* ]] && build_args+=(--format docker)
[[ -n ${PYTHON_IMAGE:-} ]] && build_args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")

inputs=(Dockerfile .dockerignore requirements.txt tests/requirements-sbom.txt cars.py)
sbom_file=dist/sbom.cdx.json
sbom_in_image=/usr/share/doc/cars-api/sbom.cdx.json
in_git=false
head=''
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  in_git=true
  head=$(git rev-parse --verify --quiet HEAD) || head=''
fi

if [[ -z ${SHA:-} ]]; then
  [[ -n $head ]] || die "no commit to name the image after (not a git checkout, or no commit" \
    "yet): commit first, or pass SHA=<sha>"
  sha=$head
else
  [[ $SHA =~ ^[0-9a-f]{7,40}$ ]] || die "SHA must be 7 to 40 lowercase hex characters, got '$SHA'"
  if [[ -n $head && $head != "$SHA"* ]]; then
    die "SHA=$SHA is not the checked-out commit $head; check it out first" \
      "(a tag must name what was built)"
  fi
  sha=$SHA
fi

tag=$sha
if $in_git; then
  changes=$(git status --porcelain --untracked-files=all -- "${inputs[@]}")
  if [[ -n $changes ]]; then
    tag=$sha-dirty
    echo "image: WARNING: these image inputs differ from commit $sha, so the tag is $tag:" >&2
    echo "$changes" >&2
  fi
else
  echo "image: not a git checkout; trusting SHA=$sha for the tag" >&2
fi

ref=${IMAGE:-cars-api}:$tag
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The SBOM stage first (the final build reuses its cached layers): its digest becomes a label.
echo "image: building the SBOM of $ref with $engine" >&2
"$engine" build "${build_args[@]}" --target sbom --iidfile "$work/sbom.iid" --file Dockerfile . >&2
sbom_image=$(<"$work/sbom.iid")
container=$("$engine" create "$sbom_image" none) || die "could not create a container of the SBOM stage"
mkdir -p "$(dirname "$sbom_file")"
copied=true
"$engine" cp "$container:/sbom.cdx.json" "$sbom_file" >&2 || copied=false
"$engine" rm "$container" >/dev/null || true
$copied || die "could not copy the SBOM out of the build"
digest=sha256:$(sha256sum "$sbom_file" | cut -d ' ' -f 1)

echo "image: building $ref with $engine" >&2
"$engine" build "${build_args[@]}" \
  --label "org.opencontainers.image.revision=$tag" \
  --label "cars-api.sbom.digest=$digest" \
  --label "cars-api.sbom.path=$sbom_in_image" \
  --tag "$ref" --file Dockerfile . >&2
echo "image: SBOM (CycloneDX JSON) of $ref: $sbom_file, $digest, in the image at $sbom_in_image" >&2
echo "$ref"
