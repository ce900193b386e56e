//! A daemon for end-to-end tests: the real runtime, with a role whose outcome
//! per step a test controls through a JSON script, and which logs every
//! execution to a file so tests can count side effects. It reports only the
//! facts the script declares (`baton_tests::script::Script::facts`).
//!
//! Usage: `baton-test-daemon --script FILE --log FILE --serve ZONE.ROLE ...`
//! (broker settings from `BATON_AMQP__URL` as for any daemon).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_shared::config::{self, DaemonConfig};
use baton_shared::protocol::{JobKind, StepJob};
use baton_shared::runtime::{self, Binding, BoxFuture, ExecContext, Outcome, Role};
use baton_tests::script::{Script, StepBehaviour};

struct ScriptedRole {
    name: String,
    script: PathBuf,
    log: PathBuf,
    counts: Mutex<HashMap<(uuid::Uuid, String, JobKind), u32>>,
    /// Succeed at once with the script's declared facts, read once at start,
    /// without logging (benchmarks).
    noop: Option<Script>,
}

impl ScriptedRole {
    fn log(&self, event: &str, job: &StepJob, extra: serde_json::Value) {
        let line = serde_json::json!({
            "event": event, "run_id": job.run_id, "step_id": job.step_id, "attempt": job.attempt,
            "kind": job.kind, "zone": job.zone, "role": job.role, "pid": std::process::id(),
            "at": chrono::Utc::now(), "extra": extra,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        // One write per line: appends of this size do not interleave.
        f.write_all(format!("{line}\n").as_bytes()).expect("write log");
    }

    fn behaviour(&self, job: &StepJob) -> StepBehaviour {
        let script = Script::load(&self.script);
        script.behaviour(&job.step_id, job.kind)
    }

    async fn work(&self, job: &StepJob) -> Outcome {
        if let Some(script) = &self.noop {
            return Ok(script.facts_for(job));
        }
        let n = {
            let mut counts = self.counts.lock().expect("lock");
            let c = counts.entry((job.run_id, job.step_id.clone(), job.kind)).or_default();
            *c += 1;
            *c
        };
        let b = self.behaviour(job);
        self.log("start", job, serde_json::json!({"nth": n, "inputs": job.inputs}));
        tokio::time::sleep(Duration::from_millis(b.delay_ms)).await;
        if n <= b.fail_first {
            self.log("end", job, serde_json::json!({"outcome": "failed_retryable"}));
            return Err(baton_shared::protocol::StepError::retryable(
                "flaky",
                format!("scripted failure {n} of {}", b.fail_first),
            ));
        }
        if let Some(e) = b.fail {
            self.log("end", job, serde_json::json!({"outcome": "failed"}));
            return Err(e);
        }
        self.log("end", job, serde_json::json!({"outcome": "succeeded"}));
        let mut out = Script::load(&self.script).facts_for(job);
        out.extend(b.outputs.unwrap_or_default());
        out.insert("done_by".into(), format!("{}:{}", job.step_id, job.attempt).into());
        Ok(out)
    }
}

impl Role for ScriptedRole {
    fn name(&self) -> &str {
        &self.name
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(self.work(job))
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(self.work(job))
    }
}

fn main() -> anyhow::Result<()> {
    let mut script = None;
    let mut log = None;
    let mut serve = Vec::new();
    let mut noop = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--script" => script = args.next().map(PathBuf::from),
            "--log" => log = args.next().map(PathBuf::from),
            "--noop" => noop = true,
            "--serve" => serve.push(args.next().ok_or_else(|| anyhow::anyhow!("--serve needs ZONE.ROLE"))?),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let script = script.ok_or_else(|| anyhow::anyhow!("--script is required"))?;
    let log = log.ok_or_else(|| anyhow::anyhow!("--log is required"))?;
    let mut cfg: DaemonConfig = config::load(None)?;
    let bindings: Vec<Binding> = serve
        .iter()
        .map(|s| {
            let (zone, role) = s
                .split_once('.')
                .ok_or_else(|| anyhow::anyhow!("--serve {s:?} is not ZONE.ROLE"))?;
            Ok(Binding {
                zone: zone.to_owned(),
                role: Arc::new(ScriptedRole {
                    name: role.to_owned(),
                    script: script.clone(),
                    log: log.clone(),
                    counts: Mutex::new(HashMap::new()),
                    noop: noop.then(|| Script::load(&script)),
                }),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if cfg.daemon.zone.is_empty() {
        cfg.daemon.zone = bindings.first().map(|b| b.zone.clone()).unwrap_or_default();
    }
    cfg.validate()?;
    let telemetry = baton_shared::telemetry::init(&cfg.log, &cfg.telemetry, "baton-test-daemon");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(runtime::run(cfg, bindings, baton_shared::shutdown::signal()));
    telemetry.shutdown();
    result?;
    Ok(())
}
