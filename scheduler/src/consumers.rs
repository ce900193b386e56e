//! The scheduler's consumers: merge events (ingested several at once, each
//! environment's in order), step results (sharded by run), dead letters and
//! daemons' notices. Each records what it took in PostgreSQL before it
//! acknowledges the delivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use baton_shared::amqp::Broker;
use baton_shared::protocol::{MergeEvent, Message, Refusal, StepJob, StepResult};
use baton_shared::signing::Trusted;
use baton_shared::topology::{self, MERGE_EVENTS_QUEUE, NOTICES_QUEUE};
use lapin::message::Delivery;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::affinity::Affinity;
use crate::pipeline::Pipeline;
use crate::planner;
use crate::store::{self, Ingested, ResultApplied, Store, StoreError};

use crate::relay::Relay;
use crate::store::patiently;

/// Merge events ingested at once. Each is a transaction of about a dozen
/// round trips and a commit; one at a time, ingestion capped a scheduler at
/// about 45 new runs per second on the 2-core benchmark VM (measured 2026-11-27).
const INGEST_CONCURRENCY: usize = 8;

/// One turn per (service, environment) with an event being ingested.
type Turns = Arc<std::sync::Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>>;

/// Ingests merge events, up to [`INGEST_CONCURRENCY`] at once; events of one
/// service and environment one after another, in the order they arrived, so
/// their runs are queued (and admitted) in that order.
pub(crate) async fn merge_event_loop(
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
pub(crate) fn result_deliveries(
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
pub(crate) async fn result_loop(
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
pub(crate) async fn dead_letter_loop(
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
pub(crate) fn dead_letter_of(d: &Delivery, own: &Trusted) -> store::NewDeadLetter {
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
pub(crate) async fn notice_loop(
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
