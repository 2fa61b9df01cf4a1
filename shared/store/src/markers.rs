//! Idempotency markers: how the workflow-manager makes sure no task is scheduled twice.
//!
//! A marker for task `K` is a small family of create-only objects:
//!
//! * `K.claim` — generation 0 of the claim: `{"state":"claimed","by","at","generation":0}`;
//! * `K.claim.N` — generation N, written when a claim older than the claim timeout is taken over;
//! * `K.published` — `{"state":"published","by","at","message_id","generation"}`.
//!
//! Protocol: claim (create `K.claim`, or take over a stale claim by creating the next
//! generation), publish the task, then create `K.published`. Because every step is a create-only
//! write, two racing workflow-managers cannot both win a step, and the protocol behaves the same
//! on local files (hard-link no-clobber), S3 (`If-None-Match: *`) and GCS
//! (`ifGenerationMatch=0`) without relying on ETag semantics that differ between them. A crash
//! between publish and mark is absorbed by idempotent workers after the claim times out.
//!
//! The cleaner deletes marker objects only after the object they guard is gone.

use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkerRecord {
    pub state: String,
    pub by: String,
    /// Unix seconds.
    pub at: i64,
    pub generation: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// The result of trying to claim a marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// We own the claim (generation given); publish, then [`mark_published`].
    Won { generation: u32, took_over: bool },
    /// The task was already published.
    AlreadyPublished,
    /// Someone else holds a fresh claim.
    HeldByOther { by: String, age_secs: i64 },
}

fn claim_key(key: &str, generation: u32) -> String {
    if generation == 0 {
        format!("{key}.claim")
    } else {
        format!("{key}.claim.{generation}")
    }
}

/// The key of the object that says the task was published.
pub fn published_key(key: &str) -> String {
    format!("{key}.published")
}

/// Every object key belonging to the marker `key`, given the keys listed in its folder.
pub fn is_marker_object(key: &str, candidate: &str) -> bool {
    candidate
        .strip_prefix(key)
        .is_some_and(|rest| rest == ".published" || rest == ".claim" || rest.starts_with(".claim."))
}

fn decode(key: &str, bytes: &[u8]) -> Result<MarkerRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Backend {
        key: key.to_string(),
        message: format!("marker is not valid JSON: {e}"),
    })
}

fn record(state: &str, by: &str, generation: u32, message_id: Option<String>) -> Vec<u8> {
    serde_json::to_vec(&MarkerRecord {
        state: state.to_string(),
        by: by.to_string(),
        at: Utc::now().timestamp(),
        generation,
        message_id,
    })
    .unwrap_or_default()
}

/// Is the task behind marker `key` published?
pub async fn is_published(store: &Store, key: &str) -> Result<bool, StoreError> {
    store.exists(&published_key(key)).await
}

/// Reads the published record, if any.
pub async fn published(store: &Store, key: &str) -> Result<Option<MarkerRecord>, StoreError> {
    let k = published_key(key);
    match store.get(&k).await? {
        Some(b) => Ok(Some(decode(&k, &b)?)),
        None => Ok(None),
    }
}

/// Step 1 of the protocol: claim marker `key` as `me`.
pub async fn claim(
    store: &Store,
    key: &str,
    me: &str,
    claim_timeout: Duration,
) -> Result<Claim, StoreError> {
    if is_published(store, key).await? {
        return Ok(Claim::AlreadyPublished);
    }
    let mut generation = 0u32;
    loop {
        let k = claim_key(key, generation);
        if store
            .create_if_absent(&k, record("claimed", me, generation, None))
            .await?
        {
            return Ok(Claim::Won {
                generation,
                took_over: generation > 0,
            });
        }
        // Someone holds generation `generation`; is there a newer one?
        if store.exists(&claim_key(key, generation + 1)).await? {
            generation += 1;
            continue;
        }
        let Some(bytes) = store.get(&k).await? else {
            // Deleted under us (by the cleaner): start over from the top.
            continue;
        };
        let holder = decode(&k, &bytes)?;
        let age_secs = Utc::now().timestamp() - holder.at;
        if age_secs < claim_timeout.as_secs() as i64 {
            return Ok(Claim::HeldByOther {
                by: holder.by,
                age_secs,
            });
        }
        if is_published(store, key).await? {
            return Ok(Claim::AlreadyPublished);
        }
        // Stale: try to take over by creating the next generation. If another taker wins that
        // race, the loop sees its fresh claim and backs off.
        generation += 1;
    }
}

/// Step 3: record that the task was published. `Ok(false)` if someone else already recorded it
/// (a taken-over claim whose first owner finished after all).
pub async fn mark_published(
    store: &Store,
    key: &str,
    me: &str,
    generation: u32,
    message_id: &str,
) -> Result<bool, StoreError> {
    store
        .create_if_absent(
            &published_key(key),
            record("published", me, generation, Some(message_id.to_string())),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_claim_wins_and_publish_is_final() {
        let s = Store::memory();
        let t = Duration::from_secs(600);
        assert_eq!(
            claim(&s, "m/x", "a", t).await.unwrap(),
            Claim::Won {
                generation: 0,
                took_over: false
            }
        );
        assert!(matches!(
            claim(&s, "m/x", "b", t).await.unwrap(),
            Claim::HeldByOther { .. }
        ));
        assert!(mark_published(&s, "m/x", "a", 0, "msg-1").await.unwrap());
        assert_eq!(
            claim(&s, "m/x", "b", t).await.unwrap(),
            Claim::AlreadyPublished
        );
        assert_eq!(
            published(&s, "m/x")
                .await
                .unwrap()
                .unwrap()
                .message_id
                .as_deref(),
            Some("msg-1")
        );
    }

    #[tokio::test]
    async fn a_stale_claim_is_taken_over_once() {
        let s = Store::memory();
        claim(&s, "m/x", "crashed", Duration::from_secs(600))
            .await
            .unwrap();
        // With a zero timeout every claim is stale.
        let zero = Duration::ZERO;
        assert_eq!(
            claim(&s, "m/x", "b", zero).await.unwrap(),
            Claim::Won {
                generation: 1,
                took_over: true
            }
        );
        // A fresh claim at generation 1 is respected by a normal timeout.
        assert!(matches!(
            claim(&s, "m/x", "c", Duration::from_secs(600)).await.unwrap(),
            Claim::HeldByOther { by, .. } if by == "b"
        ));
    }

    #[test]
    fn marker_objects_are_recognised() {
        assert!(is_marker_object("m/b1", "m/b1.claim"));
        assert!(is_marker_object("m/b1", "m/b1.claim.3"));
        assert!(is_marker_object("m/b1", "m/b1.published"));
        assert!(!is_marker_object("m/b1", "m/b10.claim"));
    }
}
