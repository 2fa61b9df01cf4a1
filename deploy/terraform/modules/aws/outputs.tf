output "bus_url" {
  description = "MILLRACE_BUS for every service (the overlay's settings: bus)."
  value       = "sns-sqs://${local.region}"
}

output "store_urls" {
  description = "Store URLs by store (fac-0, fac-1, collector): the overlay's store, peer-store and collector-store, and the ingestor's store0 (fac-0) and store1 (fac-1)."
  value = {
    for k, b in aws_s3_bucket.store :
    k => "s3://${b.bucket}${var.store_key_prefix == "" ? "" : "/${var.store_key_prefix}"}?region=${local.region}"
  }
}

output "k8s_role_arns" {
  description = "IAM role ARN by role (fac-0-intake-worker, mill, ...): the eks.amazonaws.com/role-arn annotation of the ServiceAccount of the same service in the role's namespace."
  value       = { for k, r in aws_iam_role.service : k => r.arn }
}

output "topic_arns" {
  description = "SNS topic ARN by Millrace topic name."
  value       = { for t, r in aws_sns_topic.topic : t => r.arn }
}

output "queue_urls" {
  description = "SQS queue URL by Millrace topic name (the queue of the one group on it)."
  value       = { for t, q in aws_sqs_queue.group : t => q.url }
}

output "dead_letter_queue_urls" {
  description = "The SQS redrive target behind each queue, by Millrace topic name."
  value       = { for t, q in aws_sqs_queue.dead_letter : t => q.url }
}
