//! Object storage for Millrace: one [`Store`] over the `object_store` crate (local files,
//! in-memory, and the clouds' object stores behind one trait), with the operations the services
//! need and nothing else:
//!
//! * [`Store::create`]: create-only writes (`PutMode::Create`, i.e. S3 `If-None-Match: *`, GCS
//!   `ifGenerationMatch=0`). Derived artefacts are deterministic, so a rerun that finds the object
//!   already there compares the bytes and moves on instead of overwriting.
//! * [`markers`]: the workflow-manager's idempotency markers, built from create-only writes alone
//!   so they behave the same on every backend.
//! * listing by prefix, reads, deletes, and keys checked before they reach the backend.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

#[cfg(any(feature = "s3", feature = "gcs"))]
pub mod cloud;
pub mod markers;

/// Errors from object storage, each naming the key involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("object key {key:?} is not allowed: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("{key}: not found")]
    NotFound { key: String },
    #[error("{key}: already exists with different content (a create-only object may not change)")]
    Conflict { key: String },
    #[error("{key}: {message}")]
    Backend { key: String, message: String },
}

impl StoreError {
    fn backend(key: &str, e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                key: key.to_string(),
            },
            other => StoreError::Backend {
                key: key.to_string(),
                message: other.to_string(),
            },
        }
    }
}

/// What a create-only write found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// We wrote the object.
    New,
    /// It was already there with exactly these bytes (a rerun).
    AlreadyThere,
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub last_modified: DateTime<Utc>,
    pub size: u64,
}

/// A bucket (or directory) of objects, named by a URL.
#[derive(Clone, Debug)]
pub struct Store {
    url: String,
    inner: Arc<dyn ObjectStore>,
}

/// `url` with any password replaced, for error messages and logs.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

fn check_key(key: &str) -> Result<Path, StoreError> {
    let bad = |reason: &str| StoreError::InvalidKey {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
        return Err(bad("empty, or starts or ends with '/'"));
    }
    if key
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(bad("has an empty, '.' or '..' segment"));
    }
    Path::parse(key).map_err(|e| bad(&e.to_string()))
}

