//! The scheduler process: consumers, outbox relay, sweeper and timers.
//!
//! All of them are loops over PostgreSQL and RabbitMQ with no state of their
//! own, so any replica can die at any moment and another picks up the work.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use baton_shared::amqp::{AmqpError, Broker, Outgoing};
use baton_shared::protocol::{CancelJob, MergeEvent, Message, Refusal, StepJob, StepResult};
use baton_shared::signing::{Keypair, Trusted};
use baton_shared::topology::{self, CONTROL_EXCHANGE, JOBS_EXCHANGE, MERGE_EVENTS_QUEUE, NOTICES_QUEUE};
use futures_util::future::join_all;
use lapin::message::Delivery;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::affinity::Affinity;
use crate::config::Config;
use crate::engine::TimerKind;
use crate::pipeline::Pipeline;
use crate::planner;
use crate::store::{self, Ingested, OutboxMsg, ResultApplied, Store, StoreError};

/// Hands committed outbox rows to the publishing task.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::UnboundedSender<Vec<OutboxMsg>>,
}

impl Relay {
    pub fn send(&self, msgs: Vec<OutboxMsg>) {
        if !msgs.is_empty() {
            // The receiver lives as long as the service; if it is gone the rows stay
            // in the outbox and the next replica's sweeper publishes them.
            let _ = self.tx.send(msgs);
        }
    }
}

/// Retries a store operation while the database is unreachable.
async fn patiently<T, F, Fut>(what: &str, stop: &CancellationToken, mut f: F) -> Option<Result<T, StoreError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, what, retry_in_ms = delay.as_millis() as u64, "database unavailable; waiting");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return Some(other),
        }
    }
}

