//! Timers: leases, timeouts, backoffs, gate holds and window closings that come due.

use super::*;

impl Store {
    /// Timers due now, oldest first (candidates; each is re-checked under the run lock).
    pub async fn due_timers(&self, limit: i64) -> Result<Vec<DueTimer>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            run_id: Uuid,
            step_id: String,
            kind: String,
            attempt: i32,
            due_at: DateTime<Utc>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "select run_id, step_id, kind, attempt, due_at from timers where due_at <= now() order by due_at limit $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DueTimer {
                    kind: parse(r.run_id, &r.kind)?,
                    run_id: r.run_id,
                    step_id: r.step_id,
                    attempt: r.attempt,
                    due_at: r.due_at,
                })
            })
            .collect()
    }

    /// When the next timer is due, if any.
    pub async fn next_timer_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar("select min(due_at) from timers")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn fire_timer(&self, t: &DueTimer) -> Result<Vec<OutboxMsg>, StoreError> {
        self.retrying(|| self.try_fire_timer(t)).await
    }

    pub(super) async fn try_fire_timer(&self, t: &DueTimer) -> Result<Vec<OutboxMsg>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        // Lock order is always run row first, then timers: every timer write happens
        // under the run lock, so after taking it the timer row can be trusted.
        let locked: Option<Uuid> = sqlx::query_scalar("select id from runs where id = $1 for update")
            .bind(t.run_id)
            .fetch_optional(&mut *tx)
            .await?;
        if locked.is_none() {
            return Ok(out);
        }
        let still_due = sqlx::query(
            "delete from timers where run_id = $1 and step_id = $2 and kind = $3 and attempt = $4 and due_at <= now()",
        )
        .bind(t.run_id)
        .bind(&t.step_id)
        .bind(t.kind.as_str())
        .bind(t.attempt)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if still_due {
            let now = Utc::now();
            let settings = self.settings.clone();
            self.transition(&mut tx, t.run_id, &mut out, |state, fx| {
                state.fire_timer(&t.step_id, t.kind, t.attempt, now, &settings, fx);
                Ok(())
            })
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// After a restart, running attempts get one more lease period: their heartbeats
    /// may be waiting unread in `baton.results` while no scheduler was consuming.
    /// Each lease is renewed at most once between two of its attempt's
    /// heartbeats, so replicas restarting in a loop cannot keep a dead
    /// daemon's attempt alive (docs/decisions.md, "Leases after a scheduler restart").
    pub async fn renew_leases(&self) -> Result<u64, StoreError> {
        let lease = self.settings.lease.as_millis() as f64 / 1000.0;
        Ok(sqlx::query(
            "update timers set due_at = greatest(due_at, now() + make_interval(secs => $1)), renewed = true
              where kind = 'lease' and not renewed",
        )
        .bind(lease)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Makes every gate hold that waits for a time (a maintenance window, the
    /// staging soak) due now, so its gates are evaluated again under this
    /// process's configuration: a window added or a soak shortened before a
    /// restart applies to runs already waiting. Returns how many were due later.
    pub async fn recheck_timed_holds(&self) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("update timers set due_at = now() where kind = 'gate' and due_at > now()")
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
