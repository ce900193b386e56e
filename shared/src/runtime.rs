//! The daemon runtime: everything a role daemon does except its role's work.
//!
//! It consumes `baton.<zone>.<role>` with bounded concurrency, refuses jobs that
//! are malformed, misrouted or expired (dead-lettered with the reason, nothing
//! executed), reports `started`, acks, and only then works — so no delivery is
//! held unacked through a long step. While the role works it sends heartbeats
//! at the rate the job asks for; the final `succeeded`/`failed` is a separate,
//! confirmed message. Cancels arrive on a private queue bound to `baton.control`.
//! On shutdown it stops taking work, lets running jobs finish within the grace
//! period and hands back the rest as retryable `daemon_shutdown` failures.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use lapin::message::Delivery;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::amqp::{AmqpError, Broker, Outgoing, Subscription};
use crate::config::{ConfigError, DaemonConfig};
use crate::metrics;
use crate::protocol::{
    CancelJob, Fields, HANDED_BACK, JobKind, Message, PROTOCOL_VERSION, Refusal, ResultStatus, StepError, StepJob,
    StepResult,
};
use crate::signing::{Keypair, Trusted};
use crate::topology::{self, NOTICES_KEY, RESULTS_EXCHANGE};

/// What a role's action returns: outputs for later steps, or why it failed.
pub type Outcome = Result<Fields, StepError>;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the runtime hands a role while it works on a job.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// Fires when the attempt is cancelled, times out, or the daemon stops.
    /// The role's future is dropped at that moment too: work it left half
    /// done is undone by the step's compensation if its role declares partial
    /// effects (`baton_shared::roles`), not by cleanup code here.
    pub cancel: CancellationToken,
    /// This daemon instance's name.
    pub daemon: String,
}

/// One role's domain: how to execute and how to undo each action.
///
/// Implementations must be idempotent per (run, step): a redelivered job after
/// a crash runs the same action again.
pub trait Role: Send + Sync + 'static {
    /// The role's name as used in queues and plans, e.g. `db-migration`.
    fn name(&self) -> &str;
    fn execute<'a>(&'a self, job: &'a StepJob, ctx: &'a ExecContext) -> BoxFuture<'a, Outcome>;
    fn compensate<'a>(&'a self, job: &'a StepJob, ctx: &'a ExecContext) -> BoxFuture<'a, Outcome>;
}

/// A role served in one zone.
#[derive(Clone)]
pub struct Binding {
    pub zone: String,
    pub role: Arc<dyn Role>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    BrokerLost(String),
}

type AttemptKey = (Uuid, String, u32);

struct Running {
    token: CancellationToken,
    reason: Arc<OnceLock<StepError>>,
}

/// Message ids seen lately, so a redelivered duplicate is not run twice here.
struct RecentIds {
    set: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl RecentIds {
    const CAPACITY: usize = 100_000;

    fn insert(&mut self, id: Uuid) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }

    fn forget(&mut self, id: Uuid) {
        self.set.remove(&id);
    }
}

struct Shared {
    broker: Broker,
    instance: String,
    /// Signs this daemon's results and notices.
    key: Keypair,
    /// The scheduler keys jobs and cancels must be signed with.
    trusted: Trusted,
    running: Mutex<HashMap<AttemptKey, Running>>,
    seen: Mutex<RecentIds>,
    /// The zone's replay memory shared by its replicas (`daemon.ledger_url`).
    ledger: Option<crate::ledger::Ledger>,
    /// Fired when the grace period is over: running jobs are handed back.
    hand_back: CancellationToken,
    /// A job that ends sooner reports only its outcome (`daemon.report_started_after_ms`).
    report_started_after: Duration,
    /// Job subscriptions cancelled at shutdown, kept (with their channels)
    /// until the jobs they delivered are settled.
    consumed: Mutex<Vec<Subscription>>,
}

