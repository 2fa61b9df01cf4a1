//! Group commit: reports of one aggregation and window collect in one open batch, which closes at
//! a size or age limit and is written, signed, create-only to both facilitators' stores. Every
//! request waits for the batch holding its reports; it is answered 201 only once both stores have
//! the batch.
//!
//! Why this shape: one object per report would cost two store writes per report and one intake
//! task per report; one batch per request would let a slow client decide batch sizes. Batches are
//! per window because a batch's signed time places it in one window: a batch's time is the time it
//! closes, clamped into its window, so the intake-worker finds every report in the batch's window
//! and no later than the batch plus the clock skew. Batch ids are random (16 bytes), so replicas
//! never coordinate and never collide.
//!
//! Duplicates: each window keeps the ids of the reports admitted to it (until the window closes
//! past its grace). A report id seen before is acknowledged once its first copy is stored and is
//! stored once; a first copy whose batch failed is forgotten, so the client's retry is stored.
//! A window remembers at most `max_remembered_ids` stored ids: past that it forgets the stored
//! ones (never those still pending), so its memory does not grow with the window's traffic. A
//! repeat that arrives after that is stored again, and the facilitators drop it as `replayed`:
//! it still counts once.
//!
//! Memory is bounded: admitted reports not yet answered count against `max_pending_reports` and
//! `max_pending_bytes`; past either, uploads are refused with 429 until batches drain, and
//! [`Batcher::shed`] refuses a body before it is decoded when the budget is already spent.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use millrace_protocol::crypto::{random_bytes, Signer25519};
use millrace_protocol::formats::IngestionBatch;
use millrace_protocol::layout::{ingestion_key, Partition, Window};
use millrace_protocol::upload::UploadReport;
use millrace_protocol::vdaf::ReportId;
use millrace_runtime::propagation;
use millrace_store::{Store, StoreError};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::problem::{Problem, ProblemKind};
use crate::Settings;

/// The open batch of one aggregation's window.
type WindowKey = (String, i64);

/// What became of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Open,
    Stored,
    Failed(String),
}

struct OpenBatch {
    generation: u64,
    window: Window,
    digest: [u8; 32],
    reports: Vec<UploadReport>,
    bytes: usize,
    done: watch::Sender<Outcome>,
}

enum Seen {
    Stored,
    Pending(watch::Receiver<Outcome>),
}

struct WindowIds {
    /// When the window closes past its grace: after that, nothing more is admitted to it and
    /// its ids are dropped.
    closes: i64,
    ids: HashMap<ReportId, Seen>,
    /// How many of `ids` are [`Seen::Stored`].
    stored: usize,
}

#[derive(Default)]
struct State {
    closing: bool,
    pending_reports: usize,
    pending_bytes: usize,
    next_generation: u64,
    open: HashMap<WindowKey, OpenBatch>,
    seen: HashMap<WindowKey, WindowIds>,
}

/// One report to admit: its aggregation, window and when that window closes past grace.
pub(crate) struct Admit {
    pub aggregation: String,
    pub digest: [u8; 32],
    pub window: Window,
    pub closes: i64,
    pub report: UploadReport,
}

/// What a request waits for, per report.
pub(crate) enum Wait {
    /// Already stored (a duplicate of a stored report).
    Stored,
    /// The batch holding the report (or its first copy).
    On(watch::Receiver<Outcome>),
}

/// What [`Batcher::admit`] admitted.
pub(crate) struct Admitted {
    pub waits: Vec<Wait>,
    /// Reports that were duplicates of one admitted before (or earlier in the same body).
    pub duplicates: usize,
}

pub(crate) struct Batcher {
    state: Mutex<State>,
    /// Woken whenever a batch finishes (for [`Batcher::close`]).
    drained: Notify,
    settings: Settings,
    signer: Signer25519,
    stores: [Store; 2],
}

