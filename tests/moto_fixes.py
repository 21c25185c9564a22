"""moto's server with three CloudFormation gaps of moto 5.2.5 filled, for the stack-deploy tests.

usage: python tests/moto_fixes.py -H 127.0.0.1 -p <port>   (moto_server's arguments)

data.yaml is valid CloudFormation (cfn-lint says so) but moto cannot create it as it stands: a Ref
to an AWS::RDS::DBParameterGroup yields moto's Python object instead of the group's name, and
Fn::GetAtt Database.MasterUserSecret.SecretArn is not implemented (moto's CloudFormation does not
pass ManageMasterUserPassword on); and AWS::SecretsManager::Secret is not created at all, while
stack-deploy writes the CA bundle and token stages into those secrets. All three are filled in
here the way AWS documents them; nothing else of moto changes. What only AWS shows (the secret
RDS creates, the rotation functions of the transform) is listed in the README.
"""

import json
import secrets
import sys

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
            name=resource_name,
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
