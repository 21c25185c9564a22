#!/usr/bin/env bash
# rotate-token.sh: replace the API bearer token with a new random one, keep the old one accepted as
# AWSPREVIOUS (or revoke it), and replace the running tasks so that they read both.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make rotate-token [REVOKE_PREVIOUS=true] [ROLL_TASKS=false] [AWS_REGION=...] [BASE_STACK=...]
                         [SERVICE_STACK=...]
Puts a new random token (48 characters, never printed) into the base stack's API token secret:
it becomes AWSCURRENT (API_TOKEN) and the token it replaces becomes AWSPREVIOUS
(API_TOKEN_PREVIOUS), which the service still accepts so that clients can switch over.
REVOKE_PREVIOUS=true moves AWSPREVIOUS onto the new token too: the old one is refused once the
tasks are replaced (when a person who knew it leaves). Then it forces a new deployment of the
service, unless ROLL_TASKS=false. Clients read the new token with
aws secretsmanager get-secret-value --secret-id <ApiTokenSecretArn> --query SecretString.
USAGE
}

# True (0) or false (1) for a true/false setting $1 with default $2; anything else is a usage error.
flag() {
  local value=${!1:-$2}
  case $value in
    true) return 0 ;;
    false) return 1 ;;
    *) usage_error "$1 must be true or false, not '$value'" ;;
  esac
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  local revoke=false roll=false secret version
  if flag REVOKE_PREVIOUS false; then revoke=true; fi
  if flag ROLL_TASKS true; then roll=true; fi
  require_tools aws python3
  require_credentials
  load_base
  secret=$(state_or_die output "$WORK/base.json" "$BASE_STACK" ApiTokenSecretArn)
  (
    umask 077
    python3 -c 'import secrets; print(secrets.token_urlsafe(36), end="")' >"$WORK/token"
  )
  awsq secretsmanager put-secret-value --secret-id "$secret" --secret-string "file://$WORK/token" \
    --output json >"$WORK/put.json"
  rm -f "$WORK/token"
  say "Rotated the API token of $secret: the old one is now AWSPREVIOUS"
  if $revoke; then
    awsq secretsmanager describe-secret --secret-id "$secret" --output json >"$WORK/token.json"
    version=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["VersionId"])' \
      "$WORK/put.json")
    awsq secretsmanager update-secret-version-stage --secret-id "$secret" \
      --version-stage AWSPREVIOUS --move-to-version-id "$version" \
      --remove-from-version-id "$(state_or_die previous-version "$WORK/token.json")" \
      --output json >/dev/null
    say "Revoked the previous token: AWSPREVIOUS is the new token too"
  fi
  if ! $roll; then
    say "ROLL_TASKS=false: running tasks keep the tokens they started with until they are replaced"
    return 0
  fi
  if ! load_service; then
    say "No service yet (stack $SERVICE_STACK): the first release reads the new token"
    return 0
  fi
  awsq ecs update-service --cluster "$CLUSTER" --service "$SERVICE_NAME" --force-new-deployment \
    --output json >/dev/null
  say "Forced a new deployment of $SERVICE_NAME: new tasks read the new token (make status)"
}

main "$@"
