//! The `infrastructure` role: `plan`, `apply` and the `reapply-previous`
//! compensation (see the crate documentation).

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_shared::facts::{FactSet, ResourceChange, TerraformPlanned};
use baton_shared::git::{self, FileLock, GitCache};
use baton_shared::kit;
use baton_shared::protocol::{self, Fields, JobKind, StepJob};
use baton_shared::roles;
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
use sqlx::postgres::PgConnection;

use crate::config::InfraConfig;
use crate::error::Error;
use crate::history::{self, StateVersion};
use crate::terraform::{Failure, Terraform};

/// The step's parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The Terraform root module, relative to the repository root.
    pub dir: String,
    /// More changed resources than this need an approval (the scheduler's
    /// blast-radius gate asks for it between the plan and the apply step).
    pub blast_radius_limit: u64,
    /// Resource addresses (globs) a plan must not replace or delete.
    pub protected: Vec<String>,
    /// How long to wait for a held state lock (default: the daemon's).
    pub lock_timeout_secs: Option<u64>,
    /// apply: the plan step whose saved plan it applies (default: the one
    /// input step that reported a saved plan).
    pub plan_step: Option<String>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            dir: ".".to_owned(),
            blast_radius_limit: 5,
            protected: Vec::new(),
            lock_timeout_secs: None,
            plan_step: None,
        }
    }
}

/// What `plan` reports: the facts contract's [`TerraformPlanned`] and more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanOutputs {
    #[serde(flatten)]
    pub facts: TerraformPlanned,
    pub blast_radius_limit: u64,
    /// Whether applying needs an approval.
    pub over_limit: bool,
    pub state_schema: String,
    /// The state the plan was made against.
    pub state: Option<StateVersion>,
}

/// What `apply` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyOutputs {
    #[serde(flatten)]
    pub facts: TerraformPlanned,
    pub state_schema: String,
    pub commit: String,
    /// The commit whose configuration made the state this apply replaced (what
    /// `reapply-previous` goes back to); none before Baton's first apply.
    pub previous_commit: Option<String>,
    pub state_before: Option<StateVersion>,
    pub state_after: Option<StateVersion>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What `reapply-previous` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevertOutputs {
    /// Whether anything was re-applied (nothing, if the step never applied).
    pub reverted: bool,
    /// The commit re-applied; none: the step's resources were destroyed, as
    /// there was no earlier configuration.
    pub commit: Option<String>,
    #[serde(flatten)]
    pub facts: TerraformPlanned,
    pub state_after: Option<StateVersion>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The infrastructure role, built from `[infrastructure]`.
#[derive(Debug, Clone)]
pub struct Infrastructure {
    config: InfraConfig,
    git: GitCache,
}

/// A job's checkout, removed when dropped (also when the job is cancelled).
struct Checkout {
    scratch: PathBuf,
    /// The root module.
    dir: PathBuf,
    /// Terraform for the job's state schema.
    tf: Terraform,
    /// The commit checked out.
    commit: String,
    /// The schema's data directory is this job's until dropped.
    _data_dir: FileLock,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Io {
        what,
        detail: e.to_string(),
    }
}

fn outputs<T: Serialize>(value: &T) -> Result<Fields, Error> {
    protocol::to_fields(value).map_err(|e| Error::Io {
        what: "outputs".into(),
        detail: e.message,
    })
}

fn protected_set(patterns: &[String]) -> Result<GlobSet, Error> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let glob = GlobBuilder::new(p)
            .literal_separator(false)
            .build()
            .map_err(|e| Error::InvalidParam {
                name: "protected".into(),
                problem: format!("{p:?}: {e}"),
            })?;
        set.add(glob);
    }
    set.build().map_err(|e| Error::InvalidParam {
        name: "protected".into(),
        problem: e.to_string(),
    })
}

impl Infrastructure {
    pub fn new(config: InfraConfig) -> Self {
        Self {
            git: GitCache::new(config.repos_dir.clone()),
            config,
        }
    }

