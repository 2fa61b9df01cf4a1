//! `millrace replay`: publish one batch's intake task or one window's aggregate task again,
//! through the marker protocol, or re-aggregate a FAILED or stuck window under a new manifest
//! generation (see `millrace_workflow_manager::replay`), and print what was done.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use millrace_bus::Bus;
use millrace_protocol::config::Config;
use millrace_store::Store;
use millrace_workflow_manager::{
    Reaggregated, ReplayKind, ReplayTarget, Replayed, Settings, WorkflowManager,
};

/// Everything a replay needs besides the target.
pub struct ReplayRequest {
    pub config: Arc<Config>,
    pub facilitator: u8,
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub topic_prefix: String,
    /// Who replays, as recorded in the replay marker.
    pub by: String,
    pub reason: String,
    pub dry_run: bool,
}

/// `user@host` of whoever runs the command, for the replay record.
pub fn default_operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_string());
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{user}@{host}")
}

fn manager(request: ReplayRequest) -> anyhow::Result<(WorkflowManager, String)> {
    anyhow::ensure!(
        !request.reason.trim().is_empty(),
        "say why with --reason (it is recorded with the replay)"
    );
    let wm = WorkflowManager::new(
        request.config,
        request.store,
        request.bus,
        Settings {
            facilitator: request.facilitator,
            topic_prefix: request.topic_prefix,
            instance: request.by,
            claim_timeout: Duration::from_secs(600),
            dry_run: request.dry_run,
        },
    );
    Ok((wm, request.reason))
}

/// Replays `target`.
pub async fn replay(request: ReplayRequest, target: &ReplayTarget) -> anyhow::Result<Replayed> {
    let (wm, reason) = manager(request)?;
    wm.replay(target, &reason)
        .await
        .with_context(|| format!("replaying {target:?}"))
}

/// Re-aggregates window `window` of `aggregation` (the leader's side; `peer` is the helper's
/// store, `collector` the collector's).
pub async fn reaggregate(
    request: ReplayRequest,
    peer: Store,
    collector: &Store,
    aggregation: &str,
    window: &str,
) -> anyhow::Result<Reaggregated> {
    let (wm, reason) = manager(request)?;
    wm.with_peer_store(peer)
        .reaggregate(aggregation, window, &reason, collector)
        .await
        .with_context(|| format!("re-aggregating window {window} of {aggregation}"))
}

/// One line per fact, for the operator.
pub fn describe_reaggregated(r: &Reaggregated) -> String {
    let mut out = format!(
        "{} window {} of {} as manifest generation {}{}\n  manifest: {} (in both facilitators' stores)\n  batches:  {}\n",
        if r.dry_run { "dry run: would re-aggregate" } else { "re-aggregating" },
        r.window,
        r.aggregation,
        r.generation,
        r.previous
            .map(|g| format!(" (after generation {g})"))
            .unwrap_or_default(),
        r.manifest,
        r.batches
    );
    for (batch, why) in &r.excluded {
        out.push_str(&format!("  left out: {batch} ({why})\n"));
    }
    match &r.task {
        Some(task) => out.push_str(&format!(
            "  task:     {task}\n  the helper publishes its own task for this generation on its next pass\n"
        )),
        None if r.batches == 0 => out.push_str("  no batch to aggregate: no task published\n"),
        None => {}
    }
    out
}

/// One line per fact, for the operator.
pub fn describe(r: &Replayed) -> String {
    let what = match &r.kind {
        ReplayKind::FirstPublish => {
            "published for the first time (it had never been scheduled)".to_string()
        }
        ReplayKind::Replay { number } => format!("replayed (replay #{number} of this task)"),
        ReplayKind::DryRun => "dry run: would publish".to_string(),
    };
    let mut out = format!(
        "{what}\n  topic:   {}\n  marker:  {}\n  task:    {}\n",
        r.topic, r.marker, r.body
    );
    if let Some(id) = &r.message_id {
        out.push_str(&format!("  message: {id}\n"));
    }
    out
}
