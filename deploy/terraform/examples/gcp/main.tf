# Both facilitators, the collector and the ingestor in one Google Cloud project (one shared
# bus), for the kustomize overlay deploy/k8s/overlays/gcp. The GKE cluster needs workload
# identity enabled. Fill in terraform.tfvars (see terraform.tfvars.example), then:
#
#   terraform init && terraform apply
#   terraform output k8s_service_accounts   # -> the overlay's iam.gke.io/gcp-service-account
#   terraform output store_urls             # -> the overlay's store / peer-store / collector-store,
#                                           #    and the ingestor's store0 (fac-0) / store1 (fac-1)

terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.20"
    }
  }
}

provider "google" {
  project = var.project_id
}

variable "project_id" {
  description = "The project of the bus, the buckets and the GKE cluster."
  type        = string
}

variable "location" {
  description = "Location of the buckets."
  type        = string
  default     = "US"
}

variable "bucket_prefix" {
  description = "Globally unique prefix of the bucket names (BUCKET_PREFIX-fac-0, -fac-1, -collector)."
  type        = string
}

module "millrace" {
  source = "../../modules/gcp"

  project_id    = var.project_id
  location      = var.location
  bucket_prefix = var.bucket_prefix

  labels = {
    app = "millrace"
  }
}

output "bus_url" {
  value = module.millrace.bus_url
}

output "store_urls" {
  value = module.millrace.store_urls
}

output "k8s_service_accounts" {
  value = module.millrace.k8s_service_accounts
}
