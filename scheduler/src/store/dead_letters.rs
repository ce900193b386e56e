//! Dead letters and refusals: recorded, attributed to the attempt they end, listed and replayed.

use super::*;

/// A dead letter as the scheduler takes it off the queue.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub message_id: Option<String>,
    pub origin: String,
    pub exchange: String,
    pub routing_key: String,
    pub reason: String,
    pub headers: Value,
    pub body: Vec<u8>,
    /// The scheduler can attribute it (its own refusal, or [`Self::job`]).
    pub verified: bool,
    /// A job this scheduler signed, dead-lettered by the broker from that
    /// job's own queue: the only kind linked to a run.
    pub job: Option<baton_shared::protocol::StepJob>,
    /// The broker gave up on it after its delivery limit.
    pub delivery_limit: bool,
    /// The broker delivered it before (not acknowledged then).
    pub redelivered: bool,
}

/// A dead letter as `baton dlq list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DeadLetterView {
    pub id: i64,
    pub message_id: Option<String>,
    pub origin: String,
    pub exchange: String,
    pub routing_key: String,
    pub reason: String,
    /// The reason in the refusing daemon's signed notice, when one came.
    pub refused_for: Option<String>,
    /// Whether the scheduler could attribute it; an unverified one is listed
    /// but linked to no run and never replayed.
    pub verified: bool,
    /// How many times it arrived.
    pub arrivals: i32,
    pub run_id: Option<Uuid>,
    pub received_at: DateTime<Utc>,
    pub last_arrived_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replayed_by: Option<String>,
    /// The body as text (lossy), cut at 2 KiB.
    pub body: String,
    pub bytes: usize,
}

/// Dead letters, newest first: not yet replayed unless `all`.
pub async fn list_dead_letters(pool: &PgPool, all: bool, limit: i64) -> Result<Vec<DeadLetterView>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        message_id: Option<String>,
        origin: String,
        exchange: String,
        routing_key: String,
        reason: String,
        refused_for: Option<String>,
        verified: bool,
        arrivals: i32,
        run_id: Option<Uuid>,
        received_at: DateTime<Utc>,
        last_arrived_at: DateTime<Utc>,
        replayed_at: Option<DateTime<Utc>>,
        replayed_by: Option<String>,
        body: Vec<u8>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "select id, message_id, origin, exchange, routing_key, reason, refused_for, verified, arrivals, run_id,
                received_at, last_arrived_at, replayed_at, replayed_by, body
           from dead_letters where $1 or replayed_at is null order by id desc limit $2",
    )
    .bind(all)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DeadLetterView {
            id: r.id,
            message_id: r.message_id,
            origin: r.origin,
            exchange: r.exchange,
            routing_key: r.routing_key,
            reason: r.reason,
            refused_for: r.refused_for,
            verified: r.verified,
            arrivals: r.arrivals,
            run_id: r.run_id,
            received_at: r.received_at,
            last_arrived_at: r.last_arrived_at,
            replayed_at: r.replayed_at,
            replayed_by: r.replayed_by,
            body: String::from_utf8_lossy(&r.body[..r.body.len().min(2048)]).into_owned(),
            bytes: r.body.len(),
        })
        .collect())
}

/// What replaying dead letter `id` publishes: exchange, routing key, message id and body.
pub async fn dead_letter_for_replay(
    pool: &PgPool,
    id: i64,
) -> Result<(String, String, Option<String>, Vec<u8>), StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        exchange: String,
        routing_key: String,
        message_id: Option<String>,
        body: Vec<u8>,
        verified: bool,
        why: String,
    }
    let r: Row = sqlx::query_as(
        "select exchange, routing_key, message_id, body, verified, coalesce(refused_for, reason) as why
           from dead_letters where id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or(StoreError::NoDeadLetter(id))?;
    if !r.verified {
        return Err(StoreError::UnverifiedDeadLetter(id));
    }
    // Refused for what its bytes are: the same bytes would be refused again.
    if ["malformed", "unauthentic", "invalid"]
        .iter()
        .any(|p| r.why.starts_with(p))
    {
        return Err(StoreError::WouldBeRefused { id, reason: r.why });
    }
    Ok((r.exchange, r.routing_key, r.message_id, r.body))
}

