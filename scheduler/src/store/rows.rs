//! Rows to run state: a run and its steps as the engine sees them. The
//! statements that load a run read its columns and its steps' in one result
//! (`run_columns!`, `step_columns!`); [`RunRow`] and [`StepRow`] decode them.

use sqlx::FromRow;

use super::*;

/// A run's columns as `run_columns!` names them.
#[derive(sqlx::FromRow)]
pub(super) struct RunRow {
    service: String,
    environment: String,
    event: Json<MergeEvent>,
    plan_hash: String,
    run_status: String,
    run_hold: Option<Json<Hold>>,
    completions: i32,
    rollback_reason: Option<String>,
    trace_context: Option<String>,
    run_started_at: Option<DateTime<Utc>>,
    run_finished_at: Option<DateTime<Utc>>,
    version: i64,
}

/// A step's columns as `step_columns!` names them.
#[derive(sqlx::FromRow)]
pub(super) struct StepRow {
    step_id: String,
    role: String,
    zone: String,
    action: String,
    compensate: Option<String>,
    restore_from_backup: bool,
    restoring: bool,
    review_on_failure: bool,
    needs: Vec<String>,
    gates: Vec<String>,
    hold: Option<Json<Hold>>,
    included: bool,
    status: String,
    attempt: i32,
    attempt_status: Option<String>,
    exec_attempts: i32,
    comp_attempts: i32,
    cancel_requested: bool,
    timeout_ms: i64,
    retry: Json<crate::pipeline::RetryPolicy>,
    params: Json<Fields>,
    outputs: Json<Fields>,
    error: Option<Json<StepError>>,
    completion: Option<i32>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    comp_started_at: Option<DateTime<Utc>>,
    comp_finished_at: Option<DateTime<Utc>>,
}

/// A run without its steps, from `run_columns!` and `event`; also returns its version.
pub(super) fn run_from_row(run_id: Uuid, row: &PgRow) -> Result<(RunState, i64), StoreError> {
    let r = RunRow::from_row(row)?;
    let state = RunState {
        id: run_id,
        service: r.service,
        environment: r.environment,
        event: r.event.0,
        plan_hash: r.plan_hash,
        status: parse(run_id, &r.run_status)?,
        hold: r.run_hold.map(|Json(h)| h),
        facts: Facts::default(),
        completions: r.completions,
        rollback_reason: r.rollback_reason,
        trace_context: r.trace_context,
        started_at: r.run_started_at,
        finished_at: r.run_finished_at,
        steps: Vec::new(),
        dirty: false,
        audit_head: None,
    };
    Ok((state, r.version))
}

/// Adds the steps of rows from `step_columns!`, with the audit head and facts.
pub(super) fn add_steps(state: &mut RunState, rows: &[PgRow]) -> Result<(), StoreError> {
    let run_id = state.id;
    if let Some(r) = rows.first() {
        let head: Option<String> = r.try_get("audit_head")?;
        state.audit_head = Some(head.unwrap_or_else(|| audit::GENESIS.to_owned()));
        if let Some(Json(facts)) = r.try_get::<Option<Json<Facts>>, _>("facts")? {
            state.facts = facts;
        }
    }
    for row in rows {
        let s = StepRow::from_row(row)?;
        state.steps.push(StepState {
            id: s.step_id,
            role: s.role,
            zone: s.zone,
            action: s.action,
            compensate: s.compensate,
            restore_from_backup: s.restore_from_backup,
            restoring: s.restoring,
            review_on_failure: s.review_on_failure,
            needs: s.needs,
            gates: s.gates,
            hold: s.hold.map(|Json(h)| h),
            included: s.included,
            status: parse(run_id, &s.status)?,
            attempt: s.attempt,
            attempt_status: s.attempt_status.map(|a| parse(run_id, &a)).transpose()?,
            exec_attempts: s.exec_attempts,
            comp_attempts: s.comp_attempts,
            cancel_requested: s.cancel_requested,
            timeout_ms: s.timeout_ms,
            retry: s.retry.0,
            params: s.params.0,
            outputs: s.outputs.0,
            error: s.error.map(|Json(e)| e),
            completion: s.completion,
            started_at: s.started_at,
            finished_at: s.finished_at,
            comp_started_at: s.comp_started_at,
            comp_finished_at: s.comp_finished_at,
            dirty: false,
        });
    }
    Ok(())
}

pub(super) fn parse<T: std::str::FromStr<Err = String>>(run: Uuid, s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|problem| StoreError::Corrupt { run, problem })
}
