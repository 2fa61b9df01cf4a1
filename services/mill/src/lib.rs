//! mill: joins both facilitators' sum parts of a window into the result.
//!
//! Each facilitator aggregates one generation of the window's manifest and announces its part
//! with `sum-part-ready` naming that generation. On such a message the mill looks for both parts
//! of the generation (`sums/{agg}/{window}/{generation}.sum.{0,1}`) in the collector's store.
//!
//! **Waiting is not failing.** If one part is missing, the mill records the computation as
//! WAITING_FOR_PARTS (with `since`, kept across messages of the same generation), adds the window
//! to its waiting index (`waiting/{agg}/{window}`) and acknowledges the message: nothing is
//! re-queued, and no delivery attempts are spent. A part is written before its message is
//! published, so the message of whichever part comes second always finds both, and that one does
//! the join. If that message is lost, the sweep ([`Mill::run_sweeps`], every `--sweep-interval`)
//! walks the waiting index and tries the join again. A window still missing a part
//! `wait_deadline` after `since` is recorded FAILED. The detail names the part that never came,
//! and `millrace_windows_failed_total` counts the window. A message for a generation that has
//! already FAILED (or an older one) is acknowledged as [`MillOutcome::Stale`]. Only
//! `millrace replay window --reaggregate`, which writes a new manifest generation, starts the
//! window again.
//!
//! With both parts the mill refuses to unshard unless they aggregate the same window manifest
//! (equal manifest digests) and their report counts, report-id digests and batch lists agree. Both
//! facilitators must have aggregated exactly the same reports. The mill then enforces the
//! aggregation's minimum report count, unshards, and writes `results/{agg}/{window}.result.json`
//! (naming the generation). It publishes `result-ready`, marks the computation SUCCEEDED and
//! drops the window from the waiting index.
//!
//! **Refusals.** A facilitator whose window is below its minimum report count writes a signed
//! share refusal (`…/{generation}.refused.{i}`, no share) instead of its part, and announces it
//! the same way. With both answers in, a refusal by either ends the computation as REFUSED, its
//! detail giving each facilitator's answer; a part released by the other is never unsharded.
//! A refusal whose peer never answers is REFUSED at the wait deadline. The mill's own minimum
//! check stays (the collector's policy); it too records REFUSED.
//!
//! Both parts' messages of a window can be handled at the same moment (by one mill or by two), and
//! both then find both parts. The result itself is deterministic and written create-only, so both
//! writes agree. A result of another generation that was written first wins: the later join
//! stops there. Announcing the result goes through an idempotency marker
//! (`markers/{agg}/results/{window}`, the same claim → publish → mark protocol the
//! workflow-manager uses). So `result-ready` is published, and the window counted in
//! `millrace_windows_succeeded_total`, once. A window whose marker says it was announced is done:
//! later messages for it are acknowledged as is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use millrace_bus::{Bus, Message};
use millrace_protocol::agreement::{mismatch, AggregationDigest};
use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::crypto::KeyRing;
use millrace_protocol::formats::{ShareRefusal, SumPart};
use millrace_protocol::layout::{
    computation_key, result_key, result_marker_key, share_refusal_key, sum_part_key, waiting_key,
    waiting_prefix, Window,
};
use millrace_protocol::results::{
    AggregationResult, Computation, ComputationState, COMPUTATION_VERSION, RESULT_VERSION,
};
use millrace_protocol::tasks::{topics, ResultReady, SumPartReady, TaskMessage, TASK_VERSION};
use millrace_runtime::{lag, propagation, zeroed, Handler, Shutdown, Task, TaskError};
use millrace_store::markers::{self, Claim};
use millrace_store::{Store, StoreError};

/// A claim to announce a result older than this is taken over (its holder is presumed dead).
/// Announcing is one publish, which a backend retries for at most about 30 s.
const ANNOUNCE_CLAIM_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Mill {
    config: Arc<Config>,
    collector: Store,
    bus: Arc<dyn Bus>,
    topic_prefix: String,
    facilitator_keys: KeyRing,
    /// Each aggregation's digest, where this config can compute it (it has `verify_key_id`):
    /// announcements carrying another are refused.
    digests: std::collections::BTreeMap<String, AggregationDigest>,
    /// Who this mill is in marker records (`mill-{host}-{pid}`).
    instance: String,
    /// Numbers each join, so that two joins in this process never mistake each other's claim
    /// for their own.
    joins: AtomicU64,
}

/// What happened to a window when a message for it was handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MillOutcome {
    Succeeded(Box<AggregationResult>),
    AlreadyDone,
    /// Refused by a party's policy (too few reports): a facilitator withheld its share, or the
    /// mill's own check. Recorded as REFUSED, nothing to retry.
    Refused(String),
    /// The sum part of facilitator `missing` (of the message's generation) is not in the
    /// collector's store yet. The window is recorded as waiting and the message is acknowledged:
    /// that part's own `sum-part-ready` does the join, or else the sweep does.
    Waiting {
        missing: u8,
    },
    /// The message's generation of the window has already FAILED (or a newer generation has).
    /// Acknowledged; nothing is retried. The reason says so and names the way out.
    Stale(String),
}

/// What one pass of [`Mill::expire_waiting`] did with the windows in the waiting index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Windows joined by the sweep, or found done already (result announced).
    pub joined: usize,
    /// Windows whose missing part did not come by the wait deadline: now FAILED.
    pub failed: usize,
    /// Windows whose parts were both there but refused (mismatch or policy): now FAILED.
    pub refused: usize,
    /// Windows still waiting within their deadline.
    pub waiting: usize,
    /// Index entries removed because their window has no record or a finished one.
    pub cleared: usize,
    /// Entries (or aggregations) that could not be handled in this pass; logged, tried again
    /// in the next.
    pub errors: usize,
}

