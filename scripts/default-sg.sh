#!/usr/bin/env bash
# default-sg.sh: remove every rule of the default security group of the base stack's VPC, so that
# nothing placed in it by mistake can talk to anything. CloudFormation cannot manage that group's
# rules, hence this script, which make stack-deploy runs after the base stack. Idempotent.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat >&2 <<'USAGE'
usage: scripts/default-sg.sh   (run by make stack-deploy; reads AWS_REGION and BASE_STACK)
Revokes every inbound and outbound rule of the default security group of the VPC of stack
BASE_STACK (its resource Vpc). A group without rules prints that it is already empty.
USAGE
}

# Physical id of the base stack's VPC.
vpc_id() {
  local id
  id=$(awsq cloudformation describe-stack-resource --stack-name "$BASE_STACK" \
    --logical-resource-id Vpc --query 'StackResourceDetail.PhysicalResourceId' --output text)
  [[ "$id" == vpc-* ]] || die "stack $BASE_STACK has no VPC (resource Vpc is '$id')"
  echo "$id"
}

# Revokes the rules of direction $2 (ingress or egress) of group $1; prints how many there were.
revoke() {
  local group=$1 direction=$2 egress=false ids
  [[ "$direction" == ingress ]] || egress=true
  ids=$(awsq ec2 describe-security-group-rules --filters "Name=group-id,Values=$group" \
    --query "SecurityGroupRules[?IsEgress==\`$egress\`].SecurityGroupRuleId" --output text)
  [[ -n "$ids" && "$ids" != None ]] || { echo 0; return 0; }
  # shellcheck disable=SC2086 # ids is a list of rule ids: split on purpose
  awsq ec2 "revoke-security-group-$direction" --group-id "$group" --security-group-rule-ids $ids \
    --output text >/dev/null
  wc -w <<<"$ids" | tr -d ' '
}

main() {
  [[ $# -eq 0 ]] || usage_error "unexpected arguments: $*"
  require_tools aws
  local vpc group inbound outbound
  vpc=$(vpc_id)
  group=$(awsq ec2 describe-security-groups \
    --filters "Name=vpc-id,Values=$vpc" "Name=group-name,Values=default" \
    --query 'SecurityGroups[0].GroupId' --output text)
  [[ "$group" == sg-* ]] || die "VPC $vpc has no default security group"
  inbound=$(revoke "$group" ingress)
  outbound=$(revoke "$group" egress)
  if [[ "$inbound$outbound" == 00 ]]; then
    say "Default security group $group of $vpc has no rules (nothing to revoke)."
  else
    say "Default security group $group of $vpc: revoked $inbound inbound and $outbound outbound rules."
  fi
}

main "$@"
