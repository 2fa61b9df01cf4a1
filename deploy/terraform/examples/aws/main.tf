# Both facilitators, the collector and the ingestor in one AWS account and region (one shared
# bus), for the kustomize overlay deploy/k8s/overlays/aws. Fill in terraform.tfvars (see
# terraform.tfvars.example), then:
#
#   terraform init && terraform apply
#   terraform output k8s_role_arns     # -> the overlay's eks.amazonaws.com/role-arn annotations
#   terraform output store_urls        # -> the overlay's store / peer-store / collector-store,
#                                      #    and the ingestor's store0 (fac-0) / store1 (fac-1)

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region of the bus, the buckets and the EKS cluster."
  type        = string
  default     = "us-east-1"
}

variable "bucket_prefix" {
  description = "Globally unique prefix of the bucket names (BUCKET_PREFIX-fac-0, -fac-1, -collector)."
  type        = string
}

variable "eks_cluster_name" {
  description = "The EKS cluster the services run in (its IAM OIDC provider must exist: eksctl utils associate-iam-oidc-provider)."
  type        = string
}

data "aws_eks_cluster" "this" {
  name = var.eks_cluster_name
}

data "aws_iam_openid_connect_provider" "this" {
  url = data.aws_eks_cluster.this.identity[0].oidc[0].issuer
}

module "millrace" {
  source = "../../modules/aws"

  bucket_prefix         = var.bucket_prefix
  eks_oidc_provider_arn = data.aws_iam_openid_connect_provider.this.arn
  eks_oidc_provider_url = data.aws_eks_cluster.this.identity[0].oidc[0].issuer

  tags = {
    app = "millrace"
  }
}

output "bus_url" {
  value = module.millrace.bus_url
}

output "store_urls" {
  value = module.millrace.store_urls
}

output "k8s_role_arns" {
  value = module.millrace.k8s_role_arns
}
