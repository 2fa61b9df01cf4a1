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
//!
//! # Listings and bad names
//!
//! A store can hold objects that Millrace did not write: a file whose name is not valid UTF-8, or
//! a cloud key with an empty or `..` segment. One such name must not hide every other object of
//! its prefix, so [`Store::list`] skips it, counts it (`millrace_store_skipped_keys_total`, label
//! `reason`) and warns once per prefix per minute with the count; real failures (permissions, the
//! network, a missing bucket) still fail the listing with an error naming the prefix.
//!
//! `object_store` 0.14 cannot skip such an entry itself: its local listing ends the stream at the
//! first entry it cannot turn into a `Path` (`Error::InvalidPath`, a `NonUnicode` or `BadSegment`
//! path error; the chunked `try_unfold` stream stops after yielding an error), and its S3 and GCS
//! listings convert a whole page at once (`TryFrom<ListResponse>` collects into a `Result`), so one
//! bad key fails the page and pagination stops. Resuming after the bad key with
//! `list_with_offset` would lose the valid keys of the same page before it, and a listing that
//! silently ended at the bad key would be worse than an error (the cleaner acts on what a listing
//! does not contain). So:
//!
//! * Local-file stores are listed here with `std::fs` (the same rules as `LocalFileSystem`: files
//!   only, symbolic links followed, its in-progress upload files `NAME#DIGITS` hidden).
//! * S3 and GCS stores are listed through `object_store` as long as that works. When its listing
//!   of a prefix fails with `Error::InvalidPath` (a key it cannot parse, such as one with an empty
//!   segment, which both clouds allow), the prefix is listed again by a plain request of our own
//!   that reads the raw keys, paginated to the end: ListObjectsV2 on S3, the JSON API on GCS (see
//!   [`cloud`]). Every key that [`Store`]'s own key check or `Path::parse` refuses is skipped and
//!   counted as above; the rest is returned as `object_store` would have. Only a prefix that holds
//!   such a key pays for the second listing. `tests/cloud_stores.rs` proves it on moto and
//!   fake-gcs-server.
//!
//! The workflow-manager contains any listing error that remains to the aggregation whose
//! partition it hit.

use std::path::PathBuf;
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
mod limiter;
pub mod markers;

pub use limiter::LogLimiter;

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
    /// The base directory of a `file://` store, listed with `std::fs` (see the module docs).
    local_root: Option<PathBuf>,
    /// Warnings about skipped names, per prefix.
    skip_log: Arc<LogLimiter>,
    /// The cloud stores' own listing, for prefixes `object_store` cannot list (see the module
    /// docs).
    raw_lister: Option<Arc<dyn RawLister>>,
}

/// Lists a prefix of a cloud store without `object_store`, reading the raw keys, for the prefixes
/// whose listing `object_store` fails on a key it cannot parse.
#[async_trait::async_trait]
pub(crate) trait RawLister: std::fmt::Debug + Send + Sync {
    /// Every object under `prefix` (a checked key prefix ending in `/`, relative to the store),
    /// with keys relative to the store, in no particular order. The error says what failed,
    /// without the prefix (the caller adds it).
    async fn list_raw(&self, prefix: &str) -> Result<Vec<RawObject>, String>;
}

/// One object of a [`RawLister`] listing.
#[derive(Debug)]
pub(crate) struct RawObject {
    /// The key relative to the store, or, if its bytes are not UTF-8, a lossy rendering of it.
    pub key: Result<String, String>,
    pub last_modified: DateTime<Utc>,
    pub size: u64,
}