/// Runs the daemon until `shutdown` resolves, then drains within the grace period.
pub async fn run(
    config: DaemonConfig,
    bindings: Vec<Binding>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RuntimeError> {
    let instance = config.instance();
    let (key, trusted) = config.signing.load()?;
    let broker = Broker::connect_retrying(
        &config.amqp,
        &format!("baton-daemon {instance}"),
        Duration::from_secs(60),
    )
    .await?;
    let ledger = match &config.daemon.ledger_url {
        Some(url) => Some(
            crate::ledger::Ledger::new(url.expose())
                .map_err(|e| ConfigError::invalid("daemon.ledger_url", e.to_string()))?,
        ),
        None => {
            tracing::warn!(
                "daemon.ledger_url is not set: this process alone remembers the jobs it received, \
                 so run one replica per zone and role"
            );
            None
        }
    };
    let shared = Arc::new(Shared {
        ledger,
        broker: broker.clone(),
        instance: instance.clone(),
        key,
        trusted,
        running: Mutex::new(HashMap::new()),
        seen: Mutex::new(RecentIds {
            set: HashSet::new(),
            order: VecDeque::new(),
        }),
        hand_back: CancellationToken::new(),
        report_started_after: Duration::from_millis(config.daemon.report_started_after_ms),
        consumed: Mutex::new(Vec::new()),
    });
    let stop_intake = CancellationToken::new();
    if !config.daemon.http_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.daemon.http_listen)
            .await
            .map_err(|e| ConfigError::invalid("daemon.http_listen", format!("cannot listen: {e}")))?;
        tokio::spawn(http::serve(listener, broker.clone(), stop_intake.clone()));
    }
    let slots = Arc::new(Semaphore::new(config.daemon.concurrency));
    let mut consumers = JoinSet::new();
    let jobs = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));

    for binding in bindings {
        let role_name = binding.role.name().to_owned();
        let queue = topology::job_queue(&binding.zone, &role_name);
        let tag = format!("{instance}/{}", binding.zone);
        let jobs_sub = if config.daemon.declare_queue {
            let (zone, role, limit) = (binding.zone.clone(), role_name.clone(), config.amqp.delivery_limit);
            let setup: crate::amqp::Setup = Arc::new(move |ch| {
                let (zone, role) = (zone.clone(), role.clone());
                Box::pin(async move {
                    topology::declare_job_queue(&ch, &zone, &role, limit).await?;
                    Ok(topology::job_queue(&zone, &role))
                })
            });
            broker.subscribe_with(config.daemon.prefetch, &tag, setup)
        } else {
            broker.subscribe(&queue, config.daemon.prefetch, &tag)
        };
        // The control queue is exclusive: it dies with its connection, so every
        // new connection declares a new one.
        let control_setup: crate::amqp::Setup = {
            let (zone, role) = (binding.zone.clone(), role_name.clone());
            Arc::new(move |ch| {
                let (zone, role) = (zone.clone(), role.clone());
                Box::pin(async move { topology::declare_control_queue(&ch, &zone, &role).await })
            })
        };
        let control = broker.subscribe_with(16, &format!("{tag}/control"), control_setup);
        tracing::info!(zone = %binding.zone, role = %role_name, queue = %queue, instance = %instance, "subscribing");

        consumers.spawn(control_loop(
            shared.clone(),
            control,
            binding.zone.clone(),
            role_name.clone(),
            stop_intake.clone(),
        ));
        consumers.spawn(job_loop(
            shared.clone(),
            binding,
            queue,
            jobs_sub,
            slots.clone(),
            jobs.clone(),
            stop_intake.clone(),
        ));
    }

    tokio::select! {
        _ = shutdown => tracing::info!("shutdown requested; no new jobs are taken"),
        why = broker.lost() => {
            // Reconnecting gave up (`amqp.reconnect_attempts`): hand running jobs
            // back and exit for the supervisor to restart the daemon.
            stop_intake.cancel();
            shared.hand_back.cancel();
            drain(&jobs, Duration::from_secs(10)).await;
            return Err(RuntimeError::BrokerLost(why));
        }
        Some(res) = consumers.join_next() => {
            // A consumer ended on its own (it only does once the broker is closed).
            stop_intake.cancel();
            shared.hand_back.cancel();
            drain(&jobs, Duration::from_secs(10)).await;
            broker.close().await;
            return match res {
                Ok(Err(e)) => Err(e),
                _ => Ok(()),
            };
        }
    }
    stop_intake.cancel();
    while consumers.join_next().await.is_some() {}

    let grace = Duration::from_secs(config.daemon.shutdown_grace_secs);
    if !drain(&jobs, grace).await {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "grace period over; handing back running jobs"
        );
        shared.hand_back.cancel();
        drain(&jobs, Duration::from_secs(10)).await;
    }
    shared.consumed.lock().expect("lock").clear();
    broker.close().await;
    tracing::info!("daemon stopped");
    Ok(())
}