impl SweepReport {
    fn is_empty(&self) -> bool {
        *self == SweepReport::default()
    }
}

/// The join of one generation, before the caller decides what a missing part means.
enum Joined {
    /// Finished one way or another (succeeded, done already, refused by policy).
    Done(MillOutcome),
    /// The parts disagree; recorded FAILED. The reason names the window.
    Mismatch(String),
    /// The part of this facilitator is not there.
    Missing(u8),
}

/// What one facilitator sent for a generation: its sum part, or its refusal to release one.
enum Answer {
    Part(SumPart),
    Refused(ShareRefusal),
}

/// One waiting-index entry's fate in a sweep.
enum Swept {
    Joined,
    Failed,
    Refused,
    Waiting,
    Cleared,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Mill {
    pub fn new(
        config: Arc<Config>,
        collector: Store,
        bus: Arc<dyn Bus>,
        topic_prefix: &str,
    ) -> anyhow::Result<Self> {
        let facilitator_keys = config.facilitator_keys()?;
        let digests = config.aggregation_digests();
        for a in &config.aggregations {
            zeroed::counter("millrace_windows_failed_total", &[("aggregation", &a.id)]);
            zeroed::counter(
                "millrace_windows_refused_total",
                &[("aggregation", &a.id), ("by", "mill")],
            );
            if !digests.contains_key(&a.id) {
                tracing::warn!(aggregation = %a.id, "no verify_key_id and no readable verify key: sum-part-ready messages of this aggregation are not checked against its aggregation digest (the two parts are still compared with each other)");
            }
        }
        Ok(Mill {
            digests,
            config,
            collector,
            bus,
            topic_prefix: topic_prefix.to_string(),
            facilitator_keys,
            instance: format!(
                "mill-{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_string()),
                std::process::id()
            ),
            joins: AtomicU64::new(0),
        })
    }

    async fn record(
        &self,
        agg: &str,
        window: Window,
        generation: u32,
        state: ComputationState,
        since: Option<i64>,
        detail: Option<String>,
    ) -> Result<(), TaskError> {
        let c = Computation {
            version: COMPUTATION_VERSION,
            aggregation: agg.to_string(),
            window: window.name(),
            state,
            generation,
            updated_at: now(),
            since,
            detail,
        };
        self.collector
            .overwrite(&computation_key(agg, window), c.to_json())
            .await
            .map_err(TaskError::from)
    }

    /// The computation record, if there is one that can be read. An unreadable one is logged
    /// and treated as absent (it is overwritten by the next record).
    async fn read_record(
        &self,
        agg: &str,
        window: Window,
    ) -> Result<Option<Computation>, StoreError> {
        let key = computation_key(agg, window);
        let Some(bytes) = self.collector.get(&key).await? else {
            return Ok(None);
        };
        match Computation::from_json(&bytes) {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                tracing::warn!(record = %key, error = %e, "ignoring an unreadable computation record");
                Ok(None)
            }
        }
    }

    /// Drops a window from the waiting index. A failure is only logged: the sweep clears an
    /// entry whose window is finished.
    async fn unindex(&self, agg: &str, window: Window) {
        let key = waiting_key(agg, window);
        if let Err(e) = self.collector.delete(&key).await {
            tracing::warn!(index = %key, error = %e, "could not remove the waiting-index entry; the sweep will");
        }
    }

    async fn is_announced(&self, agg: &str, window: Window) -> Result<bool, TaskError> {
        markers::is_published(&self.collector, &result_marker_key(agg, window))
            .await
            .map_err(TaskError::from)
    }

    /// The window's result is announced: makes its record say SUCCEEDED (with the generation of
    /// the result written) and drops it from the waiting index. Used where a waiting record may
    /// have been written over the join's SUCCEEDED.
    async fn settle_announced(
        &self,
        agg: &str,
        window: Window,
        fallback_generation: u32,
    ) -> Result<(), TaskError> {
        let rkey = result_key(agg, window);
        let generation = match self.collector.get(&rkey).await.map_err(TaskError::from)? {
            Some(bytes) => match AggregationResult::from_json(&bytes) {
                Ok(r) => r.generation,
                Err(e) => {
                    tracing::warn!(result = %rkey, error = %e, "cannot read the announced result");
                    fallback_generation
                }
            },
            None => fallback_generation,
        };
        self.record(
            agg,
            window,
            generation,
            ComputationState::Succeeded,
            None,
            None,
        )
        .await?;
        self.unindex(agg, window).await;
        Ok(())
    }

    /// Facilitator `f`'s answer for `generation`: its refusal if it wrote one, else its part.
    async fn answer(
        &self,
        agg: &str,
        window: Window,
        generation: u32,
        f: u8,
    ) -> Result<Option<Answer>, TaskError> {
        let key = share_refusal_key(agg, window, generation, f);
        if let Some(bytes) = self.collector.get(&key).await.map_err(TaskError::from)? {
            let (refusal, signer) = ShareRefusal::decode(&self.facilitator_keys, &bytes)
                .map_err(|e| TaskError::Permanent(e.in_object(&key).to_string()))?;
            let expected = self
                .config
                .facilitator_name(f)
                .map_err(|e| TaskError::Permanent(e.to_string()))?;
            if signer != expected
                || refusal.facilitator != f
                || refusal.aggregation != agg
                || refusal.window_start != window.start
                || refusal.window_end != window.end
                || refusal.generation != generation
            {
                return Err(TaskError::Permanent(format!(
                    "{key}: a refusal signed by {signer:?} for {} facilitator {} generation {}, \
                     expected {expected:?} for {agg}/{} facilitator {f} generation {generation}",
                    refusal.aggregation,
                    refusal.facilitator,
                    refusal.generation,
                    window.name()
                )));
            }
            return Ok(Some(Answer::Refused(refusal)));
        }
        Ok(self
            .part(agg, window, generation, f)
            .await?
            .map(Answer::Part))
    }

