#!/usr/bin/env bash
# rotate-token.sh: replace the API bearer token with a new random one, keep the old one accepted as
# AWSPREVIOUS for a grace period (or revoke it at once), and replace the running tasks so that they
# read both; with TOKEN_ACTION=revoke-previous (make revoke-previous-token), end the grace period.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: make rotate-token [REVOKE_PREVIOUS=true] [ROLL_TASKS=false] [AWS_REGION=...] [BASE_STACK=...]
                         [SERVICE_STACK=...]
       make revoke-previous-token [ROLL_TASKS=false]
Puts a new random token (48 characters, never printed) into the base stack's API token secret:
it becomes AWSCURRENT (API_TOKEN) and the token it replaces becomes AWSPREVIOUS
(API_TOKEN_PREVIOUS), which the service still accepts so that clients can switch over.
THE OLD TOKEN STAYS VALID UNTIL YOU REVOKE IT: once the clients use the new token, run
make revoke-previous-token (it moves AWSPREVIOUS onto the current token; make status shows a
token still in its grace period). A LEAKED token: make rotate-token REVOKE_PREVIOUS=true, which
revokes it at once (clients holding it fail until they read the new one). Either way the old
token is refused once the tasks are replaced: it forces a new deployment of the service, unless
ROLL_TASKS=false. Clients read the new token with
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

# Moves AWSPREVIOUS of secret $1 onto version $2 (its AWSCURRENT): the old token is refused.
revoke_previous() {
  local secret=$1 version=$2 previous
  awsq secretsmanager describe-secret --secret-id "$secret" --output json >"$WORK/token.json"
  previous=$(state_or_die previous-version "$WORK/token.json")
  if [[ "$previous" == "$version" ]]; then
    say "No previous token to revoke: AWSPREVIOUS is the current token already"
    return 0
  fi
  awsq secretsmanager update-secret-version-stage --secret-id "$secret" \
    --version-stage AWSPREVIOUS --move-to-version-id "$version" \
    --remove-from-version-id "$previous" --output json >/dev/null
  say "Revoked the previous token: AWSPREVIOUS is the current token too"
}

# Forces a new deployment, so that the tasks read the token stages as they are now.
roll_tasks() {
  if ! load_service; then
    say "No service yet (stack $SERVICE_STACK): the first release reads the new token"
    return 0
  fi
  awsq ecs update-service --cluster "$CLUSTER" --service "$SERVICE_NAME" --force-new-deployment \
    --output json >/dev/null
  say "Forced a new deployment of $SERVICE_NAME: new tasks read the new token (make status)"
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  check_prefix
  local revoke=false roll=false secret version
  if flag REVOKE_PREVIOUS false; then revoke=true; fi
  if flag ROLL_TASKS true; then roll=true; fi
  case "${TOKEN_ACTION:-rotate}" in
    rotate | revoke-previous) ;;
    *) usage_error "TOKEN_ACTION must be rotate or revoke-previous" ;;
  esac
  require_tools aws python3
  require_credentials
  load_base
  secret=$(state_or_die output "$WORK/base.json" "$BASE_STACK" ApiTokenSecretArn)
  if [[ "${TOKEN_ACTION:-rotate}" == revoke-previous ]]; then
    awsq secretsmanager describe-secret --secret-id "$secret" --output json >"$WORK/token.json"
    version=$(state_or_die current-version "$WORK/token.json")
    revoke_previous "$secret" "$version"
  else
    (
      umask 077
      python3 -c 'import secrets; print(secrets.token_urlsafe(36), end="")' >"$WORK/token"
    )
    awsq secretsmanager put-secret-value --secret-id "$secret" --secret-string "file://$WORK/token" \
      --output json >"$WORK/put.json"
    rm -f "$WORK/token"
    say "Rotated the API token of $secret: the old one is now AWSPREVIOUS"
    version=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["VersionId"])' \
      "$WORK/put.json")
    if $revoke; then
      revoke_previous "$secret" "$version"
    else
      echo "WARNING: THE OLD TOKEN IS STILL ACCEPTED. Once every client uses the new one, run" \
        "make revoke-previous-token. If it leaked, run it NOW (or rotate with REVOKE_PREVIOUS=true)." >&2
    fi
  fi
  if ! $roll; then
    say "ROLL_TASKS=false: running tasks keep the tokens they started with until they are replaced"
    return 0
  fi
  roll_tasks
}

main "$@"
