//! Idempotency markers: how the workflow-manager makes sure no task is scheduled twice.
//!
//! A marker for task `K` is a small family of create-only objects:
//!
//! * `K.claim` — generation 0 of the claim: `{"state":"claimed","by","at","generation":0}`;
//! * `K.claim.N` — generation N: either `"state":"claimed"`, written when a claim older than the
//!   claim timeout is taken over or when a released claim is taken, or `"state":"released"`,
//!   written by the holder of generation N-1 when its publish failed;
//! * `K.published` — `{"state":"published","by","at","message_id","generation"}`.
//!
//! Protocol: claim (create `K.claim`, or take over a stale or released claim by creating the next
//! generation), publish the task, then create `K.published`. Because every step is a create-only
//! write, two racing workflow-managers cannot both win a step, and the protocol behaves the same
//! on local files (hard-link no-clobber), S3 (`If-None-Match: *`) and GCS
//! (`ifGenerationMatch=0`) without relying on ETag semantics that differ between them. A crash
//! between publish and mark is absorbed by idempotent workers after the claim times out.
//!
//! `by` names the holder's instance (`hostname-pid`, unique per process), and the holder
//! recognises its own claim: [`claim`] by the instance that holds the newest generation wins it
//! again at once, so a publish that failed (a broker outage longer than the publish retry) is
//! retried on the holder's next pass rather than after the claim timeout. And since another
//! instance (the next run of a `--once` CronJob is a new process) would not recognise it, the
//! holder also gives the claim up when its publish fails: [`release`] creates the next generation
//! with `"state":"released"`, still a create-only write (no deletes, so no race with a taker), and
//! any instance's next [`claim`] then takes the generation after it at once. If the holder dies
//! before it can release, the claim timeout still applies.
//!
//! Decoding is strict: unknown fields are refused, and a claim generation whose state is neither
//! `claimed` nor `released` is an error naming its key.
//!
//! Replays (`millrace replay`, for recovery after an outage or a bad deploy) publish a task whose
//! marker says it was already published, once more, and leave a record of who did it, when and
//! why:
//!
//! * `K.replay.N.claim` — `{"state":"replaying","by","at","generation":N,"reason"}`;
//! * `K.replay.N.published` — the same with `"state":"replayed"` and the message id.
//!
//! `N` counts the task's replays from 1. Two operators replaying the same task at the same moment
//! race for the same `K.replay.N.claim`; one wins and the other is told who did it, so one request
//! to replay publishes the task once. A task that was never published is not replayed this way:
//! it goes through the normal claim, so the workflow-manager does not publish it a second time.
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
    /// Why a replay was made (replay records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A claim generation held by its writer.
pub const CLAIMED: &str = "claimed";
/// A claim generation written by the holder of the generation before it, giving the claim up.
pub const RELEASED: &str = "released";

/// The result of trying to claim a marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// We own the claim (generation given); publish, then [`mark_published`] (or, if the publish
    /// fails, [`release`]). `took_over` says the previous holder's claim had timed out. `Won` is
    /// also the answer when the newest generation is already ours (a retry after a failure).
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
    candidate.strip_prefix(key).is_some_and(|rest| {
        rest == ".published"
            || rest == ".claim"
            || rest.starts_with(".claim.")
            || rest.starts_with(".replay.")
    })
}

fn decode(key: &str, bytes: &[u8]) -> Result<MarkerRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Backend {
        key: key.to_string(),
        message: format!("marker is not valid JSON: {e}"),
    })
}

fn record(state: &str, by: &str, generation: u32, message_id: Option<String>) -> Vec<u8> {
    encode(&MarkerRecord {
        state: state.to_string(),
        by: by.to_string(),
        at: Utc::now().timestamp(),
        generation,
        message_id,
        reason: None,
    })
}