    async fn part(
        &self,
        agg: &str,
        window: Window,
        generation: u32,
        f: u8,
    ) -> Result<Option<SumPart>, TaskError> {
        let key = sum_part_key(agg, window, generation, f);
        let Some(bytes) = self.collector.get(&key).await.map_err(TaskError::from)? else {
            return Ok(None);
        };
        let (part, signer) = SumPart::decode(&self.facilitator_keys, &bytes)
            .map_err(|e| TaskError::Permanent(e.in_object(&key).to_string()))?;
        let expected = self
            .config
            .facilitator_name(f)
            .map_err(|e| TaskError::Permanent(e.to_string()))?;
        if signer != expected
            || part.facilitator != f
            || part.aggregation != agg
            || part.window_start != window.start
            || part.window_end != window.end
            || part.generation != generation
        {
            return Err(TaskError::Permanent(format!(
                "{key}: signed by {signer:?} for {} facilitator {} generation {}, expected \
                 {expected:?} for {agg}/{} facilitator {f} generation {generation}",
                part.aggregation,
                part.facilitator,
                part.generation,
                window.name()
            )));
        }
        Ok(Some(part))
    }

    fn aggregation(&self, id: &str) -> Result<&Aggregation, TaskError> {
        self.config
            .aggregation(id)
            .ok_or_else(|| TaskError::Permanent(format!("aggregation {id:?} is not configured")))
    }

    pub async fn join(&self, msg: &SumPartReady) -> Result<MillOutcome, TaskError> {
        let agg = self.aggregation(&msg.aggregation)?;
        let window = Window::parse(&msg.window).map_err(|e| TaskError::Permanent(e.to_string()))?;
        if let Some(ours) = self.digests.get(&agg.id) {
            if msg.aggregation_digest != ours.to_string() {
                return Err(TaskError::Permanent(mismatch(
                    &agg.id,
                    &format!("facilitator {}'s sum-part-ready", msg.facilitator),
                    &AggregationDigest::parse(&msg.aggregation_digest)
                        .unwrap_or(AggregationDigest([0; 32])),
                    ours,
                )));
            }
        }
        if self.is_announced(&agg.id, window).await? {
            return Ok(MillOutcome::AlreadyDone);
        }
        let record = self
            .read_record(&agg.id, window)
            .await
            .map_err(TaskError::from)?;
        if let Some(c) = &record {
            if matches!(
                c.state,
                ComputationState::Failed | ComputationState::Refused
            ) && c.generation >= msg.generation
            {
                let reason = format!(
                    "{}/{}: generation {} already failed; the sum part of facilitator {} for \
                     generation {} is not joined (`millrace replay window --reaggregate` starts \
                     a new generation)",
                    agg.id, msg.window, c.generation, msg.facilitator, msg.generation
                );
                tracing::info!(
                    aggregation = %agg.id,
                    window = %msg.window,
                    failed_generation = c.generation,
                    generation = msg.generation,
                    "generation {} already failed; `millrace replay window --reaggregate` starts a new one",
                    c.generation
                );
                return Ok(MillOutcome::Stale(reason));
            }
        }
        match self.try_join(agg, window, msg.generation).await? {
            Joined::Done(outcome) => Ok(outcome),
            Joined::Mismatch(reason) => Err(TaskError::Permanent(reason)),
            Joined::Missing(missing) => {
                self.wait(agg, window, msg.generation, missing, record.as_ref())
                    .await
            }
        }
    }

    /// Records that `generation` of the window waits for the part of facilitator `missing`.
    async fn wait(
        &self,
        agg: &Aggregation,
        window: Window,
        generation: u32,
        missing: u8,
        record: Option<&Computation>,
    ) -> Result<MillOutcome, TaskError> {
        let name = window.name();
        let since = match record {
            Some(c) if c.state == ComputationState::Succeeded => {
                // Never overwritten: the window is done (its marker check raced with the join).
                return Ok(MillOutcome::Waiting { missing });
            }
            Some(c) if !c.state.is_terminal() && c.generation > generation => {
                // A newer generation is being waited on; an older one does not take its place.
                tracing::info!(aggregation = %agg.id, window = %name, generation, waiting_generation = c.generation, missing, "a part of an older generation is missing; the record stays on the newer one");
                return Ok(MillOutcome::Waiting { missing });
            }
            Some(c)
                if c.state == ComputationState::WaitingForParts && c.generation == generation =>
            {
                c.since.unwrap_or(c.updated_at)
            }
            _ => now(),
        };
        self.record(
            &agg.id,
            window,
            generation,
            ComputationState::WaitingForParts,
            Some(since),
            None,
        )
        .await?;
        self.collector
            .overwrite(
                &waiting_key(&agg.id, window),
                format!("{generation}\n").into_bytes(),
            )
            .await
            .map_err(TaskError::from)?;
        // The join of the other part's message may have finished between our look at the parts
        // and the record we just wrote over its SUCCEEDED: put it back.
        if self.is_announced(&agg.id, window).await? {
            self.settle_announced(&agg.id, window, generation).await?;
            return Ok(MillOutcome::AlreadyDone);
        }
        tracing::info!(aggregation = %agg.id, window = %name, generation, missing, "waiting for the other sum part");
        Ok(MillOutcome::Waiting { missing })
    }

