//! The scheduler process: starts the consumers (`consumers`), the outbox relay
//! and its sweeper (`relay`), the timers, replica membership, the API and the
//! trace exporter, and stops them together.
//!
//! All of them are loops over PostgreSQL and RabbitMQ with no state of their
//! own, so any replica can die at any moment and another picks up the work.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use baton_shared::amqp::{AmqpError, Broker};
use baton_shared::signing::Trusted;
use baton_shared::topology::{self, CONTROL_EXCHANGE};
use tokio_util::sync::CancellationToken;

use crate::affinity::Affinity;
use crate::config::Config;
use crate::engine::TimerKind;
use crate::pipeline::Pipeline;
use crate::store::{self, Store};

use crate::consumers;
use crate::relay::{self, Relay};
use crate::store::patiently;

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
    let (relay, rx) = Relay::new();
    let pipeline = Arc::new(pipeline);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(relay::relay_loop(store.clone(), broker.clone(), relay.clone(), key, rx));
    tasks.spawn(relay::sweep_loop(
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
    tasks.spawn(consumers::merge_event_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        pipeline.clone(),
        config.scheduler.prefetch,
        stop.clone(),
    ));
    tasks.spawn(consumers::dead_letter_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        own.clone(),
        config.scheduler.prefetch,
        stop.clone(),
    ));
    tasks.spawn(consumers::notice_loop(
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
    tasks.spawn(consumers::result_loop(
        store.clone(),
        broker.clone(),
        relay.clone(),
        trusted,
        consumers::result_deliveries(&broker, &affinity, config.scheduler.prefetch, &stop),
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