impl Batcher {
    pub(crate) fn new(settings: Settings, signer: Signer25519, stores: [Store; 2]) -> Self {
        Batcher {
            state: Mutex::new(State::default()),
            drained: Notify::new(),
            settings,
            signer,
            stores,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports admitted and not yet answered.
    pub(crate) fn pending_reports(&self) -> usize {
        self.lock().pending_reports
    }

    /// Refuses a body of `body_bytes` before it is decoded when nothing could admit it now: 503
    /// while closing, 429 while the pending budget is already spent. Under overload, refusing
    /// costs no decoding or checking; [`Batcher::admit`] still checks the exact budget.
    pub(crate) fn shed(&self, body_bytes: usize) -> Result<(), Problem> {
        self.refuse(&self.lock(), 1, body_bytes)
    }

    /// 503 while closing; 429 (counted) when `new_reports` more reports of `new_bytes` would
    /// pass the pending budget. The budget never refuses the only pending body.
    fn refuse(&self, state: &State, new_reports: usize, new_bytes: usize) -> Result<(), Problem> {
        let retry = self.settings.retry_after.as_secs().max(1);
        if state.closing {
            return Err(Problem::new(
                ProblemKind::Unavailable,
                "this ingestor is shutting down; send the report again (to another replica)",
            )
            .retry_after(retry));
        }
        let s = &self.settings;
        if new_reports > 0
            && state.pending_reports > 0
            && (state.pending_reports.saturating_add(new_reports) > s.max_pending_reports
                || state.pending_bytes.saturating_add(new_bytes) > s.max_pending_bytes)
        {
            metrics::counter!("millrace_ingestor_overloaded_total").increment(1);
            return Err(Problem::new(
                ProblemKind::Overloaded,
                format!(
                    "{} reports ({} bytes) are waiting to be stored; this body would pass the \
                     limit of {} reports or {} bytes",
                    state.pending_reports,
                    state.pending_bytes,
                    s.max_pending_reports,
                    s.max_pending_bytes
                ),
            )
            .retry_after(retry));
        }
        Ok(())
    }

    /// Admits every report of one request, or none: refused while closing (503) or when the
    /// pending budget would be exceeded (429).
    pub(crate) fn admit(
        self: &Arc<Self>,
        reports: Vec<Admit>,
        now: i64,
    ) -> Result<Admitted, Problem> {
        let mut to_flush = Vec::new();
        let admitted = {
            let mut state = self.lock();
            self.refuse(&state, 0, 0)?;
            state.seen.retain(|_, w| w.closes > now);
            // Count what is new before admitting anything: a body is admitted whole or not at all.
            let mut fresh = HashSet::new();
            let (mut new_reports, mut new_bytes) = (0usize, 0usize);
            for a in &reports {
                let key = (a.aggregation.clone(), a.window.start);
                let known = state
                    .seen
                    .get(&key)
                    .is_some_and(|w| w.ids.contains_key(&a.report.report_id));
                if !known && fresh.insert((key, a.report.report_id)) {
                    new_reports += 1;
                    new_bytes += a.report.encoded_len();
                }
            }
            self.refuse(&state, new_reports, new_bytes)?;
            let s = &self.settings;
            let mut waits = Vec::with_capacity(reports.len());
            let mut duplicates = 0;
            for a in reports {
                let st = &mut *state;
                let key = (a.aggregation.clone(), a.window.start);
                let id = a.report.report_id;
                let ids = st.seen.entry(key.clone()).or_insert_with(|| WindowIds {
                    closes: a.closes,
                    ids: HashMap::new(),
                    stored: 0,
                });
                match ids.ids.get(&id) {
                    Some(Seen::Stored) => {
                        duplicates += 1;
                        waits.push(Wait::Stored);
                        continue;
                    }
                    Some(Seen::Pending(rx)) => {
                        duplicates += 1;
                        waits.push(Wait::On(rx.clone()));
                        continue;
                    }
                    None => {}
                }
                let bytes = a.report.encoded_len();
                let batch = match st.open.entry(key.clone()) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        st.next_generation += 1;
                        let generation = st.next_generation;
                        self.start_age_timer(key.clone(), generation);
                        e.insert(OpenBatch {
                            generation,
                            window: a.window,
                            digest: a.digest,
                            reports: Vec::new(),
                            bytes: 0,
                            done: watch::channel(Outcome::Open).0,
                        })
                    }
                };
                batch.reports.push(a.report);
                batch.bytes += bytes;
                let rx = batch.done.subscribe();
                let full = batch.reports.len() >= s.max_batch_reports.max(1)
                    || batch.bytes >= s.max_batch_bytes;
                if full {
                    if let Some(b) = st.open.remove(&key) {
                        to_flush.push((key, b));
                    }
                }
                ids.ids.insert(id, Seen::Pending(rx.clone()));
                st.pending_reports += 1;
                st.pending_bytes += bytes;
                waits.push(Wait::On(rx));
            }
            metrics::gauge!("millrace_ingestor_pending_reports").set(state.pending_reports as f64);
            Admitted { waits, duplicates }
        };
        for (key, batch) in to_flush {
            self.spawn_flush(key, batch);
        }
        Ok(admitted)
    }

