#!/usr/bin/env bash
# status.sh: show the live image, running/desired tasks, recent deployments and events, the URL and
# the dashboard.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make status [AWS_REGION=...] [BASE_STACK=...] [SERVICE_STACK=...]
Shows what the service runs now: the image (repository@digest) of the primary deployment and its
commit, running/desired tasks, the deployments ECS knows (with rollout state and reason), the
latest service events, the URL and the CloudWatch dashboard's URL; then each secret of the base and
data stacks: its rotation schedule, last and next rotation, and whether a rotation is stuck (an
AWSPENDING version that never became AWSCURRENT, older than PENDING_STUCK_MINUTES, default 60:
then make status exits 1).
In GitHub Actions it also writes the job summary and the step output `url`.
USAGE
}

# Job summary (commit, image, URL) and the step output `url`, when GitHub Actions provides files.
publish() {
  local text=$1 image commit url
  image=$(awk '$1 == "live" && $2 == "image" { print $3; exit }' <<<"$text")
  commit=$(awk '$1 == "commit" { print $2; exit }' <<<"$text")
  url=$(awk '$1 == "url" { print $2; exit }' <<<"$text")
  [[ -z "${GITHUB_OUTPUT:-}" ]] || printf 'url=%s\n' "$url" >>"$GITHUB_OUTPUT"
  [[ -n "${GITHUB_STEP_SUMMARY:-}" ]] || return 0
  {
    printf '### %s now serves\n\n' "$SERVICE_STACK"
    printf -- "- Commit: \`%s\`\n" "$commit"
    printf -- "- Image: \`%s\`\n" "$image"
    printf -- '- Service: %s\n\n' "$url"
    printf "<details><summary>make status</summary>\n\n\`\`\`\n%s\n\`\`\`\n\n</details>\n" "$text"
  } >>"$GITHUB_STEP_SUMMARY"
}

# What it says instead when these credentials may not read the secrets (the deploy role reads no
# secret, not even its metadata, so CI's make status goes on); another failure stops it.
unreadable() {
  grep -q 'AccessDenied' "$WORK/aws.err" || die "cannot read the secrets: $(last_line "$WORK/aws.err")"
  printf 'secrets\n  (not readable with these credentials: run make status as an operator)\n'
}

# The rotation state of every secret of the base and data stacks (state secrets says it).
secrets_status() {
  local stack logical arn n=0 minutes=${PENDING_STUCK_MINUTES:-60}
  mkdir -p "$WORK/secrets"
  for stack in "$BASE_STACK" "$DATA_STACK"; do
    describe_stack "$stack" "$WORK/secrets-stack.json" || continue
    if ! aws_ cloudformation describe-stack-resources --stack-name "$stack" --output text \
      --query "StackResources[?ResourceType=='AWS::SecretsManager::Secret'].[LogicalResourceId,PhysicalResourceId]" \
      >"$WORK/secrets-$n.txt" 2>"$WORK/aws.err"; then
      unreadable
      return 0
    fi
    while read -r logical arn; do
      [[ -n "$arn" && "$arn" != None ]] || continue
      n=$((n + 1))
      # The API token's file is marked: only its previous value is a grace period to end.
      [[ "$logical" != ApiTokenSecret ]] || n="$n.token"
      if ! aws_ secretsmanager describe-secret --secret-id "$arn" --output json \
        >"$WORK/secrets/$n.describe.json" 2>"$WORK/aws.err" \
        || ! aws_ secretsmanager list-secret-version-ids --secret-id "$arn" --include-deprecated \
          --output json >"$WORK/secrets/$n.versions.json" 2>>"$WORK/aws.err"; then
        # The deploy role reads no secret, not even its metadata: CI's make status goes on.
        unreadable
        return 0
      fi
      n=${n%.token}
    done <"$WORK/secrets-$n.txt"
  done
  state secrets "$WORK/secrets" "$(date -u +%s)" "$minutes"
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  [[ "${PENDING_STUCK_MINUTES:-60}" =~ ^[0-9]{1,5}$ ]] \
    || usage_error "PENDING_STUCK_MINUTES must be a number of minutes"
  require_tools aws python3
  require_credentials
  load_base
  local secrets rc=0
  secrets=$(secrets_status) || rc=$?
  if ! load_service; then
    say "No release deployed yet: stack $SERVICE_STACK does not exist in $AWS_REGION."
    say "url          $SERVICE_URL"
    say "Deploy one with: make release SHA=<commit sha>"
    say "$secrets"
    return "$rc"
  fi
  snapshot_or_die
  local text
  text="stack        $SERVICE_STACK ($(state stack "$WORK/service-stack.json" "$SERVICE_STACK" || true))"
  text+=$'\n'$(state_or_die status "$WORK" "$SERVICE_URL")
  text+=$'\n'"$secrets"
  text+=$'\n'"dashboard    $(dashboard_url "$SERVICE_STACK")"
  say "$text"
  publish "$text"
  return "$rc"
}

main "$@"