/// Runs the scheduler until `shutdown` resolves.
pub async fn run(config: Config, pipeline: Pipeline, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let instance = config.instance();
    let (key, trusted) = config.signing.load()?;
    // What this scheduler signed itself: a dead letter or refusal is attributed by it.
    let own = Arc::new(Trusted::parse(&[key.public()])?);
    let (key, trusted) = (Arc::new(key), Arc::new(trusted));
    let pool = {
        let mut delay = Duration::from_millis(200);
        let start = tokio::time::Instant::now();
        loop {
            match store::connect(config.database.url.expose(), config.database.max_connections).await {
                Ok(p) => break p,
                Err(e) if e.is_tls_refusal() => {
                    return Err(anyhow::Error::new(e).context(
                        "PostgreSQL's TLS certificate was not accepted: check sslmode, sslrootcert and the host name in database.url",
                    ));
                }
                Err(e) if start.elapsed() < Duration::from_secs(60) => {
                    tracing::warn!(error = %e, "database not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    baton_shared::failpoint::pause("scheduler-before-migrate").await;
    store::migrate(&pool).await?;
    let store = Store::new(
        pool,
        config.engine_settings()?,
        Duration::from_millis(config.scheduler.claim_ms),
        instance.clone(),
    )
    .with_sample_ratio(config.telemetry.sample_ratio)
    .with_optimistic_apply(config.scheduler.optimistic_apply)
    .with_writes(config.scheduler.write_concurrency, config.scheduler.write_batch)
    .with_queue_policy(config.scheduler.queue_policy);
    let broker = Broker::connect_retrying(&config.amqp, &format!("baton {instance}"), Duration::from_secs(60)).await?;
    if let Err(e) = topology::declare_core(&broker.channel().await?, config.amqp.delivery_limit).await {
        let hint = e.to_string().contains("inequivalent arg").then_some(
            " (a queue was declared with other arguments, e.g. by an older Baton: \
             see \"Upgrading\" in ops/README.md)",
        );
        return Err(
            anyhow::Error::new(AmqpError::op("declare topology")(e)).context(format!(
                "cannot declare the broker topology{}",
                hint.unwrap_or_default()
            )),
        );
    }
    // Heartbeats waited unread only if no other replica was consuming them.
    let renewed = if store.another_replica_alive(Duration::from_secs(3)).await? {
        0
    } else {
        store.renew_leases().await?
    };
    // Holds computed under a previous configuration are evaluated again under this one.
    let rechecked = store.recheck_timed_holds().await?;
    tracing::info!(%instance, renewed_leases = renewed, rechecked_holds = rechecked, pipeline = %pipeline.name, "scheduler starting");

    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::unbounded_channel();
    let relay = Relay { tx };
    let pipeline = Arc::new(pipeline);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(relay_loop(store.clone(), broker.clone(), relay.clone(), key, rx));
    tasks.spawn(sweep_loop(
        store.clone(),
        relay.clone(),
        Duration::from_millis(config.scheduler.claim_ms),
        stop.clone(),
    ));
    tasks.spawn(timer_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        Duration::from_millis(config.scheduler.timer_poll_ms),
        stop.clone(),
    ));
    tasks.spawn(merge_event_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        pipeline.clone(),
        config.scheduler.prefetch,
        stop.clone(),
    ));
    tasks.spawn(dead_letter_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        own.clone(),
        config.scheduler.prefetch,
        stop.clone(),
    ));
    tasks.spawn(notice_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        trusted.clone(),
        own.clone(),
        stop.clone(),
    ));
    let affinity = Arc::new(Affinity::new(uuid::Uuid::new_v4()));
    tasks.spawn(crate::affinity::membership_loop(
        store.clone(),
        affinity.clone(),
        config.database.url.expose().to_owned(),
        stop.clone(),
    ));
    tasks.spawn(result_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        trusted,
        result_deliveries(&broker, &affinity, config.scheduler.prefetch, &stop),
        config.scheduler.result_concurrency,
        stop.clone(),
    ));
    if !config.api.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.api.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on api.listen {}: {e}", config.api.listen))?;
        tracing::info!(addr = %listener.local_addr()?, "http api listening");
        let api_stop = stop.clone();
        let (api_cfg, store, broker, relay, pipeline) = (
            config.api.clone(),
            store.clone(),
            broker.clone(),
            relay.clone(),
            pipeline.clone(),
        );
        tasks.spawn(async move {
            crate::api::serve(listener, &api_cfg, store, broker, relay, pipeline, async move {
                api_stop.cancelled().await
            })
            .await
            .map_err(anyhow::Error::from)
        });
    }
    if !config.api.alertmanager_url.is_empty() {
        tasks.spawn(alert_reconcile_loop(
            store.clone(),
            relay.clone(),
            config.api.alertmanager_url.clone(),
            Duration::from_secs(config.api.alertmanager_reconcile_secs),
            stop.clone(),
        ));
    }
    if let Some(exporter) = baton_shared::telemetry::span_exporter(&config.telemetry) {
        tracing::info!(endpoint = %config.telemetry.otlp_endpoint, "exporting run traces over otlp");
        let (pool, stop) = (store.pool().clone(), stop.clone());
        tasks.spawn(async move {
            crate::traces::export_loop(pool, exporter, stop).await;
            Ok(())
        });
    }
    drop(relay);

    tokio::select! {
        _ = shutdown => tracing::info!("shutdown requested"),
        why = broker.lost() => {
            stop.cancel();
            return Err(anyhow::anyhow!("{why}"));
        }
        Some(res) = tasks.join_next() => {
            stop.cancel();
            broker.close().await;
            return match res {
                Ok(Ok(())) => Err(anyhow::anyhow!("a scheduler task ended unexpectedly")),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.into()),
            };
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    broker.close().await;
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Signs what the scheduler sends to daemons; the outbox keeps unsigned bytes so
/// that only a running scheduler (not the CLI) needs the signing key.
/// Also returns the AMQP headers: a job's `traceparent` travels as a header too,
/// as the OpenTelemetry messaging conventions expect.
fn signed_body(key: &Keypair, m: &OutboxMsg) -> (Vec<u8>, Vec<(String, String)>) {
    match m.exchange.as_str() {
        JOBS_EXCHANGE => match StepJob::parse(&m.body) {
            Ok(mut job) => {
                key.sign(&mut job);
                let headers = job
                    .traceparent
                    .iter()
                    .map(|t| ("traceparent".to_owned(), t.clone()))
                    .collect();
                (job.to_bytes(), headers)
            }
            Err(_) => (m.body.clone(), Vec::new()),
        },
        CONTROL_EXCHANGE => match CancelJob::parse(&m.body) {
            Ok(mut cancel) => {
                key.sign(&mut cancel);
                (cancel.to_bytes(), Vec::new())
            }
            Err(_) => (m.body.clone(), Vec::new()),
        },
        _ => (m.body.clone(), Vec::new()),
    }
}

async fn relay_loop(
    store: Store,
    broker: Broker,
    relay: Relay,
    key: Arc<Keypair>,
    mut rx: mpsc::UnboundedReceiver<Vec<OutboxMsg>>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        let results = join_all(batch.iter().map(|m| {
            let (body, headers) = signed_body(&key, m);
            let out = Outgoing {
                message_id: Some(m.message_id),
                headers,
                best_effort: m.best_effort,
            };
            let broker = &broker;
            async move { broker.publish(&m.exchange, &m.routing_key, &body, &out).await }
        }))
        .await;
        let mut sent = Vec::with_capacity(batch.len());
        for (m, res) in batch.iter().zip(results) {
            match res {
                Ok(()) => sent.push(m.id),
                Err(AmqpError::Unroutable { .. }) if m.best_effort => sent.push(m.id),
                Err(e @ AmqpError::Unroutable { .. }) => {
                    tracing::error!(error = %e, run_id = ?m.run_id, step_id = ?m.step_id, "job unroutable: no daemon queue for its zone and role");
                    let message = format!("{e}; is a daemon for routing key {} deployed?", m.routing_key);
                    if let Some(Ok(out)) =
                        patiently("fail unroutable job", &stop, || store.job_unroutable(m, &message)).await
                    {
                        relay.send(out);
                    }
                }
                Err(e) => {
                    // Left unsent: the sweeper publishes it again when the claim lapses.
                    tracing::warn!(error = %e, outbox_id = m.id, "publish failed; will retry");
                }
            }
        }
        if baton_shared::failpoint::is_armed() && !sent.is_empty() {
            baton_shared::failpoint::hit("scheduler-after-publish-before-mark-sent");
            let compensate: &[u8] = b"\"kind\":\"compensate\"";
            if batch
                .iter()
                .any(|m| m.exchange == JOBS_EXCHANGE && m.body.windows(compensate.len()).any(|w| w == compensate))
            {
                baton_shared::failpoint::hit("scheduler-compensation-published");
            }
        }
        if !sent.is_empty()
            && let Some(Err(e)) = patiently("mark outbox sent", &stop, || store.mark_sent(&sent)).await
        {
            tracing::error!(error = %e, "cannot mark outbox rows sent; they may be published twice");
        }
    }
    Ok(())
}

