//! One aggregation's pass: list the unsettled partitions, schedule intake, then decide (leader)
//! or follow (helper) each closed window, record late batches, and settle what is done.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use millrace_bus::Bytes;
use millrace_protocol::agreement::AggregationDigest;
use millrace_protocol::config::Aggregation;
use millrace_protocol::formats::{ExcludedBatch, ExclusionReason, WindowBatch, WindowManifest};
use millrace_protocol::layout::{
    aggregate_marker_key, computation_key, exclusion_key, ingestion_prefix, intake_marker_key,
    manifest_key, manifest_window_prefix, parse_ingestion_key, parse_manifest_key,
    parse_settled_key, parse_validation_key, settled_marker_key, settled_prefix, validation_prefix,
    Partition, Window,
};
use millrace_protocol::results::{
    BatchExclusion, Computation, ComputationState, COMPUTATION_VERSION, EXCLUSION_VERSION,
};
use millrace_protocol::tasks::{
    topics, AggregateTask, IntakeTask, TaskMessage, AGGREGATE_TASK_VERSION, INTAKE_TASK_VERSION,
};
use millrace_runtime::lag;
use millrace_runtime::propagation::{batch_context, window_context};
use millrace_store::{markers, StoreError};

use crate::{PassError, PassReport, Scheduled, WindowFailure, WorkflowManager};

/// The leader for window membership.
pub(crate) const LEADER: u8 = 0;

/// What one pass saw of one window in its unsettled partitions.
#[derive(Debug, Default)]
pub(crate) struct WindowView {
    /// Batches in this facilitator's ingestion area.
    pub(crate) own: BTreeSet<WindowBatch>,
    /// Which facilitators' validations are in this store, per batch.
    pub(crate) validated: BTreeMap<WindowBatch, Validated>,
    /// The partitions listed (with anything in them), and whether every batch in each has its
    /// intake task published.
    pub(crate) partitions: BTreeMap<Partition, bool>,
}

/// Which facilitators' validations of one batch are in the store, and since when.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Validated {
    pub(crate) by: [bool; 2],
    /// When the first of them was written (unix seconds): a peer's deadline counts from here.
    pub(crate) first_at: Option<i64>,
}

impl Validated {
    pub(crate) fn add(&mut self, by: u8, at: i64) {
        self.by[usize::from(by)] = true;
        self.first_at = Some(self.first_at.map_or(at, |t| t.min(at)));
    }
}

impl WindowView {
    /// Notes that facilitator `by` validated `batch` (the object written at `at`).
    pub(crate) fn add_validation(&mut self, batch: String, partition: Partition, by: u8, at: i64) {
        self.validated
            .entry(WindowBatch { batch, partition })
            .or_default()
            .add(by, at);
    }

    /// Every batch seen (own or validated by either side), with who validated it.
    pub(crate) fn batches(&self) -> BTreeMap<WindowBatch, Validated> {
        let mut all = self.validated.clone();
        for b in &self.own {
            all.entry(b.clone()).or_default();
        }
        all
    }
}

/// A batch validated by exactly one facilitator: the other lacks it (or could not validate it).
fn one_sided(flags: [bool; 2]) -> bool {
    flags[0] != flags[1]
}

/// How a batch not yet validated by both stands, as the leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// This facilitator has the batch but has not validated it yet: its own intake is behind.
    OwnIntake,
    /// Validated by one side only, and the other side is the one lacking: after the peer
    /// deadline (counted from that validation) it is left out.
    PeerMissing { lacking: u8, since: i64 },
}

fn pending_state(me: u8, own: bool, v: Validated) -> Pending {
    let mine = v.by[usize::from(me)];
    match (v.first_at, one_sided(v.by)) {
        (Some(since), true) if mine || !own => Pending::PeerMissing {
            lacking: if v.by[0] { 1 } else { 0 },
            since,
        },
        _ => Pending::OwnIntake,
    }
}

impl WorkflowManager {
    pub(crate) fn is_leader(&self) -> bool {
        self.settings.facilitator == LEADER
    }

    /// Who writes records: this facilitator's name and instance.
    fn recorder(&self) -> String {
        let name = self
            .config
            .facilitator_name(self.settings.facilitator)
            .unwrap_or("facilitator");
        format!("{name} workflow-manager {}", self.settings.instance)
    }

