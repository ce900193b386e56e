//! The scheduler's `/metrics`: computed from PostgreSQL and the broker at
//! scrape time, so every replica reports the same truth and nothing is
//! counted twice when replicas share the work.

use baton_shared::amqp::Broker;
use baton_shared::metrics::{DURATION_BUCKETS, Text};
use baton_shared::topology::{self, DEAD_QUEUE, MERGE_EVENTS_QUEUE, NOTICES_QUEUE};
use sqlx::{PgPool, Row};

use crate::pipeline::Pipeline;
use crate::store::StoreError;

fn l(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

pub async fn render(pool: &PgPool, broker: &Broker, pipeline: &Pipeline) -> Result<String, StoreError> {
    let mut t = Text::default();

    t.header("baton_runs", "Runs by status", "gauge");
    for r in sqlx::query("select status, count(*) as n from runs group by status")
        .fetch_all(pool)
        .await?
    {
        t.sample(
            "baton_runs",
            &l(&[("status", r.try_get("status")?)]),
            r.try_get::<i64, _>("n")? as f64,
        );
    }

    // Alert on this: an environment left half undone, taking no deploys until
    // an operator releases it (`baton locks release`).
    t.header(
        "baton_environment_held",
        "1 for each environment held after a failed rollback",
        "gauge",
    );
    for r in sqlx::query(
        "select l.service, l.environment from env_locks l join runs r on r.id = l.run_id
          where r.status = 'rollback_failed' order by 1, 2",
    )
    .fetch_all(pool)
    .await?
    {
        let labels = l(&[
            ("service", r.try_get("service")?),
            ("environment", r.try_get("environment")?),
        ]);
        t.sample("baton_environment_held", &labels, 1.0);
    }

    t.header("baton_steps", "Steps by role, zone and status", "gauge");
    for r in sqlx::query("select role, zone, status, count(*) as n from steps group by role, zone, status")
        .fetch_all(pool)
        .await?
    {
        let labels = l(&[
            ("role", r.try_get("role")?),
            ("zone", r.try_get("zone")?),
            ("status", r.try_get("status")?),
        ]);
        t.sample("baton_steps", &labels, r.try_get::<i64, _>("n")? as f64);
    }

    // Cumulative bucket counts in one pass over finished steps.
    let buckets: Vec<String> = DURATION_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, b)| format!("count(*) filter (where d <= {b}) as b{i}"))
        .collect();
    let sql = format!(
        "select role, zone, {}, count(*) as n, coalesce(sum(d), 0)::float8 as s from
           (select role, zone, extract(epoch from finished_at - started_at)::float8 as d
              from steps where started_at is not null and finished_at is not null) x
         group by role, zone",
        buckets.join(", ")
    );
    t.header(
        "baton_step_duration_seconds",
        "Time from a step's start to its outcome",
        "histogram",
    );
    for r in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await? {
        let labels = l(&[("role", r.try_get("role")?), ("zone", r.try_get("zone")?)]);
        let counts: Vec<u64> = (0..DURATION_BUCKETS.len())
            .map(|i| r.try_get::<i64, _>(format!("b{i}").as_str()).map(|c| c as u64))
            .collect::<Result<_, _>>()?;
        let n: i64 = r.try_get("n")?;
        t.histogram(
            "baton_step_duration_seconds",
            &labels,
            counts.into_iter(),
            r.try_get("s")?,
            n as u64,
        );
    }

    // Against the pipeline's typical durations (`typical_minutes`), as the web
    // view and `baton runs show` mark them.
    let (ids, limits): (Vec<String>, Vec<f64>) = pipeline
        .steps
        .iter()
        .filter_map(|s| {
            s.typical_minutes
                .map(|[_, high]| (s.id.clone(), f64::from(high) * 60.0))
        })
        .unzip();
    t.header(
        "baton_steps_over_typical_total",
        "Finished steps that took longer than the pipeline's typical range, by step and role",
        "counter",
    );
    for r in sqlx::query(
        "select s.step_id, s.role, count(*) as n
           from steps s join unnest($1::text[], $2::float8[]) as t(step_id, limit_secs) using (step_id)
          where s.started_at is not null and s.finished_at is not null
            and extract(epoch from s.finished_at - s.started_at) > t.limit_secs
          group by 1, 2 order by 1",
    )
    .bind(&ids)
    .bind(&limits)
    .fetch_all(pool)
    .await?
    {
        let labels = l(&[("step", r.try_get("step_id")?), ("role", r.try_get("role")?)]);
        t.sample(
            "baton_steps_over_typical_total",
            &labels,
            r.try_get::<i64, _>("n")? as f64,
        );
    }
    let budget = |risk: &str| pipeline.budget_minutes(risk).map(|m| f64::from(m) * 60.0);
    let over_budget: i64 = sqlx::query_scalar(
        "select count(*) from runs
          where started_at is not null and finished_at is not null
            and extract(epoch from finished_at - started_at) >
                case when event->>'risk' = 'critical' then $2::float8 else $1::float8 end",
    )
    .bind(budget("standard"))
    .bind(budget("critical"))
    .fetch_one(pool)
    .await?;
    t.header(
        "baton_runs_over_budget_total",
        "Finished runs that took longer than the pipeline's budget for their risk",
        "counter",
    );
    t.sample("baton_runs_over_budget_total", &[], over_budget as f64);

    let lost: i64 = sqlx::query_scalar("select count(*) from attempts where status = 'lost'")
        .fetch_one(pool)
        .await?;
    t.header(
        "baton_lease_expiries_total",
        "Attempts presumed lost when their lease expired",
        "counter",
    );
    t.sample("baton_lease_expiries_total", &[], lost as f64);

    let retries: i64 = sqlx::query_scalar("select count(*) from audit where kind = 'retry_scheduled'")
        .fetch_one(pool)
        .await?;
    t.header(
        "baton_retries_total",
        "Attempts retried after a retryable failure",
        "counter",
    );
    t.sample("baton_retries_total", &[], retries as f64);

    t.header(
        "baton_refused_messages_total",
        "Messages refused and dead-lettered, by kind",
        "counter",
    );
    for r in sqlx::query(
        "select kind, count(*) as n from audit where kind in
           ('message_refused', 'result_refused', 'notice_refused', 'merge_event_refused', 'webhook_refused')
         group by kind",
    )
    .fetch_all(pool)
    .await?
    {
        t.sample(
            "baton_refused_messages_total",
            &l(&[("kind", r.try_get("kind")?)]),
            r.try_get::<i64, _>("n")? as f64,
        );
    }

    let dead: Vec<(String, i64, i64)> = sqlx::query_as(
        "select origin, count(*), count(*) filter (where replayed_at is null) from dead_letters group by origin",
    )
    .fetch_all(pool)
    .await?;
    t.header(
        "baton_dead_letters_total",
        "Dead letters recorded from baton.dead-letters, by the queue they came from",
        "counter",
    );
    for (origin, n, _) in &dead {
        t.sample("baton_dead_letters_total", &l(&[("origin", origin.clone())]), *n as f64);
    }
    t.header(
        "baton_dead_letters_pending",
        "Dead letters not replayed yet (baton dlq list)",
        "gauge",
    );
    for (origin, _, pending) in &dead {
        t.sample(
            "baton_dead_letters_pending",
            &l(&[("origin", origin.clone())]),
            *pending as f64,
        );
    }

    let (unsent, lag): (i64, f64) = sqlx::query_as(
        "select count(*), coalesce(extract(epoch from now() - min(created_at)), 0)::float8
           from outbox where sent_at is null",
    )
    .fetch_one(pool)
    .await?;
    t.header(
        "baton_outbox_unsent",
        "Committed messages not yet confirmed by the broker",
        "gauge",
    );
    t.sample("baton_outbox_unsent", &[], unsent as f64);
    t.header(
        "baton_outbox_lag_seconds",
        "Age of the oldest unsent outbox message",
        "gauge",
    );
    t.sample("baton_outbox_lag_seconds", &[], lag);

    t.header("baton_queue_depth", "Messages ready in a queue", "gauge");
    let mut queues: Vec<String> = [MERGE_EVENTS_QUEUE, NOTICES_QUEUE, DEAD_QUEUE]
        .into_iter()
        .map(str::to_owned)
        .collect();
    queues.extend(topology::result_queues());
    queues.extend(pipeline.zone_roles().iter().map(|(z, r)| topology::job_queue(z, r)));
    for q in queues {
        // Only queues that exist are reported.
        match broker.queue_state(&q).await {
            Ok(Some(state)) => t.sample(
                "baton_queue_depth",
                &l(&[("queue", q.clone())]),
                f64::from(state.messages),
            ),
            Ok(None) => {}
            Err(_) => break,
        }
    }

    t.extend(&baton_shared::metrics::global().render());
    Ok(t.finish())
}