async fn sweep_loop(store: Store, relay: Relay, claim: Duration, stop: CancellationToken) -> anyhow::Result<()> {
    let period = (claim / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
        match store.claim_unsent(256).await {
            Ok(msgs) => {
                if !msgs.is_empty() {
                    tracing::info!(
                        count = msgs.len(),
                        "republishing outbox rows whose publisher did not finish"
                    );
                }
                relay.send(msgs);
            }
            Err(e) => tracing::warn!(error = %e, "outbox sweep failed"),
        }
    }
}

/// Routing key of the scheduler's publish probe on `baton.control`: no queue binds it.
const PROBE_KEY: &str = "probe";
/// How often the publish probe goes out.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Fires due timers. Leases only count time in which heartbeats could reach this
/// scheduler. A lease timer fires only once a publish probe *sent after its due
/// time* has been confirmed by the broker: proof that daemons could publish
/// heartbeats then (a broker alarm blocks every publisher, and RabbitMQ tells a
/// connection it is blocked only when it publishes). While the connection is
/// down or blocked, or the database unreachable (heartbeats wait unapplied),
/// lease timers wait; once it is back every running attempt gets one more lease
/// period, as after a scheduler restart.
async fn timer_loop(
    store: Store,
    broker: Broker,
    relay: Relay,
    poll: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut deaf = false;
    // Send time of the latest probe the broker confirmed.
    let confirmed: Arc<std::sync::Mutex<Option<chrono::DateTime<chrono::Utc>>>> = Arc::default();
    let mut probe: Option<(tokio::time::Instant, tokio::task::JoinHandle<()>)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(poll) => {}
        }
        let stalled = match &probe {
            Some((since, task)) if !task.is_finished() => since.elapsed() > Duration::from_secs(1),
            Some((since, _)) if since.elapsed() < PROBE_EVERY => false,
            _ => {
                let (b, confirmed) = (broker.clone(), confirmed.clone());
                let task = tokio::spawn(async move {
                    let out = baton_shared::amqp::Outgoing {
                        best_effort: true,
                        ..Default::default()
                    };
                    let sent = chrono::Utc::now();
                    if b.publish(CONTROL_EXCHANGE, PROBE_KEY, b"probe", &out).await.is_ok() {
                        let mut c = confirmed.lock().expect("lock");
                        *c = Some(c.map_or(sent, |t| t.max(sent)));
                    }
                });
                probe = Some((tokio::time::Instant::now(), task));
                false
            }
        };
        let connected = broker.is_connected() && !broker.is_blocked() && !stalled;
        if !connected && !deaf {
            tracing::warn!("broker connection lost or blocked: lease expiry paused until it is back");
        }
        if connected && deaf {
            match store.renew_leases().await {
                Ok(n) => tracing::info!(
                    renewed_leases = n,
                    "broker and database reachable again: leases renewed"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew leases; lease expiry stays paused");
                    continue;
                }
            }
        }
        deaf = !connected;
        let due = match store.due_timers(128).await {
            Ok(d) => d,
            Err(e) => {
                if !deaf {
                    tracing::warn!(error = %e, "cannot read timers: lease expiry paused until the database is back");
                }
                deaf = true;
                continue;
            }
        };
        let heard_until = *confirmed.lock().expect("lock");
        let may_fire =
            |t: &store::DueTimer| t.kind != TimerKind::Lease || (!deaf && heard_until.is_some_and(|h| h >= t.due_at));
        for t in due.into_iter().filter(may_fire) {
            match patiently("fire timer", &stop, || store.fire_timer(&t)).await {
                Some(Ok(out)) => relay.send(out),
                Some(Err(e)) => {
                    tracing::error!(error = %e, run_id = %t.run_id, step_id = %t.step_id, kind = %t.kind, "timer failed")
                }
                None => return Ok(()),
            }
        }
    }
}

