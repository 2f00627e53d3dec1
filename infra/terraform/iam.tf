# IRSA: the pods of ServiceAccount <namespace>/<service_account_name> (and no other) assume this role
# with their projected web-identity token; the role may only use the Pneumonet bucket.

locals {
  # The condition keys are the issuer without its scheme: oidc.eks.<region>.amazonaws.com/id/<id>.
  oidc_issuer = replace(var.oidc_provider_url, "https://", "")
}

data "aws_iam_policy_document" "irsa_trust" {
  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${var.service_account_name}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "pneumonet" {
  name               = var.role_name
  description        = "Pneumonet Ray pods (IRSA ${var.namespace}/${var.service_account_name}): read/write the Pneumonet bucket."
  assume_role_policy = data.aws_iam_policy_document.irsa_trust.json
}

data "aws_iam_policy_document" "bucket_access" {
  statement {
    sid       = "ListBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.pneumonet.arn]
  }

  statement {
    sid = "ReadWriteObjects"
    # AbortMultipartUpload lets a failed large upload (checkpoints, Parquet parts) clean up after itself.
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.pneumonet.arn}/*"]
  }
}

resource "aws_iam_role_policy" "bucket_access" {
  name   = "pneumonet-bucket-access"
  role   = aws_iam_role.pneumonet.id
  policy = data.aws_iam_policy_document.bucket_access.json
}
