variable "region" {
  description = "AWS region of the bucket (the EKS cluster's region, to keep S3 traffic in-region)."
  type        = string
}

variable "bucket_name" {
  description = "Name of the S3 bucket for datasets, checkpoints, models and scores (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 characters of lowercase letters, digits, dots and hyphens."
  }
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (arn:aws:iam::<account>:oidc-provider/oidc.eks.<region>.amazonaws.com/id/<id>)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/", var.oidc_provider_arn))
    error_message = "oidc_provider_arn must be an IAM OIDC provider ARN."
  }
}

variable "oidc_provider_url" {
  description = "Issuer URL of the EKS cluster's OIDC provider (aws eks describe-cluster --query cluster.identity.oidc.issuer)."
  type        = string
}

variable "namespace" {
  description = "Kubernetes namespace the Pneumonet pods run in (k8s/overlays/gpu sets the same)."
  type        = string
  default     = "pneumonet"
}

variable "service_account_name" {
  description = "Kubernetes ServiceAccount of every Pneumonet Ray pod (k8s/base/serviceaccount.yaml)."
  type        = string
  default     = "pneumonet"
}

variable "role_name" {
  description = "Name of the IAM role the ServiceAccount assumes (IRSA)."
  type        = string
  default     = "pneumonet-irsa"
}

variable "checkpoint_prefix" {
  description = "Key prefix of the training checkpoints (runs/ under the RayJob's --storage s3://<bucket>)."
  type        = string
  default     = "runs/"

  validation {
    condition     = can(regex("^[^/].*/$", var.checkpoint_prefix))
    error_message = "checkpoint_prefix must not start with '/' and must end with '/'."
  }
}

variable "checkpoint_expiry_days" {
  description = "Days after which objects under checkpoint_prefix (and their noncurrent versions) are deleted."
  type        = number
  default     = 30

  validation {
    condition     = var.checkpoint_expiry_days >= 1
    error_message = "checkpoint_expiry_days must be at least 1."
  }
}

variable "tags" {
  description = "Tags applied to every resource."
  type        = map(string)
  default = {
    project = "pneumonet"
  }
}