impl Store {
    /// Records a dead letter's arrival (every arrival counts; a redelivery of
    /// the same delivery does not). Only an attributable one ([`NewDeadLetter::job`]:
    /// a job this scheduler signed, dead-lettered by the broker from its own
    /// queue) is linked to its run, and only one the broker gave up on after its
    /// delivery limit, whose attempt no daemon started, fails that attempt: a
    /// poison message that crashed every daemon it reached. Anything else is
    /// kept apart from run history, in the global audit chain, and changes no
    /// run (docs/decisions.md, "Only attributable refusals end an attempt").
    pub async fn record_dead_letter(&self, dl: &NewDeadLetter) -> Result<(Option<i64>, Vec<OutboxMsg>), StoreError> {
        // Retried on a deadlock, as [`Self::mark_replayed`] explains.
        self.retrying(|| self.try_record_dead_letter(dl)).await
    }

    pub(super) async fn try_record_dead_letter(
        &self,
        dl: &NewDeadLetter,
    ) -> Result<(Option<i64>, Vec<OutboxMsg>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        if let Some(mid) = &dl.message_id {
            refusal_lock(&mut tx, mid).await?;
        }
        let job = dl.job.as_ref();
        let (id, arrivals, inserted): (i64, i32, bool) = sqlx::query_as(
            "insert into dead_letters (message_id, origin, exchange, routing_key, reason, headers, body, run_id, verified, refused_for)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                     (select reason from refusals where refused_message_id = $1 order by id limit 1))
             on conflict (message_id, origin, reason) where message_id is not null
             do update set arrivals = dead_letters.arrivals + $10, last_arrived_at = now()
             returning id, arrivals, xmax = 0",
        )
        .bind(&dl.message_id)
        .bind(&dl.origin)
        .bind(&dl.exchange)
        .bind(&dl.routing_key)
        .bind(&dl.reason)
        .bind(Json(&dl.headers))
        .bind(&dl.body)
        .bind(job.map(|j| j.run_id))
        .bind(dl.verified)
        .bind(if dl.redelivered { 0 } else { 1 })
        .fetch_one(&mut *tx)
        .await?;
        if !inserted && dl.redelivered {
            // The same delivery again (not acknowledged before): already recorded.
            tx.commit().await?;
            return Ok((Some(id), out));
        }
        let detail = json!({"dead_letter": id, "arrival": arrivals, "origin": dl.origin,
                            "reason": dl.reason, "message_id": dl.message_id});
        if let Some(j) = job {
            self.history(
                &mut tx,
                Some(j.run_id),
                Some(j.step_id.as_str()),
                Some(j.attempt as i32),
                "dead_lettered",
                detail,
            )
            .await?;
        } else if dl.verified {
            self.history(&mut tx, None, None, None, "dead_lettered", detail).await?;
        } else {
            self.history(&mut tx, None, None, None, "dead_letter_unverified", detail)
                .await?;
        }
        if let Some(j) = job.filter(|_| dl.delivery_limit) {
            let reason = dl.reason.clone();
            self.fail_dispatched(&mut tx, j, &reason, &mut out).await?;
        }
        tx.commit().await?;
        Ok((Some(id), out))
    }

