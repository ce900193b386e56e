//! The audit log: append-only (the database refuses UPDATE, DELETE and
//! TRUNCATE) and hash-chained, so an edit made around the triggers is found.
//!
//! Each run's rows form one chain and rows without a run form the global chain.
//! Chaining per run keeps the chain head under the lock a transition already
//! holds, instead of serialising every transition of every run on one global
//! head. A row's hash covers the previous row's hash and all of its own fields,
//! so changing, removing or reordering a row breaks the link at that row or the
//! next. (Removing the newest rows of a chain is only detectable against a copy
//! of the heads kept elsewhere; `baton audit verify --json` prints them.)

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

/// The `prev_hash` of the first row of every chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry before it is chained.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub run_id: Option<Uuid>,
    pub step_id: Option<&'a str>,
    pub attempt: Option<i32>,
    pub at: DateTime<Utc>,
    pub actor: &'a str,
    pub kind: &'a str,
    pub detail: &'a Value,
}

/// SHA-256 over the previous hash and every field, in a fixed unambiguous layout.
pub fn chain_hash(prev: &str, e: &Entry<'_>) -> String {
    let mut h = Sha256::new();
    let field = |h: &mut Sha256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(&mut h, prev.as_bytes());
    field(&mut h, e.run_id.map(|r| r.to_string()).unwrap_or_default().as_bytes());
    field(&mut h, e.step_id.unwrap_or_default().as_bytes());
    field(&mut h, e.attempt.map(|a| a.to_string()).unwrap_or_default().as_bytes());
    field(&mut h, e.at.timestamp_micros().to_string().as_bytes());
    field(&mut h, e.actor.as_bytes());
    field(&mut h, e.kind.as_bytes());
    // serde_json maps are sorted, and jsonb gives back the same value, so the
    // re-serialised detail is stable between writing and verifying.
    field(&mut h, e.detail.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// Appends an entry to its chain inside the caller's transaction.
pub async fn append(tx: &mut Transaction<'_, Postgres>, e: Entry<'_>) -> Result<(), sqlx::Error> {
    append_many(tx, vec![e]).await
}

/// Appends entries in order: one lock and one head lookup per chain, and one
/// insert for all of them (a transition writes several rows; this keeps it to
/// a few round trips).
pub async fn append_many(tx: &mut Transaction<'_, Postgres>, entries: Vec<Entry<'_>>) -> Result<(), sqlx::Error> {
    link_and_insert(tx, entries, true).await
}

/// [`append_many`] for the rows of a run inserted by this transaction: its
/// chain is locked and its head read as for any run, but the run's version
/// is not bumped, since no transition can have read a run not yet committed.
pub async fn append_to_new_run(tx: &mut Transaction<'_, Postgres>, entries: Vec<Entry<'_>>) -> Result<(), sqlx::Error> {
    link_and_insert(tx, entries, false).await
}

async fn link_and_insert(
    tx: &mut Transaction<'_, Postgres>,
    entries: Vec<Entry<'_>>,
    bump: bool,
) -> Result<(), sqlx::Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let rows = link_onto_heads(tx, entries, None, bump).await?;
    rows.insert(tx).await
}

/// Audit rows with their hashes computed, ready to insert (alone, or as part of
/// a larger statement) in the transaction that holds their chains' locks.
#[derive(Debug, Default)]
pub struct Rows {
    pub runs: Vec<Option<Uuid>>,
    pub steps: Vec<Option<String>>,
    pub attempts: Vec<Option<i32>>,
    pub ats: Vec<DateTime<Utc>>,
    pub actors: Vec<String>,
    pub kinds: Vec<String>,
    pub details: Vec<Json<Value>>,
    pub prevs: Vec<String>,
    pub hashes: Vec<String>,
}

/// Locks the chains `entries` extend (until the transaction ends), reads their
/// heads and links the entries onto them.
///
/// `known`: the head of one run's chain that the caller read while holding that
/// chain's lock in this transaction (its lock and head are not read again).
pub async fn chain(
    tx: &mut Transaction<'_, Postgres>,
    entries: Vec<Entry<'_>>,
    known: Option<(Uuid, String)>,
) -> Result<Rows, sqlx::Error> {
    link_onto_heads(tx, entries, known, true).await
}

/// [`chain`]; `bump`: whether appending to a run's chain bumps its version.
// The head lookup is async, so the map entry API cannot do it.
#[allow(clippy::map_entry)]
async fn link_onto_heads(
    tx: &mut Transaction<'_, Postgres>,
    mut entries: Vec<Entry<'_>>,
    known: Option<(Uuid, String)>,
    bump: bool,
) -> Result<Rows, sqlx::Error> {
    let mut heads: HashMap<Option<Uuid>, String> = known.into_iter().map(|(r, h)| (Some(r), h)).collect();
    let mut rows = Rows::default();
    for e in &mut entries {
        // PostgreSQL keeps microseconds; hash exactly what will be stored.
        e.at = DateTime::from_timestamp_micros(e.at.timestamp_micros()).unwrap_or(e.at);
        if !heads.contains_key(&e.run_id) {
            let chain_key = match e.run_id {
                Some(r) => format!("audit/{r}"),
                None => "audit/global".to_owned(),
            };
            sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(&chain_key)
                .execute(&mut **tx)
                .await?;
            let head: Option<String> = match e.run_id {
                Some(r) => {
                    // Appending to a run's chain is a change of the run: a transition
                    // computed from an unlocked read must notice it (store.rs,
                    // optimistic apply). The bump waits for such a transition to
                    // commit, and the head is read after it, in a new snapshot.
                    if bump {
                        sqlx::query("update runs set version = version + 1 where id = $1")
                            .bind(r)
                            .execute(&mut **tx)
                            .await?;
                    }
                    sqlx::query_scalar("select hash from audit where run_id = $1 order by id desc limit 1")
                        .bind(r)
                        .fetch_optional(&mut **tx)
                        .await?
                }
                None => {
                    sqlx::query_scalar("select hash from audit where run_id is null order by id desc limit 1")
                        .fetch_optional(&mut **tx)
                        .await?
                }
            };
            heads.insert(e.run_id, head.unwrap_or_else(|| GENESIS.to_owned()));
        }
        let head = heads.get_mut(&e.run_id).expect("head read above");
        *head = rows.push(std::mem::take(head), e);
    }
    Ok(rows)
}

/// Links entries of one run's chain onto `head`, a head read in the same snapshot
/// as the run's version; the statement that inserts them must check both.
pub fn link(head: String, mut entries: Vec<Entry<'_>>) -> Rows {
    let mut rows = Rows::default();
    let mut head = head;
    for e in &mut entries {
        e.at = DateTime::from_timestamp_micros(e.at.timestamp_micros()).unwrap_or(e.at);
        head = rows.push(head, e);
    }
    rows
}

impl Rows {
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Appends `other`'s rows after these.
    pub fn extend(&mut self, other: &Rows) {
        self.runs.extend_from_slice(&other.runs);
        self.steps.extend_from_slice(&other.steps);
        self.attempts.extend_from_slice(&other.attempts);
        self.ats.extend_from_slice(&other.ats);
        self.actors.extend_from_slice(&other.actors);
        self.kinds.extend_from_slice(&other.kinds);
        self.details.extend_from_slice(&other.details);
        self.prevs.extend_from_slice(&other.prevs);
        self.hashes.extend_from_slice(&other.hashes);
    }

    /// Adds `e` linked onto `prev`; returns its hash, the chain's new head.
    fn push(&mut self, prev: String, e: &Entry<'_>) -> String {
        let hash = chain_hash(&prev, e);
        self.runs.push(e.run_id);
        self.steps.push(e.step_id.map(str::to_owned));
        self.attempts.push(e.attempt);
        self.ats.push(e.at);
        self.actors.push(e.actor.to_owned());
        self.kinds.push(e.kind.to_owned());
        self.details.push(Json(e.detail.clone()));
        self.prevs.push(prev);
        self.hashes.push(hash.clone());
        hash
    }

    async fn insert(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        sqlx::query(
        "insert into audit (run_id, step_id, attempt, at, actor, kind, detail, prev_hash, hash)
         select a, b, c, d, e, f, g, h, i from unnest($1::uuid[], $2::text[], $3::int[], $4::timestamptz[], $5::text[], $6::text[],
                              $7::jsonb[], $8::text[], $9::text[]) with ordinality as t(a, b, c, d, e, f, g, h, i, n)
         order by n",
    )
    .bind(&self.runs)
    .bind(&self.steps)
    .bind(&self.attempts)
    .bind(&self.ats)
    .bind(&self.actors)
    .bind(&self.kinds)
    .bind(&self.details)
    .bind(&self.prevs)
    .bind(&self.hashes)
    .execute(&mut **tx)
    .await?;
        Ok(())
    }
}

/// The first row where the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    pub id: i64,
    pub run_id: Option<Uuid>,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: u64,
    pub chains: usize,
    pub first_broken: Option<Broken>,
    /// The newest hash of every chain, to keep elsewhere and compare later.
    pub heads: HashMap<String, String>,
}

