# One IAM role per service, assumed through IRSA by exactly one Kubernetes ServiceAccount, with
# only what that service does (see deploy/README.md, "Least privilege"):
#
#   workflow-manager  list its store; read and create markers/ and excluded/ (batches left out of
#                     a window); read manifests/; publish intake + aggregate tasks. Facilitator 0's
#                     (the leader's) also creates manifests/ in its store and in the peer's;
#                     facilitator 1's records windows it gave up on in computations/
#   intake-worker     consume intake; read ingestion/; write validation/ + states/ in its store
#                     and validation/ in the peer's store
#   aggregate-worker  consume aggregate; read manifests/ + validation/ + states/; write sums/ in the
#                     collector's store; publish sum-part-ready on collect
#   mill              consume collect; read sums/; write results/ + computations/ + waiting/ (its
#                     index of windows waiting for a part, deleted when they end); publish results
#   cleaner           list its store, read markers/ + manifests/ (is a batch's window settled? is a
#                     batch in its window's manifest?), record late batches in excluded/, delete;
#                     no bus
#   ingestor          create ingestion/ in both facilitators' stores, and read it back (a create
#                     retried after a lost answer compares what is there); no bus. It belongs to
#                     the ingestor organisation (var.ingestor, var.k8s_ingestor_namespace)
#
# Every bus user may also look up the topics and queues it checks at start-up (each with its
# .dead and .rejected companions) and publish to the companions of what it consumes (the worker
# loop dead-letters and rejects there). Reading an object needs s3:ListBucket too, or S3 answers
# a missing key with 403 instead of 404; that is why every reader may list its bucket.
#
# ARNs are built from names, so that a role may refer to a topic, queue or bucket that another
# instance of this module created (say, the collect topic when collector = false here).

locals {
  sns_arn_prefix = "arn:${local.partition}:sns:${local.region}:${local.account}:"
  sqs_arn_prefix = "arn:${local.partition}:sqs:${local.region}:${local.account}:"

  facilitator_roles = merge([
    for f in local.facs : {
      "fac-${f}-workflow-manager" = {
        namespace       = var.k8s_namespaces[f]
        service_account = "workflow-manager"
        checks          = ["${local.p}.${f}.intake=intake-worker-${f}", "${local.p}.${f}.aggregate=aggregate-worker-${f}"]
        publish         = ["${local.p}.${f}.intake", "${local.p}.${f}.aggregate"]
        consume         = []
        # Facilitator 0, the leader, also writes each window's manifest to both stores.
        s3 = f == "0" ? [
          { bucket = "fac-${f}", read = ["markers/", "manifests/", "excluded/"], write = ["markers/", "manifests/", "excluded/"], delete = [] },
          { bucket = "fac-${1 - tonumber(f)}", read = ["manifests/"], write = ["manifests/"], delete = [] },
          ] : [
          { bucket = "fac-${f}", read = ["markers/", "manifests/", "excluded/", "computations/"], write = ["markers/", "excluded/", "computations/"], delete = [] },
        ]
      }
      "fac-${f}-intake-worker" = {
        namespace       = var.k8s_namespaces[f]
        service_account = "intake-worker"
        checks          = ["${local.p}.${f}.intake=intake-worker-${f}"]
        publish         = ["${local.p}.${f}.intake.dead", "${local.p}.${f}.intake.rejected"]
        consume         = ["${local.p}.${f}.intake=intake-worker-${f}"]
        s3 = [
          { bucket = "fac-${f}", read = ["ingestion/", "validation/", "states/"], write = ["validation/", "states/"], delete = [] },
          { bucket = "fac-${1 - tonumber(f)}", read = ["validation/"], write = ["validation/"], delete = [] },
        ]
      }
      "fac-${f}-aggregate-worker" = {
        namespace       = var.k8s_namespaces[f]
        service_account = "aggregate-worker"
        checks          = ["${local.p}.${f}.aggregate=aggregate-worker-${f}", "${local.p}.collect=mill"]
        publish         = ["${local.p}.${f}.aggregate.dead", "${local.p}.${f}.aggregate.rejected", "${local.p}.collect"]
        consume         = ["${local.p}.${f}.aggregate=aggregate-worker-${f}"]
        s3 = [
          { bucket = "fac-${f}", read = ["manifests/", "validation/", "states/"], write = [], delete = [] },
          { bucket = "collector", read = ["sums/"], write = ["sums/"], delete = [] },
        ]
      }
      "fac-${f}-cleaner" = {
        namespace       = var.k8s_namespaces[f]
        service_account = "cleaner"
        checks          = []
        publish         = []
        consume         = []
        s3 = [
          { bucket = "fac-${f}", read = ["markers/", "manifests/", "excluded/", "computations/"], write = ["excluded/"], delete = ["ingestion/", "validation/", "states/", "markers/", "manifests/", "excluded/", "computations/"] },
        ]
      }
    }
  ]...)

  collector_roles = var.collector ? {
    "mill" = {
      namespace       = var.k8s_collector_namespace
      service_account = "mill"
      checks          = ["${local.p}.collect=mill", "${local.p}.results=inspect"]
      publish         = ["${local.p}.collect.dead", "${local.p}.collect.rejected", "${local.p}.results"]
      consume         = ["${local.p}.collect=mill"]
      s3 = [
        { bucket = "collector", read = ["sums/", "results/", "computations/", "waiting/"], write = ["results/", "computations/", "waiting/"], delete = ["waiting/"] },
      ]
    }
    "cleaner-collector" = {
      namespace       = var.k8s_collector_namespace
      service_account = "cleaner-collector"
      checks          = []
      publish         = []
      consume         = []
      s3 = [
        { bucket = "collector", read = ["computations/", "waiting/"], write = [], delete = ["sums/", "results/", "computations/", "waiting/"] },
      ]
    }
  } : {}

  # The ingestor writes every batch to both facilitators' stores, whichever of them this
  # instance of the module creates.
  ingestor_roles = var.ingestor ? {
    "ingestor" = {
      namespace       = var.k8s_ingestor_namespace
      service_account = "ingestor"
      checks          = []
      publish         = []
      consume         = []
      s3 = [
        { bucket = "fac-0", read = ["ingestion/"], write = ["ingestion/"], delete = [] },
        { bucket = "fac-1", read = ["ingestion/"], write = ["ingestion/"], delete = [] },
      ]
    }
  } : {}

  roles = merge(local.facilitator_roles, local.collector_roles, local.ingestor_roles)

  # "topic=group" pairs, expanded: each checked topic with its companions, and the queue of the
  # one group on each.
  role_bus = {
    for name, r in local.roles : name => {
      check_topics = flatten([
        for c in r.checks : [for s in local.companions : "${local.sns_arn_prefix}${replace(split("=", c)[0], ".", "_")}${replace(s, ".", "_")}"]
      ])
      check_queues = flatten([
        for c in r.checks : [
          for s in local.companions :
          "${local.sqs_arn_prefix}${replace(split("=", c)[0], ".", "_")}${replace(s, ".", "_")}__${s == "" ? split("=", c)[1] : "inspect"}"
        ]
      ])
      publish = [for t in r.publish : "${local.sns_arn_prefix}${replace(t, ".", "_")}"]
      consume = [for c in r.consume : "${local.sqs_arn_prefix}${replace(split("=", c)[0], ".", "_")}__${split("=", c)[1]}"]
    }
  }

  oidc_host = trimprefix(var.eks_oidc_provider_url, "https://")
}

