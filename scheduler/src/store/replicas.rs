//! Scheduler replicas: membership heartbeats, joining and leaving.

use super::*;

impl Store {
    /// Whether another scheduler replica was alive a moment ago (its
    /// membership heartbeat is at most `within` old): it was consuming
    /// results, so no heartbeat waited unread and no lease needs renewing.
    pub async fn another_replica_alive(&self, within: Duration) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "select exists (select 1 from scheduler_replicas
                             where seen_at > now() - $1 * interval '1 millisecond')",
        )
        .bind(within.as_millis() as i64)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Records that replica `id` is alive and returns the replicas seen within
    /// `live_for`, in id order (always including `id`). Rows silent for ten
    /// times as long are removed.
    pub async fn replica_heartbeat(&self, id: Uuid, live_for: Duration) -> Result<Vec<Uuid>, StoreError> {
        let live_ms = live_for.as_millis() as i64;
        Ok(sqlx::query_scalar(
            "with beat as (
                 insert into scheduler_replicas (id, instance) values ($1, $3)
                 on conflict (id) do update set seen_at = now()
             ), gone as (
                 delete from scheduler_replicas
                  where id <> $1 and seen_at < now() - $2 * 10 * interval '1 millisecond'
             )
             select id from scheduler_replicas where id <> $1 and seen_at > now() - $2 * interval '1 millisecond'
             union select $1
             order by 1",
        )
        .bind(id)
        .bind(live_ms)
        .bind(&self.actor)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Removes replica `id` (a clean shutdown), and tells the others.
    pub async fn replica_leave(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("delete from scheduler_replicas where id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.replicas_changed().await
    }

    /// Wakes every replica's membership loop (`LISTEN` on [`REPLICAS_CHANNEL`]),
    /// so a replica joining or leaving is noticed at once, not at the next beat.
    pub async fn replicas_changed(&self) -> Result<(), StoreError> {
        sqlx::query("select pg_notify($1, '')")
            .bind(REPLICAS_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
