//! The outbox relay: publishes what committed transitions wrote to the
//! outbox (jobs, cancels), signed, with publisher confirms, then marks the rows
//! sent; and the sweeper that republishes rows a crashed replica left unsent
//! (docs/architecture.md, Durability and crash recovery).

use std::sync::Arc;
use std::time::Duration;

use baton_shared::amqp::{AmqpError, Broker, Outgoing};
use baton_shared::protocol::{CancelJob, Message, StepJob};
use baton_shared::signing::Keypair;
use baton_shared::topology::{CONTROL_EXCHANGE, JOBS_EXCHANGE};
use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{OutboxMsg, Store};

use crate::store::patiently;

/// Hands committed outbox rows to the publishing task.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::UnboundedSender<Vec<OutboxMsg>>,
}

impl Relay {
    /// A relay and the receiving end [`relay_loop`] publishes from.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Vec<OutboxMsg>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    pub fn send(&self, msgs: Vec<OutboxMsg>) {
        if !msgs.is_empty() {
            // The receiver lives as long as the service; if it is gone the rows stay
            // in the outbox and the next replica's sweeper publishes them.
            let _ = self.tx.send(msgs);
        }
    }
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

pub(crate) async fn relay_loop(
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

pub(crate) async fn sweep_loop(
    store: Store,
    relay: Relay,
    claim: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
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