    pub(crate) async fn pass_aggregation(
        &self,
        agg: &Aggregation,
        now: i64,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let windows = self.scan(agg, now, report).await?;
        let grace = agg.grace.as_secs() as i64;
        for (window, view) in windows {
            if now < window.end + grace {
                continue;
            }
            match self.pass_window(agg, window, &view, now, report).await {
                Ok(()) => {}
                Err(PassError::Bus(e)) => return Err(PassError::Bus(e)),
                Err(other) => {
                    let error = other.to_string();
                    metrics::counter!(
                        "millrace_pass_failures_total",
                        "aggregation" => agg.id.clone(),
                        "cause" => "window"
                    )
                    .increment(1);
                    let subject = format!("{}/{}", agg.id, window.name());
                    if let Some(failures) = self.failure_log.hit(&subject, 1) {
                        tracing::error!(
                            aggregation = %agg.id,
                            window = %window.name(),
                            %error,
                            failures,
                            "window step failed; retried next pass (logged once a minute per window; failures counts them)"
                        );
                    }
                    report.failed_windows.push(WindowFailure {
                        aggregation: agg.id.clone(),
                        window: window.name(),
                        error,
                    });
                }
            }
        }
        Ok(())
    }

    /// Lists the unsettled partitions within the horizon, schedules intake for new batches, and
    /// returns what it saw per window.
    async fn scan(
        &self,
        agg: &Aggregation,
        now: i64,
        report: &mut PassReport,
    ) -> Result<BTreeMap<Window, WindowView>, PassError> {
        let f = self.settings.facilitator;
        let oldest = Window::containing(agg.horizon(now), agg.window_secs);
        let settled: HashSet<Partition> = self
            .store
            .list(&settled_prefix(&agg.id))
            .await?
            .iter()
            .filter_map(|o| parse_settled_key(&agg.id, &o.key))
            .collect();
        let mut windows: BTreeMap<Window, WindowView> = BTreeMap::new();
        for p in Partition::range(oldest.start, now + 1, agg.partition_secs()) {
            if settled.contains(&p) {
                continue;
            }
            report.partitions_listed += 1;
            let prefix = ingestion_prefix(&agg.id, p);
            let listed = self.store.list(&prefix).await?;
            let mut own = Vec::new();
            let mut all_scheduled = true;
            if !listed.is_empty() {
                let marker_dir = format!("markers/{}/intake/{}/", agg.id, p.path());
                let marker_objects: BTreeSet<String> = self
                    .store
                    .list(&marker_dir)
                    .await?
                    .into_iter()
                    .map(|o| o.key)
                    .collect();
                for obj in &listed {
                    let Some((_, batch)) = parse_ingestion_key(&agg.id, &obj.key) else {
                        self.ignore_object(&agg.id, "ingestion", &prefix, &obj.key);
                        continue;
                    };
                    let marker = intake_marker_key(&agg.id, p, &batch);
                    if !marker_objects.contains(&markers::published_key(&marker)) {
                        let task = IntakeTask {
                            version: INTAKE_TASK_VERSION,
                            aggregation: agg.id.clone(),
                            aggregation_digest: self.digest(&agg.id)?.to_string(),
                            batch: batch.clone(),
                            partition: p.path(),
                        };
                        let topic = topics::intake(&self.settings.topic_prefix, f);
                        let trace = batch_context(&agg.id, &batch);
                        match self
                            .schedule(&marker, &topic, task.to_json(), trace)
                            .await?
                        {
                            Scheduled::Published => {
                                report.intake_published += 1;
                                lag::record(
                                    lag::BATCH_INTAKE,
                                    &agg.id,
                                    obj.last_modified.timestamp(),
                                );
                            }
                            Scheduled::Skipped => report.skipped_by_marker += 1,
                            Scheduled::Held => {
                                report.skipped_by_marker += 1;
                                all_scheduled = false;
                            }
                            Scheduled::DryRun => {
                                report.would_publish += 1;
                                all_scheduled = false;
                            }
                        }
                    }
                    own.push(WindowBatch {
                        batch,
                        partition: p,
                    });
                }
            }
            let vprefix = validation_prefix(&agg.id, p);
            let validations = self.store.list(&vprefix).await?;
            if listed.is_empty() && validations.is_empty() {
                // Nothing here (yet): nothing to decide or settle. An empty listing is cheap.
                continue;
            }
            let view = windows
                .entry(Window::containing(p.start, agg.window_secs))
                .or_default();
            view.partitions.insert(p, all_scheduled);
            view.own.extend(own);
            for obj in &validations {
                match parse_validation_key(&agg.id, &obj.key) {
                    Some((_, batch, by)) => {
                        view.add_validation(batch, p, by, obj.last_modified.timestamp())
                    }
                    None => self.ignore_object(&agg.id, "validation", &vprefix, &obj.key),
                }
            }
        }
        Ok(windows)
    }