/// Waits for running jobs; false if some were still running at the end of `patience`.
async fn drain(jobs: &tokio::sync::Mutex<JoinSet<()>>, patience: Duration) -> bool {
    let mut jobs = jobs.lock().await;
    tokio::time::timeout(patience, async { while jobs.join_next().await.is_some() {} })
        .await
        .is_ok()
}

async fn job_loop(
    shared: Arc<Shared>,
    binding: Binding,
    queue: String,
    mut sub: Subscription,
    slots: Arc<Semaphore>,
    jobs: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    stop: CancellationToken,
) -> Result<(), RuntimeError> {
    while let Some(delivery) = sub.next(&stop).await {
        // The slot is taken after the delivery arrives: a loop idling on an empty
        // queue must not hold one, or a daemon serving more queues than it has
        // slots would starve the rest.
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closes"),
        };
        let shared = shared.clone();
        let binding = binding.clone();
        let queue = queue.clone();
        let mut set = jobs.lock().await;
        // Reap finished jobs so the set does not grow without bound.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            handle(&shared, &binding, &queue, delivery).await;
            drop(permit);
        });
    }
    // Unacked prefetched deliveries go back to the queue when the consumer is
    // cancelled. The channel stays open until the running jobs are drained
    // (`Shared::consumed`): closing it would also give back the quick jobs
    // still running unacknowledged, for another daemon to run again.
    sub.cancel().await;
    shared.consumed.lock().expect("lock").push(sub);
    Ok(())
}

async fn control_loop(
    shared: Arc<Shared>,
    mut sub: Subscription,
    zone: String,
    role: String,
    stop: CancellationToken,
) -> Result<(), RuntimeError> {
    // Cancels sent while no control queue existed (between connections) are
    // covered by the scheduler's lease and the daemon's self-fencing.
    while let Some(delivery) = sub.next(&stop).await {
        let parsed = CancelJob::parse(&delivery.data)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                shared
                    .trusted
                    .verify(&c)
                    .map(|()| c)
                    .map_err(|e| format!("unauthentic cancel: {e}"))
            });
        match parsed {
            Ok(cancel) => {
                let key = (cancel.run_id, cancel.step_id.clone(), cancel.attempt);
                if let Some(r) = shared.running.lock().expect("lock").get(&key) {
                    let _ = r
                        .reason
                        .set(StepError::fatal("cancelled", format!("cancelled: {}", cancel.reason)));
                    r.token.cancel();
                    tracing::info!(run_id = %cancel.run_id, step_id = %cancel.step_id, attempt = cancel.attempt, reason = %cancel.reason, "attempt cancelled");
                }
                let _ = crate::amqp::ack(&delivery).await;
            }
            Err(reason) => refuse(&shared, &delivery, "control", &zone, &role, &reason).await,
        }
    }
    Ok(())
}

