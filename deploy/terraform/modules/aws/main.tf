# Millrace on AWS: the SNS topics and SQS queues of the sns-sqs:// bus, the S3 buckets of the
# s3:// stores, and one IAM role per service (IRSA) with only what that service does.
#
# Names follow shared/bus/src/sns_sqs.rs: the Millrace topic "millrace.0.intake" is the SNS topic
# "millrace_0_intake", and consumer group G's queue on it is "millrace_0_intake__G". Every topic
# has ".dead" and ".rejected" companions; those and "{prefix}.results" are read through the
# "inspect" group, as the services create them with --create-topics.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  p          = var.topic_prefix
  facs       = [for f in var.facilitators : tostring(f)]
  account    = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name
  companions = ["", ".dead", ".rejected"]

  # The main topics and the consumer group that works through each.
  main_topics = merge(
    { for f in local.facs : "${local.p}.${f}.intake" => "intake-worker-${f}" },
    { for f in local.facs : "${local.p}.${f}.aggregate" => "aggregate-worker-${f}" },
    var.collector ? {
      "${local.p}.collect" = "mill"
      "${local.p}.results" = "inspect"
    } : {},
  )

  # Every topic this module creates, with its companions, and the one group subscribed to it.
  topics = merge([
    for t, g in local.main_topics : { for s in local.companions : "${t}${s}" => s == "" ? g : "inspect" }
  ]...)

  sns_name   = { for t, _ in local.topics : t => replace(t, ".", "_") }
  queue_name = { for t, g in local.topics : t => "${replace(t, ".", "_")}__${g}" }

  key_prefix = var.store_key_prefix == "" ? "" : "${var.store_key_prefix}/"

  buckets = merge(
    { for f in local.facs : "fac-${f}" => { name = "${var.bucket_prefix}-fac-${f}", kind = "facilitator" } },
    var.collector ? { collector = { name = "${var.bucket_prefix}-collector", kind = "collector" } } : {},
  )
  bucket_name = {
    "fac-0"   = "${var.bucket_prefix}-fac-0"
    "fac-1"   = "${var.bucket_prefix}-fac-1"
    collector = "${var.bucket_prefix}-collector"
  }
}
