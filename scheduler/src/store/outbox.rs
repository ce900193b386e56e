//! The outbox: rows the relay publishes, marks sent, and jobs nobody can receive.

use super::*;

impl Store {
    /// Marks published outbox rows as sent.
    ///
    /// Committed without waiting for the WAL flush: a mark lost in a database
    /// crash only makes the sweeper publish the row again, which receivers
    /// absorb (message ids, attempt fencing). One round trip: the setting is
    /// made by the statement itself and lasts for its own transaction.
    pub async fn mark_sent(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "update outbox set sent_at = now()
              where id = any($1) and set_config('synchronous_commit', 'off', true) = 'off'",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A job came back unroutable: mark it and fail its attempt.
    pub async fn job_unroutable(&self, msg: &OutboxMsg, message: &str) -> Result<Vec<OutboxMsg>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        sqlx::query("update outbox set sent_at = now(), error = $2 where id = $1")
            .bind(msg.id)
            .bind(message)
            .execute(&mut *tx)
            .await?;
        if let (Some(run), Some(step), Some(attempt)) = (msg.run_id, &msg.step_id, msg.attempt) {
            let now = Utc::now();
            let settings = self.settings.clone();
            self.transition(&mut tx, run, &mut out, |state, fx| {
                state.job_unroutable(step, attempt, message.to_owned(), now, &settings, fx);
                Ok(())
            })
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Takes over unsent outbox rows whose claim lapsed (their publisher died or failed).
    pub async fn claim_unsent(&self, limit: i64) -> Result<Vec<OutboxMsg>, StoreError> {
        let claim = self.claim.as_millis() as f64 / 1000.0;
        let mut msgs: Vec<OutboxMsg> = sqlx::query_as(
            "update outbox set claimed_until = now() + make_interval(secs => $2)
             where id in (select id from outbox where sent_at is null and claimed_until < now()
                          order by id limit $1 for update skip locked)
             returning id, exchange, routing_key, message_id, body, best_effort, run_id, step_id, attempt",
        )
        .bind(limit)
        .bind(claim)
        .fetch_all(&self.pool)
        .await?;
        msgs.sort_by_key(|m| m.id);
        Ok(msgs)
    }
}
