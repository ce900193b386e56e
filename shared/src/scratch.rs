//! Scratch databases that outlive no one: the process that creates one holds
//! a session advisory lock named after it (on the admin connection's
//! database) from before it creates it until it has dropped it. A daemon killed
//! mid-verification leaves its scratch database behind but not its lock (the
//! server releases a session's locks when the session dies), so [`sweep`],
//! which every daemon runs at start and periodically, drops exactly the
//! scratch databases whose lock nobody holds, never one a live daemon uses.

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

/// The advisory lock key of scratch database `name`.
const KEY: &str = "select hashtextextended('baton-scratch/' || $1, 0)";

/// A scratch database's lock, held by its creator on a connection of its own.
pub struct Held {
    conn: PgConnection,
    name: String,
}

/// Takes the lock of scratch database `name` on `conn` (before the database
/// is created), waiting if someone holds it.
pub async fn hold(mut conn: PgConnection, name: &str) -> Result<Held, sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!("select pg_advisory_lock(({KEY}))")))
        .bind(name)
        .execute(&mut conn)
        .await?;
    Ok(Held {
        conn,
        name: name.to_owned(),
    })
}

impl Held {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection holding the lock.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Releases the lock (after the database is dropped).
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// A name for a new scratch database: `<prefix><UTC time>_<random>`, so an
/// operator sees whose kind and when; within PostgreSQL's 63 characters.
pub fn name(prefix: &str) -> String {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
    let random = uuid::Uuid::new_v4().simple().to_string();
    let mut n = format!("{prefix}{stamp}_{random}");
    n.truncate(63);
    n
}

/// Drops every database whose name starts with `prefix` and whose lock
/// nobody holds (its creator died); returns their names.
pub async fn sweep(conn: &mut PgConnection, prefix: &str) -> Result<Vec<String>, sqlx::Error> {
    let names: Vec<String> =
        sqlx::query_scalar("select datname::text from pg_database where left(datname, length($1)) = $1 order by 1")
            .bind(prefix)
            .fetch_all(&mut *conn)
            .await?;
    let mut dropped = Vec::new();
    for name in names {
        let free: bool = sqlx::query_scalar(AssertSqlSafe(format!("select pg_try_advisory_lock(({KEY}))")))
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        if !free {
            continue;
        }
        let result = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            name.replace('"', "\"\"")
        )))
        .execute(&mut *conn)
        .await;
        sqlx::query(AssertSqlSafe(format!("select pg_advisory_unlock(({KEY}))")))
            .bind(&name)
            .execute(&mut *conn)
            .await?;
        result?;
        tracing::info!(database = %name, "leftover scratch database of a daemon that died dropped");
        dropped.push(name);
    }
    Ok(dropped)
}

/// How often a daemon looks for leftover scratch databases after its start.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs `sweep` at once and then every [`SWEEP_EVERY`] until `stop`; a failed
/// sweep is logged and tried again next time.
pub async fn sweep_loop<F, Fut, E>(mut sweep: F, stop: tokio_util::sync::CancellationToken)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, E>>,
    E: std::fmt::Display,
{
    loop {
        match sweep().await {
            Ok(dropped) if !dropped.is_empty() => {
                tracing::info!(dropped = dropped.len(), "leftover scratch databases dropped")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot sweep leftover scratch databases"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}
