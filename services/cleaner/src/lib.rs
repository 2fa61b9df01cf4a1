//! cleaner: deletes what has outlived its TTL, in deletable states only, markers last.
//!
//! In a facilitator's store, an ingestion batch, its validations and verify states are deletable
//! once they are older than the TTL and their window is settled (an aggregate task of some
//! manifest generation was published, or the window is past its max age). A window's manifests,
//! its exclusion records and this facilitator's record of it go once every batch of the window is
//! gone and they are older than the TTL. A marker is deleted only once the objects it guards are
//! gone (an intake marker after its batch; aggregate and settled-partition markers after every
//! batch of their window), so a later pass can never reschedule deleted work. In the collector's
//! store, a window's sum parts (every generation) and result are deletable once its computation
//! is SUCCEEDED or FAILED and older than the TTL; the computation record goes last. Every deletion (or, with `--dry-run`, every deletion it would
//! make) is one structured audit line on the `millrace::audit` target.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::formats::{ExclusionReason, WindowManifest};
use millrace_protocol::layout::{
    computation_key, exclusion_key, manifest_key, parse_ingestion_key, parse_manifest_key,
    parse_settled_key, result_key, result_marker_key, sum_parts_prefix, waiting_key, Partition,
    Window,
};
use millrace_protocol::results::Computation;
use millrace_protocol::results::{BatchExclusion, EXCLUSION_VERSION};
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
    /// Batches newly recorded as left out of their window: late into a decided window, or in a
    /// window beyond the workflow-manager's scan horizon that was never decided.
    pub batches_recorded: Vec<String>,
}

pub struct Cleaner {
    config: Arc<Config>,
    store: Store,
    settings: Settings,
}

impl Cleaner {
    pub fn new(config: Arc<Config>, store: Store, settings: Settings) -> Self {
        // Zero until something is deleted, rather than absent: a pushed or scraped run that
        // deleted nothing still says so.
        metrics::counter!("millrace_cleaner_deleted_total").increment(0);
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
                    self.audit_batches(agg, now, &mut report).await?;
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

    /// Records every batch that no workflow-manager pass will look at again and that its window
    /// does not include: one that landed in a window after the window's manifest (in a partition
    /// already settled), or one in a window older than the scan horizon that was never decided.
    /// The cleaner walks the whole store anyway; the workflow-manager lists only new work.
    async fn audit_batches(
        &self,
        agg: &Aggregation,
        now: DateTime<Utc>,
        report: &mut CleanReport,
    ) -> Result<(), StoreError> {
        let keys = match self.config.facilitator_keys() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check batches against window manifests");
                return Ok(());
            }
        };
        let leader = self.config.facilitator_name(0).unwrap_or("facilitator 0");
        let id = &agg.id;
        let excluded: HashSet<String> = self
            .store
            .list(&format!("excluded/{id}/"))
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        let mut latest: BTreeMap<Window, u32> = BTreeMap::new();
        for o in self.store.list(&format!("manifests/{id}/")).await? {
            if let Some((w, g)) = parse_manifest_key(id, &o.key) {
                let e = latest.entry(w).or_insert(g);
                *e = (*e).max(g);
            }
        }
        let oldest = Window::containing(agg.horizon(now.timestamp()), agg.window_secs);
        let mut manifests: HashMap<Window, Option<WindowManifest>> = HashMap::new();
        for o in self.store.list(&format!("ingestion/{id}/")).await? {
            let Some((p, batch)) = parse_ingestion_key(id, &o.key) else {
                continue;
            };
            let w = Window::containing(p.start, agg.window_secs);
            let key = exclusion_key(id, w, &batch);
            if excluded.contains(&key) {
                continue;
            }
            let (reason, generation, detail) = match latest.get(&w) {
                Some(&g) => {
                    if let Entry::Vacant(slot) = manifests.entry(w) {
                        let m = match self.store.get(&manifest_key(id, w, g)).await? {
                            Some(bytes) => {
                                match WindowManifest::decode_leaders(&keys, leader, id, w, g, &bytes) {
                                    Ok(m) => Some(m),
                                    Err(e) => {
                                        metrics::counter!("millrace_manifests_refused_total", "aggregation" => id.clone())
                                            .increment(1);
                                        tracing::warn!(manifest = %manifest_key(id, w, g), error = %e, "manifest refused; its window's batches are not checked against it");
                                        None
                                    }
                                }
                            }
                            None => None,
                        };
                        slot.insert(m);
                    }
                    match manifests.get(&w) {
                        Some(Some(m)) if !m.mentions(&batch) => (
                            ExclusionReason::Late,
                            Some(g),
                            format!(
                                "found by the cleaner: it is not in generation {g} of the window's manifest, written at {}; it is not counted in this window",
                                Window::rfc3339(m.decided_at)
                            ),
                        ),
                        _ => continue,
                    }
                }
                None if w < oldest => (
                    ExclusionReason::BeyondHorizon,
                    None,
                    format!(
                        "found by the cleaner: its window is older than the workflow-manager's scan horizon ({}) and was never decided; it is not counted",
                        Window::rfc3339(oldest.start)
                    ),
                ),
                None => continue,
            };
            if self.settings.dry_run {
                tracing::info!(aggregation = %id, window = %w.name(), batch, reason = reason.label(), "dry run: would record a batch left out");
                continue;
            }
            let record = BatchExclusion {
                version: EXCLUSION_VERSION,
                aggregation: id.clone(),
                window: w.name(),
                batch: batch.clone(),
                partition: p.path(),
                reason: reason.label().to_string(),
                manifest_generation: generation,
                lacking: None,
                by: "cleaner".to_string(),
                seen_at: now.timestamp(),
                detail,
            };
            if self.store.create_if_absent(&key, record.to_json()).await? {
                let counter = if reason == ExclusionReason::Late {
                    metrics::counter!("millrace_batches_late_total", "aggregation" => id.clone())
                } else {
                    metrics::counter!("millrace_batches_excluded_total", "aggregation" => id.clone(), "reason" => reason.label())
                };
                counter.increment(1);
                tracing::warn!(aggregation = %id, window = %w.name(), batch, partition = %p.path(), reason = reason.label(), "batch left out of its window, found by the cleaner");
                report.batches_recorded.push(key);
            }
        }
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
        // Windows with a published aggregate task (of any manifest generation).
        let published: BTreeSet<Window> = aggregate_markers
            .iter()
            .filter_map(|m| {
                let rest = m.key.strip_prefix(&format!("markers/{agg}/aggregate/"))?;
                let stem = rest.strip_suffix(".published")?;
                Window::parse(stem.split('.').next()?).ok()
            })
            .collect();

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
                    let s = past_max_age || published.contains(&window);
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