fn encode(record: &MarkerRecord) -> Vec<u8> {
    // Serialising a struct of strings and integers cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
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
    let mut took_over = false;
    loop {
        let k = claim_key(key, generation);
        if store
            .create_if_absent(&k, record(CLAIMED, me, generation, None))
            .await?
        {
            return Ok(Claim::Won {
                generation,
                took_over,
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
        match holder.state.as_str() {
            // Given up by its holder: take the next generation at once.
            RELEASED => {
                generation += 1;
                took_over = false;
                continue;
            }
            CLAIMED if holder.by == me => {
                return Ok(Claim::Won {
                    generation,
                    took_over: false,
                })
            }
            CLAIMED => {}
            other => {
                return Err(StoreError::Backend {
                    key: k,
                    message: format!(
                        "claim marker has state {other:?}; expected {CLAIMED:?} or {RELEASED:?}"
                    ),
                })
            }
        }
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
        took_over = true;
    }
}

/// Gives up claim `generation` of marker `key`, held by `me`, after its publish failed: creates
/// generation `generation + 1` as released, so that the next [`claim`] by any instance takes the
/// task at once instead of waiting for the claim timeout. `Ok(false)` if that generation already
/// exists (our claim had timed out and someone took it over; nothing to give up).
pub async fn release(
    store: &Store,
    key: &str,
    me: &str,
    generation: u32,
) -> Result<bool, StoreError> {
    let next = generation
        .checked_add(1)
        .ok_or_else(|| StoreError::Backend {
            key: claim_key(key, generation),
            message: "claim generation overflow".to_string(),
        })?;
    store
        .create_if_absent(&claim_key(key, next), record(RELEASED, me, next, None))
        .await
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

/// The result of trying to claim a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayClaim {
    /// We hold replay number `number`; publish, then [`mark_replayed`].
    Won { number: u32 },
    /// The task was never published: schedule it through [`claim`] instead.
    NotPublished,
    /// Someone else claimed the same replay a moment ago.
    RacedWith { by: String, at: i64 },
}

fn replay_key(key: &str, number: u32, what: &str) -> String {
    format!("{key}.replay.{number}.{what}")
}

/// Every replay of the task behind marker `key`, oldest first: the claim records, with the
/// message id filled in for those that were published.
pub async fn replays(store: &Store, key: &str) -> Result<Vec<MarkerRecord>, StoreError> {
    let folder = match key.rsplit_once('/') {
        Some((folder, _)) => format!("{folder}/"),
        None => String::new(),
    };
    let mut numbers: Vec<u32> = store
        .list(&folder)
        .await?
        .into_iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix(key)?.strip_prefix(".replay.")?;
            rest.strip_suffix(".claim")?.parse().ok()
        })
        .collect();
    numbers.sort_unstable();
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        let published = replay_key(key, n, "published");
        let claimed = replay_key(key, n, "claim");
        let (k, bytes) = match store.get(&published).await? {
            Some(b) => (published, b),
            None => {
                let Some(b) = store.get(&claimed).await? else {
                    continue;
                };
                (claimed, b)
            }
        };
        out.push(decode(&k, &bytes)?);
    }
    Ok(out)
}

/// Claims the next replay of the task behind marker `key` as `me`, recording `reason`.
pub async fn claim_replay(
    store: &Store,
    key: &str,
    me: &str,
    reason: &str,
) -> Result<ReplayClaim, StoreError> {
    if !is_published(store, key).await? {
        return Ok(ReplayClaim::NotPublished);
    }
    let number = replays(store, key)
        .await?
        .iter()
        .map(|r| r.generation)
        .max()
        .unwrap_or(0)
        + 1;
    claim_replay_number(store, key, number, me, reason).await
}

async fn claim_replay_number(
    store: &Store,
    key: &str,
    number: u32,
    me: &str,
    reason: &str,
) -> Result<ReplayClaim, StoreError> {
    let claim = replay_key(key, number, "claim");
    let record = MarkerRecord {
        state: "replaying".to_string(),
        by: me.to_string(),
        at: Utc::now().timestamp(),
        generation: number,
        message_id: None,
        reason: Some(reason.to_string()),
    };
    if store.create_if_absent(&claim, encode(&record)).await? {
        return Ok(ReplayClaim::Won { number });
    }
    let holder = match store.get(&claim).await? {
        Some(bytes) => decode(&claim, &bytes)?,
        None => record,
    };
    Ok(ReplayClaim::RacedWith {
        by: holder.by,
        at: holder.at,
    })
}

