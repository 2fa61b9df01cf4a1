output "bus_url" {
  description = "MILLRACE_BUS for every service (the overlay's settings: bus)."
  value       = "pubsub://${var.project_id}"
}

output "store_urls" {
  description = "Store URLs by store (fac-0, fac-1, collector): the overlay's store, peer-store and collector-store, and the ingestor's store0 (fac-0) and store1 (fac-1)."
  value = {
    for k, b in google_storage_bucket.store :
    k => "gs://${b.name}${var.store_key_prefix == "" ? "" : "/${var.store_key_prefix}"}"
  }
}

output "k8s_service_accounts" {
  description = "Google service account e-mail by role (fac-0-intake-worker, mill, ...): the iam.gke.io/gcp-service-account annotation of the ServiceAccount of the same service in the role's namespace."
  value       = { for k, sa in google_service_account.service : k => sa.email }
}

output "topics" {
  description = "Pub/Sub topic id by Millrace topic name."
  value       = { for t, r in google_pubsub_topic.topic : t => r.id }
}

output "subscriptions" {
  description = "Pub/Sub subscription id by Millrace topic name (the subscription of the one group on it)."
  value       = { for t, s in google_pubsub_subscription.group : t => s.id }
}

output "dead_letter_subscriptions" {
  description = "Where Pub/Sub's dead-letter policy puts what it gave up on, by Millrace topic name."
  value       = { for t, s in google_pubsub_subscription.dead_letter : t => s.id }
}