/// `url` with any password replaced, for error messages and logs.
fn redacted(url: &str) -> String {
    millrace_secrets::redact(url)
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
                    local_root: Some(dir),
                    skip_log: Arc::default(),
                    raw_lister: None,
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
            local_root: None,
            skip_log: Arc::default(),
            raw_lister: None,
        }
    }

    /// Lists with `lister` the prefixes that `inner`'s own listing fails on.
    #[cfg(any(feature = "s3", feature = "gcs"))]
    pub(crate) fn with_raw_lister(mut self, lister: Arc<dyn RawLister>) -> Store {
        self.raw_lister = Some(lister);
        self
    }

    /// A new, empty in-process store.
    pub fn memory() -> Store {
        Store {
            url: "memory://".to_string(),
            inner: Arc::new(InMemory::new()),
            local_root: None,
            skip_log: Arc::default(),
            raw_lister: None,
        }
    }

    /// The store's URL as given (it may hold a secret: show [`Store::redacted_url`] instead).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store's URL with any secret replaced: the form for errors, logs and labels.
    pub fn redacted_url(&self) -> String {
        redacted(&self.url)
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

    /// Every object under `prefix` (a key prefix ending in `/`), sorted by key. Objects whose
    /// names are not valid keys are skipped, counted and warned about (see the module docs); any
    /// other failure is an error naming `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let trimmed = prefix.trim_end_matches('/');
        let path = check_key(trimmed)?;
        let (mut out, skipped) = match &self.local_root {
            Some(root) => {
                let (root, trimmed) = (root.clone(), trimmed.to_string());
                tokio::task::spawn_blocking(move || list_local(&root, &trimmed))
                    .await
                    .map_err(|e| StoreError::Backend {
                        key: prefix.to_string(),
                        message: format!("cannot list: {e}"),
                    })?
                    .map_err(|e| StoreError::Backend {
                        key: prefix.to_string(),
                        message: format!("cannot list: {e}"),
                    })?
            }
            None => self.list_backend(prefix, &path).await?,
        };
        self.report_skipped(prefix, &skipped);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Lists through `object_store`; if it fails on a key it cannot parse, lists again through
    /// the store's [`RawLister`] and skips the keys that are not keys.
    async fn list_backend(
        &self,
        prefix: &str,
        path: &Path,
    ) -> Result<(Vec<ObjectInfo>, Vec<Skipped>), StoreError> {
        let listed: Result<Vec<ObjectInfo>, object_store::Error> = self
            .inner
            .list(Some(path))
            .map_ok(|m| ObjectInfo {
                key: m.location.to_string(),
                last_modified: m.last_modified,
                size: m.size,
            })
            .try_collect()
            .await;
        let source = match listed {
            Ok(listed) => return Ok((listed, Vec::new())),
            Err(object_store::Error::InvalidPath { source }) => source,
            Err(other) => {
                return Err(StoreError::Backend {
                    key: prefix.to_string(),
                    message: format!("cannot list: {other}"),
                })
            }
        };
        let Some(lister) = &self.raw_lister else {
            return Err(StoreError::Backend {
                key: prefix.to_string(),
                message: format!(
                    "cannot list: the store holds a key that object_store cannot parse, which \
                     fails the listing of the whole prefix on this backend ({source})"
                ),
            });
        };
        let raw = lister
            .list_raw(&format!("{}/", path.as_ref()))
            .await
            .map_err(|e| StoreError::Backend {
                key: prefix.to_string(),
                message: format!(
                    "cannot list: object_store could not parse a key under it ({source}), and \
                     listing store {} directly failed too: {e}",
                    redacted(&self.url)
                ),
            })?;
        Ok(keep_keys(raw))
    }

    /// Counts skipped names and warns about them, at most once per prefix per minute.
    fn report_skipped(&self, prefix: &str, skipped: &[Skipped]) {
        let Some(first) = skipped.first() else {
            return;
        };
        for reason in [SkipReason::NotUtf8, SkipReason::NotAKey] {
            let n = skipped.iter().filter(|s| s.reason == reason).count() as u64;
            if n > 0 {
                metrics::counter!("millrace_store_skipped_keys_total", "reason" => reason.label())
                    .increment(n);
            }
        }
        if let Some(count) = self.skip_log.hit(prefix, skipped.len() as u64) {
            tracing::warn!(
                store = %redacted(&self.url),
                prefix,
                skipped = count,
                example = %first.name,
                reason = first.reason.label(),
                "skipping objects whose names are not valid keys (logged once a minute per prefix)"
            );
        }
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

/// Why a listed name was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SkipReason {
    /// A file or directory name (or a cloud key's bytes) that is not valid UTF-8.
    NotUtf8,
    /// A UTF-8 name that is not a valid key (control characters, an empty or `..` segment).
    NotAKey,
}

impl SkipReason {
    fn label(self) -> &'static str {
        match self {
            SkipReason::NotUtf8 => "not_utf8",
            SkipReason::NotAKey => "not_a_key",
        }
    }
}