    /// Runs a job to its outputs; the `Role` methods wrap this.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        match (job.kind, job.action.as_str()) {
            (JobKind::Execute, "plan") => outputs(&self.plan(job).await?),
            (JobKind::Execute, "apply") => self.apply(job).await,
            (JobKind::Compensate, "reapply-previous") => self.reapply_previous(job).await,
            (kind, action) => Err(Error::UnknownAction {
                kind,
                action: action.to_owned(),
            }),
        }
    }

    fn params(job: &StepJob) -> Result<Params, Error> {
        let mut p: Params = job.params().map_err(|e| Error::InvalidParam {
            name: e.key,
            problem: e.problem,
        })?;
        if p.dir.trim_end_matches('/') != "." {
            p.dir = git::check_folder("dir", &p.dir)?;
        }
        protected_set(&p.protected)?;
        Ok(p)
    }

    fn schema(&self, job: &StepJob) -> String {
        self.config.schema(&job.zone, &job.deploy.service)
    }

    fn lock_timeout(&self, p: &Params) -> Duration {
        Duration::from_secs(p.lock_timeout_secs.unwrap_or(self.config.lock_timeout_secs))
    }

    async fn connect(&self) -> Result<PgConnection, Error> {
        Ok(history::connect(self.config.state_url.expose()).await?)
    }

    /// The repository at `commit`, initialised against the zone's state.
    async fn checkout(&self, job: &StepJob, commit: &str, p: &Params) -> Result<Checkout, Error> {
        git::check_commit(commit)?;
        let tf = self.terraform(job)?;
        let data_dir = Terraform::data_dir_of(&self.config, &self.schema(job));
        let lock = git::lock_file(data_dir.with_extension("lock"))
            .await
            .map_err(|detail| Error::Io {
                what: format!("cannot lock {}", data_dir.display()),
                detail,
            })?;
        let scratch =
            self.config
                .work_dir
                .join("jobs")
                .join(format!("{}-{}-{}", job.run_id, job.step_id, &commit[..12]));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(io(format!("cannot create {}", scratch.display())))?;
        // The schema's source tree is kept with its data directory (both this
        // job's under the lock): the next job of the same commit (the apply
        // after its plan, a retry) finds it exported already.
        let source = self.export_for_schema(job, commit, &data_dir).await?;
        let checkout = Checkout {
            dir: if p.dir == "." { source } else { source.join(&p.dir) },
            scratch,
            tf,
            commit: commit.to_owned(),
            _data_dir: lock,
        };
        if !checkout.dir.is_dir() {
            return Err(Error::Source(git::GitError::FolderNotFound {
                dir: p.dir.clone(),
                commit: commit.to_owned(),
            }));
        }
        // The data directory of an earlier job on this schema is reused: `init`
        // only when it was never initialised, or when Terraform asks for it.
        let backend = match checkout.tf.backend() {
            Some(b) => Some(b),
            None => checkout.tf.init(&checkout.dir).await.map_err(Error::Terraform)?,
        };
        Self::require_pg(backend, job, p, commit)?;
        Ok(checkout)
    }

    /// The repository's tree at `commit` in the schema's source directory
    /// (`<data dir>.source`), exported unless the last export there was of
    /// `commit` (recorded in `<data dir>.source-commit` once it was complete).
    /// The caller holds the schema's lock.
    async fn export_for_schema(&self, job: &StepJob, commit: &str, data_dir: &Path) -> Result<PathBuf, Error> {
        let source = data_dir.with_extension("source");
        let marker = data_dir.with_extension("source-commit");
        if source.is_dir() && std::fs::read_to_string(&marker).is_ok_and(|c| c == commit) {
            return Ok(source);
        }
        let fresh = data_dir.with_extension("source-new");
        let _ = std::fs::remove_file(&marker);
        for dir in [&fresh, &source] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(io(format!("cannot remove {}", dir.display())))?;
            }
        }
        self.git.export(&job.deploy.repository, commit, ".", &fresh).await?;
        std::fs::rename(&fresh, &source).map_err(io(format!("cannot rename {}", fresh.display())))?;
        std::fs::write(&marker, commit).map_err(io(format!("cannot write {}", marker.display())))?;
        Ok(source)
    }

    fn require_pg(backend: Option<String>, job: &StepJob, p: &Params, commit: &str) -> Result<(), Error> {
        match backend.as_deref() {
            Some("pg") => Ok(()),
            _ => Err(Error::Backend {
                dir: p.dir.clone(),
                commit: commit.to_owned(),
                zone: job.zone.clone(),
                found: match backend {
                    None => "in a local file (no backend block)".to_owned(),
                    Some(b) => format!("in backend {b:?}"),
                },
            }),
        }
    }

    fn terraform(&self, job: &StepJob) -> Result<Terraform, Error> {
        Terraform::new(&self.config, &self.schema(job)).map_err(io("cannot write the Terraform CLI configuration"))
    }

    /// A Terraform failure, with the lock's holder named when it was the lock.
    async fn explain(&self, conn: &mut PgConnection, job: &StepJob, p: &Params, f: Failure) -> Error {
        let Failure::Locked(detail) = f else {
            return Error::Terraform(f);
        };
        let schema = self.schema(job);
        let holders = match history::lock_holders(conn, &schema).await {
            Ok(h) if !h.is_empty() => h.join("; "),
            Ok(_) => "another session (it has released the lock since)".to_owned(),
            Err(e) => format!("another session (not identified: {e})"),
        };
        Error::Locked {
            schema,
            holders,
            waited_secs: self.lock_timeout(p).as_secs(),
            detail,
        }
    }

    /// Plans `checkout` into `file`; the summary, checked against protected resources.
    async fn make_plan(
        &self,
        conn: &mut PgConnection,
        job: &StepJob,
        p: &Params,
        checkout: &Checkout,
        file: &Path,
        destroy: bool,
    ) -> Result<TerraformPlanned, Error> {
        match self.terraform_plan(job, p, checkout, file, destroy).await? {
            Ok(summary) => Ok(summary),
            Err(f) => Err(self.explain(conn, job, p, f).await),
        }
    }

    /// [`make_plan`](Self::make_plan) without the state database: a
    /// Terraform failure is returned for the caller to explain.
    async fn terraform_plan(
        &self,
        job: &StepJob,
        p: &Params,
        checkout: &Checkout,
        file: &Path,
        destroy: bool,
    ) -> Result<Result<TerraformPlanned, Failure>, Error> {
        let tf = &checkout.tf;
        let mut planned = tf.plan(&checkout.dir, file, self.lock_timeout(p), destroy).await;
        if let Err(Failure::NeedsInit(_)) = planned {
            // The configuration's backend, modules or providers changed since
            // this data directory was initialised.
            let backend = tf.init(&checkout.dir).await.map_err(Error::Terraform)?;
            Self::require_pg(backend, job, p, &checkout.commit)?;
            planned = tf.plan(&checkout.dir, file, self.lock_timeout(p), destroy).await;
        }
        let summary = match planned {
            Ok(s) => s,
            Err(f) => return Ok(Err(f)),
        };
        let protected = protected_set(&p.protected)?;
        let hits: Vec<String> = summary
            .changes
            .iter()
            .filter(|c| matches!(c.action.as_str(), "replace" | "delete") && protected.is_match(&c.address))
            .map(|c| format!("{} ({})", c.address, c.action))
            .collect();
        if !hits.is_empty() && !destroy {
            return Err(Error::Unintended { changes: hits });
        }
        Ok(Ok(summary))
    }

    /// A plan of the checkout with its unintended changes named, and the
    /// state it is planned against: while Terraform plans, the state database
    /// is read (the state, the last applied commit) and git diffs the merge
    /// against that commit.
    async fn plan_with_unintended(
        &self,
        conn: &mut PgConnection,
        job: &StepJob,
        p: &Params,
        checkout: &Checkout,
        file: &Path,
    ) -> Result<(TerraformPlanned, Option<history::StateVersion>), Error> {
        let schema = self.schema(job);
        let beside = async {
            let state = history::current_state(conn, &schema).await?;
            let previous = history::previous_commit(conn, &schema, job.run_id, &job.step_id).await?;
            let changed = self.changed_since_applied(job, previous).await?;
            Ok::<_, Error>((state, changed))
        };
        let (planned, beside) = tokio::join!(self.terraform_plan(job, p, checkout, file, false), beside);
        let mut facts = match planned? {
            Ok(f) => f,
            Err(f) => return Err(self.explain(conn, job, p, f).await),
        };
        let (state, changed) = beside?;
        facts.unintended = Self::unintended(p, checkout, &facts, changed);
        Ok((facts, state))
    }

    /// The paths the merge changed since the last applied commit (None when
    /// nothing was applied yet). A last applied commit that is gone (a
    /// force-push) shows nothing as touched, so every change counts as unintended.
    async fn changed_since_applied(
        &self,
        job: &StepJob,
        previous: Option<String>,
    ) -> Result<Option<Vec<String>>, Error> {
        let Some(previous) = previous else { return Ok(None) };
        if previous == job.deploy.commit_sha {
            return Ok(Some(Vec::new()));
        }
        // The whole repository: a module may live outside the root module's folder.
        match self
            .git
            .changed_paths(&job.deploy.repository, &previous, &job.deploy.commit_sha, ".")
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(git::GitError::UnknownCommit { .. }) => Ok(Some(Vec::new())),
            Err(e) => Err(e.into()),
        }
    }

    /// The planned changes in modules the merge did not touch: what it touched
    /// is the paths changed since the commit of the last apply to this state (a
    /// first apply touches everything).
    fn unintended(
        p: &Params,
        checkout: &Checkout,
        facts: &TerraformPlanned,
        changed: Option<Vec<String>>,
    ) -> Vec<baton_shared::facts::ResourceChange> {
        let Some(changed) = changed else { return Vec::new() };
        // Module folders as paths in the repository.
        let modules = checkout
            .tf
            .modules()
            .into_iter()
            .map(|(key, dir)| (key, repo_path(&p.dir, &dir)))
            .chain(std::iter::once((String::new(), repo_path(&p.dir, "."))))
            .collect();
        untouched(&facts.changes, &modules, &changed)
    }

    async fn plan(&self, job: &StepJob) -> Result<PlanOutputs, Error> {
        let p = Self::params(job)?;
        // The database and the checkout at once; then Terraform plans while the
        // state database is read and git diffs the merge against the last applied commit.
        let (mut conn, checkout) = tokio::try_join!(self.connect(), self.checkout(job, &job.deploy.commit_sha, &p))?;
        let file = checkout.scratch.join("plan.tfplan");
        let (mut facts, state) = self.plan_with_unintended(&mut conn, job, &p, &checkout, &file).await?;
        facts.plan_sha256 = Some(self.save_plan_file(&mut conn, job, &file, &facts).await?);
        tracing::info!(
            run_id = %job.run_id,
            step_id = %job.step_id,
            resources_changed = facts.resources_changed,
            limit = p.blast_radius_limit,
            "terraform plan saved"
        );
        Ok(PlanOutputs {
            over_limit: facts.resources_changed > p.blast_radius_limit,
            blast_radius_limit: p.blast_radius_limit,
            facts,
            state_schema: self.schema(job),
            state,
        })
    }

    /// The approved plan among the inputs: (step, facts). The step's own
    /// entry, when the scheduler sends one, is the plan this step re-made
    /// when the approved one went stale, approved since; else the plan step's.
    fn plan_input(job: &StepJob, p: &Params) -> Result<Option<(String, TerraformPlanned)>, Error> {
        if let Some(out) = job.inputs.get(&job.step_id)
            && let Ok(facts) = TerraformPlanned::read(&job.step_id, out)
            && facts.plan_sha256.is_some()
        {
            return Ok(Some((job.step_id.clone(), facts)));
        }
        let candidates: Vec<(&String, TerraformPlanned)> = job
            .inputs
            .iter()
            .filter(|(step, _)| p.plan_step.as_ref().is_none_or(|want| want == *step))
            .filter_map(|(step, out)| {
                TerraformPlanned::read(step, out)
                    .ok()
                    .filter(|f| f.plan_sha256.is_some())
                    .map(|f| (step, f))
            })
            .collect();
        match (candidates.as_slice(), &p.plan_step) {
            ([], Some(want)) => Err(Error::PlanMissing {
                step: want.clone(),
                problem: "the step is not among this job's inputs, or reported no saved plan".into(),
            }),
            ([], None) => Ok(None),
            ([(step, facts)], _) => Ok(Some(((*step).clone(), facts.clone()))),
            (many, _) => Err(Error::InvalidParam {
                name: "plan_step".into(),
                problem: format!(
                    "several inputs reported saved plans ({}): name the one to apply",
                    many.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    async fn apply(&self, job: &StepJob) -> Result<Fields, Error> {
        let p = Self::params(job)?;
        let schema = self.schema(job);
        let mut conn = self.connect().await?;
        // A redelivered job that already applied reports what it did.
        if let Some(row) = history::apply_row(&mut conn, job.run_id, &job.step_id).await?
            && row.status == "applied"
            && let Some(Value::Object(out)) = row.outputs
        {
            return Ok(out);
        }
        let checkout = self.checkout(job, &job.deploy.commit_sha, &p).await?;
        // Again under the schema's lock: an earlier attempt may have finished
        // while this one waited for it.
        if let Some(row) = history::apply_row(&mut conn, job.run_id, &job.step_id).await?
            && row.status == "applied"
            && let Some(Value::Object(out)) = row.outputs
        {
            return Ok(out);
        }
        let tf = &checkout.tf;
        let file = checkout.scratch.join("plan.tfplan");
        let mut warnings = Vec::new();
        let approved = match Self::plan_input(job, &p)? {
            Some((step, facts)) => {
                let want = facts.plan_sha256.clone().unwrap_or_default();
                let Some(saved) = history::load_plan(&mut conn, job.run_id, &step).await? else {
                    return Err(Error::PlanMissing {
                        step,
                        problem: "no plan of this run is saved under it".into(),
                    });
                };
                let bytes = saved.plan;
                let sha = hex::encode(sha2::Sha256::digest(&bytes));
                let problem = if sha != want || saved.sha256 != want {
                    Some(format!("the saved plan is {sha}, not the reported {want}"))
                } else if saved.state_schema != schema {
                    Some(format!(
                        "it was made for state {}, and this step applies to {schema}",
                        saved.state_schema
                    ))
                } else if saved.commit_sha != job.deploy.commit_sha {
                    Some(format!(
                        "it was made from commit {}, not this run's {}",
                        saved.commit_sha, job.deploy.commit_sha
                    ))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(Error::PlanMissing { step, problem });
                }
                std::fs::write(&file, &bytes).map_err(io("cannot write the saved plan"))?;
                facts
            }
            None => {
                let (facts, _) = self.plan_with_unintended(&mut conn, job, &p, &checkout, &file).await?;
                if facts.resources_changed > p.blast_radius_limit {
                    return Err(Error::NeedsApproval {
                        why: format!(
                            "{} resources change, over the blast radius limit of {}",
                            facts.resources_changed, p.blast_radius_limit
                        ),
                    });
                }
                if !facts.unintended.is_empty() {
                    return Err(Error::NeedsApproval {
                        why: format!(
                            "the plan changes resources in modules this merge did not touch ({})",
                            list_changes(&facts.unintended)
                        ),
                    });
                }
                facts
            }
        };
        let before = history::current_state(&mut conn, &schema).await?;
        let previous = history::previous_commit(&mut conn, &schema, job.run_id, &job.step_id).await?;
        let recorded = history::start_apply(
            &mut conn,
            job.run_id,
            &job.step_id,
            &schema,
            &job.deploy.commit_sha,
            previous.as_deref(),
            before.as_ref(),
        )
        .await?;
        let mut applied = tf.apply(&checkout.dir, &file, self.lock_timeout(&p)).await;
        if let Err(Failure::NeedsInit(_)) = applied {
            let backend = tf.init(&checkout.dir).await.map_err(Error::Terraform)?;
            Self::require_pg(backend, job, &p, &checkout.commit)?;
            applied = tf.apply(&checkout.dir, &file, self.lock_timeout(&p)).await;
        }
        if let Err(Failure::Stale(_)) = applied {
            // The state changed after the plan. Planned again: the same changes,
            // within the limits, are applied; a plan that needs an approval or
            // changes something else is saved and goes back to the gates.
            let fresh = match self.plan_with_unintended(&mut conn, job, &p, &checkout, &file).await {
                Ok((f, _)) => f,
                Err(e) => return Err(self.nothing_applied(&mut conn, job, recorded, e).await),
            };
            let over = fresh.resources_changed > p.blast_radius_limit;
            if over || !fresh.unintended.is_empty() || fresh.changes != approved.changes {
                let e = self.ask_again(&mut conn, job, &file, fresh, &approved, over).await;
                return Err(self.nothing_applied(&mut conn, job, recorded, e).await);
            }
            warnings.push(format!(
                "the approved plan went stale (the state changed since); re-planned with the same {} change(s) and applied that",
                fresh.resources_changed
            ));
            applied = tf.apply(&checkout.dir, &file, self.lock_timeout(&p)).await;
        }
        match applied {
            Ok(()) => {}
            // Terraform applied nothing: the record of this attempt goes, so a
            // retry records the state it then finds.
            Err(f @ (Failure::Locked(_) | Failure::Stale(_) | Failure::NeedsInit(_) | Failure::NotStarted(_))) => {
                let e = self.explain(&mut conn, job, &p, f).await;
                return Err(self.nothing_applied(&mut conn, job, recorded, e).await);
            }
            Err(f) => return Err(self.explain(&mut conn, job, &p, f).await),
        }
        let after = history::current_state(&mut conn, &schema).await?;
        let out = ApplyOutputs {
            facts: approved,
            state_schema: schema,
            commit: job.deploy.commit_sha.clone(),
            previous_commit: previous,
            state_before: before,
            state_after: after.clone(),
            warnings,
        };
        let fields = outputs(&out)?;
        history::finish(
            &mut conn,
            job.run_id,
            &job.step_id,
            "applied",
            after.as_ref(),
            &Value::Object(fields.clone()),
        )
        .await?;
        tracing::info!(
            run_id = %job.run_id,
            step_id = %job.step_id,
            resources_changed = out.facts.resources_changed,
            serial = out.state_after.as_ref().map(|s| s.serial),
            "terraform applied"
        );
        Ok(fields)
    }

    /// Saves the plan in `file` under this job's run and step (in the state
    /// database, with `facts` as its summary); its SHA-256.
    async fn save_plan_file(
        &self,
        conn: &mut PgConnection,
        job: &StepJob,
        file: &Path,
        facts: &TerraformPlanned,
    ) -> Result<String, Error> {
        let bytes = std::fs::read(file).map_err(io("cannot read the saved plan"))?;
        let summary = serde_json::to_value(facts).unwrap_or(Value::Null);
        Ok(history::save_plan(
            conn,
            job.run_id,
            &job.step_id,
            &self.schema(job),
            &job.deploy.commit_sha,
            &bytes,
            &summary,
        )
        .await?)
    }

    /// The error that sends the step back to its gates with `fresh`, the
    /// plan made after the approved one went stale, saved under this step's
    /// own id (or why it could not be saved).
    async fn ask_again(
        &self,
        conn: &mut PgConnection,
        job: &StepJob,
        file: &Path,
        mut fresh: TerraformPlanned,
        approved: &TerraformPlanned,
        over: bool,
    ) -> Error {
        let sha = match self.save_plan_file(conn, job, file, &fresh).await {
            Ok(sha) => sha,
            Err(e) => return e,
        };
        fresh.plan_sha256 = Some(sha.clone());
        let mut why = Vec::new();
        if fresh.changes != approved.changes {
            why.push(describe_difference(approved, &fresh));
        }
        if over {
            why.push(format!("{} resources change", fresh.resources_changed));
        }
        if !fresh.unintended.is_empty() {
            why.push(format!(
                "it changes resources in modules this merge did not touch ({})",
                list_changes(&fresh.unintended)
            ));
        }
        tracing::warn!(
            run_id = %job.run_id, step_id = %job.step_id, plan_sha256 = %sha,
            resources_changed = fresh.resources_changed, "approved plan went stale; the new plan needs approval"
        );
        Error::ApprovalAgain {
            why: why.join("; "),
            sha,
            facts: Box::new(fresh),
        }
    }

    /// `e`, after forgetting this attempt's `started` record (if it made it):
    /// it applied nothing.
    async fn nothing_applied(&self, conn: &mut PgConnection, job: &StepJob, recorded: bool, e: Error) -> Error {
        if !recorded {
            return e;
        }
        if let Err(db) = history::forget_started(conn, job.run_id, &job.step_id).await {
            tracing::warn!(run_id = %job.run_id, step_id = %job.step_id, error = %db, "cannot forget the attempt's record");
        }
        e
    }

    async fn reapply_previous(&self, job: &StepJob) -> Result<Fields, Error> {
        let p = Self::params(job)?;
        let schema = self.schema(job);
        let mut conn = self.connect().await?;
        let Some(row) = history::apply_row(&mut conn, job.run_id, &job.step_id).await? else {
            return outputs(&RevertOutputs {
                reverted: false,
                commit: None,
                facts: TerraformPlanned::default(),
                state_after: history::current_state(&mut conn, &schema).await?,
                note: "this step applied nothing: there is nothing to re-apply".into(),
            });
        };
        if row.status == "reverted"
            && let Some(Value::Object(out)) = row.outputs
        {
            return Ok(out);
        }
        let now = history::current_state(&mut conn, &schema).await?;
        // An attempt that stopped mid-apply: if the state is still the one it
        // found, it changed nothing.
        if row.status == "started" && now.as_ref().map(|v| &v.sha256) == row.state_before.as_ref().map(|v| &v.sha256) {
            return outputs(&RevertOutputs {
                reverted: false,
                commit: None,
                facts: TerraformPlanned::default(),
                state_after: now,
                note: "the step's attempt stopped before it changed the state: there is nothing to re-apply".into(),
            });
        }
        if row.status == "applied"
            && let (Some(applied), Some(now)) = (&row.state_after, &now)
            && applied.sha256 != now.sha256
        {
            return Err(Error::StateMoved {
                schema,
                applied: applied.serial,
                now: now.serial,
                previous: row.previous_commit.unwrap_or_else(|| "(none)".into()),
            });
        }
        // Without an earlier apply by Baton there is no configuration to go back
        // to. If there was no state either, everything in it now is this step's
        // and is destroyed; a state made outside Baton is never destroyed.
        let (commit, destroy) = match (&row.previous_commit, &row.state_before) {
            (Some(c), _) => (c.clone(), false),
            (None, None) => (row.commit_sha.clone(), true),
            (None, Some(before)) => {
                return Err(Error::NoPreviousConfiguration {
                    schema,
                    serial: before.serial,
                });
            }
        };
        let checkout = self.checkout(job, &commit, &p).await?;
        let file = checkout.scratch.join("revert.tfplan");
        let facts = self.make_plan(&mut conn, job, &p, &checkout, &file, destroy).await?;
        if let Err(f) = checkout.tf.apply(&checkout.dir, &file, self.lock_timeout(&p)).await {
            return Err(self.explain(&mut conn, job, &p, f).await);
        }
        let after = history::current_state(&mut conn, &schema).await?;
        let out = RevertOutputs {
            reverted: true,
            commit: (!destroy).then_some(commit),
            facts,
            state_after: after.clone(),
            note: if destroy {
                "no earlier apply is recorded: the resources of this step's configuration were destroyed".into()
            } else {
                String::new()
            },
        };
        let fields = outputs(&out)?;
        history::finish(
            &mut conn,
            job.run_id,
            &job.step_id,
            "reverted",
            after.as_ref(),
            &Value::Object(fields.clone()),
        )
        .await?;
        Ok(fields)
    }
}

/// The changes in modules the merge did not touch: a module is touched when a
/// file directly in its directory changed, or the module calling it is
/// touched (the root module is touched when a file directly in it changed).
/// A module from outside the repository (its directory under `.terraform/`)
/// is touched only through its caller.
pub fn untouched(
    changes: &[baton_shared::facts::ResourceChange],
    modules: &std::collections::BTreeMap<String, String>,
    changed: &[String],
) -> Vec<baton_shared::facts::ResourceChange> {
    let parent = |path: &str| path.rsplit_once('/').map_or(String::new(), |(d, _)| d.to_owned());
    let changed_dirs: std::collections::BTreeSet<String> = changed.iter().map(|p| parent(p)).collect();
    let dir_changed = |dir: &str| {
        let dir = dir.trim_start_matches("./").trim_end_matches('/');
        let dir = if dir == "." { "" } else { dir };
        changed_dirs.contains(dir)
    };
    let touched = |key: &str| {
        if dir_changed(modules.get("").map_or(".", String::as_str)) {
            return true;
        }
        let mut prefix = String::new();
        for part in key.split('.').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('.');
            }
            prefix.push_str(part);
            if modules.get(&prefix).is_some_and(|d| dir_changed(d)) {
                return true;
            }
        }
        false
    };
    changes
        .iter()
        .filter(|c| !touched(&module_key(&c.address)))
        .cloned()
        .collect()
}

/// `dir` (relative to the root module `root`, itself relative to the
/// repository) as a path in the repository, `.` and `..` resolved.
fn repo_path(root: &str, dir: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in root.split('/').chain(dir.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    }
}

/// `module.db.module.inner["a"].terraform_data.y` -> `db.inner`.
fn module_key(address: &str) -> String {
    let mut keys = Vec::new();
    let mut rest = address;
    while let Some(after) = rest.strip_prefix("module.") {
        let end = after.find('.').unwrap_or(after.len());
        let name = &after[..end];
        keys.push(name.split('[').next().unwrap_or(name).to_owned());
        rest = after.get(end + 1..).unwrap_or("");
    }
    keys.join(".")
}

/// What a fresh plan changes that the approved one did not, and the other way round.
fn describe_difference(approved: &TerraformPlanned, fresh: &TerraformPlanned) -> String {
    let added: Vec<ResourceChange> = fresh
        .changes
        .iter()
        .filter(|c| !approved.changes.contains(c))
        .cloned()
        .collect();
    let gone: Vec<ResourceChange> = approved
        .changes
        .iter()
        .filter(|c| !fresh.changes.contains(c))
        .cloned()
        .collect();
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("now also {}", list_changes(&added)));
    }
    if !gone.is_empty() {
        parts.push(format!("no longer {}", list_changes(&gone)));
    }
    if parts.is_empty() {
        "the same changes in another order".into()
    } else {
        parts.join("; ")
    }
}

