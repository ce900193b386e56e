//! The broker topology, declared in one place.
//!
//! All queues are durable quorum queues. Job and result queues dead-letter to
//! `baton.dead` at least once (which RabbitMQ only honours together with
//! `overflow=reject-publish`) after a bounded number of deliveries, so a poison
//! message ends up in `baton.dead-letters` instead of looping or vanishing.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// CI publishes merge events here.
pub const EVENTS_EXCHANGE: &str = "baton.events";
pub const MERGE_EVENTS_QUEUE: &str = "baton.merge-events";
pub const MERGE_EVENTS_KEY: &str = "merge";
/// The scheduler publishes step jobs here, routing key `<zone>.<role>`.
pub const JOBS_EXCHANGE: &str = "baton.jobs";
/// Daemons publish step results here.
pub const RESULTS_EXCHANGE: &str = "baton.results";
/// Results published without a shard (daemons older than the shards, hand-made
/// messages). Every scheduler replica consumes it.
pub const RESULTS_QUEUE: &str = "baton.results";
pub const RESULTS_KEY: &str = "result";
/// Results are spread over this many shard queues by run, so that one run's
/// results reach one scheduler replica (see [`result_shard`]). Daemons and the
/// scheduler must agree on it: changing it means redeploying both.
pub const RESULT_SHARDS: u32 = 8;
/// Daemons' refusal notices, on the results exchange, for the audit log.
pub const NOTICES_QUEUE: &str = "baton.notices";
pub const NOTICES_KEY: &str = "notice";
/// Cancels for running attempts, routing key `<zone>.<role>`.
pub const CONTROL_EXCHANGE: &str = "baton.control";
/// Dead letters, from the broker's dead-lettering only (a refused message is
/// rejected to it; no component publishes here).
pub const DEAD_EXCHANGE: &str = "baton.dead";
pub const DEAD_QUEUE: &str = "baton.dead-letters";
/// Header by which an earlier Baton put its reason on a dead letter; one that
/// carries it now was published by hand, and is recorded as an unverified claim.
pub const REASON_HEADER: &str = "x-baton-reason";
/// Header by which an earlier Baton named the queue of a dead letter (as above).
pub const ORIGIN_HEADER: &str = "x-baton-origin";

/// Deliveries of one message before the broker dead-letters it.
pub const DEFAULT_DELIVERY_LIMIT: i64 = 5;

/// Where a message consumed from `queue` was published: its exchange and routing
/// key (a job's is `<zone>.<role>`, taken from the delivery). For replaying dead letters.
pub fn published_to(queue: &str, delivery_key: &str) -> Option<(&'static str, String)> {
    if let Some(shard) = shard_of_queue(queue) {
        return Some((RESULTS_EXCHANGE, result_shard_key(shard)));
    }
    match queue {
        MERGE_EVENTS_QUEUE => Some((EVENTS_EXCHANGE, MERGE_EVENTS_KEY.to_owned())),
        RESULTS_QUEUE => Some((RESULTS_EXCHANGE, RESULTS_KEY.to_owned())),
        NOTICES_QUEUE => Some((RESULTS_EXCHANGE, NOTICES_KEY.to_owned())),
        q if q.starts_with("baton.") && q.matches('.').count() == 2 => Some((JOBS_EXCHANGE, delivery_key.to_owned())),
        _ => None,
    }
}

/// The shard of a run's results: a pure function of the run id.
pub fn result_shard(run_id: uuid::Uuid) -> u32 {
    (run_id.as_u128() % u128::from(RESULT_SHARDS)) as u32
}

/// The routing key of a run's results on the results exchange: `result.<shard>`.
pub fn result_key(run_id: uuid::Uuid) -> String {
    result_shard_key(result_shard(run_id))
}

fn result_shard_key(shard: u32) -> String {
    format!("{RESULTS_KEY}.{shard}")
}

/// The queue of one result shard: `baton.results.<shard>`.
pub fn result_shard_queue(shard: u32) -> String {
    format!("{RESULTS_QUEUE}.{shard}")
}

/// The shard whose queue `queue` is, if it is one.
fn shard_of_queue(queue: &str) -> Option<u32> {
    let n: u32 = queue.strip_prefix(RESULTS_QUEUE)?.strip_prefix('.')?.parse().ok()?;
    (n < RESULT_SHARDS && queue == result_shard_queue(n)).then_some(n)
}

/// Every queue results arrive in: the shards, then the unsharded queue.
pub fn result_queues() -> Vec<String> {
    (0..RESULT_SHARDS)
        .map(result_shard_queue)
        .chain([RESULTS_QUEUE.to_owned()])
        .collect()
}

pub fn job_routing_key(zone: &str, role: &str) -> String {
    format!("{zone}.{role}")
}

pub fn job_queue(zone: &str, role: &str) -> String {
    format!("baton.{zone}.{role}")
}

fn quorum_args(dead_letter: bool, delivery_limit: i64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    if dead_letter {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(DEAD_EXCHANGE)),
        );
        args.insert(
            ShortString::from("x-dead-letter-strategy"),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(delivery_limit),
        );
    }
    args
}