/// Merge events ingested at once. Each is a transaction of about a dozen
/// round trips and a commit; one at a time, ingestion capped a scheduler at
/// about 45 new runs per second on the 2-core benchmark VM (measured 2026-11-27).
const INGEST_CONCURRENCY: usize = 8;

/// One turn per (service, environment) with an event being ingested.
type Turns = Arc<std::sync::Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>>;

/// Ingests merge events, up to [`INGEST_CONCURRENCY`] at once; events of one
/// service and environment one after another, in the order they arrived, so
/// their runs are queued (and admitted) in that order.
async fn merge_event_loop(
    store: Store,
    broker: Broker,
    relay: Relay,
    pipeline: Arc<Pipeline>,
    prefetch: u16,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = broker.subscribe(MERGE_EVENTS_QUEUE, prefetch, "scheduler-merge-events");
    let slots = Arc::new(Semaphore::new(INGEST_CONCURRENCY));
    let environments: Turns = Arc::default();
    let mut running = tokio::task::JoinSet::new();
    while let Some(delivery) = sub.next(&stop).await {
        let event = match MergeEvent::parse(&delivery.data) {
            Ok(e) => e,
            Err(e) => {
                refuse_merge_event(&store, &delivery, e.to_string()).await;
                continue;
            }
        };
        let plan = match planner::plan(&event, &pipeline) {
            Ok(p) => p,
            Err(e) => {
                refuse_merge_event(&store, &delivery, e.to_string()).await;
                continue;
            }
        };
        while running.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        // Taken here, in arrival order: an event of an environment whose
        // previous event is still being ingested waits for it.
        let key = (event.service.clone(), event.environment.clone());
        let turn = environments
            .lock()
            .expect("lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let turn = turn.lock_owned().await;
        let (store, relay, stop, environments) = (store.clone(), relay.clone(), stop.clone(), environments.clone());
        running.spawn(async move {
            ingest(&store, &relay, &stop, &delivery, &event, &plan).await;
            drop(turn);
            let mut envs = environments.lock().expect("lock");
            if envs.get(&key).is_some_and(|m| Arc::strong_count(m) == 1) {
                envs.remove(&key);
            }
            drop(slot);
        });
    }
    while running.join_next().await.is_some() {}
    Ok(())
}

/// Records one merge event as a run and acks it; refuses it if it cannot be.
async fn ingest(
    store: &Store,
    relay: &Relay,
    stop: &CancellationToken,
    delivery: &Delivery,
    event: &MergeEvent,
    plan: &planner::Plan,
) {
    match patiently("ingest merge event", stop, || store.ingest(event, plan)).await {
        // Shutting down: left unacked, for a replica to ingest.
        None => {}
        Some(Ok((ingested, out))) => {
            match ingested {
                Ingested::Created(id) => {
                    tracing::info!(run_id = %id, service = %event.service, environment = %event.environment, commit_sha = %event.commit_sha, plan_hash = %plan.hash, "run created")
                }
                Ingested::Duplicate(id) => {
                    tracing::info!(run_id = %id, "merge event for an existing run; nothing new")
                }
            }
            relay.send(out);
            let _ = baton_shared::amqp::ack(delivery).await;
        }
        Some(Err(StoreError::MergeGate(reason))) => refuse_merge_event(store, delivery, reason).await,
        Some(Err(e)) => {
            tracing::error!(error = %e, "cannot ingest merge event");
            refuse_merge_event(store, delivery, format!("scheduler could not record the run: {e}")).await;
        }
    }
}

/// Audits a refused merge event and keeps it as a dead letter with the reason.
async fn refuse_merge_event(store: &Store, delivery: &Delivery, reason: String) {
    tracing::warn!(%reason, "merge event refused");
    let _ = store
        .record(None, "merge_event_refused", json!({"reason": reason}))
        .await;
    keep_dead_letter(store, delivery, MERGE_EVENTS_QUEUE, &reason).await;
}

/// Records a message the scheduler itself refused as a (verified) dead letter
/// and acknowledges it. If it cannot be recorded, the message is rejected to
/// the broker's dead-lettering instead, which records it as unverified.
async fn keep_dead_letter(store: &Store, delivery: &Delivery, queue: &str, reason: &str) {
    let key = delivery.routing_key.to_string();
    let (exchange, routing_key) = topology::published_to(queue, &key).unwrap_or(("", key));
    let dl = store::NewDeadLetter {
        message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
        origin: queue.to_owned(),
        exchange: exchange.to_owned(),
        routing_key,
        reason: reason.to_owned(),
        headers: header_summary(delivery),
        body: delivery.data.clone(),
        verified: true,
        job: None,
        delivery_limit: false,
        redelivered: delivery.redelivered,
    };
    match store.record_dead_letter(&dl).await {
        Ok(_) => {
            let _ = baton_shared::amqp::ack(delivery).await;
        }
        Err(e) => {
            tracing::error!(error = %e, queue, "cannot record a refused message; rejecting it to the broker");
            let _ = baton_shared::amqp::nack(delivery, false).await;
        }
    }
}

/// A result, its delivery and the queue it came from.
type Received = (StepResult, Delivery, Arc<str>);

/// Results of one run, received while a task applies that run's earlier ones.
#[derive(Default)]
struct RunQueue {
    items: Vec<Received>,
    /// Signalled when a result joins the queue.
    more: Arc<tokio::sync::Notify>,
}

type Pending = Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, RunQueue>>>;

/// How long a lone `started` waits for its attempt's outcome before it is applied
/// alone: a fast step's outcome follows within a millisecond or two, and both then
/// cost one transaction. A slow step's lease and accept timers do not notice.
const STARTED_LINGER: Duration = Duration::from_millis(3);

/// Consumes every results queue: the shards, with this replica's consumer
/// priority for each ([`Affinity`]), and the unsharded queue.
fn result_deliveries(
    broker: &Broker,
    affinity: &Affinity,
    prefetch: u16,
    stop: &CancellationToken,
) -> mpsc::Receiver<(Arc<str>, Delivery)> {
    let (tx, rx) = mpsc::channel(usize::from(prefetch));
    for (k, queue) in topology::result_queues().into_iter().enumerate() {
        let mut sub = broker.subscribe(&queue, prefetch, "scheduler-results");
        if k < topology::RESULT_SHARDS as usize {
            sub = sub.with_priority(affinity.priority(k as u32));
        }
        let (tx, stop, queue) = (tx.clone(), stop.clone(), Arc::<str>::from(queue));
        tokio::spawn(async move {
            while let Some(d) = sub.next(&stop).await {
                if tx.send((queue.clone(), d)).await.is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Applies results with bounded concurrency, one task per run at a time: what
/// arrives for a run while its task is in a transaction is applied next, all in
/// one transaction (a fast step's `started` and outcome often arrive together).
async fn result_loop(
    store: Store,
    broker: Broker,
    relay: Relay,
    trusted: Arc<Trusted>,
    mut deliveries: mpsc::Receiver<(Arc<str>, Delivery)>,
    concurrency: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let pending: Pending = Arc::default();
    let mut running = tokio::task::JoinSet::new();
    while let Some((queue, delivery)) = deliveries.recv().await {
        let Some(result) = checked_result(&store, &trusted, &delivery, &queue).await else {
            continue;
        };
        let run = result.run_id;
        let lone_started = result.status == baton_shared::protocol::ResultStatus::Started;
        let more = {
            let mut p = pending.lock().expect("lock");
            if let Some(queued) = p.get_mut(&run) {
                queued.items.push((result, delivery, queue));
                queued.more.notify_one();
                continue;
            }
            let entry = p.entry(run).or_default();
            entry.items.push((result, delivery, queue));
            entry.more.clone()
        };
        // At most `prefetch` deliveries are unacknowledged, so at most that many
        // tasks exist; `slots` bounds how many are in a transaction.
        while running.try_join_next().is_some() {}
        let (store, broker, relay, stop, pending, slots) = (
            store.clone(),
            broker.clone(),
            relay.clone(),
            stop.clone(),
            pending.clone(),
            slots.clone(),
        );
        running.spawn(async move {
            let mut snapshot = None;
            if lone_started {
                let linger = async {
                    tokio::select! {
                        _ = more.notified() => {}
                        _ = tokio::time::sleep(STARTED_LINGER) => {}
                    }
                };
                // While the outcome is on its way, read the run, if a slot is free
                // now: the transition then only writes (a stale read is noticed
                // by the write and done again).
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let read = async {
                            let read = store.snapshot(run, true).await;
                            drop(permit);
                            read
                        };
                        let (read, ()) = tokio::join!(read, linger);
                        snapshot = read.ok().flatten();
                    }
                    Err(_) => linger.await,
                }
            }
            let Ok(_permit) = slots.acquire_owned().await else {
                return;
            };
            loop {
                let batch = {
                    let mut p = pending.lock().expect("lock");
                    match p.get_mut(&run) {
                        Some(queued) if !queued.items.is_empty() => std::mem::take(&mut queued.items),
                        _ => {
                            p.remove(&run);
                            break;
                        }
                    }
                };
                apply_batch(&store, &broker, &relay, &stop, batch, snapshot.take()).await;
            }
        });
    }
    while running.join_next().await.is_some() {}
    Ok(())
}

/// A result delivery that parses and is signed by a trusted daemon; anything else is refused.
async fn checked_result(store: &Store, trusted: &Trusted, delivery: &Delivery, queue: &str) -> Option<StepResult> {
    let reason = match StepResult::parse(&delivery.data) {
        Ok(r) => match trusted.verify_for(&r, &r.zone, &r.role) {
            Ok(()) => return Some(r),
            Err(e) => format!("unauthentic result: {e}"),
        },
        Err(e) => e.to_string(),
    };
    refuse(store, delivery, queue, "result_refused", &reason).await;
    None
}

/// Keeps a message the scheduler will not act on as a dead letter, and audits it.
async fn refuse(store: &Store, delivery: &Delivery, queue: &str, kind: &str, reason: &str) {
    tracing::warn!(queue, reason, "message refused");
    let detail = json!({"queue": queue, "reason": reason,
        "message_id": delivery.properties.message_id().as_ref().map(|m| m.to_string())});
    if let Err(e) = store.record(None, kind, detail).await {
        tracing::error!(error = %e, "cannot audit a refused message");
    }
    keep_dead_letter(store, delivery, queue, reason).await;
}

/// Applies a run's results in one transaction and acks them; if that fails, one by
/// one, so a result the scheduler cannot apply is dead-lettered alone.
async fn apply_batch(
    store: &Store,
    broker: &Broker,
    relay: &Relay,
    stop: &CancellationToken,
    batch: Vec<Received>,
    mut snapshot: Option<store::Snapshot>,
) {
    let results: Vec<StepResult> = batch.iter().map(|(r, _, _)| r.clone()).collect();
    match patiently("apply results", stop, || store.apply_results(&results, snapshot.take())).await {
        // Shutting down: leave them unacked; the broker redelivers them to a replica.
        None => {}
        Some(Ok((applied, out))) => {
            baton_shared::failpoint::hit("scheduler-after-result-commit");
            relay.send(out);
            for ((result, delivery, _), applied) in batch.into_iter().zip(applied) {
                log_applied(&result, &applied);
                ack_result(&delivery).await;
            }
        }
        Some(Err(e)) if batch.len() > 1 => {
            tracing::warn!(error = %e, results = batch.len(), "cannot apply results together; applying them one by one");
            for one in batch {
                Box::pin(apply_batch(store, broker, relay, stop, vec![one], None)).await;
            }
        }
        Some(Err(e)) => {
            let (result, delivery, queue) = &batch[0];
            tracing::error!(error = %e, run_id = %result.run_id, "cannot apply result");
            keep_dead_letter(
                store,
                delivery,
                queue,
                &format!("scheduler could not apply result: {e}"),
            )
            .await;
        }
    }
}

fn log_applied(result: &StepResult, applied: &ResultApplied) {
    match applied {
        ResultApplied::Applied => {}
        ResultApplied::Duplicate => tracing::info!(message_id = %result.message_id, "duplicate result ignored"),
        ResultApplied::Stale(why) => {
            tracing::info!(run_id = %result.run_id, step_id = %result.step_id, attempt = result.attempt, %why, "stale result ignored")
        }
        ResultApplied::UnknownRun => {
            tracing::warn!(run_id = %result.run_id, "result for an unknown run ignored")
        }
    }
}

async fn ack_result(delivery: &Delivery) {
    if let Err(e) = baton_shared::amqp::ack(delivery).await {
        tracing::warn!(error = %e, "ack of applied result failed; a redelivery will be recognised as duplicate");
    }
}

/// Moves dead letters from the broker into the database (`baton dlq`). Only
/// the broker dead-letters (no component may publish to `baton.dead`), and
/// only a job this scheduler signed, dead-lettered from its own queue at the
/// delivery limit, fails its attempt ([`Store::record_dead_letter`]).
async fn dead_letter_loop(
    store: Store,
    broker: Broker,
    relay: Relay,
    own: Arc<Trusted>,
    prefetch: u16,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = broker.subscribe(topology::DEAD_QUEUE, prefetch, "scheduler-dead-letters");
    while let Some(delivery) = sub.next(&stop).await {
        let dl = dead_letter_of(&delivery, &own);
        match patiently("record dead letter", &stop, || store.record_dead_letter(&dl)).await {
            None => return Ok(()),
            Some(Ok((id, out))) => {
                if dl.verified {
                    tracing::warn!(dead_letter = ?id, origin = %dl.origin, reason = %dl.reason, "dead letter recorded");
                } else {
                    tracing::warn!(dead_letter = ?id, origin = %dl.origin, reason = %dl.reason, "unverified dead letter recorded; it changes no run");
                }
                relay.send(out);
                let _ = baton_shared::amqp::ack(&delivery).await;
            }
            Some(Err(e)) => {
                // Left unacknowledged: the broker keeps it for the next attempt.
                tracing::error!(error = %e, "cannot record a dead letter");
            }
        }
    }
    Ok(())
}

fn header_text(v: &lapin::types::AMQPValue) -> String {
    use lapin::types::AMQPValue;
    match v {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

/// A delivery's headers as text, for the record (the broker's `x-death` aside).
fn header_summary(d: &Delivery) -> serde_json::Value {
    let headers = d.properties.headers().clone().unwrap_or_default();
    let mut summary = serde_json::Map::new();
    for (k, v) in headers.inner() {
        if k.as_str() != "x-death" {
            summary.insert(k.to_string(), json!(header_text(v)));
        }
    }
    serde_json::Value::Object(summary)
}

/// Where a dead letter came from and why, and whether the scheduler can
/// attribute it. The broker's `x-death` names the queue and the reason; a
/// letter carrying Baton's own reason headers was published by hand (no
/// component does so), and is recorded with its claims, unverified.
fn dead_letter_of(d: &Delivery, own: &Trusted) -> store::NewDeadLetter {
    use lapin::types::AMQPValue;
    let headers = d.properties.headers().clone().unwrap_or_default();
    let key = d.routing_key.to_string();
    let claimed = (
        headers.inner().get(topology::ORIGIN_HEADER),
        headers.inner().get(topology::REASON_HEADER),
    );
    let death = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().first().and_then(|v| match v {
            AMQPValue::FieldTable(t) => Some(t.inner().clone()),
            _ => None,
        }),
        _ => None,
    };
    let mut dl = store::NewDeadLetter {
        message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
        origin: String::new(),
        exchange: String::new(),
        routing_key: key.clone(),
        reason: String::new(),
        headers: header_summary(d),
        body: d.data.clone(),
        verified: false,
        job: None,
        delivery_limit: false,
        redelivered: d.redelivered,
    };
    match (claimed, death) {
        ((origin, reason), _) if origin.is_some() || reason.is_some() => {
            let origin = origin.map(header_text).unwrap_or_default();
            let (exchange, rk) = topology::published_to(&origin, &key).unwrap_or(("", key.clone()));
            dl.reason = format!(
                "unverified claim: {}",
                reason.map(header_text).unwrap_or_else(|| "no reason".into())
            );
            dl.origin = origin;
            dl.exchange = exchange.to_owned();
            dl.routing_key = rk;
        }
        (_, Some(death)) => {
            let get = |k: &str| death.get(k).map(header_text).unwrap_or_default();
            let rk = match death.get("routing-keys") {
                Some(AMQPValue::FieldArray(a)) => a.as_slice().first().map(header_text).unwrap_or(key.clone()),
                _ => key.clone(),
            };
            let why = get("reason");
            dl.origin = get("queue");
            dl.reason = format!("broker: {}", if why.is_empty() { "unknown" } else { why.as_str() });
            dl.exchange = get("exchange");
            dl.routing_key = rk;
            // A job this scheduler signed, dead-lettered from that job's own queue.
            dl.job = StepJob::parse(&d.data)
                .ok()
                .filter(|j| own.verify(j).is_ok())
                .filter(|j| dl.origin == topology::job_queue(&j.zone, &j.role))
                .filter(|j| dl.message_id.as_deref() == Some(j.message_id.to_string().as_str()));
            dl.verified = dl.job.is_some();
            dl.delivery_limit = why == "delivery_limit";
        }
        (_, None) => {
            dl.reason = "unverified: no x-death and no reason".into();
        }
    }
    dl
}

/// Daemons' signed refusal notices: audited in the global chain, and the only
/// word of a daemon's that may end an attempt ([`Store::record_refusal`]). The
/// notice's key must be allowed to sign for the zone and role it names.
async fn notice_loop(
    store: Store,
    broker: Broker,
    relay: Relay,
    trusted: Arc<Trusted>,
    own: Arc<Trusted>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = broker.subscribe(NOTICES_QUEUE, 16, "scheduler-notices");
    while let Some(delivery) = sub.next(&stop).await {
        let notice = match Refusal::parse(&delivery.data) {
            Ok(n) => n,
            Err(e) => {
                refuse(&store, &delivery, NOTICES_QUEUE, "notice_refused", &e.to_string()).await;
                continue;
            }
        };
        if let Err(e) = trusted.verify_for(&notice, &notice.zone, &notice.role) {
            let reason = format!("unauthentic notice: {e}");
            refuse(&store, &delivery, NOTICES_QUEUE, "notice_refused", &reason).await;
            continue;
        }
        match patiently("record refusal", &stop, || store.record_refusal(&notice, &own)).await {
            None => return Ok(()),
            Some(Ok(out)) => {
                relay.send(out);
                let _ = baton_shared::amqp::ack(&delivery).await;
            }
            Some(Err(e)) => tracing::error!(error = %e, "cannot record a refusal notice"),
        }
    }
    Ok(())
}

/// Reads Alertmanager's alerts (`GET /api/v2/alerts`: active, silenced,
/// inhibited and unprocessed ones, never resolved ones) every `every`, and
/// closes the incidents whose alert is gone: an alert silenced or inhibited
/// when it resolved sends no resolved notification. Nothing is closed when
/// Alertmanager cannot be read.
async fn alert_reconcile_loop(
    store: Store,
    relay: Relay,
    url: String,
    every: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the Alertmanager client: {e}"))?;
    let endpoint = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
    let m = baton_shared::metrics::global();
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        let active = match active_alerts(&http, &endpoint).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read Alertmanager's alerts; no incident is closed by reconciliation");
                m.inc(
                    "baton_alert_reconciliations_total",
                    "Reconciliations of incidents with Alertmanager's alerts, by outcome",
                    &[("outcome", "unreachable")],
                    1.0,
                );
                continue;
            }
        };
        match store.reconcile_alerts(&active, "alertmanager-reconciliation").await {
            Ok((closed, out)) => {
                relay.send(out);
                if !closed.is_empty() {
                    tracing::info!(
                        closed = closed.len(),
                        "incidents whose alert is gone from Alertmanager closed"
                    );
                }
                m.inc(
                    "baton_alert_reconciliations_total",
                    "Reconciliations of incidents with Alertmanager's alerts, by outcome",
                    &[("outcome", "done")],
                    1.0,
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot reconcile incidents with Alertmanager"),
        }
    }
}

/// The fingerprints (as incidents store them) of every alert Alertmanager holds.
async fn active_alerts(http: &reqwest::Client, endpoint: &str) -> anyhow::Result<std::collections::BTreeSet<String>> {
    #[derive(serde::Deserialize)]
    struct GettableAlert {
        fingerprint: String,
    }
    let res = http.get(endpoint).send().await?.error_for_status()?;
    let alerts: Vec<GettableAlert> = res.json().await?;
    Ok(alerts
        .into_iter()
        .map(|a| format!("alertmanager:{}", a.fingerprint))
        .collect())
}
