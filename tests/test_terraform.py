"""infra/terraform, checked offline: formatting, and a static read of the bucket and IRSA role.

`terraform validate`/`plan` need the AWS provider from a registry, so instead the HCL is parsed
(python-hcl2) and the security properties that matter are asserted on the parsed tree.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

TERRAFORM_DIR = Path(__file__).resolve().parents[1] / "infra" / "terraform"


def normalise(node: Any) -> Any:
    """python-hcl2 output without its metadata keys and quoting (its formats differ across versions)."""
    if isinstance(node, dict):
        return {
            normalise(key): normalise(value)
            for key, value in node.items()
            if not (isinstance(key, str) and key.startswith("__"))
        }
    if isinstance(node, list):
        return [normalise(item) for item in node]
    if isinstance(node, str) and len(node) >= 2 and node[0] == node[-1] == '"':
        return node[1:-1]
    return node


@pytest.fixture(scope="module")
def hcl() -> dict[str, dict[str, dict[str, Any]]]:
    """{"resource" | "data": {type: {name: body}}} over every .tf file."""
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is not installed (pip install -e '.[test]')")
    blocks: dict[str, dict[str, dict[str, Any]]] = {"resource": {}, "data": {}, "variable": {}, "output": {}}
    for path in sorted(TERRAFORM_DIR.glob("*.tf")):
        with path.open() as handle:
            tree = normalise(hcl2.load(handle))
        for section in ("resource", "data"):
            for item in tree.get(section, []):
                for type_, named in item.items():
                    blocks[section].setdefault(type_, {}).update(named)
        for section in ("variable", "output"):
            for item in tree.get(section, []):
                blocks[section].update(item)
    return blocks


def only(blocks: dict[str, dict[str, Any]], type_: str) -> dict[str, Any]:
    (body,) = blocks[type_].values()
    return body


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    (inner,) = body[name]
    return inner


def test_terraform_fmt_is_clean() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not installed")
    proc = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM_DIR)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bucket_is_private_versioned_encrypted_and_tls_only(hcl: dict) -> None:
    resources = hcl["resource"]
    bucket_ref = "${aws_s3_bucket.pneumonet.id}"
    access = only(resources, "aws_s3_bucket_public_access_block")
    assert access["bucket"] == bucket_ref
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        assert access[flag] is True, flag
    assert (
        block(only(resources, "aws_s3_bucket_ownership_controls"), "rule")["object_ownership"] == "BucketOwnerEnforced"
    )
    assert block(only(resources, "aws_s3_bucket_versioning"), "versioning_configuration")["status"] == "Enabled"
    sse = block(
        block(only(resources, "aws_s3_bucket_server_side_encryption_configuration"), "rule"),
        "apply_server_side_encryption_by_default",
    )
    assert sse["sse_algorithm"] in {"AES256", "aws:kms", "aws:kms:dsse"}

    (policy_doc,) = [body for name, body in hcl["data"]["aws_iam_policy_document"].items() if name == "tls_only"]
    (deny,) = policy_doc["statement"]
    assert deny["effect"] == "Deny" and deny["actions"] == ["s3:*"]
    assert block(deny, "condition") == {"test": "Bool", "variable": "aws:SecureTransport", "values": ["false"]}
    assert only(resources, "aws_s3_bucket_policy")["policy"] == "${data.aws_iam_policy_document.tls_only.json}"


def test_checkpoints_and_their_old_versions_expire(hcl: dict) -> None:
    lifecycle = only(hcl["resource"], "aws_s3_bucket_lifecycle_configuration")
    (rule,) = [rule for rule in lifecycle["rule"] if block(rule, "filter").get("prefix") == "${var.checkpoint_prefix}"]
    assert rule["status"] == "Enabled"
    assert block(rule, "expiration")["days"] == "${var.checkpoint_expiry_days}"
    assert block(rule, "noncurrent_version_expiration")["noncurrent_days"] == "${var.checkpoint_expiry_days}"
    assert hcl["variable"]["checkpoint_prefix"]["default"] == "runs/"  # models/ beside it never expires
    assert hcl["variable"]["checkpoint_expiry_days"]["default"] >= 1


def test_irsa_role_trusts_only_the_pneumonet_service_account(hcl: dict) -> None:
    (statement,) = hcl["data"]["aws_iam_policy_document"]["irsa_trust"]["statement"]
    assert statement["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    assert block(statement, "principals") == {"type": "Federated", "identifiers": ["${var.oidc_provider_arn}"]}
    conditions = {c["variable"]: c for c in statement["condition"]}
    sub = conditions["${local.oidc_issuer}:sub"]
    aud = conditions["${local.oidc_issuer}:aud"]
    assert sub["test"] == aud["test"] == "StringEquals"
    assert sub["values"] == ["system:serviceaccount:${var.namespace}:${var.service_account_name}"]
    assert aud["values"] == ["sts.amazonaws.com"]
    role = only(hcl["resource"], "aws_iam_role")
    assert role["assume_role_policy"] == "${data.aws_iam_policy_document.irsa_trust.json}"


def test_role_policy_only_touches_the_bucket(hcl: dict) -> None:
    policy = hcl["data"]["aws_iam_policy_document"]["bucket_access"]
    bucket_arn = "${aws_s3_bucket.pneumonet.arn}"
    actions_by_resource: dict[str, set[str]] = {}
    for statement in policy["statement"]:
        assert statement.get("effect", "Allow") == "Allow"
        for resource in statement["resources"]:
            assert resource in {bucket_arn, f"{bucket_arn}/*"}, f"policy reaches beyond the bucket: {resource}"
            actions_by_resource.setdefault(resource, set()).update(statement["actions"])
        assert all(action.startswith("s3:") and "*" not in action for action in statement["actions"])
    assert "s3:ListBucket" in actions_by_resource[bucket_arn]
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions_by_resource[f"{bucket_arn}/*"]
    attached = only(hcl["resource"], "aws_iam_role_policy")
    assert attached["role"] == "${aws_iam_role.pneumonet.id}"
    assert attached["policy"] == "${data.aws_iam_policy_document.bucket_access.json}"


def test_outputs_and_required_variables(hcl: dict) -> None:
    assert {"bucket_name", "bucket_arn", "role_arn"} <= set(hcl["output"])
    variables = hcl["variable"]
    for name in ("region", "bucket_name", "oidc_provider_arn", "oidc_provider_url"):
        assert "default" not in variables[name], f"{name} must be given explicitly"
    for name in ("namespace", "service_account_name", "checkpoint_expiry_days", "tags"):
        assert "default" in variables[name], name