    /// Closes the batch `generation` of `key` once it is `max_batch_age` old, if it is still open.
    fn start_age_timer(self: &Arc<Self>, key: WindowKey, generation: u64) {
        let this = self.clone();
        let age = self.settings.max_batch_age;
        tokio::spawn(async move {
            tokio::time::sleep(age).await;
            let batch = {
                let mut state = this.lock();
                match state.open.get(&key) {
                    Some(b) if b.generation == generation => state.open.remove(&key),
                    _ => None,
                }
            };
            if let Some(batch) = batch {
                this.spawn_flush(key, batch);
            }
        });
    }

    fn spawn_flush(self: &Arc<Self>, key: WindowKey, batch: OpenBatch) {
        let this = self.clone();
        tokio::spawn(async move { this.flush(key, batch).await });
    }

    /// Signs the batch for each facilitator, writes both copies create-only, then answers every
    /// report in it.
    async fn flush(self: Arc<Self>, key: WindowKey, batch: OpenBatch) {
        let started = Instant::now();
        let (aggregation, _) = &key;
        let now = chrono::Utc::now().timestamp();
        // The batch's time: now, clamped into its window (a late report's window has ended; a
        // report from a fast clock may be in a window that has not started).
        let time = now.clamp(batch.window.start, batch.window.end - 1);
        let batch_id = hex::encode(random_bytes::<16>());
        let object = ingestion_key(
            aggregation,
            Partition::with_length(time, batch.window.end - batch.window.start),
            &batch_id,
        );
        let n = batch.reports.len();
        // The first step of the batch's trace, which the workflow-managers and intake-workers
        // continue (`propagation::batch_context`).
        let span = tracing::info_span!(
            "store batch",
            aggregation = %aggregation,
            batch = %batch_id,
            reports = n
        );
        propagation::set_parent(&span, propagation::batch_context(aggregation, &batch_id));
        let outcome = async {
            match self.encode(aggregation, &batch, &batch_id, time).await {
                Ok([first, second]) => {
                    let (a, b) = tokio::join!(
                        self.write(0, &object, first),
                        self.write(1, &object, second)
                    );
                    match (a, b) {
                        (Ok(()), Ok(())) => Outcome::Stored,
                        (Err(e), _) | (_, Err(e)) => Outcome::Failed(e),
                    }
                }
                Err(e) => Outcome::Failed(e),
            }
        }
        .instrument(span)
        .await;
        match &outcome {
            Outcome::Stored => {
                metrics::counter!("millrace_ingestor_batches_total", "aggregation" => aggregation.clone())
                    .increment(1);
                metrics::counter!("millrace_ingestor_reports_stored_total", "aggregation" => aggregation.clone())
                    .increment(n as u64);
                metrics::histogram!("millrace_ingestor_batch_reports").record(n as f64);
                tracing::info!(aggregation = %aggregation, batch = %batch_id, object = %object, reports = n, "batch stored");
            }
            Outcome::Failed(error) => {
                metrics::counter!("millrace_ingestor_batches_failed_total", "aggregation" => aggregation.clone())
                    .increment(1);
                tracing::error!(aggregation = %aggregation, batch = %batch_id, object = %object, reports = n, %error, "batch not stored; its reports are refused with 503");
            }
            Outcome::Open => {}
        }
        metrics::histogram!("millrace_ingestor_flush_seconds")
            .record(started.elapsed().as_secs_f64());
        {
            let mut state = self.lock();
            if let Some(w) = state.seen.get_mut(&key) {
                for r in &batch.reports {
                    if outcome == Outcome::Stored {
                        if !matches!(w.ids.insert(r.report_id, Seen::Stored), Some(Seen::Stored)) {
                            w.stored += 1;
                        }
                    } else {
                        w.ids.remove(&r.report_id);
                    }
                }
                if w.stored > self.settings.max_remembered_ids {
                    w.ids.retain(|_, seen| matches!(seen, Seen::Pending(_)));
                    w.ids.shrink_to_fit();
                    metrics::counter!("millrace_ingestor_remembered_ids_forgotten_total", "aggregation" => aggregation.clone())
                        .increment(w.stored as u64);
                    tracing::info!(aggregation = %aggregation, window = %batch.window.name(), forgotten = w.stored, "forgot the stored report ids of a busy window (a repeat is now stored again and dropped by the facilitators as replayed)");
                    w.stored = 0;
                }
            }
            state.pending_reports = state.pending_reports.saturating_sub(n);
            state.pending_bytes = state.pending_bytes.saturating_sub(batch.bytes);
            metrics::gauge!("millrace_ingestor_pending_reports").set(state.pending_reports as f64);
        }
        batch.done.send_replace(outcome);
        self.drained.notify_waiters();
    }

