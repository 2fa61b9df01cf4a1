# One Google service account per service, bound to exactly one Kubernetes ServiceAccount through
# workload identity, with only what that service does (see deploy/README.md, "Least privilege"):
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
# Every bus user may also view the topics and subscriptions it checks at start-up (each with its
# .dead and .rejected companions) and publish to the companions of what it consumes. A consumer
# also publishes to the topic it consumes: on Pub/Sub, nack(delay) republishes the message with a
# not-before time and acks the original (shared/bus/src/pubsub.rs). Object
# permissions are limited to key prefixes with IAM conditions (the buckets use uniform
# bucket-level access); listing is a bucket-level permission, hence the Bucket clause.

locals {
  short_name = {
    "workflow-manager" = "wm"
    "intake-worker"    = "intake"
    "aggregate-worker" = "aggregate"
    "cleaner"          = "cleaner"
  }

  facilitator_roles = merge([
    for f in local.facs : {
      "fac-${f}-workflow-manager" = {
        account_id      = "${var.name_prefix}-f${f}-wm"
        namespace       = var.k8s_namespaces[f]
        service_account = "workflow-manager"
        checks          = ["${local.p}.${f}.intake=intake-worker-${f}", "${local.p}.${f}.aggregate=aggregate-worker-${f}"]
        publish         = ["${local.p}.${f}.intake", "${local.p}.${f}.aggregate"]
        consume         = []
        # Facilitator 0, the leader, also writes each window's manifest to both stores.
        storage = f == "0" ? [
          { bucket = "fac-${f}", read = ["markers/", "manifests/", "excluded/"], write = ["markers/", "manifests/", "excluded/"], delete = [] },
          { bucket = "fac-${1 - tonumber(f)}", read = ["manifests/"], write = ["manifests/"], delete = [] },
          ] : [
          { bucket = "fac-${f}", read = ["markers/", "manifests/", "excluded/", "computations/"], write = ["markers/", "excluded/", "computations/"], delete = [] },
        ]
      }
      "fac-${f}-intake-worker" = {
        account_id      = "${var.name_prefix}-f${f}-intake"
        namespace       = var.k8s_namespaces[f]
        service_account = "intake-worker"
        checks          = ["${local.p}.${f}.intake=intake-worker-${f}"]
        publish         = ["${local.p}.${f}.intake", "${local.p}.${f}.intake.dead", "${local.p}.${f}.intake.rejected"]
        consume         = ["${local.p}.${f}.intake=intake-worker-${f}"]
        storage = [
          { bucket = "fac-${f}", read = ["ingestion/", "validation/", "states/"], write = ["validation/", "states/"], delete = [] },
          { bucket = "fac-${1 - tonumber(f)}", read = ["validation/"], write = ["validation/"], delete = [] },
        ]
      }
      "fac-${f}-aggregate-worker" = {
        account_id      = "${var.name_prefix}-f${f}-aggregate"
        namespace       = var.k8s_namespaces[f]
        service_account = "aggregate-worker"
        checks          = ["${local.p}.${f}.aggregate=aggregate-worker-${f}", "${local.p}.collect=mill"]
        publish         = ["${local.p}.${f}.aggregate", "${local.p}.${f}.aggregate.dead", "${local.p}.${f}.aggregate.rejected", "${local.p}.collect"]
        consume         = ["${local.p}.${f}.aggregate=aggregate-worker-${f}"]
        storage = [
          { bucket = "fac-${f}", read = ["manifests/", "validation/", "states/"], write = [], delete = [] },
          { bucket = "collector", read = ["sums/"], write = ["sums/"], delete = [] },
        ]
      }
      "fac-${f}-cleaner" = {
        account_id      = "${var.name_prefix}-f${f}-cleaner"
        namespace       = var.k8s_namespaces[f]
        service_account = "cleaner"
        checks          = []
        publish         = []
        consume         = []
        storage = [
          { bucket = "fac-${f}", read = ["markers/", "manifests/", "excluded/", "computations/"], write = ["excluded/"], delete = ["ingestion/", "validation/", "states/", "markers/", "manifests/", "excluded/", "computations/"] },
        ]
      }
    }
  ]...)

  collector_roles = var.collector ? {
    "mill" = {
      account_id      = "${var.name_prefix}-mill"
      namespace       = var.k8s_collector_namespace
      service_account = "mill"
      checks          = ["${local.p}.collect=mill", "${local.p}.results=inspect"]
      publish         = ["${local.p}.collect", "${local.p}.collect.dead", "${local.p}.collect.rejected", "${local.p}.results"]
      consume         = ["${local.p}.collect=mill"]
      storage = [
        { bucket = "collector", read = ["sums/", "results/", "computations/", "waiting/"], write = ["results/", "computations/", "waiting/"], delete = ["computations/", "waiting/"] },
      ]
    }
    "cleaner-collector" = {
      account_id      = "${var.name_prefix}-collector-cleaner"
      namespace       = var.k8s_collector_namespace
      service_account = "cleaner-collector"
      checks          = []
      publish         = []
      consume         = []
      storage = [
        { bucket = "collector", read = ["computations/", "waiting/"], write = [], delete = ["sums/", "results/", "computations/", "waiting/"] },
      ]
    }
  } : {}

  # The ingestor writes every batch to both facilitators' stores, whichever of them this
  # instance of the module creates.
  ingestor_roles = var.ingestor ? {
    "ingestor" = {
      account_id      = "${var.name_prefix}-ingestor"
      namespace       = var.k8s_ingestor_namespace
      service_account = "ingestor"
      checks          = []
      publish         = []
      consume         = []
      storage = [
        { bucket = "fac-0", read = ["ingestion/"], write = ["ingestion/"], delete = [] },
        { bucket = "fac-1", read = ["ingestion/"], write = ["ingestion/"], delete = [] },
      ]
    }
  } : {}

  roles = merge(local.facilitator_roles, local.collector_roles, local.ingestor_roles)

  # "topic=group" pairs, expanded: each checked topic with its companions, and the subscription
  # of the one group on each (the companions' group is "inspect").
  role_bus = {
    for name, r in local.roles : name => {
      check_topics = distinct(flatten([
        for c in r.checks : [for s in local.companions : "${split("=", c)[0]}${s}"]
      ]))
      check_subscriptions = distinct(flatten([
        for c in r.checks : [for s in local.companions : "${split("=", c)[0]}${s}~${s == "" ? split("=", c)[1] : "inspect"}"]
      ]))
      consume = [for c in r.consume : "${split("=", c)[0]}~${split("=", c)[1]}"]
    }
  }

  # One binding per (service, resource, role), keyed so that for_each is stable.
  topic_bindings = merge(
    merge([for name, b in local.role_bus : {
      for t in b.check_topics : "${name}|${t}|viewer" => { role_key = name, topic = t, role = "roles/pubsub.viewer" }
    }]...),
    merge([for name, r in local.roles : {
      for t in r.publish : "${name}|${t}|publisher" => { role_key = name, topic = t, role = "roles/pubsub.publisher" }
    }]...),
  )

  subscription_bindings = merge(
    merge([for name, b in local.role_bus : {
      for s in b.check_subscriptions : "${name}|${s}|viewer" => { role_key = name, subscription = s, role = "roles/pubsub.viewer" }
    }]...),
    merge([for name, b in local.role_bus : {
      for s in b.consume : "${name}|${s}|subscriber" => { role_key = name, subscription = s, role = "roles/pubsub.subscriber" }
    }]...),
  )

  object_prefix = { for k, n in local.bucket_name : k => "projects/_/buckets/${n}/objects/${local.key_prefix}" }

  storage_bindings = merge(flatten([
    for name, r in local.roles : [
      for s in r.storage : [
        { for x in [s] : "${name}|${x.bucket}|read" => {
          role_key = name
          bucket   = x.bucket
          role     = "roles/storage.objectViewer"
          title    = "millrace read ${join(" ", x.read)}"
          expression = join(" || ", concat(
            ["resource.type == \"storage.googleapis.com/Bucket\""],
            [for k in x.read : "resource.name.startsWith(\"${local.object_prefix[x.bucket]}${k}\")"],
          ))
        } if length(x.read) > 0 },
        { for x in [s] : "${name}|${x.bucket}|write" => {
          role_key   = name
          bucket     = x.bucket
          role       = "roles/storage.objectCreator"
          title      = "millrace create ${join(" ", x.write)}"
          expression = join(" || ", [for k in x.write : "resource.name.startsWith(\"${local.object_prefix[x.bucket]}${k}\")"])
        } if length(x.write) > 0 },
        { for x in [s] : "${name}|${x.bucket}|delete" => {
          role_key   = name
          bucket     = x.bucket
          role       = "projects/${var.project_id}/roles/${local.deleter_role_id}"
          title      = "millrace delete ${join(" ", x.delete)}"
          expression = join(" || ", [for k in x.delete : "resource.name.startsWith(\"${local.object_prefix[x.bucket]}${k}\")"])
        } if length(x.delete) > 0 },
      ]
    ]
  ])...)

  deleter_role_id = "${replace(var.name_prefix, "-", "_")}_object_deleter"
}

