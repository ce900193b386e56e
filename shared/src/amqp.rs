//! Connecting to RabbitMQ and publishing with confirms.
//!
//! Every publish Baton makes is persistent, `mandatory` and confirmed: a message
//! the broker cannot route comes back as [`AmqpError::Unroutable`] instead of
//! being dropped and still confirmed.
//!
//! A [`Broker`] keeps its connection itself instead of relying on lapin's
//! auto-recovery (which, after a broker restart under load, sometimes never
//! completed): a keeper task watches the connection, and when it is gone opens a
//! new one with backoff. Publishers wait (boundedly) for the new connection and
//! publish again; a [`Subscription`] opens its channel and consumer again on it,
//! re-running its queue declaration. Deliveries of the old connection go back to
//! their queue with the broker, so consumers must (and do) tolerate redelivery.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, DefaultConnectionBuilder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::AmqpConfig;
use crate::secret::{Secret, redact_url};

/// What a passive declare tells of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub messages: u32,
    pub consumers: u32,
}

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
    #[error("not connected to rabbitmq ({0})")]
    Disconnected(&'static str),
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

/// How long a publisher waits for a connection before giving up on one message.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(15);
/// How often the keeper looks at the connection. It polls because lapin 4 raises
/// an event when a connection fails but not when the broker closes it cleanly
/// (as `rabbitmqctl stop_app` does).
const KEEPER_TICK: Duration = Duration::from_millis(100);
/// How long an ack or nack may take. A broker restart in the middle of one was
/// seen to leave lapin's call unanswered for ever, which stalled everything
/// queued behind it (all later results of that run). After this the delivery is
/// left unsettled: the broker redelivers it on the new connection, and receivers
/// absorb the copy (the scheduler's inbox, a daemon's duplicate check).
const SETTLE_PATIENCE: Duration = Duration::from_secs(5);

/// Why lapin declined to settle a delivery: its channel closed (the broker
/// has given the message back already), or it was settled before.
const UNSETTLED: &str = "the delivery's channel is closed, or the delivery was settled already";

/// Acknowledges a delivery, bounded by [`SETTLE_PATIENCE`].
pub async fn ack(delivery: &Delivery) -> Result<(), AmqpError> {
    match tokio::time::timeout(SETTLE_PATIENCE, delivery.ack(BasicAckOptions::default())).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(AmqpError::Disconnected(UNSETTLED)),
        Ok(Err(e)) => Err(AmqpError::op("basic.ack")(e)),
        Err(_) => Err(AmqpError::Disconnected("basic.ack got no answer in time")),
    }
}

/// Rejects a delivery (back to its queue if `requeue`), bounded by [`SETTLE_PATIENCE`].
pub async fn nack(delivery: &Delivery, requeue: bool) -> Result<(), AmqpError> {
    let opts = BasicNackOptions {
        requeue,
        ..Default::default()
    };
    match tokio::time::timeout(SETTLE_PATIENCE, delivery.nack(opts)).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(AmqpError::Disconnected(UNSETTLED)),
        Ok(Err(e)) => Err(AmqpError::op("basic.nack")(e)),
        Err(_) => Err(AmqpError::Disconnected("basic.nack got no answer in time")),
    }
}
/// Pause before publishing again on a connection that is still up.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Bound on opening one connection (TCP, TLS and the AMQP handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where and how to connect; kept for reconnects.
struct Spec {
    url: Secret<String>,
    ca_pem: Option<String>,
    name: String,
    /// Consecutive failed reconnects before giving up (0: never).
    give_up_after: usize,
}

/// One open connection and its confirming publish channel.
struct Live {
    conn: Connection,
    publish: RwLock<Channel>,
    /// Serialises reopening a publish channel the broker closed.
    repair: tokio::sync::Mutex<()>,
}

impl Live {
    fn connected(&self) -> bool {
        self.conn.status().connected()
    }

