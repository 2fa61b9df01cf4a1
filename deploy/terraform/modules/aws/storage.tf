# One bucket per facilitator store and one for the collector. Versioning stays off: every
# artefact is written once (create-only, If-None-Match: *), the mill's computation record is the
# only object ever overwritten, and versions would keep deleted data around after the cleaner
# (and the lifecycle rules) removed it.
#
# Lifecycle rules are a backstop behind the cleaner, which deletes in dependency order (markers
# last) once data is past its TTL and settled. They expire each key prefix after a fixed age,
# markers (and the collector's computation records) strictly later than the data they guard:
# a marker is written after its batch lands, so expiring markers later than batches means no
# marker is ever gone while its batch is still there.

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

resource "aws_s3_bucket" "store" {
  for_each = local.buckets

  bucket = each.value.name
  tags   = merge(var.tags, { "millrace-store" = each.key })
}

resource "aws_s3_bucket_versioning" "store" {
  for_each = local.buckets

  bucket = aws_s3_bucket.store[each.key].id
  versioning_configuration {
    status = "Disabled"
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  for_each = local.buckets

  bucket                  = aws_s3_bucket.store[each.key].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "store" {
  for_each = local.buckets

  bucket = aws_s3_bucket.store[each.key].id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  for_each = local.buckets

  bucket = aws_s3_bucket.store[each.key].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

data "aws_iam_policy_document" "bucket" {
  for_each = local.buckets

  statement {
    sid     = "TLSOnly"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.store[each.key].arn,
      "${aws_s3_bucket.store[each.key].arn}/*",
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

resource "aws_s3_bucket_policy" "store" {
  for_each = local.buckets

  bucket = aws_s3_bucket.store[each.key].id
  policy = data.aws_iam_policy_document.bucket[each.key].json

  depends_on = [aws_s3_bucket_public_access_block.store]
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  for_each = local.buckets

  bucket = aws_s3_bucket.store[each.key].id

  dynamic "rule" {
    for_each = local.bucket_rules[each.value.kind]
    content {
      id     = "expire-${rule.key}"
      status = "Enabled"
      filter {
        prefix = "${local.key_prefix}${rule.key}/"
      }
      expiration {
        days = rule.value
      }
    }
  }

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
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
