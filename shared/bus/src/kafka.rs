//! Placeholder: the kafka backend is being written.

use async_trait::async_trait;

use crate::{Bus, BusError, Capabilities, Message, SubscribeOptions, Subscription};

pub struct KafkaBus;

fn unsupported(operation: &'static str) -> BusError {
    BusError::NotSupported {
        backend: "kafka",
        operation,
    }
}

impl KafkaBus {
    pub async fn connect(_url: &str) -> Result<Self, BusError> {
        Err(unsupported("connect"))
    }
}

#[async_trait]
impl Bus for KafkaBus {
    fn name(&self) -> &'static str {
        "kafka"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_delay: false,
            lease_extension: false,
            native_attempt_count: false,
            durable: true,
            multi_process: true,
        }
    }
    async fn create_topic(&self, _topic: &str, _group: Option<&str>) -> Result<(), BusError> {
        Err(unsupported("create_topic"))
    }
    async fn publish(&self, _topic: &str, _message: Message) -> Result<String, BusError> {
        Err(unsupported("publish"))
    }
    async fn subscribe(
        &self,
        _topic: &str,
        _options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        Err(unsupported("subscribe"))
    }
    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }
}
