output "bucket_name" {
  description = "The Pneumonet bucket: use it in the s3:// URIs of k8s/overlays/gpu."
  value       = aws_s3_bucket.pneumonet.bucket
}

output "bucket_arn" {
  description = "ARN of the Pneumonet bucket."
  value       = aws_s3_bucket.pneumonet.arn
}

output "role_arn" {
  description = "IRSA role: the eks.amazonaws.com/role-arn annotation of the pneumonet ServiceAccount (k8s/overlays/gpu)."
  value       = aws_iam_role.pneumonet.arn
}