/// Checks a delivery and, if it is a job for us, runs it to a reported end.
async fn handle(shared: &Shared, binding: &Binding, queue: &str, delivery: Delivery) {
    let role = binding.role.name();
    let zone = binding.zone.as_str();
    let job = match StepJob::parse(&delivery.data) {
        Ok(job) => job,
        Err(e) => return refuse(shared, &delivery, queue, zone, role, &e.to_string()).await,
    };
    if crate::failpoint::is_armed() {
        crate::failpoint::hit(&format!("daemon-before-ack-{}", job.step_id));
    }
    // Authenticity first: nothing about an unsigned or forged job is believed.
    if let Err(e) = shared.trusted.verify(&job) {
        return refuse(shared, &delivery, queue, zone, role, &format!("unauthentic: {e}")).await;
    }
    if job.zone != binding.zone || job.role != role {
        let reason = format!(
            "misrouted: job for {}.{} delivered to {queue}, which serves {}.{role}",
            job.zone, job.role, binding.zone
        );
        return refuse(shared, &delivery, queue, zone, role, &reason).await;
    }
    let now = Utc::now();
    if now > job.not_after {
        let reason = format!(
            "expired: not_after {} has passed (now {})",
            job.not_after.to_rfc3339(),
            now.to_rfc3339()
        );
        return refuse(shared, &delivery, queue, zone, role, &reason).await;
    }
    let key: AttemptKey = (job.run_id, job.step_id.clone(), job.attempt);
    if !shared.seen.lock().expect("lock").insert(job.message_id) {
        if delivery.redelivered {
            // The broker gave back a delivery of a lost connection or channel
            // whose job this daemon already took: a duplicate, not a replay.
            tracing::info!(run_id = %job.run_id, step_id = %job.step_id, attempt = job.attempt, "redelivery of a job already taken here; dropped");
            let _ = crate::amqp::ack(&delivery).await;
            return;
        }
        let reason = format!("replayed: message id {} was already received", job.message_id);
        return refuse(shared, &delivery, queue, zone, role, &reason).await;
    }
    // A first delivery here may still be a replay of what another replica, or
    // this daemon before a restart, received: the zone's ledger knows.
    if let Some(ledger) = shared.ledger.as_ref().filter(|_| !delivery.redelivered) {
        match claim_patiently(ledger, &job, &shared.instance).await {
            Ok(true) => {}
            Ok(false) => {
                let reason = format!(
                    "replayed: message id {} was already received in zone {} (replay ledger)",
                    job.message_id, job.zone
                );
                return refuse(shared, &delivery, queue, zone, role, &reason).await;
            }
            Err(e) => {
                tracing::error!(error = %e, run_id = %job.run_id, step_id = %job.step_id, "cannot check the replay ledger; handing the job back");
                shared.seen.lock().expect("lock").forget(job.message_id);
                let _ = crate::amqp::nack(&delivery, true).await;
                return;
            }
        }
    }
    let token = shared.hand_back.child_token();
    let reason = Arc::new(OnceLock::new());
    let registered = {
        let mut running = shared.running.lock().expect("lock");
        if running.contains_key(&key) {
            false
        } else {
            running.insert(
                key.clone(),
                Running {
                    token: token.clone(),
                    reason: reason.clone(),
                },
            );
            true
        }
    };
    if !registered {
        tracing::info!(run_id = %job.run_id, step_id = %job.step_id, attempt = job.attempt, "duplicate delivery of a job already taken here; dropped");
        let _ = crate::amqp::ack(&delivery).await;
        return;
    }
    // The daemon's span joins the run's trace as a child of the step attempt's
    // span (messaging conventions: a RabbitMQ consumer span).
    let span = tracing::info_span!(
        "job",
        otel.name = %format!("{} {} {}", job.kind, job.step_id, job.action),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = %queue,
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.message.id = %job.message_id,
        baton.run_id = %job.run_id,
        baton.step_id = %job.step_id,
        baton.attempt = job.attempt,
        baton.kind = %job.kind,
        baton.zone = %job.zone,
        baton.role = %job.role,
        baton.daemon = %shared.instance,
        baton.outcome = tracing::field::Empty,
    );
    let parent = crate::amqp::header(&delivery, "traceparent").or_else(|| job.traceparent.clone());
    if let Some(cx) = parent.as_deref().and_then(crate::telemetry::remote_parent) {
        let _ = span.set_parent(cx);
    }
    run_job(shared, binding, delivery, job, key, token, reason)
        .instrument(span)
        .await;
}