/// Records that replay `number` of the task behind `key` was published as `message_id`.
pub async fn mark_replayed(
    store: &Store,
    key: &str,
    me: &str,
    number: u32,
    reason: &str,
    message_id: &str,
) -> Result<bool, StoreError> {
    let record = MarkerRecord {
        state: "replayed".to_string(),
        by: me.to_string(),
        at: Utc::now().timestamp(),
        generation: number,
        message_id: Some(message_id.to_string()),
        reason: Some(reason.to_string()),
    };
    store
        .create_if_absent(&replay_key(key, number, "published"), encode(&record))
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

    #[tokio::test]
    async fn replays_are_numbered_recorded_and_raced_once() {
        let s = Store::memory();
        let t = Duration::from_secs(600);
        assert_eq!(
            claim_replay(&s, "m/x", "ops", "outage").await.unwrap(),
            ReplayClaim::NotPublished
        );
        claim(&s, "m/x", "wm", t).await.unwrap();
        mark_published(&s, "m/x", "wm", 0, "msg-1").await.unwrap();
        assert_eq!(
            claim_replay(&s, "m/x", "alice", "outage").await.unwrap(),
            ReplayClaim::Won { number: 1 }
        );
        assert!(mark_replayed(&s, "m/x", "alice", 1, "outage", "msg-2")
            .await
            .unwrap());
        assert_eq!(
            claim_replay(&s, "m/x", "bob", "bad deploy").await.unwrap(),
            ReplayClaim::Won { number: 2 }
        );
        let history = replays(&s, "m/x").await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].by, "alice");
        assert_eq!(history[0].state, "replayed");
        assert_eq!(history[0].message_id.as_deref(), Some("msg-2"));
        assert_eq!(history[0].reason.as_deref(), Some("outage"));
        assert_eq!(history[1].by, "bob");
        assert_eq!(history[1].state, "replaying");
        // A replay record of another task in the same folder is not ours.
        claim(&s, "m/xy", "wm", t).await.unwrap();
        mark_published(&s, "m/xy", "wm", 0, "msg-3").await.unwrap();
        claim_replay(&s, "m/xy", "carol", "x").await.unwrap();
        assert_eq!(replays(&s, "m/x").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn two_operators_replaying_at_once_publish_once() {
        let s = Store::memory();
        claim(&s, "m/x", "wm", Duration::from_secs(600))
            .await
            .unwrap();
        mark_published(&s, "m/x", "wm", 0, "msg-1").await.unwrap();
        // Both read the history before either wrote, so both go for replay number 1.
        assert_eq!(
            claim_replay_number(&s, "m/x", 1, "alice", "r")
                .await
                .unwrap(),
            ReplayClaim::Won { number: 1 }
        );
        assert!(matches!(
            claim_replay_number(&s, "m/x", 1, "bob", "r").await.unwrap(),
            ReplayClaim::RacedWith { by, .. } if by == "alice"
        ));
    }

    #[tokio::test]
    async fn the_holder_recognises_its_own_claim() {
        let s = Store::memory();
        let t = Duration::from_secs(600);
        assert_eq!(
            claim(&s, "m/x", "wm-1", t).await.unwrap(),
            Claim::Won {
                generation: 0,
                took_over: false
            }
        );
        // The same instance again (its publish failed): won again, at once, same generation.
        assert_eq!(
            claim(&s, "m/x", "wm-1", t).await.unwrap(),
            Claim::Won {
                generation: 0,
                took_over: false
            }
        );
        // Anyone else still sees it held.
        assert!(matches!(
            claim(&s, "m/x", "wm-2", t).await.unwrap(),
            Claim::HeldByOther { by, .. } if by == "wm-1"
        ));
        // The same after a takeover: the holder of the newest generation is recognised.
        assert_eq!(
            claim(&s, "m/x", "wm-2", Duration::ZERO).await.unwrap(),
            Claim::Won {
                generation: 1,
                took_over: true
            }
        );
        assert_eq!(
            claim(&s, "m/x", "wm-2", t).await.unwrap(),
            Claim::Won {
                generation: 1,
                took_over: false
            }
        );
        assert!(matches!(
            claim(&s, "m/x", "wm-1", t).await.unwrap(),
            Claim::HeldByOther { by, .. } if by == "wm-2"
        ));
    }

    #[tokio::test]
    async fn a_released_claim_is_taken_at_once_by_anyone_and_only_once() {
        let s = Store::memory();
        let t = Duration::from_secs(600);
        claim(&s, "m/x", "wm-1", t).await.unwrap();
        assert!(release(&s, "m/x", "wm-1", 0).await.unwrap());
        let released: MarkerRecord =
            serde_json::from_slice(&s.get_required("m/x.claim.1").await.unwrap()).unwrap();
        assert_eq!(
            (
                released.state.as_str(),
                released.by.as_str(),
                released.generation
            ),
            (RELEASED, "wm-1", 1)
        );
        // Another instance takes it within the claim timeout; it did not time out, so no
        // takeover is reported.
        assert_eq!(
            claim(&s, "m/x", "wm-2", t).await.unwrap(),
            Claim::Won {
                generation: 2,
                took_over: false
            }
        );
        // A third instance racing for it finds it taken.
        assert!(matches!(
            claim(&s, "m/x", "wm-3", t).await.unwrap(),
            Claim::HeldByOther { by, .. } if by == "wm-2"
        ));
        // Releasing a generation someone already moved past writes nothing.
        assert!(!release(&s, "m/x", "wm-1", 0).await.unwrap());
        assert!(mark_published(&s, "m/x", "wm-2", 2, "msg-1").await.unwrap());
        assert_eq!(
            claim(&s, "m/x", "wm-1", t).await.unwrap(),
            Claim::AlreadyPublished
        );
    }

    #[tokio::test]
    async fn a_claim_in_an_unknown_state_is_refused_by_key() {
        let s = Store::memory();
        s.create(
            "m/x.claim",
            r#"{"state":"pondering","by":"x","at":0,"generation":0}"#,
        )
        .await
        .unwrap();
        let err = claim(&s, "m/x", "wm", Duration::from_secs(600))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m/x.claim") && err.contains("pondering"),
            "{err}"
        );
        // Unknown fields are refused too.
        s.create(
            "m/y.claim",
            r#"{"state":"claimed","by":"x","at":0,"generation":0,"extra":1}"#,
        )
        .await
        .unwrap();
        assert!(claim(&s, "m/y", "wm", Duration::ZERO).await.is_err());
    }

    #[test]
    fn marker_objects_are_recognised() {
        assert!(is_marker_object("m/b1", "m/b1.replay.2.claim"));
        assert!(is_marker_object("m/b1", "m/b1.claim"));
        assert!(is_marker_object("m/b1", "m/b1.claim.3"));
        assert!(is_marker_object("m/b1", "m/b1.published"));
        assert!(!is_marker_object("m/b1", "m/b10.claim"));
    }
}