data "aws_iam_policy_document" "trust" {
  for_each = local.roles

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_host}:sub"
      values   = ["system:serviceaccount:${each.value.namespace}:${each.value.service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "permissions" {
  for_each = local.roles

  # The bus finds a topic's ARN by listing the account's topics once (ListTopics has no
  # resource-level permissions).
  dynamic "statement" {
    for_each = length(each.value.checks) > 0 ? [1] : []
    content {
      sid       = "BusFindTopics"
      actions   = ["sns:ListTopics"]
      resources = ["*"]
    }
  }

  # The start-up check: topic, subscription with raw delivery, queue.
  dynamic "statement" {
    for_each = length(each.value.checks) > 0 ? [1] : []
    content {
      sid       = "BusCheckTopics"
      actions   = ["sns:GetTopicAttributes", "sns:ListSubscriptionsByTopic"]
      resources = local.role_bus[each.key].check_topics
    }
  }
  dynamic "statement" {
    for_each = length(each.value.checks) > 0 ? [1] : []
    content {
      sid       = "BusCheckSubscriptions"
      actions   = ["sns:GetSubscriptionAttributes"]
      resources = [for arn in local.role_bus[each.key].check_topics : "${arn}:*"]
    }
  }
  dynamic "statement" {
    for_each = length(each.value.checks) > 0 ? [1] : []
    content {
      sid       = "BusCheckQueues"
      actions   = ["sqs:GetQueueUrl", "sqs:GetQueueAttributes"]
      resources = local.role_bus[each.key].check_queues
    }
  }

  dynamic "statement" {
    for_each = length(each.value.publish) > 0 ? [1] : []
    content {
      sid       = "BusPublish"
      actions   = ["sns:Publish"]
      resources = local.role_bus[each.key].publish
    }
  }

  dynamic "statement" {
    for_each = length(each.value.consume) > 0 ? [1] : []
    content {
      sid       = "BusConsume"
      actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"]
      resources = local.role_bus[each.key].consume
    }
  }

  # Object storage, per bucket and key prefix.
  dynamic "statement" {
    for_each = { for s in each.value.s3 : s.bucket => s if length(s.read) > 0 || length(s.delete) > 0 }
    content {
      actions   = ["s3:ListBucket"]
      resources = ["arn:${local.partition}:s3:::${local.bucket_name[statement.key]}"]
    }
  }
  dynamic "statement" {
    for_each = { for s in each.value.s3 : s.bucket => s if length(s.read) > 0 }
    content {
      actions   = ["s3:GetObject"]
      resources = [for k in statement.value.read : "arn:${local.partition}:s3:::${local.bucket_name[statement.key]}/${local.key_prefix}${k}*"]
    }
  }
  dynamic "statement" {
    for_each = { for s in each.value.s3 : s.bucket => s if length(s.write) > 0 }
    content {
      actions   = ["s3:PutObject"]
      resources = [for k in statement.value.write : "arn:${local.partition}:s3:::${local.bucket_name[statement.key]}/${local.key_prefix}${k}*"]
    }
  }
  dynamic "statement" {
    for_each = { for s in each.value.s3 : s.bucket => s if length(s.delete) > 0 }
    content {
      actions   = ["s3:DeleteObject"]
      resources = [for k in statement.value.delete : "arn:${local.partition}:s3:::${local.bucket_name[statement.key]}/${local.key_prefix}${k}*"]
    }
  }
}

resource "aws_iam_role" "service" {
  for_each = local.roles

  name               = "${var.name_prefix}-${each.key}"
  description        = "Millrace ${each.value.service_account} (${each.value.namespace}), through IRSA"
  assume_role_policy = data.aws_iam_policy_document.trust[each.key].json
  tags               = var.tags
}

resource "aws_iam_role_policy" "service" {
  for_each = local.roles

  name   = "millrace"
  role   = aws_iam_role.service[each.key].id
  policy = data.aws_iam_policy_document.permissions[each.key].json
}
