//! The shutdown signal every long-running task holds.
//!
//! Why one type: a service is a handful of loops (the worker loop, the metrics server, a scheduler)
//! that must all stop together when Kubernetes sends SIGTERM — stop taking new work, finish what is
//! in flight within the grace period, hand back the rest, flush publishers, exit 0. Passing one
//! cloneable `Shutdown` into every `run` (as mini-redis does) gives each loop the same two
//! questions to ask — "has it started?" ([`Shutdown::is_triggered`]) and "wake me when it does"
//! ([`Shutdown::wait`], for `select!`) — and lets tests and the all-in-one demo stop a service
//! without signals, by calling [`Shutdown::trigger`]. It wraps a `CancellationToken` because that
//! is already cloneable, idempotent and wakes every waiter, including ones that start late.

use tokio_util::sync::CancellationToken;

/// A cloneable "stop now" signal; triggering any clone triggers them all.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A signal that only [`Shutdown::trigger`] fires.
    pub fn new() -> Self {
        Self::default()
    }

    /// A signal fired by SIGTERM or Ctrl-C (SIGINT), whichever comes first. Must be called inside
    /// a tokio runtime. If a handler cannot be installed, that is logged and the other still works.
    pub fn from_signals() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let name = wait_for_signal().await;
            tracing::info!(signal = name, "shutdown requested");
            trigger.trigger();
        });
        shutdown
    }

    /// Starts the shutdown. Idempotent.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once shutdown has started (at once if it already has). Cancel safe.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// The underlying token (a clone of it), for code that takes a `CancellationToken`.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT",
            Err(error) => {
                tracing::warn!(%error, "cannot listen for Ctrl-C");
                std::future::pending().await
            }
        }
    };
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
                "SIGTERM"
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending().await
            }
        }
    };
    tokio::select! {
        name = ctrl_c => name,
        name = term => name,
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    match tokio::signal::ctrl_c().await {
        Ok(()) => "Ctrl-C",
        Err(error) => {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_reaches_every_clone_and_late_waiters() {
        let shutdown = Shutdown::new();
        let clone = shutdown.clone();
        assert!(!clone.is_triggered());
        let waiter = tokio::spawn({
            let clone = clone.clone();
            async move { clone.wait().await }
        });
        shutdown.trigger();
        waiter.await.unwrap();
        assert!(clone.is_triggered());
        clone.wait().await;
    }
}