    /// One closed window past its grace period.
    async fn pass_window(
        &self,
        agg: &Aggregation,
        window: Window,
        view: &WindowView,
        now: i64,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        // `copied`: written by this pass, which also put it in the peer's store.
        let ((manifest, bytes), copied) = match self.latest_manifest(agg, window).await? {
            Some(found) => (found, false),
            None if self.is_leader() => match self.decide(agg, window, view, now, report).await? {
                Some(written) => (written, true),
                None => return Ok(()),
            },
            None => return self.await_manifest(agg, window, now, report).await,
        };
        let marker = aggregate_marker_key(&agg.id, window, manifest.generation);
        let published =
            !manifest.batches.is_empty() && markers::is_published(&self.store, &marker).await?;
        if self.is_leader() && !self.settings.dry_run && !copied && !published {
            // The helper follows only what is in its own store, so the peer's copy goes before our
            // task (a pass that crashed in between left it out). Create-only and the same bytes:
            // a no-op once there; a different object there is an error naming it.
            self.copy_to_peer(&manifest_key(&agg.id, window, manifest.generation), bytes)
                .await?;
        }
        let mut task_out = manifest.batches.is_empty() || published;
        if !task_out {
            let task = AggregateTask {
                version: AGGREGATE_TASK_VERSION,
                aggregation: agg.id.clone(),
                aggregation_digest: self.digest(&agg.id)?.to_string(),
                window: window.name(),
                generation: manifest.generation,
            };
            let topic = topics::aggregate(&self.settings.topic_prefix, self.settings.facilitator);
            let trace = window_context(&agg.id, &task.window);
            task_out = match self
                .schedule(&marker, &topic, task.to_json(), trace)
                .await?
            {
                Scheduled::Published => {
                    report.aggregate_published += 1;
                    true
                }
                Scheduled::Skipped => {
                    report.skipped_by_marker += 1;
                    true
                }
                Scheduled::Held => {
                    report.skipped_by_marker += 1;
                    false
                }
                Scheduled::DryRun => {
                    report.would_publish += 1;
                    false
                }
            };
        }
        self.record_late(agg, window, &manifest, view, now, report)
            .await?;
        if task_out && !self.settings.dry_run {
            self.settle(agg, window, &manifest, view, now, report)
                .await?;
        }
        Ok(())
    }

    /// The newest generation of the window's manifest in this store that verifies as the
    /// leader's; generations that do not are refused by name (logged and counted) and skipped.
    pub(crate) async fn latest_manifest(
        &self,
        agg: &Aggregation,
        window: Window,
    ) -> Result<Option<(WindowManifest, Bytes)>, PassError> {
        let mut generations: Vec<u32> = self
            .store
            .list(&manifest_window_prefix(&agg.id, window))
            .await?
            .iter()
            .filter_map(|o| parse_manifest_key(&agg.id, &o.key))
            .filter(|(w, _)| *w == window)
            .map(|(_, g)| g)
            .collect();
        generations.sort_unstable_by(|a, b| b.cmp(a));
        for generation in generations {
            let key = manifest_key(&agg.id, window, generation);
            let Some(bytes) = self.store.get(&key).await? else {
                continue;
            };
            match self.verify_manifest(agg, window, generation, &bytes) {
                Ok(m) => return Ok(Some((m, bytes))),
                Err(reason) => {
                    metrics::counter!("millrace_manifests_refused_total", "aggregation" => agg.id.clone())
                        .increment(1);
                    if let Some(refused) = self.failure_log.hit(&key, 1) {
                        tracing::error!(manifest = %key, %reason, refused, "refusing a window manifest that is not the leader's (logged once a minute per manifest)");
                    }
                }
            }
        }
        Ok(None)
    }