/// Reports, executes and reports again, inside the job's span.
async fn run_job(
    shared: &Shared,
    binding: &Binding,
    delivery: Delivery,
    job: StepJob,
    key: AttemptKey,
    token: CancellationToken,
    reason: Arc<OnceLock<StepError>>,
) {
    let started_at = Utc::now();
    // A quick job reports only its outcome: `started` would reach the
    // scheduler a moment before it and cost a publish, a delivery and an inbox
    // row. Its delivery stays unacknowledged until the work is done, so a
    // daemon that dies meanwhile leaves the job to the broker to redeliver.
    let quiet = shared.report_started_after;
    let mut acked = false;
    if quiet.is_zero() {
        if !report_started(shared, &job, &delivery).await {
            tracing::warn!(run_id = %job.run_id, step_id = %job.step_id, "handing the job back unstarted");
            let _ = crate::amqp::nack(&delivery, true).await;
            shared.running.lock().expect("lock").remove(&key);
            // Handed back untouched: its redelivery is welcome here too.
            shared.seen.lock().expect("lock").forget(job.message_id);
            return;
        }
        acked = true;
    }

    // Self-fencing: a process stalled for longer than the lease (SIGSTOP, a frozen
    // VM) has been presumed lost and a newer attempt may be running. It must not
    // finish its work when it wakes. The heartbeat task notes each tick; the work
    // is polled only while the last tick is recent, and a tick that finds a gap
    // longer than the lease fences the job for good.
    let lease = Duration::from_millis(job.lease_ms);
    let origin = std::time::Instant::now();
    let last_tick = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heartbeat = tokio::spawn({
        let broker = shared.broker.clone();
        let instance = shared.instance.clone();
        let key = shared.key.clone();
        let job = job.clone();
        let (last_tick, fenced) = (last_tick.clone(), fenced.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(job.heartbeat_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            // The publish runs beside the ticks: a broker that is away or blocked
            // delays heartbeats, and must not look like a stalled process.
            let mut sending = AbortOnDrop(None);
            loop {
                tick.tick().await;
                let now = origin.elapsed().as_millis() as u64;
                let previous = last_tick.swap(now, std::sync::atomic::Ordering::SeqCst);
                if job.lease_ms > 0 && now.saturating_sub(previous) > job.lease_ms {
                    fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                if sending.0.as_ref().is_some_and(|h| !h.is_finished()) {
                    continue;
                }
                let mut hb = StepResult::for_job(&job, &instance, ResultStatus::Heartbeat);
                key.sign(&mut hb);
                let broker = broker.clone();
                sending.0 = Some(tokio::spawn(async move {
                    let out = Outgoing {
                        message_id: Some(hb.message_id),
                        ..Default::default()
                    };
                    if let Err(e) = broker
                        .publish(RESULTS_EXCHANGE, &topology::result_key(hb.run_id), &hb.to_bytes(), &out)
                        .await
                    {
                        tracing::warn!(error = %e, "heartbeat not sent");
                    }
                }));
            }
        }
    });

    let ctx = ExecContext {
        cancel: token.clone(),
        daemon: shared.instance.clone(),
    };
    let budget = (job.deadline - Utc::now()).to_std().unwrap_or_default();
    let stalled = {
        let (last_tick, fenced) = (last_tick.clone(), fenced.clone());
        move || {
            if lease.is_zero() {
                return false;
            }
            let since = origin.elapsed().as_millis() as u64 - last_tick.load(std::sync::atomic::Ordering::SeqCst);
            fenced.load(std::sync::atomic::Ordering::SeqCst) || since > job.lease_ms
        }
    };
    let work = async {
        let fut = match job.kind {
            JobKind::Execute => binding.role.execute(&job, &ctx),
            JobKind::Compensate => binding.role.compensate(&job, &ctx),
        };
        let fut = Fenced {
            inner: fut,
            stalled: stalled.clone(),
        };
        // A panicking role must still produce a result, or the scheduler would
        // only learn of it when the lease expires.
        match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => Err(StepError::fatal(
                "lease_lost",
                format!(
                    "the daemon was stalled for longer than the {} ms lease; the scheduler has presumed this attempt lost, so its work was abandoned",
                    job.lease_ms
                ),
            )),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(StepError::fatal(
                    "role_panicked",
                    format!("the {} role panicked: {what}", job.role),
                ))
            }
        }
    };
    let labels = [
        ("zone", job.zone.as_str()),
        ("role", job.role.as_str()),
        ("kind", job.kind.as_str()),
    ];
    let m = metrics::global();
    m.add("baton_daemon_jobs_in_flight", "Jobs executing now", &labels, 1.0);
    let started = std::time::Instant::now();
    let running = async {
        tokio::select! {
            out = work => out,
            _ = token.cancelled() => Err(reason.get().cloned().unwrap_or_else(|| {
                StepError::retryable(HANDED_BACK, "daemon stopped before the job finished; handed back")
            })),
            _ = tokio::time::sleep(budget) => {
                // Whatever the role started beside its future (child processes,
                // tasks) hears it through `ctx.cancel`.
                token.cancel();
                Err(StepError::fatal("timeout", format!("deadline {} passed", job.deadline.to_rfc3339())))
            }
        }
    };
    tokio::pin!(running);
    let outcome = if acked {
        Some(running.await)
    } else {
        match tokio::time::timeout(quiet, &mut running).await {
            Ok(outcome) => Some(outcome),
            Err(_) => {
                // Still at work: say so, so the broker can forget the delivery and
                // the scheduler sees the attempt running. The work goes on
                // meanwhile (a slow broker must not pause it).
                let announce = report_started(shared, &job, &delivery);
                tokio::pin!(announce);
                let mut finished = None;
                acked = loop {
                    tokio::select! {
                        ok = &mut announce => break ok,
                        out = &mut running, if finished.is_none() => finished = Some(out),
                    }
                };
                match finished {
                    Some(outcome) => Some(outcome),
                    None if acked => Some(running.await),
                    // Nobody knows the job started, and its delivery was not
                    // settled: stop the work and give the job back, as a daemon
                    // that cannot report `started` before the work would.
                    None => None,
                }
            }
        }
    };
    heartbeat.abort();
    let Some(outcome) = outcome else {
        m.add("baton_daemon_jobs_in_flight", "Jobs executing now", &labels, -1.0);
        tracing::warn!(run_id = %job.run_id, step_id = %job.step_id, "cannot report started; the work is stopped and the job handed back");
        let _ = crate::amqp::nack(&delivery, true).await;
        shared.running.lock().expect("lock").remove(&key);
        shared.seen.lock().expect("lock").forget(job.message_id);
        return;
    };
    let current = tracing::Span::current();
    match &outcome {
        Ok(_) => current.record("baton.outcome", "succeeded"),
        Err(e) => current
            .record("baton.outcome", e.code.as_str())
            .record("otel.status_code", "ERROR"),
    };
    m.add("baton_daemon_jobs_in_flight", "Jobs executing now", &labels, -1.0);
    let result_label = match &outcome {
        Ok(_) => "succeeded",
        Err(e) if e.code == "cancelled" => "cancelled",
        Err(e) if e.code == HANDED_BACK => "handed_back",
        Err(_) => "failed",
    };
    m.inc(
        "baton_daemon_jobs_total",
        "Jobs finished, by zone, role, kind and outcome",
        &[labels[0], labels[1], labels[2], ("outcome", result_label)],
        1.0,
    );
    m.observe(
        "baton_daemon_job_duration_seconds",
        "Time from start to outcome of a job",
        &labels,
        started.elapsed().as_secs_f64(),
    );
    shared.running.lock().expect("lock").remove(&key);

    let (status, error, outputs) = match outcome {
        Ok(outputs) => (ResultStatus::Succeeded, None, outputs),
        Err(mut e) => {
            let outputs = std::mem::take(&mut e.outputs);
            (ResultStatus::Failed, Some(e), outputs)
        }
    };
    match &error {
        None => {
            tracing::info!(run_id = %job.run_id, step_id = %job.step_id, attempt = job.attempt, kind = %job.kind, "job succeeded")
        }
        Some(e) => {
            tracing::warn!(run_id = %job.run_id, step_id = %job.step_id, attempt = job.attempt, kind = %job.kind, code = %e.code, error = %e.message, "job failed")
        }
    }
    crate::failpoint::hit("daemon-after-work");
    if !acked {
        // A quick job is settled once its work is done and before its outcome
        // goes out. A daemon that dies between the two leaves an attempt that
        // the scheduler's lease catches, as one that dies after reporting
        // `started` does; a job the broker gave to another daemon after its
        // outcome was reported would run twice for nothing.
        if let Err(e) = crate::amqp::ack(&delivery).await {
            // The broker gives the job back (or has already): the duplicate check
            // here or the scheduler's fencing absorbs the copy.
            tracing::warn!(error = %e, "ack failed after the work");
        }
    }
    // Keep trying: the scheduler is waiting for exactly this message. If it
    // never arrives, the lease expires and the step's retry policy decides.
    let mut delay = Duration::from_millis(100);
    for _ in 0..20 {
        match report(shared, &job, status, error.clone(), outputs.clone(), Some(started_at)).await {
            Ok(()) => {
                crate::failpoint::hit("daemon-after-outcome");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "result not sent; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(run_id = %job.run_id, step_id = %job.step_id, "result could not be sent; the scheduler's lease will expire");
}

/// Reports `started` and then acknowledges the job's delivery; false if the
/// report could not be sent (the delivery is then left unsettled).
async fn report_started(shared: &Shared, job: &StepJob, delivery: &Delivery) -> bool {
    if let Err(e) = report(shared, job, ResultStatus::Started, None, Fields::new(), None).await {
        tracing::error!(error = %e, run_id = %job.run_id, step_id = %job.step_id, "cannot report started");
        return false;
    }
    if let Err(e) = crate::amqp::ack(delivery).await {
        // The started report is out; if the broker redelivers, the duplicate
        // check above or the scheduler's fencing absorbs it.
        tracing::warn!(error = %e, "ack failed after reporting started");
    }
    tracing::info!(run_id = %job.run_id, step_id = %job.step_id, attempt = job.attempt, kind = %job.kind, action = %job.action, "job started");
    true
}

/// How long a job waits for an unreachable ledger before it is handed back.
const LEDGER_PATIENCE: Duration = Duration::from_secs(30);

/// [`crate::ledger::Ledger::claim`], retried with backoff for a while.
async fn claim_patiently(
    ledger: &crate::ledger::Ledger,
    job: &StepJob,
    instance: &str,
) -> Result<bool, crate::ledger::LedgerError> {
    let start = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match ledger.claim(job, instance).await {
            Err(e) if start.elapsed() < LEDGER_PATIENCE => {
                tracing::warn!(error = %e, "replay ledger not reachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Tells the scheduler why a message was refused (a signed notice carrying the
/// refused bytes), then rejects it without requeue: the broker dead-letters it.
/// A daemon cannot publish to the dead-letter exchange itself, so no claim of
/// a daemon's travels unsigned (docs/decisions.md).
async fn refuse(shared: &Shared, delivery: &Delivery, queue: &str, zone: &str, role: &str, reason: &str) {
    tracing::warn!(queue, reason, "message refused; nothing executed");
    let why = reason.split(':').next().unwrap_or("refused");
    metrics::global().inc(
        "baton_daemon_refused_messages_total",
        "Messages refused and dead-lettered, by queue and reason",
        &[("queue", queue), ("reason", why)],
        1.0,
    );
    let mut notice = Refusal {
        v: PROTOCOL_VERSION,
        message_id: Uuid::new_v4(),
        daemon: shared.instance.clone(),
        zone: zone.to_owned(),
        role: role.to_owned(),
        queue: queue.to_owned(),
        reason: reason.to_owned(),
        refused_message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
        refused_body: (delivery.data.len() <= Refusal::MAX_BODY).then(|| hex::encode(&delivery.data)),
        at: Utc::now(),
        signature: None,
    };
    shared.key.sign(&mut notice);
    let out = Outgoing {
        message_id: Some(notice.message_id),
        ..Default::default()
    };
    if let Err(e) = shared
        .broker
        .publish(RESULTS_EXCHANGE, NOTICES_KEY, &notice.to_bytes(), &out)
        .await
    {
        tracing::warn!(error = %e, "refusal notice not sent; the scheduler records the dead letter without its reason");
    }
    if let Err(e) = crate::amqp::nack(delivery, false).await {
        tracing::warn!(error = %e, "cannot reject the refused message; it returns with the connection");
    }
}

async fn report(
    shared: &Shared,
    job: &StepJob,
    status: ResultStatus,
    error: Option<StepError>,
    outputs: Fields,
    started_at: Option<chrono::DateTime<Utc>>,
) -> Result<(), AmqpError> {
    let mut result = StepResult::for_job(job, &shared.instance, status);
    result.error = error;
    result.outputs = outputs;
    result.started_at = started_at;
    shared.key.sign(&mut result);
    let out = Outgoing {
        message_id: Some(result.message_id),
        ..Default::default()
    };
    shared
        .broker
        .publish(
            RESULTS_EXCHANGE,
            &topology::result_key(result.run_id),
            &result.to_bytes(),
            &out,
        )
        .await
}

/// A spawned task that is aborted when its owner goes away.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// A role's work, polled only while its daemon has not stalled past the lease.
struct Fenced<F, S> {
    inner: F,
    stalled: S,
}

impl<F: Future + Unpin, S: Fn() -> bool + Unpin> Future for Fenced<F, S> {
    type Output = Option<F::Output>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        if (self.stalled)() {
            return std::task::Poll::Ready(None);
        }
        std::pin::Pin::new(&mut self.inner).poll(cx).map(Some)
    }
}

mod http {
    //! `/healthz`, `/readyz` and `/metrics` for a daemon.

    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::get;
    use tokio_util::sync::CancellationToken;

    use crate::amqp::Broker;

    pub async fn serve(listener: tokio::net::TcpListener, broker: Broker, stopping: CancellationToken) {
        let ready_stop = stopping.clone();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || {
                    let (broker, stop) = (broker.clone(), ready_stop.clone());
                    async move {
                        // Not ready while disconnected or draining: take no new work here.
                        if broker.is_connected() && !stop.is_cancelled() {
                            (StatusCode::OK, "ready")
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                        }
                    }
                }),
            )
            .route("/metrics", get(|| async { crate::metrics::global().render() }));
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "daemon http server stopped");
        }
    }
}
