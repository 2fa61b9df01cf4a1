# One bucket per facilitator store and one for the collector, uniform bucket-level access (IAM
# only, no ACLs), never public, versioning off: every artefact is written once (create-only,
# ifGenerationMatch=0), and versions would keep deleted data around after the cleaner removed it.
#
# Lifecycle rules are a backstop behind the cleaner, which deletes in dependency order (markers
# last). They delete each key prefix after a fixed age, markers (and the collector's computation
# records) strictly later than the data they guard.

locals {
  bucket_rules = {
    facilitator = {
      "ingestion"  = var.data_expiration_days
      "validation" = var.data_expiration_days
      "states"     = var.data_expiration_days
      "markers"    = var.marker_expiration_days
    }
    collector = {
      "sums"         = var.data_expiration_days
      "results"      = var.result_expiration_days
      "computations" = max(var.marker_expiration_days, var.result_expiration_days)
    }
  }
}

resource "google_storage_bucket" "store" {
  for_each = local.buckets

  project                     = var.project_id
  name                        = each.value.name
  location                    = var.location
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = merge(var.labels, { "millrace-store" = each.key })

  versioning {
    enabled = false
  }

  dynamic "lifecycle_rule" {
    for_each = local.bucket_rules[each.value.kind]
    content {
      condition {
        age            = lifecycle_rule.value
        matches_prefix = ["${local.key_prefix}${lifecycle_rule.key}/"]
      }
      action {
        type = "Delete"
      }
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    precondition {
      condition     = var.marker_expiration_days > var.data_expiration_days
      error_message = "marker_expiration_days must be greater than data_expiration_days: a marker must outlive the batch it guards."
    }
    precondition {
      condition     = var.result_expiration_days >= var.data_expiration_days
      error_message = "result_expiration_days must be at least data_expiration_days."
    }
  }
}
