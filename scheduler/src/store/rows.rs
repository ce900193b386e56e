//! Rows to run state: a run and its steps as the engine sees them.

use super::*;

/// A run without its steps, from [`run_columns`]; also returns its version.
pub(super) fn run_from_row(run_id: Uuid, row: &PgRow) -> Result<(RunState, i64), StoreError> {
    let status: String = row.try_get("run_status")?;
    let Json(event): Json<MergeEvent> = row.try_get("event")?;
    let hold: Option<Json<Hold>> = row.try_get("run_hold")?;
    let state = RunState {
        id: run_id,
        service: row.try_get("service")?,
        environment: row.try_get("environment")?,
        event,
        plan_hash: row.try_get("plan_hash")?,
        status: parse(run_id, &status)?,
        hold: hold.map(|Json(h)| h),
        facts: Facts::default(),
        completions: row.try_get("completions")?,
        rollback_reason: row.try_get("rollback_reason")?,
        trace_context: row.try_get("trace_context")?,
        started_at: row.try_get("run_started_at")?,
        finished_at: row.try_get("run_finished_at")?,
        steps: Vec::new(),
        dirty: false,
        audit_head: None,
    };
    Ok((state, row.try_get("version")?))
}

/// Adds the steps of rows from [`step_columns`], with the audit head and facts.
pub(super) fn add_steps(state: &mut RunState, rows: &[PgRow]) -> Result<(), StoreError> {
    let run_id = state.id;
    if let Some(r) = rows.first() {
        let head: Option<String> = r.try_get("audit_head")?;
        state.audit_head = Some(head.unwrap_or_else(|| audit::GENESIS.to_owned()));
        if let Some(Json(facts)) = r.try_get::<Option<Json<Facts>>, _>("facts")? {
            state.facts = facts;
        }
    }
    for r in rows {
        let status: String = r.try_get("status")?;
        let attempt_status: Option<String> = r.try_get("attempt_status")?;
        let Json(retry) = r.try_get("retry")?;
        let Json(params) = r.try_get("params")?;
        let Json(outputs) = r.try_get("outputs")?;
        let error: Option<Json<StepError>> = r.try_get("error")?;
        let hold: Option<Json<Hold>> = r.try_get("hold")?;
        state.steps.push(StepState {
            id: r.try_get("step_id")?,
            role: r.try_get("role")?,
            zone: r.try_get("zone")?,
            action: r.try_get("action")?,
            compensate: r.try_get("compensate")?,
            restore_from_backup: r.try_get("restore_from_backup")?,
            restoring: r.try_get("restoring")?,
            review_on_failure: r.try_get("review_on_failure")?,
            needs: r.try_get("needs")?,
            gates: r.try_get("gates")?,
            hold: hold.map(|Json(h)| h),
            included: r.try_get("included")?,
            status: parse(run_id, &status)?,
            attempt: r.try_get("attempt")?,
            attempt_status: attempt_status.map(|s| parse(run_id, &s)).transpose()?,
            exec_attempts: r.try_get("exec_attempts")?,
            comp_attempts: r.try_get("comp_attempts")?,
            cancel_requested: r.try_get("cancel_requested")?,
            timeout_ms: r.try_get("timeout_ms")?,
            retry,
            params,
            outputs,
            error: error.map(|Json(e)| e),
            completion: r.try_get("completion")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            comp_started_at: r.try_get("comp_started_at")?,
            comp_finished_at: r.try_get("comp_finished_at")?,
            dirty: false,
        });
    }
    Ok(())
}

pub(super) fn parse<T: std::str::FromStr<Err = String>>(run: Uuid, s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|problem| StoreError::Corrupt { run, problem })
}