    fn publish_channel(&self) -> Channel {
        self.publish.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reopens the publish channel if the broker closed it (a channel-level
    /// error such as publishing to an exchange that does not exist).
    async fn repair(&self) {
        let _guard = self.repair.lock().await;
        if !self.connected() || self.publish_channel().status().connected() {
            return;
        }
        match confirming_channel(&self.conn).await {
            Ok(ch) => *self.publish.write().unwrap_or_else(|e| e.into_inner()) = ch,
            Err(e) => tracing::warn!(error = %e, "cannot reopen the publish channel"),
        }
    }
}

/// What the keeper publishes to everyone holding the broker.
#[derive(Clone, Default)]
struct Link {
    /// Bumped on every new connection.
    generation: u64,
    live: Option<Arc<Live>>,
    /// `close()` was called, or reconnecting gave up (with why).
    ended: Option<Arc<str>>,
}

struct Inner {
    spec: Spec,
    link: watch::Sender<Link>,
    closed: CancellationToken,
}

/// A RabbitMQ connection that reconnects itself, with a confirming publish channel.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

async fn confirming_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let ch = conn.create_channel().await.map_err(AmqpError::op("channel.open"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(AmqpError::op("confirm.select"))?;
    Ok(ch)
}

async fn open(spec: &Spec) -> Result<Live, AmqpError> {
    let connect_error = |source| AmqpError::Connect {
        url: redact_url(spec.url.expose()),
        source,
    };
    // lapin's own recovery stays off: the keeper replaces a lost connection.
    let props = ConnectionProperties::default().with_connection_name(LongString::from(spec.name.clone()));
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: spec.ca_pem.clone(),
    };
    let builder = DefaultConnectionBuilder::new()
        .map_err(connect_error)?
        .with_uri_str(spec.url.expose().clone())
        .with_properties(props)
        .with_tls_config(tls);
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, builder.connect())
        .await
        .map_err(|_| {
            connect_error(lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            ))))
        })?
        .map_err(connect_error)?;
    let publish = confirming_channel(&conn).await?;
    Ok(Live {
        conn,
        publish: RwLock::new(publish),
        repair: tokio::sync::Mutex::new(()),
    })
}

impl Broker {
    /// Connects once (failing if the broker is not there) and keeps the connection from then on.
    pub async fn connect(url: &Secret<String>, name: &str) -> Result<Self, AmqpError> {
        Self::start(Spec {
            url: url.clone(),
            ca_pem: None,
            name: name.to_owned(),
            give_up_after: AmqpConfig::default().reconnect_attempts,
        })
        .await
    }