    /// Checks that `bytes` are generation `generation` of `window`'s manifest, signed by the
    /// leader.
    pub(crate) fn verify_manifest(
        &self,
        agg: &Aggregation,
        window: Window,
        generation: u32,
        bytes: &[u8],
    ) -> Result<WindowManifest, String> {
        let keys = self.facilitator_keys.as_ref().map_err(Clone::clone)?;
        let leader = self
            .config
            .facilitator_name(LEADER)
            .map_err(|e| e.to_string())?;
        let m = WindowManifest::decode_leaders(keys, leader, &agg.id, window, generation, bytes)
            .map_err(|e| e.to_string())?;
        let ours = self.digest(&agg.id).map_err(|e| e.to_string())?;
        if m.aggregation_digest != ours.0 {
            return Err(millrace_protocol::agreement::mismatch(
                &agg.id,
                "the leader's window manifest",
                &AggregationDigest(m.aggregation_digest),
                &ours,
            ));
        }
        Ok(m)
    }

    async fn copy_to_peer(&self, key: &str, bytes: Bytes) -> Result<(), PassError> {
        let peer = self.peer.as_ref().ok_or_else(|| {
            PassError::Setup(
                "facilitator 0 is the leader and writes window manifests to both stores, but has no peer store (--peer-store)".to_string(),
            )
        })?;
        peer.create(key, bytes).await?;
        Ok(())
    }

    /// The leader's decision for a window without a manifest: write one if the window is ready.
    async fn decide(
        &self,
        agg: &Aggregation,
        window: Window,
        view: &WindowView,
        now: i64,
        report: &mut PassReport,
    ) -> Result<Option<(WindowManifest, Bytes)>, PassError> {
        let me = self.settings.facilitator;
        let grace = agg.grace.as_secs() as i64;
        let peer_deadline = agg.peer_deadline.as_secs() as i64;
        let past_max_age = now >= window.end + agg.max_age.as_secs() as i64;
        let (both, pending): (Vec<_>, Vec<_>) = view
            .batches()
            .into_iter()
            .partition(|(_, v)| v.by == [true, true]);
        let states: Vec<Pending> = pending
            .iter()
            .map(|(b, v)| pending_state(me, view.own.contains(b), *v))
            .collect();
        // Each one-sided batch may be left out once its deadline passed; any other pending
        // batch holds the window until max age.
        let next_deadline = states
            .iter()
            .map(|s| match s {
                Pending::PeerMissing { since, .. } => {
                    Some((*since).max(window.end + grace) + peer_deadline)
                }
                Pending::OwnIntake => None,
            })
            .try_fold(i64::MIN, |latest, d| d.map(|d| latest.max(d)));
        let ready = pending.is_empty()
            || past_max_age
            || next_deadline.is_some_and(|deadline| now >= deadline);
        if !ready {
            report.windows_waiting += 1;
            report.waiting_for_validations += 1;
            let one = states
                .iter()
                .filter(|s| matches!(s, Pending::PeerMissing { .. }))
                .count();
            if let Some(passes) = self
                .waiting_log
                .hit(&format!("{}/{}", agg.id, window.name()), 1)
            {
                tracing::info!(
                    aggregation = %agg.id,
                    window = %window.name(),
                    pending = pending.len(),
                    one_side_lacks = one,
                    own_intake_behind = pending.len() - one,
                    peer_deadline = %next_deadline.map(Window::rfc3339).unwrap_or_else(|| "after this facilitator's intake".to_string()),
                    max_age = %Window::rfc3339(window.end + agg.max_age.as_secs() as i64),
                    passes,
                    "window waiting for validations: a batch one side lacks is left out at its peer deadline; one this side has not validated yet is waited for until max age (logged once a minute per window)"
                );
            }
            return Ok(None);
        }
        let excluded: Vec<ExcludedBatch> = pending
            .into_iter()
            .zip(states)
            .map(|((batch, v), state)| ExcludedBatch {
                batch,
                reason: match state {
                    Pending::PeerMissing { .. } => ExclusionReason::PeerMissing,
                    Pending::OwnIntake => ExclusionReason::MaxAge,
                },
                validated_by: v.by,
            })
            .collect();
        let manifest = WindowManifest {
            aggregation: agg.id.clone(),
            aggregation_digest: self.digest(&agg.id)?.0,
            window_start: window.start,
            window_end: window.end,
            generation: 0,
            decided_at: now,
            batches: both.into_iter().map(|(b, _)| b).collect(),
            excluded,
            note: String::new(),
        };
        if self.settings.dry_run {
            tracing::info!(aggregation = %agg.id, window = %window.name(), batches = manifest.batches.len(), excluded = manifest.excluded.len(), "dry run: would write the window manifest");
            report.would_publish += 1;
            return Ok(None);
        }
        self.write_manifest(agg, window, manifest, report)
            .await
            .map(Some)
    }

