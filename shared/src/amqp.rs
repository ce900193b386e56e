//! Connecting to RabbitMQ and publishing with confirms.
//!
//! Every publish Baton makes is persistent, `mandatory` and confirmed: a message
//! the broker cannot route comes back as [`PublishError::Unroutable`] instead of
//! being dropped and still confirmed.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, DefaultConnectionBuilder};
use uuid::Uuid;

use crate::config::AmqpConfig;
use crate::secret::{Secret, redact_url};
use crate::topology::{DEAD_EXCHANGE, ORIGIN_HEADER, REASON_HEADER};

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to rabbitmq at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("rabbitmq {op} failed: {source}")]
    Op {
        op: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot use CA file {path} for amqps: {problem}")]
    Tls { path: String, problem: String },
    #[error(
        "message to exchange {exchange:?} with routing key {routing_key:?} is unroutable: no queue is bound for it"
    )]
    Unroutable { exchange: String, routing_key: String },
    #[error("broker refused (nacked) message to exchange {exchange:?} with routing key {routing_key:?}")]
    Nacked { exchange: String, routing_key: String },
}

impl AmqpError {
    pub fn op(op: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Op { op, source }
    }
}

/// Properties of one outgoing message.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub message_id: Option<Uuid>,
    pub headers: Vec<(String, String)>,
    /// Publish without `mandatory` (for best-effort messages such as cancels).
    pub best_effort: bool,
}

/// One connection with a confirming publish channel.
#[derive(Clone)]
pub struct Broker {
    conn: Arc<Connection>,
    publish: Channel,
}

impl Broker {
    /// Connects with lapin's auto-recovery on and opens a confirming channel.
    pub async fn connect(url: &Secret<String>, name: &str) -> Result<Self, AmqpError> {
        Self::open(url, None, AmqpConfig::default().reconnect_attempts, name).await
    }

    /// Connects as configured: for `amqps://`, `amqp.ca_file` adds the CA that
    /// signed the broker's certificate (the system roots are used otherwise).
    pub async fn connect_config(cfg: &AmqpConfig, name: &str) -> Result<Self, AmqpError> {
        let ca = match &cfg.ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| AmqpError::Tls {
                path: path.clone(),
                problem: e.to_string(),
            })?),
            None => None,
        };
        Self::open(&cfg.url, ca, cfg.reconnect_attempts, name).await
    }

    async fn open(
        url: &Secret<String>,
        ca_pem: Option<String>,
        attempts: usize,
        name: &str,
    ) -> Result<Self, AmqpError> {
        // lapin retries TCP (re)connects itself; bound it so a broker that stays
        // away (or refuses our TLS) surfaces as an error instead of a hang.
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(name.to_owned()))
            .configure_backoff(move |b| {
                b.with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(3))
                    .with_max_times(attempts)
            })
            .enable_auto_recover();
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: ca_pem,
        };
        let conn = DefaultConnectionBuilder::new()
            .map_err(|source| AmqpError::Connect {
                url: redact_url(url.expose()),
                source,
            })?
            .with_uri_str(url.expose().clone())
            .with_properties(props)
            .with_tls_config(tls)
            .connect()
            .await
            .map_err(|source| AmqpError::Connect {
                url: redact_url(url.expose()),
                source,
            })?;
        let publish = conn.create_channel().await.map_err(AmqpError::op("channel.open"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::op("confirm.select"))?;
        Ok(Self {
            conn: Arc::new(conn),
            publish,
        })
    }

    /// Connects, retrying with backoff for up to `patience`.
    pub async fn connect_retrying(cfg: &AmqpConfig, name: &str, patience: Duration) -> Result<Self, AmqpError> {
        let start = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match Self::connect_config(cfg, name).await {
                Ok(b) => return Ok(b),
                Err(e @ AmqpError::Tls { .. }) => return Err(e),
                Err(e) if start.elapsed() < patience => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "rabbitmq not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// The broker has blocked this connection's publishers (a memory or disk alarm).
    pub fn is_blocked(&self) -> bool {
        self.conn.status().blocked()
    }

    /// A fresh channel on this connection.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        self.conn.create_channel().await.map_err(AmqpError::op("channel.open"))
    }

    /// The confirming publish channel (for topology declarations).
    pub fn publish_channel(&self) -> &Channel {
        &self.publish
    }

    /// Publishes a persistent JSON message and waits for the broker's confirm.
    ///
    /// A connection error waits for lapin's recovery and publishes again, so a
    /// caller may see the message delivered twice but never lost silently.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        out: &Outgoing,
    ) -> Result<(), AmqpError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.publish_once(exchange, routing_key, body, out).await {
                Err(AmqpError::Op { source, op }) if tries < 5 => {
                    tracing::warn!(error = %source, op, exchange, routing_key, "publish failed; waiting for broker recovery");
                    if let Err(e) = self.publish.wait_for_recovery(source).await {
                        return Err(AmqpError::Op { op, source: e });
                    }
                }
                other => return other,
            }
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        out: &Outgoing,
    ) -> Result<(), AmqpError> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"));
        if let Some(id) = out.message_id {
            props = props.with_message_id(ShortString::from(id.to_string()));
        }
        if !out.headers.is_empty() {
            let mut table = FieldTable::default();
            for (k, v) in &out.headers {
                table.insert(
                    ShortString::from(k.clone()),
                    AMQPValue::LongString(LongString::from(v.clone())),
                );
            }
            props = props.with_headers(table);
        }
        let opts = BasicPublishOptions {
            mandatory: !out.best_effort,
            ..Default::default()
        };
        let confirm = self
            .publish
            .basic_publish(exchange.into(), routing_key.into(), opts, body, props)
            .await
            .map_err(AmqpError::op("basic.publish"))?
            .await
            .map_err(AmqpError::op("publisher confirm"))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::Nack(_) => Err(AmqpError::Nacked {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
        }
    }

    /// Moves a refused delivery to the dead-letter exchange with a reason, then acks it.
    ///
    /// The copy is confirmed before the original is acked, so a crash in between
    /// leaves a duplicate dead letter, never a lost one.
    pub async fn dead_letter(&self, delivery: &Delivery, origin: &str, reason: &str) -> Result<(), AmqpError> {
        let mut props = delivery.properties.clone();
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(REASON_HEADER),
            AMQPValue::LongString(LongString::from(reason.to_owned())),
        );
        headers.insert(
            ShortString::from(ORIGIN_HEADER),
            AMQPValue::LongString(LongString::from(origin.to_owned())),
        );
        props = props.with_headers(headers).with_delivery_mode(2);
        let opts = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = self
            .publish
            .basic_publish(
                DEAD_EXCHANGE.into(),
                delivery.routing_key.clone(),
                opts,
                &delivery.data,
                props,
            )
            .await
            .map_err(AmqpError::op("basic.publish"))?
            .await
            .map_err(AmqpError::op("publisher confirm"))?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            return Err(AmqpError::Unroutable {
                exchange: DEAD_EXCHANGE.to_owned(),
                routing_key: delivery.routing_key.to_string(),
            });
        }
        tracing::warn!(origin, reason, "message dead-lettered");
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(AmqpError::op("basic.ack"))
            .map(drop)
    }

    pub async fn close(&self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// Reads a string header from a delivery.
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    let table = delivery.properties.headers().as_ref()?;
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}
