//! cleaner: deletes what has outlived its TTL, in deletable states only, markers last.
//!
//! In a facilitator's store, an ingestion batch, its validations and verify states are deletable
//! once they are older than the TTL and their window is settled (its aggregate task was published,
//! or the window is past its max age). A marker is deleted only once the object it guards is gone
//! (an intake marker after its batch; an aggregate marker after every batch of its window), so a
//! later pass can never reschedule deleted work. In the collector's store, a window's sum parts
//! and result are deletable once its computation is SUCCEEDED or FAILED and older than the TTL;
//! the computation record goes last. Every deletion (or, with `--dry-run`, every deletion it would
//! make) is one structured audit line on the `millrace::audit` target.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use millrace_protocol::config::Config;
use millrace_protocol::layout::{
    aggregate_marker_key, computation_key, parse_ingestion_key, result_key, result_marker_key,
    sum_part_key, Partition, Window,
};
use millrace_protocol::results::Computation;
use millrace_runtime::Shutdown;
use millrace_store::markers;
use millrace_store::{ObjectInfo, Store, StoreError};

/// Which kind of store this cleaner looks after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Facilitator,
    Collector,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub role: Role,
    pub ttl: Duration,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanReport {
    pub deleted: Vec<String>,
    pub kept_not_settled: usize,
}

pub struct Cleaner {
    config: Arc<Config>,
    store: Store,
    settings: Settings,
}

impl Cleaner {
    pub fn new(config: Arc<Config>, store: Store, settings: Settings) -> Self {
        Cleaner {
            config,
            store,
            settings,
        }
    }

