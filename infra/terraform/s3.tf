# One bucket for everything Pneumonet stores: data/, runs/ (expiring training checkpoints),
# models/ (every trained version, immutable, and the alias pointers; never expired) and scores/.

resource "aws_s3_bucket" "pneumonet" {
  bucket = var.bucket_name
}

# ACLs are disabled: access is decided by IAM and the bucket policy alone.
resource "aws_s3_bucket_ownership_controls" "pneumonet" {
  bucket = aws_s3_bucket.pneumonet.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "pneumonet" {
  bucket = aws_s3_bucket.pneumonet.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Versioning keeps an overwritten model or a deleted dataset recoverable.
resource "aws_s3_bucket_versioning" "pneumonet" {
  bucket = aws_s3_bucket.pneumonet.id

  versioning_configuration {
    status = "Enabled"
  }
}

# SSE-S3 (AES256) needs no KMS permissions on the IRSA role. To use a customer-managed key, set
# sse_algorithm = "aws:kms" with kms_master_key_id, and allow kms:Decrypt/kms:GenerateDataKey on
# that key in iam.tf.
resource "aws_s3_bucket_server_side_encryption_configuration" "pneumonet" {
  bucket = aws_s3_bucket.pneumonet.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "pneumonet" {
  bucket = aws_s3_bucket.pneumonet.id

  # Rules on noncurrent versions need versioning to exist first.
  depends_on = [aws_s3_bucket_versioning.pneumonet]

  # Checkpoints are large and disposable once their run wrote its models under models/.
  rule {
    id     = "expire-checkpoints"
    status = "Enabled"

    filter {
      prefix = var.checkpoint_prefix
    }

    expiration {
      days = var.checkpoint_expiry_days
    }

    noncurrent_version_expiration {
      noncurrent_days = var.checkpoint_expiry_days
    }
  }

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

data "aws_iam_policy_document" "tls_only" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.pneumonet.arn,
      "${aws_s3_bucket.pneumonet.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "tls_only" {
  bucket = aws_s3_bucket.pneumonet.id
  policy = data.aws_iam_policy_document.tls_only.json

  # S3 rejects a bucket policy while the public access block is still being applied.
  depends_on = [aws_s3_bucket_public_access_block.pneumonet]
}