impl Store {
    /// An error from a write. `NotFound` on a write means the bucket (or base directory) itself
    /// is missing, which is worth saying in so many words.
    fn write_error(&self, key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { source, .. } => StoreError::Backend {
                key: key.to_string(),
                message: format!(
                    "cannot write: the bucket or directory of store {} does not exist ({source})",
                    redacted(&self.url)
                ),
            },
            other => StoreError::backend(key, other),
        }
    }

    /// Opens the store named by `url`:
    ///
    /// * `file:///srv/millrace/alpha`: a local directory (created if missing);
    /// * `memory://`: a new, empty in-process store;
    /// * `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`: Amazon S3 or an S3-compatible store;
    /// * `gs://BUCKET[/PREFIX][?endpoint=URL]`: Google Cloud Storage.
    ///
    /// Cloud credentials are ambient; see [`cloud`] for where they and emulator endpoints come
    /// from.
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: redacted(url),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| invalid("not an absolute local path".to_string()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| invalid(e.to_string()))?
                    .with_automatic_cleanup(true);
                Ok(Store {
                    url: url.to_string(),
                    inner: Arc::new(fs),
                })
            }
            "memory" => Ok(Store::memory()),
            #[cfg(feature = "s3")]
            "s3" => cloud::open_s3(url, &parsed).map_err(invalid),
            #[cfg(feature = "gcs")]
            "gs" => cloud::open_gcs(url, &parsed).map_err(invalid),
            #[allow(unreachable_patterns)]
            "s3" | "gs" => Err(invalid(format!(
                "the {} backend is not built into this binary (cargo feature {})",
                parsed.scheme(),
                if parsed.scheme() == "s3" { "s3" } else { "gcs" }
            ))),
            other => Err(invalid(format!(
                "unknown scheme {other:?}; expected file, memory, s3 or gs"
            ))),
        }
    }

    /// Wraps an already built `object_store` backend (tests, or callers with their own client).
    pub fn from_object_store(url: impl Into<String>, inner: Arc<dyn ObjectStore>) -> Store {
        Store {
            url: url.into(),
            inner,
        }
    }

    /// A new, empty in-process store.
    pub fn memory() -> Store {
        Store {
            url: "memory://".to_string(),
            inner: Arc::new(InMemory::new()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Reads an object; `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = check_key(key)?;
        match self.inner.get(&path).await {
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(|e| StoreError::backend(key, e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::backend(key, e)),
        }
    }

    /// Reads an object that must exist.
    pub async fn get_required(&self, key: &str) -> Result<Bytes, StoreError> {
        self.get(key).await?.ok_or_else(|| StoreError::NotFound {
            key: key.to_string(),
        })
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = check_key(key)?;
        match self.inner.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::backend(key, e)),
        }
    }

    /// Writes `bytes` only if nothing is at `key`. If something is, it must be byte-identical
    /// (deterministic artefacts make reruns produce the same bytes); otherwise `Conflict`.
    pub async fn create(&self, key: &str, bytes: impl Into<Bytes>) -> Result<Created, StoreError> {
        let path = check_key(key)?;
        let bytes: Bytes = bytes.into();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&path, PutPayload::from_bytes(bytes.clone()), opts)
            .await
        {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.get_required(key).await?;
                if existing == bytes {
                    Ok(Created::AlreadyThere)
                } else {
                    Err(StoreError::Conflict {
                        key: key.to_string(),
                    })
                }
            }
            Err(e) => Err(self.write_error(key, e)),
        }
    }

    /// Writes `bytes` only if nothing is at `key`; `Ok(false)` if something already is (whatever
    /// its content). Used where the first writer wins, such as marker claims.
    pub async fn create_if_absent(
        &self,
        key: &str,
        bytes: impl Into<Bytes>,
    ) -> Result<bool, StoreError> {
        let path = check_key(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&path, PutPayload::from_bytes(bytes.into()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.write_error(key, e)),
        }
    }

    /// Writes `bytes` at `key`, replacing what is there (only for mutable records such as the
    /// mill's computation state; artefacts use [`Store::create`]).
    pub async fn overwrite(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let path = check_key(key)?;
        self.inner
            .put(&path, PutPayload::from_bytes(bytes.into()))
            .await
            .map(|_| ())
            .map_err(|e| self.write_error(key, e))
    }

    /// Every object under `prefix` (a key prefix ending in `/`), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let trimmed = prefix.trim_end_matches('/');
        let path = check_key(trimmed)?;
        let mut out: Vec<ObjectInfo> = self
            .inner
            .list(Some(&path))
            .map_ok(|m| ObjectInfo {
                key: m.location.to_string(),
                last_modified: m.last_modified,
                size: m.size,
            })
            .try_collect()
            .await
            .map_err(|e| StoreError::backend(prefix, e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes an object; deleting one that is already gone is fine.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = check_key(key)?;
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::backend(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exercise(store: Store) {
        assert_eq!(store.get("a/b.txt").await.unwrap(), None);
        assert_eq!(store.create("a/b.txt", "one").await.unwrap(), Created::New);
        assert_eq!(
            store.create("a/b.txt", "one").await.unwrap(),
            Created::AlreadyThere
        );
        assert!(matches!(
            store.create("a/b.txt", "two").await,
            Err(StoreError::Conflict { .. })
        ));
        assert!(!store.create_if_absent("a/b.txt", "two").await.unwrap());
        assert_eq!(store.get_required("a/b.txt").await.unwrap(), "one");
        store.create("a/c.txt", "x").await.unwrap();
        store.create("ab/d.txt", "x").await.unwrap();
        let keys: Vec<String> = store
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, vec!["a/b.txt", "a/c.txt"]);
        store.delete("a/b.txt").await.unwrap();
        store.delete("a/b.txt").await.unwrap();
        assert!(!store.exists("a/b.txt").await.unwrap());
        assert!(store.list("nothing/").await.unwrap().is_empty());
        for bad in ["", "/abs", "a/../b", "a//b", "a/./b"] {
            assert!(matches!(
                store.get(bad).await,
                Err(StoreError::InvalidKey { .. })
            ));
        }
    }

    #[tokio::test]
    async fn memory_store_behaves() {
        exercise(Store::memory()).await;
    }

    #[tokio::test]
    async fn local_file_store_behaves() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/store", dir.path().display());
        exercise(Store::open(&url).unwrap()).await;
    }

    #[test]
    fn unknown_schemes_are_refused_by_name() {
        let err = Store::open("ftp://x/y").unwrap_err().to_string();
        assert!(err.contains("ftp"), "{err}");
    }
}