/// Walks every chain in order and reports the first broken link.
pub async fn verify(pool: &PgPool) -> Result<Report, sqlx::Error> {
    let rows = sqlx::query(
        "select id, run_id, step_id, attempt, at, actor, kind, detail, prev_hash, hash from audit order by id",
    )
    .fetch_all(pool)
    .await?;
    let mut heads: HashMap<Option<Uuid>, (i64, String)> = HashMap::new();
    let mut report = Report {
        rows: 0,
        chains: 0,
        first_broken: None,
        heads: HashMap::new(),
    };
    for r in rows {
        report.rows += 1;
        let id: i64 = r.try_get("id")?;
        let run_id: Option<Uuid> = r.try_get("run_id")?;
        let step_id: Option<String> = r.try_get("step_id")?;
        let actor: String = r.try_get("actor")?;
        let kind: String = r.try_get("kind")?;
        let Json(detail): Json<Value> = r.try_get("detail")?;
        let prev_hash: String = r.try_get("prev_hash")?;
        let hash: String = r.try_get("hash")?;
        let entry = Entry {
            run_id,
            step_id: step_id.as_deref(),
            attempt: r.try_get("attempt")?,
            at: r.try_get("at")?,
            actor: &actor,
            kind: &kind,
            detail: &detail,
        };
        let (expected_prev, prev_id) = match heads.get(&run_id) {
            Some((pid, h)) => (h.clone(), Some(*pid)),
            None => (GENESIS.to_owned(), None),
        };
        let problem = if prev_hash != expected_prev {
            Some(match prev_id {
                Some(p) => format!("prev_hash does not match row {p}, the previous row of its chain (a row was removed or reordered)"),
                None => "prev_hash is not the genesis hash, yet this is the first row of its chain (earlier rows were removed)".to_owned(),
            })
        } else if chain_hash(&prev_hash, &entry) != hash {
            Some("contents do not match the row's hash (the row was modified)".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem
            && report.first_broken.is_none()
        {
            report.first_broken = Some(Broken { id, run_id, problem });
        }
        heads.insert(run_id, (id, hash));
    }
    report.chains = heads.len();
    report.heads = heads
        .into_iter()
        .map(|(k, (_, h))| (k.map(|r| r.to_string()).unwrap_or_else(|| "global".to_owned()), h))
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash() {
        let detail = serde_json::json!({"a": 1});
        let base = Entry {
            run_id: Some(Uuid::nil()),
            step_id: Some("build"),
            attempt: Some(1),
            at: DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap(),
            actor: "scheduler",
            kind: "dispatched",
            detail: &detail,
        };
        let h = chain_hash(GENESIS, &base);
        let other = serde_json::json!({"a": 2});
        let variants = [
            Entry {
                step_id: Some("buil"),
                ..base.clone()
            },
            Entry {
                attempt: Some(2),
                ..base.clone()
            },
            Entry {
                actor: "cli",
                ..base.clone()
            },
            Entry {
                kind: "x",
                ..base.clone()
            },
            Entry {
                detail: &other,
                ..base.clone()
            },
            Entry {
                run_id: None,
                ..base.clone()
            },
            Entry {
                at: base.at + chrono::Duration::microseconds(1),
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(chain_hash(GENESIS, &v), h, "{v:?}");
        }
        assert_ne!(chain_hash(&"1".repeat(64), &base), h);
        assert_eq!(chain_hash(GENESIS, &base), h);
    }
}
