# Topics, one subscription per (topic, consumer group), and behind each subscription a dead-letter
# topic (with a subscription that keeps what lands there) as a backstop: see
# var.max_delivery_attempts.

resource "google_pubsub_topic" "topic" {
  for_each = local.topics

  project = var.project_id
  name    = each.key
  labels  = var.labels
}

resource "google_pubsub_topic" "dead_letter" {
  for_each = local.topics

  project = var.project_id
  name    = "${local.subscription_name[each.key]}-dlq"
  labels  = var.labels
}

resource "google_pubsub_subscription" "dead_letter" {
  for_each = local.topics

  project                    = var.project_id
  name                       = "${local.subscription_name[each.key]}-dlq"
  topic                      = google_pubsub_topic.dead_letter[each.key].id
  message_retention_duration = "604800s" # 7 days, the longest a subscription keeps messages
  expiration_policy {
    ttl = "" # never expires
  }
  labels = var.labels
}

resource "google_pubsub_subscription" "group" {
  for_each = local.topics

  project = var.project_id
  name    = local.subscription_name[each.key]
  topic   = google_pubsub_topic.topic[each.key].id
  # The bus extends the deadline while a task runs (--lease) and sets it for nack(delay).
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  expiration_policy {
    ttl = ""
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[each.key].id
    max_delivery_attempts = var.max_delivery_attempts
  }
  labels = var.labels
}

# Pub/Sub forwards dead letters as its own service agent: it must publish to the dead-letter
# topic and acknowledge on the source subscription.
locals {
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  for_each = local.topics

  project = var.project_id
  topic   = google_pubsub_topic.dead_letter[each.key].name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = local.topics

  project      = var.project_id
  subscription = google_pubsub_subscription.group[each.key].name
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}