/// A name [`Store::list`] skipped.
#[derive(Debug)]
struct Skipped {
    reason: SkipReason,
    /// The name, lossily decoded and cut to a bounded length, for the log.
    name: String,
}

/// At most this many bytes of a skipped name go into a log line.
const MAX_LOGGED_NAME: usize = 200;

fn loggable(name: &std::ffi::OsStr) -> String {
    let lossy = name.to_string_lossy();
    if lossy.len() <= MAX_LOGGED_NAME {
        return lossy.into_owned();
    }
    let mut end = MAX_LOGGED_NAME;
    while !lossy.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &lossy[..end])
}

/// `LocalFileSystem`'s in-progress upload files are named `NAME#DIGITS`; its listings hide them.
fn is_upload_in_progress(name: &str) -> bool {
    name.split_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Splits a [`RawLister`] listing into the objects whose keys pass [`check_key`] (which includes
/// `Path::parse`) and the names skipped.
fn keep_keys(raw: Vec<RawObject>) -> (Vec<ObjectInfo>, Vec<Skipped>) {
    let mut out = Vec::with_capacity(raw.len());
    let mut skipped = Vec::new();
    for object in raw {
        match object.key {
            Ok(key) if check_key(&key).is_ok() => out.push(ObjectInfo {
                key,
                last_modified: object.last_modified,
                size: object.size,
            }),
            Ok(key) => skipped.push(Skipped {
                reason: SkipReason::NotAKey,
                name: loggable(std::ffi::OsStr::new(&key)),
            }),
            Err(lossy) => skipped.push(Skipped {
                reason: SkipReason::NotUtf8,
                name: loggable(std::ffi::OsStr::new(&lossy)),
            }),
        }
    }
    (out, skipped)
}

/// Lists the files under `root/prefix` (a checked key without a trailing `/`) with `std::fs`,
/// skipping names that are not keys. A missing directory is an empty listing; an entry removed
/// while it is listed is left out.
fn list_local(
    root: &std::path::Path,
    prefix: &str,
) -> std::io::Result<(Vec<ObjectInfo>, Vec<Skipped>)> {
    use std::io::ErrorKind;
    let gone = |e: &std::io::Error| e.kind() == ErrorKind::NotFound;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let mut visited: std::collections::HashSet<(u64, u64)> = std::collections::HashSet::new();
    let mut pending = vec![(root.join(prefix), prefix.to_string())];
    while let Some((dir, dir_key)) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if gone(&e) || e.kind() == ErrorKind::NotADirectory => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", dir.display()),
                ))
            }
        };
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(&dir) {
            use std::os::unix::fs::MetadataExt;
            // Symbolic links are followed, as `LocalFileSystem` does; a loop is listed once.
            if !visited.insert((meta.dev(), meta.ino())) {
                continue;
            }
        }
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if gone(&e) => continue,
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", dir.display()),
                    ))
                }
            };
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                skipped.push(Skipped {
                    reason: SkipReason::NotUtf8,
                    name: format!("{dir_key}/{}", loggable(&file_name)),
                });
                continue;
            };
            let key = format!("{dir_key}/{name}");
            let meta = match std::fs::metadata(entry.path()) {
                Ok(meta) => meta,
                // A broken symbolic link, or removed since `read_dir`.
                Err(e) if gone(&e) => continue,
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", entry.path().display()),
                    ))
                }
            };
            if meta.is_dir() {
                pending.push((entry.path(), key));
                continue;
            }
            if !meta.is_file() || is_upload_in_progress(name) {
                continue;
            }
            if check_key(&key).is_err() {
                skipped.push(Skipped {
                    reason: SkipReason::NotAKey,
                    name: loggable(std::ffi::OsStr::new(&key)),
                });
                continue;
            }
            out.push(ObjectInfo {
                key,
                last_modified: meta.modified()?.into(),
                size: meta.len(),
            });
        }
    }
    Ok((out, skipped))
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

    fn keys(listed: Vec<ObjectInfo>) -> Vec<String> {
        listed.into_iter().map(|o| o.key).collect()
    }

    #[tokio::test]
    async fn a_file_store_lists_around_names_that_are_not_keys() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&format!("file://{}", root.display())).unwrap();
        let prefix = "ingestion/agg/2026/11/23/12/";
        store
            .create(&format!("{prefix}a.batch"), "a")
            .await
            .unwrap();
        store
            .create(&format!("{prefix}z.batch"), "z")
            .await
            .unwrap();
        let part = root.join(prefix);
        // Not UTF-8: `object_store`'s own listing fails the whole prefix on this one.
        std::fs::write(
            part.join(std::ffi::OsStr::from_bytes(b"m-\xff\xfe.batch")),
            "x",
        )
        .unwrap();
        let bad_dir = part.join(std::ffi::OsStr::from_bytes(b"dir-\xc3"));
        std::fs::create_dir(&bad_dir).unwrap();
        std::fs::write(bad_dir.join("inner.batch"), "x").unwrap();
        // UTF-8 but not a key (a control character).
        std::fs::write(part.join("ctl-\u{1}.batch"), "x").unwrap();
        // An upload in progress, which `LocalFileSystem` hides too.
        std::fs::write(part.join("b.batch#12"), "x").unwrap();
        // A nested object, and one whose name has a `#` that is not an upload.
        store
            .create(&format!("{prefix}sub/c.batch"), "c")
            .await
            .unwrap();
        store.create(&format!("{prefix}d#x"), "d").await.unwrap();
        let listed = store.list(prefix).await.unwrap();
        assert_eq!(listed[0].size, 1);
        assert_eq!(
            keys(listed),
            vec![
                format!("{prefix}a.batch"),
                format!("{prefix}d#x"),
                format!("{prefix}sub/c.batch"),
                format!("{prefix}z.batch"),
            ]
        );
        // Listing again (the warning is rate-limited by now) gives the same answer.
        assert_eq!(store.list(prefix).await.unwrap().len(), 4);
        // The listed objects read as listed.
        assert_eq!(
            store
                .get_required(&format!("{prefix}sub/c.batch"))
                .await
                .unwrap(),
            "c"
        );
        // A prefix that is missing or a file lists nothing.
        assert!(store.list("ingestion/other/").await.unwrap().is_empty());
        assert!(store
            .list(&format!("{prefix}a.batch/"))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_file_store_listing_that_really_fails_names_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&format!("file://{}", root.display())).unwrap();
        store.create("p/q/a", "a").await.unwrap();
        // A symbolic link to itself cannot be resolved (ELOOP): not a bad name but a broken
        // file system, which must not pass for an empty listing.
        std::os::unix::fs::symlink("loop", root.join("p/q/loop")).unwrap();
        let err = store.list("p/").await.unwrap_err().to_string();
        assert!(err.starts_with("p/:") && err.contains("loop"), "{err}");
        // A broken link, on the other hand, is skipped as `LocalFileSystem` skips it.
        std::fs::remove_file(root.join("p/q/loop")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("p/q/dangling")).unwrap();
        assert_eq!(keys(store.list("p/").await.unwrap()), vec!["p/q/a"]);
    }

    #[tokio::test]
    async fn a_file_store_follows_links_and_lists_a_loop_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&format!("file://{}", root.display())).unwrap();
        store.create("p/q/a", "a").await.unwrap();
        std::os::unix::fs::symlink(root.join("p"), root.join("p/q/up")).unwrap();
        assert_eq!(keys(store.list("p/").await.unwrap()), vec!["p/q/a"]);
    }

    #[test]
    fn unknown_schemes_are_refused_by_name() {
        let err = Store::open("ftp://x/y").unwrap_err().to_string();
        assert!(err.contains("ftp"), "{err}");
    }
}