    /// Writes `manifest` (create-only) to this store and the peer's and records what it leaves
    /// out. If another leader instance wrote this generation first, follows theirs.
    pub(crate) async fn write_manifest(
        &self,
        agg: &Aggregation,
        window: Window,
        manifest: WindowManifest,
        report: &mut PassReport,
    ) -> Result<(WindowManifest, Bytes), PassError> {
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| {
                PassError::Setup("only facilitator 0 (the leader) writes window manifests".into())
            })?
            .as_ref()
            .map_err(|e| PassError::Setup(e.clone()))?;
        let key = manifest_key(&agg.id, window, manifest.generation);
        let bytes = Bytes::from(
            manifest
                .encode(signer)
                .map_err(|e| PassError::Setup(format!("{key}: {e}")))?,
        );
        match self.store.create(&key, bytes.clone()).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                // Another instance decided first; follow its decision.
                let theirs = self.store.get_required(&key).await?;
                let m = self
                    .verify_manifest(agg, window, manifest.generation, &theirs)
                    .map_err(|reason| {
                        PassError::Setup(format!("{key} is there but refused: {reason}"))
                    })?;
                self.copy_to_peer(&key, theirs.clone()).await?;
                return Ok((m, theirs));
            }
            Err(e) => return Err(e.into()),
        }
        self.copy_to_peer(&key, bytes.clone()).await?;
        report.manifests_written += 1;
        report.batches_excluded += manifest.excluded.len();
        for e in &manifest.excluded {
            let lacking = if one_sided(e.validated_by) {
                Some(u8::from(e.validated_by[0]))
            } else {
                None
            };
            let detail = match (e.reason, lacking) {
                (ExclusionReason::PeerMissing, Some(side)) => format!(
                    "only facilitator {} ({}) had validated it by the peer deadline; facilitator {side} ({}) lacks the batch or could not validate it",
                    1 - side,
                    self.config.facilitator_name(1 - side).unwrap_or("?"),
                    self.config.facilitator_name(side).unwrap_or("?"),
                ),
                _ => "not validated by both facilitators by the window's max age".to_string(),
            };
            metrics::counter!(
                "millrace_batches_excluded_total",
                "aggregation" => agg.id.clone(),
                "reason" => e.reason.label()
            )
            .increment(1);
            tracing::warn!(aggregation = %agg.id, window = %window.name(), batch = %e.batch.batch, partition = %e.batch.partition.path(), reason = e.reason.label(), %detail, "batch left out of the window's manifest");
            self.write_exclusion(
                agg,
                window,
                &e.batch,
                e.reason,
                Some(manifest.generation),
                lacking,
                manifest.decided_at,
                detail,
            )
            .await?;
        }
        tracing::info!(
            aggregation = %agg.id,
            window = %window.name(),
            generation = manifest.generation,
            batches = manifest.batches.len(),
            excluded = manifest.excluded.len(),
            manifest = %key,
            "window manifest written to both stores"
        );
        lag::record(lag::WINDOW_MANIFEST, &agg.id, window.end);
        Ok((manifest, bytes))
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_exclusion(
        &self,
        agg: &Aggregation,
        window: Window,
        batch: &WindowBatch,
        reason: ExclusionReason,
        manifest_generation: Option<u32>,
        lacking: Option<u8>,
        seen_at: i64,
        detail: String,
    ) -> Result<bool, PassError> {
        let record = BatchExclusion {
            version: EXCLUSION_VERSION,
            aggregation: agg.id.clone(),
            window: window.name(),
            batch: batch.batch.clone(),
            partition: batch.partition.path(),
            reason: reason.label().to_string(),
            manifest_generation,
            lacking,
            by: self.recorder(),
            seen_at,
            detail,
        };
        Ok(self
            .store
            .create_if_absent(
                &exclusion_key(&agg.id, window, &batch.batch),
                record.to_json(),
            )
            .await?)
    }

    /// Records every batch of the window that the manifest does not mention as late.
    async fn record_late(
        &self,
        agg: &Aggregation,
        window: Window,
        manifest: &WindowManifest,
        view: &WindowView,
        now: i64,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let mentioned: HashSet<&str> = manifest
            .batches
            .iter()
            .map(|b| b.batch.as_str())
            .chain(manifest.excluded.iter().map(|e| e.batch.batch.as_str()))
            .collect();
        for (batch, _) in view.batches() {
            if mentioned.contains(batch.batch.as_str()) {
                continue;
            }
            if self.settings.dry_run {
                tracing::info!(aggregation = %agg.id, window = %window.name(), batch = %batch.batch, "dry run: would record a late batch");
                continue;
            }
            let detail = format!(
                "reached this store after generation {} of the window's manifest was written at {}; it is not counted in this window",
                manifest.generation,
                Window::rfc3339(manifest.decided_at)
            );
            if self
                .write_exclusion(
                    agg,
                    window,
                    &batch,
                    ExclusionReason::Late,
                    Some(manifest.generation),
                    None,
                    now,
                    detail,
                )
                .await?
            {
                report.batches_late += 1;
                metrics::counter!("millrace_batches_late_total", "aggregation" => agg.id.clone())
                    .increment(1);
                tracing::warn!(
                    aggregation = %agg.id,
                    window = %window.name(),
                    batch = %batch.batch,
                    partition = %batch.partition.path(),
                    generation = manifest.generation,
                    "late batch: it reached the store after the window's manifest; recorded, not counted"
                );
            }
        }
        Ok(())
    }

    /// Marks the window's partitions settled: every batch in them scheduled, the manifest
    /// written, this side's task out and every batch accounted for.
    async fn settle(
        &self,
        agg: &Aggregation,
        window: Window,
        manifest: &WindowManifest,
        view: &WindowView,
        now: i64,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let body = serde_json::json!({
            "version": 1,
            "window": window.name(),
            "generation": manifest.generation,
            "at": now,
        })
        .to_string();
        for p in Partition::range(window.start, window.end, agg.partition_secs()) {
            // A partition with a batch whose intake is not published yet stays unsettled.
            if view.partitions.get(&p) == Some(&false) {
                continue;
            }
            if self
                .store
                .create_if_absent(&settled_marker_key(&agg.id, p), body.clone())
                .await?
            {
                report.partitions_settled += 1;
            }
        }
        Ok(())
    }

    /// The helper, for a window without a manifest: wait, or past the deadline, record it FAILED.
    async fn await_manifest(
        &self,
        agg: &Aggregation,
        window: Window,
        now: i64,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let written_by = window.end + agg.max_age.as_secs() as i64;
        let deadline = written_by + agg.wait_deadline.as_secs() as i64;
        let leader = self
            .config
            .facilitator_name(LEADER)
            .unwrap_or("facilitator 0");
        if now < deadline {
            report.windows_waiting += 1;
            report.waiting_for_manifest += 1;
            if let Some(passes) = self
                .waiting_log
                .hit(&format!("{}/{}", agg.id, window.name()), 1)
            {
                tracing::info!(aggregation = %agg.id, window = %window.name(), leader, deadline = %Window::rfc3339(deadline), passes, "window waiting for the leader's manifest (logged once a minute per window)");
            }
            return Ok(());
        }
        if self.settings.dry_run {
            tracing::info!(aggregation = %agg.id, window = %window.name(), "dry run: would record the window FAILED (no manifest)");
            return Ok(());
        }
        let detail = format!(
            "no window manifest from the leader ({leader}) by {}: the leader writes it by the window's max age ({}), and this facilitator waited the aggregation's wait_deadline ({}) beyond that",
            Window::rfc3339(deadline),
            Window::rfc3339(written_by),
            crate::format_duration(agg.wait_deadline)
        );
        let record = Computation {
            version: COMPUTATION_VERSION,
            aggregation: agg.id.clone(),
            window: window.name(),
            state: ComputationState::Failed,
            generation: 0,
            updated_at: now,
            since: Some(window.end + agg.grace.as_secs() as i64),
            detail: Some(detail.clone()),
        };
        if self
            .store
            .create_if_absent(&computation_key(&agg.id, window), record.to_json())
            .await?
        {
            report.windows_failed += 1;
            metrics::counter!("millrace_windows_failed_total", "aggregation" => agg.id.clone())
                .increment(1);
            tracing::error!(aggregation = %agg.id, window = %window.name(), %detail, "window FAILED");
        }
        Ok(())
    }
}
