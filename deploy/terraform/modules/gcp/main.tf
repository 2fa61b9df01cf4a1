# Millrace on Google Cloud: the Pub/Sub topics and subscriptions of the pubsub:// bus, the
# Cloud Storage buckets of the gs:// stores, and one service account per service (GKE workload
# identity) with only what that service does.
#
# Names follow shared/bus/src/pubsub.rs (topic_id, subscription_id): a Millrace topic is the
# Pub/Sub topic of the same name (Pub/Sub ids allow the dots), and consumer group G's
# subscription on topic T is "T~G". Every
# topic has ".dead" and ".rejected" companions; those and "{prefix}.results" are read through
# the "inspect" group, as the services create them with --create-topics.

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  p          = var.topic_prefix
  facs       = [for f in var.facilitators : tostring(f)]
  companions = ["", ".dead", ".rejected"]

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

  subscription_name = { for t, g in local.topics : t => "${t}~${g}" }

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

  workload_identity_pool = coalesce(var.workload_identity_pool, "${var.project_id}.svc.id.goog")
}