    pub async fn run(&self, interval: Duration, shutdown: Shutdown) {
        loop {
            match self.run_once(Utc::now()).await {
                Ok(r) => tracing::info!(
                    deleted = r.deleted.len(),
                    kept = r.kept_not_settled,
                    "clean pass finished"
                ),
                Err(e) => tracing::error!(error = %e, "clean pass failed; retrying next interval"),
            }
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<CleanReport, StoreError> {
        let mut report = CleanReport::default();
        for agg in &self.config.aggregations {
            match self.settings.role {
                Role::Facilitator => {
                    self.clean_facilitator(&agg.id, agg.window_secs, agg.max_age, now, &mut report)
                        .await?
                }
                Role::Collector => self.clean_collector(&agg.id, now, &mut report).await?,
            }
        }
        Ok(report)
    }

    fn expired(&self, o: &ObjectInfo, now: DateTime<Utc>) -> bool {
        let age = now.signed_duration_since(o.last_modified);
        age.to_std().is_ok_and(|age| age >= self.settings.ttl)
    }

    async fn delete(
        &self,
        key: &str,
        reason: &str,
        now: DateTime<Utc>,
        last_modified: Option<DateTime<Utc>>,
        report: &mut CleanReport,
    ) -> Result<(), StoreError> {
        let age_secs = last_modified.map(|t| now.signed_duration_since(t).num_seconds());
        tracing::info!(
            target: "millrace::audit",
            action = "delete",
            key,
            reason,
            age_secs,
            dry_run = self.settings.dry_run,
            "object deleted"
        );
        if !self.settings.dry_run {
            self.store.delete(key).await?;
            metrics::counter!("millrace_cleaner_deleted_total").increment(1);
        }
        report.deleted.push(key.to_string());
        Ok(())
    }

    async fn clean_facilitator(
        &self,
        agg: &str,
        window_secs: i64,
        max_age: Duration,
        now: DateTime<Utc>,
        report: &mut CleanReport,
    ) -> Result<(), StoreError> {
        let batches = self.store.list(&format!("ingestion/{agg}/")).await?;
        let validations = self.store.list(&format!("validation/{agg}/")).await?;
        let states = self.store.list(&format!("states/{agg}/")).await?;
        let intake_markers = self.store.list(&format!("markers/{agg}/intake/")).await?;
        let aggregate_markers = self
            .store
            .list(&format!("markers/{agg}/aggregate/"))
            .await?;

        // Which windows are settled.
        let mut settled: BTreeMap<Window, bool> = BTreeMap::new();
        let window_of_partition = |p: Partition| Window::containing(p.start, window_secs);
        let mut remaining_batches: BTreeSet<String> = BTreeSet::new();
        let mut remaining_windows: BTreeSet<Window> = BTreeSet::new();

        // 1. Batches and what derives from them (validations, states), in deletable states only.
        for obj in &batches {
            let Some((p, batch)) = parse_ingestion_key(agg, &obj.key) else {
                continue;
            };
            let window = window_of_partition(p);
            let is_settled = match settled.get(&window) {
                Some(s) => *s,
                None => {
                    let past_max_age = now.timestamp() >= window.end + max_age.as_secs() as i64;
                    let s = past_max_age
                        || markers::is_published(&self.store, &aggregate_marker_key(agg, window))
                            .await?;
                    settled.insert(window, s);
                    s
                }
            };
            if !self.expired(obj, now) || !is_settled {
                if self.expired(obj, now) {
                    report.kept_not_settled += 1;
                }
                remaining_batches.insert(format!("{}/{batch}", p.path()));
                remaining_windows.insert(window);
                continue;
            }
            let stem = format!("{}/{batch}", p.path());
            for derived in validations.iter().chain(states.iter()) {
                let rest = derived
                    .key
                    .split_once(&format!("/{agg}/"))
                    .map(|x| x.1)
                    .unwrap_or("");
                if rest.starts_with(&format!("{stem}.")) {
                    self.delete(
                        &derived.key,
                        "ttl: derived from an expired batch",
                        now,
                        Some(derived.last_modified),
                        report,
                    )
                    .await?;
                }
            }
            self.delete(
                &obj.key,
                "ttl: batch expired and its window is settled",
                now,
                Some(obj.last_modified),
                report,
            )
            .await?;
        }

        // 2. Markers, after the objects they guard are gone.
        for m in &intake_markers {
            let Some(rest) = m.key.strip_prefix(&format!("markers/{agg}/intake/")) else {
                continue;
            };
            let stem = rest.split('.').next().unwrap_or(rest);
            if remaining_batches.contains(stem) || !self.expired(m, now) {
                continue;
            }
            self.delete(
                &m.key,
                "ttl: the batch this marker guards is gone",
                now,
                Some(m.last_modified),
                report,
            )
            .await?;
        }
        for m in &aggregate_markers {
            let Some(rest) = m.key.strip_prefix(&format!("markers/{agg}/aggregate/")) else {
                continue;
            };
            let name = rest.split('.').next().unwrap_or(rest);
            let Ok(window) = Window::parse(name) else {
                continue;
            };
            if remaining_windows.contains(&window) || !self.expired(m, now) {
                continue;
            }
            self.delete(
                &m.key,
                "ttl: every batch of this window is gone",
                now,
                Some(m.last_modified),
                report,
            )
            .await?;
        }
        Ok(())
    }

    async fn clean_collector(
        &self,
        agg: &str,
        now: DateTime<Utc>,
        report: &mut CleanReport,
    ) -> Result<(), StoreError> {
        let result_markers = self.store.list(&format!("markers/{agg}/results/")).await?;
        for obj in self.store.list(&format!("computations/{agg}/")).await? {
            if !self.expired(&obj, now) {
                continue;
            }
            let Some(bytes) = self.store.get(&obj.key).await? else {
                continue;
            };
            let computation = match Computation::from_json(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(key = %obj.key, error = %e, "unreadable computation record kept");
                    continue;
                }
            };
            if !computation.state.is_terminal() {
                report.kept_not_settled += 1;
                continue;
            }
            let Ok(window) = Window::parse(&computation.window) else {
                continue;
            };
            let reason = "ttl: computation finished and expired";
            for key in [
                sum_part_key(agg, window, 0),
                sum_part_key(agg, window, 1),
                result_key(agg, window),
            ] {
                if self.store.exists(&key).await? {
                    self.delete(&key, reason, now, None, report).await?;
                }
            }
            // The result's marker goes with it (markers last, as everywhere).
            let marker = result_marker_key(agg, window);
            for m in &result_markers {
                if markers::is_marker_object(&marker, &m.key) {
                    self.delete(&m.key, reason, now, Some(m.last_modified), report)
                        .await?;
                }
            }
            self.delete(
                &computation_key(agg, window),
                reason,
                now,
                Some(obj.last_modified),
                report,
            )
            .await?;
        }
        Ok(())
    }
}