    async fn encode(
        &self,
        aggregation: &str,
        batch: &OpenBatch,
        batch_id: &str,
        time: i64,
    ) -> Result<[Vec<u8>; 2], String> {
        let copies: [IngestionBatch; 2] = [0u8, 1].map(|f| IngestionBatch {
            aggregation: aggregation.to_string(),
            aggregation_digest: batch.digest,
            batch_id: batch_id.to_string(),
            facilitator: f,
            time,
            reports: batch
                .reports
                .iter()
                .map(|r| r.encrypted_report(f))
                .collect(),
        });
        let signer = self.signer.clone();
        tokio::task::spawn_blocking(move || -> Result<[Vec<u8>; 2], String> {
            let [a, b] = copies;
            let encode = |c: IngestionBatch| c.encode(&signer).map_err(|e| e.to_string());
            Ok([encode(a)?, encode(b)?])
        })
        .await
        .map_err(|e| format!("encoding the batch: {e}"))?
    }

    /// Writes one copy create-only, retrying what may pass.
    async fn write(&self, facilitator: u8, key: &str, bytes: Vec<u8>) -> Result<(), String> {
        let store = &self.stores[usize::from(facilitator)];
        let bytes = bytes::Bytes::from(bytes);
        let attempts = self.settings.store_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match store.create(key, bytes.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    metrics::counter!("millrace_ingestor_store_errors_total", "facilitator" => facilitator.to_string())
                        .increment(1);
                    let permanent = matches!(
                        e,
                        StoreError::Conflict { .. } | StoreError::InvalidKey { .. }
                    );
                    if permanent || attempt >= attempts {
                        return Err(format!(
                            "facilitator {facilitator}'s store ({}): {e}",
                            store.redacted_url()
                        ));
                    }
                    tracing::warn!(facilitator, object = %key, attempt, error = %e, "store write failed; retrying");
                    tokio::time::sleep(millrace_runtime::worker::retry_delay(
                        attempt,
                        Duration::from_millis(100),
                        Duration::from_secs(2),
                    ))
                    .await;
                }
            }
        }
    }

    /// Stops admitting (every later upload gets 503), closes every open batch now, and returns
    /// once every admitted report has been answered. Idempotent.
    pub(crate) async fn close(self: &Arc<Self>) {
        let open: Vec<(WindowKey, OpenBatch)> = {
            let mut state = self.lock();
            state.closing = true;
            state.open.drain().collect()
        };
        for (key, batch) in open {
            self.spawn_flush(key, batch);
        }
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.lock().pending_reports == 0 {
                return;
            }
            drained.await;
        }
    }
}
