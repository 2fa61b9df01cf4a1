variable "name_prefix" {
  description = "Prefix of the IAM role names (NAME_PREFIX-fac-0-intake-worker, NAME_PREFIX-mill, ...)."
  type        = string
  default     = "millrace"
  validation {
    condition     = can(regex("^[A-Za-z0-9-]{1,24}$", var.name_prefix))
    error_message = "name_prefix: 1-24 letters, digits or hyphens."
  }
}

variable "topic_prefix" {
  description = "The services' --topic-prefix (MILLRACE_TOPIC_PREFIX). Topic PREFIX.F.intake becomes the SNS topic PREFIX_F_intake."
  type        = string
  default     = "millrace"
  validation {
    # Letters, digits and hyphens map one-to-one onto SNS/SQS names (shared/bus/src/sns_sqs.rs);
    # anything else would get a hashed name there that this module does not compute.
    condition     = can(regex("^[A-Za-z0-9-]{1,30}$", var.topic_prefix))
    error_message = "topic_prefix: 1-30 letters, digits or hyphens."
  }
}

variable "facilitators" {
  description = "Which facilitators' topics, queues, buckets and roles to create: [0, 1] for both (one shared bus), or one of them."
  type        = list(number)
  default     = [0, 1]
  validation {
    condition     = length(var.facilitators) > 0 && alltrue([for f in var.facilitators : contains([0, 1], f)])
    error_message = "facilitators: a non-empty list of 0 and/or 1."
  }
}

variable "collector" {
  description = "Also create the collector's part: its bucket, the collect and results topics, the mill's and the collector cleaner's roles."
  type        = bool
  default     = true
}

variable "bucket_prefix" {
  description = "Bucket names are BUCKET_PREFIX-fac-0, BUCKET_PREFIX-fac-1 and BUCKET_PREFIX-collector. Bucket names are global: make it yours."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,50}$", var.bucket_prefix))
    error_message = "bucket_prefix: lower-case letters, digits and hyphens, 2-51 characters."
  }
}

variable "store_key_prefix" {
  description = "The PREFIX of the store URLs (s3://BUCKET/PREFIX), without slashes at either end; empty for none. Lifecycle rules and IAM policies apply under it."
  type        = string
  default     = ""
  validation {
    condition     = var.store_key_prefix == "" || can(regex("^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", var.store_key_prefix))
    error_message = "store_key_prefix: empty, or path segments of letters, digits, _ and - separated by /."
  }
}

variable "data_expiration_days" {
  description = "S3 lifecycle backstop: ingestion batches, validations, verify states and sum parts expire after this many days. The cleaner normally deletes them first (after its TTL, 7 days by default, once their window is settled); keep this longer than the TTL plus the aggregations' max_age."
  type        = number
  default     = 30
  validation {
    condition     = var.data_expiration_days >= 8
    error_message = "data_expiration_days must be at least 8 (longer than the cleaner's default TTL of 7 days)."
  }
}

variable "marker_expiration_days" {
  description = "S3 lifecycle backstop for markers/ (and the collector's computations/): must be longer than data_expiration_days, so that a marker never disappears while the batch it guards is still there (a later pass would schedule it again)."
  type        = number
  default     = 45
}

variable "result_expiration_days" {
  description = "S3 lifecycle for the collector's results/ (the published results)."
  type        = number
  default     = 90
}

variable "max_receive_count" {
  description = "SQS redrive: receives of one message before SQS moves it to the queue's _dlq queue. The worker loop moves a message to {topic}.dead itself after --max-attempts (8 by default), with the reason; this is the backstop for messages that crash a worker before it can. Keep it above every service's --max-attempts."
  type        = number
  default     = 30
  validation {
    condition     = var.max_receive_count > 8 && var.max_receive_count <= 1000
    error_message = "max_receive_count must be above the default --max-attempts (8) and at most 1000."
  }
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (IRSA), e.g. arn:aws:iam::111122223333:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE."
  type        = string
}

variable "eks_oidc_provider_url" {
  description = "The cluster's OIDC issuer URL (with or without https://), e.g. https://oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE."
  type        = string
}

variable "k8s_namespaces" {
  description = "Kubernetes namespace of each facilitator's services (the kustomize overlay's namespace), keyed by facilitator index."
  type        = map(string)
  default = {
    "0" = "millrace-fac-0"
    "1" = "millrace-fac-1"
  }
}

variable "ingestor" {
  description = "Also create the ingestor's role: it creates (and reads back) ingestion/ in both facilitators' buckets and uses no bus. The ingestor belongs to the ingestor organisation; create it in the instance of this module that organisation's cluster trusts."
  type        = bool
  default     = true
}

variable "k8s_ingestor_namespace" {
  description = "Kubernetes namespace of the ingestor (the base runs it beside facilitator 0)."
  type        = string
  default     = "millrace-fac-0"
}

variable "k8s_collector_namespace" {
  description = "Kubernetes namespace of the mill and the collector cleaner (the base runs them beside facilitator 0)."
  type        = string
  default     = "millrace-fac-0"
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
