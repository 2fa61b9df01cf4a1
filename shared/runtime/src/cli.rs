//! Flags every service binary shares. Each flag also reads a `MILLRACE_…` environment variable,
//! and its doc comment is its `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::worker::WorkerConfig;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 30s, 5m, 1h)"))
}

/// The bus and the operational endpoints.
#[derive(clap::Args, Debug, Clone)]
pub struct BusArgs {
    /// Message bus URL: amqp://…, nats://…, kafka://…, sns-sqs://…, pubsub://PROJECT.
    /// (memory:// only works inside one process, i.e. `millrace demo`.)
    #[arg(long, env = "MILLRACE_BUS")]
    pub bus: String,
    /// Prefix of every topic name ({prefix}.{facilitator}.intake, {prefix}.collect, ...).
    #[arg(long, env = "MILLRACE_TOPIC_PREFIX", default_value = "millrace")]
    pub topic_prefix: String,
    /// Create missing topics, queues and subscriptions at start-up (emulators, development).
    #[arg(long, env = "MILLRACE_CREATE_TOPICS")]
    pub create_topics: bool,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "MILLRACE_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// /healthz fails (503) once the service's loop (the worker loop, or the workflow-manager's
    /// pass loop) has not made progress for this long. The worker loop beats every second, idle
    /// or not; a workflow-manager beats between passes, so keep this above its longest pass.
    #[arg(long, env = "MILLRACE_HEARTBEAT_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub heartbeat_timeout: Duration,
}

/// Who a facilitator's service is: its config, its index and its store.
#[derive(clap::Args, Debug, Clone)]
pub struct FacilitatorArgs {
    /// The aggregations file (TOML).
    #[arg(long, env = "MILLRACE_CONFIG")]
    pub config: PathBuf,
    /// Which facilitator this is: 0 or 1.
    #[arg(long, env = "MILLRACE_FACILITATOR", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub facilitator: u8,
    /// This facilitator's object store (file:///…, s3://…, gs://…).
    #[arg(long, env = "MILLRACE_STORE")]
    pub store: String,
}

/// Settings of the worker loop of a consuming service.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Tasks handled at once (and the prefetch asked of the broker).
    #[arg(long, env = "MILLRACE_CONCURRENCY", default_value_t = 5)]
    pub concurrency: usize,
    /// Lease on a task; extended while the task runs.
    #[arg(long, env = "MILLRACE_LEASE", default_value = "60s", value_parser = duration)]
    pub lease: Duration,
    /// Deliveries of one task before it goes to {topic}.dead.
    #[arg(long, env = "MILLRACE_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter) up to --backoff-max.
    #[arg(long, env = "MILLRACE_BACKOFF_BASE", default_value = "1s", value_parser = duration)]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[arg(long, env = "MILLRACE_BACKOFF_MAX", default_value = "5m", value_parser = duration)]
    pub backoff_max: Duration,
    /// On SIGTERM, how long in-flight tasks may finish before they are handed back.
    #[arg(long, env = "MILLRACE_DRAIN_GRACE", default_value = "25s", value_parser = duration)]
    pub drain_grace: Duration,
    /// The longest task body handled (bytes, or with a unit: 64KiB, 1MiB); a longer one goes to
    /// {topic}.rejected unread. The bus's own message cap lowers it further.
    #[arg(long, env = "MILLRACE_MAX_TASK_BODY", default_value = "256KiB", value_parser = parse_bytes)]
    pub max_task_body: usize,
    /// /healthz fails (503) while one task has been running longer than this (it is presumed
    /// stuck; its lease is extended for as long as it runs). Keep it above the longest task.
    #[arg(long, env = "MILLRACE_STUCK_TASK_AFTER", default_value = "30m", value_parser = duration)]
    pub stuck_task_after: Duration,
}

impl WorkerArgs {
    pub fn worker_config(&self, topic: String, group: String) -> WorkerConfig {
        let mut c = WorkerConfig::new(topic, group);
        c.concurrency = self.concurrency.max(1);
        c.lease = self.lease;
        c.max_attempts = self.max_attempts.max(1);
        c.backoff_base = self.backoff_base;
        c.backoff_max = self.backoff_max;
        c.drain_grace = self.drain_grace;
        c.max_body = self.max_task_body;
        c.stuck_task_after = self.stuck_task_after;
        c
    }
}

/// Parses a size: a number of bytes, or a number with `B`, `KiB`, `MiB` or `GiB`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes (examples: 65536, 64KiB, 1MiB)"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Parses a duration flag (for services' own flags).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert!(parse_bytes("1MB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots")
            .unwrap_err()
            .contains("expected a number"));
    }
}