/// The merge events queue's arguments: a quorum queue like the others, with a
/// single active consumer. Whichever scheduler replica consumes first gets
/// every event, in the order CI published them, and the next one takes over
/// when its consumer goes (a crash closes its connection). Spread over several
/// replicas, two events of one environment could be ingested in either order,
/// and an older commit queued to deploy after a newer one.
pub fn merge_events_args(delivery_limit: i64) -> FieldTable {
    let mut args = quorum_args(true, delivery_limit);
    args.insert(ShortString::from("x-single-active-consumer"), AMQPValue::Boolean(true));
    args
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> lapin::Result<()> {
    let opts = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(name.into(), kind, opts, FieldTable::default())
        .await
}

async fn quorum_queue(ch: &Channel, name: &str, dead_letter: bool, delivery_limit: i64) -> lapin::Result<()> {
    queue_with(ch, name, quorum_args(dead_letter, delivery_limit)).await
}

async fn queue_with(ch: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(drop)
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Exchanges plus the queues the scheduler owns: merge events, results (the
/// shards and the unsharded queue), notices, dead letters.
pub async fn declare_core(ch: &Channel, delivery_limit: i64) -> lapin::Result<()> {
    exchange(ch, DEAD_EXCHANGE, ExchangeKind::Fanout).await?;
    exchange(ch, EVENTS_EXCHANGE, ExchangeKind::Direct).await?;
    exchange(ch, JOBS_EXCHANGE, ExchangeKind::Direct).await?;
    exchange(ch, RESULTS_EXCHANGE, ExchangeKind::Direct).await?;
    exchange(ch, CONTROL_EXCHANGE, ExchangeKind::Direct).await?;
    quorum_queue(ch, DEAD_QUEUE, false, delivery_limit).await?;
    bind(ch, DEAD_QUEUE, DEAD_EXCHANGE, "").await?;
    queue_with(ch, MERGE_EVENTS_QUEUE, merge_events_args(delivery_limit)).await?;
    bind(ch, MERGE_EVENTS_QUEUE, EVENTS_EXCHANGE, MERGE_EVENTS_KEY).await?;
    quorum_queue(ch, RESULTS_QUEUE, true, delivery_limit).await?;
    bind(ch, RESULTS_QUEUE, RESULTS_EXCHANGE, RESULTS_KEY).await?;
    for shard in 0..RESULT_SHARDS {
        let queue = result_shard_queue(shard);
        quorum_queue(ch, &queue, true, delivery_limit).await?;
        bind(ch, &queue, RESULTS_EXCHANGE, &result_shard_key(shard)).await?;
    }
    quorum_queue(ch, NOTICES_QUEUE, true, delivery_limit).await?;
    bind(ch, NOTICES_QUEUE, RESULTS_EXCHANGE, NOTICES_KEY).await
}

/// The job queue of one zone and role, bound to the jobs exchange.
///
/// Daemons (or the ops definitions) declare their own queue: the scheduler does
/// not, so a job for a zone and role nobody serves is unroutable and fails loudly.
pub async fn declare_job_queue(ch: &Channel, zone: &str, role: &str, delivery_limit: i64) -> lapin::Result<()> {
    exchange(ch, JOBS_EXCHANGE, ExchangeKind::Direct).await?;
    exchange(ch, DEAD_EXCHANGE, ExchangeKind::Fanout).await?;
    exchange(ch, CONTROL_EXCHANGE, ExchangeKind::Direct).await?;
    let queue = job_queue(zone, role);
    quorum_queue(ch, &queue, true, delivery_limit).await?;
    bind(ch, &queue, JOBS_EXCHANGE, &job_routing_key(zone, role)).await
}

/// A private, exclusive queue that receives cancels for one zone and role.
///
/// It declares no exchange: a daemon under least privilege may not, and the
/// control exchange exists already (ops definitions, the scheduler, or
/// [`declare_job_queue`]). The queue is named by the daemon
/// ([`control_queue_name`]), not by the broker: lapin's connection recovery
/// declares queues again by name, and the broker refuses a client declaring an
/// `amq.gen-*` name, which broke every channel after a broker restart.
pub async fn declare_control_queue(ch: &Channel, zone: &str, role: &str) -> lapin::Result<String> {
    let opts = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let name = control_queue_name(zone, role);
    ch.queue_declare(name.as_str().into(), opts, FieldTable::default())
        .await?;
    bind(ch, &name, CONTROL_EXCHANGE, &job_routing_key(zone, role)).await?;
    Ok(name)
}

/// A fresh name for one daemon's cancel queue: `baton.cancel.<zone>.<role>.<random>`.
pub fn control_queue_name(zone: &str, role: &str) -> String {
    format!("baton.cancel.{zone}.{role}.{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_of_a_run_go_to_one_shard_and_dead_letters_go_back_there() {
        let run = uuid::Uuid::new_v4();
        let shard = result_shard(run);
        assert!(shard < RESULT_SHARDS);
        assert_eq!(result_key(run), format!("result.{shard}"));
        let queue = result_shard_queue(shard);
        assert_eq!(
            published_to(&queue, "ignored"),
            Some((RESULTS_EXCHANGE, result_key(run)))
        );
        assert_eq!(
            published_to(RESULTS_QUEUE, "ignored"),
            Some((RESULTS_EXCHANGE, RESULTS_KEY.to_owned()))
        );
        // Not shards: a job queue stays a job queue, an unknown shard is unknown.
        assert_eq!(
            published_to("baton.staging.cdn", "staging.cdn"),
            Some((JOBS_EXCHANGE, "staging.cdn".to_owned()))
        );
        assert_eq!(result_queues().len(), RESULT_SHARDS as usize + 1);
    }

    #[test]
    fn runs_spread_over_every_shard() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            seen.insert(result_shard(uuid::Uuid::new_v4()));
        }
        assert_eq!(seen.len(), RESULT_SHARDS as usize);
    }
}