    /// Joins both parts of `generation` if both are there.
    async fn try_join(
        &self,
        agg: &Aggregation,
        window: Window,
        generation: u32,
    ) -> Result<Joined, TaskError> {
        let name = window.name();
        let rkey = result_key(&agg.id, window);
        let announced = result_marker_key(&agg.id, window);
        let a0 = self.answer(&agg.id, window, generation, 0).await?;
        let a1 = self.answer(&agg.id, window, generation, 1).await?;
        let (p0, p1) = match (a0, a1) {
            (Some(Answer::Part(a)), Some(Answer::Part(b))) => (a, b),
            (Some(a0), Some(a1)) => {
                let reason = self.refusal_detail(agg, window, generation, [Some(&a0), Some(&a1)]);
                self.refuse(agg, window, generation, None, reason.clone())
                    .await?;
                return Ok(Joined::Done(MillOutcome::Refused(reason)));
            }
            (None, _) => return Ok(Joined::Missing(0)),
            (Some(_), None) => return Ok(Joined::Missing(1)),
        };
        let digests = match (p0.aggregation_digest, p1.aggregation_digest) {
            (Some(d0), Some(d1)) if d0 != d1 => Some((d0, d1)),
            _ => None,
        };
        let mismatch = if let Some((d0, d1)) = digests {
            Some(format!(
                "the facilitators run different aggregations: facilitator 0's part carries \
                 aggregation digest {}, facilitator 1's {}",
                AggregationDigest(d0),
                AggregationDigest(d1)
            ))
        } else if p0.manifest_digest != p1.manifest_digest {
            Some("the parts aggregate different window manifests".to_string())
        } else if p0.report_count != p1.report_count {
            Some(format!(
                "report counts differ: facilitator 0 has {}, facilitator 1 has {}",
                p0.report_count, p1.report_count
            ))
        } else if p0.report_digest != p1.report_digest {
            Some(
                "report-id digests differ: the facilitators aggregated different reports"
                    .to_string(),
            )
        } else if p0.batches != p1.batches {
            Some("the facilitators aggregated different batch lists".to_string())
        } else {
            None
        };
        if let Some(reason) = mismatch {
            let reason = format!(
                "{}/{name} generation {generation}: refusing to unshard: {reason}",
                agg.id
            );
            tracing::warn!(aggregation = %agg.id, window = %name, generation, %reason, "window failed");
            self.record(
                &agg.id,
                window,
                generation,
                ComputationState::Failed,
                None,
                Some(reason.clone()),
            )
            .await?;
            self.unindex(&agg.id, window).await;
            metrics::counter!("millrace_windows_failed_total", "aggregation" => agg.id.clone())
                .increment(1);
            return Ok(Joined::Mismatch(reason));
        }
        if p0.report_count < agg.min_reports {
            let reason = format!(
                "{}/{name} generation {generation}: refused by the collector's mill: only {} \
                 valid reports, its policy requires at least {} (both facilitators released \
                 their shares; they are not unsharded)",
                agg.id, p0.report_count, agg.min_reports
            );
            metrics::counter!("millrace_windows_refused_total", "aggregation" => agg.id.clone(), "by" => "mill")
                .increment(1);
            self.refuse(agg, window, generation, None, reason.clone())
                .await?;
            return Ok(Joined::Done(MillOutcome::Refused(reason)));
        }
        let value = agg
            .vdaf
            .unshard([&p0.aggregate_share, &p1.aggregate_share], p0.report_count)
            .map_err(|e| {
                TaskError::Permanent(format!("{}/{name} generation {generation}: {e}", agg.id))
            })?;
        let result = AggregationResult {
            version: RESULT_VERSION,
            aggregation: agg.id.clone(),
            window: name.clone(),
            window_start: Window::rfc3339(window.start),
            window_end: Window::rfc3339(window.end),
            generation,
            vdaf: agg.vdaf.spec().clone(),
            result: value,
            report_count: p0.report_count,
            invalid_count: p0.invalid_count.max(p1.invalid_count),
            invalid_reasons: p0.invalid_reasons.by_label(),
            report_digest: hex_digest(&p0.report_digest),
            batches: p0.batches.clone(),
        };
        // Deterministic bytes: a second join of the same generation writes nothing new.
        match self.collector.create(&rkey, result.to_json()).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                tracing::warn!(aggregation = %agg.id, window = %name, generation, result = %rkey, "a result of another generation was released first; this generation's join stops here");
                return Ok(Joined::Done(MillOutcome::AlreadyDone));
            }
            Err(e) => return Err(TaskError::from(e)),
        }
        let me = format!(
            "{}-{}",
            self.instance,
            self.joins.fetch_add(1, Ordering::Relaxed)
        );
        let claim_generation =
            match markers::claim(&self.collector, &announced, &me, ANNOUNCE_CLAIM_TIMEOUT)
                .await
                .map_err(TaskError::from)?
            {
                Claim::Won { generation, .. } => generation,
                Claim::AlreadyPublished => return Ok(Joined::Done(MillOutcome::AlreadyDone)),
                Claim::HeldByOther { by, .. } => {
                    // Another join is announcing it right now; by the retry it will have.
                    return Err(TaskError::Transient(format!(
                        "{}/{name}: the result is being announced by {by}",
                        agg.id
                    )));
                }
            };
        let published = propagation::publish(
            self.bus.as_ref(),
            &topics::results(&self.topic_prefix),
            Message::new(
                ResultReady {
                    version: TASK_VERSION,
                    aggregation: agg.id.clone(),
                    window: name.clone(),
                    result_key: rkey.clone(),
                }
                .to_json(),
            ),
            None,
        )
        .await;
        let message_id = match published {
            Ok(id) => id,
            Err(e) => {
                // Give the claim up at once, so the retry (ours or another mill's) need not wait
                // for the claim timeout.
                if let Err(release) =
                    markers::release(&self.collector, &announced, &me, claim_generation).await
                {
                    tracing::warn!(marker = %announced, error = %release, "could not release the announce claim; it times out instead");
                }
                return Err(TaskError::Transient(e.to_string()));
            }
        };
        markers::mark_published(
            &self.collector,
            &announced,
            &me,
            claim_generation,
            &message_id,
        )
        .await
        .map_err(TaskError::from)?;
        self.record(
            &agg.id,
            window,
            generation,
            ComputationState::Succeeded,
            None,
            None,
        )
        .await?;
        self.unindex(&agg.id, window).await;
        metrics::counter!("millrace_windows_succeeded_total", "aggregation" => agg.id.clone())
            .increment(1);
        lag::record(lag::WINDOW_RESULT, &agg.id, window.end);
        tracing::info!(aggregation = %agg.id, window = %name, generation, reports = result.report_count, "result written");
        Ok(Joined::Done(MillOutcome::Succeeded(Box::new(result))))
    }

    /// Each facilitator's answer, for a REFUSED record's detail.
    fn refusal_detail(
        &self,
        agg: &Aggregation,
        window: Window,
        generation: u32,
        answers: [Option<&Answer>; 2],
    ) -> String {
        let said: Vec<String> = answers
            .iter()
            .enumerate()
            .map(|(f, answer)| {
                let name = self.config.facilitator_name(f as u8).unwrap_or("?");
                match answer {
                    Some(Answer::Refused(r)) => r.reason.clone(),
                    Some(Answer::Part(p)) => format!(
                        "{name} (facilitator {f}) released its share ({} valid reports; not \
                         unsharded)",
                        p.report_count
                    ),
                    None => format!("{name} (facilitator {f}) never answered"),
                }
            })
            .collect();
        format!(
            "{}/{} generation {generation}: refused: {}",
            agg.id,
            window.name(),
            said.join("; ")
        )
    }

    /// Records REFUSED with `reason` and drops the window from the waiting index.
    async fn refuse(
        &self,
        agg: &Aggregation,
        window: Window,
        generation: u32,
        since: Option<i64>,
        reason: String,
    ) -> Result<(), TaskError> {
        tracing::warn!(aggregation = %agg.id, window = %window.name(), generation, %reason, "window refused");
        self.record(
            &agg.id,
            window,
            generation,
            ComputationState::Refused,
            since,
            Some(reason),
        )
        .await?;
        self.unindex(&agg.id, window).await;
        Ok(())
    }

    /// One pass over the waiting index of every aggregation, as of `now` (unix seconds). For each
    /// window waited on it tries the join again (both parts may be there now, say after a lost
    /// message); a window still missing a part `wait_deadline` after it started waiting is
    /// recorded FAILED. Entries whose window has no record or a finished one are removed. A bad
    /// entry is logged and counted in [`SweepReport::errors`], and the pass goes on; the error
    /// returned, if any, is the first aggregation whose index could not be listed (after the
    /// others were swept).
    pub async fn expire_waiting(&self, now: i64) -> Result<SweepReport, StoreError> {
        self.sweep(now, None).await
    }

    async fn sweep(
        &self,
        now: i64,
        shutdown: Option<&Shutdown>,
    ) -> Result<SweepReport, StoreError> {
        let mut report = SweepReport::default();
        let mut first_error = None;
        for agg in &self.config.aggregations {
            let prefix = waiting_prefix(&agg.id);
            let entries = match self.collector.list(&prefix).await {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(aggregation = %agg.id, index = %prefix, error = %e, "cannot list the waiting index");
                    report.errors += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            for entry in entries {
                if shutdown.is_some_and(Shutdown::is_triggered) {
                    return Ok(report);
                }
                let Some(window) = entry
                    .key
                    .strip_prefix(&prefix)
                    .and_then(|name| Window::parse(name).ok())
                else {
                    tracing::warn!(aggregation = %agg.id, key = %entry.key, "skipping a waiting-index entry that names no window");
                    report.errors += 1;
                    continue;
                };
                match self.sweep_one(agg, window, now).await {
                    Ok(Swept::Joined) => report.joined += 1,
                    Ok(Swept::Failed) => report.failed += 1,
                    Ok(Swept::Refused) => report.refused += 1,
                    Ok(Swept::Waiting) => report.waiting += 1,
                    Ok(Swept::Cleared) => report.cleared += 1,
                    Err(e) => {
                        tracing::warn!(aggregation = %agg.id, window = %window.name(), error = %e, "sweep: cannot handle the waiting window; trying again in the next sweep");
                        report.errors += 1;
                    }
                }
            }
        }
        match first_error {
            Some(e) => {
                tracing::warn!(?report, "sweep incomplete");
                Err(e)
            }
            None => Ok(report),
        }
    }

    async fn sweep_one(
        &self,
        agg: &Aggregation,
        window: Window,
        now: i64,
    ) -> Result<Swept, TaskError> {
        let name = window.name();
        let record = self
            .read_record(&agg.id, window)
            .await
            .map_err(TaskError::from)?;
        let Some(record) = record.filter(|c| !c.state.is_terminal()) else {
            self.collector
                .delete(&waiting_key(&agg.id, window))
                .await
                .map_err(TaskError::from)?;
            return Ok(Swept::Cleared);
        };
        let generation = record.generation;
        if self.is_announced(&agg.id, window).await? {
            self.settle_announced(&agg.id, window, generation).await?;
            return Ok(Swept::Joined);
        }
        let since = record.since.unwrap_or(record.updated_at);
        let deadline =
            since.saturating_add(i64::try_from(agg.wait_deadline.as_secs()).unwrap_or(i64::MAX));
        let why = match self.try_join(agg, window, generation).await {
            Ok(Joined::Done(MillOutcome::Refused(_))) => return Ok(Swept::Refused),
            Ok(Joined::Done(_)) => {
                if self.is_announced(&agg.id, window).await? {
                    self.settle_announced(&agg.id, window, generation).await?;
                } else {
                    // Another generation's result was written first; its join announces it.
                    self.unindex(&agg.id, window).await;
                }
                return Ok(Swept::Joined);
            }
            Ok(Joined::Mismatch(_)) => return Ok(Swept::Refused),
            Ok(Joined::Missing(missing)) => {
                let who = self
                    .config
                    .facilitator_name(missing)
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                format!("sum part of facilitator {missing}{who} never came")
            }
            // The parts are there but cannot be joined (unreadable, wrongly signed): that will
            // not mend itself, but an operator may, so it fails only at the deadline.
            Err(TaskError::Permanent(e)) if now >= deadline => {
                format!("the sum parts could not be joined ({e})")
            }
            Err(e) => return Err(e),
        };
        if now < deadline {
            return Ok(Swept::Waiting);
        }
        // One facilitator refused and the other never answered: the refusal stands.
        let answers = [
            self.answer(&agg.id, window, generation, 0)
                .await
                .ok()
                .flatten(),
            self.answer(&agg.id, window, generation, 1)
                .await
                .ok()
                .flatten(),
        ];
        if answers
            .iter()
            .any(|a| matches!(a, Some(Answer::Refused(_))))
        {
            let reason = self.refusal_detail(
                agg,
                window,
                generation,
                [answers[0].as_ref(), answers[1].as_ref()],
            );
            self.refuse(agg, window, generation, Some(since), reason)
                .await?;
            return Ok(Swept::Refused);
        }
        let detail = format!(
            "{}/{name} generation {generation}: {why}: waited since {}, the aggregation's \
             wait_deadline is {}",
            agg.id,
            Window::rfc3339(since),
            humantime::format_duration(agg.wait_deadline)
        );
        self.record(
            &agg.id,
            window,
            generation,
            ComputationState::Failed,
            Some(since),
            Some(detail.clone()),
        )
        .await?;
        // A join that finished while we decided: its SUCCEEDED wins over our FAILED.
        if self.is_announced(&agg.id, window).await? {
            self.settle_announced(&agg.id, window, generation).await?;
            return Ok(Swept::Joined);
        }
        metrics::counter!("millrace_windows_failed_total", "aggregation" => agg.id.clone())
            .increment(1);
        tracing::warn!(aggregation = %agg.id, window = %name, generation, %detail, "window failed: the wait deadline passed");
        self.unindex(&agg.id, window).await;
        Ok(Swept::Failed)
    }

    /// Runs [`Mill::expire_waiting`] every `interval` until `shutdown`. A pass under way when
    /// shutdown starts stops before its next window.
    pub async fn run_sweeps(&self, interval: Duration, shutdown: Shutdown) {
        loop {
            if shutdown.is_triggered() {
                break;
            }
            match self.sweep(now(), Some(&shutdown)).await {
                Ok(report) if report.is_empty() => {}
                Ok(report)
                    if report.failed + report.joined + report.refused + report.errors > 0 =>
                {
                    tracing::info!(?report, "sweep of waiting windows");
                }
                Ok(report) => tracing::debug!(?report, "sweep of waiting windows"),
                Err(e) => tracing::warn!(error = %e, "sweep of waiting windows incomplete"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => break,
            }
        }
        tracing::info!("mill sweeps stopped");
    }
}

fn hex_digest(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl Handler for Mill {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        let msg = SumPartReady::from_json(&task.body)
            .map_err(|e| TaskError::Permanent(format!("message {}: {e}", task.message_id)))?;
        propagation::record_subject(&msg.aggregation, Some(&msg.window), None);
        self.join(&msg).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use millrace_bus::memory::MemoryBus;
    use millrace_protocol::crypto::Signer25519;
    use millrace_protocol::tasks::SUM_PART_READY_VERSION;

    use super::*;

    const T0: i64 = 1_795_000_000;

    struct Fixture {
        mill: Mill,
        collector: Store,
        config: Arc<Config>,
        signers: [Signer25519; 2],
        window: Window,
    }

    fn fixture() -> Fixture {
        let signers = [
            Signer25519::generate("alpha"),
            Signer25519::generate("beta"),
        ];
        let text = format!(
            r#"
version = 1

[[facilitator]]
index = 0
name = "alpha"
signing_public_key = "{}"
hpke_public_key = "00"

[[facilitator]]
index = 1
name = "beta"
signing_public_key = "{}"
hpke_public_key = "00"

[[aggregation]]
id = "clicks"
vdaf = {{ type = "count" }}
window = "1h"
grace = "5m"
max_age = "1day"
min_reports = 0
wait_deadline = "1h"
verify_key = "env:MILLRACE_UNUSED"
verify_key_id = "0011223344556677"
ingestors = []
"#,
            signers[0].public_hex(),
            signers[1].public_hex()
        );
        let config = Arc::new(Config::parse(&text, Path::new("m.toml"), Path::new(".")).unwrap());
        let collector = Store::memory();
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let mill = Mill::new(config.clone(), collector.clone(), bus, "t").unwrap();
        Fixture {
            mill,
            collector,
            config,
            signers,
            window: Window::containing(T0, 3600),
        }
    }

    impl Fixture {
        fn digest(&self) -> AggregationDigest {
            self.config
                .aggregation_digest(self.config.aggregation("clicks").unwrap())
                .unwrap()
        }

        async fn put_part(&self, facilitator: u8, generation: u32, manifest_byte: u8) {
            self.put_part_with(facilitator, generation, manifest_byte, self.digest())
                .await
        }

        async fn put_part_with(
            &self,
            facilitator: u8,
            generation: u32,
            manifest_byte: u8,
            digest: AggregationDigest,
        ) {
            let agg = self.config.aggregation("clicks").unwrap();
            let share = agg
                .vdaf
                .encode_accumulator(&agg.vdaf.accumulator())
                .unwrap();
            let part = SumPart {
                aggregation: "clicks".into(),
                window_start: self.window.start,
                window_end: self.window.end,
                generation,
                manifest_digest: [manifest_byte; 32],
                aggregation_digest: Some(digest.0),
                facilitator,
                report_count: 0,
                invalid_count: 0,
                invalid_reasons: Default::default(),
                report_digest: [0; 32],
                batches: vec!["b1".into()],
                aggregate_share: share,
            };
            let bytes = part
                .encode(&self.signers[usize::from(facilitator)])
                .unwrap();
            self.collector
                .create(
                    &sum_part_key("clicks", self.window, generation, facilitator),
                    bytes,
                )
                .await
                .unwrap();
        }

        async fn put_refusal(&self, facilitator: u8, generation: u32) {
            let refusal = ShareRefusal {
                aggregation: "clicks".into(),
                window_start: self.window.start,
                window_end: self.window.end,
                generation,
                manifest_digest: [7; 32],
                aggregation_digest: self.digest().0,
                facilitator,
                report_count: 3,
                invalid_count: 0,
                invalid_reasons: Default::default(),
                min_reports: 10,
                reason: format!("facilitator {facilitator} withholds: 3 valid reports"),
            };
            let bytes = refusal
                .encode(&self.signers[usize::from(facilitator)])
                .unwrap();
            self.collector
                .create(
                    &share_refusal_key("clicks", self.window, generation, facilitator),
                    bytes,
                )
                .await
                .unwrap();
        }

        fn msg(&self, facilitator: u8, generation: u32) -> SumPartReady {
            SumPartReady {
                version: SUM_PART_READY_VERSION,
                aggregation: "clicks".into(),
                aggregation_digest: self.digest().to_string(),
                window: self.window.name(),
                generation,
                facilitator,
            }
        }

        async fn record(&self) -> Computation {
            Computation::from_json(
                &self
                    .collector
                    .get_required(&computation_key("clicks", self.window))
                    .await
                    .unwrap(),
            )
            .unwrap()
        }

        async fn indexed(&self) -> bool {
            self.collector
                .exists(&waiting_key("clicks", self.window))
                .await
                .unwrap()
        }
    }

    #[tokio::test]
    async fn the_first_part_waits_without_failing_and_the_second_joins() {
        let f = fixture();
        f.put_part(0, 0, 7).await;
        assert_eq!(
            f.mill.join(&f.msg(0, 0)).await.unwrap(),
            MillOutcome::Waiting { missing: 1 }
        );
        let waiting = f.record().await;
        assert_eq!(waiting.state, ComputationState::WaitingForParts);
        assert_eq!(waiting.generation, 0);
        let since = waiting.since.unwrap();
        assert!(f.indexed().await);
        // A redelivery keeps `since`.
        assert_eq!(
            f.mill.join(&f.msg(0, 0)).await.unwrap(),
            MillOutcome::Waiting { missing: 1 }
        );
        assert_eq!(f.record().await.since, Some(since));

        f.put_part(1, 0, 7).await;
        let MillOutcome::Succeeded(result) = f.mill.join(&f.msg(1, 0)).await.unwrap() else {
            panic!("not joined");
        };
        assert_eq!(result.generation, 0);
        let done = f.record().await;
        assert_eq!(
            (done.state, done.generation),
            (ComputationState::Succeeded, 0)
        );
        assert!(!f.indexed().await);
        assert_eq!(
            f.mill.join(&f.msg(0, 0)).await.unwrap(),
            MillOutcome::AlreadyDone
        );
    }

    #[tokio::test]
    async fn a_facilitators_refusal_ends_the_window_refused_and_nothing_is_unsharded() {
        // One refusal and one part: REFUSED with both answers; no result.
        let f = fixture();
        f.put_part(0, 0, 7).await;
        f.put_refusal(1, 0).await;
        let MillOutcome::Refused(reason) = f.mill.join(&f.msg(1, 0)).await.unwrap() else {
            panic!("not refused");
        };
        assert!(
            reason.contains("facilitator 1 withholds")
                && reason.contains("alpha (facilitator 0) released its share"),
            "{reason}"
        );
        let record = f.record().await;
        assert_eq!(record.state, ComputationState::Refused);
        assert!(!f
            .collector
            .exists(&result_key("clicks", f.window))
            .await
            .unwrap());
        assert!(matches!(
            f.mill.join(&f.msg(0, 0)).await.unwrap(),
            MillOutcome::Stale(_)
        ));

        // A refusal whose peer never answers: waiting, then REFUSED at the deadline.
        let f = fixture();
        f.put_refusal(0, 0).await;
        assert_eq!(
            f.mill.join(&f.msg(0, 0)).await.unwrap(),
            MillOutcome::Waiting { missing: 1 }
        );
        let deadline = f.record().await.since.unwrap() + 3600;
        assert_eq!(
            f.mill.expire_waiting(deadline - 1).await.unwrap().waiting,
            1
        );
        let report = f.mill.expire_waiting(deadline).await.unwrap();
        assert_eq!(report.refused, 1, "{report:?}");
        let record = f.record().await;
        assert_eq!(record.state, ComputationState::Refused);
        let detail = record.detail.unwrap();
        assert!(
            detail.contains("facilitator 0 withholds")
                && detail.contains("beta (facilitator 1) never answered"),
            "{detail}"
        );
        assert!(!f.indexed().await);
    }

    #[tokio::test]
    async fn an_announcement_or_part_of_another_aggregation_digest_is_refused_naming_both() {
        let f = fixture();
        let other = AggregationDigest([9; 32]);
        let mut msg = f.msg(0, 0);
        msg.aggregation_digest = other.to_string();
        let Err(TaskError::Permanent(reason)) = f.mill.join(&msg).await else {
            panic!("accepted an announcement of another aggregation");
        };
        assert!(
            reason.contains(&other.to_string()) && reason.contains(&f.digest().to_string()),
            "{reason}"
        );
        // Two parts whose digests differ: FAILED, naming both.
        f.put_part(0, 0, 7).await;
        f.put_part_with(1, 0, 7, other).await;
        let Err(TaskError::Permanent(reason)) = f.mill.join(&f.msg(1, 0)).await else {
            panic!("joined parts of different aggregations");
        };
        assert!(
            reason.contains("different aggregations")
                && reason.contains(&other.to_string())
                && reason.contains(&f.digest().to_string()),
            "{reason}"
        );
        assert_eq!(f.record().await.state, ComputationState::Failed);
    }

    #[tokio::test]
    async fn parts_of_different_manifests_are_refused() {
        let f = fixture();
        f.put_part(0, 0, 1).await;
        f.put_part(1, 0, 2).await;
        let Err(TaskError::Permanent(reason)) = f.mill.join(&f.msg(1, 0)).await else {
            panic!("joined parts of different manifests");
        };
        assert!(
            reason.contains("the parts aggregate different window manifests"),
            "{reason}"
        );
        assert_eq!(f.record().await.state, ComputationState::Failed);
        // The other part's message is stale now.
        assert!(matches!(
            f.mill.join(&f.msg(0, 0)).await.unwrap(),
            MillOutcome::Stale(_)
        ));
    }

    #[tokio::test]
    async fn the_sweep_joins_a_window_whose_message_was_lost() {
        let f = fixture();
        f.put_part(1, 0, 7).await;
        f.mill.join(&f.msg(1, 0)).await.unwrap();
        // Facilitator 0's part arrives, but its message never does.
        f.put_part(0, 0, 7).await;
        let report = f.mill.expire_waiting(now()).await.unwrap();
        assert_eq!(
            report,
            SweepReport {
                joined: 1,
                ..Default::default()
            }
        );
        assert_eq!(f.record().await.state, ComputationState::Succeeded);
        assert!(!f.indexed().await);
        assert!(f
            .collector
            .exists(&result_key("clicks", f.window))
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn the_sweep_fails_a_window_past_its_wait_deadline_and_names_the_missing_part() {
        let f = fixture();
        f.put_part(0, 0, 7).await;
        f.mill.join(&f.msg(0, 0)).await.unwrap();
        // Garbage in the index does not stop the sweep.
        f.collector
            .overwrite("waiting/clicks/not-a-window", b"0\n".to_vec())
            .await
            .unwrap();
        let since = f.record().await.since.unwrap();
        let report = f.mill.expire_waiting(since + 60).await.unwrap();
        assert_eq!((report.waiting, report.errors), (1, 1), "{report:?}");
        assert_eq!(f.record().await.state, ComputationState::WaitingForParts);

        let report = f.mill.expire_waiting(since + 3600).await.unwrap();
        assert_eq!((report.failed, report.errors), (1, 1), "{report:?}");
        let failed = f.record().await;
        assert_eq!(failed.state, ComputationState::Failed);
        let detail = failed.detail.unwrap();
        assert!(
            detail.contains("sum part of facilitator 1 (beta) never came"),
            "{detail}"
        );
        assert!(detail.contains("wait_deadline is 1h"), "{detail}");
        assert!(detail.contains(&Window::rfc3339(since)), "{detail}");
        assert!(!f.indexed().await);

        // The late part is acknowledged as stale, and a new generation starts afresh.
        f.put_part(1, 0, 7).await;
        assert!(matches!(
            f.mill.join(&f.msg(1, 0)).await.unwrap(),
            MillOutcome::Stale(_)
        ));
        f.put_part(0, 1, 8).await;
        assert_eq!(
            f.mill.join(&f.msg(0, 1)).await.unwrap(),
            MillOutcome::Waiting { missing: 1 }
        );
        let waiting = f.record().await;
        assert_eq!(
            (waiting.state, waiting.generation),
            (ComputationState::WaitingForParts, 1)
        );
    }

    #[tokio::test]
    async fn the_sweep_clears_entries_of_finished_windows_and_stops_on_shutdown() {
        let f = fixture();
        f.collector
            .overwrite(&waiting_key("clicks", f.window), b"0\n".to_vec())
            .await
            .unwrap();
        let report = f.mill.expire_waiting(now()).await.unwrap();
        assert_eq!(report.cleared, 1, "{report:?}");
        assert!(!f.indexed().await);

        let shutdown = Shutdown::new();
        shutdown.trigger();
        tokio::time::timeout(
            Duration::from_secs(5),
            f.mill.run_sweeps(Duration::from_secs(3600), shutdown),
        )
        .await
        .unwrap();
    }
}
