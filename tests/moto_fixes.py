"""moto's server with the CloudFormation gaps of moto 5.2.5 filled, for the stack-deploy tests.

usage: python tests/moto_fixes.py -H 127.0.0.1 -p <port>   (moto_server's arguments)

data.yaml is valid CloudFormation (cfn-lint says so) but moto cannot create it as it stands: a Ref
to an AWS::RDS::DBParameterGroup yields moto's Python object instead of the group's name, and
Fn::GetAtt Database.MasterUserSecret.SecretArn is not implemented (moto's CloudFormation does not
pass ManageMasterUserPassword on); and AWS::SecretsManager::Secret is not created at all, while
stack-deploy writes the CA bundle and token stages into those secrets. All three are filled in
here the way AWS documents them. A secret gets its Name property as its name (moto used the
logical id, so two stacks' secrets collided). And a resource that fails while a change set
creates a stack raises out of moto's ExecuteChangeSet; AWS instead rolls the create back: it
deletes what it made (except DeletionPolicy Retain), records the resource's CREATE_FAILED event
and leaves the stack ROLLBACK_COMPLETE. Nothing else of moto changes. What only AWS shows (the
secret RDS creates, the rotation functions of the transform) is listed in
docs/explanation/testing.md.
"""

import contextlib
import json
import secrets
import sys

from moto.cloudformation import parsing
from moto.cloudformation.models import CloudFormationBackend, Event
from moto.core.common_models import CloudFormationModel
from moto.rds.models import DBInstance, DBParameterGroup
from moto.secretsmanager.models import secretsmanager_backends
from moto.server import main

DBParameterGroup.physical_resource_id = property(lambda group: group.name)
_get_attribute = DBInstance.get_cfn_attribute


def get_attribute(database, name):
    """The ARN AWS gives the secret RDS manages for this instance; moto's own answer otherwise."""
    if name.startswith("MasterUserSecret"):  # Fn::Sub hands moto the first part only
        return (
            f"arn:aws:secretsmanager:{database.region}:{database.account_id}:secret:"
            f"rds!{database.dbi_resource_id.lower()}-a1B2c3"
        )
    return _get_attribute(database, name)


DBInstance.get_cfn_attribute = get_attribute
DBInstance.has_cfn_attr = classmethod(
    lambda cls, name: (
        name in ("Endpoint.Address", "Endpoint.Port") or name.startswith("MasterUserSecret")
    )
)


class Secret(CloudFormationModel):
    """AWS::SecretsManager::Secret: a secret in moto's Secrets Manager; Ref is its ARN."""

    __module__ = "moto.secretsmanager.cloudformation"  # moto names its services by module

    def __init__(self, arn):
        self.arn = arn

    @property
    def physical_resource_id(self):
        return self.arn

    @staticmethod
    def cloudformation_type():
        return "AWS::SecretsManager::Secret"

    @staticmethod
    def cloudformation_name_type():
        return "Name"

    @classmethod
    def create_from_cloudformation_json(
        cls, resource_name, cloudformation_json, account_id, region_name, **kwargs
    ):
        properties = cloudformation_json["Properties"]
        generate = properties.get("GenerateSecretString", {})
        value = secrets.token_urlsafe(generate.get("PasswordLength", 32))[:32]
        if "SecretStringTemplate" in generate:
            document = json.loads(generate["SecretStringTemplate"])
            document[generate["GenerateStringKey"]] = value
            value = json.dumps(document)
        created = secretsmanager_backends[account_id][region_name].create_secret(
            name=properties.get("Name") or resource_name,
            secret_string=value,
            secret_binary=None,
            description=properties.get("Description"),
            tags=None,
            kms_key_id=None,
            client_request_token=None,
            replica_regions=[],
            force_overwrite=False,
        )
        return cls(json.loads(created)["ARN"] if isinstance(created, str) else created["ARN"])


_execute_change_set = CloudFormationBackend.execute_change_set


_parse_and_create_resource = parsing.parse_and_create_resource


def parse_and_create_resource(logical_id, *args, **kwargs):
    """moto's resource creation; a failure names the resource (AWS's CREATE_FAILED event does)."""
    try:
        return _parse_and_create_resource(logical_id, *args, **kwargs)
    except Exception as failure:
        if not hasattr(failure, "logical_id"):
            failure.logical_id = logical_id
        raise


parsing.parse_and_create_resource = parse_and_create_resource


def execute_change_set(backend, change_set_name, stack_name=None):
    """ExecuteChangeSet; a create that fails is rolled back as AWS does (ROLLBACK_COMPLETE)."""
    change_set = backend.describe_change_set(change_set_name)
    try:
        return _execute_change_set(backend, change_set_name, stack_name)
    except Exception as failure:  # any resource error fails the create in AWS
        if change_set.change_set_type != "CREATE":
            raise
        stack = backend.stacks[change_set.stack_id]
        logical = getattr(failure, "logical_id", "?")
        resource = change_set.template_dict["Resources"].get(logical, {})
        stack.events.append(
            Event(
                stack_id=stack.stack_id,
                stack_name=stack.name,
                logical_resource_id=logical,
                physical_resource_id="",
                resource_type=resource.get("Type", "?"),
                resource_status="CREATE_FAILED",
                resource_status_reason=str(failure) or type(failure).__name__,
                resource_properties=None,
            )
        )
        stack._add_stack_event("ROLLBACK_IN_PROGRESS")
        # AWS would end ROLLBACK_FAILED if a delete failed; moto cannot tell, so it goes on.
        with contextlib.suppress(Exception):
            stack.resource_map.delete()
        # moto makes a resource again when it is described: the rolled-back stack has none.
        stack.resource_map._resource_json_map = {}
        stack._add_stack_event("ROLLBACK_COMPLETE")
        stack.status = "ROLLBACK_COMPLETE"
        change_set.execution_status = "EXECUTE_FAILED"
        return None


CloudFormationBackend.execute_change_set = execute_change_set


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