/// `address (action), …`
fn list_changes(changes: &[ResourceChange]) -> String {
    changes
        .iter()
        .map(|c| format!("{} ({})", c.address, c.action))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Role for Infrastructure {
    fn name(&self) -> &str {
        roles::INFRASTRUCTURE
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // Cancellation drops this future: terraform is killed, its connection
        // closes and PostgreSQL releases the state lock. What it applied so far
        // is undone by `reapply-previous` (the role declares partial effects).
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }
}

#[cfg(test)]
mod tests {
    use baton_shared::facts::ResourceChange;

    use super::*;

    fn change(address: &str) -> ResourceChange {
        ResourceChange {
            address: address.to_owned(),
            action: "update".to_owned(),
        }
    }

    #[test]
    fn changes_outside_the_touched_modules_are_named() {
        let modules = std::collections::BTreeMap::from([
            (String::new(), ".".to_owned()),
            ("db".to_owned(), "modules/db".to_owned()),
            ("db.inner".to_owned(), "modules/db/inner".to_owned()),
            ("cdn".to_owned(), "modules/cdn".to_owned()),
            ("remote".to_owned(), ".terraform/modules/remote".to_owned()),
        ]);
        let changes = [
            change("terraform_data.a"),
            change("module.db.terraform_data.x"),
            change("module.db.module.inner.terraform_data.y"),
            change("module.cdn[\"eu\"].terraform_data.z"),
            change("module.remote.terraform_data.r"),
        ];
        let names = |changed: &[&str]| -> Vec<String> {
            let changed: Vec<String> = changed.iter().map(|s| (*s).to_owned()).collect();
            untouched(&changes, &modules, &changed)
                .into_iter()
                .map(|c| c.address)
                .collect()
        };
        // The db module's own file: db and the module it calls are touched.
        assert_eq!(
            names(&["modules/db/main.tf"]),
            [
                "terraform_data.a",
                "module.cdn[\"eu\"].terraform_data.z",
                "module.remote.terraform_data.r"
            ]
        );
        // Only the inner module: db's own resources changing are unintended.
        assert_eq!(
            names(&["modules/db/inner/main.tf"]),
            [
                "terraform_data.a",
                "module.db.terraform_data.x",
                "module.cdn[\"eu\"].terraform_data.z",
                "module.remote.terraform_data.r"
            ]
        );
        // A root file (the call sites): everything is touched.
        assert!(names(&["main.tf"]).is_empty());
        // Nothing changed (a redeploy of the same commit): all of it is drift.
        assert_eq!(names(&[]).len(), 5);
        assert_eq!(module_key("module.a[0].module.b[\"x\"].t.n"), "a.b");
        assert_eq!(module_key("terraform_data.a"), "");
        assert_eq!(repo_path("infra", "../modules/db"), "modules/db");
        assert_eq!(repo_path(".", "."), ".");
        assert_eq!(repo_path("infra", "."), "infra");
        assert_eq!(repo_path("infra", "modules/x/"), "infra/modules/x");
    }
}