    /// Fails `job`'s attempt if it is still the current, dispatched and not yet
    /// started one: every copy of those bytes would end alike.
    pub(super) async fn fail_dispatched(
        &self,
        tx: &mut Tx<'_>,
        j: &baton_shared::protocol::StepJob,
        reason: &str,
        out: &mut Vec<OutboxMsg>,
    ) -> Result<(), StoreError> {
        let current: bool = sqlx::query_scalar(
            "select exists (select 1 from attempts where run_id = $1 and step_id = $2 and attempt = $3
                               and message_id = $4 and status = 'dispatched')",
        )
        .bind(j.run_id)
        .bind(&j.step_id)
        .bind(j.attempt as i32)
        .bind(j.message_id)
        .fetch_one(&mut **tx)
        .await?;
        if current {
            let now = Utc::now();
            let settings = self.settings.clone();
            self.transition(tx, j.run_id, out, |state, fx| {
                state.job_dead_lettered(&j.step_id, j.attempt as i32, reason, now, &settings, fx);
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Records a daemon's signed refusal notice (its signature and its key's
    /// scope for the notice's zone and role already checked). The refused job's
    /// attempt fails when the refusal is for what the job *is* (unauthentic or
    /// malformed) and the refused bytes are a job this scheduler signed
    /// (`own`) for that zone and role, still dispatched and not started: then
    /// every copy would be refused alike. A refusal of bytes that are not the
    /// dispatched job (a forgery that borrowed its message id), of a copy or a
    /// moment (a replay, an expired copy) changes no run.
    pub async fn record_refusal(
        &self,
        notice: &baton_shared::protocol::Refusal,
        own: &Trusted,
    ) -> Result<Vec<OutboxMsg>, StoreError> {
        self.retrying(|| self.try_record_refusal(notice, own)).await
    }

    pub(super) async fn try_record_refusal(
        &self,
        notice: &baton_shared::protocol::Refusal,
        own: &Trusted,
    ) -> Result<Vec<OutboxMsg>, StoreError> {
        use baton_shared::protocol::StepJob;
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::new();
        if let Some(mid) = &notice.refused_message_id {
            refusal_lock(&mut tx, mid).await?;
        }
        sqlx::query(
            "insert into refusals (refused_message_id, zone, role, daemon, reason) values ($1, $2, $3, $4, $5)",
        )
        .bind(&notice.refused_message_id)
        .bind(&notice.zone)
        .bind(&notice.role)
        .bind(&notice.daemon)
        .bind(&notice.reason)
        .execute(&mut *tx)
        .await?;
        if let Some(mid) = &notice.refused_message_id {
            sqlx::query("update dead_letters set refused_for = $2 where message_id = $1 and refused_for is null")
                .bind(mid)
                .bind(&notice.reason)
                .execute(&mut *tx)
                .await?;
        }
        let mut detail = serde_json::to_value(notice).unwrap_or_default();
        if let Some(body) = notice.refused_bytes()
            && let Some(d) = detail.as_object_mut()
        {
            d.remove("refused_body");
            d.insert("refused_bytes".into(), json!(body.len()));
            d.insert(
                "refused_sha256".into(),
                json!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body))),
            );
        }
        self.history(&mut tx, None, None, None, "message_refused", detail)
            .await?;
        let intrinsic = ["unauthentic", "malformed"]
            .iter()
            .any(|p| notice.reason.starts_with(p));
        let job = notice
            .refused_bytes()
            .filter(|_| intrinsic)
            .and_then(|b| StepJob::parse(&b).ok())
            .filter(|j| own.verify(j).is_ok())
            .filter(|j| j.zone == notice.zone && j.role == notice.role)
            .filter(|j| notice.refused_message_id.as_deref() == Some(j.message_id.to_string().as_str()));
        if let Some(j) = job {
            let reason = format!("{} (refused by {})", notice.reason, notice.daemon);
            self.fail_dispatched(&mut tx, &j, &reason, &mut out).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Marks a dead letter replayed (after it was republished).
    pub async fn mark_replayed(&self, id: i64, who: &str) -> Result<(), StoreError> {
        // Appending to a run's chain takes the chain's lock and then the run's row
        // (to bump its version), while a firing timer takes them the other way
        // round: a deadlock between the two is retried.
        self.retrying(|| self.try_mark_replayed(id, who)).await
    }

    pub(super) async fn try_mark_replayed(&self, id: i64, who: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let run_id: Option<Option<Uuid>> = sqlx::query_scalar(
            "update dead_letters set replayed_at = now(), replayed_by = $2 where id = $1 returning run_id",
        )
        .bind(id)
        .bind(who)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(run_id) = run_id else {
            return Err(StoreError::NoDeadLetter(id));
        };
        self.history_as(
            &mut tx,
            who,
            run_id,
            None,
            "dead_letter_replayed",
            json!({"dead_letter": id}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