    /// Connects as configured: for `amqps://`, `amqp.ca_file` adds the CA that
    /// signed the broker's certificate (the system roots are used otherwise).
    pub async fn connect_config(cfg: &AmqpConfig, name: &str) -> Result<Self, AmqpError> {
        let ca_pem = match &cfg.ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| AmqpError::Tls {
                path: path.clone(),
                problem: e.to_string(),
            })?),
            None => None,
        };
        Self::start(Spec {
            url: cfg.url.clone(),
            ca_pem,
            name: name.to_owned(),
            give_up_after: cfg.reconnect_attempts,
        })
        .await
    }

    async fn start(spec: Spec) -> Result<Self, AmqpError> {
        let live = open(&spec).await?;
        let (link, _) = watch::channel(Link {
            generation: 1,
            live: Some(Arc::new(live)),
            ended: None,
        });
        let inner = Arc::new(Inner {
            spec,
            link,
            closed: CancellationToken::new(),
        });
        tokio::spawn(keep(Arc::downgrade(&inner), inner.closed.clone()));
        Ok(Self { inner })
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
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn current(&self) -> Option<Arc<Live>> {
        self.inner.link.borrow().live.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|l| l.connected())
    }

    /// The broker has blocked this connection's publishers (a memory or disk alarm).
    pub fn is_blocked(&self) -> bool {
        self.current().is_some_and(|l| l.conn.status().blocked())
    }

    /// Resolves when the broker is gone for good: reconnecting gave up (`amqp.reconnect_attempts`).
    pub async fn lost(&self) -> String {
        let mut rx = self.inner.link.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().ended.clone()
                && !self.inner.closed.is_cancelled()
            {
                return why.to_string();
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The current connection once it is up, with its generation; `None` if
    /// `stop` fired first or the broker is closed or lost.
    async fn live(&self, stop: &CancellationToken) -> Option<(u64, Arc<Live>)> {
        let mut rx = self.inner.link.subscribe();
        loop {
            {
                let link = rx.borrow_and_update();
                if link.ended.is_some() {
                    return None;
                }
                if let Some(live) = link.live.as_ref().filter(|l| l.connected()) {
                    return Some((link.generation, live.clone()));
                }
            }
            // The keeper publishes every change: a lost connection, a new one, the end.
            tokio::select! {
                _ = stop.cancelled() => return None,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// A fresh channel on the current connection.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let live = self
            .current()
            .filter(|l| l.connected())
            .ok_or(AmqpError::Disconnected("no open connection"))?;
        live.conn.create_channel().await.map_err(AmqpError::op("channel.open"))
    }

    /// Consumes `queue` for as long as the caller asks for deliveries, across reconnects.
    pub fn subscribe(&self, queue: &str, prefetch: u16, tag: &str) -> Subscription {
        Subscription {
            broker: self.clone(),
            queue: queue.to_owned(),
            prefetch,
            tag: tag.to_owned(),
            setup: None,
            priority: None,
            current: None,
            retired: Default::default(),
        }
    }

    /// Like [`Broker::subscribe`], running `setup` on each new channel first; it
    /// declares the queue (and may name it: exclusive queues die with their connection).
    pub fn subscribe_with(&self, prefetch: u16, tag: &str, setup: Setup) -> Subscription {
        Subscription {
            setup: Some(setup),
            ..self.subscribe("", prefetch, tag)
        }
    }

    /// Publishes a persistent JSON message and waits for the broker's confirm.
    ///
    /// A lost connection makes it wait for the next one (up to 15 s) and publish
    /// again, so a receiver may see the message twice but it is never lost silently.
    pub async fn publish(
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
        self.publish_props(exchange, routing_key, body, props, !out.best_effort)
            .await
    }

    async fn publish_props(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), AmqpError> {
        let deadline = tokio::time::Instant::now() + PUBLISH_PATIENCE;
        let never = CancellationToken::new();
        let mut last = AmqpError::Disconnected("no connection came up in time");
        loop {
            let Ok(Some((_, live))) = tokio::time::timeout_at(deadline, self.live(&never)).await else {
                return Err(last);
            };
            let opts = BasicPublishOptions {
                mandatory,
                ..Default::default()
            };
            let confirm = async {
                live.publish_channel()
                    .basic_publish(exchange.into(), routing_key.into(), opts, body, props.clone())
                    .await
                    .map_err(AmqpError::op("basic.publish"))?
                    .await
                    .map_err(AmqpError::op("publisher confirm"))
            };
            match confirm.await {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => return Ok(()),
                Ok(Confirmation::Ack(Some(_))) => {
                    return Err(AmqpError::Unroutable {
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                    });
                }
                Ok(Confirmation::Nack(_)) => {
                    return Err(AmqpError::Nacked {
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, exchange, routing_key, "publish failed; publishing again once connected");
                    last = e;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(last);
                    }
                    // A lost connection: `live` waits for the keeper's next one. A
                    // channel the broker closed is reopened, and the same connection
                    // is tried again after a short backoff, not in a tight loop.
                    if live.connected() {
                        live.repair().await;
                        tokio::time::sleep(RETRY_BACKOFF).await;
                    }
                }
            }
        }
    }

    /// Messages ready in `queue` and consumers on it, or `None` if the queue
    /// does not exist (a passive declare; it closes its channel when the queue
    /// is missing, so each look uses a channel of its own).
    pub async fn queue_state(&self, queue: &str) -> Result<Option<QueueState>, AmqpError> {
        let ch = self.channel().await?;
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch.queue_declare(queue.into(), opts, FieldTable::default()).await {
            Ok(info) => {
                let _ = ch.close(200, "looked".into()).await;
                Ok(Some(QueueState {
                    messages: info.message_count(),
                    consumers: info.consumer_count(),
                }))
            }
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404) => Ok(None),
            Err(e) => Err(AmqpError::op("queue.declare (passive)")(e)),
        }
    }

    /// Closes the connection and stops reconnecting.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        let live = self.current();
        self.inner.link.send_modify(|l| {
            l.live = None;
            l.ended = Some(Arc::from("closed"));
        });
        if let Some(live) = live {
            let _ = tokio::time::timeout(Duration::from_secs(5), live.conn.close(200, "bye".into())).await;
        }
    }
}

/// Watches the connection and replaces it when it is lost.
async fn keep(inner: Weak<Inner>, closed: CancellationToken) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(KEEPER_TICK) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let current = inner.link.borrow().live.clone();
        if current.as_ref().is_some_and(|l| l.connected()) {
            continue;
        }
        let name = inner.spec.name.as_str();
        tracing::warn!(connection = name, "rabbitmq connection lost; reconnecting");
        inner.link.send_modify(|l| l.live = None);
        drop(current);
        let mut delay = MIN_BACKOFF;
        let mut failures = 0usize;
        loop {
            let opened = tokio::select! {
                _ = closed.cancelled() => return,
                o = open(&inner.spec) => o,
            };
            match opened {
                Ok(live) => {
                    inner.link.send_modify(|l| {
                        l.generation += 1;
                        l.live = Some(Arc::new(live));
                    });
                    crate::metrics::global().inc(
                        "baton_amqp_reconnects_total",
                        "Connections to RabbitMQ re-established after one was lost",
                        &[],
                        1.0,
                    );
                    tracing::info!(
                        connection = name,
                        failed_attempts = failures,
                        "rabbitmq connection re-established"
                    );
                    break;
                }
                Err(e) => {
                    failures += 1;
                    let limit = inner.spec.give_up_after;
                    if limit > 0 && failures >= limit {
                        let why = format!("rabbitmq connection lost and {failures} reconnects failed; last: {e}");
                        tracing::error!(connection = name, error = %e, failures, "giving up on rabbitmq");
                        inner.link.send_modify(|l| l.ended = Some(Arc::from(why.as_str())));
                        return;
                    }
                    tracing::warn!(connection = name, error = %e, failures, retry_in_ms = delay.as_millis() as u64, "rabbitmq reconnect failed");
                    tokio::select! {
                        _ = closed.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Declares a subscription's queue on a new channel and returns its name.
pub type Setup = Arc<dyn Fn(Channel) -> BoxFuture<'static, lapin::Result<String>> + Send + Sync>;

/// A consumer that survives reconnects: each new connection gets a new channel,
/// `basic.qos`, the queue declaration (if any) and `basic.consume`.
///
/// With a priority ([`Subscription::with_priority`]) it consumes with that
/// consumer priority (`x-priority`): the broker hands a message to the
/// highest-priority consumer with room in its prefetch. A new priority takes
/// effect by cancelling the consumer, handing out what it had prefetched, and
/// consuming again; the old channel stays open so those deliveries can still be
/// acknowledged.
pub struct Subscription {
    broker: Broker,
    queue: String,
    prefetch: u16,
    tag: String,
    setup: Option<Setup>,
    priority: Option<watch::Receiver<i32>>,
    current: Option<Consuming>,
    /// Channels of consumers cancelled for a new priority, kept open (a few) so
    /// that deliveries handed out from them can still be acknowledged.
    retired: std::collections::VecDeque<Channel>,
}

struct Consuming {
    generation: u64,
    channel: Channel,
    consumer: lapin::Consumer,
    priority: Option<i32>,
    /// `basic.cancel` was sent for a new priority; the consumer is being drained.
    retiring: bool,
}

/// Retired channels kept open per subscription.
const RETIRED_CHANNELS: usize = 4;

impl Subscription {
    /// The queue consumed (as last declared).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Consumes with the consumer priority `priority` holds, following its changes.
    pub fn with_priority(mut self, priority: watch::Receiver<i32>) -> Self {
        self.priority = Some(priority);
        self
    }

    /// The next delivery; `None` once `stop` fires or the broker is closed or lost.
    pub async fn next(&mut self, stop: &CancellationToken) -> Option<Delivery> {
        let mut delay = MIN_BACKOFF;
        loop {
            if self.current.is_none() {
                match self.open(stop).await {
                    Ok(Some(c)) => self.current = Some(c),
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::warn!(queue = %self.queue, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot subscribe; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            let Some(cur) = self.current.as_mut() else {
                continue;
            };
            let generation = cur.generation;
            let mut links = self.broker.inner.link.subscribe();
            let replaced = async {
                loop {
                    if links.borrow_and_update().generation != generation {
                        return;
                    }
                    if links.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            };
            let reprioritised = async {
                match (self.priority.as_mut(), cur.retiring) {
                    (Some(rx), false) => loop {
                        if Some(*rx.borrow_and_update()) != cur.priority {
                            return;
                        }
                        if rx.changed().await.is_err() {
                            return std::future::pending().await;
                        }
                    },
                    _ => std::future::pending().await,
                }
            };
            // `Some(n)`: the consumer's next item; `None`: the connection was
            // replaced, or (with `reprioritised` set) the priority changed.
            let mut reprioritised_now = false;
            let next = tokio::select! {
                _ = stop.cancelled() => return None,
                n = cur.consumer.next() => Some(n),
                () = replaced => None,
                () = reprioritised => {
                    reprioritised_now = true;
                    None
                }
            };
            match next {
                Some(Some(Ok(d))) => return Some(d),
                Some(Some(Err(e))) => {
                    tracing::warn!(queue = %self.queue, error = %e, "consumer interrupted; subscribing again");
                }
                Some(None) if cur.retiring => {
                    tracing::info!(queue = %self.queue, "consumer drained; consuming again with the new priority");
                    if self.retired.len() == RETIRED_CHANNELS {
                        self.retired.pop_front();
                    }
                    self.retired.push_back(cur.channel.clone());
                }
                Some(None) => tracing::warn!(queue = %self.queue, "consumer ended; subscribing again"),
                None if reprioritised_now => {
                    // Deliveries the consumer already holds are still handed out;
                    // the stream then ends and the consumer is opened again.
                    match cur
                        .channel
                        .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                        .await
                    {
                        Ok(()) => {
                            cur.retiring = true;
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(queue = %self.queue, error = %e, "cannot cancel consumer for a new priority; subscribing again")
                        }
                    }
                }
                None => tracing::info!(queue = %self.queue, "new rabbitmq connection; subscribing again"),
            }
            self.current = None;
        }
    }

    async fn open(&mut self, stop: &CancellationToken) -> Result<Option<Consuming>, AmqpError> {
        let Some((generation, live)) = self.broker.live(stop).await else {
            return Ok(None);
        };
        self.retired.retain(|ch| ch.status().connected());
        let ch = live
            .conn
            .create_channel()
            .await
            .map_err(AmqpError::op("channel.open"))?;
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(AmqpError::op("basic.qos"))?;
        if let Some(setup) = &self.setup {
            self.queue = setup(ch.clone()).await.map_err(AmqpError::op("queue.declare"))?;
        }
        let priority = self.priority.as_mut().map(|rx| *rx.borrow_and_update());
        let mut args = FieldTable::default();
        if let Some(p) = priority {
            args.insert(ShortString::from("x-priority"), AMQPValue::LongInt(p));
        }
        let consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                self.tag.as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(AmqpError::op("basic.consume"))?;
        Ok(Some(Consuming {
            generation,
            channel: ch,
            consumer,
            priority,
            retiring: false,
        }))
    }

    /// Stops consuming; deliveries prefetched but not yet handed out go back to the queue,
    /// while those handed out can still be acknowledged.
    pub async fn cancel(&mut self) {
        if let Some(cur) = &self.current {
            let _ = cur
                .channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
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