        // 2. What records a window's decision, once every batch of the window is gone.
        let window_gone = |w: Window, o: &ObjectInfo| -> bool {
            !remaining_windows.contains(&w) && self.expired(o, now)
        };
        for o in self.store.list(&format!("manifests/{agg}/")).await? {
            if let Some((w, _)) = parse_manifest_key(agg, &o.key) {
                if window_gone(w, &o) {
                    self.delete(
                        &o.key,
                        "ttl: every batch of this window is gone",
                        now,
                        Some(o.last_modified),
                        report,
                    )
                    .await?;
                }
            }
        }
        for prefix in [format!("excluded/{agg}/"), format!("computations/{agg}/")] {
            for o in self.store.list(&prefix).await? {
                let name = o.key[prefix.len()..].split(['/', '.']).next().unwrap_or("");
                if let Ok(w) = Window::parse(name) {
                    if window_gone(w, &o) {
                        self.delete(
                            &o.key,
                            "ttl: every batch of this window is gone",
                            now,
                            Some(o.last_modified),
                            report,
                        )
                        .await?;
                    }
                }
            }
        }
        // 3. Markers, after the objects they guard are gone.
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
        for o in self.store.list(&format!("markers/{agg}/settled/")).await? {
            if let Some(p) = parse_settled_key(agg, &o.key) {
                if window_gone(window_of_partition(p), &o) {
                    self.delete(
                        &o.key,
                        "ttl: every batch of this partition's window is gone",
                        now,
                        Some(o.last_modified),
                        report,
                    )
                    .await?;
                }
            }
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
            for part in self.store.list(&sum_parts_prefix(agg, window)).await? {
                self.delete(&part.key, reason, now, Some(part.last_modified), report)
                    .await?;
            }
            for key in [result_key(agg, window), waiting_key(agg, window)] {
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
