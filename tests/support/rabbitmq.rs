//! Test support: stopping and starting the machine's RabbitMQ for the tests that restart it
//! (`tests/broker_outage.rs`, and `shared/bus/tests/amqp_conformance.rs`, which includes this file),
//! with `rabbitmqctl stop_app/start_app` and a guard that starts it again whatever happens to
//! the test.
//!
//! `MILLRACE_TEST_AMQP_STOP` and `MILLRACE_TEST_AMQP_START` override the two commands (for a
//! broker in a container, say); the defaults need `rabbitmqctl` on the `PATH`.
#![allow(dead_code)]

/// The broker's URL: `MILLRACE_TEST_AMQP_URL`, else the machine's RabbitMQ as guest.
pub fn url() -> String {
    std::env::var("MILLRACE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Runs `command` with `sh -c`; did it succeed?
pub fn sh(command: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Stops the broker application (client connections drop; the node keeps running).
pub fn stop_broker() -> bool {
    let command = std::env::var("MILLRACE_TEST_AMQP_STOP")
        .unwrap_or_else(|_| "timeout 60 rabbitmqctl stop_app".to_string());
    sh(&command)
}

/// Starts the broker again and waits until it serves.
pub fn start_broker() -> bool {
    if let Ok(command) = std::env::var("MILLRACE_TEST_AMQP_START") {
        return sh(&command);
    }
    // `start_app` is a no-op on a running node; a stopped node needs the server started again.
    if sh("timeout 60 rabbitmqctl start_app && timeout 60 rabbitmqctl await_startup") {
        return true;
    }
    sh("rabbitmq-server -detached; sleep 2; timeout 120 rabbitmqctl await_startup")
}

/// Starts the broker again when dropped, so that a failing test does not leave it stopped.
pub struct BrokerUp;

impl Drop for BrokerUp {
    fn drop(&mut self) {
        start_broker();
    }
}