resource "google_service_account" "service" {
  for_each = local.roles

  project      = var.project_id
  account_id   = each.value.account_id
  display_name = "Millrace ${each.value.service_account} (${each.value.namespace})"
}

# Workload identity: the Kubernetes ServiceAccount NAMESPACE/NAME may act as this account.
resource "google_service_account_iam_member" "workload_identity" {
  for_each = local.roles

  service_account_id = google_service_account.service[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_identity_pool}[${each.value.namespace}/${each.value.service_account}]"
}

# Deleting objects, and nothing else (no predefined role is that narrow).
resource "google_project_iam_custom_role" "object_deleter" {
  project     = var.project_id
  role_id     = local.deleter_role_id
  title       = "Millrace object deleter"
  description = "Delete objects (granted per bucket and key prefix to Millrace's cleaners and, for its computation records, to the mill)."
  permissions = ["storage.objects.delete"]
}

resource "google_pubsub_topic_iam_member" "service" {
  for_each = local.topic_bindings

  project = var.project_id
  topic   = each.value.topic
  role    = each.value.role
  member  = "serviceAccount:${google_service_account.service[each.value.role_key].email}"

  depends_on = [google_pubsub_topic.topic]
}

resource "google_pubsub_subscription_iam_member" "service" {
  for_each = local.subscription_bindings

  project      = var.project_id
  subscription = each.value.subscription
  role         = each.value.role
  member       = "serviceAccount:${google_service_account.service[each.value.role_key].email}"

  depends_on = [google_pubsub_subscription.group]
}

resource "google_storage_bucket_iam_member" "service" {
  for_each = local.storage_bindings

  bucket = local.bucket_name[each.value.bucket]
  role   = each.value.role
  member = "serviceAccount:${google_service_account.service[each.value.role_key].email}"
  condition {
    title      = each.value.title
    expression = each.value.expression
  }

  depends_on = [google_storage_bucket.store, google_project_iam_custom_role.object_deleter]
}
