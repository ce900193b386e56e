//! Replay memory shared by every replica of a zone's daemons.
//!
//! A signed job is valid until its `not_after`; someone with publish rights on
//! the jobs exchange who copies one could send it again within that window.
//! Each daemon remembers the message ids it took, but a second replica, or the
//! same daemon after a restart, would not. With `daemon.ledger_url` set, the
//! first delivery of every job is claimed in a PostgreSQL table
//! (`baton_job_ledger`, created on first use) that all replicas share, so a
//! replay is refused by every replica and after restarts. Deliveries the
//! broker marks `redelivered` (a lost connection, a job handed back) are the
//! same message again, not a replay, and are not checked. Rows are removed an
//! hour after their job's `not_after`: by then a copy is refused as expired.
//! docs/decisions.md, "Replay memory lives in PostgreSQL", says why here.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::OnceCell;

use crate::protocol::StepJob;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("daemon.ledger_url is not a PostgreSQL URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("replay ledger: {0}")]
    Db(#[from] sqlx::Error),
}

/// The replay ledger of one daemon process.
pub struct Ledger {
    pool: PgPool,
    ready: OnceCell<()>,
    claims: std::sync::atomic::AtomicU64,
}

/// Claims between two prunes of old rows.
const PRUNE_EVERY: u64 = 1000;

impl Ledger {
    /// A ledger on `url`; connects when first used, so a database that is down
    /// at start delays jobs instead of the daemon.
    pub fn new(url: &str) -> Result<Self, LedgerError> {
        let opts: PgConnectOptions = url.parse().map_err(LedgerError::Url)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(opts);
        Ok(Self {
            pool,
            ready: OnceCell::new(),
            claims: std::sync::atomic::AtomicU64::new(0),
        })
    }

    async fn ensure_table(&self) -> Result<(), LedgerError> {
        self.ready
            .get_or_try_init(|| async {
                let mut tx = self.pool.begin().await?;
                // Replicas starting together would race on the catalogue.
                sqlx::query("select pg_advisory_xact_lock(hashtextextended('baton_job_ledger', 0))")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "create table if not exists baton_job_ledger (
                        message_id uuid primary key,
                        zone text not null,
                        role text not null,
                        run_id uuid not null,
                        step_id text not null,
                        attempt integer not null,
                        instance text not null,
                        not_after timestamptz not null,
                        received_at timestamptz not null default now())",
                )
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                self.prune().await?;
                Ok::<(), LedgerError>(())
            })
            .await?;
        Ok(())
    }

    /// Claims a job's first delivery: true if no replica received it before,
    /// false if one did (a replay).
    pub async fn claim(&self, job: &StepJob, instance: &str) -> Result<bool, LedgerError> {
        self.ensure_table().await?;
        let inserted = sqlx::query(
            "insert into baton_job_ledger (message_id, zone, role, run_id, step_id, attempt, instance, not_after)
             values ($1, $2, $3, $4, $5, $6, $7, $8) on conflict (message_id) do nothing",
        )
        .bind(job.message_id)
        .bind(&job.zone)
        .bind(&job.role)
        .bind(job.run_id)
        .bind(&job.step_id)
        .bind(job.attempt as i32)
        .bind(instance)
        .bind(job.not_after)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if self.claims.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune().await?;
        }
        Ok(inserted == 1)
    }

    /// Removes what can no longer be replayed (an hour past its `not_after`).
    pub async fn prune(&self) -> Result<u64, LedgerError> {
        Ok(
            sqlx::query("delete from baton_job_ledger where not_after < now() - interval '1 hour'")
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
